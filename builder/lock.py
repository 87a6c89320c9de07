"""The lock file: exact, hash-pinned Debian packages the guest is built from.

``builder/locks/bookworm-armhf.json`` pins, per role (``kernel``, ``busybox``),
the package name, version, pool filename, size and SHA-256, plus the names of
the files inside the .deb the build extracts (``members``), and one
``source_date_epoch`` used for reproducible timestamps.

``fetch_pinned`` returns the verified .deb files, from the cache if possible.
Before downloading a .deb it authenticates the pin against the archive
(signed InRelease -> Packages.xz -> entry) so the lock cannot silently drift
from what Debian signed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from debian.debian_support import Version

from builder.apt_sources import find_mirror
from builder.archive import (
    DEFAULT_KEYRING,
    Archive,
    PackageNotFoundError,
    PackageRecord,
    list_members,
)
from builder.cache import Cache
from builder.errors import BuildInputError, CacheMissError, IntegrityError

__all__ = [
    "ARCH_LOCKS",
    "DEFAULT_LOCK_PATH",
    "LOCKS_DIR",
    "ROLE_SPECS",
    "ROLE_SPECS_BY_ARCH",
    "LockChange",
    "Lock",
    "LockedPackage",
    "RoleSpec",
    "fetch_pinned",
    "load_lock",
    "lock_path_for",
    "refresh_all_locks",
    "refresh_lock",
]

LOCKS_DIR = Path(__file__).resolve().parent / "locks"
# guest architecture (dirtylog's name) -> (Debian architecture, its lock file)
ARCH_LOCKS: dict[str, tuple[str, Path]] = {
    "armv7": ("armhf", LOCKS_DIR / "bookworm-armhf.json"),
    "aarch64": ("arm64", LOCKS_DIR / "bookworm-arm64.json"),
    "x86_64": ("amd64", LOCKS_DIR / "bookworm-amd64.json"),
}
DEFAULT_LOCK_PATH = ARCH_LOCKS["armv7"][1]
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class LockedPackage:
    role: str  # "kernel", "busybox"
    name: str
    version: str
    filename: str  # pool path relative to the mirror
    size: int
    sha256: str
    members: dict[str, str]  # e.g. {"zImage": "boot/vmlinuz-...", "dtb": "usr/lib/..."}

    def to_record(self, arch: str) -> PackageRecord:
        return PackageRecord(self.name, self.version, arch, self.filename, self.size, self.sha256)


@dataclasses.dataclass(frozen=True)
class Lock:
    suite: str
    arch: str
    component: str
    source_date_epoch: int
    packages: dict[str, LockedPackage]  # by role
    path: Path | None = None

    def package(self, role: str) -> LockedPackage:
        try:
            return self.packages[role]
        except KeyError:
            raise BuildInputError(
                f"lock {self.path} has no package for role {role!r} "
                f"(has: {', '.join(sorted(self.packages))})"
            ) from None

    def to_json(self) -> dict:
        return {
            "suite": self.suite,
            "arch": self.arch,
            "component": self.component,
            "source_date_epoch": self.source_date_epoch,
            "packages": {
                role: {
                    "name": p.name,
                    "version": p.version,
                    "filename": p.filename,
                    "size": p.size,
                    "sha256": p.sha256,
                    "members": dict(sorted(p.members.items())),
                }
                for role, p in sorted(self.packages.items())
            },
        }


# --------------------------------------------------------------------------
# Loading


def _bad(path: Path, msg: str) -> BuildInputError:
    return BuildInputError(f"lock file {path}: {msg}")


def _str(d: dict, key: str, path: Path, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise _bad(path, f"{where}: {key!r} must be a non-empty string")
    return v


def _member_name(v: object, path: Path, where: str) -> str:
    if not isinstance(v, str) or not v or v.startswith("/") or ".." in v.split("/"):
        raise _bad(path, f"{where}: member names must be relative paths, got {v!r}")
    return v.removeprefix("./")


def load_lock(path: Path | str | None = None) -> Lock:
    """Read and validate a lock file (default: the bookworm/armhf one)."""
    path = Path(path) if path is not None else DEFAULT_LOCK_PATH
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _bad(path, "not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"unreadable: {e}") from e
    if not isinstance(data, dict):
        raise _bad(path, "top level must be an object")
    sde = data.get("source_date_epoch")
    if not isinstance(sde, int) or isinstance(sde, bool) or sde < 0:
        raise _bad(path, "'source_date_epoch' must be a non-negative integer")
    pkgs_in = data.get("packages")
    if not isinstance(pkgs_in, dict):
        raise _bad(path, "'packages' must be an object keyed by role")
    packages = {}
    for role, p in pkgs_in.items():
        where = f"packages.{role}"
        if not isinstance(p, dict):
            raise _bad(path, f"{where} must be an object")
        size = p.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise _bad(path, f"{where}: 'size' must be a positive integer")
        sha = _str(p, "sha256", path, where).lower()
        if not _HEX64.fullmatch(sha):
            raise _bad(path, f"{where}: 'sha256' must be 64 hex digits")
        members = p.get("members", {})
        if not isinstance(members, dict):
            raise _bad(path, f"{where}: 'members' must be an object")
        packages[role] = LockedPackage(
            role=role,
            name=_str(p, "name", path, where),
            version=_str(p, "version", path, where),
            filename=_str(p, "filename", path, where),
            size=size,
            sha256=sha,
            members={str(k): _member_name(v, path, where) for k, v in members.items()},
        )
    return Lock(
        suite=_str(data, "suite", path, "top level"),
        arch=_str(data, "arch", path, "top level"),
        component=data.get("component", "main"),
        source_date_epoch=sde,
        packages=packages,
        path=path,
    )


# --------------------------------------------------------------------------
# Fetching


def fetch_pinned(
    lock: Lock,
    cache: Cache,
    mirror: str | None = None,
    offline: bool = False,
    progress: bool = True,
    *,
    keyring: Path = DEFAULT_KEYRING,
    sources_dir: Path = Path("/etc/apt"),
) -> dict[str, Path]:
    """Verified local paths of all pinned .debs, keyed by package name.

    Offline: only the cache is used; CacheMissError lists every missing package.
    Online: cached files are used as they are (their hash is re-verified); for
    each missing one the pin is first authenticated against the archive's
    signed index, then the pool file is downloaded through the cache.  The
    mirror defaults to the one in the apt configuration for the lock's suite.
    """
    paths: dict[str, Path] = {}
    missing: list[LockedPackage] = []
    for p in lock.packages.values():
        found = cache.get(p.sha256)
        if found is None:
            missing.append(p)
        else:
            paths[p.name] = found
    if not missing:
        return paths
    if offline:
        listing = "; ".join(f"{p.name} {p.version} (sha256 {p.sha256})" for p in missing)
        raise CacheMissError(
            f"--offline: not in the cache {cache.root}: {listing}; run once without --offline"
        )
    if mirror is None:
        mirror = find_mirror(lock.suite, sources_dir)
    archive = Archive(mirror, lock.suite, cache, keyring=keyring,
                      component=lock.component, progress=progress)
    for p in missing:
        _authenticate_pin(archive, lock, p)
    for p in missing:
        paths[p.name] = archive.download(p.to_record(lock.arch))
    return paths


def _authenticate_pin(archive: Archive, lock: Lock, p: LockedPackage) -> None:
    hint = "run `dirtylog lock --refresh` to re-pin to what the archive signs"
    try:
        rec = archive.resolve(p.name, lock.arch, version=p.version)
    except PackageNotFoundError:
        raise IntegrityError(
            f"the lock {lock.path} and the archive disagree: {p.name} {p.version} "
            f"({lock.arch}) is not in {archive.mirror} {lock.suite}/{lock.component}; {hint}"
        ) from None
    diffs = [
        f"{field} lock={getattr(p, field)} archive={getattr(rec, field)}"
        for field in ("sha256", "size", "filename")
        if getattr(p, field) != getattr(rec, field)
    ]
    if diffs:
        raise IntegrityError(
            f"the lock {lock.path} and the archive disagree on {p.name} {p.version}: "
            f"{'; '.join(diffs)}; {hint}"
        )


# --------------------------------------------------------------------------
# Refreshing


@dataclasses.dataclass(frozen=True)
class RoleSpec:
    """How refresh_lock picks a role's package and the files the build needs.

    *package* is a regular expression matched against the whole package name.
    If it has a group, it must capture a dotted/dashed number (a kernel ABI like
    ``6.1.0-50``) and the highest ABI wins before the highest version.
    *members* maps a key to a glob over the .deb's file names; each glob must
    match exactly one file.
    """

    package: str
    members: dict[str, str]


_BUSYBOX_SPEC = RoleSpec(package=r"busybox-static", members={"busybox": "bin/busybox"})

# Per Debian architecture.  The kernel regexes take the real image package,
# e.g. linux-image-6.1.0-50-armmp-lpae / -arm64 / -amd64; not the metapackage
# (linux-image-arm64), the -dbg package, the -unsigned twin of a signed image
# (arm64, amd64: same kernel, without the Secure Boot signature) nor the
# -cloud-/-rt- flavours.  Member keys name the output file they become.
ROLE_SPECS_BY_ARCH: dict[str, dict[str, RoleSpec]] = {
    "armhf": {
        "busybox": _BUSYBOX_SPEC,
        "kernel": RoleSpec(
            package=r"linux-image-(\d+(?:\.\d+)*-\d+)-armmp-lpae",
            members={
                "zImage": "boot/vmlinuz-*",
                "dtb": "usr/lib/linux-image-*/vexpress-v2p-ca15-tc1.dtb",
            },
        ),
    },
    "arm64": {
        "busybox": _BUSYBOX_SPEC,
        # QEMU's virt machine makes the device tree itself: no dtb member.
        "kernel": RoleSpec(package=r"linux-image-(\d+(?:\.\d+)*-\d+)-arm64",
                           members={"Image": "boot/vmlinuz-*"}),
    },
    "amd64": {
        "busybox": _BUSYBOX_SPEC,
        "kernel": RoleSpec(package=r"linux-image-(\d+(?:\.\d+)*-\d+)-amd64",
                           members={"bzImage": "boot/vmlinuz-*"}),
    },
}
# The armhf specs (the 2014 guest); kept under their historical name.
ROLE_SPECS: dict[str, RoleSpec] = ROLE_SPECS_BY_ARCH["armhf"]


def lock_path_for(arch: str) -> Path:
    """The lock file of a guest architecture (armv7, aarch64, x86_64)."""
    try:
        return ARCH_LOCKS[arch][1]
    except KeyError:
        raise BuildInputError(
            f"unknown architecture {arch!r}; expected one of {', '.join(ARCH_LOCKS)}"
        ) from None


def _pick(records: list[PackageRecord], rx: re.Pattern) -> PackageRecord:
    def key(r: PackageRecord):
        m = rx.fullmatch(r.name)
        abi = tuple(int(x) for x in re.split(r"[.-]", m.group(1))) if m and rx.groups else ()
        return (abi, Version(r.version))

    return max(records, key=key)


def _members_for(deb: Path, spec: RoleSpec, name: str) -> dict[str, str]:
    names = list_members(deb)
    out = {}
    for key, pattern in spec.members.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if len(hits) != 1:
            raise IntegrityError(
                f"{name}: expected exactly one file matching {pattern!r} in the .deb, "
                f"found {hits or 'none'}"
            )
        out[key] = hits[0]
    return out


def refresh_lock(
    path: Path | str | None,
    mirror: str | None = None,
    *,
    cache: Cache | None = None,
    keyring: Path = DEFAULT_KEYRING,
    reset_source_date_epoch: bool = False,
    suite: str | None = None,
    arch: str | None = None,
    specs: dict[str, RoleSpec] | None = None,
    progress: bool = True,
    sources_dir: Path = Path("/etc/apt"),
    log: Callable[[str], None] | None = None,
) -> Lock:
    """Re-pin every role to the current package in the suite and rewrite the lock.

    The packages are resolved through the verified archive index and
    downloaded (into the cache) to record the exact member names.  The
    existing ``source_date_epoch`` is kept unless *reset_source_date_epoch*
    or the lock is new; then it becomes the InRelease ``Date``.  A new lock
    file needs *suite* and *arch*.
    """
    path = Path(path) if path is not None else DEFAULT_LOCK_PATH
    cache = cache if cache is not None else Cache()
    old = load_lock(path) if path.exists() else None
    if old is None and (suite is None or arch is None):
        raise BuildInputError(f"lock file {path} does not exist; give suite and arch to create it")
    suite = suite or old.suite
    arch = arch or old.arch
    if specs is None:
        if arch not in ROLE_SPECS_BY_ARCH:
            raise BuildInputError(
                f"no package specs for Debian architecture {arch!r} "
                f"(known: {', '.join(ROLE_SPECS_BY_ARCH)}); pass specs"
            )
        specs = ROLE_SPECS_BY_ARCH[arch]
    component = old.component if old else "main"
    if mirror is None:
        mirror = find_mirror(suite, sources_dir)
    archive = Archive(mirror, suite, cache, keyring=keyring, component=component,
                      progress=progress)

    packages = {}
    for role, spec in specs.items():
        rx = re.compile(spec.package)
        records = archive.find(arch, lambda n, rx=rx: rx.fullmatch(n) is not None)
        if not records:
            raise PackageNotFoundError(
                f"no package matching {spec.package!r} ({arch}) in {mirror} {suite}/{component}"
            )
        rec = _pick(records, rx)
        deb = archive.download(rec)
        packages[role] = LockedPackage(
            role=role, name=rec.name, version=rec.version, filename=rec.filename,
            size=rec.size, sha256=rec.sha256, members=_members_for(deb, spec, rec.name),
        )
        if log:
            prev = old.packages.get(role) if old else None
            was = f" (was {prev.name} {prev.version})" if prev and prev.sha256 != rec.sha256 else ""
            log(f"{role}: {rec.name} {rec.version}{was}")

    if old is None or reset_source_date_epoch:
        sde = archive.release_date()
    else:
        sde = old.source_date_epoch
    lock = Lock(suite=suite, arch=arch, component=component, source_date_epoch=sde,
                packages=packages, path=path)
    _write_json_atomic(path, lock.to_json())
    return lock


@dataclasses.dataclass(frozen=True)
class LockChange:
    """One role of one lock after refresh_all_locks; *old_* are None for a new lock or role."""

    arch: str  # guest architecture: armv7, aarch64, x86_64
    path: Path
    role: str
    name: str
    version: str
    old_name: str | None
    old_version: str | None
    changed: bool  # sha256 differs from before (or new)

    def describe(self) -> str:
        if not self.changed:
            what = "unchanged"
        elif self.old_name is None:
            what = "new"
        else:
            what = f"was {self.old_name} {self.old_version}"
        return f"{self.arch} {self.role}: {self.name} {self.version} ({what})"


def refresh_all_locks(
    mirror: str | None = None,
    log: Callable[[str], None] | None = None,
    *,
    arches: list[str] | None = None,
    suite: str = "bookworm",
    **kwargs,
) -> list[LockChange]:
    """refresh_lock for every architecture's lock (ARCH_LOCKS), armv7 first.

    A missing lock is created for *suite*; it takes the armv7 lock's
    ``source_date_epoch`` so every architecture's artifacts carry the same
    timestamps.  Extra keyword arguments (cache, keyring, progress,
    sources_dir, reset_source_date_epoch) go to refresh_lock.  Returns one
    LockChange per role and architecture.
    """
    changes: list[LockChange] = []
    shared_sde = load_lock(DEFAULT_LOCK_PATH).source_date_epoch if DEFAULT_LOCK_PATH.exists() else None
    for arch in arches or list(ARCH_LOCKS):
        deb_arch, path = ARCH_LOCKS[arch]
        old = load_lock(path) if path.exists() else None
        if log:
            log(f"refreshing {path.name} ({arch}, Debian {deb_arch})")
        lock = refresh_lock(path, mirror, suite=None if old else suite,
                            arch=None if old else deb_arch,
                            log=(lambda m, a=arch: log(f"{a} {m}")) if log else None, **kwargs)
        if old is None and shared_sde is not None and lock.source_date_epoch != shared_sde:
            lock = dataclasses.replace(lock, source_date_epoch=shared_sde)
            _write_json_atomic(path, lock.to_json())
        if arch == "armv7":
            shared_sde = lock.source_date_epoch
        for role, p in sorted(lock.packages.items()):
            prev = old.packages.get(role) if old else None
            changes.append(LockChange(
                arch=arch, path=path, role=role, name=p.name, version=p.version,
                old_name=prev.name if prev else None, old_version=prev.version if prev else None,
                changed=prev is None or prev.sha256 != p.sha256,
            ))
    return changes


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
