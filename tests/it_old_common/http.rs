//! Calls the HTTP router in-process.
#![allow(dead_code)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bos::domain::Rules;
use bos::http::{router, AppState, KafkaProbe};
use bos::metrics::Metrics;
use bos::store::Repository;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

pub struct FixedProbe(pub bool);

#[async_trait::async_trait]
impl KafkaProbe for FixedProbe {
    async fn reachable(&self) -> bool {
        self.0
    }
}

pub fn state(repo: Arc<dyn Repository>, rules: Rules, kafka_up: bool) -> AppState {
    AppState {
        repo,
        rules,
        metrics: Arc::new(Metrics::new()),
        kafka: Arc::new(FixedProbe(kafka_up)),
    }
}

/// Sends one request; returns the status and the body (JSON, or a string).
pub async fn call(
    state: &AppState,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let body = match body {
        Some(b) => {
            request = request.header("content-type", "application/json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    let response = router(state.clone())
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}
