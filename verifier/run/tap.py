"""A tap on every migration channel: a recorder between the source QEMU and the destination QEMU.

The destination listens on its real address (QMP ``migrate-incoming``); the tap listens on another
address of the same kind and the source migrates to the tap (QMP ``migrate`` with
``tap.listen_uri``). For every connection the source opens, the tap opens one to the destination,
in the same order, and forwards bytes both ways, unchanged unless a `transform` is given::

    with Tap("unix:/run/x/tap.sock", "unix:/run/x/dst.sock", trial_dir, record=True) as tap:
        dst.qmp("migrate-incoming", uri="unix:/run/x/dst.sock")
        src.qmp("migrate", uri=tap.listen_uri)
        ...
    summary = tap.summary          # per channel: bytes each way, seconds open, recording, error

Channels and their names. QEMU opens the main channel first; with multifd, one connection per
channel (`multifd-channels`); with postcopy the destination sends its return path back over the
main connection (those are the destination->source bytes of "main"); postcopy-preempt adds one
more connection. A channel is named by its first bytes (the source->destination direction):

* ``main``: the stream starts with QEMU's file magic ``QEVM`` (or it is the first connection);
* ``multifd-<id+1>``: it starts with the multifd initial packet (magic 0x11223344, big-endian,
  version, the VM's UUID, then the one-byte channel id: QEMU's channel 0 is ``multifd-1``). QEMU
  connects its multifd channels from several threads at once, so the order the connections
  arrive in (`ChannelSummary.index`) may differ from the ids; the name follows QEMU's id;
* ``preempt``: neither; the postcopy-preempt channel has no initial packet and carries RAM pages
  only once postcopy runs (QEMU 7.2 opens it when the migration starts, 8.0 and later when
  postcopy starts), so a later connection that sends other bytes first, or nothing at all, is
  the preempt channel;
* ``channel-<index>``: a connection that was closed before the tap could read anything (e.g. the
  destination could not be reached); ``multifd-conn<index>``: one that ended inside its multifd
  initial packet, before the id. A name that repeats (a second migration through the same tap)
  gets ``-2``, ``-3``, ... appended.

Recording (``record=True``): the source->destination bytes of each channel, as forwarded to the
destination (after `transform`), go to ``directory/stream-<name>.bin``. The return path is
counted, not recorded.

Callbacks. ``on_data(channel, chunk)`` gets every source->destination chunk (as forwarded, after
`transform`), in order within a channel, called from that channel's forwarding thread: chunks
of different channels arrive concurrently from different threads, so the callback must be
thread-safe. It must not block long: the channel does not forward its next chunk until the
callback returns, so a slow callback slows the migration (it is backpressure on the source, not
a buffer). ``transform(channel, chunk) -> bytes`` may change, shorten or drop (return ``b""``) the
bytes forwarded; chunk boundaries are wherever the kernel put them, so a transform that edits
records must keep its own per-channel state across chunks; it may hold bytes back and return
them later: at the end of the source's stream it is called once more with ``b""`` to return what
it still holds. A callback that raises fails that channel like a broken link.

Failures. Nothing escapes a thread: a thread that fails records a typed error
(`verifier.errors.MigrationError` for the link, `CaptureError` for the recording) on its channel
and on the tap (`Tap.error`, the first one), and shuts both sockets of the channel, so each QEMU
sees its link drop and the migration fails as it would on a real link loss. End of stream is
passed on as end of stream (a half-close): the source disappearing mid-stream ends the
destination's side, which then fails its incoming migration on its own.

Speed. One thread per direction per connection, a preallocated 1 MiB buffer, ``recv_into`` and
``sendall`` (both release the GIL). When there is nothing to look at (no `on_data`, no
`transform`, no recording) the source->destination bytes after the first ones move with
``os.splice`` through a pipe, kernel-side, never copied into Python; ``splice=False`` turns that
off. The tap is one more hop all the same: the kernel moves every byte once more, and that CPU
time comes from the same cores the two QEMUs use, so an unthrottled migration on a host without
an idle core slows down, a throttled one hardly (benchmarks/tap_overhead.py prints both).

Addresses: ``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[v6addr]:PORT``); both ends of the tap use
the same kind. Port 0 in `listen_uri` picks a free port; `Tap.listen_uri` then says which. A unix
path longer than sun_path's 107 bytes is reached through ``/proc/self/fd`` on its directory, so
the tap accepts any path (QEMU does not: give it a short or relative one).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from verifier.errors import CaptureError, InputError, MigrationError, VerifyError

QEVM_MAGIC = b"QEVM"  # QEMU_VM_FILE_MAGIC, first bytes of the main channel
MULTIFD_MAGIC = (0x11223344).to_bytes(4, "big")  # first bytes of every multifd packet
MULTIFD_ID_OFFSET = 24  # initial packet: magic(4) version(4) uuid(16) id(1) ...
BUFFER_SIZE = 1 << 20
RETURN_BUFFER_SIZE = 1 << 16  # destination->source: the return path carries small messages
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
SUN_PATH_MAX = 107
LISTEN_BACKLOG = 128


# -- addresses -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TapAddress:
    kind: str  # "unix" | "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    @property
    def uri(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def family(self) -> int:
        if self.kind == "unix":
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


def parse_address(uri: str) -> TapAddress:
    """``unix:PATH`` or ``tcp:HOST:PORT``; InputError for anything else."""
    if uri.startswith("unix:"):
        path = uri[len("unix:"):]
        if not path or "," in path:
            raise InputError(f"tap: bad unix address {uri!r} (want unix:PATH, without options)")
        return TapAddress("unix", path=path)
    if uri.startswith("tcp:"):
        rest = uri[len("tcp:"):]
        if rest.startswith("["):
            host, sep, port = rest[1:].partition("]:")
        else:
            host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535 or "," in port:
            raise InputError(f"tap: bad tcp address {uri!r} (want tcp:HOST:PORT, without options)")
        return TapAddress("tcp", host=host, port=int(port))
    raise InputError(f"tap: unsupported address {uri!r} (the tap speaks unix:PATH and tcp:HOST:PORT)")


class _UnixPath:
    """A sockaddr for a unix path of any length: long ones go through /proc/self/fd/N/."""

    def __init__(self, path: str):
        self.path = path
        self._dirfd: int | None = None
        if len(os.fsencode(path)) <= SUN_PATH_MAX:
            self.sockaddr = path
            return
        parent, name = os.path.split(os.path.abspath(path))
        try:
            self._dirfd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise MigrationError(f"tap: cannot open the directory of {path}: {exc}") from None
        self.sockaddr = f"/proc/self/fd/{self._dirfd}/{name}"
        if len(os.fsencode(self.sockaddr)) > SUN_PATH_MAX:
            self.close()
            raise InputError(f"tap: unix socket name {name!r} is too long ({len(name)} bytes)")

    def close(self) -> None:
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None


def _connect(addr: TapAddress, timeout: float) -> socket.socket:
    if addr.kind == "tcp":
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        name = _UnixPath(addr.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(name.sockaddr)
        except BaseException:
            sock.close()
            raise
        finally:
            name.close()
    sock.settimeout(None)
    return sock


# -- summary ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChannelSummary:
    name: str
    index: int  # order the source opened the connection in (0 = first)
    bytes_from_source: int  # read from the source
    bytes_to_destination: int  # written to the destination (differs only with a transform or an error)
    bytes_from_destination: int  # the return path, read from the destination
    bytes_to_source: int
    seconds_open: float
    recorded: Path | None  # directory/stream-<name>.bin, or None
    error: VerifyError | None = None  # the first failure of either side of this channel
    multifd_id: int | None = None  # QEMU's channel id from the multifd initial packet
    open: bool = False  # still forwarding when the summary was taken
    closed_by_tap: bool = False  # close() had to cut it (it had not ended by itself in time)

    def to_dict(self) -> dict:
        return {"name": self.name, "index": self.index, "bytes_from_source": self.bytes_from_source,
                "bytes_to_destination": self.bytes_to_destination,
                "bytes_from_destination": self.bytes_from_destination, "bytes_to_source": self.bytes_to_source,
                "seconds_open": round(self.seconds_open, 3),
                "recorded": str(self.recorded) if self.recorded else None,
                "error": str(self.error) if self.error else None, "multifd_id": self.multifd_id,
                "open": self.open, "closed_by_tap": self.closed_by_tap}


@dataclass(frozen=True)
class TapSummary:
    listen_uri: str
    target_uri: str
    channels: tuple[ChannelSummary, ...] = ()
    error: VerifyError | None = None  # the tap's first error (a channel's, or a connect failure)

    def channel(self, name: str) -> ChannelSummary:
        for ch in self.channels:
            if ch.name == name:
                return ch
        raise KeyError(f"no tap channel {name!r} (have: {', '.join(c.name for c in self.channels) or 'none'})")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.channels]

    def check(self) -> "TapSummary":
        """Raise the tap's first error, if any; else return self."""
        if self.error is not None:
            raise self.error
        return self

    def to_dict(self) -> dict:
        return {"listen_uri": self.listen_uri, "target_uri": self.target_uri,
                "error": str(self.error) if self.error else None,
                "channels": [c.to_dict() for c in self.channels]}


# -- one connection --------------------------------------------------------------------------

@dataclass
class _Channel:
    index: int
    src: socket.socket
    dst: socket.socket | None
    opened: float = field(default_factory=time.monotonic)
    closed: float | None = None
    name: str | None = None
    multifd_id: int | None = None
    recorded: Path | None = None
    error: VerifyError | None = None
    from_src: int = 0
    to_dst: int = 0
    from_dst: int = 0
    to_src: int = 0
    src_eof: bool = False  # the source ended its stream (EOF read from it)
    dst_eof: bool = False
    closed_by_tap: bool = False
    threads: list[threading.Thread] = field(default_factory=list)
    done: int = 0  # directions finished
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> ChannelSummary:
        end = self.closed if self.closed is not None else time.monotonic()
        return ChannelSummary(
            name=self.name or (f"channel-{self.index}" if self.index else "main"), index=self.index,
            bytes_from_source=self.from_src, bytes_to_destination=self.to_dst,
            bytes_from_destination=self.from_dst, bytes_to_source=self.to_src,
            seconds_open=end - self.opened, recorded=self.recorded, error=self.error,
            multifd_id=self.multifd_id, open=self.closed is None, closed_by_tap=self.closed_by_tap)


def _shutdown(sock: socket.socket | None, how: int) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(how)
    except OSError:
        pass


class _SideError(Exception):
    """Internal: which side of a channel an OSError came from."""

    def __init__(self, side: str, exc: BaseException):
        super().__init__(side)
        self.side = side
        self.exc = exc


# -- the tap ---------------------------------------------------------------------------------

class Tap:
    """A forwarding recorder between a migration's source and destination (module docstring)."""

    def __init__(self, listen_uri: str, target_uri: str, directory: Path, *, record: bool = False,
                 on_data: Callable[[str, bytes], None] | None = None,
                 transform: Callable[[str, bytes], bytes] | None = None,
                 splice: bool | None = None, connect_timeout: float = CONNECT_TIMEOUT_S):
        self._listen = parse_address(listen_uri)
        self._target = parse_address(target_uri)
        if self._listen.kind != self._target.kind:
            raise InputError(f"tap: listen address {listen_uri} and target {target_uri} are of different kinds")
        if self._listen == self._target and (self._listen.kind == "unix" or self._listen.port):
            raise InputError(f"tap: listen address and target are the same ({listen_uri})")
        self.directory = Path(directory)
        self.record = record
        self.on_data = on_data
        self.transform = transform
        # splice moves bytes kernel-side; only possible when nobody needs to see them
        want_splice = splice if splice is not None else True
        self.splice = bool(want_splice and hasattr(os, "splice") and not (record or on_data or transform))
        if splice and not self.splice:
            raise InputError("tap: splice=True needs os.splice and no record/on_data/transform")
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._unix_name: _UnixPath | None = None
        self._unix_inode: tuple[int, int] | None = None
        self._wake_r, self._wake_w = -1, -1
        self._acceptor: threading.Thread | None = None
        self._channels: list[_Channel] = []
        self._names: dict[str, int] = {}
        self._lock = threading.Lock()
        self._error: VerifyError | None = None
        self._closing = False
        self._started = False
        self._summary: TapSummary | None = None

    # -- public --------------------------------------------------------------------------------
    @property
    def listen_uri(self) -> str:
        """Where the source should migrate to (with the real port once started)."""
        return self._listen.uri

    @property
    def target_uri(self) -> str:
        return self._target.uri

    @property
    def error(self) -> VerifyError | None:
        """The first failure of any channel (or of connecting to the destination), else None."""
        return self._error

    @property
    def summary(self) -> TapSummary:
        """The channels so far (while running) or at close (after close())."""
        if self._summary is not None:
            return self._summary
        with self._lock:
            channels = tuple(ch.summary() for ch in self._channels)
        return TapSummary(self.listen_uri, self.target_uri, channels, self._error)

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.record:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._sock = self._bind()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"tap {self.listen_uri} accept",
                                          daemon=True)
        self._acceptor.start()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> TapSummary:
        """Stop listening, give open channels `timeout` seconds to end by themselves, then cut
        them; close every socket, pipe and file. Returns within about `timeout` + 2 s; idempotent
        (later calls return the same summary)."""
        if self._summary is not None:
            return self._summary
        with self._lock:
            self._closing = True
        deadline = time.monotonic() + timeout
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._acceptor is not None:
            self._acceptor.join(timeout=max(1.0, deadline - time.monotonic()))
        self._close_listener()
        with self._lock:
            channels = list(self._channels)
        me = threading.current_thread()  # close() from a callback must not wait for itself
        for ch in channels:
            for t in ch.threads:
                if t is not me:
                    t.join(timeout=max(0.0, deadline - time.monotonic()))
        for ch in channels:
            if any(t.is_alive() and t is not me for t in ch.threads):
                ch.closed_by_tap = True
                _shutdown(ch.src, socket.SHUT_RDWR)
                _shutdown(ch.dst, socket.SHUT_RDWR)
        cut_deadline = time.monotonic() + 2.0  # a cut socket wakes its thread at once
        for ch in channels:
            for t in ch.threads:
                if t is not me:
                    t.join(timeout=max(0.0, cut_deadline - time.monotonic()))
            # a thread still inside a syscall on these fds closes them itself when it ends: closing
            # them under it could let the fd numbers be reused while it still writes to them
            self._finish(ch, force=not any(t.is_alive() for t in ch.threads))
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        with self._lock:
            snapshot = tuple(ch.summary() for ch in self._channels)
        self._summary = TapSummary(self.listen_uri, self.target_uri, snapshot, self._error)
        return self._summary

    def __enter__(self) -> "Tap":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- listening -----------------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        addr = self._listen
        sock = socket.socket(addr.family, socket.SOCK_STREAM)
        try:
            if addr.kind == "tcp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((addr.host, addr.port))
                self._listen = TapAddress("tcp", host=addr.host, port=sock.getsockname()[1])
            else:
                self._remove_stale(addr.path)
                self._unix_name = _UnixPath(addr.path)
                sock.bind(self._unix_name.sockaddr)
                st = os.stat(self._unix_name.sockaddr)
                self._unix_inode = (st.st_dev, st.st_ino)
            sock.listen(LISTEN_BACKLOG)
        except VerifyError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise MigrationError(f"tap: cannot listen on {addr.uri}: {exc}") from None
        return sock

    @staticmethod
    def _remove_stale(path: str) -> None:
        """A socket left at `path` is removed, as QEMU does for its own unix listeners; anything
        else there is refused."""
        name = _UnixPath(path)
        try:
            st = os.lstat(name.sockaddr)
            if not stat.S_ISSOCK(st.st_mode):
                raise InputError(f"tap: {path} exists and is not a socket")
            os.unlink(name.sockaddr)
        except FileNotFoundError:
            return
        finally:
            name.close()

    def _close_listener(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._unix_name is not None:
            try:
                st = os.stat(self._unix_name.sockaddr)
                if (st.st_dev, st.st_ino) == self._unix_inode:
                    os.unlink(self._unix_name.sockaddr)
            except OSError:
                pass
            self._unix_name.close()
            self._unix_name = None

    def _accept_loop(self) -> None:
        try:
            self._accept_connections()
        except Exception as exc:  # noqa: BLE001 - recorded, never escapes the thread
            self._fail(None, MigrationError(f"tap: the listener on {self.listen_uri} failed: "
                                            f"{type(exc).__name__}: {exc}"))

    def _accept_connections(self) -> None:
        """Accept the source's connections one by one, and connect each to the destination
        before accepting the next: the destination sees them in the source's order (QEMU 7.2
        tells the main channel from the others by that order alone)."""
        index = 0
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closing:
            try:
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_r in ready or self._closing:
                    return
                src, _ = self._sock.accept()
            except (OSError, ValueError) as exc:
                if not self._closing:
                    self._fail(None, MigrationError(f"tap: accepting on {self.listen_uri} failed: {exc}"))
                return
            ch = _Channel(index=index, src=src, dst=None)
            index += 1
            with self._lock:
                self._channels.append(ch)
            if self._listen.kind == "tcp":  # the tap must not add Nagle's delays to small messages
                src.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                dst = _connect(self._target, self.connect_timeout)
            except (OSError, VerifyError) as exc:
                reason = exc if isinstance(exc, VerifyError) else _describe(exc)
                self._fail(ch, MigrationError(
                    f"tap: cannot connect to the destination at {self.target_uri}: {reason} "
                    f"(connection {ch.index} from the source was dropped)"))
                _shutdown(src, socket.SHUT_RDWR)
                self._finish(ch, force=True)
                continue
            with self._lock:  # close() may have begun while we connected: then drop it here
                if self._closing:
                    dst.close()
                    _shutdown(src, socket.SHUT_RDWR)
                    self._finish(ch, force=True)
                    return
                ch.dst = dst
                ch.threads = [
                    threading.Thread(target=self._run_direction, args=(ch, True), daemon=True,
                                     name=f"tap {self.listen_uri} #{ch.index} src->dst"),
                    threading.Thread(target=self._run_direction, args=(ch, False), daemon=True,
                                     name=f"tap {self.listen_uri} #{ch.index} dst->src")]
                for t in ch.threads:
                    t.start()

    # -- forwarding ----------------------------------------------------------------------------
    def _run_direction(self, ch: _Channel, downstream: bool) -> None:
        """One direction of one channel; never raises."""
        rec = None
        try:
            if downstream:
                rec = self._downstream(ch)
            else:
                self._upstream(ch)
        except _SideError as err:
            self._side_failed(ch, downstream, err)
        except VerifyError as exc:
            self._fail(ch, exc)
            self._cut(ch)
        except Exception as exc:  # noqa: BLE001 - a callback's exception fails the channel, not the thread
            self._fail(ch, MigrationError(f"tap: channel {ch.name or ch.index}: {type(exc).__name__}: {exc}"))
            self._cut(ch)
        finally:
            if rec is not None:
                rec.close()
            with ch.lock:
                ch.done += 1
                last = ch.done == 2
            if last:
                self._finish(ch)

    def _downstream(self, ch: _Channel):
        """Source -> destination: read the first bytes, name the channel, then forward."""
        buf = bytearray(BUFFER_SIZE)
        mv = memoryview(buf)
        filled = 0
        while filled < MULTIFD_ID_OFFSET + 1:
            n = _recv_into(ch.src, mv[filled:])
            if n == 0:
                ch.src_eof = True
                break
            filled += n
            if filled >= 4 and buf[:4] != MULTIFD_MAGIC:
                break
        rec = self._name(ch, bytes(buf[:filled]))
        try:
            if filled:
                ch.from_src += filled
                self._deliver(ch, mv[:filled], rec)
            if filled and not ch.src_eof:
                if self.splice:
                    self._splice_loop(ch)
                else:
                    self._copy_loop(ch, buf, mv, rec)
            if self.transform is not None:  # end of stream: the transform's held-back bytes, if any
                self._deliver(ch, memoryview(b""), rec, flush=True)
        except BaseException:
            if rec is not None:
                rec.close()
            raise
        # end of the source's stream: pass it on as end of stream
        ch.src_eof = True
        _shutdown(ch.dst, socket.SHUT_WR)
        return rec

    def _copy_loop(self, ch: _Channel, buf: bytearray, mv: memoryview, rec) -> None:
        src = ch.src
        while True:
            n = _recv_into(src, mv)
            if n == 0:
                return
            ch.from_src += n
            self._deliver(ch, mv[:n], rec)

    def _deliver(self, ch: _Channel, chunk: memoryview, rec, flush: bool = False) -> None:
        out = chunk
        if self.transform is not None and (len(chunk) or flush):
            out = self.transform(ch.name, bytes(chunk))
            if not isinstance(out, (bytes, bytearray, memoryview)):
                raise MigrationError(f"tap: channel {ch.name}: transform returned {type(out).__name__}, not bytes")
        if len(out):
            try:
                ch.dst.sendall(out)
            except OSError as exc:
                raise _SideError("destination", exc) from None
            ch.to_dst += len(out)
            if rec is not None:
                try:
                    _write_all(rec, out)
                except OSError as exc:
                    raise CaptureError(f"tap: cannot write the recording {ch.recorded}: {exc}") from None
            if self.on_data is not None:
                self.on_data(ch.name, out if isinstance(out, bytes) else bytes(out))

    def _splice_loop(self, ch: _Channel) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, BUFFER_SIZE)
            except OSError:
                pass  # above /proc/sys/fs/pipe-max-size: the default pipe works too
            sfd, dfd = ch.src.fileno(), ch.dst.fileno()
            while True:
                try:
                    n = os.splice(sfd, w, BUFFER_SIZE)
                except OSError as exc:
                    raise _SideError("source", exc) from None
                if n == 0:
                    return
                ch.from_src += n
                left = n
                while left:
                    try:
                        m = os.splice(r, dfd, left)
                    except OSError as exc:
                        raise _SideError("destination", exc) from None
                    left -= m
                    ch.to_dst += m
        finally:
            os.close(r)
            os.close(w)

    def _upstream(self, ch: _Channel) -> None:
        """Destination -> source: the return path (postcopy, return-path capability)."""
        buf = bytearray(RETURN_BUFFER_SIZE)
        mv = memoryview(buf)
        while True:
            try:
                n = ch.dst.recv_into(mv)
            except OSError as exc:
                raise _SideError("destination", exc) from None
            if n == 0:
                break
            ch.from_dst += n
            try:
                ch.src.sendall(mv[:n])
            except OSError as exc:
                raise _SideError("source", exc) from None
            ch.to_src += n
        ch.dst_eof = True
        _shutdown(ch.src, socket.SHUT_WR)

    # -- naming --------------------------------------------------------------------------------
    def _name(self, ch: _Channel, head: bytes):
        """Name the channel by its first bytes; open its recording. Returns the file or None."""
        if head[:4] == QEVM_MAGIC:
            base = "main"
        elif head[:4] == MULTIFD_MAGIC and len(head) > MULTIFD_ID_OFFSET:
            ch.multifd_id = head[MULTIFD_ID_OFFSET]
            base = f"multifd-{ch.multifd_id + 1}"
        elif head[:4] == MULTIFD_MAGIC:
            base = f"multifd-conn{ch.index}"  # the stream ended inside the initial packet: no id
        elif ch.index == 0:
            base = "main"
        else:
            base = "preempt"
        with self._lock:
            count = self._names.get(base, 0) + 1
            self._names[base] = count
            ch.name = base if count == 1 else f"{base}-{count}"
        if not self.record:
            return None
        ch.recorded = self.directory / f"stream-{ch.name}.bin"
        try:
            return open(ch.recorded, "wb", buffering=0)
        except OSError as exc:
            raise CaptureError(f"tap: cannot create the recording {ch.recorded}: {exc}") from None

    # -- failures and ends ---------------------------------------------------------------------
    def _side_failed(self, ch: _Channel, downstream: bool, err: _SideError) -> None:
        exc = err.exc
        direction = "source->destination" if downstream else "destination->source"
        if (not downstream and err.side == "source" and ch.src_eof
                and isinstance(exc, (BrokenPipeError, ConnectionResetError))):
            # The source had already ended the channel and closed it: return-path bytes sent
            # after that are lost on a direct link too; not a failure of the link.
            _shutdown(ch.dst, socket.SHUT_RD)
            return
        if self._closing and ch.closed_by_tap:
            return  # close() cut it; not the link's fault
        self._fail(ch, MigrationError(
            f"tap: channel {ch.name or ch.index} ({direction}): the {err.side} side failed: {_describe(exc)}"))
        self._cut(ch)

    def _fail(self, ch: _Channel | None, error: VerifyError) -> None:
        with self._lock:
            if ch is not None and ch.error is None:
                ch.error = error
            if self._error is None:
                self._error = error

    @staticmethod
    def _cut(ch: _Channel) -> None:
        """Drop both links of a channel so each QEMU sees it fail (and both threads end)."""
        _shutdown(ch.src, socket.SHUT_RDWR)
        _shutdown(ch.dst, socket.SHUT_RDWR)

    def _finish(self, ch: _Channel, force: bool = False) -> None:
        """Close a channel's sockets once both directions are over (or when `force`d)."""
        with ch.lock:
            if ch.closed is not None:
                return
            if not force and ch.done < 2:
                return
            ch.closed = time.monotonic()
            socks = (ch.src, ch.dst)
        for s in socks:
            if s is not None:
                s.close()


def _recv_into(sock: socket.socket, mv: memoryview) -> int:
    try:
        return sock.recv_into(mv)
    except OSError as exc:
        raise _SideError("source", exc) from None


def _write_all(f, data) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        view = view[n:]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
    if isinstance(exc, TimeoutError) or isinstance(exc, socket.timeout):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
