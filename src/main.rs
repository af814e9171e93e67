//! The `bos` binary: a thin shell over the library.

use clap::{Parser, Subcommand};

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
    Run,
    /// Run only the outbox relay (with health, readiness and metrics over HTTP).
    Relay,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration (secrets masked) and where each value came from.
    Config,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let loaded = Settings::load_with_sources(cli.config.as_deref(), std::env::vars())?;
    let settings = loaded.settings;
    if let Command::Config = cli.command {
        let shown = serde_json::json!({"settings": settings.masked(), "sources": loaded.sources});
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    let _telemetry = bos::telemetry::init(&settings.log, &settings.telemetry.otlp_endpoint)?;
    match cli.command {
        Command::Config => Ok(()),
        Command::Run => {
            Application::build(settings, Role::Worker)
                .await?
                .run_until_stopped(bos::app::shutdown_on_signals())
                .await
        }
        Command::Relay => {
            Application::build(settings, Role::RelayOnly)
                .await?
                .run_until_stopped(bos::app::shutdown_on_signals())
                .await
        }
        Command::Migrate => {
            bos::app::open_store(&settings, None).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        // One line a person can act on; the whole chain with a backtrace on request.
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            eprintln!("bos: {e:?}");
        } else {
            eprintln!("bos: {e:#}");
        }
        std::process::exit(1);
    }
}
