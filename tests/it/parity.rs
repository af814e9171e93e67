//! Parity with the platform through the public surface: the phase graph and
//! the prompt gate over Kafka, the contract details other services read, and
//! the entitlements service (a real HTTP listener in the test) behind the
//! credit check, with its timeout, circuit breaker and fail-closed/open choice.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Json;
use bos::config::{CreditPolicyKind, OnUnavailable, Settings};
use bos::contracts::{topics, CourseCode, PhaseName};
use bos::sim::upstream;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::flow::{command_essays, correlation, data, Flow, FlowOptions};
use crate::support::{eventually, TEACHER};

#[tokio::test]
async fn ai_feedback_runs_after_spellcheck_and_nlp_with_the_survivors() {
    let flow = Flow::start().await;
    let (id, corr) = flow.register(None, 3).await;
    flow.provision(&id, corr, 3).await;
    flow.request(&id, "ai_feedback").await;
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    let run = correlation(&spell[0]);
    flow.answer(&id, PhaseName::Spellcheck, &spell[0], &["essay-0"])
        .await;
    let nlp = flow.observer.wait_for(topics::NLP_COMMAND, 1).await;
    assert_eq!(command_essays(&nlp[0]).len(), 2);
    flow.answer(&id, PhaseName::Nlp, &nlp[0], &["essay-1"])
        .await;
    let ai = flow.observer.wait_for(topics::AI_FEEDBACK_COMMAND, 1).await;
    assert_eq!(
        command_essays(&ai[0]),
        [("essay-2".to_owned(), "store-2-corrected".to_owned())]
    );
    assert_eq!(data(&ai[0])["owner_user_id"], TEACHER);
    flow.answer(&id, PhaseName::AiFeedback, &ai[0], &[]).await;
    let done = flow.observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    assert_eq!(
        data(&done[0])["completed_phases"],
        json!(["spellcheck", "nlp", "ai_feedback"])
    );
    assert_eq!(
        (
            data(&done[0])["successful_essay_count"].as_i64(),
            data(&done[0])["failed_essay_count"].as_i64()
        ),
        (Some(1), Some(2))
    );
    for m in [&nlp[0], &ai[0], &done[0]] {
        assert_eq!(correlation(m), run, "{}: the run's correlation id", m.topic);
    }
    flow.assert_all_valid();
    flow.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn the_prompt_gate_denies_over_kafka_and_a_request_can_bring_its_prompt() {
    let flow = Flow::start().await;
    let mut body = serde_json::to_value(crate::support::registration(None, 2)).unwrap();
    body.as_object_mut().unwrap().remove("student_prompt_ref");
    let (status, reply) = flow
        .app
        .call("POST", "/v1/batches/register", &[], Some(body))
        .await;
    assert_eq!(status, 202);
    let id = reply["batch_id"].as_str().unwrap().to_owned();
    let corr: Uuid = reply["correlation_id"].as_str().unwrap().parse().unwrap();
    flow.provision(&id, corr, 2).await;
    flow.request(&id, "cj_assessment").await;
    let denied = flow.observer.wait_for(topics::PIPELINE_DENIED, 1).await;
    assert_eq!(data(&denied[0])["denial_reason"], "prompt_not_attached");
    assert_eq!(
        data(&denied[0])["resource_breakdown"],
        json!({"cj_comparison": 1, "ai_feedback_generation": 0})
    );
    let note = flow
        .observer
        .wait_for(topics::TEACHER_NOTIFICATION, 1)
        .await;
    assert_eq!(data(&note[0])["notification_type"], "pipeline_denied");
    assert_eq!(
        data(&note[0])["payload"]["denial_reason"],
        "prompt_not_attached"
    );
    assert!(flow.batch(&id).await.context.assignment_id.is_none());
    // The same request with an assignment: it runs, and the assignment goes on the command.
    let mut request = upstream::pipeline_request(&id, "cj_assessment", TEACHER);
    request.prompt_payload = Some(bos::contracts::PromptPayload {
        assignment_id: Some("assign-9".into()),
        cms_prompt_ref: None,
    });
    flow.send_request(&id, request).await;
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    flow.answer(&id, PhaseName::Spellcheck, &spell[0], &[])
        .await;
    let cj = flow
        .observer
        .wait_for(topics::CJ_ASSESSMENT_COMMAND, 1)
        .await;
    assert_eq!(data(&cj[0])["assignment_id"], "assign-9");
    flow.assert_all_valid();
    flow.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn a_repeated_essays_ready_keeps_the_corrected_text_over_kafka() {
    let flow = Flow::start().await;
    let (id, corr) = flow.register(Some("class-1"), 2).await;
    flow.provision(&id, corr, 2).await;
    flow.observer
        .wait_for(topics::STUDENT_MATCHING_COMMAND, 1)
        .await;
    let now = chrono::Utc::now();
    let ids: Vec<String> = crate::support::essays(2)
        .iter()
        .map(|e| e.essay_id.clone())
        .collect();
    let ready = upstream::essays_ready(
        &id,
        CourseCode::Eng5,
        "REGULAR",
        &crate::support::essays(2),
        now,
    );
    flow.up
        .send(
            topics::STUDENT_ASSOCIATIONS_CONFIRMED,
            &id,
            corr,
            upstream::associations_confirmed(&id, "class-1", CourseCode::Eng5, &ids, now),
        )
        .await;
    flow.wait_for_batch(&id, |b| {
        b.status == bos::contracts::BatchStatus::StudentValidationCompleted
    })
    .await;
    flow.up
        .send(topics::BATCH_ESSAYS_READY, &id, corr, ready.clone())
        .await;
    flow.request(&id, "spellcheck").await;
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    flow.answer(&id, PhaseName::Spellcheck, &spell[0], &[])
        .await;
    flow.observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    // The essay lifecycle service says the essays are ready again.
    let again = flow
        .up
        .send(topics::BATCH_ESSAYS_READY, &id, corr, ready)
        .await;
    flow.wait_processed(again).await;
    let cj = flow.request_cj_reusing_spellcheck(&id).await;
    assert_eq!(
        command_essays(&cj),
        [
            ("essay-0".to_owned(), "store-0-corrected".to_owned()),
            ("essay-1".to_owned(), "store-1-corrected".to_owned())
        ],
        "the corrected text, not the original"
    );
    flow.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn every_denial_notifies_the_owner() {
    let flow = Flow::start().await;
    let (id, corr) = flow.register(None, 2).await;
    flow.provision(&id, corr, 2).await;
    let request = upstream::pipeline_request(&id, "student_matching", "someone-else");
    flow.send_request(&id, request).await;
    let denied = flow.observer.wait_for(topics::PIPELINE_DENIED, 1).await;
    let d = data(&denied[0]);
    assert_eq!(d["denial_reason"], "unsupported_pipeline");
    assert_eq!(d["user_id"], TEACHER, "the batch owner");
    assert_eq!(
        d["resource_breakdown"],
        json!({"cj_comparison": 0, "ai_feedback_generation": 0})
    );
    let note = flow
        .observer
        .wait_for(topics::TEACHER_NOTIFICATION, 1)
        .await;
    assert_eq!(data(&note[0])["teacher_id"], TEACHER);
    assert_eq!(data(&note[0])["notification_type"], "pipeline_denied");
    flow.assert_all_valid();
    flow.finish(vec![]).await.unwrap();
}

// ---------------------------------------------------------------- entitlements

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Allow(i64),
    Insufficient(i64),
    RateLimited,
    Broken,
    Hang,
}

type Call = (Value, Option<String>);

#[derive(Clone)]
struct Fake {
    mode: Arc<Mutex<Mode>>,
    /// Each request's body and `X-Correlation-ID` header.
    calls: Arc<Mutex<Vec<Call>>>,
}

async fn check(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let header = headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    fake.calls.lock().unwrap().push((body.clone(), header));
    let mode = *fake.mode.lock().unwrap();
    let required: i64 = body["requirements"]
        .as_object()
        .map_or(0, |r| r.values().filter_map(Value::as_i64).sum());
    let answer = |status: StatusCode, allowed: bool, available: i64, reason: Value| {
        (
            status,
            Json(json!({
                "allowed": allowed, "required_credits": required, "available_credits": available,
                "per_metric": {}, "denial_reason": reason, "correlation_id": body["correlation_id"],
            })),
        )
    };
    match mode {
        Mode::Allow(a) => answer(StatusCode::OK, true, a, Value::Null),
        Mode::Insufficient(a) => answer(
            StatusCode::PAYMENT_REQUIRED,
            false,
            a,
            json!("insufficient_credits"),
        ),
        Mode::RateLimited => answer(
            StatusCode::TOO_MANY_REQUESTS,
            false,
            0,
            json!("rate_limit_exceeded"),
        ),
        Mode::Broken => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "boom"})),
        ),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            answer(StatusCode::OK, true, 0, Value::Null)
        }
    }
}

async fn entitlements() -> (Fake, String, tokio::task::JoinHandle<()>) {
    let fake = Fake {
        mode: Arc::new(Mutex::new(Mode::Allow(100))),
        calls: Arc::default(),
    };
    let router = axum::Router::new()
        .route("/v1/entitlements/check-credits/bulk", post(check))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://127.0.0.1:{}/",
        listener.local_addr().unwrap().port()
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (fake, url, server)
}

fn with_entitlements(
    url: String,
    on_unavailable: OnUnavailable,
) -> Box<dyn FnOnce(&mut Settings) + Send> {
    Box::new(move |s: &mut Settings| {
        s.credits.policy = CreditPolicyKind::Entitlements;
        s.credits.entitlements.base_url = url;
        s.credits.entitlements.timeout = Duration::from_millis(500);
        s.credits.entitlements.failure_threshold = 2;
        s.credits.entitlements.recovery_timeout = Duration::from_secs(2);
        s.credits.entitlements.on_unavailable = on_unavailable;
    })
}

/// A worker asking the entitlements service (a listener of this test), and a
/// batch of three essays ready for a pipeline.
async fn entitled(
    on_unavailable: OnUnavailable,
) -> (Fake, tokio::task::JoinHandle<()>, Flow, String) {
    let (fake, url, server) = entitlements().await;
    let flow = Flow::with(FlowOptions {
        tune: with_entitlements(url, on_unavailable),
        ..FlowOptions::default()
    })
    .await;
    let (id, corr) = flow.register(None, 3).await;
    flow.provision(&id, corr, 3).await;
    flow.wait_for_batch(&id, |b| {
        b.status == bos::contracts::BatchStatus::ReadyForPipelineExecution
    })
    .await;
    (fake, server, flow, id)
}

async fn preflight(flow: &Flow, id: &str, phase: &str, corr: &str) -> (u16, Value) {
    flow.app
        .call(
            "POST",
            &format!("/internal/v1/batches/{id}/pipelines/{phase}/preflight"),
            &[("X-Correlation-ID", corr)],
            None,
        )
        .await
}

#[tokio::test]
async fn the_entitlements_service_answers_every_credit_question() {
    let (fake, server, flow, id) = entitled(OnUnavailable::Deny).await;
    let c = "6d8f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    // Allowed: what was asked, and the answer.
    let (status, reply) = preflight(&flow, &id, "ai_feedback", c).await;
    assert_eq!(
        (status, reply["available_credits"].as_i64()),
        (200, Some(100)),
        "{reply}"
    );
    let (body, header) = fake.calls.lock().unwrap().last().cloned().unwrap();
    assert_eq!(body["user_id"], TEACHER);
    assert_eq!(body["org_id"], "org-1");
    assert_eq!(
        body["requirements"],
        json!({"ai_feedback_generation": 3}),
        "only quantities above zero"
    );
    assert_eq!(
        (body["correlation_id"].as_str(), header.as_deref()),
        (Some(c), Some(c))
    );
    // Nothing billable: no call at all.
    let calls = fake.calls.lock().unwrap().len();
    assert_eq!(preflight(&flow, &id, "spellcheck", c).await.0, 200);
    assert_eq!(fake.calls.lock().unwrap().len(), calls);
    // 402 and 429 as the service says.
    *fake.mode.lock().unwrap() = Mode::Insufficient(1);
    let (status, reply) = preflight(&flow, &id, "cj_assessment", c).await;
    assert_eq!(
        (
            status,
            reply["denial_reason"].as_str(),
            reply["available_credits"].as_i64()
        ),
        (402, Some("insufficient_credits"), Some(1))
    );
    *fake.mode.lock().unwrap() = Mode::RateLimited;
    let (status, reply) = preflight(&flow, &id, "cj_assessment", c).await;
    assert_eq!(
        (status, reply["denial_reason"].as_str()),
        (429, Some("rate_limit_exceeded"))
    );
    // Over Kafka, a denial for credits is published with the service's figures.
    *fake.mode.lock().unwrap() = Mode::Insufficient(2);
    flow.request(&id, "cj_assessment").await;
    let denied = flow.observer.wait_for(topics::PIPELINE_DENIED, 1).await;
    assert_eq!(data(&denied[0])["denial_reason"], "insufficient_credits");
    assert_eq!(
        (
            data(&denied[0])["required_credits"].as_i64(),
            data(&denied[0])["available_credits"].as_i64()
        ),
        (Some(3), Some(2))
    );
    let note = flow
        .observer
        .wait_for(topics::TEACHER_NOTIFICATION, 1)
        .await;
    assert_eq!(
        data(&note[0])["notification_type"],
        "pipeline_denied_insufficient_credits"
    );
    assert_eq!(data(&note[0])["payload"]["credit_deficit"], 1);
    // Allowed again: the run starts.
    *fake.mode.lock().unwrap() = Mode::Allow(50);
    flow.request(&id, "cj_assessment").await;
    flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    flow.finish(vec![]).await.unwrap();
    server.abort();
}

#[tokio::test]
async fn an_unavailable_service_fails_closed_behind_a_circuit_breaker() {
    let (fake, server, flow, id) = entitled(OnUnavailable::Deny).await;
    let c = "6d8f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    // A hung service: the timeout answers (503, entitlements_unavailable).
    *fake.mode.lock().unwrap() = Mode::Hang;
    let started = Instant::now();
    let (status, reply) = preflight(&flow, &id, "cj_assessment", c).await;
    assert_eq!(
        (status, reply["denial_reason"].as_str()),
        (503, Some("entitlements_unavailable")),
        "{reply}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the timeout, not the hang, decides"
    );
    // A second failure opens the circuit: the third question is answered at once, without a call.
    *fake.mode.lock().unwrap() = Mode::Broken;
    assert_eq!(preflight(&flow, &id, "cj_assessment", c).await.0, 503);
    let calls = fake.calls.lock().unwrap().len();
    *fake.mode.lock().unwrap() = Mode::Allow(10);
    assert_eq!(
        preflight(&flow, &id, "cj_assessment", c).await.0,
        503,
        "open circuit"
    );
    assert_eq!(
        fake.calls.lock().unwrap().len(),
        calls,
        "no call while the circuit is open"
    );
    // Over Kafka the request is denied, not lost, and the teacher is told.
    flow.request(&id, "cj_assessment").await;
    let denied = flow.observer.wait_for(topics::PIPELINE_DENIED, 1).await;
    assert_eq!(
        data(&denied[0])["denial_reason"],
        "entitlements_unavailable"
    );
    // After the recovery timeout one trial call goes out, and it closes the circuit.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(preflight(&flow, &id, "cj_assessment", c).await.0, 200);
    assert_eq!(fake.calls.lock().unwrap().len(), calls + 1);
    // A refused connection counts as unavailable too.
    server.abort();
    let _ = server.await;
    eventually(
        Duration::from_secs(10),
        "a refused connection is unavailable",
        || async { preflight(&flow, &id, "cj_assessment", c).await.0 == 503 },
    )
    .await;
    flow.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn an_unavailable_service_can_fail_open() {
    let (fake, server, flow, id) = entitled(OnUnavailable::Allow).await;
    *fake.mode.lock().unwrap() = Mode::Broken;
    let (status, reply) = preflight(
        &flow,
        &id,
        "cj_assessment",
        "6d8f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
    )
    .await;
    assert_eq!(
        (status, reply["allowed"].as_bool()),
        (200, Some(true)),
        "{reply}"
    );
    flow.request(&id, "cj_assessment").await;
    flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert!(
        flow.app
            .metrics
            .credit_checks
            .with_label_values(&["unavailable"])
            .get()
            >= 2
    );
    flow.finish(vec![]).await.unwrap();
    server.abort();
}
