"""Expected results of matrix scenarios (verifier.analysis.expect): unit tests on report.json-shaped trials,
and the JUnit/exit code they give. The shipped release scenario runs for real in test_matrix."""

import xml.etree.ElementTree as ET

from verifier.reports import junit
from verifier.analysis.expect import EXPECTED_FAIL, UNEXPECTED_PASS, scenario_status, trial_outcome
from verifier.matrix.results import STATUS_EXIT, matrix_exit_code, summarize

XFAIL = {"expect": "fail", "expect_finding": "arm-secure-cp15-banks-not-migrated",
         "expect_registers": ["TTBR1_S", "DACR_S"], "trials": 1}
FINDING = {"id": "arm-secure-cp15-banks-not-migrated", "sentence": "known finding arm-secure-cp15-banks-not-migrated: ..."}


def trial(verdict="fail", registers=("TTBR1_S", "DACR_S", "IFSR_S"), findings=(FINDING,), index=1):
    return {"index": index, "verdict": verdict, "directory": "/run/trial-01",
            "compare": {"diff_count": 0, "page_count": 65536},
            "resume": {"ok": verdict == "pass", "detail": "vCPU 0 at pc 0xffff000c in abt mode"},
            "cpu_state": {"compared": True, "registers_compared": 448,
                          "differences": [{"vcpu": 0, "register": r, "src": "0x8000406a", "dst": "0x0"}
                                          for r in registers]},
            "known_findings": list(findings) if verdict == "fail" else []}


def scenario(t, params=XFAIL):
    status, text = scenario_status(params, t["verdict"], {"trials": [t]})
    return {"name": "vexpress-secure-on", "index": 0, "params": params, "status": status, "expectation": text,
            "command": "dirtylog verify ...", "report": {"trials": [t]}}


def test_a_failure_as_expected_names_the_registers_and_exits_0():
    outcome, text = trial_outcome(XFAIL, trial())
    assert outcome == EXPECTED_FAIL
    assert text == ("expected FAIL with known finding arm-secure-cp15-banks-not-migrated and registers "
                    "TTBR1_S, DACR_S differing, and so it failed (DACR_S, TTBR1_S)")
    sc = scenario(trial())
    assert sc["status"] == EXPECTED_FAIL and STATUS_EXIT[EXPECTED_FAIL] == 0
    assert matrix_exit_code([sc["status"], "pass"]) == 0
    assert summarize([sc])["expected_failures"] == 1 and summarize([sc])["failed"] == 0


def test_a_pass_where_a_failure_is_expected_is_a_failure():
    outcome, text = trial_outcome(XFAIL, trial("pass", registers=()))
    assert outcome == UNEXPECTED_PASS and "but it passed" in text and "may be fixed" in text
    sc = scenario(trial("pass", registers=()))
    assert sc["status"] == UNEXPECTED_PASS and matrix_exit_code([sc["status"]]) == 1
    assert matrix_exit_code([sc["status"], "error"]) == 3  # an error still outranks it


def test_a_failure_of_another_kind_is_a_plain_failure_saying_what_was_missing():
    outcome, text = trial_outcome(XFAIL, trial(registers=("TTBR1_S",), findings=()))
    assert outcome == "fail"
    assert "known finding arm-secure-cp15-banks-not-migrated not matched" in text
    assert "no differing register matches DACR_S" in text and "TTBR1_S" not in text.split("otherwise")[1]
    assert matrix_exit_code([scenario(trial(registers=("TTBR1_S",), findings=()))["status"]]) == 1


def test_the_worst_trial_decides_and_errors_are_left_alone():
    t1, t2 = trial(index=1), trial("pass", registers=(), index=2)
    status, text = scenario_status(XFAIL, "fail", {"trials": [t1, t2]})
    assert status == UNEXPECTED_PASS and "passed" in text
    assert scenario_status(XFAIL, "error", {"trials": [t1]}) == ("error", "")
    assert scenario_status({"expect": "pass"}, "fail", {"trials": [t1]}) == ("fail", "")
    assert trial_outcome({}, t1) == ("fail", "")


def test_junit_expected_failure_is_skipped_with_the_diagnosis_and_unexpected_pass_a_failure():
    report = {"scenarios": [scenario(trial()), {**scenario(trial("pass", registers=())), "name": "b", "index": 1}]}
    root = ET.fromstring(junit.to_xml(report))
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("2", "1", "1")
    a, b = suite.findall("testcase")
    sk = a.find("skipped")
    assert sk.get("type") == "dirtylog.expected-fail" and "TTBR1_S" in sk.get("message")
    assert "vCPU 0 TTBR1_S: src 0x8000406a dst 0x0" in a.find("system-out").text
    fl = b.find("failure")
    assert fl.get("type") == "dirtylog.unexpected-pass" and "but it passed" in fl.get("message")
