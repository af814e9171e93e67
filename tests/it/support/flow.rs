//! A running worker (the production application, in this process) against a
//! fresh database and its own Kafka, with the upstream services and an
//! observer of what it publishes: the setting of the worker, liveness and
//! parity tests.

use std::sync::Arc;
use std::time::Duration;

use bos::app::{Application, Role};
use bos::config::{KafkaSettings, Settings};
use bos::contracts::{topics, ClientPipelineRequest, CourseCode, EssayRef, PhaseName};
use bos::domain::Batch;
use bos::sim::upstream;
use bos::store::{PgRepository, Repository};
use serde_json::Value;
use uuid::Uuid;

use super::app::{settings, TestApp};
use super::kafka::{kafka_settings, Cluster, Observer, Seen, Upstream};
use super::pg::Database;
use super::{essays, registration};

pub struct Flow {
    pub database: Database,
    pub cluster: Cluster,
    pub kafka: KafkaSettings,
    pub app: TestApp,
    pub up: Upstream,
    pub observer: Observer,
}

/// Options of a flow: partitions, settings, a repository decorator.
pub struct FlowOptions {
    pub partitions: i32,
    pub tune: Box<dyn FnOnce(&mut Settings) + Send>,
    /// Wraps the PostgreSQL repository (a fault-injecting decorator).
    pub wrap: Option<Wrap>,
    pub credits: Option<Arc<dyn bos::credits::CreditPolicy>>,
    pub create_topics: bool,
    /// Runs after the database and topics exist, before the worker starts
    /// (to put records in Kafka that its first poll then reads together).
    pub before_start: Option<BeforeStart>,
}

pub type Wrap = Box<dyn FnOnce(Arc<dyn Repository>) -> Arc<dyn Repository> + Send>;

pub type BeforeStart = Box<
    dyn FnOnce(
            Arc<dyn Repository>,
            KafkaSettings,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send,
>;

impl Default for FlowOptions {
    fn default() -> Self {
        Self {
            partitions: 3,
            tune: Box::new(|_| {}),
            wrap: None,
            credits: None,
            create_topics: true,
            before_start: None,
        }
    }
}

impl Flow {
    pub async fn start() -> Self {
        Self::with(FlowOptions::default()).await
    }

    pub async fn with(options: FlowOptions) -> Self {
        let database = Database::fresh().await;
        let cluster = Cluster::start().await;
        let kafka = kafka_settings(&cluster);
        if options.create_topics {
            cluster
                .create_topics(&kafka.topic_prefix, options.partitions)
                .await;
        }
        let mut s = settings(&kafka, Some(&database.url));
        (options.tune)(&mut s);
        let pg = PgRepository::from_pool(database.pool.clone());
        pg.migrate().await.unwrap();
        let pg: Arc<dyn Repository> = Arc::new(pg);
        if let Some(before) = options.before_start {
            before(pg.clone(), kafka.clone()).await;
        }
        let repo = match options.wrap {
            Some(wrap) => wrap(pg),
            None => pg,
        };
        let mut builder =
            Application::builder(s.clone()).repository(repo, Some(database.pool.clone()));
        if let Some(credits) = options.credits {
            builder = builder.credit_policy(credits);
        }
        let app = TestApp::spawn_with(builder, Role::Worker).await;
        let observer = if options.create_topics {
            Observer::published(&kafka)
        } else {
            Observer::start(&kafka, &[])
        };
        let up = Upstream::new(&kafka);
        Self {
            database,
            cluster,
            kafka,
            app,
            up,
            observer,
        }
    }

    pub fn repo(&self) -> Arc<dyn Repository> {
        self.app.repo.clone()
    }

    /// Registers a batch through `POST /v1/batches/register`.
    pub async fn register(&self, class_id: Option<&str>, essays: i64) -> (String, Uuid) {
        let body = serde_json::to_value(registration(class_id, essays)).unwrap();
        let (status, reply) = self
            .app
            .call("POST", "/v1/batches/register", &[], Some(body))
            .await;
        assert_eq!(status, 202, "{reply}");
        let id = reply["batch_id"].as_str().unwrap().to_owned();
        let correlation = reply["correlation_id"].as_str().unwrap().parse().unwrap();
        (id, correlation)
    }

    /// The essay lifecycle service reports `n` essays provisioned.
    pub async fn provision(&self, batch_id: &str, correlation: Uuid, n: usize) -> Uuid {
        let content = upstream::content_provisioned(batch_id, CourseCode::Eng5, "t", &essays(n));
        self.up
            .send(
                topics::CONTENT_PROVISIONING_COMPLETED,
                batch_id,
                correlation,
                content,
            )
            .await
    }

    /// The API gateway asks for `target` under a fresh correlation id.
    pub async fn request(&self, batch_id: &str, target: &str) -> Uuid {
        self.send_request(
            batch_id,
            upstream::pipeline_request(batch_id, target, super::TEACHER),
        )
        .await
    }

    /// Sends `request` as the gateway does, under a new correlation id.
    pub async fn send_request(&self, batch_id: &str, request: ClientPipelineRequest) -> Uuid {
        self.up
            .send(
                topics::CLIENT_PIPELINE_REQUEST,
                batch_id,
                Uuid::new_v4(),
                request,
            )
            .await
    }

    /// Requests CJ after spellcheck has completed and returns its command;
    /// spellcheck must not run again.
    pub async fn request_cj_reusing_spellcheck(&self, batch_id: &str) -> Seen {
        self.request(batch_id, "cj_assessment").await;
        let cj = self
            .observer
            .wait_for(topics::CJ_ASSESSMENT_COMMAND, 1)
            .await;
        assert_eq!(
            self.observer.on(topics::SPELLCHECK_COMMAND).len(),
            1,
            "spellcheck pruned"
        );
        cj.into_iter().next().expect("waited for one")
    }

    /// Answers a command like the essay lifecycle service: essays in `fail` fail.
    pub async fn answer(&self, batch_id: &str, phase: PhaseName, command: &Seen, fail: &[&str]) {
        let dispatched: Vec<EssayRef> =
            serde_json::from_value(command.value["data"]["essays_to_process"].clone()).unwrap();
        let processed: Vec<EssayRef> = dispatched
            .iter()
            .filter(|e| !fail.contains(&e.essay_id.as_str()))
            .cloned()
            .collect();
        let failed: Vec<String> = fail.iter().map(|s| (*s).to_owned()).collect();
        let corr = correlation(command);
        let outcome = upstream::phase_outcome(batch_id, phase, &processed, &failed, corr);
        self.up
            .send(topics::PHASE_OUTCOME, batch_id, corr, outcome)
            .await;
    }

    pub async fn batch(&self, id: &str) -> Batch {
        self.app.repo.get_batch(id).await.unwrap().expect("stored")
    }

    /// Waits until the stored batch satisfies `done` (30 s at most).
    pub async fn wait_for_batch(&self, id: &str, done: impl Fn(&Batch) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .app
                .repo
                .get_batch(id)
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
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the inbox holds `event`.
    pub async fn wait_processed(&self, event: Uuid) {
        let repo = self.repo();
        super::eventually(
            Duration::from_secs(30),
            &format!("event {event} applied"),
            || {
                let repo = repo.clone();
                async move { repo.processed(&[event]).await.unwrap().contains(&event) }
            },
        )
        .await;
    }

    /// An observer of the dead-letter topic of `topic`.
    pub fn dead_letters(&self, topic: &str) -> (Observer, String) {
        let name = format!("{topic}{}", topics::DLQ_SUFFIX);
        (
            Observer::start(&self.kafka, &[self.kafka.topic(&name)]),
            name,
        )
    }

    /// Every message published so far, valid and with its headers.
    pub fn assert_all_valid(&self) {
        for seen in self.observer.all() {
            super::assert_valid_published(&seen.topic, &seen.value);
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
            assert!(
                seen.header("occurred_at").is_some() && seen.header("schema_version") == Some("1")
            );
        }
    }

    /// Stops every Kafka client before the cluster goes away (a client closing
    /// against a vanished broker waits for its timeouts), the worker first.
    pub async fn finish(self, observers: Vec<Observer>) -> anyhow::Result<()> {
        let ended = self.app.stop().await;
        self.observer.stop().await;
        for o in observers {
            o.stop().await;
        }
        drop(self.up);
        drop(self.cluster);
        drop(self.database);
        ended
    }
}

pub fn correlation(seen: &Seen) -> Uuid {
    seen.value["correlation_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

pub fn command_essays(seen: &Seen) -> Vec<(String, String)> {
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

pub fn data(seen: &Seen) -> &Value {
    &seen.value["data"]
}
