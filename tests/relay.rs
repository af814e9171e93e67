//! The outbox relay against PostgreSQL and Kafka: per-key order with two relays,
//! failures backing off per row without blocking other keys, retention.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bos::config::RelaySettings;
use bos::contracts::topics;
use bos::domain::OutboundMessage;
use bos::metrics::Metrics;
use bos::outbox::{idempotent_producer, Relay};
use bos::store::{Change, PgRepository, Repository};
use common::kafka::{kafka_settings, Cluster, Observer};
use serde_json::json;
use uuid::Uuid;

/// `batches` batches, each with `per_batch` outbox rows numbered 0.. in order.
async fn fill(
    repo: &Arc<dyn Repository>,
    batches: usize,
    per_batch: usize,
    payload: impl Fn(usize, usize) -> serde_json::Value,
) -> Vec<String> {
    let mut keys = Vec::new();
    for b in 0..batches {
        let (batch, _) = common::new_batch(1);
        repo.create_batch(&batch, &[]).await.unwrap();
        // Several transactions per batch, several rows each, like real decisions.
        for (version, chunk) in (1..).zip((0..per_batch).collect::<Vec<_>>().chunks(3)) {
            let outbox = chunk
                .iter()
                .map(|&n| OutboundMessage {
                    event_id: Uuid::new_v4(),
                    topic: topics::TEACHER_NOTIFICATION,
                    key: batch.id.clone(),
                    correlation_id: Uuid::new_v4(),
                    occurred_at: chrono::Utc::now(),
                    traceparent: None,
                    envelope: payload(b, n),
                })
                .collect();
            let change = Change {
                batch: batch.clone(),
                expected_version: Some(version),
                essays_changed: false,
                outbox,
                inbox: None,
                snapshot: None,
            };
            repo.apply(vec![change]).await.unwrap();
        }
        keys.push(batch.id);
    }
    keys
}

fn relay(
    repo: &Arc<dyn Repository>,
    kafka: &bos::config::KafkaSettings,
    settings: RelaySettings,
) -> Relay {
    Relay::new(
        repo.clone(),
        idempotent_producer(kafka).unwrap(),
        kafka.clone(),
        settings,
        Arc::new(Metrics::new()),
    )
}

#[tokio::test]
async fn two_relays_keep_per_key_order_and_lose_nothing() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let repo = PgRepository::from_pool(pool);
    repo.migrate().await.unwrap();
    let repo: Arc<dyn Repository> = Arc::new(repo);
    let cluster = Cluster::start().await;
    let kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 4).await;
    let observer = Observer::published(&kafka);
    let keys = fill(&repo, 20, 12, |b, n| json!({"batch": b, "n": n})).await;
    let small = RelaySettings {
        batch_size: 3,
        ..RelaySettings::default()
    };
    let (a, b) = (
        relay(&repo, &kafka, small.clone()),
        relay(&repo, &kafka, small),
    );
    let drive = |r: Relay| async move {
        let mut published = 0;
        loop {
            let pass = r.publish_once().await.unwrap();
            if pass.published == 0 {
                break published;
            }
            published += pass.published;
        }
    };
    let (pa, pb) = tokio::join!(drive(a), drive(b));
    assert_eq!(pa + pb, 240, "every row published once");
    assert!(pa > 0 && pb > 0, "both relays took part ({pa} + {pb})");
    let seen = observer.wait_for(topics::TEACHER_NOTIFICATION, 240).await;
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for s in &seen {
        by_key
            .entry(s.key.clone().unwrap())
            .or_default()
            .push(s.value["n"].as_i64().unwrap());
    }
    for key in &keys {
        assert_eq!(
            by_key[key],
            (0..12).collect::<Vec<i64>>(),
            "order of key {key}"
        );
    }
    assert_eq!(repo.outbox_stats().await.unwrap().unpublished, 0);
    observer.stop().await;
}

#[tokio::test]
async fn a_failing_row_backs_off_without_blocking_other_keys() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let repo = PgRepository::from_pool(pool);
    repo.migrate().await.unwrap();
    let repo: Arc<dyn Repository> = Arc::new(repo);
    let cluster = Cluster::start().await;
    let mut kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 2).await;
    kafka
        .librdkafka
        .push(("message.max.bytes".into(), "2000".into()));
    let observer = Observer::published(&kafka);
    // Batch 0's second row is too large to ever be accepted.
    let keys = fill(&repo, 3, 3, |b, n| {
        let filler = if (b, n) == (0, 1) {
            "x".repeat(5000)
        } else {
            String::new()
        };
        json!({"batch": b, "n": n, "filler": filler})
    })
    .await;
    let r = relay(
        &repo,
        &kafka,
        RelaySettings {
            retry_initial: Duration::from_secs(60),
            ..RelaySettings::default()
        },
    );
    let first = r.publish_once().await.unwrap();
    for row in repo.outbox_rows(None).await.unwrap() {
        eprintln!(
            "{} {} {:?} {:?}",
            row.key,
            row.payload["n"],
            row.published_at.is_some(),
            row.last_error
        );
    }
    assert_eq!(first.failed, 1);
    assert_eq!(
        first.published,
        1 + 3 + 3,
        "the failing key stops at its failure; other keys flow"
    );
    assert_eq!(
        r.publish_once().await.unwrap().published,
        0,
        "the failed row waits for its next attempt"
    );
    let rows = repo.outbox_rows(Some(&keys[0])).await.unwrap();
    assert!(rows[0].published_at.is_some());
    assert_eq!(rows[1].attempts, 1);
    assert!(
        rows[1].last_error.as_deref().is_some_and(|e| !e.is_empty()),
        "operators see the error"
    );
    assert!(rows[1].next_attempt_at > chrono::Utc::now() + chrono::Duration::seconds(30));
    assert!(
        rows[2].published_at.is_none(),
        "rows behind a failure keep their order"
    );
    let seen = observer.wait_for(topics::TEACHER_NOTIFICATION, 7).await;
    assert_eq!(
        seen.iter()
            .filter(|s| s.key.as_deref() == Some(keys[0].as_str()))
            .count(),
        1
    );
    // Retention: published rows older than the cut-off go, unpublished stay.
    let purged = repo
        .purge_outbox(chrono::Utc::now() + chrono::Duration::seconds(1), 100)
        .await
        .unwrap();
    assert_eq!(purged, 7);
    assert_eq!(repo.outbox_rows(None).await.unwrap().len(), 2);
    observer.stop().await;
}
