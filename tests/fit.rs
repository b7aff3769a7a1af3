//! The fit's XML changes against golden files (tests/golden/fit/<case>.in.xml → .out.xml,
//! UPDATE_GOLDEN=1 rewrites them): each result is the input with only the fit's elements added
//! or changed, fitting it again changes nothing, values set higher are never lowered, and every
//! result passes `virt-xml-validate`. GPUs and their BARs come from the fixture hosts.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use gpupass::fit::{self, Fitted};
use gpupass::host::discover::discover;
use gpupass::host::sysfs::Sysfs;

/// The config of the vendor-options case: hide the hypervisor and switch the ROM BAR off for
/// RTX 2080 Ti cards in `win-*` domains.
const VENDOR_CONFIG: &str = "[[guest]]\ndomain = \"win-*\"\nmodel = \"10de:1e07\"\nhide_hypervisor = true\nhyperv_vendor_id = \"gpupass0123\"\nrom = \"off\"\n";

/// Each case: file stem and the fixture host its GPUs live on.
const CASES: &[(&str, &str)] = &[
    ("q35-consumer-vendor-options", "consumer-4fn"),
    ("q35-uefi-one-h100", "hgx-8gpu"),
    ("q35-uefi-eight-h100", "hgx-8gpu"),
    ("q35-host-passthrough-existing-commandline", "hgx-8gpu"),
    ("i440fx-bios-consumer-card", "consumer-4fn"),
    ("q35-already-fitted", "hgx-8gpu"),
    ("q35-bios-three-h100-no-cpu", "hgx-8gpu"),
];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/fit")
}

/// Fits `xml` for the GPUs it holds on fixture `host`.
pub fn fit_on(host: &str, xml: &str) -> Fitted {
    let sysfs = Sysfs::new(common::host(host));
    let inv = discover(&sysfs).unwrap();
    let gpus = fit::domain_gpus(&inv, xml, &[]).unwrap();
    let bars = fit::read_bars(&sysfs, &inv, &gpus).unwrap();
    let config = gpupass::config::GpupassConfig::parse(VENDOR_CONFIG).unwrap();
    let name = gpupass::xml::domain::parse(xml).unwrap().name;
    let vendor = fit::vendor_options(&config, &name, &inv, &gpus);
    fit::fit_xml_with(xml, &bars, sysfs.host_phys_bits().unwrap(), vendor).unwrap()
}

/// Lines of `out` that are not in `input`, and lines of `input` not in `out` (a line diff
/// without reordering: what the rewrite touched).
fn changed_lines(input: &str, out: &str) -> (Vec<String>, Vec<String>) {
    let diff = similar::TextDiff::from_lines(input, out);
    let mut added = Vec::new();
    let mut removed = Vec::new();
    for c in diff.iter_all_changes() {
        match c.tag() {
            similar::ChangeTag::Insert => added.push(c.value().trim().to_owned()),
            similar::ChangeTag::Delete => removed.push(c.value().trim().to_owned()),
            similar::ChangeTag::Equal => {}
        }
    }
    (added, removed)
}

#[test]
fn golden_fits_are_minimal_idempotent_and_schema_valid() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let out_dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for (case, host) in CASES {
        let input = fs::read_to_string(dir().join(format!("{case}.in.xml"))).unwrap();
        let fitted = fit_on(host, &input);
        let out = fitted.xml.clone().unwrap_or_else(|| input.clone());
        let golden = dir().join(format!("{case}.out.xml"));
        if update {
            fs::write(&golden, &out).unwrap();
        }
        let want = fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", golden.display()));
        assert_eq!(out, want, "{case}: differs from {}", golden.display());

        // Only the fit's own elements differ: every removed line is one the fit replaces.
        let (added, removed) = changed_lines(&input, &out);
        for r in &removed {
            assert!(
                [
                    "<address type",
                    "<pcihole64",
                    "<maxphysaddr",
                    "<qemu:arg",
                    "<cpu ",
                    "<controller",
                    "<domain ",
                    // A one-line hostdev gains its guest address inside the line.
                    "<hostdev ",
                    "<hidden",
                    "<vendor_id",
                ]
                .iter()
                .any(|p| r.starts_with(p)),
                "{case}: the fit removed a line it does not own: {r}"
            );
        }
        assert_eq!(
            fitted.xml.is_some(),
            !added.is_empty(),
            "{case}: a change is reported exactly when the text changes"
        );

        // Fitting the result again changes nothing, and the result fits.
        let again = fit_on(host, &out);
        assert!(
            again.xml.is_none(),
            "{case}: not idempotent: {:?}",
            again.plan.changes
        );
        assert!(again.plan.fits(), "{case}: {:?}", again.plan.checks);

        let p = out_dir.path().join(format!("{case}.xml"));
        fs::write(&p, &out).unwrap();
        outputs.push(p);
    }
    if !common::tool_available("virt-xml-validate") {
        return;
    }
    for p in outputs {
        let o = Command::new("virt-xml-validate")
            .arg(&p)
            .arg("domain")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}: {}{}",
            p.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn an_already_fitted_domain_is_left_byte_for_byte() {
    let input = fs::read_to_string(dir().join("q35-already-fitted.in.xml")).unwrap();
    let f = fit_on("hgx-8gpu", &input);
    assert!(f.xml.is_none(), "{:?}", f.plan.changes);
    assert!(f.plan.fits());
}

#[test]
fn values_set_higher_are_never_lowered() {
    let input = fs::read_to_string(dir().join("q35-already-fitted.in.xml")).unwrap();
    // Raise every value far above need; the fit keeps them all.
    let high = input
        .replace("bits='46'", "bits='52'")
        .replace(">4294967296<", ">68719476736<")
        .replace("string=4194304", "string=67108864");
    let f = fit_on("hgx-8gpu", &high);
    assert!(f.xml.is_none(), "{:?}", f.plan.changes);
    // Lower ones are raised to the need, never past it.
    let low = input
        .replace(">4294967296<", ">1048576<")
        .replace("string=4194304", "string=1024");
    let out = fit_on("hgx-8gpu", &low).xml.unwrap();
    assert!(
        out.contains("<pcihole64 unit='KiB'>268435456</pcihole64>"),
        "{out}"
    );
    assert!(out.contains("string=262144"), "{out}");
    assert!(out.contains("bits='46'"), "{out}");
}

#[test]
fn vendor_options_apply_only_where_the_config_says_and_keep_the_operators_rom() {
    let input = fs::read_to_string(dir().join("q35-consumer-vendor-options.in.xml")).unwrap();
    let out = fit_on("consumer-4fn", &input).xml.unwrap();
    assert!(out.contains("<kvm><hidden state='on'/></kvm>"), "{out}");
    assert!(
        out.contains("<vendor_id state='on' value='gpupass0123'/>"),
        "{out}"
    );
    assert!(
        out.contains("<relaxed state='on'/>"),
        "the operator's hyperv stays: {out}"
    );
    assert_eq!(out.matches("<rom bar='off'/>").count(), 3, "{out}");
    assert!(
        out.contains("<rom file='/usr/share/vgabios/own.rom'/>"),
        "{out}"
    );
    // Another domain name: none of them.
    let other = input.replace("win-desktop", "linux-desktop");
    let out = fit_on("consumer-4fn", &other).xml.unwrap();
    assert!(
        !out.contains("<hidden") && !out.contains("<rom bar"),
        "{out}"
    );
}

#[test]
fn the_report_names_each_missing_piece_with_one_line_why() {
    let input = fs::read_to_string(dir().join("q35-uefi-one-h100.in.xml")).unwrap();
    let f = fit_on("hgx-8gpu", &input);
    let text = fit::describe(&f.plan, "gpu-vm");
    println!("{text}");
    assert!(
        text.starts_with(
            "domain 'gpu-vm': 1 GPU(s) need a 256 GiB 64-bit window and 39 guest address bits\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("GPU 0000:18:00.0: 64-bit prefetchable BARs 128.04 GiB -> window 256 GiB"),
        "{text}"
    );
    for item in ["64-bit window", "pcihole64", "root ports", "slot layout"] {
        assert!(
            text.lines()
                .any(|l| l.contains("MISSING") && l.contains(item)),
            "{item}: {text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.contains("ok") && l.contains("phys-bits")),
        "{text}"
    );
    let json = serde_json::to_value(&f.plan).unwrap();
    assert_eq!(json["need"]["total"], 256u64 << 30);
    assert_eq!(json["provides"]["firmware"], "uefi");
    assert_eq!(json["checks"][0]["status"], "missing");
}
