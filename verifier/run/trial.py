"""One trial, wherever source and destination run: the only trial flow dirtylog has.

boot the source under load -> settle -> migrate -> capture both sides -> read both CPU states
-> close the source, resume the destination -> compare -> diagnose.

Where the two QEMUs run is a `Sites` object (verifier.run.sites): `LocalSites` (both on this machine, every capture
method) or `verifier.run.sites.HostSites` (a source and a destination `Host`, local or over ssh).
A Sites decides what differs by place — how the guest's files reach the QEMU, the migration URI,
how RAM is captured and compared — and nothing else; every step and every check is here, once.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import secrets
import time
from pathlib import Path

from verifier.capture import ram as _capture
from verifier.capture import cpustate as _cpustate
from verifier.capture import devstate as _devstate
from verifier.run import inject as _inject
from verifier.analysis.compare import CompareResult
from verifier.analysis.provenance import trace
from verifier.errors import MigrationError, QemuError, VerifyError
from verifier.run.migration import MigrationPolicy, check_supported, run_migration, start_incoming
from verifier.run.qemu import GuestConfig, QemuBinary, QemuProcess, machine_args
from verifier.reports.report import TrialResult
from verifier.run.workload import kernel_cmdline_arg

RESUME_TIMEOUT_S = 20.0
READY_RE = r"DIRTYLOG-READY n=(\d+)|DIRTYLOG-FAILED[^\r\n]*|Kernel panic[^\r\n]*"
PROMPT_RE = r"(?m)^(/[^\r\n#$]*)? ?[#$] "
HUGEPAGE_KB = 2048


class Sites:
    """Where source and destination run. Subclasses say what depends on the place."""

    capture: str  # the capture method, resolved
    binaries: dict[str, QemuBinary]

    def begin(self, trial: TrialResult) -> None:
        """Called first in every trial."""

    def route(self) -> str:
        """'SRC -> DST' for messages about a migration between hosts, '' on this machine."""
        return ""

    def where(self, side: str) -> str:
        """' on HOST' for messages, '' on this machine."""
        return ""

    def guest_files(self, side: str, art, machine) -> dict:
        """{kernel, initrd, dtb}: paths as the QEMU of `side` sees them."""
        raise NotImplementedError

    def ram_file(self, side: str) -> str | None:
        return None

    def capture_args(self, side: str) -> list[str]:
        return _capture.qemu_args(self.capture, side)

    def migration_uri(self, opts) -> str:
        raise NotImplementedError

    no_tap = "this place has no stream tap"

    def stream_tap(self, opts, uri: str, tdir: Path, machine):
        """A verifier.run.streamtap.StreamTap, not started, forwarding to `uri` (where the destination
        listens); None where this place has no tap (`no_tap` says why)."""
        return None

    def save_device_state(self, proc, tdir: Path) -> Path:
        """The stopped QEMU `proc` saves its device sections (verifier.capture.devstate); the local
        path of the file, tdir/devstate-<side>.bin."""
        return _devstate.save(proc, (tdir / f"devstate-{proc.name}.bin").resolve())

    def describe_devices(self, args: list[str], tdir: Path, page_size: int) -> dict | None:
        """A VMDESCRIPTION from a fresh, paused QEMU of `args` (verifier.capture.devstate.describe), for
        runs whose stream carries none; None where this place cannot start one."""
        return _devstate.describe(self.binaries["src"], args, tdir, page_size)

    def qemu(self, side: str, args: list[str], tdir: Path, reporter, gdb: bool) -> QemuProcess:
        """A QEMU for `side`, not started (a context manager starts it); with `gdb`, its
        gdbstub listens on a unix socket reached at the process's `gdb_path`."""
        raise NotImplementedError

    def capture_images(self, src, dst, tdir: Path, ram_base: int, mem_mb: int) -> dict:
        raise NotImplementedError

    def compare(self, trial: TrialResult, images: dict, mem_mb: int, ram_base: int, tdir: Path) -> CompareResult:
        """Compare the two images and diagnose them into `trial` (verdict, differences)."""
        raise NotImplementedError

    def image_names(self, images: dict) -> dict[str, str]:
        return {k: str(v) for k, v in images.items()}

    def delete_images(self, images: dict) -> None:
        for img in images.values():
            Path(img).unlink(missing_ok=True)

    def after_resume(self, tdir: Path) -> None:
        """Called once both QEMUs are closed."""

    def release(self) -> None:
        """Called last in every trial, whatever happened."""


def kernel_append(machine, opts) -> str:
    return " ".join(a for a in (f"console={machine.console}", "panic=1", kernel_cmdline_arg(opts.workloads),
                                guest_pages_append(opts), opts.extra_append) if a)


def guest_pages_append(opts) -> str:
    """Kernel command line for the guest-side page size of the dirtyram buffers."""
    if opts.guest_pages == "hugetlb":
        # each instance's buffer is rounded up to whole 2 MiB pages
        pages = sum(-(-w.bytes // (HUGEPAGE_KB * 1024)) for w in opts.workloads)
        return f"dirtylog.dirtyram_opts=--hugetlb dirtylog.hugepages={pages}"
    if opts.guest_pages == "thp":
        return "dirtylog.dirtyram_opts=--thp"
    return ""


def migration_policy(opts) -> MigrationPolicy:
    return MigrationPolicy(max_bandwidth=opts.max_bandwidth, min_passes=opts.min_passes,
                           timeout_s=opts.migration_timeout_s, capabilities=dict(opts.capabilities),
                           parameters=dict(opts.parameters), postcopy=opts.postcopy)


def run_trial(trial: TrialResult, art, opts, sites: Sites, machine, accel: tuple[str, str], reporter) -> None:
    """Run one trial and fill `trial`: figures, images, CPU state, resume check, verdict."""
    tdir = trial.directory
    tdir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    sites.begin(trial)
    try:
        _run_trial(trial, art, opts, sites, machine, accel, reporter, t_start)
    finally:
        sites.release()


def _run_trial(trial, art, opts, sites: Sites, machine, accel, reporter, t_start: float) -> None:
    tdir = trial.directory
    append = kernel_append(machine, opts)
    files = {side: sites.guest_files(side, art, machine) for side in ("src", "dst")}
    cpu_state = getattr(opts, "cpu_state", True)

    def args(side: str, describe: bool = False) -> list[str]:
        """`describe`: the source's machine without its capture (RAM file, -savedirtylog), for the QEMU
        that describes the device sections when the stream has no VMDESCRIPTION."""
        cfg = GuestConfig(machine=machine, kernel=files[side]["kernel"], dtb=files[side]["dtb"],
                          initrd=files[side]["initrd"], append=append, mem_mb=opts.mem_mb, smp=opts.smp,
                          accel=accel[0], cpu=accel[1], ram_file=None if describe else sites.ram_file(side),
                          host_backing="anon" if describe else opts.host_backing, machine_opts=opts.machine_opts)
        return machine_args(sites.binaries[side], cfg) + ([] if describe else sites.capture_args(side))

    uri = sites.migration_uri(opts)  # where the destination listens
    rng = random.Random(opts.seed)
    policy = migration_policy(opts)
    if opts.inject and opts.inject[0] == "untracked-writes":
        def inject_now() -> None:
            pages = _inject.choose_zero_pages(tdir / "src.ram", opts.inject[1], rng)
            _inject.write_untracked(tdir / "src.ram", pages, nonce=f"{trial.index}-{rng.getrandbits(32):08x}")
            trial.injection = {"kind": "untracked-writes", "pages": pages}
            reporter.step(f"trial {trial.index}: injected untracked writes into {len(pages)} source pages")
        policy.before_switchover = inject_now
    route = sites.route()
    with contextlib.ExitStack() as stack:
        try:
            dst = stack.enter_context(sites.qemu("dst", args("dst") + ["-S", "-incoming", "defer"], tdir,
                                                       reporter, cpu_state))
            src = stack.enter_context(sites.qemu("src", args("src"), tdir, reporter, cpu_state))
        except QemuError as exc:
            raise _kvm_startup_error(exc, opts) from None
        check_supported(src, policy)
        trial.cmdlines = {"src": src.cmdline, "dst": dst.cmdline}
        for side, proc in (("destination", dst), ("source", src)):
            reporter.detail(f"{side} QEMU: " + (tdir / f"cmdline-{proc.name}.txt").read_text().strip())
        reporter.step(f"trial {trial.index}: booting the source guest{sites.where('src')}")
        wait_until_ready(src, art, opts, tdir)
        trial.timings["boot_s"] = round(time.monotonic() - t_start, 3)
        time.sleep(opts.settle_s)
        start_incoming(src, dst, uri, policy)
        tap = sites.stream_tap(opts, uri, tdir, machine) if opts.stream else None
        src_uri = stack.enter_context(tap).listen_uri if tap is not None else uri
        reporter.step(f"trial {trial.index}: migrating {route + ' ' if route else ''}({uri}"
                      + (f" through the stream tap at {src_uri})" if tap is not None else ")"))
        t_mig = time.monotonic()
        try:
            result = run_migration(src, dst, src_uri, policy, tdir / "timeline.jsonl", progress=reporter.migration)
        except MigrationError as exc:
            if not route:
                raise
            raise MigrationError(f"{exc} ({route} over {uri})") from None
        trial.stream = tap.close() if tap is not None else {"skipped": "--no-stream" if not opts.stream
                                                            else sites.no_tap}
        if tap is not None and tap.injector is not None:
            trial.injection = tap.injector.injection()
            if not trial.injection["records"]:
                what = ("the timer section" if opts.inject[0] == "stream-device" else
                        "dirtyram page record in the final RAM section (QEMU sends few pages once the source "
                        "has stopped, 7.2 fewer: a hot workload such as --workload 128:128:2 keeps some there)")
                raise VerifyError(f"--inject {opts.inject[0]}: the tap found no {what} to change, so the "
                                  f"negative control proves nothing")
            if opts.inject[0] == "stream-device":
                reporter.step(f"trial {trial.index}: the tap flipped a byte of device field "
                              f"{', '.join(trial.injection['fields']) or '(none found)'} in the stream")
            else:
                reporter.step(f"trial {trial.index}: the tap {'withheld' if opts.inject[0] == 'stream-drop' else 'flipped a byte in'} "
                              f"{len(trial.injection['records'])} page records of the final RAM section")
        trial.timings["migration_s"] = round(time.monotonic() - t_mig, 3)
        trial.migration = result.figures
        trial.parameter_changes = result.parameter_changes
        trial.warnings += result.warnings
        reporter.step(f"trial {trial.index}: capturing guest RAM ({sites.capture}"
                      + (" on each host)" if route else ")"))
        t_cap = time.monotonic()
        page_sizes = src.ram_page_sizes(opts.mem_mb)
        trial.page_sizes = {"host": {"backing": opts.host_backing, "src": page_sizes},
                            "guest": _guest_page_report(src.serial.text, opts)}
        images = sites.capture_images(src, dst, tdir, machine.ram_base, opts.mem_mb)
        if opts.inject and opts.inject[0] == "corrupt-capture":
            trial.injection = {"kind": "corrupt-capture",
                               "pages": _inject.corrupt_capture(images["dst"], opts.inject[1], rng)}
        trial.images = sites.image_names(images)
        trial.timings["capture_s"] = round(time.monotonic() - t_cap, 3)
        if cpu_state:
            reporter.step(f"trial {trial.index}: comparing CPU state (every register of every vCPU)")
            t_cpu = time.monotonic()
            plant = opts.inject[1] if opts.inject and opts.inject[0] == "cpu-register" else 0
            trial.cpu_state = read_cpu_state(src, dst, machine.arch, tdir, plant=plant)
            if plant:
                planted = trial.cpu_state.pop("planted")
                trial.injection = {"kind": "cpu-register",
                                   "registers": [f"vCPU {p['vcpu']} {p['register']}" for p in planted],
                                   **_inject.check_registers(planted, trial.cpu_state["differences"])}
            trial.timings["cpu_state_s"] = round(time.monotonic() - t_cpu, 3)
        else:
            trial.cpu_state = {"skipped": "--no-cpu-state"}
        if opts.device_state:
            reporter.step(f"trial {trial.index}: comparing device state (every field of every device section)")
            t_dev = time.monotonic()
            trial.device_state = read_device_state(src, dst, sites, tdir, tap, trial.stream.get("skipped"),
                                                   lambda: sites.describe_devices(args("src", describe=True), tdir,
                                                                                  machine.target_page_size))
            if opts.inject and opts.inject[0] == "stream-device":
                trial.injection.update(_inject.check_fields(trial.injection["fields"], trial.device_state))
            trial.timings["device_state_s"] = round(time.monotonic() - t_dev, 3)
        else:
            trial.device_state = {"skipped": "--no-device-state"}
        src.close()
        reporter.step(f"trial {trial.index}: resuming the destination guest{sites.where('dst')}")
        trial.resume = check_destination_runs(dst)
    sites.after_resume(tdir)
    if not trial.resume["ok"]:
        reporter.step(f"trial {trial.index}: the destination guest did not run after resuming: {trial.resume['detail']}")
    reporter.step(f"trial {trial.index}: comparing " + ("page digests on both hosts" if route
                                                        else f"{opts.mem_mb} MiB page by page"))
    t_cmp = time.monotonic()
    result = sites.compare(trial, images, opts.mem_mb, machine.ram_base, tdir)
    trial.timings["compare_s"] = round(time.monotonic() - t_cmp, 3)
    if result.diff_count and tap is not None and tap.ledger is not None:
        trial.stream["provenance"] = trace(tap.ledger, result, trial.differences)
    if trial.injection and trial.injection["kind"] not in ("cpu-register", "stream-device"):
        if "pages" not in trial.injection:
            raise MigrationError("--inject untracked-writes: the source never paused before switchover")
        trial.injection["addresses"] = [hex(machine.ram_base + p * 4096) for p in trial.injection["pages"]]
        trial.injection.update(_inject.check(trial.injection["pages"], result.diff_pages))
    if opts.delete_images and trial.verdict == "pass":
        sites.delete_images(images)
        trial.images_deleted = True
    trial.timings["total_s"] = round(time.monotonic() - t_start, 3)


def read_cpu_state(src: QemuProcess, dst: QemuProcess, arch: str, tdir: Path, plant: int = 0) -> dict:
    """Every register of every vCPU on both sides through their gdbstubs (the source is
    postmigrate, the destination still paused; neither is resumed by reading), compared.
    Both dumps are kept in the trial directory as evidence. `plant` (--inject cpu-register:N):
    N registers of the destination are changed before it is read, and restored after."""
    dumps, planted = {}, []
    for proc in (src, dst):
        with _cpustate.GdbStub(proc.gdb_path) as stub:
            if plant and proc is dst:
                planted = _inject.plant_registers(stub, arch, plant)
            dumps[proc.name] = stub.read_all()
            if planted:
                _inject.restore_registers(stub, planted)
        (tdir / f"cpu-{proc.name}.json").write_text(json.dumps(dumps[proc.name], indent=1) + "\n")
    result = _cpustate.compare(dumps["src"], dumps["dst"], arch)
    if plant:
        result["planted"] = planted
    result["vcpus"] = len(dumps["src"])
    result["arch"] = arch
    return result


def read_device_state(src: QemuProcess, dst: QemuProcess, sites: Sites, tdir: Path, tap, skipped: str | None,
                      describe) -> dict:
    """Both stopped VMs save their device sections; compared field by field with each other and with
    the sections the migration stream carried (verifier.capture.devstate), named by the stream's
    VMDESCRIPTION, or, when it has none, by `describe()`'s (a fresh QEMU of the same machine)."""
    files = {"source": sites.save_device_state(src, tdir), "destination": sites.save_device_state(dst, tdir)}
    copies = {side: _devstate.read_sections(path) for side, path in files.items()}
    stream = tap.device_state() if tap is not None else None
    vmdesc, source = None, "the migration stream"
    if stream is not None:
        copies["stream"], vmdesc = stream
    if vmdesc is None:
        why = ("QEMU sends none in postcopy" if stream is not None else
               f"the stream was not parsed: {skipped or 'its main channel did not parse to the end'}")
        vmdesc = describe()
        source = f"a fresh QEMU of the source's machine, paused and saved ({why})"
        if vmdesc is None:
            source = f"none ({why}; no QEMU to describe the sections here): sections compared as bytes"
    result = _devstate.compare(copies, vmdesc)
    result["description"] = source
    result["files"] = {side: str(path) for side, path in files.items()}
    return result


def _kvm_startup_error(exc: QemuError, opts) -> QemuError:
    """A QEMU that dies while starting under KVM says why KVM is unusable (a nested or
    paravirtualised /dev/kvm that rejects the vCPU's MSRs, for instance), not just that it died."""
    if opts.accel != "kvm":
        return exc
    return QemuError(f"KVM is not usable here: QEMU failed to start under KVM: {exc}; use --accel tcg",
                     cmdline=exc.cmdline, exit_status=exc.exit_status, output_tail=exc.output_tail)


def _guest_page_report(console: str, opts) -> dict:
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


def wait_until_ready(src: QemuProcess, art, opts, tdir: Path) -> None:
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


def check_destination_runs(dst: QemuProcess) -> dict:
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
