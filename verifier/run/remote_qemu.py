"""A QEMU on a Host, under remote_agent.py, driven exactly like a local QemuProcess (verifier.run.hosts)."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from verifier.errors import QemuError, VerifyError
from verifier.run.hosts import (HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S, Host, LocalHost, SshHost,
                                classify_ssh_failure)
from verifier.run.qemu import QemuBinary, QemuProcess, SerialConsole, gdb_args


# -- remote QEMU ---------------------------------------------------------------------------------

class RemoteQemu(QemuProcess):
    """A QEMU on a `Host`, driven exactly like a local `QemuProcess`.

    `workdir` is local (logs, command line, forwarded sockets live there or in `sock_dir`);
    `remote_dir` is the QEMU's working directory on the host. A QEMU that would start running at
    once is started paused (-S) and continued once the serial console is connected, so no
    console output is lost.
    """

    def __init__(self, host: Host, binary: QemuBinary, args: list[str], workdir: Path, remote_dir: str,
                 name: str, sock_dir: Path, on_qmp=None, start_timeout: float = 60.0, gdb: bool = False):
        super().__init__(binary, args, workdir, name, on_qmp=on_qmp, gdb=gdb)
        self.host = host
        self.remote_dir = remote_dir
        self.sock_dir = sock_dir
        self.start_timeout = start_timeout
        self.remote_pid: int | None = None
        self.exit_status: int | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._err_file = None

    def start(self) -> None:
        rqmp, rser = f"{self.remote_dir}/qmp.sock", f"{self.remote_dir}/serial.sock"
        lqmp, lser = str(self.sock_dir / f"{self.name}-qmp.sock"), str(self.sock_dir / f"{self.name}-serial.sock")
        args = list(self.args)
        resume = "-S" not in args and "-incoming" not in args
        if resume:
            args.append("-S")
        rgdb, lgdb = f"{self.remote_dir}/gdb.sock", str(self.sock_dir / f"{self.name}-gdb.sock")
        self.cmdline = [self.binary.path, *args,
                        "-chardev", f"socket,id=dirtylog-qmp,path={rqmp},server=on,wait=off",
                        "-mon", "chardev=dirtylog-qmp,mode=control",
                        "-chardev", f"socket,id=dirtylog-serial,path={rser},server=on,wait=off",
                        "-serial", "chardev:dirtylog-serial"] + (gdb_args(rgdb) if self.gdb else [])
        self._write_cmdline(f"# on {self.host.name} in {self.remote_dir}\n")
        self._qmp_log = open(self.workdir / f"qmp-{self.name}.log", "w")
        self._err_file = open(self.workdir / f"ssh-{self.name}.log", "wb")
        forwards = [] if isinstance(self.host, LocalHost) else (
            [(lqmp, rqmp), (lser, rser)] + ([(lgdb, rgdb)] if self.gdb else []))
        for p in (lqmp, lser, lgdb):
            Path(p).unlink(missing_ok=True)
        try:
            self.proc = self.host.popen_agent(["qemu", "--heartbeat", str(HEARTBEAT_TIMEOUT_S), "--dir",
                                               self.remote_dir, "--", *self.cmdline],
                                              forwards, stderr=self._err_file)
        except OSError as exc:
            raise QemuError(f"{self.name} QEMU on {self.host.name}: cannot start ssh: {exc}") from None
        threading.Thread(target=self._read_agent, daemon=True).start()
        threading.Thread(target=self._heartbeat, args=(self.proc,), daemon=True).start()
        if not self._wait_line(lambda l: l == "READY" or l.startswith(("EXIT", "NOEXEC")), self.start_timeout):
            self._start_failed("did not start within %.0f s" % self.start_timeout)
        if not any(l == "READY" for l in self._lines):
            self._start_failed("exited while starting")
        if self.gdb:  # ssh connects the forwarded socket to the stub's when a client comes
            self.gdb_path = Path(self.host.forwarded(rgdb, lgdb))
        qmp_path = self.host.forwarded(rqmp, lqmp)
        ser_path = self.host.forwarded(rser, lser)
        self.serial = SerialConsole(_connect_unix(ser_path, 15), self.workdir / f"serial-{self.name}.log")
        self._connect_qmp(_connect_unix(qmp_path, 15), "QMP handshake over the forwarded socket failed")
        if resume:
            self.qmp("cont")

    def _heartbeat(self, proc: subprocess.Popen) -> None:
        """Tell the agent every HEARTBEAT_INTERVAL_S that its controller is alive; stops when
        the agent's stdin is closed (close()) or broken."""
        while proc.poll() is None:
            try:
                proc.stdin.write(b"\n")
                proc.stdin.flush()
            except (OSError, ValueError):
                return
            time.sleep(HEARTBEAT_INTERVAL_S)

    def _read_agent(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            with self._cond:
                self._lines.append(line)
                if line.startswith("PID "):
                    self.remote_pid = int(line.split()[1])
                if line.startswith("EXIT "):
                    self.exit_status = int(line.split()[1])
                self._cond.notify_all()
        with self._cond:
            self._lines.append("EOF")
            self._cond.notify_all()

    def _wait_line(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(pred(l) for l in self._lines):
                if "EOF" in self._lines:
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.5))
            return True

    def _ssh_stderr(self) -> str:
        try:
            self._err_file.flush()
            return (self.workdir / f"ssh-{self.name}.log").read_text(errors="replace")
        except (OSError, AttributeError, ValueError):
            return ""

    def _start_failed(self, what: str) -> None:
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            rc = None
        if rc == 255 and isinstance(self.host, SshHost):
            raise classify_ssh_failure(self.host.name, self._ssh_stderr(), f"starting the {self.name} QEMU")
        noexec = [l for l in self._lines if l.startswith("NOEXEC")]
        if noexec:
            raise self.host.setup_error(f"{self.name} QEMU on {self.host.name}: cannot run {self.binary.path}: {noexec[0][7:]}")
        self._raise_dead(what)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.exit_status is None

    def output_tail(self, lines: int = 8) -> str:
        if (self.exit_status is None and self.proc is not None and self.proc.poll() == 255
                and isinstance(self.host, SshHost)):
            # ssh gave up (ServerAlive): the QEMU may still run there until its agent's heartbeat
            # timeout ends it; asking the host for its log would only wait for the same timeout
            ssh_err = " ".join(self._ssh_stderr().split())
            return (f"the control connection to {self.host.name} was lost; its agent ends the QEMU within "
                    f"{HEARTBEAT_TIMEOUT_S:.0f} s" + (f" | ssh: {ssh_err[-200:]}" if ssh_err else ""))
        try:
            res = self.host.run(["tail", "-n", str(lines), f"{self.remote_dir}/qemu.log"], timeout=15,
                                check=False, what="tail qemu.log")
            text = res.stdout.decode(errors="replace").strip().splitlines()
        except VerifyError:
            text = []
        ssh_err = " ".join(self._ssh_stderr().split())
        return " | ".join(text[-lines:]) + (f" | ssh: {ssh_err[-200:]}" if ssh_err else "")

    def _where(self) -> str:
        return f" on {self.host.name}"

    def _exit_code(self) -> int | None:
        return self.exit_status

    def _status(self) -> str:
        if self.exit_status is not None:
            return f"exited with {self.exit_status}"
        if self.proc is not None and self.proc.poll() is not None:
            return f"its ssh session ended ({self.proc.returncode})"
        return "still running"

    def _end_process(self, timeout: float) -> None:
        if self.serial is not None:  # ssh waits for forwarded connections before it exits
            self.serial.close()
            self.serial = None
        if self.proc is not None:
            # EOF on the agent's stdin makes it end QEMU (SIGTERM, SIGKILL after 3 s).
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the session closes; sshd hangs up; the agent ends QEMU
                self.proc.wait()

    def _release(self) -> None:
        super()._release()
        for side in ("qmp", "serial", "gdb"):  # the forwarded sockets ssh left behind
            (self.sock_dir / f"{self.name}-{side}.sock").unlink(missing_ok=True)
        if self._err_file is not None:
            self._err_file.close()
            self._err_file = None

    def ram_page_sizes(self, mem_mb: int) -> dict | None:
        return None  # /proc of another host; not reported for remote QEMUs


def _connect_unix(path: str, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError as exc:
            s.close()
            if time.monotonic() > deadline:
                raise QemuError(f"cannot connect to {path}: {exc.strerror}") from None
            time.sleep(0.1)


def short_socket_dir() -> Path:
    """Unix socket paths are limited to 107 bytes: forwarded sockets go to a short private dir."""
    return Path(tempfile.mkdtemp(prefix="dl-", dir="/tmp"))  # short on purpose; removed with the run



def wait_remote_image(proc: "RemoteQemu", path: str, size: int, timeout: float = 60.0) -> None:
    """-savedirtylog writes PATH.partial and renames it when complete: wait for PATH of `size`
    bytes on the QEMU's host (normally already there when the migration is over)."""
    from verifier.errors import CaptureError
    deadline = time.monotonic() + timeout
    while True:
        got = proc.host.agent("size", path).stdout.decode().strip()
        if got == str(size):
            return
        if got != "missing":
            raise CaptureError(f"-savedirtylog image {proc.host.name}:{path} has {got} bytes instead of {size}")
        if not proc.alive():
            raise CaptureError(f"the {proc.name} QEMU on {proc.host.name} exited without writing its "
                               f"-savedirtylog image {path}")
        if time.monotonic() > deadline:
            raise CaptureError(f"the {proc.name} QEMU on {proc.host.name} did not write its -savedirtylog "
                               f"image {path} within {timeout:.0f} s")
        time.sleep(0.5)


