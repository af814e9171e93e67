//! The small HTTP surface: registration, status, prompt amendment, retry,
//! preflight, health, readiness and metrics. The worker itself is driven by
//! Kafka; the one write that decides (retry) goes through the same rules and
//! transaction path as a consumed event.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::apply::{Applier, Prepared, Verdict};
use crate::contracts::{
    BatchStatus, ClientPipelineRequest, InboundEvent, PhaseName, StorageReferenceMetadata,
};
use crate::credits::CreditPolicy;
use crate::domain::{
    denial, valid_prompt_reference, CreditAnswers, CreditVerdict, Env, EventMeta, RandomIds,
    RegistrationRequest, Rules,
};
use crate::health::{Check, Health};
use crate::kafka::ProducerHandle;
use crate::metrics::Metrics;
use crate::store::{BatchWrite, Repository, StoreError, UnitOfWork};

/// Whether Kafka answers (a trait so HTTP tests need no broker).
#[async_trait::async_trait]
pub trait KafkaProbe: Send + Sync {
    async fn reachable(&self) -> bool;
    fn producer_healthy(&self) -> bool {
        true
    }
}

#[async_trait::async_trait]
impl KafkaProbe for ProducerHandle {
    async fn reachable(&self) -> bool {
        ProducerHandle::reachable(self).await
    }
    fn producer_healthy(&self) -> bool {
        self.is_healthy()
    }
}

/// A probe that always answers (no Kafka in this process's role).
pub struct NoKafka;

#[async_trait::async_trait]
impl KafkaProbe for NoKafka {
    async fn reachable(&self) -> bool {
        true
    }
}

#[derive(Clone)]
pub struct AppState {
    pub repo: Arc<dyn Repository>,
    pub rules: Rules,
    pub credits: Arc<dyn CreditPolicy>,
    pub applier: Applier,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub kafka: Arc<dyn KafkaProbe>,
    pub service_name: String,
    pub environment: String,
}

/// Every route (`bos run`).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/batches/register", post(register))
        .route("/v1/batches/{id}/status", get(status))
        .route("/v1/batches/{id}/prompt", patch(amend_prompt))
        .route("/v1/batches/{id}/retry-phase", post(retry_phase))
        .route(
            "/internal/v1/batches/{id}/pipeline-state",
            get(pipeline_state),
        )
        .route(
            "/internal/v1/batches/{id}/pipelines/{phase}/preflight",
            post(preflight),
        )
        .merge(operations())
        .layer(axum::middleware::from_fn_with_state(state.clone(), measure))
        .with_state(state)
}

/// Health, readiness and metrics only (`bos relay`).
pub fn operations_router(state: AppState) -> Router {
    operations()
        .layer(axum::middleware::from_fn_with_state(state.clone(), measure))
        .with_state(state)
}

fn operations() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/healthz/database", get(database_health))
        .route("/healthz/database/summary", get(database_summary))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn measure(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .http_requests
        .with_label_values(&[&method, &endpoint, response.status().as_str()])
        .inc();
    state
        .metrics
        .http_seconds
        .with_label_values(&[&method, &endpoint])
        .observe(started.elapsed().as_secs_f64());
    response
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

fn unavailable(e: &StoreError) -> Response {
    tracing::error!(error = %e, "store error");
    error(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
}

fn correlation(headers: &HeaderMap) -> Option<Uuid> {
    headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<Uuid>().ok())
}

fn validation_error(errors: Vec<crate::domain::FieldError>) -> Response {
    let details: Vec<Value> = errors
        .into_iter()
        .map(|e| json!({"loc": [e.field], "msg": e.message, "type": "value_error", "field": e.field, "message": e.message}))
        .collect();
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "Validation Error", "details": details})),
    )
        .into_response()
}

/// `Request body must be valid JSON` for an empty body or `{}`, else the parse error.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    let invalid = || {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "Request body must be valid JSON",
        ))
    };
    let value: Value = serde_json::from_slice(body).map_err(|_| invalid())?;
    if value.as_object().is_none_or(serde_json::Map::is_empty) {
        return Err(invalid());
    }
    serde_json::from_value(value).map_err(|e| {
        Box::new(validation_error(vec![crate::domain::FieldError {
            field: "body",
            message: e.to_string(),
        }]))
    })
}

async fn register(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let request: RegistrationRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    let correlation_id = correlation(&headers).unwrap_or_else(Uuid::new_v4);
    let effects = {
        let answers = CreditAnswers::new();
        let mut env = Env {
            now: chrono::Utc::now(),
            ids: &mut RandomIds,
            credits: &answers,
        };
        state.rules.register(&request, correlation_id, &mut env)
    };
    let effects = match effects {
        Ok(e) => e,
        Err(errors) => return validation_error(errors),
    };
    let batch_id = effects.batch.id.clone();
    match state
        .repo
        .commit(UnitOfWork::create(effects.batch, effects.messages))
        .await
    {
        Ok(c) if c.conflicts.is_empty() => (
            StatusCode::ACCEPTED,
            Json(json!({"batch_id": batch_id, "correlation_id": correlation_id, "status": "registered"})),
        )
            .into_response(),
        Ok(_) => error(StatusCode::CONFLICT, "batch id already taken; try again"),
        Err(crate::store::CommitError::Store(e)) => unavailable(&e),
        Err(e) => error(StatusCode::CONFLICT, &e.to_string()),
    }
}

async fn status(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.repo.get_batch(&id).await {
        Ok(Some(batch)) => {
            let mut context = serde_json::to_value(&batch.context).unwrap_or(Value::Null);
            if let Value::Object(map) = &mut context {
                map.insert("status".into(), json!(batch.status));
                map.insert("essay_count".into(), json!(batch.essays.len()));
                map.insert(
                    "parked_request".into(),
                    json!(batch.parked.as_ref().map(|p| &p.request)),
                );
            }
            Json(json!({"batch_id": batch.id, "batch_context": context, "pipeline_state": batch.pipeline}))
                .into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "Batch not found"),
        Err(e) => unavailable(&e),
    }
}

async fn pipeline_state(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.repo.get_batch(&id).await {
        Ok(Some(batch)) => Json(json!({
            "batch_id": batch.id,
            "pipeline_state": batch.pipeline,
            "user_id": batch.context.user_id,
        }))
        .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "Pipeline state not found for batch"),
        Err(e) => unavailable(&e),
    }
}

async fn preflight(
    State(state): State<AppState>,
    Path((id, phase)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let correlation_id = correlation(&headers).unwrap_or_else(Uuid::new_v4);
    let batch = match state.repo.get_batch(&id).await {
        Ok(Some(b)) => b,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"error": "Batch not found", "batch_id": id})),
            )
                .into_response()
        }
        Err(e) => return unavailable(&e),
    };
    let resolution = PhaseName::parse(&phase)
        .filter(|&p| state.rules.graph.contains(p))
        .and_then(|target| state.rules.resolve(&batch, target, false, &batch.context));
    let Some(resolution) = resolution else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({
                "error": format!("Invalid pipeline phase: {phase}"),
                "denial_reason": denial::UNSUPPORTED_PIPELINE,
            })),
        )
            .into_response();
    };
    let mut body = json!({
        "batch_id": batch.id,
        "requested_pipeline": phase,
        "resolved_pipeline": resolution.phases,
        "required_credits": resolution.required_credits,
        "available_credits": 0,
        "resource_breakdown": resolution.breakdown,
        "correlation_id": correlation_id,
    });
    let denied = |body: &mut Value, status: StatusCode, reason: &str| {
        body["allowed"] = json!(false);
        body["denial_reason"] = json!(reason);
        (status, Json(body.clone())).into_response()
    };
    if resolution.prompt_missing {
        return denied(
            &mut body,
            StatusCode::BAD_REQUEST,
            denial::PROMPT_NOT_ATTACHED,
        );
    }
    let verdict = match &resolution.credit_query {
        None => CreditVerdict::Allowed { available: 0 },
        Some(query) => state.credits.check(query, correlation_id).await,
    };
    body["available_credits"] = json!(verdict.available());
    match verdict {
        CreditVerdict::Allowed { .. } => {
            body["allowed"] = json!(true);
            (StatusCode::OK, Json(body)).into_response()
        }
        CreditVerdict::Denied { reason, .. } => {
            let status = match reason.as_str() {
                denial::RATE_LIMIT_EXCEEDED => StatusCode::TOO_MANY_REQUESTS,
                denial::ENTITLEMENTS_UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::PAYMENT_REQUIRED,
            };
            denied(&mut body, status, &reason)
        }
    }
}

#[derive(serde::Deserialize)]
struct PromptAmendment {
    student_prompt_ref: Option<StorageReferenceMetadata>,
}

async fn amend_prompt(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(user) = headers
        .get("x-user-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
    else {
        return error(StatusCode::UNAUTHORIZED, "User authentication required");
    };
    let amendment: PromptAmendment = match parse_body(&body) {
        Ok(a) => a,
        Err(response) => return *response,
    };
    for _ in 0..5 {
        let batch = match state.repo.get_batch(&id).await {
            Ok(Some(b)) => b,
            Ok(None) => return error(StatusCode::NOT_FOUND, "Batch not found"),
            Err(e) => return unavailable(&e),
        };
        if batch.context.user_id != user {
            return error(StatusCode::FORBIDDEN, "Batch not owned by user");
        }
        if !matches!(
            batch.status,
            BatchStatus::AwaitingContentValidation
                | BatchStatus::AwaitingPipelineConfiguration
                | BatchStatus::ReadyForPipelineExecution
        ) {
            return error(
                StatusCode::CONFLICT,
                "Batch not editable for prompt amendment",
            );
        }
        let Some(prompt) = amendment
            .student_prompt_ref
            .clone()
            .filter(valid_prompt_reference)
        else {
            return error(StatusCode::BAD_REQUEST, "Invalid student_prompt_ref");
        };
        let mut next = batch.clone();
        next.context.student_prompt_ref = Some(prompt.clone());
        next.updated_at = chrono::Utc::now();
        let unit = UnitOfWork {
            writes: vec![BatchWrite {
                expected_version: Some(batch.version),
                batch: next,
                essays_changed: false,
                transitions: Vec::new(),
                snapshots: Vec::new(),
            }],
            ..UnitOfWork::default()
        };
        match state.repo.commit(unit).await {
            Ok(c) if c.conflicts.is_empty() && c.missing.is_empty() => {
                return Json(
                    json!({"status": "success", "batch_id": id, "student_prompt_ref": prompt}),
                )
                .into_response()
            }
            Ok(_) => continue,
            Err(crate::store::CommitError::Store(e)) => return unavailable(&e),
            Err(e) => return error(StatusCode::CONFLICT, &e.to_string()),
        }
    }
    error(StatusCode::CONFLICT, "the batch kept changing; try again")
}

#[derive(serde::Deserialize)]
struct RetryRequest {
    #[serde(default)]
    phase_name: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    retry_reason: Option<String>,
    #[serde(default)]
    essay_ids: Option<Vec<String>>,
}

/// Namespace of retry request ids derived from `X-Correlation-ID`.
const RETRY_NAMESPACE: Uuid = Uuid::from_u128(0x2d6e_8a51_0c3f_4b7e_a1d2_93f4_5e6b_7c8d);

async fn retry_phase(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: RetryRequest = match parse_body(&body) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    let required = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let (Some(phase_name), Some(user_id)) =
        (required(&request.phase_name), required(&request.user_id))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "phase_name and user_id are required",
        );
    };
    let batch = match state.repo.get_batch(&id).await {
        Ok(Some(b)) => b,
        Ok(None) => return error(StatusCode::NOT_FOUND, "Batch not found"),
        Err(e) => return unavailable(&e),
    };
    let Some(phase) = PhaseName::parse(&phase_name.to_ascii_lowercase()) else {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("Invalid phase name: {phase_name}"),
        );
    };
    if phase == PhaseName::CjAssessment && request.essay_ids.as_ref().is_some_and(|e| !e.is_empty())
    {
        return error(
            StatusCode::BAD_REQUEST,
            "CJ Assessment requires full batch retry for ranking consistency",
        );
    }
    if !state.rules.graph.contains(phase) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("Phase {phase} cannot be retried"),
        );
    }
    if batch.context.user_id != user_id {
        return error(StatusCode::FORBIDDEN, "Batch not owned by user");
    }
    let reason = request
        .retry_reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "User initiated retry".to_owned());
    if reason.chars().count() > 500 || reason.contains('\0') {
        return error(
            StatusCode::BAD_REQUEST,
            "retry_reason must be at most 500 characters",
        );
    }
    // A request repeated with the same X-Correlation-ID is the same event.
    let header = correlation(&headers);
    let correlation_id = header.unwrap_or_else(Uuid::new_v4);
    let event_id = match header {
        Some(c) => Uuid::new_v5(&RETRY_NAMESPACE, format!("{id}/{phase}/{c}").as_bytes()),
        None => Uuid::new_v4(),
    };
    let prepared = vec![Prepared::event(
        InboundEvent::PipelineRequest(ClientPipelineRequest {
            batch_id: id.clone(),
            requested_pipeline: phase.as_str().to_owned(),
            user_id,
            client_correlation_id: Some(correlation_id),
            is_retry: true,
            retry_reason: Some(reason),
            prompt_payload: None,
        }),
        EventMeta {
            event_id,
            correlation_id,
            traceparent: None,
        },
        "http.retry-phase",
    )];
    let outcome = match state.applier.apply(&prepared).await {
        Ok(mut o) => o.remove(0),
        Err(e) => {
            tracing::warn!(error = %e, "retry not applied");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Retry could not be recorded; try again",
            );
        }
    };
    if let Some(reason) = outcome.denied {
        let status = match reason.as_str() {
            denial::INSUFFICIENT_CREDITS => StatusCode::PAYMENT_REQUIRED,
            denial::RATE_LIMIT_EXCEEDED => StatusCode::TOO_MANY_REQUESTS,
            denial::ENTITLEMENTS_UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
            denial::BATCH_FAILED => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        };
        return (
            status,
            Json(json!({"error": format!("Retry denied: {reason}"), "denial_reason": reason, "batch_id": id, "phase": phase})),
        )
            .into_response();
    }
    let message = match &outcome.verdict {
        Verdict::Applied => format!("Retry initiated for {phase} phase"),
        Verdict::Ignored(why) | Verdict::DeadLetter { error: why, .. } => {
            format!("Retry initiated for {phase} phase ({why})")
        }
        Verdict::Duplicate => format!("Retry initiated for {phase} phase (already recorded)"),
    };
    Json(json!({
        "status": "retry_initiated",
        "batch_id": id,
        "phase": phase,
        "message": message,
        "correlation_id": correlation_id,
    }))
    .into_response()
}

async fn healthz(State(state): State<AppState>) -> Response {
    let database = state.repo.ping().await;
    let ok = database.is_ok();
    let mut database_status = json!({"status": if ok { "healthy" } else { "unhealthy" }});
    if let Err(e) = &database {
        database_status["error"] = json!(e.to_string());
    }
    let status = if ok { "healthy" } else { "unhealthy" };
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(json!({
            "service": state.service_name,
            "status": status,
            "message": format!("Batch Orchestrator Service is {status}"),
            "version": env!("CARGO_PKG_VERSION"),
            "checks": {"service_responsive": true, "dependencies_available": ok},
            "dependencies": {"database": database_status},
            "environment": state.environment,
        })),
    )
        .into_response()
}

fn unix_now() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

async fn database_summary(State(state): State<AppState>) -> Response {
    let started = Instant::now();
    let ping = tokio::time::timeout(std::time::Duration::from_secs(2), state.repo.ping()).await;
    let connectivity = matches!(ping, Ok(Ok(())));
    let pool = state.repo.pool_status();
    let utilization = pool.map_or(0.0, crate::store::PoolStatus::utilization_percent);
    let status = if !connectivity {
        "unhealthy"
    } else if utilization > 95.0 {
        "warning"
    } else {
        "healthy"
    };
    (
        if connectivity {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(json!({
            "service": "batch_orchestrator_service",
            "status": status,
            "connectivity": connectivity,
            "response_time_seconds": started.elapsed().as_secs_f64(),
            "pool_utilization_percent": utilization,
            "active_connections": pool.map_or(0, crate::store::PoolStatus::in_use),
            "timestamp": unix_now(),
        })),
    )
        .into_response()
}

async fn database_health(State(state): State<AppState>) -> Response {
    let now = unix_now();
    let started = Instant::now();
    let ping = tokio::time::timeout(std::time::Duration::from_secs(5), state.repo.ping()).await;
    let connectivity = matches!(ping, Ok(Ok(())));
    let ping_error = match &ping {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("timed out after 5s".to_owned()),
    };
    let simple = started.elapsed().as_secs_f64();
    let pool = state.repo.pool_status();
    let mut warnings = Vec::new();
    let pool_check = match pool {
        Some(p) => {
            let utilization = p.utilization_percent();
            let status = if utilization > 90.0 {
                warnings.push(format!("pool utilisation {utilization:.0}%"));
                "warning"
            } else {
                "healthy"
            };
            json!({
                "status": status, "pool_size": p.size, "active_connections": p.in_use(),
                "idle_connections": p.idle, "overflow_connections": 0, "invalid_connections": 0,
                "total_capacity": p.max, "utilization_percent": utilization, "pool_type": "sqlx",
                "warnings": [], "timestamp": now,
            })
        }
        None => json!({"status": "healthy", "pool_type": "memory", "timestamp": now}),
    };
    let resources = if connectivity {
        state.repo.database_report().await.ok()
    } else {
        None
    };
    let overall = if !connectivity {
        "unhealthy"
    } else if warnings.is_empty() {
        "healthy"
    } else {
        "warning"
    };
    (
        if connectivity {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(json!({
            "service": "batch_orchestrator_service",
            "overall_status": overall,
            "checks": {
                "connectivity": {"status": if connectivity { "healthy" } else { "unhealthy" }, "connectivity": connectivity,
                                 "response_time_seconds": simple, "error": ping_error, "timestamp": now},
                "connection_pool": pool_check,
                "query_performance": {"status": if simple > 1.0 { "warning" } else if connectivity { "healthy" } else { "unhealthy" },
                                      "simple_query_time_seconds": simple, "warnings": [], "timestamp": now},
                "database_resources": resources.map_or_else(|| json!({"status": "unknown", "timestamp": now}), |r| json!({
                    "status": if r.long_running_queries > 0 { "warning" } else { "healthy" },
                    "active_connections": r.active_connections, "database_size": r.database_size,
                    "long_running_queries": r.long_running_queries, "warnings": [], "timestamp": now,
                })),
            },
            "warnings": warnings,
            "timestamp": now,
        })),
    )
        .into_response()
}

/// All readiness checks, the in-process ones and the probes.
pub async fn readiness(state: &AppState) -> Vec<Check> {
    let database = state.repo.ping().await;
    let kafka = state.kafka.reachable().await;
    let mut checks = vec![
        Check {
            name: "database",
            ok: database.is_ok(),
            detail: database.err().map(|e| e.to_string()),
        },
        Check {
            name: "kafka",
            ok: kafka,
            detail: (!kafka).then(|| "the cluster does not answer".to_owned()),
        },
        Check {
            name: "producer",
            ok: state.kafka.producer_healthy(),
            detail: (!state.kafka.producer_healthy())
                .then(|| "replaced after a fatal error; no send has succeeded since".to_owned()),
        },
    ];
    checks.extend(state.health.checks());
    checks
}

async fn readyz(State(state): State<AppState>) -> Response {
    let checks = readiness(&state).await;
    let ok = checks.iter().all(|c| c.ok);
    let body: serde_json::Map<String, Value> = checks
        .iter()
        .map(|c| (c.name.to_owned(), json!(c.ok)))
        .collect();
    let details: Vec<&Check> = checks.iter().filter(|c| !c.ok).collect();
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(json!({"ready": ok, "checks": body, "failing": details})),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    if let Some(p) = state.repo.pool_status() {
        state
            .metrics
            .db_connections_active
            .set(i64::from(p.in_use()));
        state.metrics.db_connections_idle.set(i64::from(p.idle));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
        .into_response()
}
