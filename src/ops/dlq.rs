//! Dead-letter replay: re-injects letters into their source topic.

use std::collections::HashMap;
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
    #[error("no partition of `{0}` was assigned in time")]
    NotAssigned(String),
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub replayed: usize,
    /// Letters older than `--since`, passed over (and committed).
    pub skipped: usize,
}

/// Replays `<topic>.dlq` (topic unprefixed) into `topic`, with its own consumer
/// group so a second replay continues where the first stopped. Replays the
/// letters present when it starts; gives up if no partition is assigned within
/// `join_timeout`.
pub async fn replay(
    kafka: &KafkaSettings,
    producer: &FutureProducer,
    topic: &str,
    since: Option<time::Timestamp>,
    join_timeout: Duration,
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
    let mut pending: Option<HashMap<i32, (i64, i64)>> = None;
    let joined_by = tokio::time::Instant::now() + join_timeout;
    loop {
        if pending.is_none() {
            let assignment = consumer.assignment()?;
            if assignment.count() > 0 {
                pending = Some(targets(&consumer, &dlq, &assignment)?);
            } else if tokio::time::Instant::now() > joined_by {
                return Err(ReplayError::NotAssigned(dlq));
            }
        }
        if let Some(targets) = &pending {
            if targets.values().all(|(next, high)| next >= high) {
                break;
            }
        }
        let Ok(message) = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
        else {
            continue;
        };
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
        if let Some(t) = pending
            .as_mut()
            .and_then(|t| t.get_mut(&message.partition()))
        {
            t.0 = message.offset() + 1;
        }
    }
    Ok(done)
}

/// Per partition: the next offset to read and the high watermark now.
fn targets(
    consumer: &StreamConsumer,
    topic: &str,
    assignment: &rdkafka::TopicPartitionList,
) -> Result<HashMap<i32, (i64, i64)>, ReplayError> {
    let committed = consumer.committed_offsets(assignment.clone(), Duration::from_secs(10))?;
    let mut targets = HashMap::new();
    for element in committed.elements_for_topic(topic) {
        let (low, high) =
            consumer.fetch_watermarks(topic, element.partition(), Duration::from_secs(10))?;
        let next = match element.offset() {
            rdkafka::Offset::Offset(n) => n,
            _ => low,
        };
        targets.insert(element.partition(), (next, high));
    }
    Ok(targets)
}
