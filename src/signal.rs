//! Waiting on a stop signal (a `watch` channel that turns true).

use tokio::sync::watch;

/// Resolves once `signal` is true (or its sender is gone).
pub async fn stopped(signal: &mut watch::Receiver<bool>) {
    let _ = signal.wait_for(|s| *s).await;
}
