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
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from verifier.errors import InputError
from verifier.run.options import BY_KEY, Choice, Kind, PathKind, fmt_value

MATRIX_SCHEMA = "dirtylog-matrix/1"
QEMU_OVERHEAD_MIB = 200  # host memory per QEMU besides guest RAM
MIN_DISK_MARGIN_MIB = 256


class MatrixError(InputError):
    """A matrix file that cannot be used, or a matrix that does not fit this host (exit 2)."""


# -- keys -------------------------------------------------------------------------------------
# A scenario's plan keys are the verify options' matrix keys, from the one option table
# (verifier.run.options: the command line, the matrix and the reproducer all read it). These keys
# describe the scenario itself.
def _name(v):
    Kind().check(v)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
        raise ValueError(f"{v!r}: use letters, digits, '.', '_' and '-' (it names a directory)")
    return v


def _registers(v):
    if not isinstance(v, list) or not v or not all(isinstance(r, str) and r.strip() for r in v):
        raise ValueError(f"expected a non-empty list of register names or patterns, e.g. [\"TTBR1_S\"], got {v!r}")
    return v


def _finding(v):
    from verifier.analysis import findings
    ids = [f["id"] for f in findings.load()]
    if v not in ids:
        raise ValueError(f"{v!r} is not a known finding (verifier/analysis/findings.json: {', '.join(ids)})")
    return v


def parse_rate(v) -> int | None:
    """A max_bandwidth value in bytes/s (verifier.units' rule); "auto" is None."""
    return BY_KEY["max_bandwidth"].kind.plan(v)


# key -> (validator, default as TOML writes it)
KEYS = {
    "name": (_name, None),
    "artifacts": (PathKind().check, None),  # relative to the matrix file
    **{key: (o.kind.check, o.key_default) for key, o in BY_KEY.items()},
    # expected results (verifier.analysis.expect): a scenario that reproduces a known bug on purpose
    "expect": (Choice(("pass", "fail")).check, "pass"),
    "expect_finding": (_finding, None),  # needs expect = "fail"
    "expect_registers": (_registers, None),  # fnmatch patterns; needs expect = "fail"
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


def shipped_matrices() -> dict[str, Path]:
    """The matrices that come with dirtylog (matrices/ of the checkout or of the installed package)."""
    from builder.project import path as project_path
    return {p.stem: p for p in sorted(project_path("matrices").glob("*.toml"))}


def matrix_path(arg) -> Path:
    """`--matrix ARG`: a file, or the name of a shipped matrix (`release`, `smoke.toml`) when no file
    of that name exists here and it names no directory."""
    path = Path(arg)
    if path.exists() or len(path.parts) != 1:
        return path
    shipped = shipped_matrices()
    name = path.name.removesuffix(".toml")
    if name in shipped:
        return shipped[name]
    raise MatrixError(f"no matrix file {arg}, nor a shipped matrix of that name (shipped: {', '.join(shipped)})")


def load_matrix(path: Path) -> Matrix:
    """Parse, validate and expand a matrix file (or a shipped one: matrix_path); MatrixError names
    file, line and key."""
    path = matrix_path(path)
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
            if is_axis and len(set(map(fmt_value, values))) != len(values):
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
            name = table["name"] + (f"[{','.join(f'{k}={fmt_value(v)}' for k, v in multi)}]" if multi else "")
            if name in seen:
                raise err("[[scenario", nth, "name", f"scenario '{name}' is already defined at {seen[name]}")
            origin = f"{path}:{line}"
            seen[name] = origin
            for key in PATH_KEYS:
                if params[key] is not None:
                    params[key] = str((path.parent / params[key]).resolve())
            from verifier.run.workload import check_fits, parse_workload
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

