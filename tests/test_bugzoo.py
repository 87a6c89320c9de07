"""The bug zoo (builder/patches/bugzoo-10.0/): QEMU defects put back on purpose, each built
incrementally from the patched QEMU's kept tree, and one of them (the cheapest to build: one TCG
file) caught by a real verification with the expected class. The whole zoo, N trials each, is
benchmarks/bugzoo.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from builder import qemu_build
from builder.errors import BuildInputError
from conftest import run_dirtylog

REPO = Path(__file__).resolve().parent.parent
PINNED = "tcg-notdirty-loses-migration-bit"  # accel/tcg/cputlb.c: one object and the link


def test_every_defect_says_what_it_recreates_and_has_a_scenario():
    bugs = qemu_build.zoo_bugs("10.0")
    assert len(bugs) >= 8, bugs
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bugzoo
    finally:
        sys.path.pop(0)
    assert set(bugs) == set(bugzoo.SCENARIOS)
    for bug in bugs:
        head = qemu_build.zoo_header("10.0", bug)
        assert head.startswith(f"dirtylog bug zoo: {bug}\n"), bug
        for word in ("Re-creates:", "Where:", "Expected:"):
            assert word in head, (bug, word)
        diff = qemu_build.zoo_patch("10.0", bug).read_text().split(head, 1)[1]
        assert diff.count("\n--- a/") == 1 and "dirtylog bug zoo" in diff, bug  # one file, marked in the code
    with pytest.raises(BuildInputError, match=r"--qemu-bug nope: no such defect in the QEMU 10.0 bug zoo \(one of: "):
        qemu_build.zoo_patch("10.0", "nope")
    assert qemu_build.zoo_bugs("7.2") == []


@pytest.mark.build
def test_every_defect_applies_to_the_kept_tree_of_the_patched_build():
    from builder.cache import Cache
    base = qemu_build.build_patched_qemu("10.0", Cache(), need_tree=True)
    src = json.loads((base.directory / "build.json").read_text())["source_tree"]
    for bug in qemu_build.zoo_bugs("10.0"):
        res = subprocess.run(["patch", "-p1", "--dry-run", "--batch", "-i", str(qemu_build.zoo_patch("10.0", bug))],
                             cwd=src, capture_output=True, text=True)
        assert res.returncode == 0, (bug, res.stdout, res.stderr)


@pytest.mark.build
@pytest.mark.e2e
def test_a_zoo_defect_is_built_in_seconds_and_caught_with_its_class(artifacts, tmp_path):
    """TCG's notdirty write path stops marking pages dirty for migration: built from the kept tree,
    recorded in the manifest, and the verification FAILs with the pages classed not re-sent."""
    out = tmp_path / "art"
    res = run_dirtylog("build", "--out", out, "--offline", "--runtime", "host", "--qemu", "patched",
                       "--qemu-bug", PINNED)
    assert res.returncode == 0, res.stderr
    q = json.loads((out / "manifest.json").read_text())["qemu"]
    assert q["bug"] == PINNED and q["patches"][-1] == f"bugzoo-10.0/{PINNED}.patch", q
    build = json.loads((Path(q["path"]).parent.parent / "build.json").read_text())
    assert build["bug"] == PINNED and build["base_cache_key"] != build["cache_key"]
    assert build["build_seconds"] < 120, build["build_seconds"]  # incremental; measured: 4 s here
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", out, "--run-dir", run_dir)  # the manifest's QEMU: the zoo's
    assert res.returncode == 1, res.stdout + res.stderr
    t = json.loads((run_dir / "report.json").read_text())["trials"][0]
    assert t["checks"]["memory"]["ok"] is False and t["compare"]["diff_count"] > 0
    counts = t["stream"]["provenance"]["counts"]
    assert counts and set(counts) <= {"not-resent", "never-sent"}, counts
    assert "not re-sent after a write on the source" in res.stdout
    # bad input: one line, exit 2, nothing built
    for args, msg in ((["--qemu", "patched", "--qemu-bug", "nope"], "no such defect in the QEMU 10.0 bug zoo"),
                      (["--qemu-bug", PINNED], "it needs --qemu patched")):
        bad = run_dirtylog("build", "--out", tmp_path / "bad", "--offline", "--runtime", "host", *args)
        assert bad.returncode == 2 and msg in bad.stderr.strip().splitlines()[-1], bad.stderr
        assert "Traceback" not in bad.stderr
