//! Settings, read from the environment (documented in the README).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::contracts::PhaseName;
use crate::domain::{AllowAll, CreditPolicy, FixedBalance, PhaseGraph, Rules};
use crate::store::PostgresSettings;

/// Which repository backs the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Postgres,
    Memory,
}

/// Kafka settings shared by the consumer, the relay and the dead-letter producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub group_id: String,
    /// Prepended to every topic, consumed and published.
    pub topic_prefix: String,
    /// Extra librdkafka properties (`BOS_LIBRDKAFKA_SECURITY_PROTOCOL` → `security.protocol`).
    pub librdkafka: Vec<(String, String)>,
}

impl KafkaSettings {
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            group_id: "batch-orchestrator-consumers".to_owned(),
            topic_prefix: String::new(),
            librdkafka: Vec::new(),
        }
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.topic_prefix)
    }

    /// The unprefixed name of a prefixed topic.
    pub fn unprefixed<'a>(&self, topic: &'a str) -> &'a str {
        topic.strip_prefix(&self.topic_prefix).unwrap_or(topic)
    }

    pub fn client_config(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (key, value) in &self.librdkafka {
            config.set(key, value);
        }
        config
    }
}

/// Tuning of the consume → decide → commit loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// Events applied in one transaction at most.
    pub max_batch: usize,
    /// Re-decisions after a version conflict before the batch is retried as transient.
    pub max_conflict_retries: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            max_batch: 256,
            max_conflict_retries: 5,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// Tuning of the outbox relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    pub batch_size: i64,
    /// Backstop poll when no notification arrives.
    pub poll_interval: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Published rows older than this are deleted.
    pub retention: Duration,
    pub purge_batch: i64,
    /// How long a relay holds claimed rows before another relay may take them over.
    pub lease: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_secs(5),
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            retention: Duration::from_secs(24 * 3600),
            purge_batch: 1000,
            lease: Duration::from_secs(30),
        }
    }
}

/// How credits are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditSettings {
    AllowAll,
    FixedBalance(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub store: StoreKind,
    pub postgres: PostgresSettings,
    pub kafka: KafkaSettings,
    pub consumer: ConsumerSettings,
    pub relay: RelaySettings,
    pub http_addr: String,
    pub log_json: bool,
    pub graph: PhaseGraph,
    pub credits: CreditSettings,
}

/// A setting that cannot be used, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration `{key}`: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

/// The documented defaults, built into the binary.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    store: RawStore,
    database: RawDatabase,
    kafka: RawKafka,
    consumer: RawConsumer,
    relay: RawRelay,
    http: RawHttp,
    log: RawLog,
    pipeline: RawPipeline,
    credits: RawCredits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: String,
    max_connections: u32,
    acquire_timeout_ms: u64,
    statement_timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    bootstrap_servers: String,
    group_id: String,
    topic_prefix: String,
    #[serde(default)]
    librdkafka: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    max_batch: usize,
    max_conflict_retries: usize,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    batch_size: i64,
    poll_interval_ms: u64,
    retry_initial_ms: u64,
    retry_max_ms: u64,
    retention_secs: u64,
    purge_batch: i64,
    lease_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    addr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    dependencies: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredits {
    policy: String,
    balance: i64,
}

/// The operator names the platform already uses, and the key each sets.
pub const OPERATOR_NAMES: [(&str, &str); 7] = [
    ("DATABASE_URL", "database.url"),
    ("KAFKA_BOOTSTRAP_SERVERS", "kafka.bootstrap_servers"),
    ("BOS_KAFKA_GROUP_ID", "kafka.group_id"),
    ("BOS_KAFKA_TOPIC_PREFIX", "kafka.topic_prefix"),
    ("BOS_HTTP_ADDR", "http.addr"),
    ("BOS_STORE", "store.kind"),
    ("BOS_LOG_FORMAT", "log.format"),
];

fn from_config_error(e: config::ConfigError) -> ConfigError {
    let key = match &e {
        config::ConfigError::Type { key: Some(key), .. } => key.clone(),
        config::ConfigError::NotFound(key) => key.clone(),
        _ => "configuration".to_owned(),
    };
    invalid(&key, e.to_string())
}

fn millis(key: &str, value: u64) -> Result<Duration, ConfigError> {
    if value == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(Duration::from_millis(value))
}

impl Settings {
    /// Reads the layered configuration: defaults, `BOS_CONFIG`, the environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let file = std::env::var("BOS_CONFIG").ok().map(PathBuf::from);
        Self::load(file.as_deref(), std::env::vars())
    }

    /// Defaults, then `file`, then the environment `vars`.
    pub fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = vars.into_iter().collect();
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(invalid(
                    "BOS_CONFIG",
                    format!("no configuration file at {}", path.display()),
                ));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let nested: HashMap<String, String> = vars
            .iter()
            .filter(|(k, _)| k.starts_with("BOS__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("BOS")
                .prefix_separator("__")
                .separator("__")
                .source(Some(nested)),
        );
        for (name, key) in OPERATOR_NAMES {
            if let Some(value) = vars.get(name) {
                builder = builder
                    .set_override(key, value.as_str())
                    .map_err(from_config_error)?;
            }
        }
        if vars
            .get("USE_MOCK_REPOSITORY")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            builder = builder
                .set_override("store.kind", "memory")
                .map_err(from_config_error)?;
        }
        for (name, value) in &vars {
            if let Some(property) = name.strip_prefix("BOS_LIBRDKAFKA_") {
                let key = format!("kafka.librdkafka.{}", property.to_ascii_lowercase());
                builder = builder
                    .set_override(key, value.as_str())
                    .map_err(from_config_error)?;
            }
        }
        let raw: Raw = builder
            .build()
            .map_err(from_config_error)?
            .try_deserialize()
            .map_err(from_config_error)?;
        Self::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Self, ConfigError> {
        let store = match raw.store.kind.as_str() {
            "postgres" => StoreKind::Postgres,
            "memory" => StoreKind::Memory,
            other => {
                return Err(invalid(
                    "store.kind",
                    format!("`{other}` is neither `postgres` nor `memory`"),
                ))
            }
        };
        if store == StoreKind::Postgres && raw.database.url.trim().is_empty() {
            return Err(invalid(
                "database.url",
                "required when store.kind = postgres (set DATABASE_URL)",
            ));
        }
        if raw.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        let postgres = PostgresSettings {
            url: raw.database.url,
            max_connections: raw.database.max_connections,
            acquire_timeout: millis(
                "database.acquire_timeout_ms",
                raw.database.acquire_timeout_ms,
            )?,
            statement_timeout: millis(
                "database.statement_timeout_ms",
                raw.database.statement_timeout_ms,
            )?,
        };
        for (key, value) in [
            ("kafka.bootstrap_servers", &raw.kafka.bootstrap_servers),
            ("kafka.group_id", &raw.kafka.group_id),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        let kafka = KafkaSettings {
            bootstrap_servers: raw.kafka.bootstrap_servers,
            group_id: raw.kafka.group_id,
            topic_prefix: raw.kafka.topic_prefix,
            librdkafka: raw
                .kafka
                .librdkafka
                .into_iter()
                .map(|(k, v)| (k.replace('_', "."), v))
                .collect(),
        };
        if raw.consumer.max_batch == 0 {
            return Err(invalid("consumer.max_batch", "must be at least 1"));
        }
        let consumer = ConsumerSettings {
            max_batch: raw.consumer.max_batch,
            max_conflict_retries: raw.consumer.max_conflict_retries,
            backoff_initial: millis(
                "consumer.backoff_initial_ms",
                raw.consumer.backoff_initial_ms,
            )?,
            backoff_max: millis("consumer.backoff_max_ms", raw.consumer.backoff_max_ms)?,
        };
        for (key, value) in [
            ("relay.batch_size", raw.relay.batch_size),
            ("relay.purge_batch", raw.relay.purge_batch),
        ] {
            if value < 1 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if raw.relay.lease_secs == 0 {
            return Err(invalid("relay.lease_secs", "must be at least 1"));
        }
        let relay = RelaySettings {
            batch_size: raw.relay.batch_size,
            poll_interval: millis("relay.poll_interval_ms", raw.relay.poll_interval_ms)?,
            retry_initial: millis("relay.retry_initial_ms", raw.relay.retry_initial_ms)?,
            retry_max: millis("relay.retry_max_ms", raw.relay.retry_max_ms)?,
            retention: Duration::from_secs(raw.relay.retention_secs),
            purge_batch: raw.relay.purge_batch,
            lease: Duration::from_secs(raw.relay.lease_secs),
        };
        if raw.http.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http.addr",
                format!("`{}` is not a socket address (host:port)", raw.http.addr),
            ));
        }
        let log_json = match raw.log.format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("`{other}` is neither `text` nor `json`"),
                ))
            }
        };
        let mut edges = Vec::new();
        for (phase, prerequisite) in &raw.pipeline.dependencies {
            let key = format!("pipeline.dependencies.{phase}");
            let parse = |name: &str| {
                PhaseName::parse(name)
                    .ok_or_else(|| invalid(&key, format!("`{name}` is not a phase")))
            };
            edges.push((parse(phase)?, parse(prerequisite)?));
        }
        let graph =
            PhaseGraph::new(edges).map_err(|e| invalid("pipeline.dependencies", e.to_string()))?;
        let credits = match raw.credits.policy.as_str() {
            "allow_all" => CreditSettings::AllowAll,
            "fixed_balance" => CreditSettings::FixedBalance(raw.credits.balance),
            other => {
                return Err(invalid(
                    "credits.policy",
                    format!("`{other}` is neither `allow_all` nor `fixed_balance`"),
                ))
            }
        };
        Ok(Self {
            store,
            postgres,
            kafka,
            consumer,
            relay,
            http_addr: raw.http.addr,
            log_json,
            graph,
            credits,
        })
    }

    /// The rules this configuration describes.
    pub fn rules(&self) -> Rules {
        let credits: Arc<dyn CreditPolicy> = match self.credits {
            CreditSettings::AllowAll => Arc::new(AllowAll),
            CreditSettings::FixedBalance(n) => Arc::new(FixedBalance(n)),
        };
        Rules::new(self.graph.clone(), credits)
    }

    /// The effective configuration, with secrets masked.
    pub fn masked(&self) -> serde_json::Value {
        let secret = |key: &str| {
            ["password", "secret", "token"]
                .iter()
                .any(|s| key.contains(s))
        };
        let ms = |d: Duration| d.as_millis() as u64;
        json!({
            "store": {"kind": match self.store { StoreKind::Postgres => "postgres", StoreKind::Memory => "memory" }},
            "database": {
                "url": mask_url(&self.postgres.url),
                "max_connections": self.postgres.max_connections,
                "acquire_timeout_ms": ms(self.postgres.acquire_timeout),
                "statement_timeout_ms": ms(self.postgres.statement_timeout),
            },
            "kafka": {
                "bootstrap_servers": self.kafka.bootstrap_servers,
                "group_id": self.kafka.group_id,
                "topic_prefix": self.kafka.topic_prefix,
                "librdkafka": self.kafka.librdkafka.iter()
                    .map(|(k, v)| (k.clone(), if secret(k) { "***".to_owned() } else { v.clone() }))
                    .collect::<BTreeMap<_, _>>(),
            },
            "consumer": {
                "max_batch": self.consumer.max_batch,
                "max_conflict_retries": self.consumer.max_conflict_retries,
                "backoff_initial_ms": ms(self.consumer.backoff_initial),
                "backoff_max_ms": ms(self.consumer.backoff_max),
            },
            "relay": {
                "batch_size": self.relay.batch_size,
                "poll_interval_ms": ms(self.relay.poll_interval),
                "retry_initial_ms": ms(self.relay.retry_initial),
                "retry_max_ms": ms(self.relay.retry_max),
                "retention_secs": self.relay.retention.as_secs(),
                "purge_batch": self.relay.purge_batch,
                "lease_secs": self.relay.lease.as_secs(),
            },
            "http": {"addr": self.http_addr},
            "log": {"format": if self.log_json { "json" } else { "text" }},
            "pipeline": {"dependencies": self.graph.edges()
                .map(|(p, q)| (p.as_str(), q.as_str()))
                .collect::<BTreeMap<_, _>>()},
            "credits": match self.credits {
                CreditSettings::AllowAll => json!({"policy": "allow_all"}),
                CreditSettings::FixedBalance(n) => json!({"policy": "fixed_balance", "balance": n}),
            },
        })
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_file_and_environment_layer_in_order() {
        let s = Settings::load(None, vars(&[("USE_MOCK_REPOSITORY", "true")])).unwrap();
        assert_eq!(s.store, StoreKind::Memory);
        assert_eq!(s.kafka.group_id, "batch-orchestrator-consumers");
        assert_eq!(s.consumer.max_batch, 256);
        let dir = std::env::temp_dir().join(format!("bos-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bos.toml");
        std::fs::write(
            &file,
            "[consumer]\nmax_batch = 64\n[kafka]\ngroup_id = \"from-file\"\n",
        )
        .unwrap();
        let s = Settings::load(
            Some(&file),
            vars(&[
                ("DATABASE_URL", "postgres://bos:hunter2@db:5432/bos"),
                ("BOS__CONSUMER__MAX_BATCH", "32"),
                ("BOS_LIBRDKAFKA_SECURITY_PROTOCOL", "ssl"),
                ("BOS_LIBRDKAFKA_SASL_PASSWORD", "hunter2"),
                ("BOS_KAFKA_TOPIC_PREFIX", "test-"),
            ]),
        )
        .unwrap();
        assert_eq!(s.store, StoreKind::Postgres);
        assert_eq!(s.consumer.max_batch, 32, "environment beats the file");
        assert_eq!(s.kafka.group_id, "from-file", "the file beats the defaults");
        assert_eq!(s.kafka.topic("x"), "test-x");
        assert!(s
            .kafka
            .librdkafka
            .contains(&("security.protocol".to_owned(), "ssl".to_owned())));
        let shown = s.masked().to_string();
        assert!(!shown.contains("hunter2"), "secrets are masked: {shown}");
        assert!(shown.contains("postgres://bos:***@db:5432/bos"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn invalid_settings_name_the_key() {
        let cases: [(&[(&str, &str)], &str); 8] = [
            (&[("BOS_STORE", "redis")], "store.kind"),
            (&[], "database.url"),
            (
                &[
                    ("USE_MOCK_REPOSITORY", "true"),
                    ("BOS__CONSUMER__MAX_BATCH", "lots"),
                ],
                "consumer.max_batch",
            ),
            (
                &[
                    ("USE_MOCK_REPOSITORY", "true"),
                    ("BOS__CONSUMER__MAX_BATCH", "0"),
                ],
                "consumer.max_batch",
            ),
            (
                &[
                    ("USE_MOCK_REPOSITORY", "true"),
                    ("BOS_HTTP_ADDR", "nowhere"),
                ],
                "http.addr",
            ),
            (
                &[
                    ("USE_MOCK_REPOSITORY", "true"),
                    ("BOS__PIPELINE__DEPENDENCIES__NLP", "grading"),
                ],
                "pipeline.dependencies.nlp",
            ),
            (
                &[
                    ("USE_MOCK_REPOSITORY", "true"),
                    ("BOS__CREDITS__POLICY", "free"),
                ],
                "credits.policy",
            ),
            (
                &[("USE_MOCK_REPOSITORY", "true"), ("BOS_LOG_FORMAT", "xml")],
                "log.format",
            ),
        ];
        for (env, key) in cases {
            let e = Settings::load(None, vars(env)).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
        let e = Settings::load(
            None,
            vars(&[
                ("USE_MOCK_REPOSITORY", "true"),
                ("BOS__CONSUMR__MAX_BATCH", "1"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("consumr"), "typos are named: {e}");
        let e = Settings::load(Some(Path::new("/nonexistent/bos.toml")), vars(&[])).unwrap_err();
        assert_eq!(e.key, "BOS_CONFIG");
    }
}
