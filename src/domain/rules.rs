//! The orchestration rules: `(batch, event, now, ids) -> decision`. No I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::batch::{
    Batch, BatchContext, BatchEssay, EssayCounts, Orchestration, ParkedRequest, PhaseState,
    PipelineState, Run, ValidationErrorRecord,
};
use super::message::{MessageContext, OutboundMessage};
use super::policy::{credit_breakdown, AllowAll, CreditPolicy, CreditVerdict, PhaseGraph};
use crate::contracts::topics;
use crate::contracts::{
    AiFeedbackCommand, BatchEssaysReady, BatchEssaysRegistered, BatchStatus, BatchValidationErrors,
    CjAssessmentCommand, CommandBase, ContentProvisioningCompleted, CourseCode, EssayRef,
    InboundEvent, NlpCommand, NotificationCategory, NotificationPriority, PhaseName, PhaseOutcome,
    PipelineCompleted, PipelineDenied, PipelineExecutionStatus, SpellcheckCommand,
    StorageReferenceMetadata, StudentAssociationsConfirmed, StudentMatchingCommand,
    SystemProcessingMetadata, TeacherNotification, Timestamp,
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

/// Time and ids for one decision.
pub struct Env<'a> {
    pub now: Timestamp,
    pub ids: &'a mut dyn IdSource,
}

/// Envelope facts about the consumed event the rules use.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMeta {
    pub event_id: Uuid,
    pub correlation_id: Uuid,
    pub traceparent: Option<String>,
}

/// What became of an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// State changed and/or messages to publish.
    Applied,
    /// Does not fit the batch's state: nothing changes (counted as `ignored`).
    Ignored(String),
    /// Can never succeed: goes to the dead-letter topic, with no inbox row.
    DeadLetter { reason: &'static str, error: String },
}

/// The outcome of one event: the new state (to write with the inbox row) and the
/// messages to publish with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The batch after the event; `None` only for dead letters.
    pub batch: Option<Batch>,
    pub messages: Vec<OutboundMessage>,
    /// The essays changed (so the store rewrites them).
    pub essays_changed: bool,
    /// Remarks worth logging (ids never dispatched, parked requests …).
    pub notes: Vec<String>,
    /// The resolved configuration of a run this decision starts.
    pub snapshot: Option<Value>,
}

impl Decision {
    fn dead_letter(reason: &'static str, error: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::DeadLetter {
                reason,
                error: error.into(),
            },
            batch: None,
            messages: Vec::new(),
            essays_changed: false,
            notes: Vec::new(),
            snapshot: None,
        }
    }
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

/// One offending field of a registration.
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
            })
        };
        if self.expected_essay_count <= 0 {
            fail("expected_essay_count", "must be greater than 0");
        }
        if let Some(ids) = &self.essay_ids {
            if ids.len() as i64 != self.expected_essay_count {
                fail("essay_ids", "length must equal expected_essay_count");
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
            if a.chars().count() > 100 {
                fail("assignment_id", "must be at most 100 characters");
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// Denial reasons on `pipeline.denied`.
pub mod denial {
    pub const UNSUPPORTED_PIPELINE: &str = "unsupported_pipeline";
    pub const BATCH_FAILED: &str = "batch_failed";
    pub const INSUFFICIENT_CREDITS: &str = "insufficient_credits";
    pub const RATE_LIMITED: &str = "rate_limited";
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
    /// Every phase the target needs, in order.
    pub chain: Vec<PhaseName>,
    /// The phases that would run after pruning.
    pub phases: Vec<PhaseName>,
    pub input_essays: Vec<String>,
    pub breakdown: BTreeMap<String, i64>,
    pub required_credits: i64,
    pub verdict: CreditVerdict,
}

/// The rules, with their configuration.
#[derive(Debug, Clone)]
pub struct Rules {
    pub graph: PhaseGraph,
    pub credits: Arc<dyn CreditPolicy>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            graph: PhaseGraph::default(),
            credits: Arc::new(AllowAll),
        }
    }
}

/// Collects the messages of one decision.
struct Out<'a> {
    ctx: MessageContext<'a>,
    messages: Vec<OutboundMessage>,
    notes: Vec<String>,
    snapshot: Option<Value>,
}

impl Rules {
    pub fn new(graph: PhaseGraph, credits: Arc<dyn CreditPolicy>) -> Self {
        Self { graph, credits }
    }

    // ------------------------------------------------------------ registration

    /// Handler 1: a new batch, with its registered event.
    pub fn register(
        &self,
        request: &RegistrationRequest,
        correlation_id: Uuid,
        env: &mut Env<'_>,
    ) -> Result<Decision, Vec<FieldError>> {
        request.validate()?;
        let batch_id = env.ids.next_id().to_string();
        let essay_ids: Vec<String> = (0..request.expected_essay_count)
            .map(|_| env.ids.next_id().to_string())
            .collect();
        let context = BatchContext {
            course_code: request.course_code,
            expected_essay_count: request.expected_essay_count,
            user_id: request.user_id.clone(),
            org_id: request.org_id.clone(),
            class_id: request.class_id.clone(),
            student_prompt_ref: request.student_prompt_ref.clone(),
            cj_default_llm_model: request.cj_default_llm_model.clone(),
            cj_default_temperature: request.cj_default_temperature,
            assignment_id: request.assignment_id.clone(),
            essay_ids: essay_ids.clone(),
            client_essay_ids: request.essay_ids.clone().unwrap_or_default(),
        };
        let batch = Batch {
            id: batch_id.clone(),
            correlation_id,
            status: BatchStatus::AwaitingContentValidation,
            pipeline: PipelineState::initial(&batch_id, env.now),
            context,
            essays: Vec::new(),
            orchestration: Orchestration::default(),
            parked: None,
            validation_errors: Vec::new(),
            version: 0,
            created_at: env.now,
            updated_at: env.now,
            completed_at: None,
        };
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
            student_prompt_ref: request.student_prompt_ref.clone(),
            user_id: request.user_id.clone(),
            org_id: request.org_id.clone(),
            class_id: request.class_id.clone(),
        };
        let message = ctx.message(
            env.ids.next_id(),
            topics::BATCH_ESSAYS_REGISTERED,
            registered,
            None,
        );
        Ok(Decision {
            verdict: Verdict::Applied,
            batch: Some(batch),
            messages: vec![message],
            essays_changed: false,
            notes: Vec::new(),
            snapshot: None,
        })
    }

    // ------------------------------------------------------------ consumed events

    /// Handlers 2–7: one consumed event against the batch as read (`None`: unknown).
    pub fn decide(
        &self,
        batch: Option<&Batch>,
        event: &InboundEvent,
        meta: &EventMeta,
        env: &mut Env<'_>,
    ) -> Decision {
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
        let correlation_id = match event {
            InboundEvent::PhaseOutcome(o) => o.correlation_id.unwrap_or(meta.correlation_id),
            _ => meta.correlation_id,
        };
        let batch_id = before.id.clone();
        let mut out = Out {
            ctx: MessageContext {
                batch_id: &batch_id,
                correlation_id,
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
                let parked = ParkedRequest {
                    event_id: meta.event_id,
                    correlation_id: meta.correlation_id,
                    traceparent: meta.traceparent.clone(),
                    request: e.clone(),
                    parked_at: env.now,
                };
                self.pipeline_request(&mut batch, parked, &mut out, env);
                Ok(())
            }
            InboundEvent::PhaseOutcome(e) => {
                self.phase_outcome(&mut batch, e, correlation_id, &mut out, env)
            }
        };
        let Out {
            messages,
            notes,
            snapshot,
            ..
        } = out;
        match result {
            Err(reason) => Decision {
                verdict: Verdict::Ignored(reason),
                batch: Some(before.clone()),
                messages: Vec::new(),
                essays_changed: false,
                notes,
                snapshot: None,
            },
            Ok(()) => {
                batch.updated_at = env.now;
                if batch.pipeline != before.pipeline {
                    batch.pipeline.last_updated = env.now;
                }
                Decision {
                    verdict: Verdict::Applied,
                    essays_changed: batch.essays != before.essays,
                    batch: Some(batch),
                    messages,
                    notes,
                    snapshot,
                }
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
    ) -> Result<(), String> {
        if batch.status != BatchStatus::AwaitingContentValidation {
            return Err(format!("content provisioned while {}", batch.status));
        }
        batch.essays = e
            .essays_for_processing
            .iter()
            .map(BatchEssay::from_ref)
            .collect();
        match batch.context.class_id.clone() {
            None => self.become_ready(batch, out, env),
            Some(class_id) => {
                batch.status = BatchStatus::AwaitingStudentValidation;
                let command = StudentMatchingCommand {
                    base: command_base(
                        "batch.student.matching.initiate.command",
                        &batch.id,
                        env.now,
                        batch
                            .essays
                            .iter()
                            .map(|e| EssayRef::new(&e.essay_id, &e.text_storage_id))
                            .collect(),
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
            }
        }
        Ok(())
    }

    /// Handler 3.
    fn associations_confirmed(
        &self,
        batch: &mut Batch,
        _e: &StudentAssociationsConfirmed,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Result<(), String> {
        if batch.status != BatchStatus::AwaitingStudentValidation {
            return Err(format!("associations confirmed while {}", batch.status));
        }
        if batch.orchestration.essays_ready_received {
            self.become_ready(batch, out, env);
        } else {
            batch.status = BatchStatus::StudentValidationCompleted;
        }
        Ok(())
    }

    /// Handler 4 (empty lists are dead-lettered before this).
    fn essays_ready(
        &self,
        batch: &mut Batch,
        e: &BatchEssaysReady,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Result<(), String> {
        let essays: Vec<BatchEssay> = e.ready_essays.iter().map(BatchEssay::from_ref).collect();
        match batch.status {
            BatchStatus::StudentValidationCompleted => {
                batch.essays = essays;
                self.become_ready(batch, out, env);
            }
            BatchStatus::AwaitingStudentValidation => {
                batch.essays = essays;
                batch.orchestration.essays_ready_received = true;
            }
            BatchStatus::ReadyForPipelineExecution => batch.essays = essays,
            other => return Err(format!("essays ready while {other}")),
        }
        Ok(())
    }

    /// Handler 5.
    fn validation_errors(
        &self,
        batch: &mut Batch,
        e: &BatchValidationErrors,
        meta: &EventMeta,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Result<(), String> {
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
                self.deny_outright(batch, &parked, denial::BATCH_FAILED, out, env);
            }
        }
        Ok(())
    }

    /// Handler 6.
    fn pipeline_request(
        &self,
        batch: &mut Batch,
        request: ParkedRequest,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) {
        let target = match PhaseName::parse(&request.request.requested_pipeline) {
            Some(PhaseName::StudentMatching) | None => {
                self.deny_outright(batch, &request, denial::UNSUPPORTED_PIPELINE, out, env);
                return;
            }
            Some(target) => target,
        };
        if batch.is_terminal() {
            self.deny_outright(batch, &request, denial::BATCH_FAILED, out, env);
            return;
        }
        if batch.status != BatchStatus::ReadyForPipelineExecution {
            if let Some(replaced) = &batch.parked {
                out.notes.push(format!(
                    "parked request {} replaced by {}",
                    replaced.event_id, request.event_id
                ));
            }
            batch.parked = Some(request);
            return;
        }
        self.start(batch, target, request, out, env);
    }

    /// Resolution, pruning and the credit check, without changing anything.
    pub fn resolve(&self, batch: &Batch, target: PhaseName, is_retry: bool) -> Option<Resolution> {
        let chain = self.graph.resolve(target).ok()?;
        let prunable = |phase: PhaseName| {
            let state = batch.pipeline.phase(phase);
            match state.status {
                PipelineExecutionStatus::CompletedSuccessfully => true,
                PipelineExecutionStatus::CompletedWithPartialSuccess => !is_retry,
                _ => false,
            }
        };
        // Only a prefix is pruned: once a phase runs again, everything after it
        // depends on its new output and runs again too.
        let pruned = chain.iter().take_while(|&&p| prunable(p)).count();
        let failed_before: BTreeSet<&String> = chain[..pruned]
            .iter()
            .filter_map(|p| batch.orchestration.phase_failures.get(p))
            .flatten()
            .collect();
        let input_essays: Vec<String> = batch
            .essays
            .iter()
            .filter(|e| !failed_before.contains(&e.essay_id))
            .map(|e| e.essay_id.clone())
            .collect();
        let phases = chain[pruned..].to_vec();
        let breakdown = credit_breakdown(&phases, input_essays.len() as i64);
        let required_credits = breakdown.values().sum();
        let verdict = self.credits.check(&batch.context, required_credits);
        Some(Resolution {
            target,
            chain,
            phases,
            input_essays,
            breakdown,
            required_credits,
            verdict,
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
    ) {
        out.ctx.correlation_id = request.correlation_id;
        if request.traceparent.is_some() {
            out.ctx.traceparent = request.traceparent.clone();
        }
        if let Some(prompt) = &request.request.prompt_payload {
            if let Some(assignment_id) = &prompt.assignment_id {
                batch.context.assignment_id = Some(assignment_id.clone());
            }
            if let Some(prompt_ref) = &prompt.cms_prompt_ref {
                batch.context.student_prompt_ref = Some(prompt_ref.clone());
            }
        }
        let Some(resolution) = self.resolve(batch, target, request.request.is_retry) else {
            self.deny_outright(batch, &request, denial::UNSUPPORTED_PIPELINE, out, env);
            return;
        };
        let reason = match resolution.verdict {
            CreditVerdict::Allowed { .. } => None,
            CreditVerdict::InsufficientCredits { .. } => Some(denial::INSUFFICIENT_CREDITS),
            CreditVerdict::RateLimited { .. } => Some(denial::RATE_LIMITED),
        };
        if let Some(reason) = reason {
            self.deny(
                batch,
                &request,
                reason,
                resolution.required_credits,
                resolution.verdict.available(),
                Some(resolution.breakdown.clone()),
                out,
                env,
            );
            return;
        }
        if resolution.phases.is_empty() || resolution.input_essays.is_empty() {
            self.complete_at_once(batch, &resolution, out, env);
            return;
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
            user_id: request.request.user_id.clone(),
        };
        batch.orchestration.runs_started += 1;
        batch.orchestration.current_run = Some(run);
        batch.pipeline.requested_pipelines = resolution.phases.clone();
        for &phase in &resolution.phases {
            *batch.pipeline.phase_mut(phase) =
                PhaseState::with_status(PipelineExecutionStatus::PendingDependencies);
        }
        batch.status = BatchStatus::ProcessingPipelines;
        out.snapshot = Some(json!({
            "requested_pipeline": target,
            "is_retry": request.request.is_retry,
            "dependency_graph": self.graph.edges().collect::<Vec<_>>(),
            "resolved_pipeline": resolution.chain,
            "phases_to_run": resolution.phases,
            "input_essay_count": resolution.input_essays.len(),
            "required_credits": resolution.required_credits,
            "resource_breakdown": resolution.breakdown,
        }));
        self.dispatch(batch, first, resolution.input_essays.clone(), out, env);
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
        let successful = resolution.input_essays.len() as i64;
        let failed = batch.essays.len() as i64 - successful;
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
        let total = essays.len() as i64;
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
            PhaseName::StudentMatching => {
                unreachable!("the phase graph rejects student matching")
            }
        };
        out.messages.push(message);
    }

    /// Handler 7.
    fn phase_outcome(
        &self,
        batch: &mut Batch,
        e: &PhaseOutcome,
        correlation_id: Uuid,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) -> Result<(), String> {
        let Some(run) = batch.orchestration.current_run.clone() else {
            return Err(format!("{} outcome with no run in progress", e.phase_name));
        };
        if run.correlation_id != correlation_id
            && batch.orchestration.earlier_runs.contains(&correlation_id)
        {
            return Err(format!("stale {} outcome of an earlier run", e.phase_name));
        }
        let status = batch.pipeline.phase(e.phase_name).status;
        let awaiting = run.phases.get(run.current) == Some(&e.phase_name)
            && matches!(
                status,
                PipelineExecutionStatus::DispatchInitiated | PipelineExecutionStatus::InProgress
            );
        if !awaiting {
            return Err(format!(
                "{} outcome while the phase is {status}",
                e.phase_name
            ));
        }
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
        for id in processed
            .keys()
            .chain(e.failed_essay_ids.iter().collect::<Vec<_>>().iter())
        {
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
            for essay in batch.essays.iter_mut() {
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
        let phase = batch.pipeline.phase_mut(e.phase_name);
        phase.status = new_status;
        phase.completed_at = Some(env.now);
        phase.progress_percentage = 100;
        phase.essay_counts = EssayCounts {
            total: dispatched.len() as i64,
            pending_dispatch_or_processing: 0,
            successful: survivors.len() as i64,
            failed: failed.len() as i64,
        };
        if new_status == PipelineExecutionStatus::Failed {
            phase.error_info = Some(json!({
                "phase_status": e.phase_status,
                "failed_essay_ids": failed,
            }));
        }
        batch
            .orchestration
            .phase_failures
            .insert(e.phase_name, failed);

        let next = run.phases.get(run.current + 1).copied();
        match (new_status, next) {
            (PipelineExecutionStatus::Failed, _) => {
                for &p in &run.phases[run.current + 1..] {
                    batch.pipeline.phase_mut(p).status =
                        PipelineExecutionStatus::SkippedDueToDependencyFailure;
                }
                self.finish_run(batch, &run, 0, out, env);
            }
            (_, Some(next)) => {
                if let Some(r) = batch.orchestration.current_run.as_mut() {
                    r.current += 1;
                }
                self.dispatch(batch, next, survivors, out, env);
            }
            (_, None) => self.finish_run(batch, &run, survivors.len() as i64, out, env),
        }
        Ok(())
    }

    /// Ends the current run: completion, notification, ready, and a parked start.
    fn finish_run(
        &self,
        batch: &mut Batch,
        run: &Run,
        successful: i64,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) {
        let completed: Vec<PhaseName> = run
            .phases
            .iter()
            .copied()
            .filter(|&p| batch.pipeline.phase(p).is_completed())
            .collect();
        let failed = run.input_essays.len() as i64 - successful;
        let duration = (env.now - run.started_at).num_milliseconds().max(0) as f64 / 1000.0;
        batch.orchestration.current_run = None;
        batch.orchestration.earlier_runs.push(run.correlation_id);
        out.ctx.correlation_id = run.correlation_id;
        self.publish_completion(batch, completed, successful, failed, duration, out, env);
        self.become_ready(batch, out, env);
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
    fn become_ready(&self, batch: &mut Batch, out: &mut Out<'_>, env: &mut Env<'_>) {
        batch.status = BatchStatus::ReadyForPipelineExecution;
        if let Some(parked) = batch.parked.take() {
            out.notes
                .push(format!("parked request {} starts", parked.event_id));
            self.pipeline_request(batch, parked, out, env);
        }
    }

    /// A denial that involves no credits.
    fn deny_outright(
        &self,
        batch: &Batch,
        request: &ParkedRequest,
        reason: &'static str,
        out: &mut Out<'_>,
        env: &mut Env<'_>,
    ) {
        self.deny(batch, request, reason, 0, 0, None, out, env);
    }

    #[allow(clippy::too_many_arguments)]
    fn deny(
        &self,
        batch: &Batch,
        request: &ParkedRequest,
        reason: &'static str,
        required: i64,
        available: i64,
        breakdown: Option<BTreeMap<String, i64>>,
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
            user_id: request.request.user_id.clone(),
            org_id: batch.context.org_id.clone(),
            requested_pipeline: requested.clone(),
            denial_reason: reason.to_owned(),
            required_credits: required,
            available_credits: available,
            resource_breakdown: breakdown.clone(),
            denied_at: env.now,
        };
        let message = out
            .ctx
            .message(env.ids.next_id(), topics::PIPELINE_DENIED, denied, None);
        out.messages.push(message);
        if reason == denial::UNSUPPORTED_PIPELINE {
            return;
        }
        let (kind, message, next_steps) = match reason {
            denial::INSUFFICIENT_CREDITS => (
                "pipeline_denied_insufficient_credits",
                "Not enough credits to run this pipeline",
                vec!["Add credits to your organisation", "Try a smaller batch"],
            ),
            denial::RATE_LIMITED => (
                "pipeline_denied_rate_limit",
                "Too many requests; try again later",
                vec!["Wait a few minutes and retry"],
            ),
            _ => (
                "pipeline_denied",
                "The batch failed validation and cannot be processed",
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
            "credit_deficit": (required - available).max(0),
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
        let Value::Object(payload) = payload else {
            unreachable!("notification payloads are objects")
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
