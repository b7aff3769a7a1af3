//! Writes a fit plan into the domain XML as text, byte for byte like the hook's rewriter: only
//! the elements the plan adds or changes differ; comments, quotes, namespaces and whitespace stay.
//! Pure: text and plan in, text out.

use crate::fit::domain::{DomainLayout, Element, MMIO64_ENTRY, QEMU_NS};
use crate::fit::plan::{Change, FitPlan, PhysBits};
use crate::fit::FitError;
use crate::xml::rewrite::{apply, insertion_into, Devices, Edit};
use crate::xml::XmlError;

/// The whitespace before `pos` on its line, when only whitespace precedes it there.
fn line_indent(text: &str, pos: usize) -> Option<&str> {
    let line_start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
    let prefix = &text[line_start..pos];
    (text[..pos].contains('\n') || line_start == 0)
        .then_some(prefix)
        .filter(|p| p.bytes().all(|b| b == b' ' || b == b'\t'))
}

/// Inserts `child` as the last child of `parent`, indented like the document when the parent's
/// end tag stands on its own line.
fn insert_child(text: &str, parent: &Element, child: &str) -> Edit {
    let indent = line_indent(text, parent.span.start);
    match parent.close {
        Some(close) => match (line_indent(text, close), indent) {
            (Some(ci), _) => {
                let at = close - ci.len();
                Edit {
                    range: at..at,
                    text: format!("{ci}  {child}\n"),
                }
            }
            _ => Edit {
                range: close..close,
                text: child.to_owned(),
            },
        },
        None => {
            // `<x …/>` becomes `<x …>child</x>`.
            let tag = &text[parent.span.clone()];
            let open = tag.trim_end_matches('>').trim_end_matches('/').trim_end();
            let body = match indent {
                Some(i) => format!("{open}>\n{i}  {child}\n{i}</{}>", parent.qname),
                None => format!("{open}>{child}</{}>", parent.qname),
            };
            Edit {
                range: parent.span.clone(),
                text: body,
            }
        }
    }
}

/// Inserts `block` as a new last child of `<domain>`.
fn insert_in_domain(text: &str, root: &Element, block: &str) -> Edit {
    insert_child(text, root, block)
}

/// The guest address element of one function.
fn guest_address(bus: u32, slot: u32, function: u32, multifunction: bool) -> String {
    format!(
        "<address type='pci' domain='0x0000' bus='0x{bus:02x}' slot='0x{slot:02x}' function='0x{function:x}'{}/>",
        if multifunction { " multifunction='on'" } else { "" }
    )
}

/// The edit that adds `blocks` to `<devices>` where the hook's rewriter
/// ([`crate::xml::rewrite::DomainDoc::insertion`]) puts them, from the fit's own scan: scanning
/// the domain once more for it was an eighth of `transform`'s instructions.
fn devices_insertion(d: &DomainLayout<'_>, blocks: &[String]) -> Result<Option<Edit>, FitError> {
    if blocks.is_empty() {
        return Ok(None);
    }
    let malformed = |reason: &str| {
        FitError::Xml(XmlError::MalformedDomain {
            reason: reason.to_owned(),
        })
    };
    if d.devices_repeated {
        return Err(malformed("more than one <devices>"));
    }
    let domain_close = d
        .root
        .close
        .ok_or_else(|| malformed("the root element is not closed"))?;
    let devices = match &d.devices {
        None => Devices::Missing,
        Some(e) => match e.close {
            Some(close) => Devices::Open { close },
            None => Devices::Empty {
                span: e.span.clone(),
            },
        },
    };
    Ok(insertion_into(
        d.text,
        &devices,
        domain_close,
        d.domain_child_indent.as_deref(),
        d.devices_child_indent.as_deref(),
        blocks,
    ))
}

/// Applies `plan`'s changes to the text `d` was scanned from. Returns the text unchanged when
/// the plan changes nothing.
pub fn rewrite(d: &DomainLayout<'_>, plan: &FitPlan) -> Result<String, FitError> {
    let text = d.text;
    let mut edits: Vec<Edit> = Vec::new();
    let mut device_blocks: Vec<String> = Vec::new();
    for change in &plan.changes {
        match change {
            Change::OvmfWindow { mib } => {
                let value = format!("name={MMIO64_ENTRY},string={mib}");
                match (&d.mmio64, &d.commandline) {
                    (Some(arg), Some((_, prefix))) => {
                        let p = if prefix.is_empty() {
                            String::new()
                        } else {
                            format!("{prefix}:")
                        };
                        edits.push(Edit {
                            range: arg.span.clone(),
                            text: format!("<{p}arg value='{value}'/>"),
                        });
                    }
                    (_, Some((cl, prefix))) => {
                        let p = if prefix.is_empty() {
                            String::new()
                        } else {
                            format!("{prefix}:")
                        };
                        edits.push(insert_child(
                            text,
                            cl,
                            &format!("<{p}arg value='-fw_cfg'/>"),
                        ));
                        edits.push(insert_child(
                            text,
                            cl,
                            &format!("<{p}arg value='{value}'/>"),
                        ));
                    }
                    (_, None) => {
                        let prefix = match &d.qemu_prefix {
                            Some(p) => p.clone(),
                            None if d.qemu_prefix_taken => {
                                return Err(FitError::Unsupported(
                                    "the domain binds the prefix 'qemu' to another namespace"
                                        .into(),
                                ))
                            }
                            None => {
                                // Declared on <domain>, where libvirt keeps it.
                                let at = d.root.start_end - 1;
                                edits.push(Edit {
                                    range: at..at,
                                    text: format!(" xmlns:qemu='{QEMU_NS}'"),
                                });
                                "qemu".into()
                            }
                        };
                        let i = line_indent(text, d.root.close.unwrap_or(text.len()))
                            .map(|ci| format!("{ci}  "));
                        let block = match &i {
                            Some(i) => format!(
                                "<{prefix}:commandline>\n{i}  <{prefix}:arg value='-fw_cfg'/>\n{i}  <{prefix}:arg value='{value}'/>\n{i}</{prefix}:commandline>"
                            ),
                            None => format!(
                                "<{prefix}:commandline><{prefix}:arg value='-fw_cfg'/><{prefix}:arg value='{value}'/></{prefix}:commandline>"
                            ),
                        };
                        edits.push(insert_in_domain(text, &d.root, &block));
                    }
                }
            }
            Change::Pcihole64 { kib } => {
                let hole = format!("<pcihole64 unit='KiB'>{kib}</pcihole64>");
                let root = d
                    .controllers
                    .iter()
                    .find(|c| matches!(c.model.as_deref(), Some("pcie-root" | "pci-root")));
                match root {
                    Some(c) => match &c.pcihole64 {
                        Some((span, _)) => edits.push(Edit {
                            range: span.clone(),
                            text: hole,
                        }),
                        None => edits.push(insert_child(text, &c.element, &hole)),
                    },
                    None => {
                        let model = match d.machine() {
                            crate::fit::domain::Machine::Q35 => "pcie-root",
                            _ => "pci-root",
                        };
                        device_blocks.insert(
                            0,
                            format!(
                                "<controller type='pci' index='0' model='{model}'>{hole}</controller>"
                            ),
                        );
                    }
                }
            }
            Change::MaxPhysAddr(bits) => {
                let el = match bits {
                    PhysBits::Passthrough => "<maxphysaddr mode='passthrough'/>".to_owned(),
                    PhysBits::Emulate { bits } => {
                        format!("<maxphysaddr mode='emulate' bits='{bits}'/>")
                    }
                };
                match (&d.maxphysaddr, &d.cpu) {
                    (Some(m), _) => edits.push(Edit {
                        range: m.span.clone(),
                        text: el,
                    }),
                    (None, Some(cpu)) => edits.push(insert_child(text, cpu, &el)),
                    (None, None) => {
                        edits.push(insert_in_domain(text, &d.root, &format!("<cpu>{el}</cpu>")));
                    }
                }
            }
            Change::RootPorts { indexes } => {
                for i in indexes {
                    device_blocks.push(format!(
                        "<controller type='pci' index='{i}' model='pcie-root-port'/>"
                    ));
                }
            }
            Change::HideHypervisor | Change::HypervVendorId { .. } | Change::Rom { .. } => {}
            Change::Place(p) => {
                let multi = p.hostdevs.len() > 1;
                for (i, f) in &p.hostdevs {
                    let h = &d.hostdevs[*i];
                    let el = guest_address(p.bus, p.slot, *f, multi && *f == 0);
                    match &h.guest {
                        Some(g) => edits.push(Edit {
                            range: g.span.clone(),
                            text: el,
                        }),
                        None => edits.push(insert_child(text, &h.element, &el)),
                    }
                }
            }
        }
    }
    // Vendor options: children of <features>, created when missing.
    let mut feature_blocks: Vec<String> = Vec::new();
    for change in &plan.changes {
        match change {
            Change::HideHypervisor => {
                let el = "<hidden state='on'/>";
                match (&d.kvm_hidden, &d.kvm) {
                    (Some(h), _) => edits.push(Edit {
                        range: h.span.clone(),
                        text: el.into(),
                    }),
                    (None, Some(kvm)) => edits.push(insert_child(text, kvm, el)),
                    (None, None) => feature_blocks.push(format!("<kvm>{el}</kvm>")),
                }
            }
            Change::HypervVendorId { value } => {
                let el = format!("<vendor_id state='on' value='{value}'/>");
                match (&d.hyperv_vendor_id, &d.hyperv) {
                    (Some(h), _) => edits.push(Edit {
                        range: h.span.clone(),
                        text: el,
                    }),
                    (None, Some(hv)) => edits.push(insert_child(text, hv, &el)),
                    (None, None) => feature_blocks.push(format!("<hyperv>{el}</hyperv>")),
                }
            }
            Change::Rom {
                setting, hostdevs, ..
            } => {
                // The config checked the path: no quote, <, > or & to escape.
                let el = if setting == "off" {
                    "<rom bar='off'/>".to_owned()
                } else {
                    format!("<rom file='{setting}'/>")
                };
                for i in hostdevs {
                    edits.push(insert_child(text, &d.hostdevs[*i].element, &el));
                }
            }
            _ => {}
        }
    }
    if !feature_blocks.is_empty() {
        match &d.features {
            Some(f) => {
                for b in &feature_blocks {
                    edits.push(insert_child(text, f, b));
                }
            }
            None => edits.push(insert_in_domain(
                text,
                &d.root,
                &format!("<features>{}</features>", feature_blocks.concat()),
            )),
        }
    }
    edits.extend(devices_insertion(d, &device_blocks)?);
    Ok(apply(text, &edits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::domain;

    #[test]
    fn devices_go_where_the_hooks_rewriter_puts_them() {
        let blocks = vec![
            "<controller type='pci' model='pcie-root-port'/>".to_owned(),
            "<controller type='pci' model='pcie-expander-bus'/>".to_owned(),
        ];
        let texts = [
            // Indented, with children.
            "<domain type='kvm'>\n  <name>a</name>\n  <devices>\n    <disk type='file'/>\n  </devices>\n</domain>\n",
            // Tabs; the first child of <devices> on the <devices> line, the next on its own.
            "<domain type='kvm'>\n\t<name>a</name>\n\t<devices><disk/>\n\t\t<disk/>\n\t</devices>\n</domain>",
            // <devices/>.
            "<domain type='kvm'>\n  <name>a</name>\n  <devices/>\n</domain>",
            // No <devices>; <vcpu> first, indented unlike the rest.
            "<domain type='kvm'>\n   <vcpu>2</vcpu>\n  <name>a</name>\n</domain>\n",
            // No <devices>, the root's first child on the root's line.
            "<domain type='kvm'><name>a</name>\n    <memory>1</memory>\n</domain>",
            // All on one line.
            "<domain type='kvm'><name>a</name><devices><disk/></devices></domain>",
            "<domain type='kvm'><name>a</name></domain>",
            // An empty <devices> block; a comment before the first child.
            "<domain type='kvm'>\n  <!-- c -->\n  <name>a</name>\n  <devices>\n  </devices>\n</domain>",
            // A BOM.
            "\u{feff}<domain type='kvm'>\n  <name>a</name>\n  <devices>\n      <disk/>\n  </devices>\n</domain>",
        ];
        for text in texts {
            let want = crate::xml::rewrite::scan(text).unwrap().insertion(&blocks);
            let layout = domain::scan(text).unwrap();
            assert_eq!(
                devices_insertion(&layout, &blocks).unwrap(),
                want,
                "{text:?}"
            );
            assert!(want.is_some());
            assert_eq!(devices_insertion(&layout, &[]).unwrap(), None);
        }
        // Two <devices>: refused, as the hook's rewriter refuses them.
        let two = "<domain type='kvm'><name>a</name><devices/><devices/></domain>";
        assert!(crate::xml::rewrite::scan(two).is_err());
        let e = devices_insertion(&domain::scan(two).unwrap(), &blocks).unwrap_err();
        assert!(e.to_string().contains("more than one <devices>"), "{e}");
    }
}
