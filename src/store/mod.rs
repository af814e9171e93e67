//! The repository: one trait, a PostgreSQL and an in-memory implementation with
//! the same semantics (one contract test suite runs against both).
//!
//! Every write is a compare-and-swap on the batch's `version`; nothing writes
//! blindly. [`Repository::apply`] is the unit of work of the handlers: a list of
//! changes in one transaction, each with its own version check, inbox row and
//! outbox rows, each reporting its own outcome.

pub mod memory;
pub mod postgres;

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use serde_json::Value;
use uuid::Uuid;

use crate::contracts::{BatchStatus, PhaseName, PipelineExecutionStatus, Timestamp};
use crate::domain::{Batch, BatchContext, BatchEssay, OutboundMessage, PipelineState};

pub use memory::MemoryRepository;
pub use postgres::{PgRepository, PostgresSettings};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or failed: worth retrying.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A stored row does not decode: needs an operator, not a retry.
    #[error("stored data for `{id}` is unreadable: {error}")]
    Corrupt { id: String, error: String },
    /// A fault injected by a test.
    #[error("injected fault: {0:?}")]
    Injected(Fault),
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Database(_) | StoreError::Injected(_))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Points where a test can make the next unit of work fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// After the outbox rows of a change are written, before its transaction commits.
    AfterOutboxInsert,
}

/// The inbox record of a consumed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxRecord {
    pub event_id: Uuid,
    pub topic: String,
}

/// One change of the unit of work.
#[derive(Debug, Clone)]
pub struct Change {
    /// The state to write; `batch.version` is ignored (see `expected_version`).
    pub batch: Batch,
    /// The version the decision was made on; `None` creates the batch.
    pub expected_version: Option<i64>,
    /// Rewrite the batch's essays too.
    pub essays_changed: bool,
    pub outbox: Vec<OutboundMessage>,
    pub inbox: Option<InboxRecord>,
    /// The resolved configuration of a run that starts with this change.
    pub snapshot: Option<Value>,
}

impl Change {
    /// A new batch with its first messages.
    pub fn create(batch: Batch, outbox: Vec<OutboundMessage>) -> Self {
        Self {
            essays_changed: !batch.essays.is_empty(),
            batch,
            expected_version: None,
            outbox,
            inbox: None,
            snapshot: None,
        }
    }
}

/// What became of one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOutcome {
    Applied {
        version: i64,
    },
    /// The batch's version differs from the expected one (or it exists already, on create).
    Conflict,
    /// The inbox already holds this event.
    Duplicate,
    NotFound,
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
    pub payload: Value,
    pub traceparent: Option<String>,
    pub created_at: Timestamp,
    pub published_at: Option<Timestamp>,
    pub attempts: i32,
    pub next_attempt_at: Timestamp,
    pub last_error: Option<String>,
    pub claimed_until: Option<Timestamp>,
}

/// Backlog figures for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OutboxStats {
    pub unpublished: i64,
    pub oldest_unpublished_age_seconds: f64,
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

#[async_trait]
pub trait Repository: Send + Sync + std::fmt::Debug {
    /// Brings the schema up to date (idempotent).
    async fn migrate(&self) -> StoreResult<()>;
    async fn ping(&self) -> StoreResult<()>;
    /// The allowed values of every enum column, as the store enforces them.
    async fn enum_domains(&self) -> StoreResult<EnumDomains>;

    /// Creates a batch with its first messages; `Conflict` when it exists.
    async fn create_batch(
        &self,
        batch: &Batch,
        outbox: &[OutboundMessage],
    ) -> StoreResult<ChangeOutcome> {
        let change = Change::create(batch.clone(), outbox.to_vec());
        Ok(self.apply(vec![change]).await?[0])
    }
    async fn get_batch_by_id(&self, id: &str) -> StoreResult<Option<Batch>>;
    /// The batches among `ids` that exist, in any order.
    async fn get_batches(&self, ids: &[String]) -> StoreResult<Vec<Batch>> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(batch) = self.get_batch_by_id(id).await? {
                found.push(batch);
            }
        }
        Ok(found)
    }
    async fn update_batch_status(
        &self,
        id: &str,
        expected_version: i64,
        status: BatchStatus,
    ) -> StoreResult<bool>;
    async fn store_batch_context(
        &self,
        id: &str,
        expected_version: i64,
        context: &BatchContext,
    ) -> StoreResult<bool>;
    async fn get_batch_context(&self, id: &str) -> StoreResult<Option<BatchContext>>;
    async fn store_batch_essays(
        &self,
        id: &str,
        expected_version: i64,
        essays: &[BatchEssay],
    ) -> StoreResult<bool>;
    async fn get_batch_essays(&self, id: &str) -> StoreResult<Option<Vec<BatchEssay>>>;
    async fn get_processing_pipeline_state(&self, id: &str) -> StoreResult<Option<PipelineState>>;
    async fn save_processing_pipeline_state(
        &self,
        id: &str,
        expected_version: i64,
        state: &PipelineState,
    ) -> StoreResult<bool>;
    /// Moves one phase from `expected` to `new` (a missing phase counts as
    /// `pending_dependencies`); false when the status differs or the race is lost.
    /// Logs the change in `phase_status_log` when it wins.
    async fn update_phase_status_atomically(
        &self,
        id: &str,
        phase: PhaseName,
        expected: PipelineExecutionStatus,
        new: PipelineExecutionStatus,
        completed_at: Option<Timestamp>,
        correlation_id: Option<Uuid>,
    ) -> StoreResult<bool>;
    async fn get_phase_status_history(
        &self,
        id: &str,
        phase: Option<PhaseName>,
    ) -> StoreResult<Vec<PhaseStatusChange>>;

    /// The unit of work: every change in one transaction, each with its own
    /// savepoint, so a conflict or duplicate undoes only that change.
    async fn apply(&self, changes: Vec<Change>) -> StoreResult<Vec<ChangeOutcome>>;

    async fn inbox_contains(&self, event_id: Uuid) -> StoreResult<bool>;
    /// Outbox rows (all, or one key's), oldest first.
    async fn outbox_rows(&self, key: Option<&str>) -> StoreResult<Vec<OutboxRow>>;
    async fn configuration_snapshots(&self, id: &str) -> StoreResult<Vec<Value>>;

    /// Leases unpublished rows for publishing, oldest first, keeping per-key order:
    /// a key is taken only when its oldest unpublished row is due and unleased,
    /// and then all of its unpublished rows come along.
    async fn claim_outbox(
        &self,
        keys: i64,
        lease: std::time::Duration,
    ) -> StoreResult<Vec<OutboxRow>>;
    /// Marks `published` rows published; `failed` rows get their error and next
    /// attempt; `released` rows lose their lease untouched.
    async fn settle_outbox(
        &self,
        published: &[Uuid],
        failed: &[(Uuid, String, Timestamp)],
        released: &[Uuid],
    ) -> StoreResult<()>;
    /// Deletes up to `limit` rows published before `before`.
    async fn purge_outbox(&self, before: Timestamp, limit: i64) -> StoreResult<u64>;
    async fn outbox_stats(&self) -> StoreResult<OutboxStats>;

    /// Makes the next unit of work fail at `fault` (then the fault clears).
    fn inject_fault(&self, fault: Fault);
}
