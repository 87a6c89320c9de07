"""The container engine connection: one place that finds the socket, pings it and maps its errors.

Used by the runtimes (builder/runtime.py) and the base image maker (builder/baseimage.py).
"""

from __future__ import annotations

import os
import socket

from builder.errors import BuildError, ToolMissingError

DEFAULT_SOCKET = "/var/run/docker.sock"
PING_TIMEOUT_S = 10


class EngineError(BuildError):
    """No container engine answers (not installed, not running, socket not accessible)."""


def _import_docker():
    try:
        import docker  # noqa: F401
    except ImportError:
        raise ToolMissingError("the Python docker SDK is not installed; install it with: "
                               "pip install docker (it is a dependency of dirtylog)") from None
    return docker


def _socket_path(base_url: str) -> str | None:
    if base_url.startswith("unix://"):
        return base_url[len("unix://"):] or None
    return None


def _check_unix_socket(path: str, what: str) -> None:
    """One-line EngineError when the socket is missing, refuses or is not accessible."""
    if not os.path.exists(path):
        raise EngineError(f"{what}: socket {path} does not exist (engine not installed or not running; "
                          f"run scripts/setup-docker.sh, or start it: dockerd / podman system service)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PING_TIMEOUT_S)
    try:
        s.connect(path)
    except PermissionError:
        raise EngineError(f"{what}: permission denied on socket {path} (uid {os.getuid()}; add the user "
                          f"to the socket's group, e.g. 'docker', or run as root)") from None
    except ConnectionRefusedError:
        raise EngineError(f"{what}: socket {path} refuses connections (the engine is not running; "
                          f"run scripts/setup-docker.sh or start dockerd)") from None
    except OSError as e:
        raise EngineError(f"{what}: cannot connect to socket {path}: {e.strerror or e}") from None
    finally:
        s.close()


def docker_client(base_url: str | None = None, what: str = "docker"):
    """A connected docker SDK client for `base_url` (default: $DOCKER_HOST, else the docker socket).

    Raises EngineError (one line, naming the socket) when no engine answers there.
    """
    docker = _import_docker()
    base_url = base_url or os.environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"
    path = _socket_path(base_url)
    if path:
        _check_unix_socket(path, what)
    try:
        client = docker.DockerClient(base_url=base_url, version="auto", timeout=600)
        client.ping()
    except docker.errors.DockerException as e:
        raise EngineError(f"{what}: no engine answers at {base_url}: {' '.join(str(e).split())}") from None
    return client


def podman_socket() -> str:
    """Podman's Docker-compatible API socket: rootless ($XDG_RUNTIME_DIR) first, then rootful."""
    candidates = []
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "podman", "podman.sock"))
    candidates.append("/run/podman/podman.sock")
    for c in candidates:
        if os.path.exists(c):
            return c
    return candidates[0]
