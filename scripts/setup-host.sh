#!/usr/bin/env bash
# Installs the Debian packages dirtylog needs on a Debian 12 host (run as root, or with sudo).
# The host's dpkg configuration is not changed: armhf packages are fetched by the builder itself.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
packages=(
  qemu-system-arm                                # the hypervisor under test (stock)
  gcc-arm-linux-gnueabihf libc6-dev-armhf-cross  # cross-compiler for dirtyram (armv7 hard-float)
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross  # dirtyram for aarch64 guests
  qemu-system-x86                              # x86_64 guests (q35)
  gcc libc6-dev make                           # dirtyram for x86_64 guests and for its tests
  gpgv debian-archive-keyring                  # authenticating the Debian archive
  cpio xz-utils ca-certificates git python3-venv
  device-tree-compiler rsync bc unzip file wget  # the Buildroot engine's host requirements
  ninja-build pkg-config patch meson libglib2.0-dev zlib1g-dev libfdt-dev  # QEMU with -savedirtylog
  openssh-client openssh-server iproute2       # two hosts (the tests make them with netns + sshd)
  # for the tests only: running armv7 binaries, negative ELF cases, a signed fake archive
  qemu-user-static gcc-arm-linux-gnueabi libc6-dev-armel-cross gpg gpg-agent
  chromium fonts-liberation                    # rendering the HTML report headless
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  # A security-suite index can fail to download during a mirror sync; the main suite still works.
  $SUDO apt-get update || echo "setup: apt-get update reported errors; trying the install anyway" >&2
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
