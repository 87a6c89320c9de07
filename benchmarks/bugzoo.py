#!/usr/bin/env python3
"""Sensitivity to real QEMU defects: every bug-zoo variant built, verified N times, tabulated.

The zoo (builder/patches/bugzoo-10.0/NAME.patch) puts one defect each back into the patched QEMU
10.0: TCG dirty logging, the RAM saver, the multifd transport, the destination's loader, CPU state,
device state. For each defect this script builds the variant (builder.qemu_build.build_zoo_qemu:
incremental, from the patched build's kept tree), runs the scenario most likely to trigger it
`--trials N` times through the real CLI (`dirtylog verify`), and prints one row:

    defect  trials  FAIL  detected  class as expected  first detection  build s

- FAIL: trials whose verdict was fail;
- detected: trials where the check the defect breaks failed (memory, CPU state or device state);
- class as expected: detected trials whose evidence names the defect's class: the provenance class
  of the differing pages (not-resent, never-sent, lost-on-destination, ...), the register, or the
  device field;
- first detection: the trial number of the first detection (1 = the first trial).

Then the unmodified patched QEMU runs every scenario used, N trials each: its FAILs are false alarms.
A defect detected in no trial is a finding, kept in the table as missed.

    .venv/bin/python benchmarks/bugzoo.py --artifacts artifacts [--trials 20] [--only NAME,...]
        [--jobs 2] [--json FILE]

It needs the guest artifacts of `dirtylog build` (armv7), the patched QEMU's build inputs
(downloaded through the shared cache, or already there) and, the first time, about 10 minutes to
build the patched QEMU with its tree kept; each variant then builds in seconds to a minute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VEXPRESS = ["--machine", "vexpress-a15"]  # the 2014 scenario: smp 2, 256 MiB, forced passes
# defect -> (scenario args, the check it must fail, the evidence expected)
SCENARIOS = {
    "final-sync-skipped": (VEXPRESS, "memory", {"classes": {"not-resent", "never-sent"}}),
    "tcg-notdirty-loses-migration-bit": (VEXPRESS, "memory", {"classes": {"not-resent", "never-sent"}}),
    "tlb-not-rearmed-after-sync": (VEXPRESS, "memory", {"classes": {"not-resent", "never-sent"}}),
    "ramblock-last-page-skipped": (VEXPRESS, "memory", {"classes": {"never-sent", "not-resent"}}),
    "multifd-round-tail-dropped": (VEXPRESS + ["--capability", "multifd=on", "--parameter", "multifd-channels=2"],
                                   "memory", {"classes": {"not-resent", "never-sent"}}),
    "dst-zero-page-ignored": (VEXPRESS, "memory", {"classes": {"lost-on-destination"}}),
    "arm-cpreg-cntkctl-not-migrated": (VEXPRESS, "cpu_state", {"register": "CNTKCTL"}),
    "pl011-post-load-masks-interrupts": (VEXPRESS, "device_state", {"field": "pl011/int_enabled"}),
}


def verify(args: list[str], run_dir: Path) -> dict:
    """One `dirtylog verify` (exit 0 or 1: its report; 3: a report whose trials are errors, or none);
    the RAM images are deleted afterwards (a failed trial keeps two of them)."""
    cmd = [sys.executable, "-m", "dirtylog.cli", "-q", "verify", *args, "--run-dir", str(run_dir), "--delete-images"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for img in [*run_dir.glob("trial-*/*.img"), *run_dir.glob("trial-*/*.ram")]:
        img.unlink()
    report = run_dir / "report.json"
    if proc.returncode not in (0, 1, 3) or not report.exists():
        print(f"dirtylog verify {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[-400:]}",
              file=sys.stderr)
        return {"trials": [], "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(report.read_text())


def evidence_ok(trial: dict, check: str, want: dict) -> bool:
    if check == "memory":
        prov = (trial.get("stream") or {}).get("provenance") or {}
        got = set((prov.get("counts") or {}).keys())
        return bool(got) and got <= want["classes"]
    if check == "cpu_state":
        return any(d["register"] == want["register"] for d in trial["cpu_state"].get("differences", []))
    fields = {d["field"] for p in trial["device_state"].get("pairs", {}).values() for d in p["differences"]}
    return want["field"] in fields


def row_for(name: str, binary: str, build_s: float | None, args: list[str], check: str, want: dict,
            trials: int, artifacts: str, tmp: Path) -> dict:
    report = verify(["--artifacts", artifacts, "--qemu", binary, "--trials", str(trials), *args], tmp / name)
    ts = report["trials"]
    if not ts:
        return {"defect": name, "trials": 0, "fail": 0, "errors": trials, "detected": 0, "class_ok": 0,
                "first_detection": None, "build_s": build_s, "check": check, "classes_seen": {},
                "scenario": args, "error": report.get("error")}
    detected = [i + 1 for i, t in enumerate(ts) if (t.get("checks") or {}).get(check, {}).get("ok") is False]
    right = [i for i in detected if evidence_ok(ts[i - 1], check, want)]
    classes: dict[str, int] = {}
    for t in ts:
        for k, n in (((t.get("stream") or {}).get("provenance") or {}).get("counts") or {}).items():
            classes[k] = classes.get(k, 0) + n
    return {"defect": name, "trials": len(ts), "fail": sum(t["verdict"] == "fail" for t in ts),
            "errors": sum(t["verdict"] == "error" for t in ts), "detected": len(detected), "class_ok": len(right),
            "first_detection": detected[0] if detected else None, "build_s": build_s, "check": check,
            "classes_seen": classes, "scenario": args}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--only", help="comma-separated defects (default: all)")
    ap.add_argument("--no-clean", action="store_true", help="skip the unmodified QEMU's false-alarm runs")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from builder import qemu_build
    from builder.cache import Cache
    bugs = qemu_build.zoo_bugs("10.0")
    if a.only:
        unknown = set(a.only.split(",")) - set(bugs)
        if unknown:
            raise SystemExit(f"not in the zoo: {', '.join(sorted(unknown))} (it has {', '.join(bugs)})")
        bugs = [b for b in bugs if b in a.only.split(",")]
    missing = set(bugs) - set(SCENARIOS)
    if missing:
        raise SystemExit(f"no scenario for {', '.join(sorted(missing))}: add it to SCENARIOS")
    cache = Cache()
    quiet = lambda m: print(m, file=sys.stderr)  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory(prefix="bugzoo-") as tmpdir:
        tmp = Path(tmpdir)
        for name in bugs:
            b = qemu_build.build_zoo_qemu("10.0", name, cache, log=quiet)
            args, check, want = SCENARIOS[name]
            rows.append(row_for(name, str(b.qemu_system_arm), None if b.cache_hit else b.build_seconds, args, check,
                                want, a.trials, a.artifacts, tmp))
            print(f"{name}: {rows[-1]['detected']}/{rows[-1]['trials']} detected", file=sys.stderr)
        clean = []
        if not a.no_clean:
            base = qemu_build.build_patched_qemu("10.0", cache, log=quiet)
            for args in sorted({tuple(SCENARIOS[n][0]) for n in bugs}):
                r = row_for("unmodified", str(base.qemu_system_arm), None, list(args), "memory",
                            {"classes": set()}, a.trials, a.artifacts, tmp / f"clean-{len(clean)}")
                clean.append(r)
    print(f"bug zoo of QEMU 10.0, {a.trials} trials per defect")
    print(f"  {'defect':<34} {'trials':>6} {'FAIL':>5} {'detected':>8} {'class ok':>8} {'first':>5} {'build s':>7}")
    for r in rows:
        first = r["first_detection"] if r["first_detection"] else "-"
        build = f"{r['build_s']:.0f}" if r["build_s"] is not None else "cached"
        print(f"  {r['defect']:<34} {r['trials']:>6} {r['fail']:>5} {r['detected']:>8} {r['class_ok']:>8} "
              f"{first:>5} {build:>7}" + ("  MISSED" if not r["detected"] else "")
              + (f"  ({r['errors']} errors)" if r["errors"] else ""))
    for r in clean:
        print(f"  unmodified QEMU, {' '.join(r['scenario'])}: {r['fail']} false alarms in {r['trials']} trials")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "clean": clean}, indent=1) + "\n")
    detected = [r["detected"] / r["trials"] for r in rows if r["trials"]]
    print(f"median detection rate {statistics.median(detected):.2f}" if detected else "no defects run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
