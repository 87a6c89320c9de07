"""Where in the pipeline a differing page was lost: the page ledger and the provenance classes.

The ledger keeps, for every page of the guest's main RAM block, what the migration stream last
carried to the destination (verifier.analysis.stream's PageRecords, fed by the tap): the record's
kind, channel, stream offset and iteration, the CRC-32 of the page content sent, and the dirtyram
generation in that copy. 16 bytes per guest page, in four typed arrays:

    place   u64  kind << 60 | channel << 56 | stream offset   (kind 0: never sent)
    crc     u32  zlib.crc32 of the 4 KiB sent (a zero page: the CRC of 4096 zero bytes)
    iter    u16  the iteration of the main channel that carried it (verifier.analysis.stream)
    gen     u16  the low 16 bits of the dirtyram generation in the copy sent; 0xFFFF: not a dirtyram page

Each differing page is then classified by comparing the copy sent with both images:

- NOT_RESENT: the destination holds exactly the last copy sent, and the source changed after that
  send: a write the source made was never re-sent, so its dirty bit was lost (or never set).
- NEVER_SENT: no channel carried the page at all.
- LOST_ON_DESTINATION: the stream carried the source's final content, the destination image differs:
  a loading (or capture) bug on the destination, not a dirty-logging bug.
- CORRUPT_IN_STREAM: the copy sent is content the source never had: a dirtyram page whose body is
  not zero, or whose header names another page (transport or encoding corruption).
- DESTINATION_DIVERGED: the destination holds neither the copy sent nor the source's content.

Which dirty-bitmap sync each iteration was sent under (`sync_table`, one entry per channel and
iteration, none per page). QEMU syncs the dirty bitmap (migration_bitmap_sync: +1 to
`dirty-sync-count`, then a MIGRATION_PASS event when the `events` capability is on) only in the
migration thread, between two RAM sections: in setup (ram_init_bitmaps, before any page), in
ram_save_pending (7.2) / ram_state_pending_exact (10.0) before the next ram_save_iterate, at the
start of ram_save_complete (the END section's pages), and when postcopy starts. So every record of
one RAM section was read from the bitmap of one sync: "pass k" is what the bitmap of sync k sent.
(One exception, not accounted for: with auto-converge, 10.0's cpu_throttle_dirty_sync_timer_tick
syncs from the main loop when no sync happened for 5 s, possibly inside a section.)
The tap stamps (time.time()) the chunk that carried each iteration's first and last record
(verifier.run.streamtap.SectionClock); the source's MIGRATION_PASS events (QMP timestamps, the same
clock) and its query-migrate polls (the time each was sent and answered) are in timeline.jsonl. A
section the tap began reading before QEMU finished writing it (provable from the socket
buffering: QEMU cannot run more than that ahead of the tap) is in pass k, k the last sync whose
event precedes that first read: exact. A short section that may have been written whole before
the tap read it gets a range, from the last sync surely before it was written to the one in
effect when it was read ("pass 1-2"); so does everything when only polls are there (a sync
between two polls). The main channel's END section of a precopy migration is in the last pass
(ram_save_complete syncs before its pages). A multifd channel of 10.0 counts rounds over the
bitmap (MULTIFD_FLUSH on the main channel marks the end of a round in find_dirty_block, not a
sync: a round's pages can come from two bitmaps), so its iterations get the range from the first to the last record.
"""

from __future__ import annotations

import json
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from verifier.analysis.pageheader import HEADER_SIZE, MAGIC_BYTES, decode

NOT_RESENT = "not-resent"
NEVER_SENT = "never-sent"
LOST_ON_DESTINATION = "lost-on-destination"
CORRUPT_IN_STREAM = "corrupt-in-stream"
DESTINATION_DIVERGED = "destination-diverged"
CLASSES = (NOT_RESENT, NEVER_SENT, LOST_ON_DESTINATION, CORRUPT_IN_STREAM, DESTINATION_DIVERGED)
SENTENCES = {
    NOT_RESENT: "not re-sent after a write on the source (its dirty bit was lost)",
    NEVER_SENT: "never sent on any channel",
    LOST_ON_DESTINATION: "sent right, lost on the destination (a loading bug, not dirty logging)",
    CORRUPT_IN_STREAM: "sent with content the source never had (transport or encoding corruption)",
    DESTINATION_DIVERGED: "the destination holds neither the copy sent nor the source's page",
}

KINDS = ("", "page", "zero", "xbzrle", "multifd", "multifd-zero")  # index 0: never sent
_KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
_OFFSET_MASK = (1 << 56) - 1
NO_GEN = 0xFFFF
BYTES_PER_PAGE = 8 + 4 + 2 + 2


def _gen16(head) -> int:
    """The low 16 bits of a dirtyram header's generation, NO_GEN for another page. Only the magic
    is checked here (cheap enough for every record); the classification decodes fully."""
    if head is None or len(head) < HEADER_SIZE or bytes(head[:4]) != MAGIC_BYTES:
        return NO_GEN
    g = int.from_bytes(head[16:18], "little")
    return NO_GEN - 1 if g == NO_GEN else g


@dataclass(frozen=True)
class LedgerEntry:
    page: int
    kind: str
    channel: str
    stream_offset: int
    iteration: int
    crc: int
    gen16: int | None

    def to_dict(self) -> dict:
        return {"page": self.page, "kind": self.kind, "channel": self.channel, "stream_offset": self.stream_offset,
                "iteration": self.iteration, "crc32": f"{self.crc:08x}", "generation_low16": self.gen16}


class PageLedger:
    """What the stream last carried for every page of one RAM block (the guest's main RAM)."""

    def __init__(self, block: str, pages: int, page_size: int = 4096):
        """`pages` units of `page_size` bytes: the stream's record size (the machine's target page)."""
        self.block = block
        self.pages = pages
        self.page_size = page_size
        self.place = array("Q", bytes(8 * pages))
        self.crc = array("I", bytes(4 * pages))
        self.iter = array("H", bytes(2 * pages))
        self.gen = array("H", [NO_GEN]) * pages
        self.channels: list[str] = []
        self.other_blocks: dict[str, int] = {}  # records of blocks not in the ledger, counted
        self.records = 0
        self.last_iteration = 0
        self.syncs: dict | None = None  # sync_table(): per (channel, iteration), set by the tap at its end
        self._zero_crc = zlib.crc32(bytes(page_size))

    @property
    def nbytes(self) -> int:
        return sum(a.itemsize * len(a) for a in (self.place, self.crc, self.iter, self.gen))

    def _channel(self, name: str) -> int:
        try:
            return self.channels.index(name)
        except ValueError:
            if len(self.channels) == 16:
                raise ValueError("more than 16 migration channels") from None
            self.channels.append(name)
            return len(self.channels) - 1

    def record(self, block: str, offset: int, kind: str, channel: str, stream_offset: int, iteration: int,
               content=None) -> None:
        """One page record as forwarded to the destination; `content` the page's bytes (None for a
        zero page)."""
        if block != self.block:
            self.other_blocks[block] = self.other_blocks.get(block, 0) + 1
            return
        page = offset // self.page_size
        if not 0 <= page < self.pages:
            raise ValueError(f"record for {block}+{offset:#x} beyond its {self.pages} pages")
        self.place[page] = (_KIND_INDEX[kind] << 60) | (self._channel(channel) << 56) | (stream_offset & _OFFSET_MASK)
        if content is None:
            self.crc[page] = self._zero_crc
            self.gen[page] = NO_GEN
        else:
            self.crc[page] = zlib.crc32(content)
            self.gen[page] = _gen16(content)
        self.iter[page] = min(iteration, 0xFFFF)
        self.last_iteration = max(self.last_iteration, iteration)
        self.records += 1

    def entry(self, page: int) -> LedgerEntry | None:
        p = self.place[page]
        kind = p >> 60
        if kind == 0:
            return None
        g = self.gen[page]
        return LedgerEntry(page=page, kind=KINDS[kind], channel=self.channels[(p >> 56) & 0xF],
                           stream_offset=p & _OFFSET_MASK, iteration=self.iter[page], crc=self.crc[page],
                           gen16=None if g == NO_GEN else g)

    _ARRAYS = ("place", "crc", "iter", "gen")

    def save(self, path) -> None:
        """The whole ledger in one file: a JSON line, then the four arrays little-endian (a tap on
        another host writes it there; the controller reads it back with `load`)."""
        import json
        import sys
        meta = {"block": self.block, "pages": self.pages, "page_size": self.page_size, "channels": self.channels,
                "other_blocks": self.other_blocks, "records": self.records, "last_iteration": self.last_iteration,
                "syncs": self.syncs}
        with open(path, "wb") as f:
            f.write(json.dumps(meta).encode() + b"\n")
            for name in self._ARRAYS:
                a = getattr(self, name)
                if sys.byteorder == "big":
                    a = array(a.typecode, a)
                    a.byteswap()
                f.write(a.tobytes())

    @classmethod
    def load(cls, data: bytes) -> "PageLedger":
        """A ledger from the bytes `save` wrote; ValueError if they are not that."""
        import json
        import sys
        head, _, rest = data.partition(b"\n")
        meta = json.loads(head)
        led = cls(meta["block"], meta["pages"], meta["page_size"])
        pos = 0
        for name in cls._ARRAYS:
            a = getattr(led, name)
            n = a.itemsize * len(a)
            if len(rest) < pos + n:
                raise ValueError(f"ledger file truncated in its {name} array")
            a[:] = array(a.typecode, rest[pos:pos + n])
            if sys.byteorder == "big":
                a.byteswap()
            pos += n
        if pos != len(rest):
            raise ValueError(f"ledger file has {len(rest) - pos} bytes after its arrays")
        led.channels, led.other_blocks = list(meta["channels"]), dict(meta["other_blocks"])
        led.records, led.last_iteration, led.syncs = meta["records"], meta["last_iteration"], meta["syncs"]
        return led

    def summary(self) -> dict:
        sent = sum(1 for p in self.place if p >> 60)
        return {"block": self.block, "pages": self.pages, "pages_sent": sent, "records": self.records,
                "iterations": self.last_iteration, "channels": list(self.channels),
                "other_blocks": dict(self.other_blocks), "bytes": self.nbytes,
                "bytes_per_page": BYTES_PER_PAGE}


@dataclass
class SyncObservations:
    """What the source said about its dirty-bitmap syncs during one migration (timeline.jsonl)."""

    events: list[tuple[float, int]] = field(default_factory=list)  # MIGRATION_PASS: (time.time(), pass)
    polls: list[tuple[float, float, int]] = field(default_factory=list)  # query-migrate: sent, answered, count
    final: int | None = None  # dirty-sync-count of the last sample
    postcopy: bool = False  # a sample was postcopy-active (ram_save_complete then does not sync)

    @property
    def start(self) -> float | None:
        times = [p[0] for p in self.polls] + [e[0] for e in self.events]
        return min(times) if times else None

    @property
    def events_complete(self) -> bool:
        """Every sync 1..final has its event (the `events` capability was on from the start)."""
        return bool(self.events) and sorted(k for _, k in self.events) == list(range(1, (self.final or 0) + 1))


def read_sync_observations(path: Path) -> SyncObservations:
    """The MIGRATION_PASS events and the timed query-migrate samples of a timeline.jsonl written by
    verifier.run.migration.run_migration (samples without `wall`, from older runs, are skipped)."""
    obs = SyncObservations()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return obs
    for line in lines:
        try:
            sample = json.loads(line)
        except ValueError:
            continue
        count = (sample.get("ram") or {}).get("dirty-sync-count")
        if count is not None:
            obs.final = count
        if str(sample.get("status", "")).startswith("postcopy"):
            obs.postcopy = True
        wall = sample.get("wall")
        if wall and count is not None:
            obs.polls.append((wall[0], wall[1], count))
        for ev in sample.get("passes") or ():
            obs.events.append((ev["time"], ev["pass"]))
    obs.events.sort()
    return obs


def sync_in_effect(t: float, obs: SyncObservations, t_early: float | None = None) -> tuple[int, int] | None:
    """The sync whose bitmap was in use when QEMU wrote a RAM section: (lo, hi), lo == hi when exact.
    The section was being written at time `t` (or, with `t_early`, it started between `t_early` and
    `t`). A pure function of the observations (module docstring): a MIGRATION_PASS event of sync k
    before the start gives >= k, one after `t` gives <= k - 1 (no section is written during a
    sync); a poll answered before the start gives >= its count, one sent after `t` <= its count.
    None when nothing was observed."""
    if not obs.events and not obs.polls:
        return None
    early = t if t_early is None else t_early
    lo, hi = 1, obs.final  # the setup sync precedes every page; no sync after the last sample
    for when, k in obs.events:
        if when < early:
            lo = max(lo, k)
        elif when > t:
            hi = k - 1 if hi is None else min(hi, k - 1)
    for sent, answered, count in obs.polls:
        if answered <= early:
            lo = max(lo, count)
        if sent >= t:
            hi = count if hi is None else min(hi, count)
    if hi is None:
        hi = lo
    return (lo, hi) if lo <= hi else (hi, lo)  # contradicting observations (a clock step): the range


def sync_table(groups: list[dict], obs: SyncObservations, rounds: tuple[str, ...] = ()) -> dict:
    """Per channel and iteration, the pass (the sync in effect) its records were sent in.

    `groups`: [{channel, iteration, records, first, last, before, during, end}]: the tap's time.time()
    of the chunk that carried the group's first and last record; `before`, a time at which QEMU had
    not yet written the first record, and `during`, one at which it had not finished writing the
    last (both from the socket buffering, see verifier.run.streamtap; None when unknown). When
    first <= during, the tap read the group while it was being written and the pass is exact;
    otherwise it lies between the sync before `before` and the one in effect at `first`. A channel
    in `rounds` (10.0 multifd: its iteration is a round over the bitmap, which may span a sync) gets
    the range from `before` to its last record. The main channel's END section (`end`) of a precopy
    migration is in the last pass: ram_save_complete syncs before its first page."""
    t0 = obs.start
    rows = []
    for g in sorted(groups, key=lambda g: g["first"]):
        before, during = g.get("before"), g.get("during")
        if g["channel"] in rounds:
            a = sync_in_effect(g["last"], obs, t_early=before if before is not None else float("-inf"))
            how = "round"
        elif during is not None and g["first"] <= during:
            a = sync_in_effect(g["first"], obs)
            how = "read while written"
        else:
            a = sync_in_effect(g["first"], obs, t_early=before if before is not None else float("-inf"))
            how = "read after it was written"
        if g.get("end") and not obs.postcopy and obs.final and a is not None and a[0] <= obs.final <= a[1]:
            a, how = (obs.final, obs.final), "END section: ram_save_complete syncs before its pages"
        row = {"channel": g["channel"], "iteration": g["iteration"], "records": g["records"],
               "sync": list(a) if a is not None else None, "how": how}
        if t0 is not None:
            row["first_s"] = round(g["first"] - t0, 4)
            row["last_s"] = round(g["last"] - t0, 4)
        rows.append(row)
    if obs.events_complete:
        basis = "MIGRATION_PASS events"
    elif obs.events:
        basis = "MIGRATION_PASS events (not every sync) and query-migrate polls"
    elif obs.polls:
        basis = "query-migrate polls"
    else:
        basis = None
    return {"basis": basis, "dirty_sync_count": obs.final, "events": len(obs.events), "polls": len(obs.polls),
            "rounds": list(rounds), "iterations": rows,
            "ambiguous": sum(1 for r in rows if r["sync"] is not None and r["sync"][0] != r["sync"][1])}


def sync_index(table: dict | None) -> dict:
    """(channel, iteration) -> (lo, hi) of a sync_table()."""
    if not table:
        return {}
    return {(r["channel"], r["iteration"]): tuple(r["sync"]) for r in table["iterations"] if r["sync"] is not None}


def _span(s: tuple[int, int]) -> str:
    return str(s[0]) if s[0] == s[1] else f"{s[0]}-{s[1]}"


@dataclass
class Provenance:
    page: int
    cls: str
    entry: LedgerEntry | None
    src_gen: int | None = None
    sent_gen: int | None = None
    note: str = ""
    sync: tuple[int, int] | None = None  # the pass of the last copy sent: (lo, hi) of sync_table

    def to_dict(self) -> dict:
        return {"page": self.page, "class": self.cls, "sentence": SENTENCES[self.cls],
                "ledger": self.entry.to_dict() if self.entry else None, "source_generation": self.src_gen,
                "sent_generation": self.sent_gen, "note": self.note,
                "sync": list(self.sync) if self.sync is not None else None}


def classify(ledger: PageLedger, page: int, src_page: bytes, dst_page: bytes) -> Provenance:
    """The provenance class of one differing image page (see the module docstring). When the
    stream's records are smaller than the image's pages (vexpress-a15: 1 KiB target pages), the
    first differing record-sized part of the page is classified, and the note says which."""
    ps = ledger.page_size
    per = max(1, len(src_page) // ps)
    hs = decode(src_page)
    src_head = hs if hs is not None and hs.valid else None
    for k in range(per):
        a, b = src_page[k * ps:(k + 1) * ps], dst_page[k * ps:(k + 1) * ps]
        if a != b:
            p = _classify_part(ledger, page, page * per + k, a, b, src_head, first_part=k == 0)
            if per > 1:
                p.note = "; ".join(x for x in (f"bytes {k * ps:#x}-{(k + 1) * ps - 1:#x} of the page", p.note) if x)
            return p
    return Provenance(page, DESTINATION_DIVERGED, None, note="the pages are equal")


def _classify_part(ledger: PageLedger, page: int, unit: int, src: bytes, dst: bytes, src_head, first_part: bool):
    """One record-sized unit of a page: `src_head` is the source page's dirtyram header or None."""
    e = ledger.entry(unit)
    src_gen = src_head.generation if src_head is not None else None
    if e is None:
        return Provenance(page, NEVER_SENT, None, src_gen)
    sent_gen = e.gen16 if first_part else None
    if zlib.crc32(src) == e.crc:
        return Provenance(page, LOST_ON_DESTINATION, e, src_gen, sent_gen)
    if zlib.crc32(dst) != e.crc:
        return Provenance(page, DESTINATION_DIVERGED, e, src_gen, sent_gen,
                          note="the destination's page is neither the last copy sent nor the source's")
    # the destination holds the copy sent; was it a state the source had?
    if src_head is not None:
        if not first_part:  # past the header a dirtyram page is zero in every state it has
            if any(dst):
                return Provenance(page, CORRUPT_IN_STREAM, e, src_gen, None, note="body not zero")
            return Provenance(page, NOT_RESENT, e, src_gen, None)
        hd = decode(dst)
        if any(dst[HEADER_SIZE:]):
            return Provenance(page, CORRUPT_IN_STREAM, e, src_gen, sent_gen, note="body not zero")
        if hd is not None and hd.valid:
            if (hd.instance_id, hd.page_index) != (src_head.instance_id, src_head.page_index):
                return Provenance(page, CORRUPT_IN_STREAM, e, src_gen, hd.generation,
                                  note="header names another page")
            if hd.generation > src_head.generation:
                return Provenance(page, CORRUPT_IN_STREAM, e, src_gen, hd.generation,
                                  note="the copy sent is newer than the source's page")
            return Provenance(page, NOT_RESENT, e, src_gen, hd.generation)
        if hd is not None:
            return Provenance(page, NOT_RESENT, e, src_gen, sent_gen,
                              note="the copy sent has a torn header (written while being sent)")
    return Provenance(page, NOT_RESENT, e, src_gen, sent_gen)


def provenance_line(p: Provenance, iterations: int, syncs: int | None = None) -> str:
    """`last sent in iteration 21 of 22 (pass 5 of 6) on channel main, gen 41; source gen 44
    written after sync 5 and not sent again` and the class; `syncs`: the migration's
    dirty-sync-count, p.sync the pass of the last copy sent (a range `4-5` when not exact)."""
    if p.entry is None:
        return SENTENCES[p.cls]
    where = f"last sent in iteration {p.entry.iteration} of {iterations}"
    if p.sync is not None:
        where += f" (pass {_span(p.sync)}" + (f" of {syncs})" if syncs else ")")
    where += f" on channel {p.entry.channel}"
    if p.entry.kind not in ("page", "multifd"):
        where += f" as a {p.entry.kind} record"
    if p.sent_gen is not None:
        where += f", gen {p.sent_gen}"
    changed = p.cls == NOT_RESENT and (p.sent_gen is None or p.src_gen is None or p.src_gen > p.sent_gen)
    if p.src_gen is not None:
        where += f"; source gen {p.src_gen}"
        if changed and p.sync is not None:
            where += f" written after sync {_span(p.sync)} and not sent again"
        elif changed and p.sent_gen is not None:
            where += ", written after that send and not sent again"
    elif changed and p.sync is not None:
        where += f"; the source's page written after sync {_span(p.sync)} and not sent again"
    return f"{SENTENCES[p.cls]}: {where}" + (f" ({p.note})" if p.note else "")


MAX_PAGES_IN_REPORT = 1000


def trace(ledger: PageLedger, result, ranges: list[dict], limit: int = 100_000) -> dict:
    """Classify the differing pages of `result` (a CompareResult; the first `limit`) against the
    ledger, add each range's `provenance` (class counts and the first page's line) to the range
    dicts of the diagnosis, and return the counts, the ledger's entries of those pages (each with
    the pass its last copy was sent in) and the ledger's sync table (`syncs`, see sync_table)."""
    from collections import Counter

    from verifier.analysis.compare import read_page_pairs
    pages = result.diff_pages[:limit]
    provs = {p: classify(ledger, p, a, b) for p, a, b in read_page_pairs(result.src, result.dst, pages,
                                                                         result.page_size)}
    index = sync_index(ledger.syncs)
    for p in provs.values():
        if p.entry is not None:
            p.sync = index.get((p.entry.channel, p.entry.iteration))
    total = ledger.syncs.get("dirty_sync_count") if ledger.syncs else None
    for r in ranges:
        inside = [provs[p] for p in range(r["first_page"], r["last_page"] + 1) if p in provs]
        if inside:
            r["provenance"] = {"classes": dict(Counter(p.cls for p in inside)),
                               "text": provenance_line(inside[0], ledger.last_iteration, total)}
            if inside[0].sync is not None:
                r["provenance"]["sync"] = list(inside[0].sync)
    listed = list(provs.values())
    return {"counts": dict(Counter(p.cls for p in listed)), "iterations": ledger.last_iteration,
            "dirty_sync_count": total, "syncs": ledger.syncs,
            "pages": [p.to_dict() for p in listed[:MAX_PAGES_IN_REPORT]],
            "pages_not_listed": max(0, len(listed) - MAX_PAGES_IN_REPORT), "not_classified": result.diff_count - len(listed)}
