#!/usr/bin/env bash
# Makes this Debian 12 machine able to run `dirtylog build --runtime podman` (run as root, or with sudo).
# Idempotent: installs Debian's podman if missing, starts podman's Docker-compatible API service
# (rootful: unix:///run/podman/podman.sock) in the background if it does not answer (its log goes to
# STATE_DIR/podman-service.log), and puts the base image dirtylog-base:bookworm into podman's own
# storage if it is not there (podman cannot see docker's images): copied from docker with
# `docker save | podman load` when a docker engine has it, else made with debootstrap through the
# podman socket (python -m builder.baseimage, no registry used).
#
#   scripts/setup-podman.sh [STATE_DIR]     (default STATE_DIR: the repository's .ci-state/)
#
# Environment: PYTHON (default: .venv/bin/python, else python3) must have the docker SDK;
# DIRTYLOG_APT_MIRROR: Debian mirror for debootstrap (default: this machine's apt sources);
# PODMAN_WAIT (seconds, default 30); PODMAN_SOCKET (default /run/podman/podman.sock).
#
# Rootless podman (not what this script sets up): the socket is $XDG_RUNTIME_DIR/podman/podman.sock
# (`systemctl --user start podman.socket`, or `podman system service --time=0 &` as that user);
# builder.runtime looks there first. Its images are that user's, so run this import as the user too.
set -euo pipefail
. "$(dirname "$0")/state-dir.sh" "$@"
SOCK=${PODMAN_SOCKET:-/run/podman/podman.sock}
BASE=dirtylog-base:bookworm
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
say() { echo "setup-podman: $*" >&2; }
answers() { $SUDO curl -fsS --max-time 5 --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; }

# 1. packages: podman; catatonit, the init podman runs as pid 1 for `init=True` containers (podman
# only Recommends "catatonit | tini | dumb-init", and with docker.io's tini present apt skips it, but
# podman looks for /usr/libexec/podman/catatonit); debootstrap; curl for the socket check
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
[ -x /usr/libexec/podman/catatonit ] || missing+=(catatonit)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  $SUDO apt-get update || say "apt-get update reported errors; trying the install anyway"
  $SUDO apt-get install -y -q "${missing[@]}"
fi

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import docker" 2>/dev/null; then
  say "error: $PYTHON has no docker SDK; install dirtylog into it first (make setup, or pip install docker)"
  exit 2
fi

# 2. the Docker-compatible API service, rootful. Started by this script it runs with
# CONTAINERS_CONF=STATE_DIR/containers.conf when that file exists (written by step 4).
pidfile=$STATE_DIR/podman-service.pid
conf=$STATE_DIR/containers.conf
ours() { [ -f "$pidfile" ] && $SUDO kill -0 "$(cat "$pidfile")" 2>/dev/null; }
wait_for_service() {
  local wait_s=${PODMAN_WAIT:-30} i
  for ((i = 0; i < wait_s * 5; i++)); do
    answers && break
    sleep 0.2
  done
  if ! answers; then
    say "error: podman's API did not answer at $SOCK within ${wait_s}s; last lines of $STATE_DIR/podman-service.log:"
    tail -n 20 "$STATE_DIR/podman-service.log" >&2 || true
    exit 3
  fi
  say "podman's API answers at $SOCK"
}
start_service() {
  $SUDO rm -f "$SOCK"   # stale socket of a dead service
  $SUDO mkdir -p "$(dirname "$SOCK")"
  local env=()
  [ -f "$conf" ] && env=("CONTAINERS_CONF=$conf")
  say "starting podman system service${env:+ with ${env[*]}} (log: $STATE_DIR/podman-service.log)"
  # setsid + nohup: the service outlives this script and CI's shell; --time=0: never exits idle
  $SUDO env "${env[@]}" setsid nohup podman system service --time=0 "unix://$SOCK" \
    >>"$STATE_DIR/podman-service.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  wait_for_service
}
if answers; then
  say "podman's API answers at $SOCK"
elif ours; then
  say "podman system service (pid $(cat "$pidfile")) is running; waiting for its socket"
  wait_for_service
else
  start_service
fi

# 3. the base image in podman's storage
if $SUDO podman image exists "$BASE"; then
  say "base image $BASE present in podman"
elif command -v docker >/dev/null 2>&1 && docker image inspect "$BASE" >/dev/null 2>&1; then
  say "copying $BASE from docker (docker save | podman load)"
  docker save "$BASE" | $SUDO podman load -q >/dev/null
else
  say "making $BASE with debootstrap through podman's API"
  args=()
  [ -n "${DIRTYLOG_APT_MIRROR:-}" ] && args+=(--mirror "$DIRTYLOG_APT_MIRROR")
  $SUDO env DOCKER_HOST="unix://$SOCK" "$PYTHON" -m builder.baseimage "${args[@]}" >/dev/null
fi
say "base image ready in podman: $($SUDO podman image inspect --format '{{.Id}}' "$BASE")"

# 4. a container starts through the API as builder.runtime starts it (init, as a non-root uid).
# Rootful podman gives each container RLIMIT_NOFILE/NPROC of 1048576/4194304 unless told otherwise;
# where root lacks CAP_SYS_RESOURCE (inside another container or sandbox) runc then fails with
# "error setting rlimit type 7: operation not permitted". The cure is default_ulimits in a
# containers.conf equal to the service's own hard limits; this script's service gets one.
probe() {
  $SUDO "$PYTHON" - "$SOCK" "$BASE" <<'PY'
import sys, docker
sock, base = sys.argv[1:]
c = docker.DockerClient(base_url=f"unix://{sock}", version="auto", timeout=120)
try:
    out = c.containers.run(base, ["id", "-u"], entrypoint=["/usr/bin/env"], init=True, remove=True,
                           user="65534:65534", labels={"dirtylog.setup-probe": "1"})
except docker.errors.DockerException as e:
    print(" ".join(str(getattr(e, "explanation", None) or e).split()), file=sys.stderr)
    for ct in c.containers.list(all=True, filters={"label": "dirtylog.setup-probe"}):
        ct.remove(force=True)  # a container that failed to start stays behind despite remove=True
    sys.exit(1)
sys.exit(0 if out.strip() == b"65534" else 1)
PY
}
# A service started by an earlier run of this script whose state directory has since been removed
# (a deleted checkout) runs with a CONTAINERS_CONF that no longer exists: its containers fail to
# start (runc: "error setting rlimit", or "write child: broken pipe"). Adopt it, so it is restarted
# below with this state directory's containers.conf.
adopt_stale() {
  local pid cc
  ours && return 1
  pid=$(pgrep -o -f "podman system service .*$SOCK" || true)
  [ -n "$pid" ] || return 1
  cc=$($SUDO tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | sed -n 's/^CONTAINERS_CONF=//p')
  [ -n "$cc" ] && [ ! -e "$cc" ] || return 1
  say "the podman service (pid $pid) runs with a CONTAINERS_CONF that no longer exists ($cc): taking it over"
  echo "$pid" >"$pidfile"
}
if err=$(probe 2>&1); then
  say "a container starts through podman's API"
elif { [[ $err == *"error setting rlimit"* ]] || adopt_stale; } && ours; then
  pid=$(cat "$pidfile")
  nofile=$(awk '/^Max open files/{print $5}' "/proc/$pid/limits")
  nproc=$(awk '/^Max processes/{print $4}' "/proc/$pid/limits")
  say "containers cannot get podman's default rlimits here ($err); restarting the service with default_ulimits nofile=$nofile nproc=$nproc"
  printf '# written by scripts/setup-podman.sh: the podman service'"'"'s own hard limits\n[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n' \
    "$nofile" "$nofile" "$nproc" "$nproc" >"$conf"
  $SUDO kill "$pid"
  for ((i = 0; i < 50; i++)); do $SUDO kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  start_service
  if ! err=$(probe 2>&1); then
    say "error: a container still does not start through podman's API: $err"
    exit 3
  fi
  say "a container starts through podman's API"
else
  hint=""
  [[ $err == *"error setting rlimit"* ]] && hint=" (the service at $SOCK was not started by this script: give it a containers.conf with default_ulimits = [\"nofile=N:N\", \"nproc=N:N\"] within its own hard limits, or stop it and rerun this script)"
  say "error: a container does not start through podman's API: $err$hint"
  exit 3
fi
