"""Incremental parser of QEMU's migration stream (main channel, multifd and postcopy-preempt channels).

What is parsed (QEMU 7.2 and QEMU 10.0; differences in `VERSION_DIFFERENCES` below):

* main channel: the file header (magic ``QEVM``, version 3), the QEMU_VM_CONFIGURATION vmstate
  (machine type, the ``target-page-bits``, ``capabilities`` and ``uuid`` subsections), every
  section header (START/FULL: section id, idstr, instance, version; PART/END: section id), the
  section footers, QEMU_VM_COMMAND records, QEMU_VM_EOF and the QEMU_VM_VMDESCRIPTION JSON;
* the RAM ("ram") sections exactly, record by record: MEM_SIZE with its block list (idstr,
  used_length, the page size of a block when postcopy-ram was advised and the block's page size
  differs from the host's, its guest address when x-ignore-shared is on), PAGE, ZERO, XBZRLE
  (decoded), MULTIFD_FLUSH, EOS; every other flag (HOOK = RDMA, COMPRESS_PAGE, the obsolete FULL,
  any unknown bit) is a StreamFormatError naming the flag and the stream offset, never skipped;
* a multifd channel (`MultifdChannelParser`): the initial packet (magic, version, uuid, channel
  id), then RAM packets (header, flags, normal and zero page offsets, page data); compressed
  packets and device-state packets are refused by name;
* the postcopy-preempt channel (`PreemptChannelParser`): no header, RAM PAGE and ZERO records (with
  block idstrs, in the main channel's record format) of pages the destination asked for during
  postcopy, and possibly one final EOS; any other flag is refused.

Framing of non-RAM sections. A device section body (FULL, or START/PART/END of an iterable
section other than RAM) is not self-delimiting: only the vmstate descriptions compiled into QEMU
know its fields. scripts/analyze-migration.py therefore reads the VMDESCRIPTION JSON from the end
of the file first, which an incremental reader cannot do. This parser uses the section footer
instead (0x7e + the be32 section id, written after every section when the migration property
``send-section-footer`` is on, the default of every machine type since QEMU 2.5): the body ends at
the first occurrence of that 5-byte marker that is followed by a well-formed next item (a section
header with a printable idstr, a PART/END of a known section, a known command, or QEMU_VM_EOF
followed by the end of the data or by a VMDESCRIPTION). When the VMDESCRIPTION arrives, each FULL
section's body length is checked against the sizes QEMU recorded for its fields and subsections;
a difference is a StreamFormatError. Limits: a stream without section footers is refused as soon
as a non-RAM section appears in it; a body must be shorter than `MAX_DEVICE_SECTION` bytes; a
5-byte footer lookalike inside a body that is followed by something that looks like a section
header would be taken for the end (the VMDESCRIPTION check then reports it; streams without a
VMDESCRIPTION are not checked). Not supported at all: mapped-ram (a 10.0 file layout, not a
stream), RDMA, the 7.2 ``compress`` capability, multifd compression (zlib/zstd/qpl/uadk/qatzip),
multifd device-state packets (VFIO), postcopy recovery (a preempt or main channel reconnected after a
postcopy pause starts with RECV_BITMAP/RESUME exchanges this parser does not follow).

What `PageRecord.iteration` counts. Main channel: the number of RAM sections (QEMU_VM_SECTION_PART
or _END for "ram", each closed by RAM_SAVE_FLAG_EOS) that ended before the record, not counting
the setup section (QEMU_VM_SECTION_START, which carries the block list and no pages): pages of the
first PART section are iteration 0. One PART section is one call of QEMU's ram_save_iterate (at
most ~50 ms of sending, or until the rate limit), so a pass over the dirty bitmap may span several
iterations; a paused guest's whole RAM normally goes out in iteration 0. Multifd channel: the
number of MULTIFD_FLAG_SYNC packets received on that channel before the packet, not counting the
first one (the setup sync, which precedes every page). QEMU 7.2 syncs at every RAM section end,
so there it equals the main channel's count; QEMU 10.0 syncs once per pass over the bitmap (and
marks it with MULTIFD_FLUSH on the main channel), so there it counts passes. Postcopy-preempt
channel: it has no boundaries of its own; a live tap gives its records the main channel's current
iteration (`iteration=`), a file read alone gives them 0.

XBZRLE. A page sent as XBZRLE is a diff against the destination's current content of that page,
i.e. the content last sent for it. That base page was sent before any XBZRLE record can appear
(and nothing in the stream announces the capability beforehand), so the parser always keeps a
copy of what it needs: by default (``xbzrle=None``) the first 40 bytes of every page sent, in one
bytearray per RAM block (40/page_size of the block size, allocated at the block's first page),
which is exactly enough for `PageRecord.head`; with ``xbzrle=True`` the whole content of every
page sent (a dict, see `StreamParser.page_content`); with ``xbzrle=False`` nothing, and an XBZRLE
record is a StreamFormatError.

Target page size. RAM record headers carry flags in the low bits of the page address, so the
parser must know the target page size. The configuration's ``target-page-bits`` subsection gives
it when it differs from the target's minimum; without it the source uses that minimum, which the
stream does not name: 4096 on x86, 1024 on ARM machines that set no minimum of their own
(vexpress-a15; virt does, so its streams carry the subsection). `page_size` is that fallback; a
1 KiB-page stream parsed with 4096 fails at its second record with an error saying so, and
`verifier.analysis.stream_files.parse_file` then reads the file again with smaller sizes.

Buffering: `feed` parses what it can directly from the caller's chunk and keeps at most the
incomplete record at its end (a page, a multifd packet, a device section body, the VMDESCRIPTION).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

from verifier.errors import InputError

# =========================================================================== format constants
# The same in QEMU 7.2 and 10.0; what differs is in the next block, and only there.
FILE_MAGIC = 0x5145564D  # "QEVM"
FILE_VERSION = 3
FILE_VERSION_COMPAT = 2  # pre-2008 streams; refused

VM_EOF, VM_SECTION_START, VM_SECTION_PART, VM_SECTION_END, VM_SECTION_FULL = 0x00, 0x01, 0x02, 0x03, 0x04
VM_SUBSECTION, VM_VMDESCRIPTION, VM_CONFIGURATION, VM_COMMAND, VM_SECTION_FOOTER = 0x05, 0x06, 0x07, 0x08, 0x7E
SECTION_TYPE_NAMES = {VM_EOF: "EOF", VM_SECTION_START: "START", VM_SECTION_PART: "PART", VM_SECTION_END: "END",
                      VM_SECTION_FULL: "FULL", VM_SUBSECTION: "SUBSECTION", VM_VMDESCRIPTION: "VMDESCRIPTION",
                      VM_CONFIGURATION: "CONFIGURATION", VM_COMMAND: "COMMAND", VM_SECTION_FOOTER: "FOOTER"}

FLAG_FULL = 0x001  # obsolete since 2009
FLAG_ZERO = 0x002
FLAG_MEM_SIZE = 0x004
FLAG_PAGE = 0x008
FLAG_EOS = 0x010
FLAG_CONTINUE = 0x020
FLAG_XBZRLE = 0x040
FLAG_HOOK = 0x080  # RDMA only
RAM_SECTION_VERSION = 4
XBZRLE_ENCODING = 0x01

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_INIT_SIZE = 64  # magic, version, uuid[16], id, 7 + 32 reserved bytes
MULTIFD_HEADER_SIZE = 320  # the fixed part of a RAM packet, before offset[] (same size in 7.2 and 10.0)
MULTIFD_PACKET_SIZE = 512 * 1024  # page data per packet at most; offset[] always has this / page_size entries
MULTIFD_FLAG_SYNC = 0x01

# QEMU_VM_COMMAND: number -> (name, fixed data length or None for variable); 11 is below
COMMANDS = {0: ("INVALID", None), 1: ("OPEN_RETURN_PATH", 0), 2: ("PING", 4), 3: ("POSTCOPY_ADVISE", None),
            4: ("POSTCOPY_LISTEN", 0), 5: ("POSTCOPY_RUN", 0), 6: ("POSTCOPY_RAM_DISCARD", None),
            7: ("PACKAGED", 4), 8: ("ENABLE_COLO", 0), 9: ("POSTCOPY_RESUME", 0), 10: ("RECV_BITMAP", None)}

# =========================================================================== QEMU 7.2 vs 10.0
# Every difference between the two versions' streams that matters to this parser, one entry each:
# (what, QEMU 7.2, QEMU 10.0, how the parser deals with it), then the constants behind them. The
# parser accepts the union, whatever the version; the items marked "feature" are reported in
# StreamSummary.features when a stream has them.
VERSION_DIFFERENCES = (
    ("RAM flag 0x100 COMPRESS_PAGE", "sent with the 'compress' capability (zlib pages on the main channel)",
     "removed (9.1)", "refused with StreamFormatError in both (compressed pages are not decoded)"),
    ("RAM flag 0x200 MULTIFD_FLUSH", "does not exist (multifd syncs with every EOS)",
     "with multifd, sent once per pass over the dirty bitmap and in setup (unless the migration property "
     "multifd-flush-after-each-section=on)", "feature 'multifd-flush': counted, carries no page"),
    ("QEMU_VM_COMMAND 11 SWITCHOVER_START", "does not exist",
     "sent before the final RAM END section (property send-switchover-start, on for 10.0 machine types)",
     "feature 'switchover-start': recorded as a command"),
    ("multifd zero pages", "never: zero pages go as RAM ZERO records on the main channel",
     "zero-page-detection=multifd (default): zero pages are offsets in the multifd packet (zero_pages "
     "field at byte 32 of the packet, formerly reserved)", "kind 'multifd-zero'; the field is 0 in 7.2"),
    ("multifd SYNC packets", "may carry pages; pages_alloc always set; a packet without pages keeps the "
     "previous packet's next_packet_size", "carry no pages and have pages_alloc = 0",
     "both accepted: the data is normal_pages x page size; pages of a SYNC packet precede the sync"),
    ("multifd sync cadence", "one SYNC per channel at every RAM section end (EOS)",
     "one SYNC per channel per pass over the bitmap (paired with MULTIFD_FLUSH)",
     "multifd PageRecord.iteration therefore counts sections on 7.2 and passes on 10.0"),
    ("multifd flags", "compression in bits 1-3 (zlib, zstd)",
     "compression in bits 1-5 (zlib, zstd, qpl, uadk, qatzip), bit 6 DEVICE_STATE (VFIO)",
     "any compression bit or DEVICE_STATE is refused by name"),
    ("configuration/capabilities", "lists x-ignore-shared when on", "lists x-ignore-shared and mapped-ram",
     "x-ignore-shared adds the GPA to each MEM_SIZE block entry; mapped-ram is refused"),
    ("VMDESCRIPTION JSON", "page_size and devices", "also a 'configuration' object",
     "only 'devices' is used, to check device section sizes"),
    ("MEM_SIZE page size field", "when postcopy-ram and block page size != qemu_host_page_size",
     "when postcopy-ram and block page size != max(host page size, target page size)",
     "read when POSTCOPY_ADVISE announced postcopy-ram and the next be64 is a page size"),
    ("postcopy-preempt channel: when opened", "at the start of the migration (setup), so it exists even if "
     "postcopy never starts", "when postcopy starts (postcopy_preempt_establish_channel; at setup only for "
     "machine types <= 7.2, x-preempt-pre-7-2)", "the tap names it by elimination; an empty file whose name "
     "says preempt is an empty preempt channel"),
    ("postcopy-preempt channel: what it carries", "pages the destination asked for, sent by the migration "
     "thread; only some go there (recorded: 1 of 16 asked for, the others on the main channel)",
     "every page the destination asked for, sent from the return-path thread (ram_save_host_page_urgent), "
     "unless the main channel is sending that host page at the time",
     "both: PAGE/ZERO records with the channel's own last block, into the same ledger as channel 'preempt'"),
    ("postcopy-preempt channel: its end", "one EOS when the migration completes (postcopy_preempt_shutdown_file)",
     "no EOS (the source closes it) unless x-preempt-pre-7-2", "EOS optional; bytes after an EOS are refused"),
)

# The values behind the table, each used by the parser for both versions:
FLAG_COMPRESS_PAGE = 0x100  # 7.2 only ('compress' capability); refused
FLAG_MULTIFD_FLUSH = 0x200  # 10.0 only (8.0+); accepted on any stream
COMMANDS[11] = ("SWITCHOVER_START", 0)  # 10.0 only; accepted on any stream
MULTIFD_ZERO_PAGES_AT = 32  # byte of the packet holding zero_pages in 10.0 (9.0+); reserved, so 0, in 7.2
MULTIFD_COMPRESSION = {1: "zlib", 2: "zstd", 4: "qpl", 8: "uadk", 16: "qatzip"}  # 7.2 knows zlib, zstd
MULTIFD_FLAG_COMPRESSION_MASK = 0x1F << 1  # the 10.0 width; 7.2 uses 0x7 << 1, a subset
MULTIFD_FLAG_DEVICE_STATE = 0x40  # 10.0 only (VFIO device state); refused
CAPABILITIES_REFUSED = {"mapped-ram": "mapped-ram streams (10.0, file: migration) lay pages out at file offsets"}

RAM_FLAG_NAMES = {FLAG_FULL: "FULL", FLAG_ZERO: "ZERO", FLAG_MEM_SIZE: "MEM_SIZE", FLAG_PAGE: "PAGE",
                  FLAG_EOS: "EOS", FLAG_CONTINUE: "CONTINUE", FLAG_XBZRLE: "XBZRLE", FLAG_HOOK: "HOOK",
                  FLAG_COMPRESS_PAGE: "COMPRESS_PAGE", FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH"}
MAX_DEVICE_SECTION = 64 << 20
PAGE_HEAD = 40

_BE64 = struct.Struct(">Q")
_BE32 = struct.Struct(">I")
_BE16 = struct.Struct(">H")
_ZERO_HEAD = bytes(PAGE_HEAD)


# =========================================================================== public types
class StreamFormatError(InputError):
    """The bytes are not (or no longer) a QEMU migration stream this parser understands.

    `offset` is the byte offset in the channel's stream, `channel` its name."""

    def __init__(self, message: str, *, offset: int | None = None, channel: str | None = None):
        super().__init__(message)
        self.offset = offset
        self.channel = channel


class XbzrleError(StreamFormatError):
    """An XBZRLE record that cannot be decoded (bad encoding, or content tracking is off)."""


@dataclass(frozen=True, slots=True)
class PageRecord:
    block: str  # RAM block idstr, e.g. "mach-virt.ram"
    offset: int  # byte offset of the page within the block
    kind: str  # "page" | "zero" | "xbzrle" | "multifd" | "multifd-zero"
    iteration: int  # see the module docstring
    channel: str  # "main" or "multifd-N"
    stream_offset: int  # main: the record's be64 header; multifd: the page's data, or its offset[] entry if zero
    head: bytes | None  # first 40 bytes of the content as sent (xbzrle decoded); None for zero pages


@dataclass
class StreamSummary:
    """What one channel's stream held; `to_dict()` for JSON."""

    channel: str
    kind: str  # "main" | "multifd"
    path: str | None = None
    bytes: int = 0
    complete: bool = False  # main: QEMU_VM_EOF seen; multifd: ended at a packet boundary
    stream_version: int | None = None  # main: file format version (3); multifd: packet version (1)
    machine: str | None = None
    page_size: int = 4096
    capabilities: list[str] = field(default_factory=list)
    postcopy_ram: bool = False
    section_footers: bool | None = None
    records: dict[str, int] = field(default_factory=dict)
    iterations: list[dict] = field(default_factory=list)
    ram_blocks: list[dict] = field(default_factory=list)
    ram_sections: int = 0
    device_sections: list[dict] = field(default_factory=list)
    commands: dict[str, int] = field(default_factory=dict)
    vmdescription: bool = False
    vmdesc: dict | None = None
    vmdesc_checked: int = 0  # device sections whose size matched the VMDESCRIPTION
    features: list[str] = field(default_factory=list)  # seen items not every stream has: xbzrle,
    # multifd-flush and switchover-start (QEMU >= 8.0 / 10.0, see VERSION_DIFFERENCES), packaged (postcopy)
    multifd_id: int | None = None
    uuid: str | None = None
    packets: int = 0
    sync_packets: int = 0

    @property
    def iteration_count(self) -> int:
        return len(self.iterations)

    def pages_per_iteration(self) -> list[dict]:
        return [dict(x) for x in self.iterations]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "channel", "kind", "path", "bytes", "complete", "stream_version", "machine", "page_size",
            "capabilities", "postcopy_ram", "section_footers", "records", "ram_sections", "ram_blocks",
            "iterations", "device_sections", "commands", "vmdescription", "vmdesc_checked", "features",
            "multifd_id", "uuid", "packets", "sync_packets", "vmdesc")}
        d["iteration_count"] = self.iteration_count
        return json.loads(json.dumps(d))  # deep copy, JSON types only


def _record_factory():
    """PageRecord without the frozen dataclass __init__ (which sets each field through object.__setattr__):
    the slot descriptors directly, about twice as fast; the result is an ordinary PageRecord."""
    new = object.__new__
    sets = [getattr(PageRecord, f).__set__ for f in PageRecord.__dataclass_fields__]
    s_block, s_offset, s_kind, s_iteration, s_channel, s_stream_offset, s_head = sets

    def make(block, offset, kind, iteration, channel, stream_offset, head, cls=PageRecord):
        r = new(cls)
        s_block(r, block)
        s_offset(r, offset)
        s_kind(r, kind)
        s_iteration(r, iteration)
        s_channel(r, channel)
        s_stream_offset(r, stream_offset)
        s_head(r, head)
        return r
    return make


_new_record = _record_factory()


def _call_with_view(on_page, rec, view: memoryview, start: int, stop: int) -> None:
    """on_page(rec, view[start:stop]), the slice released afterwards (so the buffer can be resized)."""
    part = view[start:stop]
    try:
        on_page(rec, part)
    finally:
        part.release()


class _Need(Exception):
    """Not enough bytes: the record starting at `at` needs `need` bytes from there."""

    __slots__ = ("at", "need")

    def __init__(self, at: int, need: int):
        self.at = at
        self.need = need


# states of the main parser
_S_MAGIC, _S_TOP, _S_RAM, _S_FOOTER, _S_DEVBODY, _S_AFTER_EOF, _S_DONE = range(7)


def _find(buf, sub: bytes, start: int, end: int) -> int:
    if isinstance(buf, memoryview):
        i = bytes(buf[start:end]).find(sub)
        return i + start if i >= 0 else -1
    return buf.find(sub, start, end)


def _flag_names(flags: int) -> str:
    names = [RAM_FLAG_NAMES.get(1 << b, f"0x{1 << b:x}") for b in range(flags.bit_length()) if flags >> b & 1]
    return "|".join(names)


class _Incremental:
    """Chunk handling shared by both parsers: parse in place, keep only an incomplete record."""

    def __init__(self, channel: str):
        self.channel = channel
        self._pending = bytearray()
        self._base = 0  # stream offset of _pending[0] (or of the chunk position parsing resumes at)
        self._need = 1
        self._total = 0
        self._closed = False
        self._final = False

    @property
    def bytes_fed(self) -> int:
        """How many bytes of the stream feed() was given so far."""
        return self._total

    def _err(self, what: str, offset: int, cls=StreamFormatError):
        return cls(f"{self.channel} channel: {what} at stream offset {offset}", offset=offset, channel=self.channel)

    def feed(self, data) -> None:
        """Parse the next bytes of the stream (any chunking)."""
        if self._closed:
            raise ValueError("feed() after close()")
        if isinstance(data, memoryview) and (data.ndim != 1 or data.format != "B"):
            data = data.cast("B")  # indexing must give unsigned bytes
        n = len(data)
        if not n:
            return
        self._total += n
        start = 0
        pend = self._pending
        while pend:
            want = self._need - len(pend)
            take = min(max(want, 1), n - start)
            if take <= 0:
                return
            pend += data[start:start + take]
            start += take
            if len(pend) < self._need:
                return
            used = self._run(pend, 0, len(pend), self._base)
            if used:
                del pend[:used]
                self._base += used
        if start < n:
            pos = self._run(data, start, n, self._base - start)
            self._base += pos - start
            if pos < n:
                pend += data[pos:n]

    def _run(self, buf, pos: int, end: int, delta: int) -> int:
        try:
            pos = self._parse(buf, pos, end, delta)
            self._need = 1
        except _Need as e:
            pos, self._need = e.at, e.need
            if self._need <= end - pos:  # a handler asked for what it had: never loop on it
                self._need = end - pos + 1
        return pos

    def _parse(self, buf, pos: int, end: int, delta: int) -> int:
        raise NotImplementedError


# =========================================================================== main channel
class StreamParser(_Incremental):
    """The main migration channel, fed incrementally; `on_page(PageRecord)` for every RAM page record."""

    def __init__(self, on_page: Callable[..., None] | None = None, channel: str = "main",
                 page_size: int = 4096, *, xbzrle: bool | None = None, content: bool = False,
                 device_bodies: bool = False):
        """`on_page(record)` for every RAM page record; with ``content=True``, `on_page(record, content)`,
        content being the page as sent: a memoryview valid only during the call (copy it to keep it) for
        PAGE records, the decoded page for XBZRLE records with ``xbzrle=True`` (None otherwise: only
        its head is known), None for ZERO records. `page_size`: see the module docstring. `xbzrle`:
        which page copies are kept for XBZRLE decoding (module docstring). With ``device_bodies=True``
        the body of every FULL (device) section is kept, in stream order: `device_bodies` (what
        verifier.capture.devstate decodes field by field; a few tens of KiB for an ARM guest)."""
        super().__init__(channel)
        if page_size < 1024 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1024, not {page_size}")
        self.on_page = on_page
        self.content = content
        self._set_page_size(page_size)
        # True once the configuration carried target-page-bits; without it QEMU uses its target's minimum
        # page size, which the stream does not say: 4096 on x86, 1024 on ARM machines that set no minimum
        # (vexpress-a15; virt sets 4096 and so sends the subsection), hence the page_size argument
        self.page_size_from_stream = False
        self._xbzrle_mode = xbzrle
        self._state = _S_MAGIC
        self._s = StreamSummary(channel=channel, kind="main", page_size=page_size)
        self._blocks: dict[str, int] = {}  # idstr -> used_length
        self._sections: dict[int, dict] = {}  # section id -> {"name", "instance", "version", "ram"}
        self._cur: dict | None = None  # the section being read
        self._cur_type = 0
        self._iteration = 0
        self._counts = [0, 0, 0]  # page, zero, xbzrle of the current iteration
        self._iters: list[list[int]] = []
        self._totals = {"page": 0, "zero": 0, "xbzrle": 0, "mem_size": 0, "eos": 0, "multifd_flush": 0}
        self._block: str | None = None  # last block named in a page header (RAM_SAVE_FLAG_CONTINUE)
        self._heads: dict[str, bytearray] = {}  # default xbzrle mode: first 40 bytes of each sent page
        self._pages: dict[tuple[str, int], bytes | None] | None = {} if xbzrle else None  # xbzrle=True
        self._body_start = 0
        self._scan = 0
        self._ignore_shared = False
        self._rejected: tuple[int, int] | None = None  # first footer lookalike of a body, and the byte after it
        self._features: list[str] = []
        self.device_bodies: list[tuple[dict, bytes]] | None = [] if device_bodies else None

    def _set_page_size(self, ps: int) -> None:
        self.page_size = ps
        self._mask = ps - 1
        self._shift = ps.bit_length() - 1

    def _feature(self, name: str) -> None:
        if name not in self._features:
            self._features.append(name)

    # -- results ----------------------------------------------------------------------------
    @property
    def section_type(self) -> int:
        """The type (VM_SECTION_START/PART/END/FULL) of the section being read, 0 before the first."""
        return self._cur_type

    @property
    def iteration(self) -> int:
        """The iteration the next RAM record of this channel belongs to (module docstring)."""
        return self._iteration

    @property
    def blocks(self) -> Mapping[str, int]:
        """The RAM blocks of the MEM_SIZE list so far: idstr -> used_length (read-only)."""
        return MappingProxyType(self._blocks)

    def page_content(self, block: str, offset: int) -> bytes | None:
        """With xbzrle=True: the content last sent for a page (zeros for a ZERO record), None if never sent."""
        if self._pages is None:
            raise ValueError("page_content() needs StreamParser(xbzrle=True)")
        key = (block, offset)
        if key not in self._pages:
            return None
        data = self._pages[key]
        return bytes(self.page_size) if data is None else data

    def summary(self) -> StreamSummary:
        """The summary of what was parsed so far (close() returns the final one)."""
        s = self._s
        s.bytes = self._total
        s.page_size = self.page_size
        iters = self._iters + ([self._counts] if any(self._counts) else [])
        s.iterations = [{"iteration": i, "page": c[0], "zero": c[1], "xbzrle": c[2]} for i, c in enumerate(iters)]
        s.records = dict(self._totals)
        for c in iters:
            s.records["page"] += c[0]
            s.records["zero"] += c[1]
            s.records["xbzrle"] += c[2]
        s.features = list(self._features)
        return s

    def close(self) -> StreamSummary:
        """End of the stream: the summary, or StreamFormatError if it stopped mid-record or before EOF."""
        if not self._closed:
            self._closed = True
            if self._pending and self._state == _S_DEVBODY:
                self._final = True
                used = self._run(self._pending, 0, len(self._pending), self._base)
                del self._pending[:used]
                self._base += used
        where = self._base
        if self._pending:
            raise self._err(f"stream truncated inside {self._what()} ({len(self._pending)} bytes of an "
                            f"incomplete record)", where)
        if self._state not in (_S_AFTER_EOF, _S_DONE):
            if self._total == 0:
                raise self._err("empty stream (not a QEMU migration stream)", 0)
            raise self._err(f"stream truncated: it ends in {self._what()}, before QEMU_VM_EOF", where)
        return self.summary()

    def _what(self) -> str:
        if self._state == _S_MAGIC:
            return "the file header"
        if self._state == _S_RAM:
            return f"RAM section {self._cur_id()} (iteration {self._iteration})"
        if self._state == _S_DEVBODY:
            return f"the body of section {self._cur_id()} ({self._cur['name']})"
        if self._state == _S_FOOTER:
            return f"the footer of section {self._cur_id()}"
        if self._state == _S_AFTER_EOF:
            return "the VMDESCRIPTION"
        return "the section list"

    def _cur_id(self):
        return self._cur["id"] if self._cur else "?"

    # -- the state machine ---------------------------------------------------------------------
    def _parse(self, buf, pos, end, delta):
        while True:
            st = self._state
            if st == _S_RAM:
                pos = self._ram(buf, pos, end, delta)
                continue
            if pos >= end:
                return pos
            if st == _S_TOP:
                pos = self._top(buf, pos, end, delta)
            elif st == _S_FOOTER:
                pos = self._footer(buf, pos, end, delta)
            elif st == _S_DEVBODY:
                pos = self._devbody(buf, pos, end, delta)
            elif st == _S_MAGIC:
                pos = self._magic(buf, pos, end, delta)
            elif st == _S_AFTER_EOF:
                pos = self._after_eof(buf, pos, end, delta)
            else:
                raise self._err(f"{end - pos} bytes of trailing data after the end of the stream", pos + delta)

    def _magic(self, buf, pos, end, delta):
        if end - pos < 8:
            if bytes(buf[pos:end]) != b"QEVM\0\0\0\x03"[:end - pos]:
                raise self._err(f"not a QEMU migration stream (starts with {bytes(buf[pos:end])[:8].hex()})",
                                pos + delta)
            raise _Need(pos, 8)
        magic, version = struct.unpack_from(">II", buf, pos)
        if magic != FILE_MAGIC:
            raise self._err(f"not a QEMU migration stream (magic 0x{magic:08x}, expected 0x{FILE_MAGIC:08x} "
                            f"'QEVM')", pos + delta)
        if version != FILE_VERSION:
            raise self._err(f"unsupported migration stream version {version} (expected {FILE_VERSION})",
                            pos + 4 + delta)
        self._s.stream_version = version
        self._state = _S_TOP
        return pos + 8

    def _top(self, buf, pos, end, delta):
        t = buf[pos]
        if t == VM_SECTION_START or t == VM_SECTION_FULL:
            if end - pos < 6:
                raise _Need(pos, 6)
            sid = _BE32.unpack_from(buf, pos + 1)[0]
            n = buf[pos + 5]
            hl = 6 + n + 8
            if end - pos < hl:
                raise _Need(pos, hl)
            name = bytes(buf[pos + 6:pos + 6 + n]).decode("ascii", "replace")
            instance, version = struct.unpack_from(">II", buf, pos + 6 + n)
            sec = {"id": sid, "name": name, "instance": instance, "version": version,
                   "ram": name == "ram" and t == VM_SECTION_START}
            if sec["ram"] and version != RAM_SECTION_VERSION:
                raise self._err(f"RAM section version {version} (this parser knows {RAM_SECTION_VERSION})",
                                pos + delta)
            self._sections[sid] = sec
            return self._enter(sec, t, pos, pos + hl, delta)
        if t == VM_SECTION_PART or t == VM_SECTION_END:
            if end - pos < 5:
                raise _Need(pos, 5)
            sid = _BE32.unpack_from(buf, pos + 1)[0]
            sec = self._sections.get(sid)
            if sec is None:
                raise self._err(f"QEMU_VM_SECTION_{SECTION_TYPE_NAMES[t]} for section id {sid}, which no "
                                f"SECTION_START opened", pos + delta)
            return self._enter(sec, t, pos, pos + 5, delta)
        if t == VM_CONFIGURATION:
            return self._configuration(buf, pos, end, delta)
        if t == VM_COMMAND:
            return self._command(buf, pos, end, delta)
        if t == VM_EOF:
            self._state = _S_AFTER_EOF
            self._s.complete = True
            return pos + 1
        name = SECTION_TYPE_NAMES.get(t)
        raise self._err(f"unexpected {'QEMU_VM_' + name if name else 'unknown section type'} (0x{t:02x}) "
                        f"where a section starts", pos + delta)

    def _enter(self, sec, t, pos, body, delta):
        self._cur = sec
        self._cur_type = t
        if sec["ram"]:
            self._s.ram_sections += 1
            self._state = _S_RAM
            return body
        entry = {"section_id": sec["id"], "type": SECTION_TYPE_NAMES[t], "name": sec["name"],
                 "instance": sec["instance"], "version": sec["version"], "stream_offset": pos + delta,
                 "size": None}
        self._s.device_sections.append(entry)
        if self._s.section_footers is False:
            raise self._err(f"section {sec['id']} ({sec['name']}): this stream has no section footers "
                            f"(send-section-footer=off), so a device section body cannot be delimited "
                            f"without the VMDESCRIPTION", pos + delta)
        self._state = _S_DEVBODY
        self._body_start = body + delta
        self._scan = body + delta
        self._rejected = None
        return body

    def _configuration(self, buf, pos, end, delta):
        c = pos + 1
        if end - c < 4:
            raise _Need(pos, 5)
        n = _BE32.unpack_from(buf, c)[0]
        c += 4
        if n > 255:
            raise self._err(f"configuration: machine name of {n} bytes", c - 4 + delta)
        if end - c < n + 1:
            raise _Need(pos, c + n + 1 - pos)
        machine = bytes(buf[c:c + n]).decode("ascii", "replace")
        c += n
        caps: list[str] = []
        page_bits = None
        uuid = None
        while True:
            if c >= end:
                raise _Need(pos, c + 1 - pos)
            if buf[c] != VM_SUBSECTION:
                break
            if end - c < 2:
                raise _Need(pos, c + 2 - pos)
            ln = buf[c + 1]
            if end - c < 2 + ln + 4:
                raise _Need(pos, c + 6 + ln - pos)
            sub = bytes(buf[c + 2:c + 2 + ln]).decode("ascii", "replace")
            at = c
            c += 2 + ln + 4
            if sub == "configuration/target-page-bits":
                if end - c < 4:
                    raise _Need(pos, c + 4 - pos)
                page_bits = _BE32.unpack_from(buf, c)[0]
                c += 4
            elif sub == "configuration/capabilities":
                if end - c < 4:
                    raise _Need(pos, c + 4 - pos)
                count = _BE32.unpack_from(buf, c)[0]
                c += 4
                for _ in range(count):
                    if c >= end:
                        raise _Need(pos, c + 1 - pos)
                    ln = buf[c]
                    if end - c < 1 + ln:
                        raise _Need(pos, c + 1 + ln - pos)
                    caps.append(bytes(buf[c + 1:c + 1 + ln]).decode("ascii", "replace"))
                    c += 1 + ln
            elif sub == "configuration/uuid":
                if end - c < 16:
                    raise _Need(pos, c + 16 - pos)
                uuid = bytes(buf[c:c + 16]).hex()
                c += 16
            else:
                raise self._err(f"unknown configuration subsection {sub!r}", at + delta)
        s = self._s
        s.machine = machine
        s.capabilities = caps
        if uuid:
            s.uuid = uuid
        for cap in caps:
            if cap in CAPABILITIES_REFUSED:
                raise self._err(f"capability {cap} is not supported: {CAPABILITIES_REFUSED[cap]}", pos + delta)
        self._ignore_shared = "x-ignore-shared" in caps
        self.page_size_from_stream = page_bits is not None
        if page_bits is not None:
            if not 10 <= page_bits <= 16:
                raise self._err(f"configuration: target page bits {page_bits}", pos + delta)
            self._set_page_size(1 << page_bits)
        return c

    def _command(self, buf, pos, end, delta):
        if end - pos < 5:
            raise _Need(pos, 5)
        cmd, ln = struct.unpack_from(">HH", buf, pos + 1)
        known = COMMANDS.get(cmd)
        if known is None or cmd == 0:
            raise self._err(f"unknown QEMU_VM_COMMAND {cmd} (length {ln})", pos + delta)
        name, fixed = known
        if fixed is not None and ln != fixed:
            raise self._err(f"QEMU_VM_COMMAND {name} with {ln} data bytes (expected {fixed})", pos + delta)
        if end - pos < 5 + ln:
            raise _Need(pos, 5 + ln)
        self._s.commands[name] = self._s.commands.get(name, 0) + 1
        if name == "POSTCOPY_ADVISE" and ln >= 16:
            self._s.postcopy_ram = True
        elif name == "SWITCHOVER_START":
            self._feature("switchover-start")
        elif name == "PACKAGED":
            # a wrapped stream (postcopy: LISTEN, the device sections, RUN): read its sections in line
            self._feature("packaged")
        return pos + 5 + ln

    def _footer(self, buf, pos, end, delta):
        s = self._s
        if s.section_footers is None:
            s.section_footers = buf[pos] == VM_SECTION_FOOTER
        if not s.section_footers:
            self._state = _S_TOP
            return pos
        if end - pos < 5:
            raise _Need(pos, 5)
        sid = _BE32.unpack_from(buf, pos + 1)[0]
        if buf[pos] != VM_SECTION_FOOTER or sid != self._cur["id"]:
            found = f"0x{buf[pos]:02x}" + (f" for section {sid}" if buf[pos] == VM_SECTION_FOOTER else "")
            raise self._err(f"expected the footer of section {self._cur['id']} ({self._cur['name']}), "
                            f"found {found}", pos + delta)
        self._state = _S_TOP
        return pos + 5

    # -- non-RAM sections: find the footer ------------------------------------------------------
    def _devbody(self, buf, pos, end, delta):
        sec = self._cur
        marker = b"\x7e" + _BE32.pack(sec["id"])
        start = pos  # == body start (the state is entered with pos at the body)
        i = max(self._scan - delta, pos)
        while True:
            i = _find(buf, marker, i, end)
            if i < 0:
                self._scan = max(end - 4, pos) + delta
                have = end - start
                if have > MAX_DEVICE_SECTION or self._final:
                    raise self._no_footer(sec, start + delta, have)
                raise _Need(start, have + max(4096, have))
            ok = self._plausible_next(buf, i + 5, end)
            if ok is None:
                self._scan = i + delta
                raise _Need(start, i + 5 + 300 - start)
            if ok:
                break
            if self._rejected is None:  # for the error, should no footer ever match
                self._rejected = (i + delta, buf[i + 5])
            i += 1
        self._s.device_sections[-1]["size"] = i - start
        if self.device_bodies is not None and self._cur_type == VM_SECTION_FULL:
            self.device_bodies.append((self._s.device_sections[-1], bytes(buf[start:i])))
        self._s.section_footers = True
        self._state = _S_FOOTER
        return i

    def _no_footer(self, sec, start, have):
        what = f"section {sec['id']} ({sec['name']})"
        if self._rejected is not None:
            at, t = self._rejected
            name = SECTION_TYPE_NAMES.get(t)
            kind = f"QEMU_VM_{name}" if name else "unknown section type"
            return self._err(f"the footer of {what} at stream offset {at} is followed by {kind} (0x{t:02x}), "
                             f"which cannot follow a section, and no later footer of it fits", at + 5)
        if self._final:
            return self._err(f"stream truncated inside the body of {what} ({have} bytes, no footer)", start)
        return self._err(f"no footer for {what} within {MAX_DEVICE_SECTION} bytes", start)

    def _plausible_next(self, buf, at, end):
        """Is buf[at:] the start of a well-formed item after a section? None: cannot tell yet."""
        if at >= end:
            return True if self._final else None
        t = buf[at]
        if t == VM_EOF:
            if at + 1 >= end:
                return True if self._final else None
            if buf[at + 1] != VM_VMDESCRIPTION:
                return False
            if end - at < 7:
                return True if self._final else None
            return buf[at + 6] == 0x7B  # '{'
        if t == VM_SECTION_FULL or t == VM_SECTION_START:
            if end - at < 6:
                return False if self._final else None
            n = buf[at + 5]
            if n == 0:
                return False
            if end - at < 6 + n + 8:
                return False if self._final else None
            name = bytes(buf[at + 6:at + 6 + n])
            if not all(0x20 < b < 0x7F for b in name):
                return False
            version = _BE32.unpack_from(buf, at + 6 + n + 4)[0]
            return version < 0x10000
        if t == VM_SECTION_PART or t == VM_SECTION_END:
            if end - at < 5:
                return False if self._final else None
            return _BE32.unpack_from(buf, at + 1)[0] in self._sections
        if t == VM_COMMAND:
            if end - at < 5:
                return False if self._final else None
            cmd, ln = struct.unpack_from(">HH", buf, at + 1)
            known = COMMANDS.get(cmd)
            return bool(known) and cmd != 0 and (known[1] is None or known[1] == ln)
        return False

    # -- after QEMU_VM_EOF ---------------------------------------------------------------------
    def _after_eof(self, buf, pos, end, delta):
        t = buf[pos]
        if t != VM_VMDESCRIPTION:
            raise self._err(f"unexpected byte 0x{t:02x} after QEMU_VM_EOF (only a QEMU_VM_VMDESCRIPTION may "
                            f"follow)", pos + delta)
        if end - pos < 5:
            raise _Need(pos, 5)
        n = _BE32.unpack_from(buf, pos + 1)[0]
        if n > MAX_DEVICE_SECTION:
            raise self._err(f"VMDESCRIPTION of {n} bytes", pos + delta)
        if end - pos < 5 + n:
            raise _Need(pos, 5 + n)
        try:
            desc = json.loads(bytes(buf[pos + 5:pos + 5 + n]))
        except ValueError as exc:
            raise self._err(f"VMDESCRIPTION is not JSON ({exc})", pos + 5 + delta) from None
        s = self._s
        s.vmdescription = True
        s.vmdesc = desc
        self._state = _S_DONE
        self._check_vmdesc(desc, pos + delta)
        return pos + 5 + n

    def _check_vmdesc(self, desc: dict, offset: int) -> None:
        devices = desc.get("devices") if isinstance(desc, dict) else None
        if not isinstance(devices, list):
            raise self._err("VMDESCRIPTION without a 'devices' list", offset)
        full = [d for d in self._s.device_sections if d["type"] == "FULL"]
        if len(full) != len(devices):
            raise self._err(f"VMDESCRIPTION describes {len(devices)} device sections, the stream has "
                            f"{len(full)} FULL sections", offset)
        for sec, dev in zip(full, devices):
            if (dev.get("name"), dev.get("instance_id")) != (sec["name"], sec["instance"]):
                raise self._err(f"VMDESCRIPTION lists {dev.get('name')} instance {dev.get('instance_id')} where "
                                f"the stream has section {sec['section_id']} {sec['name']} instance "
                                f"{sec['instance']}", offset)
            want = vmdesc_size(dev)
            if want != sec["size"]:
                raise self._err(f"section {sec['section_id']} ({sec['name']}) has a {sec['size']}-byte body "
                                f"by its footer but {want} bytes by the VMDESCRIPTION", sec["stream_offset"])
        self._s.vmdesc_checked = len(full)

    # -- RAM ---------------------------------------------------------------------------------
    def _ram(self, buf, pos, end, delta):
        """RAM records until EOS; the two common records (a page or a zero page of the same block) inline."""
        unpack = _BE64.unpack_from
        mask = self._mask
        ps = self.page_size
        shift = self._shift
        on_page = self.on_page
        pages = self._pages
        it = self._iteration
        chan = self.channel
        block = self._block
        bsize = self._blocks.get(block, 0) if block is not None else 0
        track = pages is None and self._xbzrle_mode is None
        heads = self._head_store(block) if (block is not None and track) else None
        n_page = n_zero = 0
        rec_len = 8 + ps
        mk = _new_record
        zero_head = _ZERO_HEAD
        view = memoryview(buf) if self.content and on_page is not None else None
        try:
            while True:
                if end - pos < 8:
                    raise _Need(pos, 8)
                hdr = unpack(buf, pos)[0]
                flags = hdr & mask
                if flags == 0x28:  # PAGE | CONTINUE
                    nxt = pos + rec_len
                    if nxt > end:
                        raise _Need(pos, rec_len)
                    off = hdr ^ 0x28
                    if off >= bsize:
                        raise self._bad_offset(block, off, flags, pos + delta)
                    if heads is not None:
                        head = bytes(buf[pos + 8:pos + 48])
                        i = (off >> shift) * 40
                        heads[i:i + 40] = head
                    else:
                        if pages is not None:
                            pages[(block, off)] = bytes(buf[pos + 8:nxt])
                        head = bytes(buf[pos + 8:pos + 48]) if on_page is not None else None
                    if on_page is not None:
                        if view is None:
                            on_page(mk(block, off, "page", it, chan, pos + delta, head))
                        else:
                            _call_with_view(on_page, mk(block, off, "page", it, chan, pos + delta, head),
                                            view, pos + 8, nxt)
                    n_page += 1
                    pos = nxt
                    continue
                if flags == 0x22:  # ZERO | CONTINUE
                    if end - pos < 9:
                        raise _Need(pos, 9)
                    off = hdr ^ 0x22
                    if off >= bsize:
                        raise self._bad_offset(block, off, flags, pos + delta)
                    if buf[pos + 8]:
                        raise self._err(f"zero page record with fill byte 0x{buf[pos + 8]:02x}", pos + 8 + delta)
                    if heads is not None:
                        i = (off >> shift) * 40
                        heads[i:i + 40] = zero_head
                    elif pages is not None:
                        pages[(block, off)] = None
                    if on_page is not None:
                        if view is None:
                            on_page(mk(block, off, "zero", it, chan, pos + delta, None))
                        else:
                            on_page(mk(block, off, "zero", it, chan, pos + delta, None), None)
                    n_zero += 1
                    pos += 9
                    continue
                # everything else, and the first record of each block
                self._counts[0] += n_page
                self._counts[1] += n_zero
                n_page = n_zero = 0
                pos = self._ram_record(buf, pos, end, delta, hdr, flags)
                if self._state != _S_RAM:
                    return pos
                it = self._iteration
                if self._block != block:
                    block = self._block
                    bsize = self._blocks[block]
                    heads = self._head_store(block) if track else None
        finally:
            self._counts[0] += n_page
            self._counts[1] += n_zero
            if view is not None:
                view.release()

    def _bad_offset(self, block, off, flags, offset):
        if block is None:
            return self._err(f"RAM_SAVE_FLAG_CONTINUE (flags 0x{flags:x}) with no previous RAM block", offset)
        return self._err(f"page offset 0x{off:x} beyond RAM block {block} (0x{self._blocks[block]:x} bytes)", offset)

    def _head_store(self, block: str) -> bytearray:
        h = self._heads.get(block)
        if h is None:
            h = self._heads[block] = bytearray(((self._blocks[block] + self.page_size - 1) >> self._shift)
                                               * PAGE_HEAD)
        return h

    def _ram_record(self, buf, pos, end, delta, hdr, flags):
        kind = flags & ~FLAG_CONTINUE
        if flags == FLAG_EOS:
            return self._eos(pos + 8)
        if flags == FLAG_MEM_SIZE:
            return self._mem_size(buf, pos, end, delta, hdr - flags)
        if flags == FLAG_MULTIFD_FLUSH:
            self._totals["multifd_flush"] += 1
            self._feature("multifd-flush")
            return pos + 8
        if kind not in (FLAG_PAGE, FLAG_ZERO, FLAG_XBZRLE):
            if flags & ~0x3FF:
                why = f"unknown RAM flag bits 0x{flags & ~0x3FF:x} (flags 0x{flags:x})"
                if not self.page_size_from_stream and flags & 0x3FF in (0x22, 0x28, 0x62, 0x68, 0x60):
                    why += (f"; the configuration has no target-page-bits, so the source uses its target's "
                            f"minimum page size, which may be smaller than {self.page_size} (ARM: "
                            f"StreamParser(page_size=1024))")
            elif flags & FLAG_HOOK:
                why = "RAM_SAVE_FLAG_HOOK (0x80): RDMA control records are not supported"
            elif flags & FLAG_COMPRESS_PAGE:
                why = "RAM_SAVE_FLAG_COMPRESS_PAGE (0x100): pages of the 'compress' capability are not supported"
            elif flags & FLAG_FULL:
                why = "RAM_SAVE_FLAG_FULL (0x01): obsolete since 2009"
            else:
                why = f"invalid combination of RAM flags 0x{flags:x} ({_flag_names(flags)})"
            raise self._err(why, pos + delta)
        block, c = _record_block(self, buf, pos, end, delta, flags, self._blocks, "MEM_SIZE")
        off = hdr - flags
        if off >= self._blocks[block]:
            raise self._bad_offset(block, off, flags, pos + delta)
        ps = self.page_size
        idx = off >> self._shift
        heads = self._head_store(block) if self._pages is None and self._xbzrle_mode is None else None
        if kind == FLAG_PAGE:
            if end - c < ps:
                raise _Need(pos, c + ps - pos)
            head = bytes(buf[c:c + PAGE_HEAD])
            if heads is not None:
                heads[idx * PAGE_HEAD:(idx + 1) * PAGE_HEAD] = head
            elif self._pages is not None:
                self._pages[(block, off)] = bytes(buf[c:c + ps])
            self._counts[0] += 1
            nxt, rkind = c + ps, "page"
        elif kind == FLAG_ZERO:
            if end - c < 1:
                raise _Need(pos, c + 1 - pos)
            if buf[c]:
                raise self._err(f"zero page record with fill byte 0x{buf[c]:02x}", c + delta)
            head = None
            if heads is not None:
                heads[idx * PAGE_HEAD:(idx + 1) * PAGE_HEAD] = _ZERO_HEAD
            elif self._pages is not None:
                self._pages[(block, off)] = None
            self._counts[1] += 1
            nxt, rkind = c + 1, "zero"
        else:  # XBZRLE
            if end - c < 3:
                raise _Need(pos, c + 3 - pos)
            enc_flag = buf[c]
            n = _BE16.unpack_from(buf, c + 1)[0]
            if enc_flag != XBZRLE_ENCODING:
                raise self._err(f"XBZRLE page with encoding 0x{enc_flag:02x} (expected 0x01)", c + delta, XbzrleError)
            if n > ps:
                raise self._err(f"XBZRLE page of {n} encoded bytes (> page size {ps})", c + delta, XbzrleError)
            if end - c < 3 + n:
                raise _Need(pos, c + 3 + n - pos)
            enc = bytes(buf[c + 3:c + 3 + n])
            if self._xbzrle_mode is False:
                raise self._err(f"XBZRLE page ({block} 0x{off:x}) but the parser keeps no page copies "
                                f"(StreamParser(xbzrle=False))", pos + delta, XbzrleError)
            if self._pages is not None:
                old = self._pages.get((block, off))
                base = bytearray(old) if old is not None else bytearray(ps)
                page = xbzrle_decode(enc, base, ps)
                if page is None:
                    raise self._err(f"XBZRLE page {block} 0x{off:x}: invalid encoding", c + 3 + delta, XbzrleError)
                self._pages[(block, off)] = bytes(page)
                head = bytes(page[:PAGE_HEAD])
            else:
                a = idx * PAGE_HEAD
                base = bytearray(heads[a:a + PAGE_HEAD])
                page = xbzrle_decode(enc, base, ps, limit=PAGE_HEAD)
                if page is None:
                    raise self._err(f"XBZRLE page {block} 0x{off:x}: invalid encoding", c + 3 + delta, XbzrleError)
                head = bytes(page)
                heads[a:a + PAGE_HEAD] = head
            self._counts[2] += 1
            self._feature("xbzrle")
            nxt, rkind = c + 3 + n, "xbzrle"
        self._block = block
        if self.on_page is not None:
            rec = _new_record(block, off, rkind, self._iteration, self.channel, pos + delta, head)
            _deliver(self, rec, buf, c, nxt, self._pages[(block, off)] if rkind == "xbzrle" and self._pages is not None
                     else None)
        return nxt

    def _mem_size(self, buf, pos, end, delta, total):
        """The block list of the setup section; parsed whole or not at all."""
        c = pos + 8
        blocks = []
        remaining = total
        while remaining > 0:
            if end - c < 1:
                raise _Need(pos, c + 1 - pos)
            n = buf[c]
            if n == 0:
                raise self._err("MEM_SIZE block list: empty block idstr", c + delta)
            if end - c < 1 + n + 8:
                raise _Need(pos, c + 9 + n - pos)
            name = bytes(buf[c + 1:c + 1 + n]).decode("ascii", "replace")
            length = _BE64.unpack_from(buf, c + 1 + n)[0]
            c += 1 + n + 8
            entry = {"name": name, "size": length}
            if self._s.postcopy_ram:
                # the page size is there only when it differs from the host's: a be64 that is a power of two
                # with no flag bits cannot be the next idstr (length byte != 0) nor the next RAM header
                if end - c < 8:
                    raise _Need(pos, c + 8 - pos)
                v = _BE64.unpack_from(buf, c)[0]
                if v >= 1024 and not v & (v - 1) and not v & self._mask:
                    entry["page_size"] = v
                    c += 8
            if self._ignore_shared:
                if end - c < 8:
                    raise _Need(pos, c + 8 - pos)
                entry["addr"] = _BE64.unpack_from(buf, c)[0]
                c += 8
            if length > remaining:
                raise self._err(f"MEM_SIZE block list: block {name} of 0x{length:x} bytes exceeds the total "
                                f"0x{total:x}", c + delta)
            remaining -= length
            blocks.append(entry)
        for e in blocks:
            self._blocks[e["name"]] = e["size"]
        self._s.ram_blocks = blocks
        self._totals["mem_size"] += 1
        return c

    def _eos(self, pos):
        self._totals["eos"] += 1
        if self._cur_type != VM_SECTION_START:
            self._iters.append(self._counts)
            self._counts = [0, 0, 0]
            self._iteration += 1
        self._state = _S_FOOTER
        return pos


def _deliver(parser, rec, buf, c: int, nxt: int, content) -> None:
    """`parser.on_page` for one record: the record alone, or with ``content=True`` the record and its
    page (a view of buf[c:nxt] for a PAGE record, `content` otherwise)."""
    if not parser.content:
        parser.on_page(rec)
    elif rec.kind == "page":
        with memoryview(buf) as view:
            _call_with_view(parser.on_page, rec, view, c, nxt)
    else:
        parser.on_page(rec, content)


def _record_block(parser, buf, pos: int, end: int, delta: int, flags: int, known, listed_by: str):
    """The RAM block a page record at `pos` is for, and where its data starts: the parser's current
    block for RAM_SAVE_FLAG_CONTINUE, else the block name after the be64 header, which must be in
    `known` (None: any non-empty name)."""
    c = pos + 8
    if flags & FLAG_CONTINUE:
        if parser._block is None:
            raise parser._err(f"RAM_SAVE_FLAG_CONTINUE (flags 0x{flags:x}) with no previous RAM block", pos + delta)
        return parser._block, c
    if end - c < 1:
        raise _Need(pos, 9)
    n = buf[c]
    if end - c < 1 + n:
        raise _Need(pos, 9 + n)
    block = bytes(buf[c + 1:c + 1 + n]).decode("ascii", "replace")
    if n == 0 or (known is not None and block not in known):
        raise parser._err(f"page of RAM block {block!r}, which {listed_by} did not list", pos + delta)
    return block, c + 1 + n


def vmdesc_size(obj: dict) -> int:
    """Body size of a vmstate as the VMDESCRIPTION records it: its fields, then each subsection with its
    header (QEMU_VM_SUBSECTION, name length, name, be32 version)."""
    total = 0
    for f in obj.get("fields", ()):
        total += int(f.get("size", 0)) * int(f.get("array_len", 1))
    for sub in obj.get("subsections", ()):
        total += 1 + 1 + len(sub.get("vmsd_name", "")) + 4 + vmdesc_size(sub)
    return total


def xbzrle_decode(enc: bytes, page: bytearray, page_size: int, limit: int | None = None) -> bytearray | None:
    """Apply an XBZRLE diff (alternating uleb128 run lengths: unchanged bytes, then new bytes and the bytes)
    to `page` in place; None when the encoding is invalid. With `limit`, `page` holds only the first
    `limit` bytes of the page and only those are updated (the whole encoding is still validated)."""
    i = d = 0
    n = len(enc)
    keep = page_size if limit is None else limit
    while i < n:
        if n - i < 2:
            return None
        b = enc[i]
        if b & 0x80:
            if enc[i + 1] & 0x80:
                return None
            count = (b & 0x7F) | (enc[i + 1] << 7)
            i += 2
        else:
            count = b
            i += 1
        if count == 0 and i > 1:  # only the first unchanged run may be empty
            return None
        d += count
        if d > page_size or n - i < 2:
            return None
        b = enc[i]
        if b & 0x80:
            if enc[i + 1] & 0x80:
                return None
            count = (b & 0x7F) | (enc[i + 1] << 7)
            i += 2
        else:
            count = b
            i += 1
        if count == 0 or d + count > page_size or i + count > n:
            return None
        if d < keep:
            stop = min(d + count, keep)
            page[d:stop] = enc[i:i + stop - d]
        d += count
        i += count
    return page


# =========================================================================== multifd channel
class MultifdChannelParser(_Incremental):
    """One multifd channel connection (nocomp packets), fed incrementally."""

    def __init__(self, on_page: Callable[..., None] | None = None, channel: str | None = None,
                 page_size: int = 4096, *, blocks: Mapping[str, int] | None = None,
                 iteration: Callable[[], int] | None = None, content: bool = False):
        """`on_page`, `content`: as for StreamParser (content: the page's data in the packet, a memoryview
        valid during the call; None for zero pages). `channel`: default "multifd-<id of the initial
        packet>". `page_size`: the main channel's. `blocks`: the main channel's RAM blocks, to check page
        offsets against. `iteration`: called once per packet, its value becomes PageRecord.iteration
        (e.g. the main channel's current iteration, for a live tap); without it the iteration counts
        this channel's SYNC packets (module docstring)."""
        super().__init__(channel or "multifd")
        if page_size < 1024 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1024, not {page_size}")
        self.on_page = on_page
        self.content = content
        self._iteration_fn = iteration
        self.page_size = page_size
        self._named = channel is not None
        self._page_count = MULTIFD_PACKET_SIZE // page_size
        self._packet_len = MULTIFD_HEADER_SIZE + 8 * self._page_count
        self._blocks = dict(blocks) if blocks else None
        self._init = False
        self._syncs = 0
        self._counts = [0, 0]
        self._iters: list[list[int]] = []
        self._s = StreamSummary(channel=self.channel, kind="multifd", page_size=page_size)
        self._s.records = {"multifd": 0, "multifd-zero": 0}

    def summary(self) -> StreamSummary:
        s = self._s
        s.channel = self.channel
        s.bytes = self._total
        iters = self._iters + ([self._counts] if any(self._counts) else [])
        s.iterations = [{"iteration": i, "multifd": c[0], "multifd-zero": c[1]} for i, c in enumerate(iters)]
        s.records = {"multifd": sum(c[0] for c in iters), "multifd-zero": sum(c[1] for c in iters)}
        s.complete = self._init and not self._pending
        return s

    def close(self) -> StreamSummary:
        self._closed = True
        if not self._init:
            raise self._err("stream truncated inside the multifd initial packet" if self._total else
                            "empty stream (not a multifd channel)", self._base)
        if self._pending:
            raise self._err(f"stream truncated inside a multifd packet ({len(self._pending)} of "
                            f"{self._need} bytes)", self._base)
        return self.summary()

    def _parse(self, buf, pos, end, delta):
        if not self._init:
            pos = self._initial(buf, pos, end, delta)
        plen = self._packet_len
        ps = self.page_size
        while pos < end:
            if end - pos < plen:
                raise _Need(pos, plen)
            magic, version, flags, alloc, normal, nsize = struct.unpack_from(">IIIIII", buf, pos)
            zero = _BE32.unpack_from(buf, pos + MULTIFD_ZERO_PAGES_AT)[0]
            if magic != MULTIFD_MAGIC:
                raise self._err(f"multifd packet magic 0x{magic:08x} (expected 0x{MULTIFD_MAGIC:08x})", pos + delta)
            if version != MULTIFD_VERSION:
                raise self._err(f"multifd packet version {version} (expected {MULTIFD_VERSION})", pos + 4 + delta)
            if flags & MULTIFD_FLAG_DEVICE_STATE:
                raise self._err("multifd device-state packet (VFIO, flag 0x40) is not supported", pos + 8 + delta)
            comp = (flags & MULTIFD_FLAG_COMPRESSION_MASK) >> 1
            if comp:
                raise self._err(f"multifd packet compressed with {MULTIFD_COMPRESSION.get(comp, hex(comp))} "
                                f"(flags 0x{flags:x}); only uncompressed multifd is supported", pos + 8 + delta)
            if flags & ~(MULTIFD_FLAG_SYNC | MULTIFD_FLAG_COMPRESSION_MASK | MULTIFD_FLAG_DEVICE_STATE):
                raise self._err(f"unknown multifd packet flags 0x{flags:x}", pos + 8 + delta)
            if alloc not in (0, self._page_count) or normal + zero > self._page_count:
                raise self._err(f"multifd packet with pages_alloc {alloc}, {normal} normal and {zero} zero pages "
                                f"(page size {ps}: {self._page_count} per packet)", pos + 12 + delta)
            # the receiver reads normal_pages pages (next_packet_size is stale in 7.2 packets without pages)
            if normal and nsize != normal * ps:
                raise self._err(f"multifd packet next_packet_size {nsize} for {normal} pages of {ps} bytes",
                                pos + 20 + delta)
            total = plen + normal * ps
            if end - pos < total:
                raise _Need(pos, total)
            if normal or zero:
                raw = bytes(buf[pos + 64:pos + 64 + 256])
                block = raw.split(b"\0", 1)[0].decode("ascii", "replace")
                offs = struct.unpack_from(f">{normal + zero}Q", buf, pos + MULTIFD_HEADER_SIZE)
                self._pages(buf, pos, delta, block, offs, normal)
            self._s.packets += 1
            if flags & MULTIFD_FLAG_SYNC:
                self._s.sync_packets += 1
                self._syncs += 1
                if self._syncs > 1:
                    self._iters.append(self._counts)
                    self._counts = [0, 0]
            pos += total
        return pos

    def _pages(self, buf, pos, delta, block, offs, normal):
        ps = self.page_size
        limit = self._blocks.get(block) if self._blocks is not None else None
        if self._blocks is not None and limit is None:
            raise self._err(f"multifd packet for RAM block {block!r}, which the main channel did not list",
                            pos + 64 + delta)
        for i, off in enumerate(offs):
            if off & (ps - 1) or (limit is not None and off + ps > limit):
                raise self._err(f"multifd page offset 0x{off:x} invalid for RAM block {block}",
                                pos + MULTIFD_HEADER_SIZE + 8 * i + delta)
        self._counts[0] += normal
        self._counts[1] += len(offs) - normal
        on_page = self.on_page
        if on_page is None:
            return
        it = self._iteration_fn() if self._iteration_fn is not None else max(self._syncs - 1, 0)
        chan = self.channel
        mk = _new_record
        data = pos + self._packet_len
        if not self.content:
            for i in range(normal):
                p = data + i * ps
                on_page(mk(block, offs[i], "multifd", it, chan, p + delta, bytes(buf[p:p + PAGE_HEAD])))
            for i in range(normal, len(offs)):
                on_page(mk(block, offs[i], "multifd-zero", it, chan, pos + MULTIFD_HEADER_SIZE + 8 * i + delta,
                           None))
            return
        with memoryview(buf) as view:
            for i in range(normal):
                p = data + i * ps
                _call_with_view(on_page, mk(block, offs[i], "multifd", it, chan, p + delta,
                                            bytes(buf[p:p + PAGE_HEAD])), view, p, p + ps)
        for i in range(normal, len(offs)):
            on_page(mk(block, offs[i], "multifd-zero", it, chan, pos + MULTIFD_HEADER_SIZE + 8 * i + delta, None),
                    None)

    def _initial(self, buf, pos, end, delta):
        if end - pos < MULTIFD_INIT_SIZE:
            if end - pos >= 4 and _BE32.unpack_from(buf, pos)[0] != MULTIFD_MAGIC:
                raise self._err(f"not a multifd channel (starts with {bytes(buf[pos:pos + 8]).hex()})", pos + delta)
            raise _Need(pos, MULTIFD_INIT_SIZE)
        magic, version = struct.unpack_from(">II", buf, pos)
        if magic != MULTIFD_MAGIC:
            raise self._err(f"not a multifd channel (magic 0x{magic:08x}, expected 0x{MULTIFD_MAGIC:08x})",
                            pos + delta)
        if version != MULTIFD_VERSION:
            raise self._err(f"multifd initial packet version {version} (expected {MULTIFD_VERSION})", pos + 4 + delta)
        uuid = bytes(buf[pos + 8:pos + 24])
        cid = buf[pos + 24]
        self._init = True
        s = self._s
        s.stream_version = version
        s.multifd_id = cid
        s.uuid = uuid.hex()
        if not self._named:
            self.channel = f"multifd-{cid}"
            s.channel = self.channel
        return pos + MULTIFD_INIT_SIZE


# =========================================================================== postcopy-preempt channel
class PreemptChannelParser(_Incremental):
    """The postcopy-preempt channel (capability postcopy-preempt), fed incrementally.

    What QEMU sends there (migration/ram.c, 7.2 and 10.0): no file header and no sections, only RAM
    records in the main channel's record format for pages the destination faulted on and asked for
    over the return path once postcopy runs (10.0: ram_save_host_page_urgent()): PAGE and ZERO
    records (be64 offset | flags, the block idstr unless RAM_SAVE_FLAG_CONTINUE, the channel keeping
    its own "last block"), and, from postcopy_preempt_shutdown_file(), one final EOS (always on 7.2,
    on 10.0 only for machine types <= 7.2, property x-preempt-pre-7-2; see VERSION_DIFFERENCES). The
    destination's ram_load_postcopy() accepts exactly PAGE, ZERO and EOS there; anything else is a
    StreamFormatError naming the flag and the offset. XBZRLE never appears (not used in postcopy).

    `blocks`: the main channel's RAM blocks (idstr -> used_length; a live mapping may be given, e.g.
    StreamParser.blocks, since the preempt channel carries pages only after MEM_SIZE); None: offsets
    are not checked. `page_size`: the main channel's. `iteration`: called per record, its value
    becomes PageRecord.iteration (in the tap: the main channel's current iteration); without it 0 (the
    channel has no passes of its own). `on_page`/`content` as for StreamParser. An empty channel (10.0
    opens it when postcopy starts; with a paused destination nothing faults, so nothing is sent) is a
    complete one."""

    def __init__(self, on_page: Callable[..., None] | None = None, channel: str = "preempt",
                 page_size: int = 4096, *, blocks: Mapping[str, int] | None = None,
                 iteration: Callable[[], int] | None = None, content: bool = False):
        super().__init__(channel)
        if page_size < 1024 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1024, not {page_size}")
        self.on_page = on_page
        self.content = content
        self.page_size = page_size
        self._mask = page_size - 1
        self._blocks = blocks
        self._iteration_fn = iteration
        self._block: str | None = None
        self._eos = False
        self._counts = {"page": 0, "zero": 0, "eos": 0}
        self._seen_blocks: list[str] = []
        self._s = StreamSummary(channel=channel, kind="preempt", page_size=page_size)

    def summary(self) -> StreamSummary:
        s = self._s
        s.bytes = self._total
        s.records = dict(self._counts)
        s.iterations = ([{"iteration": 0, "page": self._counts["page"], "zero": self._counts["zero"]}]
                        if self._counts["page"] or self._counts["zero"] else [])
        s.ram_blocks = [{"name": b, "size": self._blocks.get(b) if self._blocks is not None else None}
                        for b in self._seen_blocks]
        s.complete = not self._pending
        return s

    def close(self) -> StreamSummary:
        self._closed = True
        if self._pending:
            raise self._err(f"stream truncated inside a RAM record ({len(self._pending)} of {self._need} bytes)",
                            self._base)
        return self.summary()

    def _parse(self, buf, pos, end, delta):
        ps = self.page_size
        mask = self._mask
        while pos < end:
            if self._eos:
                raise self._err(f"{end - pos} bytes after the preempt channel's EOS", pos + delta)
            if end - pos < 8:
                raise _Need(pos, 8)
            hdr = _BE64.unpack_from(buf, pos)[0]
            flags = hdr & mask
            off = hdr - flags
            if flags == FLAG_EOS:
                self._counts["eos"] += 1
                self._eos = True
                pos += 8
                continue
            kind = flags & ~FLAG_CONTINUE
            if kind not in (FLAG_PAGE, FLAG_ZERO):
                why = f"flags 0x{flags:x} ({_flag_names(flags)})" if flags else "no flags"
                raise self._err(f"RAM record with {why} on the postcopy-preempt channel (only PAGE, ZERO "
                                f"and EOS are sent there)", pos + delta)
            block, c = _record_block(self, buf, pos, end, delta, flags, self._blocks, "the main channel's MEM_SIZE")
            if self._blocks is not None and off >= self._blocks[block]:
                raise self._err(f"page offset 0x{off:x} beyond RAM block {block} (0x{self._blocks[block]:x} "
                                f"bytes)", pos + delta)
            if kind == FLAG_PAGE:
                nxt = c + ps
            else:
                nxt = c + 1
            if end < nxt:
                raise _Need(pos, nxt - pos)
            if kind == FLAG_ZERO and buf[c]:
                raise self._err(f"zero page record with fill byte 0x{buf[c]:02x}", c + delta)
            if block != self._block:
                self._block = block
                if block not in self._seen_blocks:
                    self._seen_blocks.append(block)
            rkind = "page" if kind == FLAG_PAGE else "zero"
            self._counts[rkind] += 1
            if self.on_page is not None:
                it = self._iteration_fn() if self._iteration_fn is not None else 0
                head = bytes(buf[c:c + PAGE_HEAD]) if rkind == "page" else None
                rec = _new_record(block, off, rkind, it, self.channel, pos + delta, head)
                _deliver(self, rec, buf, c, nxt, None)
            pos = nxt
        return pos
