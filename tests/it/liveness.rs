//! Liveness: no record, duplicate or missing topic stalls a partition, and no
//! stall goes unnoticed. Each test drives the real worker through Kafka and
//! checks that a later event on the same partition is applied.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bos::app::Role;
use bos::contracts::{topics, PhaseName};
use bos::sim::upstream;
use bos::store::{Repository, UnitOfWork};
use uuid::Uuid;

use crate::support::app::{settings, BosProcess, TestApp};
use crate::support::faulty::{Fault, Faulty};
use crate::support::flow::{Flow, FlowOptions};
use crate::support::kafka::{kafka_settings, Cluster, Observer, Upstream};
use crate::support::{envelope, eventually, ready_batch};

fn request_bytes(batch: &str, event: Uuid, target: &str) -> Vec<u8> {
    envelope(
        topics::CLIENT_PIPELINE_REQUEST,
        event,
        upstream::pipeline_request(batch, target, crate::support::TEACHER),
    )
}

async fn store(repo: &Arc<dyn Repository>, batches: &[bos::domain::Batch]) {
    for b in batches {
        repo.commit(UnitOfWork::create(b.clone(), Vec::new()))
            .await
            .unwrap();
    }
}

/// Copies of one event, from 2 up to the poll size, among records of other
/// batches in one poll: applied once, the rest duplicates, the partition flows.
#[tokio::test]
async fn copies_of_an_event_in_one_poll_apply_once_and_the_partition_flows() {
    const POLL: usize = 32;
    for copies in [2, POLL - 2] {
        let target = ready_batch(2);
        let others: Vec<_> = (0..2).map(|_| ready_batch(1)).collect();
        let later = ready_batch(1);
        let (t, o, l) = (target.clone(), others.clone(), later.clone());
        let event = Uuid::new_v4();
        let flow = Flow::with(FlowOptions {
            partitions: 1,
            tune: Box::new(|s| s.consumer.max_batch = POLL),
            before_start: Some(Box::new(move |repo, kafka| {
                Box::pin(async move {
                    store(&repo, &[t.clone(), l.clone()]).await;
                    store(&repo, &o).await;
                    let up = Upstream::new(&kafka);
                    let bytes = request_bytes(&t.id, event, "spellcheck");
                    up.send_raw(
                        topics::CLIENT_PIPELINE_REQUEST,
                        &o[0].id,
                        &request_bytes(&o[0].id, Uuid::new_v4(), "spellcheck"),
                        &[],
                    )
                    .await;
                    for i in 0..copies {
                        up.send_raw(topics::CLIENT_PIPELINE_REQUEST, &t.id, &bytes, &[])
                            .await;
                        if i == copies / 2 {
                            up.send_raw(
                                topics::CLIENT_PIPELINE_REQUEST,
                                &o[1].id,
                                &request_bytes(&o[1].id, Uuid::new_v4(), "spellcheck"),
                                &[],
                            )
                            .await;
                        }
                    }
                })
            })),
            ..FlowOptions::default()
        })
        .await;
        flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 3).await;
        // A later event on the same partition is applied.
        let after = flow.request(&later.id, "spellcheck").await;
        flow.wait_processed(after).await;
        let commands = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 4).await;
        let for_target = commands
            .iter()
            .filter(|c| c.key.as_deref() == Some(target.id.as_str()))
            .count();
        assert_eq!(for_target, 1, "{copies} copies: one command");
        assert_eq!(
            flow.app.counter("duplicates", &[]),
            (copies - 1) as u64,
            "{copies} copies"
        );
        assert_eq!(
            flow.app.counter("apply_retries", &["contended"]),
            0,
            "no round without progress"
        );
        flow.finish(vec![]).await.unwrap();
    }
}

/// A worker that re-reads a partition full of events it applied before (as a
/// new owner after a restart does) recognises them all and keeps going.
#[tokio::test]
async fn a_restarted_worker_rereads_applied_events_and_flows() {
    let flow = Flow::with(FlowOptions {
        partitions: 2,
        ..FlowOptions::default()
    })
    .await;
    let batches: Vec<_> = (0..20).map(|_| ready_batch(2)).collect();
    store(&flow.repo(), &batches).await;
    let mut events = Vec::new();
    for b in &batches {
        events.push(flow.request(&b.id, "spellcheck").await);
    }
    flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 20).await;
    for &e in &events {
        flow.wait_processed(e).await;
    }
    // A second worker in a group of its own reads every record again.
    let mut again = settings(&flow.kafka, Some(&flow.database.url));
    again.kafka.group_id = format!("{}-restarted", flow.kafka.group_id);
    again.http.addr = "127.0.0.1:0".into();
    let second = TestApp::spawn(again).await;
    eventually(
        Duration::from_secs(30),
        "every old record seen again",
        || async { second.counter("duplicates", &[]) >= 20 },
    )
    .await;
    let fresh = ready_batch(1);
    store(&flow.repo(), std::slice::from_ref(&fresh)).await;
    let after = flow.request(&fresh.id, "spellcheck").await;
    flow.wait_processed(after).await;
    flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 21).await;
    assert_eq!(
        flow.observer.on(topics::SPELLCHECK_COMMAND).len(),
        21,
        "nothing decided twice"
    );
    second.stop().await.unwrap();
    flow.finish(vec![]).await.unwrap();
}

fn faulty_flow(faulty: &Arc<Mutex<Option<Arc<Faulty>>>>, options: FlowOptions) -> FlowOptions {
    let keep = faulty.clone();
    FlowOptions {
        wrap: Some(Box::new(move |inner| {
            let f = Faulty::new(inner);
            *keep.lock().unwrap() = Some(f.clone());
            f
        })),
        ..options
    }
}

/// A partition that keeps failing transiently holds only itself.
#[tokio::test]
async fn a_retrying_partition_does_not_hold_the_others() {
    let faulty = Arc::new(Mutex::new(None));
    let flow = Flow::with(faulty_flow(
        &faulty,
        FlowOptions {
            partitions: 2,
            tune: Box::new(|s| s.consumer.stall_timeout = Duration::from_secs(2)),
            ..FlowOptions::default()
        },
    ))
    .await;
    let faulty = faulty.lock().unwrap().clone().unwrap();
    let (stuck, flowing) = (ready_batch(1), ready_batch(1));
    store(&flow.repo(), &[stuck.clone(), flowing.clone()]).await;
    faulty.inject(&stuck.id, Fault::Transient, usize::MAX);
    let topic = topics::CLIENT_PIPELINE_REQUEST;
    flow.up
        .send_to(
            topic,
            Some(0),
            &stuck.id,
            &request_bytes(&stuck.id, Uuid::new_v4(), "spellcheck"),
            &[],
        )
        .await;
    for _ in 0..3 {
        let e = Uuid::new_v4();
        flow.up
            .send_to(
                topic,
                Some(1),
                &flowing.id,
                &request_bytes(&flowing.id, e, "spellcheck"),
                &[],
            )
            .await;
        flow.wait_processed(e).await;
    }
    let commands = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(commands[0].key.as_deref(), Some(flowing.id.as_str()));
    assert!(faulty.injected() > 1, "the stuck partition kept retrying");
    eventually(
        Duration::from_secs(15),
        "the stuck partition shows in metrics and readiness",
        || async {
            let (status, body) = flow.app.get("/readyz").await;
            let metrics = flow.app.metrics.render();
            status == 503
                && body["checks"]["consumer"] == false
                && metrics.lines().any(|l| {
                    l.starts_with("bos_partition_stuck_seconds")
                        && l.contains("partition=\"0\"")
                        && !l.ends_with(" 0")
                })
        },
    )
    .await;
    assert!(flow.app.counter("apply_retries", &["transient"]) > 1);
    flow.finish(vec![]).await.unwrap();
}

/// What the database refuses is isolated: it goes to the dead-letter topic
/// with the database's message, and the rest of the poll applies. Input the
/// platform's models refuse never gets that far.
#[tokio::test]
async fn refused_records_are_dead_lettered_and_the_rest_applies() {
    let faulty = Arc::new(Mutex::new(None));
    let (bad, good, later) = (ready_batch(1), ready_batch(1), ready_batch(1));
    let (b, g, l) = (bad.clone(), good.clone(), later.clone());
    let keep = faulty.clone();
    let bad_id = bad.id.clone();
    let flow = Flow::with(FlowOptions {
        partitions: 1,
        wrap: Some(Box::new(move |inner| {
            let f = Faulty::new(inner);
            f.inject(&bad_id, Fault::Permanent, usize::MAX);
            *keep.lock().unwrap() = Some(f.clone());
            f
        })),
        before_start: Some(Box::new(move |repo, kafka| {
            Box::pin(async move {
                store(&repo, &[b.clone(), g.clone(), l.clone()]).await;
                let up = Upstream::new(&kafka);
                let topic = topics::CLIENT_PIPELINE_REQUEST;
                up.send_raw(
                    topic,
                    &g.id,
                    &request_bytes(&g.id, Uuid::new_v4(), "spellcheck"),
                    &[],
                )
                .await;
                up.send_raw(
                    topic,
                    &b.id,
                    &request_bytes(&b.id, Uuid::new_v4(), "spellcheck"),
                    &[],
                )
                .await;
                let mut nul =
                    serde_json::to_value(upstream::pipeline_request(&g.id, "spellcheck", "t"))
                        .unwrap();
                nul["retry_reason"] = "with a \u{0} inside".into();
                up.send_raw(topic, &g.id, &envelope(topic, Uuid::new_v4(), nul), &[])
                    .await;
            })
        })),
        ..FlowOptions::default()
    })
    .await;
    let (dlq, name) = flow.dead_letters(topics::CLIENT_PIPELINE_REQUEST);
    let letters = dlq.wait_for(&name, 2).await;
    let mut reasons: Vec<&str> = letters
        .iter()
        .filter_map(|l| l.header("dlq.reason"))
        .collect();
    reasons.sort_unstable();
    assert_eq!(reasons, ["apply_error", "decode_error"]);
    let refused = letters
        .iter()
        .find(|l| l.header("dlq.reason") == Some("apply_error"))
        .unwrap();
    assert_eq!(refused.key.as_deref(), Some(bad.id.as_str()));
    assert!(
        refused.header("dlq.error").unwrap().contains("refuses"),
        "the database's message"
    );
    let after = flow.request(&later.id, "spellcheck").await;
    flow.wait_processed(after).await;
    let commands = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 2).await;
    let keys: Vec<_> = commands.iter().filter_map(|c| c.key.clone()).collect();
    assert!(keys.contains(&good.id) && keys.contains(&later.id) && !keys.contains(&bad.id));
    assert!(faulty.lock().unwrap().as_ref().unwrap().injected() >= 1);
    flow.finish(vec![dlq]).await.unwrap();
}

/// Topics to create for a test: all but `missing`.
async fn create_all_but(cluster: &Cluster, kafka: &bos::config::KafkaSettings, missing: &[String]) {
    let mock = cluster.mock().expect("the mock cluster");
    for t in bos::kafka::required_topics(kafka, true) {
        if !missing.contains(&t) {
            mock.cluster().create_topic(&t, 1, 1).unwrap();
        }
    }
}

/// A dead-letter topic that does not exist (auto-creation off) is reported and
/// holds nothing up: the letter waits in the outbox, later records apply, bos
/// stops when told to, and once the topic exists the letter lands.
#[tokio::test]
async fn a_missing_dead_letter_topic_is_reported_and_does_not_wedge() {
    let cluster = Cluster::start().await;
    if cluster.mock().is_none() {
        eprintln!("against a real broker bos creates the topic itself; see check_topics");
        return;
    }
    let database = crate::support::pg::Database::fresh().await;
    let mut kafka = kafka_settings(&cluster);
    kafka
        .librdkafka
        .insert("allow.auto.create.topics".into(), "false".into());
    let dlq_name = format!("{}{}", topics::PHASE_OUTCOME, topics::DLQ_SUFFIX);
    let dlq = kafka.topic(&dlq_name);
    create_all_but(&cluster, &kafka, std::slice::from_ref(&dlq)).await;
    let mut s = settings(&kafka, Some(&database.url));
    s.consumer.drain_timeout = Duration::from_secs(10);
    s.relay.lease = Duration::from_secs(2);
    let app = TestApp::spawn(s.clone()).await;
    eventually(
        Duration::from_secs(15),
        "readyz names the missing topic",
        || async {
            let (status, body) = app.get("/readyz").await;
            status == 503 && body.to_string().contains(&dlq)
        },
    )
    .await;
    let up = Upstream::new(&kafka);
    let repo = app.repo.clone();
    let later = ready_batch(1);
    repo.commit(UnitOfWork::create(later.clone(), Vec::new()))
        .await
        .unwrap();
    up.send_raw(topics::PHASE_OUTCOME, &later.id, b"{poison", &[])
        .await;
    // The partition flows: a later event on it is applied.
    let outcome =
        upstream::phase_outcome(&later.id, PhaseName::Spellcheck, &[], &[], Uuid::new_v4());
    let event = Uuid::new_v4();
    up.send_raw(
        topics::PHASE_OUTCOME,
        &later.id,
        &envelope(topics::PHASE_OUTCOME, event, outcome),
        &[],
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the later event is processed",
        || {
            let repo = repo.clone();
            async move { repo.processed(&[event]).await.unwrap().contains(&event) }
        },
    )
    .await;
    assert_eq!(
        app.counter("dead_letters", &["decode_error"]),
        1,
        "settled as a letter"
    );
    let pending = repo.outbox_rows(Some(&later.id)).await.unwrap();
    assert!(
        pending
            .iter()
            .any(|r| r.raw.is_some() && r.published_at.is_none()),
        "the letter waits in the outbox"
    );
    assert_eq!(app.get("/readyz").await.0, 503);
    // SIGTERM while the letter cannot be sent: bos still stops, in time.
    let stopped = tokio::time::timeout(Duration::from_secs(15), app.stop()).await;
    assert!(matches!(stopped, Ok(Ok(()))), "{stopped:?}");
    // The topic appears; a new worker's relay sends the letter, once.
    cluster
        .mock()
        .unwrap()
        .cluster()
        .create_topic(&dlq, 1, 1)
        .unwrap();
    let app = TestApp::spawn(s).await;
    let dlq_observer = Observer::start(&kafka, std::slice::from_ref(&dlq));
    let letters = dlq_observer.wait_for(&dlq_name, 1).await;
    assert_eq!(letters[0].raw, b"{poison");
    assert_eq!(letters[0].header("dlq.reason"), Some("decode_error"));
    assert_eq!(
        letters[0].key.as_deref(),
        Some(later.id.as_str()),
        "the original key"
    );
    eventually(
        Duration::from_secs(15),
        "readyz 200 once the topic exists",
        || async { app.get("/readyz").await.0 == 200 },
    )
    .await;
    app.stop().await.unwrap();
    dlq_observer.stop().await;
    drop(up);
}

/// A consumed topic created after start is consumed within 30 s.
#[tokio::test]
async fn a_consumed_topic_created_after_start_is_consumed() {
    let cluster = Cluster::start().await;
    if cluster.mock().is_none() {
        eprintln!("needs the mock cluster to hold a topic back");
        return;
    }
    let database = crate::support::pg::Database::fresh().await;
    let mut kafka = kafka_settings(&cluster);
    kafka
        .librdkafka
        .insert("allow.auto.create.topics".into(), "false".into());
    kafka
        .librdkafka
        .insert("topic.metadata.refresh.interval.ms".into(), "10000".into());
    let late = kafka.topic(topics::VALIDATION_ERRORS);
    let late_dlq = format!("{late}{}", topics::DLQ_SUFFIX);
    create_all_but(&cluster, &kafka, &[late.clone(), late_dlq.clone()]).await;
    let app = TestApp::spawn(settings(&kafka, Some(&database.url))).await;
    let batch = ready_batch(1);
    app.repo
        .commit(UnitOfWork::create(batch.clone(), Vec::new()))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "readyz names the missing topic",
        || async {
            let (status, body) = app.get("/readyz").await;
            status == 503 && body.to_string().contains(&late)
        },
    )
    .await;
    let mock = cluster.mock().unwrap().cluster();
    mock.create_topic(&late, 1, 1).unwrap();
    mock.create_topic(&late_dlq, 1, 1).unwrap();
    let up = Upstream::new(&kafka);
    let event = Uuid::new_v4();
    let errors =
        upstream::validation_errors(&batch.id, &["essay-0".into()], false, chrono::Utc::now());
    up.send_raw(
        topics::VALIDATION_ERRORS,
        &batch.id,
        &envelope(topics::VALIDATION_ERRORS, event, errors),
        &[],
    )
    .await;
    let repo = app.repo.clone();
    eventually(
        Duration::from_secs(30),
        "the new topic's event is applied within 30 s",
        || {
            let repo = repo.clone();
            async move { repo.processed(&[event]).await.unwrap().contains(&event) }
        },
    )
    .await;
    eventually(Duration::from_secs(15), "readyz 200", || async {
        app.get("/readyz").await.0 == 200
    })
    .await;
    app.stop().await.unwrap();
    drop(up);
}

/// A consumer task that panics stops the whole application with an error.
#[tokio::test]
async fn a_panicking_consumer_stops_the_application() {
    let faulty = Arc::new(Mutex::new(None));
    let flow = Flow::with(faulty_flow(&faulty, FlowOptions::default())).await;
    let batch = ready_batch(1);
    store(&flow.repo(), std::slice::from_ref(&batch)).await;
    faulty
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .inject(&batch.id, Fault::Panic, 1);
    flow.request(&batch.id, "spellcheck").await;
    let address = flow.app.address.clone();
    let Flow {
        app,
        cluster,
        up,
        observer,
        database,
        ..
    } = flow;
    let ended = tokio::time::timeout(Duration::from_secs(30), app.join())
        .await
        .expect("the application ends by itself");
    let error = format!("{:#}", ended.expect_err("with an error"));
    assert!(error.contains("panicked"), "{error}");
    assert!(
        reqwest::get(format!("{address}/healthz")).await.is_err(),
        "HTTP stopped too"
    );
    observer.stop().await;
    drop((up, cluster, database));
}

/// A partition that makes no progress turns /readyz to 503 and shows in the
/// metrics; a drain that then misses its deadline is an error.
#[tokio::test]
async fn a_stuck_consumer_is_not_ready_and_a_missed_drain_is_an_error() {
    let faulty = Arc::new(Mutex::new(None));
    let flow = Flow::with(faulty_flow(
        &faulty,
        FlowOptions {
            tune: Box::new(|s| {
                s.consumer.stall_timeout = Duration::from_secs(2);
                s.consumer.drain_timeout = Duration::from_secs(2);
            }),
            ..FlowOptions::default()
        },
    ))
    .await;
    eventually(Duration::from_secs(30), "ready first", || async {
        flow.app.get("/readyz").await.0 == 200
    })
    .await;
    let batch = ready_batch(1);
    store(&flow.repo(), std::slice::from_ref(&batch)).await;
    faulty
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .inject(&batch.id, Fault::Hang, 1);
    flow.request(&batch.id, "spellcheck").await;
    eventually(
        Duration::from_secs(20),
        "readyz 503 naming the stuck partition",
        || async {
            let (status, body) = flow.app.get("/readyz").await;
            status == 503
                && body["checks"]["consumer"] == false
                && body.to_string().contains("stuck")
        },
    )
    .await;
    let ended = flow.finish(vec![]).await;
    let error = format!("{:#}", ended.expect_err("the drain cannot finish"));
    assert!(error.contains("did not finish"), "{error}");
}

#[tokio::test]
async fn the_relay_alone_serves_health_readiness_and_metrics() {
    let cluster = Cluster::start().await;
    let kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 1).await;
    let database = crate::support::pg::Database::fresh().await;
    let s = settings(&kafka, Some(&database.url));
    let relay =
        TestApp::spawn_with(bos::app::Application::builder(s.clone()), Role::RelayOnly).await;
    assert_eq!(relay.get("/healthz").await.0, 200);
    eventually(Duration::from_secs(15), "the relay is ready", || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;
    let (status, metrics) = relay.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics
        .as_str()
        .unwrap()
        .contains("bos_relay_published_total"));
    assert_eq!(
        relay
            .call("POST", "/v1/batches/register", &[], None)
            .await
            .0,
        404,
        "no API on the relay"
    );
    relay.stop().await.unwrap();
}

/// A producer that hits a fatal error (a gap in an idempotent sequence) is
/// replaced; the rows it could not publish go out through the new one.
#[tokio::test]
async fn a_fatal_producer_error_replaces_the_producer_and_the_outbox_drains() {
    let flow = Flow::with(FlowOptions {
        tune: Box::new(|s| s.relay.retry_initial = Duration::from_millis(100)),
        ..FlowOptions::default()
    })
    .await;
    let Some(mock) = flow.cluster.mock() else {
        eprintln!("needs the mock cluster to inject produce errors");
        return;
    };
    let (first, _) = flow.register(None, 1).await;
    flow.observer
        .wait_for(topics::BATCH_ESSAYS_REGISTERED, 1)
        .await;
    // The broker refuses the next produce requests for good: with the gapless
    // guarantee the producer goes fatal instead of reordering. (A registration
    // makes the relay publish without anyone else producing.)
    mock.cluster().request_errors(
        rdkafka::types::RDKafkaApiKey::Produce,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD; 4],
    );
    let (second, _) = flow.register(None, 1).await;
    eventually(
        Duration::from_secs(30),
        "the producer was replaced",
        || async { flow.app.metrics.producer_replacements.get() >= 1 },
    )
    .await;
    let registered = flow
        .observer
        .wait_for(topics::BATCH_ESSAYS_REGISTERED, 2)
        .await;
    let keys: Vec<_> = registered.iter().filter_map(|m| m.key.clone()).collect();
    assert!(keys.contains(&first) && keys.contains(&second), "{keys:?}");
    let repo = flow.repo();
    eventually(Duration::from_secs(30), "the outbox drained", || {
        let repo = repo.clone();
        async move { repo.outbox_stats().await.unwrap().unpublished == 0 }
    })
    .await;
    eventually(Duration::from_secs(15), "ready again", || async {
        flow.app.get("/readyz").await.0 == 200
    })
    .await;
    flow.finish(vec![]).await.unwrap();
}

/// With the broker gone, the consumer's errors are written once per interval
/// (not every 100 ms) and /readyz answers 503; once it is back, 200, and
/// records are consumed again (errors queued during the outage do not hold
/// the consumer's polls back).
#[tokio::test]
async fn a_broker_outage_is_logged_once_per_interval_and_not_ready() {
    let cluster = Cluster::start().await;
    let Some(mock) = cluster.mock() else {
        eprintln!("needs the mock cluster to take the broker down");
        return;
    };
    let kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 1).await;
    let database = crate::support::pg::Database::fresh().await;
    let env = crate::support::app::environment(&kafka, &database.url);
    let mut bos = BosProcess::start("worker", "run", &env);
    assert!(bos.ready(Duration::from_secs(30)).await, "{:?}", bos.log());
    let before = bos.log().len();
    mock.cluster().broker_down(1).unwrap();
    let status = |http: String, expected: u16| async move {
        reqwest::get(format!("{http}/readyz"))
            .await
            .map_or(0, |r| r.status().as_u16())
            == expected
    };
    eventually(
        Duration::from_secs(20),
        "readyz 503 while the broker is down",
        || status(bos.http.clone(), 503),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during: Vec<String> = bos.log()[before..]
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .cloned()
        .collect();
    assert!(
        !during.is_empty(),
        "the outage is reported: {:#?}",
        bos.log()
    );
    assert!(
        during.len() <= 12,
        "at most a line per client and interval, got {}: {during:#?}",
        during.len()
    );
    mock.cluster().broker_up(1).unwrap();
    eventually(Duration::from_secs(30), "ready again", || {
        status(bos.http.clone(), 200)
    })
    .await;
    // And it consumes again: a record sent now is decided (here: dead-lettered).
    let up = crate::support::kafka::Upstream::new(&kafka);
    up.send_raw(bos::contracts::topics::PHASE_OUTCOME, "k", b"not json", &[])
        .await;
    let pool = database.pool.clone();
    eventually(
        Duration::from_secs(30),
        "the record after the outage is decided",
        || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM event_outbox")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    == 1
            }
        },
    )
    .await;
    bos.signal("TERM");
    let status = bos
        .wait(Duration::from_secs(30))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
}
