//! Messages the rules ask to publish, already in their envelope.

use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::contracts::topics::SOURCE_SERVICE;
use crate::contracts::{Envelope, Timestamp};

/// One message to publish through the outbox. `event_id` is fixed here and never
/// changes, and `payload` holds the exact bytes to send, so a re-publish is an
/// exact duplicate.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundMessage {
    pub event_id: Uuid,
    /// Unprefixed topic name; the relay adds the configured prefix.
    pub topic: &'static str,
    /// The batch id: every message of a batch shares a partition.
    pub key: String,
    pub correlation_id: Uuid,
    pub occurred_at: Timestamp,
    pub traceparent: Option<String>,
    /// The whole envelope, as JSON text.
    pub payload: String,
    /// A record to publish exactly as it came (a dead letter) instead of `payload`.
    pub raw: Option<RawRecord>,
}

/// Bytes, key and headers of a record kept as they were (a dead letter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutboundMessage {
    /// The envelope as a JSON value.
    pub fn envelope(&self) -> Value {
        serde_json::from_str(&self.payload).unwrap_or(Value::Null)
    }
}

/// Ids and context shared by every message one decision publishes.
#[derive(Debug, Clone)]
pub struct MessageContext<'a> {
    pub batch_id: &'a str,
    pub correlation_id: Uuid,
    pub now: Timestamp,
    pub traceparent: Option<String>,
}

impl MessageContext<'_> {
    /// Wraps `data` in an envelope. `metadata` is null unless given.
    pub fn message<D: Serialize>(
        &self,
        event_id: Uuid,
        topic: &'static str,
        data: D,
        metadata: Option<Map<String, Value>>,
    ) -> OutboundMessage {
        let envelope = Envelope {
            event_id,
            event_type: topic.to_owned(),
            event_timestamp: self.now,
            source_service: SOURCE_SERVICE.to_owned(),
            schema_version: 1,
            correlation_id: self.correlation_id,
            data_schema_uri: None,
            data,
            metadata,
        };
        OutboundMessage {
            event_id,
            topic,
            key: self.batch_id.to_owned(),
            correlation_id: self.correlation_id,
            occurred_at: self.now,
            traceparent: self.traceparent.clone(),
            // Wire types are plain data (string keys, finite numbers): encoding cannot fail.
            payload: serde_json::to_string(&envelope)
                .unwrap_or_else(|e| unreachable!("wire types always encode: {e}")),
            raw: None,
        }
    }
}
