#!/usr/bin/env python3
"""Time the CPU-state oracle (verifier.capture.cpustate) on real migrated guests.

What it adds to a verification (--in-verify): runs `dirtylog verify --trials N` on each machine
(2 vCPUs, the default workload) and prints median and max of the report's
timings.cpu_state_s (both gdbstubs read and compared) against the whole trial.

The stub alone: for a 2-vCPU vexpress-a15 and virt guest (armv7), migrates once, then reads all registers of
all vCPUs through the gdbstub --trials times on both sides (connect + read_all + close) and
prints median and max seconds per trial and side. When gdb-multiarch is installed it also times

    gdb-multiarch -batch -ex 'target remote SOCK' -ex 'thread apply all info all-registers' -ex disconnect

on the same stubs (`disconnect` rather than gdb's default detach at exit: a detach 'D' makes
QEMU resume the stopped VM), and reports the run state afterwards.

    .venv/bin/python benchmarks/cpustate.py --artifacts DIR [--qemu PATH] [--trials 10]
        [--machines vexpress-a15,virt] [--in-verify] [--no-gdb]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import test_cpustate  # noqa: E402
from test_cpustate import guest_args, migrated_pair  # noqa: E402
from verifier.capture.cpustate import GdbStub, compare  # noqa: E402


def time_rsp(sock: Path, trials: int) -> tuple[list[float], dict]:
    times, values = [], {}
    for _ in range(trials):
        t = time.perf_counter()
        with GdbStub(sock) as stub:
            values = stub.read_all()
        times.append(time.perf_counter() - t)
    return times, values


def time_gdb(gdb: str, sock: Path, trials: int) -> tuple[list[float], int]:
    times, lines = [], 0
    for _ in range(trials):
        t = time.perf_counter()
        out = subprocess.run([gdb, "-nx", "-batch", "-ex", "set pagination off",
                              "-ex", f"target remote {sock}",
                              "-ex", "thread apply all info all-registers", "-ex", "disconnect"],
                             capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - t)
        lines = out.stdout.count("\n")
    return times, lines


def fmt(times: list[float]) -> str:
    return f"median {statistics.median(times):.4f} s  max {max(times):.4f} s"


def in_verify(binary: str, artifacts: Path, machine: str, trials: int) -> None:
    with tempfile.TemporaryDirectory(prefix="cpustate-bench-") as d:
        run_dir = Path(d) / "run"
        res = subprocess.run([sys.executable, "-m", "dirtylog.cli", "-q", "verify", "--artifacts", str(artifacts),
                              "--qemu", binary, "--machine", machine, "--smp", "2", "--trials", str(trials),
                              "--delete-images", "--run-dir", str(run_dir)], capture_output=True, text=True,
                             cwd=REPO)
        if not (run_dir / "report.json").is_file():
            print(f"{machine:13s} verify failed (exit {res.returncode}): {res.stderr.strip()[-300:]}")
            return
        report = json.loads((run_dir / "report.json").read_text())
    cpu = [t["timings"]["cpu_state_s"] for t in report["trials"] if "cpu_state_s" in (t.get("timings") or {})]
    total = [t["timings"]["total_s"] for t in report["trials"] if "total_s" in (t.get("timings") or {})]
    regs = {t["cpu_state"].get("registers_compared") for t in report["trials"] if t.get("cpu_state")}
    print(f"{machine:13s} in verify: CPU state {fmt(cpu)} over {len(cpu)} trials "
          f"(trial total median {statistics.median(total):.1f} s; registers compared {sorted(regs)}; "
          f"verdict {report['verdict']}, exit {res.returncode})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qemu", default="qemu-system-arm", help="e.g. the patched QEMU from dirtylog build --qemu patched")
    ap.add_argument("--artifacts", required=True, type=Path, help="a dirtylog build output directory")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--machines", default="vexpress-a15,virt")
    ap.add_argument("--no-gdb", action="store_true")
    ap.add_argument("--in-verify", action="store_true", help="time the check inside `dirtylog verify` trials")
    args = ap.parse_args()
    test_cpustate.ART = args.artifacts
    binary = shutil.which(args.qemu) or args.qemu
    if args.in_verify:
        print(f"QEMU {binary}; dirtylog verify --trials {args.trials} --smp 2 per machine")
        for machine in args.machines.split(","):
            in_verify(binary, args.artifacts.resolve(), machine, args.trials)
        return 0
    gdb = None if args.no_gdb else shutil.which("gdb-multiarch")
    print(f"QEMU {binary}; {args.trials} trials per side; gdb-multiarch: {gdb or 'not installed'}")
    for machine in args.machines.split(","):
        with tempfile.TemporaryDirectory(prefix="cpustate-bench-") as d:
            pair = migrated_pair(binary, guest_args(machine, binary), Path(d))
            try:
                result = {}
                for side in ("src", "dst"):
                    times, values = time_rsp(pair.gdb_sock(side), args.trials)
                    result[side] = values
                    nregs = sum(len(v) for v in values.values())
                    print(f"{machine:13s} {side} RSP client: {fmt(times)}  ({len(values)} vCPUs, {nregs} registers)")
                res = compare(result["src"], result["dst"], "armv7")
                print(f"{machine:13s} compare: identical={res['identical']} "
                      f"differences={len(res['differences'])} compared={res['registers_compared']}")
                if gdb:
                    for side in ("src", "dst"):
                        times, lines = time_gdb(gdb, pair.gdb_sock(side), args.trials)
                        print(f"{machine:13s} {side} gdb-multiarch: {fmt(times)}  ({lines} output lines); "
                              f"run state after: {pair.qmp[side].status()}")
            finally:
                pair.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
