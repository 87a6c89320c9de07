"""One verification: boot source and destination, migrate under load, capture, compare, verdict.

Everything a run produces lives under one run directory, one sub-directory per trial:
serial logs, QMP logs, QEMU command lines and output, the migration timeline, both RAM images
and the reports.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from . import capture as _capture
from . import findings as _findings
from . import remote as _remote
from .artifacts import GuestArtifacts
from .errors import InputError, VerifyError
from builder.machines import MACHINES, MACHINES_BY_ARCH

from .qemu import probe_qemu
from .report import RunReport, TrialResult, checks
from .trial import HUGEPAGE_KB, LocalSites, run_trial
from .workload import SEED_WORKLOADS, Workload, check_fits


@dataclass
class VerifyOptions:
    qemu: str | None = None  # default: the machine's emulator (qemu-system-arm for armv7)
    smp: int = 2
    mem_mb: int = 256
    max_bandwidth: int | None = None
    workloads: tuple[Workload, ...] = SEED_WORKLOADS
    trials: int = 1
    run_dir: Path | None = None
    capture: str = "auto"
    transport: str = "unix"
    migration_address: str = "127.0.0.1"
    min_passes: int = 4
    accel: str = "tcg"
    boot_timeout_s: float = 120.0
    settle_s: float = 1.0
    migration_timeout_s: float = 180.0
    delete_images: bool = False
    extra_append: str = ""
    machine: str | None = None  # default: the machine named in the manifest
    inject: tuple[str, int] | None = None  # ("untracked-writes" | "corrupt-capture", pages) | ("cpu-register", registers)
    capabilities: dict = field(default_factory=dict)  # migration capabilities, both sides
    parameters: dict = field(default_factory=dict)  # migration parameters, source
    postcopy: bool = False
    tcg_thread: str | None = None  # single | multi (QEMU's default: multi when it can)
    kvm_dirty_ring: int | None = None  # KVM dirty ring size in entries; None = dirty bitmap
    guest_cmds: tuple[str, ...] = ()  # typed at the shell prompt of a foreign guest
    ready_pattern: str | None = None  # what says a foreign guest is ready (default: a shell prompt)
    seed: int | None = None  # for the random choices of --inject
    host_backing: str = "auto"  # anon | file | memfd | memfd-hugetlb | thp; auto: file for backing-file capture
    guest_pages: str = "4k"  # 4k | hugetlb | thp: how dirtyram maps its buffers in the guest
    machine_opts: str = ""  # extra -machine properties, e.g. secure=off
    cpu_state: bool = True  # compare every vCPU register through the gdbstubs (--no-cpu-state: False)
    src_host: str | None = None  # user@host[:port] or "local": run the source there (verifier.remote)
    dst_host: str | None = None  # user@host[:port] or "local": run the destination there
    ssh_identity: str | None = None
    known_hosts: str | None = None
    remote_dir: str = "/var/tmp/dirtylog-remote"  # run directories and file cache on the hosts
    dst_qemu: str | None = None  # two-host runs: the destination's QEMU when it is not `qemu`
    allow_qemu_mismatch: bool = False  # two-host runs: accept QEMUs of different versions

    def check(self, art: GuestArtifacts) -> None:
        if self.smp < 1 or self.smp > 8:
            raise InputError(f"--smp {self.smp}: must be between 1 and 8")
        if self.mem_mb < art.min_mem_mb:
            raise InputError(f"--mem {self.mem_mb}: these artifacts need at least {art.min_mem_mb} MiB "
                             f"(the kernel does not boot with less)")
        if self.trials < 1:
            raise InputError("--trials must be at least 1")
        if self.max_bandwidth is not None and self.max_bandwidth <= 0:
            raise InputError("--max-bandwidth must be a positive number of bytes per second")
        if self.transport not in ("unix", "tcp"):
            raise InputError(f"--transport {self.transport}: expected unix or tcp")
        if self.accel not in ("tcg", "kvm"):
            raise InputError(f"--accel {self.accel}: expected tcg or kvm")
        if self.tcg_thread and self.accel != "tcg":
            raise InputError("--tcg-thread applies to --accel tcg only")
        if self.kvm_dirty_ring is not None and self.accel != "kvm":
            raise InputError("--kvm-dirty-ring applies to --accel kvm only")
        if art.foreign and not self.guest_cmds and self.ready_pattern is None:
            pass  # a foreign guest is ready at its shell prompt
        check_fits(self.workloads, self.mem_mb, art.reserved_mb)


def default_run_dir() -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("dirtylog-runs") / f"{stamp}-{secrets.token_hex(2)}"


class Reporter:
    """Plain progress lines; the CLI replaces it with a quieter or richer one."""

    def step(self, msg: str) -> None:  # pragma: no cover - trivial
        pass

    def migration(self, info: dict) -> None:  # pragma: no cover - trivial
        pass

    def detail(self, msg: str) -> None:  # pragma: no cover - trivial
        pass


def verify(art: GuestArtifacts, opts: VerifyOptions, reporter: Reporter | None = None) -> RunReport:
    reporter = reporter or Reporter()
    opts.check(art)
    machine = MACHINES.get(opts.machine or art.machine)
    if machine is None:
        raise InputError(f"machine {opts.machine or art.machine!r} is not supported (known: {', '.join(MACHINES)})")
    if machine.arch != art.arch:
        fits = ", ".join(m.name for m in MACHINES_BY_ARCH.get(art.arch, []))
        raise InputError(f"--machine {machine.name} runs {machine.arch} guests; these artifacts are {art.arch}"
                         + (f" (use --machine {fits})" if fits else ""))
    default_note = _faithful_machine_opts(opts, machine)
    if default_note:
        reporter.step(default_note)
    hosts = None
    if _remote.remote_requested(opts):
        _remote.check_remote_options(opts)
        hosts = _remote.hosts_from_options(opts, machine)
        binaries = _remote.prepare_hosts(hosts)  # typed errors: unreachable, host key, auth, no QEMU
        qemu, capture = binaries["src"], _remote.resolve_capture(opts, hosts, binaries)
        opts.host_backing = "anon" if opts.host_backing == "auto" else opts.host_backing
        sites = _remote.HostSites(hosts, binaries, capture)
    else:
        if opts.dst_qemu or opts.allow_qemu_mismatch:
            raise InputError("--dst-qemu and --allow-qemu-mismatch apply to runs with --src-host/--dst-host "
                             "(two QEMUs on this machine: --src-host local --dst-host local)")
        qemu = probe_qemu(opts.qemu or machine.qemu_binary)
        capture = _capture.choose(opts.capture, qemu, postcopy=opts.postcopy, host_backing=opts.host_backing)
        opts.host_backing = "file" if capture == "backing-file" else (
            "anon" if opts.host_backing == "auto" else opts.host_backing)
        check_host_backing(opts)
        sites = LocalSites(qemu, capture)
    if opts.inject and opts.inject[0] == "cpu-register" and not opts.cpu_state:
        raise InputError("--inject cpu-register plants a register difference for the CPU-state comparison: "
                         "it cannot be combined with --no-cpu-state")
    if opts.inject and opts.inject[0] == "untracked-writes" and capture != "backing-file":
        raise InputError("--inject untracked-writes writes through the source's RAM backing file: "
                         "it needs --capture backing-file")
    accel = _accel_spec(opts, machine)
    run_dir = (opts.run_dir or default_run_dir()).resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
    report = RunReport.start(run_dir, opts, art, qemu, machine, capture)
    if default_note:
        report.notes.append(default_note)
    if hosts is not None:
        report.qemu.update(_remote.qemu_report(hosts, sites.binaries))  # both hosts' QEMUs
    reporter.step(f"run directory {run_dir}")
    try:
        for index in range(1, opts.trials + 1):
            trial = TrialResult(index=index, directory=run_dir / f"trial-{index:02d}")
            report.trials.append(trial)
            try:
                run_trial(trial, art, opts, sites, machine, accel, reporter)
            except VerifyError as exc:
                trial.verdict = "error"
                trial.error = str(exc)
                trial.error_exit_code = exc.exit_code
                reporter.step(f"trial {index}: error: {exc}")
                break
            if trial.verdict == "fail":
                trial.known_findings = _findings.match(trial, _findings.Context(
                    machine=machine.name, accel=opts.accel, qemu_version=report.qemu["version"],
                    machine_opts=opts.machine_opts, smp=opts.smp))
            reporter.step(f"trial {index}: {trial.verdict.upper()}  "
                          + "; ".join(c["text"] for c in checks(trial).values()))
    except KeyboardInterrupt as exc:
        report.interrupted = True
        exc.report = report  # so the caller can still write what was done
        raise
    finally:
        report.finish()
    return report


SECURE_DEFAULT_NOTE = ("vexpress-a15 under TCG: secure=off chosen, as under KVM in 2014 (no EL3, Linux runs "
                       "Non-secure); --machine-opts secure=on reproduces QEMU's unmigrated Secure CP15 banks "
                       "(GitLab #467)")


def _faithful_machine_opts(opts: VerifyOptions, machine) -> str:
    """The 2014 procedure ran vexpress-a15 under KVM, where the guest has no EL3 and Linux runs
    Non-secure. TCG's default (secure=on) runs Linux in the Secure world instead, whose banked
    CP15 registers QEMU does not migrate; so under TCG the faithful default is secure=off.
    Returns the note saying so, or "" when the user chose (or the case does not arise)."""
    if machine.name != "vexpress-a15" or opts.accel != "tcg" or re.search(r"(^|,)secure=", opts.machine_opts):
        return ""
    opts.machine_opts = ",".join(o for o in (opts.machine_opts, "secure=off") if o)
    return SECURE_DEFAULT_NOTE


def check_host_backing(opts: VerifyOptions) -> None:
    """Huge pages the host cannot give are a clear refusal, never a silent fallback."""
    if opts.host_backing == "memfd-hugetlb":
        info = dict(re.findall(r"^(\w+):\s+(\d+)", Path("/proc/meminfo").read_text(), re.M))
        free = int(info.get("HugePages_Free", 0))
        need = 2 * (opts.mem_mb * 1024 // HUGEPAGE_KB)
        if free < need:
            raise InputError(f"--host-backing memfd-hugetlb: the host has {free} free 2 MiB huge pages, "
                             f"source and destination need {need} (echo {need} > /proc/sys/vm/nr_hugepages)")
    if opts.host_backing == "thp":
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        if "[never]" in mode:
            raise InputError("--host-backing thp: transparent huge pages are disabled on this host "
                             "(/sys/kernel/mm/transparent_hugepage/enabled says never)")


def _accel_spec(opts: VerifyOptions, machine) -> tuple[str, str]:
    """(-accel value, -cpu value). KVM runs guests of the host's own architecture only."""
    if opts.accel == "tcg":
        return ("tcg" + (f",thread={opts.tcg_thread}" if opts.tcg_thread else ""), machine.cpu)
    host = platform.machine()
    native = {"x86_64": "x86_64", "aarch64": "aarch64"}.get(host)
    if machine.arch == "armv7" and not (host == "aarch64" and machine.name == "virt"):
        raise InputError(f"--accel kvm: an armv7 guest needs an arm64 host and --machine virt "
                         f"(this host is {host}, the machine {machine.name})")
    if machine.arch != "armv7" and machine.arch != native:
        raise InputError(f"--accel kvm runs guests of the host's architecture only: this host is {host}, "
                         f"the guest {machine.arch}")
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError as exc:
        raise InputError(f"--accel kvm: /dev/kvm is not usable: {exc.strerror}") from None
    ring = f",dirty-ring-size={opts.kvm_dirty_ring}" if opts.kvm_dirty_ring else ""
    return ("kvm" + ring, "host,aarch64=off" if machine.arch == "armv7" else "host")
