"""Building with podman through its Docker-compatible API (builder/runtime.py's PodmanRuntime).

These need podman's API service with the base image in podman's storage: scripts/setup-podman.sh
(as root) installs podman, starts `podman system service` on /run/podman/podman.sock and imports
dirtylog-base:bookworm. Without it they FAIL, they do not skip, like tests/test_container.py.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from builder.build import ARTIFACT_ROLES, build_artifacts
from builder.cache import sha256_file
from builder.errors import BuildError
from builder.runtime import EngineError, PodmanRuntime, get_runtime

pytestmark = pytest.mark.container

FILES = list(ARTIFACT_ROLES)


@pytest.fixture(scope="module")
def podman():
    """A podman API service that answers, with the base image; fails (not skips) without one."""
    rt = PodmanRuntime()
    error = None
    try:
        client = rt.client
    except BuildError as e:
        error = str(e)
    if error is not None:  # outside the except: no chained traceback in the report
        hint = "" if "setup-podman.sh" in error else " (run scripts/setup-podman.sh as root)"
        pytest.fail(f"podman tests need podman's API service and none answers: {error}{hint}", pytrace=False)
    from builder.baseimage import find_image
    if find_image(client, PodmanRuntime.base_image) is None:
        pytest.fail(f"base image {PodmanRuntime.base_image} missing from podman's storage: "
                    f"run scripts/setup-podman.sh", pytrace=False)
    return client


@pytest.fixture(scope="module")
def warm_image(podman):
    """The builder image exists in podman (built now if the project files changed)."""
    rt = PodmanRuntime()
    t0 = time.monotonic()
    tag, image_id = rt.ensure_image()
    seconds = time.monotonic() - t0
    print(f"podman ensure_image: {seconds:.1f}s (built={rt.last_image_built})")
    return {"tag": tag, "id": image_id, "built": rt.last_image_built, "seconds": seconds}


def _hashes(d: Path) -> dict[str, str]:
    return {name: sha256_file(d / name) for name in FILES}


def _build_containers(client) -> set[str]:
    return {c.id for c in client.containers.list(all=True, filters={"label": "dirtylog.build"})}


def test_podman_build_is_byte_identical_to_host_build(warm_image, podman, tmp_path):
    host = build_artifacts(tmp_path / "host")
    before = _build_containers(podman)
    t0 = time.monotonic()
    manifest = PodmanRuntime().build(tmp_path / "podman")
    print(f"podman artifact build (image warm): {time.monotonic() - t0:.1f}s")
    assert _hashes(tmp_path / "podman") == _hashes(tmp_path / "host")
    assert {f["name"]: f["sha256"] for f in manifest["files"]} == {f["name"]: f["sha256"] for f in host["files"]}
    assert manifest["runtime"] == "podman"
    assert manifest["image_id"] == warm_image["id"]
    assert manifest["reproducer"].startswith("dirtylog build --runtime podman ")
    assert manifest["tools"]["cross_compiler"] == host["tools"]["cross_compiler"]
    assert manifest["sources"]["dirtylog_git_commit"] == host["sources"]["dirtylog_git_commit"]
    assert sorted(p.name for p in (tmp_path / "podman").iterdir()) == sorted(FILES + ["manifest.json"])
    assert not list(tmp_path.glob(".*staging*"))
    assert _build_containers(podman) <= before  # the build container was removed


def test_outputs_belong_to_the_caller(warm_image, tmp_path):
    """Rootful podman maps uids 1:1: the files are the caller's (rootless would need --userns=keep-id)."""
    PodmanRuntime().build(tmp_path / "mine")
    for p in (tmp_path / "mine").iterdir():
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), p
    tmp_path.chmod(0o777)
    PodmanRuntime(as_user=(12345, 12345)).build(tmp_path / "other")
    for p in (tmp_path / "other").iterdir():
        assert (p.stat().st_uid, p.stat().st_gid) == (12345, 12345), p


def test_absent_socket_is_one_line_naming_the_socket_and_the_setup_script(tmp_path):
    missing = tmp_path / "podman" / "podman.sock"
    with pytest.raises(EngineError) as e:
        get_runtime("podman", base_url=f"unix://{missing}")
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"podman: socket {missing} does not exist"), msg
    assert "scripts/setup-podman.sh" in msg and "setup-docker" not in msg and "dockerd" not in msg, msg
    assert e.value.exit_code == 3

    # a socket file nobody listens on: refused, and nothing is built
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()
    with pytest.raises(EngineError) as e:
        PodmanRuntime(base_url=f"unix://{dead}").build(tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and str(dead) in msg and "refuses" in msg and "setup-podman.sh" in msg, msg
    assert not (tmp_path / "out").exists()


def test_default_socket_prefers_rootless(tmp_path, monkeypatch):
    """$XDG_RUNTIME_DIR/podman/podman.sock (rootless) when it exists, else the rootful one."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    rootful = Path("/run/podman/podman.sock")
    fallback = rootful if rootful.exists() else tmp_path / "podman" / "podman.sock"
    assert PodmanRuntime().base_url == f"unix://{fallback}"
    (tmp_path / "podman").mkdir()
    (tmp_path / "podman" / "podman.sock").touch()
    assert PodmanRuntime().base_url == f"unix://{tmp_path}/podman/podman.sock"


def test_image_build_failure_names_the_failing_step(podman, tmp_path):
    """Podman's build log says "STEP n/m:" where docker's says "Step n/m :"; both are named."""
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nRUN echo fine\n"
                          "RUN echo about to fail && exit 42\nRUN echo never\n")
    with pytest.raises(BuildError) as e:
        PodmanRuntime(dockerfile=dockerfile).build(tmp_path / "out")
    first = str(e.value).splitlines()[0]
    assert "STEP 3/5: RUN echo about to fail && exit 42" in first and "42" in first, e.value
    assert e.value.exit_code == 3
    assert not (tmp_path / "out").exists()
