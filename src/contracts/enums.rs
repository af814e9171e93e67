//! Closed enums of the wire contracts, with their exact spellings.

use serde::{Deserialize, Serialize};

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $wire)] $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The exact wire spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }

            /// Parses the exact wire spelling.
            pub fn parse(value: &str) -> Option<Self> {
                match value { $($wire => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum!(
    /// Lifecycle status of a batch (also the `final_status` of a completed pipeline).
    BatchStatus {
        AwaitingContentValidation => "awaiting_content_validation",
        ContentIngestionFailed => "content_ingestion_failed",
        AwaitingPipelineConfiguration => "awaiting_pipeline_configuration",
        ReadyForPipelineExecution => "ready_for_pipeline_execution",
        ProcessingPipelines => "processing_pipelines",
        AwaitingStudentValidation => "awaiting_student_validation",
        StudentValidationCompleted => "student_validation_completed",
        ValidationTimeoutProcessed => "validation_timeout_processed",
        CompletedSuccessfully => "completed_successfully",
        CompletedWithFailures => "completed_with_failures",
        FailedCritically => "failed_critically",
        Cancelled => "cancelled",
    }
);

wire_enum!(
    /// A processing phase.
    PhaseName {
        Spellcheck => "spellcheck",
        Nlp => "nlp",
        CjAssessment => "cj_assessment",
        AiFeedback => "ai_feedback",
        StudentMatching => "student_matching",
    }
);

wire_enum!(
    /// Status of one phase in the pipeline state.
    PipelineExecutionStatus {
        RequestedByUser => "requested_by_user",
        PendingDependencies => "pending_dependencies",
        DispatchInitiated => "dispatch_initiated",
        InProgress => "in_progress",
        CompletedSuccessfully => "completed_successfully",
        CompletedWithPartialSuccess => "completed_with_partial_success",
        Failed => "failed",
        SkippedDueToDependencyFailure => "skipped_due_to_dependency_failure",
        SkippedByUserConfig => "skipped_by_user_config",
        Cancelled => "cancelled",
    }
);

wire_enum!(
    /// Course codes; each implies a language.
    CourseCode {
        Eng5 => "ENG5",
        Eng6 => "ENG6",
        Eng7 => "ENG7",
        Sv1 => "SV1",
        Sv2 => "SV2",
        Sv3 => "SV3",
    }
);

impl CourseCode {
    /// The language code the platform derives from the course.
    pub fn language(self) -> &'static str {
        match self {
            CourseCode::Eng5 | CourseCode::Eng6 | CourseCode::Eng7 => "en",
            CourseCode::Sv1 | CourseCode::Sv2 | CourseCode::Sv3 => "sv",
        }
    }
}

wire_enum!(
    /// Stage in `SystemProcessingMetadata`.
    ProcessingStage {
        Pending => "pending",
        Initialized => "initialized",
        Processing => "processing",
        Completed => "completed",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

wire_enum!(
    /// Content-type keys of storage references.
    ContentType {
        OriginalEssay => "original_essay",
        CorrectedText => "corrected_text",
        ProcessingLog => "processing_log",
        NlpMetricsJson => "nlp_metrics_json",
        StudentFacingAiFeedbackText => "student_facing_ai_feedback_text",
        AiEditorRevisionText => "ai_editor_revision_text",
        AiDetailedAnalysisJson => "ai_detailed_analysis_json",
        GrammarAnalysisJson => "grammar_analysis_json",
        CjResultsJson => "cj_results_json",
        RawUploadBlob => "raw_upload_blob",
        ExtractedPlaintext => "extracted_plaintext",
        StudentPromptText => "student_prompt_text",
    }
);

wire_enum!(
    /// Teacher-notification category.
    NotificationCategory {
        BatchProgress => "batch_progress",
        ProcessingResults => "processing_results",
        FileOperations => "file_operations",
        ClassManagement => "class_management",
        StudentWorkflow => "student_workflow",
        SystemAlerts => "system_alerts",
    }
);

wire_enum!(
    /// Teacher-notification priority.
    NotificationPriority {
        Critical => "critical",
        Immediate => "immediate",
        High => "high",
        Standard => "standard",
        Low => "low",
    }
);
