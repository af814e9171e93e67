//! The outbox relay and its housekeeping against PostgreSQL and Kafka: per-key
//! order with two relays, failures backing off per row without blocking other
//! keys, leases that outlive slow publishing, and purges and backlog figures
//! on their own timer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bos::config::{KafkaSettings, RelaySettings};
use bos::contracts::topics;
use bos::domain::OutboundMessage;
use bos::health::Health;
use bos::kafka::ProducerHandle;
use bos::metrics::Metrics;
use bos::outbox::{Housekeeping, Relay};
use bos::store::{BatchWrite, PgRepository, Repository, UnitOfWork};
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

use crate::support::kafka::{kafka_settings, Cluster, Observer};
use crate::support::{eventually, new_batch};

/// `batches` batches, each with `per_batch` outbox rows numbered 0.. in order.
async fn fill(
    repo: &Arc<dyn Repository>,
    batches: usize,
    per_batch: usize,
    payload: impl Fn(usize, usize) -> serde_json::Value,
) -> Vec<String> {
    let mut keys = Vec::new();
    for b in 0..batches {
        let (batch, _) = new_batch(1);
        repo.commit(UnitOfWork::create(batch.clone(), Vec::new()))
            .await
            .unwrap();
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
                    payload: payload(b, n).to_string(),
                    raw: None,
                })
                .collect();
            repo.commit(UnitOfWork {
                writes: vec![BatchWrite {
                    batch: batch.clone(),
                    expected_version: Some(version),
                    essays_changed: false,
                    transitions: Vec::new(),
                    snapshots: Vec::new(),
                }],
                inbox: Vec::new(),
                outbox,
            })
            .await
            .unwrap();
        }
        keys.push(batch.id);
    }
    keys
}

fn relay(
    repo: &Arc<dyn Repository>,
    kafka: &KafkaSettings,
    settings: RelaySettings,
    metrics: &Arc<Metrics>,
) -> Relay {
    Relay::new(
        repo.clone(),
        Arc::new(ProducerHandle::new(kafka, metrics.clone()).unwrap()),
        kafka.clone(),
        settings,
        metrics.clone(),
        Arc::new(Health::new(Duration::from_secs(60), false)),
    )
}

async fn pg(database: &crate::support::pg::Database) -> Arc<dyn Repository> {
    let repo = PgRepository::from_pool(database.pool.clone());
    repo.migrate().await.unwrap();
    Arc::new(repo)
}

#[tokio::test]
async fn two_relays_keep_per_key_order_and_lose_nothing() {
    let database = crate::support::pg::Database::fresh().await;
    let repo = pg(&database).await;
    let cluster = Cluster::start().await;
    let kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 4).await;
    let observer = Observer::published(&kafka);
    let keys = fill(&repo, 20, 12, |b, n| json!({"batch": b, "n": n})).await;
    let small = RelaySettings {
        batch_size: 7,
        ..RelaySettings::default()
    };
    let metrics = Arc::new(Metrics::new());
    let (a, b) = (
        relay(&repo, &kafka, small.clone(), &metrics),
        relay(&repo, &kafka, small, &metrics),
    );
    let drive = |r: Relay| async move {
        let mut published = 0;
        loop {
            let pass = r.publish_once().await.unwrap();
            assert!(pass.claimed <= 7, "a claim is bounded");
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
    let database = crate::support::pg::Database::fresh().await;
    let repo = pg(&database).await;
    let cluster = Cluster::start().await;
    let mut kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 2).await;
    kafka
        .librdkafka
        .insert("message.max.bytes".into(), "2000".into());
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
    let metrics = Arc::new(Metrics::new());
    let r = relay(
        &repo,
        &kafka,
        RelaySettings {
            retry_initial: Duration::from_secs(60),
            ..RelaySettings::default()
        },
        &metrics,
    );
    let first = r.publish_once().await.unwrap();
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
    observer.stop().await;
}

/// A key's next row becomes claimable only when its previous row is marked,
/// which happens while the next pass claims. A pass that finds nothing
/// because of that looks again at once instead of sleeping until a
/// notification or the backstop (a minute) that may never come.
#[tokio::test]
async fn rows_waiting_behind_a_settling_pass_are_published_without_a_wake_up() {
    let database = crate::support::pg::Database::fresh().await;
    let repo = pg(&database).await;
    let cluster = Cluster::start().await;
    let kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 1).await;
    let observer = Observer::published(&kafka);
    fill(&repo, 1, 8, |b, n| json!({"batch": b, "n": n})).await;
    let one_at_a_time = RelaySettings {
        batch_size: 1,
        poll_interval: Duration::from_secs(600),
        ..RelaySettings::default()
    };
    let metrics = Arc::new(Metrics::new());
    let relay = relay(&repo, &kafka, one_at_a_time, &metrics);
    let never = Box::new(bos::outbox::NotifyWake(
        Arc::new(tokio::sync::Notify::new()),
    ));
    let (stop, stopped) = watch::channel(false);
    let running = tokio::spawn(relay.run(never, stopped));
    let seen = observer.wait_for(topics::TEACHER_NOTIFICATION, 8).await;
    let order: Vec<i64> = seen
        .iter()
        .map(|s| s.value["n"].as_i64().unwrap())
        .collect();
    assert_eq!(order, (0..8).collect::<Vec<i64>>());
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(repo.outbox_stats().await.unwrap().unpublished, 0);
    observer.stop().await;
}

/// A lease shorter than the publishing takes is renewed: a second relay does
/// not take the rows over, and nothing is published twice.
#[tokio::test]
async fn a_lease_outlives_slow_publishing() {
    let database = crate::support::pg::Database::fresh().await;
    let repo = pg(&database).await;
    let cluster = Cluster::start().await;
    let Some(mock) = cluster.mock() else {
        eprintln!("needs the mock cluster to slow the broker down");
        return;
    };
    let kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 1).await;
    let observer = Observer::published(&kafka);
    fill(&repo, 5, 3, |b, n| json!({"batch": b, "n": n})).await;
    let short = RelaySettings {
        lease: Duration::from_millis(600),
        ..RelaySettings::default()
    };
    let metrics = Arc::new(Metrics::new());
    let slow = relay(&repo, &kafka, short.clone(), &metrics);
    let other = relay(&repo, &kafka, short, &metrics);
    // Each broker answer takes 2.5 s: four lease lengths.
    mock.cluster()
        .broker_round_trip_time(1, Duration::from_millis(2500))
        .unwrap();
    let first = tokio::spawn(async move { slow.publish_once().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stolen = other.publish_once().await.unwrap();
    assert_eq!(
        stolen.claimed, 0,
        "the lease was renewed while the first relay published"
    );
    mock.cluster()
        .broker_round_trip_time(1, Duration::ZERO)
        .unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.published, 15);
    assert_eq!(metrics.relay_lease_lost.get(), 0);
    let seen = observer.wait_for(topics::TEACHER_NOTIFICATION, 15).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        observer.on(topics::TEACHER_NOTIFICATION).len(),
        15,
        "published once: {}",
        seen.len()
    );
    observer.stop().await;
}

/// Housekeeping runs on its own timer: backlog figures and purges happen while
/// a relay is busy with a steady backlog; published rows and inbox rows past
/// their retention go, in bounded chunks.
#[tokio::test]
async fn housekeeping_runs_while_the_relay_is_busy() {
    let database = crate::support::pg::Database::fresh().await;
    let repo = pg(&database).await;
    let cluster = Cluster::start().await;
    let kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 2).await;
    // Old, published rows and old inbox rows to purge.
    fill(&repo, 10, 3, |b, n| json!({"batch": b, "n": n})).await;
    let metrics = Arc::new(Metrics::new());
    let settings = RelaySettings {
        batch_size: 5,
        retention: Duration::from_millis(1),
        inbox_retention: Duration::from_secs(3600),
        purge_batch: 4,
        housekeeping_interval: Duration::from_millis(100),
        ..RelaySettings::default()
    };
    let r = relay(&repo, &kafka, settings.clone(), &metrics);
    while r.publish_once().await.unwrap().published > 0 {}
    sqlx::query("INSERT INTO processed_events (event_id, topic, batch_id, processed_at) \
                 SELECT gen_random_uuid(), 't', 'b', now() - interval '2 hours' FROM generate_series(1, 50)")
        .execute(&database.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO processed_events (event_id, topic, batch_id) SELECT gen_random_uuid(), 't', 'b' FROM generate_series(1, 5)")
        .execute(&database.pool)
        .await
        .unwrap();
    // A steady backlog: rows keep coming while the relay works through them.
    let busy_relay = relay(&repo, &kafka, settings.clone(), &metrics);
    let (stop, stopped) = watch::channel(false);
    let wake = Box::new(bos::outbox::NotifyWake(
        Arc::new(tokio::sync::Notify::new()),
    ));
    let relay_task = tokio::spawn(busy_relay.run(wake, stopped.clone()));
    let feeder = {
        let repo = repo.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                fill(&repo, 5, 6, |b, n| json!({"batch": b, "n": n})).await;
            }
        })
    };
    let housekeeping = Housekeeping {
        repo: repo.clone(),
        settings,
        metrics: metrics.clone(),
    };
    let house = tokio::spawn(housekeeping.run(stopped));
    eventually(
        Duration::from_secs(30),
        "purges and backlog figures while busy",
        || async {
            metrics.purged.with_label_values(&["event_outbox"]).get() >= 30
                && metrics
                    .purged
                    .with_label_values(&["processed_events"])
                    .get()
                    == 50
                && metrics.outbox_backlog.get() > 0
        },
    )
    .await;
    assert!(!feeder.is_finished() || metrics.relay_published.get() > 0);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(left, 5, "inbox rows younger than the retention stay");
    let _ = stop.send(true);
    feeder.abort();
    relay_task.await.unwrap().unwrap();
    house.await.unwrap().unwrap();
}
