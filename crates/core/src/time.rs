//! Time as Unix milliseconds, and the two wire spellings of it.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn to_dt(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `2016-09-01T02:05:14Z` (images, members).
pub fn fmt_seconds(ms: i64) -> String {
    let dt = to_dt(ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        dt.year(),
        dt.month() as u8,
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

/// `2024-11-06T06:19:43.195Z` (jobs).
pub fn fmt_millis(ms: i64) -> String {
    let dt = to_dt(ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        dt.month() as u8,
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

/// Parses `yyyy-MM-ddThh:mm:ssZ`, `yyyy-MM-dd hh:mm:ss` or full RFC 3339 into Unix ms.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(dt) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some((dt.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let normalized = if s.len() == 19 && s.as_bytes().get(10) == Some(&b' ') {
        format!("{}T{}Z", &s[..10], &s[11..])
    } else if s.len() == 19 && s.as_bytes().get(10) == Some(&b'T') {
        format!("{s}Z")
    } else {
        return None;
    };
    OffsetDateTime::parse(&normalized, &Rfc3339)
        .ok()
        .map(|dt| (dt.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        let ms = parse_time("2018-10-28T10:00:00Z").unwrap();
        assert_eq!(fmt_seconds(ms), "2018-10-28T10:00:00Z");
        assert_eq!(parse_time("2018-10-28 10:00:00"), Some(ms));
        assert_eq!(fmt_millis(ms + 195), "2018-10-28T10:00:00.195Z");
        assert_eq!(parse_time("yesterday"), None);
    }
}
