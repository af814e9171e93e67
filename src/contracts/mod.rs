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

/// Decodes in two steps: the envelope first, then `data` by topic (unprefixed).
pub fn decode(topic: &str, bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    let mut envelope: InboundEnvelope =
        serde_json::from_value(value).map_err(|e| DecodeError::InvalidEnvelope(e.to_string()))?;
    let raw = std::mem::take(&mut envelope.data);
    let event = match topic {
        topics::CONTENT_PROVISIONING_COMPLETED => {
            InboundEvent::ContentProvisioned(data(topic, raw)?)
        }
        topics::STUDENT_ASSOCIATIONS_CONFIRMED => {
            InboundEvent::AssociationsConfirmed(data(topic, raw)?)
        }
        topics::BATCH_ESSAYS_READY => InboundEvent::EssaysReady(data(topic, raw)?),
        topics::CLIENT_PIPELINE_REQUEST => {
            let request: ClientPipelineRequest = data(topic, raw)?;
            if let Some(prompt) = &request.prompt_payload {
                if prompt.assignment_id.is_some() == prompt.cms_prompt_ref.is_some() {
                    return Err(DecodeError::InvalidData {
                        topic: topic.to_owned(),
                        error: "prompt_payload must set exactly one of assignment_id and cms_prompt_ref"
                            .to_owned(),
                    });
                }
            }
            InboundEvent::PipelineRequest(request)
        }
        topics::PHASE_OUTCOME => InboundEvent::PhaseOutcome(data(topic, raw)?),
        topics::VALIDATION_ERRORS => InboundEvent::ValidationErrors(data(topic, raw)?),
        other => return Err(DecodeError::UnknownTopic(other.to_owned())),
    };
    Ok(Decoded { envelope, event })
}
