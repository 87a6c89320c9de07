#!/usr/bin/env bash
# The fresh-machine guard: does scripts/setup-host.sh install everything the tests run?
#
# Starts a container from the debootstrap base image (nothing installed beyond minbase), copies
# the repository's tracked files into it, runs scripts/setup-host.sh there, installs dirtylog into
# a venv from a wheelhouse made on this machine (containers here cannot reach PyPI), and runs the
# tests that need no QEMU boot, no container engine and no root-only networking, with every skip
# turned into a failure (DIRTYLOG_NO_SKIPS=1): a program a test needs and setup never installs
# then fails the check instead of hiding behind "not installed".
#
#   scripts/check-setup.sh [STATE_DIR]   (default: the repository's .ci-state/; needs
#                                         scripts/setup-docker.sh to have run: engine + base image)
# Environment: PYTHON (default .venv/bin/python) makes the wheelhouse; BASE_IMAGE (default
# dirtylog-base:bookworm).
set -euo pipefail
. "$(dirname "$0")/state-dir.sh" "$@"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
BASE_IMAGE=${BASE_IMAGE:-dirtylog-base:bookworm}
say() { echo "check-setup: $*" >&2; }

# The tests that must pass on a machine that has only what setup-host.sh installs.
TESTS=(tests/test_elfcheck.py tests/test_cpio.py tests/test_archive.py tests/test_initrd.py
       tests/test_dirtyram.py tests/test_reports.py)

docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || {
  say "error: no image $BASE_IMAGE; run scripts/setup-docker.sh (or make setup-docker) first"; exit 2; }

start=$(date +%s)
src=$STATE_DIR/check-setup-src
rm -rf "$src" && mkdir -p "$src"
git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 cp --parents -t "$src")

wheels=$STATE_DIR/check-setup-wheels
rm -rf "$wheels" && mkdir -p "$wheels"
say "wheelhouse for dirtylog[test] (on this machine, which reaches PyPI; built from the copy)"
"$PYTHON" -m pip wheel --quiet --wheel-dir "$wheels" "$src[test]" "setuptools>=64"
rm -rf "$src/build" "$src"/*.egg-info

name=dirtylog-check-setup-$$
cleanup() { docker rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$src"; }
trap cleanup EXIT
say "running setup-host.sh and the tests in a container from $BASE_IMAGE"
# The tests run as root in the container like CI; chromium there needs --no-sandbox (the tests pass it).
docker run --name "$name" --rm -i \
  -v "$src:/src:ro" -v "$wheels:/wheels:ro" \
  -e DIRTYLOG_NO_SKIPS=1 -e DEBIAN_FRONTEND=noninteractive \
  "$BASE_IMAGE" bash -euo pipefail -c "
    cp -a /src /work && cd /work
    bash scripts/setup-host.sh
    python3 -m venv /venv
    /venv/bin/pip install --quiet --no-index --find-links /wheels '.[test]'
    /venv/bin/python -m pytest -q -rs -p no:cacheprovider ${TESTS[*]}
  "
say "passed in $(( $(date +%s) - start )) s"
