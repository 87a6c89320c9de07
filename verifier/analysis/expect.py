"""Expected results of a matrix scenario: a release matrix also pins known QEMU bugs.

A scenario with `expect = "fail"` reproduces a known bug on purpose (vexpress-a15 with
secure=on: QEMU does not migrate the Secure CP15 banks). Its trials are held to what is
expected: `expect_finding` (an id in findings.json) must be among a trial's known findings, and
every pattern of `expect_registers` (fnmatch, e.g. "TTBR1_S") must name a register that differs.

Per trial, the outcome is:
  expected-fail    it failed, and as expected        (a JUnit <skipped>, exit code 0)
  unexpected-pass  it passed although it should fail (a JUnit <failure>, exit code 1: the bug is
                   fixed, or the scenario lost its power; either way a person looks)
  fail             it failed otherwise than expected (a JUnit <failure>, exit code 1)
and a scenario takes the worst of its trials' outcomes (fail, then unexpected-pass).
"""

from __future__ import annotations

import fnmatch

EXPECTED_FAIL = "expected-fail"
UNEXPECTED_PASS = "unexpected-pass"


def summary_words(summary: dict) -> str:
    """"N failed as expected, M passed unexpectedly, " for a matrix summary (empty when none)."""
    return "".join(f"{summary[k]} {label}, " for k, label in (("expected_failures", "failed as expected"),
                                                              ("unexpected_passes", "passed unexpectedly"))
                   if summary.get(k))


def expects_failure(params: dict) -> bool:
    return (params or {}).get("expect") == "fail"


def _what(params: dict) -> str:
    parts = []
    if params.get("expect_finding"):
        parts.append(f"known finding {params['expect_finding']}")
    if params.get("expect_registers"):
        parts.append("registers " + ", ".join(params["expect_registers"]) + " differing")
    return "FAIL" + (" with " + " and ".join(parts) if parts else "")


def trial_outcome(params: dict, trial: dict) -> tuple[str, str]:
    """(outcome, sentence) of one trial dict (report.json's) against the scenario's expectation.
    Without `expect = "fail"` the outcome is the trial's verdict and the sentence is empty."""
    verdict = trial.get("verdict")
    if not expects_failure(params) or verdict not in ("pass", "fail"):
        return verdict, ""
    want = _what(params)
    if verdict == "pass":
        return UNEXPECTED_PASS, (f"expected {want}, but it passed: the known bug may be fixed in this "
                                 f"QEMU, or the scenario no longer reproduces it")
    missing = []
    finding = params.get("expect_finding")
    if finding and finding not in {f.get("id") for f in trial.get("known_findings") or []}:
        missing.append(f"known finding {finding} not matched")
    differing = [d["register"] for d in (trial.get("cpu_state") or {}).get("differences") or []]
    for pattern in params.get("expect_registers") or []:
        if not any(fnmatch.fnmatchcase(r, pattern) for r in differing):
            missing.append(f"no differing register matches {pattern}")
    if missing:
        return "fail", f"expected {want}; it failed otherwise: " + "; ".join(missing)
    named = sorted({r for r in differing
                    if any(fnmatch.fnmatchcase(r, p) for p in params.get("expect_registers") or [])})
    return EXPECTED_FAIL, (f"expected {want}, and so it failed"
                           + (f" ({', '.join(named)})" if named else ""))


def scenario_status(params: dict, status: str, report: dict | None) -> tuple[str, str]:
    """The scenario's status and sentence once its expectation is applied to its trials."""
    if not expects_failure(params) or status not in ("pass", "fail") or not report:
        return status, ""
    outcomes = [trial_outcome(params, t) for t in report.get("trials") or []]
    for worst in ("fail", UNEXPECTED_PASS, EXPECTED_FAIL):
        hit = [text for o, text in outcomes if o == worst]
        if hit:
            return worst, hit[0]
    return status, ""
