//! In-memory repository: the same semantics as PostgreSQL, for tests and the demo.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use uuid::Uuid;

use super::{
    rust_enum_domains, CommitError, Committed, EnumDomains, OutboxRow, OutboxStats,
    PhaseStatusChange, PublishFailure, Repository, StoreResult, UnitOfWork,
};
use crate::contracts::Timestamp;
use crate::domain::Batch;

#[derive(Debug, Default)]
struct Inner {
    batches: HashMap<String, Batch>,
    outbox: Vec<OutboxRow>,
    next_seq: i64,
    inbox: HashMap<Uuid, Timestamp>,
    phase_log: Vec<PhaseStatusChange>,
    snapshots: Vec<(String, Value)>,
}

#[derive(Debug, Default)]
pub struct MemoryRepository {
    inner: Mutex<Inner>,
}

fn after(now: Timestamp, d: Duration) -> Timestamp {
    now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl MemoryRepository {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied unit:
        // `commit` checks everything before it touches `Inner`.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

    async fn get_batches(&self, ids: &[String]) -> StoreResult<Vec<Batch>> {
        let inner = self.lock();
        Ok(ids
            .iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|id| inner.batches.get(id).cloned())
            .collect())
    }

    async fn processed(&self, ids: &[Uuid]) -> StoreResult<HashSet<Uuid>> {
        let inner = self.lock();
        Ok(ids
            .iter()
            .filter(|id| inner.inbox.contains_key(id))
            .copied()
            .collect())
    }

    async fn commit(&self, unit: UnitOfWork) -> Result<Committed, CommitError> {
        let mut inner = self.lock();
        let now = chrono::Utc::now();
        let mut committed = Committed::default();
        let mut winners = BTreeSet::new();
        for w in &unit.writes {
            let id = &w.batch.id;
            match (w.expected_version, inner.batches.get(id)) {
                (None, Some(_)) => {
                    committed.conflicts.insert(id.clone());
                }
                (None, None) => {
                    committed.versions.insert(id.clone(), 1);
                    winners.insert(id.clone());
                }
                (Some(_), None) => {
                    committed.missing.insert(id.clone());
                }
                (Some(expected), Some(current)) if current.version != expected => {
                    committed.conflicts.insert(id.clone());
                }
                (Some(expected), Some(_)) => {
                    committed.versions.insert(id.clone(), expected + 1);
                    winners.insert(id.clone());
                }
            }
        }
        let written = unit.batch_ids();
        let keeps = |batch_id: &str| winners.contains(batch_id) || !written.contains(batch_id);
        let mut raced = BTreeSet::new();
        for r in unit.inbox.iter().filter(|r| keeps(&r.batch_id)) {
            if inner.inbox.contains_key(&r.event_id) {
                if winners.contains(&r.batch_id) {
                    raced.insert(r.event_id);
                } else {
                    committed.already_processed.insert(r.event_id);
                }
            }
        }
        if !raced.is_empty() {
            return Err(CommitError::Processed(raced));
        }
        let mut ids: HashSet<Uuid> = HashSet::new();
        for m in unit
            .outbox
            .iter()
            .filter(|m| m.raw.is_none() && keeps(&m.key))
        {
            if !ids.insert(m.event_id) || inner.outbox.iter().any(|r| r.id == m.event_id) {
                return Err(CommitError::Store(super::StoreError::Constraint(format!(
                    "outbox row {} exists already",
                    m.event_id
                ))));
            }
        }
        // Nothing can fail from here: apply.
        for w in unit.writes {
            if !winners.contains(&w.batch.id) {
                continue;
            }
            let mut batch = w.batch;
            batch.version = committed.versions[&batch.id];
            for t in w.transitions {
                inner.phase_log.push(PhaseStatusChange {
                    batch_id: batch.id.clone(),
                    phase: t.phase,
                    old_status: t.from,
                    new_status: t.to,
                    correlation_id: Some(t.correlation_id),
                    completed_at: t.completed_at,
                });
            }
            for (_, snapshot) in w.snapshots {
                inner.snapshots.push((batch.id.clone(), snapshot));
            }
            inner.batches.insert(batch.id.clone(), batch);
        }
        for r in unit.inbox.into_iter().filter(|r| keeps(&r.batch_id)) {
            inner.inbox.entry(r.event_id).or_insert(now);
        }
        for m in unit
            .outbox
            .into_iter()
            .filter(|m| if m.raw.is_some() { true } else { keeps(&m.key) })
        {
            if m.raw.is_some() && inner.outbox.iter().any(|r| r.id == m.event_id) {
                continue; // the same letter again
            }
            inner.next_seq += 1;
            let seq = inner.next_seq;
            inner.outbox.push(OutboxRow {
                id: m.event_id,
                seq,
                topic: m.topic.to_owned(),
                key: m.key,
                event_type: m.topic.to_owned(),
                correlation_id: m.correlation_id,
                payload: m.payload,
                raw: m.raw,
                traceparent: m.traceparent,
                created_at: m.occurred_at,
                published_at: None,
                attempts: 0,
                next_attempt_at: now,
                last_error: None,
                claimed_by: None,
                claimed_until: None,
            });
        }
        Ok(committed)
    }

    async fn claim_outbox(
        &self,
        relay: Uuid,
        limit: i64,
        lease: Duration,
    ) -> StoreResult<Vec<OutboxRow>> {
        let mut inner = self.lock();
        let now = chrono::Utc::now();
        let limit = usize::try_from(limit).unwrap_or(0);
        let mut heads: HashSet<String> = HashSet::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for row in inner.outbox.iter().filter(|r| r.published_at.is_none()) {
            if !seen.insert(row.key.as_str()) {
                continue;
            }
            let free = row.claimed_until.is_none_or(|t| t < now);
            if free && row.next_attempt_at <= now && heads.len() < limit {
                heads.insert(row.key.clone());
            }
        }
        let mut claimed = Vec::new();
        for row in &mut inner.outbox {
            let free = row.claimed_until.is_none_or(|t| t < now);
            if claimed.len() < limit
                && row.published_at.is_none()
                && free
                && heads.contains(&row.key)
            {
                row.claimed_by = Some(relay);
                row.claimed_until = Some(after(now, lease));
                claimed.push(row.clone());
            }
        }
        Ok(claimed)
    }

    async fn renew_outbox_lease(
        &self,
        relay: Uuid,
        ids: &[Uuid],
        lease: Duration,
    ) -> StoreResult<u64> {
        let mut inner = self.lock();
        let until = after(chrono::Utc::now(), lease);
        let mut n = 0;
        for row in inner.outbox.iter_mut().filter(|r| {
            ids.contains(&r.id) && r.claimed_by == Some(relay) && r.published_at.is_none()
        }) {
            row.claimed_until = Some(until);
            n += 1;
        }
        Ok(n)
    }

    async fn settle_outbox(
        &self,
        relay: Uuid,
        published: &[Uuid],
        failed: &[PublishFailure],
        released: &[Uuid],
    ) -> StoreResult<u64> {
        let mut inner = self.lock();
        let now = chrono::Utc::now();
        let failed: BTreeMap<Uuid, &PublishFailure> = failed.iter().map(|f| (f.id, f)).collect();
        let mut n = 0;
        for row in &mut inner.outbox {
            if row.claimed_by != Some(relay) {
                continue;
            }
            if published.contains(&row.id) && row.published_at.is_none() {
                row.published_at = Some(now);
                row.attempts += 1;
                row.last_error = None;
            } else if let Some(f) = failed.get(&row.id).filter(|_| row.published_at.is_none()) {
                row.attempts += 1;
                row.last_error = Some(f.error.clone());
                row.next_attempt_at = f.next_attempt_at;
            } else if !released.contains(&row.id) {
                continue;
            }
            row.claimed_by = None;
            row.claimed_until = None;
            n += 1;
        }
        Ok(n)
    }

    async fn purge_outbox(&self, before: Timestamp, limit: i64) -> StoreResult<u64> {
        let mut inner = self.lock();
        let mut removed = 0i64;
        inner.outbox.retain(|r| {
            let purge = removed < limit && r.published_at.is_some_and(|p| p < before);
            removed += i64::from(purge);
            !purge
        });
        Ok(u64::try_from(removed).unwrap_or(0))
    }

    async fn purge_inbox(&self, before: Timestamp, limit: i64) -> StoreResult<u64> {
        let mut inner = self.lock();
        let old: Vec<Uuid> = inner
            .inbox
            .iter()
            .filter(|(_, &at)| at < before)
            .map(|(&id, _)| id)
            .take(usize::try_from(limit).unwrap_or(0))
            .collect();
        for id in &old {
            inner.inbox.remove(id);
        }
        Ok(old.len() as u64)
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
                .map_or(0.0, |t| (now - t).num_milliseconds() as f64 / 1000.0),
            failing: pending.iter().filter(|r| r.attempts > 0).count() as i64,
        })
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

    async fn stuck_outbox_rows(&self, limit: i64) -> StoreResult<Vec<OutboxRow>> {
        let mut rows: Vec<OutboxRow> = self
            .lock()
            .outbox
            .iter()
            .filter(|r| r.published_at.is_none() && r.attempts > 0)
            .cloned()
            .collect();
        rows.sort_by_key(|r| (std::cmp::Reverse(r.attempts), r.seq));
        rows.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(rows)
    }

    async fn phase_history(&self, batch_id: &str) -> StoreResult<Vec<PhaseStatusChange>> {
        Ok(self
            .lock()
            .phase_log
            .iter()
            .filter(|c| c.batch_id == batch_id)
            .cloned()
            .collect())
    }

    async fn configuration_snapshots(&self, batch_id: &str) -> StoreResult<Vec<Value>> {
        Ok(self
            .lock()
            .snapshots
            .iter()
            .filter(|(b, _)| b == batch_id)
            .map(|(_, s)| s.clone())
            .collect())
    }
}
