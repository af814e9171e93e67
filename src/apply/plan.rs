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

/// A record after decoding.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // Poison is rare; boxing every event costs more.
pub enum Prepared {
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
    pub fn event_id(&self) -> Option<Uuid> {
        match self {
            Prepared::Event { meta, .. } => Some(meta.event_id),
            Prepared::Poison { .. } => None,
        }
    }

    pub fn batch_id(&self) -> Option<&str> {
        match self {
            Prepared::Event { event, .. } => Some(event.batch_id()),
            Prepared::Poison { .. } => None,
        }
    }
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
    match decode(&record.topic, record.payload.as_deref().unwrap_or_default()) {
        Ok(decoded) => Prepared::Event {
            meta: event_meta(record, &decoded),
            event: decoded.event,
            topic: record.topic.clone(),
        },
        Err(e) => Prepared::Poison {
            reason: "decode_error",
            error: e.to_string(),
        },
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
    DeadLetter { reason: &'static str, error: String },
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
        let (event, meta, topic) = match record {
            Prepared::Poison { reason, error } => {
                planned.push(Planned {
                    index,
                    verdict: Verdict::DeadLetter {
                        reason,
                        error: error.clone(),
                    },
                    batch: None,
                    denied: None,
                });
                continue;
            }
            Prepared::Event { event, meta, topic } => (event, meta, topic),
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
            let (verdict, batch) = match first {
                Some(Planned {
                    verdict: Verdict::DeadLetter { reason, error },
                    ..
                }) => (Verdict::DeadLetter { reason, error }, None),
                Some(p) => (Verdict::Duplicate, p.batch),
                None => (Verdict::Duplicate, None),
            };
            planned.push(Planned {
                index,
                verdict,
                batch,
                denied: None,
            });
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
            Decision::DeadLetter { reason, error } => planned.push(Planned {
                index,
                verdict: Verdict::DeadLetter { reason, error },
                batch: None,
                denied: None,
            }),
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
                let loaded = working
                    .get(&batch_id)
                    .map(|w| w.loaded.clone())
                    .or_else(|| batches.get(&batch_id).cloned());
                if let Some(loaded) = loaded {
                    let w = working.entry(batch_id.clone()).or_insert_with(|| Working {
                        write: BatchWrite {
                            batch: loaded.clone(),
                            expected_version: Some(loaded.version),
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

fn denial_reason(message: &OutboundMessage) -> Option<String> {
    message.envelope()["data"]["denial_reason"]
        .as_str()
        .map(str::to_owned)
}
