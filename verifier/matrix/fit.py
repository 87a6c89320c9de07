"""Does a matrix fit this host: cores, memory and disk for the scenarios at once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


from verifier.matrix.spec import QEMU_OVERHEAD_MIB, MIN_DISK_MARGIN_MIB, MatrixError, Scenario


@dataclass
class Host:
    cores: int
    mem_available_mib: int
    mem_total_mib: int
    disk_free_mib: int

    def to_dict(self) -> dict:
        return dict(vars(self))


def probe_host(run_dir: Path) -> Host:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    # For benchmarks only: pretend to have more cores (verdicts may change under CPU contention).
    if os.environ.get("DIRTYLOG_MATRIX_CORES", "").isdigit():
        cores = int(os.environ["DIRTYLOG_MATRIX_CORES"]) or cores
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info[k] = int(v.split()[0]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    probe = Path(run_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return Host(cores=cores, mem_available_mib=info.get("MemAvailable", 0),
                mem_total_mib=info.get("MemTotal", 0), disk_free_mib=st.f_bavail * st.f_frsize // 2**20)


def check_fits_host(scenarios: list[Scenario], jobs: int, host: Host) -> list[str]:
    """Refuse (MatrixError) what cannot run here; return notes on what limits parallelism."""
    notes = []
    for s in scenarios:
        if s.cores > host.cores:
            raise MatrixError(f"scenario '{s.name}' ({s.origin}) needs {s.cores} cores of TCG (smp {s.cores}); "
                              f"this host has {host.cores}")
        if s.host_mem_mib > host.mem_available_mib:
            raise MatrixError(
                f"scenario '{s.name}' ({s.origin}) needs {s.host_mem_mib} MiB of host memory "
                f"(2 QEMUs x ({s.params['mem']} MiB guest + {QEMU_OVERHEAD_MIB} MiB)); this host has "
                f"{host.mem_available_mib} MiB available of {host.mem_total_mib} MiB")
    if scenarios:
        # The images of the scenarios running at once (2 per trial, kept until the compare).
        biggest = sorted((2 * s.params["mem"] for s in scenarios), reverse=True)[:max(jobs, 1)]
        need = sum(biggest) + MIN_DISK_MARGIN_MIB
        if need > host.disk_free_mib:
            raise MatrixError(f"the run directory's file system has {host.disk_free_mib} MiB free; "
                              f"{min(jobs, len(scenarios))} scenarios at once need {need} MiB for RAM images")
        kept = sum(2 * s.params["mem"] * s.params["trials"] for s in scenarios if s.params["keep_images"])
        if kept > host.disk_free_mib:
            notes.append(f"keep_images scenarios will write {kept} MiB of RAM images; "
                         f"{host.disk_free_mib} MiB are free")
    if jobs > 1:
        at_once = _max_parallel(scenarios, jobs, host)
        if at_once < min(jobs, len(scenarios)):
            notes.append(f"--jobs {jobs}: at most {at_once} scenarios fit at once on this host "
                         f"({host.cores} cores, {host.mem_available_mib} MiB available)")
    return notes


def _max_parallel(scenarios: list[Scenario], jobs: int, host: Host) -> int:
    small = sorted(scenarios, key=lambda s: (s.sched_cores, s.host_mem_mib))
    n = cores = mem = 0
    for s in small[:jobs]:
        if cores + s.sched_cores > host.cores or mem + s.host_mem_mib > host.mem_available_mib:
            break
        n, cores, mem = n + 1, cores + s.sched_cores, mem + s.host_mem_mib
    return max(n, 1)


# -- results ----------------------------------------------------------------------------------

