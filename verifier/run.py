"""One verification: boot source and destination, migrate under load, capture, compare, verdict.

Everything a run produces lives under one run directory, one sub-directory per trial:
serial logs, QMP logs, QEMU command lines and output, the migration timeline, both RAM images
and the reports.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import re
import secrets
import socket
import time
import random
from dataclasses import dataclass, field
from pathlib import Path

from . import capture as _capture
from . import findings as _findings
from . import inject as _inject
from . import remote as _remote
from .artifacts import GuestArtifacts
from .compare import compare_images
from .errors import InputError, MigrationError, QemuError, VerifyError
from .migration import MigrationPolicy, check_supported, run_migration, start_incoming
from .qemu import MACHINES, MACHINES_BY_ARCH, GuestConfig, QemuBinary, QemuProcess, machine_args, probe_qemu
from .report import RunReport, TrialResult, diagnose_trial
from .workload import SEED_WORKLOADS, Workload, check_fits, kernel_cmdline_arg

RESUME_TIMEOUT_S = 20.0
READY_RE = r"DIRTYLOG-READY n=(\d+)|DIRTYLOG-FAILED[^\r\n]*|Kernel panic[^\r\n]*"


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
    inject: tuple[str, int] | None = None  # ("untracked-writes" | "corrupt-capture", pages)
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


def _free_tcp_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


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
    hosts = binaries = None
    if _remote.remote_requested(opts):
        _remote.check_remote_options(opts)
        hosts = _remote.hosts_from_options(opts, machine)
        binaries = _remote.prepare_hosts(hosts)  # typed errors: unreachable, host key, auth, no QEMU
        qemu, capture = binaries["src"], _remote.resolve_capture(opts, hosts, binaries)
        opts.host_backing = "anon" if opts.host_backing == "auto" else opts.host_backing
    else:
        if opts.dst_qemu or opts.allow_qemu_mismatch:
            raise InputError("--dst-qemu and --allow-qemu-mismatch apply to runs with --src-host/--dst-host "
                             "(two QEMUs on this machine: --src-host local --dst-host local)")
        qemu = probe_qemu(opts.qemu or machine.qemu_binary)
        capture = _capture.choose(opts.capture, qemu, postcopy=opts.postcopy, host_backing=opts.host_backing)
        opts.host_backing = "file" if capture == "backing-file" else (
            "anon" if opts.host_backing == "auto" else opts.host_backing)
        _check_host_backing(opts)
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
        report.qemu.update(_remote.qemu_report(hosts, binaries))  # both hosts' QEMUs
    reporter.step(f"run directory {run_dir}")
    try:
        for index in range(1, opts.trials + 1):
            trial = TrialResult(index=index, directory=run_dir / f"trial-{index:02d}")
            report.trials.append(trial)
            try:
                if hosts is not None:
                    _remote.run_two_host_trial(trial, art, opts, hosts, machine, accel, reporter, binaries)
                else:
                    _run_trial(trial, art, opts, qemu, machine, capture, accel, reporter)
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
            reporter.step(f"trial {index}: {trial.verdict.upper()}" + (
                f" ({trial.compare['diff_count']} differing pages)" if trial.verdict == "fail" else ""))
            if opts.delete_images and trial.verdict == "pass" and hosts is None:
                for img in trial.images.values():
                    Path(img).unlink(missing_ok=True)
                trial.images_deleted = True
    except KeyboardInterrupt as exc:
        report.interrupted = True
        exc.report = report  # so the caller can still write what was done
        raise
    finally:
        report.finish()
    return report


HUGEPAGE_KB = 2048

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


def _check_host_backing(opts: VerifyOptions) -> None:
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


def guest_pages_append(opts: VerifyOptions) -> str:
    """Kernel command line for the guest-side page size of the dirtyram buffers."""
    if opts.guest_pages == "hugetlb":
        # each instance's buffer is rounded up to whole 2 MiB pages
        pages = sum(-(-w.bytes // (HUGEPAGE_KB * 1024)) for w in opts.workloads)
        return f"dirtylog.dirtyram_opts=--hugetlb dirtylog.hugepages={pages}"
    if opts.guest_pages == "thp":
        return "dirtylog.dirtyram_opts=--thp"
    return ""


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


def _run_trial(trial: TrialResult, art: GuestArtifacts, opts: VerifyOptions, qemu: QemuBinary,
               machine, capture: str, accel: tuple[str, str], reporter: Reporter) -> None:
    tdir = trial.directory
    tdir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    append = " ".join(a for a in (f"console={machine.console}", "panic=1",
                                  kernel_cmdline_arg(opts.workloads), guest_pages_append(opts),
                                  opts.extra_append) if a)

    def config(side: str) -> GuestConfig:
        return GuestConfig(machine=machine, kernel=art.kernel.resolve(),
                           dtb=art.dtb.resolve() if art.dtb and machine.needs_dtb else None,
                           initrd=art.initrd.resolve(),
                           append=append, mem_mb=opts.mem_mb, smp=opts.smp, accel=accel[0], cpu=accel[1],
                           ram_file=f"{side}.ram" if capture == "backing-file" else None,
                           host_backing=opts.host_backing, machine_opts=opts.machine_opts)

    if opts.transport == "unix":
        uri = "unix:migrate.sock"  # relative to the trial directory, the QEMUs' working directory
    else:
        uri = f"tcp:{opts.migration_address}:{_free_tcp_port(opts.migration_address)}"
    rng = random.Random(opts.seed)
    policy = MigrationPolicy(max_bandwidth=opts.max_bandwidth, min_passes=opts.min_passes,
                             timeout_s=opts.migration_timeout_s, capabilities=dict(opts.capabilities),
                             parameters=dict(opts.parameters), postcopy=opts.postcopy)
    if opts.inject and opts.inject[0] == "untracked-writes":
        def inject_now() -> None:
            pages = _inject.choose_zero_pages(tdir / "src.ram", opts.inject[1], rng)
            _inject.write_untracked(tdir / "src.ram", pages, nonce=f"{trial.index}-{rng.getrandbits(32):08x}")
            trial.injection = {"kind": "untracked-writes", "pages": pages}
            reporter.step(f"trial {trial.index}: injected untracked writes into {len(pages)} source pages")
        policy.before_switchover = inject_now
    dst_args = machine_args(qemu, config("dst")) + ["-S", "-incoming", "defer"] + _capture.qemu_args(capture, "dst")
    src_args = machine_args(qemu, config("src")) + _capture.qemu_args(capture, "src")
    with contextlib.ExitStack() as stack:
        try:
            dst = stack.enter_context(QemuProcess(qemu, dst_args, tdir, "dst", on_qmp=reporter.detail))
            src = stack.enter_context(QemuProcess(qemu, src_args, tdir, "src", on_qmp=reporter.detail))
        except QemuError as exc:
            raise _kvm_startup_error(exc, opts) from None
        check_supported(src, policy)
        trial.cmdlines = {"src": src.cmdline, "dst": dst.cmdline}
        for side, proc in (("destination", dst), ("source", src)):
            reporter.detail(f"{side} QEMU: " + (tdir / f"cmdline-{proc.name}.txt").read_text().strip())
        reporter.step(f"trial {trial.index}: booting the source guest")
        _wait_until_ready(src, art, opts, tdir)
        trial.timings["boot_s"] = round(time.monotonic() - t_start, 3)
        time.sleep(opts.settle_s)
        start_incoming(src, dst, uri, policy)
        reporter.step(f"trial {trial.index}: migrating ({uri})")
        t_mig = time.monotonic()
        result = run_migration(src, dst, uri, policy, tdir / "timeline.jsonl", progress=reporter.migration)
        trial.timings["migration_s"] = round(time.monotonic() - t_mig, 3)
        trial.migration = result.figures
        trial.parameter_changes = result.parameter_changes
        trial.warnings += result.warnings
        reporter.step(f"trial {trial.index}: capturing guest RAM ({capture})")
        t_cap = time.monotonic()
        trial.page_sizes = {"host": {"backing": opts.host_backing, "src": src.ram_page_sizes(opts.mem_mb)},
                            "guest": _guest_page_report(src.serial.text, opts)}
        images = _capture.capture(capture, src, dst, tdir, machine.ram_base, opts.mem_mb)
        if opts.inject and opts.inject[0] == "corrupt-capture":
            trial.injection = {"kind": "corrupt-capture",
                               "pages": _inject.corrupt_capture(images["dst"], opts.inject[1], rng)}
        trial.images = {k: str(v) for k, v in images.items()}
        trial.timings["capture_s"] = round(time.monotonic() - t_cap, 3)
        src.close()
        reporter.step(f"trial {trial.index}: resuming the destination guest")
        trial.resume = _check_destination_runs(dst)
    _capture.cleanup(capture, tdir)
    if not trial.resume["ok"]:
        reporter.step(f"trial {trial.index}: the destination guest did not run after resuming: {trial.resume['detail']}")
    reporter.step(f"trial {trial.index}: comparing {opts.mem_mb} MiB page by page")
    t_cmp = time.monotonic()
    result = compare_images(images["src"], images["dst"])
    trial.timings["compare_s"] = round(time.monotonic() - t_cmp, 3)
    diagnose_trial(trial, result, machine.ram_base)
    if trial.injection:
        if "pages" not in trial.injection:
            raise MigrationError("--inject untracked-writes: the source never paused before switchover")
        trial.injection["addresses"] = [hex(machine.ram_base + p * 4096) for p in trial.injection["pages"]]
        trial.injection.update(_inject.check(trial.injection["pages"], result.diff_pages))
    trial.timings["total_s"] = round(time.monotonic() - t_start, 3)


def _kvm_startup_error(exc: QemuError, opts: VerifyOptions) -> QemuError:
    """A QEMU that dies while starting under KVM says why KVM is unusable (a nested or
    paravirtualised /dev/kvm that rejects the vCPU's MSRs, for instance), not just that it died."""
    if opts.accel != "kvm":
        return exc
    return QemuError(f"KVM is not usable here: QEMU failed to start under KVM: {exc}; use --accel tcg")


def _guest_page_report(console: str, opts: VerifyOptions) -> dict:
    """What the guest said about its pages (init reports reservations and THP mode)."""
    out = {"requested": opts.guest_pages}
    m = re.search(r"hugepages requested=(\d+) reserved=(\d+)", console)
    if m:
        out["hugepages_requested"], out["hugepages_reserved"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"transparent_hugepage: ([^\r\n]*)", console)
    if m:
        out["transparent_hugepage"] = m.group(1).strip()
    flags = re.findall(r"flags=0x([0-9a-f]+)", console)
    if flags:
        out["dirtyram_flags"] = sorted(set(flags))
    return out


PROMPT_RE = r"(?m)^(/[^\r\n#$]*)? ?[#$] "


def _wait_until_ready(src: QemuProcess, art: GuestArtifacts, opts: VerifyOptions, tdir: Path) -> None:
    """Our initrd says DIRTYLOG-READY; a foreign guest is ready at its shell prompt, where the
    --guest-cmd lines are typed (the 2014 way: the workload was started by hand)."""
    pattern = opts.ready_pattern or (PROMPT_RE if art.foreign else READY_RE)
    m = src.serial.wait_for(pattern + r"|Kernel panic[^\r\n]*", opts.boot_timeout_s, alive=src.alive)
    if m is None:
        if not src.alive():
            src._raise_dead("exited while the guest was booting")
        if opts.accel == "kvm":
            raise QemuError(f"KVM is not usable here: the guest did not boot under KVM within "
                            f"{opts.boot_timeout_s:.0f} s (see {tdir / 'serial-src.log'}); use --accel tcg")
        raise QemuError(f"the guest did not report ready within {opts.boot_timeout_s:.0f} s; "
                        f"see {tdir / 'serial-src.log'}")
    marker = m.group(0).decode(errors="replace").strip()
    if marker.startswith("Kernel panic") or marker.startswith("DIRTYLOG-FAILED"):
        raise QemuError(f"the guest failed to start: {marker} (see {tdir / 'serial-src.log'})")
    if marker.startswith("DIRTYLOG-READY") and int(m.group(1)) != len(opts.workloads):
        raise QemuError(f"the guest started {m.group(1)} workloads instead of {len(opts.workloads)}; "
                        "the initrd does not read dirtylog.workload")
    for cmd in opts.guest_cmds:
        src.serial.write(cmd + "\n")
        time.sleep(0.5)


def _check_destination_runs(dst: QemuProcess) -> dict:
    """Resume the destination and make its shell compute something: does the guest really run?

    A guest that does not answer, or that panics (QEMU then exits 0 because of -no-reboot), is a
    verification finding: the hypervisor broke it. A QEMU that crashes is an infrastructure failure.
    """
    since = dst.serial.mark()
    dst.qmp("cont")
    a, b = secrets.randbelow(10**6), secrets.randbelow(10**6)
    try:
        dst.serial.write(f"\necho dirtylog-alive-$(({a}+{b}))\n")
    except OSError:
        pass  # the guest's end is gone; the checks below say why
    if dst.serial.wait_for(f"dirtylog-alive-{a + b}", RESUME_TIMEOUT_S, since=since, alive=dst.alive):
        return {"ok": True, "detail": "the guest's shell answered on the console"}
    console = dst.serial.text[since:] if dst.serial else ""
    oops = re.search(r"(Kernel panic[^\r\n]*|Internal error[^\r\n]*|Unable to handle[^\r\n]*)", console)
    if not dst.alive():
        rc = dst.proc.wait()
        if rc != 0:
            dst._raise_dead("crashed after resuming")
        return {"ok": False, "detail": "the guest stopped after resuming"
                + (f": {oops.group(1).strip()}" if oops else " (QEMU exited 0: guest reset or power-off)")}
    detail = f"no answer on the console within {RESUME_TIMEOUT_S:.0f} s"
    if oops:
        detail += f"; the guest said: {oops.group(1).strip()}"
    try:  # Where the vCPU is stuck says a lot (e.g. looping on an exception vector).
        detail += f" (status {dst.status()})"
        regs = dst.qmp("human-monitor-command", **{"command-line": "info registers"})
        pc = re.search(r"R15=([0-9a-f]+)", regs)
        psr = re.search(r"PSR=[0-9a-f]+ [^\n]*?(usr|fiq|irq|svc|mon|abt|hyp|und|sys)32", regs)
        if pc:
            detail += f"; vCPU 0 at pc 0x{pc.group(1)}" + (f" in {psr.group(1)} mode" if psr else "")
    except VerifyError:
        pass
    return {"ok": False, "detail": detail}
