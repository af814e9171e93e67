//! The application: one builder for `bos run`, `bos relay`, the demo, the
//! bench and the integration tests, so each of them runs the production
//! wiring. Its tasks are supervised: the first one that ends or panics stops
//! the others and the application returns an error; after a shutdown signal
//! every task gets `consumer.drain_timeout` to finish its in-flight work.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use crate::apply::Applier;
use crate::config::{Settings, StoreKind};
use crate::consumer::{self, Consumer};
use crate::credits::{self, CreditPolicy};
use crate::domain::Rules;
use crate::health::Health;
use crate::http::{self, AppState, KafkaProbe};
use crate::kafka::{self, Assignment, ProducerHandle};
use crate::metrics::Metrics;
use crate::outbox::{BothWake, Housekeeping, NotifyWake, PgWake, Relay, Wake};
use crate::store::{MemoryRepository, PgRepository, Repository};

/// What runs: consumer + relay + HTTP (`bos run`) or the relay alone (`bos relay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Worker,
    RelayOnly,
}

/// The configured store, migrated.
pub async fn open_store(
    settings: &Settings,
    metrics: Option<Arc<Metrics>>,
) -> anyhow::Result<(Arc<dyn Repository>, Option<sqlx::PgPool>)> {
    match settings.store.kind {
        StoreKind::Memory => Ok((Arc::new(MemoryRepository::new()), None)),
        StoreKind::Postgres => {
            let mut repo = PgRepository::connect(&settings.database).await?;
            if let Some(m) = metrics {
                repo = repo.with_metrics(m);
            }
            repo.migrate()
                .await
                .context("applying the database migrations")?;
            let pool = repo.pool().clone();
            Ok((Arc::new(repo), Some(pool)))
        }
    }
}

/// Parts a caller may supply instead of the configured ones.
#[derive(Default)]
pub struct Builder {
    settings: Option<Settings>,
    repo: Option<(Arc<dyn Repository>, Option<sqlx::PgPool>)>,
    credits: Option<Arc<dyn CreditPolicy>>,
    listener: Option<TcpListener>,
}

impl Builder {
    /// Use this repository (a test's decorator, the demo's in-memory store)
    /// with its pool for relay wake-ups, if it has one.
    pub fn repository(mut self, repo: Arc<dyn Repository>, pool: Option<sqlx::PgPool>) -> Self {
        self.repo = Some((repo, pool));
        self
    }

    pub fn credit_policy(mut self, credits: Arc<dyn CreditPolicy>) -> Self {
        self.credits = Some(credits);
        self
    }

    /// Serve HTTP on this listener instead of binding `http.addr`.
    pub fn listener(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    pub async fn build(self, role: Role) -> anyhow::Result<Application> {
        let settings = self.settings.context("the builder needs settings")?;
        settings.validate()?;
        let metrics = Arc::new(Metrics::new());
        let (repo, pool) = match self.repo {
            Some(r) => r,
            None => open_store(&settings, Some(metrics.clone())).await?,
        };
        let health = Arc::new(Health::new(
            settings.consumer.stall_timeout,
            role == Role::Worker,
        ));
        let producer = Arc::new(
            ProducerHandle::new(&settings.kafka, metrics.clone())
                .context("creating the Kafka producer")?,
        );
        let credits = self
            .credits
            .unwrap_or_else(|| credits::policy(&settings.credits, metrics.clone()));
        let rules = Rules::new(settings.graph()?);
        let consumer = match role {
            Role::Worker => Some(
                consumer::subscribe(&settings.kafka, metrics.clone())
                    .context("creating the Kafka consumer")?,
            ),
            Role::RelayOnly => None,
        };
        let listener = match self.listener {
            Some(l) => l,
            None => TcpListener::bind(&settings.http.addr)
                .await
                .with_context(|| format!("binding the HTTP address {}", settings.http.addr))?,
        };
        Ok(Application {
            settings,
            role,
            repo,
            pool,
            metrics,
            health,
            producer,
            credits,
            rules,
            consumer,
            listener,
            outbox_written: Arc::new(Notify::new()),
        })
    }
}

type ConsumerParts = (
    Arc<rdkafka::consumer::StreamConsumer<kafka::ConsumerEvents>>,
    mpsc::UnboundedReceiver<Assignment>,
);

/// A built application, ready to run.
pub struct Application {
    settings: Settings,
    role: Role,
    repo: Arc<dyn Repository>,
    pool: Option<sqlx::PgPool>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    producer: Arc<ProducerHandle>,
    credits: Arc<dyn CreditPolicy>,
    rules: Rules,
    consumer: Option<ConsumerParts>,
    listener: TcpListener,
    outbox_written: Arc<Notify>,
}

impl Application {
    pub fn builder(settings: Settings) -> Builder {
        Builder {
            settings: Some(settings),
            ..Builder::default()
        }
    }

    /// Builds with the configured store and credit policy, binding `http.addr`.
    pub async fn build(settings: Settings, role: Role) -> anyhow::Result<Self> {
        Self::builder(settings).build(role).await
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map_or(0, |a| a.port())
    }

    pub fn repo(&self) -> Arc<dyn Repository> {
        self.repo.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    pub fn applier(&self) -> Applier {
        Applier {
            repo: self.repo.clone(),
            rules: self.rules.clone(),
            credits: self.credits.clone(),
            max_conflict_retries: self.settings.consumer.max_conflict_retries,
            metrics: self.metrics.clone(),
        }
    }

    fn state(&self) -> AppState {
        AppState {
            repo: self.repo.clone(),
            rules: self.rules.clone(),
            credits: self.credits.clone(),
            applier: self.applier(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            kafka: self.producer.clone() as Arc<dyn KafkaProbe>,
            service_name: self.settings.service_name.clone(),
            environment: self.settings.environment.clone(),
        }
    }

    async fn wake(&self) -> anyhow::Result<Box<dyn Wake>> {
        let local: Box<dyn Wake> = Box::new(NotifyWake(self.outbox_written.clone()));
        Ok(match &self.pool {
            Some(pool) => Box::new(BothWake(
                Box::new(PgWake::listen(pool).await.context("LISTEN bos_outbox")?),
                local,
            )),
            None => local,
        })
    }

    /// Runs until `shutdown` turns true or a task ends on its own.
    pub async fn run_until_stopped(
        self,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop) = watch::channel(false);
        let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
        let state = self.state();
        let relay = Relay::new(
            self.repo.clone(),
            self.producer.clone(),
            self.settings.kafka.clone(),
            self.settings.relay.clone(),
            self.metrics.clone(),
            self.health.clone(),
        );
        let wake = self.wake().await?;
        let stopped = stop.clone();
        tasks.spawn(async move { ("relay", relay.run(wake, stopped).await) });
        let housekeeping = Housekeeping {
            repo: self.repo.clone(),
            settings: self.settings.relay.clone(),
            metrics: self.metrics.clone(),
        };
        let stopped = stop.clone();
        tasks.spawn(async move { ("housekeeping", housekeeping.run(stopped).await) });
        let consumes = self.role == Role::Worker;
        let kafka_settings = self.settings.kafka.clone();
        let health = self.health.clone();
        let metrics = self.metrics.clone();
        let mut stopped = stop.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(kafka_settings.topic_check_interval);
            loop {
                tokio::select! {
                    _ = crate::signal::stopped(&mut stopped) => return ("topic check", Ok(())),
                    _ = tick.tick() => {
                        tokio::select! {
                            () = crate::signal::stopped(&mut stopped) => return ("topic check", Ok(())),
                            () = kafka::check_topics(&kafka_settings, consumes, &health) => {}
                        }
                        let missing = health.missing_topics().len();
                        metrics.missing_topics.set(i64::try_from(missing).unwrap_or(i64::MAX));
                        let ready = health.checks().iter().all(|c| c.ok);
                        metrics.ready.set(i64::from(ready));
                    }
                }
            }
        });
        if let Some((consumer, assignments)) = self.consumer {
            let worker = Consumer::new(
                consumer,
                assignments,
                state.applier.clone(),
                self.settings.kafka.clone(),
                self.settings.consumer.clone(),
                self.health.clone(),
                self.outbox_written.clone(),
            );
            let stopped = stop.clone();
            tasks.spawn(async move { ("consumer", worker.run(stopped).await) });
        }
        let router = match self.role {
            Role::Worker => http::router(state),
            Role::RelayOnly => http::operations_router(state),
        };
        let listener = self.listener;
        tracing::info!(addr = ?listener.local_addr().ok(), role = ?self.role, "bos started");
        let mut stopped = stop.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = crate::signal::stopped(&mut stopped).await;
                })
                .await
                .context("the HTTP server failed");
            ("http", served)
        });
        // The first task to end, or the shutdown signal.
        let mut first_name: Result<(&'static str, ()), ()> = Err(());
        let failure: Option<anyhow::Error> = tokio::select! {
            _ = crate::signal::stopped(&mut shutdown) => None,
            Some(first) = tasks.join_next() => Some(match first {
                Ok((name, Ok(()))) => {
                    first_name = Ok((name, ()));
                    anyhow::anyhow!("the {name} task ended unexpectedly")
                }
                Ok((name, Err(e))) => {
                    first_name = Ok((name, ()));
                    e.context(format!("the {name} task failed"))
                }
                Err(e) => anyhow::anyhow!("a task panicked: {e}"),
            }),
        };
        if let Some(e) = &failure {
            tracing::error!(error = %format!("{e:#}"), "stopping every task");
        } else {
            tracing::info!("shutting down: finishing in-flight work");
        }
        let _ = stop_tx.send(true);
        let deadline = self.settings.consumer.drain_timeout;
        let mut running: std::collections::BTreeSet<&'static str> =
            ["relay", "housekeeping", "topic check", "http"].into();
        if consumes {
            running.insert("consumer");
        }
        if let Ok((name, _)) = &first_name {
            running.remove(name);
        }
        let drained = tokio::time::timeout(deadline, async {
            let mut failed = None;
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((name, Ok(()))) => {
                        running.remove(name);
                    }
                    Ok((name, Err(e))) => {
                        running.remove(name);
                        failed = failed.or(Some(e.context(format!("the {name} task failed"))));
                    }
                    Err(e) => failed = failed.or(Some(anyhow::anyhow!("a task panicked: {e}"))),
                }
            }
            failed
        })
        .await;
        self.producer.flush(Duration::from_secs(5));
        match (failure, drained) {
            (Some(e), _) => Err(e),
            (None, Err(_)) => {
                tasks.abort_all();
                Err(anyhow::anyhow!(
                    "in-flight work did not finish within {deadline:?} (still running: {}); unfinished records are redelivered",
                    running.iter().copied().collect::<Vec<_>>().join(", ")
                ))
            }
            (None, Ok(Some(e))) => Err(e),
            (None, Ok(None)) => {
                tracing::info!("drain complete: every task finished its in-flight work");
                Ok(())
            }
        }
    }
}

/// A receiver that turns true on SIGTERM or SIGINT.
/// The SIGTERM handler is installed before this returns, so a stop that comes
/// during start-up is a graceful one too.
pub fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    #[cfg(unix)]
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match terminate {
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
            () = term => {}
        }
        let _ = tx.send(true);
    });
    rx
}
