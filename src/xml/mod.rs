//! libvirt XML: composing `<hostdev>` blocks from templates and reading the facts gpupass needs
//! (hostdev sources, NUMA pinning, name) out of domain XML. Pure text in, values out; no IO
//! except loading a template directory the config names.

pub mod caps;
pub mod compose;
pub mod domain;
pub mod rewrite;

use std::path::PathBuf;

use quick_xml::events::BytesStart;

/// Deepest element nesting any XML reader of gpupass accepts (the root counts as 1): libxml2's
/// default limit (`xmlParserMaxDepth`), under which libvirt parses every document, so no domain
/// libvirt accepts is deeper. A deeper document is refused as soon as the reader gets there.
pub const MAX_DEPTH: usize = 256;

/// Most attributes on one element of a domain XML. The XML parser's duplicate check costs the
/// square of an element's attributes, so 4 MiB of them would take minutes; libvirt's own
/// elements have a dozen at most.
pub const MAX_ATTRIBUTES: usize = 256;

/// Most namespace declarations in scope at once in a domain XML. Resolving each element's
/// namespace walks those in scope, so the count must be small for reading to stay linear;
/// a domain uses a handful (one per application's metadata).
pub const MAX_NAMESPACES: usize = 64;

/// Errors from composing or reading XML.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// A template file could not be read.
    #[error("failed to read template {path}")]
    ReadTemplate {
        /// The template path.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// A template is not one well-formed `<hostdev>` element or uses an unknown placeholder.
    #[error("invalid hostdev template {origin}: {reason}")]
    InvalidTemplate {
        /// Where the template came from.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// Domain XML could not be parsed.
    #[error("malformed domain XML: {reason}")]
    MalformedDomain {
        /// The parser's message.
        reason: String,
    },
}

/// An attribute's unescaped value, `None` when absent.
pub(crate) fn attr(e: &BytesStart<'_>, name: &[u8]) -> Result<Option<String>, XmlError> {
    for a in e.attributes() {
        let a = a.map_err(|err| XmlError::MalformedDomain {
            reason: err.to_string(),
        })?;
        if a.key.as_ref() == name {
            let v = a
                .unescape_value()
                .map_err(|err| XmlError::MalformedDomain {
                    reason: err.to_string(),
                })?;
            return Ok(Some(v.into_owned()));
        }
    }
    Ok(None)
}
