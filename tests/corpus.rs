//! The XML rewriter never corrupts a domain: over every file of tests/corpus/libvirt-domains.tar.xz
//! (829 schema-valid domains from libvirt 9.0's own tests; see tests/corpus/README.md),
//! injecting a GPU is a pure insertion (removing the inserted text gives the input back byte for
//! byte, found by comparing the two texts, not by trusting the rewriter's own bookkeeping), the
//! result scans again with the GPU recognised as injected, injecting again adds nothing, and
//! every result passes `virt-xml-validate`. Fitting each of them for an H100 changes no byte
//! outside the elements the fit owns, is idempotent, and stays schema-valid.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use gpupass::fit::bars::{Bar, FunctionBars, GpuBars};
use gpupass::model::PciAddress;
use gpupass::xml::compose::HostdevTemplate;
use gpupass::xml::rewrite::{apply, injected_block, scan};

/// The corpus: `GPUPASS_CORPUS`, else the archive in the repo unpacked into `tmp`.
fn corpus_dir(tmp: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("GPUPASS_CORPUS") {
        return PathBuf::from(dir);
    }
    let archive = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/libvirt-domains.tar.xz");
    let st = Command::new("tar")
        .arg("-xJf")
        .arg(&archive)
        .arg("-C")
        .arg(tmp)
        .status()
        .expect("run tar");
    assert!(st.success(), "unpacking {} failed", archive.display());
    tmp.join("libvirt-domains")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    v.sort();
    v
}

/// The inserted middle: `out` = `input[..p] + middle + input[p..]`, or `None` when `out` is not a
/// pure insertion into `input`.
fn inserted<'a>(input: &str, out: &'a str) -> Option<&'a str> {
    let prefix = input
        .bytes()
        .zip(out.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    let suffix = input[prefix..]
        .bytes()
        .rev()
        .zip(out[prefix..].bytes().rev())
        .take_while(|(a, b)| a == b)
        .count();
    (prefix + suffix == input.len()).then(|| &out[prefix..out.len() - suffix])
}

fn inject(input: &str, gpu: PciAddress) -> String {
    let doc = scan(input).unwrap_or_else(|e| panic!("scan: {e}"));
    let block = injected_block(&HostdevTemplate::builtin(), gpu);
    apply(input, &[doc.insertion(&[block]).expect("one block")])
}

#[test]
fn injecting_a_gpu_into_every_corpus_domain_is_a_pure_schema_valid_insertion() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = corpus_dir(tmp.path());
    let gpu: PciAddress = "0000:c1:00.0".parse().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let all = files(&dir);
    assert!(all.len() >= 800, "only {} corpus files", all.len());
    let mut outputs = Vec::new();
    for path in &all {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let input = fs::read_to_string(path).unwrap();
        let out = inject(&input, gpu);
        let middle = inserted(&input, &out)
            .unwrap_or_else(|| panic!("{name}: output is not the input plus an insertion"));
        assert!(
            middle.contains("<alias name='ua-gpupass-0000-c1-00-0'/>")
                && middle.trim().starts_with('<')
                && middle.matches("<hostdev ").count() == 1,
            "{name}: inserted {middle:?}"
        );
        let again = scan(&out).unwrap_or_else(|e| panic!("{name}: output does not scan: {e}"));
        let injected: Vec<_> = again.hostdevs.iter().filter(|h| h.injected()).collect();
        assert_eq!(injected.len(), 1, "{name}");
        assert_eq!(injected[0].source, Some(gpu), "{name}");
        // The removal gpupass does at migrate/restore gives the input back too; where gpupass
        // had to create <devices>, an empty <devices> stays.
        let removed = apply(&out, &[again.removal(injected[0])]);
        if input.contains("<devices") {
            assert_eq!(removed, input, "{name}: removal");
        } else {
            assert!(
                scan(&removed).unwrap().hostdevs.is_empty(),
                "{name}: removal"
            );
            assert!(inserted(&input, &removed).is_some_and(|m| m.trim().starts_with("<devices>")));
        }
        let out_path = out_dir.path().join(&name);
        fs::write(&out_path, &out).unwrap();
        outputs.push(out_path);
    }

    validate_all(&outputs, "injection");
}

/// Every file passes `virt-xml-validate` (skipped where it is not installed).
fn validate_all(outputs: &[PathBuf], what: &str) {
    if !common::tool_available("virt-xml-validate") {
        return;
    }
    // Validate on every core; virt-xml-validate costs ~20 ms a file.
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let chunks: Vec<Vec<PathBuf>> = (0..workers)
        .map(|w| outputs.iter().skip(w).step_by(workers).cloned().collect())
        .collect();
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                s.spawn(move || {
                    let mut bad = Vec::new();
                    for p in chunk {
                        let o = Command::new("virt-xml-validate")
                            .arg(p)
                            .arg("domain")
                            .output()
                            .unwrap();
                        if !o.status.success() {
                            bad.push(format!(
                                "{}: {}{}",
                                p.display(),
                                String::from_utf8_lossy(&o.stdout),
                                String::from_utf8_lossy(&o.stderr)
                            ));
                        }
                    }
                    bad
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} invalid after {what}:\n{}",
        failures.len(),
        outputs.len(),
        failures.join("\n")
    );
}

/// An H100's BARs at `gpu` (16 MiB 32-bit, 128 GiB and 32 MiB 64-bit prefetchable).
fn h100_bars(gpu: PciAddress) -> GpuBars {
    let bar = |index, size, flags, kind, prefetchable_64| Bar {
        index,
        size,
        flags,
        kind,
        prefetchable_64,
    };
    GpuBars {
        gpu,
        functions: vec![FunctionBars {
            function: gpu,
            bars: vec![
                bar(0, 16 << 20, 0x40200, "32-bit", false),
                bar(1, 128 << 30, 0x14220c, "64-bit pref", true),
                bar(3, 32 << 20, 0x14220c, "64-bit pref", true),
            ],
        }],
    }
}

/// The byte ranges of `xml` the fit may replace: the elements it owns (guest addresses of
/// hostdevs, `<pcihole64>`, `<maxphysaddr>`, the OVMF window argument) and the empty elements
/// it may open (`<cpu/>`, the root PCI controller), plus the root's start tag (which gains
/// `xmlns:qemu`).
fn owned(xml: &str) -> Vec<std::ops::Range<usize>> {
    let d = gpupass::fit::domain::scan(xml).unwrap();
    let mut v = Vec::new();
    v.push(d.root.span.start..d.root.start_end);
    v.extend(
        d.hostdevs
            .iter()
            .filter_map(|h| h.guest.as_ref().map(|g| g.span.clone())),
    );
    v.extend(d.maxphysaddr.as_ref().map(|m| m.span.clone()));
    v.extend(d.mmio64.as_ref().map(|m| m.span.clone()));
    v.extend(
        d.cpu
            .as_ref()
            .filter(|c| c.close.is_none())
            .map(|c| c.span.clone()),
    );
    for c in &d.controllers {
        v.extend(c.pcihole64.as_ref().map(|(s, _)| s.clone()));
        if c.element.close.is_none() {
            v.push(c.element.span.clone());
        }
    }
    v
}

#[test]
fn fitting_every_corpus_domain_for_a_gpu_changes_only_the_fits_own_elements() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = corpus_dir(tmp.path());
    let gpu: PciAddress = "0000:c1:00.0".parse().unwrap();
    let bars = [h100_bars(gpu)];
    let out_dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    let mut fitted = 0usize;
    for path in files(&dir) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let input = inject(&fs::read_to_string(&path).unwrap(), gpu);
        let f = gpupass::fit::fit_xml(&input, &bars, Some(46))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let Some(out) = f.xml else {
            assert!(
                f.plan.not_applicable.is_some() || f.plan.changes.is_empty() || f.plan.impossible(),
                "{name}: changes planned but none written"
            );
            continue;
        };
        fitted += 1;
        // Every byte of the input the fit did not keep lies inside an element it owns.
        let allowed = owned(&input);
        let diff = similar::TextDiff::configure()
            .algorithm(similar::Algorithm::Myers)
            .diff_chars(input.as_str(), out.as_str());
        for op in diff.ops() {
            let old = op.old_range();
            if matches!(
                op.tag(),
                similar::DiffTag::Delete | similar::DiffTag::Replace
            ) {
                assert!(
                    allowed
                        .iter()
                        .any(|r| r.start <= old.start && old.end <= r.end),
                    "{name}: the fit changed bytes {old:?} ({:?}) outside its own elements",
                    &input[old.clone()]
                );
            }
        }
        let again = gpupass::fit::fit_xml(&out, &bars, Some(46)).unwrap();
        assert!(
            again.xml.is_none(),
            "{name}: not idempotent: {:?}",
            again.plan.changes
        );
        let p = out_dir.path().join(&name);
        fs::write(&p, &out).unwrap();
        outputs.push(p);
    }
    assert!(fitted >= 400, "only {fitted} corpus domains were fitted");
    validate_all(&outputs, "fitting");
}
