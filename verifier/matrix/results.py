"""A matrix's results: per-scenario results, exit code, verdict, summary and the report (dirtylog-matrix/1)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from verifier.fsutil import atomic_write
from verifier.reports.report import dirtylog_info, now_utc

from verifier.matrix.spec import MATRIX_SCHEMA, Matrix, Scenario


@dataclass
class ScenarioResult:
    scenario: Scenario
    status: str = "not-run"  # pass | fail | expected-fail | unexpected-pass | error | interrupted | not-run
    run_dir: Path | None = None
    error: str | None = None
    exit_code: int | None = None
    wall_s: float | None = None
    report: dict | None = None  # RunReport.to_dict()
    command: str = ""
    expectation: str = ""  # verifier.expect's sentence for an expect = "fail" scenario

    def to_dict(self) -> dict:
        return {
            "name": self.scenario.name,
            "index": self.scenario.index,
            "origin": self.scenario.origin,
            "params": self.scenario.params,
            "estimated_cost_s": self.scenario.cost,
            "status": self.status,
            "exit_code": self.exit_code,
            "error": self.error,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "command": self.command,
            "wall_s": self.wall_s,
            "expectation": self.expectation,
            "report": self.report,
        }


STATUS_EXIT = {"pass": 0, "fail": 1, "expected-fail": 0, "unexpected-pass": 1, "error": 3,
               "interrupted": 130, "not-run": 130}


def matrix_exit_code(statuses: list[str], exit_codes: list[int | None] = ()) -> int:
    """130 if interrupted, else 4 if a scenario hit a bug of dirtylog (its exit code 4), else 3 if
    any infrastructure error, else 1 if any failure, else 0."""
    if any(s in ("interrupted", "not-run") for s in statuses):
        return 130
    if 4 in exit_codes:
        return 4
    if any(s == "error" for s in statuses) or not statuses:
        return 3
    if any(s in ("fail", "unexpected-pass") for s in statuses):
        return 1
    return 0


def matrix_verdict(code: int) -> str:
    return {0: "pass", 1: "fail", 3: "error", 4: "error", 130: "interrupted"}[code]


def summarize(scenarios: list[dict]) -> dict:
    statuses = [s["status"] for s in scenarios]
    trials = [t for s in scenarios if s.get("report") for t in s["report"]["trials"]]
    return {
        "scenarios": len(scenarios),
        "passed": statuses.count("pass"),
        "failed": statuses.count("fail"),
        "expected_failures": statuses.count("expected-fail"),
        "unexpected_passes": statuses.count("unexpected-pass"),
        "errors": statuses.count("error"),
        "interrupted": statuses.count("interrupted"),
        "not_run": statuses.count("not-run"),
        "trials": {"total": len(trials),
                   "passed": sum(t["verdict"] == "pass" for t in trials),
                   "failed": sum(t["verdict"] == "fail" for t in trials),
                   "errors": sum(t["verdict"] == "error" for t in trials)},
    }


def build_report(matrix: Matrix | dict, results: list[dict], *, shard_spec, jobs, host, started,
                 command, run_dir, extra: dict | None = None) -> dict:
    results = sorted(results, key=lambda r: r["index"])
    code = matrix_exit_code([r["status"] for r in results], [r.get("exit_code") for r in results])
    if isinstance(matrix, Matrix):
        mdesc = {"file": str(matrix.path), "sha256": matrix.sha256,
                 "scenario_names": [s.name for s in matrix.scenarios]}
    else:
        mdesc = matrix
    d = {
        "schema": MATRIX_SCHEMA,
        "verdict": matrix_verdict(code),
        "exit_code": code,
        "summary": summarize(results),
        "matrix": mdesc,
        "shard": {"index": shard_spec[0], "count": shard_spec[1]} if shard_spec else None,
        "jobs": jobs,
        "host": host,
        "command": command,
        "dirtylog": dirtylog_info(),
        "run_dir": str(run_dir) if run_dir else None,
        "started": started,
        "finished": now_utc(),
        "scenarios": results,
    }
    if extra:
        d.update(extra)
    return d


def write_json(data: dict, path: Path) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


# -- running ----------------------------------------------------------------------------------

