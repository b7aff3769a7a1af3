//! vGPU discovery on the vGPU fixture hosts: `list --json` and `show` report each GPU's SR-IOV
//! VFs, mdev types (on the PF and on VFs), NVIDIA vendor-VFIO types, GVT-g types and the mdev
//! instances, with `used_by` from libvirt (the in-process test driver loaded with the fixture's
//! own domain files) and from libvirt's files (what the hook reads). A VF is never a GPU.
//! `attach --vgpu vf` on these hosts: a held VF, its PF whole, VFs on a host driver and
//! counts beyond the free VFs are refused before any change.

mod common;

use std::fs;
use std::path::Path;

use serde_json::Value;

use common::{gpupass, host, host_copy, listed_gpu, run, Run};

const T4_MDEV: &str = "2b6d4c1e-3f5a-4b7c-8d9e-0a1b2c3d4e5f";
const GVT_MDEV: &str = "7c9e1f20-5a3b-4c8d-9e0f-1a2b3c4d5e6f";

/// A libvirt test-driver node holding the host's defined domains (`etc/libvirt/qemu/*.xml`)
/// as running ones; returns its URI.
fn node_of(root: &Path, t: &tempfile::TempDir) -> String {
    let mut body = String::from("<node>\n");
    let dir = root.join("etc/libvirt/qemu");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no domain files in {}", dir.display());
    for f in files {
        let xml = fs::read_to_string(f).unwrap();
        body.push_str(&xml.replace("<domain type='kvm'>", "<domain type='test'>"));
    }
    body.push_str("</node>\n");
    let node = t.path().join("node.xml");
    fs::write(&node, body).unwrap();
    format!("test://{}", node.display())
}

fn gp(root: &Path, args: &[&str]) -> Run {
    let t = tempfile::tempdir().unwrap();
    let mut c = gpupass(root, t.path());
    c.args(args);
    run(c)
}

/// `list --json` of a fixture host with its domains in libvirt's test driver.
fn listed(name: &str) -> Value {
    let t = tempfile::tempdir().unwrap();
    let root = host(name);
    let uri = node_of(&root, &t);
    let r = gp(&root, &["-c", &uri, "list", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["libvirt"]["connected"], true, "{}", r.stderr);
    v
}

fn addresses(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x["address"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn nvidia_mdev_types_on_the_pf_with_an_instance_a_domain_holds() {
    let v = listed("vgpu-nvidia");
    let t4 = &listed_gpu(&v, "0000:3b:00.0")["vgpu"];
    assert_eq!(t4["sriov"], Value::Null);
    let types = t4["types"].as_array().unwrap();
    let ids: Vec<&str> = types.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["nvidia-222", "nvidia-228", "nvidia-231", "nvidia-233"]
    );
    let q2 = &types[2];
    assert_eq!(q2["name"], "GRID T4-2Q");
    assert_eq!(q2["parent"], "0000:3b:00.0");
    assert_eq!(q2["source"], "mdev");
    assert_eq!(q2["device_api"], "vfio-pci");
    assert_eq!(q2["available_instances"], 7);
    assert_eq!(q2["framebuffer_mib"], 2048);
    assert_eq!(q2["max_heads"], 4);
    assert_eq!(q2["max_resolution"], "7680x4320");
    assert_eq!(q2["max_instances"], 8);
    assert!(q2["description"]
        .as_str()
        .unwrap()
        .starts_with("num_heads=4, frl_config=60, framebuffer=2048M"));
    assert!(q2.get("gvt").is_none(), "{q2}");
    // Time-sliced: the other types have no room left.
    assert_eq!(types[0]["available_instances"], 0);
    let inst = &t4["instances"];
    assert_eq!(
        inst,
        &serde_json::json!([{"uuid": T4_MDEV, "type": "nvidia-231", "parent": "0000:3b:00.0", "used_by": "vm-t4-mdev"}])
    );
    // The whole T4 is not in use: its mdev is (fractions and whole GPU exclude each other
    // later; discovery only reports).
    assert_eq!(listed_gpu(&v, "0000:3b:00.0")["used_by"], Value::Null);
    // A GPU with no fraction at all.
    assert_eq!(listed_gpu(&v, "0000:03:00.0")["vgpu"], Value::Null);
}

#[test]
fn an_a10s_types_live_on_its_vfs_which_are_neither_functions_nor_gpus() {
    let v = listed("vgpu-nvidia");
    assert_eq!(
        addresses(&v["gpus"]),
        [
            "0000:03:00.0",
            "0000:1a:00.0",
            "0000:3b:00.0",
            "0000:ca:00.0"
        ]
    );
    let a10 = listed_gpu(&v, "0000:ca:00.0");
    // The VFs share the PF's slot, yet are not its functions.
    assert_eq!(addresses(&a10["functions"]), ["0000:ca:00.0"]);
    let s = &a10["vgpu"]["sriov"];
    assert_eq!(s["total_vfs"], 32);
    assert_eq!(s["num_vfs"], 4);
    let vfs = addresses(&s["vfs"]);
    assert_eq!(
        vfs,
        [
            "0000:ca:00.4",
            "0000:ca:00.5",
            "0000:ca:00.6",
            "0000:ca:00.7"
        ]
    );
    let vf = &s["vfs"][0];
    assert_eq!(vf["driver"], "nvidia");
    assert_eq!(vf["on_vfio"], false);
    assert_eq!(vf["iommu_group"], 42);
    assert_eq!(vf["used_by"], Value::Null);
    let types = a10["vgpu"]["types"].as_array().unwrap();
    assert_eq!(types.len(), 8, "two types on each of the 4 VFs");
    assert!(types.iter().all(|t| t["source"] == "mdev"));
    let parents: std::collections::BTreeSet<&str> = types
        .iter()
        .map(|t| t["parent"].as_str().unwrap())
        .collect();
    assert_eq!(
        parents.into_iter().collect::<Vec<_>>(),
        vfs.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(types[0]["name"], "NVIDIA A10-4Q");
    assert_eq!(types[0]["framebuffer_mib"], 4096);
    assert_eq!(types[1]["max_instances"], 1);
    assert_eq!(a10["vgpu"]["instances"], serde_json::json!([]));
    // `show`, `xml` and `attach --gpu` of a VF name no GPU: the VF is a fraction of its PF.
    for args in [
        &["show", "0000:ca:00.4", "--no-libvirt"][..],
        &["xml", "0000:ca:00.4"],
        &[
            "-c",
            "test:///default",
            "attach",
            "test",
            "--gpu",
            "0000:ca:00.4",
        ],
    ] {
        let r = gp(&host("vgpu-nvidia"), args);
        assert_eq!(r.code, 3, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr
                .contains("0000:ca:00.4 is an SR-IOV virtual function, not a whole GPU"),
            "{}",
            r.stderr
        );
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    }
}

#[test]
fn an_h200s_vendor_specific_vfio_types_and_current_type() {
    let v = listed("vgpu-nvidia");
    let h200 = &listed_gpu(&v, "0000:1a:00.0")["vgpu"];
    assert_eq!(h200["sriov"]["total_vfs"], 16);
    let vfs = &h200["sriov"]["vfs"];
    assert_eq!(vfs[0]["current_type"], Value::Null);
    assert_eq!(vfs[1]["current_type"], 1414);
    assert_eq!(
        h200["types"],
        serde_json::json!([
            {"id": "1428", "name": "NVIDIA H200X-141C", "description": null, "available_instances": 1,
             "device_api": null, "parent": "0000:1a:00.4", "source": "nvidia-vfio",
             "framebuffer_mib": null, "max_heads": null, "max_resolution": null, "max_instances": null},
            {"id": "1414", "name": "NVIDIA H200X-1-18C", "description": null, "available_instances": 1,
             "device_api": null, "parent": "0000:1a:00.4", "source": "nvidia-vfio",
             "framebuffer_mib": null, "max_heads": null, "max_resolution": null, "max_instances": null}
        ])
    );
}

#[test]
fn gvt_types_and_an_sr_iov_gpu_whose_vf_a_domain_holds() {
    let v = listed("vgpu-intel");
    assert_eq!(
        addresses(&v["gpus"]),
        ["0000:00:02.0", "0000:4d:00.0"],
        "the Flex's VFs are not GPUs"
    );
    let igpu = &listed_gpu(&v, "0000:00:02.0")["vgpu"];
    assert_eq!(igpu["sriov"], Value::Null);
    let v54 = &igpu["types"][0];
    assert_eq!(v54["id"], "i915-GVTg_V5_4");
    assert_eq!(v54["framebuffer_mib"], 640);
    assert_eq!(v54["max_resolution"], "1920x1200");
    assert_eq!(
        v54["gvt"],
        serde_json::json!({"low_gm_mib": 128, "high_gm_mib": 512, "fence": 4, "weight": 4})
    );
    assert_eq!(igpu["types"][1]["available_instances"], 2);
    assert_eq!(igpu["instances"][0]["uuid"], GVT_MDEV);
    assert_eq!(igpu["instances"][0]["used_by"], Value::Null);
    let flex = listed_gpu(&v, "0000:4d:00.0");
    assert_eq!(addresses(&flex["functions"]), ["0000:4d:00.0"]);
    let s = &flex["vgpu"]["sriov"];
    assert_eq!(
        (s["total_vfs"].clone(), s["num_vfs"].clone()),
        (31.into(), 2.into())
    );
    assert_eq!(s["vfs"][0]["address"], "0000:4d:00.1");
    assert_eq!(s["vfs"][0]["on_vfio"], true);
    assert_eq!(s["vfs"][0]["used_by"], "vm-flex-vf");
    assert_eq!(s["vfs"][1]["used_by"], Value::Null);
    assert_eq!(flex["vgpu"]["types"], serde_json::json!([]));
    assert_eq!(
        flex["used_by"],
        Value::Null,
        "a VF's user holds no whole GPU"
    );
}

#[test]
fn show_summarises_the_fractions_and_its_json_matches_list() {
    let t = tempfile::tempdir().unwrap();
    let root = host("vgpu-intel");
    let uri = node_of(&root, &t);
    let r = gp(&root, &["-c", &uri, "show", "0000:4d:00.0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for line in [
        "  vgpu:         2/31 VFs (1 in use)\n",
        "    sr-iov: 2 of 31 VFs enabled, 2 on vfio, 1 in use\n",
        "      0000:4d:00.1  driver=vfio-pci group=41 used by vm-flex-vf\n",
    ] {
        assert!(r.stdout.contains(line), "{line:?} not in\n{}", r.stdout);
    }
    let r = gp(&root, &["-c", &uri, "show", "0000:00:02.0"]);
    for line in [
        "  vgpu:         2 types, 1 mdev\n",
        "      i915-GVTg_V5_4 GVTg_V5_4 (640 MiB): 1 available\n",
        &format!("      {GVT_MDEV}  type=i915-GVTg_V5_4 parent=0000:00:02.0\n"),
    ] {
        assert!(r.stdout.contains(line), "{line:?} not in\n{}", r.stdout);
    }
    let r = gp(&root, &["-c", &uri, "show", "0000:00:02.0", "--json"]);
    let shown: Value = serde_json::from_str(&r.stdout).unwrap();
    let v = listed("vgpu-intel");
    assert_eq!(shown["vgpu"], listed_gpu(&v, "0000:00:02.0")["vgpu"]);
    // The list's VGPU column.
    let r = gp(&root, &["-c", &uri, "list"]);
    assert!(
        r.stdout.lines().next().unwrap().contains("  VGPU  "),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("0000:4d:00.0") && l.contains("2/31 VFs")),
        "{}",
        r.stdout
    );
}

#[test]
fn without_libvirt_users_are_unknown_and_hosts_without_fractions_say_null() {
    let r = gp(&host("vgpu-intel"), &["list", "--json", "--no-libvirt"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let flex = listed_gpu(&v, "0000:4d:00.0");
    assert_eq!(flex["vgpu"]["sriov"]["vfs"][0]["used_by"], Value::Null);
    // Every GPU of a host without vGPU support has the key, null.
    let r = gp(&host("hgx-8gpu"), &["list", "--json", "--no-libvirt"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    for g in v["gpus"].as_array().unwrap() {
        assert_eq!(g.get("vgpu"), Some(&Value::Null), "{}", g["address"]);
    }
}

/// The hook's view (libvirt's own files, no daemon): the domain files record the mdev by UUID
/// and the VF by address.
#[test]
fn libvirt_files_record_mdevs_and_vfs() {
    let h = gpupass::libvirt::files::all_holdings(&host("vgpu-nvidia"), "", None).unwrap();
    let uuid: gpupass::model::MdevUuid = T4_MDEV.parse().unwrap();
    let holders = h.mdev_holders(&uuid);
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].domain, "vm-t4-mdev");
    assert!(!holders[0].running, "a defined domain's file");
    let h = gpupass::libvirt::files::all_holdings(&host("vgpu-intel"), "", None).unwrap();
    let vf = "0000:4d:00.1".parse().unwrap();
    assert_eq!(h.holders(&[vf])[0].domain, "vm-flex-vf");
    assert!(h.mdev_holders(&GVT_MDEV.parse().unwrap()).is_empty());
}

/// Malformed vGPU files never fail `list` nor panic: each is skipped with a warning naming the
/// file, and what it would have said is null or left out.
#[test]
fn malformed_files_are_skipped_with_a_warning() {
    let root = host_copy("vgpu-nvidia");
    let dev = |a: &str| root.path().join("sys/bus/pci/devices").join(a);
    let types = dev("0000:3b:00.0").join("mdev_supported_types");
    fs::write(types.join("nvidia-231/available_instances"), "lots\n").unwrap();
    fs::write(
        types.join("nvidia-222/description"),
        "num_heads=four, framebuffer=1024M",
    )
    .unwrap();
    fs::write(
        dev("0000:1a:00.4").join("nvidia/creatable_vgpu_types"),
        "NVIDIA H200X-141C\n",
    )
    .unwrap();
    fs::write(dev("0000:ca:00.0").join("sriov_numvfs"), "-\n").unwrap();
    fs::write(dev("0000:1a:00.0").join("sriov_totalvfs"), "x\n").unwrap();
    let r = gp(root.path(), &["list", "--json", "--no-libvirt"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let t4 = &listed_gpu(&v, "0000:3b:00.0")["vgpu"];
    assert_eq!(t4["types"][2]["available_instances"], Value::Null);
    assert_eq!(t4["types"][0]["framebuffer_mib"], Value::Null);
    assert_eq!(
        t4["types"][0]["name"], "GRID T4-1B",
        "the type itself stays"
    );
    assert_eq!(
        listed_gpu(&v, "0000:ca:00.0")["vgpu"]["sriov"]["num_vfs"],
        Value::Null
    );
    assert_eq!(
        listed_gpu(&v, "0000:ca:00.0")["vgpu"]["sriov"]["vfs"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    // No SR-IOV count: no VFs, so none of the vendor types either.
    assert_eq!(listed_gpu(&v, "0000:1a:00.0")["vgpu"], Value::Null);
    for needle in [
        "nvidia-231/available_instances: malformed available_instances: \"lots\" is not a count; skipped",
        "nvidia-222/description: malformed NVIDIA vGPU type description",
        "0000:ca:00.0/sriov_numvfs: malformed sriov_numvfs",
        "0000:1a:00.0/sriov_totalvfs: malformed sriov_totalvfs",
    ] {
        assert!(r.stderr.contains(needle), "{needle:?} not in {}", r.stderr);
    }
    // The vendor file's warning, once the PF's count is back.
    fs::write(dev("0000:1a:00.0").join("sriov_totalvfs"), "16\n").unwrap();
    let r = gp(root.path(), &["list", "--json", "--no-libvirt"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        listed_gpu(&v, "0000:1a:00.0")["vgpu"]["types"],
        serde_json::json!([])
    );
    assert!(
        r.stderr.contains(
            "0000:1a:00.4/nvidia/creatable_vgpu_types: malformed nvidia/creatable_vgpu_types"
        ),
        "{}",
        r.stderr
    );
}

/// A test-driver node with the host's domains and `vm-new`, which holds nothing; returns its
/// URI. (The test driver cannot attach: these tests cover the refusals, which come before any
/// change; tests/libvirt.rs attaches for real.)
fn node_with_new(root: &Path, t: &tempfile::TempDir) -> String {
    let uri = node_of(root, t);
    let node = t.path().join("node.xml");
    let body = fs::read_to_string(&node).unwrap().replace(
        "</node>",
        "<domain type='test'><name>vm-new</name><uuid>0b7a3c1e-5d2f-4e6a-9b8c-7d6e5f4a3b2c</uuid>\
         <memory unit='KiB'>1048576</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>\
         </domain>\n</node>",
    );
    fs::write(&node, body).unwrap();
    uri
}

fn attach_new(name: &str, args: &[&str]) -> Run {
    let t = tempfile::tempdir().unwrap();
    let root = host(name);
    let uri = node_with_new(&root, &t);
    let mut all = vec!["-c", uri.as_str(), "attach", "vm-new"];
    all.extend_from_slice(args);
    gp(&root, &all)
}

fn one_line(r: &Run, code: i32, needle: &str) {
    assert_eq!(r.code, code, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains(needle), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
}

#[test]
fn vgpu_vf_on_the_intel_host_never_gives_a_held_vf_nor_its_pf_whole() {
    // 0000:4d:00.1 is vm-flex-vf's; 0000:4d:00.2 is the one free VF.
    one_line(
        &attach_new("vgpu-intel", &["--vgpu", "vf", "--gpu", "0000:4d:00.1"]),
        5,
        "virtual function 0000:4d:00.1 is in use by domain 'vm-flex-vf'",
    );
    one_line(
        &attach_new("vgpu-intel", &["--vgpu", "vf", "--count", "2"]),
        6,
        "no free virtual function: 2 wanted, 1 free and passable (1 in use",
    );
    one_line(
        &attach_new("vgpu-intel", &["--gpu", "0000:4d:00.0"]),
        5,
        "through its SR-IOV virtual function 0000:4d:00.1",
    );
    one_line(
        &attach_new("vgpu-intel", &["--count", "1", "--model", "8086:56c0"]),
        6,
        "1 in use",
    );
    one_line(
        &attach_new("vgpu-intel", &["--vgpu", "vf", "--gpu", "0000:4d:00.0"]),
        3,
        "0000:4d:00.0 is not an SR-IOV virtual function",
    );
    one_line(
        &attach_new("vgpu-intel", &["--gpu", "0000:4d:00.2"]),
        3,
        "ask for it with `--vgpu vf --gpu 0000:4d:00.2`",
    );
    // The free VF is chosen and handed to libvirt (which the test driver refuses: exit 9).
    let r = attach_new("vgpu-intel", &["--vgpu", "vf", "--config"]);
    assert_eq!(r.code, 9, "{}", r.stderr);
}

#[test]
fn vgpu_vf_refuses_vfs_on_a_host_driver_and_says_how_to_bind_them() {
    // The A10's and H200's VFs are on nvidia, the host driver.
    one_line(
        &attach_new("vgpu-nvidia", &["--vgpu", "vf"]),
        6,
        "6 not on vfio-pci (PF 0000:1a:00.0 0000:ca:00.0: `gpupass bind VF` moves one",
    );
    one_line(
        &attach_new("vgpu-nvidia", &["--vgpu", "vf", "--gpu", "0000:ca:00.4"]),
        7,
        "on the host driver nvidia (a VF is given only from vfio-pci or a vfio-pci variant driver: `gpupass bind 0000:ca:00.4` moves it",
    );
}

#[test]
fn vgpu_usage_errors_are_exit_2() {
    one_line(
        &attach_new("vgpu-intel", &["--vgpu", "mdev"]),
        2,
        "possible values: vf",
    );
    one_line(
        &attach_new("vgpu-intel", &["--vgpu", "vf", "--hgx-full"]),
        2,
        "cannot be used with",
    );
    one_line(
        &attach_new(
            "vgpu-intel",
            &["--vgpu", "vf", "--gpu", "0000:4d:00.2", "--count", "1"],
        ),
        2,
        "cannot be used with",
    );
    let t = tempfile::tempdir().unwrap();
    let root = host("vgpu-intel");
    let uri = node_with_new(&root, &t);
    one_line(
        &gp(&root, &["-c", &uri, "detach", "vm-new", "--vgpu", "vf"]),
        2,
        "required arguments",
    );
    one_line(
        &gp(
            &root,
            &[
                "-c",
                &uri,
                "detach",
                "vm-new",
                "--vgpu",
                "vf",
                "--gpu",
                "0000:4d:00.2",
                "--config",
            ],
        ),
        3,
        "is not attached to domain 'vm-new'",
    );
    one_line(
        &gp(
            &root,
            &[
                "-c",
                &uri,
                "detach",
                "vm-flex-vf",
                "--vgpu",
                "vf",
                "--gpu",
                "0000:4d:00.0",
            ],
        ),
        3,
        "is not an SR-IOV virtual function",
    );
}

#[test]
fn the_vgpu_column_counts_the_vfs_in_use() {
    let t = tempfile::tempdir().unwrap();
    let root = host("vgpu-intel");
    let uri = node_of(&root, &t);
    let r = gp(&root, &["-c", &uri, "list"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let flex = r
        .stdout
        .lines()
        .find(|l| l.starts_with("0000:4d:00.0"))
        .unwrap();
    assert!(flex.contains("2/31 VFs (1 in use)"), "{flex}");
}
