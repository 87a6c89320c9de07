"""`build_artifacts(arch=...)` for armv7, aarch64 and x86_64: real builds from the pinned Debian
packages (downloads go through the shared cache), rebuilt byte for byte, and booted when QEMU is there."""

import gzip
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from builder.build import ARCH_BUILDS, build_artifacts
from builder.cache import sha256_file
from builder.elfcheck import check_elf
from builder.errors import BuildInputError
from builder.initrd import read_initrd
from builder.lock import ARCH_LOCKS, ROLE_SPECS_BY_ARCH, load_lock, lock_path_for

ARCHES = ["armv7", "aarch64", "x86_64"]
EXPECTED_FILES = {
    "armv7": {"zImage": "kernel", "guest_a15x2.dtb": "dtb", "initrd.cpio-dirtyram.gz": "initrd",
              "dirtyram.arm": "workload"},
    "aarch64": {"Image": "kernel", "initrd.cpio-dirtyram.gz": "initrd", "dirtyram.aarch64": "workload"},
    "x86_64": {"bzImage": "kernel", "initrd.cpio-dirtyram.gz": "initrd", "dirtyram.x86_64": "workload"},
}


@pytest.fixture(scope="module", params=ARCHES)
def built(request, tmp_path_factory):
    """(arch, first build dir, its manifest): the first build may download, into the shared cache."""
    arch = request.param
    out = tmp_path_factory.mktemp(f"build-{arch}") / "out"
    return arch, out, build_artifacts(out, arch=arch)


def _sums(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir())
            if p.is_file() and p.name != "manifest.json"}


def test_locks_pin_the_same_kernel_abi_and_epoch_for_every_arch():
    armhf = load_lock(lock_path_for("armv7"))
    abi = re.search(r"linux-image-(\d+\.\d+\.\d+-\d+)-", armhf.package("kernel").name).group(1)
    for arch, (deb_arch, path) in ARCH_LOCKS.items():
        lock = load_lock(path)
        assert (lock.suite, lock.arch, lock.component) == ("bookworm", deb_arch, "main")
        assert lock.source_date_epoch == armhf.source_date_epoch
        k = lock.package("kernel")
        assert k.version == armhf.package("kernel").version
        assert re.fullmatch(ROLE_SPECS_BY_ARCH[deb_arch]["kernel"].package, k.name)
        assert k.name.startswith(f"linux-image-{abi}-")
        assert set(k.members) == set(ROLE_SPECS_BY_ARCH[deb_arch]["kernel"].members)
        assert lock.package("busybox").name == "busybox-static"


def test_build_writes_the_arch_files_and_manifest(built):
    arch, out, manifest = built
    spec = ARCH_BUILDS[arch]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["schema"] == "dirtylog-artifacts/1" and manifest["arch"] == arch
    assert {f["name"]: f["role"] for f in manifest["files"]} == EXPECTED_FILES[arch]
    assert {p.name for p in out.iterdir()} == set(EXPECTED_FILES[arch]) | {"manifest.json"}
    for f in manifest["files"]:
        assert sha256_file(out / f["name"]) == f["sha256"]
        assert (out / f["name"]).stat().st_size == f["size"]
    g = manifest["guest"]
    assert (g["machine"], g["console"], g["min_mem_mb"]) == (spec.machine, spec.console, spec.min_mem_mb)
    assert g["workload_path"] == "/root/dirtyram.arm"
    assert manifest["sources"]["lock"] == {"path": f"builder/locks/bookworm-{ARCH_LOCKS[arch][0]}.json",
                                           "suite": "bookworm", "arch": ARCH_LOCKS[arch][0]}
    assert manifest["tools"]["cross_compiler"].startswith(f"{spec.cross_prefix}gcc ")
    assert ("--arch" in manifest["reproducer"]) == (arch != "armv7")

    kernel = (out / spec.kernel).read_bytes()[:0x240]
    if arch == "armv7":
        assert int.from_bytes(kernel[0x24:0x28], "little") == 0x016F2818  # zImage magic
    elif arch == "aarch64":
        assert kernel[0x38:0x3C] == b"ARM\x64"  # arm64 Image header, not gzip-compressed
    else:
        assert kernel[0x202:0x206] == b"HdrS"  # x86 boot protocol header

    info = check_elf(out / spec.workload, arch)
    assert info.static
    members = {m.name: m for m in read_initrd(out / spec.initrd)}
    assert {"init", "bin/busybox", "root/dirtyram.arm", "bin/sh"} <= set(members)
    raw = gzip.decompress((out / spec.initrd).read_bytes())
    assert (out / spec.workload).read_bytes() in raw


def test_rebuild_is_byte_identical(built, tmp_path):
    arch, out, manifest = built
    again = tmp_path / "again"
    second = build_artifacts(again, arch=arch, offline=True)
    assert _sums(again) == _sums(out)
    assert {f["name"]: f["sha256"] for f in second["files"]} == {f["name"]: f["sha256"] for f in manifest["files"]}


@pytest.mark.build
def test_building_another_arch_into_the_same_dir_drops_the_old_files(tmp_path):
    out = tmp_path / "out"
    build_artifacts(out, arch="armv7", offline=True)
    (out / "notes.txt").write_text("mine")
    build_artifacts(out, arch="aarch64", offline=True)
    assert {p.name for p in out.iterdir()} == set(EXPECTED_FILES["aarch64"]) | {"manifest.json", "notes.txt"}


def test_unknown_arch_and_mismatched_lock_are_input_errors(tmp_path):
    with pytest.raises(BuildInputError, match="unknown architecture 'riscv64'"):
        build_artifacts(tmp_path / "a", arch="riscv64", offline=True)
    with pytest.raises(BuildInputError, match="pins Debian armhf packages; --arch x86_64 needs amd64"):
        build_artifacts(tmp_path / "b", arch="x86_64", offline=True, lock_path=lock_path_for("armv7"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


BOOT = {
    "aarch64": ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", "-smp", "2"],
    "x86_64": ["qemu-system-x86_64", "-M", "q35", "-smp", "2"],
}


@pytest.mark.build
@pytest.mark.parametrize("arch", sorted(BOOT))
def test_guest_boots_to_the_ready_marker_at_min_mem(arch, tmp_path):
    qemu = BOOT[arch][0]
    if shutil.which(qemu) is None:
        pytest.skip(f"{qemu} not installed")
    out = tmp_path / "out"
    manifest = build_artifacts(out, arch=arch, offline=True)
    spec, g = ARCH_BUILDS[arch], manifest["guest"]
    cmd = [*BOOT[arch], "-m", str(g["min_mem_mb"]), "-kernel", str(out / spec.kernel),
           "-initrd", str(out / spec.initrd), "-nographic", "-no-reboot",
           "-append", f"console={g['console']} panic=-1 dirtylog.workload=1024:64:10"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf, deadline, asked = b"", time.monotonic() + 240, False
    try:
        while time.monotonic() < deadline and b"SUM=42" not in buf:
            if select.select([proc.stdout], [], [], 1)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
            if b"DIRTYLOG-FAILED" in buf or b"Kernel panic" in buf:
                break
            if b"DIRTYLOG-READY n=1" in buf and not asked:
                proc.stdin.write(b"echo SUM=$((40+2))\n")
                proc.stdin.flush()
                asked = True
    finally:
        proc.kill()
        proc.wait()
    text = buf.decode(errors="replace")
    assert "DIRTYLOG-READY n=1" in text, text[-3000:]
    assert "SUM=42" in text, text[-3000:]
