//! The guard in front of `ExecuteRaw`: the SQL text is parsed (sqlparser, PostgreSQL dialect),
//! never pattern-matched. Accepted: exactly one statement; a query, or - only when the
//! operator enabled raw writes - an INSERT / UPDATE / DELETE; naming only served tables; no
//! function that reaches outside them (file access, other SQL text, settings, sessions).
//! PostgreSQL then runs a read-only statement inside a READ ONLY transaction, which catches
//! anything that still tries to write.

use std::ops::ControlFlow;

use sqlparser::ast::{
    ArrayElemTypeDef, DataType, Expr, Ident, ObjectName, Query, SetExpr, Statement, TableFactor,
    TypedString, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

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

/// Functions that read files, run other SQL text, change settings or session state, write
/// index pages even in a READ ONLY transaction, or read whole relations (extensions'
/// inspection functions) or touch other sessions.
fn forbidden_function(name: &str) -> bool {
    const PREFIXES: [&str; 15] = [
        "pg_",
        // Name lookups that tell which relations, types and functions exist anywhere, by name
        // (`has_table_privilege('other.t', ...)` fails for a missing table) or by oid.
        "to_reg",
        "has_",
        "currtid",
        "lo_",
        "dblink",
        "txid_",
        "query_to_",
        "crosstab",
        // pgstattuple / pgrowlocks / pageinspect-style inspection, index maintenance.
        "pgstat",
        "pgrowlocks",
        "brin_",
        "gin_",
        "xpath_table",
        // pageinspect's B-tree pages and amcheck's index checks.
        "bt_",
    ];
    const NAMES: [&str; 48] = [
        // The database's name and the schemas on the search path (as current_database).
        "current_catalog",
        "current_schemas",
        // Changes the session's random-number state, which the pooled connection keeps.
        "setseed",
        // These run SQL given as text (tsearch statistics and rewriting, tablefunc).
        "ts_stat",
        "ts_rewrite",
        "connectby",
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
        // Catalog lookups by oid: type names and comments of any object.
        "format_type",
        "obj_description",
        "col_description",
        "shobj_description",
        "row_security_active",
        // pageinspect's readers of raw heap pages (any table's rows, bypassing the guard)
        // and amcheck's heap check.
        "get_raw_page",
        "page_header",
        "page_checksum",
        "heap_page_items",
        "heap_page_item_attrs",
        "tuple_data_split",
        "verify_heapam",
        "hash_page_type",
        "hash_page_stats",
        "hash_page_items",
        "hash_bitmap_info",
        "hash_metapage_info",
        "gist_page_opaque_info",
        "gist_page_items",
        "gist_page_items_bytea",
    ];
    // `regclass('t')` and the like: the lookup types called as functions.
    PREFIXES.iter().any(|p| name.starts_with(p))
        || NAMES.contains(&name)
        || LOOKUP_TYPES.contains(&name)
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

/// Longest SQL text `ExecuteRaw` takes. Its plan is kept on the connection it ran on (one raw
/// statement per connection, see `executor`), and a long text of many expressions plans into
/// far more memory than its size.
pub const MAX_RAW_SQL_BYTES: usize = 64 * 1024;

/// `ONLY` unquoted, which sqlparser does not know: it reads `FROM ONLY (t)` as a call of a
/// function `only` and `FROM ONLY t` as a table `only` named `t`, where PostgreSQL reads the
/// table `t` - which the guard would then never check.
fn is_bare_only(name: &ObjectName) -> bool {
    name.0
        .iter()
        .filter_map(|p| p.as_ident())
        .any(|i| i.quote_style.is_none() && i.value.eq_ignore_ascii_case("only"))
}

/// Refuses text that sqlparser and PostgreSQL split into tokens differently. If the two
/// disagree on where a string, a quoted identifier or a comment starts, what is a string to
/// the guard could be SQL to PostgreSQL, and SQL it never checked would run. Known cases:
/// PostgreSQL ends an operator where `--` or `/*` starts, sqlparser reads `>--` as one
/// operator; sqlparser reads `?` with the character after it (`?'` hides a quote).
fn same_tokens_as_postgres(sql: &str) -> Result<(), DbError> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize_with_location()
        .map_err(|e| reject(format!("cannot parse SQL: {e}")))?;
    let chars: Vec<char> = sql.chars().collect();
    // Char index of each line's start (sqlparser's locations are 1-based lines and columns).
    let mut line_starts = vec![0];
    line_starts.extend(
        chars
            .iter()
            .enumerate()
            .filter(|(_, c)| **c == '\n')
            .map(|(i, _)| i + 1),
    );
    let parser_starts: Vec<usize> = tokens
        .iter()
        .filter(|t| is_literal_or_comment(&t.token))
        .filter_map(|t| {
            let line = usize::try_from(t.span.start.line).ok()?.checked_sub(1)?;
            let column = usize::try_from(t.span.start.column).ok()?.checked_sub(1)?;
            Some(line_starts.get(line)? + column)
        })
        .collect();
    if parser_starts != postgres_literal_starts(&chars) {
        return Err(reject(
            "the SQL parser and PostgreSQL would read this text differently (where a string, \
             a quoted name or a comment starts); put spaces around operators next to quotes \
             or comments",
        ));
    }
    Ok(())
}

/// A string literal, a quoted identifier or a comment.
fn is_literal_or_comment(token: &Token) -> bool {
    use sqlparser::tokenizer::Whitespace;
    match token {
        Token::Word(w) => w.quote_style.is_some(),
        Token::Whitespace(w) => matches!(
            w,
            Whitespace::SingleLineComment { .. } | Whitespace::MultiLineComment(_)
        ),
        Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_)
        | Token::TripleSingleQuotedString(_)
        | Token::TripleDoubleQuotedString(_)
        | Token::DollarQuotedString(_)
        | Token::SingleQuotedByteStringLiteral(_)
        | Token::DoubleQuotedByteStringLiteral(_)
        | Token::TripleSingleQuotedByteStringLiteral(_)
        | Token::TripleDoubleQuotedByteStringLiteral(_)
        | Token::SingleQuotedRawStringLiteral(_)
        | Token::DoubleQuotedRawStringLiteral(_)
        | Token::TripleSingleQuotedRawStringLiteral(_)
        | Token::TripleDoubleQuotedRawStringLiteral(_)
        | Token::NationalStringLiteral(_)
        | Token::EscapedStringLiteral(_)
        | Token::UnicodeStringLiteral(_)
        | Token::HexStringLiteral(_) => true,
        _ => false,
    }
}

/// Where strings, quoted identifiers and comments start in `sql`, as PostgreSQL's lexer reads
/// it (standard_conforming_strings on): `'...'` (`''` inside), `E'...'` (backslash escapes),
/// `B'...'` / `X'...'` / `N'...'` / `U&'...'` from their prefix, `$tag$...$tag$`, `"..."`
/// (`""` inside) and `U&"..."`, `--` to the end of the line, nested `/* */`.
fn postgres_literal_starts(sql: &[char]) -> Vec<usize> {
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == '$' || !c.is_ascii();
    let at = |i: usize| sql.get(i).copied();
    // Past a quoted run whose opening quote is just before `i`, closed by `quote` (doubled
    // inside), with backslash escapes when `escapes`.
    let close = |mut i: usize, quote: char, escapes: bool| {
        while let Some(c) = at(i) {
            if escapes && c == '\\' {
                i += 2;
            } else if c == quote {
                if at(i + 1) == Some(quote) {
                    i += 2;
                } else {
                    return i + 1;
                }
            } else {
                i += 1;
            }
        }
        i
    };
    let mut starts = Vec::new();
    let mut i = 0;
    while let Some(c) = at(i) {
        let next = at(i + 1);
        match c {
            '-' if next == Some('-') => {
                starts.push(i);
                while at(i).is_some_and(|c| c != '\n' && c != '\r') {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                starts.push(i);
                let mut depth = 0;
                while let Some(c) = at(i) {
                    if c == '/' && at(i + 1) == Some('*') {
                        depth += 1;
                        i += 2;
                    } else if c == '*' && at(i + 1) == Some('/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            '\'' | '"' => {
                starts.push(i);
                i = close(i + 1, c, false);
            }
            '$' if next.is_some_and(|n| n.is_ascii_digit()) => {
                i += 1;
                while at(i).is_some_and(|c| c.is_ascii_digit()) {
                    i += 1;
                }
            }
            '$' => {
                // `$tag$` (tag: an identifier without `$`, or empty) opens a dollar quote.
                let mut end = i + 1;
                while at(end).is_some_and(|c| c != '$' && ident(c)) {
                    end += 1;
                }
                if at(end) == Some('$') {
                    let tag: Vec<char> = sql[i..=end].to_vec();
                    starts.push(i);
                    let mut j = end + 1;
                    i = loop {
                        match sql.get(j..j + tag.len()) {
                            Some(window) if window == tag.as_slice() => break j + tag.len(),
                            Some(_) => j += 1,
                            None => break sql.len(),
                        }
                    };
                } else {
                    i += 1;
                }
            }
            _ if ident(c) => {
                // A prefixed string (`E'`, `B'`, `X'`, `N'`, `U&'`, `U&"`) starts at its prefix.
                let prefixed = match (c.to_ascii_uppercase(), next) {
                    ('E', Some('\'')) => Some((i + 2, '\'', true)),
                    ('B' | 'X' | 'N', Some('\'')) => Some((i + 2, '\'', false)),
                    ('U', Some('&')) => match at(i + 2) {
                        Some(q @ ('\'' | '"')) => Some((i + 3, q, false)),
                        _ => None,
                    },
                    _ => None,
                };
                if let Some((from, quote, escapes)) = prefixed {
                    starts.push(i);
                    i = close(from, quote, escapes);
                } else {
                    while at(i).is_some_and(ident) {
                        i += 1;
                    }
                }
            }
            _ => i += 1,
        }
    }
    starts
}

/// Whether a raw statement may write; if not, what the caller is told (each transport has
/// its own setting that allows it, and its own way to write instead).
#[derive(Clone, Copy, Debug)]
pub enum RawWrites {
    Allowed,
    Refused(&'static str),
}

/// Checks `sql` against the served tables; `allow_writes` is gRPC's `--raw-sql-writes`.
pub fn check(sql: &str, served: &[String], allow_writes: bool) -> Result<RawStatement, DbError> {
    let writes = if allow_writes {
        RawWrites::Allowed
    } else {
        RawWrites::Refused(
            "raw SQL writes are disabled on this server (--raw-sql-writes); use Insert / \
             Update / Delete / Upsert",
        )
    };
    check_with(sql, served, writes)
}

/// [`check`] with the writes' permission (and refusal) given by the caller.
pub fn check_with(
    sql: &str,
    served: &[String],
    writes: RawWrites,
) -> Result<RawStatement, DbError> {
    if sql.len() > MAX_RAW_SQL_BYTES {
        return Err(reject(format!(
            "the SQL text is {} bytes, more than the {MAX_RAW_SQL_BYTES} allowed",
            sql.len()
        )));
    }
    // PostgreSQL's protocol ends the text at a NUL (in a comment or a string the parser
    // accepts it), and the server would refuse the truncated message as a protocol violation.
    if let Some(at) = sql.find('\0') {
        return Err(reject(format!(
            "the SQL text contains a NUL character (at byte {at}), which PostgreSQL does not accept"
        )));
    }
    same_tokens_as_postgres(sql)?;
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
            if modifies_data(statement) {
                // A WITH clause may hold INSERT / UPDATE / DELETE, and a WITH list may precede
                // one. Refused even with raw writes on: the guard resolves names in a query as
                // CTEs first, which a write target never is.
                return Err(reject(
                    "INSERT / UPDATE / DELETE inside a query (a WITH clause) is not supported; \
                     send the write as a statement of its own",
                ));
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
    if kind.is_write()
        && let RawWrites::Refused(why) = writes
    {
        return Err(DbError::WriteNotAllowed(why.into()));
    }

    let mut guard = Guard {
        served,
        scopes: Vec::new(),
        tables: Vec::new(),
        function_next: false,
    };
    if let ControlFlow::Break(message) = statement.visit(&mut guard) {
        return Err(reject(message));
    }
    let mut tables = guard.tables;
    tables.sort();
    tables.dedup();
    Ok(RawStatement { kind, tables })
}

/// Checks every relation a statement names, as PostgreSQL resolves it, and every function it
/// calls. A name that a WITH clause in scope defines is that CTE, anything else must be a
/// served table. Scoping matters,
/// or a CTE named like a private table in one sub-query would let the outer query read the
/// real table: a query's CTEs are visible in its body and in nested sub-queries, and inside
/// the WITH list only to the CTEs after them (or to all of them, itself included, under WITH
/// RECURSIVE) - never outside the query.
struct Guard<'a> {
    served: &'a [String],
    scopes: Vec<Scope>,
    tables: Vec<String>,
    /// The next relation visited is the name of a function called in FROM.
    function_next: bool,
}

/// One query being visited: the CTE names visible in it so far, and its own WITH list while
/// that list's definitions are being visited.
struct Scope {
    visible: Vec<String>,
    with: Option<WithList>,
}

struct WithList {
    names: Vec<String>,
    /// Each CTE's query, to recognise when the visitor enters (and leaves) a definition.
    queries: Vec<*const Query>,
    recursive: bool,
}

impl Guard<'_> {
    fn is_cte(&self, name: &str) -> bool {
        self.scopes
            .iter()
            .any(|s| s.visible.iter().any(|v| v == name))
    }

    /// A type sqlparser knows, a built-in PostgreSQL type it does not (`inet`, `int4range`),
    /// or a served table's row type; an array of one of these.
    fn is_known_type(&self, data_type: &DataType) -> bool {
        match data_type {
            DataType::Custom(name, _) => {
                let parts: Vec<String> = name
                    .0
                    .iter()
                    .map(|p| p.as_ident().map(resolved).unwrap_or_default())
                    .collect();
                // `_int4`, `_agent_actions`: PostgreSQL's names of the array types.
                let element = |n: &str| n.strip_prefix('_').unwrap_or(n).to_string();
                let built_in = |n: &str| BUILT_IN_TYPES.contains(&element(n).as_str());
                let served = |n: &str| self.served.contains(&element(n));
                match parts.as_slice() {
                    [n] => built_in(n) || served(n),
                    [schema, n] if schema == "pg_catalog" => built_in(n),
                    [schema, n] if schema == "public" => served(n),
                    _ => false,
                }
            }
            DataType::Array(
                ArrayElemTypeDef::AngleBracket(element)
                | ArrayElemTypeDef::SquareBracket(element, _)
                | ArrayElemTypeDef::Parenthesis(element),
            ) => self.is_known_type(element),
            _ => true,
        }
    }
}

/// pg_catalog's types other than the catalogs' own row types, the lookup types (refused by
/// `is_lookup_type`) and the handlers' pseudo-types, as sqlparser may leave them unparsed
/// (`DataType::Custom`); with their SQL aliases.
const BUILT_IN_TYPES: [&str; 79] = [
    "aclitem",
    "anyarray",
    "anycompatible",
    "anycompatiblearray",
    "anycompatiblemultirange",
    "anycompatiblenonarray",
    "anycompatiblerange",
    "anyelement",
    "anyenum",
    "anymultirange",
    "anynonarray",
    "anyrange",
    "bit",
    "bool",
    "boolean",
    "box",
    "bpchar",
    "bytea",
    "char",
    "cid",
    "cidr",
    "circle",
    "date",
    "datemultirange",
    "daterange",
    "float4",
    "float8",
    "inet",
    "int2",
    "int2vector",
    "int4",
    "int4multirange",
    "int4range",
    "int8",
    "int8multirange",
    "int8range",
    "interval",
    "json",
    "jsonb",
    "jsonpath",
    "line",
    "lseg",
    "macaddr",
    "macaddr8",
    "money",
    "name",
    "numeric",
    "nummultirange",
    "numrange",
    "oid",
    "oidvector",
    "path",
    "point",
    "polygon",
    "record",
    "regconfig",
    "regdictionary",
    "text",
    "tid",
    "time",
    "timestamp",
    "timestamptz",
    "timetz",
    "tsmultirange",
    "tsquery",
    "tsrange",
    "tstzmultirange",
    "tstzrange",
    "tsvector",
    "txid_snapshot",
    "unknown",
    "uuid",
    "varbit",
    "varchar",
    "xid",
    "xid8",
    "xml",
    "integer",
    "smallint",
];

impl Visitor for Guard<'_> {
    type Break = String;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<String> {
        // `TABLE name` keeps its name as bare text (quoting lost), so it cannot be resolved
        // as PostgreSQL would; the SELECT form can.
        if let Some(t) = table_body(&query.body) {
            let table = [t.schema_name.as_deref(), t.table_name.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(".");
            return ControlFlow::Break(format!(
                "'TABLE {table}' is not supported; write SELECT * FROM {table}"
            ));
        }
        let mut visible = Vec::new();
        // Entering the definition of CTE i of the enclosing query's WITH list?
        if let Some(with) = self.scopes.last().and_then(|s| s.with.as_ref())
            && let Some(i) = with.queries.iter().position(|q| std::ptr::eq(*q, query))
        {
            let upto = if with.recursive { with.names.len() } else { i };
            visible.extend_from_slice(&with.names[..upto]);
        }
        let with = query.with.as_ref().map(|w| WithList {
            names: w
                .cte_tables
                .iter()
                .map(|c| resolved(&c.alias.name))
                .collect(),
            queries: w
                .cte_tables
                .iter()
                .map(|c| &*c.query as *const Query)
                .collect(),
            recursive: w.recursive,
        });
        // A query without a WITH list sees its CTEs from the start (there are none); one with
        // a list gets them once every definition has been visited (post_visit_query).
        self.scopes.push(Scope { visible, with });
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<String> {
        self.scopes.pop();
        // Leaving the last definition of the enclosing WITH list: its body sees every CTE.
        if let Some(scope) = self.scopes.last_mut()
            && let Some(with) = scope.with.take_if(|w| {
                w.queries
                    .last()
                    .is_some_and(|last| std::ptr::eq(*last, query))
            })
        {
            scope.visible.extend(with.names);
        }
        ControlFlow::Continue(())
    }

    /// Function calls in expressions, and in FROM (`LATERAL f(...)`, which is no expression).
    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<String> {
        match expr {
            Expr::Function(f) => allowed_function(&f.name),
            // `current_catalog` takes no parentheses.
            Expr::Identifier(i)
                if i.quote_style.is_none() && i.value.eq_ignore_ascii_case("current_catalog") =>
            {
                ControlFlow::Break("current_catalog is not allowed in raw SQL".into())
            }
            // `'t'::regclass` and the like look any relation, type or function up by name.
            Expr::Cast { data_type, .. } | Expr::TypedString(TypedString { data_type, .. })
                if is_lookup_type(&data_type.to_string()) =>
            {
                ControlFlow::Break(format!(
                    "casts to {data_type} (a catalog lookup by name) are not allowed in raw SQL"
                ))
            }
            // `NULL::other.secret_t` is the row type of any table: with json_populate_record
            // it lists that table's columns.
            Expr::Cast { data_type, .. } | Expr::TypedString(TypedString { data_type, .. })
                if !self.is_known_type(data_type) =>
            {
                ControlFlow::Break(format!(
                    "casts to {data_type} are not allowed in raw SQL: only PostgreSQL's \
                     built-in types and served tables' row types"
                ))
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<String> {
        match factor {
            TableFactor::Function { name, .. } => allowed_function(name),
            // `FROM f(...)`: a function call, whatever a CTE in scope is called (PostgreSQL
            // never resolves a name with arguments to a CTE). Its name is visited next, as a
            // relation, and must not be taken for one.
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            } => {
                self.function_next = true;
                allowed_function(name)
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<String> {
        if is_bare_only(relation) {
            return ControlFlow::Break(only_refused());
        }
        if std::mem::take(&mut self.function_next) {
            return ControlFlow::Continue(());
        }
        let parts: Vec<String> = relation
            .0
            .iter()
            .filter_map(|p| p.as_ident())
            .map(resolved)
            .collect();
        let not_served = || ControlFlow::Break(format!("'{relation}' is not a served table"));
        let name = match parts.as_slice() {
            [name] if self.is_cte(name) => return ControlFlow::Continue(()),
            [name] => name,
            [schema, name] if schema == "public" => name,
            _ => return not_served(),
        };
        match self.served.iter().find(|t| *t == name) {
            Some(t) => {
                self.tables.push(t.clone());
                ControlFlow::Continue(())
            }
            None => not_served(),
        }
    }
}

/// The `TABLE name` shorthand in a query body, alone or in a set operation.
fn table_body(body: &SetExpr) -> Option<&sqlparser::ast::Table> {
    match body {
        SetExpr::Table(t) => Some(t),
        SetExpr::SetOperation { left, right, .. } => table_body(left).or_else(|| table_body(right)),
        _ => None,
    }
}

/// Whether a query holds a data-modifying statement anywhere (in a CTE, or as the body a WITH
/// list precedes).
fn modifies_data(statement: &Statement) -> bool {
    struct Finder;
    impl Visitor for Finder {
        type Break = ();
        fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
            match query.body.as_ref() {
                SetExpr::Insert(_)
                | SetExpr::Update(_)
                | SetExpr::Delete(_)
                | SetExpr::Merge(_) => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        }
        fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
            match statement {
                Statement::Query(_) => ControlFlow::Continue(()),
                _ => ControlFlow::Break(()),
            }
        }
    }
    statement.visit(&mut Finder).is_break()
}

/// The object-identifier types that look catalog objects up by name (and their arrays),
/// however written: `regclass`, `pg_catalog.regclass`, `"regclass"`, `_regclass`,
/// `regclass[]`. (`regconfig` and `regdictionary`, which name text search settings, are fine.)
const LOOKUP_TYPES: [&str; 9] = [
    "regclass",
    "regtype",
    "regproc",
    "regprocedure",
    "regoper",
    "regoperator",
    "regnamespace",
    "regrole",
    "regcollation",
];

fn is_lookup_type(written: &str) -> bool {
    let name = written.replace('"', "").to_ascii_lowercase();
    let name = name.rsplit('.').next().unwrap_or_default();
    let name = name.trim_end_matches("[]").trim_start_matches('_');
    LOOKUP_TYPES.contains(&name)
}

fn only_refused() -> String {
    "ONLY is not supported in raw SQL (name the table alone; served tables have no \
     inheritance children)"
        .into()
}

fn allowed_function(name: &ObjectName) -> ControlFlow<String> {
    if is_bare_only(name) {
        return ControlFlow::Break(only_refused());
    }
    let name = last_part(name);
    if forbidden_function(&name) {
        return ControlFlow::Break(format!("function {name}() is not allowed"));
    }
    ControlFlow::Continue(())
}

/// The name PostgreSQL resolves an identifier to: unquoted ones fold to lower case, quoted
/// ones are taken as written (`"PG_AUTHID"` is not `pg_authid`).
fn resolved(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served() -> Vec<String> {
        vec!["agent_actions".into(), "error_events".into()]
    }

    /// Where sqlparser and PostgreSQL agree on a comment, it is no operator of its own.
    #[test]
    fn comments_after_an_operator_read_alike_are_accepted() {
        for sql in [
            "SELECT 1 WHERE 2 != -- x\n 1",
            "SELECT 1 WHERE 2 !=-- x\n 1",
            "SELECT 1 WHERE 2 > /* x */ 1",
            "SELECT 1 - -1",
            // Strings, names and comments PostgreSQL and the parser read alike.
            "SELECT 'it''s', E'it\\'s', $$a 'b' -- c$$, $t$x$t$ AS \"odd \"\"name\"\"\" \
             FROM agent_actions /* a /* nested */ comment */ WHERE agent_name = $1 -- end",
            "SELECT id FROM agent_actions WHERE action_details ? 'key' AND action_details ?| \
             array['a', 'b']",
            "SELECT to_tsvector('english'::regconfig, agent_name) FROM agent_actions",
            "SELECT U&'d\\0061t\\+000061' AS u, x'1f' AS h",
        ] {
            assert!(check(sql, &served(), false).is_ok(), "refused: {sql}");
        }
        let long = format!("SELECT 1{}", " ".repeat(MAX_RAW_SQL_BYTES));
        let e = check(&long, &served(), false).unwrap_err();
        assert!(e.to_string().contains("more than the 65536 allowed"), "{e}");
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

    /// Casts to built-in types however written, and to served tables' row types, pass.
    #[test]
    fn accepts_casts_to_built_in_types_and_served_rows() {
        for sql in [
            "SELECT '10.0.0.1'::inet AS a, '[1,2)'::int4range AS r, 'x'::pg_catalog.text AS t",
            "SELECT ARRAY['a']::text[] AS a, '{1}'::int8[] AS b, CAST('1' AS \"numeric\") AS n",
            "SELECT 'x'::\"char\" AS c, '1'::double precision AS d, '{}'::jsonb AS j",
            "SELECT '1 day'::interval AS i, now()::timestamptz AS t, '(1,2)'::point AS p",
            "SELECT json_populate_record(NULL::agent_actions, '{}') AS r",
            "SELECT NULL::public.error_events[] AS e, interval '1 day' AS i",
            "SELECT to_tsvector('english'::regconfig, agent_name) AS v FROM agent_actions",
            // The array types under PostgreSQL's own names.
            "SELECT '{1}'::_int4 AS a, '{}'::pg_catalog._text AS t, NULL::_agent_actions AS r",
        ] {
            if let Err(e) = check(sql, &served(), false) {
                panic!("refused: {sql}: {e}");
            }
        }
    }

    #[test]
    fn refuses_nul_characters_on_the_sql_field() {
        for sql in ["SELECT 1 AS x -- \0", "SELECT 'a\0b' AS x", "SELECT 1\0"] {
            let e = check(sql, &served(), false).unwrap_err();
            assert_eq!(e.violations()[0].field, "sql", "{sql}");
            assert!(e.to_string().contains("NUL character"), "{e}");
        }
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
            // Functions that run SQL given as text.
            "SELECT ts_stat('SELECT to_tsvector(key) FROM omnibus_request_log')",
            "SELECT * FROM ts_stat('SELECT to_tsvector(key) FROM omnibus_request_log')",
            "SELECT ts_rewrite('a'::tsquery, 'SELECT t, s FROM omnibus_request_log')",
            "SELECT * FROM crosstab('SELECT * FROM omnibus_request_log')",
            "SELECT a.id FROM agent_actions a, LATERAL pg_read_file('/etc/passwd') f",
            "SELECT a.id FROM agent_actions a CROSS JOIN LATERAL ts_stat('x') f",
            // `TABLE x` reads a table too, alone, in a set operation, a sub-query or a CTE.
            "TABLE omnibus_request_log",
            "WITH x AS (SELECT 1) TABLE omnibus_request_log",
            "SELECT * FROM (TABLE public.omnibus_request_log) t",
            "SELECT * FROM agent_actions WHERE id IN (TABLE other_schema.secrets)",
            "SELECT id FROM agent_actions UNION ALL TABLE secrets",
            "WITH t AS (TABLE agent_actions) SELECT * FROM t",
            // A function called in FROM is a function, whatever a CTE is named.
            "WITH query_to_xml AS (SELECT 1) \
             SELECT * FROM query_to_xml('select * from omnibus_request_log', true, false, '')",
            "WITH set_config AS (SELECT 1) SELECT * FROM set_config('TimeZone', 'UTC', false)",
            "WITH pg_sleep AS (SELECT 1) SELECT * FROM pg_sleep(10)",
            "WITH agent_actions AS (SELECT 1) SELECT * FROM pg_catalog.pg_sleep(10)",
            "SELECT * FROM agent_actions a, \
             (WITH dblink AS (SELECT 1) SELECT * FROM dblink('x', 'y')) d",
            // Session state a pooled connection keeps; index pages written even READ ONLY;
            // extensions reading whole relations.
            "SELECT setseed(0.5)",
            "SELECT gin_clean_pending_list('agent_actions_idx'::regclass)",
            "SELECT brin_summarize_new_values('agent_actions_idx'::regclass)",
            "SELECT * FROM pgstattuple('omnibus_request_log')",
            "SELECT * FROM pgrowlocks('agent_actions')",
            "SELECT * FROM xpath_table('id', 'x', 'omnibus_request_log', '/a', 'true')",
            // An operator running into a comment: to sqlparser the next line is a string, to
            // PostgreSQL it is SQL (here reading pg_authid).
            "SELECT 'x' AS a WHERE 2 >-- '\n1 UNION ALL SELECT rolname::text FROM pg_authid --'",
            "SELECT 'x' AS a WHERE 2 </* '\n*/ 1 UNION ALL SELECT rolname::text FROM pg_authid --'",
            // sqlparser reads `?` with the character after it: `?'` hides a quote from it.
            "SELECT 'x' AS a WHERE '{}'::jsonb ?'' UNION ALL SELECT rolname::text FROM pg_authid --'",
            "SELECT 'x' AS a WHERE '{}'::jsonb ?-- '\n'' UNION ALL SELECT rolname::text FROM pg_authid --'",
            // The lookup types however written, and called as functions.
            "SELECT i::oid::\"regclass\"::text FROM generate_series(1259, 1262) i",
            "SELECT 'pg_authid'::pg_catalog.regclass",
            "SELECT '{pg_authid}'::_regclass",
            "SELECT regclass('pg_authid')",
            "SELECT regrole('postgres')",
            // ONLY, which sqlparser reads as a function or a table named `only`.
            "SELECT rolname::text FROM ONLY (pg_authid)",
            "SELECT * FROM agent_actions a, ONLY(pg_class)",
            "WITH \"only\" AS (SELECT 1) SELECT * FROM ONLY pg_authid",
            "UPDATE ONLY (other.secret_t) SET x = $1 RETURNING x",
            "DELETE FROM ONLY (omnibus_request_log)",
            "SELECT * FROM ONLY agent_actions",
            // Lookups that tell which relations exist anywhere.
            "SELECT to_regclass('other.secret_t')::text",
            "SELECT i::regclass::text FROM generate_series(16384, 70000) i",
            "SELECT 'pg_authid'::regclass",
            "SELECT CAST('x' AS regtype)",
            "SELECT current_catalog",
            "SELECT current_schemas(true)",
            "SELECT currtid2('agent_actions', '(0,1)'::tid)",
            "SELECT has_table_privilege('other.secret_t', 'SELECT')",
            "SELECT has_column_privilege('omnibus_request_log', 'result', 'SELECT')",
            "SELECT row_security_active('other.secret_t')",
            "SELECT format_type(i::oid, NULL) FROM generate_series(16384, 70000) i",
            "SELECT obj_description(16384)",
            // Row types of tables that are not served: json_populate_record lists the columns.
            "SELECT row_to_json(json_populate_record(NULL::other_schema.secret_t, '{}')) AS c",
            "SELECT json_populate_record(NULL::omnibus_request_log, '{}')",
            "SELECT NULL::public.omnibus_request_log[]",
            "SELECT NULL::_omnibus_request_log",
            "SELECT CAST(NULL AS pg_catalog.pg_authid)",
            "SELECT CAST(NULL AS omnibus_request_log)",
            // pageinspect and amcheck read raw pages of any table.
            "SELECT encode(get_raw_page('omnibus_request_log', 0), 'escape') AS p",
            "SELECT * FROM heap_page_items(get_raw_page('omnibus_request_log', 0))",
            "SELECT * FROM bt_page_items('omnibus_request_log_pkey', 1)",
            "SELECT hash_page_items(get_raw_page('x', 1))",
        ] {
            assert!(check(sql, &served(), true).is_err(), "accepted: {sql}");
        }
    }

    /// A CTE hides a table only where PostgreSQL would resolve the name to it: in its own
    /// query (and sub-queries of it), after its definition. Anywhere else the name is the
    /// real table, and must be a served one.
    #[test]
    fn cte_names_shadow_tables_only_in_their_scope() {
        for sql in [
            // A CTE of a sub-query does not hide the outer query's table.
            "SELECT * FROM omnibus_request_log WHERE EXISTS \
             (WITH omnibus_request_log AS (SELECT 1) SELECT 1 FROM omnibus_request_log)",
            "SELECT (SELECT 1 FROM (WITH pg_authid AS (SELECT 1) SELECT 1) x), * FROM pg_authid",
            "SELECT * FROM pg_authid UNION ALL \
             SELECT * FROM (WITH pg_authid AS (SELECT 1 AS a) SELECT a FROM pg_authid) s",
            // A non-recursive CTE's own name, inside its definition, is the real table.
            "WITH pg_authid AS (SELECT * FROM pg_authid) SELECT * FROM pg_authid",
            // A later CTE is not visible to an earlier one without RECURSIVE.
            "WITH a AS (SELECT * FROM b), b AS (SELECT 1 AS x) SELECT * FROM a",
            // Quoted names are case-sensitive: "PG_AUTHID" does not hide pg_authid.
            "WITH \"PG_AUTHID\" AS (SELECT 1) SELECT * FROM pg_authid",
            "WITH secrets AS (SELECT 1) SELECT * FROM public.secrets",
            "SELECT * FROM \"AGENT_ACTIONS\"",
        ] {
            assert!(check(sql, &served(), true).is_err(), "accepted: {sql}");
        }
        for (sql, tables) in [
            (
                "WITH a AS (SELECT * FROM agent_actions), b AS (SELECT * FROM a) SELECT * FROM b",
                vec!["agent_actions"],
            ),
            (
                "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3) \
                 SELECT * FROM t",
                vec![],
            ),
            (
                "WITH x AS (SELECT 1) SELECT * FROM agent_actions \
                 WHERE EXISTS (SELECT 1 FROM x) AND id IN (SELECT id FROM error_events)",
                vec!["agent_actions", "error_events"],
            ),
            (
                "WITH \"Recent\" AS (SELECT * FROM agent_actions) SELECT * FROM \"Recent\"",
                vec!["agent_actions"],
            ),
            (
                "WITH recent AS (SELECT * FROM agent_actions) SELECT * FROM RECENT",
                vec!["agent_actions"],
            ),
        ] {
            let s = check(sql, &served(), false).unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(s.tables, tables, "{sql}");
        }
    }

    #[test]
    fn functions_in_from_are_checked_like_functions_elsewhere() {
        for (sql, tables) in [
            ("SELECT * FROM generate_series(1, 3) AS g(n)", vec![]),
            (
                "SELECT a.id FROM agent_actions a, unnest($1::text[]) AS u(name) \
                 WHERE a.agent_name = u.name",
                vec!["agent_actions"],
            ),
            // The arguments are checked too.
            (
                "SELECT * FROM generate_series(1, (SELECT count(*) FROM error_events)) g",
                vec!["error_events"],
            ),
        ] {
            let s = check(sql, &served(), false).unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(s.tables, tables, "{sql}");
        }
        let err = check(
            "SELECT * FROM generate_series(1, (SELECT count(*) FROM secrets)) g",
            &served(),
            false,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("'secrets' is not a served table"),
            "{err}"
        );
        let err = check(
            "SELECT * FROM agent_actions UNION TABLE agent_actions",
            &served(),
            false,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("write SELECT * FROM agent_actions"),
            "{err}"
        );
    }

    #[test]
    fn writes_inside_a_query_are_refused_with_or_without_the_flag() {
        for sql in [
            "WITH d AS (DELETE FROM agent_actions WHERE id = $1 RETURNING *) SELECT count(*) FROM d",
            "WITH s AS (SELECT 1) INSERT INTO agent_actions (agent_name) VALUES ($1)",
            "WITH u AS (UPDATE agent_actions SET agent_name = $1 RETURNING id) SELECT * FROM u",
            // A CTE named like the target must not pass the target off as the CTE.
            "WITH secrets AS (SELECT 1) DELETE FROM secrets",
            "SELECT * FROM agent_actions WHERE id IN \
             (SELECT id FROM (WITH d AS (DELETE FROM agent_actions RETURNING id) SELECT id FROM d) x)",
        ] {
            for writes in [false, true] {
                let err = check(sql, &served(), writes).unwrap_err();
                assert!(matches!(err, DbError::Validation(_)), "{sql}: {err:?}");
                assert!(err.to_string().contains("inside a query"), "{sql}: {err}");
            }
        }
        // Reads with WITH are still reads.
        let s = check(
            "WITH a AS (SELECT * FROM agent_actions) SELECT count(*) FROM a",
            &served(),
            false,
        )
        .unwrap();
        assert_eq!(s.kind, RawKind::Query);
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
