//! Kafka out: the outbox relay. Each pass leases a bounded number of rows
//! (keeping each key's order), hands them all to the idempotent producer in
//! order without waiting between them (the producer keeps each partition's
//! order, and a gap in a sequence is a fatal error that replaces the producer
//! instead of reordering), waits for the acknowledgements, and marks the rows
//! it still holds. The lease is renewed while the pass runs. Housekeeping
//! (backlog figures, purges of published rows and old inbox rows) runs on its
//! own timer, busy or not.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::config::{KafkaSettings, RelaySettings};
use crate::contracts::topics::SOURCE_SERVICE;
use crate::contracts::{time, Timestamp};
use crate::health::Health;
use crate::kafka::ProducerHandle;
use crate::metrics::{Metrics, SERVICE};
use crate::store::{OutboxRow, PublishFailure, Repository, StoreResult};
use crate::throttle::Throttled;

/// The Kafka headers of a published row.
pub fn headers(row: &OutboxRow) -> OwnedHeaders {
    let event_id = row.id.to_string();
    let trace_id = row.correlation_id.to_string();
    let occurred_at = time::format(&row.created_at);
    let mut headers = OwnedHeaders::new_with_capacity(8);
    for (key, value) in [
        ("event_id", event_id.as_str()),
        ("event_type", row.event_type.as_str()),
        ("trace_id", trace_id.as_str()),
        ("source_service", SOURCE_SERVICE),
        ("schema_version", "1"),
        ("occurred_at", occurred_at.as_str()),
        ("content_type", "application/json"),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    if let Some(tp) = &row.traceparent {
        headers = headers.insert(Header {
            key: "traceparent",
            value: Some(tp.as_str()),
        });
    }
    headers
}

fn raw_headers(pairs: &[(String, Vec<u8>)]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(pairs.len());
    for (key, value) in pairs {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_slice()),
        });
    }
    headers
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub claimed: usize,
    pub published: usize,
    pub failed: usize,
}

/// A wake-up source for the relay.
#[async_trait::async_trait]
pub trait Wake: Send {
    async fn wait(&mut self);
}

/// Waits on `LISTEN bos_outbox` (rows committed by any process).
pub struct PgWake(sqlx::postgres::PgListener);

impl PgWake {
    pub async fn listen(pool: &sqlx::PgPool) -> Result<Self, sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen("bos_outbox").await?;
        Ok(Self(listener))
    }
}

#[async_trait::async_trait]
impl Wake for PgWake {
    async fn wait(&mut self) {
        // A lost connection is re-established by the listener; notifications sent
        // meanwhile are lost, so wake up (and look) after it comes back.
        if let Err(e) = self.0.recv().await {
            tracing::debug!(error = %e, "outbox listener interrupted");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Wakes on an in-process notification (commits of this process).
pub struct NotifyWake(pub Arc<Notify>);

#[async_trait::async_trait]
impl Wake for NotifyWake {
    async fn wait(&mut self) {
        self.0.notified().await;
    }
}

/// Either of two wake-ups.
pub struct BothWake(pub Box<dyn Wake>, pub Box<dyn Wake>);

#[async_trait::async_trait]
impl Wake for BothWake {
    async fn wait(&mut self) {
        tokio::select! {
            () = self.0.wait() => {}
            () = self.1.wait() => {}
        }
    }
}

/// Publishes the outbox.
pub struct Relay {
    pub id: Uuid,
    repo: Arc<dyn Repository>,
    producer: Arc<ProducerHandle>,
    kafka: KafkaSettings,
    settings: RelaySettings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    errors: Throttled,
}

impl Relay {
    pub fn new(
        repo: Arc<dyn Repository>,
        producer: Arc<ProducerHandle>,
        kafka: KafkaSettings,
        settings: RelaySettings,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            id: Uuid::new_v4(),
            repo,
            producer,
            kafka,
            settings,
            metrics,
            health,
            errors: Throttled::new(Duration::from_secs(10)),
        }
    }

    fn backoff(&self, attempts: i32) -> chrono::Duration {
        let factor = 2u32.saturating_pow(u32::try_from(attempts.clamp(0, 20)).unwrap_or(20));
        let delay = self
            .settings
            .retry_initial
            .saturating_mul(factor)
            .min(self.settings.retry_max);
        chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX)
    }

    /// One claim → produce → settle pass.
    pub async fn publish_once(&self) -> StoreResult<Pass> {
        match self.deliver().await? {
            Some(delivered) => self.settle(delivered).await,
            None => Ok(Pass::default()),
        }
    }

    /// Claims rows and publishes them, up to their acknowledgements; `None`
    /// when there was nothing to claim.
    async fn deliver(&self) -> StoreResult<Option<Delivered>> {
        let started = Instant::now();
        let pass_started = chrono::Utc::now();
        let rows = self
            .repo
            .claim_outbox(self.id, self.settings.batch_size, self.settings.lease)
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        self.metrics.stage("claimed", started.elapsed());
        for row in &rows {
            let waited = (pass_started - row.created_at).to_std().unwrap_or_default();
            self.metrics.stage("relay_woke", waited);
        }
        self.health.relay_pass_started();
        let mut delivered = self.publish_rows(&rows).await;
        delivered.started = started;
        Ok(Some(delivered))
    }

    async fn publish_rows(&self, rows: &[OutboxRow]) -> Delivered {
        // Keep the lease while the acknowledgements come in.
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let (done_tx, mut done_rx) = watch::channel(false);
        let renewer = {
            let repo = self.repo.clone();
            let relay = self.id;
            let lease = self.settings.lease;
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(lease / 3);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = done_rx.changed() => return,
                        _ = tick.tick() => {
                            if let Err(e) = repo.renew_outbox_lease(relay, &ids, lease).await {
                                tracing::warn!(error = %e, "could not renew the outbox lease");
                            }
                        }
                    }
                }
            })
        };
        let sent = Instant::now();
        let producer = self.producer.get();
        let topics: Vec<String> = rows
            .iter()
            .map(|r| self.kafka.published(&r.topic))
            .collect();
        // Enqueue in order; a key whose row could not be enqueued sends nothing after it.
        let mut blocked: HashMap<&str, String> = HashMap::new();
        let mut pending = Vec::with_capacity(rows.len());
        for (row, topic) in rows.iter().zip(&topics) {
            if let Some(error) = blocked.get(row.key.as_str()) {
                pending.push(Err((error.clone(), false)));
                continue;
            }
            let record = match &row.raw {
                // A dead letter: the original key, bytes and headers (plus dlq.*).
                Some(raw) => {
                    let mut record = FutureRecord::to(topic)
                        .payload(raw.payload.as_slice())
                        .headers(raw_headers(&raw.headers));
                    if let Some(key) = raw.key.as_deref() {
                        record = record.key(key);
                    }
                    record
                }
                None => FutureRecord::to(topic)
                    .key(row.key.as_bytes())
                    .payload(row.payload.as_bytes())
                    .headers(headers(row)),
            };
            match producer.send_result(record) {
                Ok(delivery) => pending.push(Ok(delivery)),
                Err((e, _)) => {
                    blocked.insert(&row.key, e.to_string());
                    pending.push(Err((e.to_string(), true)));
                }
            }
        }
        self.metrics.stage("produced", sent.elapsed());
        let enqueued = Instant::now();
        let deliveries = join_all(pending.into_iter().map(|p| async move {
            match p {
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err((e.to_string(), true)),
                    Err(_) => Err(("delivery report lost".to_owned(), true)),
                },
                Err(e) => Err(e),
            }
        }))
        .await;
        self.metrics.stage("acknowledged", enqueued.elapsed());
        let acked_at = chrono::Utc::now();
        if deliveries.iter().any(Result::is_err) {
            self.producer.replace_if_fatal(&producer);
        } else {
            self.producer.mark_sent();
        }
        let now: Timestamp = chrono::Utc::now();
        let (mut published, mut failed, mut released) = (Vec::new(), Vec::new(), Vec::new());
        for (row, result) in rows.iter().zip(deliveries) {
            match result {
                Ok(()) => {
                    published.push(row.id);
                    let age = (acked_at - row.created_at).num_microseconds().unwrap_or(0);
                    self.metrics.stage(
                        "committed_to_acknowledged",
                        Duration::from_micros(u64::try_from(age.max(0)).unwrap_or(0)),
                    );
                    self.metrics
                        .outbox_events_published
                        .with_label_values(&[SERVICE, &row.event_type])
                        .inc();
                }
                Err((error, true)) => {
                    if error.contains("Unknown topic") || error.contains("UnknownTopic") {
                        self.health.topic_missing(&self.kafka.published(&row.topic));
                    }
                    self.errors.warn(&format!(
                        "publish of {} to {} failed: {error}; will retry",
                        row.id, row.topic
                    ));
                    failed.push(PublishFailure {
                        id: row.id,
                        error,
                        next_attempt_at: now + self.backoff(row.attempts),
                    });
                }
                Err((_, false)) => released.push(row.id),
            }
        }
        Delivered {
            claimed: rows.len(),
            published,
            failed,
            released,
            stop_renewing: done_tx,
            renewer,
            started: Instant::now(),
        }
    }

    /// Records what a pass delivered (only rows this relay still holds), and
    /// lets go of their lease.
    async fn settle(&self, d: Delivered) -> StoreResult<Pass> {
        let Delivered {
            claimed,
            published,
            failed,
            released,
            stop_renewing,
            renewer,
            started,
        } = d;
        let marking = Instant::now();
        let settled = self
            .repo
            .settle_outbox(self.id, &published, &failed, &released)
            .await;
        let _ = stop_renewing.send(true);
        let _ = renewer.await;
        self.health.relay_pass_ended();
        self.metrics
            .relay_pass_seconds
            .observe(started.elapsed().as_secs_f64());
        let settled = settled?;
        self.metrics.stage("marked", marking.elapsed());
        let expected = (published.len() + failed.len() + released.len()) as u64;
        if settled < expected {
            self.metrics.relay_lease_lost.inc_by(expected - settled);
            tracing::warn!(
                lost = expected - settled,
                "another relay took over rows this relay published; they are published again (same event ids)"
            );
        }
        self.metrics.relay_published.inc_by(published.len() as u64);
        self.metrics.relay_failures.inc_by(failed.len() as u64);
        Ok(Pass {
            claimed,
            published: published.len(),
            failed: failed.len(),
        })
    }

    /// Runs until `shutdown` turns true (finishing the pass in progress).
    pub async fn run(
        self,
        mut wake: Box<dyn Wake>,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut errors = 0u32;
        // The previous pass's settling runs while the next pass claims and
        // publishes (its rows stay leased, and a key's later rows wait for its
        // earlier ones to be marked, so order holds).
        let mut settling: Option<
            std::pin::Pin<Box<dyn std::future::Future<Output = StoreResult<Pass>> + Send + '_>>,
        > = None;
        while !*shutdown.borrow() {
            // A pass in flight when shutdown comes gets a few seconds to finish
            // (deliveries to a missing topic never would); an abandoned pass's
            // rows are published again once their lease runs out, same ids.
            let mut stopping = shutdown.clone();
            let previous = settling.take();
            let step = async {
                match previous {
                    Some(settle) => tokio::join!(settle, self.deliver()),
                    None => (Ok(Pass::default()), self.deliver().await),
                }
            };
            let (settled, delivered) = tokio::select! {
                r = step => r,
                () = async {
                    crate::signal::stopped(&mut stopping).await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                } => {
                    tracing::warn!("a relay pass did not finish within 5 s of shutdown; its rows are published again later");
                    break;
                }
            };
            // Rows of a key the settled pass published were not claimable
            // while it settled; nothing announces them, so look again.
            let unblocked = match settled {
                Ok(pass) => pass.claimed > 0,
                Err(e) => {
                    errors += 1;
                    self.errors
                        .warn(&format!("settling an outbox pass failed: {e}"));
                    false
                }
            };
            match delivered {
                Ok(Some(delivered)) => {
                    errors = 0;
                    settling = Some(Box::pin(self.settle(delivered)));
                    continue;
                }
                Ok(None) if unblocked && errors == 0 => continue,
                Ok(None) => {}
                Err(e) => {
                    errors += 1;
                    self.errors.warn(&format!("outbox pass failed: {e}"));
                }
            }
            let wait = if errors > 0 {
                self.settings
                    .retry_initial
                    .saturating_mul(2u32.saturating_pow(errors.min(8)))
                    .min(self.settings.retry_max)
            } else {
                self.settings.poll_interval
            };
            tokio::select! {
                _ = shutdown.changed() => {}
                () = wake.wait() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(settle) = settling {
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), settle).await {
                tracing::warn!(error = %e, "settling the last outbox pass failed; its rows are published again later");
            }
        }
        self.producer.flush(Duration::from_secs(5));
        Ok(())
    }
}

/// A pass's rows, delivered or failed, waiting to be settled; their lease is
/// renewed until then.
struct Delivered {
    claimed: usize,
    published: Vec<Uuid>,
    failed: Vec<PublishFailure>,
    released: Vec<Uuid>,
    stop_renewing: watch::Sender<bool>,
    renewer: tokio::task::JoinHandle<()>,
    started: Instant,
}

/// Backlog figures and purges, on their own timer.
pub struct Housekeeping {
    pub repo: Arc<dyn Repository>,
    pub settings: RelaySettings,
    pub metrics: Arc<Metrics>,
}

/// How many purge statements one housekeeping round may run per table.
const PURGE_ROUNDS: usize = 20;

impl Housekeeping {
    /// One round: backlog gauges, then bounded purges of published outbox rows
    /// and of inbox rows past their retention.
    pub async fn once(&self) -> StoreResult<(u64, u64)> {
        let stats = self.repo.outbox_stats().await?;
        self.metrics.outbox_backlog.set(stats.unpublished);
        self.metrics
            .outbox_oldest_age_seconds
            .set(stats.oldest_unpublished_age_seconds);
        self.metrics.outbox_failing.set(stats.failing);
        self.metrics
            .outbox_queue_depth
            .with_label_values(&[SERVICE])
            .set(stats.unpublished);
        let now = chrono::Utc::now();
        let ago =
            |d: Duration| now - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        let mut outbox = 0;
        for _ in 0..PURGE_ROUNDS {
            let n = self
                .repo
                .purge_outbox(ago(self.settings.retention), self.settings.purge_batch)
                .await?;
            outbox += n;
            if n < u64::try_from(self.settings.purge_batch).unwrap_or(0) {
                break;
            }
        }
        let mut inbox = 0;
        for _ in 0..PURGE_ROUNDS {
            let n = self
                .repo
                .purge_inbox(
                    ago(self.settings.inbox_retention),
                    self.settings.purge_batch,
                )
                .await?;
            inbox += n;
            if n < u64::try_from(self.settings.purge_batch).unwrap_or(0) {
                break;
            }
        }
        self.metrics
            .purged
            .with_label_values(&["event_outbox"])
            .inc_by(outbox);
        self.metrics
            .purged
            .with_label_values(&["processed_events"])
            .inc_by(inbox);
        Ok((outbox, inbox))
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.settings.housekeeping_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::signal::stopped(&mut shutdown) => return Ok(()),
                _ = tick.tick() => {
                    let round = tokio::select! {
                        () = crate::signal::stopped(&mut shutdown) => return Ok(()),
                        r = self.once() => r,
                    };
                    if let Err(e) = round {
                        tracing::warn!(error = %e, "housekeeping round failed; next one in {:?}", self.settings.housekeeping_interval);
                    }
                }
            }
        }
    }
}
