"""Guest artifacts as the verifier sees them: the manifest (the builder's only contract) and files.

The verifier trusts nothing about how the files were made: it checks each file's sha256 against
the manifest and that each file is what it claims to be (an ARM zImage, a device tree for the
machine, a gzip or plain newc cpio initrd).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from verifier.errors import InputError
from verifier.run.workload import GUEST_RESERVED_MB

from builder.manifest import MANIFEST_NAME, MANIFEST_SCHEMA  # noqa: E402 (the one definition)

ZIMAGE_MAGIC = 0x016F2818  # at offset 0x24 of an ARM zImage
FDT_MAGIC = 0xD00DFEED
INITRD_MAGICS = {
    b"\x1f\x8b": "gzip",
    b"070701": "newc cpio",
    b"070702": "newc cpio (crc)",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x02\x21\x4c\x18": "lz4",
    b"BZh": "bzip2",
}


@dataclass
class GuestArtifacts:
    kernel: Path
    dtb: Path | None
    initrd: Path
    machine: str = "vexpress-a15"
    min_mem_mb: int = 64
    reserved_mb: int = GUEST_RESERVED_MB  # guest RAM not available to the workloads (manifest: guest.reserved_mb)
    arch: str = "armv7"
    manifest: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def foreign(self) -> bool:
        """Not made by dirtylog's builder: no manifest, so no DIRTYLOG-READY marker to wait for."""
        return not self.manifest

    def describe(self) -> dict:
        files = {"kernel": self.kernel, "dtb": self.dtb, "initrd": self.initrd}
        return {role: {"path": str(p), "sha256": sha256_file(p)} for role, p in files.items() if p}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_head(path: Path, n: int, role: str) -> bytes:
    if not path.exists():
        raise InputError(f"{role} not found: {path}")
    if not path.is_file():
        raise InputError(f"{role} is not a regular file: {path}")
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise InputError(f"cannot read {role} {path}: {exc.strerror}") from None


def check_kernel(path: Path, arch: str = "armv7") -> None:
    """Is `path` a kernel image QEMU can boot for a guest of `arch`?"""
    head = _read_head(path, 0x240, "kernel")
    is_zimage = len(head) >= 0x28 and struct.unpack_from("<I", head, 0x24)[0] == ZIMAGE_MAGIC
    is_arm64 = len(head) >= 0x3C and head[0x38:0x3C] == b"ARM\x64"
    is_bzimage = len(head) >= 0x206 and head[0x202:0x206] == b"HdrS"
    if arch == "aarch64":
        if is_arm64 or head[:2] == b"\x1f\x8b":  # QEMU unpacks a gzip-compressed arm64 Image itself
            return
        raise InputError(f"kernel {path} is not an arm64 Image (no ARM\\x64 magic at 0x38, not gzip)")
    if arch == "x86_64":
        if is_bzimage:
            return
        raise InputError(f"kernel {path} is not an x86 bzImage (no HdrS at 0x202)")
    if is_zimage:
        return
    if head[:4] == b"\x7fELF":
        machine = struct.unpack_from("<H", head, 18)[0] if len(head) > 20 else 0
        what = {3: "x86", 62: "x86-64", 40: "32-bit ARM (vmlinux, not a zImage)", 183: "AArch64"}.get(
            machine, f"ELF machine {machine}")
        raise InputError(f"kernel {path} is an ELF file for {what}; expected an ARM zImage")
    if len(head) >= 0x206 and head[0x202:0x206] == b"HdrS":
        raise InputError(f"kernel {path} is an x86 bzImage; expected an ARM zImage")
    if len(head) >= 0x3C and head[0x38:0x3C] == b"ARM\x64":
        raise InputError(f"kernel {path} is an arm64 Image; expected an ARM (armv7) zImage")
    raise InputError(f"kernel {path} is not an ARM zImage (no zImage magic at offset 0x24)")


def fdt_root_compatible(path: Path) -> list[str]:
    """The root node's `compatible` strings of a flattened device tree."""
    data = _read_head(path, 4 << 20, "device tree")
    if len(data) < 40 or struct.unpack_from(">I", data, 0)[0] != FDT_MAGIC:
        raise InputError(f"device tree {path} is not a flattened device tree (no d00dfeed magic)")
    totalsize, off_struct, off_strings = struct.unpack_from(">III", data, 4)
    if totalsize > len(data) or off_struct >= totalsize or off_strings >= totalsize:
        raise InputError(f"device tree {path} is truncated or corrupt")
    pos, depth = off_struct, 0
    try:
        while True:
            token = struct.unpack_from(">I", data, pos)[0]
            pos += 4
            if token == 1:  # FDT_BEGIN_NODE: name, NUL, pad to 4
                end = data.index(b"\0", pos)
                pos = (end + 4) & ~3
                depth += 1
                if depth > 1:
                    return []
            elif token == 3:  # FDT_PROP: len, nameoff, value padded to 4
                length, nameoff = struct.unpack_from(">II", data, pos)
                pos += 8
                name_end = data.index(b"\0", off_strings + nameoff)
                if data[off_strings + nameoff:name_end] == b"compatible":
                    return [s.decode() for s in data[pos:pos + length].split(b"\0") if s]
                pos = (pos + length + 3) & ~3
            elif token == 4:  # FDT_NOP
                continue
            else:  # FDT_END_NODE / FDT_END before a compatible
                return []
    except (struct.error, ValueError):
        raise InputError(f"device tree {path} is truncated or corrupt") from None


MACHINE_DTB_COMPATIBLE = {"vexpress-a15": "arm,vexpress"}


def check_dtb(path: Path, machine: str) -> None:
    compatible = fdt_root_compatible(path)
    want = MACHINE_DTB_COMPATIBLE.get(machine)
    if want and want not in compatible:
        raise InputError(f"device tree {path} is for {', '.join(compatible) or 'an unknown board'}; "
                         f"machine {machine} needs one compatible with {want}")


def check_initrd(path: Path) -> list[str]:
    """Accept what the kernel accepts; a `.gz` that is really a plain cpio is fine (with a note)."""
    head = _read_head(path, 8, "initrd")
    for magic, kind in INITRD_MAGICS.items():
        if head.startswith(magic):
            if path.suffix == ".gz" and kind != "gzip":
                return [f"initrd {path.name} is named .gz but is a {kind} archive; the kernel accepts it"]
            return []
    raise InputError(f"initrd {path} is neither a cpio archive nor a compressed one the kernel reads")


def load_artifacts(directory: Path) -> GuestArtifacts:
    """Read DIR/manifest.json, check every file's sha256 and type."""
    if not directory.is_dir():
        raise InputError(f"artifacts directory not found: {directory} (run `dirtylog build --out {directory}`)")
    mpath = directory / MANIFEST_NAME
    if not mpath.is_file():
        raise InputError(f"{mpath} is missing: not a dirtylog artifacts directory")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{mpath} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        raise InputError(f"{mpath}: unknown manifest schema {manifest.get('schema') if isinstance(manifest, dict) else None!r} "
                         f"(expected {MANIFEST_SCHEMA})")
    by_role: dict[str, Path] = {}
    for entry in manifest.get("files", []):
        try:
            role, name, digest = entry["role"], entry["name"], entry["sha256"]
        except (KeyError, TypeError):
            raise InputError(f"{mpath}: malformed file entry {entry!r}") from None
        path = directory / name
        if not path.is_file():
            raise InputError(f"{path} listed in the manifest is missing")
        if sha256_file(path) != digest:
            raise InputError(f"{path} does not match its sha256 in the manifest (changed since the build?)")
        by_role[role] = path
    for role in ("kernel", "initrd"):
        if role not in by_role:
            raise InputError(f"{mpath} names no {role}")
    guest = manifest.get("guest", {})
    art = GuestArtifacts(kernel=by_role["kernel"], dtb=by_role.get("dtb"), initrd=by_role["initrd"],
                         machine=guest.get("machine", "vexpress-a15"), arch=manifest.get("arch", "armv7"),
                         min_mem_mb=int(guest.get("min_mem_mb", 64)),
                         reserved_mb=int(guest.get("reserved_mb", GUEST_RESERVED_MB)), manifest=manifest)
    validate(art)
    return art


def foreign_artifacts(kernel: Path, dtb: Path | None, initrd: Path, machine: str = "vexpress-a15",
                      base: GuestArtifacts | None = None, arch: str = "armv7") -> GuestArtifacts:
    """Bring-your-own guest: any of kernel/dtb/initrd given on the command line (the rest from
    `base`, the artifacts directory, when there is one)."""
    art = GuestArtifacts(kernel=kernel or (base.kernel if base else None),
                         dtb=dtb or (base.dtb if base else None),
                         initrd=initrd or (base.initrd if base else None),
                         machine=base.machine if base else machine, arch=base.arch if base else arch,
                         min_mem_mb=base.min_mem_mb if base else 32,
                         reserved_mb=base.reserved_mb if base else GUEST_RESERVED_MB,
                         manifest=base.manifest if base and not initrd else {})
    for role in ("kernel", "initrd"):
        if getattr(art, role) is None:
            raise InputError(f"--{role} is needed (no artifacts directory to take it from)")
    validate(art)
    return art


def validate(art: GuestArtifacts) -> None:
    check_kernel(art.kernel, art.arch)
    if art.dtb is not None:
        check_dtb(art.dtb, art.machine)
    art.notes += check_initrd(art.initrd)
