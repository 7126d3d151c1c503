//! Values as they cross between the binding and the backends, and the text encodings
//! SQLAlchemy uses for them on SQLite.

use std::fmt::Write;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};

/// One column value. Timestamps are always UTC; JSON is kept as its encoded text. The
/// five models use no floats, bytes or arrays; the DB-API (any table) does. An array is a
/// PostgreSQL array, nested one level per dimension.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Bytes(Vec<u8>),
    Text(String),
    Timestamp(DateTime<Utc>),
    Json(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

/// The current UTC time, truncated to the microseconds both backends keep.
pub fn now_micros() -> DateTime<Utc> {
    let t = Utc::now();
    t - chrono::TimeDelta::nanoseconds((t.timestamp_subsec_nanos() % 1000).into())
}

/// SQLAlchemy's SQLite storage format for `DATETIME` / `TIMESTAMP`: always microseconds,
/// no offset. Fixed width, so text comparison in SQL orders it as time.
/// Written digit by digit (every inserted row has two or three of these); years outside
/// 0..=9999 and leap seconds, which no caller produces in practice, go through chrono.
pub fn format_sqlite_timestamp(t: &DateTime<Utc>) -> String {
    let nanos = t.timestamp_subsec_nanos();
    let year = t.year();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return t.format("%Y-%m-%d %H:%M:%S%.6f").to_string();
    }
    let mut b = *b"0000-00-00 00:00:00.000000";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    put(20, 6, nanos / 1000);
    b.iter().map(|&c| char::from(c)).collect()
}

/// Parse the timestamp text found in a SQLite column: SQLAlchemy's format, SQLite's own
/// `CURRENT_TIMESTAMP` (no fraction), ISO 8601 with `T`, and an optional `Z` / `±HH:MM`
/// offset (converted to UTC). Text without an offset is UTC.
pub fn parse_sqlite_timestamp(s: &str) -> Option<DateTime<Utc>> {
    parse_fixed(s.as_bytes()).or_else(|| parse_general(s))
}

/// The two forms nearly every row holds, read byte by byte: `YYYY-MM-DD HH:MM:SS` and the
/// same with `.ffffff` (what SQLAlchemy and this package write, and SQLite's own
/// CURRENT_TIMESTAMP). Every read timestamp goes through here.
fn parse_fixed(b: &[u8]) -> Option<DateTime<Utc>> {
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b.get(r)?.iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let micros = match b.len() {
        19 => 0,
        26 if b[19] == b'.' => num(20..26)?,
        _ => return None,
    };
    if b[4] != b'-' || b[7] != b'-' || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    let time = NaiveTime::from_hms_micro_opt(num(11..13)?, num(14..16)?, num(17..19)?, micros)?;
    Some(NaiveDateTime::new(date, time).and_utc())
}

fn parse_general(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    let (body, offset_secs) = split_offset(s)?;
    let (date, time) = match body.find([' ', 'T']) {
        Some(i) => (&body[..i], &body[i + 1..]),
        None => (body, "00:00:00"),
    };
    let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    let time = NaiveTime::parse_from_str(time, "%H:%M:%S%.f")
        .or_else(|_| NaiveTime::parse_from_str(time, "%H:%M"))
        .ok()?;
    let naive = NaiveDateTime::new(date, time)
        .checked_sub_signed(chrono::Duration::seconds(offset_secs))?;
    Some(naive.and_utc())
}

fn split_offset(s: &str) -> Option<(&str, i64)> {
    if let Some(body) = s.strip_suffix('Z') {
        return Some((body, 0));
    }
    // An offset starts with + or - after the time part (the date has '-' too).
    let time_start = s.find([' ', 'T']).map(|i| i + 1).unwrap_or(s.len());
    match s[time_start..].rfind(['+', '-']) {
        Some(rel) => {
            let i = time_start + rel;
            let sign = if s.as_bytes()[i] == b'-' { -1 } else { 1 };
            let off = &s[i + 1..];
            let (h, m) = match off.split_once(':') {
                Some((h, m)) => (h, m),
                None if off.len() == 4 => (off.get(..2)?, off.get(2..)?),
                None => (off, "0"),
            };
            // Real offsets are under a day; anything else is not a timestamp.
            let (h, m) = (h.parse::<i64>().ok()?, m.parse::<i64>().ok()?);
            if !(0..24).contains(&h) || !(0..60).contains(&m) {
                return None;
            }
            let secs = h * 3600 + m * 60;
            Some((&s[..i], sign * secs))
        }
        None => Some((s, 0)),
    }
}

/// A JSON string with `ensure_ascii`: printable ASCII as is, the rest as `\uXXXX`
/// (lowercase hex, surrogate pairs beyond the BMP), and the short escapes json uses.
pub fn json_string(s: &str, out: &mut String) {
    out.reserve(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn malformed_offsets_and_dates_are_not_timestamps() {
        for s in [
            "2026-02-11 09:05:07+1é1",
            "2026-02-11 09:05:07é+1é",
            "2026-02-11 09:05:07+9999999999999:00",
            "2026-02-11 09:05:07-99:00",
            "2026-02-11 09:05:07+05:99",
            "+262143-12-31 23:59:59-23:00",
            "-262143-01-01 00:00:00+23:00",
        ] {
            assert_eq!(parse_sqlite_timestamp(s), None, "{s}");
        }
        assert!(parse_sqlite_timestamp("2026-02-11 09:05:07+0530").is_some());
    }

    #[test]
    fn sqlalchemy_format_round_trips() {
        let t = Utc.with_ymd_and_hms(2026, 2, 11, 9, 5, 7).unwrap()
            + chrono::Duration::microseconds(42);
        let s = format_sqlite_timestamp(&t);
        assert_eq!(s, "2026-02-11 09:05:07.000042");
        assert_eq!(parse_sqlite_timestamp(&s), Some(t));
    }

    #[test]
    fn sqlite_current_timestamp_and_iso_forms_parse() {
        let t = Utc.with_ymd_and_hms(2026, 2, 11, 9, 5, 7).unwrap();
        assert_eq!(parse_sqlite_timestamp("2026-02-11 09:05:07"), Some(t));
        assert_eq!(parse_sqlite_timestamp("2026-02-11T09:05:07Z"), Some(t));
        assert_eq!(parse_sqlite_timestamp("2026-02-11T11:05:07+02:00"), Some(t));
        assert_eq!(
            parse_sqlite_timestamp("2026-02-11 04:05:07.000000-05:00"),
            Some(t)
        );
        assert_eq!(parse_sqlite_timestamp("not a time"), None);
    }

    #[test]
    fn extreme_years_round_trip() {
        for t in [
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap()
                + chrono::Duration::microseconds(999_999),
        ] {
            assert_eq!(
                parse_sqlite_timestamp(&format_sqlite_timestamp(&t)),
                Some(t)
            );
        }
    }

    #[test]
    fn digit_writer_agrees_with_chrono() {
        let start = Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 58).unwrap();
        for step in 0..5000i64 {
            let t = start + chrono::Duration::microseconds(step * 987_654_321 + step);
            assert_eq!(
                format_sqlite_timestamp(&t),
                t.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
            );
        }
    }

    #[test]
    fn fixed_width_text_orders_as_time() {
        let a = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let b = a + chrono::Duration::microseconds(1);
        assert!(format_sqlite_timestamp(&a) < format_sqlite_timestamp(&b));
    }
}
