//! The application under test: built with the production builder and run
//! in-process (`TestApp`), or the `bos` binary as a process of its own
//! (`BosProcess`), configured only through its environment.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bos::app::{Application, Builder, Role};
use bos::config::{KafkaSettings, Secret, Settings, StoreKind};
use bos::metrics::Metrics;
use bos::store::Repository;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// Settings for a test: the defaults, this Kafka, short timers, and the
/// database at `database_url` (or the in-memory store).
pub fn settings(kafka: &KafkaSettings, database_url: Option<&str>) -> Settings {
    let mut s = Settings::defaults();
    s.kafka = kafka.clone();
    s.kafka.topic_check_interval = Duration::from_secs(1);
    s.relay.poll_interval = Duration::from_secs(2);
    s.consumer.drain_timeout = Duration::from_secs(20);
    if let Some(url) = database_url {
        s.store.kind = StoreKind::Postgres;
        s.database.url = Secret::new(url);
    }
    s
}

/// A running application, in this process.
pub struct TestApp {
    pub repo: Arc<dyn Repository>,
    pub metrics: Arc<Metrics>,
    pub address: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    pub async fn spawn(settings: Settings) -> Self {
        Self::spawn_with(Application::builder(settings), Role::Worker).await
    }

    /// Builds with `builder` (a test's repository or credit policy) and runs it.
    pub async fn spawn_with(builder: Builder, role: Role) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = builder
            .listener(listener)
            .build(role)
            .await
            .expect("the application builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let (repo, metrics) = (app.repo(), app.metrics());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(app.run_until_stopped(stopped));
        Self {
            repo,
            metrics,
            address,
            stop,
            task,
        }
    }

    /// Stops it (as SIGTERM would) and returns how it ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task
            .await
            .expect("the application task does not panic")
    }

    pub async fn join(self) -> anyhow::Result<()> {
        self.task
            .await
            .expect("the application task does not panic")
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        http("GET", &format!("{}{path}", self.address), &[], None).await
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (u16, Value) {
        http(method, &format!("{}{path}", self.address), headers, body).await
    }

    pub fn counter(&self, name: &str, labels: &[&str]) -> u64 {
        match name {
            "messages" => self.metrics.messages.with_label_values(labels).get(),
            "dead_letters" => self.metrics.dead_letters.with_label_values(labels).get(),
            "duplicates" => self.metrics.duplicates.get(),
            "apply_retries" => self.metrics.apply_retries.with_label_values(labels).get(),
            other => panic!("no counter {other}"),
        }
    }
}

/// One HTTP call; the body as JSON (or as a string when it is not JSON).
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut request = client.request(method.parse().unwrap(), url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.expect("the server answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The `bos` binary as a process of its own, configured through its environment.
pub struct BosProcess {
    pub child: Child,
    pub http: String,
    pub name: String,
    pub args: Vec<String>,
    pub env: HashMap<String, String>,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

/// The environment that points a `bos` process at a test's Kafka and database.
pub fn environment(kafka: &KafkaSettings, database_url: &str) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = [
        ("DATABASE_URL", database_url.to_owned()),
        ("KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers.clone()),
        ("BOS_KAFKA_TOPIC_PREFIX", kafka.topic_prefix.clone()),
        ("BOS_KAFKA_GROUP_ID", kafka.group_id.clone()),
        ("BOS__RELAY__POLL_INTERVAL", "2s".to_owned()),
        ("BOS__KAFKA__TOPIC_CHECK_INTERVAL", "1s".to_owned()),
        ("RUST_LOG", "warn,bos=info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (key, value) in &kafka.librdkafka {
        env.insert(
            format!(
                "BOS_LIBRDKAFKA_{}",
                key.replace('.', "_").to_ascii_uppercase()
            ),
            value.clone(),
        );
    }
    env
}

impl BosProcess {
    /// Starts `bos <command>` with `env` (and nothing else but PATH).
    pub fn start(name: &str, command: &str, env: &HashMap<String, String>) -> Self {
        Self::start_with_args(name, &[command], env)
    }

    /// Starts `bos <args…>` with `env` (and nothing else but PATH).
    pub fn start_with_args(name: &str, args: &[&str], env: &HashMap<String, String>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bos"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .env("BOS_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the bos binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut reader = None;
        if let Some(stderr) = child.stderr.take() {
            let sink = log.clone();
            let prefix = name.to_owned();
            reader = Some(tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if std::env::var_os("BOS_TEST_ECHO").is_some() {
                        eprintln!("[{prefix}] {line}");
                    }
                    sink.lock().unwrap().push(line);
                }
            }));
        }
        Self {
            child,
            http: format!("http://127.0.0.1:{port}"),
            name: name.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: env.clone(),
            log,
            reader,
        }
    }

    /// A new process with the same command and environment (after a kill).
    pub fn restart(&self) -> Self {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Self::start_with_args(&self.name, &args, &self.env)
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
    }

    /// Waits for the process to exit (at most `limit`), and for its last log lines.
    pub async fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok);
        if status.is_some() {
            if let Some(reader) = self.reader.take() {
                let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
            }
        }
        status
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Ok(r) = reqwest::get(format!("{}/readyz", self.http)).await {
                if r.status().as_u16() == 200 {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}
