"""Bad input gets one clear line and exit 2 (or 3 for infrastructure), never a traceback, and
nothing half-written. These run the real CLI; only the guest-booting ones need artifacts."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, qemu_processes_under, run_dirtylog


def _one_line_error(res, code):
    assert res.returncode == code, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("dirtylog: error:") or last.startswith("Error:"), res.stderr
    return last


@pytest.mark.parametrize("spec", ["1:2:3", "0:1:1", "abc", "5:5", "5:5:5:5", "-1:1:1", "1:1:0"])
def test_malformed_workload_is_a_usage_error(spec, tmp_path):
    res = run_dirtylog("verify", "--artifacts", tmp_path, "--workload", spec)
    assert "--workload" in _one_line_error(res, 2)


def test_version_names_the_checkout_commit():
    """From a git checkout `--version` names its commit (and local changes); an installed package
    says so instead (tests/test_wheel.py)."""
    import re
    res = run_dirtylog("--version", cwd=REPO)
    assert res.returncode == 0, res.stderr
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        assert res.stdout.strip() == "dirtylog 0.1.0 (checkout without git)"
        return
    m = re.fullmatch(r"dirtylog 0\.1\.0 \(git ([0-9a-f]{12})(, with local changes)?\)", res.stdout.strip())
    assert m and head.stdout.startswith(m.group(1)), res.stdout


def test_missing_artifacts_directory_is_an_input_error(tmp_path):
    last = _one_line_error(run_dirtylog("verify", "--artifacts", tmp_path / "nope"), 2)
    assert "not found" in last


def test_compare_refuses_images_of_different_sizes(tmp_path):
    (tmp_path / "a").write_bytes(b"\0" * 8192)
    (tmp_path / "b").write_bytes(b"\0" * 4096)
    last = _one_line_error(run_dirtylog("compare", tmp_path / "a", tmp_path / "b"), 2)
    assert "differ in size" in last


def test_compare_lists_every_differing_page_with_its_guest_physical_address(tmp_path):
    a = bytearray(64 * 4096)
    b = bytearray(a)
    for page in (0, 7, 8, 63):
        b[page * 4096 + 4095] = 1
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(b)
    res = run_dirtylog("compare", tmp_path / "a", tmp_path / "b", "--json", tmp_path / "r.json")
    assert res.returncode == 1
    lines = [l for l in res.stdout.splitlines() if l.startswith("page ")]
    assert lines == [f"page {p} offset {p * 4096:#x} guest_phys_addr {0x80000000 + p * 4096:#x}"
                     for p in (0, 7, 8, 63)]
    assert json.loads((tmp_path / "r.json").read_text())["diff_pages"] == [0, 7, 8, 63]
    same = run_dirtylog("compare", tmp_path / "a", tmp_path / "a")
    assert same.returncode == 0 and "identical" in same.stdout


def _copy_artifacts(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_manifest(art: Path, name: str, data: bytes) -> None:
    """Replace one artifact and re-hash it in the manifest (a consistent but wrong file)."""
    import hashlib
    (art / name).write_bytes(data)
    m = json.loads((art / "manifest.json").read_text())
    for f in m["files"]:
        if f["name"] == name:
            f["sha256"] = hashlib.sha256(data).hexdigest()
    (art / "manifest.json").write_text(json.dumps(m))


@pytest.mark.e2e
def test_changed_artifact_is_refused(artifacts, tmp_path):
    art = _copy_artifacts(artifacts, tmp_path / "art")
    with open(art / "zImage", "ab") as f:
        f.write(b"x")
    assert "does not match its sha256" in _one_line_error(run_dirtylog("verify", "--artifacts", art), 2)


@pytest.mark.e2e
@pytest.mark.parametrize("name,data,expect", [
    ("zImage", b"\x7fELF\x02\x01\x01" + b"\0" * 11 + b"\x3e\x00" + b"\0" * 100, "x86-64"),
    ("zImage", b"\0" * 0x202 + b"HdrS" + b"\0" * 64, "bzImage"),
    ("guest_a15x2.dtb", b"not a device tree at all" * 4, "not a flattened device tree"),
    ("initrd.cpio-dirtyram.gz", b"PK\x03\x04 this is a zip", "neither a cpio archive"),
])
def test_wrong_kind_of_artifact_is_refused_before_booting(artifacts, tmp_path, name, data, expect):
    art = _copy_artifacts(artifacts, tmp_path / "art")
    _rewrite_manifest(art, name, data)
    assert expect in _one_line_error(run_dirtylog("verify", "--artifacts", art, "--run-dir", tmp_path / "run"), 2)


@pytest.mark.e2e
def test_plain_cpio_named_gz_is_accepted_as_the_kernel_does(artifacts, tmp_path):
    import gzip
    art = _copy_artifacts(artifacts, tmp_path / "art")
    _rewrite_manifest(art, "initrd.cpio-dirtyram.gz", gzip.decompress((art / "initrd.cpio-dirtyram.gz").read_bytes()))
    res = run_dirtylog("verify", "--artifacts", art, "--machine", "virt", "--smp", "1", "--min-passes", "1",
                       "--capture", "pmemsave", "--workload", "64:64:20", "--run-dir", tmp_path / "run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "is named .gz but is a newc cpio archive" in res.stderr


@pytest.mark.e2e
def test_workloads_that_do_not_fit_guest_memory_are_refused(artifacts):
    last = _one_line_error(run_dirtylog("verify", "--artifacts", artifacts, "--mem", "64",
                                        "--workload", "60000:1:10"), 2)
    assert "raise --mem" in last


@pytest.mark.e2e
def test_memory_below_what_the_kernel_boots_with_is_refused(artifacts):
    assert "at least 64 MiB" in _one_line_error(run_dirtylog("verify", "--artifacts", artifacts, "--mem", "32"), 2)


@pytest.mark.e2e
def test_missing_or_too_old_qemu_is_an_input_error(artifacts, tmp_path):
    assert "not found" in _one_line_error(
        run_dirtylog("verify", "--artifacts", artifacts, "--qemu", tmp_path / "no-qemu"), 2)
    old = tmp_path / "qemu-system-arm"
    old.write_text("#!/bin/sh\necho 'QEMU emulator version 4.2.1 (Debian 1:4.2-3)'\n")
    old.chmod(0o755)
    assert "needs QEMU 6.0" in _one_line_error(run_dirtylog("verify", "--artifacts", artifacts, "--qemu", old), 2)


@pytest.mark.e2e
def test_qemu_that_dies_at_start_is_an_infrastructure_failure_with_its_output(artifacts, tmp_path):
    bad = tmp_path / "qemu-system-arm"
    bad.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'QEMU emulator version 7.2.0'; exit 0; }\n"
                   "echo 'qemu: could not load kernel' >&2; exit 1\n")
    bad.chmod(0o755)
    last = _one_line_error(run_dirtylog("verify", "--artifacts", artifacts, "--qemu", bad,
                                        "--run-dir", tmp_path / "run"), 3)
    assert "could not load kernel" in last
    assert qemu_processes_under(tmp_path) == []


@pytest.mark.e2e
def test_qemu_without_gdbstub_is_exit_3_naming_no_cpu_state(artifacts, tmp_path):
    """Simulated (no gdbstub-less QEMU is packaged here): the real qemu-system-arm, except that it
    refuses -gdb as a QEMU built without gdbstub support would. One line, exit 3, no QEMU left;
    --no-cpu-state then runs the verification without the check."""
    real = shutil.which("qemu-system-arm")
    wrapper = tmp_path / "qemu-no-gdbstub"
    wrapper.write_text("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -gdb ] && "
                       "{ echo 'qemu-system-arm: -gdb unix:x: gdbstub support is disabled' >&2; exit 1; }; done\n"
                       f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    common = ["verify", "--artifacts", artifacts, "--qemu", wrapper, "--machine", "virt", "--smp", "1",
              "--min-passes", "1", "--workload", "64:64:20"]
    last = _one_line_error(run_dirtylog(*common, "--run-dir", tmp_path / "run"), 3)
    assert "gdbstub support is disabled" in last and "--no-cpu-state skips it" in last
    assert qemu_processes_under(tmp_path) == []
    res = run_dirtylog(*common, "--no-cpu-state", "--run-dir", tmp_path / "run2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "CPU state not compared (--no-cpu-state)" in res.stdout


@pytest.mark.e2e
def test_offline_build_with_an_empty_cache_names_what_is_missing(tmp_path):
    env = dict(os.environ, DIRTYLOG_CACHE=str(tmp_path / "empty-cache"))
    res = run_dirtylog("build", "--offline", "--out", tmp_path / "out", env=env)
    last = _one_line_error(res, 3)
    assert "busybox-static" in last and "linux-image-" in last
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("args,expect", [
    (["--inject", "bogus"], "expected untracked-writes, corrupt-capture, cpu-register"),
    (["--inject", "untracked-writes:0"], "between 1 and 4096"),
    (["--inject", "untracked-writes", "--capture", "pmemsave"], "needs --capture backing-file"),
    (["--postcopy", "--capture", "backing-file"], "--postcopy cannot use --capture backing-file"),
    (["--capability", "multifd"], "expected NAME=VALUE"),
    (["--capability", "multifd=maybe"], "must be on or off"),
    (["--parameter", "max-bandwidth=5"], "driven by dirtylog"),
    (["--accel", "kvm", "--machine", "vexpress-a15"], "--accel kvm"),
    (["--tcg-thread", "multi", "--accel", "kvm"], "--tcg-thread applies to --accel tcg only"),
    # what a host cannot do: refused by verifier.run.hosts.check_hosts before the host is contacted
    (["--dst-host", "tester@192.0.2.7", "--migration-address", "192.0.2.7", "--capture", "backing-file"],
     "--capture backing-file: the source runs on localhost under dirtylog's agent"),
    (["--src-host", "local", "--inject", "corrupt-capture"], "--inject: the source runs on localhost"),
])
@pytest.mark.e2e
def test_inconsistent_verify_options_are_refused(artifacts, args, expect):
    assert expect in _one_line_error(run_dirtylog("verify", "--artifacts", artifacts, *args), 2)


@pytest.mark.parametrize("args,expect", [
    (["--capability", "no-such-cap=on"], "has no migration capability no-such-cap; it has: "),
    (["--parameter", "multifd-chanels=2"], "has no migration parameter multifd-chanels; it has: "),
])
@pytest.mark.e2e
def test_what_this_qemu_lacks_is_refused_before_the_guest_boots(artifacts, tmp_path, args, expect):
    """Asked of the real QEMU (query-migrate-capabilities/-parameters) right after it starts."""
    t0 = time.monotonic()
    res = run_dirtylog("verify", "--artifacts", artifacts, "--machine", "virt", "--smp", "1", *args,
                       "--run-dir", tmp_path / "run")
    assert expect in _one_line_error(res, 2)
    assert time.monotonic() - t0 < 5  # no boot, no migration
    assert "DIRTYLOG-READY" not in (tmp_path / "run" / "trial-01" / "serial-src.log").read_text()


def test_a_bug_in_dirtylog_is_exit_4_with_its_traceback(tmp_path):
    """Simulated bug (no real one to trigger on purpose): the comparator raises an unexpected
    exception. The CLI prints the traceback and one line naming it a dirtylog bug, exit 4."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(8192))
    b.write_bytes(bytes(8192))
    code = ("import sys, verifier.analysis.compare as c\n"
            "def boom(*a, **k): raise ZeroDivisionError('simulated bug')\n"
            "c.compare_images = boom\n"
            "from dirtylog.cli import main\n"
            f"main(['compare', {str(a)!r}, {str(b)!r}])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 4, res.stderr
    assert "Traceback (most recent call last)" in res.stderr and "ZeroDivisionError: simulated bug" in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("dirtylog: error: internal error: ZeroDivisionError: simulated bug (a bug in dirtylog ")
    assert "please report it" in last
