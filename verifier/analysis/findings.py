"""Known findings: a failed trial matched against the knowledge base in findings.json (data, not
code), so that a FAIL caused by a known QEMU bug says so in one sentence, with its reference and
workaround, and any other FAIL says that it is not a known finding and where its evidence is.

To add a finding, add an entry to findings.json (its "about" lists the conditions) and a test that
a real or recorded trial matches it.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

FINDINGS_FILE = Path(__file__).with_name("findings.json")
SCHEMA = "dirtylog-findings/1"


@dataclass(frozen=True)
class Context:
    """What a signature may ask about the run beside the trial itself."""
    machine: str
    accel: str
    qemu_version: str
    machine_opts: str
    smp: int


@lru_cache(maxsize=4)
def load(path: Path = FINDINGS_FILE) -> tuple[dict, ...]:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA}")
    return tuple(data["findings"])


def _differing_registers(trial) -> list[dict]:
    return list((trial.cpu_state or {}).get("differences") or [])


def _is_zero(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"(0x)?0+", value) is not None


def _holds(sig: dict, trial, ctx: Context) -> bool:
    """Every condition of one signature against one trial; unknown conditions never hold."""
    for key, want in sig.items():
        if key == "machine":
            ok = ctx.machine in want
        elif key == "accel":
            ok = ctx.accel in want
        elif key == "qemu_major":
            ok = int(ctx.qemu_version.split(".")[0]) in want
        elif key == "machine_opts_lacks":
            ok = want not in ctx.machine_opts.split(",")
        elif key == "smp_min":
            ok = ctx.smp >= want
        elif key == "memory":
            differs = bool(trial.compare and trial.compare.get("diff_count"))
            ok = (want == "differs") == differs and bool(trial.compare)
        elif key == "resume":
            ok = bool(trial.resume) and (trial.resume.get("ok") is True) == (want == "ok")
        elif key == "resume_detail":
            ok = bool(re.search(want, (trial.resume or {}).get("detail") or ""))
        elif key == "diagnosis_any":
            ok = any(k in want for k in (trial.compare or {}).get("diagnosis_counts", {}))
        elif key == "registers_differ":
            ok = any(fnmatch.fnmatchcase(d["register"], p) for d in _differing_registers(trial) for p in want)
        elif key == "registers_zero_on_dst":
            matched = [d for d in _differing_registers(trial)
                       if any(fnmatch.fnmatchcase(d["register"], p) for p in sig.get("registers_differ", ["*"]))]
            ok = bool(matched) and all(_is_zero(d["dst"]) for d in matched) == want
        else:
            return False
        if not ok:
            return False
    return True


def match(trial, ctx: Context, findings: tuple[dict, ...] | None = None) -> list[dict]:
    """The known findings a failed trial matches: [{id, summary, reference, workaround, sentence}]."""
    out = []
    for f in findings if findings is not None else load():
        if any(_holds(sig, trial, ctx) for sig in f["signatures"]):
            out.append({"id": f["id"], "reference": f["reference"], "workaround": f["workaround"],
                        "sentence": f"known finding {f['id']}: {f['summary']}; a known QEMU bug "
                                    f"({f['reference']}); workaround: {f['workaround']}"})
    return out
