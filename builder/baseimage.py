"""The container base image, made locally with debootstrap (no registry is needed or used).

``ensure_base_image()`` returns the id of ``dirtylog-base:bookworm``; when the engine does not have
it yet it is made from scratch: ``debootstrap --variant=minbase bookworm <tmp> <mirror>``, then the
root file system is imported as a single-layer image (``docker import``). The mirror is the one in
this machine's apt sources for the suite unless one is given; the image's own apt sources then
point at that same mirror. The temporary root file system is always removed.

    python -m builder.baseimage [--name NAME] [--suite SUITE] [--mirror URL] [--force]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from builder.errors import BuildError, BuildInputError, ToolMissingError

DEFAULT_NAME = "dirtylog-base:bookworm"
DEFAULT_SUITE = "bookworm"
DEBOOTSTRAP_TIMEOUT_S = 1800
_TAIL_LINES = 15


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _split_name(name: str) -> tuple[str, str]:
    repo, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        return name, "latest"
    return repo, tag


def find_image(client, name: str):
    """The image called `name`, or None."""
    import docker.errors
    try:
        return client.images.get(name)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.APIError as e:
        raise BuildError(f"container engine: cannot inspect image {name}: {e.explanation or e}") from None


def debootstrap(rootfs: Path, suite: str, mirror: str, log=lambda msg: None) -> None:
    """`debootstrap --variant=minbase SUITE ROOTFS MIRROR`; BuildError with the log tail on failure."""
    if shutil.which("debootstrap") is None:
        raise ToolMissingError("debootstrap not found; install it with: apt-get install debootstrap "
                               "(or run scripts/setup-docker.sh)")
    if os.geteuid() != 0:
        raise BuildInputError("making the base image with debootstrap needs root "
                              "(run scripts/setup-docker.sh as root)")
    cmd = ["debootstrap", "--variant=minbase", suite, str(rootfs), mirror]
    log(f"debootstrap --variant=minbase {suite} from {mirror}")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", timeout=DEBOOTSTRAP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BuildError(f"debootstrap {suite} from {mirror} timed out after {DEBOOTSTRAP_TIMEOUT_S}s") from None
    if proc.returncode != 0:
        # debootstrap keeps its detailed log inside the target
        detail = rootfs / "debootstrap" / "debootstrap.log"
        text = detail.read_text(errors="replace") if detail.is_file() else proc.stdout
        raise BuildError(f"debootstrap {suite} from {mirror} failed (exit status {proc.returncode}):\n"
                         f"{_tail(text)}")


def _trim_rootfs(rootfs: Path) -> None:
    """Drop downloaded .debs and apt lists: they are not needed and would only bloat the image."""
    for d in (rootfs / "var/cache/apt/archives", rootfs / "var/lib/apt/lists"):
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file() and p.name != "lock":
                    p.unlink()


def ensure_base_image(name: str = DEFAULT_NAME, suite: str = DEFAULT_SUITE, mirror: str | None = None,
                      log=lambda msg: None, *, client=None, force: bool = False) -> str:
    """Id of the image `name`; made with debootstrap + import when the engine does not have it."""
    from builder.engine import docker_client  # the one place that maps engine errors
    client = client or docker_client()
    image = None if force else find_image(client, name)
    if image is not None:
        return image.id
    if mirror is None:
        from builder.apt_sources import find_mirror
        mirror = find_mirror(suite)
    work = Path(tempfile.mkdtemp(prefix="dirtylog-base."))
    try:
        rootfs = work / "rootfs"
        t0 = time.monotonic()
        debootstrap(rootfs, suite, mirror, log=log)
        _trim_rootfs(rootfs)
        log(f"debootstrap done in {time.monotonic() - t0:.0f}s; importing as {name}")
        tarball = work / "rootfs.tar"
        proc = subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(tarball), "."],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        if proc.returncode != 0:
            raise BuildError(f"packing the {suite} root file system failed: {_tail(proc.stdout, 3)}")
        repo, tag = _split_name(name)
        import docker.errors
        try:
            client.api.import_image_from_file(
                str(tarball), repository=repo, tag=tag,
                changes=['CMD ["/bin/bash"]', "ENV LANG=C.UTF-8",
                         "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
        except docker.errors.APIError as e:
            raise BuildError(f"container engine: importing {name} failed: {e.explanation or e}") from None
        image = find_image(client, name)
        if image is None:
            raise BuildError(f"container engine: {name} is missing right after it was imported")
        log(f"base image {name} {image.id} made in {time.monotonic() - t0:.0f}s")
        return image.id
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m builder.baseimage", description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default=DEFAULT_NAME)
    ap.add_argument("--suite", default=DEFAULT_SUITE)
    ap.add_argument("--mirror", help="Debian mirror (default: this machine's apt sources for the suite)")
    ap.add_argument("--force", action="store_true", help="make it again even if it exists")
    args = ap.parse_args(argv)
    say = lambda msg: print(f"baseimage: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        image_id = ensure_base_image(args.name, args.suite, args.mirror, log=say, force=args.force)
    except BuildError as e:
        print(f"baseimage: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("baseimage: error: interrupted", file=sys.stderr)
        return 130
    print(image_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
