//! The envelope every message travels in.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::time::{self, Timestamp};

fn schema_version_default() -> i64 {
    1
}

/// An envelope as received. Fields with a wire default may be absent; `event_id`
/// stays `None` when absent so the consumer can choose a stable substitute.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct InboundEnvelope {
    #[serde(default)]
    pub event_id: Option<Uuid>,
    pub event_type: String,
    #[serde(default, with = "time::option")]
    pub event_timestamp: Option<Timestamp>,
    pub source_service: String,
    #[serde(default = "schema_version_default")]
    pub schema_version: i64,
    #[serde(default)]
    pub correlation_id: Option<Uuid>,
    #[serde(default)]
    pub data_schema_uri: Option<String>,
    pub data: Value,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
}

/// An envelope as published: every field present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<D> {
    pub event_id: Uuid,
    pub event_type: String,
    #[serde(with = "time")]
    pub event_timestamp: Timestamp,
    pub source_service: String,
    pub schema_version: i64,
    pub correlation_id: Uuid,
    pub data_schema_uri: Option<String>,
    pub data: D,
    pub metadata: Option<Map<String, Value>>,
}
