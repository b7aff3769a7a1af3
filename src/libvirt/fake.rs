//! An in-memory hypervisor for unit tests of decisions: domains with hostdev sets, a record of
//! calls, and injected failures. Never used by the binary.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use crate::libvirt::{DomainInfo, Hypervisor, Impact, LibvirtError, XmlView};
use crate::model::PciAddress;
use crate::xml::domain::hostdev_source;

/// One fake domain.
#[derive(Debug, Clone, Default)]
pub struct FakeDomain {
    /// Running.
    pub active: bool,
    /// Defined.
    pub persistent: bool,
    /// Hostdevs of the running definition.
    pub live: BTreeSet<PciAddress>,
    /// Hostdevs of the persistent definition.
    pub config: BTreeSet<PciAddress>,
    /// Extra XML inside `<domain>` (numatune, vcpu…).
    pub extra: String,
}

/// The fake hypervisor.
#[derive(Debug, Default)]
pub struct FakeHypervisor {
    /// Domains by name.
    pub domains: RefCell<BTreeMap<String, FakeDomain>>,
    /// Calls made, as `attach vm 0000:01:00.0 live+config`.
    pub calls: RefCell<Vec<String>>,
    /// Attaching this address fails as libvirt would.
    pub fail_attach: RefCell<Option<PciAddress>>,
    /// Attaching reports success but changes nothing (libvirt-rust's `attach_device` bug).
    pub silent_attach: RefCell<bool>,
    /// Live detach reports success but the guest keeps the device (no OS to answer unplug).
    pub sticky_live: RefCell<bool>,
    /// Reading this domain's XML fails as a libvirt call error would.
    pub fail_xml: RefCell<Option<String>>,
    /// Host drivers of node devices (absent = unbound).
    pub drivers: RefCell<BTreeMap<PciAddress, String>>,
    /// A live attach of a function fails unless every function in this set is on vfio-pci
    /// (an IOMMU group that must be whole, as the kernel demands).
    pub group: RefCell<Vec<PciAddress>>,
}

impl FakeHypervisor {
    /// Adds a domain.
    pub fn with(self, name: &str, dom: FakeDomain) -> Self {
        self.domains.borrow_mut().insert(name.to_owned(), dom);
        self
    }

    fn get(&self, name: &str) -> Result<FakeDomain, LibvirtError> {
        self.domains
            .borrow()
            .get(name)
            .cloned()
            .ok_or_else(|| LibvirtError::UnknownDomain {
                name: name.to_owned(),
            })
    }

    fn source(xml: &str) -> PciAddress {
        hostdev_source(xml)
            .expect("fake gets composed XML")
            .expect("with a source address")
    }
}

impl Hypervisor for FakeHypervisor {
    fn node_driver(&self, addr: PciAddress) -> Result<Option<String>, LibvirtError> {
        Ok(self.drivers.borrow().get(&addr).cloned())
    }

    fn node_detach(&self, addr: PciAddress) -> Result<(), LibvirtError> {
        self.calls
            .borrow_mut()
            .push(format!("nodedev-detach {addr}"));
        self.drivers.borrow_mut().insert(addr, "vfio-pci".into());
        Ok(())
    }

    fn node_reattach(&self, addr: PciAddress) -> Result<(), LibvirtError> {
        self.calls
            .borrow_mut()
            .push(format!("nodedev-reattach {addr}"));
        self.drivers.borrow_mut().insert(addr, "host".into());
        Ok(())
    }

    fn uri(&self) -> &str {
        "fake:///"
    }

    fn domains(&self) -> Result<Vec<DomainInfo>, LibvirtError> {
        Ok(self
            .domains
            .borrow()
            .iter()
            .map(|(n, d)| DomainInfo {
                name: n.clone(),
                active: d.active,
                persistent: d.persistent,
            })
            .collect())
    }

    fn domain(&self, name: &str) -> Result<DomainInfo, LibvirtError> {
        let d = self.get(name)?;
        Ok(DomainInfo {
            name: name.to_owned(),
            active: d.active,
            persistent: d.persistent,
        })
    }

    fn domain_xml(&self, name: &str, view: XmlView) -> Result<String, LibvirtError> {
        let d = self.get(name)?;
        if self.fail_xml.borrow().as_deref() == Some(name) {
            return Err(LibvirtError::Call {
                action: format!("read the XML of '{name}'"),
                message: "internal error: injected".into(),
            });
        }
        let set = match view {
            XmlView::Live if d.active => &d.live,
            _ => &d.config,
        };
        let hostdevs: String = set
            .iter()
            .map(|a| {
                format!(
                    "<hostdev mode='subsystem' type='pci'><source><address domain='0x{:04x}' bus='0x{:02x}' slot='0x{:02x}' function='0x{:x}'/></source></hostdev>",
                    a.domain, a.bus, a.slot, a.function
                )
            })
            .collect();
        Ok(format!(
            "<domain type='kvm'><name>{name}</name>{}<devices>{hostdevs}</devices></domain>",
            d.extra
        ))
    }

    fn define(&self, name: &str, _xml: &str) -> Result<(), LibvirtError> {
        self.get(name)?;
        self.calls.borrow_mut().push(format!("define {name}"));
        Ok(())
    }

    fn attach_device(&self, name: &str, xml: &str, impact: Impact) -> Result<(), LibvirtError> {
        let addr = Self::source(xml);
        self.calls
            .borrow_mut()
            .push(format!("attach {name} {addr} {}", impact.describe()));
        if *self.fail_attach.borrow() == Some(addr) {
            return Err(LibvirtError::Refused {
                action: "attach a device".into(),
                domain: name.into(),
                message: "unsupported configuration: host doesn't support VFIO PCI passthrough"
                    .into(),
            });
        }
        if *self.silent_attach.borrow() {
            return Ok(());
        }
        let mut doms = self.domains.borrow_mut();
        let d = doms
            .get_mut(name)
            .ok_or_else(|| LibvirtError::UnknownDomain {
                name: name.to_owned(),
            })?;
        if impact.live && !d.active {
            return Err(LibvirtError::Refused {
                action: "attach a device".into(),
                domain: name.into(),
                message: "Requested operation is not valid: domain is not running".into(),
            });
        }
        if impact.live {
            let drivers = self.drivers.borrow();
            let group = self.group.borrow();
            if group.contains(&addr)
                && group
                    .iter()
                    .any(|g| drivers.get(g).map(String::as_str) != Some("vfio-pci") && *g != addr)
            {
                return Err(LibvirtError::Refused {
                    action: "attach a device".into(),
                    domain: name.into(),
                    message: format!("internal error: unable to execute QEMU command 'device_add': vfio {addr}: group is not viable"),
                });
            }
        }
        if (impact.live && d.live.contains(&addr)) || (impact.config && d.config.contains(&addr)) {
            return Err(LibvirtError::Refused {
                action: "attach a device".into(),
                domain: name.into(),
                message: "Requested operation is not valid: device is already in the domain configuration".into(),
            });
        }
        if impact.live {
            d.live.insert(addr);
        }
        if impact.config {
            d.config.insert(addr);
        }
        Ok(())
    }

    fn detach_device(&self, name: &str, xml: &str, impact: Impact) -> Result<(), LibvirtError> {
        let addr = Self::source(xml);
        self.calls
            .borrow_mut()
            .push(format!("detach {name} {addr} {}", impact.describe()));
        let mut doms = self.domains.borrow_mut();
        let d = doms
            .get_mut(name)
            .ok_or_else(|| LibvirtError::UnknownDomain {
                name: name.to_owned(),
            })?;
        if (impact.live && !d.live.contains(&addr)) || (impact.config && !d.config.contains(&addr))
        {
            return Err(LibvirtError::Refused {
                action: "detach a device".into(),
                domain: name.into(),
                message: "device not found: device not present in domain configuration".into(),
            });
        }
        if impact.live && !*self.sticky_live.borrow() {
            d.live.remove(&addr);
        }
        if impact.config {
            d.config.remove(&addr);
        }
        Ok(())
    }
}
