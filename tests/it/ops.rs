//! Operating bos through its binary: the inspection commands, the demo, and
//! errors that speak plainly.

use std::process::Command;
use std::time::Duration;

use bos::contracts::{topics, PhaseName};
use serde_json::Value;

use crate::support::app::environment;
use crate::support::flow::Flow;

fn bos(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_bos"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("bos runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn batch_outbox_and_dead_letter_inspection() {
    let flow = Flow::start().await;
    let (id, corr) = flow.register(None, 2).await;
    flow.provision(&id, corr, 2).await;
    flow.request(&id, "cj_assessment").await;
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    flow.answer(&id, PhaseName::Spellcheck, &spell[0], &["essay-1"])
        .await;
    flow.observer
        .wait_for(topics::CJ_ASSESSMENT_COMMAND, 1)
        .await;
    flow.up
        .send_raw(topics::PHASE_OUTCOME, &id, b"{broken", &[])
        .await;
    let (dlq, name) = flow.dead_letters(topics::PHASE_OUTCOME);
    dlq.wait_for(&name, 1).await;
    let env = environment(&flow.kafka, &flow.database.url);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let (ok, table, err) = bos(&["batch", "show", &id], &env);
    assert!(ok, "{err}");
    assert!(
        table.contains(&id) && table.contains("processing_pipelines"),
        "{table}"
    );
    assert!(
        table.contains("spellcheck") && table.contains("completed_with_partial_success"),
        "{table}"
    );
    assert!(
        table.contains("store-0-corrected"),
        "essays with their corrected text: {table}"
    );
    assert!(
        table.contains(topics::CJ_ASSESSMENT_COMMAND),
        "outbox rows: {table}"
    );
    let (ok, json, _) = bos(&["batch", "show", &id, "--json"], &env);
    assert!(ok);
    let shown: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(shown["status"], "processing_pipelines");
    assert_eq!(shown["current_run"]["requested_pipeline"], "cj_assessment");
    assert!(shown["phase_history"].as_array().unwrap().len() >= 3);
    assert_eq!(shown["essays"].as_array().unwrap().len(), 2);
    let (ok, _, err) = bos(&["batch", "show", "no-such-batch"], &env);
    assert!(!ok && err.contains("no batch `no-such-batch`"), "{err}");

    // A row that keeps failing shows with its error.
    sqlx::query("UPDATE event_outbox SET attempts = 3, last_error = 'broker said no', next_attempt_at = now() + interval '1 hour' \
                 WHERE id = (SELECT id FROM event_outbox ORDER BY seq DESC LIMIT 1) AND published_at IS NULL")
        .execute(&flow.database.pool)
        .await
        .unwrap();
    let (ok, json, err) = bos(&["outbox", "status", "--json"], &env);
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&json).unwrap();
    assert!(status["unpublished"].as_i64().unwrap() >= 0);
    let (ok, table, _) = bos(&["outbox", "status"], &env);
    assert!(ok);
    assert!(table.contains("unpublished rows"), "{table}");
    if status["failing"].as_i64().unwrap() > 0 {
        assert!(table.contains("broker said no"), "{table}");
    }

    let (ok, listed, err) = bos(&["dlq", "list", "--topic", topics::PHASE_OUTCOME], &env);
    assert!(ok, "{err}");
    assert!(
        listed.contains("1 letter(s)") && listed.contains("decode_error"),
        "{listed}"
    );
    let (ok, json, _) = bos(
        &["dlq", "list", "--topic", topics::PHASE_OUTCOME, "--json"],
        &env,
    );
    assert!(ok);
    let letters: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(letters[0]["headers"]["dlq.reason"], "decode_error");
    assert_eq!(letters[0]["payload"], "{broken");
    flow.finish(vec![dlq]).await.unwrap();
}

#[test]
fn config_shows_where_each_value_came_from() {
    let (ok, json, err) = bos(
        &["config"],
        &[
            ("BOS_STORE", "memory"),
            ("BOS__CONSUMER__MAX_BATCH", "64"),
            (
                "BATCH_ORCHESTRATOR_SERVICE_KAFKA_CONSUMER_GROUP_ID",
                "legacy-group",
            ),
            ("DATABASE_URL", "postgres://bos:hunter2@db/bos"),
        ],
    );
    assert!(ok, "{err}");
    assert!(!json.contains("hunter2"), "secrets masked");
    let shown: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(shown["settings"]["consumer"]["max_batch"], 64);
    assert_eq!(
        shown["sources"]["consumer.max_batch"],
        "BOS__CONSUMER__MAX_BATCH"
    );
    assert_eq!(
        shown["sources"]["kafka.group_id"],
        "BATCH_ORCHESTRATOR_SERVICE_KAFKA_CONSUMER_GROUP_ID"
    );
    assert_eq!(
        shown["settings"]["database"]["url"],
        "postgres://bos:***@db/bos"
    );
}

#[test]
fn errors_speak_plainly_in_one_line() {
    let (ok, _, err) = bos(
        &["migrate"],
        &[("DATABASE_URL", "postgres://bos:pw@127.0.0.1:1/bos")],
    );
    assert!(!ok);
    let line = err.trim();
    assert!(!line.contains('\n'), "one line: {err}");
    assert!(
        line.contains("127.0.0.1:1/bos") && line.contains("connection refused"),
        "{line}"
    );
    assert!(
        !line.contains("pw@") && !line.contains("Stack backtrace"),
        "{line}"
    );
    let (ok, _, err) = bos(
        &["run"],
        &[("BOS_STORE", "memory"), ("BOS_HTTP_ADDR", "not-an-address")],
    );
    assert!(!ok);
    assert!(err.contains("`http.addr`"), "names the key: {err}");
    let (ok, _, err) = bos(&["migrate"], &[]);
    assert!(
        !ok && err.contains("database.url") && err.contains("DATABASE_URL"),
        "{err}"
    );
}

/// The README's first command: the demo runs on the in-memory store even when
/// a DATABASE_URL points at no server.
#[test]
fn the_demo_runs_on_the_embedded_store() {
    let (ok, out, err) = bos(
        &[
            "demo",
            "--batches",
            "12",
            "--duplicate-rate",
            "0.3",
            "--failure-rate",
            "0.1",
            "--seed",
            "11",
        ],
        &[("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")],
    );
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("in-memory store"), "{err}");
    assert!(out.contains("consistent") && out.contains("yes"), "{out}");
    assert!(out.contains("bos hop: event produced→command p99"), "{out}");
    let _ = Duration::ZERO;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_demo_is_consistent() {
    let summary = bos::sim::demo::run(bos::sim::demo::DemoOptions {
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
    assert!(!summary.latencies_ms.is_empty(), "the hop was measured");
}
