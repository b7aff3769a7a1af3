// The seeds' CloudStack workaround as a benchmark peer: a Groovy transformer that appends a
// fixed <hostdev> to the domain's <devices> with XmlParser, run standalone under `groovy`
// (stdin in, XML out), as the agent's GroovyScriptEngine would run its method.
import groovy.xml.XmlUtil

def domain = new XmlParser(false, false).parseText(System.in.getText('UTF-8'))
def devices = domain.devices[0]
def hostdev = devices.appendNode('hostdev', [mode: 'subsystem', type: 'pci', managed: 'yes'])
hostdev.appendNode('driver', [name: 'vfio'])
hostdev.appendNode('source').appendNode('address', [domain: '0x0000', bus: '0x9a', slot: '0x00', function: '0x0'])
print XmlUtil.serialize(domain)
