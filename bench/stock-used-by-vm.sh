#!/usr/bin/env bash
# What CloudStack's stock gpudiscovery.sh does every minute to find each GPU's `used_by_vm`
# (described in ../shared/CLOUDSTACK-FACTS.md; written here from that description): list every
# domain, defined ones included, then for each `virsh dumpxml` and two xmlstarlet queries (its
# PCI hostdevs, its mdev hostdevs). The stock script also runs lspci and `virsh nodedev-dumpxml`
# per GPU; this machine has no GPUs, so those are not timed and this is a lower bound.
set -uo pipefail
uri=${LIBVIRT_DEFAULT_URI:-qemu:///system}
virsh -c "$uri" list --all --name | while read -r vm; do
    [ -n "$vm" ] || continue
    xml=$(virsh -c "$uri" dumpxml "$vm" 2>/dev/null) || continue
    printf '%s' "$xml" | xmlstarlet sel -T -t -m "//hostdev[@type='pci']/source/address" \
        -v @bus -o ' ' -v @slot -o ' ' -v @function -n 2>/dev/null
    printf '%s' "$xml" | xmlstarlet sel -T -t -m "//hostdev[@type='mdev']/source/address" \
        -v @uuid -n 2>/dev/null
done
exit 0
