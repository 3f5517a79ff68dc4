//! The 16 Binance K-line intervals and their bucket arithmetic.
//!
//! A K-line of interval `i` covers `[t, next(t))` of the trade's own time, in UTC milliseconds:
//! - `1s` … `1d`: fixed lengths, aligned to the Unix epoch (`t = ts - ts mod len`).
//! - `3d`: 3 × 86 400 000 ms aligned to the Unix epoch, i.e. a 3d K-line opens on days whose
//!   number since 1970-01-01 is a multiple of 3 (2024-02-29, 2024-03-03, … open one). This is how
//!   Binance aligns its 3d K-lines.
//! - `1w`: weeks start Monday 00:00 UTC (1970-01-05 is the first Monday after the epoch).
//! - `1M`: calendar months, 1st 00:00 UTC; February and leap years follow the Gregorian calendar.
//!
//! `close_time` is `next_open - 1` ms, Binance's `T`. Pure integer arithmetic, no clock, no I/O.

use std::fmt;
use std::str::FromStr;

/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;
const WEEK_MS: i64 = 7 * DAY_MS;
/// 1970-01-05 (a Monday) in ms since the epoch: week buckets are aligned to it.
const FIRST_MONDAY_MS: i64 = 4 * DAY_MS;

/// A Binance K-line interval. The discriminant is the wire value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Interval {
    S1 = 0,
    M1 = 1,
    M3 = 2,
    M5 = 3,
    M15 = 4,
    M30 = 5,
    H1 = 6,
    H2 = 7,
    H4 = 8,
    H6 = 9,
    H8 = 10,
    H12 = 11,
    D1 = 12,
    D3 = 13,
    W1 = 14,
    Mo1 = 15,
}

/// The interval name is not one of Binance's 16.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown interval {0:?} (expected one of 1s 1m 3m 5m 15m 30m 1h 2h 4h 6h 8h 12h 1d 3d 1w 1M)")]
pub struct IntervalParseError(pub String);

impl Interval {
    /// All intervals, shortest first. Index = wire value.
    pub const ALL: [Interval; 16] = [
        Interval::S1,
        Interval::M1,
        Interval::M3,
        Interval::M5,
        Interval::M15,
        Interval::M30,
        Interval::H1,
        Interval::H2,
        Interval::H4,
        Interval::H6,
        Interval::H8,
        Interval::H12,
        Interval::D1,
        Interval::D3,
        Interval::W1,
        Interval::Mo1,
    ];
    pub const COUNT: usize = 16;

    /// Binance's name (`"1m"`, `"1M"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Interval::S1 => "1s",
            Interval::M1 => "1m",
            Interval::M3 => "3m",
            Interval::M5 => "5m",
            Interval::M15 => "15m",
            Interval::M30 => "30m",
            Interval::H1 => "1h",
            Interval::H2 => "2h",
            Interval::H4 => "4h",
            Interval::H6 => "6h",
            Interval::H8 => "8h",
            Interval::H12 => "12h",
            Interval::D1 => "1d",
            Interval::D3 => "3d",
            Interval::W1 => "1w",
            Interval::Mo1 => "1M",
        }
    }

    /// The interval for a wire value, if valid.
    pub const fn from_u8(v: u8) -> Option<Interval> {
        if (v as usize) < Self::COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    pub const fn index(self) -> usize {
        self as usize
    }

    /// Fixed length in ms, or `None` for the calendar month.
    pub const fn fixed_len_ms(self) -> Option<i64> {
        Some(match self {
            Interval::S1 => 1_000,
            Interval::M1 => 60_000,
            Interval::M3 => 180_000,
            Interval::M5 => 300_000,
            Interval::M15 => 900_000,
            Interval::M30 => 1_800_000,
            Interval::H1 => 3_600_000,
            Interval::H2 => 7_200_000,
            Interval::H4 => 14_400_000,
            Interval::H6 => 21_600_000,
            Interval::H8 => 28_800_000,
            Interval::H12 => 43_200_000,
            Interval::D1 => DAY_MS,
            Interval::D3 => 3 * DAY_MS,
            Interval::W1 => WEEK_MS,
            Interval::Mo1 => return None,
        })
    }

    /// Open time (ms) of the bucket containing `ts_ms`.
    pub fn open_time(self, ts_ms: i64) -> i64 {
        match self {
            Interval::W1 => (ts_ms - FIRST_MONDAY_MS).div_euclid(WEEK_MS) * WEEK_MS + FIRST_MONDAY_MS,
            Interval::Mo1 => {
                let (y, m, _) = civil_from_days(ts_ms.div_euclid(DAY_MS));
                days_from_civil(y, m, 1) * DAY_MS
            }
            other => {
                // Invariant: every interval but 1M has a fixed length.
                let len = other.fixed_len_ms().unwrap_or(1_000);
                ts_ms.div_euclid(len) * len
            }
        }
    }

    /// Open time of the bucket after the one that opens at `open_ms` (must be a bucket start).
    pub fn next_open(self, open_ms: i64) -> i64 {
        match self.fixed_len_ms() {
            Some(len) => open_ms + len,
            None => {
                let (y, m, _) = civil_from_days(open_ms.div_euclid(DAY_MS));
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(ny, nm, 1) * DAY_MS
            }
        }
    }

    /// Binance's `T`: the last millisecond of the bucket opening at `open_ms`.
    pub fn close_time(self, open_ms: i64) -> i64 {
        self.next_open(open_ms) - 1
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Interval {
    type Err = IntervalParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Interval::ALL.iter().copied().find(|i| i.as_str() == s).ok_or_else(|| IntervalParseError(s.to_owned()))
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day number since 1970-01-01 (Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, NaiveDate, TimeZone, Utc};
    use proptest::prelude::*;

    fn ms(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap().timestamp_millis()
    }

    #[test]
    fn names_round_trip_and_wire_values_are_dense() {
        for (n, i) in Interval::ALL.iter().enumerate() {
            assert_eq!(i.index(), n);
            assert_eq!(Interval::from_u8(n as u8), Some(*i));
            assert_eq!(i.as_str().parse::<Interval>().unwrap(), *i);
        }
        assert_eq!(Interval::from_u8(16), None);
        assert!("1H".parse::<Interval>().is_err());
        assert_eq!("1M".parse::<Interval>().unwrap(), Interval::Mo1);
        assert_eq!("1m".parse::<Interval>().unwrap(), Interval::M1);
    }

    #[test]
    fn fixed_intervals_align_to_the_epoch() {
        let t = ms(2024, 3, 15, 13, 47, 29) + 123;
        assert_eq!(Interval::S1.open_time(t), ms(2024, 3, 15, 13, 47, 29));
        assert_eq!(Interval::M1.open_time(t), ms(2024, 3, 15, 13, 47, 0));
        assert_eq!(Interval::M3.open_time(t), ms(2024, 3, 15, 13, 45, 0));
        assert_eq!(Interval::M5.open_time(t), ms(2024, 3, 15, 13, 45, 0));
        assert_eq!(Interval::M15.open_time(t), ms(2024, 3, 15, 13, 45, 0));
        assert_eq!(Interval::M30.open_time(t), ms(2024, 3, 15, 13, 30, 0));
        assert_eq!(Interval::H1.open_time(t), ms(2024, 3, 15, 13, 0, 0));
        assert_eq!(Interval::H2.open_time(t), ms(2024, 3, 15, 12, 0, 0));
        assert_eq!(Interval::H4.open_time(t), ms(2024, 3, 15, 12, 0, 0));
        assert_eq!(Interval::H6.open_time(t), ms(2024, 3, 15, 12, 0, 0));
        assert_eq!(Interval::H8.open_time(t), ms(2024, 3, 15, 8, 0, 0));
        assert_eq!(Interval::H12.open_time(t), ms(2024, 3, 15, 12, 0, 0));
        assert_eq!(Interval::D1.open_time(t), ms(2024, 3, 15, 0, 0, 0));
        assert_eq!(Interval::M1.close_time(ms(2024, 3, 15, 13, 47, 0)), ms(2024, 3, 15, 13, 48, 0) - 1);
    }

    #[test]
    fn three_day_klines_open_on_epoch_days_divisible_by_three() {
        // Day 19782 (2024-02-29) is divisible by 3.
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        let t = ms(2024, 3, 2, 23, 59, 59);
        assert_eq!(Interval::D3.open_time(t), ms(2024, 2, 29, 0, 0, 0));
        assert_eq!(Interval::D3.open_time(ms(2024, 3, 3, 0, 0, 0)), ms(2024, 3, 3, 0, 0, 0));
        assert_eq!(Interval::D3.open_time(0), 0);
    }

    #[test]
    fn weeks_start_monday_midnight_utc() {
        // 2024-03-17 is a Sunday; its week opened Monday 2024-03-11.
        assert_eq!(Interval::W1.open_time(ms(2024, 3, 17, 23, 59, 59) + 999), ms(2024, 3, 11, 0, 0, 0));
        assert_eq!(Interval::W1.open_time(ms(2024, 3, 18, 0, 0, 0)), ms(2024, 3, 18, 0, 0, 0));
        // Before the first Monday after the epoch (1970-01-01 was a Thursday).
        assert_eq!(Interval::W1.open_time(0), ms(1969, 12, 29, 0, 0, 0));
        assert_eq!(Interval::W1.close_time(ms(2024, 3, 11, 0, 0, 0)), ms(2024, 3, 18, 0, 0, 0) - 1);
    }

    #[test]
    fn months_follow_the_calendar_across_february_and_leap_years() {
        assert_eq!(Interval::Mo1.open_time(ms(2024, 2, 29, 12, 0, 0)), ms(2024, 2, 1, 0, 0, 0));
        assert_eq!(Interval::Mo1.close_time(ms(2024, 2, 1, 0, 0, 0)), ms(2024, 3, 1, 0, 0, 0) - 1);
        assert_eq!(Interval::Mo1.close_time(ms(2023, 2, 1, 0, 0, 0)), ms(2023, 3, 1, 0, 0, 0) - 1);
        assert_eq!(Interval::Mo1.next_open(ms(2023, 12, 1, 0, 0, 0)), ms(2024, 1, 1, 0, 0, 0));
        assert_eq!(Interval::Mo1.next_open(ms(2100, 2, 1, 0, 0, 0)), ms(2100, 3, 1, 0, 0, 0));
        assert_eq!(Interval::Mo1.next_open(ms(2000, 2, 1, 0, 0, 0)), ms(2000, 3, 1, 0, 0, 0));
        assert_eq!(Interval::Mo1.open_time(ms(2024, 3, 1, 0, 0, 0) - 1), ms(2024, 2, 1, 0, 0, 0));
        assert_eq!(Interval::Mo1.open_time(ms(2024, 12, 31, 23, 59, 59)), ms(2024, 12, 1, 0, 0, 0));
    }

    proptest! {
        #[test]
        fn every_bucket_contains_its_timestamp_and_tiles_time(ts in -2_000_000_000_000i64..8_000_000_000_000i64, n in 0usize..16) {
            let iv = Interval::ALL[n];
            let open = iv.open_time(ts);
            let next = iv.next_open(open);
            prop_assert!(open <= ts && ts < next);
            prop_assert_eq!(iv.open_time(next), next);
            prop_assert_eq!(iv.open_time(next - 1), open);
            prop_assert_eq!(iv.open_time(open), open);
        }

        #[test]
        fn civil_conversion_matches_chrono(days in -200_000i64..200_000) {
            let date = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap() + chrono::Duration::days(days);
            prop_assert_eq!(civil_from_days(days), (i64::from(date.year()), date.month(), date.day()));
            prop_assert_eq!(days_from_civil(i64::from(date.year()), date.month(), date.day()), days);
        }

        #[test]
        fn weeks_open_on_monday_and_months_on_the_first(ts in 0i64..8_000_000_000_000i64) {
            let w = Utc.timestamp_millis_opt(Interval::W1.open_time(ts)).unwrap();
            prop_assert_eq!(w.weekday(), chrono::Weekday::Mon);
            prop_assert_eq!(w.timestamp_millis() % DAY_MS, 0);
            let m = Utc.timestamp_millis_opt(Interval::Mo1.open_time(ts)).unwrap();
            prop_assert_eq!(m.day(), 1);
            prop_assert_eq!(m.timestamp_millis() % DAY_MS, 0);
        }
    }
}
