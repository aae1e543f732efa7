//! Group commit for inserts: concurrent inserts into one table with the same columns share one
//! `INSERT ... VALUES` statement while earlier ones are still running.
//!
//! Per lane (table, column list, rows or count returned) at most `max_in_flight` statements
//! run at once. An insert that finds them all busy joins the lane's waiting batch; when a
//! running statement finishes, the waiting batch goes to PostgreSQL as one statement and each
//! insert gets back its own rows (RETURNING comes back in VALUES order) or its own count.
//! Nothing waits for a timer: an insert that finds a free slot runs at once, so a lone client
//! sees no added latency, while under load one statement (one round trip, one plan, one WAL
//! flush) serves many requests.
//!
//! Each insert keeps the outcome it would have had alone: if a shared statement fails, its
//! inserts run again one by one (a duplicate key fails only the insert that carries it); only
//! an unreachable database fails them all at once. An insert whose caller went away while it
//! waited is dropped before the statement is built. Tables whose rules or BEFORE INSERT
//! triggers may skip rows never share statements (their RETURNING rows cannot be matched up).
//! The catalog shows such a trigger only once it reads the table again, so a shared statement
//! checks its own result: one that would insert fewer rows than it was given fails (and, one
//! statement, writes nothing); the table is read again (its later inserts run alone), and its
//! inserts run one by one.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use sqlx::PgPool;
use tokio::sync::oneshot;

use crate::catalog::{Catalog, TableInfo};
use crate::coalescing::{self, BatchLimits, Coalescer, Lanes};
use crate::error::DbError;
use crate::executor::Written;
use crate::ops::{self, InsertValues, OpOutput};

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LaneKey {
    table: String,
    columns: Vec<String>,
    count_only: bool,
}

pub struct Waiter {
    table: Arc<TableInfo>,
    values: InsertValues,
    reply: oneshot::Sender<Result<OpOutput, DbError>>,
}

/// See the module documentation.
pub struct InsertCoalescer {
    pool: PgPool,
    /// Read again when a shared statement's rows do not match its inserts.
    catalog: Catalog,
    max_request_weight: usize,
    lanes: Mutex<Lanes<LaneKey, Waiter>>,
}

impl InsertCoalescer {
    pub fn new(pool: PgPool, catalog: Catalog, limits: BatchLimits) -> Arc<Self> {
        Arc::new(Self {
            pool,
            catalog,
            max_request_weight: limits.max_request_weight,
            lanes: Mutex::new(Lanes::new(limits)),
        })
    }

    /// Whether an insert may share a statement with others: small, with columns, into a table
    /// that inserts every row it is given.
    pub fn can_share(&self, table: &TableInfo, values: &InsertValues) -> bool {
        !table.insert_may_skip_rows
            && !values.columns().is_empty()
            && weight(values) <= self.max_request_weight
    }

    /// Inserts `values` (checked against `table`), alone or in a shared statement.
    pub async fn insert(
        self: &Arc<Self>,
        table: Arc<TableInfo>,
        values: InsertValues,
        count_only: bool,
    ) -> Result<OpOutput, DbError> {
        let key = LaneKey {
            table: table.name.clone(),
            columns: values.columns().to_vec(),
            count_only,
        };
        let (reply, receiver) = oneshot::channel();
        let weight = weight(&values);
        let admitted = coalescing::admit(self, key, values, weight, |values| Waiter {
            table: table.clone(),
            values,
            reply,
        });
        match admitted {
            // Runs on the caller's task; the slot passes on when it ends, or is dropped.
            Some((_slot, values)) => {
                record_statement(1);
                run(&self.pool, &table, [values], count_only).await
            }
            // The batch's task ended without answering: it panicked (logged where it ran),
            // possibly after the statement committed. Not UNAVAILABLE, which invites a retry
            // that could write the row twice. (A batch that never ran because db-svc is
            // stopping is answered UNAVAILABLE by `abandon`.)
            None => receiver.await.unwrap_or_else(|_| {
                Err(DbError::Database(
                    "the shared insert failed inside db-svc without reporting this insert's \
                     outcome (an internal error, logged on the server); the row may have been \
                     written"
                        .into(),
                ))
            }),
        }
    }

    async fn share(&self, batch: Vec<Waiter>, count_only: bool) {
        // A caller that went away while it waited (a cancelled call, a client-side timeout)
        // never reached PostgreSQL: its insert is dropped, as an unsent one would be, so a
        // retry cannot write the row twice.
        let mut batch: Vec<Waiter> = batch.into_iter().filter(|w| !w.reply.is_closed()).collect();
        if batch.is_empty() {
            return;
        }
        record_statement(batch.len());
        if batch.len() == 1 {
            let Waiter {
                table,
                values,
                reply,
            } = batch.remove(0);
            let _ = reply.send(run(&self.pool, &table, [values], count_only).await);
            return;
        }
        let table = batch[0].table.clone();
        let counts: Vec<usize> = batch.iter().map(|w| w.values.row_count()).collect();
        let parts = batch.iter().map(|w| w.values.clone());
        match self
            .execute_shared(&table, parts, &counts, count_only)
            .await
        {
            Ok(outputs) => {
                for (waiter, output) in batch.into_iter().zip(outputs) {
                    let _ = waiter.reply.send(Ok(output));
                }
            }
            // Every insert would fail alike. (Not a timeout: most likely one row waited on
            // another transaction's lock; alone, the others go through and only that one
            // waits again.)
            Err(Shared::Refused(e @ (DbError::Unavailable(_) | DbError::ConnectionLost(_)))) => {
                for waiter in batch {
                    let _ = waiter.reply.send(Err(e.clone()));
                }
            }
            Err(Shared::Written(e)) => {
                tracing::error!(table = %table.name, error = %e, "shared insert");
                for waiter in batch {
                    let _ = waiter.reply.send(Err(e.clone()));
                }
            }
            // Something in one of the inserts: each runs alone for its own outcome.
            Err(Shared::Refused(_)) => self.rerun_alone(batch, count_only).await,
            Err(Shared::Unmatched(e)) => {
                // Most likely a trigger or rule created since the table was read: read it
                // again, so that its next inserts do not share (`can_share`).
                tracing::warn!(
                    table = %table.name, error = %e,
                    "shared insert refused itself (it would skip rows); its inserts run alone"
                );
                if let Err(e) = self
                    .catalog
                    .refresh_on_miss(&self.pool, &table.name, Instant::now())
                    .await
                {
                    tracing::warn!(table = %table.name, error = %e, "reading the table again");
                }
                self.rerun_alone(batch, count_only).await
            }
        }
    }

    /// Runs the inserts of `parts` (of `counts` rows each) as one statement that checks its
    /// own result (`ops::plan_checked_shared_insert`): one that would insert fewer rows than it was
    /// given fails, and being one statement, writes nothing. No transaction of its own: its
    /// BEGIN and COMMIT round trips cost about a tenth of the shared inserts' throughput.
    async fn execute_shared(
        &self,
        table: &TableInfo,
        parts: impl IntoIterator<Item = InsertValues>,
        counts: &[usize],
        count_only: bool,
    ) -> Result<Vec<OpOutput>, Shared> {
        let plan =
            ops::plan_checked_shared_insert(table, parts, count_only).map_err(Shared::Refused)?;
        let written = crate::executor::execute_write(&self.pool, &plan, count_only, None)
            .await
            .map_err(|e| {
                if ops::is_shared_insert_mismatch(&e) {
                    Shared::Unmatched(e)
                } else {
                    Shared::Refused(e)
                }
            })?;
        // It ran and committed: whatever fails from here on is everyone's answer, never a
        // reason to insert again.
        written
            .decode()
            .and_then(|output| split_output(output, counts, count_only))
            .map_err(Shared::Written)
    }

    /// Runs each insert of a shared statement that wrote nothing alone, for its own outcome.
    async fn rerun_alone(&self, batch: Vec<Waiter>, count_only: bool) {
        let alone = batch.into_iter().filter(|w| !w.reply.is_closed()).map(
            |Waiter {
                 table,
                 values,
                 reply,
             }| async move {
                record_statement(1);
                let _ = reply.send(run(&self.pool, &table, [values], count_only).await);
            },
        );
        coalescing::rerun_alone(alone).await;
    }
}

/// Why a shared insert answered none of its inserts.
enum Shared {
    /// PostgreSQL refused it (or it never reached PostgreSQL): nothing was written.
    Refused(DbError),
    /// It refused itself: it would have inserted fewer rows than it was given, so its rows
    /// could not be matched to their inserts. Nothing was written.
    Unmatched(DbError),
    /// It was written, but its rows cannot be read back (a column retyped behind db-svc's
    /// back): every insert in it gets the error.
    Written(DbError),
}

/// What an insert adds to a shared statement: its bound values, or its rows when they bind
/// fewer (a row of defaults and `now()` binds nothing, yet a million of them are not free).
fn weight(values: &InsertValues) -> usize {
    values.param_count().max(values.row_count())
}

/// Runs the insert of `parts`; an error means PostgreSQL refused it and nothing was written.
async fn execute(
    pool: &PgPool,
    table: &TableInfo,
    parts: impl IntoIterator<Item = InsertValues>,
    count_only: bool,
) -> Result<Written, DbError> {
    let plan = ops::plan_shared_insert(table, parts, count_only)?;
    // Inserts return at most the rows they were given.
    crate::executor::execute_write(pool, &plan, count_only, None).await
}

async fn run(
    pool: &PgPool,
    table: &TableInfo,
    parts: impl IntoIterator<Item = InsertValues>,
    count_only: bool,
) -> Result<OpOutput, DbError> {
    execute(pool, table, parts, count_only).await?.decode()
}

/// Hands each insert of a shared statement its own part of the result, in VALUES order.
pub fn split_output(
    output: OpOutput,
    counts: &[usize],
    count_only: bool,
) -> Result<Vec<OpOutput>, DbError> {
    let expected: usize = counts.iter().sum();
    let got = if count_only {
        output.affected as usize
    } else {
        output.rows.len()
    };
    if got != expected {
        // Only a rule or trigger that skips rows does this (one the catalog did not show).
        return Err(DbError::Database(format!(
            "a shared insert of {expected} rows reported {got}: its rows cannot be matched to \
             their requests"
        )));
    }
    let mut rows = output.rows.into_iter();
    Ok(counts
        .iter()
        .map(|&n| {
            let rows: Vec<_> = rows.by_ref().take(if count_only { 0 } else { n }).collect();
            OpOutput {
                rows,
                affected: n as u64,
                ..Default::default()
            }
        })
        .collect())
}

impl Coalescer for InsertCoalescer {
    type Key = LaneKey;
    type Waiter = Waiter;

    fn lanes(&self) -> &Mutex<Lanes<LaneKey, Waiter>> {
        &self.lanes
    }

    async fn run_batch(&self, key: &LaneKey, batch: Vec<Waiter>) {
        self.share(batch, key.count_only).await
    }

    fn abandon(&self, batch: Vec<Waiter>) {
        for waiter in batch {
            let _ = waiter.reply.send(Err(DbError::Unavailable(
                "db-svc is stopping; the insert did not run and nothing was written".into(),
            )));
        }
    }

    fn report_waiting(&self, waiting: usize) {
        svc_kit::metrics::gauge!("db_insert_requests_waiting").set(waiting as f64);
    }
}

fn record_statement(requests: usize) {
    svc_kit::metrics::histogram!("db_insert_statement_requests").record(requests as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: u32) -> prost_types::Struct {
        let mut s = prost_types::Struct::default();
        s.fields.insert(
            "n".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(f64::from(n))),
            },
        );
        s
    }

    #[tokio::test]
    async fn rows_of_defaults_weigh_as_rows_not_as_nothing() {
        let table = crate::ops::tests::actions();
        let insert = |rows: Vec<serde_json::Value>| {
            let spec = crate::ops::InsertSpec {
                table: "agent_actions".into(),
                rows: rows
                    .into_iter()
                    .map(|r| r.as_object().cloned().unwrap_or_default())
                    .collect(),
                count_only: true,
            };
            InsertValues::new(&table, &spec).unwrap()
        };
        // Only created_at / updated_at (now()): nothing bound, yet 1,000 rows.
        let defaults = insert(vec![serde_json::json!({}); 1_000]);
        assert_eq!(defaults.param_count(), 0);
        assert_eq!(weight(&defaults), 1_000);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://localhost/none")
            .unwrap();
        let c = InsertCoalescer::new(pool, Catalog::new(Vec::new()), BatchLimits::inserts(2));
        assert!(!c.can_share(&table, &defaults), "too many rows to share");
        let two = insert(vec![
            serde_json::json!({"agent_name": "a", "duration_ms": 1}),
        ]);
        assert_eq!(weight(&two), 2);
    }

    #[test]
    fn each_insert_gets_its_own_rows_back_in_values_order() {
        let output = OpOutput {
            rows: (0..6).map(row).collect(),
            affected: 6,
            ..Default::default()
        };
        let parts = split_output(output, &[1, 3, 2], false).unwrap();
        let got: Vec<(u64, Vec<prost_types::Struct>)> =
            parts.into_iter().map(|o| (o.affected, o.rows)).collect();
        assert_eq!(
            got,
            vec![
                (1, vec![row(0)]),
                (3, vec![row(1), row(2), row(3)]),
                (2, vec![row(4), row(5)]),
            ]
        );
    }

    #[test]
    fn counts_split_and_a_mismatch_is_an_error_not_a_guess() {
        let counted = OpOutput {
            affected: 5,
            ..Default::default()
        };
        let parts = split_output(counted, &[2, 3], true).unwrap();
        assert_eq!(
            parts.iter().map(|o| o.affected).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(parts.iter().all(|o| o.rows.is_empty()));
        let short = OpOutput {
            rows: (0..2).map(row).collect(),
            affected: 2,
            ..Default::default()
        };
        let err = split_output(short, &[2, 1], false).unwrap_err();
        assert!(err.to_string().contains("cannot be matched"), "{err}");
    }
}
