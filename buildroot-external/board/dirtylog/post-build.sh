#!/bin/sh
# Buildroot post-build script: installs the guest's /init. There is one /init in
# the repository, builder/guest/init, which the Debian engine packs as well.
# Usage (by Buildroot): post-build.sh TARGET_DIR [ARGS...]
set -eu
target_dir=$1
repo=$(cd "$(dirname "$0")/../../.." && pwd)
install -m 0755 "$repo/builder/guest/init" "$target_dir/init"
