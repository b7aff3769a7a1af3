//! The IO edge of hook mode: `transform` and each qemu hook operation, over the host root, the
//! run dir (lock, leases) and the state dir (ledger). Never calls libvirt: who holds what comes
//! from libvirt's own files (`libvirt::files`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::alloc::lease::{self, Lease, LeaseStore};
use crate::alloc::lock::HostLock;
use crate::alloc::plan::{AttachRequest, Holdings};
use crate::assign::preferred_nodes_of;
use crate::cloudstack::complete;
use crate::config::GpupassConfig;
use crate::cpuset;
use crate::health::{self, store::HealthStore};
use crate::hook::resolve::resolve;
use crate::hook::HookError;
use crate::host::discover::{discover_with, Scope};
use crate::host::readiness::verdict;
use crate::host::sysfs::Sysfs;
use crate::libvirt::files;
use crate::limits;
use crate::model::{PciAddress, PciClass};
use crate::request;
use crate::usage::{unix_now, Ledger};
use crate::xml::compose::HostdevTemplate;
use crate::xml::rewrite::{apply, injected_block, scan, DomainDoc, Edit};

/// Where hook mode reads and writes.
#[derive(Debug, Clone)]
pub struct HookEnv {
    /// The host root.
    pub host_root: PathBuf,
    /// Lock and leases.
    pub run_dir: PathBuf,
    /// The usage ledger.
    pub state_dir: PathBuf,
    /// The config.
    pub config: GpupassConfig,
    /// The hostdev template.
    pub template: HostdevTemplate,
    /// How long a transform's lease lasts.
    pub lease_ttl: Duration,
    /// How long to wait for the host lock.
    pub lock_timeout: Duration,
}

/// The usage session key.
fn lease_key(doc: &DomainDoc<'_>) -> String {
    lease::key(doc.uuid.as_deref(), &doc.name)
}

/// Resolves the domain's request and rewrites its XML: `Ok(None)` when nothing changes (no
/// request, or one already satisfied). Takes the host lock and leases what it chose. A GPU the
/// domain got from someone else (CloudStack writes one hostdev for the GPU's own function) is
/// completed instead, and no other GPU is allocated for a config rule.
pub fn transform(
    env: &HookEnv,
    input: &str,
    override_request: Option<AttachRequest>,
) -> Result<Option<String>, HookError> {
    transform_keeping(env, input, override_request, &mut None)
}

/// [`transform`], then the output fitted to its GPUs (`fit`), with the inventory the transform
/// read (one discovery): `Ok(None)` when nothing changes.
pub fn transform_and_fit(
    env: &HookEnv,
    input: &str,
    override_request: Option<AttachRequest>,
    fit: bool,
) -> Result<Option<String>, HookError> {
    let mut inv = None;
    let out = transform_keeping(env, input, override_request, &mut inv)?;
    if !fit {
        return Ok(out);
    }
    let fitted = fit_domain_with(env, out.as_deref().unwrap_or(input), inv.as_ref())?;
    Ok(fitted.or(out))
}

fn transform_keeping(
    env: &HookEnv,
    input: &str,
    override_request: Option<AttachRequest>,
    keep: &mut Option<crate::host::discover::Inventory>,
) -> Result<Option<String>, HookError> {
    let doc = scan(input)?;
    // A request the domain or the caller made itself; a config rule's yields to a GPU the domain
    // already got from elsewhere.
    let explicit = override_request.is_some() || doc.request.is_some();
    let request = match override_request {
        Some(r) => Some(r),
        None => request::for_domain(&doc.name, doc.request.as_ref(), &env.config)?,
    };
    let foreign = complete::has_foreign_hostdev(&doc);
    if request.is_none() && !foreign {
        return Ok(None);
    }
    let _lock = HostLock::acquire(&env.run_dir, env.lock_timeout)?;
    let sysfs = Sysfs::new(&env.host_root);
    let mut inv = discover_with(&sysfs, &Scope::Gpus, false)?.with_quarantine(&env.state_dir)?;
    let mut holdings: Holdings =
        files::all_holdings(&env.host_root, &doc.name, Some(&env.run_dir))?;
    let store = LeaseStore::new(&env.run_dir);
    let t = unix_now();
    store.holdings_except(&doc.name, doc.uuid.as_deref(), t, &mut holdings);
    if foreign && !explicit {
        let c = complete::plan(&inv, &holdings, &doc)?;
        if !c.gpus.is_empty() {
            if request.is_some() {
                tracing::info!(domain = %doc.name, "the domain has GPUs of its own: completed, the config rule's request not applied");
            }
            let out = complete_gpus(env, input, &doc, &c, &store, t);
            *keep = Some(inv);
            return out;
        }
    }
    let Some(request) = request else {
        return Ok(None);
    };
    let pin = &doc.pinning;
    // The NUMA preference needs each node's CPUs only for a domain pinned by CPU, not by node.
    let by_node = pin
        .numa_nodeset
        .as_deref()
        .is_some_and(|s| cpuset::parse(s).is_ok());
    if !by_node && (pin.vcpu_cpuset.is_some() || !pin.vcpupin_cpusets.is_empty()) {
        inv.numa_cpus = sysfs.numa_cpus()?;
    }
    let prefer = preferred_nodes_of(
        &inv,
        pin.numa_nodeset.as_deref(),
        pin.vcpu_cpuset.iter().chain(&pin.vcpupin_cpusets),
    );
    let res = resolve(&inv, &holdings, &doc, &request, &prefer)?;
    let owner = request::owner_for(
        &doc.name,
        doc.request.as_ref().and_then(|r| r.owner.as_deref()),
        &env.config,
    );
    check_owner_limit(
        env,
        &inv,
        &holdings,
        &doc.name,
        owner.as_deref(),
        &res.functions_after,
    )?;
    if !res.functions_after.is_empty() {
        store.put(
            &Lease {
                domain: doc.name.clone(),
                uuid: doc.uuid.as_deref().and_then(lease::normalize_uuid),
                functions: res.functions_after.clone(),
                expires: t.saturating_add(env.lease_ttl.as_secs().min(lease::MAX_LEASE_SECONDS)),
                owner: owner.clone(),
            },
            t,
        )?;
    }
    if !res.changes() {
        *keep = Some(inv);
        return Ok(None);
    }
    let mut edits: Vec<Edit> = res
        .remove
        .iter()
        .map(|i| doc.removal(&doc.hostdevs[*i]))
        .collect();
    let blocks: Vec<String> = res
        .add
        .iter()
        .map(|f| injected_block(&env.template, *f))
        .collect();
    edits.extend(doc.insertion(&blocks));
    for f in &res.add {
        tracing::info!(domain = %doc.name, bdf = %f, "hostdev added");
    }
    *keep = Some(inv);
    Ok(Some(apply(input, &edits)))
}

/// Adds the missing functions of the GPUs the domain got from elsewhere (a [`complete::plan`]),
/// leasing them all to the domain until it starts; `Ok(None)` when they are whole already.
fn complete_gpus(
    env: &HookEnv,
    input: &str,
    doc: &DomainDoc<'_>,
    c: &complete::Completion,
    store: &LeaseStore,
    t: u64,
) -> Result<Option<String>, HookError> {
    store.put(
        &Lease {
            domain: doc.name.clone(),
            uuid: doc.uuid.as_deref().and_then(lease::normalize_uuid),
            functions: c.functions_after.clone(),
            expires: t.saturating_add(env.lease_ttl.as_secs().min(lease::MAX_LEASE_SECONDS)),
            owner: None,
        },
        t,
    )?;
    if c.add.is_empty() {
        return Ok(None);
    }
    let blocks: Vec<String> = c
        .add
        .iter()
        .map(|f| injected_block(&env.template, *f))
        .collect();
    for f in &c.add {
        tracing::info!(domain = %doc.name, bdf = %f, "companion hostdev added");
    }
    let out = apply(
        input,
        &doc.insertion(&blocks).into_iter().collect::<Vec<_>>(),
    );
    // `transform_and_fit` fits the completed GPUs like any others (never at migrate/restore: a
    // fit there would change the running guest's machine).
    Ok(Some(out))
}

/// Fits a domain XML to the GPUs it holds (the 64-bit window, phys-bits, root ports, slot
/// layout; see `fit`): `Ok(None)` when nothing changes. A fit that cannot work on this host is
/// left to `prepare`, which says why; the XML goes through unchanged.
pub fn fit_domain(env: &HookEnv, xml: &str) -> Result<Option<String>, HookError> {
    fit_domain_with(env, xml, None)
}

/// [`fit_domain`] with an inventory already read (one that holds the domain's GPUs), else one
/// read around the domain's hostdevs.
fn fit_domain_with(
    env: &HookEnv,
    xml: &str,
    inv: Option<&crate::host::discover::Inventory>,
) -> Result<Option<String>, HookError> {
    let layout = crate::fit::domain::scan(xml)?;
    let sources: Vec<PciAddress> = layout.hostdevs.iter().map(|h| h.source).collect();
    if sources.is_empty() {
        return Ok(None);
    }
    let sysfs = Sysfs::new(&env.host_root);
    let around;
    let inv = match inv {
        Some(i) if sources.iter().all(|s| i.device(*s).is_some()) => i,
        _ => {
            around = discover_with(&sysfs, &Scope::Around(sources), false)?;
            &around
        }
    };
    let gpus = crate::fit::layout_gpus(inv, &layout, &[]);
    if gpus.is_empty() {
        return Ok(None);
    }
    let bars = crate::fit::read_bars(&sysfs, inv, &gpus)?;
    let vendor = crate::fit::vendor_options(&env.config, &layout.name, inv, &gpus);
    let fitted = crate::fit::fit_layout(&layout, &bars, sysfs.host_phys_bits()?, vendor)?;
    for c in &fitted.plan.changes {
        tracing::info!(domain = %layout.name, "fit: {}", c.describe());
    }
    Ok(fitted.xml)
}

/// Refuses when the owner's limit would be exceeded by the domain holding the GPUs of
/// `functions` (its own GPUs are counted once).
fn check_owner_limit(
    env: &HookEnv,
    inv: &crate::host::discover::Inventory,
    holdings: &Holdings,
    domain: &str,
    owner: Option<&str>,
    functions: &[PciAddress],
) -> Result<(), HookError> {
    let Some((owner, limit)) = limits::owner_limit(&env.config, owner) else {
        return Ok(());
    };
    let gpus: Vec<PciAddress> = functions
        .iter()
        .filter_map(|f| inv.gpu(*f).map(|g| g.address))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let used = limits::period_use(limit, owner, Some(&Ledger::new(&env.state_dir)), unix_now())?;
    let rule_owner = |d: &str| env.config.rule_owner(d).map(str::to_owned);
    limits::check(
        inv,
        holdings,
        domain,
        owner,
        limit,
        &gpus,
        used,
        &rule_owner,
    )?;
    Ok(())
}

/// `prepare begin`: every hostdev must exist here, be passable, and be free of other running
/// domains and of other domains' leases; the domain's request must be met. Returns warnings;
/// an `Err` blocks the start.
pub fn prepare(env: &HookEnv, input: &str) -> Result<Vec<String>, HookError> {
    let doc = scan(input)?;
    let sources = doc.pci_sources();
    let request = request::for_domain(&doc.name, doc.request.as_ref(), &env.config)?;
    if sources.is_empty() && request.is_none() {
        return Ok(Vec::new());
    }
    let blocked = |msg: String| HookError::Blocked(msg);
    // Only the domain's own devices and what judging them needs: its slot siblings, IOMMU
    // groups and the bridges above (libvirt waits for this on every start).
    let inv = discover_with(
        &Sysfs::new(&env.host_root),
        &Scope::Around(sources.clone()),
        false,
    )?
    .with_quarantine(&env.state_dir)?;
    if !sources.is_empty() && !inv.iommu.enabled() {
        return Err(blocked(
            "the IOMMU is off on this host: no PCI device can be passed through".into(),
        ));
    }
    let mut running = files::running_holdings(&env.host_root, &doc.name, Some(&env.run_dir))?;
    LeaseStore::new(&env.run_dir).holdings_except(
        &doc.name,
        doc.uuid.as_deref(),
        unix_now(),
        &mut running,
    );
    let mut warnings = Vec::new();
    let present: BTreeSet<PciAddress> = sources.iter().copied().collect();
    let mut checked = BTreeSet::new();
    for s in &sources {
        if inv.device(*s).is_none() {
            return Err(blocked(format!(
                "hostdev {s} is not a PCI device on this host"
            )));
        }
        if let Some(h) = running.holders(&[*s]).first() {
            let who = match h.domain.strip_prefix("lease:") {
                Some(d) => format!("reserved for domain '{d}' (a transform in flight)"),
                None => format!("in use by running domain '{}'", h.domain),
            };
            return Err(blocked(format!("{s} is {who}")));
        }
        // Whole GPU and its SR-IOV VFs exclude each other (as `attach --vgpu vf` decides): a
        // VF whose PF a running domain has whole does not start.
        if let Some(pf) = inv.physfn(*s) {
            if let Some(h) = running.holders(&[pf]).first() {
                return Err(blocked(format!(
                    "{s} is an SR-IOV virtual function of {pf}, which running domain '{}' has whole",
                    h.domain
                )));
            }
        }
        let Some(gpu) = inv.gpu(*s) else {
            // Not a GPU function: existence and holders are all gpupass judges.
            continue;
        };
        if !checked.insert(gpu.address) {
            continue;
        }
        let v = verdict(&inv, gpu);
        if let Some(b) = v.blockers.first() {
            return Err(blocked(format!(
                "GPU {} cannot be passed through: {b}",
                gpu.address
            )));
        }
        let missing: Vec<String> = gpu
            .functions
            .iter()
            .filter(|f| !present.contains(f))
            .map(|f| f.to_string())
            .collect();
        if !missing.is_empty() {
            warnings.push(format!(
                "GPU {} is not whole in domain '{}': {} missing",
                gpu.address,
                doc.name,
                missing.join(", ")
            ));
        }
        if v.boot_vga {
            warnings.push(format!("GPU {} is the host's boot VGA", gpu.address));
        }
    }
    let owner = request::owner_for(
        &doc.name,
        doc.request.as_ref().and_then(|r| r.owner.as_deref()),
        &env.config,
    );
    if owner
        .as_deref()
        .is_some_and(|o| env.config.limits.contains_key(o))
    {
        // Judging a limit needs every GPU the owner's other running domains hold: read them all
        // (only when the owner has a limit, so the hook stays fast otherwise).
        let all = discover_with(&Sysfs::new(&env.host_root), &Scope::Gpus, false)?;
        check_owner_limit(env, &all, &running, &doc.name, owner.as_deref(), &sources)
            .map_err(|e| blocked(e.to_string()))?;
    }
    if !checked.is_empty() {
        let gpus: Vec<PciAddress> = checked.iter().copied().collect();
        let sysfs = Sysfs::new(&env.host_root);
        let bars = crate::fit::read_bars(&sysfs, &inv, &gpus)?;
        let fitted = crate::fit::fit_xml(input, &bars, sysfs.host_phys_bits()?)?;
        let p = &fitted.plan;
        let list = gpus
            .iter()
            .map(PciAddress::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(why) = &p.certain_failure {
            return Err(blocked(format!(
                "GPU {list} needs a {} 64-bit window that domain '{}' cannot give: {why} (gpupass fit {} --apply)",
                crate::fit::bars::human(p.need.total),
                doc.name,
                doc.name
            )));
        }
        if let Some(why) = &p.firmware_dependent {
            warnings.push(format!(
                "GPU {list} in domain '{}': {why}; the guest may leave BARs unassigned (gpupass fit {} --apply)",
                doc.name, doc.name
            ));
        }
    }
    if let Some(req) = request {
        let have: Vec<PciAddress> = inv
            .gpus
            .iter()
            .filter(|g| g.functions.iter().any(|f| present.contains(f)))
            .map(|g| g.address)
            .collect();
        match req {
            AttachRequest::Gpus(addrs) => {
                for a in addrs {
                    let gpu = inv.gpu(a).map_or(a, |g| g.address);
                    if !have.contains(&gpu) {
                        return Err(blocked(format!(
                            "domain '{}' asks for GPU {gpu}, which its XML does not have",
                            doc.name
                        )));
                    }
                }
            }
            // Only `attach --hgx-full` asks for it: the whole fabric must be there.
            AttachRequest::HgxFull => {
                // The whole fabric, not only what the domain has (its own devices' scope).
                let host = discover_with(&Sysfs::new(&env.host_root), &Scope::Gpus, false)?;
                if host.nvswitches().is_empty() {
                    return Err(blocked(format!(
                        "domain '{}' asks for the whole HGX fabric, and this host has no NVSwitch",
                        doc.name
                    )));
                }
                let lacking: Vec<String> = host
                    .fabric_gpus()
                    .iter()
                    .filter(|g| !have.contains(g))
                    .chain(host.nvswitches().iter().filter(|s| !present.contains(s)))
                    .map(ToString::to_string)
                    .collect();
                if !lacking.is_empty() {
                    return Err(blocked(format!(
                        "domain '{}' asks for the whole HGX fabric, its XML lacks {}",
                        doc.name,
                        lacking.join(" ")
                    )));
                }
            }
            AttachRequest::Count { count, model } => {
                let n = have
                    .iter()
                    .filter(|g| model.is_none_or(|m| inv.device(**g).is_some_and(|d| d.id == m)))
                    .count();
                if n < count {
                    return Err(blocked(format!(
                        "domain '{}' asks for {count} GPU(s){}, its XML has {n}",
                        doc.name,
                        model.map(|m| format!(" of model {m}")).unwrap_or_default()
                    )));
                }
            }
            AttachRequest::VfCount { count, model } => {
                let n = present
                    .iter()
                    .filter(|a| inv.physfn(**a).is_some())
                    .filter(|a| model.is_none_or(|m| inv.device(**a).is_some_and(|d| d.id == m)))
                    .count();
                if n < count {
                    return Err(blocked(format!(
                        "domain '{}' asks for {count} SR-IOV virtual function(s){}, its XML has {n}",
                        doc.name,
                        model.map(|m| format!(" of model {m}")).unwrap_or_default()
                    )));
                }
            }
            // The metadata never names VFs by address.
            AttachRequest::Vfs(_) => {}
        }
    }
    Ok(warnings)
}

/// GPU-class PCI sources of the domain (display or processing accelerator): its GPUs for the
/// ledger. Reads only `class` of each.
fn gpu_sources(env: &HookEnv, doc: &DomainDoc<'_>) -> Vec<PciAddress> {
    let sysfs = Sysfs::new(&env.host_root);
    doc.pci_sources()
        .into_iter()
        .filter(|a| {
            sysfs
                .hex_attr(*a, "class")
                .ok()
                .flatten()
                .is_some_and(|c| PciClass(c).is_gpu())
        })
        .collect()
}

/// `started begin` / `reconnect begin`: opens a usage session and ends the lease.
pub fn started(env: &HookEnv, input: &str) -> Result<(), HookError> {
    let doc = scan(input)?;
    let key = lease_key(&doc);
    LeaseStore::new(&env.run_dir).remove_own(&doc.name, doc.uuid.as_deref())?;
    let gpus = gpu_sources(env, &doc);
    if !gpus.is_empty() {
        let owner = request::owner_for(
            &doc.name,
            doc.request.as_ref().and_then(|r| r.owner.as_deref()),
            &env.config,
        );
        Ledger::new(&env.state_dir).start(&doc.name, &key, &gpus, owner.as_deref(), unix_now())?;
    }
    Ok(())
}

/// `release end`: checks the health of the GPUs the domain gave back (quarantining those that
/// fail), closes the usage session (if one is open, marked with its quarantined GPUs) and ends
/// the lease. Idempotent. A health check that cannot run is a warning: it never fails the hook;
/// a ledger that cannot be written does not stop the check.
pub fn release(env: &HookEnv, input: &str) -> Result<(), HookError> {
    let doc = scan(input)?;
    let key = lease_key(&doc);
    LeaseStore::new(&env.run_dir).remove_own(&doc.name, doc.uuid.as_deref())?;
    let sources = doc.pci_sources();
    let display: BTreeSet<PciAddress> = gpu_sources(env, &doc).into_iter().collect();
    let now = unix_now();
    let mut checked = false;
    let stopped = Ledger::new(&env.state_dir).stop_checked(&doc.name, &key, now, |session| {
        checked = true;
        check_released(env, &doc.name, &sources, &display, session, now)
    });
    if !checked {
        check_released(env, &doc.name, &sources, &display, &[], now);
    }
    stopped?;
    Ok(())
}

/// Checks the GPUs among `sources` (`display` are its display functions) and those of the
/// domain's usage session; returns those quarantined now. Failures are logged.
fn check_released(
    env: &HookEnv,
    domain: &str,
    sources: &[PciAddress],
    display: &BTreeSet<PciAddress>,
    session: &[PciAddress],
    now: u64,
) -> Vec<PciAddress> {
    let targets = health::check::targets_of(sources, display, session);
    let store = HealthStore::new(&env.state_dir);
    let by = format!("hook release of {domain}");
    health::check::check_released(
        &Sysfs::new(&env.host_root),
        &store,
        &targets,
        domain,
        &by,
        now,
    )
}
