// gpupass XML transformer for the CloudStack KVM agent.
//
// The agent runs this script with a GroovyScriptEngine, takes the object it returns (the last
// line), and calls transform(logger, xml) on it with every VM's domain XML before defining the
// VM. Add to /etc/cloudstack/agent/agent.properties:
//
//   agent.hooks.basedir=/etc/cloudstack/agent/hooks
//   agent.hooks.libvirt_vm_xml_transformer.script=libvirt-vm-xml-transformer.groovy
//   agent.hooks.libvirt_vm_xml_transformer.method=transform
//
// and copy this file into agent.hooks.basedir. The XML goes through `gpupass transform`, which
// adds the GPUs the VM asks for (a rule in /etc/gpupass/gpupass.toml matching CloudStack's VM
// names, e.g. domain = "i-2-*-VM") and leaves every other byte alone. A VM that asks for
// nothing comes back unchanged. When gpupass cannot give the VM its GPUs, this throws with
// gpupass's one-line reason; the agent then logs it and defines the ORIGINAL XML, so what stops
// such a VM from starting is gpupass's qemu hook at `prepare` (`gpupass install-hook`): install
// both. On CloudStack 4.21 and later, `gpupass cloudstack install` sets up the shell variant.
//
// GPUPASS_BIN overrides the gpupass binary (default /usr/local/bin/gpupass-hook, which does not
// load libvirt); GPUPASS_HOST_ROOT, GPUPASS_RUN_DIR, GPUPASS_CONFIG … reach gpupass unchanged.

import java.util.concurrent.TimeUnit

class GpupassXmlTransformer {
    String gpupass = System.getenv('GPUPASS_BIN') ?: '/usr/local/bin/gpupass-hook'
    long timeoutSeconds = 60

    String transform(Object logger, String xml) {
        if (xml == null) {
            return null
        }
        Process proc
        try {
            proc = new ProcessBuilder([gpupass, 'transform']).start()
        } catch (IOException e) {
            logger.error("gpupass: cannot run ${gpupass}: ${e.message}")
            throw new RuntimeException("gpupass: cannot run ${gpupass}: ${e.message}", e)
        }
        def out = new ByteArrayOutputStream()
        def err = new ByteArrayOutputStream()
        // Drain both pipes while writing stdin, so a large XML never deadlocks on a full pipe.
        def outReader = Thread.start { out << proc.inputStream }
        def errReader = Thread.start { err << proc.errorStream }
        try {
            proc.outputStream.withStream { it.write(xml.getBytes('UTF-8')) }
        } catch (IOException ignored) {
            // gpupass refused before reading it all; its exit status and stderr say why.
        }
        if (!proc.waitFor(timeoutSeconds, TimeUnit.SECONDS)) {
            proc.destroyForcibly()
            logger.error("gpupass transform timed out after ${timeoutSeconds} s")
            throw new RuntimeException("gpupass transform timed out after ${timeoutSeconds} s")
        }
        outReader.join()
        errReader.join()
        String message = err.toString('UTF-8').trim()
        if (proc.exitValue() != 0) {
            logger.error("gpupass transform failed (exit ${proc.exitValue()}): ${message}")
            throw new RuntimeException(message ?: "gpupass transform failed (exit ${proc.exitValue()})")
        }
        if (message) {
            logger.warn(message)
        }
        String result = out.toString('UTF-8')
        if (result == xml) {
            logger.debug('gpupass: no GPU requested or already present; XML unchanged')
        } else {
            logger.info('gpupass: GPUs added to the domain XML')
        }
        return result
    }
}

new GpupassXmlTransformer()
