//! Entry times: unix milliseconds in the log, RFC 3339 (UTC) for people.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A moment, in milliseconds since the Unix epoch (UTC). Stored in the log as a plain integer;
/// displayed as RFC 3339 with milliseconds, e.g. `2025-01-31T12:00:00.250Z`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current wall-clock time (a clock set before 1970 reads as the epoch).
    pub fn now() -> Self {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self(millis)
    }

    /// Milliseconds since the epoch.
    pub fn unix_millis(self) -> u64 {
        self.0
    }

    /// Parses what a person types for "since": RFC 3339 (`2025-01-31T12:00:00Z`, fractional
    /// seconds and `+01:00` offsets accepted), a bare date (`2025-01-31`, midnight UTC), or
    /// unix seconds (`1738324800`).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        let invalid = || {
            Error::invalid(
                "time",
                format!("{text:?}: use RFC 3339 (2025-01-31T12:00:00Z), a date, or unix seconds"),
            )
        };
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            let seconds: u64 = text.parse().map_err(|_| invalid())?;
            return seconds.checked_mul(1000).map(Self).ok_or_else(invalid);
        }
        parse_rfc3339(text).map(Self).ok_or_else(invalid)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0 % 1000;
        let seconds = self.0 / 1000;
        let (days, in_day) = (seconds / 86_400, seconds % 86_400);
        // A u64 of milliseconds spans far fewer than i64::MAX days.
        let (year, month, day) = civil_from_days(i64::try_from(days).unwrap_or(i64::MAX));
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            in_day / 3600,
            in_day / 60 % 60,
            in_day % 60
        )
    }
}

/// `YYYY-MM-DD[(T|t| )HH:MM:SS[.frac](Z|z|±HH:MM)]` to unix milliseconds; `None` if malformed
/// or before 1970.
fn parse_rfc3339(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = bytes.get(range)?;
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    if bytes.len() < 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let mut seconds = days.checked_mul(86_400)?;
    let mut millis = 0i64;
    if bytes.len() > 10 {
        if !matches!(bytes[10], b'T' | b't' | b' ') || bytes.len() < 19 {
            return None;
        }
        if bytes[13] != b':' || bytes[16] != b':' {
            return None;
        }
        let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
        if hour > 23 || minute > 59 || second > 60 {
            return None;
        }
        seconds += i64::from(hour * 3600 + minute * 60 + second);
        let mut rest = &bytes[19..];
        if let Some(fraction) = rest.strip_prefix(b".") {
            let len = fraction.iter().take_while(|b| b.is_ascii_digit()).count();
            if len == 0 {
                return None;
            }
            // Only the first three digits count: the log keeps milliseconds.
            for (place, digit) in fraction[..len.min(3)].iter().enumerate() {
                millis += i64::from(digit - b'0') * [100, 10, 1][place];
            }
            rest = &fraction[len..];
        }
        match rest {
            [b'Z' | b'z'] => {}
            [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
                let two = |a: u8, b: u8| -> Option<i64> {
                    (a.is_ascii_digit() && b.is_ascii_digit())
                        .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
                };
                let offset = two(*h1, *h2)? * 3600 + two(*m1, *m2)? * 60;
                // Local time minus its offset from UTC is UTC.
                seconds -= if *sign == b'+' { offset } else { -offset };
            }
            _ => return None,
        }
    }
    let total = seconds.checked_mul(1000)?.checked_add(millis)?;
    u64::try_from(total).ok()
}

fn is_leap(year: u32) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from(if month > 2 { month - 3 } else { month + 9 });
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both are small by construction (1..=12 and 1..=31).
    (year, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_rfc3339_utc_with_millis() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp(1_738_324_800_250).to_string(),
            "2025-01-31T12:00:00.250Z"
        );
        assert_eq!(
            Timestamp(951_782_400_000).to_string(),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn parses_rfc3339_dates_and_unix_seconds() {
        assert_eq!(
            Timestamp::parse("2025-01-31T12:00:00.25Z").unwrap(),
            Timestamp(1_738_324_800_250)
        );
        assert_eq!(
            Timestamp::parse("2025-01-31T13:30:00+01:30").unwrap(),
            Timestamp(1_738_324_800_000)
        );
        assert_eq!(
            Timestamp::parse("2025-01-31").unwrap(),
            Timestamp(1_738_281_600_000)
        );
        assert_eq!(
            Timestamp::parse("1738324800").unwrap(),
            Timestamp(1_738_324_800_000)
        );
        for bad in [
            "",
            "yesterday",
            "2025-02-30",
            "2025-13-01",
            "2025-01-31T25:00:00Z",
            "2025-01-31T12:00:00",
            "1969-12-31T00:00:00Z",
            "99999999999999999999",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn display_and_parse_round_trip() {
        for millis in [0, 1, 86_399_999, 1_700_000_000_123, 4_102_444_800_000] {
            let shown = Timestamp(millis).to_string();
            assert_eq!(
                Timestamp::parse(&shown).unwrap(),
                Timestamp(millis),
                "{shown}"
            );
        }
    }
}
