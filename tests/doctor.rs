//! `gpupass doctor` on every fixture host and on this machine's real root (read-only: no IOMMU
//! here, and it must say so without crashing or writing anything).

mod common;

use std::collections::BTreeMap;

use common::{gpupass, host, run, Run};
use serde_json::Value;

fn doctor(root: &std::path::Path, extra: &[&str]) -> (Run, Value) {
    let t = tempfile::tempdir().unwrap();
    let mut c = gpupass(root, t.path());
    c.args(["doctor", "--json"]).args(extra);
    let r = run(c);
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", r.stdout, r.stderr));
    (r, v)
}

/// name -> (status, seen, fix)
fn by_name(v: &Value) -> BTreeMap<String, (String, String, Option<String>)> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                (
                    c["status"].as_str().unwrap().to_owned(),
                    c["seen"].as_str().unwrap().to_owned(),
                    c["fix"].as_str().map(str::to_owned),
                ),
            )
        })
        .collect()
}

fn status<'a>(m: &'a BTreeMap<String, (String, String, Option<String>)>, name: &str) -> &'a str {
    &m.get(name)
        .unwrap_or_else(|| panic!("no check {name:?}: {:?}", m.keys()))
        .0
}

#[test]
fn every_check_has_a_status_what_was_seen_and_a_fix_when_not_ok() {
    for name in common::HOSTS {
        let (r, v) = doctor(&host(name), &["--no-libvirt"]);
        let failed = v["fail"].as_u64().unwrap();
        assert_eq!(
            r.code,
            if failed > 0 { 13 } else { 0 },
            "{name}: {}",
            r.stderr
        );
        for (check, (st, seen, fix)) in by_name(&v) {
            assert!(
                ["ok", "warn", "fail", "skipped"].contains(&st.as_str()),
                "{name} {check}"
            );
            assert!(!seen.is_empty(), "{name} {check}");
            if st == "warn" || st == "fail" {
                assert!(fix.is_some(), "{name} {check}: no fix");
            }
        }
    }
}

#[test]
fn hgx_is_ready_but_one_gpu_is_held_by_nvidia_persistenced() {
    let (r, v) = doctor(&host("hgx-8gpu"), &["--no-libvirt"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = by_name(&v);
    assert_eq!(status(&m, "iommu"), "ok");
    assert!(m["iommu"].1.contains("intel_iommu=on iommu=pt"));
    assert_eq!(status(&m, "iommu passthrough mode"), "ok");
    assert_eq!(status(&m, "vfio modules"), "ok");
    assert_eq!(status(&m, "/dev/vfio/vfio"), "ok");
    assert_eq!(status(&m, "gpu 0000:ba:00.0 drivers"), "warn");
    assert!(m["gpu 0000:ba:00.0 drivers"]
        .1
        .contains("pid 4242 (nvidia-persistenced) holds /dev/nvidia6"));
    assert_eq!(
        status(&m, "gpu 0000:db:00.0 drivers"),
        "ok",
        "on nvidia but nobody holds it"
    );
    assert_eq!(status(&m, "gpu 0000:18:00.0 reset"), "ok");
    assert_eq!(status(&m, "gpu 0000:03:00.0 console"), "warn");
    assert_eq!(
        status(&m, "gpu 0000:03:00.0 reset"),
        "warn",
        "reset_method is empty"
    );
    assert_eq!(status(&m, "gpu 0000:9a:00.0 numa"), "ok");
    assert_eq!(status(&m, "libvirt"), "skipped");
    assert_eq!(status(&m, "gpupass hook"), "warn");
    // --gpu restricts the per-GPU checks.
    let (_, one) = doctor(
        &host("hgx-8gpu"),
        &["--no-libvirt", "--gpu", "0000:9a:00.0"],
    );
    let names: Vec<String> = by_name(&one)
        .into_keys()
        .filter(|n| n.starts_with("gpu "))
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("gpu 0000:9a:00.0")),
        "{names:?}"
    );
    let t = tempfile::tempdir().unwrap();
    let mut c = gpupass(&host("hgx-8gpu"), t.path());
    c.args(["doctor", "--gpu", "0000:77:00.0", "--no-libvirt"]);
    assert_eq!(run(c).code, 3);
}

#[test]
fn blocked_groups_iommu_off_and_unsafe_interrupts_are_named() {
    let (r, v) = doctor(&host("no-acs-shared"), &["--no-libvirt"]);
    assert_eq!(r.code, 13);
    let m = by_name(&v);
    assert_eq!(status(&m, "gpu 0000:04:00.0 passable"), "fail");
    assert!(m["gpu 0000:04:00.0 passable"].1.contains("ixgbe"));
    assert_eq!(status(&m, "gpu 0000:81:00.0 passable"), "ok");
    assert_eq!(status(&m, "iommu passthrough mode"), "warn");

    let (r, v) = doctor(&host("iommu-off"), &["--no-libvirt"]);
    assert_eq!(r.code, 13);
    let m = by_name(&v);
    assert_eq!(status(&m, "iommu"), "fail");
    assert!(
        m["iommu"].2.as_deref().unwrap().contains("intel_iommu=on"),
        "an Intel host"
    );
    // The console's blockers are a warning; the V100's a failure.
    assert_eq!(status(&m, "gpu 0000:03:00.0 passable"), "warn");
    assert_eq!(status(&m, "gpu 0000:3b:00.0 passable"), "fail");

    let (r, v) = doctor(&host("seeds-k4200"), &["--no-libvirt"]);
    assert_eq!(r.code, 0);
    assert_eq!(status(&by_name(&v), "interrupt remapping"), "warn");

    let (_, v) = doctor(&host("consumer-4fn"), &["--no-libvirt"]);
    let m = by_name(&v);
    assert_eq!(status(&m, "vfio modules"), "warn");
    assert!(m["gpu 0000:01:00.0 drivers"]
        .1
        .contains("pid 1200 (Xorg) holds /dev/dri/card1"));
    assert_eq!(
        status(&m, "gpu 0000:01:00.0 numa"),
        "ok",
        "unknown NUMA on a one-node host is fine"
    );
    let (_, v) = doctor(&host("amd-arc-multidomain"), &["--no-libvirt"]);
    assert!(by_name(&v)["iommu"].1.contains("amd_iommu=on"));
}

/// This machine: a VM with no IOMMU and no vfio. doctor reads its real /sys and /proc (never
/// writes), reports the IOMMU as the failure with the AMD or Intel fix, and exits 13.
#[test]
fn on_this_machines_real_root_it_says_the_iommu_is_off() {
    let (r, v) = doctor(std::path::Path::new("/"), &["--no-libvirt"]);
    let m = by_name(&v);
    if std::path::Path::new("/sys/kernel/iommu_groups/0").exists() {
        eprintln!("SKIPPED: this machine has an IOMMU");
        return;
    }
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert_eq!(status(&m, "iommu"), "fail");
    let fix = m["iommu"].2.clone().unwrap();
    assert!(
        fix.contains("intel_iommu=on") || fix.contains("amd_iommu=on"),
        "{fix}"
    );
    assert!(
        m.keys().all(|k| !k.starts_with("gpu 0000:00:")),
        "this machine's devices are no GPUs: {m:?}"
    );
}
