//! `gpupass host-config`: the files and kernel words a host needs so the chosen GPUs come up on
//! vfio-pci at boot — shown as a diff, or written with `--apply`.

use std::time::{SystemTime, UNIX_EPOCH};

use gpupass::hostcfg::{apply, plan, read_current, Initramfs, Selection};
use gpupass::model::{PciAddress, PciId};

use crate::cli::{print_all, Global};

/// Runs host-config.
pub fn host_config(
    g: &Global,
    gpus: &[PciAddress],
    models: &[PciId],
    initramfs: Option<Initramfs>,
    write: bool,
) -> anyhow::Result<()> {
    let inv = g.inventory()?;
    let current = read_current(&g.host_root, &inv)?;
    let selection = if !gpus.is_empty() {
        Selection::Gpus(gpus.to_vec())
    } else if !models.is_empty() {
        Selection::Models(models.to_vec())
    } else {
        Selection::AllPassable
    };
    // Debian's initramfs-tools unless the host has dracut's configuration and not Debian's.
    let flavor = initramfs.unwrap_or_else(|| {
        let has = |p: &str| g.host_root.join(p).exists();
        if !has("etc/initramfs-tools") && (has("etc/dracut.conf.d") || has("etc/dracut.conf")) {
            Initramfs::Dracut
        } else {
            Initramfs::Debian
        }
    });
    let p = plan(&inv, &selection, flavor, &current)?;
    for w in &p.warnings {
        tracing::warn!("{w}");
    }
    let mut out = String::new();
    let gpus_text: Vec<String> = p.gpus.iter().map(|a| a.to_string()).collect();
    let ids_text: Vec<String> = p.ids.iter().map(|i| i.to_string()).collect();
    out.push_str(&format!(
        "GPUs: {}\nvfio-pci ids: {}\n",
        gpus_text.join(" "),
        ids_text.join(",")
    ));
    let changed: Vec<_> = p.files.iter().filter(|f| f.changes()).collect();
    for f in &changed {
        let whose = if f.owned {
            "gpupass's own file"
        } else {
            "not gpupass's: lines are appended, nothing else changes"
        };
        out.push_str(&format!("\n/{} ({whose}):\n{}", f.path, f.diff()));
    }
    if changed.is_empty() {
        out.push_str("\nfiles: nothing to change\n");
    }
    out.push_str(&match p.cmdline_add.is_empty() {
        true => "\nkernel command line: nothing to add\n".to_owned(),
        false => format!("\nkernel command line: add {}\n", p.cmdline_add.join(" ")),
    });
    if write {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let backups = apply(&g.host_root, &p, now)?;
        for f in &changed {
            out.push_str(&format!("wrote /{}\n", f.path));
        }
        for b in &backups {
            out.push_str(&format!("kept the old file as {}\n", b.display()));
        }
    } else if !changed.is_empty() {
        out.push_str("\n(preview only: nothing written; run again with --apply)\n");
    }
    if !p.commands.is_empty() {
        out.push_str(if write {
            "\nstill to do (gpupass does not):\n"
        } else {
            "\nthen:\n"
        });
        for c in &p.commands {
            out.push_str(&format!("  {c}\n"));
        }
    }
    print_all(&out)
}
