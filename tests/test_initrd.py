"""builder.initrd: the archive the guest boots from, checked with the real GNU cpio."""

import gzip
import hashlib
import lzma
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from builder.errors import BuildInputError
from builder.initrd import DEFAULT_APPLETS, DIRS, build_initrd, build_initrd_bytes, busybox_applets, read_initrd

REPO = Path(__file__).resolve().parent.parent
MTIME = 1_700_000_000
INIT = b"#!/bin/sh\necho hello from init\n"


def _static(tmp_path_factory, compiler):
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} not installed")
    d = tmp_path_factory.mktemp("bin")
    (d / "t.c").write_text("int main(void) { return 0; }\n")
    subprocess.run([compiler, "-O2", "-static", "-s", "-o", str(d / "a"), str(d / "t.c")], check=True)
    return (d / "a").read_bytes()


@pytest.fixture(scope="module")
def armhf(tmp_path_factory):
    """A static armhf executable standing in for busybox and dirtyram (no applet table)."""
    return _static(tmp_path_factory, "arm-linux-gnueabihf-gcc")


def _fake_busybox(armhf: bytes, applets) -> bytes:
    # busybox's applet name table: sorted, NUL-separated, starting "[", "[[", ending in "\0\0".
    return armhf + b"\0" + b"\0".join(a.encode() for a in sorted(["[", "[[", *applets])) + b"\0\0"


def _tv(data: bytes) -> dict[str, list[str]]:
    p = subprocess.run(["cpio", "-tvn", "--quiet"], input=data, capture_output=True, check=True,
                       env={"PATH": os.environ["PATH"], "LC_ALL": "C", "TZ": "UTC"})
    out = {}
    for line in p.stdout.decode().splitlines():
        f = line.split()
        name = f[f.index("->") - 1] if "->" in f else f[-1]
        out[name] = f
    return out


def test_layout_with_real_cpio(tmp_path, armhf):
    out = tmp_path / "initrd.cpio-dirtyram.gz"
    init = (REPO / "builder/guest/init").read_bytes() if (REPO / "builder/guest/init").exists() else INIT
    sha = build_initrd(out, armhf, armhf + b"dirtyram", init, MTIME)
    raw = out.read_bytes()
    assert sha == hashlib.sha256(raw).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    tv = _tv(gzip.decompress(raw))
    for d in DIRS:
        assert tv[d][0].startswith("d"), d
    assert tv["tmp"][0] == "drwxrwxrwt"
    assert tv["bin/busybox"][0] == "-rwxr-xr-x" and int(tv["bin/busybox"][4]) == len(armhf)
    assert tv["init"][0] == "-rwxr-xr-x" and int(tv["init"][4]) == len(init)
    assert tv["root/dirtyram.arm"][0] == "-rwxr-xr-x"
    assert tv["dev/console"][0] == "crw-------" and tv["dev/console"][4:6] == ["5,", "1"]
    for a in DEFAULT_APPLETS:  # no applet table in the stand-in: all defaults linked
        assert tv[f"bin/{a}"][0] == "lrwxrwxrwx" and tv[f"bin/{a}"][-1] == "busybox"
    assert {"sh", "mount", "cttyhack", "setsid", "grep", "tee", "tr"} <= set(DEFAULT_APPLETS)
    assert list(tv) == sorted(tv, key=lambda n: n.split("/"))


def test_extracted_tree_runs_init_with_busybox_symlinks(tmp_path, armhf):
    raw = build_initrd_bytes(armhf, armhf, INIT, MTIME)
    subprocess.run(["cpio", "-idm", "--no-absolute-filenames", "--quiet"], input=raw, cwd=tmp_path, check=True)
    assert (tmp_path / "bin/busybox").read_bytes() == armhf
    assert os.readlink(tmp_path / "bin/sh") == "busybox"
    assert (tmp_path / "bin/sh").resolve() == (tmp_path / "bin/busybox").resolve()
    assert (tmp_path / "init").read_bytes() == INIT
    assert (tmp_path / "init").stat().st_mtime == MTIME
    assert stat.S_IMODE((tmp_path / "root/dirtyram.arm").stat().st_mode) == 0o755


def test_reproducible_and_mtime_sensitive(tmp_path, armhf):
    a = build_initrd(tmp_path / "a.gz", armhf, armhf, INIT, MTIME)
    b = build_initrd(tmp_path / "b.gz", armhf, armhf, INIT, MTIME)
    c = build_initrd(tmp_path / "c.gz", armhf, armhf, INIT, MTIME + 1)
    assert a == b != c
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    build_initrd(tmp_path / "a.gz", armhf, armhf, INIT, MTIME + 1)  # overwrite in place
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "c.gz").read_bytes()


def test_wrong_binaries_rejected(tmp_path, tmp_path_factory, armhf):
    x86 = _static(tmp_path_factory, "gcc")
    with pytest.raises(BuildInputError, match=r"^busybox: built for x86-64, expected 32-bit ARM"):
        build_initrd(tmp_path / "i.gz", x86, armhf, INIT, MTIME)
    with pytest.raises(BuildInputError, match=r"^dirtyram: built for x86-64"):
        build_initrd(tmp_path / "i.gz", armhf, x86, INIT, MTIME)
    with pytest.raises(BuildInputError, match="/init script is empty"):
        build_initrd(tmp_path / "i.gz", armhf, armhf, b"", MTIME)
    with pytest.raises(BuildInputError, match="run by /bin/sh"):
        build_initrd(tmp_path / "i.gz", armhf, armhf, INIT, MTIME, applets=["cat"])
    with pytest.raises(BuildInputError, match="applet name"):
        build_initrd(tmp_path / "i.gz", armhf, armhf, INIT, MTIME, applets=["sh", "../x"])
    assert list(tmp_path.iterdir()) == []


def test_applets_follow_busybox_table(armhf, tmp_path):
    bb = _fake_busybox(armhf, ["sh", "mount", "cat", "echo"])
    assert busybox_applets(bb) == {"[", "[[", "sh", "mount", "cat", "echo"}
    assert busybox_applets(armhf) is None
    names = {m.name for m in _members(build_initrd_bytes(bb, armhf, INIT, MTIME), tmp_path)}
    assert {n for n in names if n.startswith("bin/")} == {"bin/busybox", "bin/[", "bin/cat", "bin/echo",
                                                          "bin/mount", "bin/sh"}
    assert "bin/cttyhack" not in names  # so `command -v cttyhack` in /init tells the truth
    with pytest.raises(BuildInputError, match="busybox has no applet.s. cttyhack"):
        build_initrd_bytes(bb, armhf, INIT, MTIME, applets=["sh", "cttyhack"])


def _members(raw: bytes, tmp_path: Path):
    p = tmp_path / "x.cpio"
    p.write_bytes(raw)
    return read_initrd(p)


def test_read_initrd_gzip_plain_concatenated(tmp_path, armhf):
    raw = build_initrd_bytes(armhf, armhf, INIT, MTIME, applets=["sh"])
    gz = tmp_path / "i.gz"
    build_initrd(gz, armhf, armhf, INIT, MTIME, applets=["sh"])
    listed = read_initrd(gz)
    assert listed == _members(raw, tmp_path)
    by_name = {m.name: m for m in listed}
    assert by_name["init"] == ("init", 0o100755, len(INIT))
    assert by_name["bin/sh"].mode == 0o120777 and by_name["bin/sh"].size == len("busybox")
    assert stat.S_ISCHR(by_name["dev/console"].mode)
    assert [m.name for m in listed] == subprocess.run(["cpio", "-t", "--quiet"], input=raw, capture_output=True,
                                                      check=True).stdout.decode().split()
    # early-microcode style: a plain archive, NUL padding, then a gzip-compressed one
    both = tmp_path / "both"
    both.write_bytes(raw + b"\0" * 512 + gzip.compress(raw))
    assert read_initrd(both) == listed + listed


def test_read_initrd_rejects_garbage(tmp_path, armhf):
    raw = build_initrd_bytes(armhf, armhf, INIT, MTIME, applets=["sh"])
    cases = {
        "garbage": (b"hello world\n" * 10, "not a gzip or newc cpio archive$"),
        "empty": (b"", "not a gzip or newc cpio archive"),
        "xz": (lzma.compress(raw), r"xz-compressed; only gzip"),
        "odc": (b"070707" + b"0" * 100, "not a gzip or newc cpio archive"),
        "truncated-cpio": (raw[:1000], "truncated"),
        "truncated-gz": (gzip.compress(raw)[:500], "corrupt gzip"),
        "gz-not-cpio": (gzip.compress(b"just text"), "gzip data is not a newc cpio"),
        "trailing-junk": (raw + b"junk", "at offset"),
    }
    for name, (data, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(BuildInputError, match=msg):
            read_initrd(p)
    with pytest.raises(BuildInputError, match="cannot read"):
        read_initrd(tmp_path / "missing")
