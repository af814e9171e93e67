//! The demo runs end to end and checks its own published stream.

use std::time::Duration;

use bos::demo::{run, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_demo_is_consistent() {
    let summary = run(DemoOptions {
        batches: 12,
        essays_min: 2,
        essays_max: 4,
        failure_rate: 0.1,
        phase_failure_rate: 0.05,
        duplicate_rate: 0.3,
        seed: 11,
        max_delay: Duration::from_millis(10),
        database_url: None,
        timeout: Duration::from_secs(120),
    })
    .await
    .expect("the demo runs");
    assert!(summary.problems.is_empty(), "{:?}", summary.problems);
    assert_eq!(
        summary.final_status.values().sum::<usize>(),
        12,
        "every batch ended"
    );
    assert!(summary.commands >= 12, "at least one command per batch");
    assert!(
        summary.redeliveries_absorbed > 0,
        "re-sent events were absorbed by the inbox"
    );
    assert!(summary.render().contains("consistent"));
}
