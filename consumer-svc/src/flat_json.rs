//! A scanner for the top level of a JSON object (pure, no I/O): its members one by one, as
//! borrowed text wherever possible.
//!
//! Agent events are flat objects of strings, numbers and booleans, with one or two nested
//! values kept as raw JSON text. Deserializing them with serde's derived visitors cost about
//! a fifth of the ingest thread; walking the members directly and matching keys in the caller
//! costs a third less (see BENCHMARKS.md). The grammar is JSON's (RFC 8259) and the verdicts
//! are serde_json's: what this scanner does not handle in its fast path is handed to
//! serde_json itself: decoding strings with escape sequences, and nested objects and arrays
//! (validated and returned as raw text). String values are decoded only when the caller reads
//! them: serde_json refuses an unpaired surrogate escape in a string it reads but not in one
//! it skips, and so does this. Tests compare every event parser built on it with serde_json.

use std::borrow::Cow;

use serde_json::value::RawValue;

/// Malformed JSON, with the byte offset where it was detected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at byte {at}")]
pub struct SyntaxError {
    pub what: &'static str,
    pub at: usize,
}

fn syntax<T>(what: &'static str, at: usize) -> Result<T, SyntaxError> {
    Err(SyntaxError { what, at })
}

/// A member's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Number(Number<'a>),
    /// Decoded on demand ([`JsonStr::decode`]).
    String(JsonStr<'a>),
    /// An object or an array, validated, as its raw text.
    Nested(&'a str),
}

impl Value<'_> {
    /// What the value is, for type errors.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Nested(raw) if raw.starts_with('[') => "an array",
            Value::Nested(_) => "an object",
        }
    }
}

/// The text of a valid JSON number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Number<'a>(&'a str);

impl Number<'_> {
    /// As a double, correctly rounded; `None` when out of range (as serde_json refuses it).
    pub fn as_f64(self) -> Option<f64> {
        self.0.parse::<f64>().ok().filter(|f| f.is_finite())
    }

    /// As an unsigned integer: only plain non-negative integers that fit (not `1.0`, `1e2`
    /// or `-0`, as serde_json's `u64`).
    pub fn as_u64(self) -> Option<u64> {
        if self.0.starts_with('-') {
            return None;
        }
        self.0.parse().ok()
    }

    pub fn as_str(&self) -> &str {
        self.0
    }
}

/// One member of the object: its decoded key, its value and the value's raw JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct Member<'a> {
    pub key: Cow<'a, str>,
    pub value: Value<'a>,
    pub raw: &'a str,
}

/// The members of the JSON object `text`, in order. The whole text must be one object
/// (surrounding whitespace aside); an error ends the iteration.
pub struct Members<'a> {
    text: &'a str,
    pos: usize,
    first: bool,
}

impl<'a> Members<'a> {
    pub fn new(text: &'a str) -> Result<Self, SyntaxError> {
        let pos = skip_whitespace(text.as_bytes(), 0);
        match text.as_bytes().get(pos) {
            Some(b'{') => Ok(Members {
                text,
                pos: pos + 1,
                first: true,
            }),
            Some(_) => syntax("expected a JSON object", pos),
            None => syntax("empty input, expected a JSON object", pos),
        }
    }

    /// The next member, or `None` after the closing brace.
    pub fn next_member(&mut self) -> Result<Option<Member<'a>>, SyntaxError> {
        let text = self.text;
        let b = text.as_bytes();
        let mut i = skip_whitespace(b, self.pos);
        match b.get(i) {
            Some(b'}') => {
                let end = skip_whitespace(b, i + 1);
                if end != b.len() {
                    return syntax("trailing characters after the object", end);
                }
                self.pos = end;
                return Ok(None);
            }
            Some(b',') if !self.first => i = skip_whitespace(b, i + 1),
            Some(_) if self.first => {}
            Some(_) => return syntax("expected `,` or `}`", i),
            None => return syntax("unterminated object", i),
        }
        self.first = false;
        if b.get(i) != Some(&b'"') {
            return syntax("expected a string key", i);
        }
        let (key, after_key) = string(text, i)?;
        // Keys are always decoded, as serde_json decodes them to match field names.
        let key = key.decode()?;
        i = skip_whitespace(b, after_key);
        if b.get(i) != Some(&b':') {
            return syntax("expected `:`", i);
        }
        let start = skip_whitespace(b, i + 1);
        let (value, end) = value(text, start)?;
        self.pos = end;
        Ok(Some(Member {
            key,
            value,
            raw: &text[start..end],
        }))
    }
}

fn skip_whitespace(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = b.get(i) {
        i += 1;
    }
    i
}

/// The value starting at `i` and the offset just after it.
fn value(text: &str, i: usize) -> Result<(Value<'_>, usize), SyntaxError> {
    let b = text.as_bytes();
    let literal = |word: &[u8], v: Value<'static>| {
        if b[i..].starts_with(word) {
            Ok((v, i + word.len()))
        } else {
            syntax("invalid literal", i)
        }
    };
    match b.get(i) {
        Some(b'"') => string(text, i).map(|(s, end)| (Value::String(s), end)),
        Some(b'n') => literal(b"null", Value::Null),
        Some(b't') => literal(b"true", Value::Bool(true)),
        Some(b'f') => literal(b"false", Value::Bool(false)),
        Some(b'-' | b'0'..=b'9') => {
            let end = number_end(b, i)?;
            Ok((Value::Number(Number(&text[i..end])), end))
        }
        Some(b'{' | b'[') => nested(text, i),
        Some(_) => syntax("expected a value", i),
        None => syntax("unterminated object", i),
    }
}

/// An object or array: validated by serde_json, returned as raw text.
fn nested(text: &str, i: usize) -> Result<(Value<'_>, usize), SyntaxError> {
    let mut values = serde_json::Deserializer::from_str(&text[i..]).into_iter::<&RawValue>();
    match values.next() {
        Some(Ok(raw)) => Ok((Value::Nested(raw.get()), i + values.byte_offset())),
        _ => syntax("invalid nested value", i),
    }
}

/// The end of the JSON number starting at `i` (RFC 8259 grammar).
fn number_end(b: &[u8], mut i: usize) -> Result<usize, SyntaxError> {
    let digits = |mut j: usize| {
        while b.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        j
    };
    if b[i] == b'-' {
        i += 1;
    }
    i = match b.get(i) {
        Some(b'0') => i + 1,
        Some(b'1'..=b'9') => digits(i + 1),
        _ => return syntax("invalid number", i),
    };
    if b.get(i) == Some(&b'.') {
        let end = digits(i + 1);
        if end == i + 1 {
            return syntax("invalid number: no digit after `.`", end);
        }
        i = end;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        let end = digits(i);
        if end == i {
            return syntax("invalid number: no digit in the exponent", end);
        }
        i = end;
    }
    Ok(i)
}

const ONES: u64 = u64::MAX / 255;

/// Whether any of the 8 bytes is `"`, `\` or a control character (below 0x20): the bytes a
/// string scan must stop at (the same test serde_json uses).
#[inline]
fn has_stop_byte(chunk: u64) -> bool {
    let control = chunk.wrapping_sub(ONES * 0x20) & !chunk;
    let quote = chunk ^ (ONES * u64::from(b'"'));
    let quote = quote.wrapping_sub(ONES) & !quote;
    let backslash = chunk ^ (ONES * u64::from(b'\\'));
    let backslash = backslash.wrapping_sub(ONES) & !backslash;
    (control | quote | backslash) & (ONES << 7) != 0
}

/// The string whose opening quote is at `i`, and the offset after its closing quote. Escape
/// sequences are checked for form only (as serde_json checks strings it skips); decoding them
/// is [`JsonStr::decode`]'s.
#[inline]
fn string(text: &str, i: usize) -> Result<(JsonStr<'_>, usize), SyntaxError> {
    let b = text.as_bytes();
    let mut escaped = false;
    let mut j = i + 1;
    loop {
        while let Some(chunk) = b.get(j..j + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            if has_stop_byte(u64::from_le_bytes(word)) {
                break;
            }
            j += 8;
        }
        match b.get(j) {
            // `j` is on an ASCII quote, so both ends are character boundaries.
            Some(b'"') => {
                let quoted = &text[i..=j];
                return Ok((
                    JsonStr {
                        quoted,
                        escaped,
                        at: i,
                    },
                    j + 1,
                ));
            }
            Some(b'\\') => {
                escaped = true;
                j += match b.get(j + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => 2,
                    Some(b'u')
                        if b.get(j + 2..j + 6)
                            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
                    {
                        6
                    }
                    _ => return syntax("invalid escape in a string", j),
                };
            }
            Some(0..=0x1f) => return syntax("control character in a string", j),
            Some(_) => j += 1,
            None => return syntax("unterminated string", j),
        }
    }
}

/// A JSON string as it appears in the text, quotes included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonStr<'a> {
    quoted: &'a str,
    escaped: bool,
    /// Offset of the opening quote in the object's text.
    at: usize,
}

impl<'a> JsonStr<'a> {
    /// The string's value: borrowed when it has no escape sequences, else decoded by
    /// serde_json (which refuses unpaired UTF-16 surrogates in `\u` escapes).
    pub fn decode(self) -> Result<Cow<'a, str>, SyntaxError> {
        if !self.escaped {
            return Ok(Cow::Borrowed(&self.quoted[1..self.quoted.len() - 1]));
        }
        serde_json::from_str::<Cow<'a, str>>(self.quoted).map_err(|_| SyntaxError {
            what: "invalid escape in a string",
            at: self.at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(text: &str) -> Result<Vec<Member<'_>>, SyntaxError> {
        let mut m = Members::new(text)?;
        let mut out = Vec::new();
        while let Some(member) = m.next_member()? {
            out.push(member);
        }
        Ok(out)
    }

    #[test]
    fn reads_every_kind_of_value() {
        let m = members(
            r#" { "s" : "x y", "e":"a\"b\u00e9", "n":-1.5e3, "i":42, "t":true, "f":false,
                "z":null, "o":{"k":[1,{"x":null}]}, "a":[ "q" ] , "u":"é😀"} "#,
        )
        .unwrap();
        let keys: Vec<&str> = m.iter().map(|m| &*m.key).collect();
        assert_eq!(keys, ["s", "e", "n", "i", "t", "f", "z", "o", "a", "u"]);
        let text = |v: &Value<'_>| match v {
            Value::String(s) => s.decode().unwrap().into_owned(),
            other => panic!("{other:?}"),
        };
        assert_eq!(text(&m[0].value), "x y");
        assert!(
            matches!(&m[0].value, Value::String(s) if matches!(s.decode(), Ok(Cow::Borrowed(_))))
        );
        assert_eq!(text(&m[1].value), "a\"bé");
        assert_eq!(m[1].raw, r#""a\"b\u00e9""#);
        let Value::Number(n) = m[2].value else {
            panic!("{:?}", m[2])
        };
        assert_eq!(
            (n.as_f64(), n.as_u64(), n.as_str()),
            (Some(-1500.0), None, "-1.5e3")
        );
        let Value::Number(i) = m[3].value else {
            panic!("{:?}", m[3])
        };
        assert_eq!((i.as_f64(), i.as_u64()), (Some(42.0), Some(42)));
        assert_eq!(m[4].value, Value::Bool(true));
        assert_eq!(m[5].value, Value::Bool(false));
        assert_eq!(m[6].value, Value::Null);
        assert_eq!(m[7].value, Value::Nested(r#"{"k":[1,{"x":null}]}"#));
        assert_eq!(m[8].value, Value::Nested(r#"[ "q" ]"#));
        assert_eq!(m[8].value.type_name(), "an array");
        assert_eq!(text(&m[9].value), "é😀");
        assert!(members("{}").unwrap().is_empty());
        assert!(members(" {\n}\t").unwrap().is_empty());
    }

    #[test]
    fn escaped_keys_are_decoded() {
        let m = members(r#"{"agent\u005fname":"a"}"#).unwrap();
        assert_eq!(m[0].key, "agent_name");
    }

    /// As serde_json: an unpaired surrogate is refused in a key or a string that is read, and
    /// passes in a value that is skipped.
    #[test]
    fn unpaired_surrogates_are_refused_when_read() {
        assert!(members(r#"{"\ud800":1}"#).is_err());
        let m = members(r#"{"a":"\ud800"}"#).unwrap();
        let Value::String(s) = &m[0].value else {
            panic!("{m:?}")
        };
        assert_eq!(s.decode().unwrap_err().at, 5);
    }

    #[test]
    fn numbers_follow_the_json_grammar_and_serde_json_ranges() {
        for bad in [
            "01", "-", "1.", ".5", "1e", "1e+", "+1", "0x10", "1.5.5", "--1", "NaN",
        ] {
            let text = format!(r#"{{"n":{bad}}}"#);
            assert!(members(&text).is_err(), "{bad} accepted");
        }
        fn n(text: &str) -> Number<'_> {
            let m = members(text).unwrap();
            match m[0].value {
                Value::Number(n) => n,
                ref v => panic!("{v:?}"),
            }
        }
        assert_eq!(n(r#"{"n":1e400}"#).as_f64(), None, "out of range");
        assert_eq!(n(r#"{"n":-0}"#).as_u64(), None);
        assert_eq!(n(r#"{"n":1e2}"#).as_u64(), None);
        assert_eq!(n(r#"{"n":18446744073709551616}"#).as_u64(), None);
        assert_eq!(n(r#"{"n":18446744073709551615}"#).as_u64(), Some(u64::MAX));
        assert_eq!(n(r#"{"n":0.1}"#).as_f64(), Some(0.1));
    }

    #[test]
    fn malformed_objects_are_refused_with_the_offset() {
        for bad in [
            "",
            "   ",
            "[]",
            "\"x\"",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{,\"a\":1}",
            "{\"a\":1 \"b\":2}",
            "{\"a\":1}}",
            "{\"a\":1} x",
            "{a:1}",
            "{\"a\":tru}",
            "{\"a\":nul}",
            "{\"a\":\"x}",
            "{\"a\":\"x\ty\"}",
            "{\"a\":\"\\q\"}",
            "{\"a\":{\"b\":}}",
            "{\"a\":[1,]}",
        ] {
            assert!(members(bad).is_err(), "{bad:?} accepted");
        }
        let e = members("{\"a\":1,\"b\" 2}").unwrap_err();
        assert_eq!(e.at, 11);
        assert_eq!(e.to_string(), "expected `:` at byte 11");
    }

    #[test]
    fn long_strings_cross_the_word_scan() {
        for len in 0..40 {
            let s = "x".repeat(len);
            let text = format!(r#"{{"k":"{s}","q":"{s}\"{s}","c":"{s}"}}"#);
            let m = members(&text).unwrap();
            let decoded: Vec<String> = m
                .iter()
                .map(|m| match &m.value {
                    Value::String(s) => s.decode().unwrap().into_owned(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(decoded, [s.clone(), format!("{s}\"{s}"), s.clone()]);
            let control = format!("{{\"k\":\"{s}\u{1f}\"}}");
            assert!(members(&control).is_err());
        }
    }
}
