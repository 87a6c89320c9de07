"""Facts about guest machines and QEMU, one table for builder and verifier alike.

`MACHINES` is every guest board dirtylog boots: the QEMU machine and CPU, the console, where RAM
starts in guest-physical memory, whether a device tree comes with the artifacts. The builder's
per-architecture builds (builder/build.py) name their machine here and take its console from
it; the verifier builds QEMU command lines from it. The guest's minimum memory is a fact of the
kernel that was built, not of the board, so it travels in the manifest (guest.min_mem_mb).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_QEMU_VERSION = (6, 0)
_VERSION = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


def parse_qemu_version(line: str) -> tuple[int, int, int] | None:
    """(major, minor, micro) from the first line of `qemu-system-* --version`; None if it is not one."""
    m = _VERSION.search(line)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


@dataclass(frozen=True)
class Machine:
    """One guest machine model: everything its QEMU command line depends on."""

    name: str
    qemu_machine: str
    cpu: str
    console: str
    ram_base: int
    needs_dtb: bool = True  # False: QEMU generates the device tree itself
    arch: str = "armv7"  # the guest architecture the artifacts must be built for
    qemu_binary: str = "qemu-system-arm"
    has_sound: bool = False  # a sound device that wants an audiodev
    # QEMU's target page: the unit of its dirty log and of the migration stream's RAM records. ARM
    # machines that set no minimum (vexpress-a15) use the architecture's 1 KiB; the stream does not say.
    target_page_size: int = 4096


MACHINES = {
    # The seed's board: CoreTile Express A15x2; RAM starts at 0x80000000.
    "vexpress-a15": Machine("vexpress-a15", "vexpress-a15", "cortex-a15", "ttyAMA0", 0x80000000,
                            has_sound=True, target_page_size=1024),
    # QEMU's generic board; it generates its own device tree.
    "virt": Machine("virt", "virt", "cortex-a15", "ttyAMA0", 0x40000000, needs_dtb=False),
    "virt-aarch64": Machine("virt-aarch64", "virt", "cortex-a57", "ttyAMA0", 0x40000000,
                            needs_dtb=False, arch="aarch64", qemu_binary="qemu-system-aarch64"),
    # RAM below 4 GiB is linear from 0 (the image also holds what sits in the legacy VGA/BIOS hole).
    "q35": Machine("q35", "q35", "max", "ttyS0", 0x0, needs_dtb=False, arch="x86_64",
                   qemu_binary="qemu-system-x86_64"),
}

MACHINES_BY_ARCH = {arch: [m for m in MACHINES.values() if m.arch == arch]
                    for arch in ("armv7", "aarch64", "x86_64")}
