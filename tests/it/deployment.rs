//! Deployment files agree with what the binary reads: docker-compose.yml and
//! the Dockerfile (service names, ports, variables, topics), and the Grafana
//! dashboard and Prometheus alert rules (every metric they name is served).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use bos::config::{Settings, OPERATOR_NAMES};
use bos::contracts::{topics, PhaseName};
use serde_json::Value;

use crate::support::flow::Flow;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Value {
    serde_norway::from_str(&read("docker-compose.yml")).expect("docker-compose.yml is YAML")
}

/// `${NAME:-default}` → `default` (what compose substitutes when NAME is unset).
fn substitute(value: &str) -> String {
    match (value.find("${"), value.find('}')) {
        (Some(start), Some(end)) if end > start => {
            let inner = &value[start + 2..end];
            let default = inner.split_once(":-").map_or("", |(_, d)| d);
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
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap();
    let (host, port) = host_port.split_once(':').unwrap();
    (host.to_owned(), port.parse().unwrap())
}

#[test]
fn services_and_profiles() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    for name in ["kafka", "postgres", "kafka-topics", "bos", "bos-relay"] {
        assert!(services.contains_key(name), "service {name}");
    }
    for (name, profile) in [
        ("otel-collector", "tracing"),
        ("jaeger", "tracing"),
        ("prometheus", "monitoring"),
        ("grafana", "monitoring"),
    ] {
        assert_eq!(
            services[name]["profiles"],
            serde_json::json!([profile]),
            "{name} is optional"
        );
    }
    assert_eq!(services["postgres"]["image"], "postgres:15");
    assert_eq!(
        environment(&services["kafka"])["KAFKA_PROCESS_ROLES"],
        "broker,controller",
        "KRaft mode"
    );
    assert_eq!(
        environment(&services["kafka"])["KAFKA_AUTO_CREATE_TOPICS_ENABLE"],
        "false"
    );
    let depends = services["bos"]["depends_on"].as_object().unwrap();
    assert_eq!(depends["postgres"]["condition"], "service_healthy");
    assert_eq!(
        depends["kafka-topics"]["condition"],
        "service_completed_successfully"
    );
    assert_eq!(
        services["bos-relay"]["command"],
        serde_json::json!(["relay"])
    );
    for service in ["otel-collector", "prometheus", "grafana"] {
        for volume in services[service]["volumes"].as_array().unwrap() {
            let local = volume.as_str().unwrap().split(':').next().unwrap();
            assert!(root().join(local).exists(), "{service}: {local} exists");
        }
    }
}

#[test]
fn the_topic_bootstrap_creates_every_topic_the_binary_uses() {
    let env = environment(&compose()["services"]["kafka-topics"]);
    let created: BTreeSet<String> = env["TOPICS"]
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    // The bootstrap also serves a deployment that adopts registrations (its
    // dead-letter topic is then needed too).
    let kafka = bos::config::KafkaSettings {
        adopt_registrations: true,
        ..bos::config::KafkaSettings::new("x")
    };
    let expected: BTreeSet<String> = bos::kafka::required_topics(&kafka, true)
        .into_iter()
        .collect();
    assert_eq!(created, expected);
    assert!(
        env["PARTITIONS"].parse::<u32>().is_ok(),
        "partitions configurable: {}",
        env["PARTITIONS"]
    );
}

#[test]
fn the_services_are_configured_only_with_settings_the_binary_reads() {
    let compose = compose();
    let services = &compose["services"];
    let known: BTreeSet<&str> = OPERATOR_NAMES.iter().map(|(name, _)| *name).collect();
    for service in ["bos", "bos-relay"] {
        let env = environment(&services[service]);
        for name in env.keys() {
            let read = known.contains(name.as_str())
                || name.starts_with("BOS__")
                || name.starts_with("BOS_LIBRDKAFKA_")
                || ["RUST_LOG", "BOS_CONFIG", "USE_MOCK_REPOSITORY"].contains(&name.as_str());
            assert!(read, "{service}: {name} is not read by bos");
        }
        let settings = Settings::load(None, env.clone()).expect("the compose environment is valid");
        let (db_host, db_port) = url_host_port(settings.database.url.expose());
        assert!(
            services[&db_host].is_object(),
            "database host {db_host} is a service"
        );
        let pg = environment(&services[&db_host]);
        assert_eq!(db_port, 5432);
        assert!(settings.database.url.expose().contains(&format!(
            "{}:{}@",
            pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"]
        )));
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
        let http_port = settings.http.addr.rsplit_once(':').unwrap().1;
        let health = services[service]["healthcheck"]["test"].to_string();
        assert!(
            health.contains(&format!("localhost:{http_port}/readyz")),
            "{health}"
        );
    }
    let settings = Settings::load(None, environment(&services["bos"])).unwrap();
    assert_eq!(
        settings.http.addr, "0.0.0.0:5000",
        "the platform calls bos on 5000"
    );
    let ports: Vec<&str> = services["bos"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(ports.contains(&"5000:5000"), "{ports:?}");
    let scrape = read("config/prometheus.yml");
    assert!(
        scrape.contains("bos:5000"),
        "Prometheus scrapes the bos service's port"
    );
}

#[test]
fn the_dockerfile_builds_and_checks_the_same_binary() {
    let dockerfile = read("Dockerfile");
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
        assert!(root().join(copied).exists(), "{copied} exists");
    }
    assert!(dockerfile.contains("cargo build --release --locked --bin bos"));
    let settings = Settings::load(None, environment(&compose()["services"]["bos"])).unwrap();
    let http_port = settings.http.addr.rsplit_once(':').unwrap().1;
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
    assert_eq!(env_addr, settings.http.addr);
}

/// Metric family names in a PromQL text: `bos_*`, `huleedu_*`,
/// `batch_orchestrator_service_*`, `outbox_*`, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        if ["bos_", "huleedu_", "batch_orchestrator_service_", "outbox_"]
            .iter()
            .any(|p| word.starts_with(p))
        {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(&word);
            names.insert(family.to_owned());
        }
        word.clear();
    }
    names
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_name_is_served() {
    let dashboard: Value =
        serde_json::from_str(&read("config/grafana/dashboards/bos.json")).unwrap();
    let mut queries = String::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push_str(target["expr"].as_str().unwrap());
            queries.push('\n');
        }
    }
    let alerts: Value = serde_norway::from_str(&read("config/alerts.yml")).unwrap();
    let mut alert_exprs = String::new();
    for group in alerts["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            alert_exprs.push_str(rule["expr"].as_str().unwrap());
            alert_exprs.push('\n');
        }
    }
    let mut named = metric_names(&queries);
    let from_alerts = metric_names(&alert_exprs);
    for wanted in [
        "bos_consumer_lag",
        "bos_partition_stuck_seconds",
        "bos_outbox_oldest_age_seconds",
        "bos_dead_letters_total",
        "bos_apply_retries_total",
        "bos_ready",
    ] {
        assert!(from_alerts.contains(wanted), "the alerts watch {wanted}");
        assert!(
            wanted == "bos_ready" || named.contains(wanted),
            "the dashboard shows {wanted}"
        );
    }
    named.extend(from_alerts);
    // A running worker after one whole run, so every family has samples.
    let flow = Flow::start().await;
    let (id, corr) = flow.register(None, 2).await;
    flow.provision(&id, corr, 2).await;
    flow.request(&id, "spellcheck").await;
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    flow.answer(&id, PhaseName::Spellcheck, &spell[0], &[])
        .await;
    flow.observer.wait_for(topics::PIPELINE_COMPLETED, 1).await;
    let _ = flow.app.get(&format!("/v1/batches/{id}/status")).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (status, text) = flow.app.get("/metrics").await;
    assert_eq!(status, 200);
    let served = metric_names(text.as_str().unwrap());
    let missing: Vec<&String> = named.iter().filter(|n| !served.contains(*n)).collect();
    assert!(missing.is_empty(), "named but not served: {missing:?}");
    flow.finish(vec![]).await.unwrap();
}
