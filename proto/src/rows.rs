//! Typed rows: `DatabaseService.Query` results read straight into the caller's serde types.
//!
//! On the wire a row is a `google.protobuf.Struct` (so grpcurl and every language see plain
//! JSON). Decoding it with prost builds a map node, a key string and a `Value` per cell, and
//! a caller that wants its own struct then walks that map again. Here the response is decoded
//! with each row kept as its raw `Struct` bytes ([`QueryRowsResponse`], wire-compatible with
//! `QueryResponse`), and [`from_row`] deserializes those bytes directly into any
//! `serde::Deserialize` type: keys are matched without allocating, strings can be borrowed
//! from the response, and no intermediate map exists.
//!
//! The mapping is the proto3 JSON one the service documents: `null_value` is `null` (and
//! `None`), `number_value` is a number (integral values within ±2^53 are offered as integers,
//! so integer fields accept them and reject fractions), `string_value` a string (uuids and
//! timestamps arrive as strings, which `uuid` and `chrono` deserialize; `crate::timestamp` reads
//! db-svc's timestamp form without chrono's general parser), `bool_value` a bool,
//! `struct_value` a map or struct and `list_value` a sequence.

use std::fmt;

use prost::bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, Visitor};
use tonic::codegen::{Body, StdError, http};

use crate::db::v1::QueryRequest;

/// `QueryResponse` with every row left as the bytes of its `Struct` message (the two messages
/// have the same wire format: a repeated embedded message and a repeated `bytes` field are
/// both length-delimited records of field 1).
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueryRowsResponse {
    /// Each row's encoded `google.protobuf.Struct`.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub rows: Vec<Bytes>,
    /// Exact number of matching rows, when `include_total` was set.
    #[prost(uint64, optional, tag = "2")]
    pub total: Option<u64>,
}

impl QueryRowsResponse {
    /// Every row as a `T` (owned values; see [`QueryRowsResponse::iter`] to borrow strings).
    pub fn decode_rows<T: de::DeserializeOwned>(&self) -> Result<Vec<T>, RowError> {
        self.iter().collect()
    }

    /// The rows as `T`s, one by one; `T` may borrow `&str` fields from the response.
    pub fn iter<'a, T: de::Deserialize<'a>>(
        &'a self,
    ) -> impl Iterator<Item = Result<T, RowError>> + 'a {
        self.rows
            .iter()
            .enumerate()
            .map(|(i, row)| from_row(row).map_err(|e| e.in_row(i)))
    }
}

/// Runs `DatabaseService.Query` on `service` (a channel, or one wrapped in interceptors) and
/// returns the rows undecoded, for [`QueryRowsResponse::decode_rows`].
pub async fn query_rows<T>(
    service: T,
    request: impl tonic::IntoRequest<QueryRequest>,
) -> Result<tonic::Response<QueryRowsResponse>, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(service);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("service was not ready: {}", e.into())))?;
    let mut request = request.into_request();
    request.extensions_mut().insert(tonic::GrpcMethod::new(
        crate::service_names::DATABASE,
        "Query",
    ));
    let path = http::uri::PathAndQuery::from_static("/omnibus.db.v1.DatabaseService/Query");
    grpc.unary(request, path, tonic_prost::ProstCodec::default())
        .await
}

/// A row that is not valid protobuf, or does not fit the requested type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RowError {
    #[error("malformed row: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Mismatch(String),
    #[error("row {row}: {source}")]
    InRow { row: usize, source: Box<RowError> },
}

impl RowError {
    fn in_row(self, row: usize) -> Self {
        RowError::InRow {
            row,
            source: Box::new(self),
        }
    }
}

impl de::Error for RowError {
    fn custom<M: fmt::Display>(msg: M) -> Self {
        RowError::Mismatch(msg.to_string())
    }
}

/// Deserializes one encoded `google.protobuf.Struct` (a row) into `T`.
pub fn from_row<'de, T: de::Deserialize<'de>>(row: &'de [u8]) -> Result<T, RowError> {
    T::deserialize(StructDeserializer {
        bytes: row,
        level: 1,
    })
}

/// How many messages deep a row may nest, counted as in its response: the row's `Struct` is
/// message 1. prost refuses the same response past the same depth (its `RECURSION_LIMIT`),
/// and a bound keeps a hostile server's nesting from overflowing the stack.
const MAX_DEPTH: usize = 100;

/// The error for a message nested at `level`, if that is deeper than [`MAX_DEPTH`].
#[inline]
fn check_depth(level: usize) -> Result<(), RowError> {
    if level > MAX_DEPTH {
        Err(RowError::Malformed("nested more than 100 messages deep"))
    } else {
        Ok(())
    }
}

// ---- protobuf wire reading -----------------------------------------------------------------

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

#[inline]
fn read_varint(input: &mut &[u8]) -> Result<u64, RowError> {
    // Tags and short lengths are one byte: the common case, kept out of the loop.
    if let Some((&byte, rest)) = input.split_first()
        && byte < 0x80
    {
        *input = rest;
        return Ok(u64::from(byte));
    }
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input
            .split_first()
            .ok_or(RowError::Malformed("truncated varint"))?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err(RowError::Malformed("varint longer than 10 bytes"))
}

#[inline]
fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], RowError> {
    if input.len() < n {
        return Err(RowError::Malformed("truncated field"));
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Ok(head)
}

/// One field of a message: its number and its payload.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Len(&'a [u8]),
    Fixed32,
}

/// Reads the next field of a message, or `None` at its end.
#[inline]
fn next_field<'a>(input: &mut &'a [u8]) -> Result<Option<(u64, Field<'a>)>, RowError> {
    if input.is_empty() {
        return Ok(None);
    }
    let key = read_varint(input)?;
    let number = key >> 3;
    let field = match (key & 7) as u8 {
        WIRE_VARINT => Field::Varint(read_varint(input)?),
        WIRE_FIXED64 => {
            let b = take(input, 8)?;
            Field::Fixed64(b.try_into().map_err(|_| RowError::Malformed("fixed64"))?)
        }
        WIRE_LEN => {
            let len = usize::try_from(read_varint(input)?)
                .map_err(|_| RowError::Malformed("length out of range"))?;
            Field::Len(take(input, len)?)
        }
        WIRE_FIXED32 => {
            take(input, 4)?;
            Field::Fixed32
        }
        _ => return Err(RowError::Malformed("unsupported wire type")),
    };
    Ok(Some((number, field)))
}

/// The payload of a length-delimited field with the one-byte key `tag` at the front of
/// `input`, when it has a one-byte length: the shape prost writes for most entries, keys and
/// short strings. `None` (input untouched) sends the caller to the general reader.
#[inline(always)]
fn short_len_field<'a>(input: &mut &'a [u8], tag: u8) -> Option<&'a [u8]> {
    match **input {
        [t, len, ref rest @ ..] if t == tag && len < 0x80 && rest.len() >= usize::from(len) => {
            let (payload, rest) = rest.split_at(usize::from(len));
            *input = rest;
            Some(payload)
        }
        _ => None,
    }
}

/// Key bytes of `Struct.fields` (1), of a map entry's key (1) and value (2), of a
/// `Value.string_value` (3): field number << 3 | length-delimited.
const FIELD1_LEN: u8 = 1 << 3 | WIRE_LEN;
const FIELD2_LEN: u8 = 2 << 3 | WIRE_LEN;
const FIELD3_LEN: u8 = 3 << 3 | WIRE_LEN;

fn utf8(bytes: &[u8]) -> Result<&str, RowError> {
    std::str::from_utf8(bytes).map_err(|_| RowError::Malformed("string is not UTF-8"))
}

/// A decoded `google.protobuf.Value` whose text and nested messages still point into the row.
#[derive(Clone, Copy)]
enum Kind<'de> {
    Null,
    Number(f64),
    Str(&'de str),
    Bool(bool),
    Struct(&'de [u8]),
    List(&'de [u8]),
}

#[inline]
fn parse_value(mut bytes: &[u8]) -> Result<Kind<'_>, RowError> {
    // The usual shapes: exactly one field, with a one-byte key (and length).
    match *bytes {
        [0x08, n] if n < 0x80 => return Ok(Kind::Null),
        [0x11, ref b @ ..] if b.len() == 8 => {
            let b: [u8; 8] = b.try_into().map_err(|_| RowError::Malformed("fixed64"))?;
            return Ok(Kind::Number(f64::from_le_bytes(b)));
        }
        [0x20, b] if b < 0x80 => return Ok(Kind::Bool(b != 0)),
        [FIELD3_LEN, len, ref s @ ..] if len < 0x80 && s.len() == usize::from(len) => {
            return Ok(Kind::Str(utf8(s)?));
        }
        _ => {}
    }
    // A Value with no field set reads as null; of several oneof fields the last one wins.
    let mut kind = Kind::Null;
    while let Some((number, field)) = next_field(&mut bytes)? {
        kind = match (number, field) {
            (1, Field::Varint(_)) => Kind::Null,
            (2, Field::Fixed64(b)) => Kind::Number(f64::from_le_bytes(b)),
            (3, Field::Len(s)) => Kind::Str(utf8(s)?),
            (4, Field::Varint(b)) => Kind::Bool(b != 0),
            (5, Field::Len(s)) => Kind::Struct(s),
            (6, Field::Len(l)) => Kind::List(l),
            (1..=6, _) => return Err(RowError::Malformed("Value field with the wrong wire type")),
            _ => kind,
        };
    }
    Ok(kind)
}

/// Largest magnitude at which every integer is exactly representable in an f64.
const EXACT_INT: f64 = 9_007_199_254_740_992.0;

// ---- serde ---------------------------------------------------------------------------------

/// A `google.protobuf.Struct` message, read as a map; `level` is its depth (see
/// [`MAX_DEPTH`]).
struct StructDeserializer<'de> {
    bytes: &'de [u8],
    level: usize,
}

impl<'de> Deserializer<'de> for StructDeserializer<'de> {
    type Error = RowError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        visitor.visit_map(Entries {
            rest: self.bytes,
            value: None,
            level: self.level,
        })
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, RowError> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// The entries of a `Struct` (`map<string, Value> fields = 1`), in wire order.
struct Entries<'de> {
    rest: &'de [u8],
    /// The entry whose key was just read: its key (for error messages) and value.
    value: Option<(&'de [u8], &'de [u8])>,
    /// The depth of the `Struct`.
    level: usize,
}

impl<'de> de::MapAccess<'de> for Entries<'de> {
    type Error = RowError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, RowError> {
        let Some(entry) = next_repeated(&mut self.rest, "Struct entry with the wrong wire type")?
        else {
            return Ok(None);
        };
        // The entry and its value, one and two levels down.
        check_depth(self.level + 2)?;
        let (key, value) = entry_parts(entry)?;
        self.value = Some((key, value));
        seed.deserialize(KeyDeserializer { key }).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, RowError> {
        let (key, bytes) = self
            .value
            .take()
            .ok_or(RowError::Malformed("map value requested before its key"))?;
        seed.deserialize(ValueDeserializer {
            kind: parse_value(bytes)?,
            level: self.level + 2,
        })
        .map_err(|e| match e {
            // Name the column (or nested key) the value belongs to: `duration_ms: invalid ...`.
            RowError::Mismatch(m) => {
                RowError::Mismatch(format!("{}: {m}", String::from_utf8_lossy(key)))
            }
            other => other,
        })
    }
}

/// The next element of the repeated message field 1 (`Struct.fields`, `ListValue.values`),
/// skipping unknown fields as protobuf parsers do; `None` at the end of the message.
#[inline]
fn next_repeated<'a>(
    input: &mut &'a [u8],
    wrong_type: &'static str,
) -> Result<Option<&'a [u8]>, RowError> {
    loop {
        if let Some(payload) = short_len_field(input, FIELD1_LEN) {
            return Ok(Some(payload));
        }
        match next_field(input)? {
            None => return Ok(None),
            Some((1, Field::Len(payload))) => return Ok(Some(payload)),
            Some((1, _)) => return Err(RowError::Malformed(wrong_type)),
            Some(_) => {}
        }
    }
}

/// The key (as bytes, not yet checked to be UTF-8) and value bytes of one map entry.
#[inline]
fn entry_parts(entry: &[u8]) -> Result<(&[u8], &[u8]), RowError> {
    let mut fast = entry;
    if let Some(key) = short_len_field(&mut fast, FIELD1_LEN)
        && let Some(value) = short_len_field(&mut fast, FIELD2_LEN)
        && fast.is_empty()
    {
        return Ok((key, value));
    }
    let (mut key, mut value, mut rest) = (&[][..], &[][..], entry);
    while let Some((number, field)) = next_field(&mut rest)? {
        match (number, field) {
            (1, Field::Len(k)) => key = k,
            (2, Field::Len(v)) => value = v,
            (1 | 2, _) => return Err(RowError::Malformed("map entry with the wrong wire type")),
            _ => {}
        }
    }
    Ok((key, value))
}

/// A map key. Struct field names are matched on the raw bytes (a name that is not UTF-8
/// matches no field); every other use of a key gets it as a checked `&str`.
struct KeyDeserializer<'de> {
    key: &'de [u8],
}

impl<'de> Deserializer<'de> for KeyDeserializer<'de> {
    type Error = RowError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        visitor.visit_borrowed_str(utf8(self.key)?)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        visitor.visit_borrowed_bytes(self.key)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        ignored_any
    }
}

/// The values of a `ListValue` (`repeated Value values = 1`); `level` is the ListValue's
/// depth.
struct Values<'de> {
    rest: &'de [u8],
    level: usize,
}

impl<'de> de::SeqAccess<'de> for Values<'de> {
    type Error = RowError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, RowError> {
        let Some(value) = next_repeated(&mut self.rest, "list value with the wrong wire type")?
        else {
            return Ok(None);
        };
        check_depth(self.level + 1)?;
        seed.deserialize(ValueDeserializer {
            kind: parse_value(value)?,
            level: self.level + 1,
        })
        .map(Some)
    }
}

/// `Deserializer` methods that also read their number from a string value.
macro_rules! number_from_text {
    ($($method:ident => $visit:ident),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
                match self.kind {
                    Kind::Str(s) => match s.parse() {
                        Ok(n) => visitor.$visit(n),
                        Err(_) => visitor.visit_borrowed_str(s),
                    },
                    _ => self.deserialize_any(visitor),
                }
            }
        )*
    };
}

/// One `google.protobuf.Value`, `level` messages deep.
struct ValueDeserializer<'de> {
    kind: Kind<'de>,
    level: usize,
}

/// A number offered to the visitor as an integer: integral, exact as a double, and not -0.0.
fn is_integral(n: f64) -> bool {
    n.fract() == 0.0 && n.abs() <= EXACT_INT && !(n == 0.0 && n.is_sign_negative())
}

impl<'de> Deserializer<'de> for ValueDeserializer<'de> {
    type Error = RowError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        match self.kind {
            Kind::Null => visitor.visit_unit(),
            // Integral numbers go out as integers: integer fields accept them, float fields
            // accept integers too, and `serde_json::Value` keeps `5` rather than `5.0`. Not
            // -0.0, which no integer carries.
            Kind::Number(n) if is_integral(n) => {
                if n >= 0.0 {
                    visitor.visit_u64(n as u64)
                } else {
                    visitor.visit_i64(n as i64)
                }
            }
            Kind::Number(n) => visitor.visit_f64(n),
            Kind::Str(s) => visitor.visit_borrowed_str(s),
            Kind::Bool(b) => visitor.visit_bool(b),
            Kind::Struct(bytes) => {
                check_depth(self.level + 1)?;
                StructDeserializer {
                    bytes,
                    level: self.level + 1,
                }
                .deserialize_any(visitor)
            }
            Kind::List(rest) => {
                check_depth(self.level + 1)?;
                visitor.visit_seq(Values {
                    rest,
                    level: self.level + 1,
                })
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        match self.kind {
            Kind::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, RowError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, RowError> {
        match self.kind {
            // A unit variant spelled as a string, as serde_json accepts it.
            Kind::Str(s) => visitor.visit_enum(s.into_deserializer()),
            _ => self.deserialize_any(visitor),
        }
    }

    // db-svc writes a bigint beyond ±2^53 as its decimal text (proto3 JSON's int64 form), and
    // a numeric a double would change (and NaN / infinities) as text too: the 64- and 128-bit
    // integer types and the floats also take such text (a float rounds it, as the caller
    // chose). Text that is no such number gets serde's own "invalid type: string" error.
    number_from_text! {
        deserialize_i64 => visit_i64,
        deserialize_u64 => visit_u64,
        deserialize_i128 => visit_i128,
        deserialize_u128 => visit_u128,
        deserialize_f64 => visit_f64,
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, RowError> {
        self.deserialize_f64(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 u8 u16 u32 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use prost::Message;
    use prost_types::value::Kind as PKind;
    use prost_types::{ListValue, Struct, Value};
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    fn v(kind: PKind) -> Value {
        Value { kind: Some(kind) }
    }

    fn row(fields: Vec<(&str, PKind)>) -> Vec<u8> {
        Struct {
            fields: fields
                .into_iter()
                .map(|(k, kind)| (k.to_string(), v(kind)))
                .collect(),
        }
        .encode_to_vec()
    }

    /// The reference mapping: a prost `Value` as JSON, integral numbers as integers.
    fn to_json(value: &Value) -> serde_json::Value {
        match &value.kind {
            None | Some(PKind::NullValue(_)) => serde_json::Value::Null,
            Some(PKind::NumberValue(n)) if is_integral(*n) => {
                if *n >= 0.0 {
                    json!(*n as u64)
                } else {
                    json!(*n as i64)
                }
            }
            Some(PKind::NumberValue(n)) => json!(n),
            Some(PKind::StringValue(s)) => json!(s),
            Some(PKind::BoolValue(b)) => json!(b),
            Some(PKind::StructValue(s)) => struct_json(s),
            Some(PKind::ListValue(l)) => l.values.iter().map(to_json).collect(),
        }
    }

    fn struct_json(s: &Struct) -> serde_json::Value {
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Action<'a> {
        id: String,
        agent_name: &'a str,
        duration_ms: Option<i32>,
        debug_mode: Option<bool>,
        action_details: Option<serde_json::Value>,
        #[serde(default)]
        tags: Vec<String>,
    }

    #[test]
    fn a_row_fills_a_struct_borrowing_its_strings() {
        let details = Struct {
            fields: [("file".to_string(), v(PKind::StringValue("a.rs".into())))].into(),
        };
        let bytes = row(vec![
            (
                "id",
                PKind::StringValue("7c9e6679-7425-40de-944b-e07fc1f90ae7".into()),
            ),
            ("agent_name", PKind::StringValue("planner".into())),
            ("duration_ms", PKind::NumberValue(42.0)),
            ("debug_mode", PKind::NullValue(0)),
            ("action_details", PKind::StructValue(details)),
            ("ignored_column", PKind::BoolValue(true)),
        ]);
        let action: Action<'_> = from_row(&bytes).unwrap();
        assert_eq!(
            action,
            Action {
                id: "7c9e6679-7425-40de-944b-e07fc1f90ae7".into(),
                agent_name: "planner",
                duration_ms: Some(42),
                debug_mode: None,
                action_details: Some(json!({"file": "a.rs"})),
                tags: vec![],
            }
        );
    }

    #[test]
    fn timestamps_read_with_the_fast_attribute() {
        #[derive(Debug, Deserialize)]
        struct Times {
            #[serde(with = "crate::timestamp")]
            at: chrono::DateTime<chrono::Utc>,
            #[serde(default, with = "crate::timestamp::option")]
            none: Option<chrono::DateTime<chrono::Utc>>,
        }
        let text = "2026-12-03T15:04:05.123456Z";
        let bytes = row(vec![
            ("at", PKind::StringValue(text.into())),
            ("none", PKind::NullValue(0)),
        ]);
        let t: Times = from_row(&bytes).unwrap();
        assert_eq!(t.at, text.parse::<chrono::DateTime<chrono::Utc>>().unwrap());
        assert_eq!(t.none, None);
        let wrong = row(vec![("at", PKind::NumberValue(1.0))]);
        assert!(from_row::<Times>(&wrong).is_err());
    }

    #[test]
    fn integers_are_range_checked_and_fractions_rejected() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)] // read only through Debug
        struct Small {
            n: i16,
        }
        let too_big = row(vec![("n", PKind::NumberValue(40_000.0))]);
        let err = from_row::<Small>(&too_big).unwrap_err().to_string();
        assert!(err.contains("40000") && err.contains("i16"), "{err}");
        let fraction = row(vec![("n", PKind::NumberValue(1.5))]);
        let err = from_row::<Small>(&fraction).unwrap_err().to_string();
        assert!(err.contains("1.5"), "{err}");
        let ok: BTreeMap<String, f64> =
            from_row(&row(vec![("n", PKind::NumberValue(2.0))])).unwrap();
        assert_eq!(ok["n"], 2.0);
    }

    #[test]
    fn negative_zero_keeps_its_sign() {
        let bytes = row(vec![("x", PKind::NumberValue(-0.0))]);
        let floats: BTreeMap<String, f64> = from_row(&bytes).unwrap();
        assert!(floats["x"] == 0.0 && floats["x"].is_sign_negative());
        let json: BTreeMap<String, serde_json::Value> = from_row(&bytes).unwrap();
        assert!(
            json["x"].as_f64().is_some_and(f64::is_sign_negative),
            "{json:?}"
        );
        // As serde_json reads `-0.0`: a float, which an integer field does not take.
        assert!(from_row::<BTreeMap<String, i64>>(&bytes).is_err());
        assert_eq!(
            serde_json::from_str::<i64>("-0.0").is_err(),
            from_row::<BTreeMap<String, i64>>(&bytes).is_err()
        );
    }

    #[test]
    fn wide_integers_also_read_from_decimal_text() {
        #[derive(Debug, Deserialize, PartialEq)]
        struct Wide {
            big: i64,
            small: i64,
            unsigned: u64,
            opt: Option<i64>,
        }
        let bytes = row(vec![
            ("big", PKind::StringValue("-9223372036854775808".into())),
            ("small", PKind::NumberValue(-3.0)),
            (
                "unsigned",
                PKind::StringValue("18446744073709551615".into()),
            ),
            ("opt", PKind::StringValue("9007199254740993".into())),
        ]);
        assert_eq!(
            from_row::<Wide>(&bytes).unwrap(),
            Wide {
                big: i64::MIN,
                small: -3,
                unsigned: u64::MAX,
                opt: Some(9_007_199_254_740_993),
            }
        );
        let bad = row(vec![
            ("big", PKind::StringValue("12x".into())),
            ("small", PKind::NumberValue(0.0)),
            ("unsigned", PKind::NumberValue(0.0)),
            ("opt", PKind::NullValue(0)),
        ]);
        let err = from_row::<Wide>(&bad).unwrap_err().to_string();
        assert!(err.contains("12x"), "{err}");
        // Floats take numeric text (and NaN / infinity) too.
        let floats: (f64, f64, f32) = from_row(&row(vec![
            ("0", PKind::StringValue("12345678901234567890.5".into())),
            ("1", PKind::StringValue("NaN".into())),
            ("2", PKind::StringValue("-Infinity".into())),
        ]))
        .map(|m: BTreeMap<String, f64>| (m["0"], m["1"], m["2"] as f32))
        .unwrap();
        assert_eq!(floats.0, 12345678901234567890.5);
        assert!(floats.1.is_nan());
        assert_eq!(floats.2, f32::NEG_INFINITY);
        // Narrower integers still want a number.
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)] // read only through Debug
        struct Narrow {
            n: i32,
        }
        let text = row(vec![("n", PKind::StringValue("5".into()))]);
        assert!(from_row::<Narrow>(&text).is_err());
    }

    #[test]
    fn a_missing_column_and_a_wrong_type_are_errors_naming_them() {
        let bytes = row(vec![("agent_name", PKind::BoolValue(true))]);
        let err = from_row::<Action<'_>>(&bytes).unwrap_err().to_string();
        assert!(err.contains("invalid type: boolean"), "{err}");
        let bytes = row(vec![("agent_name", PKind::StringValue("x".into()))]);
        let err = from_row::<Action<'_>>(&bytes).unwrap_err().to_string();
        assert!(err.contains("missing field `id`"), "{err}");
    }

    #[test]
    fn lists_enums_and_tuples_decode() {
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(rename_all = "snake_case")]
        enum Status {
            Success,
            Error,
        }
        #[derive(Debug, Deserialize, PartialEq)]
        struct Row {
            status: Status,
            tags: Vec<String>,
            pair: (u8, String),
        }
        let list = |items: Vec<PKind>| {
            PKind::ListValue(ListValue {
                values: items.into_iter().map(v).collect(),
            })
        };
        let bytes = row(vec![
            ("status", PKind::StringValue("error".into())),
            (
                "tags",
                list(vec![
                    PKind::StringValue("a".into()),
                    PKind::StringValue("b".into()),
                ]),
            ),
            (
                "pair",
                list(vec![
                    PKind::NumberValue(3.0),
                    PKind::StringValue("c".into()),
                ]),
            ),
        ]);
        let decoded: Row = from_row(&bytes).unwrap();
        assert_eq!(
            decoded,
            Row {
                status: Status::Error,
                tags: vec!["a".into(), "b".into()],
                pair: (3, "c".into()),
            }
        );
        let bad = row(vec![("status", PKind::StringValue("maybe".into()))]);
        assert!(from_row::<BTreeMap<String, Status>>(&bad).is_err());
    }

    #[test]
    fn a_response_decodes_like_query_response() {
        let rows: Vec<Struct> = (0..3)
            .map(|i| Struct {
                fields: [("n".to_string(), v(PKind::NumberValue(f64::from(i))))].into(),
            })
            .collect();
        let full = crate::db::v1::QueryResponse {
            rows: rows.clone(),
            total: Some(7),
        }
        .encode_to_vec();
        let raw = QueryRowsResponse::decode(&full[..]).unwrap();
        assert_eq!(raw.total, Some(7));
        let decoded: Vec<BTreeMap<String, u32>> = raw.decode_rows().unwrap();
        assert_eq!(
            decoded,
            (0..3)
                .map(|i| [("n".to_string(), i)].into())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn truncated_or_malformed_rows_are_errors_not_panics() {
        let bytes = row(vec![("agent_name", PKind::StringValue("planner".into()))]);
        for cut in 0..bytes.len() {
            // Every prefix either decodes (a shorter message is still a message) or fails.
            let _ = from_row::<serde_json::Value>(&bytes[..cut]);
        }
        let err = from_row::<serde_json::Value>(&bytes[..bytes.len() - 1]).unwrap_err();
        assert_eq!(err, RowError::Malformed("truncated field"));
        let raw = QueryRowsResponse {
            rows: vec![row(vec![]).into(), Bytes::from_static(&[0x0a, 0x05])],
            total: None,
        };
        let err = raw.decode_rows::<serde_json::Value>().unwrap_err();
        assert_eq!(err.to_string(), "row 1: malformed row: truncated field");
    }

    #[test]
    fn a_key_that_is_not_utf8_matches_no_field_and_is_an_error_as_a_string() {
        // One entry: key [0xff], value bool true; then agent_name = "x".
        let mut bytes = vec![0x0a, 0x07, 0x0a, 0x01, 0xff, 0x12, 0x02, 0x20, 0x01];
        bytes.extend(row(vec![("agent_name", PKind::StringValue("x".into()))]));
        #[derive(Debug, Deserialize, PartialEq)]
        struct Named {
            agent_name: String,
        }
        assert_eq!(
            from_row::<Named>(&bytes).unwrap(),
            Named {
                agent_name: "x".into()
            }
        );
        assert_eq!(
            from_row::<serde_json::Value>(&bytes).unwrap_err(),
            RowError::Malformed("string is not UTF-8")
        );
    }

    #[test]
    fn long_strings_and_multi_byte_lengths_read_like_short_ones() {
        let long = "x".repeat(300);
        let bytes = row(vec![
            ("s", PKind::StringValue(long.clone())),
            ("t", PKind::StringValue("short".into())),
        ]);
        let decoded: BTreeMap<String, String> = from_row(&bytes).unwrap();
        assert_eq!(decoded["s"], long);
        assert_eq!(decoded["t"], "short");
    }

    /// A row `{"c": v}` where `v` is a null wrapped in a list (`true`) or an object `{"a": ..}`
    /// (`false`) per element of `kinds`, innermost first; written back to front so that deep
    /// nesting costs linear time.
    fn nested_row(kinds: &[bool]) -> Vec<u8> {
        fn put(reversed: &mut Vec<u8>, start: usize, tag: u8) {
            let mut len = Vec::new();
            prost::encoding::encode_varint((reversed.len() - start) as u64, &mut len);
            reversed.extend(len.iter().rev());
            reversed.push(tag);
        }
        // Reversed bytes of the innermost Value: null_value = 0.
        let mut r = vec![0x00, 0x08];
        for &is_list in kinds {
            if is_list {
                put(&mut r, 0, 0x0a); // ListValue.values
                put(&mut r, 0, 0x32); // Value.list_value
            } else {
                put(&mut r, 0, 0x12); // entry value
                r.extend([b'a', 1, 0x0a]); // entry key "a", reversed
                put(&mut r, 0, 0x0a); // Struct.fields
                put(&mut r, 0, 0x2a); // Value.struct_value
            }
        }
        put(&mut r, 0, 0x12);
        r.extend([b'c', 1, 0x0a]);
        put(&mut r, 0, 0x0a);
        r.reverse();
        r
    }

    /// A hostile server's row nested far deeper than any reader goes is an error, not a
    /// stack overflow.
    #[test]
    fn deeply_nested_rows_are_malformed_not_a_stack_overflow() {
        for kinds in [vec![true; 200_000], vec![false; 100_000]] {
            let row = nested_row(&kinds);
            assert!(row.len() < 4 << 20, "{}", row.len());
            assert_eq!(
                from_row::<serde_json::Value>(&row).unwrap_err(),
                RowError::Malformed("nested more than 100 messages deep")
            );
            assert_eq!(
                from_row::<serde::de::IgnoredAny>(&row).unwrap_err(),
                RowError::Malformed("nested more than 100 messages deep")
            );
        }
    }

    /// The typed rows take exactly the nesting prost takes in a `QueryResponse`.
    #[test]
    fn rows_nest_as_deep_as_prost_decodes() {
        let shapes: Vec<Vec<bool>> = (40..52)
            .flat_map(|n| {
                [
                    vec![true; n],
                    vec![false; n / 2 + 8],
                    (0..n).map(|i| i % 3 == 0).collect(),
                ]
            })
            .collect();
        let (mut ok, mut refused) = (0, 0);
        for kinds in shapes {
            let row = nested_row(&kinds);
            let mut response = vec![0x0a];
            prost::encoding::encode_varint(row.len() as u64, &mut response);
            response.extend(&row);
            let by_prost = crate::db::v1::QueryResponse::decode(&response[..]);
            let ours = from_row::<serde_json::Value>(&row);
            assert_eq!(by_prost.is_ok(), ours.is_ok(), "{kinds:?}: {ours:?}");
            if let Ok(decoded) = by_prost {
                assert_eq!(ours.unwrap(), struct_json(&decoded.rows[0]));
                ok += 1;
            } else {
                refused += 1;
            }
        }
        assert!(ok > 0 && refused > 0, "{ok} {refused}");
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(v(PKind::NullValue(0))),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |n| n.is_finite())
                .prop_map(|n| v(PKind::NumberValue(n))),
            (-1_000_000i64..1_000_000).prop_map(|n| v(PKind::NumberValue(n as f64))),
            ".{0,12}".prop_map(|s| v(PKind::StringValue(s))),
            any::<bool>().prop_map(|b| v(PKind::BoolValue(b))),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|values| v(PKind::ListValue(ListValue { values }))),
                prop::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|fields| v(PKind::StructValue(Struct { fields }))),
            ]
        })
    }

    proptest! {
        /// Any Struct prost encodes reads back as the JSON of the reference mapping.
        #[test]
        fn rows_read_as_their_json(fields in prop::collection::btree_map(".{0,8}", arb_value(), 0..6)) {
            let s = Struct { fields };
            let decoded: serde_json::Value = from_row(&s.encode_to_vec()).unwrap();
            prop_assert_eq!(decoded, struct_json(&s));
        }
    }
}
