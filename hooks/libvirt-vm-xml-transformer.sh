#!/bin/sh
# gpupass XML transformer for the CloudStack KVM agent, 4.21 and later (the shell variant).
#
# The agent runs this file with two arguments, METHOD and the domain XML, before it defines each
# VM, with a 30 s timeout. On exit 0 this script's stdout replaces the XML (an empty stdout would
# break the start, so this script never exits 0 without printing a complete XML); on any other
# exit the agent keeps the XML it had. `gpupass cloudstack install` writes it to
# /etc/cloudstack/agent/hooks with this host's gpupass paths; agent.properties then needs:
#
#   agent.hooks.basedir=/etc/cloudstack/agent/hooks
#   agent.hooks.libvirt_vm_xml_transformer.shell_script=libvirt-vm-xml-transformer.sh
#   agent.hooks.libvirt_vm_xml_transformer.method=transform
#
# `gpupass-hook transform` completes the GPUs CloudStack allocated (their HDMI audio, USB and
# UCSI functions), adds the GPUs a gpupass rule asks for, and leaves every other domain as it
# was. What blocks a start that cannot work is gpupass's qemu hook at `prepare`: install both.
# GPUPASS_BIN overrides the binary when this file is copied by hand.

gpupass() { "${GPUPASS_BIN:-/usr/local/bin/gpupass-hook}" "$@"; }

if [ "$#" -ne 2 ]; then
	echo "gpupass: expected 2 arguments (METHOD XML, as the CloudStack agent passes them), got $#" >&2
	exit 2
fi
if [ "$1" != transform ]; then
	echo "gpupass: unknown method '$1' (agent.hooks.libvirt_vm_xml_transformer.method must be transform); the XML is kept" >&2
	exit 2
fi
out=$(printf '%s' "$2" | gpupass transform) || exit
if [ -z "$out" ]; then
	echo "gpupass: transform printed nothing; the XML is kept" >&2
	exit 1
fi
printf '%s\n' "$out"
