//! `gpupass serve` against the real libvirt daemon of the test set-up: inventory and usage follow
//! libvirt, libvirtd restarts, limits, concurrent attaches through the API, bad requests.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{daemon_available, daemon_lock, test_uri, virsh, TestDomain};
use serde_json::Value;

/// A running `gpupass serve` on a copy of the HGX fixture, with its own run/state dirs.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Agent {
    fn start(config: &str, extra: &[&str]) -> Agent {
        Agent::start_with(config, "1", extra)
    }

    fn start_with(config: &str, reconcile: &str, extra: &[&str]) -> Agent {
        Agent::start_on("hgx-8gpu", config, reconcile, extra)
    }

    /// On another fixture host.
    fn start_on(host: &str, config: &str, reconcile: &str, extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let conf = dir.path().join("gpupass.toml");
        fs::write(&conf, config).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gpupass"))
            .env_remove("GPUPASS_SOCKET")
            .env_remove("GPUPASS_LOG")
            .args(["-c", &test_uri()])
            .arg("--host-root")
            .arg(common::host(host))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--config-file")
            .arg(&conf)
            .args(["serve", "--reconcile-seconds", reconcile, "--socket"])
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("agent.log")).unwrap())
            .spawn()
            .expect("spawn gpupass serve");
        let a = Agent { child, dir, socket };
        a.wait_for("the agent to answer healthy", |a| {
            a.get("/v1/health").0 == 200
        });
        a
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn ledger(&self) -> PathBuf {
        self.dir.path().join("state/usage.jsonl")
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (code, text) = http(&self.socket, method, path, body, &[]);
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (code, v)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None)
    }

    fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.request("POST", path, Some(body))
    }

    fn wait_for(&self, what: &str, cond: impl Fn(&Agent) -> bool) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if cond(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}; agent log:\n{}", self.log());
    }

    fn domain(&self, name: &str) -> Option<Value> {
        let (_, v) = self.get("/v1/domains");
        v["domains"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SIGTERM: the agent shuts down cleanly and removes its socket.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request over a unix socket; returns (status, body).
fn http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: gpupass\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
    } else {
        req.push_str("\r\n");
    }
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return (0, text.into_owned());
    };
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "the test client reads only sized bodies: {head}"
    );
    (code, body.to_owned())
}

fn setup() -> Option<std::sync::MutexGuard<'static, ()>> {
    // The lock first: the restart test takes libvirtd away while it holds it.
    let guard = daemon_lock();
    if !daemon_available() {
        return None;
    }
    common::clean_leftovers();
    Some(guard)
}

fn ledger_lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Inventory follows define/start/destroy/undefine through events; a GPU attached by the CLI
/// shows up in the API; a usage session left open for a domain that no longer runs is closed
/// by the agent's reconcile, and the API's usage and the CLI's agree.
#[test]
fn inventory_and_usage_follow_libvirt() {
    let Some(_g) = setup() else { return };
    let agent = Agent::start("", &[]);
    // A session the hook opened for a domain that is gone (it stopped while nobody watched).
    let gone_start = r#"{"event":"start","ts":1000,"domain":"gpupass-t-gone","key":"gpupass-t-gone","gpus":["0000:18:00.0"],"owner":"acct"}"#;
    fs::create_dir_all(agent.ledger().parent().unwrap()).unwrap();
    fs::write(agent.ledger(), format!("{gone_start}\n")).unwrap();

    let d = TestDomain::define("serve-a", "");
    agent.wait_for("the defined domain", |a| {
        a.domain(&d.name).is_some_and(|v| v["state"] == "shut off")
    });
    d.start();
    agent.wait_for("the running domain", |a| {
        a.domain(&d.name).is_some_and(|v| v["state"] == "running")
    });
    let r = virsh(&["destroy", &d.name]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    agent.wait_for("the stopped domain", |a| {
        a.domain(&d.name).is_some_and(|v| v["state"] == "shut off")
    });

    // The CLI attaches (no agent involved); the API shows who holds the GPU.
    let mut cli = common::gpupass(&common::host("hgx-8gpu"), &agent.dir.path().join("run"));
    cli.args([
        "-c",
        &test_uri(),
        "attach",
        &d.name,
        "--gpu",
        "0000:2a:00.0",
        "--config",
    ]);
    let r = common::run(cli);
    assert_eq!(r.code, 0, "{}", r.stderr);
    agent.wait_for("the CLI's attach in /v1/gpus", |a| {
        let (_, v) = a.get("/v1/gpus");
        v["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["address"] == "0000:2a:00.0" && g["used_by"] == d.name.as_str())
    });
    let (code, one) = agent.get("/v1/gpus/0000:2a:00.0");
    assert_eq!(code, 200);
    assert_eq!(one["used_by"], d.name.as_str());
    let dom = agent.domain(&d.name).unwrap();
    assert_eq!(dom["gpus"], serde_json::json!(["0000:2a:00.0"]));

    // /v1/gpus is the same document as `list --json` (libvirt's view aside).
    let mut cli = common::gpupass(&common::host("hgx-8gpu"), &agent.dir.path().join("run"));
    cli.args(["-c", &test_uri(), "list", "--json"]);
    let r = common::run(cli);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut listed: Value = serde_json::from_str(&r.stdout).unwrap();
    // Except `vgpu`: `list` reads the GPUs' fractions, the agent does not yet (no key).
    for g in listed["gpus"].as_array_mut().unwrap() {
        assert_eq!(g.as_object_mut().unwrap().remove("vgpu"), Some(Value::Null));
    }
    let (_, api) = agent.get("/v1/gpus");
    assert!(api["gpus"][0].get("vgpu").is_none());
    assert_eq!(listed["gpus"], api["gpus"]);
    assert_eq!(listed["iommu"], api["iommu"]);

    // Undefine: gone from the API.
    drop(d);
    agent.wait_for("the undefined domain to leave", |a| {
        a.domain("gpupass-t-serve-a").is_none()
    });

    // The stale session was closed once, by the agent, and both readers agree.
    agent.wait_for("the agent to close the stale session", |a| {
        ledger_lines(&a.ledger()).len() >= 2
    });
    let lines = ledger_lines(&agent.ledger());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["event"], "stop");
    assert_eq!(lines[1]["key"], "gpupass-t-gone");
    let (code, usage) = agent.get("/v1/usage");
    assert_eq!(code, 200);
    assert_eq!(usage["domains"][0]["running"], false);
    let mut cli = common::gpupass(&common::host("hgx-8gpu"), &agent.dir.path().join("run"));
    cli.arg("--state-dir")
        .arg(agent.dir.path().join("state"))
        .args(["usage", "--json"]);
    let r = common::run(cli);
    let cli_usage: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(cli_usage["domains"], usage["domains"]);
    assert_eq!(cli_usage["owners"]["acct"], usage["owners"]["acct"]);
    // A decision the hook (here: transform) made in its own process shows in the agent's metrics.
    let mut cli = common::gpupass(&common::host("hgx-8gpu"), &agent.dir.path().join("run"));
    cli.arg("transform")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cli.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(common::tiny_domain_xml("gpupass-t-tr", "").as_bytes())
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    let (_, m) = agent.get("/metrics");
    let m = m.as_str().unwrap().to_owned();
    assert!(
        m.contains("gpupass_hook_decisions_total{op=\"transform\",result=\"ok\"} 1"),
        "{m}"
    );
    assert!(m.contains("gpupass_usage_records_written_total 1"), "{m}");
    assert!(m.contains("gpupass_libvirt_connected 1"), "{m}");
}

/// With no periodic reconcile (an hour away), libvirt's events alone keep the state current:
/// define, metadata (an owner set with `virsh metadata`), start, destroy, undefine.
#[test]
fn events_alone_keep_the_state_current() {
    let Some(_g) = setup() else { return };
    let agent = Agent::start_with("", "3600", &[]);
    let d = TestDomain::define("serve-ev", "");
    agent.wait_for("the define event", |a| a.domain(&d.name).is_some());
    let r = virsh(&[
        "metadata",
        &d.name,
        "--uri",
        "https://gpupass.dev/xmlns/1",
        "--key",
        "gpupass",
        "--set",
        "<gpus owner='acct-ev' count='1'/>",
        "--config",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    agent.wait_for("the metadata event", |a| {
        a.domain(&d.name).is_some_and(|v| v["owner"] == "acct-ev")
    });
    // The hook would block a start asking for a GPU the XML lacks; take the request out again.
    let r = virsh(&[
        "metadata",
        &d.name,
        "--uri",
        "https://gpupass.dev/xmlns/1",
        "--remove",
        "--config",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    d.start();
    agent.wait_for("the start event", |a| {
        a.domain(&d.name).is_some_and(|v| v["state"] == "running")
    });
    assert_eq!(virsh(&["destroy", &d.name]).code, 0);
    agent.wait_for("the stop event", |a| {
        a.domain(&d.name).is_some_and(|v| v["state"] == "shut off")
    });
    drop(d);
    agent.wait_for("the undefine event", |a| {
        a.domain("gpupass-t-serve-ev").is_none()
    });
    let (_, m) = agent.get("/metrics");
    let m = m.as_str().unwrap().to_owned();
    assert!(m.contains("gpupass_reconciles_total 1\n"), "{m}");
}

/// libvirtd killed and restarted under a running agent: health says stale (503) and the last
/// known state is still served; the agent reconnects, reconciles, and no usage record is lost.
#[test]
fn survives_a_libvirtd_restart() {
    let Some(_g) = setup() else { return };
    let pidfile = Path::new("/run/gpupass-test-libvirtd/libvirtd.pid");
    if !pidfile.exists() {
        assert!(
            !common::required(),
            "the test daemon was not started by scripts/libvirtd; cannot restart it"
        );
        eprintln!("SKIPPED: libvirtd not started by scripts/libvirtd");
        return;
    }
    let agent = Agent::start("", &[]);
    let d = TestDomain::define("serve-restart", "");
    let mut cli = common::gpupass(&common::host("hgx-8gpu"), &agent.dir.path().join("run"));
    cli.args([
        "-c",
        &test_uri(),
        "attach",
        &d.name,
        "--gpu",
        "0000:18:00.0",
        "--config",
    ]);
    assert_eq!(common::run(cli).code, 0);
    agent.wait_for("the attach", |a| {
        a.domain(&d.name)
            .is_some_and(|v| v["gpus"][0] == "0000:18:00.0")
    });
    let open = r#"{"event":"start","ts":2000,"domain":"elsewhere","key":"elsewhere","gpus":["0000:2a:00.0"]}"#;
    let before = fs::read_to_string(agent.ledger()).unwrap_or_default();

    /// Brings libvirtd back even when an assertion fails while it is down.
    struct Restart;
    impl Drop for Restart {
        fn drop(&mut self) {
            let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/libvirtd"))
                .arg("up")
                .output();
        }
    }
    let _restart = Restart;
    fs::create_dir_all(agent.ledger().parent().unwrap()).unwrap();
    let pid = fs::read_to_string(pidfile).unwrap();
    assert!(Command::new("kill")
        .arg(pid.trim())
        .status()
        .unwrap()
        .success());
    agent.wait_for("health to turn stale", |a| {
        let (code, h) = a.get("/v1/health");
        code == 503 && h["status"] == "stale" && h["libvirt"]["stale_since"].is_u64()
    });
    // The last known state is served, marked stale.
    let (code, gpus) = agent.get("/v1/gpus");
    assert_eq!(code, 200);
    assert_eq!(gpus["libvirt"]["connected"], false);
    assert!(gpus["libvirt"]["stale_since"].is_u64());
    assert!(gpus["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["address"] == "0000:18:00.0" && g["used_by"] == d.name.as_str()));
    // The hook writes while libvirtd is away (a domain on another connection, say).
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(agent.ledger())
        .unwrap();
    writeln!(f, "{open}").unwrap();
    drop(f);

    let up = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/libvirtd"))
        .arg("up")
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    agent.wait_for("health to recover", |a| a.get("/v1/health").0 == 200);
    let (_, m) = agent.get("/metrics");
    let m = m.as_str().unwrap().to_owned();
    assert!(m.contains("gpupass_libvirt_reconnects_total 1\n"), "{m}");
    assert!(agent.domain(&d.name).is_some());
    // Nothing lost: every line from before is still there, then the one written during the
    // outage, then the agent's stop for it (the domain does not run here).
    let after = fs::read_to_string(agent.ledger()).unwrap();
    assert!(after.starts_with(&before), "{before}\n---\n{after}");
    let tail: Vec<&str> = after[before.len()..].lines().collect();
    assert_eq!(tail[0], open);
    assert!(tail[1].contains("\"event\":\"stop\"") && tail[1].contains("elsewhere"));
}

/// 64 concurrent API attaches of one GPU each, to 16 domains, on a host with 8 passable GPUs:
/// exactly 8 succeed, the rest get a JSON "no_free_gpu", and each GPU is in one domain only.
#[test]
fn concurrent_api_attaches_grant_each_gpu_once() {
    let Some(_g) = setup() else { return };
    let agent = Agent::start("", &[]);
    let domains: Vec<TestDomain> = (0..16)
        .map(|i| TestDomain::define(&format!("serve-c{i:02}"), ""))
        .collect();
    let results: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let name = domains[i % 16].name.clone();
                let agent = &agent;
                s.spawn(move || {
                    agent.post(
                        &format!("/v1/domains/{name}/attach"),
                        r#"{"count":1,"config":true}"#,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|(c, _)| *c == 200).count();
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for (c, v) in &results {
        if *c != 200 {
            assert_eq!(*c, 409, "{v}");
            *codes.entry(v["error"]["code"].to_string()).or_default() += 1;
        }
    }
    assert_eq!(ok, 8, "{codes:?}");
    assert_eq!(codes.get("\"no_free_gpu\""), Some(&56), "{codes:?}");
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for d in &domains {
        for a in d.hostdevs(true) {
            if let Some(other) = seen.insert(a.clone(), d.name.clone()) {
                panic!("{a} is in {other} and {}", d.name);
            }
        }
    }
    assert_eq!(seen.len(), 8);
    let (_, m) = agent.get("/metrics");
    let m = m.as_str().unwrap().to_owned();
    assert!(
        m.contains("gpupass_api_decisions_total{action=\"attach\",result=\"ok\"} 8"),
        "{m}"
    );
    agent.wait_for("the API to show 8 assigned GPUs", |a| {
        let (_, m) = a.get("/metrics");
        m.as_str()
            .is_some_and(|m| m.contains("gpupass_gpus{state=\"assigned\"} 8"))
    });
}

/// `"vgpu": "vf"` through the API on the vGPU Intel fixture (VFs 0000:4d:00.1 and 0000:4d:00.2
/// on vfio-pci): the planner gives both VFs as plain PCI hostdevs, a third is no_free_gpu
/// (exit 6) with nothing attached, /metrics counts them per profile, and detach takes them.
#[test]
fn api_attaches_and_detaches_virtual_functions() {
    let Some(_g) = setup() else { return };
    let agent = Agent::start_on("vgpu-intel", "", "1", &[]);
    let d = TestDomain::define("serve-vf", "");
    let other = TestDomain::define("serve-vf2", "");
    let (code, rep) = agent.post(
        &format!("/v1/domains/{}/attach", d.name),
        r#"{"vgpu":"vf","count":2,"config":true}"#,
    );
    assert_eq!(code, 200, "{rep}");
    assert_eq!(rep["gpus"][0]["vf"], true, "{rep}");
    assert_eq!(d.hostdevs(true), ["0000:4d:00.1", "0000:4d:00.2"]);
    let (code, e) = agent.post(
        &format!("/v1/domains/{}/attach", other.name),
        r#"{"vgpu":"vf","config":true}"#,
    );
    assert_eq!(code, 409, "{e}");
    assert_eq!(e["error"]["code"], "no_free_gpu", "{e}");
    assert_eq!(e["error"]["exit_code"], 6, "{e}");
    assert!(other.hostdevs(true).is_empty());
    let (code, e) = agent.post(
        &format!("/v1/domains/{}/attach", other.name),
        r#"{"vgpu":"GRID T4-2Q","count":1,"config":true}"#,
    );
    assert_eq!(
        (code, &e["error"]["code"]),
        (400, &Value::from("bad_request")),
        "{e}"
    );
    agent.wait_for("the metrics to count 2 used VFs", |a| {
        let (_, m) = a.get("/metrics");
        m.as_str().is_some_and(|m| {
            m.contains("gpupass_vgpus{profile=\"vf\",state=\"used\"} 2")
                && m.contains(&format!(
                    "gpupass_domain_vgpus{{domain=\"{}\",owner=\"\",profile=\"vf\"}} 2",
                    d.name
                ))
        })
    });
    let (code, rep) = agent.post(
        &format!("/v1/domains/{}/detach", d.name),
        r#"{"vgpu":"vf","all":true,"config":true}"#,
    );
    assert_eq!(code, 200, "{rep}");
    assert!(d.hostdevs(true).is_empty());
    agent.wait_for("the metrics to count 2 free VFs", |a| {
        let (_, m) = a.get("/metrics");
        m.as_str()
            .is_some_and(|m| m.contains("gpupass_vgpus{profile=\"vf\",state=\"free\"} 2"))
    });
}

/// An owner's limit refuses an API attach with a message naming the owner, the limit and the
/// current use; /v1/limits shows the same numbers.
#[test]
fn limits_refuse_with_the_owner_limit_and_use() {
    let Some(_g) = setup() else { return };
    let agent = Agent::start(
        "[[rules]]\ndomain = \"gpupass-t-serve-l*\"\ncount = 1\nowner = \"acct-7\"\n[limits]\nacct-7 = { max_gpus = 1, max_gpu_hours = 100 }\n",
        &[],
    );
    let a = TestDomain::define("serve-l1", "");
    let b = TestDomain::define("serve-l2", "");
    let (code, v) = agent.post(&format!("/v1/domains/{}/attach", a.name), r#"{"count":1}"#);
    assert_eq!(code, 200, "{v}");
    let (code, v) = agent.post(&format!("/v1/domains/{}/attach", b.name), r#"{"count":1}"#);
    assert_eq!(code, 403, "{v}");
    assert_eq!(v["error"]["code"], "limit_exceeded");
    assert_eq!(v["error"]["exit_code"], 15);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(
            "owner 'acct-7' may hold 1 GPU(s) at once and holds 1 (domains: gpupass-t-serve-l1)"
        ),
        "{msg}"
    );
    assert!(b.hostdevs(true).is_empty());
    agent.wait_for("the limit's use", |ag| {
        let (_, l) = ag.get("/v1/limits");
        l[0]["owner"] == "acct-7" && l[0]["held_gpus"] == 1
    });
    let (_, l) = agent.get("/v1/limits");
    assert_eq!(l[0]["max_gpus"], 1);
    assert_eq!(l[0]["max_gpu_hours"], 100.0);
    assert_eq!(l[0]["period"], "month");
    assert_eq!(l[0]["domains"], serde_json::json!([a.name]));
}

/// Bad requests get one JSON error each and the agent keeps serving.
#[test]
fn bad_requests_get_json_errors_and_the_agent_keeps_serving() {
    let Some(_g) = setup() else { return };
    let agent = Agent::start("", &[]);
    let d = TestDomain::define("serve-bad", "");
    let attach = format!("/v1/domains/{}/attach", d.name);
    let huge = format!("{{\"gpus\":[\"{}\"]}}", "0".repeat(100_000));
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "POST",
            attach.clone(),
            Some("{\"count\":".into()),
            400,
            "bad_request",
        ),
        (
            "POST",
            attach.clone(),
            Some("[1,2]".into()),
            400,
            "bad_request",
        ),
        (
            "POST",
            attach.clone(),
            Some("{\"cnt\":1}".into()),
            400,
            "bad_request",
        ),
        (
            "POST",
            attach.clone(),
            Some("{\"count\":0}".into()),
            400,
            "bad_request",
        ),
        (
            "POST",
            attach.clone(),
            Some("{\"gpus\":[\"nope\"]}".into()),
            400,
            "bad_request",
        ),
        ("POST", attach.clone(), Some(huge), 413, "body_too_large"),
        (
            "POST",
            "/v1/domains/gpupass-t-no-such/attach".into(),
            Some("{\"count\":1}".into()),
            404,
            "unknown_domain",
        ),
        (
            "POST",
            attach.clone(),
            Some("{\"gpus\":[\"0000:99:00.0\"]}".into()),
            404,
            "unknown_gpu",
        ),
        ("GET", "/v1/gpus/zzz".into(), None, 400, "bad_request"),
        (
            "GET",
            "/v1/gpus/0000:99:00.0".into(),
            None,
            404,
            "unknown_gpu",
        ),
        (
            "GET",
            "/v1/usage?since=yesterday".into(),
            None,
            400,
            "bad_request",
        ),
        ("GET", "/v1/nope".into(), None, 404, "not_found"),
        ("DELETE", "/v1/gpus".into(), None, 405, "method_not_allowed"),
        ("GET", attach.clone(), None, 405, "method_not_allowed"),
    ];
    for (method, path, body, want, code) in cases {
        let (got, v) = agent.request(method, &path, body.as_deref());
        assert_eq!(got, want, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], code, "{method} {path}: {v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty() && !m.contains('\n')));
    }
    // No Content-Type.
    let (got, text) = http(
        &agent.socket,
        "POST",
        &attach,
        Some("{}"),
        &[("Content-Type", "text/plain")],
    );
    assert_eq!(got, 415, "{text}");
    // Garbage instead of HTTP, then a half request: the connection closes, the agent lives.
    if let Ok(mut s) = UnixStream::connect(&agent.socket) {
        let _ = s.write_all(b"\x00\x01garbage\r\n\r\n");
    }
    if let Ok(mut s) = UnixStream::connect(&agent.socket) {
        let _ = s.write_all(b"POST /v1/domains/x/attach HTTP/1.1\r\nContent-Length: 10\r\n\r\n{");
    }
    assert!(d.hostdevs(true).is_empty());
    let (code, h) = agent.get("/v1/health");
    assert_eq!(code, 200, "{h}");
}

/// The socket is mode 0660; a second agent on the same socket refuses to start; TCP needs
/// a private token file and the bearer token.
#[test]
fn socket_and_tcp_access() {
    let Some(_g) = setup() else { return };
    let agent = Agent::start("", &[]);
    let mode = fs::metadata(&agent.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let second = Command::new(env!("CARGO_BIN_EXE_gpupass"))
        .args(["-c", &test_uri(), "--host-root"])
        .arg(common::host("hgx-8gpu"))
        .args(["serve", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another gpupass serve is answering on"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(agent.get("/v1/health").0, 200);

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    fs::write(&token, "0123456789abcdef-token\n").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
    let socket2 = dir.path().join("b.sock");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let tcp = format!("127.0.0.1:{port}");
    let bad = Command::new(env!("CARGO_BIN_EXE_gpupass"))
        .args(["-c", &test_uri(), "--host-root"])
        .arg(common::host("hgx-8gpu"))
        .args(["serve", "--tcp", &tcp, "--token-file"])
        .arg(&token)
        .arg("--socket")
        .arg(&socket2)
        .output()
        .unwrap();
    assert_ne!(bad.status.code(), Some(0));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("readable by others"), "{err}");
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    let tok = token.to_str().unwrap().to_owned();
    let tcp_agent = Agent::start("", &["--tcp", &tcp, "--token-file", &tok]);
    let ask = |auth: Option<&str>| {
        let mut s = std::net::TcpStream::connect(&tcp).unwrap();
        let auth = auth
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET /v1/health HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        parse_response(&raw)
    };
    assert_eq!(ask(None).0, 401);
    assert_eq!(ask(Some("wrong-token-wrong-token")).0, 401);
    assert_eq!(ask(Some("0123456789abcdef-token")).0, 200);
    // The unix socket needs no token.
    assert_eq!(tcp_agent.get("/v1/health").0, 200);

    // --socket-group gives the socket to a group (scripts/libvirtd creates "kvm").
    if let Ok(Some(g)) = nix::unistd::Group::from_name("kvm") {
        use std::os::unix::fs::MetadataExt;
        let grouped = Agent::start("", &["--socket-group", "kvm"]);
        let m = fs::metadata(&grouped.socket).unwrap();
        assert_eq!(m.gid(), g.gid.as_raw());
        assert_eq!(m.mode() & 0o777, 0o660);
    } else {
        assert!(
            !common::required(),
            "no group kvm to test --socket-group with"
        );
    }
}

/// Setup for the slow-client tests: the daemon must answer (the agent reads it), but they make
/// no domains, so nothing is cleaned.
fn setup_no_domains() -> Option<std::sync::MutexGuard<'static, ()>> {
    let guard = daemon_lock();
    daemon_available().then_some(guard)
}

/// An agent on the unix socket and on loopback TCP with a token; returns it and the address.
fn tcp_agent(config: &str) -> (Agent, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    fs::write(&token, "0123456789abcdef-token\n").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let tcp = format!("127.0.0.1:{port}");
    let tok = token.to_str().unwrap().to_owned();
    let agent = Agent::start(config, &["--tcp", &tcp, "--token-file", &tok]);
    (agent, tcp, dir)
}

/// GET /v1/health over TCP with the token.
fn tcp_health(addr: &str) -> u16 {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if write!(
        s,
        "GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer 0123456789abcdef-token\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return 0;
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw).0
}

/// The start of a request whose headers never end.
const PARTIAL: &[u8] = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ";

fn slow_tcp(addr: &str) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(PARTIAL).unwrap();
    s
}

fn slow_unix(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(PARTIAL).unwrap();
    s
}

/// Whether the agent closed the connection (EOF or reset) within `d`.
fn closed_within(s: &mut impl Read, d: Duration, set: impl Fn(Option<Duration>)) -> bool {
    set(Some(d));
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn tcp_closed(s: &mut std::net::TcpStream, d: Duration) -> bool {
    let c = s.try_clone().unwrap();
    closed_within(s, d, |t| c.set_read_timeout(t).unwrap())
}

fn unix_closed(s: &mut UnixStream, d: Duration) -> bool {
    let c = s.try_clone().unwrap();
    closed_within(s, d, |t| c.set_read_timeout(t).unwrap())
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Slowloris: connections that never finish their headers are closed after the header timeout
/// on both listeners, a body that never arrives gets 408, and real requests are answered all
/// the while.
#[test]
fn slow_headers_and_bodies_are_cut_off_while_real_requests_are_served() {
    let Some(_g) = setup_no_domains() else { return };
    let (agent, tcp, _t) = tcp_agent("[serve]\nheader_timeout_ms = 1000\nbody_timeout_ms = 1000\n");
    let t0 = Instant::now();
    let mut slow_t: Vec<_> = (0..20).map(|_| slow_tcp(&tcp)).collect();
    let mut slow_u: Vec<_> = (0..20).map(|_| slow_unix(&agent.socket)).collect();
    // A body announced and never sent.
    let mut body = UnixStream::connect(&agent.socket).unwrap();
    body.write_all(
        b"POST /v1/domains/x/attach HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .unwrap();
    for _ in 0..3 {
        assert_eq!(agent.get("/v1/health").0, 200);
        assert_eq!(tcp_health(&tcp), 200);
    }
    for (i, s) in slow_t.iter_mut().enumerate() {
        assert!(
            tcp_closed(s, Duration::from_secs(5)),
            "TCP slow client {i} still open"
        );
    }
    for (i, s) in slow_u.iter_mut().enumerate() {
        assert!(
            unix_closed(s, Duration::from_secs(5)),
            "unix slow client {i} still open"
        );
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "closed after the timeout, not at once"
    );
    body.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut raw = Vec::new();
    let _ = body.read_to_end(&mut raw);
    let (code, text) = parse_response(&raw);
    assert_eq!(code, 408, "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    assert_eq!(agent.get("/v1/health").0, 200);
    assert_eq!(tcp_health(&tcp), 200);
}

/// Past the cap, connections are closed (the longest-idle slow one makes room for a new one),
/// so the agent's file handles stay bounded and a real request still gets in.
#[test]
fn connections_beyond_the_cap_are_closed_and_file_handles_stay_bounded() {
    let Some(_g) = setup_no_domains() else { return };
    let (agent, tcp, _t) = tcp_agent("[serve]\nheader_timeout_ms = 60000\nmax_connections = 8\n");
    let pid = agent.child.id();
    assert_eq!(tcp_health(&tcp), 200);
    let before = open_fds(pid);
    let mut slow_t: Vec<_> = (0..100).map(|_| slow_tcp(&tcp)).collect();
    let mut slow_u: Vec<_> = (0..100).map(|_| slow_unix(&agent.socket)).collect();
    // Let the agent accept them all: one at a time, each taking an idle one's place.
    let bound = before + 2 * 8 + 4;
    let t0 = Instant::now();
    let mut last = open_fds(pid);
    while t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(200));
        last = open_fds(pid);
    }
    assert!(
        last <= bound,
        "{last} file handles open with 200 slow clients, {before} before (cap 8 a listener)"
    );
    assert_eq!(agent.get("/v1/health").0, 200, "a real request gets in");
    assert_eq!(tcp_health(&tcp), 200, "on TCP too");
    let closed_t = slow_t
        .iter_mut()
        .map(|s| tcp_closed(s, Duration::from_millis(100)))
        .filter(|c| *c)
        .count();
    let closed_u = slow_u
        .iter_mut()
        .map(|s| unix_closed(s, Duration::from_millis(100)))
        .filter(|c| *c)
        .count();
    assert!(closed_t >= 92 && closed_u >= 92, "{closed_t} {closed_u}");
}

/// SIGTERM with slow clients open: the agent stops within its shutdown grace (2 s by default),
/// not when the clients please.
#[test]
fn sigterm_with_slow_clients_open_exits_within_the_grace() {
    let Some(_g) = setup_no_domains() else { return };
    let (mut agent, tcp, _t) = tcp_agent("[serve]\nheader_timeout_ms = 60000\n");
    let _slow_t: Vec<_> = (0..50).map(|_| slow_tcp(&tcp)).collect();
    let _slow_u: Vec<_> = (0..50).map(|_| slow_unix(&agent.socket)).collect();
    // A request in flight whose body never comes.
    let mut body = std::net::TcpStream::connect(&tcp).unwrap();
    body.write_all(
        b"POST /v1/domains/x/attach HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer 0123456789abcdef-token\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .unwrap();
    assert_eq!(agent.get("/v1/health").0, 200);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let st = Command::new("kill")
        .arg(agent.child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(8) {
            panic!(
                "gpupass serve still running 8 s after SIGTERM; log:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(!agent.socket.exists(), "socket removed");
}

/// An API attach fits the persistent definition as `gpupass attach` does (the guest fit: a q35
/// domain given an H100 gets its 64-bit window), and `no_fit` leaves it alone with a warning.
#[test]
fn api_attach_fits_the_definition_unless_told_not_to() {
    let Some(_g) = setup() else { return };
    let agent = Agent::start("", &[]);
    let inactive = |name: &str| {
        let r = common::virsh(&["dumpxml", "--inactive", name]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        r.stdout
    };
    let d = TestDomain::define("serve-fit", "");
    let (code, v) = agent.post(
        &format!("/v1/domains/{}/attach", d.name),
        r#"{"count":1,"config":true}"#,
    );
    assert_eq!(code, 200, "{v}");
    let fitted = v["fitted"].as_array().cloned().unwrap_or_default();
    assert!(
        !fitted.is_empty(),
        "the report says what the fit changed: {v}"
    );
    let xml = inactive(&d.name);
    assert_eq!(d.hostdevs(true).len(), 1, "{xml}");
    assert!(
        xml.contains("X-PciMmio64Mb") || xml.contains("<pcihole64"),
        "{xml}"
    );

    let e = TestDomain::define("serve-nofit", "");
    let (code, v) = agent.post(
        &format!("/v1/domains/{}/attach", e.name),
        r#"{"count":1,"config":true,"no_fit":true}"#,
    );
    assert_eq!(code, 200, "{v}");
    assert!(v.get("fitted").is_none(), "{v}");
    assert!(v["warnings"].to_string().contains("no_fit"), "{v}");
    let xml = inactive(&e.name);
    assert!(
        !xml.contains("X-PciMmio64Mb") && !xml.contains("<pcihole64"),
        "{xml}"
    );
}
