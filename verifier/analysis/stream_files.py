"""Recorded migration channels read from files: which channel a file is (`sniff`), one file
(`parse_file`), several channels of one migration (`parse_files`: the main channel first, so that
multifd and postcopy-preempt channels get its page size and RAM blocks). The parsers themselves are
verifier.analysis.stream; this module only feeds them files and wraps their errors with the path.
"""

from __future__ import annotations

import struct
from pathlib import Path

from verifier.analysis.stream import (FILE_MAGIC, FLAG_EOS, FLAG_PAGE, FLAG_ZERO, MULTIFD_MAGIC, MultifdChannelParser,
                                      PreemptChannelParser, StreamFormatError, StreamParser, StreamSummary)
from verifier.errors import InputError

_BE64 = struct.Struct(">Q")
_BE32 = struct.Struct(">I")
CHUNK = 1 << 20


def read_into(parser, path: Path) -> None:
    with open(path, "rb") as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            parser.feed(view[:n])


def sniff(path: Path) -> str:
    """"main" or "multifd" by the first 4 bytes, "preempt" (a postcopy-preempt channel) when the file starts
    with a RAM record header that names its block (PAGE or ZERO, no CONTINUE) or is one EOS, or when it is
    empty and its name says preempt (the tap's stream-preempt.bin: 10.0 opens the channel when postcopy
    starts and may send nothing); InputError for a missing file, StreamFormatError otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(4 + 1 + 255)
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a recorded migration stream") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(head) >= 4:
        magic = _BE32.unpack_from(head)[0]
        if magic == FILE_MAGIC:
            return "main"
        if magic == MULTIFD_MAGIC:
            return "multifd"
    if _looks_like_preempt(head) or (not head and "preempt" in Path(path).name):
        return "preempt"
    raise StreamFormatError(f"{path}: not a QEMU migration stream (neither a main channel, magic 'QEVM', a "
                            f"multifd channel, magic 0x{MULTIFD_MAGIC:08x}, nor a postcopy-preempt channel, RAM "
                            f"records; it starts with {head[:8].hex() or 'nothing'}) at stream offset 0", offset=0)


def _looks_like_preempt(head: bytes) -> bool:
    """A postcopy-preempt channel's start: one EOS and nothing more (7.2 when no page was asked for), or a
    PAGE/ZERO header without CONTINUE, at an offset below 1 TiB, followed by a printable block idstr
    (flags are below 0x400 at every target page size)."""
    if len(head) < 8:
        return False
    hdr = _BE64.unpack_from(head)[0]
    if hdr == FLAG_EOS:
        return len(head) == 8
    if hdr >> 40 or hdr & 0x3FF not in (FLAG_PAGE, FLAG_ZERO) or len(head) < 10:
        return False
    n = head[8]
    name = head[9:9 + n]
    return n > 0 and len(name) == n and all(0x20 < b < 0x7F for b in name)


def _parse_main(path: Path, page_size: int, on_page) -> StreamSummary:
    """A main channel. A file can be read again, so a target page size smaller than `page_size` that the
    configuration does not give (1 KiB on ARM machines such as vexpress-a15) is found by reading it again
    with smaller sizes when the first reading fails (on flag bits that are address bits at that size, or
    on page data read as records)."""
    ps = page_size
    first: StreamFormatError | None = None
    while True:
        parser = StreamParser(on_page=on_page, page_size=ps)
        try:
            read_into(parser, path)
            return parser.close()
        except StreamFormatError as exc:
            # Read at too large a size, a record's page data swallows the records after it: the error
            # is wherever the reading lost step (flag bits, or zeros read as flags), so any error is a
            # reason to try the next size; if none reads, the error at the size asked for is the one.
            first = first or exc
            if on_page is not None or parser.page_size_from_stream or ps // 2 < 1024:
                raise first from None
            ps //= 2


def parse_file(path, kind: str | None = None, page_size: int = 4096, blocks: dict | None = None,
               on_page=None) -> StreamSummary:
    """One recorded channel, read in 1 MiB chunks. `page_size`: the target's minimum page size, used when
    the stream's configuration does not give one (main channels: smaller sizes are tried when the records
    show it); for a multifd or postcopy-preempt channel, the main channel's page size."""
    path = Path(path)
    kind = kind or sniff(path)
    try:
        if kind == "main":
            s = _parse_main(path, page_size, on_page)
        else:
            cls = PreemptChannelParser if kind == "preempt" else MultifdChannelParser
            parser = cls(on_page=on_page, page_size=page_size, blocks=blocks)
            read_into(parser, path)
            s = parser.close()
    except StreamFormatError as exc:
        raise StreamFormatError(f"{path}: {exc}", offset=exc.offset, channel=exc.channel) from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    s.path = str(path)
    return s


def parse_files(paths) -> list[StreamSummary]:
    """Summaries of recorded channels (raw bytes of one connection per file), in the order given. Main
    channels are read first so that multifd and postcopy-preempt channels get their page size and RAM
    blocks (without a main channel: checked against no block list, the ARM sizes tried as below)."""
    paths = [Path(p) for p in paths]
    kinds = [sniff(p) for p in paths]
    out: dict[int, StreamSummary] = {}
    main: StreamSummary | None = None
    for i, (p, k) in enumerate(zip(paths, kinds)):
        if k == "main":
            out[i] = parse_file(p, k)
            main = main or out[i]
    for i, (p, k) in enumerate(zip(paths, kinds)):
        if k in ("multifd", "preempt"):
            # With multifd every page travels on the channels, so a main channel whose configuration
            # names no page size (vexpress-a15) cannot show one: try the ARM minimum sizes too.
            first = main.page_size if main else 4096
            blocks = {b["name"]: b["size"] for b in main.ram_blocks} if main else None
            error = None
            for size in dict.fromkeys((first, 1024, 2048, 4096)):
                try:
                    out[i] = parse_file(p, k, page_size=size, blocks=blocks)
                    break
                except StreamFormatError as exc:
                    error = error or exc
            else:
                raise error
    return [out[i] for i in range(len(paths))]
