//! The hook binary's dependency graph: `gpupass-hook` is built without default features
//! (scripts/build-hook) so that it links statically, which needs libvirt's client library out of
//! its graph; the agent's async stack is kept out too (less to load and start per call), and
//! the PCI ID database (~48,500 pointers a static-pie relocates at every start).

use std::process::Command;

/// Crates that must never be in the graph of a build without default features.
const NOT_IN_HOOK: &[&str] = &[
    "virt",
    "virt-sys",
    "tokio",
    "hyper",
    "hyper-util",
    "axum",
    "tower-service",
    "http-body-util",
    "prometheus-client",
    "pci-ids",
];

/// The normal (non-dev, non-build) dependencies of this package with `args`, one name a line.
fn tree(args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "--locked", "--offline", "--edges", "normal"])
        .args(["--prefix", "none"])
        .args(["--format", "{p}"])
        .args(args)
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("cargo tree prints UTF-8")
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn the_hook_build_has_neither_libvirt_nor_the_agent_stack() {
    let hook = tree(&["--no-default-features"]);
    assert!(hook.iter().any(|c| c == "gpupass"), "{hook:?}");
    assert!(hook.iter().any(|c| c == "quick-xml"), "{hook:?}");
    let found: Vec<_> = NOT_IN_HOOK
        .iter()
        .filter(|c| hook.iter().any(|h| h == *c))
        .collect();
    assert!(found.is_empty(), "in gpupass-hook's graph: {found:?}");
}

#[test]
fn the_default_build_keeps_libvirt_and_the_agent() {
    // The check above is only worth something if the names are right: they are all in the
    // default (gpupass) build.
    let full = tree(&[]);
    let missing: Vec<_> = NOT_IN_HOOK
        .iter()
        .filter(|c| !full.iter().any(|h| h == *c))
        .collect();
    assert!(missing.is_empty(), "not in gpupass's graph: {missing:?}");
}
