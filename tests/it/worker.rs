//! The worker through Kafka only: the production application (consumer,
//! relay, rules) against PostgreSQL and librdkafka's mock cluster.

use std::time::Duration;

use bos::contracts::{
    topics, BatchStatus, CourseCode, EssayRef, PhaseName, PipelineExecutionStatus,
};
use bos::sim::upstream;
use bos::store::UnitOfWork;
use serde_json::json;
use uuid::Uuid;

use crate::support::flow::{command_essays, correlation, data, Flow};
use crate::support::{essays, fixture, new_batch, TEACHER};

#[tokio::test]
async fn guest_flow_with_partial_spellcheck() {
    let flow = Flow::start().await;
    let (batch_id, corr) = flow.register(None, 4).await;
    let registered = flow
        .observer
        .wait_for(topics::BATCH_ESSAYS_REGISTERED, 1)
        .await;
    assert_eq!(registered[0].key.as_deref(), Some(batch_id.as_str()));
    flow.provision(&batch_id, corr, 4).await;
    let request_corr = Uuid::new_v4();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let request = upstream::envelope_json(
        topics::CLIENT_PIPELINE_REQUEST,
        "api_gateway_service",
        Uuid::new_v4(),
        request_corr,
        chrono::Utc::now(),
        upstream::pipeline_request(&batch_id, "cj_assessment", TEACHER),
    );
    flow.up
        .send_raw(
            topics::CLIENT_PIPELINE_REQUEST,
            &batch_id,
            &request,
            &[("traceparent", traceparent)],
        )
        .await;
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(
        correlation(&spell[0]),
        request_corr,
        "commands carry the run's correlation id"
    );
    assert_eq!(command_essays(&spell[0]).len(), 4);
    assert_eq!(
        spell[0].header("traceparent"),
        Some(traceparent),
        "the trace travels in the header"
    );
    assert_eq!(
        spell[0].value["metadata"]["traceparent"], traceparent,
        "and in the command metadata"
    );
    flow.answer(&batch_id, PhaseName::Spellcheck, &spell[0], &["essay-3"])
        .await;
    let cj = flow
        .observer
        .wait_for(topics::CJ_ASSESSMENT_COMMAND, 1)
        .await;
    assert_eq!(correlation(&cj[0]), request_corr);
    assert_eq!(
        command_essays(&cj[0]),
        (0..3)
            .map(|i| (format!("essay-{i}"), format!("store-{i}-corrected")))
            .collect::<Vec<_>>()
    );
    flow.answer(&batch_id, PhaseName::CjAssessment, &cj[0], &[])
        .await;
    let done = flow.observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    let d = data(&done[0]);
    assert_eq!(
        d["completed_phases"],
        json!(["spellcheck", "cj_assessment"])
    );
    assert_eq!(
        (
            d["successful_essay_count"].as_i64(),
            d["failed_essay_count"].as_i64()
        ),
        (Some(3), Some(1))
    );
    assert_eq!(d["final_status"], "completed_with_failures");
    assert_eq!(correlation(&done[0]), request_corr);
    flow.observer
        .wait_for(topics::TEACHER_NOTIFICATION, 2)
        .await;
    flow.assert_all_valid();
    let batch = flow.batch(&batch_id).await;
    assert_eq!(batch.status, BatchStatus::ReadyForPipelineExecution);
    // Every phase change went to the log in the same transaction.
    let history = flow.repo().phase_history(&batch_id).await.unwrap();
    let spell_changes: Vec<_> = history
        .iter()
        .filter(|h| h.phase == PhaseName::Spellcheck)
        .map(|h| h.new_status)
        .collect();
    assert_eq!(
        spell_changes,
        [
            PipelineExecutionStatus::DispatchInitiated,
            PipelineExecutionStatus::CompletedWithPartialSuccess
        ]
    );
    flow.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn every_event_twice_gives_the_same_outputs() {
    let flow = Flow::start().await;
    let (batch_id, corr) = flow.register(None, 2).await;
    let twice = |topic: &'static str, data: serde_json::Value, corr: Uuid| {
        let up = &flow.up;
        let batch_id = batch_id.clone();
        async move {
            let bytes = upstream::envelope_json(
                topic,
                "essay_lifecycle_service",
                Uuid::new_v4(),
                corr,
                chrono::Utc::now(),
                data,
            );
            up.send_raw(topic, &batch_id, &bytes, &[]).await;
            up.send_raw(topic, &batch_id, &bytes, &[]).await;
        }
    };
    twice(
        topics::CONTENT_PROVISIONING_COMPLETED,
        serde_json::to_value(upstream::content_provisioned(
            &batch_id,
            CourseCode::Eng5,
            "t",
            &essays(2),
        ))
        .unwrap(),
        corr,
    )
    .await;
    twice(
        topics::CLIENT_PIPELINE_REQUEST,
        serde_json::to_value(upstream::pipeline_request(&batch_id, "spellcheck", "t")).unwrap(),
        Uuid::new_v4(),
    )
    .await;
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    let outcome = upstream::phase_outcome(
        &batch_id,
        PhaseName::Spellcheck,
        &essays(2),
        &[],
        correlation(&spell[0]),
    );
    twice(
        topics::PHASE_OUTCOME,
        serde_json::to_value(outcome).unwrap(),
        correlation(&spell[0]),
    )
    .await;
    flow.observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    // A marker after the duplicates: once its effect shows, the duplicates were handled.
    flow.request(&batch_id, "student_matching").await;
    flow.observer.wait_for(topics::PIPELINE_DENIED, 1).await;
    assert_eq!(flow.observer.on(topics::SPELLCHECK_COMMAND).len(), 1);
    assert_eq!(flow.observer.on(topics::PIPELINE_COMPLETED).len(), 1);
    assert_eq!(
        flow.observer.on(topics::TEACHER_NOTIFICATION).len(),
        3,
        "started + completed + the marker's denial, once each"
    );
    assert!(flow.app.counter("duplicates", &[]) >= 3);
    flow.assert_all_valid();
    flow.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn poison_messages_go_to_the_dead_letter_topic() {
    let flow = Flow::start().await;
    let (dlq, dlq_name) = flow.dead_letters(topics::PHASE_OUTCOME);
    let (batch_id, corr) = flow.register(None, 1).await;
    flow.up
        .send_raw(
            topics::PHASE_OUTCOME,
            &batch_id,
            b"{not json",
            &[("x-origin", "test")],
        )
        .await;
    let unknown = upstream::phase_outcome(
        "no-such-batch",
        PhaseName::Spellcheck,
        &essays(1),
        &[],
        corr,
    );
    flow.up
        .send(topics::PHASE_OUTCOME, "no-such-batch", corr, unknown)
        .await;
    // The partition keeps flowing: a good event behind the poison is applied.
    flow.provision(&batch_id, corr, 1).await;
    flow.request(&batch_id, "spellcheck").await;
    flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    let mut letters = dlq.wait_for(&dlq_name, 2).await;
    letters.sort_by_key(|l| l.header("dlq.reason") != Some("decode_error"));
    assert_eq!(letters[0].raw, b"{not json");
    assert_eq!(letters[0].header("dlq.reason"), Some("decode_error"));
    assert_eq!(
        letters[0].header("x-origin"),
        Some("test"),
        "original headers are kept"
    );
    assert_eq!(
        letters[0].header("dlq.source.topic"),
        Some(flow.kafka.topic(topics::PHASE_OUTCOME).as_str())
    );
    assert!(
        letters[0].header("dlq.source.offset").is_some()
            && letters[0].header("dlq.failed_at").is_some()
    );
    assert_eq!(letters[1].header("dlq.reason"), Some("unknown_batch"));
    assert_eq!(letters[1].key.as_deref(), Some("no-such-batch"));
    assert_eq!(flow.app.counter("dead_letters", &["decode_error"]), 1);
    assert_eq!(flow.app.counter("dead_letters", &["unknown_batch"]), 1);
    flow.finish(vec![dlq]).await.unwrap();
}

async fn regular_flow(essays_ready_first: bool) {
    let flow = Flow::start().await;
    let (batch_id, corr) = flow.register(Some("class-9a"), 2).await;
    let request_corr = Uuid::new_v4();
    // Requested before the batch is ready: parked, started later by itself.
    flow.up
        .send(
            topics::CLIENT_PIPELINE_REQUEST,
            &batch_id,
            request_corr,
            upstream::pipeline_request(&batch_id, "nlp", TEACHER),
        )
        .await;
    flow.provision(&batch_id, corr, 2).await;
    let matching = flow
        .observer
        .wait_for(topics::STUDENT_MATCHING_COMMAND, 1)
        .await;
    assert_eq!(matching[0].value["data"]["class_id"], "class-9a");
    let now = chrono::Utc::now();
    let ids: Vec<String> = essays(2).iter().map(|e| e.essay_id.clone()).collect();
    let confirm =
        upstream::associations_confirmed(&batch_id, "class-9a", CourseCode::Eng5, &ids, now);
    let ready = upstream::essays_ready(&batch_id, CourseCode::Eng5, "REGULAR", &essays(2), now);
    // Different topics have no order between them: wait for each effect.
    if essays_ready_first {
        flow.up
            .send(topics::BATCH_ESSAYS_READY, &batch_id, corr, ready)
            .await;
        flow.wait_for_batch(&batch_id, |b| b.orchestration.essays_ready_received)
            .await;
        flow.up
            .send(
                topics::STUDENT_ASSOCIATIONS_CONFIRMED,
                &batch_id,
                corr,
                confirm,
            )
            .await;
    } else {
        flow.up
            .send(
                topics::STUDENT_ASSOCIATIONS_CONFIRMED,
                &batch_id,
                corr,
                confirm,
            )
            .await;
        flow.wait_for_batch(&batch_id, |b| {
            b.status == BatchStatus::StudentValidationCompleted
        })
        .await;
        flow.up
            .send(topics::BATCH_ESSAYS_READY, &batch_id, corr, ready)
            .await;
    }
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(
        correlation(&spell[0]),
        request_corr,
        "the parked request's own correlation id"
    );
    flow.answer(&batch_id, PhaseName::Spellcheck, &spell[0], &[])
        .await;
    let nlp = flow.observer.wait_for(topics::NLP_COMMAND, 1).await;
    flow.answer(&batch_id, PhaseName::Nlp, &nlp[0], &[]).await;
    let done = flow.observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    assert_eq!(data(&done[0])["final_status"], "completed_successfully");
    assert_eq!(
        data(&done[0])["completed_phases"],
        json!(["spellcheck", "nlp"])
    );
    flow.assert_all_valid();
    flow.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn regular_flow_confirmation_first() {
    regular_flow(false).await;
}

#[tokio::test]
async fn regular_flow_essays_ready_first() {
    regular_flow(true).await;
}

#[tokio::test]
async fn critical_phase_failure_ends_the_run() {
    let flow = Flow::start().await;
    let (batch_id, corr) = flow.register(None, 2).await;
    flow.provision(&batch_id, corr, 2).await;
    flow.request(&batch_id, "ai_feedback").await;
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    flow.answer(
        &batch_id,
        PhaseName::Spellcheck,
        &spell[0],
        &["essay-0", "essay-1"],
    )
    .await;
    let done = flow.observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    let d = data(&done[0]);
    assert_eq!(d["final_status"], "failed_critically");
    assert_eq!(d["completed_phases"], json!([]));
    assert_eq!(
        (
            d["successful_essay_count"].as_i64(),
            d["failed_essay_count"].as_i64()
        ),
        (Some(0), Some(2))
    );
    let state = flow.batch(&batch_id).await.pipeline;
    assert_eq!(
        state.nlp.status,
        PipelineExecutionStatus::SkippedDueToDependencyFailure
    );
    assert_eq!(
        state.ai_feedback.status,
        PipelineExecutionStatus::SkippedDueToDependencyFailure
    );
    assert!(flow.observer.on(topics::NLP_COMMAND).is_empty());
    flow.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn critical_validation_errors_deny_the_parked_request() {
    let flow = Flow::start().await;
    let (batch_id, corr) = flow.register(None, 2).await;
    flow.request(&batch_id, "cj_assessment").await;
    let errors =
        upstream::validation_errors(&batch_id, &["essay-0".into()], true, chrono::Utc::now());
    flow.up
        .send(topics::VALIDATION_ERRORS, &batch_id, corr, errors)
        .await;
    let denied = flow.observer.wait_for(topics::PIPELINE_DENIED, 1).await;
    assert_eq!(data(&denied[0])["denial_reason"], "batch_failed");
    let batch = flow.batch(&batch_id).await;
    assert_eq!(batch.status, BatchStatus::FailedCritically);
    assert!(batch.parked.is_none());
    flow.assert_all_valid();
    flow.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn sequential_pipelines_and_stale_outcomes() {
    let flow = Flow::start().await;
    let (batch_id, corr) = flow.register(None, 3).await;
    flow.provision(&batch_id, corr, 3).await;
    flow.request(&batch_id, "nlp").await;
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    flow.answer(&batch_id, PhaseName::Spellcheck, &spell[0], &["essay-2"])
        .await;
    let nlp = flow.observer.wait_for(topics::NLP_COMMAND, 1).await;
    flow.answer(&batch_id, PhaseName::Nlp, &nlp[0], &[]).await;
    flow.observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    // CJ reuses the finished spellcheck: only the survivors, corrected.
    let cj = flow.request_cj_reusing_spellcheck(&batch_id).await;
    assert_eq!(
        command_essays(&cj),
        [
            ("essay-0".to_owned(), "store-0-corrected".to_owned()),
            ("essay-1".to_owned(), "store-1-corrected".to_owned())
        ]
    );
    // Stale outcomes of the first run, under new event ids.
    flow.answer(&batch_id, PhaseName::Spellcheck, &spell[0], &[])
        .await;
    flow.answer(&batch_id, PhaseName::Nlp, &nlp[0], &[]).await;
    flow.answer(&batch_id, PhaseName::CjAssessment, &cj, &[])
        .await;
    let done = flow.observer.wait_for(topics::PIPELINE_COMPLETED, 2).await;
    assert_eq!(data(&done[1])["completed_phases"], json!(["cj_assessment"]));
    assert_eq!(data(&done[1])["successful_essay_count"], 2);
    let state = flow.batch(&batch_id).await.pipeline;
    assert_eq!(
        state.spellcheck.essay_counts.successful, 2,
        "the stale outcome changed nothing"
    );
    assert_eq!(flow.observer.on(topics::PIPELINE_COMPLETED).len(), 2);
    flow.assert_all_valid();
    flow.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn the_platform_samples_are_accepted() {
    let flow = Flow::start().await;
    let dlq_topics: Vec<String> = topics::CONSUMED
        .iter()
        .map(|t| format!("{}{}", flow.kafka.topic(t), topics::DLQ_SUFFIX))
        .collect();
    let dlq = crate::support::kafka::Observer::start(&flow.kafka, &dlq_topics);
    // The batch the samples speak of, registered as a GUEST batch with a prompt.
    let (mut batch, _) = new_batch(0);
    batch.id = "813c9582-e0d6-5f75-9b92-eeaebb610315".into();
    batch.pipeline.batch_id = batch.id.clone();
    flow.repo()
        .commit(UnitOfWork::create(batch.clone(), Vec::new()))
        .await
        .unwrap();
    for (topic, file) in [
        (
            topics::CONTENT_PROVISIONING_COMPLETED,
            "content_provisioning_completed_guest.json",
        ),
        (
            topics::CLIENT_PIPELINE_REQUEST,
            "client_pipeline_request_cj.json",
        ),
    ] {
        flow.up
            .send_raw(topic, &batch.id, &fixture(&format!("wire/{file}")), &[])
            .await;
    }
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(
        correlation(&spell[0]).to_string(),
        "792975bd-5be4-58ca-9db0-60db211cd882"
    );
    flow.up
        .send_raw(
            topics::PHASE_OUTCOME,
            &batch.id,
            &fixture("wire/phase_outcome_spellcheck_partial.json"),
            &[],
        )
        .await;
    let cj = flow
        .observer
        .wait_for(topics::CJ_ASSESSMENT_COMMAND, 1)
        .await;
    assert_eq!(command_essays(&cj[0]).len(), 3);
    assert_eq!(cj[0].value["data"]["assignment_id"], "assign-1");
    flow.up
        .send_raw(
            topics::PHASE_OUTCOME,
            &batch.id,
            &fixture("wire/phase_outcome_cj_failed.json"),
            &[],
        )
        .await;
    let done = flow.observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    let d = data(&done[0]);
    assert_eq!(d["completed_phases"], json!(["spellcheck"]));
    assert_eq!(
        (
            d["successful_essay_count"].as_i64(),
            d["failed_essay_count"].as_i64()
        ),
        (Some(0), Some(4))
    );
    assert_eq!(d["final_status"], "failed_critically");
    for (topic, file) in [
        (
            topics::STUDENT_ASSOCIATIONS_CONFIRMED,
            "student_associations_confirmed.json",
        ),
        (topics::BATCH_ESSAYS_READY, "batch_essays_ready.json"),
        (topics::VALIDATION_ERRORS, "validation_errors_critical.json"),
    ] {
        flow.up
            .send_raw(topic, &batch.id, &fixture(&format!("wire/{file}")), &[])
            .await;
    }
    for event_id in [
        "ff3215a1-4563-58c4-a80f-e54ab3a55aae",
        "b4adfe4d-bcb5-5aab-9f88-3a549e7b1f37",
        "0177559d-b0c5-5876-a4f7-8f292ec9d41a",
        "ea9446cb-857b-5ebe-8a93-91360375ce22",
        "2b63e4bb-5113-509d-8db7-28416eb984c8",
        "2245713d-fbb3-51eb-9c17-18e81d634a1c",
        "3f6ecf7a-7d8d-55b1-aaf1-e5731598580b",
    ] {
        flow.wait_processed(event_id.parse().unwrap()).await;
    }
    let b = flow.batch(&batch.id).await;
    assert_eq!(
        b.validation_errors.len(),
        1,
        "validation errors after a run are recorded"
    );
    assert_eq!(
        b.status,
        BatchStatus::ReadyForPipelineExecution,
        "and change nothing else"
    );
    assert!(
        dlq.all().is_empty(),
        "no sample was dead-lettered: {:?}",
        dlq.all()
    );
    flow.assert_all_valid();
    flow.finish(vec![dlq]).await.unwrap();
}

#[tokio::test]
async fn dead_letters_replay_into_their_topic() {
    let flow = Flow::start().await;
    let (dlq, dlq_name) = flow.dead_letters(topics::CLIENT_PIPELINE_REQUEST);
    // A request for a batch nobody knows yet: dead-lettered.
    let (mut early, _) = new_batch(1);
    let early_id = early.id.clone();
    flow.send_request(
        &early_id,
        upstream::pipeline_request(&early_id, "spellcheck", "t"),
    )
    .await;
    let letters = dlq.wait_for(&dlq_name, 1).await;
    assert_eq!(letters[0].header("dlq.reason"), Some("unknown_batch"));
    let listed = bos::ops::dlq::list(&flow.kafka, topics::CLIENT_PIPELINE_REQUEST, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].headers["dlq.reason"], "unknown_batch");
    assert_eq!(listed[0].key.as_deref(), Some(early_id.as_str()));
    // The batch arrives; replaying the letter now starts its pipeline.
    early.status = BatchStatus::ReadyForPipelineExecution;
    early.essays = vec![bos::domain::BatchEssay::from_ref(&EssayRef::new("x", "s"))];
    flow.repo()
        .commit(UnitOfWork::create(early, Vec::new()))
        .await
        .unwrap();
    let producer: rdkafka::producer::FutureProducer =
        bos::kafka::producer_config(&flow.kafka).create().unwrap();
    let idle = Duration::from_secs(30);
    let first = bos::ops::dlq::replay(
        &flow.kafka,
        &producer,
        topics::CLIENT_PIPELINE_REQUEST,
        None,
        idle,
    )
    .await
    .unwrap();
    assert_eq!(first.replayed, 1);
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(spell[0].key.as_deref(), Some(early_id.as_str()));
    let second = bos::ops::dlq::replay(
        &flow.kafka,
        &producer,
        topics::CLIENT_PIPELINE_REQUEST,
        None,
        idle,
    )
    .await
    .unwrap();
    assert_eq!(
        second.replayed, 0,
        "a second replay continues where the first stopped"
    );
    drop(producer);
    flow.finish(vec![dlq]).await.unwrap();
}

#[tokio::test]
async fn a_transient_failure_is_retried_not_skipped() {
    use crate::support::faulty::{Fault, Faulty};
    let faulty = std::sync::Arc::new(std::sync::Mutex::new(None));
    let keep = faulty.clone();
    let flow = Flow::with(crate::support::flow::FlowOptions {
        wrap: Some(Box::new(move |inner| {
            let f = Faulty::new(inner);
            *keep.lock().unwrap() = Some(f.clone());
            f
        })),
        ..Default::default()
    })
    .await;
    let faulty = faulty.lock().unwrap().clone().unwrap();
    let (batch_id, corr) = flow.register(None, 1).await;
    flow.provision(&batch_id, corr, 1).await;
    flow.wait_for_batch(&batch_id, |b| {
        b.status == BatchStatus::ReadyForPipelineExecution
    })
    .await;
    faulty.inject(&batch_id, Fault::Transient, 3);
    flow.request(&batch_id, "spellcheck").await;
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(faulty.injected(), 3, "the fault fired");
    assert!(flow.app.counter("apply_retries", &["transient"]) >= 3);
    flow.answer(&batch_id, PhaseName::Spellcheck, &spell[0], &[])
        .await;
    flow.observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    assert_eq!(
        flow.observer.on(topics::SPELLCHECK_COMMAND).len(),
        1,
        "the retried event is applied once"
    );
    flow.finish(vec![]).await.unwrap();
}
