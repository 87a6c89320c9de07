"""Source and destination on two hosts (issue #7): hosts, remote QEMUs, remote capture digests.

Design:
- A `Host` runs commands and copies files. `LocalHost` is this machine; `SshHost` uses the
  OpenSSH client with BatchMode, StrictHostKeyChecking=yes and a known_hosts file of our own:
  an unknown or changed host key is refused, never accepted.
- A remote QEMU runs under `remote_agent.py qemu` (copied to the host, run by its python3) in a
  run directory on that host. Its QMP monitor and serial console are unix sockets in that
  directory, forwarded to local unix sockets by the same ssh process that started it
  (`ssh -L local.sock:remote.sock`); no monitor listens on a network port. The agent reads its
  stdin from that ssh session and kills QEMU on EOF, so QEMU dies when the controller, the ssh
  process or the session goes away. `RemoteQemu` is a `QemuProcess`, so `run_migration` and
  `verifier.trial` drive it unchanged.
- Capture is QEMU's own `-savedirtylog` when both hosts' QEMUs have it (`--capture auto` or
  `savedirtylog`), else `pmemsave`, into each host's run directory. Each host digests its image page by page
  (`remote_agent.py digest`); only the pages whose digests differ are fetched (from both sides)
  into local sparse images at their offsets, so `verifier.diagnosis.analyse` and the report work
  on them. The bytes moved are counted.
- Failures are one-line typed errors, all infrastructure failures (exit 3) as issue #7 asks:
  an unreachable host, an unknown or changed host key, a refused key, a missing or too old
  QEMU (or python3) on a remote host, QEMUs of different versions on the two hosts (unless
  allowed), a lost link, a killed remote QEMU. (Only the local machine's own QEMU, when it is
  one of the two hosts, is an input error as in a one-host run.)
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import socket
import subprocess
import tempfile
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts import sha256_file
from .compare import DEFAULT_PAGE_SIZE, CompareResult
from .errors import InputError, QemuError, VerifyError
from .qemu import QemuBinary, QemuProcess, SerialConsole, gdb_args
from .report import diagnose_trial
from .trial import Sites, run_trial

AGENT_SOURCE = Path(__file__).with_name("remote_agent.py")
DEFAULT_REMOTE_BASE = "/var/tmp/dirtylog-remote"
SSH_CONNECT_TIMEOUT_S = 10
HEARTBEAT_INTERVAL_S = 2.0  # the controller writes a byte to each remote agent this often
HEARTBEAT_TIMEOUT_S = 30.0  # an agent that hears nothing this long ends its QEMU (after our ssh's
# own ServerAlive gives up, 15-20 s, so the controller reports the lost connection first)
COMMAND_TIMEOUT_S = 60.0


class HostUnreachable(VerifyError):
    """The host does not answer (no route, refused, timeout): exit 3."""


class HostKeyError(VerifyError):
    """The host's key is not in the known_hosts file, or differs from it: exit 3."""


class HostAuthError(VerifyError):
    """The host refused our key: exit 3."""


class HostSetupError(VerifyError):
    """A remote host lacks what dirtylog needs there (QEMU, python3), or its QEMU is not the
    other host's version: exit 3."""


class RemoteCommandError(VerifyError):
    """A command on the host failed: exit 3."""


def classify_ssh_failure(host: str, stderr: str, what: str) -> VerifyError:
    """ssh exits 255 for its own failures; turn its message into one typed line."""
    text = " ".join(stderr.split())
    if re.search(r"Host key verification failed|No \S+ host key is known|HOST IDENTIFICATION HAS CHANGED"
                 r"|host key for .* has changed", text):
        return HostKeyError(f"{host}: host key unknown or changed (not in the known_hosts file); "
                            f"refusing to connect ({what})")
    if "Permission denied" in text or "Too many authentication failures" in text:
        return HostAuthError(f"{host}: authentication failed (the host refused the key) ({what})")
    if re.search(r"Could not resolve hostname", text):
        return HostUnreachable(f"{host}: cannot resolve the host name ({what})")
    m = re.search(r"(Connection refused|No route to host|Connection timed out|Network is unreachable"
                  r"|Operation timed out|Connection reset|Connection closed|Broken pipe|timed out)", text)
    if m:
        return HostUnreachable(f"{host}: unreachable: {m.group(1).lower()} ({what})")
    tail = text[-300:] if text else "no message"
    return HostUnreachable(f"{host}: ssh failed ({what}): {tail}")


class Host:
    """Somewhere QEMU runs. Paths given to a host are paths on that host."""

    name = "host"
    base_dir: str = DEFAULT_REMOTE_BASE
    python = "python3"
    bytes_uploaded = 0

    # -- to implement ------------------------------------------------------------------------
    def _argv(self, remote_argv: list[str], forwards: list[tuple[str, str]] = ()) -> list[str]:
        raise NotImplementedError

    def forwarded(self, remote_path: str, local_path: str) -> str:
        """The local path through which `remote_path` (a unix socket) is reached."""
        raise NotImplementedError

    # -- common ------------------------------------------------------------------------------
    def run(self, argv: list[str], input: bytes | None = None, timeout: float = COMMAND_TIMEOUT_S,
            check: bool = True, what: str | None = None) -> subprocess.CompletedProcess:
        """Run argv on the host; stdout/stderr as bytes. check: a non-zero status raises."""
        what = what or " ".join(argv[:3])
        try:
            res = subprocess.run(self._argv(argv), input=input, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HostUnreachable(f"{self.name}: no answer within {timeout:.0f} s ({what})") from None
        except OSError as exc:
            raise InputError(f"cannot run ssh: {exc}") from None
        if res.returncode == 255 and self.is_ssh:
            raise classify_ssh_failure(self.name, res.stderr.decode(errors="replace"), what)
        if check and res.returncode != 0:
            err = " ".join(res.stderr.decode(errors="replace").split())[-300:]
            raise RemoteCommandError(f"{self.name}: {what} failed with status {res.returncode}: {err}")
        return res

    is_ssh = False

    def setup_error(self, msg: str) -> VerifyError:
        """What a host lacking QEMU or python3 raises: an infrastructure failure on a remote
        host (exit 3), an input error on this machine (exit 2, as in a one-host run)."""
        return HostSetupError(msg) if self.is_ssh else InputError(msg)

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["sh", "-c", script], **kw)

    def check(self) -> str:
        """Reach the host and find its python3; returns `uname -m`. Typed errors otherwise."""
        res = self.sh(f"command -v {self.python} >/dev/null || {{ echo nopython; exit 0; }}; uname -m",
                      what="connect", timeout=SSH_CONNECT_TIMEOUT_S + 20)
        out = res.stdout.decode().strip()
        if out == "nopython":
            raise self.setup_error(f"{self.name}: no {self.python} on the host (dirtylog's remote agent needs it)")
        return out

    def probe_qemu(self, name: str) -> QemuBinary:
        """Like verifier.qemu.probe_qemu, on the host."""
        from .qemu import identify_qemu
        res = self.sh(f"p=$(command -v {shlex.quote(name)}) || exit 127; echo \"$p\"; \"$p\" --version",
                      check=False, what=f"{name} --version")
        if res.returncode == 127:
            raise self.setup_error(f"{self.name}: QEMU binary not found: {name} (install qemu-system-arm there)")
        path, _, output = res.stdout.decode(errors="replace").partition("\n")
        try:
            return identify_qemu(path or name, res.returncode, output)
        except InputError as exc:
            raise self.setup_error(f"{self.name}: {exc}") from None

    def supports_savedirtylog(self, qemu_path: str) -> bool:
        """Does this host's QEMU list -savedirtylog in its -help?"""
        res = self.sh(f"{shlex.quote(qemu_path)} -help 2>/dev/null | grep -q '^-savedirtylog' && echo yes || echo no",
                      check=False, what=f"{qemu_path} -help")
        return res.stdout.decode().strip() == "yes"

    def put(self, local: Path, remote_path: str) -> int:
        """Copy a file; verified by sha256 on arrival; skipped when it is already there.
        Returns the bytes sent (0 when skipped)."""
        data_sha = sha256_file(local)
        q = shlex.quote(remote_path)
        res = self.sh(f"sha256sum {q} 2>/dev/null || true", what=f"sha256sum {remote_path}")
        if res.stdout.decode().split()[:1] == [data_sha]:
            return 0
        tmp = shlex.quote(f"{remote_path}.part-{secrets.token_hex(4)}")
        size = local.stat().st_size
        with open(local, "rb") as f:
            res = self.sh(f"mkdir -p $(dirname {q}) && cat > {tmp} && sha256sum {tmp}",
                          input=f.read(), timeout=COMMAND_TIMEOUT_S + size / 1e6, what=f"copy {local.name}")
        got = res.stdout.decode().split()[:1]
        if got != [data_sha]:
            self.sh(f"rm -f {tmp}", check=False)
            raise RemoteCommandError(f"{self.name}: {local.name} arrived damaged "
                                     f"(sha256 {got[0] if got else '?'} instead of {data_sha})")
        self.sh(f"mv -f {tmp} {q}", what=f"install {remote_path}")
        self.bytes_uploaded += size
        return size

    def put_cached(self, local: Path) -> tuple[str, int]:
        """Copy into the host's content-addressed file cache; returns (remote path, bytes sent)."""
        digest = sha256_file(local)
        remote = f"{self.base_dir}/files/{digest[:16]}-{local.name}"
        return remote, self.put(local, remote)

    def agent_path(self) -> str:
        if getattr(self, "_agent", None) is None:
            self._agent, _ = self.put_cached(AGENT_SOURCE)
        return self._agent

    def agent(self, *args: str, input: bytes | None = None, timeout: float = COMMAND_TIMEOUT_S,
              check: bool = True) -> subprocess.CompletedProcess:
        return self.run([self.python, self.agent_path(), *args], input=input, timeout=timeout, check=check,
                        what=f"remote_agent.py {args[0]}")

    def popen_agent(self, args: list[str], forwards: list[tuple[str, str]], stderr) -> subprocess.Popen:
        argv = self._argv([self.python, "-u", self.agent_path(), *args], forwards)
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)

    def qemu_pids(self, directory: str) -> list[int]:
        res = self.agent("qemu-pids", directory)
        return [int(p) for p in res.stdout.split()]


class LocalHost(Host):
    """This machine; run directories are local paths and the sockets need no forwarding."""

    name = "localhost"

    def __init__(self, base_dir: str = DEFAULT_REMOTE_BASE, python: str = "python3"):
        self.base_dir = base_dir
        self.python = python

    def _argv(self, remote_argv, forwards=()):
        return list(remote_argv)

    def forwarded(self, remote_path, local_path):
        return remote_path


@dataclass
class SshOptions:
    identity: str | None = None
    known_hosts: str | None = None  # default: ssh's own (~/.ssh/known_hosts)
    port: int | None = None
    extra: list[str] = field(default_factory=list)  # more -o options


class SshHost(Host):
    """A host reached with the OpenSSH client; never accepts an unknown host key."""

    is_ssh = True

    def __init__(self, target: str, ssh: SshOptions | None = None, base_dir: str = DEFAULT_REMOTE_BASE,
                 python: str = "python3"):
        self.target = target
        self.name = target
        self.ssh = ssh or SshOptions()
        self.base_dir = base_dir
        self.python = python
        self._agent = None

    def ssh_base(self) -> list[str]:
        o = self.ssh
        argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=3", "-o", "ExitOnForwardFailure=yes",
                "-o", "StreamLocalBindUnlink=yes", "-o", "LogLevel=ERROR"]
        if o.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={o.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
        if o.identity:
            argv += ["-o", "IdentitiesOnly=yes", "-i", o.identity]
        if o.port:
            argv += ["-p", str(o.port)]
        for opt in o.extra:
            argv += ["-o", opt]
        return argv

    def _argv(self, remote_argv, forwards=()):
        argv = self.ssh_base()
        for local, remote in forwards:
            argv += ["-L", f"{local}:{remote}"]
        return argv + [self.target, "--", " ".join(shlex.quote(a) for a in remote_argv)]

    def forwarded(self, remote_path, local_path):
        return local_path


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


# -- capture and comparison across hosts ---------------------------------------------------------

@dataclass
class RemoteImage:
    host: Host
    path: str  # on the host


def remote_digests(img: RemoteImage, size: int, page_size: int = DEFAULT_PAGE_SIZE,
                   headers: bool = False) -> tuple[list[bytes], list[tuple[int, bytes]], int]:
    """Page digests of a remote image, and with `headers` the 40-byte dirtyram header of every
    page that starts with one (read in the same pass on the host). Returns (digests,
    [(page, header)], bytes received)."""
    pages = -(-size // page_size)
    res = img.host.agent("digest", img.path, "--page-size", str(page_size), *(["--headers"] if headers else []),
                         timeout=600)
    lines = res.stdout.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    digests, heads = lines[:pages], []
    for line in lines[pages:]:
        parts = line.split()
        if len(parts) != 3 or parts[0] != b"H" or len(parts[2]) != 2 * HEADER_BYTES:
            raise RemoteCommandError(f"{img.host.name}: unexpected digest output line {line[:60]!r}")
        heads.append((int(parts[1]), bytes.fromhex(parts[2].decode())))
    if len(digests) != pages or any(d.startswith(b"H ") for d in digests):
        raise RemoteCommandError(f"{img.host.name}: digest of {img.path} has {len(digests)} pages, expected {pages}")
    return digests, heads, len(res.stdout)


HEADER_BYTES = 40  # a dirtyram page header (verifier.pageheader.HEADER_SIZE)


def write_headers_image(heads: list[tuple[int, bytes]], path: Path, size: int,
                        page_size: int = DEFAULT_PAGE_SIZE) -> None:
    """A sparse image holding only the given page headers at their pages: what the
    destination-only invariant reads (the first 40 bytes of each page)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for page, head in heads:
            os.pwrite(f.fileno(), head, page * page_size)


def fetch_pages(img: RemoteImage, pages: list[int], local: Path, size: int,
                page_size: int = DEFAULT_PAGE_SIZE, batch: int = 4096) -> int:
    """Write the given pages of a remote image into a local sparse file; returns bytes fetched."""
    moved = 0
    with open(local, "wb") as f:
        f.truncate(size)
        for i in range(0, len(pages), batch):
            part = pages[i:i + batch]
            res = img.host.agent("pages", img.path, "--page-size", str(page_size), "-",
                                 input=" ".join(map(str, part)).encode(), timeout=600)
            if len(res.stdout) != len(part) * page_size:
                raise RemoteCommandError(f"{img.host.name}: got {len(res.stdout)} bytes for {len(part)} pages")
            for j, p in enumerate(part):
                os.pwrite(f.fileno(), res.stdout[j * page_size:(j + 1) * page_size], p * page_size)
            moved += len(res.stdout)
    return moved


def compare_remote_images(src: RemoteImage, dst: RemoteImage, size: int, local_dir: Path,
                          page_size: int = DEFAULT_PAGE_SIZE) -> tuple[CompareResult, dict]:
    """Digest both images where they are, fetch only differing pages (from both sides) into
    sparse local images ram-src.img / ram-dst.img, and return a CompareResult on those plus
    transfer figures. Pages that are equal are zero in the local sparse images."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        fs = pool.submit(remote_digests, src, size, page_size)
        fd = pool.submit(remote_digests, dst, size, page_size, True)
        (ds, _, src_bytes), (dd, heads, dst_bytes) = fs.result(), fd.result()
    diff = array("Q", (i for i, (a, b) in enumerate(zip(ds, dd)) if a != b))
    digest_bytes = sum(len(x) + 1 for x in ds) + sum(len(x) + 1 for x in dd)
    header_bytes = src_bytes + dst_bytes - digest_bytes
    local = {"src": local_dir / "ram-src.img", "dst": local_dir / "ram-dst.img",
             "dst_headers": local_dir / "dst-headers.img"}
    write_headers_image(heads, local["dst_headers"], size, page_size)
    with ThreadPoolExecutor(2) as pool:
        fs = pool.submit(fetch_pages, src, list(diff), local["src"], size, page_size)
        fd = pool.submit(fetch_pages, dst, list(diff), local["dst"], size, page_size)
        page_bytes = fs.result() + fd.result()
    result = CompareResult(src=local["src"], dst=local["dst"], image_size=size, page_size=page_size,
                           page_count=-(-size // page_size), diff_pages=diff, bytes_compared=size,
                           elapsed=time.perf_counter() - t0)
    figures = {"method": "remote page digests (blake2b-16)", "digest_bytes": digest_bytes,
               "header_bytes": header_bytes, "dst_headers": len(heads), "dst_headers_image": str(local["dst_headers"]),
               "page_bytes": page_bytes, "bytes_moved": digest_bytes + header_bytes + page_bytes,
               "image_bytes": 2 * size, "local_images": "sparse: only the differing pages",
               "src": f"{src.host.name}:{src.path}", "dst": f"{dst.host.name}:{dst.path}"}
    return result, figures


# -- one trial across two hosts ------------------------------------------------------------------

@dataclass
class TwoHosts:
    src: Host
    dst: Host
    migration_address: str  # where the destination listens (an address of the dst host)
    qemu: str = "qemu-system-arm"  # the binary's name on both hosts (the source's when qemu_dst is set)
    qemu_dst: str | None = None  # the destination's, when it differs (cross-version migrations)
    allow_qemu_mismatch: bool = False  # QEMUs of different versions on the two hosts are refused unless set

    def qemu_name(self, side: str) -> str:
        return self.qemu_dst if side == "dst" and self.qemu_dst else self.qemu


def make_host(spec: str | None, ssh: SshOptions, base_dir: str = DEFAULT_REMOTE_BASE) -> Host:
    """'local' or None -> LocalHost; 'user@host[:port]' -> SshHost."""
    if not spec or spec in ("local", "localhost"):
        return LocalHost(base_dir=base_dir)
    m = re.fullmatch(r"([^@:\s]+@)?(\[[^\]]+\]|[^:\s]+)(?::(\d+))?", spec)
    if not m:
        raise InputError(f"host {spec!r}: expected user@host[:port] or local")
    opts = SshOptions(identity=ssh.identity, known_hosts=ssh.known_hosts,
                      port=int(m.group(3)) if m.group(3) else ssh.port, extra=list(ssh.extra))
    return SshHost((m.group(1) or "") + m.group(2).strip("[]"), opts, base_dir=base_dir)


def remote_requested(opts) -> bool:
    """Does a VerifyOptions ask for a two-host run (--src-host or --dst-host)?"""
    return bool(getattr(opts, "src_host", None) or getattr(opts, "dst_host", None))


def check_remote_options(opts) -> None:
    """What a two-host run supports today; everything else is refused with one line (exit 2)."""
    if opts.capture not in ("auto", "savedirtylog", "pmemsave"):
        raise InputError(f"--capture {opts.capture}: runs on --src-host/--dst-host capture with savedirtylog "
                         f"or pmemsave (the RAM backing file would have to be read on the host)")
    if opts.host_backing not in ("auto", "anon", "memfd"):
        raise InputError(f"--host-backing {opts.host_backing}: runs on --src-host/--dst-host support anon and memfd")
    if opts.inject:
        raise InputError("--inject is not supported with --src-host/--dst-host yet")
    if opts.accel != "tcg":
        raise InputError("--accel kvm is not supported with --src-host/--dst-host yet (/dev/kvm is checked locally)")
    if opts.transport == "unix":
        opts.transport = "tcp"  # two hosts: the migration goes over TCP to --migration-address
    dst_remote = opts.dst_host not in (None, "", "local", "localhost")
    if dst_remote and opts.migration_address in ("127.0.0.1", "localhost", "::1"):
        raise InputError("--dst-host needs --migration-address: the destination host's address on the "
                         "migration network (its QEMU listens there)")
    for opt, path in (("--ssh-identity", opts.ssh_identity), ("--known-hosts", opts.known_hosts)):
        if path and not os.path.isfile(path):
            raise InputError(f"{opt} {path}: no such file")


def hosts_from_options(opts, machine) -> TwoHosts:
    ssh = SshOptions(identity=str(opts.ssh_identity) if opts.ssh_identity else None,
                     known_hosts=str(opts.known_hosts) if opts.known_hosts else None)
    base = getattr(opts, "remote_dir", None) or DEFAULT_REMOTE_BASE
    return TwoHosts(src=make_host(opts.src_host, ssh, base), dst=make_host(opts.dst_host, ssh, base),
                    migration_address=opts.migration_address, qemu=opts.qemu or machine.qemu_binary,
                    qemu_dst=getattr(opts, "dst_qemu", None),
                    allow_qemu_mismatch=bool(getattr(opts, "allow_qemu_mismatch", False)))


def prepare_hosts(hosts: TwoHosts) -> dict[str, QemuBinary]:
    """Reach both hosts (typed errors), find QEMU on each and check that both are the same
    version (`--version`), unless hosts.allow_qemu_mismatch; returns {'src': ..., 'dst': ...}.
    Nothing is started: a refusal leaves no QEMU behind."""
    out = {}
    for side, host in (("src", hosts.src), ("dst", hosts.dst)):
        host.check()
        out[side] = host.probe_qemu(hosts.qemu_name(side))
        host.agent_path()
    check_same_qemu(hosts, out)
    return out


def check_same_qemu(hosts: TwoHosts, binaries: dict[str, QemuBinary]) -> None:
    """Source and destination QEMU must report the same version number (a different package
    revision of the same version is accepted; both lines are in the report)."""
    s, d = binaries["src"], binaries["dst"]
    if s.version == d.version or hosts.allow_qemu_mismatch:
        return
    raise HostSetupError(f"QEMU differs between the hosts: {s.version_str} on {hosts.src.name} ({s.path}) but "
                         f"{d.version_str} on {hosts.dst.name} ({d.path}); install the same version on both, or "
                         f"pass --allow-qemu-mismatch to test a cross-version migration")


def qemu_report(hosts: TwoHosts, binaries: dict[str, QemuBinary]) -> dict:
    """Both QEMUs for report.json's `qemu` object (a two-host run)."""
    side = {k: {"host": h.name, "path": binaries[k].path, "version": binaries[k].version_str,
                "version_text": binaries[k].version_text} for k, h in (("src", hosts.src), ("dst", hosts.dst))}
    return {**side, "same_version": binaries["src"].version == binaries["dst"].version,
            "mismatch_allowed": hosts.allow_qemu_mismatch}


def resolve_capture(opts, hosts: TwoHosts, binaries: dict[str, QemuBinary]) -> str:
    """opts.capture for two hosts: auto is -savedirtylog when both QEMUs have it (and no
    postcopy), else pmemsave; savedirtylog asked for and missing on a host is refused (exit 3
    on a remote host, 2 on this machine). Sets opts.capture to the method and returns it."""
    if opts.capture == "pmemsave":
        return "pmemsave"
    have = {side: h.supports_savedirtylog(binaries[side].path) for side, h in (("src", hosts.src), ("dst", hosts.dst))}
    if opts.capture == "savedirtylog":
        for side, h in (("src", hosts.src), ("dst", hosts.dst)):
            if not have[side]:
                raise h.setup_error(f"--capture savedirtylog: {binaries[side].path} on {h.name} has no -savedirtylog "
                                    f"option (build the patched QEMU there with `dirtylog build --qemu patched`)")
    else:
        opts.capture = "savedirtylog" if all(have.values()) and not opts.postcopy else "pmemsave"
    return opts.capture


def wait_remote_image(proc: "RemoteQemu", path: str, size: int, timeout: float = 60.0) -> None:
    """-savedirtylog writes PATH.partial and renames it when complete: wait for PATH of `size`
    bytes on the QEMU's host (normally already there when the migration is over)."""
    from .errors import CaptureError
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


class HostSites(Sites):
    """Source on hosts.src, destination on hosts.dst (either may be this machine's LocalHost).

    Files: the guest's kernel, initrd and dtb are copied into each host's file cache. Migration:
    TCP to hosts.migration_address on a port free there. Capture: -savedirtylog or pmemsave into
    each host's run directory. Comparison: page digests on each host, differing pages fetched
    (trial.compare['transfer'] and trial.compare['hosts'] say what moved where).
    """

    def __init__(self, hosts: TwoHosts, binaries: dict[str, QemuBinary], capture: str):
        self.hosts = hosts
        self.binaries = binaries
        self.capture = capture
        self.host = {"src": hosts.src, "dst": hosts.dst}
        self.remote_dirs: dict[str, str] = {}
        self.uploaded: dict[str, int] = {"src": 0, "dst": 0}
        self.sock_dir: Path | None = None
        self.uri = ""

    def begin(self, trial):
        # short: the sockets in it must fit a unix socket path (107 bytes) on the host
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}-t{trial.index:02d}"
        self.remote_dirs = {side: f"{h.base_dir}/runs/{run_id}/{side}" for side, h in self.host.items()}

    def route(self):
        return f"{self.hosts.src.name} -> {self.hosts.dst.name}"

    def where(self, side):
        return f" on {self.host[side].name}"

    def guest_files(self, side, art, machine):
        files, sent = {"dtb": None}, 0
        for key, path in (("kernel", art.kernel), ("initrd", art.initrd),
                          ("dtb", art.dtb if art.dtb and machine.needs_dtb else None)):
            if path is not None:
                files[key], n = self.host[side].put_cached(Path(path).resolve())
                sent += n
        self.uploaded[side] = sent
        return files

    def capture_args(self, side):
        from .savedirtylog import savedirtylog_args
        return savedirtylog_args(f"ram-{side}.img") if self.capture == "savedirtylog" else []

    def migration_uri(self, opts):
        port = int(self.hosts.dst.agent("free-port", self.hosts.migration_address).stdout.decode().strip())
        self.uri = f"tcp:{self.hosts.migration_address}:{port}"
        return self.uri

    def qemu(self, side, args, tdir, reporter, gdb):
        if self.sock_dir is None:
            self.sock_dir = short_socket_dir()
        return RemoteQemu(self.host[side], self.binaries[side], args, tdir, self.remote_dirs[side], side,
                          self.sock_dir, on_qmp=reporter.detail, gdb=gdb)

    def capture_images(self, src, dst, tdir, ram_base, mem_mb):
        from .errors import CaptureError
        size = mem_mb * 1024 * 1024
        images = {side: RemoteImage(self.host[side], f"{self.remote_dirs[side]}/ram-{side}.img")
                  for side in ("src", "dst")}
        for proc in (src, dst):
            if self.capture == "savedirtylog":  # written by QEMU itself before the migration ended
                wait_remote_image(proc, images[proc.name].path, size)
            else:
                proc.qmp("pmemsave", val=ram_base, size=size, filename=f"ram-{proc.name}.img", timeout=300)
        for side, img in images.items():
            got = img.host.agent("size", img.path).stdout.decode().strip()
            if got != str(size):
                raise CaptureError(f"{side} RAM image {img.host.name}:{img.path} has {got} bytes instead of {size}")
        return images

    def release(self):
        if self.sock_dir is not None:
            for p in self.sock_dir.iterdir():
                p.unlink(missing_ok=True)
            self.sock_dir.rmdir()
            self.sock_dir = None

    def compare(self, trial, images, mem_mb, ram_base, tdir):
        cmp, transfer = compare_remote_images(images["src"], images["dst"], mem_mb * 1024 * 1024, tdir)
        diagnose_remote(trial, cmp, ram_base, Path(transfer["dst_headers_image"]))
        trial.compare["transfer"] = transfer
        trial.compare["hosts"] = {"src": self.hosts.src.name, "dst": self.hosts.dst.name, "migration_uri": self.uri,
                                  "capture": self.capture, "remote_dirs": dict(self.remote_dirs),
                                  "bytes_uploaded": dict(self.uploaded)}
        return cmp

    def image_names(self, images):
        return {side: f"{img.host.name}:{img.path}" for side, img in images.items()}

    def delete_images(self, images):
        for img in images.values():
            img.host.run(["rm", "-f", img.path], check=False, what="rm image")


def run_two_host_trial(trial, art, opts, hosts: TwoHosts, machine, accel: tuple[str, str],
                       reporter, binaries: dict[str, QemuBinary] | None = None) -> None:
    """One trial (verifier.trial.run_trial) with the source on hosts.src and the destination on hosts.dst."""
    binaries = binaries or prepare_hosts(hosts)
    sites = HostSites(hosts, binaries, resolve_capture(opts, hosts, binaries))
    run_trial(trial, art, opts, sites, machine, accel, reporter)


def diagnose_remote(trial, result: CompareResult, ram_base: int, dst_headers: Path | None = None) -> None:
    """verifier.report.diagnose_trial on the fetched pages. The destination-only invariant
    reads only the dirtyram page headers, so it runs on `dst_headers` (a sparse image of the
    headers the destination host sent with its digests); without it, it is not checked."""
    diagnose_trial(trial, result, ram_base, invariant_image=dst_headers)
    trial.compare["destination_invariant"] = ("checked on the destination's page headers" if dst_headers is not None
                                              else "not checked (no page headers from the destination)")
