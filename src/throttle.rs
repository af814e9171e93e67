//! Log lines that repeat (a broker down, a poll failing every few milliseconds)
//! are written at most once per interval, with how many were held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Throttled {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttled {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// Writes `message` as a warning unless one was written within the interval.
    pub fn warn(&self, message: &str) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, held) = &mut *state;
        if last.is_some_and(|t| t.elapsed() < self.interval) {
            *held += 1;
            return;
        }
        if *held > 0 {
            tracing::warn!(
                repeated = *held,
                "{message} (and {held} more like it in the last {:?})",
                self.interval
            );
        } else {
            tracing::warn!("{message}");
        }
        *last = Some(Instant::now());
        *held = 0;
    }

    /// How many lines are held back right now.
    pub fn held(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
    }
}
