//! What `/readyz` knows without asking anyone: missing topics, a consumer loop
//! that stopped turning, a partition with records waiting and no progress, a
//! relay pass that never ends, a producer replaced after a fatal error.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One readiness check's answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Default)]
struct Partition {
    /// When the oldest record now waiting arrived (None: nothing waiting).
    waiting_since: Option<Instant>,
    last_progress: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    missing_topics: BTreeSet<String>,
    topics_checked: bool,
    topics_unchecked: Option<String>,
    consumer_last_turn: Option<Instant>,
    partitions: BTreeMap<(String, i32), Partition>,
    /// Start times of the relay passes in flight (a pass's settling overlaps
    /// the next pass), oldest first.
    relay_passes: std::collections::VecDeque<Instant>,
}

#[derive(Debug)]
pub struct Health {
    stall_timeout: Duration,
    consumes: bool,
    state: Mutex<State>,
}

impl Health {
    pub fn new(stall_timeout: Duration, consumes: bool) -> Self {
        Self {
            stall_timeout,
            consumes,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_missing_topics(&self, missing: BTreeSet<String>) {
        let mut state = self.state();
        if missing != state.missing_topics && !missing.is_empty() {
            tracing::error!(topics = ?missing, "topics bos needs do not exist; /readyz answers 503 until they do");
        }
        if missing.is_empty() && !state.missing_topics.is_empty() {
            tracing::info!("every topic bos needs exists now");
        }
        state.missing_topics = missing;
        state.topics_checked = true;
        state.topics_unchecked = None;
    }

    pub fn set_topics_unchecked(&self, why: String) {
        self.state().topics_unchecked = Some(why);
    }

    /// A send to `topic` failed because it does not exist.
    pub fn topic_missing(&self, topic: &str) {
        let mut state = self.state();
        if state.missing_topics.insert(topic.to_owned()) {
            tracing::error!(%topic, "topic does not exist; /readyz answers 503 until it does");
        }
    }

    pub fn missing_topics(&self) -> BTreeSet<String> {
        self.state().missing_topics.clone()
    }

    /// The consumer's poll loop went round once.
    pub fn consumer_turned(&self) {
        self.state().consumer_last_turn = Some(Instant::now());
    }

    /// Records of `partition` are waiting since `since`.
    pub fn partition_waiting(&self, partition: &(String, i32), since: Instant) {
        let mut state = self.state();
        let p = state.partitions.entry(partition.clone()).or_default();
        if p.waiting_since.is_none() {
            p.waiting_since = Some(since);
        }
    }

    /// `partition` finished records; `still_waiting` is when the oldest left arrived.
    pub fn partition_progress(&self, partition: &(String, i32), still_waiting: Option<Instant>) {
        let mut state = self.state();
        let p = state.partitions.entry(partition.clone()).or_default();
        p.last_progress = Some(Instant::now());
        p.waiting_since = still_waiting;
    }

    pub fn partition_gone(&self, partition: &(String, i32)) {
        self.state().partitions.remove(partition);
    }

    /// Seconds each partition with waiting records has gone without progress.
    pub fn stuck_seconds(&self) -> Vec<((String, i32), f64)> {
        let now = Instant::now();
        self.state()
            .partitions
            .iter()
            .map(|(k, p)| {
                let stuck = match (p.waiting_since, p.last_progress) {
                    (None, _) => 0.0,
                    (Some(since), Some(progress)) if progress > since => {
                        now.duration_since(progress).as_secs_f64()
                    }
                    (Some(since), _) => now.duration_since(since).as_secs_f64(),
                };
                (k.clone(), stuck)
            })
            .collect()
    }

    pub fn relay_pass_started(&self) {
        self.state().relay_passes.push_back(Instant::now());
    }

    pub fn relay_pass_ended(&self) {
        self.state().relay_passes.pop_front();
    }

    /// The checks that need no I/O.
    pub fn checks(&self) -> Vec<Check> {
        let limit = self.stall_timeout.as_secs_f64();
        let stuck: Vec<String> = self
            .stuck_seconds()
            .into_iter()
            .filter(|(_, s)| *s > limit)
            .map(|((t, p), s)| format!("{t}[{p}] stuck for {s:.0}s"))
            .collect();
        let state = self.state();
        let mut checks = vec![Check {
            name: "topics",
            ok: state.topics_checked && state.missing_topics.is_empty(),
            detail: if !state.topics_checked {
                Some(
                    state
                        .topics_unchecked
                        .clone()
                        .unwrap_or_else(|| "not checked yet".to_owned()),
                )
            } else if state.missing_topics.is_empty() {
                state.topics_unchecked.clone()
            } else {
                Some(format!(
                    "missing: {}",
                    state
                        .missing_topics
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            },
        }];
        if self.consumes {
            let turned = state
                .consumer_last_turn
                .is_some_and(|t| t.elapsed() <= self.stall_timeout);
            checks.push(Check {
                name: "consumer",
                ok: turned && stuck.is_empty(),
                detail: if !turned {
                    Some(format!(
                        "the poll loop has not turned for more than {:?}",
                        self.stall_timeout
                    ))
                } else if stuck.is_empty() {
                    None
                } else {
                    Some(stuck.join("; "))
                },
            });
        }
        let wedged = state
            .relay_passes
            .front()
            .is_some_and(|t| t.elapsed() > self.stall_timeout);
        checks.push(Check {
            name: "relay",
            ok: !wedged,
            detail: wedged.then(|| {
                format!(
                    "a relay pass has been running for more than {:?}",
                    self.stall_timeout
                )
            }),
        });
        checks
    }
}
