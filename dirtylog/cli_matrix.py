"""Command-line side of matrices: `dirtylog verify --matrix`, `dirtylog doctor`, `dirtylog report merge`.

`register(cli)` adds the `doctor` command and the `report` group (`report merge`) to the main
click group; `run_matrix(...)` is what `dirtylog verify --matrix FILE` calls; it returns the exit
code: 0 every scenario passed, 1 a verification failed, 2 the matrix is unusable or does not fit
this host (nothing started), 3 an infrastructure failure (the reports are still written), 130
interrupted (every QEMU stopped, the partial reports written).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dirtylog.console import Console, run_main
from verifier.errors import InputError, VerifyError

REPORT_JSON = "matrix-report.json"
REPORT_JUNIT = "junit.xml"
REPORT_HTML = "report.html"


def _say(console, msg: str) -> None:
    if console is not None:
        console.step(msg)
    else:
        click.echo(f"dirtylog: {msg}", err=True)


def _error(msg: str) -> None:
    click.echo(f"dirtylog: error: {msg}", err=True)


def _write_outputs(report: dict, out_dir: Path | None, json_path, junit_path, html_path, console) -> list[Path]:
    """matrix-report.json (and junit.xml) always in out_dir; copies / extra formats where asked."""
    from verifier.reports import junit
    from verifier.matrix.results import write_json
    written = []
    if out_dir is not None:
        write_json(report, out_dir / REPORT_JSON)
        written.append(out_dir / REPORT_JSON)
        written.append(junit.write(report, out_dir / REPORT_JUNIT))
    if json_path:
        write_json(report, Path(json_path))
        written.append(Path(json_path))
    if junit_path:
        written.append(junit.write(report, Path(junit_path)))
    if html_path:
        try:
            from verifier.reports import html as html_report
            written.append(html_report.write(report, Path(html_path)))
        except ImportError as exc:
            _say(console, f"warning: no HTML report ({exc}; pip install matplotlib)")
    return written


def summary_lines(report: dict) -> list[str]:
    s = report["summary"]
    from verifier.analysis.expect import summary_words
    expected = summary_words(s)
    lines = [f"dirtylog matrix: {report['verdict'].upper()}  ({s['passed']} passed, {s['failed']} failed, "
             f"{expected}{s['errors']} errors, {s['interrupted'] + s['not_run']} interrupted/not run of {s['scenarios']} "
             f"scenarios)"]
    if report.get("shard"):
        lines[0] += f"  shard {report['shard']['index']}/{report['shard']['count']}"
    if report.get("missing"):
        lines.append(f"missing scenarios (no shard ran them): {', '.join(report['missing'])}")
    width = max((len(x["name"]) for x in report["scenarios"]), default=10)
    for sc in sorted(report["scenarios"], key=lambda x: x["index"]):
        rep = sc.get("report") or {}
        trials = rep.get("trials") or []
        diffs = ",".join(str((t.get("compare") or {}).get("diff_count", "-")) for t in trials)
        extra = f"differing pages {diffs}" if trials else ""
        if sc.get("error"):
            extra += ("; " if extra else "") + sc["error"].splitlines()[0][:200]
        if sc.get("expectation"):
            extra += ("; " if extra else "") + sc["expectation"]
        wall = f"{sc['wall_s']:.0f}s" if sc.get("wall_s") is not None else "-"
        lines.append(f"  {sc['status'].upper():<15} {sc['name']:<{width}}  {wall:>5}  {extra}")
    return lines


def run_matrix(matrix_file, jobs=1, shard=None, artifacts_default=None, run_dir=None, json_path=None,
               junit_path=None, html_path=None, console=None, select=()) -> int:
    """Run (a shard of) a matrix; write matrix-report.json and junit.xml into the run directory,
    and --json/--junit/--html where asked. Returns the exit code (see the module doc)."""
    from verifier.matrix.execute import execute, prepare, report_dict
    from verifier.reports.report import now_utc
    started = now_utc()
    for opt, p in (("--json", json_path), ("--junit", junit_path), ("--html", html_path)):
        if p is not None and not Path(p).resolve().parent.is_dir():
            _error(f"{opt}: directory of {p} does not exist")
            return 2
    try:
        run, notes, arts = prepare(Path(matrix_file), jobs, shard, artifacts_default, run_dir, select=tuple(select))
    except InputError as exc:
        _error(str(exc))
        return 2
    except VerifyError as exc:
        _error(str(exc))
        return exc.exit_code
    for note in notes:
        _say(console, f"note: {note}")
    for art in arts.values():
        for note in art.notes:
            _say(console, f"note: {note}")
    total = len(run.matrix.scenarios)
    _say(console, f"matrix {run.matrix.path}: {len(run.scenarios)} of {total} scenarios"
         + (f" (shard {run.shard_spec[0]}/{run.shard_spec[1]})" if run.shard_spec else "")
         + f", --jobs {jobs}; run directory {run.run_dir}")
    if not run.scenarios:
        _say(console, "this shard has no scenario")

    def done(res):
        _say(console, f"scenario {res.scenario.name}: {res.status.upper()}"
             + (f" ({res.error.splitlines()[0][:200]})" if res.error and res.status != "fail" else "")
             + (f": {res.expectation}" if res.expectation else ""))

    code = 130
    try:
        code = execute(run, arts, console=console, on_result=done)
    finally:
        # Written whatever happened, a second Ctrl-C included.
        report = report_dict(run, started) if len(run.results) == len(run.scenarios) else None
        if report is None:
            from verifier.matrix.results import ScenarioResult
            for s in run.scenarios:
                run.results.setdefault(s.index, ScenarioResult(scenario=s, status="not-run",
                                                               error="not run: the matrix was interrupted"))
            report = report_dict(run, started)
        for path in _write_outputs(report, run.run_dir, json_path, junit_path, html_path, console):
            _say(console, f"wrote {path}")
    quiet = getattr(console, "quiet", False)
    lines = summary_lines(report)
    click.echo("\n".join(lines[:1] if quiet else lines))
    if code == 130:
        _error("interrupted; every QEMU was stopped, the partial report is written")
    return code


# -- doctor and report merge --------------------------------------------------------------------
def register(cli_group: click.Group) -> None:
    """Add `doctor` and `report merge` to the main group."""

    @cli_group.command("doctor")
    @click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the checks as JSON.")
    def doctor_cmd(json_path):
        """Check this host for what dirtylog needs (QEMU, KVM, cross-compilers, gpgv, disk, memory)
        and say what to install. Exit 0 when `make-and-verify` can run, 2 when not."""
        from verifier import doctor
        checks = doctor.run_checks()
        click.echo(doctor.render(checks), nl=False)
        if json_path:
            json_path.write_text(json.dumps({"schema": "dirtylog-doctor/1", "ready": doctor.exit_code(checks) == 0,
                                             "checks": [c.to_dict() for c in checks]}, indent=2) + "\n")
        sys.exit(doctor.exit_code(checks))

    @cli_group.group("report")
    def report_group():
        """Work with matrix reports."""

    @report_group.command("merge")
    @click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("dirtylog-merged"),
                  show_default=True, help="Directory for the merged matrix-report.json, junit.xml and report.html.")
    @click.option("--no-html", is_flag=True, help="Skip the HTML report.")
    @click.pass_obj
    def merge_cmd(console, dirs, out_dir, no_html):
        """Merge the matrix reports of shards (run directories of `verify --matrix --shard I/N`)
        into one JSON, JUnit and HTML report. Exits like the matrix would have: 0, 1, 3 (also when a
        scenario of the matrix is in no shard), 130."""
        from verifier.reports.merge import merge, merged_exit_code
        try:
            report = merge(list(dirs))
        except InputError as exc:
            raise click.UsageError(str(exc)) from None
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in _write_outputs(report, out_dir, None, None, None if no_html else out_dir / REPORT_HTML, console):
            _say(console, f"wrote {path}")
        lines = summary_lines(report)
        click.echo("\n".join(lines[:1] if getattr(console, "quiet", False) else lines))
        sys.exit(merged_exit_code(report))


# -- standalone: `python -m dirtylog.cli_matrix ...` (before `verify --matrix` is wired in) --------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def _standalone(ctx, quiet):
    """Matrices without the main CLI: `run`, `doctor`, `report merge`."""
    ctx.obj = Console(quiet=quiet)


@_standalone.command("run")
@click.argument("matrix_file", type=click.Path(path_type=Path))
@click.option("--artifacts", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--jobs", type=int, default=1, show_default=True)
@click.option("--shard", metavar="I/N")
@click.option("--run-dir", type=click.Path(path_type=Path))
@click.option("--json", "json_path", type=click.Path(path_type=Path))
@click.option("--junit", "junit_path", type=click.Path(path_type=Path))
@click.option("--html", "html_path", type=click.Path(path_type=Path))
@click.option("--scenario", "select", multiple=True, metavar="GLOB")
@click.pass_obj
def _run_cmd(console, matrix_file, artifacts, jobs, shard, run_dir, json_path, junit_path, html_path, select):
    """Same as `dirtylog verify --matrix MATRIX_FILE`."""
    sys.exit(run_matrix(matrix_file, jobs, shard, artifacts, run_dir, json_path, junit_path, html_path, console,
                        select))


register(_standalone)

if __name__ == "__main__":  # pragma: no cover
    run_main(_standalone)
