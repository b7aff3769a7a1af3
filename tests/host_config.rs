//! `gpupass host-config` on fixture hosts: the preview writes nothing, `--apply` writes every
//! file under the host root (a copy of the fixture) with a backup, a second run has nothing to
//! do, and IDs that would capture other cards are called out.

mod common;

use std::fs;
use std::path::Path;

use common::{gpupass, host, host_copy, run, Run};

fn hc(root: &Path, args: &[&str]) -> Run {
    let t = tempfile::tempdir().unwrap();
    let mut c = gpupass(root, t.path());
    c.arg("host-config").args(args);
    run(c)
}

#[test]
fn the_preview_shows_diffs_and_writes_nothing() {
    let root = host_copy("seeds-k4200");
    let before = fs::read_to_string(root.path().join("etc/initramfs-tools/modules")).unwrap();
    let r = hc(root.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("GPUs: 0000:03:00.0 0000:82:00.0"),
        "the two K4200, not the console: {}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("+options vfio-pci ids=10de:0e0a,10de:11b4"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("+vfio_pci"), "{}", r.stdout);
    assert!(
        r.stdout.contains("kernel command line: add iommu=pt"),
        "intel_iommu=on is already there: {}",
        r.stdout
    );
    assert!(r.stdout.contains("update-initramfs -u -k all"));
    assert!(r.stdout.contains("nothing written"));
    assert!(r.stderr.contains("also loads pci_stub"), "{}", r.stderr);
    assert!(!root
        .path()
        .join("etc/modprobe.d/gpupass-vfio.conf")
        .exists());
    assert_eq!(
        fs::read_to_string(root.path().join("etc/initramfs-tools/modules")).unwrap(),
        before
    );
}

#[test]
fn apply_writes_with_backups_and_a_second_run_has_nothing_to_do() {
    let root = host_copy("seeds-k4200");
    let original = fs::read_to_string(root.path().join("etc/initramfs-tools/modules")).unwrap();
    let r = hc(root.path(), &["--apply"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let modprobe =
        fs::read_to_string(root.path().join("etc/modprobe.d/gpupass-vfio.conf")).unwrap();
    assert!(
        modprobe.contains("options vfio-pci ids=10de:0e0a,10de:11b4\n"),
        "{modprobe}"
    );
    let modules = fs::read_to_string(root.path().join("etc/initramfs-tools/modules")).unwrap();
    assert!(modules.starts_with(&original), "only appended");
    assert!(
        modules.ends_with("vfio\nvfio_iommu_type1\nvfio_pci\n"),
        "{modules}"
    );
    let backups: Vec<_> = fs::read_dir(root.path().join("etc/initramfs-tools"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("modules.gpupass-bak."))
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    let kept =
        fs::read_to_string(root.path().join("etc/initramfs-tools").join(&backups[0])).unwrap();
    assert_eq!(kept, original);
    assert!(r.stdout.contains("still to do"), "{}", r.stdout);

    let again = hc(root.path(), &["--apply"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stdout.contains("files: nothing to change"),
        "{}",
        again.stdout
    );
    let n = fs::read_dir(root.path().join("etc/initramfs-tools"))
        .unwrap()
        .count();
    assert_eq!(n, 2, "no second backup");
}

#[test]
fn softdeps_name_the_host_drivers_modules_and_dracut_gets_a_drop_in() {
    let root = host_copy("consumer-4fn");
    let r = hc(
        root.path(),
        &["--gpu", "0000:01:00.0", "--initramfs", "dracut", "--apply"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let modprobe =
        fs::read_to_string(root.path().join("etc/modprobe.d/gpupass-vfio.conf")).unwrap();
    assert!(
        modprobe.contains("ids=10de:10f7,10de:1ad6,10de:1ad7,10de:1e07\n"),
        "{modprobe}"
    );
    for m in ["nvidia", "snd_hda_intel", "xhci_pci", "i2c_nvidia_gpu"] {
        assert!(
            modprobe.contains(&format!("softdep {m} pre: vfio-pci\n")),
            "{m}: {modprobe}"
        );
    }
    let dracut =
        fs::read_to_string(root.path().join("etc/dracut.conf.d/gpupass-vfio.conf")).unwrap();
    assert!(
        dracut.contains("force_drivers+=\" vfio vfio_iommu_type1 vfio_pci \""),
        "{dracut}"
    );
    assert!(
        r.stdout.contains("dracut -f --regenerate-all"),
        "{}",
        r.stdout
    );
    assert!(!root.path().join("etc/initramfs-tools").exists());

    // AMD host: amd_iommu=on.
    let r = hc(&host("amd-arc-multidomain"), &["--model", "1002:73bf"]);
    assert!(
        r.stdout.contains("kernel command line: nothing to add"),
        "amd_iommu=on iommu=pt present: {}",
        r.stdout
    );
    let r = hc(&host("iommu-off"), &["--gpu", "0000:3b:00.0"]);
    assert!(
        r.stdout
            .contains("kernel command line: add intel_iommu=on iommu=pt"),
        "{}",
        r.stdout
    );
}

#[test]
fn ids_that_would_capture_host_cards_are_called_out() {
    let r = hc(&host("hgx-8gpu"), &["--gpu", "0000:18:00.0"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stderr.contains(
            "ids=10de:2330 would also take 0000:ba:00.0 away from the host driver nvidia"
        ),
        "{}",
        r.stderr
    );
    let r = hc(&host("hgx-8gpu"), &["--model", "10de:2330"]);
    assert!(!r.stderr.contains("would also take"), "{}", r.stderr);
    assert!(
        r.stdout.contains("+softdep nvidia pre: vfio-pci"),
        "{}",
        r.stdout
    );
}

#[test]
fn nothing_to_configure_is_a_clear_error() {
    let r = hc(&host("hgx-8gpu"), &["--model", "10de:1e07"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stdout.is_empty());
    assert_eq!(r.stderr.lines().count(), 1);
    assert!(
        r.stderr.contains("no GPU of model 10de:1e07"),
        "{}",
        r.stderr
    );
    let r = hc(&host("iommu-off"), &[]);
    assert_eq!(r.code, 3, "nothing is passable there: {}", r.stderr);
    let r = hc(
        &host("hgx-8gpu"),
        &["--gpu", "0000:18:00.0", "--model", "10de:2330"],
    );
    assert_eq!(r.code, 2);
}

#[test]
fn a_link_leading_out_of_the_root_is_refused_and_nothing_is_written() {
    // etc/modprobe.d is a link to a directory outside the root.
    let root = host_copy("seeds-k4200");
    let out = tempfile::tempdir().unwrap();
    let modules = root.path().join("etc/initramfs-tools/modules");
    let before = fs::read_to_string(&modules).unwrap();
    std::os::unix::fs::symlink(out.path(), root.path().join("etc/modprobe.d")).unwrap();
    for args in [&["--apply"][..], &[][..]] {
        let r = hc(root.path(), args);
        assert_eq!(
            fs::read_dir(out.path()).unwrap().count(),
            0,
            "{args:?}: a file was created outside the root"
        );
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(
            r.stderr.contains("etc/modprobe.d/gpupass-vfio.conf")
                && r.stderr.contains("outside the host root"),
            "{}",
            r.stderr
        );
        assert!(r.stdout.is_empty(), "{}", r.stdout);
        assert_eq!(
            fs::read_to_string(&modules).unwrap(),
            before,
            "nothing half-written"
        );
    }

    // The file itself a link (to a file outside): not written through, not replaced.
    let root = host_copy("seeds-k4200");
    let target = out.path().join("modules");
    fs::write(&target, "outside\n").unwrap();
    let modules = root.path().join("etc/initramfs-tools/modules");
    fs::remove_file(&modules).unwrap();
    std::os::unix::fs::symlink(&target, &modules).unwrap();
    let r = hc(root.path(), &["--apply"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    assert_eq!(fs::read_to_string(&target).unwrap(), "outside\n");
    assert!(fs::symlink_metadata(&modules)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!root
        .path()
        .join("etc/modprobe.d/gpupass-vfio.conf")
        .exists());
}
