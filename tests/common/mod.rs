//! Helpers shared by the integration tests: run the gpupass binary against a fixture host root,
//! and manage throwaway domains on the real libvirt daemon.
#![allow(dead_code)]

pub mod kernel;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};

/// A fixture host root under tests/fixtures/hosts.
pub fn host(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hosts")
        .join(name);
    assert!(p.is_dir(), "no fixture host {}", p.display());
    p
}

/// Every fixture host.
pub const HOSTS: &[&str] = &[
    "hgx-8gpu",
    "consumer-4fn",
    "no-acs-shared",
    "seeds-k4200",
    "iommu-off",
    "amd-arc-multidomain",
];

/// The small hosts of the health checks: a sick GPU at 0000:01:00.0 and a healthy one at
/// 0000:02:00.0 (not in [`HOSTS`]: they have no golden files of their own).
pub const HEALTH_HOSTS: &[&str] = &[
    "health-fell-off",
    "health-no-reset",
    "health-aer",
    "health-link",
];

/// The vGPU fixture hosts (SR-IOV VFs, mdev types and instances, NVIDIA vendor-VFIO files,
/// GVT-g), each with the libvirt domain files that hold one VF or mdev (not in [`HOSTS`]).
pub const VGPU_HOSTS: &[&str] = &["vgpu-nvidia", "vgpu-intel"];

/// The result of one gpupass run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// A gpupass command with a clean environment: no inherited GPUPASS_* or LIBVIRT_DEFAULT_URI.
pub fn gpupass(host_root: &Path, run_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpupass"));
    c.env_remove("GPUPASS_HOST_ROOT")
        .env_remove("GPUPASS_CONFIG")
        .env_remove("GPUPASS_STATE_DIR")
        .env_remove("GPUPASS_RUN_DIR")
        .env_remove("GPUPASS_LOG")
        .env_remove("LIBVIRT_DEFAULT_URI")
        .arg("--host-root")
        .arg(host_root)
        .arg("--run-dir")
        .arg(run_dir)
        .stdin(Stdio::null());
    c
}

/// Runs a command to completion.
pub fn run(mut c: Command) -> Run {
    c.output().expect("spawn gpupass").into()
}

/// Runs a command, killing it (and failing the test) if it has not ended within `limit`: a
/// test of something that must not hang fails instead of hanging.
pub fn run_within(mut c: Command, limit: std::time::Duration) -> Run {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "gpupass still running after {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap().into()
}

/// A managed PCI `<hostdev>` for `addr` (`0000:BB:SS.F`).
pub fn hostdev(addr: &str) -> String {
    let a: gpupass::model::PciAddress = addr.parse().unwrap();
    format!(
        "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x{:04x}' bus='0x{:02x}' slot='0x{:02x}' function='0x{:x}'/></source></hostdev>",
        a.domain, a.bus, a.slot, a.function
    )
}

/// The URI of the real daemon the integration tests use.
pub fn test_uri() -> String {
    std::env::var("GPUPASS_TEST_URI").unwrap_or_else(|_| "qemu:///system".into())
}

/// True when the run must not skip tests that need libvirt tools or the daemon
/// (scripts/test and CI set it).
pub fn required() -> bool {
    std::env::var("GPUPASS_REQUIRE_LIBVIRT").is_ok_and(|v| v == "1")
}

/// `virsh -c URI ARGS…`.
pub fn virsh(args: &[&str]) -> Run {
    Command::new("virsh")
        .arg("-c")
        .arg(test_uri())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn virsh")
        .into()
}

/// Whether the daemon answers; panics when it must (GPUPASS_REQUIRE_LIBVIRT=1).
pub fn daemon_available() -> bool {
    let ok = Command::new("virsh")
        .args(["-c", &test_uri(), "version"])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !required(),
            "GPUPASS_REQUIRE_LIBVIRT=1 but no libvirt daemon answers at {} (run scripts/libvirtd up)",
            test_uri()
        );
        eprintln!(
            "SKIPPED: no libvirt daemon at {}; run scripts/test for the full suite",
            test_uri()
        );
    }
    ok
}

/// Whether a program is on PATH; panics when required.
pub fn tool_available(name: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !required(),
            "GPUPASS_REQUIRE_LIBVIRT=1 but {name} is not installed"
        );
        eprintln!("SKIPPED: {name} not installed");
    }
    ok
}

static DAEMON: Mutex<()> = Mutex::new(());

/// Serializes tests that use the shared daemon: holdings are host-wide, so two tests attaching
/// fixture GPUs at once would see each other's domains.
pub fn daemon_lock() -> MutexGuard<'static, ()> {
    DAEMON.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prefix of every domain the tests define; leftovers from a killed run are removed on start.
pub const TEST_PREFIX: &str = "gpupass-t-";

/// Removes leftover test domains (from an earlier, killed run).
pub fn clean_leftovers() {
    let list = virsh(&["list", "--all", "--name"]);
    for name in list.stdout.lines().map(str::trim) {
        if name.starts_with(TEST_PREFIX) {
            virsh(&["destroy", name]);
            virsh(&["undefine", name]);
        }
    }
}

/// A minimal domain that starts under TCG (facts in ../shared/LIBVIRT-FACTS.md).
/// `extra` goes inside `<domain>`; it may bring its own `<vcpu>`.
pub fn tiny_domain_xml(name: &str, extra: &str) -> String {
    let vcpu = if extra.contains("<vcpu") {
        ""
    } else {
        "<vcpu>1</vcpu>"
    };
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  {vcpu}
  {extra}
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <memballoon model='none'/>
  </devices>
</domain>
"
    )
}

/// A defined domain, destroyed and undefined on drop.
pub struct TestDomain {
    pub name: String,
}

impl TestDomain {
    pub fn define(suffix: &str, extra: &str) -> Self {
        let name = format!("{TEST_PREFIX}{suffix}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.xml");
        std::fs::write(&path, tiny_domain_xml(&name, extra)).expect("write xml");
        let r = virsh(&["define", path.to_str().expect("utf-8 path")]);
        assert_eq!(r.code, 0, "define {name}: {}", r.stderr);
        TestDomain { name }
    }

    pub fn start(&self) {
        let r = virsh(&["start", &self.name]);
        assert_eq!(r.code, 0, "start {}: {}", self.name, r.stderr);
    }

    /// Source addresses of the PCI hostdevs in the live or inactive XML.
    pub fn hostdevs(&self, inactive: bool) -> Vec<String> {
        let mut args = vec!["dumpxml", self.name.as_str()];
        if inactive {
            args.push("--inactive");
        }
        let r = virsh(&args);
        assert_eq!(r.code, 0, "dumpxml: {}", r.stderr);
        let facts = gpupass::xml::domain::parse(&r.stdout).expect("libvirt XML parses");
        facts.pci_hostdevs.iter().map(|a| a.to_string()).collect()
    }
}

impl Drop for TestDomain {
    fn drop(&mut self) {
        virsh(&["destroy", &self.name]);
        virsh(&["undefine", &self.name]);
    }
}

/// A writable copy of a fixture host (symlinks kept), for commands that write under the root.
pub fn host_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", host(name).display()))
        .arg(dir.path())
        .status()
        .expect("cp");
    assert!(st.success());
    dir
}

/// A domain XML with a UUID derived from its name, `meta` (e.g. `<metadata>`) and a managed
/// hostdev for each address.
pub fn domain_xml(name: &str, meta: &str, addrs: &[&str]) -> String {
    let devs: String = addrs.iter().map(|a| hostdev(a)).collect();
    format!(
        "<domain type='kvm'>\n  <name>{name}</name>\n  <uuid>{}</uuid>\n  {meta}\n  <memory>131072</memory>\n  <os><type>hvm</type></os>\n  <devices>\n    {devs}\n  </devices>\n</domain>\n",
        uuid_for(name)
    )
}

/// A UUID derived from a name (FNV-1a), so a test's domains keep theirs from run to run.
pub fn uuid_for(name: &str) -> String {
    let mut h: u64 = 1469598103934665603;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(1099511628211);
    }
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        h >> 32,
        h & 0xffff_ffff_ffff
    )
}

/// libvirt's status file of a running domain holding `addrs`.
pub fn status_xml(name: &str, addrs: &[&str]) -> String {
    format!(
        "<domstatus state='running' reason='booted' pid='4242'>\n  <monitor path='/var/lib/libvirt/qemu/domain-1-{name}/monitor.sock' type='unix'/>\n{}</domstatus>\n",
        domain_xml(name, "", addrs)
    )
}

/// How long one `gpupass-hook` call of a [`HookRoot`] may take before the test calls it hung.
pub const HOOK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// A host root for `gpupass-hook`: a fixture's `sys` and `proc`, libvirt's `run/libvirt/qemu`
/// with `running` (name → hostdev addresses) as status files, and run and state dirs inside.
pub struct HookRoot {
    pub dir: tempfile::TempDir,
}

impl HookRoot {
    pub fn new(fixture: &str, running: &[(&str, &[&str])]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(host(fixture).join("sys"), dir.path().join("sys")).unwrap();
        std::os::unix::fs::symlink(host(fixture).join("proc"), dir.path().join("proc")).unwrap();
        let status = dir.path().join("run/libvirt/qemu");
        std::fs::create_dir_all(&status).unwrap();
        for (name, addrs) in running {
            std::fs::write(status.join(format!("{name}.xml")), status_xml(name, addrs)).unwrap();
        }
        HookRoot { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path().join("gp-run")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path().join("gp-state")
    }

    /// Runs gpupass-hook with every directory given and `stdin`; kills it and fails the test
    /// after [`HOOK_DEADLINE`]. Returns the run and how long it took.
    pub fn gpupass_timed(&self, args: &[&str], stdin: &str) -> (Run, std::time::Duration) {
        use std::io::Write;
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpupass-hook"));
        c.env_remove("GPUPASS_CONFIG")
            .env_remove("GPUPASS_LOG_FILE")
            .env_remove("GPUPASS_LOG")
            .arg("--host-root")
            .arg(self.path())
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = std::time::Instant::now();
        let mut child = c.spawn().unwrap();
        let mut w = child.stdin.take().unwrap();
        let _ = w.write_all(stdin.as_bytes());
        drop(w);
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > HOOK_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gpupass-hook {args:?} hung for {HOOK_DEADLINE:?}");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let took = start.elapsed();
        (child.wait_with_output().unwrap().into(), took)
    }

    /// [`HookRoot::gpupass_timed`] without the time.
    pub fn gpupass(&self, args: &[&str], stdin: &str) -> Run {
        self.gpupass_timed(args, stdin).0
    }

    /// `hook qemu DOMAIN OP SUBOP -` with the XML on stdin.
    pub fn hook(&self, domain: &str, op: &str, subop: &str, xml: &str) -> Run {
        self.gpupass(&["hook", "qemu", domain, op, subop, "-"], xml)
    }

    /// [`HookRoot::hook`], timed.
    pub fn hook_timed(
        &self,
        domain: &str,
        op: &str,
        subop: &str,
        xml: &str,
    ) -> (Run, std::time::Duration) {
        self.gpupass_timed(&["hook", "qemu", domain, op, subop, "-"], xml)
    }
}

/// The GPU at `addr` in a `list --json` document; fails the test when it is not listed.
pub fn listed_gpu<'a>(list: &'a serde_json::Value, addr: &str) -> &'a serde_json::Value {
    list["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["address"] == addr)
        .unwrap_or_else(|| panic!("{addr} not listed"))
}
