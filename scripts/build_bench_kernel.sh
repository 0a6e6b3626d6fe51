#!/bin/bash
# Build the bench kernel: Debian's linux-source-6.12 with iommufd, VFIO cdev, the legacy VFIO
# container, the Intel/AMD/virtio IOMMUs, NVMe and what virtme-ng needs, all built in.
#
#   scripts/build_bench_kernel.sh [--print-path]
#
# The result lives in a cache outside the checkout ($IOMMU_DMA_CACHE, default
# /var/cache/iommu-dma) under a key made of the kernel source version and this script's
# configuration, and is reused while both are unchanged:
#   KEY/bzImage, KEY/config, KEY/headers/include (the kernel's uapi headers, for checking
#   struct layouts), KEY/build.log.
# --print-path prints KEY/bzImage when it is built (exit 0) or nothing (exit 1).
set -euo pipefail

SRC_PACKAGE=linux-source-6.12
BUILD_PACKAGES="$SRC_PACKAGE bc bison flex libelf-dev libssl-dev cpio build-essential xz-utils"
CACHE=${IOMMU_DMA_CACHE:-/var/cache/iommu-dma}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV_BIN=${IOMMU_DMA_VENV_BIN:-$HERE/../.venv/bin}

# Options on top of `vng --kconfig` (scripts/config syntax: -e NAME / -d NAME / --set-val).
ENABLE="IOMMU_SUPPORT IOMMUFD VFIO VFIO_GROUP VFIO_CONTAINER VFIO_DEVICE_CDEV VFIO_PCI
        INTEL_IOMMU IRQ_REMAP X86_X2APIC AMD_IOMMU VIRTIO_IOMMU ACPI_VIOT HOTPLUG_PCI
        HOTPLUG_PCI_PCIE PCIEPORTBUS NVME_CORE BLK_DEV_NVME NVME_MULTIPATH BLK_DEV_ZONED
        BLK_DEV_INTEGRITY EXT4_FS BLK_DEV_LOOP BLK_DEV_NBD 9P_FS NET_9P NET_9P_VIRTIO
        VIRTIO_PCI VIRTIO_CONSOLE OVERLAY_FS TMPFS DEVTMPFS DEVTMPFS_MOUNT EVENTFD"
# INTEL_IOMMU_SVM needs more than the bench has; IOMMUFD_VFIO_CONTAINER would replace the
# legacy type1 container we also test. Graphics, sound and KVM only cost build time.
DISABLE="INTEL_IOMMU_SVM IOMMUFD_VFIO_CONTAINER DRM SOUND KVM DEBUG_INFO_DWARF5
         DEBUG_INFO_DWARF4 DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT"
SELECT="DEBUG_INFO_NONE"

say() { echo "build_bench_kernel: $*" >&2; }

install_packages() {
    local missing="" p
    for p in $BUILD_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        say "installing Debian packages:$missing"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >&2
    fi
}

source_version() {
    dpkg-query -W -f='${Version}' "$SRC_PACKAGE" 2>/dev/null || echo none
}

cache_key() {
    { source_version; echo "$ENABLE"; echo "$DISABLE"; echo "$SELECT"; } | sha256sum | cut -c1-16
}

configure() {
    local tree=$1 opt
    (cd "$tree" && PATH="$VENV_BIN:$PATH" vng --kconfig >&2)
    for opt in $ENABLE; do "$tree/scripts/config" --file "$tree/.config" -e "$opt"; done
    for opt in $DISABLE; do "$tree/scripts/config" --file "$tree/.config" -d "$opt"; done
    for opt in $SELECT; do "$tree/scripts/config" --file "$tree/.config" -e "$opt"; done
    make -C "$tree" olddefconfig >&2
    for opt in IOMMUFD VFIO_DEVICE_CDEV VFIO_CONTAINER INTEL_IOMMU VIRTIO_IOMMU BLK_DEV_NVME; do
        grep -q "^CONFIG_$opt=y" "$tree/.config" || { say "CONFIG_$opt did not stick"; exit 1; }
    done
}

build() {
    local out=$1 work tarball
    tarball=$(ls /usr/src/linux-source-6.12*.tar.xz | head -n1)
    work="$CACHE/kernel/work"
    rm -rf "$work"
    mkdir -p "$work"
    say "unpacking $tarball"
    tar -C "$work" -xf "$tarball"
    local tree
    tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
    configure "$tree"
    say "building $(basename "$tree") with $(nproc) jobs (about 15-20 minutes on 2 cores)"
    nice make -C "$tree" -j"$(nproc)" bzImage >&2
    make -C "$tree" headers_install INSTALL_HDR_PATH="$out.tmp/headers" >&2
    cp "$tree/arch/x86/boot/bzImage" "$out.tmp/bzImage"
    cp "$tree/.config" "$out.tmp/config"
    rm -rf "$out" && mv "$out.tmp" "$out"
    rm -rf "$work"
}

main() {
    local key out start log rc
    if [ "${1:-}" = "--print-path" ]; then
        key=$(cache_key)
        [ -f "$CACHE/kernel/$key/bzImage" ] || exit 1
        echo "$CACHE/kernel/$key/bzImage"
        exit 0
    fi
    # one build at a time: a second caller waits here, then finds the first one's result
    mkdir -p "$CACHE/kernel"
    exec 9>"$CACHE/kernel/.lock"
    flock 9
    install_packages
    key=$(cache_key)
    out="$CACHE/kernel/$key"
    if [ -f "$out/bzImage" ]; then
        say "cached: $out/bzImage"
        echo "$out/bzImage"
        exit 0
    fi
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    log="$CACHE/kernel/$key.build.log"
    start=$(date +%s)
    say "building the bench kernel once (about 15-20 minutes on 2 cores); log: $log"
    set +e
    ( build "$out" ) >"$log" 2>&1       # a subshell, so that set -e holds inside build
    rc=$?
    set -e
    if [ $rc -ne 0 ]; then
        say "build failed (status $rc); the end of $log:"
        tail -n 20 "$log" >&2
        exit 1
    fi
    mv "$log" "$out/build.log"
    say "built in $(( $(date +%s) - start )) s: $out/bzImage"
    echo "$out/bzImage"
}

main "$@"
