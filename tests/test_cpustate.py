"""The CPU-state oracle (verifier.capture.cpustate): RSP framing and compare() without QEMU, and real
migrations read through both gdbstubs (e2e).

The e2e tests start QEMU themselves (subprocess, killed in `finally`) with a tiny synchronous
QMP client, so they depend on nothing else of the verifier. `MigrationPair` is also used by
benchmarks/cpustate.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from verifier.capture.cpustate import (CpuStateError, GdbStub, compare, decode_body, escape, frame, load_allowlist, parse_packet, parse_regs, show_value)
from verifier.errors import VerifyError
from verifier.run.qemu import gdb_args

ART = Path("unset")  # the guest artifacts: set by the e2e fixture below from conftest's `artifacts`


# ============================================================================ harness

class Qmp:
    """A minimal synchronous QMP client over a unix socket."""

    def __init__(self, path: Path, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, cmd: str, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {cmd}: {reply['error']}")
            return reply["return"]

    def status(self) -> str:
        return self.execute("query-status")["status"]

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


def qemu_version(binary: str) -> tuple[int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    major, minor = out.split("version ", 1)[1].split(".")[:2]
    return int(major), int(minor)


def guest_args(kind: str, binary: str, machine_opts: str = "", smp: int = 2) -> list[str]:
    """QEMU arguments (no binary, no sockets) for the guests used here."""
    if kind in ("vexpress-a15", "virt"):
        mopts = [kind] + ([machine_opts] if machine_opts else [])
        extra: list[str] = []
        if kind == "vexpress-a15":
            extra = ["-audiodev", "none,id=snd", "-dtb", str(ART / "guest_a15x2.dtb")]
            if qemu_version(binary) >= (8, 2):
                mopts.append("audiodev=snd")
        return ["-M", ",".join(mopts), "-cpu", "cortex-a15", "-smp", str(smp), "-m", "256",
                "-kernel", str(ART / "zImage"), "-initrd", str(ART / "initrd.cpio-dirtyram.gz"),
                "-append", "console=ttyAMA0 panic=1", *extra]
    if kind == "virt-aarch64":  # no kernel: the vCPUs spin in empty flash, fine for registers
        return ["-M", "virt", "-cpu", "cortex-a57", "-smp", str(smp), "-m", "256"]
    if kind == "q35":  # no kernel, no disk: SeaBIOS finds nothing to boot and waits
        return ["-M", "q35", "-smp", str(smp), "-m", "256"]
    raise ValueError(kind)


class MigrationPair:
    """A source and an incoming destination QEMU in `workdir` (its cwd), each with QMP and a
    gdbstub on relative unix sockets (gdb-src.sock, gdb-dst.sock)."""

    def __init__(self, binary: str, args: list[str], workdir: Path):
        self.binary, self.args, self.dir = binary, args, Path(workdir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.qmp: dict[str, Qmp] = {}

    def _start(self, side: str, extra: list[str]) -> None:
        cmd = [self.binary, *self.args, "-display", "none", "-nodefaults", "-no-reboot",
               "-serial", f"file:serial-{side}.log", "-qmp", f"unix:qmp-{side}.sock,server=on,wait=off",
               *gdb_args(f"gdb-{side}.sock"), *extra]
        (self.dir / f"cmdline-{side}").write_text(" ".join(cmd) + "\n")
        self.procs[side] = subprocess.Popen(cmd, cwd=self.dir, stdin=subprocess.DEVNULL,
                                            stdout=open(self.dir / f"qemu-{side}.out", "wb"),
                                            stderr=subprocess.STDOUT)
        self.qmp[side] = Qmp(self.dir / f"qmp-{side}.sock")

    def start(self) -> "MigrationPair":
        self._start("src", [])
        self._start("dst", ["-S", "-incoming", "unix:mig.sock"])
        return self

    def gdb_sock(self, side: str) -> Path:
        return self.dir / f"gdb-{side}.sock"

    def migrate(self, timeout: float = 60.0) -> None:
        src = self.qmp["src"]
        src.execute("migrate", uri="unix:mig.sock")
        deadline = time.monotonic() + timeout
        while True:
            st = src.execute("query-migrate").get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"migration {st}")
            time.sleep(0.1)
        while src.status() != "postmigrate":
            if time.monotonic() > deadline:
                raise RuntimeError("source never reached postmigrate")
            time.sleep(0.05)
        while self.qmp["dst"].execute("query-migrate").get("status") != "completed":
            if time.monotonic() > deadline:
                raise RuntimeError("destination never completed the incoming migration")
            time.sleep(0.05)

    def close(self) -> None:
        for q in self.qmp.values():
            q.close()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)


def migrated_pair(binary: str, args: list[str], workdir: Path, boot_s: float = 5.0) -> MigrationPair:
    pair = MigrationPair(binary, args, workdir).start()
    try:
        time.sleep(boot_s)
        pair.migrate()
    except BaseException:
        pair.close()
        raise
    return pair


def read_both(pair: MigrationPair) -> tuple[dict, dict]:
    with GdbStub(pair.gdb_sock("src")) as s:
        src = s.read_all()
    with GdbStub(pair.gdb_sock("dst")) as d:
        dst = d.read_all()
    return src, dst


_PATCHED: list[str] = []


@pytest.fixture
def e2e_env(artifacts):
    """Real artifacts (conftest) and the patched QEMU 10.0 (built or reused from the cache)."""
    global ART
    ART = Path(artifacts)
    if not _PATCHED:
        from builder import qemu_build
        from builder.cache import Cache
        _PATCHED.append(str(qemu_build.build_patched_qemu("10.0", Cache()).qemu_system_arm))
    return _PATCHED[0]


def patched_qemu() -> str:
    assert _PATCHED, "use the e2e_env fixture"
    return _PATCHED[0]


# ============================================================================ unit tests

def test_gdb_args_form():
    assert gdb_args("gdb-src.sock") == ["-gdb", "unix:gdb-src.sock,server=on,wait=off"]


def test_frame_checksum_and_escape():
    assert frame(b"qSupported") == b"$qSupported#37"
    assert frame(b"OK") == b"$OK#9a"
    assert escape(b"a#b$c}d*") == b"a}\x03b}\x04c}]d}\x0a"
    body, used = parse_packet(frame(b"a#b$c}d*"))
    assert decode_body(body) == b"a#b$c}d*"
    assert used == len(frame(b"a#b$c}d*"))


def test_run_length_decoding():
    # '0* ' = '0' and 32-29 = 3 more copies; QEMU compresses long zero registers like this.
    assert decode_body(b"0* 1") == b"00001"
    assert decode_body(b"ab*\"c") == b"abbbbbbc"  # '"' = 34 -> 5 more
    assert decode_body(b"x}]") == b"x}"


def test_parse_packet_skips_acks_and_waits_for_complete():
    assert parse_packet(b"+$OK#9") == (None, 1)
    body, used = parse_packet(b"++$OK#9a+")
    assert body == b"OK" and used == 8


def test_malformed_replies_are_one_line_errors():
    with pytest.raises(CpuStateError, match="checksum") as e:
        parse_packet(b"$OK#00")
    assert "\n" not in str(e.value) and e.value.exit_code == 3 and isinstance(e.value, VerifyError)
    with pytest.raises(CpuStateError, match="run-length"):
        decode_body(b"*!")
    with pytest.raises(CpuStateError, match="escape"):
        decode_body(b"ab}")


def test_parse_regs_implicit_regnum_and_includes():
    target = ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target>'
              '<architecture>arm</architecture><xi:include href="arm-core.xml"/>'
              '<xi:include href="system-registers.xml"/></target>')
    regs, inc, nxt = parse_regs(target)
    assert regs == [] and inc == ["arm-core.xml", "system-registers.xml"] and nxt == 0
    core = ('<feature name="org.gnu.gdb.arm.core"><reg name="r0" bitsize="32"/>'
            '<reg name="r1" bitsize="32"/><reg name="cpsr" bitsize="32" regnum="25"/>'
            '<reg name="x" bitsize="64"/></feature>')
    regs, inc, nxt = parse_regs(core, 0)
    assert regs == [(0, "r0", 32), (1, "r1", 32), (25, "cpsr", 32), (26, "x", 64)] and nxt == 27
    with pytest.raises(CpuStateError, match="target description"):
        parse_regs("<feature><reg bitsize='32'/></feature>")


ALLOW = {"CNTVCT*": "virtual counter runs", "PMCCNTR": "cycle counter"}


def test_compare_identical_allowed_and_differences():
    src = {0: {"r0": "01000000", "CNTVCT": "10", "PMCCNTR": "aa"}, 1: {"r0": "00"}}
    dst = {0: {"r0": "01000000", "CNTVCT": "20", "PMCCNTR": "aa"}, 1: {"r0": "00"}}
    res = compare(src, dst, "armv7", allowlist=ALLOW)
    assert res["identical"] and res["registers_compared"] == 4 and res["differences"] == []
    assert res["allowed"] == [{"vcpu": 0, "register": "CNTVCT", "src": "10", "dst": "20",
                               "reason": "virtual counter runs"}]
    dst[1]["r0"] = "05"
    dst[0]["TTBR1_S"] = "00"
    res = compare(src, dst, "armv7", allowlist=ALLOW)
    assert not res["identical"]
    assert res["differences"] == [{"vcpu": 0, "register": "TTBR1_S", "src": None, "dst": "00"},
                                  {"vcpu": 1, "register": "r0", "src": "00", "dst": "05"}]


def test_compare_missing_vcpu_and_allowlisted_one_side_only_is_a_difference():
    res = compare({0: {"CNTVCT": "1"}, 1: {"r0": "0"}}, {0: {}}, "armv7", allowlist=ALLOW)
    assert [(d["vcpu"], d["register"]) for d in res["differences"]] == [(0, "CNTVCT"), (1, "r0")]


def test_allowlist_file_has_every_arch_with_reasons():
    for arch in ("armv7", "aarch64", "x86_64"):
        allow = load_allowlist(arch)
        assert all(isinstance(r, str) and r and "\n" not in r for r in allow.values())
    with pytest.raises(CpuStateError):
        load_allowlist("riscv")


def test_show_value_is_big_endian():
    assert show_value("78563412") == "0x12345678"
    assert show_value(None) == "absent"
    assert show_value("unavailable") == "unavailable"


def test_stub_not_listening_is_one_line_error(tmp_path):
    with pytest.raises(CpuStateError, match="cannot connect to gdbstub socket") as e:
        GdbStub(tmp_path / "nothing.sock", timeout=1).connect()
    assert "\n" not in str(e.value)


def test_stub_silent_times_out(tmp_path):
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        with pytest.raises(CpuStateError, match="did not answer .* within 0.3 s") as e:
            GdbStub(path, timeout=0.3).connect()
        assert "\n" not in str(e.value)
    finally:
        server.close()


def test_long_socket_path_uses_dirfd(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "gdb-src.sock"
    assert len(str(path)) > 108
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(deep)
    try:
        server.bind("gdb-src.sock")  # like QEMU does, relative to its cwd
    finally:
        os.chdir(cwd)
    server.listen(1)
    try:
        # a fake stub answering qSupported with an empty target description offer
        stub = GdbStub(path, timeout=2)
        import threading

        def serve():
            conn, _ = server.accept()
            conn.recv(4096)
            conn.sendall(b"+" + frame(b"PacketSize=1000;qXfer:features:read+"))
            conn.recv(16)
            conn.close()
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        stub.connect()
        assert stub.features["qXfer:features:read"] == "+"
        stub.close()
        t.join(5)
    finally:
        server.close()


# ============================================================================ e2e

@pytest.mark.e2e
def test_vexpress_secure_banks_not_migrated(tmp_path, e2e_env):
    """Known QEMU bug under TCG: Secure CP15 banks (TTBR1_S, DACR_S, ...) are not migrated."""
    binary = patched_qemu()
    pair = migrated_pair(binary, guest_args("vexpress-a15", binary), tmp_path)
    try:
        src, dst = read_both(pair)
        res = compare(src, dst, "armv7")
        names = {(d["vcpu"], d["register"]) for d in res["differences"]}
        assert (0, "TTBR1_S") in names, res["differences"]
        assert not res["identical"]
        assert pair.qmp["src"].status() == "postmigrate" and pair.qmp["dst"].status() == "paused"
    finally:
        pair.close()


@pytest.mark.e2e
def test_virt_clean_migration_identical(tmp_path, e2e_env):
    binary = patched_qemu()
    pair = migrated_pair(binary, guest_args("virt", binary), tmp_path)
    try:
        src, dst = read_both(pair)
        res = compare(src, dst, "armv7")
        assert res["identical"], res["differences"]
        assert res["registers_compared"] > 300
        assert pair.qmp["src"].status() == "postmigrate" and pair.qmp["dst"].status() == "paused"
    finally:
        pair.close()


@pytest.mark.e2e
def test_planted_register_difference_is_named(tmp_path, e2e_env):
    binary = patched_qemu()
    pair = migrated_pair(binary, guest_args("virt", binary), tmp_path)
    try:
        with GdbStub(pair.gdb_sock("src")) as s:
            src = s.read_all()
        with GdbStub(pair.gdb_sock("dst")) as d:
            old = src[1]["r5"]
            new = bytes(b ^ 0x5A for b in bytes.fromhex(old)).hex()
            d.select(d.thread_ids()[1])
            d.write_register(d.regnum("r5"), new)
            dst = d.read_all()
        res = compare(src, dst, "armv7")
        assert res["differences"] == [{"vcpu": 1, "register": "r5", "src": old, "dst": new}]
    finally:
        pair.close()


@pytest.mark.e2e
def test_stub_not_listening_on_a_running_qemu(tmp_path, e2e_env):
    """QEMU without -gdb: the socket the caller expects is not there -> one-line CpuStateError."""
    binary = patched_qemu()
    proc = subprocess.Popen([binary, *guest_args("virt", binary), "-display", "none", "-nodefaults",
                             "-S"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        with pytest.raises(CpuStateError, match="cannot connect to gdbstub socket") as e:
            with GdbStub(tmp_path / "gdb-src.sock", timeout=2):
                pass
        assert "\n" not in str(e.value)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_async_stop_reply_is_skipped(tmp_path):
    """QEMU 7.2 sends 'T02thread:01;' when the connect stopped a running VM; not a reply."""
    import threading
    path = tmp_path / "stop.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        conn.recv(4096)
        conn.sendall(b"+" + frame(b"T02thread:01;") + frame(b"PacketSize=1000;qXfer:features:read+"))
        time.sleep(0.5)
        conn.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        stub = GdbStub(path, timeout=2)
        stub.connect()
        assert stub.features["PacketSize"] == "1000"
        stub.close()
    finally:
        t.join(5)
        server.close()


# ============================================================================ through `dirtylog verify`

def test_verify_names_exactly_the_registers_planted_on_the_destination(tmp_path, e2e_env):
    """--inject cpu-register:3 changes r4-r6 of the destination's vCPU 0 through its gdbstub before
    it is read (and restores them): the run FAILs on CPU state alone and names exactly those."""
    from conftest import run_dirtylog
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", ART, "--qemu", e2e_env, "--smp", "2", "--min-passes", "1",
                       "--inject", "cpu-register:3", "--run-dir", run_dir)
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads((run_dir / "report.json").read_text())
    trial = report["trials"][0]
    assert trial["checks"]["memory"]["ok"] is True
    assert trial["checks"]["liveness"]["ok"] is True  # restored: the guest runs on
    assert trial["checks"]["cpu_state"]["ok"] is False
    assert [(d["vcpu"], d["register"]) for d in trial["cpu_state"]["differences"]] == [(0, "r4"), (0, "r5"), (0, "r6")]
    assert trial["injection"]["detected"] == 3 and trial["injection"]["other_differences"] == 0
    assert trial["cpu_state"]["vcpus"] == 2 and trial["cpu_state"]["registers_compared"] >= 400  # 224 per vCPU on vexpress-a15 secure=off
    first = res.stdout.splitlines()[0]
    assert first.startswith("dirtylog verify: FAIL") and "CPU state: 3 register values differ on 1 vCPU (r4, r5, r6)" in first
    for side in ("src", "dst"):
        assert set(json.loads((run_dir / "trial-01" / f"cpu-{side}.json").read_text())) == {"0", "1"}


def test_verify_no_cpu_state_is_recorded(tmp_path, e2e_env):
    from conftest import run_dirtylog
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", ART, "--qemu", e2e_env, "--smp", "1", "--min-passes", "1",
                       "--no-cpu-state", "--run-dir", run_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    trial = json.loads((run_dir / "report.json").read_text())["trials"][0]
    assert trial["cpu_state"] == {"skipped": "--no-cpu-state"}
    assert "-gdb" not in trial["cmdlines"]["src"]
    assert res.stdout.splitlines()[0].endswith("memory identical; CPU state not compared (--no-cpu-state); "
                                               "device state identical; guest ran after resume")
    bad = run_dirtylog("verify", "--artifacts", ART, "--qemu", e2e_env, "--no-cpu-state", "--inject", "cpu-register",
                       "--run-dir", tmp_path / "bad")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("dirtylog: error: --inject cpu-register")
    assert not (tmp_path / "bad").exists()
