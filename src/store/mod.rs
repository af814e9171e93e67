//! The repository: one trait, a PostgreSQL and an in-memory implementation
//! with the same semantics (one contract test suite runs against both).
//!
//! Every batch write is a compare-and-swap on the batch's `version`; nothing
//! writes blindly. [`Repository::commit`] is the unit of work: many batches'
//! new states, inbox rows and outbox rows in one transaction, written
//! set-based (a handful of statements whatever the count). A batch whose
//! version moved underneath has nothing of its own written and is reported as
//! a conflict; the rest commits.

pub mod memory;
pub mod postgres;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use async_trait::async_trait;
use serde_json::Value;
use uuid::Uuid;

use crate::contracts::{BatchStatus, PhaseName, PipelineExecutionStatus, Timestamp};
use crate::domain::{Batch, OutboundMessage, PhaseTransition};

pub use memory::MemoryRepository;
pub use postgres::PgRepository;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A stored row does not decode: needs an operator, not a retry.
    #[error("stored data for `{id}` is unreadable: {error}")]
    Corrupt { id: String, error: String },
    /// A uniqueness or integrity rule refused the data.
    #[error("constraint violated: {0}")]
    Constraint(String),
    /// A failure a test injected (see the tests' repository decorators).
    #[error("{0}")]
    Injected(String),
}

/// How the worker treats a store error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retrying the same work later may succeed: connection lost, pool timeout,
    /// serialization failure, deadlock, statement timeout, server shutting down.
    Transient,
    /// The data itself is refused: retrying cannot help; isolate the record.
    Permanent,
}

impl ErrorClass {
    pub fn label(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl StoreError {
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::Database(e) => classify(e),
            StoreError::Migration(_) | StoreError::Corrupt { .. } | StoreError::Constraint(_) => {
                ErrorClass::Permanent
            }
            StoreError::Injected(message) if message.contains("permanent") => ErrorClass::Permanent,
            StoreError::Injected(_) => ErrorClass::Transient,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }
}

fn classify(e: &sqlx::Error) -> ErrorClass {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => ErrorClass::Transient,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // Connection exceptions, serialization failure, deadlock, query
            // cancelled (statement timeout), the server shutting down or out of
            // resources, a lock not available, a read-only standby.
            Some(code)
                if code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57")
                    || code.starts_with("58")
                    || code == "40001"
                    || code == "40P01"
                    || code == "55P03"
                    || code == "25006" =>
            {
                ErrorClass::Transient
            }
            _ => ErrorClass::Permanent,
        },
        _ => ErrorClass::Permanent,
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The inbox record of a consumed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxRecord {
    pub event_id: Uuid,
    pub topic: String,
    pub batch_id: String,
}

/// One batch's new state in a unit of work.
#[derive(Debug, Clone)]
pub struct BatchWrite {
    /// The state to write; `batch.version` is ignored (see `expected_version`).
    pub batch: Batch,
    /// The version the decisions were made on; `None` creates the batch.
    pub expected_version: Option<i64>,
    /// Rewrite the batch's essays too.
    pub essays_changed: bool,
    pub transitions: Vec<PhaseTransition>,
    /// Resolved configurations of runs started by this write.
    pub snapshots: Vec<(Uuid, Value)>,
}

/// One transaction's worth of changes. Inbox and outbox rows belong to a batch
/// (by id): they are written only when that batch's write (if any) wins.
/// Dead letters (outbox rows with `raw`) belong to no batch and are written
/// once per id: the same letter again changes nothing.
#[derive(Debug, Clone, Default)]
pub struct UnitOfWork {
    pub writes: Vec<BatchWrite>,
    pub inbox: Vec<InboxRecord>,
    pub outbox: Vec<OutboundMessage>,
}

impl UnitOfWork {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.inbox.is_empty() && self.outbox.is_empty()
    }

    /// A new batch with its first messages.
    pub fn create(batch: Batch, outbox: Vec<OutboundMessage>) -> Self {
        Self {
            writes: vec![BatchWrite {
                essays_changed: !batch.essays.is_empty(),
                batch,
                expected_version: None,
                transitions: Vec::new(),
                snapshots: Vec::new(),
            }],
            inbox: Vec::new(),
            outbox,
        }
    }

    /// The batches whose writes must win for the rest of their rows to be written.
    pub fn batch_ids(&self) -> BTreeSet<String> {
        self.writes.iter().map(|w| w.batch.id.clone()).collect()
    }
}

/// What a commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// Batches whose write lost (version moved, or created twice): nothing of
    /// theirs was written.
    pub conflicts: BTreeSet<String>,
    /// Batches to update that do not exist: nothing of theirs was written.
    pub missing: BTreeSet<String>,
    /// New version of each written batch.
    pub versions: BTreeMap<String, i64>,
    /// Inbox rows of batches without a write that were recorded already
    /// (someone else processed the same event meanwhile).
    pub already_processed: BTreeSet<Uuid>,
}

/// Why a commit wrote nothing at all.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An event of a winning batch write was recorded meanwhile by another
    /// worker: the transaction was rolled back; decide again without them.
    #[error("{} event(s) were processed concurrently", .0.len())]
    Processed(BTreeSet<Uuid>),
}

/// One entry of the phase-status log.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseStatusChange {
    pub batch_id: String,
    pub phase: PhaseName,
    pub old_status: PipelineExecutionStatus,
    pub new_status: PipelineExecutionStatus,
    pub correlation_id: Option<Uuid>,
    pub completed_at: Option<Timestamp>,
}

/// One outbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: Uuid,
    pub seq: i64,
    pub topic: String,
    pub key: String,
    pub event_type: String,
    pub correlation_id: Uuid,
    /// The exact bytes to publish (the envelope as JSON text).
    pub payload: String,
    /// A record published as it came (a dead letter), instead of `payload`.
    pub raw: Option<crate::domain::RawRecord>,
    pub traceparent: Option<String>,
    pub created_at: Timestamp,
    pub published_at: Option<Timestamp>,
    pub attempts: i32,
    pub next_attempt_at: Timestamp,
    pub last_error: Option<String>,
    pub claimed_by: Option<Uuid>,
    pub claimed_until: Option<Timestamp>,
}

/// A publish that failed, to retry at `next_attempt_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishFailure {
    pub id: Uuid,
    pub error: String,
    pub next_attempt_at: Timestamp,
}

/// Backlog figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OutboxStats {
    pub unpublished: i64,
    pub oldest_unpublished_age_seconds: f64,
    /// Rows that failed at least once and are not published yet.
    pub failing: i64,
}

/// Connections of a database pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    pub size: u32,
    pub idle: u32,
    pub max: u32,
}

impl PoolStatus {
    pub fn in_use(self) -> u32 {
        self.size.saturating_sub(self.idle)
    }

    pub fn utilization_percent(self) -> f64 {
        if self.max == 0 {
            0.0
        } else {
            f64::from(self.in_use()) * 100.0 / f64::from(self.max)
        }
    }
}

/// What `/healthz/database` reports about the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseReport {
    pub active_connections: i64,
    pub database_size: String,
    /// Statements active for more than five minutes.
    pub long_running_queries: i64,
}

/// Allowed values of each enum column, as `table.column`.
pub type EnumDomains = BTreeMap<String, BTreeSet<String>>;

/// The enum domains the Rust types define; the database must hold the same.
pub fn rust_enum_domains() -> EnumDomains {
    fn set<T: Copy>(all: &[T], f: fn(T) -> &'static str) -> BTreeSet<String> {
        all.iter().map(|&v| f(v).to_owned()).collect()
    }
    let statuses = set(
        PipelineExecutionStatus::ALL,
        PipelineExecutionStatus::as_str,
    );
    BTreeMap::from([
        (
            "batches.status".to_owned(),
            set(BatchStatus::ALL, BatchStatus::as_str),
        ),
        (
            "phase_status_log.phase".to_owned(),
            set(PhaseName::ALL, PhaseName::as_str),
        ),
        ("phase_status_log.old_status".to_owned(), statuses.clone()),
        ("phase_status_log.new_status".to_owned(), statuses),
    ])
}

/// What the worker, the relay, the HTTP surface and the operator commands
/// need from storage.
#[async_trait]
pub trait Repository: Send + Sync + std::fmt::Debug {
    /// Brings the schema up to date (idempotent).
    async fn migrate(&self) -> StoreResult<()>;
    async fn ping(&self) -> StoreResult<()>;
    /// The allowed values of every enum column, as the store enforces them.
    async fn enum_domains(&self) -> StoreResult<EnumDomains>;

    /// The batches among `ids` that exist, in any order.
    async fn get_batches(&self, ids: &[String]) -> StoreResult<Vec<Batch>>;
    async fn get_batch(&self, id: &str) -> StoreResult<Option<Batch>> {
        Ok(self.get_batches(&[id.to_owned()]).await?.pop())
    }
    /// The events among `ids` that the inbox holds.
    async fn processed(&self, ids: &[Uuid]) -> StoreResult<HashSet<Uuid>>;

    /// The unit of work (see the module documentation).
    async fn commit(&self, unit: UnitOfWork) -> Result<Committed, CommitError>;

    /// Leases unpublished rows for `relay`, oldest first, at most `limit`,
    /// keeping per-key order: a key is taken only when its oldest unpublished
    /// row is due and unleased, and then its rows in order (up to the limit).
    async fn claim_outbox(
        &self,
        relay: Uuid,
        limit: i64,
        lease: std::time::Duration,
    ) -> StoreResult<Vec<OutboxRow>>;
    /// Extends `relay`'s lease on `ids` (rows it still holds).
    async fn renew_outbox_lease(
        &self,
        relay: Uuid,
        ids: &[Uuid],
        lease: std::time::Duration,
    ) -> StoreResult<u64>;
    /// Settles rows `relay` still holds: `published` are marked, `failed` get
    /// their error and next attempt, `released` lose the lease untouched.
    /// Returns how many rows were settled (rows another relay took over are not).
    async fn settle_outbox(
        &self,
        relay: Uuid,
        published: &[Uuid],
        failed: &[PublishFailure],
        released: &[Uuid],
    ) -> StoreResult<u64>;
    /// Deletes up to `limit` rows published before `before`.
    async fn purge_outbox(&self, before: Timestamp, limit: i64) -> StoreResult<u64>;
    /// Deletes up to `limit` inbox rows recorded before `before`.
    async fn purge_inbox(&self, before: Timestamp, limit: i64) -> StoreResult<u64>;
    async fn outbox_stats(&self) -> StoreResult<OutboxStats>;

    /// Outbox rows (all, or one key's), oldest first.
    async fn outbox_rows(&self, key: Option<&str>) -> StoreResult<Vec<OutboxRow>>;
    /// Unpublished rows that failed at least once, worst first.
    async fn stuck_outbox_rows(&self, limit: i64) -> StoreResult<Vec<OutboxRow>>;
    async fn phase_history(&self, batch_id: &str) -> StoreResult<Vec<PhaseStatusChange>>;
    async fn configuration_snapshots(&self, batch_id: &str) -> StoreResult<Vec<Value>>;

    /// The connection pool's figures, where there is a pool.
    fn pool_status(&self) -> Option<PoolStatus> {
        None
    }
    async fn database_report(&self) -> StoreResult<DatabaseReport> {
        Ok(DatabaseReport::default())
    }
}
