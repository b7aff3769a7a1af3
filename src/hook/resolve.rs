//! Decides which GPUs a domain's XML should carry for its request on this host (pure): keeps the
//! hostdevs that are valid here, drops gpupass-injected ones that are not (another host's
//! address after a migration, a GPU held by someone else, one that no longer fits the request),
//! and picks what is missing with the same rules as `attach --count` (SR-IOV VFs for
//! `profile='vf'`, as `attach --vgpu vf --count`).

use std::collections::BTreeSet;

use crate::alloc::plan::{assignable_vf, plan_attach, AttachRequest, Holdings};
use crate::alloc::AllocError;
use crate::host::discover::Inventory;
use crate::host::readiness::verdict;
use crate::model::{NumaNode, PciAddress, PciId};
use crate::xml::rewrite::DomainDoc;

/// What to change in the domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Indexes into `doc.hostdevs` of injected hostdevs to remove.
    pub remove: Vec<usize>,
    /// PCI functions to add, sorted.
    pub add: Vec<PciAddress>,
    /// Every PCI function of the request's GPUs the domain has afterwards (for the lease).
    pub functions_after: Vec<PciAddress>,
}

impl Resolution {
    /// True when the XML must change.
    pub fn changes(&self) -> bool {
        !self.remove.is_empty() || !self.add.is_empty()
    }
}

fn model_of(inv: &Inventory, gpu: PciAddress) -> Option<PciId> {
    inv.device(gpu).map(|d| d.id)
}

/// Resolves `request` for the domain in `doc`. `holdings` are other domains' (and other
/// leases'), never this domain's own; `prefer` are its NUMA nodes.
pub fn resolve(
    inv: &Inventory,
    holdings: &Holdings,
    doc: &DomainDoc<'_>,
    request: &AttachRequest,
    prefer: &BTreeSet<NumaNode>,
) -> Result<Resolution, AllocError> {
    let name = doc.name.as_str();
    let wanted_gpus: Option<Vec<PciAddress>> = match request {
        AttachRequest::Gpus(addrs) => Some(
            addrs
                .iter()
                .map(|a| {
                    inv.gpu(*a)
                        .map(|g| g.address)
                        .ok_or_else(|| AllocError::no_gpu(inv, *a))
                })
                .collect::<Result<_, _>>()?,
        ),
        AttachRequest::Count { .. } => None,
        AttachRequest::HgxFull => Some(inv.fabric_gpus()),
        AttachRequest::VfCount { count, model } => {
            return resolve_vfs(inv, holdings, doc, *count, *model, prefer)
        }
        // The metadata names VFs by count only (`profile='vf'`): addresses come from
        // `attach --vgpu vf --gpu VF`.
        AttachRequest::Vfs(_) => {
            return Err(AllocError::VfNotResolved {
                place: "the hook or transform",
            })
        }
    };
    // HGX full passthrough: the fabric's NVSwitches go with its GPUs.
    let switches: Vec<PciAddress> = match request {
        AttachRequest::HgxFull => inv.nvswitches(),
        _ => Vec::new(),
    };
    let fits = |gpu: PciAddress| match (request, &wanted_gpus) {
        (_, Some(w)) => w.contains(&gpu),
        (AttachRequest::Count { model, .. }, None) => {
            model.is_none_or(|m| model_of(inv, gpu) == Some(m))
        }
        _ => false,
    };

    let mut res = Resolution::default();
    let mut present: BTreeSet<PciAddress> = BTreeSet::new();
    for (i, h) in doc.hostdevs.iter().enumerate() {
        let Some(src) = h.source else { continue };
        if !h.injected() {
            present.insert(src);
            continue;
        }
        let keep = inv.gpu(src).is_some_and(|g| {
            fits(g.address)
                && verdict(inv, g).viable
                && holdings
                    .holders(&g.functions)
                    .iter()
                    .all(|holder| holder.domain == name)
        }) || (switches.contains(&src)
            && holdings
                .holders(&[src])
                .iter()
                .all(|holder| holder.domain == name));
        if keep {
            present.insert(src);
        } else {
            res.remove.push(i);
        }
    }

    // GPUs the domain keeps that count toward the request.
    let kept: Vec<PciAddress> = inv
        .gpus
        .iter()
        .filter(|g| g.functions.iter().any(|f| present.contains(f)) && fits(g.address))
        .map(|g| g.address)
        .collect();
    let mut gpus_after: Vec<PciAddress> = kept.clone();
    let new: Vec<PciAddress> = match request {
        AttachRequest::Gpus(_)
        | AttachRequest::HgxFull
        | AttachRequest::Vfs(_)
        | AttachRequest::VfCount { .. } => wanted_gpus
            .unwrap_or_default()
            .into_iter()
            .filter(|g| !kept.contains(g))
            .collect(),
        AttachRequest::Count { count, model } => {
            let missing = count.saturating_sub(kept.len());
            if missing == 0 {
                Vec::new()
            } else {
                // Kept GPUs are this domain's: not free to pick again.
                let mut with_self = holdings.clone();
                for g in &kept {
                    if let Some(gpu) = inv.gpu(*g) {
                        for f in &gpu.functions {
                            with_self.add(*f, name, false);
                        }
                    }
                }
                plan_attach(
                    inv,
                    &with_self,
                    name,
                    &AttachRequest::Count {
                        count: missing,
                        model: *model,
                    },
                    prefer,
                )?
                .gpus
            }
        }
    };
    if *request == AttachRequest::HgxFull {
        // The whole fabric, GPUs and switches, through `attach --hgx-full`'s checks.
        plan_attach(inv, holdings, name, request, prefer)?;
    }
    if !new.is_empty() {
        // Explicit GPUs go through the same checks as `attach --gpu` (passable, not held).
        plan_attach(
            inv,
            holdings,
            name,
            &AttachRequest::Gpus(new.clone()),
            prefer,
        )?;
        gpus_after.extend(&new);
    }
    let mut add = BTreeSet::new();
    let mut after = BTreeSet::new();
    for g in &gpus_after {
        if let Some(gpu) = inv.gpu(*g) {
            for f in &gpu.functions {
                after.insert(*f);
                if !present.contains(f) {
                    add.insert(*f);
                }
            }
        }
    }
    for s in &switches {
        after.insert(*s);
        if !present.contains(s) {
            add.insert(*s);
        }
    }
    res.add = add.into_iter().collect();
    res.functions_after = after.into_iter().collect();
    Ok(res)
}

/// [`resolve`] for `profile='vf'`: keeps the VFs the domain has (injected ones only while they
/// are still free for it and of the model), and picks the missing ones as
/// `attach --vgpu vf --count` does.
fn resolve_vfs(
    inv: &Inventory,
    holdings: &Holdings,
    doc: &DomainDoc<'_>,
    count: usize,
    model: Option<PciId>,
    prefer: &BTreeSet<NumaNode>,
) -> Result<Resolution, AllocError> {
    let name = doc.name.as_str();
    let fits = |vf: PciAddress| {
        inv.physfn(vf).is_some() && model.is_none_or(|m| model_of(inv, vf) == Some(m))
    };
    let mut res = Resolution::default();
    let mut present: BTreeSet<PciAddress> = BTreeSet::new();
    for (i, h) in doc.hostdevs.iter().enumerate() {
        let Some(src) = h.source else { continue };
        if !h.injected() || (fits(src) && assignable_vf(inv, holdings, src, name).is_ok()) {
            present.insert(src);
        } else {
            res.remove.push(i);
        }
    }
    let kept: Vec<PciAddress> = present.iter().copied().filter(|a| fits(*a)).collect();
    let mut after: BTreeSet<PciAddress> = kept.iter().copied().collect();
    let missing = count.saturating_sub(kept.len());
    if missing > 0 {
        // Kept VFs are this domain's: not free to pick again.
        let mut with_self = holdings.clone();
        for k in &kept {
            with_self.add(*k, name, false);
        }
        let request = AttachRequest::VfCount {
            count: missing,
            model,
        };
        for vf in plan_attach(inv, &with_self, name, &request, prefer)?.vfs {
            after.insert(vf);
            res.add.push(vf);
        }
    }
    res.add.sort();
    res.functions_after = after.into_iter().collect();
    Ok(res)
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

    /// Three single-function GPUs: two H100 (18, 9a) and one T4 (3b).
    fn inv() -> Inventory {
        let mut devices = BTreeMap::new();
        let mut groups: BTreeMap<IommuGroupId, Vec<PciAddress>> = BTreeMap::new();
        for (i, (addr, id)) in [
            ("0000:18:00.0", "10de:2330"),
            ("0000:3b:00.0", "10de:1eb8"),
            ("0000:9a:00.0", "10de:2330"),
        ]
        .iter()
        .enumerate()
        {
            let f = a(addr);
            devices.insert(
                f,
                PciDevice {
                    address: f,
                    id: id.parse().unwrap(),
                    subsystem: None,
                    class: PciClass(0x030200),
                    driver: Some("vfio-pci".into()),
                    iommu_group: Some(IommuGroupId(i as u32)),
                    numa_node: None,
                    boot_vga: false,
                    reset_method: None,
                    parent: None,
                    virtfn: false,
                },
            );
            groups.insert(IommuGroupId(i as u32), vec![f]);
        }
        Inventory::build(
            devices,
            groups,
            IommuState {
                groups: 3,
                ..Default::default()
            },
            Vec::new(),
        )
    }

    fn dom(hostdevs: &[(&str, bool)]) -> String {
        let devs: String = hostdevs
            .iter()
            .map(|(addr, injected)| {
                let x = a(addr);
                let alias = if *injected {
                    format!("<alias name='ua-gpupass-{:04x}-{:02x}-{:02x}-{:x}'/>", x.domain, x.bus, x.slot, x.function)
                } else {
                    String::new()
                };
                format!("<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0x{:02x}' slot='0' function='0'/></source>{alias}</hostdev>", x.bus)
            })
            .collect();
        format!("<domain><name>vm</name><devices>{devs}</devices></domain>")
    }

    fn count(n: usize, model: Option<&str>) -> AttachRequest {
        AttachRequest::Count {
            count: n,
            model: model.map(|m| m.parse().unwrap()),
        }
    }

    #[test]
    fn a_met_request_changes_nothing() {
        let x = dom(&[("0000:18:00.0", true)]);
        let r = resolve(
            &inv(),
            &Holdings::default(),
            &scan(&x).unwrap(),
            &count(1, Some("10de:2330")),
            &BTreeSet::new(),
        )
        .unwrap();
        assert!(!r.changes());
        assert_eq!(r.functions_after, [a("0000:18:00.0")]);
    }

    #[test]
    fn injected_gpus_of_the_wrong_model_or_held_elsewhere_are_replaced() {
        let x = dom(&[("0000:3b:00.0", true), ("0000:18:00.0", true)]);
        let mut h = Holdings::default();
        h.add(a("0000:18:00.0"), "other", true);
        let doc = scan(&x).unwrap();
        let r = resolve(
            &inv(),
            &h,
            &doc,
            &count(1, Some("10de:2330")),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(r.remove, [0, 1]);
        assert_eq!(r.add, [a("0000:9a:00.0")]);
    }

    #[test]
    fn a_users_own_hostdev_is_never_removed_and_counts() {
        let x = dom(&[("0000:18:00.0", false)]);
        let mut h = Holdings::default();
        h.add(a("0000:18:00.0"), "other", true);
        let r = resolve(
            &inv(),
            &h,
            &scan(&x).unwrap(),
            &count(2, None),
            &BTreeSet::new(),
        )
        .unwrap();
        assert!(
            r.remove.is_empty(),
            "prepare judges it, transform leaves it"
        );
        assert_eq!(r.add, [a("0000:3b:00.0")]);
    }

    #[test]
    fn explicit_gpus_are_checked_like_attach() {
        let x = dom(&[]);
        let doc = scan(&x).unwrap();
        let mut h = Holdings::default();
        h.add(a("0000:9a:00.0"), "other", false);
        let err = resolve(
            &inv(),
            &h,
            &doc,
            &AttachRequest::Gpus(vec![a("0000:9a:00.0")]),
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "GPU 0000:9a:00.0 is in use by domain 'other'"
        );
        let err = resolve(
            &inv(),
            &h,
            &doc,
            &AttachRequest::Gpus(vec![a("0000:77:00.0")]),
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert!(matches!(err, AllocError::UnknownGpu { .. }));
    }
}
