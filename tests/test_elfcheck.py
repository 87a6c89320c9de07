"""builder.elfcheck on real binaries from real compilers; builder.dirtyram's build."""

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.dirtyram import build_dirtyram, compiler_version
from builder.elfcheck import check_armv7_static_hardfloat, check_elf, check_elf_bytes
from builder.errors import BuildError, BuildInputError, ToolMissingError

pytestmark = pytest.mark.cross  # every test but two compiles with a cross-compiler

REPO = Path(__file__).resolve().parent.parent
HELLO = "int main(void) { return 0; }\n"


def _cc(tmp_path_factory, compiler, *flags, name=None, source=HELLO):
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} not installed")
    d = tmp_path_factory.mktemp("elf")
    (d / "t.c").write_text(source)
    out = d / (name or "a.out")
    subprocess.run([compiler, "-O2", *flags, "-o", str(out), str(d / "t.c")], check=True)
    return out


@pytest.fixture(scope="module")
def armhf_static(tmp_path_factory):
    return _cc(tmp_path_factory, "arm-linux-gnueabihf-gcc", "-static", "-s", name="dirtyram.arm")


def test_armhf_static_accepted(armhf_static):
    info = check_armv7_static_hardfloat(armhf_static)
    assert (info.machine, info.elf_class, info.endian) == ("EM_ARM", 32, "little")
    assert info.eabi_version == 5 and info.float_abi == "hard"
    assert info.e_flags & 0xFF000000 == 0x05000000 and info.e_flags & 0x400
    assert info.static and not info.pie and info.elf_type == "ET_EXEC"
    assert info.to_dict()["arch"] == "armv7"


def test_armhf_dynamic_rejected(tmp_path_factory):
    f = _cc(tmp_path_factory, "arm-linux-gnueabihf-gcc")
    with pytest.raises(BuildInputError, match=r"dynamically linked \(interpreter /lib/ld-linux-armhf\.so\.3\); "
                                              r"expected a static binary"):
        check_elf(f)


def test_x86_64_rejected_for_armv7_accepted_as_x86_64(tmp_path_factory):
    f = _cc(tmp_path_factory, "gcc", "-static", name="dirtyram.arm")
    with pytest.raises(BuildInputError, match=r"dirtyram\.arm: built for x86-64, expected 32-bit ARM \(armv7\)$"):
        check_elf(f)
    assert check_elf(f, arch="x86_64").machine == "EM_X86_64"


def test_static_pie_accepted_shared_library_rejected(tmp_path_factory):
    # armhf glibc in Debian 12 has no static-pie support (no rcrt1.o); x86-64 does.
    f = _cc(tmp_path_factory, "gcc", "-static-pie")
    info = check_elf(f, arch="x86_64")
    assert info.static and info.pie and info.elf_type == "ET_DYN"
    lib = _cc(tmp_path_factory, "gcc", "-shared", "-fPIC", name="lib.so",
              source='#include <stdio.h>\nvoid f(void) { puts("x"); }\n')
    with pytest.raises(BuildInputError, match=r"needs shared libraries \(libc\.so\.6\)"):
        check_elf(lib, arch="x86_64")


def test_armel_soft_float_rejected(tmp_path_factory):
    f = _cc(tmp_path_factory, "arm-linux-gnueabi-gcc", "-static")
    with pytest.raises(BuildInputError, match="soft-float ABI; expected hard-float"):
        check_elf(f)


def test_aarch64(tmp_path_factory):
    f = _cc(tmp_path_factory, "aarch64-linux-gnu-gcc", "-static")
    with pytest.raises(BuildInputError, match=r"built for 64-bit ARM \(aarch64\), expected 32-bit ARM"):
        check_elf(f)
    info = check_elf(f, arch="aarch64")
    assert (info.machine, info.elf_class, info.float_abi) == ("EM_AARCH64", 64, None)


def test_object_file_rejected(tmp_path_factory):
    f = _cc(tmp_path_factory, "arm-linux-gnueabihf-gcc", "-c", name="t.o")
    with pytest.raises(BuildInputError, match=r"relocatable object"):
        check_elf(f)


def test_not_elf(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "script").write_text("#!/bin/sh\n")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(BuildInputError, match=r"notes\.txt: not an ELF file"):
        check_elf(tmp_path / "notes.txt")
    with pytest.raises(BuildInputError, match="a script"):
        check_elf(tmp_path / "script")
    with pytest.raises(BuildInputError, match="an empty file"):
        check_elf(tmp_path / "empty")
    with pytest.raises(BuildInputError, match="cannot read"):
        check_elf(tmp_path / "missing")
    with pytest.raises(BuildInputError, match="unknown architecture"):
        check_elf_bytes(b"\x7fELF", "x", arch="mips")


@pytest.mark.parametrize("cut", [4, 10, 40, 52, 200, 2000, -100, -1])
def test_truncated_elf_rejected(armhf_static, cut):
    data = armhf_static.read_bytes()
    with pytest.raises(BuildInputError, match="truncated"):
        check_elf_bytes(data[:cut], "trunc")


# --- builder.dirtyram -------------------------------------------------------------

SRC = REPO / "dirtyram-src"


def test_dirtyram_builds_reproducibly(tmp_path, monkeypatch):
    monkeypatch.delenv("CFLAGS", raising=False)
    a = build_dirtyram(SRC, tmp_path / "a")
    monkeypatch.setenv("CFLAGS", "-O0")  # the user's environment must not leak into the build
    b = build_dirtyram(SRC, tmp_path / "b", jobs=2)
    assert a == tmp_path / "a" / "dirtyram"
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert a.stat().st_mode & 0o777 == 0o755
    assert check_armv7_static_hardfloat(a).static
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dirtyram"]


def test_dirtyram_compile_failure_reports_compiler_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "Makefile").write_text("$(O)/dirtyram: bad.c\n\t$(CC) -static -o $@ bad.c\n")
    (src / "bad.c").write_text("int main(void) { return undefined_thing; }\n")
    with pytest.raises(BuildError, match="(?s)failed.*undefined_thing") as e:
        build_dirtyram(src, tmp_path / "out")
    assert not isinstance(e.value, BuildInputError)
    assert not (tmp_path / "out" / "dirtyram").exists()


def test_dirtyram_wrong_arch_result_rejected(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "Makefile").write_text("$(O)/dirtyram: t.c\n\t$(CC) -o $@ t.c\n")  # dynamic
    (src / "t.c").write_text(HELLO)
    with pytest.raises(BuildInputError, match="dynamically linked"):
        build_dirtyram(src, tmp_path / "out")
    assert not (tmp_path / "out" / "dirtyram").exists()


def test_missing_compiler_is_tool_missing(tmp_path):
    with pytest.raises(ToolMissingError, match=r"nonexistent-arch-linux-gnu-gcc not found; install it with: apt-get install gcc-nonexistent-arch-linux-gnu$"):
        build_dirtyram(SRC, tmp_path, cross_prefix="nonexistent-arch-linux-gnu-")
    with pytest.raises(ToolMissingError):
        compiler_version("nonexistent-prefix-")


def test_compiler_version():
    v = compiler_version("arm-linux-gnueabihf-")
    assert v.startswith("arm-linux-gnueabihf-gcc") and "\n" not in v
