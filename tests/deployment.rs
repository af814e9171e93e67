//! docker-compose.yml and the Dockerfile agree with what the binary reads:
//! service names, ports, environment variables and topics.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use bos::config::{Settings, OPERATOR_NAMES};
use bos::contracts::topics;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    serde_norway::from_str(&text).expect("docker-compose.yml is YAML")
}

/// `${NAME:-default}` → `default` (what compose substitutes when NAME is unset).
fn substitute(value: &str) -> String {
    match (value.find("${"), value.find('}')) {
        (Some(start), Some(end)) if end > start => {
            let inner = &value[start + 2..end];
            let default = inner.split_once(":-").map(|(_, d)| d).unwrap_or("");
            format!("{}{default}{}", &value[..start], &value[end + 1..])
        }
        _ => value.to_owned(),
    }
}

fn environment(service: &Value) -> HashMap<String, String> {
    service["environment"]
        .as_object()
        .expect("environment as a map")
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => substitute(s),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect()
}

fn url_host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    let host_port = rest.split('/').next().unwrap();
    let (host, port) = host_port.split_once(':').unwrap();
    (host.to_owned(), port.parse().unwrap())
}

#[test]
fn services_and_profiles() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    for name in ["kafka", "postgres", "kafka-topics", "bos"] {
        assert!(services.contains_key(name), "service {name}");
    }
    for name in ["otel-collector", "jaeger"] {
        assert_eq!(
            services[name]["profiles"],
            serde_json::json!(["tracing"]),
            "{name} is optional"
        );
    }
    assert_eq!(services["postgres"]["image"], "postgres:15");
    assert!(services["kafka"]["image"]
        .as_str()
        .unwrap()
        .starts_with("apache/kafka:"));
    assert_eq!(
        environment(&services["kafka"])["KAFKA_PROCESS_ROLES"],
        "broker,controller",
        "KRaft mode"
    );
    assert!(services["postgres"]["healthcheck"]["test"]
        .to_string()
        .contains("pg_isready"));
    let depends = services["bos"]["depends_on"].as_object().unwrap();
    assert_eq!(depends["postgres"]["condition"], "service_healthy");
    assert_eq!(
        depends["kafka-topics"]["condition"],
        "service_completed_successfully"
    );
    let collector = &services["otel-collector"]["volumes"][0].as_str().unwrap();
    let local = collector.split(':').next().unwrap();
    assert!(root().join(local).is_file(), "{local} exists");
}

#[test]
fn the_topic_bootstrap_creates_every_topic_the_binary_uses() {
    let compose = compose();
    let env = environment(&compose["services"]["kafka-topics"]);
    let created: BTreeSet<String> = env["TOPICS"]
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut expected: BTreeSet<String> = topics::PUBLISHED.iter().map(|t| t.to_string()).collect();
    for t in topics::CONSUMED {
        expected.insert(t.to_owned());
        expected.insert(format!("{t}{}", topics::DLQ_SUFFIX));
    }
    assert_eq!(created, expected);
    assert!(
        env["PARTITIONS"].parse::<u32>().is_ok(),
        "partitions configurable: {}",
        env["PARTITIONS"]
    );
}

#[tokio::test]
async fn the_bos_service_is_configured_only_with_settings_the_binary_reads() {
    let compose = compose();
    let services = &compose["services"];
    let env = environment(&services["bos"]);
    let known: BTreeSet<&str> = OPERATOR_NAMES.iter().map(|(name, _)| *name).collect();
    for name in env.keys() {
        let read = known.contains(name.as_str())
            || name.starts_with("BOS__")
            || name.starts_with("BOS_LIBRDKAFKA_")
            || [
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "RUST_LOG",
                "BOS_CONFIG",
                "USE_MOCK_REPOSITORY",
            ]
            .contains(&name.as_str());
        assert!(read, "{name} is not read by bos");
    }
    let settings = Settings::load(None, env.clone()).expect("the compose environment is valid");

    let (db_host, db_port) = url_host_port(&settings.postgres.url);
    assert!(
        services[&db_host].is_object(),
        "database host {db_host} is a service"
    );
    let pg = environment(&services[&db_host]);
    assert_eq!(db_port, 5432);
    assert!(settings.postgres.url.contains(&format!(
        "{}:{}@",
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"]
    )));
    assert!(settings
        .postgres
        .url
        .ends_with(&format!("/{}", pg["POSTGRES_DB"])));

    let (kafka_host, kafka_port) =
        url_host_port(&format!("kafka://{}", settings.kafka.bootstrap_servers));
    assert!(
        services[&kafka_host].is_object(),
        "kafka host {kafka_host} is a service"
    );
    let advertised = environment(&services[&kafka_host])["KAFKA_ADVERTISED_LISTENERS"].clone();
    assert!(
        advertised.contains(&format!("{kafka_host}:{kafka_port}")),
        "{advertised}"
    );

    let http_port: u16 = settings
        .http_addr
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    let ports: Vec<String> = services["bos"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    assert!(
        ports.iter().any(|p| p.ends_with(&format!(":{http_port}"))),
        "{ports:?} publish {http_port}"
    );
    let health = services["bos"]["healthcheck"]["test"].to_string();
    assert!(
        health.contains(&format!("localhost:{http_port}/readyz")),
        "{health}"
    );

    // The health check's route answers.
    let state = common::http::state(
        Arc::new(bos::store::MemoryRepository::new()),
        settings.rules(),
        true,
    );
    let (status, _) = common::http::call(&state, "GET", "/readyz", &[], None).await;
    assert_eq!(status, axum::http::StatusCode::OK);
}

#[test]
fn the_dockerfile_builds_and_checks_the_same_binary() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    assert!(
        lines.iter().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    for copied in ["Cargo.lock", "src", "migrations", "config"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("COPY ") && l.split_whitespace().any(|w| w == copied)),
            "the build copies {copied}"
        );
    }
    assert!(dockerfile.contains("cargo build --release --locked --bin bos"));
    let settings = Settings::load(None, environment(&compose()["services"]["bos"])).unwrap();
    let http_port = settings.http_addr.rsplit_once(':').unwrap().1;
    assert!(lines.contains(&format!("EXPOSE {http_port}").as_str()));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("HEALTHCHECK")
            && l.contains(&format!("localhost:{http_port}/readyz"))));
    assert!(lines.contains(&"ENTRYPOINT [\"bos\"]"));
    let env_addr = lines
        .iter()
        .find_map(|l| l.strip_prefix("ENV BOS_HTTP_ADDR="))
        .unwrap();
    assert_eq!(env_addr, settings.http_addr);
}
