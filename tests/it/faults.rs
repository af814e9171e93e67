//! The fault matrix. Each scenario drives at least 1,000 inbound events for
//! at least 100 batches through whole pipelines (GUEST and REGULAR, partial
//! failures, every event sent twice, some in the other order the protocol
//! allows, a few poison records) with two `bos run` workers in one group and a
//! separate `bos relay`, while a fault is injected again and again. After the
//! faults stop and the system settles, the invariants are checked: every
//! request answered once, no decision published under two event ids, the
//! outbox drained, each poison record dead-lettered as often as it was sent,
//! no process panicked. `BOS_FAULT_EVENTS=10000` runs the long variant.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bos::contracts::{topics, CourseCode, EssayRef, PhaseName};
use bos::sim::upstream;
use bos::store::{PgRepository, Repository, UnitOfWork};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::support::app::{environment, BosProcess};
use crate::support::kafka::{kafka_settings, Cluster, Observer, Seen, Upstream};
use crate::support::pg::{server_url, with_database, Database, PgCluster};
use crate::support::{envelope, new_batch};

/// Scenarios run one at a time: each keeps both cores busy.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    kill_workers: bool,
    cut_connections: bool,
    restart_database: bool,
    broker_outage: bool,
    rebalance: bool,
    graceful_stops: bool,
    relay_race: bool,
}

impl Faults {
    fn all() -> Self {
        Self {
            kill_workers: true,
            cut_connections: true,
            restart_database: true,
            broker_outage: true,
            rebalance: true,
            graceful_stops: true,
            relay_race: true,
        }
    }
}

type BrokerFault = (bool, Option<Vec<RDKafkaApiKey>>);

/// Whether a process ended by SIGKILL (a fault counts only when it happened).
fn killed(status: Option<std::process::ExitStatus>) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.and_then(|s| s.signal()) == Some(9)
}

/// Runs `work` while applying the broker faults the injector asks for.
async fn applying_broker_faults<T>(
    work: impl std::future::Future<Output = T>,
    faults: &mut tokio::sync::mpsc::UnboundedReceiver<BrokerFault>,
    mock: &rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            Some((down, errors)) = faults.recv() => {
                if std::env::var_os("BOS_FAULT_TRACE").is_some() {
                    eprintln!("broker {}", if down { "down" } else { "up" });
                }
                if down {
                    mock.broker_down(1).unwrap();
                } else {
                    mock.broker_up(1).unwrap();
                    for api in errors.into_iter().flatten() {
                        mock.request_errors(api, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 3]);
                    }
                }
            }
        }
    }
}

/// A small deterministic generator.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() as usize) % items.len()]
    }
}

const TARGETS: [&str; 4] = ["spellcheck", "nlp", "cj_assessment", "ai_feedback"];

/// A batch's essays, its class (REGULAR) or none, and the requests still to make.
type Plan = (Vec<EssayRef>, Option<String>, Vec<&'static str>);

/// The upstream services' side of the run: what was sent, what is owed.
struct Workload {
    up: Upstream,
    rng: Lcg,
    /// Per batch: essays, class (REGULAR) or not, requests still to make.
    batches: HashMap<String, Plan>,
    /// Request correlation id → batch.
    requests: HashMap<Uuid, String>,
    /// Poison payloads and how often each was sent, by topic.
    poison: HashMap<(String, Vec<u8>), usize>,
    answered: HashSet<String>,
    events: usize,
    cursor: usize,
}

impl Workload {
    /// Sends `bytes` twice, as a redelivering producer would.
    async fn twice(&mut self, topic: &str, key: &str, bytes: &[u8]) {
        self.up.send_raw(topic, key, bytes, &[]).await;
        self.up.send_raw(topic, key, bytes, &[]).await;
        self.events += 2;
    }

    async fn event<D: serde::Serialize>(&mut self, topic: &'static str, key: &str, data: D) {
        let bytes = envelope(topic, Uuid::new_v4(), data);
        self.twice(topic, key, &bytes).await;
    }

    async fn request(&mut self, batch: &str, target: &'static str) {
        let correlation = Uuid::new_v4();
        self.requests.insert(correlation, batch.to_owned());
        let bytes = upstream::envelope_json(
            topics::CLIENT_PIPELINE_REQUEST,
            "api_gateway_service",
            Uuid::new_v4(),
            correlation,
            chrono::Utc::now(),
            upstream::pipeline_request(batch, target, crate::support::TEACHER),
        );
        self.twice(topics::CLIENT_PIPELINE_REQUEST, batch, &bytes)
            .await;
    }

    async fn start_batch(&mut self, id: &str) {
        let (essays, _, requests) = self.batches[id].clone();
        let first = requests[0];
        let provision = upstream::content_provisioned(id, CourseCode::Eng5, "t", &essays);
        // Some requests come before the content (they park).
        if self.rng.chance(20) {
            self.request(id, first).await;
            self.event(topics::CONTENT_PROVISIONING_COMPLETED, id, provision)
                .await;
        } else {
            self.event(topics::CONTENT_PROVISIONING_COMPLETED, id, provision)
                .await;
            self.request(id, first).await;
        }
        if let Some(r) = self.batches.get_mut(id) {
            r.2.remove(0);
        }
    }

    async fn poison(&mut self, topic: &'static str, key: &str, bytes: Vec<u8>) {
        *self
            .poison
            .entry((topic.to_owned(), bytes.clone()))
            .or_default() += 2;
        self.twice(topic, key, &bytes).await;
    }

    /// Answers what bos published since the last call.
    async fn respond(&mut self, seen: &[Seen]) {
        while self.cursor < seen.len() {
            let m = seen[self.cursor].clone();
            self.cursor += 1;
            let Some(event_id) = m.value["event_id"].as_str().map(str::to_owned) else {
                continue;
            };
            if !self.answered.insert(event_id) {
                continue; // an exact re-publish
            }
            let batch = m.key.clone().unwrap_or_default();
            let Some((essays, class_id, _)) = self.batches.get(&batch).cloned() else {
                continue;
            };
            let correlation: Uuid = m.value["correlation_id"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .unwrap_or_default();
            if let Some(phase) = upstream::phase_of_command(&m.topic) {
                let dispatched: Vec<EssayRef> =
                    serde_json::from_value(m.value["data"]["essays_to_process"].clone())
                        .unwrap_or_default();
                let (failed, processed): (Vec<_>, Vec<_>) =
                    dispatched.into_iter().partition(|_| self.rng.chance(10));
                let failed: Vec<String> = failed.into_iter().map(|e| e.essay_id).collect();
                let outcome =
                    upstream::phase_outcome(&batch, phase, &processed, &failed, correlation);
                let bytes = upstream::envelope_json(
                    topics::PHASE_OUTCOME,
                    "essay_lifecycle_service",
                    Uuid::new_v4(),
                    correlation,
                    chrono::Utc::now(),
                    &outcome,
                );
                self.twice(topics::PHASE_OUTCOME, &batch, &bytes).await;
                if self.rng.chance(5) {
                    // A late copy under a new event id: stale or out of state.
                    self.event(topics::PHASE_OUTCOME, &batch, outcome).await;
                }
            } else if m.topic == topics::STUDENT_MATCHING_COMMAND {
                let class = class_id.unwrap_or_default();
                let ids: Vec<String> = essays.iter().map(|e| e.essay_id.clone()).collect();
                let now = chrono::Utc::now();
                let confirm =
                    upstream::associations_confirmed(&batch, &class, CourseCode::Eng5, &ids, now);
                let ready =
                    upstream::essays_ready(&batch, CourseCode::Eng5, "REGULAR", &essays, now);
                if self.rng.chance(50) {
                    self.event(topics::BATCH_ESSAYS_READY, &batch, ready).await;
                    self.event(topics::STUDENT_ASSOCIATIONS_CONFIRMED, &batch, confirm)
                        .await;
                } else {
                    self.event(topics::STUDENT_ASSOCIATIONS_CONFIRMED, &batch, confirm)
                        .await;
                    self.event(topics::BATCH_ESSAYS_READY, &batch, ready).await;
                }
            } else if m.topic == topics::PIPELINE_COMPLETED || m.topic == topics::PIPELINE_DENIED {
                let next = self
                    .batches
                    .get_mut(&batch)
                    .and_then(|b| (!b.2.is_empty()).then(|| b.2.remove(0)));
                if let Some(target) = next {
                    self.request(&batch, target).await;
                }
            }
        }
    }
}

/// What the scenario measured.
#[derive(Debug, Default)]
struct Report {
    events: usize,
    faults: usize,
    lost: usize,
    doubled: usize,
    republished: usize,
    letters: usize,
    problems: Vec<String>,
}

/// Where a batch stands, for a failure message: its state, its outbox rows and
/// the events it consumed.
async fn explain(repo: &Arc<dyn Repository>, pool: &sqlx::PgPool, batch: &str) -> String {
    let state = match repo.get_batch(batch).await {
        Ok(Some(b)) => format!(
            "status {} run {:?} phases {:?}",
            b.status,
            b.orchestration.current_run.as_ref().map(|r| (
                r.requested_pipeline,
                r.current,
                &r.phases
            )),
            [
                PhaseName::Spellcheck,
                PhaseName::Nlp,
                PhaseName::CjAssessment,
                PhaseName::AiFeedback,
                PhaseName::StudentMatching
            ]
            .map(|p| (p, b.pipeline.phase(p).status)),
        ),
        other => format!("{other:?}"),
    };
    let outbox: Vec<String> = repo
        .outbox_rows(Some(batch))
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| format!("{}@{}", r.topic, r.published_at.is_some()))
                .collect()
        })
        .unwrap_or_default();
    let inbox: Vec<(String, i64)> = sqlx::query_as(
        "SELECT topic, count(*) FROM processed_events WHERE batch_id = $1 GROUP BY topic ORDER BY topic",
    )
    .bind(batch)
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    format!("{state}; outbox {outbox:?}; inbox {inbox:?}")
}

/// Retries a database read while the faults run.
async fn read<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, bos::store::StoreError>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

async fn scenario(name: &str, faults: Faults) -> Report {
    let _serial = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let events_target: usize = std::env::var("BOS_FAULT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let batches = (events_target / 8).max(120);
    let cluster = Cluster::start().await;
    let Some(mock) = cluster.mock() else {
        panic!("the fault matrix needs the mock cluster (unset KAFKA_BOOTSTRAP_SERVERS)");
    };
    let mut kafka = kafka_settings(&cluster);
    kafka
        .librdkafka
        .insert("message.timeout.ms".into(), "5000".into());
    // A member that died is noticed within 3 s (faults come every few seconds).
    kafka
        .librdkafka
        .insert("session.timeout.ms".into(), "3000".into());
    cluster.create_topics(&kafka.topic_prefix, 4).await;
    // The database: the shared server, or a cluster of the scenario's own to restart.
    let own = faults.restart_database.then(|| {
        let dir =
            crate::support::pg::target_dir().join(format!("fault-pg-{}", Uuid::new_v4().simple()));
        let c = PgCluster::init(&dir).expect("initdb");
        c.start().expect("pg_ctl start");
        Arc::new(c)
    });
    let server = match &own {
        Some(c) => c.url("postgres"),
        None => server_url().await,
    };
    let database = Database::fresh_on(&server).await;
    let repo = PgRepository::from_pool(database.pool.clone());
    repo.migrate().await.unwrap();
    let repo: Arc<dyn Repository> = Arc::new(repo);
    let mut env = environment(&kafka, &database.url);
    for (k, v) in [
        ("BOS__RELAY__LEASE", "3s"),
        ("BOS__RELAY__RETRY_MAX", "2s"),
        ("BOS__CONSUMER__BACKOFF_MAX", "2s"),
        ("BOS__CONSUMER__DRAIN_TIMEOUT", "20s"),
        ("BOS__DATABASE__ACQUIRE_TIMEOUT", "3s"),
        ("BOS__DATABASE__MAX_CONNECTIONS", "6"),
    ] {
        env.insert(k.to_owned(), v.to_owned());
    }
    let mut workers = vec![
        BosProcess::start("worker-a", "run", &env),
        BosProcess::start("worker-b", "run", &env),
    ];
    let mut relays = vec![BosProcess::start("relay-1", "relay", &env)];
    if faults.relay_race {
        relays.push(BosProcess::start("relay-2", "relay", &env));
        relays.push(BosProcess::start("relay-3", "relay", &env));
    }
    for p in workers.iter().chain(&relays) {
        assert!(
            p.ready(Duration::from_secs(60)).await,
            "{} never ready: {:?}",
            p.name,
            p.log()
        );
    }
    let observer = Observer::published(&kafka);
    let mut w = Workload {
        up: Upstream::new(&kafka),
        rng: Lcg(name.bytes().map(u64::from).sum()),
        batches: HashMap::new(),
        requests: HashMap::new(),
        poison: HashMap::new(),
        answered: HashSet::new(),
        events: 0,
        cursor: 0,
    };
    let mut ids = Vec::new();
    for i in 0..batches {
        let regular = w.rng.chance(30);
        let (mut batch, _) = new_batch(0);
        batch.context.class_id = regular.then(|| format!("class-{i}"));
        let essays: Vec<EssayRef> = (0..2 + (i % 3))
            .map(|e| EssayRef::new(format!("b{i}-e{e}"), format!("s{i}-{e}")))
            .collect();
        let mut requests = vec![w.rng.pick(&TARGETS)];
        if w.rng.chance(30) {
            requests.push(w.rng.pick(&TARGETS));
        }
        w.batches.insert(
            batch.id.clone(),
            (essays, batch.context.class_id.clone(), requests),
        );
        ids.push(batch.id.clone());
        repo.commit(UnitOfWork::create(batch, Vec::new()))
            .await
            .unwrap();
    }
    // The fault injector runs while the workload does.
    let (stop_faults, mut faults_stopped) = tokio::sync::watch::channel(false);
    let (rounds_tx, rounds_rx) = tokio::sync::watch::channel(0u64);
    // Every fault comes at least this often while the workload runs.
    let min_rounds: u64 = if faults.restart_database { 3 } else { 4 };
    let injector = {
        let env = env.clone();
        let admin_url = with_database(&server, "postgres");
        let db_name = database.url.rsplit('/').next().unwrap().to_owned();
        let own_cluster = own.clone();
        let mut rng = Lcg(7 + name.len() as u64);
        let (mut procs, mut relays) = (std::mem::take(&mut workers), std::mem::take(&mut relays));
        let (broker_tx, broker_rx) = tokio::sync::mpsc::unbounded_channel::<BrokerFault>();
        let task = tokio::spawn(async move {
            let mut count = 0usize;
            let mut rounds = 0u64;
            let mut problems = Vec::new();
            let mut extra: Option<BosProcess> = None;
            let mut db_restarts = 0;
            let mut broker_outages = 0;
            loop {
                let pause = if rounds == 0 {
                    Duration::from_millis(1_500)
                } else {
                    Duration::from_millis(3_000 + rng.next() % 2_000)
                };
                tokio::select! {
                    _ = faults_stopped.changed() => break,
                    () = tokio::time::sleep(pause) => {}
                }
                rounds += 1;
                if faults.kill_workers {
                    let i = (rng.next() as usize) % procs.len();
                    procs[i].signal("KILL");
                    let status = procs[i].wait(Duration::from_secs(10)).await;
                    count += usize::from(killed(status));
                    procs[i] = procs[i].restart();
                }
                if faults.graceful_stops {
                    let i = (rng.next() as usize) % procs.len();
                    // A running worker, mid-flight (one restarted a moment ago may still be starting).
                    let _ = procs[i].ready(Duration::from_secs(20)).await;
                    procs[i].signal("TERM");
                    match procs[i].wait(Duration::from_secs(40)).await {
                        Some(status) if status.success() => {
                            if !procs[i].logged("drain complete") {
                                problems
                                    .push(format!("{} exited 0 without draining", procs[i].name));
                            }
                        }
                        other => {
                            problems.push(format!("{} after SIGTERM: {other:?}", procs[i].name));
                        }
                    }
                    procs[i] = procs[i].restart();
                    count += 1;
                }
                if faults.cut_connections {
                    if let Ok(admin) = sqlx::PgPool::connect(&admin_url).await {
                        let cut: i64 = sqlx::query_scalar("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
                            .bind(&db_name)
                            .fetch_one(&admin)
                            .await
                            .unwrap_or(0);
                        admin.close().await;
                        count += usize::from(cut > 0);
                    }
                }
                if faults.restart_database && db_restarts < 2 && rounds % 2 == 1 {
                    if let Some(cluster) = &own_cluster {
                        let _ = cluster.stop();
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        cluster.start().expect("the database starts again");
                        db_restarts += 1;
                        count += 1;
                    }
                }
                if faults.broker_outage {
                    // Two outages, shorter and then longer than the producers'
                    // message timeout (5 s); every round, errors on produce,
                    // fetch and commit requests.
                    let errors = Some(vec![
                        RDKafkaApiKey::Produce,
                        RDKafkaApiKey::Fetch,
                        RDKafkaApiKey::OffsetCommit,
                    ]);
                    if broker_outages < 2 {
                        let outage = if broker_outages == 0 { 2 } else { 8 };
                        let _ = broker_tx.send((true, None));
                        tokio::time::sleep(Duration::from_secs(outage)).await;
                        broker_outages += 1;
                    }
                    let _ = broker_tx.send((false, errors));
                    count += 1;
                }
                if faults.rebalance {
                    match extra.take() {
                        None => extra = Some(BosProcess::start("worker-c", "run", &env)),
                        Some(mut p) => {
                            p.signal("TERM");
                            let _ = p.wait(Duration::from_secs(40)).await;
                        }
                    }
                    count += 1;
                }
                if faults.relay_race && rounds % 2 == 1 {
                    let i = 1 + (rng.next() as usize) % (relays.len() - 1);
                    relays[i].signal("KILL");
                    let status = relays[i].wait(Duration::from_secs(10)).await;
                    count += usize::from(killed(status));
                    relays[i] = relays[i].restart();
                }
                let _ = rounds_tx.send(rounds);
            }
            if let Some(mut p) = extra {
                p.signal("TERM");
                let _ = p.wait(Duration::from_secs(40)).await;
            }
            (count, problems, procs, relays)
        });
        (task, broker_rx)
    };
    let (injector, mut broker_rx) = injector;
    let poison_topics = [
        topics::PHASE_OUTCOME,
        topics::CLIENT_PIPELINE_REQUEST,
        topics::BATCH_ESSAYS_READY,
    ];
    // Spread over ~16 s, so the faults meet work in flight; the faults go on
    // until every request is answered.
    let per_tick = (batches / 80).max(1);
    let mut next = 0;
    let answers_due = |w: &Workload, seen: &[Seen]| -> usize {
        let answered: HashSet<Uuid> = seen
            .iter()
            .filter(|s| s.topic == topics::PIPELINE_COMPLETED || s.topic == topics::PIPELINE_DENIED)
            .filter_map(|s| {
                s.value["correlation_id"]
                    .as_str()
                    .and_then(|c| c.parse().ok())
            })
            .collect();
        w.requests.keys().filter(|c| !answered.contains(c)).count()
            + w.batches.values().map(|b| b.2.len()).sum::<usize>()
    };
    // Faults go on while work is in flight, but not for ever: once the
    // workload is out, at most another minute of them, then the system settles.
    let deadline = Instant::now() + Duration::from_secs(420);
    let mut workload_sent: Option<Instant> = None;
    loop {
        // Broker faults are applied while the upstream's sends wait for the
        // broker: the mock cluster lives in this task.
        let round = async {
            if next < ids.len() {
                for id in &ids[next..(next + per_tick).min(ids.len())] {
                    w.start_batch(id).await;
                    if w.rng.chance(5) {
                        let topic = w.rng.pick(&poison_topics);
                        let bytes = if w.rng.chance(50) {
                            format!("{{not json {id}").into_bytes()
                        } else {
                            envelope(
                                topic,
                                Uuid::new_v4(),
                                upstream::pipeline_request(&format!("no-such-{id}"), "nlp", "t"),
                            )
                        };
                        let topic = if bytes.starts_with(b"{\"") {
                            topics::CLIENT_PIPELINE_REQUEST
                        } else {
                            topic
                        };
                        w.poison(topic, id, bytes).await;
                    }
                }
                next += per_tick;
            }
            let seen = observer.all();
            w.respond(&seen).await;
            seen
        };
        let seen = applying_broker_faults(round, &mut broker_rx, mock.cluster()).await;
        let due = answers_due(&w, &seen);
        if std::env::var_os("BOS_FAULT_TRACE").is_some() {
            eprintln!(
                "{:>6.1}s sent {} seen {} due {due}",
                started.elapsed().as_secs_f64(),
                w.events,
                seen.len()
            );
        }
        let enough_faults = *rounds_rx.borrow() >= min_rounds;
        if next >= ids.len() {
            let sent = *workload_sent.get_or_insert_with(Instant::now);
            if enough_faults && (due == 0 || sent.elapsed() > Duration::from_secs(60)) {
                break;
            }
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_faults.send(true);
    let (faults_injected, mut problems, mut procs, mut relays) =
        applying_broker_faults(injector, &mut broker_rx, mock.cluster())
            .await
            .unwrap();
    mock.cluster().broker_up(1).unwrap();
    // Settle: everything answered, the outbox drained, every letter out.
    let settle_by = Instant::now() + Duration::from_secs(180);
    loop {
        let seen = observer.all();
        w.respond(&seen).await;
        let due = answers_due(&w, &seen);
        let unpublished = read("outbox stats", || repo.outbox_stats())
            .await
            .unpublished;
        if due == 0 && unpublished == 0 || Instant::now() > settle_by {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Letters, read from the dead-letter topics.
    let dlq_names: Vec<String> = poison_topics
        .iter()
        .map(|t| kafka.topic(&format!("{t}{}", topics::DLQ_SUFFIX)))
        .collect();
    let letters_observer = Observer::start(&kafka, &dlq_names);
    let expected_letters: usize = w.poison.values().sum();
    let letters_by = Instant::now() + Duration::from_secs(30);
    while letters_observer.all().len() < expected_letters && Instant::now() < letters_by {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let letters = letters_observer.all();
    let mut report = Report {
        events: w.events,
        faults: faults_injected,
        ..Report::default()
    };
    // Letters: exactly as often as sent (exact re-publishes counted apart).
    let mut letter_ids: HashMap<(String, Vec<u8>), HashSet<String>> = HashMap::new();
    for l in &letters {
        let source = l.topic.trim_end_matches(topics::DLQ_SUFFIX).to_owned();
        letter_ids
            .entry((source, l.raw.clone()))
            .or_default()
            .insert(l.header("dlq.id").unwrap_or_default().to_owned());
    }
    report.letters = letter_ids.values().map(HashSet::len).sum();
    report.republished += letters.len() - report.letters;
    for (key, sent) in &w.poison {
        let got = letter_ids.get(key).map_or(0, HashSet::len);
        if got != *sent {
            problems.push(format!(
                "poison on {} sent {sent} times, dead-lettered {got} times",
                key.0
            ));
        }
    }
    // Decisions: one event id each; every request answered once.
    let seen = observer.all();
    let mut decisions: BTreeMap<(String, String, String, String), HashSet<String>> =
        BTreeMap::new();
    for s in &seen {
        crate::support::assert_valid_published(&s.topic, &s.value);
        let kind = s.value["data"]["notification_type"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        decisions
            .entry((
                s.topic.clone(),
                s.key.clone().unwrap_or_default(),
                s.value["correlation_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                kind,
            ))
            .or_default()
            .insert(s.value["event_id"].as_str().unwrap_or_default().to_owned());
    }
    report.doubled = decisions.values().filter(|ids| ids.len() > 1).count();
    report.republished += seen.len() - decisions.values().map(HashSet::len).sum::<usize>();
    for (decision, ids) in &decisions {
        if ids.len() > 1 {
            problems.push(format!(
                "{decision:?} published under {} event ids",
                ids.len()
            ));
        }
    }
    let mut answers: HashMap<Uuid, usize> = HashMap::new();
    for (topic, _, correlation, _) in decisions.keys() {
        if topic == topics::PIPELINE_COMPLETED || topic == topics::PIPELINE_DENIED {
            if let Ok(c) = correlation.parse() {
                *answers.entry(c).or_default() += 1;
            }
        }
    }
    for (correlation, batch) in &w.requests {
        match answers.get(correlation).copied().unwrap_or(0) {
            1 => {}
            0 => {
                report.lost += 1;
                problems.push(format!(
                    "request {correlation} of batch {batch} never answered: {}",
                    explain(&repo, &database.pool, batch).await
                ));
            }
            n => problems.push(format!("request {correlation} answered {n} times")),
        }
    }
    let pending: usize = w.batches.values().map(|b| b.2.len()).sum();
    if pending > 0 {
        problems.push(format!(
            "{pending} follow-up requests never sent (their batch never finished)"
        ));
    }
    let unpublished = read("outbox stats", || repo.outbox_stats())
        .await
        .unpublished;
    if unpublished != 0 {
        problems.push(format!("{unpublished} outbox rows left unpublished"));
    }
    // Shut everything down; no process may have panicked.
    for p in procs.iter_mut().chain(relays.iter_mut()) {
        p.signal("TERM");
    }
    for p in procs.iter_mut().chain(relays.iter_mut()) {
        match p.wait(Duration::from_secs(40)).await {
            Some(status) if status.success() => {}
            other => problems.push(format!("{} at the end: {other:?}", p.name)),
        }
        if p.logged("panicked") {
            problems.push(format!(
                "{} panicked: {:?}",
                p.name,
                p.log()
                    .iter()
                    .filter(|l| l.contains("panicked"))
                    .collect::<Vec<_>>()
            ));
        }
    }
    report.problems = problems;
    println!(
        "fault {name}: {} events, {} batches, {} faults injected, {} lost, {} doubled, {} re-published, {} dead letters, {:.1}s",
        report.events,
        batches,
        report.faults,
        report.lost,
        report.doubled,
        report.republished,
        report.letters,
        started.elapsed().as_secs_f64()
    );
    observer.stop().await;
    letters_observer.stop().await;
    drop(w);
    drop(database);
    drop(own);
    drop(cluster);
    report
}

fn check(report: &Report) {
    assert!(report.events >= 1_000, "{} events", report.events);
    assert!(report.faults > 0, "no fault was injected");
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_worker_crash() {
    check(
        &scenario(
            "worker_crash",
            Faults {
                kill_workers: true,
                ..Faults::default()
            },
        )
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_connection_loss() {
    check(
        &scenario(
            "connection_loss",
            Faults {
                cut_connections: true,
                ..Faults::default()
            },
        )
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_database_restart() {
    check(
        &scenario(
            "database_restart",
            Faults {
                restart_database: true,
                ..Faults::default()
            },
        )
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_broker_outage() {
    check(
        &scenario(
            "broker_outage",
            Faults {
                broker_outage: true,
                ..Faults::default()
            },
        )
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_rebalance() {
    check(
        &scenario(
            "rebalance",
            Faults {
                rebalance: true,
                ..Faults::default()
            },
        )
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_graceful_stop() {
    check(
        &scenario(
            "graceful_stop",
            Faults {
                graceful_stops: true,
                ..Faults::default()
            },
        )
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_relay_race() {
    check(
        &scenario(
            "relay_race",
            Faults {
                relay_race: true,
                ..Faults::default()
            },
        )
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_everything() {
    check(&scenario("everything", Faults::all()).await);
}
