"""QEMU's ``-savedirtylog``: guest RAM written by QEMU itself at the two points that matter.

A QEMU built with dirtylog's patch (``builder/patches/``, built by ``builder/qemu_build.py``)
accepts ``-savedirtylog [PATH]`` and writes all of main guest RAM (``machine->ram``: the
``memory-backend`` or the board's RAM block, e.g. ``mach-virt.ram``, ``vexpress.highmem``), in
guest-physical order, in a 64 MiB pwrite loop (O_DIRECT when possible) followed by fsync:

- on the source, in the migration thread once the final stage has sent everything, before the
  migration is reported ``completed`` (and so before the source goes ``postmigrate``);
- on the destination, once the incoming migration has loaded everything, before the guest can
  resume (before the autostart decision; ``-S`` or not).

Without PATH the file is ``ramimage0`` on the source and ``ramimage1`` on the destination, in
QEMU's working directory.  The file is written as ``PATH.partial``, synced and renamed, so it
never exists incomplete.  If it cannot be written QEMU says so on stderr (``-savedirtylog:
cannot write guest RAM image ...``) and the migration fails: on the source ``query-migrate``
says ``failed`` with that ``error-desc``; the destination fails the incoming migration and
exits with status 1.

How capture uses it (the trial directory is both QEMUs' working directory)::

    src args += savedirtylog_args("ram-src.img")
    dst args += savedirtylog_args("ram-dst.img")
    ... run_migration(...)   # returns once the source is postmigrate, the destination paused
    wait_for_image(tdir / "ram-src.img", size, timeout=...)   # already there: written before
    wait_for_image(tdir / "ram-dst.img", size, timeout=...)   # 'completed' / 'paused'

The source image is complete before the source reports ``completed``; the destination's before
the destination leaves ``inmigrate`` (``run_migration`` waits for it to be ``paused``), so the
waits return at once; they exist to turn "QEMU did not write it" into a clear error.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from verifier.errors import CaptureError, InputError

__all__ = ["OPTION", "supports_savedirtylog", "savedirtylog_args", "wait_for_image",
           "DEFAULT_SOURCE_IMAGE", "DEFAULT_DESTINATION_IMAGE"]

OPTION = "-savedirtylog"
DEFAULT_SOURCE_IMAGE = "ramimage0"
DEFAULT_DESTINATION_IMAGE = "ramimage1"
_HELP_RE = re.compile(r"(?m)^-savedirtylog\b")
_support_cache: dict[tuple[str, int, int], bool] = {}


def supports_savedirtylog(qemu_path: str | os.PathLike) -> bool:
    """Does this QEMU list ``-savedirtylog`` in its ``-help``? (Cached per binary and mtime.)"""
    path = str(qemu_path)
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _support_cache:
        try:
            out = subprocess.run([path, "-help"], capture_output=True, text=True, timeout=30,
                                 stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return False
        _support_cache[key] = out.returncode == 0 and bool(_HELP_RE.search(out.stdout))
    return _support_cache[key]


def savedirtylog_args(path: str | os.PathLike | None = None) -> list[str]:
    """QEMU arguments that write guest RAM to *path* (None: QEMU's default file names).

    A relative path is relative to QEMU's working directory.  The argument is optional on
    QEMU's command line, so a path starting with ``-`` would be read as the next option:
    such paths are given as ``./-name``.
    """
    if path is None:
        return [OPTION]
    p = os.fspath(path)
    if not p:
        raise InputError("-savedirtylog: empty path")
    if p.startswith("-"):
        p = "./" + p
    return [OPTION, p]


def wait_for_image(path: str | os.PathLike, size: int, timeout: float,
                   alive=None, poll_s: float = 0.05, newer_than: float | None = None) -> Path:
    """Wait until QEMU has written the image *path* of exactly *size* bytes.

    QEMU renames the image into place only once it is complete and synced, so existence with
    the right size means done.  Raises CaptureError on timeout, on a wrong size, or as soon as
    *alive* (a callable, e.g. ``proc.alive``) says QEMU is gone without having written it.
    *newer_than* (a ``time.time()`` value, e.g. taken before starting QEMU) ignores an older
    file left at *path* by an earlier run; better still, remove it before starting QEMU.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = path.stat()
            actual = st.st_size
            if newer_than is not None and st.st_mtime < newer_than - 1:
                actual = None  # a stale image; QEMU's rename will replace it
        except FileNotFoundError:
            actual = None
        if actual == size:
            return path
        if actual is not None:
            raise CaptureError(f"-savedirtylog image {path} has {actual} bytes instead of {size} "
                               "(is the guest RAM size the one QEMU was given?)")
        if alive is not None and not alive():
            raise CaptureError(f"QEMU exited without writing the -savedirtylog image {path}")
        if time.monotonic() > deadline:
            partial = path.with_name(path.name + ".partial")
            how = " (a .partial file exists: QEMU is still writing)" if partial.exists() else ""
            raise CaptureError(f"QEMU did not write the -savedirtylog image {path} within "
                               f"{timeout:.0f} s{how}")
        time.sleep(poll_s)
