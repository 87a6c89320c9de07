"""Cross-compiles the dirtyram guest workload from dirtyram-src/ and checks the result."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from builder.cpio import write_atomic
from builder.elfcheck import check_elf_bytes
from builder.errors import BuildError, ToolMissingError

DEFAULT_PREFIX = "arm-linux-gnueabihf-"
OUTPUT_NAME = "dirtyram"
BUILD_TIMEOUT_S = 600
_TAIL_LINES = 20


def _compiler(prefix: str) -> str:
    cc = f"{prefix}gcc"
    if shutil.which(cc) is None:
        package = f"gcc-{prefix.rstrip('-')}" if prefix else "gcc"
        raise ToolMissingError(f"C compiler {cc} not found; install it with: apt-get install {package}")
    return cc


def _clean_env() -> dict[str, str]:
    """A minimal environment: no CFLAGS/LDFLAGS/MAKEFLAGS etc. leaking into the Makefile."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
    if "SOURCE_DATE_EPOCH" in os.environ:
        env["SOURCE_DATE_EPOCH"] = os.environ["SOURCE_DATE_EPOCH"]
    return env


def compiler_version(prefix: str = DEFAULT_PREFIX) -> str:
    """First line of `<prefix>gcc --version`, e.g. 'arm-linux-gnueabihf-gcc (Debian 12.2.0-14) 12.2.0'."""
    cc = _compiler(prefix)
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, env=_clean_env(),
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"could not run {cc} --version: {e}") from None
    return out.splitlines()[0].strip() if out.strip() else ""


def build_dirtyram(src_dir: Path, out_dir: Path, cross_prefix: str = DEFAULT_PREFIX,
                   jobs: int | None = None, arch: str = "armv7") -> Path:
    """Build dirtyram with `make -C src_dir CC=<prefix>gcc O=<tmp>`; check it; copy to out_dir/dirtyram.

    The copy is atomic (temp file + rename) and mode 0755. Returns its path.
    Raises ToolMissingError (no compiler/make), BuildError (compile failure, with the
    last lines of the compiler output), BuildInputError (the result is not a static
    executable for arch).
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    cc = _compiler(cross_prefix)
    if shutil.which("make") is None:
        raise ToolMissingError("make not found; install it with: apt-get install make")
    if not (src_dir / "Makefile").is_file():
        raise BuildError(f"{src_dir}: no Makefile (is this the dirtyram-src directory?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dirtyram-build.") as tmp:
        cmd = ["make", "-C", str(src_dir.resolve()), f"CC={cc}", f"O={tmp}"]
        if jobs:
            cmd.append(f"-j{jobs}")
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", env=_clean_env(), timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BuildError(f"building dirtyram timed out after {BUILD_TIMEOUT_S}s") from None
        built = Path(tmp) / OUTPUT_NAME
        if proc.returncode != 0 or not built.is_file():
            tail = "\n".join(proc.stdout.rstrip().splitlines()[-_TAIL_LINES:])
            why = f"exit status {proc.returncode}" if proc.returncode else f"no {built.name} produced"
            raise BuildError(f"building dirtyram with {cc} failed ({why}):\n{tail}")
        data = built.read_bytes()
    check_elf_bytes(data, f"{OUTPUT_NAME} (built with {cc})", arch)
    dest = out_dir / OUTPUT_NAME
    write_atomic(dest, data, mode=0o755)
    return dest
