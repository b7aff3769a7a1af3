//! Discovery and verdicts on every fixture host, through the library and through
//! `gpupass list --json` / `show --json`.

mod common;

use common::{gpupass, host, listed_gpu as gpu, run, HOSTS};
use gpupass::host::discover::{discover, Inventory};
use gpupass::host::readiness::{verdict, Blocker};
use gpupass::host::sysfs::Sysfs;
use gpupass::model::PciAddress;
use serde_json::Value;

fn inv(name: &str) -> Inventory {
    discover(&Sysfs::new(host(name))).expect("fixture host reads")
}

fn a(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn list_json(name: &str) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = gpupass(&host(name), tmp.path());
    c.args(["list", "--json", "--no-libvirt"]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).expect("list --json is JSON")
}

#[test]
fn hgx_has_eight_h100_on_two_nodes_and_a_bmc_console() {
    let i = inv("hgx-8gpu");
    let h100: Vec<_> = i
        .gpus
        .iter()
        .filter(|g| i.device(g.address).unwrap().id.to_string() == "10de:2330")
        .collect();
    assert_eq!(h100.len(), 8);
    // NVSwitches (class 0680) and ConnectX NICs are not GPUs.
    assert_eq!(i.gpus.len(), 9);
    for g in &h100 {
        assert_eq!(g.functions, [g.address], "H100 SXM is single-function");
        let v = verdict(&i, g);
        assert!(v.viable, "{}: {:?}", g.address, v.blockers);
        assert!(!v.boot_vga);
    }
    let nodes: Vec<Option<u32>> = h100
        .iter()
        .map(|g| i.device(g.address).unwrap().numa_node.map(|n| n.0))
        .collect();
    assert_eq!(nodes.iter().filter(|n| **n == Some(0)).count(), 4);
    assert_eq!(nodes.iter().filter(|n| **n == Some(1)).count(), 4);
    let bmc = i.gpu(a("0000:03:00.0")).unwrap();
    let v = verdict(&i, bmc);
    assert!(
        v.boot_vga && v.viable,
        "bridges in its group do not block: {v:?}"
    );

    let list = list_json("hgx-8gpu");
    let on_nvidia: Vec<&str> = list["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["driver"] == "nvidia")
        .map(|g| g["address"].as_str().unwrap())
        .collect();
    assert_eq!(on_nvidia, ["0000:ba:00.0", "0000:db:00.0"]);
    let g = gpu(&list, "0000:9a:00.0");
    assert_eq!(g["vendor_id"], "10de");
    assert_eq!(g["device_id"], "2330");
    assert_eq!(g["vendor_name"], "NVIDIA Corporation");
    assert!(g["device_name"].as_str().unwrap().contains("H100"));
    assert_eq!(g["class"], "030200");
    assert_eq!(g["numa_node"], 1);
    assert_eq!(g["subsystem_vendor_id"], "10de");
    assert_eq!(g["subsystem_device_id"], "16c1");
    assert_eq!(g["reset_method"], "bus");
    assert_eq!(g["viable"], true);
    assert_eq!(g["boot_vga"], false);
    assert_eq!(g["used_by"], Value::Null);
    assert_eq!(g["references"], Value::Null, "unknown without libvirt");
    assert_eq!(gpu(&list, "0000:03:00.0")["boot_vga"], true);
    assert_eq!(list["iommu"]["enabled"], true);
    assert_eq!(
        list["iommu"]["cmdline"],
        serde_json::json!(["intel_iommu=on", "iommu=pt"])
    );
    assert_eq!(list["libvirt"]["connected"], false);
}

#[test]
fn consumer_card_is_four_functions_in_one_group() {
    let i = inv("consumer-4fn");
    let g = i.gpu(a("0000:01:00.0")).unwrap();
    let fns: Vec<String> = g.functions.iter().map(|f| f.to_string()).collect();
    assert_eq!(
        fns,
        [
            "0000:01:00.0",
            "0000:01:00.1",
            "0000:01:00.2",
            "0000:01:00.3"
        ]
    );
    let v = verdict(&i, g);
    assert!(v.viable, "own functions on host drivers are fine: {v:?}");
    assert_eq!(v.iommu_groups.len(), 1);
    // The iGPU is the console and a separate GPU.
    assert!(verdict(&i, i.gpu(a("0000:00:02.0")).unwrap()).boot_vga);

    let list = list_json("consumer-4fn");
    let g = gpu(&list, "0000:01:00.0");
    let classes: Vec<&str> = g["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["class"].as_str().unwrap())
        .collect();
    assert_eq!(classes, ["030000", "040300", "0c0330", "0c8000"]);
    let drivers: Vec<&str> = g["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["driver"].as_str().unwrap())
        .collect();
    assert_eq!(
        drivers,
        ["nvidia", "snd_hda_intel", "xhci_hcd", "nvidia-gpu"]
    );
    assert_eq!(g["numa_node"], Value::Null, "-1 is unknown");
}

#[test]
fn a_group_shared_with_the_host_nic_blocks_and_names_it() {
    let i = inv("no-acs-shared");
    for addr in ["0000:04:00.0", "0000:05:00.0"] {
        let v = verdict(&i, i.gpu(a(addr)).unwrap());
        assert!(!v.viable);
        let named: Vec<String> = v
            .blockers
            .iter()
            .map(|b| match b {
                Blocker::DeviceInUse { device, driver, .. } => format!("{device} {driver}"),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(named, ["0000:06:00.0 ixgbe", "0000:06:00.1 ixgbe"]);
        assert_eq!(v.group_peers.len(), 1);
    }
    assert!(verdict(&i, i.gpu(a("0000:81:00.0")).unwrap()).viable);
    let list = list_json("no-acs-shared");
    let b = &gpu(&list, "0000:04:00.0")["blockers"][0];
    assert_eq!(b["kind"], "group_device_in_use");
    assert_eq!(b["device"], "0000:06:00.0");
    assert_eq!(b["class"], "020000");
    assert_eq!(b["driver"], "ixgbe");
    assert_eq!(b["iommu_group"], 12);
}

#[test]
fn seeds_k4200_pairs_are_on_pci_stub_and_passable() {
    let i = inv("seeds-k4200");
    for addr in ["0000:03:00.0", "0000:82:00.0"] {
        let g = i.gpu(a(addr)).unwrap();
        assert_eq!(g.functions.len(), 2);
        for f in &g.functions {
            assert_eq!(i.device(*f).unwrap().driver.as_deref(), Some("pci-stub"));
        }
        assert!(verdict(&i, g).viable);
    }
    let list = list_json("seeds-k4200");
    assert_eq!(gpu(&list, "0000:03:00.0")["device_id"], "11b4");
    assert_eq!(
        gpu(&list, "0000:03:00.0")["functions"][1]["device_id"],
        "0e0a"
    );
}

#[test]
fn iommu_off_blocks_every_gpu_and_says_so() {
    let i = inv("iommu-off");
    assert!(!i.iommu.enabled());
    assert!(i.iommu.cmdline.is_empty());
    for g in &i.gpus {
        assert_eq!(verdict(&i, g).blockers, [Blocker::IommuOff]);
    }
    let list = list_json("iommu-off");
    let g = gpu(&list, "0000:3b:00.0");
    assert_eq!(g["iommu_group"], Value::Null);
    assert_eq!(g["blockers"][0]["kind"], "iommu_off");
    let tmp = tempfile::tempdir().unwrap();
    let mut c = gpupass(&host("iommu-off"), tmp.path());
    c.args(["list", "--no-libvirt"]);
    let r = run(c);
    assert_eq!(r.code, 0);
    assert!(r.stdout.starts_with("IOMMU: off"), "{}", r.stdout);
}

#[test]
fn amd_and_arc_including_audio_on_another_bus_and_domain_0001() {
    let i = inv("amd-arc-multidomain");
    let amd = i.gpu(a("0000:0c:00.0")).unwrap();
    assert_eq!(amd.functions, [a("0000:0c:00.0"), a("0000:0c:00.1")]);
    assert!(verdict(&i, amd).viable);
    let arc = i.gpu(a("0001:03:00.0")).unwrap();
    assert_eq!(arc.functions, [a("0001:03:00.0"), a("0001:04:00.0")]);
    let v = verdict(&i, arc);
    assert!(
        v.viable,
        "its own audio and switch ports do not block: {v:?}"
    );
    // The audio function names its GPU.
    assert_eq!(i.gpu(a("0001:04:00.0")).unwrap().address, a("0001:03:00.0"));
    let list = list_json("amd-arc-multidomain");
    assert_eq!(
        gpu(&list, "0001:03:00.0")["functions"][1]["address"],
        "0001:04:00.0"
    );
}

#[test]
fn show_prints_one_gpu_in_full_from_any_function() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = gpupass(&host("consumer-4fn"), tmp.path());
    c.args(["show", "0000:01:00.2", "--json", "--no-libvirt"]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let g: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(g["address"], "0000:01:00.0");
    assert_eq!(g["iommu_group_members"].as_array().unwrap().len(), 5);
    let mut c = gpupass(&host("consumer-4fn"), tmp.path());
    c.args(["show", "0000:01:00.0", "--no-libvirt"]);
    let r = run(c);
    assert!(r.stdout.contains("0000:01:00.3  10de:1ad7"), "{}", r.stdout);
}

#[test]
fn every_fixture_lists_in_both_formats() {
    for name in HOSTS {
        let list = list_json(name);
        assert!(!list["gpus"].as_array().unwrap().is_empty(), "{name}");
        let tmp = tempfile::tempdir().unwrap();
        let mut c = gpupass(&host(name), tmp.path());
        c.args(["list", "--no-libvirt"]);
        let r = run(c);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        assert!(r.stdout.contains("ADDRESS"), "{name}");
        assert!(r.stderr.is_empty(), "{name}: {}", r.stderr);
    }
}

/// Each device a scoped discovery read is the device a full one reads: the same IDs, class,
/// parent and SR-IOV role (a bridge above a card is read leanly, from the devices directory).
fn assert_devices_as_full(name: &str, scoped: &Inventory, full: &Inventory) {
    for (a, d) in &scoped.devices {
        let f = &full.devices[a];
        assert_eq!(
            (d.id, d.class, d.parent, d.virtfn),
            (f.id, f.class, f.parent, f.virtfn),
            "{name} {a}"
        );
    }
}

/// The hook's scoped discoveries (every GPU; or only around given devices) see each GPU exactly
/// as a full discovery does: same functions, same verdict.
#[test]
fn scoped_discovery_judges_every_gpu_like_a_full_one() {
    use gpupass::host::discover::{discover_with, Scope};
    // The vGPU hosts too: their VFs are read as VFs, never GPUs, in every scope.
    for name in HOSTS.iter().copied().chain(["vgpu-nvidia", "vgpu-intel"]) {
        let sysfs = Sysfs::new(host(name));
        let full = inv(name);
        let gpus_only = discover_with(&sysfs, &Scope::Gpus, false).unwrap();
        assert_devices_as_full(name, &gpus_only, &full);
        assert_eq!(gpus_only.iommu.enabled(), full.iommu.enabled(), "{name}");
        assert_eq!(
            gpus_only.gpus, full.gpus,
            "{name}: the same GPUs and functions"
        );
        assert!(gpus_only.devices.len() <= full.devices.len());
        for g in &full.gpus {
            let want = verdict(&full, g);
            assert_eq!(
                verdict(&gpus_only, gpus_only.gpu(g.address).unwrap()),
                want,
                "{name} {}",
                g.address
            );
            // Around one function of the GPU: the hook's prepare.
            let around = discover_with(
                &sysfs,
                &Scope::Around(vec![*g.functions.last().unwrap()]),
                false,
            )
            .unwrap();
            assert_devices_as_full(name, &around, &full);
            let seen = around
                .gpu(g.address)
                .unwrap_or_else(|| panic!("{name}: {} not found around", g.address));
            assert_eq!(seen.functions, g.functions, "{name} {}", g.address);
            assert_eq!(verdict(&around, seen), want, "{name} {}", g.address);
        }
    }
}

#[test]
fn show_prints_each_functions_bars_and_the_window_the_gpu_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = gpupass(&host("hgx-8gpu"), tmp.path());
    c.args(["show", "0000:18:00.0", "--json", "--no-libvirt"]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let g: Value = serde_json::from_str(&r.stdout).unwrap();
    let bars = &g["bars"];
    assert_eq!(bars["prefetchable_64"], (128u64 << 30) + (32 << 20));
    assert_eq!(bars["window"], 256u64 << 30);
    let sizes: Vec<(u64, u64, bool)> = bars["functions"][0]["bars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["index"].as_u64().unwrap(),
                b["size"].as_u64().unwrap(),
                b["prefetchable_64"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        sizes,
        [
            (0, 16 << 20, false),
            (1, 128 << 30, true),
            (3, 32 << 20, true)
        ]
    );
    let mut c = gpupass(&host("consumer-4fn"), tmp.path());
    c.args(["show", "0000:01:00.0", "--no-libvirt"]);
    let r = run(c);
    assert!(
        r.stdout.contains(
            "bars:         64-bit prefetchable 288.25 MiB -> needs a 512 MiB guest window"
        ),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("0000:01:00.2  BAR0   256 KiB  64-bit pref"),
        "{}",
        r.stdout
    );
}
