//! Dead-letter replay: re-injects letters into their source topic.

use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaSettings;
use crate::contracts::{time, topics};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub replayed: usize,
    /// Letters older than `--since`, passed over (and committed).
    pub skipped: usize,
}

/// Replays `<topic>.dlq` (topic unprefixed) into `topic`, with its own consumer
/// group so a second replay continues where the first stopped. Ends after
/// `idle` without a new letter.
pub async fn replay(
    kafka: &KafkaSettings,
    producer: &FutureProducer,
    topic: &str,
    since: Option<time::Timestamp>,
    idle: Duration,
) -> Result<Replayed, ReplayError> {
    let source = kafka.topic(topic);
    let dlq = format!("{source}{}", topics::DLQ_SUFFIX);
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", format!("{}-dlq-replay", kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&dlq])?;
    let mut done = Replayed::default();
    while let Ok(message) = tokio::time::timeout(idle, consumer.recv()).await {
        let message = message?;
        let old = since.is_some_and(|since| {
            message
                .timestamp()
                .to_millis()
                .is_some_and(|ms| ms < since.timestamp_millis())
        });
        if old {
            done.skipped += 1;
        } else {
            let mut headers = OwnedHeaders::new();
            if let Some(hs) = message.headers() {
                for h in hs.iter().filter(|h| !h.key.starts_with("dlq.")) {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
            let mut record = FutureRecord::to(&source)
                .payload(message.payload().unwrap_or_default())
                .headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)?;
            done.replayed += 1;
        }
        consumer.commit_message(&message, CommitMode::Sync)?;
    }
    Ok(done)
}
