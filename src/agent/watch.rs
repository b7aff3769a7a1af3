//! The watcher: one thread that owns the agent's libvirt connection. It connects (with
//! backoff), subscribes to events, rebuilds the state from libvirt and the host root, keeps it
//! current from events and a periodic reconcile, writes the usage records the ledger is
//! missing, and marks the state stale while libvirt is away. All of it blocking, off the async
//! runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::agent::state::{open_sessions, usage_ops, DomainView, Snapshot, UsageOp};
use crate::alloc::lease::LeaseStore;
use crate::alloc::lock::HostLock;
use crate::assign::{self, AssignError, AssignOptions, DomainDevices};
use crate::config::{GpupassConfig, RepairPartial};
use crate::health::check::{self as health_check, Target};
use crate::health::store::HealthStore;
use crate::host::discover::discover;
use crate::host::discover::Inventory;
use crate::host::sysfs::Sysfs;
use crate::libvirt::events::{self, LibvirtEvent};
use crate::libvirt::virt::VirtHypervisor;
use crate::libvirt::{DomainInfo, Hypervisor, LibvirtError};
use crate::request;
use crate::usage::unix_now;
use crate::usage::Ledger;
use crate::xml::compose::HostdevTemplate;

/// A message to the watcher.
#[derive(Debug)]
pub enum Msg {
    /// An event from connection number `generation`.
    Event {
        /// Which connection sent it (events of an old one are ignored).
        generation: u64,
        /// The event.
        event: LibvirtEvent,
    },
    /// Re-read one domain now (after an API attach/detach).
    Refresh(String),
    /// Reconcile everything now.
    Reconcile,
    /// Stop.
    Shutdown,
}

/// How the watcher runs.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// libvirt URI.
    pub uri: String,
    /// Host root.
    pub host_root: PathBuf,
    /// The usage ledger.
    pub ledger: Ledger,
    /// The health file: quarantines, and where released GPUs' checks go.
    pub health: HealthStore,
    /// Config (owners' rules).
    pub config: GpupassConfig,
    /// Time between full reconciles.
    pub reconcile_every: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Complete or remove partly attached GPUs (`serve.repair_partial`); `None`: report only.
    pub repair: Option<RepairOptions>,
}

/// How the agent repairs a GPU a domain holds only part of.
#[derive(Debug, Clone)]
pub struct RepairOptions {
    /// Complete or detach.
    pub mode: RepairPartial,
    /// The run dir (host lock).
    pub run_dir: PathBuf,
    /// How the attach or detach runs.
    pub assign: AssignOptions,
}

/// How long a repair waits for the host lock before leaving it to the next reconcile.
const REPAIR_LOCK_WAIT: Duration = Duration::from_secs(5);

impl RepairOptions {
    /// From `serve.repair_partial`; `None` when it is `off`.
    pub fn from_config(
        config: &GpupassConfig,
        run_dir: &std::path::Path,
        template: &HostdevTemplate,
        ledger: &Ledger,
        manage_drivers: bool,
    ) -> Option<Self> {
        let mode = config.serve.repair_partial;
        (mode != RepairPartial::Off).then(|| RepairOptions {
            mode,
            run_dir: run_dir.to_owned(),
            assign: AssignOptions {
                template: template.clone(),
                impact: None,
                detach_timeout: Duration::from_secs(30),
                leases: Some(LeaseStore::new(run_dir)),
                manage_drivers,
                config: config.clone(),
                ledger: Some(ledger.clone()),
            },
        })
    }
}

/// The shared state: readers take the current snapshot (an `Arc` clone, no copy); the watcher
/// changes it copy-on-write, so a reader never sees half an update.
pub type Shared = Arc<RwLock<Arc<Snapshot>>>;

/// The current snapshot.
pub fn current(s: &Shared) -> Arc<Snapshot> {
    Arc::clone(&s.read().unwrap_or_else(|e| e.into_inner()))
}

/// Changes the snapshot.
fn update<R>(s: &Shared, f: impl FnOnce(&mut Snapshot) -> R) -> R {
    let mut g = s.write().unwrap_or_else(|e| e.into_inner());
    f(Arc::make_mut(&mut g))
}

/// Why the current connection has to be given up.
#[derive(Debug)]
struct Lost(String);

/// First wait before reconnecting.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// When the next full reconcile is due: `every` from now, or in a day when `every` runs past
/// what `Instant` can hold (the CLI and the config bound it; this never panics regardless).
fn next_reconcile(every: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(every)
        .unwrap_or_else(|| now + Duration::from_secs(86_400))
}

/// How long to wait before the next connection attempt (pure): the first wait after a
/// connection that worked (or at the very start), else double the last one, up to `max`.
fn wait_before_retry(last: Option<Duration>, had_connection: bool, max: Duration) -> Duration {
    match (last, had_connection) {
        (Some(prev), false) => (prev * 2).min(max),
        _ => FIRST_BACKOFF,
    }
}

/// The watcher's loop; returns on `Msg::Shutdown`.
pub fn run(opts: WatchOptions, shared: Shared, tx: Sender<Msg>, rx: Receiver<Msg>) {
    let mut generation: u64 = 0;
    let mut connected_before = false;
    let mut last_wait = None;
    loop {
        generation += 1;
        let mut had_connection = false;
        let result =
            connect(&opts, &shared, &tx, generation, connected_before).and_then(|(hv, sub)| {
                had_connection = true;
                connected_before = true;
                serve_connection(&opts, &shared, &rx, &hv, sub, generation)
            });
        let Err(Lost(why)) = result else { return };
        mark_stale(&shared, &why);
        let wait = wait_before_retry(last_wait, had_connection, opts.max_backoff);
        last_wait = Some(wait);
        tracing::warn!(uri = %opts.uri, "libvirt: {why}; retrying in {wait:?}");
        // Wait, but stop at once when asked. Events of the old connection and refreshes are
        // dropped: the reconcile after reconnecting covers them.
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

fn mark_stale(shared: &Shared, why: &str) {
    update(shared, |s| {
        if s.connected || s.stale_since.is_none() {
            s.stale_since = Some(unix_now());
        }
        s.connected = false;
        s.last_error = Some(why.to_owned());
    });
}

fn connect(
    opts: &WatchOptions,
    shared: &Shared,
    tx: &Sender<Msg>,
    generation: u64,
    reconnect: bool,
) -> Result<(VirtHypervisor, events::Subscription), Lost> {
    let hv = VirtHypervisor::open(&opts.uri).map_err(|e| Lost(e.to_string()))?;
    let tx = tx.clone();
    let sink: events::EventSink = Arc::new(move |event| {
        // The receiver only goes away at shutdown.
        let _ = tx.send(Msg::Event { generation, event });
    });
    let sub = events::subscribe(&hv, sink).map_err(|e| Lost(e.to_string()))?;
    if reconnect {
        update(shared, |s| s.counters.reconnects += 1);
    }
    tracing::info!(uri = %opts.uri, "libvirt connected; reconciling");
    Ok((hv, sub))
}

fn serve_connection(
    opts: &WatchOptions,
    shared: &Shared,
    rx: &Receiver<Msg>,
    hv: &VirtHypervisor,
    sub: events::Subscription,
    generation: u64,
) -> Result<(), Lost> {
    // Registrations go before the connection does.
    let _sub = sub;
    reconcile(opts, shared, hv)?;
    repair(opts, shared, hv)?;
    let mut next = next_reconcile(opts.reconcile_every);
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        let msg = match rx.recv_timeout(wait) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => Msg::Reconcile,
            Err(RecvTimeoutError::Disconnected) => Msg::Shutdown,
        };
        match msg {
            Msg::Shutdown => return Ok(()),
            Msg::Reconcile => {
                reconcile(opts, shared, hv)?;
                repair(opts, shared, hv)?;
                next = next_reconcile(opts.reconcile_every);
            }
            Msg::Event { generation: g, .. } if g != generation => {}
            Msg::Event {
                event: LibvirtEvent::Closed { reason },
                ..
            } => return Err(Lost(format!("connection closed (reason {reason})"))),
            Msg::Event {
                event: LibvirtEvent::Domain { name, kind },
                ..
            } => {
                tracing::debug!(domain = %name, ?kind, "libvirt event");
                update(shared, |s| s.counters.events += 1);
                refresh(opts, shared, hv, &name)?;
            }
            Msg::Refresh(name) => refresh(opts, shared, hv, &name)?,
        }
    }
}

/// Errors that may mean the connection is gone (a full reconcile tells), as opposed to a domain
/// that vanished or refused one call.
fn lost(e: &LibvirtError) -> bool {
    matches!(e, LibvirtError::Connect { .. } | LibvirtError::Call { .. })
}

fn read_view(
    hv: &dyn Hypervisor,
    info: &DomainInfo,
    config: &GpupassConfig,
) -> Result<Option<DomainView>, LibvirtError> {
    let dev = match assign::read_domain(hv, info) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(None),
        Err(AssignError::Libvirt(e)) => return Err(e),
        Err(e) => {
            // Listed without hostdevs. Allocation never trusts this view: attach and detach read
            // libvirt themselves and refuse while a domain XML is unreadable.
            tracing::warn!(domain = %info.name, error = %e, "unreadable domain XML");
            DomainDevices::default()
        }
    };
    Ok(Some(DomainView {
        name: info.name.clone(),
        uuid: dev.uuid,
        active: info.active,
        persistent: info.persistent,
        owner: request::owner_for(&info.name, dev.owner.as_deref(), config),
        live: dev.live,
        config: dev.config,
    }))
}

/// Rebuilds everything from libvirt and the host root.
fn reconcile(opts: &WatchOptions, shared: &Shared, hv: &dyn Hypervisor) -> Result<(), Lost> {
    let t0 = Instant::now();
    let fail = |shared: &Shared, e: String| {
        update(shared, |s| s.counters.reconcile_failures += 1);
        Lost(e)
    };
    let inventory = match discover(&Sysfs::new(&opts.host_root)) {
        Ok(mut i) => {
            i.quarantine = quarantined(opts, &current(shared).inventory);
            Arc::new(i)
        }
        Err(e) => {
            // The host root is not libvirt: keep the last inventory and say so.
            tracing::warn!(error = %e, "reading the host root failed; keeping the last inventory");
            Arc::clone(&current(shared).inventory)
        }
    };
    // The ledger's end before libvirt is read (a stat, not a read): what the hook writes after
    // this is newer than the views below (sync_usage).
    let seen = opts.ledger.end();
    let infos = hv.domains().map_err(|e| fail(shared, e.to_string()))?;
    let previous = current(shared);
    let mut domains = BTreeMap::new();
    // Names and keys of domains kept at their last view: their sessions are left alone.
    let mut stale = BTreeSet::new();
    for info in &infos {
        match read_view(hv, info, &opts.config) {
            Ok(Some(v)) => {
                domains.insert(v.name.clone(), v);
            }
            Ok(None) => {}
            // The listing just worked, so the connection is alive: one domain that cannot be
            // read keeps its last known view rather than sending the agent into reconnects.
            Err(e) => {
                tracing::warn!(domain = %info.name, error = %e, "cannot read; keeping its last view");
                if let Some(v) = previous.domains.get(&info.name) {
                    stale.insert(v.key());
                    domains.insert(v.name.clone(), v.clone());
                }
                stale.insert(info.name.clone());
            }
        }
    }
    let written = sync_usage(opts, &domains, &inventory, None, seen, &stale);
    let inventory = with_current_quarantine(opts, inventory);
    let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    let n = domains.len();
    update(shared, |s| {
        s.inventory = inventory;
        s.domains = domains;
        s.connected = true;
        s.stale_since = None;
        s.last_error = None;
        s.reconciled_at = Some(unix_now());
        s.counters.reconciles += 1;
        s.counters.usage_records += written;
        s.counters.last_reconcile_ms = ms;
    });
    tracing::debug!(domains = n, ms, "reconciled");
    Ok(())
}

/// Completes or removes the GPUs domains hold only part of, when configured and the last
/// reconcile saw any. Under the host lock (a CLI attach in flight finishes first, and the
/// executor re-reads libvirt); when the lock is busy, the next reconcile tries again.
fn repair(opts: &WatchOptions, shared: &Shared, hv: &dyn Hypervisor) -> Result<(), Lost> {
    let Some(r) = &opts.repair else {
        return Ok(());
    };
    let snap = current(shared);
    let holdings = snap.holdings();
    if !snap
        .inventory
        .gpus
        .iter()
        .any(|g| !holdings.partial(&g.functions).is_empty())
    {
        return Ok(());
    }
    let lock = match HostLock::acquire(&r.run_dir, REPAIR_LOCK_WAIT) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "partly attached GPU not repaired now");
            return Ok(());
        }
    };
    let outcomes = match assign::repair_partials(hv, &snap.inventory, &lock, r.mode, &r.assign) {
        Ok(o) => o,
        Err(AssignError::Libvirt(e)) if lost(&e) => return Err(Lost(e.to_string())),
        Err(e) => {
            tracing::warn!(error = %e, "partly attached GPUs not repaired");
            return Ok(());
        }
    };
    drop(lock);
    for o in &outcomes {
        match &o.result {
            Ok(rep) => tracing::info!(
                domain = %o.domain, gpu = %o.gpu, action = rep.action,
                "partly attached GPU repaired"
            ),
            Err(e) => tracing::warn!(
                domain = %o.domain, gpu = %o.gpu, error = %e,
                "partly attached GPU could not be repaired"
            ),
        }
    }
    let domains: BTreeSet<&str> = outcomes.iter().map(|o| o.domain.as_str()).collect();
    for d in domains {
        refresh(opts, shared, hv, d)?;
    }
    Ok(())
}

/// Re-reads one domain after an event.
fn refresh(
    opts: &WatchOptions,
    shared: &Shared,
    hv: &dyn Hypervisor,
    name: &str,
) -> Result<(), Lost> {
    let seen = opts.ledger.end();
    let view = match hv.domain(name) {
        Ok(info) => read_view(hv, &info, &opts.config),
        Err(LibvirtError::UnknownDomain { .. }) => Ok(None),
        Err(e) => Err(e),
    };
    let view = match view {
        Ok(v) => v,
        Err(e) if lost(&e) => {
            // One domain's call failed: a full reconcile tells a dead connection from a domain
            // that vanished mid-read.
            tracing::debug!(domain = %name, error = %e, "refresh failed; reconciling");
            return reconcile(opts, shared, hv);
        }
        Err(e) => {
            tracing::warn!(domain = %name, error = %e, "refresh failed");
            return Ok(());
        }
    };
    // Only this domain's sessions are in scope, so only it needs to be looked at.
    let (one, scope, inventory) = update(shared, |s| {
        let mut scope: BTreeSet<String> = [name.to_owned()].into();
        scope.extend(s.domains.get(name).map(DomainView::key));
        let mut one = BTreeMap::new();
        match view {
            Some(v) => {
                scope.insert(v.key());
                one.insert(name.to_owned(), v.clone());
                s.domains.insert(name.to_owned(), v);
            }
            None => {
                s.domains.remove(name);
            }
        }
        (one, scope, Arc::clone(&s.inventory))
    });
    let written = sync_usage(opts, &one, &inventory, Some(&scope), seen, &BTreeSet::new());
    let checked = with_current_quarantine(opts, Arc::clone(&inventory));
    update(shared, |s| {
        s.counters.usage_records += written;
        if !Arc::ptr_eq(&checked, &inventory) && Arc::ptr_eq(&s.inventory, &inventory) {
            s.inventory = checked;
        }
    });
    Ok(())
}

/// The quarantines of the health file; on a read error, `last`'s (logged).
fn quarantined(
    opts: &WatchOptions,
    last: &Inventory,
) -> std::collections::BTreeMap<crate::model::PciAddress, crate::health::Quarantine> {
    match opts.health.read() {
        Ok(s) => s.quarantined,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the quarantined GPUs; keeping the last known");
            last.quarantine.clone()
        }
    }
}

/// `inv` with the health file's quarantines of now, when they changed (a check of a released
/// GPU, a `gpupass quarantine` by hand); the same `Arc` when not.
fn with_current_quarantine(opts: &WatchOptions, inv: Arc<Inventory>) -> Arc<Inventory> {
    let q = quarantined(opts, &inv);
    if q == inv.quarantine {
        return inv;
    }
    let mut changed = (*inv).clone();
    changed.quarantine = q;
    Arc::new(changed)
}

/// Checks the health of GPUs a domain gave back (a stop, a detach): quarantines those that
/// fail and returns every one of them that is quarantined now. Failures to check are logged.
fn check_released(
    opts: &WatchOptions,
    inv: &Inventory,
    domain: &str,
    gpus: &[crate::model::PciAddress],
) -> Vec<crate::model::PciAddress> {
    let targets: Vec<Target> = gpus
        .iter()
        .map(|g| Target {
            gpu: *g,
            functions: inv
                .gpu(*g)
                .map_or_else(|| vec![*g], |x| x.functions.clone()),
        })
        .collect();
    let by = format!("agent, after {domain} released it");
    health_check::check_released(
        &Sysfs::new(&opts.host_root),
        &opts.health,
        &targets,
        domain,
        &by,
        unix_now(),
    )
}

/// Writes the usage records the ledger lacks; failures are logged (the hook's records stand,
/// and the next reconcile tries again). `seen` is the ledger's end from before `domains`
/// were read from libvirt: a session the hook opened or closed since then is newer than these
/// views and is left as the hook wrote it (else a domain destroyed between the read and the
/// write would get a second session, opened and closed by the agent). Sessions of the domains
/// named in `stale` (kept at their last view because their XML could not be read) are left as
/// they are: what they run now is not known.
fn sync_usage(
    opts: &WatchOptions,
    domains: &BTreeMap<String, DomainView>,
    inv: &Inventory,
    scope: Option<&BTreeSet<String>>,
    seen: Result<u64, crate::usage::UsageError>,
    stale: &BTreeSet<String>,
) -> u64 {
    let seen = match seen {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the usage ledger");
            return 0;
        }
    };
    // Per session key: the ledger's end after this pass's own last write for it.
    let mut seen_for: BTreeMap<String, u64> = BTreeMap::new();
    let open = match opts.ledger.read() {
        Ok(r) => open_sessions(&r.records),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the usage ledger");
            return 0;
        }
    };
    let now = unix_now();
    let mut written = 0;
    let ops = usage_ops(domains, inv, &open, scope);
    for op in &ops {
        let (domain, key) = match &op {
            UsageOp::Start { domain, key, .. } | UsageOp::Stop { domain, key } => (domain, key),
        };
        if stale.contains(domain) || stale.contains(key) {
            continue;
        }
        let key = key.clone();
        let since = seen_for.get(&key).copied().unwrap_or(seen);
        let r = match op {
            UsageOp::Start {
                domain,
                key,
                gpus,
                owner,
            } => opts
                .ledger
                .start_since(domain, key, gpus, owner.as_deref(), now, since),
            UsageOp::Stop { domain, key } => {
                // What the session held and its next one (a live detach) does not.
                let kept: BTreeSet<_> = ops
                    .iter()
                    .filter_map(|o| match o {
                        UsageOp::Start { key: k, gpus, .. } if k == key => Some(gpus),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                let released: Vec<_> = open
                    .get(key)
                    .map(|(_, g)| g.iter().filter(|g| !kept.contains(g)).copied().collect())
                    .unwrap_or_default();
                let quarantined = check_released(opts, inv, domain, &released);
                opts.ledger
                    .stop_since_marked(domain, key, now, since, &quarantined)
            }
        };
        match r {
            Ok(Some(len)) => {
                written += 1;
                seen_for.insert(key, len);
                tracing::info!(?op, "usage record written");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "usage record not written"),
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::fake::{FakeDomain, FakeHypervisor};

    fn a(s: &str) -> crate::model::PciAddress {
        s.parse().unwrap()
    }

    /// Watcher options on the 8-GPU HGX fixture with the ledger in `state_dir`.
    fn hgx_options(state_dir: &std::path::Path) -> WatchOptions {
        WatchOptions {
            uri: "fake:///".into(),
            host_root: concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hosts/hgx-8gpu").into(),
            ledger: Ledger::new(state_dir),
            health: HealthStore::new(state_dir),
            config: GpupassConfig::default(),
            reconcile_every: Duration::from_secs(60),
            max_backoff: Duration::from_secs(30),
            repair: None,
        }
    }

    #[test]
    fn reconcile_rebuilds_and_keeps_an_unreadable_domains_last_view() {
        let dir = tempfile::tempdir().unwrap();
        let opts = hgx_options(dir.path());
        let dom = |addr: &str| FakeDomain {
            active: false,
            persistent: true,
            config: [a(addr)].into(),
            ..FakeDomain::default()
        };
        let hv = FakeHypervisor::default()
            .with("vm1", dom("0000:18:00.0"))
            .with("vm2", dom("0000:2a:00.0"));
        let shared: Shared = Default::default();
        reconcile(&opts, &shared, &hv).unwrap();
        let s = current(&shared);
        assert!(s.fresh());
        assert_eq!(s.inventory.gpus.len(), 9);
        assert_eq!(s.domains["vm2"].config, vec![a("0000:2a:00.0")]);

        // vm1 changes; vm2's XML cannot be read: vm1 is current, vm2 keeps its last view, and
        // the connection is not given up.
        hv.domains.borrow_mut().get_mut("vm1").unwrap().config = [a("0000:3a:00.0")].into();
        *hv.fail_xml.borrow_mut() = Some("vm2".into());
        reconcile(&opts, &shared, &hv).unwrap();
        let s = current(&shared);
        assert_eq!(s.domains["vm1"].config, vec![a("0000:3a:00.0")]);
        assert_eq!(s.domains["vm2"].config, vec![a("0000:2a:00.0")]);
        assert_eq!(s.counters.reconciles, 2);

        // An event for a domain that is gone removes it.
        hv.domains.borrow_mut().remove("vm1");
        refresh(&opts, &shared, &hv, "vm1").unwrap();
        assert!(!current(&shared).domains.contains_key("vm1"));
    }

    #[test]
    fn a_stop_the_agent_records_checks_what_was_released_and_marks_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = hgx_options(dir.path());
        // 0000:01:00.0 of this host has no reset method; 0000:02:00.0 is healthy.
        opts.host_root = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hosts/health-no-reset"
        )
        .into();
        let running = |addrs: &[&str]| FakeDomain {
            active: true,
            persistent: true,
            live: addrs.iter().map(|x| a(x)).collect(),
            ..FakeDomain::default()
        };
        let hv = FakeHypervisor::default().with(
            "vm1",
            running(&[
                "0000:01:00.0",
                "0000:01:00.1",
                "0000:02:00.0",
                "0000:02:00.1",
            ]),
        );
        let shared: Shared = Default::default();
        reconcile(&opts, &shared, &hv).unwrap();
        assert!(
            opts.health.read().unwrap().quarantined.is_empty(),
            "nothing released yet"
        );
        // A live detach of the healthy GPU (the hook never sees it): checked, nothing found.
        hv.domains
            .borrow_mut()
            .insert("vm1".into(), running(&["0000:01:00.0", "0000:01:00.1"]));
        refresh(&opts, &shared, &hv, "vm1").unwrap();
        assert!(opts.health.read().unwrap().quarantined.is_empty());
        // The domain stops while no hook ran: the agent closes the session and checks the GPU.
        hv.domains.borrow_mut().get_mut("vm1").unwrap().active = false;
        refresh(&opts, &shared, &hv, "vm1").unwrap();
        let q = opts.health.read().unwrap().quarantined;
        assert_eq!(q.keys().copied().collect::<Vec<_>>(), [a("0000:01:00.0")]);
        assert!(q[&a("0000:01:00.0")].reason.contains("no reset method"));
        assert!(q[&a("0000:01:00.0")].by.starts_with("agent"));
        let s = current(&shared);
        assert!(
            s.inventory.quarantine.contains_key(&a("0000:01:00.0")),
            "the API sees it at once"
        );
        let last = opts.ledger.read().unwrap().records.pop().unwrap();
        assert!(
            matches!(&last, crate::usage::Record::Stop { quarantined, .. } if quarantined == &[a("0000:01:00.0")]),
            "{last:?}"
        );
    }

    #[test]
    fn a_domain_kept_at_its_last_view_gets_no_usage_record() {
        let dir = tempfile::tempdir().unwrap();
        let opts = hgx_options(dir.path());
        let hv = FakeHypervisor::default().with(
            "vm1",
            FakeDomain {
                active: true,
                persistent: true,
                live: [a("0000:18:00.0")].into(),
                ..FakeDomain::default()
            },
        );
        let shared: Shared = Default::default();
        reconcile(&opts, &shared, &hv).unwrap();
        let key = current(&shared).domains["vm1"].key();
        assert_eq!(
            opts.ledger.read().unwrap().records.len(),
            1,
            "the running session"
        );

        // vm1 stops (the hook closes its session), and its XML cannot be read at the next
        // reconcile: the agent keeps its last view (running with the GPU), but must not open a
        // session from it.
        assert!(opts.ledger.stop("vm1", &key, unix_now()).unwrap());
        {
            let mut d = hv.domains.borrow_mut();
            let vm1 = d.get_mut("vm1").unwrap();
            vm1.active = false;
            vm1.live.clear();
        }
        *hv.fail_xml.borrow_mut() = Some("vm1".into());
        reconcile(&opts, &shared, &hv).unwrap();
        assert!(
            current(&shared).domains["vm1"].active,
            "the last view is kept"
        );
        assert_eq!(
            opts.ledger.read().unwrap().records.len(),
            2,
            "start and the hook's stop only"
        );
    }

    #[test]
    fn a_partly_attached_gpu_is_reported_and_repaired_only_when_configured() {
        let dir = tempfile::tempdir().unwrap();
        let root = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hosts/consumer-4fn"
        );
        let mut opts = WatchOptions {
            uri: "fake:///".into(),
            host_root: root.into(),
            ledger: Ledger::new(dir.path()),
            health: HealthStore::new(dir.path()),
            config: GpupassConfig::default(),
            reconcile_every: Duration::from_secs(60),
            max_backoff: Duration::from_secs(30),
            repair: None,
        };
        let half = FakeDomain {
            persistent: true,
            config: [a("0000:01:00.0"), a("0000:01:00.1")].into(),
            ..FakeDomain::default()
        };
        let hv = FakeHypervisor::default().with("vm", half);
        let shared: Shared = Default::default();
        reconcile(&opts, &shared, &hv).unwrap();
        repair(&opts, &shared, &hv).unwrap();
        let s = current(&shared);
        let report = crate::agent::api::list_report(&s, "fake:///");
        let g = report
            .gpus
            .iter()
            .find(|g| g.address == a("0000:01:00.0"))
            .unwrap();
        assert_eq!(g.state, "partial");
        let p = &g.partial.as_ref().unwrap()[0];
        assert_eq!(p.missing, [a("0000:01:00.2"), a("0000:01:00.3")]);
        let metrics =
            crate::agent::metrics::render(&s, None, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        assert!(
            metrics.contains("gpupass_gpus{state=\"partial\"} 1"),
            "{metrics}"
        );
        assert!(hv.calls.borrow().is_empty(), "report only by default");

        let config = GpupassConfig::parse("[serve]\nrepair_partial = \"complete\"\n").unwrap();
        let template = HostdevTemplate::builtin();
        opts.repair = RepairOptions::from_config(
            &config,
            &dir.path().join("run"),
            &template,
            &opts.ledger,
            false,
        );
        repair(&opts, &shared, &hv).unwrap();
        assert_eq!(
            *hv.calls.borrow(),
            [
                "attach vm 0000:01:00.2 config",
                "attach vm 0000:01:00.3 config"
            ]
        );
        let s = current(&shared);
        assert_eq!(
            s.domains["vm"].config.len(),
            4,
            "refreshed after the repair"
        );
        assert!(GpupassConfig::parse("[serve]\nrepair_partial = \"sometimes\"\n").is_err());
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_restarts_after_a_connection() {
        let max = Duration::from_secs(30);
        let mut last = None;
        let mut seen = Vec::new();
        for _ in 0..10 {
            let w = wait_before_retry(last, false, max);
            last = Some(w);
            seen.push(w.as_millis());
        }
        assert_eq!(
            seen,
            vec![250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(wait_before_retry(last, true, max), FIRST_BACKOFF);
    }
}
