//! `bos bench`: what bos does per second and per hop, measured on real
//! processes, next to the least SQL that produces the same rows.
//!
//! One run, against a scratch database on the given PostgreSQL server and an
//! in-process Kafka (librdkafka's mock cluster):
//!
//! 1. **Preload** batches waiting for their spellcheck outcome in an `nlp` run.
//! 2. **Throughput**: a `bos run` child process consumes one outcome per batch
//!    as fast as it can; the clock stops when the last `nlp` command has been
//!    delivered by its relay and read back from Kafka.
//! 3. **Latency** at fixed rates: each outcome's hop (produced → its command
//!    read back from Kafka), with the stage breakdown from the worker's own
//!    `bos_stage_seconds`.
//! 4. **Idle**: transactions the idle worker runs per minute.
//! 5. **Relay alone**: a `bos relay` child publishes a prefilled outbox.
//! 6. **Ceiling**: the same rows as step 2 (inbox, version-checked batch
//!    rewrite, corrected essay ids, outbox command, phase log) written
//!    set-based, `per_commit` events per transaction, on 1, 2 and 4
//!    connections; the best is the ceiling.
//!
//! The worker's resident memory is sampled from `/proc` throughout.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde::Serialize;
use sqlx::{Connection, Executor as _, PgConnection};
use tokio::process::Child;
use uuid::Uuid;

use crate::config::{KafkaSettings, Settings};
use crate::contracts::{topics, CourseCode, EssayRef, InboundEvent, PhaseName};
use crate::domain::{
    Batch, CreditAnswers, Decision, Effects, Env, EventMeta, RandomIds, RegistrationRequest, Rules,
};
use crate::metrics::STAGES;
use crate::sim::embedded::EmbeddedKafka;
use crate::sim::upstream;
use crate::store::postgres::BatchColumns;
use crate::store::{BatchWrite, PgRepository, Repository, UnitOfWork};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A PostgreSQL server URL; a scratch database is created next to its database.
    pub database_url: String,
    /// The `bos` executable run as the worker and relay processes.
    pub executable: PathBuf,
    /// Events of the throughput test (one per batch).
    pub events: usize,
    /// Partitions of every topic.
    pub partitions: i32,
    /// Events per second of the latency tests.
    pub rates: Vec<u64>,
    pub latency_seconds: u64,
    /// Events per connection count of the ceiling.
    pub ceiling_events: usize,
    /// Events per transaction of the ceiling.
    pub per_commit: usize,
    pub relay_rows: usize,
    pub idle_seconds: u64,
    /// Where the plots (SVG) go, if anywhere.
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub postgres: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StageFigures {
    pub observations: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyFigures {
    pub rate_per_s: u64,
    pub events: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Per stage, from the worker's `bos_stage_seconds` over this test.
    pub stages: BTreeMap<String, StageFigures>,
    #[serde(skip)]
    pub samples_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    pub events: usize,
    pub partitions: i32,
    pub events_per_s: f64,
    /// Per stage, from the worker's `bos_stage_seconds` over the throughput test.
    pub throughput_stages: BTreeMap<String, StageFigures>,
    pub ceiling_events_per_s: f64,
    /// The ceiling by number of connections.
    pub ceiling_by_connections: BTreeMap<String, f64>,
    pub ceiling_ratio: f64,
    pub ceiling_per_commit: usize,
    /// Keyed by rate (events/s).
    pub latency: BTreeMap<String, LatencyFigures>,
    pub worker_rss_mb: f64,
    pub relay_rows_per_s: f64,
    /// The worker's database operations per minute while idle (each a
    /// statement), in all and by operation.
    pub idle_queries_per_min: f64,
    pub idle_queries_by_operation: BTreeMap<String, f64>,
    pub batch_row_bytes: usize,
    pub command_bytes: usize,
}

impl BenchReport {
    /// For people: the headline figures.
    pub fn table(&self) -> String {
        let mut out = format!(
            "machine: {} ({} cores, {:.0} GiB), {}\n\
             throughput      {:>8.0} events/s   ceiling {:.0} ({}), ratio {:.0} %\n",
            self.machine.cpu,
            self.machine.cores,
            self.machine.memory_gib,
            self.machine.postgres,
            self.events_per_s,
            self.ceiling_events_per_s,
            self.ceiling_by_connections
                .iter()
                .map(|(k, v)| format!("{k} conn: {v:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.ceiling_ratio * 100.0,
        );
        out += &stage_lines(&self.throughput_stages);
        for l in self.latency.values() {
            out += &format!(
                "latency @{:>5}/s  p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} events)\n",
                l.rate_per_s, l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms, l.events
            );
            out += &stage_lines(&l.stages);
        }
        out += &format!(
            "worker RSS      {:>8.1} MB\nrelay alone     {:>8.0} rows/s\nidle            {:>8.1} queries/min {:?}\n\
             row sizes       batch {} B, command {} B\n",
            self.worker_rss_mb,
            self.relay_rows_per_s,
            self.idle_queries_per_min,
            self.idle_queries_by_operation,
            self.batch_row_bytes,
            self.command_bytes
        );
        out
    }
}

fn stage_lines(stages: &BTreeMap<String, StageFigures>) -> String {
    STAGES
        .iter()
        .filter_map(|stage| {
            let s = stages.get(*stage)?;
            Some(format!(
                "    {stage:<13} mean {:>6.2} ms  p50 ≤{:>6.2} ms  p99 ≤{:>7.2} ms  ({} obs)\n",
                s.mean_ms, s.p50_ms, s.p99_ms, s.observations
            ))
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn progress(step: &str) {
    eprintln!("bench: {step}");
}

// ------------------------------------------------------------ scratch database

struct ScratchDatabase {
    admin_url: String,
    name: String,
    url: String,
}

fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let root = match base.rfind('/') {
        Some(i) if i > base.find("//").map_or(0, |j| j + 1) => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

impl ScratchDatabase {
    async fn create(server_url: &str) -> anyhow::Result<Self> {
        let name = format!("bos_bench_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(server_url)
            .await
            .with_context(|| "connecting to PostgreSQL (--database-url / DATABASE_URL)")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(Self {
            admin_url: server_url.to_owned(),
            url: with_database(server_url, &name),
            name,
        })
    }

    async fn drop(self) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

// ------------------------------------------------------------ fixtures

/// A batch waiting for its spellcheck outcome, the outcome, and what bos
/// writes when it arrives (for the ceiling).
struct Prepared {
    batch_id: String,
    outcome: Vec<u8>,
    event_id: Uuid,
    effects: Effects,
}

fn applied(decision: Decision, step: &str) -> anyhow::Result<Effects> {
    match decision {
        Decision::Apply(effects) => Ok(effects),
        other => bail!("{step}: {other:?}"),
    }
}

/// `n` batches in an `nlp` run with spellcheck dispatched.
fn prepare(rules: &Rules, n: usize, essays: usize) -> anyhow::Result<Vec<(Batch, Prepared)>> {
    let answers = CreditAnswers::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut ids = RandomIds;
        let now = chrono::Utc::now();
        let mut env = Env {
            now,
            ids: &mut ids,
            credits: &answers,
        };
        let request = RegistrationRequest {
            expected_essay_count: i64::try_from(essays).unwrap_or(1),
            essay_ids: None,
            course_code: CourseCode::Eng5,
            student_prompt_ref: Some(upstream::prompt_ref(&format!("prompt-{i}"))),
            user_id: format!("teacher-{}", i % 50),
            org_id: Some("bench-school".into()),
            class_id: None,
            cj_default_llm_model: None,
            cj_default_temperature: None,
            assignment_id: None,
        };
        let registered = rules
            .register(&request, Uuid::new_v4(), &mut env)
            .map_err(|e| anyhow::anyhow!("registration refused: {e:?}"))?;
        let mut batch = registered.batch;
        let refs: Vec<EssayRef> = batch
            .context
            .essay_ids
            .iter()
            .map(|id| EssayRef::new(id, format!("text-{id}")))
            .collect();
        for (step, event) in [
            (
                "content provisioned",
                InboundEvent::ContentProvisioned(upstream::content_provisioned(
                    &batch.id,
                    CourseCode::Eng5,
                    &request.user_id,
                    &refs,
                )),
            ),
            (
                "pipeline request",
                InboundEvent::PipelineRequest(upstream::pipeline_request(
                    &batch.id,
                    "nlp",
                    &request.user_id,
                )),
            ),
        ] {
            let meta = EventMeta {
                event_id: Uuid::new_v4(),
                correlation_id: Uuid::new_v4(),
                traceparent: None,
            };
            batch = applied(rules.decide(Some(&batch), &event, &meta, &mut env), step)?.batch;
        }
        batch.version = 1;
        let run = batch
            .orchestration
            .current_run
            .clone()
            .context("the request started no run")?;
        let outcome = upstream::phase_outcome(
            &batch.id,
            PhaseName::Spellcheck,
            &refs,
            &[],
            run.correlation_id,
        );
        let event_id = Uuid::new_v4();
        let meta = EventMeta {
            event_id,
            correlation_id: run.correlation_id,
            traceparent: None,
        };
        let effects = applied(
            rules.decide(
                Some(&batch),
                &InboundEvent::PhaseOutcome(outcome.clone()),
                &meta,
                &mut env,
            ),
            "spellcheck outcome",
        )?;
        let bytes = upstream::envelope_json(
            topics::PHASE_OUTCOME,
            "essay_lifecycle_service",
            event_id,
            run.correlation_id,
            now,
            outcome,
        );
        out.push((
            batch.clone(),
            Prepared {
                batch_id: batch.id.clone(),
                outcome: bytes,
                event_id,
                effects,
            },
        ));
    }
    Ok(out)
}

/// Stores the batches (as bos would have written them) and keeps the rest.
async fn preload(repo: &PgRepository, rules: &Rules, n: usize) -> anyhow::Result<Vec<Prepared>> {
    let mut prepared = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let chunk = left.min(1_000);
        let made = prepare(rules, chunk, 3)?;
        let writes = made
            .iter()
            .map(|(batch, _)| BatchWrite {
                essays_changed: true,
                batch: batch.clone(),
                expected_version: None,
                transitions: Vec::new(),
                snapshots: Vec::new(),
            })
            .collect();
        repo.commit(UnitOfWork {
            writes,
            ..UnitOfWork::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("preloading batches: {e}"))?;
        prepared.extend(made.into_iter().map(|(_, p)| p));
        left -= chunk;
    }
    Ok(prepared)
}

// ------------------------------------------------------------ processes

struct Process {
    child: Child,
    port: u16,
    rss_peak_kb: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
    http: reqwest::Client,
}

fn rss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Process {
    fn start(
        options: &BenchOptions,
        role: &str,
        env: &HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new(&options.executable)
            .arg(role)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .env("BOS_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} {role}", options.executable.display()))?;
        let pid = child.id().context("the child has no pid")?;
        let rss_peak_kb = Arc::new(AtomicU64::new(0));
        let sampler = {
            let peak = rss_peak_kb.clone();
            tokio::spawn(async move {
                while let Some(kb) = rss_kb(pid) {
                    peak.fetch_max(kb, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        Ok(Self {
            child,
            port,
            rss_peak_kb,
            sampler,
            http: reqwest::Client::new(),
        })
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("http://127.0.0.1:{}/metrics", self.port))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Waits until `/metrics` shows `series` at least `at_least`.
    async fn wait_for(
        &mut self,
        series: &str,
        at_least: f64,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the bos process exited early: {status}");
            }
            if let Ok(text) = self.metrics().await {
                if Scrape::parse(&text).value(series).unwrap_or(0.0) >= at_least {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("`{series}` did not reach {at_least} within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn rss_peak_mb(&self) -> f64 {
        self.rss_peak_kb.load(Ordering::Relaxed) as f64 / 1024.0
    }

    async fn stop(mut self) -> anyhow::Result<f64> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        self.sampler.abort();
        match status {
            Ok(Ok(s)) if s.success() => Ok(self.rss_peak_mb()),
            Ok(Ok(s)) => bail!("the bos process ended with {s}"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the bos process did not stop within 30 s of SIGTERM")
            }
        }
    }
}

/// A Prometheus text exposition, by series (name with its labels as written).
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_owned(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    fn value(&self, series: &str) -> Option<f64> {
        self.0.get(series).copied()
    }

    /// Database operations the worker ran between two scrapes, by operation.
    fn operations(before: &Self, after: &Self) -> BTreeMap<String, f64> {
        let prefix = "batch_orchestrator_service_database_query_duration_seconds_count{";
        let mut by_operation = BTreeMap::new();
        for (series, n) in &after.0 {
            let Some(labels) = series.strip_prefix(prefix) else {
                continue;
            };
            let Some(operation) = labels
                .split("operation=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            else {
                continue;
            };
            *by_operation.entry(operation.to_owned()).or_insert(0.0) +=
                n - before.value(series).unwrap_or(0.0);
        }
        by_operation
    }

    /// One stage's figures between two scrapes.
    fn stage(before: &Self, after: &Self, stage: &str) -> StageFigures {
        let delta = |series: String| {
            after.value(&series).unwrap_or(0.0) - before.value(&series).unwrap_or(0.0)
        };
        let count = delta(format!("bos_stage_seconds_count{{stage=\"{stage}\"}}"));
        let sum = delta(format!("bos_stage_seconds_sum{{stage=\"{stage}\"}}"));
        let prefix = "bos_stage_seconds_bucket{";
        let mut buckets: Vec<(f64, f64)> = after
            .0
            .keys()
            .filter(|k| k.starts_with(prefix) && k.contains(&format!("stage=\"{stage}\"")))
            .filter_map(|k| {
                let le = k.split("le=\"").nth(1)?.split('"').next()?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, delta(k.clone())))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let quantile = |q: f64| {
            let wanted = count * q;
            buckets
                .iter()
                .find(|(_, n)| *n >= wanted)
                .map_or(f64::NAN, |(bound, _)| bound * 1000.0)
        };
        StageFigures {
            observations: count as u64,
            mean_ms: if count > 0.0 {
                sum / count * 1000.0
            } else {
                0.0
            },
            p50_ms: quantile(0.5),
            p99_ms: quantile(0.99),
        }
    }
}

/// Every stage's figures between two scrapes.
fn stages(before: &Scrape, after: &Scrape) -> BTreeMap<String, StageFigures> {
    STAGES
        .iter()
        .map(|s| ((*s).to_owned(), Scrape::stage(before, after, s)))
        .collect()
}

// ------------------------------------------------------------ Kafka

/// Reads the `nlp` command topic from the start: when each batch's command arrived.
struct Commands {
    arrived: Arc<Mutex<HashMap<String, Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Commands {
    fn observe(kafka: &KafkaSettings) -> anyhow::Result<Self> {
        let topic = kafka.topic(topics::NLP_COMMAND);
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka.bootstrap_servers)
            .set("group.id", format!("bos-bench-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "1")
            .set("fetch.error.backoff.ms", "1")
            .set("log_level", "3")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut assignment = rdkafka::TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                assignment.add_partition_offset(&topic, p.id(), rdkafka::Offset::Beginning)?;
            }
        }
        consumer.assign(&assignment)?;
        let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let task = {
            let arrived = arrived.clone();
            tokio::spawn(async move {
                let mut stream = consumer.stream();
                while let Some(received) = stream.next().await {
                    let Ok(m) = received else { continue };
                    let now = Instant::now();
                    if let Some(key) = m.key() {
                        arrived
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .entry(String::from_utf8_lossy(key).into_owned())
                            .or_insert(now);
                    }
                }
            })
        };
        Ok(Self { arrived, task })
    }

    fn count(&self) -> usize {
        self.arrived
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    fn at(&self, key: &str) -> Option<Instant> {
        self.arrived
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .copied()
    }

    async fn wait_for(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while self.count() < n {
            if Instant::now() > deadline {
                bail!("{} of {n} commands arrived within {within:?}", self.count());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }
}

fn producer(kafka: &KafkaSettings) -> anyhow::Result<FutureProducer> {
    Ok(rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("linger.ms", "0")
        .set("queue.buffering.max.messages", "1000000")
        .set("log_level", "3")
        .create()?)
}

fn enqueue(producer: &FutureProducer, topic: &str, p: &Prepared) -> anyhow::Result<()> {
    producer
        .send_result(FutureRecord::to(topic).key(&p.batch_id).payload(&p.outcome))
        .map(drop)
        .map_err(|(e, _)| anyhow::anyhow!("producing an outcome: {e}"))
}

// ------------------------------------------------------------ ceiling

/// The rows of `events`, as arrays for one statement each.
struct CeilingChunk {
    inbox_ids: Vec<Uuid>,
    inbox_topics: Vec<&'static str>,
    inbox_batches: Vec<String>,
    batches: BatchColumns,
    essay_batches: Vec<String>,
    essay_ids: Vec<String>,
    essay_corrected: Vec<Option<String>>,
    out_ids: Vec<Uuid>,
    out_topics: Vec<&'static str>,
    out_keys: Vec<String>,
    out_corr: Vec<Uuid>,
    out_payloads: Vec<String>,
    log_batches: Vec<String>,
    log_phases: Vec<&'static str>,
    log_old: Vec<&'static str>,
    log_new: Vec<&'static str>,
    log_corr: Vec<Uuid>,
    log_done: Vec<Option<crate::contracts::Timestamp>>,
}

impl CeilingChunk {
    fn of(events: &[Prepared]) -> anyhow::Result<Self> {
        let mut c = Self {
            inbox_ids: Vec::new(),
            inbox_topics: Vec::new(),
            inbox_batches: Vec::new(),
            batches: BatchColumns::default(),
            essay_batches: Vec::new(),
            essay_ids: Vec::new(),
            essay_corrected: Vec::new(),
            out_ids: Vec::new(),
            out_topics: Vec::new(),
            out_keys: Vec::new(),
            out_corr: Vec::new(),
            out_payloads: Vec::new(),
            log_batches: Vec::new(),
            log_phases: Vec::new(),
            log_old: Vec::new(),
            log_new: Vec::new(),
            log_corr: Vec::new(),
            log_done: Vec::new(),
        };
        for p in events {
            let e = &p.effects;
            c.inbox_ids.push(p.event_id);
            c.inbox_topics.push(topics::PHASE_OUTCOME);
            c.inbox_batches.push(p.batch_id.clone());
            c.batches
                .push(&BatchWrite {
                    batch: e.batch.clone(),
                    expected_version: Some(1),
                    essays_changed: e.essays_changed,
                    transitions: Vec::new(),
                    snapshots: Vec::new(),
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for essay in &e.batch.essays {
                c.essay_batches.push(p.batch_id.clone());
                c.essay_ids.push(essay.essay_id.clone());
                c.essay_corrected
                    .push(essay.corrected_text_storage_id.clone());
            }
            for m in &e.messages {
                c.out_ids.push(m.event_id);
                c.out_topics.push(m.topic);
                c.out_keys.push(m.key.clone());
                c.out_corr.push(m.correlation_id);
                c.out_payloads.push(m.payload.clone());
            }
            for t in &e.transitions {
                c.log_batches.push(p.batch_id.clone());
                c.log_phases.push(t.phase.as_str());
                c.log_old.push(t.from.as_str());
                c.log_new.push(t.to.as_str());
                c.log_corr.push(t.correlation_id);
                c.log_done.push(t.completed_at);
            }
        }
        Ok(c)
    }
}

/// The ceiling's statements, one per table, per transaction.
pub const CEILING_STATEMENTS: [&str; 5] = [
    "INSERT INTO processed_events (event_id, topic, batch_id) \
     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[])",
    crate::store::postgres::UPDATE_BATCHES,
    "UPDATE batch_essays e SET corrected_text_storage_id = u.corrected \
     FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(batch_id, essay_id, corrected) \
     WHERE e.batch_id = u.batch_id AND e.essay_id = u.essay_id",
    "INSERT INTO event_outbox (id, topic, message_key, event_type, correlation_id, payload, created_at) \
     SELECT t.id, t.topic, t.key, t.topic, t.corr, t.payload, clock_timestamp() \
     FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[]) AS t(id, topic, key, corr, payload)",
    "INSERT INTO phase_status_log (batch_id, phase, old_status, new_status, correlation_id, completed_at) \
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::timestamptz[])",
];

async fn ceiling_chunk(conn: &mut PgConnection, c: &CeilingChunk) -> anyhow::Result<()> {
    let mut tx = conn.begin().await?;
    sqlx::query(CEILING_STATEMENTS[0])
        .bind(&c.inbox_ids)
        .bind(&c.inbox_topics)
        .bind(&c.inbox_batches)
        .execute(&mut *tx)
        .await?;
    let updated = c
        .batches
        .bind_update(sqlx::query(CEILING_STATEMENTS[1]))
        .execute(&mut *tx)
        .await?
        .rows_affected();
    anyhow::ensure!(
        updated == c.batches.ids.len() as u64,
        "the ceiling's version check failed"
    );
    sqlx::query(CEILING_STATEMENTS[2])
        .bind(&c.essay_batches)
        .bind(&c.essay_ids)
        .bind(&c.essay_corrected)
        .execute(&mut *tx)
        .await?;
    sqlx::query(CEILING_STATEMENTS[3])
        .bind(&c.out_ids)
        .bind(&c.out_topics)
        .bind(&c.out_keys)
        .bind(&c.out_corr)
        .bind(&c.out_payloads)
        .execute(&mut *tx)
        .await?;
    sqlx::query(CEILING_STATEMENTS[4])
        .bind(&c.log_batches)
        .bind(&c.log_phases)
        .bind(&c.log_old)
        .bind(&c.log_new)
        .bind(&c.log_corr)
        .bind(&c.log_done)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Events per second writing `events` on `connections` connections at once.
async fn ceiling(
    url: &str,
    events: Vec<Prepared>,
    connections: usize,
    per_commit: usize,
) -> anyhow::Result<f64> {
    let total = events.len();
    let share = total.div_ceil(connections);
    let mut work = Vec::new();
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let slice: Vec<Prepared> = events.by_ref().take(share).collect();
        let chunks = slice
            .chunks(per_commit)
            .map(CeilingChunk::of)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut conn = PgConnection::connect(url).await?;
        // Warm the statement cache outside the clock.
        for s in CEILING_STATEMENTS {
            conn.prepare(s).await?;
        }
        work.push((conn, chunks));
    }
    let started = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|(mut conn, chunks)| {
            tokio::spawn(async move {
                for c in &chunks {
                    ceiling_chunk(&mut conn, c).await?;
                }
                conn.close().await?;
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

// ------------------------------------------------------------ the run

/// Whether any outbox row waits (the cheapest question: the first index entry).
async fn unpublished(conn: &mut PgConnection) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM event_outbox WHERE published_at IS NULL)")
            .fetch_one(conn)
            .await?,
    )
}

async fn drained(conn: &mut PgConnection, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while unpublished(conn).await? {
        if started.elapsed() > within {
            bail!("the outbox did not drain within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(started.elapsed())
}

/// Every measured phase starts from the same state: dead rows vacuumed,
/// statistics fresh, dirty pages written.
async fn settle_database(conn: &mut PgConnection) {
    for statement in [
        "VACUUM (ANALYZE) batches, batch_essays, event_outbox, processed_events, phase_status_log",
        "CHECKPOINT",
    ] {
        if let Err(e) = sqlx::query(statement).execute(&mut *conn).await {
            eprintln!("bench: `{statement}` failed ({e}); measuring anyway");
        }
    }
}

async fn machine(conn: &mut PgConnection) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, v)| v.trim().to_owned());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let postgres = sqlx::query_scalar::<_, String>("SELECT version()")
        .fetch_one(conn)
        .await
        .map_or_else(
            |_| "PostgreSQL".to_owned(),
            |v| v.split(" on ").next().unwrap_or(&v).to_owned(),
        );
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        memory_gib,
        postgres,
    }
}

pub async fn run(options: BenchOptions) -> anyhow::Result<BenchReport> {
    let scratch = ScratchDatabase::create(&options.database_url).await?;
    let result = run_on(&options, &scratch).await;
    if let Err(e) = scratch.drop().await {
        eprintln!("bench: could not drop the scratch database: {e}");
    }
    result
}

async fn run_on(options: &BenchOptions, scratch: &ScratchDatabase) -> anyhow::Result<BenchReport> {
    let mut settings = Settings::defaults();
    settings.database.url = crate::config::Secret::new(scratch.url.clone());
    let repo = PgRepository::connect(&settings.database).await?;
    repo.migrate().await?;
    let mut probe = PgConnection::connect(&scratch.url).await?;
    let machine = machine(&mut probe).await;

    let embedded = EmbeddedKafka::start().context("starting the in-process Kafka")?;
    let mut kafka = KafkaSettings::new(embedded.bootstrap_servers());
    kafka.topic_prefix = "bench.".to_owned();
    kafka.group_id = format!("bos-bench-{}", Uuid::new_v4().simple());
    embedded.create_topics(&kafka.topic_prefix, options.partitions)?;

    let rules = Rules::default();
    let latency_events: Vec<usize> = options
        .rates
        .iter()
        .map(|r| usize::try_from(r * options.latency_seconds).unwrap_or(usize::MAX))
        .collect();
    let worker_batches = options.events + latency_events.iter().sum::<usize>();
    progress(&format!(
        "preloading {} batches (+{} for the ceiling)",
        worker_batches,
        options.ceiling_events * 3
    ));
    let mut worker_events = preload(&repo, &rules, worker_batches).await?;
    let batch_row_bytes: i64 = sqlx::query_scalar(
        "SELECT avg(pg_column_size(b.*))::bigint FROM (SELECT * FROM batches LIMIT 1000) b",
    )
    .fetch_one(&mut probe)
    .await?;
    let command_bytes = worker_events
        .first()
        .and_then(|p| p.effects.messages.first())
        .map_or(0, |m| m.payload.len());

    // -------- throughput
    let env: HashMap<String, String> = [
        ("DATABASE_URL", scratch.url.clone()),
        ("KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers.clone()),
        ("BOS_KAFKA_TOPIC_PREFIX", kafka.topic_prefix.clone()),
        ("BOS_KAFKA_GROUP_ID", kafka.group_id.clone()),
        ("BOS_LIBRDKAFKA_LOG_LEVEL", "3".to_owned()),
        // The mock cluster answers a fetch that finds no data only after its
        // whole fetch.wait.max.ms (a broker answers as soon as data arrives):
        // the shortest wait keeps that artefact out of the hop.
        ("BOS_LIBRDKAFKA_FETCH_WAIT_MAX_MS", "1".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    // Settings for the worker and relay processes pass through (BOS__CONSUMER__MAX_BATCH=…).
    .chain(std::env::vars().filter(|(k, _)| {
        k.starts_with("BOS__") || k.starts_with("BOS_LIBRDKAFKA_") || k.starts_with("MALLOC_")
    }))
    .collect();
    let mut worker = Process::start(options, "run", &env)?;
    worker
        .wait_for(
            "bos_rebalances_total{kind=\"assign\"}",
            1.0,
            Duration::from_secs(60),
        )
        .await
        .context("waiting for the worker's partitions")?;
    let commands = Commands::observe(&kafka)?;
    let producer = producer(&kafka)?;
    let outcome_topic = kafka.topic(topics::PHASE_OUTCOME);
    let throughput_events: Vec<Prepared> = worker_events.drain(..options.events).collect();
    settle_database(&mut probe).await;
    progress(&format!("throughput: {} events", options.events));
    let before = Scrape::parse(&worker.metrics().await?);
    let started = Instant::now();
    for p in &throughput_events {
        enqueue(&producer, &outcome_topic, p)?;
    }
    commands
        .wait_for(options.events, Duration::from_secs(600))
        .await?;
    let events_per_s = options.events as f64 / started.elapsed().as_secs_f64();
    drained(&mut probe, Duration::from_secs(60)).await?;
    let after = Scrape::parse(&worker.metrics().await?);
    let throughput_stages = stages(&before, &after);

    // -------- latency
    let mut latency = BTreeMap::new();
    for (&rate, &n) in options.rates.iter().zip(&latency_events) {
        progress(&format!("latency: {n} events at {rate}/s"));
        let events: Vec<Prepared> = worker_events.drain(..n).collect();
        let before = Scrape::parse(&worker.metrics().await?);
        let start = tokio::time::Instant::now();
        let mut produced = Vec::with_capacity(n);
        for (i, p) in events.iter().enumerate() {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
            produced.push(Instant::now());
            enqueue(&producer, &outcome_topic, p)?;
        }
        let total_so_far = options.events
            + latency
                .values()
                .map(|l: &LatencyFigures| l.events)
                .sum::<usize>()
            + n;
        commands
            .wait_for(total_so_far, Duration::from_secs(120))
            .await?;
        drained(&mut probe, Duration::from_secs(60)).await?;
        let after = Scrape::parse(&worker.metrics().await?);
        let mut samples: Vec<f64> = events
            .iter()
            .zip(&produced)
            .filter_map(|(p, sent)| {
                commands
                    .at(&p.batch_id)
                    .map(|at| at.saturating_duration_since(*sent).as_secs_f64() * 1000.0)
            })
            .collect();
        samples.sort_by(f64::total_cmp);
        let stages = stages(&before, &after);
        latency.insert(
            rate.to_string(),
            LatencyFigures {
                rate_per_s: rate,
                events: n,
                p50_ms: percentile(&samples, 0.50),
                p95_ms: percentile(&samples, 0.95),
                p99_ms: percentile(&samples, 0.99),
                max_ms: samples.last().copied().unwrap_or(0.0),
                stages,
                samples_ms: samples,
            },
        );
    }

    // -------- idle: the worker's own database operations, as it counts them
    progress(&format!("idle: {} s", options.idle_seconds));
    let before = Scrape::parse(&worker.metrics().await?);
    tokio::time::sleep(Duration::from_secs(options.idle_seconds)).await;
    let after = Scrape::parse(&worker.metrics().await?);
    let per_min = 60.0 / options.idle_seconds.max(1) as f64;
    let idle_queries_by_operation: BTreeMap<String, f64> = Scrape::operations(&before, &after)
        .into_iter()
        .filter(|(_, n)| *n > 0.0)
        .map(|(op, n)| (op, n * per_min))
        .collect();
    let idle_queries_per_min = idle_queries_by_operation.values().fold(0.0, |a, b| a + b);
    let worker_rss_mb = worker.stop().await?;
    commands.task.abort();

    // -------- relay alone
    progress(&format!("relay alone: {} rows", options.relay_rows));
    let relay = Process::start(options, "relay", &env)?;
    relay
        .wait_for_ready()
        .await
        .context("waiting for the relay")?;
    let payload: String = sqlx::query_scalar("SELECT payload FROM event_outbox LIMIT 1")
        .fetch_one(&mut probe)
        .await?;
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO event_outbox (id, topic, message_key, event_type, correlation_id, payload) \
         SELECT gen_random_uuid(), $1, 'relay-' || (i % $3), $1, gen_random_uuid(), $2 \
         FROM generate_series(1, $4) AS i",
    )
    .bind(topics::NLP_COMMAND)
    .bind(&payload)
    .bind(i64::try_from(options.relay_rows / 4).unwrap_or(1).max(1))
    .bind(i64::try_from(options.relay_rows).unwrap_or(i64::MAX))
    .execute(&mut probe)
    .await?;
    drained(&mut probe, Duration::from_secs(300)).await?;
    let relay_rows_per_s = options.relay_rows as f64 / started.elapsed().as_secs_f64();
    relay.stop().await?;

    // -------- ceiling
    let mut ceiling_by_connections = BTreeMap::new();
    for connections in [1usize, 2, 4] {
        progress(&format!(
            "ceiling: {} events on {connections} connection(s)",
            options.ceiling_events
        ));
        let events = preload(&repo, &rules, options.ceiling_events).await?;
        settle_database(&mut probe).await;
        let rate = ceiling(&scratch.url, events, connections, options.per_commit).await?;
        ceiling_by_connections.insert(connections.to_string(), rate);
    }
    let ceiling_events_per_s = ceiling_by_connections.values().copied().fold(0.0, f64::max);
    probe.close().await?;
    drop(embedded);

    let report = BenchReport {
        machine,
        events: options.events,
        partitions: options.partitions,
        events_per_s,
        throughput_stages,
        ceiling_events_per_s,
        ceiling_by_connections,
        ceiling_ratio: events_per_s / ceiling_events_per_s,
        ceiling_per_commit: options.per_commit,
        latency,
        worker_rss_mb,
        relay_rows_per_s,
        idle_queries_per_min,
        idle_queries_by_operation,
        batch_row_bytes: usize::try_from(batch_row_bytes).unwrap_or(0),
        command_bytes,
    };
    if let Some(dir) = &options.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("latency-cdf.svg"), plot::latency_cdf(&report))?;
        std::fs::write(dir.join("throughput.svg"), plot::throughput(&report))?;
    }
    Ok(report)
}

impl Process {
    async fn wait_for_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self
                .http
                .get(format!("http://127.0.0.1:{}/readyz", self.port))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

mod plot {
    //! Two small SVG figures, written by hand to keep the bench dependency-free.

    use super::BenchReport;

    const W: f64 = 640.0;
    const H: f64 = 360.0;
    const M: f64 = 56.0;
    const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

    fn frame(title: &str, x_label: &str, y_label: &str) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n\
             <line x1=\"{M}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
             <line x1=\"{M}\" y1=\"{M}\" x2=\"{M}\" y2=\"{}\" stroke=\"black\"/>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n\
             <text x=\"14\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {})\">{y_label}</text>\n",
            W / 2.0,
            H - M,
            W - M / 2.0,
            H - M,
            H - M,
            W / 2.0,
            H - 12.0,
            H / 2.0,
            H / 2.0,
        )
    }

    /// Cumulative share of hops against their latency, one line per rate.
    pub fn latency_cdf(report: &BenchReport) -> String {
        let max = report
            .latency
            .values()
            .map(|l| super::percentile(&l.samples_ms, 0.999))
            .fold(1.0, f64::max)
            .ceil();
        let x = |ms: f64| M + (ms.min(max) / max) * (W - 1.5 * M);
        let y = |share: f64| (H - M) - share * (H - 2.0 * M);
        let mut svg = frame(
            "Hop latency (outcome produced → command read back)",
            "milliseconds",
            "share of hops",
        );
        for i in 0..=5 {
            let ms = max * f64::from(i) / 5.0;
            svg += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{ms:.0}</text>\n",
                x(ms),
                H - M + 16.0
            );
            let share = f64::from(i) / 5.0;
            svg += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{share:.1}</text>\n\
                 <line x1=\"{M}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>\n",
                M - 6.0,
                y(share) + 4.0,
                y(share),
                W - M / 2.0,
                y(share)
            );
        }
        for (i, l) in report.latency.values().enumerate() {
            let n = l.samples_ms.len().max(1) as f64;
            let points: Vec<String> = l
                .samples_ms
                .iter()
                .enumerate()
                .step_by((l.samples_ms.len() / 500).max(1))
                .map(|(k, ms)| format!("{:.1},{:.1}", x(*ms), y((k + 1) as f64 / n)))
                .collect();
            let colour = COLOURS[i % COLOURS.len()];
            svg += &format!(
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{}/s: p50 {:.1} ms, p99 {:.1} ms</text>\n",
                points.join(" "),
                W - 250.0,
                H - M - 20.0 - 16.0 * i as f64,
                l.rate_per_s,
                l.p50_ms,
                l.p99_ms
            );
        }
        svg + "</svg>\n"
    }

    /// bos end to end against the ceiling on 1, 2 and 4 connections.
    pub fn throughput(report: &BenchReport) -> String {
        let mut bars: Vec<(String, f64)> =
            vec![("bos, end to end".to_owned(), report.events_per_s)];
        for (connections, rate) in &report.ceiling_by_connections {
            bars.push((format!("ceiling, {connections} conn."), *rate));
        }
        let max = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.1;
        let mut svg = frame("Throughput against the ceiling", "events per second", "");
        let band = (H - 2.0 * M) / bars.len() as f64;
        let x = |v: f64| M + v / max * (W - 1.5 * M);
        for (i, (label, value)) in bars.iter().enumerate() {
            let top = M + band * i as f64 + band * 0.15;
            let colour = if i == 0 { COLOURS[0] } else { "#999" };
            svg += &format!(
                "<rect x=\"{M}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\">{label}: {value:.0}</text>\n",
                x(*value) - M,
                band * 0.7,
                M + 6.0,
                top + band * 0.45,
            );
        }
        let half = report.ceiling_events_per_s / 2.0;
        svg += &format!(
            "<line x1=\"{:.1}\" y1=\"{M}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#d62728\" stroke-dasharray=\"4 3\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#d62728\">50 % of the ceiling</text>\n",
            x(half),
            x(half),
            H - M,
            x(half) + 4.0,
            M - 4.0
        );
        for i in 0..=4 {
            let v = max * f64::from(i) / 4.0;
            svg += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v:.0}</text>\n",
                x(v),
                H - M + 16.0
            );
        }
        svg + "</svg>\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ranks() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn scrapes_give_stage_deltas() {
        let before = Scrape::parse(
            "bos_stage_seconds_bucket{stage=\"fetch\",le=\"0.001\"} 1\n\
             bos_stage_seconds_bucket{stage=\"fetch\",le=\"0.01\"} 2\n\
             bos_stage_seconds_bucket{stage=\"fetch\",le=\"+Inf\"} 2\n\
             bos_stage_seconds_sum{stage=\"fetch\"} 0.006\n\
             bos_stage_seconds_count{stage=\"fetch\"} 2\n",
        );
        let after = Scrape::parse(
            "bos_stage_seconds_bucket{stage=\"fetch\",le=\"0.001\"} 5\n\
             bos_stage_seconds_bucket{stage=\"fetch\",le=\"0.01\"} 6\n\
             bos_stage_seconds_bucket{stage=\"fetch\",le=\"+Inf\"} 6\n\
             bos_stage_seconds_sum{stage=\"fetch\"} 0.012\n\
             bos_stage_seconds_count{stage=\"fetch\"} 6\n",
        );
        let s = Scrape::stage(&before, &after, "fetch");
        assert_eq!(s.observations, 4);
        assert!((s.mean_ms - 1.5).abs() < 1e-9);
        assert_eq!(s.p50_ms, 1.0);
        assert_eq!(s.p99_ms, 1.0);
    }

    #[test]
    fn scratch_urls_keep_the_server_and_options() {
        assert_eq!(
            with_database("postgres://u@h:5432/test?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
    }
}
