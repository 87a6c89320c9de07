"""Checks that a binary will run in the guest: right machine, right ABI, statically linked.

Static means: no PT_INTERP (nothing for the kernel to load before it) and no shared
libraries needed.  A static-pie (ET_DYN with PT_DYNAMIC for its self-relocation, but
no PT_INTERP and no DT_NEEDED) runs without any loader, so it is accepted and
reported with ``pie=True``.  A PT_DYNAMIC that lists DT_NEEDED libraries is rejected.
"""

from __future__ import annotations

import io
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError, ELFParseError
from elftools.elf.elffile import ELFFile

from builder.errors import BuildInputError

EF_ARM_EABIMASK = 0xFF000000
EF_ARM_EABI_VER5 = 0x05000000
EF_ARM_ABI_FLOAT_SOFT = 0x200
EF_ARM_ABI_FLOAT_HARD = 0x400


@dataclass(frozen=True)
class ArchSpec:
    name: str
    elf_class: int  # 32 or 64
    machine: str  # pyelftools e_machine name
    description: str


ARCHES: dict[str, ArchSpec] = {
    "armv7": ArchSpec("armv7", 32, "EM_ARM", "32-bit ARM (armv7)"),
    "aarch64": ArchSpec("aarch64", 64, "EM_AARCH64", "64-bit ARM (aarch64)"),
    "x86_64": ArchSpec("x86_64", 64, "EM_X86_64", "x86-64"),
}

_MACHINE_NAMES = {
    "EM_ARM": "32-bit ARM",
    "EM_AARCH64": "64-bit ARM (aarch64)",
    "EM_X86_64": "x86-64",
    "EM_386": "32-bit x86",
    "EM_RISCV": "RISC-V",
    "EM_PPC": "32-bit PowerPC",
    "EM_PPC64": "64-bit PowerPC",
    "EM_S390": "s390",
    "EM_MIPS": "MIPS",
    "EM_LOONGARCH": "LoongArch",
}

_ELF_TYPES = {"ET_REL": "a relocatable object (.o)", "ET_CORE": "a core dump"}


@dataclass(frozen=True)
class ElfInfo:
    """What was found; asdict() of it goes into the manifest."""

    path: str
    arch: str  # the ArchSpec name the file was checked against
    machine: str  # e.g. "EM_ARM"
    elf_class: int  # 32 or 64
    endian: str  # "little"
    elf_type: str  # "ET_EXEC" or "ET_DYN"
    e_flags: int
    eabi_version: int | None  # ARM only
    float_abi: str | None  # ARM only: "hard", "soft" or None (no flag set)
    static: bool
    pie: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _machine_desc(machine: str, elf_class: int) -> str:
    if machine in _MACHINE_NAMES:
        return _MACHINE_NAMES[machine]
    return f"{machine} ({elf_class}-bit)"


def check_elf(path: Path | str, arch: str = "armv7") -> ElfInfo:
    """Check the file at path is a static executable for arch; raise BuildInputError if not."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BuildInputError(f"{path}: cannot read: {e.strerror}") from None
    return check_elf_bytes(data, str(path), arch)


def check_elf_bytes(data: bytes, name: str, arch: str = "armv7") -> ElfInfo:
    """Same as check_elf for in-memory contents; name is used in messages only."""
    if arch not in ARCHES:
        raise BuildInputError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHES)}")
    spec = ARCHES[arch]
    if not data.startswith(b"\x7fELF"):
        what = "a script" if data.startswith(b"#!") else "an empty file" if not data else "not an ELF file"
        raise BuildInputError(f"{name}: {what}; expected a {spec.description} executable")
    ehdr_size = {1: 52, 2: 64}.get(data[4] if len(data) > 4 else 0)
    if len(data) < 16 or ehdr_size is None or data[5] not in (1, 2):
        raise BuildInputError(f"{name}: truncated or corrupt ELF file (bad ELF identification bytes)")
    if len(data) < ehdr_size:
        raise BuildInputError(f"{name}: truncated ELF file ({len(data)} bytes, shorter than the ELF header)")
    try:
        return _check(data, name, spec)
    except (ELFError, ELFParseError, struct.error, EOFError) as e:
        raise BuildInputError(f"{name}: truncated or corrupt ELF file ({e})") from None


def check_armv7_static_hardfloat(path: Path | str) -> ElfInfo:
    return check_elf(path, "armv7")


def _check(data: bytes, name: str, spec: ArchSpec) -> ElfInfo:
    size = len(data)
    elf = ELFFile(io.BytesIO(data))
    h = elf.header
    cls = elf.elfclass
    machine = h["e_machine"]
    if machine != spec.machine or cls != spec.elf_class:
        raise BuildInputError(f"{name}: built for {_machine_desc(machine, cls)}, expected {spec.description}")
    if not elf.little_endian:
        raise BuildInputError(f"{name}: big-endian; expected little-endian {spec.description}")
    etype = h["e_type"]
    if etype not in ("ET_EXEC", "ET_DYN"):
        raise BuildInputError(f"{name}: {_ELF_TYPES.get(etype, etype)}, not an executable")

    flags = h["e_flags"]
    eabi = float_abi = None
    if machine == "EM_ARM":
        eabi = (flags & EF_ARM_EABIMASK) >> 24
        if flags & EF_ARM_ABI_FLOAT_HARD:
            float_abi = "hard"
        elif flags & EF_ARM_ABI_FLOAT_SOFT:
            float_abi = "soft"
        if eabi != 5:
            raise BuildInputError(f"{name}: ARM EABI version {eabi}; expected EABI version 5")
        if float_abi != "hard":
            what = "soft-float ABI" if float_abi == "soft" else "no float ABI flag (not built for armhf)"
            raise BuildInputError(f"{name}: {what}; expected hard-float (armhf)")

    # pyelftools reads lazily: check the tables lie inside the file before walking them.
    ph_end = h["e_phoff"] + h["e_phnum"] * h["e_phentsize"]
    if h["e_phnum"] == 0 or ph_end > size:
        raise BuildInputError(f"{name}: truncated or corrupt ELF file (no program headers within the file)")
    if h["e_shoff"] and h["e_shoff"] + h["e_shnum"] * h["e_shentsize"] > size:
        raise BuildInputError(f"{name}: truncated ELF file (section header table runs past the end)")
    interp = None
    dynamic = None
    for seg in elf.iter_segments():
        if seg["p_offset"] + seg["p_filesz"] > size:
            raise BuildInputError(f"{name}: truncated ELF file ({seg['p_type']} segment runs past the end)")
        if seg["p_type"] == "PT_INTERP":
            interp = seg.get_interp_name()
        elif seg["p_type"] == "PT_DYNAMIC":
            dynamic = seg
    if interp is not None:
        raise BuildInputError(f"{name}: dynamically linked (interpreter {interp}); expected a static binary")
    if dynamic is not None:
        needed = [t.needed for t in dynamic.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
        if needed:
            raise BuildInputError(f"{name}: needs shared libraries ({', '.join(needed)}); expected a static binary")

    return ElfInfo(path=name, arch=spec.name, machine=machine, elf_class=cls, endian="little",
                   elf_type=etype, e_flags=flags, eabi_version=eabi, float_abi=float_abi,
                   static=True, pie=etype == "ET_DYN")
