#!/bin/sh
# gpupass GPU discovery for the CloudStack KVM agent (4.21 and later), installed by
# `gpupass cloudstack install` in place of the agent's gpudiscovery.sh, whose original is kept
# next to it as gpudiscovery.sh.gpupass-orig (`gpupass cloudstack install --uninstall` puts it
# back). The agent runs this every minute and parses its stdout; gpupass prints its last good
# answer, with a note on stderr, when the host cannot be read for a moment.
exec @EXEC@ cloudstack discover
