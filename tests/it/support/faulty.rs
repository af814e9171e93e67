//! A repository decorator that injects faults into the unit of work of chosen
//! batches: transient or permanent errors, a panic, or a commit that never
//! returns. Everything else goes to the real repository underneath.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bos::domain::Batch;
use bos::store::{
    CommitError, Committed, EnumDomains, OutboxRow, OutboxStats, PhaseStatusChange, PublishFailure,
    Repository, StoreError, StoreResult, UnitOfWork,
};
use serde_json::Value;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails like a lost connection (retried with backoff).
    Transient,
    /// Fails like data the database refuses (isolated and dead-lettered).
    Permanent,
    /// Panics in the calling task.
    Panic,
    /// Never returns.
    Hang,
}

#[derive(Debug)]
struct Rule {
    batch: String,
    fault: Fault,
    remaining: usize,
}

#[derive(Debug)]
pub struct Faulty {
    inner: Arc<dyn Repository>,
    rules: Mutex<Vec<Rule>>,
    injected: Mutex<usize>,
    seen: Mutex<HashSet<String>>,
}

impl Faulty {
    pub fn new(inner: Arc<dyn Repository>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            rules: Mutex::new(Vec::new()),
            injected: Mutex::new(0),
            seen: Mutex::new(HashSet::new()),
        })
    }

    /// The next `times` units of work that touch `batch` meet `fault`.
    pub fn inject(&self, batch: &str, fault: Fault, times: usize) {
        self.rules.lock().unwrap().push(Rule {
            batch: batch.to_owned(),
            fault,
            remaining: times,
        });
    }

    /// How many faults fired.
    pub fn injected(&self) -> usize {
        *self.injected.lock().unwrap()
    }

    fn fault_for(&self, unit: &UnitOfWork) -> Option<Fault> {
        let touched: HashSet<&str> = unit
            .writes
            .iter()
            .map(|w| w.batch.id.as_str())
            .chain(unit.inbox.iter().map(|r| r.batch_id.as_str()))
            .collect();
        self.seen
            .lock()
            .unwrap()
            .extend(touched.iter().map(|s| (*s).to_owned()));
        let mut rules = self.rules.lock().unwrap();
        let rule = rules
            .iter_mut()
            .find(|r| r.remaining > 0 && touched.contains(r.batch.as_str()))?;
        rule.remaining -= 1;
        *self.injected.lock().unwrap() += 1;
        Some(rule.fault)
    }
}

#[async_trait]
impl Repository for Faulty {
    async fn migrate(&self) -> StoreResult<()> {
        self.inner.migrate().await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    async fn enum_domains(&self) -> StoreResult<EnumDomains> {
        self.inner.enum_domains().await
    }
    async fn get_batches(&self, ids: &[String]) -> StoreResult<Vec<Batch>> {
        self.inner.get_batches(ids).await
    }
    async fn processed(&self, ids: &[Uuid]) -> StoreResult<std::collections::HashSet<Uuid>> {
        self.inner.processed(ids).await
    }
    async fn commit(&self, unit: UnitOfWork) -> Result<Committed, CommitError> {
        match self.fault_for(&unit) {
            None => self.inner.commit(unit).await,
            Some(Fault::Transient) => Err(CommitError::Store(StoreError::Injected(
                "injected transient failure (connection lost)".into(),
            ))),
            Some(Fault::Permanent) => Err(CommitError::Store(StoreError::Injected(
                "injected permanent failure: the database refuses this data".into(),
            ))),
            Some(Fault::Panic) => panic!("injected panic in the unit of work"),
            Some(Fault::Hang) => {
                tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
                self.inner.commit(unit).await
            }
        }
    }
    async fn claim_outbox(
        &self,
        relay: Uuid,
        limit: i64,
        lease: Duration,
    ) -> StoreResult<Vec<OutboxRow>> {
        self.inner.claim_outbox(relay, limit, lease).await
    }
    async fn renew_outbox_lease(
        &self,
        relay: Uuid,
        ids: &[Uuid],
        lease: Duration,
    ) -> StoreResult<u64> {
        self.inner.renew_outbox_lease(relay, ids, lease).await
    }
    async fn settle_outbox(
        &self,
        relay: Uuid,
        published: &[Uuid],
        failed: &[PublishFailure],
        released: &[Uuid],
    ) -> StoreResult<u64> {
        self.inner
            .settle_outbox(relay, published, failed, released)
            .await
    }
    async fn purge_outbox(
        &self,
        before: bos::contracts::Timestamp,
        limit: i64,
    ) -> StoreResult<u64> {
        self.inner.purge_outbox(before, limit).await
    }
    async fn purge_inbox(&self, before: bos::contracts::Timestamp, limit: i64) -> StoreResult<u64> {
        self.inner.purge_inbox(before, limit).await
    }
    async fn outbox_stats(&self) -> StoreResult<OutboxStats> {
        self.inner.outbox_stats().await
    }
    async fn outbox_rows(&self, key: Option<&str>) -> StoreResult<Vec<OutboxRow>> {
        self.inner.outbox_rows(key).await
    }
    async fn stuck_outbox_rows(&self, limit: i64) -> StoreResult<Vec<OutboxRow>> {
        self.inner.stuck_outbox_rows(limit).await
    }
    async fn phase_history(&self, batch_id: &str) -> StoreResult<Vec<PhaseStatusChange>> {
        self.inner.phase_history(batch_id).await
    }
    async fn configuration_snapshots(&self, batch_id: &str) -> StoreResult<Vec<Value>> {
        self.inner.configuration_snapshots(batch_id).await
    }
    fn pool_status(&self) -> Option<bos::store::PoolStatus> {
        self.inner.pool_status()
    }
}
