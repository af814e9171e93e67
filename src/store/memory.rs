//! In-memory repository: the same semantics as PostgreSQL, for tests and the demo.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::Value;
use uuid::Uuid;

use super::{
    rust_enum_domains, Change, ChangeOutcome, EnumDomains, Fault, OutboxRow, OutboxStats,
    PhaseStatusChange, Repository, StoreError, StoreResult,
};
use crate::contracts::{BatchStatus, PhaseName, PipelineExecutionStatus, Timestamp};
use crate::domain::{Batch, BatchContext, BatchEssay, PipelineState};

#[derive(Debug, Default)]
struct Inner {
    batches: HashMap<String, Batch>,
    outbox: Vec<OutboxRow>,
    next_seq: i64,
    inbox: HashSet<Uuid>,
    phase_log: Vec<PhaseStatusChange>,
    snapshots: Vec<(String, Value)>,
    fault: Option<Fault>,
}

#[derive(Debug, Default)]
pub struct MemoryRepository {
    inner: Mutex<Inner>,
}

impl MemoryRepository {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied change:
        // `apply` stages everything before it touches `Inner`.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Compare-and-swap on the version, then `f` on the stored batch.
    fn swap(&self, id: &str, expected_version: i64, f: impl FnOnce(&mut Batch)) -> bool {
        let mut inner = self.lock();
        match inner.batches.get_mut(id) {
            Some(batch) if batch.version == expected_version => {
                f(batch);
                batch.version += 1;
                batch.updated_at = chrono::Utc::now();
                true
            }
            _ => false,
        }
    }

    fn read<T>(&self, id: &str, f: impl FnOnce(&Batch) -> T) -> Option<T> {
        self.lock().batches.get(id).map(f)
    }
}

#[async_trait]
impl Repository for MemoryRepository {
    async fn migrate(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn enum_domains(&self) -> StoreResult<EnumDomains> {
        // Values are checked by the Rust types themselves.
        Ok(rust_enum_domains())
    }

    async fn get_batch_by_id(&self, id: &str) -> StoreResult<Option<Batch>> {
        Ok(self.read(id, Batch::clone))
    }

    async fn update_batch_status(
        &self,
        id: &str,
        expected_version: i64,
        status: BatchStatus,
    ) -> StoreResult<bool> {
        Ok(self.swap(id, expected_version, |b| b.status = status))
    }

    async fn store_batch_context(
        &self,
        id: &str,
        expected_version: i64,
        context: &BatchContext,
    ) -> StoreResult<bool> {
        Ok(self.swap(id, expected_version, |b| b.context = context.clone()))
    }

    async fn get_batch_context(&self, id: &str) -> StoreResult<Option<BatchContext>> {
        Ok(self.read(id, |b| b.context.clone()))
    }

    async fn store_batch_essays(
        &self,
        id: &str,
        expected_version: i64,
        essays: &[BatchEssay],
    ) -> StoreResult<bool> {
        Ok(self.swap(id, expected_version, |b| b.essays = essays.to_vec()))
    }

    async fn get_batch_essays(&self, id: &str) -> StoreResult<Option<Vec<BatchEssay>>> {
        Ok(self.read(id, |b| b.essays.clone()))
    }

    async fn get_processing_pipeline_state(&self, id: &str) -> StoreResult<Option<PipelineState>> {
        Ok(self.read(id, |b| b.pipeline.clone()))
    }

    async fn save_processing_pipeline_state(
        &self,
        id: &str,
        expected_version: i64,
        state: &PipelineState,
    ) -> StoreResult<bool> {
        Ok(self.swap(id, expected_version, |b| b.pipeline = state.clone()))
    }

    async fn update_phase_status_atomically(
        &self,
        id: &str,
        phase: PhaseName,
        expected: PipelineExecutionStatus,
        new: PipelineExecutionStatus,
        completed_at: Option<Timestamp>,
        correlation_id: Option<Uuid>,
    ) -> StoreResult<bool> {
        let mut inner = self.lock();
        let Some(batch) = inner.batches.get_mut(id) else {
            return Ok(false);
        };
        let state = batch.pipeline.phase_mut(phase);
        if state.status != expected {
            return Ok(false);
        }
        state.status = new;
        if completed_at.is_some() {
            state.completed_at = completed_at;
        }
        batch.version += 1;
        batch.updated_at = chrono::Utc::now();
        inner.phase_log.push(PhaseStatusChange {
            batch_id: id.to_owned(),
            phase,
            old_status: expected,
            new_status: new,
            correlation_id,
            completed_at,
        });
        Ok(true)
    }

    async fn get_phase_status_history(
        &self,
        id: &str,
        phase: Option<PhaseName>,
    ) -> StoreResult<Vec<PhaseStatusChange>> {
        Ok(self
            .lock()
            .phase_log
            .iter()
            .filter(|c| c.batch_id == id && phase.is_none_or(|p| p == c.phase))
            .cloned()
            .collect())
    }

    async fn apply(&self, changes: Vec<Change>) -> StoreResult<Vec<ChangeOutcome>> {
        let mut inner = self.lock();
        let fault = inner.fault.take();
        // Staged like a transaction: nothing reaches `inner` unless every change went through.
        let mut staged: HashMap<String, Batch> = HashMap::new();
        let mut inbox: HashSet<Uuid> = HashSet::new();
        let mut outbox: Vec<OutboxRow> = Vec::new();
        let mut snapshots = Vec::new();
        let mut outcomes = Vec::with_capacity(changes.len());
        let now = chrono::Utc::now();
        let mut failed: HashSet<String> = HashSet::new();
        for change in changes {
            // A later change to a batch was decided on top of the earlier one.
            if failed.contains(&change.batch.id) {
                outcomes.push(ChangeOutcome::Conflict);
                continue;
            }
            failed.insert(change.batch.id.clone());
            if let Some(record) = &change.inbox {
                if inner.inbox.contains(&record.event_id) || inbox.contains(&record.event_id) {
                    outcomes.push(ChangeOutcome::Duplicate);
                    continue;
                }
            }
            let id = change.batch.id.clone();
            let current = staged.get(&id).or_else(|| inner.batches.get(&id));
            let version = match (change.expected_version, current) {
                (None, Some(_)) => {
                    outcomes.push(ChangeOutcome::Conflict);
                    continue;
                }
                (None, None) => 1,
                (Some(_), None) => {
                    outcomes.push(ChangeOutcome::NotFound);
                    continue;
                }
                (Some(expected), Some(current)) if current.version != expected => {
                    outcomes.push(ChangeOutcome::Conflict);
                    continue;
                }
                (Some(expected), Some(_)) => expected + 1,
            };
            let mut batch = change.batch;
            batch.version = version;
            for message in change.outbox {
                inner.next_seq += 1;
                outbox.push(OutboxRow {
                    id: message.event_id,
                    seq: inner.next_seq,
                    topic: message.topic.to_owned(),
                    key: message.key,
                    event_type: message.topic.to_owned(),
                    correlation_id: message.correlation_id,
                    payload: message.envelope,
                    traceparent: message.traceparent,
                    created_at: now,
                    published_at: None,
                    attempts: 0,
                    next_attempt_at: now,
                    last_error: None,
                    claimed_until: None,
                });
            }
            if fault == Some(Fault::AfterOutboxInsert) {
                return Err(StoreError::Injected(Fault::AfterOutboxInsert));
            }
            if let Some(record) = change.inbox {
                inbox.insert(record.event_id);
            }
            if let Some(snapshot) = change.snapshot {
                snapshots.push((id.clone(), snapshot));
            }
            failed.remove(&id);
            staged.insert(id, batch);
            outcomes.push(ChangeOutcome::Applied { version });
        }
        inner.batches.extend(staged);
        inner.inbox.extend(inbox);
        inner.outbox.extend(outbox);
        inner.snapshots.extend(snapshots);
        Ok(outcomes)
    }

    async fn inbox_contains(&self, event_id: Uuid) -> StoreResult<bool> {
        Ok(self.lock().inbox.contains(&event_id))
    }

    async fn outbox_rows(&self, key: Option<&str>) -> StoreResult<Vec<OutboxRow>> {
        Ok(self
            .lock()
            .outbox
            .iter()
            .filter(|r| key.is_none_or(|k| k == r.key))
            .cloned()
            .collect())
    }

    async fn configuration_snapshots(&self, id: &str) -> StoreResult<Vec<Value>> {
        Ok(self
            .lock()
            .snapshots
            .iter()
            .filter(|(b, _)| b == id)
            .map(|(_, s)| s.clone())
            .collect())
    }

    async fn claim_outbox(
        &self,
        keys: i64,
        lease: std::time::Duration,
    ) -> StoreResult<Vec<OutboxRow>> {
        let mut inner = self.lock();
        let now = chrono::Utc::now();
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let mut heads: Vec<String> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for row in inner.outbox.iter().filter(|r| r.published_at.is_none()) {
            if !seen.insert(row.key.as_str()) {
                continue;
            }
            let free = row.claimed_until.is_none_or(|t| t < now);
            if free && row.next_attempt_at <= now && (heads.len() as i64) < keys {
                heads.push(row.key.clone());
            }
        }
        let mut claimed = Vec::new();
        for row in inner.outbox.iter_mut() {
            let free = row.claimed_until.is_none_or(|t| t < now);
            if row.published_at.is_none() && free && heads.contains(&row.key) {
                row.claimed_until = Some(until);
                claimed.push(row.clone());
            }
        }
        Ok(claimed)
    }

    async fn settle_outbox(
        &self,
        published: &[Uuid],
        failed: &[(Uuid, String, Timestamp)],
        released: &[Uuid],
    ) -> StoreResult<()> {
        let mut inner = self.lock();
        let now = chrono::Utc::now();
        for row in inner.outbox.iter_mut() {
            if published.contains(&row.id) {
                row.published_at = Some(now);
                row.attempts += 1;
                row.last_error = None;
                row.claimed_until = None;
            } else if let Some((_, error, next)) = failed.iter().find(|f| f.0 == row.id) {
                row.attempts += 1;
                row.last_error = Some(error.clone());
                row.next_attempt_at = *next;
                row.claimed_until = None;
            } else if released.contains(&row.id) {
                row.claimed_until = None;
            }
        }
        Ok(())
    }

    async fn purge_outbox(&self, before: Timestamp, limit: i64) -> StoreResult<u64> {
        let mut inner = self.lock();
        let mut removed = 0u64;
        inner.outbox.retain(|r| {
            let purge = (removed as i64) < limit && r.published_at.is_some_and(|p| p < before);
            removed += purge as u64;
            !purge
        });
        Ok(removed)
    }

    async fn outbox_stats(&self) -> StoreResult<OutboxStats> {
        let inner = self.lock();
        let now = chrono::Utc::now();
        let pending: Vec<&OutboxRow> = inner
            .outbox
            .iter()
            .filter(|r| r.published_at.is_none())
            .collect();
        let oldest = pending.iter().map(|r| r.created_at).min();
        Ok(OutboxStats {
            unpublished: pending.len() as i64,
            oldest_unpublished_age_seconds: oldest
                .map(|t| (now - t).num_milliseconds() as f64 / 1000.0)
                .unwrap_or(0.0),
        })
    }

    fn inject_fault(&self, fault: Fault) {
        self.lock().fault = Some(fault);
    }
}
