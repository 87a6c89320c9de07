"""Tests of the pinned, verified, cached download chain.

A small fake Debian archive (signed with a throw-away key made in a temporary
GNUPGHOME) is served by http.server on 127.0.0.1; nothing of ours is mocked.
The one test that talks to the machine's real mirror is skipped when the apt
configuration has no bookworm source (select/deselect it with ``-k network``).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import lzma
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from builder.apt_sources import find_mirror
from builder.archive import (
    Archive,
    MemberNotFoundError,
    PackageNotFoundError,
    extract_member,
    extract_members,
    list_members,
    verify_inrelease,
)
from builder.cache import Cache
from builder.errors import (
    BuildInputError,
    CacheMissError,
    DownloadError,
    IntegrityError,
)
from builder.lock import fetch_pinned, load_lock, refresh_lock

SUITE = "bookworm"
ARCH = "armhf"
RELEASE_DATE = "Sat, 11 Jul 2026 10:16:37 UTC"
RELEASE_EPOCH = 1783764997

pytestmark = pytest.mark.skipif(
    not (shutil.which("gpg") and shutil.which("gpgv") and shutil.which("dpkg-deb")),
    reason="needs gpg, gpgv and dpkg-deb",
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------
# gpg keys (one trusted, one untrusted), made once per session


class Gpg:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = dict(os.environ, GNUPGHOME=str(home))

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["gpg", "--batch", "--quiet", "--no-tty", *args],
            env=self.env, check=True, capture_output=True, **kw,
        )

    def gen_key(self, uid: str) -> str:
        self.run("--pinentry-mode", "loopback", "--passphrase", "",
                 "--quick-gen-key", uid, "ed25519", "sign", "never")
        out = self.run("--with-colons", "--list-keys", uid).stdout.decode()
        return next(ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr:"))

    def export(self, fpr: str, dest: Path) -> Path:
        dest.write_bytes(self.run("--export", fpr).stdout)
        return dest

    def clearsign(self, fpr: str, data: bytes) -> bytes:
        return self.run("--local-user", fpr, "--digest-algo", "SHA256",
                        "--clearsign", input=data).stdout


@pytest.fixture(scope="session")
def gpg():
    # Short path: gpg-agent's socket path must fit in sun_path.
    home = Path(tempfile.mkdtemp(prefix="dlgpg-"))
    home.chmod(0o700)
    g = Gpg(home)
    g.trusted = g.gen_key("Test Archive <archive@example.invalid>")
    g.untrusted = g.gen_key("Someone Else <evil@example.invalid>")
    g.keyring = g.export(g.trusted, home / "archive-keyring.gpg")
    try:
        yield g
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=g.env, check=False,
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


# --------------------------------------------------------------------------
# tiny .debs, built once per session


def build_deb(work: Path, name: str, version: str, files: dict[str, bytes | Path]) -> Path:
    root = work / f"{name}_{version.replace(':', '%')}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: {ARCH}\n"
        f"Maintainer: Test <test@example.invalid>\nDescription: test package {name}\n"
    )
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):  # a symlink
            p.symlink_to(content)
        else:
            p.write_bytes(content)
    out = work / f"{root.name}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
                   check=True, capture_output=True)
    return out


KERNEL = "linux-image-6.1.0-10-armmp-lpae"
KERNEL_OLD_ABI = "linux-image-6.1.0-9-armmp-lpae"


@pytest.fixture(scope="session")
def debs(tmp_path_factory):
    """name -> (version, deb path, pool filename)."""
    work = tmp_path_factory.mktemp("debs")
    spec = {
        "busybox-static": ("1:1.35.0-4+deb12u1+b1", "b/busybox", {
            "bin/busybox": b"\x7fELF fake busybox",
            "bin/sh": Path("busybox"),
            "usr/share/doc/busybox-static/copyright": b"GPL",
        }),
        KERNEL: ("6.1.176-1", "l/linux", {
            "boot/vmlinuz-6.1.0-10-armmp-lpae": b"fake zImage 10" * 100,
            "boot/config-6.1.0-10-armmp-lpae": b"CONFIG_ARM=y\n",
            "usr/lib/linux-image-6.1.0-10-armmp-lpae/vexpress-v2p-ca15-tc1.dtb": b"\xd0\x0d\xfe\xed tc1",
            "usr/lib/linux-image-6.1.0-10-armmp-lpae/vexpress-v2p-ca9.dtb": b"\xd0\x0d\xfe\xed ca9",
        }),
        # Older ABI with a *higher* package version: the ABI number must win,
        # compared numerically (10 > 9).
        KERNEL_OLD_ABI: ("6.1.200-1", "l/linux", {
            "boot/vmlinuz-6.1.0-9-armmp-lpae": b"fake zImage 9",
            "usr/lib/linux-image-6.1.0-9-armmp-lpae/vexpress-v2p-ca15-tc1.dtb": b"dtb9",
        }),
        # Metapackage and debug package must never be picked.
        "linux-image-armmp-lpae": ("6.1.300-1", "l/linux", {"usr/share/doc/x/README": b"meta"}),
        KERNEL + "-dbg": ("6.1.300-1", "l/linux", {"usr/lib/debug/x": b"dbg"}),
    }
    out = {}
    for name, (version, pooldir, files) in spec.items():
        deb = build_deb(work, name, version, files)
        plain_version = version.split(":", 1)[-1]
        out[name] = (version, deb, f"pool/main/{pooldir}/{name}_{plain_version}_{ARCH}.deb")
    return out


# --------------------------------------------------------------------------
# the fake archive and its HTTP server


class FakeArchive:
    def __init__(self, root: Path, gpg: Gpg, debs: dict) -> None:
        self.root = root
        self.gpg = gpg
        self.debs = debs
        self.requests: list[str] = []
        self.url = ""

    @property
    def dists(self) -> Path:
        return self.root / "dists" / SUITE

    def pool_path(self, name: str) -> Path:
        return self.root / self.debs[name][2]

    def build(self, *, codename: str = SUITE, by_hash: bool = True) -> None:
        paras = []
        for name, (version, deb, filename) in sorted(self.debs.items()):
            dest = self.root / filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(deb, dest)
            data = dest.read_bytes()
            paras.append(
                f"Package: {name}\nVersion: {version}\nArchitecture: {ARCH}\n"
                f"Maintainer: Test <test@example.invalid>\nFilename: {filename}\n"
                f"Size: {len(data)}\nSHA256: {sha256(data)}\n"
                f"Description: test package {name}\n"
            )
        packages = "\n".join(paras).encode()
        self.write_packages(packages, codename=codename, by_hash=by_hash)

    def write_packages(self, packages: bytes, *, codename: str = SUITE, by_hash: bool = True,
                       sign: bool = True) -> None:
        bdir = self.dists / "main" / f"binary-{ARCH}"
        bdir.mkdir(parents=True, exist_ok=True)
        xz = lzma.compress(packages)
        (bdir / "Packages.xz").write_bytes(xz)
        if by_hash:
            (bdir / "by-hash" / "SHA256").mkdir(parents=True, exist_ok=True)
            (bdir / "by-hash" / "SHA256" / sha256(xz)).write_bytes(xz)
        release = (
            f"Origin: Debian\nLabel: Debian\nSuite: oldstable\nCodename: {codename}\n"
            f"Date: {RELEASE_DATE}\nAcquire-By-Hash: yes\nArchitectures: {ARCH}\n"
            f"Components: main\nDescription: fake archive\nSHA256:\n"
            f" {sha256(packages)} {len(packages):>8} main/binary-{ARCH}/Packages\n"
            f" {sha256(xz)} {len(xz):>8} main/binary-{ARCH}/Packages.xz\n"
        ).encode()
        (self.dists / "Release").write_bytes(release)
        if sign:
            self.sign(self.gpg.trusted)

    def sign(self, fpr: str) -> None:
        release = (self.dists / "Release").read_bytes()
        (self.dists / "InRelease").write_bytes(self.gpg.clearsign(fpr, release))


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def archive(tmp_path, gpg, debs):
    fa = FakeArchive(tmp_path / "mirror", gpg, debs)
    fa.build()
    log = fa.requests

    class Handler(_Handler):
        def do_GET(self):
            log.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(fa.root))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fa.url = f"http://127.0.0.1:{server.server_address[1]}"
    fa.server = server
    try:
        yield fa
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def lock_path(tmp_path, archive, gpg):
    """A lock refreshed from the fake archive (refresh cache kept separate)."""
    path = tmp_path / "lock.json"
    refresh_lock(path, archive.url, cache=Cache(tmp_path / "refresh-cache"),
                 keyring=gpg.keyring, suite=SUITE, arch=ARCH, progress=False)
    return path


def dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------
# happy path


def test_refresh_lock_pins_real_image_package_and_members(lock_path, debs):
    lock = load_lock(lock_path)
    assert (lock.suite, lock.arch, lock.component) == (SUITE, ARCH, "main")
    assert lock.source_date_epoch == RELEASE_EPOCH  # new lock: InRelease Date
    k = lock.package("kernel")
    assert k.name == KERNEL and k.version == "6.1.176-1"
    assert k.members == {
        "zImage": "boot/vmlinuz-6.1.0-10-armmp-lpae",
        "dtb": "usr/lib/linux-image-6.1.0-10-armmp-lpae/vexpress-v2p-ca15-tc1.dtb",
    }
    b = lock.package("busybox")
    assert b.name == "busybox-static" and b.members == {"busybox": "bin/busybox"}
    deb = debs["busybox-static"][1].read_bytes()
    assert (b.sha256, b.size, b.filename) == (sha256(deb), len(deb), debs["busybox-static"][2])
    with pytest.raises(BuildInputError, match="no package for role"):
        lock.package("initrd")


def test_refresh_keeps_source_date_epoch_unless_asked(lock_path, archive, gpg, tmp_path):
    data = json.loads(lock_path.read_text())
    data["source_date_epoch"] = 12345
    lock_path.write_text(json.dumps(data))
    cache = Cache(tmp_path / "c2")
    lock = refresh_lock(lock_path, archive.url, cache=cache, keyring=gpg.keyring, progress=False)
    assert lock.source_date_epoch == 12345 == load_lock(lock_path).source_date_epoch
    lock = refresh_lock(lock_path, archive.url, cache=cache, keyring=gpg.keyring,
                        reset_source_date_epoch=True, progress=False)
    assert load_lock(lock_path).source_date_epoch == RELEASE_EPOCH


def test_fetch_pinned_happy_path(lock_path, archive, gpg, tmp_path):
    lock = load_lock(lock_path)
    cache = Cache(tmp_path / "cache")
    archive.requests.clear()  # forget the refresh_lock downloads
    paths = fetch_pinned(lock, cache, mirror=archive.url, keyring=gpg.keyring, progress=False)
    assert set(paths) == {"busybox-static", KERNEL}
    for p in lock.packages.values():
        assert paths[p.name] == cache.root / "sha256" / p.sha256
        assert sha256(paths[p.name].read_bytes()) == p.sha256
        assert paths[p.name].stat().st_mode & 0o222 == 0  # read-only
    # the index came by hash, not by its mutable name
    assert any("/by-hash/SHA256/" in r for r in archive.requests)
    assert not any(r.endswith("/Packages.xz") for r in archive.requests)
    # members named by the lock
    k = lock.package("kernel")
    assert extract_member(paths[KERNEL], k.members["zImage"]) == b"fake zImage 10" * 100
    got = extract_members(paths[KERNEL], ["./" + k.members["dtb"], "/" + k.members["zImage"]])
    assert got["./" + k.members["dtb"]] == b"\xd0\x0d\xfe\xed tc1"
    assert extract_member(paths["busybox-static"], "bin/busybox") == b"\x7fELF fake busybox"
    assert extract_member(paths["busybox-static"], "bin/sh") == b"\x7fELF fake busybox"  # symlink
    names = list_members(paths[KERNEL])
    assert "boot/vmlinuz-6.1.0-10-armmp-lpae" in names and "boot" in names
    with pytest.raises(MemberNotFoundError, match="vexpress-v2p-ca15-tc1.dtb"):
        extract_member(paths[KERNEL], "usr/lib/linux-image-6.1.0-9-armmp-lpae/vexpress-v2p-ca15-tc1.dtb")
    with pytest.raises(MemberNotFoundError):
        extract_member(paths[KERNEL], "boot")  # a directory is not a file
    # no temporary files left behind
    assert not [f for f in files_under(cache.root) if ".partial" in f]


def test_by_hash_missing_falls_back_to_plain_path(lock_path, archive, gpg, tmp_path):
    shutil.rmtree(archive.dists / "main" / f"binary-{ARCH}" / "by-hash")
    archive.requests.clear()
    paths = fetch_pinned(load_lock(lock_path), Cache(tmp_path / "cache"), mirror=archive.url,
                         keyring=gpg.keyring, progress=False)
    assert len(paths) == 2
    assert any(r.endswith(f"binary-{ARCH}/Packages.xz") for r in archive.requests)


def test_resolve(archive, gpg, tmp_path):
    a = Archive(archive.url, SUITE, Cache(tmp_path / "c"), keyring=gpg.keyring, progress=False)
    rec = a.resolve("busybox-static", ARCH)
    assert rec.version == "1:1.35.0-4+deb12u1+b1" and rec.arch == ARCH
    assert rec.filename.startswith("pool/main/b/busybox/")
    assert a.resolve(KERNEL, ARCH, version="6.1.176-1").name == KERNEL
    with pytest.raises(PackageNotFoundError):
        a.resolve(KERNEL, ARCH, version="0.1-1")
    with pytest.raises(PackageNotFoundError):
        a.resolve("no-such-package", ARCH)
    assert a.release_date() == RELEASE_EPOCH


# --------------------------------------------------------------------------
# tampering


def test_tampered_deb_is_rejected_and_cache_stays_clean(lock_path, archive, gpg, tmp_path):
    lock = load_lock(lock_path)
    pool = archive.pool_path(KERNEL)
    data = bytearray(pool.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    pool.write_bytes(bytes(data))
    cache = Cache(tmp_path / "cache")
    with pytest.raises(IntegrityError) as ei:
        fetch_pinned(lock, cache, mirror=archive.url, keyring=gpg.keyring, progress=False)
    msg = str(ei.value)
    k = lock.package("kernel")
    assert k.filename in msg and k.sha256 in msg and sha256(bytes(data)) in msg
    # only the (authentic) Packages.xz and busybox may be cached; nothing partial
    leftovers = files_under(cache.root)
    assert f"sha256/{k.sha256}" not in leftovers
    assert not [f for f in leftovers if ".partial" in f]


def test_oversized_deb_is_cut_off(lock_path, archive, gpg, tmp_path):
    lock = load_lock(lock_path)
    pool = archive.pool_path("busybox-static")
    pool.write_bytes(pool.read_bytes() + b"\0" * 100_000)
    cache = Cache(tmp_path / "cache")
    with pytest.raises(IntegrityError, match="more than the expected"):
        fetch_pinned(lock, cache, mirror=archive.url, keyring=gpg.keyring, progress=False)
    assert f"sha256/{lock.package('busybox').sha256}" not in files_under(cache.root)
    assert not [f for f in files_under(cache.root) if ".partial" in f]


def test_tampered_packages_is_rejected(lock_path, archive, gpg, tmp_path):
    # Replace Packages.xz (and its by-hash copy) without re-signing InRelease.
    bdir = archive.dists / "main" / f"binary-{ARCH}"
    signed_sha = sha256((bdir / "Packages.xz").read_bytes())
    evil = lzma.compress(b"Package: busybox-static\nVersion: 9\nArchitecture: armhf\n"
                         b"Filename: pool/evil.deb\nSize: 1\nSHA256: " + b"0" * 64 + b"\n")
    (bdir / "Packages.xz").write_bytes(evil)
    (bdir / "by-hash" / "SHA256" / signed_sha).write_bytes(evil)
    cache = Cache(tmp_path / "cache")
    with pytest.raises(IntegrityError, match=signed_sha):
        fetch_pinned(load_lock(lock_path), cache, mirror=archive.url, keyring=gpg.keyring,
                     progress=False)
    assert files_under(cache.root) == []


def test_inrelease_signed_by_unknown_key(lock_path, archive, gpg, tmp_path):
    archive.sign(gpg.untrusted)
    cache = Cache(tmp_path / "cache")
    with pytest.raises(IntegrityError, match="no valid OpenPGP signature"):
        fetch_pinned(load_lock(lock_path), cache, mirror=archive.url, keyring=gpg.keyring,
                     progress=False)
    assert files_under(cache.root) == []


def test_inrelease_modified_after_signing(archive, gpg):
    inrel = (archive.dists / "InRelease").read_bytes()
    bad = inrel.replace(b"Codename: bookworm", b"Codename: bookwarm")
    assert bad != inrel
    with pytest.raises(IntegrityError, match="no valid OpenPGP signature"):
        verify_inrelease(bad, gpg.keyring)
    content = verify_inrelease(inrel, gpg.keyring)
    assert content.startswith(b"Origin: Debian") and b"BEGIN PGP" not in content


def test_inrelease_with_unsigned_extra_data(archive, gpg):
    inrel = (archive.dists / "InRelease").read_bytes()
    with pytest.raises(IntegrityError, match="after the signature"):
        verify_inrelease(inrel + b"\nSHA256:\n 00 1 main/binary-armhf/Packages.xz\n", gpg.keyring)
    with pytest.raises(IntegrityError, match="not an OpenPGP clearsigned"):
        verify_inrelease(b"Suite: bookworm\n" + inrel, gpg.keyring)
    with pytest.raises(IntegrityError, match="exactly one signed message"):
        verify_inrelease(inrel + inrel, gpg.keyring)


def test_inrelease_for_another_suite(lock_path, archive, gpg, tmp_path):
    archive.build(codename="trixie")  # validly signed, but not for bookworm
    with pytest.raises(IntegrityError, match="not 'bookworm'"):
        fetch_pinned(load_lock(lock_path), Cache(tmp_path / "cache"), mirror=archive.url,
                     keyring=gpg.keyring, progress=False)


# --------------------------------------------------------------------------
# lock vs archive


def _edit_lock(path: Path, role: str, **changes) -> None:
    data = json.loads(path.read_text())
    data["packages"][role].update(changes)
    path.write_text(json.dumps(data))


def test_lock_and_archive_disagree_on_hash(lock_path, archive, gpg, tmp_path):
    _edit_lock(lock_path, "busybox", sha256="ab" * 32)
    archive.requests.clear()  # forget the refresh_lock downloads
    cache = Cache(tmp_path / "cache")
    with pytest.raises(IntegrityError, match=r"disagree.*sha256.*lock --refresh"):
        fetch_pinned(load_lock(lock_path), cache, mirror=archive.url, keyring=gpg.keyring,
                     progress=False)
    # nothing was downloaded from the pool
    assert not any(r.startswith("/pool/") for r in archive.requests)


def test_lock_and_archive_disagree_on_size(lock_path, archive, gpg, tmp_path):
    _edit_lock(lock_path, "kernel", size=12)
    with pytest.raises(IntegrityError, match=r"disagree.*size lock=12.*lock --refresh"):
        fetch_pinned(load_lock(lock_path), Cache(tmp_path / "cache"), mirror=archive.url,
                     keyring=gpg.keyring, progress=False)


def test_lock_version_gone_from_archive(lock_path, archive, gpg, tmp_path):
    _edit_lock(lock_path, "kernel", version="6.1.170-3")
    with pytest.raises(IntegrityError, match=r"disagree.*6\.1\.170-3.*lock --refresh"):
        fetch_pinned(load_lock(lock_path), Cache(tmp_path / "cache"), mirror=archive.url,
                     keyring=gpg.keyring, progress=False)


def test_load_lock_rejects_bad_files(tmp_path, lock_path):
    with pytest.raises(BuildInputError, match="not found"):
        load_lock(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(BuildInputError, match="unreadable"):
        load_lock(bad)
    _edit_lock(lock_path, "kernel", sha256="xyz")
    with pytest.raises(BuildInputError, match="64 hex"):
        load_lock(lock_path)


def test_real_lock_file_is_valid():
    lock = load_lock()
    assert (lock.suite, lock.arch) == ("bookworm", "armhf")
    assert isinstance(lock.source_date_epoch, int) and lock.source_date_epoch > 1_600_000_000
    k = lock.package("kernel")
    assert k.name.startswith("linux-image-") and k.name.endswith("-armmp-lpae")
    assert k.members["zImage"] == f"boot/vmlinuz-{k.name.removeprefix('linux-image-')}"
    assert k.members["dtb"].endswith("/vexpress-v2p-ca15-tc1.dtb")
    assert lock.package("busybox").members == {"busybox": "bin/busybox"}


# --------------------------------------------------------------------------
# offline


def test_offline_lists_every_missing_package(lock_path, tmp_path):
    lock = load_lock(lock_path)
    with pytest.raises(CacheMissError) as ei:
        fetch_pinned(lock, Cache(tmp_path / "empty"), offline=True)
    msg = str(ei.value)
    assert "\n" not in msg
    for p in lock.packages.values():
        assert p.name in msg and p.version in msg and p.sha256 in msg


def test_offline_after_online_needs_no_server(lock_path, archive, gpg, tmp_path):
    lock = load_lock(lock_path)
    cache = Cache(tmp_path / "cache")
    online = fetch_pinned(lock, cache, mirror=archive.url, keyring=gpg.keyring, progress=False)
    archive.server.shutdown()
    archive.server.server_close()
    assert fetch_pinned(lock, cache, offline=True) == online
    # online mode with everything cached does not touch the network either
    assert fetch_pinned(lock, cache, mirror=dead_url(), keyring=gpg.keyring) == online


def test_corrupted_cache_entry_is_dropped_and_refetched(lock_path, archive, gpg, tmp_path):
    lock = load_lock(lock_path)
    cache = Cache(tmp_path / "cache")
    p = fetch_pinned(lock, cache, mirror=archive.url, keyring=gpg.keyring,
                     progress=False)["busybox-static"]
    p.chmod(0o644)
    p.write_bytes(b"bit rot")
    assert cache.get(lock.package("busybox").sha256) is None
    assert not p.exists()
    with pytest.raises(CacheMissError, match="busybox-static"):
        fetch_pinned(lock, cache, offline=True)
    again = fetch_pinned(lock, cache, mirror=archive.url, keyring=gpg.keyring, progress=False)
    assert sha256(again["busybox-static"].read_bytes()) == lock.package("busybox").sha256


# --------------------------------------------------------------------------
# cache and network errors


def test_cache_download_errors(archive, tmp_path):
    cache = Cache(tmp_path / "cache")
    with pytest.raises(DownloadError, match="HTTP 404") as ei:
        cache.put_from_download(archive.url + "/nope", "00" * 32, progress=False)
    assert not isinstance(ei.value, IntegrityError) and "\n" not in str(ei.value)
    with pytest.raises(DownloadError, match="after 3 attempts") as ei:
        cache.put_from_download(dead_url() + "/x", "00" * 32, progress=False)
    assert "\n" not in str(ei.value)
    with pytest.raises(ValueError):
        cache.path_for("../../etc/passwd")
    assert not [f for f in files_under(cache.root) if ".partial" in f]


def test_cache_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DIRTYLOG_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert Cache().root == tmp_path / "a"
    monkeypatch.delenv("DIRTYLOG_CACHE")
    assert Cache().root == tmp_path / "x" / "dirtylog"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert Cache().root == tmp_path / "h" / ".cache" / "dirtylog"


# --------------------------------------------------------------------------
# mirror discovery


def _apt_dir(tmp_path: Path, sources_list: str | None = None, **parts: str) -> Path:
    d = tmp_path / "apt"
    (d / "sources.list.d").mkdir(parents=True)
    if sources_list is not None:
        (d / "sources.list").write_text(sources_list)
    for name, text in parts.items():
        (d / "sources.list.d" / name.replace("__", ".")).write_text(text)
    return d


def test_find_mirror_one_line(tmp_path):
    d = _apt_dir(tmp_path, (
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb http://updates.example/debian bookworm-updates main\n"
        "deb http://contrib.example/debian bookworm contrib non-free\n"
        "deb [arch=amd64,armhf signed-by=/usr/share/keyrings/x.gpg] "
        "http://mirror.example/debian/ bookworm main contrib # trailing comment\n"
        "deb http://later.example/debian bookworm main\n"
    ))
    assert find_mirror("bookworm", d) == "http://mirror.example/debian"


def test_find_mirror_deb822(tmp_path):
    d = _apt_dir(
        tmp_path,
        "deb http://other.example/debian trixie main\n",
        a_disabled__sources=(
            "Types: deb\nURIs: http://disabled.example/debian\n"
            "Suites: bookworm\nComponents: main\nEnabled: no\n"
        ),
        b_debian__sources=(
            "# a comment\n"
            "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n"
            "\n"
            "Types: deb deb-src\n"
            "# comment inside a stanza\n"
            "URIs: https://mirror.example/debian\n"
            "Suites: bookworm-updates bookworm bookworm-backports\n"
            "Components: main contrib\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
        c_third__list="deb http://third.example/debian bookworm main\n",
        z_ignored__list__save="deb http://save.example/debian bookworm main\n",
    )
    assert find_mirror("bookworm", d) == "https://mirror.example/debian"
    assert find_mirror("trixie", d) == "http://other.example/debian"


def test_find_mirror_none_matches(tmp_path):
    d = _apt_dir(
        tmp_path,
        "deb http://mirror.example/debian bookworm-updates main\n"
        "deb-src http://mirror.example/debian bookworm main\n",
        x__sources=("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
                    "Components: main\nEnabled: no\n"),
        y__sources=("Types: deb\nURIs: cdrom:[Debian]/\nSuites: bookworm\nComponents: main\n"),
    )
    with pytest.raises(BuildInputError) as ei:
        find_mirror("bookworm", d)
    msg = str(ei.value)
    assert "--mirror URL" in msg
    assert str(d / "sources.list") in msg and str(d / "sources.list.d" / "x.sources") in msg
    assert "cdrom:" in msg
    with pytest.raises(BuildInputError, match="--mirror"):
        find_mirror("bookworm", tmp_path / "no-apt-here")


def test_fetch_pinned_uses_apt_config_mirror(lock_path, archive, gpg, tmp_path):
    d = _apt_dir(tmp_path, f"deb {archive.url} {SUITE} main\n")
    paths = fetch_pinned(load_lock(lock_path), Cache(tmp_path / "cache"), keyring=gpg.keyring,
                         sources_dir=d, progress=False)
    assert len(paths) == 2


# --------------------------------------------------------------------------
# the real archive (network)


def _real_mirror() -> str | None:
    try:
        return find_mirror("bookworm")
    except BuildInputError:
        return None


@pytest.mark.skipif(_real_mirror() is None, reason="no bookworm mirror in the apt configuration")
@pytest.mark.skipif(not Path("/usr/share/keyrings/debian-archive-keyring.gpg").is_file(),
                    reason="debian-archive-keyring not installed")
@pytest.mark.network
def test_network_real_lock_pins_authenticate(tmp_path):
    lock = load_lock()
    a = Archive(_real_mirror(), lock.suite, Cache(tmp_path / "cache"), progress=False)
    for p in lock.packages.values():
        rec = a.resolve(p.name, lock.arch, version=p.version)
        assert (rec.sha256, rec.size, rec.filename) == (p.sha256, p.size, p.filename), p.name
    assert a.release_date() >= lock.source_date_epoch
