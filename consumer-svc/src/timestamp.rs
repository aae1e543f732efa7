//! Event timestamps: RFC 3339 / Python `isoformat()` text to microseconds (pure, no I/O).
//!
//! Nearly every event carries its time in one layout (`2025-11-20T09:15:00.123456+00:00`), and
//! chrono's general parsers cost ~5% of the ingest thread for it. `fixed_layout` reads that
//! layout directly; anything else (or anything it is unsure of, such as a leap second) goes
//! to chrono, so the accepted inputs and their values are chrono's. A property test checks
//! that the two agree.

use crate::events::Micros;

/// Parses RFC 3339 / Python `isoformat()` output, with a `T` or a space between date and time
/// and the offset as `Z`, `+HH:MM`, `+HHMM` or `+HH`; a naive time is taken as UTC.
pub fn parse_iso8601(s: &str) -> Option<Micros> {
    // The fixed layout never has surrounding whitespace, so it is tried before trimming (which
    // scans for Unicode whitespace at both ends).
    fixed_layout(s.as_bytes()).or_else(|| {
        let s = s.trim();
        fixed_layout(s.as_bytes()).or_else(|| with_chrono(s))
    })
}

/// The general path: chrono's RFC 3339 parser, then the naive layouts, then either separator
/// with an offset in any of ISO 8601's forms: `+HH:MM`, `+HHMM` (strftime's `%z`) or `+HH`
/// (RFC 3339 takes only the first, after a `T` or a space).
fn with_chrono(s: &str) -> Option<Micros> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    // `%#z`: chrono's `%:z` (colon optional), minutes optional too.
    ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z"]
        .into_iter()
        .find_map(|fmt| chrono::DateTime::parse_from_str(s, fmt).ok())
        .map(|t| t.timestamp_micros())
}

/// `YYYY-MM-DD(T| )HH:MM:SS[.f{1,9}][Z|(+|-)HH[[:]MM]]`, or `None` to let chrono decide.
fn fixed_layout(b: &[u8]) -> Option<Micros> {
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if b[10] != b'T' && b[10] != b' ' {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let hour = digits(&b[11..13])?;
    let minute = digits(&b[14..16])?;
    let second = digits(&b[17..19])?;
    // Leap seconds and out-of-range fields: chrono's answer (or its rejection).
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut rest = &b[19..];
    let mut micros = 0i64;
    if let Some((b'.', frac)) = rest.split_first() {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 9 {
            return None;
        }
        // Sub-microsecond digits are truncated, as chrono's `timestamp_micros` does.
        let kept = &frac[..n.min(6)];
        micros = digits(kept)? * 10i64.pow(6 - kept.len() as u32);
        rest = &frac[n..];
    }
    let (sign, h, m) = match rest {
        [] | [b'Z'] => (b'+', [b'0'; 2], [b'0'; 2]),
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] | [sign @ (b'+' | b'-'), h1, h2, m1, m2] => {
            (*sign, [*h1, *h2], [*m1, *m2])
        }
        [sign @ (b'+' | b'-'), h1, h2] => (*sign, [*h1, *h2], [b'0'; 2]),
        _ => return None,
    };
    let (h, m) = (digits(&h)?, digits(&m)?);
    if h > 23 || m > 59 {
        return None;
    }
    let offset_secs = if sign == b'-' {
        -(h * 3600 + m * 60)
    } else {
        h * 3600 + m * 60
    };
    // A naive time with the space separator and no offset is chrono's second naive layout;
    // with an offset (after either separator) it is a `%#z` layout: both covered above, same
    // value.
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1_000_000 + micros)
}

/// ASCII digits to a number; `None` on anything else.
fn digits(b: &[u8]) -> Option<i64> {
    b.iter().try_fold(0i64, |n, c| {
        c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
    })
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_producers_layouts_take_the_fixed_path() {
        for (s, want) in [
            ("2025-11-20T09:15:00.000000+00:00", 1_763_630_100_000_000),
            ("2025-11-20T09:15:00Z", 1_763_630_100_000_000),
            ("2025-11-20 09:15:00", 1_763_630_100_000_000),
            ("2025-11-20T10:15:00.5+01:00", 1_763_630_100_500_000),
            ("2025-11-20T09:15:00.1234567Z", 1_763_630_100_123_456),
            ("1969-12-31T23:59:59.5Z", -500_000),
            ("2024-02-29T00:00:00-00:30", 1_709_166_600_000_000),
            ("2025-11-20 09:15:00Z", 1_763_630_100_000_000),
            ("2025-11-20 10:15:00.25+01:00", 1_763_630_100_250_000),
            ("0000-03-01T00:00:00Z", -62_162_035_200_000_000),
            ("2025-11-20T10:15:00+0100", 1_763_630_100_000_000),
            ("2025-11-20 04:15:00.5-05", 1_763_630_100_500_000),
        ] {
            assert_eq!(fixed_layout(s.as_bytes()), Some(want), "{s}");
            assert_eq!(with_chrono(s), Some(want), "chrono disagrees on {s}");
        }
    }

    #[test]
    fn unusual_or_invalid_text_is_left_to_chrono() {
        for s in [
            "2025-02-29T00:00:00Z",            // not a leap year
            "2025-11-20T23:59:60Z",            // leap second
            "2025-11-20T09:15:00.Z",           // empty fraction
            "2025-11-20T09:15:00+010",         // three offset digits
            "2025-11-20T09:15:00+0160",        // offset minutes out of range
            "2025-11-20t09:15:00z",            // lower case
            "2025-11-20T24:00:00Z",            // hour 24
            "2025-11-20T09:15:00.0000000001Z", // ten fraction digits
            "20251120T091500Z",
            "2025-11-20",
            "",
        ] {
            assert_eq!(fixed_layout(s.as_bytes()), None, "{s}");
        }
        assert_eq!(parse_iso8601("2025-02-29T00:00:00Z"), None);
        // Surrounding whitespace is trimmed, for either path.
        for s in [" 2025-11-20T09:15:00Z\n", "\t2025-11-20T09:15:00+00:00 "] {
            assert_eq!(fixed_layout(s.as_bytes()), None, "{s:?}");
            assert_eq!(parse_iso8601(s), Some(1_763_630_100_000_000), "{s:?}");
        }
        assert_eq!(
            parse_iso8601(" 2025-11-20T23:59:60Z "),
            with_chrono("2025-11-20T23:59:60Z")
        );
        assert_eq!(
            parse_iso8601("2025-11-20t09:15:00z"),
            with_chrono("2025-11-20t09:15:00z")
        );
    }

    /// ISO 8601's basic (`+0100`, strftime's `%z`) and hour-only (`+01`) offsets, after either
    /// separator: the `T` forms were rejected while the space forms were read.
    #[test]
    fn offsets_without_a_colon_or_minutes_are_read_after_either_separator() {
        for (offset, secs) in [
            ("+0000", 0),
            ("-0000", 0),
            ("+00", 0),
            ("+0100", 3600),
            ("+01", 3600),
            ("-0530", -19_800),
            ("-05", -18_000),
            ("+2359", 86_340),
        ] {
            for sep in ['T', ' '] {
                for frac in ["", ".25"] {
                    let s = format!("2025-11-20{sep}09:15:00{frac}{offset}");
                    let micros = if frac.is_empty() { 0 } else { 250_000 };
                    let want = 1_763_630_100_000_000 + micros - secs * 1_000_000;
                    assert_eq!(parse_iso8601(&s), Some(want), "{s}");
                    assert_eq!(with_chrono(&s), Some(want), "chrono path: {s}");
                }
            }
        }
        // Still not offsets: a single hour digit, three digits, minutes out of range.
        for offset in ["+1", "+010", "+0160", "+01:60", "+01000"] {
            for sep in ['T', ' '] {
                let s = format!("2025-11-20{sep}09:15:00{offset}");
                assert_eq!(parse_iso8601(&s), None, "{s}");
            }
        }
    }

    fn piece(n: u32, width: usize) -> String {
        format!("{n:0width$}")
    }

    proptest! {
        /// Wherever the fixed path answers, it answers what chrono answers.
        #[test]
        fn agrees_with_chrono(
            year in 0u32..10_000, month in 0u32..14, day in 0u32..33,
            hour in 0u32..26, minute in 0u32..62, second in 0u32..62,
            sep in prop::sample::select(vec!['T', ' ', 't', 'x']),
            frac in prop::option::of("[0-9]{0,11}"),
            zone in prop::sample::select(vec!["", "Z", "z", "+00:00", "-00:00", "+05:30",
                "-11:45", "+23:59", "+24:00", "+0100", "+01:60", "-0530", "+2359", "+2400",
                "+0160", "+05", "-11", "+24", "+1", "+010", "+01:", "+01:3"]),
        ) {
            let mut s = format!(
                "{}-{}-{}{sep}{}:{}:{}",
                piece(year, 4), piece(month, 2), piece(day, 2),
                piece(hour, 2), piece(minute, 2), piece(second, 2)
            );
            if let Some(f) = &frac {
                s.push('.');
                s.push_str(f);
            }
            s.push_str(zone);
            if let Some(fast) = fixed_layout(s.as_bytes()) {
                prop_assert_eq!(Some(fast), with_chrono(&s), "{}", s);
            }
            // And a valid date in the producers' layout is always read by the fixed path.
            let valid = (1..=12).contains(&month)
                && day >= 1
                && i64::from(day) <= days_in_month(i64::from(year), i64::from(month))
                && hour < 24 && minute < 60 && second < 60
                && sep == 'T' && frac.as_ref().is_none_or(|f| (1..=9).contains(&f.len()))
                && matches!(zone, "Z" | "+00:00" | "-00:00" | "+05:30" | "-11:45" | "+23:59"
                    | "+0100" | "-0530" | "+2359" | "+05" | "-11");
            if valid {
                prop_assert!(fixed_layout(s.as_bytes()).is_some(), "{}", s);
            }
        }
    }
}
