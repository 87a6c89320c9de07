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
"""

from __future__ import annotations

import zlib
from array import array
from dataclasses import dataclass

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

    def summary(self) -> dict:
        sent = sum(1 for p in self.place if p >> 60)
        return {"block": self.block, "pages": self.pages, "pages_sent": sent, "records": self.records,
                "iterations": self.last_iteration, "channels": list(self.channels),
                "other_blocks": dict(self.other_blocks), "bytes": self.nbytes,
                "bytes_per_page": BYTES_PER_PAGE}


@dataclass
class Provenance:
    page: int
    cls: str
    entry: LedgerEntry | None
    src_gen: int | None = None
    sent_gen: int | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return {"page": self.page, "class": self.cls, "sentence": SENTENCES[self.cls],
                "ledger": self.entry.to_dict() if self.entry else None, "source_generation": self.src_gen,
                "sent_generation": self.sent_gen, "note": self.note}


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


def provenance_line(p: Provenance, iterations: int) -> str:
    """`last sent in iteration 3 of 6 on channel main, gen 41; source gen 44` and the class."""
    if p.entry is None:
        return SENTENCES[p.cls]
    where = f"last sent in iteration {p.entry.iteration} of {iterations} on channel {p.entry.channel}"
    if p.entry.kind not in ("page", "multifd"):
        where += f" as a {p.entry.kind} record"
    if p.sent_gen is not None:
        where += f", gen {p.sent_gen}"
    if p.src_gen is not None:
        where += f"; source gen {p.src_gen}"
        if p.cls == NOT_RESENT and p.sent_gen is not None and p.src_gen > p.sent_gen:
            where += ", written after that send and not sent again"
    return f"{SENTENCES[p.cls]}: {where}" + (f" ({p.note})" if p.note else "")


MAX_PAGES_IN_REPORT = 1000


def trace(ledger: PageLedger, result, ranges: list[dict], limit: int = 100_000) -> dict:
    """Classify the differing pages of `result` (a CompareResult; the first `limit`) against the
    ledger, add each range's `provenance` (class counts and the first page's line) to the range
    dicts of the diagnosis, and return the counts and the ledger's entries of those pages."""
    from collections import Counter

    from verifier.analysis.compare import read_page_pairs
    pages = result.diff_pages[:limit]
    provs = {p: classify(ledger, p, a, b) for p, a, b in read_page_pairs(result.src, result.dst, pages,
                                                                         result.page_size)}
    for r in ranges:
        inside = [provs[p] for p in range(r["first_page"], r["last_page"] + 1) if p in provs]
        if inside:
            r["provenance"] = {"classes": dict(Counter(p.cls for p in inside)),
                               "text": provenance_line(inside[0], ledger.last_iteration)}
    listed = list(provs.values())
    return {"counts": dict(Counter(p.cls for p in listed)), "iterations": ledger.last_iteration,
            "pages": [p.to_dict() for p in listed[:MAX_PAGES_IN_REPORT]],
            "pages_not_listed": max(0, len(listed) - MAX_PAGES_IN_REPORT), "not_classified": result.diff_count - len(listed)}
