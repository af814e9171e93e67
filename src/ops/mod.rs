//! Operator commands: what an operator would otherwise do with `psql` and `kcat`.

pub mod dlq;

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::contracts::PhaseName;
use crate::store::{OutboxRow, Repository, StoreResult};

fn row_json(r: &OutboxRow) -> Value {
    json!({
        "id": r.id, "seq": r.seq, "topic": r.topic, "key": r.key,
        "created_at": crate::contracts::time::format(&r.created_at),
        "published_at": r.published_at.as_ref().map(crate::contracts::time::format),
        "attempts": r.attempts, "last_error": r.last_error,
        "next_attempt_at": crate::contracts::time::format(&r.next_attempt_at),
        "claimed_until": r.claimed_until.as_ref().map(crate::contracts::time::format),
    })
}

/// `bos batch show`: state, runs, phases, essays and outbox rows of one batch;
/// `None` when there is no such batch.
pub async fn batch_show(repo: &dyn Repository, id: &str) -> StoreResult<Option<Value>> {
    let Some(batch) = repo.get_batch(id).await? else {
        return Ok(None);
    };
    let history = repo.phase_history(id).await?;
    let outbox = repo.outbox_rows(Some(id)).await?;
    let phases: Vec<Value> = PhaseName::ALL
        .iter()
        .map(|&p| {
            let s = batch.pipeline.phase(p);
            json!({
                "phase": p, "status": s.status, "essay_counts": s.essay_counts,
                "started_at": s.started_at.as_ref().map(crate::contracts::time::format),
                "completed_at": s.completed_at.as_ref().map(crate::contracts::time::format),
            })
        })
        .collect();
    Ok(Some(json!({
        "batch_id": batch.id,
        "status": batch.status,
        "version": batch.version,
        "class_type": batch.class_type(),
        "user_id": batch.context.user_id,
        "course_code": batch.context.course_code,
        "runs_started": batch.orchestration.runs_started,
        "current_run": batch.orchestration.current_run,
        "earlier_runs": batch.orchestration.earlier_runs,
        "parked_request": batch.parked,
        "phases": phases,
        "essays": batch.essays,
        "phase_history": history.iter().map(|h| json!({
            "phase": h.phase, "from": h.old_status, "to": h.new_status,
            "correlation_id": h.correlation_id,
        })).collect::<Vec<_>>(),
        "outbox": outbox.iter().map(row_json).collect::<Vec<_>>(),
    })))
}

/// The table `bos batch show` prints without `--json`.
pub fn batch_table(shown: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let _ = writeln!(out, "batch     {}", s(&shown["batch_id"]));
    let _ = writeln!(
        out,
        "status    {} (version {}, {}, owner {}, {})",
        s(&shown["status"]),
        s(&shown["version"]),
        s(&shown["class_type"]),
        s(&shown["user_id"]),
        s(&shown["course_code"])
    );
    let run = &shown["current_run"];
    if run.is_null() {
        let _ = writeln!(
            out,
            "run       none in progress ({} started so far)",
            s(&shown["runs_started"])
        );
    } else {
        let _ = writeln!(
            out,
            "run       {} → {} ({} essays, phases {})",
            s(&run["correlation_id"]),
            s(&run["requested_pipeline"]),
            run["input_essays"].as_array().map_or(0, Vec::len),
            s(&run["phases"])
        );
    }
    if !shown["parked_request"].is_null() {
        let _ = writeln!(
            out,
            "parked    {}",
            s(&shown["parked_request"]["request"]["requested_pipeline"])
        );
    }
    let _ = writeln!(
        out,
        "\n{:<16} {:<34} {:>5} {:>5} {:>5}",
        "phase", "status", "total", "ok", "fail"
    );
    for p in shown["phases"].as_array().into_iter().flatten() {
        let c = &p["essay_counts"];
        let _ = writeln!(
            out,
            "{:<16} {:<34} {:>5} {:>5} {:>5}",
            s(&p["phase"]),
            s(&p["status"]),
            s(&c["total"]),
            s(&c["successful"]),
            s(&c["failed"])
        );
    }
    let essays = shown["essays"].as_array().map_or(0, Vec::len);
    let _ = writeln!(out, "\nessays    {essays}");
    for e in shown["essays"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {} text {} corrected {}",
            s(&e["essay_id"]),
            s(&e["text_storage_id"]),
            s(&e["corrected_text_storage_id"])
        );
    }
    let _ = writeln!(out, "\noutbox");
    for r in shown["outbox"].as_array().into_iter().flatten() {
        let state = if r["published_at"].is_null() {
            format!(
                "pending (attempts {}, {})",
                s(&r["attempts"]),
                s(&r["last_error"])
            )
        } else {
            format!("published {}", s(&r["published_at"]))
        };
        let _ = writeln!(out, "  {:>6} {:<50} {state}", s(&r["seq"]), s(&r["topic"]));
    }
    out
}

/// `bos outbox status`: backlog, oldest row, and the rows that keep failing.
pub async fn outbox_status(repo: &dyn Repository, limit: i64) -> StoreResult<Value> {
    let stats = repo.outbox_stats().await?;
    let stuck = repo.stuck_outbox_rows(limit).await?;
    Ok(json!({
        "unpublished": stats.unpublished,
        "oldest_unpublished_age_seconds": stats.oldest_unpublished_age_seconds,
        "failing": stats.failing,
        "stuck": stuck.iter().map(row_json).collect::<Vec<_>>(),
    }))
}

/// The table `bos outbox status` prints without `--json`.
pub fn outbox_table(status: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "unpublished rows      {}", status["unpublished"]);
    let _ = writeln!(
        out,
        "oldest unpublished    {:.1} s",
        status["oldest_unpublished_age_seconds"]
            .as_f64()
            .unwrap_or(0.0)
    );
    let _ = writeln!(out, "failing (retrying)    {}", status["failing"]);
    for r in status["stuck"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {} {} key {} attempts {} next {} — {}",
            r["id"].as_str().unwrap_or("?"),
            r["topic"].as_str().unwrap_or("?"),
            r["key"].as_str().unwrap_or("?"),
            r["attempts"],
            r["next_attempt_at"].as_str().unwrap_or("?"),
            r["last_error"].as_str().unwrap_or("-"),
        );
    }
    out
}
