"""verifier.run.tap: real QEMUs migrating through the tap, no mocks.

The guests have no kernel: `-S` keeps the CPU stopped, and a `-device loader` puts random bytes
into RAM, so the RAM is known and never changes; `pmemsave` on both sides says whether the
destination got it all. Debian's QEMU 7.2 runs every test, and the patched QEMU 10.0 (built once,
then reused from the cache) the ones parametrized by `qemu`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from verifier.errors import InputError, MigrationError, VerifyError
from verifier.run.qemu import QemuProcess, probe_qemu
from verifier.run.remote_qemu import short_socket_dir
from verifier.run.tap import MULTIFD_MAGIC, QEVM_MAGIC, Tap, parse_address

from conftest import qemu_processes_under

RAM_BASE = 0x40000000  # virt's RAM
LOAD_ADDR = RAM_BASE + (2 << 20)  # above the dtb QEMU puts at the start of RAM without a kernel
UNLIMITED = 100 * 1024 ** 3
MIGRATION_TIMEOUT_S = 30.0


def _system_qemu():
    system = shutil.which("qemu-system-arm")
    return probe_qemu(system) if system else None


# Debian's QEMU 7.2 (the system's) and the patched QEMU 10.0 (built once by builder.qemu_build, then
# reused from the cache; marked `build`, so `make test-fast` leaves it out).
QEMUS = [pytest.param("system", id="qemu-7.2"), pytest.param("10.0", id="qemu-10.0", marks=pytest.mark.build)]
QEMU_SYSTEM = _system_qemu()


@pytest.fixture
def qemu(request):
    if request.param == "system":
        if QEMU_SYSTEM is None:
            pytest.fail("qemu-system-arm is part of the test setup (scripts/setup-host.sh)")
        return QEMU_SYSTEM
    from builder import qemu_build
    from builder.cache import Cache
    return probe_qemu(str(qemu_build.build_patched_qemu("10.0", Cache()).qemu_system_arm))


@pytest.fixture
def system_qemu():
    if QEMU_SYSTEM is None:
        pytest.fail("qemu-system-arm is part of the test setup (scripts/setup-host.sh)")
    return QEMU_SYSTEM


# -- helpers ---------------------------------------------------------------------------------

def _socket_fds() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:"):
            found.add(f"{fd}:{link}")
    return found


def _tap_threads(tap: Tap | None = None) -> list[str]:
    prefix = f"tap {tap.listen_uri} " if tap is not None else "tap "
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


class Lab:
    """One test's QEMUs, files and sockets; teardown ends them and checks nothing is left."""

    def __init__(self, tmp_path: Path, stack: contextlib.ExitStack):
        self.dir = tmp_path
        self.stack = stack
        if len(str(tmp_path)) + len("/tap-99.sock") <= 100:
            self.sockdir = tmp_path
        else:  # unix socket paths are limited to 107 bytes
            self.sockdir = short_socket_dir()
            stack.callback(shutil.rmtree, self.sockdir, True)

    @contextlib.contextmanager
    def tap(self, *args, **kwargs):
        """A started Tap; when the block ends it is closed, and every socket it opened must be
        closed and every thread of it ended (checked at once: the GC would close them later)."""
        before = _socket_fds()
        with Tap(*args, **kwargs) as tap:
            yield tap
        assert _tap_threads(tap) == []
        assert _socket_fds() - before == set()
        listen = parse_address(tap.listen_uri)
        if listen.kind == "unix":
            assert not os.path.exists(listen.path), "the listening socket was left behind"

    def random_file(self, size: int, seed: int | None = None) -> Path:
        path = self.dir / f"random-{size}.bin"
        rng = random.Random(seed) if seed is not None else None
        path.write_bytes(rng.randbytes(size) if rng else os.urandom(size))
        return path

    def unix(self, name: str) -> str:
        return f"unix:{self.sockdir / name}"

    def qemu(self, binary, name: str, mem_mb: int, load: Path | None = None, incoming: bool = False) -> QemuProcess:
        args = ["-machine", "virt", "-accel", "tcg", "-m", f"{mem_mb}M", "-smp", "1",
                "-display", "none", "-nodefaults", "-S"]
        if load is not None:
            args += ["-device", f"loader,file={load},addr={LOAD_ADDR:#x}"]
        if incoming:
            args += ["-incoming", "defer"]
        return self.stack.enter_context(QemuProcess(binary, args, self.dir, name))

    def pair(self, binary, mem_mb: int, seed: int | None = None, dst_mem_mb: int | None = None):
        data = self.random_file((mem_mb << 20) // 2, seed)
        return self.qemu(binary, "src", mem_mb, load=data), self.qemu(binary, "dst", dst_mem_mb or mem_mb,
                                                                       incoming=True)

    def ram(self, proc: QemuProcess, mem_mb: int) -> bytes:
        out = self.dir / f"ram-{proc.name}.bin"
        proc.qmp("pmemsave", val=RAM_BASE, size=mem_mb << 20, filename=str(out))
        return out.read_bytes()


@pytest.fixture
def lab(tmp_path):
    sockets_before = _socket_fds()
    with contextlib.ExitStack() as stack:
        yield Lab(tmp_path, stack)
    # after the QEMUs are closed: nothing of the tap's or the QEMUs' may be left
    deadline = time.monotonic() + 5
    while _tap_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tap_threads() == []
    assert _socket_fds() - sockets_before == set()
    assert qemu_processes_under(tmp_path) == []


def setup_migration(src, dst, caps=(), params=None, bandwidth=UNLIMITED):
    caps = [{"capability": c, "state": True} for c in caps]
    for side in (src, dst):
        if caps:
            side.qmp("migrate-set-capabilities", capabilities=caps)
        if params:  # multifd-channels must agree on both sides
            side.qmp("migrate-set-parameters", **params)
    src.qmp("migrate-set-parameters", **{"max-bandwidth": bandwidth})


def wait_source(src, timeout=MIGRATION_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = src.qmp("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        assert time.monotonic() < deadline, f"migration still {info.get('status')} after {timeout} s"
        time.sleep(0.05)


def wait_destination(dst, timeout=MIGRATION_TIMEOUT_S) -> str:
    """The destination's incoming migration: 'completed', 'failed', or 'exited' (QEMU 7.2 and 10
    exit when a precopy load fails)."""
    deadline = time.monotonic() + timeout
    while True:
        if not dst.alive():
            return "exited"
        try:
            status = dst.qmp("query-migrate").get("status")
        except VerifyError:
            return "exited"
        if status in ("completed", "failed"):
            return status
        assert time.monotonic() < deadline, f"incoming migration still {status} after {timeout} s"
        time.sleep(0.05)


def migrate_through(lab, src, dst, tap, dst_uri, timeout=MIGRATION_TIMEOUT_S) -> dict:
    dst.qmp("migrate-incoming", uri=dst_uri)
    src.qmp("migrate", uri=tap.listen_uri)
    return wait_source(src, timeout)


def assert_same_ram(lab, src, dst, mem_mb):
    a, b = lab.ram(src, mem_mb), lab.ram(dst, mem_mb)
    assert len(a) == len(b) == mem_mb << 20
    assert a[LOAD_ADDR - RAM_BASE:][:4096] != bytes(4096), "the source's RAM has no random data"
    if a != b:
        diff = [i for i in range(0, len(a), 4096) if a[i:i + 4096] != b[i:i + 4096]]
        pytest.fail(f"{len(diff)} pages differ, first at {RAM_BASE + diff[0]:#x}")


def replay(lab, binary, stream: Path, mem_mb: int, name: str) -> QemuProcess:
    """A fresh QEMU loads a recorded main channel as an ordinary migration stream."""
    q = lab.qemu(binary, name, mem_mb, incoming=True)
    q.qmp("migrate-incoming", uri=f"exec:cat {stream}")
    assert wait_destination(q) == "completed", q.output_tail()
    return q


# -- addresses -------------------------------------------------------------------------------

def test_addresses_parse_and_bad_ones_are_input_errors(tmp_path):
    assert parse_address("unix:/run/x.sock").path == "/run/x.sock"
    a = parse_address("tcp:127.0.0.1:4444")
    assert (a.host, a.port, a.uri) == ("127.0.0.1", 4444, "tcp:127.0.0.1:4444")
    assert parse_address("tcp:[::1]:5").uri == "tcp:[::1]:5"
    for bad in ("exec:cat", "tcp:127.0.0.1", "tcp::x", "unix:", "fd:3", "tcp:h:99999"):
        with pytest.raises(InputError):
            parse_address(bad)
    with pytest.raises(InputError, match="different kinds"):
        Tap("unix:/x.sock", "tcp:127.0.0.1:1", tmp_path)
    with pytest.raises(InputError, match="same"):
        Tap("unix:/x.sock", "unix:/x.sock", tmp_path)


# -- migrations through the tap --------------------------------------------------------------

@pytest.mark.parametrize("qemu", QEMUS, indirect=True)
def test_unix_precopy_recording_is_exactly_what_the_destination_got(lab, qemu):
    """Two taps in a row, both recording: the second one's recording is what the first one sent,
    and it is the destination's stream; a fresh QEMU loading the recording gets the source's RAM."""
    mem = 128
    src, dst = lab.pair(qemu, mem)
    setup_migration(src, dst)
    dst_uri = lab.unix("dst.sock")
    outer_dir, inner_dir = lab.dir / "outer", lab.dir / "inner"
    with lab.tap(lab.unix("tap-b.sock"), dst_uri, inner_dir, record=True) as inner, \
            lab.tap(lab.unix("tap-a.sock"), inner.listen_uri, outer_dir, record=True) as outer:
        info = migrate_through(lab, src, dst, outer, dst_uri)
        assert info["status"] == "completed", info
        assert wait_destination(dst) == "completed"
    a, b = outer.summary.check(), inner.summary.check()
    assert a.names == b.names == ["main"]
    ma, mb = a.channel("main"), b.channel("main")
    assert not ma.open and not mb.open and not ma.closed_by_tap
    stream = ma.recorded.read_bytes()
    assert stream[:4] == QEVM_MAGIC
    assert stream == mb.recorded.read_bytes()
    assert len(stream) == ma.bytes_from_source == ma.bytes_to_destination == mb.bytes_from_source
    assert len(stream) >= (mem << 20) // 2  # the random half of RAM went through
    assert ma.bytes_from_destination == 0  # no return path in plain precopy
    assert_same_ram(lab, src, dst, mem)
    assert_same_ram(lab, src, replay(lab, qemu, ma.recorded, mem, "replay"), mem)


@pytest.mark.parametrize("qemu", QEMUS, indirect=True)
def test_tcp_port_zero_and_return_path(lab, qemu):
    """tcp with a port the tap picks; the return-path capability makes the destination talk back
    over the main connection, and those bytes reach the source."""
    mem = 128
    src, dst = lab.pair(qemu, mem)
    setup_migration(src, dst, caps=["return-path"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dst_uri = f"tcp:127.0.0.1:{port}"
    with lab.tap("tcp:127.0.0.1:0", dst_uri, lab.dir, record=True) as tap:
        assert tap.listen_uri.startswith("tcp:127.0.0.1:") and not tap.listen_uri.endswith(":0")
        info = migrate_through(lab, src, dst, tap, dst_uri)
        assert info["status"] == "completed", info
        assert wait_destination(dst) == "completed"
    summary = tap.summary.check()
    main = summary.channel("main")
    assert summary.names == ["main"]
    assert main.bytes_from_destination > 0 and main.bytes_to_source == main.bytes_from_destination
    assert main.recorded.stat().st_size == main.bytes_to_destination
    assert_same_ram(lab, src, dst, mem)
    assert_same_ram(lab, src, replay(lab, qemu, main.recorded, mem, "replay"), mem)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("channels", [2, 4])
@pytest.mark.parametrize("qemu", QEMUS, indirect=True)
def test_multifd_every_channel_named_and_recorded(lab, qemu, channels, transport):
    mem = 128
    src, dst = lab.pair(qemu, mem)
    setup_migration(src, dst, caps=["multifd"], params={"multifd-channels": channels})
    if transport == "unix":
        dst_uri, listen = lab.unix("dst.sock"), lab.unix("tap.sock")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dst_uri, listen = f"tcp:127.0.0.1:{s.getsockname()[1]}", "tcp:127.0.0.1:0"
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def on_data(channel, chunk):
        with lock:
            seen[channel] = seen.get(channel, 0) + len(chunk)

    with lab.tap(listen, dst_uri, lab.dir / "rec", record=True, on_data=on_data) as tap:
        info = migrate_through(lab, src, dst, tap, dst_uri)
        assert info["status"] == "completed", info
        assert wait_destination(dst) == "completed"
    summary = tap.summary.check()
    expected = ["main"] + [f"multifd-{i}" for i in range(1, channels + 1)]
    assert sorted(summary.names) == sorted(expected)
    assert summary.channels[0].name == "main" and summary.channels[0].index == 0
    total = 0
    for ch in summary.channels:
        data = ch.recorded.read_bytes()
        assert ch.recorded.name == f"stream-{ch.name}.bin"
        assert len(data) == ch.bytes_to_destination == ch.bytes_from_source == seen[ch.name]
        assert not ch.open and ch.error is None
        if ch.name == "main":
            assert data[:4] == QEVM_MAGIC
        else:
            assert data[:4] == MULTIFD_MAGIC and int.from_bytes(data[4:8], "big") == 1  # version
            assert ch.multifd_id == int(ch.name.split("-")[1]) - 1 == data[24]
            total += len(data)
    assert total >= (mem << 20) // 2  # the pages went over the multifd channels
    assert_same_ram(lab, src, dst, mem)


@pytest.mark.root  # postcopy's userfaultfd needs CAP_SYS_PTRACE while vm.unprivileged_userfaultfd is 0
@pytest.mark.parametrize("qemu", QEMUS, indirect=True)
def test_postcopy_preempt_channel_is_named(lab, qemu):
    """postcopy: the destination's return path goes back over main; with postcopy-preempt QEMU
    opens one more connection, named preempt (7.2 opens it when the migration starts, 8.0 and
    later when postcopy starts)."""
    mem = 128
    src, dst = lab.pair(qemu, mem)
    # 2 MiB/s: precopy must still be running when postcopy is asked for (at 20 MiB/s a loaded
    # machine could finish the planted pages in precopy, and 10.0 opens preempt only in postcopy)
    setup_migration(src, dst, caps=["postcopy-ram", "postcopy-preempt"], bandwidth=2 << 20)
    dst_uri = lab.unix("dst.sock")
    with lab.tap(lab.unix("tap.sock"), dst_uri, lab.dir) as tap:
        assert tap.splice  # nothing to look at: the bytes go by os.splice
        dst.qmp("migrate-incoming", uri=dst_uri)
        src.qmp("migrate", uri=tap.listen_uri)
        time.sleep(0.5)
        src.qmp("migrate-start-postcopy")
        src.qmp("migrate-set-parameters", **{"max-bandwidth": UNLIMITED})
        info = wait_source(src)
        assert info["status"] == "completed", info
        assert wait_destination(dst) == "completed"
    summary = tap.summary.check()
    assert summary.names == ["main", "preempt"]
    assert summary.channel("main").bytes_from_destination > 0
    assert_same_ram(lab, src, dst, mem)


@pytest.mark.root  # postcopy's userfaultfd needs CAP_SYS_PTRACE while vm.unprivileged_userfaultfd is 0
def test_postcopy_return_path_on_qemu72(lab, system_qemu):
    mem = 128
    src, dst = lab.pair(system_qemu, mem)
    setup_migration(src, dst, caps=["postcopy-ram"], bandwidth=20 << 20)
    dst_uri = lab.unix("dst.sock")
    with lab.tap(lab.unix("tap.sock"), dst_uri, lab.dir) as tap:
        dst.qmp("migrate-incoming", uri=dst_uri)
        src.qmp("migrate", uri=tap.listen_uri)
        time.sleep(0.5)
        src.qmp("migrate-start-postcopy")
        src.qmp("migrate-set-parameters", **{"max-bandwidth": UNLIMITED})
        info = wait_source(src)
        assert info["status"] == "completed", info
        assert wait_destination(dst) == "completed"
    main = tap.summary.check().channel("main")
    assert main.bytes_from_destination > 0 and main.bytes_to_source == main.bytes_from_destination
    assert main.recorded is None
    assert_same_ram(lab, src, dst, mem)


def test_transform_flips_one_byte_of_one_page(lab, system_qemu):
    """A negative control: the transform flips one byte inside one page's content on its way; the
    destination then differs from the source in exactly that byte. The transform holds back a
    few bytes across chunks and hands them over at the end of the stream (the b"" call)."""
    mem = 64
    src, dst = lab.pair(system_qemu, mem, seed=7)
    data = (lab.dir / f"random-{(mem << 20) // 2}.bin").read_bytes()
    page = 1000
    pattern = data[page * 4096 + 100:page * 4096 + 132]
    assert data.count(pattern) == 1
    held = {"main": b""}
    flipped = []

    def transform(channel, chunk):
        buf = held[channel] + chunk
        at = buf.find(pattern)
        if at >= 0:
            buf = buf[:at + 16] + bytes([buf[at + 16] ^ 0xFF]) + buf[at + 17:]
            flipped.append(at)
        if not chunk:  # end of stream: give everything back
            held[channel] = b""
            return buf
        keep = len(pattern) - 1
        held[channel] = buf[-keep:]
        return buf[:-keep]

    setup_migration(src, dst)
    dst_uri = lab.unix("dst.sock")
    with lab.tap(lab.unix("tap.sock"), dst_uri, lab.dir, transform=transform) as tap:
        info = migrate_through(lab, src, dst, tap, dst_uri)
        assert info["status"] == "completed", info
        assert wait_destination(dst) == "completed"
    main = tap.summary.check().channel("main")
    assert main.bytes_to_destination == main.bytes_from_source
    assert len(flipped) == 1
    a, b = lab.ram(src, mem), lab.ram(dst, mem)
    diff = [i for i in range(len(a)) if a[i] != b[i]] if a != b else []
    assert diff == [LOAD_ADDR - RAM_BASE + page * 4096 + 116]


def test_unix_paths_longer_than_sun_path(tmp_path, system_qemu):
    """The QEMUs run in a deep directory and use relative socket paths; the tap is given the
    absolute ones, longer than the 107 bytes of sun_path, and reaches them all the same."""
    deep = tmp_path / ("d" * 70)
    deep.mkdir()
    assert len(str(deep / "dst.sock")) > 107
    with contextlib.ExitStack() as stack:
        lab = Lab(deep, stack)
        src, dst = lab.pair(system_qemu, 64)
        setup_migration(src, dst)
        with lab.tap(f"unix:{deep}/tap.sock", f"unix:{deep}/dst.sock", deep, record=True) as tap:
            dst.qmp("migrate-incoming", uri="unix:dst.sock")  # relative to the QEMU's working directory
            src.qmp("migrate", uri="unix:tap.sock")
            assert wait_source(src)["status"] == "completed"
            assert wait_destination(dst) == "completed"
        assert tap.summary.check().names == ["main"]
        assert_same_ram(lab, src, dst, 64)
    assert qemu_processes_under(tmp_path) == []


def test_cannot_listen_is_a_typed_error(tmp_path):
    with pytest.raises(MigrationError, match="cannot listen"):
        with Tap(f"unix:{tmp_path}/no/such/dir/tap.sock", f"unix:{tmp_path}/dst.sock", tmp_path):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a socket"):
        Tap(f"unix:{tmp_path}/file", f"unix:{tmp_path}/dst.sock", tmp_path).start()
    assert _tap_threads() == []


# -- failures --------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_destination_absent_is_a_typed_error_and_the_source_fails(lab, system_qemu, transport):
    src = lab.qemu(system_qemu, "src", 64, load=lab.random_file(16 << 20))
    if transport == "unix":
        target, listen = lab.unix("nobody.sock"), lab.unix("tap.sock")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            target, listen = f"tcp:127.0.0.1:{s.getsockname()[1]}", "tcp:127.0.0.1:0"
    t0 = time.monotonic()
    with lab.tap(listen, target, lab.dir, record=True) as tap:
        src.qmp("migrate", uri=tap.listen_uri)
        info = wait_source(src)
    assert time.monotonic() - t0 < 15
    assert info["status"] == "failed", info
    summary = tap.summary
    assert isinstance(summary.error, MigrationError)
    assert str(summary.error).startswith(f"tap: cannot connect to the destination at {target}")
    assert summary.channels and summary.channels[0].error is summary.error
    assert tap.error is summary.error
    with pytest.raises(MigrationError):
        summary.check()
    assert all(not ch.open for ch in summary.channels)
    assert not list(lab.dir.glob("stream-*.bin"))  # nothing was forwarded, nothing recorded


def test_destination_refusing_the_stream_fails_the_source(lab, system_qemu):
    """The destination (different RAM size) refuses the stream and exits; the tap records the
    failure, and the source's migration fails as on a real link."""
    src, dst = lab.pair(system_qemu, 128, dst_mem_mb=64)
    setup_migration(src, dst)
    dst_uri = lab.unix("dst.sock")
    with lab.tap(lab.unix("tap.sock"), dst_uri, lab.dir) as tap:
        info = migrate_through(lab, src, dst, tap, dst_uri)
        assert info["status"] == "failed", info
    assert wait_destination(dst) in ("failed", "exited")
    main = tap.summary.channel("main")
    assert not main.open
    assert isinstance(tap.error, MigrationError) and "destination" in str(tap.error)
    assert main.error is tap.error


@pytest.mark.parametrize("qemu", QEMUS, indirect=True)
def test_source_killed_mid_stream_ends_the_destination_side(lab, qemu):
    mem = 128
    src, dst = lab.pair(qemu, mem)
    setup_migration(src, dst, bandwidth=8 << 20)  # ~8 s for the random half: time to kill it
    dst_uri = lab.unix("dst.sock")
    with lab.tap(lab.unix("tap.sock"), dst_uri, lab.dir) as tap:
        dst.qmp("migrate-incoming", uri=dst_uri)
        src.qmp("migrate", uri=tap.listen_uri)
        deadline = time.monotonic() + 10
        while not tap.summary.channels or tap.summary.channels[0].bytes_to_destination < (4 << 20):
            assert time.monotonic() < deadline, tap.summary
            time.sleep(0.05)
        src.proc.send_signal(signal.SIGKILL)
        src.proc.wait(timeout=10)
        # the channel ends by itself: the tap passes the end of stream on, the destination fails
        deadline = time.monotonic() + 10
        while tap.summary.channels[0].open:
            assert time.monotonic() < deadline, "the tap kept the channel open after the source died"
            time.sleep(0.05)
        assert wait_destination(dst) in ("failed", "exited")
    main = tap.summary.channel("main")
    assert not main.closed_by_tap
    assert main.bytes_to_destination == main.bytes_from_source < (mem << 20) // 2


def test_close_is_bounded_and_cuts_a_running_migration(lab, system_qemu):
    """close() during a slow migration: open channels get `timeout` to end, then the tap cuts
    them; both QEMUs see the link drop."""
    src, dst = lab.pair(system_qemu, 128)
    setup_migration(src, dst, caps=["multifd"], params={"multifd-channels": 2}, bandwidth=4 << 20)
    dst_uri = lab.unix("dst.sock")
    with lab.tap(lab.unix("tap.sock"), dst_uri, lab.dir, record=True) as tap:
        dst.qmp("migrate-incoming", uri=dst_uri)
        src.qmp("migrate", uri=tap.listen_uri)
        deadline = time.monotonic() + 10
        while sum(c.bytes_to_destination for c in tap.summary.channels) < (1 << 20):
            assert time.monotonic() < deadline, tap.summary
            time.sleep(0.05)
        t0 = time.monotonic()
        summary = tap.close(timeout=1.0)
        elapsed = time.monotonic() - t0
        assert _tap_threads(tap) == []
    assert 0.9 <= elapsed < 4.0, elapsed
    assert tap.close() is summary  # idempotent
    assert sorted(summary.names) == ["main", "multifd-1", "multifd-2"]
    assert all(c.closed_by_tap and not c.open for c in summary.channels)
    assert summary.error is None  # the tap cut them on purpose: not a link failure
    assert wait_source(src)["status"] == "failed"
    assert wait_destination(dst) in ("failed", "exited")


def test_a_callback_that_raises_fails_the_channel_not_the_thread(lab, system_qemu):
    src, dst = lab.pair(system_qemu, 64)
    setup_migration(src, dst)
    dst_uri = lab.unix("dst.sock")
    calls = []

    def on_data(channel, chunk):
        calls.append(len(chunk))
        if sum(calls) > (2 << 20):
            raise ValueError("parser gave up")

    with lab.tap(lab.unix("tap.sock"), dst_uri, lab.dir, on_data=on_data) as tap:
        info = migrate_through(lab, src, dst, tap, dst_uri)
        assert info["status"] == "failed", info
    assert wait_destination(dst) in ("failed", "exited")
    assert isinstance(tap.error, MigrationError)
    assert "ValueError: parser gave up" in str(tap.error)
    assert tap.summary.channel("main").error is tap.error
