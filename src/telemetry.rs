//! Logs and traces: `tracing` for both, JSON logs on request, OpenTelemetry
//! spans continued from an incoming W3C `traceparent`, exported over OTLP only
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes pending spans when dropped.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("trace export shutdown: {e}");
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` filters (else `log.level`),
/// `log.format` chooses text or JSON lines, and spans are exported over OTLP
/// when `telemetry.otlp_endpoint` is set.
pub fn init(log: &crate::config::LogSettings, otlp_endpoint: &str) -> anyhow::Result<Telemetry> {
    let json = log.format == crate::config::LogFormat::Json;
    let mut builder = SdkTracerProvider::builder().with_resource(
        Resource::builder()
            .with_service_name("batch_orchestrator_service")
            .build(),
    );
    if !otlp_endpoint.trim().is_empty() {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(otlp_endpoint.trim())
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("bos"));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    // Logs go to stderr (stdout is for what a command prints), coloured only on a terminal.
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    Ok(Telemetry { provider })
}

/// Makes `span` a child of the incoming trace and returns the `traceparent` to
/// send onwards (the incoming one unchanged when no OpenTelemetry layer runs).
pub fn continue_trace(span: &tracing::Span, incoming: Option<&str>) -> Option<String> {
    let propagator = TraceContextPropagator::new();
    if let Some(traceparent) = incoming {
        let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        let _ = span.set_parent(propagator.extract(&carrier));
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    propagator.inject_context(&span.context(), &mut carrier);
    carrier
        .remove("traceparent")
        .or_else(|| incoming.map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_trace_continues_with_a_new_span() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let outgoing = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("event");
            continue_trace(&span, Some(INCOMING))
        })
        .unwrap();
        let parts: Vec<&str> = outgoing.split('-').collect();
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
        assert_ne!(parts[2], "00f067aa0ba902b7", "a span of our own");
        assert_eq!(parts[3], "01");
    }

    #[test]
    fn without_a_tracer_the_incoming_context_is_passed_on() {
        let span = tracing::info_span!("event");
        assert_eq!(
            continue_trace(&span, Some(INCOMING)).as_deref(),
            Some(INCOMING)
        );
        assert_eq!(continue_trace(&span, None), None);
    }
}
