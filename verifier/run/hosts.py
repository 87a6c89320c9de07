"""Hosts: where each side's QEMU runs. A host is a host, and this machine is one of them.

- `LocalHost(direct=True)`: this machine in a run on this machine alone; its QEMUs are dirtylog's
  child processes (verifier.run.sites.LocalSites), every capture method and negative control.
- `LocalHost()`: this machine in a run across hosts (or `--src-host local`), its QEMU under the
  agent like on any other host.
- `SshHost`: another machine over OpenSSH.

`hosts_from_options` makes the two hosts of a plan; `check_hosts` refuses, in one place and before
any host is contacted, what a host cannot do (`Host.cannot`: a RAM backing file under the agent,
huge-page backing there, --inject, KVM) and options that need the other kind of run: one mistake,
one InputError, exit 2. The remote QEMU is verifier.run.remote_qemu, comparison across hosts
verifier.analysis.remote_compare.

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
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from verifier.artifacts import sha256_file
from verifier.errors import InputError, VerifyError
from verifier.run.qemu import QemuBinary

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
    direct = False  # its QEMUs are dirtylog's own child processes (LocalHost alone), not the agent's

    def cannot(self, opts, side: str) -> list[str]:
        """What this host cannot do of a plan, one sentence each (empty: it can do all of it).
        A host whose QEMU runs under the agent has no RAM backing file dirtylog can read, backs
        RAM with anonymous memory or memfd, takes no negative controls and runs TCG only."""
        if self.direct:
            return []
        where = f"the {side} runs on {self.name} under dirtylog's agent"
        out = []
        if opts.capture not in ("auto", "savedirtylog", "pmemsave"):
            out.append(f"--capture {opts.capture}: {where}, where its RAM backing file cannot be read; "
                       f"use --capture savedirtylog or pmemsave")
        if opts.host_backing not in ("auto", "anon", "memfd"):
            out.append(f"--host-backing {opts.host_backing}: {where}, which backs guest RAM with anon or memfd only")
        if opts.inject and not (opts.inject[0].startswith("stream-") and opts.stream):
            out.append(f"--inject: {where}; negative controls other than the stream tap's "
                       f"(stream-drop, stream-flip, stream-device) need both QEMUs on this machine "
                       f"(no --src-host/--dst-host)")
        if opts.accel != "tcg":
            out.append(f"--accel {opts.accel}: {where}, and /dev/kvm is checked on this machine only; "
                       f"runs across hosts use TCG")
        return out

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
        from verifier.run.qemu import identify_qemu
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
    """This machine, a host like any other. `direct`: a run on this machine alone, whose QEMUs are
    dirtylog's child processes (verifier.run.sites.LocalSites: files in place, every capture method);
    otherwise (a run across hosts, or `--src-host local`) its QEMU runs under the agent exactly as
    on a remote host, with run directories as local paths and sockets that need no forwarding."""

    name = "localhost"

    def __init__(self, base_dir: str = DEFAULT_REMOTE_BASE, python: str = "python3", direct: bool = False):
        self.base_dir = base_dir
        self.python = python
        self.direct = direct

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


# -- the two hosts of a run: made from the options, reached, their QEMUs checked -----------------

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

    @property
    def direct(self) -> bool:
        """Both sides are this machine's own child processes (a one-host run)."""
        return self.src.direct and self.dst.direct


def make_host(spec: str | None, ssh: SshOptions, base_dir: str = DEFAULT_REMOTE_BASE) -> Host:
    """None -> this machine, direct; 'local' -> this machine through the agent; 'user@host[:port]' -> SshHost."""
    if not spec:
        return LocalHost(base_dir=base_dir, direct=True)
    if spec in ("local", "localhost"):
        return LocalHost(base_dir=base_dir)
    m = re.fullmatch(r"([^@:\s]+@)?(\[[^\]]+\]|[^:\s]+)(?::(\d+))?", spec)
    if not m:
        raise InputError(f"host {spec!r}: expected user@host[:port] or local")
    opts = SshOptions(identity=ssh.identity, known_hosts=ssh.known_hosts,
                      port=int(m.group(3)) if m.group(3) else ssh.port, extra=list(ssh.extra))
    return SshHost((m.group(1) or "") + m.group(2).strip("[]"), opts, base_dir=base_dir)


def hosts_from_options(opts, machine) -> TwoHosts:
    """The run's two hosts, not contacted yet. Without --src-host/--dst-host both are this machine,
    direct; when one side is another host (or `local` through the agent), this machine's side runs
    under the agent too, so both QEMUs are driven the same way."""
    ssh = SshOptions(identity=str(opts.ssh_identity) if opts.ssh_identity else None,
                     known_hosts=str(opts.known_hosts) if opts.known_hosts else None)
    base = opts.remote_dir or DEFAULT_REMOTE_BASE
    src, dst = make_host(opts.src_host, ssh, base), make_host(opts.dst_host, ssh, base)
    if not (src.direct and dst.direct):
        src, dst = (LocalHost(base_dir=base) if h.direct else h for h in (src, dst))
    return TwoHosts(src=src, dst=dst, migration_address=opts.migration_address, qemu=opts.qemu or machine.qemu_binary,
                    qemu_dst=opts.dst_qemu, allow_qemu_mismatch=bool(opts.allow_qemu_mismatch))


def check_hosts(opts, hosts: TwoHosts) -> None:
    """What the two hosts cannot do of this plan, refused in one place before any host is contacted
    and any QEMU starts: one InputError (exit 2) for one mistake, wherever the run goes. A run across
    hosts migrates over TCP (--transport unix becomes tcp)."""
    for side, host in (("source", hosts.src), ("destination", hosts.dst)):
        for why in host.cannot(opts, side):
            raise InputError(why)
    if hosts.direct:
        if opts.dst_qemu or opts.allow_qemu_mismatch:
            raise InputError("--dst-qemu and --allow-qemu-mismatch apply to runs with --src-host/--dst-host "
                             "(two QEMUs on this machine: --src-host local --dst-host local)")
        return
    if opts.transport == "unix":
        opts.transport = "tcp"  # two hosts: the migration goes over TCP to --migration-address
    if isinstance(hosts.dst, SshHost) and opts.migration_address in ("127.0.0.1", "localhost", "::1"):
        raise InputError("--dst-host needs --migration-address: the destination host's address on the "
                         "migration network (its QEMU listens there)")
    for opt, path in (("--ssh-identity", opts.ssh_identity), ("--known-hosts", opts.known_hosts)):
        if path and not os.path.isfile(path):
            raise InputError(f"{opt} {path}: no such file")


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


