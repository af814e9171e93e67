//! `bos demo`: the whole system on one machine with no external service. An
//! in-process Kafka (librdkafka's mock cluster), the in-memory store (or
//! PostgreSQL), the real consumer, relay and rules, and this module playing the
//! upstream services: teachers registering batches and requesting pipelines,
//! class management confirming students, and the essay lifecycle service
//! answering every command after a short random delay.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, Timestamp as KafkaTimestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::embedded::EmbeddedKafka;
use super::upstream;
use crate::app::{Application, Role};
use crate::config::{KafkaSettings, Settings, StoreKind};
use crate::contracts::{topics, BatchStatus, CourseCode, EssayRef};
use crate::domain::{CreditAnswers, Env, RandomIds, Rules};
use crate::store::UnitOfWork;

/// Options of `bos demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub batches: usize,
    pub essays_min: usize,
    pub essays_max: usize,
    /// Chance that one essay fails a phase.
    pub failure_rate: f64,
    /// Chance that a whole phase fails.
    pub phase_failure_rate: f64,
    pub duplicate_rate: f64,
    pub seed: u64,
    /// Upper bound of the essay lifecycle service's answer delay.
    pub max_delay: Duration,
    /// PostgreSQL instead of the in-memory store.
    pub database_url: Option<String>,
    pub timeout: Duration,
}

/// A small deterministic generator (splitmix64): the same seed, the same demo plan.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

const TARGETS: [&str; 4] = ["spellcheck", "nlp", "cj_assessment", "ai_feedback"];

/// What the demo plans for one batch.
struct Plan {
    class_id: Option<String>,
    essays: Vec<EssayRef>,
    targets: Vec<&'static str>,
    next_target: usize,
    fails_validation: bool,
    done: bool,
}

/// A message the worker published.
struct Observed {
    topic: String,
    key: String,
    value: Value,
    /// When the relay produced it (ms since the epoch).
    produced_ms: Option<i64>,
}

/// The demo's closing numbers.
#[derive(Debug, Default)]
pub struct Summary {
    pub batches: usize,
    pub final_status: BTreeMap<String, usize>,
    pub dispatched: BTreeMap<String, usize>,
    pub commands: usize,
    pub redeliveries_absorbed: u64,
    pub ignored: u64,
    pub dead_letters: u64,
    pub latencies_ms: Vec<f64>,
    pub elapsed: Duration,
    pub problems: Vec<String>,
}

impl Summary {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return 0.0;
        }
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[((sorted.len() - 1) as f64 * p).round() as usize]
    }

    /// The table printed at the end.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<38} {v:>10}\n"));
        row("batches", self.batches.to_string());
        for (status, n) in &self.final_status {
            row(&format!("  last run {status}"), n.to_string());
        }
        for (phase, n) in &self.dispatched {
            row(&format!("phases dispatched: {phase}"), n.to_string());
        }
        row("commands published", self.commands.to_string());
        row(
            "duplicates absorbed (inbox)",
            self.redeliveries_absorbed.to_string(),
        );
        row(
            "events ignored (stale / out of state)",
            self.ignored.to_string(),
        );
        row("dead letters", self.dead_letters.to_string());
        row(
            "bos hop: event produced→command p50 (ms)",
            format!("{:.1}", self.percentile(0.5)),
        );
        row(
            "bos hop: event produced→command p99 (ms)",
            format!("{:.1}", self.percentile(0.99)),
        );
        row(
            "wall time (s)",
            format!("{:.1}", self.elapsed.as_secs_f64()),
        );
        row(
            "consistent",
            if self.problems.is_empty() {
                "yes".into()
            } else {
                format!("NO ({})", self.problems.len())
            },
        );
        out
    }
}

/// Reads every partition of `topics` from the beginning (no group to join).
fn observe(
    kafka: &KafkaSettings,
    topics: Vec<String>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<mpsc::UnboundedReceiver<Observed>> {
    let consumer: StreamConsumer = crate::kafka::client_config(kafka)
        .set("group.id", format!("bos-demo-observer-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for topic in &topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                assignment.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)?;
            }
        }
    }
    consumer.assign(&assignment)?;
    let prefix = kafka.topic_prefix.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = consumer.stream();
        loop {
            let message = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                m = stream.next() => m,
            };
            let m = match message {
                None => break,
                // librdkafka recovers from errors (a broker away) on its own.
                Some(Err(_)) => continue,
                Some(Ok(m)) => m,
            };
            let produced_ms = match m.timestamp() {
                KafkaTimestamp::CreateTime(ms) | KafkaTimestamp::LogAppendTime(ms) => Some(ms),
                KafkaTimestamp::NotAvailable => None,
            };
            let observed = Observed {
                produced_ms,
                topic: m
                    .topic()
                    .strip_prefix(&prefix)
                    .unwrap_or(m.topic())
                    .to_owned(),
                key: m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default(),
                value: m
                    .payload()
                    .and_then(|p| serde_json::from_slice(p).ok())
                    .unwrap_or(Value::Null),
            };
            if tx.send(observed).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Sends events the way the upstream services do, some of them twice, and
/// remembers when each batch's latest event was produced.
#[derive(Clone)]
struct Fleet {
    producer: FutureProducer,
    kafka: KafkaSettings,
    produced: Arc<std::sync::Mutex<HashMap<String, i64>>>,
}

impl Fleet {
    async fn send_bytes(&self, topic: &str, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let topic = self.kafka.topic(topic);
        let now = chrono::Utc::now().timestamp_millis();
        self.produced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.to_owned(), now);
        self.producer
            .send(
                FutureRecord::to(&topic)
                    .key(key)
                    .payload(bytes)
                    .timestamp(now),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .context("producing an upstream event")?;
        Ok(())
    }

    fn produced_at(&self, key: &str) -> Option<i64> {
        self.produced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .copied()
    }

    /// Sends `data`; `twice` re-sends the identical record (a redelivery).
    async fn send<D: serde::Serialize>(
        &self,
        topic: &'static str,
        key: &str,
        correlation_id: Uuid,
        data: D,
        twice: bool,
    ) -> anyhow::Result<()> {
        let bytes = upstream::envelope_json(
            topic,
            "demo_upstream",
            Uuid::new_v4(),
            correlation_id,
            chrono::Utc::now(),
            data,
        );
        self.send_bytes(topic, key, &bytes).await?;
        if twice {
            self.send_bytes(topic, key, &bytes).await?;
        }
        Ok(())
    }
}

struct Progress {
    bars: Option<(MultiProgress, HashMap<&'static str, ProgressBar>)>,
    last_line: Instant,
}

impl Progress {
    fn new(batches: usize) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self {
                bars: None,
                last_line: Instant::now(),
            };
        }
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{prefix:>14} [{bar:40}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let mut bars = HashMap::new();
        for name in [
            "batches done",
            "spellcheck",
            "nlp",
            "cj_assessment",
            "ai_feedback",
        ] {
            let bar = multi.add(ProgressBar::new(if name == "batches done" {
                batches as u64
            } else {
                0
            }));
            bar.set_style(style.clone());
            bar.set_prefix(name);
            bars.insert(name, bar);
        }
        Self {
            bars: Some((multi, bars)),
            last_line: Instant::now(),
        }
    }

    fn update(
        &mut self,
        done: usize,
        batches: usize,
        dispatched: &BTreeMap<String, usize>,
        answered: &BTreeMap<String, usize>,
    ) {
        match &self.bars {
            Some((_, bars)) => {
                bars["batches done"].set_position(done as u64);
                for phase in ["spellcheck", "nlp", "cj_assessment", "ai_feedback"] {
                    let bar = &bars[phase];
                    bar.set_length(*dispatched.get(phase).unwrap_or(&0) as u64);
                    bar.set_position(*answered.get(phase).unwrap_or(&0) as u64);
                }
            }
            None if self.last_line.elapsed() > Duration::from_secs(1) || done == batches => {
                self.last_line = Instant::now();
                let phases: Vec<String> = dispatched
                    .iter()
                    .map(|(p, n)| format!("{p} {}/{n}", answered.get(p).unwrap_or(&0)))
                    .collect();
                eprintln!(
                    "progress: {done}/{batches} batches done; {}",
                    phases.join(", ")
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some((_, bars)) = &self.bars {
            for bar in bars.values() {
                bar.finish();
            }
        }
    }
}

/// Runs the demo; the summary's `problems` is empty when the published stream is consistent.
pub async fn run(options: DemoOptions) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let embedded = EmbeddedKafka::start().context("starting the in-process Kafka")?;
    let mut settings = Settings::defaults();
    settings.kafka = KafkaSettings::new(embedded.bootstrap_servers());
    settings.kafka.topic_prefix = "demo.".to_owned();
    settings.kafka.librdkafka = [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
        ("topic.metadata.refresh.interval.ms", "1000"),
        ("log_level", "3"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    settings.relay.poll_interval = Duration::from_secs(5);
    if let Some(url) = &options.database_url {
        settings.store.kind = StoreKind::Postgres;
        settings.database.url = crate::config::Secret::new(url.clone());
    }
    embedded.create_topics(&settings.kafka.topic_prefix, 3)?;
    let kafka = settings.kafka.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app = Application::builder(settings)
        .listener(listener)
        .build(Role::Worker)
        .await?;
    let repo = app.repo();
    let metrics = app.metrics();
    let rules = Rules::default();
    let (stop_tx, stop) = watch::channel(false);
    let running = tokio::spawn(app.run_until_stopped(stop.clone()));
    // The hop is measured from a running worker: wait for its partitions first.
    let joined = Instant::now();
    while metrics.rebalances.with_label_values(&["assign"]).get() == 0 {
        anyhow::ensure!(
            joined.elapsed() < Duration::from_secs(60),
            "the worker got no partitions within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let published: Vec<String> = topics::PUBLISHED.iter().map(|t| kafka.topic(t)).collect();
    let mut observed = observe(&kafka, published, stop.clone())?;
    let fleet = Fleet {
        producer: rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka.bootstrap_servers)
            .set("linger.ms", "0")
            .set("log_level", "3")
            .create()?,
        kafka: kafka.clone(),
        produced: Arc::default(),
    };

    // Plan and register every batch.
    let mut rng = Rng(options.seed);
    let mut plans: HashMap<String, Plan> = HashMap::new();
    let mut requests: HashMap<Uuid, usize> = HashMap::new();
    for i in 0..options.batches {
        let regular = rng.chance(0.3);
        let n = rng.range(options.essays_min, options.essays_max);
        // A few teachers forget the prompt: prompt-dependent pipelines are then refused.
        let prompt = (!rng.chance(0.05)).then(|| upstream::prompt_ref(&format!("prompt-{i}")));
        let request = crate::domain::RegistrationRequest {
            expected_essay_count: i64::try_from(n).unwrap_or(1),
            essay_ids: None,
            course_code: [CourseCode::Eng5, CourseCode::Eng6, CourseCode::Sv1][i % 3],
            student_prompt_ref: prompt,
            user_id: format!("teacher-{}", i % 7),
            org_id: Some("demo-school".into()),
            class_id: regular.then(|| format!("class-{}", i % 5)),
            cj_default_llm_model: None,
            cj_default_temperature: None,
            assignment_id: None,
        };
        let answers = CreditAnswers::new();
        let effects = rules
            .register(
                &request,
                Uuid::new_v4(),
                &mut Env {
                    now: chrono::Utc::now(),
                    ids: &mut RandomIds,
                    credits: &answers,
                },
            )
            .map_err(|e| anyhow::anyhow!("demo registration rejected: {e:?}"))?;
        let batch = effects.batch;
        repo.commit(UnitOfWork::create(batch.clone(), effects.messages))
            .await
            .context("registering a demo batch")?;
        let essays: Vec<EssayRef> = batch
            .context
            .essay_ids
            .iter()
            .map(|id| EssayRef::new(id.clone(), format!("original-{id}")))
            .collect();
        let mut targets = vec![TARGETS[rng.range(0, 3)]];
        if rng.chance(0.3) {
            targets.push(TARGETS[rng.range(0, 3)]);
        }
        let fails_validation = rng.chance(0.03);
        let plan = Plan {
            class_id: request.class_id.clone(),
            essays,
            targets,
            next_target: 0,
            fails_validation,
            done: false,
        };
        let twice = rng.chance(options.duplicate_rate);
        let corr = Uuid::new_v4();
        requests.insert(corr, 0);
        fleet
            .send(
                topics::CLIENT_PIPELINE_REQUEST,
                &batch.id,
                corr,
                upstream::pipeline_request(&batch.id, plan.targets[0], &request.user_id),
                twice,
            )
            .await?;
        if fails_validation {
            let errors = upstream::validation_errors(
                &batch.id,
                &[plan.essays[0].essay_id.clone()],
                true,
                chrono::Utc::now(),
            );
            fleet
                .send(
                    topics::VALIDATION_ERRORS,
                    &batch.id,
                    Uuid::new_v4(),
                    errors,
                    false,
                )
                .await?;
        } else {
            let content = upstream::content_provisioned(
                &batch.id,
                request.course_code,
                &request.user_id,
                &plan.essays,
            );
            fleet
                .send(
                    topics::CONTENT_PROVISIONING_COMPLETED,
                    &batch.id,
                    Uuid::new_v4(),
                    content,
                    rng.chance(options.duplicate_rate),
                )
                .await?;
        }
        plans.insert(batch.id, plan);
    }

    let mut summary = Summary {
        batches: options.batches,
        ..Summary::default()
    };
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen_ids: HashSet<String> = HashSet::new();
    let mut decisions: HashMap<(String, String, String), HashSet<String>> = HashMap::new();
    let mut progress = Progress::new(options.batches);
    let deadline = Instant::now() + options.timeout;
    let mut done = 0;
    while done < options.batches {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(message)) = tokio::time::timeout(remaining, observed.recv()).await else {
            summary.problems.push(format!(
                "timed out with {} of {} batches done",
                done, options.batches
            ));
            break;
        };
        let event_id = message.value["event_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let correlation = message.value["correlation_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let data = &message.value["data"];
        let identity = match message.topic.as_str() {
            topics::TEACHER_NOTIFICATION => format!("{correlation}/{}", data["notification_type"]),
            topics::BATCH_ESSAYS_REGISTERED => String::new(),
            _ => correlation.clone(),
        };
        decisions
            .entry((message.topic.clone(), message.key.clone(), identity))
            .or_default()
            .insert(event_id.clone());
        if !seen_ids.insert(event_id) {
            continue; // an exact re-publish: consumers dedupe it
        }
        let batch_id = message.key.clone();
        let Some(plan) = plans.get_mut(&batch_id) else {
            continue;
        };
        let is_command = upstream::phase_of_command(&message.topic).is_some()
            || message.topic == topics::STUDENT_MATCHING_COMMAND;
        if is_command {
            if let (Some(sent), Some(published)) =
                (fleet.produced_at(&batch_id), message.produced_ms)
            {
                if published >= sent {
                    summary.latencies_ms.push((published - sent) as f64);
                }
            }
        }
        if let Some(phase) = upstream::phase_of_command(&message.topic) {
            *summary
                .dispatched
                .entry(phase.as_str().to_owned())
                .or_default() += 1;
            summary.commands += 1;
            let dispatched: Vec<EssayRef> =
                serde_json::from_value(data["essays_to_process"].clone()).unwrap_or_default();
            let phase_fails = rng.chance(options.phase_failure_rate);
            let (failed, processed): (Vec<EssayRef>, Vec<EssayRef>) = dispatched
                .into_iter()
                .partition(|_| phase_fails || rng.chance(options.failure_rate));
            let failed: Vec<String> = failed.into_iter().map(|e| e.essay_id).collect();
            let corr: Uuid = correlation.parse().unwrap_or_default();
            let outcome = upstream::phase_outcome(&batch_id, phase, &processed, &failed, corr);
            let delay =
                Duration::from_millis(rng.next() % (options.max_delay.as_millis() as u64 + 1));
            let (twice, stale) = (
                rng.chance(options.duplicate_rate),
                rng.chance(options.duplicate_rate / 2.0),
            );
            let fleet = fleet.clone();
            let key = batch_id.clone();
            *answered.entry(phase.as_str().to_owned()).or_default() += 1;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = fleet
                    .send(topics::PHASE_OUTCOME, &key, corr, outcome.clone(), twice)
                    .await;
                if stale {
                    // A late copy under a new event id: the rules see it is stale.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = fleet
                        .send(topics::PHASE_OUTCOME, &key, corr, outcome, false)
                        .await;
                }
            });
        } else {
            match message.topic.as_str() {
                topics::STUDENT_MATCHING_COMMAND => {
                    let class_id = plan.class_id.clone().unwrap_or_default();
                    let ids: Vec<String> = plan.essays.iter().map(|e| e.essay_id.clone()).collect();
                    let now = chrono::Utc::now();
                    let course = CourseCode::parse(data["course_code"].as_str().unwrap_or("ENG5"))
                        .unwrap_or(CourseCode::Eng5);
                    let confirm =
                        upstream::associations_confirmed(&batch_id, &class_id, course, &ids, now);
                    let ready =
                        upstream::essays_ready(&batch_id, course, "REGULAR", &plan.essays, now);
                    // Either may arrive first; only the first is sent twice.
                    let mut order = [
                        (topics::BATCH_ESSAYS_READY, serde_json::to_value(ready)?),
                        (
                            topics::STUDENT_ASSOCIATIONS_CONFIRMED,
                            serde_json::to_value(confirm)?,
                        ),
                    ];
                    if rng.chance(0.5) {
                        order.reverse();
                    }
                    let twice = rng.chance(options.duplicate_rate);
                    for (i, (topic, data)) in order.into_iter().enumerate() {
                        fleet
                            .send(topic, &batch_id, Uuid::new_v4(), data, twice && i == 0)
                            .await?;
                    }
                }
                topics::PIPELINE_COMPLETED | topics::PIPELINE_DENIED => {
                    if let Ok(corr) = correlation.parse::<Uuid>() {
                        *requests.entry(corr).or_default() += 1;
                    }
                    plan.next_target += 1;
                    if plan.next_target < plan.targets.len() && !plan.fails_validation {
                        let corr = Uuid::new_v4();
                        requests.insert(corr, 0);
                        let target = plan.targets[plan.next_target];
                        fleet
                            .send(
                                topics::CLIENT_PIPELINE_REQUEST,
                                &batch_id,
                                corr,
                                upstream::pipeline_request(&batch_id, target, "teacher"),
                                rng.chance(options.duplicate_rate),
                            )
                            .await?;
                    } else if !plan.done {
                        plan.done = true;
                        done += 1;
                        let status = if message.topic == topics::PIPELINE_DENIED {
                            format!("denied ({})", data["denial_reason"].as_str().unwrap_or("?"))
                        } else {
                            data["final_status"].as_str().unwrap_or("?").to_owned()
                        };
                        *summary.final_status.entry(status).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        progress.update(done, options.batches, &summary.dispatched, &answered);
    }
    progress.finish();

    // Let late duplicates and stale copies arrive, then check the stream and the store.
    tokio::time::sleep(Duration::from_millis(
        options.max_delay.as_millis() as u64 + 300,
    ))
    .await;
    for (corr, n) in &requests {
        if *n != 1 {
            summary
                .problems
                .push(format!("request {corr} answered {n} times"));
        }
    }
    for (decision, ids) in &decisions {
        if ids.len() > 1 {
            summary.problems.push(format!(
                "{decision:?} published under {} event ids",
                ids.len()
            ));
        }
    }
    for (batch_id, plan) in &plans {
        let Some(batch) = repo.get_batch(batch_id).await? else {
            summary.problems.push(format!("batch {batch_id} missing"));
            continue;
        };
        if batch.parked.is_some() {
            summary
                .problems
                .push(format!("batch {batch_id} has a parked request left"));
        }
        if plan.fails_validation && batch.status != BatchStatus::FailedCritically {
            summary.problems.push(format!(
                "batch {batch_id} failed validation but is {}",
                batch.status
            ));
        }
        if !plan.fails_validation && batch.status != BatchStatus::ReadyForPipelineExecution {
            summary
                .problems
                .push(format!("batch {batch_id} ended {}", batch.status));
        }
    }
    summary.redeliveries_absorbed = metrics.duplicates.get();
    summary.ignored = topics::CONSUMED
        .iter()
        .map(|t| metrics.messages.with_label_values(&[t, "ignored"]).get())
        .sum();
    summary.dead_letters = topics::CONSUMED
        .iter()
        .map(|t| {
            metrics
                .messages
                .with_label_values(&[t, "dead_letter"])
                .get()
        })
        .sum();
    summary.elapsed = started.elapsed();

    let _ = stop_tx.send(true);
    match running.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => summary
            .problems
            .push(format!("the worker stopped with an error: {e:#}")),
        Err(e) => summary.problems.push(format!("the worker panicked: {e}")),
    }
    drop(fleet);
    drop(embedded);
    Ok(summary)
}
