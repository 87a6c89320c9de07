"""Shared fixtures: real artifacts built once per session with the real builder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DIRTYLOG = [sys.executable, "-m", "dirtylog.cli"]


def run_dirtylog(*args, cwd=None, timeout=900, env=None):
    """Run the real CLI in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([*DIRTYLOG, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Guest artifacts from a real `dirtylog build` (downloads through the shared cache)."""
    out = tmp_path_factory.mktemp("artifacts")
    res = run_dirtylog("build", "--out", out)
    assert res.returncode == 0, res.stderr
    return out


LOST_PAGES_72 = "qemu72-tcg-lost-dirty-pages"


@pytest.fixture(scope="session")
def debian_qemu72() -> str:
    """Debian 12's qemu-system-arm (7.2), for tests that state 7.2's behaviour: they pass it as
    --qemu, so they run on the QEMU they are about, and are skipped before any work elsewhere."""
    import shutil

    from verifier.errors import InputError
    from verifier.run.qemu import probe_qemu
    path = shutil.which("qemu-system-arm")
    try:
        qemu = probe_qemu(path or "qemu-system-arm")
    except InputError as exc:
        pytest.fail(f"qemu-system-arm is part of the test setup (scripts/setup-host.sh): {exc}")
    if qemu.version[:2] != (7, 2):
        pytest.skip(f"states the behaviour of Debian 12's QEMU 7.2; this host's qemu-system-arm is {qemu.version_str}")
    return qemu.path


def pass_or_known_72_loss(res, report: dict) -> str:
    """The verdict of a run on Debian's QEMU 7.2, whose TCG loses dirty pages now and then in
    multi-pass migrations (docs/known-results.md): PASS, or FAIL for exactly that known finding
    with the CPU state identical, and the guest running after resume unless kernel pages
    (not-dirtyram) were lost. Any other outcome fails the test. Returns "pass" or "fail"."""
    out = res.stdout + res.stderr
    if res.returncode == 0:
        assert report["verdict"] == "pass", out
        return "pass"
    assert res.returncode == 1, out
    assert report["qemu"]["version"].split(".")[0] == "7", f"FAIL on QEMU {report['qemu']['version']}: {out}"
    for t in report["trials"]:
        if t["verdict"] == "fail":
            assert [f["id"] for f in t["known_findings"]] == [LOST_PAGES_72], t.get("known_findings")
            assert t["checks"]["cpu_state"]["ok"] is not False, t["checks"]
            kernel_lost = "not-dirtyram" in (t.get("compare") or {}).get("diagnosis_counts", {})
            assert t["checks"]["liveness"]["ok"] is True or kernel_lost, t["checks"]
        else:
            assert t["verdict"] == "pass", t
    return "fail"


def sigint_default() -> None:
    """preexec_fn for a child the test will Ctrl-C: a pytest started in the background by a
    shell without job control inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt in the child (a CI run launched with `nohup ... &` showed it)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def qemu_processes_under(path: Path) -> list[str]:
    """Command lines of running QEMU processes whose working directory is below `path`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if "qemu-system" in exe and cwd.startswith(str(path)):
            found.append(f"{pid} {exe} {cwd}")
    return found


# Fixtures that build guest artifacts or QEMU first (downloads, cross-compilers, minutes): a test
# that uses one is marked `build` and is not one of `make test-fast`'s unit tests.
BUILD_FIXTURES = {"artifacts", "e2e_env", "patched_qemu", "guest", "built", "warm_image", "hosts", "mixed_hosts",
                  "state", "debian_qemu72"}


# Fixtures that compile with a cross-compiler: their tests are marked `cross`.
CROSS_FIXTURES = {"armhf_static", "armhf", "arm_bin"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if BUILD_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.build)
        if CROSS_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.cross)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """DIRTYLOG_NO_SKIPS=1 (scripts/check-setup.sh): a skip is a failure, so a program a test needs
    and the setup never installs cannot hide behind "not installed"."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("DIRTYLOG_NO_SKIPS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under DIRTYLOG_NO_SKIPS=1: {reason}"
