"""builder.cpio against the real GNU cpio: what we write, cpio lists and extracts identically."""

import gzip
import io
import os
import shutil
import stat
import subprocess

import pytest

from builder.cpio import CpioError, CpioWriter, gzip_bytes, iter_newc, write_gzip
from builder.errors import BuildError

pytestmark = pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")

MTIME = 1_700_000_000  # 2023-11-14 22:13:20 UTC


def _archive(mtime=MTIME, fill=None) -> bytes:
    buf = io.BytesIO()
    w = CpioWriter(buf, mtime)
    if fill is None:
        w.add_file("bin/busybox", b"\x7fELF fake busybox", 0o755)  # added before its parent on purpose
        w.add_dir("bin")
        w.add_dir("dev")
        w.add_dir("root", 0o700)
        w.add_symlink("bin/sh", "busybox")
        w.add_symlink("bin/abs", "/bin/busybox")
        w.add_chardev("dev/console", 5, 1)
        w.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
        w.add_file("root/empty", b"")
    else:
        fill(w)
    w.close()
    return buf.getvalue()


def _cpio(args, data: bytes, cwd=None) -> str:
    p = subprocess.run(["cpio", *args], input=data, capture_output=True, cwd=cwd,
                       env={"PATH": os.environ["PATH"], "LC_ALL": "C", "TZ": "UTC"})
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode() + p.stderr.decode()


def _listing(data: bytes) -> list[str]:
    out = _cpio(["-t", "--quiet"], data)
    return out.splitlines()


def test_listing_is_sorted_parents_first_and_relative():
    names = _listing(_archive())
    assert names == ["bin", "bin/abs", "bin/busybox", "bin/sh", "dev", "dev/console",
                     "init", "root", "root/empty"]


def test_verbose_listing_types_modes_owner_and_device():
    out = _cpio(["-tvn", "--quiet"], _archive())
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in out.splitlines()}
    assert lines["bin"].startswith("drwxr-xr-x   2 0        0 ")
    assert lines["root"].startswith("drwx------   2 0        0 ")
    assert lines["bin/busybox"].startswith("-rwxr-xr-x   1 0        0 ")
    assert lines["root/empty"].startswith("-rw-r--r--   1 0        0 ")
    assert lines["bin/sh"].startswith("lrwxrwxrwx   1 0        0 ")
    assert lines["bin/sh"].endswith("bin/sh -> busybox")
    assert lines["bin/abs"].endswith("bin/abs -> /bin/busybox")
    console = lines["dev/console"].split()
    assert console[0] == "crw-------"
    assert console[4:6] == ["5,", "1"]
    assert "Nov 14  2023" in lines["init"]


@pytest.mark.root
def test_extract_contents_modes_links_mtimes(tmp_path):
    _cpio(["-idm", "--no-absolute-filenames", "--quiet"], _archive(), cwd=tmp_path)
    assert (tmp_path / "bin/busybox").read_bytes() == b"\x7fELF fake busybox"
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "root/empty").read_bytes() == b""
    assert stat.S_IMODE((tmp_path / "init").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "root/empty").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "root").stat().st_mode) == 0o700
    assert os.readlink(tmp_path / "bin/sh") == "busybox"
    assert os.readlink(tmp_path / "bin/abs") == "/bin/busybox"
    for f in ("init", "bin/busybox", "root/empty"):
        assert (tmp_path / f).stat().st_mtime == MTIME
    console = tmp_path / "dev/console"
    if console.exists():  # mknod needs CAP_MKNOD; without it cpio warns and skips the node
        st = console.lstat()
        assert stat.S_ISCHR(st.st_mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)
        assert stat.S_IMODE(st.st_mode) == 0o600


def test_header_fields_inodes_nlink_trailer():
    data = _archive()
    members = list(iter_newc(data))
    assert [m.ino for m in members] == list(range(1, len(members) + 1))
    assert all(m.mtime == MTIME for m in members)
    assert {m.name: m.nlink for m in members}["bin"] == 2
    assert {m.name: m.nlink for m in members}["init"] == 1
    assert data[:6] == b"070701"
    assert len(data) % 4 == 0
    assert b"TRAILER!!!\0" in data[-16:]


def test_rebuild_is_byte_identical_and_mtime_matters():
    a, b = _archive(), _archive()
    assert a == b
    c = _archive(mtime=MTIME + 1)
    assert c != a
    assert gzip_bytes(a) == gzip_bytes(b)
    assert gzip_bytes(a) != gzip_bytes(c)


@pytest.mark.parametrize("namelen", range(1, 9))
def test_padding_names_and_sizes_match_real_cpio(tmp_path, namelen):
    files = {}
    for size in range(6):
        name = (chr(ord("a") + size) * namelen)
        files[name] = bytes(range(1, size + 1))

    def fill(w):
        for name, data in files.items():
            w.add_file(name, data)
        w.add_symlink("l" * namelen, "t" * namelen)

    data = _archive(fill=fill)
    assert _listing(data) == sorted([*files, "l" * namelen])
    _cpio(["-id", "--quiet"], data, cwd=tmp_path)
    for name, content in files.items():
        assert (tmp_path / name).read_bytes() == content
    assert os.readlink(tmp_path / ("l" * namelen)) == "t" * namelen
    assert [(m.name, m.data) for m in iter_newc(data) if m.name in files] == sorted(files.items())


def test_gzip_header_mtime_zero_no_name(tmp_path):
    out = tmp_path / "initrd.cpio.gz"
    write_gzip(out, _archive())
    raw = out.read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08"
    assert raw[3] == 0  # FLG: no FNAME, FCOMMENT, FEXTRA, FHCRC
    assert raw[4:8] == b"\0\0\0\0"  # MTIME
    assert raw[8] == 2  # XFL: maximum compression (level 9)
    assert gzip.decompress(raw) == _archive()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["initrd.cpio.gz"]  # no temp file left behind
    # The real tools read it too.
    assert _listing(gzip.decompress(raw))[0] == "bin"


def test_gzip_write_failure_leaves_nothing(tmp_path):
    out = tmp_path / "x.gz"
    with pytest.raises(TypeError):
        write_gzip(out, "not bytes")
    assert list(tmp_path.iterdir()) == []


def test_rejects_bad_input():
    w = CpioWriter(io.BytesIO(), MTIME)
    w.add_dir("bin")
    with pytest.raises(CpioError, match="duplicate"):
        w.add_dir("/bin/")
    for bad in ("", "/", "a/../b", "a//b", "./a"):
        with pytest.raises(CpioError):
            w.add_file(bad, b"")
    with pytest.raises(CpioError, match="permission bits"):
        w.add_file("x", b"", 0o100644)
    w2 = CpioWriter(io.BytesIO(), MTIME)
    w2.add_file("nodir/x", b"")
    with pytest.raises(CpioError, match="parent directory nodir"):
        w2.close()
    assert issubclass(CpioError, BuildError)


def test_field_overflow_is_detected():
    with pytest.raises(CpioError, match="mtime"):
        CpioWriter(io.BytesIO(), 1 << 32).close()
    w = CpioWriter(io.BytesIO(), MTIME)
    w.add_chardev("c", 1 << 32, 0)
    with pytest.raises(CpioError, match="rdevmajor"):
        w.close()
