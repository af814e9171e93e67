//! The worker through Kafka only: the real consumer, relay and rules against
//! PostgreSQL and librdkafka's mock cluster.

mod common;

use std::sync::Arc;

use bos::contracts::{topics, CourseCode, EssayRef, PhaseName};
use bos::domain::Rules;
use bos::store::{PgRepository, Repository};
use bos::upstream;
use common::kafka::{kafka_settings, start_worker, Cluster, Observer, Seen, TestWorker, Upstream};
use serde_json::Value;
use uuid::Uuid;

async fn pg(pool: sqlx::PgPool) -> Arc<dyn Repository> {
    let repo = PgRepository::from_pool(pool);
    repo.migrate().await.unwrap();
    Arc::new(repo)
}

/// Registers a batch through `POST /v1/batches/register`.
async fn register(
    repo: &Arc<dyn Repository>,
    class_id: Option<&str>,
    essays: i64,
) -> (String, Uuid) {
    let state = common::http::state(repo.clone(), Rules::default(), true);
    let body = serde_json::to_value(common::registration(class_id, essays)).unwrap();
    let (status, reply) =
        common::http::call(&state, "POST", "/v1/batches/register", &[], Some(body)).await;
    assert_eq!(status, axum::http::StatusCode::ACCEPTED, "{reply}");
    let id = reply["batch_id"].as_str().unwrap().to_owned();
    let correlation = reply["correlation_id"].as_str().unwrap().parse().unwrap();
    (id, correlation)
}

fn essays(n: usize) -> Vec<EssayRef> {
    (0..n)
        .map(|i| EssayRef::new(format!("essay-{i}"), format!("store-{i}")))
        .collect()
}

/// The essay lifecycle service reports `n` essays provisioned for a GUEST batch.
async fn provision(up: &Upstream, batch_id: &str, corr: Uuid, n: usize) {
    let content = upstream::content_provisioned(batch_id, CourseCode::Eng5, "t", &essays(n));
    up.send(
        topics::CONTENT_PROVISIONING_COMPLETED,
        batch_id,
        corr,
        content,
    )
    .await;
}

/// The API gateway asks for `target` under a fresh correlation id.
async fn request(up: &Upstream, batch_id: &str, target: &str) {
    let request = upstream::pipeline_request(batch_id, target, "t");
    up.send(
        topics::CLIENT_PIPELINE_REQUEST,
        batch_id,
        Uuid::new_v4(),
        request,
    )
    .await;
}

fn command_essays(seen: &Seen) -> Vec<(String, String)> {
    seen.value["data"]["essays_to_process"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["essay_id"].as_str().unwrap().to_owned(),
                e["text_storage_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn correlation(seen: &Seen) -> Uuid {
    seen.value["correlation_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Answers a command like the essay lifecycle service: essays in `fail` fail.
async fn answer(up: &Upstream, batch_id: &str, phase: PhaseName, command: &Seen, fail: &[&str]) {
    let dispatched: Vec<EssayRef> =
        serde_json::from_value(command.value["data"]["essays_to_process"].clone()).unwrap();
    let processed: Vec<EssayRef> = dispatched
        .iter()
        .filter(|e| !fail.contains(&e.essay_id.as_str()))
        .cloned()
        .collect();
    let failed: Vec<String> = fail.iter().map(|s| s.to_string()).collect();
    let corr = correlation(command);
    let outcome = upstream::phase_outcome(batch_id, phase, &processed, &failed, corr);
    up.send(topics::PHASE_OUTCOME, batch_id, corr, outcome)
        .await;
}

fn assert_all_valid(observer: &Observer) {
    for seen in observer.all() {
        common::assert_valid_published(&seen.topic, &seen.value);
        assert_eq!(
            seen.header("event_id"),
            seen.value["event_id"].as_str(),
            "event_id header on {}",
            seen.topic
        );
        assert_eq!(seen.header("event_type"), Some(seen.topic.as_str()));
        assert_eq!(
            seen.header("trace_id"),
            seen.value["correlation_id"].as_str()
        );
        assert_eq!(
            seen.header("source_service"),
            Some("batch_orchestrator_service")
        );
        assert_eq!(seen.header("content_type"), Some("application/json"));
        assert!(seen.header("occurred_at").is_some() && seen.header("schema_version") == Some("1"));
    }
}

async fn setup(pool: sqlx::PgPool) -> (Cluster, TestWorker, Upstream, Observer) {
    let cluster = Cluster::start().await;
    let kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 3).await;
    let repo = pg(pool).await;
    let observer = Observer::published(&kafka);
    let worker = start_worker(&kafka, repo, Rules::default());
    let up = Upstream::new(&kafka);
    (cluster, worker, up, observer)
}

/// Stops every Kafka client before the cluster goes away (a client closing
/// against a vanished broker waits for its timeouts).
async fn finish(cluster: Cluster, worker: TestWorker, up: Upstream, observers: Vec<Observer>) {
    worker.stop().await;
    for o in observers {
        o.stop().await;
    }
    drop(up);
    drop(cluster);
}

#[tokio::test]
async fn guest_flow_with_partial_spellcheck() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let (cluster, worker, up, observer) = setup(pool).await;
    let (batch_id, corr) = register(&worker.repo, None, 4).await;
    let registered = observer.wait_for(topics::BATCH_ESSAYS_REGISTERED, 1).await;
    assert_eq!(registered[0].key.as_deref(), Some(batch_id.as_str()));

    up.send(
        topics::CONTENT_PROVISIONING_COMPLETED,
        &batch_id,
        corr,
        upstream::content_provisioned(&batch_id, CourseCode::Eng5, "teacher-anna", &essays(4)),
    )
    .await;
    let request_corr = Uuid::new_v4();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let request = upstream::envelope_json(
        topics::CLIENT_PIPELINE_REQUEST,
        "api_gateway_service",
        Uuid::new_v4(),
        request_corr,
        chrono::Utc::now(),
        upstream::pipeline_request(&batch_id, "cj_assessment", "teacher-anna"),
    );
    up.send_raw(
        topics::CLIENT_PIPELINE_REQUEST,
        &batch_id,
        &request,
        &[("traceparent", traceparent)],
    )
    .await;

    let spell = observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
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
    answer(
        &up,
        &batch_id,
        PhaseName::Spellcheck,
        &spell[0],
        &["essay-3"],
    )
    .await;

    let cj = observer.wait_for(topics::CJ_ASSESSMENT_COMMAND, 1).await;
    assert_eq!(
        command_essays(&cj[0]),
        (0..3)
            .map(|i| (format!("essay-{i}"), format!("store-{i}-corrected")))
            .collect::<Vec<_>>()
    );
    answer(&up, &batch_id, PhaseName::CjAssessment, &cj[0], &[]).await;

    let done = observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    let data = &done[0].value["data"];
    assert_eq!(
        data["completed_phases"],
        serde_json::json!(["spellcheck", "cj_assessment"])
    );
    assert_eq!(
        (
            data["successful_essay_count"].as_i64(),
            data["failed_essay_count"].as_i64()
        ),
        (Some(3), Some(1))
    );
    assert_eq!(data["final_status"], "completed_with_failures");
    observer.wait_for(topics::TEACHER_NOTIFICATION, 2).await;
    assert_all_valid(&observer);
    let batch = worker
        .repo
        .get_batch_by_id(&batch_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        batch.status,
        bos::contracts::BatchStatus::ReadyForPipelineExecution
    );
    finish(cluster, worker, up, vec![observer]).await;
}

#[tokio::test]
async fn every_event_twice_gives_the_same_outputs() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let (cluster, worker, up, observer) = setup(pool).await;
    let (batch_id, corr) = register(&worker.repo, None, 2).await;
    let twice = |topic: &'static str, data: Value, corr: Uuid| {
        let up = &up;
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
    let spell = observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
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
    observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    // A marker event after the duplicates: once its effect shows, the duplicates were handled.
    let marker = upstream::pipeline_request(&batch_id, "student_matching", "t");
    up.send(
        topics::CLIENT_PIPELINE_REQUEST,
        &batch_id,
        Uuid::new_v4(),
        marker,
    )
    .await;
    observer.wait_for(topics::PIPELINE_DENIED, 1).await;
    assert_eq!(observer.on(topics::SPELLCHECK_COMMAND).len(), 1);
    assert_eq!(observer.on(topics::PIPELINE_COMPLETED).len(), 1);
    assert_eq!(
        observer.on(topics::TEACHER_NOTIFICATION).len(),
        2,
        "started + completed, once each"
    );
    assert_all_valid(&observer);
    finish(cluster, worker, up, vec![observer]).await;
}

#[tokio::test]
async fn poison_messages_go_to_the_dead_letter_topic() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let (cluster, worker, up, observer) = setup(pool).await;
    let dlq_topic = worker
        .kafka
        .topic(&format!("{}{}", topics::PHASE_OUTCOME, topics::DLQ_SUFFIX));
    let dlq = Observer::start(&worker.kafka, std::slice::from_ref(&dlq_topic));
    let (batch_id, corr) = register(&worker.repo, None, 1).await;
    up.send_raw(
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
    up.send(topics::PHASE_OUTCOME, "no-such-batch", corr, unknown)
        .await;
    // The partition keeps flowing: a good event behind the poison is applied.
    provision(&up, &batch_id, corr, 1).await;
    up.send(
        topics::CLIENT_PIPELINE_REQUEST,
        &batch_id,
        corr,
        upstream::pipeline_request(&batch_id, "spellcheck", "t"),
    )
    .await;
    observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    let mut letters = dlq
        .wait_for(
            &format!("{}{}", topics::PHASE_OUTCOME, topics::DLQ_SUFFIX),
            2,
        )
        .await;
    // Different keys, different source partitions: either may come first.
    letters.sort_by_key(|l| l.header("dlq.reason") != Some("decode_error"));
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0].raw, b"{not json");
    assert_eq!(letters[0].header("dlq.reason"), Some("decode_error"));
    assert_eq!(
        letters[0].header("x-origin"),
        Some("test"),
        "original headers are kept"
    );
    assert_eq!(
        letters[0].header("dlq.source.topic"),
        Some(worker.kafka.topic(topics::PHASE_OUTCOME).as_str())
    );
    assert!(
        letters[0].header("dlq.source.offset").is_some()
            && letters[0].header("dlq.failed_at").is_some()
    );
    assert_eq!(letters[1].header("dlq.reason"), Some("unknown_batch"));
    assert_eq!(letters[1].key.as_deref(), Some("no-such-batch"));
    finish(cluster, worker, up, vec![observer, dlq]).await;
}

/// Waits until the stored batch satisfies `done` (30 s at most).
async fn wait_for_batch(
    repo: &Arc<dyn Repository>,
    id: &str,
    done: impl Fn(&bos::domain::Batch) -> bool,
) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if repo
            .get_batch_by_id(id)
            .await
            .unwrap()
            .is_some_and(|b| done(&b))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "batch {id} never reached the expected state"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

async fn regular_flow(essays_ready_first: bool, pool: sqlx::PgPool) {
    let (cluster, worker, up, observer) = setup(pool).await;
    let (batch_id, corr) = register(&worker.repo, Some("class-9a"), 2).await;
    let request_corr = Uuid::new_v4();
    // Requested before the batch is ready: parked, started later by itself.
    up.send(
        topics::CLIENT_PIPELINE_REQUEST,
        &batch_id,
        request_corr,
        upstream::pipeline_request(&batch_id, "nlp", "teacher-anna"),
    )
    .await;
    up.send(
        topics::CONTENT_PROVISIONING_COMPLETED,
        &batch_id,
        corr,
        upstream::content_provisioned(&batch_id, CourseCode::Eng5, "teacher-anna", &essays(2)),
    )
    .await;
    let matching = observer.wait_for(topics::STUDENT_MATCHING_COMMAND, 1).await;
    assert_eq!(matching[0].value["data"]["class_id"], "class-9a");
    let now = chrono::Utc::now();
    let ids: Vec<String> = essays(2).iter().map(|e| e.essay_id.clone()).collect();
    let confirm =
        upstream::associations_confirmed(&batch_id, "class-9a", CourseCode::Eng5, &ids, now);
    let ready = upstream::essays_ready(&batch_id, CourseCode::Eng5, "REGULAR", &essays(2), now);
    // Different topics have no order between them: wait for each effect.
    if essays_ready_first {
        up.send(topics::BATCH_ESSAYS_READY, &batch_id, corr, ready)
            .await;
        wait_for_batch(&worker.repo, &batch_id, |b| {
            b.orchestration.essays_ready_received
        })
        .await;
        up.send(
            topics::STUDENT_ASSOCIATIONS_CONFIRMED,
            &batch_id,
            corr,
            confirm,
        )
        .await;
    } else {
        up.send(
            topics::STUDENT_ASSOCIATIONS_CONFIRMED,
            &batch_id,
            corr,
            confirm,
        )
        .await;
        wait_for_batch(&worker.repo, &batch_id, |b| {
            b.status == bos::contracts::BatchStatus::StudentValidationCompleted
        })
        .await;
        up.send(topics::BATCH_ESSAYS_READY, &batch_id, corr, ready)
            .await;
    }
    let spell = observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(
        correlation(&spell[0]),
        request_corr,
        "the parked request's own correlation id"
    );
    answer(&up, &batch_id, PhaseName::Spellcheck, &spell[0], &[]).await;
    let nlp = observer.wait_for(topics::NLP_COMMAND, 1).await;
    answer(&up, &batch_id, PhaseName::Nlp, &nlp[0], &[]).await;
    let done = observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    assert_eq!(
        done[0].value["data"]["final_status"],
        "completed_successfully"
    );
    assert_eq!(
        done[0].value["data"]["completed_phases"],
        serde_json::json!(["spellcheck", "nlp"])
    );
    assert_all_valid(&observer);
    finish(cluster, worker, up, vec![observer]).await;
}

#[tokio::test]
async fn regular_flow_confirmation_first() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    regular_flow(false, pool).await;
}

#[tokio::test]
async fn regular_flow_essays_ready_first() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    regular_flow(true, pool).await;
}

#[tokio::test]
async fn critical_phase_failure_ends_the_run() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let (cluster, worker, up, observer) = setup(pool).await;
    let (batch_id, corr) = register(&worker.repo, None, 2).await;
    provision(&up, &batch_id, corr, 2).await;
    request(&up, &batch_id, "ai_feedback").await;
    let spell = observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    answer(
        &up,
        &batch_id,
        PhaseName::Spellcheck,
        &spell[0],
        &["essay-0", "essay-1"],
    )
    .await;
    let done = observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    let data = &done[0].value["data"];
    assert_eq!(data["final_status"], "failed_critically");
    assert_eq!(data["completed_phases"], serde_json::json!([]));
    assert_eq!(
        (
            data["successful_essay_count"].as_i64(),
            data["failed_essay_count"].as_i64()
        ),
        (Some(0), Some(2))
    );
    let state = worker
        .repo
        .get_processing_pipeline_state(&batch_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        state.nlp.status,
        bos::contracts::PipelineExecutionStatus::SkippedDueToDependencyFailure
    );
    assert_eq!(
        state.ai_feedback.status,
        bos::contracts::PipelineExecutionStatus::SkippedDueToDependencyFailure
    );
    assert!(observer.on(topics::NLP_COMMAND).is_empty());
    finish(cluster, worker, up, vec![observer]).await;
}

#[tokio::test]
async fn critical_validation_errors_deny_the_parked_request() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let (cluster, worker, up, observer) = setup(pool).await;
    let (batch_id, corr) = register(&worker.repo, None, 2).await;
    request(&up, &batch_id, "cj_assessment").await;
    let errors =
        upstream::validation_errors(&batch_id, &["essay-0".into()], true, chrono::Utc::now());
    up.send(topics::VALIDATION_ERRORS, &batch_id, corr, errors)
        .await;
    let denied = observer.wait_for(topics::PIPELINE_DENIED, 1).await;
    assert_eq!(denied[0].value["data"]["denial_reason"], "batch_failed");
    let batch = worker
        .repo
        .get_batch_by_id(&batch_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.status, bos::contracts::BatchStatus::FailedCritically);
    assert!(batch.parked.is_none());
    assert_all_valid(&observer);
    finish(cluster, worker, up, vec![observer]).await;
}

#[tokio::test]
async fn sequential_pipelines_and_stale_outcomes() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let (cluster, worker, up, observer) = setup(pool).await;
    let (batch_id, corr) = register(&worker.repo, None, 3).await;
    provision(&up, &batch_id, corr, 3).await;
    request(&up, &batch_id, "nlp").await;
    let spell = observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    answer(
        &up,
        &batch_id,
        PhaseName::Spellcheck,
        &spell[0],
        &["essay-2"],
    )
    .await;
    let nlp = observer.wait_for(topics::NLP_COMMAND, 1).await;
    answer(&up, &batch_id, PhaseName::Nlp, &nlp[0], &[]).await;
    observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;

    // CJ reuses the finished spellcheck: only the survivors, corrected.
    request(&up, &batch_id, "cj_assessment").await;
    let cj = observer.wait_for(topics::CJ_ASSESSMENT_COMMAND, 1).await;
    assert_eq!(
        observer.on(topics::SPELLCHECK_COMMAND).len(),
        1,
        "spellcheck pruned"
    );
    assert_eq!(
        command_essays(&cj[0]),
        [
            ("essay-0".to_owned(), "store-0-corrected".to_owned()),
            ("essay-1".to_owned(), "store-1-corrected".to_owned())
        ]
    );
    // A stale outcome: the first run's spellcheck answered again under a new event id.
    answer(&up, &batch_id, PhaseName::Spellcheck, &spell[0], &[]).await;
    // A stale outcome of the same phase from an earlier run: nlp of run 1.
    answer(&up, &batch_id, PhaseName::Nlp, &nlp[0], &[]).await;
    answer(&up, &batch_id, PhaseName::CjAssessment, &cj[0], &[]).await;
    let done = observer.wait_for(topics::PIPELINE_COMPLETED, 2).await;
    assert_eq!(
        done[1].value["data"]["completed_phases"],
        serde_json::json!(["cj_assessment"])
    );
    assert_eq!(done[1].value["data"]["successful_essay_count"], 2);
    let state = worker
        .repo
        .get_processing_pipeline_state(&batch_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        state.spellcheck.essay_counts.successful, 2,
        "the stale outcome changed nothing"
    );
    assert_eq!(observer.on(topics::PIPELINE_COMPLETED).len(), 2);
    assert_all_valid(&observer);
    finish(cluster, worker, up, vec![observer]).await;
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/wire")
            .join(name),
    )
    .unwrap()
}

#[tokio::test]
async fn the_platform_samples_are_accepted() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let (cluster, worker, up, observer) = setup(pool).await;
    let dlq_topics: Vec<String> = topics::CONSUMED
        .iter()
        .map(|t| format!("{}{}", worker.kafka.topic(t), topics::DLQ_SUFFIX))
        .collect();
    let dlq = Observer::start(&worker.kafka, &dlq_topics);
    // The batch the samples speak of, registered as a GUEST batch.
    let (mut batch, messages) = common::new_batch(0);
    batch.id = "813c9582-e0d6-5f75-9b92-eeaebb610315".into();
    batch.pipeline.batch_id = batch.id.clone();
    worker
        .repo
        .create_batch(&batch, &messages[..0])
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
        up.send_raw(topic, &batch.id, &fixture(file), &[]).await;
    }
    let spell = observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(
        correlation(&spell[0]).to_string(),
        "792975bd-5be4-58ca-9db0-60db211cd882"
    );
    up.send_raw(
        topics::PHASE_OUTCOME,
        &batch.id,
        &fixture("phase_outcome_spellcheck_partial.json"),
        &[],
    )
    .await;
    let cj = observer.wait_for(topics::CJ_ASSESSMENT_COMMAND, 1).await;
    assert_eq!(command_essays(&cj[0]).len(), 3);
    assert_eq!(cj[0].value["data"]["assignment_id"], "assign-1");
    up.send_raw(
        topics::PHASE_OUTCOME,
        &batch.id,
        &fixture("phase_outcome_cj_failed.json"),
        &[],
    )
    .await;
    let done = observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    let data = &done[0].value["data"];
    assert_eq!(data["completed_phases"], serde_json::json!(["spellcheck"]));
    assert_eq!(
        (
            data["successful_essay_count"].as_i64(),
            data["failed_essay_count"].as_i64()
        ),
        (Some(0), Some(4))
    );
    assert_eq!(data["final_status"], "failed_critically");
    for (topic, file) in [
        (
            topics::STUDENT_ASSOCIATIONS_CONFIRMED,
            "student_associations_confirmed.json",
        ),
        (topics::BATCH_ESSAYS_READY, "batch_essays_ready.json"),
        (topics::VALIDATION_ERRORS, "validation_errors_critical.json"),
    ] {
        up.send_raw(topic, &batch.id, &fixture(file), &[]).await;
    }
    // Every sample was applied (each has its inbox row), and none was dead-lettered.
    for event_id in [
        "ff3215a1-4563-58c4-a80f-e54ab3a55aae",
        "b4adfe4d-bcb5-5aab-9f88-3a549e7b1f37",
        "0177559d-b0c5-5876-a4f7-8f292ec9d41a",
        "ea9446cb-857b-5ebe-8a93-91360375ce22",
        "2b63e4bb-5113-509d-8db7-28416eb984c8",
        "2245713d-fbb3-51eb-9c17-18e81d634a1c",
        "3f6ecf7a-7d8d-55b1-aaf1-e5731598580b",
    ] {
        let event_id: Uuid = event_id.parse().unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while !worker.repo.inbox_contains(event_id).await.unwrap() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "sample {event_id} never applied"
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }
    let b = worker
        .repo
        .get_batch_by_id(&batch.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        b.validation_errors.len(),
        1,
        "validation errors after a run are recorded"
    );
    assert_eq!(
        b.status,
        bos::contracts::BatchStatus::ReadyForPipelineExecution,
        "and change nothing else"
    );
    assert!(
        dlq.all().is_empty(),
        "no sample was dead-lettered: {:?}",
        dlq.all()
    );
    assert_all_valid(&observer);
    finish(cluster, worker, up, vec![observer, dlq]).await;
}

#[tokio::test]
async fn dead_letters_replay_into_their_topic() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let (cluster, worker, up, observer) = setup(pool).await;
    let dlq_name = format!("{}{}", topics::CLIENT_PIPELINE_REQUEST, topics::DLQ_SUFFIX);
    let dlq = Observer::start(&worker.kafka, &[worker.kafka.topic(&dlq_name)]);
    let (batch_id, corr) = register(&worker.repo, None, 1).await;
    // A request for a batch id nobody knows yet: dead-lettered.
    let (mut early, _) = common::new_batch(0);
    let early_id = early.id.clone();
    up.send(
        topics::CLIENT_PIPELINE_REQUEST,
        &early_id,
        corr,
        upstream::pipeline_request(&early_id, "spellcheck", "t"),
    )
    .await;
    let letters = dlq.wait_for(&dlq_name, 1).await;
    assert_eq!(letters[0].header("dlq.reason"), Some("unknown_batch"));
    // The batch arrives; replaying the letter now starts its pipeline.
    early.status = bos::contracts::BatchStatus::ReadyForPipelineExecution;
    early.essays = vec![bos::domain::BatchEssay::from_ref(&EssayRef::new("x", "s"))];
    worker.repo.create_batch(&early, &[]).await.unwrap();
    let producer = bos::outbox::idempotent_producer(&worker.kafka).unwrap();
    let idle = std::time::Duration::from_secs(30);
    let first = bos::dlq::replay(
        &worker.kafka,
        &producer,
        topics::CLIENT_PIPELINE_REQUEST,
        None,
        idle,
    )
    .await
    .unwrap();
    assert_eq!(first.replayed, 1);
    let spell = observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(spell[0].key.as_deref(), Some(early_id.as_str()));
    let second = bos::dlq::replay(
        &worker.kafka,
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
    let _ = batch_id;
    drop(producer);
    finish(cluster, worker, up, vec![observer, dlq]).await;
}

#[tokio::test]
async fn a_failed_transaction_is_retried_not_skipped() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let (cluster, worker, up, observer) = setup(pool).await;
    let (batch_id, corr) = register(&worker.repo, None, 1).await;
    provision(&up, &batch_id, corr, 1).await;
    wait_for_batch(&worker.repo, &batch_id, |b| {
        b.status == bos::contracts::BatchStatus::ReadyForPipelineExecution
    })
    .await;
    // The next transaction fails after writing its outbox rows, as a crash would.
    worker
        .repo
        .inject_fault(bos::store::Fault::AfterOutboxInsert);
    request(&up, &batch_id, "spellcheck").await;
    let spell = observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    answer(&up, &batch_id, PhaseName::Spellcheck, &spell[0], &[]).await;
    observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    assert_eq!(
        observer.on(topics::SPELLCHECK_COMMAND).len(),
        1,
        "the retried event is applied once"
    );
    finish(cluster, worker, up, vec![observer]).await;
}
