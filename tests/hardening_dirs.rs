//! gpupass's own directories against crashes, hangs and hostile local users: every lock is
//! waited for with a deadline, the run and state dirs must be the running user's and writable by
//! nobody else, files are 0600 and never written through a symlink, crashed writers' temp files
//! are cleaned up, a corrupt ledger line is skipped, and bookkeeping needs no config. Runs the
//! real `gpupass-hook` binary, each call under a test-side deadline so a hang fails the test.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{domain_xml, host, HookRoot as Root, Run};

/// A host root over the hgx-8gpu fixture, no domain running.
fn root() -> Root {
    Root::new("hgx-8gpu", &[])
}

/// The usage ledger's text.
fn ledger_text(root: &Root) -> String {
    String::from_utf8_lossy(&fs::read(root.state_dir().join("usage.jsonl")).unwrap()).into_owned()
}

fn count(n: u32) -> String {
    format!("<metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1' count='{n}'/></metadata>")
}

fn owned(n: u32, owner: &str) -> String {
    format!("<metadata><g:gpus xmlns:g='https://gpupass.dev/xmlns/1' count='{n}' owner='{owner}'/></metadata>")
}

fn one_line(r: &Run, code: i32, needle: &str) {
    assert_eq!(r.code, code, "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert_eq!(r.stderr.lines().count(), 1, "{:?}", r.stderr);
    assert!(r.stderr.contains(needle), "{needle:?} not in {}", r.stderr);
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o777
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Holds an exclusive flock on `path` (as another process would) until dropped.
fn hold_lock(path: &Path) -> File {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap();
    f.lock().unwrap();
    f
}

/// Finding 3: a lock held by someone else makes no hook call hang. `prepare` decides as it
/// would (counting its decision is given up after 2 s, with a warning naming the lock file);
/// `started` gives up its ledger record after 5 s with one line naming the ledger, and exits 0.
#[test]
fn a_held_lock_never_hangs_the_hook() {
    let root = root();
    let xml = domain_xml("vm-lock", &count(1), &["0000:18:00.0"]);
    let held = hold_lock(&root.run_dir().join("hook-decisions.lock"));
    let (r, took) = root.hook_timed("vm-lock", "prepare", "begin", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        r.stderr.contains("hook-decisions.lock") && r.stderr.contains("timed out"),
        "{}",
        r.stderr
    );
    drop(held);

    let held = hold_lock(&root.state_dir().join("usage.jsonl"));
    let (r, took) = root.hook_timed("vm-lock", "started", "begin", &xml);
    assert_eq!(r.code, 0, "bookkeeping never stops libvirt: {}", r.stderr);
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{:?}", r.stderr);
    assert!(
        r.stderr.contains("usage.jsonl") && r.stderr.contains("timed out"),
        "{}",
        r.stderr
    );
    drop(held);
    assert_eq!(
        root.hook_timed("vm-lock", "started", "begin", &xml).0.code,
        0
    );
    assert!(
        ledger_text(&root).contains("\"vm-lock\""),
        "{}",
        ledger_text(&root)
    );
}

/// Finding 3: what gpupass creates is its user's only: directories 0750, files 0600 (a readable
/// file is enough to hold its flock); a file an older version left 0644 is narrowed.
#[test]
fn directories_and_files_are_private() {
    let root = root();
    fs::create_dir_all(root.state_dir()).unwrap();
    fs::write(root.state_dir().join("usage.jsonl"), "").unwrap();
    fs::set_permissions(
        root.state_dir().join("usage.jsonl"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let xml = domain_xml("vm-modes", &count(1), &[]);
    let t = root.gpupass(&["transform"], &xml);
    assert_eq!(t.code, 0, "{}", t.stderr);
    let (p, _) = root.hook_timed("vm-modes", "prepare", "begin", &t.stdout);
    assert_eq!(p.code, 0, "{}", p.stderr);
    // A second domain's lease stays in leases/ (the first one's ends when it starts).
    let t2 = root.gpupass(&["transform"], &domain_xml("vm-modes-2", &count(1), &[]));
    assert_eq!(t2.code, 0, "{}", t2.stderr);
    assert_eq!(
        root.hook_timed("vm-modes", "started", "begin", &t.stdout)
            .0
            .code,
        0
    );
    assert_eq!(mode(&root.run_dir()), 0o750);
    assert_eq!(mode(&root.run_dir().join("leases")), 0o750);
    let leases: Vec<PathBuf> = fs::read_dir(root.run_dir().join("leases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(leases.len(), 1, "{leases:?}");
    for f in leases.iter().cloned().chain([
        root.run_dir().join("gpupass.lock"),
        root.run_dir().join("hook-decisions.json"),
        root.run_dir().join("hook-decisions.lock"),
        root.state_dir().join("usage.jsonl"),
    ]) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

/// Finding 4: a run or state dir that another user owns, or that others may write to, is
/// refused with one line: prepare blocks (fail closed), transform and usage fail.
#[test]
fn a_run_or_state_dir_of_someone_else_is_refused() {
    let xml = domain_xml("vm-trust", &count(1), &["0000:18:00.0"]);
    for (which, how) in [
        ("run", "owner"),
        ("run", "mode"),
        ("state", "owner"),
        ("state", "mode"),
    ] {
        let root = root();
        let dir = if which == "run" {
            root.run_dir()
        } else {
            root.state_dir()
        };
        fs::create_dir_all(&dir).unwrap();
        let needle = if how == "owner" {
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
            "belongs to uid 65534"
        } else {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
            "writable by its group and everyone"
        };
        let (r, _) = root.hook_timed("vm-trust", "prepare", "begin", &xml);
        one_line(&r, 1, needle);
        assert!(r.stderr.contains(dir.to_str().unwrap()), "{}", r.stderr);
        one_line(
            &root.gpupass(&["transform"], &domain_xml("vm-trust", &count(1), &[])),
            1,
            needle,
        );
        if which == "state" {
            one_line(&root.gpupass(&["usage"], ""), 1, needle);
        }
        let (r, _) = root.hook_timed("vm-trust", "started", "begin", &xml);
        assert_eq!(r.code, 0, "bookkeeping never stops libvirt: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{}", r.stderr);
    }
}

/// Finding 4: state is never written through a symlink planted in the run or state dir, and
/// a lease file cannot hold GPUs for longer than a lease may last.
#[test]
fn symlinks_are_never_followed_and_lease_expiry_is_capped() {
    let root = root();
    let victim = root.path().join("victim");
    fs::write(&victim, "root's file\n").unwrap();
    fs::create_dir_all(root.run_dir().join("leases")).unwrap();
    fs::create_dir_all(root.state_dir()).unwrap();
    // The temp names an older gpupass used, and the ledger itself.
    symlink(&victim, root.run_dir().join("hook-decisions.json.tmp")).unwrap();
    symlink(&victim, root.state_dir().join("usage.jsonl")).unwrap();
    // A lease that claims every function until the end of time, written two days ago.
    let functions: Vec<String> = fs::read_dir(host("hgx-8gpu").join("sys/bus/pci/devices"))
        .unwrap()
        .map(|e| format!("\"{}\"", e.unwrap().file_name().to_str().unwrap()))
        .collect();
    let evil = root.run_dir().join("leases/evil.json");
    fs::write(
        &evil,
        format!(
            "{{\"domain\":\"squatter\",\"uuid\":null,\"functions\":[{}],\"expires\":{}}}",
            functions.join(","),
            u64::MAX
        ),
    )
    .unwrap();
    File::options()
        .write(true)
        .open(&evil)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(2 * 86_400))
        .unwrap();

    let xml = domain_xml("vm-link", &count(1), &[]);
    let t = root.gpupass(&["transform"], &xml);
    assert_eq!(t.code, 0, "an over-long lease holds nothing: {}", t.stderr);
    let (p, _) = root.hook_timed("vm-link", "prepare", "begin", &t.stdout);
    assert_eq!(p.code, 0, "{}", p.stderr);
    let (s, _) = root.hook_timed("vm-link", "started", "begin", &t.stdout);
    assert_eq!(s.code, 0, "{}", s.stderr);
    assert!(s.stderr.contains("is a symlink"), "{}", s.stderr);
    assert_eq!(fs::read_to_string(&victim).unwrap(), "root's file\n");
}

/// Finding 14: crashed writers' temp files in leases/ are removed the next time the directory
/// is written.
#[test]
fn orphan_temp_files_are_cleaned_up() {
    let root = root();
    let leases = root.run_dir().join("leases");
    fs::create_dir_all(&leases).unwrap();
    let dead = i32::MAX;
    let orphans = [
        format!(".gpupass-tmp.{dead}.0.123"),
        format!(".name-vm-x.{dead}.tmp"),
        format!(".c7a5fdbd-edaf-9455-926a-d65c16db1809.{dead}.tmp"),
    ];
    for o in &orphans {
        fs::write(leases.join(o), "{").unwrap();
    }
    let t = root.gpupass(&["transform"], &domain_xml("vm-tmp", &count(1), &[]));
    assert_eq!(t.code, 0, "{}", t.stderr);
    let left: Vec<String> = fs::read_dir(&leases)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left.len(), 1, "only the new lease: {left:?}");
    assert!(left[0].ends_with(".json"), "{left:?}");
}

/// Finding 14: `--log-file` is never opened through a symlink, nor when another user owns it;
/// the log goes to stderr instead, with a warning.
#[test]
fn the_log_file_is_never_a_symlink_or_someone_elses() {
    let root = root();
    let victim = root.path().join("victim");
    fs::write(&victim, "root's file\n").unwrap();
    let link = root.path().join("hook.log");
    symlink(&victim, &link).unwrap();
    let xml = domain_xml("vm-log", "", &[]);
    let prepare_logging_to = |log: &Path| {
        let log = log.to_str().unwrap();
        let args = [
            "--log-file",
            log,
            "-v",
            "hook",
            "qemu",
            "vm-log",
            "prepare",
            "begin",
            "-",
        ];
        root.gpupass(&args, &xml)
    };
    let r = prepare_logging_to(&link);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("is a symlink"), "{}", r.stderr);
    assert_eq!(fs::read_to_string(&victim).unwrap(), "root's file\n");
    let theirs = root.path().join("their.log");
    fs::write(&theirs, "").unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
    let r = prepare_logging_to(&theirs);
    assert!(r.stderr.contains("belongs to uid 65534"), "{}", r.stderr);
    assert_eq!(fs::read_to_string(&theirs).unwrap(), "");
}

/// Finding 6: a ledger line with a cut multi-byte character (or any bad line) is skipped and
/// reported by number; the other lines still count, the release hook still appends, and limits
/// are still judged from the ledger.
#[test]
fn a_corrupt_ledger_line_is_skipped_not_fatal() {
    let root = root();
    fs::create_dir_all(root.state_dir()).unwrap();
    let t0 = now() - 7200;
    let mut ledger = format!(
        "{{\"event\":\"start\",\"ts\":{t0},\"domain\":\"acct-a\",\"key\":\"acct-a\",\"gpus\":[\"0000:18:00.0\"],\"owner\":\"acct\"}}\n"
    )
    .into_bytes();
    ledger.extend_from_slice(b"{\"event\":\"stop\",\"domain\":\"\xc3\n");
    ledger.extend_from_slice(
        format!(
            "{{\"event\":\"stop\",\"ts\":{},\"domain\":\"acct-a\",\"key\":\"acct-a\"}}\n",
            t0 + 3600
        )
        .as_bytes(),
    );
    fs::write(root.state_dir().join("usage.jsonl"), &ledger).unwrap();

    let u = root.gpupass(&["usage", "--json"], "");
    assert_eq!(u.code, 0, "{}", u.stderr);
    let v: serde_json::Value = serde_json::from_str(&u.stdout).unwrap();
    assert_eq!(v["total_gpu_seconds"], 3600, "{}", u.stdout);
    assert_eq!(v["skipped_lines"], 1);
    assert_eq!(v["skipped_line_numbers"], serde_json::json!([2]));
    assert!(u.stderr.contains("line 2"), "{}", u.stderr);

    let xml = domain_xml("vm-ledger", "", &["0000:2a:00.0"]);
    assert_eq!(
        root.hook_timed("vm-ledger", "started", "begin", &xml)
            .0
            .code,
        0
    );
    assert_eq!(
        root.hook_timed("vm-ledger", "release", "end", &xml).0.code,
        0
    );
    let text = ledger_text(&root);
    assert_eq!(text.matches("\"vm-ledger\"").count(), 2, "{text}");

    // acct used one GPU-hour of its 0.5: the limit is judged, not an error.
    let conf = root.path().join("gpupass.toml");
    fs::write(
        &conf,
        "[limits]\nacct = { max_gpu_hours = 0.5, period = \"month\" }\n",
    )
    .unwrap();
    let r = root.gpupass(
        &["--config-file", conf.to_str().unwrap(), "transform"],
        &domain_xml("acct-b", &owned(1, "acct"), &[]),
    );
    assert_eq!(r.code, 15, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("owner 'acct' may use 0.5 GPU-hour(s) per month")
            && r.stderr
                .contains("skipped 1 torn or unreadable line(s) (line 2)"),
        "{}",
        r.stderr
    );
}

/// Finding 7: bookkeeping needs no config. With an invalid config file, `started` and
/// `release end` still write their records (and warn); prepare still fails closed.
#[test]
fn bookkeeping_works_with_an_invalid_config() {
    let root = root();
    let conf = root.path().join("gpupass.toml");
    fs::write(&conf, "[paths]\nrundir = \"/x\"\n").unwrap();
    let c = conf.to_str().unwrap();
    let xml = domain_xml("vm-conf", "", &["0000:18:00.0"]);
    for (op, sub) in [("started", "begin"), ("release", "end")] {
        let r = root.gpupass(
            &["--config-file", c, "hook", "qemu", "vm-conf", op, sub, "-"],
            &xml,
        );
        assert_eq!(r.code, 0, "{op}: {}", r.stderr);
        assert!(r.stderr.contains("unknown field `rundir`"), "{}", r.stderr);
    }
    let text = ledger_text(&root);
    assert!(
        text.contains("\"event\":\"start\"") && text.contains("\"event\":\"stop\""),
        "{text}"
    );
    let p = root.gpupass(
        &[
            "--config-file",
            c,
            "hook",
            "qemu",
            "vm-conf",
            "prepare",
            "begin",
            "-",
        ],
        &xml,
    );
    one_line(&p, 1, "unknown field `rundir`");
}

/// Finding 14: every command that reads the config stops on an invalid one with exit 2, also
/// when all three directories are given.
#[test]
fn an_invalid_config_is_exit_2_even_with_every_directory_given() {
    let root = root();
    let conf = root.path().join("gpupass.toml");
    fs::write(&conf, "[paths]\nrundir = \"/x\"\n").unwrap();
    let c = conf.to_str().unwrap();
    one_line(
        &root.gpupass(&["--config-file", c, "usage"], ""),
        2,
        "unknown field `rundir`",
    );
    one_line(
        &root.gpupass(
            &["--config-file", c, "transform"],
            &domain_xml("vm-c", &count(1), &[]),
        ),
        2,
        "unknown field `rundir`",
    );
}
