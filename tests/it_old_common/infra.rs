//! Where the tests' PostgreSQL and Kafka come from.
//!
//! - Default: the local PostgreSQL (`DATABASE_URL`, else 127.0.0.1:5432) with a
//!   fresh database per test, and librdkafka's mock cluster per test.
//! - `KAFKA_BOOTSTRAP_SERVERS` set: that broker instead of the mock cluster
//!   (each test uses its own topic prefix and consumer group).
//! - `BOS_TEST_INFRA=containers`: PostgreSQL and Kafka containers started with
//!   testcontainers-modules (needs a Docker engine), one of each per test binary.
#![allow(dead_code)]

use std::time::Duration;

use bos::contracts::topics;
use bos::embedded::EmbeddedKafka;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use sqlx::{Connection, Executor, PgPool};
use testcontainers_modules::kafka::apache::{Kafka, KAFKA_PORT};
use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};
use tokio::sync::OnceCell;
use uuid::Uuid;

pub fn containers() -> bool {
    std::env::var("BOS_TEST_INFRA").is_ok_and(|v| v.eq_ignore_ascii_case("containers"))
}

static PG_CONTAINER: OnceCell<(String, ContainerAsync<Postgres>)> = OnceCell::const_new();
static KAFKA_CONTAINER: OnceCell<(String, ContainerAsync<Kafka>)> = OnceCell::const_new();

/// The server URL fresh databases are created on.
async fn server_url() -> String {
    if containers() {
        let (url, _) = PG_CONTAINER
            .get_or_init(|| async {
                let container = Postgres::default()
                    .with_tag("15-alpine")
                    .start()
                    .await
                    .expect("PostgreSQL container");
                let port = container
                    .get_host_port_ipv4(5432)
                    .await
                    .expect("mapped port");
                (
                    format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres"),
                    container,
                )
            })
            .await;
        return url.clone();
    }
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database of its own for one test, dropped with the guard.
pub struct Database {
    pub pool: PgPool,
    pub url: String,
    name: String,
    server: String,
}

impl Database {
    pub async fn fresh() -> Self {
        let server = server_url().await;
        let name = format!("bos_test_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&server)
            .await
            .expect("PostgreSQL reachable (DATABASE_URL)");
        admin
            .execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .unwrap();
        let url = format!("{}/{name}", server.rsplit_once('/').unwrap().0);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .connect(&url)
            .await
            .unwrap();
        Self {
            pool,
            url,
            name,
            server,
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs outside async: a short-lived runtime of its own does the cleanup.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&server).await {
                    let _ = admin
                        .execute(
                            format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str(),
                        )
                        .await;
                }
            });
        })
        .join();
    }
}

/// A Kafka for one test.
pub struct Cluster {
    mock: Option<EmbeddedKafka>,
    pub bootstrap: String,
}

impl Cluster {
    pub async fn start() -> Self {
        if containers() {
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
        let mut names: Vec<(String, i32)> = Vec::new();
        for t in topics::CONSUMED {
            names.push((format!("{prefix}{t}"), partitions));
            names.push((format!("{prefix}{t}{}", topics::DLQ_SUFFIX), 1));
        }
        for t in topics::PUBLISHED {
            names.push((format!("{prefix}{t}"), partitions));
        }
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
