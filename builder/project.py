"""The project's own files that are not Python modules, and which dirtylog this is.

The repository keeps them at its top level (`dirtyram-src/`, `buildroot-external/`, `Dockerfile`,
`matrices/`, `pyproject.toml`), as the mission's layout asks. An installed wheel or sdist carries
the same files as package data under `builder/_project/` (setup.py's build step copies them there,
keeping their relative layout: `buildroot-external/../dirtyram-src` still names the sources), and
they are found through importlib.resources. One rule decides which is used::

    a checkout   <- builder/ sits beside pyproject.toml and dirtyram-src/Makefile (the git
                    checkout, or the container's /src, which is one)
    installed    <- otherwise: importlib.resources.files("builder") / "_project"

`version()` is the package's version (a checkout's pyproject.toml, else the installed metadata);
`git_commit()` is the checkout's HEAD, only when builder/ is in that git work tree's top level (a
venv inside some other repository does not borrow its commit); `describe()` is both in one line,
as `dirtylog --version`, the manifests and their reproducers name the dirtylog that built them.
"""

from __future__ import annotations

import functools
import subprocess
from importlib import resources
from pathlib import Path

from builder.errors import BuildError

PACKAGE_DIRS = ("builder", "verifier", "dirtylog")  # the Python packages, as directories
DATA_NAMES = ("Dockerfile", "pyproject.toml", "dirtyram-src", "buildroot-external", "matrices")
PACKAGED_DIR = "_project"  # under builder/ in an installed package
_HERE = Path(__file__).resolve().parent
_CHECKOUT = _HERE.parent


class InstallationError(BuildError):
    """A file the installed package should carry is missing (a broken or partial installation)."""


def is_checkout() -> bool:
    return (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "dirtyram-src" / "Makefile").is_file()


def root() -> Path:
    """The directory holding DATA_NAMES: the checkout, or the installed package's copy."""
    if is_checkout():
        return _CHECKOUT
    packaged = resources.files("builder") / PACKAGED_DIR
    if not packaged.is_dir():
        raise InstallationError(f"this dirtylog installation has no project files ({_HERE / PACKAGED_DIR} is missing) "
                                f"and {_CHECKOUT} is not a dirtylog checkout; reinstall dirtylog from its wheel or sdist")
    return Path(str(packaged))  # an installed wheel is a directory tree, never a zip


def path(name: str) -> Path:
    """The project file or directory `name` (one of DATA_NAMES), checked to exist."""
    if name not in DATA_NAMES:
        raise ValueError(f"{name!r} is not a project file ({', '.join(DATA_NAMES)})")
    p = root() / name
    if not p.exists():
        raise InstallationError(f"{p} is missing from this dirtylog {'checkout' if is_checkout() else 'installation'}")
    return p


def tree() -> dict[str, Path]:
    """Name -> path of everything a container's /src holds: the packages and the project files."""
    out = {name: _CHECKOUT / name for name in PACKAGE_DIRS}
    out.update({name: path(name) for name in DATA_NAMES})
    return out


@functools.cache
def version() -> str:
    if is_checkout():
        import tomllib
        try:
            return tomllib.loads((_CHECKOUT / "pyproject.toml").read_text())["project"]["version"]
        except (OSError, KeyError, ValueError):
            pass
    from importlib import metadata
    try:
        return metadata.version("dirtylog")
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def git_commit() -> str | None:
    """HEAD of the checkout dirtylog runs from, or None (installed, no git, or not its own work tree)."""
    if not is_checkout():
        return None
    try:
        out = subprocess.run(["git", "-C", str(_CHECKOUT), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != _CHECKOUT:
        return None
    return lines[1]


def _dirty() -> bool:
    try:
        out = subprocess.run(["git", "-C", str(_CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def describe() -> str:
    """'0.1.0 (git 1a2b3c4d5e6f)', '0.1.0 (git 1a2b3c4d5e6f, with local changes)' or '0.1.0 (installed)'."""
    commit = git_commit()
    if commit is None:
        return f"{version()} ({'checkout without git' if is_checkout() else 'installed'})"
    return f"{version()} (git {commit[:12]}{', with local changes' if _dirty() else ''})"


def reproducer_note() -> str:
    """The suffix of a manifest's reproducer naming the dirtylog that wrote it (a shell comment)."""
    return f"  # dirtylog {describe()}"
