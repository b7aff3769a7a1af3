//! `gpupass transform` against fixture hosts: golden files (tests/golden/transform/<case>.in.xml
//! → <case>.out.xml; UPDATE_GOLDEN=1 rewrites them), idempotence, leases between transforms in
//! flight, many transforms at once, and failures that print nothing on stdout.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{host, Run};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/transform")
        .join(name)
}

/// Runs `gpupass transform` (the full binary) with `input` on stdin.
fn transform(host_name: &str, run_dir: &Path, args: &[&str], input: &str) -> Run {
    transform_with(
        env!("CARGO_BIN_EXE_gpupass"),
        host_name,
        run_dir,
        args,
        input,
    )
}

fn transform_with(bin: &str, host_name: &str, run_dir: &Path, args: &[&str], input: &str) -> Run {
    let mut c = Command::new(bin);
    c.env_remove("GPUPASS_CONFIG")
        .env_remove("GPUPASS_HOST_ROOT")
        .env_remove("GPUPASS_LOG_FILE")
        .arg("--host-root")
        .arg(host(host_name))
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--state-dir")
        .arg(run_dir.join("state"))
        .arg("transform")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = input.as_bytes().to_vec();
    let writer = std::thread::spawn(move || {
        // gpupass may refuse before reading everything (too large): a broken pipe is fine.
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    writer.join().expect("writer");
    out.into()
}

fn check_golden(case: &str, host_name: &str, args: &[&str]) -> String {
    let input = fs::read_to_string(golden(&format!("{case}.in.xml"))).unwrap();
    let t = tempfile::tempdir().unwrap();
    let r = transform(host_name, t.path(), args, &input);
    assert_eq!(r.code, 0, "{case}: {}", r.stderr);
    let out_path = golden(&format!("{case}.out.xml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(&out_path, &r.stdout).unwrap();
    }
    let want = fs::read_to_string(&out_path)
        .unwrap_or_else(|_| panic!("missing {}; run with UPDATE_GOLDEN=1", out_path.display()));
    assert_eq!(
        r.stdout,
        want,
        "{case}: differs from {}",
        out_path.display()
    );
    if common::tool_available("virt-xml-validate") {
        let f = t.path().join("out.xml");
        fs::write(&f, &r.stdout).unwrap();
        let v = Command::new("virt-xml-validate")
            .arg(&f)
            .arg("domain")
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&v.stderr)
        );
    }
    // Transforming the output again changes nothing (same run dir: its own lease).
    let again = transform(host_name, t.path(), args, &r.stdout);
    assert_eq!(again.code, 0, "{case} again: {}", again.stderr);
    assert_eq!(again.stdout, r.stdout, "{case}: not idempotent");
    r.stdout
}

fn sources(xml: &str) -> Vec<String> {
    gpupass::xml::domain::parse(xml)
        .unwrap()
        .pci_hostdevs
        .iter()
        .map(|a| a.to_string())
        .collect()
}

#[test]
fn count_and_model_on_the_pinned_numa_node() {
    let out = check_golden("hgx-count-model", "hgx-8gpu", &[]);
    assert_eq!(sources(&out), ["0000:9a:00.0", "0000:ab:00.0"]);
    let out = check_golden("hgx-numatune", "hgx-8gpu", &[]);
    assert_eq!(
        sources(&out),
        ["0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0"]
    );
}

#[test]
fn a_whole_consumer_card_goes_in_with_all_four_functions() {
    let out = check_golden("consumer-whole-card", "consumer-4fn", &[]);
    assert_eq!(
        sources(&out),
        [
            "0000:01:00.0",
            "0000:01:00.1",
            "0000:01:00.2",
            "0000:01:00.3"
        ],
        "never the iGPU console"
    );
}

#[test]
fn a_cloudstack_vm_gets_its_gpu_from_a_config_rule() {
    let conf = golden("cloudstack.toml");
    let out = check_golden(
        "seeds-cloudstack-rule",
        "seeds-k4200",
        &["--config-file", conf.to_str().unwrap()],
    );
    assert_eq!(sources(&out), ["0000:03:00.0", "0000:03:00.1"]);
}

#[test]
fn explicit_addresses_bring_the_arc_audio_from_another_bus() {
    let out = check_golden("arc-explicit", "amd-arc-multidomain", &[]);
    assert_eq!(sources(&out), ["0001:03:00.0", "0001:04:00.0"]);
}

#[test]
fn no_request_comes_out_unchanged_and_a_met_one_only_fitted() {
    let out = check_golden("no-request", "hgx-8gpu", &[]);
    let input = fs::read_to_string(golden("no-request.in.xml")).unwrap();
    assert_eq!(out, input, "no-request");
    // A met request keeps its GPUs; the output is only fitted to them, and fitting is done.
    let out = check_golden("hgx-already-satisfied", "hgx-8gpu", &[]);
    let input = fs::read_to_string(golden("hgx-already-satisfied.in.xml")).unwrap();
    assert_eq!(sources(&out), sources(&input));
    assert!(
        out.contains("<pcihole64 unit='KiB'>536870912</pcihole64>"),
        "{out}"
    );
    let t = tempfile::tempdir().unwrap();
    let again = transform("hgx-8gpu", t.path(), &[], &out);
    assert_eq!(again.stdout, out, "a fitted domain comes out unchanged");
    // --no-fit: the met request comes out as it went in.
    let r = transform("hgx-8gpu", t.path(), &["--no-fit"], &input);
    assert_eq!(r.stdout, input, "{}", r.stderr);
}

#[test]
fn a_stale_address_from_another_host_is_replaced_and_a_valid_one_kept() {
    let out = check_golden("hgx-migrated-stale", "hgx-8gpu", &[]);
    assert_eq!(sources(&out), ["0000:ab:00.0", "0000:9a:00.0"]);
    assert!(!out.contains("bus='0x41'"));
}

#[test]
fn a_domain_without_devices_gets_one_and_flags_override_metadata() {
    let out = check_golden("hgx-no-devices", "hgx-8gpu", &[]);
    assert!(out.contains("\t<devices>\n"), "{out}");
    let t = tempfile::tempdir().unwrap();
    let input = fs::read_to_string(golden("hgx-flags.in.xml")).unwrap();
    let r = transform("hgx-8gpu", t.path(), &[], &input);
    assert_eq!(r.stdout, input, "no metadata, no flags: unchanged");
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpupass"));
    c.arg("--host-root")
        .arg(host("hgx-8gpu"))
        .arg("--run-dir")
        .arg(t.path())
        .args(["transform", "--count", "1", "--model", "10de:2330"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let r: Run = child.wait_with_output().unwrap().into();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sources(&r.stdout), ["0000:18:00.0"]);
}

#[test]
fn failures_print_nothing_on_stdout_and_one_line_on_stderr() {
    let t = tempfile::tempdir().unwrap();
    let unsat = fs::read_to_string(golden("hgx-unsatisfiable.in.xml")).unwrap();
    let plain = fs::read_to_string(golden("hgx-flags.in.xml")).unwrap();
    let huge = format!(
        "<domain><name>x</name><!--{}--></domain>",
        "x".repeat(5 << 20)
    );
    let with_meta = |count: &str| {
        plain.replace(
            "  <memory",
            &format!("  <metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1' count='{count}'/></metadata>\n  <memory"),
        )
    };
    let blocked_gpu = plain.replace(
        "  <memory",
        "  <metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1'><g:gpu address='0000:04:00.0'/></g:gpus></metadata>\n  <memory",
    );
    for (host_name, input, code, needle) in [
        (
            "hgx-8gpu",
            unsat.as_str(),
            6,
            "no free GPU: 9 wanted, 8 free",
        ),
        (
            "hgx-8gpu",
            "<domain><name>x</name>",
            2,
            "malformed domain XML",
        ),
        (
            "hgx-8gpu",
            "<network><name>x</name></network>",
            2,
            "not <domain>",
        ),
        ("hgx-8gpu", "", 2, "no root element"),
        ("hgx-8gpu", huge.as_str(), 2, "limit"),
        ("hgx-8gpu", with_meta("zero").as_str(), 2, "count 'zero'"),
        ("iommu-off", with_meta("1").as_str(), 7, "IOMMU is off"),
        ("no-acs-shared", blocked_gpu.as_str(), 7, "ixgbe"),
    ] {
        let r = transform(host_name, t.path(), &[], input);
        assert_eq!(r.code, code, "{needle}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{needle}: stdout {:?}", r.stdout);
        assert_eq!(r.stderr.lines().count(), 1, "{needle}: {:?}", r.stderr);
        assert!(r.stderr.contains(needle), "{needle} not in {}", r.stderr);
    }
    let r = transform("hgx-8gpu", t.path(), &[], "\u{0}\u{ff}");
    assert_eq!(r.code, 2);
}

#[test]
fn leases_keep_transforms_in_flight_apart_and_the_lean_binary_agrees() {
    let t = tempfile::tempdir().unwrap();
    let input = fs::read_to_string(golden("hgx-count-model.in.xml")).unwrap();
    let first = transform("hgx-8gpu", t.path(), &[], &input);
    let second_input = input
        .replace("vm-count-model", "vm-second")
        .replace("000000000001", "0000000000ff");
    let second = transform_with(
        env!("CARGO_BIN_EXE_gpupass-hook"),
        "hgx-8gpu",
        t.path(),
        &[],
        &second_input,
    );
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(sources(&first.stdout), ["0000:9a:00.0", "0000:ab:00.0"]);
    assert_eq!(
        sources(&second.stdout),
        ["0000:ba:00.0", "0000:db:00.0"],
        "leased GPUs skipped"
    );
    // The first domain's own lease does not stop it from getting the same GPUs again.
    let again = transform("hgx-8gpu", t.path(), &[], &input);
    assert_eq!(again.stdout, first.stdout);
}

#[test]
fn many_transforms_at_once_never_pick_one_gpu_twice() {
    let t = tempfile::tempdir().unwrap();
    let base = fs::read_to_string(golden("hgx-flags.in.xml")).unwrap();
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let input = base
                .replace("vm-flags", &format!("vm-par-{i}"))
                .replace("00000000000a", &format!("0000000001{i:02}"))
                .replace(
                    "  <memory",
                    "  <metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1' count='1'/></metadata>\n  <memory",
                );
            let dir = t.path().to_path_buf();
            std::thread::spawn(move || transform_with(env!("CARGO_BIN_EXE_gpupass-hook"), "hgx-8gpu", &dir, &[], &input))
        })
        .collect();
    let results: Vec<Run> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok: Vec<&Run> = results.iter().filter(|r| r.code == 0).collect();
    assert_eq!(
        ok.len(),
        8,
        "{:?}",
        results.iter().map(|r| &r.stderr).collect::<Vec<_>>()
    );
    assert!(results.iter().filter(|r| r.code != 0).all(|r| r.code == 6));
    let mut picked: Vec<String> = ok.iter().flat_map(|r| sources(&r.stdout)).collect();
    picked.sort();
    let n = picked.len();
    picked.dedup();
    assert_eq!(
        (n, picked.len()),
        (8, 8),
        "a GPU was picked twice: {picked:?}"
    );
}

/// A domain without `<uuid>` (as CloudStack hands it over) asking for `count` GPUs.
fn uuidless(name_xml: &str, count: u32) -> String {
    format!(
        "<domain type='kvm'>\n  <name>{name_xml}</name>\n  <metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1' count='{count}'/></metadata>\n  <memory>131072</memory>\n  <os><type>hvm</type></os>\n  <devices>\n  </devices>\n</domain>\n"
    )
}

#[test]
fn long_names_that_share_their_first_100_bytes_get_different_gpus() {
    let t = tempfile::tempdir().unwrap();
    let name = |last: char| format!("audit-{}{last}", "a".repeat(100));
    let bin = env!("CARGO_BIN_EXE_gpupass-hook");
    let first = transform_with(bin, "hgx-8gpu", t.path(), &[], &uuidless(&name('1'), 1));
    let second = transform_with(bin, "hgx-8gpu", t.path(), &[], &uuidless(&name('2'), 1));
    assert_eq!(
        (first.code, second.code),
        (0, 0),
        "{}{}",
        first.stderr,
        second.stderr
    );
    let (a, b) = (sources(&first.stdout), sources(&second.stdout));
    assert_eq!((a.len(), b.len()), (1, 1));
    assert_ne!(a, b, "one GPU leased to two domains");
    // Each domain's own lease still lets it keep its GPU.
    let again = transform_with(bin, "hgx-8gpu", t.path(), &[], &uuidless(&name('1'), 1));
    assert_eq!(sources(&again.stdout), a);
}

#[test]
fn the_domain_name_is_read_as_libvirt_reads_it() {
    let t = tempfile::tempdir().unwrap();
    let r = transform("hgx-8gpu", t.path(), &[], &uuidless("audit-<!-- c -->x", 1));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let leases: Vec<String> = fs::read_dir(t.path().join("leases"))
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(leases.len(), 1);
    assert!(
        leases[0].contains("\"domain\":\"audit-x\""),
        "the lease names the domain libvirt will know: {}",
        leases[0]
    );
}

#[test]
fn nesting_deeper_than_libvirt_accepts_is_refused_with_one_line() {
    let t = tempfile::tempdir().unwrap();
    // `levels` elements deep in all: <domain>, <metadata>, then nested <a>.
    let nested = |levels: usize| {
        uuidless("vm-deep", 1).replace(
            "<memory>",
            &format!(
                "<description>{}{}</description><memory>",
                "<a>".repeat(levels - 2),
                "</a>".repeat(levels - 2)
            ),
        )
    };
    let ok = transform("hgx-8gpu", t.path(), &[], &nested(256));
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert_eq!(sources(&ok.stdout).len(), 1);
    for levels in [257, 500_000] {
        let input = nested(levels);
        assert!(input.len() < gpupass::xml::rewrite::MAX_XML_BYTES);
        let r = transform("hgx-8gpu", t.path(), &[], &input);
        assert_eq!(r.code, 2, "{levels}: {}", r.stderr);
        assert!(r.stdout.is_empty());
        assert_eq!(r.stderr.lines().count(), 1, "{:?}", r.stderr);
        assert!(
            r.stderr.contains("nested deeper than 256 levels"),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn out_of_range_durations_are_refused_before_anything_happens() {
    let t = tempfile::tempdir().unwrap();
    for bad in ["18446744073709551615", "0", "86401"] {
        let r = transform_args(
            &["transform", "--lease-seconds", bad],
            &uuidless("vm-bad", 1),
            t.path(),
        );
        assert_eq!(r.code, 2, "{bad}: {}", r.stderr);
        assert!(r.stdout.is_empty());
        assert_eq!(r.stderr.lines().count(), 1, "{:?}", r.stderr);
        assert!(r.stderr.contains("1..=86400"), "{}", r.stderr);
    }
    // The longest lease allowed holds: the next domain gets another GPU.
    let a = transform_args(
        &["transform", "--lease-seconds", "86400"],
        &uuidless("vm-day", 1),
        t.path(),
    );
    let b = transform("hgx-8gpu", t.path(), &[], &uuidless("vm-next", 1));
    assert_eq!((a.code, b.code), (0, 0), "{}{}", a.stderr, b.stderr);
    assert_ne!(sources(&a.stdout), sources(&b.stdout));
    let r: Run = Command::new(env!("CARGO_BIN_EXE_gpupass"))
        .env_remove("GPUPASS_CONFIG")
        .arg("--host-root")
        .arg(host("hgx-8gpu"))
        .args(["detach", "vm", "--all", "--timeout", "18446744073709551615"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{:?}", r.stderr);
    assert!(r.stderr.contains("1..=3600"), "{}", r.stderr);
}

/// `gpupass-hook ARGS` (ARGS includes the subcommand) on the hgx-8gpu host.
fn transform_args(args: &[&str], input: &str, run_dir: &Path) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpupass-hook"))
        .env_remove("GPUPASS_CONFIG")
        .env_remove("GPUPASS_HOST_ROOT")
        .env_remove("GPUPASS_LOG_FILE")
        .arg("--host-root")
        .arg(host("hgx-8gpu"))
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--state-dir")
        .arg(run_dir.join("state"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(input.as_bytes());
    drop(stdin);
    child.wait_with_output().unwrap().into()
}

/// A config rule `hgx_full = true` gives the domain every H100 and every NVSwitch of the HGX
/// fixture; transforming the result again changes nothing. On a host without NVSwitches the
/// rule is refused with one line.
#[test]
fn an_hgx_full_rule_gives_every_gpu_and_nvswitch() {
    let t = tempfile::tempdir().unwrap();
    let conf = t.path().join("gpupass.toml");
    fs::write(&conf, "[[rules]]\ndomain = \"hgx-*\"\nhgx_full = true\n").unwrap();
    let input = "<domain type='kvm'>\n  <name>hgx-vm</name>\n  <memory unit='KiB'>1048576</memory>\n  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n  </os>\n  <devices>\n  </devices>\n</domain>\n";
    let args = ["--config-file", conf.to_str().unwrap()];
    let r = transform("hgx-8gpu", t.path(), &args, input);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let got = sources(&r.stdout);
    assert_eq!(got.len(), 12, "{got:?}");
    for s in [
        "0000:05:00.0",
        "0000:08:00.0",
        "0000:18:00.0",
        "0000:db:00.0",
    ] {
        assert!(got.iter().any(|g| g == s), "{s} missing from {got:?}");
    }
    let again = transform("hgx-8gpu", t.path(), &args, &r.stdout);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.stdout, r.stdout, "a second transform changes nothing");

    let r = transform("seeds-k4200", t.path(), &args, input);
    assert_ne!(r.code, 0);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(r.stderr.contains("no HGX fabric"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
}
