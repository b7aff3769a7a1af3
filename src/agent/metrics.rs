//! `/metrics`: the agent's state in Prometheus/OpenMetrics text, built with `prometheus-client`
//! from one snapshot per scrape (a fresh registry each time, so a metric never outlives the
//! domain or owner it describes).

use std::collections::BTreeMap;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::agent::state::Snapshot;
use crate::alloc::plan::{assignable_vf, Holdings};
use crate::alloc::AllocError;
use crate::host::readiness::verdict;
use crate::model::PciAddress;
use crate::usage::UsageReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabels {
    domain: String,
    owner: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileStateLabels {
    profile: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainProfileLabels {
    domain: String,
    owner: String,
    profile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OwnerLabels {
    owner: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    op: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    action: String,
    result: String,
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

/// The vGPU profile an SR-IOV virtual function counts under (`attach --vgpu vf`).
const VF_PROFILE: &str = "vf";

/// A VF's state for `gpupass_vgpus`: `used` when a domain references it (or its IOMMU group,
/// or its PF passed whole, gives it to one), `free` when `attach --vgpu vf` could take it,
/// `not_passable` otherwise (on a host driver, shared IOMMU group, quarantined). The same
/// judgement as the planner's ([`assignable_vf`]).
fn vf_state(s: &Snapshot, holdings: &Holdings, vf: PciAddress) -> &'static str {
    if !holdings.holders(&[vf]).is_empty() {
        return "used";
    }
    // No domain is named "": every holder counts as another domain.
    match assignable_vf(&s.inventory, holdings, vf, "") {
        Ok(()) => "free",
        Err(AllocError::VfInUse { .. }) => "used",
        Err(_) => "not_passable",
    }
}

/// `gpupass_vgpus{profile,state}` and `gpupass_domain_vgpus{domain,owner,profile}`: SR-IOV
/// virtual functions (profile `vf`), the fractions `attach --vgpu` gives today.
fn register_vgpus(r: &mut Registry, s: &Snapshot, holdings: &Holdings) {
    let vgpus = Family::<ProfileStateLabels, Gauge>::default();
    for st in ["free", "used", "not_passable"] {
        vgpus
            .get_or_create(&ProfileStateLabels {
                profile: VF_PROFILE.into(),
                state: st.into(),
            })
            .set(0);
    }
    for vf in s.inventory.vf_parents.keys() {
        vgpus
            .get_or_create(&ProfileStateLabels {
                profile: VF_PROFILE.into(),
                state: vf_state(s, holdings, *vf).into(),
            })
            .inc();
    }
    r.register(
        "vgpus",
        "vGPUs of the host by profile and state (profile vf: SR-IOV virtual functions; used: referenced by a domain or given to one with its IOMMU group or its PF; free: attach --vgpu vf could take it)",
        vgpus,
    );
    let per_domain = Family::<DomainProfileLabels, Gauge>::default();
    for d in s.domains.values() {
        let n = s
            .inventory
            .vf_parents
            .keys()
            .filter(|vf| d.live.contains(vf) || d.config.contains(vf))
            .count();
        if n > 0 {
            per_domain
                .get_or_create(&DomainProfileLabels {
                    domain: d.name.clone(),
                    owner: d.owner.clone().unwrap_or_default(),
                    profile: VF_PROFILE.into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    r.register(
        "domain_vgpus",
        "vGPUs each domain references (running or defined), by profile",
        per_domain,
    );
}

/// Renders the metrics text.
pub fn render(
    s: &Snapshot,
    usage: Option<&UsageReport>,
    decisions: &BTreeMap<(String, String), u64>,
    hook: &BTreeMap<String, u64>,
) -> Result<String, std::fmt::Error> {
    let mut r = Registry::with_prefix("gpupass");
    let holdings = s.holdings();
    let gpus = Family::<StateLabels, Gauge>::default();
    for st in ["free", "assigned", "partial", "quarantined", "not_passable"] {
        gpus.get_or_create(&StateLabels { state: st.into() }).set(0);
    }
    for g in &s.inventory.gpus {
        // Quarantined first: a released GPU usually stays in its domain's definition.
        let state = if s.inventory.quarantine_of(g).is_some() {
            "quarantined"
        } else if !holdings.partial(&g.functions).is_empty() {
            "partial"
        } else if !holdings.holders(&g.functions).is_empty() {
            "assigned"
        } else if !verdict(&s.inventory, g).viable {
            "not_passable"
        } else {
            "free"
        };
        gpus.get_or_create(&StateLabels {
            state: state.into(),
        })
        .inc();
    }
    // A quarantined GPU that fell off the bus is no longer in the inventory, and still counts.
    for a in s.inventory.quarantine.keys() {
        if s.inventory.gpu(*a).is_none() {
            gpus.get_or_create(&StateLabels {
                state: "quarantined".into(),
            })
            .inc();
        }
    }
    r.register(
        "gpus",
        "GPUs of the host by state (assigned: referenced by a domain; partial: a domain holds only some of its functions; quarantined: failed a health check, see gpupass quarantine list)",
        gpus,
    );
    let per_domain = Family::<DomainLabels, Gauge>::default();
    for d in s.domains.values() {
        let n = s
            .inventory
            .gpus
            .iter()
            .filter(|g| {
                g.functions
                    .iter()
                    .any(|f| d.live.contains(f) || d.config.contains(f))
            })
            .count();
        if n > 0 {
            per_domain
                .get_or_create(&DomainLabels {
                    domain: d.name.clone(),
                    owner: d.owner.clone().unwrap_or_default(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    r.register(
        "domain_gpus",
        "GPUs each domain references (running or defined)",
        per_domain,
    );
    register_vgpus(&mut r, s, &holdings);
    if let Some(u) = usage {
        let owners = Family::<OwnerLabels, Counter>::default();
        for (o, secs) in &u.owners {
            owners
                .get_or_create(&OwnerLabels { owner: o.clone() })
                .inc_by(*secs);
        }
        r.register(
            "owner_gpu_seconds",
            "GPU-seconds used per owner (usage ledger)",
            owners,
        );
        let per_gpu = Family::<GpuLabels, Counter>::default();
        for (g, secs) in &u.gpus {
            per_gpu
                .get_or_create(&GpuLabels { gpu: g.to_string() })
                .inc_by(*secs);
        }
        r.register(
            "gpu_seconds",
            "GPU-seconds used per GPU (usage ledger)",
            per_gpu,
        );
        counter(
            &mut r,
            "usage_gpu_seconds",
            "GPU-seconds used in all",
            u.total_gpu_seconds,
        );
    }
    let c = &s.counters;
    counter(
        &mut r,
        "reconciles",
        "Full reconciles with libvirt",
        c.reconciles,
    );
    counter(
        &mut r,
        "reconcile_failures",
        "Reconciles that failed (libvirt went away)",
        c.reconcile_failures,
    );
    counter(
        &mut r,
        "libvirt_reconnects",
        "Connections to libvirt after the first",
        c.reconnects,
    );
    counter(
        &mut r,
        "libvirt_events",
        "libvirt domain events received",
        c.events,
    );
    counter(
        &mut r,
        "usage_records_written",
        "Usage records the agent wrote (the hook wrote the rest)",
        c.usage_records,
    );
    gauge(
        &mut r,
        "libvirt_connected",
        "1 when libvirt is connected and the state is fresh",
        i64::from(s.fresh()),
    );
    gauge(
        &mut r,
        "last_reconcile_milliseconds",
        "Duration of the last full reconcile",
        i64::try_from(c.last_reconcile_ms).unwrap_or(i64::MAX),
    );
    let d = Family::<DecisionLabels, Counter>::default();
    for ((action, result), n) in decisions {
        d.get_or_create(&DecisionLabels {
            action: action.clone(),
            result: result.clone(),
        })
        .inc_by(*n);
    }
    r.register(
        "api_decisions",
        "API attach/detach outcomes by result code",
        d,
    );
    let h = Family::<HookLabels, Counter>::default();
    for (key, n) in hook {
        let (op, result) = key.split_once('/').unwrap_or((key.as_str(), ""));
        h.get_or_create(&HookLabels {
            op: op.to_owned(),
            result: result.to_owned(),
        })
        .inc_by(*n);
    }
    r.register(
        "hook_decisions",
        "qemu hook and transform decisions (prepare allowed/blocked, migrate/restore rewritten/unchanged/failed, transform ok/refused)",
        h,
    );
    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::agent::state::DomainView;
    use crate::host::discover::discover;
    use crate::host::sysfs::Sysfs;

    #[test]
    fn quarantined_gpus_are_counted_also_when_gone_from_the_bus() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hosts/hgx-8gpu");
        let mut inv = discover(&Sysfs::new(root)).unwrap();
        let q = crate::health::Quarantine {
            reason: "gone".into(),
            since: 1,
            by: "test".into(),
        };
        for a in ["0000:18:00.0", "0000:77:00.0"] {
            inv.quarantine.insert(a.parse().unwrap(), q.clone());
        }
        let s = Snapshot {
            inventory: Arc::new(inv),
            ..Snapshot::default()
        };
        let text = render(&s, None, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        assert!(
            text.contains("gpupass_gpus{state=\"quarantined\"} 2"),
            "{text}"
        );
        // The other seven H100s and the console are free (no domain holds them).
        assert!(text.contains("gpupass_gpus{state=\"free\"} 8"), "{text}");
    }

    fn domain(name: &str, owner: Option<&str>, live: &[&str], config: &[&str]) -> DomainView {
        let parse = |v: &[&str]| v.iter().map(|a| a.parse().unwrap()).collect();
        DomainView {
            name: name.into(),
            uuid: None,
            active: !live.is_empty(),
            persistent: true,
            owner: owner.map(Into::into),
            live: parse(live),
            config: parse(config),
        }
    }

    #[test]
    fn vfs_are_counted_per_profile_and_per_domain() {
        // vgpu-intel: the Flex 170 at 4d:00.0 with VFs 4d:00.1 and 4d:00.2 on vfio-pci.
        let root = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hosts/vgpu-intel"
        );
        let inv = discover(&Sysfs::new(root)).unwrap();
        assert_eq!(inv.vf_parents.len(), 2, "{:?}", inv.vf_parents);
        let mut s = Snapshot {
            inventory: Arc::new(inv),
            ..Snapshot::default()
        };
        let text = render(&s, None, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        assert!(
            text.contains("gpupass_vgpus{profile=\"vf\",state=\"free\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("gpupass_vgpus{profile=\"vf\",state=\"used\"} 0"),
            "{text}"
        );
        assert!(!text.contains("gpupass_domain_vgpus{"), "{text}");

        s.domains.insert(
            "vm-vf".into(),
            domain("vm-vf", Some("alice"), &["0000:4d:00.1"], &["0000:4d:00.1"]),
        );
        let text = render(&s, None, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        assert!(
            text.contains("gpupass_vgpus{profile=\"vf\",state=\"free\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gpupass_vgpus{profile=\"vf\",state=\"used\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "gpupass_domain_vgpus{domain=\"vm-vf\",owner=\"alice\",profile=\"vf\"} 1"
            ),
            "{text}"
        );
        // A VF is no GPU: the domain holds no whole GPU.
        assert!(!text.contains("gpupass_domain_gpus{"), "{text}");

        // The PF passed whole gives its free VF to that domain too: none is free.
        s.domains.insert(
            "vm-whole".into(),
            domain("vm-whole", None, &[], &["0000:4d:00.0"]),
        );
        let text = render(&s, None, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        assert!(
            text.contains("gpupass_vgpus{profile=\"vf\",state=\"free\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("gpupass_vgpus{profile=\"vf\",state=\"used\"} 2"),
            "{text}"
        );
    }
}
