//! Settings: typed once, layered (built-in defaults, a file, the original
//! service's variables, bos's own variables), validated at start-up with
//! errors that name the key. `bos config` shows the result and where each
//! value came from.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::contracts::{topics, PhaseName};
use crate::domain::PhaseGraph;

/// The documented defaults, built into the binary.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A value that never appears in logs or `bos config` output.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// A URL with its password replaced: `postgres://bos:***@db:5432/bos`.
    pub fn masked(&self) -> String {
        mask_url(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.masked())
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    Postgres,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditPolicyKind {
    AllowAll,
    FixedBalance,
    Entitlements,
}

/// What a credit check does when the entitlements service cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    Deny,
    Allow,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    pub kind: StoreKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl DatabaseSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: Secret::new(url),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

/// Kafka settings shared by the consumer, the relay and the dead-letter producer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub group_id: String,
    /// Prepended to every topic, consumed and published.
    pub topic_prefix: String,
    /// Prepended to published topics (commands, events, dead letters) instead
    /// of `topic_prefix`: a shadow run publishes beside the live service.
    #[serde(default)]
    pub publish_prefix: Option<String>,
    /// Also consume the live service's `batch.essays.registered` events and
    /// create the batches they announce (a shadow run never sees the HTTP
    /// registrations).
    #[serde(default)]
    pub adopt_registrations: bool,
    pub dlq_replication_factor: i32,
    #[serde(with = "humantime_serde")]
    pub topic_check_interval: Duration,
    /// librdkafka properties (dotted names), applied after bos's defaults.
    #[serde(default, serialize_with = "masked_properties")]
    pub librdkafka: BTreeMap<String, String>,
}

/// librdkafka properties as they may be shown: secrets replaced by `***`.
fn shown_properties(properties: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    let secret = |key: &str| {
        ["password", "secret", "token", "key"]
            .iter()
            .any(|w| key.contains(w))
    };
    properties
        .iter()
        .map(|(k, v)| (k.as_str(), if secret(k) { "***" } else { v.as_str() }))
        .collect()
}

fn masked_properties<S: serde::Serializer>(
    properties: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    shown_properties(properties).serialize(s)
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("publish_prefix", &self.publish_prefix)
            .field("adopt_registrations", &self.adopt_registrations)
            .field("dlq_replication_factor", &self.dlq_replication_factor)
            .field("topic_check_interval", &self.topic_check_interval)
            .field("librdkafka", &shown_properties(&self.librdkafka))
            .finish()
    }
}

impl KafkaSettings {
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            group_id: "batch-orchestrator-consumers".to_owned(),
            topic_prefix: String::new(),
            publish_prefix: None,
            adopt_registrations: false,
            dlq_replication_factor: -1,
            topic_check_interval: Duration::from_secs(30),
            librdkafka: BTreeMap::new(),
        }
    }

    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.topic_prefix)
    }

    /// A topic bos publishes to (a command, an event, a dead-letter topic).
    pub fn published(&self, name: &str) -> String {
        format!(
            "{}{name}",
            self.publish_prefix.as_deref().unwrap_or(&self.topic_prefix)
        )
    }

    /// The topics the worker consumes (unprefixed).
    pub fn consumed(&self) -> Vec<&'static str> {
        let mut names = topics::CONSUMED.to_vec();
        if self.adopt_registrations {
            names.push(topics::BATCH_ESSAYS_REGISTERED);
        }
        names
    }

    /// Settings of a shadow run beside the live service: its own consumer
    /// group, the live topics consumed, everything published under
    /// `shadow_prefix` (before the live prefix).
    pub fn shadow(&self, shadow_prefix: &str) -> Self {
        Self {
            group_id: format!("{}-shadow", self.group_id),
            publish_prefix: Some(format!("{shadow_prefix}{}", self.topic_prefix)),
            adopt_registrations: true,
            ..self.clone()
        }
    }

    /// The unprefixed name of a prefixed topic.
    pub fn unprefixed<'a>(&self, topic: &'a str) -> &'a str {
        topic.strip_prefix(&self.topic_prefix).unwrap_or(topic)
    }
}

/// Tuning of the consume → decide → commit loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSettings {
    pub max_batch: usize,
    pub max_conflict_retries: usize,
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    pub partition_buffer: usize,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            max_batch: 128,
            max_conflict_retries: 5,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            partition_buffer: 512,
        }
    }
}

/// Tuning of the outbox relay and the housekeeping beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    pub batch_size: i64,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    #[serde(with = "humantime_serde")]
    pub inbox_retention: Duration,
    pub purge_batch: i64,
    #[serde(with = "humantime_serde")]
    pub housekeeping_interval: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            poll_interval: Duration::from_secs(60),
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            lease: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
            inbox_retention: Duration::from_secs(14 * 24 * 3600),
            purge_batch: 1000,
            housekeeping_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub otlp_endpoint: String,
}

/// One phase of the pipeline graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSettings {
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub requires_prompt: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    pub phases: BTreeMap<String, PhaseSettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitlementsSettings {
    pub base_url: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub failure_threshold: u32,
    #[serde(with = "humantime_serde")]
    pub recovery_timeout: Duration,
    pub on_unavailable: OnUnavailable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditSettings {
    pub policy: CreditPolicyKind,
    pub balance: i64,
    pub entitlements: EntitlementsSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub environment: String,
    pub service_name: String,
    pub store: StoreSettings,
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub consumer: ConsumerSettings,
    pub relay: RelaySettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
    pub pipeline: PipelineSettings,
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

/// bos's own names the platform's operators already use, and the key each sets.
pub const OPERATOR_NAMES: [(&str, &str); 8] = [
    ("DATABASE_URL", "database.url"),
    ("KAFKA_BOOTSTRAP_SERVERS", "kafka.bootstrap_servers"),
    ("BOS_KAFKA_GROUP_ID", "kafka.group_id"),
    ("BOS_KAFKA_TOPIC_PREFIX", "kafka.topic_prefix"),
    ("BOS_HTTP_ADDR", "http.addr"),
    ("BOS_STORE", "store.kind"),
    ("BOS_LOG_FORMAT", "log.format"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "telemetry.otlp_endpoint"),
];

/// The original service's prefix.
pub const LEGACY_PREFIX: &str = "BATCH_ORCHESTRATOR_SERVICE_";

/// librdkafka properties bos sets itself because its guarantees depend on them.
pub const GUARDED_LIBRDKAFKA_KEYS: [&str; 10] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "isolation.level",
    "enable.gapless.guarantee",
    "group.id",
    "bootstrap.servers",
    "transactional.id",
];

/// Where each effective value that is not a built-in default came from.
pub type Sources = BTreeMap<String, String>;

/// Settings plus the provenance of every overridden key.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub sources: Sources,
}

fn from_config_error(e: config::ConfigError) -> ConfigError {
    let problem = e.to_string();
    let quoted_after = |marker: &str| {
        problem
            .split_once(marker)
            .and_then(|(_, rest)| rest.split('`').next())
            .map(str::to_owned)
    };
    let key = match &e {
        config::ConfigError::Type { key: Some(key), .. } => key.clone(),
        config::ConfigError::NotFound(key) => key.clone(),
        _ => quoted_after("for key `")
            .or_else(|| quoted_after("unknown field `").map(|f| format!("configuration ({f})")))
            .unwrap_or_else(|| "configuration".to_owned()),
    };
    invalid(&key, problem)
}

/// Layers overrides with the name of the variable each came from.
struct Overrides {
    values: Vec<(String, String, String)>,
}

impl Overrides {
    fn set(&mut self, key: &str, value: impl Into<String>, source: impl Into<String>) {
        self.values
            .push((key.to_owned(), value.into(), source.into()));
    }
}

/// The original service's variables, as bos keys (bos's own names win later).
fn legacy_overrides(vars: &HashMap<String, String>, out: &mut Overrides) {
    let legacy = |name: &str| {
        let full = format!("{LEGACY_PREFIX}{name}");
        vars.get(&full)
            .filter(|v| !v.trim().is_empty())
            .map(|v| (v.clone(), full))
    };
    let simple = [
        ("KAFKA_BOOTSTRAP_SERVERS", "kafka.bootstrap_servers"),
        ("KAFKA_CONSUMER_GROUP_ID", "kafka.group_id"),
        ("SERVICE_NAME", "service_name"),
        ("ENTITLEMENTS_BASE_URL", "credits.entitlements.base_url"),
    ];
    for (name, key) in simple {
        if let Some((value, source)) = legacy(name) {
            let value = if key == "credits.entitlements.base_url" {
                value.trim_end_matches('/').to_owned()
            } else {
                value
            };
            out.set(key, value, source);
        }
    }
    if let Some((seconds, source)) = legacy("ENTITLEMENTS_HTTP_TIMEOUT_SECONDS") {
        out.set(
            "credits.entitlements.timeout",
            format!("{}s", seconds.trim()),
            source,
        );
    }
    if let Some((level, source)) = legacy("LOG_LEVEL") {
        out.set("log.level", level.to_ascii_lowercase(), source);
    }
    if let Some((value, source)) = legacy("USE_MOCK_REPOSITORY") {
        if value.eq_ignore_ascii_case("true") {
            out.set("store.kind", "memory", source);
        }
    }
    let host = legacy("HOST");
    let port = legacy("PORT");
    if host.is_some() || port.is_some() {
        let sources: Vec<String> = [&host, &port]
            .iter()
            .filter_map(|p| p.as_ref().map(|(_, s)| s.clone()))
            .collect();
        let host = host.map_or_else(|| "0.0.0.0".to_owned(), |(h, _)| h);
        let port = port.map_or_else(|| "5000".to_owned(), |(p, _)| p);
        out.set("http.addr", format!("{host}:{port}"), sources.join(" + "));
    }
    match (legacy("DB_POOL_SIZE"), legacy("DB_MAX_OVERFLOW")) {
        (None, None) => {}
        (size, overflow) => {
            let n = |v: &Option<(String, String)>, default: u32| {
                v.as_ref()
                    .and_then(|(v, _)| v.trim().parse::<u32>().ok())
                    .unwrap_or(default)
            };
            let sources: Vec<String> = [&size, &overflow]
                .iter()
                .filter_map(|p| p.as_ref().map(|(_, s)| s.clone()))
                .collect();
            out.set(
                "database.max_connections",
                (n(&size, 5) + n(&overflow, 10)).to_string(),
                sources.join(" + "),
            );
        }
    }
    if let Some(environment) = vars.get("ENVIRONMENT").filter(|v| !v.trim().is_empty()) {
        out.set("environment", environment.trim(), "ENVIRONMENT");
        if environment.trim() == "testing" {
            out.set("store.kind", "memory", "ENVIRONMENT=testing");
        }
    }
    if let Some((url, source)) = legacy_database_url(vars) {
        out.set("database.url", url, source);
    }
    if vars.get("LOG_FORMAT").is_some_and(|v| v.trim() == "json") {
        out.set("log.format", "json", "LOG_FORMAT");
    }
    // The original always asked the entitlements service.
    if vars.keys().any(|k| k.starts_with(LEGACY_PREFIX)) {
        out.set(
            "credits.policy",
            "entitlements",
            format!("{LEGACY_PREFIX}* present (the original always checked entitlements)"),
        );
    }
}

/// The database URL the original service would have used, as bos's URL.
fn legacy_database_url(vars: &HashMap<String, String>) -> Option<(String, String)> {
    let get = |name: &str| vars.get(name).filter(|v| !v.trim().is_empty()).cloned();
    for name in [
        format!("{LEGACY_PREFIX}DATABASE_URL"),
        "SERVICE_DATABASE_URL".to_owned(),
    ] {
        if let Some(url) = get(&name) {
            return Some((normalise_database_url(&url), name));
        }
    }
    let production = get("ENVIRONMENT").is_some_and(|e| e.trim() == "production");
    let user = get("HULEEDU_DB_USER").unwrap_or_else(|| "huleedu_user".to_owned());
    let (host, port, password, source) = if production {
        let password = get("HULEEDU_PROD_DB_PASSWORD")?;
        (
            get("HULEEDU_PROD_DB_HOST")?,
            get("HULEEDU_PROD_DB_PORT").unwrap_or_else(|| "5432".to_owned()),
            password,
            "HULEEDU_PROD_DB_HOST/PORT/PASSWORD, HULEEDU_DB_USER",
        )
    } else {
        let password = get("HULEEDU_DB_PASSWORD")?;
        get("HULEEDU_DB_USER")?;
        if get("ENV_TYPE").is_some_and(|t| t.trim() == "docker") {
            (
                get(&format!("{LEGACY_PREFIX}DB_HOST"))
                    .unwrap_or_else(|| "batch_orchestrator_db".to_owned()),
                get(&format!("{LEGACY_PREFIX}DB_PORT")).unwrap_or_else(|| "5432".to_owned()),
                password,
                "HULEEDU_DB_USER/PASSWORD, ENV_TYPE=docker, BATCH_ORCHESTRATOR_SERVICE_DB_HOST/PORT",
            )
        } else {
            (
                "localhost".to_owned(),
                "5438".to_owned(),
                password,
                "HULEEDU_DB_USER/PASSWORD",
            )
        }
    };
    Some((
        format!(
            "postgres://{}:{}@{host}:{port}/huleedu_batch_orchestrator",
            percent_encode(&user),
            percent_encode(&password)
        ),
        source.to_owned(),
    ))
}

/// `postgresql+asyncpg://…` (SQLAlchemy's spelling) → `postgresql://…`.
fn normalise_database_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) if scheme.starts_with("postgresql+") => {
            format!("postgresql://{rest}")
        }
        _ => url.to_owned(),
    }
}

fn percent_encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Settings {
    /// Defaults, then `file`, then the environment `vars`.
    pub fn load(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Ok(Self::load_with_sources(file, vars)?.settings)
    }

    /// [`Settings::load`], keeping where each overridden value came from.
    pub fn load_with_sources(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Loaded, ConfigError> {
        let vars: HashMap<String, String> = vars.into_iter().collect();
        let mut sources = Sources::new();
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "BOS_CONFIG",
                    format!("cannot read configuration file {}: {e}", path.display()),
                )
            })?;
            let table: toml_keys::Table = text.parse().map_err(|e| {
                invalid(
                    "BOS_CONFIG",
                    format!("{} is not valid TOML: {e}", path.display()),
                )
            })?;
            for key in toml_keys::leaves(&table) {
                sources.insert(key, format!("file {}", path.display()));
            }
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let mut overrides = Overrides { values: Vec::new() };
        legacy_overrides(&vars, &mut overrides);
        let mut nested: Vec<(&String, &String)> = vars
            .iter()
            .filter(|(k, _)| k.starts_with("BOS__"))
            .collect();
        nested.sort();
        for (name, value) in nested {
            let key = name["BOS__".len()..]
                .to_ascii_lowercase()
                .replace("__", ".");
            overrides.set(&key, value.clone(), name.clone());
        }
        for (name, key) in OPERATOR_NAMES {
            if let Some(value) = vars.get(name) {
                overrides.set(key, value.clone(), name);
            }
        }
        if vars
            .get("USE_MOCK_REPOSITORY")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            overrides.set("store.kind", "memory", "USE_MOCK_REPOSITORY");
        }
        let mut properties: Vec<(&String, &String)> = vars
            .iter()
            .filter(|(k, _)| k.starts_with("BOS_LIBRDKAFKA_"))
            .collect();
        properties.sort();
        for (name, value) in properties {
            let property = name["BOS_LIBRDKAFKA_".len()..].to_ascii_lowercase();
            overrides.set(
                &format!("kafka.librdkafka.{property}"),
                value.clone(),
                name.clone(),
            );
        }
        for (key, value, source) in overrides.values {
            builder = builder
                .set_override(key.as_str(), value)
                .map_err(from_config_error)?;
            sources.insert(key, source);
        }
        let mut settings: Settings = builder
            .build()
            .map_err(from_config_error)?
            .try_deserialize()
            .map_err(from_config_error)?;
        // Properties come as `security_protocol` from files and variables;
        // `log_level` is the one settable property spelled with an underscore.
        settings.kafka.librdkafka = std::mem::take(&mut settings.kafka.librdkafka)
            .into_iter()
            .map(|(k, v)| match k.as_str() {
                "log_level" | "log.level" => ("log_level".to_owned(), v),
                _ => (k.replace('_', "."), v),
            })
            .collect();
        settings.validate()?;
        Ok(Loaded { settings, sources })
    }

    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.store.kind == StoreKind::Postgres && self.database.url.expose().trim().is_empty() {
            return Err(invalid(
                "database.url",
                "required when store.kind = postgres (set DATABASE_URL)",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        for (key, value) in [
            ("kafka.bootstrap_servers", &self.kafka.bootstrap_servers),
            ("kafka.group_id", &self.kafka.group_id),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        for key in self.kafka.librdkafka.keys() {
            if GUARDED_LIBRDKAFKA_KEYS.contains(&key.as_str()) {
                return Err(invalid(
                    &format!("kafka.librdkafka.{key}"),
                    "bos sets this property itself: its delivery guarantees depend on it",
                ));
            }
        }
        if self.consumer.max_batch == 0 {
            return Err(invalid("consumer.max_batch", "must be at least 1"));
        }
        if self.consumer.partition_buffer < self.consumer.max_batch {
            return Err(invalid(
                "consumer.partition_buffer",
                "must be at least consumer.max_batch",
            ));
        }
        let positive = [
            ("database.acquire_timeout", self.database.acquire_timeout),
            (
                "database.statement_timeout",
                self.database.statement_timeout,
            ),
            ("consumer.backoff_initial", self.consumer.backoff_initial),
            ("consumer.backoff_max", self.consumer.backoff_max),
            ("consumer.stall_timeout", self.consumer.stall_timeout),
            ("consumer.drain_timeout", self.consumer.drain_timeout),
            ("relay.poll_interval", self.relay.poll_interval),
            ("relay.retry_initial", self.relay.retry_initial),
            ("relay.retry_max", self.relay.retry_max),
            ("relay.lease", self.relay.lease),
            (
                "relay.housekeeping_interval",
                self.relay.housekeeping_interval,
            ),
            (
                "kafka.topic_check_interval",
                self.kafka.topic_check_interval,
            ),
            (
                "credits.entitlements.timeout",
                self.credits.entitlements.timeout,
            ),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        for (key, value) in [
            ("relay.batch_size", self.relay.batch_size),
            ("relay.purge_batch", self.relay.purge_batch),
        ] {
            if value < 1 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.http.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http.addr",
                format!("`{}` is not a socket address (host:port)", self.http.addr),
            ));
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a log filter", self.log.level),
            ));
        }
        self.graph()?;
        if self.credits.policy == CreditPolicyKind::Entitlements {
            let url = &self.credits.entitlements.base_url;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "credits.entitlements.base_url",
                    format!("`{url}` is not an http(s) URL"),
                ));
            }
            if self.credits.entitlements.failure_threshold == 0 {
                return Err(invalid(
                    "credits.entitlements.failure_threshold",
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }

    /// The pipeline graph this configuration describes.
    pub fn graph(&self) -> Result<PhaseGraph, ConfigError> {
        let mut phases = Vec::new();
        for (name, phase) in &self.pipeline.phases {
            let key = format!("pipeline.phases.{name}");
            let parse = |n: &str| {
                PhaseName::parse(n).ok_or_else(|| invalid(&key, format!("`{n}` is not a phase")))
            };
            let depends_on = phase
                .depends_on
                .iter()
                .map(|d| parse(d))
                .collect::<Result<Vec<_>, _>>()?;
            phases.push((parse(name)?, depends_on, phase.requires_prompt));
        }
        PhaseGraph::new(phases).map_err(|e| invalid("pipeline.phases", e.to_string()))
    }

    /// The effective configuration as JSON, secrets masked.
    pub fn masked(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Settings for tests and tools: the defaults with an in-memory store.
    pub fn defaults() -> Self {
        Self::load(
            None,
            [("BOS_STORE".to_owned(), "memory".to_owned())]
                .into_iter()
                .collect::<Vec<_>>(),
        )
        .unwrap_or_else(|e| unreachable!("the built-in defaults are valid: {e}"))
    }
}

/// Lists the keys a configuration file sets.
mod toml_keys {
    pub type Table = toml::Table;

    /// Dotted names of every leaf value (properties under `librdkafka` count as leaves).
    pub fn leaves(table: &Table) -> Vec<String> {
        let mut out = Vec::new();
        walk("", table, &mut out);
        out
    }

    fn walk(prefix: &str, table: &Table, out: &mut Vec<String>) {
        for (key, value) in table {
            let name = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match value.as_table() {
                Some(inner) => walk(&name, inner, out),
                None => out.push(name),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_file_and_environment_layer_in_order() {
        let s = Settings::load(None, vars(&[("USE_MOCK_REPOSITORY", "true")])).unwrap();
        assert_eq!(s.store.kind, StoreKind::Memory);
        assert_eq!(s.kafka.group_id, "batch-orchestrator-consumers");
        assert_eq!(s.consumer.max_batch, 128);
        assert_eq!(s.http.addr, "0.0.0.0:5000");
        let dir = std::env::temp_dir().join(format!("bos-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bos.toml");
        std::fs::write(
            &file,
            "[consumer]\nmax_batch = 64\nbackoff_max = \"3s\"\n[kafka]\ngroup_id = \"from-file\"\n",
        )
        .unwrap();
        let loaded = Settings::load_with_sources(
            Some(&file),
            vars(&[
                ("DATABASE_URL", "postgres://bos:hunter2@db:5432/bos"),
                ("BOS__CONSUMER__MAX_BATCH", "32"),
                ("BOS__RELAY__LEASE", "45s"),
                ("BOS_LIBRDKAFKA_SECURITY_PROTOCOL", "ssl"),
                ("BOS_LIBRDKAFKA_SASL_PASSWORD", "hunter2"),
                ("BOS_KAFKA_TOPIC_PREFIX", "test-"),
            ]),
        )
        .unwrap();
        let s = &loaded.settings;
        assert_eq!(s.store.kind, StoreKind::Postgres);
        assert_eq!(s.consumer.max_batch, 32, "environment beats the file");
        assert_eq!(
            s.consumer.backoff_max,
            Duration::from_secs(3),
            "durations read as text"
        );
        assert_eq!(s.relay.lease, Duration::from_secs(45));
        assert_eq!(s.kafka.group_id, "from-file", "the file beats the defaults");
        assert_eq!(s.kafka.topic("x"), "test-x");
        assert_eq!(
            s.kafka
                .librdkafka
                .get("security.protocol")
                .map(String::as_str),
            Some("ssl")
        );
        let shown = s.masked().to_string();
        assert!(!shown.contains("hunter2"), "secrets are masked: {shown}");
        assert!(shown.contains("postgres://bos:***@db:5432/bos"));
        assert!(!format!("{s:?}").contains("hunter2"), "and in Debug output");
        assert_eq!(
            loaded.sources["consumer.max_batch"],
            "BOS__CONSUMER__MAX_BATCH"
        );
        assert_eq!(loaded.sources["database.url"], "DATABASE_URL");
        assert!(loaded.sources["kafka.group_id"].starts_with("file "));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn invalid_settings_name_the_key() {
        let memory = ("USE_MOCK_REPOSITORY", "true");
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![("BOS_STORE", "redis")], "store.kind"),
            (vec![], "database.url"),
            (
                vec![memory, ("BOS__CONSUMER__MAX_BATCH", "lots")],
                "consumer.max_batch",
            ),
            (
                vec![memory, ("BOS__CONSUMER__MAX_BATCH", "0")],
                "consumer.max_batch",
            ),
            (
                vec![memory, ("BOS__CONSUMER__BACKOFF_MAX", "soon")],
                "consumer.backoff_max",
            ),
            (vec![memory, ("BOS_HTTP_ADDR", "nowhere")], "http.addr"),
            (
                vec![memory, ("BOS__CREDITS__POLICY", "free")],
                "credits.policy",
            ),
            (vec![memory, ("BOS_LOG_FORMAT", "xml")], "log.format"),
            (
                vec![memory, ("BOS_LIBRDKAFKA_ENABLE_AUTO_OFFSET_STORE", "true")],
                "kafka.librdkafka.enable.auto.offset.store",
            ),
            (
                vec![memory, ("BOS_LIBRDKAFKA_ACKS", "1")],
                "kafka.librdkafka.acks",
            ),
        ];
        for (env, key) in cases {
            let e = Settings::load(None, vars(&env)).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
        let e =
            Settings::load(None, vars(&[memory, ("BOS__CONSUMR__MAX_BATCH", "1")])).unwrap_err();
        assert!(e.to_string().contains("consumr"), "typos are named: {e}");
        let e = Settings::load(Some(Path::new("/nonexistent/bos.toml")), vars(&[])).unwrap_err();
        assert_eq!(e.key, "BOS_CONFIG");
    }

    #[test]
    fn the_phase_graph_is_validated_with_a_message_naming_it() {
        let dir = std::env::temp_dir().join(format!("bos-graph-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        for (text, needle) in [
            (
                "[pipeline.phases.nlp]\ndepends_on = [\"grading\"]\n",
                "grading",
            ),
            (
                "[pipeline.phases.spellcheck]\ndepends_on = [\"ai_feedback\"]\n",
                "cycle",
            ),
        ] {
            let file = dir.join("graph.toml");
            std::fs::write(&file, text).unwrap();
            let e = Settings::load(Some(&file), vars(&[("BOS_STORE", "memory")])).unwrap_err();
            assert!(e.key.starts_with("pipeline.phases"), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        }
        std::fs::remove_dir_all(dir).unwrap();
        let g = Settings::defaults().graph().unwrap();
        assert_eq!(
            g.resolve(PhaseName::AiFeedback).unwrap(),
            [PhaseName::Spellcheck, PhaseName::Nlp, PhaseName::AiFeedback]
        );
    }

    #[test]
    fn the_original_services_variables_are_read_and_bos_names_win() {
        let legacy = vars(&[
            (
                "BATCH_ORCHESTRATOR_SERVICE_KAFKA_BOOTSTRAP_SERVERS",
                "kafka:9092",
            ),
            (
                "BATCH_ORCHESTRATOR_SERVICE_KAFKA_CONSUMER_GROUP_ID",
                "bos-group",
            ),
            ("BATCH_ORCHESTRATOR_SERVICE_PORT", "5001"),
            ("BATCH_ORCHESTRATOR_SERVICE_DB_POOL_SIZE", "7"),
            ("BATCH_ORCHESTRATOR_SERVICE_LOG_LEVEL", "DEBUG"),
            (
                "BATCH_ORCHESTRATOR_SERVICE_ENTITLEMENTS_BASE_URL",
                "http://ent:8083/",
            ),
            (
                "BATCH_ORCHESTRATOR_SERVICE_ENTITLEMENTS_HTTP_TIMEOUT_SECONDS",
                "3",
            ),
            ("ENVIRONMENT", "staging"),
            ("HULEEDU_DB_USER", "huleedu_user"),
            ("HULEEDU_DB_PASSWORD", "p@ss word"),
            ("ENV_TYPE", "docker"),
        ]);
        let loaded = Settings::load_with_sources(None, legacy.clone()).unwrap();
        let s = &loaded.settings;
        assert_eq!(s.kafka.bootstrap_servers, "kafka:9092");
        assert_eq!(s.kafka.group_id, "bos-group");
        assert_eq!(s.http.addr, "0.0.0.0:5001");
        assert_eq!(
            s.database.max_connections, 17,
            "pool size plus the default overflow"
        );
        assert_eq!(s.log.level, "debug");
        assert_eq!(s.environment, "staging");
        assert_eq!(s.credits.policy, CreditPolicyKind::Entitlements);
        assert_eq!(s.credits.entitlements.base_url, "http://ent:8083");
        assert_eq!(s.credits.entitlements.timeout, Duration::from_secs(3));
        assert_eq!(
            s.database.url.expose(),
            "postgres://huleedu_user:p%40ss%20word@batch_orchestrator_db:5432/huleedu_batch_orchestrator"
        );
        assert_eq!(
            loaded.sources["kafka.group_id"],
            "BATCH_ORCHESTRATOR_SERVICE_KAFKA_CONSUMER_GROUP_ID"
        );
        let mut both = legacy;
        both.push(("BOS_KAFKA_GROUP_ID".into(), "bos-own".into()));
        both.push((
            "BATCH_ORCHESTRATOR_SERVICE_DATABASE_URL".into(),
            "postgresql+asyncpg://u:p@h:5432/d".into(),
        ));
        let loaded = Settings::load_with_sources(None, both).unwrap();
        assert_eq!(
            loaded.settings.kafka.group_id, "bos-own",
            "bos's own name wins"
        );
        assert_eq!(loaded.sources["kafka.group_id"], "BOS_KAFKA_GROUP_ID");
        assert_eq!(
            loaded.settings.database.url.expose(),
            "postgresql://u:p@h:5432/d"
        );
        let testing = Settings::load(None, vars(&[("ENVIRONMENT", "testing")])).unwrap();
        assert_eq!(
            testing.store.kind,
            StoreKind::Memory,
            "the original's testing mode"
        );
    }
}
