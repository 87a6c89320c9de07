"""The stream tap in real verifications: every channel forwarded and parsed, the page ledger, and
the provenance class of each differing page produced by a real migration for every negative
control (the real 7.2 loss is pinned in tests/test_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_dirtylog

pytestmark = pytest.mark.e2e

_PATCHED: list[str] = []


@pytest.fixture
def qemu10(artifacts) -> str:
    """QEMU 10.0 (built or reused from the cache): it loses no dirty pages of its own, so every
    difference is the injected one."""
    if not _PATCHED:
        from builder import qemu_build
        from builder.cache import Cache
        _PATCHED.append(str(qemu_build.build_patched_qemu("10.0", Cache()).qemu_system_arm))
    return _PATCHED[0]


def _verify(artifacts, qemu, run_dir, *args):
    """One trial, --smp 1; the 2014 workloads unless `args` name others (their 50:50:5 instance keeps
    dirtyram pages dirty into the final RAM section, where the stream injections act)."""
    res = run_dirtylog("verify", "--artifacts", artifacts, "--qemu", qemu, "--smp", "1", "--min-passes", "2",
                       "--run-dir", run_dir, *args)
    return res, json.loads((run_dir / "report.json").read_text())


@pytest.mark.parametrize("inject, extra, classes", [
    # a 1024-page instance rewritten without pause keeps dirtyram pages in the final RAM section
    # (a 128-page one every 2 ms left none there in 1 of 3 runs: the injection then has nothing to act on)
    ("stream-flip:3", ["--workload", "512:512:50", "--workload", "1024:1024:1"], {"corrupt-in-stream"}),
    ("stream-drop:3", ["--workload", "512:512:50", "--workload", "1024:1024:1"], {"not-resent", "never-sent"}),
    ("untracked-writes:3", ["--capture", "backing-file"], {"not-resent", "never-sent"}),
    ("corrupt-capture:3", [], {"lost-on-destination"}),
])
def test_each_negative_control_gets_its_provenance_class(artifacts, qemu10, tmp_path, inject, extra, classes):
    res, report = _verify(artifacts, qemu10, tmp_path / "run", "--machine", "virt", "--inject", inject, *extra)
    assert res.returncode == 1, res.stdout + res.stderr
    t = report["trials"][0]
    inj = t["injection"]
    assert (inj["injected"], inj["detected"], inj["missed"], inj["other_differences"]) == (3, 3, [], 0), inj
    prov = t["stream"]["provenance"]
    got = {p["class"] for p in prov["pages"]}
    assert got and got <= classes, prov["counts"]
    assert {p["page"] for p in prov["pages"]} == set(inj["pages"])
    for p in prov["pages"]:
        if p["class"] != "never-sent":
            assert p["ledger"]["channel"] == "main" and p["ledger"]["stream_offset"] > 0
    # every listed range carries its provenance line, and report.txt prints it
    assert all(r.get("provenance") for r in t["differences"])
    text = (tmp_path / "run" / "report.txt").read_text()
    assert t["differences"][0]["provenance"]["text"] in text
    assert "stream: 1 channel (main)" in text


def test_every_channel_is_forwarded_parsed_and_recorded(artifacts, qemu10, tmp_path):
    """vexpress-a15 (1 KiB target pages) with multifd on 4 channels: PASS, five channels parsed,
    each recorded, and `dirtylog stream` reads the recordings."""
    res, report = _verify(artifacts, qemu10, tmp_path / "run", "--machine", "vexpress-a15", "--record-stream",
                          "--workload", "256:64:20",
                          "--capability", "multifd=on", "--parameter", "multifd-channels=4")
    assert res.returncode == 0, res.stdout + res.stderr
    st = report["trials"][0]["stream"]
    assert sorted(c["name"] for c in st["channels"]) == ["main"] + [f"multifd-{i}" for i in range(1, 5)]
    assert st["errors"] == [] and st["page_size"] == 1024
    assert st["ledger"]["pages"] == 256 * 1024 and st["ledger"]["pages_sent"] == 256 * 1024
    assert all(c["parsed"] and c["recorded"] for c in st["channels"])
    files = [c["recorded"] for c in st["channels"]]
    assert sum(Path(f).stat().st_size for f in files) == sum(c["bytes"] for c in st["channels"])
    out = run_dirtylog("stream", *files, "--json", tmp_path / "s.json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "complete" in out.stdout


def test_no_stream_skips_the_tap_and_its_injections_are_refused(artifacts, qemu10, tmp_path):
    res, report = _verify(artifacts, qemu10, tmp_path / "run", "--machine", "virt", "--no-stream",
                          "--workload", "256:64:20")
    assert res.returncode == 0, res.stdout + res.stderr
    assert report["trials"][0]["stream"] == {"skipped": "--no-stream"}
    assert report["options"]["stream"] is False
    bad = run_dirtylog("verify", "--artifacts", artifacts, "--qemu", qemu10, "--no-stream", "--inject", "stream-drop")
    assert bad.returncode == 2 and "cannot be combined with --no-stream" in bad.stderr.strip().splitlines()[-1]
