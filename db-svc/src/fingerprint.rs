//! A write's fingerprint, recorded with its `request_id`: a later request with that id is only
//! answered with the recorded result when it is the same write. One that differs (a client bug
//! reusing ids, two writers sharing an id scheme) is refused with `REQUEST_ID_REUSED` instead
//! of being told its write happened when it never ran.
//!
//! The digest is canonical, so that a retry matches whichever transport carries it (the bus
//! worker and the gRPC fallback both send the client's request): object keys are taken in
//! sorted order, a number is its value whether it arrived as `5`, `5.0` or a protobuf double,
//! and every string and list is length-prefixed so no two requests encode alike.

use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::ops::{Criteria, Direction, Filter, JsonRow, Nulls, Op, Operation, OrderBy};

/// SHA-256 of the canonical form of `op`.
pub fn of(op: &Operation) -> [u8; 32] {
    let mut c = Canon(Sha256::new());
    c.str(op.name());
    match op {
        Operation::Query(s) => {
            c.str(&s.table);
            c.strs(&s.columns);
            c.criteria(&s.criteria);
            c.len(s.order_by.len());
            for o in &s.order_by {
                c.order(o);
            }
            c.opt(s.limit);
            c.u64(s.offset);
            c.bool(s.include_total);
        }
        Operation::Count(s) => {
            c.str(&s.table);
            c.criteria(&s.criteria);
        }
        Operation::Insert(s) => {
            c.str(&s.table);
            c.rows(&s.rows);
            c.bool(s.count_only);
        }
        Operation::Update(s) => {
            c.str(&s.table);
            c.criteria(&s.criteria);
            c.object(&s.set);
            c.opt(s.max_affected);
            c.bool(s.count_only);
        }
        Operation::Delete(s) => {
            c.str(&s.table);
            c.criteria(&s.criteria);
            c.opt(s.max_affected);
            c.bool(s.count_only);
        }
        Operation::Upsert(s) => {
            c.str(&s.table);
            c.rows(&s.rows);
            c.strs(&s.conflict_columns);
            c.strs(&s.update_columns);
            c.bool(s.ignore_duplicates);
            c.bool(s.count_only);
        }
        Operation::Raw(s) => {
            c.str(&s.sql);
            c.len(s.params.len());
            for p in &s.params {
                c.json(p);
            }
        }
    }
    c.0.finalize().into()
}

/// Feeds values to the digest in an unambiguous, transport-independent form.
struct Canon(Sha256);

impl Canon {
    fn tag(&mut self, t: u8) {
        self.0.update([t]);
    }
    fn len(&mut self, n: usize) {
        self.0.update((n as u64).to_le_bytes());
    }
    fn u64(&mut self, n: u64) {
        self.0.update(n.to_le_bytes());
    }
    fn bool(&mut self, b: bool) {
        self.tag(u8::from(b));
    }
    fn opt(&mut self, n: Option<u64>) {
        match n {
            None => self.tag(0),
            Some(n) => {
                self.tag(1);
                self.u64(n);
            }
        }
    }
    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.update(s.as_bytes());
    }
    fn strs(&mut self, v: &[String]) {
        self.len(v.len());
        for s in v {
            self.str(s);
        }
    }
    fn rows(&mut self, rows: &[JsonRow]) {
        self.len(rows.len());
        for r in rows {
            self.object(r);
        }
    }
    fn object(&mut self, m: &JsonRow) {
        let mut keys: Vec<&String> = m.keys().collect();
        keys.sort_unstable();
        self.len(keys.len());
        for k in keys {
            self.str(k);
            self.json(&m[k.as_str()]);
        }
    }
    fn json(&mut self, v: &Json) {
        match v {
            Json::Null => self.tag(b'n'),
            Json::Bool(b) => {
                self.tag(b'b');
                self.bool(*b);
            }
            Json::Number(n) => {
                // One form per value: an integral number is an integer however it was written.
                let integral = n.as_i64().map(i128::from).or(n.as_u64().map(i128::from));
                let integral = integral.or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() < 1.8e19)
                        .map(|f| f as i128)
                });
                match integral {
                    Some(i) => {
                        self.tag(b'i');
                        self.0.update(i.to_le_bytes());
                    }
                    None => {
                        self.tag(b'f');
                        let f = n.as_f64().unwrap_or(f64::NAN);
                        self.0.update(f.to_bits().to_le_bytes());
                    }
                }
            }
            Json::String(s) => {
                self.tag(b's');
                self.str(s);
            }
            Json::Array(a) => {
                self.tag(b'a');
                self.len(a.len());
                for x in a {
                    self.json(x);
                }
            }
            Json::Object(m) => {
                self.tag(b'o');
                self.object(m);
            }
        }
    }
    fn criteria(&mut self, c: &Criteria) {
        self.object(&c.equals);
        match &c.filter {
            None => self.tag(0),
            Some(f) => {
                self.tag(1);
                self.filter(f);
            }
        }
    }
    fn filter(&mut self, f: &Filter) {
        match f {
            Filter::Condition { column, op, value } => {
                self.tag(b'c');
                self.str(column);
                self.tag(op_code(*op));
                self.json(value);
            }
            Filter::All(v) | Filter::Any(v) => {
                self.tag(if matches!(f, Filter::All(_)) {
                    b'&'
                } else {
                    b'|'
                });
                self.len(v.len());
                for x in v {
                    self.filter(x);
                }
            }
            Filter::Not(x) => {
                self.tag(b'!');
                self.filter(x);
            }
        }
    }
    fn order(&mut self, o: &OrderBy) {
        self.str(&o.column);
        self.tag(match o.direction {
            Direction::Asc => 0,
            Direction::Desc => 1,
        });
        self.tag(match o.nulls {
            Nulls::Default => 0,
            Nulls::First => 1,
            Nulls::Last => 2,
        });
    }
}

fn op_code(op: Op) -> u8 {
    match op {
        Op::Eq => 1,
        Op::Neq => 2,
        Op::Gt => 3,
        Op::Gte => 4,
        Op::Lt => 5,
        Op::Lte => 6,
        Op::In => 7,
        Op::NotIn => 8,
        Op::Like => 9,
        Op::ILike => 10,
        Op::IsNull => 11,
        Op::IsNotNull => 12,
        Op::Contains => 13,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{DeleteSpec, InsertSpec, RawSpec};
    use serde_json::json;

    fn insert(rows: Json) -> Operation {
        let rows = rows
            .as_array()
            .expect("array")
            .iter()
            .map(|r| r.as_object().expect("object").clone())
            .collect();
        Operation::Insert(InsertSpec {
            table: "agent_actions".into(),
            rows,
            count_only: false,
        })
    }

    #[test]
    fn the_same_write_however_written_has_one_fingerprint() {
        let a = insert(json!([{"agent_name": "a", "duration_ms": 5, "x": {"k": 1, "j": [1.0]}}]));
        // Other key order, the number as a float (a protobuf double), nested too.
        let b = insert(json!([{"x": {"j": [1], "k": 1.0}, "duration_ms": 5.0, "agent_name": "a"}]));
        assert_eq!(of(&a), of(&b));
    }

    #[test]
    fn any_difference_changes_it() {
        let base = of(&insert(json!([{"agent_name": "a", "duration_ms": 5}])));
        for other in [
            insert(json!([{"agent_name": "b", "duration_ms": 5}])),
            insert(json!([{"agent_name": "a", "duration_ms": 5.5}])),
            insert(json!([{"agent_name": "a", "duration_ms": "5"}])),
            insert(json!([{"agent_name": "a", "duration_ms": 5}, {"agent_name": "a"}])),
            insert(json!([{"agent_name": "a", "duration_ms": null}])),
            insert(json!([{"agent_name": "a"}])),
        ] {
            assert_ne!(of(&other), base, "{other:?}");
        }
        let mut count_only = insert(json!([{"agent_name": "a", "duration_ms": 5}]));
        if let Operation::Insert(s) = &mut count_only {
            s.count_only = true;
        }
        assert_ne!(of(&count_only), base);
        let mut table = insert(json!([{"agent_name": "a", "duration_ms": 5}]));
        if let Operation::Insert(s) = &mut table {
            s.table = "agent_routing_decisions".into();
        }
        assert_ne!(of(&table), base);
    }

    #[test]
    fn strings_cannot_run_into_each_other() {
        let raw = |sql: &str, p: &str| {
            of(&Operation::Raw(RawSpec {
                sql: sql.into(),
                params: vec![json!(p)],
                page: Default::default(),
            }))
        };
        assert_ne!(raw("ab", "c"), raw("a", "bc"));
    }

    #[test]
    fn filters_differ_by_operator_and_shape() {
        let delete = |filter: Filter| {
            of(&Operation::Delete(DeleteSpec {
                table: "t".into(),
                criteria: Criteria {
                    equals: Default::default(),
                    filter: Some(filter),
                },
                max_affected: None,
                count_only: false,
            }))
        };
        let cond = |op| Filter::Condition {
            column: "c".into(),
            op,
            value: json!(1),
        };
        let gt = delete(cond(Op::Gt));
        assert_ne!(gt, delete(cond(Op::Gte)));
        assert_ne!(gt, delete(Filter::Not(Box::new(cond(Op::Gt)))));
        assert_ne!(
            delete(Filter::All(vec![cond(Op::Gt), cond(Op::Lt)])),
            delete(Filter::Any(vec![cond(Op::Gt), cond(Op::Lt)]))
        );
        assert_eq!(gt, delete(cond(Op::Gt)));
    }
}
