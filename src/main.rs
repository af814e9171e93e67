//! The `bos` binary: a thin shell over the library.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use bos::app::{Application, Role};
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
    Run {
        /// Run beside the live service: its own consumer group (`<group>-shadow`),
        /// the live topics consumed (registrations included), everything
        /// published under `--shadow-prefix`. Give it a database of its own.
        #[arg(long)]
        shadow: bool,
        #[arg(long, default_value = "shadow.")]
        shadow_prefix: String,
    },
    /// Run only the outbox relay (with /healthz, /readyz and /metrics).
    Relay,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration (secrets masked) and where each value came from.
    Config,
    /// Run the whole system in-process (embedded Kafka, in-memory store unless
    /// asked otherwise) against simulated upstream services, then print a summary.
    Demo(DemoArgs),
    /// Measure throughput, hop latency, memory, the relay and the idle cost
    /// against PostgreSQL (a scratch database) and the embedded Kafka, next to
    /// the least SQL that writes the same rows; prints one JSON line.
    Bench(BenchArgs),
    /// One batch: state, runs, phases, essays and outbox rows.
    Batch {
        #[command(subcommand)]
        command: BatchCommand,
    },
    /// The outbox: backlog, oldest row, rows that keep failing.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Dead-letter topics.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Import the original service's batches (with their run in progress and
    /// unpublished outbox rows) into bos's database; never writes the source.
    ImportLegacy {
        /// The original service's database URL.
        #[arg(long)]
        from: String,
        /// Report what would be imported; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only these batches (repeatable); all when absent.
        #[arg(long = "batch")]
        batches: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Compare what a shadow run published with what the live service
    /// published: phases, their essays, denials, completions. Exits 1 on a difference.
    ShadowReport {
        #[arg(long, default_value = "shadow.")]
        shadow_prefix: String,
        /// Read at most this many messages per side.
        #[arg(long, default_value_t = 1_000_000)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BatchCommand {
    /// Show one batch.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Backlog and stuck rows.
    Status {
        #[arg(long)]
        json: bool,
        /// How many of the worst rows to list.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List the letters of `<topic>.dlq` with their `dlq.*` headers.
    List {
        /// The source topic (without the configured prefix).
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
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

#[derive(Clone, Copy, ValueEnum)]
enum DemoStore {
    Memory,
    Postgres,
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
    /// Where batches are kept.
    #[arg(long, value_enum, default_value_t = DemoStore::Memory)]
    store: DemoStore,
    /// The PostgreSQL URL for `--store postgres` (implies it).
    #[arg(long)]
    database_url: Option<String>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// A PostgreSQL server (default: DATABASE_URL); a scratch database is created and dropped.
    #[arg(long)]
    database_url: Option<String>,
    /// Events of the throughput test.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Partitions of every topic: the worker applies this many polls at once.
    /// (The mock cluster keeps 5 MB per partition: events × 1.3 kB / partitions must stay below.)
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Rates (events/s) of the latency tests.
    #[arg(long, value_delimiter = ',', default_value = "1000,100")]
    rates: Vec<u64>,
    /// Length of each latency test.
    #[arg(long, default_value_t = 10)]
    latency_seconds: u64,
    /// Events per connection count of the ceiling.
    #[arg(long, default_value_t = 20_000)]
    ceiling_events: usize,
    /// Events per transaction of the ceiling.
    #[arg(long, default_value_t = 100)]
    per_commit: usize,
    #[arg(long, default_value_t = 20_000)]
    relay_rows: usize,
    /// Length of the idle measurement.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// A directory for the plots (latency-cdf.svg, throughput.svg).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
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

async fn demo(args: DemoArgs, settings: Option<&Settings>) -> anyhow::Result<bool> {
    let database_url = match (args.store, args.database_url) {
        (_, Some(url)) => Some(url),
        (DemoStore::Postgres, None) => {
            let url = settings
                .map(|s| s.database.url.expose().to_owned())
                .filter(|u| !u.is_empty())
                .context("--store postgres needs --database-url or DATABASE_URL")?;
            Some(url)
        }
        (DemoStore::Memory, None) => None,
    };
    let options = bos::sim::demo::DemoOptions {
        batches: args.batches,
        essays_min: args.essays.0,
        essays_max: args.essays.1,
        failure_rate: args.failure_rate,
        phase_failure_rate: args.phase_failure_rate.unwrap_or(args.failure_rate / 5.0),
        duplicate_rate: args.duplicate_rate,
        seed: args.seed,
        max_delay: Duration::from_millis(args.max_delay_ms),
        timeout: Duration::from_secs(args.timeout_seconds),
        database_url,
    };
    let store = if options.database_url.is_some() {
        "PostgreSQL"
    } else {
        "in-memory store"
    };
    eprintln!(
        "bos demo: {} batches, embedded Kafka, {store}, seed {}",
        options.batches, options.seed
    );
    let summary = bos::sim::demo::run(options).await?;
    println!("\n{}", summary.render());
    for problem in summary.problems.iter().take(20) {
        eprintln!("inconsistent: {problem}");
    }
    Ok(summary.problems.is_empty())
}

async fn bench(args: BenchArgs, settings: Option<&Settings>) -> anyhow::Result<bool> {
    let database_url = args
        .database_url
        .or_else(|| settings.map(|s| s.database.url.expose().to_owned()))
        .filter(|u| !u.is_empty())
        .context("the bench needs PostgreSQL: --database-url or DATABASE_URL")?;
    let options = bos::sim::bench::BenchOptions {
        database_url,
        executable: std::env::current_exe().context("locating the bos executable")?,
        events: args.events,
        partitions: args.partitions,
        rates: args.rates,
        latency_seconds: args.latency_seconds,
        ceiling_events: args.ceiling_events,
        per_commit: args.per_commit,
        relay_rows: args.relay_rows,
        idle_seconds: args.idle_seconds,
        out: args.out,
    };
    let report = bos::sim::bench::run(options).await?;
    eprint!("{}", report.table());
    println!("{}", serde_json::to_string(&report)?);
    Ok(true)
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

async fn store(settings: &Settings) -> anyhow::Result<std::sync::Arc<dyn bos::store::Repository>> {
    Ok(bos::app::open_store(settings, None).await?.0)
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    if let Command::Demo(args) = cli.command {
        quiet_logs();
        // The demo needs no configuration; a DATABASE_URL is used only with --store postgres.
        let settings = Settings::load(cli.config.as_deref(), std::env::vars()).ok();
        return demo(args, settings.as_ref()).await;
    }
    if let Command::Bench(args) = cli.command {
        quiet_logs();
        let settings = Settings::load(cli.config.as_deref(), std::env::vars()).ok();
        return bench(args, settings.as_ref()).await;
    }
    let loaded = Settings::load_with_sources(cli.config.as_deref(), std::env::vars())?;
    let settings = loaded.settings;
    match cli.command {
        Command::Demo(_) | Command::Bench(_) => Ok(true),
        Command::Config => {
            let shown =
                serde_json::json!({"settings": settings.masked(), "sources": loaded.sources});
            println!("{}", serde_json::to_string_pretty(&shown)?);
            Ok(true)
        }
        Command::Batch {
            command: BatchCommand::Show { id, json },
        } => {
            quiet_logs();
            let repo = store(&settings).await?;
            let Some(shown) = bos::ops::batch_show(repo.as_ref(), &id).await? else {
                anyhow::bail!("no batch `{id}`");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                print!("{}", bos::ops::batch_table(&shown));
            }
            Ok(true)
        }
        Command::Outbox {
            command: OutboxCommand::Status { json, limit },
        } => {
            quiet_logs();
            let repo = store(&settings).await?;
            let status = bos::ops::outbox_status(repo.as_ref(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", bos::ops::outbox_table(&status));
            }
            Ok(true)
        }
        Command::Dlq {
            command: DlqCommand::List { topic, limit, json },
        } => {
            quiet_logs();
            let letters = bos::ops::dlq::list(&settings.kafka, &topic, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                println!("{} letter(s) on {topic}.dlq", letters.len());
                for l in &letters {
                    println!(
                        "  [{}]@{} key {} reason {} — {} (from {}[{}]@{} at {})",
                        l.partition,
                        l.offset,
                        l.key.as_deref().unwrap_or("-"),
                        l.headers.get("dlq.reason").map_or("?", String::as_str),
                        l.headers.get("dlq.error").map_or("?", String::as_str),
                        l.headers
                            .get("dlq.source.topic")
                            .map_or("?", String::as_str),
                        l.headers
                            .get("dlq.source.partition")
                            .map_or("?", String::as_str),
                        l.headers
                            .get("dlq.source.offset")
                            .map_or("?", String::as_str),
                        l.headers.get("dlq.failed_at").map_or("?", String::as_str),
                    );
                }
            }
            Ok(true)
        }
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    topic,
                    since,
                    join_timeout_seconds,
                },
        } => {
            quiet_logs();
            let since = since
                .map(|s| bos::contracts::time::parse(&s))
                .transpose()
                .map_err(anyhow::Error::msg)
                .context("--since")?;
            let producer: rdkafka::producer::FutureProducer =
                bos::kafka::producer_config(&settings.kafka).create()?;
            let done = bos::ops::dlq::replay(
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
            Ok(true)
        }
        Command::ImportLegacy {
            from,
            dry_run,
            batches,
            json,
        } => {
            quiet_logs();
            let source = bos::legacy::import::Source::connect(&from).await?;
            let (legacy, unattached) = source.read(&batches).await?;
            let repo = store(&settings).await?;
            let report =
                bos::legacy::import::import(repo.as_ref(), &legacy, &unattached, dry_run).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(true)
        }
        Command::ShadowReport {
            shadow_prefix,
            limit,
            json,
        } => {
            quiet_logs();
            let report =
                bos::legacy::shadow::report(&settings.kafka, &shadow_prefix, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(report.differences.is_empty())
        }
        Command::Run { .. } | Command::Relay | Command::Migrate => {
            // First the stop signal: a SIGTERM during start-up stops bos cleanly.
            let mut shutdown = bos::app::shutdown_on_signals();
            let _telemetry =
                bos::telemetry::init(&settings.log, &settings.telemetry.otlp_endpoint)?;
            let (settings, role) = match cli.command {
                Command::Migrate => {
                    bos::app::open_store(&settings, None).await?;
                    tracing::info!("migrations applied");
                    return Ok(true);
                }
                Command::Relay => (settings, Role::RelayOnly),
                Command::Run {
                    shadow: true,
                    shadow_prefix,
                } => {
                    let mut settings = settings;
                    settings.kafka = settings.kafka.shadow(&shadow_prefix);
                    tracing::info!(
                        group = %settings.kafka.group_id,
                        publish_prefix = ?settings.kafka.publish_prefix,
                        "shadow run: consuming the live topics, publishing beside them"
                    );
                    (settings, Role::Worker)
                }
                _ => (settings, Role::Worker),
            };
            let app = tokio::select! {
                app = Application::build(settings, role) => app?,
                () = bos::signal::stopped(&mut shutdown) => {
                    tracing::info!("stopped during start-up");
                    return Ok(true);
                }
            };
            app.run_until_stopped(shutdown).await?;
            Ok(true)
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            // One line a person can act on; the whole chain with a backtrace on request.
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
                eprintln!("bos: {e:?}");
            } else {
                eprintln!("bos: {e:#}");
            }
            std::process::exit(1);
        }
    }
}
