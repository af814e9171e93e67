//! Prometheus metrics, served as text on `GET /metrics`: bos's own (`bos_*`)
//! and, next to them, the names the original service's dashboards read.

use std::time::Duration;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::contracts::topics;
use crate::store::UnitOfWork;

/// The stages of a hop, in order (`bos_stage_seconds`).
pub const STAGES: [&str; 8] = [
    "fetch",
    "decided",
    "committed",
    "relay_woke",
    "claimed",
    "produced",
    "acknowledged",
    "marked",
];

/// Finer at the low end: a hop's stages take milliseconds.
const STAGE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const LATENCY: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    pub messages: IntCounterVec,
    pub handler_seconds: Histogram,
    pub cas_conflicts: IntCounter,
    pub duplicates: IntCounter,
    pub dead_letters: IntCounterVec,
    pub apply_retries: IntCounterVec,
    pub partition_stuck_seconds: GaugeVec,
    pub consumer_lag: IntGauge,
    pub outbox_backlog: IntGauge,
    pub outbox_oldest_age_seconds: Gauge,
    pub outbox_failing: IntGauge,
    pub relay_published: IntCounter,
    pub relay_failures: IntCounter,
    pub relay_pass_seconds: Histogram,
    pub relay_lease_lost: IntCounter,
    pub stage_seconds: HistogramVec,
    pub producer_replacements: IntCounter,
    pub kafka_client_errors: IntCounterVec,
    pub rebalances: IntCounterVec,
    pub commit_failures: IntCounter,
    pub missing_topics: IntGauge,
    pub ready: IntGauge,
    pub credit_checks: IntCounterVec,
    pub purged: IntCounterVec,
    // The original service's names.
    pub http_requests: IntCounterVec,
    pub http_seconds: HistogramVec,
    pub pipeline_executions: IntCounterVec,
    pub phase_transition_seconds: HistogramVec,
    pub orchestration_commands: IntCounterVec,
    pub db_connections_active: IntGauge,
    pub db_connections_idle: IntGauge,
    pub db_acquire_seconds: Histogram,
    pub db_query_seconds: HistogramVec,
    pub outbox_queue_depth: IntGaugeVec,
    pub outbox_events_published: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The service label the original's outbox metrics carry.
pub const SERVICE: &str = "batch-service";

struct Builder {
    registry: Registry,
}

// Metric names and labels below are constants: construction cannot fail.
impl Builder {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.registry
            .register(Box::new(c.clone()))
            .unwrap_or_else(|e| unreachable!("metric names are unique: {e}"));
        c
    }
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("{e}")))
    }
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(
            IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("{e}")),
        )
    }
    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("{e}")))
    }
    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        self.add(
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .unwrap_or_else(|e| unreachable!("{e}")),
        )
    }
    fn histograms(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        self.add(
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .unwrap_or_else(|e| unreachable!("{e}")),
        )
    }
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Self::unlabelled();
        // Every label value an alert or dashboard reads exists from the start (at 0).
        for reason in [
            "decode_error",
            "unknown_batch",
            "empty_ready_essays",
            "apply_error",
        ] {
            metrics.dead_letters.with_label_values(&[reason]);
        }
        for class in ["transient", "contended", "permanent"] {
            metrics.apply_retries.with_label_values(&[class]);
        }
        for client in ["consumer", "producer"] {
            metrics.kafka_client_errors.with_label_values(&[client]);
        }
        for kind in ["assign", "revoke"] {
            metrics.rebalances.with_label_values(&[kind]);
        }
        for table in ["event_outbox", "processed_events"] {
            metrics.purged.with_label_values(&[table]);
        }
        for result in ["allowed", "denied", "unavailable"] {
            metrics.credit_checks.with_label_values(&[result]);
        }
        for stage in STAGES {
            metrics.stage_seconds.with_label_values(&[stage]);
        }
        metrics.outbox_queue_depth.with_label_values(&[SERVICE]);
        metrics
    }

    fn unlabelled() -> Self {
        let b = Builder {
            registry: Registry::new(),
        };
        Self {
            messages: b.counters(
                "bos_messages_total",
                "Consumed records by topic and outcome (applied, ignored, duplicate, dead_letter)",
                &["topic", "outcome"],
            ),
            handler_seconds: b.histogram(
                "bos_handler_seconds",
                "Time to apply one partition's batch of records, decode to commit",
                LATENCY,
            ),
            cas_conflicts: b.counter(
                "bos_cas_conflicts_total",
                "Batches whose version moved underneath a decision (decided again)",
            ),
            duplicates: b.counter(
                "bos_duplicates_skipped_total",
                "Redelivered or repeated events recognised by the inbox",
            ),
            dead_letters: b.counters(
                "bos_dead_letters_total",
                "Records sent to a dead-letter topic, by reason",
                &["reason"],
            ),
            apply_retries: b.counters(
                "bos_apply_retries_total",
                "Times a partition's records were retried, by error class (transient, contended, permanent)",
                &["class"],
            ),
            partition_stuck_seconds: b.add(
                GaugeVec::new(
                    Opts::new(
                        "bos_partition_stuck_seconds",
                        "Seconds a partition has had records waiting without progress",
                    ),
                    &["topic", "partition"],
                )
                .unwrap_or_else(|e| unreachable!("{e}")),
            ),
            consumer_lag: b.gauge(
                "bos_consumer_lag",
                "Records behind the high watermark, summed over assigned partitions",
            ),
            outbox_backlog: b.gauge("bos_outbox_backlog", "Unpublished outbox rows"),
            outbox_oldest_age_seconds: b.add(
                Gauge::new(
                    "bos_outbox_oldest_age_seconds",
                    "Age of the oldest unpublished outbox row",
                )
                .unwrap_or_else(|e| unreachable!("{e}")),
            ),
            outbox_failing: b.gauge(
                "bos_outbox_failing",
                "Unpublished outbox rows that failed at least once",
            ),
            relay_published: b.counter("bos_relay_published_total", "Outbox rows delivered to Kafka"),
            relay_failures: b.counter(
                "bos_relay_failures_total",
                "Outbox rows whose delivery failed (retried with backoff)",
            ),
            relay_pass_seconds: b.histogram(
                "bos_relay_pass_seconds",
                "Time of one relay pass, claim to settle",
                LATENCY,
            ),
            relay_lease_lost: b.counter(
                "bos_relay_lease_lost_total",
                "Rows a relay published but could not settle: another relay held them",
            ),
            stage_seconds: b.histograms(
                "bos_stage_seconds",
                "Time spent in each stage of a hop: fetch (produced → received), decided (batches and \
                 inbox read, rules applied), committed (the transaction), relay_woke (outbox row \
                 written → relay pass started), claimed, produced (enqueued), acknowledged, marked",
                &["stage"],
                STAGE_BUCKETS,
            ),
            producer_replacements: b.counter(
                "bos_producer_replacements_total",
                "Producers replaced after a fatal error",
            ),
            kafka_client_errors: b.counters(
                "bos_kafka_client_errors_total",
                "Errors librdkafka reported, by client",
                &["client"],
            ),
            rebalances: b.counters(
                "bos_rebalances_total",
                "Partition assignments and revocations",
                &["kind"],
            ),
            commit_failures: b.counter("bos_commit_failures_total", "Offset commits that failed"),
            missing_topics: b.gauge("bos_missing_topics", "Topics bos needs that do not exist"),
            ready: b.gauge(
                "bos_ready",
                "1 when the in-process readiness checks pass (topics, consumer, relay, producer)",
            ),
            credit_checks: b.counters(
                "bos_credit_checks_total",
                "Credit checks by answer (allowed, denied, unavailable)",
                &["result"],
            ),
            purged: b.counters(
                "bos_purged_rows_total",
                "Rows deleted by housekeeping, by table",
                &["table"],
            ),
            http_requests: b.counters(
                "batch_orchestrator_service_http_requests_total",
                "HTTP requests",
                &["method", "endpoint", "status_code"],
            ),
            http_seconds: b.histograms(
                "batch_orchestrator_service_http_request_duration_seconds",
                "HTTP request latency",
                &["method", "endpoint"],
                prometheus::DEFAULT_BUCKETS,
            ),
            pipeline_executions: b.counters(
                "huleedu_pipeline_execution_total",
                "Pipeline requests by pipeline and outcome (started, denied, parked, and each final status)",
                &["pipeline_type", "outcome"],
            ),
            phase_transition_seconds: b.histograms(
                "huleedu_phase_transition_duration_seconds",
                "Time from a phase's dispatch to its outcome",
                &["from_phase", "to_phase"],
                &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            orchestration_commands: b.counters(
                "huleedu_orchestration_commands_total",
                "Commands published by command type and target service",
                &["command_type", "target_service"],
            ),
            db_connections_active: b.gauge(
                "batch_orchestrator_service_database_connections_active",
                "Database connections in use",
            ),
            db_connections_idle: b.gauge(
                "batch_orchestrator_service_database_connections_idle",
                "Idle database connections",
            ),
            db_acquire_seconds: b.histogram(
                "batch_orchestrator_service_database_connection_acquire_seconds",
                "Time waiting for a pooled connection",
                LATENCY,
            ),
            db_query_seconds: b.histograms(
                "batch_orchestrator_service_database_query_duration_seconds",
                "Database operation latency",
                &["operation", "table", "result"],
                LATENCY,
            ),
            outbox_queue_depth: b.add(
                IntGaugeVec::new(
                    Opts::new("outbox_queue_depth", "Unpublished outbox rows"),
                    &["service"],
                )
                .unwrap_or_else(|e| unreachable!("{e}")),
            ),
            outbox_events_published: b.counters(
                "outbox_events_published_total",
                "Outbox rows published, by event type",
                &["service", "event_type"],
            ),
            registry: b.registry,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Every metric family name this process serves.
    pub fn names(&self) -> Vec<String> {
        self.registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect()
    }

    pub fn observe_query(&self, operation: &str, took: Duration, ok: bool) {
        let table = match operation {
            "claim_outbox" | "renew_outbox_lease" | "settle_outbox" | "purge_outbox"
            | "outbox_stats" => "event_outbox",
            "processed" | "purge_inbox" => "processed_events",
            "ping" => "-",
            _ => "batches",
        };
        self.db_query_seconds
            .with_label_values(&[operation, table, if ok { "success" } else { "error" }])
            .observe(took.as_secs_f64());
    }

    /// What a unit of work will tell the platform's dashboards once committed
    /// (computed before the commit, so the unit can move into it).
    pub fn observations(unit: &UnitOfWork) -> Vec<Observation> {
        let mut out = Vec::new();
        for m in &unit.outbox {
            if let Some((command, service)) = command_target(m.topic) {
                out.push(Observation {
                    batch: m.key.clone(),
                    kind: Observed::Command(command, service),
                });
            }
            let data = || m.envelope()["data"].clone();
            let pipeline = match m.topic {
                topics::PIPELINE_DENIED => Some((
                    data()["requested_pipeline"]
                        .as_str()
                        .unwrap_or("unknown")
                        .to_owned(),
                    "denied".to_owned(),
                )),
                topics::PIPELINE_COMPLETED => {
                    let target = unit
                        .writes
                        .iter()
                        .find(|w| w.batch.id == m.key)
                        .and_then(|w| w.batch.pipeline.requested_pipelines.last().copied());
                    Some((
                        target.map_or("none", |p| p.as_str()).to_owned(),
                        data()["final_status"]
                            .as_str()
                            .unwrap_or("unknown")
                            .to_owned(),
                    ))
                }
                topics::TEACHER_NOTIFICATION
                    if m.payload.contains("\"batch_processing_started\"") =>
                {
                    Some((
                        data()["payload"]["requested_pipeline"]
                            .as_str()
                            .unwrap_or("unknown")
                            .to_owned(),
                        "started".to_owned(),
                    ))
                }
                _ => None,
            };
            if let Some((pipeline, outcome)) = pipeline {
                out.push(Observation {
                    batch: m.key.clone(),
                    kind: Observed::Pipeline(pipeline, outcome),
                });
            }
        }
        for w in &unit.writes {
            for t in &w.transitions {
                let (Some(done), Some(started)) =
                    (t.completed_at, w.batch.pipeline.phase(t.phase).started_at)
                else {
                    continue;
                };
                out.push(Observation {
                    batch: w.batch.id.clone(),
                    kind: Observed::Phase(
                        t.phase.as_str(),
                        t.to.as_str(),
                        (done - started).num_milliseconds().max(0) as f64 / 1000.0,
                    ),
                });
            }
        }
        out
    }

    /// Records `observations` of the batches whose writes won.
    /// One observation of a hop's stage (see `bos_stage_seconds`).
    pub fn stage(&self, stage: &str, took: std::time::Duration) {
        self.stage_seconds
            .with_label_values(&[stage])
            .observe(took.as_secs_f64());
    }

    pub fn record(
        &self,
        observations: Vec<Observation>,
        lost: &std::collections::BTreeSet<String>,
    ) {
        for o in observations
            .into_iter()
            .filter(|o| !lost.contains(&o.batch))
        {
            match o.kind {
                Observed::Command(command, service) => self
                    .orchestration_commands
                    .with_label_values(&[command, service])
                    .inc(),
                Observed::Pipeline(pipeline, outcome) => self
                    .pipeline_executions
                    .with_label_values(&[&pipeline, &outcome])
                    .inc(),
                Observed::Phase(phase, to, seconds) => self
                    .phase_transition_seconds
                    .with_label_values(&[phase, to])
                    .observe(seconds),
            }
        }
    }
}

/// One thing a committed unit of work counts in the metrics.
#[derive(Debug, Clone)]
pub struct Observation {
    batch: String,
    kind: Observed,
}

#[derive(Debug, Clone)]
enum Observed {
    Command(&'static str, &'static str),
    Pipeline(String, String),
    Phase(&'static str, &'static str, f64),
}
/// `(command type, target service)` of a command topic.
fn command_target(topic: &str) -> Option<(&'static str, &'static str)> {
    Some(match topic {
        topics::SPELLCHECK_COMMAND => ("batch.spellcheck.initiate.command", "spellchecker_service"),
        topics::NLP_COMMAND => ("batch.nlp.initiate.command.v2", "nlp_service"),
        topics::CJ_ASSESSMENT_COMMAND => (
            "batch.cj_assessment.initiate.command",
            "cj_assessment_service",
        ),
        topics::AI_FEEDBACK_COMMAND => {
            ("batch.ai_feedback.initiate.command", "ai_feedback_service")
        }
        topics::STUDENT_MATCHING_COMMAND => (
            "batch.student.matching.initiate.command",
            "class_management_service",
        ),
        _ => return None,
    })
}
