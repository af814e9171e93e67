//! The worker through Kafka only: the real consumer, relay and rules against
//! PostgreSQL and librdkafka's mock cluster.

mod common;

use std::sync::Arc;

use bos::contracts::{topics, CourseCode, EssayRef, PhaseName};
use bos::domain::{Env, RandomIds, Rules};
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

/// Registers a batch the way `POST /v1/batches/register` does.
async fn register(
    repo: &Arc<dyn Repository>,
    class_id: Option<&str>,
    essays: i64,
) -> (String, Uuid) {
    let correlation = Uuid::new_v4();
    let mut ids = RandomIds;
    let decision = Rules::default()
        .register(
            &common::registration(class_id, essays),
            correlation,
            &mut Env {
                now: chrono::Utc::now(),
                ids: &mut ids,
            },
        )
        .unwrap();
    let batch = decision.batch.unwrap();
    repo.create_batch(&batch, &decision.messages).await.unwrap();
    (batch.id, correlation)
}

fn essays(n: usize) -> Vec<EssayRef> {
    (0..n)
        .map(|i| EssayRef::new(format!("essay-{i}"), format!("store-{i}")))
        .collect()
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
    let cluster = Cluster::start();
    let kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 3);
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

#[sqlx::test(migrations = false)]
async fn guest_flow_with_partial_spellcheck(pool: sqlx::PgPool) {
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
    up.send(
        topics::CLIENT_PIPELINE_REQUEST,
        &batch_id,
        request_corr,
        upstream::pipeline_request(&batch_id, "cj_assessment", "teacher-anna"),
    )
    .await;

    let spell = observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(
        correlation(&spell[0]),
        request_corr,
        "commands carry the run's correlation id"
    );
    assert_eq!(command_essays(&spell[0]).len(), 4);
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

#[sqlx::test(migrations = false)]
async fn every_event_twice_gives_the_same_outputs(pool: sqlx::PgPool) {
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

#[sqlx::test(migrations = false)]
async fn poison_messages_go_to_the_dead_letter_topic(pool: sqlx::PgPool) {
    let (cluster, worker, up, observer) = setup(pool).await;
    let dlq_topic = worker
        .kafka
        .topic(&format!("{}{}", topics::PHASE_OUTCOME, topics::DLQ_SUFFIX));
    let dlq = Observer::start(&worker.kafka, &[dlq_topic.clone()]);
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
    up.send(
        topics::CONTENT_PROVISIONING_COMPLETED,
        &batch_id,
        corr,
        upstream::content_provisioned(&batch_id, CourseCode::Eng5, "t", &essays(1)),
    )
    .await;
    up.send(
        topics::CLIENT_PIPELINE_REQUEST,
        &batch_id,
        corr,
        upstream::pipeline_request(&batch_id, "spellcheck", "t"),
    )
    .await;
    observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    let letters = dlq
        .wait_for(
            &format!("{}{}", topics::PHASE_OUTCOME, topics::DLQ_SUFFIX),
            2,
        )
        .await;
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
