"""The design's default path (issue #4): make-and-verify builds (or reuses) Debian's QEMU with
our -savedirtylog patch and captures with it. With QEMU 10.0 the multi-threaded TCG scenario that
Debian's QEMU 7.2 fails (tests/test_e2e.py) passes; with the patched 7.2 it fails again.

CI builds 10.0 only (about 10 minutes on 2 cores, cached afterwards); set
DIRTYLOG_SAVEDIRTYLOG_QEMU=10.0,7.2 to also build and pin the patched 7.2."""

import json
import os

import pytest

from conftest import qemu_processes_under, run_dirtylog

pytestmark = [pytest.mark.e2e, pytest.mark.qemu_build]

VERSIONS = os.environ.get("DIRTYLOG_SAVEDIRTYLOG_QEMU", "10.0").split(",")
SCENARIO = ["--machine", "virt", "--smp", "2", "--max-bandwidth", "50M", "--min-passes", "6"]


EXPECTED = {"10.0": "pass", "7.2": "fail"}


@pytest.mark.parametrize("version,verdict", [(v, EXPECTED[v]) for v in VERSIONS])
def test_make_and_verify_with_the_patched_qemu(tmp_path, version, verdict):
    run_dir = tmp_path / "run"
    res = run_dirtylog("make-and-verify", "--out", tmp_path / "art", "--qemu-version", version, *SCENARIO,
                       "--trials", "2", "--run-dir", run_dir, timeout=3600)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["capture"] == "savedirtylog"
    assert report["qemu"]["version"].startswith(version)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["qemu"]["patched"] is True and manifest["qemu"]["path"] == report["qemu"]["path"]
    assert report["verdict"] == verdict, res.stdout + res.stderr
    assert res.returncode == (0 if verdict == "pass" else 1)
    for t in report["trials"]:
        assert (t["directory"] + "/ram-src.img") in t["images"]["src"]
        assert t["resume"]["ok"] or verdict == "fail"
    assert qemu_processes_under(tmp_path) == []
