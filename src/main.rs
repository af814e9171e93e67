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
    /// Dead-letter topics.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
        Command::Config => Ok(()),
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
