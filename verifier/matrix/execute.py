"""Running a matrix: each scenario one verify() in its own run directory, in threads, within the host."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from verifier.analysis import expect
from verifier.errors import InputError, VerifyError

from verifier.matrix.fit import Host, check_fits_host, probe_host
from verifier.matrix.results import STATUS_EXIT, ScenarioResult, build_report, matrix_exit_code
from verifier.matrix.spec import (HOST_KEYS, Matrix, MatrixError, Scenario, load_matrix, parse_shard, select_scenarios,
                                  shard)
from verifier.run.options import from_matrix, reproducer_args


class Cancelled(BaseException):
    """Raised inside a scenario's thread when the matrix is interrupted."""


class ScenarioReporter:
    """verify()'s Reporter for one scenario: prefixed lines, and the cancellation point."""

    def __init__(self, console, name: str, cancel: threading.Event):
        self.console, self.name, self.cancel = console, name, cancel
        self._last_sync = None

    def _check(self):
        if self.cancel.is_set():
            raise KeyboardInterrupt

    def step(self, msg: str) -> None:
        self._check()
        if self.console is not None:
            self.console.step(f"[{self.name}] {msg}")

    def detail(self, msg: str) -> None:
        self._check()
        if self.console is not None and hasattr(self.console, "detail"):
            self.console.detail(f"[{self.name}] {msg}")

    def migration(self, info: dict) -> None:
        self._check()
        ram = info.get("ram") or {}
        sync = ram.get("dirty-sync-count")
        if sync == self._last_sync or self.console is None:
            return
        self._last_sync = sync
        self.console.step(f"[{self.name}]   {info.get('status')}: dirty sync {sync}, "
                          f"{ram.get('remaining', 0) / 1e6:.1f} MB remaining, "
                          f"{ram.get('transferred', 0) / 1e6:.1f} MB sent")


def reproducer(s: Scenario, run_dir: Path) -> str:
    """The single `dirtylog verify` command that runs this scenario alone (from its plan, by the
    option table: verifier.run.options.reproducer_args)."""
    args = ["dirtylog", "verify", "--artifacts", s.params["artifacts"] or "artifacts",
            *reproducer_args(verify_options(s, run_dir))]
    return " ".join(shlex.quote(a) for a in args)


def is_two_host(s: Scenario) -> bool:
    """Does the scenario run a side on another host (or both sides through the host layer)?"""
    return any(s.params[k] is not None for k in HOST_KEYS)


def verify_options(s: Scenario, run_dir: Path):
    """The scenario's plan (verifier.run.options.from_matrix)."""
    return from_matrix(s.params, run_dir)


def _report_from_traceback(tb):
    """verify() re-raises KeyboardInterrupt after marking its RunReport interrupted; take the
    report from its frame (see the note in the issue report: verify could attach it)."""
    from verifier.run import verify as _run
    while tb is not None:
        if tb.tb_frame.f_code is _run.verify.__code__:
            return tb.tb_frame.f_locals.get("report")
        tb = tb.tb_next
    return None


def run_scenario(s: Scenario, art, run_dir: Path, console, cancel: threading.Event) -> ScenarioResult:
    from verifier.run.verify import verify
    res = ScenarioResult(scenario=s, run_dir=run_dir, command=reproducer(s, run_dir))
    t0 = time.monotonic()
    report = None
    try:
        report = verify(art, verify_options(s, run_dir), reporter=ScenarioReporter(console, s.name, cancel))
    except KeyboardInterrupt as exc:
        report = getattr(exc, "report", None) or _report_from_traceback(exc.__traceback__)
        res.status, res.error = "interrupted", "interrupted"
    except VerifyError as exc:
        res.status, res.error, res.exit_code = "error", str(exc), exc.exit_code
    except Exception as exc:  # noqa: BLE001 - one scenario's bug must not lose the others' results
        res.status, res.exit_code = "error", 4
        res.error = (f"internal error: {type(exc).__name__}: {exc} (a bug in dirtylog; please report it with "
                     f"{run_dir / 'traceback.txt'})")
        (run_dir / "traceback.txt").parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "traceback.txt").write_text(traceback.format_exc())
    res.wall_s = round(time.monotonic() - t0, 3)
    if report is not None:
        if cancel.is_set():
            report.interrupted = True
        report.command = res.command
        if report.finished is None:
            report.finish()
        try:
            report.write()
        except OSError:
            pass
        res.report = json.loads(json.dumps(report.to_dict(), default=str))
        if res.status == "not-run":
            res.status = report.verdict
            res.exit_code = report.exit_code
            failed = next((t for t in report.trials if t.error), None)
            if failed is not None:
                res.error = failed.error
                res.exit_code = failed.error_exit_code or 3
                if res.exit_code == 2:
                    res.status = "error"
        if res.status in ("pass", "fail"):
            res.status, res.expectation = expect.scenario_status(s.params, res.status, res.report)
            res.exit_code = STATUS_EXIT[res.status]
        if res.status == "interrupted":
            res.exit_code = 130
    if cancel.is_set() and res.status in ("error", "not-run"):
        res.status, res.exit_code = "interrupted", 130
    return res


def _qemu_children() -> list[int]:
    """QEMU processes started by this process (its threads)."""
    me, found = os.getpid(), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == me and "qemu-system" in os.readlink(f"/proc/{pid}/exe"):
                found.append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    return found


@dataclass
class MatrixRun:
    """Everything `run_matrix` needs; the CLI builds one from its options."""

    matrix: Matrix
    scenarios: list[Scenario]
    run_dir: Path
    jobs: int = 1
    shard_spec: tuple[int, int] | None = None
    artifacts_default: Path | None = None
    host: Host | None = None
    command: str = ""
    selected: tuple[str, ...] = ()  # --scenario patterns, if any
    results: dict[int, ScenarioResult] = field(default_factory=dict)


def prepare(matrix_file: Path, jobs: int, shard_spec: str | None, artifacts_default: Path | None,
            run_dir: Path | None, host: Host | None = None,
            select: tuple[str, ...] = ()) -> tuple[MatrixRun, list[str], dict]:
    """Load, shard and check everything that can be checked before a QEMU starts.

    Returns the run, notes, and the loaded artifacts per directory. MatrixError/InputError: exit 2."""
    from verifier.artifacts import load_artifacts
    from verifier.run.hosts import check_hosts, hosts_from_options
    from verifier.run.qemu import probe_qemu
    from verifier.run.verify import check_plan, default_run_dir, local_capture
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: must be at least 1")
    matrix = load_matrix(matrix_file)
    spec = parse_shard(shard_spec) if shard_spec else None
    chosen = select_scenarios(matrix, select)
    chosen = shard(chosen, *spec) if spec else chosen
    run_dir = Path(run_dir or default_run_dir()).resolve()
    host = host or probe_host(run_dir)
    notes = check_fits_host(chosen, jobs, host)
    arts: dict[str, object] = {}
    qemus: dict[str, object] = {}
    for s in chosen:
        if s.params["artifacts"] is None:
            s.params["artifacts"] = str(Path(artifacts_default or "artifacts").resolve())
        key = s.params["artifacts"]
        if key not in arts:
            arts[key] = load_artifacts(Path(key))
        art = arts[key]
        try:
            opts = verify_options(s, run_dir)
            machine = check_plan(art, opts, "machine", f"the artifacts in {key}")
            hosts = hosts_from_options(opts, machine)
            check_hosts(opts, hosts)  # the same refusals as verify's, in the same place
            if not hosts.direct:  # QEMU and capture are checked on the hosts when the scenario starts
                continue
            binary = opts.qemu or machine.qemu_binary
            if binary not in qemus:
                qemus[binary] = probe_qemu(binary)
            local_capture(opts, qemus[binary])  # includes huge pages the host cannot give
        except InputError as exc:
            raise MatrixError(f"scenario '{s.name}' ({s.origin}): {exc}") from None
    run = MatrixRun(matrix=matrix, scenarios=chosen, run_dir=run_dir, jobs=jobs, shard_spec=spec,
                    artifacts_default=artifacts_default, host=host, selected=tuple(select),
                    command=" ".join(shlex.quote(a) for a in ["dirtylog", *sys.argv[1:]]))
    return run, notes, arts


def execute(run: MatrixRun, arts: dict, console=None, on_result=None, grace_s: float = 15.0) -> int:
    """Run the scenarios; returns the matrix exit code. Ctrl-C/SIGTERM (KeyboardInterrupt in the
    main thread): running scenarios are cancelled at their next step, their QEMUs are stopped,
    the rest is not started; the partial results stay in `run.results` and 130 is returned."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    cancel = threading.Event()
    lock = threading.Condition()
    busy = {"cores": 0, "mem": 0, "n": 0}
    pending = list(run.scenarios)
    threads: list[threading.Thread] = []

    def fits(s: Scenario) -> bool:
        if busy["n"] == 0:
            return True
        return (busy["n"] < run.jobs and busy["cores"] + s.sched_cores <= run.host.cores
                and busy["mem"] + s.host_mem_mib <= run.host.mem_available_mib)

    def worker(s: Scenario) -> None:
        try:
            res = run_scenario(s, arts[s.params["artifacts"]], run.run_dir / s.slug, console, cancel)
        except BaseException as exc:  # noqa: BLE001
            res = ScenarioResult(scenario=s, run_dir=run.run_dir / s.slug, status="error", exit_code=4,
                                 error=f"internal error: {type(exc).__name__}: {exc} (a bug in dirtylog)")
        with lock:
            run.results[s.index] = res
            busy["cores"] -= s.sched_cores
            busy["mem"] -= s.host_mem_mib
            busy["n"] -= 1
            lock.notify_all()
        if on_result is not None:
            on_result(res)

    interrupted = False
    try:
        with lock:
            while pending:
                s = next((x for x in pending if fits(x)), None)
                if s is None:
                    lock.wait(1.0)
                    continue
                pending.remove(s)
                busy["cores"] += s.sched_cores
                busy["mem"] += s.host_mem_mib
                busy["n"] += 1
                t = threading.Thread(target=worker, args=(s,), name=f"scenario-{s.index}", daemon=True)
                threads.append(t)
                t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        interrupted = True
        cancel.set()
        if console is not None:
            console.step("interrupted: stopping every QEMU, writing the partial report")
        deadline = time.monotonic() + grace_s
        while any(t.is_alive() for t in threads):
            # Scenarios stop at their next progress step; a QEMU the scenario waits on (boot,
            # resume check) is ended so the wait returns at once.
            for pid in _qemu_children():
                try:
                    os.kill(pid, signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL)
                except OSError:
                    pass
            for t in threads:
                t.join(0.2)
            if time.monotonic() > deadline + 10:
                break
    for s in run.scenarios:
        if s.index not in run.results:
            run.results[s.index] = ScenarioResult(scenario=s, status="not-run" if interrupted else "error",
                                                  error="not run: the matrix was interrupted" if interrupted
                                                  else "not run")
    code = matrix_exit_code([r.status for r in run.results.values()], [r.exit_code for r in run.results.values()])
    return 130 if interrupted else code


def report_dict(run: MatrixRun, started: str) -> dict:
    return build_report(run.matrix, [r.to_dict() for r in run.results.values()], shard_spec=run.shard_spec,
                        jobs=run.jobs, host=run.host.to_dict() if run.host else None, started=started,
                        command=run.command, run_dir=run.run_dir,
                        extra={"selected": list(run.selected)} if run.selected else None)
