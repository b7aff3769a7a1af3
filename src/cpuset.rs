//! Parses CPU and NUMA node lists in the kernel's `cpulist` form (`0-3,8`) and libvirt's cpuset
//! form, which adds exclusions (`0-7,^3`). Pure; owns no IO.

use std::collections::BTreeSet;

/// Errors from parsing a CPU or node list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpusetError {
    /// The list had a part that is not a number, a range or an exclusion.
    #[error("invalid CPU/node list '{list}': bad part '{part}'")]
    Invalid {
        /// The whole list.
        list: String,
        /// The offending part.
        part: String,
    },
}

/// Largest CPU or node number accepted; bounds the work a hostile range like `0-4294967295` costs.
const MAX_ID: u32 = 1 << 16;

/// Parses `0-3,8,^2` into `{0,1,3,8}`. An empty string is the empty set.
pub fn parse(list: &str) -> Result<BTreeSet<u32>, CpusetError> {
    let mut set = BTreeSet::new();
    let mut excluded = BTreeSet::new();
    for part in list
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let bad = || CpusetError::Invalid {
            list: list.chars().take(64).collect(),
            part: part.chars().take(32).collect(),
        };
        let (target, body) = match part.strip_prefix('^') {
            Some(rest) => (&mut excluded, rest),
            None => (&mut set, part),
        };
        let num = |s: &str| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= MAX_ID)
                .ok_or_else(bad)
        };
        match body.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return Err(bad());
                }
                target.extend(lo..=hi);
            }
            None => {
                target.insert(num(body)?);
            }
        }
    }
    Ok(set.difference(&excluded).copied().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_and_libvirt_forms() {
        assert_eq!(parse("0-3,8").unwrap(), BTreeSet::from([0, 1, 2, 3, 8]));
        assert_eq!(
            parse("0-7,^3,^5-6").unwrap(),
            BTreeSet::from([0, 1, 2, 4, 7])
        );
        assert_eq!(parse("1").unwrap(), BTreeSet::from([1]));
        assert!(parse("").unwrap().is_empty());
        assert!(parse("\n").unwrap().is_empty());
    }

    #[test]
    fn rejects_garbage_and_huge_ranges() {
        for bad in ["a", "3-1", "0-4294967295", "1-", "-1", "^"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
