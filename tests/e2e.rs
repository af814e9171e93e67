//! End to end: the built `bos` binary as two processes in one consumer group,
//! configured only through its environment, with this test playing the upstream
//! services. One worker is killed with SIGKILL mid-run and not restarted.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bos::contracts::{topics, CourseCode, EssayRef, PhaseName};
use bos::store::{PgRepository, Repository};
use bos::upstream;
use common::kafka::{kafka_settings, Cluster, Observer, Seen, Upstream};
use tokio::process::{Child, Command};
use uuid::Uuid;

const BATCHES: usize = 200;

fn spawn_worker(database_url: &str, kafka: &bos::config::KafkaSettings) -> Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Command::new(env!("CARGO_BIN_EXE_bos"))
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BOOTSTRAP_SERVERS", &kafka.bootstrap_servers)
        .env("BOS_KAFKA_TOPIC_PREFIX", &kafka.topic_prefix)
        .env("BOS_KAFKA_GROUP_ID", &kafka.group_id)
        .env("BOS_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("BOS__RELAY__LEASE_SECS", "3")
        .env("BOS_LIBRDKAFKA_TOPIC_METADATA_REFRESH_INTERVAL_MS", "500")
        .env("BOS_LIBRDKAFKA_SESSION_TIMEOUT_MS", "6000")
        .env("BOS_LIBRDKAFKA_HEARTBEAT_INTERVAL_MS", "500")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the bos binary starts")
}

/// A tiny deterministic generator (the test needs no crate for it).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[tokio::test]
async fn two_workers_one_killed_every_batch_completes() {
    let database = common::infra::Database::fresh().await;
    let pool = database.pool.clone();
    let repo = PgRepository::from_pool(pool.clone());
    repo.migrate().await.unwrap();
    let repo: Arc<dyn Repository> = Arc::new(repo);
    let database_url = database.url.clone();

    let cluster = Cluster::start().await;
    let kafka = kafka_settings(&cluster);
    cluster.create_topics(&kafka.topic_prefix, 4).await;
    let observer = Observer::published(&kafka);
    let up = Arc::new(Upstream::new(&kafka));

    let mut doomed = spawn_worker(&database_url, &kafka);
    let mut survivor = spawn_worker(&database_url, &kafka);

    // Registration (as the HTTP handler does), then content and a request per batch.
    let targets = ["cj_assessment", "ai_feedback", "nlp", "spellcheck"];
    let mut rng = Lcg(7);
    let mut produced: HashSet<Uuid> = HashSet::new();
    let mut duplicates = 0usize;
    let mut batch_ids = Vec::new();
    for i in 0..BATCHES {
        let essays: Vec<EssayRef> = (0..2 + i % 4)
            .map(|e| EssayRef::new(format!("b{i}-e{e}"), format!("s{i}-{e}")))
            .collect();
        let (batch, messages) = common::new_batch(0);
        repo.create_batch(&batch, &messages).await.unwrap();
        let id = batch.id.clone();
        let corr = Uuid::new_v4();
        produced.insert(
            up.send(
                topics::CONTENT_PROVISIONING_COMPLETED,
                &id,
                corr,
                upstream::content_provisioned(&id, CourseCode::Eng5, "t", &essays),
            )
            .await,
        );
        produced.insert(
            up.send(
                topics::CLIENT_PIPELINE_REQUEST,
                &id,
                Uuid::new_v4(),
                upstream::pipeline_request(&id, targets[i % 4], "t"),
            )
            .await,
        );
        batch_ids.push(id);
    }

    // The essay lifecycle service: answers every command once (10 % of essays fail),
    // and sends 10 % of its answers twice.
    let answered: Arc<Mutex<HashSet<String>>> = Default::default();
    let mut killed_at = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let seen = observer.all();
        for command in seen
            .iter()
            .filter(|s| upstream::phase_of_command(&s.topic).is_some())
        {
            let event_id = command.value["event_id"].as_str().unwrap().to_owned();
            if !answered.lock().unwrap().insert(event_id) {
                continue;
            }
            let phase: PhaseName = upstream::phase_of_command(&command.topic).unwrap();
            let batch_id = command.key.clone().unwrap();
            let dispatched: Vec<EssayRef> =
                serde_json::from_value(command.value["data"]["essays_to_process"].clone()).unwrap();
            let (failed, processed): (Vec<_>, Vec<_>) =
                dispatched.into_iter().partition(|_| rng.chance(10));
            let failed: Vec<String> = failed.into_iter().map(|e| e.essay_id).collect();
            let corr: Uuid = command.value["correlation_id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            let outcome = upstream::phase_outcome(&batch_id, phase, &processed, &failed, corr);
            let event_id = Uuid::new_v4();
            let bytes = upstream::envelope_json(
                topics::PHASE_OUTCOME,
                "essay_lifecycle_service",
                event_id,
                corr,
                chrono::Utc::now(),
                outcome,
            );
            up.send_raw(topics::PHASE_OUTCOME, &batch_id, &bytes, &[])
                .await;
            produced.insert(event_id);
            if rng.chance(10) {
                up.send_raw(topics::PHASE_OUTCOME, &batch_id, &bytes, &[])
                    .await;
                duplicates += 1;
            }
        }
        let completed: HashSet<String> = seen
            .iter()
            .filter(|s| s.topic == topics::PIPELINE_COMPLETED)
            .filter_map(|s| s.key.clone())
            .collect();
        if killed_at.is_none() && completed.len() >= BATCHES / 4 {
            doomed.start_kill().unwrap();
            doomed.wait().await.unwrap();
            killed_at = Some((answered.lock().unwrap().len(), completed.len()));
        }
        if completed.len() == BATCHES {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {BATCHES} batches completed (killed at {killed_at:?})",
            completed.len()
        );
        assert!(
            survivor.try_wait().unwrap().is_none(),
            "the surviving worker exited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let seen: Vec<Seen> = observer.all();
    // Exactly one completion decision per batch, and no decision under two event ids.
    let mut decisions: HashMap<(String, String, String), HashSet<String>> = HashMap::new();
    for s in &seen {
        common::assert_valid_published(&s.topic, &s.value);
        let identity = match s.topic.as_str() {
            topics::BATCH_ESSAYS_REGISTERED => String::new(),
            topics::TEACHER_NOTIFICATION => s.value["data"]["notification_type"]
                .as_str()
                .unwrap()
                .to_owned(),
            _ => s.value["correlation_id"].as_str().unwrap().to_owned(),
        };
        decisions
            .entry((s.topic.clone(), s.key.clone().unwrap(), identity))
            .or_default()
            .insert(s.value["event_id"].as_str().unwrap().to_owned());
    }
    for (decision, ids) in &decisions {
        assert_eq!(
            ids.len(),
            1,
            "{decision:?} published under {} event ids",
            ids.len()
        );
    }
    let completions: HashMap<String, usize> = seen
        .iter()
        .filter(|s| s.topic == topics::PIPELINE_COMPLETED)
        .fold(HashMap::new(), |mut m, s| {
            m.entry(s.key.clone().unwrap()).or_default();
            m
        });
    assert_eq!(completions.len(), BATCHES);
    // Every event the test produced was applied: each has its inbox row.
    let ids: Vec<Uuid> = produced.iter().copied().collect();
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE event_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        applied as usize,
        ids.len(),
        "every produced event was applied exactly once"
    );
    let republished = seen.len() - decisions.values().map(HashSet::len).sum::<usize>();
    eprintln!(
        "e2e: {BATCHES} batches, {} events produced, {duplicates} duplicates injected, {} messages seen ({republished} exact re-publishes), killed after {killed_at:?} (answers, completions)",
        ids.len(),
        seen.len()
    );
    let dead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM batches WHERE status <> 'ready_for_pipeline_execution'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(dead, 0, "every batch is ready again");

    // SIGTERM: the survivor stops fetching, finishes, commits and exits cleanly.
    let pid = survivor.id().expect("still running").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(45), survivor.wait())
        .await
        .expect("bos exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    observer.stop().await;
    drop(up);
    drop(cluster);
}
