//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod http;
pub mod infra;
pub mod kafka;

use bos::contracts::{CourseCode, EssayRef};
use bos::domain::{
    Batch, BatchEssay, Env, OutboundMessage, RegistrationRequest, Rules, SequentialIds,
};
use chrono::{TimeZone, Utc};
use uuid::Uuid;

pub fn registration(class_id: Option<&str>, essays: i64) -> RegistrationRequest {
    RegistrationRequest {
        expected_essay_count: essays,
        essay_ids: None,
        course_code: CourseCode::Eng5,
        student_prompt_ref: None,
        user_id: "teacher-anna".into(),
        org_id: Some("org-1".into()),
        class_id: class_id.map(str::to_owned),
        cj_default_llm_model: None,
        cj_default_temperature: None,
        assignment_id: None,
    }
}

/// A freshly registered batch (random ids) with `essays` stored essays.
pub fn new_batch(essays: usize) -> (Batch, Vec<OutboundMessage>) {
    let mut ids = bos::domain::RandomIds;
    let mut env = Env {
        now: Utc.with_ymd_and_hms(2026, 3, 14, 9, 26, 53).unwrap(),
        ids: &mut ids,
    };
    let decision = Rules::default()
        .register(
            &registration(None, essays.max(1) as i64),
            Uuid::new_v4(),
            &mut env,
        )
        .expect("valid registration");
    let mut batch = decision.batch.expect("registration creates a batch");
    batch.essays = (0..essays)
        .map(|i| BatchEssay::from_ref(&EssayRef::new(format!("essay-{i}"), format!("store-{i}"))))
        .collect();
    (batch, decision.messages)
}

pub fn sequential_env(ids: &mut SequentialIds) -> Env<'_> {
    Env {
        now: Utc.with_ymd_and_hms(2026, 3, 14, 9, 26, 53).unwrap(),
        ids,
    }
}

/// Panics unless `envelope` (published on `topic`) matches the published JSON Schemas.
pub fn assert_valid_published(topic: &str, envelope: &serde_json::Value) {
    use std::sync::OnceLock;
    static SCHEMAS: OnceLock<serde_json::Value> = OnceLock::new();
    let schemas = SCHEMAS.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/published-schemas.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    });
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
