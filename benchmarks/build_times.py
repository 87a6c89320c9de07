#!/usr/bin/env python3
"""First and warm build times of the guest artifacts per runtime (host, docker, podman).

"first" removes the runtime's builder image (container runtimes) and uses an empty download
cache, so it includes the image build and the downloads; "warm" runs the same build again with
nothing changed and must not rebuild anything (seconds, not minutes).

    python benchmarks/build_times.py [--runtimes host,docker] [--keep-image]
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(runtime: str, out: Path, cache: Path) -> float:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dirtylog.cli", "-q", "build", "--runtime", runtime,
                           "--out", str(out), "--cache-dir", str(cache)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{runtime} build failed: {proc.stderr.strip().splitlines()[-1]}")
    return time.monotonic() - t0


def drop_builder_images(runtime: str) -> None:
    from builder.runtime import get_runtime
    rt = get_runtime(runtime)
    client = getattr(rt, "client", None)
    if client is None:
        return
    for image in client.images.list(name="dirtylog-builder"):
        client.images.remove(image.id, force=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtimes", default="host,docker")
    ap.add_argument("--keep-image", action="store_true", help="do not remove the builder image first")
    a = ap.parse_args()
    print(f"{'runtime':8} {'first s':>8} {'warm s':>7}")
    for runtime in a.runtimes.split(","):
        with tempfile.TemporaryDirectory(prefix="build-times-", dir=".") as tmp:
            cache = Path(tmp) / "cache"
            if runtime != "host" and not a.keep_image:
                drop_builder_images(runtime)
            first = build(runtime, Path(tmp) / "a", cache)
            warm = build(runtime, Path(tmp) / "b", cache)
            shutil.rmtree(cache, ignore_errors=True)
        print(f"{runtime:8} {first:8.1f} {warm:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
