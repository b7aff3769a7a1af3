//! Edits a domain XML as text, byte for byte: finds where `<devices>` closes, which `<hostdev>`s
//! gpupass injected (`<alias name='ua-gpupass-…'/>`), and the gpupass request in `<metadata>`;
//! then inserts or removes whole hostdev blocks and touches nothing else — comments, namespaces,
//! quotes, whitespace and entities stay as they were. Pure: text in, text out.

use std::ops::Range;

use quick_xml::events::Event;
use quick_xml::name::{PrefixDeclaration, QName};
use quick_xml::Reader;

use crate::model::{MdevUuid, PciAddress};
use crate::request::{RequestSpec, XMLNS};
use crate::xml::compose::HostdevTemplate;
use crate::xml::{attr, XmlError, MAX_ATTRIBUTES, MAX_DEPTH, MAX_NAMESPACES};

/// The user-alias prefix that marks a hostdev gpupass injected (libvirt keeps `ua-` aliases).
pub const ALIAS_PREFIX: &str = "ua-gpupass-";

/// Largest domain XML accepted (libvirt's own limit for a domain is 10 MiB; real ones are KBs).
pub const MAX_XML_BYTES: usize = 4 * 1024 * 1024;

/// A `<hostdev>` directly under `<devices>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostdevSpan {
    /// Byte range of the element in the input.
    pub span: Range<usize>,
    /// Its PCI source address, when it is a PCI subsystem hostdev.
    pub source: Option<PciAddress>,
    /// Its mediated device, when it is an mdev subsystem hostdev (`<address uuid=…>`).
    pub mdev: Option<MdevUuid>,
    /// Its `<alias name>`.
    pub alias: Option<String>,
}

impl HostdevSpan {
    /// Injected by gpupass.
    pub fn injected(&self) -> bool {
        self.alias
            .as_deref()
            .is_some_and(|a| a.starts_with(ALIAS_PREFIX))
    }
}

/// Where a domain's `<devices>` is (see [`insertion_into`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Devices {
    /// No `<devices>`: a new one goes before `</domain>`.
    Missing,
    /// `<devices>…</devices>`.
    Open {
        /// The offset of `</devices>`.
        close: usize,
    },
    /// `<devices/>`: replaced by an open element.
    Empty {
        /// The element.
        span: Range<usize>,
    },
}

/// The edit that inserts `blocks` into a domain's `<devices>` (creating it when missing) in
/// `text`, indented like the document's own children: `domain_close` is the offset of
/// `</domain>`, the indents those of the first child element of `<domain>` and of `<devices>`
/// that starts a line. [`DomainDoc::insertion`], and the fit's rewrite from its own scan.
pub fn insertion_into(
    text: &str,
    devices: &Devices,
    domain_close: usize,
    domain_child_indent: Option<&str>,
    devices_child_indent: Option<&str>,
    blocks: &[String],
) -> Option<Edit> {
    if blocks.is_empty() {
        return None;
    }
    Some(match devices {
        Devices::Open { close } => match line_indent(text, *close) {
            Some(close_indent) => {
                let child =
                    devices_child_indent.map_or_else(|| format!("{close_indent}  "), str::to_owned);
                let at = *close - close_indent.len();
                Edit {
                    range: at..at,
                    text: blocks.iter().map(|b| format!("{child}{b}\n")).collect(),
                }
            }
            None => Edit {
                range: *close..*close,
                text: blocks.concat(),
            },
        },
        Devices::Missing => match line_indent(text, domain_close) {
            Some(close_indent) => {
                let child =
                    domain_child_indent.map_or_else(|| format!("{close_indent}  "), str::to_owned);
                let at = domain_close - close_indent.len();
                let inner: String = blocks.iter().map(|b| format!("{child}  {b}\n")).collect();
                Edit {
                    range: at..at,
                    text: format!("{child}<devices>\n{inner}{child}</devices>\n"),
                }
            }
            None => Edit {
                range: domain_close..domain_close,
                text: format!("<devices>{}</devices>", blocks.concat()),
            },
        },
        Devices::Empty { span } => Edit {
            range: span.clone(),
            text: format!("<devices>{}</devices>", blocks.concat()),
        },
    })
}

/// Where a domain is pinned, as written in its XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pinning {
    /// `<numatune><memory nodeset=…>`.
    pub numa_nodeset: Option<String>,
    /// `<vcpu cpuset=…>`.
    pub vcpu_cpuset: Option<String>,
    /// `<cputune><vcpupin cpuset=…>` values.
    pub vcpupin_cpusets: Vec<String>,
}

/// What gpupass needs to know about a domain document, with byte positions.
#[derive(Debug, Clone)]
pub struct DomainDoc<'a> {
    text: &'a str,
    /// `<name>`.
    pub name: String,
    /// `<uuid>`.
    pub uuid: Option<String>,
    /// The gpupass request in `<metadata>`, if any.
    pub request: Option<RequestSpec>,
    /// Every `<hostdev>` under `<devices>`, in order.
    pub hostdevs: Vec<HostdevSpan>,
    /// `<numatune><memory nodeset>`, `<vcpu cpuset>`, `<cputune><vcpupin cpuset>`: where the
    /// domain is pinned (for the NUMA preference).
    pub pinning: Pinning,
    devices: Devices,
    /// Offset of `</domain>`.
    domain_close: usize,
    /// Indentation of `<domain>`'s first child element, when it starts a line.
    domain_child_indent: Option<String>,
    /// Indentation of `<devices>`'s first child element, when it starts a line.
    devices_child_indent: Option<String>,
}

fn malformed(reason: impl Into<String>) -> XmlError {
    XmlError::MalformedDomain {
        reason: reason.into(),
    }
}

/// The whitespace before `pos` on its line, when only whitespace precedes it there.
pub(crate) fn line_indent(text: &str, pos: usize) -> Option<&str> {
    let line_start = text[..pos].rfind('\n')? + 1;
    let prefix = &text[line_start..pos];
    prefix
        .bytes()
        .all(|b| b == b' ' || b == b'\t')
        .then_some(prefix)
}

/// The namespace the `xml` prefix is bound to, and the one no prefix may be bound to.
const XML_NAMESPACE: &[u8] = b"http://www.w3.org/XML/1998/namespace";
const XMLNS_NAMESPACE: &[u8] = b"http://www.w3.org/2000/xmlns/";

/// The namespace declarations in scope, innermost last, each with the depth of the element that
/// made it. gpupass resolves the names of only a few elements (those in `<metadata>`), so
/// this replaces quick-xml's `NsReader`, which resolves every element and reads every
/// element's attributes once more to find declarations (a tenth of reading a domain, in the
/// hook's profile). Declarations are refused as `NsReader` refuses them.
#[derive(Debug, Default)]
struct Namespaces {
    /// (prefix, empty for the default namespace; namespace as written; depth).
    bindings: Vec<(Vec<u8>, Vec<u8>, usize)>,
}

impl Namespaces {
    /// Records one declaration on an element at `depth`.
    fn declare(
        &mut self,
        decl: PrefixDeclaration<'_>,
        value: &[u8],
        depth: usize,
    ) -> Result<(), String> {
        let shown = || String::from_utf8_lossy(value).into_owned();
        match decl {
            PrefixDeclaration::Default => {
                self.bindings.push((Vec::new(), value.to_vec(), depth));
            }
            PrefixDeclaration::Named(b"xml") => {
                if value != XML_NAMESPACE {
                    return Err(format!("the xml prefix cannot be bound to '{}'", shown()));
                }
            }
            PrefixDeclaration::Named(b"xmlns") => {
                return Err(format!("the xmlns prefix cannot be bound to '{}'", shown()));
            }
            PrefixDeclaration::Named(p) => {
                if value == XML_NAMESPACE || value == XMLNS_NAMESPACE {
                    return Err(format!(
                        "the prefix '{}' cannot be bound to '{}'",
                        String::from_utf8_lossy(p),
                        shown()
                    ));
                }
                self.bindings.push((p.to_vec(), value.to_vec(), depth));
            }
        }
        Ok(())
    }

    /// Whether the element `name` is in gpupass's namespace ([`XMLNS`]).
    fn is_gpupass(&self, name: QName<'_>) -> bool {
        let prefix = name.prefix().map_or(&b""[..], |p| p.into_inner());
        self.bindings
            .iter()
            .rev()
            .find(|(p, _, _)| p.as_slice() == prefix)
            .is_some_and(|(_, ns, _)| ns.as_slice() == XMLNS.as_bytes())
    }

    /// Ends the scope of the declarations made at `depth` and below.
    fn close(&mut self, depth: usize) {
        while self.bindings.last().is_some_and(|b| b.2 >= depth) {
            self.bindings.pop();
        }
    }
}

/// Scans a domain XML. Fails on malformed XML, a root other than `<domain>`, or a document over
/// [`MAX_XML_BYTES`].
pub fn scan(text: &str) -> Result<DomainDoc<'_>, XmlError> {
    scan_root(text, false)
}

/// Like [`scan`], and also accepts libvirt's status XML (`/run/libvirt/qemu/<name>.xml`),
/// which wraps the domain in `<domstatus>`. For reading what libvirt wrote, never for rewriting:
/// it skips the well-formedness checks of attributes and text that only an edit needs.
pub fn scan_status(text: &str) -> Result<DomainDoc<'_>, XmlError> {
    scan_root(text, true)
}

/// The element path below the root wrapper: `<domstatus>`'s children are read as a domain's.
/// Empty below [`RELEVANT_DEPTH`], where nothing gpupass reads lives, so each event costs a
/// constant, not the depth.
/// Returned in a fixed array (with its length), not a `Vec`: this runs for every event, and an
/// allocation per event showed in the hook's profile.
fn relative(path: &[Vec<u8>], status: bool) -> ([&[u8]; RELEVANT_DEPTH], usize) {
    let skip = usize::from(status && path.first().is_some_and(|p| p == b"domstatus"));
    let rel = &path[skip..];
    let mut out: [&[u8]; RELEVANT_DEPTH] = [&[]; RELEVANT_DEPTH];
    if rel.len() > RELEVANT_DEPTH {
        return (out, 0);
    }
    for (o, p) in out.iter_mut().zip(rel) {
        *o = p;
    }
    (out, rel.len())
}

/// The deepest element path gpupass reads (`domain/devices/hostdev/source`).
const RELEVANT_DEPTH: usize = 4;

/// Which text-only element's content is being collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextField {
    Name,
    Uuid,
}

/// The text content of one element, read as libvirt reads it (XPath `string()` over libxml2's
/// tree): every text and CDATA piece below it, in order, with comments and processing
/// instructions skipped (`<name>a<!-- c -->b</name>` is `ab`). Not trimmed: libvirt keeps a
/// name's spaces.
#[derive(Debug)]
struct Collecting {
    field: TextField,
    /// `path.len()` while inside the element.
    depth: usize,
    text: String,
}

fn scan_root(text: &str, status: bool) -> Result<DomainDoc<'_>, XmlError> {
    if text.len() > MAX_XML_BYTES {
        return Err(malformed(format!(
            "{} bytes is over the {MAX_XML_BYTES}-byte limit",
            text.len()
        )));
    }
    // quick-xml skips a UTF-8 byte-order mark and counts positions after it.
    let (body, base) = match text.strip_prefix('\u{feff}') {
        Some(rest) => (rest, '\u{feff}'.len_utf8()),
        None => (text, 0),
    };
    // A second mark is text before the root (libxml2 refuses it); quick-xml would skip it
    // silently and shift every position by its length.
    if body.starts_with('\u{feff}') {
        return Err(malformed("text outside the root element"));
    }
    let mut reader = Reader::from_str(body);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut doc = DomainDoc {
        text,
        name: String::new(),
        uuid: None,
        request: None,
        hostdevs: Vec::new(),
        pinning: Pinning::default(),
        devices: Devices::Missing,
        domain_close: 0,
        domain_child_indent: None,
        devices_child_indent: None,
    };
    let mut seen_root = false;
    // libvirt reads `./name[1]` and `./uuid[1]`: the first of each counts.
    let mut seen_name = false;
    let mut seen_uuid = false;
    let mut collecting: Option<Collecting> = None;
    // Namespace declarations in scope, and how many each open element made.
    let mut namespaces = 0usize;
    let mut declared: Vec<usize> = Vec::new();
    let mut ns = Namespaces::default();
    let mut in_request = false;
    let mut current: Option<HostdevSpan> = None;
    let mut current_pci = false;
    let mut current_mdev = false;
    let pos = |r: &Reader<&[u8]>| {
        usize::try_from(r.buffer_position()).map_or(usize::MAX, |p| p.saturating_add(base))
    };
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
                // libxml2 (libvirt's parser) refuses deeper documents; refusing them here too
                // keeps every step below bounded by a constant (see `relative`).
                if path.len() >= MAX_DEPTH {
                    return Err(malformed(format!(
                        "at byte {before}: elements nested deeper than {MAX_DEPTH} levels"
                    )));
                }
                // One pass over the attributes: counted (and refused past the limit before the
                // parser's duplicate check, whose cost is the square of their number, gets far),
                // namespace declarations counted, and — in a document that may be edited —
                // each checked, since quick-xml checks an attribute only when it is read: its
                // syntax, that it is not a duplicate, and that its value's entities are known
                // (a value without `&` has none to check). libvirt's own files, which are
                // never edited, are only counted.
                let (mut attrs, mut decls) = (0usize, 0usize);
                let mut attributes = e.attributes();
                attributes.with_checks(!status);
                for a in attributes {
                    let a = match a {
                        Ok(a) => a,
                        Err(_) if status => break,
                        Err(err) => return Err(malformed(format!("at byte {before}: {err}"))),
                    };
                    attrs += 1;
                    if attrs > MAX_ATTRIBUTES {
                        return Err(malformed(format!(
                            "at byte {before}: more than {MAX_ATTRIBUTES} attributes on one element"
                        )));
                    }
                    if let Some(decl) = a.key.as_namespace_binding() {
                        decls += 1;
                        ns.declare(decl, &a.value, path.len())
                            .map_err(|err| malformed(format!("at byte {before}: {err}")))?;
                    }
                    if !status && a.value.contains(&b'&') {
                        a.unescape_value()
                            .map_err(|err| malformed(format!("at byte {before}: {err}")))?;
                    }
                }
                namespaces += decls;
                if namespaces > MAX_NAMESPACES {
                    return Err(malformed(format!(
                        "at byte {before}: more than {MAX_NAMESPACES} namespace declarations in scope"
                    )));
                }
                if empty {
                    namespaces -= decls;
                } else {
                    declared.push(decls);
                }
                let qname = e.name();
                let local = e.local_name();
                let name = local.as_ref();
                if path.is_empty() {
                    if seen_root {
                        return Err(malformed("more than one root element"));
                    }
                    seen_root = true;
                    let root = qname.as_ref();
                    if root != b"domain" && !(status && root == b"domstatus") {
                        return Err(malformed(format!(
                            "root element is <{}>, not <domain>",
                            String::from_utf8_lossy(root)
                        )));
                    }
                    if empty {
                        return Err(malformed("the root element is empty"));
                    }
                }
                let (here, depth) = relative(&path, status);
                match &here[..depth] {
                    [b"domain"] if qname.as_ref() == b"vcpu" => {
                        doc.pinning.vcpu_cpuset = attr(e, b"cpuset")?;
                        if doc.domain_child_indent.is_none() {
                            doc.domain_child_indent = line_indent(text, before).map(str::to_owned);
                        }
                    }
                    [b"domain", b"numatune"] if qname.as_ref() == b"memory" => {
                        doc.pinning.numa_nodeset = attr(e, b"nodeset")?;
                    }
                    [b"domain", b"cputune"] if qname.as_ref() == b"vcpupin" => {
                        doc.pinning.vcpupin_cpusets.extend(attr(e, b"cpuset")?);
                    }
                    [b"domain"] if qname.as_ref() == b"name" && !seen_name => {
                        seen_name = true;
                        collecting = (!empty).then(|| Collecting {
                            field: TextField::Name,
                            depth: path.len() + 1,
                            text: String::new(),
                        });
                        if doc.domain_child_indent.is_none() {
                            doc.domain_child_indent = line_indent(text, before).map(str::to_owned);
                        }
                    }
                    [b"domain"] if qname.as_ref() == b"uuid" && !seen_uuid => {
                        seen_uuid = true;
                        collecting = (!empty).then(|| Collecting {
                            field: TextField::Uuid,
                            depth: path.len() + 1,
                            text: String::new(),
                        });
                        if doc.domain_child_indent.is_none() {
                            doc.domain_child_indent = line_indent(text, before).map(str::to_owned);
                        }
                    }
                    [b"domain"] => {
                        if doc.domain_child_indent.is_none() {
                            doc.domain_child_indent = line_indent(text, before).map(str::to_owned);
                        }
                        if qname.as_ref() == b"devices" {
                            if !matches!(doc.devices, Devices::Missing) {
                                return Err(malformed("more than one <devices>"));
                            }
                            doc.devices = if empty {
                                Devices::Empty {
                                    span: before..after,
                                }
                            } else {
                                Devices::Open { close: 0 }
                            };
                        }
                    }
                    [b"domain", b"devices"] => {
                        if doc.devices_child_indent.is_none() {
                            doc.devices_child_indent = line_indent(text, before).map(str::to_owned);
                        }
                        if qname.as_ref() == b"hostdev" {
                            let mode = attr(e, b"mode")?;
                            let ty = attr(e, b"type")?;
                            let span = HostdevSpan {
                                span: before..after,
                                source: None,
                                mdev: None,
                                alias: None,
                            };
                            let subsystem = mode.as_deref().unwrap_or("subsystem") == "subsystem";
                            current_pci = subsystem && ty.as_deref() == Some("pci");
                            current_mdev = subsystem && ty.as_deref() == Some("mdev");
                            if empty {
                                doc.hostdevs.push(span);
                            } else {
                                current = Some(span);
                            }
                        }
                    }
                    [b"domain", b"devices", b"hostdev"] if qname.as_ref() == b"alias" => {
                        if let Some(c) = current.as_mut() {
                            c.alias = attr(e, b"name")?;
                        }
                    }
                    [b"domain", b"devices", b"hostdev", b"source"]
                        if qname.as_ref() == b"address" && current_pci =>
                    {
                        if let Some(c) = current.as_mut() {
                            c.source = crate::xml::domain::pci_address_of(e)?;
                        }
                    }
                    [b"domain", b"devices", b"hostdev", b"source"]
                        if qname.as_ref() == b"address" && current_mdev =>
                    {
                        if let Some(c) = current.as_mut() {
                            // A UUID libvirt would refuse leaves the hostdev without a source.
                            c.mdev = attr(e, b"uuid")?.and_then(|u| u.parse().ok());
                        }
                    }
                    [b"domain", b"metadata"]
                        if name == b"gpus" && doc.request.is_none() && ns.is_gpupass(qname) =>
                    {
                        doc.request = Some(RequestSpec {
                            count: attr(e, b"count")?,
                            model: attr(e, b"model")?,
                            alias: attr(e, b"alias")?,
                            gpus: Vec::new(),
                            owner: attr(e, b"owner")?,
                            profile: attr(e, b"profile")?,
                        });
                        in_request = !empty;
                    }
                    [b"domain", b"metadata", _]
                        if in_request && name == b"gpu" && ns.is_gpupass(qname) =>
                    {
                        if let (Some(r), Some(a)) = (doc.request.as_mut(), attr(e, b"address")?) {
                            r.gpus.push(a);
                        }
                    }
                    _ => {}
                }
                if empty {
                    ns.close(path.len());
                } else {
                    path.push(qname.as_ref().to_vec());
                }
            }
            Event::End(ref e) => {
                let (here, depth) = relative(&path, status);
                match &here[..depth] {
                    [b"domain"] => doc.domain_close = before,
                    [b"domain", b"devices"] => doc.devices = Devices::Open { close: before },
                    [b"domain", b"devices", b"hostdev"] => {
                        if let Some(mut c) = current.take() {
                            c.span.end = after;
                            doc.hostdevs.push(c);
                        }
                    }
                    [b"domain", b"metadata", _] if in_request && ns.is_gpupass(e.name()) => {
                        in_request = false;
                    }
                    _ => {}
                }
                if collecting.as_ref().is_some_and(|c| c.depth == path.len()) {
                    if let Some(c) = collecting.take() {
                        match c.field {
                            TextField::Name => doc.name = c.text,
                            // libvirt's `virUUIDParse` skips spaces around a UUID.
                            TextField::Uuid => {
                                let u = c.text.trim();
                                doc.uuid = (!u.is_empty()).then(|| u.to_owned());
                            }
                        }
                    }
                }
                path.pop();
                ns.close(path.len());
                namespaces -= declared.pop().unwrap_or(0);
            }
            Event::Text(t) => {
                if path.is_empty() && !t.iter().all(u8::is_ascii_whitespace) {
                    return Err(malformed("text outside the root element"));
                }
                // An unknown entity makes the document not well-formed: refuse it (text without
                // `&` has no entity to check).
                if collecting.is_some() || (!status && t.contains(&b'&')) {
                    let value = t
                        .unescape()
                        .map_err(|err| malformed(format!("at byte {before}: {err}")))?;
                    if let Some(c) = collecting.as_mut() {
                        c.text.push_str(&value);
                    }
                }
            }
            Event::CData(t) => {
                if let Some(c) = collecting.as_mut() {
                    let value = std::str::from_utf8(&t)
                        .map_err(|err| malformed(format!("at byte {before}: {err}")))?;
                    c.text.push_str(value);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !seen_root {
        return Err(malformed("no root element"));
    }
    if !path.is_empty() {
        return Err(malformed(
            "unexpected end of document (an element is not closed)",
        ));
    }
    if doc.name.is_empty() {
        return Err(malformed("the domain has no <name>"));
    }
    Ok(doc)
}

/// One change to the text: replace `range` with `text` (an empty range inserts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    /// Where.
    pub range: Range<usize>,
    /// What goes there.
    pub text: String,
}

/// Applies non-overlapping edits.
pub fn apply(input: &str, edits: &[Edit]) -> String {
    let mut sorted: Vec<&Edit> = edits.iter().collect();
    sorted.sort_by_key(|e| (e.range.start, e.range.end));
    let mut out =
        String::with_capacity(input.len() + edits.iter().map(|e| e.text.len()).sum::<usize>());
    let mut at = 0;
    for e in sorted {
        // Overlaps cannot happen: removals are whole elements, insertion is at a close tag.
        let start = e.range.start.max(at);
        out.push_str(&input[at..start]);
        out.push_str(&e.text);
        at = e.range.end.max(start);
    }
    out.push_str(&input[at..]);
    out
}

/// A composed block with gpupass's alias, so it is recognisable later.
pub fn injected_block(template: &HostdevTemplate, addr: PciAddress) -> String {
    let block = template.render(addr);
    let alias = format!(
        "<alias name='{ALIAS_PREFIX}{:04x}-{:02x}-{:02x}-{:x}'/>",
        addr.domain, addr.bus, addr.slot, addr.function
    );
    match block.rfind("</hostdev>") {
        Some(i) => format!("{}{alias}{}", &block[..i], &block[i..]),
        None => block,
    }
}

impl DomainDoc<'_> {
    /// PCI sources of every hostdev.
    pub fn pci_sources(&self) -> Vec<PciAddress> {
        self.hostdevs.iter().filter_map(|h| h.source).collect()
    }

    /// Mediated devices of every mdev hostdev.
    pub fn mdev_sources(&self) -> Vec<MdevUuid> {
        self.hostdevs
            .iter()
            .filter_map(|h| h.mdev.clone())
            .collect()
    }

    /// The edit that inserts `blocks` into `<devices>` (creating it when missing), indented like
    /// the document's own children.
    pub fn insertion(&self, blocks: &[String]) -> Option<Edit> {
        insertion_into(
            self.text,
            &self.devices,
            self.domain_close,
            self.domain_child_indent.as_deref(),
            self.devices_child_indent.as_deref(),
            blocks,
        )
    }

    /// The edit that removes one hostdev, with its line when it stands alone on one.
    pub fn removal(&self, h: &HostdevSpan) -> Edit {
        let text = self.text;
        let alone_after = text[h.span.end..].starts_with('\n');
        match line_indent(text, h.span.start) {
            Some(indent) if alone_after => Edit {
                range: h.span.start - indent.len()..h.span.end + 1,
                text: String::new(),
            },
            _ => Edit {
                range: h.span.clone(),
                text: String::new(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "<?xml version='1.0'?>
<!-- a comment & an entity: &amp; -->
<domain type=\"kvm\" xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>i-2-34-VM</name>
  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>
  <metadata>
    <gp:gpus xmlns:gp='https://gpupass.dev/xmlns/1' count='2' model='10de:2330'/>
    <other:gpus xmlns:other='urn:other' count='9'/>
  </metadata>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x18' slot='0x00' function='0x0'/></source>
      <alias name='ua-gpupass-0000-18-00-0'/>
    </hostdev>
    <hostdev mode='subsystem' type='pci'>
      <source><address domain='0x0000' bus='0x3b' slot='0x00' function='0x0'/></source>
    </hostdev>
  </devices>
  <qemu:commandline><qemu:arg value='-x'/></qemu:commandline>
</domain>
";

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn scans_name_request_and_hostdevs() {
        let d = scan(DOMAIN).unwrap();
        assert_eq!(d.name, "i-2-34-VM");
        let r = d.request.clone().unwrap();
        assert_eq!(r.count.as_deref(), Some("2"));
        assert_eq!(r.model.as_deref(), Some("10de:2330"));
        assert_eq!(d.hostdevs.len(), 2);
        assert!(d.hostdevs[0].injected() && !d.hostdevs[1].injected());
        assert_eq!(d.pinning, Pinning::default());
        let pinned = scan("<domain><name>p</name><vcpu cpuset='56-59'>4</vcpu><cputune><vcpupin vcpu='0' cpuset='56'/></cputune><numatune><memory nodeset='1'/></numatune></domain>").unwrap();
        assert_eq!(pinned.pinning.vcpu_cpuset.as_deref(), Some("56-59"));
        assert_eq!(pinned.pinning.vcpupin_cpusets, ["56"]);
        assert_eq!(pinned.pinning.numa_nodeset.as_deref(), Some("1"));
        assert_eq!(d.pci_sources(), [a("0000:18:00.0"), a("0000:3b:00.0")]);
        assert!(DOMAIN[d.hostdevs[1].span.clone()].starts_with("<hostdev"));
        assert!(DOMAIN[d.hostdevs[1].span.clone()].ends_with("</hostdev>"));
    }

    #[test]
    fn inserts_indented_blocks_and_nothing_else() {
        let d = scan(DOMAIN).unwrap();
        let t = HostdevTemplate::builtin();
        let e = d
            .insertion(&[injected_block(&t, a("0000:2a:00.0"))])
            .unwrap();
        let out = apply(DOMAIN, std::slice::from_ref(&e));
        assert!(out.contains(
            "    </hostdev>\n    <hostdev mode='subsystem' type='pci' managed='yes'><driver name='vfio'/><source><address domain='0x0000' bus='0x2a' slot='0x00' function='0x0'/></source><alias name='ua-gpupass-0000-2a-00-0'/></hostdev>\n  </devices>"
        ), "{out}");
        let back = format!(
            "{}{}",
            &out[..e.range.start],
            &out[e.range.start + e.text.len()..]
        );
        assert_eq!(back, DOMAIN);
        // The output scans again and shows the new block as injected.
        let again = scan(&out).unwrap();
        assert_eq!(again.hostdevs.iter().filter(|h| h.injected()).count(), 2);
    }

    #[test]
    fn removes_injected_lines_cleanly() {
        let d = scan(DOMAIN).unwrap();
        let out = apply(DOMAIN, &[d.removal(&d.hostdevs[0])]);
        assert!(!out.contains("bus='0x18'"));
        assert!(out.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>\n    <hostdev mode='subsystem' type='pci'>"), "{out}");
    }

    #[test]
    fn creates_devices_when_missing_or_empty() {
        let t = HostdevTemplate::builtin();
        let block = injected_block(&t, a("0000:2a:00.0"));
        let missing = "<domain type='qemu'>\n  <name>x</name>\n</domain>\n";
        let d = scan(missing).unwrap();
        let out = apply(
            missing,
            &[d.insertion(std::slice::from_ref(&block)).unwrap()],
        );
        assert_eq!(
            out,
            format!("<domain type='qemu'>\n  <name>x</name>\n  <devices>\n    {block}\n  </devices>\n</domain>\n")
        );
        let one_line = "<domain type='qemu'><name>x</name><devices/></domain>";
        let d = scan(one_line).unwrap();
        let out = apply(
            one_line,
            &[d.insertion(std::slice::from_ref(&block)).unwrap()],
        );
        assert_eq!(
            out,
            format!("<domain type='qemu'><name>x</name><devices>{block}</devices></domain>")
        );
    }

    #[test]
    fn rejects_what_is_not_a_domain() {
        for (bad, why) in [
            ("<network><name>x</name></network>", "not <domain>"),
            ("<domain><name>x</name>", "not closed"),
            ("<domain><name>x</name></domian>", "at byte"),
            ("", "no root"),
            (
                "<domain><name>x</name></domain><domain/>",
                "more than one root",
            ),
            ("<domain type='kvm'><devices/></domain>", "no <name>"),
            (
                "<domstatus><domain><name>x</name></domain></domstatus>",
                "not <domain>",
            ),
            ("junk<domain><name>x</name></domain>", "outside"),
        ] {
            let err = scan(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let huge = format!(
            "<domain><name>x</name><!--{}--></domain>",
            "x".repeat(MAX_XML_BYTES)
        );
        assert!(scan(&huge).unwrap_err().to_string().contains("limit"));
    }

    #[test]
    fn a_byte_order_mark_does_not_shift_positions() {
        let x = "\u{feff}<domain>\n  <name>x</name>\n  <devices>\n    <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='1' slot='0' function='0'/></source></hostdev>\n  </devices>\n</domain>\n";
        let d = scan(x).unwrap();
        assert!(x[d.hostdevs[0].span.clone()].starts_with("<hostdev "));
        assert!(x[d.hostdevs[0].span.clone()].ends_with("</hostdev>"));
        assert!(scan(&format!("\u{feff}{x}")).is_err(), "two marks");
        let block = injected_block(&HostdevTemplate::builtin(), a("0000:02:00.0"));
        let out = apply(x, &[d.insertion(std::slice::from_ref(&block)).unwrap()]);
        assert!(
            out.contains(&format!("</hostdev>\n    {block}\n  </devices>")),
            "{out}"
        );
    }

    #[test]
    fn refuses_what_is_not_well_formed_even_where_gpupass_does_not_look() {
        for bad in [
            "<domain><name>x</name><os managed=\t<na'></os></domain>",
            "<domain><name>x</name><os a='1' a='2'/></domain>",
            "<domain><name>x</name><description>&nosuch;</description></domain>",
            "<domain><name>x</name><description>a & b</description></domain>",
            "<domain><name>x</name><os a='&nosuch;'/></domain>",
            "<domain><name>x</name><os a='1 &amp 2'/></domain>",
            "<domain><name>x</name><os b='&#1114112;'/></domain>",
        ] {
            assert!(scan(bad).is_err(), "{bad}");
        }
        let fine = "<domain><name>x</name><os a='&lt;&#65;&amp;' b='c'>d &gt; e</os></domain>";
        assert_eq!(scan(fine).unwrap().name, "x");
    }

    /// A domain whose `<metadata>` holds `depth - 2` nested `<a>` (so `depth` levels in all).
    fn nested(depth: usize) -> String {
        format!(
            "<domain><name>x</name><metadata>{}{}</metadata></domain>",
            "<a>".repeat(depth - 2),
            "</a>".repeat(depth - 2)
        )
    }

    #[test]
    fn nesting_deeper_than_libvirt_accepts_is_refused_at_once() {
        assert_eq!(scan(&nested(MAX_DEPTH)).unwrap().name, "x");
        let err = scan(&nested(MAX_DEPTH + 1)).unwrap_err().to_string();
        assert!(err.contains("nested deeper than 256 levels"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        // An empty element one level too deep counts too, and so does the status wrapper.
        let empty = nested(MAX_DEPTH).replacen("<a></a>", "<a><b/></a>", 1);
        assert!(scan(&empty).is_err());
        let status = format!("<domstatus>{}</domstatus>", nested(MAX_DEPTH));
        assert!(scan_status(&status).is_err());
        // Close to the size limit, half a million levels deep: refused, not parsed for minutes.
        let deep = nested(500_000);
        assert!(deep.len() < MAX_XML_BYTES);
        assert!(scan(&deep).is_err());
        // As wide as it may be at the deepest level allowed: accepted.
        let inner = format!("{}{}", "<a>".repeat(250), "</a>".repeat(250));
        let wide = format!(
            "<domain><name>x</name><metadata>{}</metadata></domain>",
            inner.repeat(MAX_XML_BYTES / inner.len() - 1)
        );
        assert_eq!(scan(&wide).unwrap().name, "x");
    }

    #[test]
    fn what_would_make_reading_quadratic_is_refused() {
        let attrs = |n: usize| (0..n).map(|i| format!(" a{i}='1'")).collect::<String>();
        let ok = format!(
            "<domain><name>x</name><os{}/></domain>",
            attrs(MAX_ATTRIBUTES)
        );
        assert!(scan(&ok).is_ok());
        let many = format!("<domain><name>x</name><os{}/></domain>", attrs(100_000));
        let err = scan(&many).unwrap_err().to_string();
        assert!(err.contains("more than 256 attributes"), "{err}");
        // Namespace declarations count while in scope: 40 + 40 in sequence are fine, nested
        // they are too many.
        let decls = |p: &str, n: usize| {
            (0..n)
                .map(|i| format!(" xmlns:{p}{i}='urn:{i}'"))
                .collect::<String>()
        };
        let seq = format!(
            "<domain><name>x</name><metadata><a{}/><b{}></b></metadata></domain>",
            decls("p", 40),
            decls("q", 40)
        );
        assert!(scan(&seq).is_ok());
        let nested = format!(
            "<domain><name>x</name><metadata><a{}><b{}/></a></metadata></domain>",
            decls("p", 40),
            decls("q", 40)
        );
        let err = scan(&nested).unwrap_err().to_string();
        assert!(err.contains("more than 64 namespace declarations"), "{err}");
        let status = format!(
            "<domstatus{}><domain{}><name>x</name></domain></domstatus>",
            decls("p", 40),
            decls("q", 40)
        );
        assert!(scan_status(&status).is_err());
    }

    #[test]
    fn name_and_uuid_are_read_as_libvirt_reads_them() {
        let d = scan("<domain><name>audit-<!-- c -->x</name></domain>").unwrap();
        assert_eq!(d.name, "audit-x", "a comment splits nothing");
        let d = scan("<domain><name>a<?pi x?>b<![CDATA[<c>]]>&amp;d</name></domain>").unwrap();
        assert_eq!(d.name, "ab<c>&d");
        let d = scan("<domain><name>first</name><name>second</name></domain>").unwrap();
        assert_eq!(d.name, "first", "libvirt reads ./name[1]");
        let d = scan("<domain><name> my vm </name></domain>").unwrap();
        assert_eq!(d.name, " my vm ", "libvirt keeps a name's spaces");
        let d = scan("<domain><name>x</name><uuid>\n  c7a5fdbd-edaf-9455-926a-d65c16db1809<!-- -->\n</uuid><uuid>00000000-0000-0000-0000-000000000001</uuid></domain>").unwrap();
        assert_eq!(
            d.uuid.as_deref(),
            Some("c7a5fdbd-edaf-9455-926a-d65c16db1809")
        );
        assert!(
            scan("<domain><name/><name>x</name></domain>").is_err(),
            "name[1] is empty"
        );
        let status = "<domstatus><domain><name>vm<!-- -->1</name></domain></domstatus>";
        assert_eq!(scan_status(status).unwrap().name, "vm1");
    }

    #[test]
    fn a_request_with_addresses_is_read_by_namespace_not_prefix() {
        let x = "<domain><name>x</name><metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1'><g:gpu address='0000:18:00.0'/><g:gpu address='0000:2a:00.0'/></g:gpus></metadata></domain>";
        let r = scan(x).unwrap().request.unwrap();
        assert_eq!(r.gpus, ["0000:18:00.0", "0000:2a:00.0"]);
        let other = "<domain><name>x</name><metadata><gpus count='1'/></metadata></domain>";
        assert!(scan(other).unwrap().request.is_none());
    }

    #[test]
    fn namespaces_are_scoped_like_xml_says() {
        let request = |metadata: &str| {
            scan(&format!(
                "<domain xmlns:r='https://gpupass.dev/xmlns/1'><name>x</name><metadata>{metadata}</metadata></domain>"
            ))
            .map(|d| d.request.map(|r| (r.count, r.gpus)))
        };
        let two = Some((Some("2".to_owned()), Vec::new()));
        // Declared on the root, by default namespace, on the element itself.
        assert_eq!(request("<r:gpus count='2'/>").unwrap(), two);
        assert_eq!(
            request("<gpus xmlns='https://gpupass.dev/xmlns/1' count='2'/>").unwrap(),
            two
        );
        assert_eq!(
            request("<q:gpus xmlns:q='https://gpupass.dev/xmlns/1' count='2'/>").unwrap(),
            two
        );
        // Rebound on the element, or undeclared: not gpupass's.
        assert_eq!(
            request("<r:gpus xmlns:r='urn:x' count='2'/>").unwrap(),
            None
        );
        assert_eq!(request("<q:gpus count='2'/>").unwrap(), None);
        assert_eq!(request("<gpus xmlns='' count='2'/>").unwrap(), None);
        // A declaration ends with its element: an empty one's at once.
        assert_eq!(
            request("<a xmlns:q='https://gpupass.dev/xmlns/1'/><q:gpus count='2'/>").unwrap(),
            None
        );
        assert_eq!(
            request("<a xmlns:q='https://gpupass.dev/xmlns/1'></a><q:gpus count='2'/>").unwrap(),
            None
        );
        // Children are read in the request's own scope, and a rebinding below it ends there.
        let r = request("<r:gpus><r:gpu address='a'/><r:gpu xmlns:r='urn:x' address='b'/><r:gpu address='c'/></r:gpus>")
            .unwrap()
            .unwrap();
        assert_eq!(r.1, ["a", "c"]);
        // The request ends at its own end tag, found by namespace too.
        let r =
            request("<r:gpus><q:gpu xmlns:q='urn:x' address='a'/></r:gpus><r:gpu address='z'/>")
                .unwrap()
                .unwrap();
        assert!(r.1.is_empty(), "{r:?}");
        // Reserved prefixes and namespaces, refused as quick-xml's namespace reader did.
        for bad in [
            "<a xmlns:xml='urn:x'/>",
            "<a xmlns:xmlns='urn:x'/>",
            "<a xmlns:p='http://www.w3.org/XML/1998/namespace'/>",
            "<a xmlns:p='http://www.w3.org/2000/xmlns/'/>",
        ] {
            assert!(request(bad).is_err(), "{bad}");
        }
        assert!(request("<a xmlns:xml='http://www.w3.org/XML/1998/namespace'/>").is_ok());
    }
}
