#!/usr/bin/env python3
"""Detection power of dirtylog: injected faults found, and false alarms on clean runs.

For each kind (clean, untracked-writes, corrupt-capture) runs N independent verifications with
the real CLI and prints a table: trials, trials whose verdict was FAIL, injected pages, injected
pages detected at the right address, and other differing pages.

A false alarm only means something on a QEMU that really is correct: Debian 12's QEMU 7.2 loses
dirty pages under TCG whenever a migration takes several passes, so its "clean" row counts its
own bug. Give a correct QEMU with --qemu.

    python benchmarks/sensitivity.py --artifacts artifacts --trials 50 [--qemu PATH] [--machine virt]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run(args, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "dirtylog.cli", "-q", "verify", *args, "--run-dir", str(run_dir), "--delete-images"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"verification failed to run ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return json.loads((run_dir / "report.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--pages", type=int, default=8, help="pages injected per trial")
    ap.add_argument("--qemu", default="qemu-system-arm")
    ap.add_argument("--machine", default="virt")
    ap.add_argument("--smp", default="1")
    ap.add_argument("--kinds", default="clean,untracked-writes,corrupt-capture")
    a = ap.parse_args()
    # untracked writes go through the source's RAM file: capture from the backing files throughout
    base = ["--artifacts", a.artifacts, "--qemu", a.qemu, "--machine", a.machine, "--smp", a.smp,
            "--capture", "backing-file"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="sensitivity-", dir=".") as tmp:
        for kind in a.kinds.split(","):
            stats = {"kind": kind, "trials": 0, "fail": 0, "injected": 0, "detected": 0, "other": 0}
            for i in range(a.trials):
                extra = [] if kind == "clean" else ["--inject", f"{kind}:{a.pages}", "--seed", str(i)]
                report = run(base + extra, Path(tmp) / f"{kind}-{i}")
                trial = report["trials"][0]
                stats["trials"] += 1
                stats["fail"] += trial["verdict"] == "fail"
                inj = trial.get("injection") or {}
                stats["injected"] += inj.get("injected", 0)
                stats["detected"] += inj.get("detected", 0)
                stats["other"] += inj.get("other_differences", trial["compare"].get("diff_count", 0))
                print(f"{kind} {i + 1}/{a.trials}: {trial['verdict']}", file=sys.stderr)
            rows.append(stats)
    qemu = report["qemu"]["version_text"]
    print(f"QEMU: {qemu}; machine {a.machine}, smp {a.smp}, {a.pages} pages injected per trial")
    print(f"{'kind':18} {'trials':>6} {'FAIL':>6} {'injected':>9} {'detected':>9} {'other diff pages':>17}")
    for r in rows:
        print(f"{r['kind']:18} {r['trials']:6} {r['fail']:6} {r['injected']:9} {r['detected']:9} {r['other']:17}")
    missed = sum(r["injected"] - r["detected"] for r in rows)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
