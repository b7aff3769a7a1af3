//! The CloudStack shim `hooks/libvirt-vm-xml-transformer.groovy` under a real Groovy, loaded
//! and called the way the CloudStack KVM agent does (tests/groovy/agent.groovy), running the
//! real `gpupass-hook transform` against a fixture host.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{host, Run};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A JAVA_HOME for Debian's groovy, which looks for /usr/lib/jvm/default-java.
fn java_home() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("JAVA_HOME") {
        return Some(PathBuf::from(h));
    }
    let java = Command::new("sh")
        .args(["-c", "readlink -f \"$(command -v java)\""])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&java.stdout).trim());
    Some(p.parent()?.parent()?.to_path_buf())
}

fn agent(host_name: &str, run_dir: &Path, config: Option<&Path>, xml: &str) -> Run {
    let t = tempfile::tempdir().unwrap();
    let xml_file = t.path().join("vm.xml");
    fs::write(&xml_file, xml).unwrap();
    let mut c = Command::new("groovy");
    c.arg(repo().join("tests/groovy/agent.groovy"))
        .arg(repo().join("hooks"))
        .arg("libvirt-vm-xml-transformer.groovy")
        .arg("transform")
        .arg(&xml_file)
        .env("GPUPASS_BIN", env!("CARGO_BIN_EXE_gpupass-hook"))
        .env("GPUPASS_HOST_ROOT", host(host_name))
        .env("GPUPASS_RUN_DIR", run_dir)
        .env("GPUPASS_STATE_DIR", run_dir.join("state"))
        .env_remove("GPUPASS_CONFIG");
    if let Some(cfg) = config {
        c.env("GPUPASS_CONFIG", cfg);
    }
    if let Some(j) = java_home() {
        c.env("JAVA_HOME", j);
    }
    c.output().expect("run groovy").into()
}

fn cloudstack_vm(name: &str) -> String {
    fs::read_to_string(repo().join("tests/golden/transform/seeds-cloudstack-rule.in.xml"))
        .unwrap()
        .replace("i-2-34-VM", name)
}

#[test]
fn the_agent_shim_adds_the_gpus_a_config_rule_gives_a_cloudstack_vm() {
    if !common::tool_available("groovy") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let conf = repo().join("tests/golden/transform/cloudstack.toml");
    let r = agent(
        "seeds-k4200",
        t.path(),
        Some(&conf),
        &cloudstack_vm("i-2-34-VM"),
    );
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    let want =
        fs::read_to_string(repo().join("tests/golden/transform/seeds-cloudstack-rule.out.xml"))
            .unwrap();
    assert_eq!(
        r.stdout, want,
        "the agent gets exactly what gpupass transform prints"
    );
    assert!(
        r.stderr.contains("INFO gpupass: GPUs added"),
        "{}",
        r.stderr
    );

    // A VM no rule matches comes back unchanged (not null, not reformatted).
    let other = cloudstack_vm("r-7-VM");
    let r = agent("seeds-k4200", t.path(), Some(&conf), &other);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, other);
    assert!(
        r.stderr.contains("DEBUG gpupass: no GPU requested"),
        "{}",
        r.stderr
    );
}

#[test]
fn the_agent_shim_fails_the_vm_with_gpupass_s_reason_when_no_gpu_is_free() {
    if !common::tool_available("groovy") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let conf = t.path().join("gpupass.toml");
    fs::write(&conf, "[[rules]]\ndomain = \"i-*-VM\"\ncount = 3\n").unwrap();
    let r = agent(
        "seeds-k4200",
        t.path(),
        Some(&conf),
        &cloudstack_vm("i-2-40-VM"),
    );
    assert_eq!(r.code, 3, "stdout {} stderr {}", r.stdout, r.stderr);
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr.contains("ERROR gpupass transform failed (exit 6): gpupass: error: no free GPU: 3 wanted, 2 free"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("EXCEPTION gpupass: error: no free GPU"),
        "{}",
        r.stderr
    );
}
