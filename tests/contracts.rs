//! Wire contracts: the platform's samples decode, our samples round-trip, what we
//! publish validates against the published JSON Schemas, broken input is a typed error.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use bos::contracts::{
    decode, topics, CourseCode, DecodeError, Envelope, EssayRef, InboundEvent, PipelineCompleted,
    SpellcheckCommand,
};
use bos::domain::{
    Batch, Decision, Env, EventMeta, FixedBalance, PhaseGraph, Rules, SequentialIds,
};
use bos::upstream;
use serde_json::Value;
use uuid::Uuid;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(shared().join("wire").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn schemas() -> Value {
    serde_json::from_slice(&std::fs::read(shared().join("published-schemas.json")).unwrap())
        .unwrap()
}

#[test]
fn every_platform_sample_decodes() {
    let mut decoded = 0;
    for entry in std::fs::read_dir(shared().join("wire")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("out_") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let topic = serde_json::from_slice::<Value>(&bytes).unwrap()["event_type"]
            .as_str()
            .unwrap()
            .to_owned();
        let message = decode(&topic, &bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(message.event.topic(), topic);
        assert_eq!(
            message.event.batch_id(),
            "813c9582-e0d6-5f75-9b92-eeaebb610315"
        );
        decoded += 1;
    }
    assert_eq!(decoded, 7);
}

#[test]
fn sample_fields_land_where_expected() {
    let message = decode(
        topics::PHASE_OUTCOME,
        &fixture("phase_outcome_spellcheck_partial.json"),
    )
    .unwrap();
    let InboundEvent::PhaseOutcome(outcome) = message.event else {
        panic!("wrong type")
    };
    assert_eq!(outcome.processed_essays.len(), 3);
    assert_eq!(
        outcome.processed_essays[0].text_storage_id,
        "store-0-corrected"
    );
    assert_eq!(
        outcome.failed_essay_ids,
        ["a2f53561-efb8-5ae9-b99d-a09069c2ef4d"]
    );
    assert_eq!(
        message.envelope.event_id,
        Some("0177559d-b0c5-5876-a4f7-8f292ec9d41a".parse().unwrap())
    );
    let request = decode(
        topics::CLIENT_PIPELINE_REQUEST,
        &fixture("client_pipeline_request_cj.json"),
    )
    .unwrap();
    let InboundEvent::PipelineRequest(request) = request.event else {
        panic!("wrong type")
    };
    assert_eq!(
        request.prompt_payload.unwrap().assignment_id.as_deref(),
        Some("assign-1")
    );
}

fn assert_round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(name: &str) {
    let original: Value = serde_json::from_slice(&fixture(name)).unwrap();
    let typed: T = serde_json::from_value(original.clone()).unwrap();
    assert_eq!(
        serde_json::to_value(&typed).unwrap(),
        original,
        "{name} round-trips byte for byte"
    );
}

#[test]
fn our_samples_round_trip() {
    assert_round_trip::<Envelope<SpellcheckCommand>>("out_spellcheck_command.json");
    assert_round_trip::<Envelope<PipelineCompleted>>("out_pipeline_completed.json");
}

/// Runs the rules through flows that publish every message kind we have.
fn published_samples() -> Vec<Decision> {
    let mut out = Vec::new();
    let mut ids = SequentialIds(0);
    let now = chrono::Utc::now();
    for (class_id, rules) in [
        (None, Rules::default()),
        (Some("class-9a"), Rules::default()),
        (
            None,
            Rules::new(PhaseGraph::default(), Arc::new(FixedBalance(0))),
        ),
    ] {
        let mut env = Env { now, ids: &mut ids };
        let registered = rules
            .register(&common::registration(class_id, 3), Uuid::new_v4(), &mut env)
            .unwrap();
        let mut batch: Batch = registered.batch.clone().unwrap();
        out.push(registered);
        let id = batch.id.clone();
        let essays: Vec<EssayRef> = (0..3)
            .map(|i| EssayRef::new(format!("e{i}"), format!("s{i}")))
            .collect();
        let mut send = |batch: &mut Batch, event: InboundEvent, out: &mut Vec<Decision>| {
            let meta = EventMeta {
                event_id: Uuid::new_v4(),
                correlation_id: Uuid::new_v4(),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            };
            let d = rules.decide(Some(batch), &event, &meta, &mut Env { now, ids: &mut ids });
            if let Some(b) = &d.batch {
                *batch = b.clone();
            }
            out.push(d);
        };
        send(
            &mut batch,
            InboundEvent::ContentProvisioned(upstream::content_provisioned(
                &id,
                CourseCode::Sv1,
                "t",
                &essays,
            )),
            &mut out,
        );
        if class_id.is_some() {
            send(
                &mut batch,
                InboundEvent::AssociationsConfirmed(upstream::associations_confirmed(
                    &id,
                    "class-9a",
                    CourseCode::Sv1,
                    &[],
                    now,
                )),
                &mut out,
            );
            send(
                &mut batch,
                InboundEvent::EssaysReady(upstream::essays_ready(
                    &id,
                    CourseCode::Sv1,
                    "REGULAR",
                    &essays,
                    now,
                )),
                &mut out,
            );
        }
        send(
            &mut batch,
            InboundEvent::PipelineRequest(upstream::pipeline_request(&id, "bogus", "t")),
            &mut out,
        );
        for target in ["ai_feedback", "cj_assessment"] {
            send(
                &mut batch,
                InboundEvent::PipelineRequest(upstream::pipeline_request(&id, target, "t")),
                &mut out,
            );
            while let Some(run) = batch.orchestration.current_run.clone() {
                let phase = run.phases[run.current];
                let survivors: Vec<EssayRef> = essays[..2].to_vec();
                let outcome = upstream::phase_outcome(
                    &id,
                    phase,
                    &survivors,
                    &["e2".into()],
                    run.correlation_id,
                );
                send(&mut batch, InboundEvent::PhaseOutcome(outcome), &mut out);
            }
        }
        send(
            &mut batch,
            InboundEvent::ValidationErrors(upstream::validation_errors(
                &id,
                &["e0".into()],
                true,
                now,
            )),
            &mut out,
        );
    }
    // A batch that fails validation with a parked request: `batch_failed`.
    let rules = Rules::default();
    let mut env = Env { now, ids: &mut ids };
    let registered = rules
        .register(&common::registration(None, 1), Uuid::new_v4(), &mut env)
        .unwrap();
    let mut batch = registered.batch.unwrap();
    for event in [
        InboundEvent::PipelineRequest(upstream::pipeline_request(&batch.id, "nlp", "t")),
        InboundEvent::ValidationErrors(upstream::validation_errors(&batch.id, &[], true, now)),
    ] {
        let meta = EventMeta {
            event_id: Uuid::new_v4(),
            correlation_id: Uuid::new_v4(),
            traceparent: None,
        };
        let d = rules.decide(Some(&batch), &event, &meta, &mut Env { now, ids: &mut ids });
        batch = d.batch.clone().unwrap();
        out.push(d);
    }
    out
}

#[test]
fn everything_we_publish_validates_against_the_published_schemas() {
    let schemas = schemas();
    let envelope = jsonschema::validator_for(&schemas["envelope"]).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut notification_kinds = std::collections::BTreeSet::new();
    for decision in published_samples() {
        for message in decision.messages {
            let errors: Vec<String> = envelope
                .iter_errors(&message.envelope)
                .map(|e| e.to_string())
                .collect();
            assert!(
                errors.is_empty(),
                "envelope of {}: {errors:?}",
                message.topic
            );
            let schema = &schemas[message.topic];
            assert!(schema.is_object(), "no schema for {}", message.topic);
            let validator = jsonschema::validator_for(schema).unwrap();
            let data = &message.envelope["data"];
            let errors: Vec<String> = validator.iter_errors(data).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{}: {errors:?}\n{data:#}", message.topic);
            assert_eq!(message.envelope["event_type"], message.topic);
            assert_eq!(
                message.envelope["source_service"],
                "batch_orchestrator_service"
            );
            if message.topic == topics::TEACHER_NOTIFICATION {
                notification_kinds.insert(data["notification_type"].as_str().unwrap().to_owned());
            }
            seen.insert(message.topic);
        }
    }
    assert_eq!(
        seen,
        topics::PUBLISHED.into_iter().collect(),
        "every published topic was exercised"
    );
    assert_eq!(
        notification_kinds,
        [
            "batch_processing_started",
            "pipeline_completed",
            "pipeline_denied",
            "pipeline_denied_insufficient_credits"
        ]
        .into_iter()
        .map(str::to_owned)
        .collect()
    );
}

fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

#[test]
fn what_we_publish_has_the_sample_key_sets() {
    let spell: Value = serde_json::from_slice(&fixture("out_spellcheck_command.json")).unwrap();
    let done: Value = serde_json::from_slice(&fixture("out_pipeline_completed.json")).unwrap();
    let mut checked = 0;
    for message in published_samples().into_iter().flat_map(|d| d.messages) {
        let sample = match message.topic {
            topics::SPELLCHECK_COMMAND => &spell,
            topics::PIPELINE_COMPLETED => &done,
            _ => continue,
        };
        assert_eq!(keys(&message.envelope), keys(sample));
        assert_eq!(
            keys(&message.envelope["data"]),
            keys(&sample["data"]),
            "{}",
            message.topic
        );
        if message.topic == topics::SPELLCHECK_COMMAND {
            assert_eq!(
                keys(&message.envelope["data"]["essays_to_process"][0]),
                keys(&sample["data"]["essays_to_process"][0])
            );
            for key in ["user_id", "org_id"] {
                assert!(
                    message.envelope["metadata"].get(key).is_some(),
                    "command metadata has {key}"
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 4);
}

fn broken(mutate: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut value: Value =
        serde_json::from_slice(&fixture("phase_outcome_spellcheck_partial.json")).unwrap();
    mutate(&mut value);
    serde_json::to_vec(&value).unwrap()
}

#[test]
fn broken_inputs_give_typed_errors() {
    let outcome = topics::PHASE_OUTCOME;
    let sample = fixture("phase_outcome_spellcheck_partial.json");
    type Case<'a> = (&'a str, &'a str, Vec<u8>, fn(&DecodeError) -> bool, &'a str);
    let cases: Vec<Case> = vec![
        (
            "truncated JSON",
            outcome,
            sample[..sample.len() / 2].to_vec(),
            |e| matches!(e, DecodeError::InvalidJson(_)),
            "EOF",
        ),
        (
            "not JSON",
            outcome,
            b"\xff\xfe garbage".to_vec(),
            |e| matches!(e, DecodeError::InvalidJson(_)),
            "",
        ),
        (
            "empty",
            outcome,
            Vec::new(),
            |e| matches!(e, DecodeError::InvalidJson(_)),
            "",
        ),
        (
            "an array",
            outcome,
            b"[1,2]".to_vec(),
            |e| matches!(e, DecodeError::InvalidEnvelope(_)),
            "",
        ),
        (
            "missing data",
            outcome,
            broken(|v| {
                v.as_object_mut().unwrap().remove("data");
            }),
            |e| matches!(e, DecodeError::InvalidEnvelope(_)),
            "data",
        ),
        (
            "missing event_type",
            outcome,
            broken(|v| {
                v.as_object_mut().unwrap().remove("event_type");
            }),
            |e| matches!(e, DecodeError::InvalidEnvelope(_)),
            "event_type",
        ),
        (
            "bad event_id",
            outcome,
            broken(|v| v["event_id"] = "not-a-uuid".into()),
            |e| matches!(e, DecodeError::InvalidEnvelope(_)),
            "",
        ),
        (
            "bad timestamp",
            outcome,
            broken(|v| v["event_timestamp"] = "yesterday".into()),
            |e| matches!(e, DecodeError::InvalidEnvelope(_)),
            "yesterday",
        ),
        (
            "missing batch_id",
            outcome,
            broken(|v| {
                v["data"].as_object_mut().unwrap().remove("batch_id");
            }),
            |e| matches!(e, DecodeError::InvalidData { .. }),
            "batch_id",
        ),
        (
            "wrong type",
            outcome,
            broken(|v| v["data"]["failed_essay_ids"] = 7.into()),
            |e| matches!(e, DecodeError::InvalidData { .. }),
            "integer",
        ),
        (
            "unknown phase",
            outcome,
            broken(|v| v["data"]["phase_name"] = "grading".into()),
            |e| matches!(e, DecodeError::InvalidData { .. }),
            "grading",
        ),
        (
            "unknown status",
            outcome,
            broken(|v| v["data"]["phase_status"] = "DONE".into()),
            |e| matches!(e, DecodeError::InvalidData { .. }),
            "DONE",
        ),
        (
            "lowercase course",
            topics::CONTENT_PROVISIONING_COMPLETED,
            {
                let mut v: Value =
                    serde_json::from_slice(&fixture("content_provisioning_completed_guest.json"))
                        .unwrap();
                v["data"]["course_code"] = "eng5".into();
                serde_json::to_vec(&v).unwrap()
            },
            |e| matches!(e, DecodeError::InvalidData { .. }),
            "eng5",
        ),
        (
            "both prompt fields",
            topics::CLIENT_PIPELINE_REQUEST,
            {
                let mut v: Value =
                    serde_json::from_slice(&fixture("client_pipeline_request_cj.json")).unwrap();
                v["data"]["prompt_payload"]["cms_prompt_ref"] =
                    serde_json::json!({"references": {}});
                serde_json::to_vec(&v).unwrap()
            },
            |e| matches!(e, DecodeError::InvalidData { .. }),
            "exactly one",
        ),
        (
            "unknown topic",
            "huleedu.something.else.v1",
            sample.clone(),
            |e| matches!(e, DecodeError::UnknownTopic(_)),
            "something",
        ),
    ];
    for (name, topic, bytes, expected, mentions) in cases {
        let error = decode(topic, &bytes).expect_err(name);
        assert!(expected(&error), "{name}: got {error:?}");
        assert!(
            error.to_string().contains(mentions),
            "{name}: `{error}` should mention `{mentions}`"
        );
    }
}

#[test]
fn defaults_fill_absent_fields_and_offsets_are_accepted() {
    let mut v: Value =
        serde_json::from_slice(&fixture("phase_outcome_spellcheck_partial.json")).unwrap();
    let envelope = v.as_object_mut().unwrap();
    for key in [
        "event_id",
        "correlation_id",
        "schema_version",
        "data_schema_uri",
        "metadata",
    ] {
        envelope.remove(key);
    }
    envelope.insert("event_timestamp".into(), "2026-03-14T11:26:53+02:00".into());
    envelope.insert("unexpected_extra".into(), 1.into());
    v["data"].as_object_mut().unwrap().remove("correlation_id");
    let message = decode(topics::PHASE_OUTCOME, &serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(message.envelope.event_id, None);
    assert_eq!(message.envelope.schema_version, 1);
    assert_eq!(
        message
            .envelope
            .event_timestamp
            .map(|t| bos::contracts::time::format(&t))
            .as_deref(),
        Some("2026-03-14T09:26:53.000000Z")
    );
}
