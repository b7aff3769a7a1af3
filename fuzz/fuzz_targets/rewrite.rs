//! The XML rewriter on arbitrary input: scanning never panics, and on anything it accepts,
//! injecting a GPU is a pure insertion whose output scans again with exactly one more injected
//! hostdev, and gpupass's own removal of it restores a document with the same hostdevs.
#![no_main]

use gpupass::model::PciAddress;
use gpupass::xml::compose::HostdevTemplate;
use gpupass::xml::rewrite::{apply, injected_block, scan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let Ok(doc) = scan(input) else { return };
    let gpu = PciAddress::new(0, 0xc1, 0, 0).expect("valid");
    let block = injected_block(&HostdevTemplate::builtin(), gpu);
    let edit = doc.insertion(&[block.clone()]).expect("one block gives an edit");
    let out = apply(input, &[edit.clone()]);
    if edit.range.is_empty() {
        // Pure insertion: the input comes back when the inserted text is cut out.
        let at = edit.range.start;
        assert_eq!(&out[..at], &input[..at]);
        assert_eq!(&out[at + edit.text.len()..], &input[at..]);
    }
    let again = scan(&out).expect("the output of an accepted document scans");
    let before = doc.hostdevs.iter().filter(|h| h.injected()).count();
    let injected: Vec<_> = again.hostdevs.iter().filter(|h| h.injected()).collect();
    assert_eq!(injected.len(), before + 1);
    let ours = injected
        .iter()
        .find(|h| h.source == Some(gpu) && out[h.span.clone()].contains("ua-gpupass-0000-c1-00-0"))
        .expect("the new block is found");
    let removed = apply(&out, &[again.removal(ours)]);
    let back = scan(&removed).expect("the removal scans");
    assert_eq!(back.pci_sources(), doc.pci_sources());
});
