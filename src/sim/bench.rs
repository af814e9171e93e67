//! `bos bench`: throughput and latency of the apply path, the relay alone, the
//! idle cost, and the same SQL transaction shape driven directly (the ceiling),
//! all in one run against PostgreSQL (`DATABASE_URL`) and Kafka (embedded mock
//! cluster, or `KAFKA_BOOTSTRAP_SERVERS`). A fresh database is created for the
//! run and dropped afterwards.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::join_all;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sqlx::{Connection, Executor, PgPool, Row};
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::config::{ConsumerSettings, KafkaSettings, RelaySettings};
use crate::consumer::{self, Handler, Worker};
use crate::contracts::{topics, CourseCode, EssayRef, InboundEvent, PhaseName};
use crate::domain::{Env, EventMeta, RandomIds, RegistrationRequest, Rules};
use crate::embedded::EmbeddedKafka;
use crate::metrics::Metrics;
use crate::outbox::{idempotent_producer, PgWake, Relay};
use crate::store::{Change, PgRepository, PostgresSettings, Repository};
use crate::upstream;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub database_url: String,
    pub kafka_bootstrap: Option<String>,
    /// Events of the throughput test.
    pub events: usize,
    pub partitions: i32,
    /// Records applied per transaction at most.
    pub max_batch: usize,
    pub pool_size: u32,
    /// Events per second of the latency test, and its length.
    pub rate: u64,
    pub duration: Duration,
    pub relay_rows: usize,
    pub idle: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub events: usize,
    pub partitions: i32,
    pub max_batch: usize,
    pub apply_events_per_s: f64,
    pub ceiling_events_per_s: f64,
    pub ratio_of_ceiling: f64,
    pub latency_rate_per_s: u64,
    pub latency_events: usize,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    pub relay_rows: usize,
    pub relay_rows_per_s: f64,
    pub idle_transactions_per_s: f64,
    pub peak_rss_mb: f64,
}

impl BenchReport {
    pub fn table(&self) -> String {
        let rows = [
            (
                "apply throughput, end to end (events/s)",
                format!("{:.0}", self.apply_events_per_s),
            ),
            (
                "ceiling: same SQL shape, direct (events/s)",
                format!("{:.0}", self.ceiling_events_per_s),
            ),
            (
                "apply / ceiling",
                format!("{:.0} %", self.ratio_of_ceiling * 100.0),
            ),
            (
                "latency at fixed rate (events/s × n)",
                format!("{} × {}", self.latency_rate_per_s, self.latency_events),
            ),
            ("  p50 (ms)", format!("{:.1}", self.latency_p50_ms)),
            ("  p95 (ms)", format!("{:.1}", self.latency_p95_ms)),
            ("  p99 (ms)", format!("{:.1}", self.latency_p99_ms)),
            ("  max (ms)", format!("{:.1}", self.latency_max_ms)),
            (
                "relay alone (rows/s)",
                format!("{:.0}", self.relay_rows_per_s),
            ),
            (
                "idle cost (transactions/s)",
                format!("{:.2}", self.idle_transactions_per_s),
            ),
            (
                "peak resident memory (MB)",
                format!("{:.0}", self.peak_rss_mb),
            ),
        ];
        rows.iter()
            .map(|(k, v)| format!("  {k:<44} {v:>14}\n"))
            .collect()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A batch in the middle of a `cj_assessment` run: spellcheck dispatched.
struct Loaded {
    batch_id: String,
    outcome: Vec<u8>,
}

/// Creates `n` batches with spellcheck dispatched, and the outcome event each awaits.
async fn preload(
    repo: &Arc<dyn Repository>,
    rules: &Rules,
    n: usize,
) -> anyhow::Result<Vec<Loaded>> {
    let mut loaded = Vec::with_capacity(n);
    let mut changes = Vec::new();
    for _ in 0..n {
        let mut ids = RandomIds;
        let now = chrono::Utc::now();
        let request = RegistrationRequest {
            expected_essay_count: 3,
            essay_ids: None,
            course_code: CourseCode::Eng5,
            student_prompt_ref: None,
            user_id: "bench".into(),
            org_id: None,
            class_id: None,
            cj_default_llm_model: None,
            cj_default_temperature: None,
            assignment_id: None,
        };
        let registered = rules
            .register(&request, Uuid::new_v4(), &mut Env { now, ids: &mut ids })
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut batch = registered.batch.context("no batch")?;
        let essays: Vec<EssayRef> = batch
            .context
            .essay_ids
            .iter()
            .map(|id| EssayRef::new(id, format!("s-{id}")))
            .collect();
        for event in [
            InboundEvent::ContentProvisioned(upstream::content_provisioned(
                &batch.id,
                CourseCode::Eng5,
                "bench",
                &essays,
            )),
            InboundEvent::PipelineRequest(upstream::pipeline_request(
                &batch.id,
                "cj_assessment",
                "bench",
            )),
        ] {
            let meta = EventMeta {
                event_id: Uuid::new_v4(),
                correlation_id: Uuid::new_v4(),
                traceparent: None,
            };
            batch = rules
                .decide(Some(&batch), &event, &meta, &mut Env { now, ids: &mut ids })
                .batch
                .context("no batch")?;
        }
        let run = batch.orchestration.current_run.clone().context("no run")?;
        let outcome = upstream::phase_outcome(
            &batch.id,
            PhaseName::Spellcheck,
            &essays,
            &[],
            run.correlation_id,
        );
        let bytes = upstream::envelope_json(
            topics::PHASE_OUTCOME,
            "bench",
            Uuid::new_v4(),
            run.correlation_id,
            now,
            outcome,
        );
        loaded.push(Loaded {
            batch_id: batch.id.clone(),
            outcome: bytes,
        });
        changes.push(Change::create(batch, Vec::new()));
        if changes.len() == 500 {
            repo.apply(std::mem::take(&mut changes)).await?;
        }
    }
    if !changes.is_empty() {
        repo.apply(changes).await?;
    }
    Ok(loaded)
}

async fn published_commands(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM event_outbox WHERE topic = $1 AND published_at IS NOT NULL",
    )
    .bind(topics::CJ_ASSESSMENT_COMMAND)
    .fetch_one(pool)
    .await?)
}

async fn wait_for_published(pool: &PgPool, target: i64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while published_commands(pool).await? < target {
        anyhow::ensure!(
            Instant::now() < deadline,
            "commands not all published within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    loaded: &[Loaded],
) -> anyhow::Result<()> {
    for chunk in loaded.chunks(1000) {
        let sends = chunk.iter().map(|l| {
            producer.send(
                FutureRecord::to(topic).key(&l.batch_id).payload(&l.outcome),
                Duration::from_secs(30),
            )
        });
        for result in join_all(sends).await {
            result.map_err(|(e, _)| e)?;
        }
    }
    Ok(())
}

/// The transaction shape of the apply path, driven directly: per event an inbox
/// insert, a version read, a CAS update and an outbox insert; one commit per batch.
async fn ceiling(
    pool: &PgPool,
    batch_ids: &[String],
    batch: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let essay =
        json!({"essay_id": Uuid::new_v4(), "text_storage_id": "s", "spellcheck_metrics": null});
    let payload = json!({"data": {"essays_to_process": [essay.clone(), essay.clone(), essay]}, "pad": "x".repeat(600)}).to_string();
    let started = Instant::now();
    let slices: Vec<&[String]> = batch_ids
        .chunks(batch_ids.len().div_ceil(concurrency.max(1)))
        .collect();
    let tasks = slices.into_iter().map(|slice| {
        let payload = payload.clone();
        async move {
            for chunk in slice.chunks(batch.max(1)) {
                let mut tx = pool.begin().await?;
                for id in chunk {
                    sqlx::query("INSERT INTO processed_events (event_id, topic, batch_id) VALUES ($1, 'bench', $2)")
                        .bind(Uuid::new_v4())
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    let row = sqlx::query("SELECT version, pipeline_state, orchestration FROM batches WHERE id = $1")
                        .bind(id)
                        .fetch_one(&mut *tx)
                        .await?;
                    let version: i64 = row.try_get("version")?;
                    let state: serde_json::Value = row.try_get("pipeline_state")?;
                    let orchestration: serde_json::Value = row.try_get("orchestration")?;
                    sqlx::query(
                        "UPDATE batches SET pipeline_state = $3, orchestration = $4, updated_at = now(), \
                         version = version + 1 WHERE id = $1 AND version = $2",
                    )
                    .bind(id)
                    .bind(version)
                    .bind(state)
                    .bind(orchestration)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO event_outbox (id, topic, message_key, event_type, correlation_id, payload) \
                         VALUES ($1, 'bench.ceiling', $2, 'bench', $1, $3::jsonb)",
                    )
                    .bind(Uuid::new_v4())
                    .bind(id)
                    .bind(&payload)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
            Ok::<(), sqlx::Error>(())
        }
    });
    for result in join_all(tasks).await {
        result?;
    }
    Ok(batch_ids.len() as f64 / started.elapsed().as_secs_f64())
}

struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn start(
    repo: &Arc<dyn Repository>,
    pool: &PgPool,
    kafka: &KafkaSettings,
    options: &BenchOptions,
    consume: bool,
) -> anyhow::Result<Running> {
    let (stop, rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());
    let relay = Relay::new(
        repo.clone(),
        idempotent_producer(kafka)?,
        kafka.clone(),
        RelaySettings::default(),
        metrics.clone(),
    );
    let mut tasks = vec![tokio::spawn(
        relay.run(Box::new(PgWake::listen(pool).await?), rx.clone()),
    )];
    if consume {
        let worker = Worker {
            consumer: Arc::new(consumer::consumer(kafka)?),
            dlq: idempotent_producer(kafka)?,
            handler: Handler::new(repo.clone(), Rules::default(), 5, metrics.clone()),
            kafka: kafka.clone(),
            settings: ConsumerSettings {
                max_batch: options.max_batch,
                ..ConsumerSettings::default()
            },
            outbox_written: Arc::new(Notify::new()),
            metrics,
        };
        tasks.push(tokio::spawn(worker.run(rx)));
    }
    Ok(Running { stop, tasks })
}

/// Transactions the bench database has seen, read from another database so the
/// reading does not count itself.
async fn transactions(admin: &mut sqlx::PgConnection, database: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
    )
    .bind(database)
    .fetch_one(admin)
    .await?)
}

pub async fn run(options: BenchOptions) -> anyhow::Result<BenchReport> {
    // A database of its own for the run.
    let name = format!("bos_bench_{}", Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&options.database_url)
        .await
        .context("connecting to DATABASE_URL")?;
    admin
        .execute(format!("CREATE DATABASE \"{name}\"").as_str())
        .await?;
    let url = format!(
        "{}/{name}",
        options
            .database_url
            .rsplit_once('/')
            .context("DATABASE_URL has no database")?
            .0
    );
    let result = run_in(&options, &url, &mut admin, &name).await;
    admin
        .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
        .await?;
    result
}

async fn run_in(
    options: &BenchOptions,
    url: &str,
    admin: &mut sqlx::PgConnection,
    database: &str,
) -> anyhow::Result<BenchReport> {
    let mut settings = PostgresSettings::new(url);
    settings.max_connections = options.pool_size;
    let pg = PgRepository::connect(&settings).await?;
    pg.migrate().await?;
    let pool = pg.pool().clone();
    let repo: Arc<dyn Repository> = Arc::new(pg);
    let rules = Rules::default();

    let embedded = match &options.kafka_bootstrap {
        Some(_) => None,
        None => Some(EmbeddedKafka::start()?),
    };
    let mut kafka = KafkaSettings::new(match (&embedded, &options.kafka_bootstrap) {
        (Some(e), _) => e.bootstrap_servers(),
        (None, Some(b)) => b.clone(),
        (None, None) => unreachable!("one of the two is set"),
    });
    kafka.topic_prefix = format!("bench{}.", &Uuid::new_v4().simple().to_string()[..6]);
    kafka.group_id = format!("bench-{}", Uuid::new_v4().simple());
    kafka.librdkafka = vec![
        ("fetch.wait.max.ms".into(), "5".into()),
        ("log_level".into(), "3".into()),
    ];
    if let Some(e) = &embedded {
        e.create_topics(&kafka.topic_prefix, options.partitions)?;
    }
    let outcome_topic = kafka.topic(topics::PHASE_OUTCOME);
    let producer: FutureProducer = kafka.client_config().set("linger.ms", "2").create()?;

    let worker = start(&repo, &pool, &kafka, options, true).await?;
    // Let the consumer join its group before any clock starts.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 4. Idle cost: the worker running with nothing to do, before anything was written.
    eprintln!("idle cost over {:?} …", options.idle);
    // Idle backends report their counters up to 10 s late (the migrations' among them).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let before = transactions(admin, database).await?;
    tokio::time::sleep(options.idle).await;
    let after = transactions(admin, database).await?;
    let idle_tps = (after - before).max(0) as f64 / options.idle.as_secs_f64();

    eprintln!(
        "preloading {} + {} batches …",
        options.events,
        options.rate * options.duration.as_secs()
    );
    let throughput_set = preload(&repo, &rules, options.events).await?;
    let latency_set = preload(
        &repo,
        &rules,
        (options.rate * options.duration.as_secs()) as usize,
    )
    .await?;

    // 1. Apply throughput.
    eprintln!("apply throughput: {} events …", options.events);
    let started = Instant::now();
    produce_all(&producer, &outcome_topic, &throughput_set).await?;
    wait_for_published(&pool, options.events as i64, Duration::from_secs(600)).await?;
    let apply_eps = options.events as f64 / started.elapsed().as_secs_f64();

    // 2. Latency at a fixed rate.
    eprintln!(
        "latency: {} events/s for {:?} …",
        options.rate, options.duration
    );
    let mut sent_at: HashMap<String, chrono::DateTime<chrono::Utc>> =
        HashMap::with_capacity(latency_set.len());
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / options.rate.max(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut pending = Vec::new();
    for l in &latency_set {
        ticker.tick().await;
        sent_at.insert(l.batch_id.clone(), chrono::Utc::now());
        pending.push(
            producer.send(
                FutureRecord::to(&outcome_topic)
                    .key(&l.batch_id)
                    .payload(&l.outcome),
                Duration::from_secs(30),
            ),
        );
        if pending.len() >= 100 {
            for r in join_all(std::mem::take(&mut pending)).await {
                r.map_err(|(e, _)| e)?;
            }
        }
    }
    for r in join_all(pending).await {
        r.map_err(|(e, _)| e)?;
    }
    wait_for_published(
        &pool,
        (options.events + latency_set.len()) as i64,
        Duration::from_secs(600),
    )
    .await?;
    let keys: Vec<String> = latency_set.iter().map(|l| l.batch_id.clone()).collect();
    let rows = sqlx::query("SELECT message_key, published_at FROM event_outbox WHERE topic = $1 AND message_key = ANY($2)")
        .bind(topics::CJ_ASSESSMENT_COMMAND)
        .bind(&keys)
        .fetch_all(&pool)
        .await?;
    let mut latencies: Vec<f64> = rows
        .iter()
        .filter_map(|r| {
            let key: String = r.try_get("message_key").ok()?;
            let published: chrono::DateTime<chrono::Utc> = r.try_get("published_at").ok()?;
            Some((published - *sent_at.get(&key)?).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);

    worker.stop().await;

    // 3. Relay alone.
    eprintln!("relay alone: {} rows …", options.relay_rows);
    sqlx::query(
        "INSERT INTO event_outbox (id, topic, message_key, event_type, correlation_id, payload) \
         SELECT gen_random_uuid(), $1, 'key-' || (n % 1000), $1, gen_random_uuid(), \
                jsonb_build_object('n', n, 'pad', repeat('x', 600)) \
         FROM generate_series(1, $2) AS n",
    )
    .bind(topics::TEACHER_NOTIFICATION)
    .bind(options.relay_rows as i64)
    .execute(&pool)
    .await?;
    let relay = start(&repo, &pool, &kafka, options, false).await?;
    let started = Instant::now();
    loop {
        let left = repo.outbox_stats().await?.unpublished;
        if left == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "relay did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relay_rps = options.relay_rows as f64 / started.elapsed().as_secs_f64();
    relay.stop().await;

    // 5. The ceiling: the same transaction shape, directly, same batch size and concurrency.
    eprintln!("ceiling: {} events, direct SQL …", options.events);
    let ids: Vec<String> = throughput_set.iter().map(|l| l.batch_id.clone()).collect();
    let ceiling_eps = ceiling(&pool, &ids, options.max_batch, options.partitions as usize).await?;

    drop(producer);
    drop(embedded);
    Ok(BenchReport {
        events: options.events,
        partitions: options.partitions,
        max_batch: options.max_batch,
        apply_events_per_s: apply_eps,
        ceiling_events_per_s: ceiling_eps,
        ratio_of_ceiling: apply_eps / ceiling_eps,
        latency_rate_per_s: options.rate,
        latency_events: latencies.len(),
        latency_p50_ms: percentile(&latencies, 0.50),
        latency_p95_ms: percentile(&latencies, 0.95),
        latency_p99_ms: percentile(&latencies, 0.99),
        latency_max_ms: latencies.last().copied().unwrap_or(0.0),
        relay_rows: options.relay_rows,
        relay_rows_per_s: relay_rps,
        idle_transactions_per_s: idle_tps,
        peak_rss_mb: peak_rss_mb(),
    })
}
