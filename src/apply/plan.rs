//! Planning: which records become which state, inbox rows and outbox rows.
//! A pure function of the records, the batches as read, the events the inbox
//! already holds, the clock, the id source and the credit answers.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;
use uuid::Uuid;

use crate::contracts::{decode, topics, Decoded, InboundEvent};
use crate::domain::{Batch, Decision, Env, EventMeta, OutboundMessage, Rules};
use crate::store::{BatchWrite, InboxRecord, UnitOfWork};

/// One consumed record, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Record {
    /// Unprefixed topic.
    pub topic: String,
    /// The topic as the broker names it (with the configured prefix).
    pub source_topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// When the producer wrote it (Kafka's timestamp), if known.
    pub produced_at_ms: Option<i64>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// A record after decoding, with the record itself (when it came from Kafka)
/// for the dead letter it may become.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub item: Item,
    pub source: Option<Box<Record>>,
}

/// What a record decoded to.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // Poison is rare; boxing every event costs more.
pub enum Item {
    Event {
        event: InboundEvent,
        meta: EventMeta,
        /// The inbox row's topic.
        topic: String,
    },
    /// Cannot be decoded or validated: a dead letter.
    Poison { reason: &'static str, error: String },
}

impl Prepared {
    /// An event that did not come from Kafka (an HTTP retry).
    pub fn event(event: InboundEvent, meta: EventMeta, topic: &str) -> Self {
        Self {
            item: Item::Event {
                event,
                meta,
                topic: topic.to_owned(),
            },
            source: None,
        }
    }

    pub fn event_id(&self) -> Option<Uuid> {
        match &self.item {
            Item::Event { meta, .. } => Some(meta.event_id),
            Item::Poison { .. } => None,
        }
    }

    pub fn batch_id(&self) -> Option<&str> {
        match &self.item {
            Item::Event { event, .. } => Some(event.batch_id()),
            Item::Poison { .. } => None,
        }
    }
}

/// Namespace of dead letters' ids, derived from the record's position.
const LETTER_NAMESPACE: Uuid = Uuid::from_u128(0x9d4b_17e2_5c03_4f8a_b6e1_2a7c_0d5f_3e91);

/// The dead letter of `source`, as an outbox row: its id comes from the
/// record's position, so dead-lettering the same record again (after a crash)
/// is the same letter.
pub fn letter(
    source: &Record,
    reason: &str,
    error: &str,
    now: crate::contracts::Timestamp,
) -> Option<OutboundMessage> {
    let topic = topics::dead_letter_topic(&source.topic)?;
    let position = format!(
        "{}/{}/{}",
        source.source_topic, source.partition, source.offset
    );
    let id = Uuid::new_v5(&LETTER_NAMESPACE, position.as_bytes());
    let mut headers = source.headers.clone();
    let error: String = error.chars().take(4000).collect();
    for (k, v) in [
        ("dlq.reason", reason.to_owned()),
        ("dlq.error", error),
        ("dlq.source.topic", source.source_topic.clone()),
        ("dlq.source.partition", source.partition.to_string()),
        ("dlq.source.offset", source.offset.to_string()),
        ("dlq.failed_at", crate::contracts::time::format(&now)),
        ("dlq.id", id.to_string()),
    ] {
        headers.push((k.to_owned(), v.into_bytes()));
    }
    Some(OutboundMessage {
        event_id: id,
        topic,
        key: source
            .key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default(),
        correlation_id: id,
        occurred_at: now,
        traceparent: None,
        payload: String::new(),
        raw: Some(crate::domain::RawRecord {
            key: source.key.clone(),
            payload: source.payload.clone().unwrap_or_default(),
            headers,
        }),
    })
}

/// Namespace of event ids derived from a record's position when it carries none.
const POSITION_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2b7e_4d0a_4c55_9a3e_0b1d_8e27_f4c9);

/// The envelope facts the rules need, with stable fallbacks: the event id from
/// the header, else the body, else derived from the record's position.
pub fn event_meta(record: &Record, decoded: &Decoded) -> EventMeta {
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
            .and_then(Value::as_str)
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

/// Decodes a record (validation included).
pub fn prepare(record: &Record) -> Prepared {
    let item = match decode(&record.topic, record.payload.as_deref().unwrap_or_default()) {
        Ok(decoded) => Item::Event {
            meta: event_meta(record, &decoded),
            event: decoded.event,
            topic: record.topic.clone(),
        },
        Err(e) => Item::Poison {
            reason: "decode_error",
            error: e.to_string(),
        },
    };
    Prepared {
        item,
        source: Some(Box::new(record.clone())),
    }
}

/// What became of one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Applied,
    /// Did not fit the batch's state; recorded as processed.
    Ignored(String),
    /// The inbox holds it already (or an earlier record of the same poll is it).
    Duplicate,
    DeadLetter {
        reason: &'static str,
        error: String,
    },
}

impl Verdict {
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Applied => "applied",
            Verdict::Ignored(_) => "ignored",
            Verdict::Duplicate => "duplicate",
            Verdict::DeadLetter { .. } => "dead_letter",
        }
    }
}

/// One record's verdict in a plan, and the batch whose write it rides on.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub index: usize,
    pub verdict: Verdict,
    /// When set, the verdict stands only if this batch's write (if any) wins.
    pub batch: Option<String>,
    /// The denial a pipeline request got, if it was denied.
    pub denied: Option<String>,
}

/// The result of planning.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Ready to commit.
    Ready {
        unit: UnitOfWork,
        planned: Vec<Planned>,
        notes: Vec<(usize, String)>,
    },
    /// A run would start: ask the credit policy this first, then plan again.
    NeedsCredit {
        index: usize,
        query: crate::domain::CreditQuery,
        correlation_id: Uuid,
    },
}

/// A batch's state while a poll's records are decided against it.
struct Working {
    loaded: Batch,
    current: Batch,
    changed: bool,
    write: BatchWrite,
}

/// Decides `records` (indices into `prepared`) in order. Records already
/// processed (`processed`) and repeats of an earlier record are set aside
/// before deciding, so later records are decided without them.
pub fn plan(
    rules: &Rules,
    prepared: &[Prepared],
    records: &[usize],
    batches: &HashMap<String, Batch>,
    processed: &HashSet<Uuid>,
    env: &mut Env<'_>,
) -> Plan {
    let mut working: BTreeMap<String, Working> = BTreeMap::new();
    let mut unit = UnitOfWork::default();
    let mut planned = Vec::with_capacity(records.len());
    let mut notes = Vec::new();
    let mut first_of: HashMap<Uuid, usize> = HashMap::new();
    for &index in records {
        let Some(record) = prepared.get(index) else {
            continue;
        };
        let (event, meta, topic) = match &record.item {
            Item::Poison { reason, error } => {
                dead_letter(
                    &mut unit,
                    &mut planned,
                    record,
                    index,
                    reason,
                    error.clone(),
                    env.now,
                );
                continue;
            }
            Item::Event { event, meta, topic } => (event, meta, topic),
        };
        if processed.contains(&meta.event_id) {
            planned.push(Planned {
                index,
                verdict: Verdict::Duplicate,
                batch: None,
                denied: None,
            });
            continue;
        }
        if let Some(&first) = first_of.get(&meta.event_id) {
            // A repeat inside this poll shares its first copy's fate: a
            // duplicate when that one applies, a dead letter of its own when
            // that one is dead-lettered.
            let first = planned.iter().find(|p| p.index == first).cloned();
            match first {
                Some(Planned {
                    verdict: Verdict::DeadLetter { reason, error },
                    ..
                }) => dead_letter(
                    &mut unit,
                    &mut planned,
                    record,
                    index,
                    reason,
                    error,
                    env.now,
                ),
                other => planned.push(Planned {
                    index,
                    verdict: Verdict::Duplicate,
                    batch: other.and_then(|p| p.batch),
                    denied: None,
                }),
            }
            continue;
        }
        first_of.insert(meta.event_id, index);
        let batch_id = event.batch_id().to_owned();
        let current = working
            .get(&batch_id)
            .map(|w| &w.current)
            .or_else(|| batches.get(&batch_id));
        match rules.decide(current, event, meta, env) {
            Decision::NeedsCredit(query) => {
                return Plan::NeedsCredit {
                    index,
                    query,
                    correlation_id: meta.correlation_id,
                };
            }
            Decision::DeadLetter { reason, error } => {
                dead_letter(
                    &mut unit,
                    &mut planned,
                    record,
                    index,
                    reason,
                    error,
                    env.now,
                );
            }
            Decision::Ignore(why) => {
                unit.inbox.push(InboxRecord {
                    event_id: meta.event_id,
                    topic: topic.clone(),
                    batch_id: batch_id.clone(),
                });
                planned.push(Planned {
                    index,
                    verdict: Verdict::Ignored(why),
                    batch: Some(batch_id),
                    denied: None,
                });
            }
            Decision::Apply(effects) => {
                let denied = effects
                    .messages
                    .iter()
                    .find(|m| m.topic == topics::PIPELINE_DENIED)
                    .and_then(denial_reason);
                for note in effects.notes {
                    notes.push((index, note));
                }
                // Effects on a batch that was not loaded create it (a shadow
                // run adopting a registration): written without a version.
                let (loaded, expected_version) = match working
                    .get(&batch_id)
                    .map(|w| (w.loaded.clone(), w.write.expected_version))
                    .or_else(|| batches.get(&batch_id).map(|b| (b.clone(), Some(b.version))))
                {
                    Some(found) => found,
                    None => (effects.batch.clone(), None),
                };
                {
                    let w = working.entry(batch_id.clone()).or_insert_with(|| Working {
                        write: BatchWrite {
                            batch: loaded.clone(),
                            expected_version,
                            essays_changed: false,
                            transitions: Vec::new(),
                            snapshots: Vec::new(),
                        },
                        current: loaded.clone(),
                        loaded,
                        changed: false,
                    });
                    w.changed |= effects.changed;
                    w.write.transitions.extend(effects.transitions);
                    if let Some(snapshot) = effects.snapshot {
                        let correlation = effects
                            .batch
                            .orchestration
                            .current_run
                            .as_ref()
                            .map_or(meta.correlation_id, |r| r.correlation_id);
                        w.write.snapshots.push((correlation, snapshot));
                    }
                    w.current = effects.batch;
                }
                unit.inbox.push(InboxRecord {
                    event_id: meta.event_id,
                    topic: topic.clone(),
                    batch_id: batch_id.clone(),
                });
                unit.outbox.extend(effects.messages);
                planned.push(Planned {
                    index,
                    verdict: Verdict::Applied,
                    batch: Some(batch_id),
                    denied,
                });
            }
        }
    }
    for (_, w) in working {
        if w.changed {
            let mut write = w.write;
            write.essays_changed = w.current.essays != w.loaded.essays;
            write.batch = w.current;
            unit.writes.push(write);
        }
    }
    Plan::Ready {
        unit,
        planned,
        notes,
    }
}

/// A dead-letter verdict, with its letter in the unit of work.
fn dead_letter(
    unit: &mut UnitOfWork,
    planned: &mut Vec<Planned>,
    record: &Prepared,
    index: usize,
    reason: &'static str,
    error: String,
    now: crate::contracts::Timestamp,
) {
    if let Some(l) = record
        .source
        .as_deref()
        .and_then(|source| letter(source, reason, &error, now))
    {
        unit.outbox.push(l);
    }
    planned.push(Planned {
        index,
        verdict: Verdict::DeadLetter { reason, error },
        batch: None,
        denied: None,
    });
}

fn denial_reason(message: &OutboundMessage) -> Option<String> {
    message.envelope()["data"]["denial_reason"]
        .as_str()
        .map(str::to_owned)
}
