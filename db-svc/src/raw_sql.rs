//! The guard in front of `ExecuteRaw`: the SQL text is parsed (sqlparser, PostgreSQL dialect),
//! never pattern-matched. Accepted: exactly one statement; a query, or - only when the
//! operator enabled raw writes - an INSERT / UPDATE / DELETE; naming only served tables; no
//! function that reaches outside them (file access, other SQL text, settings, sessions).
//! PostgreSQL then runs a read-only statement inside a READ ONLY transaction, which catches
//! anything that still tries to write.

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{Expr, ObjectName, Statement, visit_expressions, visit_relations};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::error::DbError;

/// The kind of statement the guard accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawKind {
    Query,
    Insert,
    Update,
    Delete,
}

impl RawKind {
    pub fn is_write(self) -> bool {
        self != RawKind::Query
    }
}

/// What the guard learned about an accepted statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawStatement {
    pub kind: RawKind,
    /// Served tables it names, sorted.
    pub tables: Vec<String>,
}

/// Functions that read files, run other SQL text, change settings or touch other sessions.
fn forbidden_function(name: &str) -> bool {
    const PREFIXES: [&str; 5] = ["pg_", "lo_", "dblink", "txid_", "query_to_"];
    const NAMES: [&str; 22] = [
        "set_config",
        "current_setting",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "table_to_xml",
        "table_to_xmlschema",
        "table_to_xml_and_xmlschema",
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
        "nextval",
        "setval",
        "currval",
        "lastval",
        "copy",
        "version",
        "inet_server_addr",
        "inet_server_port",
        "current_database",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p)) || NAMES.contains(&name)
}

fn last_part(name: &ObjectName) -> String {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map(|i| i.value.to_ascii_lowercase())
        .unwrap_or_default()
}

fn reject(message: impl Into<String>) -> DbError {
    DbError::field("sql", message)
}

/// Checks `sql` against the served tables. `allow_writes` is the operator's flag.
pub fn check(sql: &str, served: &[String], allow_writes: bool) -> Result<RawStatement, DbError> {
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| reject(format!("cannot parse SQL: {e}")))?;
    let statement = match statements.as_slice() {
        [one] => one,
        [] => return Err(reject("no SQL statement given")),
        _ => return Err(reject("exactly one SQL statement is allowed")),
    };
    let kind = match statement {
        Statement::Query(q) => {
            if let sqlparser::ast::SetExpr::Select(s) = q.body.as_ref()
                && s.into.is_some()
            {
                return Err(reject("SELECT INTO creates a table; not allowed"));
            }
            RawKind::Query
        }
        Statement::Insert(_) => RawKind::Insert,
        Statement::Update { .. } => RawKind::Update,
        Statement::Delete(_) => RawKind::Delete,
        _ => {
            return Err(reject(
                "only SELECT (and, when enabled, INSERT / UPDATE / DELETE) statements are allowed",
            ));
        }
    };
    if kind.is_write() && !allow_writes {
        return Err(DbError::WriteNotAllowed(
            "raw SQL writes are disabled on this server (--raw-sql-writes); use Insert / Update / \
             Delete / Upsert"
                .into(),
        ));
    }

    // Names that WITH defines are not tables.
    let mut cte_names = HashSet::new();
    collect_nested_ctes(statement, &mut cte_names);

    let mut tables = Vec::new();
    let flow = visit_relations(statement, |relation| {
        let parts: Vec<String> = relation
            .0
            .iter()
            .filter_map(|p| p.as_ident())
            .map(|i| i.value.clone())
            .collect();
        let (schema, name) = match parts.as_slice() {
            [name] => (None, name.clone()),
            [schema, name] => (Some(schema.clone()), name.clone()),
            _ => return ControlFlow::Break(format!("'{relation}' is not a served table")),
        };
        if schema.is_none() && cte_names.contains(&name.to_ascii_lowercase()) {
            return ControlFlow::Continue(());
        }
        if schema.as_deref().is_some_and(|s| s != "public") {
            return ControlFlow::Break(format!("'{relation}' is not a served table"));
        }
        // Unquoted identifiers fold to lower case in PostgreSQL.
        let folded = name.to_ascii_lowercase();
        match served.iter().find(|t| **t == name || **t == folded) {
            Some(t) => {
                tables.push(t.clone());
                ControlFlow::Continue(())
            }
            None => ControlFlow::Break(format!("'{relation}' is not a served table")),
        }
    });
    if let ControlFlow::Break(message) = flow {
        return Err(reject(message));
    }
    let flow = visit_expressions(statement, |expr| {
        if let Expr::Function(f) = expr {
            let name = last_part(&f.name);
            if forbidden_function(&name) {
                return ControlFlow::Break(format!("function {name}() is not allowed"));
            }
        }
        ControlFlow::Continue(())
    });
    if let ControlFlow::Break(message) = flow {
        return Err(reject(message));
    }
    tables.sort();
    tables.dedup();
    Ok(RawStatement { kind, tables })
}

/// CTEs may sit in sub-queries too; collect every CTE name anywhere in the statement.
fn collect_nested_ctes(statement: &Statement, out: &mut HashSet<String>) {
    use sqlparser::ast::{Visit, Visitor};
    struct Ctes<'a>(&'a mut HashSet<String>);
    impl Visitor for Ctes<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, query: &sqlparser::ast::Query) -> ControlFlow<()> {
            if let Some(with) = &query.with {
                for cte in &with.cte_tables {
                    self.0.insert(cte.alias.name.value.to_ascii_lowercase());
                }
            }
            ControlFlow::Continue(())
        }
    }
    let _ = statement.visit(&mut Ctes(out));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served() -> Vec<String> {
        vec!["agent_actions".into(), "error_events".into()]
    }

    #[test]
    fn accepts_single_reads_of_served_tables() {
        let s = check(
            "SELECT agent_name, count(*) FROM agent_actions WHERE created_at > $1 GROUP BY 1",
            &served(),
            false,
        )
        .unwrap();
        assert_eq!(s.kind, RawKind::Query);
        assert_eq!(s.tables, vec!["agent_actions"]);
        let s = check(
            "WITH recent AS (SELECT * FROM agent_actions) SELECT a.id FROM recent a \
             JOIN error_events e ON e.correlation_id = a.correlation_id",
            &served(),
            false,
        )
        .unwrap();
        assert_eq!(s.tables, vec!["agent_actions", "error_events"]);
        assert!(check("SELECT * FROM public.agent_actions", &served(), false).is_ok());
        assert!(check("SELECT 1", &served(), false).is_ok());
    }

    #[test]
    fn rejects_everything_else() {
        for sql in [
            "SELECT 1; SELECT 2",
            "SELECT * FROM agent_actions; DROP TABLE agent_actions",
            "DROP TABLE agent_actions",
            "SELECT * FROM pg_shadow",
            "SELECT * FROM pg_catalog.pg_class",
            "SELECT * FROM other_schema.agent_actions",
            "SELECT * FROM omnibus_request_log",
            "SELECT pg_read_file('/etc/passwd')",
            "SELECT * FROM pg_read_file('/etc/passwd')",
            "SELECT query_to_xml('select * from omnibus_request_log', true, true, '')",
            "SELECT set_config('statement_timeout', '0', false)",
            "SELECT pg_sleep(10)",
            "SELECT * INTO new_table FROM agent_actions",
            "COPY agent_actions TO '/tmp/x'",
            "SET statement_timeout = 0",
            "",
            "SELEC 1",
            "SELECT * FROM agent_actions WHERE id IN (SELECT id FROM secrets)",
        ] {
            assert!(check(sql, &served(), true).is_err(), "accepted: {sql}");
        }
    }

    #[test]
    fn writes_only_with_the_flag() {
        let sql = "UPDATE agent_actions SET agent_name = $1 WHERE id = $2";
        let err = check(sql, &served(), false).unwrap_err();
        assert_eq!(err.code(), "WRITE_NOT_ALLOWED");
        let s = check(sql, &served(), true).unwrap();
        assert_eq!(s.kind, RawKind::Update);
        assert!(check("DELETE FROM error_events WHERE id = $1", &served(), true).is_ok());
        assert!(check("INSERT INTO secrets VALUES (1)", &served(), true).is_err());
        assert!(
            check(
                "INSERT INTO agent_actions (agent_name) SELECT x FROM secrets",
                &served(),
                true
            )
            .is_err()
        );
    }
}
