"""JUnit XML from a matrix report (`dirtylog-matrix/1`), for Jenkins and GitLab.

One <testsuite> per matrix (name "dirtylog"), one <testcase> per scenario trial:
classname = the scenario's name, name = "trial-N". A FAIL trial carries <failure> with the
diagnosis text; an infrastructure error (QEMU crashed, migration did not converge, ...) is an
<error>; trials never run (an earlier trial's error, an interrupted matrix) are <skipped>.
A scenario with expect = "fail" (verifier.analysis.expect): a trial that failed as expected is <skipped
type="dirtylog.expected-fail"> (pytest's xfail), one that passed or failed otherwise a <failure>
whose message says what was expected.
"""

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

from verifier.analysis.expect import EXPECTED_FAIL, UNEXPECTED_PASS, trial_outcome
from verifier.fsutil import atomic_write

_BAD_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
MAX_TEXT = 60_000


def _clean(text: str) -> str:
    text = _BAD_XML.sub("?", str(text))
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "\n... (truncated; see report.json)"


def trial_text(t: dict) -> str:
    """The diagnosis of one trial as it reads in report.txt."""
    from verifier.capture.cpustate import format_differences
    from verifier.reports.report import checks
    lines = ["; ".join(x["text"] for x in checks(t).values())]
    c = t.get("compare") or {}
    if c:
        lines.append(f"{c.get('diff_count')} of {c.get('page_count')} pages differ")
        counts = c.get("diagnosis_counts") or {}
        if counts:
            lines.append("diagnosis: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    resume = t.get("resume") or {}
    if resume and not resume.get("ok"):
        lines.append(f"destination did not run after resuming: {resume.get('detail')}")
    cpu = t.get("cpu_state") or {}
    if cpu.get("differences"):
        lines.append("CPU state differences (register: source, destination):")
        lines += ["  " + d for d in format_differences(cpu, limit=200)]
    dev = t.get("device_state") or {}
    if dev.get("pairs") and not dev.get("identical"):
        from verifier.capture import devstate
        lines.append("device state differences (copies: field: values):")
        lines += ["  " + d for d in devstate.format_differences(dev, limit=200)]
    for f in t.get("known_findings") or []:
        lines.append(f["sentence"])
    if t.get("verdict") == "fail" and not t.get("known_findings"):
        lines.append(f"not a known finding; the evidence is in {t.get('directory')}")
    for r in t.get("differences") or []:
        lines.append(r.get("text") or f"{r.get('start')}-{r.get('end')} {r.get('pages')} pages {r.get('diagnosis')}")
    for f in t.get("destination_invariant") or []:
        lines.append("destination-only check: " + f.get("text", str(f)))
    for w in t.get("warnings") or []:
        lines.append("warning: " + w)
    return "\n".join(lines)


def _failure_message(t: dict) -> str:
    c = t.get("compare") or {}
    parts = []
    if c.get("diff_count"):
        counts = c.get("diagnosis_counts") or {}
        parts.append(f"{c['diff_count']} of {c.get('page_count')} pages differ"
                     + (" (" + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")" if counts else ""))
    cpu = t.get("cpu_state") or {}
    if cpu.get("differences"):
        names = sorted({d["register"] for d in cpu["differences"]})
        parts.append(f"CPU state: {len(cpu['differences'])} register values differ ({', '.join(names[:8])}"
                     + (", ..." if len(names) > 8 else "") + ")")
    from verifier.reports.report import checks
    dev = checks(t).get("device_state")
    if dev and dev["ok"] is False:
        parts.append(dev["text"])
    resume = t.get("resume") or {}
    if resume and not resume.get("ok"):
        parts.append("destination did not run after resuming")
    for f in t.get("known_findings") or []:
        parts.append(f"known finding {f.get('id')}")
    return "; ".join(parts) or "verification failed"


def cases(scenario: dict) -> list[dict]:
    """The test cases of one scenario: [{name, time, outcome, message, text}] with outcome in
    pass | failure | error | skipped."""
    report = scenario.get("report")
    trials_wanted = int((scenario.get("params") or {}).get("trials") or 1)
    out = []
    trials = report["trials"] if report else []
    params = scenario.get("params") or {}
    for t in trials:
        case = {"name": f"trial-{t['index']}", "time": (t.get("timings") or {}).get("total_s") or 0.0,
                "outcome": "pass", "message": "", "text": "", "out": ""}
        if t["verdict"] == "fail":
            case.update(outcome="failure", message=_failure_message(t), text=trial_text(t))
        elif t["verdict"] == "error":
            if report.get("interrupted"):
                case.update(outcome="error", message="interrupted", text=t.get("error") or "interrupted")
            else:
                case.update(outcome="error", message=t.get("error") or "infrastructure error",
                            text=t.get("error") or "")
        elif t["verdict"] not in ("pass",):
            case.update(outcome="error", message=f"trial {t['verdict']}", text=t.get("error") or "")
        outcome, sentence = trial_outcome(params, t)
        if outcome == EXPECTED_FAIL:
            case.update(outcome="skipped", type="dirtylog.expected-fail", message=sentence)
        elif outcome == UNEXPECTED_PASS or sentence:
            case.update(outcome="failure", type="dirtylog.unexpected-pass" if outcome == UNEXPECTED_PASS
                        else "dirtylog.verification",
                        message=sentence + ("; " + case["message"] if case["message"] else ""),
                        text=sentence + "\n" + (case["text"] or trial_text(t)))
        case["out"] = f"trial directory: {t.get('directory')}\nreproducer: {scenario.get('command', '')}"
        if outcome == EXPECTED_FAIL:  # a <skipped> has no text of its own: the diagnosis goes to system-out
            case["out"] = trial_text(t) + "\n" + case["out"]
        out.append(case)
    status = scenario["status"]
    if not trials and status in ("error", "interrupted"):
        out.append({"name": "trial-1", "time": scenario.get("wall_s") or 0.0, "outcome": "error",
                    "message": scenario.get("error") or status, "text": scenario.get("error") or status,
                    "out": f"reproducer: {scenario.get('command', '')}"})
    if trials and status == "interrupted" and all(c["outcome"] == "pass" for c in out):
        out[-1].update(outcome="error", message="interrupted", text="the matrix was interrupted")
    first_missing = len(out) + 1
    why = "not run: the matrix was interrupted" if status in ("interrupted", "not-run") else \
        "not run: an earlier trial ended with an infrastructure error"
    for i in range(first_missing, trials_wanted + 1):
        out.append({"name": f"trial-{i}", "time": 0.0, "outcome": "skipped", "message": why, "text": "",
                    "out": ""})
    return out


def to_xml(matrix_report: dict, suite_name: str = "dirtylog") -> bytes:
    all_cases = [(s["name"], c) for s in sorted(matrix_report["scenarios"], key=lambda s: s["index"])
                 for c in cases(s)]
    count = {k: sum(c["outcome"] == k for _, c in all_cases) for k in ("failure", "error", "skipped")}
    total_time = sum(float(c["time"] or 0) for _, c in all_cases)
    attrs = {"name": suite_name, "tests": str(len(all_cases)), "failures": str(count["failure"]),
             "errors": str(count["error"]), "skipped": str(count["skipped"]), "time": f"{total_time:.3f}"}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", {**attrs, "timestamp": (matrix_report.get("started") or "")[:19],
                                              "hostname": socket.gethostname()})
    props = ET.SubElement(suite, "properties")
    m = matrix_report.get("matrix") or {}
    for k, v in (("matrix", m.get("file")), ("matrix_sha256", m.get("sha256")),
                 ("verdict", matrix_report.get("verdict")), ("command", matrix_report.get("command"))):
        if v:
            ET.SubElement(props, "property", {"name": k, "value": _clean(v)})
    for classname, c in all_cases:
        tc = ET.SubElement(suite, "testcase", {"classname": _clean(classname), "name": c["name"],
                                               "time": f"{float(c['time'] or 0):.3f}"})
        if c["outcome"] in ("failure", "error"):
            el = ET.SubElement(tc, c["outcome"], {"message": _clean(c["message"])[:1000],
                                                  "type": c.get("type") or "dirtylog." + (
                                                      "verification" if c["outcome"] == "failure" else "infrastructure")})
            el.text = _clean(c["text"])
        elif c["outcome"] == "skipped":
            ET.SubElement(tc, "skipped", {"message": _clean(c["message"])[:1000],
                                          **({"type": c["type"]} if c.get("type") else {})})
        if c.get("out"):
            ET.SubElement(tc, "system-out").text = _clean(c["out"])
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write(matrix_report: dict, path: Path) -> Path:
    return atomic_write(path, to_xml(matrix_report))
