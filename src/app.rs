//! Wiring of `bos run` and `bos relay`: store, consumer, relay and HTTP, until shutdown.

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::{watch, Notify};

use crate::config::{Settings, StoreKind};
use crate::consumer::{self, Handler, Worker};
use crate::domain::Rules;
use crate::http::{self, AppState, ProducerProbe};
use crate::metrics::Metrics;
use crate::outbox::{idempotent_producer, NotifyWake, PgWake, Relay, Wake};
use crate::store::{MemoryRepository, PgRepository, Repository};

/// The configured store, migrated.
pub async fn open_store(
    settings: &Settings,
) -> anyhow::Result<(Arc<dyn Repository>, Option<sqlx::PgPool>)> {
    match settings.store {
        StoreKind::Memory => Ok((Arc::new(MemoryRepository::new()), None)),
        StoreKind::Postgres => {
            let repo = PgRepository::connect(&settings.postgres)
                .await
                .context("connecting to PostgreSQL (DATABASE_URL)")?;
            repo.migrate().await.context("applying migrations")?;
            let pool = repo.pool().clone();
            Ok((Arc::new(repo), Some(pool)))
        }
    }
}

async fn wake(pool: &Option<sqlx::PgPool>, notify: Arc<Notify>) -> anyhow::Result<Box<dyn Wake>> {
    Ok(match pool {
        Some(pool) => Box::new(PgWake::listen(pool).await.context("LISTEN bos_outbox")?),
        None => Box::new(NotifyWake(notify)),
    })
}

/// What runs: consumer + relay + HTTP (`bos run`) or the relay alone (`bos relay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Worker,
    RelayOnly,
}

/// Runs until `shutdown` turns true; in-flight work finishes first.
pub async fn run(
    settings: Settings,
    rules: Rules,
    role: Role,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (repo, pool) = open_store(&settings).await?;
    let metrics = Arc::new(Metrics::new());
    let notify = Arc::new(Notify::new());
    let producer = idempotent_producer(&settings.kafka).context("creating the Kafka producer")?;
    let relay = Relay::new(
        repo.clone(),
        producer.clone(),
        settings.kafka.clone(),
        settings.relay.clone(),
        metrics.clone(),
    );
    let mut tasks = vec![tokio::spawn(
        relay.run(wake(&pool, notify.clone()).await?, shutdown.clone()),
    )];
    if role == Role::Worker {
        let worker = Worker {
            consumer: Arc::new(
                consumer::consumer(&settings.kafka).context("creating the Kafka consumer")?,
            ),
            dlq: producer.clone(),
            handler: Handler::new(
                repo.clone(),
                rules.clone(),
                settings.consumer.max_conflict_retries,
                metrics.clone(),
            ),
            kafka: settings.kafka.clone(),
            settings: settings.consumer.clone(),
            outbox_written: notify,
            metrics: metrics.clone(),
        };
        tasks.push(tokio::spawn(worker.run(shutdown.clone())));
        let state = AppState {
            repo,
            rules,
            metrics,
            kafka: Arc::new(ProducerProbe(producer)),
        };
        let listener = tokio::net::TcpListener::bind(&settings.http_addr)
            .await
            .with_context(|| format!("binding BOS_HTTP_ADDR {}", settings.http_addr))?;
        tracing::info!(addr = %listener.local_addr()?, "HTTP listening");
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let server =
                axum::serve(listener, http::router(state)).with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                });
            if let Err(e) = server.await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }));
    }
    // Once shutdown is asked for, in-flight work gets a bounded time to finish.
    let mut asked = shutdown.clone();
    let all = futures::future::join_all(tasks);
    tokio::pin!(all);
    tokio::select! {
        results = &mut all => return finished(results),
        _ = asked.wait_for(|s| *s) => {}
    }
    match tokio::time::timeout(SHUTDOWN_DEADLINE, all).await {
        Ok(results) => finished(results),
        Err(_) => {
            tracing::warn!(?SHUTDOWN_DEADLINE, "in-flight work did not finish in time; exiting (unfinished records are redelivered)");
            Ok(())
        }
    }
}

/// How long `bos run` waits for in-flight work after SIGTERM/SIGINT.
pub const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

fn finished(results: Vec<Result<(), tokio::task::JoinError>>) -> anyhow::Result<()> {
    for result in results {
        result.context("a worker task panicked")?;
    }
    Ok(())
}

/// A receiver that turns true on SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutting down: finishing in-flight work");
        let _ = tx.send(true);
    });
    rx
}
