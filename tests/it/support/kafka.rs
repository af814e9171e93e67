//! Kafka for the tests: librdkafka's mock cluster per test (the default), the
//! broker in `KAFKA_BOOTSTRAP_SERVERS`, or a container (`BOS_TEST_INFRA=containers`);
//! plus the upstream services' producer and an observer of what bos publishes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bos::config::KafkaSettings;
use bos::contracts::topics;
use bos::sim::embedded::EmbeddedKafka;
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::Value;
use testcontainers_modules::kafka::apache::{Kafka, KAFKA_PORT};
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::ContainerAsync;
use tokio::sync::{watch, OnceCell};
use uuid::Uuid;

/// A Kafka for one test.
pub struct Cluster {
    mock: Option<EmbeddedKafka>,
    pub bootstrap: String,
}

static KAFKA_CONTAINER: OnceCell<(String, ContainerAsync<Kafka>)> = OnceCell::const_new();

impl Cluster {
    pub async fn start() -> Self {
        if super::pg::containers() {
            let (bootstrap, _) = KAFKA_CONTAINER
                .get_or_init(|| async {
                    let container = Kafka::default().start().await.expect("Kafka container");
                    let port = container
                        .get_host_port_ipv4(KAFKA_PORT)
                        .await
                        .expect("mapped port");
                    (format!("127.0.0.1:{port}"), container)
                })
                .await;
            return Self {
                mock: None,
                bootstrap: bootstrap.clone(),
            };
        }
        match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
            Ok(bootstrap) if !bootstrap.is_empty() => Self {
                mock: None,
                bootstrap,
            },
            _ => {
                let mock = EmbeddedKafka::start().expect("mock cluster");
                let bootstrap = mock.bootstrap_servers();
                Self {
                    mock: Some(mock),
                    bootstrap,
                }
            }
        }
    }

    /// The mock cluster, for fault injection (None against a real broker).
    pub fn mock(&self) -> Option<&EmbeddedKafka> {
        self.mock.as_ref()
    }

    /// Every consumed, dead-letter and published topic under `prefix`.
    pub async fn create_topics(&self, prefix: &str, partitions: i32) {
        if let Some(mock) = &self.mock {
            mock.create_topics(prefix, partitions).unwrap();
            return;
        }
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap();
        let names: Vec<(String, i32)> = topics::every_topic()
            .into_iter()
            .map(|(t, dead_letters)| {
                (
                    format!("{prefix}{t}"),
                    if dead_letters { 1 } else { partitions },
                )
            })
            .collect();
        let new: Vec<NewTopic> = names
            .iter()
            .map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for result in admin
            .create_topics(&new, &options)
            .await
            .expect("topics created")
        {
            if let Err((topic, code)) = result {
                assert_eq!(
                    code,
                    rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                    "creating {topic}"
                );
            }
        }
    }
}

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

pub fn kafka_settings(cluster: &Cluster) -> KafkaSettings {
    let mut kafka = KafkaSettings::new(cluster.bootstrap.clone());
    let tag = Uuid::new_v4().simple().to_string();
    kafka.topic_prefix = format!("t{}.", &tag[..8]);
    kafka.group_id = format!("bos-{tag}");
    kafka.librdkafka = [
        ("topic.metadata.refresh.interval.ms", "500"),
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
        ("log_level", "3"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    kafka
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
        self.send_to(topic, None, key, payload, headers).await;
    }

    /// Sends to a chosen partition (or the partitioner's choice).
    pub async fn send_to(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) {
        let topic = self.kafka.topic(topic);
        let mut hs = OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        // Like the platform's producers, retry until the broker takes it (a
        // fault test takes the broker away for a while).
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let mut record = FutureRecord::to(&topic)
                .key(key)
                .payload(payload)
                .headers(hs.clone());
            if let Some(p) = partition {
                record = record.partition(p);
            }
            match self.producer.send(record, Duration::from_secs(10)).await {
                Ok(_) => break,
                Err((e, _)) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err((e, _)) => panic!("producing to {topic}: {e}"),
            }
        }
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
        let bytes = bos::sim::upstream::envelope_json(
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
                            .flat_map(|t| {
                                t.partitions()
                                    .iter()
                                    .map(rdkafka::metadata::MetadataPartition::id)
                            })
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
                // Errors (a broker away) are reported and recovered from by
                // librdkafka; only the end of the stream ends the observer.
                let m = match m {
                    None => break,
                    Some(Err(_)) => continue,
                    Some(Ok(m)) => m,
                };
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
