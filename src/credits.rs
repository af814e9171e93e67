//! Credit policies: the rules ask ([`CreditQuery`]), a policy answers. Two for
//! development (allow everything, a fixed balance) and one that asks the
//! platform's entitlements service, with a timeout, a circuit breaker, and a
//! configured answer for when the service cannot be reached.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::config::{CreditPolicyKind, CreditSettings, EntitlementsSettings, OnUnavailable};
use crate::domain::{denial, CreditQuery, CreditVerdict};
use crate::metrics::Metrics;

/// Answers credit questions. Implementations may do I/O; the rules never call them.
#[async_trait]
pub trait CreditPolicy: Send + Sync + std::fmt::Debug {
    async fn check(&self, query: &CreditQuery, correlation_id: uuid::Uuid) -> CreditVerdict;
}

/// Allows everything (development); reports the required amount as available.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

#[async_trait]
impl CreditPolicy for AllowAll {
    async fn check(&self, query: &CreditQuery, _: uuid::Uuid) -> CreditVerdict {
        CreditVerdict::Allowed {
            available: query.required(),
        }
    }
}

/// Every organisation has the same fixed balance (tests and the demo).
#[derive(Debug, Clone, Copy)]
pub struct FixedBalance(pub i64);

#[async_trait]
impl CreditPolicy for FixedBalance {
    async fn check(&self, query: &CreditQuery, _: uuid::Uuid) -> CreditVerdict {
        if query.required() <= self.0 {
            CreditVerdict::Allowed { available: self.0 }
        } else {
            CreditVerdict::Denied {
                reason: denial::INSUFFICIENT_CREDITS.to_owned(),
                available: self.0,
            }
        }
    }
}

/// The policy `settings` name.
pub fn policy(settings: &CreditSettings, metrics: Arc<Metrics>) -> Arc<dyn CreditPolicy> {
    match settings.policy {
        CreditPolicyKind::AllowAll => Arc::new(AllowAll),
        CreditPolicyKind::FixedBalance => Arc::new(FixedBalance(settings.balance)),
        CreditPolicyKind::Entitlements => {
            Arc::new(Entitlements::new(settings.entitlements.clone(), metrics))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial call is out.
    HalfOpen,
}

/// The platform's entitlements service (`POST /v1/entitlements/check-credits/bulk`).
#[derive(Debug)]
pub struct Entitlements {
    settings: EntitlementsSettings,
    client: reqwest::Client,
    circuit: Mutex<Circuit>,
    metrics: Arc<Metrics>,
}

/// Why the service gave no usable answer.
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    #[error("circuit open after repeated failures")]
    CircuitOpen,
    #[error("request failed: {0}")]
    Transport(String),
    #[error("answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("answer is not the expected JSON: {0}")]
    Body(String),
}

impl Entitlements {
    pub fn new(settings: EntitlementsSettings, metrics: Arc<Metrics>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
            .build()
            .unwrap_or_default();
        Self {
            settings,
            client,
            circuit: Mutex::new(Circuit::Closed { failures: 0 }),
            metrics,
        }
    }

    fn circuit(&self) -> std::sync::MutexGuard<'_, Circuit> {
        self.circuit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a call may go out now.
    fn admit(&self) -> bool {
        let mut circuit = self.circuit();
        match *circuit {
            Circuit::Closed { .. } => true,
            Circuit::Open { until } if Instant::now() >= until => {
                *circuit = Circuit::HalfOpen;
                true
            }
            Circuit::Open { .. } | Circuit::HalfOpen => false,
        }
    }

    fn record(&self, ok: bool) {
        let mut circuit = self.circuit();
        *circuit = match (*circuit, ok) {
            (_, true) => Circuit::Closed { failures: 0 },
            (Circuit::Closed { failures }, false)
                if failures + 1 < self.settings.failure_threshold =>
            {
                Circuit::Closed {
                    failures: failures + 1,
                }
            }
            (_, false) => {
                tracing::warn!(
                    recovery = ?self.settings.recovery_timeout,
                    "entitlements circuit open: credit checks fail at once until a trial call succeeds"
                );
                Circuit::Open {
                    until: Instant::now() + self.settings.recovery_timeout,
                }
            }
        };
    }

    async fn call(
        &self,
        query: &CreditQuery,
        correlation_id: uuid::Uuid,
    ) -> Result<CreditVerdict, Unavailable> {
        if !self.admit() {
            return Err(Unavailable::CircuitOpen);
        }
        let url = format!(
            "{}/v1/entitlements/check-credits/bulk",
            self.settings.base_url.trim_end_matches('/')
        );
        let body = json!({
            "user_id": query.user_id,
            "org_id": query.org_id,
            "requirements": query.requirements,
            "correlation_id": correlation_id.to_string(),
        });
        let response = self
            .client
            .post(&url)
            .header("Content-Type", "application/json")
            .header("X-Correlation-ID", correlation_id.to_string())
            .body(body.to_string())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                self.record(false);
                return Err(Unavailable::Transport(e.to_string()));
            }
        };
        let status = response.status().as_u16();
        let text = match response.text().await {
            Ok(t) => t,
            Err(e) => {
                self.record(false);
                return Err(Unavailable::Transport(e.to_string()));
            }
        };
        // Only transport failures and server errors count against the circuit.
        self.record(status < 500);
        if !matches!(status, 200 | 402 | 429) {
            return Err(Unavailable::Status {
                status,
                body: text.chars().take(200).collect(),
            });
        }
        let answer: Value =
            serde_json::from_str(&text).map_err(|e| Unavailable::Body(e.to_string()))?;
        let allowed = answer["allowed"]
            .as_bool()
            .ok_or_else(|| Unavailable::Body("no `allowed`".to_owned()))?;
        let available = answer["available_credits"].as_i64().unwrap_or(0);
        Ok(if allowed {
            CreditVerdict::Allowed { available }
        } else {
            let reason = answer["denial_reason"]
                .as_str()
                .filter(|r| !r.is_empty())
                .unwrap_or(if status == 429 {
                    denial::RATE_LIMIT_EXCEEDED
                } else {
                    denial::INSUFFICIENT_CREDITS
                });
            CreditVerdict::Denied {
                reason: reason.to_owned(),
                available,
            }
        })
    }
}

#[async_trait]
impl CreditPolicy for Entitlements {
    async fn check(&self, query: &CreditQuery, correlation_id: uuid::Uuid) -> CreditVerdict {
        match self.call(query, correlation_id).await {
            Ok(verdict) => {
                let label = if matches!(verdict, CreditVerdict::Allowed { .. }) {
                    "allowed"
                } else {
                    "denied"
                };
                self.metrics.credit_checks.with_label_values(&[label]).inc();
                verdict
            }
            Err(e) => {
                self.metrics
                    .credit_checks
                    .with_label_values(&["unavailable"])
                    .inc();
                tracing::warn!(error = %e, on_unavailable = ?self.settings.on_unavailable, "entitlements service unavailable");
                match self.settings.on_unavailable {
                    OnUnavailable::Deny => CreditVerdict::Denied {
                        reason: denial::ENTITLEMENTS_UNAVAILABLE.to_owned(),
                        available: 0,
                    },
                    OnUnavailable::Allow => CreditVerdict::Allowed { available: 0 },
                }
            }
        }
    }
}
