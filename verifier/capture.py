"""Capturing guest RAM at the two points that matter.

Source: once it is `postmigrate`, after everything was sent. Destination: while it is still
paused, before it resumes. Methods:
- backing-file: guest RAM is a memory-backend-file per side (share=on), so the source image is
  the file itself; the destination's is copied before it resumes (the copy is the evidence).
- pmemsave: QMP `pmemsave` of the RAM range on each side (works with any RAM backend).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import CaptureError, InputError
from .qemu import QemuBinary, QemuProcess

METHODS = ("backing-file", "pmemsave")


def choose(requested: str, qemu: QemuBinary, postcopy: bool = False, host_backing: str = "auto") -> str:
    if host_backing not in ("auto", "file") and requested == "backing-file":
        raise InputError(f"--capture backing-file needs --host-backing file, not {host_backing}")
    if host_backing not in ("auto", "file") and requested == "auto":
        return "pmemsave"
    if host_backing == "file" and postcopy:
        raise InputError("--postcopy cannot use --host-backing file (userfaultfd does not work on disk files)")
    if postcopy and requested == "backing-file":
        # userfaultfd, which postcopy needs, works on anonymous memory and shmem, not disk files.
        raise InputError("--postcopy cannot use --capture backing-file (guest RAM in a disk file); "
                         "use --capture pmemsave")
    if requested == "auto":
        return "pmemsave" if postcopy else "backing-file"
    if requested not in METHODS:
        raise InputError(f"--capture {requested}: expected one of auto, {', '.join(METHODS)}")
    return requested


def capture(method: str, src: QemuProcess, dst: QemuProcess, tdir: Path, ram_base: int,
            mem_mb: int) -> dict[str, Path]:
    size = mem_mb * 1024 * 1024
    images = {"src": tdir / "ram-src.img", "dst": tdir / "ram-dst.img"}
    if method == "backing-file":
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
