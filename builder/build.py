"""The Debian engine: pinned Debian packages + dirtyram-src -> the guest artifacts + manifest.json.

Outputs are assembled in a staging directory next to the output directory and moved into place
only when all of them exist, manifest last, so an interrupted or failed build never leaves a
half-written artifact set behind.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .archive import extract_members
from .cache import Cache, sha256_file
from .dirtyram import build_dirtyram, compiler_version
from .errors import BuildInputError
from .initrd import build_initrd
from .lock import DEFAULT_LOCK_PATH, fetch_pinned, load_lock

MANIFEST_SCHEMA = "dirtylog-artifacts/1"
REPO_ROOT = Path(__file__).resolve().parent.parent
DIRTYRAM_SRC = REPO_ROOT / "dirtyram-src"
INIT_SCRIPT = Path(__file__).resolve().parent / "guest" / "init"
CROSS_PREFIX = "arm-linux-gnueabihf-"

# name in the output directory -> role the verifier knows it by
ARTIFACT_ROLES = {
    "zImage": "kernel",
    "guest_a15x2.dtb": "dtb",
    "initrd.cpio-dirtyram.gz": "initrd",
    "dirtyram.arm": "workload",
}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def build_artifacts(out: Path, *, offline: bool = False, mirror: str | None = None,
                    cache_dir: Path | None = None, lock_path: Path | None = None,
                    log=lambda msg: None) -> dict:
    """Build the armv7 guest artifacts into `out`; returns the manifest written there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BuildInputError(f"--out {out} exists and is not a directory")
    lock = load_lock(lock_path)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", lock.source_date_epoch))
    cache = Cache(cache_dir)
    log(f"fetching pinned Debian packages ({lock.suite}/{lock.arch}){' from the cache only' if offline else ''}")
    debs = fetch_pinned(lock, cache, mirror=mirror, offline=offline, progress=sys.stderr.isatty())
    kernel_pkg, busybox_pkg = lock.package("kernel"), lock.package("busybox")
    kernel_files = extract_members(debs[kernel_pkg.name], [kernel_pkg.members["zImage"], kernel_pkg.members["dtb"]])
    busybox = extract_members(debs[busybox_pkg.name], [busybox_pkg.members["busybox"]])[busybox_pkg.members["busybox"]]

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        log("cross-compiling dirtyram for armv7 hard-float (static)")
        dirtyram = build_dirtyram(DIRTYRAM_SRC, staging, cross_prefix=CROSS_PREFIX)
        if dirtyram.name != "dirtyram.arm":
            dirtyram = Path(shutil.move(dirtyram, staging / "dirtyram.arm"))
        (staging / "zImage").write_bytes(kernel_files[kernel_pkg.members["zImage"]])
        (staging / "guest_a15x2.dtb").write_bytes(kernel_files[kernel_pkg.members["dtb"]])
        log("packing initrd.cpio-dirtyram.gz")
        build_initrd(staging / "initrd.cpio-dirtyram.gz", busybox=busybox, dirtyram=dirtyram.read_bytes(),
                     init_script=INIT_SCRIPT.read_bytes(), mtime=epoch)
        files = [{"name": name, "role": role, "sha256": sha256_file(staging / name),
                  "size": (staging / name).stat().st_size}
                 for name, role in ARTIFACT_ROLES.items()]
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "engine": "debian",
            "runtime": "host",
            "arch": "armv7",
            "guest": {
                "machine": "vexpress-a15",
                "min_mem_mb": 64,  # Debian's armmp-lpae kernel does not boot in 32 MiB
                "console": "ttyAMA0",
                "workload_cmdline_key": "dirtylog.workload",
                "page_header_format": 1,
            },
            "files": files,
            "sources": {
                "lock": {"path": str((lock.path or DEFAULT_LOCK_PATH).relative_to(REPO_ROOT)),
                         "suite": lock.suite, "arch": lock.arch},
                "packages": [{"role": p.role, "name": p.name, "version": p.version,
                              "filename": p.filename, "sha256": p.sha256, "members": p.members}
                             for p in lock.packages.values()],
                "dirtyram_src": str(DIRTYRAM_SRC.relative_to(REPO_ROOT)),
                "dirtylog_git_commit": _git_commit(),
            },
            "tools": {
                "cross_compiler": compiler_version(CROSS_PREFIX),
                "python": platform.python_version(),
                "host": f"{platform.system()} {platform.machine()}",
            },
            "source_date_epoch": epoch,
            "reproducer": "dirtylog build --out " + shlex.quote(str(out)) + " --offline",
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").unlink(missing_ok=True)  # an old manifest must not describe new files
        for name in ARTIFACT_ROLES:
            os.replace(staging / name, out / name)
        os.replace(staging / "manifest.json", out / "manifest.json")
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
