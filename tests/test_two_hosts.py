"""Two hosts on one machine (issue #7): network namespaces, sshd, migrations across them.

The module fixture runs `scripts/two-hosts.sh up` (namespaces dlt-src/dlt-dst, control networks
10.241.{1,2}.0/30, migration network 10.242.0.0/30) and `down` at the end. Needs root, iproute2,
openssh-server and openssh-client, qemu-system-arm.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from verifier.artifacts import load_artifacts
from verifier.errors import InputError, MigrationError, QemuError, VerifyError
from builder.machines import MACHINES
from verifier.run.hosts import (HostAuthError, HostKeyError, HostSetupError, HostUnreachable, LocalHost, SshHost, SshOptions, TwoHosts, make_host, prepare_hosts, qemu_report)
from verifier.analysis.remote_compare import RemoteImage, compare_remote_images
from verifier.run.sites import run_two_host_trial
from verifier.reports.report import checks
from verifier.reports.report import TrialResult
from verifier.run.verify import Reporter, VerifyOptions, _accel_spec
from verifier.run.workload import Workload

pytestmark = pytest.mark.two_hosts

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "two-hosts.sh"
ENV = {**os.environ, "DL_NS_PREFIX": "dlt", "DL_CTL_NET": "10.241", "DL_MIG_NET": "10.242.0"}
SRC, DST, DST_MIG = "root@10.241.1.2", "root@10.241.2.2", "10.242.0.2"
STATE_BASE = Path("/var/lib/dirtylog")  # not below a 1777 directory: sshd's StrictModes


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "ssh", "ssh-keygen", "qemu-system-arm"):
        if not shutil.which(tool):
            return f"{tool} not installed"
    if not os.path.exists("/usr/sbin/sshd"):
        return "openssh-server not installed"
    return None


@pytest.fixture(scope="module")
def state():
    why = _missing()
    if why:
        pytest.skip(why)
    STATE_BASE.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="two-hosts-", dir=STATE_BASE))
    res = subprocess.run([SCRIPT, "up", d], env=ENV, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    try:
        yield d
    finally:
        res = subprocess.run([SCRIPT, "down", d], env=ENV, capture_output=True, text=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)
        assert res.returncode == 0, res.stderr
        assert "dlt-src" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _qemu_pids(under: str) -> list[int]:
    """QEMU processes whose working directory is below `under`, from this machine's /proc (the
    namespaces share it); unlike Host.qemu_pids it copies no agent anywhere."""
    base = os.path.realpath(under)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd, exe = os.readlink(f"/proc/{pid}/cwd"), os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if "qemu-system" in exe and (cwd == base or cwd.startswith(base + "/")):
            found.append(int(pid))
    return found


def _opts(state: Path, **kw) -> SshOptions:
    return SshOptions(identity=str(state / "ssh" / "id_ed25519"),
                      known_hosts=str(state / "ssh" / "known_hosts"), **kw)


@pytest.fixture
def hosts(state, tmp_path):
    base = f"/var/tmp/dirtylog-test-{tmp_path.name}"
    h = TwoHosts(SshHost(SRC, _opts(state), base_dir=f"{base}/src"),
                 SshHost(DST, _opts(state), base_dir=f"{base}/dst"), DST_MIG)
    yield h
    left = h.src.qemu_pids(base) + h.dst.qemu_pids(base)
    h.src.run(["rm", "-rf", base], check=False)
    assert not left, f"QEMU processes left behind: {left}"


class StepReporter(Reporter):
    def __init__(self, on_sample=None):
        self.steps, self.on_sample = [], on_sample

    def step(self, msg):
        self.steps.append(msg)

    def migration(self, info):
        if self.on_sample:
            self.on_sample(info)


def _trial(tmp_path, artifacts, hosts, reporter, **opt):
    art = load_artifacts(artifacts)
    opts = VerifyOptions(**{"machine": "virt", "smp": 1, "min_passes": 1, "capture": "pmemsave", "mem_mb": 128, **opt})
    opts.check(art)
    machine = MACHINES["virt"]
    trial = TrialResult(index=1, directory=tmp_path / "run" / "trial-01")
    run_two_host_trial(trial, art, opts, hosts, machine, _accel_spec(opts, machine), reporter)
    return trial


def _link(state_unused, up: bool):
    subprocess.run(["ip", "-n", "dlt-src", "link", "set", "mig0", "up" if up else "down"], check=True)


# -- setup -----------------------------------------------------------------------------------

def test_up_is_idempotent_and_sets_tcp_retries(state):
    res = subprocess.run([SCRIPT, "up", state], env=ENV, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    host = SshHost(DST, _opts(state))
    out = host.sh("sysctl -n net.ipv4.tcp_retries2; ip -br addr show mig0").stdout.decode()
    assert out.split()[0] == "5" and "10.242.0.2/30" in out


def test_state_dir_under_sticky_tmp_is_refused(tmp_path):
    if _missing():
        pytest.skip(_missing())
    env = {**ENV, "DL_NS_PREFIX": "dlx"}
    res = subprocess.run([SCRIPT, "up", tmp_path / "s"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "StrictModes" in res.stderr
    assert "dlx-src" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


# -- hosts and copies ------------------------------------------------------------------------

def test_put_verifies_and_skips_when_present(hosts, tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(300_000))
    remote = f"{hosts.dst.base_dir}/blob"
    assert hosts.dst.put(f, remote) == 300_000
    assert hosts.dst.put(f, remote) == 0
    assert hosts.dst.sh(f"sha256sum {remote}").stdout.split()[0].decode() == \
        subprocess.run(["sha256sum", f], capture_output=True, text=True).stdout.split()[0]


def test_remote_compare_fetches_only_differing_pages(hosts, tmp_path):
    size = 4 << 20
    a = bytearray(os.urandom(size))
    b = bytearray(a)
    for p in (3, 4, 700):
        b[p * 4096 + 17] ^= 0xFF
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(b)
    hosts.src.put(tmp_path / "a", f"{hosts.src.base_dir}/a.img")
    hosts.dst.put(tmp_path / "b", f"{hosts.dst.base_dir}/b.img")
    res, fig = compare_remote_images(RemoteImage(hosts.src, f"{hosts.src.base_dir}/a.img"),
                                     RemoteImage(hosts.dst, f"{hosts.dst.base_dir}/b.img"), size, tmp_path)
    assert list(res.diff_pages) == [3, 4, 700]
    assert fig["page_bytes"] == 2 * 3 * 4096
    assert fig["bytes_moved"] < size // 10
    local = (tmp_path / "ram-dst.img").read_bytes()
    assert local[700 * 4096:701 * 4096] == bytes(b[700 * 4096:701 * 4096])


# -- refusals --------------------------------------------------------------------------------

def test_unknown_host_key_is_refused(state, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    host = SshHost(DST, SshOptions(identity=str(state / "ssh" / "id_ed25519"), known_hosts=str(empty)))
    with pytest.raises(HostKeyError) as exc:
        host.check()
    assert exc.value.exit_code == 3 and "host key" in str(exc.value)
    # the source's key under the destination's address: a changed key, refused as well
    src_key = (state / "ssh" / "known_hosts").read_text().splitlines()[0].split(" ", 1)[1]
    empty.write_text(f"10.241.2.2 {src_key}\n")
    with pytest.raises(HostKeyError):
        host.check()
    assert "10.241.2.2" not in (Path.home() / ".ssh" / "known_hosts").read_text() \
        if (Path.home() / ".ssh" / "known_hosts").exists() else True


def test_auth_failure(state, tmp_path):
    key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    host = SshHost(DST, SshOptions(identity=str(key), known_hosts=str(state / "ssh" / "known_hosts")))
    with pytest.raises(HostAuthError) as exc:
        host.check()
    assert exc.value.exit_code == 3 and "\n" not in str(exc.value)


def test_unreachable_host_is_a_bounded_infrastructure_error(state):
    t0 = time.monotonic()
    with pytest.raises(HostUnreachable) as exc:
        make_host(f"{DST}:2", _opts(state)).check()
    assert exc.value.exit_code == 3 and "refused" in str(exc.value)
    assert time.monotonic() - t0 < 30


def test_missing_qemu_on_the_remote(state, hosts):
    hosts.qemu = "qemu-system-nosuch"
    with pytest.raises(HostSetupError) as exc:
        prepare_hosts(hosts)
    assert exc.value.exit_code == 3 and "qemu-system-nosuch" in str(exc.value)
    # the same QEMU missing on this machine (one of the two hosts) is an input error, as in a one-host run
    with pytest.raises(InputError) as exc:
        LocalHost().probe_qemu("qemu-system-nosuch")
    assert exc.value.exit_code == 2


def _other_version_qemu(directory: Path, version: str = "7.2.99") -> Path:
    """The real qemu-system-arm, except that `--version` reports another version (same major
    and minor, so dirtylog builds the same command line for it)."""
    w = directory / "qemu-other-version"
    w.write_text(f'#!/bin/sh\ncase "$1" in --version|-version) echo "QEMU emulator version {version}"; exit 0;; esac\n'
                 f'exec {shutil.which("qemu-system-arm")} "$@"\n')
    w.chmod(0o755)
    return w


def test_different_qemu_versions_are_refused_unless_allowed(hosts, tmp_path):
    hosts.qemu_dst = str(_other_version_qemu(tmp_path))
    real = prepare_hosts(TwoHosts(hosts.src, hosts.dst, DST_MIG))["src"].version_str
    t0 = time.monotonic()
    with pytest.raises(HostSetupError) as exc:
        prepare_hosts(hosts)
    msg = str(exc.value)
    print(f"QEMU mismatch refused after {time.monotonic() - t0:.1f} s: {msg}")
    assert exc.value.exit_code == 3 and "\n" not in msg
    assert f"{real} on {SRC}" in msg and f"7.2.99 on {DST}" in msg and "--allow-qemu-mismatch" in msg
    hosts.allow_qemu_mismatch = True
    rep = qemu_report(hosts, prepare_hosts(hosts))
    assert (rep["src"]["version"], rep["dst"]["version"]) == (real, "7.2.99")
    assert rep["dst"]["path"].endswith("qemu-other-version") and rep["mismatch_allowed"] and not rep["same_version"]


def _other_qemu_build() -> str | None:
    """A QEMU built by `dirtylog build --qemu patched` whose version differs from the system's."""
    system = _QEMU_VERSION.split("version ")[1].split()[0] if "version " in _QEMU_VERSION else None
    for b in sorted(Path.home().glob(".cache/dirtylog/qemu-builds/*/bin/qemu-system-arm")):
        if '"bug": ' in (b.parent.parent / "build.json").read_text(errors="replace"):
            continue  # a bug-zoo variant
        out = subprocess.run([b, "--version"], capture_output=True, text=True, timeout=30).stdout
        if "version " in out and out.split("version ")[1].split()[0] != system:
            return str(b)
    return None


def test_cli_different_qemu_on_the_destination_exits_3(state, artifacts, tmp_path):
    from conftest import run_dirtylog
    other = _other_qemu_build()
    if other is None:
        pytest.skip("no QEMU build of another version in ~/.cache/dirtylog/qemu-builds")
    base = f"/var/tmp/dlt-{secrets.token_hex(3)}"
    t0 = time.monotonic()
    res = run_dirtylog("verify", "--artifacts", artifacts, "--machine", "virt", "--mem", "128", "--src-host", SRC,
                       "--dst-host", DST, "--migration-address", DST_MIG, "--dst-qemu", other,
                       "--ssh-identity", state / "ssh" / "id_ed25519", "--known-hosts", state / "ssh" / "known_hosts",
                       "--remote-dir", base, "--run-dir", tmp_path / "run", timeout=120)
    elapsed = time.monotonic() - t0
    last = res.stderr.strip().splitlines()[-1]
    print(f"QEMU {other} on the destination: exit {res.returncode} after {elapsed:.1f} s: {last}")
    try:
        assert res.returncode == 3 and "Traceback" not in res.stderr
        assert last.startswith("dirtylog: error: QEMU differs between the hosts") and other in last
        assert _qemu_pids(base) == []  # nothing started (the namespaces share /proc)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- migrations ------------------------------------------------------------------------------

_QEMU_VERSION = (subprocess.run(["qemu-system-arm", "--version"], capture_output=True, text=True).stdout
                 if shutil.which("qemu-system-arm") else "")


def _known_72_loss(trial) -> bool:
    """Debian's QEMU 7.2 loses dirty pages on multi-pass migrations (a known finding)."""
    return (trial.verdict == "fail" and "version 7.2." in _QEMU_VERSION
            and (trial.migration.get("dirty_sync_count") or 0) > 2)


def test_migration_across_namespaces_passes(hosts, artifacts, tmp_path):
    # A light workload keeps the migration to one or two passes (see _known_72_loss).
    trial = _trial(tmp_path, artifacts, hosts, StepReporter(), workloads=(Workload(256, 16, 100),))
    if _known_72_loss(trial):
        pytest.xfail(f"QEMU 7.2 lost dirty pages after {trial.migration['dirty_sync_count']} passes")
    assert trial.verdict == "pass", (checks(trial), trial.device_state, trial.compare, trial.resume)
    assert trial.resume["ok"]
    assert trial.compare["hosts"]["migration_uri"].startswith("tcp:10.242.0.2:")
    t = trial.compare["transfer"]
    assert t["page_bytes"] == 0 and t["bytes_moved"] < t["image_bytes"] // 50
    assert trial.migration["status"] == "completed"
    print(f"pass: {trial.timings}, moved {t['bytes_moved']} bytes of {t['image_bytes']}")


@pytest.mark.build
def test_the_stream_tap_runs_on_the_destination_host(hosts, artifacts, tmp_path):
    """The tap runs on the destination host (verifier.run.remote_tap): the ledger crosses back to
    the controller (16 bytes per page), --inject stream-drop withholds page records there and the
    provenance classes them as across one machine, and the stream's VMDESCRIPTION names every
    device field of both re-saved states."""
    import dataclasses

    from builder import qemu_build
    from builder.cache import Cache
    qemu10 = str(qemu_build.build_patched_qemu("10.0", Cache()).qemu_system_arm)  # the hosts share this disk
    # QEMU 10.0 with an instance rewritten without pause: dirtyram pages in the final RAM section,
    # where the drop acts (a 2 ms instance left it without any in 1 of 3 runs; 7.2 sends almost
    # none there and loses dirty pages of its own)
    trial = _trial(tmp_path, artifacts, dataclasses.replace(hosts, qemu=qemu10), StepReporter(), min_passes=2,
                   inject=("stream-drop", 3), workloads=(Workload(512, 512, 50), Workload(1024, 1024, 1)))
    st = trial.stream
    assert st["host"] == DST and st["errors"] == [], st
    assert [c["name"] for c in st["channels"]] == ["main"] and st["channels"][0]["parsed"]["complete"]
    assert st["ledger"]["pages"] == 128 * 256 and st["ledger"]["pages_sent"] == 128 * 256
    assert st["fetched_bytes"] >= 16 * 128 * 256
    inj = trial.injection
    assert (inj["kind"], inj["injected"], inj["detected"], inj["missed"]) == ("stream-drop", 3, 3, []), inj
    classes = {p["page"]: p["class"] for p in st["provenance"]["pages"]}
    assert {classes[p] for p in inj["pages"]} <= {"not-resent", "never-sent"}, classes
    dev = trial.device_state
    assert dev["described"] and list(dev["pairs"]) == ["source/destination", "stream/destination", "stream/source"]
    assert dev["identical"], dev
    assert all(p["fields_compared"] > 5000 for p in dev["pairs"].values())


def test_destination_invariant_on_remote_headers_matches_the_whole_image(hosts, tmp_path):
    """The destination host sends the 40-byte dirtyram headers with its digests; the invariant
    checked on them finds exactly what it finds on the whole image."""
    from verifier.analysis.diagnosis import destination_invariant
    from verifier.analysis.pageheader import encode
    size, total = 4 << 20, 64
    img = bytearray(os.urandom(size))
    for i in range(total):  # one instance, one pass written, page 5 left a generation behind
        off = (100 + i) * 4096
        img[off:off + 40] = encode(7, i, total, 0 if i == 5 else 1, total + i, 0)
    (tmp_path / "dst.img").write_bytes(img)
    hosts.src.put(tmp_path / "dst.img", f"{hosts.src.base_dir}/s.img")
    hosts.dst.put(tmp_path / "dst.img", f"{hosts.dst.base_dir}/d.img")
    _, fig = compare_remote_images(RemoteImage(hosts.src, f"{hosts.src.base_dir}/s.img"),
                                   RemoteImage(hosts.dst, f"{hosts.dst.base_dir}/d.img"), size, tmp_path)
    assert fig["dst_headers"] == total and fig["header_bytes"] < total * 100 and fig["page_bytes"] == 0
    remote = [f.to_dict() for f in destination_invariant(Path(fig["dst_headers_image"]), base=0x40000000)]
    whole = [f.to_dict() for f in destination_invariant(tmp_path / "dst.img", base=0x40000000)]
    assert remote == whole and any(f["kind"] == "lost-write" and f["page_index"] == 5 for f in remote), remote


@pytest.fixture
def mixed_hosts(state):
    """TwoHosts with either side on this machine (LocalHost) or in a namespace over SSH."""
    base = f"/var/tmp/dlt-{secrets.token_hex(3)}"  # short: QEMU's unix sockets live below it

    def make(src_local: bool, dst_local: bool, address: str) -> TwoHosts:
        def host(local, side, target):
            return (LocalHost(base_dir=f"{base}/{side}") if local
                    else SshHost(target, _opts(state), base_dir=f"{base}/{side}"))
        return TwoHosts(host(src_local, "src", SRC), host(dst_local, "dst", DST), address)

    yield make
    left = _qemu_pids(base)  # the namespaces share this machine's /proc and /var/tmp
    shutil.rmtree(base, ignore_errors=True)
    assert not left, f"QEMU processes left behind: {left}"


def _assert_verified(trial, uri_prefix: str):
    if _known_72_loss(trial):
        pytest.xfail(f"QEMU 7.2 lost dirty pages after {trial.migration['dirty_sync_count']} passes")
    assert trial.verdict == "pass", (checks(trial), trial.device_state, trial.compare, trial.resume)
    assert trial.resume["ok"] and trial.migration["status"] == "completed"
    assert trial.compare["hosts"]["migration_uri"].startswith(uri_prefix)
    assert trial.compare["page_count"] == 128 * 256 and trial.compare["diff_count"] == 0
    assert trial.compare["destination_invariant"].startswith("checked")
    assert not [f for f in trial.destination_invariant if f["severity"] == "error"], trial.destination_invariant
    t = trial.compare["transfer"]
    assert t["dst_headers"] > 0 and t["page_bytes"] == 0 and t["bytes_moved"] < t["image_bytes"] // 50
    return t


def test_local_source_remote_destination(mixed_hosts, artifacts, tmp_path):
    h = mixed_hosts(True, False, "10.241.2.2")  # this machine -> dlt-dst over its control link
    trial = _trial(tmp_path, artifacts, h, StepReporter(), workloads=(Workload(256, 16, 100),))
    t = _assert_verified(trial, "tcp:10.241.2.2:")
    assert trial.compare["hosts"]["src"] == "localhost" and trial.compare["hosts"]["dst"] == DST
    print(f"local -> {DST}: {trial.timings}, moved {t['bytes_moved']} bytes of {t['image_bytes']}")


def test_remote_source_local_destination(mixed_hosts, artifacts, tmp_path):
    h = mixed_hosts(False, True, "10.241.1.1")  # dlt-src -> this machine's end of its control link
    trial = _trial(tmp_path, artifacts, h, StepReporter(), workloads=(Workload(256, 16, 100),))
    t = _assert_verified(trial, "tcp:10.241.1.1:")
    assert trial.compare["hosts"]["src"] == SRC and trial.compare["hosts"]["dst"] == "localhost"
    print(f"{SRC} -> local: {trial.timings}, moved {t['bytes_moved']} bytes of {t['image_bytes']}")


def _patched_qemu() -> str | None:
    """A QEMU with -savedirtylog from ~/.cache/dirtylog/qemu-builds (newest version first), never a
    bug-zoo variant (its build.json names the defect)."""
    found = []
    for b in Path.home().glob(".cache/dirtylog/qemu-builds/*/bin/qemu-system-arm"):
        try:
            if json.loads((b.parent.parent / "build.json").read_text()).get("bug"):
                continue
        except (OSError, ValueError):
            continue
        try:
            out = subprocess.run([b, "-help"], capture_output=True, text=True, timeout=30).stdout
            ver = subprocess.run([b, "--version"], capture_output=True, text=True, timeout=30).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "\n-savedirtylog" in out and len(ver) > 3:
            found.append((tuple(int(x) for x in ver[3].split(".")), str(b)))
    return max(found)[1] if found else None


def test_savedirtylog_asked_for_without_it_is_refused(hosts):
    from verifier.run.hosts import resolve_capture
    opts = VerifyOptions(capture="savedirtylog")
    with pytest.raises(HostSetupError) as exc:
        resolve_capture(opts, hosts, prepare_hosts(hosts))
    assert exc.value.exit_code == 3 and "-savedirtylog" in str(exc.value) and SRC in str(exc.value)
    opts.capture = "auto"
    assert resolve_capture(opts, hosts, prepare_hosts(hosts)) == "pmemsave" == opts.capture


def test_savedirtylog_capture_across_hosts(hosts, artifacts, tmp_path):
    """Each host's patched QEMU writes its own image at the capture points; then the digests."""
    qemu = _patched_qemu()
    if qemu is None:
        pytest.skip("no QEMU with -savedirtylog in ~/.cache/dirtylog/qemu-builds (dirtylog build --qemu patched)")
    hosts.qemu = qemu  # the namespaces share this machine's files
    trial = _trial(tmp_path, artifacts, hosts, StepReporter(), workloads=(Workload(256, 16, 100),), capture="auto")
    assert trial.compare["hosts"]["capture"] == "savedirtylog"
    assert any("-savedirtylog" in a for a in trial.cmdlines["src"]) and "ram-dst.img" in trial.cmdlines["dst"]
    t = _assert_verified(trial, f"tcp:{DST_MIG}:")
    print(f"-savedirtylog across hosts with {qemu}: {trial.timings}, moved {t['bytes_moved']} bytes")


def test_link_cut_mid_migration_fails_fast_and_leaves_no_qemu(state, hosts, artifacts, tmp_path):
    cut = {}

    def on_sample(info):
        if not cut and info.get("status") == "active" and (info.get("ram") or {}).get("transferred", 0) > 1 << 20:
            _link(state, up=False)
            cut["t"] = time.monotonic()

    try:
        with pytest.raises(VerifyError) as exc:
            _trial(tmp_path, artifacts, hosts, StepReporter(on_sample), max_bandwidth=1 << 20,
                   workloads=(Workload(64, 1, 1000),))
        elapsed = time.monotonic() - cut["t"]
    finally:
        _link(state, up=True)
    print(f"link cut: error after {elapsed:.1f} s: {exc.value}")
    assert isinstance(exc.value, (MigrationError, QemuError)) and exc.value.exit_code == 3
    assert "\n" not in str(exc.value)
    assert elapsed < 60, elapsed
    # the hosts fixture asserts that no QEMU is left on either side


def _wait_reachable(host, timeout: float = 30.0) -> None:
    """After a control link comes back up, until the host answers again (the neighbour entry
    of the cut address fails connects with 'no route to host' for a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            host.check()
            return
        except VerifyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_agent_ends_qemu_when_the_heartbeat_stops(tmp_path):
    """A cut control link gives the agent no EOF: silence on stdin for --heartbeat S ends QEMU
    (here `sleep` stands in for QEMU)."""
    import sys
    from verifier.run.hosts import AGENT_SOURCE
    agent = subprocess.Popen([sys.executable, AGENT_SOURCE, "qemu", "--heartbeat", "2", "--dir", tmp_path, "--",
                              "sleep", "600"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        for _ in range(3):  # heard: still running
            agent.stdin.write("\n")
            agent.stdin.flush()
            time.sleep(1)
        assert agent.poll() is None
        agent.wait(timeout=15)  # stdin stays open and silent
        elapsed = time.monotonic() - t0
        out = agent.stdout.read()
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.stdin.close()
        agent.wait()
    assert "EXIT" in out and elapsed < 10, (out, elapsed)
    log = (tmp_path / "qemu.log").read_text()
    assert "no heartbeat from the controller" in log, log


def test_control_link_cut_mid_migration_fails_and_the_remote_qemu_ends(state, hosts, artifacts, tmp_path):
    """The destination's control link (SSH: QMP, serial, agent) goes down mid-migration and
    stays down: the run fails with one line, exit 3, and the destination's QEMU ends by itself."""
    cut = {}

    def ctl(up: bool):
        subprocess.run(["ip", "-n", "dlt-dst", "link", "set", "ctl0", "up" if up else "down"], check=True)

    def on_sample(info):
        if not cut and info.get("status") == "active" and (info.get("ram") or {}).get("transferred", 0) > 1 << 20:
            ctl(up=False)
            cut["t"] = time.monotonic()

    try:
        with pytest.raises(VerifyError) as exc:
            _trial(tmp_path, artifacts, hosts, StepReporter(on_sample), max_bandwidth=1 << 20,
                   workloads=(Workload(64, 1, 1000),))
        failed = time.monotonic() - cut["t"]
        deadline = time.monotonic() + 45
        while _qemu_pids(hosts.dst.base_dir) and time.monotonic() < deadline:
            time.sleep(0.5)  # the namespaces share this machine's /proc
        gone = time.monotonic() - cut["t"]
        left = _qemu_pids(hosts.dst.base_dir)
    finally:
        ctl(up=True)
        _wait_reachable(hosts.dst)
    print(f"control link cut: error after {failed:.1f} s, destination QEMU gone after {gone:.1f} s: {exc.value}")
    # the controller's ssh gives up first (ServerAlive: 15-20 s), before the agent's heartbeat
    # timeout (30 s) or sshd's ClientAlive (30 s in two-hosts.sh) end the destination's QEMU
    assert exc.value.exit_code == 3 and "\n" not in str(exc.value) and "control connection" in str(exc.value)
    assert failed < 40 and gone < 50 and not left, left


def test_short_link_cut_is_survived(state, hosts, artifacts, tmp_path):
    cut = {}

    def on_sample(info):
        if not cut and info.get("status") == "active" and (info.get("ram") or {}).get("transferred", 0) > 1 << 20:
            _link(state, up=False)
            cut["t"] = time.monotonic()
            threading.Timer(5.0, _link, (state, True)).start()

    try:
        trial = _trial(tmp_path, artifacts, hosts, StepReporter(on_sample), max_bandwidth=2 << 20,
                       workloads=(Workload(64, 1, 1000),))
    finally:
        time.sleep(5.5 - min(5.5, time.monotonic() - cut.get("t", 0)))
        _link(state, up=True)
    assert cut, "the migration ended before the link could be cut"
    print(f"short cut: {trial.verdict}, migration {trial.migration['total_time_ms']} ms, "
          f"{trial.compare['diff_count']} differing pages, moved {trial.compare['transfer']['bytes_moved']} bytes")
    assert trial.migration["status"] == "completed"
    # Debian's QEMU 7.2 may lose dirty pages on a multi-pass migration (a known finding), so
    # the verdict is not asserted here; the comparison itself must have run.
    assert trial.verdict in ("pass", "fail") and trial.resume["ok"]


def test_watchdog_ends_remote_qemu_when_ssh_dies(hosts, artifacts, tmp_path):
    from verifier.run.remote_qemu import RemoteQemu, short_socket_dir
    binaries = prepare_hosts(hosts)
    art = load_artifacts(artifacts)
    kernel, _ = hosts.dst.put_cached(art.kernel)
    rdir = f"{hosts.dst.base_dir}/runs/watchdog"
    sock_dir = short_socket_dir()
    q = RemoteQemu(hosts.dst, binaries["dst"], ["-M", "virt", "-m", "64M", "-kernel", kernel, "-S",
                                                "-display", "none", "-nodefaults"],
                   tmp_path, rdir, "dst", sock_dir)
    q.start()
    try:
        assert q.status() == "prelaunch" or q.status() == "paused"
        assert hosts.dst.qemu_pids(rdir) == [q.remote_pid]
        q.proc.kill()  # the controlling ssh goes away without a word
        deadline = time.monotonic() + 15
        while hosts.dst.qemu_pids(rdir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hosts.dst.qemu_pids(rdir) == []
    finally:
        q.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_idle_remote_qemu_ends_when_its_control_link_is_cut(state, hosts, artifacts, tmp_path):
    """No migration to break: only the agent (heartbeat) or sshd (ClientAlive) can end it."""
    from verifier.run.hosts import HEARTBEAT_TIMEOUT_S
    from verifier.run.remote_qemu import RemoteQemu, short_socket_dir
    binaries = prepare_hosts(hosts)
    kernel, _ = hosts.dst.put_cached(load_artifacts(artifacts).kernel)
    rdir = f"{hosts.dst.base_dir}/runs/ctl-cut"
    sock_dir = short_socket_dir()
    q = RemoteQemu(hosts.dst, binaries["dst"], ["-M", "virt", "-m", "64M", "-kernel", kernel, "-S",
                                                "-display", "none", "-nodefaults"], tmp_path, rdir, "dst", sock_dir)
    q.start()
    link = ["ip", "-n", "dlt-dst", "link", "set", "ctl0"]
    try:
        assert _qemu_pids(rdir) == [q.remote_pid]
        subprocess.run(link + ["down"], check=True)
        t0 = time.monotonic()
        while _qemu_pids(rdir) and time.monotonic() - t0 < HEARTBEAT_TIMEOUT_S + 20:
            time.sleep(0.5)
        gone = time.monotonic() - t0
        assert _qemu_pids(rdir) == [], "the remote QEMU outlived its control connection"
    finally:
        subprocess.run(link + ["up"], check=True)
        q.close()
        _wait_reachable(hosts.dst)
        shutil.rmtree(sock_dir, ignore_errors=True)
    reason = [l for l in Path(rdir, "qemu.log").read_text().splitlines() if "stopping QEMU" in l]
    print(f"control link cut, idle QEMU ended after {gone:.1f} s: {reason}")
    assert gone < HEARTBEAT_TIMEOUT_S + 10 and reason


def test_remote_qemu_killed_is_a_qemu_error(state, hosts, artifacts, tmp_path):
    def on_sample(info):
        if (info.get("ram") or {}).get("transferred", 0) > 1 << 20:
            for pid in hosts.src.qemu_pids(hosts.src.base_dir):
                hosts.src.run(["kill", "-9", str(pid)], check=False)

    t0 = time.monotonic()
    with pytest.raises((QemuError, MigrationError)) as exc:
        _trial(tmp_path, artifacts, hosts, StepReporter(on_sample), max_bandwidth=1 << 20,
               workloads=(Workload(64, 1, 1000),))
    print(f"remote QEMU killed: {type(exc.value).__name__}: {exc.value}")
    assert exc.value.exit_code == 3 and time.monotonic() - t0 < 120


def test_cli_verify_across_hosts(state, artifacts, tmp_path):
    """dirtylog verify --src-host/--dst-host."""
    from conftest import pass_or_known_72_loss, run_dirtylog
    base = f"/var/tmp/dirtylog-test-cli-{tmp_path.name}"
    common = ["verify", "--artifacts", artifacts, "--machine", "virt", "--smp", "1", "--min-passes", "1",
              "--capture", "pmemsave", "--mem", "128", "--workload", "256:16:100", "--src-host", SRC,
              "--dst-host", DST, "--migration-address", DST_MIG, "--ssh-identity",
              state / "ssh" / "id_ed25519", "--remote-dir", base]
    try:
        res = run_dirtylog(*common, "--known-hosts", state / "ssh" / "known_hosts",
                           "--run-dir", tmp_path / "run", "--json", tmp_path / "r.json", timeout=600)
        report = json.loads((tmp_path / "r.json").read_text())
        verdict = pass_or_known_72_loss(res, report)
        assert ("dirty syncs" if verdict == "fail" else "PASS") in res.stdout
        q = report["qemu"]
        assert q["src"]["host"] == SRC and q["dst"]["host"] == DST
        assert q["src"]["version"] == q["dst"]["version"] == q["version"] and q["same_version"]
        trial = report["trials"][0]
        assert trial["compare"]["destination_invariant"].startswith("checked")
        assert trial["compare"]["transfer"]["dst_headers"] > 0
        empty = tmp_path / "empty"
        empty.write_text("")
        t0 = time.monotonic()
        res = run_dirtylog(*common, "--known-hosts", empty, "--run-dir", tmp_path / "run2", timeout=120)
        print(f"unknown host key: exit {res.returncode} after {time.monotonic() - t0:.1f} s")
        assert res.returncode == 3
        assert res.stderr.strip().splitlines()[-1].startswith("dirtylog: error: ") and "host key" in res.stderr
        assert "Traceback" not in res.stderr
    finally:
        SshHost(DST, _opts(state)).run(["rm", "-rf", base], check=False)


def test_matrix_host_keys_load_and_reproduce(tmp_path):
    """src_host/dst_host/... are matrix keys (a list is an axis, as for any key)."""
    from verifier.matrix.spec import MatrixError, load_matrix
    from verifier.matrix.execute import reproducer, verify_options
    (tmp_path / "ssh").mkdir()
    m = tmp_path / "m.toml"
    m.write_text(f"""
[defaults]
ssh_identity = "ssh/id"
known_hosts = "ssh/known_hosts"
migration_address = "{DST_MIG}"

[[scenario]]
name = "across"
src_host = ["local", "{SRC}"]
dst_host = "{DST}:22"
allow_qemu_mismatch = true
""")
    scenarios = load_matrix(m).scenarios
    assert [s.name for s in scenarios] == ["across[src_host=local]", f"across[src_host={SRC}]"]
    p = scenarios[1].params
    assert p["ssh_identity"] == str(tmp_path / "ssh" / "id") and p["remote_dir"] == "/var/tmp/dirtylog-remote"
    opts = verify_options(scenarios[1], tmp_path / "run")
    assert (opts.src_host, opts.dst_host, opts.migration_address, opts.allow_qemu_mismatch) == \
        (SRC, f"{DST}:22", DST_MIG, True)
    cmd = reproducer(scenarios[1], tmp_path / "run")
    assert f"--src-host {SRC} --dst-host {DST}:22 --migration-address {DST_MIG}" in cmd
    assert "--allow-qemu-mismatch" in cmd and "--remote-dir /var/tmp/dirtylog-remote" in cmd
    m.write_text('[[scenario]]\nname = "x"\ndst_host = "a b"\n')
    with pytest.raises(MatrixError, match=r"m.toml:3.*dst_host"):
        load_matrix(m)


def test_matrix_scenario_across_hosts(state, artifacts, tmp_path):
    """verify --matrix with a two-host scenario: checked, run across the namespaces, reported."""
    from conftest import pass_or_known_72_loss, run_dirtylog
    base = f"/var/tmp/dlt-{secrets.token_hex(3)}"
    m = tmp_path / "m.toml"
    m.write_text(f"""
[[scenario]]
name = "across"
machine = "virt"
smp = 1
mem = 128
min_passes = 1
capture = "pmemsave"
workloads = ["256:16:100"]
src_host = "{SRC}"
dst_host = "{DST}"
migration_address = "{DST_MIG}"
ssh_identity = "{state / 'ssh' / 'id_ed25519'}"
known_hosts = "{state / 'ssh' / 'known_hosts'}"
remote_dir = "{base}"
""")
    try:
        res = run_dirtylog("verify", "--matrix", m, "--artifacts", artifacts, "--run-dir", tmp_path / "run",
                           timeout=600)
        report = json.loads((tmp_path / "run" / "matrix-report.json").read_text())
        sc = report["scenarios"][0]
        print(f"matrix across hosts: exit {res.returncode}, {sc['status']}, {sc.get('error')}")
        pass_or_known_72_loss(res, sc["report"])
        assert "--src-host" in sc["command"]
        trial = sc["report"]["trials"][0]
        assert trial["compare"]["hosts"]["dst"] == DST and sc["report"]["qemu"]["dst"]["host"] == DST
        if res.returncode == 1:
            assert "dirty syncs" in res.stdout + res.stderr or trial["migration"]["dirty_sync_count"] > 2
    finally:
        shutil.rmtree(base, ignore_errors=True)
        assert _qemu_pids(base) == []


def test_cli_cross_version_allowed_remote_source_local_destination(state, artifacts, tmp_path):
    """--allow-qemu-mismatch end to end: the destination (this machine) runs a QEMU reporting
    another version; the run goes ahead and report.json names both."""
    from conftest import pass_or_known_72_loss, run_dirtylog
    base = f"/var/tmp/dlt-{secrets.token_hex(3)}"
    other = _other_version_qemu(tmp_path)
    try:
        res = run_dirtylog("verify", "--artifacts", artifacts, "--machine", "virt", "--smp", "1", "--min-passes", "1",
                           "--mem", "128", "--workload", "256:16:100", "--src-host", SRC, "--dst-host", "local",
                           "--migration-address", "10.241.1.1", "--dst-qemu", other, "--allow-qemu-mismatch",
                           "--ssh-identity", state / "ssh" / "id_ed25519", "--known-hosts", state / "ssh" / "known_hosts",
                           "--remote-dir", base, "--run-dir", tmp_path / "run", "--json", tmp_path / "r.json", timeout=600)
        report = json.loads((tmp_path / "r.json").read_text())
        pass_or_known_72_loss(res, report)
        q = report["qemu"]
        print(f"cross-version allowed: exit {res.returncode}, src {q['src']['version']} dst {q['dst']['version']}")
        assert (q["src"]["host"], q["dst"]["host"]) == (SRC, "localhost")
        assert q["dst"]["version"] == "7.2.99" and q["dst"]["path"] == str(other)
        assert q["mismatch_allowed"] and not q["same_version"]
        assert report["options"]["dst_qemu"] == str(other) and report["options"]["allow_qemu_mismatch"]
        trial = report["trials"][0]
        assert trial["migration"]["status"] == "completed" and trial["compare"]["hosts"]["dst"] == "localhost"
        assert report["verdict"] == "pass" or trial["migration"]["dirty_sync_count"] > 2  # 7.2's known loss
    finally:
        shutil.rmtree(base, ignore_errors=True)
        assert _qemu_pids(base) == []


def test_remote_qemu_ends_when_the_controller_is_killed(state, hosts, artifacts, tmp_path):
    """SIGKILL of dirtylog itself: the agent's stdin (a pipe from the controller through ssh)
    reaches EOF and the agent ends QEMU."""
    import sys
    art = load_artifacts(artifacts)
    kernel, _ = hosts.dst.put_cached(art.kernel)
    rdir = f"{hosts.dst.base_dir}/runs/controller-killed"
    code = f"""
import sys, time
from pathlib import Path
from verifier.run.remote_qemu import RemoteQemu, short_socket_dir
from verifier.run.hosts import SshHost, SshOptions, prepare_hosts
from verifier.run.qemu import QemuBinary
h = SshHost({DST!r}, SshOptions(identity={str(state / 'ssh' / 'id_ed25519')!r},
            known_hosts={str(state / 'ssh' / 'known_hosts')!r}), base_dir={hosts.dst.base_dir!r})
b = h.probe_qemu("qemu-system-arm")
q = RemoteQemu(h, b, ["-M", "virt", "-m", "64M", "-kernel", {kernel!r}, "-S", "-display", "none",
               "-nodefaults"], Path({str(tmp_path)!r}), {rdir!r}, "dst", short_socket_dir())
q.start()
print("STARTED", q.sock_dir, flush=True)
time.sleep(600)
"""
    started = []
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        started = proc.stdout.readline().split()
        assert started[:1] == ["STARTED"]
        assert len(hosts.dst.qemu_pids(rdir)) == 1
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while hosts.dst.qemu_pids(rdir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hosts.dst.qemu_pids(rdir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        if len(started) > 1 and started[1].startswith("/tmp/dl-"):
            shutil.rmtree(started[1], ignore_errors=True)
