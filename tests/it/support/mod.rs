//! What the integration tests share: infrastructure, the application under
//! test (in-process or as the `bos` binary), the upstream services, and
//! repository decorators that inject faults.

pub mod app;
pub mod faulty;
pub mod flow;
pub mod kafka;
pub mod pg;

use std::sync::OnceLock;
use std::time::Duration;

use bos::contracts::{CourseCode, EssayRef, StorageReferenceMetadata};
use bos::domain::{
    Batch, BatchEssay, CreditAnswers, Env, OutboundMessage, RegistrationRequest, Rules,
};
use chrono::{TimeZone, Utc};
use serde_json::Value;
use uuid::Uuid;

pub const TEACHER: &str = "teacher-anna";

pub fn prompt(storage_id: &str) -> StorageReferenceMetadata {
    bos::sim::upstream::prompt_ref(storage_id)
}

pub fn registration(class_id: Option<&str>, essays: i64) -> RegistrationRequest {
    RegistrationRequest {
        expected_essay_count: essays,
        essay_ids: None,
        course_code: CourseCode::Eng5,
        student_prompt_ref: Some(prompt("prompt-1")),
        user_id: TEACHER.into(),
        org_id: Some("org-1".into()),
        class_id: class_id.map(str::to_owned),
        cj_default_llm_model: None,
        cj_default_temperature: None,
        assignment_id: None,
    }
}

pub fn essays(n: usize) -> Vec<EssayRef> {
    (0..n)
        .map(|i| EssayRef::new(format!("essay-{i}"), format!("store-{i}")))
        .collect()
}

/// A freshly registered batch (random ids) with `essays` stored essays.
pub fn new_batch(essays: usize) -> (Batch, Vec<OutboundMessage>) {
    let answers = CreditAnswers::new();
    let mut env = Env {
        now: Utc.with_ymd_and_hms(2026, 3, 14, 9, 26, 53).unwrap(),
        ids: &mut bos::domain::RandomIds,
        credits: &answers,
    };
    let effects = Rules::default()
        .register(
            &registration(None, essays.max(1) as i64),
            Uuid::new_v4(),
            &mut env,
        )
        .expect("valid registration");
    let mut batch = effects.batch;
    batch.essays = (0..essays)
        .map(|i| BatchEssay::from_ref(&EssayRef::new(format!("essay-{i}"), format!("store-{i}"))))
        .collect();
    (batch, effects.messages)
}

/// A file of `tests/fixtures`.
pub fn fixture(path: &str) -> Vec<u8> {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path);
    std::fs::read(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

pub fn schemas() -> &'static Value {
    static SCHEMAS: OnceLock<Value> = OnceLock::new();
    SCHEMAS.get_or_init(|| serde_json::from_slice(&fixture("published-schemas.json")).unwrap())
}

/// Panics unless `envelope` (published on `topic`) matches the published JSON Schemas.
pub fn assert_valid_published(topic: &str, envelope: &Value) {
    let schemas = schemas();
    let envelope_schema = jsonschema::validator_for(&schemas["envelope"]).unwrap();
    let errors: Vec<String> = envelope_schema
        .iter_errors(envelope)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "envelope on {topic}: {errors:?}");
    let data_schema =
        jsonschema::validator_for(&schemas[topic]).unwrap_or_else(|e| panic!("{topic}: {e}"));
    let errors: Vec<String> = data_schema
        .iter_errors(&envelope["data"])
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "data on {topic}: {errors:?}");
}

/// Waits until `done` holds (checked every 50 ms), or fails after `limit` with `what`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if done().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {limit:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A GUEST batch with `n` essays, ready for pipelines (as if provisioned).
pub fn ready_batch(n: usize) -> Batch {
    let (mut batch, _) = new_batch(n);
    batch.status = bos::contracts::BatchStatus::ReadyForPipelineExecution;
    batch
}

/// An envelope around `data` with this event id.
pub fn envelope<D: serde::Serialize>(topic: &str, event_id: Uuid, data: D) -> Vec<u8> {
    bos::sim::upstream::envelope_json(
        topic,
        "test_upstream",
        event_id,
        Uuid::new_v4(),
        Utc::now(),
        data,
    )
}
