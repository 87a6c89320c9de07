"""Build Debian's QEMU with dirtylog's ``-savedirtylog`` patch (issue #4).

Inputs, all pinned in ``builder/locks/qemu-sources.json``:

- Debian's source package (``.dsc``, orig tarball, debian tarball).  Authenticated like the
  binary packages of ``builder/archive.py``: ``dists/<suite>/InRelease`` verified with gpgv
  against Debian's keyring -> ``main/source/Sources.xz`` hash -> the source entry's
  ``Checksums-Sha256`` -> each file.  The pins must equal what Debian signed; the ``.dsc``'s
  own checksums are cross-checked too.  (Bookworm's ``debian-archive-keyring`` verifies
  trixie's InRelease.)
- For QEMU 10.0 the two Python wheels its configure installs from ``python/wheels/`` and
  that Debian's ``+ds`` tarball does not ship (meson, pycotap), downloaded with pip with
  ``--require-hashes``.
- Our patches, ``builder/patches/qemu-<version>/*.patch`` (applied after Debian's series).

The result is content-addressed: ``<cache root>/qemu-builds/<key>/`` with ``key`` = sha256 over
the source hashes, the wheels' hashes, every patch's bytes, the configure arguments and a
recipe version.  Building with nothing changed is a cache hit that needs no network and
takes well under a second (the binary is re-hashed against ``build.json``).  Builds go to
a private directory and are renamed into place only when complete; concurrent builders of
the same key wait for each other (flock), so the CPU does one build at a time.

Only ``qemu-system-arm`` is built (``--target-list=arm-softmmu``, no default features).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from debian.deb822 import Dsc, Sources

from builder.apt_sources import find_mirror
from builder.archive import DEFAULT_KEYRING, Archive
from builder.cache import Cache, sha256_file
from builder.machines import parse_qemu_version
from builder.errors import (
    BuildError,
    BuildInputError,
    CacheMissError,
    DownloadError,
    IntegrityError,
    ToolMissingError,
)

__all__ = [
    "DEFAULT_QEMU_LOCK",
    "PATCH_ROOT",
    "QemuBuild",
    "QemuBuildError",
    "QemuSourceLock",
    "build_patched_qemu",
    "build_zoo_qemu",
    "zoo_bugs",
    "cache_key",
    "configure_args",
    "load_qemu_lock",
    "patch_files",
    "refresh_qemu_lock",
]

DEFAULT_QEMU_LOCK = Path(__file__).resolve().parent / "locks" / "qemu-sources.json"
PATCH_ROOT = Path(__file__).resolve().parent / "patches"  # package data
LOCK_SCHEMA = "dirtylog-qemu-sources/1"
BUILD_SCHEMA = "dirtylog-qemu-build/1"
# Bump when the recipe changes in a way the key would not otherwise see.
RECIPE = "1"
SUPPORTED = ("10.0", "7.2")

# Common to both versions: only the arm system emulator, nothing optional but libfdt.
_COMMON_CONFIGURE = [
    "--target-list=arm-softmmu",
    "--without-default-features",
    "--enable-system",
    "--disable-user",
    "--enable-tcg",
    "--enable-fdt=system",
    "--disable-docs",
    "--disable-werror",
    # Debian's +ds/+dfsg tarballs do not carry the firmware blobs.
    "--disable-install-blobs",
]


class QemuBuildError(BuildError):
    """configure, patch or ninja failed (exit 3); the message names the log."""


@dataclasses.dataclass(frozen=True)
class QemuBuild:
    qemu_system_arm: Path
    version: str  # e.g. "10.0.13", from `qemu-system-arm --version`
    version_text: str  # its first line
    source_package: str  # "qemu"
    source_version: str  # Debian version, e.g. "1:10.0.13+ds-0+deb13u1"
    suite: str
    source_sha256: dict[str, str]  # file name -> sha256 (dsc, orig, debian tarballs)
    wheel_sha256: dict[str, str]
    patch_sha256: str  # over all of our patches, in order
    patches: tuple[str, ...]
    configure_args: tuple[str, ...]
    cache_key: str
    directory: Path
    cache_hit: bool
    build_seconds: float | None  # of the build that produced it
    bug: str | None = None  # a bug-zoo defect built in (build_zoo_qemu), None for the patched QEMU itself


@dataclasses.dataclass(frozen=True)
class LockedFile:
    name: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class QemuSourceLock:
    key: str  # "10.0"
    suite: str
    component: str
    package: str
    version: str
    directory: str  # pool directory relative to the mirror
    files: tuple[LockedFile, ...]
    wheels: tuple[tuple[str, str, str], ...]  # (requirement, file name, sha256)

    def file(self, suffix: str) -> LockedFile:
        for f in self.files:
            if f.name.endswith(suffix):
                return f
        raise BuildInputError(f"QEMU lock {self.key}: no file ending in {suffix!r}")


# --------------------------------------------------------------------------
# lock


def load_qemu_lock(version: str, path: Path | None = None) -> QemuSourceLock:
    path = Path(path or DEFAULT_QEMU_LOCK)
    if version not in SUPPORTED:
        raise BuildInputError(f"QEMU version {version!r}: expected one of {', '.join(SUPPORTED)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BuildInputError(f"cannot read QEMU lock {path}: {e}") from e
    if data.get("schema") != LOCK_SCHEMA:
        raise BuildInputError(f"{path}: schema {data.get('schema')!r}, expected {LOCK_SCHEMA}")
    try:
        e = data["versions"][version]
        lock = QemuSourceLock(
            key=version, suite=e["suite"], component=e.get("component", "main"),
            package=e["package"], version=e["version"], directory=e["directory"],
            files=tuple(LockedFile(f["name"], int(f["size"]), f["sha256"].lower())
                        for f in e["files"]),
            wheels=tuple((w["requirement"], w["name"], w["sha256"].lower())
                         for w in e.get("wheels", [])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BuildInputError(f"{path}: malformed entry for QEMU {version}: {exc!r}") from exc
    for f in lock.files:
        if "/" in f.name or not re.fullmatch(r"[0-9a-f]{64}", f.sha256):
            raise BuildInputError(f"{path}: bad file entry {f}")
    return lock


def patch_files(version: str) -> list[Path]:
    d = PATCH_ROOT / f"qemu-{version}"
    files = sorted(d.glob("*.patch"))
    if not files:
        raise BuildInputError(f"no patches in {d}")
    return files


def _host_python() -> str | None:
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3")


def configure_args(version: str) -> list[str]:
    args = list(_COMMON_CONFIGURE)
    if version != "7.2":
        # 10.0 builds its venv (meson from python/wheels) from Debian's python3.  7.2 refuses
        # --python without its embedded meson (absent from Debian's tarball): it runs the system
        # meson and finds python3 on PATH.
        args.append(f"--python={_host_python()}")
    return args


def cache_key(lock: QemuSourceLock, patches: list[Path], args: list[str]) -> tuple[str, str]:
    """(build key, sha256 over our patches)."""
    ph = hashlib.sha256()
    for p in patches:
        data = p.read_bytes()
        ph.update(p.name.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode() + b"\n")
    patch_sha = ph.hexdigest()
    material = {
        "recipe": RECIPE,
        "package": lock.package,
        "version": lock.version,
        "sources": {f.name: f.sha256 for f in lock.files},
        "wheels": {name: sha for _, name, sha in lock.wheels},
        "patches": patch_sha,
        "configure": args,
        "target": "qemu-system-arm",
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return key, patch_sha


# --------------------------------------------------------------------------
# authenticated source download


def _mirror_for(suite: str, mirror: str | None) -> str:
    if mirror:
        return mirror.rstrip("/")
    try:
        return find_mirror(suite)
    except BuildInputError:
        pass
    # The suite may not be in this machine's apt sources (trixie on a bookworm host): the
    # same archive serves it, so take the bookworm (else any Debian) entry's URI.
    for other in ("bookworm", "trixie", "bullseye"):
        try:
            return find_mirror(other)
        except BuildInputError:
            continue
    raise BuildInputError(
        f"no Debian mirror for suite {suite!r} in the apt configuration; pass --mirror URL")


def _sources_paragraph(archive: Archive, package: str, version: str | None) -> Sources:
    """The signed Sources.xz entry of *package* (exactly *version*, else the highest)."""
    data = archive.index_bytes(f"{archive.component}/source/Sources.xz")
    head = f"Package: {package}\n".encode()
    found = []
    for chunk in re.split(rb"\n(?:[ \t]*\n)+", data):
        if chunk.startswith(head) or (b"\n" + head) in chunk:
            para = Sources(chunk)
            if para.get("Package") == package:
                found.append(para)
    if version is not None:
        found = [p for p in found if p.get("Version") == version]
    if not found:
        what = f"{package} {version}" if version else package
        raise BuildInputError(
            f"source package {what} is not in {archive.mirror} {archive.suite}/{archive.component} "
            f"(superseded? re-pin with `python -m builder.qemu_build --refresh-lock`)")
    from debian.debian_support import Version
    return max(found, key=lambda p: Version(p["Version"]))


def _files_of(para: Sources) -> list[LockedFile]:
    out = []
    for entry in para.get("Checksums-Sha256", []):
        out.append(LockedFile(entry["name"], int(entry["size"]), entry["sha256"].lower()))
    if not out:
        raise IntegrityError(f"Sources entry {para.get('Package')} {para.get('Version')} "
                             "has no Checksums-Sha256")
    return out


def _fetch_sources(lock: QemuSourceLock, cache: Cache, mirror: str | None, offline: bool,
                   log: Callable[[str], None], progress: bool) -> dict[str, Path]:
    paths = {f.name: cache.get(f.sha256) for f in lock.files}
    missing = [n for n, p in paths.items() if p is None]
    if not missing:
        return paths  # verified when they entered the cache, re-hashed just now
    if offline:
        raise CacheMissError(
            f"--offline: not in the cache {cache.root}: {', '.join(missing)} "
            f"(QEMU {lock.key} source package {lock.package} {lock.version})")
    base = _mirror_for(lock.suite, mirror)
    archive = Archive(base, lock.suite, cache, keyring=DEFAULT_KEYRING,
                      component=lock.component, progress=progress)
    log(f"authenticating {lock.package} {lock.version} against {lock.suite}'s signed Sources")
    signed = {f.name: f for f in _files_of(_sources_paragraph(archive, lock.package, lock.version))}
    for f in lock.files:
        if signed.get(f.name) != f:
            raise IntegrityError(
                f"QEMU lock {lock.key}: {f.name} is pinned as sha256 {f.sha256} ({f.size} bytes) "
                f"but {lock.suite}'s signed Sources says "
                f"{(signed[f.name].sha256 + ' (' + str(signed[f.name].size) + ' bytes)') if f.name in signed else 'nothing'}")
    for f in lock.files:
        if paths[f.name] is None:
            log(f"downloading {f.name} ({f.size / 1e6:.1f} MB)")
            paths[f.name] = cache.put_from_download(
                archive.pool_url(f"{lock.directory}/{f.name}"), f.sha256, f.size, progress=progress)
    return paths


def _check_dsc(lock: QemuSourceLock, paths: dict[str, Path]) -> None:
    dsc_file = lock.file(".dsc")
    with open(paths[dsc_file.name], "rb") as fh:
        dsc = Dsc(fh)
    listed = {e["name"]: e["sha256"].lower() for e in dsc.get("Checksums-Sha256", [])}
    for f in lock.files:
        if f.name == dsc_file.name:
            continue
        if listed.get(f.name) != f.sha256:
            raise IntegrityError(f"{dsc_file.name} lists {f.name} as {listed.get(f.name)}, "
                                 f"the lock as {f.sha256}")


def _put_local(cache: Cache, src: Path, sha256: str) -> Path:
    """Add a local file to the content-addressed cache (verified, atomic, read-only)."""
    final = cache.path_for(sha256)
    actual = sha256_file(src)
    if actual != sha256:
        raise IntegrityError(f"{src.name}: sha256 {actual}, expected {sha256}")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def _fetch_wheels(lock: QemuSourceLock, cache: Cache, offline: bool,
                  log: Callable[[str], None]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    todo = []
    for req, name, sha in lock.wheels:
        p = cache.get(sha)
        if p is None:
            todo.append((req, name, sha))
        else:
            out[name] = p
    if not todo:
        return out
    if offline:
        raise CacheMissError(f"--offline: wheels not in the cache {cache.root}: "
                             + ", ".join(n for _, n, _ in todo))
    log("downloading " + ", ".join(r for r, _, _ in todo) + " with pip (hash-checked)")
    with tempfile.TemporaryDirectory(prefix="dirtylog-wheels-") as tmp:
        reqs = Path(tmp, "requirements.txt")
        reqs.write_text("".join(f"{r} --hash=sha256:{s}\n" for r, _, s in todo))
        dest = Path(tmp, "dl")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--require-hashes", "--disable-pip-version-check", "-q", "-d", str(dest),
             "-r", str(reqs)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            detail = " ".join(proc.stderr.split())[-400:]
            if "HASH" in proc.stderr.upper() and "MATCH" in proc.stderr.upper():
                raise IntegrityError(f"pip download of the pinned wheels: {detail}")
            raise DownloadError(f"pip download of the pinned wheels failed: {detail}")
        for _, name, sha in todo:
            f = dest / name
            if not f.is_file():
                raise DownloadError(f"pip did not produce {name}")
            out[name] = _put_local(cache, f, sha)
    return out


# --------------------------------------------------------------------------
# host tools


_TOOLS = {  # program -> Debian package
    "cc": "gcc",
    "ninja": "ninja-build",
    "pkg-config": "pkg-config",
    "patch": "patch",
    "tar": "tar",
    "xz": "xz-utils",
}


def check_build_deps(version: str) -> None:
    """Raise ToolMissingError naming every Debian package to install."""
    missing: list[str] = []
    for prog, pkg in _TOOLS.items():
        if shutil.which(prog) is None and pkg not in missing:
            missing.append(pkg)
    py = _host_python()
    if not py or subprocess.run(
            [py, "-c", "import venv, importlib.util as u; "
                       "assert u.find_spec('ensurepip') or u.find_spec('pip')"],
            capture_output=True).returncode:
        missing.append("python3-venv")
    if shutil.which("pkg-config"):
        for mod, pkg in (("glib-2.0", "libglib2.0-dev"), ("zlib", "zlib1g-dev")):
            if subprocess.run(["pkg-config", "--exists", mod]).returncode != 0:
                missing.append(pkg)
    if not (Path("/usr/include/libfdt.h").exists() or Path("/usr/local/include/libfdt.h").exists()):
        missing.append("libfdt-dev")
    if version == "7.2":
        # 7.2's configure uses the system meson (Debian's tarball has no meson/ submodule).
        meson = shutil.which("meson")
        ok = False
        if meson:
            out = subprocess.run([meson, "--version"], capture_output=True, text=True).stdout
            m = re.match(r"(\d+)\.(\d+)", out.strip())
            ok = bool(m) and (int(m.group(1)), int(m.group(2))) >= (0, 61)
        if not ok:
            missing.append("meson")
    if missing:
        raise ToolMissingError(
            f"building QEMU {version} needs Debian packages: {' '.join(missing)} "
            f"(apt-get install {' '.join(missing)})")


# --------------------------------------------------------------------------
# build steps


def _run_logged(cmd: list[str], cwd: Path, logfile: Path, what: str, env=None) -> None:
    with open(logfile, "ab") as lf:
        lf.write(f"$ {' '.join(cmd)}\n".encode())
        lf.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=lf,
                              stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        raise QemuBuildError(f"{what} failed (exit {proc.returncode}): {_tail(logfile)}; "
                             f"full log {logfile}")


def _tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-800:]


def _series(src: Path) -> list[tuple[str, str]]:
    series = src / "debian" / "patches" / "series"
    out = []
    if not series.exists():
        return out
    for raw in series.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        level = next((f for f in fields[1:] if re.fullmatch(r"-p\d", f)), "-p1")
        out.append((fields[0], level))
    return out


def _apply(src: Path, patch: Path, level: str, logfile: Path, what: str) -> None:
    _run_logged(["patch", level, "--batch", "--forward", "--no-backup-if-mismatch",
                 "-i", str(patch)], src, logfile, f"applying {what}")


def _unpack(lock: QemuSourceLock, paths: dict[str, Path], wheels: dict[str, Path], patches: list[Path],
            work: Path, logfile: Path, log: Callable[[str], None]) -> Path:
    orig = next(f for f in lock.files if ".orig.tar." in f.name)
    deb = next(f for f in lock.files if ".debian.tar." in f.name)
    log(f"unpacking {orig.name}")
    tree = work / "tree"
    tree.mkdir()
    _run_logged(["tar", "--no-same-owner", "-xf", str(paths[orig.name]), "-C", str(tree)], work,
                logfile, "unpacking the orig tarball")
    tops = [p for p in tree.iterdir()]
    if len(tops) != 1 or not tops[0].is_dir():
        raise QemuBuildError(f"{orig.name}: expected one top directory, found {[p.name for p in tops]}")
    src = tops[0]
    _run_logged(["tar", "--no-same-owner", "-xf", str(paths[deb.name]), "-C", str(src)], work,
                logfile, "unpacking the debian tarball")
    series = _series(src)
    log(f"applying Debian's {len(series)} patches, then {len(patches)} of ours")
    for name, level in series:
        _apply(src, src / "debian" / "patches" / name, level, logfile, f"Debian patch {name}")
    for p in patches:
        _apply(src, p, "-p1", logfile, f"dirtylog patch {p.name}")
    if wheels:
        wdir = src / "python" / "wheels"
        wdir.mkdir(parents=True, exist_ok=True)
        for name, p in wheels.items():
            shutil.copyfile(p, wdir / name)
    return src


_NINJA_RE = re.compile(r"^\[(\d+)/(\d+)\]")


def _ninja(build: Path, jobs: int, logfile: Path, log: Callable[[str], None]) -> None:
    cmd = ["ninja", f"-j{jobs}", "qemu-system-arm"]
    tty = sys.stderr.isatty()
    bar = None
    if tty:
        from tqdm import tqdm
        bar = tqdm(total=0, unit="step", desc="ninja qemu-system-arm", leave=False)
    last_decile = -1
    with open(logfile, "ab") as lf:
        lf.write(f"$ {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, cwd=build, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                lf.write(raw)
                m = _NINJA_RE.match(raw.decode(errors="replace"))
                if not m:
                    continue
                n, total = int(m.group(1)), int(m.group(2))
                if bar is not None:
                    if bar.total != total:
                        bar.total = total
                    bar.n = n
                    bar.refresh()
                else:
                    decile = n * 10 // max(total, 1)
                    if decile != last_decile:
                        last_decile = decile
                        log(f"ninja [{n}/{total}]")
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if bar is not None:
                bar.close()
    if rc != 0:
        raise QemuBuildError(f"ninja failed (exit {rc}): {_tail(logfile, 10)}; full log {logfile}")


def _probe(binary: Path) -> tuple[str, str]:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    first = (out.stdout.splitlines() or [""])[0].strip()
    version = parse_qemu_version(first)  # the verifier judges it the same way (verifier.run.qemu.identify_qemu)
    if out.returncode != 0 or version is None:
        raise QemuBuildError(f"{binary} --version failed: {first or out.stderr.strip()}")
    helptext = subprocess.run([str(binary), "-help"], capture_output=True, text=True, timeout=30).stdout
    if not re.search(r"(?m)^-savedirtylog\b", helptext):
        raise QemuBuildError(f"{binary} was built but its -help does not list -savedirtylog")
    return ".".join(map(str, version)), first


# --------------------------------------------------------------------------
# cache entries


def _builds_root(cache: Cache) -> Path:
    return cache.root / "qemu-builds"


def _load_cached(entry: Path, key: str, need_tree: bool = False) -> dict | None:
    """The cache entry's metadata when it is whole (and, with `need_tree`, its build tree is kept)."""
    meta_path = entry / "build.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    binary = entry / "bin" / "qemu-system-arm"
    if meta.get("schema") != BUILD_SCHEMA or meta.get("cache_key") != key or not binary.is_file():
        return None
    if sha256_file(binary) != meta.get("binary_sha256"):
        return None
    if need_tree and not (meta.get("source_tree") and (Path(meta["source_tree"]) / "build" / "build.ninja").is_file()):
        return None
    return meta


def _result(entry: Path, meta: dict, hit: bool) -> QemuBuild:
    return QemuBuild(
        qemu_system_arm=entry / "bin" / "qemu-system-arm",
        version=meta["qemu_version"], version_text=meta["qemu_version_text"],
        source_package=meta["source_package"], source_version=meta["source_version"],
        suite=meta["suite"], source_sha256=dict(meta["source_sha256"]),
        wheel_sha256=dict(meta["wheel_sha256"]), patch_sha256=meta["patch_sha256"],
        patches=tuple(meta["patches"]), configure_args=tuple(meta["configure_args"]),
        cache_key=meta["cache_key"], directory=entry, cache_hit=hit,
        build_seconds=meta.get("build_seconds"), bug=meta.get("bug"),
    )


def prefetch_sources(version: str, cache: Cache, mirror: str | None = None, offline: bool = False,
                     log: Callable[[str], None] = print, progress: bool = False) -> None:
    """Fetch (and verify) every pinned input of a build into the cache, without building."""
    lock = load_qemu_lock(version)
    paths = _fetch_sources(lock, cache, mirror, offline, log, progress)
    _check_dsc(lock, paths)
    _fetch_wheels(lock, cache, offline, log)


def build_patched_qemu(version: str, cache: Cache, mirror: str | None = None, offline: bool = False,
                       log: Callable[[str], None] = print, jobs: int = 2, *,
                       lock_path: Path | None = None, keep_workdir: bool = False,
                       progress: bool = True, need_tree: bool = False) -> QemuBuild:
    """Return Debian's QEMU *version* ("10.0" | "7.2") with our patches, building it if needed.

    For a version that has a bug zoo (builder/patches/bugzoo-<version>/) the build tree is kept
    next to the entry (<cache>/qemu-builds/.tree-<key>/, about 650 MiB), where build_zoo_qemu
    rebuilds only what a defect touches; `need_tree`: a cached entry without its tree is built again."""
    lock = load_qemu_lock(version, lock_path)
    patches = patch_files(version)
    args = configure_args(version)
    key, patch_sha = cache_key(lock, patches, args)
    root = _builds_root(cache)
    entry = root / key
    meta = _load_cached(entry, key, need_tree)
    if meta is not None:
        return _result(entry, meta, hit=True)

    root.mkdir(parents=True, exist_ok=True)
    keep_tree = bool(zoo_bugs(version))
    with open(root / f".lock-{key}", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # another process may be building the same key
        meta = _load_cached(entry, key, need_tree)
        if meta is not None:
            return _result(entry, meta, hit=True)
        if entry.exists():  # incomplete or corrupted, or without the tree asked for: rebuild
            shutil.rmtree(entry, ignore_errors=True)
        check_build_deps(version)
        t0 = time.monotonic()
        paths = _fetch_sources(lock, cache, mirror, offline, log, progress)
        _check_dsc(lock, paths)
        wheels = _fetch_wheels(lock, cache, offline, log)
        if keep_tree:  # a fixed place: the meson build directory records its absolute paths
            work = root / f".tree-{key}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
        else:
            work = Path(tempfile.mkdtemp(prefix=f".work-{version}-", dir=root))
        logfile = work / "build.log"
        ok = False
        try:
            src = _unpack(lock, paths, wheels, patches, work, logfile, log)
            build = src / "build"
            build.mkdir()
            log(f"configuring QEMU {version} ({' '.join(args)})")
            _run_logged([str(src / "configure"), *args], build, logfile, "configure")
            log(f"building qemu-system-arm with ninja -j{jobs} (log {logfile})")
            _ninja(build, jobs, logfile, log)
            staged = work / "install"
            (staged / "bin").mkdir(parents=True)
            binary = staged / "bin" / "qemu-system-arm"
            shutil.copy2(build / "qemu-system-arm", binary)
            qver, qtext = _probe(binary)
            shutil.copyfile(logfile, staged / "build.log")
            meta = {
                "schema": BUILD_SCHEMA,
                "cache_key": key,
                "qemu_version": qver,
                "qemu_version_text": qtext,
                "source_package": lock.package,
                "source_version": lock.version,
                "suite": lock.suite,
                "source_sha256": {f.name: f.sha256 for f in lock.files},
                "wheel_sha256": {name: sha for _, name, sha in lock.wheels},
                "patch_sha256": patch_sha,
                "patches": [p.name for p in patches],
                "patch_file_sha256": {p.name: sha256_file(p) for p in patches},
                "configure_args": args,
                "binary_sha256": sha256_file(binary),
                "build_seconds": round(time.monotonic() - t0, 1),
                "built_at": int(time.time()),
            }
            if keep_tree:
                meta["source_tree"] = str(src)
            (staged / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(staged, entry)
            ok = True
        finally:
            if ok and not keep_workdir and not keep_tree:
                shutil.rmtree(work, ignore_errors=True)
            elif not ok:
                log(f"QEMU build failed; work tree kept in {work}")
        log(f"QEMU {meta['qemu_version']} with -savedirtylog: {entry / 'bin' / 'qemu-system-arm'} "
            f"(built in {meta['build_seconds']:.0f} s)")
        return _result(entry, meta, hit=False)


# --------------------------------------------------------------------------
# the bug zoo: one defect each, built incrementally from the kept tree


def zoo_dir(version: str) -> Path:
    return PATCH_ROOT / f"bugzoo-{version}"


def zoo_bugs(version: str) -> list[str]:
    """The defects of the bug zoo for `version` (builder/patches/bugzoo-<version>/NAME.patch)."""
    return sorted(p.stem for p in zoo_dir(version).glob("*.patch"))


def zoo_patch(version: str, bug: str) -> Path:
    bugs = zoo_bugs(version)
    if bug not in bugs:
        raise BuildInputError(f"--qemu-bug {bug}: no such defect in the QEMU {version} bug zoo"
                              + (f" (one of: {', '.join(bugs)})" if bugs else " (it has none)"))
    return zoo_dir(version) / f"{bug}.patch"


def zoo_header(version: str, bug: str) -> str:
    """What the defect re-creates: the patch's text before its diff."""
    text = zoo_patch(version, bug).read_text()
    return text.split("\n--- a/", 1)[0].strip()


def build_zoo_qemu(version: str, bug: str, cache: Cache, mirror: str | None = None, offline: bool = False,
                   log: Callable[[str], None] = print, jobs: int = 2, progress: bool = True) -> QemuBuild:
    """The patched QEMU with one bug-zoo defect: its patch applied to the patched build's kept tree,
    ninja rebuilding what it touches (seconds to a minute), the binary copied into its own cache
    entry (key: the patched build's key + the defect's patch), then the patch reversed. Variants
    of one tree are built one at a time (flock)."""
    patch = zoo_patch(version, bug)
    base = build_patched_qemu(version, cache, mirror, offline, log, jobs, progress=progress, need_tree=True)
    root = _builds_root(cache)
    base_meta = json.loads((base.directory / "build.json").read_text())
    patch_sha = sha256_file(patch)
    key = hashlib.sha256(json.dumps({"base": base.cache_key, "bug": bug, "patch": patch_sha, "recipe": RECIPE},
                                    sort_keys=True).encode()).hexdigest()
    entry = root / key
    meta = _load_cached(entry, key)
    if meta is not None:
        return _result(entry, meta, hit=True)
    with open(root / f".lock-tree-{base.cache_key}", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        meta = _load_cached(entry, key)
        if meta is not None:
            return _result(entry, meta, hit=True)
        shutil.rmtree(entry, ignore_errors=True)
        t0 = time.monotonic()
        src = Path(base_meta["source_tree"])
        staged = Path(tempfile.mkdtemp(prefix=f".zoo-{bug}-", dir=root))
        logfile = staged / "build.log"
        ok = False
        try:
            log(f"bug zoo: {bug} on QEMU {version} (incremental build in {src / 'build'})")
            _apply(src, patch, "-p1", logfile, f"bug-zoo patch {patch.name}")
            try:
                _ninja(src / "build", jobs, logfile, log)
                (staged / "bin").mkdir()
                binary = staged / "bin" / "qemu-system-arm"
                shutil.copy2(src / "build" / "qemu-system-arm", binary)
            finally:  # the tree goes back to the patched QEMU's sources (ninja recompiles them next time)
                _run_logged(["patch", "-R", "-p1", "--batch", "--no-backup-if-mismatch", "-i", str(patch)], src,
                            logfile, f"reversing bug-zoo patch {patch.name}")
            qver, qtext = _probe(binary)
            meta = dict(base_meta, cache_key=key, qemu_version=qver, qemu_version_text=qtext, bug=bug,
                        bug_patch_sha256=patch_sha, base_cache_key=base.cache_key,
                        patches=[*base_meta["patches"], f"bugzoo-{version}/{patch.name}"],
                        binary_sha256=sha256_file(binary), build_seconds=round(time.monotonic() - t0, 1),
                        built_at=int(time.time()))
            meta.pop("source_tree", None)
            (staged / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(staged, entry)
            ok = True
        finally:
            if not ok:
                log(f"bug-zoo build failed; log kept in {logfile}")
    log(f"QEMU {qver} with bug-zoo defect {bug}: {entry / 'bin' / 'qemu-system-arm'} "
        f"(built in {meta['build_seconds']:.0f} s)")
    return _result(entry, meta, hit=False)


# --------------------------------------------------------------------------
# re-pinning


def refresh_qemu_lock(version: str, cache: Cache, mirror: str | None = None,
                      lock_path: Path | None = None, log: Callable[[str], None] = print) -> None:
    """Re-pin *version* to the current source package of its suite (signed Sources)."""
    path = Path(lock_path or DEFAULT_QEMU_LOCK)
    data = json.loads(path.read_text(encoding="utf-8"))
    entry = data["versions"][version]
    archive = Archive(_mirror_for(entry["suite"], mirror), entry["suite"], cache,
                      component=entry.get("component", "main"))
    para = _sources_paragraph(archive, entry["package"], None)
    upstream = re.sub(r"^\d+:", "", para["Version"]).split("+")[0]
    if not (upstream == version or upstream.startswith(version + ".")):
        raise BuildInputError(f"{entry['suite']} now has {entry['package']} {para['Version']}, "
                              f"not a QEMU {version}")
    old = entry["version"]
    entry["version"] = para["Version"]
    entry["directory"] = para["Directory"]
    entry["files"] = [dataclasses.asdict(f) for f in _files_of(para)]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    log(f"QEMU {version}: {entry['package']} {para['Version']}" + (f" (was {old})" if old != para["Version"] else ""))


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m builder.qemu_build",
                                 description="Build Debian's QEMU with the -savedirtylog patch.")
    ap.add_argument("--version", default="10.0", choices=SUPPORTED)
    ap.add_argument("--mirror")
    ap.add_argument("--offline", action="store_true")
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("--jobs", "-j", type=int, default=2)
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--bug", help="build the patched QEMU with this bug-zoo defect (builder/patches/bugzoo-VERSION/)")
    ap.add_argument("--refresh-lock", action="store_true",
                    help="re-pin the version to its suite's current source package, then exit")
    a = ap.parse_args(argv)
    cache = Cache(a.cache_dir)
    try:
        if a.refresh_lock:
            refresh_qemu_lock(a.version, cache, a.mirror, log=lambda m: print(m, file=sys.stderr))
            return 0
        if a.bug:
            b = build_zoo_qemu(a.version, a.bug, cache, a.mirror, a.offline,
                               log=lambda m: print(m, file=sys.stderr), jobs=a.jobs)
        else:
            b = build_patched_qemu(a.version, cache, a.mirror, a.offline,
                                   log=lambda m: print(m, file=sys.stderr), jobs=a.jobs,
                                   keep_workdir=a.keep_workdir)
    except BuildError as e:
        print(f"qemu_build: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    print(b.qemu_system_arm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
