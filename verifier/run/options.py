"""Every verify option, once: its name, type, unit, default, help and matrix key.

One table (OPTIONS) makes all of these, so they cannot disagree:

- the resolved plan, `VerifyOptions` (a dataclass with one field per plan option);
- the command line of `dirtylog verify` and `make-and-verify` (dirtylog.cli builds its click
  options from the table: flag, kind, default, help, metavar);
- the matrix keys (MATRIX_KEYS) with their validation (`matrix_value`) and defaults, and the plan of
  a scenario (`from_matrix`);
- the reproducer of a plan (`reproducer_args`): the `dirtylog verify` arguments that run it alone.

A `Kind` knows one type: how a command-line string becomes a value (`parse`, raising InputError),
how a TOML value is checked (`check`, raising ValueError with the words a matrix error shows), how a
checked TOML value becomes a plan value (`plan`), and how a plan value is written back as
arguments (`args`). Byte sizes and rates follow verifier.units (decimal M, binary Mi).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from builder.machines import MACHINES
from verifier.errors import InputError
from verifier import units
from verifier.run.workload import SEED_WORKLOADS, Workload, check_fits, parse_workload

DEFAULT_REMOTE_DIR = "/var/tmp/dirtylog-remote"
_MISSING = object()


# -- kinds ------------------------------------------------------------------------------------------
class Kind:
    """A value type. The defaults suit plain text."""

    choices: tuple[str, ...] | None = None  # for the command line's help and checking
    metavar = "TEXT"
    is_flag = False
    path = False

    def parse(self, text: str, flag: str):
        return text

    def check(self, v):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"expected a non-empty string, got {v!r}")
        return v

    def plan(self, v):
        return v

    def args(self, flag: str, v) -> list[str]:
        return [flag, fmt_value(v)]


class Int(Kind):
    metavar = "INTEGER"

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def parse(self, text, flag):
        try:
            return int(text)
        except ValueError:
            raise InputError(f"{flag} {text}: expected a whole number") from None

    def check(self, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {v!r}")
        if not self.lo <= v <= self.hi:
            raise ValueError(f"{v} is out of range {self.lo}..{self.hi}")
        return v


class Seconds(Kind):
    metavar = "SECONDS"

    def parse(self, text, flag):
        try:
            return float(text)
        except ValueError:
            raise InputError(f"{flag} {text}: expected seconds") from None

    def check(self, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 86400:
            raise ValueError(f"expected seconds > 0, got {v!r}")
        return v

    def plan(self, v):
        return float(v)


class Rate(Kind):
    """Bytes per second by verifier.units' rule; None (a matrix's "auto") is dirtylog's
    throttle-then-release."""

    def parse(self, text, flag):
        return units.parse_rate(text)

    def check(self, v):
        self.plan(v)
        return v

    def plan(self, v):
        if v == "auto" or v is None:
            return None
        try:
            return units.parse_rate(v)
        except InputError as exc:
            raise ValueError(f"{exc} or \"auto\"" if "not a byte rate" in str(exc) else str(exc)) from None

    def args(self, flag, v):
        return [flag, str(v)]


class Choice(Kind):
    def __init__(self, values, matrix_values=None):
        self._values, self._matrix = values, matrix_values

    @property
    def choices(self):
        return tuple(self._values() if callable(self._values) else self._values)

    def check(self, v):
        opts = self._matrix or self.choices
        if v not in opts:
            raise ValueError(f"{v!r} is not one of {', '.join(opts)}")
        return v


class Flag(Kind):
    is_flag = True

    def check(self, v):
        if not isinstance(v, bool):
            raise ValueError(f"expected true or false, got {v!r}")
        return v


class HostSpec(Kind):
    """`local` or `[USER@]HOST[:PORT]` (verifier.run.hosts.make_host's syntax)."""

    def check(self, v):
        super().check(v)
        if v not in ("local", "localhost") and not re.fullmatch(r"([^@:\s]+@)?(\[[^\]]+\]|[^:\s]+)(:\d+)?", v):
            raise ValueError(f"{v!r}: expected local or [USER@]HOST[:PORT]")
        return v


class PathKind(Kind):
    """A file; in a matrix, relative to the matrix file."""

    path = True

    def parse(self, text, flag):
        return str(text)


class Workloads(Kind):
    """dirtyram instances TOTAL:DIRTY:INTERVAL_MS; on the command line one per --workload."""

    def parse(self, text, flag):
        return parse_workload(text) if not isinstance(text, Workload) else text

    def check(self, v):
        if not isinstance(v, list) or not v or not all(isinstance(w, str) for w in v):
            raise ValueError(f"expected a non-empty list of \"TOTAL:DIRTY:INTERVAL_MS\" strings, got {v!r}")
        for w in v:
            try:
                parse_workload(w)
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return v

    def plan(self, v):
        return tuple(parse_workload(w) if isinstance(w, str) else w for w in v)

    def args(self, flag, v):
        return [a for w in v for a in (flag, w.spec)]


class KeyValues(Kind):
    """NAME=VALUE pairs (repeatable): migration capabilities (on/off) or parameters (numbers, sizes
    by verifier.units, on/off, text)."""

    def __init__(self, booleans: bool):
        self.booleans = booleans

    def parse(self, item, flag):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError(f"{item!r}: expected NAME=VALUE")
        if self.booleans:
            if value not in ("on", "off", "true", "false"):
                raise InputError(f"{item!r}: the value must be on or off")
            return name, value in ("on", "true")
        if re.fullmatch(r"\d+", value):
            return name, int(value)
        if units.looks_like_size(value):
            try:
                return name, units.parse_bytes(value)
            except InputError as exc:
                raise InputError(f"{item!r}: {exc}") from None
        if value in ("on", "off", "true", "false"):
            return name, value in ("on", "true")
        return name, value

    def args(self, flag, v):
        def text(x):
            return ("on" if x else "off") if isinstance(x, bool) else str(x)
        return [a for k, x in v.items() for a in (flag, f"{k}={text(x)}")]


class Inject(Kind):
    def parse(self, text, flag):
        from verifier.run.inject import parse_inject
        return parse_inject(text)

    def args(self, flag, v):
        return [flag, f"{v[0]}:{v[1]}"]


def fmt_value(v) -> str:
    """A value as a scenario name and the reproducer write it."""
    if isinstance(v, list):
        return "+".join(fmt_value(x) for x in v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


# -- the table --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    name: str  # the VerifyOptions field (and the click parameter's name)
    flag: str | None  # on the command line; None: a knob for tests and benchmarks only
    kind: Kind
    default: object
    help: str = ""
    unit: str = ""
    matrix: str | None = None  # the matrix key; None: not a matrix key
    matrix_default: object = _MISSING  # the key's default (as TOML writes it) when it is not the plan's
    invert: bool = False  # the flag sets the field to False (--no-cpu-state)
    matrix_invert: bool = False  # the key is the field's negation (keep_images = not delete_images)
    multiple: bool = False
    metavar: str | None = None
    show_default: bool = False
    always: bool = False  # the reproducer writes it even at its default
    reproduce_when: object = None  # or a predicate on the plan (remote-dir: only for two-host plans)
    type: str = "object"  # the dataclass annotation

    @property
    def key_default(self):
        """The matrix key's default, in TOML terms."""
        if self.matrix_default is not _MISSING:
            return self.matrix_default
        d = self.default
        if isinstance(d, tuple) and d and isinstance(d[0], Workload):
            return [w.spec for w in d]
        return (not d) if self.matrix_invert else d


def _machines():
    return tuple(MACHINES)


def _two_host(p) -> bool:
    return bool(p.src_host or p.dst_host)


OPTIONS: tuple[Option, ...] = (
    Option("qemu", "--qemu", Kind(), None, matrix="qemu", type="str | None",
           help="QEMU system emulator to test (default: the one recorded in the manifest, else qemu-system-arm, "
                "-aarch64 or -x86_64 by machine). make-and-verify also takes 'patched' (its default for armv7) "
                "or 'stock'."),
    Option("machine", "--machine", Choice(_machines), None, matrix="machine", type="str | None",
           help="Guest machine model (default: the manifest's; armv7: vexpress-a15 as in 2014, or virt)."),
    Option("machine_opts", "--machine-opts", Kind(), "", matrix="machine_opts", matrix_default=None,
           metavar="PROP=VALUE[,...]", type="str",
           help="Extra -machine properties, e.g. secure=off for vexpress-a15 (docs/verifying.md)."),
    Option("cpu_state", "--no-cpu-state", Flag(), True, matrix="cpu_state", invert=True, type="bool",
           help="Do not compare the vCPUs' registers (read through QEMU's gdbstub) after the migration; the "
                "report records that they were not compared."),
    Option("device_state", "--no-device-state", Flag(), True, matrix="device_state", invert=True, type="bool",
           help="Do not compare the device state: by default both stopped VMs save their device sections "
                "(devstate-src.bin, devstate-dst.bin) and every field is compared, by the migration stream's "
                "VMDESCRIPTION, with the other side and with what the stream carried."),
    Option("stream", "--no-stream", Flag(), True, matrix="stream", invert=True, type="bool",
           help="Do not parse the migration stream: without the tap between source and destination the "
                "report says what differs but not where in the pipeline it was lost."),
    Option("record_stream", "--record-stream", Flag(), False, matrix="record_stream", type="bool",
           help="Keep the raw migration stream of every channel in the trial directory "
                "(stream-<channel>.bin, read by `dirtylog stream`)."),
    Option("smp", "--smp", Int(1, 8), 2, unit="vCPUs", matrix="smp", show_default=True, always=True, type="int",
           help="Guest vCPUs."),
    Option("mem_mb", "--mem", Int(64, 1 << 20), 256, unit="MiB", matrix="mem", show_default=True, always=True,
           type="int", help="Guest RAM in MiB."),
    Option("max_bandwidth", "--max-bandwidth", Rate(), None, unit="bytes/s", matrix="max_bandwidth",
           matrix_default="auto", metavar="BYTES_PER_S", type="int | None",
           help="Fix the migration bandwidth (bytes/s; 50M = 50*10^6, 48Mi = 48*2^20). Default: throttled until "
                "--min-passes dirty syncs, then released."),
    Option("min_passes", "--min-passes", Int(1, 1000), 4, unit="dirty syncs", matrix="min_passes",
           show_default=True, always=True, type="int",
           help="Dirty-bitmap syncs to force while the workload runs before letting it converge."),
    Option("workloads", "--workload", Workloads(), SEED_WORKLOADS, unit="4 KiB pages", matrix="workloads",
           multiple=True, metavar="TOTAL:DIRTY:INTERVAL_MS", always=True, type="tuple",
           help="A dirtyram instance TOTAL:DIRTY:INTERVAL_MS in 4 KiB pages; repeatable. Default: the 2014 "
                "procedure's 512:512:50 512:512:50 50:50:5."),
    Option("trials", "--trials", Int(1, 1000), 1, matrix="trials", show_default=True, always=True, type="int",
           help="Independent migrations to run."),
    Option("capture", "--capture", Choice(("auto", "savedirtylog", "backing-file", "pmemsave"),
                                          matrix_values=("auto", "backing-file", "pmemsave")),
           "auto", matrix="capture", show_default=True, always=True, type="str",
           help="How guest RAM is captured on each side (auto: -savedirtylog when the QEMU has it, else the RAM "
                "backing file)."),
    Option("transport", "--transport", Choice(("unix", "tcp")), "unix", matrix="transport", show_default=True,
           always=True, type="str", help="Migration channel between the two local QEMUs."),
    Option("src_host", "--src-host", HostSpec(), None, matrix="src_host", metavar="USER@HOST[:PORT]|local",
           type="str | None",
           help="Run the source QEMU on this host over SSH (QMP and serial forwarded as unix sockets; capture "
                "with pmemsave there; only differing pages are fetched)."),
    Option("dst_host", "--dst-host", HostSpec(), None, matrix="dst_host", metavar="USER@HOST[:PORT]|local",
           type="str | None", help="Run the destination QEMU on this host over SSH; needs --migration-address."),
    Option("migration_address", "--migration-address", Kind(), "127.0.0.1", matrix="migration_address",
           matrix_default=None, show_default=True, type="str",
           help="Address for --transport tcp; with --dst-host, the destination host's address on the migration "
                "network (its QEMU listens there)."),
    Option("ssh_identity", "--ssh-identity", PathKind(), None, matrix="ssh_identity", type="str | None",
           help="Private key for --src-host/--dst-host."),
    Option("known_hosts", "--known-hosts", PathKind(), None, matrix="known_hosts", type="str | None",
           help="known_hosts file for --src-host/--dst-host (unknown host keys are always refused)."),
    Option("remote_dir", "--remote-dir", Kind(), DEFAULT_REMOTE_DIR, matrix="remote_dir", show_default=True,
           reproduce_when=_two_host, type="str", help="Run directories and file cache on --src-host/--dst-host."),
    Option("dst_qemu", "--dst-qemu", Kind(), None, matrix="dst_qemu", metavar="PATH", type="str | None",
           help="With --src-host/--dst-host: the destination's QEMU when it is not --qemu (e.g. another version; "
                "needs --allow-qemu-mismatch then)."),
    Option("allow_qemu_mismatch", "--allow-qemu-mismatch", Flag(), False, matrix="allow_qemu_mismatch",
           type="bool",
           help="With --src-host/--dst-host: run although the two hosts' QEMUs report different versions (a "
                "cross-version migration); both versions go to report.json."),
    Option("migration_timeout_s", "--migration-timeout", Seconds(), 180.0, unit="s", matrix="migration_timeout",
           show_default=True, always=True, type="float",
           help="Seconds before a migration that does not converge is a failure."),
    Option("boot_timeout_s", "--boot-timeout", Seconds(), 120.0, unit="s", matrix="boot_timeout",
           show_default=True, always=True, type="float", help="Seconds to wait for the guest's readiness marker."),
    Option("guest_cmds", "--guest-cmd", Kind(), (), multiple=True, metavar="COMMAND", type="tuple",
           help="Typed at the guest's shell prompt after boot (the 2014 way); repeatable."),
    Option("ready_pattern", "--ready-pattern", Kind(), None, metavar="REGEX", type="str | None",
           help="Console output that says the guest is ready (default: DIRTYLOG-READY, or a shell prompt for a "
                "foreign initrd)."),
    Option("inject", "--inject", Inject(), None, metavar="KIND[:N]", type="tuple | None",
           help="Negative control: untracked-writes[:N] (host writes behind QEMU's back into N source pages just "
                "before switchover) or corrupt-capture[:N] (flip bytes in N pages of the destination image) or "
                "cpu-register[:N] (change N registers of the destination's vCPU 0 through its gdbstub before it "
                "is read, restore them after) or stream-drop[:N] / stream-flip[:N] (the stream tap withholds, or "
                "flips a byte in, N dirtyram page records of the final RAM section) or stream-device (the tap "
                "flips a byte of the device field timer/cpu_ticks_offset). The run must FAIL and name "
                "those pages, registers or fields."),
    Option("capabilities", "--capability", KeyValues(booleans=True), {}, multiple=True, metavar="NAME=on|off",
           type="dict",
           help="Migration capability on both sides, e.g. multifd=on, xbzrle=on, auto-converge=on."),
    Option("parameters", "--parameter", KeyValues(booleans=False), {}, multiple=True, metavar="NAME=VALUE",
           type="dict",
           help="Migration parameter on the source (multifd-channels and multifd-compression on the destination "
                "too), e.g. multifd-channels=4, xbzrle-cache-size=64Mi (sizes: 64M = 64*10^6, 64Mi = 64*2^20)."),
    Option("postcopy", "--postcopy", Flag(), False, type="bool",
           help="Switch to postcopy after the forced passes (destination stays paused)."),
    Option("accel", "--accel", Choice(("tcg", "kvm")), "tcg", show_default=True, type="str",
           help="Accelerator. KVM needs an arm64 host with a usable /dev/kvm and --machine virt."),
    Option("tcg_thread", "--tcg-thread", Choice(("single", "multi")), None, type="str | None",
           help="TCG threading (default: QEMU's, multi-threaded with several vCPUs)."),
    Option("kvm_dirty_ring", "--kvm-dirty-ring", Int(1024, 65536), None, unit="entries", type="int | None",
           help="Use KVM's dirty ring with this many entries instead of the dirty bitmap."),
    Option("seed", "--seed", Int(-(1 << 63), 1 << 63), None, type="int | None",
           help="Seed for the random choices of --inject."),
    Option("host_backing", "--host-backing", Choice(("auto", "anon", "file", "memfd", "memfd-hugetlb", "thp")),
           "auto", matrix="host_backing", show_default=True, type="str",
           help="What backs guest RAM on the host (auto: a shared file for --capture backing-file, anonymous "
                "memory otherwise). The report states the page sizes really in effect."),
    Option("guest_pages", "--guest-pages", Choice(("4k", "hugetlb", "thp")), "4k", matrix="guest_pages",
           show_default=True, type="str",
           help="How dirtyram maps its buffers in the guest: 4 KiB pages, 2 MiB MAP_HUGETLB (the initrd reserves "
                "them) or MADV_HUGEPAGE."),
    Option("run_dir", "--run-dir", PathKind(), None, always=True, type="Path | None",
           help="Where this run's files go (default: ./dirtylog-runs/<time>-<id>)."),
    Option("delete_images", "--delete-images", Flag(), False, matrix="keep_images", matrix_invert=True,
           matrix_default=False, type="bool",
           help="Delete the RAM images of trials that passed (failed trials keep theirs)."),
    # knobs of the plan that are not options: tests and benchmarks set them
    Option("settle_s", None, Seconds(), 1.0, unit="s", type="float"),
    Option("extra_append", None, Kind(), "", type="str"),
)
BY_NAME = {o.name: o for o in OPTIONS}
BY_KEY = {o.matrix: o for o in OPTIONS if o.matrix}
MATRIX_KEYS = tuple(BY_KEY)


def matrix_value(key: str, v):
    """Check one TOML value of a plan key; ValueError says what is wrong."""
    return BY_KEY[key].kind.check(v)


def matrix_defaults() -> dict:
    return {k: o.key_default for k, o in BY_KEY.items()}


# -- the plan ---------------------------------------------------------------------------------------
def _check(self, art) -> None:
    """What the table alone cannot know: these artifacts, and options that need each other."""
    if self.mem_mb < art.min_mem_mb:
        raise InputError(f"--mem {self.mem_mb}: these artifacts need at least {art.min_mem_mb} MiB "
                         f"(the kernel does not boot with less)")
    for o in OPTIONS:  # ranges and choices, the same words as a matrix says them
        v = getattr(self, o.name)
        if v is not None and isinstance(o.kind, (Int, Choice)) and o.flag:
            try:
                o.kind.check(v)
            except ValueError as exc:
                raise InputError(f"{o.flag} {v}: {exc}") from None
    if self.max_bandwidth is not None and self.max_bandwidth <= 0:
        raise InputError("--max-bandwidth must be a positive number of bytes per second")
    if self.tcg_thread and self.accel != "tcg":
        raise InputError("--tcg-thread applies to --accel tcg only")
    if self.kvm_dirty_ring is not None and self.accel != "kvm":
        raise InputError("--kvm-dirty-ring applies to --accel kvm only")
    check_fits(self.workloads, self.mem_mb, art.reserved_mb)


def _field(o: Option):
    if isinstance(o.default, (dict, list)):
        return dataclasses.field(default_factory=lambda d=o.default: type(d)(d))
    return dataclasses.field(default=o.default)


VerifyOptions = dataclasses.make_dataclass(
    "VerifyOptions", [(o.name, o.type, _field(o)) for o in OPTIONS],
    namespace={"check": _check, "__doc__": "One verification's resolved plan: a field per option of "
                                            "verifier.run.options.OPTIONS (see each option's help)."})
VerifyOptions.__module__ = __name__


def from_cli(values: dict) -> VerifyOptions:
    """The plan from the command line's values (click's, by option name; absent ones take their
    default). Repeated options arrive as tuples of parsed items."""
    kw = {}
    for o in OPTIONS:
        if o.name not in values:
            continue
        v = values[o.name]
        if o.invert:
            v = not v
        elif isinstance(o.kind, KeyValues):
            v = dict(v)
        elif o.multiple:
            v = tuple(v) or o.default
        if o.kind.path and v is not None and o.name != "run_dir":
            v = str(v)
        kw[o.name] = v
    return VerifyOptions(**kw)


def from_matrix(params: dict, run_dir: Path) -> VerifyOptions:
    """The plan of one expanded matrix scenario (its params hold checked TOML values)."""
    kw = {"run_dir": run_dir}
    for key, o in BY_KEY.items():
        v = params[key]
        if v is None and o.matrix_default is None and o.default is not None:
            v = o.default  # a key left unset: the plan's default (e.g. migration_address)
        else:
            v = o.kind.plan(v)
            if o.matrix_invert:
                v = not v
        kw[o.name] = v
    return VerifyOptions(**kw)


def reproducer_args(plan: VerifyOptions) -> list[str]:
    """The `dirtylog verify` arguments (after --artifacts) that run this plan alone: every option
    the table marks `always`, and every other one whose value is not its default."""
    args = []
    for o in OPTIONS:
        if o.flag is None:
            continue
        v = getattr(plan, o.name)
        if o.reproduce_when is not None:
            if not o.reproduce_when(plan):
                continue
        elif v == o.default and not o.always:
            continue
        if v is None:
            continue
        if o.kind.is_flag:  # a flag is given exactly when its field is not at its default
            if v != o.default:
                args.append(o.flag)
            continue
        args += o.kind.args(o.flag, v)
    return args
