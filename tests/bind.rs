//! `gpupass bind`/`unbind`/`restore` on writable copies of fixture hosts. Every write lands in
//! the fixture. A small stand-in for the kernel (`common::kernel::FakeKernel`) reacts to those
//! writes the way sysfs does — `unbind`, `bind`, and `drivers_probe` honouring
//! `driver_override` — so the whole path, verification included, runs; without it the kernel
//! "does nothing" and gpupass must notice and put everything back.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::kernel::FakeKernel;
use common::{gpupass, host_copy, run, Run};

struct Host {
    root: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Host {
    fn new(fixture: &str) -> Self {
        Host {
            root: host_copy(fixture),
            state: tempfile::tempdir().unwrap(),
        }
    }

    fn gp(&self, args: &[&str]) -> Run {
        let mut c = gpupass(self.root.path(), &self.state.path().join("run"));
        c.arg("--state-dir").arg(self.state.path()).args(args);
        run(c)
    }

    fn driver(&self, bdf: &str) -> Option<String> {
        fs::read_link(self.dev(bdf).join("driver"))
            .ok()
            .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
    }

    fn dev(&self, bdf: &str) -> PathBuf {
        self.root.path().join("sys/bus/pci/devices").join(bdf)
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.root.path().join(rel)).unwrap_or_default()
    }

    fn records(&self) -> serde_json::Value {
        fs::read(self.state.path().join("bindings.json"))
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or(serde_json::json!({}))
    }
}

#[test]
fn dry_run_prints_the_exact_writes_in_order_and_changes_nothing() {
    let h = Host::new("seeds-k4200");
    let r = h.gp(&["bind", "0000:03:00.0", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let root = h.root.path().display().to_string();
    let want = [
        format!("write \"vfio-pci\" to {root}/sys/bus/pci/devices/0000:03:00.0/driver_override"),
        format!("write \"0000:03:00.0\" to {root}/sys/bus/pci/drivers/pci-stub/unbind"),
        format!("write \"0000:03:00.0\" to {root}/sys/bus/pci/drivers_probe"),
        format!("write \"vfio-pci\" to {root}/sys/bus/pci/devices/0000:03:00.1/driver_override"),
        format!("write \"0000:03:00.1\" to {root}/sys/bus/pci/drivers/pci-stub/unbind"),
        format!("write \"0000:03:00.1\" to {root}/sys/bus/pci/drivers_probe"),
    ];
    let lines: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("write "))
        .collect();
    assert_eq!(lines, want);
    assert_eq!(
        h.read("sys/bus/pci/devices/0000:03:00.0/driver_override"),
        "(null)\n"
    );
    assert_eq!(h.driver("0000:03:00.0").as_deref(), Some("pci-stub"));
    assert!(!h.state.path().join("bindings.json").exists());
}

#[test]
fn bind_moves_the_whole_group_records_it_and_restore_puts_it_back() {
    let h = Host::new("seeds-k4200");
    let _k = FakeKernel::start(h.root.path());
    let r = h.gp(&["bind", "0000:03:00.0", "--persist"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for f in ["0000:03:00.0", "0000:03:00.1"] {
        assert_eq!(h.driver(f).as_deref(), Some("vfio-pci"), "{f}");
        assert_eq!(
            h.read(&format!("sys/bus/pci/devices/{f}/driver_override")),
            "vfio-pci"
        );
        assert_eq!(h.read(&format!("etc/driverctl.d/pci-{f}")), "vfio-pci\n");
    }
    assert_eq!(
        h.driver("0000:82:00.0").as_deref(),
        Some("pci-stub"),
        "the other card stays"
    );
    let rec = h.records();
    assert_eq!(rec["0000:03:00.1"]["original"], "pci-stub");
    assert_eq!(rec["0000:03:00.1"]["driver"], "vfio-pci");
    assert_eq!(rec["0000:03:00.1"]["requested"], "0000:03:00.0");

    // Binding again keeps the original driver on record.
    assert_eq!(h.gp(&["bind", "0000:03:00.1"]).code, 0);
    assert_eq!(h.records()["0000:03:00.0"]["original"], "pci-stub");

    let r = h.gp(&["restore", "0000:03:00.1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for f in ["0000:03:00.0", "0000:03:00.1"] {
        assert_eq!(h.driver(f).as_deref(), Some("pci-stub"), "{f}");
        assert_eq!(
            h.read(&format!("sys/bus/pci/devices/{f}/driver_override")),
            "\n",
            "cleared"
        );
        assert!(!h
            .root
            .path()
            .join(format!("etc/driverctl.d/pci-{f}"))
            .exists());
    }
    assert_eq!(h.records(), serde_json::json!({}));
    let r = h.gp(&["restore", "0000:03:00.0"]);
    assert_eq!(r.code, 3, "nothing recorded any more: {}", r.stderr);
}

#[test]
fn when_the_kernel_does_not_follow_every_write_is_undone() {
    let h = Host::new("seeds-k4200");
    // No FakeKernel: the writes land but no driver moves.
    let r = h.gp(&["bind", "0000:82:00.0"]);
    assert_eq!(r.code, 10, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1);
    assert!(
        r.stderr.contains(
            "0000:82:00.0 is on pci-stub after the writes, not vfio-pci; the group was put back"
        ),
        "{}",
        r.stderr
    );
    // gpupass's writes are in the fixture: the forward unbind and probe, then the undo, which
    // cleared the override it had set. The device never left pci-stub (as sysfs still says),
    // so nothing re-binds it. It stopped at the first device: 0000:82:00.1 was never touched.
    assert_eq!(
        h.read("sys/bus/pci/drivers/pci-stub/unbind"),
        "0000:82:00.0"
    );
    assert_eq!(h.read("sys/bus/pci/drivers/pci-stub/bind"), "");
    assert_eq!(h.read("sys/bus/pci/drivers_probe"), "0000:82:00.0");
    assert_eq!(
        h.read("sys/bus/pci/devices/0000:82:00.0/driver_override"),
        "\n"
    );
    assert_eq!(
        h.read("sys/bus/pci/devices/0000:82:00.1/driver_override"),
        "(null)\n"
    );
    assert_eq!(
        h.records(),
        serde_json::json!({}),
        "no record of a bind that did not happen"
    );
}

#[test]
fn unbind_leaves_the_group_on_no_driver_until_restore() {
    let h = Host::new("amd-arc-multidomain");
    let _k = FakeKernel::start(h.root.path());
    let r = h.gp(&["unbind", "0001:04:00.0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The Arc's audio names its card: both functions, on two buses, and the group's other
    // non-bridge members (none here) move together.
    assert_eq!(h.driver("0001:03:00.0"), None);
    assert_eq!(h.driver("0001:04:00.0"), None);
    assert_eq!(
        h.driver("0001:02:01.0").as_deref(),
        Some("pcieport"),
        "bridges stay"
    );
    let r = h.gp(&["restore", "0001:03:00.0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(h.driver("0001:03:00.0").as_deref(), Some("i915"));
    assert_eq!(h.driver("0001:04:00.0").as_deref(), Some("snd_hda_intel"));
}

#[test]
fn refusals_name_the_reason_and_force_goes_through() {
    for (fixture, addr, needle) in [
        ("hgx-8gpu", "0000:03:00.0", "is the host's boot VGA"),
        (
            "no-acs-shared",
            "0000:04:00.0",
            "0000:06:00.0 (Ethernet controller, class 020000) on host driver ixgbe",
        ),
        (
            "hgx-8gpu",
            "0000:ba:00.0",
            "pid 4242 (nvidia-persistenced) holds /dev/nvidia6",
        ),
    ] {
        let h = Host::new(fixture);
        let r = h.gp(&["bind", addr]);
        assert_eq!(r.code, 14, "{addr}: {}", r.stderr);
        assert!(r.stdout.is_empty());
        assert!(
            r.stderr.contains(needle) && r.stderr.contains("--force"),
            "{}",
            r.stderr
        );
        assert_eq!(h.records(), serde_json::json!({}));
    }
    let h = Host::new("no-acs-shared");
    let _k = FakeKernel::start(h.root.path());
    let r = h.gp(&["bind", "0000:04:00.0", "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("forced:"), "{}", r.stderr);
    assert_eq!(
        h.driver("0000:06:00.0").as_deref(),
        Some("vfio-pci"),
        "forced: the NIC went too"
    );
    assert_eq!(h.records()["0000:06:00.1"]["original"], "ixgbe");
}

#[test]
fn missing_driver_unknown_device_and_no_iommu_are_clear_errors() {
    let h = Host::new("consumer-4fn");
    // No vfio-pci loaded on the desktop (and Xorg holds the card: --force past that).
    let r = h.gp(&["bind", "0000:01:00.0", "--force"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("driver vfio-pci is not loaded (modprobe vfio_pci)"),
        "{}",
        r.stderr
    );
    assert_eq!(
        h.read("sys/bus/pci/devices/0000:01:00.0/driver_override"),
        "(null)\n",
        "nothing written"
    );
    assert_eq!(h.gp(&["bind", "0000:09:00.0"]).code, 3);
    let off = Host::new("iommu-off");
    assert_eq!(off.gp(&["bind", "0000:3b:00.0"]).code, 7);
    assert_eq!(off.gp(&["bind", "../../x"]).code, 2);
}

/// The `write …` lines of a dry run, and the `wrote …` lines of the real run in the same words.
fn write_lines(out: &str, verb: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix(&format!("{verb} ")))
        .map(|l| format!("write {l}"))
        .collect()
}

#[test]
fn the_dry_run_lists_exactly_what_bind_and_restore_write() {
    let h = Host::new("seeds-k4200");
    let k = FakeKernel::start(h.root.path());
    for args in [["bind", "0000:03:00.0"], ["restore", "0000:03:00.0"]] {
        let dry = h.gp(&[args[0], args[1], "--dry-run"]);
        assert_eq!(dry.code, 0, "{args:?}: {}", dry.stderr);
        let planned = write_lines(&dry.stdout, "write");
        assert!(!planned.is_empty(), "{}", dry.stdout);
        assert!(k.seen().is_empty(), "the dry run wrote nothing");
        let r = h.gp(&args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        assert_eq!(write_lines(&r.stdout, "wrote"), planned, "{args:?}");
        // What the kernel saw is the planned list without the driver_override writes, which
        // stay in their files: the last one planned for each device is what is there now.
        let kernel: Vec<String> = planned
            .iter()
            .filter(|l| !l.ends_with("/driver_override"))
            .cloned()
            .collect();
        assert_eq!(k.seen(), kernel, "{args:?}");
        for f in ["0000:03:00.0", "0000:03:00.1"] {
            let rel = format!("sys/bus/pci/devices/{f}/driver_override");
            let last = planned
                .iter()
                .rev()
                .find(|l| l.ends_with(&rel))
                .expect("an override write for each device");
            assert!(
                last.starts_with(&format!("write {:?} to", h.read(&rel))),
                "{last}"
            );
        }
    }
}

/// An outside directory standing in for a driver, with the files a driver directory has.
fn outside_driver(parent: &Path, name: &str) -> PathBuf {
    let d = parent.join(name);
    fs::create_dir_all(&d).unwrap();
    for f in ["bind", "unbind", "new_id", "remove_id"] {
        fs::write(d.join(f), "").unwrap();
    }
    d
}

fn assert_untouched(outside: &Path) {
    for f in ["bind", "unbind"] {
        assert_eq!(
            fs::read_to_string(outside.join(f)).unwrap(),
            "",
            "{} was written",
            outside.join(f).display()
        );
    }
}

/// `gpupass VERB 0000:03:00.0 EXTRA…` for each EXTRA was refused with one line naming all of
/// `says`, and wrote nothing: not in the `outside` driver, not in the root.
fn assert_refused_untouched(
    h: &Host,
    verb: &str,
    extras: &[&[&str]],
    outside: &Path,
    says: &[&str],
) {
    for extra in extras {
        let mut args = vec![verb, "0000:03:00.0"];
        args.extend_from_slice(extra);
        let r = h.gp(&args);
        assert_untouched(outside);
        assert_eq!(r.code, 1, "{extra:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(says.iter().all(|s| r.stderr.contains(s)), "{}", r.stderr);
        assert!(r.stdout.is_empty(), "{}", r.stdout);
        assert_eq!(
            h.read("sys/bus/pci/devices/0000:03:00.0/driver_override"),
            "(null)\n",
            "nothing written in the root either"
        );
        assert_eq!(h.driver("0000:03:00.0").as_deref(), Some("pci-stub"));
    }
}

#[test]
fn a_driver_link_leading_out_of_the_root_is_never_written_through() {
    // (1) A device's `driver` link points at a directory outside the root. Only its name
    // counts, and there is no such driver under the root: refused before any write.
    let h = Host::new("seeds-k4200");
    let _k = FakeKernel::start(h.root.path());
    let out = tempfile::tempdir().unwrap();
    let evil = outside_driver(out.path(), "snd_hda_intel");
    let link = h.dev("0000:03:00.1").join("driver");
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&evil, &link).unwrap();
    assert_refused_untouched(
        &h,
        "bind",
        &[&["--force"], &["--dry-run"]],
        &evil,
        &[
            "0000:03:00.1 is bound to snd_hda_intel",
            "is not a driver directory",
        ],
    );
    assert_eq!(h.records(), serde_json::json!({}));

    // (2) The driver's own directory under the root is a link to the outside one.
    let h = Host::new("seeds-k4200");
    let _k = FakeKernel::start(h.root.path());
    let out = tempfile::tempdir().unwrap();
    let evil = outside_driver(out.path(), "pci-stub");
    let drivers = h.root.path().join("sys/bus/pci/drivers");
    fs::remove_dir_all(drivers.join("pci-stub")).unwrap();
    std::os::unix::fs::symlink(&evil, drivers.join("pci-stub")).unwrap();
    assert_refused_untouched(
        &h,
        "bind",
        &[&["--force"], &["--dry-run"]],
        &evil,
        &["pci-stub/unbind", "outside the host root"],
    );
    assert_eq!(h.records(), serde_json::json!({}));

    // (3) A driver link whose last component is no driver name: one line, nothing written.
    let h = Host::new("seeds-k4200");
    let link = h.dev("0000:03:00.1").join("driver");
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("../../../../bus/pci/drivers/pci stub", &link).unwrap();
    let r = h.gp(&["bind", "0000:03:00.0", "--dry-run"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("which is not a kernel driver name"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_driver_name_in_the_binding_record_must_be_a_driver_name() {
    let h = Host::new("seeds-k4200");
    let _k = FakeKernel::start(h.root.path());
    // A sibling of the host root, reached from sys/bus/pci/drivers by climbing out of it.
    let parent = h.root.path().parent().unwrap();
    let out = tempfile::tempdir_in(parent).unwrap();
    let evil = outside_driver(out.path(), "dir");
    let climb = format!(
        "../../../../../{}/dir",
        out.path().file_name().unwrap().to_str().unwrap()
    );
    assert!(h
        .root
        .path()
        .join("sys/bus/pci/drivers")
        .join(&climb)
        .is_dir());
    let rec = serde_json::json!({
        "0000:03:00.0": {"original": climb, "driver": "vfio-pci", "requested": "0000:03:00.0", "persisted": false},
    });
    fs::write(
        h.state.path().join("bindings.json"),
        serde_json::to_vec(&rec).unwrap(),
    )
    .unwrap();
    assert_refused_untouched(
        &h,
        "restore",
        &[&[], &["--dry-run"]],
        &evil,
        &["bindings.json is not valid", "invalid driver name"],
    );
}
