//! CloudStack 4.21+: `cloudstack discover`'s JSON against the agent's contract on every fixture
//! host (both binaries), its never-empty rule, the shell transformer run the way the agent runs
//! it (METHOD and XML as arguments), the completion of CloudStack's own GPUs (transform and
//! `migrate begin`), `cloudstack install` under a root, and `doctor` on a CloudStack host.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{host, host_copy, hostdev, HookRoot, Run, HOSTS};
use serde_json::Value;

fn discover_with(bin: &str, root: &Path, run_dir: &Path, extra: &[&str]) -> Run {
    let mut c = Command::new(bin);
    c.env_remove("GPUPASS_CONFIG")
        .env_remove("GPUPASS_HOST_ROOT")
        .env_remove("GPUPASS_RUN_DIR")
        .arg("--host-root")
        .arg(root)
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--state-dir")
        .arg(run_dir.join("state"))
        .args(extra)
        .args(["cloudstack", "discover"])
        .stdin(Stdio::null());
    common::run_within(c, std::time::Duration::from_secs(30))
}

fn discover(root: &Path, run_dir: &Path) -> Run {
    discover_with(env!("CARGO_BIN_EXE_gpupass-hook"), root, run_dir, &[])
}

fn is_hex4(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 4
            && s.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// The agent's parser: required strings, `enabled` an integer 0/1, arrays, optional numbers.
fn check_contract(name: &str, doc: &Value) {
    let obj = doc
        .as_object()
        .unwrap_or_else(|| panic!("{name}: not an object"));
    assert_eq!(obj.len(), 1, "{name}: only \"gpus\" at the top");
    let gpus = doc["gpus"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: no gpus array"));
    let mut seen = std::collections::BTreeSet::new();
    for g in gpus {
        let addr = g["pci_address"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: {g}"));
        assert!(seen.insert(addr.to_owned()), "{name}: {addr} twice");
        let short = addr.len() == 7
            && addr.as_bytes()[2] == b':'
            && addr.as_bytes()[5] == b'.'
            && addr == addr.to_lowercase();
        assert!(short, "{name}: {addr} is not bb:ss.f");
        for k in ["vendor", "device"] {
            assert!(
                g[k].as_str().is_some_and(|s| !s.is_empty()),
                "{name} {addr}: {k}"
            );
        }
        for k in ["vendor_id", "device_id"] {
            assert!(is_hex4(&g[k]), "{name} {addr}: {k} = {}", g[k]);
        }
        for k in ["vgpu_instances", "vf_instances"] {
            assert_eq!(g[k], serde_json::json!([]), "{name} {addr}: {k}");
        }
        let fp = &g["full_passthrough"];
        assert!(fp.is_object(), "{name} {addr}");
        assert!(
            fp["enabled"].is_u64() && fp["enabled"].as_u64().unwrap() <= 1,
            "{name} {addr}: enabled must be the integer 0 or 1, is {}",
            fp["enabled"]
        );
        assert!(
            fp.get("used_by_vm")
                .is_some_and(|u| u.is_null() || u.is_string()),
            "{name} {addr}"
        );
        let la = &fp["libvirt_address"];
        assert_eq!(la["domain"], "0x0000", "{name} {addr}");
        assert_eq!(
            format!(
                "{}:{}.{}",
                &la["bus"].as_str().unwrap()[2..],
                &la["slot"].as_str().unwrap()[2..],
                &la["function"].as_str().unwrap()[2..]
            ),
            addr,
            "{name}: libvirt_address names the same function"
        );
        for k in [
            "numa_node",
            "max_instances",
            "video_ram",
            "max_heads",
            "max_resolution_x",
            "max_resolution_y",
        ] {
            assert!(
                g.get(k).is_some_and(|v| v.is_null() || v.is_u64()),
                "{name} {addr}: {k} = {:?}",
                g.get(k)
            );
        }
        for k in ["sriov_totalvfs", "sriov_numvfs"] {
            assert!(g[k].is_u64(), "{name} {addr}: {k}");
        }
        assert!(
            g["pci_root"].as_str().is_some_and(|r| r.len() == 12),
            "{name} {addr}: pci_root {}",
            g["pci_root"]
        );
    }
}

fn listed(doc: &Value) -> Vec<String> {
    doc["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["pci_address"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_fixture_host_answers_the_agent_s_contract_in_both_binaries() {
    for name in HOSTS {
        let t = tempfile::tempdir().unwrap();
        let lean = discover(&host(name), t.path());
        assert_eq!(lean.code, 0, "{name}: {}", lean.stderr);
        assert!(lean.stdout.ends_with('\n'), "{name}");
        let doc: Value = serde_json::from_str(&lean.stdout)
            .unwrap_or_else(|e| panic!("{name}: {e}: {}", lean.stdout));
        check_contract(name, &doc);
        let full = discover_with(env!("CARGO_BIN_EXE_gpupass"), &host(name), t.path(), &[]);
        assert_eq!(full.code, 0, "{name}: {}", full.stderr);
        assert_eq!(full.stdout, lean.stdout, "{name}: both binaries agree");
        // Every left-out GPU is one line on stderr with its reason.
        for line in lean.stderr.lines() {
            assert!(
                line.starts_with("gpupass: GPU ") && line.contains(" left out: "),
                "{name}: {line}"
            );
        }
        // Never the boot VGA: the fixtures' consoles.
        for console in ["00:02.0", "03:00.0", "0a:00.0", "09:00.0", "2f:00.0"] {
            if lean.stderr.contains(&format!(
                "0000:{console} left out: it is the host's boot VGA"
            )) {
                assert!(!listed(&doc).contains(&console.to_owned()), "{name}");
            }
        }
    }
}

#[test]
fn vendor_and_device_names_come_from_the_host_s_pci_ids_in_both_binaries() {
    let t = tempfile::tempdir().unwrap();
    let names = |root: &Path| -> Vec<(String, String)> {
        let lean = discover(root, t.path());
        assert_eq!(lean.code, 0, "{}", lean.stderr);
        let full = discover_with(env!("CARGO_BIN_EXE_gpupass"), root, t.path(), &[]);
        assert_eq!(full.stdout, lean.stdout, "both binaries agree");
        let doc: Value = serde_json::from_str(&lean.stdout).unwrap();
        doc["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                let s = |k: &str| g[k].as_str().unwrap().to_owned();
                (s("vendor"), s("device"))
            })
            .collect()
    };
    let all = |v: &str, d: &str, n: usize| vec![(v.to_owned(), d.to_owned()); n];
    // Debian's /usr/share/misc/pci.ids, a RHEL-like /usr/share/hwdata/pci.ids, and none (the
    // IDs, as lspci prints an unknown device).
    assert_eq!(
        names(&host("hgx-8gpu")),
        all("NVIDIA Corporation", "GH100 [H100 SXM5 80GB]", 8)
    );
    assert_eq!(
        names(&host("seeds-k4200")),
        all("NVIDIA Corporation", "GK104GL [Quadro K4200]", 2)
    );
    assert_eq!(
        names(&host("no-acs-shared")),
        all("Vendor 10de", "Device 1eb8", 1)
    );
    // The host's own names, not the database compiled into the full binary.
    let copy = host_copy("hgx-8gpu");
    std::fs::write(
        copy.path().join("usr/share/misc/pci.ids"),
        "10de  The host's vendor name\n\t2330  The host's device name\n",
    )
    .unwrap();
    assert_eq!(
        names(copy.path()),
        all("The host's vendor name", "The host's device name", 8)
    );
}

#[test]
fn the_fixture_hosts_give_what_the_agent_should_allocate() {
    let t = tempfile::tempdir().unwrap();
    let by_host = |name: &str| -> (Value, String) {
        let r = discover(&host(name), t.path());
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        (serde_json::from_str(&r.stdout).unwrap(), r.stderr)
    };
    // A VGA-class consumer card (the stock script's blind spot), once, not per function.
    let (doc, err) = by_host("consumer-4fn");
    assert_eq!(listed(&doc), ["01:00.0"]);
    assert_eq!(doc["gpus"][0]["pci_class"], "VGA compatible controller");
    assert_eq!(doc["gpus"][0]["full_passthrough"]["enabled"], 1);
    assert!(
        err.contains("GPU 0000:00:02.0 left out: it is the host's boot VGA"),
        "{err}"
    );
    // Two T4s sharing an IOMMU group with the host's NIC: left out, with the reason.
    let (doc, err) = by_host("no-acs-shared");
    assert_eq!(listed(&doc), ["81:00.0"]);
    assert!(
        err.contains("GPU 0000:04:00.0 left out: it cannot be passed through: IOMMU group 12 also holds 0000:06:00.0"),
        "{err}"
    );
    // Eight H100s, the BMC's VGA left out.
    let (doc, _) = by_host("hgx-8gpu");
    assert_eq!(listed(&doc).len(), 8, "{doc}");
    // IOMMU off: nothing to offer, and that is a whole answer.
    let (doc, _) = by_host("iommu-off");
    assert_eq!(doc, serde_json::json!({"gpus": []}));
}

#[test]
fn other_pci_domains_only_when_the_config_says_the_agent_understands_them() {
    let t = tempfile::tempdir().unwrap();
    let root = host("amd-arc-multidomain");
    let r = discover(&root, t.path());
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(listed(&doc), ["0c:00.0"]);
    assert!(
        r.stderr
            .contains("GPU 0001:03:00.0 left out: it is in PCI domain 0001")
            && r.stderr.contains("pci_domains = true"),
        "{}",
        r.stderr
    );
    let config = t.path().join("gpupass.toml");
    std::fs::write(&config, "[cloudstack]\npci_domains = true\n").unwrap();
    let cf = config.display().to_string();
    let r = discover_with(
        env!("CARGO_BIN_EXE_gpupass-hook"),
        &root,
        t.path(),
        &["--config-file", &cf],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(listed(&doc), ["0c:00.0", "0001:03:00.0"]);
    let arc = &doc["gpus"][1];
    assert_eq!(
        arc["full_passthrough"]["libvirt_address"]["domain"],
        "0x0001"
    );
    assert_eq!(arc["vendor_id"], "8086");
    // An unknown key in [cloudstack] is a config error: one line, exit 2, nothing printed.
    std::fs::write(&config, "[cloudstack]\npci_domain = true\n").unwrap();
    let r = discover_with(
        env!("CARGO_BIN_EXE_gpupass-hook"),
        &root,
        t.path(),
        &["--config-file", &cf],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stdout.is_empty());
}

#[test]
fn used_by_vm_comes_from_libvirt_s_own_files() {
    // CloudStack's VM holds only the GPU's audio function: still the GPU's user.
    let h = HookRoot::new("consumer-4fn", &[("i-2-33-VM", &["0000:01:00.1"])]);
    let etc = h.path().join("etc/libvirt/qemu");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("defined.xml"),
        common::domain_xml("defined", "", &["0000:01:00.0"]),
    )
    .unwrap();
    let r = discover(h.path(), &h.run_dir());
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        doc["gpus"][0]["full_passthrough"]["used_by_vm"], "i-2-33-VM",
        "the running domain first"
    );
    let free = discover(&host("consumer-4fn"), &h.run_dir());
    let doc: Value = serde_json::from_str(&free.stdout).unwrap();
    assert!(doc["gpus"][0]["full_passthrough"]["used_by_vm"].is_null());
}

#[test]
fn a_transient_failure_prints_the_last_good_answer_never_an_empty_one() {
    let h = HookRoot::new("hgx-8gpu", &[("i-2-33-VM", &["0000:18:00.0"])]);
    // No answer yet and the host unreadable: one line, exit 1, nothing on stdout.
    let sys = h.path().join("sys");
    std::fs::rename(&sys, h.path().join("sys.away")).unwrap();
    let r = discover(h.path(), &h.run_dir());
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(r.stderr.contains("no last good answer"), "{}", r.stderr);
    std::fs::rename(h.path().join("sys.away"), &sys).unwrap();

    let good = discover(h.path(), &h.run_dir());
    assert_eq!(good.code, 0, "{}", good.stderr);
    assert!(good.stdout.contains("\"used_by_vm\":\"i-2-33-VM\""));
    // The host root becomes unreadable: sysfs gone.
    std::fs::rename(&sys, h.path().join("sys.away")).unwrap();
    let r = discover(h.path(), &h.run_dir());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, good.stdout, "the last good answer, whole");
    assert!(
        r.stderr.contains("discovery failed") && r.stderr.contains("last good answer"),
        "{}",
        r.stderr
    );
    // sysfs back, but libvirt's status directory unreadable (not a directory).
    std::fs::rename(h.path().join("sys.away"), &sys).unwrap();
    let status = h.path().join("run/libvirt/qemu");
    std::fs::remove_dir_all(&status).unwrap();
    std::fs::write(&status, "").unwrap();
    let r = discover(h.path(), &h.run_dir());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, good.stdout);
    assert!(r.stderr.contains("run/libvirt/qemu"), "{}", r.stderr);
    // A sysfs that lists no PCI device at all is not an answer either.
    std::fs::remove_file(&sys).unwrap();
    std::fs::create_dir_all(sys.join("bus/pci/devices")).unwrap();
    let r = discover(h.path(), &h.run_dir());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, good.stdout);
    assert!(r.stderr.contains("lists no PCI devices"), "{}", r.stderr);
    // A corrupt last answer is never printed.
    std::fs::write(h.run_dir().join("cloudstack-gpus.json"), "{\"gpus\":[{").unwrap();
    let r = discover(h.path(), &h.run_dir());
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stdout.is_empty());
}

/// CloudStack's own hostdev (LibvirtGpuDef): one function, no guest address, display off.
fn cloudstack_hostdev(bus: &str) -> String {
    format!("<hostdev mode='subsystem' type='pci' managed='yes' display='off'><driver name='vfio'/><source><address domain='0x0000' bus='0x{bus}' slot='0x00' function='0x0'/></source></hostdev>")
}

fn cloudstack_domain(name: &str, hostdevs: &str) -> String {
    format!(
        "<domain type='kvm'>\n  <name>{name}</name>\n  <uuid>{}</uuid>\n  <memory>131072</memory>\n  <os><type>hvm</type></os>\n  <devices>\n    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/x.qcow2'/><target dev='vda' bus='virtio'/></disk>\n    {hostdevs}\n  </devices>\n</domain>",
        common::uuid_for(name)
    )
}

fn hostdev_sources(xml: &str) -> Vec<String> {
    xml.match_indices("<hostdev")
        .map(|(i, _)| {
            let rest = &xml[i..];
            let s = rest.find("<address").unwrap();
            let e = rest[s..].find("/>").unwrap();
            rest[s..s + e].to_owned()
        })
        .collect()
}

/// Runs the installed-style transformer exactly as the agent does: the file itself, with
/// METHOD and XML as arguments, nothing on stdin.
fn transformer(h: &HookRoot, args: &[&str]) -> Run {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/libvirt-vm-xml-transformer.sh");
    let mut c = Command::new(script);
    c.env("GPUPASS_BIN", env!("CARGO_BIN_EXE_gpupass-hook"))
        .env("GPUPASS_HOST_ROOT", h.path())
        .env("GPUPASS_RUN_DIR", h.run_dir())
        .env("GPUPASS_STATE_DIR", h.state_dir())
        .env_remove("GPUPASS_CONFIG")
        .args(args)
        .stdin(Stdio::null());
    common::run_within(c, std::time::Duration::from_secs(30))
}

#[test]
fn the_shell_transformer_completes_cloudstack_s_gpu_the_way_the_agent_calls_it() {
    let h = HookRoot::new("consumer-4fn", &[]);
    let xml = cloudstack_domain("i-2-33-VM", &cloudstack_hostdev("01"));
    let r = transformer(&h, &["transform", &xml]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = r.stdout.trim_end();
    assert!(out.ends_with("</domain>"), "a complete XML: {out}");
    let sources = hostdev_sources(out);
    assert_eq!(sources.len(), 4, "the GPU and its audio, USB, UCSI: {out}");
    for f in ["0x0", "0x1", "0x2", "0x3"] {
        assert!(
            sources
                .iter()
                .any(|s| s.contains("bus='0x01'") && s.contains(&format!("function='{f}'"))),
            "{f}: {sources:?}"
        );
    }
    assert_eq!(
        out.matches("bus='0x01' slot='0x00' function='0x0'").count(),
        1,
        "no second allocation of CloudStack's function"
    );
    // The guest fit gives the guest the card as the host has it: the four functions at one
    // guest slot with the host's function numbers (CloudStack's own hostdev gains its address).
    let guest: Vec<String> = out
        .match_indices("<hostdev")
        .map(|(i, _)| {
            let block = &out[i..i + out[i..].find("</hostdev>").unwrap()];
            let a = block.rfind("<address type='pci'").expect("a guest address");
            block[a..a + block[a..].find("/>").unwrap()].to_owned()
        })
        .collect();
    assert_eq!(guest.len(), 4, "{out}");
    let slot = |g: &str| g.split(" function=").next().unwrap().to_owned();
    assert!(
        guest.iter().all(|g| slot(g) == slot(&guest[0])),
        "{guest:?}"
    );
    for f in ["0x0", "0x1", "0x2", "0x3"] {
        assert!(
            guest.iter().any(|g| g.contains(&format!("function='{f}'"))),
            "{f}: {guest:?}"
        );
    }
    assert!(
        guest
            .iter()
            .any(|g| g.contains("function='0x0'") && g.contains("multifunction='on'")),
        "{guest:?}"
    );
    // Idempotent: the completed XML comes back as it went in.
    let again = transformer(&h, &["transform", out]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.stdout.trim_end(), out);
    // A domain without a GPU comes back unchanged, byte for byte.
    let plain = cloudstack_domain("i-2-34-VM", "");
    let r = transformer(&h, &["transform", &plain]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, format!("{plain}\n"));
}

#[test]
fn the_shell_transformer_never_exits_0_without_a_complete_xml() {
    let h = HookRoot::new("consumer-4fn", &[]);
    for (args, code) in [
        (vec!["transform", "<domain><name>x</name>"], 2),
        (vec!["transform", "not xml at all"], 2),
        (vec!["transform"], 2),
        (vec!["onStart", "<domain/>"], 2),
    ] {
        let r = transformer(&h, &args);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
    }
    // A companion held by another running domain: refused (the agent keeps its XML; the qemu
    // hook's prepare then judges the start).
    let h = HookRoot::new("consumer-4fn", &[("other", &["0000:01:00.1"])]);
    let xml = cloudstack_domain("i-2-33-VM", &cloudstack_hostdev("01"));
    let r = transformer(&h, &["transform", &xml]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    assert!(r.stdout.is_empty());
    assert!(r.stderr.contains("held by domain 'other'"), "{}", r.stderr);
}

#[test]
fn migrate_begin_on_the_destination_re_completes_what_cloudstack_stripped() {
    let h = HookRoot::new("consumer-4fn", &[]);
    // CloudStack's migration XML: its own hostdev only (companions stripped).
    let xml = cloudstack_domain("i-2-33-VM", &cloudstack_hostdev("01"));
    let r = h.hook("i-2-33-VM", "migrate", "begin", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(hostdev_sources(&r.stdout).len(), 4, "{}", r.stdout);
    // Already whole: nothing printed (libvirt keeps its XML).
    let r2 = h.hook("i-2-33-VM", "migrate", "begin", &r.stdout);
    assert_eq!(r2.code, 0, "{}", r2.stderr);
    assert!(r2.stdout.is_empty(), "{}", r2.stdout);
    // prepare then accepts the whole GPU without a warning about missing functions.
    let p = h.hook("i-2-33-VM", "prepare", "begin", &r.stdout);
    assert_eq!(p.code, 0, "{}", p.stderr);
    assert!(!p.stderr.contains("not whole"), "{}", p.stderr);
}

#[test]
fn a_config_rule_does_not_allocate_a_second_gpu_to_a_domain_cloudstack_gave_one() {
    let h = HookRoot::new("hgx-8gpu", &[]);
    let config = h.path().join("gpupass.toml");
    std::fs::write(&config, "[[rules]]\ndomain = \"i-*-VM\"\ncount = 1\n").unwrap();
    let cf = config.display().to_string();
    let xml = cloudstack_domain("i-2-33-VM", &cloudstack_hostdev("2a"));
    let r = h.gpupass(&["--config-file", &cf, "transform", "--no-fit"], &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout, xml,
        "the H100 is whole already: unchanged, no second GPU"
    );
    // With the guest fit (the default) the domain is fitted to that one H100, still no second.
    let r = h.gpupass(&["--config-file", &cf, "transform"], &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        hostdev_sources(&r.stdout),
        hostdev_sources(&xml),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("<pcihole64"), "{}", r.stdout);
    // A domain with no GPU still gets the rule's.
    let plain = cloudstack_domain("i-2-35-VM", "");
    let r = h.gpupass(&["--config-file", &cf, "transform"], &plain);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(hostdev_sources(&r.stdout).len(), 1, "{}", r.stdout);
    let _ = hostdev;
}

#[test]
fn install_puts_the_shim_transformer_and_hook_in_place_and_uninstall_puts_back_the_original() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let script = r.join("usr/share/cloudstack-common/scripts/vm/hypervisor/kvm/gpudiscovery.sh");
    std::fs::create_dir_all(script.parent().unwrap()).unwrap();
    std::fs::write(
        &script,
        "#!/bin/bash\n# stock gpudiscovery.sh\necho '{\"gpus\":[]}'\n",
    )
    .unwrap();
    let gp = |args: &[&str]| -> Run {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpupass"));
        c.env_remove("GPUPASS_CONFIG")
            .args([
                "--run-dir",
                "/run/gpupass",
                "--state-dir",
                "/var/lib/gpupass",
            ])
            .args(["cloudstack", "install", "--root"])
            .arg(r)
            .args(["--binary", "/usr/local/bin/gpupass-hook"])
            .args(args)
            .stdin(Stdio::null());
        common::run(c)
    };
    let first = gp(&[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    for line in [
        "agent.hooks.basedir=/etc/cloudstack/agent/hooks",
        "agent.hooks.libvirt_vm_xml_transformer.shell_script=libvirt-vm-xml-transformer.sh",
        "agent.hooks.libvirt_vm_xml_transformer.method=transform",
    ] {
        assert!(
            first.stdout.lines().any(|l| l == line),
            "{line}: {}",
            first.stdout
        );
    }
    let transformer = r.join("etc/cloudstack/agent/hooks/libvirt-vm-xml-transformer.sh");
    let hook = r.join("etc/libvirt/hooks/qemu.d/gpupass");
    let shim = std::fs::read_to_string(&script).unwrap();
    assert!(
        shim.contains(
            "exec '/usr/local/bin/gpupass-hook' '--host-root' '/' '--run-dir' '/run/gpupass'"
        ),
        "{shim}"
    );
    assert!(shim.trim_end().ends_with("cloudstack discover"), "{shim}");
    let t = std::fs::read_to_string(&transformer).unwrap();
    assert!(
        t.contains("gpupass() { '/usr/local/bin/gpupass-hook' '--host-root' '/'"),
        "{t}"
    );
    assert!(hook.is_file());
    let backup = r
        .join("usr/share/cloudstack-common/scripts/vm/hypervisor/kvm/gpudiscovery.sh.gpupass-orig");
    // Idempotent: the same files, the stock script still the backup.
    let second = gp(&[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(std::fs::read_to_string(&script).unwrap(), shim);
    assert!(std::fs::read_to_string(&backup)
        .unwrap()
        .contains("# stock gpudiscovery.sh"));
    let leftovers: Vec<_> = std::fs::read_dir(script.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "the shim and the backup only: {leftovers:?}"
    );
    // Uninstall: the original back, gpupass's files gone.
    let u = gp(&["--uninstall"]);
    assert_eq!(u.code, 0, "{}", u.stderr);
    assert!(std::fs::read_to_string(&script)
        .unwrap()
        .contains("# stock gpudiscovery.sh"));
    assert!(!backup.exists() && !transformer.exists() && !hook.exists());
    // Not a CloudStack host: refused, nothing written.
    let bare = tempfile::tempdir().unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpupass-hook"));
    c.env_remove("GPUPASS_CONFIG")
        .args([
            "--run-dir",
            "/run/gpupass",
            "--state-dir",
            "/var/lib/gpupass",
        ])
        .args(["cloudstack", "install", "--root"])
        .arg(bare.path())
        .stdin(Stdio::null());
    let no = common::run(c);
    assert_eq!(no.code, 1, "{}", no.stderr);
    assert!(
        no.stderr.contains("not a CloudStack KVM agent host"),
        "{}",
        no.stderr
    );
    assert_eq!(std::fs::read_dir(bare.path()).unwrap().count(), 0);
}

fn doctor_check(root: &Path) -> (i32, Option<Value>) {
    let t = tempfile::tempdir().unwrap();
    let mut c = common::gpupass(root, t.path());
    c.args(["doctor", "--json", "--no-libvirt"]);
    let r = common::run(c);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stderr));
    let check = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "cloudstack transformer")
        .cloned();
    (r.code, check)
}

#[test]
fn doctor_fails_a_cloudstack_host_with_the_transformer_but_not_the_qemu_hook() {
    let copy = host_copy("consumer-4fn");
    let r = copy.path();
    let (code, check) = doctor_check(r);
    assert!(check.is_none(), "not a CloudStack host: no such check");
    let base = code;
    let etc = r.join("etc/cloudstack/agent");
    std::fs::create_dir_all(etc.join("hooks")).unwrap();
    std::fs::write(etc.join("agent.properties"), "host=10.0.0.1\n").unwrap();
    let (_, check) = doctor_check(r);
    assert_eq!(check.unwrap()["status"], "warn");
    // The transformer alone (by hand, or CloudStack's default name): FAIL, exit 13.
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("hooks/libvirt-vm-xml-transformer.sh"),
        etc.join("hooks/libvirt-vm-xml-transformer.sh"),
    )
    .unwrap();
    let (code, check) = doctor_check(r);
    let check = check.unwrap();
    assert_eq!(check["status"], "fail", "{check}");
    assert!(check["fix"]
        .as_str()
        .unwrap()
        .contains("gpupass cloudstack install"));
    assert_eq!(code, 13);
    // With the qemu hook: ok, and doctor's exit is what it was without CloudStack.
    std::fs::create_dir_all(r.join("etc/libvirt/hooks/qemu.d")).unwrap();
    std::fs::write(r.join("etc/libvirt/hooks/qemu.d/gpupass"), "#!/bin/sh\n").unwrap();
    let (code, check) = doctor_check(r);
    assert_eq!(check.unwrap()["status"], "ok");
    assert_eq!(code, base);
}

/// A quarantined GPU (issue 14) is not offered to CloudStack: left out, its reason on stderr.
#[test]
fn a_quarantined_gpu_is_left_out_of_the_agents_list() {
    let h = HookRoot::new("hgx-8gpu", &[]);
    let r = h.gpupass(&["cloudstack", "discover"], "");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("\"18:00.0\""), "{}", r.stdout);
    let q = Command::new(env!("CARGO_BIN_EXE_gpupass"))
        .env_remove("GPUPASS_CONFIG")
        .arg("--host-root")
        .arg(h.path())
        .arg("--run-dir")
        .arg(h.run_dir())
        .arg("--state-dir")
        .arg(h.state_dir())
        .args([
            "quarantine",
            "add",
            "0000:18:00.0",
            "--reason",
            "fell off the bus",
        ])
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let r = h.gpupass(&["cloudstack", "discover"], "");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains("\"18:00.0\""), "{}", r.stdout);
    assert!(
        r.stdout.contains("\"2a:00.0\""),
        "the others stay: {}",
        r.stdout
    );
    assert!(
        r.stderr.contains("18:00.0") && r.stderr.contains("quarantine"),
        "{}",
        r.stderr
    );
}
