//! Owners' limits — GPUs held at once and GPU-hours per calendar period — decided purely from
//! holdings and the usage ledger's totals, the same way for `attach`, `transform`, the prepare
//! hook and the agent's API.

use time::{Date, Duration, OffsetDateTime, Time};

use crate::alloc::plan::{check_limit, Holdings};
use crate::alloc::AllocError;
use crate::config::{GpupassConfig, LimitConfig, Period};
use crate::host::discover::Inventory;
use crate::model::PciAddress;
use crate::usage::{summarize, Ledger, UsageError};

/// Unix seconds at which the period containing `now` began (UTC).
pub fn period_start(period: Period, now: u64) -> u64 {
    let Ok(t) = OffsetDateTime::from_unix_timestamp(i64::try_from(now).unwrap_or(i64::MAX)) else {
        return 0;
    };
    let date = t.date();
    let first: Date = match period {
        Period::Day => date,
        Period::Week => date - Duration::days(i64::from(date.weekday().number_days_from_monday())),
        Period::Month => date.replace_day(1).unwrap_or(date),
    };
    let start = first
        .with_time(Time::MIDNIGHT)
        .assume_utc()
        .unix_timestamp();
    u64::try_from(start).unwrap_or(0)
}

/// `2026-11-01T00:00:00Z`, for messages.
pub fn rfc3339(ts: u64) -> String {
    OffsetDateTime::from_unix_timestamp(i64::try_from(ts).unwrap_or(0))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ts.to_string())
}

/// The owner's limit, when the config has one.
pub fn owner_limit<'a>(
    config: &'a GpupassConfig,
    owner: Option<&'a str>,
) -> Option<(&'a str, &'a LimitConfig)> {
    let owner = owner?;
    config.limits.get(owner).map(|l| (owner, l))
}

/// GPU-seconds used by `owner` in the current period: `(period start, seconds)`.
pub fn used_in_period(
    ledger: &Ledger,
    owner: &str,
    period: Period,
    now: u64,
) -> Result<(u64, u64), UsageError> {
    let since = period_start(period, now);
    let report = summarize(&ledger.read()?, since, now);
    Ok((since, report.owners.get(owner).copied().unwrap_or(0)))
}

/// What an owner has used, for [`check`]: `None` when GPU-hours are not limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodUse {
    /// Period start, unix seconds.
    pub since: u64,
    /// GPU-seconds used since then.
    pub gpu_seconds: u64,
}

/// Reads the ledger when the owner's GPU-hours are limited.
pub fn period_use(
    limit: &LimitConfig,
    owner: &str,
    ledger: Option<&Ledger>,
    now: u64,
) -> Result<Option<PeriodUse>, UsageError> {
    match (limit.max_gpu_hours, ledger) {
        (Some(_), Some(l)) => {
            let (since, gpu_seconds) = used_in_period(l, owner, limit.period, now)?;
            Ok(Some(PeriodUse { since, gpu_seconds }))
        }
        _ => Ok(None),
    }
}

/// Refuses when `domain` (owned by `owner`) taking `adding` (GPU addresses) would pass the
/// owner's limits: more GPUs at once than `max_gpus` (its own GPUs count once), or any GPU at
/// all once `max_gpu_hours` of the period are used up (pure).
#[allow(clippy::too_many_arguments)]
pub fn check(
    inv: &Inventory,
    holdings: &Holdings,
    domain: &str,
    owner: &str,
    limit: &LimitConfig,
    adding: &[PciAddress],
    used: Option<PeriodUse>,
    owner_of: &dyn Fn(&str) -> Option<String>,
) -> Result<(), AllocError> {
    if let Some(max) = limit.max_gpus {
        check_limit(inv, holdings, domain, owner, max, adding, owner_of)?;
    }
    if let (Some(max_hours), Some(used)) = (limit.max_gpu_hours, used) {
        // Seconds, so that 0.5 h is 1800 s exactly and no float compares to a float.
        let max_secs = (max_hours * 3600.0).round() as u64;
        if !adding.is_empty() && used.gpu_seconds >= max_secs {
            return Err(AllocError::HoursExceeded {
                owner: owner.to_owned(),
                max_hours,
                used_hours: used.gpu_seconds as f64 / 3600.0,
                period: limit.period.as_str(),
                since: rfc3339(used.since),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_starts_are_calendar_utc() {
        // 2026-11-21T07:28:29Z is a Saturday.
        let now = 1_795_246_109;
        assert_eq!(rfc3339(now), "2026-11-21T07:28:29Z");
        assert_eq!(
            rfc3339(period_start(Period::Day, now)),
            "2026-11-21T00:00:00Z"
        );
        assert_eq!(
            rfc3339(period_start(Period::Week, now)),
            "2026-11-16T00:00:00Z"
        );
        assert_eq!(
            rfc3339(period_start(Period::Month, now)),
            "2026-11-01T00:00:00Z"
        );
        // A Monday is its own week's start.
        let monday = period_start(Period::Week, now);
        assert_eq!(period_start(Period::Week, monday + 5), monday);
    }

    #[test]
    fn hours_limit_refuses_only_new_gpus_once_used_up() {
        let inv = crate::host::discover::Inventory::default();
        let limit = LimitConfig {
            max_gpus: None,
            max_gpu_hours: Some(0.5),
            period: Period::Day,
        };
        let g: PciAddress = "0000:18:00.0".parse().unwrap();
        let none = |_: &str| None;
        let under = PeriodUse {
            since: 0,
            gpu_seconds: 1799,
        };
        let at = PeriodUse {
            since: 0,
            gpu_seconds: 1800,
        };
        let h = Holdings::default();
        assert!(check(&inv, &h, "vm", "acct", &limit, &[g], Some(under), &none).is_ok());
        assert!(check(&inv, &h, "vm", "acct", &limit, &[], Some(at), &none).is_ok());
        let err = check(&inv, &h, "vm", "acct", &limit, &[g], Some(at), &none).unwrap_err();
        assert_eq!(err.exit_code(), 15);
        assert_eq!(
            err.to_string(),
            "owner 'acct' may use 0.5 GPU-hour(s) per day and has used 0.50 since 1970-01-01T00:00:00Z; no more GPUs until the next day"
        );
    }
}
