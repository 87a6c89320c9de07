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
from pathlib import Path

from verifier.capture import ram as _capture
from verifier.analysis import findings as _findings
from verifier.run import hosts as _hosts
from verifier.artifacts import GuestArtifacts
from verifier.errors import InputError, VerifyError
from builder.machines import MACHINES, MACHINES_BY_ARCH

from verifier.run.qemu import probe_qemu
from verifier.reports.report import RunReport, TrialResult, checks
from verifier.run.trial import HUGEPAGE_KB, run_trial
from verifier.run.sites import HostSites, LocalSites
from verifier.run.options import VerifyOptions


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


def check_plan(art: GuestArtifacts, opts: VerifyOptions, machine_words: str = "--machine",
               artifacts_words: str = "these artifacts"):
    """The plan against these artifacts: options, and the machine that runs them. Returns the Machine.
    (A matrix names its key and the artifacts' directory instead of the option.)"""
    opts.check(art)
    machine = MACHINES.get(opts.machine or art.machine)
    if machine is None:
        raise InputError(f"machine {opts.machine or art.machine!r} is not supported (known: {', '.join(MACHINES)})")
    if machine.arch != art.arch:
        fits = ", ".join(m.name for m in MACHINES_BY_ARCH.get(art.arch, []))
        raise InputError(f"{machine_words} {machine.name} runs {machine.arch} guests; {artifacts_words} are {art.arch}"
                         + (f" (use --machine {fits})" if fits else ""))
    return machine


def verify(art: GuestArtifacts, opts: VerifyOptions, reporter: Reporter | None = None) -> RunReport:
    reporter = reporter or Reporter()
    machine = check_plan(art, opts)
    default_note = _faithful_machine_opts(opts, machine)
    if default_note:
        reporter.step(default_note)
    hosts = _hosts.hosts_from_options(opts, machine)
    _hosts.check_hosts(opts, hosts)  # what a host cannot do, refused in one place
    if hosts.direct:
        qemu = probe_qemu(opts.qemu or machine.qemu_binary)
        capture = local_capture(opts, qemu)
        sites = LocalSites(qemu, capture)
    else:
        binaries = _hosts.prepare_hosts(hosts)  # typed errors: unreachable, host key, auth, no QEMU
        qemu, capture = binaries["src"], _hosts.resolve_capture(opts, hosts, binaries)
        opts.host_backing = "anon" if opts.host_backing == "auto" else opts.host_backing
        sites = HostSites(hosts, binaries, capture)
    if opts.inject and opts.inject[0] == "cpu-register" and not opts.cpu_state:
        raise InputError("--inject cpu-register plants a register difference for the CPU-state comparison: "
                         "it cannot be combined with --no-cpu-state")
    if opts.inject and opts.inject[0] == "stream-device" and not opts.device_state:
        raise InputError("--inject stream-device changes a device field for the device-state comparison: "
                         "it cannot be combined with --no-device-state")
    if opts.inject and opts.inject[0].startswith("stream-") and not opts.stream:
        raise InputError(f"--inject {opts.inject[0]} changes the migration stream in the tap: "
                         f"it cannot be combined with --no-stream")
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
    if not hosts.direct:
        report.qemu.update(_hosts.qemu_report(hosts, sites.binaries))  # both hosts' QEMUs
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


def local_capture(opts: VerifyOptions, qemu) -> str:
    """The capture method for QEMUs on this machine (sets opts.host_backing to what backs RAM),
    refusing huge pages the host cannot give."""
    capture = _capture.choose(opts.capture, qemu, postcopy=opts.postcopy, host_backing=opts.host_backing)
    opts.host_backing = "file" if capture == "backing-file" else (
        "anon" if opts.host_backing == "auto" else opts.host_backing)
    check_host_backing(opts)
    return capture


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
