"""Building in a container (builder/runtime.py, builder/baseimage.py, the Dockerfile).

These need a Docker engine (CI installs one with scripts/setup-docker.sh). Without one they FAIL,
they do not skip: a silently skipped reproducibility check is worse than a red one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.build import ARTIFACT_ROLES, build_artifacts
from builder.cache import sha256_file
from builder.errors import BuildError, BuildInputError
from builder.runtime import DockerRuntime, EngineError, docker_client, get_runtime

pytestmark = pytest.mark.container

FILES = list(ARTIFACT_ROLES)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine():
    """A docker engine that answers, with the base image; fails (not skips) without one."""
    try:
        client = docker_client()
    except BuildError as e:
        pytest.fail(f"container tests need a docker engine and none answers: {e} "
                    f"(run scripts/setup-docker.sh as root)", pytrace=False)
    from builder.baseimage import find_image
    if find_image(client, DockerRuntime.base_image) is None:
        pytest.fail(f"base image {DockerRuntime.base_image} missing: run scripts/setup-docker.sh", pytrace=False)
    return client


@pytest.fixture(scope="module")
def warm_image(engine):
    """The builder image exists (built now if the project files changed); returns its timing."""
    rt = DockerRuntime()
    t0 = time.monotonic()
    tag, image_id = rt.ensure_image()
    return {"tag": tag, "id": image_id, "built": rt.last_image_built, "seconds": time.monotonic() - t0}


def _hashes(d: Path) -> dict[str, str]:
    return {name: sha256_file(d / name) for name in FILES}


def test_docker_build_is_byte_identical_to_host_build(warm_image, tmp_path):
    host = build_artifacts(tmp_path / "host")
    t0 = time.monotonic()
    manifest = DockerRuntime().build(tmp_path / "docker")
    seconds = time.monotonic() - t0
    print(f"docker artifact build (image warm): {seconds:.1f}s")
    assert _hashes(tmp_path / "docker") == _hashes(tmp_path / "host")
    assert {f["name"]: f["sha256"] for f in manifest["files"]} == {f["name"]: f["sha256"] for f in host["files"]}
    assert manifest["runtime"] == "docker"
    assert manifest["image_id"] == warm_image["id"]
    assert manifest["tools"]["cross_compiler"] == host["tools"]["cross_compiler"]
    assert manifest["sources"]["dirtylog_git_commit"] == host["sources"]["dirtylog_git_commit"]
    assert sorted(p.name for p in (tmp_path / "docker").iterdir()) == sorted(FILES + ["manifest.json"])
    assert not list(tmp_path.glob(".*staging*"))


def test_warm_rebuild_reuses_the_image(warm_image, tmp_path):
    rt = DockerRuntime()
    t0 = time.monotonic()
    tag, image_id = rt.ensure_image()
    seconds = time.monotonic() - t0
    print(f"image check when warm: {seconds:.2f}s (first ensure_image in this session: "
          f"{warm_image['seconds']:.1f}s, built={warm_image['built']})")
    assert not rt.last_image_built
    assert (tag, image_id) == (warm_image["tag"], warm_image["id"])
    assert seconds < 15
    t0 = time.monotonic()
    rt.build(tmp_path / "again")
    print(f"warm rebuild of the artifacts in docker: {time.monotonic() - t0:.1f}s")
    assert not rt.last_image_built


def test_outputs_belong_to_the_caller(warm_image, tmp_path):
    DockerRuntime().build(tmp_path / "mine")
    for p in (tmp_path / "mine").iterdir():
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), p
    # another uid than root's: the files are that user's, not root's
    tmp_path.chmod(0o777)
    DockerRuntime(as_user=(12345, 12345)).build(tmp_path / "other")
    for p in (tmp_path / "other").iterdir():
        assert (p.stat().st_uid, p.stat().st_gid) == (12345, 12345), p


def test_engine_not_running_is_one_line_naming_the_socket(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{missing}")
    with pytest.raises(EngineError) as e:
        get_runtime("docker")
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "does not exist" in msg
    assert e.value.exit_code == 3

    # a socket file nobody listens on: refused
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{dead}")
    with pytest.raises(EngineError) as e:
        DockerRuntime().build(tmp_path / "out")
    assert "\n" not in str(e.value) and str(dead) in str(e.value) and "refuses" in str(e.value)
    assert not (tmp_path / "out").exists()

    # auto falls back to the host when no engine answers
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    if not Path("/run/podman/podman.sock").exists():
        assert get_runtime("auto").name == "host"


def test_auto_uses_the_host_and_says_in_one_line_why_no_container_can_build(tmp_path):
    """--runtime auto's one rule: a container runtime that cannot build here is passed over, with its
    reason in the single line that announces the host."""
    missing = tmp_path / "no-engine.sock"
    said, logged = [], []
    rt = get_runtime("auto", log=logged.append, warn=said.append, base_url=f"unix://{missing}")
    assert rt.name == "host" and len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith("runtime: host (auto: no container runtime can build here; docker: ")
    assert "; podman: " in said[0] and said[0].count(f"{missing} does not exist") == 2
    assert "docker: docker:" not in said[0]


def test_a_runtime_without_its_dockerfile_cannot_build(engine, tmp_path):
    reason = DockerRuntime(dockerfile=tmp_path / "Dockerfile").unusable()
    assert reason == f"no Dockerfile at {tmp_path / 'Dockerfile'}"
    assert DockerRuntime().unusable() is None  # this machine's engine, with its base image


def test_permission_denied_on_the_socket_is_one_line(engine):
    """A user outside the socket's group gets a one-line error naming the socket, not a traceback."""
    sock = Path("/var/run/docker.sock")
    if os.getuid() != 0 or not sock.exists() or sock.stat().st_mode & 0o006:
        pytest.fail("this test runs as root against the default, group-restricted docker socket", pytrace=False)
    code = ("from builder.runtime import get_runtime\n"
            "from builder.errors import BuildError\n"
            "try:\n    get_runtime('docker')\n"
            "except BuildError as e:\n    print(type(e).__name__, e)\n")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                         capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO), "DOCKER_HOST": f"unix://{sock}"})
    assert res.stdout.startswith("EngineError docker: permission denied on socket /var/run/docker.sock"), res
    assert res.stdout.count("\n") == 1


def test_unknown_runtime_is_an_input_error():
    with pytest.raises(BuildInputError):
        get_runtime("lxc")


def test_image_build_failure_names_the_failing_step(engine, tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN echo fine\n"
                          "RUN echo about to fail && exit 42\nRUN echo never\n")
    with pytest.raises(BuildError) as e:
        DockerRuntime(dockerfile=dockerfile).build(tmp_path / "out")
    msg = str(e.value)
    first = msg.splitlines()[0]
    assert re.search(r"Step 4/\d+ : RUN echo about to fail && exit 42", first), msg
    assert "42" in first
    assert "about to fail" in msg  # the log tail
    assert e.value.exit_code == 3
    assert not (tmp_path / "out").exists()


def test_container_killed_mid_build_leaves_nothing(warm_image, engine, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    seen = []

    def log(msg):
        seen.append(msg)
        # the builder's third line (after "building ..." and "fetching ..."): dirtyram is being
        # compiled into the staging directory next to out
        if sum(m.startswith("docker: | ") for m in seen) == 3:
            name = next(m.split()[2] for m in seen if m.startswith("docker: container "))
            engine.containers.get(name).kill()

    before = {c.id for c in engine.containers.list(all=True, filters={"label": "dirtylog.build"})}
    with pytest.raises(BuildError) as e:
        DockerRuntime().build(out, log=log)
    assert "killed" in str(e.value) and "\n" not in str(e.value), e.value
    assert any("dirtyram" in m for m in seen if m.startswith("docker: | ")), seen
    assert list(out.iterdir()) == []
    assert not list(tmp_path.glob(".out.staging-*"))
    after = {c.id for c in engine.containers.list(all=True, filters={"label": "dirtylog.build"})}
    assert after <= before  # the container was removed


def test_container_is_removed_on_keyboard_interrupt(warm_image, engine, tmp_path):
    def log(msg):
        if "fetching pinned" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        DockerRuntime().build(tmp_path / "out", log=log)
    deadline = time.monotonic() + 10
    while engine.containers.list(all=True, filters={"label": "dirtylog.build"}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.containers.list(all=True, filters={"label": "dirtylog.build"}) == []
    assert not (tmp_path / "out").exists()


@pytest.mark.qemu_build
def test_patched_qemu_builds_in_the_container(warm_image, tmp_path):
    """`build --runtime docker --qemu patched` compiles QEMU inside the container (empty cache:
    nothing to reuse) and the host runs the result from the shared cache."""
    cache = tmp_path / "cache"
    res = subprocess.run([sys.executable, "-m", "dirtylog.cli", "build", "--runtime", "docker", "--qemu", "patched",
                          "--cache-dir", str(cache), "--out", str(tmp_path / "art")],
                         capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "in the container" not in res.stderr  # no failure message
    assert "docker: | building qemu-system-arm with ninja" in res.stderr
    qemu = json.loads((tmp_path / "art" / "manifest.json").read_text())["qemu"]
    assert qemu["path"].startswith(str(cache)) and qemu["patched"] is True
    helptext = subprocess.run([qemu["path"], "-help"], capture_output=True, text=True).stdout
    assert "-savedirtylog" in helptext
