"""Merging the matrix reports of shards (`dirtylog verify --matrix F --shard I/N`) into one.

Each input is a shard's run directory (holding matrix-report.json) or the JSON file itself. All
inputs must come from the same matrix file (same sha256); a scenario may appear only once. The
merged report has `shard: null`, `merged_from` (one entry per input) and `missing` (scenarios of
the matrix that no input ran: the merged verdict is then "error", exit 3). Run directories that
moved (CI artifacts downloaded elsewhere) are found relative to the input directory; the original
path is kept as `original_run_dir`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from verifier.errors import InputError
from verifier.matrix.spec import MATRIX_SCHEMA
from verifier.matrix.results import build_report, matrix_exit_code, matrix_verdict

REPORT_NAME = "matrix-report.json"


def load(path: Path) -> tuple[dict, Path]:
    """(report, its directory) from a run directory or a matrix-report JSON file."""
    path = Path(path)
    file = path / REPORT_NAME if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{path}: no {REPORT_NAME} (is it a `dirtylog verify --matrix` run directory?)")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{file}: not a JSON matrix report: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != MATRIX_SCHEMA:
        raise InputError(f"{file}: schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                         f"expected {MATRIX_SCHEMA}")
    return data, file.parent


def _relocate(sc: dict, old_root: str | None, new_root: Path) -> None:
    rd = sc.get("run_dir")
    if not rd or Path(rd).exists() or not old_root:
        return
    try:
        rel = os.path.relpath(rd, old_root)
    except ValueError:
        return
    if rel.startswith(".."):
        return
    moved = new_root / rel
    if not moved.exists():
        return
    sc["original_run_dir"] = rd
    sc["run_dir"] = str(moved)
    rep = sc.get("report")
    if rep:
        rep["run_dir"] = str(moved)
        for t in rep.get("trials") or []:
            d = t.get("directory")
            if d:
                t["directory"] = str(moved / os.path.relpath(d, rd))


def merge(inputs: list[Path]) -> dict:
    if not inputs:
        raise InputError("report merge: give at least one run directory")
    loaded = [load(p) for p in inputs]
    first = loaded[0][0]["matrix"]
    by_name: dict[str, tuple[dict, Path]] = {}
    merged_from = []
    started = []
    for data, base in loaded:
        m = data.get("matrix") or {}
        if m.get("sha256") != first.get("sha256"):
            raise InputError(f"{base}: ran matrix {m.get('file')} (sha256 {str(m.get('sha256'))[:12]}), not "
                             f"{first.get('file')} (sha256 {str(first.get('sha256'))[:12]}): shards of different "
                             "matrix files cannot be merged")
        merged_from.append({"dir": str(base), "shard": data.get("shard"), "verdict": data.get("verdict"),
                            "host": data.get("host"), "run_dir": data.get("run_dir"),
                            "started": data.get("started"), "finished": data.get("finished")})
        started.append(data.get("started") or "")
        for sc in data.get("scenarios") or []:
            if sc["name"] in by_name:
                raise InputError(f"scenario '{sc['name']}' is in both {by_name[sc['name']][1]} and {base}: "
                                 "merge the shards of one run, each once")
            sc = json.loads(json.dumps(sc))
            _relocate(sc, data.get("run_dir"), base)
            by_name[sc["name"]] = (sc, base)
    names = first.get("scenario_names") or []
    missing = [n for n in names if n not in by_name]
    unknown = [n for n in by_name if names and n not in names]
    if unknown:
        raise InputError(f"scenarios {', '.join(unknown)} are not in the matrix the reports name")
    shards = {(d.get("shard") or {}).get("count") for d, _ in loaded}
    report = build_report(first, [sc for sc, _ in by_name.values()], shard_spec=None,
                          jobs=None, host=None, started=min(started) if started else None,
                          command=" ".join(["dirtylog", "report", "merge", *map(str, inputs)]), run_dir=None,
                          extra={"merged_from": merged_from, "missing": missing,
                                 "shard_counts": sorted(c for c in shards if c)})
    if missing and report["exit_code"] in (0, 1):
        report["exit_code"] = 3
        report["verdict"] = matrix_verdict(3)
    finished = [m["finished"] for m in merged_from if m.get("finished")]
    report["finished"] = max(finished) if finished else report["finished"]
    return report


def merged_exit_code(report: dict) -> int:
    code = matrix_exit_code([s["status"] for s in report["scenarios"]], [s.get("exit_code") for s in report["scenarios"]])
    return 3 if report.get("missing") and code in (0, 1) else code
