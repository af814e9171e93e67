//! Prometheus metrics, served as text on `GET /metrics`.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub messages: IntCounterVec,
    pub handler_seconds: Histogram,
    pub cas_conflicts: IntCounter,
    pub duplicates: IntCounter,
    pub dead_letters: IntCounter,
    pub outbox_backlog: IntGauge,
    pub outbox_oldest_age_seconds: Gauge,
    pub relay_published: IntCounter,
    pub relay_failures: IntCounter,
    pub relay_publish_seconds: Histogram,
    pub consumer_lag: IntGauge,
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

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("bos".into()), None).expect("valid prefix");
        let messages = IntCounterVec::new(
            Opts::new("messages_total", "Consumed messages by topic and outcome"),
            &["topic", "outcome"],
        )
        .expect("valid metric");
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        let handler_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "handler_seconds",
                "Time to apply one poll of records (decode to commit)",
            )
            .buckets(buckets.clone()),
        )
        .expect("valid metric");
        let relay_publish_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "relay_publish_seconds",
                "Time from claim to delivery report of a relay pass",
            )
            .buckets(buckets),
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let metrics = Self {
            messages,
            handler_seconds,
            cas_conflicts: counter(
                "cas_conflicts_total",
                "Version conflicts that led to a re-decision",
            ),
            duplicates: counter(
                "duplicates_skipped_total",
                "Redelivered events recognised by the inbox",
            ),
            dead_letters: counter("dead_letters_total", "Records sent to a dead-letter topic"),
            outbox_backlog: IntGauge::new("outbox_backlog", "Unpublished outbox rows")
                .expect("valid metric"),
            outbox_oldest_age_seconds: Gauge::new(
                "outbox_oldest_age_seconds",
                "Age of the oldest unpublished outbox row",
            )
            .expect("valid metric"),
            relay_published: counter("relay_published_total", "Outbox rows delivered to Kafka"),
            relay_failures: counter("relay_failures_total", "Outbox rows whose delivery failed"),
            relay_publish_seconds,
            consumer_lag: IntGauge::new(
                "consumer_lag",
                "Records behind the high watermark, summed over assigned partitions",
            )
            .expect("valid metric"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.messages.clone()),
            Box::new(metrics.handler_seconds.clone()),
            Box::new(metrics.cas_conflicts.clone()),
            Box::new(metrics.duplicates.clone()),
            Box::new(metrics.dead_letters.clone()),
            Box::new(metrics.outbox_backlog.clone()),
            Box::new(metrics.outbox_oldest_age_seconds.clone()),
            Box::new(metrics.relay_published.clone()),
            Box::new(metrics.relay_failures.clone()),
            Box::new(metrics.relay_publish_seconds.clone()),
            Box::new(metrics.consumer_lag.clone()),
        ];
        for c in collectors {
            metrics.registry.register(c).expect("unique metric names");
        }
        metrics
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails");
        String::from_utf8(out).expect("text encoding is UTF-8")
    }
}
