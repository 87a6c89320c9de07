"""QEMU binaries, machine command lines and QEMU processes.

A `QemuProcess` is a context manager: leaving the block always ends the process (QMP `quit`,
then SIGTERM, then SIGKILL), and the child is also bound to our life with PR_SET_PDEATHSIG, so
no QEMU outlives dirtylog, not even when dirtylog itself is killed.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from builder.machines import MIN_QEMU_VERSION, Machine, parse_qemu_version

from verifier.errors import InputError, QemuError

QMP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class QemuBinary:
    path: str
    version: tuple[int, int, int]
    version_text: str

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))


def probe_qemu(name: str) -> QemuBinary:
    """Find a QEMU system emulator and read its version; refuse a missing or too old one."""
    path = shutil.which(name) if os.sep not in name else name
    if not path or not os.path.isfile(path):
        raise InputError(f"QEMU binary not found: {name} (install Debian's qemu-system-arm or pass --qemu PATH)")
    if not os.access(path, os.X_OK):
        raise InputError(f"QEMU binary is not executable: {path}")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InputError(f"cannot run {path} --version: {exc}") from None
    return identify_qemu(path, out.returncode, out.stdout or out.stderr)


def identify_qemu(path: str, returncode: int, output: str) -> QemuBinary:
    """The one judgement of `QEMU --version` output, wherever it ran: the version, or InputError
    for something that is not a QEMU system emulator or is too old."""
    first = (output.splitlines() or [""])[0]
    version = parse_qemu_version(first)
    if returncode != 0 or version is None:
        raise InputError(f"{path} does not look like a QEMU system emulator (--version said: {first!r})")
    if version[:2] < MIN_QEMU_VERSION:
        raise InputError(
            f"{path} is QEMU {'.'.join(map(str, version))}; dirtylog needs QEMU "
            f"{'.'.join(map(str, MIN_QEMU_VERSION))} or newer"
        )
    return QemuBinary(path=path, version=version, version_text=first.strip())


@dataclass
class GuestConfig:
    machine: Machine
    kernel: Path
    dtb: Path | None
    initrd: Path
    append: str
    mem_mb: int
    smp: int
    accel: str = "tcg"
    cpu: str | None = None  # default: the machine's CPU model
    ram_file: str | None = None  # memory-backend-file path (relative to the QEMU's working dir)
    host_backing: str = "anon"  # anon | file | memfd | memfd-hugetlb | thp
    machine_opts: str = ""  # appended to -machine, e.g. "secure=off"
    extra_args: list[str] = field(default_factory=list)


def machine_args(qemu: QemuBinary, cfg: GuestConfig) -> list[str]:
    """The QEMU command line (without the binary) for one guest; one place builds it."""
    m = cfg.machine
    machine_opts = [m.qemu_machine] + ([cfg.machine_opts] if cfg.machine_opts else [])
    args: list[str] = []
    backend = {
        # The guest RAM itself is a file shared with QEMU: capturing it costs no copy.
        "file": f"memory-backend-file,mem-path={cfg.ram_file},share=on",
        "memfd": "memory-backend-memfd,share=on",
        "memfd-hugetlb": "memory-backend-memfd,share=on,hugetlb=on,hugetlbsize=2M",
        "thp": "memory-backend-ram",  # QEMU asks for THP (MADV_HUGEPAGE) on its RAM
    }.get("file" if cfg.ram_file else cfg.host_backing)
    if backend:
        args += ["-object", f"{backend},id=dirtylog-ram,size={cfg.mem_mb}M"]
        machine_opts.append("memory-backend=dirtylog-ram")
    if m.has_sound:
        # vexpress has a sound device; without an audiodev QEMU probes ALSA and prints noise.
        args += ["-audiodev", "none,id=dirtylog-snd"]
        if qemu.version[:2] >= (8, 2):
            machine_opts.append("audiodev=dirtylog-snd")
    accel = cfg.accel
    args = ["-machine", ",".join(machine_opts), "-accel", accel, "-cpu", cfg.cpu or m.cpu,
            "-smp", str(cfg.smp), "-m", f"{cfg.mem_mb}M"] + args
    args += ["-kernel", str(cfg.kernel), "-initrd", str(cfg.initrd)]
    if cfg.dtb:
        args += ["-dtb", str(cfg.dtb)]
    args += ["-append", cfg.append, "-display", "none", "-no-reboot", "-nodefaults"]
    args += cfg.extra_args
    return args


def _bind_to_parent() -> None:
    """In the child before exec: die with the parent (PR_SET_PDEATHSIG = 1)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


class SerialConsole:
    """The guest's serial port over a socketpair: a reader thread keeps a transcript and a log."""

    def __init__(self, sock: socket.socket, log_path: Path):
        self._sock = sock
        self._log = open(log_path, "wb")
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self._buf += data
                self._log.write(data)
                self._log.flush()
                self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return self._buf.decode("utf-8", "replace")

    def mark(self) -> int:
        """Position in the transcript; pass to wait_for(since=...) to look only at newer output."""
        with self._cond:
            return len(self._buf)

    def wait_for(self, pattern: str, timeout: float, since: int = 0,
                 alive=None) -> re.Match | None:
        """Wait until `pattern` (a regex) appears after `since`; None on timeout or EOF."""
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf, since)
                if m:
                    return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                if alive is not None and not alive():
                    return None
                self._cond.wait(min(remaining, 0.5))

    def write(self, text: str) -> None:
        self._sock.sendall(text.encode())

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._sock.close()
        self._log.close()


def gdb_args(sock_path: str) -> list[str]:
    """QEMU arguments for a gdbstub on a unix socket that does not wait for a client."""
    return ["-gdb", f"unix:{sock_path},server=on,wait=off"]


class QemuProcess:
    """One QEMU with its QMP monitor and serial console, all on socketpairs (no paths, no ports)."""

    def __init__(self, binary: QemuBinary, args: list[str], workdir: Path, name: str, on_qmp=None,
                 gdb: bool = False):
        self.binary = binary
        self.args = args
        self.gdb = gdb  # a gdbstub on a unix socket (verifier.capture.cpustate reads the CPU state there)
        self.gdb_path: Path | None = workdir / f"gdb-{name}.sock" if gdb else None
        self.workdir = workdir
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.serial: SerialConsole | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._qmp: QMPClient | None = None
        self._qmp_log = None
        self.cmdline: list[str] = []
        self.stderr_path = workdir / f"qemu-{name}.log"
        self.on_qmp = on_qmp  # called with each logged QMP line (--verbose)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "QemuProcess":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        qmp_ours, qmp_theirs = socket.socketpair()
        ser_ours, ser_theirs = socket.socketpair()
        self.cmdline = [self.binary.path, *self.args,
                        "-chardev", f"socket,id=dirtylog-qmp,fd={qmp_theirs.fileno()}",
                        "-mon", "chardev=dirtylog-qmp,mode=control",
                        "-chardev", f"socket,id=dirtylog-serial,fd={ser_theirs.fileno()}",
                        "-serial", "chardev:dirtylog-serial"]
        if self.gdb:  # relative: the QEMU runs in workdir, and a deep workdir overflows sun_path
            self.cmdline += gdb_args(self.gdb_path.name)
        self._write_cmdline()
        self._qmp_log = open(self.workdir / f"qmp-{self.name}.log", "w")
        self.serial = SerialConsole(ser_ours, self.workdir / f"serial-{self.name}.log")
        with open(self.stderr_path, "wb") as err:
            try:
                self.proc = subprocess.Popen(
                    self.cmdline, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=err,
                    stderr=subprocess.STDOUT, pass_fds=(qmp_theirs.fileno(), ser_theirs.fileno()),
                    preexec_fn=_bind_to_parent)
            except OSError as exc:
                raise QemuError(f"cannot start {self.binary.path}: {exc}", cmdline=self.cmdline) from None
            finally:
                qmp_theirs.close()
                ser_theirs.close()
        self._connect_qmp(qmp_ours, "QMP handshake failed")

    # -- pieces shared with RemoteQemu ---------------------------------------------------------
    def _write_cmdline(self, header: str = "") -> None:
        (self.workdir / f"cmdline-{self.name}.txt").write_text(
            header + " ".join(_shell_quote(a) for a in self.cmdline) + "\n")

    def _connect_qmp(self, sock: socket.socket, what: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._qmp = QMPClient(f"dirtylog-{self.name}")
        try:
            self._run(self._qmp.connect(sock), timeout=30)
        except (QMPError, OSError, asyncio.TimeoutError, EOFError) as exc:
            self._raise_dead(f"{what} ({type(exc).__name__})")

    def _where(self) -> str:
        """Where the QEMU runs, for messages ("" here, " on HOST" for a remote one)."""
        return ""

    def _exit_code(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def _status(self) -> str:
        rc = self._exit_code()
        return f"exited with {rc}" if rc is not None else "still running"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output_tail(self, lines: int = 8) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def _raise_dead(self, what: str) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        status = self._status()
        tail = self.output_tail()
        hint = ("; the CPU-state check needs QEMU's gdbstub (-gdb): --no-cpu-state skips it"
                if self.gdb and "gdb" in tail.lower() else "")
        raise QemuError(f"{self.name} QEMU{self._where()}: {what}; process {status}"
                        + (f"; it said: {tail}" if tail else "") + hint
                        + f"; command line in {self.workdir / ('cmdline-' + self.name + '.txt')}",
                        cmdline=self.cmdline, exit_status=self._exit_code(), output_tail=tail)

    def close(self, timeout: float = 10.0) -> None:
        """quit over QMP, end the process, release sockets, loop and logs; safe to call twice."""
        if self._qmp is not None and self.alive():
            try:
                self.qmp("quit", timeout=5)
            except Exception:  # noqa: BLE001 - the process is ended below whatever QMP said
                pass
        if self._qmp is not None and self._loop is not None:
            try:
                self._run(self._qmp.disconnect(), timeout=5)
            except BaseException:  # noqa: BLE001
                pass
            self._qmp = None
        self._end_process(timeout)
        self._release()

    def _end_process(self, timeout: float) -> None:
        if self.proc is not None:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and self.proc.poll() is None:
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=timeout if sig is None else 5)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def _release(self) -> None:
        if self.serial is not None:
            self.serial.close()
            self.serial = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        if self._qmp_log is not None:
            self._qmp_log.close()
            self._qmp_log = None

    # -- QMP ---------------------------------------------------------------------------------
    def _run(self, coro, timeout: float):
        assert self._loop is not None
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def qmp(self, cmd: str, timeout: float = QMP_TIMEOUT_S, **arguments):
        """Execute one QMP command; every command and answer goes to qmp-<name>.log."""
        if self._qmp is None:
            raise QemuError(f"{self.name} QEMU: QMP is not connected")
        self._log_qmp(">", {"execute": cmd, "arguments": arguments} if arguments else {"execute": cmd})
        try:
            result = self._run(self._qmp.execute(cmd, arguments or None), timeout=timeout)
        except ExecuteError as exc:
            self._log_qmp("<", {"error": str(exc)})
            raise QemuError(f"{self.name} QEMU refused {cmd}: {exc}") from None
        except asyncio.TimeoutError:
            self._log_qmp("<", {"error": "timeout"})
            if not self.alive():
                self._raise_dead(f"died during {cmd}")
            raise QemuError(f"{self.name} QEMU did not answer {cmd} within {timeout:.0f} s") from None
        except (QMPError, OSError, EOFError) as exc:
            self._log_qmp("<", {"error": repr(exc)})
            if cmd == "quit":
                return None
            self._raise_dead(f"lost its QMP connection during {cmd}")
        self._log_qmp("<", {"return": result})
        return result

    def take_events(self, name: str) -> list[dict]:
        """The QMP events named `name` received so far (during earlier qmp() calls) and not yet
        taken, oldest first, each logged to qmp-<name>.log; other events are dropped."""
        if self._qmp is None:
            return []
        taken = []
        for msg in self._qmp.events.clear():
            ev = dict(msg)
            if ev.get("event") == name:
                self._log_qmp("<", ev)
                taken.append(ev)
        return taken

    def _log_qmp(self, direction: str, msg: dict) -> None:
        line = f"{direction} {json.dumps(msg, default=str)}"
        if self._qmp_log is not None:
            self._qmp_log.write(f"{time.time():.3f} {line}\n")
            self._qmp_log.flush()
        if self.on_qmp is not None:
            self.on_qmp(f"QMP {self.name} {line}")

    def status(self) -> str:
        return self.qmp("query-status")["status"]

    def ram_page_sizes(self, mem_mb: int) -> dict | None:
        """Page sizes really in effect for the guest RAM mapping, read from /proc/PID/smaps."""
        if not self.alive():
            return None
        want = mem_mb * 1024  # kB
        try:
            text = open(f"/proc/{self.proc.pid}/smaps").read()
        except OSError:
            return None
        for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
            fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", block, re.M))
            if int(fields.get("Size", 0)) == want:
                head = block.split("\n", 1)[0].split()
                return {"mapping": " ".join(head[5:]) or "[anonymous]",
                        "kernel_page_size_kb": int(fields.get("KernelPageSize", 0)),
                        "anon_huge_pages_kb": int(fields.get("AnonHugePages", 0)),
                        "shmem_huge_pages_kb": int(fields.get("ShmemPmdMapped", 0)),
                        "rss_kb": int(fields.get("Rss", 0))}
        return None


def _shell_quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"
