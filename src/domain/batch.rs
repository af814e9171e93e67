//! The batch aggregate: everything the rules read and write for one batch.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::contracts::time::{self, Timestamp};
use crate::contracts::{
    BatchStatus, ClientPipelineRequest, CourseCode, EssayRef, PhaseName, PipelineExecutionStatus,
    StorageReferenceMetadata,
};

/// One batch, as stored. `version` is the optimistic-concurrency counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    pub correlation_id: Uuid,
    pub status: BatchStatus,
    pub context: BatchContext,
    pub essays: Vec<BatchEssay>,
    pub pipeline: PipelineState,
    pub orchestration: Orchestration,
    pub parked: Option<ParkedRequest>,
    pub validation_errors: Vec<ValidationErrorRecord>,
    pub version: i64,
    #[serde(with = "time")]
    pub created_at: Timestamp,
    #[serde(with = "time")]
    pub updated_at: Timestamp,
    #[serde(with = "time::option")]
    pub completed_at: Option<Timestamp>,
}

impl Batch {
    /// `REGULAR` when the batch belongs to a class, else `GUEST`.
    pub fn class_type(&self) -> &'static str {
        if self.context.class_id.is_some() {
            "REGULAR"
        } else {
            "GUEST"
        }
    }

    /// Every essay id that failed a phase whose output later phases rely on.
    pub fn failed_essay_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .orchestration
            .phase_failures
            .values()
            .flatten()
            .cloned()
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    pub fn essay(&self, essay_id: &str) -> Option<&BatchEssay> {
        self.essays.iter().find(|e| e.essay_id == essay_id)
    }

    /// Replaces the stored essays, keeping the corrected text of every essay
    /// whose original text is unchanged (spellcheck's output stays valid).
    pub fn replace_essays(&mut self, refs: &[EssayRef]) {
        let essays = refs
            .iter()
            .map(|r| {
                let mut essay = BatchEssay::from_ref(r);
                if let Some(old) = self.essay(&r.essay_id) {
                    if old.text_storage_id == r.text_storage_id {
                        essay
                            .corrected_text_storage_id
                            .clone_from(&old.corrected_text_storage_id);
                    }
                }
                essay
            })
            .collect();
        self.essays = essays;
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status,
            BatchStatus::FailedCritically | BatchStatus::Cancelled
        )
    }
}

/// What the teacher registered, plus what later requests set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchContext {
    pub course_code: CourseCode,
    pub expected_essay_count: i64,
    pub user_id: String,
    pub org_id: Option<String>,
    pub class_id: Option<String>,
    pub student_prompt_ref: Option<StorageReferenceMetadata>,
    pub cj_default_llm_model: Option<String>,
    pub cj_default_temperature: Option<f64>,
    pub assignment_id: Option<String>,
    /// Internal essay ids generated at registration (global keys for other services).
    pub essay_ids: Vec<String>,
    /// Ids the client sent, kept for reference only.
    pub client_essay_ids: Vec<String>,
}

/// One essay of the batch, with its original text and, once spellcheck has run,
/// its corrected text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEssay {
    pub essay_id: String,
    pub text_storage_id: String,
    pub corrected_text_storage_id: Option<String>,
}

impl BatchEssay {
    pub fn from_ref(essay: &EssayRef) -> Self {
        Self {
            essay_id: essay.essay_id.clone(),
            text_storage_id: essay.text_storage_id.clone(),
            corrected_text_storage_id: None,
        }
    }

    /// The reference a command carries: the corrected text when there is one.
    pub fn command_ref(&self) -> EssayRef {
        EssayRef::new(
            self.essay_id.clone(),
            self.corrected_text_storage_id
                .clone()
                .unwrap_or_else(|| self.text_storage_id.clone()),
        )
    }
}

/// Essay counts of one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EssayCounts {
    pub total: i64,
    pub pending_dispatch_or_processing: i64,
    pub successful: i64,
    pub failed: i64,
}

/// Status of one phase, as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseState {
    pub status: PipelineExecutionStatus,
    pub essay_counts: EssayCounts,
    #[serde(with = "time::option")]
    pub started_at: Option<Timestamp>,
    #[serde(with = "time::option")]
    pub completed_at: Option<Timestamp>,
    pub error_info: Option<Value>,
    pub progress_percentage: u8,
}

impl PhaseState {
    pub fn with_status(status: PipelineExecutionStatus) -> Self {
        Self {
            status,
            essay_counts: EssayCounts::default(),
            started_at: None,
            completed_at: None,
            error_info: None,
            progress_percentage: 0,
        }
    }

    /// Completed fully or partially.
    pub fn is_completed(&self) -> bool {
        matches!(
            self.status,
            PipelineExecutionStatus::CompletedSuccessfully
                | PipelineExecutionStatus::CompletedWithPartialSuccess
        )
    }
}

/// The pipeline state stored with the batch and returned by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineState {
    pub batch_id: String,
    pub requested_pipelines: Vec<PhaseName>,
    pub spellcheck: PhaseState,
    pub nlp: PhaseState,
    pub cj_assessment: PhaseState,
    pub ai_feedback: PhaseState,
    pub student_matching: PhaseState,
    #[serde(with = "time")]
    pub last_updated: Timestamp,
}

impl PipelineState {
    /// No requested phases, every phase `skipped_by_user_config`.
    pub fn initial(batch_id: &str, now: Timestamp) -> Self {
        let skipped = PhaseState::with_status(PipelineExecutionStatus::SkippedByUserConfig);
        Self {
            batch_id: batch_id.to_owned(),
            requested_pipelines: Vec::new(),
            spellcheck: skipped.clone(),
            nlp: skipped.clone(),
            cj_assessment: skipped.clone(),
            ai_feedback: skipped.clone(),
            student_matching: skipped,
            last_updated: now,
        }
    }

    pub fn phase(&self, phase: PhaseName) -> &PhaseState {
        match phase {
            PhaseName::Spellcheck => &self.spellcheck,
            PhaseName::Nlp => &self.nlp,
            PhaseName::CjAssessment => &self.cj_assessment,
            PhaseName::AiFeedback => &self.ai_feedback,
            PhaseName::StudentMatching => &self.student_matching,
        }
    }

    pub fn phase_mut(&mut self, phase: PhaseName) -> &mut PhaseState {
        match phase {
            PhaseName::Spellcheck => &mut self.spellcheck,
            PhaseName::Nlp => &mut self.nlp,
            PhaseName::CjAssessment => &mut self.cj_assessment,
            PhaseName::AiFeedback => &mut self.ai_feedback,
            PhaseName::StudentMatching => &mut self.student_matching,
        }
    }
}

/// Bookkeeping the rules need beyond what the API shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Orchestration {
    /// The essays-ready event arrived while student validation was still pending.
    pub essays_ready_received: bool,
    pub runs_started: u32,
    pub current_run: Option<Run>,
    /// Correlation ids of finished runs: outcomes carrying them are stale.
    pub earlier_runs: Vec<Uuid>,
    /// Essays that failed each phase the last time it ended.
    pub phase_failures: BTreeMap<PhaseName, Vec<String>>,
    /// Essays that came through each phase the last time it ended.
    #[serde(default)]
    pub phase_survivors: BTreeMap<PhaseName, Vec<String>>,
}

/// One pipeline run in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub correlation_id: Uuid,
    pub requested_pipeline: PhaseName,
    pub phases: Vec<PhaseName>,
    pub input_essays: Vec<String>,
    #[serde(with = "time")]
    pub started_at: Timestamp,
    /// Index into `phases` of the phase awaiting its outcome.
    pub current: usize,
    /// Essays sent to each phase dispatched so far.
    pub dispatched: BTreeMap<PhaseName, Vec<String>>,
    /// Essays that came through each phase of this run that has ended.
    #[serde(default)]
    pub survivors: BTreeMap<PhaseName, Vec<String>>,
    pub user_id: String,
}

/// A pipeline request waiting for the batch to become ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParkedRequest {
    pub event_id: Uuid,
    pub correlation_id: Uuid,
    /// The trace the request arrived in: its run's commands continue it.
    #[serde(default)]
    pub traceparent: Option<String>,
    pub request: ClientPipelineRequest,
    #[serde(with = "time")]
    pub parked_at: Timestamp,
}

/// A validation-errors event, as recorded on the batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationErrorRecord {
    pub event_id: Uuid,
    #[serde(with = "time")]
    pub received_at: Timestamp,
    pub critical_failure: bool,
    pub total_errors: i64,
    pub error_categories: BTreeMap<String, i64>,
    pub failed_essay_ids: Vec<String>,
}
