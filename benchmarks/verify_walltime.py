#!/usr/bin/env python3
"""Wall time of one verification per machine, accelerator and migration mode (256 MiB guest).

Runs the real CLI once per configuration and prints total wall time plus the phases the report
records (boot, migration, capture, compare). Verdicts are printed too: on Debian's QEMU 7.2 some
configurations FAIL because that QEMU loses dirty pages.

    python benchmarks/verify_walltime.py --artifacts artifacts [--qemu PATH] [--only virt-tcg-precopy,...]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "vexpress-a15-tcg-precopy": ["--machine", "vexpress-a15"],
    "virt-tcg-single-precopy": ["--machine", "virt", "--smp", "1"],
    "virt-tcg-multi-precopy": ["--machine", "virt", "--smp", "2", "--tcg-thread", "multi"],
    "virt-tcg-multifd": ["--machine", "virt", "--smp", "1", "--capability", "multifd=on"],
    "virt-tcg-xbzrle": ["--machine", "virt", "--smp", "1", "--capability", "xbzrle=on"],
    "virt-tcg-postcopy": ["--machine", "virt", "--smp", "1", "--postcopy", "--capture", "pmemsave",
                          "--min-passes", "1", "--max-bandwidth", "20M"],
    "virt-tcg-pmemsave": ["--machine", "virt", "--smp", "1", "--capture", "pmemsave"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--qemu")
    ap.add_argument("--only", help="comma-separated configuration names")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(CONFIGS)
    print(f"{'configuration':28} {'verdict':8} {'wall s':>7} {'boot':>6} {'migr':>6} {'capt':>6} {'cmp':>6}")
    with tempfile.TemporaryDirectory(prefix="walltime-", dir=".") as tmp:
        for name in names:
            run_dir = Path(tmp) / name
            cmd = [sys.executable, "-m", "dirtylog.cli", "-q", "verify", "--artifacts", a.artifacts,
                   *CONFIGS[name], "--run-dir", str(run_dir), "--delete-images"]
            if a.qemu:
                cmd += ["--qemu", a.qemu]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.monotonic() - t0
            try:
                report = json.loads((run_dir / "report.json").read_text())
            except OSError:
                print(f"{name:28} {'error':8} {wall:7.1f}  {proc.stderr.strip().splitlines()[-1]}")
                continue
            t = report["trials"][0]["timings"]
            print(f"{name:28} {report['verdict']:8} {wall:7.1f} {t.get('boot_s', 0):6.1f} "
                  f"{t.get('migration_s', 0):6.1f} {t.get('capture_s', 0):6.2f} {t.get('compare_s', 0):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
