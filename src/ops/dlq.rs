//! Dead letters: list them with their `dlq.*` headers, or replay them into
//! their source topic.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;

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
    let dlq = kafka.published(&format!("{topic}{}", topics::DLQ_SUFFIX));
    let consumer: StreamConsumer = crate::kafka::client_config(kafka)
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

/// One dead letter, as `bos dlq list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Letter {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The `dlq.*` headers (reason, error, source topic/partition/offset, failed_at).
    pub headers: std::collections::BTreeMap<String, String>,
    pub payload: String,
}

/// Reads every letter of `<topic>.dlq` present now, from the beginning, without
/// committing anything (it joins no group).
pub async fn list(
    kafka: &KafkaSettings,
    topic: &str,
    limit: usize,
) -> Result<Vec<Letter>, ReplayError> {
    let dlq = kafka.published(&format!("{topic}{}", topics::DLQ_SUFFIX));
    let messages = snapshot(kafka, std::slice::from_ref(&dlq), limit).await?;
    Ok(messages
        .iter()
        .map(|message| Letter {
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            headers: message
                .headers()
                .map(|hs| {
                    hs.iter()
                        .filter(|h| h.key.starts_with("dlq."))
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            payload: String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
        })
        .collect())
}

/// Everything `topics` hold now (up to `limit` records), read from the
/// beginning of each partition without joining a group or committing.
pub async fn snapshot(
    kafka: &KafkaSettings,
    names: &[String],
    limit: usize,
) -> Result<Vec<OwnedMessage>, ReplayError> {
    let consumer: StreamConsumer = crate::kafka::client_config(kafka)
        .set("group.id", format!("{}-snapshot", kafka.group_id))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    let mut targets: HashMap<(String, i32), i64> = HashMap::new();
    for name in names {
        let metadata = consumer.fetch_metadata(Some(name), Duration::from_secs(10))?;
        for t in metadata.topics() {
            if t.error().is_some() || t.partitions().is_empty() {
                return Err(ReplayError::NotAssigned(name.clone()));
            }
            for p in t.partitions() {
                let (low, high) =
                    consumer.fetch_watermarks(name, p.id(), Duration::from_secs(10))?;
                if high > low {
                    targets.insert((name.clone(), p.id()), high);
                    assignment.add_partition_offset(name, p.id(), rdkafka::Offset::Offset(low))?;
                }
            }
        }
    }
    let mut messages = Vec::new();
    if targets.is_empty() {
        return Ok(messages);
    }
    consumer.assign(&assignment)?;
    while messages.len() < limit && !targets.is_empty() {
        let Ok(message) = tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await
        else {
            break;
        };
        let message = message?;
        let key = (message.topic().to_owned(), message.partition());
        if targets
            .get(&key)
            .is_some_and(|&high| message.offset() + 1 >= high)
        {
            targets.remove(&key);
        }
        messages.push(message.detach());
    }
    Ok(messages)
}
