//! Payloads (`data`) of every consumed and published topic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::enums::{
    BatchStatus, ContentType, CourseCode, NotificationCategory, NotificationPriority, PhaseName,
    ProcessingStage,
};
use super::time::{self, Timestamp};

fn now() -> Timestamp {
    chrono::Utc::now()
}

// ---------------------------------------------------------------- shared parts

/// `EssayProcessingInputRefV1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EssayRef {
    pub essay_id: String,
    pub text_storage_id: String,
    #[serde(default)]
    pub spellcheck_metrics: Value,
}

impl EssayRef {
    pub fn new(essay_id: impl Into<String>, text_storage_id: impl Into<String>) -> Self {
        Self {
            essay_id: essay_id.into(),
            text_storage_id: text_storage_id.into(),
            spellcheck_metrics: Value::Null,
        }
    }
}

/// `SystemProcessingMetadata`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemProcessingMetadata {
    pub entity_id: String,
    pub entity_type: String,
    #[serde(default)]
    pub parent_id: Option<String>,
    #[serde(default = "now", with = "time")]
    pub timestamp: Timestamp,
    #[serde(default)]
    pub processing_stage: Option<ProcessingStage>,
    #[serde(default, with = "time::option")]
    pub started_at: Option<Timestamp>,
    #[serde(default, with = "time::option")]
    pub completed_at: Option<Timestamp>,
    #[serde(default)]
    pub event: Option<String>,
    #[serde(default)]
    pub error_info: Map<String, Value>,
}

impl SystemProcessingMetadata {
    pub fn for_batch(batch_id: &str, timestamp: Timestamp) -> Self {
        Self {
            entity_id: batch_id.to_owned(),
            entity_type: "batch".to_owned(),
            parent_id: None,
            timestamp,
            processing_stage: None,
            started_at: None,
            completed_at: None,
            event: None,
            error_info: Map::new(),
        }
    }
}

/// One stored object: `{storage_id, path}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageRef {
    pub storage_id: String,
    #[serde(default)]
    pub path: String,
}

/// `StorageReferenceMetadata`: content type → stored object.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StorageReferenceMetadata {
    #[serde(default)]
    pub references: BTreeMap<ContentType, StorageRef>,
}

// ---------------------------------------------------------------- consumed

/// `huleedu.batch.content.provisioning.completed.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentProvisioningCompleted {
    pub batch_id: String,
    pub provisioned_count: i64,
    pub expected_count: i64,
    pub course_code: CourseCode,
    pub user_id: String,
    pub essays_for_processing: Vec<EssayRef>,
    #[serde(default)]
    pub correlation_id: Option<Uuid>,
    #[serde(default, with = "time::option")]
    pub timestamp: Option<Timestamp>,
    #[serde(default)]
    pub event: Option<String>,
}

/// One confirmed essay-to-student association.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudentAssociation {
    pub essay_id: String,
    pub student_id: Option<String>,
    pub confidence_score: f64,
    pub validation_method: String,
    pub validated_by: Option<String>,
    /// The platform defaults an absent time to now.
    #[serde(default = "now", with = "time")]
    pub validated_at: Timestamp,
}

/// `huleedu.class.student.associations.confirmed.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudentAssociationsConfirmed {
    pub batch_id: String,
    pub class_id: String,
    pub course_code: CourseCode,
    pub associations: Vec<StudentAssociation>,
    #[serde(default)]
    pub timeout_triggered: bool,
    #[serde(default)]
    pub validation_summary: Map<String, Value>,
    #[serde(default)]
    pub event_name: Option<String>,
    #[serde(default)]
    pub entity_id: Option<String>,
    #[serde(default)]
    pub entity_type: Option<String>,
    #[serde(default)]
    pub parent_id: Option<String>,
    #[serde(default, with = "time::option")]
    pub timestamp: Option<Timestamp>,
}

/// `huleedu.els.batch.essays.ready.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchEssaysReady {
    pub batch_id: String,
    pub ready_essays: Vec<EssayRef>,
    pub metadata: SystemProcessingMetadata,
    pub course_code: CourseCode,
    pub course_language: String,
    pub class_type: String,
    #[serde(default)]
    pub student_prompt_ref: Option<StorageReferenceMetadata>,
    #[serde(default)]
    pub event: Option<String>,
}

/// Prompt attached to a pipeline request: exactly one of the two is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptPayload {
    #[serde(default)]
    pub assignment_id: Option<String>,
    #[serde(default)]
    pub cms_prompt_ref: Option<StorageReferenceMetadata>,
}

/// `huleedu.commands.batch.pipeline.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientPipelineRequest {
    pub batch_id: String,
    pub requested_pipeline: String,
    pub user_id: String,
    #[serde(default)]
    pub client_correlation_id: Option<Uuid>,
    #[serde(default)]
    pub is_retry: bool,
    #[serde(default)]
    pub retry_reason: Option<String>,
    #[serde(default)]
    pub prompt_payload: Option<PromptPayload>,
}

/// `huleedu.els.batch.phase.outcome.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseOutcome {
    pub batch_id: String,
    pub phase_name: PhaseName,
    pub phase_status: BatchStatus,
    pub processed_essays: Vec<EssayRef>,
    pub failed_essay_ids: Vec<String>,
    #[serde(default)]
    pub correlation_id: Option<Uuid>,
}

/// One essay that failed validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedEssay {
    pub essay_id: String,
    pub file_name: String,
    pub error_detail: Map<String, Value>,
    #[serde(default = "now", with = "time")]
    pub failed_at: Timestamp,
}

/// Summary of a validation-errors event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorSummary {
    pub total_errors: i64,
    pub error_categories: BTreeMap<String, i64>,
    #[serde(default)]
    pub critical_failure: bool,
}

/// `huleedu.els.batch.validation.errors.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchValidationErrors {
    pub batch_id: String,
    pub failed_essays: Vec<FailedEssay>,
    pub error_summary: ErrorSummary,
    pub metadata: SystemProcessingMetadata,
    #[serde(default)]
    pub correlation_id: Option<Uuid>,
    #[serde(default)]
    pub event: Option<String>,
}

// ---------------------------------------------------------------- published

/// `huleedu.batch.essays.registered.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchEssaysRegistered {
    pub event: String,
    pub entity_id: String,
    pub expected_essay_count: i64,
    pub essay_ids: Vec<String>,
    pub metadata: SystemProcessingMetadata,
    pub course_code: CourseCode,
    pub student_prompt_ref: Option<StorageReferenceMetadata>,
    pub user_id: String,
    pub org_id: Option<String>,
    pub class_id: Option<String>,
}

/// Fields every initiate command starts with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandBase {
    pub event_name: String,
    pub entity_id: String,
    pub entity_type: String,
    pub parent_id: Option<String>,
    #[serde(with = "time")]
    pub timestamp: Timestamp,
    pub essays_to_process: Vec<EssayRef>,
}

/// `huleedu.els.spellcheck.initiate.command.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpellcheckCommand {
    #[serde(flatten)]
    pub base: CommandBase,
    pub language: String,
}

/// `huleedu.batch.nlp.initiate.command.v2`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NlpCommand {
    #[serde(flatten)]
    pub base: CommandBase,
    pub language: String,
    pub student_prompt_ref: Option<StorageReferenceMetadata>,
}

/// `huleedu.batch.cj_assessment.initiate.command.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CjAssessmentCommand {
    #[serde(flatten)]
    pub base: CommandBase,
    pub language: String,
    pub course_code: CourseCode,
    pub student_prompt_ref: Option<StorageReferenceMetadata>,
    pub class_type: String,
    pub assignment_id: Option<String>,
}

/// `huleedu.batch.ai_feedback.initiate.command.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AiFeedbackCommand {
    #[serde(flatten)]
    pub base: CommandBase,
    pub language: String,
    pub course_code: CourseCode,
    pub student_prompt_ref: Option<StorageReferenceMetadata>,
    pub class_type: String,
    pub owner_user_id: String,
}

/// `huleedu.batch.student.matching.initiate.command.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudentMatchingCommand {
    #[serde(flatten)]
    pub base: CommandBase,
    pub class_id: String,
    pub course_code: CourseCode,
}

/// `huleedu.batch.pipeline.completed.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineCompleted {
    pub event: String,
    pub batch_id: String,
    pub completed_phases: Vec<PhaseName>,
    pub final_status: BatchStatus,
    pub processing_duration_seconds: f64,
    pub successful_essay_count: i64,
    pub failed_essay_count: i64,
    pub correlation_id: Uuid,
    pub metadata: SystemProcessingMetadata,
}

/// `huleedu.pipeline.denied.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineDenied {
    pub event_name: String,
    pub entity_id: String,
    pub entity_type: String,
    pub parent_id: Option<String>,
    #[serde(with = "time")]
    pub timestamp: Timestamp,
    pub batch_id: String,
    pub user_id: String,
    pub org_id: Option<String>,
    pub requested_pipeline: String,
    pub denial_reason: String,
    pub required_credits: i64,
    pub available_credits: i64,
    pub resource_breakdown: Option<BTreeMap<String, i64>>,
    #[serde(with = "time")]
    pub denied_at: Timestamp,
}

/// `huleedu.notification.teacher.requested.v1`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherNotification {
    pub teacher_id: String,
    pub notification_type: String,
    pub category: NotificationCategory,
    pub priority: NotificationPriority,
    pub payload: Map<String, Value>,
    pub action_required: bool,
    #[serde(with = "time::option")]
    pub deadline_timestamp: Option<Timestamp>,
    pub correlation_id: String,
    pub batch_id: Option<String>,
    pub class_id: Option<String>,
    #[serde(with = "time")]
    pub timestamp: Timestamp,
}
