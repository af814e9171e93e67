//! The HTTP surface of the running application (in-memory store, mock Kafka):
//! the original service's routes, bodies and status codes, and bodies that
//! never make it answer 5xx.

use std::sync::Arc;
use std::time::Duration;

use bos::app::{Application, Role};
use bos::config::Settings;
use bos::contracts::{topics, BatchStatus, CourseCode, InboundEvent};
use bos::credits::{CreditPolicy, FixedBalance};
use bos::domain::{CreditQuery, CreditVerdict};
use bos::sim::upstream;
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::support::app::{settings, TestApp};
use crate::support::kafka::{kafka_settings, Cluster, Observer, Upstream};
use crate::support::{eventually, TEACHER};

fn body() -> Value {
    json!({
        "expected_essay_count": 3,
        "essay_ids": ["a", "b", "c"],
        "course_code": "SV2",
        "user_id": TEACHER,
        "org_id": "org-1",
        "cj_default_temperature": 0.5,
        "student_prompt_ref": {"references": {"student_prompt_text": {"storage_id": "prompt-1", "path": ""}}}
    })
}

/// A policy that answers every question with a rate limit.
#[derive(Debug)]
struct RateLimited;

#[async_trait::async_trait]
impl CreditPolicy for RateLimited {
    async fn check(&self, _: &CreditQuery, _: uuid::Uuid) -> CreditVerdict {
        CreditVerdict::Denied {
            reason: "rate_limit_exceeded".into(),
            available: 0,
        }
    }
}

struct Api {
    cluster: Cluster,
    app: TestApp,
    settings: Settings,
}

impl Api {
    async fn start(credits: Option<Arc<dyn CreditPolicy>>, database: Option<&str>) -> Self {
        let cluster = Cluster::start().await;
        let kafka = kafka_settings(&cluster);
        cluster.create_topics(&kafka.topic_prefix, 1).await;
        let s = settings(&kafka, database);
        let mut builder = Application::builder(s.clone());
        if let Some(c) = credits {
            builder = builder.credit_policy(c);
        }
        let app = TestApp::spawn_with(builder, Role::Worker).await;
        Self {
            cluster,
            app,
            settings: s,
        }
    }

    async fn register(&self, body: Value) -> String {
        let (status, reply) = self
            .app
            .call("POST", "/v1/batches/register", &[], Some(body))
            .await;
        assert_eq!(status, 202, "{reply}");
        reply["batch_id"].as_str().unwrap().to_owned()
    }

    /// Provisions `n` essays through Kafka and waits until the batch is ready.
    async fn provision(&self, id: &str, n: usize) {
        let up = Upstream::new(&self.settings.kafka);
        up.send(
            topics::CONTENT_PROVISIONING_COMPLETED,
            id,
            uuid::Uuid::new_v4(),
            upstream::content_provisioned(id, CourseCode::Sv2, "t", &crate::support::essays(n)),
        )
        .await;
        let repo = self.app.repo.clone();
        let id = id.to_owned();
        eventually(Duration::from_secs(30), "the batch is ready", || {
            let (repo, id) = (repo.clone(), id.clone());
            async move {
                repo.get_batch(&id)
                    .await
                    .unwrap()
                    .is_some_and(|b| b.status == BatchStatus::ReadyForPipelineExecution)
            }
        })
        .await;
    }

    async fn finish(self) {
        self.app.stop().await.unwrap();
        drop(self.cluster);
    }
}

#[tokio::test]
async fn register_then_read_status_and_pipeline_state() {
    let api = Api::start(None, None).await;
    let corr = "7f9c0a3e-2b1d-4c55-9a3e-0b1d8e27f4c9";
    let (status, reply) = api
        .app
        .call(
            "POST",
            "/v1/batches/register",
            &[("x-correlation-id", corr)],
            Some(body()),
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["status"], "registered");
    assert_eq!(reply["correlation_id"], corr);
    let id = reply["batch_id"].as_str().unwrap().to_owned();
    let outbox = api.app.repo.outbox_rows(Some(&id)).await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].topic, topics::BATCH_ESSAYS_REGISTERED);
    crate::support::assert_valid_published(
        &outbox[0].topic,
        &serde_json::from_str(&outbox[0].payload).unwrap(),
    );
    let (status, reply) = api.app.get(&format!("/v1/batches/{id}/status")).await;
    assert_eq!(status, 200);
    assert_eq!(reply["batch_id"], id.as_str());
    assert_eq!(reply["batch_context"]["course_code"], "SV2");
    assert_eq!(reply["batch_context"]["expected_essay_count"], 3);
    assert_eq!(reply["batch_context"]["user_id"], TEACHER);
    assert_eq!(
        reply["pipeline_state"]["spellcheck"]["status"],
        "skipped_by_user_config"
    );
    let (status, reply) = api
        .app
        .get(&format!("/internal/v1/batches/{id}/pipeline-state"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(reply["user_id"], TEACHER);
    assert_eq!(reply["pipeline_state"]["requested_pipelines"], json!([]));
    let (status, reply) = api.app.get("/v1/batches/nope/status").await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (404, Some("Batch not found"))
    );
    let (status, reply) = api
        .app
        .get("/internal/v1/batches/nope/pipeline-state")
        .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (404, Some("Pipeline state not found for batch"))
    );
    api.finish().await;
}

#[tokio::test]
async fn bad_registrations_name_their_fields() {
    let api = Api::start(None, None).await;
    let mut bad = body();
    bad["expected_essay_count"] = json!(2);
    bad["cj_default_temperature"] = json!(9);
    let (status, reply) = api
        .app
        .call("POST", "/v1/batches/register", &[], Some(bad))
        .await;
    assert_eq!(status, 400);
    assert_eq!(reply["error"], "Validation Error");
    let fields: Vec<&str> = reply["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["loc"][0].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["essay_ids", "cj_default_temperature"]);
    let mut wrong = body();
    wrong["course_code"] = json!("ENG9");
    let (status, reply) = api
        .app
        .call("POST", "/v1/batches/register", &[], Some(wrong))
        .await;
    assert_eq!(status, 400);
    assert!(reply["details"][0]["msg"]
        .as_str()
        .unwrap()
        .contains("ENG9"));
    for empty in [json!({}), Value::Null] {
        let (status, reply) = api
            .app
            .call("POST", "/v1/batches/register", &[], Some(empty))
            .await;
        assert_eq!(
            (status, reply["error"].as_str()),
            (400, Some("Request body must be valid JSON"))
        );
    }
    api.finish().await;
}

#[tokio::test]
async fn preflight_answers_like_the_platform_without_changing_anything() {
    let api = Api::start(Some(Arc::new(FixedBalance(4))), None).await;
    let id = api.register(body()).await;
    api.provision(&id, 3).await;
    let before = api.app.repo.get_batch(&id).await.unwrap().unwrap();
    let corr = "0f3b5c9e-8d41-4a6b-9e2a-5a4c3d2b1a00";
    let preflight = |phase: &str| format!("/internal/v1/batches/{id}/pipelines/{phase}/preflight");
    let (status, reply) = api
        .app
        .call(
            "POST",
            &preflight("cj_assessment"),
            &[("X-Correlation-ID", corr)],
            None,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["allowed"], true);
    assert_eq!(
        reply["resolved_pipeline"],
        json!(["spellcheck", "cj_assessment"])
    );
    assert_eq!(reply["required_credits"], 3);
    assert_eq!(
        reply["resource_breakdown"],
        json!({"cj_comparison": 3, "ai_feedback_generation": 0})
    );
    assert_eq!(reply["correlation_id"], corr, "X-Correlation-ID is used");
    let (status, reply) = api
        .app
        .call("POST", &preflight("ai_feedback"), &[], None)
        .await;
    assert_eq!(status, 200, "3 ≤ 4 credits: {reply}");
    assert_eq!(
        reply["resolved_pipeline"],
        json!(["spellcheck", "nlp", "ai_feedback"])
    );
    // Unknown batch first, whatever the phase.
    let (status, reply) = api
        .app
        .call(
            "POST",
            "/internal/v1/batches/nope/pipelines/grading/preflight",
            &[],
            None,
        )
        .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (404, Some("Batch not found"))
    );
    let (status, reply) = api
        .app
        .call("POST", &preflight("student_matching"), &[], None)
        .await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(
        api.app.repo.get_batch(&id).await.unwrap().unwrap(),
        before,
        "preflight changes nothing"
    );
    api.finish().await;

    // Short of credits: 402 with the reason; rate-limited: 429 with the reason.
    let api = Api::start(Some(Arc::new(FixedBalance(2))), None).await;
    let id = api.register(body()).await;
    api.provision(&id, 3).await;
    let (status, reply) = api
        .app
        .call(
            "POST",
            &format!("/internal/v1/batches/{id}/pipelines/cj_assessment/preflight"),
            &[],
            None,
        )
        .await;
    assert_eq!(status, 402);
    assert_eq!(
        (
            reply["allowed"].as_bool(),
            reply["available_credits"].as_i64(),
            reply["denial_reason"].as_str()
        ),
        (Some(false), Some(2), Some("insufficient_credits"))
    );
    api.finish().await;
    let api = Api::start(Some(Arc::new(RateLimited)), None).await;
    let id = api.register(body()).await;
    api.provision(&id, 3).await;
    let (status, reply) = api
        .app
        .call(
            "POST",
            &format!("/internal/v1/batches/{id}/pipelines/ai_feedback/preflight"),
            &[],
            None,
        )
        .await;
    assert_eq!(
        (status, reply["denial_reason"].as_str()),
        (429, Some("rate_limit_exceeded"))
    );
    // Nothing billable: no question asked, allowed.
    let (status, reply) = api
        .app
        .call(
            "POST",
            &format!("/internal/v1/batches/{id}/pipelines/spellcheck/preflight"),
            &[],
            None,
        )
        .await;
    assert_eq!((status, reply["allowed"].as_bool()), (200, Some(true)));
    // No prompt: 400 with the reason (the original answered 500).
    let mut no_prompt = body();
    no_prompt
        .as_object_mut()
        .unwrap()
        .remove("student_prompt_ref");
    let bare = api.register(no_prompt).await;
    let (status, reply) = api
        .app
        .call(
            "POST",
            &format!("/internal/v1/batches/{bare}/pipelines/nlp/preflight"),
            &[],
            None,
        )
        .await;
    assert_eq!(
        (status, reply["denial_reason"].as_str()),
        (400, Some("prompt_not_attached"))
    );
    assert_eq!(reply["allowed"], false);
    api.finish().await;
}

#[tokio::test]
async fn prompt_amendment_answers_as_the_original() {
    let api = Api::start(None, None).await;
    let mut no_prompt = body();
    no_prompt
        .as_object_mut()
        .unwrap()
        .remove("student_prompt_ref");
    let id = api.register(no_prompt).await;
    let uri = format!("/v1/batches/{id}/prompt");
    let prompt = json!({"student_prompt_ref": {"references": {"student_prompt_text": {"storage_id": "prompt-9", "path": ""}}}});
    let owner = [("x-user-id", TEACHER)];
    let (status, reply) = api.app.call("PATCH", &uri, &[], Some(prompt.clone())).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (401, Some("User authentication required"))
    );
    let (status, reply) = api
        .app
        .call(
            "PATCH",
            &uri,
            &[("x-user-id", "someone")],
            Some(prompt.clone()),
        )
        .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (403, Some("Batch not owned by user"))
    );
    let (status, reply) = api
        .app
        .call(
            "PATCH",
            "/v1/batches/nope/prompt",
            &owner,
            Some(prompt.clone()),
        )
        .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (404, Some("Batch not found"))
    );
    for bad in [
        json!({"student_prompt_ref": {"references": {"original_essay": {"storage_id": "x", "path": ""}}}}),
        json!({"student_prompt_ref": {"references": {"student_prompt_text": {"storage_id": " ", "path": ""}}}}),
        json!({"student_prompt_ref": null}),
    ] {
        let (status, reply) = api.app.call("PATCH", &uri, &owner, Some(bad.clone())).await;
        assert_eq!(
            (status, reply["error"].as_str()),
            (400, Some("Invalid student_prompt_ref")),
            "{bad}"
        );
    }
    let (status, reply) = api.app.call("PATCH", &uri, &owner, Some(json!({}))).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("Request body must be valid JSON"))
    );
    let (status, reply) = api
        .app
        .call("PATCH", &uri, &owner, Some(prompt.clone()))
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["status"], "success");
    assert_eq!(reply["batch_id"], id.as_str());
    assert_eq!(reply["student_prompt_ref"], prompt["student_prompt_ref"]);
    let stored = api.app.repo.get_batch(&id).await.unwrap().unwrap();
    assert_eq!(
        stored
            .context
            .student_prompt_ref
            .unwrap()
            .references
            .values()
            .next()
            .unwrap()
            .storage_id,
        "prompt-9"
    );
    // Once a run is going: 409.
    api.provision(&id, 1).await;
    let up = Upstream::new(&api.settings.kafka);
    up.send(
        topics::CLIENT_PIPELINE_REQUEST,
        &id,
        uuid::Uuid::new_v4(),
        upstream::pipeline_request(&id, "nlp", TEACHER),
    )
    .await;
    let repo = api.app.repo.clone();
    let wait_id = id.clone();
    eventually(Duration::from_secs(30), "the run started", || {
        let (repo, id) = (repo.clone(), wait_id.clone());
        async move {
            repo.get_batch(&id).await.unwrap().unwrap().status == BatchStatus::ProcessingPipelines
        }
    })
    .await;
    let (status, reply) = api.app.call("PATCH", &uri, &owner, Some(prompt)).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (409, Some("Batch not editable for prompt amendment"))
    );
    drop(up);
    api.finish().await;
}

#[tokio::test]
async fn retry_goes_through_the_rules_and_the_same_transaction_path() {
    let api = Api::start(Some(Arc::new(FixedBalance(1))), None).await;
    let observer = Observer::published(&api.settings.kafka);
    let id = api.register(body()).await;
    api.provision(&id, 3).await;
    let uri = format!("/v1/batches/{id}/retry-phase");
    let call = |body: Value, headers: Vec<(&'static str, &'static str)>| {
        let (app, uri) = (&api.app, uri.clone());
        async move { app.call("POST", &uri, &headers, Some(body)).await }
    };
    let (status, reply) = call(json!({"phase_name": "spellcheck"}), vec![]).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("phase_name and user_id are required"))
    );
    let (status, reply) = api
        .app
        .call(
            "POST",
            "/v1/batches/nope/retry-phase",
            &[],
            Some(json!({"phase_name": "spellcheck", "user_id": TEACHER})),
        )
        .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (404, Some("Batch not found"))
    );
    let (status, reply) = call(json!({"phase_name": "grading", "user_id": TEACHER}), vec![]).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("Invalid phase name: grading"))
    );
    let (status, reply) = call(
        json!({"phase_name": "cj_assessment", "user_id": TEACHER, "essay_ids": ["e"]}),
        vec![],
    )
    .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (
            400,
            Some("CJ Assessment requires full batch retry for ranking consistency")
        )
    );
    let (status, reply) = call(
        json!({"phase_name": "spellcheck", "user_id": "someone"}),
        vec![],
    )
    .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (403, Some("Batch not owned by user"))
    );
    // Refused by credits: 402, the batch untouched, the teacher told.
    let before = api.app.repo.get_batch(&id).await.unwrap().unwrap();
    let (status, reply) = call(
        json!({"phase_name": "CJ_ASSESSMENT", "user_id": TEACHER}),
        vec![],
    )
    .await;
    assert_eq!(
        (status, reply["denial_reason"].as_str()),
        (402, Some("insufficient_credits")),
        "{reply}"
    );
    assert_eq!(api.app.repo.get_batch(&id).await.unwrap().unwrap(), before);
    observer.wait_for(topics::PIPELINE_DENIED, 1).await;
    // Accepted: the command goes out; a repeat (same X-Correlation-ID, or
    // while it runs) does not dispatch again.
    let corr = [("X-Correlation-ID", "5b0f3c1e-6a2d-4e8f-9b7c-1d2e3f4a5b6c")];
    let (status, reply) = call(
        json!({"phase_name": "spellcheck", "user_id": TEACHER, "retry_reason": "typo fixed"}),
        corr.to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["status"], "retry_initiated");
    assert_eq!(reply["phase"], "spellcheck");
    assert_eq!(reply["message"], "Retry initiated for spellcheck phase");
    let (status, _) = call(
        json!({"phase_name": "spellcheck", "user_id": TEACHER}),
        corr.to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        json!({"phase_name": "spellcheck", "user_id": TEACHER}),
        vec![],
    )
    .await;
    assert_eq!(status, 200);
    let commands = observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(
        commands[0].value["correlation_id"],
        "5b0f3c1e-6a2d-4e8f-9b7c-1d2e3f4a5b6c"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        observer.on(topics::SPELLCHECK_COMMAND).len(),
        1,
        "dispatched once"
    );
    let snapshots = api.app.repo.configuration_snapshots(&id).await.unwrap();
    assert_eq!(snapshots[0]["is_retry"], true);
    assert_eq!(snapshots[0]["retry_reason"], "typo fixed");
    observer.stop().await;
    api.finish().await;
}

#[tokio::test]
async fn health_as_the_original_and_readiness_as_operators_need() {
    let database = crate::support::pg::Database::fresh().await;
    let api = Api::start(None, Some(&database.url)).await;
    let (status, reply) = api.app.get("/healthz").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["service"], "batch-service");
    assert_eq!(reply["status"], "healthy");
    assert_eq!(reply["message"], "Batch Orchestrator Service is healthy");
    assert_eq!(
        reply["checks"],
        json!({"service_responsive": true, "dependencies_available": true})
    );
    assert_eq!(reply["dependencies"]["database"]["status"], "healthy");
    assert_eq!(reply["environment"], "development");
    let (status, summary) = api.app.get("/healthz/database/summary").await;
    assert_eq!(status, 200);
    assert_eq!(summary["service"], "batch_orchestrator_service");
    assert_eq!(summary["connectivity"], true);
    assert!(summary["pool_utilization_percent"].is_number() && summary["timestamp"].is_number());
    let (status, detail) = api.app.get("/healthz/database").await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["overall_status"], "healthy");
    for check in [
        "connectivity",
        "connection_pool",
        "query_performance",
        "database_resources",
    ] {
        assert!(detail["checks"][check]["status"].is_string(), "{check}");
    }
    eventually(Duration::from_secs(15), "ready", || async {
        api.app.get("/readyz").await.0 == 200
    })
    .await;
    let (_, ready) = api.app.get("/readyz").await;
    for check in [
        "database", "kafka", "producer", "topics", "consumer", "relay",
    ] {
        assert_eq!(ready["checks"][check], true, "{check}");
    }
    // The database goes away: 503 everywhere that depends on it.
    let name = database.url.rsplit('/').next().unwrap().to_owned();
    let admin = sqlx::PgPool::connect(&crate::support::pg::server_url().await)
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
    ))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&admin)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "health and readiness 503",
        || async {
            let (h, _) = api.app.get("/healthz").await;
            let (r, body) = api.app.get("/readyz").await;
            h == 503 && r == 503 && body["checks"]["database"] == false
        },
    )
    .await;
    let (_, reply) = api.app.get("/healthz").await;
    assert_eq!(reply["status"], "unhealthy");
    assert!(reply["dependencies"]["database"]["error"].is_string());
    sqlx::query(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .execute(&admin)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "healthy again", || async {
        api.app.get("/healthz").await.0 == 200
    })
    .await;
    admin.close().await;
    api.finish().await;
}

#[tokio::test]
async fn metrics_serve_bos_and_the_original_names() {
    let database = crate::support::pg::Database::fresh().await;
    let api = Api::start(None, Some(&database.url)).await;
    let observer = Observer::published(&api.settings.kafka);
    let id = api.register(body()).await;
    api.provision(&id, 2).await;
    let _ = api.app.get(&format!("/v1/batches/{id}/status")).await;
    // A run, so the pipeline and phase figures have something to count.
    let up = Upstream::new(&api.settings.kafka);
    up.send(
        topics::CLIENT_PIPELINE_REQUEST,
        &id,
        uuid::Uuid::new_v4(),
        upstream::pipeline_request(&id, "spellcheck", TEACHER),
    )
    .await;
    let command = observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    let corr: uuid::Uuid = command[0].value["correlation_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    up.send(
        topics::PHASE_OUTCOME,
        &id,
        corr,
        upstream::phase_outcome(
            &id,
            bos::contracts::PhaseName::Spellcheck,
            &crate::support::essays(2),
            &[],
            corr,
        ),
    )
    .await;
    observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    let (status, text) = api.app.get("/metrics").await;
    assert_eq!(status, 200);
    let text = text.as_str().unwrap();
    assert!(
        text.contains("batch_orchestrator_service_http_requests_total{endpoint=\"/v1/batches/{id}/status\",method=\"GET\",status_code=\"200\"} 1"),
        "{text}"
    );
    assert!(text.contains(&format!(
        "bos_messages_total{{outcome=\"applied\",topic=\"{}\"}} 1",
        topics::CONTENT_PROVISIONING_COMPLETED
    )));
    for name in [
        "batch_orchestrator_service_http_request_duration_seconds",
        "huleedu_pipeline_execution_total",
        "huleedu_phase_transition_duration_seconds",
        "huleedu_orchestration_commands_total",
        "batch_orchestrator_service_database_connections_active",
        "batch_orchestrator_service_database_query_duration_seconds",
        "bos_cas_conflicts_total",
        "bos_dead_letters_total",
        "bos_outbox_backlog",
        "bos_consumer_lag",
        "bos_handler_seconds",
        "bos_partition_stuck_seconds",
        "bos_apply_retries_total",
        "bos_stage_seconds",
    ] {
        assert!(
            api.app.metrics.names().iter().any(|n| n == name) || text.contains(name),
            "{name} missing"
        );
    }
    assert!(
        text.contains(
            "huleedu_pipeline_execution_total{outcome=\"started\",pipeline_type=\"spellcheck\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("huleedu_pipeline_execution_total{outcome=\"completed_successfully\",pipeline_type=\"spellcheck\"} 1"), "{text}");
    assert!(text.contains("huleedu_orchestration_commands_total{command_type=\"batch.spellcheck.initiate.command\",target_service=\"spellchecker_service\"} 1"), "{text}");
    drop(up);
    observer.stop().await;
    api.finish().await;
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("expected_essay_count".to_owned()),
                    Just("essay_ids".to_owned()),
                    Just("course_code".to_owned()),
                    Just("user_id".to_owned()),
                    Just("student_prompt_ref".to_owned()),
                    Just("phase_name".to_owned()),
                    Just("essay_ids".to_owned()),
                    ".{0,6}".prop_map(String::from),
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every body route, fed arbitrary JSON and bytes: a clear 4xx (or success),
/// never a 5xx, and the server keeps answering.
#[test]
fn http_bodies_never_make_the_server_fail() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let api = runtime.block_on(Api::start(None, None));
    let id = runtime.block_on(api.register(body()));
    let routes = [
        ("POST", "/v1/batches/register".to_owned()),
        ("PATCH", format!("/v1/batches/{id}/prompt")),
        ("POST", format!("/v1/batches/{id}/retry-phase")),
        (
            "POST",
            format!("/internal/v1/batches/{id}/pipelines/nlp/preflight"),
        ),
    ];
    let client = reqwest::Client::new();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(96));
    runner
        .run(
            &(
                0..routes.len(),
                prop_oneof![
                    any_json().prop_map(|v| v.to_string().into_bytes()),
                    prop::collection::vec(any::<u8>(), 0..64),
                ],
            ),
            |(route, bytes)| {
                let (method, path) = &routes[route];
                let status = runtime.block_on(async {
                    client
                        .request(
                            method.parse().unwrap(),
                            format!("{}{path}", api.app.address),
                        )
                        .header("content-type", "application/json")
                        .header("x-user-id", TEACHER)
                        .body(bytes.clone())
                        .send()
                        .await
                        .map_or(0, |r| r.status().as_u16())
                });
                prop_assert!(
                    (200..500).contains(&status),
                    "{method} {path} answered {status} to {:?}",
                    String::from_utf8_lossy(&bytes)
                );
                Ok(())
            },
        )
        .unwrap();
    let (status, _) = runtime.block_on(api.app.get("/healthz"));
    assert_eq!(status, 200);
    runtime.block_on(api.finish());
    let _ = InboundEvent::PipelineRequest;
}
