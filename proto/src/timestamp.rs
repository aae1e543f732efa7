//! Timestamps of typed rows, decoded fast: db-svc writes every timestamp as RFC 3339 in UTC
//! (`2026-12-03T15:04:05.123456Z`), and chrono's own `Deserialize` parses that with its
//! general, relaxed RFC 3339 parser, the costliest part of decoding a typed row. Here that
//! one form is read by hand; anything else (an offset, a leap second, a malformed text) goes
//! to chrono, so what is accepted and how it is read are exactly chrono's.
//!
//! ```
//! #[derive(serde::Deserialize)]
//! struct Action {
//!     #[serde(with = "omnibus_proto::timestamp")]
//!     at: chrono::DateTime<chrono::Utc>,
//!     // `default`: a row without the column reads as None, as a plain Option would.
//!     #[serde(default, with = "omnibus_proto::timestamp::option")]
//!     created_at: Option<chrono::DateTime<chrono::Utc>>,
//! }
//! ```

use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserializer, Serialize, Serializer, de};

/// Parses an RFC 3339 timestamp as chrono's `DateTime<Utc>` `FromStr` does.
pub fn parse(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    match utc_form(text.as_bytes()) {
        Some(t) => Ok(t),
        None => text.parse(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`, or None for any other text.
fn utc_form(b: &[u8]) -> Option<DateTime<Utc>> {
    if b.len() < 20 || b.len() > 30 || b[b.len() - 1] != b'Z' {
        return None;
    }
    let num = |at: usize, len: usize| -> Option<u32> {
        b.get(at..at + len)?.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(at, c)| b[at] != c) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let nanos = match b.len() - 1 - 19 {
        0 => 0,
        // A '.' and 1 to 9 digits, scaled to nanoseconds.
        n if b[19] == b'.' && (2..=10).contains(&n) => num(20, n - 1)? * 10u32.pow(10 - n as u32),
        _ => return None,
    };
    let date = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?;
    // A leap second (60) is left to chrono.
    Some(
        date.and_hms_nano_opt(hour, minute, second, nanos)?
            .and_utc(),
    )
}

/// `#[serde(with = "omnibus_proto::timestamp")]` on a `DateTime<Utc>`.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    d.deserialize_str(TimestampVisitor)
}

/// Serializes as chrono does (RFC 3339), so the attribute can sit on types that go both ways.
pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    t.serialize(s)
}

struct TimestampVisitor;

impl de::Visitor<'_> for TimestampVisitor {
    type Value = DateTime<Utc>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an RFC 3339 timestamp")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        parse(text).map_err(E::custom)
    }
}

/// `#[serde(default, with = "omnibus_proto::timestamp::option")]` on an
/// `Option<DateTime<Utc>>`: null is None.
pub mod option {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        d.deserialize_option(OptionVisitor)
    }

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        t.serialize(s)
    }

    struct OptionVisitor;

    impl<'de> de::Visitor<'de> for OptionVisitor {
        type Value = Option<DateTime<Utc>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an RFC 3339 timestamp or null")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn same_as_chrono(text: &str) {
        let chrono = text.parse::<DateTime<Utc>>();
        match (parse(text), chrono) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("{text}: {a:?} against chrono's {b:?}"),
        }
    }

    #[test]
    fn reads_what_chrono_reads() {
        for text in [
            "2026-12-03T15:04:05Z",
            "2026-12-03T15:04:05.1Z",
            "2026-12-03T15:04:05.123Z",
            "2026-12-03T15:04:05.123456Z",
            "2026-12-03T15:04:05.123456789Z",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999Z",
            "2024-02-29T12:00:00Z",
            // Left to chrono:
            "2026-12-03T15:04:05+02:00",
            "2026-12-03 15:04:05Z",
            "2026-12-03t15:04:05z",
            "2016-12-31T23:59:60Z",
            "2026-12-03T15:04:05.1234567891Z",
            // Refused by both:
            "2023-02-29T12:00:00Z",
            "2026-13-03T15:04:05Z",
            "2026-12-03T24:00:00Z",
            "2026-12-03T15:04:05.Z",
            "2026-12-03T15:04:05",
            "2026-12-0xT15:04:05Z",
            "+2026-12-03T15:04:05Z",
            "",
        ] {
            same_as_chrono(text);
        }
    }

    #[test]
    fn the_attributes_read_values_nulls_and_missing_fields() {
        #[derive(serde::Deserialize, Debug)]
        struct Row {
            #[serde(with = "crate::timestamp")]
            at: DateTime<Utc>,
            #[serde(default, with = "crate::timestamp::option")]
            maybe: Option<DateTime<Utc>>,
        }
        let at = parse("2026-12-03T15:04:05.5Z").unwrap();
        let row: Row =
            serde_json::from_str(r#"{"at": "2026-12-03T15:04:05.5Z", "maybe": null}"#).unwrap();
        assert_eq!((row.at, row.maybe), (at, None));
        let row: Row = serde_json::from_str(r#"{"at": "2026-12-03T15:04:05.5Z"}"#).unwrap();
        assert_eq!(row.maybe, None);
        let row: Row = serde_json::from_str(
            r#"{"at": "2026-12-03T17:04:05.5+02:00", "maybe": "2026-12-03T15:04:05.5Z"}"#,
        )
        .unwrap();
        assert_eq!((row.at, row.maybe), (at, Some(at)));
        let err = serde_json::from_str::<Row>(r#"{"at": "yesterday"}"#).unwrap_err();
        assert!(err.to_string().contains("input"), "{err}");
        assert!(serde_json::from_str::<Row>(r#"{"at": 5}"#).is_err());
    }

    proptest! {
        #[test]
        fn reads_every_utc_time_as_chrono_does(
            secs in -62_135_596_800i64..253_402_300_799,
            nanos in 0u32..1_000_000_000,
            digits in 0usize..=9,
        ) {
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            let base = t.format("%Y-%m-%dT%H:%M:%S").to_string();
            let fraction = format!("{nanos:09}");
            let text = if digits == 0 {
                format!("{base}Z")
            } else {
                format!("{base}.{}Z", &fraction[..digits])
            };
            same_as_chrono(&text);
            prop_assert!(utc_form(text.as_bytes()).is_some(), "{}", text);
        }
    }
}
