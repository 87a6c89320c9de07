#!/bin/sh
# Buildroot post-image script: publishes the dirtylog guest artifacts under their
# dirtylog names and has builder/manifest.py write manifest.json (the same schema as
# builder/build.py writes it) into BINARIES_DIR/dirtylog/.
#
# Usage (by Buildroot): post-image.sh BINARIES_DIR ARCH     ARCH: armv7 | aarch64
# Environment (exported by Buildroot): BR2_CONFIG, TARGET_DIR, HOST_DIR, BR2_VERSION,
# SOURCE_DATE_EPOCH (with BR2_REPRODUCIBLE=y). Needs sh, sed and python3 (which Buildroot itself needs).
set -eu

binaries_dir=$1
arch=${2:-armv7}
target_dir=${TARGET_DIR:?TARGET_DIR is not set (run by Buildroot?)}
config=${BR2_CONFIG:?BR2_CONFIG is not set (run by Buildroot?)}
external=$(cd "$(dirname "$0")/../.." && pwd)
repo=$(cd "$external/.." && pwd)

# Per architecture: Buildroot's image -> dirtylog's name, and how the guest boots.
# (builder/build.py's ARCH_BUILDS holds the same names for the Debian engine.)
case "$arch" in
armv7)
	kernel_src=zImage kernel=zImage kernel_format="ARM zImage"
	dtb_src=vexpress-v2p-ca15-tc1.dtb dtb=guest_a15x2.dtb
	workload=dirtyram.arm machine=vexpress-a15 console=ttyAMA0
	min_mem_mb=32  # the CMA-free vexpress kernel (board/dirtylog/linux-vexpress.fragment)
	# RAM the guest keeps for itself (the verifier's workload budget is the rest): measured with
	# -m 32 and the 2014 workloads (4.2 MiB) running, MemAvailable 11 MiB, so about 17 MiB.
	reserved_mb=20
	;;
aarch64)
	kernel_src=Image kernel=Image kernel_format="arm64 Image"
	dtb_src= dtb=  # QEMU's virt machine makes its own device tree
	workload=dirtyram.aarch64 machine=virt-aarch64 console=ttyAMA0
	min_mem_mb=128  # not measured yet: the verifier's default for virt-aarch64
	reserved_mb=40  # not measured yet: the verifier's default
	;;
*)
	echo "post-image.sh: unknown architecture '$arch' (armv7 or aarch64)" >&2
	exit 1
	;;
esac
initrd_src=rootfs.cpio.gz initrd=initrd.cpio-dirtyram.gz
workload_path=/root/dirtyram.arm  # where /init finds dirtyram, on every architecture

# The value of a string or bool option in Buildroot's .config ("" when unset).
config_value() {
	sed -n "s/^$1=\"\{0,1\}\([^\"]*\)\"\{0,1\}\$/\1/p" "$config" | tail -n 1
}

stage="$binaries_dir/dirtylog.new"
final="$binaries_dir/dirtylog"
rm -rf "$stage"
mkdir -p "$stage"

publish() {  # SOURCE NAME
	if [ ! -f "$1" ]; then
		echo "post-image.sh: $1 is missing (is it enabled in the defconfig?)" >&2
		exit 1
	fi
	cp "$1" "$stage/$2"
}
publish "$binaries_dir/$kernel_src" "$kernel"
[ -z "$dtb" ] || publish "$binaries_dir/$dtb_src" "$dtb"
publish "$binaries_dir/$initrd_src" "$initrd"
publish "$target_dir$workload_path" "$workload"

defconfig=$(basename "$(config_value BR2_DEFCONFIG)" 2>/dev/null || true)
kernel_version=$(config_value BR2_LINUX_KERNEL_VERSION)  # "custom" for a custom tarball
kernel_tarball=$(config_value BR2_LINUX_KERNEL_CUSTOM_TARBALL_LOCATION)
kernel_release=
for f in "$(dirname "$config")"/build/linux-*/include/config/kernel.release; do
	[ -f "$f" ] && kernel_release=$(cat "$f") && break
done
if [ "$(config_value BR2_TOOLCHAIN_EXTERNAL)" = y ]; then
	toolchain="external $(config_value BR2_TOOLCHAIN_EXTERNAL_PREFIX)"
else
	toolchain=buildroot
fi
compiler=
for cc in "${HOST_DIR:-/nonexistent}"/bin/*-linux-*-gcc; do
	[ -x "$cc" ] || continue
	compiler="$(basename "$cc") $("$cc" -dumpfullversion 2>/dev/null || "$cc" -dumpversion)"
	break
done
# dirtylog passes its commit (empty when installed); run by hand, the checkout's
git_commit=${DIRTYLOG_GIT_COMMIT-$(git -C "$repo" rev-parse HEAD 2>/dev/null || true)}
epoch=${SOURCE_DATE_EPOCH:-}
br_version=${BR2_VERSION:-unknown}
br_dir=$(pwd)  # Buildroot runs this script from its top directory
build_dir=$(dirname "$config")

# The manifest itself is written by dirtylog's one manifest writer (builder/manifest.py, standard
# library only); this script only gathers the facts.
PYTHONPATH="${DIRTYLOG_PYTHONPATH:-$repo}${PYTHONPATH:+:$PYTHONPATH}" python3 -m builder.manifest buildroot "$stage" \
	arch="$arch" machine="$machine" min_mem_mb="$min_mem_mb" reserved_mb="$reserved_mb" \
	console="$console" workload_path="$workload_path" kernel_format="$kernel_format" \
	kernel="$kernel" dtb="$dtb" initrd="$initrd" workload="$workload" \
	br_version="$br_version" defconfig="$defconfig" kernel_version="$kernel_version" \
	kernel_release="$kernel_release" kernel_tarball="$kernel_tarball" toolchain="$toolchain" \
	git_commit="$git_commit" compiler="$compiler" host="$(uname -s) $(uname -m)" epoch="$epoch" \
	reproducer="make -C $br_dir O=$build_dir BR2_EXTERNAL=$external ${defconfig:-<defconfig>} && make -C $build_dir"

rm -rf "$final"
mv "$stage" "$final"
echo "post-image.sh: dirtylog artifacts in $final"
