# Sourced by the setup scripts (`. "$(dirname "$0")/state-dir.sh" "$@"`): cd to the repository,
# set REPO, and STATE_DIR = the first argument or the repository's .ci-state/, created, absolute.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
STATE_DIR=${1:-$REPO/.ci-state}
mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
