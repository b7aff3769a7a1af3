//! Attaches and detaches whole GPUs and SR-IOV virtual functions through a [`Hypervisor`]: reads who holds what from libvirt,
//! plans (pure, in `alloc::plan`), changes every function of each GPU, re-reads the domain XML to
//! confirm, and undoes what this call did when any step fails. Callers hold the host lock.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::alloc::lease::LeaseStore;
use crate::alloc::lock::HostLock;
use crate::alloc::plan::{
    plan_attach, plan_detach, AttachRequest, DetachRequest, DetachUnit, Holdings,
};
use crate::alloc::AllocError;
use crate::config::{GpupassConfig, RepairPartial};
use crate::cpuset;
use crate::host::discover::Inventory;
use crate::libvirt::{DomainInfo, Hypervisor, Impact, LibvirtError, XmlView};
use crate::limits;
use crate::model::{MdevUuid, NumaNode, PciAddress};
use crate::request;
use crate::usage::{unix_now, Ledger, UsageError};
use crate::xml::compose::HostdevTemplate;
use crate::xml::domain::{self, DomainFacts};
use crate::xml::XmlError;

/// Errors from attaching or detaching.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    /// The request cannot be met.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// libvirt failed or refused.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// libvirt returned XML gpupass cannot read.
    #[error("domain '{domain}': {source}")]
    Xml {
        /// The domain.
        domain: String,
        /// The parse error.
        #[source]
        source: XmlError,
    },
    /// `--live` or `--config` does not fit the domain.
    #[error("{0}")]
    Impact(String),
    /// libvirt said yes but the domain XML does not show the change.
    #[error("domain '{domain}' does not show the change after libvirt accepted it: {detail}")]
    NotApplied {
        /// The domain.
        domain: String,
        /// What is missing or still there.
        detail: String,
    },
    /// The usage ledger (for a GPU-hours limit) could not be read.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// The operation failed and undoing it failed too: the domain may hold part of a GPU.
    #[error("{cause}; ROLLBACK INCOMPLETE, check the domain by hand: {leftover}")]
    RollbackIncomplete {
        /// The first failure.
        cause: Box<AssignError>,
        /// What could not be undone.
        leftover: String,
    },
}

impl AssignError {
    /// The documented exit code (the table in `gpupass --help`).
    pub fn exit_code(&self) -> u8 {
        if matches!(self, AssignError::RollbackIncomplete { .. }) {
            return 11;
        }
        match self.root() {
            AssignError::Alloc(a) => a.exit_code(),
            AssignError::Libvirt(l) => l.exit_code(),
            AssignError::Impact(_) => 2,
            AssignError::NotApplied { .. } => 10,
            AssignError::Xml { .. }
            | AssignError::Usage(_)
            | AssignError::RollbackIncomplete { .. } => 1,
        }
    }

    /// The failure that started it all (for exit codes).
    pub fn root(&self) -> &AssignError {
        match self {
            AssignError::RollbackIncomplete { cause, .. } => cause.root(),
            other => other,
        }
    }
}

/// What attach/detach did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AssignReport {
    /// `attach` or `detach`.
    pub action: &'static str,
    /// The domain.
    pub domain: String,
    /// This call changed the running domain.
    pub live: bool,
    /// This call changed the persistent definition.
    pub config: bool,
    /// Each GPU with the functions that moved.
    pub gpus: Vec<GpuChange>,
    /// Things the operator should know.
    pub warnings: Vec<String>,
    /// What the guest fit changed in the persistent definition (the agent's API attach; the
    /// CLI prints its fit apart).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fitted: Vec<String>,
}

/// One GPU in a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuChange {
    /// The GPU.
    pub gpu: PciAddress,
    /// Its functions that were attached or detached.
    pub functions: Vec<PciAddress>,
    /// An NVSwitch of the HGX fabric, not a GPU (`attach --hgx-full`, `detach --all`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub nvswitch: bool,
    /// An SR-IOV virtual function, not a whole GPU (`--vgpu vf`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub vf: bool,
}

/// How attach/detach run.
#[derive(Debug, Clone)]
pub struct AssignOptions {
    /// The hostdev template.
    pub template: HostdevTemplate,
    /// `--live` / `--config`; `None` = like `virsh attach-device --persistent`: live when the
    /// domain runs, plus config when it is persistent.
    pub impact: Option<Impact>,
    /// How long to wait for a guest to release a device on a live detach.
    pub detach_timeout: Duration,
    /// Leases of transforms in flight (GPUs reserved for domains not started yet), which an
    /// attach must not take.
    pub leases: Option<LeaseStore>,
    /// May move host drivers through libvirt's node devices for a live attach/detach. Only when
    /// the inventory is this host's own (`--host-root /`): a fixture's address may name one of
    /// the real host's devices.
    pub manage_drivers: bool,
    /// Owners' limits and the rules that name owners.
    pub config: GpupassConfig,
    /// The usage ledger, for GPU-hours limits (`None`: hours are not checked).
    pub ledger: Option<Ledger>,
}

#[derive(Debug, Clone, Copy)]
struct Step {
    addr: PciAddress,
    impact: Impact,
}

fn resolve_impact(info: &DomainInfo, asked: Option<Impact>) -> Result<Impact, AssignError> {
    match asked {
        Some(i) if i.is_empty() => Err(AssignError::Impact("nothing to change".into())),
        Some(i) => {
            if i.config && !info.persistent {
                return Err(AssignError::Impact(format!(
                    "--config: domain '{}' is transient (not defined); use --live",
                    info.name
                )));
            }
            // --live on a stopped domain is left to libvirt, whose message says so.
            Ok(i)
        }
        None => Ok(Impact {
            live: info.active,
            config: info.persistent,
        }),
    }
}

fn parse_xml(domain: &str, xml: &str) -> Result<DomainFacts, AssignError> {
    domain::parse(xml).map_err(|source| AssignError::Xml {
        domain: domain.to_owned(),
        source,
    })
}

/// One domain's PCI hostdevs as libvirt shows them now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainDevices {
    /// Its UUID.
    pub uuid: Option<String>,
    /// The owner in its gpupass metadata (the running definition's first).
    pub owner: Option<String>,
    /// Hostdev sources of the running definition (empty when not running).
    pub live: Vec<PciAddress>,
    /// Hostdev sources of the persistent definition (empty when transient).
    pub config: Vec<PciAddress>,
    /// Mediated devices of the running definition (empty when not running).
    pub live_mdevs: Vec<MdevUuid>,
    /// Mediated devices of the persistent definition.
    pub config_mdevs: Vec<MdevUuid>,
}

/// Reads a domain's running XML (when active) and persistent XML (when defined); `None` when
/// it was undefined while we looked.
pub fn read_domain(
    hv: &dyn Hypervisor,
    info: &DomainInfo,
) -> Result<Option<DomainDevices>, AssignError> {
    let mut out = DomainDevices::default();
    for (view, wanted) in [
        (XmlView::Live, info.active),
        (XmlView::Config, info.persistent),
    ] {
        if !wanted {
            continue;
        }
        let xml = match hv.domain_xml(&info.name, view) {
            Ok(x) => x,
            Err(LibvirtError::UnknownDomain { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let facts = parse_xml(&info.name, &xml)?;
        out.uuid = out.uuid.or(facts.uuid);
        out.owner = out.owner.or(facts.owner);
        match view {
            XmlView::Live => (out.live, out.live_mdevs) = (facts.pci_hostdevs, facts.mdev_hostdevs),
            XmlView::Config => {
                (out.config, out.config_mdevs) = (facts.pci_hostdevs, facts.mdev_hostdevs)
            }
        }
    }
    Ok(Some(out))
}

/// Reads which domain references which PCI function: every running domain's live XML and every
/// defined domain's persistent XML. libvirt is the only record, so it cannot go stale.
pub fn read_holdings(hv: &dyn Hypervisor) -> Result<Holdings, AssignError> {
    let mut holdings = Holdings::default();
    for d in hv.domains()? {
        // Undefined while we looked: it holds nothing any more.
        let Some(dev) = read_domain(hv, &d)? else {
            continue;
        };
        holdings.add_domain(&d.name, dev.owner.as_deref(), &dev.live, &dev.config);
        for (uuids, running) in [(dev.live_mdevs, true), (dev.config_mdevs, false)] {
            for u in uuids {
                holdings.add_mdev(u, &d.name, running);
            }
        }
    }
    Ok(holdings)
}

/// NUMA nodes a domain is pinned to: `<numatune><memory nodeset>`, else the nodes of its vCPU
/// cpuset / vcpupin CPUs. Empty = no preference.
pub fn preferred_nodes(inv: &Inventory, facts: &DomainFacts) -> BTreeSet<NumaNode> {
    preferred_nodes_of(
        inv,
        facts.numa_nodeset.as_deref(),
        facts.vcpu_cpuset.iter().chain(&facts.vcpupin_cpusets),
    )
}

/// [`preferred_nodes`] from the pinning fields themselves.
pub fn preferred_nodes_of<'a>(
    inv: &Inventory,
    numa_nodeset: Option<&str>,
    cpusets: impl Iterator<Item = &'a String>,
) -> BTreeSet<NumaNode> {
    if let Some(nodes) = numa_nodeset.and_then(|s| cpuset::parse(s).ok()) {
        return nodes.into_iter().map(NumaNode).collect();
    }
    let mut cpus = BTreeSet::new();
    for set in cpusets {
        if let Ok(c) = cpuset::parse(set) {
            cpus.extend(c);
        }
    }
    inv.nodes_of_cpus(&cpus)
}

/// Hostdev addresses in the live and config definitions that `impact` touches.
fn present(
    hv: &dyn Hypervisor,
    name: &str,
    impact: Impact,
) -> Result<(BTreeSet<PciAddress>, BTreeSet<PciAddress>), AssignError> {
    let read = |view| -> Result<BTreeSet<PciAddress>, AssignError> {
        let xml = hv.domain_xml(name, view)?;
        Ok(parse_xml(name, &xml)?.pci_hostdevs.into_iter().collect())
    };
    let live = if impact.live {
        read(XmlView::Live)?
    } else {
        BTreeSet::new()
    };
    let config = if impact.config {
        read(XmlView::Config)?
    } else {
        BTreeSet::new()
    };
    Ok((live, config))
}

/// Undoes changes: detaches (`attach_back` false) or re-attaches what `items` name. Returns what
/// could not be undone.
fn undo(
    hv: &dyn Hypervisor,
    name: &str,
    template: &HostdevTemplate,
    items: &[Step],
    attach_back: bool,
) -> Vec<String> {
    let mut failed = Vec::new();
    for s in items.iter().rev().filter(|s| !s.impact.is_empty()) {
        let xml = template.render(s.addr);
        let r = if attach_back {
            hv.attach_device(name, &xml, s.impact)
        } else {
            hv.detach_device(name, &xml, s.impact)
        };
        if let Err(e) = r {
            failed.push(format!("{} ({}): {e}", s.addr, s.impact.describe()));
        }
    }
    failed
}

/// Gives functions gpupass moved to vfio-pci back to their host drivers. Returns what failed.
fn reattach(hv: &dyn Hypervisor, functions: &[PciAddress]) -> Vec<String> {
    functions
        .iter()
        .rev()
        .filter_map(|f| hv.node_reattach(*f).err().map(|e| format!("{f}: {e}")))
        .collect()
}

fn with_undo(cause: AssignError, failed: Vec<String>) -> AssignError {
    if failed.is_empty() {
        cause
    } else {
        AssignError::RollbackIncomplete {
            cause: Box::new(cause),
            leftover: failed.join("; "),
        }
    }
}

fn changes(inv: &Inventory, steps: &[Step]) -> Vec<GpuChange> {
    let mut out: Vec<GpuChange> = Vec::new();
    for s in steps {
        let gpu = inv.gpu(s.addr).map_or(s.addr, |g| g.address);
        match out.iter_mut().find(|c| c.gpu == gpu) {
            Some(c) => c.functions.push(s.addr),
            None => out.push(GpuChange {
                gpu,
                functions: vec![s.addr],
                nvswitch: inv.gpu(s.addr).is_none() && inv.nvswitches().contains(&s.addr),
                vf: inv.physfn(s.addr).is_some(),
            }),
        }
    }
    out
}

/// Attaches whole GPUs to a domain.
pub fn attach(
    hv: &dyn Hypervisor,
    inv: &Inventory,
    _lock: &HostLock,
    name: &str,
    request: &AttachRequest,
    opts: &AssignOptions,
) -> Result<AssignReport, AssignError> {
    attach_unlocked(hv, inv, name, request, opts)
}

fn attach_unlocked(
    hv: &dyn Hypervisor,
    inv: &Inventory,
    name: &str,
    request: &AttachRequest,
    opts: &AssignOptions,
) -> Result<AssignReport, AssignError> {
    let info = hv.domain(name)?;
    let impact = resolve_impact(&info, opts.impact)?;
    let holdings = read_holdings(hv)?;
    let own_view = if info.persistent {
        XmlView::Config
    } else {
        XmlView::Live
    };
    let facts = parse_xml(name, &hv.domain_xml(name, own_view)?)?;
    let mut holdings = holdings;
    if let Some(store) = &opts.leases {
        store.holdings_except(name, facts.uuid.as_deref(), unix_now(), &mut holdings);
    }
    let plan = plan_attach(inv, &holdings, name, request, &preferred_nodes(inv, &facts))?;
    let owner = request::owner_for(name, facts.owner.as_deref(), &opts.config);
    if let Some((o, limit)) = limits::owner_limit(&opts.config, owner.as_deref()) {
        let used = limits::period_use(limit, o, opts.ledger.as_ref(), unix_now())?;
        let rule_owner = |d: &str| opts.config.rule_owner(d).map(str::to_owned);
        limits::check(
            inv,
            &holdings,
            name,
            o,
            limit,
            &plan.gpus,
            used,
            &rule_owner,
        )?;
    }
    let (live, config) = present(hv, name, impact)?;

    let mut steps = Vec::new();
    for gpu_addr in &plan.gpus {
        let gpu = inv
            .gpu(*gpu_addr)
            .ok_or(AllocError::UnknownGpu { address: *gpu_addr })?;
        let before = steps.len();
        for f in &gpu.functions {
            let need = Impact {
                live: impact.live && !live.contains(f),
                config: impact.config && !config.contains(f),
            };
            if !need.is_empty() {
                steps.push(Step {
                    addr: *f,
                    impact: need,
                });
            }
        }
        // HGX full passthrough completes whatever of the fabric is missing.
        if steps.len() == before && *request != AttachRequest::HgxFull {
            return Err(AllocError::AlreadyAttached {
                gpu: gpu.address,
                domain: name.to_owned(),
                impact: impact.describe(),
            }
            .into());
        }
    }
    for sw in &plan.switches {
        let need = Impact {
            live: impact.live && !live.contains(sw),
            config: impact.config && !config.contains(sw),
        };
        if !need.is_empty() {
            steps.push(Step {
                addr: *sw,
                impact: need,
            });
        }
    }
    // A VF is one function, in its own IOMMU group, already on VFIO (the planner asks that):
    // no driver moves, no slot layout.
    for vf in &plan.vfs {
        let need = Impact {
            live: impact.live && !live.contains(vf),
            config: impact.config && !config.contains(vf),
        };
        if need.is_empty() {
            return Err(AllocError::AlreadyAttached {
                gpu: *vf,
                domain: name.to_owned(),
                impact: impact.describe(),
            }
            .into());
        }
        steps.push(Step {
            addr: *vf,
            impact: need,
        });
    }
    if let (true, Some(first)) = (steps.is_empty(), plan.gpus.first()) {
        return Err(AllocError::AlreadyAttached {
            gpu: *first,
            domain: name.to_owned(),
            impact: impact.describe(),
        }
        .into());
    }

    // A live hot-plug opens the function's IOMMU group in QEMU, and the kernel refuses while
    // another function of the group (the GPU's HDMI audio) is still on a host driver. libvirt
    // detaches a managed hostdev only as it plugs it, one by one; so first move every function
    // of each GPU off its host driver. A cold start does not need this: libvirt detaches all
    // hostdevs before QEMU starts.
    let mut detached: Vec<PciAddress> = Vec::new();
    if opts.manage_drivers && opts.template.managed() && steps.iter().any(|s| s.impact.live) {
        let units = plan
            .gpus
            .iter()
            .map(|a| inv.gpu(*a).map(|g| g.functions.clone()).unwrap_or_default())
            .chain(plan.switches.iter().map(|s| vec![*s]));
        for functions in units {
            for f in functions {
                if hv.node_driver(f)?.as_deref() == Some("vfio-pci") {
                    continue;
                }
                if let Err(e) = hv.node_detach(f) {
                    let failed = reattach(hv, &detached);
                    return Err(with_undo(e.into(), failed));
                }
                detached.push(f);
            }
        }
    }

    let mut done: Vec<Step> = Vec::new();
    for s in &steps {
        if let Err(e) = hv.attach_device(name, &opts.template.render(s.addr), s.impact) {
            let mut failed = undo(hv, name, &opts.template, &done, false);
            failed.extend(reattach(hv, &detached));
            return Err(with_undo(e.into(), failed));
        }
        tracing::info!(domain = name, bdf = %s.addr, impact = s.impact.describe(), "attached");
        done.push(*s);
    }

    // libvirt can accept a change it did not make; the domain XML is the proof.
    let (live_after, config_after) = present(hv, name, impact)?;
    let applied = |s: &Step| Impact {
        live: s.impact.live && live_after.contains(&s.addr),
        config: s.impact.config && config_after.contains(&s.addr),
    };
    let missing: Vec<String> = steps
        .iter()
        .filter(|s| applied(s) != s.impact)
        .map(|s| format!("{} not in the {} definition", s.addr, s.impact.describe()))
        .collect();
    if !missing.is_empty() {
        let appeared: Vec<Step> = steps
            .iter()
            .map(|s| Step {
                addr: s.addr,
                impact: applied(s),
            })
            .collect();
        let mut failed = undo(hv, name, &opts.template, &appeared, false);
        failed.extend(reattach(hv, &detached));
        return Err(with_undo(
            AssignError::NotApplied {
                domain: name.to_owned(),
                detail: missing.join(", "),
            },
            failed,
        ));
    }
    Ok(AssignReport {
        action: "attach",
        domain: name.to_owned(),
        live: steps.iter().any(|s| s.impact.live),
        config: steps.iter().any(|s| s.impact.config),
        gpus: changes(inv, &steps),
        warnings: plan.warnings,
        fitted: Vec::new(),
    })
}

/// Detaches whole GPUs from a domain.
pub fn detach(
    hv: &dyn Hypervisor,
    inv: &Inventory,
    _lock: &HostLock,
    name: &str,
    request: &DetachRequest,
    opts: &AssignOptions,
) -> Result<AssignReport, AssignError> {
    detach_unlocked(hv, inv, name, request, opts)
}

fn detach_unlocked(
    hv: &dyn Hypervisor,
    inv: &Inventory,
    name: &str,
    request: &DetachRequest,
    opts: &AssignOptions,
) -> Result<AssignReport, AssignError> {
    let info = hv.domain(name)?;
    let impact = resolve_impact(&info, opts.impact)?;
    let (live, config) = present(hv, name, impact)?;
    let union: BTreeSet<PciAddress> = live.union(&config).copied().collect();
    let units: Vec<DetachUnit> = plan_detach(inv, &union, name, impact.describe(), request)?;

    let mut steps = Vec::new();
    for u in &units {
        for f in &u.functions {
            steps.push(Step {
                addr: *f,
                impact: Impact {
                    live: impact.live && live.contains(f),
                    config: impact.config && config.contains(f),
                },
            });
        }
    }

    let mut done: Vec<Step> = Vec::new();
    for s in &steps {
        if let Err(e) = hv.detach_device(name, &opts.template.render(s.addr), s.impact) {
            let failed = undo(hv, name, &opts.template, &done, true);
            return Err(with_undo(e.into(), failed));
        }
        done.push(*s);
    }

    // A live detach completes when the guest answers the unplug request: poll the XML.
    // The CLI and the API bound the timeout; a caller that does not gets an hour, never a panic.
    let deadline = Instant::now()
        .checked_add(opts.detach_timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
    let (still, remaining) = loop {
        let (live_after, config_after) = present(hv, name, impact)?;
        let remaining = |s: &Step| Impact {
            live: s.impact.live && live_after.contains(&s.addr),
            config: s.impact.config && config_after.contains(&s.addr),
        };
        let still: Vec<String> = steps
            .iter()
            .filter(|s| !remaining(s).is_empty())
            .map(|s| {
                format!(
                    "{} still in the {} definition",
                    s.addr,
                    remaining(s).describe()
                )
            })
            .collect();
        if still.is_empty() || Instant::now() >= deadline {
            let rem: Vec<Step> = steps
                .iter()
                .map(|s| Step {
                    addr: s.addr,
                    impact: remaining(s),
                })
                .collect();
            break (still, rem);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !still.is_empty() {
        // Put back what did go, so no GPU is left half in the domain.
        let gone: Vec<Step> = steps
            .iter()
            .zip(&remaining)
            .map(|(s, r)| Step {
                addr: s.addr,
                impact: Impact {
                    live: s.impact.live && !r.impact.live,
                    config: s.impact.config && !r.impact.config,
                },
            })
            .collect();
        let failed = undo(hv, name, &opts.template, &gone, true);
        return Err(with_undo(
            AssignError::NotApplied {
                domain: name.to_owned(),
                detail: format!(
                    "{} after {:?} (a live detach needs a guest OS that answers the unplug request)",
                    still.join(", "),
                    opts.detach_timeout
                ),
            },
            failed,
        ));
    }
    for s in &steps {
        tracing::info!(domain = name, bdf = %s.addr, impact = s.impact.describe(), "detached");
    }
    // libvirt gives a managed function back to its host driver as it leaves the guest; for the
    // first functions of a multi-function GPU the kernel refuses while the rest of the group is
    // still in QEMU, and they stay on vfio-pci. Finish that now that the whole group is out.
    let mut warnings = Vec::new();
    if opts.manage_drivers && opts.template.managed() {
        // A VF was on VFIO before it went in (the planner asks that) and stays there.
        for s in steps
            .iter()
            .filter(|s| s.impact.live && inv.physfn(s.addr).is_none())
        {
            match hv.node_driver(s.addr) {
                Ok(Some(d)) if d == "vfio-pci" => {
                    if let Err(e) = hv.node_reattach(s.addr) {
                        warnings.push(format!("{} stays on vfio-pci: {e}", s.addr));
                    }
                }
                Ok(_) => {}
                Err(e) => warnings.push(format!("cannot read the driver of {}: {e}", s.addr)),
            }
        }
    }
    Ok(AssignReport {
        action: "detach",
        domain: name.to_owned(),
        live: steps.iter().any(|s| s.impact.live),
        config: steps.iter().any(|s| s.impact.config),
        gpus: changes(inv, &steps),
        warnings,
        fitted: Vec::new(),
    })
}

/// One GPU that [`repair_partials`] found partly in a domain, and what completing or removing
/// it gave.
#[derive(Debug)]
pub struct RepairOutcome {
    /// The GPU.
    pub gpu: PciAddress,
    /// The domain that held part of it.
    pub domain: String,
    /// The attach or detach.
    pub result: Result<AssignReport, AssignError>,
}

/// Completes (`Complete`: attaches the missing functions) or removes (`Detach`: detaches the
/// functions there) every GPU a domain holds only part of, in the definitions that hold part of
/// it. Reads libvirt afresh under the lock, so an attach or detach that was in flight when the
/// caller looked has finished (or rolled back) and is not mistaken for a crash's leftover.
pub fn repair_partials(
    hv: &dyn Hypervisor,
    inv: &Inventory,
    _lock: &HostLock,
    mode: RepairPartial,
    opts: &AssignOptions,
) -> Result<Vec<RepairOutcome>, AssignError> {
    if mode == RepairPartial::Off {
        return Ok(Vec::new());
    }
    let holdings = read_holdings(hv)?;
    let mut out = Vec::new();
    for gpu in &inv.gpus {
        for p in holdings.partial(&gpu.functions) {
            let mut o = opts.clone();
            o.impact = Some(Impact {
                live: p.live,
                config: p.config,
            });
            let result = match mode {
                RepairPartial::Complete => attach_unlocked(
                    hv,
                    inv,
                    &p.domain,
                    &AttachRequest::Gpus(vec![gpu.address]),
                    &o,
                ),
                RepairPartial::Detach | RepairPartial::Off => detach_unlocked(
                    hv,
                    inv,
                    &p.domain,
                    &DetachRequest::Gpus(vec![gpu.address]),
                    &o,
                ),
            };
            out.push(RepairOutcome {
                gpu: gpu.address,
                domain: p.domain,
                result,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::host::discover::{IommuState, PciDevice};
    use crate::libvirt::fake::{FakeDomain, FakeHypervisor};
    use crate::model::{IommuGroupId, PciClass};

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    /// Two GPUs with audio, on NUMA nodes 0 and 1 (CPUs 0-3 and 4-7).
    fn inv() -> Inventory {
        let mut devices = BTreeMap::new();
        let mut groups: BTreeMap<IommuGroupId, Vec<PciAddress>> = BTreeMap::new();
        for (i, (gpu, node)) in [("0000:18:00.0", 0), ("0000:9a:00.0", 1)]
            .iter()
            .enumerate()
        {
            let g = a(gpu);
            for (f, class) in [
                (g, 0x030200),
                (PciAddress::new(0, g.bus, 0, 1).unwrap(), 0x040300),
            ] {
                devices.insert(
                    f,
                    PciDevice {
                        address: f,
                        id: "10de:2330".parse().unwrap(),
                        subsystem: None,
                        class: PciClass(class),
                        driver: None,
                        iommu_group: Some(IommuGroupId(i as u32)),
                        numa_node: Some(NumaNode(*node)),
                        boot_vga: false,
                        reset_method: None,
                        parent: None,
                        virtfn: false,
                    },
                );
                groups.entry(IommuGroupId(i as u32)).or_default().push(f);
            }
        }
        let numa = vec![
            (NumaNode(0), BTreeSet::from([0, 1, 2, 3])),
            (NumaNode(1), BTreeSet::from([4, 5, 6, 7])),
        ];
        Inventory::build(
            devices,
            groups,
            IommuState {
                groups: 2,
                ..Default::default()
            },
            numa,
        )
    }

    fn opts(impact: Option<Impact>) -> AssignOptions {
        AssignOptions {
            template: HostdevTemplate::builtin(),
            impact,
            detach_timeout: Duration::from_millis(300),
            leases: None,
            manage_drivers: true,
            config: GpupassConfig::default(),
            ledger: None,
        }
    }

    fn two_function_group(hv: &FakeHypervisor) {
        *hv.group.borrow_mut() = vec![a("0000:18:00.0"), a("0000:18:00.1")];
        hv.drivers
            .borrow_mut()
            .insert(a("0000:18:00.0"), "bochs-drm".into());
        hv.drivers
            .borrow_mut()
            .insert(a("0000:18:00.1"), "snd_hda_intel".into());
    }

    #[test]
    fn a_live_attach_first_moves_the_whole_gpu_off_its_host_drivers() {
        let hv = FakeHypervisor::default().with("vm", running());
        two_function_group(&hv);
        let live = Some(Impact {
            live: true,
            config: false,
        });
        let req = AttachRequest::Gpus(vec![a("0000:18:00.0")]);
        attach_unlocked(&hv, &inv(), "vm", &req, &opts(live)).unwrap();
        assert_eq!(
            *hv.calls.borrow(),
            [
                "nodedev-detach 0000:18:00.0",
                "nodedev-detach 0000:18:00.1",
                "attach vm 0000:18:00.0 live",
                "attach vm 0000:18:00.1 live"
            ]
        );
        // And a live detach gives both back to their host drivers once the group is out.
        detach_unlocked(&hv, &inv(), "vm", &DetachRequest::All, &opts(live)).unwrap();
        assert!(hv.calls.borrow().ends_with(&[
            "nodedev-reattach 0000:18:00.0".to_string(),
            "nodedev-reattach 0000:18:00.1".to_string()
        ]));
        assert!(hv.drivers.borrow().values().all(|d| d == "host"));
    }

    #[test]
    fn a_failed_live_attach_gives_the_functions_back_and_config_needs_no_detach() {
        let hv = FakeHypervisor::default().with("vm", running());
        two_function_group(&hv);
        *hv.fail_attach.borrow_mut() = Some(a("0000:18:00.1"));
        let live = Some(Impact {
            live: true,
            config: false,
        });
        let req = AttachRequest::Gpus(vec![a("0000:18:00.0")]);
        attach_unlocked(&hv, &inv(), "vm", &req, &opts(live)).unwrap_err();
        assert!(
            hv.drivers.borrow().values().all(|d| d == "host"),
            "{:?}",
            hv.drivers.borrow()
        );
        assert!(hv.domains.borrow()["vm"].live.is_empty());
        // Config only: libvirt detaches at start; gpupass leaves the drivers alone.
        let hv = FakeHypervisor::default().with("vm", defined());
        two_function_group(&hv);
        attach_unlocked(&hv, &inv(), "vm", &req, &opts(None)).unwrap();
        assert!(hv.calls.borrow().iter().all(|c| !c.starts_with("nodedev")));
    }

    #[test]
    fn an_owners_limit_counts_all_its_domains() {
        let mut config = GpupassConfig::parse(
            "[[rules]]\ndomain = \"acct-*\"\ncount = 1\nowner = \"acct\"\n[limits]\nacct = { max_gpus = 1 }\n",
        )
        .unwrap();
        let mut held = defined();
        held.config = BTreeSet::from([a("0000:18:00.0"), a("0000:18:00.1")]);
        let hv = FakeHypervisor::default()
            .with("acct-a", held)
            .with("acct-b", defined())
            .with("other", defined());
        let mut o = opts(None);
        o.config = config.clone();
        let req = AttachRequest::Count {
            count: 1,
            model: None,
        };
        let err = attach_unlocked(&hv, &inv(), "acct-b", &req, &o).unwrap_err();
        assert_eq!(
            err.to_string(),
            "owner 'acct' may hold 1 GPU(s) at once and holds 1 (domains: acct-a); 1 more would exceed the limit"
        );
        assert_eq!(err.root().to_string(), err.to_string());
        // A raised limit lets acct-b through.
        config.limits.get_mut("acct").unwrap().max_gpus = Some(2);
        o.config = config;
        attach_unlocked(&hv, &inv(), "acct-b", &req, &o).unwrap();
    }

    #[test]
    fn count_skips_gpus_leased_to_a_transform_in_flight() {
        let run = tempfile::tempdir().unwrap();
        let store = LeaseStore::new(run.path());
        store
            .put(
                &crate::alloc::lease::Lease {
                    domain: "other".into(),
                    uuid: None,
                    functions: vec![a("0000:18:00.0"), a("0000:18:00.1")],
                    expires: unix_now() + 600,
                    owner: None,
                },
                unix_now(),
            )
            .unwrap();
        let hv = FakeHypervisor::default().with("vm", defined());
        let mut o = opts(None);
        o.leases = Some(store);
        let req = AttachRequest::Count {
            count: 1,
            model: None,
        };
        let r = attach_unlocked(&hv, &inv(), "vm", &req, &o).unwrap();
        assert_eq!(r.gpus[0].gpu, a("0000:9a:00.0"));
        let err = attach_unlocked(
            &hv,
            &inv(),
            "vm",
            &AttachRequest::Gpus(vec![a("0000:18:00.0")]),
            &o,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("in use by domain 'lease:other'"),
            "{err}"
        );
    }

    fn defined() -> FakeDomain {
        FakeDomain {
            persistent: true,
            ..Default::default()
        }
    }

    fn running() -> FakeDomain {
        FakeDomain {
            persistent: true,
            active: true,
            ..Default::default()
        }
    }

    #[test]
    fn attaches_every_function_and_prefers_the_pinned_node() {
        let hv = FakeHypervisor::default().with(
            "vm",
            FakeDomain {
                extra: "<vcpu cpuset='4-5'>2</vcpu>".into(),
                ..defined()
            },
        );
        let req = AttachRequest::Count {
            count: 1,
            model: None,
        };
        let r = attach_unlocked(&hv, &inv(), "vm", &req, &opts(None)).unwrap();
        assert_eq!(r.gpus[0].gpu, a("0000:9a:00.0"));
        assert_eq!(
            *hv.calls.borrow(),
            [
                "attach vm 0000:9a:00.0 config",
                "attach vm 0000:9a:00.1 config"
            ]
        );
        assert!(r.config && !r.live);
    }

    #[test]
    fn default_impact_is_live_plus_config_on_a_running_persistent_domain() {
        let hv = FakeHypervisor::default().with("vm", running());
        let req = AttachRequest::Gpus(vec![a("0000:18:00.0")]);
        let r = attach_unlocked(&hv, &inv(), "vm", &req, &opts(None)).unwrap();
        assert!(r.live && r.config);
        let d = hv.domains.borrow()["vm"].clone();
        assert_eq!(d.live.len(), 2);
        assert_eq!(d.config.len(), 2);
    }

    #[test]
    fn a_failure_on_the_second_function_rolls_back_the_first() {
        let hv = FakeHypervisor::default().with("vm", running());
        *hv.fail_attach.borrow_mut() = Some(a("0000:18:00.1"));
        let req = AttachRequest::Gpus(vec![a("0000:18:00.0")]);
        let err = attach_unlocked(&hv, &inv(), "vm", &req, &opts(None)).unwrap_err();
        assert!(err.to_string().contains("VFIO PCI passthrough"), "{err}");
        let d = hv.domains.borrow()["vm"].clone();
        assert!(d.live.is_empty() && d.config.is_empty(), "{d:?}");
        let calls = hv.calls.borrow();
        let undo = calls
            .iter()
            .position(|c| c == "detach vm 0000:18:00.0 live+config")
            .expect("the first function is detached again");
        assert_eq!(
            calls[undo + 1..],
            [
                "nodedev-reattach 0000:18:00.1",
                "nodedev-reattach 0000:18:00.0"
            ],
            "then both go back to their host drivers"
        );
    }

    #[test]
    fn a_silent_success_is_caught_by_rereading_the_xml() {
        let hv = FakeHypervisor::default().with("vm", defined());
        *hv.silent_attach.borrow_mut() = true;
        let req = AttachRequest::Gpus(vec![a("0000:18:00.0")]);
        let err = attach_unlocked(&hv, &inv(), "vm", &req, &opts(None)).unwrap_err();
        assert!(matches!(err, AssignError::NotApplied { .. }), "{err}");
        assert!(err
            .to_string()
            .contains("0000:18:00.1 not in the config definition"));
    }

    #[test]
    fn already_attached_and_held_elsewhere_are_refused_before_any_change() {
        let mut held = defined();
        held.config = BTreeSet::from([a("0000:18:00.0"), a("0000:18:00.1")]);
        let hv = FakeHypervisor::default()
            .with("vm", held)
            .with("other", defined());
        let req = AttachRequest::Gpus(vec![a("0000:18:00.0")]);
        let err = attach_unlocked(&hv, &inv(), "vm", &req, &opts(None)).unwrap_err();
        assert!(matches!(
            err,
            AssignError::Alloc(AllocError::AlreadyAttached { .. })
        ));
        let err = attach_unlocked(&hv, &inv(), "other", &req, &opts(None)).unwrap_err();
        assert_eq!(err.to_string(), "GPU 0000:18:00.0 is in use by domain 'vm'");
        assert!(hv.calls.borrow().is_empty());
    }

    fn hgx() -> Inventory {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hosts/hgx-8gpu");
        crate::host::discover::discover(&crate::host::sysfs::Sysfs::new(std::path::Path::new(root)))
            .unwrap()
    }

    #[test]
    fn hgx_full_attaches_all_gpus_and_switches_or_rolls_all_back() {
        let inv = hgx();
        let config = Some(Impact {
            live: false,
            config: true,
        });
        let hv = FakeHypervisor::default().with("vm", defined());
        let r = attach_unlocked(&hv, &inv, "vm", &AttachRequest::HgxFull, &opts(config)).unwrap();
        assert_eq!(r.gpus.iter().filter(|g| !g.nvswitch).count(), 8);
        assert_eq!(r.gpus.iter().filter(|g| g.nvswitch).count(), 4);
        assert_eq!(hv.domains.borrow()["vm"].config.len(), 12);
        // Again: nothing is missing.
        let e =
            attach_unlocked(&hv, &inv, "vm", &AttachRequest::HgxFull, &opts(config)).unwrap_err();
        assert!(
            matches!(e, AssignError::Alloc(AllocError::AlreadyAttached { .. })),
            "{e}"
        );
        // detach --all takes the switches too.
        let r = detach_unlocked(&hv, &inv, "vm", &DetachRequest::All, &opts(config)).unwrap();
        assert_eq!(r.gpus.len(), 12);
        assert!(hv.domains.borrow()["vm"].config.is_empty());

        // The last switch fails: every GPU and switch before it is taken out again.
        let hv = FakeHypervisor::default().with("vm", defined());
        *hv.fail_attach.borrow_mut() = Some(a("0000:08:00.0"));
        attach_unlocked(&hv, &inv, "vm", &AttachRequest::HgxFull, &opts(config)).unwrap_err();
        assert!(hv.domains.borrow()["vm"].config.is_empty());

        // One GPU held by another domain: refused before any change.
        let mut other = defined();
        other.config = BTreeSet::from([a("0000:db:00.0")]);
        let hv = FakeHypervisor::default()
            .with("vm", defined())
            .with("other", other);
        let e =
            attach_unlocked(&hv, &inv, "vm", &AttachRequest::HgxFull, &opts(config)).unwrap_err();
        assert_eq!(e.exit_code(), 5, "{e}");
        assert!(hv.calls.borrow().is_empty());
        assert!(hv.domains.borrow()["vm"].config.is_empty());
    }

    #[test]
    fn a_half_attached_gpu_is_completed() {
        let mut half = defined();
        half.config = BTreeSet::from([a("0000:18:00.0")]);
        let hv = FakeHypervisor::default().with("vm", half);
        let req = AttachRequest::Gpus(vec![a("0000:18:00.0")]);
        attach_unlocked(&hv, &inv(), "vm", &req, &opts(None)).unwrap();
        assert_eq!(*hv.calls.borrow(), ["attach vm 0000:18:00.1 config"]);
    }

    #[test]
    fn count_completes_the_domains_partial_gpu_and_others_are_still_refused() {
        let mut half = defined();
        half.config = BTreeSet::from([a("0000:18:00.1")]);
        let hv = FakeHypervisor::default()
            .with("vm", half)
            .with("other", defined());
        // Another domain cannot have it, whole or by count.
        let err = attach_unlocked(
            &hv,
            &inv(),
            "other",
            &AttachRequest::Gpus(vec![a("0000:18:00.0")]),
            &opts(None),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "GPU 0000:18:00.0 is in use by domain 'vm'");
        let one = AttachRequest::Count {
            count: 1,
            model: None,
        };
        let r = attach_unlocked(&hv, &inv(), "other", &one, &opts(None)).unwrap();
        assert_eq!(r.gpus[0].gpu, a("0000:9a:00.0"));
        hv.calls.borrow_mut().clear();
        // The domain's own retried `--count 1` completes the partial GPU and takes nothing else.
        let r = attach_unlocked(&hv, &inv(), "vm", &one, &opts(None)).unwrap();
        assert_eq!(*hv.calls.borrow(), ["attach vm 0000:18:00.0 config"]);
        assert_eq!(r.gpus[0].gpu, a("0000:18:00.0"));
        assert!(
            r.warnings[0].contains("only part of GPU 0000:18:00.0"),
            "{:?}",
            r.warnings
        );
        assert_eq!(hv.domains.borrow()["vm"].config.len(), 2);
    }

    #[test]
    fn repair_completes_or_detaches_a_partial_gpu_in_the_partial_definition() {
        let lock_dir = tempfile::tempdir().unwrap();
        let lock = HostLock::acquire(lock_dir.path(), Duration::from_secs(1)).unwrap();
        let partial = || {
            let mut d = running();
            d.live = BTreeSet::from([a("0000:18:00.0"), a("0000:18:00.1")]);
            d.config = BTreeSet::from([a("0000:18:00.0")]);
            FakeHypervisor::default().with("vm", d).with("whole", {
                let mut w = defined();
                w.config = BTreeSet::from([a("0000:9a:00.0"), a("0000:9a:00.1")]);
                w
            })
        };
        let hv = partial();
        let none = repair_partials(&hv, &inv(), &lock, RepairPartial::Off, &opts(None)).unwrap();
        assert!(none.is_empty() && hv.calls.borrow().is_empty());
        let done =
            repair_partials(&hv, &inv(), &lock, RepairPartial::Complete, &opts(None)).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(
            (done[0].gpu, done[0].domain.as_str()),
            (a("0000:18:00.0"), "vm")
        );
        done[0].result.as_ref().unwrap();
        assert_eq!(*hv.calls.borrow(), ["attach vm 0000:18:00.1 config"]);
        assert_eq!(hv.domains.borrow()["vm"].config.len(), 2);
        // Whole now: a second pass finds nothing.
        let again =
            repair_partials(&hv, &inv(), &lock, RepairPartial::Complete, &opts(None)).unwrap();
        assert!(again.is_empty());

        let hv = partial();
        let done = repair_partials(&hv, &inv(), &lock, RepairPartial::Detach, &opts(None)).unwrap();
        done[0].result.as_ref().unwrap();
        assert_eq!(*hv.calls.borrow(), ["detach vm 0000:18:00.0 config"]);
        let d = hv.domains.borrow()["vm"].clone();
        assert!(d.config.is_empty(), "{d:?}");
        assert_eq!(d.live.len(), 2, "the whole live definition is left alone");
        assert_eq!(hv.domains.borrow()["whole"].config.len(), 2);
    }

    #[test]
    fn detach_of_a_partial_gpu_removes_whatever_is_there() {
        let mut half = defined();
        half.config = BTreeSet::from([a("0000:18:00.1")]);
        let hv = FakeHypervisor::default().with("vm", half);
        let r = detach_unlocked(
            &hv,
            &inv(),
            "vm",
            &DetachRequest::Gpus(vec![a("0000:18:00.0")]),
            &opts(None),
        )
        .unwrap();
        assert_eq!(r.gpus[0].functions, [a("0000:18:00.1")]);
        assert!(hv.domains.borrow()["vm"].config.is_empty());
    }

    #[test]
    fn detach_removes_every_function_and_reports_not_attached() {
        let mut held = defined();
        held.config = BTreeSet::from([a("0000:18:00.0"), a("0000:18:00.1")]);
        let hv = FakeHypervisor::default().with("vm", held);
        let r = detach_unlocked(&hv, &inv(), "vm", &DetachRequest::All, &opts(None)).unwrap();
        assert_eq!(r.gpus[0].functions.len(), 2);
        assert!(hv.domains.borrow()["vm"].config.is_empty());
        let err = detach_unlocked(
            &hv,
            &inv(),
            "vm",
            &DetachRequest::Gpus(vec![a("0000:18:00.0")]),
            &opts(None),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            AssignError::Alloc(AllocError::NotAttached { .. })
        ));
    }

    #[test]
    fn a_live_detach_the_guest_ignores_is_reported_and_config_is_restored() {
        let mut held = running();
        held.live = BTreeSet::from([a("0000:18:00.0"), a("0000:18:00.1")]);
        held.config = held.live.clone();
        let hv = FakeHypervisor::default().with("vm", held);
        *hv.sticky_live.borrow_mut() = true;
        let err = detach_unlocked(&hv, &inv(), "vm", &DetachRequest::All, &opts(None)).unwrap_err();
        assert!(
            err.to_string().contains("still in the live definition"),
            "{err}"
        );
        let d = hv.domains.borrow()["vm"].clone();
        assert_eq!(d.config.len(), 2, "config put back: {d:?}");
        assert_eq!(d.live.len(), 2);
    }

    #[test]
    fn config_on_a_transient_domain_is_refused_and_unknown_domains_named() {
        let hv = FakeHypervisor::default().with(
            "t",
            FakeDomain {
                active: true,
                ..Default::default()
            },
        );
        let req = AttachRequest::Gpus(vec![a("0000:18:00.0")]);
        let only_config = Some(Impact {
            live: false,
            config: true,
        });
        let err = attach_unlocked(&hv, &inv(), "t", &req, &opts(only_config)).unwrap_err();
        assert!(err.to_string().contains("transient"), "{err}");
        let err = attach_unlocked(&hv, &inv(), "nope", &req, &opts(None)).unwrap_err();
        assert_eq!(err.to_string(), "domain 'nope' not found");
    }

    /// [`inv`] plus two SR-IOV VFs of 0000:9a:00.0 on vfio-pci, each in its own group.
    fn inv_with_vfs() -> Inventory {
        let mut inv = inv();
        for (vf, group) in [("0000:9a:00.4", 10), ("0000:9a:00.5", 11)] {
            let f = a(vf);
            inv.devices.insert(
                f,
                PciDevice {
                    address: f,
                    id: "10de:2331".parse().unwrap(),
                    subsystem: None,
                    class: PciClass(0x030200),
                    driver: Some("vfio-pci".into()),
                    iommu_group: Some(IommuGroupId(group)),
                    numa_node: Some(NumaNode(1)),
                    boot_vga: false,
                    reset_method: None,
                    parent: None,
                    virtfn: true,
                },
            );
            inv.groups.insert(IommuGroupId(group), vec![f]);
            inv.vf_parents.insert(f, a("0000:9a:00.0"));
        }
        inv
    }

    #[test]
    fn vfs_attach_as_single_functions_and_a_failure_leaves_nothing() {
        let inv = inv_with_vfs();
        let hv = FakeHypervisor::default().with("vm", running());
        *hv.fail_attach.borrow_mut() = Some(a("0000:9a:00.5"));
        let two = AttachRequest::VfCount {
            count: 2,
            model: None,
        };
        attach_unlocked(&hv, &inv, "vm", &two, &opts(None)).unwrap_err();
        let d = hv.domains.borrow()["vm"].clone();
        assert!(d.live.is_empty() && d.config.is_empty(), "{d:?}");
        let calls = hv.calls.borrow().clone();
        assert!(
            calls.contains(&"detach vm 0000:9a:00.4 live+config".to_owned()),
            "{calls:?}"
        );
        assert!(
            !calls.iter().any(|c| c.starts_with("nodedev-")),
            "a VF is on vfio-pci already: no driver moves ({calls:?})"
        );

        let hv = FakeHypervisor::default().with("vm", defined());
        let r = attach_unlocked(&hv, &inv, "vm", &two, &opts(None)).unwrap();
        assert_eq!(r.gpus.len(), 2);
        assert!(r.gpus.iter().all(|g| g.vf && g.functions == [g.gpu]));
        let d = hv.domains.borrow()["vm"].clone();
        assert_eq!(
            d.config.iter().copied().collect::<Vec<_>>(),
            [a("0000:9a:00.4"), a("0000:9a:00.5")]
        );
        // Asked again by address: already there (exit 5), nothing changes.
        let again = AttachRequest::Vfs(vec![a("0000:9a:00.4")]);
        let e = attach_unlocked(&hv, &inv, "vm", &again, &opts(None)).unwrap_err();
        assert_eq!(e.exit_code(), 5, "{e}");
        // The PF is not passed whole while its VFs are held.
        let whole = AttachRequest::Gpus(vec![a("0000:9a:00.0")]);
        let other = FakeHypervisor::default()
            .with("vm", hv.domains.borrow()["vm"].clone())
            .with("vm2", defined());
        let e = attach_unlocked(&other, &inv, "vm2", &whole, &opts(None)).unwrap_err();
        assert_eq!(e.exit_code(), 5, "{e}");
        // A live detach leaves the VFs on vfio-pci: gpupass moved no driver for them.
        let live = FakeHypervisor::default().with("vm", running());
        for vf in ["0000:9a:00.4", "0000:9a:00.5"] {
            live.drivers.borrow_mut().insert(a(vf), "vfio-pci".into());
        }
        attach_unlocked(&live, &inv, "vm", &two, &opts(None)).unwrap();
        let r = detach_unlocked(&live, &inv, "vm", &DetachRequest::AllVfs, &opts(None)).unwrap();
        assert!(r.live && r.gpus.len() == 2, "{r:?}");
        let calls = live.calls.borrow().clone();
        assert!(
            !calls.iter().any(|c| c.starts_with("nodedev-")),
            "{calls:?}"
        );
        assert!(live.domains.borrow()["vm"].live.is_empty());
        // A whole-GPU --all leaves the VFs; --vgpu vf --all takes them.
        let r = detach_unlocked(&hv, &inv, "vm", &DetachRequest::All, &opts(None)).unwrap();
        assert!(r.gpus.is_empty());
        let r = detach_unlocked(&hv, &inv, "vm", &DetachRequest::AllVfs, &opts(None)).unwrap();
        assert_eq!(r.gpus.len(), 2);
        assert!(hv.domains.borrow()["vm"].config.is_empty());
    }
}
