//! The outbox relay: leases unpublished rows, produces them with an idempotent
//! producer, and marks them published only after the broker acknowledged them.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;
use uuid::Uuid;

use crate::config::{KafkaSettings, RelaySettings};
use crate::contracts::topics::SOURCE_SERVICE;
use crate::contracts::{time, Timestamp};
use crate::metrics::Metrics;
use crate::store::{OutboxRow, Repository, StoreResult};

/// An idempotent producer (`enable.idempotence=true`, `acks=all`).
pub fn idempotent_producer(kafka: &KafkaSettings) -> rdkafka::error::KafkaResult<FutureProducer> {
    let mut config = kafka.client_config();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000");
    config.create()
}

/// The Kafka headers of a published row.
pub fn headers(row: &OutboxRow) -> OwnedHeaders {
    let event_id = row.id.to_string();
    let trace_id = row.correlation_id.to_string();
    let occurred_at = time::format(&row.created_at);
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "event_id",
            value: Some(event_id.as_str()),
        })
        .insert(Header {
            key: "event_type",
            value: Some(row.event_type.as_str()),
        })
        .insert(Header {
            key: "trace_id",
            value: Some(trace_id.as_str()),
        })
        .insert(Header {
            key: "source_service",
            value: Some(SOURCE_SERVICE),
        })
        .insert(Header {
            key: "schema_version",
            value: Some("1"),
        })
        .insert(Header {
            key: "occurred_at",
            value: Some(occurred_at.as_str()),
        })
        .insert(Header {
            key: "content_type",
            value: Some("application/json"),
        });
    match &row.traceparent {
        Some(tp) => headers.insert(Header {
            key: "traceparent",
            value: Some(tp.as_str()),
        }),
        None => headers,
    }
}

/// Publishes the outbox.
pub struct Relay {
    repo: Arc<dyn Repository>,
    producer: FutureProducer,
    kafka: KafkaSettings,
    settings: RelaySettings,
    metrics: Arc<Metrics>,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub published: usize,
    pub failed: usize,
}

impl Relay {
    pub fn new(
        repo: Arc<dyn Repository>,
        producer: FutureProducer,
        kafka: KafkaSettings,
        settings: RelaySettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            repo,
            producer,
            kafka,
            settings,
            metrics,
        }
    }

    fn backoff(&self, attempts: i32) -> chrono::Duration {
        let factor = 2u32.saturating_pow(attempts.clamp(0, 20) as u32);
        let delay = self
            .settings
            .retry_initial
            .saturating_mul(factor)
            .min(self.settings.retry_max);
        chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX)
    }

    async fn produce(&self, row: &OutboxRow) -> Result<(), String> {
        let topic = self.kafka.topic(&row.topic);
        let payload = row.payload.to_string();
        let record = FutureRecord::to(&topic)
            .key(&row.key)
            .payload(&payload)
            .headers(headers(row));
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.to_string())
    }

    /// One claim → produce → settle pass.
    pub async fn publish_once(&self) -> StoreResult<Pass> {
        let started = std::time::Instant::now();
        let rows = self
            .repo
            .claim_outbox(self.settings.batch_size, self.settings.lease)
            .await?;
        if rows.is_empty() {
            return Ok(Pass::default());
        }
        // Keys publish concurrently; the rows of one key one after another, and
        // a key stops at its first failure so nothing overtakes the failed row.
        let mut by_key: Vec<Vec<&OutboxRow>> = Vec::new();
        let mut index: std::collections::HashMap<&str, usize> = Default::default();
        for row in &rows {
            let slot = *index.entry(row.key.as_str()).or_insert_with(|| {
                by_key.push(Vec::new());
                by_key.len() - 1
            });
            by_key[slot].push(row);
        }
        let chains = by_key.into_iter().map(|chain| async move {
            let mut results = Vec::with_capacity(chain.len());
            let mut failed = false;
            for row in chain {
                let result = if failed {
                    None
                } else {
                    Some(self.produce(row).await)
                };
                failed |= matches!(result, Some(Err(_)));
                results.push((row, result));
            }
            results
        });
        let now: Timestamp = chrono::Utc::now();
        let (mut published, mut failed, mut released): (Vec<Uuid>, Vec<_>, Vec<Uuid>) =
            Default::default();
        for (row, result) in join_all(chains).await.into_iter().flatten() {
            match result {
                Some(Ok(())) => published.push(row.id),
                Some(Err(error)) => {
                    tracing::warn!(event_id = %row.id, topic = %row.topic, %error, "publish failed; will retry");
                    failed.push((row.id, error, now + self.backoff(row.attempts)));
                }
                None => released.push(row.id),
            }
        }
        self.repo
            .settle_outbox(&published, &failed, &released)
            .await?;
        self.metrics
            .relay_publish_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.relay_published.inc_by(published.len() as u64);
        self.metrics.relay_failures.inc_by(failed.len() as u64);
        Ok(Pass {
            published: published.len(),
            failed: failed.len(),
        })
    }

    /// Deletes published rows past their retention, in small batches.
    pub async fn purge(&self) -> StoreResult<u64> {
        let before = chrono::Utc::now()
            - chrono::Duration::from_std(self.settings.retention).unwrap_or(chrono::Duration::MAX);
        self.repo
            .purge_outbox(before, self.settings.purge_batch)
            .await
    }

    /// Runs until `shutdown` turns true. `wake` is notified when rows are inserted.
    pub async fn run(self, mut wake: Box<dyn Wake>, mut shutdown: watch::Receiver<bool>) {
        let mut last_purge = std::time::Instant::now();
        let mut last_stats: Option<std::time::Instant> = None;
        let mut errors = 0u32;
        while !*shutdown.borrow() {
            match self.publish_once().await {
                Ok(pass) if pass.published + pass.failed > 0 => {
                    errors = 0;
                    continue;
                }
                Ok(_) => errors = 0,
                Err(e) => {
                    errors += 1;
                    tracing::warn!(error = %e, "outbox pass failed");
                }
            }
            // Backlog figures at most every 15 s: an idle relay asks almost nothing.
            if last_stats.is_none_or(|t| t.elapsed() > Duration::from_secs(15)) {
                last_stats = Some(std::time::Instant::now());
                match self.repo.outbox_stats().await {
                    Ok(stats) => {
                        self.metrics.outbox_backlog.set(stats.unpublished);
                        self.metrics
                            .outbox_oldest_age_seconds
                            .set(stats.oldest_unpublished_age_seconds);
                    }
                    Err(e) => tracing::debug!(error = %e, "outbox stats unavailable"),
                }
            }
            if last_purge.elapsed() > Duration::from_secs(60) {
                last_purge = std::time::Instant::now();
                if let Err(e) = self.purge().await {
                    tracing::warn!(error = %e, "outbox purge failed");
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
                _ = wake.wait() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// A wake-up source for the relay (PostgreSQL `LISTEN`, or an in-process signal).
#[async_trait::async_trait]
pub trait Wake: Send {
    async fn wait(&mut self);
}

/// Waits on `LISTEN bos_outbox`.
pub struct PgWake(pub sqlx::postgres::PgListener);

#[async_trait::async_trait]
impl Wake for PgWake {
    async fn wait(&mut self) {
        if let Err(e) = self.0.recv().await {
            tracing::warn!(error = %e, "outbox listener failed; relying on the poll");
            std::future::pending::<()>().await;
        }
    }
}

impl PgWake {
    pub async fn listen(pool: &sqlx::PgPool) -> Result<Self, sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen("bos_outbox").await?;
        Ok(Self(listener))
    }
}

/// Wakes on an in-process notification (the in-memory store).
pub struct NotifyWake(pub Arc<tokio::sync::Notify>);

#[async_trait::async_trait]
impl Wake for NotifyWake {
    async fn wait(&mut self) {
        self.0.notified().await;
    }
}
