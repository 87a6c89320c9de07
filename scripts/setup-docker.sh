#!/usr/bin/env bash
# Makes this Debian 12 machine able to build dirtylog in a container (run as root, or with sudo).
# Idempotent: installs Debian's docker.io and debootstrap if missing, starts dockerd in the
# background if no engine answers (its log goes to STATE_DIR/dockerd.log), and makes the local base
# image dirtylog-base:bookworm with debootstrap if the engine does not have it (no registry used).
#
#   scripts/setup-docker.sh [STATE_DIR]     (default STATE_DIR: the repository's .ci-state/)
#
# Environment: PYTHON (default: .venv/bin/python, else python3) must have the docker SDK;
# DIRTYLOG_APT_MIRROR: Debian mirror for debootstrap (default: this machine's apt sources);
# DOCKERD_WAIT (seconds, default 60).
set -euo pipefail
. "$(dirname "$0")/state-dir.sh" "$@"
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
say() { echo "setup-docker: $*" >&2; }

# 1. packages: dockerd (a docker client alone is not an engine) and debootstrap
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  $SUDO apt-get update || say "apt-get update reported errors; trying the install anyway"
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

# 2. an engine that answers
if docker info >/dev/null 2>&1; then
  say "a docker engine answers"
else
  if [ -S /var/run/docker.sock ] && ! pgrep -x dockerd >/dev/null; then
    $SUDO rm -f /var/run/docker.sock   # stale socket of a dead daemon
  fi
  if ! pgrep -x dockerd >/dev/null; then
    say "starting dockerd (log: $STATE_DIR/dockerd.log)"
    # setsid + nohup: the daemon outlives this script and CI's shell
    $SUDO setsid nohup dockerd >>"$STATE_DIR/dockerd.log" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/dockerd.pid"
  fi
  wait_s=${DOCKERD_WAIT:-60}
  for ((i = 0; i < wait_s; i++)); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    say "error: dockerd did not answer within ${wait_s}s; last lines of $STATE_DIR/dockerd.log:"
    tail -n 20 "$STATE_DIR/dockerd.log" >&2 || true
    exit 3
  fi
  say "dockerd answers"
fi

# 3. the base image (debootstrap, ~1 min the first time; nothing to do afterwards)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import docker" 2>/dev/null; then
  say "error: $PYTHON has no docker SDK; install dirtylog into it first (make setup, or pip install docker)"
  exit 2
fi
args=()
[ -n "${DIRTYLOG_APT_MIRROR:-}" ] && args+=(--mirror "$DIRTYLOG_APT_MIRROR")
$SUDO "$PYTHON" -m builder.baseimage "${args[@]}" >/dev/null
say "base image ready: $(docker image inspect --format '{{.Id}}' dirtylog-base:bookworm)"
