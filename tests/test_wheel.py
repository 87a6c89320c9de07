"""dirtylog installed as a package, not run from a checkout (#21): the checkout's tracked files copied
to a directory that is no git checkout; an sdist made there and a wheel made from that sdist (so the
sdist is proven complete: its contents are checked); `pipx install .` in the copy, run from an empty
directory. The installed
`dirtylog build` makes byte-identical artifacts to the checkout's, in the host runtime and in a
container (the project files the container needs travel in the wheel, builder/_project), the
installed `dirtylog verify` passes with them, and `--version` says what is installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.network, pytest.mark.cross]


def _run(args, cwd, timeout=900, env=None, check=True):
    res = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=env)
    if check:
        assert res.returncode == 0, f"{args}: {res.stdout}{res.stderr}"
    return res


def _clean_env() -> dict:
    """No PYTHONPATH or virtualenv of the test run leaks into the installed dirtylog."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("wheel")
    # 1. the tracked files only (what a clone has), into a directory that is not a git checkout
    src = base / "src"
    listed = _run(["git", "ls-files", "-z"], REPO).stdout.split("\0")
    for name in filter(None, listed):
        f = REPO / name
        if f.is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, src / name)
    hooks = ("from setuptools import build_meta as b; import sys; "
             "print(getattr(b, sys.argv[1])(sys.argv[2]))")
    # 2. an sdist from it (setuptools' PEP 517 hook), 3. a wheel from the unpacked sdist
    dist = base / "dist"
    dist.mkdir()
    sdist = dist / _run([sys.executable, "-c", hooks, "build_sdist", dist], src).stdout.split()[-1]
    with tarfile.open(sdist) as t:
        t.extractall(base / "unpacked", filter="data")
    (unpacked,) = (base / "unpacked").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, unpacked], base,
         timeout=600)  # in pip's isolated build environment, as a user's `pip install .` builds it
    (wheel,) = dist.glob("dirtylog-*.whl")
    # 4. `pipx install .` in the copy (pipx builds its own wheel there, in pip's isolated build
    # environment, and installs it with its dependencies from the package index into a fresh venv)
    env = _clean_env()
    env.update(PIPX_HOME=str(base / "pipx"), PIPX_BIN_DIR=str(base / "bin"), PIPX_MAN_DIR=str(base / "man"))
    _run([sys.executable, "-m", "pipx", "install", "."], src, timeout=1200, env=env)
    empty = base / "empty"
    empty.mkdir()
    return {"venv": base / "pipx" / "venvs" / "dirtylog", "dirtylog": base / "bin" / "dirtylog", "wheel": wheel,
            "cwd": empty, "env": _clean_env()}


def _hashes(d: Path) -> dict[str, str]:
    manifest = json.loads((d / "manifest.json").read_text())
    return {f["name"]: f["sha256"] for f in manifest["files"]}


def test_the_wheel_carries_the_project_files(installed):
    import zipfile
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for need in ("builder/_project/Dockerfile", "builder/_project/pyproject.toml",
                 "builder/_project/dirtyram-src/Makefile", "builder/_project/dirtyram-src/dirtyram.c",
                 "builder/_project/matrices/smoke.toml",
                 "builder/_project/buildroot-external/board/dirtylog/post-image.sh",
                 "builder/locks/bookworm-armhf.json", "builder/patches/qemu-10.0/0001-savedirtylog.patch",
                 "builder/patches/qemu-7.2/0001-savedirtylog.patch",
                 "builder/patches/bugzoo-10.0/final-sync-skipped.patch",
                 "dirtylog/cli.py", "verifier/run/trial.py"):
        assert need in names, need
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_installed_version_and_code_location(installed):
    res = _run([installed["dirtylog"], "--version"], installed["cwd"], env=installed["env"])
    assert res.stdout.strip() == "dirtylog 0.1.0 (installed)"
    where = _run([installed["venv"] / "bin" / "python", "-c",
                  "import builder.project as p; print(p.__file__); print(p.is_checkout()); print(p.root())"],
                 installed["cwd"], env=installed["env"]).stdout.split()
    assert where[0].startswith(str(installed["venv"])) and where[1] == "False"
    assert where[2].endswith("builder/_project")


def test_installed_host_build_is_byte_identical_and_verifies(installed, artifacts, tmp_path):
    """The installed builder makes the checkout's artifacts byte for byte; its manifest names the
    installed version; the installed verifier passes with them (one quick trial on the host's QEMU)."""
    out = tmp_path / "art"
    res = _run([installed["dirtylog"], "build", "--runtime", "host", "--out", out], installed["cwd"],
               env=installed["env"])
    assert _hashes(out) == _hashes(artifacts), res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"]["dirtylog_version"] == "0.1.0"
    assert manifest["sources"]["dirtylog_git_commit"] is None
    assert manifest["reproducer"].endswith("# dirtylog 0.1.0 (installed)")
    run_dir = tmp_path / "run"
    res = _run([installed["dirtylog"], "verify", "--artifacts", out, "--machine", "virt", "--smp", "1",
                "--min-passes", "1", "--capture", "pmemsave", "--run-dir", run_dir], installed["cwd"],
               env=installed["env"], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["dirtylog"] == {"version": "0.1.0", "git_commit": None}


def test_installed_matrix_by_name(installed, artifacts, tmp_path):
    """A shipped matrix is found by name from anywhere and passes; an unknown name lists the shipped
    ones."""
    res = _run([installed["dirtylog"], "verify", "--matrix", "nosuch", "--artifacts", artifacts],
               installed["cwd"], env=installed["env"], check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "nosuch" in line and "smoke" in line, line
    run_dir = tmp_path / "matrix"
    res = _run([installed["dirtylog"], "verify", "--matrix", "smoke", "--artifacts", artifacts, "--jobs", "2",
                "--run-dir", run_dir], installed["cwd"], env=installed["env"], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((run_dir / "matrix-report.json").read_text())
    assert report["matrix"]["file"].endswith("builder/_project/matrices/smoke.toml")


@pytest.mark.container
def test_installed_docker_build_is_byte_identical(installed, artifacts, tmp_path):
    """The container runtime from the wheel: the Dockerfile and project files come from the package,
    the image is the checkout's (the same files, so the same tag), and the artifacts are the same."""
    from builder.runtime import DockerRuntime
    tag, _ = DockerRuntime().ensure_image()  # the checkout's image (built here if it was not yet)
    out = tmp_path / "art"
    res = _run([installed["dirtylog"], "build", "--runtime", "docker", "--out", out], installed["cwd"],
               env=installed["env"], timeout=3600)
    assert _hashes(out) == _hashes(artifacts), res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image"] == tag
    assert manifest["runtime"] == "docker" and manifest["reproducer"].endswith("# dirtylog 0.1.0 (installed)")


@pytest.mark.container
@pytest.mark.e2e
def test_installed_make_and_verify(installed, artifacts, tmp_path):
    """The main job from the wheel, with its defaults (the container runtime where it can build, QEMU
    10.0 with -savedirtylog from the shared build cache): PASS, the checkout's artifacts, and the
    QEMU the checkout would build (the build key hashes the installed patches and lock: the same)."""
    from builder import qemu_build
    run_dir = tmp_path / "run"
    res = _run([installed["dirtylog"], "make-and-verify", "--out", tmp_path / "art", "--run-dir", run_dir],
               installed["cwd"], env=installed["env"], timeout=3600, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _hashes(tmp_path / "art") == _hashes(artifacts)
    qemu = json.loads((tmp_path / "art" / "manifest.json").read_text())["qemu"]
    key, _ = qemu_build.cache_key(qemu_build.load_qemu_lock("10.0"), qemu_build.patch_files("10.0"),
                                  qemu_build.configure_args("10.0"))
    assert qemu["patched"] is True and key in qemu["path"], qemu
    report = json.loads((run_dir / "report.json").read_text())
    assert report["verdict"] == "pass" and report["dirtylog"]["git_commit"] is None
