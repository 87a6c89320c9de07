"""Assembles the guest initramfs (busybox + dirtyram + /init) and reads foreign ones."""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from pathlib import Path
from typing import NamedTuple

from builder.cpio import MAGIC, MAGIC_CRC, CpioWriter, iter_newc, write_gzip
from builder.elfcheck import check_elf_bytes
from builder.errors import BuildInputError

DIRS = ("bin", "dev", "etc", "proc", "root", "run", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin")

# Busybox applets linked into /bin (as relative symlinks to "busybox").  Everything
# guest/init uses, plus what is handy on the interactive console.
DEFAULT_APPLETS = sorted([
    "[", "awk", "cat", "chmod", "cttyhack", "cut", "date", "dd", "df", "dmesg", "echo", "env",
    "false", "find", "free", "grep", "halt", "head", "hexdump", "kill", "ln", "ls", "mkdir",
    "mkfifo", "mknod", "mount", "mv", "poweroff", "printf", "ps", "reboot", "rm", "sed", "seq",
    "setsid", "sh", "sleep", "sort", "stat", "sync", "tail", "tee", "test", "top", "touch", "tr",
    "true", "umount", "uname", "uptime", "vi", "wc", "xargs",
])

BUSYBOX_PATH = "bin/busybox"
DIRTYRAM_PATH = "root/dirtyram.arm"


def busybox_applets(busybox: bytes) -> set[str] | None:
    """The applet names compiled into a busybox binary, or None if they cannot be found.

    Busybox keeps them as one sorted NUL-separated string starting with "[" and "[[",
    ending at a double NUL. (A busybox without the test applet has no "[": None.)
    """
    i = busybox.find(b"\0[\0[[\0")
    if i < 0:
        return None
    end = busybox.find(b"\0\0", i + 1)
    names = busybox[i + 1:end].split(b"\0")
    return {n.decode("ascii", "replace") for n in names}


def build_initrd_bytes(busybox: bytes, dirtyram: bytes, init_script: bytes, mtime: int,
                       applets: list[str] | None = None, arch: str = "armv7") -> bytes:
    """The uncompressed newc archive; see build_initrd."""
    check_elf_bytes(busybox, "busybox", arch)
    check_elf_bytes(dirtyram, "dirtyram", arch)
    for a in applets or ():
        if not a or "/" in a or a in (".", "..", "busybox"):
            raise BuildInputError(f"invalid busybox applet name {a!r}")
    available = busybox_applets(busybox)
    if applets is None:
        applets = [a for a in DEFAULT_APPLETS if available is None or a in available]
    elif available is not None and (missing := sorted(set(applets) - available)):
        raise BuildInputError(f"busybox has no applet(s) {' '.join(missing)}")
    applets = sorted(set(applets))
    if not init_script:
        raise BuildInputError("the /init script is empty")
    if init_script.startswith(b"#!"):
        interp = init_script[2:].split(b"\n", 1)[0].strip().split(b" ", 1)[0].decode(errors="replace")
        if interp in ("/bin/sh", "/bin/ash") and interp.rpartition("/")[2] not in applets:
            raise BuildInputError(f"/init is run by {interp}, but no such applet is in the initrd")

    buf = io.BytesIO()
    w = CpioWriter(buf, mtime)
    for d in DIRS:
        w.add_dir(d, 0o700 if d == "root" else 0o1777 if d == "tmp" else 0o755)
    w.add_chardev("dev/console", 5, 1, 0o600)
    w.add_file(BUSYBOX_PATH, busybox, 0o755)
    for a in applets:
        w.add_symlink(f"bin/{a}", "busybox")
    w.add_file("init", init_script, 0o755)
    w.add_file(DIRTYRAM_PATH, dirtyram, 0o755)
    w.close()
    return buf.getvalue()


def build_initrd(out_path: Path, busybox: bytes, dirtyram: bytes, init_script: bytes, mtime: int,
                 applets: list[str] | None = None, arch: str = "armv7") -> str:
    """Write the gzip-compressed initramfs to out_path atomically; return its sha256 (hex).

    Contents: the directories in DIRS, dev/console (char 5:1, so the kernel can open
    the console before devtmpfs is mounted), bin/busybox and one bin/<applet> ->
    busybox symlink per applet (DEFAULT_APPLETS if None), init, root/dirtyram.arm.
    busybox and dirtyram must be static executables for arch (BuildInputError otherwise).
    The output depends only on the inputs and mtime (use SOURCE_DATE_EPOCH).
    """
    data = build_initrd_bytes(busybox, dirtyram, init_script, mtime, applets, arch)
    out_path = Path(out_path)
    write_gzip(out_path, data)
    return hashlib.sha256(out_path.read_bytes()).hexdigest()


class InitrdMember(NamedTuple):
    name: str
    mode: int  # full st_mode
    size: int


_OTHER_COMPRESSION = {
    b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2",
    b"\x02\x21\x4c\x18": "lz4", b"\x89LZO": "lzo", b"\x5d\x00\x00": "lzma",
}


def read_initrd(path: Path) -> list[InitrdMember]:
    """List the members of a gzip-compressed or plain newc initramfs, in archive order.

    Like the kernel, accepts several newc archives one after another with NUL padding
    between them, the rest possibly gzip-compressed. Raises BuildInputError for anything else
    (including xz/zstd/... compressed initrds, which are named in the message).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BuildInputError(f"{path}: cannot read: {e.strerror}") from None
    members: list[InitrdMember] = []
    off = 0
    in_gzip = False
    if not data:
        raise BuildInputError(f"{path}: not a gzip or newc cpio archive (empty file)")
    while off < len(data):
        if off > 0 and data[off] == 0:  # NUL padding between archives
            off = len(data) - len(data[off:].lstrip(b"\0"))
            continue
        head = data[off:off + 6]
        if head[:2] == b"\x1f\x8b" and not in_gzip:
            try:
                data = gzip.decompress(data[off:])  # all remaining gzip members
            except (OSError, EOFError, zlib.error) as e:
                raise BuildInputError(f"{path}: corrupt gzip data at offset {off}: {e}") from None
            off, in_gzip = 0, True
            continue
        if head not in (MAGIC, MAGIC_CRC):
            if in_gzip:
                raise BuildInputError(f"{path}: the gzip data is not a newc cpio archive")
            comp = next((n for magic, n in _OTHER_COMPRESSION.items() if data[off:].startswith(magic)), None)
            extra = f" ({comp}-compressed; only gzip is supported)" if comp else ""
            where = f" at offset {off}" if off else ""
            raise BuildInputError(f"{path}: not a gzip or newc cpio archive{where}{extra}")
        gen = iter_newc(data, off)
        try:
            while True:
                m = next(gen)
                members.append(InitrdMember(m.name, m.mode, m.size))
        except StopIteration as stop:
            off = stop.value
        except BuildInputError as e:
            raise BuildInputError(f"{path}: {e}") from None
    return members
