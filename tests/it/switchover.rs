//! Replacing the original service: its database (the schema as its
//! migrations leave it, both spellings of the phase enum) imported with
//! `bos import-legacy`, the imported batches driven to completion through
//! Kafka, and a shadow run compared with the live service.

use std::process::Command;
use std::time::Duration;

use bos::contracts::{topics, EssayRef, PhaseName};
use bos::sim::upstream;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::app::{environment, BosProcess};
use crate::support::flow::{correlation, data, Flow, FlowOptions};
use crate::support::pg::Database;
use crate::support::TEACHER;

/// The original's schema (Alembic head `e5f7a9b1c3d5`), with `phases` as its
/// `pipeline_phase_enum` (migrations and `create_all` spell `nlp` differently).
async fn legacy_schema(pool: &PgPool, phases: &[&str]) {
    let quoted = |values: &[&str]| {
        values
            .iter()
            .map(|v| format!("'{v}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let statements = [
        format!(
            "CREATE TYPE batch_status_enum AS ENUM ({})",
            quoted(&[
                "awaiting_content_validation", "processing", "completed", "failed", "cancelled",
                "student_validation_completed", "ready_for_pipeline_execution", "processing_pipelines",
                "awaiting_pipeline_configuration", "awaiting_student_validation", "validation_timeout_processed",
                "completed_successfully", "completed_with_failures", "failed_critically", "content_ingestion_failed",
            ])
        ),
        format!("CREATE TYPE pipeline_phase_enum AS ENUM ({})", quoted(phases)),
        format!(
            "CREATE TYPE phase_status_enum AS ENUM ({})",
            quoted(&["pending", "initiated", "in_progress", "completed", "failed", "cancelled"])
        ),
        "CREATE TABLE batches (id varchar(36) PRIMARY KEY, correlation_id varchar(36) NOT NULL, \
           name varchar(255) NOT NULL, description text, class_id varchar(255), status batch_status_enum NOT NULL, \
           requested_pipelines json, pipeline_configuration json, total_essays int, \
           processed_essays int NOT NULL DEFAULT 0, version int NOT NULL DEFAULT 1, \
           created_at timestamp NOT NULL DEFAULT now(), updated_at timestamp NOT NULL DEFAULT now(), \
           completed_at timestamp, processing_metadata json, error_details json)"
            .into(),
        "CREATE INDEX ix_batches_correlation_id ON batches (correlation_id)".into(),
        "CREATE INDEX ix_batches_status ON batches (status)".into(),
        "CREATE INDEX ix_batches_class_id ON batches (class_id)".into(),
        "CREATE TABLE batch_essays (id serial PRIMARY KEY, \
           batch_id varchar(36) NOT NULL REFERENCES batches (id) ON DELETE CASCADE, essay_id varchar(36) NOT NULL, \
           content_reference json NOT NULL, student_metadata json, processing_metadata json, \
           created_at timestamp NOT NULL DEFAULT now(), updated_at timestamp NOT NULL DEFAULT now())"
            .into(),
        "CREATE TABLE phase_status_log (id serial PRIMARY KEY, \
           batch_id varchar(36) NOT NULL REFERENCES batches (id) ON DELETE CASCADE, phase pipeline_phase_enum NOT NULL, \
           status phase_status_enum NOT NULL, phase_started_at timestamp, phase_completed_at timestamp, \
           essays_processed int NOT NULL DEFAULT 0, essays_failed int NOT NULL DEFAULT 0, error_message text, \
           error_details json, correlation_id varchar(36) NOT NULL, processing_metadata json, \
           created_at timestamp NOT NULL DEFAULT now(), updated_at timestamp NOT NULL DEFAULT now())"
            .into(),
        "CREATE TABLE configuration_snapshots (id serial PRIMARY KEY, \
           batch_id varchar(36) NOT NULL REFERENCES batches (id) ON DELETE CASCADE, snapshot_name varchar(255), \
           description text, pipeline_definition json NOT NULL, configuration_version varchar(50), \
           is_active bool DEFAULT true, validation_status varchar(50), validation_errors json, created_by varchar(255), \
           source_system varchar(100), created_at timestamp NOT NULL DEFAULT now(), \
           updated_at timestamp NOT NULL DEFAULT now(), additional_metadata json)"
            .into(),
        "CREATE TABLE event_outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
           aggregate_id varchar(255) NOT NULL, aggregate_type varchar(100) NOT NULL, event_type varchar(255) NOT NULL, \
           event_data json NOT NULL, event_key varchar(255), topic varchar(255) NOT NULL, \
           created_at timestamptz NOT NULL DEFAULT now(), published_at timestamptz, \
           retry_count int NOT NULL DEFAULT 0, last_error text)"
            .into(),
        "CREATE INDEX ix_event_outbox_unpublished_topic ON event_outbox (published_at, topic, created_at) \
           WHERE published_at IS NULL"
            .into(),
        "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)".into(),
        "INSERT INTO alembic_version VALUES ('e5f7a9b1c3d5')".into(),
    ];
    for statement in statements {
        sqlx::query(&statement).execute(pool).await.unwrap();
    }
}

fn phase(status: &str) -> Value {
    json!({"status": status, "essay_counts": null, "started_at": null, "completed_at": null,
           "error_info": null, "progress_percentage": 0})
}

/// The pipeline state as the original writes it (no student-matching key).
fn pipeline(id: &str, requested: &[&str], states: &[(&str, &str)]) -> Value {
    let mut p = json!({"batch_id": id, "requested_pipelines": requested,
        "spellcheck": phase("skipped_by_user_config"), "nlp": phase("skipped_by_user_config"),
        "cj_assessment": phase("skipped_by_user_config"), "ai_feedback": phase("skipped_by_user_config"),
        "last_updated": "2026-11-20T10:00:00.000000"});
    for (name, status) in states {
        p[*name] = phase(status);
    }
    p
}

fn context(class_id: Option<&str>, prompt: bool) -> Value {
    json!({"expected_essay_count": 2, "essay_ids": null, "course_code": "ENG5",
        "student_prompt_ref": if prompt {
            json!({"references": {"student_prompt_text": {"storage_id": "prompt-1", "path": ""}}})
        } else { Value::Null },
        "user_id": TEACHER, "org_id": "org-1", "class_id": class_id,
        "cj_default_llm_model": null, "cj_default_temperature": null, "assignment_id": null})
}

struct Legacy {
    pool: PgPool,
}

impl Legacy {
    async fn batch(
        &self,
        id: &str,
        status: &str,
        class_id: Option<&str>,
        pipeline: Value,
        prompt: bool,
    ) {
        sqlx::query(
            "INSERT INTO batches (id, correlation_id, name, class_id, status, pipeline_configuration, total_essays, \
               processing_metadata) VALUES ($1, $1, 'ENG5 - teacher', $2, $3::batch_status_enum, $4::json, 2, $5::json)",
        )
        .bind(id)
        .bind(class_id)
        .bind(status)
        .bind(pipeline.to_string())
        .bind(context(class_id, prompt).to_string())
        .execute(&self.pool)
        .await
        .unwrap();
    }

    async fn essays(&self, id: &str) -> Vec<EssayRef> {
        let mut refs = Vec::new();
        for i in 0..2 {
            let essay = format!("{}-e{i}", &id[..8]);
            let storage = format!("{id}-s{i}");
            sqlx::query(
                "INSERT INTO batch_essays (batch_id, essay_id, content_reference, student_metadata, processing_metadata) \
                 VALUES ($1, $2, $3::json, '{}', '{}')",
            )
            .bind(id)
            .bind(&essay)
            .bind(json!({"text_storage_id": storage, "type": "text_content"}).to_string())
            .execute(&self.pool)
            .await
            .unwrap();
            refs.push(EssayRef::new(essay, storage));
        }
        refs
    }

    async fn log(&self, id: &str, phase: &str, status: &str, corr: Uuid) {
        sqlx::query(
            "INSERT INTO phase_status_log (batch_id, phase, status, correlation_id, processing_metadata) \
             VALUES ($1, $2::pipeline_phase_enum, $3::phase_status_enum, $4, '{}')",
        )
        .bind(id)
        .bind(phase)
        .bind(status)
        .bind(corr.to_string())
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// An outbox row as the original writes it: the envelope plus `topic` and `headers`.
    async fn outbox(
        &self,
        key: &str,
        topic: &str,
        event_id: Uuid,
        corr: Uuid,
        data: Value,
        published: bool,
    ) {
        let envelope = json!({"event_id": event_id, "event_type": topic, "event_timestamp": "2026-11-20T10:00:00.000000Z",
            "source_service": "batch_orchestrator_service", "schema_version": 1, "correlation_id": corr,
            "data_schema_uri": null, "data": data, "metadata": null, "topic": topic,
            "headers": {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}});
        sqlx::query(
            "INSERT INTO event_outbox (aggregate_id, aggregate_type, event_type, event_data, event_key, topic, published_at) \
             VALUES ($1, 'batch', $2, $3::json, $1, $2, CASE WHEN $4 THEN now() END)",
        )
        .bind(key)
        .bind(topic)
        .bind(envelope.to_string())
        .bind(published)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Everything the source holds, to prove the import never writes it.
    async fn fingerprint(&self) -> String {
        sqlx::query_scalar(
            "SELECT md5(string_agg(t, '|' ORDER BY t)) FROM ( \
               SELECT row_to_json(b)::text AS t FROM batches b UNION ALL \
               SELECT row_to_json(e)::text FROM batch_essays e UNION ALL \
               SELECT row_to_json(l)::text FROM phase_status_log l UNION ALL \
               SELECT row_to_json(o)::text FROM event_outbox o) rows",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }
}

fn spellcheck_command(id: &str, essays: &[EssayRef]) -> Value {
    json!({"event_name": "batch.spellcheck.initiate.command", "entity_id": id, "entity_type": "batch",
           "parent_id": null, "timestamp": "2026-11-20T10:00:00.000000Z", "essays_to_process": essays, "language": "en"})
}

/// The ids of the filled source, by what they show.
struct Filled {
    idle: String,
    spellcheck_in_flight: (String, Uuid, Uuid),
    nlp_in_flight: (String, Uuid, Vec<EssayRef>),
    all: Vec<String>,
    refused: Vec<String>,
}

/// A batch in every state the original writes, plus two it cannot represent.
/// `nlp` is how the database's phase enum spells nlp (the pipeline JSON always
/// says `nlp`).
async fn fill(legacy: &Legacy, nlp: &str) -> Filled {
    let id = |_: &str| Uuid::new_v4().to_string();
    let initial = |b: &str| {
        pipeline(
            b,
            &["spellcheck"],
            &[("spellcheck", "pending_dependencies")],
        )
    };
    let awaiting = id("awaiting");
    legacy
        .batch(
            &awaiting,
            "awaiting_content_validation",
            None,
            initial(&awaiting),
            true,
        )
        .await;
    let matching = id("matching");
    legacy
        .batch(
            &matching,
            "awaiting_student_validation",
            Some("class-1"),
            initial(&matching),
            true,
        )
        .await;
    let validated = id("validated");
    legacy
        .batch(
            &validated,
            "student_validation_completed",
            Some("class-1"),
            initial(&validated),
            true,
        )
        .await;
    let idle = id("idle");
    legacy
        .batch(
            &idle,
            "ready_for_pipeline_execution",
            None,
            initial(&idle),
            true,
        )
        .await;
    legacy.essays(&idle).await;
    // A run of cj_assessment with its spellcheck command not yet published.
    let spell = id("spell");
    legacy
        .batch(
            &spell,
            "ready_for_pipeline_execution",
            None,
            pipeline(
                &spell,
                &["spellcheck", "cj_assessment"],
                &[
                    ("spellcheck", "dispatch_initiated"),
                    ("cj_assessment", "pending_dependencies"),
                ],
            ),
            true,
        )
        .await;
    let spell_essays = legacy.essays(&spell).await;
    let (spell_corr, spell_event) = (Uuid::new_v4(), Uuid::new_v4());
    legacy
        .log(&spell, "spellcheck", "initiated", spell_corr)
        .await;
    legacy
        .outbox(
            &spell,
            topics::SPELLCHECK_COMMAND,
            Uuid::new_v4(),
            spell_corr,
            json!({"entity_id": spell, "note": "published earlier"}),
            true,
        )
        .await;
    legacy
        .outbox(
            &spell,
            topics::SPELLCHECK_COMMAND,
            spell_event,
            spell_corr,
            spellcheck_command(&spell, &spell_essays),
            false,
        )
        .await;
    // A run of nlp: spellcheck done, nlp in progress.
    let nlp_batch = id("nlp");
    legacy
        .batch(
            &nlp_batch,
            "ready_for_pipeline_execution",
            None,
            pipeline(
                &nlp_batch,
                &["spellcheck", "nlp"],
                &[
                    ("spellcheck", "completed_successfully"),
                    ("nlp", "in_progress"),
                ],
            ),
            true,
        )
        .await;
    let nlp_essays = legacy.essays(&nlp_batch).await;
    let nlp_corr = Uuid::new_v4();
    legacy
        .log(&nlp_batch, "spellcheck", "initiated", nlp_corr)
        .await;
    legacy
        .log(&nlp_batch, "spellcheck", "completed", nlp_corr)
        .await;
    legacy.log(&nlp_batch, nlp, "initiated", nlp_corr).await;
    let failed = id("failed");
    legacy
        .batch(&failed, "failed_critically", None, initial(&failed), true)
        .await;
    // What bos cannot represent.
    let processing = id("processing");
    legacy
        .batch(&processing, "processing", None, initial(&processing), true)
        .await;
    let both = id("both");
    legacy
        .batch(
            &both,
            "ready_for_pipeline_execution",
            None,
            pipeline(
                &both,
                &["spellcheck", "nlp"],
                &[("spellcheck", "in_progress"), ("nlp", "dispatch_initiated")],
            ),
            true,
        )
        .await;
    // A row of no batch at all.
    legacy
        .outbox(
            "stray-key",
            topics::TEACHER_NOTIFICATION,
            Uuid::new_v4(),
            Uuid::new_v4(),
            json!({"teacher_id": TEACHER}),
            false,
        )
        .await;
    Filled {
        all: vec![
            awaiting,
            matching,
            validated,
            idle.clone(),
            spell.clone(),
            nlp_batch.clone(),
            failed,
        ],
        idle,
        spellcheck_in_flight: (spell, spell_corr, spell_event),
        nlp_in_flight: (nlp_batch, nlp_corr, nlp_essays),
        refused: vec![processing, both],
    }
}

fn bos(args: &[&str], env: &[(String, String)]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_bos"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("bos runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn import_legacy_carries_every_state_once_and_never_writes_the_source() {
    let source = Database::fresh().await;
    legacy_schema(
        &source.pool,
        &["spellcheck", "nlp_analysis", "cj_assessment", "ai_feedback"],
    )
    .await;
    let legacy = Legacy {
        pool: source.pool.clone(),
    };
    let filled = fill(&legacy, "nlp_analysis").await;
    let before = legacy.fingerprint().await;
    let target = Database::fresh().await;
    let env = vec![("DATABASE_URL".to_owned(), target.url.clone())];
    let (ok, _, err) = bos(&["migrate"], &env);
    assert!(ok, "{err}");

    // A dry run reports and writes nothing.
    let (ok, out, err) = bos(
        &[
            "import-legacy",
            "--from",
            &source.url,
            "--dry-run",
            "--json",
        ],
        &env,
    );
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (report["imported"].as_u64(), report["refused"].as_u64()),
        (Some(7), Some(2)),
        "{out}"
    );
    assert_eq!(count(&target.pool, "batches").await, 0);
    assert_eq!(count(&target.pool, "event_outbox").await, 0);

    // The import: per batch, with the refusals' reasons.
    let (ok, out, err) = bos(&["import-legacy", "--from", &source.url], &env);
    assert!(ok, "{err}");
    assert!(
        out.contains("7 batch(es) imported, 0 skipped, 2 refused; 1 unattached outbox row(s)"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "refused      {}  status `processing`",
            filled.refused[0]
        )),
        "{out}"
    );
    assert!(out.contains("several phases are in flight"), "{out}");
    assert_eq!(count(&target.pool, "batches").await, 7);
    let (spell, spell_corr, spell_event) = &filled.spellcheck_in_flight;
    let row: (String, String, String) =
        sqlx::query_as("SELECT topic, message_key, payload FROM event_outbox WHERE id = $1")
            .bind(spell_event)
            .fetch_one(&target.pool)
            .await
            .expect("the unpublished command, under its event id");
    assert_eq!(
        (row.0.as_str(), row.1.as_str()),
        (topics::SPELLCHECK_COMMAND, spell.as_str())
    );
    let envelope: Value = serde_json::from_str(&row.2).unwrap();
    assert!(envelope.get("topic").is_none() && envelope["event_id"] == json!(spell_event));
    assert_eq!(
        count(&target.pool, "event_outbox").await,
        2,
        "the unpublished command and the stray row, not the published one"
    );
    let (ok, shown, _) = bos(&["batch", "show", spell, "--json"], &env);
    assert!(ok);
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["status"], "processing_pipelines");
    assert_eq!(shown["current_run"]["correlation_id"], json!(spell_corr));
    assert_eq!(shown["essays"].as_array().unwrap().len(), 2);
    let (nlp_batch, _, _) = &filled.nlp_in_flight;
    let history: i64 =
        sqlx::query_scalar("SELECT count(*) FROM phase_status_log WHERE batch_id = $1")
            .bind(nlp_batch)
            .fetch_one(&target.pool)
            .await
            .unwrap();
    assert_eq!(history, 3, "the phase history, nlp_analysis read as nlp");

    // Again: nothing changes, and it says so.
    let dump = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT md5(string_agg(t, '|' ORDER BY t)) FROM (SELECT row_to_json(b)::text AS t FROM batches b \
             UNION ALL SELECT row_to_json(o)::text FROM event_outbox o UNION ALL SELECT row_to_json(l)::text FROM phase_status_log l) x",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let imported = dump(target.pool.clone()).await;
    let (ok, out, _) = bos(&["import-legacy", "--from", &source.url], &env);
    assert!(ok);
    assert!(out.contains("0 batch(es) imported, 7 skipped, 2 refused; 0 unattached outbox row(s) — nothing changed"), "{out}");
    assert_eq!(dump(target.pool.clone()).await, imported);
    assert_eq!(
        legacy.fingerprint().await,
        before,
        "the source is never written"
    );

    // One batch by name, into another database.
    let other = Database::fresh().await;
    let env = vec![("DATABASE_URL".to_owned(), other.url.clone())];
    assert!(bos(&["migrate"], &env).0);
    let (ok, out, err) = bos(
        &[
            "import-legacy",
            "--from",
            &source.url,
            "--batch",
            &filled.idle,
        ],
        &env,
    );
    assert!(ok, "{err}");
    assert!(out.contains("1 batch(es) imported"), "{out}");
    assert_eq!(count(&other.pool, "batches").await, 1);
    assert_eq!(count(&other.pool, "event_outbox").await, 0);

    // A source that is not the original's database: one clear line.
    let (ok, _, err) = bos(
        &[
            "import-legacy",
            "--from",
            "postgres://postgres@127.0.0.1:1/none",
        ],
        &env,
    );
    assert!(
        !ok && err.lines().count() == 1 && err.contains("127.0.0.1:1"),
        "{err}"
    );
}

#[tokio::test]
async fn imported_batches_finish_their_pipelines_through_kafka() {
    let source = Database::fresh().await;
    // The spelling `create_all` gives the phase enum.
    legacy_schema(
        &source.pool,
        &[
            "spellcheck",
            "ai_feedback",
            "cj_assessment",
            "nlp",
            "student_matching",
        ],
    )
    .await;
    let legacy = Legacy {
        pool: source.pool.clone(),
    };
    let filled = fill(&legacy, "nlp").await;
    let url = source.url.clone();
    let flow = Flow::with(FlowOptions {
        before_start: Some(Box::new(move |repo, _| {
            Box::pin(async move {
                let source = bos::legacy::import::Source::connect(&url).await.unwrap();
                let (batches, unattached) = source.read(&[]).await.unwrap();
                let report =
                    bos::legacy::import::import(repo.as_ref(), &batches, &unattached, false)
                        .await
                        .unwrap();
                assert_eq!(report.imported, 7, "{}", report.render());
            })
        })),
        ..FlowOptions::default()
    })
    .await;
    // The original's unpublished command goes out under its own event id.
    let (spell, spell_corr, spell_event) = filled.spellcheck_in_flight.clone();
    let commands = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 1).await;
    assert_eq!(commands[0].value["event_id"], json!(spell_event));
    flow.answer(&spell, PhaseName::Spellcheck, &commands[0], &[])
        .await;
    let cj = flow
        .observer
        .wait_for(topics::CJ_ASSESSMENT_COMMAND, 1)
        .await;
    assert_eq!(
        correlation(&cj[0]),
        spell_corr,
        "the run goes on under its correlation id"
    );
    flow.answer(&spell, PhaseName::CjAssessment, &cj[0], &[])
        .await;
    // The nlp run: the original sent its command long ago; its outcome arrives now.
    let (nlp_batch, nlp_corr, nlp_essays) = filled.nlp_in_flight.clone();
    let outcome = upstream::phase_outcome(&nlp_batch, PhaseName::Nlp, &nlp_essays, &[], nlp_corr);
    flow.up
        .send(topics::PHASE_OUTCOME, &nlp_batch, nlp_corr, outcome)
        .await;
    // The idle batch takes a new request.
    flow.request(&filled.idle, "spellcheck").await;
    let spellchecks = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 2).await;
    let idle_command = spellchecks
        .iter()
        .find(|s| s.key.as_deref() == Some(filled.idle.as_str()))
        .unwrap();
    flow.answer(&filled.idle, PhaseName::Spellcheck, idle_command, &[])
        .await;
    let done = flow.observer.wait_for(topics::PIPELINE_COMPLETED, 3).await;
    let finished: std::collections::BTreeMap<String, (Value, Value)> = done
        .iter()
        .map(|d| {
            (
                data(d)["batch_id"].as_str().unwrap().to_owned(),
                (
                    data(d)["final_status"].clone(),
                    data(d)["completed_phases"].clone(),
                ),
            )
        })
        .collect();
    assert_eq!(
        finished[&spell],
        (
            json!("completed_successfully"),
            json!(["spellcheck", "cj_assessment"])
        )
    );
    assert_eq!(
        finished[&nlp_batch],
        (
            json!("completed_successfully"),
            json!(["spellcheck", "nlp"])
        )
    );
    assert_eq!(finished[&filled.idle].1, json!(["spellcheck"]));
    let spell_done = done
        .iter()
        .find(|d| data(d)["batch_id"] == json!(spell))
        .unwrap();
    assert_eq!(correlation(spell_done), spell_corr);
    assert_eq!(filled.all.len(), 7);
    flow.finish(vec![]).await.unwrap();
}

#[tokio::test]
async fn a_shadow_run_publishes_beside_the_live_service_and_the_report_lists_differences() {
    // "Live": a worker on its own database and topics.
    let flow = Flow::start().await;
    flow.cluster
        .create_topics(&format!("shadow.{}", flow.kafka.topic_prefix), 3)
        .await;
    let shadow_db = Database::fresh().await;
    let mut env = environment(&flow.kafka, &shadow_db.url);
    env.insert("BOS__KAFKA__TOPIC_CHECK_INTERVAL".into(), "1s".into());
    // Same live topics; the one difference is what its credit policy allows.
    let mut shadow_env = env.clone();
    shadow_env.insert("BOS__CREDITS__POLICY".into(), "fixed_balance".into());
    shadow_env.insert("BOS__CREDITS__BALANCE".into(), "0".into());
    let mut shadow = BosProcess::start_with_args("shadow", &["run", "--shadow"], &shadow_env);
    assert!(
        shadow.ready(Duration::from_secs(30)).await,
        "{:#?}",
        shadow.log()
    );
    // A shadow run compares what happens after it joined.
    for _ in 0..300 {
        if shadow.logged("partitions assigned") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Two batches registered on the live service; the shadow learns them from
    // Kafka, as the essay lifecycle service does before it provisions content.
    let (free, free_corr) = flow.register(None, 2).await;
    let (paid, paid_corr) = flow.register(None, 2).await;
    flow.observer
        .wait_for(topics::BATCH_ESSAYS_REGISTERED, 2)
        .await;
    for (id, corr) in [(&free, free_corr), (&paid, paid_corr)] {
        flow.provision(id, corr, 2).await;
    }
    flow.wait_for_batch(&paid, |b| {
        b.status == bos::contracts::BatchStatus::ReadyForPipelineExecution
    })
    .await;
    flow.request(&free, "spellcheck").await;
    flow.request(&paid, "cj_assessment").await;
    let spell = flow.observer.wait_for(topics::SPELLCHECK_COMMAND, 2).await;
    for s in &spell {
        let id = s.key.clone().unwrap();
        flow.answer(&id, PhaseName::Spellcheck, s, &["essay-1"])
            .await;
    }
    let cj = flow
        .observer
        .wait_for(topics::CJ_ASSESSMENT_COMMAND, 1)
        .await;
    flow.answer(&paid, PhaseName::CjAssessment, &cj[0], &[])
        .await;
    flow.observer.wait_for(topics::PIPELINE_COMPLETED, 2).await;

    // The shadow published under its prefix: the free batch the same, the paid one denied.
    let mut report_env: Vec<(String, String)> = environment(&flow.kafka, &flow.database.url)
        .into_iter()
        .collect();
    report_env.push(("RUST_LOG".into(), "error".into()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out, _) = bos(&["shadow-report", "--json"], &report_env);
        let published =
            serde_json::from_str::<Value>(&out).map(|r| r["shadow_messages"].as_u64() >= Some(3));
        if published.unwrap_or(false) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the shadow run published nothing: {out}\n{:#?}",
            shadow.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, out, err) = bos(&["shadow-report", "--json"], &report_env);
    assert!(!ok, "a difference exits 1: {out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["batches_compared"], 2, "{out}");
    let differences = report["differences"].as_array().unwrap();
    assert!(
        differences.iter().all(|d| d["batch_id"] == json!(paid)),
        "the free batch agrees: {out}"
    );
    let whats: Vec<&str> = differences
        .iter()
        .map(|d| d["what"].as_str().unwrap())
        .collect();
    assert!(
        whats.contains(&"phases commanded (in order)") && whats.contains(&"denials"),
        "{out}"
    );
    let (_, text, _) = bos(&["shadow-report"], &report_env);
    assert!(
        text.contains("difference(s)") && text.contains(&paid),
        "{text}"
    );
    // Nothing of the shadow reached the live topics: one spellcheck per batch there.
    assert_eq!(flow.observer.on(topics::SPELLCHECK_COMMAND).len(), 2);
    assert_eq!(flow.observer.on(topics::PIPELINE_DENIED).len(), 0);
    shadow.signal("TERM");
    assert!(shadow
        .wait(Duration::from_secs(30))
        .await
        .is_some_and(|s| s.success()));
    flow.finish(vec![]).await.unwrap();
}
