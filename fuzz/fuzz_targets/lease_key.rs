//! Lease keys on arbitrary names: two different names (without a UUID) never get the same key,
//! every key is a plain file name the lease store can use (and never a hidden temp file's), a
//! lease is never another name's, and reading a UUID as libvirt does is stable.
#![no_main]

use gpupass::alloc::lease::{key, normalize_uuid, Lease};
use libfuzzer_sys::fuzz_target;

fn check_file_name(k: &str) {
    assert!(!k.is_empty() && k.len() <= 205, "{k:?}");
    assert!(!k.starts_with('.'), "{k:?}");
    assert!(
        k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{k:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    // The first byte says where the first name ends; the rest is the second name.
    let Some((&split, rest)) = data.split_first() else { return };
    let cut = usize::from(split).saturating_mul(2).min(rest.len());
    let (Ok(a), Ok(b)) = (std::str::from_utf8(&rest[..cut]), std::str::from_utf8(&rest[cut..]))
    else {
        return;
    };
    let (ka, kb) = (key(None, a), key(None, b));
    check_file_name(&ka);
    check_file_name(&kb);
    if a != b {
        assert_ne!(ka, kb, "{a:?} and {b:?} share a key");
        let lease = Lease {
            domain: a.to_owned(),
            uuid: None,
            functions: Vec::new(),
            expires: 1,
            owner: None,
        };
        assert!(!lease.belongs_to(b, None));
        assert!(lease.belongs_to(a, normalize_uuid(b).as_deref()));
    }
    // A UUID wins over the name, in one canonical form.
    if let Some(u) = normalize_uuid(a) {
        assert_eq!(normalize_uuid(&u).as_deref(), Some(u.as_str()));
        assert_eq!(key(Some(a), b), u);
        check_file_name(&u);
    } else {
        assert_eq!(key(Some(a), b), kb);
    }
});
