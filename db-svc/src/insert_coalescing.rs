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

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;

use parking_lot::Mutex;
use sqlx::PgPool;
use tokio::sync::oneshot;

use crate::catalog::TableInfo;
use crate::error::DbError;
use crate::ops::{self, InsertValues, OpOutput};

/// How many requests' rows and parameters one shared statement may carry.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Statements per lane running at once before inserts start waiting (at least 1).
    pub max_in_flight: usize,
    /// Bind parameters per shared statement (PostgreSQL allows 65,535).
    pub max_params: usize,
    /// Requests per shared statement.
    pub max_requests: usize,
    /// Larger inserts run alone: their statement cost is already spread over many rows, and
    /// every distinct size of a shared statement is one more prepared statement.
    pub max_request_params: usize,
}

impl BatchLimits {
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            max_in_flight: max_in_flight.max(1),
            max_params: 4_096,
            max_requests: 256,
            max_request_params: 256,
        }
    }
}

struct Batch<W> {
    items: Vec<W>,
    params: usize,
}

struct Lane<W> {
    running: usize,
    waiting: VecDeque<Batch<W>>,
}

/// The pure bookkeeping of the lanes: who runs now, who waits in which batch, and which batch
/// takes over a slot when a statement finishes.
pub struct Lanes<K, W> {
    limits: BatchLimits,
    lanes: HashMap<K, Lane<W>>,
}

impl<K: Hash + Eq + Clone, W> Lanes<K, W> {
    pub fn new(limits: BatchLimits) -> Self {
        Self {
            limits,
            lanes: HashMap::new(),
        }
    }

    /// Takes a running slot of `key`'s lane if one is free (the caller runs its insert now).
    pub fn try_start(&mut self, key: &K) -> bool {
        let lane = self.lanes.entry(key.clone()).or_insert_with(|| Lane {
            running: 0,
            waiting: VecDeque::new(),
        });
        if lane.running < self.limits.max_in_flight {
            lane.running += 1;
            true
        } else {
            false
        }
    }

    /// Adds an insert that found no free slot to the last waiting batch, or to a new one when
    /// that batch is full. A batch always takes its first insert, however large.
    pub fn wait(&mut self, key: &K, item: W, params: usize) {
        let limits = self.limits;
        let lane = self.lanes.entry(key.clone()).or_insert_with(|| Lane {
            running: 0,
            waiting: VecDeque::new(),
        });
        match lane.waiting.back_mut() {
            Some(batch)
                if batch.items.len() < limits.max_requests
                    && batch.params + params <= limits.max_params =>
            {
                batch.items.push(item);
                batch.params += params;
            }
            _ => lane.waiting.push_back(Batch {
                items: vec![item],
                params,
            }),
        }
    }

    /// A statement of `key`'s lane finished: the next waiting batch takes over its slot, or the
    /// slot is freed (and an idle lane forgotten).
    pub fn finish(&mut self, key: &K) -> Option<Vec<W>> {
        let lane = self.lanes.get_mut(key)?;
        if let Some(batch) = lane.waiting.pop_front() {
            return Some(batch.items);
        }
        lane.running = lane.running.saturating_sub(1);
        if lane.running == 0 {
            self.lanes.remove(key);
        }
        None
    }

    /// Inserts waiting for a slot, over all lanes.
    pub fn waiting(&self) -> usize {
        self.lanes
            .values()
            .flat_map(|l| &l.waiting)
            .map(|b| b.items.len())
            .sum()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct LaneKey {
    table: String,
    columns: Vec<String>,
    count_only: bool,
}

struct Waiter {
    table: Arc<TableInfo>,
    values: InsertValues,
    reply: oneshot::Sender<Result<OpOutput, DbError>>,
}

/// See the module documentation.
pub struct InsertCoalescer {
    pool: PgPool,
    max_request_params: usize,
    lanes: Mutex<Lanes<LaneKey, Waiter>>,
}

impl InsertCoalescer {
    pub fn new(pool: PgPool, limits: BatchLimits) -> Arc<Self> {
        Arc::new(Self {
            pool,
            max_request_params: limits.max_request_params,
            lanes: Mutex::new(Lanes::new(limits)),
        })
    }

    /// Whether an insert may share a statement with others: small, with columns, into a table
    /// that inserts every row it is given.
    pub fn can_share(&self, table: &TableInfo, values: &InsertValues) -> bool {
        !table.insert_may_skip_rows
            && !values.columns().is_empty()
            && values.param_count() <= self.max_request_params
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
        let admission = {
            let mut lanes = self.lanes.lock();
            if lanes.try_start(&key) {
                Ok(values)
            } else {
                let (reply, receiver) = oneshot::channel();
                let params = values.param_count();
                let waiter = Waiter {
                    table: table.clone(),
                    values,
                    reply,
                };
                lanes.wait(&key, waiter, params);
                set_waiting_gauge(lanes.waiting());
                Err(receiver)
            }
        };
        match admission {
            Ok(values) => {
                // Runs on the caller's task; the slot passes on when it ends, or is dropped.
                let _slot = Slot {
                    coalescer: self.clone(),
                    key,
                };
                record_statement(1);
                run(&self.pool, &table, [values], count_only).await
            }
            Err(receiver) => receiver.await.unwrap_or_else(|_| {
                Err(DbError::Unavailable(
                    "db-svc stopped before the insert ran".into(),
                ))
            }),
        }
    }

    async fn run_batch(&self, batch: Vec<Waiter>, count_only: bool) {
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
        let parts = batch.iter().map(|w| w.values.clone());
        let shared = run(&self.pool, &table, parts, count_only).await;
        match shared {
            Ok(output) => {
                let counts: Vec<usize> = batch.iter().map(|w| w.values.row_count()).collect();
                match split_output(output, &counts, count_only) {
                    Ok(outputs) => {
                        for (waiter, output) in batch.into_iter().zip(outputs) {
                            let _ = waiter.reply.send(Ok(output));
                        }
                    }
                    Err(e) => {
                        tracing::error!(table = %table.name, error = %e, "shared insert");
                        for waiter in batch {
                            let _ = waiter.reply.send(Err(e.clone()));
                        }
                    }
                }
            }
            // Every insert would fail alike (or time out again, one after the other).
            Err(e @ (DbError::Unavailable(_) | DbError::Timeout(_))) => {
                for waiter in batch {
                    let _ = waiter.reply.send(Err(e.clone()));
                }
            }
            Err(_) => {
                // Something in one of the inserts: each runs alone for its own outcome.
                for Waiter {
                    table,
                    values,
                    reply,
                } in batch
                {
                    if reply.is_closed() {
                        continue;
                    }
                    record_statement(1);
                    let _ = reply.send(run(&self.pool, &table, [values], count_only).await);
                }
            }
        }
    }
}

async fn run(
    pool: &PgPool,
    table: &TableInfo,
    parts: impl IntoIterator<Item = InsertValues>,
    count_only: bool,
) -> Result<OpOutput, DbError> {
    let plan = ops::plan_shared_insert(table, parts, count_only)?;
    crate::executor::run_write(pool, &plan, count_only).await
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
        // Only a rule or trigger that skips rows does this; such tables are not shared.
        return Err(DbError::Database(format!(
            "a shared insert of {expected} rows reported {got}; the rows were written, but \
             cannot be matched to their requests"
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

fn record_statement(requests: usize) {
    svc_kit::metrics::histogram!("db_insert_statement_requests").record(requests as f64);
}

fn set_waiting_gauge(waiting: usize) {
    svc_kit::metrics::gauge!("db_insert_requests_waiting").set(waiting as f64);
}

/// A running slot of a lane. Dropping it (the statement ended, or its caller went away) passes
/// the slot to the next waiting batch, on a task of its own.
struct Slot {
    coalescer: Arc<InsertCoalescer>,
    key: LaneKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let next = {
            let mut lanes = self.coalescer.lanes.lock();
            let next = lanes.finish(&self.key);
            set_waiting_gauge(lanes.waiting());
            next
        };
        let Some(batch) = next else { return };
        // Outside a runtime (shutting down) the batch is dropped and its callers see
        // UNAVAILABLE.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let slot = Slot {
                coalescer: self.coalescer.clone(),
                key: self.key.clone(),
            };
            runtime.spawn(async move {
                let count_only = slot.key.count_only;
                slot.coalescer.run_batch(batch, count_only).await;
                drop(slot);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(max_in_flight: usize) -> Lanes<&'static str, u32> {
        Lanes::new(BatchLimits {
            max_in_flight,
            max_params: 10,
            max_requests: 3,
            max_request_params: 10,
        })
    }

    #[test]
    fn inserts_run_at_once_until_the_lane_is_busy() {
        let mut l = lanes(2);
        assert!(l.try_start(&"t"));
        assert!(l.try_start(&"t"));
        assert!(!l.try_start(&"t"), "two running: the third waits");
        assert!(l.try_start(&"other"), "lanes are independent");
    }

    #[test]
    fn waiting_inserts_share_batches_in_arrival_order() {
        let mut l = lanes(1);
        assert!(l.try_start(&"t"));
        for (i, params) in [(1, 4), (2, 4), (3, 4), (4, 1), (5, 1), (6, 50)] {
            assert!(!l.try_start(&"t"));
            l.wait(&"t", i, params);
        }
        assert_eq!(l.waiting(), 6);
        // 1+2 fill 8 of 10 parameters; 3 would exceed them. 3,4,5 reach 3 requests. 6 is too
        // big for any batch but still gets one of its own.
        assert_eq!(l.finish(&"t"), Some(vec![1, 2]));
        assert_eq!(l.finish(&"t"), Some(vec![3, 4, 5]));
        assert_eq!(l.finish(&"t"), Some(vec![6]));
        assert_eq!(l.waiting(), 0);
        assert_eq!(l.finish(&"t"), None, "nothing waits: the slot is freed");
        assert!(l.try_start(&"t"), "and taken again at once");
    }

    #[test]
    fn a_finished_slot_goes_to_the_waiting_batch_not_to_a_newcomer() {
        let mut l = lanes(1);
        assert!(l.try_start(&"t"));
        l.wait(&"t", 1, 1);
        assert_eq!(l.finish(&"t"), Some(vec![1]), "the batch runs in the slot");
        assert!(!l.try_start(&"t"), "the slot is still taken by that batch");
        l.wait(&"t", 2, 1);
        assert_eq!(l.finish(&"t"), Some(vec![2]));
        assert_eq!(l.finish(&"t"), None);
        assert!(l.lanes.is_empty(), "an idle lane is forgotten");
    }

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
