//! Wire types only: the envelope, every payload and every closed enum, with the
//! exact spellings other services depend on. No logic beyond decoding.

pub mod enums;
pub mod envelope;
pub mod payloads;
pub mod time;
pub mod topics;

pub use enums::*;
pub use envelope::{Envelope, InboundEnvelope};
pub use payloads::*;
pub use time::Timestamp;

use serde::de::DeserializeOwned;

/// Why a consumed message could not be decoded. Every variant names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(String),
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    #[error("invalid `data` for {topic}: {error}")]
    InvalidData { topic: String, error: String },
}

/// A consumed payload, by topic.
#[derive(Debug, Clone, PartialEq)]
pub enum InboundEvent {
    ContentProvisioned(ContentProvisioningCompleted),
    AssociationsConfirmed(StudentAssociationsConfirmed),
    EssaysReady(BatchEssaysReady),
    PipelineRequest(ClientPipelineRequest),
    PhaseOutcome(PhaseOutcome),
    ValidationErrors(BatchValidationErrors),
    /// The live service registered a batch (consumed by a shadow run only).
    Registered(BatchEssaysRegistered),
}

impl InboundEvent {
    pub fn batch_id(&self) -> &str {
        match self {
            InboundEvent::ContentProvisioned(e) => &e.batch_id,
            InboundEvent::AssociationsConfirmed(e) => &e.batch_id,
            InboundEvent::EssaysReady(e) => &e.batch_id,
            InboundEvent::PipelineRequest(e) => &e.batch_id,
            InboundEvent::PhaseOutcome(e) => &e.batch_id,
            InboundEvent::ValidationErrors(e) => &e.batch_id,
            InboundEvent::Registered(e) => &e.entity_id,
        }
    }

    /// The topic this payload arrives on.
    pub fn topic(&self) -> &'static str {
        match self {
            InboundEvent::ContentProvisioned(_) => topics::CONTENT_PROVISIONING_COMPLETED,
            InboundEvent::AssociationsConfirmed(_) => topics::STUDENT_ASSOCIATIONS_CONFIRMED,
            InboundEvent::EssaysReady(_) => topics::BATCH_ESSAYS_READY,
            InboundEvent::PipelineRequest(_) => topics::CLIENT_PIPELINE_REQUEST,
            InboundEvent::PhaseOutcome(_) => topics::PHASE_OUTCOME,
            InboundEvent::ValidationErrors(_) => topics::VALIDATION_ERRORS,
            InboundEvent::Registered(_) => topics::BATCH_ESSAYS_REGISTERED,
        }
    }
}

/// A decoded consumed message: its envelope (with `data` still raw) and the typed payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub envelope: InboundEnvelope,
    pub event: InboundEvent,
}

fn data<T: DeserializeOwned>(topic: &str, value: serde_json::Value) -> Result<T, DecodeError> {
    serde_json::from_value(value).map_err(|e| DecodeError::InvalidData {
        topic: topic.to_owned(),
        error: e.to_string(),
    })
}

/// Decodes in two steps (the envelope first, then `data` by its unprefixed
/// topic), then checks what the platform's own models check, so that input
/// they would refuse never reaches the rules or the database.
pub fn decode(topic: &str, bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    if let Some(path) = validate::nul_path(&value) {
        return Err(DecodeError::InvalidData {
            topic: topic.to_owned(),
            error: format!("NUL character in {path}"),
        });
    }
    let mut envelope: InboundEnvelope =
        serde_json::from_value(value).map_err(|e| DecodeError::InvalidEnvelope(e.to_string()))?;
    let raw = std::mem::take(&mut envelope.data);
    let invalid = |error: String| DecodeError::InvalidData {
        topic: topic.to_owned(),
        error,
    };
    let event = match topic {
        topics::CONTENT_PROVISIONING_COMPLETED => {
            InboundEvent::ContentProvisioned(data(topic, raw)?)
        }
        topics::STUDENT_ASSOCIATIONS_CONFIRMED => {
            InboundEvent::AssociationsConfirmed(data(topic, raw)?)
        }
        topics::BATCH_ESSAYS_READY => InboundEvent::EssaysReady(data(topic, raw)?),
        topics::CLIENT_PIPELINE_REQUEST => {
            let mut request: ClientPipelineRequest = data(topic, raw)?;
            validate::pipeline_request(&mut request).map_err(invalid)?;
            InboundEvent::PipelineRequest(request)
        }
        topics::PHASE_OUTCOME => InboundEvent::PhaseOutcome(data(topic, raw)?),
        topics::VALIDATION_ERRORS => InboundEvent::ValidationErrors(data(topic, raw)?),
        topics::BATCH_ESSAYS_REGISTERED => InboundEvent::Registered(data(topic, raw)?),
        other => return Err(DecodeError::UnknownTopic(other.to_owned())),
    };
    validate::essay_lists(&event).map_err(invalid)?;
    Ok(Decoded { envelope, event })
}

/// The checks the platform's models make beyond the shape of the JSON.
pub mod validate {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::{ClientPipelineRequest, InboundEvent};

    /// Where a NUL character hides in `value` (keys included), if anywhere:
    /// PostgreSQL refuses it in `text` and `jsonb`.
    pub fn nul_path(value: &Value) -> Option<String> {
        match value {
            Value::String(s) if s.contains('\0') => Some("a string".to_owned()),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, v)| nul_path(v).map(|p| format!("[{i}] {p}"))),
            Value::Object(map) => map.iter().find_map(|(k, v)| {
                if k.contains('\0') {
                    Some("an object key".to_owned())
                } else {
                    nul_path(v).map(|p| format!("`{k}` {p}"))
                }
            }),
            _ => None,
        }
    }

    fn trimmed(field: &str, value: &mut String, max: usize) -> Result<(), String> {
        let t = value.trim();
        if t.len() != value.len() {
            *value = t.to_owned();
        }
        if value.is_empty() {
            return Err(format!("`{field}` must not be empty"));
        }
        if value.chars().count() > max {
            return Err(format!("`{field}` must be at most {max} characters"));
        }
        Ok(())
    }

    /// `ClientBatchPipelineRequestV1` strips surrounding whitespace and limits lengths;
    /// its prompt payload carries exactly one of `assignment_id` and `cms_prompt_ref`.
    pub fn pipeline_request(request: &mut ClientPipelineRequest) -> Result<(), String> {
        trimmed("batch_id", &mut request.batch_id, 255)?;
        trimmed("requested_pipeline", &mut request.requested_pipeline, 100)?;
        trimmed("user_id", &mut request.user_id, 255)?;
        if let Some(reason) = &mut request.retry_reason {
            *reason = reason.trim().to_owned();
            if reason.chars().count() > 500 {
                return Err("`retry_reason` must be at most 500 characters".to_owned());
            }
        }
        if let Some(prompt) = &mut request.prompt_payload {
            if prompt.assignment_id.is_some() == prompt.cms_prompt_ref.is_some() {
                return Err(
                    "`prompt_payload` must set exactly one of assignment_id and cms_prompt_ref"
                        .to_owned(),
                );
            }
            if let Some(id) = &mut prompt.assignment_id {
                trimmed("prompt_payload.assignment_id", id, 100)?;
            }
        }
        Ok(())
    }

    fn unique<'a>(list: &str, ids: impl Iterator<Item = &'a String>) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for id in ids {
            if !seen.insert(id) {
                return Err(format!("essay `{id}` appears twice in `{list}`"));
            }
        }
        Ok(())
    }

    /// No essays list names an essay twice.
    pub fn essay_lists(event: &InboundEvent) -> Result<(), String> {
        match event {
            InboundEvent::ContentProvisioned(e) => unique(
                "essays_for_processing",
                e.essays_for_processing.iter().map(|r| &r.essay_id),
            ),
            InboundEvent::AssociationsConfirmed(e) => {
                unique("associations", e.associations.iter().map(|a| &a.essay_id))
            }
            InboundEvent::EssaysReady(e) => {
                unique("ready_essays", e.ready_essays.iter().map(|r| &r.essay_id))
            }
            InboundEvent::PipelineRequest(_) => Ok(()),
            InboundEvent::PhaseOutcome(e) => {
                unique(
                    "processed_essays",
                    e.processed_essays.iter().map(|r| &r.essay_id),
                )?;
                unique("failed_essay_ids", e.failed_essay_ids.iter())
            }
            InboundEvent::ValidationErrors(e) => {
                unique("failed_essays", e.failed_essays.iter().map(|f| &f.essay_id))
            }
            InboundEvent::Registered(e) => unique("essay_ids", e.essay_ids.iter()),
        }
    }
}
