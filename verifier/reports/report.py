"""Results of a verification run: per-trial findings, the verdict, JSON and text reports."""

from __future__ import annotations

import datetime as _dt
import json
import shlex
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from verifier.analysis.compare import CompareResult
from verifier.fsutil import atomic_write

REPORT_SCHEMA = "dirtylog-report/1"
MAX_RANGES_IN_TEXT = 40


def dirtylog_info() -> dict:
    """Which dirtylog wrote a report: its version and, run from a git checkout, the commit."""
    from builder import project
    return {"version": project.version(), "git_commit": project.git_commit()}


@dataclass
class TrialResult:
    index: int
    directory: Path
    verdict: str = "pending"  # pass | fail | error
    error: str | None = None
    error_exit_code: int | None = None
    migration: dict = field(default_factory=dict)
    parameter_changes: list = field(default_factory=list)
    compare: dict = field(default_factory=dict)
    differences: list = field(default_factory=list)
    destination_invariant: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)
    images_deleted: bool = False
    resume: dict = field(default_factory=dict)
    injection: dict = field(default_factory=dict)
    page_sizes: dict = field(default_factory=dict)
    cmdlines: dict = field(default_factory=dict)
    cpu_state: dict = field(default_factory=dict)  # verifier.capture.cpustate.compare(), or {"skipped": why}
    device_state: dict = field(default_factory=dict)  # verifier.capture.devstate.compare(), or {"skipped": why}
    known_findings: list = field(default_factory=list)  # verifier.analysis.findings.match() of a failed trial
    stream: dict = field(default_factory=dict)  # the tap's channels and summary, and the provenance of differing pages

    def to_dict(self) -> dict:
        d = asdict(self)
        d["directory"] = str(self.directory)
        d["checks"] = checks(self)
        return d


_DST_IMAGE = object()


def diagnose_trial(trial: TrialResult, result: CompareResult, ram_base: int, invariant_image=_DST_IMAGE) -> None:
    """Turn a comparison (and the resume check) into the trial's verdict and findings.

    A destination page newer than the source's means the capture is wrong: CaptureError.
    The destination-only invariant reads `invariant_image` (by default the destination image;
    across hosts a sparse image of the page headers; None: not checked).
    """
    from verifier.analysis.diagnosis import analyse, destination_invariant
    trial.compare = result.to_dict()
    trial.compare["ram_base"] = hex(ram_base)
    analysis = analyse(result, ram_base)
    analysis.raise_for_capture()
    trial.compare["diagnosis_counts"] = {k: n for k, n in analysis.counts.items() if n}
    trial.compare["undiagnosed"] = analysis.undiagnosed
    trial.differences = [r.to_dict() for r in analysis.ranges]
    if invariant_image is _DST_IMAGE:
        invariant_image = result.dst
    trial.destination_invariant = ([] if invariant_image is None else
                                   [f.to_dict() for f in destination_invariant(invariant_image, base=ram_base)])
    trial.verdict = "pass" if all(c["ok"] is not False for c in checks(trial).values()) else "fail"


def checks(trial) -> dict:
    """What a trial checks, each {"ok": True | False | None (not checked), "text"}: memory (the RAM
    images), cpu_state (every vCPU register), device_state (every field of every device section;
    only in trials that have its entry, compared or skipped: reports from before it have none) and
    liveness (the resumed guest runs). `trial` is a TrialResult or its dict in report.json."""
    if isinstance(trial, dict):
        return trial.get("checks") or _checks(trial.get("compare") or {}, trial.get("cpu_state") or {},
                                               trial.get("resume") or {}, trial.get("device_state"))
    return _checks(trial.compare, trial.cpu_state, trial.resume, trial.device_state)


CHECK_LABELS = {"memory": "memory", "cpu_state": "CPU state", "device_state": "device state", "liveness": "liveness"}


def _checks(c: dict, cs: dict, r: dict, ds: dict | None = None) -> dict:
    if "diff_count" in c:
        memory = {"ok": c["diff_count"] == 0,
                  "text": "memory identical" if c["diff_count"] == 0 else f"memory: {c['diff_count']} pages differ"}
    else:
        memory = {"ok": None, "text": "memory not compared"}
    if "identical" in cs:
        n = len(cs["differences"])
        names = sorted({d["register"] for d in cs["differences"]})
        vcpus = len({d["vcpu"] for d in cs["differences"]})
        cpu = {"ok": cs["identical"], "text": "CPU state identical" if cs["identical"] else
               f"CPU state: {n} register value{'s' if n != 1 else ''} differ on {vcpus} vCPU{'s' if vcpus != 1 else ''}"
               f" ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"}
    else:
        cpu = {"ok": None, "text": "CPU state not compared" + (f" ({cs['skipped']})" if cs.get("skipped") else "")}
    if "ok" in r:
        live = {"ok": r["ok"], "text": "guest ran after resume" if r["ok"] else "guest did not run after resume"}
    else:
        live = {"ok": None, "text": "liveness not checked"}
    out = {"memory": memory, "cpu_state": cpu}
    if ds:
        out["device_state"] = _device_check(ds)
    out["liveness"] = live
    return out


def _device_check(ds: dict) -> dict:
    if "identical" not in ds:
        return {"ok": None, "text": "device state not compared" + (f" ({ds['skipped']})" if ds.get("skipped") else "")}
    if ds["identical"]:
        return {"ok": True, "text": "device state identical"}
    fields = sorted({d["field"] for p in ds["pairs"].values() for d in p["differences"]})
    n = len(fields)
    return {"ok": False, "text": f"device state: {n} field{'s differ' if n != 1 else ' differs'} "
                                 f"({', '.join(fields[:6])}{', ...' if n > 6 else ''})"}


@dataclass
class RunReport:
    run_dir: Path
    started: str
    options: dict
    artifacts: dict
    qemu: dict
    machine: str
    capture: str
    trials: list[TrialResult] = field(default_factory=list)
    finished: str | None = None
    interrupted: bool = False
    command: str = ""
    notes: list = field(default_factory=list)  # defaults dirtylog chose and why

    @classmethod
    def start(cls, run_dir, opts, art, qemu, machine, capture) -> "RunReport":
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}
        options["workloads"] = [w.spec for w in opts.workloads]
        return cls(run_dir=run_dir, started=now_utc(), options=options,
                   artifacts={"files": art.describe(), "notes": art.notes,
                              "manifest": art.manifest or None},
                   qemu={"path": qemu.path, "version": qemu.version_str, "version_text": qemu.version_text},
                   machine=machine.name, capture=capture,
                   command=" ".join(shlex.quote(a) for a in ["dirtylog", *sys.argv[1:]]))

    def finish(self) -> None:
        self.finished = now_utc()

    @property
    def verdict(self) -> str:
        verdicts = [t.verdict for t in self.trials]
        if self.interrupted:
            return "interrupted"
        if "error" in verdicts:
            return "error"
        if "fail" in verdicts:
            return "fail"
        return "pass" if verdicts and all(v == "pass" for v in verdicts) else "error"

    @property
    def exit_code(self) -> int:
        return {"pass": 0, "fail": 1, "interrupted": 130}.get(self.verdict, 3)

    def summary(self) -> dict:
        lost = [t.compare.get("diff_count", 0) for t in self.trials if t.verdict in ("pass", "fail")]
        return {
            "trials": len(self.trials),
            "passed": sum(t.verdict == "pass" for t in self.trials),
            "failed": sum(t.verdict == "fail" for t in self.trials),
            "errors": sum(t.verdict == "error" for t in self.trials),
            "differing_pages": {"min": min(lost), "median": statistics.median(lost), "max": max(lost)}
            if lost else None,
        }

    def to_dict(self) -> dict:
        return {
            "schema": REPORT_SCHEMA,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "summary": self.summary(),
            "run_dir": str(self.run_dir),
            "command": self.command,
            "dirtylog": dirtylog_info(),
            "started": self.started,
            "finished": self.finished,
            "machine": self.machine,
            "capture": self.capture,
            "qemu": self.qemu,
            "options": self.options,
            "notes": self.notes,
            "artifacts": self.artifacts,
            "trials": [t.to_dict() for t in self.trials],
        }

    def write(self, json_path: Path | None = None) -> list[Path]:
        """Write report.json and report.txt into the run directory (and JSON where asked)."""
        data = json.dumps(self.to_dict(), indent=2, default=str) + "\n"
        written = []
        targets = [self.run_dir / "report.json"] + ([json_path] if json_path else [])
        for path in targets:
            written.append(atomic_write(path, data))
        atomic_write(self.run_dir / "report.txt", self.render_text())
        return written + [self.run_dir / "report.txt"]

    def _checks_headline(self) -> str:
        """One trial: its three checks, failed first. Several: which checks failed, in how many trials."""
        done = [t for t in self.trials if t.verdict in ("pass", "fail")]
        if not done:
            return ""
        if len(done) == 1:
            c = sorted(checks(done[0]).values(), key=lambda c: c["ok"] is not False)
            return ": " + "; ".join(x["text"] for x in c)
        failed = {}
        for t in done:
            for name, c in checks(t).items():
                if c["ok"] is False:
                    failed[name] = failed.get(name, 0) + 1
        if not failed:
            names = [CHECK_LABELS[k] for k in checks(done[0])]
            return f": {', '.join(names[:-1])} and {names[-1]} as expected in every trial"
        label = {"memory": "memory differs", "cpu_state": "CPU state differs", "device_state": "device state differs",
                 "liveness": "guest did not run"}
        return ": " + "; ".join(f"{label[k]} in {n} of {len(done)} trials" for k, n in failed.items())

    def render_text(self) -> str:
        s = self.summary()
        o = self.options
        lines = [
            f"dirtylog verify: {self.verdict.upper()}  "
            f"({s['passed']} passed, {s['failed']} failed, {s['errors']} errors of {s['trials']} trials)"
            + self._checks_headline(),
            f"run directory: {self.run_dir}",
            f"QEMU {self.qemu['version']} ({self.qemu['path']}); machine {self.machine}, "
            f"smp {o['smp']}, {o['mem_mb']} MiB, accel {o['accel']}, capture {self.capture}",
            f"workloads: {' '.join(o['workloads']) or 'none'}; max bandwidth: "
            f"{o['max_bandwidth'] if o['max_bandwidth'] else 'throttled for ' + str(o['min_passes']) + ' passes, then released'}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        if s["differing_pages"] and s["trials"] > 1:
            d = s["differing_pages"]
            lines.append(f"differing pages per trial: min {d['min']}, median {d['median']}, max {d['max']}")
        for t in self.trials:
            lines.append("")
            lines.append(_trial_line(t))
            for w in t.warnings:
                lines.append(f"  warning: {w}")
            if t.error:
                lines.append(f"  error: {t.error}")
            if t.compare or t.cpu_state or t.resume:
                lines.append("  " + "; ".join(c["text"] for c in checks(t).values()))
            if t.resume and not t.resume.get("ok"):
                lines.append(f"  destination did not run after resuming: {t.resume.get('detail')}")
            if t.cpu_state.get("differences"):
                from verifier.capture.cpustate import format_differences
                lines.append("  CPU state differences (register: source, destination):")
                lines += ["    " + d for d in format_differences(t.cpu_state)]
            if t.device_state.get("pairs") and not t.device_state["identical"]:
                from verifier.capture import devstate
                lines.append("  device state differences (copies: field: values):")
                lines += ["    " + d for d in devstate.format_differences(t.device_state)]
            desc = t.device_state.get("description", "")
            if desc and not desc.startswith("the migration stream"):
                lines.append(f"  device state: fields named by {desc}")
            for f in t.known_findings:
                lines.append(f"  {f['sentence']}")
            if t.verdict == "fail" and not t.known_findings:
                lines.append(f"  not a known finding; the evidence is in {t.directory}")
            if t.page_sizes:
                lines.append("  pages: " + _page_sizes_text(t.page_sizes))
            if t.injection.get("injected"):
                i = t.injection
                lines.append(f"  negative control {i['kind']}: {i['detected']} of {i['injected']} injected "
                             f"{i.get('unit', 'pages')} "
                             f"detected, {i['other_differences']} other differing {i.get('unit', 'pages')}"
                             + (f"; MISSED {', '.join(map(str, i['missed']))}" if i["missed"] else ""))
            counts = t.compare.get("diagnosis_counts") if t.compare else None
            if counts:
                lines.append("  diagnosis: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
            if t.stream:
                lines.append("  stream: " + _stream_text(t.stream))
            shown = t.differences[:MAX_RANGES_IN_TEXT]
            for r in shown:
                lines.append("  " + r["text"])
                if r.get("provenance"):
                    lines.append("    " + r["provenance"]["text"])
            if len(t.differences) > len(shown):
                lines.append(f"  ... {len(t.differences) - len(shown)} more ranges in report.json")
            for f in t.destination_invariant[:10]:
                lines.append("  destination-only check: " + f["text"])
            if len(t.destination_invariant) > 10:
                lines.append(f"  ... {len(t.destination_invariant) - 10} more destination-only findings in report.json")
        return "\n".join(lines) + "\n"


def _stream_text(st: dict) -> str:
    """One line: what the tap saw, and the provenance classes of the differing pages."""
    if st.get("skipped"):
        return f"not recorded ({st['skipped']})"
    chans = st.get("channels", [])
    text = (f"{len(chans)} channel{'s' if len(chans) != 1 else ''} "
            f"({', '.join(c['name'] for c in chans)}), {sum(c['bytes'] for c in chans) / 1e6:.1f} MB, "
            f"{st.get('ledger', {}).get('iterations', 0)} iterations")
    if st.get("errors"):
        text += "; not parsed: " + "; ".join(st["errors"])
    prov = st.get("provenance")
    if prov and prov.get("counts"):
        text += "; differing pages: " + ", ".join(f"{n} {k}" for k, n in prov["counts"].items())
    return text


def _page_sizes_text(p: dict) -> str:
    host, guest = p.get("host", {}), p.get("guest", {})
    src = host.get("src") or {}
    text = f"host {host.get('backing')} RAM"
    if src:
        text += f" ({src['kernel_page_size_kb']} kB pages"
        huge = src.get("anon_huge_pages_kb", 0) + src.get("shmem_huge_pages_kb", 0)
        text += f", {huge // 1024} MiB in transparent huge pages)" if huge else ")"
    text += f"; guest dirtyram {guest.get('requested')}"
    if "hugepages_reserved" in guest:
        text += f" ({guest['hugepages_reserved']} of {guest['hugepages_requested']} huge pages reserved)"
    if "transparent_hugepage" in guest:
        text += f" (THP {guest['transparent_hugepage']})"
    return text


def _trial_line(t: TrialResult) -> str:
    head = f"trial {t.index}: {t.verdict.upper()}"
    m = t.migration
    if t.compare:
        c = t.compare
        head += (f"  {c['diff_count']} of {c['page_count']} pages differ" if c["diff_count"]
                 else f"  all {c['page_count']} pages identical")
    if m:
        head += (f"; migration {m.get('total_time_ms')} ms, downtime {m.get('downtime_ms')} ms, "
                 f"{m.get('dirty_sync_count')} dirty syncs, {(m.get('transferred_bytes') or 0) / 1e6:.1f} MB sent")
    return head


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
