//! PostgreSQL `numeric` values as decimal text, straight from the wire.
//!
//! A `numeric` holds up to 131072 digits before the point and 16383 after, plus `NaN` and
//! (since PostgreSQL 14) `±Infinity`; `rust_decimal` holds 28 digits and none of the
//! specials, so decoding through it fails (or would round) on values the column accepts.
//! Reading the binary form (`numeric_send`) into text keeps every value exactly as
//! PostgreSQL prints it.

use std::fmt::Write as _;

/// Binary `numeric`: `ndigits`, `weight`, `sign`, `dscale` (i16 each, big-endian), then
/// `ndigits` base-10000 digits; digit `k` is worth 10000^(weight - k).
const NEGATIVE: u16 = 0x4000;
const NAN: u16 = 0xC000;
const POSITIVE_INFINITY: u16 = 0xD000;
const NEGATIVE_INFINITY: u16 = 0xF000;

/// The decimal text of a binary `numeric`, as PostgreSQL's `numeric_out` writes it
/// (`dscale` fraction digits, `NaN`, `Infinity`, `-Infinity`); `None` if malformed.
pub fn to_text(bytes: &[u8]) -> Option<String> {
    let word = |i: usize| -> Option<u16> {
        let b = bytes.get(2 * i..2 * i + 2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    };
    let ndigits = usize::from(word(0)?);
    let weight = i64::from(word(1)? as i16);
    let sign = word(2)?;
    let dscale = usize::from(word(3)?);
    match sign {
        NAN => return Some("NaN".into()),
        POSITIVE_INFINITY => return Some("Infinity".into()),
        NEGATIVE_INFINITY => return Some("-Infinity".into()),
        0 | NEGATIVE => {}
        _ => return None,
    }
    if bytes.len() != 8 + 2 * ndigits {
        return None;
    }
    let digits: Vec<u16> = (0..ndigits).map(|k| word(4 + k)).collect::<Option<_>>()?;
    if digits.iter().any(|&d| d > 9999) {
        return None;
    }
    // The base-10000 group of weight `w` (zero outside the stored digits).
    let group = |w: i64| -> u16 {
        usize::try_from(weight - w)
            .ok()
            .and_then(|k| digits.get(k).copied())
            .unwrap_or(0)
    };
    // Writing into a String cannot fail.
    let mut out = String::with_capacity(8 + 4 * ndigits + dscale);
    if sign == NEGATIVE && digits.iter().any(|&d| d != 0) {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        let _ = write!(out, "{}", group(weight));
        for w in (0..weight).rev() {
            let _ = write!(out, "{:04}", group(w));
        }
    }
    if dscale > 0 {
        out.push('.');
        let start = out.len();
        let mut w = -1;
        while out.len() - start < dscale {
            let _ = write!(out, "{:04}", group(w));
            w -= 1;
        }
        out.truncate(start + dscale);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        for w in [ndigits, weight as u16, sign, dscale]
            .into_iter()
            .chain(digits.iter().copied())
        {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out
    }

    #[test]
    fn reads_what_numeric_out_prints() {
        let cases: &[(&[u16], i16, u16, u16, &str)] = &[
            (&[], 0, 0, 0, "0"),
            (&[], 0, 0, 4, "0.0000"),
            (&[9512], -1, 0, 4, "0.9512"),
            (&[1000], -1, 0, 4, "0.1000"),
            (&[12, 5000], 0, NEGATIVE, 1, "-12.5"),
            (
                &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                10,
                0,
                0,
                "10000000000000000000000000000000000000000",
            ),
            (
                &[1234, 5678, 9012, 3456, 7890, 123, 4567, 8900],
                4,
                0,
                10,
                "12345678901234567890.0123456789",
            ),
            (&[7], -3, 0, 13, "0.0000000000070"),
            (&[1], 0, 0, 2, "1.00"),
            (&[1], 1, 0, 0, "10000"),
        ];
        for &(digits, weight, sign, dscale, want) in cases {
            let bytes = encode(digits.len() as u16, weight, sign, dscale, digits);
            assert_eq!(
                to_text(&bytes).as_deref(),
                Some(want),
                "{digits:?} w{weight}"
            );
        }
    }

    #[test]
    fn specials_and_malformed_input() {
        assert_eq!(to_text(&encode(0, 0, NAN, 0, &[])).as_deref(), Some("NaN"));
        assert_eq!(
            to_text(&encode(0, 0, POSITIVE_INFINITY, 0, &[])).as_deref(),
            Some("Infinity")
        );
        assert_eq!(
            to_text(&encode(0, 0, NEGATIVE_INFINITY, 0, &[])).as_deref(),
            Some("-Infinity")
        );
        assert_eq!(to_text(&[0, 1]), None);
        assert_eq!(to_text(&encode(2, 0, 0, 0, &[1])), None, "digit missing");
        assert_eq!(
            to_text(&encode(1, 0, 0, 0, &[10000])),
            None,
            "digit out of range"
        );
        assert_eq!(to_text(&encode(0, 0, 0x1234, 0, &[])), None, "unknown sign");
    }
}
