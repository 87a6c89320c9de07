"""Matrix reports: JUnit XML, the self-contained HTML report (rendered in headless Chromium),
merging shards, the documented schema, and `doctor`."""

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from verifier import doctor
from verifier.reports import html as html_report
from verifier.reports import junit
from verifier.errors import InputError
from verifier.matrix.spec import MATRIX_SCHEMA
from verifier.matrix.results import build_report
from verifier.reports.merge import merge, merged_exit_code

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# -- a synthetic matrix report with every kind of outcome ----------------------------------------
def _trial(tdir: Path, index: int, verdict: str, diffs: list | None = None, error: str | None = None) -> dict:
    tdir.mkdir(parents=True, exist_ok=True)
    with open(tdir / "timeline.jsonl", "w") as f:
        remaining = 400e6
        for i in range(40):
            sync = 1 + i // 8
            remaining = max(0.0, remaining - 11e6)
            f.write(json.dumps({"t": round(i * 0.1, 3), "status": "active" if i < 39 else "completed",
                                "ram": {"remaining": int(remaining), "transferred": int(i * 1.2e6),
                                        "dirty-pages-rate": 300 * (i % 8), "dirty-sync-count": sync}}) + "\n")
    diffs = diffs or []
    t = {"index": index, "directory": str(tdir), "verdict": verdict, "error": error,
         "error_exit_code": 3 if error else None,
         "migration": {} if error else {"total_time_ms": 3900, "downtime_ms": 12, "dirty_sync_count": 5,
                                        "transferred_bytes": 46_800_000},
         "parameter_changes": [{"t": 0.001, "max-bandwidth": 50_000_000}, {"t": 0.002, "downtime-limit": 1},
                               {"t": 3.2, "max-bandwidth": 107374182400}, {"t": 3.2, "downtime-limit": 50}],
         "compare": {} if error else {"page_count": 65536, "diff_count": sum(d["pages"] for d in diffs),
                                      "ram_base": "0x40000000",
                                      "diagnosis_counts": {d["diagnosis"]: d["pages"] for d in diffs}},
         "differences": diffs, "destination_invariant": [], "warnings": [],
         "timings": {"boot_s": 4.0, "migration_s": 3.9, "total_s": 9.5}, "resume": {"ok": True, "detail": "ok"}}
    return t


STALE = {"diagnosis": "stale", "start": "0x40280000", "end": "0x40284fff", "pages": 5,
         "text": "0x40280000-0x40284fff  5 pages  stale  instance 3 pages 45-49  dst gen 378 < src gen 386 (lag 8)"}
OTHER = {"diagnosis": "not-dirtyram", "start": "0x4f000000", "end": "0x4f000fff", "pages": 1,
         "text": "0x4f000000-0x4f000fff  1 page  not-dirtyram  first diff at +0x0"}


def _scenario(index, name, status, trials=(), wanted=1, error=None, run_dir=None):
    report = None
    if trials:
        report = {"schema": "dirtylog-report/1", "verdict": status, "command": f"dirtylog verify --run-dir {name}",
                  "run_dir": str(run_dir) if run_dir else "", "qemu": {"version": "7.2.22", "path": "/usr/bin/qemu-system-arm"},
                  "machine": "virt", "capture": "backing-file", "interrupted": status == "interrupted",
                  "artifacts": {"files": {"kernel": {"path": "art/zImage", "sha256": "ab" * 32}}},
                  "trials": list(trials)}
    return {"name": name, "index": index, "params": {"trials": wanted}, "status": status, "error": error,
            "command": f"dirtylog verify --run-dir {name}", "wall_s": 10.0, "report": report,
            "run_dir": str(run_dir) if run_dir else None}


@pytest.fixture
def matrix_report(tmp_path) -> dict:
    r = tmp_path / "run"
    scenarios = [
        _scenario(0, "ok[smp=1]", "pass", [_trial(r / "000-ok" / "trial-01", 1, "pass")], run_dir=r / "000-ok"),
        _scenario(1, "lossy[smp=2]", "fail", [_trial(r / "001-lossy" / "trial-01", 1, "fail", [STALE, OTHER]),
                                               _trial(r / "001-lossy" / "trial-02", 2, "pass")], wanted=2,
                  run_dir=r / "001-lossy"),
        _scenario(2, "broken", "error", [_trial(r / "002-broken" / "trial-01", 1, "error",
                                                error="migration did not converge within 2 s\x07")], wanted=3,
                  error="migration did not converge within 2 s", run_dir=r / "002-broken"),
        _scenario(3, "crashed-early", "error", error="source QEMU: exited with 1"),
        _scenario(4, "later", "not-run", error="not run: the matrix was interrupted"),
    ]
    return build_report({"file": "m.toml", "sha256": "00" * 32, "scenario_names": [s["name"] for s in scenarios]},
                        scenarios, shard_spec=None, jobs=2, host={"cores": 2}, started="2026-11-25T21:00:00+00:00",
                        command="dirtylog verify --matrix m.toml", run_dir=r)


# -- JUnit --------------------------------------------------------------------------------------
def test_junit_one_testcase_per_trial_with_failures_errors_and_skips(matrix_report, tmp_path):
    from junitparser import Error, Failure, JUnitXml, Skipped
    path = junit.write(matrix_report, tmp_path / "junit.xml")
    xml = JUnitXml.fromfile(str(path))
    cases = {(c.classname, c.name): c for suite in xml for c in suite}
    assert sorted(cases) == sorted([
        ("ok[smp=1]", "trial-1"), ("lossy[smp=2]", "trial-1"), ("lossy[smp=2]", "trial-2"),
        ("broken", "trial-1"), ("broken", "trial-2"), ("broken", "trial-3"),
        ("crashed-early", "trial-1"), ("later", "trial-1")])

    def kinds(case):
        return [type(r).__name__ for r in case.result]
    assert kinds(cases[("ok[smp=1]", "trial-1")]) == []
    failure = cases[("lossy[smp=2]", "trial-1")].result[0]
    assert isinstance(failure, Failure)
    assert failure.message == "6 of 65536 pages differ (5 stale, 1 not-dirtyram)"
    assert "0x40280000-0x40284fff  5 pages  stale" in failure.text
    assert isinstance(cases[("broken", "trial-1")].result[0], Error)
    assert "did not converge" in cases[("broken", "trial-1")].result[0].message
    assert all(isinstance(cases[("broken", f"trial-{i}")].result[0], Skipped) for i in (2, 3))
    assert isinstance(cases[("crashed-early", "trial-1")].result[0], Error)
    assert isinstance(cases[("later", "trial-1")].result[0], Skipped)
    suite = next(iter(xml))
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (8, 1, 2, 3)
    assert "\x07" not in path.read_text()  # control characters are not valid XML


# -- HTML ---------------------------------------------------------------------------------------
def test_html_is_self_contained_and_has_every_plot(matrix_report, tmp_path):
    path = html_report.write(matrix_report, tmp_path / "report.html")
    text = path.read_text()
    assert not re.search(r"""(src|href)=["'](https?:|file:|//)""", text)  # nothing fetched from outside
    imgs = re.findall(r'<img class="plot (timeline|memmap)"[^>]*src="data:image/png;base64,([^"]+)"', text)
    # Trials with a timeline: ok 1, lossy 2, broken 1; a memory map only where pages differ: 1.
    assert [k for k, _ in imgs].count("timeline") == 4
    assert [k for k, _ in imgs].count("memmap") == 1
    assert text.count("memory map: all 65536 pages identical") == 2  # the two PASS trials, one line each
    # A page for people: no cell holds a raw JSON object; the three verdicts side by side.
    assert not re.search(r"<td>(<code>)?\{&quot;", text)
    assert text.count('<table class="checks">') == 3
    assert '<td class="bad">memory: 6 pages differ</td>' in text
    assert "<th>trials</th><td>total 4, passed 2, failed 1, errors 1</td>" in text
    for _, data in imgs:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dirtylog verify --run-dir lossy[smp=2]" in text  # the reproducer
    assert "ab" * 32 in text  # artifact hashes
    for name in ("ok[smp=1]", "crashed-early", "later"):
        assert name in text


def test_memory_map_colours_the_differing_pages():
    from PIL import Image
    uri = html_report.memory_map(65536, 0x40000000, [STALE, OTHER])
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    colours = {c for _, c in img.getcolors(1 << 20)}
    assert (0xd6, 0x27, 0x28) in colours  # stale
    assert (0x1f, 0x77, 0xb4) in colours  # not-dirtyram


def _chromium(*args, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is needed for the render test (apt-get install chromium; scripts/setup-host.sh)"
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def test_html_renders_in_headless_chromium(matrix_report, tmp_path):
    from PIL import Image, ImageStat
    path = html_report.write(matrix_report, tmp_path / "report.html")
    dom = _chromium("--dump-dom", path.as_uri(), tmp_path=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    srcs = re.findall(r'<img class="plot [^"]*"[^>]*src="(data:image/png;base64,[^"]*)"', dom.stdout)
    assert len(srcs) == 5 and all(len(s) > 1000 for s in srcs)
    assert "Verdicts" in dom.stdout and "lossy[smp=2]" in dom.stdout
    shot = tmp_path / "shot.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1200,3000", path.as_uri(), tmp_path=tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 3000)
    colours = img.getcolors(1 << 24)
    assert len(colours) > 200, "the screenshot is (nearly) blank"
    assert max(ImageStat.Stat(img).stddev) > 20
    # The plot colours made it to the screen: matplotlib's red and blue lines of the timeline.
    px = {c for _, c in colours}
    assert (0xd6, 0x27, 0x28) in px and (0x1f, 0x77, 0xb4) in px


# -- merge --------------------------------------------------------------------------------------
def _shard_report(tmp_path, name, scenarios, sha="00" * 32, names=("a", "b", "c"), shard=(1, 2)):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    r = build_report({"file": "m.toml", "sha256": sha, "scenario_names": list(names)}, scenarios,
                     shard_spec=shard, jobs=1, host=None, started="2026-11-25T21:00:00+00:00", command="x",
                     run_dir="/elsewhere/" + name)
    (d / "matrix-report.json").write_text(json.dumps(r))
    return d


def test_merge_combines_shards_and_says_what_is_missing(tmp_path):
    tdir = tmp_path / "s2" / "001-b" / "trial-01"
    a = _shard_report(tmp_path, "s1", [_scenario(0, "a", "pass")])
    b = _shard_report(tmp_path, "s2", [_scenario(1, "b", "fail", [_trial(tdir, 1, "fail", [STALE])],
                                                 run_dir=Path("/elsewhere/s2/001-b"))], shard=(2, 2))
    # The trial directory recorded on the CI machine is found again under the downloaded shard.
    raw = json.loads((b / "matrix-report.json").read_text())
    raw["scenarios"][0]["report"]["trials"][0]["directory"] = "/elsewhere/s2/001-b/trial-01"
    (b / "matrix-report.json").write_text(json.dumps(raw))
    m = merge([a, b])
    assert m["schema"] == MATRIX_SCHEMA and m["shard"] is None
    assert [s["name"] for s in m["scenarios"]] == ["a", "b"]
    assert m["missing"] == ["c"]
    assert (m["exit_code"], m["verdict"], merged_exit_code(m)) == (3, "error", 3)
    b_sc = m["scenarios"][1]
    assert b_sc["original_run_dir"] == "/elsewhere/s2/001-b"
    assert b_sc["report"]["trials"][0]["directory"] == str(tdir)
    assert "<img" in html_report.render(m)
    c = _shard_report(tmp_path, "s3", [_scenario(2, "c", "pass")])
    full = merge([a, b, c])
    assert (full["missing"], full["exit_code"], full["verdict"]) == ([], 1, "fail")


def test_merge_refuses_different_matrices_and_duplicates(tmp_path):
    a = _shard_report(tmp_path, "s1", [_scenario(0, "a", "pass")])
    other = _shard_report(tmp_path, "s2", [_scenario(1, "b", "pass")], sha="11" * 32)
    with pytest.raises(InputError, match="different matrix files"):
        merge([a, other])
    with pytest.raises(InputError, match="in both"):
        merge([a, a])
    with pytest.raises(InputError, match="no matrix-report.json"):
        merge([tmp_path])


# -- schema documentation -------------------------------------------------------------------------
def test_every_report_field_is_documented(matrix_report):
    from dataclasses import fields
    from verifier.matrix.results import ScenarioResult
    from verifier.reports.report import RunReport, TrialResult
    from verifier.run.verify import VerifyOptions
    doc = (REPO / "docs" / "report-schema.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9-]+)`", doc))
    run_keys = {"schema", "verdict", "exit_code", "summary", "run_dir", "command", "dirtylog", "started", "finished",
                "machine", "capture", "qemu", "options", "notes", "artifacts", "trials"}
    # RunReport.to_dict's keys: checked against the code's own output on a minimal report.
    rr = RunReport(run_dir=Path("/r"), started="s", options={}, artifacts={}, qemu={}, machine="virt",
                   capture="backing-file")
    assert set(rr.to_dict()) == run_keys
    names = (run_keys | {f.name for f in fields(TrialResult)} | {f.name for f in fields(VerifyOptions)}
             | set(matrix_report) | set(matrix_report["summary"]) | set(matrix_report["scenarios"][0])
             | {"merged_from", "missing", "shard_counts", "original_run_dir"})
    assert names - documented == set()
    assert "`dirtylog-matrix/1`" in doc and "`dirtylog-report/1`" in doc
    del ScenarioResult


# -- doctor -------------------------------------------------------------------------------------
@pytest.mark.cross
def test_doctor_reports_this_host_ready():
    res = subprocess.run([sys.executable, "-m", "dirtylog.cli_matrix", "doctor"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("qemu-system-arm", "kvm", "container engine", "arm-linux-gnueabihf-gcc", "gpgv",
                 "debian-archive-keyring", "disk", "memory", "huge pages"):
        assert re.search(rf"^\S+\s+{re.escape(name)}\s", res.stdout, re.M), name
    assert "ready for `dirtylog make-and-verify`" in res.stdout


def test_doctor_names_the_packages_to_install(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(doctor.shutil, "which",
                        lambda n: None if n in ("qemu-system-arm", "gpgv", "docker", "podman") else real_which(n))
    checks = doctor.run_checks()
    assert doctor.exit_code(checks) == 2
    text = doctor.render(checks)
    assert re.search(r"^MISSING qemu-system-arm .*not on PATH", text, re.M)
    assert "install: apt-get install qemu-system-arm" in text
    assert text.rstrip().splitlines()[-1].startswith("not ready for `dirtylog make-and-verify`: apt-get install -y")
    assert "gpgv" in text.rstrip().splitlines()[-1] and "qemu-system-arm" in text.rstrip().splitlines()[-1]
    assert "neither docker nor podman" in text


def test_memory_map_by_provenance_colours_where_each_page_was_lost():
    from PIL import Image
    lost = dict(STALE, provenance={"classes": {"not-resent": 5}, "text": "..."})
    flipped = dict(OTHER, provenance={"classes": {"corrupt-in-stream": 1}, "text": "..."})
    uri = html_report.memory_map(65536, 0x40000000, [lost, flipped], by="provenance")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    colours = {c for _, c in img.getcolors(1 << 20)}
    assert (0xd6, 0x27, 0x28) in colours  # not-resent
    assert (0x94, 0x67, 0xbd) in colours  # corrupt-in-stream
    assert (0xe6, 0xe6, 0xe6) in colours  # identical pages
    assert html_report.provenance_class(OTHER) == "no stream evidence"


def test_html_adds_the_map_by_provenance_when_the_stream_says_where(matrix_report, tmp_path):
    lossy = next(s for s in matrix_report["scenarios"] if s["name"] == "lossy[smp=2]")
    for d in lossy["report"]["trials"][0]["differences"]:
        d["provenance"] = {"classes": {"not-resent": d["pages"]}, "text": "not re-sent after a write"}
    text = html_report.write(matrix_report, tmp_path / "report.html").read_text()
    imgs = re.findall(r'<img class="plot (memmap|memmap-provenance)"[^>]*src="data:image/png;base64,([^"]+)"', text)
    assert [k for k, _ in imgs] == ["memmap", "memmap-provenance"]
