// Loads a transformer script the way the CloudStack KVM agent's LibvirtKvmAgentHook does:
// GroovyScriptEngine(basedir).run(script, new Binding()) returns an object; the agent calls
// invokeMethod(method, [logger, xml]) on it. Prints the result on stdout, the logger's lines on
// stderr; exits 3 when the method throws (the agent would fail the VM start).
//
//   groovy agent.groovy BASEDIR SCRIPT METHOD XMLFILE
class RecordingLogger {
    List<String> lines = []
    void debug(String m) { lines << "DEBUG ${m}" }
    void info(String m) { lines << "INFO ${m}" }
    void warn(String m) { lines << "WARN ${m}" }
    void error(String m) { lines << "ERROR ${m}" }
}

def (basedir, script, method, xmlFile) = args as List
def engine = new GroovyScriptEngine(basedir as String)
def hook = engine.run(script as String, new Binding())
def logger = new RecordingLogger()
def xml = new File(xmlFile as String).getText('UTF-8')
try {
    def result = hook.invokeMethod(method as String, [logger, xml] as Object[])
    logger.lines.each { System.err.println(it) }
    System.out.print(result == null ? 'NULL' : result)
} catch (Throwable t) {
    logger.lines.each { System.err.println(it) }
    System.err.println("EXCEPTION ${t.message}")
    System.exit(3)
}
