//! GPU health and quarantine on the health fixture hosts (a sick GPU at 0000:01:00.0, a healthy
//! one at 0000:02:00.0): the hook's `release end` quarantines each sick GPU with its reason and
//! marks the usage session; `prepare` blocks it, `transform --count` and `attach --count` skip
//! it, `attach --gpu` refuses it; `quarantine clear` refuses until the fixture is healthy again.
//! Each test works on a copy of the fixture (tests/common host_copy) that it may break or mend.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{
    clean_leftovers, daemon_available, daemon_lock, domain_xml, gpupass, host_copy, run, test_uri,
    Run, TestDomain, HEALTH_HOSTS, HOOK_DEADLINE,
};

const SICK: &str = "0000:01:00.0";
const SICK_AUDIO: &str = "0000:01:00.1";
const WELL: &str = "0000:02:00.0";
const WELL_AUDIO: &str = "0000:02:00.1";

/// A writable fixture host with libvirt's status dir, and run and state dirs beside it.
struct Host {
    root: tempfile::TempDir,
    dirs: tempfile::TempDir,
}

impl Host {
    fn new(fixture: &str) -> Self {
        let root = host_copy(fixture);
        fs::create_dir_all(root.path().join("run/libvirt/qemu")).unwrap();
        Host {
            root,
            dirs: tempfile::tempdir().unwrap(),
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dirs.path().join("state")
    }

    fn dev(&self, addr: &str) -> PathBuf {
        self.root.path().join("sys/bus/pci/devices").join(addr)
    }

    fn gp(&self, args: &[&str]) -> Run {
        let mut c = gpupass(self.root.path(), &self.dirs.path().join("run"));
        c.arg("--state-dir").arg(self.state_dir()).args(args);
        run(c)
    }

    /// `gpupass-hook` with every directory given and `stdin`.
    fn hook(&self, args: &[&str], stdin: &str) -> Run {
        use std::io::Write;
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpupass-hook"));
        c.env_remove("GPUPASS_CONFIG")
            .env_remove("GPUPASS_LOG_FILE")
            .env_remove("GPUPASS_LOG")
            .arg("--host-root")
            .arg(self.root.path())
            .arg("--run-dir")
            .arg(self.dirs.path().join("run"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut w = child.stdin.take().unwrap();
        let _ = w.write_all(stdin.as_bytes());
        drop(w);
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < HOOK_DEADLINE,
                "gpupass-hook {args:?} hung"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.wait_with_output().unwrap().into()
    }

    fn qemu_hook(&self, domain: &str, op: &str, subop: &str, xml: &str) -> Run {
        self.hook(&["hook", "qemu", domain, op, subop, "-"], xml)
    }

    fn quarantined(&self) -> serde_json::Value {
        let r = self.gp(&["quarantine", "list", "--json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()["quarantined"].clone()
    }

    fn health_of(&self, addr: &str) -> serde_json::Value {
        let r = self.gp(&["list", "--no-libvirt", "--json"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        common::listed_gpu(&v, addr)["health"].clone()
    }
}

/// Replaces one attribute file of a fixture copy's device.
fn set(dev: &Path, name: &str, text: &str) {
    fs::write(dev.join(name), text).unwrap();
}

/// What each health host's sick GPU is quarantined for, and how to mend the copy.
fn case(fixture: &str) -> (&'static str, fn(&Host)) {
    match fixture {
        "health-fell-off" => ("reads all-ones from vendor", |h| {
            set(&h.dev(SICK), "vendor", "0x10de\n");
            set(&h.dev(SICK), "device", "0x2204\n");
            // The same model as the well one: its config space and its modalias.
            for f in ["config", "modalias"] {
                let bytes = fs::read(h.dev(WELL).join(f)).unwrap();
                fs::write(h.dev(SICK).join(f), bytes).unwrap();
            }
        }),
        "health-no-reset" => ("has no reset method", |h| {
            set(&h.dev(SICK), "reset_method", "flr bus\n")
        }),
        "health-aer" => ("non-fatal errors since its last check (2 -> 5)", |h| {
            // A reset (gpupass health --recover, a reboot) starts the counters over.
            set(&h.dev(SICK), "aer_dev_nonfatal", "TOTAL_ERR_NONFATAL 0\n")
        }),
        "health-link" => ("link runs at x4, below its x16", |h| {
            set(&h.dev(SICK), "current_link_width", "16\n")
        }),
        other => panic!("no case for {other}"),
    }
}

/// AER counters count since boot: errors are only a finding when they grew since the last
/// check. The first check sets the baseline; then the card logs three more.
fn grow_aer_if_needed(h: &Host, fixture: &str) {
    if fixture == "health-aer" {
        let r = h.gp(&["health"]);
        assert_eq!(r.code, 0, "the baseline check finds nothing: {}", r.stdout);
        set(
            &h.dev(SICK),
            "aer_dev_nonfatal",
            "DLP 1\nCmpltTO 4\nTOTAL_ERR_NONFATAL 5\n",
        );
    }
}

#[test]
fn release_quarantines_each_sick_gpu_with_its_reason_and_prepare_blocks_it() {
    for fixture in HEALTH_HOSTS {
        let h = Host::new(fixture);
        let (reason, _) = case(fixture);
        grow_aer_if_needed(&h, fixture);
        let xml = domain_xml("vm1", "", &[SICK, SICK_AUDIO, WELL, WELL_AUDIO]);
        // A session opens at start, closes at release: marked with the quarantined GPU.
        let r = h.qemu_hook("vm1", "started", "begin", &xml);
        assert_eq!(r.code, 0, "{fixture}: {}", r.stderr);
        let r = h.qemu_hook("vm1", "release", "end", &xml);
        assert_eq!(r.code, 0, "{fixture}: {}", r.stderr);
        let q = h.quarantined();
        let q = q.as_array().unwrap();
        assert_eq!(q.len(), 1, "{fixture}: only the sick GPU: {q:?}");
        assert_eq!(q[0]["address"], SICK, "{fixture}");
        let why = q[0]["reason"].as_str().unwrap();
        assert!(why.contains(reason), "{fixture}: {why}");
        assert_eq!(q[0]["by"], "hook release of vm1", "{fixture}");
        assert_eq!(h.health_of(SICK)["state"], "quarantined", "{fixture}");
        assert!(h.health_of(SICK)["since"].is_string(), "{fixture}");
        assert_eq!(
            h.health_of(WELL),
            serde_json::json!({"state": "ok"}),
            "{fixture}"
        );
        let ledger = fs::read_to_string(h.state_dir().join("usage.jsonl")).unwrap();
        let stop = ledger.lines().last().unwrap();
        assert!(
            stop.contains("\"event\":\"stop\"")
                && stop.contains(&format!("\"quarantined\":[\"{SICK}\"]")),
            "{fixture}: {ledger}"
        );
        let r = h.hook(&["usage", "--json"], "");
        assert!(
            r.stdout.contains("\"ended_on_quarantined\""),
            "{fixture}: {}",
            r.stdout
        );

        // The next start with the sick GPU is blocked, with one line naming the reason.
        let r = h.qemu_hook(
            "vm2",
            "prepare",
            "begin",
            &domain_xml("vm2", "", &[SICK, SICK_AUDIO]),
        );
        assert_eq!(r.code, 1, "{fixture}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{fixture}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!(
                "GPU {SICK} cannot be passed through: quarantined since"
            )) && r.stderr.contains(reason),
            "{fixture}: {}",
            r.stderr
        );
        // The healthy one starts.
        let r = h.qemu_hook(
            "vm3",
            "prepare",
            "begin",
            &domain_xml("vm3", "", &[WELL, WELL_AUDIO]),
        );
        assert_eq!(r.code, 0, "{fixture}: {}", r.stderr);

        // transform --count 1 takes the healthy GPU although the sick one comes first.
        let r = h.hook(&["transform", "--count", "1"], &domain_xml("vm4", "", &[]));
        assert_eq!(r.code, 0, "{fixture}: {}", r.stderr);
        assert!(
            r.stdout.contains("bus='0x02'") && !r.stdout.contains("bus='0x01'"),
            "{fixture}: {}",
            r.stdout
        );
        // Asked for 2, it cannot: one is quarantined, and it says so.
        let r = h.hook(&["transform", "--count", "2"], &domain_xml("vm5", "", &[]));
        assert_eq!(r.code, 6, "{fixture}: {}", r.stderr);
        assert!(
            r.stderr.contains("1 quarantined"),
            "{fixture}: {}",
            r.stderr
        );

        // doctor fails on it.
        let r = h.gp(&["doctor", "--no-libvirt", "--json"]);
        assert_eq!(r.code, 13, "{fixture}: {}", r.stderr);
        assert!(
            r.stdout.contains(&format!("gpu {SICK} health")),
            "{fixture}"
        );
    }
}

#[test]
fn clear_refuses_until_the_gpu_is_healthy_and_force_is_logged() {
    for fixture in HEALTH_HOSTS {
        let h = Host::new(fixture);
        let (reason, mend) = case(fixture);
        grow_aer_if_needed(&h, fixture);
        let r = h.gp(&["health", SICK]);
        assert_eq!(r.code, 18, "{fixture}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stdout.contains("FAIL, quarantined now"),
            "{fixture}: {}",
            r.stdout
        );
        assert!(r.stdout.contains(reason), "{fixture}: {}", r.stdout);
        // Still sick: refused, the quarantine stays.
        let r = h.gp(&["quarantine", "clear", SICK]);
        assert_eq!(r.code, 18, "{fixture}: {}", r.stderr);
        assert!(
            r.stderr.contains("still fails its health check") && r.stderr.contains("--force"),
            "{fixture}: {}",
            r.stderr
        );
        assert_eq!(h.quarantined().as_array().unwrap().len(), 1, "{fixture}");
        // Mended: cleared.
        mend(&h);
        let r = h.gp(&["quarantine", "clear", SICK]);
        assert_eq!(r.code, 0, "{fixture}: {}", r.stderr);
        assert!(
            r.stdout.starts_with(&format!("cleared {SICK}")),
            "{fixture}: {}",
            r.stdout
        );
        assert!(h.quarantined().as_array().unwrap().is_empty(), "{fixture}");
        assert_eq!(h.health_of(SICK)["state"], "ok", "{fixture}");
        let r = h.gp(&["health"]);
        assert_eq!(r.code, 0, "{fixture}: {}", r.stdout);
        // Not quarantined: nothing to clear.
        let r = h.gp(&["quarantine", "clear", SICK]);
        assert_eq!(r.code, 3, "{fixture}: {}", r.stderr);
    }
    // --force clears a GPU that still fails, and says so in the log.
    let h = Host::new("health-link");
    assert_eq!(h.gp(&["health", SICK]).code, 18);
    let r = h.gp(&["quarantine", "clear", SICK, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("cleared with --force"), "{}", r.stderr);
}

#[test]
fn a_healthy_release_adds_nothing_and_a_gone_gpu_is_quarantined() {
    let h = Host::new("health-link");
    let xml = domain_xml("vm1", "", &[WELL, WELL_AUDIO]);
    assert_eq!(h.qemu_hook("vm1", "started", "begin", &xml).code, 0);
    let r = h.qemu_hook("vm1", "release", "end", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    assert!(h.quarantined().as_array().unwrap().is_empty());
    let ledger = fs::read_to_string(h.state_dir().join("usage.jsonl")).unwrap();
    assert!(!ledger.contains("quarantined"), "{ledger}");

    // The GPU's functions vanish from the bus (sysfs `remove`, or it fell off) while the
    // domain runs: the release finds them gone, and the session's GPU is quarantined although
    // its class can no longer be read.
    assert_eq!(h.qemu_hook("vm1", "started", "begin", &xml).code, 0);
    for f in [WELL, WELL_AUDIO] {
        fs::remove_file(h.dev(f)).unwrap();
    }
    assert_eq!(h.qemu_hook("vm1", "release", "end", &xml).code, 0);
    let q = h.quarantined();
    assert_eq!(q[0]["address"], WELL, "{q}");
    assert!(
        q[0]["reason"]
            .as_str()
            .unwrap()
            .contains("is gone from the PCI bus"),
        "{q}"
    );
    // doctor reports it although the host no longer lists it.
    let r = h.gp(&["doctor", "--no-libvirt"]);
    assert_eq!(r.code, 13);
    assert!(
        r.stdout.contains(&format!("gpu {WELL} health")),
        "{}",
        r.stdout
    );
}

#[test]
fn quarantine_add_and_list_by_hand() {
    let h = Host::new("health-link");
    let r = h.gp(&["quarantine", "list"]);
    assert_eq!(r.stdout, "no GPU is quarantined\n");
    let r = h.gp(&[
        "quarantine",
        "add",
        WELL_AUDIO,
        "--reason",
        "fan fails\nat load",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, format!("quarantined {WELL}: fan fails at load\n"));
    let q = h.quarantined();
    assert_eq!(q[0]["address"], WELL);
    assert_eq!(q[0]["by"], "by hand");
    let r = h.gp(&["quarantine", "add", "0000:05:00.0", "--reason", "x"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let r = h.gp(&["quarantine", "add", WELL, "--reason", ""]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // A GPU quarantined by hand that checks healthy is cleared without --force.
    let r = h.gp(&["quarantine", "clear", WELL]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// `attach` through the real daemon: `--count` passes over the quarantined GPU, `--gpu` is
/// refused with its reason (exit 7), and once none is left `--count` fails with exit 6.
#[test]
fn attach_skips_and_refuses_a_quarantined_gpu() {
    let _g = daemon_lock();
    if !daemon_available() {
        return;
    }
    clean_leftovers();
    let h = Host::new("health-no-reset");
    assert_eq!(h.gp(&["health"]).code, 18);
    let d = TestDomain::define("quarantine", "");
    let attach = |domain: &str, args: &[&str]| {
        let uri = test_uri();
        let mut a = vec!["-c", uri.as_str(), "attach", domain];
        a.extend_from_slice(args);
        h.gp(&a)
    };
    let r = attach(&d.name, &["--gpu", SICK]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert!(
        r.stderr.contains("quarantined since") && r.stderr.contains("no reset method"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(d.hostdevs(true).is_empty());
    let r = attach(&d.name, &["--count", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(d.hostdevs(true), [WELL, WELL_AUDIO]);
    let other = TestDomain::define("quarantine2", "");
    let r = attach(&other.name, &["--count", "1"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("1 quarantined"), "{}", r.stderr);
}

/// A GPU a domain used that has left the bus is found by a check by hand too: the ledger says
/// it was a GPU, the host no longer shows it.
#[test]
fn a_check_by_hand_finds_a_used_gpu_that_left_the_bus() {
    let h = Host::new("health-link");
    let xml = domain_xml("vm1", "", &[WELL, WELL_AUDIO]);
    assert_eq!(h.qemu_hook("vm1", "started", "begin", &xml).code, 0);
    for f in [WELL, WELL_AUDIO] {
        fs::remove_file(h.dev(f)).unwrap();
    }
    let r = h.gp(&["health", "--json"]);
    assert_eq!(r.code, 18, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let gone = v["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["address"] == WELL)
        .unwrap_or_else(|| panic!("{WELL} not checked: {v}"));
    assert_eq!(gone["state"], "quarantined", "{gone}");
    assert!(gone["problems"][0]
        .as_str()
        .unwrap()
        .contains("is gone from the PCI bus"));
    // An address nothing knows is not a GPU to check.
    let r = h.gp(&["health", "0000:07:00.0"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
}

/// A ledger held by another process (past its 5 s wait) does not stop the release's check.
#[test]
fn a_release_whose_ledger_is_locked_still_checks() {
    let h = Host::new("health-no-reset");
    fs::create_dir_all(h.state_dir()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(h.state_dir(), fs::Permissions::from_mode(0o750)).unwrap();
    let ledger = fs::File::create(h.state_dir().join("usage.jsonl")).unwrap();
    ledger.lock().unwrap();
    let r = h.qemu_hook(
        "vm1",
        "release",
        "end",
        &domain_xml("vm1", "", &[SICK, SICK_AUDIO]),
    );
    assert_eq!(r.code, 0, "bookkeeping never fails the hook: {}", r.stderr);
    assert!(r.stderr.contains("usage.jsonl"), "{}", r.stderr);
    drop(ledger);
    assert_eq!(h.quarantined()[0]["address"], SICK);
}

/// `health ADDR --recover` writes only when asked, through the host root: the kernel's reset
/// when offered, then remove of each function and a rescan of the bus above; it refuses a GPU
/// a running domain holds. (On a fixture the writes land in files and heal nothing.)
#[test]
fn recover_resets_then_removes_and_rescans_only_when_asked() {
    let h = Host::new("health-link");
    let r = h.gp(&["health", "--recover"]);
    assert_eq!(r.code, 2, "an address is required: {}", r.stderr);
    let files = [
        h.dev(SICK).join("reset"),
        h.dev(SICK).join("remove"),
        h.dev(SICK_AUDIO).join("remove"),
        h.dev("0000:00:01.0").join("rescan"),
    ];
    for f in &files {
        fs::write(f, "").unwrap();
    }
    // A running domain holds it: refused, nothing written.
    let status = h.root.path().join("run/libvirt/qemu/vm9.xml");
    fs::write(&status, common::status_xml("vm9", &[SICK, SICK_AUDIO])).unwrap();
    let r = h.gp(&["health", SICK, "--recover"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(
        r.stderr.contains("running domain 'vm9' holds it"),
        "{}",
        r.stderr
    );
    assert!(files
        .iter()
        .all(|f| fs::read_to_string(f).unwrap().is_empty()));
    fs::remove_file(&status).unwrap();
    // Both steps run (the link stays narrow), each file written once, and it still fails.
    let r = h.gp(&["health", SICK, "--recover"]);
    assert_eq!(r.code, 18, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&format!("{SICK}  reset: still fails")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains(&format!("{SICK}  remove + rescan: still fails")),
        "{}",
        r.stdout
    );
    for f in &files {
        assert_eq!(fs::read_to_string(f).unwrap(), "1", "{}", f.display());
    }
    // A healthy GPU needs nothing, and nothing is written.
    let r = h.gp(&["health", WELL, "--recover"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, format!("{WELL}  ok: nothing to recover\n"));
}
