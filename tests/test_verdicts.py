"""The verdict separates memory, CPU state and liveness; known findings are recognised, the rest
says "not a known finding" and where the evidence is. Pure logic: no QEMU."""

from __future__ import annotations

from pathlib import Path

from verifier.analysis import findings
from verifier.reports import junit
from verifier.reports.report import RunReport, TrialResult, checks

SECURE_DIFFS = [{"vcpu": v, "register": r, "src": "6a400080", "dst": "00000000"}
                for v in (0, 1) for r in ("TTBR1_S", "TPIDRPRW_S")] + \
               [{"vcpu": 0, "register": "DACR_S", "src": "fdffffff", "dst": "00000000"}]
CTX = findings.Context(machine="vexpress-a15", accel="tcg", qemu_version="10.0.13", machine_opts="secure=on", smp=2)


def _trial(tmp_path: Path, diff_count=0, cpu=None, resume_ok=True, verdict=None) -> TrialResult:
    t = TrialResult(index=1, directory=tmp_path / "trial-01")
    t.compare = {"diff_count": diff_count, "page_count": 65536}
    t.cpu_state = cpu if cpu is not None else {"identical": True, "differences": [], "allowed": [],
                                                "registers_compared": 1568}
    t.resume = {"ok": resume_ok, "detail": "ok" if resume_ok else "no answer (status running); vCPU 0 at pc 0xffff000c"}
    bad = diff_count or not t.cpu_state.get("identical", True) or not resume_ok
    t.verdict = verdict or ("fail" if bad else "pass")
    return t


def _report(tmp_path: Path, *trials: TrialResult) -> RunReport:
    r = RunReport(run_dir=tmp_path, started="x", options={"smp": 2, "mem_mb": 256, "accel": "tcg",
                                                          "workloads": ["50:50:5"], "max_bandwidth": None,
                                                          "min_passes": 4},
                  artifacts={}, qemu={"version": "10.0.13", "path": "qemu"}, machine="vexpress-a15",
                  capture="savedirtylog")
    r.trials = list(trials)
    return r


def test_three_checks_each_say_what_they_found(tmp_path):
    c = checks(_trial(tmp_path, cpu={"identical": False, "differences": SECURE_DIFFS}, resume_ok=False))
    assert c["memory"] == {"ok": True, "text": "memory identical"}
    assert c["cpu_state"]["ok"] is False
    assert c["cpu_state"]["text"] == ("CPU state: 5 register values differ on 2 vCPUs "
                                      "(DACR_S, TPIDRPRW_S, TTBR1_S)")
    assert c["liveness"] == {"ok": False, "text": "guest did not run after resume"}
    skipped = _trial(tmp_path, cpu={"skipped": "--no-cpu-state"})
    assert checks(skipped)["cpu_state"] == {"ok": None, "text": "CPU state not compared (--no-cpu-state)"}
    assert skipped.verdict == "pass"


def test_first_line_names_what_failed_first(tmp_path):
    t = _trial(tmp_path, cpu={"identical": False, "differences": SECURE_DIFFS})
    first = _report(tmp_path, t).render_text().splitlines()[0]
    assert first.startswith("dirtylog verify: FAIL  (0 passed, 1 failed, 0 errors of 1 trials): CPU state: 5 ")
    assert first.endswith("; memory identical; guest ran after resume")
    ok = _report(tmp_path, _trial(tmp_path)).render_text().splitlines()[0]
    assert ok.endswith(": memory identical; CPU state identical; guest ran after resume")
    many = _report(tmp_path, _trial(tmp_path), _trial(tmp_path, diff_count=3)).render_text().splitlines()[0]
    assert many.endswith(": memory differs in 1 of 2 trials")


def test_the_report_lists_every_differing_register_with_both_values(tmp_path):
    t = _trial(tmp_path, cpu={"identical": False, "differences": SECURE_DIFFS})
    text = _report(tmp_path, t).render_text()
    assert "    vCPU 0 TTBR1_S: src 0x8000406a dst 0x00000000" in text
    assert "    vCPU 1 TPIDRPRW_S: src 0x8000406a dst 0x00000000" in text
    assert t.to_dict()["checks"]["cpu_state"]["ok"] is False


def test_secure_banks_zero_on_the_destination_are_the_known_finding(tmp_path):
    t = _trial(tmp_path, cpu={"identical": False, "differences": SECURE_DIFFS})
    t.known_findings = findings.match(t, CTX)
    assert [f["id"] for f in t.known_findings] == ["arm-secure-cp15-banks-not-migrated"]
    text = _report(tmp_path, t).render_text()
    assert "known finding arm-secure-cp15-banks-not-migrated: " in text and "GitLab #467" in text
    assert "workaround: --machine-opts secure=off" in text
    assert "not a known finding" not in text
    case = junit.cases({"name": "s", "index": 0, "status": "fail", "params": {},
                        "report": {"trials": [t.to_dict()]}})[0]
    assert case["outcome"] == "failure"
    assert "CPU state: 5 register values differ (DACR_S, TPIDRPRW_S, TTBR1_S)" in case["message"]
    assert "known finding arm-secure-cp15-banks-not-migrated" in case["message"]
    assert "vCPU 0 DACR_S: src 0xfffffffd dst 0x00000000" in case["text"]


def test_a_register_that_differs_otherwise_is_not_a_known_finding(tmp_path):
    # A Non-secure register that arrives with another value, not zero: nothing known explains it.
    diffs = [{"vcpu": 0, "register": "SCTLR", "src": "7d8c5710", "dst": "7d8c5711"}]
    t = _trial(tmp_path, cpu={"identical": False, "differences": diffs})
    t.known_findings = findings.match(t, CTX)
    assert t.known_findings == []
    text = _report(tmp_path, t).render_text()
    assert f"  not a known finding; the evidence is in {tmp_path / 'trial-01'}" in text
    case = junit.cases({"name": "s", "index": 0, "status": "fail", "params": {},
                        "report": {"trials": [t.to_dict()]}})[0]
    assert "not a known finding; the evidence is in" in case["text"]
    # The same registers zero on the destination with secure=off asked for: not the CP15 finding.
    z = _trial(tmp_path, cpu={"identical": False, "differences": SECURE_DIFFS})
    assert findings.match(z, findings.Context("vexpress-a15", "tcg", "10.0.13", "secure=off", 2)) == []


def test_qemu72_lost_kernel_pages_are_the_known_lost_dirty_pages(tmp_path):
    """Recorded on Debian's 7.2 with xbzrle (test_e2e, 1 of 3 runs): 6 not-dirtyram pages differ,
    the resumed guest oopses. The same QEMU bug as lost dirtyram generations, so the same finding;
    on QEMU 10 such a FAIL is not a known finding."""
    t = _trial(tmp_path, diff_count=6, resume_ok=False)
    t.compare["diagnosis_counts"] = {"not-dirtyram": 6}
    ctx72 = findings.Context(machine="virt", accel="tcg", qemu_version="7.2.22", machine_opts="", smp=1)
    assert [f["id"] for f in findings.match(t, ctx72)] == ["qemu72-tcg-lost-dirty-pages"]
    ctx10 = findings.Context(machine="virt", accel="tcg", qemu_version="10.0.13", machine_opts="", smp=1)
    assert findings.match(t, ctx10) == []
