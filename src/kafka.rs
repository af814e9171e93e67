//! Kafka clients as bos builds them: bos's defaults first, the operator's
//! librdkafka properties over them (the guarded ones are refused when the
//! configuration loads), then the settings the delivery guarantees need.
//! Also the producer handle that replaces a producer after a fatal error, and
//! the start-up check of every topic bos consumes and produces.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::KafkaSettings;
use crate::contracts::topics;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::throttle::Throttled;

fn base(kafka: &KafkaSettings, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("client.id", "bos");
    for (key, value) in defaults {
        config.set(*key, *value);
    }
    for (key, value) in &kafka.librdkafka {
        config.set(key, value);
    }
    config.set("bootstrap.servers", &kafka.bootstrap_servers);
    config
}

/// A plain client configuration: the bootstrap servers and the operator's properties.
pub fn client_config(kafka: &KafkaSettings) -> ClientConfig {
    base(kafka, &[])
}

/// Consumer settings: offsets stored by bos only after a record is done, and
/// committed by librdkafka in the background (and on revoke and close).
pub fn consumer_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = base(
        kafka,
        &[
            ("auto.offset.reset", "earliest"),
            ("auto.commit.interval.ms", "1000"),
            ("partition.assignment.strategy", "cooperative-sticky"),
            // A topic created after start is consumed within this interval.
            ("topic.metadata.refresh.interval.ms", "10000"),
            // Low per-hop latency: do not let the broker sit on a fetch.
            ("fetch.wait.max.ms", "10"),
            // Bounded memory: at most this much prefetched per partition (a
            // poll applies a few hundred records; more prefetch only costs RSS).
            ("queued.max.messages.kbytes", "2048"),
            // …and fetching resumes soon after the queue drains (the default
            // waits a whole second).
            ("fetch.queue.backoff.ms", "10"),
        ],
    );
    config
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    config
}

/// Producer settings: idempotent, every replica acknowledges, and a gap in a
/// partition's sequence (an earlier message lost, a later one delivered) is a
/// fatal error instead of a silent reordering.
pub fn producer_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = base(
        kafka,
        &[
            ("linger.ms", "1"),
            ("message.timeout.ms", "30000"),
            ("topic.metadata.refresh.interval.ms", "10000"),
        ],
    );
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("enable.gapless.guarantee", "true");
    config
}

/// A partition assignment change, as the consumer's context reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// Logs rebalances and commit failures, and tells the consumer loop about them.
pub struct ConsumerEvents {
    pub assignments: mpsc::UnboundedSender<Assignment>,
    pub metrics: Arc<Metrics>,
    errors: Throttled,
    logs: Throttled,
}

/// librdkafka's own log lines: warnings and worse at most once per interval
/// (a broker that is down is reported by every broker thread, every few ms),
/// the rest at debug level.
fn client_log(
    throttle: &Throttled,
    client: &str,
    level: RDKafkaLogLevel,
    fac: &str,
    message: &str,
) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error
        | RDKafkaLogLevel::Warning => {
            throttle.warn(&format!("librdkafka {client} {fac}: {message}"));
        }
        _ => tracing::debug!(target: "librdkafka", client, fac, "{message}"),
    }
}

impl ConsumerEvents {
    pub fn new(assignments: mpsc::UnboundedSender<Assignment>, metrics: Arc<Metrics>) -> Self {
        Self {
            assignments,
            metrics,
            errors: Throttled::new(Duration::from_secs(10)),
            logs: Throttled::new(Duration::from_secs(10)),
        }
    }
}

impl ClientContext for ConsumerEvents {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        client_log(&self.logs, "consumer", level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics
            .kafka_client_errors
            .with_label_values(&["consumer"])
            .inc();
        self.errors
            .warn(&format!("Kafka consumer error: {error}: {reason}"));
    }
}

impl ConsumerContext for ConsumerEvents {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked = partitions(tpl);
                tracing::info!(partitions = ?revoked, "partitions revoked");
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                let _ = self.assignments.send(Assignment::Revoked(revoked));
            }
            Rebalance::Assign(tpl) => {
                let assigned = partitions(tpl);
                tracing::info!(partitions = ?assigned, "partitions assigned");
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                let _ = self.assignments.send(Assignment::Assigned(assigned));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            // A commit with nothing stored reports "no offset"; that is no failure.
            if !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
                self.metrics.commit_failures.inc();
                self.errors.warn(&format!(
                    "offset commit failed for {:?}: {e} (retried with the next commit)",
                    partitions(offsets)
                ));
            }
        }
    }
}

/// Reports producer errors (fatal ones loudly).
pub struct ProducerEvents {
    metrics: Arc<Metrics>,
    errors: Throttled,
    logs: Throttled,
}

impl ClientContext for ProducerEvents {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        client_log(&self.logs, "producer", level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics
            .kafka_client_errors
            .with_label_values(&["producer"])
            .inc();
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            tracing::error!(%error, reason, "fatal producer error");
        } else {
            self.errors
                .warn(&format!("Kafka producer error: {error}: {reason}"));
        }
    }
}

impl rdkafka::producer::ProducerContext for ProducerEvents {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

pub type BosProducer = FutureProducer<ProducerEvents>;

/// The producer the relay and the dead-letter path share. After a fatal error
/// (librdkafka's idempotent producer is then unusable: every send fails) it is
/// replaced by a fresh one; rows that were in flight are re-sent under their
/// stable ids. Not ready until a send through the new producer succeeded.
pub struct ProducerHandle {
    config: ClientConfig,
    current: RwLock<Arc<BosProducer>>,
    healthy: AtomicBool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ProducerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProducerHandle")
    }
}

impl ProducerHandle {
    pub fn new(kafka: &KafkaSettings, metrics: Arc<Metrics>) -> KafkaResult<Self> {
        let config = producer_config(kafka);
        let producer = Self::create(&config, &metrics)?;
        Ok(Self {
            config,
            current: RwLock::new(Arc::new(producer)),
            healthy: AtomicBool::new(true),
            metrics,
        })
    }

    fn create(config: &ClientConfig, metrics: &Arc<Metrics>) -> KafkaResult<BosProducer> {
        config.create_with_context(ProducerEvents {
            metrics: metrics.clone(),
            errors: Throttled::new(Duration::from_secs(10)),
            logs: Throttled::new(Duration::from_secs(10)),
        })
    }

    /// The producer to send with now.
    pub fn get(&self) -> Arc<BosProducer> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn mark_sent(&self) {
        self.healthy.store(true, Ordering::Relaxed);
    }

    /// Replaces `failed` when it hit a fatal error; true when it did.
    pub fn replace_if_fatal(&self, failed: &Arc<BosProducer>) -> bool {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return false;
        };
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !Arc::ptr_eq(&current, failed) {
            return true; // another sender replaced it already
        }
        match Self::create(&self.config, &self.metrics) {
            Ok(fresh) => {
                tracing::error!(
                    ?code,
                    reason,
                    "producer hit a fatal error; replaced it with a new one"
                );
                *current = Arc::new(fresh);
                self.healthy.store(false, Ordering::Relaxed);
                self.metrics.producer_replacements.inc();
                true
            }
            Err(e) => {
                tracing::error!(?code, reason, error = %e, "producer hit a fatal error and could not be replaced");
                self.healthy.store(false, Ordering::Relaxed);
                false
            }
        }
    }

    /// Sends one record and waits for the broker's acknowledgement.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
        timeout: Duration,
    ) -> Result<(), KafkaError> {
        let producer = self.get();
        let mut record = FutureRecord::to(topic).payload(payload).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        match producer.send(record, timeout).await {
            Ok(_) => {
                self.mark_sent();
                Ok(())
            }
            Err((e, _)) => {
                self.replace_if_fatal(&producer);
                Err(e)
            }
        }
    }

    /// Whether the cluster answers a metadata request.
    pub async fn reachable(&self) -> bool {
        let producer = self.get();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .is_ok()
        })
        .await
        .unwrap_or(false)
    }

    /// Waits for queued messages to be delivered (bounded).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.get().flush(timeout);
    }
}

/// Every topic bos needs, prefixed: consumed, their dead-letter topics, published.
pub fn required_topics(kafka: &KafkaSettings, consume: bool) -> Vec<String> {
    let mut names = Vec::new();
    if consume {
        for t in kafka.consumed() {
            names.push(kafka.topic(t));
            names.push(kafka.published(&format!("{t}{}", topics::DLQ_SUFFIX)));
        }
    }
    for t in topics::PUBLISHED {
        names.push(kafka.published(t));
    }
    names
}

/// Looks for every topic bos needs; creates the missing dead-letter topics it
/// owns (as many partitions as their source topic) and reports the rest in
/// `health` (so `/readyz` answers 503 until they exist).
pub async fn check_topics(kafka: &KafkaSettings, consume: bool, health: &Health) {
    let wanted = required_topics(kafka, consume);
    let config = base(kafka, &[]);
    let kafka = kafka.clone();
    let found = tokio::task::spawn_blocking(move || existing_topics(&config)).await;
    let existing = match found {
        Ok(Ok(existing)) => existing,
        Ok(Err(e)) => {
            health.set_topics_unchecked(format!("topic metadata unavailable: {e}"));
            return;
        }
        Err(e) => {
            health.set_topics_unchecked(format!("topic check failed: {e}"));
            return;
        }
    };
    let mut missing: BTreeSet<String> = wanted
        .iter()
        .filter(|t| !existing.contains_key(*t))
        .cloned()
        .collect();
    // A missing dead-letter topic gets as many partitions as its source.
    let dlq: Vec<(String, i32)> = if consume {
        kafka
            .consumed()
            .into_iter()
            .map(|t| {
                (
                    kafka.published(&format!("{t}{}", topics::DLQ_SUFFIX)),
                    kafka.topic(t),
                )
            })
            .filter(|(dlq, _)| missing.contains(dlq))
            .filter_map(|(dlq, source)| existing.get(&source).map(|&n| (dlq, n)))
            .collect()
    } else {
        Vec::new()
    };
    health.set_missing_topics(missing.clone());
    if !dlq.is_empty() {
        let created =
            tokio::time::timeout(Duration::from_secs(15), create_topics(&kafka, &dlq)).await;
        match created {
            Ok(Ok(created)) => {
                for t in created {
                    tracing::info!(topic = %t, "created the missing dead-letter topic");
                    missing.remove(&t);
                }
                health.set_missing_topics(missing);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not create the missing dead-letter topics"),
            Err(_) => tracing::warn!("creating the missing dead-letter topics timed out (does the broker support CreateTopics?)"),
        }
    }
}

fn existing_topics(config: &ClientConfig) -> KafkaResult<std::collections::BTreeMap<String, i32>> {
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| {
            (
                t.name().to_owned(),
                i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
            )
        })
        .collect())
}

async fn create_topics(
    kafka: &KafkaSettings,
    topics: &[(String, i32)],
) -> KafkaResult<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = base(kafka, &[]).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| {
            NewTopic::new(
                name,
                *partitions,
                TopicReplication::Fixed(kafka.dlq_replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut created = Vec::new();
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(name) => created.push(name),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => created.push(name),
            Err((name, code)) => tracing::warn!(topic = %name, ?code, "topic not created"),
        }
    }
    Ok(created)
}
