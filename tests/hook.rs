//! The qemu hook as libvirt calls it (`gpupass-hook hook qemu DOMAIN OP SUBOP -`, XML on stdin)
//! over a host root that combines a fixture host's sysfs with libvirt's own files (a running
//! domain's status XML): prepare blocks what cannot work with one line, migrate/restore rewrite,
//! started/release keep the ledger, other operations pass, and install-hook writes a shim that
//! works.

mod common;

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};

use common::{domain_xml, uuid_for, HookRoot as Root, Run};

fn meta(count: u32) -> String {
    format!("<metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1' count='{count}'/></metadata>")
}

fn blocked(r: &Run, needle: &str) {
    assert_eq!(r.code, 1, "should block: {}", r.stderr);
    assert!(r.stdout.is_empty());
    assert_eq!(r.stderr.lines().count(), 1, "{:?}", r.stderr);
    assert!(r.stderr.contains(needle), "{needle:?} not in {}", r.stderr);
}

#[test]
fn prepare_blocks_what_cannot_work_with_one_line() {
    let root = Root::new("hgx-8gpu", &[("vm-running", &["0000:18:00.0"])]);
    blocked(
        &root.hook(
            "vm",
            "prepare",
            "begin",
            &domain_xml("vm", "", &["0000:18:00.0"]),
        ),
        "0000:18:00.0 is in use by running domain 'vm-running'",
    );
    blocked(
        &root.hook(
            "vm",
            "prepare",
            "begin",
            &domain_xml("vm", "", &["0000:ee:00.0"]),
        ),
        "hostdev 0000:ee:00.0 is not a PCI device on this host",
    );
    blocked(
        &root.hook(
            "vm",
            "prepare",
            "begin",
            &domain_xml("vm", &meta(2), &["0000:2a:00.0"]),
        ),
        "domain 'vm' asks for 2 GPU(s), its XML has 1",
    );
    blocked(
        &root.hook("vm", "prepare", "begin", "<domain><name>x"),
        "malformed",
    );
    // The running domain itself restarting is not a conflict with its own status file.
    let r = root.hook(
        "vm-running",
        "prepare",
        "begin",
        &domain_xml("vm-running", "", &["0000:18:00.0"]),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ok = root.hook(
        "vm",
        "prepare",
        "begin",
        &domain_xml("vm", &meta(1), &["0000:2a:00.0"]),
    );
    assert_eq!(
        (ok.code, ok.stdout.as_str(), ok.stderr.as_str()),
        (0, "", "")
    );

    let no_acs = Root::new("no-acs-shared", &[]);
    blocked(
        &no_acs.hook(
            "vm",
            "prepare",
            "begin",
            &domain_xml("vm", "", &["0000:04:00.0"]),
        ),
        "bound to host driver ixgbe",
    );
    let off = Root::new("iommu-off", &[]);
    blocked(
        &off.hook(
            "vm",
            "prepare",
            "begin",
            &domain_xml("vm", "", &["0000:3b:00.0"]),
        ),
        "the IOMMU is off",
    );
}

#[test]
fn prepare_warns_about_a_gpu_that_is_not_whole() {
    let root = Root::new("consumer-4fn", &[]);
    let r = root.hook(
        "vm",
        "prepare",
        "begin",
        &domain_xml("vm", "", &["0000:01:00.0", "0000:01:00.1"]),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "GPU 0000:01:00.0 is not whole in domain 'vm': 0000:01:00.2, 0000:01:00.3 missing"
        ),
        "{}",
        r.stderr
    );
}

#[test]
fn prepare_respects_a_lease_from_a_transform_in_flight() {
    let root = Root::new("hgx-8gpu", &[]);
    // vm-a's transform leases two GPUs; vm-b then tries to start with one of them.
    let a = root.gpupass(&["transform"], &domain_xml("vm-a", &meta(1), &[]));
    assert_eq!(a.code, 0, "{}", a.stderr);
    let leased = gpupass::xml::domain::parse(&a.stdout).unwrap().pci_hostdevs[0].to_string();
    blocked(
        &root.hook(
            "vm-b",
            "prepare",
            "begin",
            &domain_xml("vm-b", "", &[&leased]),
        ),
        "reserved for domain 'vm-a'",
    );
    // vm-a itself may start, and once it has started the lease is gone.
    let ok = root.hook("vm-a", "prepare", "begin", &a.stdout);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert_eq!(root.hook("vm-a", "started", "begin", &a.stdout).code, 0);
    assert_eq!(
        fs::read_dir(root.run_dir().join("leases")).unwrap().count(),
        0
    );
}

/// The GPUs `transform` gave a domain with `extra` (pinning) asking for two.
fn chosen(root: &Root, name: &str, extra: &str) -> Vec<String> {
    let xml = domain_xml(name, &format!("{}{extra}", meta(2)), &[]);
    let r = root.gpupass(&["transform"], &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let facts = gpupass::xml::domain::parse(&r.stdout).unwrap();
    facts.pci_hostdevs.iter().map(|a| a.to_string()).collect()
}

#[test]
fn transform_prefers_the_numa_node_a_domain_is_pinned_to() {
    // hgx-8gpu: 18, 2a, 3a, 5d on node 0 (CPUs 0-55,112-167); 9a, ab, ba, db on node 1.
    let root = Root::new("hgx-8gpu", &[]);
    let node1 = ["0000:9a:00.0", "0000:ab:00.0"];
    assert_eq!(
        chosen(&root, "by-vcpu", "<vcpu cpuset='56-59'>4</vcpu>"),
        node1
    );
    assert_eq!(
        chosen(
            &root,
            "by-pin",
            "<vcpu>2</vcpu><cputune><vcpupin vcpu='0' cpuset='170'/></cputune>"
        ),
        ["0000:ba:00.0", "0000:db:00.0"]
    );
    let root = Root::new("hgx-8gpu", &[]);
    assert_eq!(
        chosen(
            &root,
            "by-node",
            "<vcpu cpuset='0-3'>4</vcpu><numatune><memory nodeset='1'/></numatune>"
        ),
        node1
    );
    let root = Root::new("hgx-8gpu", &[]);
    assert_eq!(
        chosen(&root, "unpinned", ""),
        ["0000:18:00.0", "0000:2a:00.0"]
    );
}

#[test]
fn a_transformed_domain_starts_once_libvirt_has_given_it_a_uuid() {
    let root = Root::new("hgx-8gpu", &[]);
    // CloudStack hands over a domain without <uuid>; `virsh define` adds one.
    let without = domain_xml("audit-t1", &meta(1), &[])
        .replace(&format!("  <uuid>{}</uuid>\n", uuid_for("audit-t1")), "");
    assert!(!without.contains("<uuid>"));
    let t = root.gpupass(&["transform"], &without);
    assert_eq!(t.code, 0, "{}", t.stderr);
    let leased = gpupass::xml::domain::parse(&t.stdout).unwrap().pci_hostdevs[0].to_string();
    let defined = t.stdout.replace(
        "<name>audit-t1</name>",
        &format!(
            "<name>audit-t1</name>\n  <uuid>{}</uuid>",
            uuid_for("audit-t1")
        ),
    );
    // Another domain is still kept off the GPU...
    blocked(
        &root.hook(
            "vm-b",
            "prepare",
            "begin",
            &domain_xml("vm-b", "", &[&leased]),
        ),
        "reserved for domain 'audit-t1'",
    );
    // ...but the domain the lease was made for starts, and starting ends its lease.
    let ok = root.hook("audit-t1", "prepare", "begin", &defined);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert_eq!(root.hook("audit-t1", "started", "begin", &defined).code, 0);
    assert_eq!(
        fs::read_dir(root.run_dir().join("leases")).unwrap().count(),
        0,
        "the lease made before it had a UUID is gone"
    );
}

#[test]
fn migrate_and_restore_rewrite_only_when_needed() {
    let root = Root::new("hgx-8gpu", &[("other", &["0000:9a:00.0"])]);
    // Came from another host: its injected GPU 0000:9a:00.0 is held here by 'other'.
    let incoming = domain_xml("vm", &meta(1), &[])
        .replace("</devices>", "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x9a' slot='0x00' function='0x0'/></source><alias name='ua-gpupass-0000-9a-00-0'/></hostdev></devices>");
    for op in ["migrate", "restore"] {
        let r = root.hook("vm", op, "begin", &incoming);
        assert_eq!(r.code, 0, "{op}: {}", r.stderr);
        let addrs = gpupass::xml::domain::parse(&r.stdout).unwrap().pci_hostdevs;
        assert_eq!(addrs.len(), 1, "{op}");
        assert_ne!(addrs[0].to_string(), "0000:9a:00.0", "{op}");
        // The rewritten XML needs no further change: empty output = unchanged.
        let again = root.hook("vm", op, "begin", &r.stdout);
        assert_eq!(
            (again.code, again.stdout.as_str()),
            (0, ""),
            "{op}: {}",
            again.stderr
        );
    }
    // Without a request there is nothing to do.
    let r = root.hook("plain", "restore", "begin", &domain_xml("plain", "", &[]));
    assert_eq!((r.code, r.stdout.as_str()), (0, ""));
    // A request that cannot be met here fails the migration with a reason.
    let r = root.hook(
        "greedy",
        "migrate",
        "begin",
        &domain_xml("greedy", &meta(9), &[]),
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.is_empty() && r.stderr.contains("no free GPU"),
        "{}",
        r.stderr
    );
}

#[test]
fn started_and_release_keep_an_idempotent_usage_ledger() {
    let root = Root::new("consumer-4fn", &[]);
    let xml = domain_xml(
        "vm",
        "",
        &[
            "0000:01:00.0",
            "0000:01:00.1",
            "0000:01:00.2",
            "0000:01:00.3",
        ],
    );
    assert_eq!(root.hook("vm", "started", "begin", &xml).code, 0);
    assert_eq!(
        root.hook("vm", "reconnect", "begin", &xml).code,
        0,
        "a daemon restart"
    );
    assert_eq!(root.hook("vm", "release", "end", &xml).code, 0);
    assert_eq!(root.hook("vm", "release", "end", &xml).code, 0, "twice");
    // A blocked start still gets release: harmless.
    assert_eq!(
        root.hook("never", "release", "end", &domain_xml("never", "", &[]))
            .code,
        0
    );
    let ledger = fs::read_to_string(root.state_dir().join("usage.jsonl")).unwrap();
    assert_eq!(ledger.lines().count(), 2, "{ledger}");
    assert!(
        ledger.contains("\"gpus\":[\"0000:01:00.0\"]"),
        "only the display function counts: {ledger}"
    );
    let u = root.gpupass(&["usage", "--json"], "");
    assert_eq!(u.code, 0, "{}", u.stderr);
    let v: serde_json::Value = serde_json::from_str(&u.stdout).unwrap();
    assert_eq!(v["domains"][0]["domain"], "vm");
    assert_eq!(v["domains"][0]["running"], false);
    let bad = root.gpupass(&["usage", "--since", "yesterday"], "");
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    // A release whose bookkeeping fails is logged and never stops libvirt.
    let r = root.hook("vm", "release", "end", "not xml");
    assert_eq!(r.code, 0);
    assert!(r.stderr.contains("release vm"), "{}", r.stderr);
}

#[test]
fn other_operations_pass_without_reading_anything() {
    let root = Root::new("hgx-8gpu", &[]);
    for (op, sub) in [
        ("start", "begin"),
        ("stopped", "end"),
        ("attach", "begin"),
        ("frobnicate", "x"),
    ] {
        let r = root.hook("vm", op, sub, "");
        assert_eq!(
            (r.code, r.stdout.as_str(), r.stderr.as_str()),
            (0, "", ""),
            "{op} {sub}"
        );
    }
    let r = root.gpupass(&["hook", "lxc", "vm", "prepare", "begin", "-"], "");
    assert_eq!(r.code, 2, "only the qemu driver: {}", r.stderr);
}

#[test]
fn install_hook_writes_a_shim_that_runs_the_hook() {
    let root = Root::new("hgx-8gpu", &[("vm-running", &["0000:18:00.0"])]);
    let etc = tempfile::tempdir().unwrap();
    let r = root.gpupass(
        &[
            "install-hook",
            "--root",
            etc.path().to_str().unwrap(),
            "--binary",
            env!("CARGO_BIN_EXE_gpupass-hook"),
        ],
        "",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("next start"), "{}", r.stdout);
    let shim = etc.path().join("etc/libvirt/hooks/qemu.d/gpupass");
    // libvirt's call: SCRIPT DOMAIN OP SUBOP EXTRA, XML on stdin.
    let mut c = Command::new(&shim);
    c.args(["vm", "prepare", "begin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(domain_xml("vm", "", &["0000:18:00.0"]).as_bytes())
        .unwrap();
    let out: Run = child.wait_with_output().unwrap().into();
    blocked(&out, "in use by running domain 'vm-running'");
    let r = root.gpupass(
        &[
            "install-hook",
            "--root",
            etc.path().to_str().unwrap(),
            "--uninstall",
        ],
        "",
    );
    assert_eq!(r.code, 0);
    assert!(!shim.exists());
}

/// Owner limits in the hook path: a running domain of owner `acct` holds one GPU; acct may hold
/// one at a time.
#[test]
fn owner_limits_refuse_transform_and_block_prepare() {
    let owned = "<metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1' count='1' owner='acct'/></metadata>";
    let root = Root::new("hgx-8gpu", &[]);
    fs::write(
        root.path().join("run/libvirt/qemu/acct-a.xml"),
        format!(
            "<domstatus state='running'>{}</domstatus>",
            domain_xml("acct-a", owned, &["0000:18:00.0"])
        ),
    )
    .unwrap();
    let conf = root.path().join("gpupass.toml");
    fs::write(&conf, "[limits]\nacct = { max_gpus = 1 }\n").unwrap();
    let c = conf.to_str().unwrap();
    let r = root.gpupass(
        &["--config-file", c, "transform"],
        &domain_xml("acct-b", owned, &[]),
    );
    assert_eq!(r.code, 15, "{}", r.stderr);
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr.contains("owner 'acct' may hold 1 GPU(s) at once and holds 1 (domains: acct-a); 1 more would exceed the limit"),
        "{}",
        r.stderr
    );
    blocked(
        &root.gpupass(
            &[
                "--config-file",
                c,
                "hook",
                "qemu",
                "acct-b",
                "prepare",
                "begin",
                "-",
            ],
            &domain_xml("acct-b", owned, &["0000:2a:00.0"]),
        ),
        "owner 'acct' may hold 1 GPU(s)",
    );
    // The same domain restarting with its own GPU is within the limit; another owner is not
    // limited by acct's use.
    let ok = root.gpupass(
        &[
            "--config-file",
            c,
            "hook",
            "qemu",
            "acct-a",
            "prepare",
            "begin",
            "-",
        ],
        &domain_xml("acct-a", owned, &["0000:18:00.0"]),
    );
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let other = owned.replace("owner='acct'", "owner='other'");
    let r = root.gpupass(
        &["--config-file", c, "transform"],
        &domain_xml("other-a", &other, &[]),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A raised limit lets acct-b through.
    fs::write(&conf, "[limits]\nacct = { max_gpus = 2 }\n").unwrap();
    let r = root.gpupass(
        &["--config-file", c, "transform"],
        &domain_xml("acct-b", owned, &[]),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// GPU-hours per period: an owner whose usage this period (from the hook's own ledger) has
/// reached `max_gpu_hours` gets no new GPU from transform and cannot start a domain with GPUs;
/// a domain without GPUs still starts, and a larger allowance lets the owner through.
#[test]
fn gpu_hours_limit_refuses_once_the_period_is_used_up() {
    let owned = "<metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1' count='1' owner='acct'/></metadata>";
    let root = Root::new("hgx-8gpu", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A session of acct's that has been running for two hours (counted from the period start
    // when that is later; the allowance below is 36 seconds).
    fs::create_dir_all(root.state_dir()).unwrap();
    fs::write(
        root.state_dir().join("usage.jsonl"),
        format!(
            "{{\"event\":\"start\",\"ts\":{},\"domain\":\"acct-a\",\"key\":\"acct-a\",\"gpus\":[\"0000:18:00.0\"],\"owner\":\"acct\"}}\n",
            now - 7200
        ),
    )
    .unwrap();
    let conf = root.path().join("gpupass.toml");
    fs::write(
        &conf,
        "[limits]\nacct = { max_gpu_hours = 0.01, period = \"month\" }\n",
    )
    .unwrap();
    let c = conf.to_str().unwrap();
    let r = root.gpupass(
        &["--config-file", c, "transform"],
        &domain_xml("acct-b", owned, &[]),
    );
    assert_eq!(r.code, 15, "{}", r.stderr);
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr
            .contains("owner 'acct' may use 0.01 GPU-hour(s) per month and has used")
            && r.stderr.contains("no more GPUs until the next month"),
        "{}",
        r.stderr
    );
    blocked(
        &root.gpupass(
            &[
                "--config-file",
                c,
                "hook",
                "qemu",
                "acct-b",
                "prepare",
                "begin",
                "-",
            ],
            &domain_xml("acct-b", owned, &["0000:2a:00.0"]),
        ),
        "owner 'acct' may use 0.01 GPU-hour(s) per month",
    );
    let plain = root.gpupass(
        &[
            "--config-file",
            c,
            "hook",
            "qemu",
            "acct-c",
            "prepare",
            "begin",
            "-",
        ],
        &domain_xml("acct-c", "", &[]),
    );
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    fs::write(&conf, "[limits]\nacct = { max_gpu_hours = 1000 }\n").unwrap();
    let r = root.gpupass(
        &["--config-file", c, "transform"],
        &domain_xml("acct-b", owned, &[]),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// The installed hook gets every directory on its command line, so libvirt's bookkeeping calls
/// never read the config: a broken config blocks `prepare` (fail closed) but not `stopped` or
/// `start`, which would otherwise fail with it.
#[test]
fn a_broken_config_blocks_prepare_only() {
    let root = Root::new("hgx-8gpu", &[]);
    let conf = root.path().join("gpupass.toml");
    fs::write(&conf, "[paths]\nrundir = \"/x\"\n").unwrap();
    let c = conf.to_str().unwrap();
    let xml = domain_xml("vm-b", "", &[]);
    for op in [["start", "begin"], ["stopped", "end"]] {
        let r = root.gpupass(
            &[
                "--config-file",
                c,
                "hook",
                "qemu",
                "vm-b",
                op[0],
                op[1],
                "-",
            ],
            &xml,
        );
        assert_eq!(r.code, 0, "{op:?}: {}", r.stderr);
    }
    blocked(
        &root.gpupass(
            &[
                "--config-file",
                c,
                "hook",
                "qemu",
                "vm-b",
                "prepare",
                "begin",
                "-",
            ],
            &xml,
        ),
        "unknown field `rundir`",
    );
}

/// `prepare` blocks a start whose GPUs certainly cannot be placed (eight H100s need 2 TiB;
/// QEMU's default 40 address bits reach 1 TiB) with one line naming the GPUs and both sizes,
/// lets a fitted domain through, and only warns where the firmware's own sizing decides.
#[test]
fn prepare_blocks_gpus_that_cannot_fit_and_warns_where_the_firmware_decides() {
    let root = Root::new("hgx-8gpu", &[]);
    let all = [
        "0000:18:00.0",
        "0000:2a:00.0",
        "0000:3a:00.0",
        "0000:5d:00.0",
        "0000:9a:00.0",
        "0000:ab:00.0",
        "0000:ba:00.0",
        "0000:db:00.0",
    ];
    let eight = domain_xml("vm", "", &all);
    let r = root.hook("vm", "prepare", "begin", &eight);
    blocked(
        &r,
        "needs a 2 TiB 64-bit window that domain 'vm' cannot give",
    );
    assert!(
        r.stderr.contains("40 guest address bits reach (1 TiB)"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("gpupass fit vm --apply"), "{}", r.stderr);
    // The same domain with the bits the fit gives it starts.
    let fitted = eight.replace(
        "<memory>",
        "<cpu><maxphysaddr mode='emulate' bits='42'/></cpu>\n  <memory>",
    );
    let r = root.hook("vm", "prepare", "begin", &fitted);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // UEFI without a window for a 256 GiB need: a warning, not a block.
    let uefi = domain_xml("vm", "", &["0000:18:00.0"]).replace(
        "<os><type>hvm</type></os>",
        "<os firmware='efi'><type>hvm</type></os>",
    );
    let r = root.hook("vm", "prepare", "begin", &uefi);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("OVMF's own window may be smaller than the 256 GiB"),
        "{}",
        r.stderr
    );
}

/// A domain whose config rule asks for HGX full passthrough gets every GPU and NVSwitch from
/// the lean transformer and starts; without one of the switches `prepare` blocks it, naming it.
#[test]
fn an_hgx_full_rule_is_given_whole_and_prepare_blocks_a_partial_fabric() {
    let h = Root::new("hgx-8gpu", &[]);
    let config = h.path().join("gpupass.toml");
    std::fs::write(&config, "[[rules]]\ndomain = \"hgx-*\"\nhgx_full = true\n").unwrap();
    let cf = config.display().to_string();
    let xml = "<domain type='kvm'>\n  <name>hgx-vm</name>\n  <memory unit='KiB'>1048576</memory>\n  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n  </os>\n  <devices>\n  </devices>\n</domain>\n";
    let r = h.gpupass(&["--config-file", &cf, "transform"], xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let facts = gpupass::xml::domain::parse(&r.stdout).unwrap();
    assert_eq!(facts.pci_hostdevs.len(), 12, "{}", r.stdout);
    let p = h.gpupass(
        &[
            "--config-file",
            &cf,
            "hook",
            "qemu",
            "hgx-vm",
            "prepare",
            "begin",
            "-",
        ],
        &r.stdout,
    );
    assert_eq!(p.code, 0, "{}", p.stderr);

    // One NVSwitch hostdev taken out by hand: the start is blocked, naming it.
    let start = r
        .stdout
        .find("bus='0x07'")
        .expect("switch 07:00.0 injected");
    let open = r.stdout[..start].rfind("<hostdev").unwrap();
    let close = start + r.stdout[start..].find("</hostdev>").unwrap() + "</hostdev>".len();
    let partial = format!("{}{}", &r.stdout[..open], &r.stdout[close..]);
    let p = h.gpupass(
        &[
            "--config-file",
            &cf,
            "hook",
            "qemu",
            "hgx-vm",
            "prepare",
            "begin",
            "-",
        ],
        &partial,
    );
    assert_ne!(p.code, 0, "{}", p.stderr);
    assert!(p.stderr.contains("0000:07:00.0"), "{}", p.stderr);
}

#[test]
fn prepare_blocks_a_vf_whose_pf_a_running_domain_has_whole() {
    // The Flex 170 PF 0000:4d:00.0 runs whole in vm-whole; its VF 0000:4d:00.2 cannot start.
    let root = Root::new("vgpu-intel", &[("vm-whole", &["0000:4d:00.0"])]);
    blocked(
        &root.hook(
            "vm",
            "prepare",
            "begin",
            &domain_xml("vm", "", &["0000:4d:00.2"]),
        ),
        "0000:4d:00.2 is an SR-IOV virtual function of 0000:4d:00.0, which running domain 'vm-whole' has whole",
    );
    // A VF another running domain has is blocked as any hostdev is.
    let root = Root::new("vgpu-intel", &[("vm-vf", &["0000:4d:00.2"])]);
    blocked(
        &root.hook(
            "vm",
            "prepare",
            "begin",
            &domain_xml("vm", "", &["0000:4d:00.2"]),
        ),
        "0000:4d:00.2 is in use by running domain 'vm-vf'",
    );
    // Free, it starts.
    let root = Root::new("vgpu-intel", &[]);
    let r = root.hook(
        "vm",
        "prepare",
        "begin",
        &domain_xml("vm", "", &["0000:4d:00.2"]),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn profile_vf_metadata_is_resolved_by_transform_and_checked_by_prepare() {
    let vf_meta = |count: u32| {
        format!("<metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1' count='{count}' profile='vf'/></metadata>")
    };
    // vgpu-intel: VFs 0000:4d:00.1 (running in vm-vf) and 0000:4d:00.2 of the Flex 170.
    let root = Root::new("vgpu-intel", &[("vm-vf", &["0000:4d:00.1"])]);
    let r = root.gpupass(&["transform"], &domain_xml("vm", &vf_meta(1), &[]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let facts = gpupass::xml::domain::parse(&r.stdout).unwrap();
    let got: Vec<String> = facts.pci_hostdevs.iter().map(|a| a.to_string()).collect();
    assert_eq!(got, ["0000:4d:00.2"], "the free VF, never vm-vf's");
    // Transforming again keeps it (nothing to change: the output is the same domain).
    let again = root.gpupass(&["transform"], &r.stdout);
    assert_eq!(again.code, 0, "{}", again.stderr);
    let facts = gpupass::xml::domain::parse(&again.stdout).unwrap();
    assert_eq!(facts.pci_hostdevs.len(), 1);
    // The transformed domain starts; one without its VF does not.
    let ok = root.hook("vm", "prepare", "begin", &r.stdout);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    blocked(
        &root.hook(
            "vm",
            "prepare",
            "begin",
            &domain_xml("vm", &vf_meta(1), &[]),
        ),
        "domain 'vm' asks for 1 SR-IOV virtual function(s), its XML has 0",
    );
    // Two VFs cannot be had (one is vm-vf's): exit 6, nothing printed.
    let r = root.gpupass(&["transform"], &domain_xml("vm2", &vf_meta(2), &[]));
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stderr.contains("no free virtual function"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty());
    // Only `vf` is a profile so far.
    let mdev =
        "<metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1' profile='GRID T4-2Q'/></metadata>";
    let r = root.gpupass(&["transform"], &domain_xml("vm3", mdev, &[]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("profile 'GRID T4-2Q' is not known"),
        "{}",
        r.stderr
    );
}
