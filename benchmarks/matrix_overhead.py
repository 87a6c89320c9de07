"""What dirtylog adds around QEMU for a matrix, and what --jobs 2 buys.

    python benchmarks/matrix_overhead.py --artifacts artifacts [--matrix matrices/smoke.toml] [--repeat 2]

Runs the matrix with --jobs 1 and --jobs 2 (real QEMUs, `python -m dirtylog.cli_matrix run`),
then, from the scenario reports' timings:

- QEMU time: per trial `boot_s` (start of both QEMUs to the guest's readiness marker) +
  `migration_s` (migrate command to completion): what QEMU itself needs;
- dirtylog's overhead = wall time of the whole --jobs 1 command - sum of QEMU time, split into
  capture, compare, the rest of each trial (settle, resume check, QEMU shutdown) and what lies
  outside the trials (Python start, matrix parsing, artifact hashing, QEMU probing, reports);
- speed-up = wall(--jobs 1) / wall(--jobs 2).

The matrix scheduler gives a running scenario smp + 1 cores, so on a 2-core host --jobs 2 runs
smp-1 scenarios one after the other (speed-up ~1). `--cores 4` pretends the host has 4 cores
(DIRTYLOG_MATRIX_CORES) to measure what running them at once would give; verdicts may then change
(two smp-1 migrations at once on 2 cores lost dirty pages in 2 of 13 runs).

Prints a table and a JSON line; exits 1 if a run did not pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(matrix: Path, artifacts: Path, jobs: int, run_dir: Path, cores: int | None = None) -> tuple[float, dict, int]:
    env = dict(os.environ)
    if cores:
        env["DIRTYLOG_MATRIX_CORES"] = str(cores)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "dirtylog.cli_matrix", "run", str(matrix), "--artifacts",
                          str(artifacts), "--jobs", str(jobs), "--run-dir", str(run_dir)],
                         cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    report = json.loads((run_dir / "matrix-report.json").read_text())
    if res.returncode != 0:
        print(f"--jobs {jobs}: exit {res.returncode}, run directory {run_dir}\n{res.stdout}", file=sys.stderr)
    return wall, report, res.returncode


def breakdown(wall: float, report: dict) -> dict:
    trials = [t for s in report["scenarios"] if s.get("report") for t in s["report"]["trials"]]
    tm = [t.get("timings") or {} for t in trials]
    boot = sum(t.get("boot_s", 0) for t in tm)
    mig = sum(t.get("migration_s", 0) for t in tm)
    cap = sum(t.get("capture_s", 0) for t in tm)
    cmp_ = sum(t.get("compare_s", 0) for t in tm)
    total = sum(t.get("total_s", 0) for t in tm)
    return {"wall_s": round(wall, 2), "trials": len(trials), "qemu_boot_s": round(boot, 2),
            "qemu_migration_s": round(mig, 2), "overhead_s": round(wall - boot - mig, 2),
            "capture_s": round(cap, 2), "compare_s": round(cmp_, 2),
            "rest_of_trials_s": round(total - boot - mig - cap - cmp_, 2),
            "outside_trials_s": round(wall - total, 2),
            "overhead_pct_of_wall": round(100 * (wall - boot - mig) / wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    ap.add_argument("--matrix", type=Path, default=REPO / "matrices" / "smoke.toml")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each --jobs value (the best is kept)")
    ap.add_argument("--cores", type=int, help="for --jobs 2, pretend the host has this many cores")
    ap.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary directory)")
    args = ap.parse_args()
    best: dict[int, tuple[float, dict]] = {}
    ok = True
    with tempfile.TemporaryDirectory(prefix="dirtylog-bench-") as tmp:
        tmp = args.keep or tmp
        for i in range(args.repeat):
            for jobs in (1, 2):
                wall, report, rc = run(args.matrix.resolve(), args.artifacts.resolve(), jobs,
                                       Path(tmp) / f"j{jobs}-{i}", args.cores if jobs == 2 else None)
                ok &= rc == 0
                if jobs not in best or wall < best[jobs][0]:
                    best[jobs] = (wall, report)
    one, two = breakdown(*best[1]), breakdown(*best[2])
    speedup = round(one["wall_s"] / two["wall_s"], 2)
    print(f"matrix {args.matrix} ({one['trials']} trials), best of {args.repeat}")
    print(f"{'':28}{'--jobs 1':>10}{'--jobs 2':>10}")
    for key in ("wall_s", "qemu_boot_s", "qemu_migration_s", "overhead_s", "capture_s", "compare_s",
                "rest_of_trials_s", "outside_trials_s", "overhead_pct_of_wall"):
        # With 2 jobs the trials overlap: sums of their timings exceed the wall time, so only the
        # wall time (and the per-trial figures, slower when two guests share the cores) mean something.
        shown = two[key] if key in ("wall_s", "qemu_boot_s", "qemu_migration_s", "capture_s", "compare_s") else "-"
        print(f"{key:28}{one[key]:>10}{shown:>10}")
    print(f"speed-up of --jobs 2: {speedup}x" + (f" (host cores taken as {args.cores})" if args.cores else ""))
    print(json.dumps({"matrix": str(args.matrix), "cores": args.cores, "jobs1": one, "jobs2": two,
                      "speedup": speedup}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
