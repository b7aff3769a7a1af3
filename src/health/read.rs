//! Reads what a health check judges of one PCI function from sysfs, through the host root:
//! about a dozen small attributes of its directory, opened once. Writes nothing.

use crate::health::{AerCounts, FunctionReading};
use crate::host::sysfs::{DeviceDir, Sysfs, SysfsError};
use crate::model::PciAddress;

/// How much of `config` a check reads: the IDs and the header type (offset 0x0e).
const CONFIG_BYTES: usize = 16;

/// Reads one function. A function whose directory is gone is `present: false`.
pub fn read_function(sysfs: &Sysfs, address: PciAddress) -> Result<FunctionReading, SysfsError> {
    let Some(dev) = sysfs.device(address)? else {
        return Ok(FunctionReading::absent(address));
    };
    let power_state = dev.attr("power_state")?;
    // Only a device out of D0 needs to say whether the kernel put it there on purpose.
    let runtime_status = match power_state.as_deref() {
        Some("D0") | None => None,
        Some(_) => dev.attr("power/runtime_status")?,
    };
    Ok(FunctionReading {
        address,
        present: true,
        vendor: dev.hex_attr("vendor")?,
        device: dev.hex_attr("device")?,
        config: dev.bytes("config", CONFIG_BYTES)?,
        power_state,
        runtime_status,
        reset_method: dev.attr("reset_method")?,
        aer: aer(&dev)?,
        link_speed: dev.attr("current_link_speed")?,
        max_link_speed: dev.attr("max_link_speed")?,
        link_width: dev.attr("current_link_width")?,
        max_link_width: dev.attr("max_link_width")?,
    })
}

fn aer(dev: &DeviceDir) -> Result<Option<AerCounts>, SysfsError> {
    let fatal = dev.attr("aer_dev_fatal")?;
    let nonfatal = dev.attr("aer_dev_nonfatal")?;
    Ok(match (fatal, nonfatal) {
        (None, None) => None,
        (f, n) => Some(AerCounts {
            fatal: f.as_deref().map_or(0, aer_total),
            nonfatal: n.as_deref().map_or(0, aer_total),
        }),
    })
}

/// The total of an `aer_dev_*` file: its `TOTAL_ERR_*` line, else the sum of its lines (each
/// `NAME COUNT`, as the kernel's `aer_stats_dev_attr` prints them).
pub fn aer_total(text: &str) -> u64 {
    let count = |l: &str| {
        l.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
    };
    text.lines()
        .find(|l| l.starts_with("TOTAL_ERR_"))
        .and_then(count)
        .unwrap_or_else(|| text.lines().filter_map(count).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aer_totals_come_from_the_total_line_or_the_sum() {
        let k = "Undefined 0\nDLP 2\nSDES 0\nTLP 1\nTOTAL_ERR_FATAL 3\n";
        assert_eq!(aer_total(k), 3);
        assert_eq!(aer_total("DLP 2\nTLP 1\n"), 3);
        assert_eq!(aer_total(""), 0);
    }
}
