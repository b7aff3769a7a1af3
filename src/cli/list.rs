//! `gpupass list` and `gpupass show`: the GPUs of the host, judged, with the domain that holds
//! each and the fractions each offers (SR-IOV VFs, vGPU types, mdevs). Works without libvirt (a
//! host being set up): `used_by` is then unknown.

use gpupass::alloc::plan::Holdings;
use gpupass::assign::read_holdings;
use gpupass::libvirt::virt::VirtHypervisor;
use gpupass::model::PciAddress;
use gpupass::report::{details, gpu_report, table, LibvirtReport, ListReport, VgpuReport};

use crate::cli::{print_all, print_json, Global};

/// Holdings from libvirt, or the reason they are unknown (warned once on stderr).
fn holdings(g: &Global, offline: bool) -> (Option<Holdings>, LibvirtReport) {
    if offline {
        return (
            None,
            LibvirtReport {
                uri: g.uri.clone(),
                connected: false,
                error: Some("not asked (--no-libvirt)".into()),
                stale_since: None,
            },
        );
    }
    let result = VirtHypervisor::open(&g.uri)
        .map_err(gpupass::assign::AssignError::from)
        .and_then(|hv| read_holdings(&hv));
    match result {
        Ok(h) => (
            Some(h),
            LibvirtReport {
                uri: g.uri.clone(),
                connected: true,
                error: None,
                stale_since: None,
            },
        ),
        Err(e) => {
            tracing::warn!("{e}; which domain uses each GPU is unknown");
            (
                None,
                LibvirtReport {
                    uri: g.uri.clone(),
                    connected: false,
                    error: Some(e.to_string()),
                    stale_since: None,
                },
            )
        }
    }
}

/// `gpupass list`.
pub fn list(g: &Global, json: bool, offline: bool) -> anyhow::Result<()> {
    let inv = g.inventory()?;
    let (holdings, libvirt) = holdings(g, offline);
    let mut report = ListReport::new(&inv, holdings.as_ref(), libvirt);
    let sysfs = gpupass::host::sysfs::Sysfs::new(&g.host_root);
    let mut vgpus = gpupass::host::vgpu::read_all(&sysfs, &inv)?;
    for r in &mut report.gpus {
        let v = vgpus.remove(&r.address).flatten();
        r.vgpu = Some(v.map(|v| VgpuReport::new(&v, holdings.as_ref())));
    }
    if json {
        print_json(&report)
    } else {
        print_all(&table(&report))
    }
}

/// `gpupass show ADDR`.
pub fn show(g: &Global, addr: PciAddress, json: bool, offline: bool) -> anyhow::Result<()> {
    let inv = g.inventory()?;
    let gpu = inv
        .gpu(addr)
        .ok_or_else(|| gpupass::alloc::AllocError::no_gpu(&inv, addr))?;
    let (holdings, libvirt) = holdings(g, offline);
    let mut report = gpu_report(&inv, gpu, holdings.as_ref());
    let sysfs = gpupass::host::sysfs::Sysfs::new(&g.host_root);
    report.bars = Some(gpupass::report::BarsReport::new(
        gpupass::fit::bars::read_gpu_bars(&sysfs, gpu)?,
    ));
    let instances = gpupass::host::vgpu::read_instances(&sysfs)?;
    let v = gpupass::host::vgpu::read_gpu(&sysfs, &inv, gpu, &instances)?;
    report.vgpu = Some(v.map(|v| VgpuReport::new(&v, holdings.as_ref())));
    if json {
        print_json(&report)
    } else {
        print_all(&details(&report, libvirt.connected))
    }
}
