//! Property test of the filter-to-SQL builder: for any filter tree with any values (quotes,
//! semicolons, `$1`, comment markers, unicode...), the SQL holds only catalog identifiers
//! (quoted), fixed keywords/operators and `$n` placeholders numbered 1..n in order; every value
//! travels as a bind parameter; and the SQL parses.

use db_svc::catalog::{ColType, ColumnInfo, TableInfo};
use db_svc::ops::{Filter, Op, plan_filter};
use db_svc::values::{Param, to_param};
use proptest::prelude::*;
use serde_json::{Value as Json, json};

fn table() -> TableInfo {
    let col = |name: &str, ty: ColType, sql: &str| ColumnInfo {
        name: name.into(),
        ty,
        sql_type: sql.into(),
        nullable: true,
        default: None,
    };
    TableInfo {
        name: "t".into(),
        columns: vec![
            col("name", ColType::Text, "text"),
            col("weird \"col\"; --", ColType::Text, "text"),
            col("n", ColType::Int4, "integer"),
            col("score", ColType::Numeric, "numeric"),
            col("details", ColType::Jsonb, "jsonb"),
            col("id", ColType::Uuid, "uuid"),
            col("at", ColType::Timestamptz, "timestamp with time zone"),
            col("ok", ColType::Bool, "boolean"),
        ],
        primary_key: vec!["id".into()],
        insert_may_skip_rows: false,
    }
}

/// Strings meant to break out of any splicing. (Without U+0000, which PostgreSQL text cannot
/// hold: a value carrying it is refused before planning, see `nul_in_a_value_is_refused`.)
fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        ".*".prop_map(|s| s.replace('\0', "")),
        Just("'; DROP TABLE t; --".to_string()),
        Just("\" OR 1=1 --".to_string()),
        Just("$1".to_string()),
        Just("/* */ AND".to_string()),
        Just("\\'".to_string()),
        Just("name".to_string()),
    ]
}

fn json_leaf() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i32>().prop_map(|i| json!(i)),
        nasty_string().prop_map(Json::String),
    ]
}

fn json_value() -> impl Strategy<Value = Json> {
    json_leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::btree_map(nasty_string(), inner, 0..4)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

/// A well-typed condition on a random column.
fn condition() -> impl Strategy<Value = Filter> {
    let text_col = prop_oneof![Just("name"), Just("weird \"col\"; --")];
    let text = (
        text_col,
        prop_oneof![
            Just(Op::Eq),
            Just(Op::Neq),
            Just(Op::Gt),
            Just(Op::Like),
            Just(Op::ILike)
        ],
        nasty_string(),
    )
        .prop_map(|(c, op, v)| (c.to_string(), op, json!(v)));
    let text_in = (
        prop_oneof![Just(Op::In), Just(Op::NotIn)],
        prop::collection::vec(nasty_string(), 0..5),
    )
        .prop_map(|(op, v)| ("name".to_string(), op, json!(v)));
    let int = (
        prop_oneof![Just(Op::Lt), Just(Op::Lte), Just(Op::Gte), Just(Op::Eq)],
        any::<i32>(),
    )
        .prop_map(|(op, v)| ("n".to_string(), op, json!(v)));
    let numeric = (-1000i64..1000, 0u32..4).prop_map(|(m, s)| {
        (
            "score".to_string(),
            Op::Gt,
            json!(m as f64 / 10f64.powi(s as i32)),
        )
    });
    let contains = json_value().prop_map(|v| ("details".to_string(), Op::Contains, v.clone()));
    let contains = contains.prop_filter("not null", |(_, _, v)| !v.is_null());
    let uuid = any::<u128>().prop_map(|u| {
        (
            "id".to_string(),
            Op::Eq,
            json!(uuid::Uuid::from_u128(u).to_string()),
        )
    });
    let time = (0i64..4_000_000_000).prop_map(|s| {
        let t = chrono::DateTime::from_timestamp(s, 0).unwrap();
        ("at".to_string(), Op::Gte, json!(t.to_rfc3339()))
    });
    let boolean = any::<bool>().prop_map(|b| ("ok".to_string(), Op::Eq, json!(b)));
    let nulls = (
        prop_oneof![Just("name"), Just("n"), Just("details"), Just("at")],
        prop_oneof![Just(Op::IsNull), Just(Op::IsNotNull)],
    )
        .prop_map(|(c, op)| (c.to_string(), op, Json::Null));
    prop_oneof![
        text, text_in, int, numeric, contains, uuid, time, boolean, nulls
    ]
    .prop_map(|(column, op, value)| Filter::Condition { column, op, value })
}

fn filter() -> impl Strategy<Value = Filter> {
    condition().prop_recursive(4, 40, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Filter::All),
            prop::collection::vec(inner.clone(), 0..5).prop_map(Filter::Any),
            inner.prop_map(|f| Filter::Not(Box::new(f))),
        ]
    })
}

/// The parameters the filter must produce, in order: an independent walk of the tree.
fn expected_params(table: &TableInfo, f: &Filter, out: &mut Vec<Param>) {
    match f {
        Filter::All(v) | Filter::Any(v) => v.iter().for_each(|f| expected_params(table, f, out)),
        Filter::Not(f) => expected_params(table, f, out),
        Filter::Condition { column, op, value } => {
            let ty = table.column(column).unwrap().ty;
            match op {
                Op::IsNull | Op::IsNotNull => {}
                Op::In | Op::NotIn => {
                    for v in value.as_array().unwrap() {
                        out.push(to_param(ty, v).unwrap());
                    }
                }
                _ => out.push(to_param(ty, value).unwrap()),
            }
        }
    }
}

/// Removes quoted identifiers (checking each is a catalog column) and `$n` placeholders
/// (checking they count up from 1); returns what is left.
fn strip(sql: &str, table: &TableInfo) -> Result<String, String> {
    let mut rest = String::new();
    let mut chars = sql.chars().peekable();
    let mut next_placeholder = 1;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut ident = String::new();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            ident.push('"');
                        }
                        Some('"') => break,
                        Some(c) => ident.push(c),
                        None => return Err("unterminated identifier".into()),
                    }
                }
                if table.column(&ident).is_none() {
                    return Err(format!("identifier {ident:?} is not in the catalog"));
                }
                rest.push_str(" ID ");
            }
            '$' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                if digits.parse::<usize>() != Ok(next_placeholder) {
                    return Err(format!(
                        "placeholder ${digits}, expected ${next_placeholder}"
                    ));
                }
                next_placeholder += 1;
                rest.push_str(" P ");
            }
            c => rest.push(c),
        }
    }
    Ok(rest)
}

const ALLOWED: &[&str] = &[
    "ID", "P", "AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "ILIKE", "TRUE", "FALSE", "=", "<>",
    ">", ">=", "<", "<=", "@>", "(", ")", ",",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn only_catalog_identifiers_and_bound_parameters(f in filter()) {
        let table = table();
        let plan = plan_filter(&table, &f).expect("well-typed filters plan");

        let mut want = Vec::new();
        expected_params(&table, &f, &mut want);
        prop_assert_eq!(&plan.params, &want);

        let rest = strip(&plan.sql, &table).map_err(TestCaseError::fail)?;
        let spaced = rest.replace('(', " ( ").replace(')', " ) ").replace(',', " , ");
        for token in spaced.split_whitespace() {
            prop_assert!(ALLOWED.contains(&token), "unexpected token {:?} in {}", token, plan.sql);
        }
        let placeholders = plan.sql.matches('$').count();
        prop_assert_eq!(placeholders, plan.params.len());

        let statement = format!("SELECT 1 FROM t WHERE {}", plan.sql);
        let parsed = sqlparser::parser::Parser::parse_sql(
            &sqlparser::dialect::PostgreSqlDialect {},
            &statement,
        );
        prop_assert!(parsed.is_ok(), "{} does not parse: {:?}", statement, parsed.err());
    }

    #[test]
    fn nul_in_a_value_is_refused(prefix in nasty_string(), suffix in nasty_string()) {
        let table = table();
        let value = format!("{prefix}\0{suffix}");
        let f = Filter::Any(vec![
            Filter::Condition { column: "n".into(), op: Op::Eq, value: json!(1) },
            Filter::Condition { column: "name".into(), op: Op::Like, value: json!(value) },
        ]);
        let err = plan_filter(&table, &f).unwrap_err();
        prop_assert_eq!(err.code(), "VALIDATION_ERROR");
        prop_assert_eq!(
            &err.violations()[0].field,
            "filter.any.filters[1].condition.value"
        );
    }

    #[test]
    fn unknown_columns_never_reach_sql(name in ".*", value in nasty_string()) {
        let table = table();
        prop_assume!(table.column(&name).is_none());
        let f = Filter::All(vec![
            Filter::Condition { column: "n".into(), op: Op::Eq, value: json!(1) },
            Filter::Condition { column: name, op: Op::Eq, value: json!(value) },
        ]);
        let err = plan_filter(&table, &f).unwrap_err();
        prop_assert_eq!(err.code(), "VALIDATION_ERROR");
        prop_assert_eq!(
            &err.violations()[0].field,
            "filter.all.filters[1].condition.column"
        );
    }
}
