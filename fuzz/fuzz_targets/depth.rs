//! The depth limit: the scanner never panics on arbitrary input, and a document nested N levels
//! deep is accepted exactly when N is at most `MAX_DEPTH`, wherever the nesting sits.
#![no_main]

use gpupass::xml::rewrite::{scan, scan_status};
use gpupass::xml::MAX_DEPTH;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = scan(text);
        let _ = scan_status(text);
    }
    // Two bytes give a depth up to 1023; the rest chooses element names and empty/open forms.
    let [hi, lo, rest @ ..] = data else { return };
    let levels = (usize::from(*hi) << 8 | usize::from(*lo)) % 1024;
    if levels < 3 {
        return;
    }
    // <domain><name>x</name> then levels-1 nested elements below it, the innermost possibly
    // empty (<e/>), named by the input.
    let inner = levels - 1;
    let name = |i: usize| {
        let c = rest.get(i).copied().unwrap_or(b'a');
        format!("e{}", char::from(b'a' + c % 26))
    };
    let mut doc = String::from("<domain><name>x</name>");
    let empty_last = rest.first().is_some_and(|b| b & 1 == 1);
    for i in 0..inner {
        if i + 1 == inner && empty_last {
            doc.push_str(&format!("<{}/>", name(i)));
        } else {
            doc.push_str(&format!("<{}>", name(i)));
        }
    }
    for i in (0..inner).rev() {
        if !(i + 1 == inner && empty_last) {
            doc.push_str(&format!("</{}>", name(i)));
        }
    }
    doc.push_str("</domain>");
    let result = scan(&doc);
    assert_eq!(result.is_ok(), levels <= MAX_DEPTH, "{levels} levels: {result:?}");
});
