//! Kafka in: decode → load → decide → one transaction (state + outbox + inbox)
//! → store the offset. Offsets are stored only after the transaction committed
//! (or the message was dead-lettered), and committed by librdkafka.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::config::{ConsumerSettings, KafkaSettings};
use crate::contracts::{decode, topics, Decoded};
use crate::domain::{Batch, Env, EventMeta, RandomIds, Rules, Verdict};
use crate::metrics::Metrics;
use crate::store::{Change, ChangeOutcome, InboxRecord, Repository, StoreError};

/// One consumed record, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Unprefixed topic.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Incoming {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// What became of one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Applied,
    Ignored(String),
    Duplicate,
    DeadLetter { reason: &'static str, error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("batch `{0}` kept changing underneath; retrying later")]
    Contended(String),
}

/// Namespace of event ids derived from a record's position when it carries none.
const POSITION_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2b7e_4d0a_4c55_9a3e_0b1d_8e27_f4c9);

/// The envelope facts the rules need, with stable fallbacks.
fn event_meta(record: &Incoming, decoded: &Decoded) -> EventMeta {
    let event_id = record
        .header("event_id")
        .and_then(|h| h.parse().ok())
        .or(decoded.envelope.event_id)
        .unwrap_or_else(|| {
            let position = format!("{}/{}/{}", record.topic, record.partition, record.offset);
            Uuid::new_v5(&POSITION_NAMESPACE, position.as_bytes())
        });
    let traceparent = record.header("traceparent").map(str::to_owned).or_else(|| {
        decoded
            .envelope
            .metadata
            .as_ref()
            .and_then(|m| m.get("traceparent"))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    });
    EventMeta {
        event_id,
        correlation_id: decoded
            .envelope
            .correlation_id
            .unwrap_or_else(|| Uuid::new_v5(&POSITION_NAMESPACE, event_id.as_bytes())),
        traceparent,
    }
}

/// Applies records: the part of the worker that does not touch Kafka.
pub struct Handler {
    repo: Arc<dyn Repository>,
    rules: Rules,
    max_conflict_retries: usize,
    metrics: Arc<Metrics>,
}

impl Handler {
    pub fn new(
        repo: Arc<dyn Repository>,
        rules: Rules,
        max_conflict_retries: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            repo,
            rules,
            max_conflict_retries,
            metrics,
        }
    }

    /// Applies `records` (in order) in as few transactions as conflicts allow.
    pub async fn handle(&self, records: &[Incoming]) -> Result<Vec<Outcome>, HandleError> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; records.len()];
        let mut decoded: Vec<Option<(Decoded, EventMeta)>> = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            match decode(&record.topic, record.payload.as_deref().unwrap_or_default()) {
                Ok(d) => {
                    let meta = event_meta(record, &d);
                    decoded.push(Some((d, meta)));
                }
                Err(e) => {
                    outcomes[i] = Some(Outcome::DeadLetter {
                        reason: "decode_error",
                        error: e.to_string(),
                    });
                    decoded.push(None);
                }
            }
        }
        for _ in 0..=self.max_conflict_retries {
            // Every batch this round needs, in one read.
            let mut wanted: Vec<String> = decoded
                .iter()
                .zip(&outcomes)
                .filter(|(_, outcome)| outcome.is_none())
                .filter_map(|(entry, _)| entry.as_ref().map(|(m, _)| m.event.batch_id().to_owned()))
                .collect();
            wanted.sort();
            wanted.dedup();
            let mut cache: HashMap<String, Option<Batch>> =
                wanted.iter().map(|id| (id.clone(), None)).collect();
            for batch in self.repo.get_batches(&wanted).await? {
                cache.insert(batch.id.clone(), Some(batch));
            }
            let mut changes = Vec::new();
            let mut owners = Vec::new();
            for (i, entry) in decoded.iter().enumerate() {
                let Some((message, meta)) = entry else {
                    continue;
                };
                if outcomes[i].is_some() {
                    continue;
                }
                let id = message.event.batch_id();
                let current = cache.get(id).cloned().flatten();
                let record = &records[i];
                let span = tracing::info_span!(
                    "event",
                    event_id = %meta.event_id,
                    correlation_id = %meta.correlation_id,
                    batch_id = id,
                    topic = %record.topic,
                    partition = record.partition,
                    offset = record.offset,
                );
                let mut meta = meta.clone();
                meta.traceparent =
                    crate::telemetry::continue_trace(&span, meta.traceparent.as_deref());
                let decision = span.in_scope(|| {
                    let mut ids = RandomIds;
                    let mut env = Env {
                        now: chrono::Utc::now(),
                        ids: &mut ids,
                    };
                    self.rules
                        .decide(current.as_ref(), &message.event, &meta, &mut env)
                });
                for note in &decision.notes {
                    tracing::info!(event_id = %meta.event_id, batch_id = id, "{note}");
                }
                let (Some(current), Some(mut next)) = (current, decision.batch) else {
                    if let Verdict::DeadLetter { reason, error } = decision.verdict {
                        outcomes[i] = Some(Outcome::DeadLetter { reason, error });
                    }
                    continue;
                };
                changes.push(Change {
                    batch: next.clone(),
                    expected_version: Some(current.version),
                    essays_changed: decision.essays_changed,
                    outbox: decision.messages,
                    inbox: Some(InboxRecord {
                        event_id: meta.event_id,
                        topic: record_topic(&message.event),
                    }),
                    snapshot: decision.snapshot,
                });
                owners.push((i, decision.verdict));
                next.version = current.version + 1;
                cache.insert(id.to_owned(), Some(next));
            }
            if changes.is_empty() {
                break;
            }
            let results = self.repo.apply(changes).await?;
            for ((i, verdict), result) in owners.into_iter().zip(results) {
                outcomes[i] = match result {
                    ChangeOutcome::Applied { .. } => Some(match verdict {
                        Verdict::Ignored(why) => Outcome::Ignored(why),
                        _ => Outcome::Applied,
                    }),
                    ChangeOutcome::Duplicate => Some(Outcome::Duplicate),
                    ChangeOutcome::Conflict | ChangeOutcome::NotFound => {
                        self.metrics.cas_conflicts.inc();
                        None
                    }
                };
            }
            if outcomes.iter().all(Option::is_some) {
                break;
            }
        }
        outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.ok_or_else(|| {
                    let id = decoded[i]
                        .as_ref()
                        .map(|(d, _)| d.event.batch_id().to_owned())
                        .unwrap_or_default();
                    HandleError::Contended(id)
                })
            })
            .collect()
    }
}

fn record_topic(event: &crate::contracts::InboundEvent) -> String {
    event.topic().to_owned()
}

/// The consuming side of `bos run`.
pub struct Worker {
    pub consumer: Arc<StreamConsumer>,
    pub dlq: FutureProducer,
    pub handler: Handler,
    pub kafka: KafkaSettings,
    pub settings: ConsumerSettings,
    /// Notified after each commit that wrote outbox rows (wakes an in-process relay).
    pub outbox_written: Arc<Notify>,
    pub metrics: Arc<Metrics>,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Ignored(_) => "ignored",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLetter { .. } => "dead_letter",
        }
    }
}

/// Records behind the high watermark over the consumer's assigned partitions.
fn consumer_lag(consumer: &StreamConsumer) -> rdkafka::error::KafkaResult<i64> {
    let positions = consumer.position()?;
    let mut lag = 0;
    for element in positions.elements() {
        let (_, high) = consumer.fetch_watermarks(
            element.topic(),
            element.partition(),
            Duration::from_secs(2),
        )?;
        if let rdkafka::Offset::Offset(position) = element.offset() {
            lag += (high - position).max(0);
        }
    }
    Ok(lag)
}

/// A consumer configured for manual offset storage.
pub fn consumer(kafka: &KafkaSettings) -> rdkafka::error::KafkaResult<StreamConsumer> {
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()?;
    let topics: Vec<String> = topics::CONSUMED.iter().map(|t| kafka.topic(t)).collect();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

impl Worker {
    fn detach(&self, message: &rdkafka::message::BorrowedMessage<'_>) -> Incoming {
        let headers = message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Incoming {
            topic: self.kafka.unprefixed(message.topic()).to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// Sends a record to `<topic>.dlq` with the reason, and waits for the acknowledgement.
    async fn dead_letter(
        &self,
        record: &Incoming,
        reason: &str,
        error: &str,
    ) -> Result<(), String> {
        let topic = format!("{}{}", self.kafka.topic(&record.topic), topics::DLQ_SUFFIX);
        let mut headers = OwnedHeaders::new();
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let source = self.kafka.topic(&record.topic);
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let failed_at = crate::contracts::time::format(&chrono::Utc::now());
        for (k, v) in [
            ("dlq.reason", reason),
            ("dlq.error", error),
            ("dlq.source.topic", source.as_str()),
            ("dlq.source.partition", partition.as_str()),
            ("dlq.source.offset", offset.as_str()),
            ("dlq.failed_at", failed_at.as_str()),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let payload = record.payload.as_deref().unwrap_or_default();
        let mut out = FutureRecord::to(&topic).payload(payload).headers(headers);
        if let Some(key) = &record.key {
            out = out.key(key);
        }
        self.dlq
            .send(out, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e.to_string())
    }

    /// Consumes until `shutdown` turns true, then commits what is done.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut lag_measured = std::time::Instant::now();
        while !*shutdown.borrow() {
            if lag_measured.elapsed() > Duration::from_secs(10) {
                lag_measured = std::time::Instant::now();
                let consumer = self.consumer.clone();
                let gauge = self.metrics.consumer_lag.clone();
                tokio::task::spawn_blocking(move || match consumer_lag(&consumer) {
                    Ok(lag) => gauge.set(lag),
                    Err(e) => tracing::debug!(error = %e, "consumer lag not measured"),
                });
            }
            let first = tokio::select! {
                _ = shutdown.changed() => break,
                m = self.consumer.recv() => m,
            };
            let mut records = match first {
                Ok(m) => vec![self.detach(&m)],
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    tokio::time::sleep(self.settings.backoff_initial).await;
                    continue;
                }
            };
            while records.len() < self.settings.max_batch {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => records.push(self.detach(&m)),
                    _ => break,
                }
            }
            // Each partition's records in order, partitions side by side.
            let mut partitions: Vec<Vec<Incoming>> = Vec::new();
            for record in records {
                match partitions
                    .iter_mut()
                    .find(|p| p[0].topic == record.topic && p[0].partition == record.partition)
                {
                    Some(p) => p.push(record),
                    None => partitions.push(vec![record]),
                }
            }
            let started = std::time::Instant::now();
            let results = join_all(
                partitions
                    .iter()
                    .map(|p| self.apply_partition(p, shutdown.clone())),
            )
            .await;
            self.metrics
                .handler_seconds
                .observe(started.elapsed().as_secs_f64());
            let mut stopping = false;
            for (records, outcomes) in partitions.iter().zip(results) {
                match outcomes {
                    Some(outcomes) => self.settle(records, outcomes.as_slice()).await,
                    // Shut down while retrying: these offsets stay uncommitted.
                    None => stopping = true,
                }
            }
            self.outbox_written.notify_one();
            if stopping {
                break;
            }
        }
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final commit");
        }
    }

    /// Applies one partition's records, retrying transient failures with capped
    /// backoff (never skipping); `None` when shutdown came first.
    async fn apply_partition(
        &self,
        records: &[Incoming],
        mut shutdown: watch::Receiver<bool>,
    ) -> Option<Vec<Outcome>> {
        let mut backoff = self.settings.backoff_initial;
        loop {
            match self.handler.handle(records).await {
                Ok(outcomes) => return Some(outcomes),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        topic = %records[0].topic,
                        partition = records[0].partition,
                        ?backoff,
                        "apply failed; retrying the same records"
                    );
                    tokio::select! {
                        _ = shutdown.wait_for(|s| *s) => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.settings.backoff_max);
                }
            }
        }
    }

    /// Dead-letters what needs it, counts, and stores the offsets of done records.
    async fn settle(&self, records: &[Incoming], outcomes: &[Outcome]) {
        for (record, outcome) in records.iter().zip(outcomes) {
            self.metrics
                .messages
                .with_label_values(&[record.topic.as_str(), outcome.label()])
                .inc();
            match outcome {
                Outcome::DeadLetter { reason, error } => {
                    self.metrics.dead_letters.inc();
                    tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset, reason, error, "dead-lettering");
                    let mut wait = self.settings.backoff_initial;
                    while let Err(e) = self.dead_letter(record, reason, error).await {
                        tracing::warn!(error = %e, "dead-letter publish failed; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(self.settings.backoff_max);
                    }
                }
                Outcome::Ignored(why) => {
                    tracing::info!(topic = %record.topic, offset = record.offset, why, "ignored")
                }
                Outcome::Duplicate => {
                    self.metrics.duplicates.inc();
                    tracing::info!(topic = %record.topic, offset = record.offset, "duplicate skipped")
                }
                Outcome::Applied => {}
            }
            let topic = self.kafka.topic(&record.topic);
            if let Err(e) = self
                .consumer
                .store_offset(&topic, record.partition, record.offset)
            {
                tracing::warn!(error = %e, "offset store failed (partition revoked?)");
            }
        }
    }
}
