//! Reads libvirt's domain capabilities XML (`virsh domcapabilities`): which PCI passthrough
//! backends the hypervisor offers. Pure.

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::xml::{XmlError, MAX_DEPTH};

/// The values of `<devices><hostdev><enum name='pciBackend'>` (`vfio`, `default`…); empty when
/// the host offers none (no VFIO).
pub fn pci_backends(xml: &str) -> Result<Vec<String>, XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut in_enum = false;
    let mut value: Option<String> = None;
    let mut out = Vec::new();
    loop {
        match reader.read_event().map_err(|e| XmlError::MalformedDomain {
            reason: format!("domain capabilities: {e}"),
        })? {
            Event::Start(e) => {
                if path.len() >= MAX_DEPTH {
                    return Err(XmlError::MalformedDomain {
                        reason: format!(
                            "domain capabilities: elements nested deeper than {MAX_DEPTH} levels"
                        ),
                    });
                }
                let here: Vec<&[u8]> = path.iter().map(Vec::as_slice).collect();
                if here == [b"domainCapabilities".as_slice(), b"devices", b"hostdev"]
                    && e.name().as_ref() == b"enum"
                {
                    in_enum = e
                        .attributes()
                        .flatten()
                        .any(|a| a.key.as_ref() == b"name" && a.value.as_ref() == b"pciBackend");
                }
                if in_enum && e.name().as_ref() == b"value" {
                    value = Some(String::new());
                }
                path.push(e.name().as_ref().to_vec());
            }
            Event::End(e) => {
                if e.name().as_ref() == b"enum" {
                    in_enum = false;
                }
                if let Some(v) = value.take().filter(|_| e.name().as_ref() == b"value") {
                    out.push(v.trim().to_owned());
                }
                path.pop();
            }
            // All the text of a value, as libvirt would read it: comments split nothing.
            Event::Text(t) => {
                if let Some(v) = value.as_mut() {
                    v.push_str(&t.unescape().map_err(|e| XmlError::MalformedDomain {
                        reason: format!("domain capabilities: {e}"),
                    })?);
                }
            }
            Event::CData(t) => {
                if let Some(v) = value.as_mut() {
                    v.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

/// The bound driver in a node device XML (`<device><driver><name>vfio-pci</name>`).
pub fn nodedev_driver(xml: &str) -> Option<String> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut name: Option<String> = None;
    loop {
        match reader.read_event().ok()? {
            Event::Start(_) if path.len() >= MAX_DEPTH => return None,
            Event::Start(e) => {
                path.push(e.name().as_ref().to_vec());
                let here: Vec<&[u8]> = path.iter().map(Vec::as_slice).collect();
                if name.is_none() && here == [b"device".as_slice(), b"driver", b"name"] {
                    name = Some(String::new());
                }
            }
            Event::End(_) => {
                let here: Vec<&[u8]> = path.iter().map(Vec::as_slice).collect();
                if here == [b"device".as_slice(), b"driver", b"name"] {
                    return name.map(|n| n.trim().to_owned());
                }
                path.pop();
            }
            // All the text of the name, as libvirt would read it: comments split nothing.
            Event::Text(t) => {
                if let Some(n) = name.as_mut() {
                    n.push_str(&t.unescape().ok()?);
                }
            }
            Event::CData(t) => {
                if let Some(n) = name.as_mut() {
                    n.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_vfio_or_nothing() {
        let with = "<domainCapabilities><devices><hostdev supported='yes'><enum name='mode'><value>subsystem</value></enum><enum name='pciBackend'><value>default</value><value>vfio</value></enum></hostdev></devices></domainCapabilities>";
        assert_eq!(pci_backends(with).unwrap(), ["default", "vfio"]);
        let split = with.replace("<value>vfio</value>", "<value>vf<!-- c -->io</value>");
        assert_eq!(pci_backends(&split).unwrap(), ["default", "vfio"]);
        // What libvirt 9 says on a machine without VFIO.
        let without = "<domainCapabilities><devices><hostdev supported='yes'><enum name='pciBackend'/></hostdev></devices></domainCapabilities>";
        assert!(pci_backends(without).unwrap().is_empty());
        assert!(pci_backends("<domainCapabilities><devices>").is_ok());
        let deep = format!("<domainCapabilities>{}", "<a>".repeat(MAX_DEPTH));
        assert!(pci_backends(&deep)
            .unwrap_err()
            .to_string()
            .contains("deeper than 256"));
    }

    #[test]
    fn reads_a_node_devices_driver() {
        let x = "<device><name>pci_0000_00_06_1</name><driver><name>snd_hda_intel</name></driver><capability type='pci'><domain>0</domain></capability></device>";
        assert_eq!(nodedev_driver(x).as_deref(), Some("snd_hda_intel"));
        assert_eq!(nodedev_driver("<device><name>x</name></device>"), None);
        let split = "<device><driver><name>vfio<!-- c -->-<![CDATA[pci]]></name></driver></device>";
        assert_eq!(nodedev_driver(split).as_deref(), Some("vfio-pci"));
        let deep = format!(
            "<device>{}<driver><name>x</name></driver>",
            "<a>".repeat(MAX_DEPTH)
        );
        assert_eq!(nodedev_driver(&deep), None);
    }
}
