//! Result rows encoded straight into protobuf wire bytes, for the gRPC `Query` hot path.
//!
//! A `google.protobuf.Struct` per row costs a map node, a key string and a value per cell to
//! build, then again to walk while encoding and to free. Here each PostgreSQL row is written
//! once, directly as the bytes of a `Struct` inside the response's repeated `rows` field. A
//! row's cells are written as prost writes them (columns in key order); the members of a
//! nested jsonb object keep the document's order (PostgreSQL's: shorter keys first), which
//! decodes to the same map, so clients see an ordinary `QueryResponse`; [`Encoded`] carries them through tonic's prost
//! codec, and the service descriptor (reflection, grpcurl) is unchanged.
//!
//! Protobuf messages may be concatenated: parsing `a ++ b` merges them, appending repeated
//! fields. A response is therefore its scalar fields encoded by prost followed by the rows.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{encode_varint, encoded_len_varint};
use serde::de;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::error::DbError;
use crate::values::{
    Cell, LIST_LEVELS, OBJECT_LEVELS, ResultColumns, Rfc3339, TOO_DEEP, VALUE_MAX_LEVELS,
    json_error,
};

/// Field numbers and wire types of `google.protobuf.Struct` / `Value`.
const STRUCT_FIELDS: u8 = 1 << 3 | 2; // map<string, Value> fields = 1 (length-delimited)
const ENTRY_KEY: u8 = 1 << 3 | 2;
const ENTRY_VALUE: u8 = 2 << 3 | 2;
const VALUE_NULL: u8 = 1 << 3; // NullValue null_value = 1 (varint)
const VALUE_NUMBER: u8 = 2 << 3 | 1; // double number_value = 2 (64-bit)
const VALUE_STRING: u8 = 3 << 3 | 2; // string string_value = 3
const VALUE_BOOL: u8 = 4 << 3; // bool bool_value = 4 (varint)

/// Appends the `Value` message bytes of `cell` to `out`.
pub fn encode_cell(cell: &Cell<'_>, out: &mut Vec<u8>) {
    match cell {
        Cell::Null => out.extend_from_slice(&[VALUE_NULL, 0]),
        Cell::Bool(b) => out.extend_from_slice(&[VALUE_BOOL, u8::from(*b)]),
        Cell::Number(f) => {
            out.push(VALUE_NUMBER);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Cell::Str(s) => encode_string(s, out),
        Cell::Uuid(u) => {
            encode_string(u.hyphenated().encode_lower(&mut Uuid::encode_buffer()), out)
        }
        Cell::Time(t) => encode_string(Rfc3339::new().format(t), out),
        Cell::Text(s) => encode_string(s, out),
        Cell::Json(v) => v.encode_raw(out),
    }
}

/// Appends the `Value` message bytes of the JSON document `json` to `out`, straight from the
/// text (no `Value` tree is built). Objects keep the document's member order; a member that
/// appears twice appears twice, and a protobuf map reader keeps the last one, as the `Struct`
/// path does. Nested deeper than `VALUE_MAX_LEVELS` protobuf messages is an error, as there.
pub fn encode_json(json: &[u8], out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let json = crate::wide_json_integers::quote_wide_integers(json);
    let mut de = serde_json::Deserializer::from_slice(&json);
    de::DeserializeSeed::deserialize(JsonToWire { out, level: 1 }, &mut de).and_then(|()| de.end())
}

const VALUE_STRUCT: u8 = 5 << 3 | 2; // Struct struct_value = 5
const VALUE_LIST: u8 = 6 << 3 | 2; // ListValue list_value = 6
const LIST_VALUES: u8 = 1 << 3 | 2; // repeated Value values = 1

/// Starts a length-delimited field whose length is not known yet: one byte is reserved.
fn open_len(out: &mut Vec<u8>) -> usize {
    out.push(0);
    out.len()
}

/// Writes the length of the field opened at `start`, widening the reserved byte if needed.
fn close_len(out: &mut Vec<u8>, start: usize) {
    let len = out.len() - start;
    if len < 0x80 {
        out[start - 1] = len as u8;
    } else {
        let mut prefix = Vec::with_capacity(4);
        encode_varint(len as u64, &mut prefix);
        out.splice(start - 1..start, prefix);
    }
}

/// Writes one JSON value as `google.protobuf.Value` bytes; the `Value` sits `level` protobuf
/// messages deep (the column's own is 1).
struct JsonToWire<'a> {
    out: &'a mut Vec<u8>,
    level: usize,
}

impl<'de> de::DeserializeSeed<'de> for JsonToWire<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.level > VALUE_MAX_LEVELS {
            return Err(de::Error::custom(TOO_DEEP));
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> de::Visitor<'de> for JsonToWire<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        encode_cell(&Cell::Null, self.out);
        Ok(())
    }
    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        encode_cell(&Cell::Bool(b), self.out);
        Ok(())
    }
    // Integers beyond a double's exact range as decimal text, as bigint columns.
    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        encode_cell(&Cell::bigint(n), self.out);
        Ok(())
    }
    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        encode_cell(&Cell::json_u64(n), self.out);
        Ok(())
    }
    fn visit_f64<E>(self, f: f64) -> Result<(), E> {
        encode_cell(&Cell::number(f), self.out);
        Ok(())
    }
    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        encode_string(s, self.out);
        Ok(())
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // The ListValue, even an empty one.
        if self.level + 1 > VALUE_MAX_LEVELS {
            return Err(de::Error::custom(TOO_DEEP));
        }
        let (out, level) = (self.out, self.level + LIST_LEVELS);
        out.push(VALUE_LIST);
        let list = open_len(out);
        loop {
            out.push(LIST_VALUES);
            let item = open_len(out);
            if seq.next_element_seed(JsonToWire { out, level })?.is_none() {
                out.truncate(item - 2);
                break;
            }
            close_len(out, item);
        }
        close_len(out, list);
        Ok(())
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // The Struct, even an empty one.
        if self.level + 1 > VALUE_MAX_LEVELS {
            return Err(de::Error::custom(TOO_DEEP));
        }
        let (out, level) = (self.out, self.level + OBJECT_LEVELS);
        out.push(VALUE_STRUCT);
        let fields = open_len(out);
        loop {
            out.push(STRUCT_FIELDS);
            let entry = open_len(out);
            if map.next_key_seed(KeyToWire(out))?.is_none() {
                out.truncate(entry - 2);
                break;
            }
            out.push(ENTRY_VALUE);
            let value = open_len(out);
            map.next_value_seed(JsonToWire { out, level })?;
            close_len(out, value);
            close_len(out, entry);
        }
        close_len(out, fields);
        Ok(())
    }
}

/// Writes an object member's name as the key field of a map entry.
struct KeyToWire<'a>(&'a mut Vec<u8>);

impl<'de> de::DeserializeSeed<'de> for KeyToWire<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> de::Visitor<'de> for KeyToWire<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object member name")
    }
    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        put_len_delimited(ENTRY_KEY, s.as_bytes(), self.0);
        Ok(())
    }
}

fn encode_string(s: &str, out: &mut Vec<u8>) {
    put_len_delimited(VALUE_STRING, s.as_bytes(), out);
}

/// Appends a length-delimited field: its one-byte key (`tag`), the length of `bytes`, `bytes`.
fn put_len_delimited(tag: u8, bytes: &[u8], out: &mut impl BufMut) {
    out.put_u8(tag);
    encode_varint(bytes.len() as u64, out);
    out.put_slice(bytes);
}

/// Writes rows of one result set as `Struct` messages in the repeated field `field` of the
/// enclosing response.
pub struct RowEncoder {
    columns: ResultColumns,
    /// Per output entry, in key order: the encoded key field and the column index (a name
    /// that appears twice keeps its last column, as a map does).
    entries: Vec<(Vec<u8>, usize)>,
    field_tag: u8,
    row: Vec<u8>,
    value: Vec<u8>,
}

impl RowEncoder {
    /// An encoder for rows with these columns, into field number `field` (1-15).
    pub fn new(columns: ResultColumns, field: u8) -> Self {
        let by_name: std::collections::BTreeMap<&str, usize> =
            columns.names().enumerate().map(|(i, n)| (n, i)).collect();
        let entries = by_name
            .into_iter()
            .map(|(name, i)| {
                let mut key = Vec::new();
                put_len_delimited(ENTRY_KEY, name.as_bytes(), &mut key);
                (key, i)
            })
            .collect();
        Self {
            columns,
            entries,
            field_tag: field << 3 | 2,
            row: Vec::with_capacity(512),
            value: Vec::with_capacity(64),
        }
    }

    /// Appends one row, as a length-delimited `Struct` in the rows field, to `out`.
    pub fn push(&mut self, row: &PgRow, out: &mut BytesMut) -> Result<(), DbError> {
        self.row.clear();
        for (key, i) in &self.entries {
            self.value.clear();
            match self.columns.json_text(row, *i)? {
                Some(Some(text)) => encode_json(text, &mut self.value)
                    .map_err(|e| json_error(self.columns.name(*i), text, e))?,
                Some(None) => encode_cell(&Cell::Null, &mut self.value),
                None => encode_cell(&self.columns.cell(row, *i)?, &mut self.value),
            }
            let entry_len =
                key.len() + 1 + encoded_len_varint(self.value.len() as u64) + self.value.len();
            self.row.push(STRUCT_FIELDS);
            encode_varint(entry_len as u64, &mut self.row);
            self.row.extend_from_slice(key);
            put_len_delimited(ENTRY_VALUE, &self.value, &mut self.row);
        }
        put_len_delimited(self.field_tag, &self.row, out);
        Ok(())
    }
}

/// A result set as the bytes of a response's repeated `Struct` field.
#[derive(Debug, Default)]
pub struct EncodedRows {
    pub bytes: BytesMut,
}

impl EncodedRows {
    /// Encodes `rows`, from column index `first_column` on, into field number `field`.
    pub fn encode(rows: &[PgRow], first_column: usize, field: u8) -> Result<Self, DbError> {
        let Some(first) = rows.first() else {
            return Ok(Self::default());
        };
        let columns = ResultColumns::from_column(first, first_column)?;
        let mut encoder = RowEncoder::new(columns, field);
        // A guess that avoids most regrowth: rows of a result set have similar sizes.
        let mut bytes = BytesMut::with_capacity(rows.len() * 256);
        for row in rows {
            encoder.push(row, &mut bytes)?;
        }
        Ok(Self { bytes })
    }
}

/// A message whose bytes were produced in advance: prost writes them verbatim. Only ever
/// encoded (server responses); decoding one skips every field.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Encoded(pub Bytes);

impl Encoded {
    /// `head` (a prost message holding the scalar fields) followed by the pre-encoded rows.
    pub fn with_rows(head: &impl Message, rows: EncodedRows) -> Self {
        if head.encoded_len() == 0 {
            // Nothing to put in front (no total asked for): the rows are the message.
            return Encoded(rows.bytes.freeze());
        }
        let mut out = BytesMut::with_capacity(head.encoded_len() + rows.bytes.len());
        // Cannot fail: the buffer grows as needed.
        let _ = head.encode(&mut out);
        out.extend_from_slice(&rows.bytes);
        Encoded(out.freeze())
    }
}

impl Message for Encoded {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::value::Kind;

    fn value(kind: Kind) -> prost_types::Value {
        prost_types::Value { kind: Some(kind) }
    }

    /// Each cell encodes exactly as prost encodes the `Value` the Struct path builds.
    #[test]
    fn cells_encode_like_prost_values() {
        let nested = value(Kind::StructValue(prost_types::Struct {
            fields: [("k".to_string(), value(Kind::ListValue(Default::default())))]
                .into_iter()
                .collect(),
        }));
        let cells = [
            Cell::Null,
            Cell::Bool(true),
            Cell::Bool(false),
            Cell::Number(0.0),
            Cell::Number(-1.5e300),
            Cell::Str(""),
            Cell::Str("ünïcode"),
            Cell::Text("x".repeat(300)),
            Cell::Uuid(uuid::Uuid::from_u128(
                0x1234_5678_9abc_def0_0fed_cba9_8765_4321,
            )),
            Cell::Time(chrono::DateTime::from_timestamp(1_764_523_265, 123_456_000).unwrap()),
            Cell::Json(nested),
        ];
        for cell in cells {
            let mut ours = Vec::new();
            encode_cell(&cell, &mut ours);
            let theirs = cell.into_value().encode_to_vec();
            assert_eq!(ours, theirs);
        }
    }

    /// JSON documents transcode to the `Value` the `Struct` path builds for them (compared
    /// decoded: members keep the document's order on the wire).
    #[test]
    fn jsonb_doubles_come_back_exactly() {
        // 17-digit doubles as Python's repr and ryu write them, and as PostgreSQL prints jsonb
        // numbers; a best-effort parse is 1 ULP off for the first.
        for x in [
            21.489705265908874,
            0.30000000000000004,
            1e-7,
            123456.78901234567,
        ] {
            let text = format!("{x:?}");
            let mut ours = Vec::new();
            encode_json(text.as_bytes(), &mut ours).unwrap();
            let decoded = prost_types::Value::decode(ours.as_slice()).unwrap();
            assert_eq!(
                decoded.kind,
                Some(prost_types::value::Kind::NumberValue(x)),
                "{text}"
            );
        }
    }

    #[test]
    fn json_transcodes_to_the_same_values() {
        let long = "x".repeat(300);
        let many: Vec<String> = (0..200)
            .map(|i| format!(r#""k{i}": [{i}, "{i}"]"#))
            .collect();
        let docs = [
            "null".to_string(),
            "true".to_string(),
            "-0.5".to_string(),
            "18446744073709551615".to_string(),
            r#""\u00fc\n\"""#.to_string(),
            "[]".to_string(),
            "{}".to_string(),
            r#"{"a": 1, "b": [true, null, "x", [], {}], "c": {"d": 1.5}, "a": 2}"#.to_string(),
            format!(r#"{{"long": "{long}", "nested": [[[{{"deep": ["{long}"]}}]]]}}"#),
            format!("{{{}}}", many.join(",")),
        ];
        for doc in &docs {
            let mut ours = Vec::new();
            encode_json(doc.as_bytes(), &mut ours).unwrap();
            let decoded = prost_types::Value::decode(ours.as_slice()).unwrap();
            let crate::values::ProtoValue(expected) = serde_json::from_str(doc).unwrap();
            assert_eq!(decoded, expected, "{doc}");
        }
        // A scalar or an empty container is written exactly as prost writes it.
        for doc in ["null", "false", "2", r#""s""#, "[]", "{}", r#"{"k": [1]}"#] {
            let mut ours = Vec::new();
            encode_json(doc.as_bytes(), &mut ours).unwrap();
            let crate::values::ProtoValue(expected) = serde_json::from_str(doc).unwrap();
            assert_eq!(ours, expected.encode_to_vec(), "{doc}");
        }
        for bad in ["", "{", "[1,]", "nul", "1 2"] {
            assert!(
                encode_json(bad.as_bytes(), &mut Vec::new()).is_err(),
                "{bad}"
            );
        }
    }

    /// A response holding one row whose column `c` is the `Value` bytes `value`.
    fn response_with(value: &[u8]) -> Vec<u8> {
        let mut entry = Vec::new();
        put_len_delimited(ENTRY_KEY, b"c", &mut entry);
        put_len_delimited(ENTRY_VALUE, value, &mut entry);
        let mut row = Vec::new();
        put_len_delimited(STRUCT_FIELDS, &entry, &mut row);
        let mut response = Vec::new();
        put_len_delimited(1 << 3 | 2, &row, &mut response);
        response
    }

    /// Whether every response type that carries rows decodes `bytes` with prost.
    fn prost_decodes(bytes: &[u8]) -> bool {
        use omnibus_proto::db::v1 as pb;
        let all = [
            pb::QueryResponse::decode(bytes).is_ok(),
            pb::StreamQueryResponse::decode(bytes).is_ok(),
            pb::InsertResponse::decode(bytes).is_ok(),
            pb::UpdateResponse::decode(bytes).is_ok(),
            pb::UpsertResponse::decode(bytes).is_ok(),
            pb::DeleteResponse::decode(bytes).is_ok(),
            pb::ExecuteRawResponse::decode(bytes).is_ok(),
        ];
        assert!(all.iter().all(|&ok| ok == all[0]), "{all:?}");
        all[0]
    }

    /// `n` lists around `inner`.
    fn lists(n: usize, inner: &str) -> String {
        format!("{}{inner}{}", "[".repeat(n), "]".repeat(n))
    }

    /// A jsonb value at the limit transcodes and the response decodes with the prost-generated
    /// types (prost stops at 100 nested messages); one level more is refused by db-svc, on both
    /// read paths, rather than sent as a response clients cannot decode.
    #[test]
    fn json_at_the_depth_limit_decodes_with_prost_and_deeper_is_refused() {
        use crate::error::DbError;
        use crate::values::json_error;
        let objects =
            |n: usize, inner: &str| format!("{}{inner}{}", r#"{"k": "#.repeat(n), "}".repeat(n));
        // 96 levels each: 48 empty lists; 47 lists and a scalar; 31 objects and `[1]`; 46
        // lists and an object.
        let at_limit = [
            lists(48, ""),
            lists(47, "1"),
            objects(31, "[1]"),
            lists(46, r#"{"a": 1}"#),
        ];
        for doc in &at_limit {
            let mut value = Vec::new();
            encode_json(doc.as_bytes(), &mut value).unwrap();
            let response = response_with(&value);
            assert!(prost_decodes(&response), "{doc}");
            let decoded = pb_rows(&response);
            let crate::values::ProtoValue(expected) = serde_json::from_str(doc).unwrap();
            assert_eq!(decoded.fields["c"], expected, "{doc}");
        }
        for doc in [
            lists(49, ""),
            lists(48, "1"),
            objects(31, "[[]]"),
            lists(46, r#"{"a": []}"#),
        ] {
            let e = encode_json(doc.as_bytes(), &mut Vec::new()).unwrap_err();
            let parsed = serde_json::from_str::<crate::values::ProtoValue>(&doc)
                .err()
                .unwrap();
            for e in [e, parsed] {
                match json_error("c", doc.as_bytes(), e) {
                    DbError::Unrepresentable { column, message } => {
                        assert_eq!(column, "c");
                        assert!(message.contains("at most 96 fit"), "{message}");
                    }
                    other => panic!("{doc}: {other:?}"),
                }
            }
        }
        // The margin is real: prost takes two levels more (the column's `Value` is the
        // response's third nested message, so 98 levels end at message 100), not three.
        let prost_lists = |n: usize, inner: Option<prost_types::Value>| {
            let mut v = inner;
            for _ in 0..n {
                v = Some(value(Kind::ListValue(prost_types::ListValue {
                    values: v.into_iter().collect(),
                })));
            }
            v.map(|v| v.encode_to_vec()).unwrap_or_default()
        };
        // 49 lists, the innermost empty: 98 levels.
        assert!(prost_decodes(&response_with(&prost_lists(49, None))));
        // 49 lists around a null: 99 levels.
        let null = Some(value(Kind::NullValue(0)));
        assert!(!prost_decodes(&response_with(&prost_lists(49, null))));
    }

    fn pb_rows(response: &[u8]) -> prost_types::Struct {
        use omnibus_proto::db::v1 as pb;
        let mut rows = pb::QueryResponse::decode(response).unwrap().rows;
        assert_eq!(rows.len(), 1);
        rows.remove(0)
    }

    /// `head ++ rows` decodes as one message with the rows appended.
    #[test]
    fn concatenated_head_and_rows_decode_as_one_response() {
        use omnibus_proto::db::v1 as pb;
        let row = prost_types::Struct {
            fields: [("a".to_string(), value(Kind::NumberValue(1.0)))]
                .into_iter()
                .collect(),
        };
        let rows = EncodedRows {
            bytes: BytesMut::from(
                &pb::QueryResponse {
                    rows: vec![row.clone(), row.clone()],
                    total: None,
                }
                .encode_to_vec()[..],
            ),
        };
        let head = pb::QueryResponse {
            rows: Vec::new(),
            total: Some(7),
        };
        let encoded = Encoded::with_rows(
            &head,
            EncodedRows {
                bytes: rows.bytes.clone(),
            },
        );
        let decoded = pb::QueryResponse::decode(encoded.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.total, Some(7));
        assert_eq!(decoded.rows, vec![row.clone(), row.clone()]);
        // Without a total the rows alone are the response.
        let encoded = Encoded::with_rows(&pb::QueryResponse::default(), rows);
        let decoded = pb::QueryResponse::decode(encoded.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.total, None);
        assert_eq!(decoded.rows, vec![row.clone(), row]);
    }
}
