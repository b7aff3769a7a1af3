#!/usr/bin/env bash
# Builds the L1 root for the end-to-end harness (tests/e2e/run). Its content hash keys the cache:
# change this file and the next run rebuilds the root.
#   recipe.sh ROOT
set -euo pipefail
root=$1
mirror=${GPUPASS_E2E_MIRROR:-http://deb.debian.org/debian}
rm -rf "$root.wip"
debootstrap --variant=minbase bookworm "$root.wip" "$mirror"
# apt inside the root, with /proc and /dev, in a private mount namespace.
unshare -m -- sh -ec '
    root=$1
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --make-rslave "$root/dev"
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        linux-image-amd64 qemu-system-x86 libvirt-daemon-system libvirt-clients \
        libvirt-daemon-driver-qemu kmod pciutils procps iproute2 busybox util-linux curl
    chroot "$root" apt-get clean
' sh "$root.wip"
rm -rf "$root.wip/var/lib/apt/lists/"*
# QEMU runs as root inside L1: no /dev/kvm or /dev/vfio permission games.
printf 'user = "root"\ngroup = "root"\n' >"$root.wip/etc/libvirt/qemu.conf"
touch "$root.wip/.complete"
rm -rf "$root"
mv "$root.wip" "$root"
