//! A worker wired to PostgreSQL and librdkafka's mock cluster (or the broker in
//! `KAFKA_BOOTSTRAP_SERVERS`), driven and observed through Kafka only.
#![allow(dead_code)]

pub use super::infra::Cluster;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bos::config::{ConsumerSettings, KafkaSettings, RelaySettings};
use bos::consumer::{self, Handler, Worker};
use bos::contracts::topics;
use bos::domain::Rules;
use bos::metrics::Metrics;
use bos::outbox::{idempotent_producer, NotifyWake, Relay};
use bos::store::Repository;
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::Value;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

/// A message seen on a topic.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub key: Option<String>,
    pub value: Value,
    pub raw: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub struct TestWorker {
    pub kafka: KafkaSettings,
    pub repo: Arc<dyn Repository>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TestWorker {
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

pub fn kafka_settings(cluster: &Cluster) -> KafkaSettings {
    let mut kafka = KafkaSettings::new(cluster.bootstrap.clone());
    let tag = Uuid::new_v4().simple().to_string();
    kafka.topic_prefix = format!("t{}.", &tag[..8]);
    kafka.group_id = format!("bos-{tag}");
    kafka.librdkafka = vec![
        ("topic.metadata.refresh.interval.ms".into(), "500".into()),
        ("session.timeout.ms".into(), "6000".into()),
    ];
    kafka
}

/// Starts a consumer and a relay against `repo`.
pub fn start_worker(kafka: &KafkaSettings, repo: Arc<dyn Repository>, rules: Rules) -> TestWorker {
    let (tx, rx) = watch::channel(false);
    let wake = Arc::new(Notify::new());
    let metrics = Arc::new(Metrics::new());
    let worker = Worker {
        consumer: Arc::new(consumer::consumer(kafka).unwrap()),
        dlq: idempotent_producer(kafka).unwrap(),
        handler: Handler::new(repo.clone(), rules, 5, metrics.clone()),
        kafka: kafka.clone(),
        settings: ConsumerSettings::default(),
        outbox_written: wake.clone(),
        metrics: metrics.clone(),
    };
    let relay_settings = RelaySettings {
        poll_interval: Duration::from_millis(200),
        ..RelaySettings::default()
    };
    let relay = Relay::new(
        repo.clone(),
        idempotent_producer(kafka).unwrap(),
        kafka.clone(),
        relay_settings,
        metrics,
    );
    let tasks = vec![
        tokio::spawn(worker.run(rx.clone())),
        tokio::spawn(relay.run(Box::new(NotifyWake(wake)), rx)),
    ];
    TestWorker {
        kafka: kafka.clone(),
        repo,
        shutdown: tx,
        tasks,
    }
}

/// Plays the upstream services: produces events the way they do.
pub struct Upstream {
    producer: FutureProducer,
    pub kafka: KafkaSettings,
}

impl Upstream {
    pub fn new(kafka: &KafkaSettings) -> Self {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.bootstrap_servers)
            .create()
            .unwrap();
        Self {
            producer,
            kafka: kafka.clone(),
        }
    }

    pub async fn send_raw(&self, topic: &str, key: &str, payload: &[u8], headers: &[(&str, &str)]) {
        let topic = self.kafka.topic(topic);
        let mut hs = OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        self.producer
            .send(
                FutureRecord::to(&topic)
                    .key(key)
                    .payload(payload)
                    .headers(hs),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    /// Sends `data` in a fresh envelope; returns its event id.
    pub async fn send<D: serde::Serialize>(
        &self,
        topic: &str,
        batch_id: &str,
        correlation_id: Uuid,
        data: D,
    ) -> Uuid {
        let event_id = Uuid::new_v4();
        let bytes = bos::upstream::envelope_json(
            topic,
            "essay_lifecycle_service",
            event_id,
            correlation_id,
            chrono::Utc::now(),
            data,
        );
        self.send_raw(topic, batch_id, &bytes, &[]).await;
        event_id
    }
}

/// Collects everything published on the given topics.
pub struct Observer {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    pub fn start(kafka: &KafkaSettings, topics: &[String]) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &kafka.bootstrap_servers)
            .set("group.id", format!("observer-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("topic.metadata.refresh.interval.ms", "500")
            .create()
            .unwrap();
        // Explicit assignment from the beginning: no group join to wait for.
        let mut assignment = rdkafka::TopicPartitionList::new();
        for topic in topics {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let partitions: Vec<i32> = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .map(|md| {
                        md.topics()
                            .iter()
                            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                            .collect()
                    })
                    .unwrap_or_default();
                if !partitions.is_empty() {
                    for p in partitions {
                        assignment
                            .add_partition_offset(topic, p, rdkafka::Offset::Beginning)
                            .unwrap();
                    }
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "topic {topic} has no partitions"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        consumer.assign(&assignment).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let prefix = kafka.topic_prefix.clone();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut stream = consumer.stream();
            loop {
                let m = tokio::select! {
                    _ = stopped.changed() => break,
                    m = stream.next() => m,
                };
                let Some(Ok(m)) = m else { break };
                let raw = m.payload().unwrap_or_default().to_vec();
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                sink.lock().unwrap().push(Seen {
                    topic: m
                        .topic()
                        .strip_prefix(&prefix)
                        .unwrap_or(m.topic())
                        .to_owned(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: serde_json::from_slice(&raw).unwrap_or(Value::Null),
                    raw,
                    headers,
                });
            }
        });
        Self { seen, stop, task }
    }

    /// Closes the consumer (while the cluster is still up).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Every published topic of the worker (prefixed).
    pub fn published(kafka: &KafkaSettings) -> Self {
        let topics: Vec<String> = topics::PUBLISHED.iter().map(|t| kafka.topic(t)).collect();
        Self::start(kafka, &topics)
    }

    pub fn all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn on(&self, topic: &str) -> Vec<Seen> {
        self.all()
            .into_iter()
            .filter(|s| s.topic == topic)
            .collect()
    }

    /// Waits until `n` messages were seen on `topic` (30 s at most).
    pub async fn wait_for(&self, topic: &str, n: usize) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let seen = self.on(topic);
            if seen.len() >= n {
                return seen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited 30 s for {n} message(s) on {topic}; saw {} — all topics: {:?}",
                seen.len(),
                self.all()
                    .iter()
                    .map(|s| s.topic.clone())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
