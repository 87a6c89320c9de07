"""Capturing guest RAM at the two points that matter.

Source: once it is `postmigrate`, after everything was sent. Destination: while it is still
paused, before it resumes. Methods:
- backing-file: guest RAM is a memory-backend-file per side (share=on), so the source image is
  the file itself; the destination's is copied before it resumes (the copy is the evidence).
- pmemsave: QMP `pmemsave` of the RAM range on each side (works with any RAM backend).
- savedirtylog: a QEMU patched with dirtylog's `-savedirtylog` writes the image itself at exactly
  those two points (builder/patches/, built by `dirtylog build --qemu patched`). The default
  whenever the QEMU under test has the option.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from verifier.errors import CaptureError, InputError
from verifier.run.qemu import QemuBinary, QemuProcess
from verifier.capture.savedirtylog import savedirtylog_args, supports_savedirtylog, wait_for_image

METHODS = ("savedirtylog", "backing-file", "pmemsave")
IMAGE_NAMES = {"src": "ram-src.img", "dst": "ram-dst.img"}


def choose(requested: str, qemu: QemuBinary, postcopy: bool = False, host_backing: str = "auto") -> str:
    if host_backing not in ("auto", "file") and requested == "backing-file":
        raise InputError(f"--capture backing-file needs --host-backing file, not {host_backing}")
    if host_backing not in ("auto", "file") and requested == "auto":
        return "pmemsave"
    if host_backing == "file" and postcopy:
        raise InputError("--postcopy cannot use --host-backing file (userfaultfd does not work on disk files)")
    if requested == "savedirtylog" and not supports_savedirtylog(qemu.path):
        raise InputError(f"{qemu.path} has no -savedirtylog option: build the patched QEMU with "
                         "`dirtylog build --qemu patched` and pass it with --qemu")
    if requested == "auto" and not postcopy and host_backing == "auto" and supports_savedirtylog(qemu.path):
        return "savedirtylog"
    if postcopy and requested == "backing-file":
        # userfaultfd, which postcopy needs, works on anonymous memory and shmem, not disk files.
        raise InputError("--postcopy cannot use --capture backing-file (guest RAM in a disk file); "
                         "use --capture pmemsave")
    if requested == "auto":
        return "pmemsave" if postcopy else "backing-file"
    if requested not in METHODS:
        raise InputError(f"--capture {requested}: expected one of auto, {', '.join(METHODS)}")
    return requested


def qemu_args(method: str, side: str) -> list[str]:
    """Extra QEMU arguments a capture method needs on one side."""
    return savedirtylog_args(IMAGE_NAMES[side]) if method == "savedirtylog" else []


def capture(method: str, src: QemuProcess, dst: QemuProcess, tdir: Path, ram_base: int,
            mem_mb: int) -> dict[str, Path]:
    size = mem_mb * 1024 * 1024
    images = {side: tdir / name for side, name in IMAGE_NAMES.items()}
    if method == "savedirtylog":
        # Both were written before the source said completed and the destination left inmigrate.
        for side, proc in (("src", src), ("dst", dst)):
            wait_for_image(images[side], size, timeout=60, alive=proc.alive)
    elif method == "backing-file":
        try:
            shutil.copyfile(tdir / "dst.ram", images["dst"])
            os.replace(tdir / "src.ram", images["src"])
        except OSError as exc:
            raise CaptureError(f"cannot capture the RAM backing files in {tdir}: {exc}") from None
    else:
        for side, proc in (("src", src), ("dst", dst)):
            proc.qmp("pmemsave", val=ram_base, size=size, filename=images[side].name, timeout=300)
    for side, path in images.items():
        actual = path.stat().st_size if path.exists() else None
        if actual != size:
            raise CaptureError(f"{side} RAM image {path} has {actual} bytes instead of {size}")
    return images


def cleanup(method: str, tdir: Path) -> None:
    """The destination's live backing file was changed by resuming; only its copy is evidence."""
    if method == "backing-file":
        (tdir / "dst.ram").unlink(missing_ok=True)
