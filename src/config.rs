//! Settings, read from the environment (documented in the README).

use std::time::Duration;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub store: StoreKind,
    pub postgres: PostgresSettings,
    pub kafka: KafkaSettings,
    pub consumer: ConsumerSettings,
    pub relay: RelaySettings,
    pub http_addr: String,
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

fn parse_num<T: std::str::FromStr>(key: &str, raw: &str) -> Result<T, ConfigError> {
    raw.trim()
        .parse()
        .map_err(|_| invalid(key, format!("`{raw}` is not a valid number")))
}

impl Settings {
    /// Reads the settings from environment variables.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the settings from `(name, value)` pairs (the environment, in tests).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let get = |key: &str| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let memory = get("USE_MOCK_REPOSITORY").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let store = match get("BOS_STORE").as_deref() {
            _ if memory => StoreKind::Memory,
            None | Some("postgres") => StoreKind::Postgres,
            Some("memory") => StoreKind::Memory,
            Some(other) => {
                return Err(invalid(
                    "BOS_STORE",
                    format!("`{other}` is neither `postgres` nor `memory`"),
                ))
            }
        };
        let database_url = get("DATABASE_URL").unwrap_or_default();
        if store == StoreKind::Postgres && database_url.is_empty() {
            return Err(invalid("DATABASE_URL", "required when BOS_STORE=postgres"));
        }
        let mut postgres = PostgresSettings::new(database_url);
        if let Some(v) = get("BOS_DB_MAX_CONNECTIONS") {
            postgres.max_connections = parse_num("BOS_DB_MAX_CONNECTIONS", &v)?;
        }
        if let Some(v) = get("BOS_DB_ACQUIRE_TIMEOUT_MS") {
            postgres.acquire_timeout =
                Duration::from_millis(parse_num("BOS_DB_ACQUIRE_TIMEOUT_MS", &v)?);
        }
        if let Some(v) = get("BOS_DB_STATEMENT_TIMEOUT_MS") {
            postgres.statement_timeout =
                Duration::from_millis(parse_num("BOS_DB_STATEMENT_TIMEOUT_MS", &v)?);
        }
        let bootstrap =
            get("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|| "localhost:9092".to_owned());
        let mut kafka = KafkaSettings::new(bootstrap);
        if let Some(v) = get("BOS_KAFKA_GROUP_ID") {
            kafka.group_id = v;
        }
        kafka.topic_prefix = get("BOS_KAFKA_TOPIC_PREFIX").unwrap_or_default();
        for (name, value) in &vars {
            if let Some(property) = name.strip_prefix("BOS_LIBRDKAFKA_") {
                kafka.librdkafka.push((
                    property.to_ascii_lowercase().replace('_', "."),
                    value.clone(),
                ));
            }
        }
        kafka.librdkafka.sort();
        let mut consumer = ConsumerSettings::default();
        if let Some(v) = get("BOS_CONSUMER_MAX_BATCH") {
            consumer.max_batch = parse_num("BOS_CONSUMER_MAX_BATCH", &v)?;
            if consumer.max_batch == 0 {
                return Err(invalid("BOS_CONSUMER_MAX_BATCH", "must be at least 1"));
            }
        }
        let mut relay = RelaySettings::default();
        if let Some(v) = get("BOS_RELAY_BATCH_SIZE") {
            relay.batch_size = parse_num("BOS_RELAY_BATCH_SIZE", &v)?;
        }
        if let Some(v) = get("BOS_RELAY_LEASE_SECS") {
            relay.lease = Duration::from_secs(parse_num("BOS_RELAY_LEASE_SECS", &v)?);
        }
        if let Some(v) = get("BOS_OUTBOX_RETENTION_SECS") {
            relay.retention = Duration::from_secs(parse_num("BOS_OUTBOX_RETENTION_SECS", &v)?);
        }
        Ok(Self {
            store,
            postgres,
            kafka,
            consumer,
            relay,
            http_addr: get("BOS_HTTP_ADDR").unwrap_or_else(|| "0.0.0.0:8080".to_owned()),
        })
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
    fn librdkafka_properties_and_store_selection() {
        let s = Settings::from_vars(vars(&[
            ("USE_MOCK_REPOSITORY", "true"),
            ("BOS_LIBRDKAFKA_SECURITY_PROTOCOL", "ssl"),
            ("BOS_KAFKA_TOPIC_PREFIX", "test-"),
        ]))
        .unwrap();
        assert_eq!(s.store, StoreKind::Memory);
        assert_eq!(
            s.kafka.librdkafka,
            [("security.protocol".to_owned(), "ssl".to_owned())]
        );
        assert_eq!(s.kafka.group_id, "batch-orchestrator-consumers");
        assert_eq!(s.kafka.topic("x"), "test-x");
        assert_eq!(s.kafka.unprefixed("test-x"), "x");
    }

    #[test]
    fn invalid_settings_name_the_key() {
        let e = Settings::from_vars(vars(&[("BOS_STORE", "redis")])).unwrap_err();
        assert_eq!(e.key, "BOS_STORE");
        let e = Settings::from_vars(vars(&[])).unwrap_err();
        assert_eq!(e.key, "DATABASE_URL");
        let e = Settings::from_vars(vars(&[
            ("BOS_STORE", "memory"),
            ("BOS_CONSUMER_MAX_BATCH", "lots"),
        ]))
        .unwrap_err();
        assert_eq!(e.key, "BOS_CONSUMER_MAX_BATCH");
    }
}
