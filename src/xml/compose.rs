//! Composes `<hostdev>` blocks for PCI functions from the template in `xml-templates/` (compiled
//! in) or from an override directory. Validates a template once, when it is loaded.

use std::fs;
use std::path::Path;

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::model::PciAddress;
use crate::xml::{XmlError, MAX_DEPTH};

/// The file name of the PCI hostdev template, in `xml-templates/` and in an override directory.
pub const HOSTDEV_TEMPLATE_FILE: &str = "hostdev-pci.xml";

const BUILTIN: &str = include_str!("../../xml-templates/hostdev-pci.xml");

const PLACEHOLDERS: &[&str] = &["domain", "bus", "slot", "function", "address"];

/// A checked hostdev template.
#[derive(Debug, Clone)]
pub struct HostdevTemplate {
    text: String,
}

impl HostdevTemplate {
    /// The template compiled into the binary.
    pub fn builtin() -> Self {
        Self::parse(BUILTIN, "built-in xml-templates/hostdev-pci.xml")
            .expect("the built-in template is checked by unit tests")
    }

    /// The template from `dir/hostdev-pci.xml`.
    pub fn from_dir(dir: &Path) -> Result<Self, XmlError> {
        let path = dir.join(HOSTDEV_TEMPLATE_FILE);
        let text = fs::read_to_string(&path).map_err(|source| XmlError::ReadTemplate {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Checks a template: known placeholders only, the address ones present, and the rendered
    /// result one well-formed `<hostdev>` element.
    pub fn parse(text: &str, origin: &str) -> Result<Self, XmlError> {
        let invalid = |reason: String| XmlError::InvalidTemplate {
            origin: origin.to_owned(),
            reason,
        };
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| invalid("a '{' without '}'".into()))?;
            let name = &after[..close];
            if !PLACEHOLDERS.contains(&name) {
                return Err(invalid(format!(
                    "unknown placeholder {{{name}}} (known: {{domain}} {{bus}} {{slot}} {{function}} {{address}})"
                )));
            }
            rest = &after[close + 1..];
        }
        let has_address = text.contains("{address}");
        let has_parts = ["{domain}", "{bus}", "{slot}", "{function}"]
            .iter()
            .all(|p| text.contains(p));
        if !has_parts && !has_address {
            return Err(invalid(
                "it must place the function's address ({domain} {bus} {slot} {function})".into(),
            ));
        }
        let template = Self {
            text: text.trim().to_owned(),
        };
        let sample = PciAddress::new(0x1234, 0x61, 0x1f, 7).expect("a valid sample address");
        check_single_hostdev(&template.render(sample)).map_err(invalid)?;
        Ok(template)
    }

    /// libvirt manages the host driver (`managed='yes'`): it moves the device to vfio-pci and
    /// back itself, and gpupass may help it do so for a whole GPU.
    pub fn managed(&self) -> bool {
        self.text.contains("managed='yes'") || self.text.contains("managed=\"yes\"")
    }

    /// The block for one function.
    pub fn render(&self, addr: PciAddress) -> String {
        // Values are formatted numbers: nothing here can inject markup.
        self.text
            .replace("{domain}", &format!("0x{:04x}", addr.domain))
            .replace("{bus}", &format!("0x{:02x}", addr.bus))
            .replace("{slot}", &format!("0x{:02x}", addr.slot))
            .replace("{function}", &format!("0x{:x}", addr.function))
            .replace("{address}", &addr.to_string())
    }
}

fn check_single_hostdev(xml: &str) -> Result<(), String> {
    let mut reader = Reader::from_str(xml);
    let mut depth = 0usize;
    let mut roots = 0usize;
    loop {
        match reader.read_event() {
            Ok(Event::Start(_)) if depth >= MAX_DEPTH => {
                return Err(format!("elements nested deeper than {MAX_DEPTH} levels"));
            }
            Ok(Event::Start(e)) => {
                if depth == 0 {
                    roots += 1;
                    if e.name().as_ref() != b"hostdev" {
                        return Err("its root element must be <hostdev>".into());
                    }
                }
                depth += 1;
            }
            Ok(Event::Empty(e)) => {
                if depth == 0 {
                    roots += 1;
                    if e.name().as_ref() != b"hostdev" {
                        return Err("its root element must be <hostdev>".into());
                    }
                }
            }
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::Text(t)) if depth == 0 => {
                if !t.iter().all(u8::is_ascii_whitespace) {
                    return Err("text outside the <hostdev> element".into());
                }
            }
            Ok(Event::Eof) => break,
            Ok(Event::DocType(_) | Event::Decl(_) | Event::PI(_)) if depth == 0 => {
                return Err("declarations are not allowed in a fragment".into());
            }
            Ok(_) => {}
            Err(e) => return Err(format!("not well-formed XML: {e}")),
        }
    }
    if depth != 0 {
        return Err("an element is not closed".into());
    }
    if roots != 1 {
        return Err(format!("expected one <hostdev> element, found {roots}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_renders_the_documented_default_block() {
        let t = HostdevTemplate::builtin();
        assert_eq!(
            t.render("0000:61:00.0".parse().unwrap()),
            "<hostdev mode='subsystem' type='pci' managed='yes'><driver name='vfio'/><source><address domain='0x0000' bus='0x61' slot='0x00' function='0x0'/></source></hostdev>"
        );
        assert!(t
            .render("10000:e1:1f.7".parse().unwrap())
            .contains("domain='0x10000' bus='0xe1' slot='0x1f' function='0x7'"));
    }

    #[test]
    fn rejects_broken_templates() {
        for (bad, why) in [
            ("<hostdev>{domain}{bus}{slot}{function}", "not closed"),
            ("<disk>{address}</disk>", "root element"),
            ("<hostdev>{address}</hostdev><hostdev/>", "found 2"),
            ("<hostdev>{adress}</hostdev>", "unknown placeholder"),
            ("<hostdev mode='subsystem'/>", "must place"),
            ("x<hostdev>{address}</hostdev>", "text outside"),
            ("<hostdev a='{address}'>", "not closed"),
            ("<hostdev>{address</hostdev>", "without"),
        ] {
            let err = HostdevTemplate::parse(bad, "test").unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let deep = format!("<hostdev>{{address}}{}", "<a>".repeat(MAX_DEPTH));
        let err = HostdevTemplate::parse(&deep, "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("deeper than 256"), "{err}");
    }

    #[test]
    fn loads_an_override_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(HOSTDEV_TEMPLATE_FILE),
            "<hostdev mode='subsystem' type='pci' managed='no'>\n  <source><address domain='{domain}' bus='{bus}' slot='{slot}' function='{function}'/></source>\n  <rom bar='off'/>\n</hostdev>\n",
        )
        .unwrap();
        let t = HostdevTemplate::from_dir(dir.path()).unwrap();
        let out = t.render("0000:3b:00.1".parse().unwrap());
        assert!(
            out.contains("managed='no'")
                && out.contains("function='0x1'")
                && out.contains("<rom bar='off'/>")
        );
        let missing = HostdevTemplate::from_dir(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope/hostdev-pci.xml"));
    }
}
