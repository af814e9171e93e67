//! Table tests per rule, and property tests over random event sequences.

use std::collections::HashMap;

use chrono::{TimeDelta, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use super::*;
use crate::contracts::{
    topics, BatchStatus, CourseCode, EssayRef, InboundEvent, PhaseName, PipelineExecutionStatus,
    PromptPayload, Timestamp,
};
use crate::sim::upstream;

const TEACHER: &str = "teacher-anna";

fn essays(n: usize) -> Vec<EssayRef> {
    (0..n)
        .map(|i| EssayRef::new(format!("essay-{i}"), format!("store-{i}")))
        .collect()
}

fn ids(refs: &[EssayRef]) -> Vec<String> {
    refs.iter().map(|e| e.essay_id.clone()).collect()
}

/// What a decision did, in one shape for the table tests.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Applied,
    Ignored(String),
    DeadLetter { reason: &'static str, error: String },
}

#[derive(Debug, Clone)]
struct Outcome {
    verdict: Verdict,
    changed: bool,
    batch: Option<Batch>,
    messages: Vec<OutboundMessage>,
    essays_changed: bool,
    notes: Vec<String>,
    snapshot: Option<Value>,
    transitions: Vec<PhaseTransition>,
}

/// A credit policy for the tests: a fixed balance, or everything allowed.
fn answer_credits(balance: Option<i64>, query: &CreditQuery) -> CreditVerdict {
    match balance {
        Some(b) if query.required() > b => CreditVerdict::Denied {
            reason: "insufficient_credits".into(),
            available: b,
        },
        Some(b) => CreditVerdict::Allowed { available: b },
        None => CreditVerdict::Allowed {
            available: query.required(),
        },
    }
}

/// Decides like the worker: asks the credit policy whenever the rules need it.
fn decide(
    rules: &Rules,
    batch: Option<&Batch>,
    event: &InboundEvent,
    meta: &EventMeta,
    now: Timestamp,
    ids: &mut SequentialIds,
    balance: Option<i64>,
) -> Outcome {
    let mut answers = CreditAnswers::new();
    loop {
        let decision = rules.decide(
            batch,
            event,
            meta,
            &mut Env {
                now,
                ids,
                credits: &answers,
            },
        );
        return match decision {
            Decision::NeedsCredit(q) => {
                let verdict = answer_credits(balance, &q);
                answers.insert(q, verdict);
                continue;
            }
            Decision::Apply(e) => Outcome {
                verdict: Verdict::Applied,
                changed: e.changed,
                batch: Some(e.batch),
                messages: e.messages,
                essays_changed: e.essays_changed,
                notes: e.notes,
                snapshot: e.snapshot,
                transitions: e.transitions,
            },
            Decision::Ignore(why) => Outcome {
                verdict: Verdict::Ignored(why),
                changed: false,
                batch: batch.cloned(),
                messages: Vec::new(),
                essays_changed: false,
                notes: Vec::new(),
                snapshot: None,
                transitions: Vec::new(),
            },
            Decision::DeadLetter { reason, error } => Outcome {
                verdict: Verdict::DeadLetter { reason, error },
                changed: false,
                batch: None,
                messages: Vec::new(),
                essays_changed: false,
                notes: Vec::new(),
                snapshot: None,
                transitions: Vec::new(),
            },
        };
    }
}

fn prompt() -> crate::contracts::StorageReferenceMetadata {
    crate::contracts::StorageReferenceMetadata {
        references: [(
            crate::contracts::ContentType::StudentPromptText,
            crate::contracts::StorageRef {
                storage_id: "prompt-1".into(),
                path: String::new(),
            },
        )]
        .into(),
    }
}

/// Drives the rules for one batch, the way the worker would (minus the inbox).
struct Sim {
    rules: Rules,
    batch: Batch,
    ids: SequentialIds,
    now: Timestamp,
    /// The credit balance (None: everything allowed).
    balance: Option<i64>,
}

impl Sim {
    fn registered(class_id: Option<&str>, n: i64, rules: Rules) -> Self {
        Self::registered_with_prompt(class_id, n, rules, Some(prompt()))
    }

    fn registered_with_prompt(
        class_id: Option<&str>,
        n: i64,
        rules: Rules,
        prompt: Option<crate::contracts::StorageReferenceMetadata>,
    ) -> Self {
        let mut ids = SequentialIds(1_000);
        let now = Utc.with_ymd_and_hms(2026, 3, 14, 9, 0, 0).unwrap();
        let request = RegistrationRequest {
            expected_essay_count: n,
            essay_ids: None,
            course_code: CourseCode::Eng5,
            student_prompt_ref: prompt,
            user_id: TEACHER.into(),
            org_id: Some("org-1".into()),
            class_id: class_id.map(str::to_owned),
            cj_default_llm_model: None,
            cj_default_temperature: None,
            assignment_id: None,
        };
        let effects = rules
            .register(
                &request,
                Uuid::from_u128(7),
                &mut Env {
                    now,
                    ids: &mut ids,
                    credits: &CreditAnswers::new(),
                },
            )
            .unwrap();
        let mut batch = effects.batch;
        batch.version = 1;
        Self {
            rules,
            batch,
            ids,
            now,
            balance: None,
        }
    }

    /// A GUEST batch with `n` essays, ready for pipelines.
    fn ready_guest(n: usize) -> Self {
        Self::ready_guest_with(n, Rules::default())
    }

    fn ready_guest_with(n: usize, rules: Rules) -> Self {
        let mut sim = Self::registered(None, n as i64, rules);
        sim.provision(n);
        sim
    }

    fn provision(&mut self, n: usize) {
        let sim = self;
        let id = sim.batch.id.clone();
        sim.send(InboundEvent::ContentProvisioned(
            upstream::content_provisioned(&id, CourseCode::Eng5, TEACHER, &essays(n)),
        ));
        assert_eq!(sim.batch.status, BatchStatus::ReadyForPipelineExecution);
    }

    fn send(&mut self, event: InboundEvent) -> Outcome {
        let meta = EventMeta {
            event_id: self.ids.next_id(),
            correlation_id: self.ids.next_id(),
            traceparent: None,
        };
        self.send_with(event, meta)
    }

    fn send_with(&mut self, event: InboundEvent, meta: EventMeta) -> Outcome {
        self.now += TimeDelta::seconds(2);
        let decision = decide(
            &self.rules,
            Some(&self.batch),
            &event,
            &meta,
            self.now,
            &mut self.ids,
            self.balance,
        );
        if let (true, Some(batch)) = (decision.changed, &decision.batch) {
            self.batch = batch.clone();
            self.batch.version += 1;
        }
        decision
    }

    fn request(&mut self, target: &str) -> Outcome {
        let id = self.batch.id.clone();
        self.send(InboundEvent::PipelineRequest(upstream::pipeline_request(
            &id, target, TEACHER,
        )))
    }

    /// Answers the phase in flight: the essays in `fail` fail, the others survive.
    fn answer(&mut self, fail: &[&str]) -> Outcome {
        let run = self.batch.orchestration.current_run.clone().expect("a run");
        let phase = run.phases[run.current];
        let dispatched = &run.dispatched[&phase];
        let processed: Vec<EssayRef> = dispatched
            .iter()
            .filter(|id| !fail.contains(&id.as_str()))
            .map(|id| self.batch.essay(id).unwrap().command_ref())
            .collect();
        let failed: Vec<String> = fail.iter().map(std::string::ToString::to_string).collect();
        let id = self.batch.id.clone();
        self.send(InboundEvent::PhaseOutcome(upstream::phase_outcome(
            &id,
            phase,
            &processed,
            &failed,
            run.correlation_id,
        )))
    }
}

fn topics_of(decision: &Outcome) -> Vec<&'static str> {
    decision.messages.iter().map(|m| m.topic).collect()
}

fn data(decision: &Outcome, topic: &str) -> Value {
    decision
        .messages
        .iter()
        .find(|m| m.topic == topic)
        .unwrap_or_else(|| panic!("no {topic} in {:?}", topics_of(decision)))
        .envelope()["data"]
        .clone()
}

fn command_essays(data: &Value) -> Vec<(String, String)> {
    data["essays_to_process"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["essay_id"].as_str().unwrap().to_owned(),
                e["text_storage_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// ------------------------------------------------------------------ registration

#[test]
fn registration_rejects_each_bad_field() {
    let base = Sim::registered(None, 2, Rules::default());
    type Mutation = Box<dyn Fn(&mut RegistrationRequest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "expected_essay_count",
            Box::new(|r| r.expected_essay_count = 0),
        ),
        (
            "essay_ids",
            Box::new(|r| r.essay_ids = Some(vec!["a".into()])),
        ),
        (
            "cj_default_temperature",
            Box::new(|r| r.cj_default_temperature = Some(2.5)),
        ),
        (
            "assignment_id",
            Box::new(|r| r.assignment_id = Some("x".repeat(101))),
        ),
        ("user_id", Box::new(|r| r.user_id = " ".into())),
    ];
    for (field, mutate) in cases {
        let mut request = RegistrationRequest {
            expected_essay_count: 2,
            essay_ids: None,
            course_code: CourseCode::Sv1,
            student_prompt_ref: None,
            user_id: TEACHER.into(),
            org_id: None,
            class_id: None,
            cj_default_llm_model: None,
            cj_default_temperature: None,
            assignment_id: None,
        };
        mutate(&mut request);
        let mut ids = SequentialIds(0);
        let result = base.rules.register(
            &request,
            Uuid::nil(),
            &mut Env {
                now: base.now,
                ids: &mut ids,
                credits: &CreditAnswers::new(),
            },
        );
        let errors = result.expect_err(field);
        assert_eq!(errors.iter().map(|e| e.field).collect::<Vec<_>>(), [field]);
    }
}

#[test]
fn registration_creates_batch_with_internal_essay_ids() {
    let mut ids = SequentialIds(0);
    let request = RegistrationRequest {
        expected_essay_count: 2,
        essay_ids: Some(vec!["client-a".into(), "client-b".into()]),
        course_code: CourseCode::Sv2,
        student_prompt_ref: None,
        user_id: TEACHER.into(),
        org_id: None,
        class_id: Some("class-9a".into()),
        cj_default_llm_model: None,
        cj_default_temperature: Some(0.3),
        assignment_id: None,
    };
    let now = Utc::now();
    let decision = Rules::default()
        .register(
            &request,
            Uuid::from_u128(42),
            &mut Env {
                now,
                ids: &mut ids,
                credits: &CreditAnswers::new(),
            },
        )
        .unwrap();
    let batch = decision.batch.clone();
    assert_eq!(batch.status, BatchStatus::AwaitingContentValidation);
    assert!(batch.pipeline.requested_pipelines.is_empty());
    for phase in PhaseName::ALL {
        assert_eq!(
            batch.pipeline.phase(*phase).status,
            PipelineExecutionStatus::SkippedByUserConfig
        );
    }
    assert_eq!(batch.context.client_essay_ids, ["client-a", "client-b"]);
    let registered = &decision.messages[0];
    assert_eq!(registered.topic, topics::BATCH_ESSAYS_REGISTERED);
    assert_eq!(registered.correlation_id, Uuid::from_u128(42));
    let sent: Vec<String> =
        serde_json::from_value(registered.envelope()["data"]["essay_ids"].clone()).unwrap();
    assert_eq!(sent, batch.context.essay_ids);
    assert!(
        !sent.contains(&"client-a".to_owned()),
        "internal ids, never the client's"
    );
    assert_eq!(registered.envelope()["data"]["class_id"], "class-9a");
}

// ------------------------------------------------------------------ content, students, readiness

#[test]
fn guest_content_makes_the_batch_ready_without_messages() {
    let mut sim = Sim::registered(None, 2, Rules::default());
    let id = sim.batch.id.clone();
    let d = sim.send(InboundEvent::ContentProvisioned(
        upstream::content_provisioned(&id, CourseCode::Eng5, TEACHER, &essays(2)),
    ));
    assert_eq!(d.verdict, Verdict::Applied);
    assert!(d.messages.is_empty());
    assert!(d.essays_changed);
    assert_eq!(sim.batch.status, BatchStatus::ReadyForPipelineExecution);
    assert_eq!(sim.batch.essays.len(), 2);
    let again = sim.send(InboundEvent::ContentProvisioned(
        upstream::content_provisioned(&id, CourseCode::Eng5, TEACHER, &essays(3)),
    ));
    assert!(matches!(again.verdict, Verdict::Ignored(_)));
    assert_eq!(sim.batch.essays.len(), 2, "ignored events change nothing");
}

#[test]
fn regular_content_asks_for_student_matching() {
    let mut sim = Sim::registered(Some("class-9a"), 2, Rules::default());
    let id = sim.batch.id.clone();
    let d = sim.send(InboundEvent::ContentProvisioned(
        upstream::content_provisioned(&id, CourseCode::Eng5, TEACHER, &essays(2)),
    ));
    assert_eq!(topics_of(&d), [topics::STUDENT_MATCHING_COMMAND]);
    let command = data(&d, topics::STUDENT_MATCHING_COMMAND);
    assert_eq!(command["class_id"], "class-9a");
    assert_eq!(command["course_code"], "ENG5");
    assert_eq!(command_essays(&command).len(), 2);
    assert_eq!(sim.batch.status, BatchStatus::AwaitingStudentValidation);
}

#[test]
fn confirmation_then_essays_ready_makes_the_batch_ready() {
    let mut sim = Sim::registered(Some("class-9a"), 2, Rules::default());
    let id = sim.batch.id.clone();
    sim.send(InboundEvent::ContentProvisioned(
        upstream::content_provisioned(&id, CourseCode::Eng5, TEACHER, &essays(2)),
    ));
    let now = sim.now;
    sim.send(InboundEvent::AssociationsConfirmed(
        upstream::associations_confirmed(&id, "class-9a", CourseCode::Eng5, &ids(&essays(2)), now),
    ));
    assert_eq!(sim.batch.status, BatchStatus::StudentValidationCompleted);
    let mut ready = essays(2);
    ready[0].text_storage_id = "store-0-v2".into();
    sim.send(InboundEvent::EssaysReady(upstream::essays_ready(
        &id,
        CourseCode::Eng5,
        "REGULAR",
        &ready,
        now,
    )));
    assert_eq!(sim.batch.status, BatchStatus::ReadyForPipelineExecution);
    assert_eq!(
        sim.batch.essays[0].text_storage_id, "store-0-v2",
        "essays-ready replaces the essays"
    );
}

#[test]
fn essays_ready_before_confirmation_also_makes_the_batch_ready() {
    let mut sim = Sim::registered(Some("class-9a"), 2, Rules::default());
    let id = sim.batch.id.clone();
    let now = sim.now;
    sim.send(InboundEvent::ContentProvisioned(
        upstream::content_provisioned(&id, CourseCode::Eng5, TEACHER, &essays(2)),
    ));
    sim.send(InboundEvent::EssaysReady(upstream::essays_ready(
        &id,
        CourseCode::Eng5,
        "REGULAR",
        &essays(2),
        now,
    )));
    assert_eq!(sim.batch.status, BatchStatus::AwaitingStudentValidation);
    assert!(sim.batch.orchestration.essays_ready_received);
    sim.send(InboundEvent::AssociationsConfirmed(
        upstream::associations_confirmed(&id, "class-9a", CourseCode::Eng5, &ids(&essays(2)), now),
    ));
    assert_eq!(sim.batch.status, BatchStatus::ReadyForPipelineExecution);
}

#[test]
fn essays_ready_edge_cases() {
    let mut sim = Sim::ready_guest(2);
    let id = sim.batch.id.clone();
    let now = sim.now;
    let empty = sim.send(InboundEvent::EssaysReady(upstream::essays_ready(
        &id,
        CourseCode::Eng5,
        "GUEST",
        &[],
        now,
    )));
    assert!(matches!(
        empty.verdict,
        Verdict::DeadLetter {
            reason: "empty_ready_essays",
            ..
        }
    ));
    assert!(empty.batch.is_none());
    sim.request("spellcheck");
    let during = sim.send(InboundEvent::EssaysReady(upstream::essays_ready(
        &id,
        CourseCode::Eng5,
        "GUEST",
        &essays(1),
        now,
    )));
    assert!(matches!(during.verdict, Verdict::Ignored(_)));
    assert_eq!(sim.batch.essays.len(), 2);
}

#[test]
fn unknown_batch_is_dead_lettered() {
    let rules = Rules::default();
    let mut ids = SequentialIds(0);
    let event = InboundEvent::PipelineRequest(upstream::pipeline_request("nope", "nlp", TEACHER));
    let meta = EventMeta {
        event_id: Uuid::nil(),
        correlation_id: Uuid::nil(),
        traceparent: None,
    };
    let d = decide(&rules, None, &event, &meta, Utc::now(), &mut ids, None);
    assert!(matches!(
        d.verdict,
        Verdict::DeadLetter {
            reason: "unknown_batch",
            ..
        }
    ));
    assert!(d.messages.is_empty());
}

// ------------------------------------------------------------------ validation errors

#[test]
fn critical_validation_errors_fail_the_batch_and_answer_the_parked_request() {
    let mut sim = Sim::registered(None, 2, Rules::default());
    let id = sim.batch.id.clone();
    let parked = sim.request("cj_assessment");
    assert!(parked.messages.is_empty(), "parking publishes nothing");
    assert!(sim.batch.parked.is_some());
    let now = sim.now;
    let d = sim.send(InboundEvent::ValidationErrors(upstream::validation_errors(
        &id,
        &["essay-0".into()],
        true,
        now,
    )));
    assert_eq!(sim.batch.status, BatchStatus::FailedCritically);
    assert!(sim.batch.parked.is_none());
    assert_eq!(
        topics_of(&d),
        [topics::PIPELINE_DENIED, topics::TEACHER_NOTIFICATION]
    );
    assert_eq!(
        data(&d, topics::PIPELINE_DENIED)["denial_reason"],
        "batch_failed"
    );
    assert_eq!(sim.batch.validation_errors.len(), 1);
    // Terminal: later requests are denied, content is ignored.
    let later = sim.request("nlp");
    assert_eq!(
        data(&later, topics::PIPELINE_DENIED)["denial_reason"],
        "batch_failed"
    );
    let content = sim.send(InboundEvent::ContentProvisioned(
        upstream::content_provisioned(&id, CourseCode::Eng5, TEACHER, &essays(2)),
    ));
    assert!(matches!(content.verdict, Verdict::Ignored(_)));
    assert_eq!(sim.batch.status, BatchStatus::FailedCritically);
}

#[test]
fn validation_errors_after_a_run_are_only_recorded() {
    let mut sim = Sim::ready_guest(2);
    let id = sim.batch.id.clone();
    sim.request("spellcheck");
    let now = sim.now;
    let d = sim.send(InboundEvent::ValidationErrors(upstream::validation_errors(
        &id,
        &["essay-1".into()],
        true,
        now,
    )));
    assert!(d.messages.is_empty());
    assert_eq!(sim.batch.status, BatchStatus::ProcessingPipelines);
    assert_eq!(sim.batch.validation_errors.len(), 1);
}

// ------------------------------------------------------------------ pipeline requests

#[test]
fn unsupported_pipelines_are_denied_notified_and_change_nothing() {
    for target in ["student_matching", "grading", ""] {
        let mut sim = Sim::ready_guest(2);
        let before = sim.batch.clone();
        let id = sim.batch.id.clone();
        let d = sim.send(InboundEvent::PipelineRequest(upstream::pipeline_request(
            &id,
            target,
            "someone-else",
        )));
        assert_eq!(
            topics_of(&d),
            [topics::PIPELINE_DENIED, topics::TEACHER_NOTIFICATION],
            "{target}: every denial notifies the teacher"
        );
        let denied = data(&d, topics::PIPELINE_DENIED);
        assert_eq!(denied["denial_reason"], "unsupported_pipeline");
        assert_eq!(
            denied["user_id"], TEACHER,
            "the batch owner, not the requester"
        );
        assert_eq!(
            denied["resource_breakdown"],
            serde_json::json!({"cj_comparison": 0, "ai_feedback_generation": 0})
        );
        let note = data(&d, topics::TEACHER_NOTIFICATION);
        assert_eq!(note["notification_type"], "pipeline_denied");
        assert_eq!(
            note["payload"]["resource_breakdown"]["ai_feedback_generation"],
            0
        );
        assert_eq!(
            d.batch.as_ref(),
            Some(&before),
            "nothing in the batch changes"
        );
    }
}

#[test]
fn a_request_on_a_ready_batch_starts_a_run() {
    let mut sim = Sim::ready_guest(3);
    let d = sim.request("ai_feedback");
    assert_eq!(
        topics_of(&d),
        [topics::SPELLCHECK_COMMAND, topics::TEACHER_NOTIFICATION]
    );
    assert_eq!(sim.batch.status, BatchStatus::ProcessingPipelines);
    let p = &sim.batch.pipeline;
    assert_eq!(
        p.requested_pipelines,
        [PhaseName::Spellcheck, PhaseName::Nlp, PhaseName::AiFeedback]
    );
    assert_eq!(
        p.spellcheck.status,
        PipelineExecutionStatus::DispatchInitiated
    );
    assert!(p.spellcheck.started_at.is_some() && p.spellcheck.completed_at.is_none());
    assert_eq!(p.spellcheck.essay_counts.total, 3);
    assert_eq!(p.nlp.status, PipelineExecutionStatus::PendingDependencies);
    assert_eq!(
        p.ai_feedback.status,
        PipelineExecutionStatus::PendingDependencies
    );
    assert_eq!(
        p.cj_assessment.status,
        PipelineExecutionStatus::SkippedByUserConfig
    );
    let note = data(&d, topics::TEACHER_NOTIFICATION);
    assert_eq!(note["notification_type"], "batch_processing_started");
    assert_eq!(note["priority"], "low");
    assert_eq!(note["payload"]["total_phases"], 3);
    assert_eq!(
        command_essays(&data(&d, topics::SPELLCHECK_COMMAND)).len(),
        3
    );
    assert_eq!(d.messages[0].envelope()["metadata"]["user_id"], TEACHER);
    assert!(d.snapshot.is_some(), "a start records its configuration");
}

#[test]
fn requests_park_until_ready_and_the_latest_wins() {
    let mut sim = Sim::registered(None, 2, Rules::default());
    let id = sim.batch.id.clone();
    sim.request("nlp");
    let mut retry = upstream::pipeline_request(&id, "cj_assessment", TEACHER);
    retry.prompt_payload = Some(PromptPayload {
        assignment_id: Some("assign-1".into()),
        cms_prompt_ref: None,
    });
    let meta = EventMeta {
        event_id: Uuid::from_u128(1),
        correlation_id: Uuid::from_u128(99),
        traceparent: None,
    };
    let d = sim.send_with(InboundEvent::PipelineRequest(retry), meta);
    assert!(d.messages.is_empty());
    assert_eq!(
        sim.batch
            .parked
            .as_ref()
            .unwrap()
            .request
            .requested_pipeline,
        "cj_assessment"
    );
    let started = sim.send(InboundEvent::ContentProvisioned(
        upstream::content_provisioned(&id, CourseCode::Eng5, TEACHER, &essays(2)),
    ));
    assert!(sim.batch.parked.is_none());
    assert_eq!(sim.batch.status, BatchStatus::ProcessingPipelines);
    assert_eq!(
        sim.batch.pipeline.requested_pipelines,
        [PhaseName::Spellcheck, PhaseName::CjAssessment]
    );
    assert_eq!(
        started.messages[0].correlation_id,
        Uuid::from_u128(99),
        "the parked request's own correlation id"
    );
    assert_eq!(sim.batch.context.assignment_id.as_deref(), Some("assign-1"));
}

#[test]
fn credits_are_checked_on_the_pruned_list() {
    let mut sim = Sim::ready_guest(4);
    sim.balance = Some(5);
    let before = sim.batch.clone();
    let d = sim.request("cj_assessment");
    assert_eq!(
        topics_of(&d),
        [topics::PIPELINE_DENIED, topics::TEACHER_NOTIFICATION]
    );
    let denied = data(&d, topics::PIPELINE_DENIED);
    assert_eq!(denied["denial_reason"], "insufficient_credits");
    assert_eq!(denied["required_credits"], 6);
    assert_eq!(denied["available_credits"], 5);
    assert_eq!(denied["resource_breakdown"]["cj_comparison"], 6);
    let note = data(&d, topics::TEACHER_NOTIFICATION);
    assert_eq!(
        note["notification_type"],
        "pipeline_denied_insufficient_credits"
    );
    assert_eq!(note["payload"]["credit_deficit"], 1);
    assert_eq!(
        (sim.batch.status, &sim.batch.pipeline),
        (before.status, &before.pipeline)
    );
    // ai_feedback over 4 essays costs 4: allowed.
    let ok = sim.request("ai_feedback");
    assert_eq!(topics_of(&ok)[0], topics::SPELLCHECK_COMMAND);
}

// ------------------------------------------------------------------ phase outcomes

#[test]
fn the_spec_example_partial_spellcheck_then_failed_cj() {
    let mut sim = Sim::ready_guest(4);
    sim.request("cj_assessment");
    let d = sim.answer(&["essay-3"]);
    assert_eq!(topics_of(&d), [topics::CJ_ASSESSMENT_COMMAND]);
    let cj = data(&d, topics::CJ_ASSESSMENT_COMMAND);
    assert_eq!(
        command_essays(&cj),
        (0..3)
            .map(|i| (format!("essay-{i}"), format!("store-{i}-corrected")))
            .collect::<Vec<_>>(),
        "only survivors, with their corrected text"
    );
    assert_eq!(cj["class_type"], "GUEST");
    assert_eq!(cj["language"], "en");
    assert_eq!(
        sim.batch.pipeline.spellcheck.status,
        PipelineExecutionStatus::CompletedWithPartialSuccess
    );
    assert_eq!(
        sim.batch.pipeline.spellcheck.essay_counts,
        EssayCounts {
            total: 4,
            pending_dispatch_or_processing: 0,
            successful: 3,
            failed: 1
        }
    );
    let d = sim.answer(&["essay-0", "essay-1", "essay-2"]);
    let done = data(&d, topics::PIPELINE_COMPLETED);
    assert_eq!(done["completed_phases"], serde_json::json!(["spellcheck"]));
    assert_eq!(done["successful_essay_count"], 0);
    assert_eq!(done["failed_essay_count"], 4);
    assert_eq!(done["final_status"], "failed_critically");
    assert_eq!(done["processing_duration_seconds"], 4.0);
    assert_eq!(
        sim.batch.pipeline.cj_assessment.status,
        PipelineExecutionStatus::Failed
    );
    assert!(sim.batch.pipeline.cj_assessment.completed_at.is_some());
    assert_eq!(sim.batch.status, BatchStatus::ReadyForPipelineExecution);
    let note = data(&d, topics::TEACHER_NOTIFICATION);
    assert_eq!(
        (note["priority"].as_str(), note["action_required"].as_bool()),
        (Some("immediate"), Some(true))
    );
}

#[test]
fn a_failure_skips_the_rest_of_the_run() {
    let mut sim = Sim::ready_guest(2);
    sim.request("ai_feedback");
    sim.answer(&[]);
    let d = sim.answer(&["essay-0", "essay-1"]);
    assert_eq!(
        sim.batch.pipeline.nlp.status,
        PipelineExecutionStatus::Failed
    );
    assert_eq!(
        sim.batch.pipeline.ai_feedback.status,
        PipelineExecutionStatus::SkippedDueToDependencyFailure
    );
    let done = data(&d, topics::PIPELINE_COMPLETED);
    assert_eq!(done["completed_phases"], serde_json::json!(["spellcheck"]));
    assert_eq!(
        (
            done["successful_essay_count"].as_i64(),
            done["failed_essay_count"].as_i64()
        ),
        (Some(0), Some(2))
    );
}

#[test]
fn full_success_reports_every_phase() {
    let mut sim = Sim::ready_guest(2);
    sim.request("ai_feedback");
    sim.answer(&[]);
    let nlp = sim.answer(&[]);
    assert_eq!(topics_of(&nlp), [topics::AI_FEEDBACK_COMMAND]);
    assert_eq!(
        data(&nlp, topics::AI_FEEDBACK_COMMAND)["owner_user_id"],
        TEACHER
    );
    let d = sim.answer(&[]);
    let done = data(&d, topics::PIPELINE_COMPLETED);
    assert_eq!(
        done["completed_phases"],
        serde_json::json!(["spellcheck", "nlp", "ai_feedback"])
    );
    assert_eq!(done["final_status"], "completed_successfully");
    assert_eq!(done["successful_essay_count"], 2);
    let note = data(&d, topics::TEACHER_NOTIFICATION);
    assert_eq!(
        (note["priority"].as_str(), note["action_required"].as_bool()),
        (Some("high"), Some(false))
    );
}

#[test]
fn sequential_pipelines_reuse_finished_phases() {
    let mut sim = Sim::ready_guest(3);
    sim.request("nlp");
    sim.answer(&["essay-2"]);
    sim.answer(&[]);
    let d = sim.request("cj_assessment");
    assert_eq!(
        topics_of(&d)[0],
        topics::CJ_ASSESSMENT_COMMAND,
        "spellcheck is pruned"
    );
    assert_eq!(
        command_essays(&data(&d, topics::CJ_ASSESSMENT_COMMAND)),
        [
            ("essay-0".into(), "store-0-corrected".into()),
            ("essay-1".into(), "store-1-corrected".into())
        ],
        "essays that failed a pruned phase stay out"
    );
    let done = sim.answer(&[]);
    let done = data(&done, topics::PIPELINE_COMPLETED);
    assert_eq!(
        done["completed_phases"],
        serde_json::json!(["cj_assessment"])
    );
    assert_eq!(
        (
            done["successful_essay_count"].as_i64(),
            done["failed_essay_count"].as_i64()
        ),
        (Some(2), Some(0))
    );
    // Everything done already: answered at once.
    let again = sim.request("cj_assessment");
    let at_once = data(&again, topics::PIPELINE_COMPLETED);
    assert_eq!(
        at_once["completed_phases"],
        serde_json::json!(["spellcheck", "cj_assessment"])
    );
    assert_eq!(at_once["processing_duration_seconds"], 0.0);
    assert_eq!(
        (
            at_once["successful_essay_count"].as_i64(),
            at_once["failed_essay_count"].as_i64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(sim.batch.status, BatchStatus::ReadyForPipelineExecution);
}

#[test]
fn retry_reruns_partially_completed_phases() {
    let mut sim = Sim::ready_guest(2);
    sim.request("spellcheck");
    sim.answer(&["essay-1"]);
    let id = sim.batch.id.clone();
    let mut retry = upstream::pipeline_request(&id, "spellcheck", TEACHER);
    retry.is_retry = true;
    let d = sim.send(InboundEvent::PipelineRequest(retry));
    assert_eq!(
        command_essays(&data(&d, topics::SPELLCHECK_COMMAND)).len(),
        2,
        "all essays again"
    );
}

#[test]
fn stale_and_duplicate_outcomes_change_nothing() {
    let mut sim = Sim::ready_guest(2);
    sim.request("spellcheck");
    let first_run = sim.batch.orchestration.current_run.clone().unwrap();
    let id = sim.batch.id.clone();
    let outcome = upstream::phase_outcome(
        &id,
        PhaseName::Spellcheck,
        &essays(2),
        &[],
        first_run.correlation_id,
    );
    sim.send(InboundEvent::PhaseOutcome(outcome.clone()));
    let mut retry = upstream::pipeline_request(&id, "spellcheck", TEACHER);
    retry.is_retry = true;
    // Everything completed: a plain request is answered at once; make spellcheck run again.
    sim.batch.pipeline.spellcheck.status = PipelineExecutionStatus::Failed;
    sim.send(InboundEvent::PipelineRequest(retry));
    assert_eq!(sim.batch.status, BatchStatus::ProcessingPipelines);
    let before = sim.batch.clone();
    let stale = sim.send(InboundEvent::PhaseOutcome(outcome));
    assert!(
        matches!(stale.verdict, Verdict::Ignored(ref why) if why.contains("stale")),
        "{:?}",
        stale.verdict
    );
    assert_eq!(sim.batch.pipeline, before.pipeline);
    let current = sim.batch.orchestration.current_run.clone().unwrap();
    let fresh = upstream::phase_outcome(
        &id,
        PhaseName::Spellcheck,
        &essays(2),
        &[],
        current.correlation_id,
    );
    assert_eq!(
        sim.send(InboundEvent::PhaseOutcome(fresh.clone())).verdict,
        Verdict::Applied
    );
    let dup = sim.send(InboundEvent::PhaseOutcome(fresh));
    assert!(matches!(dup.verdict, Verdict::Ignored(_)));
    assert!(dup.messages.is_empty());
}

#[test]
fn outcome_ids_never_dispatched_are_ignored() {
    let mut sim = Sim::ready_guest(2);
    sim.request("spellcheck");
    let run = sim.batch.orchestration.current_run.clone().unwrap();
    let id = sim.batch.id.clone();
    let mut processed = essays(2);
    processed.push(EssayRef::new("intruder", "store-x"));
    let d = sim.send(InboundEvent::PhaseOutcome(upstream::phase_outcome(
        &id,
        PhaseName::Spellcheck,
        &processed,
        &[],
        run.correlation_id,
    )));
    assert!(d.notes.iter().any(|n| n.contains("intruder")));
    assert_eq!(
        data(&d, topics::PIPELINE_COMPLETED)["successful_essay_count"],
        2
    );
    assert!(sim.batch.essay("intruder").is_none());
}

#[test]
fn a_parked_request_starts_when_the_run_ends() {
    let mut sim = Sim::ready_guest(2);
    sim.request("spellcheck");
    let parked_meta = EventMeta {
        event_id: Uuid::from_u128(5),
        correlation_id: Uuid::from_u128(55),
        traceparent: None,
    };
    let id = sim.batch.id.clone();
    sim.send_with(
        InboundEvent::PipelineRequest(upstream::pipeline_request(&id, "nlp", TEACHER)),
        parked_meta,
    );
    assert!(sim.batch.parked.is_some());
    let d = sim.answer(&[]);
    assert_eq!(
        topics_of(&d),
        [
            topics::PIPELINE_COMPLETED,
            topics::TEACHER_NOTIFICATION,
            topics::NLP_COMMAND,
            topics::TEACHER_NOTIFICATION
        ]
    );
    assert_eq!(d.messages[2].correlation_id, Uuid::from_u128(55));
    assert!(sim.batch.parked.is_none());
    assert_eq!(sim.batch.status, BatchStatus::ProcessingPipelines);
}

#[test]
fn traceparent_travels_on_commands() {
    let mut sim = Sim::ready_guest(1);
    let id = sim.batch.id.clone();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let meta = EventMeta {
        event_id: Uuid::from_u128(3),
        correlation_id: Uuid::from_u128(4),
        traceparent: Some(tp.into()),
    };
    let d = sim.send_with(
        InboundEvent::PipelineRequest(upstream::pipeline_request(&id, "spellcheck", TEACHER)),
        meta,
    );
    assert_eq!(d.messages[0].envelope()["metadata"]["traceparent"], tp);
    assert_eq!(d.messages[0].traceparent.as_deref(), Some(tp));
}

#[test]
fn the_graph_resolves_and_rejects_cycles() {
    let g = PhaseGraph::default();
    assert_eq!(
        g.resolve(PhaseName::CjAssessment).unwrap(),
        [PhaseName::Spellcheck, PhaseName::CjAssessment]
    );
    assert_eq!(
        g.resolve(PhaseName::AiFeedback).unwrap(),
        [PhaseName::Spellcheck, PhaseName::Nlp, PhaseName::AiFeedback]
    );
    assert!(g.resolve(PhaseName::StudentMatching).is_err());
    assert!(PhaseGraph::new([
        (PhaseName::Nlp, vec![PhaseName::Spellcheck], false),
        (PhaseName::Spellcheck, vec![PhaseName::Nlp], false),
    ])
    .is_err());
}

// ------------------------------------------------------------------ properties

#[derive(Debug, Clone)]
enum Op {
    Provision,
    Confirm,
    Ready,
    Request { target: u8, retry: bool },
    Validation { critical: bool },
    Answer { pick: u8, fail_mask: u8 },
    Redeliver { pick: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Provision),
        1 => Just(Op::Confirm),
        1 => Just(Op::Ready),
        3 => (0u8..6, any::<bool>()).prop_map(|(target, retry)| Op::Request { target, retry }),
        1 => prop::bool::weighted(0.3).prop_map(|critical| Op::Validation { critical }),
        6 => (any::<u8>(), any::<u8>()).prop_map(|(pick, fail_mask)| Op::Answer { pick, fail_mask }),
        2 => any::<u8>().prop_map(|pick| Op::Redeliver { pick }),
    ]
}

const TARGETS: [&str; 6] = [
    "spellcheck",
    "nlp",
    "cj_assessment",
    "ai_feedback",
    "student_matching",
    "bogus",
];

/// The essay lifecycle service's view: commands it owes an answer to.
struct Pending {
    phase: PhaseName,
    essays: Vec<EssayRef>,
    correlation_id: Uuid,
}

fn run_script(regular: bool, n: usize, script: Vec<Op>) -> Result<(), TestCaseError> {
    let mut sim = Sim::registered(regular.then_some("class-1"), n as i64, Rules::default());
    let id = sim.batch.id.clone();
    let mut pending: Vec<Pending> = Vec::new();
    let mut sent: Vec<(InboundEvent, EventMeta)> = Vec::new();
    let mut dispatched: HashMap<u32, Vec<PhaseName>> = HashMap::new();
    let mut completions: HashMap<u32, u32> = HashMap::new();
    let (mut received, mut answered, mut replaced) = (0u32, 0u32, 0u32);
    for op in script {
        let now = sim.now;
        let event = match op {
            Op::Provision => InboundEvent::ContentProvisioned(upstream::content_provisioned(
                &id,
                CourseCode::Eng5,
                TEACHER,
                &essays(n),
            )),
            Op::Confirm => InboundEvent::AssociationsConfirmed(upstream::associations_confirmed(
                &id,
                "class-1",
                CourseCode::Eng5,
                &ids(&essays(n)),
                now,
            )),
            Op::Ready => InboundEvent::EssaysReady(upstream::essays_ready(
                &id,
                CourseCode::Eng5,
                "REGULAR",
                &essays(n),
                now,
            )),
            Op::Request { target, retry } => {
                let mut r = upstream::pipeline_request(&id, TARGETS[target as usize], TEACHER);
                r.is_retry = retry;
                InboundEvent::PipelineRequest(r)
            }
            Op::Validation { critical } => InboundEvent::ValidationErrors(
                upstream::validation_errors(&id, &["essay-0".into()], critical, now),
            ),
            Op::Answer { pick, fail_mask } => {
                if pending.is_empty() {
                    continue;
                }
                let p = pending.remove(pick as usize % pending.len());
                let (failed, processed): (Vec<_>, Vec<_>) = p
                    .essays
                    .iter()
                    .enumerate()
                    .partition(|(i, _)| fail_mask & (1 << (i % 8)) != 0);
                let processed: Vec<EssayRef> =
                    processed.into_iter().map(|(_, e)| e.clone()).collect();
                let failed: Vec<String> = failed
                    .into_iter()
                    .map(|(_, e)| e.essay_id.clone())
                    .collect();
                InboundEvent::PhaseOutcome(upstream::phase_outcome(
                    &id,
                    p.phase,
                    &processed,
                    &failed,
                    p.correlation_id,
                ))
            }
            Op::Redeliver { pick } => {
                if sent.is_empty() {
                    continue;
                }
                let (event, meta) = sent[pick as usize % sent.len()].clone();
                received += u32::from(matches!(event, InboundEvent::PipelineRequest(_)));
                let before = sim.batch.clone();
                let d = sim.send_with(event.clone(), meta.clone());
                check(
                    &before,
                    &sim.batch,
                    &event,
                    &meta,
                    &d,
                    &mut dispatched,
                    &mut completions,
                    &mut answered,
                    &mut replaced,
                    &mut pending,
                )?;
                check_accounting(&sim.batch, received, answered, replaced)?;
                continue;
            }
        };
        let meta = EventMeta {
            event_id: sim.ids.next_id(),
            correlation_id: sim.ids.next_id(),
            traceparent: None,
        };
        received += u32::from(matches!(event, InboundEvent::PipelineRequest(_)));
        let before = sim.batch.clone();
        let d = sim.send_with(event.clone(), meta.clone());
        check(
            &before,
            &sim.batch,
            &event,
            &meta,
            &d,
            &mut dispatched,
            &mut completions,
            &mut answered,
            &mut replaced,
            &mut pending,
        )?;
        check_accounting(&sim.batch, received, answered, replaced)?;
        sent.push((event, meta));
    }
    Ok(())
}

fn check_accounting(
    batch: &Batch,
    received: u32,
    answered: u32,
    replaced: u32,
) -> Result<(), TestCaseError> {
    let open =
        u32::from(batch.parked.is_some()) + u32::from(batch.orchestration.current_run.is_some());
    prop_assert_eq!(
        received,
        answered + replaced + open,
        "every request is answered, replaced, parked or running"
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check(
    before: &Batch,
    after: &Batch,
    event: &InboundEvent,
    meta: &EventMeta,
    d: &Outcome,
    dispatched: &mut HashMap<u32, Vec<PhaseName>>,
    completions: &mut HashMap<u32, u32>,
    answered: &mut u32,
    replaced: &mut u32,
    pending: &mut Vec<Pending>,
) -> Result<(), TestCaseError> {
    if before.is_terminal() {
        prop_assert_eq!(after.status, before.status, "terminal states stay terminal");
    }
    let (runs_before, runs_after) = (
        before.orchestration.runs_started,
        after.orchestration.runs_started,
    );
    prop_assert!(runs_after <= runs_before + 1);
    if matches!(event, InboundEvent::PipelineRequest(_))
        && d.verdict == Verdict::Applied
        && before.parked.is_some()
        && after
            .parked
            .as_ref()
            .is_some_and(|p| p.event_id == meta.event_id)
    {
        *replaced += 1;
    }
    if matches!(event, InboundEvent::PipelineRequest(_)) && matches!(d.verdict, Verdict::Ignored(_))
    {
        // A retry of what is already waiting or running is absorbed.
        *answered += 1;
    }
    let mut run_finished = false;
    for m in &d.messages {
        let data = &m.envelope()["data"];
        if let Some(phase) = upstream::phase_of_command(m.topic) {
            let run = if runs_after > runs_before {
                runs_after
            } else {
                runs_before
            };
            let phases = dispatched.entry(run).or_default();
            prop_assert!(
                !phases.contains(&phase),
                "{} dispatched twice in run {}",
                phase,
                run
            );
            phases.push(phase);
            let essays: Vec<EssayRef> =
                serde_json::from_value(data["essays_to_process"].clone()).unwrap();
            prop_assert!(!essays.is_empty(), "commands carry essays");
            pending.push(Pending {
                phase,
                essays,
                correlation_id: m.correlation_id,
            });
        }
        match m.topic {
            topics::PIPELINE_COMPLETED => {
                *answered += 1;
                let ok = data["successful_essay_count"].as_i64().unwrap();
                let failed = data["failed_essay_count"].as_i64().unwrap();
                prop_assert!(ok >= 0 && failed >= 0);
                // The run in progress ends first; any later completion in the same
                // decision answers a parked request at once.
                match before
                    .orchestration
                    .current_run
                    .as_ref()
                    .filter(|_| !run_finished)
                {
                    Some(run) => {
                        run_finished = true;
                        prop_assert_eq!(
                            (ok + failed) as usize,
                            run.input_essays.len(),
                            "counts add up to the run's input"
                        );
                        let n = completions.entry(runs_before).or_default();
                        *n += 1;
                        prop_assert!(*n <= 1, "two completions for run {}", runs_before);
                    }
                    None => {
                        prop_assert_eq!(data["processing_duration_seconds"].as_f64(), Some(0.0));
                        prop_assert_eq!(
                            (ok + failed) as usize,
                            after.essays.len(),
                            "counts add up to the stored essays"
                        );
                    }
                }
            }
            topics::PIPELINE_DENIED => *answered += 1,
            _ => {}
        }
    }
    for phase in PhaseName::ALL {
        let c = after.pipeline.phase(*phase).essay_counts;
        prop_assert_eq!(
            c.total,
            c.successful + c.failed + c.pending_dispatch_or_processing,
            "counts of {}",
            phase
        );
    }
    if after.status == BatchStatus::ProcessingPipelines {
        prop_assert!(after.orchestration.current_run.is_some());
    } else {
        prop_assert!(after.orchestration.current_run.is_none());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_interleavings_keep_the_invariants(
        regular in any::<bool>(),
        n in 1usize..6,
        script in prop::collection::vec(op(), 1..80),
    ) {
        run_script(regular, n, script)?;
    }
}

#[test]
fn a_parked_request_keeps_its_trace() {
    let mut sim = Sim::registered(None, 1, Rules::default());
    let id = sim.batch.id.clone();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let meta = EventMeta {
        event_id: Uuid::from_u128(8),
        correlation_id: Uuid::from_u128(9),
        traceparent: Some(tp.into()),
    };
    sim.send_with(
        InboundEvent::PipelineRequest(upstream::pipeline_request(&id, "spellcheck", TEACHER)),
        meta,
    );
    let d = sim.send(InboundEvent::ContentProvisioned(
        upstream::content_provisioned(&id, CourseCode::Eng5, TEACHER, &essays(1)),
    ));
    assert_eq!(d.messages[0].topic, topics::SPELLCHECK_COMMAND);
    assert_eq!(d.messages[0].traceparent.as_deref(), Some(tp));
    assert_eq!(d.messages[0].envelope()["metadata"]["traceparent"], tp);
}

// ------------------------------------------------------------------ platform parity

fn graph(phases: &[(PhaseName, &[PhaseName], bool)]) -> PhaseGraph {
    PhaseGraph::new(phases.iter().map(|(p, d, r)| (*p, d.to_vec(), *r))).unwrap()
}

#[test]
fn the_graph_takes_several_prerequisites_and_names_what_is_wrong() {
    use PhaseName::{AiFeedback, CjAssessment, Nlp, Spellcheck};
    let g = PhaseGraph::default();
    assert_eq!(
        g.resolve(AiFeedback).unwrap(),
        [Spellcheck, Nlp, AiFeedback]
    );
    assert_eq!(g.resolve(CjAssessment).unwrap(), [Spellcheck, CjAssessment]);
    assert_eq!(g.resolve(Nlp).unwrap(), [Spellcheck, Nlp]);
    assert_eq!(g.node(AiFeedback).unwrap().depends_on, [Spellcheck, Nlp]);
    let cycle = PhaseGraph::new([
        (Spellcheck, vec![AiFeedback], false),
        (Nlp, vec![Spellcheck], false),
        (AiFeedback, vec![Nlp], false),
    ])
    .unwrap_err();
    assert!(cycle.to_string().contains("cycle"), "{cycle}");
    assert!(cycle.to_string().contains("ai_feedback"), "{cycle}");
    let unknown = PhaseGraph::new([(Nlp, vec![CjAssessment], false)]).unwrap_err();
    assert!(unknown.to_string().contains("cj_assessment"), "{unknown}");
    let matching = PhaseGraph::new([(PhaseName::StudentMatching, vec![], false)]).unwrap_err();
    assert!(
        matching.to_string().contains("student_matching"),
        "{matching}"
    );
}

#[test]
fn each_phase_gets_the_essays_that_came_through_everything_it_needs() {
    // The platform's graph: ai_feedback needs spellcheck and nlp.
    let mut sim = Sim::ready_guest(3);
    sim.request("ai_feedback");
    let nlp = sim.answer(&["essay-1"]);
    assert_eq!(
        command_essays(&data(&nlp, topics::NLP_COMMAND))
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>(),
        ["essay-0", "essay-2"]
    );
    let ai = sim.answer(&["essay-2"]);
    assert_eq!(
        command_essays(&data(&ai, topics::AI_FEEDBACK_COMMAND)),
        [("essay-0".to_owned(), "store-0-corrected".to_owned())]
    );

    // A graph where ai_feedback needs two phases that do not need each other:
    // nlp gets the run's input, ai_feedback what both let through.
    use PhaseName::{AiFeedback, Nlp, Spellcheck};
    let rules = Rules::new(graph(&[
        (Spellcheck, &[], false),
        (Nlp, &[], false),
        (AiFeedback, &[Spellcheck, Nlp], false),
    ]));
    let mut sim = Sim::ready_guest_with(3, rules);
    sim.request("ai_feedback");
    let nlp = sim.answer(&["essay-1"]);
    assert_eq!(command_essays(&data(&nlp, topics::NLP_COMMAND)).len(), 3);
    let ai = sim.answer(&["essay-2"]);
    assert_eq!(
        command_essays(&data(&ai, topics::AI_FEEDBACK_COMMAND))
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>(),
        ["essay-0"]
    );
}

#[test]
fn pruning_keeps_completed_phases_whose_input_did_not_change() {
    let mut sim = Sim::ready_guest(3);
    sim.request("cj_assessment");
    sim.answer(&[]);
    sim.answer(&[]);
    let d = sim.request("ai_feedback");
    assert_eq!(
        topics_of(&d)[0],
        topics::NLP_COMMAND,
        "spellcheck completed: pruned; nlp runs on its output"
    );
    assert_eq!(
        sim.batch.pipeline.requested_pipelines,
        [PhaseName::Nlp, PhaseName::AiFeedback]
    );
}

#[test]
fn the_prompt_gate_refuses_prompt_phases_without_a_prompt() {
    let mut sim = Sim::registered_with_prompt(None, 2, Rules::default(), None);
    sim.provision(2);
    let before = sim.batch.clone();
    for target in ["nlp", "cj_assessment", "ai_feedback"] {
        let d = sim.request(target);
        assert_eq!(
            topics_of(&d),
            [topics::PIPELINE_DENIED, topics::TEACHER_NOTIFICATION],
            "{target}"
        );
        assert_eq!(
            data(&d, topics::PIPELINE_DENIED)["denial_reason"],
            "prompt_not_attached"
        );
        assert_eq!(sim.batch, before, "{target}: nothing changes");
    }
    // Spellcheck needs no prompt.
    let d = sim.request("spellcheck");
    assert_eq!(topics_of(&d)[0], topics::SPELLCHECK_COMMAND);
    sim.answer(&[]);
    // A request that brings its own prompt runs, and the prompt stays with the batch.
    let id = sim.batch.id.clone();
    let mut request = upstream::pipeline_request(&id, "cj_assessment", TEACHER);
    request.prompt_payload = Some(PromptPayload {
        assignment_id: Some("assign-7".into()),
        cms_prompt_ref: None,
    });
    let d = sim.send(InboundEvent::PipelineRequest(request));
    assert_eq!(topics_of(&d)[0], topics::CJ_ASSESSMENT_COMMAND);
    assert_eq!(
        data(&d, topics::CJ_ASSESSMENT_COMMAND)["assignment_id"],
        "assign-7"
    );
    assert_eq!(sim.batch.context.assignment_id.as_deref(), Some("assign-7"));
}

#[test]
fn a_denied_request_leaves_the_batch_as_it_was() {
    let mut sim = Sim::ready_guest(4);
    sim.balance = Some(1);
    let before = sim.batch.clone();
    let id = sim.batch.id.clone();
    let mut request = upstream::pipeline_request(&id, "cj_assessment", TEACHER);
    request.prompt_payload = Some(PromptPayload {
        assignment_id: None,
        cms_prompt_ref: Some(prompt()),
    });
    request.prompt_payload.as_mut().unwrap().cms_prompt_ref = Some({
        let mut p = prompt();
        p.references
            .values_mut()
            .for_each(|r| r.storage_id = "other".into());
        p
    });
    let d = sim.send(InboundEvent::PipelineRequest(request));
    assert_eq!(
        data(&d, topics::PIPELINE_DENIED)["denial_reason"],
        "insufficient_credits"
    );
    assert_eq!(
        d.batch.as_ref(),
        Some(&before),
        "the prompt of a denied request is not stored"
    );
    let breakdown = &data(&d, topics::PIPELINE_DENIED)["resource_breakdown"];
    assert_eq!(breakdown["cj_comparison"], 6);
    assert_eq!(breakdown["ai_feedback_generation"], 0, "both keys, always");
}

#[test]
fn policy_denials_use_the_platform_spellings() {
    let sim = Sim::ready_guest(2);
    let id = sim.batch.id.clone();
    let event =
        InboundEvent::PipelineRequest(upstream::pipeline_request(&id, "ai_feedback", TEACHER));
    let meta = EventMeta {
        event_id: Uuid::from_u128(1),
        correlation_id: Uuid::from_u128(2),
        traceparent: None,
    };
    let query = match sim.rules.decide(
        Some(&sim.batch),
        &event,
        &meta,
        &mut Env {
            now: sim.now,
            ids: &mut SequentialIds(50),
            credits: &CreditAnswers::new(),
        },
    ) {
        Decision::NeedsCredit(q) => q,
        other => panic!("expected a credit question, got {other:?}"),
    };
    assert_eq!(query.user_id, TEACHER);
    assert_eq!(query.org_id.as_deref(), Some("org-1"));
    assert_eq!(
        query.requirements,
        [("ai_feedback_generation".to_owned(), 2)].into(),
        "only quantities above zero are asked for"
    );
    for (reason, kind) in [
        ("rate_limit_exceeded", "pipeline_denied_rate_limit"),
        (
            "insufficient_credits",
            "pipeline_denied_insufficient_credits",
        ),
        ("entitlements_unavailable", "pipeline_denied"),
    ] {
        let answers: CreditAnswers = [(
            query.clone(),
            CreditVerdict::Denied {
                reason: reason.into(),
                available: 0,
            },
        )]
        .into();
        let Decision::Apply(effects) = sim.rules.decide(
            Some(&sim.batch),
            &event,
            &meta,
            &mut Env {
                now: sim.now,
                ids: &mut SequentialIds(50),
                credits: &answers,
            },
        ) else {
            panic!("a denial publishes");
        };
        let topics: Vec<_> = effects.messages.iter().map(|m| m.topic).collect();
        assert_eq!(
            topics,
            [topics::PIPELINE_DENIED, topics::TEACHER_NOTIFICATION]
        );
        assert_eq!(
            effects.messages[0].envelope()["data"]["denial_reason"],
            reason
        );
        assert_eq!(
            effects.messages[1].envelope()["data"]["notification_type"],
            kind
        );
        assert_eq!(effects.messages[0].correlation_id, meta.correlation_id);
        assert!(!effects.changed);
    }
}

#[test]
fn everything_a_run_publishes_carries_the_runs_correlation_id() {
    let mut sim = Sim::ready_guest(2);
    let id = sim.batch.id.clone();
    let run_correlation = Uuid::from_u128(4242);
    let meta = EventMeta {
        event_id: Uuid::from_u128(4241),
        correlation_id: run_correlation,
        traceparent: None,
    };
    sim.send_with(
        InboundEvent::PipelineRequest(upstream::pipeline_request(&id, "cj_assessment", TEACHER)),
        meta,
    );
    // The outcome arrives in an envelope with a correlation id of its own.
    let run = sim.batch.orchestration.current_run.clone().unwrap();
    let outcome =
        upstream::phase_outcome(&id, PhaseName::Spellcheck, &essays(2), &[], run_correlation);
    let d = sim.send_with(
        InboundEvent::PhaseOutcome(outcome),
        EventMeta {
            event_id: Uuid::from_u128(4243),
            correlation_id: Uuid::from_u128(9999),
            traceparent: None,
        },
    );
    assert_eq!(run.correlation_id, run_correlation);
    for m in &d.messages {
        assert_eq!(m.correlation_id, run_correlation, "{}", m.topic);
    }
    let done = sim.answer(&[]);
    for m in &done.messages {
        assert_eq!(m.correlation_id, run_correlation, "{}", m.topic);
    }
    assert_eq!(
        data(&done, topics::PIPELINE_COMPLETED)["correlation_id"],
        run_correlation.to_string()
    );
}

#[test]
fn a_repeated_essays_ready_keeps_the_corrected_text() {
    let mut sim = Sim::ready_guest(2);
    sim.request("spellcheck");
    sim.answer(&[]);
    let id = sim.batch.id.clone();
    let mut refs = essays(2);
    refs[1].text_storage_id = "store-1-replaced".into();
    sim.send(InboundEvent::EssaysReady(upstream::essays_ready(
        &id,
        CourseCode::Eng5,
        "GUEST",
        &refs,
        sim.now,
    )));
    assert_eq!(
        sim.batch.essays[0].corrected_text_storage_id.as_deref(),
        Some("store-0-corrected"),
        "same original text: the correction still applies"
    );
    assert_eq!(
        sim.batch.essays[1].corrected_text_storage_id, None,
        "new original text: the old correction does not"
    );
    let d = sim.request("cj_assessment");
    assert_eq!(
        command_essays(&data(&d, topics::CJ_ASSESSMENT_COMMAND)),
        [
            ("essay-0".to_owned(), "store-0-corrected".to_owned()),
            ("essay-1".to_owned(), "store-1-replaced".to_owned()),
        ],
        "spellcheck is pruned; each essay goes with its newest valid text"
    );
}

#[test]
fn a_repeated_retry_does_not_dispatch_twice() {
    let mut sim = Sim::ready_guest(2);
    let id = sim.batch.id.clone();
    let retry = || {
        let mut r = upstream::pipeline_request(&id, "spellcheck", TEACHER);
        r.is_retry = true;
        InboundEvent::PipelineRequest(r)
    };
    let first = sim.send(retry());
    assert_eq!(topics_of(&first)[0], topics::SPELLCHECK_COMMAND);
    let again = sim.send(retry());
    assert!(
        matches!(again.verdict, Verdict::Ignored(_)),
        "{:?}",
        again.verdict
    );
    assert!(again.messages.is_empty());
    sim.answer(&[]);
    let later = sim.send(retry());
    assert!(
        later
            .messages
            .iter()
            .all(|m| m.topic != topics::SPELLCHECK_COMMAND),
        "spellcheck completed: a new retry is answered without dispatching"
    );
}

#[test]
fn every_phase_change_is_reported_for_the_log() {
    let mut sim = Sim::ready_guest(2);
    let d = sim.request("cj_assessment");
    let changes: Vec<_> = d
        .transitions
        .iter()
        .map(|t| (t.phase, t.from, t.to))
        .collect();
    assert_eq!(
        changes,
        [
            (
                PhaseName::Spellcheck,
                PipelineExecutionStatus::SkippedByUserConfig,
                PipelineExecutionStatus::DispatchInitiated
            ),
            (
                PhaseName::CjAssessment,
                PipelineExecutionStatus::SkippedByUserConfig,
                PipelineExecutionStatus::PendingDependencies
            ),
        ]
    );
    let d = sim.answer(&[]);
    let changes: Vec<_> = d.transitions.iter().map(|t| (t.phase, t.to)).collect();
    assert_eq!(
        changes,
        [
            (
                PhaseName::Spellcheck,
                PipelineExecutionStatus::CompletedSuccessfully
            ),
            (
                PhaseName::CjAssessment,
                PipelineExecutionStatus::DispatchInitiated
            ),
        ]
    );
    assert!(d.transitions[0].completed_at.is_some());
}
