//! Decides which GPUs a domain's XML should carry for its request on this host (pure): keeps the
//! hostdevs that are valid here, drops gpupass-injected ones that are not (another host's
//! address after a migration, a GPU held by someone else, one that no longer fits the request),
//! and picks what is missing with the same rules as `attach --count`.

use std::collections::BTreeSet;

use crate::alloc::plan::{plan_attach, AttachRequest, Holdings};
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
                        .ok_or(AllocError::UnknownGpu { address: *a })
                })
                .collect::<Result<_, _>>()?,
        ),
        AttachRequest::Count { .. } => None,
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
        });
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
        AttachRequest::Gpus(_) => wanted_gpus
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
    res.add = add.into_iter().collect();
    res.functions_after = after.into_iter().collect();
    Ok(res)
}
