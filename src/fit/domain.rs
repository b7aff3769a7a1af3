//! Reads what a domain XML gives its GPUs — machine, firmware, the CPU's physical address bits,
//! `pcihole64`, the OVMF 64-bit window in `<qemu:commandline>`, PCI controllers, guest PCI
//! addresses and hostdevs — with the byte positions the fit's rewrite needs. Pure: text in,
//! facts out; never changes the text.

use std::ops::Range;

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{NamespaceError, PrefixDeclaration};
use quick_xml::Reader;

use crate::fit::FitError;
use crate::model::PciAddress;
use crate::xml::domain::pci_address_of;
use crate::xml::rewrite::{line_indent, MAX_XML_BYTES};
use crate::xml::MAX_DEPTH;

/// libvirt's namespace for QEMU pass-through arguments.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// OVMF's fw_cfg entry for the minimum size of its 64-bit PCI window, in MiB.
pub const MMIO64_ENTRY: &str = "opt/ovmf/X-PciMmio64Mb";

/// The guest firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// OVMF (`<os firmware='efi'>`, or a pflash / OVMF `<loader>`).
    Uefi,
    /// SeaBIOS (the default).
    Bios,
}

/// The machine type family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// `q35` / `pc-q35-*`: PCIe, root ports.
    Q35,
    /// `pc` / `pc-i440fx-*` (libvirt's x86 default): one conventional PCI bus.
    I440fx,
    /// Anything else (`microvm`, `isapc`, other architectures).
    Other,
}

/// An element's place in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The whole element.
    pub span: Range<usize>,
    /// End of the start tag (after its `>`).
    pub start_end: usize,
    /// Start of the end tag; `None` for an empty element (`<x/>`).
    pub close: Option<usize>,
    /// The qualified name, as written.
    pub qname: String,
}

/// A guest PCI address (`<address type='pci' …/>` directly inside a device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAddress {
    /// The element.
    pub span: Range<usize>,
    /// Bus (a PCI controller's index).
    pub bus: u32,
    /// Slot.
    pub slot: u32,
    /// Function.
    pub function: u32,
    /// `multifunction='on'`.
    pub multifunction: bool,
}

/// A `<hostdev mode='subsystem' type='pci'>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostdev {
    /// The element.
    pub element: Element,
    /// Its host PCI address.
    pub source: PciAddress,
    /// Its guest PCI address, when given.
    pub guest: Option<GuestAddress>,
    /// It has an `<address>` of another type (`unassigned`, `ccw`…): the operator placed it.
    pub other_address: bool,
    /// It has a `<rom>`.
    pub rom: bool,
}

/// A `<controller type='pci'>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciController {
    /// The element.
    pub element: Element,
    /// `index`.
    pub index: u32,
    /// `model`.
    pub model: Option<String>,
    /// Its `<pcihole64>`: the element and the size in bytes.
    pub pcihole64: Option<(Range<usize>, u64)>,
}

/// `<cpu><maxphysaddr>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaxPhysAddr {
    /// The element.
    pub span: Range<usize>,
    /// `passthrough` or `emulate`.
    pub mode: String,
    /// `bits`.
    pub bits: Option<u8>,
    /// `limit` (passthrough).
    pub limit: Option<u8>,
}

/// The `-fw_cfg name=opt/ovmf/X-PciMmio64Mb,string=N` argument pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mmio64Arg {
    /// The `<qemu:arg>` holding `name=…`.
    pub span: Range<usize>,
    /// N in MiB; `None` when given another way (`file=`), which gpupass leaves alone.
    pub mib: Option<u64>,
}

/// What the fit reads from a domain.
#[derive(Debug, Clone)]
pub struct DomainLayout<'a> {
    /// The text.
    pub text: &'a str,
    /// `<name>` (its text, as libvirt reads the first one).
    pub name: String,
    /// `<domain type>` (`kvm`, `qemu`, `xen`…).
    pub virt_type: String,
    /// `<os><type arch>`.
    pub arch: Option<String>,
    /// `<os><type machine>`.
    pub machine_name: Option<String>,
    /// The firmware.
    pub firmware: Firmware,
    /// `<memory>` in bytes.
    pub memory: u64,
    /// `<maxMemory>` in bytes (memory hot-plug reserves room above RAM).
    pub max_memory: Option<u64>,
    /// The root `<domain>` element.
    pub root: Element,
    /// The prefix the root binds to [`QEMU_NS`], when it does.
    pub qemu_prefix: Option<String>,
    /// A prefix `qemu` bound on the root to another namespace (then gpupass cannot add its own).
    pub qemu_prefix_taken: bool,
    /// `<cpu>`.
    pub cpu: Option<Element>,
    /// `<cpu mode>`.
    pub cpu_mode: Option<String>,
    /// `<cpu><maxphysaddr>`.
    pub maxphysaddr: Option<MaxPhysAddr>,
    /// `<devices>`.
    pub devices: Option<Element>,
    /// `<controller type='pci'>`s.
    pub controllers: Vec<PciController>,
    /// Every guest PCI address in `<devices>` (hostdevs', controllers', disks'…).
    pub addresses: Vec<GuestAddress>,
    /// PCI hostdevs.
    pub hostdevs: Vec<Hostdev>,
    /// `<qemu:commandline>` and the prefix it is written with.
    pub commandline: Option<(Element, String)>,
    /// The OVMF window argument.
    pub mmio64: Option<Mmio64Arg>,
    /// `<features>`.
    pub features: Option<Element>,
    /// `<features><kvm>`.
    pub kvm: Option<Element>,
    /// `<features><kvm><hidden>`.
    pub kvm_hidden: Option<StateElement>,
    /// `<features><hyperv>`.
    pub hyperv: Option<Element>,
    /// `<features><hyperv><vendor_id>`.
    pub hyperv_vendor_id: Option<StateElement>,
    /// Indentation of the first child element of `<domain>` that starts a line (where a new
    /// `<devices>` goes, as the hook's rewriter indents it).
    pub domain_child_indent: Option<String>,
    /// Indentation of the first child element of `<devices>` that starts a line.
    pub devices_child_indent: Option<String>,
    /// More than one `<devices>` (libvirt refuses it; so does a rewrite that adds devices).
    pub devices_repeated: bool,
}

impl DomainLayout<'_> {
    /// The machine family; libvirt's x86 default (no `machine`) is i440fx.
    pub fn machine(&self) -> Machine {
        match self.machine_name.as_deref() {
            Some(m) if m == "q35" || m.starts_with("pc-q35") => Machine::Q35,
            Some(m) if m == "pc" || m.starts_with("pc-i440fx") || m.starts_with("pc-") => {
                Machine::I440fx
            }
            None if self.is_x86() => Machine::I440fx,
            _ => Machine::Other,
        }
    }

    /// An x86 guest (no `arch` means the host's, x86 where gpupass runs).
    pub fn is_x86(&self) -> bool {
        matches!(self.arch.as_deref(), None | Some("x86_64" | "i686"))
    }
}

fn malformed(reason: impl Into<String>) -> FitError {
    FitError::Xml(crate::xml::XmlError::MalformedDomain {
        reason: reason.into(),
    })
}

fn attr(e: &BytesStart<'_>, name: &[u8]) -> Result<Option<String>, FitError> {
    crate::xml::attr(e, name).map_err(FitError::Xml)
}

/// The open elements' names, outermost first, in a fixed array rather than a `Vec` per event:
/// no pattern is deeper than four, so a deeper element gets five names (which none matches).
fn path_of(stack: &[(String, usize, usize)]) -> ([&str; 5], usize) {
    let mut names = [""; 5];
    for (slot, (n, _, _)) in names.iter_mut().zip(stack) {
        *slot = n.as_str();
    }
    (names, stack.len().min(5))
}

/// Parses a libvirt number like `strtoul` base 0 (`0x` hex, leading `0` octal, else decimal).
fn c_num(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// A libvirt scaled size (`unit` attribute, default KiB) in bytes.
pub fn scaled(value: &str, unit: Option<&str>) -> Option<u64> {
    let v: u64 = value.trim().parse().ok()?;
    let mult: u64 = match unit.unwrap_or("KiB") {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "K" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "m" | "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "g" | "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "t" | "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    v.checked_mul(mult)
}

/// A `<hostdev>` being read.
struct OpenHostdev {
    start: usize,
    start_end: usize,
    source: Option<PciAddress>,
    guest: Option<GuestAddress>,
    other: bool,
    rom: bool,
}

/// An element with a `state` (and `value`) attribute: `<hidden state='on'/>`,
/// `<vendor_id state='on' value='…'/>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateElement {
    /// The element.
    pub span: Range<usize>,
    /// `state`.
    pub state: Option<String>,
    /// `value`.
    pub value: Option<String>,
}

/// A PCI `<controller>` being read.
struct OpenController {
    start: usize,
    start_end: usize,
    index: u32,
    model: Option<String>,
    hole: Option<(Range<usize>, u64)>,
}

/// Which text is being collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Text {
    Name,
    Memory,
    MaxMemory,
    Pcihole64,
    Loader,
}

/// The namespace bindings in scope, innermost last, each with the depth of the element that
/// declared it: what quick-xml's `NsReader` keeps, for the one question the fit asks (is an
/// element in [`QEMU_NS`]). `NsReader` reads every element's attributes once more to find
/// declarations; here an element whose tag has no `xmlns` in it has none, and is not read again.
/// Declarations are refused as `NsReader` refuses them, with its errors.
#[derive(Debug, Default)]
struct Scopes {
    /// (prefix, empty for the default namespace; namespace; depth).
    bindings: Vec<(Vec<u8>, Vec<u8>, usize)>,
}

impl Scopes {
    /// Records the declarations of the element `e` at `depth` (as `NamespaceResolver::push`:
    /// attributes unchecked, stopping at the first that cannot be read).
    fn push(&mut self, e: &BytesStart<'_>, depth: usize) -> Result<(), NamespaceError> {
        if memchr::memmem::find(e, b"xmlns").is_none() {
            return Ok(());
        }
        for a in e.attributes().with_checks(false) {
            let Ok(a) = a else { break };
            match a.key.as_namespace_binding() {
                Some(PrefixDeclaration::Default) => {
                    self.bindings.push((Vec::new(), a.value.to_vec(), depth));
                }
                Some(PrefixDeclaration::Named(b"xml")) if *a.value != *XML_NAMESPACE => {
                    return Err(NamespaceError::InvalidXmlPrefixBind(a.value.to_vec()));
                }
                // `xml` bound to its own namespace: allowed, and not a binding of its own.
                Some(PrefixDeclaration::Named(b"xml")) => {}
                Some(PrefixDeclaration::Named(b"xmlns")) => {
                    return Err(NamespaceError::InvalidXmlnsPrefixBind(a.value.to_vec()));
                }
                Some(PrefixDeclaration::Named(p)) => {
                    if *a.value == *XML_NAMESPACE {
                        return Err(NamespaceError::InvalidPrefixForXml(p.to_vec()));
                    }
                    if *a.value == *XMLNS_NAMESPACE {
                        return Err(NamespaceError::InvalidPrefixForXmlns(p.to_vec()));
                    }
                    self.bindings.push((p.to_vec(), a.value.to_vec(), depth));
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Whether the element `e` is in [`QEMU_NS`]: the innermost binding of its prefix (the
    /// default namespace without one) is QEMU's. `xmlns:p=""` and `xmlns=""` unbind.
    fn is_qemu(&self, e: &BytesStart<'_>) -> bool {
        let name = e.name();
        let prefix = name.prefix().map_or(&b""[..], |p| p.into_inner());
        self.bindings
            .iter()
            .rev()
            .find(|(p, _, _)| p.as_slice() == prefix)
            .is_some_and(|(_, ns, _)| ns.as_slice() == QEMU_NS.as_bytes())
    }

    /// Ends the scope of the element at `depth`.
    fn close(&mut self, depth: usize) {
        while self.bindings.last().is_some_and(|b| b.2 >= depth) {
            self.bindings.pop();
        }
    }
}

const XML_NAMESPACE: &[u8] = b"http://www.w3.org/XML/1998/namespace";
const XMLNS_NAMESPACE: &[u8] = b"http://www.w3.org/2000/xmlns/";

/// Scans a domain XML for the fit. Fails on malformed XML or a root other than `<domain>`.
pub fn scan(text: &str) -> Result<DomainLayout<'_>, FitError> {
    if text.len() > MAX_XML_BYTES {
        return Err(malformed(format!(
            "{} bytes is over the {MAX_XML_BYTES}-byte limit",
            text.len()
        )));
    }
    let (body, base) = match text.strip_prefix('\u{feff}') {
        Some(rest) => (rest, '\u{feff}'.len_utf8()),
        None => (text, 0),
    };
    let mut reader = Reader::from_str(body);
    let mut scopes = Scopes::default();
    let pos = |r: &Reader<&[u8]>| {
        usize::try_from(r.buffer_position()).map_or(usize::MAX, |p| p.saturating_add(base))
    };
    let mut out = DomainLayout {
        text,
        name: String::new(),
        virt_type: String::new(),
        arch: None,
        machine_name: None,
        firmware: Firmware::Bios,
        memory: 0,
        max_memory: None,
        root: Element {
            span: 0..0,
            start_end: 0,
            close: None,
            qname: String::new(),
        },
        qemu_prefix: None,
        qemu_prefix_taken: false,
        cpu: None,
        cpu_mode: None,
        maxphysaddr: None,
        devices: None,
        controllers: Vec::new(),
        addresses: Vec::new(),
        hostdevs: Vec::new(),
        commandline: None,
        mmio64: None,
        features: None,
        kvm: None,
        kvm_hidden: None,
        hyperv: None,
        hyperv_vendor_id: None,
        domain_child_indent: None,
        devices_child_indent: None,
        devices_repeated: false,
    };
    // Open elements: qualified name and where each started.
    let mut stack: Vec<(String, usize, usize)> = Vec::new();
    let mut collecting: Option<(Text, usize, String, Option<String>)> = None;
    let mut loader_pflash = false;
    let mut has_loader = false;
    let mut loader_text = String::new();
    let mut os_firmware: Option<String> = None;
    // The hostdev and controller being read.
    let mut hostdev: Option<OpenHostdev> = None;
    let mut controller: Option<OpenController> = None;
    let mut pcihole_start = 0usize;
    let mut prev_arg: Option<String> = None;
    let mut seen_name = false;
    loop {
        let before = pos(&reader);
        let event = match reader.read_event() {
            Ok(event) => event,
            Err(e) => return Err(malformed(format!("at byte {}: {e}", pos(&reader)))),
        };
        let after = pos(&reader);
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                // What `NsReader` does as it reads the tag, before anything else looks at it.
                if let Err(err) = scopes.push(e, stack.len()) {
                    let err = quick_xml::Error::Namespace(err);
                    return Err(malformed(format!("at byte {}: {err}", pos(&reader))));
                }
                let is_qemu = scopes.is_qemu(e);
                if stack.len() >= MAX_DEPTH {
                    return Err(malformed(format!(
                        "elements nested deeper than {MAX_DEPTH} levels"
                    )));
                }
                let qname = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                let local = e.local_name();
                let (names, depth) = path_of(&stack);
                let path = &names[..depth];
                // Built only for the few elements kept (a name copied per element showed).
                let element = || Element {
                    span: before..after,
                    start_end: after,
                    close: None,
                    qname: qname.clone(),
                };
                // Where a rewrite adds devices, indented as `xml::rewrite` indents them.
                match path {
                    ["domain"] => {
                        if out.domain_child_indent.is_none() {
                            out.domain_child_indent = line_indent(text, before).map(str::to_owned);
                        }
                        out.devices_repeated |= qname == "devices" && out.devices.is_some();
                    }
                    ["domain", "devices"] if out.devices_child_indent.is_none() => {
                        out.devices_child_indent = line_indent(text, before).map(str::to_owned);
                    }
                    _ => {}
                }
                match path {
                    [] => {
                        if qname != "domain" {
                            return Err(malformed(format!(
                                "root element is <{qname}>, not <domain>"
                            )));
                        }
                        if empty {
                            return Err(malformed("the root element is empty"));
                        }
                        out.root = element();
                        out.virt_type = attr(e, b"type")?.unwrap_or_default();
                        for a in e.attributes().flatten() {
                            let key = a.key.as_ref();
                            if let Some(prefix) = key.strip_prefix(b"xmlns:") {
                                let v = a
                                    .unescape_value()
                                    .map_err(|err| malformed(err.to_string()))?;
                                if v == QEMU_NS {
                                    out.qemu_prefix =
                                        Some(String::from_utf8_lossy(prefix).into_owned());
                                } else if prefix == b"qemu" {
                                    out.qemu_prefix_taken = true;
                                }
                            }
                        }
                    }
                    ["domain"] => match qname.as_str() {
                        "name" if !empty && !seen_name => {
                            seen_name = true;
                            collecting = Some((Text::Name, stack.len() + 1, String::new(), None));
                        }
                        "memory" | "maxMemory" if !empty => {
                            let which = if qname == "memory" {
                                Text::Memory
                            } else {
                                Text::MaxMemory
                            };
                            collecting =
                                Some((which, stack.len() + 1, String::new(), attr(e, b"unit")?));
                        }
                        "os" => os_firmware = attr(e, b"firmware")?,
                        "cpu" => {
                            out.cpu = Some(element());
                            out.cpu_mode = attr(e, b"mode")?;
                        }
                        "devices" => out.devices = Some(element()),
                        "features" => out.features = Some(element()),
                        _ if is_qemu && local.as_ref() == b"commandline" => {
                            let prefix = qname
                                .split_once(':')
                                .map_or(String::new(), |(p, _)| p.to_owned());
                            out.commandline = Some((element(), prefix));
                        }
                        _ => {}
                    },
                    ["domain", "os"] => match qname.as_str() {
                        "type" => {
                            out.arch = attr(e, b"arch")?;
                            out.machine_name = attr(e, b"machine")?;
                        }
                        "loader" => {
                            has_loader = true;
                            loader_pflash = attr(e, b"type")?.as_deref() == Some("pflash");
                            if !empty {
                                collecting =
                                    Some((Text::Loader, stack.len() + 1, String::new(), None));
                            }
                        }
                        _ => {}
                    },
                    ["domain", "cpu"] if qname == "maxphysaddr" => {
                        let num = |n: &[u8]| -> Result<Option<u8>, FitError> {
                            Ok(attr(e, n)?.and_then(|v| v.trim().parse().ok()))
                        };
                        out.maxphysaddr = Some(MaxPhysAddr {
                            span: before..after,
                            mode: attr(e, b"mode")?.unwrap_or_default(),
                            bits: num(b"bits")?,
                            limit: num(b"limit")?,
                        });
                    }
                    ["domain", "devices"] => match qname.as_str() {
                        "hostdev" => {
                            let pci = attr(e, b"mode")?.as_deref().unwrap_or("subsystem")
                                == "subsystem"
                                && attr(e, b"type")?.as_deref() == Some("pci");
                            if pci && !empty {
                                hostdev = Some(OpenHostdev {
                                    start: before,
                                    start_end: after,
                                    source: None,
                                    guest: None,
                                    other: false,
                                    rom: false,
                                });
                            }
                        }
                        "controller" if attr(e, b"type")?.as_deref() == Some("pci") => {
                            let index = attr(e, b"index")?
                                .and_then(|v| c_num(&v))
                                .and_then(|v| u32::try_from(v).ok())
                                .unwrap_or(0);
                            let model = attr(e, b"model")?;
                            if empty {
                                out.controllers.push(PciController {
                                    element: element(),
                                    index,
                                    model,
                                    pcihole64: None,
                                });
                            } else {
                                controller = Some(OpenController {
                                    start: before,
                                    start_end: after,
                                    index,
                                    model,
                                    hole: None,
                                });
                            }
                        }
                        _ => {}
                    },
                    ["domain", "features"] if qname == "kvm" => out.kvm = Some(element()),
                    ["domain", "features"] if qname == "hyperv" => out.hyperv = Some(element()),
                    ["domain", "features", f]
                        if (*f == "kvm" && qname == "hidden")
                            || (*f == "hyperv" && qname == "vendor_id") =>
                    {
                        let el = StateElement {
                            span: before..after,
                            state: attr(e, b"state")?,
                            value: attr(e, b"value")?,
                        };
                        if *f == "kvm" {
                            out.kvm_hidden = Some(el);
                        } else {
                            out.hyperv_vendor_id = Some(el);
                        }
                    }
                    ["domain", "devices", "hostdev"] if qname == "rom" => {
                        if let Some(h) = hostdev.as_mut() {
                            h.rom = true;
                        }
                    }
                    ["domain", "devices", dev] if qname == "address" => {
                        if attr(e, b"type")?.as_deref() == Some("pci") {
                            let num = |n: &[u8]| -> Result<u32, FitError> {
                                Ok(attr(e, n)?
                                    .and_then(|v| c_num(&v))
                                    .and_then(|v| u32::try_from(v).ok())
                                    .unwrap_or(0))
                            };
                            let g = GuestAddress {
                                span: before..after,
                                bus: num(b"bus")?,
                                slot: num(b"slot")?,
                                function: num(b"function")?,
                                multifunction: attr(e, b"multifunction")?.as_deref() == Some("on"),
                            };
                            if *dev == "hostdev" {
                                if let Some(h) = hostdev.as_mut() {
                                    h.guest = Some(g.clone());
                                }
                            }
                            out.addresses.push(g);
                        } else if *dev == "hostdev" {
                            if let Some(h) = hostdev.as_mut() {
                                h.other = true;
                            }
                        }
                    }
                    ["domain", "devices", "controller"] if qname == "pcihole64" => {
                        if empty {
                            if let Some(c) = controller.as_mut() {
                                c.hole = Some((before..after, 0));
                            }
                        } else {
                            pcihole_start = before;
                            collecting = Some((
                                Text::Pcihole64,
                                stack.len() + 1,
                                String::new(),
                                attr(e, b"unit")?,
                            ));
                        }
                    }
                    ["domain", "devices", "hostdev", "source"] if qname == "address" => {
                        if let Some(h) = hostdev.as_mut() {
                            h.source = pci_address_of(e).map_err(FitError::Xml)?;
                        }
                    }
                    ["domain", c]
                        if is_qemu && local.as_ref() == b"arg" && c.ends_with("commandline") =>
                    {
                        let value = attr(e, b"value")?.unwrap_or_default();
                        if prev_arg.as_deref() == Some("-fw_cfg") {
                            let spec = value.strip_prefix("name=").unwrap_or(&value);
                            if let Some(rest) = spec
                                .strip_prefix(MMIO64_ENTRY)
                                .and_then(|r| r.strip_prefix(','))
                            {
                                out.mmio64 = Some(Mmio64Arg {
                                    span: before..after,
                                    mib: rest
                                        .strip_prefix("string=")
                                        .and_then(|n| n.trim().parse().ok()),
                                });
                            }
                        }
                        prev_arg = Some(value);
                    }
                    _ => {}
                }
                if empty {
                    scopes.close(stack.len());
                } else {
                    stack.push((qname, before, after));
                }
            }
            Event::End(_) => {
                let Some((qname, start, start_end)) = stack.pop() else {
                    return Err(malformed("an end tag without a start"));
                };
                scopes.close(stack.len());
                let (names, depth) = path_of(&stack);
                let path = &names[..depth];
                let element = Element {
                    span: start..after,
                    start_end,
                    close: Some(before),
                    qname: qname.clone(),
                };
                if let Some((which, depth, value, unit)) = collecting.take() {
                    if depth == stack.len() + 1 {
                        let bytes = scaled(&value, unit.as_deref());
                        match which {
                            Text::Name => out.name = value,
                            Text::Memory => out.memory = bytes.unwrap_or(0),
                            Text::MaxMemory => out.max_memory = bytes,
                            Text::Loader => loader_text = value,
                            Text::Pcihole64 => {
                                if let Some(c) = controller.as_mut() {
                                    c.hole = Some((pcihole_start..after, bytes.unwrap_or(0)));
                                }
                            }
                        }
                    } else {
                        collecting = Some((which, depth, value, unit));
                    }
                }
                match (path, qname.as_str()) {
                    ([], _) => out.root = element,
                    (["domain"], "cpu") => out.cpu = Some(element),
                    (["domain"], "devices") => out.devices = Some(element),
                    (["domain"], "features") => out.features = Some(element),
                    (["domain", "features"], "kvm") => out.kvm = Some(element),
                    (["domain", "features"], "hyperv") => out.hyperv = Some(element),
                    (["domain"], _)
                        if out
                            .commandline
                            .as_ref()
                            .is_some_and(|(c, _)| c.span.start == start) =>
                    {
                        if let Some((c, _)) = out.commandline.as_mut() {
                            *c = element;
                        }
                    }
                    (["domain", "devices"], "hostdev") => {
                        if let Some(OpenHostdev {
                            start: s,
                            start_end: se,
                            source: Some(source),
                            guest,
                            other,
                            rom,
                        }) = hostdev.take()
                        {
                            out.hostdevs.push(Hostdev {
                                element: Element {
                                    span: s..after,
                                    start_end: se,
                                    close: Some(before),
                                    qname,
                                },
                                source,
                                guest,
                                other_address: other,
                                rom,
                            });
                        }
                    }
                    (["domain", "devices"], "controller") => {
                        if let Some(OpenController {
                            start: s,
                            start_end: se,
                            index,
                            model,
                            hole,
                        }) = controller.take()
                        {
                            out.controllers.push(PciController {
                                element: Element {
                                    span: s..after,
                                    start_end: se,
                                    close: Some(before),
                                    qname,
                                },
                                index,
                                model,
                                pcihole64: hole,
                            });
                        }
                    }
                    _ => {}
                }
            }
            Event::CData(t) => {
                if let Some(c) = collecting.as_mut() {
                    c.2.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Text(t) => {
                if let Some(c) = collecting.as_mut() {
                    let v = t
                        .unescape()
                        .map_err(|err| malformed(format!("at byte {before}: {err}")))?;
                    c.2.push_str(&v);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if out.root.qname.is_empty() {
        return Err(malformed("no root element"));
    }
    if !stack.is_empty() {
        return Err(malformed("unexpected end of document"));
    }
    let loader_lower = loader_text.to_ascii_lowercase();
    out.firmware = match os_firmware.as_deref() {
        Some("efi") => Firmware::Uefi,
        Some(_) => Firmware::Bios,
        None if has_loader
            && (loader_pflash
                || ["ovmf", "edk2", "efi"]
                    .iter()
                    .any(|w| loader_lower.contains(w))) =>
        {
            Firmware::Uefi
        }
        None => Firmware::Bios,
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element's "in QEMU's namespace" and every namespace error, read with [`Scopes`]
    /// and with quick-xml's `NsReader` (which the scan used before): the same.
    #[test]
    fn scopes_resolve_and_refuse_like_ns_reader() {
        use quick_xml::name::ResolveResult;
        use quick_xml::NsReader;
        let q = QEMU_NS;
        let docs = [
            format!("<domain xmlns:qemu='{q}'><qemu:commandline><qemu:arg/></qemu:commandline></domain>"),
            format!("<domain><c xmlns='{q}'><arg/><x:arg xmlns:x='{q}'/></c><arg/></domain>"),
            format!("<domain xmlns:q='{q}'><a xmlns:q='other'><q:arg/></a><q:arg/></domain>"),
            format!("<domain xmlns='{q}'><a xmlns=''><arg/></a><arg/><b xmlns:p=''><p:arg/></b></domain>"),
            format!("<domain xmlns:q='{q}' xmlns:q='other'><q:arg/></domain>"),
            format!("<domain><e xmlns:q='{q}'/><q:arg/></domain>"),
            "<domain><u:arg/><xml:arg/><xmlns:arg/><e a='xmlns' b='1'/></domain>".into(),
            "<domain xmlns:xml='http://www.w3.org/XML/1998/namespace'><a/></domain>".into(),
            "<domain><a xmlns:xml='other'/></domain>".into(),
            "<domain><a xmlns:xmlns='x'/></domain>".into(),
            "<domain><a xmlns:p='http://www.w3.org/XML/1998/namespace'/></domain>".into(),
            "<domain><a xmlns:p='http://www.w3.org/2000/xmlns/'/></domain>".into(),
            format!("<domain><a xmlns:q='{q}' broken xmlns:r='{q}'><r:arg/><q:arg/></a></domain>"),
        ];
        let mut seen = Vec::new();
        for doc in &docs {
            let mut ns = NsReader::from_str(doc);
            let mut want = Vec::new();
            loop {
                match ns.read_resolved_event() {
                    Ok((r, Event::Start(_) | Event::Empty(_))) => want.push(Ok(
                        matches!(r, ResolveResult::Bound(n) if n.as_ref() == q.as_bytes()),
                    )),
                    Ok((_, Event::Eof)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        want.push(Err(e.to_string()));
                        break;
                    }
                }
            }
            let mut r = Reader::from_str(doc);
            let (mut scopes, mut depth, mut have) = (Scopes::default(), 0, Vec::new());
            loop {
                match r.read_event() {
                    Ok(ev @ (Event::Start(_) | Event::Empty(_))) => {
                        let (Event::Start(e) | Event::Empty(e)) = &ev else {
                            unreachable!()
                        };
                        if let Err(e) = scopes.push(e, depth) {
                            have.push(Err(quick_xml::Error::Namespace(e).to_string()));
                            break;
                        }
                        have.push(Ok(scopes.is_qemu(e)));
                        if matches!(ev, Event::Start(_)) {
                            depth += 1;
                        } else {
                            scopes.close(depth);
                        }
                    }
                    Ok(Event::End(_)) => {
                        depth -= 1;
                        scopes.close(depth);
                    }
                    Ok(Event::Eof) => break,
                    Ok(_) => {}
                    Err(e) => {
                        have.push(Err(e.to_string()));
                        break;
                    }
                }
            }
            assert_eq!(have, want, "{doc}");
            seen.extend(have);
        }
        // The cases test something: in QEMU's namespace, outside it, and refused.
        assert!(seen.contains(&Ok(true)) && seen.contains(&Ok(false)));
        assert_eq!(seen.iter().filter(|h| h.is_err()).count(), 4, "{seen:?}");
    }

    const Q35_EFI: &str = r#"<domain type='kvm' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm</name>
  <memory unit='GiB'>16</memory>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
  </os>
  <cpu mode='custom'>
    <model>qemu64</model>
    <maxphysaddr mode='emulate' bits='42'/>
  </cpu>
  <devices>
    <controller type='pci' index='0' model='pcie-root'>
      <pcihole64 unit='GiB'>64</pcihole64>
    </controller>
    <controller type='pci' index='1' model='pcie-root-port'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </controller>
    <controller type='pci' index='2' model='pcie-root-port'/>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x18' slot='0x00' function='0x0'/></source>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </hostdev>
  </devices>
  <q:commandline>
    <q:arg value='-fw_cfg'/>
    <q:arg value='name=opt/ovmf/X-PciMmio64Mb,string=65536'/>
  </q:commandline>
</domain>
"#;

    #[test]
    fn reads_everything_the_fit_needs() {
        let d = scan(Q35_EFI).unwrap();
        assert_eq!(d.name, "vm");
        assert_eq!(d.machine(), Machine::Q35);
        assert_eq!(d.firmware, Firmware::Uefi);
        assert_eq!(d.memory, 16 << 30);
        assert_eq!(d.cpu_mode.as_deref(), Some("custom"));
        let m = d.maxphysaddr.clone().unwrap();
        assert_eq!((m.mode.as_str(), m.bits), ("emulate", Some(42)));
        assert_eq!(&Q35_EFI[m.span], "<maxphysaddr mode='emulate' bits='42'/>");
        assert_eq!(d.controllers.len(), 3);
        let root = &d.controllers[0];
        assert_eq!(root.model.as_deref(), Some("pcie-root"));
        let (span, size) = root.pcihole64.clone().unwrap();
        assert_eq!(size, 64 << 30);
        assert_eq!(&Q35_EFI[span], "<pcihole64 unit='GiB'>64</pcihole64>");
        assert_eq!(d.hostdevs.len(), 1);
        let h = &d.hostdevs[0];
        assert_eq!(h.source.to_string(), "0000:18:00.0");
        assert_eq!(h.guest.as_ref().unwrap().bus, 1);
        assert_eq!(d.addresses.len(), 2, "the root port's and the hostdev's");
        assert_eq!(d.qemu_prefix.as_deref(), Some("q"));
        let (cl, prefix) = d.commandline.clone().unwrap();
        assert_eq!(prefix, "q");
        assert!(Q35_EFI[cl.span].ends_with("</q:commandline>"));
        let mmio = d.mmio64.unwrap();
        assert_eq!(mmio.mib, Some(65536));
        assert_eq!(
            &Q35_EFI[mmio.span],
            "<q:arg value='name=opt/ovmf/X-PciMmio64Mb,string=65536'/>"
        );
    }

    #[test]
    fn defaults_are_libvirts() {
        let d = scan("<domain type='qemu'><name>x</name><memory>1048576</memory><os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader></os></domain>").unwrap();
        assert_eq!(d.machine(), Machine::I440fx, "x86's default machine");
        assert_eq!(d.firmware, Firmware::Uefi, "a pflash loader is OVMF");
        assert_eq!(d.memory, 1 << 30, "KiB by default");
        let d = scan("<domain type='kvm'><name>x</name><os><type arch='aarch64' machine='virt'>hvm</type></os></domain>").unwrap();
        assert_eq!(d.machine(), Machine::Other);
        assert_eq!(d.firmware, Firmware::Bios);
        let d = scan("<domain><name>x</name><os><loader type='rom'>/usr/share/seabios/bios.bin</loader></os></domain>").unwrap();
        assert_eq!(d.firmware, Firmware::Bios);
        assert!(scan("<network/>").is_err());
        assert!(scan("<domain><name>x</name>").is_err());
    }

    #[test]
    fn sizes_scale_like_libvirt() {
        assert_eq!(scaled("2", Some("GiB")), Some(2 << 30));
        assert_eq!(scaled("2", Some("GB")), Some(2_000_000_000));
        assert_eq!(scaled("2", None), Some(2048));
        assert_eq!(scaled("x", None), None);
        assert_eq!(scaled("1", Some("furlong")), None);
    }
}
