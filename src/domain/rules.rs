//! The orchestration rules: `(batch, event, now, ids, credit answers) -> decision`.
//! No I/O: when a run would start and the credit policy has not answered yet,
//! the decision says which question to ask ([`Decision::NeedsCredit`]); the
//! caller asks and decides again with the answer.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::batch::{
    Batch, BatchContext, BatchEssay, EssayCounts, Orchestration, ParkedRequest, PhaseState,
    PipelineState, Run, ValidationErrorRecord,
};
use super::message::{MessageContext, OutboundMessage};
use super::policy::{credit_breakdown, CreditAnswers, CreditQuery, CreditVerdict, PhaseGraph};
use crate::contracts::topics;
use crate::contracts::{
    AiFeedbackCommand, BatchEssaysReady, BatchEssaysRegistered, BatchStatus, BatchValidationErrors,
    CjAssessmentCommand, ClientPipelineRequest, CommandBase, ContentProvisioningCompleted,
    ContentType, CourseCode, EssayRef, InboundEvent, NlpCommand, NotificationCategory,
    NotificationPriority, PhaseName, PhaseOutcome, PipelineCompleted, PipelineDenied,
    PipelineExecutionStatus, SpellcheckCommand, StorageReferenceMetadata,
    StudentAssociationsConfirmed, StudentMatchingCommand, SystemProcessingMetadata,
    TeacherNotification, Timestamp,
};

/// A source of fresh ids, injected so decisions are reproducible in tests.
pub trait IdSource {
    fn next_id(&mut self) -> Uuid;
}

/// Random (v4) ids: production.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomIds;

impl IdSource for RandomIds {
    fn next_id(&mut self) -> Uuid {
        Uuid::new_v4()
    }
}

/// Deterministic ids from a counter: tests.
#[derive(Debug, Default, Clone)]
pub struct SequentialIds(pub u128);

impl IdSource for SequentialIds {
    fn next_id(&mut self) -> Uuid {
        self.0 += 1;
        Uuid::from_u128(self.0)
    }
}

/// Time, ids and the credit answers known so far, for one decision.
pub struct Env<'a> {
    pub now: Timestamp,
    pub ids: &'a mut dyn IdSource,
    pub credits: &'a CreditAnswers,
}

/// Envelope facts about the consumed event the rules use.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMeta {
    pub event_id: Uuid,
    pub correlation_id: Uuid,
    pub traceparent: Option<String>,
}

/// One phase changing status, for the phase-status log.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseTransition {
    pub phase: PhaseName,
    pub from: PipelineExecutionStatus,
    pub to: PipelineExecutionStatus,
    pub correlation_id: Uuid,
    pub completed_at: Option<Timestamp>,
}

/// What an event does to its batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Effects {
    /// The batch after the event (equal to the batch before when only messages go out).
    pub batch: Batch,
    /// The stored batch must be rewritten.
    pub changed: bool,
    pub messages: Vec<OutboundMessage>,
    /// The essays changed (so the store rewrites them).
    pub essays_changed: bool,
    pub transitions: Vec<PhaseTransition>,
    /// The resolved configuration of a run this decision starts.
    pub snapshot: Option<Value>,
    /// Remarks worth logging (ids never dispatched, parked requests …).
    pub notes: Vec<String>,
}

/// The outcome of one event.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // Apply is the common case.
pub enum Decision {
    /// State changed and/or messages to publish, with the inbox row.
    Apply(Effects),
    /// Does not fit the batch's state: nothing changes, the event counts as processed.
    Ignore(String),
    /// Can never succeed: dead letter, no inbox row (so a replay is processed normally).
    DeadLetter { reason: &'static str, error: String },
    /// A run would start: the credit policy must answer this first.
    NeedsCredit(CreditQuery),
}

impl Decision {
    fn dead_letter(reason: &'static str, error: impl Into<String>) -> Self {
        Decision::DeadLetter {
            reason,
            error: error.into(),
        }
    }
}

/// Why a handler stopped early.
enum Stop {
    Ignore(String),
    NeedsCredit(CreditQuery),
}

type Step = Result<(), Stop>;

fn ignore(reason: String) -> Step {
    Err(Stop::Ignore(reason))
}

/// A registration request (HTTP body).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct RegistrationRequest {
    pub expected_essay_count: i64,
    #[serde(default)]
    pub essay_ids: Option<Vec<String>>,
    pub course_code: CourseCode,
    #[serde(default)]
    pub student_prompt_ref: Option<StorageReferenceMetadata>,
    pub user_id: String,
    #[serde(default)]
    pub org_id: Option<String>,
    #[serde(default)]
    pub class_id: Option<String>,
    #[serde(default)]
    pub cj_default_llm_model: Option<String>,
    #[serde(default)]
    pub cj_default_temperature: Option<f64>,
    #[serde(default)]
    pub assignment_id: Option<String>,
}

/// One offending field of a request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl RegistrationRequest {
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut fail = |field, message: &str| {
            errors.push(FieldError {
                field,
                message: message.to_owned(),
            });
        };
        if self.expected_essay_count <= 0 {
            fail("expected_essay_count", "must be greater than 0");
        }
        if self.expected_essay_count > 10_000 {
            fail("expected_essay_count", "must be at most 10000");
        }
        if let Some(ids) = &self.essay_ids {
            if ids.is_empty() {
                fail("essay_ids", "must not be an empty list");
            } else if i64::try_from(ids.len()).ok() != Some(self.expected_essay_count) {
                fail("essay_ids", "length must equal expected_essay_count");
            }
            let unique: BTreeSet<&String> = ids.iter().collect();
            if unique.len() != ids.len() {
                fail("essay_ids", "must not repeat an id");
            }
        }
        if self.user_id.trim().is_empty() {
            fail("user_id", "must not be empty");
        }
        if let Some(t) = self.cj_default_temperature {
            if !(0.0..=2.0).contains(&t) {
                fail("cj_default_temperature", "must be between 0 and 2");
            }
        }
        if let Some(a) = &self.assignment_id {
            if a.trim().chars().count() > 100 {
                fail("assignment_id", "must be at most 100 characters");
            }
        }
        for (field, value) in self.strings() {
            if value.contains('\0') {
                fail(field, "must not contain NUL characters");
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn strings(&self) -> Vec<(&'static str, &str)> {
        let mut out = vec![("user_id", self.user_id.as_str())];
        for (field, value) in [
            ("org_id", &self.org_id),
            ("class_id", &self.class_id),
            ("cj_default_llm_model", &self.cj_default_llm_model),
            ("assignment_id", &self.assignment_id),
        ] {
            if let Some(v) = value {
                out.push((field, v.as_str()));
            }
        }
        for id in self.essay_ids.iter().flatten() {
            out.push(("essay_ids", id.as_str()));
        }
        if let Some(prompt) = &self.student_prompt_ref {
            for r in prompt.references.values() {
                out.push(("student_prompt_ref", r.storage_id.as_str()));
                out.push(("student_prompt_ref", r.path.as_str()));
            }
        }
        out
    }
}

/// Denial reasons on `pipeline.denied`.
pub mod denial {
    pub const UNSUPPORTED_PIPELINE: &str = "unsupported_pipeline";
    pub const BATCH_FAILED: &str = "batch_failed";
    pub const PROMPT_NOT_ATTACHED: &str = "prompt_not_attached";
    pub const INSUFFICIENT_CREDITS: &str = "insufficient_credits";
    pub const RATE_LIMIT_EXCEEDED: &str = "rate_limit_exceeded";
    pub const ENTITLEMENTS_UNAVAILABLE: &str = "entitlements_unavailable";
}

/// Dead-letter reasons the rules produce.
pub mod dead_letter {
    pub const UNKNOWN_BATCH: &str = "unknown_batch";
    pub const EMPTY_READY_ESSAYS: &str = "empty_ready_essays";
}

/// What preflight (and the start of a run) resolves for a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub target: PhaseName,
    /// Every phase the target needs, in order, the target last.
    pub chain: Vec<PhaseName>,
    /// The phases that would run after pruning.
    pub phases: Vec<PhaseName>,
    pub input_essays: Vec<String>,
    /// Always both resources, zero when unused.
    pub breakdown: BTreeMap<String, i64>,
    pub required_credits: i64,
    /// The question for the credit policy; `None` when nothing is billable.
    pub credit_query: Option<CreditQuery>,
    /// Some phase of the chain needs a prompt and none is attached.
    pub prompt_missing: bool,
}

/// The rules, with their configuration.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub graph: PhaseGraph,
}

/// Collects the messages of one decision.
struct Out<'a> {
    ctx: MessageContext<'a>,
    messages: Vec<OutboundMessage>,
    notes: Vec<String>,
    snapshot: Option<Value>,
}

/// Whether a prompt is attached: the batch's, or the one a request brings.
fn prompt_attached(context: &BatchContext) -> bool {
    context.student_prompt_ref.is_some()
        || context
            .assignment_id
            .as_deref()
            .is_some_and(|a| !a.trim().is_empty())
}

/// The batch context as a started request leaves it: `assignment_id` stored,
/// `cms_prompt_ref` replacing the prompt reference.
fn with_prompt(context: &BatchContext, request: &ClientPipelineRequest) -> BatchContext {
    let mut context = context.clone();
    if let Some(prompt) = &request.prompt_payload {
        if let Some(assignment_id) = &prompt.assignment_id {
            context.assignment_id = Some(assignment_id.clone());
        }
        if let Some(prompt_ref) = &prompt.cms_prompt_ref {
            context.student_prompt_ref = Some(prompt_ref.clone());
        }
    }
    context
}

/// A batch as registration leaves it: awaiting its content.
fn new_batch(id: String, correlation_id: Uuid, context: BatchContext, now: Timestamp) -> Batch {
    Batch {
        pipeline: PipelineState::initial(&id, now),
        id,
        correlation_id,
        status: BatchStatus::AwaitingContentValidation,
        essays: Vec::new(),
        orchestration: Orchestration::default(),
        parked: None,
        validation_errors: Vec::new(),
        version: 0,
        created_at: now,
        updated_at: now,
        completed_at: None,
        context,
    }
}

impl Rules {
    pub fn new(graph: PhaseGraph) -> Self {
        Self { graph }
    }

    // ------------------------------------------------------------ registration

    /// Handler 1: a new batch, with its registered event.
    pub fn register(
        &self,
        request: &RegistrationRequest,
        correlation_id: Uuid,
        env: &mut Env<'_>,
    ) -> Result<Effects, Vec<FieldError>> {
        request.validate()?;
        let batch_id = env.ids.next_id().to_string();
        let essay_ids: Vec<String> = (0..request.expected_essay_count)
            .map(|_| env.ids.next_id().to_string())
            .collect();
        let context = BatchContext {
            course_code: request.course_code,
            expected_essay_count: request.expected_essay_count,
            user_id: request.user_id.trim().to_owned(),
            org_id: request.org_id.clone(),
            class_id: request.class_id.clone().filter(|c| !c.trim().is_empty()),
            student_prompt_ref: request.student_prompt_ref.clone(),
            cj_default_llm_model: request.cj_default_llm_model.clone(),
            cj_default_temperature: request.cj_default_temperature,
            // An empty assignment id means none (the platform's models treat it so).
            assignment_id: request
                .assignment_id
                .as_deref()
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned),
            essay_ids: essay_ids.clone(),
            client_essay_ids: request.essay_ids.clone().unwrap_or_default(),
        };
        let batch = new_batch(batch_id.clone(), correlation_id, context, env.now);
        let ctx = MessageContext {
            batch_id: &batch_id,
            correlation_id,
            now: env.now,
            traceparent: None,
        };
        let mut metadata = SystemProcessingMetadata::for_batch(&batch_id, env.now);
        metadata.event = Some("batch.essays.registered".to_owned());
        let registered = BatchEssaysRegistered {
            event: "batch.essays.registered".to_owned(),
            entity_id: batch_id.clone(),
            expected_essay_count: request.expected_essay_count,
            essay_ids,
            metadata,
            course_code: request.course_code,
            student_prompt_ref: batch.context.student_prompt_ref.clone(),
            user_id: batch.context.user_id.clone(),
            org_id: batch.context.org_id.clone(),
            class_id: batch.context.class_id.clone(),
        };
        let message = ctx.message(
            env.ids.next_id(),
            topics::BATCH_ESSAYS_REGISTERED,
            registered,
            None,
        );
        Ok(Effects {
            batch,
            changed: true,
            messages: vec![message],
            essays_changed: false,
            transitions: Vec::new(),
            snapshot: None,
            notes: Vec::new(),
        })
    }

    /// A batch the live service registered, as a shadow run learns it from
    /// the registered event: the same batch `register` would have made,
    /// nothing published (the live service already did).
    fn adopt(
        &self,
        registered: &BatchEssaysRegistered,
        meta: &EventMeta,
        env: &mut Env<'_>,
    ) -> Effects {
        let context = BatchContext {
            course_code: registered.course_code,
            expected_essay_count: registered.expected_essay_count,
            user_id: registered.user_id.clone(),
            org_id: registered.org_id.clone(),
            class_id: registered.class_id.clone().filter(|c| !c.trim().is_empty()),
            student_prompt_ref: registered.student_prompt_ref.clone(),
            cj_default_llm_model: None,
            cj_default_temperature: None,
            assignment_id: None,
            essay_ids: registered.essay_ids.clone(),
            client_essay_ids: Vec::new(),
        };
        Effects {
            batch: new_batch(
                registered.entity_id.clone(),
                meta.correlation_id,
                context,
                env.now,
            ),
            changed: true,
            messages: Vec::new(),
            essays_changed: false,
            transitions: Vec::new(),
            snapshot: None,
            notes: vec![format!(
                "batch {} adopted from its registration",
                registered.entity_id
            )],
        }
    }

    // ------------------------------------------------------------ consumed events

    /// Handlers 2–7: one event against the batch as read (`None`: unknown).
    pub fn decide(
        &self,
        batch: Option<&Batch>,
        event: &InboundEvent,
        meta: &EventMeta,
        env: &mut Env<'_>,
    ) -> Decision {
        if let InboundEvent::Registered(registered) = event {
            return match batch {
                Some(_) => {
                    Decision::Ignore(format!("batch `{}` is already known", registered.entity_id))
                }
                None => Decision::Apply(self.adopt(registered, meta, env)),
            };
        }
        let Some(before) = batch else {
            return Decision::dead_letter(
                dead_letter::UNKNOWN_BATCH,
                format!("batch `{}` is not known", event.batch_id()),
            );
        };
        if let InboundEvent::EssaysReady(e) = event {
            if e.ready_essays.is_empty() {
                return Decision::dead_letter(
                    dead_letter::EMPTY_READY_ESSAYS,
                    format!(
                        "essays-ready event for batch `{}` lists no essay",
                        e.batch_id
                    ),
                );
            }
        }
        let mut batch = before.clone();
        let batch_id = before.id.clone();
        let mut out = Out {
            ctx: MessageContext {
                batch_id: &batch_id,
                correlation_id: meta.correlation_id,
                now: env.now,
                traceparent: meta.traceparent.clone(),
            },
            messages: Vec::new(),
            notes: Vec::new(),
            snapshot: None,
        };
        let result = match event {
            InboundEvent::ContentProvisioned(e) => {
                self.content_provisioned(&mut batch, e, &mut out, env)
            }
            InboundEvent::AssociationsConfirmed(e) => {
                self.associations_confirmed(&mut batch, e, &mut out, env)
            }
            InboundEvent::EssaysReady(e) => self.essays_ready(&mut batch, e, &mut out, env),
            InboundEvent::ValidationErrors(e) => {
                self.validation_errors(&mut batch, e, meta, &mut out, env)
            }
            InboundEvent::PipelineRequest(e) => {
                let request = ParkedRequest {
                    event_id: meta.event_id,
                    correlation_id: meta.correlation_id,
                    traceparent: meta.traceparent.clone(),
                    request: e.clone(),
                    parked_at: env.now,
                };
                self.pipeline_request(&mut batch, request, &mut out, env)
            }
            InboundEvent::PhaseOutcome(e) => self.phase_outcome(&mut batch, e, &mut out, env),
            // Answered before the batch is looked at.
            InboundEvent::Registered(e) => {
                ignore(format!("batch `{}` is already known", e.entity_id))
            }
        };
        match result {
            Err(Stop::Ignore(reason)) => Decision::Ignore(reason),
            Err(Stop::NeedsCredit(query)) => Decision::NeedsCredit(query),
            Ok(()) => {
                let Out {
                    messages,
                    notes,
                    snapshot,
                    ctx,
                } = out;
                let changed = batch != *before;
                if changed {
                    batch.updated_at = env.now;
                    if batch.pipeline != before.pipeline {
                        batch.pipeline.last_updated = env.now;
                    }
                }
                let correlation = batch
                    .orchestration
                    .current_run
                    .as_ref()
                    .map_or(ctx.correlation_id, |r| r.correlation_id);
                Decision::Apply(Effects {
                    transitions: transitions(&before.pipeline, &batch.pipeline, correlation),
                    essays_changed: batch.essays != before.essays,
                    changed,
                    batch,
                    messages,
                    snapshot,
                    notes,
                })
            }
        }
    }

    /// Handler 2.
    fn content_provisioned(
        &self,
        batch: &mut Batch,
        e: &ContentProvisioningCompleted,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Step {
        if batch.status != BatchStatus::AwaitingContentValidation {
            return ignore(format!("content provisioned while {}", batch.status));
        }
        batch.replace_essays(&e.essays_for_processing);
        let Some(class_id) = batch.context.class_id.clone() else {
            return self.become_ready(batch, out, env);
        };
        batch.status = BatchStatus::AwaitingStudentValidation;
        let essays: Vec<EssayRef> = batch
            .essays
            .iter()
            .map(|e| EssayRef::new(&e.essay_id, &e.text_storage_id))
            .collect();
        *batch.pipeline.phase_mut(PhaseName::StudentMatching) = PhaseState {
            status: PipelineExecutionStatus::DispatchInitiated,
            essay_counts: EssayCounts {
                total: len(&essays),
                pending_dispatch_or_processing: len(&essays),
                successful: 0,
                failed: 0,
            },
            started_at: Some(env.now),
            completed_at: None,
            error_info: None,
            progress_percentage: 0,
        };
        let command = StudentMatchingCommand {
            base: command_base(
                "batch.student.matching.initiate.command",
                &batch.id,
                env.now,
                essays,
            ),
            class_id,
            course_code: batch.context.course_code,
        };
        let metadata = command_metadata(batch, out.ctx.traceparent.as_deref());
        let message = out.ctx.message(
            env.ids.next_id(),
            topics::STUDENT_MATCHING_COMMAND,
            command,
            Some(metadata),
        );
        out.messages.push(message);
        Ok(())
    }

    /// Handler 3.
    fn associations_confirmed(
        &self,
        batch: &mut Batch,
        e: &StudentAssociationsConfirmed,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Step {
        if batch.status != BatchStatus::AwaitingStudentValidation {
            return ignore(format!("associations confirmed while {}", batch.status));
        }
        let matching = batch.pipeline.phase_mut(PhaseName::StudentMatching);
        let total = matching.essay_counts.total;
        let confirmed = len(&e.associations);
        *matching = PhaseState {
            status: PipelineExecutionStatus::CompletedSuccessfully,
            essay_counts: EssayCounts {
                total,
                pending_dispatch_or_processing: 0,
                successful: confirmed.min(total),
                failed: (total - confirmed).max(0),
            },
            started_at: matching.started_at,
            completed_at: Some(env.now),
            error_info: None,
            progress_percentage: 100,
        };
        if batch.orchestration.essays_ready_received {
            self.become_ready(batch, out, env)
        } else {
            batch.status = BatchStatus::StudentValidationCompleted;
            Ok(())
        }
    }

    /// Handler 4 (empty lists are dead-lettered before this).
    fn essays_ready(
        &self,
        batch: &mut Batch,
        e: &BatchEssaysReady,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Step {
        match batch.status {
            BatchStatus::StudentValidationCompleted => {
                batch.replace_essays(&e.ready_essays);
                self.become_ready(batch, out, env)
            }
            BatchStatus::AwaitingStudentValidation => {
                batch.replace_essays(&e.ready_essays);
                batch.orchestration.essays_ready_received = true;
                Ok(())
            }
            BatchStatus::ReadyForPipelineExecution => {
                batch.replace_essays(&e.ready_essays);
                Ok(())
            }
            other => ignore(format!("essays ready while {other}")),
        }
    }

    /// Handler 5.
    fn validation_errors(
        &self,
        batch: &mut Batch,
        e: &BatchValidationErrors,
        meta: &EventMeta,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Step {
        batch.validation_errors.push(ValidationErrorRecord {
            event_id: meta.event_id,
            received_at: env.now,
            critical_failure: e.error_summary.critical_failure,
            total_errors: e.error_summary.total_errors,
            error_categories: e.error_summary.error_categories.clone(),
            failed_essay_ids: e.failed_essays.iter().map(|f| f.essay_id.clone()).collect(),
        });
        let fails = e.error_summary.critical_failure
            && batch.orchestration.runs_started == 0
            && !batch.is_terminal();
        if fails {
            batch.status = BatchStatus::FailedCritically;
            batch.completed_at = Some(env.now);
            if let Some(parked) = batch.parked.take() {
                self.deny(batch, &parked, denial::BATCH_FAILED, None, out, env);
            }
        }
        Ok(())
    }

    /// Handler 6: a request (from Kafka, parked earlier, or a retry over HTTP).
    fn pipeline_request(
        &self,
        batch: &mut Batch,
        request: ParkedRequest,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Step {
        let target = match PhaseName::parse(request.request.requested_pipeline.trim()) {
            Some(target) if self.graph.contains(target) => target,
            _ => {
                self.deny(
                    batch,
                    &request,
                    denial::UNSUPPORTED_PIPELINE,
                    None,
                    out,
                    env,
                );
                return Ok(());
            }
        };
        if batch.is_terminal() {
            self.deny(batch, &request, denial::BATCH_FAILED, None, out, env);
            return Ok(());
        }
        if request.request.is_retry {
            if let Some(why) = self.retry_in_flight(batch, target, &request) {
                return ignore(why);
            }
        }
        if batch.status != BatchStatus::ReadyForPipelineExecution {
            if let Some(replaced) = &batch.parked {
                out.notes.push(format!(
                    "parked request {} replaced by {}",
                    replaced.event_id, request.event_id
                ));
            }
            batch.parked = Some(request);
            return Ok(());
        }
        self.start(batch, target, request, out, env)
    }

    /// A retry of `target` while the same retry is already waiting or running.
    fn retry_in_flight(
        &self,
        batch: &Batch,
        target: PhaseName,
        request: &ParkedRequest,
    ) -> Option<String> {
        if let Some(parked) = &batch.parked {
            if parked.request.is_retry && parked.request.requested_pipeline == target.as_str() {
                return Some(format!(
                    "a retry of {target} is already waiting (request {})",
                    parked.event_id
                ));
            }
        }
        let run = batch.orchestration.current_run.as_ref()?;
        let running = run.requested_pipeline == target
            && run.phases[run.current..].iter().any(|&p| {
                matches!(
                    batch.pipeline.phase(p).status,
                    PipelineExecutionStatus::PendingDependencies
                        | PipelineExecutionStatus::DispatchInitiated
                        | PipelineExecutionStatus::InProgress
                )
            });
        running.then(|| {
            format!(
                "{target} is already running (run {}); retry {} not started again",
                run.correlation_id, request.event_id
            )
        })
    }

    /// Resolution, pruning, the prompt gate and the credit question, without
    /// changing anything (`None`: the target is not a pipeline phase).
    pub fn resolve(
        &self,
        batch: &Batch,
        target: PhaseName,
        is_retry: bool,
        context: &BatchContext,
    ) -> Option<Resolution> {
        let chain = self.graph.resolve(target).ok()?;
        let mut rerun: BTreeSet<PhaseName> = BTreeSet::new();
        let mut pruned = Vec::new();
        let mut phases = Vec::new();
        for &phase in &chain {
            let prunable = match batch.pipeline.phase(phase).status {
                PipelineExecutionStatus::CompletedSuccessfully => true,
                PipelineExecutionStatus::CompletedWithPartialSuccess => !is_retry,
                _ => false,
            };
            // A phase whose input is produced again runs again too.
            let inputs_rerun = self
                .graph
                .node(phase)
                .is_some_and(|n| n.depends_on.iter().any(|d| rerun.contains(d)));
            if prunable && !inputs_rerun {
                pruned.push(phase);
            } else {
                rerun.insert(phase);
                phases.push(phase);
            }
        }
        let input_essays: Vec<String> = batch
            .essays
            .iter()
            .filter(|e| {
                pruned
                    .iter()
                    .all(|p| survived(&batch.orchestration, *p, &e.essay_id))
            })
            .map(|e| e.essay_id.clone())
            .collect();
        let breakdown = credit_breakdown(&phases, len(&input_essays));
        let required_credits = breakdown.values().sum();
        let requirements: BTreeMap<String, i64> = breakdown
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(k, &n)| (k.clone(), n))
            .collect();
        let credit_query = (!requirements.is_empty()).then(|| CreditQuery {
            user_id: context.user_id.clone(),
            org_id: context.org_id.clone(),
            requirements,
        });
        let prompt_missing =
            !prompt_attached(context) && chain.iter().any(|&p| self.graph.requires_prompt(p));
        Some(Resolution {
            target,
            chain,
            phases,
            input_essays,
            breakdown,
            required_credits,
            credit_query,
            prompt_missing,
        })
    }

    /// Starts a run for `request` on a ready batch (or answers it at once).
    fn start(
        &self,
        batch: &mut Batch,
        target: PhaseName,
        request: ParkedRequest,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Step {
        out.ctx.correlation_id = request.correlation_id;
        if request.traceparent.is_some() {
            out.ctx.traceparent.clone_from(&request.traceparent);
        }
        let context = with_prompt(&batch.context, &request.request);
        let Some(resolution) = self.resolve(batch, target, request.request.is_retry, &context)
        else {
            self.deny(
                batch,
                &request,
                denial::UNSUPPORTED_PIPELINE,
                None,
                out,
                env,
            );
            return Ok(());
        };
        if resolution.prompt_missing {
            self.deny(
                batch,
                &request,
                denial::PROMPT_NOT_ATTACHED,
                Some(&resolution),
                out,
                env,
            );
            return Ok(());
        }
        let available = match &resolution.credit_query {
            None => 0,
            Some(query) => match env.credits.get(query) {
                None => return Err(Stop::NeedsCredit(query.clone())),
                Some(CreditVerdict::Allowed { available }) => *available,
                Some(CreditVerdict::Denied { reason, available }) => {
                    let reason = denial_reason(reason);
                    self.deny_for_credits(
                        batch,
                        &request,
                        reason,
                        &resolution,
                        *available,
                        out,
                        env,
                    );
                    return Ok(());
                }
            },
        };
        // The request is accepted: its prompt becomes the batch's.
        batch.context = context;
        if resolution.phases.is_empty() || resolution.input_essays.is_empty() {
            self.complete_at_once(batch, &resolution, out, env);
            return Ok(());
        }
        let first = resolution.phases[0];
        let run = Run {
            correlation_id: request.correlation_id,
            requested_pipeline: target,
            phases: resolution.phases.clone(),
            input_essays: resolution.input_essays.clone(),
            started_at: env.now,
            current: 0,
            dispatched: BTreeMap::new(),
            survivors: BTreeMap::new(),
            user_id: request.request.user_id.clone(),
        };
        batch.orchestration.runs_started += 1;
        batch.orchestration.current_run = Some(run);
        batch
            .pipeline
            .requested_pipelines
            .clone_from(&resolution.phases);
        for &phase in &resolution.phases {
            *batch.pipeline.phase_mut(phase) =
                PhaseState::with_status(PipelineExecutionStatus::PendingDependencies);
        }
        batch.status = BatchStatus::ProcessingPipelines;
        out.snapshot = Some(json!({
            "requested_pipeline": target,
            "is_retry": request.request.is_retry,
            "retry_reason": request.request.retry_reason,
            "dependency_graph": self.graph.phases()
                .map(|(p, n)| (p.as_str(), &n.depends_on))
                .collect::<BTreeMap<_, _>>(),
            "resolved_pipeline": resolution.chain,
            "phases_to_run": resolution.phases,
            "input_essay_count": resolution.input_essays.len(),
            "required_credits": resolution.required_credits,
            "available_credits": available,
            "resource_breakdown": resolution.breakdown,
        }));
        let essays = self.phase_input(batch, first);
        self.dispatch(batch, first, essays, out, env);
        let payload = json!({
            "batch_id": batch.id,
            "requested_pipeline": target,
            "resolved_pipeline": resolution.phases,
            "first_phase": first,
            "total_phases": resolution.phases.len(),
            "message": format!("Processing started: {} phase(s), beginning with {first}", resolution.phases.len()),
        });
        self.notify(
            batch,
            "batch_processing_started",
            NotificationPriority::Low,
            false,
            payload,
            out,
            env,
        );
        Ok(())
    }

    /// The essays `phase` gets in the current run: the run's input, less those
    /// that did not come through a phase it depends on that ran in this run.
    fn phase_input(&self, batch: &Batch, phase: PhaseName) -> Vec<String> {
        let Some(run) = &batch.orchestration.current_run else {
            return Vec::new();
        };
        let ancestors = self.graph.ancestors(phase);
        run.input_essays
            .iter()
            .filter(|id| {
                ancestors
                    .iter()
                    .filter_map(|d| run.survivors.get(d))
                    .all(|s| s.contains(id))
            })
            .cloned()
            .collect()
    }

    /// Everything the target needs is done already: report it without a run.
    fn complete_at_once(
        &self,
        batch: &mut Batch,
        resolution: &Resolution,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) {
        let satisfied: Vec<PhaseName> = resolution
            .chain
            .iter()
            .copied()
            .filter(|&p| batch.pipeline.phase(p).is_completed())
            .collect();
        let successful = len(&resolution.input_essays);
        let failed = len(&batch.essays) - successful;
        self.publish_completion(batch, satisfied, successful, failed, 0.0, out, env);
    }

    /// Marks `phase` dispatched and publishes its command for `essay_ids`.
    fn dispatch(
        &self,
        batch: &mut Batch,
        phase: PhaseName,
        essay_ids: Vec<String>,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) {
        let essays: Vec<EssayRef> = essay_ids
            .iter()
            .filter_map(|id| batch.essay(id))
            .map(BatchEssay::command_ref)
            .collect();
        let total = len(&essays);
        *batch.pipeline.phase_mut(phase) = PhaseState {
            status: PipelineExecutionStatus::DispatchInitiated,
            essay_counts: EssayCounts {
                total,
                pending_dispatch_or_processing: total,
                successful: 0,
                failed: 0,
            },
            started_at: Some(env.now),
            completed_at: None,
            error_info: None,
            progress_percentage: 0,
        };
        if let Some(run) = batch.orchestration.current_run.as_mut() {
            run.dispatched.insert(phase, essay_ids);
        }
        let ctx = &batch.context;
        let language = ctx.course_code.language().to_owned();
        let class_type = batch.class_type().to_owned();
        let now = env.now;
        let base = |name: &str| command_base(name, &batch.id, now, essays.clone());
        let metadata = Some(command_metadata(batch, out.ctx.traceparent.as_deref()));
        let id = env.ids.next_id();
        let message = match phase {
            PhaseName::Spellcheck => out.ctx.message(
                id,
                topics::SPELLCHECK_COMMAND,
                SpellcheckCommand {
                    base: base("batch.spellcheck.initiate.command"),
                    language,
                },
                metadata,
            ),
            PhaseName::Nlp => out.ctx.message(
                id,
                topics::NLP_COMMAND,
                NlpCommand {
                    base: base("batch.nlp.initiate.command.v2"),
                    language,
                    student_prompt_ref: ctx.student_prompt_ref.clone(),
                },
                metadata,
            ),
            PhaseName::CjAssessment => out.ctx.message(
                id,
                topics::CJ_ASSESSMENT_COMMAND,
                CjAssessmentCommand {
                    base: base("batch.cj_assessment.initiate.command"),
                    language,
                    course_code: ctx.course_code,
                    student_prompt_ref: ctx.student_prompt_ref.clone(),
                    class_type,
                    assignment_id: ctx.assignment_id.clone(),
                },
                metadata,
            ),
            PhaseName::AiFeedback => out.ctx.message(
                id,
                topics::AI_FEEDBACK_COMMAND,
                AiFeedbackCommand {
                    base: base("batch.ai_feedback.initiate.command"),
                    language,
                    course_code: ctx.course_code,
                    student_prompt_ref: ctx.student_prompt_ref.clone(),
                    class_type,
                    owner_user_id: ctx.user_id.clone(),
                },
                metadata,
            ),
            // The graph refuses student matching; registration flows send it themselves.
            PhaseName::StudentMatching => return,
        };
        out.messages.push(message);
    }

    /// Handler 7.
    fn phase_outcome(
        &self,
        batch: &mut Batch,
        e: &PhaseOutcome,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Step {
        let Some(run) = batch.orchestration.current_run.clone() else {
            return ignore(format!("{} outcome with no run in progress", e.phase_name));
        };
        let outcome_correlation = e.correlation_id.unwrap_or(out.ctx.correlation_id);
        if outcome_correlation != run.correlation_id
            && batch
                .orchestration
                .earlier_runs
                .contains(&outcome_correlation)
        {
            return ignore(format!("stale {} outcome of an earlier run", e.phase_name));
        }
        let status = batch.pipeline.phase(e.phase_name).status;
        let awaiting = run.phases.get(run.current) == Some(&e.phase_name)
            && matches!(
                status,
                PipelineExecutionStatus::DispatchInitiated | PipelineExecutionStatus::InProgress
            );
        if !awaiting {
            return ignore(format!(
                "{} outcome while the phase is {status}",
                e.phase_name
            ));
        }
        // Everything this run publishes carries the run's correlation id.
        out.ctx.correlation_id = run.correlation_id;
        let dispatched = run
            .dispatched
            .get(&e.phase_name)
            .cloned()
            .unwrap_or_default();
        let dispatched_set: BTreeSet<&String> = dispatched.iter().collect();
        let processed: BTreeMap<&String, &EssayRef> = e
            .processed_essays
            .iter()
            .map(|r| (&r.essay_id, r))
            .collect();
        for id in processed.keys().copied().chain(e.failed_essay_ids.iter()) {
            if !dispatched_set.contains(id) {
                out.notes.push(format!(
                    "essay {id} was never dispatched to {}",
                    e.phase_name
                ));
            }
        }
        let survivors: Vec<String> = dispatched
            .iter()
            .filter(|id| processed.contains_key(id))
            .cloned()
            .collect();
        let failed: Vec<String> = dispatched
            .iter()
            .filter(|id| !processed.contains_key(id))
            .cloned()
            .collect();
        if e.phase_name == PhaseName::Spellcheck {
            for essay in &mut batch.essays {
                if let Some(r) = processed.get(&essay.essay_id) {
                    if dispatched_set.contains(&essay.essay_id) {
                        essay.corrected_text_storage_id = Some(r.text_storage_id.clone());
                    }
                }
            }
        }
        let new_status = if survivors.is_empty() {
            PipelineExecutionStatus::Failed
        } else {
            match e.phase_status {
                BatchStatus::CompletedSuccessfully => {
                    PipelineExecutionStatus::CompletedSuccessfully
                }
                BatchStatus::CompletedWithFailures => {
                    PipelineExecutionStatus::CompletedWithPartialSuccess
                }
                _ => PipelineExecutionStatus::Failed,
            }
        };
        let survivors = if new_status == PipelineExecutionStatus::Failed {
            Vec::new()
        } else {
            survivors
        };
        let phase = batch.pipeline.phase_mut(e.phase_name);
        phase.status = new_status;
        phase.completed_at = Some(env.now);
        phase.progress_percentage = 100;
        phase.essay_counts = EssayCounts {
            total: len(&dispatched),
            pending_dispatch_or_processing: 0,
            successful: len(&survivors),
            failed: len(&dispatched) - len(&survivors),
        };
        if new_status == PipelineExecutionStatus::Failed {
            phase.error_info = Some(json!({
                "phase_status": e.phase_status,
                "failed_essay_ids": failed,
            }));
        }
        let orchestration = &mut batch.orchestration;
        orchestration.phase_failures.insert(
            e.phase_name,
            dispatched
                .iter()
                .filter(|id| !survivors.contains(id))
                .cloned()
                .collect(),
        );
        orchestration
            .phase_survivors
            .insert(e.phase_name, survivors.clone());
        if let Some(r) = orchestration.current_run.as_mut() {
            r.survivors.insert(e.phase_name, survivors.clone());
        }
        let next = run.phases.get(run.current + 1).copied();
        let next_input = next.map(|p| (p, self.phase_input(batch, p)));
        match (new_status, next_input) {
            (PipelineExecutionStatus::Failed, _) => {
                self.skip_rest(batch, &run, run.current + 1);
                self.finish_run(batch, &run, 0, out, env)
            }
            (_, Some((next, input))) if input.is_empty() => {
                out.notes
                    .push(format!("no essay came through everything {next} needs"));
                self.skip_rest(batch, &run, run.current + 1);
                self.finish_run(batch, &run, 0, out, env)
            }
            (_, Some((next, input))) => {
                if let Some(r) = batch.orchestration.current_run.as_mut() {
                    r.current += 1;
                }
                self.dispatch(batch, next, input, out, env);
                Ok(())
            }
            (_, None) => self.finish_run(batch, &run, len(&survivors), out, env),
        }
    }

    fn skip_rest(&self, batch: &mut Batch, run: &Run, from: usize) {
        for &p in run.phases.get(from..).unwrap_or_default() {
            batch.pipeline.phase_mut(p).status =
                PipelineExecutionStatus::SkippedDueToDependencyFailure;
        }
    }

    /// Ends the current run: completion, notification, ready, and a parked start.
    fn finish_run(
        &self,
        batch: &mut Batch,
        run: &Run,
        successful: i64,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Step {
        let completed: Vec<PhaseName> = run
            .phases
            .iter()
            .copied()
            .filter(|&p| batch.pipeline.phase(p).is_completed())
            .collect();
        let failed = len(&run.input_essays) - successful;
        let duration = (env.now - run.started_at).num_milliseconds().max(0) as f64 / 1000.0;
        batch.orchestration.current_run = None;
        batch.orchestration.earlier_runs.push(run.correlation_id);
        out.ctx.correlation_id = run.correlation_id;
        self.publish_completion(batch, completed, successful, failed, duration, out, env);
        self.become_ready(batch, out, env)
    }

    #[allow(clippy::too_many_arguments)]
    fn publish_completion(
        &self,
        batch: &mut Batch,
        completed_phases: Vec<PhaseName>,
        successful: i64,
        failed: i64,
        duration: f64,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) {
        let final_status = if failed == 0 {
            BatchStatus::CompletedSuccessfully
        } else if successful == 0 {
            BatchStatus::FailedCritically
        } else {
            BatchStatus::CompletedWithFailures
        };
        let mut metadata = SystemProcessingMetadata::for_batch(&batch.id, env.now);
        metadata.event = Some("batch.pipeline.completed".to_owned());
        let completion = PipelineCompleted {
            event: "batch.pipeline.completed".to_owned(),
            batch_id: batch.id.clone(),
            completed_phases: completed_phases.clone(),
            final_status,
            processing_duration_seconds: duration,
            successful_essay_count: successful,
            failed_essay_count: failed,
            correlation_id: out.ctx.correlation_id,
            metadata,
        };
        let message = out.ctx.message(
            env.ids.next_id(),
            topics::PIPELINE_COMPLETED,
            completion,
            None,
        );
        out.messages.push(message);
        let priority = if failed > 0 {
            NotificationPriority::Immediate
        } else {
            NotificationPriority::High
        };
        let payload = json!({
            "batch_id": batch.id,
            "final_status": final_status,
            "completed_phases": completed_phases,
            "successful_essays": successful,
            "failed_essays": failed,
            "duration_seconds": duration,
            "message": format!("Pipeline finished: {successful} essay(s) succeeded, {failed} failed"),
        });
        self.notify(
            batch,
            "pipeline_completed",
            priority,
            failed > 0,
            payload,
            out,
            env,
        );
    }

    /// The batch is ready: a parked request starts now.
    fn become_ready(&self, batch: &mut Batch, out: &mut Out<'_>, env: &mut Env<'_>) -> Step {
        batch.status = BatchStatus::ReadyForPipelineExecution;
        match batch.parked.take() {
            Some(parked) => {
                out.notes
                    .push(format!("parked request {} starts", parked.event_id));
                self.pipeline_request(batch, parked, out, env)
            }
            None => Ok(()),
        }
    }

    /// A denial with no credit figures (the breakdown still has both keys).
    fn deny(
        &self,
        batch: &Batch,
        request: &ParkedRequest,
        reason: &'static str,
        resolution: Option<&Resolution>,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) {
        let breakdown =
            resolution.map_or_else(|| credit_breakdown(&[], 0), |r| r.breakdown.clone());
        let required = resolution.map_or(0, |r| r.required_credits);
        self.publish_denial(batch, request, reason, required, 0, breakdown, out, env);
    }

    #[allow(clippy::too_many_arguments)]
    fn deny_for_credits(
        &self,
        batch: &Batch,
        request: &ParkedRequest,
        reason: &'static str,
        resolution: &Resolution,
        available: i64,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) {
        self.publish_denial(
            batch,
            request,
            reason,
            resolution.required_credits,
            available,
            resolution.breakdown.clone(),
            out,
            env,
        );
    }

    /// `pipeline.denied` and the teacher's notification; the batch is unchanged.
    #[allow(clippy::too_many_arguments)]
    fn publish_denial(
        &self,
        batch: &Batch,
        request: &ParkedRequest,
        reason: &'static str,
        required: i64,
        available: i64,
        breakdown: BTreeMap<String, i64>,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) {
        out.ctx.correlation_id = request.correlation_id;
        let requested = request.request.requested_pipeline.clone();
        let denied = PipelineDenied {
            event_name: "pipeline.denied".to_owned(),
            entity_id: batch.id.clone(),
            entity_type: "batch".to_owned(),
            parent_id: None,
            timestamp: env.now,
            batch_id: batch.id.clone(),
            user_id: batch.context.user_id.clone(),
            org_id: batch.context.org_id.clone(),
            requested_pipeline: requested.clone(),
            denial_reason: reason.to_owned(),
            required_credits: required,
            available_credits: available,
            resource_breakdown: Some(breakdown.clone()),
            denied_at: env.now,
        };
        let message = out
            .ctx
            .message(env.ids.next_id(), topics::PIPELINE_DENIED, denied, None);
        out.messages.push(message);
        let deficit = (required - available).max(0);
        let (kind, message, next_steps): (&str, String, Vec<&str>) = match reason {
            denial::INSUFFICIENT_CREDITS => (
                "pipeline_denied_insufficient_credits",
                format!("Processing cannot start: {deficit} more credits needed. Required: {required}, Available: {available}"),
                vec!["Add credits to your organisation", "Try a smaller batch"],
            ),
            denial::RATE_LIMIT_EXCEEDED => (
                "pipeline_denied_rate_limit",
                "Processing temporarily unavailable: rate limit exceeded. Please try again later.".to_owned(),
                vec!["Wait a few minutes and retry"],
            ),
            denial::PROMPT_NOT_ATTACHED => (
                "pipeline_denied",
                format!("Processing denied: {reason}"),
                vec!["Attach a student prompt to the batch", "Request the pipeline again"],
            ),
            denial::UNSUPPORTED_PIPELINE => (
                "pipeline_denied",
                format!("Processing denied: {reason}"),
                vec!["Request one of the supported pipelines"],
            ),
            denial::ENTITLEMENTS_UNAVAILABLE => (
                "pipeline_denied",
                format!("Processing denied: {reason}"),
                vec!["Try again in a few minutes"],
            ),
            _ => (
                "pipeline_denied",
                format!("Processing denied: {reason}"),
                vec!["Review the validation errors", "Upload the batch again"],
            ),
        };
        let payload = json!({
            "batch_id": batch.id,
            "requested_pipeline": requested,
            "denial_reason": reason,
            "required_credits": required,
            "available_credits": available,
            "resource_breakdown": breakdown,
            "message": message,
            "org_id": batch.context.org_id,
            "credit_deficit": deficit,
            "next_steps": next_steps,
        });
        self.notify(
            batch,
            kind,
            NotificationPriority::Immediate,
            true,
            payload,
            out,
            env,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        batch: &Batch,
        kind: &str,
        priority: NotificationPriority,
        action_required: bool,
        payload: Value,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) {
        let payload = match payload {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        let notification = TeacherNotification {
            teacher_id: batch.context.user_id.clone(),
            notification_type: kind.to_owned(),
            category: NotificationCategory::BatchProgress,
            priority,
            payload,
            action_required,
            deadline_timestamp: None,
            correlation_id: out.ctx.correlation_id.to_string(),
            batch_id: Some(batch.id.clone()),
            class_id: batch.context.class_id.clone(),
            timestamp: env.now,
        };
        let message = out.ctx.message(
            env.ids.next_id(),
            topics::TEACHER_NOTIFICATION,
            notification,
            None,
        );
        out.messages.push(message);
    }
}

/// The denial reason for a policy's answer (a denial without one is for credits).
fn denial_reason(reason: &str) -> &'static str {
    match reason {
        denial::RATE_LIMIT_EXCEEDED | "rate_limited" => denial::RATE_LIMIT_EXCEEDED,
        denial::ENTITLEMENTS_UNAVAILABLE => denial::ENTITLEMENTS_UNAVAILABLE,
        _ => denial::INSUFFICIENT_CREDITS,
    }
}

/// Whether `essay` came through `phase` the last time it ended.
fn survived(orchestration: &Orchestration, phase: PhaseName, essay: &str) -> bool {
    match orchestration.phase_survivors.get(&phase) {
        Some(survivors) => survivors.iter().any(|s| s == essay),
        None => !orchestration
            .phase_failures
            .get(&phase)
            .is_some_and(|f| f.iter().any(|s| s == essay)),
    }
}

/// Status changes between two pipeline states.
pub fn transitions(
    before: &PipelineState,
    after: &PipelineState,
    correlation_id: Uuid,
) -> Vec<PhaseTransition> {
    PhaseName::ALL
        .iter()
        .filter_map(|&phase| {
            let (old, new) = (before.phase(phase), after.phase(phase));
            (old.status != new.status).then(|| PhaseTransition {
                phase,
                from: old.status,
                to: new.status,
                correlation_id,
                completed_at: new
                    .completed_at
                    .filter(|_| old.completed_at != new.completed_at),
            })
        })
        .collect()
}

/// A list's length as the wire's integer.
fn len<T>(items: &[T]) -> i64 {
    i64::try_from(items.len()).unwrap_or(i64::MAX)
}

fn command_base(name: &str, batch_id: &str, now: Timestamp, essays: Vec<EssayRef>) -> CommandBase {
    CommandBase {
        event_name: name.to_owned(),
        entity_id: batch_id.to_owned(),
        entity_type: "batch".to_owned(),
        parent_id: None,
        timestamp: now,
        essays_to_process: essays,
    }
}

fn command_metadata(batch: &Batch, traceparent: Option<&str>) -> Map<String, Value> {
    let mut metadata = Map::new();
    metadata.insert("user_id".into(), json!(batch.context.user_id));
    metadata.insert("org_id".into(), json!(batch.context.org_id));
    if let Some(tp) = traceparent {
        metadata.insert("traceparent".into(), json!(tp));
    }
    metadata
}

/// Whether a prompt reference names the student prompt text with a storage id
/// (what `PATCH …/prompt` requires).
pub fn valid_prompt_reference(prompt: &StorageReferenceMetadata) -> bool {
    prompt
        .references
        .get(&ContentType::StudentPromptText)
        .is_some_and(|r| !r.storage_id.trim().is_empty())
}
