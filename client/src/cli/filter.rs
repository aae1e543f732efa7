//! The human filter syntax shared by `omnibus db` and `omnibus tail` (pure, no I/O):
//!
//! ```text
//! --where agent_name=coder        --where 'duration_ms>100'     --where 'agent_name~cod%'
//! --where 'agent_name in (coder,tester)'   --where 'project_name is null'
//! --order created_at:desc         --order agent_name,duration_ms:desc:nulls_last
//! ```
//!
//! Conditions are parsed into [`Condition`]s with raw text values; [`typed_value`] turns a raw
//! value into the JSON value a column of a given type expects (so `agent_name=123` stays the
//! string "123"), and [`to_filter`] builds the db-svc filter tree. [`matches`] evaluates the same
//! conditions against a JSON object, for the live streams.

use std::collections::HashMap;

use omnibus_proto::db::v1 as pb;
use serde_json::Value;

/// A comparison operator as written on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
    /// `~`: SQL LIKE (`%` any run, `_` one character).
    Like,
    /// `~*`: case-insensitive LIKE.
    ILike,
    In,
    NotIn,
    IsNull,
    IsNotNull,
    /// `@>`: jsonb contains.
    Contains,
}

/// A raw operand: text as written, and whether it was quoted (quoted text is always a string).
#[derive(Clone, Debug, PartialEq)]
pub struct Raw {
    pub text: String,
    pub quoted: bool,
}

/// One `--where` condition.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub column: String,
    pub op: Op,
    /// One value for comparisons, the list for `in`, none for `is [not] null`.
    pub values: Vec<Raw>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FilterError {
    #[error(
        "'{0}' is not a condition: write column OP value, e.g. agent_name=coder, 'duration_ms>100', 'agent_name in (a,b)', 'project_name is null'"
    )]
    Malformed(String),
    #[error("'{0}' does not name a column (letters, digits and _ only)")]
    BadColumn(String),
    #[error("'{expr}': {reason}")]
    BadValue { expr: String, reason: String },
    #[error(
        "'{0}' is not an ordering: write column[:asc|desc][:nulls_first|nulls_last], e.g. created_at:desc"
    )]
    BadOrder(String),
}

/// Symbolic operators, longest first so `>=` is not read as `>`.
const SYMBOLS: &[(&str, Op)] = &[
    ("!=", Op::Neq),
    ("<>", Op::Neq),
    (">=", Op::Gte),
    ("<=", Op::Lte),
    ("~*", Op::ILike),
    ("@>", Op::Contains),
    ("=", Op::Eq),
    (">", Op::Gt),
    ("<", Op::Lt),
    ("~", Op::Like),
];

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Parses one `--where` expression.
pub fn parse_condition(expr: &str) -> Result<Condition, FilterError> {
    let s = expr.trim();
    let col_end = s.find(|c: char| !is_ident_char(c)).unwrap_or(s.len());
    let column = &s[..col_end];
    if column.is_empty() {
        return Err(if s.is_empty() {
            FilterError::Malformed(expr.to_string())
        } else {
            FilterError::BadColumn(expr.to_string())
        });
    }
    let rest = s[col_end..].trim_start();
    let bad_value = |reason: &str| FilterError::BadValue {
        expr: expr.to_string(),
        reason: reason.to_string(),
    };
    // Word operators: is [not] null, [not] in (...).
    let lower = rest.to_ascii_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    match words.as_slice() {
        ["is", "null"] => return Ok(cond(column, Op::IsNull, Vec::new())),
        ["is", "not", "null"] => return Ok(cond(column, Op::IsNotNull, Vec::new())),
        _ => {}
    }
    for (word, op) in [("not in", Op::NotIn), ("in", Op::In)] {
        if let Some(after) = strip_word(rest, word) {
            let list = after.trim();
            let inner = list
                .strip_prefix('(')
                .and_then(|l| l.strip_suffix(')'))
                .ok_or_else(|| bad_value("a list goes in parentheses: in (a,b,c)"))?;
            let values = split_list(inner).map_err(|r| bad_value(&r))?;
            if values.is_empty() {
                return Err(bad_value("the list is empty"));
            }
            return Ok(cond(column, op, values));
        }
    }
    for (sym, op) in SYMBOLS {
        if let Some(after) = rest.strip_prefix(sym) {
            let value = parse_scalar(after.trim()).map_err(|r| bad_value(&r))?;
            // `col=null` is "is null" (as in the where shorthand), for every command alike:
            // db's typing and tail's matching, which would otherwise look for the text "null".
            let null = !value.quoted && value.text.eq_ignore_ascii_case("null");
            return Ok(match op {
                Op::Eq if null => cond(column, Op::IsNull, Vec::new()),
                Op::Neq if null => cond(column, Op::IsNotNull, Vec::new()),
                _ => cond(column, *op, vec![value]),
            });
        }
    }
    if rest.is_empty() {
        Err(FilterError::Malformed(expr.to_string()))
    } else if !rest.starts_with(char::is_whitespace)
        && !s[col_end..].starts_with(char::is_whitespace)
    {
        Err(FilterError::BadColumn(expr.to_string()))
    } else {
        Err(FilterError::Malformed(expr.to_string()))
    }
}

fn cond(column: &str, op: Op, values: Vec<Raw>) -> Condition {
    Condition {
        column: column.to_string(),
        op,
        values,
    }
}

/// `rest` without a leading keyword (case-insensitive, followed by space or `(`).
fn strip_word<'a>(rest: &'a str, word: &str) -> Option<&'a str> {
    let mut r = rest;
    for part in word.split(' ') {
        let head = r.get(..part.len())?;
        if !head.eq_ignore_ascii_case(part) {
            return None;
        }
        let after = &r[part.len()..];
        if !(after.starts_with(char::is_whitespace) || after.starts_with('(')) {
            return None;
        }
        r = after.trim_start();
    }
    Some(r)
}

fn parse_scalar(text: &str) -> Result<Raw, String> {
    if let Some(q) = text.chars().next().filter(|c| *c == '\'' || *c == '"') {
        let inner = text[1..]
            .strip_suffix(q)
            .ok_or_else(|| format!("unterminated quote in {text}"))?;
        return Ok(Raw {
            text: inner.to_string(),
            quoted: true,
        });
    }
    Ok(Raw {
        text: text.to_string(),
        quoted: false,
    })
}

/// Splits `a, 'b,c', d` at commas outside quotes.
fn split_list(inner: &str) -> Result<Vec<Raw>, String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    for c in inner.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                current.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                current.push(c);
            }
            (None, ',') => {
                items.push(parse_scalar(current.trim())?);
                current.clear();
            }
            _ => current.push(c),
        }
    }
    if quote.is_some() {
        return Err("unterminated quote in the list".into());
    }
    if !current.trim().is_empty() || !items.is_empty() {
        items.push(parse_scalar(current.trim())?);
    }
    Ok(items)
}

/// The CLI's type for a `numeric` column (its db-svc JSON type is `number`, as for doubles).
pub const DECIMAL: &str = "decimal";

/// Whether the decimal literal `t` is the value of the double it parses to, as that double's
/// shortest form writes it (`0.30000000000000004` is; `12345678901234567.89` is not): then
/// sending the double changes nothing.
/// Whether `t` is written as a number is (an integer part without leading zeros, no `+`);
/// text that does not look like a number at all passes too (the parse decides).
fn number_as_written(t: &str) -> bool {
    let unsigned = t.strip_prefix('-').unwrap_or(t);
    if unsigned.starts_with('+') {
        return false;
    }
    let int = unsigned.split(['.', 'e', 'E']).next().unwrap_or_default();
    !(int.len() > 1 && int.starts_with('0') && int.chars().all(|c| c.is_ascii_digit()))
}

fn exact_as_double(t: &str) -> bool {
    match t.parse::<f64>() {
        Ok(f) if f.is_finite() => decimal_parts(t) == decimal_parts(&format!("{f:e}")),
        _ => false,
    }
}

/// A decimal literal as (negative, significant digits, exponent) with value
/// 0.digits x 10^exponent; zero is (false, "", 0). None if it is not a decimal literal.
fn decimal_parts(t: &str) -> Option<(bool, String, i64)> {
    let (mantissa, exponent) = match t.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().ok()?),
        None => (t, 0),
    };
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa.strip_prefix('+').unwrap_or(mantissa)),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if !(int.chars().chain(frac.chars())).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let digits = format!("{int}{frac}");
    let leading = digits.len() - digits.trim_start_matches('0').len();
    let significant = digits.trim_start_matches('0').trim_end_matches('0');
    if significant.is_empty() {
        return Some((false, String::new(), 0));
    }
    let exponent = exponent
        .checked_add(i64::try_from(int.len()).ok()?)?
        .checked_sub(i64::try_from(leading).ok()?)?;
    Some((negative, significant.to_string(), exponent))
}

/// The JSON value for `raw` in a column whose db-svc JSON type is `json_type`
/// (`string`, `integer`, `number`, `boolean`, `json`, or [`DECIMAL`] for numeric; `None` =
/// unknown, guess).
pub fn typed_value(raw: &Raw, json_type: Option<&str>) -> Result<Value, String> {
    let t = raw.text.as_str();
    if raw.quoted {
        return Ok(Value::String(raw.text.clone()));
    }
    if t.eq_ignore_ascii_case("null") {
        return Ok(Value::Null);
    }
    match json_type {
        Some("string") => Ok(Value::String(raw.text.clone())),
        Some("integer") | Some("number") => t
            .parse::<i64>()
            .ok()
            // Outside the safe integers, ±(2^53 - 1), a JSON number may lose digits (and
            // db-svc refuses it): bigint takes the decimal string.
            .filter(|i| i.unsigned_abs() < 1 << 53)
            .map(Value::from)
            .ok_or(())
            .or_else(|_| {
                // Any integer literal, however long (i128 alone would let a longer one be
                // rounded through the double below).
                if is_integer_literal(t) {
                    return Err(());
                }
                t.parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .ok_or(())
            })
            // numeric/bigint also take decimal strings; let db-svc judge the rest.
            .or_else(|_| Ok(Value::String(raw.text.clone()))),
        // Exactly as typed: a safe integer as a number, anything else as the decimal text
        // db-svc keeps exactly (a double would round `12345678901234567.89`).
        Some(DECIMAL) => Ok(t
            .parse::<i64>()
            .ok()
            .filter(|i| i.unsigned_abs() < 1 << 53)
            .map_or_else(|| Value::String(raw.text.clone()), Value::from)),
        Some("boolean") => match t.to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "1" => Ok(Value::Bool(true)),
            "false" | "f" | "no" | "0" => Ok(Value::Bool(false)),
            _ => Err(format!("'{t}' is not true or false")),
        },
        // A bare word is a JSON string for convenience, but what starts like an object or a
        // list must be one: storing a typo as a string would hide it.
        Some("json") => match serde_json::from_str(t) {
            Ok(v) => Ok(v),
            Err(e) if t.starts_with(['{', '[']) => Err(format!("'{t}' is not valid JSON: {e}")),
            Err(_) => Ok(Value::String(raw.text.clone())),
        },
        _ => Ok(guess(t)),
    }
}

/// Whether `t` is an integer written as digits, with an optional sign.
fn is_integer_literal(t: &str) -> bool {
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A literal's most likely JSON value: a number, true/false, a JSON object/array, else text.
/// A number a double would not carry exactly (a safe integer, or as many digits as a double
/// keeps) stays its text, which db-svc reads exactly where the type takes text (numeric,
/// bigint) and refuses where it does not, rather than receiving a rounded value.
pub fn guess(t: &str) -> Value {
    // `007`, `+5`: written so, they are codes or labels, not numbers (a number would lose
    // what makes them so).
    if !number_as_written(t) {
        return Value::String(t.to_string());
    }
    if let Ok(i) = t.parse::<i64>() {
        if i.unsigned_abs() < 1 << 53 {
            return Value::from(i);
        }
        return Value::String(t.to_string());
    }
    if let Some(n) = t
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && exact_as_double(t))
        .and_then(serde_json::Number::from_f64)
    {
        return Value::Number(n);
    }
    match t {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        _ => {}
    }
    if (t.starts_with('{') || t.starts_with('['))
        && let Ok(v) = serde_json::from_str(t)
    {
        return v;
    }
    Value::String(t.to_string())
}

/// Column name → db-svc JSON type, from DescribeTable.
pub type ColumnTypes = HashMap<String, String>;

/// The db-svc filter tree for `conditions` (AND); `None` when there are none.
pub fn to_filter(
    conditions: &[Condition],
    types: &ColumnTypes,
) -> Result<Option<pb::Filter>, String> {
    let mut filters = Vec::new();
    for c in conditions {
        let ty = types.get(&c.column).map(String::as_str);
        let typed = |r: &Raw| typed_value(r, ty).map_err(|e| format!("{}: {e}", c.column));
        let (op, value) = match c.op {
            Op::IsNull => (pb::Operator::IsNull, None),
            Op::IsNotNull => (pb::Operator::IsNotNull, None),
            Op::In | Op::NotIn => {
                let list = c.values.iter().map(typed).collect::<Result<Vec<_>, _>>()?;
                let op = if c.op == Op::In {
                    pb::Operator::In
                } else {
                    pb::Operator::NotIn
                };
                (op, Some(Value::Array(list)))
            }
            other => {
                let v = typed(&c.values[0])?;
                // `col=null` reads as "is null", as in the where shorthand.
                match (other, &v) {
                    (Op::Eq, Value::Null) => (pb::Operator::IsNull, None),
                    (Op::Neq, Value::Null) => (pb::Operator::IsNotNull, None),
                    _ => (scalar_op(other), Some(v)),
                }
            }
        };
        filters.push(pb::Filter {
            kind: Some(pb::filter::Kind::Condition(pb::Condition {
                column: c.column.clone(),
                op: op as i32,
                value: value.map(|v| json_to_value(&v)),
            })),
        });
    }
    Ok(match filters.len() {
        0 => None,
        1 => filters.pop(),
        _ => Some(pb::Filter {
            kind: Some(pb::filter::Kind::All(pb::FilterList { filters })),
        }),
    })
}

fn scalar_op(op: Op) -> pb::Operator {
    match op {
        Op::Eq => pb::Operator::Eq,
        Op::Neq => pb::Operator::Neq,
        Op::Gt => pb::Operator::Gt,
        Op::Gte => pb::Operator::Gte,
        Op::Lt => pb::Operator::Lt,
        Op::Lte => pb::Operator::Lte,
        Op::Like => pb::Operator::Like,
        Op::ILike => pb::Operator::Ilike,
        Op::Contains => pb::Operator::Contains,
        Op::In => pb::Operator::In,
        Op::NotIn => pb::Operator::NotIn,
        Op::IsNull => pb::Operator::IsNull,
        Op::IsNotNull => pb::Operator::IsNotNull,
    }
}

/// Parses `--order` terms: `col`, `col:desc`, `col:asc:nulls_last`; commas separate terms.
pub fn parse_order(spec: &str) -> Result<Vec<pb::OrderBy>, FilterError> {
    let mut out = Vec::new();
    for term in spec.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let mut parts = term.split(':');
        let column = parts.next().unwrap_or_default();
        if column.is_empty() || !column.chars().all(is_ident_char) {
            return Err(FilterError::BadOrder(term.to_string()));
        }
        let mut order = pb::OrderBy {
            column: column.to_string(),
            ..Default::default()
        };
        for p in parts {
            match p.to_ascii_lowercase().replace('-', "_").as_str() {
                "asc" => order.direction = pb::Direction::Asc as i32,
                "desc" => order.direction = pb::Direction::Desc as i32,
                "nulls_first" | "nullsfirst" => order.nulls = pb::Nulls::First as i32,
                "nulls_last" | "nullslast" => order.nulls = pb::Nulls::Last as i32,
                _ => return Err(FilterError::BadOrder(term.to_string())),
            }
        }
        out.push(order);
    }
    if out.is_empty() {
        return Err(FilterError::BadOrder(spec.to_string()));
    }
    Ok(out)
}

/// Parses `column=value` assignments (for insert/update/upsert).
pub fn parse_assignment(expr: &str) -> Result<(String, Raw), FilterError> {
    let (col, value) = expr.split_once('=').ok_or_else(|| FilterError::BadValue {
        expr: expr.to_string(),
        reason: "write column=value".into(),
    })?;
    let col = col.trim();
    if col.is_empty() || !col.chars().all(is_ident_char) {
        return Err(FilterError::BadColumn(expr.to_string()));
    }
    let raw = parse_scalar(value.trim()).map_err(|reason| FilterError::BadValue {
        expr: expr.to_string(),
        reason,
    })?;
    Ok((col.to_string(), raw))
}

/// serde_json → google.protobuf.Value.
pub fn json_to_value(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn json_to_struct(o: &serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: o
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

/// google.protobuf.Value → serde_json (integral doubles print as integers).
pub fn value_to_json(v: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            // -0.0 keeps its sign (no integer carries it).
            if n.fract() == 0.0 && n.abs() < 9.0e15 && !(*n == 0.0 && n.is_sign_negative()) {
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
    }
}

pub fn struct_to_json(s: &prost_types::Struct) -> serde_json::Map<String, Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

/// Field aliases for the live streams: `agent` is whichever agent field an event has.
const AGENT_FIELDS: &[&str] = &[
    "agent_name",
    "selected_agent",
    "source_agent",
    "target_agent",
    "agent",
];

/// Whether a stream event (its proto3 JSON with proto field names) satisfies every condition.
/// A condition on a field the event does not have does not hold, except `agent`, which holds
/// when any of the event's agent fields does.
pub fn matches(conditions: &[Condition], event: &serde_json::Map<String, Value>) -> bool {
    conditions.iter().all(|c| {
        if c.column == "agent" {
            AGENT_FIELDS
                .iter()
                .filter_map(|f| event.get(*f))
                .any(|v| holds(c, Some(v)))
        } else {
            match event.get(&c.column) {
                Some(v) => holds(c, Some(v)),
                None => matches!(c.op, Op::IsNull),
            }
        }
    })
}

fn holds(c: &Condition, v: Option<&Value>) -> bool {
    let v = v.unwrap_or(&Value::Null);
    let is_null = v.is_null();
    match c.op {
        Op::IsNull => is_null,
        Op::IsNotNull => !is_null,
        _ if is_null => false,
        Op::In => c.values.iter().any(|r| equal(v, r)),
        Op::NotIn => !c.values.iter().any(|r| equal(v, r)),
        Op::Eq => equal(v, &c.values[0]),
        Op::Neq => !equal(v, &c.values[0]),
        Op::Gt | Op::Gte | Op::Lt | Op::Lte => {
            let Some(ord) = compare(v, &c.values[0]) else {
                return false;
            };
            match c.op {
                Op::Gt => ord.is_gt(),
                Op::Gte => ord.is_ge(),
                Op::Lt => ord.is_lt(),
                _ => ord.is_le(),
            }
        }
        Op::Like | Op::ILike => v
            .as_str()
            .is_some_and(|s| like(s, &c.values[0].text, c.op == Op::ILike)),
        Op::Contains => {
            let want = guess(&c.values[0].text);
            let have = match v {
                // Stream events carry JSON objects as JSON text (`*_json` fields).
                Value::String(s) => serde_json::from_str(s).unwrap_or(Value::Null),
                other => other.clone(),
            };
            json_contains(&have, &want)
        }
    }
}

fn equal(v: &Value, r: &Raw) -> bool {
    match v {
        Value::String(s) => *s == r.text,
        Value::Number(n) => r.text.parse::<f64>().ok() == n.as_f64(),
        Value::Bool(b) => r.text.parse::<bool>().ok() == Some(*b),
        other => serde_json::from_str::<Value>(&r.text).is_ok_and(|v| v == *other),
    }
}

fn compare(v: &Value, r: &Raw) -> Option<std::cmp::Ordering> {
    match v {
        Value::Number(n) => n.as_f64()?.partial_cmp(&r.text.parse::<f64>().ok()?),
        // Strings (including RFC 3339 timestamps in UTC) compare as text.
        Value::String(s) => Some(s.as_str().cmp(r.text.as_str())),
        _ => None,
    }
}

/// SQL LIKE: `%` any run, `_` one character, `\` escapes.
pub fn like(text: &str, pattern: &str, case_insensitive: bool) -> bool {
    let (t, p): (Vec<char>, Vec<char>) = if case_insensitive {
        (
            text.to_lowercase().chars().collect(),
            pattern.to_lowercase().chars().collect(),
        )
    } else {
        (text.chars().collect(), pattern.chars().collect())
    };
    // Dynamic programming over (pattern position, text position).
    let mut reach = vec![false; t.len() + 1];
    reach[0] = true;
    let mut i = 0;
    while i < p.len() {
        let (tok, lit) = match p[i] {
            '\\' if i + 1 < p.len() => {
                i += 1;
                (None, Some(p[i]))
            }
            '%' => (Some('%'), None),
            '_' => (Some('_'), None),
            c => (None, Some(c)),
        };
        let mut next = vec![false; t.len() + 1];
        for j in 0..=t.len() {
            if !reach[j] {
                continue;
            }
            match (tok, lit) {
                (Some('%'), _) => {
                    for n in next.iter_mut().skip(j) {
                        *n = true;
                    }
                    break;
                }
                (Some(_), _) => {
                    if j < t.len() {
                        next[j + 1] = true;
                    }
                }
                (None, Some(c)) => {
                    if j < t.len() && t[j] == c {
                        next[j + 1] = true;
                    }
                }
                (None, None) => {}
            }
        }
        reach = next;
        i += 1;
    }
    reach[t.len()]
}

fn json_contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| json_contains(hv, wv))),
        (Value::Array(h), Value::Array(w)) => {
            w.iter().all(|wv| h.iter().any(|hv| json_contains(hv, wv)))
        }
        (h, w) => h == w,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(t: &str) -> Raw {
        Raw {
            text: t.into(),
            quoted: false,
        }
    }

    #[test]
    fn symbolic_operators_parse_longest_first() {
        let cases = [
            ("agent_name=foo", "agent_name", Op::Eq, "foo"),
            ("duration_ms>100", "duration_ms", Op::Gt, "100"),
            ("duration_ms >= 100", "duration_ms", Op::Gte, "100"),
            ("duration_ms<5", "duration_ms", Op::Lt, "5"),
            ("duration_ms<=5", "duration_ms", Op::Lte, "5"),
            ("agent_name!=foo", "agent_name", Op::Neq, "foo"),
            ("agent_name<>foo", "agent_name", Op::Neq, "foo"),
            ("agent_name~cod%", "agent_name", Op::Like, "cod%"),
            ("agent_name~*COD%", "agent_name", Op::ILike, "COD%"),
            (
                "action_details@>{\"a\":1}",
                "action_details",
                Op::Contains,
                "{\"a\":1}",
            ),
            ("user_request=a=b", "user_request", Op::Eq, "a=b"),
            ("x=", "x", Op::Eq, ""),
        ];
        for (expr, col, op, value) in cases {
            let c = parse_condition(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
            assert_eq!((c.column.as_str(), c.op), (col, op), "{expr}");
            assert_eq!(c.values, vec![raw(value)], "{expr}");
        }
    }

    #[test]
    fn equal_to_an_unquoted_null_is_is_null_for_every_command() {
        let c = parse_condition("correlation_id=null").unwrap();
        assert_eq!((c.op, c.values.len()), (Op::IsNull, 0));
        let c = parse_condition("correlation_id != NULL").unwrap();
        assert_eq!((c.op, c.values.len()), (Op::IsNotNull, 0));
        // Quoted, it is the text.
        let c = parse_condition("correlation_id='null'").unwrap();
        assert_eq!(c.op, Op::Eq);
        let event = serde_json::json!({"id": "1", "correlation_id": null});
        let event = event.as_object().unwrap();
        assert!(matches(
            &[parse_condition("correlation_id=null").unwrap()],
            event
        ));
        assert!(!matches(
            &[parse_condition("correlation_id!=null").unwrap()],
            event
        ));
        assert!(matches(&[parse_condition("missing=null").unwrap()], event));
    }

    #[test]
    fn word_operators_and_lists() {
        let c = parse_condition("agent_name in (coder, tester,'a,b')").unwrap();
        assert_eq!(c.op, Op::In);
        assert_eq!(
            c.values,
            vec![
                raw("coder"),
                raw("tester"),
                Raw {
                    text: "a,b".into(),
                    quoted: true
                }
            ]
        );
        let c = parse_condition("agent_name NOT IN (x)").unwrap();
        assert_eq!((c.op, c.values.len()), (Op::NotIn, 1));
        assert_eq!(
            parse_condition("project_name is null").unwrap().op,
            Op::IsNull
        );
        assert_eq!(
            parse_condition("project_name IS NOT NULL").unwrap().op,
            Op::IsNotNull
        );
        // A column whose name starts with "in" is not the IN operator.
        let c = parse_condition("input=3").unwrap();
        assert_eq!((c.column.as_str(), c.op), ("input", Op::Eq));
        let c = parse_condition("agent_name='in (x)'").unwrap();
        assert_eq!(c.values[0].text, "in (x)");
        assert!(c.values[0].quoted);
    }

    #[test]
    fn malformed_conditions_are_explained() {
        assert!(matches!(
            parse_condition("agent_name"),
            Err(FilterError::Malformed(_))
        ));
        assert!(matches!(
            parse_condition(""),
            Err(FilterError::Malformed(_))
        ));
        assert!(matches!(
            parse_condition("=x"),
            Err(FilterError::BadColumn(_))
        ));
        assert!(matches!(
            parse_condition("agent-name=x"),
            Err(FilterError::BadColumn(_))
        ));
        assert!(matches!(
            parse_condition("a in x,y"),
            Err(FilterError::BadValue { .. })
        ));
        assert!(matches!(
            parse_condition("a in ()"),
            Err(FilterError::BadValue { .. })
        ));
        assert!(matches!(
            parse_condition("a='unterminated"),
            Err(FilterError::BadValue { .. })
        ));
        assert!(matches!(
            parse_condition("a is nul"),
            Err(FilterError::Malformed(_))
        ));
        let msg = parse_condition("agent_name").unwrap_err().to_string();
        assert!(msg.contains("column OP value"), "{msg}");
    }

    #[test]
    fn values_are_typed_by_the_column() {
        let t = |text: &str, ty: Option<&str>| typed_value(&raw(text), ty).unwrap();
        assert_eq!(t("123", Some("string")), json!("123"));
        assert_eq!(t("123", Some("integer")), json!(123));
        assert_eq!(t("1.5", Some("number")), json!(1.5));
        assert_eq!(t("0.9512", Some("number")), json!(0.9512));
        assert_eq!(
            t("123456789012345678901", Some("integer")),
            json!("123456789012345678901")
        );
        // Beyond i128 too: an integer literal is never rounded through a double.
        let huge = "-1234567890123456789012345678901234567890";
        assert_eq!(t(huge, Some("integer")), json!(huge));
        assert_eq!(t(huge, Some("number")), json!(huge));
        assert_eq!(t("1e3", Some("integer")), json!(1000.0));
        assert_eq!(t(huge, Some(DECIMAL)), json!(huge));
        assert_eq!(t("yes", Some("boolean")), json!(true));
        // numeric: exactly as typed, never rounded through a double.
        assert_eq!(t("12", Some(DECIMAL)), json!(12));
        assert_eq!(t("0.9512", Some(DECIMAL)), json!("0.9512"));
        assert_eq!(
            t("12345678901234567.89", Some(DECIMAL)),
            json!("12345678901234567.89")
        );
        // Raw parameters: a literal a double would round stays text.
        assert_eq!(guess("0.30000000000000004"), json!(0.30000000000000004));
        assert_eq!(guess("1.5e3"), json!(1500.0));
        assert_eq!(guess("-0.000120"), json!(-0.00012));
        assert_eq!(guess("12345678901234567.89"), json!("12345678901234567.89"));
        assert_eq!(
            guess("12345678901234567890123"),
            json!("12345678901234567890123")
        );
        assert_eq!(guess("9007199254740993"), json!("9007199254740993"));
        assert_eq!(guess("9007199254740991"), json!(9_007_199_254_740_991i64));
        // Written unlike a number (leading zeros, a plus sign): kept as typed.
        for code in ["007", "-007", "+5", "00.5", "01e3"] {
            assert_eq!(guess(code), json!(code), "{code}");
        }
        for number in ["0", "-0.5", "0.5", "10", "0e0"] {
            assert!(guess(number).is_number(), "{number}");
        }
        // An exponent at the edge of i64: no overflow, just text.
        assert_eq!(
            guess("0.01e-9223372036854775808"),
            json!("0.01e-9223372036854775808")
        );
        assert!(typed_value(&raw("maybe"), Some("boolean")).is_err());
        assert_eq!(t("{\"a\":[1]}", Some("json")), json!({"a": [1]}));
        assert_eq!(t("hello", Some("json")), json!("hello"));
        let bad = typed_value(&raw("{bad"), Some("json")).unwrap_err();
        assert!(bad.contains("not valid JSON"), "{bad}");
        assert!(typed_value(&raw("[1,"), Some("json")).is_err());
        assert_eq!(t("null", Some("string")), Value::Null);
        assert_eq!(t("12", None), json!(12));
        assert_eq!(t("coder", None), json!("coder"));
        let quoted = Raw {
            text: "12".into(),
            quoted: true,
        };
        assert_eq!(typed_value(&quoted, Some("integer")).unwrap(), json!("12"));
    }

    #[test]
    fn conditions_become_the_filter_tree() {
        let types: ColumnTypes = [
            ("agent_name".to_string(), "string".to_string()),
            ("duration_ms".to_string(), "integer".to_string()),
        ]
        .into();
        let conds: Vec<_> = [
            "agent_name=007",
            "duration_ms>100",
            "agent_name in (a,b)",
            "duration_ms=null",
        ]
        .iter()
        .map(|e| parse_condition(e).unwrap())
        .collect();
        let f = to_filter(&conds, &types).unwrap().unwrap();
        let json = omnibus_proto::json::to_json("omnibus.db.v1.Filter", &f, true).unwrap();
        assert_eq!(
            json,
            json!({"all": {"filters": [
                {"condition": {"column": "agent_name", "op": "OPERATOR_EQ", "value": "007"}},
                {"condition": {"column": "duration_ms", "op": "OPERATOR_GT", "value": 100.0}},
                {"condition": {"column": "agent_name", "op": "OPERATOR_IN", "value": ["a", "b"]}},
                {"condition": {"column": "duration_ms", "op": "OPERATOR_IS_NULL"}},
            ]}})
        );
        let single = to_filter(&conds[..1], &types).unwrap().unwrap();
        assert!(matches!(single.kind, Some(pb::filter::Kind::Condition(_))));
        assert_eq!(to_filter(&[], &types).unwrap(), None);
    }

    #[test]
    fn orderings() {
        let o = parse_order("created_at:desc").unwrap();
        assert_eq!(o.len(), 1);
        assert_eq!(
            (o[0].column.as_str(), o[0].direction),
            ("created_at", pb::Direction::Desc as i32)
        );
        let o = parse_order("agent_name, duration_ms:asc:nulls-last").unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(o[0].direction, pb::Direction::Unspecified as i32);
        assert_eq!(o[1].nulls, pb::Nulls::Last as i32);
        assert!(parse_order("created_at:down").is_err());
        assert!(parse_order(":desc").is_err());
        assert!(parse_order("").is_err());
    }

    #[test]
    fn assignments() {
        assert_eq!(
            parse_assignment("agent_name=coder").unwrap(),
            ("agent_name".into(), raw("coder"))
        );
        let (c, r) = parse_assignment("user_request='a = b'").unwrap();
        assert_eq!(
            (c.as_str(), r.text.as_str(), r.quoted),
            ("user_request", "a = b", true)
        );
        assert!(parse_assignment("novalue").is_err());
        assert!(parse_assignment("bad col=1").is_err());
    }

    #[test]
    fn stream_events_are_matched_like_rows() {
        let ev = json!({"agent_name": "coder", "action_type": "tool_call", "duration_ms": 250.0,
                        "action_details_json": "{\"path\":\"src/main.rs\"}"});
        let ev = ev.as_object().unwrap();
        let m = |exprs: &[&str]| {
            let conds: Vec<_> = exprs.iter().map(|e| parse_condition(e).unwrap()).collect();
            matches(&conds, ev)
        };
        assert!(m(&[]));
        assert!(m(&["agent_name=coder", "duration_ms>100"]));
        assert!(!m(&["duration_ms>=251"]));
        assert!(m(&["agent=coder"]));
        assert!(m(&["agent_name~cod%"]));
        assert!(!m(&["agent_name~COD%"]));
        assert!(m(&["agent_name~*COD%"]));
        assert!(m(&["action_type in (error, tool_call)"]));
        assert!(!m(&["action_type not in (tool_call)"]));
        assert!(m(&["project_name is null"]));
        assert!(!m(&["project_name=x"]));
        assert!(m(&["action_details_json@>{\"path\":\"src/main.rs\"}"]));
        let decision = json!({"selected_agent": "coder", "confidence_score": 0.9});
        let conds = vec![
            parse_condition("agent=coder").unwrap(),
            parse_condition("confidence_score>=0.8").unwrap(),
        ];
        assert!(matches(&conds, decision.as_object().unwrap()));
    }

    #[test]
    fn like_patterns() {
        assert!(like("coder", "c%r", false));
        assert!(like("coder", "_oder", false));
        assert!(!like("coder", "_der", false));
        assert!(like("50%", "50\\%", false));
        assert!(!like("500", "50\\%", false));
        assert!(like("", "%", false));
        assert!(like("ABC", "a%", true));
    }

    #[test]
    fn values_round_trip_through_protobuf() {
        let v = json!({"a": [1, 2.5, "x", null, true], "b": {"c": 3}});
        assert_eq!(value_to_json(&json_to_value(&v)), v);
    }
}
