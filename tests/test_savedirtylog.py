"""-savedirtylog (issue #4): the patched QEMU writes guest RAM itself at the two capture points.

The `qemu_build` tests build Debian's QEMU 10.0 with our patch once per session (into the
shared content-addressed cache: a few minutes the first time, a cache hit afterwards) and
drive real migrations with verifier.run.qemu / verifier.run.migration directly, so that one and the same
migration is captured both ways: QEMU's own -savedirtylog images and the memory-backend-file
RAM (the source's file in postmigrate, the destination's while it is still paused).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from builder.cache import Cache
from builder import qemu_build
from verifier.artifacts import load_artifacts
from verifier.analysis.compare import compare_images
from verifier.errors import CaptureError, InputError, VerifyError
from verifier.run.migration import MigrationPolicy, run_migration, start_incoming
from builder.machines import MACHINES
from verifier.run.qemu import GuestConfig, QemuProcess, machine_args, probe_qemu
from verifier.run.trial import READY_RE
from verifier.capture.savedirtylog import savedirtylog_args, supports_savedirtylog, wait_for_image
from verifier.run.workload import SEED_WORKLOADS, kernel_cmdline_arg

from conftest import pass_or_known_72_loss, qemu_processes_under, run_dirtylog

MEM_MB = 256
SIZE = MEM_MB << 20


# --------------------------------------------------------------------------
# without QEMU


def test_savedirtylog_args():
    assert savedirtylog_args() == ["-savedirtylog"]
    assert savedirtylog_args("ram-src.img") == ["-savedirtylog", "ram-src.img"]
    assert savedirtylog_args(Path("/tmp/x.img")) == ["-savedirtylog", "/tmp/x.img"]
    # The argument is optional for QEMU: a path that looks like an option must not be one.
    assert savedirtylog_args("-odd") == ["-savedirtylog", "./-odd"]
    with pytest.raises(InputError):
        savedirtylog_args("")


def test_wait_for_image(tmp_path):
    img = tmp_path / "ram.img"
    with pytest.raises(CaptureError, match="did not write"):
        wait_for_image(img, 8192, timeout=0.2)
    with pytest.raises(CaptureError, match="exited without writing"):
        wait_for_image(img, 8192, timeout=10, alive=lambda: False)
    img.write_bytes(b"\0" * 4096)
    with pytest.raises(CaptureError, match="4096 bytes instead of 8192"):
        wait_for_image(img, 8192, timeout=1)
    img.write_bytes(b"\0" * 8192)
    assert wait_for_image(img, 8192, timeout=1) == img


def test_unpatched_qemu_is_detected(tmp_path):
    assert supports_savedirtylog(tmp_path / "missing") is False
    debian = shutil.which("qemu-system-arm")
    if debian:
        assert supports_savedirtylog(debian) is False


@pytest.mark.parametrize("version", qemu_build.SUPPORTED)
def test_lock_and_patches_are_consistent(version):
    lock = qemu_build.load_qemu_lock(version)
    assert lock.package == "qemu" and lock.version.startswith(f"1:{version}")
    names = [f.name for f in lock.files]
    assert any(n.endswith(".dsc") for n in names)
    assert any(".orig.tar." in n for n in names) and any(".debian.tar." in n for n in names)
    patches = qemu_build.patch_files(version)
    text = "".join(p.read_text() for p in patches)
    for needle in ("qemu-options.hx", "migration/migration.c", "migration/savedirtylog.c",
                   'DEF("savedirtylog"', "fsync"):
        assert needle in text, needle
    if version == "10.0":
        assert {w[1] for w in lock.wheels} == {"meson-1.5.0-py3-none-any.whl",
                                                "pycotap-1.3.1-py3-none-any.whl"}


def test_cache_key_covers_patch_bytes_and_configure_args(tmp_path):
    lock = qemu_build.load_qemu_lock("10.0")
    patches = qemu_build.patch_files("10.0")
    args = qemu_build.configure_args("10.0")
    key, psha = qemu_build.cache_key(lock, patches, args)
    assert qemu_build.cache_key(lock, patches, args) == (key, psha)
    copy = tmp_path / patches[0].name
    copy.write_bytes(patches[0].read_bytes() + b"\n")
    assert qemu_build.cache_key(lock, [copy, *patches[1:]], args)[0] != key
    assert qemu_build.cache_key(lock, patches, args + ["--enable-debug"])[0] != key


# --------------------------------------------------------------------------
# with the patched QEMU


def _versions() -> list[str]:
    """QEMU 10.0 by default; DIRTYLOG_SAVEDIRTYLOG_QEMU=10.0,7.2 tests 7.2's patch too."""
    return [v.strip() for v in os.environ.get("DIRTYLOG_SAVEDIRTYLOG_QEMU", "10.0").split(",") if v.strip()]


@pytest.fixture(scope="session", params=_versions())
def patched_qemu(request):
    t0 = time.monotonic()
    build = qemu_build.build_patched_qemu(request.param, Cache(), log=lambda m: print(f"[qemu_build] {m}"))
    print(f"[qemu_build] {build.qemu_system_arm} ({'cache hit' if build.cache_hit else 'built'} in "
          f"{time.monotonic() - t0:.1f} s)")
    return build


@pytest.fixture(scope="session")
def guest(artifacts):
    return load_artifacts(artifacts)


def _config(art, machine_name: str, ram_file: str | None) -> GuestConfig:
    machine = MACHINES[machine_name]
    append = " ".join((f"console={machine.console}", "panic=1", kernel_cmdline_arg(SEED_WORKLOADS)))
    return GuestConfig(machine=machine, kernel=art.kernel.resolve(),
                       dtb=art.dtb.resolve() if art.dtb and machine.needs_dtb else None,
                       initrd=art.initrd.resolve(), append=append, mem_mb=MEM_MB, smp=1,
                       ram_file=ram_file)


def _migrate(qemu, art, machine_name: str, tdir: Path, src_extra: list[str], dst_extra: list[str],
             backing: bool = True, min_passes: int = 3, after=None):
    """Boot the source, migrate it to a paused destination; `after(src, dst)` runs with both up."""
    tdir.mkdir(parents=True, exist_ok=True)
    src_args = machine_args(qemu, _config(art, machine_name, "src.ram" if backing else None)) + src_extra
    dst_args = (machine_args(qemu, _config(art, machine_name, "dst.ram" if backing else None))
                + dst_extra + ["-S", "-incoming", "defer"])
    uri = "unix:migrate.sock"
    with QemuProcess(qemu, dst_args, tdir, "dst") as dst, QemuProcess(qemu, src_args, tdir, "src") as src:
        m = src.serial.wait_for(READY_RE, 180, alive=src.alive)
        assert m is not None and m.group(0).startswith(b"DIRTYLOG-READY"), src.output_tail()
        time.sleep(1)
        policy = MigrationPolicy(min_passes=min_passes, timeout_s=240)
        start_incoming(src, dst, uri, policy)
        result = None
        try:
            result = run_migration(src, dst, uri, policy, tdir / "timeline.jsonl")
        finally:
            if after is not None:
                after(src, dst, result)
    return result


def _same(a: Path, b: Path) -> None:
    res = compare_images(a, b)
    assert res.diff_count == 0, f"{a.name} vs {b.name}: {res.diff_count} pages differ"


@pytest.mark.qemu_build
def test_patched_qemu_lists_the_option(patched_qemu):
    assert supports_savedirtylog(patched_qemu.qemu_system_arm)
    key = ".".join(patched_qemu.version.split(".")[:2])
    assert key in qemu_build.SUPPORTED
    assert patched_qemu.source_version == qemu_build.load_qemu_lock(key).version
    meta = json.loads((patched_qemu.directory / "build.json").read_text())
    assert meta["cache_key"] == patched_qemu.cache_key


@pytest.mark.qemu_build
@pytest.mark.parametrize("machine_name", ["virt", "vexpress-a15"])
def test_images_equal_the_backing_file_captures_of_the_same_migration(patched_qemu, guest, machine_name,
                                                                      tmp_path):
    qemu = probe_qemu(str(patched_qemu.qemu_system_arm))
    seen = {}

    def after(src, dst, result):
        # Still before the destination could resume: its live RAM file is the evidence.
        seen["src_status"], seen["dst_status"] = src.status(), dst.status()
        shutil.copyfile(tmp_path / "dst.ram", tmp_path / "dst.ram.copy")

    result = _migrate(qemu, guest, machine_name, tmp_path, savedirtylog_args("ram-src.img"),
                      savedirtylog_args("ram-dst.img"), after=after)
    assert seen == {"src_status": "postmigrate", "dst_status": "paused"}
    assert result.figures["dirty_sync_count"] >= 3
    src_img = wait_for_image(tmp_path / "ram-src.img", SIZE, timeout=1)
    dst_img = wait_for_image(tmp_path / "ram-dst.img", SIZE, timeout=1)
    assert not list(tmp_path.glob("*.partial"))
    _same(src_img, tmp_path / "src.ram")  # the source's RAM file, frozen in postmigrate
    _same(dst_img, tmp_path / "dst.ram.copy")
    # The RAM holds the guest (not an all-zero or truncated dump).
    with open(src_img, "rb") as f:
        assert f.read(1 << 20).strip(b"\0")
    assert qemu_processes_under(tmp_path) == []


@pytest.mark.qemu_build
def test_default_names_ramimage0_and_ramimage1_in_the_working_directory(patched_qemu, guest, tmp_path):
    qemu = probe_qemu(str(patched_qemu.qemu_system_arm))
    _migrate(qemu, guest, "virt", tmp_path, savedirtylog_args(), savedirtylog_args(), min_passes=1)
    img0 = wait_for_image(tmp_path / "ramimage0", SIZE, timeout=1)
    img1 = wait_for_image(tmp_path / "ramimage1", SIZE, timeout=1)
    _same(img0, tmp_path / "src.ram")
    _same(img1, tmp_path / "dst.ram")  # the destination never resumed


@pytest.mark.qemu_build
def test_unwritable_source_path_fails_the_migration(patched_qemu, guest, tmp_path):
    qemu = probe_qemu(str(patched_qemu.qemu_system_arm))
    bad = tmp_path / "no-such-dir" / "ram-src.img"
    seen = {}

    def after(src, dst, result):
        seen["src"] = src.qmp("query-migrate")
        seen["src_status"] = src.status()

    with pytest.raises(VerifyError, match="migration failed: -savedirtylog: cannot create"):
        _migrate(qemu, guest, "virt", tmp_path, savedirtylog_args(str(bad)), [], backing=False,
                 min_passes=1, after=after)
    assert seen["src"]["status"] == "failed"
    assert "No such file or directory" in seen["src"]["error-desc"]
    assert seen["src_status"] != "postmigrate"  # not completed: the source keeps the guest
    log = (tmp_path / "qemu-src.log").read_text()
    assert "-savedirtylog: cannot create guest RAM image" in log
    assert not bad.parent.exists()


@pytest.mark.qemu_build
def test_unwritable_destination_path_fails_incoming_and_never_resumes(patched_qemu, guest, tmp_path):
    qemu = probe_qemu(str(patched_qemu.qemu_system_arm))
    bad = tmp_path / "is-a-directory"
    bad.mkdir()
    seen = {}

    def after(src, dst, result):
        seen["dst_rc"] = dst.proc.wait(timeout=30)

    with pytest.raises(VerifyError):
        _migrate(qemu, guest, "virt", tmp_path, [], savedirtylog_args(str(bad)), backing=False,
                 min_passes=1, after=after)
    assert seen["dst_rc"] == 1
    log = (tmp_path / "qemu-dst.log").read_text()
    assert "-savedirtylog: cannot write guest RAM image" in log
    assert "destination side" in log
    assert not list(tmp_path.glob("*.partial"))
    # The destination never told QMP it was running.
    assert '"running"' not in (tmp_path / "qmp-dst.log").read_text()


@pytest.mark.qemu_build
def test_rebuild_is_a_cache_hit(patched_qemu):
    t0 = time.monotonic()
    key = ".".join(patched_qemu.version.split(".")[:2])
    again = qemu_build.build_patched_qemu(key, Cache(), offline=True, log=lambda m: None)
    elapsed = time.monotonic() - t0
    assert again.cache_hit
    assert again.qemu_system_arm == patched_qemu.qemu_system_arm
    assert again.cache_key == patched_qemu.cache_key
    assert elapsed < 5, elapsed


@pytest.mark.qemu_build
@pytest.mark.parametrize("mode,args", [
    ("multifd", ["--capability", "multifd=on", "--parameter", "multifd-channels=2"]),
    ("xbzrle", ["--capability", "xbzrle=on"]),
    ("auto-converge", ["--capability", "auto-converge=on"]),
    ("postcopy", ["--postcopy", "--capture", "pmemsave"]),
])
def test_migration_modes_pass_on_the_patched_qemu(patched_qemu, artifacts, tmp_path, mode, args):
    """The migration modes through the CLI on a QEMU whose dirty tracking is correct (10.0): every
    one must PASS with forced passes. QEMU 10 refuses multifd once the destination listens, which
    Debian's 7.2 accepted: this is where the order of capabilities and migrate-incoming is pinned."""
    run_dir = tmp_path / "run"
    res = run_dirtylog("verify", "--artifacts", artifacts, "--qemu", patched_qemu.qemu_system_arm,
                       "--machine", "virt", "--smp", "1", "--min-passes", "1" if mode == "postcopy" else "3",
                       *args, "--run-dir", run_dir)
    if not patched_qemu.version.startswith("10."):  # 7.2 loses dirty pages: PASS or that known finding
        pass_or_known_72_loss(res, json.loads((run_dir / "report.json").read_text()))
        return
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["trials"][0]["migration"]["status"] == "completed"
    cap = "postcopy-ram" if mode == "postcopy" else mode
    assert f'"capability": "{cap}", "state": true' in (run_dir / "trial-01" / "qmp-dst.log").read_text()
    assert qemu_processes_under(tmp_path) == []
