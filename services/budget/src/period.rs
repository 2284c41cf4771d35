//! When spend resets: calendar periods in an IANA time zone, or rolling windows.
//!
//! Spend is kept per *period key* derived from the period itself, so a reset needs no job and no
//! race: at local midnight the next reservation simply computes a new key and finds it empty.
//!
//! - **Calendar** periods start at local midnight (daily), midnight on Monday (weekly) or on the
//!   first of the month (monthly) in the budget's time zone, and the key is the unit plus the
//!   start as a Unix timestamp. Where DST skips midnight, the period starts at the first local
//!   time that exists after it.
//! - **Rolling** windows are kept in [`ROLLING_BUCKETS`] buckets of `window / 60` (at least
//!   [`MIN_BUCKET`], rounded up to a millisecond). Spend in the window is the sum of the buckets
//!   that overlap it, so spend leaves the window up to one bucket *late* (conservative: a budget
//!   is never freed early). A 24 h window has 24 min buckets; a 1 h window, 1 min buckets.

use std::{fmt, str::FromStr, time::Duration};

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// Number of buckets of a rolling window.
pub const ROLLING_BUCKETS: i64 = 60;
/// Smallest bucket of a rolling window.
pub const MIN_BUCKET: Duration = Duration::from_secs(1);
/// Shortest rolling window accepted.
pub const MIN_ROLLING_WINDOW: Duration = Duration::from_secs(1);
/// Longest rolling window accepted (about a year).
pub const MAX_ROLLING_WINDOW: Duration = Duration::from_secs(366 * 24 * 3600);

/// A calendar unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarUnit {
    /// Resets at local midnight.
    Daily,
    /// Resets at local midnight on Monday.
    Weekly,
    /// Resets at local midnight on the first of the month.
    Monthly,
}

impl CalendarUnit {
    /// One-letter code used in keys and stored budgets.
    pub fn code(self) -> &'static str {
        match self {
            Self::Daily => "d",
            Self::Weekly => "w",
            Self::Monthly => "m",
        }
    }

    /// The unit of a one-letter code.
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "d" => Some(Self::Daily),
            "w" => Some(Self::Weekly),
            "m" => Some(Self::Monthly),
            _ => None,
        }
    }
}

/// When a budget's spend resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// A calendar period in a time zone.
    Calendar {
        /// The unit.
        unit: CalendarUnit,
        /// The time zone.
        tz: Tz,
    },
    /// A rolling window.
    Rolling {
        /// Its length.
        window: Duration,
    },
}

/// The period that contains a given instant, and where its spend is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Identifies the counter within the scope (`d1735689600`, `r60000x60`, ...).
    pub counter_id: String,
    /// Start of the period (rolling: start of the oldest bucket in the window), Unix ms.
    pub start_ms: i64,
    /// End of the period (rolling: end of the oldest bucket, when its spend leaves), Unix ms.
    pub end_ms: i64,
    /// Bucket width in ms for a rolling window; 0 for a calendar period.
    pub bucket_ms: i64,
    /// Number of buckets for a rolling window; 0 for a calendar period.
    pub buckets: i64,
}

/// A time zone name that is not in the IANA database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown IANA time zone {0:?}")]
pub struct UnknownTimeZone(pub String);

/// Parses an IANA time zone name; empty means UTC.
pub fn parse_tz(name: &str) -> Result<Tz, UnknownTimeZone> {
    if name.is_empty() {
        return Ok(Tz::UTC);
    }
    Tz::from_str(name).map_err(|_| UnknownTimeZone(name.to_string()))
}

impl Period {
    /// The period containing `now_ms` (Unix milliseconds).
    pub fn window_at(&self, now_ms: i64) -> Window {
        match *self {
            Period::Calendar { unit, tz } => {
                let now = DateTime::<Utc>::from_timestamp_millis(now_ms).unwrap_or_default();
                let today = now.with_timezone(&tz).date_naive();
                let first = match unit {
                    CalendarUnit::Daily => today,
                    CalendarUnit::Weekly => today
                        .checked_sub_days(Days::new(u64::from(
                            today.weekday().num_days_from_monday(),
                        )))
                        .unwrap_or(today),
                    CalendarUnit::Monthly => today.with_day(1).unwrap_or(today),
                };
                let next = match unit {
                    CalendarUnit::Daily => first.checked_add_days(Days::new(1)),
                    CalendarUnit::Weekly => first.checked_add_days(Days::new(7)),
                    CalendarUnit::Monthly => first.checked_add_months(Months::new(1)),
                }
                .unwrap_or(first);
                let start_ms = local_midnight_ms(tz, first);
                let end_ms = local_midnight_ms(tz, next).max(start_ms + 1);
                Window {
                    counter_id: format!("{}{}", unit.code(), start_ms / 1000),
                    start_ms,
                    end_ms,
                    bucket_ms: 0,
                    buckets: 0,
                }
            }
            Period::Rolling { window } => {
                let (bucket_ms, buckets) = rolling_buckets(window);
                let current = now_ms.div_euclid(bucket_ms);
                let oldest = current - buckets + 1;
                Window {
                    counter_id: format!("r{bucket_ms}x{buckets}"),
                    start_ms: oldest * bucket_ms,
                    end_ms: (oldest + 1) * bucket_ms,
                    bucket_ms,
                    buckets,
                }
            }
        }
    }
}

/// Bucket width (ms) and count of a rolling window of length `window`.
pub fn rolling_buckets(window: Duration) -> (i64, i64) {
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1);
    let min_bucket = i64::try_from(MIN_BUCKET.as_millis()).unwrap_or(1000);
    let bucket_ms = ((window_ms + ROLLING_BUCKETS - 1) / ROLLING_BUCKETS).max(min_bucket);
    let buckets = (window_ms + bucket_ms - 1) / bucket_ms;
    (bucket_ms, buckets.max(1))
}

/// Unix ms of local midnight on `date` in `tz`, or of the first local time after it when a DST
/// gap skips midnight.
fn local_midnight_ms(tz: Tz, date: NaiveDate) -> i64 {
    let Some(midnight) = date.and_hms_opt(0, 0, 0) else {
        return 0;
    };
    // DST gaps are at most a few hours; look in one-minute steps up to a day.
    for minutes in 0..=24 * 60 {
        let local = midnight + chrono::Duration::minutes(minutes);
        if let Some(instant) = tz.from_local_datetime(&local).earliest() {
            return instant.timestamp_millis();
        }
    }
    midnight.and_utc().timestamp_millis()
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Period::Calendar { unit, tz } => write!(f, "{unit:?} in {tz}"),
            Period::Rolling { window } => write!(f, "rolling {window:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .map(|t| t.timestamp_millis())
            .unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
    }

    fn calendar(unit: CalendarUnit, tz: &str) -> Period {
        Period::Calendar {
            unit,
            tz: parse_tz(tz).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    #[test]
    fn daily_in_utc() {
        let w = calendar(CalendarUnit::Daily, "").window_at(ms("2025-03-14T15:09:26Z"));
        assert_eq!(w.start_ms, ms("2025-03-14T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2025-03-15T00:00:00Z"));
        assert_eq!(
            w.counter_id,
            format!("d{}", ms("2025-03-14T00:00:00Z") / 1000)
        );
    }

    #[test]
    fn daily_in_a_time_zone_follows_local_midnight() {
        let paris = calendar(CalendarUnit::Daily, "Europe/Paris");
        // 23:30 UTC on the 14th is 00:30 on the 15th in Paris (UTC+1 in March before DST).
        let w = paris.window_at(ms("2025-03-14T23:30:00Z"));
        assert_eq!(w.start_ms, ms("2025-03-15T00:00:00+01:00"));
        assert_eq!(w.end_ms, ms("2025-03-16T00:00:00+01:00"));
        // The day DST starts (30 March 2025) is 23 hours long.
        let w = paris.window_at(ms("2025-03-30T12:00:00Z"));
        assert_eq!(w.end_ms - w.start_ms, 23 * 3600 * 1000);
    }

    #[test]
    fn weekly_starts_on_monday() {
        // Sunday 16 March 2025 in New York belongs to the week of Monday 10 March.
        let w = calendar(CalendarUnit::Weekly, "America/New_York")
            .window_at(ms("2025-03-16T20:00:00-04:00"));
        assert_eq!(w.start_ms, ms("2025-03-10T00:00:00-04:00"));
        assert_eq!(w.end_ms, ms("2025-03-17T00:00:00-04:00"));
        assert!(w.counter_id.starts_with('w'));
    }

    #[test]
    fn monthly_handles_month_lengths_and_year_end() {
        let utc = calendar(CalendarUnit::Monthly, "UTC");
        let w = utc.window_at(ms("2024-02-29T23:59:59Z"));
        assert_eq!(w.start_ms, ms("2024-02-01T00:00:00Z"));
        assert_eq!(w.end_ms, ms("2024-03-01T00:00:00Z"));
        let w = utc.window_at(ms("2024-12-31T12:00:00Z"));
        assert_eq!(w.end_ms, ms("2025-01-01T00:00:00Z"));
        // Just before and at the reset: different keys.
        let before = utc.window_at(ms("2025-01-31T23:59:59.999Z"));
        let after = utc.window_at(ms("2025-02-01T00:00:00Z"));
        assert_ne!(before.counter_id, after.counter_id);
        assert_eq!(before.end_ms, after.start_ms);
    }

    #[test]
    fn a_dst_gap_at_midnight_starts_the_day_when_it_exists() {
        // Santiago: clocks went from 24:00 to 01:00 on 8 September 2024.
        let w = calendar(CalendarUnit::Daily, "America/Santiago")
            .window_at(ms("2024-09-08T12:00:00-03:00"));
        assert_eq!(w.start_ms, ms("2024-09-08T01:00:00-03:00"));
    }

    #[test]
    fn rolling_windows_have_sixty_buckets_of_at_least_a_second() {
        assert_eq!(rolling_buckets(Duration::from_secs(3600)), (60_000, 60));
        assert_eq!(rolling_buckets(Duration::from_secs(10)), (1000, 10));
        assert_eq!(rolling_buckets(Duration::from_millis(61_000)), (1017, 60));
        let rolling = Period::Rolling {
            window: Duration::from_secs(3600),
        };
        let now = ms("2025-03-14T15:09:26Z");
        let w = rolling.window_at(now);
        assert_eq!(w.counter_id, "r60000x60");
        // The window covers the current minute and the 59 before it.
        assert_eq!(w.start_ms, ms("2025-03-14T14:10:00Z"));
        assert_eq!(w.end_ms, ms("2025-03-14T14:11:00Z"));
        assert!(now - w.start_ms < 3600 * 1000);
    }

    #[test]
    fn unknown_time_zones_are_refused() {
        assert!(parse_tz("Mars/Olympus").is_err());
        assert_eq!(parse_tz(""), Ok(Tz::UTC));
    }
}
