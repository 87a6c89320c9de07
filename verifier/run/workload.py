"""dirtyram workloads: parsing `TOTAL:DIRTY:INTERVAL_MS` and checking that they fit the guest."""

from __future__ import annotations

import re
from dataclasses import dataclass

from verifier.errors import InputError

PAGE_SIZE = 4096
# What the guest kernel, its page cache and the unpacked initramfs need besides the workloads.
GUEST_RESERVED_MB = 40

_SPEC = re.compile(r"(\d+):(\d+):(\d+)")


@dataclass(frozen=True)
class Workload:
    total_pages: int
    dirty_pages: int
    interval_ms: int

    @property
    def spec(self) -> str:
        return f"{self.total_pages}:{self.dirty_pages}:{self.interval_ms}"

    @property
    def bytes(self) -> int:
        return self.total_pages * PAGE_SIZE


# The 2014 procedure: 512 pages every 50 ms twice, and 50 pages every 5 ms.
SEED_WORKLOADS = (Workload(512, 512, 50), Workload(512, 512, 50), Workload(50, 50, 5))


def parse_workload(text: str) -> Workload:
    m = _SPEC.fullmatch(text.strip())
    if not m:
        raise InputError(f"malformed workload {text!r}: expected TOTAL:DIRTY:INTERVAL_MS, e.g. 512:512:50")
    total, dirty, interval = (int(g) for g in m.groups())
    if total == 0 or dirty == 0 or interval == 0:
        raise InputError(f"workload {text!r}: TOTAL, DIRTY and INTERVAL_MS must all be greater than 0")
    if dirty > total:
        raise InputError(f"workload {text!r}: DIRTY ({dirty}) is larger than TOTAL ({total})")
    if total > 0xFFFFFFFF or interval > 0xFFFFFFFF:
        raise InputError(f"workload {text!r}: numbers must fit in 32 bits")
    return Workload(total, dirty, interval)


def check_fits(workloads: tuple[Workload, ...], mem_mb: int, reserved_mb: int = GUEST_RESERVED_MB) -> None:
    """Refuse workloads that cannot fit the guest's RAM besides the kernel (`reserved_mb`: what the
    guest takes for itself; its manifest's guest.reserved_mb when it says, else GUEST_RESERVED_MB)."""
    need = sum(w.bytes for w in workloads)
    budget = (mem_mb - reserved_mb) * 1024 * 1024
    if need > budget:
        raise InputError(
            f"workloads need {need / 2**20:.1f} MiB but a {mem_mb} MiB guest leaves only "
            f"{max(budget, 0) / 2**20:.0f} MiB for them (raise --mem or shrink the workloads)")


def kernel_cmdline_arg(workloads: tuple[Workload, ...]) -> str:
    """The key the guest's /init reads to start one dirtyram per workload."""
    return "dirtylog.workload=" + ",".join(w.spec for w in workloads) if workloads else ""
