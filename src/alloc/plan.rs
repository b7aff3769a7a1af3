//! Decides which GPUs an attach takes and which a detach gives back, and which GPUs a domain
//! holds only part of (pure: no IO). Holdings come from libvirt's own XML, passed in; the caller
//! holds the host lock.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::alloc::AllocError;
use crate::host::discover::{Gpu, Inventory};
use crate::host::readiness::{verdict, Verdict};
use crate::host::vgpu::is_vfio_driver;
use crate::model::{MdevUuid, NumaNode, PciAddress, PciId};

/// A domain that references a PCI function.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Holder {
    /// The domain's name.
    pub domain: String,
    /// True when a running domain's live XML holds it (not only a defined configuration).
    pub running: bool,
}

/// Who references which PCI function (and which mediated device), from every running domain's
/// live XML and every defined domain's persistent XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holdings {
    by_address: BTreeMap<PciAddress, BTreeSet<Holder>>,
    by_mdev: BTreeMap<MdevUuid, BTreeSet<Holder>>,
    owners: BTreeMap<String, String>,
}

impl Holdings {
    /// Records that `domain` references `addr`.
    pub fn add(&mut self, addr: PciAddress, domain: &str, running: bool) {
        self.by_address.entry(addr).or_default().insert(Holder {
            domain: domain.to_owned(),
            running,
        });
    }

    /// Records that `domain` references the mediated device `uuid`.
    pub fn add_mdev(&mut self, uuid: MdevUuid, domain: &str, running: bool) {
        self.by_mdev.entry(uuid).or_default().insert(Holder {
            domain: domain.to_owned(),
            running,
        });
    }

    /// Domains referencing the mediated device `uuid`, running ones first (as [`Self::holders`]).
    pub fn mdev_holders(&self, uuid: &MdevUuid) -> Vec<Holder> {
        // A domain both running and defined with it counts once, as running.
        let mut seen: BTreeMap<&str, bool> = BTreeMap::new();
        for h in self.by_mdev.get(uuid).into_iter().flatten() {
            *seen.entry(&h.domain).or_default() |= h.running;
        }
        let mut out: Vec<Holder> = seen
            .into_iter()
            .map(|(domain, running)| Holder {
                domain: domain.to_owned(),
                running,
            })
            .collect();
        out.sort_by(|a, b| b.running.cmp(&a.running).then(a.domain.cmp(&b.domain)));
        out
    }

    /// Records a domain: its owner, the functions its running definition references, and those
    /// of its persistent definition.
    pub fn add_domain(
        &mut self,
        domain: &str,
        owner: Option<&str>,
        live: &[PciAddress],
        config: &[PciAddress],
    ) {
        self.set_owner(domain, owner);
        for a in live {
            self.add(*a, domain, true);
        }
        for a in config {
            self.add(*a, domain, false);
        }
    }

    /// Records a domain's owner.
    pub fn set_owner(&mut self, domain: &str, owner: Option<&str>) {
        if let Some(o) = owner {
            self.owners.insert(domain.to_owned(), o.to_owned());
        }
    }

    /// A domain's recorded owner.
    pub fn owner(&self, domain: &str) -> Option<&str> {
        self.owners.get(domain).map(String::as_str)
    }

    /// Which of `functions` the domain references in its running (`running`) or persistent
    /// definition.
    pub fn functions_of(
        &self,
        domain: &str,
        functions: &[PciAddress],
        running: bool,
    ) -> Vec<PciAddress> {
        functions
            .iter()
            .filter(|f| {
                self.by_address.get(f).is_some_and(|hs| {
                    hs.iter()
                        .any(|h| h.domain == domain && h.running == running)
                })
            })
            .copied()
            .collect()
    }

    /// The domains that hold part of a GPU (`functions`, all of its functions): a definition
    /// that references some of them but not all. VFIO gives a whole GPU or none; a crash
    /// between two functions' attach or detach leaves this.
    pub fn partial(&self, functions: &[PciAddress]) -> Vec<PartialHold> {
        let mut out = Vec::new();
        for h in self.holders(functions) {
            let live = self.functions_of(&h.domain, functions, true);
            let config = self.functions_of(&h.domain, functions, false);
            let part = |held: &[PciAddress]| !held.is_empty() && held.len() < functions.len();
            let (live_part, config_part) = (part(&live), part(&config));
            if !live_part && !config_part {
                continue;
            }
            let mut held: BTreeSet<PciAddress> = BTreeSet::new();
            let mut missing: BTreeSet<PciAddress> = BTreeSet::new();
            for (is_part, have) in [(live_part, &live), (config_part, &config)] {
                if is_part {
                    held.extend(have.iter().copied());
                    missing.extend(functions.iter().filter(|f| !have.contains(f)).copied());
                }
            }
            out.push(PartialHold {
                domain: h.domain,
                live: live_part,
                config: config_part,
                held: held.into_iter().collect(),
                missing: missing.into_iter().collect(),
            });
        }
        out
    }

    /// Domains referencing any of `functions`, running ones first, each once (the first is the
    /// GPU's `used_by`).
    pub fn holders(&self, functions: &[PciAddress]) -> Vec<Holder> {
        let mut seen: BTreeMap<String, bool> = BTreeMap::new();
        for f in functions {
            for h in self.by_address.get(f).into_iter().flatten() {
                *seen.entry(h.domain.clone()).or_default() |= h.running;
            }
        }
        let mut out: Vec<Holder> = seen
            .into_iter()
            .map(|(domain, running)| Holder { domain, running })
            .collect();
        out.sort_by(|a, b| b.running.cmp(&a.running).then(a.domain.cmp(&b.domain)));
        out
    }
}

/// A GPU that a domain holds only part of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartialHold {
    /// The domain.
    pub domain: String,
    /// Its running definition holds part of the GPU.
    pub live: bool,
    /// Its persistent definition holds part of the GPU.
    pub config: bool,
    /// The functions it has (in the partial definitions).
    pub held: Vec<PciAddress>,
    /// The functions it lacks there.
    pub missing: Vec<PciAddress>,
}

impl PartialHold {
    /// `live`, `config` or `live+config`: the definitions that hold part of the GPU.
    pub fn definitions(&self) -> &'static str {
        match (self.live, self.config) {
            (true, true) => "live+config",
            (true, false) => "live",
            _ => "config",
        }
    }

    /// Who holds what of `gpu` and what is missing, for people.
    pub fn summary(&self, gpu: PciAddress) -> String {
        let list = |v: &[PciAddress]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "domain '{}' holds only part of GPU {gpu} ({} definition: has {}, lacks {})",
            self.domain,
            self.definitions(),
            list(&self.held),
            list(&self.missing)
        )
    }

    /// The two ways out, as commands.
    pub fn fix(&self, gpu: PciAddress) -> String {
        format!(
            "complete it with `gpupass attach {d} --gpu {gpu}` or remove it with `gpupass detach {d} --gpu {gpu}`",
            d = self.domain
        )
    }
}

/// What an attach asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachRequest {
    /// These GPUs (any function address names its GPU).
    Gpus(Vec<PciAddress>),
    /// Any `count` free GPUs, optionally of one model.
    Count {
        /// How many.
        count: usize,
        /// Only this vendor:device.
        model: Option<PciId>,
    },
    /// HGX full passthrough: every GPU of the host's NVSwitch fabric and every NVSwitch, as
    /// one unit (Fabric Manager runs in the guest).
    HgxFull,
    /// These SR-IOV virtual functions (`--vgpu vf --gpu VF`), each a single function.
    Vfs(Vec<PciAddress>),
    /// Any `count` free SR-IOV virtual functions (`--vgpu vf --count N`), optionally of one
    /// model (the VF's own vendor:device).
    VfCount {
        /// How many.
        count: usize,
        /// Only this vendor:device.
        model: Option<PciId>,
    },
}

impl AttachRequest {
    /// True when it asks for SR-IOV virtual functions, not whole GPUs.
    pub fn is_vf(&self) -> bool {
        matches!(self, AttachRequest::Vfs(_) | AttachRequest::VfCount { .. })
    }
}

/// What an attach will take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachPlan {
    /// The GPUs (display-function addresses), in the order they will be attached.
    pub gpus: Vec<PciAddress>,
    /// NVSwitches (single functions) attached after the GPUs (`HgxFull` only).
    pub switches: Vec<PciAddress>,
    /// SR-IOV virtual functions (single functions; `Vfs` and `VfCount` only).
    pub vfs: Vec<PciAddress>,
    /// Things the operator should know (boot VGA chosen explicitly…).
    pub warnings: Vec<String>,
}

/// The verdict of a GPU `domain` may have: passable, and held by no other domain (nor a GPU
/// of its IOMMU group).
fn assignable(
    inv: &Inventory,
    holdings: &Holdings,
    gpu: &Gpu,
    domain: &str,
) -> Result<Verdict, AllocError> {
    let v = verdict(inv, gpu);
    if !v.viable {
        return Err(AllocError::NotPassable {
            gpu: gpu.address,
            reason: v
                .blockers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    match held_elsewhere(inv, holdings, gpu, &v, domain) {
        Some(e) => Err(e),
        None => Ok(v),
    }
}

/// Another domain holding the GPU, or a GPU sharing its IOMMU group (VFIO gives a whole
/// group to one VM).
fn held_elsewhere(
    inv: &Inventory,
    holdings: &Holdings,
    gpu: &Gpu,
    v: &Verdict,
    domain: &str,
) -> Option<AllocError> {
    // Whole GPU and fractions exclude each other: a GPU with a VF in any domain (this one
    // too) is not passed whole.
    for vf in inv.vfs_of(gpu) {
        if let Some(h) = holdings.holders(&[vf]).into_iter().next() {
            return Some(AllocError::InUse {
                gpu: gpu.address,
                domain: h.domain,
                via: format!(
                    " through its SR-IOV virtual function {vf} (a GPU with a VF in use is not passed whole)"
                ),
            });
        }
    }
    if let Some(h) = holdings
        .holders(&gpu.functions)
        .into_iter()
        .find(|h| h.domain != domain)
    {
        return Some(AllocError::InUse {
            gpu: gpu.address,
            domain: h.domain,
            via: String::new(),
        });
    }
    for peer in &v.group_peers {
        let Some(p) = inv.gpu(*peer) else { continue };
        if let Some(h) = holdings
            .holders(&p.functions)
            .into_iter()
            .find(|h| h.domain != domain)
        {
            return Some(AllocError::InUse {
                gpu: gpu.address,
                domain: h.domain,
                via: format!(
                    " through GPU {peer} in the same IOMMU group (a group goes to one domain)"
                ),
            });
        }
    }
    None
}

/// Picks the GPUs for an attach to `domain`, preferring GPUs on `prefer` NUMA nodes.
pub fn plan_attach(
    inv: &Inventory,
    holdings: &Holdings,
    domain: &str,
    request: &AttachRequest,
    prefer: &BTreeSet<NumaNode>,
) -> Result<AttachPlan, AllocError> {
    if !inv.iommu.enabled() {
        return Err(AllocError::IommuOff);
    }
    let mut warnings = Vec::new();
    match request {
        AttachRequest::Gpus(addrs) => {
            let mut gpus: Vec<PciAddress> = Vec::new();
            for a in addrs {
                let gpu = inv.gpu(*a).ok_or_else(|| AllocError::no_gpu(inv, *a))?;
                if gpus.contains(&gpu.address) {
                    continue;
                }
                let v = assignable(inv, holdings, gpu, domain)?;
                if v.boot_vga {
                    warnings.push(format!(
                        "{} is the host's boot VGA (its console); the host loses that display",
                        gpu.address
                    ));
                }
                gpus.push(gpu.address);
            }
            Ok(AttachPlan {
                gpus,
                switches: Vec::new(),
                vfs: Vec::new(),
                warnings,
            })
        }
        AttachRequest::HgxFull => plan_hgx_full(inv, holdings, domain),
        AttachRequest::Vfs(addrs) => {
            let mut vfs: Vec<PciAddress> = Vec::new();
            for a in addrs {
                if inv.device(*a).is_none() {
                    return Err(AllocError::UnknownGpu { address: *a });
                }
                assignable_vf(inv, holdings, *a, domain)?;
                if !vfs.contains(a) {
                    vfs.push(*a);
                }
            }
            Ok(AttachPlan {
                gpus: Vec::new(),
                switches: Vec::new(),
                vfs,
                warnings,
            })
        }
        AttachRequest::VfCount { count, model } => {
            plan_vf_count(inv, holdings, domain, *count, *model, prefer)
        }
        AttachRequest::Count { count, model } => {
            // A GPU the domain holds only part of (a crash mid-attach or mid-detach) counts as
            // one of the N and is completed first: retrying the attach finishes the job.
            let mut completing: Vec<PciAddress> = Vec::new();
            for gpu in &inv.gpus {
                if completing.len() >= *count {
                    break;
                }
                let Some(dev) = inv.device(gpu.address) else {
                    continue;
                };
                if model.is_some_and(|m| m != dev.id) {
                    continue;
                }
                let Some(p) = holdings
                    .partial(&gpu.functions)
                    .into_iter()
                    .find(|p| p.domain == domain)
                else {
                    continue;
                };
                assignable(inv, holdings, gpu, domain)?;
                warnings.push(format!(
                    "{}: completing it (counted as one of the {count})",
                    p.summary(gpu.address)
                ));
                completing.push(gpu.address);
            }
            let mut free: Vec<(bool, PciAddress)> = Vec::new();
            let (mut held, mut blocked, mut boot, mut other_model) = (0, 0, 0, 0);
            let mut quarantined = 0;
            for gpu in &inv.gpus {
                let Some(dev) = inv.device(gpu.address) else {
                    continue;
                };
                if model.is_some_and(|m| m != dev.id) {
                    other_model += 1;
                    continue;
                }
                if completing.contains(&gpu.address) {
                    continue;
                }
                let v = verdict(inv, gpu);
                if v.boot_vga {
                    boot += 1;
                } else if inv.quarantine_of(gpu).is_some() {
                    quarantined += 1;
                } else if !v.viable {
                    blocked += 1;
                } else if !holdings.holders(&gpu.functions).is_empty()
                    || held_elsewhere(inv, holdings, gpu, &v, domain).is_some()
                {
                    held += 1;
                } else {
                    let on_preferred = dev.numa_node.is_some_and(|n| prefer.contains(&n));
                    free.push((!on_preferred, gpu.address));
                }
            }
            let want = count.saturating_sub(completing.len());
            if free.len() < want {
                let mut parts = vec![format!("{held} in use"), format!("{blocked} not passable")];
                if boot > 0 {
                    parts.push(format!("{boot} boot VGA"));
                }
                if quarantined > 0 {
                    parts.push(format!(
                        "{quarantined} quarantined (see `gpupass quarantine list`)"
                    ));
                }
                if model.is_some() {
                    parts.push(format!("{other_model} of other models"));
                }
                if !completing.is_empty() {
                    parts.push(format!(
                        "{} partly in domain '{domain}', counted",
                        completing.len()
                    ));
                }
                return Err(AllocError::no_free(
                    *count,
                    free.len().saturating_add(completing.len()),
                    *model,
                    parts.join(", "),
                ));
            }
            // Preferred NUMA node first, then the lowest address.
            free.sort();
            let mut gpus = completing;
            gpus.extend(free.into_iter().take(want).map(|(_, a)| a));
            Ok(AttachPlan {
                gpus,
                switches: Vec::new(),
                vfs: Vec::new(),
                warnings,
            })
        }
    }
}

/// Whether the SR-IOV virtual function `vf` may go to `domain`: passable as a one-function
/// unit, on VFIO, its PF not passed whole, held by no other domain. `Err` says why not.
pub fn assignable_vf(
    inv: &Inventory,
    holdings: &Holdings,
    vf: PciAddress,
    domain: &str,
) -> Result<(), AllocError> {
    let pf = inv
        .physfn(vf)
        .ok_or(AllocError::NotVirtualFunction { address: vf })?;
    // A VF is judged like a GPU of one function: its own IOMMU group, nothing in the group on
    // a host driver, not quarantined.
    let unit = Gpu {
        address: vf,
        functions: vec![vf],
    };
    let v = verdict(inv, &unit);
    let mut reasons: Vec<String> = v.blockers.iter().map(ToString::to_string).collect();
    // libvirt could rebind a managed VF itself, but a VF on its host driver may be in use by
    // the host (a GPU VF driven by i915/xe); gpupass gives only VFs the operator put on VFIO.
    match inv.device(vf).and_then(|d| d.driver.as_deref()) {
        Some(d) if is_vfio_driver(d) => {}
        other => reasons.push(format!(
            "{} ({}: `gpupass bind {vf}` moves it, `gpupass sriov {pf} --vfs N` creates VFs on vfio-pci)",
            match other {
                Some(d) => format!("on the host driver {d}"),
                None => "bound to no driver".to_owned(),
            },
            "a VF is given only from vfio-pci or a vfio-pci variant driver"
        )),
    }
    if !reasons.is_empty() {
        return Err(AllocError::NotPassable {
            gpu: vf,
            reason: reasons.join("; "),
        });
    }
    // Its PF passed whole, to any domain: the VF goes with no one else.
    if let Some(pf_gpu) = inv.gpu(pf) {
        if let Some(h) = holdings.holders(&pf_gpu.functions).into_iter().next() {
            return Err(AllocError::VfInUse {
                vf,
                domain: h.domain,
                via: format!(
                    " through its PF {}, passed whole (a GPU passed whole has no VFs to give)",
                    pf_gpu.address
                ),
            });
        }
    }
    // Never one VF to two domains; nor a VF whose IOMMU group another domain holds part of.
    for g in &v.iommu_groups {
        for member in inv.groups.get(g).map(Vec::as_slice).unwrap_or_default() {
            if let Some(h) = holdings
                .holders(&[*member])
                .into_iter()
                .find(|h| h.domain != domain)
            {
                return Err(AllocError::VfInUse {
                    vf,
                    domain: h.domain,
                    via: if *member == vf {
                        String::new()
                    } else {
                        format!(" through {member} in the same IOMMU group (a group goes to one domain)")
                    },
                });
            }
        }
    }
    Ok(())
}

/// Picks `count` free VFs for `domain`: passable, on VFIO, their PF not passed whole, held by
/// no domain (one `domain` already has is not counted again); preferred NUMA node first, then
/// the lowest address.
fn plan_vf_count(
    inv: &Inventory,
    holdings: &Holdings,
    domain: &str,
    count: usize,
    model: Option<PciId>,
    prefer: &BTreeSet<NumaNode>,
) -> Result<AttachPlan, AllocError> {
    let mut free: Vec<(bool, PciAddress)> = Vec::new();
    let (mut held, mut blocked, mut host_driver, mut other_model) = (0, 0, 0, 0);
    let mut pfs_on_host: BTreeSet<PciAddress> = BTreeSet::new();
    for (vf, pf) in &inv.vf_parents {
        let Some(dev) = inv.device(*vf) else { continue };
        if model.is_some_and(|m| m != dev.id) {
            other_model += 1;
            continue;
        }
        if !holdings.holders(&[*vf]).is_empty() {
            held += 1;
            continue;
        }
        match assignable_vf(inv, holdings, *vf, domain) {
            Ok(()) => {
                let on_preferred = dev.numa_node.is_some_and(|n| prefer.contains(&n));
                free.push((!on_preferred, *vf));
            }
            Err(AllocError::VfInUse { .. }) => held += 1,
            Err(_) if !dev.driver.as_deref().is_some_and(is_vfio_driver) => {
                host_driver += 1;
                pfs_on_host.insert(*pf);
            }
            Err(_) => blocked += 1,
        }
    }
    if free.len() < count {
        let mut parts = vec![format!("{held} in use"), format!("{blocked} not passable")];
        if host_driver > 0 {
            parts.push(format!(
                "{host_driver} not on vfio-pci (PF {}: `gpupass bind VF` moves one, `gpupass sriov PF --vfs N` creates VFs on vfio-pci)",
                pfs_on_host
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        if model.is_some() {
            parts.push(format!("{other_model} of other models"));
        }
        if inv.vf_parents.is_empty() {
            parts.push(
                "this host has no SR-IOV virtual functions (`gpupass sriov PF --vfs N`)".to_owned(),
            );
        }
        return Err(AllocError::NoFreeVf {
            wanted: count,
            free: free.len(),
            model: model.map(|m| format!(" of model {m}")).unwrap_or_default(),
            detail: parts.join(", "),
        });
    }
    free.sort();
    Ok(AttachPlan {
        gpus: Vec::new(),
        switches: Vec::new(),
        vfs: free.into_iter().take(count).map(|(_, a)| a).collect(),
        warnings: Vec::new(),
    })
}

/// HGX full passthrough: every GPU of the fabric and every NVSwitch, or nothing. Each must be
/// passable (IOMMU group, drivers, quarantine) and held by no other domain.
fn plan_hgx_full(
    inv: &Inventory,
    holdings: &Holdings,
    domain: &str,
) -> Result<AttachPlan, AllocError> {
    let switches = inv.nvswitches();
    if switches.is_empty() {
        return Err(AllocError::NoFabric);
    }
    let mut warnings = Vec::new();
    let mut gpus = Vec::new();
    for addr in inv.fabric_gpus() {
        let gpu = inv
            .gpu(addr)
            .ok_or(AllocError::UnknownGpu { address: addr })?;
        if assignable(inv, holdings, gpu, domain)?.boot_vga {
            warnings.push(format!(
                "{addr} is the host's boot VGA (its console); the host loses that display"
            ));
        }
        gpus.push(addr);
    }
    for s in &switches {
        // A switch is one function: judged as a one-function unit (its IOMMU group, the
        // drivers of the group's other members, quarantine).
        let unit = Gpu {
            address: *s,
            functions: vec![*s],
        };
        match assignable(inv, holdings, &unit, domain) {
            Ok(_) => {}
            Err(AllocError::InUse { domain: d, .. }) => {
                return Err(AllocError::SwitchInUse {
                    switch: *s,
                    domain: d,
                })
            }
            Err(AllocError::NotPassable { reason, .. }) => {
                return Err(AllocError::SwitchNotPassable { switch: *s, reason })
            }
            Err(e) => return Err(e),
        }
    }
    Ok(AttachPlan {
        gpus,
        switches,
        vfs: Vec::new(),
        warnings,
    })
}

/// The GPUs held by `owner`'s domains (and by `domain`, when given, whoever owns it), and the
/// domains holding them. A domain's owner is the recorded one, else `owner_of` (config rules).
pub fn owner_holdings(
    inv: &Inventory,
    holdings: &Holdings,
    owner: &str,
    domain: Option<&str>,
    owner_of: &dyn Fn(&str) -> Option<String>,
) -> (BTreeSet<PciAddress>, BTreeSet<String>) {
    let mut held = BTreeSet::new();
    let mut holders = BTreeSet::new();
    for gpu in &inv.gpus {
        for h in holdings.holders(&gpu.functions) {
            let whose = holdings
                .owner(&h.domain)
                .map(str::to_owned)
                .or_else(|| owner_of(&h.domain));
            if Some(h.domain.as_str()) == domain || whose.as_deref() == Some(owner) {
                held.insert(gpu.address);
                holders.insert(h.domain);
            }
        }
    }
    (held, holders)
}

/// Checks an owner's limit: the GPUs its domains hold (`owner_of` says whose a domain is),
/// with `domain`'s own counted as the owner's, plus `adding`, must not exceed `max`.
pub fn check_limit(
    inv: &Inventory,
    holdings: &Holdings,
    domain: &str,
    owner: &str,
    max: u32,
    adding: &[PciAddress],
    owner_of: &dyn Fn(&str) -> Option<String>,
) -> Result<(), AllocError> {
    let (mut held, holders) = owner_holdings(inv, holdings, owner, Some(domain), owner_of);
    let before = held.len();
    held.extend(adding.iter().copied());
    if held.len() > max as usize {
        return Err(AllocError::LimitExceeded {
            owner: owner.to_owned(),
            max,
            held: before,
            wanted: held.len() - before,
            domains: holders.into_iter().collect::<Vec<_>>().join(", "),
        });
    }
    Ok(())
}

/// What a detach asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetachRequest {
    /// These GPUs.
    Gpus(Vec<PciAddress>),
    /// Every GPU of this host that the domain has.
    All,
    /// These SR-IOV virtual functions (`--vgpu vf --gpu VF`).
    Vfs(Vec<PciAddress>),
    /// Every SR-IOV virtual function of this host that the domain has (`--vgpu vf --all`).
    AllVfs,
}

/// One unit a detach removes: a GPU with the functions the domain has of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachUnit {
    /// The GPU (or, for a hostdev whose device is not on this host, that address).
    pub gpu: PciAddress,
    /// The functions to remove.
    pub functions: Vec<PciAddress>,
}

/// Picks what a detach removes from a domain whose hostdevs (in the definitions the detach
/// affects) are `present`.
pub fn plan_detach(
    inv: &Inventory,
    present: &BTreeSet<PciAddress>,
    domain: &str,
    impact: &'static str,
    request: &DetachRequest,
) -> Result<Vec<DetachUnit>, AllocError> {
    let unit_of = |gpu: &Gpu| DetachUnit {
        gpu: gpu.address,
        functions: gpu
            .functions
            .iter()
            .filter(|f| present.contains(f))
            .copied()
            .collect(),
    };
    match request {
        DetachRequest::Gpus(addrs) => {
            let mut units: Vec<DetachUnit> = Vec::new();
            for a in addrs {
                let unit = match inv.gpu(*a) {
                    Some(gpu) => unit_of(gpu),
                    // A hostdev left over from another host (migration): remove it by address.
                    None if present.contains(a) => DetachUnit {
                        gpu: *a,
                        functions: vec![*a],
                    },
                    None => return Err(AllocError::UnknownGpu { address: *a }),
                };
                if unit.functions.is_empty() {
                    return Err(AllocError::NotAttached {
                        gpu: unit.gpu,
                        domain: domain.to_owned(),
                        impact,
                    });
                }
                if !units.iter().any(|u| u.gpu == unit.gpu) {
                    units.push(unit);
                }
            }
            Ok(units)
        }
        DetachRequest::Vfs(addrs) => {
            let mut units: Vec<DetachUnit> = Vec::new();
            for a in addrs {
                // A VF address the domain has is removed even when the VF is gone from the
                // host (its PF's VF count lowered): the hostdev names it.
                if inv.physfn(*a).is_none() {
                    if inv.device(*a).is_some() {
                        return Err(AllocError::NotVirtualFunction { address: *a });
                    }
                    if !present.contains(a) {
                        return Err(AllocError::UnknownGpu { address: *a });
                    }
                }
                if !present.contains(a) {
                    return Err(AllocError::NotAttached {
                        gpu: *a,
                        domain: domain.to_owned(),
                        impact,
                    });
                }
                if !units.iter().any(|u| u.gpu == *a) {
                    units.push(DetachUnit {
                        gpu: *a,
                        functions: vec![*a],
                    });
                }
            }
            Ok(units)
        }
        DetachRequest::AllVfs => Ok(present
            .iter()
            .filter(|a| inv.physfn(**a).is_some())
            .map(|a| DetachUnit {
                gpu: *a,
                functions: vec![*a],
            })
            .collect()),
        // The host's NVSwitches go too: they came with the GPUs (HGX full passthrough).
        DetachRequest::All => Ok(inv
            .gpus
            .iter()
            .map(unit_of)
            .chain(
                inv.nvswitches()
                    .into_iter()
                    .filter(|s| present.contains(s))
                    .map(|s| DetachUnit {
                        gpu: s,
                        functions: vec![s],
                    }),
            )
            .filter(|u| !u.functions.is_empty())
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::discover::{IommuState, PciDevice};
    use crate::model::{IommuGroupId, PciClass};

    /// GPUs `(addr, model, numa, group, boot_vga)`, each with an audio function .1.
    fn host(gpus: &[(&str, &str, Option<u32>, u32, bool)], nic_in_group: Option<u32>) -> Inventory {
        let mut devices = BTreeMap::new();
        let mut groups: BTreeMap<IommuGroupId, Vec<PciAddress>> = BTreeMap::new();
        for (addr, model, numa, group, boot) in gpus {
            let a: PciAddress = addr.parse().unwrap();
            let audio = PciAddress::new(a.domain, a.bus, a.slot, 1).unwrap();
            for (f, class) in [(a, 0x030200), (audio, 0x040300)] {
                devices.insert(
                    f,
                    PciDevice {
                        address: f,
                        id: model.parse().unwrap(),
                        subsystem: None,
                        class: PciClass(class),
                        driver: Some("vfio-pci".into()),
                        iommu_group: Some(IommuGroupId(*group)),
                        numa_node: numa.map(NumaNode),
                        boot_vga: *boot && f == a,
                        reset_method: None,
                        parent: None,
                        virtfn: false,
                    },
                );
                groups.entry(IommuGroupId(*group)).or_default().push(f);
            }
        }
        if let Some(g) = nic_in_group {
            let nic: PciAddress = "0000:77:00.0".parse().unwrap();
            devices.insert(
                nic,
                PciDevice {
                    address: nic,
                    id: "8086:10fb".parse().unwrap(),
                    subsystem: None,
                    class: PciClass(0x020000),
                    driver: Some("ixgbe".into()),
                    iommu_group: Some(IommuGroupId(g)),
                    numa_node: None,
                    boot_vga: false,
                    reset_method: None,
                    parent: None,
                    virtfn: false,
                },
            );
            groups.entry(IommuGroupId(g)).or_default().push(nic);
        }
        let iommu = IommuState {
            groups: groups.len(),
            ..Default::default()
        };
        Inventory::build(devices, groups, iommu, Vec::new())
    }

    #[test]
    fn an_mdevs_holders_run_first_and_count_once() {
        let mut h = Holdings::default();
        let u: MdevUuid = "4b20d080-1b54-4048-85b3-a6a62d165c01".parse().unwrap();
        let other: MdevUuid = "4b20d080-1b54-4048-85b3-a6a62d165c02".parse().unwrap();
        h.add_mdev(u.clone(), "b-defined", false);
        h.add_mdev(u.clone(), "z-running", true);
        h.add_mdev(u.clone(), "z-running", false);
        let hs = h.mdev_holders(&u);
        let names: Vec<(&str, bool)> = hs.iter().map(|x| (x.domain.as_str(), x.running)).collect();
        assert_eq!(names, [("z-running", true), ("b-defined", false)]);
        assert!(h.mdev_holders(&other).is_empty());
        // An mdev is not a PCI function: no GPU holder comes from it.
        assert!(h.holders(&[a("0000:01:00.0")]).is_empty());
    }

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn a_quarantined_gpu_is_never_counted_and_refused_by_name() {
        let mut inv = eight();
        inv.quarantine.insert(
            a("0000:18:00.0"),
            crate::health::Quarantine {
                reason: "0000:18:00.0 has no reset method".into(),
                since: 0,
                by: "test".into(),
            },
        );
        let none = BTreeSet::new();
        let count = |n| AttachRequest::Count {
            count: n,
            model: None,
        };
        let p = plan_attach(&inv, &Holdings::default(), "vm", &count(1), &none).unwrap();
        assert_eq!(p.gpus, [a("0000:2a:00.0")]);
        let e = plan_attach(&inv, &Holdings::default(), "vm", &count(4), &none).unwrap_err();
        assert_eq!(e.exit_code(), 6);
        assert!(e.to_string().contains("1 quarantined"), "{e}");
        let by_name = AttachRequest::Gpus(vec![a("0000:18:00.1")]);
        let e = plan_attach(&inv, &Holdings::default(), "vm", &by_name, &none).unwrap_err();
        assert_eq!(e.exit_code(), 7);
        assert!(
            e.to_string().contains("quarantined since")
                && e.to_string().contains("no reset method"),
            "{e}"
        );
    }

    fn eight() -> Inventory {
        host(
            &[
                ("0000:18:00.0", "10de:2330", Some(0), 1, false),
                ("0000:2a:00.0", "10de:2330", Some(0), 2, false),
                ("0000:9a:00.0", "10de:2330", Some(1), 3, false),
                ("0000:ab:00.0", "10de:2330", Some(1), 4, false),
                ("0000:03:00.0", "1a03:2000", Some(0), 5, true),
            ],
            None,
        )
    }

    #[test]
    fn count_prefers_the_pinned_numa_node_then_lowest_address() {
        let inv = eight();
        let req = AttachRequest::Count {
            count: 2,
            model: None,
        };
        let none = plan_attach(&inv, &Holdings::default(), "vm", &req, &BTreeSet::new()).unwrap();
        assert_eq!(none.gpus, [a("0000:18:00.0"), a("0000:2a:00.0")]);
        let node1 = BTreeSet::from([NumaNode(1)]);
        let p = plan_attach(&inv, &Holdings::default(), "vm", &req, &node1).unwrap();
        assert_eq!(p.gpus, [a("0000:9a:00.0"), a("0000:ab:00.0")]);
        let three = AttachRequest::Count {
            count: 3,
            model: None,
        };
        let p = plan_attach(&inv, &Holdings::default(), "vm", &three, &node1).unwrap();
        assert_eq!(
            p.gpus,
            [a("0000:9a:00.0"), a("0000:ab:00.0"), a("0000:18:00.0")]
        );
    }

    #[test]
    fn count_skips_held_gpus_and_never_the_boot_vga() {
        let inv = eight();
        let mut h = Holdings::default();
        h.add(a("0000:18:00.1"), "other", false);
        // vm holds all of 2a (a GPU it holds only part of would be completed first).
        h.add(a("0000:2a:00.0"), "vm", true);
        h.add(a("0000:2a:00.1"), "vm", true);
        let req = AttachRequest::Count {
            count: 2,
            model: None,
        };
        let p = plan_attach(&inv, &h, "vm", &req, &BTreeSet::new()).unwrap();
        assert_eq!(p.gpus, [a("0000:9a:00.0"), a("0000:ab:00.0")]);
        let err = plan_attach(
            &inv,
            &h,
            "vm",
            &AttachRequest::Count {
                count: 3,
                model: None,
            },
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no free GPU: 3 wanted, 2 free and passable (2 in use, 0 not passable, 1 boot VGA)"
        );
    }

    #[test]
    fn a_gpu_partly_in_a_definition_is_partial_and_counted_for_its_domain_only() {
        let inv = eight();
        let mut h = Holdings::default();
        // vm runs with the whole GPU but its persistent definition lost the audio function.
        h.add_domain(
            "vm",
            None,
            &[a("0000:18:00.0"), a("0000:18:00.1")],
            &[a("0000:18:00.0")],
        );
        // whole: both functions in its config; never partial.
        h.add_domain("whole", None, &[], &[a("0000:2a:00.0"), a("0000:2a:00.1")]);
        let gpu = |x: &str| inv.gpu(a(x)).unwrap().functions.clone();
        let p = h.partial(&gpu("0000:18:00.0"));
        assert_eq!(
            p,
            [PartialHold {
                domain: "vm".into(),
                live: false,
                config: true,
                held: vec![a("0000:18:00.0")],
                missing: vec![a("0000:18:00.1")],
            }]
        );
        assert!(p[0]
            .summary(a("0000:18:00.0"))
            .contains("config definition: has 0000:18:00.0, lacks 0000:18:00.1"));
        assert!(h.partial(&gpu("0000:2a:00.0")).is_empty());
        assert!(h.partial(&gpu("0000:9a:00.0")).is_empty());
        let one = AttachRequest::Count {
            count: 1,
            model: None,
        };
        let p = plan_attach(&inv, &h, "vm", &one, &BTreeSet::new()).unwrap();
        assert_eq!(p.gpus, [a("0000:18:00.0")]);
        let two = AttachRequest::Count {
            count: 2,
            model: None,
        };
        let p = plan_attach(&inv, &h, "vm", &two, &BTreeSet::new()).unwrap();
        assert_eq!(p.gpus, [a("0000:18:00.0"), a("0000:9a:00.0")]);
        // Another domain's count skips it; of another model it does not count.
        let p = plan_attach(&inv, &h, "other", &one, &BTreeSet::new()).unwrap();
        assert_eq!(p.gpus, [a("0000:9a:00.0")]);
        let aspeed = AttachRequest::Count {
            count: 1,
            model: Some("1a03:2000".parse().unwrap()),
        };
        plan_attach(&inv, &h, "vm", &aspeed, &BTreeSet::new()).unwrap_err();
    }

    #[test]
    fn count_filters_by_model() {
        let inv = eight();
        let req = AttachRequest::Count {
            count: 1,
            model: Some("10de:1e07".parse().unwrap()),
        };
        let err =
            plan_attach(&inv, &Holdings::default(), "vm", &req, &BTreeSet::new()).unwrap_err();
        assert!(err.to_string().contains("of model 10de:1e07"), "{err}");
        assert!(err.to_string().contains("5 of other models"), "{err}");
    }

    #[test]
    fn explicit_gpu_held_elsewhere_names_the_domain() {
        let inv = eight();
        let mut h = Holdings::default();
        h.add(a("0000:9a:00.1"), "defined-only", false);
        h.add(a("0000:9a:00.0"), "running-one", true);
        let err = plan_attach(
            &inv,
            &h,
            "vm",
            &AttachRequest::Gpus(vec![a("0000:9a:00.1")]),
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "GPU 0000:9a:00.0 is in use by domain 'running-one'"
        );
        // The same domain holding it is not a conflict (the executor reports "already attached").
        plan_attach(
            &inv,
            &h,
            "running-one",
            &AttachRequest::Gpus(vec![a("0000:18:00.0")]),
            &BTreeSet::new(),
        )
        .unwrap();
    }

    #[test]
    fn explicit_boot_vga_is_allowed_with_a_warning_and_unknown_is_refused() {
        let inv = eight();
        let p = plan_attach(
            &inv,
            &Holdings::default(),
            "vm",
            &AttachRequest::Gpus(vec![a("0000:03:00.0")]),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(p.warnings.len(), 1);
        let err = plan_attach(
            &inv,
            &Holdings::default(),
            "vm",
            &AttachRequest::Gpus(vec![a("0000:55:00.0")]),
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            AllocError::UnknownGpu {
                address: a("0000:55:00.0")
            }
        );
    }

    #[test]
    fn group_peers_go_to_one_domain_and_host_devices_block() {
        // Two GPUs in one group (no ACS): taking one when the other is elsewhere is refused.
        let inv = host(
            &[
                ("0000:04:00.0", "10de:1eb8", None, 12, false),
                ("0000:05:00.0", "10de:1eb8", None, 12, false),
            ],
            None,
        );
        let mut h = Holdings::default();
        h.add(a("0000:05:00.0"), "vm-b", false);
        let err = plan_attach(
            &inv,
            &h,
            "vm-a",
            &AttachRequest::Gpus(vec![a("0000:04:00.0")]),
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("through GPU 0000:05:00.0"),
            "{err}"
        );
        let blocked = host(&[("0000:04:00.0", "10de:1eb8", None, 12, false)], Some(12));
        let err = plan_attach(
            &blocked,
            &Holdings::default(),
            "vm-a",
            &AttachRequest::Gpus(vec![a("0000:04:00.0")]),
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("ixgbe"), "{err}");
    }

    #[test]
    fn detach_finds_present_functions() {
        let inv = eight();
        let present = BTreeSet::from([a("0000:9a:00.0"), a("0000:9a:00.1"), a("0000:ee:00.0")]);
        let units = plan_detach(&inv, &present, "vm", "config", &DetachRequest::All).unwrap();
        assert_eq!(units.len(), 1);
        assert_eq!(units[0].functions, [a("0000:9a:00.0"), a("0000:9a:00.1")]);
        let err = plan_detach(
            &inv,
            &present,
            "vm",
            "config",
            &DetachRequest::Gpus(vec![a("0000:18:00.0")]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "GPU 0000:18:00.0 is not attached to domain 'vm' (config)"
        );
        // A stale hostdev whose device is not on this host is removable by address.
        let stale = plan_detach(
            &inv,
            &present,
            "vm",
            "config",
            &DetachRequest::Gpus(vec![a("0000:ee:00.0")]),
        )
        .unwrap();
        assert_eq!(stale[0].functions, [a("0000:ee:00.0")]);
    }

    fn hgx_host() -> Inventory {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hosts/hgx-8gpu");
        crate::host::discover::discover(&crate::host::sysfs::Sysfs::new(std::path::Path::new(root)))
            .unwrap()
    }

    const HGX_SWITCHES: [&str; 4] = [
        "0000:05:00.0",
        "0000:06:00.0",
        "0000:07:00.0",
        "0000:08:00.0",
    ];

    #[test]
    fn hgx_full_takes_every_gpu_and_every_nvswitch() {
        let inv = hgx_host();
        let p = plan_attach(
            &inv,
            &Holdings::default(),
            "vm",
            &AttachRequest::HgxFull,
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(p.gpus.len(), 8, "{:?}", p.gpus);
        assert!(
            !p.gpus.contains(&a("0000:03:00.0")),
            "the BMC's VGA is no part of the fabric"
        );
        let switches: Vec<PciAddress> = HGX_SWITCHES.iter().map(|s| a(s)).collect();
        assert_eq!(p.switches, switches);
        // The domain's own holdings do not stop it (completing a partial fabric).
        let mut own = Holdings::default();
        own.add(a("0000:18:00.0"), "vm", false);
        own.add(a("0000:05:00.0"), "vm", false);
        let again =
            plan_attach(&inv, &own, "vm", &AttachRequest::HgxFull, &BTreeSet::new()).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn hgx_full_is_refused_whole_when_one_part_is_held_quarantined_or_missing() {
        let inv = hgx_host();
        let none = BTreeSet::new();
        let hgx = AttachRequest::HgxFull;
        let mut gpu_held = Holdings::default();
        gpu_held.add(a("0000:9a:00.0"), "other", true);
        let e = plan_attach(&inv, &gpu_held, "vm", &hgx, &none).unwrap_err();
        assert_eq!(e.exit_code(), 5);
        assert!(
            e.to_string().contains("0000:9a:00.0") && e.to_string().contains("'other'"),
            "{e}"
        );

        let mut switch_held = Holdings::default();
        switch_held.add(a("0000:07:00.0"), "fm-service", false);
        let e = plan_attach(&inv, &switch_held, "vm", &hgx, &none).unwrap_err();
        assert_eq!(e.exit_code(), 5);
        assert_eq!(
            e.to_string(),
            "HGX full passthrough: NVSwitch 0000:07:00.0 is in use by domain 'fm-service'"
        );

        let mut q = hgx_host();
        q.quarantine.insert(
            a("0000:06:00.0"),
            crate::health::Quarantine {
                reason: "link errors".into(),
                since: 0,
                by: "test".into(),
            },
        );
        let e = plan_attach(&q, &Holdings::default(), "vm", &hgx, &none).unwrap_err();
        assert_eq!(e.exit_code(), 7);
        assert!(
            e.to_string().contains("NVSwitch 0000:06:00.0")
                && e.to_string().contains("link errors"),
            "{e}"
        );

        // A host without NVSwitches has no fabric to give.
        let e = plan_attach(&eight(), &Holdings::default(), "vm", &hgx, &none).unwrap_err();
        assert_eq!(e.exit_code(), 6);
        assert!(e.to_string().contains("no HGX fabric"), "{e}");
    }

    #[test]
    fn detach_all_takes_the_switches_with_the_gpus() {
        let inv = hgx_host();
        let present: BTreeSet<PciAddress> =
            [a("0000:18:00.0"), a("0000:05:00.0"), a("0000:08:00.0")]
                .into_iter()
                .collect();
        let units = plan_detach(&inv, &present, "vm", "config", &DetachRequest::All).unwrap();
        let gone: Vec<PciAddress> = units.iter().map(|u| u.gpu).collect();
        assert_eq!(
            gone,
            [a("0000:18:00.0"), a("0000:05:00.0"), a("0000:08:00.0")]
        );
    }

    /// Two SR-IOV GPUs: PF 0000:4d:00.0 (node 0) with VFs .1 and .2, PF 0000:9a:00.0 (node 1)
    /// with VF .1 on `vf9a_driver`; every function in its own group.
    fn vf_host(vf9a_driver: &str) -> Inventory {
        let mut devices = BTreeMap::new();
        let mut groups: BTreeMap<IommuGroupId, Vec<PciAddress>> = BTreeMap::new();
        let mut parents = BTreeMap::new();
        let fns: [(&str, Option<&str>, u32, u32, &str); 5] = [
            ("0000:4d:00.0", None, 40, 0, "vfio-pci"),
            ("0000:4d:00.1", Some("0000:4d:00.0"), 41, 0, "vfio-pci"),
            ("0000:4d:00.2", Some("0000:4d:00.0"), 42, 0, "vfio-pci"),
            ("0000:9a:00.0", None, 50, 1, "vfio-pci"),
            ("0000:9a:00.1", Some("0000:9a:00.0"), 51, 1, vf9a_driver),
        ];
        for (addr, pf, group, numa, driver) in fns {
            let a: PciAddress = addr.parse().unwrap();
            devices.insert(
                a,
                PciDevice {
                    address: a,
                    id: "8086:56c0".parse().unwrap(),
                    subsystem: None,
                    class: PciClass(0x038000),
                    driver: Some(driver.into()),
                    iommu_group: Some(IommuGroupId(group)),
                    numa_node: Some(NumaNode(numa)),
                    boot_vga: false,
                    reset_method: None,
                    parent: None,
                    virtfn: pf.is_some(),
                },
            );
            groups.entry(IommuGroupId(group)).or_default().push(a);
            if let Some(pf) = pf {
                parents.insert(a, pf.parse::<PciAddress>().unwrap());
            }
        }
        let iommu = IommuState {
            groups: groups.len(),
            ..Default::default()
        };
        let mut inv = Inventory::build(devices, groups, iommu, Vec::new());
        inv.vf_parents = parents;
        inv
    }

    fn vf_count(n: usize) -> AttachRequest {
        AttachRequest::VfCount {
            count: n,
            model: None,
        }
    }

    #[test]
    fn a_vf_count_takes_free_vfs_on_the_preferred_node_first() {
        let inv = vf_host("vfio-pci");
        assert_eq!(inv.gpus.len(), 2, "VFs are no GPUs");
        let h = Holdings::default();
        let none = BTreeSet::new();
        let p = plan_attach(&inv, &h, "vm", &vf_count(2), &none).unwrap();
        assert!(p.gpus.is_empty());
        assert_eq!(p.vfs, [a("0000:4d:00.1"), a("0000:4d:00.2")]);
        let node1 = BTreeSet::from([NumaNode(1)]);
        let p = plan_attach(&inv, &h, "vm", &vf_count(2), &node1).unwrap();
        assert_eq!(p.vfs, [a("0000:9a:00.1"), a("0000:4d:00.1")]);
        // A VF another domain holds is skipped, and one is never given twice.
        let mut h = Holdings::default();
        h.add(a("0000:4d:00.1"), "other", false);
        let p = plan_attach(&inv, &h, "vm", &vf_count(2), &none).unwrap();
        assert_eq!(p.vfs, [a("0000:4d:00.2"), a("0000:9a:00.1")]);
        let e = plan_attach(
            &inv,
            &h,
            "vm",
            &AttachRequest::Vfs(vec![a("0000:4d:00.1")]),
            &none,
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 5);
        assert!(e.to_string().contains("in use by domain 'other'"), "{e}");
    }

    #[test]
    fn a_vf_count_beyond_the_free_ones_is_no_free_exit_6() {
        let inv = vf_host("i915");
        let mut h = Holdings::default();
        h.add(a("0000:4d:00.2"), "other", true);
        let e = plan_attach(&inv, &h, "vm", &vf_count(2), &BTreeSet::new()).unwrap_err();
        assert_eq!(e.exit_code(), 6);
        let m = e.to_string();
        assert!(m.contains("2 wanted, 1 free"), "{m}");
        assert!(m.contains("1 in use"), "{m}");
        // The VF on a host driver is not free, and the line says how to get VFs on vfio-pci.
        assert!(m.contains("1 not on vfio-pci (PF 0000:9a:00.0"), "{m}");
        assert!(m.contains("gpupass sriov"), "{m}");
        let e = plan_attach(
            &inv,
            &h,
            "vm",
            &AttachRequest::Vfs(vec![a("0000:9a:00.1")]),
            &BTreeSet::new(),
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 7);
        assert!(e.to_string().contains("on the host driver i915"), "{e}");
    }

    #[test]
    fn whole_gpu_and_its_vfs_exclude_each_other() {
        let inv = vf_host("vfio-pci");
        let none = BTreeSet::new();
        // A PF passed whole: its VFs are not free, for any domain (its own too).
        let mut h = Holdings::default();
        h.add(a("0000:4d:00.0"), "whole", false);
        for who in ["vm", "whole"] {
            let e = plan_attach(
                &inv,
                &h,
                who,
                &AttachRequest::Vfs(vec![a("0000:4d:00.2")]),
                &none,
            )
            .unwrap_err();
            assert_eq!(e.exit_code(), 5);
            assert!(e.to_string().contains("through its PF 0000:4d:00.0"), "{e}");
        }
        let p = plan_attach(&inv, &h, "vm", &vf_count(1), &none).unwrap();
        assert_eq!(p.vfs, [a("0000:9a:00.1")]);
        // A PF with a VF held: not free for a whole attach, by address or by count.
        let mut h = Holdings::default();
        h.add(a("0000:9a:00.1"), "fraction", true);
        let e = plan_attach(
            &inv,
            &h,
            "vm",
            &AttachRequest::Gpus(vec![a("0000:9a:00.0")]),
            &none,
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 5);
        assert!(
            e.to_string()
                .contains("through its SR-IOV virtual function 0000:9a:00.1"),
            "{e}"
        );
        let count = AttachRequest::Count {
            count: 1,
            model: None,
        };
        let p = plan_attach(&inv, &h, "vm", &count, &BTreeSet::from([NumaNode(1)])).unwrap();
        assert_eq!(
            p.gpus,
            [a("0000:4d:00.0")],
            "the PF with a VF in use is skipped"
        );
        let two = AttachRequest::Count {
            count: 2,
            model: None,
        };
        assert_eq!(
            plan_attach(&inv, &h, "vm", &two, &none)
                .unwrap_err()
                .exit_code(),
            6
        );
    }

    #[test]
    fn vf_requests_name_only_vfs_and_detach_takes_only_vfs() {
        let inv = vf_host("vfio-pci");
        let h = Holdings::default();
        let none = BTreeSet::new();
        let e = plan_attach(
            &inv,
            &h,
            "vm",
            &AttachRequest::Vfs(vec![a("0000:4d:00.0")]),
            &none,
        )
        .unwrap_err();
        assert!(matches!(e, AllocError::NotVirtualFunction { .. }), "{e}");
        assert_eq!(e.exit_code(), 3);
        let present: BTreeSet<PciAddress> =
            [a("0000:4d:00.0"), a("0000:4d:00.2"), a("0000:9a:00.1")].into();
        let units = plan_detach(&inv, &present, "vm", "config", &DetachRequest::AllVfs).unwrap();
        let got: Vec<PciAddress> = units.iter().map(|u| u.gpu).collect();
        assert_eq!(got, [a("0000:4d:00.2"), a("0000:9a:00.1")]);
        let e = plan_detach(
            &inv,
            &present,
            "vm",
            "config",
            &DetachRequest::Vfs(vec![a("0000:4d:00.1")]),
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 3);
        let e = plan_detach(
            &inv,
            &present,
            "vm",
            "config",
            &DetachRequest::Vfs(vec![a("0000:4d:00.0")]),
        )
        .unwrap_err();
        assert!(matches!(e, AllocError::NotVirtualFunction { .. }), "{e}");
        // A whole-GPU --all leaves the VFs alone.
        let units = plan_detach(&inv, &present, "vm", "config", &DetachRequest::All).unwrap();
        let got: Vec<PciAddress> = units.iter().map(|u| u.gpu).collect();
        assert_eq!(got, [a("0000:4d:00.0")]);
    }
}
