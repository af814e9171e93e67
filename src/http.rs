//! The small HTTP surface: registration, status, preflight, prompt amendment,
//! health and metrics. The worker itself is driven by Kafka.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use rdkafka::producer::Producer;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::contracts::{BatchStatus, PhaseName, StorageReferenceMetadata};
use crate::domain::{CreditVerdict, Env, RandomIds, RegistrationRequest, Rules};
use crate::metrics::Metrics;
use crate::store::{ChangeOutcome, Repository, StoreError};

/// Answers whether Kafka is reachable.
#[async_trait::async_trait]
pub trait KafkaProbe: Send + Sync {
    async fn reachable(&self) -> bool;
}

/// Probes Kafka by fetching cluster metadata through a producer.
pub struct ProducerProbe(pub rdkafka::producer::FutureProducer);

#[async_trait::async_trait]
impl KafkaProbe for ProducerProbe {
    async fn reachable(&self) -> bool {
        let producer = self.0.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

#[derive(Clone)]
pub struct AppState {
    pub repo: Arc<dyn Repository>,
    pub rules: Rules,
    pub metrics: Arc<Metrics>,
    pub kafka: Arc<dyn KafkaProbe>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/batches/register", post(register))
        .route("/v1/batches/{id}/status", get(status))
        .route("/v1/batches/{id}/prompt", patch(amend_prompt))
        .route(
            "/internal/v1/batches/{id}/pipeline-state",
            get(pipeline_state),
        )
        .route(
            "/internal/v1/batches/{id}/pipelines/{phase}/preflight",
            post(preflight),
        )
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn error(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn internal(e: StoreError) -> Response {
    tracing::error!(error = %e, "store error");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "store unavailable"}),
    )
}

fn not_found(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        json!({"error": format!("batch `{id}` not found")}),
    )
}

async fn register(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let request: RegistrationRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                json!({"errors": [{"field": "body", "message": e.to_string()}]}),
            )
        }
    };
    let correlation_id = headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Uuid>().ok())
        .unwrap_or_else(Uuid::new_v4);
    let decision = {
        let mut ids = RandomIds;
        let mut env = Env {
            now: chrono::Utc::now(),
            ids: &mut ids,
        };
        state.rules.register(&request, correlation_id, &mut env)
    };
    let decision = match decision {
        Ok(d) => d,
        Err(errors) => return error(StatusCode::BAD_REQUEST, json!({"errors": errors})),
    };
    let Some(batch) = decision.batch else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "registration produced no batch"}),
        );
    };
    match state.repo.create_batch(&batch, &decision.messages).await {
        Ok(ChangeOutcome::Applied { .. }) => (
            StatusCode::ACCEPTED,
            Json(json!({"batch_id": batch.id, "correlation_id": correlation_id, "status": "registered"})),
        )
            .into_response(),
        Ok(other) => error(StatusCode::CONFLICT, json!({"error": format!("{other:?}")})),
        Err(e) => internal(e),
    }
}

async fn status(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.repo.get_batch_by_id(&id).await {
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
        Ok(None) => not_found(&id),
        Err(e) => internal(e),
    }
}

async fn pipeline_state(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.repo.get_batch_by_id(&id).await {
        Ok(Some(batch)) => Json(json!({
            "batch_id": batch.id,
            "pipeline_state": batch.pipeline,
            "user_id": batch.context.user_id,
        }))
        .into_response(),
        Ok(None) => not_found(&id),
        Err(e) => internal(e),
    }
}

async fn preflight(
    State(state): State<AppState>,
    Path((id, phase)): Path<(String, String)>,
) -> Response {
    let target = match PhaseName::parse(&phase) {
        Some(PhaseName::StudentMatching) | None => {
            return error(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("unsupported pipeline `{phase}`")}),
            )
        }
        Some(p) => p,
    };
    let batch = match state.repo.get_batch_by_id(&id).await {
        Ok(Some(b)) => b,
        Ok(None) => return not_found(&id),
        Err(e) => return internal(e),
    };
    let Some(resolution) = state.rules.resolve(&batch, target, false) else {
        return error(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("unsupported pipeline `{phase}`")}),
        );
    };
    let (status, allowed) = match resolution.verdict {
        CreditVerdict::Allowed { .. } => (StatusCode::OK, true),
        CreditVerdict::InsufficientCredits { .. } => (StatusCode::PAYMENT_REQUIRED, false),
        CreditVerdict::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, false),
    };
    (
        status,
        Json(json!({
            "allowed": allowed,
            "batch_id": batch.id,
            "requested_pipeline": target,
            "resolved_pipeline": resolution.phases,
            "required_credits": resolution.required_credits,
            "available_credits": resolution.verdict.available(),
            "resource_breakdown": resolution.breakdown,
            "correlation_id": Uuid::new_v4(),
        })),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct PromptAmendment {
    student_prompt_ref: StorageReferenceMetadata,
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
        .map(str::to_owned)
    else {
        return error(
            StatusCode::UNAUTHORIZED,
            json!({"error": "X-User-ID is required"}),
        );
    };
    let amendment: PromptAmendment = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                json!({"errors": [{"field": "student_prompt_ref", "message": e.to_string()}]}),
            )
        }
    };
    for _ in 0..5 {
        let batch = match state.repo.get_batch_by_id(&id).await {
            Ok(Some(b)) => b,
            Ok(None) => return not_found(&id),
            Err(e) => return internal(e),
        };
        if batch.context.user_id != user {
            return error(
                StatusCode::FORBIDDEN,
                json!({"error": "not the batch owner"}),
            );
        }
        if !matches!(
            batch.status,
            BatchStatus::AwaitingContentValidation
                | BatchStatus::AwaitingPipelineConfiguration
                | BatchStatus::ReadyForPipelineExecution
        ) {
            return error(
                StatusCode::CONFLICT,
                json!({"error": format!("the prompt cannot change while the batch is {}", batch.status)}),
            );
        }
        let mut context = batch.context.clone();
        context.student_prompt_ref = Some(amendment.student_prompt_ref.clone());
        match state
            .repo
            .store_batch_context(&id, batch.version, &context)
            .await
        {
            Ok(true) => {
                return Json(
                    json!({"batch_id": id, "student_prompt_ref": context.student_prompt_ref}),
                )
                .into_response()
            }
            Ok(false) => continue,
            Err(e) => return internal(e),
        }
    }
    error(
        StatusCode::CONFLICT,
        json!({"error": "the batch kept changing; try again"}),
    )
}

async fn readyz(State(state): State<AppState>) -> Response {
    let database = state.repo.ping().await.is_ok();
    let kafka = state.kafka.reachable().await;
    let status = if database && kafka {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"database": database, "kafka": kafka}))).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
        .into_response()
}
