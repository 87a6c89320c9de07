"""The stream tap of one trial: every migration channel through verifier.run.tap.Tap, parsed as it
passes by verifier.analysis.stream, each page record entered in the page ledger
(verifier.analysis.provenance), the raw bytes kept per channel with --record-stream.

The tap never decides the migration: a channel the parser cannot read is forwarded all the same,
and the report says where parsing stopped and why. Nor does it slow the migration down while it can
help it: the forwarding threads hand each chunk (with the time they received it) to one parser
thread and go on forwarding; parsing costs about 6 us per page record in Python, which inline would
hold the source back to some 20 MB/s on a stream of small or zero pages, so that a migration QEMU
finishes in 0.2 s took 2.5 s and needed more passes. The parser thread reads the chunks in the order
the tap received them, so the ledger's "last" is the same; at most PARSE_BACKLOG bytes wait for it
(beyond that a forwarding thread waits: the stream is never buffered whole), and `close` waits until
it has read everything. The parser thread still holds Python's GIL while it works, and a forwarding
thread back from a recv waits for it up to the switch interval: 5 ms by default, which made the same
migration take 0.8 s; while a tap runs the interval is PARSER_SWITCH_INTERVAL (process-wide,
restored at close), measured 0.26-0.37 s against 0.18-0.25 s with no parsing (the 7.2 vexpress-a15
smoke trial of tests/test_e2e.py, 2 cores).
"""

from __future__ import annotations

import bisect
import collections
import sys
import threading
import time
from pathlib import Path

from verifier.analysis.provenance import PageLedger, read_sync_observations, sync_table
from verifier.analysis.stream import (FLAG_CONTINUE, VM_SECTION_END, MultifdChannelParser, PreemptChannelParser,
                                      StreamFormatError, StreamParser)
from verifier.run.tap import Tap

MULTIFD_MAGIC = b"\x11\x22\x33\x44"
PARSE_BACKLOG = 256 << 20  # bytes received and forwarded but not yet parsed, at most
# While a tap runs, Python's GIL switch interval (sys.setswitchinterval, 5 ms by default): a
# forwarding thread back from recv waits this long at most for the parser thread to let it go on
PARSER_SWITCH_INTERVAL = 0.0002


class StreamTap:
    """Listen where the source migrates to, forward to `target_uri` (the destination's listener)."""

    def __init__(self, listen_uri: str, target_uri: str, directory: Path, *, ram_block_bytes: int,
                 record: bool = False, page_size: int = 4096, xbzrle: bool = False, inject=None):
        self.directory = directory
        self.ram_block_bytes = ram_block_bytes
        self.page_size = page_size  # the machine's target page (the stream's record size)
        self.xbzrle = xbzrle  # keep whole pages to decode XBZRLE records (one copy of guest RAM)
        self.ledger: PageLedger | None = None
        self._blocks_scanned = 0  # how many MEM_SIZE blocks _main_block last looked at
        self.parsers: dict[str, object] = {}
        self.errors: dict[str, str] = {}
        self.summaries: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.clock = SectionClock(socket_buffering(listen_uri))
        self.syncs: dict | None = None  # sync_table() once closed
        self.injector = StreamInjector(inject[0], inject[1], page_size, ram_block_bytes) if inject else None
        self._backlog: collections.deque = collections.deque()  # (channel, chunk, time received)
        self._backlog_bytes = 0
        self._backlog_cond = threading.Condition()
        self._closing = False
        self._parser_thread: threading.Thread | None = None
        self.tap = Tap(listen_uri, target_uri, directory, record=record, on_data=self._on_data,
                       transform=self.injector.transform if self.injector else None)

    @property
    def listen_uri(self) -> str:
        return self.tap.listen_uri

    def __enter__(self):
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, PARSER_SWITCH_INTERVAL))
        self._parser_thread = threading.Thread(target=self._parse_backlog, name="stream-parser", daemon=True)
        self._parser_thread.start()
        self.tap.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # -- parsing ------------------------------------------------------------------------------
    def _parser(self, channel: str, first: bytes):
        if channel == "main":
            return StreamParser(on_page=self._on_page, channel=channel, page_size=self.page_size,
                                xbzrle=True if self.xbzrle else None, content=True, device_bodies=True)
        if first[:4] == MULTIFD_MAGIC:
            # its iteration: the channel's own SYNC packets (passes on 10.0, sections on 7.2)
            return MultifdChannelParser(on_page=self._on_page, channel=channel, page_size=self.page_size,
                                        content=True)
        # the postcopy-preempt channel (the tap names it by elimination): RAM records of the pages the
        # destination asked for, checked against the main channel's blocks (MEM_SIZE precedes postcopy),
        # each given the main channel's current iteration
        main = self.parsers.get("main")
        if isinstance(main, StreamParser):
            return PreemptChannelParser(on_page=self._on_page, channel=channel, page_size=main.page_size,
                                        blocks=main.blocks, iteration=lambda: main.iteration, content=True)
        return PreemptChannelParser(on_page=self._on_page, channel=channel, page_size=self.page_size,
                                    content=True)

    def _on_data(self, channel: str, chunk: bytes) -> None:
        """A forwarding thread's chunk (already sent on): queued for the parser thread, with the time
        it arrived (the SectionClock's), waiting only while PARSE_BACKLOG bytes are queued."""
        when = time.time()
        with self._backlog_cond:
            while self._backlog_bytes > PARSE_BACKLOG and not self._closing:
                self._backlog_cond.wait(0.5)
            self._backlog.append((channel, chunk, when))
            self._backlog_bytes += len(chunk)
            self._backlog_cond.notify_all()

    def _parse_backlog(self) -> None:
        while True:
            with self._backlog_cond:
                while not self._backlog and not self._closing:
                    self._backlog_cond.wait()
                if not self._backlog:
                    return
                channel, chunk, when = self._backlog.popleft()
                self._backlog_bytes -= len(chunk)
                self._backlog_cond.notify_all()
            self._parse(channel, chunk, when)

    def _parse(self, channel: str, chunk: bytes, when: float) -> None:
        if channel in self.errors:
            return
        try:
            if channel not in self.parsers:
                self.parsers[channel] = self._parser(channel, bytes(chunk[:4]))
            parser = self.parsers[channel]
            if parser is not None:
                self.clock.chunk(channel, len(chunk), when)
                parser.feed(chunk)
        except StreamFormatError as exc:
            self.errors[channel] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a parser bug must not break the migration it watches
            self.errors[channel] = f"internal parser error: {type(exc).__name__}: {exc}"

    def _on_page(self, rec, content=None) -> None:
        """One record of any channel into the ledger, in the order the tap read them. Across channels
        "last" is that order, which is the destination's: a channel's record reaches the tap before the
        destination can read it, and a page goes on the preempt channel only after the destination, in
        postcopy, asked for it, i.e. after it had read every earlier main-channel copy of that page (then
        discarded by POSTCOPY_RAM_DISCARD if dirtied again). Once postcopy runs the source is stopped,
        so a page sent on both main and preempt then has the same content whichever came last (and the
        destination keeps the first it placed: userfaultfd places a page once)."""
        with self._lock:
            self.clock.record(rec, rec.channel == "main" and self.parsers["main"].section_type == VM_SECTION_END)
            if self.ledger is None:
                block = self._main_block()
                if block is None:
                    return
                self.ledger = PageLedger(block, self.ram_block_bytes // self.page_size, self.page_size)
            self.ledger.record(rec.block, rec.offset, rec.kind, rec.channel, rec.stream_offset, rec.iteration,
                               None if rec.kind in ("zero", "multifd-zero") else content)

    def _main_block(self) -> str | None:
        """The guest's main RAM: the block whose size is the guest's RAM (MEM_SIZE's list). Called per page
        until the ledger exists: the list is scanned only when it changed (MEM_SIZE is read whole), so a
        stream whose blocks never match costs one length check per page."""
        main = self.parsers.get("main")
        blocks = main.blocks if main is not None else {}
        if len(blocks) == self._blocks_scanned:
            return None
        self._blocks_scanned = len(blocks)
        for name, size in blocks.items():
            if size == self.ram_block_bytes:
                return name
        return None

    # -- the end --------------------------------------------------------------------------------
    def _drain(self) -> None:
        """Stop the parser thread once it has read every queued chunk (or parse them here if it never
        started)."""
        with self._backlog_cond:
            self._closing = True
            self._backlog_cond.notify_all()
        if self._parser_thread is not None:
            self._parser_thread.join()
            self._parser_thread = None
            sys.setswitchinterval(self._switch_interval)
        else:
            self._parse_backlog()

    def close(self) -> dict:
        summary = self.tap.close()
        self._drain()
        for name, parser in self.parsers.items():
            if parser is None or name in self.errors:
                continue
            try:
                self.summaries[name] = parser.close().to_dict()
            except StreamFormatError as exc:
                self.errors[name] = str(exc)
        self.syncs = self.sync_table()
        if self.ledger is not None:
            self.ledger.syncs = self.syncs
        return self.result(summary)

    def sync_table(self) -> dict:
        """Which dirty-bitmap sync each channel's iterations were sent under (provenance.sync_table),
        from the tap's clock and the source's MIGRATION_PASS events and polls in timeline.jsonl
        (written by run_migration in the same trial directory before the tap closes)."""
        obs = read_sync_observations(self.directory / "timeline.jsonl")
        flushes = (self.summaries.get("main") or {}).get("records", {}).get("multifd_flush", 0)
        rounds = tuple(sorted(c for c, p in self.parsers.items() if isinstance(p, MultifdChannelParser))) \
            if flushes else ()
        return sync_table(self.clock.groups(), obs, rounds)

    def device_state(self) -> tuple[list, dict | None] | None:
        """The main channel's device sections as the destination received them, and the stream's
        VMDESCRIPTION (None in postcopy, which does not send it); None if the main channel was not
        parsed to its end."""
        main = self.parsers.get("main")
        if main is None or "main" in self.errors or "main" not in self.summaries:
            return None
        return list(main.device_bodies), self.summaries["main"].get("vmdesc")

    def result(self, tap_summary) -> dict:
        chans = []
        for c in tap_summary.channels:
            chans.append({"name": c.name, "bytes": c.bytes_to_destination, "bytes_back": c.bytes_from_destination,
                          "seconds": round(c.seconds_open, 3), "recorded": str(c.recorded) if c.recorded else None,
                          "parsed": self.summaries.get(c.name), "error": str(c.error) if c.error else None})
        return {"channels": chans, "errors": [f"{k}: {v}" for k, v in self.errors.items()],
                "page_size": self.page_size, "ledger": self.ledger.summary() if self.ledger else {},
                "syncs": self.syncs}


def socket_buffering(uri: str) -> int:
    """At most how many bytes QEMU can have written to its migration socket that the tap has not yet
    received: the source's send buffer for a unix socket (QEMU leaves SO_SNDBUF at the system
    default), send plus receive buffers at their autotuning maxima for tcp; twice that, as margin."""
    def read(name: str, fallback: int) -> int:
        try:
            return int(Path("/proc/sys/net", name).read_text().split()[-1])
        except (OSError, ValueError, IndexError):
            return fallback
    if uri.startswith("unix:"):
        return 2 * read("core/wmem_default", 4 << 20)
    return 2 * (read("ipv4/tcp_wmem", 16 << 20) + read("ipv4/tcp_rmem", 16 << 20))


class SectionClock:
    """When the tap read each channel's iterations, for provenance.sync_table: per (channel,
    iteration) the time.time() of the chunk with its first and last record, and from the socket
    buffering `slack` (socket_buffering): a byte at stream offset y cannot have been written before
    the tap received the chunks up to y - slack (the buffers between them would hold more than they
    can), so the chunk before the one holding y - slack was read before y was written. Per
    iteration and per chunk, never per page."""

    def __init__(self, slack: int):
        self.slack = slack
        self._fed: dict[str, int] = {}
        self._ends: dict[str, list[int]] = {}  # per channel: stream offset after each recent chunk
        self._stamps: dict[str, list[float]] = {}  # and when the tap got it
        self._groups: dict[tuple[str, int], dict] = {}

    def chunk(self, channel: str, n: int, when: float | None = None) -> None:
        """A chunk of `n` bytes, received at `when` (time.time(); default now), is about to be parsed
        (the records in it get that time)."""
        end = self._fed.get(channel, 0) + n
        self._fed[channel] = end
        ends = self._ends.setdefault(channel, [])
        stamps = self._stamps.setdefault(channel, [])
        ends.append(end)
        stamps.append(time.time() if when is None else when)
        if len(ends) > 4096 and ends[len(ends) // 2] < end - self.slack - (8 << 20):
            del ends[:len(ends) // 2], stamps[:len(stamps) // 2]

    def _read_before_written(self, channel: str, offset: int) -> float | None:
        """A time at which the byte at `offset` had not been written yet (None: no such chunk kept)."""
        ends = self._ends.get(channel)
        i = bisect.bisect_right(ends, offset - self.slack) if ends else 0
        return self._stamps[channel][i - 1] if i else None

    def record(self, rec, end: bool = False) -> None:
        """One page record, `end`: it is in the main channel's END section."""
        stamps = self._stamps.get(rec.channel)
        if not stamps:
            return
        now = stamps[-1]
        key = (rec.channel, rec.iteration)
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = {"channel": rec.channel, "iteration": rec.iteration, "records": 0,
                                     "first": now, "last": now, "during": None, "end": end,
                                     "before": self._read_before_written(rec.channel, rec.stream_offset)}
        g["records"] += 1
        if g["during"] is None or g["last"] != now:
            g["last"] = now
            g["during"] = self._read_before_written(rec.channel, rec.stream_offset)

    def groups(self) -> list[dict]:
        return [dict(g) for g in self._groups.values()]


class StreamInjector:
    """--inject stream-drop:N / stream-flip:N: on the main channel, the tap withholds N page records
    of the final RAM section (the END section, sent after the source stopped: nothing sends those
    pages again), or flips one byte in the body of N dirtyram pages there (byte 100: past the
    header, where every state of a dirtyram page is zero). Only records that lie whole in one chunk
    the tap reads are touched, and only CONTINUE records are dropped (the next record's block
    stays the destination's current one), so the stream stays well formed. A locator parser reads
    the bytes before the change; the tap's own parser sees them after it, as the destination does."""

    def __init__(self, kind: str, count: int, page_size: int, ram_block_bytes: int):
        self.kind, self.left, self.page_size, self.ram_block_bytes = kind, count, page_size, ram_block_bytes
        self.pages: list[int] = []  # image pages (4 KiB) touched
        self.records: list[dict] = []
        self.fields: list[str] = []  # stream-device: the device field changed
        self._pos = 0
        self._found: list = []
        self._last_head: dict = {}  # (block, offset) -> the first 40 bytes last sent (injections only)
        self._locator = StreamParser(on_page=self._seen, channel="main", page_size=page_size)

    def _seen(self, rec) -> None:
        key = (rec.block, rec.offset)
        before = self._last_head.get(key)
        self._last_head[key] = rec.head
        if (self._locator.section_type == VM_SECTION_END and rec.kind == "page" and rec.head[:4] == b"DLPG"
                and (self.kind == "stream-flip" or rec.head != before)
                and self._locator.blocks.get(rec.block) == self.ram_block_bytes):
            self._found.append(rec)  # a dirtyram page (to drop: one whose last copy sent is another state)

    def transform(self, channel: str, chunk) -> bytes:
        if channel != "main" or self.left <= 0 or not chunk:
            return chunk
        start = self._pos
        self._pos += len(chunk)
        self._found = []
        try:
            self._locator.feed(chunk)
        except StreamFormatError:
            self.left = 0  # the locator cannot follow: inject nothing more, forward as is
            return chunk
        if self.kind == "stream-device":
            return self._flip_device_field(chunk, start)
        if not self._found:
            return chunk
        out = bytearray(chunk)
        cuts = []
        for rec in self._found:
            rel = rec.stream_offset - start
            if self.left <= 0 or rel < 0 or rel + 8 > len(out):
                continue
            flags = int.from_bytes(out[rel:rel + 8], "big") & (self.page_size - 1)
            data = rel + 8 + (0 if flags & FLAG_CONTINUE else 1 + out[rel + 8])
            if data + self.page_size > len(out) or (data + 40 <= len(out) and bytes(out[data:data + 40]) != rec.head):
                continue
            if self.kind == "stream-flip":
                out[data + 100] ^= 0xFF
            else:
                if not flags & FLAG_CONTINUE:
                    continue
                cuts.append((rel, data + self.page_size))
            self.left -= 1
            self.pages.append(rec.offset // 4096)
            self.records.append({"block": rec.block, "offset": rec.offset, "stream_offset": rec.stream_offset})
        for a, b in reversed(cuts):
            del out[a:b]
        return bytes(out)

    # stream-device: the first field of QEMU's "timer" section (every machine has one, version 2 in
    # 7.2 and 10.0): cpu_ticks_offset, a be64 the guest does not read on ARM (its clock is
    # cpu_clock_offset); its lowest byte is flipped, so the destination loads a value the source
    # never had and the device-state comparison must name exactly timer/cpu_ticks_offset
    DEVICE_FIELD = ("timer", 2, "timer/cpu_ticks_offset", 7)  # section, version, field, byte of the body

    def _flip_device_field(self, chunk, start: int) -> bytes:
        name, version, field, at = self.DEVICE_FIELD
        for sec in self._locator.summary().device_sections:
            if sec["name"] != name or sec["type"] != "FULL" or sec["version"] != version:
                continue
            rel = sec["stream_offset"] + 6 + len(name) + 8 + at - start  # header: type, id, len, name, instance, version
            if 0 <= rel < len(chunk):
                out = bytearray(chunk)
                out[rel] ^= 0xFF
                self.left = 0
                self.fields = [field]
                self.records.append({"section": name, "field": field, "stream_offset": rel + start})
                return bytes(out)
        return chunk

    def injection(self) -> dict:
        if self.kind == "stream-device":
            return {"kind": self.kind, "fields": list(self.fields), "records": self.records}
        return {"kind": self.kind, "pages": sorted(set(self.pages)), "records": self.records}
