#!/usr/bin/env python3
"""Wall time of one verification per machine, accelerator and migration mode (256 MiB guest).

Runs the real CLI once per configuration and prints total wall time plus the phases the report
records (boot, migration, capture, compare), the verdict and the number of migration passes.
Configurations that cannot run on this host (KVM without a usable /dev/kvm, an armv7 guest under
KVM on a non-arm64 host) are run anyway: their row shows the one-line error and how long it took
to get it, which is what a user of such a host sees.

Artifacts for each architecture are taken from ARTIFACTS_ROOT/{armv7,aarch64,x86_64}; a missing
set is built first with `dirtylog build --arch ... --runtime host`.

On Debian 12's QEMU 7.2 multi-pass migrations FAIL because that QEMU loses dirty pages under TCG;
give a correct QEMU for the armv7 rows with --qemu-arm (e.g. the patched 10.0 that
`dirtylog build --qemu patched` produces). aarch64 and x86_64 rows use qemu-system-aarch64 and
qemu-system-x86_64 from PATH unless --qemu-aarch64 / --qemu-x86_64 are given.

    python benchmarks/verify_walltime.py --artifacts-root bench-artifacts [--qemu-arm PATH] [--only NAME,...]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (artifacts arch, QEMU family, verify arguments)
CONFIGS = {
    "vexpress-a15 tcg precopy": ("armv7", "arm", ["--machine", "vexpress-a15", "--machine-opts", "secure=off"]),
    "virt tcg-single precopy": ("armv7", "arm", ["--machine", "virt", "--smp", "1"]),
    "virt tcg-multi precopy": ("armv7", "arm", ["--machine", "virt", "--smp", "2", "--tcg-thread", "multi"]),
    "virt tcg multifd": ("armv7", "arm", ["--machine", "virt", "--smp", "1", "--capability", "multifd=on",
                                           "--parameter", "multifd-channels=2"]),
    "virt tcg xbzrle": ("armv7", "arm", ["--machine", "virt", "--smp", "1", "--capability", "xbzrle=on"]),
    "virt tcg auto-converge": ("armv7", "arm", ["--machine", "virt", "--smp", "1",
                                                 "--capability", "auto-converge=on"]),
    "virt tcg postcopy": ("armv7", "arm", ["--machine", "virt", "--smp", "1", "--postcopy",
                                            "--capture", "pmemsave"]),
    "virt tcg capture=pmemsave": ("armv7", "arm", ["--machine", "virt", "--smp", "1", "--capture", "pmemsave"]),
    "virt tcg capture=backing-file": ("armv7", "arm", ["--machine", "virt", "--smp", "1",
                                                        "--capture", "backing-file"]),
    "virt kvm precopy": ("armv7", "arm", ["--machine", "virt", "--smp", "1", "--accel", "kvm"]),
    "virt-aarch64 tcg precopy": ("aarch64", "aarch64", ["--machine", "virt-aarch64", "--smp", "1"]),
    "q35 tcg precopy": ("x86_64", "x86_64", ["--machine", "q35", "--smp", "1"]),
    "q35 kvm precopy": ("x86_64", "x86_64", ["--machine", "q35", "--smp", "1", "--accel", "kvm",
                                              "--boot-timeout", "60"]),
}


def ensure_artifacts(root: Path, arch: str) -> Path:
    out = root / arch
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "dirtylog.cli", "-q", "build", "--arch", arch, "--runtime", "host",
                        "--out", str(out)], check=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts-root", default="bench-artifacts", type=Path)
    ap.add_argument("--qemu-arm", help="qemu-system-arm for the armv7 rows (default: the manifest's or PATH's)")
    ap.add_argument("--qemu-aarch64")
    ap.add_argument("--qemu-x86_64")
    ap.add_argument("--mem", default="256")
    ap.add_argument("--only", help="comma-separated configuration names (as printed)")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s): {', '.join(unknown)}")
    qemus = {"arm": a.qemu_arm, "aarch64": a.qemu_aarch64, "x86_64": a.qemu_x86_64}
    print(f"{'configuration':31} {'verdict':7} {'passes':>6} {'wall s':>7} {'boot':>6} {'migr':>6} "
          f"{'capt':>6} {'cmp':>6}  QEMU")
    with tempfile.TemporaryDirectory(prefix="walltime-", dir=".") as tmp:
        for i, name in enumerate(names):
            arch, family, args = CONFIGS[name]
            run_dir = Path(tmp) / f"run{i}"
            cmd = [sys.executable, "-m", "dirtylog.cli", "-q", "verify",
                   "--artifacts", str(ensure_artifacts(a.artifacts_root, arch)), "--mem", a.mem, *args,
                   "--run-dir", str(run_dir), "--delete-images"]
            if qemus[family]:
                cmd += ["--qemu", qemus[family]]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.monotonic() - t0
            try:
                report = json.loads((run_dir / "report.json").read_text())
                trial = report["trials"][0]
                t = trial["timings"]
            except (OSError, KeyError, IndexError, ValueError):
                msg = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
                print(f"{name:31} {'exit ' + str(proc.returncode):7} {'':>6} {wall:7.1f}  {msg}")
                continue
            if trial.get("error"):
                print(f"{name:31} {'exit ' + str(proc.returncode):7} {'':>6} {wall:7.1f}  {trial['error']}")
                continue
            passes = (trial.get("migration") or {}).get("dirty_sync_count", "")
            print(f"{name:31} {report['verdict']:7} {passes!s:>6} {wall:7.1f} {t.get('boot_s', 0):6.1f} "
                  f"{t.get('migration_s', 0):6.1f} {t.get('capture_s', 0):6.2f} {t.get('compare_s', 0):6.2f}"
                  f"  {report['qemu']['version_text'].removeprefix('QEMU emulator version ')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
