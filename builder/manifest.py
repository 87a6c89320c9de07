"""manifest.json, the only contract between builder and verifier (docs/manifest.md).

Written here only: `manifest_text` is the one serialisation, `file_entries` the one description of
the files, `publish_staged` (builder/build.py) puts a new manifest in place after its files, and
`amend_manifest` adds keys to a published one (the container runtime's record, the patched QEMU that
`dirtylog build --qemu patched` made). Buildroot's post-image.sh gathers its facts in shell and has
this module write the manifest (`python3 -m builder.manifest buildroot STAGE KEY=VALUE...`, standard
library only, as Buildroot's host python3 has nothing else); builder/buildroot.py reads it back and
publishes it through `publish_staged`. Read by verifier.artifacts.load_artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from builder.errors import BuildError

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "dirtylog-artifacts/1"


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=2) + "\n"


def file_entries(directory: Path, roles: dict[str, str]) -> list[dict]:
    """manifest["files"]: name, role, sha256 and size of each file in `directory`, in `roles`' order."""
    out = []
    for name, role in roles.items():
        h = hashlib.sha256()
        with open(directory / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out.append({"name": name, "role": role, "sha256": h.hexdigest(), "size": (directory / name).stat().st_size})
    return out


def buildroot_manifest(stage: Path, facts: dict[str, str]) -> dict:
    """The manifest of a Buildroot build from the facts post-image.sh gathered (strings; "" = unknown)."""
    def opt(key):
        return facts.get(key) or None
    roles = {facts["kernel"]: "kernel"}
    if facts.get("dtb"):
        roles[facts["dtb"]] = "dtb"
    roles[facts["initrd"]] = "initrd"
    roles[facts["workload"]] = "workload"
    return {
        "schema": MANIFEST_SCHEMA,
        "engine": "buildroot",
        "runtime": "host",
        "arch": facts["arch"],
        "guest": {
            "machine": facts["machine"],
            "min_mem_mb": int(facts["min_mem_mb"]),
            "reserved_mb": int(facts["reserved_mb"]),
            "console": facts["console"],
            "workload_cmdline_key": "dirtylog.workload",
            "page_header_format": 1,
            "workload_path": facts["workload_path"],
            "kernel_format": facts["kernel_format"],
        },
        "files": file_entries(stage, roles),
        "sources": {
            "buildroot": {"version": facts.get("br_version") or "unknown"},
            "defconfig": opt("defconfig"),
            "kernel": {"version": opt("kernel_version"), "release": opt("kernel_release"),
                       "tarball": (facts.get("kernel_tarball") or "").rsplit("/", 1)[-1] or None},
            "toolchain": facts["toolchain"],
            "br2_external": "buildroot-external",
            "dirtyram_src": "dirtyram-src",
            "dirtylog_git_commit": opt("git_commit"),
        },
        "tools": {"cross_compiler": opt("compiler"), "host": facts["host"]},
        "source_date_epoch": int(facts["epoch"]) if facts.get("epoch") else None,
        "reproducer": facts["reproducer"],
    }


def main(argv: list[str]) -> int:
    """`python3 -m builder.manifest buildroot STAGE KEY=VALUE...`: write STAGE/manifest.json."""
    if len(argv) < 2 or argv[0] != "buildroot" or not all("=" in a for a in argv[2:]):
        print("usage: python3 -m builder.manifest buildroot STAGE KEY=VALUE...", file=sys.stderr)
        return 2
    stage = Path(argv[1])
    facts = dict(a.split("=", 1) for a in argv[2:])
    try:
        text = manifest_text(buildroot_manifest(stage, facts))
    except (KeyError, ValueError, OSError) as exc:
        print(f"builder.manifest: cannot write the Buildroot manifest: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    (stage / MANIFEST_NAME).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def amend_manifest(out: Path, updates: dict, what: str = "build") -> dict:
    """Merge `updates` (top-level keys) into OUT/manifest.json atomically, keeping its owner and mode."""
    path = out / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BuildError(f"{what}: no readable {path}: {e}") from None
    manifest.update(updates)
    st = path.stat()
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
    tmp.write_text(manifest_text(manifest))
    os.chmod(tmp, st.st_mode & 0o7777)
    if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
        try:  # keep it the build user's, like the other files
            os.chown(tmp, st.st_uid, st.st_gid)
        except OSError:
            pass
    os.replace(tmp, path)
    return manifest
