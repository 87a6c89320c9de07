#!/usr/bin/env bash
# `make test-fast`: the unit tests, as a newcomer's machine would run them. Run as root (CI, a fresh
# machine), it proves they need neither network nor cross-compilers nor root: the tests run in a
# new network namespace (loopback only), with every cross-compiler masked (a bind mount of /dev/null
# in a new mount namespace), with every capability dropped (root's uid stays, because this machine's
# Python may live under /root, but nothing a capability allows: no mount, no namespace, no reading
# another user's files, no raw sockets). Run as anyone else, they just run.
# A test that needs one of those is marked (build, cross, network, root, e2e, container, qemu_build,
# two_hosts)
# and is not in this set; tests/conftest.py marks the ones that use the built-artifact fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
MARKS="not e2e and not container and not qemu_build and not two_hosts and not build and not cross and not network and not root"
if [ "$(id -u)" != 0 ] || [ -n "${DIRTYLOG_NO_SANDBOX:-}" ]; then
    exec "$PY" -m pytest -q -rs -p no:cacheprovider -m "$MARKS" "$@"
fi
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
unshare --net --mount --propagation private bash -euo pipefail -c '
    ip link set lo up 2>/dev/null || true
    for c in /usr/bin/*-linux-gnu*-gcc* /usr/bin/*-linux-gnu*-cpp* /usr/bin/*-linux-gnu*-as \
             /usr/bin/*-linux-gnu*-ld* /usr/bin/*-linux-gnueabi*-gcc* /usr/bin/*-linux-gnueabi*-as \
             /usr/bin/*-linux-gnueabi*-ld*; do
        [ -e "$c" ] && [ "${c#/usr/bin/$(uname -m)-linux-gnu}" = "$c" ] && mount --bind /dev/null "$c"
    done
    home=$1; py=$2; marks=$3; shift 3
    exec setpriv --inh-caps=-all --ambient-caps=-all --bounding-set=-all env HOME="$home" TMPDIR="$home" \
        DIRTYLOG_CACHE="$home/cache" "$py" -m pytest -q -rs -p no:cacheprovider -m "$marks" "$@"
' bash "$home" "$PY" "$MARKS" "$@"
