//! The type mapping's edges against a real PostgreSQL: values PostgreSQL would refuse (or
//! change) are refused by db-svc first, naming the field, and stored values a protobuf client
//! could not decode are refused on the way out, naming the column.

use omnibus_proto::db::v1 as pb;
use omnibus_tests::db::{DbSvc, error_details, error_metadata, rows_json, to_struct};
use serde_json::{Value as Json, json};
use tonic::Code;

const DDL: &str = "CREATE TABLE vals (id int PRIMARY KEY, doc jsonb, wide numeric(30,2), \
                   hundreds numeric(5,-2), tiny numeric(2,5), x numeric, n name, d date, \
                   t timestamptz, ts timestamp)";

fn insert(row: Json) -> pb::InsertRequest {
    pb::InsertRequest {
        table: "vals".into(),
        rows: vec![to_struct(row)],
        ..Default::default()
    }
}

fn assert_field_error(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let (reason, fields) = error_details(status);
    assert_eq!(reason, "VALIDATION_ERROR", "{status:?}");
    assert_eq!(fields, vec![field.to_string()], "{}", status.message());
}

/// `n` objects `{"k": ...}` around `inner`.
fn objects(n: usize, inner: &str) -> String {
    format!("{}{inner}{}", r#"{"k": "#.repeat(n), "}".repeat(n))
}

/// A jsonb value another writer stored 33 levels deep would need 101 nested protobuf messages
/// in a response; prost (like the Java, C++ and Python runtimes) stops at 100, so the client
/// would get an undecodable response. db-svc refuses it as UNREPRESENTABLE_VALUE naming the
/// column, on every path that returns rows; 31 levels of objects still read back, and a
/// deeper value is refused on input.
#[tokio::test]
async fn jsonb_too_deep_for_protobuf_readers_is_refused_naming_the_column() {
    let s = DbSvc::start_with(DDL, "vals").await;
    let mut conn = s.sql().await;
    let at_limit = objects(31, "[1]");
    let too_deep = objects(31, "[[]]");
    sqlx::query("INSERT INTO vals (id, doc) VALUES (1, $1::jsonb), (2, $2::jsonb)")
        .bind(&at_limit)
        .bind(&too_deep)
        .execute(&mut conn)
        .await
        .unwrap();
    let mut client = s.client.clone();
    let query = |id: i32| pb::QueryRequest {
        table: "vals".into(),
        columns: vec!["id".into(), "doc".into()],
        r#where: Some(to_struct(json!({ "id": id }))),
        ..Default::default()
    };

    // At the limit: decoded by the prost-generated client.
    let rows = client.query(query(1)).await.unwrap().into_inner().rows;
    let want: Json = serde_json::from_str(&at_limit).unwrap();
    assert_eq!(rows_json(&rows)[0]["doc"], to_floats(want));

    let check = |err: tonic::Status, path: &str| {
        assert_eq!(err.code(), Code::FailedPrecondition, "{path}: {err:?}");
        assert_eq!(error_details(&err).0, "UNREPRESENTABLE_VALUE", "{path}");
        assert_eq!(
            error_metadata(&err, "column").as_deref(),
            Some("doc"),
            "{path}"
        );
        assert!(err.message().contains("33 levels deep"), "{path}: {err:?}");
    };
    check(client.query(query(2)).await.unwrap_err(), "Query");
    let mut stream = client
        .stream_query(pb::StreamQueryRequest {
            query: Some(query(2)),
            batch_size: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let err = omnibus_tests::db::stream_error(&mut stream).await;
    check(err, "StreamQuery");
    // Rows returned by a write take the other encoding path.
    let err = client
        .update(pb::UpdateRequest {
            table: "vals".into(),
            r#where: Some(to_struct(json!({"id": 2}))),
            set: Some(to_struct(json!({"x": 1}))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    check(err, "Update");

    // On input, what could not be read back is refused (prost on the server still decodes it:
    // a request row nests as deep as a response row, and the limit keeps a margin).
    let err = client
        .insert(insert(json!({
            "id": 3,
            "doc": serde_json::from_str::<Json>(&too_deep).unwrap()
        })))
        .await
        .unwrap_err();
    assert_field_error(&err, "rows[0].doc");
}

/// Integers in a jsonb document read back as doubles over gRPC.
fn to_floats(v: Json) -> Json {
    match v {
        Json::Number(n) => json!(n.as_f64().unwrap()),
        Json::Array(a) => Json::Array(a.into_iter().map(to_floats).collect()),
        Json::Object(o) => Json::Object(o.into_iter().map(|(k, v)| (k, to_floats(v))).collect()),
        other => other,
    }
}

/// Values PostgreSQL would refuse with an error naming no field (numeric overflow, dates out
/// of range) or change silently (a long `name` cut to 63 bytes, a double beyond 2^53 stored
/// as another integer) are INVALID_ARGUMENT naming the field; nothing is written.
#[tokio::test]
async fn values_postgresql_would_refuse_or_change_are_field_errors() {
    let s = DbSvc::start_with(DDL, "vals").await;
    let mut client = s.client.clone();
    for (column, value) in [
        // 29 digits before the point; numeric(30,2) holds 28.
        ("wide", json!("10000000000000000000000000000")),
        // Rounds to 10000000: more than 5 digits of hundreds.
        ("hundreds", json!(9_999_950)),
        // Rounds to 0.00100: at least 10^-3.
        ("tiny", json!("0.000995")),
        // 2^60 as a double: it would be stored as 1152921504606847000.
        ("x", json!(2f64.powi(60))),
        ("n", json!("n".repeat(64))),
        ("d", json!("-4713-11-23")),
        ("t", json!("-4713-11-23T23:59:59Z")),
        ("ts", json!("-4713-11-23T23:59:59Z")),
    ] {
        let err = client
            .insert(insert(json!({"id": 1, column: value})))
            .await
            .unwrap_err();
        assert_field_error(&err, &format!("rows[0].{column}"));
    }
    assert_eq!(s.count_all("vals").await, 0);

    // Just inside every bound: stored, and read back as sent.
    let row = json!({
        "id": 1,
        "wide": "9999999999999999999999999999",
        "hundreds": 9_999_949,
        "tiny": "0.000994",
        "x": "1152921504606846976",
        "n": "n".repeat(63),
        "d": "-4713-11-24",
        "t": "-4713-11-24T00:00:00Z",
        "ts": "-4713-11-24T00:00:00Z",
    });
    client.insert(insert(row)).await.unwrap();
    let rows = client
        .query(pb::QueryRequest {
            table: "vals".into(),
            columns: ["wide", "hundreds", "tiny", "x", "n", "d", "t", "ts"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(
        rows_json(&rows),
        vec![json!({
            "wide": "9999999999999999999999999999.00",
            "hundreds": 9_999_900.0,
            "tiny": 0.00099,
            "x": "1152921504606846976",
            "n": "n".repeat(63),
            "d": "-4713-11-24",
            "t": "-4713-11-24T00:00:00Z",
            "ts": "-4713-11-24T00:00:00Z",
        })]
    );
}
