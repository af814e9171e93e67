//! The HTTP surface, against the in-memory store.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use bos::contracts::{topics, BatchStatus, CourseCode, EssayRef, InboundEvent};
use bos::domain::{Env, EventMeta, FixedBalance, PhaseGraph, RandomIds, Rules};
use bos::store::{Change, InboxRecord, MemoryRepository, Repository};
use bos::upstream;
use common::http::{call, state};
use serde_json::json;
use uuid::Uuid;

fn body() -> serde_json::Value {
    json!({
        "expected_essay_count": 3,
        "essay_ids": ["a", "b", "c"],
        "course_code": "SV2",
        "user_id": "teacher-anna",
        "org_id": "org-1",
        "cj_default_temperature": 0.5
    })
}

/// Applies one event to a stored batch the way the worker does.
async fn apply(repo: &Arc<dyn Repository>, rules: &Rules, batch_id: &str, event: InboundEvent) {
    let batch = repo.get_batch_by_id(batch_id).await.unwrap().unwrap();
    let meta = EventMeta {
        event_id: Uuid::new_v4(),
        correlation_id: Uuid::new_v4(),
        traceparent: None,
    };
    let decision = rules.decide(
        Some(&batch),
        &event,
        &meta,
        &mut Env {
            now: chrono::Utc::now(),
            ids: &mut RandomIds,
        },
    );
    let change = Change {
        batch: decision.batch.unwrap(),
        expected_version: Some(batch.version),
        essays_changed: decision.essays_changed,
        outbox: decision.messages,
        inbox: Some(InboxRecord {
            event_id: meta.event_id,
            topic: event.topic().into(),
        }),
        snapshot: decision.snapshot,
    };
    repo.apply(vec![change]).await.unwrap();
}

#[tokio::test]
async fn register_then_read_status_and_pipeline_state() {
    let repo: Arc<dyn Repository> = Arc::new(MemoryRepository::new());
    let state = state(repo.clone(), Rules::default(), true);
    let corr = "7f9c0a3e-2b1d-4c55-9a3e-0b1d8e27f4c9";
    let (status, reply) = call(
        &state,
        "POST",
        "/v1/batches/register",
        &[("x-correlation-id", corr)],
        Some(body()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["status"], "registered");
    assert_eq!(reply["correlation_id"], corr);
    let id = reply["batch_id"].as_str().unwrap().to_owned();
    let outbox = repo.outbox_rows(Some(&id)).await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].topic, topics::BATCH_ESSAYS_REGISTERED);
    common::assert_valid_published(&outbox[0].topic, &outbox[0].payload);

    let (status, reply) = call(
        &state,
        "GET",
        &format!("/v1/batches/{id}/status"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["batch_id"], id.as_str());
    assert_eq!(reply["batch_context"]["course_code"], "SV2");
    assert_eq!(reply["batch_context"]["expected_essay_count"], 3);
    assert_eq!(reply["batch_context"]["user_id"], "teacher-anna");
    assert_eq!(
        reply["pipeline_state"]["spellcheck"]["status"],
        "skipped_by_user_config"
    );

    let (status, reply) = call(
        &state,
        "GET",
        &format!("/internal/v1/batches/{id}/pipeline-state"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["user_id"], "teacher-anna");
    assert_eq!(reply["pipeline_state"]["requested_pipelines"], json!([]));

    for uri in [
        "/v1/batches/nope/status".to_string(),
        "/internal/v1/batches/nope/pipeline-state".to_string(),
    ] {
        assert_eq!(
            call(&state, "GET", &uri, &[], None).await.0,
            StatusCode::NOT_FOUND
        );
    }
}

#[tokio::test]
async fn bad_registrations_name_their_fields() {
    let state = state(Arc::new(MemoryRepository::new()), Rules::default(), true);
    let mut bad = body();
    bad["expected_essay_count"] = json!(2);
    bad["cj_default_temperature"] = json!(9);
    let (status, reply) = call(&state, "POST", "/v1/batches/register", &[], Some(bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let fields: Vec<&str> = reply["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["essay_ids", "cj_default_temperature"]);
    let mut wrong = body();
    wrong["course_code"] = json!("ENG9");
    let (status, reply) = call(&state, "POST", "/v1/batches/register", &[], Some(wrong)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reply["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("ENG9"));
}

#[tokio::test]
async fn preflight_answers_without_changing_anything() {
    let repo: Arc<dyn Repository> = Arc::new(MemoryRepository::new());
    let rules = Rules::new(PhaseGraph::default(), Arc::new(FixedBalance(4)));
    let state = state(repo.clone(), rules.clone(), true);
    let (_, reply) = call(&state, "POST", "/v1/batches/register", &[], Some(body())).await;
    let id = reply["batch_id"].as_str().unwrap().to_owned();
    let essays: Vec<EssayRef> = (0..3)
        .map(|i| EssayRef::new(format!("e{i}"), format!("s{i}")))
        .collect();
    apply(
        &repo,
        &rules,
        &id,
        InboundEvent::ContentProvisioned(upstream::content_provisioned(
            &id,
            CourseCode::Sv2,
            "t",
            &essays,
        )),
    )
    .await;
    let before = repo.get_batch_by_id(&id).await.unwrap().unwrap();

    let (status, reply) = call(
        &state,
        "POST",
        &format!("/internal/v1/batches/{id}/pipelines/cj_assessment/preflight"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["allowed"], true);
    assert_eq!(
        reply["resolved_pipeline"],
        json!(["spellcheck", "cj_assessment"])
    );
    assert_eq!(reply["required_credits"], 3);
    assert_eq!(reply["resource_breakdown"]["cj_comparison"], 3);

    let (status, reply) = call(
        &state,
        "POST",
        &format!("/internal/v1/batches/{id}/pipelines/ai_feedback/preflight"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "3 ≤ 4 credits: {reply}");
    let bigger = Rules::new(PhaseGraph::default(), Arc::new(FixedBalance(2)));
    let poorer = common::http::state(repo.clone(), bigger, true);
    let (status, reply) = call(
        &poorer,
        "POST",
        &format!("/internal/v1/batches/{id}/pipelines/cj_assessment/preflight"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        (
            reply["allowed"].as_bool(),
            reply["available_credits"].as_i64()
        ),
        (Some(false), Some(2))
    );

    assert_eq!(
        call(
            &state,
            "POST",
            &format!("/internal/v1/batches/{id}/pipelines/student_matching/preflight"),
            &[],
            None
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        call(
            &state,
            "POST",
            "/internal/v1/batches/nope/pipelines/nlp/preflight",
            &[],
            None
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        repo.get_batch_by_id(&id).await.unwrap().unwrap(),
        before,
        "preflight changes nothing"
    );
}

#[tokio::test]
async fn prompt_amendment_checks_owner_and_state() {
    let repo: Arc<dyn Repository> = Arc::new(MemoryRepository::new());
    let rules = Rules::default();
    let state = state(repo.clone(), rules.clone(), true);
    let (_, reply) = call(&state, "POST", "/v1/batches/register", &[], Some(body())).await;
    let id = reply["batch_id"].as_str().unwrap().to_owned();
    let uri = format!("/v1/batches/{id}/prompt");
    let prompt = json!({"student_prompt_ref": {"references": {"student_prompt_text": {"storage_id": "prompt-9", "path": ""}}}});
    assert_eq!(
        call(&state, "PATCH", &uri, &[], Some(prompt.clone()))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(
            &state,
            "PATCH",
            &uri,
            &[("x-user-id", "someone")],
            Some(prompt.clone())
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    let (status, _) = call(
        &state,
        "PATCH",
        &uri,
        &[("x-user-id", "teacher-anna")],
        Some(prompt.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let context = repo.get_batch_context(&id).await.unwrap().unwrap();
    assert_eq!(
        context
            .student_prompt_ref
            .unwrap()
            .references
            .values()
            .next()
            .unwrap()
            .storage_id,
        "prompt-9"
    );
    assert_eq!(
        call(
            &state,
            "PATCH",
            &uri,
            &[("x-user-id", "teacher-anna")],
            Some(json!({"nope": 1}))
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );

    let essays = vec![EssayRef::new("e0", "s0")];
    apply(
        &repo,
        &rules,
        &id,
        InboundEvent::ContentProvisioned(upstream::content_provisioned(
            &id,
            CourseCode::Sv2,
            "t",
            &essays,
        )),
    )
    .await;
    apply(
        &repo,
        &rules,
        &id,
        InboundEvent::PipelineRequest(upstream::pipeline_request(&id, "nlp", "t")),
    )
    .await;
    assert_eq!(
        repo.get_batch_by_id(&id).await.unwrap().unwrap().status,
        BatchStatus::ProcessingPipelines
    );
    assert_eq!(
        call(
            &state,
            "PATCH",
            &uri,
            &[("x-user-id", "teacher-anna")],
            Some(prompt)
        )
        .await
        .0,
        StatusCode::CONFLICT
    );
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let up = state(Arc::new(MemoryRepository::new()), Rules::default(), true);
    assert_eq!(
        call(&up, "GET", "/healthz", &[], None).await.0,
        StatusCode::OK
    );
    let (status, reply) = call(&up, "GET", "/readyz", &[], None).await;
    assert_eq!(
        (status, reply["kafka"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let down = state(Arc::new(MemoryRepository::new()), Rules::default(), false);
    let (status, reply) = call(&down, "GET", "/readyz", &[], None).await;
    assert_eq!(
        (status, reply["kafka"].as_bool()),
        (StatusCode::SERVICE_UNAVAILABLE, Some(false))
    );
    up.metrics
        .messages
        .with_label_values(&[topics::PHASE_OUTCOME, "applied"])
        .inc();
    let (status, text) = call(&up, "GET", "/metrics", &[], None).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap();
    assert!(text.contains("bos_messages_total{outcome=\"applied\",topic=\"huleedu.els.batch.phase.outcome.v1\"} 1"), "{text}");
    for name in [
        "bos_cas_conflicts_total",
        "bos_dead_letters_total",
        "bos_outbox_backlog",
        "bos_consumer_lag",
        "bos_handler_seconds",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
}

#[tokio::test]
async fn readiness_fails_while_the_database_is_down() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let repo = bos::store::PgRepository::from_pool(pool.clone());
    repo.migrate().await.unwrap();
    let state = state(Arc::new(repo), Rules::default(), true);
    assert_eq!(
        call(&state, "GET", "/readyz", &[], None).await.0,
        StatusCode::OK
    );
    pool.close().await;
    let (status, reply) = call(&state, "GET", "/readyz", &[], None).await;
    assert_eq!(
        (status, reply["database"].as_bool()),
        (StatusCode::SERVICE_UNAVAILABLE, Some(false))
    );
}
