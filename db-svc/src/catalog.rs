//! The served tables as PostgreSQL's catalog describes them: columns, types, nullability,
//! defaults and primary keys. Loaded at start-up and reloaded when a request names a table or
//! column it does not know, so a column added later works without a restart. Every identifier
//! db-svc ever writes into SQL comes from here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use sqlx::PgPool;

/// How a PostgreSQL type crosses the API (see the mapping table in db.proto / README).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ColType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Text,
    Uuid,
    Json,
    Jsonb,
    Timestamp,
    Timestamptz,
    Date,
    /// Any other type: read as its text form, not writable.
    Other,
}

impl ColType {
    /// From a type name as `pg_type.typname` or sqlx's `PgTypeInfo::name()` spell it.
    pub fn from_pg_name(name: &str) -> Self {
        match name.to_ascii_lowercase().as_str() {
            "bool" | "boolean" => Self::Bool,
            "int2" | "smallint" => Self::Int2,
            "int4" | "integer" | "int" => Self::Int4,
            "int8" | "bigint" => Self::Int8,
            "float4" | "real" => Self::Float4,
            "float8" | "double precision" => Self::Float8,
            "numeric" | "decimal" => Self::Numeric,
            "text" | "varchar" | "bpchar" | "name" | "char" | "character varying" | "character" => {
                Self::Text
            }
            "uuid" => Self::Uuid,
            "json" => Self::Json,
            "jsonb" => Self::Jsonb,
            "timestamp" => Self::Timestamp,
            "timestamptz" => Self::Timestamptz,
            "date" => Self::Date,
            _ => Self::Other,
        }
    }

    /// The JSON type a client sees (documented in DescribeTable).
    pub fn json_type(self) -> &'static str {
        match self {
            Self::Bool => "boolean",
            Self::Int2 | Self::Int4 | Self::Int8 => "integer",
            Self::Float4 | Self::Float8 | Self::Numeric => "number",
            Self::Text | Self::Uuid | Self::Timestamp | Self::Timestamptz | Self::Date => "string",
            Self::Json | Self::Jsonb => "json",
            Self::Other => "unsupported",
        }
    }

    pub fn is_text(self) -> bool {
        self == Self::Text
    }

    pub fn is_timestamp(self) -> bool {
        matches!(self, Self::Timestamp | Self::Timestamptz)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ColumnInfo {
    pub name: String,
    pub ty: ColType,
    /// As `format_type()` prints it, e.g. `numeric(5,4)`.
    pub sql_type: String,
    pub nullable: bool,
    pub default: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TableInfo {
    pub name: String,
    pub columns: Vec<ColumnInfo>,
    pub primary_key: Vec<String>,
    /// The table has a rule or a row-level BEFORE INSERT trigger (on itself or a partition),
    /// either of which may skip or redirect rows: an INSERT's RETURNING rows then need not
    /// match its VALUES one for one, so such a table's inserts never share a statement.
    pub insert_may_skip_rows: bool,
}

impl ColumnInfo {
    /// A `char(n)` column: its values are padded with blanks to their length.
    pub fn is_blank_padded(&self) -> bool {
        self.sql_type == "character" || self.sql_type.starts_with("character(")
    }
}

impl TableInfo {
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// The set of tables db-svc serves and what it last read about them.
#[derive(Clone)]
pub struct Catalog {
    served: Arc<Vec<String>>,
    tables: Arc<RwLock<HashMap<String, Arc<TableInfo>>>>,
    /// Per table, one re-read at a time, and when the last successful one started.
    refreshes: Arc<parking_lot::Mutex<HashMap<String, RefreshSlot>>>,
}

type RefreshSlot = Arc<tokio::sync::Mutex<Option<Instant>>>;

/// Whether a request that arrived at `arrived` still needs its own catalog read, given that
/// the last completed one started at `last_started`: a read that started after the request
/// arrived already saw every schema change the request could know about.
pub fn needs_refresh(last_started: Option<Instant>, arrived: Instant) -> bool {
    last_started.is_none_or(|t| t < arrived)
}

const COLUMNS_SQL: &str = "\
SELECT c.relname::text AS table_name, a.attname::text AS column_name,
       -- the one-byte \"char\" (oid 18; not char(n), which is bpchar): spelled as sqlx does,
       -- so that it reads as text and is not written through a text parameter (which it
       -- would cut to its first byte)
       CASE WHEN t.oid = 18 THEN '\"char\"' ELSE t.typname::text END AS type_name,
       format_type(a.atttypid, a.atttypmod) AS sql_type, NOT a.attnotnull AS nullable,
       pg_get_expr(d.adbin, d.adrelid) AS default_value,
       c.relhasrules OR EXISTS (
         SELECT 1 FROM pg_trigger tg
         -- the table and, if it is partitioned, every partition: rows land in those
         -- (pg_partition_tree lists nothing for a table that is not partitioned)
         WHERE (tg.tgrelid = c.oid
                OR tg.tgrelid IN (SELECT relid FROM pg_partition_tree(c.oid::regclass)))
           AND NOT tg.tgisinternal
           AND tg.tgtype::int & 7 = 7 -- ROW (1) | BEFORE (2) | INSERT (4)
       ) AS insert_may_skip_rows
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND c.relname = ANY($1)
ORDER BY c.relname, a.attnum";

const PRIMARY_KEYS_SQL: &str = "\
SELECT c.relname::text AS table_name, a.attname::text AS column_name
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
WHERE i.indisprimary AND n.nspname = current_schema() AND c.relname = ANY($1)
ORDER BY c.relname, array_position(i.indkey::int2[], a.attnum)";

impl Catalog {
    pub fn new(served: Vec<String>) -> Self {
        let mut served = served;
        served.sort();
        served.dedup();
        Self {
            served: Arc::new(served),
            tables: Arc::default(),
            refreshes: Arc::default(),
        }
    }

    /// Re-reads `table` for a request that named something the cache does not know, arrived
    /// at `arrived`. Coalesced: requests missing at the same time wait for one read and share
    /// its result (so a burst of requests naming a nonexistent column makes one catalog query,
    /// not one each), and none is answered from a read that started before it arrived (so a
    /// column added before the request is always found).
    pub async fn refresh_on_miss(
        &self,
        pool: &PgPool,
        table: &str,
        arrived: Instant,
    ) -> Result<Option<Arc<TableInfo>>, sqlx::Error> {
        let lock = self
            .refreshes
            .lock()
            .entry(table.to_string())
            .or_default()
            .clone();
        let mut last_started = lock.lock().await;
        if !needs_refresh(*last_started, arrived) {
            return Ok(self.cached(table));
        }
        let started = Instant::now();
        let info = self.refresh_table(pool, table).await?;
        *last_started = Some(started);
        Ok(info)
    }

    /// The configured table names, sorted.
    pub fn served(&self) -> &[String] {
        &self.served
    }

    pub fn is_served(&self, table: &str) -> bool {
        self.served.iter().any(|t| t == table)
    }

    /// What was last read about `table` (None if not served or not found in PostgreSQL).
    pub fn cached(&self, table: &str) -> Option<Arc<TableInfo>> {
        self.tables.read().get(table).cloned()
    }

    /// Reads every served table from PostgreSQL's catalog.
    pub async fn refresh(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let loaded = load(pool, &self.served).await?;
        let missing: Vec<&String> = self
            .served
            .iter()
            .filter(|t| !loaded.contains_key(*t))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(?missing, "served tables not found in the database");
        }
        *self.tables.write() = loaded;
        Ok(())
    }

    /// Reads one table again (after a request named something the cache does not know).
    pub async fn refresh_table(
        &self,
        pool: &PgPool,
        table: &str,
    ) -> Result<Option<Arc<TableInfo>>, sqlx::Error> {
        if !self.is_served(table) {
            return Ok(None);
        }
        svc_kit::metrics::counter!("db_catalog_reads_total").increment(1);
        let mut loaded = load(pool, &[table.to_string()]).await?;
        let info = loaded.remove(table);
        let mut tables = self.tables.write();
        let previous = match &info {
            Some(info) => tables.insert(table.to_string(), info.clone()),
            None => tables.remove(table),
        };
        // Statements prepared for the table as it was are refused now ("cached plan must not
        // change result type"): connections opened until now are retired. Only on a real
        // change, so that a request failing on its own (ordering by a type without an
        // ordering operator) cannot make db-svc drop its connections.
        if previous.is_some_and(|p| info.as_ref() != Some(&p)) {
            crate::stale_plans::mark_changed();
        }
        Ok(info)
    }
}

async fn load(
    pool: &PgPool,
    names: &[String],
) -> Result<HashMap<String, Arc<TableInfo>>, sqlx::Error> {
    use sqlx::Row;
    let columns = sqlx::query(COLUMNS_SQL).bind(names).fetch_all(pool).await?;
    let keys = sqlx::query(PRIMARY_KEYS_SQL)
        .bind(names)
        .fetch_all(pool)
        .await?;
    let mut tables: HashMap<String, TableInfo> = HashMap::new();
    for row in columns {
        let table: String = row.try_get("table_name")?;
        let type_name: String = row.try_get("type_name")?;
        let info = tables.entry(table.clone()).or_insert_with(|| TableInfo {
            name: table,
            columns: Vec::new(),
            primary_key: Vec::new(),
            insert_may_skip_rows: false,
        });
        info.insert_may_skip_rows = row.try_get("insert_may_skip_rows")?;
        info.columns.push(ColumnInfo {
            name: row.try_get("column_name")?,
            ty: ColType::from_pg_name(&type_name),
            sql_type: row.try_get("sql_type")?,
            nullable: row.try_get("nullable")?,
            default: row.try_get("default_value")?,
        });
    }
    for row in keys {
        let table: String = row.try_get("table_name")?;
        if let Some(info) = tables.get_mut(&table) {
            info.primary_key.push(row.try_get("column_name")?);
        }
    }
    Ok(tables
        .into_iter()
        .map(|(name, info)| (name, Arc::new(info)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn type_names_from_both_spellings() {
        assert_eq!(ColType::from_pg_name("int4"), ColType::Int4);
        assert_eq!(ColType::from_pg_name("INT4"), ColType::Int4);
        assert_eq!(ColType::from_pg_name("TIMESTAMPTZ"), ColType::Timestamptz);
        assert_eq!(ColType::from_pg_name("varchar"), ColType::Text);
        assert_eq!(ColType::from_pg_name("_int4"), ColType::Other);
        assert_eq!(ColType::Numeric.json_type(), "number");
    }

    #[test]
    fn a_miss_shares_a_read_only_if_it_started_after_the_request_arrived() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(5);
        assert!(needs_refresh(None, t0), "never read on a miss yet");
        assert!(
            needs_refresh(Some(t0), later),
            "that read may predate an ALTER TABLE"
        );
        assert!(
            !needs_refresh(Some(later), t0),
            "a read that started afterwards is current"
        );
        assert!(!needs_refresh(Some(t0), t0));
    }
}
