//! The `bos` binary: a thin shell over the library.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bos", version, about = "Batch Orchestrator Service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database migrations and exit.
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Migrate { database_url } => {
            use bos::store::Repository;
            let repo =
                bos::store::PgRepository::connect(&bos::store::PostgresSettings::new(database_url))
                    .await?;
            repo.migrate().await?;
            tracing::info!("migrations applied");
        }
    }
    Ok(())
}
