//! Applying records: decode, load the batches (one read), look up the inbox
//! (one read), decide ([`plan`], pure), commit (one transaction), and decide
//! again whatever lost a race. Used by the consumer for Kafka records and by
//! the HTTP retry endpoint, so both take the same transaction path.
//!
//! Errors are classified: transient ones (the database unreachable, a
//! deadlock) are returned for the caller to retry with backoff; anything the
//! database refuses for good is narrowed down to the record that causes it
//! (by halving the list), which becomes an `apply_error` dead letter, and the
//! other records apply.

pub mod plan;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use uuid::Uuid;

pub use plan::{letter, prepare, Item, Plan, Planned, Prepared, Record, Verdict};

use crate::credits::CreditPolicy;
use crate::domain::{CreditAnswers, Env, RandomIds, Rules};
use crate::metrics::Metrics;
use crate::store::{CommitError, ErrorClass, Repository, StoreError};

/// Why records could not be applied now (retry them later).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("transient store failure: {0}")]
    Transient(StoreError),
    #[error("batches kept changing underneath for {0} rounds without progress")]
    Contended(usize),
}

impl ApplyError {
    pub fn class(&self) -> &'static str {
        match self {
            ApplyError::Transient(_) => "transient",
            ApplyError::Contended(_) => "contended",
        }
    }
}

/// A record's outcome, with what the HTTP surface wants to know of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub denied: Option<String>,
}

pub const APPLY_ERROR: &str = "apply_error";

/// Applies records to the store through the rules.
#[derive(Debug, Clone)]
pub struct Applier {
    pub repo: Arc<dyn Repository>,
    pub rules: Rules,
    pub credits: Arc<dyn CreditPolicy>,
    pub max_conflict_retries: usize,
    pub metrics: Arc<Metrics>,
}

impl Applier {
    /// Applies `records` in order; every record gets an outcome unless the
    /// error is worth retrying.
    pub async fn apply(&self, prepared: &[Prepared]) -> Result<Vec<Outcome>, ApplyError> {
        let all: Vec<usize> = (0..prepared.len()).collect();
        let mut outcomes = self.apply_slice(prepared, &all).await?;
        Ok((0..prepared.len())
            .map(|i| {
                outcomes.remove(&i).unwrap_or(Outcome {
                    verdict: Verdict::DeadLetter {
                        reason: APPLY_ERROR,
                        error: "no outcome".to_owned(),
                    },
                    denied: None,
                })
            })
            .collect())
    }

    async fn apply_slice(
        &self,
        prepared: &[Prepared],
        records: &[usize],
    ) -> Result<BTreeMap<usize, Outcome>, ApplyError> {
        let mut outcomes: BTreeMap<usize, Outcome> = BTreeMap::new();
        let mut answers = CreditAnswers::new();
        let mut rounds_without_progress = 0;
        loop {
            let pending: Vec<usize> = records
                .iter()
                .copied()
                .filter(|i| !outcomes.contains_key(i))
                .collect();
            if pending.is_empty() {
                return Ok(outcomes);
            }
            let round = self.round(prepared, &pending, &mut answers).await;
            let (committed, planned) = match round {
                Ok(done) => done,
                Err(RoundError::Raced) => {
                    rounds_without_progress += 1;
                    self.metrics.cas_conflicts.inc();
                    if rounds_without_progress > self.max_conflict_retries {
                        return Err(ApplyError::Contended(rounds_without_progress));
                    }
                    continue;
                }
                Err(RoundError::Store(e)) if e.class() == ErrorClass::Transient => {
                    return Err(ApplyError::Transient(e));
                }
                Err(RoundError::Store(e)) => {
                    self.metrics
                        .apply_retries
                        .with_label_values(&["permanent"])
                        .inc();
                    if let [only] = pending[..] {
                        tracing::warn!(error = %e, "the database refuses this record; dead-lettering it");
                        let error = e.to_string();
                        if let Some(l) = prepared[only]
                            .source
                            .as_deref()
                            .and_then(|s| letter(s, APPLY_ERROR, &error, chrono::Utc::now()))
                        {
                            let unit = crate::store::UnitOfWork {
                                outbox: vec![l],
                                ..crate::store::UnitOfWork::default()
                            };
                            match self.repo.commit(unit).await {
                                Ok(_) => {}
                                Err(CommitError::Store(e)) if e.is_transient() => {
                                    return Err(ApplyError::Transient(e));
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "the dead letter itself could not be recorded");
                                }
                            }
                        }
                        outcomes.insert(
                            only,
                            Outcome {
                                verdict: Verdict::DeadLetter {
                                    reason: APPLY_ERROR,
                                    error,
                                },
                                denied: None,
                            },
                        );
                    } else {
                        // Narrow it down, keeping the records' order.
                        let (first, second) = pending.split_at(pending.len() / 2);
                        for half in [first, second] {
                            let done = Box::pin(self.apply_slice(prepared, half)).await?;
                            outcomes.extend(done);
                        }
                    }
                    continue;
                }
            };
            let lost: std::collections::BTreeSet<String> = committed
                .conflicts
                .union(&committed.missing)
                .cloned()
                .collect();
            let mut progress = false;
            for p in planned {
                if p.batch.as_ref().is_some_and(|b| lost.contains(b)) {
                    continue;
                }
                let verdict = match p.verdict {
                    Verdict::Ignored(_)
                        if prepared[p.index]
                            .event_id()
                            .is_some_and(|id| committed.already_processed.contains(&id)) =>
                    {
                        Verdict::Duplicate
                    }
                    v => v,
                };
                outcomes.insert(
                    p.index,
                    Outcome {
                        verdict,
                        denied: p.denied,
                    },
                );
                progress = true;
            }
            if !lost.is_empty() {
                self.metrics.cas_conflicts.inc_by(lost.len() as u64);
            }
            if progress {
                rounds_without_progress = 0;
            } else {
                rounds_without_progress += 1;
                if rounds_without_progress > self.max_conflict_retries {
                    return Err(ApplyError::Contended(rounds_without_progress));
                }
            }
        }
    }

    /// One read–decide–commit round over `pending`.
    async fn round(
        &self,
        prepared: &[Prepared],
        pending: &[usize],
        answers: &mut CreditAnswers,
    ) -> Result<(crate::store::Committed, Vec<Planned>), RoundError> {
        let started = std::time::Instant::now();
        let mut ids: Vec<String> = pending
            .iter()
            .filter_map(|&i| prepared[i].batch_id().map(str::to_owned))
            .collect();
        ids.sort();
        ids.dedup();
        let events: Vec<Uuid> = pending
            .iter()
            .filter_map(|&i| prepared[i].event_id())
            .collect();
        let batches: HashMap<String, _> = self
            .repo
            .get_batches(&ids)
            .await?
            .into_iter()
            .map(|b| (b.id.clone(), b))
            .collect();
        let processed = self.repo.processed(&events).await?;
        loop {
            let planned = {
                let mut ids = RandomIds;
                let mut env = Env {
                    now: chrono::Utc::now(),
                    ids: &mut ids,
                    credits: answers,
                };
                plan::plan(
                    &self.rules,
                    prepared,
                    pending,
                    &batches,
                    &processed,
                    &mut env,
                )
            };
            match planned {
                Plan::NeedsCredit {
                    query,
                    correlation_id,
                    ..
                } => {
                    let verdict = self.credits.check(&query, correlation_id).await;
                    answers.insert(query, verdict);
                }
                Plan::Ready {
                    unit,
                    planned,
                    notes,
                } => {
                    for (i, note) in notes {
                        tracing::info!(event = ?prepared[i].event_id(), "{note}");
                    }
                    let observations = Metrics::observations(&unit);
                    self.metrics.stage("decided", started.elapsed());
                    let committing = std::time::Instant::now();
                    let result = self.repo.commit(unit).await;
                    self.metrics.stage("committed", committing.elapsed());
                    return match result {
                        Ok(committed) => {
                            let lost = committed
                                .conflicts
                                .union(&committed.missing)
                                .cloned()
                                .collect();
                            self.metrics.record(observations, &lost);
                            Ok((committed, planned))
                        }
                        Err(CommitError::Processed(_)) => Err(RoundError::Raced),
                        Err(CommitError::Store(e)) => Err(RoundError::Store(e)),
                    };
                }
            }
        }
    }
}

enum RoundError {
    /// Events of a winning write were recorded concurrently; decide again.
    Raced,
    Store(StoreError),
}

impl From<StoreError> for RoundError {
    fn from(e: StoreError) -> Self {
        RoundError::Store(e)
    }
}

#[cfg(test)]
mod tests;
