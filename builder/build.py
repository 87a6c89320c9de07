"""The Debian engine: pinned Debian packages + dirtyram-src -> the guest artifacts + manifest.json.

Outputs are assembled in a staging directory next to the output directory and moved into place
only when all of them exist, manifest last, so an interrupted or failed build never leaves a
half-written artifact set behind.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from . import project
from .archive import extract_members
from .cache import Cache
from .dirtyram import build_dirtyram, compiler_version
from .errors import BuildInputError
from .initrd import DIRTYRAM_PATH, build_initrd
from .machines import MACHINES
from .manifest import MANIFEST_SCHEMA, file_entries, manifest_text
from .lock import ARCH_LOCKS, DEFAULT_LOCK_PATH, fetch_pinned, load_lock, lock_path_for

PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the directory holding builder/
INIT_SCRIPT = Path(__file__).resolve().parent / "guest" / "init"


@dataclasses.dataclass(frozen=True)
class ArchBuild:
    """What `dirtylog build --arch <arch>` makes and how the guest boots."""

    arch: str  # armv7, aarch64, x86_64 (builder.elfcheck.ARCHES)
    cross_prefix: str  # "" = the host's gcc
    kernel: str  # output name; also the kernel's member key in the lock
    dtb: str | None  # output name of the device tree; None: QEMU makes it (the lock's "dtb" member)
    workload: str  # output name of the dirtyram binary
    machine: str  # guest.machine in the manifest: a key of builder.machines.MACHINES
    min_mem_mb: int
    kernel_format: str
    initrd: str = "initrd.cpio-dirtyram.gz"

    @property
    def console(self) -> str:
        """The guest's serial console, from the machine table."""
        return MACHINES[self.machine].console

    @property
    def artifact_roles(self) -> dict[str, str]:
        """name in the output directory -> role the verifier knows it by (manifest order)."""
        roles = {self.kernel: "kernel"}
        if self.dtb:
            roles[self.dtb] = "dtb"
        roles[self.initrd] = "initrd"
        roles[self.workload] = "workload"
        return roles


ARCH_BUILDS: dict[str, ArchBuild] = {
    # The 2014 guest: Debian's armmp-lpae kernel on a vexpress CoreTile A15x2.
    "armv7": ArchBuild("armv7", "arm-linux-gnueabihf-", kernel="zImage", dtb="guest_a15x2.dtb",
                       workload="dirtyram.arm", machine="vexpress-a15",
                       min_mem_mb=64,  # Debian's armmp-lpae kernel does not boot in 32 MiB
                       kernel_format="ARM zImage"),
    # Debian's signed arm64 vmlinuz is an uncompressed arm64 Image (magic "ARM\x64" at 0x38)
    # with an EFI/PE stub carrying the Secure Boot signature; QEMU -kernel boots it as is.
    "aarch64": ArchBuild("aarch64", "aarch64-linux-gnu-", kernel="Image", dtb=None,
                         workload="dirtyram.aarch64", machine="virt-aarch64",
                         # measured (QEMU 7.2 TCG, -smp 2): OOM panic at 56 MiB, boots at 64
                         min_mem_mb=80, kernel_format="arm64 Image (uncompressed, EFI-signed)"),
    "x86_64": ArchBuild("x86_64", "", kernel="bzImage", dtb=None, workload="dirtyram.x86_64",
                        machine="q35",
                        min_mem_mb=96,  # measured (QEMU 7.2 TCG, q35): OOM at 80 MiB, boots at 88
                        kernel_format="x86 bzImage (EFI-signed)"),
}
ARCHES = tuple(ARCH_BUILDS)

# armv7's, under their historical names
CROSS_PREFIX = ARCH_BUILDS["armv7"].cross_prefix
ARTIFACT_ROLES = ARCH_BUILDS["armv7"].artifact_roles
# Every name any architecture writes: a build removes the other architectures' leftovers.
_ALL_ARTIFACT_NAMES = sorted({n for b in ARCH_BUILDS.values() for n in b.artifact_roles})


def arch_build(arch: str) -> ArchBuild:
    try:
        return ARCH_BUILDS[arch]
    except KeyError:
        raise BuildInputError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCH_BUILDS)}") from None


def publish_staged(staging: Path, out: Path, names: list[str], manifest: dict) -> None:
    """Move the files `names` from `staging` into `out`, then their manifest, last: a reader of
    `out` never sees a manifest describing files that are not there yet (or old ones)."""
    (staging / "manifest.json").write_text(manifest_text(manifest))
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # an old manifest must not describe new files
    for name in _ALL_ARTIFACT_NAMES:  # another architecture's files must not linger beside these
        if name not in names and (out / name).is_file():
            (out / name).unlink()
    for name in names:
        os.replace(staging / name, out / name)
    os.replace(staging / "manifest.json", out / "manifest.json")


def build_artifacts(out: Path, *, arch: str = "armv7", offline: bool = False, mirror: str | None = None,
                    cache_dir: Path | None = None, lock_path: Path | None = None,
                    log=lambda msg: None) -> dict:
    """Build the guest artifacts for `arch` (armv7, aarch64, x86_64) into `out`; returns the manifest
    written there. The lock defaults to the architecture's (builder/locks/bookworm-<debian arch>.json)."""
    spec = arch_build(arch)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BuildInputError(f"--out {out} exists and is not a directory")
    lock = load_lock(lock_path if lock_path is not None else lock_path_for(arch))
    deb_arch = ARCH_LOCKS[arch][0]
    if lock.arch != deb_arch:
        raise BuildInputError(f"lock {lock.path} pins Debian {lock.arch} packages; --arch {arch} needs {deb_arch}")
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", lock.source_date_epoch))
    cache = Cache(cache_dir)
    log(f"fetching pinned Debian packages ({lock.suite}/{lock.arch}){' from the cache only' if offline else ''}")
    debs = fetch_pinned(lock, cache, mirror=mirror, offline=offline, progress=sys.stderr.isatty())
    kernel_pkg, busybox_pkg = lock.package("kernel"), lock.package("busybox")
    # lock member key -> output name
    kernel_keys = {spec.kernel: spec.kernel, **({"dtb": spec.dtb} if spec.dtb else {})}
    missing = [k for k in kernel_keys if k not in kernel_pkg.members]
    if missing:
        raise BuildInputError(f"lock {lock.path}: kernel package has no member {', '.join(map(repr, missing))}")
    kernel_files = extract_members(debs[kernel_pkg.name], [kernel_pkg.members[k] for k in kernel_keys])
    busybox = extract_members(debs[busybox_pkg.name], [busybox_pkg.members["busybox"]])[busybox_pkg.members["busybox"]]
    compiler = compiler_version(spec.cross_prefix)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        log(f"compiling dirtyram for {arch} (static) with {spec.cross_prefix}gcc")
        dirtyram = build_dirtyram(project.path("dirtyram-src"), staging, cross_prefix=spec.cross_prefix, arch=arch)
        if dirtyram.name != spec.workload:
            dirtyram = Path(shutil.move(dirtyram, staging / spec.workload))
        for key, name in kernel_keys.items():
            (staging / name).write_bytes(kernel_files[kernel_pkg.members[key]])
        log(f"packing {spec.initrd}")
        build_initrd(staging / spec.initrd, busybox=busybox, dirtyram=dirtyram.read_bytes(),
                     init_script=INIT_SCRIPT.read_bytes(), mtime=epoch, arch=arch)
        roles = spec.artifact_roles
        files = file_entries(staging, roles)
        reproducer = "dirtylog build" + ("" if arch == "armv7" else f" --arch {arch}")
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "engine": "debian",
            "runtime": "host",
            "arch": arch,
            "guest": {
                "machine": spec.machine,
                "min_mem_mb": spec.min_mem_mb,
                "console": spec.console,
                "workload_cmdline_key": "dirtylog.workload",
                "page_header_format": 1,
                # where /init finds dirtyram (its default $DIRTYRAM); the same name for every arch
                "workload_path": "/" + DIRTYRAM_PATH,
                "kernel_format": spec.kernel_format,
            },
            "files": files,
            "sources": {
                "lock": {"path": _repo_relative(lock.path or DEFAULT_LOCK_PATH),
                         "suite": lock.suite, "arch": lock.arch},
                "packages": [{"role": p.role, "name": p.name, "version": p.version,
                              "filename": p.filename, "sha256": p.sha256, "members": p.members}
                             for p in lock.packages.values()],
                "dirtyram_src": "dirtyram-src",
                "dirtylog_git_commit": project.git_commit(),
                "dirtylog_version": project.version(),
            },
            "tools": {
                "cross_compiler": compiler,
                "python": platform.python_version(),
                "host": f"{platform.system()} {platform.machine()}",
            },
            "source_date_epoch": epoch,
            "reproducer": reproducer + " --out " + shlex.quote(str(out)) + " --offline" + project.reproducer_note(),
        }
        publish_staged(staging, out, list(roles), manifest)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _repo_relative(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(PACKAGE_PARENT))
    except ValueError:  # a lock outside the package (lock_path=...)
        return str(path)
