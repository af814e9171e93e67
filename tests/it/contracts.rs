//! Wire contracts: the platform's samples decode, our samples round-trip, what we
//! publish validates against the published JSON Schemas, broken input is a typed
//! error, and what the platform's models refuse is refused at decode.

use bos::contracts::{
    decode, topics, CourseCode, DecodeError, Envelope, EssayRef, InboundEvent, PipelineCompleted,
    SpellcheckCommand,
};
use bos::domain::{
    Batch, CreditAnswers, CreditVerdict, Decision, Env, EventMeta, OutboundMessage, Rules,
    SequentialIds,
};
use bos::sim::upstream;
use proptest::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use crate::support;

fn fixture(name: &str) -> Vec<u8> {
    support::fixture(&format!("wire/{name}"))
}

fn schemas() -> Value {
    support::schemas().clone()
}

/// Decides with a credit balance (None: everything allowed), answering the
/// rules' credit questions the way the worker does.
fn decide(
    rules: &Rules,
    batch: &Batch,
    event: &InboundEvent,
    meta: &EventMeta,
    now: chrono::DateTime<chrono::Utc>,
    ids: &mut SequentialIds,
    balance: Option<i64>,
) -> (Option<Batch>, Vec<OutboundMessage>) {
    let mut answers = CreditAnswers::new();
    loop {
        match rules.decide(
            Some(batch),
            event,
            meta,
            &mut Env {
                now,
                ids,
                credits: &answers,
            },
        ) {
            Decision::NeedsCredit(q) => {
                let verdict = match balance {
                    Some(b) if q.required() > b => CreditVerdict::Denied {
                        reason: "insufficient_credits".into(),
                        available: b,
                    },
                    _ => CreditVerdict::Allowed { available: 0 },
                };
                answers.insert(q, verdict);
            }
            Decision::Apply(e) => return (Some(e.batch), e.messages),
            Decision::Ignore(_) | Decision::DeadLetter { .. } => return (None, Vec::new()),
        }
    }
}

#[test]
fn every_platform_sample_decodes() {
    let mut decoded = 0;
    let wire = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wire");
    for entry in std::fs::read_dir(wire).unwrap() {
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
fn published_samples() -> Vec<OutboundMessage> {
    let mut out = Vec::new();
    let mut ids = SequentialIds(0);
    let now = chrono::Utc::now();
    let rules = Rules::default();
    for (class_id, balance) in [(None, None), (Some("class-9a"), None), (None, Some(0))] {
        let answers = CreditAnswers::new();
        let mut env = Env {
            now,
            ids: &mut ids,
            credits: &answers,
        };
        let registered = rules
            .register(
                &support::registration(class_id, 3),
                Uuid::new_v4(),
                &mut env,
            )
            .unwrap();
        let mut batch: Batch = registered.batch.clone();
        out.extend(registered.messages);
        let id = batch.id.clone();
        let essays: Vec<EssayRef> = (0..3)
            .map(|i| EssayRef::new(format!("e{i}"), format!("s{i}")))
            .collect();
        let mut send = |batch: &mut Batch, event: InboundEvent, out: &mut Vec<OutboundMessage>| {
            let meta = EventMeta {
                event_id: Uuid::new_v4(),
                correlation_id: Uuid::new_v4(),
                traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            };
            let (next, messages) = decide(&rules, batch, &event, &meta, now, &mut ids, balance);
            if let Some(b) = next {
                *batch = b;
            }
            out.extend(messages);
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
    let answers = CreditAnswers::new();
    let mut env = Env {
        now,
        ids: &mut ids,
        credits: &answers,
    };
    let registered = rules
        .register(&support::registration(None, 1), Uuid::new_v4(), &mut env)
        .unwrap();
    let mut batch = registered.batch;
    for event in [
        InboundEvent::PipelineRequest(upstream::pipeline_request(&batch.id, "nlp", "t")),
        InboundEvent::ValidationErrors(upstream::validation_errors(&batch.id, &[], true, now)),
    ] {
        let meta = EventMeta {
            event_id: Uuid::new_v4(),
            correlation_id: Uuid::new_v4(),
            traceparent: None,
        };
        let (next, messages) = decide(&rules, &batch, &event, &meta, now, &mut ids, None);
        batch = next.unwrap();
        out.extend(messages);
    }
    out
}

#[test]
fn everything_we_publish_validates_against_the_published_schemas() {
    let schemas = schemas();
    let envelope = jsonschema::validator_for(&schemas["envelope"]).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut notification_kinds = std::collections::BTreeSet::new();
    for message in published_samples() {
        {
            let envelope_value = message.envelope();
            let errors: Vec<String> = envelope
                .iter_errors(&envelope_value)
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
            let data = &envelope_value["data"];
            let errors: Vec<String> = validator.iter_errors(data).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{}: {errors:?}\n{data:#}", message.topic);
            assert_eq!(envelope_value["event_type"], message.topic);
            assert_eq!(
                envelope_value["source_service"],
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
    for message in published_samples() {
        let envelope = message.envelope();
        let sample = match message.topic {
            topics::SPELLCHECK_COMMAND => &spell,
            topics::PIPELINE_COMPLETED => &done,
            _ => continue,
        };
        assert_eq!(keys(&envelope), keys(sample));
        assert_eq!(
            keys(&envelope["data"]),
            keys(&sample["data"]),
            "{}",
            message.topic
        );
        if message.topic == topics::SPELLCHECK_COMMAND {
            assert_eq!(
                keys(&envelope["data"]["essays_to_process"][0]),
                keys(&sample["data"]["essays_to_process"][0])
            );
            for key in ["user_id", "org_id"] {
                assert!(
                    envelope["metadata"].get(key).is_some(),
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

fn sample_with(name: &str, mutate: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut value: Value = serde_json::from_slice(&fixture(name)).unwrap();
    mutate(&mut value);
    serde_json::to_vec(&value).unwrap()
}

#[test]
fn what_the_platforms_models_refuse_is_a_decode_error() {
    let request = "client_pipeline_request_cj.json";
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "assignment_id over 100 characters",
            topics::CLIENT_PIPELINE_REQUEST,
            sample_with(request, |v| {
                v["data"]["prompt_payload"]["assignment_id"] = "a".repeat(101).into();
            }),
            "at most 100",
        ),
        (
            "empty assignment_id",
            topics::CLIENT_PIPELINE_REQUEST,
            sample_with(request, |v| {
                v["data"]["prompt_payload"]["assignment_id"] = "  ".into();
            }),
            "must not be empty",
        ),
        (
            "blank user_id",
            topics::CLIENT_PIPELINE_REQUEST,
            sample_with(request, |v| v["data"]["user_id"] = " ".into()),
            "user_id",
        ),
        (
            "retry_reason over 500 characters",
            topics::CLIENT_PIPELINE_REQUEST,
            sample_with(request, |v| {
                v["data"]["retry_reason"] = "r".repeat(501).into();
            }),
            "retry_reason",
        ),
        (
            "NUL in a string",
            topics::PHASE_OUTCOME,
            sample_with("phase_outcome_spellcheck_partial.json", |v| {
                v["data"]["processed_essays"][0]["text_storage_id"] = "store\u{0}0".into();
            }),
            "NUL",
        ),
        (
            "NUL in free-form metadata",
            topics::BATCH_ESSAYS_READY,
            sample_with("batch_essays_ready.json", |v| {
                v["metadata"] = serde_json::json!({"note": "a\u{0}b"});
            }),
            "NUL",
        ),
        (
            "duplicate essay in processed_essays",
            topics::PHASE_OUTCOME,
            sample_with("phase_outcome_spellcheck_partial.json", |v| {
                let first = v["data"]["processed_essays"][0].clone();
                v["data"]["processed_essays"]
                    .as_array_mut()
                    .unwrap()
                    .push(first);
            }),
            "appears twice",
        ),
        (
            "duplicate essay in essays_for_processing",
            topics::CONTENT_PROVISIONING_COMPLETED,
            sample_with("content_provisioning_completed_guest.json", |v| {
                let first = v["data"]["essays_for_processing"][0].clone();
                v["data"]["essays_for_processing"]
                    .as_array_mut()
                    .unwrap()
                    .push(first);
            }),
            "appears twice",
        ),
        (
            "duplicate essay in ready_essays",
            topics::BATCH_ESSAYS_READY,
            sample_with("batch_essays_ready.json", |v| {
                let first = v["data"]["ready_essays"][0].clone();
                v["data"]["ready_essays"]
                    .as_array_mut()
                    .unwrap()
                    .push(first);
            }),
            "appears twice",
        ),
        (
            "duplicate essay in associations",
            topics::STUDENT_ASSOCIATIONS_CONFIRMED,
            sample_with("student_associations_confirmed.json", |v| {
                let first = v["data"]["associations"][0].clone();
                v["data"]["associations"]
                    .as_array_mut()
                    .unwrap()
                    .push(first);
            }),
            "appears twice",
        ),
        (
            "duplicate essay in failed_essays",
            topics::VALIDATION_ERRORS,
            sample_with("validation_errors_critical.json", |v| {
                let first = v["data"]["failed_essays"][0].clone();
                v["data"]["failed_essays"]
                    .as_array_mut()
                    .unwrap()
                    .push(first);
            }),
            "appears twice",
        ),
    ];
    for (name, topic, bytes, mentions) in cases {
        let error = decode(topic, &bytes).expect_err(name);
        assert!(
            matches!(error, DecodeError::InvalidData { .. }),
            "{name}: {error:?}"
        );
        assert!(error.to_string().contains(mentions), "{name}: `{error}`");
    }
}

#[test]
fn the_platforms_defaults_and_stripping_apply() {
    let bytes = sample_with("client_pipeline_request_cj.json", |v| {
        v["data"]["batch_id"] = "  813c9582-e0d6-5f75-9b92-eeaebb610315 ".into();
        v["data"]["requested_pipeline"] = " cj_assessment\n".into();
        v["data"]["prompt_payload"]["assignment_id"] = " assign-1 ".into();
    });
    let InboundEvent::PipelineRequest(r) = decode(topics::CLIENT_PIPELINE_REQUEST, &bytes)
        .unwrap()
        .event
    else {
        panic!("a pipeline request")
    };
    assert_eq!(r.batch_id, "813c9582-e0d6-5f75-9b92-eeaebb610315");
    assert_eq!(r.requested_pipeline, "cj_assessment");
    assert_eq!(
        r.prompt_payload.unwrap().assignment_id.as_deref(),
        Some("assign-1")
    );
    let bytes = sample_with("student_associations_confirmed.json", |v| {
        for a in v["data"]["associations"].as_array_mut().unwrap() {
            a.as_object_mut().unwrap().remove("validated_at");
        }
    });
    let InboundEvent::AssociationsConfirmed(c) =
        decode(topics::STUDENT_ASSOCIATIONS_CONFIRMED, &bytes)
            .unwrap()
            .event
    else {
        panic!("associations")
    };
    let age = chrono::Utc::now() - c.associations[0].validated_at;
    assert!(
        age.num_seconds().abs() < 60,
        "an absent validated_at means now"
    );
}

const SAMPLES: [(&str, &str); 7] = [
    ("batch_essays_ready.json", topics::BATCH_ESSAYS_READY),
    (
        "client_pipeline_request_cj.json",
        topics::CLIENT_PIPELINE_REQUEST,
    ),
    (
        "content_provisioning_completed_guest.json",
        topics::CONTENT_PROVISIONING_COMPLETED,
    ),
    ("phase_outcome_cj_failed.json", topics::PHASE_OUTCOME),
    (
        "phase_outcome_spellcheck_partial.json",
        topics::PHASE_OUTCOME,
    ),
    (
        "student_associations_confirmed.json",
        topics::STUDENT_ASSOCIATIONS_CONFIRMED,
    ),
    ("validation_errors_critical.json", topics::VALIDATION_ERRORS),
];

/// Replaces one value somewhere in `value` (picked by `at`) with `with`.
fn mutate(value: &mut Value, at: usize, with: &Value) {
    fn paths(v: &Value, out: &mut Vec<Vec<String>>, here: Vec<String>) {
        out.push(here.clone());
        match v {
            Value::Object(m) => {
                for (k, c) in m {
                    let mut p = here.clone();
                    p.push(k.clone());
                    paths(c, out, p);
                }
            }
            Value::Array(a) => {
                for (i, c) in a.iter().enumerate() {
                    let mut p = here.clone();
                    p.push(i.to_string());
                    paths(c, out, p);
                }
            }
            _ => {}
        }
    }
    let mut all = Vec::new();
    paths(value, &mut all, Vec::new());
    let path = &all[at % all.len()];
    let mut target = value;
    for step in path {
        target = match target {
            Value::Object(m) => m.get_mut(step).unwrap(),
            Value::Array(a) => &mut a[step.parse::<usize>().unwrap()],
            _ => unreachable!(),
        };
    }
    *target = with.clone();
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoders_never_panic_on_mutated_samples(
        sample in 0..SAMPLES.len(),
        at in any::<usize>(),
        with in any_json(),
    ) {
        let (name, topic) = SAMPLES[sample];
        let mut value: Value = serde_json::from_slice(&fixture(name)).unwrap();
        mutate(&mut value, at, &with);
        let bytes = serde_json::to_vec(&value).unwrap();
        for t in bos::contracts::topics::CONSUMED {
            // Any outcome but a panic; a failure names what is wrong.
            if let Err(e) = decode(t, &bytes) {
                prop_assert!(!e.to_string().is_empty());
            }
        }
        let _ = topic;
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for t in bos::contracts::topics::CONSUMED {
            prop_assert!(decode(t, &bytes).is_err() || serde_json::from_slice::<Value>(&bytes).is_ok());
        }
    }
}
