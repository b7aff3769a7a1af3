//! What a hook call reads, on arbitrary input: the operation words, the domain XML and its GPU
//! request, resolved against a fixed two-GPU host. Nothing may panic.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use gpupass::alloc::plan::Holdings;
use gpupass::config::GpupassConfig;
use gpupass::hook::args::HookOp;
use gpupass::hook::resolve::resolve;
use gpupass::host::discover::{Inventory, IommuState, PciDevice};
use gpupass::model::{IommuGroupId, PciAddress, PciClass, PciId};
use gpupass::request;
use gpupass::xml::{domain, rewrite};
use libfuzzer_sys::fuzz_target;

fn host() -> Inventory {
    let mut devices = BTreeMap::new();
    let mut groups: BTreeMap<IommuGroupId, Vec<PciAddress>> = BTreeMap::new();
    for (i, bus) in [0x18u8, 0x9a].iter().enumerate() {
        for (f, class) in [(0u8, 0x030200u32), (1, 0x040300)] {
            let a = PciAddress::new(0, *bus, 0, f).expect("valid");
            devices.insert(
                a,
                PciDevice {
                    address: a,
                    id: PciId { vendor: 0x10de, device: 0x2330 },
                    subsystem: None,
                    class: PciClass(class),
                    driver: Some("vfio-pci".into()),
                    iommu_group: Some(IommuGroupId(i as u32)),
                    numa_node: None,
                    boot_vga: false,
                    reset_method: None,
                    parent: None,
                    virtfn: false,
                },
            );
            groups.entry(IommuGroupId(i as u32)).or_default().push(a);
        }
    }
    Inventory::build(devices, groups, IommuState { groups: 2, ..Default::default() }, Vec::new())
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut words = text.splitn(3, ' ');
    let _ = HookOp::parse(words.next().unwrap_or(""), words.next().unwrap_or(""));
    let xml = words.next().unwrap_or("");
    let _ = domain::parse(xml);
    let Ok(doc) = rewrite::scan(xml) else { return };
    let config = GpupassConfig::default();
    let Ok(Some(req)) = request::for_domain(&doc.name, doc.request.as_ref(), &config) else { return };
    if let Ok(res) = resolve(&host(), &Holdings::default(), &doc, &req, &BTreeSet::new()) {
        for i in &res.remove {
            assert!(doc.hostdevs[*i].injected());
        }
    }
});
