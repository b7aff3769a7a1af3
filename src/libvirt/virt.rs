//! The real hypervisor: libvirt through the `virt` crate. With `events.rs`, the only file that
//! imports `virt`.

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

use crate::libvirt::{nodedev_name, DomainInfo, Hypervisor, Impact, LibvirtError, XmlView};
use crate::model::PciAddress;

/// Seconds between keepalive pings while a call waits for libvirtd.
const KEEPALIVE_INTERVAL_S: i32 = 5;
/// Unanswered pings after which the connection counts as dead (libvirt closes it and the
/// waiting call fails): a dead or stuck peer is noticed within about 5 × (3 + 1) s.
const KEEPALIVE_COUNT: u32 = 3;

/// A libvirt connection.
pub struct VirtHypervisor {
    conn: Connect,
    uri: String,
}

impl std::fmt::Debug for VirtHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtHypervisor")
            .field("uri", &self.uri)
            .finish()
    }
}

fn message(e: &virt::error::Error) -> String {
    // libvirt messages can span lines (QEMU's stderr); keep one line.
    e.message().split_whitespace().collect::<Vec<_>>().join(" ")
}

fn impact_flags(impact: Impact) -> u32 {
    let mut flags = sys::VIR_DOMAIN_AFFECT_CURRENT;
    if impact.live {
        flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
    }
    if impact.config {
        flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
    }
    flags
}

impl VirtHypervisor {
    /// Connects to `uri` (e.g. `qemu:///system`).
    pub fn open(uri: &str) -> Result<Self, LibvirtError> {
        // Without this, libvirt prints every error to stderr itself, on top of ours.
        virt::error::clear_error_callback();
        // libvirt's keepalive needs an event loop registered before the connection opens.
        if let Err(e) = crate::libvirt::events::start_event_loop() {
            tracing::debug!(error = %e, "no libvirt event loop: no keepalive");
        }
        let conn = Connect::open(Some(uri)).map_err(|e| LibvirtError::Connect {
            uri: uri.to_owned(),
            message: message(&e),
        })?;
        // A peer that stops answering (a hung libvirtd, a stuck proxy) then fails the waiting
        // call instead of blocking it forever. Drivers without it (test:///) just go without.
        if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
            tracing::debug!(uri, "libvirt keepalive not enabled: {}", message(&e));
        }
        Ok(Self {
            conn,
            uri: uri.to_owned(),
        })
    }

    fn lookup(&self, name: &str) -> Result<Domain, LibvirtError> {
        self.conn.lookup_domain_by_name(name).map_err(|e| {
            if e.code().is(ErrorNumber::NoDomain) {
                LibvirtError::UnknownDomain {
                    name: name.to_owned(),
                }
            } else {
                LibvirtError::Call {
                    action: format!("look up domain '{name}'"),
                    message: message(&e),
                }
            }
        })
    }

    fn info(name: String, dom: &Domain) -> Result<DomainInfo, LibvirtError> {
        let call = |what: &str, e: virt::error::Error| LibvirtError::Call {
            action: format!("{what} of '{name}'"),
            message: message(&e),
        };
        let active = dom.is_active().map_err(|e| call("state", e))?;
        let persistent = dom.is_persistent().map_err(|e| call("persistence", e))?;
        Ok(DomainInfo {
            name,
            active,
            persistent,
        })
    }

    fn change(
        &self,
        verb: &str,
        name: &str,
        xml: &str,
        impact: Impact,
        attach: bool,
    ) -> Result<(), LibvirtError> {
        let dom = self.lookup(name)?;
        let flags = impact_flags(impact);
        // attach_device_flags/detach_device_flags pass libvirt's error up; Domain::attach_device
        // in virt 0.5 drops it and returns Ok.
        let result = if attach {
            dom.attach_device_flags(xml, flags)
        } else {
            dom.detach_device_flags(xml, flags)
        };
        result.map_err(|e| {
            if e.code().is(ErrorNumber::NoDomain) {
                LibvirtError::UnknownDomain {
                    name: name.to_owned(),
                }
            } else {
                LibvirtError::Refused {
                    action: format!("{verb} a device ({})", impact.describe()),
                    domain: name.to_owned(),
                    message: message(&e),
                }
            }
        })
    }
}

impl VirtHypervisor {
    /// The connection, for event registration (`events.rs`).
    pub(crate) fn connection(&self) -> &Connect {
        &self.conn
    }

    /// The hypervisor's domain capabilities XML (`virsh domcapabilities`).
    pub fn domain_capabilities(&self) -> Result<String, LibvirtError> {
        self.conn
            .domain_capabilities(None, None, None, None, 0)
            .map_err(|e| LibvirtError::Call {
                action: "read domain capabilities".into(),
                message: message(&e),
            })
    }
}

impl Hypervisor for VirtHypervisor {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn domains(&self) -> Result<Vec<DomainInfo>, LibvirtError> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| LibvirtError::Call {
                action: "list domains".into(),
                message: message(&e),
            })?;
        let mut out = Vec::with_capacity(doms.len());
        for d in &doms {
            // A domain undefined between the listing and this call is simply gone.
            let Ok(name) = d.name() else { continue };
            match Self::info(name, d) {
                Ok(info) => out.push(info),
                Err(e) => tracing::debug!(error = %e, "skipping a domain that vanished"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn domain(&self, name: &str) -> Result<DomainInfo, LibvirtError> {
        let dom = self.lookup(name)?;
        Self::info(name.to_owned(), &dom)
    }

    fn domain_xml(&self, name: &str, view: XmlView) -> Result<String, LibvirtError> {
        let dom = self.lookup(name)?;
        let flags = match view {
            XmlView::Live => 0,
            XmlView::Config => sys::VIR_DOMAIN_XML_INACTIVE,
        };
        dom.xml_desc(flags).map_err(|e| {
            if e.code().is(ErrorNumber::NoDomain) {
                LibvirtError::UnknownDomain {
                    name: name.to_owned(),
                }
            } else {
                LibvirtError::Call {
                    action: format!("read the XML of '{name}'"),
                    message: message(&e),
                }
            }
        })
    }

    fn attach_device(&self, name: &str, xml: &str, impact: Impact) -> Result<(), LibvirtError> {
        self.change("attach", name, xml, impact, true)
    }

    fn define(&self, name: &str, xml: &str) -> Result<(), LibvirtError> {
        self.conn
            .define_domain_xml_flags(xml, sys::VIR_DOMAIN_DEFINE_VALIDATE)
            .map(|_| ())
            .map_err(|e| LibvirtError::Refused {
                action: "define the fitted definition".into(),
                domain: name.to_owned(),
                message: message(&e),
            })
    }

    fn detach_device(&self, name: &str, xml: &str, impact: Impact) -> Result<(), LibvirtError> {
        self.change("detach", name, xml, impact, false)
    }

    fn node_driver(&self, addr: PciAddress) -> Result<Option<String>, LibvirtError> {
        let xml = self
            .node(addr)?
            .xml_desc(0)
            .map_err(|e| LibvirtError::Call {
                action: format!("read node device {addr}"),
                message: message(&e),
            })?;
        Ok(crate::xml::caps::nodedev_driver(&xml))
    }

    fn node_detach(&self, addr: PciAddress) -> Result<(), LibvirtError> {
        self.node(addr)?
            .detach_flags(Some("vfio"), 0)
            .map_err(|e| LibvirtError::Refused {
                action: format!("detach {addr} from its host driver"),
                domain: "-".into(),
                message: message(&e),
            })
    }

    fn node_reattach(&self, addr: PciAddress) -> Result<(), LibvirtError> {
        self.node(addr)?
            .reattach()
            .map_err(|e| LibvirtError::Refused {
                action: format!("give {addr} back to its host driver"),
                domain: "-".into(),
                message: message(&e),
            })
    }
}

impl VirtHypervisor {
    fn node(&self, addr: PciAddress) -> Result<virt::nodedev::NodeDevice, LibvirtError> {
        self.conn
            .lookup_node_device_by_name(&nodedev_name(addr))
            .map_err(|e| LibvirtError::Call {
                action: format!("look up node device {addr}"),
                message: message(&e),
            })
    }
}
