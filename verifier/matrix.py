"""Scenario matrices: a TOML file of scenarios, expanded, checked against the host, sharded, run.

File format (docs/report-schema.md has the result format)::

    [defaults]              # optional: values every scenario starts from
    machine = "virt"
    smp = 1

    [[scenario]]            # one or more
    name = "bw"
    max_bandwidth = ["50M", "200M"]   # a list multiplies: 2 scenarios
    smp = [1, 2]                      # x 2 = 4: "bw[max_bandwidth=50M,smp=1]", ...

A list value (in a scenario or in [defaults]) is an axis; the scenario expands to the product of
its axes, in the order the keys are written, and each expansion is named
``name[key=value,...]`` listing the axes. ``workloads`` is itself a list of "T:D:I" strings, so
its axis is a list of such lists. Unknown keys and bad values are refused with the file, the
line and the key. Relative ``artifacts`` paths are relative to the matrix file's directory.

Sharding (``--shard I/N``): every expanded scenario gets an estimated cost (seconds, see
``estimate_cost``); scenarios are taken by decreasing cost (then name) and each goes to the shard
with the smallest total so far (then the lowest shard number). The assignment depends only on the
file, so N CI jobs with the same file cover the matrix exactly once.

Running: each scenario is one ``verifier.run.verify`` call in its own run sub-directory, in a
thread; at most ``jobs`` at once and never more than the host's cores (a running scenario takes
``smp + 1`` cores: its TCG vCPUs and the migration) and memory (``2 x (mem + 200 MiB)``: two QEMUs)
allow. A scenario with more vCPUs than the host has cores, or more memory than it has available,
is refused before anything starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import expect, units
from .errors import InputError, VerifyError
from .fsutil import atomic_write
from .report import now_utc

MATRIX_SCHEMA = "dirtylog-matrix/1"
QEMU_OVERHEAD_MIB = 200  # host memory per QEMU besides guest RAM
MIN_DISK_MARGIN_MIB = 256

HOST_BACKINGS = ("auto", "anon", "file", "memfd", "memfd-hugetlb", "thp")
GUEST_PAGES = ("4k", "hugetlb", "thp")
CAPTURES = ("auto", "backing-file", "pmemsave")
TRANSPORTS = ("unix", "tcp")



class MatrixError(InputError):
    """A matrix file that cannot be used, or a matrix that does not fit this host (exit 2)."""


# -- values -----------------------------------------------------------------------------------
def _int(lo: int, hi: int):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"{v} is out of range {lo}..{hi}")
        return v
    return check


def _choice(options):
    def check(v):
        opts = options() if callable(options) else options
        if v not in opts:
            raise ValueError(f"{v!r} is not one of {', '.join(opts)}")
        return v
    return check


def _machines():
    from builder.machines import MACHINES
    return tuple(MACHINES)


def _text(v):
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return v


def _host(v):
    """`local` or `[USER@]HOST[:PORT]` (verifier.remote.make_host's syntax)."""
    _text(v)
    if v not in ("local", "localhost") and not re.fullmatch(r"([^@:\s]+@)?(\[[^\]]+\]|[^:\s]+)(:\d+)?", v):
        raise ValueError(f"{v!r}: expected local or [USER@]HOST[:PORT]")
    return v


def _name(v):
    _text(v)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
        raise ValueError(f"{v!r}: use letters, digits, '.', '_' and '-' (it names a directory)")
    return v


def _seconds(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 86400:
        raise ValueError(f"expected seconds > 0, got {v!r}")
    return float(v)


def parse_rate(v) -> int | None:
    """Bytes/s by verifier.units' rule (50000000, "50M" = 10^6, "48Mi" = 2^20); "auto" (None) is
    dirtylog's throttle-then-release."""
    if v == "auto":
        return None
    try:
        return units.parse_rate(v)
    except InputError as exc:
        raise ValueError(f"{exc} or \"auto\"" if "not a byte rate" in str(exc) else str(exc)) from None


def _rate(v):
    parse_rate(v)
    return v


def _workloads(v):
    from .workload import parse_workload
    if not isinstance(v, list) or not v or not all(isinstance(w, str) for w in v):
        raise ValueError(f"expected a non-empty list of \"TOTAL:DIRTY:INTERVAL_MS\" strings, got {v!r}")
    for w in v:
        try:
            parse_workload(w)
        except InputError as exc:
            raise ValueError(str(exc)) from None
    return v


def _registers(v):
    if not isinstance(v, list) or not v or not all(isinstance(r, str) and r.strip() for r in v):
        raise ValueError(f"expected a non-empty list of register names or patterns, e.g. [\"TTBR1_S\"], got {v!r}")
    return v


def _finding(v):
    from . import findings
    ids = [f["id"] for f in findings.load()]
    if v not in ids:
        raise ValueError(f"{v!r} is not a known finding (verifier/findings.json: {', '.join(ids)})")
    return v


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


# key -> (validator, default). Defaults are verify's (None: from the manifest / the CLI).
KEYS = {
    "name": (_name, None),
    "artifacts": (_text, None),
    "qemu": (_text, None),  # None: the machine's emulator (qemu-system-arm for armv7)
    "machine": (_choice(_machines), None),  # None: the artifacts' (manifest) machine
    "smp": (_int(1, 8), 2),
    "mem": (_int(64, 1 << 20), 256),
    "max_bandwidth": (_rate, "auto"),
    "min_passes": (_int(1, 1000), 4),
    "workloads": (_workloads, ["512:512:50", "512:512:50", "50:50:5"]),
    "capture": (_choice(CAPTURES), "auto"),
    "transport": (_choice(TRANSPORTS), "unix"),
    "trials": (_int(1, 1000), 1),
    "migration_timeout": (_seconds, 180.0),
    "boot_timeout": (_seconds, 120.0),
    "keep_images": (_bool, False),
    "host_backing": (_choice(HOST_BACKINGS), "auto"),
    "guest_pages": (_choice(GUEST_PAGES), "4k"),
    "machine_opts": (_text, None),  # extra -machine properties, e.g. "secure=on" for vexpress-a15
    "cpu_state": (_bool, True),  # compare every vCPU register through the gdbstubs
    # expected results (verifier.expect): a scenario that reproduces a known bug on purpose
    "expect": (_choice(("pass", "fail")), "pass"),
    "expect_finding": (_finding, None),  # needs expect = "fail"
    "expect_registers": (_registers, None),  # fnmatch patterns; needs expect = "fail"
    # two hosts (verifier.remote): None/"local" runs that side on this machine
    "src_host": (_host, None),
    "dst_host": (_host, None),
    "migration_address": (_text, None),  # None: 127.0.0.1 (verify's default)
    "ssh_identity": (_text, None),  # relative to the matrix file, like artifacts
    "known_hosts": (_text, None),
    "remote_dir": (_text, "/var/tmp/dirtylog-remote"),
    "dst_qemu": (_text, None),
    "allow_qemu_mismatch": (_bool, False),
}
HOST_KEYS = ("src_host", "dst_host")
LIST_KEYS = ("workloads", "expect_registers")  # a list is one value; a list of lists is an axis
EXPECT_KEYS = ("expect_finding", "expect_registers")
PATH_KEYS = ("artifacts", "ssh_identity", "known_hosts")  # relative to the matrix file
# Asked for by users, not implemented by the verifier behind a matrix: say so instead of "unknown".
NOT_SUPPORTED = {
    "arch": "the guest architecture is the artifacts' (their manifest); choose a `machine` of it",
    "accel": "matrices run TCG only",
    "capabilities": "migration capabilities are not a matrix key yet (use `dirtylog verify --capability`)",
    "parameters": "migration parameters are not a matrix key yet (use `dirtylog verify --parameter`)",
}
TOP_LEVEL = ("defaults", "scenario")


# -- positions --------------------------------------------------------------------------------
_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")


class _Lines:
    """Where a key is in the file: tomllib gives no positions, so scan the text.

    Tables are located by their headers ([defaults], the n-th [[scenario]]); a key by the first
    line `key =` (bare or quoted) inside that table. Falls back to the table's header line."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.tables: list[tuple[str, int]] = []  # (header name, 1-based line), in file order
        for no, line in enumerate(self.lines, 1):
            m = _HEADER.match(line)
            if m and not line.lstrip().startswith("#"):
                self.tables.append(((m.group(1) + m.group(2).strip().strip("\"'")), no))

    def table(self, header: str, nth: int = 0) -> tuple[int, int]:
        """(first line, last line) of the nth table with this header ("[defaults]"-like: "[" +
        name or "[[" + name); (1, end of top level) for the top level (header "")."""
        if header == "":
            end = self.tables[0][1] - 1 if self.tables else len(self.lines)
            return 1, end
        found = [i for i, (h, _) in enumerate(self.tables) if h == header]
        if nth >= len(found):
            return 1, len(self.lines)
        i = found[nth]
        end = self.tables[i + 1][1] - 1 if i + 1 < len(self.tables) else len(self.lines)
        return self.tables[i][1], end

    def key(self, header: str, nth: int, key: str) -> int:
        first, last = self.table(header, nth)
        pat = re.compile(r"^\s*(" + re.escape(key) + r"|\"" + re.escape(key) + r"\"|'" + re.escape(key)
                         + r"')\s*=")
        for no in range(first, last + 1):
            if pat.match(self.lines[no - 1]):
                return no
        return first


# -- scenarios --------------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    index: int  # position in the expanded matrix
    params: dict  # every key of KEYS resolved (defaults applied), artifacts absolute or None
    origin: str  # "file:line" of the [[scenario]] it came from

    @property
    def slug(self) -> str:
        """Its run sub-directory's name."""
        return f"{self.index:03d}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_")

    @property
    def cores(self) -> int:
        """vCPUs: a scenario with more than the host's cores is refused."""
        return self.params["smp"]

    @property
    def sched_cores(self) -> int:
        """Cores a running scenario is given when scenarios run in parallel: its TCG vCPU threads
        plus one for the migration (QEMU's migration thread, the destination receiving).
        Measured on 2 cores: two smp-1 scenarios at once lost a whole dirtyram generation
        (stale pages, lag 1) in 2 of 13 runs, never when run alone."""
        return self.params["smp"] + 1

    @property
    def host_mem_mib(self) -> int:
        return 2 * (self.params["mem"] + QEMU_OVERHEAD_MIB)

    @property
    def cost(self) -> float:
        return estimate_cost(self.params)


def estimate_cost(p: dict) -> float:
    """Expected wall seconds: per trial ~12 s to boot and settle, RAM copied at the bandwidth
    (50 MB/s throttle or the fixed one) about twice, 20 s more where the destination does not
    answer (vexpress-a15 on QEMU 7.2 waits out the resume timeout), and the compare."""
    bw = parse_rate(p["max_bandwidth"]) or 50_000_000
    ram = p["mem"] * 2**20
    per_trial = 12 + 2 * ram / bw + ram / 1e9 + (20 if p["machine"] in (None, "vexpress-a15") else 0)
    return round(p["trials"] * per_trial, 3)


@dataclass
class Matrix:
    path: Path
    sha256: str
    scenarios: list[Scenario]

    def shard(self, index: int, count: int) -> list[Scenario]:
        return shard(self.scenarios, index, count)


def _fmt(v) -> str:
    if isinstance(v, list):
        return "+".join(_fmt(x) for x in v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def load_matrix(path: Path) -> Matrix:
    """Parse, validate and expand a matrix file; MatrixError names file, line and key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MatrixError(f"cannot read matrix {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise MatrixError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(f"{path}: invalid TOML: {exc}") from None
    lines = _Lines(text)

    def err(header: str, nth: int, key: str | None, msg: str) -> MatrixError:
        line = lines.key(header, nth, key) if key else lines.table(header, nth)[0]
        where = {"": "top level", "[defaults": "[defaults]"}.get(header, f"[[scenario]] #{nth + 1}")
        return MatrixError(f"{path}:{line}: {where}" + (f": key '{key}'" if key else "") + f": {msg}")

    for key, value in data.items():
        if key not in TOP_LEVEL:
            header = "[" + key if isinstance(value, dict) else "[[" + key if isinstance(value, list) else ""
            if header and not any(h == header for h, _ in lines.tables):
                header = ""
            line = lines.table(header, 0)[0] if header else lines.key("", 0, key)
            raise MatrixError(f"{path}:{line}: unknown table or key '{key}' (expected [defaults] and "
                              f"[[scenario]] tables)")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise err("", 0, "defaults", "must be a table: [defaults]")
    scenarios = data.get("scenario")
    if scenarios is None:
        raise MatrixError(f"{path}: no [[scenario]] table: a matrix needs at least one scenario")
    if not isinstance(scenarios, list) or not all(isinstance(s, dict) for s in scenarios):
        raise err("", 0, "scenario", "must be an array of tables: [[scenario]]")

    def check(header: str, nth: int, table: dict, allow_name: bool) -> dict:
        axes = {}
        for key, value in table.items():
            if key in NOT_SUPPORTED:
                raise err(header, nth, key, f"not supported: {NOT_SUPPORTED[key]}")
            if key not in KEYS:
                raise err(header, nth, key, f"unknown key (known: {', '.join(KEYS)})")
            if key == "name" and not allow_name:
                raise err(header, nth, key, "a scenario's name belongs in its [[scenario]] table")
            validator = KEYS[key][0]
            is_axis = isinstance(value, list) and (key not in LIST_KEYS or (value and isinstance(value[0], list)))
            if key == "name" and isinstance(value, list):
                raise err(header, nth, key, "a name cannot be a list")
            values = value if is_axis else [value]
            if is_axis and not values:
                raise err(header, nth, key, "an empty list gives no scenario")
            for v in values:
                try:
                    validator(v)
                except ValueError as exc:
                    raise err(header, nth, key, str(exc)) from None
            if is_axis and len(set(map(_fmt, values))) != len(values):
                raise err(header, nth, key, f"the list repeats a value: {value!r}")
            axes[key] = (values, is_axis)
        return axes

    default_axes = check("[defaults", 0, defaults, allow_name=False)
    expanded: list[Scenario] = []
    seen: dict[str, str] = {}
    for nth, table in enumerate(scenarios):
        line = lines.table("[[scenario", nth)[0]
        if "name" not in table:
            raise err("[[scenario", nth, None, "missing key 'name'")
        axes = dict(default_axes)
        axes.update(check("[[scenario", nth, table, allow_name=True))
        keys = [k for k in axes if k != "name"]
        for combo in itertools.product(*(axes[k][0] for k in keys)):
            params = {k: KEYS[k][1] for k in KEYS}
            params.update(zip(keys, combo))
            params["name"] = table["name"]
            multi = [(k, v) for k, v in zip(keys, combo) if axes[k][1] and len(axes[k][0]) > 1]
            name = table["name"] + (f"[{','.join(f'{k}={_fmt(v)}' for k, v in multi)}]" if multi else "")
            if name in seen:
                raise err("[[scenario", nth, "name", f"scenario '{name}' is already defined at {seen[name]}")
            origin = f"{path}:{line}"
            seen[name] = origin
            for key in PATH_KEYS:
                if params[key] is not None:
                    params[key] = str((path.parent / params[key]).resolve())
            from .workload import check_fits, parse_workload
            try:
                check_fits(tuple(parse_workload(w) for w in params["workloads"]), params["mem"])
            except InputError as exc:
                key = "workloads" if "workloads" in table or "workloads" not in defaults else "mem"
                raise err("[[scenario", nth, key, f"scenario '{name}': {exc}") from None
            for key in EXPECT_KEYS:
                if params[key] is not None and params["expect"] != "fail":
                    raise err("[[scenario", nth, key if key in table else "expect",
                              f"scenario '{name}': {key} needs expect = \"fail\"")
            params["name"] = name
            expanded.append(Scenario(name=name, index=len(expanded), params=params, origin=origin))
    return Matrix(path=path.resolve(), sha256=hashlib.sha256(raw).hexdigest(), scenarios=expanded)


def select_scenarios(matrix: Matrix, patterns: tuple[str, ...]) -> list[Scenario]:
    """The scenarios whose expanded name matches one of the --scenario patterns (all without any):
    `*` and `?` are wildcards, brackets are literal (expanded names hold them: "bw[smp=2]").
    A pattern that matches nothing is refused, so a typo does not quietly run nothing."""
    if not patterns:
        return list(matrix.scenarios)

    def matches(name: str, pattern: str) -> bool:
        rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        return re.fullmatch(rx, name) is not None
    for p in patterns:
        if not any(matches(s.name, p) for s in matrix.scenarios):
            names = ", ".join(s.name for s in matrix.scenarios[:12]) + (", ..." if len(matrix.scenarios) > 12 else "")
            raise InputError(f"--scenario {p!r} matches no scenario of {matrix.path} (scenarios: {names})")
    return [s for s in matrix.scenarios if any(matches(s.name, p) for p in patterns)]


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise InputError(f"--shard {text!r}: expected I/N, e.g. 1/4")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise InputError(f"--shard {text}: I must be between 1 and N")
    return i, n


def shard(scenarios: list[Scenario], index: int, count: int) -> list[Scenario]:
    """Shard `index` (1-based) of `count`: cost-balanced greedy (longest first, ties by name),
    returned in matrix order."""
    if count < 1 or not 1 <= index <= count:
        raise InputError(f"shard {index}/{count}: I must be between 1 and N")
    totals = [0.0] * count
    owner: dict[int, int] = {}
    for s in sorted(scenarios, key=lambda s: (-s.cost, s.name)):
        k = min(range(count), key=lambda j: (totals[j], j))
        totals[k] += s.cost
        owner[s.index] = k
    return [s for s in scenarios if owner[s.index] == index - 1]


# -- host resources ---------------------------------------------------------------------------
@dataclass
class Host:
    cores: int
    mem_available_mib: int
    mem_total_mib: int
    disk_free_mib: int

    def to_dict(self) -> dict:
        return dict(vars(self))


def probe_host(run_dir: Path) -> Host:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    # For benchmarks only: pretend to have more cores (verdicts may change under CPU contention).
    if os.environ.get("DIRTYLOG_MATRIX_CORES", "").isdigit():
        cores = int(os.environ["DIRTYLOG_MATRIX_CORES"]) or cores
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info[k] = int(v.split()[0]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    probe = Path(run_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return Host(cores=cores, mem_available_mib=info.get("MemAvailable", 0),
                mem_total_mib=info.get("MemTotal", 0), disk_free_mib=st.f_bavail * st.f_frsize // 2**20)


def check_fits_host(scenarios: list[Scenario], jobs: int, host: Host) -> list[str]:
    """Refuse (MatrixError) what cannot run here; return notes on what limits parallelism."""
    notes = []
    for s in scenarios:
        if s.cores > host.cores:
            raise MatrixError(f"scenario '{s.name}' ({s.origin}) needs {s.cores} cores of TCG (smp {s.cores}); "
                              f"this host has {host.cores}")
        if s.host_mem_mib > host.mem_available_mib:
            raise MatrixError(
                f"scenario '{s.name}' ({s.origin}) needs {s.host_mem_mib} MiB of host memory "
                f"(2 QEMUs x ({s.params['mem']} MiB guest + {QEMU_OVERHEAD_MIB} MiB)); this host has "
                f"{host.mem_available_mib} MiB available of {host.mem_total_mib} MiB")
    if scenarios:
        # The images of the scenarios running at once (2 per trial, kept until the compare).
        biggest = sorted((2 * s.params["mem"] for s in scenarios), reverse=True)[:max(jobs, 1)]
        need = sum(biggest) + MIN_DISK_MARGIN_MIB
        if need > host.disk_free_mib:
            raise MatrixError(f"the run directory's file system has {host.disk_free_mib} MiB free; "
                              f"{min(jobs, len(scenarios))} scenarios at once need {need} MiB for RAM images")
        kept = sum(2 * s.params["mem"] * s.params["trials"] for s in scenarios if s.params["keep_images"])
        if kept > host.disk_free_mib:
            notes.append(f"keep_images scenarios will write {kept} MiB of RAM images; "
                         f"{host.disk_free_mib} MiB are free")
    if jobs > 1:
        at_once = _max_parallel(scenarios, jobs, host)
        if at_once < min(jobs, len(scenarios)):
            notes.append(f"--jobs {jobs}: at most {at_once} scenarios fit at once on this host "
                         f"({host.cores} cores, {host.mem_available_mib} MiB available)")
    return notes


def _max_parallel(scenarios: list[Scenario], jobs: int, host: Host) -> int:
    small = sorted(scenarios, key=lambda s: (s.sched_cores, s.host_mem_mib))
    n = cores = mem = 0
    for s in small[:jobs]:
        if cores + s.sched_cores > host.cores or mem + s.host_mem_mib > host.mem_available_mib:
            break
        n, cores, mem = n + 1, cores + s.sched_cores, mem + s.host_mem_mib
    return max(n, 1)


# -- results ----------------------------------------------------------------------------------
@dataclass
class ScenarioResult:
    scenario: Scenario
    status: str = "not-run"  # pass | fail | expected-fail | unexpected-pass | error | interrupted | not-run
    run_dir: Path | None = None
    error: str | None = None
    exit_code: int | None = None
    wall_s: float | None = None
    report: dict | None = None  # RunReport.to_dict()
    command: str = ""
    expectation: str = ""  # verifier.expect's sentence for an expect = "fail" scenario

    def to_dict(self) -> dict:
        return {
            "name": self.scenario.name,
            "index": self.scenario.index,
            "origin": self.scenario.origin,
            "params": self.scenario.params,
            "estimated_cost_s": self.scenario.cost,
            "status": self.status,
            "exit_code": self.exit_code,
            "error": self.error,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "command": self.command,
            "wall_s": self.wall_s,
            "expectation": self.expectation,
            "report": self.report,
        }


STATUS_EXIT = {"pass": 0, "fail": 1, "expected-fail": 0, "unexpected-pass": 1, "error": 3,
               "interrupted": 130, "not-run": 130}


def matrix_exit_code(statuses: list[str], exit_codes: list[int | None] = ()) -> int:
    """130 if interrupted, else 4 if a scenario hit a bug of dirtylog (its exit code 4), else 3 if
    any infrastructure error, else 1 if any failure, else 0."""
    if any(s in ("interrupted", "not-run") for s in statuses):
        return 130
    if 4 in exit_codes:
        return 4
    if any(s == "error" for s in statuses) or not statuses:
        return 3
    if any(s in ("fail", "unexpected-pass") for s in statuses):
        return 1
    return 0


def matrix_verdict(code: int) -> str:
    return {0: "pass", 1: "fail", 3: "error", 4: "error", 130: "interrupted"}[code]


def summarize(scenarios: list[dict]) -> dict:
    statuses = [s["status"] for s in scenarios]
    trials = [t for s in scenarios if s.get("report") for t in s["report"]["trials"]]
    return {
        "scenarios": len(scenarios),
        "passed": statuses.count("pass"),
        "failed": statuses.count("fail"),
        "expected_failures": statuses.count("expected-fail"),
        "unexpected_passes": statuses.count("unexpected-pass"),
        "errors": statuses.count("error"),
        "interrupted": statuses.count("interrupted"),
        "not_run": statuses.count("not-run"),
        "trials": {"total": len(trials),
                   "passed": sum(t["verdict"] == "pass" for t in trials),
                   "failed": sum(t["verdict"] == "fail" for t in trials),
                   "errors": sum(t["verdict"] == "error" for t in trials)},
    }


def build_report(matrix: Matrix | dict, results: list[dict], *, shard_spec, jobs, host, started,
                 command, run_dir, extra: dict | None = None) -> dict:
    results = sorted(results, key=lambda r: r["index"])
    code = matrix_exit_code([r["status"] for r in results], [r.get("exit_code") for r in results])
    if isinstance(matrix, Matrix):
        mdesc = {"file": str(matrix.path), "sha256": matrix.sha256,
                 "scenario_names": [s.name for s in matrix.scenarios]}
    else:
        mdesc = matrix
    d = {
        "schema": MATRIX_SCHEMA,
        "verdict": matrix_verdict(code),
        "exit_code": code,
        "summary": summarize(results),
        "matrix": mdesc,
        "shard": {"index": shard_spec[0], "count": shard_spec[1]} if shard_spec else None,
        "jobs": jobs,
        "host": host,
        "command": command,
        "run_dir": str(run_dir) if run_dir else None,
        "started": started,
        "finished": now_utc(),
        "scenarios": results,
    }
    if extra:
        d.update(extra)
    return d


def write_json(data: dict, path: Path) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


# -- running ----------------------------------------------------------------------------------
class Cancelled(BaseException):
    """Raised inside a scenario's thread when the matrix is interrupted."""


class ScenarioReporter:
    """verify()'s Reporter for one scenario: prefixed lines, and the cancellation point."""

    def __init__(self, console, name: str, cancel: threading.Event):
        self.console, self.name, self.cancel = console, name, cancel
        self._last_sync = None

    def _check(self):
        if self.cancel.is_set():
            raise KeyboardInterrupt

    def step(self, msg: str) -> None:
        self._check()
        if self.console is not None:
            self.console.step(f"[{self.name}] {msg}")

    def detail(self, msg: str) -> None:
        self._check()
        if self.console is not None and hasattr(self.console, "detail"):
            self.console.detail(f"[{self.name}] {msg}")

    def migration(self, info: dict) -> None:
        self._check()
        ram = info.get("ram") or {}
        sync = ram.get("dirty-sync-count")
        if sync == self._last_sync or self.console is None:
            return
        self._last_sync = sync
        self.console.step(f"[{self.name}]   {info.get('status')}: dirty sync {sync}, "
                          f"{ram.get('remaining', 0) / 1e6:.1f} MB remaining, "
                          f"{ram.get('transferred', 0) / 1e6:.1f} MB sent")


def reproducer(s: Scenario, run_dir: Path) -> str:
    """The single `dirtylog verify` command that runs this scenario alone."""
    p = s.params
    args = ["dirtylog", "verify", "--artifacts", p["artifacts"] or "artifacts"]
    if p["qemu"]:
        args += ["--qemu", p["qemu"]]
    if p["machine"]:
        args += ["--machine", p["machine"]]
    args += ["--smp", str(p["smp"]), "--mem", str(p["mem"])]
    if parse_rate(p["max_bandwidth"]) is not None:
        args += ["--max-bandwidth", str(parse_rate(p["max_bandwidth"]))]
    args += ["--min-passes", str(p["min_passes"])]
    for w in p["workloads"]:
        args += ["--workload", w]
    args += ["--trials", str(p["trials"]), "--capture", p["capture"], "--transport", p["transport"],
             "--migration-timeout", _fmt(p["migration_timeout"]), "--boot-timeout", _fmt(p["boot_timeout"]),
             "--run-dir", str(run_dir)]
    if p["host_backing"] != "auto":
        args += ["--host-backing", p["host_backing"]]
    if p["guest_pages"] != "4k":
        args += ["--guest-pages", p["guest_pages"]]
    if p["machine_opts"]:
        args += ["--machine-opts", p["machine_opts"]]
    if not p["cpu_state"]:
        args.append("--no-cpu-state")
    for key in ("src_host", "dst_host", "migration_address", "ssh_identity", "known_hosts", "dst_qemu"):
        if p[key] is not None:
            args += ["--" + key.replace("_", "-"), p[key]]
    if is_two_host(s):
        args += ["--remote-dir", p["remote_dir"]]
    if p["allow_qemu_mismatch"]:
        args.append("--allow-qemu-mismatch")
    if not p["keep_images"]:
        args.append("--delete-images")
    return " ".join(shlex.quote(a) for a in args)


def is_two_host(s: Scenario) -> bool:
    """Does the scenario run a side on another host (or both sides through the host layer)?"""
    return any(s.params[k] is not None for k in HOST_KEYS)


def verify_options(s: Scenario, run_dir: Path):
    from .run import VerifyOptions
    from .workload import parse_workload
    p = s.params
    return VerifyOptions(
        qemu=p["qemu"], smp=p["smp"], mem_mb=p["mem"], max_bandwidth=parse_rate(p["max_bandwidth"]),
        workloads=tuple(parse_workload(w) for w in p["workloads"]), trials=p["trials"], run_dir=run_dir,
        capture=p["capture"], transport=p["transport"], min_passes=p["min_passes"],
        migration_timeout_s=p["migration_timeout"], boot_timeout_s=p["boot_timeout"],
        delete_images=not p["keep_images"], machine=p["machine"], host_backing=p["host_backing"],
        guest_pages=p["guest_pages"], machine_opts=p["machine_opts"] or "", cpu_state=p["cpu_state"], src_host=p["src_host"], dst_host=p["dst_host"],
        migration_address=p["migration_address"] or "127.0.0.1", ssh_identity=p["ssh_identity"],
        known_hosts=p["known_hosts"], remote_dir=p["remote_dir"], dst_qemu=p["dst_qemu"],
        allow_qemu_mismatch=p["allow_qemu_mismatch"])


def _report_from_traceback(tb):
    """verify() re-raises KeyboardInterrupt after marking its RunReport interrupted; take the
    report from its frame (see the note in the issue report: verify could attach it)."""
    from . import run as _run
    while tb is not None:
        if tb.tb_frame.f_code is _run.verify.__code__:
            return tb.tb_frame.f_locals.get("report")
        tb = tb.tb_next
    return None


def run_scenario(s: Scenario, art, run_dir: Path, console, cancel: threading.Event) -> ScenarioResult:
    from .run import verify
    res = ScenarioResult(scenario=s, run_dir=run_dir, command=reproducer(s, run_dir))
    t0 = time.monotonic()
    report = None
    try:
        report = verify(art, verify_options(s, run_dir), reporter=ScenarioReporter(console, s.name, cancel))
    except KeyboardInterrupt as exc:
        report = getattr(exc, "report", None) or _report_from_traceback(exc.__traceback__)
        res.status, res.error = "interrupted", "interrupted"
    except VerifyError as exc:
        res.status, res.error, res.exit_code = "error", str(exc), exc.exit_code
    except Exception as exc:  # noqa: BLE001 - one scenario's bug must not lose the others' results
        res.status, res.exit_code = "error", 4
        res.error = (f"internal error: {type(exc).__name__}: {exc} (a bug in dirtylog; please report it with "
                     f"{run_dir / 'traceback.txt'})")
        (run_dir / "traceback.txt").parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "traceback.txt").write_text(traceback.format_exc())
    res.wall_s = round(time.monotonic() - t0, 3)
    if report is not None:
        if cancel.is_set():
            report.interrupted = True
        report.command = res.command
        if report.finished is None:
            report.finish()
        try:
            report.write()
        except OSError:
            pass
        res.report = json.loads(json.dumps(report.to_dict(), default=str))
        if res.status == "not-run":
            res.status = report.verdict
            res.exit_code = report.exit_code
            failed = next((t for t in report.trials if t.error), None)
            if failed is not None:
                res.error = failed.error
                res.exit_code = failed.error_exit_code or 3
                if res.exit_code == 2:
                    res.status = "error"
        if res.status in ("pass", "fail"):
            res.status, res.expectation = expect.scenario_status(s.params, res.status, res.report)
            res.exit_code = STATUS_EXIT[res.status]
        if res.status == "interrupted":
            res.exit_code = 130
    if cancel.is_set() and res.status in ("error", "not-run"):
        res.status, res.exit_code = "interrupted", 130
    return res


def _qemu_children() -> list[int]:
    """QEMU processes started by this process (its threads)."""
    me, found = os.getpid(), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == me and "qemu-system" in os.readlink(f"/proc/{pid}/exe"):
                found.append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    return found


@dataclass
class MatrixRun:
    """Everything `run_matrix` needs; the CLI builds one from its options."""

    matrix: Matrix
    scenarios: list[Scenario]
    run_dir: Path
    jobs: int = 1
    shard_spec: tuple[int, int] | None = None
    artifacts_default: Path | None = None
    host: Host | None = None
    command: str = ""
    selected: tuple[str, ...] = ()  # --scenario patterns, if any
    results: dict[int, ScenarioResult] = field(default_factory=dict)


def prepare(matrix_file: Path, jobs: int, shard_spec: str | None, artifacts_default: Path | None,
            run_dir: Path | None, host: Host | None = None,
            select: tuple[str, ...] = ()) -> tuple[MatrixRun, list[str], dict]:
    """Load, shard and check everything that can be checked before a QEMU starts.

    Returns the run, notes, and the loaded artifacts per directory. MatrixError/InputError: exit 2."""
    from . import capture as _capture
    from .artifacts import load_artifacts
    from builder.machines import MACHINES

    from .qemu import probe_qemu
    from .run import check_host_backing, default_run_dir
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: must be at least 1")
    matrix = load_matrix(matrix_file)
    spec = parse_shard(shard_spec) if shard_spec else None
    chosen = select_scenarios(matrix, select)
    chosen = shard(chosen, *spec) if spec else chosen
    run_dir = Path(run_dir or default_run_dir()).resolve()
    host = host or probe_host(run_dir)
    notes = check_fits_host(chosen, jobs, host)
    arts: dict[str, object] = {}
    qemus: dict[str, object] = {}
    for s in chosen:
        if s.params["artifacts"] is None:
            s.params["artifacts"] = str(Path(artifacts_default or "artifacts").resolve())
        key = s.params["artifacts"]
        if key not in arts:
            arts[key] = load_artifacts(Path(key))
        art = arts[key]
        try:
            opts = verify_options(s, run_dir)
            opts.check(art)
            machine = MACHINES[s.params["machine"] or art.machine]
            if machine.arch != art.arch:
                raise InputError(f"machine {machine.name} runs {machine.arch} guests; the artifacts in {key} "
                                 f"are {art.arch}")
            if is_two_host(s):  # QEMU and capture are checked on the hosts when the scenario starts
                from .remote import check_remote_options
                check_remote_options(opts)
                continue
            if s.params["dst_qemu"] or s.params["allow_qemu_mismatch"]:
                raise InputError("dst_qemu and allow_qemu_mismatch apply to scenarios with src_host/dst_host")
            binary = s.params["qemu"] or machine.qemu_binary
            if binary not in qemus:
                qemus[binary] = probe_qemu(binary)
            capture = _capture.choose(opts.capture, qemus[binary], host_backing=opts.host_backing)
            opts.host_backing = "file" if capture == "backing-file" else (
                "anon" if opts.host_backing == "auto" else opts.host_backing)
            check_host_backing(opts)  # huge pages the host cannot give
        except InputError as exc:
            raise MatrixError(f"scenario '{s.name}' ({s.origin}): {exc}") from None
    run = MatrixRun(matrix=matrix, scenarios=chosen, run_dir=run_dir, jobs=jobs, shard_spec=spec,
                    artifacts_default=artifacts_default, host=host, selected=tuple(select),
                    command=" ".join(shlex.quote(a) for a in ["dirtylog", *sys.argv[1:]]))
    return run, notes, arts


def execute(run: MatrixRun, arts: dict, console=None, on_result=None, grace_s: float = 15.0) -> int:
    """Run the scenarios; returns the matrix exit code. Ctrl-C/SIGTERM (KeyboardInterrupt in the
    main thread): running scenarios are cancelled at their next step, their QEMUs are stopped,
    the rest is not started; the partial results stay in `run.results` and 130 is returned."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    cancel = threading.Event()
    lock = threading.Condition()
    busy = {"cores": 0, "mem": 0, "n": 0}
    pending = list(run.scenarios)
    threads: list[threading.Thread] = []

    def fits(s: Scenario) -> bool:
        if busy["n"] == 0:
            return True
        return (busy["n"] < run.jobs and busy["cores"] + s.sched_cores <= run.host.cores
                and busy["mem"] + s.host_mem_mib <= run.host.mem_available_mib)

    def worker(s: Scenario) -> None:
        try:
            res = run_scenario(s, arts[s.params["artifacts"]], run.run_dir / s.slug, console, cancel)
        except BaseException as exc:  # noqa: BLE001
            res = ScenarioResult(scenario=s, run_dir=run.run_dir / s.slug, status="error", exit_code=4,
                                 error=f"internal error: {type(exc).__name__}: {exc} (a bug in dirtylog)")
        with lock:
            run.results[s.index] = res
            busy["cores"] -= s.sched_cores
            busy["mem"] -= s.host_mem_mib
            busy["n"] -= 1
            lock.notify_all()
        if on_result is not None:
            on_result(res)

    interrupted = False
    try:
        with lock:
            while pending:
                s = next((x for x in pending if fits(x)), None)
                if s is None:
                    lock.wait(1.0)
                    continue
                pending.remove(s)
                busy["cores"] += s.sched_cores
                busy["mem"] += s.host_mem_mib
                busy["n"] += 1
                t = threading.Thread(target=worker, args=(s,), name=f"scenario-{s.index}", daemon=True)
                threads.append(t)
                t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        interrupted = True
        cancel.set()
        if console is not None:
            console.step("interrupted: stopping every QEMU, writing the partial report")
        deadline = time.monotonic() + grace_s
        while any(t.is_alive() for t in threads):
            # Scenarios stop at their next progress step; a QEMU the scenario waits on (boot,
            # resume check) is ended so the wait returns at once.
            for pid in _qemu_children():
                try:
                    os.kill(pid, signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL)
                except OSError:
                    pass
            for t in threads:
                t.join(0.2)
            if time.monotonic() > deadline + 10:
                break
    for s in run.scenarios:
        if s.index not in run.results:
            run.results[s.index] = ScenarioResult(scenario=s, status="not-run" if interrupted else "error",
                                                  error="not run: the matrix was interrupted" if interrupted
                                                  else "not run")
    code = matrix_exit_code([r.status for r in run.results.values()], [r.exit_code for r in run.results.values()])
    return 130 if interrupted else code


def report_dict(run: MatrixRun, started: str) -> dict:
    return build_report(run.matrix, [r.to_dict() for r in run.results.values()], shard_spec=run.shard_spec,
                        jobs=run.jobs, host=run.host.to_dict() if run.host else None, started=started,
                        command=run.command, run_dir=run.run_dir,
                        extra={"selected": list(run.selected)} if run.selected else None)
