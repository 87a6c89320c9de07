"""manifest.json, the only contract between builder and verifier (docs/manifest.md).

Written here only: `manifest_text` is the one serialisation, `publish_staged` (builder/build.py)
puts a new manifest in place after its files, and `amend_manifest` adds keys to a published one
(the container runtime's record, the patched QEMU that `dirtylog build --qemu patched` made).
Buildroot's post-image.sh stages the same schema inside the Buildroot tree; builder/buildroot.py
reads it back and publishes it through `publish_staged`. Read by verifier.artifacts.load_artifacts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from builder.errors import BuildError

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "dirtylog-artifacts/1"


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=2) + "\n"


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
