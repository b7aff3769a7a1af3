//! Against a real libvirt daemon (scripts/libvirtd up; `qemu:///system` or GPUPASS_TEST_URI):
//! attach/detach with fixture GPUs to defined domains, the already-attached and not-present
//! paths, a live attach to a running TCG domain that libvirt refuses (no VFIO here) with nothing
//! persisted, many gpupass processes allocating at once without giving a GPU twice, and SR-IOV
//! VFs (`--vgpu vf`) on the vGPU Intel fixture, never to two domains nor beside their PF.
//!
//! These tests skip when no daemon answers, unless GPUPASS_REQUIRE_LIBVIRT=1 (scripts/test, CI).

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;

use common::{
    clean_leftovers, daemon_available, daemon_lock, gpupass, host, listed_gpu, run, run_within,
    test_uri, Run, TestDomain,
};

fn gp(run_dir: &std::path::Path, args: &[&str]) -> Run {
    let mut c = gpupass(&host("hgx-8gpu"), run_dir);
    c.arg("-c").arg(test_uri()).args(args);
    run(c)
}

macro_rules! need_daemon {
    () => {{
        let guard = daemon_lock();
        if !daemon_available() {
            return;
        }
        clean_leftovers();
        guard
    }};
}

#[test]
fn attach_and_detach_config_on_a_defined_domain() {
    let _g = need_daemon!();
    let t = tempfile::tempdir().unwrap();
    let d = TestDomain::define("cfg", "");

    let r = gp(
        t.path(),
        &["attach", &d.name, "--gpu", "0000:2a:00.0", "--json"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["config"], true);
    assert_eq!(report["live"], false, "an inactive domain gets config only");
    assert_eq!(d.hostdevs(true), ["0000:2a:00.0"]);

    // gpupass list now names the domain as the user, from libvirt's own XML.
    let r = gp(t.path(), &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let used: BTreeMap<String, serde_json::Value> = v["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["address"].as_str().unwrap().to_owned(),
                g["used_by"].clone(),
            )
        })
        .collect();
    assert_eq!(used["0000:2a:00.0"], d.name.as_str());
    assert_eq!(used["0000:18:00.0"], serde_json::Value::Null);

    // Already attached: refused with exit 5, nothing changes.
    let r = gp(t.path(), &["attach", &d.name, "--gpu", "0000:2a:00.0"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(r.stderr.contains("already attached"), "{}", r.stderr);
    assert_eq!(d.hostdevs(true), ["0000:2a:00.0"]);

    // Another domain cannot take it.
    let other = TestDomain::define("cfg-other", "");
    let r = gp(t.path(), &["attach", &other.name, "--gpu", "0000:2a:00.0"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("in use by domain '{}'", d.name)),
        "{}",
        r.stderr
    );
    assert!(other.hostdevs(true).is_empty());

    let r = gp(t.path(), &["detach", &d.name, "--gpu", "0000:2a:00.0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(d.hostdevs(true).is_empty());

    // Not present: exit 3, and libvirt is not asked to remove what is not there.
    let r = gp(t.path(), &["detach", &d.name, "--gpu", "0000:2a:00.0"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("is not attached"), "{}", r.stderr);
    // --all with nothing attached is a clean no-op.
    let r = gp(t.path(), &["detach", &d.name, "--all"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("no GPUs to detach"), "{}", r.stdout);
}

#[test]
fn count_prefers_the_domains_numa_node_and_skips_the_boot_vga() {
    let _g = need_daemon!();
    let t = tempfile::tempdir().unwrap();
    // Node 1 of the HGX fixture has CPUs 56-111.
    let d = TestDomain::define(
        "numa",
        "<numatune><memory mode='strict' nodeset='1'/></numatune>",
    );
    let r = gp(
        t.path(),
        &["attach", &d.name, "--count", "3", "--model", "10de:2330"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        d.hostdevs(true),
        ["0000:9a:00.0", "0000:ab:00.0", "0000:ba:00.0"]
    );
    // Pinned by vCPU cpuset instead: CPUs 60-61 are on node 1, whose free GPU is now 0000:db:00.0.
    let pinned = TestDomain::define("cpus", "<vcpu cpuset='60-61'>1</vcpu>");
    let r = gp(t.path(), &["attach", &pinned.name, "--count", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(pinned.hostdevs(true), ["0000:db:00.0"]);
    drop(pinned);
    let r = gp(t.path(), &["detach", &d.name, "--all", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rep["gpus"].as_array().unwrap().len(), 3);
    assert!(d.hostdevs(true).is_empty());

    // Nine GPUs, one of them the BMC console: --count 9 cannot be met, and nothing is attached.
    let r = gp(t.path(), &["attach", &d.name, "--count", "9"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("1 boot VGA"), "{}", r.stderr);
    assert!(d.hostdevs(true).is_empty());
}

/// gpupass on the vGPU Intel fixture (a Flex 170 PF 0000:4d:00.0 with VFs 0000:4d:00.1 and
/// 0000:4d:00.2 on vfio-pci, each in its own group); its domain files are not in this daemon.
fn gp_vgpu(run_dir: &std::path::Path, args: &[&str]) -> Run {
    let mut c = gpupass(&host("vgpu-intel"), run_dir);
    c.arg("-c").arg(test_uri()).args(args);
    run(c)
}

#[test]
fn a_vf_goes_to_one_domain_as_a_plain_pci_hostdev_and_detach_removes_it() {
    let _g = need_daemon!();
    let t = tempfile::tempdir().unwrap();
    let d = TestDomain::define("vf", "");
    let other = TestDomain::define("vf-other", "");

    let r = gp_vgpu(
        t.path(),
        &[
            "attach",
            &d.name,
            "--vgpu",
            "vf",
            "--gpu",
            "0000:4d:00.1",
            "--config",
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rep["gpus"][0]["gpu"], "0000:4d:00.1");
    assert_eq!(rep["gpus"][0]["vf"], true);
    assert_eq!(d.hostdevs(true), ["0000:4d:00.1"]);
    // An ordinary managed PCI hostdev with the VFIO driver, as libvirt keeps it.
    let xml = common::virsh(&["dumpxml", "--inactive", &d.name]).stdout;
    let hostdev = &xml[xml.find("<hostdev").unwrap()..xml.find("</hostdev>").unwrap()];
    assert!(
        hostdev.contains("type='pci'") && hostdev.contains("managed='yes'"),
        "{hostdev}"
    );
    assert!(hostdev.contains("<driver name='vfio'/>"), "{hostdev}");

    // The same VF is never given to a second domain; its PF is not passed whole.
    let r = gp_vgpu(
        t.path(),
        &[
            "attach",
            &other.name,
            "--vgpu",
            "vf",
            "--gpu",
            "0000:4d:00.1",
            "--config",
        ],
    );
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("in use by domain '{}'", d.name)),
        "{}",
        r.stderr
    );
    let r = gp_vgpu(
        t.path(),
        &["attach", &other.name, "--gpu", "0000:4d:00.0", "--config"],
    );
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("through its SR-IOV virtual function 0000:4d:00.1"),
        "{}",
        r.stderr
    );
    // A count takes the other VF; then none is left (exit 6) and nothing more is attached.
    let r = gp_vgpu(
        t.path(),
        &["attach", &other.name, "--vgpu", "vf", "--config"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(other.hostdevs(true), ["0000:4d:00.2"]);
    let r = gp_vgpu(
        t.path(),
        &[
            "attach", &d.name, "--vgpu", "vf", "--count", "1", "--config",
        ],
    );
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert_eq!(d.hostdevs(true), ["0000:4d:00.1"]);

    // A whole-GPU --all leaves the VF; --vgpu vf --all removes it.
    let r = gp_vgpu(t.path(), &["detach", &d.name, "--all", "--config"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(d.hostdevs(true), ["0000:4d:00.1"]);
    let r = gp_vgpu(
        t.path(),
        &["detach", &d.name, "--vgpu", "vf", "--all", "--config"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("detached VF 0000:4d:00.1"),
        "{}",
        r.stdout
    );
    assert!(d.hostdevs(true).is_empty());
    let r = gp_vgpu(
        t.path(),
        &[
            "detach",
            &other.name,
            "--vgpu",
            "vf",
            "--gpu",
            "0000:4d:00.2",
            "--config",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(other.hostdevs(true).is_empty());
    // With both VFs back, the PF goes whole again.
    let r = gp_vgpu(
        t.path(),
        &["attach", &other.name, "--gpu", "0000:4d:00.0", "--config"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(other.hostdevs(true), ["0000:4d:00.0"]);
    let r = gp_vgpu(t.path(), &["attach", &d.name, "--vgpu", "vf", "--config"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
}

#[test]
fn unknown_domain_is_exit_4() {
    let _g = need_daemon!();
    let t = tempfile::tempdir().unwrap();
    let r = gp(
        t.path(),
        &["attach", "gpupass-t-no-such-domain", "--count", "1"],
    );
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1);
    assert!(
        r.stderr
            .contains("domain 'gpupass-t-no-such-domain' not found"),
        "{}",
        r.stderr
    );
}

/// This machine has no VFIO: libvirt refuses a live hostdev with its real message. gpupass shows
/// it (exit 9) and leaves neither the live nor the persistent definition changed.
#[test]
fn live_attach_to_a_running_domain_surfaces_libvirts_refusal_with_nothing_persisted() {
    let _g = need_daemon!();
    let t = tempfile::tempdir().unwrap();
    let d = TestDomain::define("live", "");
    d.start();
    // The running domain (q35, defaults) cannot hold an H100's 256 GiB window: refused with
    // the fix before libvirt is asked.
    let r = gp(t.path(), &["attach", &d.name, "--gpu", "0000:18:00.0"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("needs a 256 GiB 64-bit window in running domain")
            && r.stderr
                .contains("attach with --config and restart the domain, or --force"),
        "{}",
        r.stderr
    );
    assert!(d.hostdevs(false).is_empty() && d.hostdevs(true).is_empty());
    // --force goes on to libvirt, which refuses (no VFIO here).
    let r = gp(
        t.path(),
        &["attach", &d.name, "--gpu", "0000:18:00.0", "--force"],
    );
    assert_eq!(r.code, 9, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("host doesn't support VFIO PCI passthrough"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
    assert!(d.hostdevs(false).is_empty(), "nothing live");
    assert!(d.hostdevs(true).is_empty(), "nothing persisted");

    // --config alone on the running domain works and touches only the next boot.
    let r = gp(
        t.path(),
        &["attach", &d.name, "--gpu", "0000:18:00.0", "--config"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(d.hostdevs(true), ["0000:18:00.0"]);
    assert!(d.hostdevs(false).is_empty());
    // Default detach on a running persistent domain removes it wherever it is (config here).
    let r = gp(t.path(), &["detach", &d.name, "--all"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("(config only)"), "{}", r.stdout);
    assert!(d.hostdevs(true).is_empty());

    // --live on a stopped domain: libvirt's own refusal.
    let stopped = TestDomain::define("stopped", "");
    let r = gp(
        t.path(),
        &["attach", &stopped.name, "--count", "1", "--live"],
    );
    assert_eq!(r.code, 9, "{}", r.stderr);
    assert!(r.stderr.contains("domain is not running"), "{}", r.stderr);
    assert!(stopped.hostdevs(true).is_empty());
}

/// Many gpupass processes at once, one GPU each, more processes than GPUs: exactly as many
/// succeed as there are passable non-console GPUs, the rest fail with exit 6, and libvirt shows
/// every GPU in exactly one domain.
#[test]
fn parallel_allocation_never_gives_one_gpu_twice() {
    let _g = need_daemon!();
    let t = tempfile::tempdir().unwrap();
    const N: usize = 12;
    let domains: Vec<TestDomain> = (0..N)
        .map(|i| TestDomain::define(&format!("par-{i:02}"), ""))
        .collect();
    let children: Vec<_> = domains
        .iter()
        .map(|d| {
            let mut c = gpupass(&host("hgx-8gpu"), t.path());
            c.arg("-c")
                .arg(test_uri())
                .args(["attach", &d.name, "--count", "1", "--config", "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c.spawn().expect("spawn gpupass")
        })
        .collect();
    let results: Vec<Run> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait").into())
        .collect();
    let ok = results.iter().filter(|r| r.code == 0).count();
    let no_free = results.iter().filter(|r| r.code == 6).count();
    assert_eq!(
        (ok, no_free),
        (8, N - 8),
        "codes: {:?}",
        results
            .iter()
            .map(|r| (r.code, r.stderr.clone()))
            .collect::<Vec<_>>()
    );
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for d in &domains {
        for a in d.hostdevs(true) {
            if let Some(prev) = owner.insert(a.clone(), d.name.clone()) {
                panic!("{a} given to both {prev} and {}", d.name);
            }
        }
    }
    assert_eq!(owner.len(), 8);
    assert!(!owner.contains_key("0000:03:00.0"), "never the boot VGA");
}

/// The hook set-up of scripts/libvirtd (`up --hook`): its directory, or `None` to skip.
fn hook_dir() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("GPUPASS_TEST_HOOK_DIR").map(std::path::PathBuf::from);
    let installed = std::path::Path::new("/etc/libvirt/hooks/qemu.d/gpupass").exists();
    match dir {
        Some(d) if installed => Some(d),
        _ => {
            assert!(
                !common::required(),
                "GPUPASS_REQUIRE_LIBVIRT=1 but the gpupass hook is not set up (scripts/libvirtd up --hook target/debug/gpupass-hook)"
            );
            eprintln!("SKIPPED: gpupass hook not installed in the test daemon");
            None
        }
    }
}

fn hook_log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("hook.log")).unwrap_or_default()
}

/// With gpupass's hook installed in the real daemon, a start that cannot work is refused at
/// `prepare begin` and `virsh start` shows gpupass's line; release after it is harmless.
#[test]
fn the_hook_blocks_a_start_that_cannot_work_and_virsh_shows_why() {
    let _g = need_daemon!();
    let Some(dir) = hook_dir() else { return };
    let greedy = TestDomain::define(
        "greedy",
        "<metadata><gpupass:gpus xmlns:gpupass='https://gpupass.dev/xmlns/1' count='9'/></metadata>",
    );
    let r = common::virsh(&["start", &greedy.name]);
    assert_ne!(r.code, 0, "the start must be blocked");
    let want = format!(
        "gpupass: prepare {0}: domain '{0}' asks for 9 GPU(s), its XML has 0",
        greedy.name
    );
    assert!(
        r.stderr.contains("Hook script execution failed"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(&want), "{want:?} not in {}", r.stderr);
    // libvirt calls release after the blocked start: it ran, and wrote no usage.
    let log = hook_log(&dir);
    assert!(
        log.contains(&format!("hook release end {}: ok", greedy.name)),
        "{log}"
    );
    let ledger = std::fs::read_to_string(dir.join("state/usage.jsonl")).unwrap_or_default();
    assert!(!ledger.contains(&greedy.name), "{ledger}");

    // A hostdev that is not on this host: gpupass's reason, not QEMU's later VFIO failure.
    let stale = TestDomain::define("stale", "");
    let t = tempfile::tempdir().unwrap();
    let x = t.path().join("hostdev.xml");
    std::fs::write(&x, "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0xee' slot='0x00' function='0x0'/></source></hostdev>").unwrap();
    let r = common::virsh(&[
        "attach-device",
        &stale.name,
        x.to_str().unwrap(),
        "--config",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = common::virsh(&["start", &stale.name]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("gpupass: prepare")
            && r.stderr
                .contains("hostdev 0000:ee:00.0 is not a PCI device on this host"),
        "{}",
        r.stderr
    );
}

/// A domain without GPUs goes through every hook call (prepare, started, restore) unchanged.
#[test]
fn the_hook_passes_a_gpu_less_domain_through_start_save_and_restore() {
    let _g = need_daemon!();
    let Some(dir) = hook_dir() else { return };
    let d = TestDomain::define("restore", "");
    d.start();
    let t = tempfile::tempdir().unwrap();
    let image = t.path().join("saved.img");
    let r = common::virsh(&["save", &d.name, image.to_str().unwrap()]);
    assert_eq!(r.code, 0, "save: {}", r.stderr);
    let r = common::virsh(&["restore", image.to_str().unwrap()]);
    assert_eq!(r.code, 0, "restore: {}", r.stderr);
    let state = common::virsh(&["domstate", &d.name]);
    assert_eq!(state.stdout.trim(), "running");
    let log = hook_log(&dir);
    for op in [
        "prepare begin",
        "started begin",
        "release end",
        "restore begin",
    ] {
        let line = format!("hook {op} {}: ok", d.name);
        assert!(log.contains(&line), "{line:?} not in the hook log:\n{log}");
    }
    assert!(
        log.contains(&format!("hook restore begin {}: ok, unchanged", d.name)),
        "{log}"
    );
}

/// doctor against the real daemon: it answers, and its domain capabilities offer no vfio PCI
/// backend on this machine (no VFIO) — doctor says so as a failure.
#[test]
fn doctor_asks_the_real_daemon_for_its_vfio_backend() {
    let _g = need_daemon!();
    let t = tempfile::tempdir().unwrap();
    let r = gp(t.path(), &["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let find = |n: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(find("libvirt")["status"], "ok", "{}", r.stdout);
    let backend = find("libvirt vfio backend");
    assert_eq!(backend["status"], "fail", "{backend}");
    assert!(backend["seen"]
        .as_str()
        .unwrap()
        .contains("no vfio PCI backend"));
}

/// A domain defined with 2 of the consumer card's 4 functions (what a crash mid-attach leaves):
/// `list` flags it `partial`, another domain cannot take it, and the domain's own retried
/// `attach --count 1 --config` completes it to all 4 functions; `detach --all` removes them all.
#[test]
fn a_partly_attached_gpu_is_completed_by_the_domains_own_attach() {
    let _g = need_daemon!();
    let t = tempfile::tempdir().unwrap();
    let gp4 = |args: &[&str]| {
        let mut c = gpupass(&host("consumer-4fn"), t.path());
        c.arg("-c").arg(test_uri()).args(args);
        run(c)
    };
    let name = format!("{}partial", common::TEST_PREFIX);
    let hostdev = |f: u8| {
        format!(
            "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x01' slot='0x00' function='0x{f}'/></source></hostdev>"
        )
    };
    let xml = common::tiny_domain_xml(&name, "").replace(
        "<memballoon model='none'/>",
        &format!("{}{}<memballoon model='none'/>", hostdev(0), hostdev(1)),
    );
    let file = t.path().join("d.xml");
    std::fs::write(&file, xml).unwrap();
    let r = common::virsh(&["define", file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = TestDomain { name };
    assert_eq!(d.hostdevs(true), ["0000:01:00.0", "0000:01:00.1"]);

    let r = gp4(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let g = listed_gpu(&v, "0000:01:00.0").clone();
    assert_eq!(g["state"], "partial", "{g}");
    assert_eq!(
        g["partial"][0]["missing"],
        serde_json::json!(["0000:01:00.2", "0000:01:00.3"])
    );

    let other = TestDomain::define("partial-other", "");
    let r = gp4(&["attach", &other.name, "--count", "1", "--config"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(other.hostdevs(true).is_empty());

    let r = gp4(&["attach", &d.name, "--count", "1", "--config", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        d.hostdevs(true),
        [
            "0000:01:00.0",
            "0000:01:00.1",
            "0000:01:00.2",
            "0000:01:00.3"
        ]
    );
    let r = gp4(&["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let g = listed_gpu(&v, "0000:01:00.0").clone();
    assert_eq!(g["state"], "in-use", "{g}");
    let r = gp4(&["detach", &d.name, "--all", "--config"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(d.hostdevs(true).is_empty());
}

/// A proxy in front of the daemon's socket that relays libvirt's RPC until the client asks to
/// look a domain up by name (the first call `attach` makes under the host lock), then goes
/// silent both ways: a libvirtd that stops answering after a few replies.
fn stalling_proxy(listen: &std::path::Path, upstream: std::path::PathBuf) {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const REMOTE_PROGRAM: u32 = 0x2000_8086;
    const REMOTE_PROC_DOMAIN_LOOKUP_BY_NAME: u32 = 23;
    let listener = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for client in listener.incoming().flatten() {
            let Ok(server) = UnixStream::connect(&upstream) else {
                return;
            };
            let stalled = Arc::new(AtomicBool::new(false));
            let (mut from_server, mut to_client) =
                (server.try_clone().unwrap(), client.try_clone().unwrap());
            let s2 = Arc::clone(&stalled);
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = from_server.read(&mut buf) {
                    if n == 0 || s2.load(Ordering::SeqCst) {
                        break;
                    }
                    if to_client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            let (mut from_client, mut to_server) = (client.try_clone().unwrap(), server);
            held.push(client);
            std::thread::spawn(move || loop {
                let mut len = [0u8; 4];
                if from_client.read_exact(&mut len).is_err() {
                    return;
                }
                let n = u32::from_be_bytes(len) as usize;
                let mut rest = vec![0u8; n.saturating_sub(4)];
                if from_client.read_exact(&mut rest).is_err() {
                    return;
                }
                let word = |i: usize| u32::from_be_bytes(rest[i..i + 4].try_into().unwrap());
                if rest.len() >= 12
                    && word(0) == REMOTE_PROGRAM
                    && word(8) == REMOTE_PROC_DOMAIN_LOOKUP_BY_NAME
                {
                    stalled.store(true, Ordering::SeqCst);
                }
                if stalled.load(Ordering::SeqCst) {
                    continue;
                }
                if to_server.write_all(&len).is_err() || to_server.write_all(&rest).is_err() {
                    return;
                }
            });
        }
    });
}

/// libvirt stops answering while `attach` holds the host lock: gpupass gives up after
/// --libvirt-timeout with exit 8 and one line, the lock is free at once, and the next attach
/// through the real daemon works (no exit 12).
#[test]
fn a_libvirt_that_stops_answering_under_the_lock_releases_it_with_exit_8() {
    let _g = need_daemon!();
    let upstream = std::path::PathBuf::from(
        std::env::var("GPUPASS_TEST_SOCKET").unwrap_or_else(|_| "/run/libvirt/libvirt-sock".into()),
    );
    if !upstream.exists() {
        assert!(
            !common::required(),
            "no daemon socket at {}",
            upstream.display()
        );
        eprintln!("SKIPPED: no daemon socket at {}", upstream.display());
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("stalling.sock");
    stalling_proxy(&sock, upstream);
    let d = TestDomain::define("deadline", "");
    let run_dir = t.path().join("run");
    let mut c = gpupass(&host("hgx-8gpu"), &run_dir);
    c.arg("-c")
        .arg(format!("qemu+unix:///system?socket={}", sock.display()))
        .args([
            "attach",
            &d.name,
            "--count",
            "1",
            "--config",
            "--libvirt-timeout",
            "3",
        ]);
    let start = std::time::Instant::now();
    let r = run_within(c, std::time::Duration::from_secs(40));
    assert_eq!(r.code, 8, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "attach to '{}': libvirt did not answer within 3 s",
            d.name
        )),
        "{}",
        r.stderr
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
    // The lock was taken (the stall came after it) and is free now.
    let lock = std::fs::File::open(run_dir.join("gpupass.lock")).expect("the lock file exists");
    lock.try_lock().expect("the host lock is free");
    drop(lock);
    let r = gp(
        &run_dir,
        &[
            "attach",
            &d.name,
            "--count",
            "1",
            "--config",
            "--lock-timeout",
            "1",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(d.hostdevs(true).len(), 1);
}

/// Runs `hooks/libvirt-vm-xml-transformer.sh` the way the CloudStack agent does (METHOD and XML
/// as arguments) against `root`/`run`/`state`; returns the completed XML.
fn cloudstack_transform(
    root: &std::path::Path,
    run_dir: &std::path::Path,
    state: &std::path::Path,
    xml: &str,
) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("hooks/libvirt-vm-xml-transformer.sh");
    let mut c = std::process::Command::new(script);
    c.env("GPUPASS_BIN", env!("CARGO_BIN_EXE_gpupass-hook"))
        .env("GPUPASS_HOST_ROOT", root)
        .env("GPUPASS_RUN_DIR", run_dir)
        .env("GPUPASS_STATE_DIR", state)
        .env_remove("GPUPASS_CONFIG")
        .args(["transform", xml])
        .stdin(Stdio::null());
    let r = run_within(c, std::time::Duration::from_secs(30));
    assert_eq!(r.code, 0, "transformer: {}", r.stderr);
    assert!(r.stdout.trim_end().ends_with("</domain>"), "{}", r.stdout);
    r.stdout
}

/// A CloudStack-style domain: CloudStack's own single-function hostdev (LibvirtGpuDef), no guest
/// address, no companions.
fn cloudstack_domain(name: &str, bus: &str) -> String {
    common::tiny_domain_xml(name, "").replace(
        "<memballoon model='none'/>",
        &format!("<hostdev mode='subsystem' type='pci' managed='yes' display='off'><driver name='vfio'/><source><address domain='0x0000' bus='0x{bus}' slot='0x00' function='0x0'/></source></hostdev><memballoon model='none'/>"),
    )
}

fn define_xml(name: &str, xml: &str) -> TestDomain {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("d.xml");
    std::fs::write(&file, xml).unwrap();
    let r = common::virsh(&["define", file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "define {name}: {}", r.stderr);
    TestDomain {
        name: name.to_owned(),
    }
}

/// CloudStack 4.21+: `i-2-33-VM` with CloudStack's own hostdev for the consumer card goes
/// through the shell transformer; the completed XML (all four functions) defines in the real
/// daemon. With the daemon's qemu hook (8-GPU fixture): a second CloudStack VM given the GPU
/// the first was completed with is blocked at prepare with gpupass's line, and the first one's
/// prepare passes (the start then fails later, in libvirt: no VFIO on this machine).
#[test]
fn a_cloudstack_domain_is_completed_by_the_transformer_and_judged_by_the_hook() {
    let _g = need_daemon!();
    for n in ["i-2-33-VM", "i-2-34-VM"] {
        common::virsh(&["destroy", n]);
        common::virsh(&["undefine", n]);
    }
    // The consumer card: GPU + HDMI audio + USB + UCSI.
    let h = common::HookRoot::new("consumer-4fn", &[]);
    let out = cloudstack_transform(
        h.path(),
        &h.run_dir(),
        &h.state_dir(),
        &cloudstack_domain("i-2-33-VM", "01"),
    );
    let d = define_xml("i-2-33-VM", &out);
    assert_eq!(
        d.hostdevs(true),
        [
            "0000:01:00.0",
            "0000:01:00.1",
            "0000:01:00.2",
            "0000:01:00.3"
        ]
    );
    let r = common::virsh(&["dumpxml", "--inactive", &d.name]);
    assert_eq!(
        r.stdout.matches("<alias name='ua-gpupass-").count(),
        3,
        "libvirt keeps the companions' gpupass aliases: {}",
        r.stdout
    );
    drop(d);

    let Some(dir) = hook_dir() else { return };
    let root = dir.join("hostroot");
    let out = cloudstack_transform(
        &root,
        &dir.join("run"),
        &dir.join("state"),
        &cloudstack_domain("i-2-33-VM", "2a"),
    );
    let first = define_xml("i-2-33-VM", &out);
    // CloudStack gives the same H100 to another VM (a stale allocation): blocked, with why.
    let second = define_xml("i-2-34-VM", &cloudstack_domain("i-2-34-VM", "2a"));
    let r = common::virsh(&["start", &second.name]);
    assert_ne!(r.code, 0, "the start must be blocked");
    assert!(
        r.stderr.contains(
            "gpupass: prepare i-2-34-VM: 0000:2a:00.0 is reserved for domain 'i-2-33-VM'"
        ),
        "{}",
        r.stderr
    );
    // The first one's prepare passes; what stops it is libvirt's own VFIO step here.
    let r = common::virsh(&["start", &first.name]);
    assert_ne!(r.code, 0, "no VFIO on this machine");
    assert!(!r.stderr.contains("gpupass:"), "{}", r.stderr);
    let log = hook_log(&dir);
    assert!(log.contains("hook prepare begin i-2-33-VM: ok"), "{log}");
}

/// Every golden fit result (tests/golden/fit/*.out.xml) is accepted by the real daemon's
/// `define` (which validates it), under a test name.
#[test]
fn the_daemon_defines_every_fitted_golden_domain() {
    let _g = need_daemon!();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/fit");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let file = p.file_name().unwrap().to_string_lossy().into_owned();
        let Some(case) = file.strip_suffix(".out.xml") else {
            continue;
        };
        let xml = std::fs::read_to_string(&p).unwrap();
        let name = format!("{}fit-{case}", common::TEST_PREFIX);
        let start = xml.find("<name>").unwrap() + "<name>".len();
        let end = xml.find("</name>").unwrap();
        let renamed = format!("{}{name}{}", &xml[..start], &xml[end..]);
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("d.xml");
        std::fs::write(&f, &renamed).unwrap();
        let mut r = common::virsh(&["define", "--validate", f.to_str().unwrap()]);
        if r.code != 0 && (r.stderr.contains("kvm") || r.stderr.contains("host-passthrough")) {
            // A machine without usable KVM: the same domain under TCG.
            let tcg = renamed
                .replace("type='kvm'", "type='qemu'")
                .replace("type=\"kvm\"", "type=\"qemu\"")
                .replace("host-passthrough", "maximum");
            std::fs::write(&f, tcg).unwrap();
            r = common::virsh(&["define", "--validate", f.to_str().unwrap()]);
        }
        common::virsh(&["undefine", "--nvram", &name]);
        assert_eq!(r.code, 0, "{case}: {}", r.stderr);
        n += 1;
    }
    assert!(n >= 5, "only {n} golden fits");
}

/// `gpupass fit` on a domain given one H100 reports what is missing (exit 16), `--apply`
/// defines the fit (exit 0) and a second `fit` finds nothing missing.
#[test]
fn fit_reports_then_applies_and_then_fits() {
    let _g = need_daemon!();
    let t = tempfile::tempdir().unwrap();
    let d = TestDomain::define("fit", "");
    let r = gp(
        t.path(),
        &["attach", &d.name, "--gpu", "0000:18:00.0", "--no-fit"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("--no-fit"),
        "a warning says the domain was left: {}",
        r.stderr
    );
    let r = gp(t.path(), &["fit", &d.name]);
    assert_eq!(r.code, 16, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("MISSING pcihole64"), "{}", r.stdout);
    assert!(r.stderr.contains("--apply"), "{}", r.stderr);
    let r = gp(t.path(), &["fit", &d.name, "--apply", "--json"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(!v["applied"].as_array().unwrap().is_empty(), "{v}");
    let r = gp(t.path(), &["fit", &d.name]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let x = common::virsh(&["dumpxml", "--inactive", &d.name]).stdout;
    assert!(
        x.contains("<pcihole64 unit='KiB'>268435456</pcihole64>"),
        "{x}"
    );
    // A what-if for 8 more GPUs than the domain has: 16 without changing anything.
    let r = gp(
        t.path(),
        &["fit", &d.name, "--count", "3", "--model", "10de:2330"],
    );
    assert_eq!(r.code, 16, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("phys-bits"), "{}", r.stdout);
}

/// `attach --hgx-full --config` gives a defined domain all 8 H100s and the 4 NVSwitches at once,
/// fitted; `fit` then finds the HGX fabric complete; `detach --all` takes the switches too.
#[test]
fn hgx_full_passthrough_gives_the_whole_fabric_and_fits() {
    let _g = need_daemon!();
    let t = tempfile::tempdir().unwrap();
    let d = TestDomain::define("hgx", "");
    let other = TestDomain::define("hgx-other", "");

    // A GPU held elsewhere: refused whole, nothing given.
    let r = gp(
        t.path(),
        &["attach", &other.name, "--gpu", "0000:db:00.0", "--config"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = gp(t.path(), &["attach", &d.name, "--hgx-full", "--config"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(r.stderr.contains("0000:db:00.0"), "{}", r.stderr);
    assert!(d.hostdevs(true).is_empty());
    let r = gp(t.path(), &["detach", &other.name, "--all", "--config"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let r = gp(t.path(), &["attach", &d.name, "--hgx-full", "--config"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout.matches("attached NVSwitch").count(),
        4,
        "{}",
        r.stdout
    );
    let held = d.hostdevs(true);
    assert_eq!(held.len(), 12, "{held:?}");
    for s in [
        "0000:05:00.0",
        "0000:06:00.0",
        "0000:07:00.0",
        "0000:08:00.0",
        "0000:18:00.0",
        "0000:db:00.0",
    ] {
        assert!(held.iter().any(|h| h == s), "{s} missing from {held:?}");
    }
    let r = gp(t.path(), &["fit", &d.name, "--json"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let hgx = v["plan"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["item"] == "HGX fabric")
        .unwrap_or_else(|| panic!("no HGX fabric item: {v}"))
        .clone();
    assert_eq!(hgx["status"], "ok", "{hgx}");

    let r = gp(t.path(), &["detach", &d.name, "--all", "--config"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(d.hostdevs(true).is_empty(), "{:?}", d.hostdevs(true));
}
