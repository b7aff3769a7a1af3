//! `gpupass xml ADDR…`: the `<hostdev>` blocks for every function of each GPU.

use gpupass::alloc::AllocError;
use gpupass::model::PciAddress;

use crate::cli::{print_all, Global};

/// Prints one block per function, GPU by GPU; nothing at all when any address is unknown.
pub fn xml(g: &Global, addrs: &[PciAddress]) -> anyhow::Result<()> {
    let inv = g.inventory()?;
    let template = g.template()?;
    let mut out = String::new();
    let mut seen = Vec::new();
    for a in addrs {
        let gpu = inv.gpu(*a).ok_or_else(|| AllocError::no_gpu(&inv, *a))?;
        if seen.contains(&gpu.address) {
            continue;
        }
        seen.push(gpu.address);
        for f in &gpu.functions {
            out.push_str(&template.render(*f));
            out.push('\n');
        }
    }
    print_all(&out)
}
