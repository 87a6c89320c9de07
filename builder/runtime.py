"""Where `dirtylog build` runs: on this host, or in a container (Docker, or Podman's Docker API).

One small class per runtime behind one interface (as tuxmake does)::

    rt = get_runtime("auto")          # "host" | "docker" | "podman" | "auto"
    manifest = rt.build(out, offline=False, mirror=None, cache_dir=None, log=print, arch="armv7")

The container runtimes build an image from the top-level Dockerfile (on the local base image made
by builder.baseimage), tagged by a hash of the Dockerfile and every project file copied into it, so
it is reused while they are unchanged. One container runs per build: the project mounted
read-only at /src (a checkout as itself; an installed dirtylog as its packages and project files,
builder.project.tree(), mounted one by one into the same layout), the output directory's parent read-write at /out, the download cache at /cache;
`dirtylog build` is executed in it as the calling user's uid:gid, so the files belong to the caller.
The code that runs is the mounted project (cwd /src, PYTHONPATH=/src: a checkout's manifest gets its
git commit, and the dirtyram sources are compiled from /src/dirtyram-src, mapped to "." by the Makefile's
-ffile-prefix-map); the image's installed copy of the same files provides the toolchain and the
Python dependencies, and since the tag is their hash the two never disagree.
The builder inside stages its outputs next to the output directory and moves them in at the end, so
a build that fails or is killed leaves nothing in it. The container is always removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import tarfile
import time
import uuid
from pathlib import Path

from builder.engine import DEFAULT_SOCKET, EngineError, docker_client, podman_socket  # noqa: F401 (re-exported)
from builder import project
from builder.errors import BuildError, BuildInputError

IMAGE_REPO = "dirtylog-builder"
# What the Dockerfile copies into the image: the image tag is a hash of exactly these.
IMAGE_INPUTS = ("pyproject.toml", "builder", "verifier", "dirtylog", "dirtyram-src")
_SKIP_NAMES = {"__pycache__", ".pytest_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".o")
_TAIL_LINES = 20


# -- image ----------------------------------------------------------------------------------------
def _context_files(dockerfile: Path) -> list[tuple[str, Path]]:
    """(name in the build context, file) for the Dockerfile and every file it copies, sorted."""
    files = [("Dockerfile", dockerfile)]
    tree = project.tree()
    for top in IMAGE_INPUTS:
        p = tree[top]
        if p.is_file():
            files.append((top, p))
            continue
        for root, dirs, names in os.walk(p):
            # an installed builder/ carries the project files too (builder/_project): not copied twice
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_NAMES
                             and not (top == "builder" and Path(root) == p and d == project.PACKAGED_DIR))
            for n in sorted(names):
                if n.endswith(_SKIP_SUFFIXES) or (top == "dirtyram-src" and n == "dirtyram"):
                    continue
                f = Path(root) / n
                files.append((f"{top}/{f.relative_to(p)}", f))
    return sorted(files)


def source_mounts() -> dict[str, dict]:
    """The docker volumes that show the project at /src: a checkout whole (its .git included, for the
    manifest's commit), an installed dirtylog as each of its packages and project files."""
    if project.is_checkout():
        return {str(project.root()): {"bind": "/src", "mode": "ro"}}
    return {str(path): {"bind": f"/src/{name}", "mode": "ro"} for name, path in project.tree().items()}


def build_context(dockerfile: Path) -> tuple[bytes, str]:
    """The build context as a tar (deterministic) and the sha256 of its contents."""
    h = hashlib.sha256()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in _context_files(dockerfile):
            data = path.read_bytes()
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            h.update(f"{name}\0{mode:o}\0{len(data)}\0".encode())
            h.update(data)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), h.hexdigest()


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _clean(text: str) -> str:
    return _ANSI.sub("", text)


def _step_of(lines: list[str], width: int = 160) -> str:
    for line in reversed(lines):
        if line.startswith(("Step ", "STEP ")):
            step = " ".join(line.split())
            return step if len(step) <= width else step[:width - 3] + "..."
    return "(no step reached)"


class ContainerRuntime:
    """A Docker-API engine (dockerd, or Podman's compatible service) running `dirtylog build`."""

    name = "docker"
    base_image = "dirtylog-base:bookworm"

    def __init__(self, base_url: str | None = None, dockerfile: Path | None = None,
                 apt_mirror: str | None = None, builder_uid: int = 1000, client=None,
                 as_user: tuple[int, int] | None = None, buildargs: dict[str, str] | None = None):
        self.base_url = base_url
        self.extra_buildargs = dict(buildargs or {})  # e.g. {"WITH_PYPI": "1"}; part of the image hash
        self.as_user = as_user  # (uid, gid) the build runs as; default: the caller's
        self._dockerfile = Path(dockerfile) if dockerfile else None
        self.apt_mirror = apt_mirror
        self.builder_uid = builder_uid
        self._client = client
        self.last_image_built = False  # whether the last ensure_image() had to build
        self.last_image_seconds = 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url or os.environ.get('DOCKER_HOST') or DEFAULT_SOCKET})"

    @property
    def dockerfile(self) -> Path:
        return self._dockerfile or project.path("Dockerfile")

    @property
    def client(self):
        if self._client is None:
            self._client = docker_client(self.base_url, what=self.name)
        return self._client

    def unusable(self) -> str | None:
        """Why this runtime cannot build here (for --runtime auto), or None: its engine does not
        answer, the Dockerfile is missing, or the base image is neither there nor can be made."""
        from builder.baseimage import find_image
        import shutil
        try:
            self.client  # noqa: B018
            if not self.dockerfile.is_file():
                return f"no Dockerfile at {self.dockerfile}"
            if find_image(self.client, self.base_image) is None:
                if shutil.which("debootstrap") is None:
                    return f"its engine has no {self.base_image} image and debootstrap, which makes it, is not installed"
                if os.geteuid() != 0:
                    return f"its engine has no {self.base_image} image and making it with debootstrap needs root"
        except BuildError as e:
            return str(e)
        return None

    def available(self) -> bool:
        try:
            self.client  # noqa: B018
        except BuildError:
            return False
        return True

    # image
    def ensure_image(self, log=lambda msg: None) -> tuple[str, str]:
        """(tag, image id) of the builder image; built only when no image has this content's hash."""
        from builder.baseimage import ensure_base_image, find_image
        import docker.errors
        t0 = time.monotonic()
        self.last_image_built = False
        if not self.dockerfile.is_file():
            raise BuildInputError(f"{self.name}: no Dockerfile at {self.dockerfile}")
        base_id = ensure_base_image(self.base_image, client=self.client, log=log)
        context, digest = build_context(self.dockerfile)
        buildargs = {"BASE_IMAGE": self.base_image, "BUILDER_UID": str(self.builder_uid),
                     "BUILDER_GID": str(self.builder_uid), **self.extra_buildargs}
        key = hashlib.sha256(f"{digest}\0{base_id}\0{json.dumps(buildargs, sort_keys=True)}".encode())
        tag = f"{IMAGE_REPO}:{key.hexdigest()[:16]}"
        image = find_image(self.client, tag)
        if image is not None:
            self.last_image_seconds = time.monotonic() - t0
            log(f"{self.name}: reusing image {tag} ({image.short_id})")
            return tag, image.id
        if self.apt_mirror:
            buildargs["APT_MIRROR"] = self.apt_mirror
        log(f"{self.name}: building image {tag} from {self.dockerfile}")
        lines: list[str] = []
        try:
            for chunk in self.client.api.build(fileobj=io.BytesIO(context), custom_context=True, tag=tag,
                                               buildargs=buildargs, rm=True, forcerm=True, decode=True,
                                               labels={"dirtylog.context-sha256": digest}):
                if "stream" in chunk:
                    for line in _clean(chunk["stream"]).splitlines():
                        if line.strip():
                            lines.append(line)
                            if line.startswith("Step "):
                                log(f"{self.name}:   {line.strip()}")
                if "error" in chunk or "errorDetail" in chunk:
                    err = _clean(chunk.get("error") or chunk["errorDetail"].get("message", ""))
                    tail = "\n".join(lines[-_TAIL_LINES:])
                    raise BuildError(f"{self.name}: building image {tag} failed at {_step_of(lines)}: "
                                     f"{' '.join(err.split())}\n{tail}")
        except docker.errors.APIError as e:
            raise BuildError(f"{self.name}: building image {tag} failed at {_step_of(lines)}: "
                             f"{' '.join(str(e.explanation or e).split())}") from None
        image = find_image(self.client, tag)
        if image is None:
            raise BuildError(f"{self.name}: image {tag} missing after its build:\n{chr(10).join(lines[-_TAIL_LINES:])}")
        self.last_image_built = True
        self.last_image_seconds = time.monotonic() - t0
        log(f"{self.name}: image {tag} built in {self.last_image_seconds:.0f}s")
        return tag, image.id

    # build
    def build(self, out: Path, offline: bool = False, mirror: str | None = None,
              cache_dir: Path | None = None, log=lambda msg: None, arch: str = "armv7") -> dict:
        from builder.cache import default_cache_dir
        out = Path(out).absolute()
        if out.exists() and not out.is_dir():
            raise BuildInputError(f"--out {out} exists and is not a directory")
        if out.parent == out:
            raise BuildInputError(f"--out {out}: cannot be the root directory")
        cache = Path(cache_dir or default_cache_dir()).absolute()
        cache.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        if mirror is None and not offline:
            # the host's apt sources name the mirror; the image's are only a fallback
            try:
                from builder.apt_sources import find_mirror
                mirror = find_mirror("bookworm")
            except BuildInputError:
                pass
        tag, image_id = self.ensure_image(log=log)

        cmd = ["python3", "-m", "dirtylog.cli", "build", "--runtime", "host", "--out", f"/out/{out.name}", "--cache-dir", "/cache"]
        if arch != "armv7":
            cmd += ["--arch", arch]
        if offline:
            cmd.append("--offline")
        if mirror:
            cmd += ["--mirror", mirror]
        before = set(out.parent.glob(f".{out.name}.staging-*"))
        ok = False
        try:
            self._run_in_container(tag, cmd, cache, {str(out.parent): {"bind": "/out", "mode": "rw"}}, log,
                                   killed_note=f"nothing was written to {out}")
            ok = True
        finally:
            if not ok:  # staging dirs of a builder that was killed before its own cleanup
                import shutil
                for p in set(out.parent.glob(f".{out.name}.staging-*")) - before:
                    shutil.rmtree(p, ignore_errors=True)

        return self._amend_manifest(out, {
            "runtime": self.name, "image_id": image_id, "image": tag,
            "reproducer": (f"dirtylog build --runtime {self.name}" + ("" if arch == "armv7" else f" --arch {arch}")
                           + f" --out {shlex.quote(str(out))} --offline" + project.reproducer_note())})

    def build_buildroot(self, out: Path, defconfig: str, *, buildroot_dir: Path | None = None,
                        buildroot_url: str | None = None, dl_dir: Path | None = None, offline: bool = False,
                        toolchain: str = "buildroot", fragments=(), cache_dir: Path | None = None,
                        log=lambda msg: None) -> dict:
        """The Buildroot engine in this runtime's container: `dirtylog build --engine buildroot --runtime
        host` runs there with the Buildroot tree, the download directory (read-write), each fragment and
        every local path the fragments name mounted at the same absolute paths (read-only), the cache at
        /cache (Buildroot's output directory: /cache/buildroot-build/in-<runtime>/, its own, apart from
        the host's builds), the output directory's parent at /out. The pinned Buildroot release is
        fetched on the host first (the container may not reach its site) into the shared cache."""
        from builder import buildroot as br
        from builder.cache import default_cache_dir
        out = Path(out).absolute()
        if out.parent == out:
            raise BuildInputError(f"--out {out}: cannot be the root directory")
        br.check_inputs(out, defconfig, dl_dir=dl_dir, offline=offline, toolchain=toolchain, fragments=fragments)
        br.container_mounts(buildroot_dir, dl_dir, fragments)  # its input errors before anything is downloaded
        cache = Path(cache_dir or default_cache_dir()).absolute()
        tree, source = br.resolve_buildroot(buildroot_dir, cache_dir=cache, buildroot_url=buildroot_url,
                                            offline=offline, log=log)
        mounts = br.container_mounts(tree, dl_dir, fragments)
        cache.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tag, image_id = self.ensure_image(log=log)

        arch = next((a for a, d in br.ARCH_DEFCONFIGS.items() if d == defconfig), "armv7")
        cmd = ["python3", "-m", "dirtylog.cli", "build", "--engine", "buildroot", "--runtime", "host",
               "--arch", arch, "--buildroot-dir", str(tree), "--toolchain", toolchain,
               "--out", f"/out/{out.name}", "--cache-dir", "/cache"]
        if dl_dir is not None:
            cmd += ["--dl-dir", str(Path(dl_dir).resolve())]
        if offline:
            cmd.append("--offline")
        for f in fragments:
            cmd += ["--br2-fragment", str(Path(f).resolve())]
        volumes = {path: {"bind": path, "mode": mode} for path, mode in mounts.items()}
        volumes[str(out.parent)] = {"bind": "/out", "mode": "rw"}
        for path, mode in mounts.items():
            log(f"{self.name}: mount {path} ({mode})")
        before = set(out.parent.glob(f".{out.name}.staging-*"))
        ok = False
        try:
            self._run_in_container(tag, cmd, cache, volumes, log, killed_note=f"nothing was written to {out}",
                                   extra_env={br.BUILD_ROOT_ENV: f"/cache/buildroot-build/in-{self.name}"})
            ok = True
        finally:
            if not ok:
                import shutil
                for p in set(out.parent.glob(f".{out.name}.staging-*")) - before:
                    shutil.rmtree(p, ignore_errors=True)
        old = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
        sources = dict(old.get("sources") or {})
        pinned = "sha256" in source  # then the tree the container saw is the release's unpacked copy
        sources["buildroot"] = {**{k: v for k, v in (sources.get("buildroot") or {}).items()
                                   if not (pinned and k == "tree")}, **source}
        return self._amend_manifest(out, {
            "runtime": self.name, "image_id": image_id, "image": tag, "sources": sources,
            "reproducer": br.reproducer(out, defconfig, toolchain=toolchain, runtime=self.name,
                                        buildroot_dir=None if pinned else tree,
                                        buildroot_url=source.get("url") if pinned else None,
                                        dl_dir=dl_dir, fragments=fragments)})

    def _amend_manifest(self, out: Path, updates: dict) -> dict:
        """Add the runtime's keys to the manifest the container wrote, keeping its owner and mode."""
        from builder.manifest import amend_manifest
        return amend_manifest(out, updates, what=f"{self.name}: the container's build")

    def _run_in_container(self, tag: str, cmd: list[str], cache: Path, volumes: dict, log,
                          killed_note: str = "", extra_env: dict | None = None) -> None:
        """Run `cmd` in one fresh container of `tag` (the project at /src read-only, cache at /cache),
        as the calling user; map its exit status to typed errors; always remove the container."""
        import docker.errors
        uid, gid = self.as_user or (os.getuid(), os.getgid())
        env = {"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": "/src",
               "DIRTYLOG_CACHE": "/cache"}
        if "SOURCE_DATE_EPOCH" in os.environ:
            env["SOURCE_DATE_EPOCH"] = os.environ["SOURCE_DATE_EPOCH"]
        env.update(extra_env or {})
        niceness = os.nice(0)
        if niceness > 0:  # the engine starts it, not this process: pass the caller's `nice` on
            cmd = ["nice", "-n", str(niceness), *cmd]
        name = f"dirtylog-build-{uuid.uuid4().hex[:12]}"
        container = None
        note = f"; {killed_note}" if killed_note else ""
        try:
            container = self.client.containers.run(
                tag, ["sleep", "infinity"], entrypoint=[], name=name, detach=True, auto_remove=False,
                user=f"{uid}:{gid}", working_dir="/src", environment=env, init=True,
                labels={"dirtylog.build": "1"},
                volumes={**source_mounts(), str(cache): {"bind": "/cache", "mode": "rw"}, **volumes})
            log(f"{self.name}: container {name} ({tag}) running: {shlex.join(cmd)}")
            code, stderr_tail = self._exec(container, cmd, env, f"{uid}:{gid}", log)
            if code is None or code in (137, 143) or not self._running(container):
                raise BuildError(f"{self.name}: container {name} was killed mid-build"
                                 f"{'' if code is None else f' (exit status {code})'}{note}")
            if code == 2:
                raise BuildInputError(f"{self.name}: {stderr_tail or 'dirtylog build: input error'}")
            if code == 130:
                raise KeyboardInterrupt
            if code != 0:
                raise BuildError(f"{self.name}: {shlex.join(cmd[:4])} in the container failed (exit status "
                                 f"{code}): {stderr_tail or 'no error message'}")
        except docker.errors.NotFound:
            raise BuildError(f"{self.name}: container {name} disappeared mid-build (killed or removed)"
                             f"{note}") from None
        except docker.errors.APIError as e:
            raise BuildError(f"{self.name}: {' '.join(str(e.explanation or e).split())}") from None
        finally:
            try:  # by name: also when interrupted between its creation and run() returning
                (container or self.client.containers.get(name)).remove(force=True)
            except docker.errors.APIError:  # NotFound included: never created, or already gone
                pass

    def build_qemu(self, version: str, cache_dir: Path | None = None, mirror: str | None = None,
                   offline: bool = False, log=lambda msg: None) -> None:
        """Build the patched QEMU inside the container into the shared cache. The pinned sources
        are fetched on the host first (containers may not reach PyPI for the meson wheel), so the
        container builds offline; the host then finds the build in the cache by its key."""
        from builder.cache import Cache, default_cache_dir
        from builder.qemu_build import prefetch_sources
        cache = Path(cache_dir or default_cache_dir()).absolute()
        cache.mkdir(parents=True, exist_ok=True)
        prefetch_sources(version, Cache(cache), mirror=mirror, offline=offline, log=log)
        tag, _ = self.ensure_image(log=log)
        self._run_in_container(tag, ["python3", "-m", "builder.qemu_build", "--version", version, "--offline",
                                     "--cache-dir", "/cache"], cache, {}, log)

    def _running(self, container) -> bool:
        container.reload()
        return container.status == "running"

    def _exec(self, container, cmd, env, user, log) -> tuple[int | None, str]:
        """Run cmd in the container, relaying its lines to log; (exit code, last stderr line)."""
        api = self.client.api
        ex = api.exec_create(container.id, cmd, user=user, environment=env, workdir="/src",
                             stdout=True, stderr=True)
        last_err = ""
        pending = {1: "", 2: ""}
        for out_chunk, err_chunk in api.exec_start(ex["Id"], stream=True, demux=True):
            for fd, chunk in ((1, out_chunk), (2, err_chunk)):
                if not chunk:
                    continue
                pending[fd] += chunk.decode(errors="replace")
                *lines, pending[fd] = pending[fd].split("\n")
                for line in lines:
                    line = line.rstrip("\r")
                    if not line.strip():
                        continue
                    if fd == 2:
                        last_err = line
                    log(f"{self.name}: | {line.removeprefix('dirtylog: ')}")
        if pending[2].strip():
            last_err = pending[2].strip()
        code = api.exec_inspect(ex["Id"]).get("ExitCode")
        return code, last_err.removeprefix("dirtylog: error: ").strip()


class DockerRuntime(ContainerRuntime):
    name = "docker"


def _podman_client(client):
    """`client` (a connected docker SDK client) with the Docker-API differences of podman smoothed over.

    Podman's compat API (4.3, Debian 12) ignores an empty Entrypoint list and runs the image's
    ENTRYPOINT ("dirtylog sleep infinity" here): docker's `entrypoint=[]`, "no entrypoint, run the
    command", is sent instead as the command's first word as the entrypoint, which both engines read
    alike.
    """
    import docker
    from docker.models.containers import ContainerCollection

    class PodmanContainers(ContainerCollection):
        def run(self, image, command=None, **kw):
            if kw.get("entrypoint") == [] and isinstance(command, (list, tuple)) and command:
                kw["entrypoint"], command = list(command[:1]), list(command[1:])
            return super().run(image, command, **kw)

        def create(self, image, command=None, **kw):
            if kw.get("entrypoint") == [] and isinstance(command, (list, tuple)) and command:
                kw["entrypoint"], command = list(command[:1]), list(command[1:])
            return super().create(image, command, **kw)

    class PodmanClient(docker.DockerClient):
        def __init__(self, api):  # noqa: super().__init__ would connect again
            self.api = api

        @property
        def containers(self):
            return PodmanContainers(client=self)

    return PodmanClient(client.api)


_PODMAN_HINT = re.compile(r" \((?:engine not installed|the engine is not running)[^)]*\)$")


class PodmanRuntime(ContainerRuntime):
    """Podman through its Docker-compatible API service (`podman system service`).

    Rootful: the service listens on /run/podman/podman.sock (scripts/setup-podman.sh starts it as
    root); rootless: on $XDG_RUNTIME_DIR/podman/podman.sock (`systemctl --user start podman.socket`),
    tried first. Each has its own image storage, which needs dirtylog-base:bookworm (the setup script
    copies it from docker or makes it). The build runs as the caller's uid:gid like with docker;
    rootful podman as root maps uids 1:1, so the files are the caller's. Rootless podman maps the
    caller to root in the container and other uids to subordinate ids, so there the container would
    need `--userns=keep-id` (not passed here: this runtime is used rootful).
    """

    name = "podman"

    def __init__(self, base_url: str | None = None, **kw):
        super().__init__(base_url or f"unix://{podman_socket()}", **kw)

    def __repr__(self) -> str:
        return f"PodmanRuntime({self.base_url})"

    @property
    def client(self):
        if self._client is None:
            try:
                client = docker_client(self.base_url, what=self.name)
            except EngineError as e:  # the socket's hint names podman's service, not dockerd
                msg = _PODMAN_HINT.sub(" (podman's API service is not running; run scripts/setup-podman.sh as root, "
                                       "or start it: podman system service --time=0 "
                                       f"{self.base_url})", str(e))
                raise EngineError(msg) from None
            self._client = _podman_client(client)
        return self._client


class HostRuntime:
    """`dirtylog build` right here, with this machine's cross-compiler."""

    name = "host"

    def __repr__(self) -> str:
        return "HostRuntime()"

    def available(self) -> bool:
        return True

    def build(self, out: Path, offline: bool = False, mirror: str | None = None,
              cache_dir: Path | None = None, log=lambda msg: None, arch: str = "armv7") -> dict:
        from builder.build import build_artifacts
        kw = {} if arch == "armv7" else {"arch": arch}
        return build_artifacts(Path(out), offline=offline, mirror=mirror, cache_dir=cache_dir, log=log, **kw)

    def build_buildroot(self, out: Path, defconfig: str, **kw) -> dict:
        from builder.buildroot import build_with_buildroot
        return build_with_buildroot(Path(out), defconfig, **kw)


RUNTIMES = {"host": HostRuntime, "docker": DockerRuntime, "podman": PodmanRuntime}


def get_runtime(name: str = "auto", log=lambda msg: None, warn=None, **kw):
    """The runtime called `name`. "auto" is docker, else podman, if it can build here (its engine
    answers, the Dockerfile is at hand, and the base image is there or can be made: debootstrap and
    root), else host; `log` gets one line saying which, `warn` (default: log) why not a container.

    A named container runtime is connected right away, so a missing engine is an EngineError here.
    """
    if name == "auto":
        why = []
        for cls in (DockerRuntime, PodmanRuntime):
            rt = cls(**kw)
            reason = rt.unusable()
            if reason is None:
                log(f"runtime: {rt.name} (auto: it can build here)")
                return rt
            why.append(reason if reason.startswith(f"{rt.name}: ") else f"{rt.name}: {reason}")
        (warn or log)(f"runtime: host (auto: no container runtime can build here; {'; '.join(why)})")
        return HostRuntime()
    if name not in RUNTIMES:
        raise BuildInputError(f"unknown runtime {name!r}; choose one of: auto, {', '.join(RUNTIMES)}")
    rt = RUNTIMES[name](**kw) if name != "host" else HostRuntime()
    if name != "host":
        rt.client  # noqa: B018  (raises EngineError, one line, naming the socket)
    log(f"runtime: {rt.name}")
    return rt
