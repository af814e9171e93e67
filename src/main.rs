//! The `bos` binary: a thin shell over the library.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use bos::app::{self, Role};
use bos::config::Settings;

#[derive(Parser)]
#[command(name = "bos", version, about = "Batch Orchestrator Service")]
struct Cli {
    /// A TOML file overriding the built-in defaults (see config/default.toml).
    #[arg(long, global = true, env = "BOS_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume, decide, publish and serve HTTP until SIGTERM/SIGINT.
    Run,
    /// Run only the outbox relay.
    Relay,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration (secrets masked) and exit.
    Config,
    /// Measure apply throughput, latency, the relay, idle cost and the SQL ceiling
    /// (PostgreSQL from DATABASE_URL; Kafka embedded unless KAFKA_BOOTSTRAP_SERVERS).
    Bench(BenchArgs),
    /// Run the whole system in-process (embedded Kafka, in-memory store or
    /// DATABASE_URL) against simulated upstream services, then print a summary.
    Demo(DemoArgs),
    /// Dead-letter topics.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Events of the throughput test.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Partitions per topic: the apply path's concurrency.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Records applied per transaction at most.
    #[arg(long, default_value_t = 256)]
    max_batch: usize,
    #[arg(long, default_value_t = 10)]
    pool_size: u32,
    /// Events per second of the latency test.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of the latency test.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Pre-filled outbox rows of the relay test.
    #[arg(long, default_value_t = 20_000)]
    relay_rows: usize,
    /// Seconds of the idle measurement.
    #[arg(long, default_value_t = 10)]
    idle: u64,
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let database_url = std::env::var("DATABASE_URL")
        .map_err(|_| anyhow::anyhow!("bos bench needs DATABASE_URL"))?;
    let options = bos::bench::BenchOptions {
        database_url,
        kafka_bootstrap: std::env::var("KAFKA_BOOTSTRAP_SERVERS")
            .ok()
            .filter(|b| !b.is_empty()),
        events: args.events,
        partitions: args.partitions,
        max_batch: args.max_batch,
        pool_size: args.pool_size,
        rate: args.rate,
        duration: Duration::from_secs(args.duration),
        relay_rows: args.relay_rows,
        idle: Duration::from_secs(args.idle),
    };
    let report = bos::bench::run(options).await?;
    println!("\n{}", report.table());
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Batches to register.
    #[arg(long, default_value_t = 50)]
    batches: usize,
    /// Essays per batch, as MIN-MAX.
    #[arg(long, default_value = "2-6", value_parser = essay_range)]
    essays: (usize, usize),
    /// Chance that an essay fails a phase.
    #[arg(long, default_value_t = 0.05, value_parser = probability)]
    failure_rate: f64,
    /// Chance that a whole phase fails (default: a fifth of --failure-rate).
    #[arg(long, value_parser = probability)]
    phase_failure_rate: Option<f64>,
    /// Chance that an upstream event is delivered twice.
    #[arg(long, default_value_t = 0.1, value_parser = probability)]
    duplicate_rate: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Longest answer delay of the simulated essay lifecycle service, in ms.
    #[arg(long, default_value_t = 30)]
    max_delay_ms: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_seconds: u64,
}

fn essay_range(raw: &str) -> Result<(usize, usize), String> {
    let (lo, hi) = raw.split_once('-').unwrap_or((raw, raw));
    let parse = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{raw}` is not MIN-MAX"))
    };
    let (lo, hi) = (parse(lo)?, parse(hi)?);
    if lo == 0 || lo > hi {
        return Err(format!("`{raw}`: need 1 <= MIN <= MAX"));
    }
    Ok((lo, hi))
}

fn probability(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("`{raw}` is not a probability between 0 and 1")),
    }
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let options = bos::demo::DemoOptions {
        batches: args.batches,
        essays_min: args.essays.0,
        essays_max: args.essays.1,
        failure_rate: args.failure_rate,
        phase_failure_rate: args.phase_failure_rate.unwrap_or(args.failure_rate / 5.0),
        duplicate_rate: args.duplicate_rate,
        seed: args.seed,
        max_delay: Duration::from_millis(args.max_delay_ms),
        database_url: std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()),
        timeout: Duration::from_secs(args.timeout_seconds),
    };
    let store = if options.database_url.is_some() {
        "PostgreSQL (DATABASE_URL)"
    } else {
        "in-memory store"
    };
    eprintln!(
        "bos demo: {} batches, embedded Kafka, {store}, seed {}",
        options.batches, options.seed
    );
    let summary = bos::demo::run(options).await?;
    println!("\n{}", summary.render());
    if summary.problems.is_empty() {
        Ok(())
    } else {
        for problem in summary.problems.iter().take(20) {
            eprintln!("inconsistent: {problem}");
        }
        std::process::exit(1);
    }
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Re-produce the letters of `<topic>.dlq` to `<topic>`.
    Replay {
        /// The source topic (without the configured prefix).
        #[arg(long)]
        topic: String,
        /// Only letters dead-lettered at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Give up when the replay consumer gets no partition within this many seconds.
        #[arg(long, default_value_t = 30)]
        join_timeout_seconds: u64,
    },
}

/// Errors only (unless RUST_LOG says otherwise), on stderr: the tools print their own report.
fn quiet_logs() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => {
            quiet_logs();
            return bench(args).await;
        }
        Command::Demo(args) => {
            quiet_logs();
            return demo(args).await;
        }
        _ => {}
    }
    let settings = match Settings::load(cli.config.as_deref(), std::env::vars()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("bos: {e}");
            std::process::exit(2);
        }
    };
    if let Command::Config = cli.command {
        println!("{}", serde_json::to_string_pretty(&settings.masked())?);
        return Ok(());
    }
    let _telemetry = bos::telemetry::init(settings.log_json)?;
    let rules = settings.rules();
    match cli.command {
        Command::Config | Command::Demo(_) | Command::Bench(_) => Ok(()),
        Command::Run => {
            app::run(
                settings,
                rules.clone(),
                Role::Worker,
                app::shutdown_on_signals(),
            )
            .await
        }
        Command::Relay => {
            app::run(
                settings,
                rules.clone(),
                Role::RelayOnly,
                app::shutdown_on_signals(),
            )
            .await
        }
        Command::Migrate => {
            app::open_store(&settings).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    topic,
                    since,
                    join_timeout_seconds,
                },
        } => {
            let since = since
                .map(|s| bos::contracts::time::parse(&s))
                .transpose()
                .map_err(anyhow::Error::msg)
                .context("--since")?;
            let producer = bos::outbox::idempotent_producer(&settings.kafka)?;
            let done = bos::dlq::replay(
                &settings.kafka,
                &producer,
                &topic,
                since,
                Duration::from_secs(join_timeout_seconds),
            )
            .await?;
            println!(
                "replayed {} letter(s), skipped {}",
                done.replayed, done.skipped
            );
            Ok(())
        }
    }
}
