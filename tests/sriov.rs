//! `gpupass sriov PF --vfs N | --undo` on writable copies of the vGPU fixture hosts, with the
//! stand-in kernel (`common::kernel::FakeKernel`) making and destroying VFs as `sriov_numvfs`
//! is written, probing new VFs with the PF's driver while `sriov_drivers_autoprobe` is 1, and
//! binding `driver_override` on `drivers_probe`. Who holds what comes from libvirt's test
//! driver: `test:///default` (nobody) or a node of the fixture's own domain files.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::kernel::{FakeKernel, Quirks};
use common::{gpupass, host, host_copy, run, Run};

/// The Flex 170 of `vgpu-intel`: i915, 31 VFs at most, 2 on vfio-pci (4d:00.1 held by the
/// domain file vm-flex-vf), VFs at offset 1, stride 1.
const PF: &str = "0000:4d:00.0";

struct Host {
    root: tempfile::TempDir,
    state: tempfile::TempDir,
    uri: String,
}

impl Host {
    /// A copy of `fixture` whose libvirt has no domain holding anything.
    fn new(fixture: &str) -> Self {
        Host {
            root: host_copy(fixture),
            state: tempfile::tempdir().unwrap(),
            uri: "test:///default".into(),
        }
    }

    /// A copy of `fixture` whose libvirt runs `domains` (domain XML).
    fn with_domains(fixture: &str, domains: &[String]) -> Self {
        let mut h = Host::new(fixture);
        let mut body = String::from("<node>\n");
        for d in domains {
            body.push_str(&d.replace("<domain type='kvm'>", "<domain type='test'>"));
        }
        body.push_str("</node>\n");
        let node = h.state.path().join("node.xml");
        fs::write(&node, body).unwrap();
        h.uri = format!("test://{}", node.display());
        h
    }

    fn gp(&self, args: &[&str]) -> Run {
        let mut c = gpupass(self.root.path(), &self.state.path().join("run"));
        c.arg("--state-dir")
            .arg(self.state.path())
            .arg("-c")
            .arg(&self.uri)
            .args(args);
        run(c)
    }

    fn dev(&self, bdf: &str) -> PathBuf {
        self.root.path().join("sys/bus/pci/devices").join(bdf)
    }

    fn attr(&self, bdf: &str, name: &str) -> String {
        fs::read_to_string(self.dev(bdf).join(name))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    fn driver(&self, bdf: &str) -> Option<String> {
        fs::read_link(self.dev(bdf).join("driver"))
            .ok()
            .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
    }

    fn vfs(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.dev(PF))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("virtfn"))
            .map(|e| {
                let t = fs::read_link(e.path()).unwrap();
                t.file_name().unwrap().to_string_lossy().into_owned()
            })
            .collect();
        out.sort();
        out
    }

    fn records(&self) -> Value {
        fs::read(self.state.path().join("sriov.json"))
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or(json!({}))
    }

    /// Every file's contents and every link's target under the root and the state dir.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
            for e in fs::read_dir(dir).unwrap().flatten() {
                let t = e.file_type().unwrap();
                if t.is_symlink() {
                    let l = fs::read_link(e.path()).unwrap();
                    out.insert(e.path(), format!("-> {}", l.display()));
                } else if t.is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.insert(e.path(), fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.root.path(), &mut out);
        walk(self.state.path(), &mut out);
        out.retain(|p, _| !p.starts_with(self.state.path().join("run")));
        out
    }

    /// The PF with no VFs (as after boot), written as an operator would; the kernel's log
    /// emptied.
    fn zero_vfs(&self, k: &FakeKernel) {
        fs::write(self.dev(PF).join("sriov_numvfs"), "0\n").unwrap();
        self.wait_vfs(0);
        k.seen();
    }

    fn wait_vfs(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.vfs().len() != n {
            assert!(
                Instant::now() < deadline,
                "the stand-in kernel did not make {n} VFs"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The two snapshots are the same; else the paths that differ.
fn assert_same(before: &BTreeMap<PathBuf, String>, after: &BTreeMap<PathBuf, String>, what: &str) {
    let differ: Vec<&PathBuf> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(differ.is_empty(), "{what}: {differ:?}");
}

/// The `write …` lines of a dry run, and the `wrote …` lines of the real run in the same words.
fn write_lines(out: &str, verb: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix(&format!("{verb} ")))
        .map(|l| format!("write {l}"))
        .collect()
}

fn pf_write(h: &Host, attr: &str, value: &str) -> String {
    format!(
        "write {value:?} to {}/sys/bus/pci/devices/{PF}/{attr}",
        h.root.path().display()
    )
}

fn bind_writes(h: &Host, vf: &str, driver: &str) -> [String; 2] {
    let root = h.root.path().display();
    [
        format!("write {driver:?} to {root}/sys/bus/pci/devices/{vf}/driver_override"),
        format!("write {vf:?} to {root}/sys/bus/pci/drivers_probe"),
    ]
}

fn vf(n: u8) -> String {
    format!("0000:4d:00.{n}")
}

#[test]
fn enable_with_autoprobe_off_first_vfs_on_vfio_pci_and_undo_puts_it_back() {
    let h = Host::new("vgpu-intel");
    let k = FakeKernel::start(h.root.path());
    h.zero_vfs(&k);

    // The control: VFs made while autoprobe is 1 go to the PF's driver (i915), as on a real
    // host. This is what gpupass must avoid, and what the kernel's log would show.
    fs::write(h.dev(PF).join("sriov_numvfs"), "1\n").unwrap();
    h.wait_vfs(1);
    let seen = k.seen();
    assert!(
        seen.iter()
            .any(|l| l == "probe 0000:4d:00.1 with i915 (autoprobe)"),
        "{seen:?}"
    );
    h.zero_vfs(&k);

    let dry = h.gp(&["sriov", PF, "--vfs", "3", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let mut want = vec![
        pf_write(&h, "sriov_drivers_autoprobe", "0"),
        pf_write(&h, "sriov_numvfs", "3"),
    ];
    for n in 1..=3 {
        want.extend(bind_writes(&h, &vf(n), "vfio-pci"));
    }
    let planned = write_lines(&dry.stdout, "write");
    assert_eq!(planned, want, "{}", dry.stdout);
    assert!(dry
        .stdout
        .starts_with("0000:4d:00.0 (i915): 0 -> 3 VFs, sriov_drivers_autoprobe 1 -> 0"));
    assert!(k.seen().is_empty(), "the dry run wrote nothing");
    assert_eq!(h.attr(PF, "sriov_drivers_autoprobe"), "1");
    assert!(!h.state.path().join("sriov.json").exists());

    let r = h.gp(&["sriov", PF, "--vfs", "3"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(write_lines(&r.stdout, "wrote"), planned, "{}", r.stdout);
    let seen = k.seen();
    // Autoprobe was 0 when the kernel made the VFs: none went to i915 on its own.
    assert!(!seen.iter().any(|l| l.starts_with("probe ")), "{seen:?}");
    assert_eq!(seen[0], pf_write(&h, "sriov_numvfs", "3"), "{seen:?}");
    assert_eq!(h.attr(PF, "sriov_drivers_autoprobe"), "0");
    assert_eq!(h.attr(PF, "sriov_numvfs"), "3");
    assert_eq!(h.vfs(), [vf(1), vf(2), vf(3)]);
    for n in 1..=3 {
        assert_eq!(h.driver(&vf(n)).as_deref(), Some("vfio-pci"), "{}", vf(n));
        assert_eq!(h.attr(&vf(n), "driver_override"), "vfio-pci");
    }
    assert_eq!(
        h.records(),
        json!({PF: {"prior_vfs": 0, "prior_autoprobe": true, "vfs": 3, "autoprobe": false,
                    "made_vfs": true, "driver": "vfio-pci"}})
    );
    assert!(
        r.stdout.contains("not kept across a reboot"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!(
            "`gpupass sriov {PF} --undo` puts back 0 VFs, sriov_drivers_autoprobe 1"
        )),
        "{}",
        r.stdout
    );

    // Discovery sees them: each on vfio, none in use.
    let l = h.gp(&["list", "--json"]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    let v: Value = serde_json::from_str(&l.stdout).unwrap();
    let sriov = &common::listed_gpu(&v, PF)["vgpu"]["sriov"];
    assert_eq!(sriov["num_vfs"], 3);
    let vfs = sriov["vfs"].as_array().unwrap();
    assert_eq!(vfs.len(), 3);
    assert!(
        vfs.iter()
            .all(|v| v["on_vfio"] == true && v["used_by"].is_null()),
        "{sriov}"
    );

    // Asking again changes nothing.
    let again = h.gp(&["sriov", PF, "--vfs", "3"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stdout.contains("nothing to write"),
        "{}",
        again.stdout
    );
    assert!(k.seen().is_empty());

    let dry = h.gp(&["sriov", PF, "--undo", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let planned = write_lines(&dry.stdout, "write");
    assert_eq!(
        planned,
        [
            pf_write(&h, "sriov_numvfs", "0"),
            pf_write(&h, "sriov_drivers_autoprobe", "1")
        ]
    );
    assert_eq!(h.vfs().len(), 3, "the dry run changed nothing");
    let r = h.gp(&["sriov", PF, "--undo"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(write_lines(&r.stdout, "wrote"), planned);
    assert!(h.vfs().is_empty());
    assert_eq!(h.attr(PF, "sriov_numvfs"), "0");
    assert_eq!(h.attr(PF, "sriov_drivers_autoprobe"), "1");
    assert_eq!(h.records(), json!({}));
    let r = h.gp(&["sriov", PF, "--undo"]);
    assert_eq!(r.code, 3, "nothing recorded any more: {}", r.stderr);
}

#[test]
fn forced_through_zero_over_vfs_gpupass_did_not_make_and_undo_brings_their_count_back() {
    let h = Host::new("vgpu-intel");
    let k = FakeKernel::start(h.root.path());
    let r = h.gp(&["sriov", PF, "--vfs", "3", "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("forced: its 2 VF(s) were not made by gpupass"),
        "{}",
        r.stderr
    );
    let mut want = vec![
        pf_write(&h, "sriov_drivers_autoprobe", "0"),
        pf_write(&h, "sriov_numvfs", "0"),
        pf_write(&h, "sriov_numvfs", "3"),
    ];
    for n in 1..=3 {
        want.extend(bind_writes(&h, &vf(n), "vfio-pci"));
    }
    assert_eq!(write_lines(&r.stdout, "wrote"), want);
    assert_eq!(h.vfs(), [vf(1), vf(2), vf(3)]);
    assert!(!k.seen().iter().any(|l| l.starts_with("probe ")));
    assert_eq!(h.records()[PF]["prior_vfs"], 2);

    // gpupass's own VFs, to another non-zero count: still through 0, so still --force.
    let r = h.gp(&["sriov", PF, "--vfs", "1"]);
    assert_eq!(r.code, 14, "{}", r.stderr);
    assert!(r.stderr.contains("only through 0"), "{}", r.stderr);

    let r = h.gp(&["sriov", PF, "--undo"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        write_lines(&r.stdout, "wrote"),
        [
            pf_write(&h, "sriov_numvfs", "0"),
            pf_write(&h, "sriov_drivers_autoprobe", "1"),
            pf_write(&h, "sriov_numvfs", "2"),
        ]
    );
    // Two VFs again, made with autoprobe back on, as the host had it.
    assert_eq!(h.vfs(), [vf(1), vf(2)]);
    let seen = k.seen();
    assert!(
        seen.iter()
            .any(|l| l == "probe 0000:4d:00.2 with i915 (autoprobe)"),
        "{seen:?}"
    );
    assert_eq!(h.records(), json!({}));
}

#[test]
fn refusals_are_one_line_and_write_nothing() {
    let flex_vf =
        fs::read_to_string(host("vgpu-intel").join("etc/libvirt/qemu/vm-flex-vf.xml")).unwrap();
    let held = Host::with_domains("vgpu-intel", &[flex_vf]);
    let free = Host::new("vgpu-intel");
    let a10_whole = common::domain_xml("vm-a10-whole", "", &["0000:ca:00.0"]);
    let whole = Host::with_domains("vgpu-nvidia", &[a10_whole]);
    let cases: &[(&Host, &[&str], i32, &[&str])] = &[
        (
            &held,
            &["--vfs", "4"],
            5,
            &[
                "0000:4d:00.1 (a VF of 0000:4d:00.0) is in running domain vm-flex-vf",
                "detach it first",
            ],
        ),
        (
            &held,
            &["--vfs", "4", "--force"],
            5,
            &["running domain vm-flex-vf"],
        ),
        (
            &held,
            &["--vfs", "0", "--force"],
            5,
            &["running domain vm-flex-vf"],
        ),
        (
            &free,
            &["--vfs", "4"],
            14,
            &[
                "only through 0",
                "not made by gpupass",
                "(--force to do it anyway)",
            ],
        ),
        (&free, &["--vfs", "0"], 14, &["not made by gpupass"]),
        (
            &free,
            &["--vfs", "32"],
            2,
            &["at most 31 virtual functions (sriov_totalvfs), not 32"],
        ),
        (
            &free,
            &["--vfs", "2", "--driver", "i915"],
            2,
            &["--driver i915 is not a VFIO driver"],
        ),
        (
            &free,
            &["--undo"],
            3,
            &["no SR-IOV change of 0000:4d:00.0 recorded by gpupass"],
        ),
        (
            &whole,
            &["--vfs", "8", "--force"],
            5,
            &["0000:ca:00.0 is passed whole to running domain vm-a10-whole"],
        ),
    ];
    let _k = FakeKernel::start(free.root.path());
    for (h, extra, code, says) in cases {
        let pf = if std::ptr::eq(*h, &whole) {
            "0000:ca:00.0"
        } else {
            PF
        };
        let before = h.snapshot();
        for dry in [false, true] {
            let mut args = vec!["sriov", pf];
            args.extend_from_slice(extra);
            if dry {
                args.push("--dry-run");
            }
            let r = h.gp(&args);
            assert_eq!(r.code, *code, "{args:?}: {}", r.stderr);
            assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
            assert!(
                says.iter().all(|s| r.stderr.contains(s)),
                "{args:?}: {}",
                r.stderr
            );
            assert!(r.stdout.is_empty(), "{}", r.stdout);
            assert_same(&before, &h.snapshot(), &format!("{args:?} wrote something"));
        }
    }
    for (addr, code, says) in [
        ("0000:4d:00.1", 3, "0000:4d:00.1 is an SR-IOV virtual function of 0000:4d:00.0; give the physical function"),
        ("0000:00:02.0", 2, "0000:00:02.0 has no SR-IOV capability"),
        ("0000:99:00.0", 3, "no PCI device at 0000:99:00.0"),
    ] {
        let before = free.snapshot();
        let r = free.gp(&["sriov", addr, "--vfs", "1"]);
        assert_eq!(r.code, code, "{addr}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{}", r.stderr);
        assert_same(&before, &free.snapshot(), addr);
    }
    // libvirt unreachable: who holds the VFs is unknown, so nothing is decided.
    let mut gone = Host::new("vgpu-intel");
    gone.uri = format!("test://{}/missing.xml", gone.state.path().display());
    let r = gone.gp(&["sriov", PF, "--vfs", "1", "--dry-run"]);
    assert_eq!(r.code, 8, "{}", r.stderr);
    // --vfs or --undo, not neither.
    assert_eq!(free.gp(&["sriov", PF]).code, 2);
}

#[test]
fn undo_refuses_a_pf_someone_changed_since() {
    let h = Host::new("vgpu-intel");
    let k = FakeKernel::start(h.root.path());
    h.zero_vfs(&k);
    assert_eq!(h.gp(&["sriov", PF, "--vfs", "2"]).code, 0);
    fs::write(h.dev(PF).join("sriov_drivers_autoprobe"), "1\n").unwrap();
    let before = h.snapshot();
    let r = h.gp(&["sriov", PF, "--undo"]);
    assert_eq!(r.code, 14, "{}", r.stderr);
    assert!(
        r.stderr.contains("it shows 2 VFs, sriov_drivers_autoprobe 1, not what gpupass left (2 VFs, sriov_drivers_autoprobe 0); someone changed it since"),
        "{}",
        r.stderr
    );
    assert_same(&before, &h.snapshot(), "a refused undo");
}

/// A failed change leaves the PF as it was: count, autoprobe, and no record.
fn assert_put_back(h: &Host) {
    assert!(h.vfs().is_empty(), "{:?}", h.vfs());
    assert_eq!(h.attr(PF, "sriov_numvfs"), "0");
    assert_eq!(h.attr(PF, "sriov_drivers_autoprobe"), "1");
    assert_eq!(h.records(), json!({}));
}

#[test]
fn a_kernel_that_refuses_the_count_leaves_the_pf_as_it_was() {
    let h = Host::new("vgpu-intel");
    {
        let k = FakeKernel::start(h.root.path());
        h.zero_vfs(&k);
    }
    let k = FakeKernel::with(
        h.root.path(),
        Quirks {
            refuse_numvfs: true,
            ..Quirks::default()
        },
    );
    let r = h.gp(&["sriov", PF, "--vfs", "2"]);
    assert_eq!(r.code, 10, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("0000:4d:00.0 shows 0 VFs after writing 2 to sriov_numvfs; put back 0 VFs, sriov_drivers_autoprobe 1"),
        "{}",
        r.stderr
    );
    assert!(k.seen().iter().any(|l| l == "refuse 2 VFs on 0000:4d:00.0"));
    assert_put_back(&h);
}

#[test]
fn a_new_vf_the_kernel_does_not_bind_takes_every_vf_away_again() {
    let h = Host::new("vgpu-intel");
    {
        let k = FakeKernel::start(h.root.path());
        h.zero_vfs(&k);
    }
    let _k = FakeKernel::with(
        h.root.path(),
        Quirks {
            no_probe: true,
            ..Quirks::default()
        },
    );
    let r = h.gp(&["sriov", PF, "--vfs", "2"]);
    assert_eq!(r.code, 10, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("0000:4d:00.1 is on no driver after the writes, not vfio-pci")
            && r.stderr
                .contains("put back 0 VFs, sriov_drivers_autoprobe 1"),
        "{}",
        r.stderr
    );
    assert_put_back(&h);
}

#[test]
fn a_failed_write_takes_every_vf_away_again() {
    let h = Host::new("vgpu-intel");
    let k = FakeKernel::start(h.root.path());
    h.zero_vfs(&k);
    // The bus's drivers_probe is gone: the first VF's probe write fails (after the count).
    fs::remove_file(h.root.path().join("sys/bus/pci/drivers_probe")).unwrap();
    let r = h.gp(&["sriov", PF, "--vfs", "2"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("failed to write \"0000:4d:00.1\" to")
            && r.stderr
                .contains("put back 0 VFs, sriov_drivers_autoprobe 1"),
        "{}",
        r.stderr
    );
    let seen = k.seen();
    assert!(
        seen.contains(&pf_write(&h, "sriov_numvfs", "2")),
        "{seen:?}"
    );
    assert!(
        seen.contains(&pf_write(&h, "sriov_numvfs", "0")),
        "{seen:?}"
    );
    assert_put_back(&h);
}

#[test]
fn json_says_before_after_writes_vfs_and_record() {
    let h = Host::new("vgpu-intel");
    let k = FakeKernel::start(h.root.path());
    h.zero_vfs(&k);
    let r = h.gp(&["sriov", PF, "--vfs", "2", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["pf"], PF);
    assert_eq!(v["action"], "set");
    assert_eq!(v["dry_run"], false);
    assert_eq!(
        v["before"],
        json!({"num_vfs": 0, "drivers_autoprobe": true})
    );
    assert_eq!(
        v["after"],
        json!({"num_vfs": 2, "drivers_autoprobe": false})
    );
    assert_eq!(v["driver"], "vfio-pci");
    assert_eq!(v["writes"].as_array().unwrap().len(), 6);
    assert_eq!(v["writes"][1]["value"], "2");
    let vfs: Vec<(&str, &str)> = v["vfs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["address"].as_str().unwrap(),
                x["driver"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        vfs,
        [("0000:4d:00.1", "vfio-pci"), ("0000:4d:00.2", "vfio-pci")]
    );
    assert_eq!(v["record"]["made_vfs"], true);
    let u = h.gp(&["sriov", PF, "--undo", "--json", "--dry-run"]);
    assert_eq!(u.code, 0, "{}", u.stderr);
    let v: Value = serde_json::from_str(&u.stdout).unwrap();
    assert_eq!(v["action"], "undo");
    assert_eq!(v["after"], json!({"num_vfs": 0, "drivers_autoprobe": true}));
}

#[test]
fn after_a_reboot_undo_has_nothing_to_put_back_and_forgets_the_record() {
    let h = Host::new("vgpu-intel");
    let k = FakeKernel::start(h.root.path());
    h.zero_vfs(&k);
    assert_eq!(h.gp(&["sriov", PF, "--vfs", "2"]).code, 0);
    // A reboot: the kernel's defaults again, no VFs.
    fs::write(h.dev(PF).join("sriov_drivers_autoprobe"), "1\n").unwrap();
    h.zero_vfs(&k);
    let before = h.snapshot();
    let r = h.gp(&["sriov", PF, "--undo"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("after a reboot?"), "{}", r.stderr);
    assert!(write_lines(&r.stdout, "wrote").is_empty(), "{}", r.stdout);
    assert!(k.seen().is_empty());
    assert_eq!(h.records(), json!({}));
    let mut after = h.snapshot();
    after.retain(|p, _| !p.ends_with("sriov.json"));
    let mut before = before;
    before.retain(|p, _| !p.ends_with("sriov.json"));
    assert_same(&before, &after, "only the record changed");
}

#[test]
fn a_vf_driver_that_is_not_loaded_stops_it_before_any_write() {
    let h = Host::new("vgpu-intel");
    let k = FakeKernel::start(h.root.path());
    h.zero_vfs(&k);
    fs::remove_dir_all(h.root.path().join("sys/bus/pci/drivers/vfio-pci")).unwrap();
    // Without sriov_offset the VFs' addresses are unknown: the driver is still checked first.
    fs::remove_file(h.dev(PF).join("sriov_offset")).unwrap();
    let before = h.snapshot();
    let r = h.gp(&["sriov", PF, "--vfs", "2"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("driver vfio-pci is not loaded (modprobe vfio_pci)"),
        "{}",
        r.stderr
    );
    assert_same(&before, &h.snapshot(), "nothing written");
    assert!(k.seen().is_empty());
    // --driver none needs no driver: the count is written, the VFs stay unbound (the
    // stand-in kernel needs the offset to place them).
    fs::write(h.dev(PF).join("sriov_offset"), "1\n").unwrap();
    let r = h.gp(&["sriov", PF, "--vfs", "2", "--driver", "none"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(h.vfs(), [vf(1), vf(2)]);
    assert_eq!(h.driver(&vf(1)), None);
    assert_eq!(h.records()[PF]["driver"], Value::Null);
}
