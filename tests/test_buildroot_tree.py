"""buildroot-external/ (the BR2_EXTERNAL tree) and builder/buildroot.py (the Buildroot engine).

Fast and offline: the Kconfig files are parsed with kconfiglib against stubs of the Buildroot symbols
they use, the .mk files are checked against Buildroot's naming rules, and the post-image script runs
on a fake BINARIES_DIR whose manifest the verifier must accept. A real Buildroot build runs only when
DIRTYLOG_BUILDROOT_DIR and DIRTYLOG_BUILDROOT_DL_DIR are set (opt-in), on the host and (with a docker
engine) in the builder container. The pinned release download is exercised only on its failure paths
(a local HTTP server with a wrong tarball, an unreachable site, --offline without it): this project's
machines cannot reach Buildroot's site.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from builder import buildroot
from builder.build import ARCH_BUILDS
from builder.cpio import CpioWriter
from builder.errors import BuildInputError
from builder.initrd import DIRTYRAM_PATH
from verifier.artifacts import load_artifacts
from verifier.errors import InputError
from verifier.run.workload import SEED_WORKLOADS, check_fits

REPO = Path(__file__).resolve().parent.parent
EXT = REPO / "buildroot-external"
DEFCONFIGS = sorted((EXT / "configs").glob("*_defconfig"))
POST_IMAGE = EXT / "board" / "dirtylog" / "post-image.sh"
POST_BUILD = EXT / "board" / "dirtylog" / "post-build.sh"

# The Buildroot symbols our defconfigs (and the host-toolchain options) set, and those our Config.in
# files depend on. Their spelling was checked against Buildroot 2026.02.3
# (test_allowlist_is_spelled_as_in_buildroot does it again when DIRTYLOG_BUILDROOT_DIR is set).
ALLOWLIST_CHECKED_WITH = "2026.02.3"
BUILDROOT_SYMBOLS = {
    "BR2_arm", "BR2_aarch64", "BR2_cortex_a15", "BR2_cortex_a57", "BR2_ARM_EABIHF", "BR2_ARM_FPU_NEON_VFPV4",
    "BR2_GLOBAL_PATCH_DIR", "BR2_DOWNLOAD_FORCE_CHECK_HASHES", "BR2_REPRODUCIBLE",
    "BR2_KERNEL_HEADERS_AS_KERNEL", "BR2_PACKAGE_HOST_LINUX_HEADERS_CUSTOM_6_1",
    "BR2_INIT_NONE", "BR2_ROOTFS_POST_BUILD_SCRIPT", "BR2_ROOTFS_POST_IMAGE_SCRIPT",
    "BR2_ROOTFS_POST_IMAGE_SCRIPT_ARGS",
    "BR2_LINUX_KERNEL", "BR2_LINUX_KERNEL_CUSTOM_VERSION", "BR2_LINUX_KERNEL_CUSTOM_VERSION_VALUE",
    "BR2_LINUX_KERNEL_DEFCONFIG", "BR2_LINUX_KERNEL_USE_CUSTOM_CONFIG", "BR2_LINUX_KERNEL_CUSTOM_CONFIG_FILE",
    "BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES", "BR2_LINUX_KERNEL_ZIMAGE", "BR2_LINUX_KERNEL_IMAGE",
    "BR2_LINUX_KERNEL_DTS_SUPPORT", "BR2_LINUX_KERNEL_INTREE_DTS_NAME", "BR2_LINUX_KERNEL_NEEDS_HOST_OPENSSL",
    "BR2_PACKAGE_BUSYBOX", "BR2_PACKAGE_BUSYBOX_CONFIG_FRAGMENT_FILES",
    "BR2_TARGET_ROOTFS_CPIO", "BR2_TARGET_ROOTFS_CPIO_GZIP", "BR2_TARGET_ROOTFS_TAR",
    "BR2_USE_MMU",
    # builder/buildroot.py's HOST_TOOLCHAIN_OPTIONS
    "BR2_TOOLCHAIN_EXTERNAL", "BR2_TOOLCHAIN_EXTERNAL_CUSTOM", "BR2_TOOLCHAIN_EXTERNAL_PREINSTALLED",
    "BR2_TOOLCHAIN_EXTERNAL_PATH", "BR2_TOOLCHAIN_EXTERNAL_CUSTOM_PREFIX", "BR2_TOOLCHAIN_EXTERNAL_GCC_12",
    "BR2_TOOLCHAIN_EXTERNAL_HEADERS_6_1", "BR2_TOOLCHAIN_EXTERNAL_CUSTOM_GLIBC", "BR2_TOOLCHAIN_EXTERNAL_OPENMP",
    "BR2_TOOLCHAIN_EXTERNAL_CXX", "BR2_TOOLCHAIN_EXTERNAL_INET_RPC",
}

_SET = re.compile(r"^(BR2_\w+)=(.*)$")
_UNSET = re.compile(r"^# (BR2_\w+) is not set$")


def config_assignments(text: str) -> dict[str, str]:
    """Symbol -> value of a defconfig/.config text ("n" for `# X is not set`)."""
    values = {}
    for line in text.splitlines():
        if m := _SET.match(line):
            values[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            values[m.group(1)] = "n"
    return values


def expand_external(value: str) -> Path:
    return Path(value.strip('"').replace("$(BR2_EXTERNAL_DIRTYLOG_PATH)", str(EXT)))


def load_kconfig(tmp_path: Path, monkeypatch):
    """Our Config.in under a stub top-level Kconfig that defines the Buildroot symbols it depends on."""
    kconfiglib = pytest.importorskip("kconfiglib")
    monkeypatch.setenv("BR2_EXTERNAL_DIRTYLOG_PATH", str(EXT))
    monkeypatch.setenv("CONFIG_", "")  # as Buildroot runs kconfig: .config lines are BR2_X=..., no CONFIG_ prefix
    top = tmp_path / "Config.in"
    top.write_text('mainmenu "stub Buildroot"\n'
                   "config BR2_USE_MMU\n\tbool\n\tdefault y\n"
                   f'menu "External options"\nsource "{EXT}/Config.in"\nendmenu\n')
    return kconfiglib.Kconfig(str(top), warn_to_stderr=False)


# -- the tree's shape ------------------------------------------------------------------------------

def test_external_desc_names_the_tree_dirtylog():
    fields = dict(line.split(":", 1) for line in (EXT / "external.desc").read_text().splitlines() if ":" in line)
    assert fields["name"].strip() == "DIRTYLOG"
    assert fields.get("desc", "").strip()


def test_external_mk_includes_every_package_makefile():
    text = (EXT / "external.mk").read_text()
    assert "$(BR2_EXTERNAL_DIRTYLOG_PATH)/package/*/*.mk" in text
    assert (EXT / "package" / "dirtyram" / "dirtyram.mk").is_file()


def test_every_package_config_in_is_sourced_by_the_top_config_in():
    top = (EXT / "Config.in").read_text()
    for pkg in sorted(p.parent.name for p in (EXT / "package").glob("*/Config.in")):
        assert f'source "$BR2_EXTERNAL_DIRTYLOG_PATH/package/{pkg}/Config.in"' in top


def test_every_config_in_parses_and_defines_the_dirtyram_package(tmp_path, monkeypatch):
    kconfiglib = pytest.importorskip("kconfiglib")
    kconf = load_kconfig(tmp_path, monkeypatch)
    sym = kconf.syms["BR2_PACKAGE_DIRTYRAM"]
    assert sym.nodes, "BR2_PACKAGE_DIRTYRAM is not defined"
    assert sym.orig_type == kconfiglib.BOOL
    assert sym.nodes[0].prompt and sym.nodes[0].prompt[0] == "dirtyram"
    # Every symbol our files reference is defined by us, or by Buildroot (the allowlist).
    ours = {s.name for s in kconf.unique_defined_syms if "package/" in s.nodes[0].filename}
    undefined = {name for name, s in kconf.syms.items() if not s.nodes and name != "MODULES"}  # kconfiglib's own
    assert not undefined, f"referenced but defined nowhere: {sorted(undefined)}"
    stubbed = {s.name for s in kconf.unique_defined_syms} - ours
    assert stubbed <= BUILDROOT_SYMBOLS, f"depends on Buildroot symbols not in the allowlist: {stubbed - BUILDROOT_SYMBOLS}"
    assert ours == {"BR2_PACKAGE_DIRTYRAM"}


@pytest.mark.parametrize("defconfig", DEFCONFIGS, ids=lambda p: p.name)
def test_defconfig_sets_only_symbols_we_define_or_buildroot_knows(defconfig, tmp_path, monkeypatch):
    values = config_assignments(defconfig.read_text())
    unknown = set(values) - BUILDROOT_SYMBOLS - {"BR2_PACKAGE_DIRTYRAM"}
    assert not unknown, f"{defconfig.name} sets symbols neither ours nor in the Buildroot allowlist: {sorted(unknown)}"
    assert values["BR2_PACKAGE_DIRTYRAM"] == "y"
    # Our own symbol really ends up enabled (its dependencies hold) when the defconfig is loaded.
    kconf = load_kconfig(tmp_path, monkeypatch)
    ours = tmp_path / "ours_defconfig"
    ours.write_text("".join(f"{k}={v}\n" for k, v in values.items() if k == "BR2_PACKAGE_DIRTYRAM"))
    kconf.load_config(str(ours))
    assert kconf.syms["BR2_PACKAGE_DIRTYRAM"].str_value == "y"


def test_host_toolchain_options_are_buildroot_symbols():
    text = buildroot.HOST_TOOLCHAIN_OPTIONS.format(path="/tc", prefix="arm-linux-gnueabihf")
    assert set(config_assignments(text)) <= BUILDROOT_SYMBOLS


@pytest.mark.parametrize("defconfig", DEFCONFIGS, ids=lambda p: p.name)
def test_defconfig_files_it_names_exist_and_scripts_are_executable(defconfig):
    values = config_assignments(defconfig.read_text())
    for key in ("BR2_ROOTFS_POST_BUILD_SCRIPT", "BR2_ROOTFS_POST_IMAGE_SCRIPT"):
        path = expand_external(values[key])
        assert path.is_file() and os.access(path, os.X_OK), path
    for key in ("BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES", "BR2_PACKAGE_BUSYBOX_CONFIG_FRAGMENT_FILES"):
        for word in values[key].strip('"').split():
            assert expand_external(word).is_file(), word
    patch_dir = expand_external(values["BR2_GLOBAL_PATCH_DIR"])
    version = values["BR2_LINUX_KERNEL_CUSTOM_VERSION_VALUE"].strip('"')
    for pkg in ("linux", "linux-headers"):  # BR2_DOWNLOAD_FORCE_CHECK_HASHES: the kernel tarball is pinned
        assert f"linux-{version}.tar.xz" in (patch_dir / pkg / f"{pkg}.hash").read_text()


def test_vexpress_defconfig_is_the_2014_guest():
    values = config_assignments((EXT / "configs" / "dirtylog_vexpress_a15_defconfig").read_text())
    assert values["BR2_arm"] == values["BR2_cortex_a15"] == values["BR2_ARM_EABIHF"] == "y"
    assert values["BR2_REPRODUCIBLE"] == "y"
    assert values["BR2_LINUX_KERNEL_DEFCONFIG"] == '"vexpress"'
    assert values["BR2_LINUX_KERNEL_INTREE_DTS_NAME"] == '"vexpress-v2p-ca15-tc1"'
    assert values["BR2_TARGET_ROOTFS_CPIO"] == values["BR2_TARGET_ROOTFS_CPIO_GZIP"] == "y"
    assert values["BR2_ROOTFS_POST_IMAGE_SCRIPT_ARGS"] == '"armv7"'
    assert expand_external(values["BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES"]).name == "linux-vexpress.fragment"


def test_vexpress_kernel_fragment_gives_up_the_cma_reservation():
    fragment = config_assignments((EXT / "board" / "dirtylog" / "linux-vexpress.fragment").read_text()
                                  .replace("# CONFIG_", "# BR2_CONFIG_").replace("\nCONFIG_", "\nBR2_CONFIG_"))
    assert fragment["BR2_CONFIG_CMA"] == fragment["BR2_CONFIG_DMA_CMA"] == "n"
    assert fragment["BR2_CONFIG_BLK_DEV_INITRD"] == fragment["BR2_CONFIG_RD_GZIP"] == "y"


def test_aarch64_defconfig_targets_virt():
    values = config_assignments((EXT / "configs" / "dirtylog_aarch64_virt_defconfig").read_text())
    assert values["BR2_aarch64"] == "y"
    assert values["BR2_LINUX_KERNEL_IMAGE"] == "y"
    assert values["BR2_ROOTFS_POST_IMAGE_SCRIPT_ARGS"] == '"aarch64"'
    assert "BR2_LINUX_KERNEL_DTS_SUPPORT" not in values  # QEMU's virt makes the device tree


# -- package/dirtyram/dirtyram.mk ------------------------------------------------------------------

def _mk_variables(text: str) -> set[str]:
    names = set(re.findall(r"^([A-Za-z0-9_]+)\s*(?:[:+?]?=)", text, re.M))
    names |= set(re.findall(r"^define\s+([A-Za-z0-9_]+)", text, re.M))
    return names


def test_dirtyram_mk_follows_buildroot_naming():
    text = (EXT / "package" / "dirtyram" / "dirtyram.mk").read_text()
    variables = _mk_variables(text)
    assert variables and all(v.startswith("DIRTYRAM_") for v in variables), sorted(variables)
    assert {"DIRTYRAM_VERSION", "DIRTYRAM_SITE", "DIRTYRAM_SITE_METHOD",
            "DIRTYRAM_BUILD_CMDS", "DIRTYRAM_INSTALL_TARGET_CMDS"} <= variables
    assert [ln for ln in text.splitlines() if ln.strip()][-1] == "$(eval $(generic-package))"
    assert re.search(r"^DIRTYRAM_SITE = \$\(BR2_EXTERNAL_DIRTYLOG_PATH\)/\.\./dirtyram-src$", text, re.M)
    assert re.search(r"^DIRTYRAM_SITE_METHOD = local$", text, re.M)
    assert '$(MAKE) -C $(@D) CC="$(TARGET_CC)" O=$(@D)' in text
    assert (EXT / ".." / "dirtyram-src" / "Makefile").resolve().is_file()


def test_dirtyram_is_installed_where_the_shared_init_runs_it():
    text = (EXT / "package" / "dirtyram" / "dirtyram.mk").read_text()
    path = re.search(r"^DIRTYRAM_INSTALL_PATH = (\S+)$", text, re.M).group(1)
    assert path == "/" + DIRTYRAM_PATH == "/root/dirtyram.arm"
    assert "DIRTYRAM=${DIRTYRAM:-/root/dirtyram.arm}" in (REPO / "builder" / "guest" / "init").read_text()


# -- the guest's /init: one copy, installed by the post-build script ------------------------------

def test_the_tree_holds_no_copy_of_the_guest_init():
    init = (REPO / "builder" / "guest" / "init").read_bytes()
    copies = [p for p in EXT.rglob("*") if p.is_file() and p.read_bytes() == init]
    assert not copies
    assert not list(EXT.rglob("init"))


def test_post_build_installs_the_shared_init(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    subprocess.run(["sh", str(POST_BUILD), str(target), "armv7"], check=True, cwd=tmp_path)
    init = target / "init"
    assert init.read_bytes() == (REPO / "builder" / "guest" / "init").read_bytes()
    assert stat.S_IMODE(init.stat().st_mode) == 0o755


# -- board/dirtylog/post-image.sh on a fake BINARIES_DIR -------------------------------------------

def _fake_zimage() -> bytes:
    head = bytearray(0x200)
    struct.pack_into("<I", head, 0x24, 0x016F2818)
    return bytes(head) + b"not really compressed"


def _fake_arm64_image() -> bytes:
    head = bytearray(0x200)
    head[0x38:0x3C] = b"ARM\x64"
    return bytes(head)


def _dtb(tmp_path: Path) -> bytes:
    if shutil.which("dtc") is None:
        pytest.skip("dtc is not installed (Debian package device-tree-compiler)")
    dts = tmp_path / "tiny.dts"
    dts.write_text('/dts-v1/;\n/ {\n\tcompatible = "arm,vexpress,v2p-ca15,tc1", "arm,vexpress";\n'
                   "\t#address-cells = <1>;\n\t#size-cells = <1>;\n};\n")
    out = tmp_path / "tiny.dtb"
    subprocess.run(["dtc", "-I", "dts", "-O", "dtb", "-o", str(out), str(dts)], check=True, capture_output=True)
    return out.read_bytes()


def _initrd() -> bytes:
    raw = io.BytesIO()
    w = CpioWriter(raw, mtime=0)
    w.add_file("init", b"#!/bin/sh\n", 0o755)
    w.add_dir("root")
    w.add_file("root/dirtyram.arm", b"\x7fELF fake", 0o755)
    w.close()
    return gzip.compress(raw.getvalue(), mtime=0)


def run_post_image(tmp_path: Path, arch: str, *, with_kernel: bool = True) -> tuple[subprocess.CompletedProcess, Path]:
    """A fake Buildroot output directory, then the post-image script as Buildroot runs it."""
    base = tmp_path / "output"
    images, target, host = base / "images", base / "target", base / "host"
    images.mkdir(parents=True)
    (target / "root").mkdir(parents=True)
    (host / "bin").mkdir(parents=True)
    if arch == "armv7":
        kernel_name, kernel = "zImage", _fake_zimage()
        (images / "vexpress-v2p-ca15-tc1.dtb").write_bytes(_dtb(tmp_path))
        defconfig, kernel_version = "dirtylog_vexpress_a15_defconfig", "6.1.174"
    else:
        kernel_name, kernel = "Image", _fake_arm64_image()
        defconfig, kernel_version = "dirtylog_aarch64_virt_defconfig", "6.1.174"
    if with_kernel:
        (images / kernel_name).write_bytes(kernel)
    (images / "rootfs.cpio.gz").write_bytes(_initrd())
    (target / "root" / "dirtyram.arm").write_bytes(b"\x7fELF dirtyram")
    config = base / ".config"
    config.write_text(f'BR2_DEFCONFIG="{EXT}/configs/{defconfig}"\n'
                      f'BR2_LINUX_KERNEL_VERSION="{kernel_version}"\n'
                      "# BR2_TOOLCHAIN_EXTERNAL is not set\n")
    env = {"PATH": os.environ["PATH"], "BR2_CONFIG": str(config), "TARGET_DIR": str(target),
           "HOST_DIR": str(host), "BINARIES_DIR": str(images), "BASE_DIR": str(base),
           "BR2_VERSION": "2026.02.3", "SOURCE_DATE_EPOCH": "1781643700"}
    res = subprocess.run(["sh", str(POST_IMAGE), str(images), arch], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    return res, images / "dirtylog"


@pytest.mark.parametrize("arch", ["armv7", "aarch64"])
def test_post_image_manifest_is_accepted_by_the_verifier(tmp_path, arch):
    res, published = run_post_image(tmp_path, arch)
    assert res.returncode == 0, res.stderr
    art = load_artifacts(published)
    manifest = art.manifest
    spec = ARCH_BUILDS[arch]
    # The same names and roles as the Debian engine, so the verifier cannot tell the engines apart.
    assert {f["name"]: f["role"] for f in manifest["files"]} == spec.artifact_roles
    assert sorted(p.name for p in published.iterdir()) == sorted([*spec.artifact_roles, "manifest.json"])
    for f in manifest["files"]:
        assert f["size"] == (published / f["name"]).stat().st_size
    assert manifest["schema"] == "dirtylog-artifacts/1"
    assert manifest["engine"] == "buildroot"
    assert manifest["arch"] == art.arch == arch
    assert art.machine == spec.machine
    assert manifest["guest"]["workload_path"] == "/" + DIRTYRAM_PATH
    assert manifest["guest"]["workload_cmdline_key"] == "dirtylog.workload"
    assert manifest["sources"]["buildroot"]["version"] == "2026.02.3"
    assert manifest["sources"]["kernel"]["version"] == "6.1.174"
    assert manifest["sources"]["defconfig"] == buildroot.ARCH_DEFCONFIGS[arch]
    assert manifest["source_date_epoch"] == 1781643700
    assert "make" in manifest["reproducer"] and buildroot.ARCH_DEFCONFIGS[arch] in manifest["reproducer"]


def test_post_image_vexpress_guest_boots_in_32_mib(tmp_path):
    res, published = run_post_image(tmp_path, "armv7")
    assert res.returncode == 0, res.stderr
    art = load_artifacts(published)
    assert (art.machine, art.min_mem_mb) == ("vexpress-a15", 32)
    assert art.dtb is not None and art.dtb.name == "guest_a15x2.dtb"
    # ... and the verifier lets the 2014 workloads (4.2 MiB) run in it (`--mem 32`).
    check_fits(SEED_WORKLOADS, 32, art.reserved_mb)
    with pytest.raises(InputError, match="leaves only"):
        check_fits(SEED_WORKLOADS, 32)  # the Debian kernel's 40 MiB reserve would not


def test_post_image_fails_without_the_kernel_and_publishes_nothing(tmp_path):
    res, published = run_post_image(tmp_path, "armv7", with_kernel=False)
    assert res.returncode != 0
    assert "zImage is missing" in res.stderr
    assert not published.exists()


def test_post_image_rejects_an_unknown_architecture(tmp_path):
    res, _ = run_post_image(tmp_path, "armv7")
    images = tmp_path / "output" / "images"
    res = subprocess.run(["sh", str(POST_IMAGE), str(images), "mips"], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "BR2_CONFIG": str(tmp_path / "output" / ".config"),
                              "TARGET_DIR": str(tmp_path / "output" / "target")})
    assert res.returncode != 0 and "unknown architecture 'mips'" in res.stderr


# -- builder/buildroot.py --------------------------------------------------------------------------

def test_missing_downloads_names_every_absent_archive_and_skips_local_sources(tmp_path):
    (tmp_path / "busybox").mkdir()
    (tmp_path / "busybox" / "busybox-1.37.0.tar.bz2").write_bytes(b"x")
    info = {
        "busybox": {"dl_dir": "busybox", "downloads": [{"source": "busybox-1.37.0.tar.bz2", "uris": []}]},
        "linux": {"dl_dir": "linux", "downloads": [{"source": "linux-6.1.174.tar.xz", "uris": []}]},
        "linux-headers": {"dl_dir": "linux", "downloads": [{"source": "linux-6.1.174.tar.xz", "uris": []}]},
        "dirtyram": {"dl_dir": "dirtyram", "downloads": [{"source": "dirtyram-1.0.tar.gz",
                                                          "uris": ["local+/repo/dirtyram-src"]}]},
        "toolchain": {"virtual": True, "downloads": []},
    }
    assert buildroot.missing_downloads(info, tmp_path) == ["linux: linux/linux-6.1.174.tar.xz",
                                                           "linux-headers: linux/linux-6.1.174.tar.xz"]


def test_missing_downloads_skips_overridden_packages_and_files_a_file_site_holds(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "linux_6.1.176.orig.tar.xz").write_bytes(b"x")
    info = {
        "host-tar": {"dl_dir": "tar", "downloads": [{"source": "tar-1.35.cpio.gz", "uris": ["https+https://x/tar"]}]},
        "host-pkg-config": {"dl_dir": "pkgconf", "downloads": [{"source": "p.tar.xz", "uris": []}]},
        "linux": {"dl_dir": "linux", "downloads": [{"source": "linux_6.1.176.orig.tar.xz",
                                                    "uris": [f"file+file://{local}", "https+https://x/linux"]}]},
        "busybox": {"dl_dir": "busybox", "downloads": [{"source": "busybox-1.37.0.tar.bz2",
                                                        "uris": [f"file+file://{local}"]}]},
    }
    overridden = buildroot.overridden_packages(
        "DIRTYRAM_OVERRIDE_SRCDIR=/repo/dirtyram-src\nHOST_TAR_OVERRIDE_SRCDIR=/stubs/tar\n"
        "HOST_PKG_CONFIG_OVERRIDE_SRCDIR=/stubs/pkgconf\nHOST_M4_OVERRIDE_SRCDIR=\n")
    assert overridden == {"DIRTYRAM", "HOST_TAR", "HOST_PKG_CONFIG"}
    assert buildroot.missing_downloads(info, tmp_path, overridden) == ["busybox: busybox/busybox-1.37.0.tar.bz2"]


def test_br2_fragment_must_hold_only_buildroot_option_lines(tmp_path):
    good = tmp_path / "offline.config"
    good.write_text('# offline\nBR2_PACKAGE_OVERRIDE_FILE="/lab/local.mk"\n\nBR2_LINUX_KERNEL_CUSTOM_TARBALL=y\n')
    assert buildroot.read_fragment(good) == good.read_text()
    bad = tmp_path / "bad.config"
    bad.write_text("BR2_LINUX_KERNEL=y\nHOST_TAR_OVERRIDE_SRCDIR = /x\n")
    with pytest.raises(BuildInputError, match=r"bad.config:2: not a Buildroot option line"):
        buildroot.read_fragment(bad)
    with pytest.raises(BuildInputError, match="--br2-fragment .*missing"):
        buildroot.read_fragment(tmp_path / "missing")


def test_br2_fragment_is_checked_before_running_make(tmp_path):
    bad = tmp_path / "bad.config"
    bad.write_text("make me a sandwich\n")
    with pytest.raises(BuildInputError, match="not a Buildroot option line"):
        buildroot.build_with_buildroot(tmp_path / "out", buildroot_dir=_fake_buildroot(tmp_path),
                                       fragments=[bad], build_dir=tmp_path / "build")
    assert not (tmp_path / "build").exists()


def test_cli_br2_fragment_errors_are_one_line_exit_2(tmp_path):
    from conftest import run_dirtylog
    bad = tmp_path / "bad.config"
    bad.write_text("not an option\n")
    env = {**os.environ, "DIRTYLOG_CACHE": str(tmp_path / "cache")}
    res = run_dirtylog("build", "--br2-fragment", bad, "--out", tmp_path / "out", env=env)
    assert res.returncode == 2 and "--br2-fragment go with --engine buildroot" in res.stderr
    res = run_dirtylog("build", "--engine", "buildroot", "--buildroot-dir", _fake_buildroot(tmp_path),
                       "--br2-fragment", bad, "--out", tmp_path / "out", env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("dirtylog: error: --br2-fragment ")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def _fake_buildroot(tmp_path: Path, version: str = "2026.02.3") -> Path:
    br = tmp_path / "buildroot"
    br.mkdir()
    (br / "Makefile").write_text(f"export BR2_VERSION := {version}\n")
    (br / "Config.in").write_text("")
    return br


@pytest.mark.parametrize("kwargs, message", [
    ({"toolchain": "clang"}, "unknown toolchain"),
    ({"buildroot_dir": "/nonexistent"}, "not a Buildroot tree"),
    ({"buildroot_dir": "BR", "offline": True}, "needs --dl-dir"),
    ({"buildroot_dir": "BR", "defconfig": "nope_defconfig"}, "unknown defconfig"),
])
def test_build_with_buildroot_rejects_bad_input_before_running_make(tmp_path, kwargs, message):
    if kwargs.get("buildroot_dir") == "BR":
        kwargs["buildroot_dir"] = _fake_buildroot(tmp_path)
    with pytest.raises(BuildInputError, match=message):
        buildroot.build_with_buildroot(tmp_path / "out", build_dir=tmp_path / "build", **kwargs)


def test_buildroot_version_is_read_from_the_tree(tmp_path):
    assert buildroot.buildroot_version(_fake_buildroot(tmp_path, "2026.02.1")) == "2026.02.1"


def test_reproducer_names_the_engine_and_its_inputs(tmp_path):
    cmd = buildroot.reproducer(tmp_path / "out", "dirtylog_aarch64_virt_defconfig", toolchain="host",
                               buildroot_dir=Path("/br"), dl_dir=Path("/dl"))
    assert cmd.startswith("dirtylog build --engine buildroot --runtime host --arch aarch64 --buildroot-dir /br "
                          "--dl-dir /dl --offline")
    assert "--toolchain host" in cmd
    cmd = buildroot.reproducer(tmp_path / "out", "dirtylog_vexpress_a15_defconfig", toolchain="host",
                               buildroot_dir=Path("/br"), dl_dir=Path("/dl"), fragments=[Path("/lab/offline.config")],
                               runtime="docker")
    assert "--runtime docker" in cmd and "--br2-fragment /lab/offline.config --out" in cmd
    # The pinned release: no tree named; another release site is.
    cmd = buildroot.reproducer(tmp_path / "out", "dirtylog_vexpress_a15_defconfig", toolchain="buildroot",
                               buildroot_dir=None, dl_dir=None, buildroot_url=buildroot.buildroot_tarball_url())
    assert "--buildroot-dir" not in cmd and "--buildroot-url" not in cmd
    cmd = buildroot.reproducer(tmp_path / "out", "dirtylog_vexpress_a15_defconfig", toolchain="buildroot",
                               buildroot_dir=None, dl_dir=None,
                               buildroot_url="http://lab/br/" + buildroot.BUILDROOT_TARBALL)
    assert "--buildroot-url http://lab/br/ " in cmd


# -- the pinned Buildroot release (no network to Buildroot's site here: only the failure paths and
#    the reuse of an already unpacked tree are exercised; a successful download is not) ------------

def _serve(directory: Path):
    """A real HTTP server (python -m http.server) on a free local port; returns (process, base URL)."""
    import socket
    import sys
    import time
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/"


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again: connections to it are refused


def test_pinned_release_is_the_2026_02_3_lts_tarball():
    assert buildroot.BUILDROOT_TARBALL == "buildroot-2026.02.3.tar.xz"
    assert buildroot.BUILDROOT_SHA256 == "5a59e7501b0b4ec52c41f4bfa79412320e0b37eae5f719605a258e8d0c6fc7fb"
    assert buildroot.buildroot_tarball_url() == "https://buildroot.org/downloads/buildroot-2026.02.3.tar.xz"
    assert buildroot.buildroot_tarball_url("http://lab/br") == "http://lab/br/buildroot-2026.02.3.tar.xz"
    with pytest.raises(BuildInputError, match="http:// or https://"):
        buildroot.buildroot_tarball_url("ftp://lab/br/")


def test_served_tarball_with_another_sha256_is_refused_and_nothing_is_kept(tmp_path):
    from builder.errors import IntegrityError
    site = tmp_path / "site"
    site.mkdir()
    (site / buildroot.BUILDROOT_TARBALL).write_bytes(b"not the Buildroot release\n" * 1000)
    proc, url = _serve(site)
    try:
        with pytest.raises(IntegrityError, match="sha256 mismatch"):
            buildroot.fetch_buildroot(tmp_path / "cache", url)
    finally:
        proc.terminate()
        proc.wait()
    assert not list((tmp_path / "cache" / "sha256").iterdir())  # no partial file, nothing cached
    assert not (tmp_path / "cache" / "buildroot").exists()  # nothing unpacked


def test_cli_served_tarball_with_another_sha256_is_one_line_exit_3(tmp_path):
    from conftest import run_dirtylog
    site = tmp_path / "site"
    site.mkdir()
    (site / buildroot.BUILDROOT_TARBALL).write_bytes(b"\xfd7zXZ\0 truncated")
    proc, url = _serve(site)
    try:
        res = run_dirtylog("build", "--engine", "buildroot", "--runtime", "host", "--buildroot-url", url,
                           "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", timeout=120)
    finally:
        proc.terminate()
        proc.wait()
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("dirtylog: error: ") and "sha256 mismatch" in last and buildroot.BUILDROOT_SHA256 in last
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "buildroot").exists()


def test_cli_unreachable_release_site_is_exit_3_in_bounded_time(tmp_path):
    import time
    from conftest import run_dirtylog
    url = f"http://127.0.0.1:{_free_port()}/downloads/"
    t0 = time.monotonic()
    res = run_dirtylog("build", "--engine", "buildroot", "--runtime", "host", "--buildroot-url", url,
                       "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", timeout=120)
    assert time.monotonic() - t0 < 60
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert url + buildroot.BUILDROOT_TARBALL in last and "--buildroot-dir" in last
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "buildroot").exists()


def test_cli_offline_without_the_cached_tarball_names_it_exit_3(tmp_path):
    from conftest import run_dirtylog
    dl = tmp_path / "dl"
    dl.mkdir()
    res = run_dirtylog("build", "--engine", "buildroot", "--runtime", "host", "--offline", "--dl-dir", dl,
                       "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", timeout=120)
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert buildroot.BUILDROOT_TARBALL in last and buildroot.BUILDROOT_SHA256 in last and "--offline" in last
    assert not (tmp_path / "out").exists()


def test_cli_buildroot_url_goes_with_the_buildroot_engine_only(tmp_path):
    from conftest import run_dirtylog
    res = run_dirtylog("build", "--buildroot-url", "http://lab/", "--out", tmp_path / "out")
    assert res.returncode == 2 and "go with --engine buildroot" in res.stderr
    res = run_dirtylog("build", "--engine", "buildroot", "--runtime", "host", "--buildroot-url", "http://lab/",
                       "--buildroot-dir", _fake_buildroot(tmp_path), "--out", tmp_path / "out")
    assert res.returncode == 2 and "exclude each other" in res.stderr


def test_an_unpacked_pinned_release_in_the_cache_is_reused_without_network(tmp_path):
    # What a first successful download leaves: <cache>/buildroot/<version>-<sha256[:16]>/buildroot-<version>/.
    tree = (tmp_path / "cache" / "buildroot" / f"{buildroot.BUILDROOT_VERSION}-{buildroot.BUILDROOT_SHA256[:16]}"
            / f"buildroot-{buildroot.BUILDROOT_VERSION}")
    tree.mkdir(parents=True)
    (tree / "Makefile").write_text(f"export BR2_VERSION := {buildroot.BUILDROOT_VERSION}\n")
    got, record = buildroot.fetch_buildroot(tmp_path / "cache", f"http://127.0.0.1:{_free_port()}/", offline=True)
    assert got == tree
    assert record["version"] == buildroot.BUILDROOT_VERSION and record["sha256"] == buildroot.BUILDROOT_SHA256
    assert record["url"].endswith("/" + buildroot.BUILDROOT_TARBALL)


# -- what a container build mounts -------------------------------------------------------------------

def test_container_mounts_cover_every_local_path_a_lab_fragment_names(tmp_path):
    lab = tmp_path / "lab"
    for d in ("stubs/tar", "stubs/bison", "patches/linux"):
        (lab / d).mkdir(parents=True)
    (lab / "linux.tar.xz").write_bytes(b"")
    (lab / "local.mk").write_text(f"HOST_TAR_OVERRIDE_SRCDIR = {lab}/stubs/tar\n"
                                  f"HOST_BISON_OVERRIDE_SRCDIR = {lab}/stubs/bison\n"
                                  "override HOST_TAR_DEPENDENCIES =\n# HOST_X_OVERRIDE_SRCDIR = /nowhere\n")
    frag = lab / "offline.config"
    frag.write_text(f'BR2_PACKAGE_OVERRIDE_FILE="{lab}/local.mk"\n'
                    f'BR2_GLOBAL_PATCH_DIR="$(BR2_EXTERNAL_DIRTYLOG_PATH)/board/dirtylog/patches {lab}/patches"\n'
                    f'BR2_LINUX_KERNEL_CUSTOM_TARBALL_LOCATION="file://{lab}/linux.tar.xz"\n'
                    'BR2_TARGET_GENERIC_HOSTNAME="/usr/bin"\n')
    br, dl = _fake_buildroot(tmp_path), tmp_path / "dl"
    dl.mkdir()
    mounts = buildroot.container_mounts(br, dl, [frag])
    assert mounts == {str(br): "ro", str(dl): "rw", str(frag): "ro", str(lab / "local.mk"): "ro",
                      str(lab / "patches"): "ro", str(lab / "linux.tar.xz"): "ro",
                      str(lab / "stubs" / "tar"): "ro", str(lab / "stubs" / "bison"): "ro"}
    # A download directory inside a read-only tree stays writable; paths inside a mount are not repeated.
    (br / "dl").mkdir()
    assert buildroot.container_mounts(br, br / "dl", []) == {str(br): "ro", str(br / "dl"): "rw"}
    assert buildroot.container_mounts(tmp_path, None, [frag]) == {str(tmp_path): "ro"}


# What Buildroot's support/dependencies/dependencies.sh looks for, and what the offline lab's host-tool
# stand-ins (README) exec.
BUILDROOT_HOST_PROGRAMS = ("which sed make ld gcc g++ bash patch gzip bzip2 perl tar cpio unzip rsync file bc find "
                           "xargs cmp awk wget python3 bison flex m4 kmod patchelf fakeroot pkgconf")
BUILDROOT_PERL_MODULES = ("Data::Dumper", "English", "ExtUtils::MakeMaker", "Thread::Queue", "FindBin", "IPC::Cmd")


def test_builder_image_has_what_buildroot_checks_for():
    from builder.runtime import DockerRuntime
    rt = DockerRuntime()
    if not rt.available():
        pytest.skip("no docker engine answers")
    tag, _ = rt.ensure_image()
    script = (f"for p in {BUILDROOT_HOST_PROGRAMS}; do command -v $p >/dev/null || echo MISSING $p; done; "
              "perl " + " ".join(f"-M{m}" for m in BUILDROOT_PERL_MODULES) + " -e 1 || echo MISSING perl modules")
    output = rt.client.containers.run(tag, ["sh", "-c", script], entrypoint=[], remove=True).decode()
    assert "MISSING" not in output, output


def test_container_mounts_refuse_a_tree_the_container_cannot_see_at_its_path(tmp_path):
    with pytest.raises(BuildInputError, match="--buildroot-dir /usr/share"):
        buildroot.container_mounts(Path("/usr/share"), None, [])
    bad = tmp_path / "bad.config"
    bad.write_text("nope\n")
    with pytest.raises(BuildInputError, match="not a Buildroot option line"):
        buildroot.container_mounts(_fake_buildroot(tmp_path), None, [bad])


def test_host_toolchain_prefix_follows_the_defconfig_architecture():
    for path, prefix in [(EXT / "configs" / "dirtylog_vexpress_a15_defconfig", "arm-linux-gnueabihf"),
                         (EXT / "configs" / "dirtylog_aarch64_virt_defconfig", "aarch64-linux-gnu")]:
        assert buildroot.host_toolchain_prefix(path.read_text()) == prefix


@pytest.mark.skipif(not Path("/usr/bin/arm-linux-gnueabihf-gcc").exists() or
                    not Path("/usr/arm-linux-gnueabihf/lib/libc.a").exists(),
                    reason="Debian's armhf cross-compiler (gcc-arm-linux-gnueabihf) is not installed")
@pytest.mark.cross
def test_host_toolchain_wrapper_passes_buildroots_checks_and_compiles_dirtyram(tmp_path):
    tc = buildroot.make_host_toolchain(tmp_path / "tc", "arm-linux-gnueabihf")
    gcc = tc / "bin" / "arm-linux-gnueabihf-gcc"
    sysroot = tc / "sysroot"
    assert not (tc / "bin" / "arm-linux-gnueabihf-g++").exists()
    # No gcc-12 & co.: Buildroot would wrap them as compilers that bypass our sysroot.
    assert not list((tc / "bin").glob("*-1[0-9]")) and (tc / "bin" / "arm-linux-gnueabihf-gcc-ar").exists()
    # Buildroot's check_unusable_toolchain: no --with-sysroot=/, libc.a found in a sysroot layout.
    verbose = subprocess.run([str(gcc), "-v"], capture_output=True, text=True, check=True).stderr
    assert "--with-sysroot=/ " not in verbose and f"--with-sysroot={sysroot} " in verbose
    libc_a = subprocess.run([str(gcc), "-print-file-name=libc.a"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert Path(libc_a) == sysroot / "lib" / "libc.a" and Path(libc_a).is_file()
    assert (sysroot / "usr" / "include" / "linux" / "version.h").is_file()
    assert b"/usr/arm-linux-gnueabihf/" not in (sysroot / "lib" / "libc.so").read_bytes()
    # dirtyram-src builds with it the way dirtyram.mk builds it.
    subprocess.run(["make", "-s", "-C", str(REPO / "dirtyram-src"), f"CC={gcc}", f"O={tmp_path}"], check=True)
    head = (tmp_path / "dirtyram").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and struct.unpack_from("<H", head, 18)[0] == 40  # EM_ARM


# -- against a real Buildroot tree (opt-in) --------------------------------------------------------

BUILDROOT_DIR = os.environ.get("DIRTYLOG_BUILDROOT_DIR")
BUILDROOT_DL_DIR = os.environ.get("DIRTYLOG_BUILDROOT_DL_DIR")


@pytest.mark.skipif(not BUILDROOT_DIR, reason="opt-in: set DIRTYLOG_BUILDROOT_DIR to a Buildroot tree")
def test_allowlist_is_spelled_as_in_buildroot():
    defined = set()
    for path in Path(BUILDROOT_DIR).rglob("Config.in*"):
        defined |= set(re.findall(r"^\s*(?:menu)?config\s+(BR2_\w+)", path.read_text(errors="replace"), re.M))
    assert BUILDROOT_SYMBOLS <= defined, sorted(BUILDROOT_SYMBOLS - defined)


@pytest.mark.skipif(not (BUILDROOT_DIR and BUILDROOT_DL_DIR),
                    reason="opt-in full Buildroot build: set DIRTYLOG_BUILDROOT_DIR and DIRTYLOG_BUILDROOT_DL_DIR "
                           "(a pre-populated download directory); takes 20+ minutes")
def test_full_buildroot_build_gives_artifacts_the_verifier_accepts(tmp_path):
    # Optional: DIRTYLOG_BUILDROOT_TOOLCHAIN=host (Debian's cross-gcc), DIRTYLOG_BUILDROOT_FRAGMENTS=F1:F2
    # (--br2-fragment files, e.g. a lab's offline workarounds).
    toolchain = os.environ.get("DIRTYLOG_BUILDROOT_TOOLCHAIN", "buildroot")
    fragments = [Path(f) for f in os.environ.get("DIRTYLOG_BUILDROOT_FRAGMENTS", "").split(os.pathsep) if f]
    manifest = buildroot.build_with_buildroot(tmp_path / "out", buildroot_dir=Path(BUILDROOT_DIR),
                                              dl_dir=Path(BUILDROOT_DL_DIR), offline=True, toolchain=toolchain,
                                              fragments=fragments, build_dir=tmp_path / "build")
    art = load_artifacts(tmp_path / "out")
    assert manifest["engine"] == "buildroot" and art.machine == "vexpress-a15" and art.min_mem_mb == 32
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["reproducer"].startswith(
        "dirtylog build --engine buildroot")
    _FULL_BUILD_HASHES["host"] = {f["name"]: f["sha256"] for f in manifest["files"]}


_FULL_BUILD_HASHES: dict[str, dict] = {}


@pytest.mark.skipif(not (BUILDROOT_DIR and BUILDROOT_DL_DIR),
                    reason="opt-in full Buildroot build in the builder container: set DIRTYLOG_BUILDROOT_DIR and "
                           "DIRTYLOG_BUILDROOT_DL_DIR (and have a docker engine); takes 10+ minutes")
def test_full_buildroot_build_in_the_docker_container(tmp_path):
    # Same inputs as the host test above; when both ran in this session, the artifacts must be identical.
    from builder.runtime import DockerRuntime
    rt = DockerRuntime()
    if not rt.available():
        pytest.skip("no docker engine answers")
    toolchain = os.environ.get("DIRTYLOG_BUILDROOT_TOOLCHAIN", "buildroot")
    fragments = [Path(f) for f in os.environ.get("DIRTYLOG_BUILDROOT_FRAGMENTS", "").split(os.pathsep) if f]
    manifest = rt.build_buildroot(tmp_path / "out", buildroot.DEFAULT_DEFCONFIG, buildroot_dir=Path(BUILDROOT_DIR),
                                  dl_dir=Path(BUILDROOT_DL_DIR), offline=True, toolchain=toolchain,
                                  fragments=fragments, cache_dir=tmp_path / "cache")
    art = load_artifacts(tmp_path / "out")
    assert art.machine == "vexpress-a15" and art.min_mem_mb == 32
    assert manifest["runtime"] == "docker" and manifest["image_id"].startswith("sha256:")
    assert manifest["sources"]["buildroot"]["tree"] == str(Path(BUILDROOT_DIR).resolve())
    assert manifest["reproducer"].startswith("dirtylog build --engine buildroot --runtime docker")
    if "host" in _FULL_BUILD_HASHES:
        assert {f["name"]: f["sha256"] for f in manifest["files"]} == _FULL_BUILD_HASHES["host"]
