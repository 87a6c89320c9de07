"""A small, deterministic writer (and reader) for "newc" cpio archives, the initramfs format.

Format (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst):
every entry is a 110-byte ASCII header -- the magic ``070701`` followed by 13 fields
of 8 hex digits (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
rdevmajor, rdevminor, namesize, check) -- then the name with its terminating NUL
(namesize counts the NUL), then the data (a symlink's data is its target, no NUL).

Padding rule: header+name is padded with NULs to a multiple of 4 bytes, and so is
the data, so that every header starts at an offset divisible by 4.  The archive
ends with an entry named ``TRAILER!!!``.

The writer makes the output a function of the entries and one mtime only: entries
are sorted by path (a directory before its contents), paths are written without
a leading ``/``, uid/gid are 0, inodes are numbered 1, 2, 3... in output order,
nlink is 2 for directories and 1 otherwise, devmajor/devminor are 0.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from builder.errors import BuildError, BuildInputError

MAGIC = b"070701"
MAGIC_CRC = b"070702"
TRAILER = "TRAILER!!!"
HEADER_LEN = 110
_MAX_FIELD = 0xFFFFFFFF  # 8 hex digits


class CpioError(BuildError):
    """An entry cannot be represented, or a path is invalid/duplicated (a bug in the caller)."""


def _pad4(n: int) -> int:
    """Bytes of NUL padding needed to bring a length of n up to a multiple of 4."""
    return -n % 4


@dataclass(frozen=True)
class CpioEntry:
    path: str  # relative, no leading "/", e.g. "bin/busybox"
    mode: int  # full st_mode: file type bits | permission bits
    data: bytes = b""  # file contents, or a symlink's target
    rdevmajor: int = 0
    rdevminor: int = 0


def _norm(path: str) -> str:
    parts = path.strip("/").split("/")
    if path.strip("/") == "" or any(p in ("", ".", "..") for p in parts):
        raise CpioError(f"invalid path in cpio archive: {path!r}")
    return "/".join(parts)


def _perm(mode: int) -> int:
    if mode & ~0o7777:
        raise CpioError(f"mode {mode:#o} has bits other than permission bits")
    return mode


class CpioWriter:
    """Collects entries and writes them, sorted, on close().

    Every entry's parent directory must itself be added (except top-level entries),
    so the kernel never has to create a directory implicitly with default metadata.
    """

    def __init__(self, fileobj: BinaryIO, mtime: int):
        self._f = fileobj
        self._mtime = mtime
        self._entries: dict[str, CpioEntry] = {}
        self._closed = False

    def _add(self, entry: CpioEntry) -> None:
        if self._closed:
            raise CpioError("cpio archive already closed")
        if entry.path in self._entries:
            raise CpioError(f"duplicate path in cpio archive: {entry.path}")
        self._entries[entry.path] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._add(CpioEntry(_norm(path), stat.S_IFDIR | _perm(mode)))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(CpioEntry(_norm(path), stat.S_IFREG | _perm(mode), bytes(data)))

    def add_symlink(self, path: str, target: str) -> None:
        if not target:
            raise CpioError(f"empty symlink target for {path}")
        self._add(CpioEntry(_norm(path), stat.S_IFLNK | 0o777, target.encode()))

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(CpioEntry(_norm(path), stat.S_IFCHR | _perm(mode), b"", major, minor))

    def close(self) -> None:
        if self._closed:
            return
        entries = sorted(self._entries.values(), key=lambda e: e.path.split("/"))
        for e in entries:
            parent = e.path.rpartition("/")[0]
            if parent and not (parent in self._entries and stat.S_ISDIR(self._entries[parent].mode)):
                raise CpioError(f"{e.path}: parent directory {parent} is not in the archive")
        for ino, e in enumerate(entries, start=1):
            nlink = 2 if stat.S_ISDIR(e.mode) else 1
            self._write(e.path, ino, e.mode, nlink, e.data, e.rdevmajor, e.rdevminor)
        self._write(TRAILER, 0, 0, 1, b"", 0, 0)
        self._closed = True

    def _write(self, name: str, ino: int, mode: int, nlink: int, data: bytes, rmaj: int, rmin: int) -> None:
        bname = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, nlink, self._mtime, len(data), 0, 0, rmaj, rmin, len(bname), 0]
        for label, value in zip(("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor",
                                 "devminor", "rdevmajor", "rdevminor", "namesize", "check"), fields):
            if not 0 <= value <= _MAX_FIELD:
                raise CpioError(f"{name}: {label}={value} does not fit a newc header field (8 hex digits)")
        head = MAGIC + b"".join(b"%08X" % v for v in fields) + bname
        self._f.write(head + b"\0" * _pad4(len(head)))
        self._f.write(data + b"\0" * _pad4(len(data)))

    def __enter__(self) -> "CpioWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


@dataclass(frozen=True)
class CpioMember:
    name: str
    mode: int
    size: int
    ino: int
    nlink: int
    mtime: int
    rdevmajor: int
    rdevminor: int
    data: bytes


def iter_newc(data: bytes, offset: int = 0) -> Iterator[CpioMember]:
    """Parse one newc archive starting at offset, up to (not including) its trailer.

    Yields the members; raises BuildInputError on anything malformed or truncated.
    The offset just past the trailer (and its padding) is the generator's return value.
    """
    while True:
        hdr = data[offset:offset + HEADER_LEN]
        if len(hdr) < HEADER_LEN:
            raise BuildInputError(f"cpio archive truncated at offset {offset}")
        if hdr[:6] not in (MAGIC, MAGIC_CRC):
            raise BuildInputError(f"bad cpio header magic {hdr[:6]!r} at offset {offset}")
        try:
            f = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise BuildInputError(f"bad cpio header (non-hex field) at offset {offset}") from None
        ino, mode, _uid, _gid, nlink, mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, _check = f
        name_end = offset + HEADER_LEN + namesize
        data_start = name_end + _pad4(HEADER_LEN + namesize)
        data_end = data_start + size
        if namesize == 0 or data_end > len(data):
            raise BuildInputError(f"cpio archive truncated or corrupt at offset {offset}")
        name = data[offset + HEADER_LEN:name_end].rstrip(b"\0").decode("utf-8", "surrogateescape")
        offset = data_end + _pad4(size)
        if name == TRAILER:
            return offset
        yield CpioMember(name, mode, size, ino, nlink, mtime, rmaj, rmin, data[data_start:data_end])


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write data to path via a temp file in the same directory and rename(2): never a half file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def gzip_bytes(data: bytes, compresslevel: int = 9) -> bytes:
    """Deterministic gzip: header mtime 0, no file name, fixed level."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=compresslevel, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def write_gzip(path: Path, cpio_bytes: bytes, compresslevel: int = 9) -> None:
    """gzip cpio_bytes deterministically and write the result to path atomically."""
    write_atomic(path, gzip_bytes(cpio_bytes, compresslevel))
