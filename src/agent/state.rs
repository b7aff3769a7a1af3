//! The agent's derived state — every domain with the PCI functions its live and persistent
//! XML reference, the host's inventory, whether libvirt is connected — and the pure decisions
//! made from it: holdings, and which usage records the ledger is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::alloc::lease;
use crate::alloc::plan::Holdings;
use crate::host::discover::Inventory;
use crate::model::PciAddress;
use crate::usage::Record;

/// One domain as libvirt showed it last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainView {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: Option<String>,
    /// Running (or paused).
    pub active: bool,
    /// Has a persistent definition.
    pub persistent: bool,
    /// Its owner (metadata, else a config rule).
    pub owner: Option<String>,
    /// PCI hostdev sources of the running definition (empty when not running).
    pub live: Vec<PciAddress>,
    /// PCI hostdev sources of the persistent definition.
    pub config: Vec<PciAddress>,
}

impl DomainView {
    /// The usage session key, as the hook computes it.
    pub fn key(&self) -> String {
        lease::key(self.uuid.as_deref(), &self.name)
    }

    /// The GPUs (display functions) a running domain holds, for usage.
    pub fn running_gpus(&self, inv: &Inventory) -> Vec<PciAddress> {
        if !self.active {
            return Vec::new();
        }
        let mut out: Vec<PciAddress> = self
            .live
            .iter()
            .filter(|a| inv.devices.get(a).is_some_and(|d| d.class.is_gpu()))
            .copied()
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Counters the agent keeps (exported as metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Full reconciles done.
    pub reconciles: u64,
    /// Reconciles that failed (libvirt went away during one).
    pub reconcile_failures: u64,
    /// Connections made after the first.
    pub reconnects: u64,
    /// libvirt events received.
    pub events: u64,
    /// Usage records the agent wrote (the hook wrote the others).
    pub usage_records: u64,
    /// Milliseconds the last full reconcile took.
    pub last_reconcile_ms: u64,
}

/// What the agent knows, as one value that the API reads and the watcher replaces.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The host's GPUs (re-read at every full reconcile).
    pub inventory: Arc<Inventory>,
    /// Every domain, by name.
    pub domains: BTreeMap<String, DomainView>,
    /// libvirt is connected and the state follows its events.
    pub connected: bool,
    /// Unix seconds of the last successful full reconcile.
    pub reconciled_at: Option<u64>,
    /// Unix seconds since which the state has been stale (libvirt gone).
    pub stale_since: Option<u64>,
    /// The last connection or reconcile error.
    pub last_error: Option<String>,
    /// Counters.
    pub counters: Counters,
}

impl Snapshot {
    /// Who holds which function, as `read_holdings` would read it from libvirt.
    pub fn holdings(&self) -> Holdings {
        let mut h = Holdings::default();
        for d in self.domains.values() {
            h.add_domain(&d.name, d.owner.as_deref(), &d.live, &d.config);
        }
        h
    }

    /// True when the state follows libvirt now.
    pub fn fresh(&self) -> bool {
        self.connected && self.reconciled_at.is_some()
    }
}

/// A usage record to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageOp {
    /// Open a session.
    Start {
        /// Domain name.
        domain: String,
        /// Session key.
        key: String,
        /// GPUs.
        gpus: Vec<PciAddress>,
        /// Owner.
        owner: Option<String>,
    },
    /// Close a session.
    Stop {
        /// Domain name.
        domain: String,
        /// Session key.
        key: String,
    },
}

/// Sessions open in the ledger: key → (domain, GPUs).
pub fn open_sessions(records: &[Record]) -> BTreeMap<String, (String, Vec<PciAddress>)> {
    let mut open = BTreeMap::new();
    for r in records {
        match r {
            Record::Start {
                domain, key, gpus, ..
            } => {
                let mut g = gpus.clone();
                g.sort();
                open.insert(key.clone(), (domain.clone(), g));
            }
            Record::Stop { key, .. } => {
                open.remove(key);
            }
        }
    }
    open
}

/// The records that make the ledger agree with what runs (pure). `scope`: the session keys
/// and domain names to look at (`None` = all, after a full reconcile). A running domain with
/// GPUs needs an open session with exactly those GPUs (a live attach or detach closes the
/// session and opens a new one); a session of anything else is closed. Records the hook
/// already wrote are not repeated, because the decision is made against the ledger itself.
pub fn usage_ops(
    domains: &BTreeMap<String, DomainView>,
    inv: &Inventory,
    open: &BTreeMap<String, (String, Vec<PciAddress>)>,
    scope: Option<&BTreeSet<String>>,
) -> Vec<UsageOp> {
    let in_scope =
        |key: &str, name: &str| scope.is_none_or(|s| s.contains(key) || s.contains(name));
    let mut ops = Vec::new();
    let mut wanted: BTreeMap<String, (&DomainView, Vec<PciAddress>)> = BTreeMap::new();
    for d in domains.values() {
        let gpus = d.running_gpus(inv);
        if !gpus.is_empty() {
            wanted.insert(d.key(), (d, gpus));
        }
    }
    for (key, (domain, gpus)) in open {
        if !in_scope(key, domain) {
            continue;
        }
        match wanted.get(key) {
            Some((_, want)) if want == gpus => {}
            _ => ops.push(UsageOp::Stop {
                domain: domain.clone(),
                key: key.clone(),
            }),
        }
    }
    for (key, (d, gpus)) in &wanted {
        if !in_scope(key, &d.name) {
            continue;
        }
        if open.get(key).is_some_and(|(_, g)| g == gpus) {
            continue;
        }
        ops.push(UsageOp::Start {
            domain: d.name.clone(),
            key: key.clone(),
            gpus: gpus.clone(),
            owner: d.owner.clone(),
        });
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::discover::discover;
    use crate::host::sysfs::Sysfs;

    fn inv() -> Inventory {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hosts/hgx-8gpu");
        discover(&Sysfs::new(std::path::Path::new(root))).unwrap()
    }

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn view(name: &str, active: bool, live: &[&str]) -> DomainView {
        DomainView {
            name: name.into(),
            uuid: None,
            active,
            persistent: true,
            owner: Some("acct".into()),
            live: live.iter().map(|s| a(s)).collect(),
            config: Vec::new(),
        }
    }

    #[test]
    fn usage_follows_what_runs_without_repeating_the_hook() {
        let inv = inv();
        let mut domains = BTreeMap::new();
        // vm1 runs with a GPU (display + its audio function: one GPU counted).
        let g1 = inv.gpus[0].address;
        let fns: Vec<String> = inv.gpus[0]
            .functions
            .iter()
            .map(|f| f.to_string())
            .collect();
        let fns: Vec<&str> = fns.iter().map(String::as_str).collect();
        domains.insert("vm1".into(), view("vm1", true, &fns));
        // vm2 is defined, not running: no session.
        domains.insert("vm2".into(), view("vm2", false, &[]));
        let key = domains["vm1"].key();
        assert_eq!(key, "name-vm1");
        let mut open = BTreeMap::new();
        let ops = usage_ops(&domains, &inv, &open, None);
        assert_eq!(
            ops,
            vec![UsageOp::Start {
                domain: "vm1".into(),
                key: key.clone(),
                gpus: vec![g1],
                owner: Some("acct".into()),
            }]
        );
        // The hook already opened it: nothing to write.
        open.insert(key.clone(), ("vm1".to_string(), vec![g1]));
        assert!(usage_ops(&domains, &inv, &open, None).is_empty());
        // A live attach of a second GPU: the session is closed and reopened with both.
        let g2 = inv.gpus[1].address;
        domains.get_mut("vm1").unwrap().live.push(g2);
        let ops = usage_ops(&domains, &inv, &open, None);
        assert_eq!(ops.len(), 2);
        assert!(matches!(&ops[0], UsageOp::Stop { key: k, .. } if *k == key));
        assert!(matches!(&ops[1], UsageOp::Start { gpus, .. } if *gpus == vec![g1, g2]));
        // Stopped (or undefined): the open session is closed; out of scope it is left alone.
        domains.get_mut("vm1").unwrap().active = false;
        let scope: BTreeSet<String> = ["vm2".to_string()].into();
        assert!(usage_ops(&domains, &inv, &open, Some(&scope)).is_empty());
        domains.remove("vm1");
        assert_eq!(
            usage_ops(&domains, &inv, &open, None),
            vec![UsageOp::Stop {
                domain: "vm1".into(),
                key
            }]
        );
    }

    #[test]
    fn holdings_come_from_live_and_config() {
        let mut s = Snapshot::default();
        let mut d = view("vm1", true, &["0000:18:00.0"]);
        d.config = vec![a("0000:2a:00.0")];
        s.domains.insert("vm1".into(), d);
        let h = s.holdings();
        assert!(h.holders(&[a("0000:18:00.0")])[0].running);
        assert!(!h.holders(&[a("0000:2a:00.0")])[0].running);
        assert_eq!(h.owner("vm1"), Some("acct"));
        assert!(h.holders(&[a("0000:3a:00.0")]).is_empty());
    }
}
