//! `%START_TIME%` as Envoy writes it: UTC, `2026-12-07T18:30:05.123Z` by default, or a
//! strftime-like format (`%Y %m %d %H %M %S %s %z %Z %%`, and Envoy's `%E<n>S` / `%<n>f`
//! for fractional seconds).

use std::time::{SystemTime, UNIX_EPOCH};

const DEFAULT: &str = "%Y-%m-%dT%H:%M:%E3SZ";

pub fn format(t: SystemTime, fmt: Option<&str>) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let nanos = since.subsec_nanos();
    let (y, mo, d) = civil(secs.div_euclid(86_400) as i64);
    let sod = secs % 86_400;
    let (h, mi, s) = (sod / 3600, sod % 3600 / 60, sod % 60);
    let mut out = String::with_capacity(32);
    let mut chars = fmt.unwrap_or(DEFAULT).chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // `%E3S` / `%3f`: a digit count for the fraction.
        let mut digits = None;
        if chars.peek() == Some(&'E') {
            chars.next();
        }
        if let Some(n) = chars.peek().and_then(|c| c.to_digit(10)) {
            chars.next();
            digits = Some(n as usize);
        }
        let frac = |n: usize| format!("{:09}", nanos)[..n.min(9)].to_string();
        match chars.next() {
            Some('Y') => out.push_str(&format!("{y:04}")),
            Some('m') => out.push_str(&format!("{mo:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => {
                out.push_str(&format!("{s:02}"));
                if let Some(n) = digits.filter(|n| *n > 0) {
                    out.push('.');
                    out.push_str(&frac(n));
                }
            }
            Some('f') => out.push_str(&frac(digits.unwrap_or(9))),
            Some('s') => out.push_str(&secs.to_string()),
            Some('z') => out.push_str("+0000"),
            Some('Z') => out.push_str("UTC"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn start_time_formats() {
        let t = UNIX_EPOCH + Duration::new(1_796_667_005, 123_456_789);
        assert_eq!(format(t, None), "2026-12-07T18:10:05.123Z");
        assert_eq!(format(t, Some("%s")), "1796667005");
        assert_eq!(format(t, Some("%Y/%m/%d %H:%M:%S.%6f %z")), "2026/12/07 18:10:05.123456 +0000");
        assert_eq!(format(UNIX_EPOCH + Duration::from_secs(951_782_400), None), "2000-02-29T00:00:00.000Z");
    }
}
