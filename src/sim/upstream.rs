//! Events as the upstream services send them: the essay lifecycle service, class
//! management and the API gateway. Tests and the demo use these to play the fleet.

use serde::Serialize;
use serde_json::{json, Map};
use uuid::Uuid;

use crate::contracts::{
    topics, BatchEssaysReady, BatchStatus, BatchValidationErrors, ClientPipelineRequest,
    ContentProvisioningCompleted, ContentType, CourseCode, Envelope, ErrorSummary, EssayRef,
    FailedEssay, PhaseName, PhaseOutcome, StorageRef, StorageReferenceMetadata, StudentAssociation,
    StudentAssociationsConfirmed, SystemProcessingMetadata, Timestamp,
};

/// Wraps `data` the way the platform's producers do.
pub fn envelope_json<D: Serialize>(
    topic: &str,
    source_service: &str,
    event_id: Uuid,
    correlation_id: Uuid,
    now: Timestamp,
    data: D,
) -> Vec<u8> {
    let envelope = Envelope {
        event_id,
        event_type: topic.to_owned(),
        event_timestamp: now,
        source_service: source_service.to_owned(),
        schema_version: 1,
        correlation_id,
        data_schema_uri: None,
        data,
        metadata: None,
    };
    serde_json::to_vec(&envelope).unwrap_or_else(|e| unreachable!("wire types always encode: {e}"))
}

pub fn content_provisioned(
    batch_id: &str,
    course_code: CourseCode,
    user_id: &str,
    essays: &[EssayRef],
) -> ContentProvisioningCompleted {
    ContentProvisioningCompleted {
        batch_id: batch_id.to_owned(),
        provisioned_count: essays.len() as i64,
        expected_count: essays.len() as i64,
        course_code,
        user_id: user_id.to_owned(),
        essays_for_processing: essays.to_vec(),
        correlation_id: None,
        timestamp: None,
        event: Some("batch.content.provisioning.completed".to_owned()),
    }
}

pub fn associations_confirmed(
    batch_id: &str,
    class_id: &str,
    course_code: CourseCode,
    essay_ids: &[String],
    now: Timestamp,
) -> StudentAssociationsConfirmed {
    StudentAssociationsConfirmed {
        batch_id: batch_id.to_owned(),
        class_id: class_id.to_owned(),
        course_code,
        associations: essay_ids
            .iter()
            .enumerate()
            .map(|(i, id)| StudentAssociation {
                essay_id: id.clone(),
                student_id: Some(format!("student-{i}")),
                confidence_score: 0.93,
                validation_method: "human".to_owned(),
                validated_by: None,
                validated_at: now,
            })
            .collect(),
        timeout_triggered: false,
        validation_summary: Map::new(),
        event_name: Some("student.associations.confirmed".to_owned()),
        entity_id: Some(batch_id.to_owned()),
        entity_type: Some("batch".to_owned()),
        parent_id: None,
        timestamp: Some(now),
    }
}

pub fn essays_ready(
    batch_id: &str,
    course_code: CourseCode,
    class_type: &str,
    essays: &[EssayRef],
    now: Timestamp,
) -> BatchEssaysReady {
    BatchEssaysReady {
        batch_id: batch_id.to_owned(),
        ready_essays: essays.to_vec(),
        metadata: SystemProcessingMetadata::for_batch(batch_id, now),
        course_code,
        course_language: course_code.language().to_owned(),
        class_type: class_type.to_owned(),
        student_prompt_ref: None,
        event: Some("batch.essays.ready".to_owned()),
    }
}

/// A registration's student prompt: a stored text.
pub fn prompt_ref(storage_id: &str) -> StorageReferenceMetadata {
    StorageReferenceMetadata {
        references: [(
            ContentType::StudentPromptText,
            StorageRef {
                storage_id: storage_id.to_owned(),
                path: String::new(),
            },
        )]
        .into(),
    }
}

pub fn pipeline_request(batch_id: &str, target: &str, user_id: &str) -> ClientPipelineRequest {
    ClientPipelineRequest {
        batch_id: batch_id.to_owned(),
        requested_pipeline: target.to_owned(),
        user_id: user_id.to_owned(),
        client_correlation_id: None,
        is_retry: false,
        retry_reason: None,
        prompt_payload: None,
    }
}

/// The outcome the essay lifecycle service reports for a phase: `processed`
/// survive (spellcheck returns new storage ids), `failed` do not.
pub fn phase_outcome(
    batch_id: &str,
    phase: PhaseName,
    processed: &[EssayRef],
    failed: &[String],
    correlation_id: Uuid,
) -> PhaseOutcome {
    let phase_status = match (processed.is_empty(), failed.is_empty()) {
        (true, _) => BatchStatus::FailedCritically,
        (false, true) => BatchStatus::CompletedSuccessfully,
        (false, false) => BatchStatus::CompletedWithFailures,
    };
    let processed = processed
        .iter()
        .map(|e| match phase {
            PhaseName::Spellcheck => {
                EssayRef::new(&e.essay_id, format!("{}-corrected", e.text_storage_id))
            }
            _ => e.clone(),
        })
        .collect();
    PhaseOutcome {
        batch_id: batch_id.to_owned(),
        phase_name: phase,
        phase_status,
        processed_essays: processed,
        failed_essay_ids: failed.to_vec(),
        correlation_id: Some(correlation_id),
    }
}

pub fn validation_errors(
    batch_id: &str,
    essay_ids: &[String],
    critical: bool,
    now: Timestamp,
) -> BatchValidationErrors {
    BatchValidationErrors {
        batch_id: batch_id.to_owned(),
        failed_essays: essay_ids
            .iter()
            .map(|id| FailedEssay {
                essay_id: id.clone(),
                file_name: format!("{id}.docx"),
                error_detail: json!({"error_code": "VALIDATION_ERROR", "message": "empty content"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                failed_at: now,
            })
            .collect(),
        error_summary: ErrorSummary {
            total_errors: essay_ids.len() as i64,
            error_categories: [("empty_content".to_owned(), essay_ids.len() as i64)].into(),
            critical_failure: critical,
        },
        metadata: SystemProcessingMetadata::for_batch(batch_id, now),
        correlation_id: None,
        event: Some("batch.validation.errors.v1".to_owned()),
    }
}

/// The phase a command topic starts, if it is a pipeline command (not student matching).
pub fn phase_of_command(topic: &str) -> Option<PhaseName> {
    topics::phase_of_command(topic).filter(|&phase| phase != PhaseName::StudentMatching)
}
