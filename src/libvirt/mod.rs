//! The domain-level operations gpupass needs from a hypervisor, as a trait: list domains, read
//! their XML, attach and detach a device. `virt.rs` is the real libvirt (with `events.rs`, its event
//! loop and domain events, the only files that import the `virt` crate); `fake.rs` records calls and injects failures for unit tests;
//! `files.rs` reads libvirt's own domain files instead, for the hook, which must never call it.

use crate::model::PciAddress;

pub mod deadline;
#[cfg(feature = "libvirt")]
pub mod events;
#[cfg(test)]
pub mod fake;
pub mod files;
#[cfg(feature = "libvirt")]
pub mod virt;

/// Errors from the hypervisor.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LibvirtError {
    /// No connection to the daemon.
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect {
        /// The URI tried.
        uri: String,
        /// libvirt's message.
        message: String,
    },
    /// No domain of that name.
    #[error("domain '{name}' not found")]
    UnknownDomain {
        /// The name asked for.
        name: String,
    },
    /// libvirt refused an operation; its own message is kept word for word.
    #[error("libvirt refused to {action} on domain '{domain}': {message}")]
    Refused {
        /// What gpupass asked for.
        action: String,
        /// The domain.
        domain: String,
        /// libvirt's message.
        message: String,
    },
    /// Any other failed call.
    #[error("libvirt call failed ({action}): {message}")]
    Call {
        /// What gpupass asked for.
        action: String,
        /// libvirt's message.
        message: String,
    },
}

impl LibvirtError {
    /// The documented exit code (the table in `gpupass --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            LibvirtError::Connect { .. } => 8,
            LibvirtError::UnknownDomain { .. } => 4,
            LibvirtError::Refused { .. } => 9,
            LibvirtError::Call { .. } => 1,
        }
    }
}

/// Which definition of a domain to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XmlView {
    /// The running definition (the persistent one for an inactive domain).
    Live,
    /// The persistent definition, as the next start will see it.
    Config,
}

/// Where a device change applies, as libvirt's `VIR_DOMAIN_AFFECT_LIVE` / `_CONFIG`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Impact {
    /// Change the running domain.
    pub live: bool,
    /// Change the persistent definition.
    pub config: bool,
}

impl Impact {
    /// True when neither is set.
    pub fn is_empty(self) -> bool {
        !self.live && !self.config
    }

    /// `live`, `config` or `live+config`, for messages.
    pub fn describe(self) -> &'static str {
        match (self.live, self.config) {
            (true, true) => "live+config",
            (true, false) => "live",
            (false, true) => "config",
            (false, false) => "nothing",
        }
    }
}

/// A domain's name and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// Its name.
    pub name: String,
    /// Running (or paused).
    pub active: bool,
    /// Has a persistent definition.
    pub persistent: bool,
}

/// The hypervisor operations gpupass uses.
pub trait Hypervisor {
    /// The connection URI, for messages.
    fn uri(&self) -> &str;
    /// Every domain, running or defined.
    fn domains(&self) -> Result<Vec<DomainInfo>, LibvirtError>;
    /// One domain; `UnknownDomain` when there is none.
    fn domain(&self, name: &str) -> Result<DomainInfo, LibvirtError>;
    /// A domain's XML.
    fn domain_xml(&self, name: &str, view: XmlView) -> Result<String, LibvirtError>;
    /// Attaches a device (`virDomainAttachDeviceFlags`).
    fn attach_device(&self, name: &str, xml: &str, impact: Impact) -> Result<(), LibvirtError>;
    /// Defines (replaces) a domain's persistent definition, validated against libvirt's schema
    /// (`virDomainDefineXMLFlags` with `VIR_DOMAIN_DEFINE_VALIDATE`).
    fn define(&self, name: &str, xml: &str) -> Result<(), LibvirtError>;
    /// Detaches a device (`virDomainDetachDeviceFlags`).
    fn detach_device(&self, name: &str, xml: &str, impact: Impact) -> Result<(), LibvirtError>;
    /// The host driver a PCI device is bound to now (`virNodeDeviceGetXMLDesc`).
    fn node_driver(&self, addr: PciAddress) -> Result<Option<String>, LibvirtError>;
    /// Moves a PCI device from its host driver to vfio-pci (`virNodeDeviceDetachFlags`).
    fn node_detach(&self, addr: PciAddress) -> Result<(), LibvirtError>;
    /// Gives a PCI device back to its host driver (`virNodeDeviceReAttach`).
    fn node_reattach(&self, addr: PciAddress) -> Result<(), LibvirtError>;
}

/// libvirt's node-device name of a PCI function: `pci_0000_61_00_0`.
pub fn nodedev_name(a: PciAddress) -> String {
    format!(
        "pci_{:04x}_{:02x}_{:02x}_{:x}",
        a.domain, a.bus, a.slot, a.function
    )
}
