//! A small stand-in for the kernel (`FakeKernel`) that reacts to writes under a writable copy
//! of a fixture host the way sysfs does: a driver's `unbind` and `bind`, `drivers_probe`
//! honouring `driver_override`, and a PF's `sriov_numvfs` making or destroying its VFs (each
//! VF directory with its `physfn` link, the PF's `virtfnN` links, a `bus/pci/devices` link and
//! an IOMMU group of its own), the new VFs probed by the PF's driver while
//! `sriov_drivers_autoprobe` is 1, and a non-zero count over another refused (EBUSY) as the
//! kernel does. Without it the kernel "does nothing" and gpupass must notice.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the stand-in misbehaves, for the failure paths.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quirks {
    /// Every `sriov_numvfs` write is refused: the count stays (the kernel returns an error).
    pub refuse_numvfs: bool,
    /// `drivers_probe` binds nothing.
    pub no_probe: bool,
}

/// Reacts to sysfs writes under a root until dropped.
pub struct FakeKernel {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    /// Every write it consumed, in order, as `write "VALUE" to PATH` (a dry run's words), and
    /// what it did on its own, as `probe BDF with DRIVER (autoprobe)`.
    seen: Arc<Mutex<Vec<String>>>,
}

type Seen = Mutex<Vec<String>>;

fn take(path: &Path, seen: &Seen) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let v = text.trim().to_owned();
    if v.is_empty() {
        return None;
    }
    fs::write(path, "").ok()?;
    seen.lock()
        .unwrap()
        .push(format!("write {v:?} to {}", path.display()));
    Some(v)
}

fn link_driver(sys: &Path, bdf: &str, driver: &str) {
    let dev = sys.join("bus/pci/devices").join(bdf);
    let _ = fs::remove_file(dev.join("driver"));
    std::os::unix::fs::symlink(sys.join("bus/pci/drivers").join(driver), dev.join("driver"))
        .unwrap();
}

/// The link `link` points at, with its last component replaced by `name`.
fn sibling_target(link: &Path, name: &str) -> PathBuf {
    fs::read_link(link).unwrap().with_file_name(name)
}

fn read_num(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn vf_bdf(pf: &str, offset: u32, stride: u32, i: u32) -> String {
    let a: gpupass::model::PciAddress = pf.parse().unwrap();
    let rid = (u32::from(a.bus) << 8 | u32::from(a.slot) << 3 | u32::from(a.function))
        + offset
        + stride * i;
    format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        a.domain,
        rid >> 8,
        (rid & 0xff) >> 3,
        rid & 7
    )
}

fn virtfns(pf_dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = fs::read_dir(pf_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("virtfn")?.parse::<u32>().ok()?;
            let target = fs::read_link(e.path()).ok()?;
            Some((name, target.file_name()?.to_string_lossy().into_owned()))
        })
        .collect();
    out.sort();
    out
}

fn destroy_vfs(sys: &Path, pf_dir: &Path) {
    for (link, vf) in virtfns(pf_dir) {
        let dir = pf_dir.with_file_name(&vf);
        if let Ok(g) = fs::read_link(dir.join("iommu_group")) {
            let group = g.file_name().unwrap().to_owned();
            let _ = fs::remove_dir_all(sys.join("kernel/iommu_groups").join(group));
        }
        let _ = fs::remove_file(sys.join("bus/pci/devices").join(&vf));
        for d in fs::read_dir(sys.join("bus/pci/drivers")).unwrap().flatten() {
            let _ = fs::remove_file(d.path().join(&vf));
        }
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_file(pf_dir.join(link)).unwrap();
    }
}

fn create_vfs(sys: &Path, pf: &str, pf_dir: &Path, n: u32, seen: &Seen) {
    let offset = read_num(&pf_dir.join("sriov_offset")).unwrap();
    let stride = read_num(&pf_dir.join("sriov_stride")).unwrap();
    let vf_device = fs::read_to_string(pf_dir.join("sriov_vf_device")).unwrap();
    let autoprobe = read_num(&pf_dir.join("sriov_drivers_autoprobe")) == Some(1);
    let groups = sys.join("kernel/iommu_groups");
    let first_group = fs::read_dir(&groups)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let pf_link = sys.join("bus/pci/devices").join(pf);
    let pf_group_link = pf_dir.join("iommu_group");
    let pf_group = fs::read_link(&pf_group_link).unwrap();
    let pf_group_dev = groups
        .join(pf_group.file_name().unwrap())
        .join("devices")
        .join(pf);
    let ln = |target: PathBuf, at: PathBuf| std::os::unix::fs::symlink(target, at).unwrap();
    for i in 0..n {
        let vf = vf_bdf(pf, offset, stride, i);
        let dir = pf_dir.with_file_name(&vf);
        fs::create_dir(&dir).unwrap();
        for e in fs::read_dir(pf_dir).unwrap().flatten() {
            let name = e.file_name().into_string().unwrap();
            let plain = e.file_type().unwrap().is_file();
            if plain && !name.starts_with("sriov_") && name != "driver_override" {
                fs::copy(e.path(), dir.join(&name)).unwrap();
            }
        }
        fs::write(dir.join("device"), format!("0x{}", vf_device.trim_start())).unwrap();
        fs::write(dir.join("driver_override"), "(null)\n").unwrap();
        ln(format!("../{pf}").into(), dir.join("physfn"));
        ln(
            sibling_target(&pf_link, &vf),
            sys.join("bus/pci/devices").join(&vf),
        );
        let g = (first_group + i).to_string();
        fs::create_dir_all(groups.join(&g).join("devices")).unwrap();
        ln(sibling_target(&pf_group_link, &g), dir.join("iommu_group"));
        ln(
            sibling_target(&pf_group_dev, &vf),
            groups.join(&g).join("devices").join(&vf),
        );
        if autoprobe {
            // The kernel probes a new VF with any matching driver: the PF's own takes it.
            if let Ok(d) = fs::read_link(pf_dir.join("driver")) {
                let d = d.file_name().unwrap().to_string_lossy().into_owned();
                link_driver(sys, &vf, &d);
                seen.lock()
                    .unwrap()
                    .push(format!("probe {vf} with {d} (autoprobe)"));
            }
        }
    }
    // The PF's links last: whoever waits for them sees whole VFs, probed, as after the
    // kernel's synchronous write.
    for i in 0..n {
        let vf = vf_bdf(pf, offset, stride, i);
        ln(format!("../{vf}").into(), pf_dir.join(format!("virtfn{i}")));
    }
}

/// SR-IOV: a changed `sriov_numvfs` makes or destroys VFs; `counts` is what each PF had.
fn sriov_tick(sys: &Path, counts: &mut BTreeMap<String, u32>, quirks: Quirks, seen: &Seen) {
    let devices = sys.join("bus/pci/devices");
    let Ok(all) = fs::read_dir(&devices) else {
        return;
    };
    for e in all.flatten() {
        let pf = e.file_name().into_string().unwrap();
        let Ok(pf_dir) = fs::canonicalize(e.path()) else {
            continue;
        };
        let file = pf_dir.join("sriov_numvfs");
        let Some(want) = read_num(&file) else {
            continue;
        };
        let have = *counts
            .entry(pf.clone())
            .or_insert_with(|| virtfns(&pf_dir).len() as u32);
        if want == have {
            continue;
        }
        seen.lock().unwrap().push(format!(
            "write \"{want}\" to {}",
            devices.join(&pf).join("sriov_numvfs").display()
        ));
        let total = read_num(&pf_dir.join("sriov_totalvfs")).unwrap_or(0);
        if quirks.refuse_numvfs || (have > 0 && want > 0) || want > total {
            // The write fails; the count the PF shows stays.
            fs::write(&file, format!("{have}\n")).unwrap();
            seen.lock()
                .unwrap()
                .push(format!("refuse {want} VFs on {pf}"));
            continue;
        }
        if want == 0 {
            destroy_vfs(sys, &pf_dir);
        } else {
            create_vfs(sys, &pf, &pf_dir, want, seen);
        }
        // The file already says `want` (it was written): rewriting it would race with readers.
        counts.insert(pf, want);
    }
}

fn tick(sys: &Path, counts: &mut BTreeMap<String, u32>, quirks: Quirks, seen: &Seen) {
    sriov_tick(sys, counts, quirks, seen);
    let drivers = sys.join("bus/pci/drivers");
    let all: Vec<_> = fs::read_dir(&drivers).unwrap().flatten().collect();
    // Unbinds before binds, as the writes were made.
    for d in &all {
        if let Some(bdf) = take(&d.path().join("unbind"), seen) {
            let _ = fs::remove_file(sys.join("bus/pci/devices").join(&bdf).join("driver"));
            let _ = fs::remove_file(d.path().join(&bdf));
        }
    }
    for d in &all {
        if let Some(bdf) = take(&d.path().join("bind"), seen) {
            link_driver(sys, &bdf, &d.file_name().into_string().unwrap());
        }
    }
    if let Some(bdf) = take(&sys.join("bus/pci/drivers_probe"), seen) {
        let dev = sys.join("bus/pci/devices").join(&bdf);
        let ov = fs::read_to_string(dev.join("driver_override")).unwrap_or_default();
        let ov = ov.trim();
        let bound = fs::symlink_metadata(dev.join("driver")).is_ok();
        if !quirks.no_probe
            && !bound
            && !ov.is_empty()
            && ov != "(null)"
            && drivers.join(ov).is_dir()
        {
            link_driver(sys, &bdf, ov);
        }
    }
}

impl FakeKernel {
    /// A kernel that follows every write.
    pub fn start(root: &Path) -> Self {
        Self::with(root, Quirks::default())
    }

    /// A kernel with `quirks`.
    pub fn with(root: &Path, quirks: Quirks) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sys = root.join("sys");
        let s = stop.clone();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let handle = std::thread::spawn(move || {
            let mut counts = BTreeMap::new();
            while !s.load(Ordering::Relaxed) {
                tick(&sys, &mut counts, quirks, &log);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        FakeKernel {
            stop,
            handle: Some(handle),
            seen,
        }
    }

    /// What it saw and did since the last call.
    pub fn seen(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for FakeKernel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
