//! jsonb keeps integers of any size (its numbers are numerics), but serde_json - without its
//! `arbitrary_precision` feature, which would change the numbers of every crate in the build -
//! reads one beyond 64 bits as a rounded double. The API gives integers beyond a double's
//! exact range as their decimal text, so such literals are quoted before the document is
//! read: the string that comes out is that text, exactly.

use std::borrow::Cow;

/// The fewest digits of an integer that may fit neither an `i64` nor a `u64`
/// (`-9223372036854775809`, `18446744073709551616`).
const MIN_WIDE_DIGITS: usize = 19;

/// `json` with every integer literal beyond 64 bits written as a string holding its digits;
/// borrowed unchanged (no copy, one quick scan) when it has none, the usual case.
pub fn quote_wide_integers(json: &[u8]) -> Cow<'_, [u8]> {
    if !has_digit_run(json, MIN_WIDE_DIGITS) {
        return Cow::Borrowed(json);
    }
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => i = after_string(json, i),
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < json.len()
                    && matches!(json[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                let literal = &json[start..i];
                if is_wide_integer(literal) {
                    let out = out.get_or_insert_with(|| Vec::with_capacity(json.len() + 16));
                    out.extend_from_slice(&json[copied..start]);
                    out.push(b'"');
                    out.extend_from_slice(literal);
                    out.push(b'"');
                    copied = i;
                }
            }
            _ => i += 1,
        }
    }
    match out {
        None => Cow::Borrowed(json),
        Some(mut out) => {
            out.extend_from_slice(&json[copied..]);
            Cow::Owned(out)
        }
    }
}

/// The index just after the string whose opening quote is at `start`.
fn after_string(json: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < json.len() {
        match json[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    json.len()
}

fn is_wide_integer(literal: &[u8]) -> bool {
    let digits = literal.strip_prefix(b"-").unwrap_or(literal);
    digits.len() >= MIN_WIDE_DIGITS
        && digits.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(literal)
            .is_ok_and(|s| s.parse::<i64>().is_err() && s.parse::<u64>().is_err())
}

fn has_digit_run(json: &[u8], len: usize) -> bool {
    let mut run = 0;
    for &b in json {
        if b.is_ascii_digit() {
            run += 1;
            if run >= len {
                return true;
            }
        } else {
            run = 0;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoted(json: &str) -> String {
        String::from_utf8(quote_wide_integers(json.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn quotes_only_integers_beyond_64_bits() {
        let doc = r#"{"a": 123456789012345678901234567890, "b": [-9223372036854775809, 18446744073709551616], "i64": -9223372036854775808, "u64": 18446744073709551615, "f": 12345678901234567890.5, "e": 1234567890123456789e3}"#;
        assert_eq!(
            quoted(doc),
            r#"{"a": "123456789012345678901234567890", "b": ["-9223372036854775809", "18446744073709551616"], "i64": -9223372036854775808, "u64": 18446744073709551615, "f": 12345678901234567890.5, "e": 1234567890123456789e3}"#
        );
        // The whole document may be one.
        assert_eq!(
            quoted("-100000000000000000000"),
            r#""-100000000000000000000""#
        );
    }

    #[test]
    fn digits_inside_strings_and_keys_are_left_alone() {
        for doc in [
            r#"{"123456789012345678901234567890": "123456789012345678901234567890"}"#,
            r#"["a\"123456789012345678901234567890\\", "\\"]"#,
            r#"{"n": 1, "s": "12345678901234567890123"}"#,
        ] {
            assert!(
                matches!(quote_wide_integers(doc.as_bytes()), Cow::Borrowed(_)),
                "{doc}"
            );
        }
        assert_eq!(
            quoted(r#"{"s\"": "\\", "n": 99999999999999999999}"#),
            r#"{"s\"": "\\", "n": "99999999999999999999"}"#
        );
    }

    #[test]
    fn the_result_is_valid_json_with_the_digits_as_text() {
        let doc = r#"{"n": [123456789012345678901234567890, 1.5, true, null], "m": {"x": -55555555555555555555555}}"#;
        let value: serde_json::Value =
            serde_json::from_slice(&quote_wide_integers(doc.as_bytes())).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"n": ["123456789012345678901234567890", 1.5, true, null], "m": {"x": "-55555555555555555555555"}})
        );
    }
}
