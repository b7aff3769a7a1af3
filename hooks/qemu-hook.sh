#!/bin/sh
# gpupass qemu hook shim, written by `gpupass install-hook` (template: hooks/qemu-hook.sh).
# libvirt runs every executable in /etc/libvirt/hooks/qemu.d/ as `NAME DOMAIN OP SUBOP EXTRA`
# with the domain XML on stdin. gpupass-hook never calls libvirt back; at `prepare begin` a
# non-zero exit blocks the start and libvirt shows gpupass's one-line reason to the user.
exec @EXEC@ hook qemu "$@"
