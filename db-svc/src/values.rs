//! The type mapping, both ways: JSON values -> typed bind parameters (checked against the
//! column's type) and result rows -> JSON objects. Plus conversions between
//! `google.protobuf.Struct`/`Value` and `serde_json`, which the gRPC edge uses.

use std::str::FromStr;

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Number, Value as Json};
use sqlx::postgres::{PgArguments, PgRow, PgValueFormat};
use sqlx::{Arguments, Column, Row, TypeInfo, ValueRef};
use uuid::Uuid;

use crate::catalog::ColType;
use crate::error::DbError;
use crate::pg_numeric;
use crate::wide_json_integers::quote_wide_integers;

/// A value to bind, already converted to the column's type.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    /// SQL NULL, typed like the column it goes to.
    Null(ColType),
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float4(f32),
    Float8(f64),
    Numeric(Decimal),
    Text(String),
    Uuid(Uuid),
    Json(Json),
    Jsonb(Json),
    Timestamp(NaiveDateTime),
    Timestamptz(DateTime<Utc>),
    Date(NaiveDate),
}

impl Param {
    /// Adds this value to a statement's arguments.
    pub fn add_to(&self, args: &mut PgArguments) -> Result<(), DbError> {
        use sqlx::types::Json as SqlJson;
        let r = match self {
            Param::Null(ty) => match ty {
                ColType::Bool => args.add(None::<bool>),
                ColType::Int2 => args.add(None::<i16>),
                ColType::Int4 => args.add(None::<i32>),
                ColType::Int8 => args.add(None::<i64>),
                ColType::Float4 => args.add(None::<f32>),
                ColType::Float8 => args.add(None::<f64>),
                ColType::Numeric => args.add(None::<Decimal>),
                ColType::Uuid => args.add(None::<Uuid>),
                ColType::Json => args.add(None::<SqlJson<Json>>),
                ColType::Jsonb => args.add(None::<SqlJson<Json>>),
                ColType::Timestamp => args.add(None::<NaiveDateTime>),
                ColType::Timestamptz => args.add(None::<DateTime<Utc>>),
                ColType::Date => args.add(None::<NaiveDate>),
                ColType::Text | ColType::Other => args.add(None::<String>),
            },
            Param::Bool(v) => args.add(*v),
            Param::Int2(v) => args.add(*v),
            Param::Int4(v) => args.add(*v),
            Param::Int8(v) => args.add(*v),
            Param::Float4(v) => args.add(*v),
            Param::Float8(v) => args.add(*v),
            Param::Numeric(v) => args.add(*v),
            Param::Text(v) => args.add(v.as_str()),
            Param::Uuid(v) => args.add(*v),
            // sqlx encodes Json<T> as jsonb; PostgreSQL casts it to json where needed.
            Param::Json(v) | Param::Jsonb(v) => args.add(SqlJson(v)),
            Param::Timestamp(v) => args.add(*v),
            Param::Timestamptz(v) => args.add(*v),
            Param::Date(v) => args.add(*v),
        };
        r.map_err(|e| DbError::Database(format!("cannot encode a parameter: {e}")))
    }
}

/// Binds `params` in order.
pub fn arguments(params: &[Param]) -> Result<PgArguments, DbError> {
    let mut args = PgArguments::default();
    for p in params {
        p.add_to(&mut args)?;
    }
    Ok(args)
}

fn type_error(ty: ColType, got: &Json) -> DbError {
    let kind = match got {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    };
    let want = match ty {
        ColType::Bool => "a boolean",
        ColType::Int2 | ColType::Int4 | ColType::Int8 => "an integer",
        ColType::Float4 | ColType::Float8 => "a number",
        ColType::Numeric => "a number (or a decimal string)",
        ColType::Text => "a string",
        ColType::Uuid => "a uuid string",
        ColType::Json | ColType::Jsonb => "a JSON value",
        ColType::Timestamp | ColType::Timestamptz => "an RFC 3339 timestamp string",
        ColType::Date => "a YYYY-MM-DD date string",
        ColType::Other => "a supported type",
    };
    DbError::field("", format!("expected {want}, got {kind}"))
}

/// 2^53: the first integer a double cannot tell from its neighbour (2^53 + 1 rounds to it).
/// Only integers below it in magnitude (JavaScript's safe integers) travel exactly as
/// protobuf `Value` numbers.
const EXACT_INT: u64 = 1 << 53;

fn integer(ty: ColType, value: &Json, min: i64, max: i64) -> Result<i64, DbError> {
    let n = match value {
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                i
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                // JSON numbers from protobuf Values are doubles: 3.0 is the integer 3.
                if f.fract() != 0.0 || !f.is_finite() {
                    return Err(DbError::field("", format!("{n} is not an integer")));
                }
                if f.abs() >= EXACT_INT as f64 {
                    // The double may already be a rounding of the integer the caller meant.
                    let hint = if ty == ColType::Int8 {
                        "; send a bigint this large as a decimal string"
                    } else {
                        ""
                    };
                    return Err(DbError::field(
                        "",
                        format!(
                            "{n} is outside ±(2^53 - 1): as a double it may be the rounding of another integer{hint}"
                        ),
                    ));
                }
                f as i64
            }
        }
        Json::String(s) if ty == ColType::Int8 => s
            .trim()
            .parse::<i64>()
            .map_err(|_| DbError::field("", format!("'{s}' is not an integer")))?,
        other => return Err(type_error(ty, other)),
    };
    if n < min || n > max {
        return Err(DbError::field(
            "",
            format!("{n} is out of range for {ty:?} ({min}..={max})"),
        ));
    }
    Ok(n)
}

/// A timestamp whose year is outside 0000-9999, in the ISO 8601 expanded form db-svc writes
/// for it (`+10000-01-01T00:00:00Z`, `-0001-...`; RFC 3339 has four-digit years only), so
/// that such a value read back can be sent back (a filter, paging by value).
fn signed_year(s: &str) -> Option<DateTime<chrono::FixedOffset>> {
    if !s.starts_with(['+', '-']) {
        return None;
    }
    let offset_z = s
        .strip_suffix(['Z', 'z'])
        .map(|rest| format!("{rest}+00:00"));
    DateTime::parse_from_str(offset_z.as_deref().unwrap_or(s), "%Y-%m-%dT%H:%M:%S%.f%:z").ok()
}

/// Parses an RFC 3339 timestamp (or, for `timestamp` columns, an offset-less ISO 8601 one,
/// taken as UTC).
fn timestamp(s: &str, allow_naive: bool) -> Result<DateTime<Utc>, DbError> {
    let parsed = DateTime::parse_from_rfc3339(s)
        .or_else(|e| signed_year(s).ok_or(e))
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            allow_naive.then(|| {
                ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                    .iter()
                    .find_map(|fmt| NaiveDateTime::parse_from_str(s, fmt).ok())
                    .map(|t| t.and_utc())
            })?
        });
    if let Some(t) = parsed {
        // PostgreSQL keeps microseconds and rounds finer fractions (Java's and Go's clocks
        // write nanoseconds); the binary encoding would cut them off instead. By hand, from
        // the sub-second part alone: chrono's duration_round needs the time as i64
        // nanoseconds, which ends in 2262 (and `9999-12-31` is a common "no end").
        let rem = i64::from(t.timestamp_subsec_nanos() % 1000);
        let step = if rem >= 500 { 1000 - rem } else { -rem };
        let t = t
            .checked_add_signed(chrono::TimeDelta::nanoseconds(step))
            .ok_or_else(|| DbError::field("", format!("'{s}' is out of range")))?;
        // PostgreSQL's latest timestamp (294276 AD) lies beyond chrono's (262143), which the
        // parsers already refuse; its earliest is checked here.
        if t < pg_min_date().and_time(chrono::NaiveTime::MIN).and_utc() {
            return Err(before_pg_min(s));
        }
        return Ok(t);
    }
    Err(DbError::field(
        "",
        format!("'{s}' is not an RFC 3339 timestamp (e.g. 2024-01-31T12:00:00Z)"),
    ))
}

/// PostgreSQL's first date and timestamp: 4714-11-24 BC (Julian day 0), year -4713 in ISO
/// 8601's signed years. Its last date (5874897 AD) is beyond chrono's, as is its last timestamp.
fn pg_min_date() -> NaiveDate {
    NaiveDate::from_ymd_opt(-4713, 11, 24).unwrap_or(NaiveDate::MIN)
}

fn before_pg_min(s: &str) -> DbError {
    DbError::field(
        "",
        format!("'{s}' is before PostgreSQL's earliest date, 4714-11-24 BC (-4713-11-24)"),
    )
}

/// [`to_param`] for a value to be stored in a column declared as `sql_type` (`format_type`'s
/// text): a number too large for a `numeric(p,s)` column is a field error here, as PostgreSQL
/// reports it without naming the column.
pub fn to_stored_param(ty: ColType, sql_type: &str, value: &Json) -> Result<Param, DbError> {
    // Before `to_param`, which lets null through as a null of any type: a null bound as text
    // to an interval or enum column is PostgreSQL's type error, which names no field and
    // reads as a table changed behind db-svc's back (a catalog read and a retry for nothing).
    if ty == ColType::Other {
        return Err(unsupported_type());
    }
    let param = to_param(ty, value)?;
    if let Param::Numeric(d) = &param
        && let Some((precision, scale)) = numeric_typmod(sql_type)
        && !numeric_fits(d, precision, scale)
    {
        let digits = precision - scale;
        let limit = if digits > 0 {
            format!("at most {digits} digit(s) before the point")
        } else {
            format!("it must round to an absolute value below 10^{digits}")
        };
        return Err(DbError::field(
            "",
            format!("{d} is out of range for {sql_type}: {limit}"),
        ));
    }
    if let Param::Text(text) = &param
        && let Some(limit) = char_limit(sql_type)
        && too_long(text, limit)
    {
        return Err(DbError::field(
            "",
            format!(
                "value too long for {sql_type}: {} characters",
                text.chars().count()
            ),
        ));
    }
    // PostgreSQL's text -> name cast cuts a longer value to 63 bytes without a word.
    if let Param::Text(text) = &param
        && sql_type == "name"
        && text.len() > NAME_MAX_BYTES
    {
        return Err(DbError::field(
            "",
            format!(
                "value too long for name: {} bytes (at most {NAME_MAX_BYTES})",
                text.len()
            ),
        ));
    }
    Ok(param)
}

/// The longest `name` PostgreSQL keeps (NAMEDATALEN - 1), in bytes.
const NAME_MAX_BYTES: usize = 63;

/// The length limit of `character varying(n)` / `character(n)`.
fn char_limit(sql_type: &str) -> Option<usize> {
    let args = sql_type
        .strip_prefix("character varying(")
        .or_else(|| sql_type.strip_prefix("character("))?
        .strip_suffix(')')?;
    args.trim().parse().ok()
}

/// Whether PostgreSQL refuses `text` for a column of `limit` characters: it is longer, and
/// not only by trailing blanks (those PostgreSQL cuts off silently).
fn too_long(text: &str, limit: usize) -> bool {
    text.chars().skip(limit).any(|c| c != ' ')
}

/// The precision and scale of `numeric(p,s)` / `numeric(p)`. Since PostgreSQL 15 the scale
/// may be negative (`numeric(5,-2)` rounds to hundreds) or above the precision.
fn numeric_typmod(sql_type: &str) -> Option<(i64, i64)> {
    let args = sql_type.strip_prefix("numeric(")?.strip_suffix(')')?;
    let (p, s) = args.split_once(',').unwrap_or((args, "0"));
    Some((p.trim().parse().ok()?, s.trim().parse().ok()?))
}

/// Whether `d`, rounded to `scale` places as PostgreSQL rounds (half away from zero; a
/// negative scale rounds to tens, hundreds, ...), is below 10^(precision - scale) in magnitude,
/// which is what `numeric(precision, scale)` requires. Counted in integers: `d` * 10^scale,
/// rounded, must have at most `precision` digits.
fn numeric_fits(d: &Decimal, precision: i64, scale: i64) -> bool {
    let digits = |n: u128| n.checked_ilog10().map_or(0, |l| i64::from(l) + 1);
    // d = m / 10^d.scale(), with m below 2^96 (< 10^29).
    let m = d.mantissa().unsigned_abs();
    let shift = scale - i64::from(d.scale());
    let scaled_digits = if m == 0 {
        0
    } else if shift >= 0 {
        digits(m) + shift
    } else if shift < -38 {
        // 10^39 would not fit a u128; m / 10^39 rounds to 0 anyway.
        0
    } else {
        let unit = 10u128.pow(u32::try_from(-shift).unwrap_or(38));
        let (q, r) = (m / unit, m % unit);
        digits(if r >= unit - r { q + 1 } else { q })
    };
    scaled_digits <= precision
}

/// Converts a JSON value to a bind parameter for a column of type `ty`. JSON null is SQL NULL.
/// Errors are field errors with an empty path, for the caller to prefix.
pub fn to_param(ty: ColType, value: &Json) -> Result<Param, DbError> {
    if value.is_null() {
        return Ok(Param::Null(ty));
    }
    Ok(match ty {
        ColType::Bool => match value {
            Json::Bool(b) => Param::Bool(*b),
            other => return Err(type_error(ty, other)),
        },
        ColType::Int2 => Param::Int2(integer(ty, value, i16::MIN.into(), i16::MAX.into())? as i16),
        ColType::Int4 => Param::Int4(integer(ty, value, i32::MIN.into(), i32::MAX.into())? as i32),
        ColType::Int8 => Param::Int8(integer(ty, value, i64::MIN, i64::MAX)?),
        ColType::Float4 | ColType::Float8 => {
            let f = match value {
                Json::Number(n) => n.as_f64().unwrap_or(f64::NAN),
                // What these columns read back as when JSON has no number for the value. Only
                // those three: Rust's parser would also take "1e400" (an overflow, as
                // Infinity) and "inf".
                Json::String(s) => match s.trim() {
                    "NaN" => f64::NAN,
                    "Infinity" => f64::INFINITY,
                    "-Infinity" => f64::NEG_INFINITY,
                    _ => return Err(type_error(ty, value)),
                },
                other => return Err(type_error(ty, other)),
            };
            if ty == ColType::Float4 {
                // `as` saturates to ±Infinity and flushes to 0: a different value. PostgreSQL
                // refuses such input as out of range for real, and so does this.
                let r = f as f32;
                if (r.is_infinite() && f.is_finite()) || (r == 0.0 && f != 0.0) {
                    return Err(DbError::field("", format!("{f} is out of range for real")));
                }
                Param::Float4(r)
            } else {
                Param::Float8(f)
            }
        }
        ColType::Numeric => {
            let text = match value {
                // A double this large is an integer that may be the rounding of another one
                // (2^60 would also print as 1152921504606847000), as for bigint.
                Json::Number(n)
                    if n.is_f64() && n.as_f64().is_some_and(|f| f.abs() >= EXACT_INT as f64) =>
                {
                    return Err(DbError::field(
                        "",
                        format!(
                            "{n} is outside ±(2^53 - 1): as a double it may be the rounding of \
                             another number; send a numeric this large as a decimal string"
                        ),
                    ));
                }
                // serde_json prints the shortest text that reads back as the same double:
                // 0.95 stays 0.95 rather than 0.9499999999999999555910790149937.
                Json::Number(n) => n.to_string(),
                Json::String(s) => s.trim().to_string(),
                other => return Err(type_error(ty, other)),
            };
            // `from_str` would round away digits beyond the 28 a `Decimal` carries: refuse
            // such a value rather than store something else than was sent.
            let d = exact_decimal(&text).ok_or_else(|| {
                let is_number = Decimal::from_str(&text).is_ok()
                    || text.parse::<f64>().is_ok_and(f64::is_finite);
                let why = if is_number {
                    "is not carried exactly by db-svc (at most 28 significant digits and 28 \
                     decimal places, magnitude below 7.9e28)"
                } else {
                    "is not a decimal number"
                };
                DbError::field("", format!("'{text}' {why}"))
            })?;
            Param::Numeric(d)
        }
        ColType::Text => match value {
            Json::String(s) if s.contains('\0') => return Err(nul_error()),
            Json::String(s) => Param::Text(s.clone()),
            other => return Err(type_error(ty, other)),
        },
        ColType::Uuid => match value {
            Json::String(s) => Param::Uuid(
                Uuid::parse_str(s)
                    .map_err(|_| DbError::field("", format!("'{s}' is not a valid uuid")))?,
            ),
            other => return Err(type_error(ty, other)),
        },
        // Both are sent as jsonb (sqlx's `Json`), which refuses U+0000 in strings.
        ColType::Json | ColType::Jsonb if has_nul(value) => return Err(nul_error()),
        // Stored, it could not be read back (see `VALUE_MAX_LEVELS`).
        ColType::Json | ColType::Jsonb if value_levels(value) > VALUE_MAX_LEVELS => {
            return Err(DbError::field(
                "",
                format!(
                    "a JSON value nested {} levels deep is nested too deeply: it would need {} \
                     nested protobuf messages, at most {VALUE_MAX_LEVELS} fit in a response \
                     (an object level takes 3, a list level 2)",
                    value_depth(value),
                    value_levels(value)
                ),
            ));
        }
        ColType::Json => Param::Json(value.clone()),
        ColType::Jsonb => Param::Jsonb(value.clone()),
        ColType::Timestamptz => match value {
            Json::String(s) => Param::Timestamptz(timestamp(s, false)?),
            other => return Err(type_error(ty, other)),
        },
        ColType::Timestamp => match value {
            Json::String(s) => Param::Timestamp(timestamp(s, true)?.naive_utc()),
            other => return Err(type_error(ty, other)),
        },
        ColType::Date => match value {
            Json::String(s) => {
                let date = NaiveDate::parse_from_str(s, "%Y-%m-%d")
                    .map_err(|_| DbError::field("", format!("'{s}' is not a YYYY-MM-DD date")))?;
                if date < pg_min_date() {
                    return Err(before_pg_min(s));
                }
                Param::Date(date)
            }
            other => return Err(type_error(ty, other)),
        },
        ColType::Other => return Err(unsupported_type()),
    })
}

fn unsupported_type() -> DbError {
    DbError::field(
        "",
        "this column's type is not supported for writes or filters",
    )
}

/// PostgreSQL's text (and jsonb's strings) cannot hold U+0000; caught here so the error names
/// the field instead of arriving as the server's encoding error.
fn nul_error() -> DbError {
    DbError::field(
        "",
        "contains the NUL character (U+0000), which PostgreSQL text cannot store",
    )
}

fn has_nul(value: &Json) -> bool {
    match value {
        Json::String(s) => s.contains('\0'),
        Json::Array(items) => items.iter().any(has_nul),
        Json::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Json::Null | Json::Bool(_) | Json::Number(_) => false,
    }
}

/// `text` (plain or scientific notation) as a `Decimal` holding exactly that value; `None`
/// when it is not a number or needs more than the 28 digits a `Decimal` carries (the crate's
/// `from_str` and `from_scientific` would round those silently).
fn exact_decimal(text: &str) -> Option<Decimal> {
    let Some((mantissa, exponent)) = text.split_once(['e', 'E']) else {
        return Decimal::from_str_exact(text).ok();
    };
    let m = Decimal::from_str_exact(mantissa).ok()?;
    let exponent: i64 = exponent.parse().ok()?;
    // m * 10^exponent: lower the scale while it lasts, then scale the integer mantissa up.
    let scale = i64::from(m.scale()).checked_sub(exponent)?;
    if scale >= 0 {
        Decimal::try_from_i128_with_scale(m.mantissa(), u32::try_from(scale).ok()?).ok()
    } else {
        let factor = 10i128.checked_pow(u32::try_from(-scale).ok()?)?;
        Decimal::try_from_i128_with_scale(m.mantissa().checked_mul(factor)?, 0).ok()
    }
}

fn number(f: f64) -> Json {
    Number::from_f64(f)
        .map(Json::Number)
        .unwrap_or_else(|| Json::String(non_finite_text(f).to_string()))
}

/// The double nearest the decimal that `f` prints as (what PostgreSQL prints for a real):
/// a real written as 0.1 reads back as 0.1, not as 0.10000000149011612, its exact value.
fn real_as_double(f: f32) -> f64 {
    f.to_string().parse().unwrap_or(f.into())
}

/// PostgreSQL's text of a float that JSON cannot carry as a number.
pub(crate) fn non_finite_text(f: f64) -> &'static str {
    if f.is_nan() {
        "NaN"
    } else if f > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

/// The columns of a result set: name and type of each, resolved once per result set rather
/// than once per cell.
pub struct ResultColumns {
    columns: Vec<ResultColumn>,
    /// Index of the first column that belongs to the result (a shared query's rows start with
    /// the request ordinal, which is not part of it).
    first: usize,
}

/// A result column: its name, its type by the mapping, and whether it is `char(n)`, whose
/// blank padding PostgreSQL treats as insignificant and drops when it turns the value into
/// any other string type (`c::text`); it is dropped here too, so the string a client reads
/// back is one it can filter by (a filter value is bound as text).
#[derive(Debug)]
struct ResultColumn {
    name: String,
    ty: ColType,
    padded: bool,
}

/// `bpchar`, the type of `char(n)` (sqlx names it "CHAR", like the one-byte `"char"`).
const BPCHAR_OID: sqlx::postgres::types::Oid = sqlx::postgres::types::Oid(1042);

impl ResultColumns {
    /// The columns of rows shaped like `row`: a field error names a column whose type has no
    /// mapping.
    pub fn of(row: &PgRow) -> Result<Self, DbError> {
        Self::from_column(row, 0)
    }

    /// The columns of rows shaped like `row` from column index `first` on.
    pub fn from_column(row: &PgRow, first: usize) -> Result<Self, DbError> {
        let columns = row
            .columns()
            .iter()
            .skip(first)
            .map(|column| {
                let ty = ColType::from_pg_name(column.type_info().name());
                if ty == ColType::Other {
                    return Err(DbError::field(
                        "",
                        format!(
                            "column {} has unsupported type {}; cast it (e.g. ::text)",
                            column.name(),
                            column.type_info().name()
                        ),
                    ));
                }
                Ok(ResultColumn {
                    name: column.name().to_string(),
                    ty,
                    padded: column.type_info().oid() == Some(BPCHAR_OID),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { columns, first })
    }

    /// Column names, in result order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    /// Cell `i` of `row` (a row of this result set) by the type mapping.
    pub fn cell<'r>(&self, row: &'r PgRow, i: usize) -> Result<Cell<'r>, DbError> {
        let c = &self.columns[i];
        match decode_cell(row, self.first + i, c.ty, &c.name)? {
            Cell::Str(s) if c.padded => Ok(Cell::Str(s.trim_end_matches(' '))),
            cell => Ok(cell),
        }
    }

    /// The JSON text of cell `i` when column `i` is json or jsonb (`Some(None)` for NULL),
    /// for writers that transcode it themselves; `None` for other columns.
    pub fn json_text<'r>(
        &self,
        row: &'r PgRow,
        i: usize,
    ) -> Result<Option<Option<&'r [u8]>>, DbError> {
        let c = &self.columns[i];
        if !matches!(c.ty, ColType::Json | ColType::Jsonb) {
            return Ok(None);
        }
        json_text(row, self.first + i, c.ty, &c.name).map(Some)
    }

    /// The name of result column `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.columns[i].name
    }

    /// One row as a `Struct` keyed by column name (a repeated name keeps its last value).
    pub fn to_struct(&self, row: &PgRow) -> Result<prost_types::Struct, DbError> {
        let fields = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| Ok((c.name.clone(), self.cell(row, i)?.into_value())))
            .collect::<Result<_, DbError>>()?;
        Ok(prost_types::Struct { fields })
    }
}

/// Decodes the rows of one result set into `Struct`s as they arrive: the columns are
/// resolved from the first row.
#[derive(Default)]
pub struct StructRows {
    columns: Option<ResultColumns>,
}

impl StructRows {
    pub fn decode(&mut self, row: &PgRow) -> Result<prost_types::Struct, DbError> {
        let columns = match &mut self.columns {
            Some(c) => c,
            None => self.columns.insert(ResultColumns::of(row)?),
        };
        columns.to_struct(row)
    }
}

/// Decodes a result set into `Struct`s.
pub fn decode_rows(rows: &[PgRow]) -> Result<Vec<prost_types::Struct>, DbError> {
    decode_rows_from(rows, 0)
}

/// Decodes a result set into `Struct`s, from column index `first` on.
pub fn decode_rows_from(rows: &[PgRow], first: usize) -> Result<Vec<prost_types::Struct>, DbError> {
    decode_rows_within(rows, first, |_| Ok(()))
}

/// [`decode_rows_from`], calling `check` with each decoded row before the next is decoded:
/// an error from it ends the decoding (a result too large for its response stops growing).
pub fn decode_rows_within(
    rows: &[PgRow],
    first: usize,
    mut check: impl FnMut(&prost_types::Struct) -> Result<(), DbError>,
) -> Result<Vec<prost_types::Struct>, DbError> {
    let Some(row) = rows.first() else {
        return Ok(Vec::new());
    };
    let columns = ResultColumns::from_column(row, first)?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let decoded = columns.to_struct(row)?;
        check(&decoded)?;
        out.push(decoded);
    }
    Ok(out)
}

/// One result cell after the type mapping, borrowing from the row where it can. Both row
/// forms (`Struct` values and the pre-encoded wire form of `crate::wire`) are made from it,
/// so the mapping is defined once.
#[derive(Debug, PartialEq)]
pub enum Cell<'r> {
    Null,
    Bool(bool),
    /// Finite doubles (integers, floats, numerics); NaN and infinities come as `Text`.
    Number(f64),
    Str(&'r str),
    /// A uuid, written in its hyphenated lower-case text form without an allocation.
    Uuid(Uuid),
    /// A timestamp, written as RFC 3339 text in UTC (see [`Rfc3339`]) without an allocation.
    Time(DateTime<Utc>),
    Text(String),
    /// A json/jsonb document.
    Json(prost_types::Value),
}

impl Cell<'_> {
    pub(crate) fn number(f: f64) -> Self {
        if f.is_finite() {
            Cell::Number(f)
        } else {
            // JSON numbers cannot carry NaN or the infinities: PostgreSQL's text of them, as
            // for numeric.
            Cell::Text(non_finite_text(f).to_string())
        }
    }

    /// A bigint: a number while it is a safe integer (|n| < 2^53), beyond that its decimal
    /// text, as proto3's JSON mapping writes int64 (a double would round it, or be read as the
    /// rounding of another integer).
    pub(crate) fn bigint(n: i64) -> Self {
        if n.unsigned_abs() < EXACT_INT {
            Cell::Number(n as f64)
        } else {
            Cell::Text(n.to_string())
        }
    }

    /// A JSON integer too large for an i64 is never a safe integer: its decimal text.
    pub(crate) fn json_u64(n: u64) -> Self {
        match i64::try_from(n) {
            Ok(n) => Self::bigint(n),
            Err(_) => Cell::Text(n.to_string()),
        }
    }

    /// A numeric, given as PostgreSQL prints it: a number when the double reads back as the
    /// same decimal (`0.9512`), else that text (more digits than a double keeps, `NaN`,
    /// `Infinity`).
    fn numeric(text: String) -> Self {
        // Rust's float parsing rounds correctly and a double's `Display` is the shortest
        // text that reads back as it (never an exponent), so equal texts mean the double
        // carries the decimal exactly.
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() && f.to_string() == trim_fraction(&text) => Cell::Number(f),
            _ => Cell::Text(text),
        }
    }

    pub fn into_value(self) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match self {
            Cell::Null => Kind::NullValue(0),
            Cell::Bool(b) => Kind::BoolValue(b),
            Cell::Number(f) => Kind::NumberValue(f),
            Cell::Str(s) => Kind::StringValue(s.to_string()),
            Cell::Uuid(u) => Kind::StringValue(u.to_string()),
            Cell::Time(t) => Kind::StringValue(Rfc3339::new().format(&t).to_string()),
            Cell::Text(s) => Kind::StringValue(s),
            Cell::Json(v) => return v,
        };
        prost_types::Value { kind: Some(kind) }
    }
}

/// `1.2300` -> `1.23`, `5.000` -> `5`, `-0.0` -> `-0` (a double prints no trailing zeros).
fn trim_fraction(text: &str) -> &str {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        text
    }
}

fn number_value(f: f64) -> prost_types::Value {
    Cell::number(f).into_value()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A stack buffer for timestamps in the text form `to_rfc3339_opts(AutoSi, true)` gives
/// (`2026-11-30T17:21:05.123456Z`: no fraction, or 3, 6 or 9 digits, as needed), without
/// chrono's general formatter or an allocation per cell. Years outside 0000-9999 (which
/// chrono writes with a sign) go through chrono.
pub struct Rfc3339 {
    buf: [u8; 30],
    fallback: String,
}

impl Default for Rfc3339 {
    fn default() -> Self {
        Self::new()
    }
}

impl Rfc3339 {
    pub fn new() -> Self {
        Self {
            buf: [0; 30],
            fallback: String::new(),
        }
    }

    pub fn format(&mut self, t: &DateTime<Utc>) -> &str {
        use chrono::{Datelike, Timelike};
        let nanos = t.nanosecond();
        let year = match u32::try_from(t.year()) {
            Ok(year) if year <= 9999 && nanos < 1_000_000_000 => year,
            _ => {
                self.fallback = rfc3339(*t);
                return &self.fallback;
            }
        };
        let b = &mut self.buf;
        let mut put = |at: usize, n: u32, digits: usize| {
            let mut n = n;
            for i in (0..digits).rev() {
                b[at + i] = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        put(0, year, 4);
        put(5, t.month(), 2);
        put(8, t.day(), 2);
        put(11, t.hour(), 2);
        put(14, t.minute(), 2);
        put(17, t.second(), 2);
        let end = match nanos {
            0 => 19,
            n if n % 1_000_000 == 0 => {
                put(20, n / 1_000_000, 3);
                23
            }
            n if n % 1_000 == 0 => {
                put(20, n / 1_000, 6);
                26
            }
            n => {
                put(20, n, 9);
                29
            }
        };
        for (at, sep) in [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
        ] {
            self.buf[at] = sep;
        }
        self.buf[end] = b'Z';
        // Only ASCII digits and separators were written.
        std::str::from_utf8(&self.buf[..=end]).unwrap_or_default()
    }
}

/// PostgreSQL's epoch for timestamps and dates (2000-01-01) in Unix microseconds.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A timestamp (microseconds since 2000-01-01, `i64::MAX`/`MIN` for ±infinity) or date (days
/// since 2000-01-01, `i32::MAX`/`MIN` for ±infinity) in binary form. The infinities read as
/// PostgreSQL writes them, `"infinity"` / `"-infinity"`; None for malformed or out-of-range
/// bytes.
fn time_cell<'r>(ty: ColType, bytes: &[u8]) -> Option<Cell<'r>> {
    let infinity =
        |positive: bool| Cell::Text(if positive { "infinity" } else { "-infinity" }.to_string());
    if ty == ColType::Date {
        let days = i32::from_be_bytes(bytes.try_into().ok()?);
        return match days {
            i32::MAX => Some(infinity(true)),
            i32::MIN => Some(infinity(false)),
            _ => {
                let date = NaiveDate::from_ymd_opt(2000, 1, 1)?
                    .checked_add_signed(chrono::TimeDelta::try_days(days.into())?)?;
                Some(Cell::Text(date.format("%Y-%m-%d").to_string()))
            }
        };
    }
    match i64::from_be_bytes(bytes.try_into().ok()?) {
        i64::MAX => Some(infinity(true)),
        i64::MIN => Some(infinity(false)),
        micros => {
            DateTime::from_timestamp_micros(micros.checked_add(PG_EPOCH_MICROS)?).map(Cell::Time)
        }
    }
}

/// The same from the text form (sessions run with `TimeZone=UTC`).
fn time_text_cell<'r>(ty: ColType, text: &str) -> Option<Cell<'r>> {
    if matches!(text, "infinity" | "-infinity") {
        return Some(Cell::Text(text.to_string()));
    }
    match ty {
        ColType::Date => Some(Cell::Text(
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()?
                .format("%Y-%m-%d")
                .to_string(),
        )),
        // `2024-01-31 10:00:00.123456`, with `+00` for timestamptz in a UTC session.
        _ => NaiveDateTime::parse_from_str(text.trim_end_matches("+00"), "%Y-%m-%d %H:%M:%S%.f")
            .ok()
            .map(|t| Cell::Time(t.and_utc())),
    }
}

/// The JSON text of json/jsonb cell `i` of `row` (`None` for NULL).
fn json_text<'r>(
    row: &'r PgRow,
    i: usize,
    ty: ColType,
    name: &str,
) -> Result<Option<&'r [u8]>, DbError> {
    let malformed =
        |e: &dyn std::fmt::Display| DbError::Database(format!("cannot decode column {name}: {e}"));
    let raw = row.try_get_raw(i).map_err(|e| malformed(&e))?;
    if raw.is_null() {
        return Ok(None);
    }
    let format = raw.format();
    let bytes = raw.as_bytes().map_err(|e| malformed(&e))?;
    // jsonb's binary form is a format version (1) followed by the text; json's is the text.
    match (ty, format) {
        (ColType::Jsonb, PgValueFormat::Binary) => match bytes.split_first() {
            Some((1, text)) => Ok(Some(text)),
            _ => Err(malformed(&"unknown jsonb format version")),
        },
        _ => Ok(Some(bytes)),
    }
}

/// How many protobuf messages deep a decoder may go: prost's `RECURSION_LIMIT`, and the
/// default of the Java, C++, C# and Python (upb) runtimes. A response that nests deeper is
/// refused whole by such a client, as a decode error that names nothing.
const PROTOBUF_MAX_DEPTH: usize = 100;

/// The messages a response wraps around a column's `Value`: the response itself is not
/// counted, then the row's `Struct` (1), its map entry (2) and the `Value` (3). The same for
/// every response that carries rows (`rows` is field 1 of each), and for request rows.
const COLUMN_VALUE_DEPTH: usize = 3;

/// Kept free below the limit: a runtime that counts one or two levels more still decodes.
const DEPTH_MARGIN: usize = 2;

/// How many nested protobuf messages a column value may take, its own `Value` included (see
/// [`json_levels`]): 96, about 31 nested objects or 47 nested lists. Deeper JSON is refused
/// on output (UNREPRESENTABLE_VALUE naming the column) and on input.
pub const VALUE_MAX_LEVELS: usize = PROTOBUF_MAX_DEPTH - (COLUMN_VALUE_DEPTH - 1) - DEPTH_MARGIN;

/// The error a transcoder stops with past [`VALUE_MAX_LEVELS`]; [`json_error`] names it.
pub(crate) const TOO_DEEP: &str = "nested too deeply";

/// Protobuf message levels of each JSON container kind: a list is a `Value` holding a
/// `ListValue` whose items are `Value`s (2 per level); an object is a `Value` holding a
/// `Struct` whose members are map entries holding `Value`s (3 per level).
pub(crate) const LIST_LEVELS: usize = 2;
pub(crate) const OBJECT_LEVELS: usize = 3;

/// How deeply the JSON text `json` nests (strings skipped): its arrays and objects, and the
/// protobuf messages its `google.protobuf.Value` nests (the outer `Value` is level 1; an empty
/// list or object still has its `ListValue` / `Struct`).
pub fn json_levels(json: &[u8]) -> (usize, usize) {
    let mut open: Vec<usize> = Vec::new();
    // The level of a `Value` starting here.
    let mut level = 1;
    let (mut depth, mut levels) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'[' | b'{' => {
                levels = levels.max(level + 1);
                let cost = if b == b'[' {
                    LIST_LEVELS
                } else {
                    OBJECT_LEVELS
                };
                open.push(cost);
                level += cost;
                depth = depth.max(open.len());
            }
            b']' | b'}' => level -= open.pop().unwrap_or(0),
            b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' => {}
            // A string (a member name counts as its value, which follows), number or literal.
            b'"' => {
                in_string = true;
                levels = levels.max(level);
            }
            _ => levels = levels.max(level),
        }
    }
    (depth, levels)
}

/// How deeply the arrays and objects of `value` nest (the first half of [`json_levels`]).
fn value_depth(value: &Json) -> usize {
    match value {
        Json::Array(items) => 1 + items.iter().map(value_depth).max().unwrap_or(0),
        Json::Object(map) => 1 + map.values().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The protobuf message levels of `value` (the second half of [`json_levels`]); an empty list
/// or object is its `Value` and its `ListValue` / `Struct`.
fn value_levels(value: &Json) -> usize {
    match value {
        Json::Array(items) => items
            .iter()
            .map(|v| LIST_LEVELS + value_levels(v))
            .max()
            .unwrap_or(2),
        Json::Object(map) => map
            .values()
            .map(|v| OBJECT_LEVELS + value_levels(v))
            .max()
            .unwrap_or(2),
        _ => 1,
    }
}

/// The error for JSON text of column `name` that did not transcode: a document nested too
/// deeply for the API is FAILED_PRECONDITION naming the column, anything else is a database
/// error (PostgreSQL only stores valid JSON).
pub fn json_error(name: &str, json: &[u8], e: impl std::fmt::Display) -> DbError {
    let (depth, levels) = json_levels(json);
    if levels > VALUE_MAX_LEVELS {
        DbError::Unrepresentable {
            column: name.to_string(),
            message: format!(
                "a JSON value nested {depth} levels deep cannot be returned: it needs {levels} \
                 nested protobuf messages, at most {VALUE_MAX_LEVELS} fit in a response (an \
                 object level takes 3, a list level 2; protobuf readers stop at \
                 {PROTOBUF_MAX_DEPTH}); leave the column out of the projection or select part of it"
            ),
        }
    } else if e.to_string().starts_with("number out of range") {
        // jsonb numbers are numerics: PostgreSQL holds 1e400, a double cannot.
        DbError::Unrepresentable {
            column: name.to_string(),
            message: "a JSON number beyond a double's range (about ±1.8e308) cannot be \
                      returned as a number; leave the column out of the projection, or read it \
                      as text with ExecuteRaw (col::text)"
                .to_string(),
        }
    } else {
        DbError::Database(format!("cannot decode column {name}: {e}"))
    }
}

/// Decodes cell `i` of `row` (column `name` of type `ty`) by the type mapping.
fn decode_cell<'r>(row: &'r PgRow, i: usize, ty: ColType, name: &str) -> Result<Cell<'r>, DbError> {
    let err = |e: sqlx::Error| DbError::Database(format!("cannot decode column {name}: {e}"));
    // `ty` comes from this result set's own column descriptions (`ResultColumns::of`), so the
    // per-cell type compatibility check of `try_get` would only repeat it; decoding still
    // fails cleanly on bytes that do not fit.
    macro_rules! get {
        ($t:ty) => {
            row.try_get_unchecked::<Option<$t>, _>(i).map_err(err)?
        };
    }
    let cell = match ty {
        ColType::Bool => get!(bool).map(Cell::Bool),
        ColType::Int2 => get!(i16).map(|n| Cell::Number(n.into())),
        ColType::Int4 => get!(i32).map(|n| Cell::Number(n.into())),
        ColType::Int8 => get!(i64).map(Cell::bigint),
        ColType::Float4 => get!(f32).map(|f| Cell::number(real_as_double(f))),
        ColType::Float8 => get!(f64).map(Cell::number),
        ColType::Numeric => {
            // Read as text from the wire form: exact for every value the column holds
            // (`Decimal` stops at 28 digits and has no NaN or infinities).
            let raw = row.try_get_raw(i).map_err(err)?;
            if raw.is_null() {
                None
            } else {
                let text = match raw.format() {
                    PgValueFormat::Binary => raw.as_bytes().ok().and_then(pg_numeric::to_text),
                    PgValueFormat::Text => raw.as_str().ok().map(str::to_owned),
                };
                let text = text.ok_or_else(|| {
                    DbError::Database(format!("cannot decode column {name}: malformed numeric"))
                })?;
                Some(Cell::numeric(text))
            }
        }
        ColType::Text => get!(&'r str).map(Cell::Str),
        ColType::Uuid => get!(Uuid).map(Cell::Uuid),
        ColType::Json | ColType::Jsonb => match json_text(row, i, ty, name)? {
            None => None,
            Some(text) => Some(Cell::Json(
                json_value(text).map_err(|e| json_error(name, text, e))?,
            )),
        },
        // Read from the wire form here: sqlx's decoders panic on PostgreSQL's infinities.
        ColType::Timestamptz | ColType::Timestamp | ColType::Date => {
            let raw = row.try_get_raw(i).map_err(err)?;
            if raw.is_null() {
                None
            } else {
                let malformed =
                    || DbError::Database(format!("cannot decode column {name}: malformed {ty:?}"));
                let bytes = raw.as_bytes().map_err(|_| malformed())?;
                Some(match raw.format() {
                    PgValueFormat::Binary => match time_cell(ty, bytes) {
                        Some(cell) => cell,
                        // Well-formed, but PostgreSQL's range (to 294276 AD for timestamps,
                        // 5874897 AD for dates) reaches past what the API's times carry.
                        None if bytes.len() == if ty == ColType::Date { 4 } else { 8 } => {
                            return Err(DbError::Unrepresentable {
                                column: name.to_string(),
                                message: format!(
                                    "a {ty:?} beyond year 262143, the latest the API's times \
                                     carry; leave the column out of the projection, or read \
                                     it with ExecuteRaw as ::text"
                                ),
                            });
                        }
                        None => return Err(malformed()),
                    },
                    PgValueFormat::Text => {
                        let text = std::str::from_utf8(bytes).map_err(|_| malformed())?;
                        time_text_cell(ty, text).ok_or_else(malformed)?
                    }
                })
            }
        }
        ColType::Other => {
            return Err(DbError::field(
                "",
                format!("column {name} has a type that is not supported; cast it (e.g. ::text)"),
            ));
        }
    };
    Ok(cell.unwrap_or(Cell::Null))
}

/// A stored JSON document (jsonb's text) as a `google.protobuf.Value`, integers beyond 64
/// bits included (as their decimal text).
pub fn json_value(text: &[u8]) -> Result<prost_types::Value, serde_json::Error> {
    serde_json::from_slice::<ProtoValue>(&quote_wide_integers(text)).map(|v| v.0)
}

/// A JSON document deserialized straight into a `google.protobuf.Value` (jsonb columns),
/// without building a `serde_json::Value` first. Deeper than [`VALUE_MAX_LEVELS`] is an
/// error ([`TOO_DEEP`]).
pub struct ProtoValue(pub prost_types::Value);

impl<'de> serde::Deserialize<'de> for ProtoValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::DeserializeSeed::deserialize(ProtoValueVisitor { level: 1 }, deserializer)
            .map(ProtoValue)
    }
}

/// Reads one `Value` that sits `level` protobuf messages deep (the column's own is 1).
struct ProtoValueVisitor {
    level: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for ProtoValueVisitor {
    type Value = prost_types::Value;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        if self.level > VALUE_MAX_LEVELS {
            return Err(serde::de::Error::custom(TOO_DEEP));
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ProtoValueVisitor {
    type Value = prost_types::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Cell::Null.into_value())
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Cell::Null.into_value())
    }
    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(Cell::Bool(b).into_value())
    }
    // Integers beyond a double's exact range come back as decimal text, as bigint columns do.
    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(Cell::bigint(n).into_value())
    }
    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Cell::json_u64(n).into_value())
    }
    fn visit_f64<E>(self, f: f64) -> Result<Self::Value, E> {
        Ok(number_value(f))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cell::Str(s).into_value())
    }
    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(Cell::Text(s).into_value())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // The ListValue, even an empty one.
        if self.level + 1 > VALUE_MAX_LEVELS {
            return Err(serde::de::Error::custom(TOO_DEEP));
        }
        let item = || ProtoValueVisitor {
            level: self.level + LIST_LEVELS,
        };
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element_seed(item())? {
            values.push(v);
        }
        Ok(prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(
                prost_types::ListValue { values },
            )),
        })
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // The Struct, even an empty one.
        if self.level + 1 > VALUE_MAX_LEVELS {
            return Err(serde::de::Error::custom(TOO_DEEP));
        }
        let mut fields = std::collections::BTreeMap::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(ProtoValueVisitor {
                level: self.level + OBJECT_LEVELS,
            })?;
            fields.insert(k, v);
        }
        Ok(prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                fields,
            })),
        })
    }
}

/// google.protobuf.Value -> JSON.
pub fn proto_to_json(value: &prost_types::Value) -> Json {
    use prost_types::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(f)) => {
            // Integral doubles become JSON integers, so 3.0 reads as 3 everywhere (but -0.0
            // keeps its sign: it is not the integer 0 to a float column).
            if f.fract() == 0.0
                && f.abs() < 9.007_199_254_740_992e15
                && !(*f == 0.0 && f.is_sign_negative())
            {
                Json::from(*f as i64)
            } else {
                number(*f)
            }
        }
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(proto_to_json).collect()),
        Some(Kind::StructValue(s)) => Json::Object(struct_to_json(s)),
    }
}

/// [`proto_to_json`] for a client's value at `path`: a NaN or infinite number, which a
/// protobuf `Value` can carry and JSON cannot, is a field error rather than silently text.
pub fn input_json(value: &prost_types::Value, path: &str) -> Result<Json, DbError> {
    check_finite(value, path)?;
    Ok(proto_to_json(value))
}

/// [`struct_to_json`] for a client's object at `path` (see [`input_json`]).
pub fn input_object(s: &prost_types::Struct, path: &str) -> Result<Map<String, Json>, DbError> {
    check_fields_finite(s, path)?;
    Ok(struct_to_json(s))
}

fn check_finite(value: &prost_types::Value, path: &str) -> Result<(), DbError> {
    use prost_types::value::Kind;
    match &value.kind {
        Some(Kind::NumberValue(f)) if !f.is_finite() => Err(DbError::field(
            path,
            format!(
                "{f} is not a number JSON or PostgreSQL columns other than floats can hold; send NaN or Infinity to a float column as the string \"NaN\" / \"Infinity\""
            ),
        )),
        Some(Kind::ListValue(l)) => l
            .values
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_finite(v, &format!("{path}[{i}]"))),
        Some(Kind::StructValue(s)) => check_fields_finite(s, path),
        _ => Ok(()),
    }
}

fn check_fields_finite(s: &prost_types::Struct, path: &str) -> Result<(), DbError> {
    s.fields
        .iter()
        .try_for_each(|(k, v)| check_finite(v, &format!("{path}.{k}")))
}

/// google.protobuf.Struct -> JSON object.
pub fn struct_to_json(s: &prost_types::Struct) -> Map<String, Json> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), proto_to_json(v)))
        .collect()
}

/// JSON -> google.protobuf.Value.
pub fn json_to_proto(value: &Json) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_proto).collect(),
        }),
        Json::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A recorded result back into the `Value` it was recorded from (see `ops::RecordedOutput`),
/// consuming the JSON (no string copies). Every number in a recorded result was a
/// `NumberValue` (a bigint beyond a double's exact range was already text), so every number
/// is one again, whatever its size: jsonb prints the double 1e16 as the integer
/// 10000000000000000, which must not come back as a bigint's decimal text.
pub fn recorded_into_proto(value: Json) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Kind::StringValue(s),
        Json::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(recorded_into_proto).collect(),
        }),
        Json::Object(o) => Kind::StructValue(recorded_into_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// [`recorded_into_proto`] for a recorded row.
pub fn recorded_into_struct(map: Map<String, Json>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, recorded_into_proto(v)))
            .collect(),
    }
}

/// JSON object -> google.protobuf.Struct.
pub fn json_to_struct(map: &Map<String, Json>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_proto(v)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy as _;
    use serde_json::json;

    proptest::proptest! {
        /// The stack formatter writes what chrono's `to_rfc3339_opts(AutoSi, true)` writes,
        /// from 4713 BC (PostgreSQL's first timestamp) to beyond year 250000, every fraction length.
        #[test]
        fn timestamps_format_like_chrono(
            secs in -210_866_803_200i64..8_000_000_000_000,
            nanos in proptest::prop_oneof![
                proptest::strategy::Just(0u32),
                (0u32..1000).prop_map(|ms| ms * 1_000_000),
                (0u32..1_000_000).prop_map(|us| us * 1_000),
                0u32..1_000_000_000,
            ],
        ) {
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            let mut formatter = Rfc3339::new();
            proptest::prop_assert_eq!(formatter.format(&t), rfc3339(t));
        }

        /// Every timestamp db-svc writes (PostgreSQL's microseconds, 4713 BC to beyond year
        /// 250000: signed years outside 0000-9999) reads back as the same instant.
        #[test]
        fn timestamps_read_back_as_written(
            secs in -210_866_803_200i64..8_000_000_000_000,
            micros in 0u32..1_000_000,
        ) {
            let t = DateTime::from_timestamp(secs, micros * 1000).unwrap();
            let text = Rfc3339::new().format(&t).to_string();
            proptest::prop_assert_eq!(timestamp(&text, false).ok(), Some(t), "{}", text);
        }
    }

    #[test]
    fn years_outside_four_digits_are_read_in_their_signed_form() {
        for (text, want) in [
            ("+10000-01-01T00:00:00Z", "+10000-01-01T00:00:00+00:00"),
            (
                "-0001-12-31T23:59:59.5+01:00",
                "-0001-12-31T22:59:59.500+00:00",
            ),
        ] {
            let t = timestamp(text, false).unwrap();
            assert_eq!(t.to_rfc3339(), want, "{text}");
        }
        for bad in [
            "+2024-01-31",
            "+ 10000-01-01T00:00:00Z",
            "10000-01-01T00:00:00Z",
        ] {
            assert!(timestamp(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn reals_are_range_checked_and_read_back_as_written() {
        assert_eq!(
            to_param(ColType::Float4, &json!(0.5)).unwrap(),
            Param::Float4(0.5)
        );
        for out_of_range in [1e300, -1e300, 1e-50] {
            let err = to_param(ColType::Float4, &json!(out_of_range)).unwrap_err();
            assert!(err.to_string().contains("out of range for real"), "{err}");
        }
        // Doubles are not narrowed, so nothing is out of range for them.
        assert_eq!(
            to_param(ColType::Float8, &json!(1e300)).unwrap(),
            Param::Float8(1e300)
        );
        assert_eq!(real_as_double(0.1), 0.1);
        // The strings non-finite floats read back as are accepted; other strings are not.
        assert_eq!(
            to_param(ColType::Float8, &json!("-Infinity")).unwrap(),
            Param::Float8(f64::NEG_INFINITY)
        );
        assert!(
            matches!(to_param(ColType::Float4, &json!("NaN")).unwrap(), Param::Float4(f) if f.is_nan())
        );
        assert!(to_param(ColType::Float8, &json!("1.5")).is_err());
        // A non-finite protobuf number is refused with its path.
        let v = prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(
                prost_types::ListValue {
                    values: vec![
                        number_value(1.0),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
                        },
                    ],
                },
            )),
        };
        let err = input_json(&v, "params[2]").unwrap_err();
        assert_eq!(err.violations()[0].field, "params[2][1]");
        assert_eq!(real_as_double(f32::MAX), 3.4028235e38);
        assert_eq!(number(f64::INFINITY), json!("Infinity"));
        assert_eq!(number(f64::NEG_INFINITY), json!("-Infinity"));
        assert_eq!(number(f64::NAN), json!("NaN"));
    }

    #[test]
    fn numerics_are_checked_against_their_precision_and_scale() {
        let stored = |sql_type: &str, v: Json| to_stored_param(ColType::Numeric, sql_type, &v);
        assert!(stored("numeric(5,4)", json!(9.9999)).is_ok());
        assert!(stored("numeric(5,4)", json!(-9.9999)).is_ok());
        // Rounded to 4 places first, as PostgreSQL does: 9.99995 becomes 10.0000.
        let err = stored("numeric(5,4)", json!("9.99995")).unwrap_err();
        assert!(
            err.to_string().contains("out of range for numeric(5,4)"),
            "{err}"
        );
        assert!(stored("numeric(5,4)", json!(12.5)).is_err());
        assert!(stored("numeric(5,4)", json!("9.99994")).is_ok());
        assert!(stored("numeric(3)", json!(999)).is_ok());
        assert!(stored("numeric(3)", json!(999.5)).is_err());
        assert!(stored("numeric(3,0)", json!(-999.4)).is_ok());
        assert!(stored("numeric", json!("1e20")).is_ok());
        assert!(stored("numeric(40,2)", json!("12345678901234567890123456")).is_ok());
        // Not numeric: unchanged.
        assert!(stored("integer", json!(5)).is_ok());
        // Text longer than varchar(n) / char(n) is refused here, where the field is known
        // (PostgreSQL's error names neither row nor column); trailing blanks are cut, as
        // PostgreSQL cuts them; characters, not bytes, count.
        let text = |sql_type: &str, v: &str| to_stored_param(ColType::Text, sql_type, &json!(v));
        let err = text("character varying(3)", "abcd").unwrap_err();
        assert!(
            err.to_string()
                .contains("value too long for character varying(3): 4 characters"),
            "{err}"
        );
        assert!(text("character varying(3)", "abc").is_ok());
        assert!(text("character varying(3)", "abc   ").is_ok());
        assert!(text("character varying(3)", "ab  x").is_err());
        assert!(text("character varying(3)", "äöü").is_ok());
        assert!(text("character(2)", "abc").is_err());
        assert!(text("character(2)", "ab").is_ok());
        assert!(text("character varying", &"x".repeat(10_000)).is_ok());
        assert!(text("text", &"x".repeat(10_000)).is_ok());
        assert_eq!(char_limit("character varying(255)"), Some(255));
        assert_eq!(char_limit("character(1)"), Some(1));
        assert_eq!(char_limit("character varying"), None);
        assert_eq!(numeric_typmod("numeric(10, 2)"), Some((10, 2)));
        assert_eq!(numeric_typmod("numeric(5,-2)"), Some((5, -2)));
        assert_eq!(numeric_typmod("numeric"), None);
    }

    /// Every value PostgreSQL would refuse for `numeric(p,s)` is refused here, naming the
    /// field: 29 integer digits (a Decimal holds them), negative scales, scales above the
    /// precision. Bounds as PostgreSQL 15 reports them ("must round to an absolute value
    /// less than 10^7").
    #[test]
    fn numeric_bounds_match_postgresql_for_every_typmod() {
        let fits = |sql_type: &str, v: &str| {
            to_stored_param(ColType::Numeric, sql_type, &json!(v)).is_ok()
        };
        // 29 digits before the point: a Decimal holds them, numeric(30,2) does not.
        assert!(!fits("numeric(30,2)", "10000000000000000000000000000"));
        assert!(fits("numeric(30,2)", "9999999999999999999999999999"));
        assert!(fits("numeric(31,2)", "10000000000000000000000000000"));
        assert!(fits("numeric(29)", "79228162514264337593543950335"));
        assert!(!fits("numeric(28)", "79228162514264337593543950335"));
        // Rounded to hundreds, below 10^7.
        assert!(fits("numeric(5,-2)", "9999949"));
        assert!(fits("numeric(5,-2)", "-9999949.99"));
        assert!(!fits("numeric(5,-2)", "9999950"));
        assert!(!fits("numeric(5,-2)", "-10000000"));
        // Five places, below 10^-3.
        assert!(fits("numeric(2,5)", "0.000994"));
        assert!(fits("numeric(2,5)", "0.00099499"));
        assert!(!fits("numeric(2,5)", "0.000995"));
        assert!(!fits("numeric(2,5)", "1"));
        assert!(fits("numeric(2,5)", "0"));
        let e = to_stored_param(ColType::Numeric, "numeric(2,5)", &json!("0.5")).unwrap_err();
        assert!(e.to_string().contains("below 10^-3"), "{e}");
        let e = to_stored_param(ColType::Numeric, "numeric(5,-2)", &json!(1e7)).unwrap_err();
        assert!(e.to_string().contains("7 digit(s)"), "{e}");
        // Extreme scales: no overflow, and a tiny value rounds to zero.
        assert!(fits("numeric(1,-1000)", "79228162514264337593543950335"));
        assert!(fits("numeric(1000,1000)", "0.1"));
        assert!(!fits("numeric(1000,1000)", "1"));
        assert!(!fits("numeric(1,1000)", "0.0000000000000000000000000001"));
    }

    /// A double at or beyond 2^53 may be the rounding of another integer (2^60 prints as
    /// 1152921504606847000): refused for numeric as for bigint; its decimal text is exact.
    #[test]
    fn numerics_refuse_doubles_beyond_the_safe_integers() {
        for n in [2f64.powi(53), -(2f64.powi(60)), 1e20, 1.5e300] {
            let e = to_param(ColType::Numeric, &json!(n)).unwrap_err();
            assert!(e.to_string().contains("decimal string"), "{n}: {e}");
        }
        let safe = 2f64.powi(53) - 1.0;
        assert_eq!(
            to_param(ColType::Numeric, &json!(safe)).unwrap(),
            Param::Numeric(Decimal::from(9_007_199_254_740_991i64))
        );
        assert_eq!(
            to_param(ColType::Numeric, &json!("1152921504606846976")).unwrap(),
            Param::Numeric(Decimal::from(1u64 << 60))
        );
        // An exact integer (not a double) is its own decimal text.
        assert_eq!(
            to_param(ColType::Numeric, &json!(1u64 << 60)).unwrap(),
            Param::Numeric(Decimal::from(1u64 << 60))
        );
    }

    /// PostgreSQL's text -> name cast would cut the value to 63 bytes silently.
    #[test]
    fn names_longer_than_63_bytes_are_refused() {
        let name = |v: &str| to_stored_param(ColType::Text, "name", &json!(v));
        assert!(name(&"x".repeat(63)).is_ok());
        let e = name(&"x".repeat(64)).unwrap_err();
        assert!(e.to_string().contains("64 bytes (at most 63)"), "{e}");
        // Bytes, not characters: 32 two-byte characters.
        assert!(name(&"ä".repeat(32)).is_err());
        assert!(name(&"ä".repeat(31)).is_ok());
        assert!(to_stored_param(ColType::Text, "text", &json!("x".repeat(64))).is_ok());
    }

    /// PostgreSQL's first date and timestamp is 4714-11-24 BC; earlier is a field error here,
    /// not PostgreSQL's "out of range" naming nothing.
    #[test]
    fn times_before_postgresqls_first_day_are_refused() {
        for (ty, ok, early) in [
            (ColType::Date, "-4713-11-24", "-4713-11-23"),
            (
                ColType::Timestamptz,
                "-4713-11-24T00:00:00Z",
                "-4713-11-23T23:59:59.999999Z",
            ),
            (
                ColType::Timestamp,
                "-4713-11-24T00:00:00Z",
                "-4713-11-24T00:59:59+01:00",
            ),
        ] {
            assert!(to_param(ty, &json!(ok)).is_ok(), "{ty:?} {ok}");
            let e = to_param(ty, &json!(early)).unwrap_err();
            assert!(
                e.to_string().contains("4714-11-24 BC"),
                "{ty:?} {early}: {e}"
            );
        }
        // Far below: the same error, not a panic; rounding up into the first day is fine.
        assert!(to_param(ColType::Date, &json!("-200000-01-01")).is_err());
        assert!(
            to_param(
                ColType::Timestamptz,
                &json!("-4713-11-23T23:59:59.9999996Z")
            )
            .is_ok()
        );
        // PostgreSQL's maxima (294276 AD, 5874897 AD) are beyond what chrono reads at all.
        assert!(to_param(ColType::Timestamptz, &json!("+200000-12-31T00:00:00Z")).is_ok());
        assert!(to_param(ColType::Timestamptz, &json!("+294277-01-01T00:00:00Z")).is_err());
        assert!(to_param(ColType::Date, &json!("+200000-12-31")).is_ok());
        assert!(to_param(ColType::Date, &json!("+5874898-01-01")).is_err());
    }

    #[test]
    fn times_decode_from_the_wire_form_infinities_included() {
        let text = |c: Option<Cell<'_>>| match c {
            Some(Cell::Text(t)) => t,
            Some(Cell::Time(t)) => Rfc3339::new().format(&t).to_string(),
            other => panic!("{other:?}"),
        };
        let ts = |micros: i64| time_cell(ColType::Timestamptz, &micros.to_be_bytes());
        assert_eq!(text(ts(0)), "2000-01-01T00:00:00Z");
        assert_eq!(text(ts(1_500_000)), "2000-01-01T00:00:01.500Z");
        assert_eq!(text(ts(i64::MAX)), "infinity");
        assert_eq!(text(ts(i64::MIN)), "-infinity");
        let date = |days: i32| time_cell(ColType::Date, &days.to_be_bytes());
        assert_eq!(text(date(0)), "2000-01-01");
        assert_eq!(text(date(-1)), "1999-12-31");
        assert_eq!(text(date(i32::MAX)), "infinity");
        assert_eq!(text(date(i32::MIN)), "-infinity");
        assert!(
            time_cell(ColType::Timestamp, &[1, 2, 3]).is_none(),
            "malformed"
        );
        assert_eq!(
            text(time_text_cell(
                ColType::Timestamptz,
                "2024-01-31 10:00:00.25+00"
            )),
            "2024-01-31T10:00:00.250Z"
        );
        assert_eq!(
            text(time_text_cell(ColType::Timestamp, "-infinity")),
            "-infinity"
        );
    }

    #[test]
    fn integers_are_range_checked() {
        assert_eq!(to_param(ColType::Int4, &json!(7)).unwrap(), Param::Int4(7));
        assert_eq!(
            to_param(ColType::Int4, &json!(7.0)).unwrap(),
            Param::Int4(7)
        );
        assert!(to_param(ColType::Int4, &json!(7.5)).is_err());
        assert!(to_param(ColType::Int4, &json!(3_000_000_000i64)).is_err());
        assert!(to_param(ColType::Int2, &json!(40_000)).is_err());
        assert!(to_param(ColType::Int4, &json!("7")).is_err());
        assert_eq!(
            to_param(ColType::Int8, &json!("9007199254740993")).unwrap(),
            Param::Int8(9_007_199_254_740_993)
        );
    }

    #[test]
    fn strings_uuids_timestamps() {
        assert!(to_param(ColType::Text, &json!(5)).is_err());
        let nul = to_param(ColType::Text, &json!("a\0b")).unwrap_err();
        assert!(nul.to_string().contains("NUL"), "{nul}");
        assert!(to_param(ColType::Jsonb, &json!({"k": ["x", "\0"]})).is_err());
        assert!(to_param(ColType::Jsonb, &json!({"k\0": 1})).is_err());
        assert!(to_param(ColType::Jsonb, &json!({"k": ["x", 1, null]})).is_ok());
        assert!(to_param(ColType::Json, &json!({"k": "\0"})).is_err());
        assert!(to_param(ColType::Uuid, &json!("not-a-uuid")).is_err());
        let id = Uuid::new_v4();
        assert_eq!(
            to_param(ColType::Uuid, &json!(id.to_string())).unwrap(),
            Param::Uuid(id)
        );
        let t = to_param(ColType::Timestamptz, &json!("2024-01-31T12:00:00+01:00")).unwrap();
        assert_eq!(
            t,
            Param::Timestamptz("2024-01-31T11:00:00Z".parse().unwrap())
        );
        assert!(to_param(ColType::Timestamptz, &json!("2024-01-31 12:00")).is_err());
        assert!(to_param(ColType::Timestamp, &json!("2024-01-31T12:00:00")).is_ok());
        assert!(to_param(ColType::Timestamp, &json!("yesterday")).is_err());
        assert!(to_param(ColType::Date, &json!("2024-02-30")).is_err());
        // Finer than microseconds: rounded, as PostgreSQL rounds its text input.
        for (sent, stored) in [
            (
                "2024-01-31T12:00:00.0000009Z",
                "2024-01-31T12:00:00.000001Z",
            ),
            (
                "2024-01-31T12:00:00.1234564Z",
                "2024-01-31T12:00:00.123456Z",
            ),
            ("2024-01-31T23:59:59.9999996Z", "2024-02-01T00:00:00Z"),
        ] {
            assert_eq!(
                to_param(ColType::Timestamptz, &json!(sent)).unwrap(),
                Param::Timestamptz(stored.parse().unwrap()),
                "{sent}"
            );
        }
        assert_eq!(
            to_param(ColType::Timestamp, &json!("2024-01-31 12:00:00.0000009")).unwrap(),
            Param::Timestamp("2024-01-31T12:00:00.000001".parse().unwrap())
        );
        // Far dates ("no end", "the beginning") still go through, rounded or not.
        for far in [
            "9999-12-31T23:59:59Z",
            "9999-12-31T23:59:59.9999999Z",
            "0001-01-01T00:00:00Z",
            "3000-01-01T00:00:00.0000004Z",
        ] {
            assert!(to_param(ColType::Timestamptz, &json!(far)).is_ok(), "{far}");
        }
    }

    #[test]
    fn negative_zero_keeps_its_sign_on_the_way_in() {
        let v = prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(-0.0)),
        };
        let json = proto_to_json(&v);
        assert!(
            json.as_f64()
                .is_some_and(|f| f == 0.0 && f.is_sign_negative()),
            "{json}"
        );
        match to_param(ColType::Float8, &json).unwrap() {
            Param::Float8(f) => assert!(f == 0.0 && f.is_sign_negative()),
            other => panic!("{other:?}"),
        }
        // An integer column still takes it as 0.
        assert_eq!(to_param(ColType::Int4, &json).unwrap(), Param::Int4(0));
        let zero = prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(0.0)),
        };
        assert_eq!(proto_to_json(&zero), json!(0));
    }

    #[test]
    fn numerics_keep_their_decimal_text() {
        assert_eq!(
            to_param(ColType::Numeric, &json!(0.95)).unwrap(),
            Param::Numeric(Decimal::from_str("0.95").unwrap())
        );
        assert_eq!(
            to_param(ColType::Numeric, &json!("0.1234")).unwrap(),
            Param::Numeric(Decimal::from_str("0.1234").unwrap())
        );
        assert!(to_param(ColType::Numeric, &json!("abc")).is_err());
        assert!(to_param(ColType::Numeric, &json!(true)).is_err());
        assert_eq!(
            to_param(ColType::Numeric, &json!("1.5e3")).unwrap(),
            Param::Numeric(Decimal::from(1500))
        );
        assert_eq!(exact_decimal("-1.5E+3"), Some(Decimal::from(-1500)));
        assert_eq!(exact_decimal("25e-3"), Decimal::from_str("0.025").ok());
        assert_eq!(
            to_param(ColType::Numeric, &json!(1e-7)).unwrap(),
            Param::Numeric(Decimal::from_str("0.0000001").unwrap())
        );
        assert_eq!(exact_decimal("1e"), None);
        // Exponents far outside any Decimal: refused, never an arithmetic overflow.
        assert_eq!(exact_decimal("1e-9223372036854775808"), None);
        assert_eq!(exact_decimal("1e9223372036854775807"), None);
        assert_eq!(exact_decimal("1e-30"), None, "29+ decimal places");
        let e = to_param(ColType::Numeric, &json!("1e-30")).unwrap_err();
        assert!(e.to_string().contains("decimal places"), "{e}");
        // 28 significant digits are kept; a 29th would be rounded away, so it is refused.
        let exact = "1234567890.123456789012345678";
        assert_eq!(
            to_param(ColType::Numeric, &json!(exact)).unwrap(),
            Param::Numeric(Decimal::from_str(exact).unwrap())
        );
        let err = to_param(ColType::Numeric, &json!("12345678901234567890.0123456789"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("28 significant digits"), "{err}");
        let err = to_param(
            ColType::Numeric,
            &json!("1.2345678901234567890123456789012e3"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("28 significant digits"), "{err}");
        // One significant digit, but beyond a Decimal's magnitude: the message says so.
        let err = to_param(ColType::Numeric, &json!("1e29"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("magnitude below 7.9e28"), "{err}");
    }

    #[test]
    fn float_columns_take_only_the_three_strings_they_read_back_as() {
        for ty in [ColType::Float4, ColType::Float8] {
            for (text, want) in [
                ("NaN", f64::NAN),
                ("Infinity", f64::INFINITY),
                ("-Infinity", f64::NEG_INFINITY),
            ] {
                let got = match to_param(ty, &json!(text)).unwrap() {
                    Param::Float4(f) => f64::from(f),
                    Param::Float8(f) => f,
                    other => panic!("{other:?}"),
                };
                assert!(got == want || (got.is_nan() && want.is_nan()), "{text}");
            }
            // An overflow is not Infinity, and other spellings or numbers as text are not taken.
            for bad in ["1e400", "-1e400", "inf", "nan", "infinity", "1.5", ""] {
                let e = to_param(ty, &json!(bad)).unwrap_err();
                assert!(matches!(e, DbError::Validation(_)), "{bad}: {e:?}");
            }
        }
    }

    #[test]
    fn null_is_typed_null_and_json_is_anything() {
        assert_eq!(
            to_param(ColType::Uuid, &Json::Null).unwrap(),
            Param::Null(ColType::Uuid)
        );
        assert_eq!(
            to_param(ColType::Jsonb, &json!({"a": [1, 2]})).unwrap(),
            Param::Jsonb(json!({"a": [1, 2]}))
        );
        assert!(to_param(ColType::Other, &json!("x")).is_err());
        // Nor written as null: bound as text, it would not be an interval or an enum.
        let null = to_stored_param(ColType::Other, "interval", &Json::Null).unwrap_err();
        assert_eq!(null.violations()[0].field, "");
    }

    #[test]
    fn jsonb_decodes_straight_into_proto_values() {
        let doc = r#"{"a": 1, "b": [true, null, "x"], "c": {"d": 1.5}, "a": 2}"#;
        let ProtoValue(v) = serde_json::from_str(doc).unwrap();
        // Same result as through serde_json (a repeated key keeps its last value).
        let via_json = json_to_proto(&serde_json::from_str(doc).unwrap());
        assert_eq!(v, via_json);
        assert_eq!(
            proto_to_json(&v),
            json!({"a": 2, "b": [true, null, "x"], "c": {"d": 1.5}})
        );
        // Beyond a double's exact range: the decimal text, on both paths.
        let ProtoValue(big) = serde_json::from_str("18446744073709551615").unwrap();
        assert_eq!(big, Cell::Text("18446744073709551615".into()).into_value());
    }

    #[test]
    fn a_recorded_result_reads_back_as_the_values_it_was_recorded_from() {
        use prost_types::value::Kind;
        let number = |f: f64| prost_types::Value {
            kind: Some(Kind::NumberValue(f)),
        };
        let text = |s: &str| prost_types::Value {
            kind: Some(Kind::StringValue(s.into())),
        };
        let row = prost_types::Struct {
            fields: [
                ("small", number(-3.0)),
                ("half", number(1.5)),
                ("past_exact", number(1e16)),
                ("huge", number(1e300)),
                ("big_id", text("9007199254740993")),
                (
                    "doc",
                    prost_types::Value {
                        kind: Some(Kind::ListValue(prost_types::ListValue {
                            values: vec![number(2f64.powi(60)), text("x")],
                        })),
                    },
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        };
        // Recorded as JSON and stored as jsonb, which prints every number as a decimal: the
        // double 1e16 comes back as the integer 10000000000000000.
        fn as_jsonb_prints(v: Json) -> Json {
            match v {
                Json::Number(n) => match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 1.8e19 => {
                        serde_json::from_str(&format!("{f:.0}")).unwrap()
                    }
                    _ => Json::Number(n),
                },
                Json::Array(a) => Json::Array(a.into_iter().map(as_jsonb_prints).collect()),
                Json::Object(o) => Json::Object(
                    o.into_iter()
                        .map(|(k, v)| (k, as_jsonb_prints(v)))
                        .collect(),
                ),
                other => other,
            }
        }
        let recorded = as_jsonb_prints(Json::Object(struct_to_json(&row)));
        assert_eq!(
            recorded["past_exact"].as_u64(),
            Some(10_000_000_000_000_000)
        );
        let Json::Object(back) = recorded else {
            unreachable!()
        };
        assert_eq!(recorded_into_struct(back), row);
    }

    #[test]
    fn non_finite_numbers_become_strings() {
        use prost_types::value::Kind;
        assert_eq!(
            number_value(f64::NAN).kind,
            Some(Kind::StringValue("NaN".into()))
        );
        assert_eq!(
            number_value(f64::INFINITY).kind,
            Some(Kind::StringValue("Infinity".into()))
        );
        assert_eq!(number_value(2.5).kind, Some(Kind::NumberValue(2.5)));
    }

    #[test]
    fn numerics_a_double_would_change_become_decimal_strings() {
        use prost_types::value::Kind;
        let kind = |s: &str| Cell::numeric(s.to_string()).into_value().kind;
        assert_eq!(kind("0.9512"), Some(Kind::NumberValue(0.9512)));
        assert_eq!(kind("0.1000"), Some(Kind::NumberValue(0.1)));
        assert_eq!(kind("5.000"), Some(Kind::NumberValue(5.0)));
        assert_eq!(kind("100"), Some(Kind::NumberValue(100.0)));
        assert_eq!(kind("NaN"), Some(Kind::StringValue("NaN".into())));
        assert_eq!(
            kind("-Infinity"),
            Some(Kind::StringValue("-Infinity".into()))
        );
        assert_eq!(kind("1.10000000000000000000"), Some(Kind::NumberValue(1.1)));
        assert_eq!(kind("-12.5"), Some(Kind::NumberValue(-12.5)));
        assert_eq!(kind("0"), Some(Kind::NumberValue(0.0)));
        assert_eq!(
            kind("123456789012345"),
            Some(Kind::NumberValue(123456789012345.0))
        );
        assert_eq!(
            kind("12345678901234567890"),
            Some(Kind::StringValue("12345678901234567890".into()))
        );
        assert_eq!(
            kind("0.12345678901234567891"),
            Some(Kind::StringValue("0.12345678901234567891".into()))
        );
        assert_eq!(
            kind("-1.10000000000000000001"),
            Some(Kind::StringValue("-1.10000000000000000001".into()))
        );
    }

    #[test]
    fn bigints_beyond_doubles_become_decimal_strings() {
        use prost_types::value::Kind;
        let kind = |n: i64| Cell::bigint(n).into_value().kind;
        let safe = 9_007_199_254_740_991i64; // 2^53 - 1
        assert_eq!(kind(safe), Some(Kind::NumberValue(safe as f64)));
        assert_eq!(kind(-safe), Some(Kind::NumberValue(-safe as f64)));
        assert_eq!(kind(0), Some(Kind::NumberValue(0.0)));
        // 2^53 is a double, but so is the rounding of 2^53 + 1: text from there on.
        assert_eq!(
            kind(safe + 1),
            Some(Kind::StringValue("9007199254740992".into()))
        );
        assert_eq!(
            kind(-safe - 1),
            Some(Kind::StringValue("-9007199254740992".into()))
        );
        assert_eq!(
            kind(i64::MIN),
            Some(Kind::StringValue("-9223372036854775808".into()))
        );
        // What goes out as a string comes back in as the same bigint.
        assert_eq!(
            to_param(ColType::Int8, &json!(i64::MAX.to_string())).unwrap(),
            Param::Int8(i64::MAX)
        );
        assert_eq!(
            to_param(ColType::Int8, &json!(safe as f64)).unwrap(),
            Param::Int8(safe)
        );
        // 9007199254740993 sent as a number arrives as the double 2^53: refused, not rounded.
        for n in [2f64.powi(53), -(2f64.powi(53)), 2f64.powi(54)] {
            assert!(to_param(ColType::Int8, &json!(n)).is_err(), "{n}");
        }
    }

    #[test]
    fn proto_json_round_trip() {
        let v = json!({"a": 1, "b": [true, null, "x"], "c": {"d": 1.5}});
        let Json::Object(map) = &v else {
            unreachable!()
        };
        assert_eq!(Json::Object(struct_to_json(&json_to_struct(map))), v);
    }

    #[test]
    fn json_levels_count_protobuf_messages_outside_strings() {
        assert_eq!(json_levels(b"1"), (0, 1));
        assert_eq!(json_levels(b"[]"), (1, 2));
        assert_eq!(json_levels(b"{}"), (1, 2));
        assert_eq!(json_levels(b"[1]"), (1, 3));
        assert_eq!(json_levels(br#"{"a": 1}"#), (1, 4));
        // Value > Struct > entry > Value > ListValue > Value > Struct > entry > Value.
        assert_eq!(json_levels(br#"{"a": [1, {"b": 2}]}"#), (3, 9));
        assert_eq!(json_levels(br#"["[[[", "\"{{", {}]"#), (2, 4));
        let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
        assert_eq!(json_levels(deep.as_bytes()), (129, 2 * 129));
        for doc in [
            json!(1),
            json!([]),
            json!({"a": [1, {"b": 2}], "c": {}}),
            json!([[[]], {"x": {"y": [null]}}]),
        ] {
            let text = doc.to_string();
            assert_eq!(
                json_levels(text.as_bytes()),
                (value_depth(&doc), value_levels(&doc)),
                "{text}"
            );
        }
    }

    /// Nested `n` times as `{"a": ...}` around `inner`.
    fn objects(n: usize, inner: &str) -> String {
        format!("{}{inner}{}", r#"{"a": "#.repeat(n), "}".repeat(n))
    }

    #[test]
    fn json_deeper_than_a_response_holds_is_refused_on_input() {
        // 31 objects around a scalar: 94 levels; 32: 97.
        let ok: Json = serde_json::from_str(&objects(31, "[1]")).unwrap();
        assert_eq!(value_levels(&ok), VALUE_MAX_LEVELS);
        assert!(to_stored_param(ColType::Jsonb, "jsonb", &ok).is_ok());
        let deep: Json = serde_json::from_str(&objects(31, "[[]]")).unwrap();
        assert_eq!(value_levels(&deep), VALUE_MAX_LEVELS + 1);
        for ty in [ColType::Json, ColType::Jsonb] {
            let e = to_param(ty, &deep).unwrap_err();
            assert_eq!(e.violations()[0].field, "");
            assert!(e.to_string().contains("nested 33 levels deep"), "{e}");
        }
    }

    #[test]
    fn json_integers_beyond_a_doubles_exact_range_read_as_decimal_text() {
        use prost::Message;
        let doc = br#"{"ok": 9007199254740991, "big": 9007199254740993, "neg": -9007199254740993, "huge": 18446744073709551615, "wider": 123456789012345678901234567890, "below": -9223372036854775809, "f": 1.5}"#;
        let parsed = json_value(doc).unwrap();
        let mut bytes = Vec::new();
        crate::wire::encode_json(doc, &mut bytes).unwrap();
        let transcoded = prost_types::Value::decode(bytes.as_slice()).unwrap();
        for value in [parsed, transcoded] {
            assert_eq!(
                proto_to_json(&value),
                json!({
                    "ok": 9007199254740991i64,
                    "big": "9007199254740993",
                    "neg": "-9007199254740993",
                    "huge": "18446744073709551615",
                    "wider": "123456789012345678901234567890",
                    "below": "-9223372036854775809",
                    "f": 1.5
                })
            );
        }
    }

    #[test]
    fn too_deep_json_is_unrepresentable_other_failures_are_database_errors() {
        let at_limit = objects(31, "[1]");
        let too_deep = objects(31, "[[]]");
        let ProtoValue(v) = serde_json::from_str(&at_limit).unwrap();
        assert_eq!(
            proto_to_json(&v),
            serde_json::from_str::<Json>(&at_limit).unwrap()
        );
        let e = serde_json::from_str::<ProtoValue>(&too_deep).err().unwrap();
        match json_error("details", too_deep.as_bytes(), e) {
            DbError::Unrepresentable { column, message } => {
                assert_eq!(column, "details");
                assert!(message.contains("33 levels deep"), "{message}");
                assert!(message.contains("97 nested protobuf messages"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Deeper than serde_json follows at all: the same error.
        let deeper = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let e = serde_json::from_str::<ProtoValue>(&deeper).err().unwrap();
        assert!(matches!(
            json_error("details", deeper.as_bytes(), e),
            DbError::Unrepresentable { message, .. } if message.contains("200 levels deep")
        ));
        let e = serde_json::from_str::<serde_json::Value>("[1,").unwrap_err();
        assert!(matches!(
            json_error("details", b"[1,", e),
            DbError::Database(m) if m.contains("details")
        ));
        // A number jsonb holds (a numeric) but a double cannot, on both read paths.
        let huge = br#"{"x": [1e400]}"#;
        let Err(parsed) = serde_json::from_slice::<ProtoValue>(huge) else {
            panic!("1e400 parsed as a double")
        };
        let transcoded = crate::wire::encode_json(huge, &mut Vec::new()).unwrap_err();
        for e in [parsed, transcoded] {
            match json_error("details", huge, e) {
                DbError::Unrepresentable { column, message } => {
                    assert_eq!(column, "details");
                    assert!(message.contains("double's range"), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
