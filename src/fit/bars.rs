//! A PCI function's BARs, read from its sysfs `resource` file under the host root, and the
//! aperture a GPU needs for them. `parse_resource` and the sums are pure; `read_*` do the IO.

use serde::Serialize;

use crate::fit::FitError;
use crate::host::discover::Gpu;
use crate::host::sysfs::Sysfs;
use crate::model::PciAddress;

/// `IORESOURCE_MEM` (include/linux/ioport.h).
const IORESOURCE_MEM: u64 = 0x200;
/// `IORESOURCE_IO`.
const IORESOURCE_IO: u64 = 0x100;
/// The BAR's own low bits the kernel keeps in the flags: 64-bit (0x4) and prefetchable (0x8).
const MEM_64_PREF: u64 = 0xc;

/// One BAR of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bar {
    /// BAR number, 0–5.
    pub index: u8,
    /// Size in bytes.
    pub size: u64,
    /// The kernel's resource flags (the third column of `resource`).
    #[serde(skip)]
    pub flags: u64,
    /// `64-bit pref`, `64-bit`, `32-bit` or `io`.
    pub kind: &'static str,
    /// A 64-bit prefetchable memory BAR: the kind the guest's 64-bit window must hold.
    pub prefetchable_64: bool,
}

impl Bar {
    fn new(index: u8, size: u64, flags: u64) -> Self {
        let pref64 = flags & IORESOURCE_MEM != 0 && flags & 0xf == MEM_64_PREF;
        let kind = if pref64 {
            "64-bit pref"
        } else if flags & IORESOURCE_MEM != 0 && flags & 0x4 != 0 {
            "64-bit"
        } else if flags & IORESOURCE_MEM != 0 {
            "32-bit"
        } else if flags & IORESOURCE_IO != 0 {
            "io"
        } else {
            "other"
        };
        Self {
            index,
            size,
            flags,
            kind,
            prefetchable_64: pref64,
        }
    }
}

/// A size in the unit people read (`128 GiB`, `32 MiB`, `16 KiB`, `512 B`; `288.25 MiB` when
/// not a whole number of its largest unit).
pub fn human(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if bytes >= unit {
            if bytes.is_multiple_of(unit) {
                return format!("{} {name}", bytes >> shift);
            }
            // Hundredths, rounded up so a need is never shown smaller than it is.
            let hundredths = u128::from(bytes)
                .saturating_mul(100)
                .div_ceil(u128::from(unit));
            return format!("{}.{:02} {name}", hundredths / 100, hundredths % 100);
        }
    }
    format!("{bytes} B")
}

/// Parses a `resource` file: one `start end flags` line (hex) per resource; lines 0–5 are the
/// BARs (the ROM and bridge windows follow and are skipped). Unused BARs (size 0) are left out.
pub fn parse_resource(text: &str) -> Result<Vec<Bar>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().take(6).enumerate() {
        let nums: Vec<u64> = line
            .split_whitespace()
            .map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16))
            .collect::<Result<_, _>>()
            .map_err(|_| format!("line {} is not three hex numbers: {line:?}", i + 1))?;
        let [start, end, flags] = nums[..] else {
            return Err(format!("line {} is not three hex numbers: {line:?}", i + 1));
        };
        if end <= start && start == 0 && end == 0 {
            continue;
        }
        if end < start {
            return Err(format!("line {}: end before start", i + 1));
        }
        let size = end - start + 1;
        let index = u8::try_from(i).expect("at most 6 lines are read");
        out.push(Bar::new(index, size, flags));
    }
    Ok(out)
}

/// The BARs of one function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionBars {
    /// The function.
    pub function: PciAddress,
    /// Its BARs, by index.
    pub bars: Vec<Bar>,
}

/// A GPU's functions with their BARs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuBars {
    /// The GPU (its display function).
    pub gpu: PciAddress,
    /// Every function of the GPU.
    pub functions: Vec<FunctionBars>,
}

impl GpuBars {
    /// The sum of its 64-bit prefetchable BARs.
    pub fn pref64_sum(&self) -> u64 {
        self.functions
            .iter()
            .flat_map(|f| &f.bars)
            .filter(|b| b.prefetchable_64)
            .fold(0u64, |a, b| a.saturating_add(b.size))
    }

    /// Its 64-bit prefetchable BARs, largest first.
    pub fn pref64_bars(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .functions
            .iter()
            .flat_map(|f| &f.bars)
            .filter(|b| b.prefetchable_64)
            .map(|b| b.size)
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    }
}

/// Reads one function's BARs; a function without a `resource` file has none.
pub fn read_function_bars(sysfs: &Sysfs, function: PciAddress) -> Result<Vec<Bar>, FitError> {
    let Some(text) = sysfs.attr(function, "resource")? else {
        return Ok(Vec::new());
    };
    parse_resource(&text).map_err(|reason| FitError::Resource { function, reason })
}

/// Reads the BARs of every function of a GPU.
pub fn read_gpu_bars(sysfs: &Sysfs, gpu: &Gpu) -> Result<GpuBars, FitError> {
    let mut functions = Vec::new();
    for f in &gpu.functions {
        functions.push(FunctionBars {
            function: *f,
            bars: read_function_bars(sysfs, *f)?,
        });
    }
    Ok(GpuBars {
        gpu: gpu.address,
        functions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H100: &str = "0x0000000092000000 0x0000000092ffffff 0x0000000000040200
0x0000202000000000 0x0000203fffffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000204000000000 0x0000204001ffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000003000 0x000000000000307f 0x0000000000040101
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000093000000 0x000000009307ffff 0x000000000004e200
";

    #[test]
    fn reads_the_three_bars_of_an_h100_and_their_kinds() {
        let bars = parse_resource(H100).unwrap();
        let shown: Vec<(u8, String, &str)> = bars
            .iter()
            .map(|b| (b.index, human(b.size), b.kind))
            .collect();
        assert_eq!(
            shown,
            [
                (0, "16 MiB".to_owned(), "32-bit"),
                (1, "128 GiB".to_owned(), "64-bit pref"),
                (3, "32 MiB".to_owned(), "64-bit pref"),
                (5, "128 B".to_owned(), "io"),
            ],
            "the ROM on line 7 is not a BAR"
        );
        let g = GpuBars {
            gpu: "0000:18:00.0".parse().unwrap(),
            functions: vec![FunctionBars {
                function: "0000:18:00.0".parse().unwrap(),
                bars,
            }],
        };
        assert_eq!(g.pref64_sum(), (128 << 30) + (32 << 20));
        assert_eq!(g.pref64_bars(), [128 << 30, 32 << 20]);
    }

    #[test]
    fn a_64bit_non_prefetchable_bar_is_not_counted() {
        let b =
            parse_resource("0x0000200000000000 0x0000200000ffffff 0x0000000000140204\n").unwrap();
        assert_eq!(b[0].kind, "64-bit");
        assert!(!b[0].prefetchable_64);
        // 32-bit prefetchable (flags 0x8 without 0x4) is not 64-bit either.
        let b =
            parse_resource("0x00000000c0000000 0x00000000cfffffff 0x0000000000042208\n").unwrap();
        assert!(!b[0].prefetchable_64);
    }

    #[test]
    fn malformed_resource_files_are_errors_not_guesses() {
        for bad in [
            "0x1 0x2\n",
            "zz 0x2 0x3\n",
            "0x0000000000002000 0x0000000000001000 0x200\n",
        ] {
            assert!(parse_resource(bad).is_err(), "{bad}");
        }
        assert!(parse_resource("").unwrap().is_empty());
    }

    #[test]
    fn sizes_read_like_lspci() {
        assert_eq!(human(256 << 30), "256 GiB");
        assert_eq!(human(2 << 40), "2 TiB");
        assert_eq!(human(16 << 10), "16 KiB");
        assert_eq!(human((128 << 30) + (32 << 20)), "128.04 GiB");
        assert_eq!(human((288 << 20) + (256 << 10)), "288.25 MiB");
        assert_eq!(human(100), "100 B");
    }
}
