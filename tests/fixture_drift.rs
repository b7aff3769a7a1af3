//! The checked-in fixture hosts are exactly what tests/fixtures/hosts/generate.py writes: a
//! change to one without the other fails here.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

/// Every entry under `root`: a file's contents or a link's target.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                out.insert(rel, format!("-> {}", fs::read_link(&p).unwrap().display()));
            } else if ft.is_dir() {
                stack.push(p);
            } else {
                // `config` is binary.
                out.insert(
                    rel,
                    String::from_utf8_lossy(&fs::read(&p).unwrap()).into_owned(),
                );
            }
        }
    }
    out
}

#[test]
fn checked_in_hosts_match_the_generator() {
    if !common::tool_available("python3") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let gen = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hosts/generate.py");
    let st = Command::new("python3")
        .arg(&gen)
        .arg("--out")
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(st.success());
    for name in common::HOSTS
        .iter()
        .chain(common::HEALTH_HOSTS)
        .chain(common::VGPU_HOSTS)
    {
        let want = snapshot(&tmp.path().join(name));
        let have = snapshot(&common::host(name));
        assert!(want.len() > 50, "{name} generated {} entries", want.len());
        let missing: Vec<_> = want.keys().filter(|k| !have.contains_key(*k)).collect();
        let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).collect();
        let differ: Vec<_> = want
            .iter()
            .filter(|(k, v)| have.get(*k).is_some_and(|h| h != *v))
            .map(|(k, _)| k)
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty() && differ.is_empty(),
            "{name}: run python3 tests/fixtures/hosts/generate.py\nmissing {missing:?}\nextra {extra:?}\ndiffer {differ:?}"
        );
    }
}
