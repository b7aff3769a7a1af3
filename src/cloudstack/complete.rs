//! Completes the GPUs CloudStack allocated itself (pure): CloudStack writes one `<hostdev>` for
//! the GPU's own function; the card's other functions (HDMI audio, USB, UCSI) must go to the
//! same guest, or VFIO refuses the IOMMU group. gpupass adds them and never allocates another
//! GPU. The guest fit (aperture, phys-bits, slot layout) plugs in at [`guest_fit`].

use std::collections::BTreeSet;

use crate::alloc::plan::Holdings;
use crate::cloudstack::CloudstackError;
use crate::host::discover::Inventory;
use crate::model::PciAddress;
use crate::xml::rewrite::DomainDoc;

/// What completing a domain's GPUs means.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completion {
    /// The GPUs the domain got from someone else than gpupass (CloudStack), sorted.
    pub gpus: Vec<PciAddress>,
    /// Their functions the domain lacks, sorted: the hostdevs to add.
    pub add: Vec<PciAddress>,
    /// Every function of those GPUs, sorted (for the lease).
    pub functions_after: Vec<PciAddress>,
}

/// True when the domain has a PCI hostdev gpupass did not inject (worth reading the host for).
pub fn has_foreign_hostdev(doc: &DomainDoc<'_>) -> bool {
    doc.hostdevs
        .iter()
        .any(|h| h.source.is_some() && !h.injected())
}

/// The completion of every GPU one of whose functions the domain holds through a hostdev gpupass
/// did not inject. `holdings` are other domains' (never this one's). A missing function held by
/// another domain is an error: that GPU cannot be whole here.
pub fn plan(
    inv: &Inventory,
    holdings: &Holdings,
    doc: &DomainDoc<'_>,
) -> Result<Completion, CloudstackError> {
    let present: BTreeSet<PciAddress> = doc.pci_sources().into_iter().collect();
    let gpus: BTreeSet<PciAddress> = doc
        .hostdevs
        .iter()
        .filter(|h| !h.injected())
        .filter_map(|h| h.source)
        .filter_map(|s| inv.gpu(s).map(|g| g.address))
        .collect();
    let mut add = BTreeSet::new();
    let mut after = BTreeSet::new();
    for g in &gpus {
        let Some(gpu) = inv.gpu(*g) else { continue };
        for f in &gpu.functions {
            after.insert(*f);
            if present.contains(f) {
                continue;
            }
            if let Some(h) = holdings
                .holders(&[*f])
                .into_iter()
                .find(|h| h.domain != doc.name)
            {
                return Err(CloudstackError::CompanionHeld {
                    gpu: *g,
                    function: *f,
                    domain: doc.name.clone(),
                    holder: h.domain.trim_start_matches("lease:").to_owned(),
                });
            }
            add.insert(*f);
        }
    }
    Ok(Completion {
        gpus: gpus.into_iter().collect(),
        add: add.into_iter().collect(),
        functions_after: after.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::host::discover::{IommuState, PciDevice};
    use crate::model::{IommuGroupId, PciClass};
    use crate::xml::rewrite::scan;

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    /// An RTX 2080 Ti-like card at 01:00 with audio, USB and UCSI.
    fn inv() -> Inventory {
        let mut devices = BTreeMap::new();
        for (addr, class) in [
            ("0000:01:00.0", 0x030000),
            ("0000:01:00.1", 0x040300),
            ("0000:01:00.2", 0x0c0330),
            ("0000:01:00.3", 0x0c8000),
            ("0000:02:00.0", 0x020000),
        ] {
            devices.insert(
                a(addr),
                PciDevice {
                    address: a(addr),
                    id: "10de:1e07".parse().unwrap(),
                    subsystem: None,
                    class: PciClass(class),
                    driver: Some("vfio-pci".into()),
                    iommu_group: Some(IommuGroupId(1)),
                    numa_node: None,
                    boot_vga: false,
                    reset_method: None,
                    parent: None,
                    virtfn: false,
                },
            );
        }
        Inventory::build(devices, BTreeMap::new(), IommuState::default(), Vec::new())
    }

    fn domain(hostdevs: &str) -> String {
        format!("<domain type='kvm'><name>i-2-33-VM</name><devices>{hostdevs}</devices></domain>")
    }

    fn cloudstack_hostdev(addr: &str) -> String {
        let p = a(addr);
        format!(
            "<hostdev mode='subsystem' type='pci' managed='yes' display='off'><driver name='vfio'/><source><address domain='0x0000' bus='0x{:02x}' slot='0x{:02x}' function='0x{:x}'/></source></hostdev>",
            p.bus, p.slot, p.function
        )
    }

    #[test]
    fn adds_the_companions_of_cloudstack_s_gpu() {
        let xml = domain(&cloudstack_hostdev("0000:01:00.0"));
        let doc = scan(&xml).unwrap();
        assert!(has_foreign_hostdev(&doc));
        let c = plan(&inv(), &Holdings::default(), &doc).unwrap();
        assert_eq!(c.gpus, [a("0000:01:00.0")]);
        assert_eq!(
            c.add,
            [a("0000:01:00.1"), a("0000:01:00.2"), a("0000:01:00.3")]
        );
        assert_eq!(c.functions_after.len(), 4);
    }

    #[test]
    fn a_domain_without_a_gpu_needs_nothing() {
        let xml = domain("");
        let doc = scan(&xml).unwrap();
        assert!(!has_foreign_hostdev(&doc));
        assert_eq!(
            plan(&inv(), &Holdings::default(), &doc).unwrap(),
            Completion::default()
        );
        // A NIC is not a GPU: nothing to complete.
        let xml = domain(&cloudstack_hostdev("0000:02:00.0"));
        let doc = scan(&xml).unwrap();
        assert_eq!(
            plan(&inv(), &Holdings::default(), &doc).unwrap(),
            Completion::default()
        );
    }

    #[test]
    fn a_companion_held_elsewhere_is_refused() {
        let xml = domain(&cloudstack_hostdev("0000:01:00.0"));
        let doc = scan(&xml).unwrap();
        let mut h = Holdings::default();
        h.add(a("0000:01:00.1"), "vm-b", true);
        let e = plan(&inv(), &h, &doc).unwrap_err();
        assert!(
            e.to_string()
                .contains("function 0000:01:00.1 is held by domain 'vm-b'"),
            "{e}"
        );
    }
}
