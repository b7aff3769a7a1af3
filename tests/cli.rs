//! The binary's contract without a daemon: exit codes and one-line errors, `xml` golden files
//! (each block schema-valid inside a domain), template overrides, and `used_by` read from
//! libvirt's in-process test driver.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{gpupass, host, listed_gpu, run, run_within, Run, HOSTS};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn gp(host_name: &str, args: &[&str]) -> Run {
    let t = tmp();
    let mut c = gpupass(&host(host_name), t.path());
    c.args(args);
    run(c)
}

fn assert_one_line_error(r: &Run, code: i32, needle: &str) {
    assert_eq!(r.code, code, "stderr: {}", r.stderr);
    assert!(
        r.stdout.is_empty(),
        "nothing on stdout on failure: {}",
        r.stdout
    );
    assert_eq!(r.stderr.lines().count(), 1, "one line: {:?}", r.stderr);
    assert!(r.stderr.starts_with("gpupass: error: "), "{}", r.stderr);
    assert!(r.stderr.contains(needle), "{needle:?} not in {}", r.stderr);
}

#[test]
fn malformed_addresses_never_reach_the_filesystem() {
    for bad in [
        "../../../etc/passwd",
        "0000:01:00.0/../..",
        "0000:01:00",
        "zz:00.0",
        "",
    ] {
        let r = gp("consumer-4fn", &["xml", bad]);
        assert_one_line_error(&r, 2, "invalid PCI address");
        let r = gp("consumer-4fn", &["show", bad]);
        assert_one_line_error(&r, 2, "invalid PCI address");
    }
    let r = gp(
        "consumer-4fn",
        &["attach", "vm", "--count", "1", "--model", "10de"],
    );
    assert_one_line_error(&r, 2, "invalid PCI ID");
}

#[test]
fn usage_errors_are_one_line_with_exit_2() {
    let r = gp("consumer-4fn", &["attach", "vm"]);
    assert_one_line_error(&r, 2, "required arguments");
    let r = gp(
        "consumer-4fn",
        &["attach", "vm", "--gpu", "0000:01:00.0", "--count", "1"],
    );
    assert_one_line_error(&r, 2, "cannot be used with");
    let r = gp("consumer-4fn", &["detach", "vm"]);
    assert_one_line_error(&r, 2, "required arguments");
    let r = gp("consumer-4fn", &["attach", "vm", "--count", "0"]);
    assert_one_line_error(&r, 2, "--count");
    let r = gp("consumer-4fn", &["frobnicate"]);
    assert_one_line_error(&r, 2, "frobnicate");
}

#[test]
fn unknown_gpu_and_bad_host_root() {
    let r = gp("consumer-4fn", &["xml", "0000:01:00.0", "0000:02:00.0"]);
    assert_one_line_error(&r, 3, "no GPU at 0000:02:00.0");
    let r = gp("consumer-4fn", &["show", "0000:00:1f.3"]);
    assert_one_line_error(&r, 3, "no GPU at 0000:00:1f.3");
    let t = tmp();
    let mut c = gpupass(&t.path().join("nothing"), t.path());
    c.arg("list");
    assert_one_line_error(&run(c), 1, "has no sys/bus/pci/devices");
}

#[test]
fn libvirt_unreachable_is_exit_8_for_attach_and_a_warning_for_list() {
    let uri = "qemu+unix:///system?socket=/nonexistent/gpupass-test-sock";
    let r = gp("hgx-8gpu", &["-c", uri, "attach", "vm", "--count", "1"]);
    assert_one_line_error(&r, 8, "cannot connect to libvirt");
    let r = gp("hgx-8gpu", &["-c", uri, "detach", "vm", "--all"]);
    assert_one_line_error(&r, 8, "cannot connect to libvirt");
    let r = gp("hgx-8gpu", &["-c", uri, "list", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot connect to libvirt"),
        "{}",
        r.stderr
    );
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["gpus"][1]["used_by"], serde_json::Value::Null);
    assert_eq!(v["libvirt"]["connected"], false);
}

/// A libvirt socket that accepts and then never answers: attach gives up after
/// --libvirt-timeout with exit 8 and one line instead of hanging; out-of-range values are
/// refused at parse time.
#[test]
fn a_libvirt_that_never_answers_ends_in_exit_8_within_the_deadline() {
    let t = tmp();
    let sock = t.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            held.push(c);
        }
    });
    let uri = format!("qemu+unix:///system?socket={}", sock.display());
    for verb in [
        &["attach", "vm", "--count", "1", "--config"][..],
        &["detach", "vm", "--all", "--config"][..],
    ] {
        let mut c = gpupass(&host("consumer-4fn"), &t.path().join("run"));
        c.args(["-c", &uri])
            .args(verb)
            .args(["--libvirt-timeout", "2"]);
        let start = std::time::Instant::now();
        let r = run_within(c, std::time::Duration::from_secs(30));
        assert_one_line_error(&r, 8, "libvirt did not answer within 2 s");
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
    }
    for bad in ["0", "3601", "x", "18446744073709551616"] {
        let r = gp(
            "consumer-4fn",
            &["attach", "vm", "--count", "1", "--libvirt-timeout", bad],
        );
        assert_one_line_error(&r, 2, "--libvirt-timeout");
    }
}

#[test]
fn iommu_off_refuses_attach_before_touching_libvirt_state() {
    // The test driver answers but has no attach: reaching it would be a different error.
    let r = gp(
        "iommu-off",
        &[
            "-c",
            "test:///default",
            "attach",
            "test",
            "--gpu",
            "0000:3b:00.0",
            "--config",
        ],
    );
    assert_one_line_error(&r, 7, "IOMMU is off");
    let r = gp(
        "no-acs-shared",
        &[
            "-c",
            "test:///default",
            "attach",
            "test",
            "--gpu",
            "0000:04:00.0",
        ],
    );
    assert_one_line_error(&r, 7, "ixgbe");
    let r = gp(
        "no-acs-shared",
        &["-c", "test:///default", "attach", "test", "--count", "2"],
    );
    assert_one_line_error(&r, 6, "2 wanted, 1 free");
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/xml")
}

fn all_gpus(host_name: &str) -> Vec<String> {
    let r = gp(host_name, &["list", "--json", "--no-libvirt"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["address"].as_str().unwrap().to_owned())
        .collect()
}

/// `gpupass xml` for every GPU of every fixture host, against tests/golden/xml/<host>.xml
/// (UPDATE_GOLDEN=1 rewrites them; review the diff like code).
#[test]
fn xml_blocks_match_golden_files() {
    for name in HOSTS {
        let gpus = all_gpus(name);
        let mut args = vec!["xml"];
        args.extend(gpus.iter().map(String::as_str));
        let r = gp(name, &args);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        let path = golden_dir().join(format!("{name}.xml"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            fs::create_dir_all(golden_dir()).unwrap();
            fs::write(&path, &r.stdout).unwrap();
        }
        let want = fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("missing {}; run with UPDATE_GOLDEN=1", path.display()));
        assert_eq!(
            r.stdout,
            want,
            "{name}: output differs from {}",
            path.display()
        );
    }
}

#[test]
fn xml_covers_every_function_and_other_pci_domains() {
    let r = gp("consumer-4fn", &["xml", "0000:01:00.2"]);
    assert_eq!(r.stdout.lines().count(), 4);
    let r = gp("amd-arc-multidomain", &["xml", "0001:03:00.0"]);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[1].contains("domain='0x0001' bus='0x04' slot='0x00' function='0x0'"));
}

/// Every composed block, wrapped in a small domain, passes libvirt's own schema.
#[test]
fn every_composed_block_is_schema_valid_in_a_domain() {
    if !common::tool_available("virt-xml-validate") {
        return;
    }
    let t = tmp();
    let mut checked = 0;
    for name in HOSTS {
        let gpus = all_gpus(name);
        let mut args = vec!["xml"];
        args.extend(gpus.iter().map(String::as_str));
        let r = gp(name, &args);
        for (i, block) in r.stdout.lines().enumerate() {
            let xml = common::tiny_domain_xml("validate", "")
                .replace("<memballoon", &format!("{block}\n    <memballoon"));
            let path = t.path().join(format!("{name}-{i}.xml"));
            fs::write(&path, xml).unwrap();
            let out = Command::new("virt-xml-validate")
                .arg(&path)
                .arg("domain")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name} block {i} invalid: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} blocks checked");
}

#[test]
fn a_template_override_from_config_is_used_and_a_bad_one_refused() {
    let t = tmp();
    let tpl_dir = t.path().join("templates");
    fs::create_dir_all(&tpl_dir).unwrap();
    fs::write(
        tpl_dir.join("hostdev-pci.xml"),
        "<hostdev mode='subsystem' type='pci' managed='yes'>\n  <driver name='vfio'/>\n  <source><address domain='{domain}' bus='{bus}' slot='{slot}' function='{function}'/></source>\n  <rom bar='off'/>\n</hostdev>\n",
    )
    .unwrap();
    let conf = t.path().join("gpupass.toml");
    fs::write(
        &conf,
        format!("templates_dir = {:?}\n", tpl_dir.display().to_string()),
    )
    .unwrap();
    let r = gp(
        "seeds-k4200",
        &[
            "--config-file",
            conf.to_str().unwrap(),
            "xml",
            "0000:82:00.0",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.matches("<rom bar='off'/>").count(), 2);
    fs::write(tpl_dir.join("hostdev-pci.xml"), "<hostdev>{bus}</hostdevv>").unwrap();
    let r = gp(
        "seeds-k4200",
        &[
            "--config-file",
            conf.to_str().unwrap(),
            "xml",
            "0000:82:00.0",
        ],
    );
    assert_one_line_error(&r, 2, "invalid hostdev template");
    fs::write(&conf, "templates = 1\n").unwrap();
    let r = gp(
        "seeds-k4200",
        &[
            "--config-file",
            conf.to_str().unwrap(),
            "xml",
            "0000:82:00.0",
        ],
    );
    assert_one_line_error(&r, 2, "unknown field");
}

/// A libvirt test-driver node (`test:///path`) with one running domain `name` holding the PCI
/// function `addr` (`0000:BB:SS.F`); returns its URI.
fn test_node(t: &tempfile::TempDir, name: &str, addr: &str) -> String {
    let (bus, rest) = addr[5..].split_once(':').unwrap();
    let (slot, function) = rest.split_once('.').unwrap();
    let node = t.path().join("node.xml");
    fs::write(
        &node,
        format!(
            "<node>
  <domain type='test'>
    <name>{name}</name>
    <memory>131072</memory>
    <os><type>hvm</type></os>
    <devices>
      <hostdev mode='subsystem' type='pci' managed='yes'>
        <source><address domain='0x0000' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/></source>
      </hostdev>
    </devices>
  </domain>
</node>
"
        ),
    )
    .unwrap();
    format!("test://{}", node.display())
}

/// libvirt's in-process test driver, loaded from a file, holds domains with hostdevs: `list`
/// names them as users without any daemon.
#[test]
fn used_by_comes_from_libvirt_domain_xml() {
    let t = tmp();
    let uri = test_node(&t, "vm-holding-9a", "0000:9a:00.0");
    let r = gp("hgx-8gpu", &["-c", &uri, "list", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let g9a = listed_gpu(&v, "0000:9a:00.0");
    assert_eq!(g9a["used_by"], "vm-holding-9a");
    assert_eq!(g9a["references"][0]["running"], true);
    assert_eq!(v["gpus"][1]["used_by"], serde_json::Value::Null);
    assert_eq!(v["libvirt"]["connected"], true);
    // And the planner refuses it to others, naming the holder (before any libvirt change).
    let r = gp(
        "hgx-8gpu",
        &[
            "-c",
            &uri,
            "attach",
            "vm-holding-9a",
            "--gpu",
            "0000:9a:00.0",
            "--live",
        ],
    );
    assert_one_line_error(&r, 5, "already attached to domain 'vm-holding-9a'");
}

/// A domain that holds 1 of the consumer card's 4 functions (a crash mid-attach): `list --json`
/// and `show` say `partial` and name the 3 missing functions, the table flags it, and doctor
/// fails on it with the fix.
#[test]
fn a_partly_attached_gpu_is_flagged_with_its_missing_functions() {
    let t = tmp();
    let uri = test_node(&t, "vm-half", "0000:01:00.1");
    let r = gp("consumer-4fn", &["-c", &uri, "list", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let g = listed_gpu(&v, "0000:01:00.0");
    assert_eq!(g["state"], "partial", "{g}");
    assert_eq!(g["used_by"], "vm-half");
    let p = &g["partial"][0];
    assert_eq!(p["domain"], "vm-half");
    assert_eq!(p["held"], serde_json::json!(["0000:01:00.1"]));
    assert_eq!(
        p["missing"],
        serde_json::json!(["0000:01:00.0", "0000:01:00.2", "0000:01:00.3"])
    );
    let r = gp("consumer-4fn", &["-c", &uri, "list"]);
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("0000:01:00.0") && l.contains("partial")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(
            "0000:01:00.0: partial: domain 'vm-half' holds only part of GPU 0000:01:00.0"
        ),
        "{}",
        r.stdout
    );
    let r = gp("consumer-4fn", &["-c", &uri, "show", "0000:01:00.0"]);
    assert!(
        r.stdout
            .contains("lacks 0000:01:00.0 0000:01:00.2 0000:01:00.3"),
        "{}",
        r.stdout
    );
    let r = gp("consumer-4fn", &["-c", &uri, "doctor", "--json"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let c = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "gpu 0000:01:00.0 assignment")
        .expect("an assignment check");
    assert_eq!(c["status"], "fail");
    assert!(
        c["fix"]
            .as_str()
            .unwrap()
            .contains("gpupass attach vm-half --gpu 0000:01:00.0"),
        "{c}"
    );
}

#[test]
fn the_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gpupass.toml");
    let r = gp(
        "hgx-8gpu",
        &[
            "--config-file",
            example.to_str().unwrap(),
            "config",
            "check",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("ok (2 aliases, 2 rules, 2 owner limits, template built in)"),
        "{}",
        r.stdout
    );
    let t = tmp();
    let bad = t.path().join("bad.toml");
    fs::write(&bad, "[limits]\nacct = { max_gpus = -1 }\n").unwrap();
    let r = gp(
        "hgx-8gpu",
        &["--config-file", bad.to_str().unwrap(), "config", "check"],
    );
    assert_one_line_error(&r, 2, "invalid config");
}

/// `[paths]` in the config file sets the directories a command uses; a flag wins over it.
#[test]
fn config_paths_set_directories_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    fs::create_dir_all(&state).unwrap();
    fs::write(
        state.join("usage.jsonl"),
        "{\"event\":\"start\",\"ts\":1,\"domain\":\"from-config\",\"key\":\"k\",\"gpus\":[\"0000:18:00.0\"]}\n",
    )
    .unwrap();
    let conf = dir.path().join("gpupass.toml");
    fs::write(
        &conf,
        format!("[paths]\nstate_dir = \"{}\"\n", state.display()),
    )
    .unwrap();
    let usage = |extra: &[&str]| {
        let mut c = common::gpupass(&common::host("hgx-8gpu"), dir.path());
        c.arg("--config-file").arg(&conf).args(extra).arg("usage");
        common::run(c)
    };
    let r = usage(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("from-config"), "{}", r.stdout);
    let elsewhere = dir.path().join("elsewhere");
    let r = usage(&["--state-dir", elsewhere.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains("from-config"), "{}", r.stdout);
    // A config that cannot be read stops every command before it does anything.
    fs::write(&conf, "[paths]\nstatedir = \"/x\"\n").unwrap();
    let mut c = common::gpupass(&common::host("hgx-8gpu"), dir.path());
    c.arg("--config-file")
        .arg(&conf)
        .args(["list", "--no-libvirt"]);
    let r = common::run(c);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stdout.is_empty());
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("unknown field `statedir`"),
        "{}",
        r.stderr
    );
}
