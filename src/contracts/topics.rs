//! Topic names, exactly as the platform spells them.

pub const CONTENT_PROVISIONING_COMPLETED: &str = "huleedu.batch.content.provisioning.completed.v1";
pub const STUDENT_ASSOCIATIONS_CONFIRMED: &str = "huleedu.class.student.associations.confirmed.v1";
pub const BATCH_ESSAYS_READY: &str = "huleedu.els.batch.essays.ready.v1";
pub const CLIENT_PIPELINE_REQUEST: &str = "huleedu.commands.batch.pipeline.v1";
pub const PHASE_OUTCOME: &str = "huleedu.els.batch.phase.outcome.v1";
pub const VALIDATION_ERRORS: &str = "huleedu.els.batch.validation.errors.v1";

/// Every topic the worker consumes.
pub const CONSUMED: [&str; 6] = [
    CONTENT_PROVISIONING_COMPLETED,
    STUDENT_ASSOCIATIONS_CONFIRMED,
    BATCH_ESSAYS_READY,
    CLIENT_PIPELINE_REQUEST,
    PHASE_OUTCOME,
    VALIDATION_ERRORS,
];

pub const BATCH_ESSAYS_REGISTERED: &str = "huleedu.batch.essays.registered.v1";
pub const SPELLCHECK_COMMAND: &str = "huleedu.els.spellcheck.initiate.command.v1";
pub const NLP_COMMAND: &str = "huleedu.batch.nlp.initiate.command.v2";
pub const CJ_ASSESSMENT_COMMAND: &str = "huleedu.batch.cj_assessment.initiate.command.v1";
pub const AI_FEEDBACK_COMMAND: &str = "huleedu.batch.ai_feedback.initiate.command.v1";
pub const STUDENT_MATCHING_COMMAND: &str = "huleedu.batch.student.matching.initiate.command.v1";
pub const PIPELINE_COMPLETED: &str = "huleedu.batch.pipeline.completed.v1";
pub const PIPELINE_DENIED: &str = "huleedu.pipeline.denied.v1";
pub const TEACHER_NOTIFICATION: &str = "huleedu.notification.teacher.requested.v1";

/// Every topic the worker publishes.
pub const PUBLISHED: [&str; 9] = [
    BATCH_ESSAYS_REGISTERED,
    SPELLCHECK_COMMAND,
    NLP_COMMAND,
    CJ_ASSESSMENT_COMMAND,
    AI_FEEDBACK_COMMAND,
    STUDENT_MATCHING_COMMAND,
    PIPELINE_COMPLETED,
    PIPELINE_DENIED,
    TEACHER_NOTIFICATION,
];

/// Suffix of the dead-letter topic of a consumed topic.
pub const DLQ_SUFFIX: &str = ".dlq";

/// The dead-letter topic of each consumed topic (registrations are consumed by
/// a shadow run).
pub const DEAD_LETTER: [(&str, &str); 7] = [
    (
        BATCH_ESSAYS_REGISTERED,
        "huleedu.batch.essays.registered.v1.dlq",
    ),
    (
        CONTENT_PROVISIONING_COMPLETED,
        "huleedu.batch.content.provisioning.completed.v1.dlq",
    ),
    (
        STUDENT_ASSOCIATIONS_CONFIRMED,
        "huleedu.class.student.associations.confirmed.v1.dlq",
    ),
    (BATCH_ESSAYS_READY, "huleedu.els.batch.essays.ready.v1.dlq"),
    (
        CLIENT_PIPELINE_REQUEST,
        "huleedu.commands.batch.pipeline.v1.dlq",
    ),
    (PHASE_OUTCOME, "huleedu.els.batch.phase.outcome.v1.dlq"),
    (
        VALIDATION_ERRORS,
        "huleedu.els.batch.validation.errors.v1.dlq",
    ),
];

/// The dead-letter topic of `topic` (unprefixed), if bos consumes it.
pub fn dead_letter_topic(topic: &str) -> Option<&'static str> {
    DEAD_LETTER
        .iter()
        .find(|(source, _)| *source == topic)
        .map(|(_, dlq)| *dlq)
}

/// The name `source_service` carries on everything the worker publishes.
pub const SOURCE_SERVICE: &str = "batch_orchestrator_service";

/// The command topic that starts `phase`.
pub fn command_topic(phase: super::PhaseName) -> &'static str {
    use super::PhaseName;
    match phase {
        PhaseName::Spellcheck => SPELLCHECK_COMMAND,
        PhaseName::Nlp => NLP_COMMAND,
        PhaseName::CjAssessment => CJ_ASSESSMENT_COMMAND,
        PhaseName::AiFeedback => AI_FEEDBACK_COMMAND,
        PhaseName::StudentMatching => STUDENT_MATCHING_COMMAND,
    }
}

/// The phase a command topic starts.
pub fn phase_of_command(topic: &str) -> Option<super::PhaseName> {
    super::PhaseName::ALL
        .iter()
        .copied()
        .find(|&phase| command_topic(phase) == topic)
}

/// Every topic of the platform bos touches, unprefixed, with whether it is a
/// dead-letter topic: what a test or a local cluster creates.
pub fn every_topic() -> Vec<(&'static str, bool)> {
    let mut all: Vec<(&'static str, bool)> = CONSUMED.iter().map(|t| (*t, false)).collect();
    all.extend(PUBLISHED.iter().map(|t| (*t, false)));
    all.extend(DEAD_LETTER.iter().map(|(_, dlq)| (*dlq, true)));
    all
}
