//! `bos import-legacy`: the original service's batches, with their run in
//! progress and their unpublished outbox rows, written as bos batches.
//!
//! The source is read in a read-only session and never written. Each batch is
//! written in one transaction (the batch, its essays, its phase history and its
//! outbox rows under their original event ids); a batch bos already has is
//! skipped, so a second run changes nothing. A batch in a state bos cannot
//! represent is refused with the reason, and nothing of it is written.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::contracts::{
    topics, BatchStatus, CourseCode, PhaseName, PipelineExecutionStatus, StorageReferenceMetadata,
    Timestamp,
};
use crate::domain::{
    Batch, BatchContext, BatchEssay, EssayCounts, Orchestration, OutboundMessage, PhaseState,
    PhaseTransition, PipelineState, Run,
};
use crate::store::{BatchWrite, Repository, UnitOfWork};

/// One batch of the original, as its tables hold it.
#[derive(Debug, Clone)]
pub struct LegacyBatch {
    pub id: String,
    pub correlation_id: String,
    pub class_id: Option<String>,
    pub status: String,
    pub pipeline: Option<Value>,
    pub context: Option<Value>,
    pub total_essays: Option<i32>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub essays: Vec<LegacyEssay>,
    pub log: Vec<LegacyPhaseLog>,
    pub outbox: Vec<LegacyOutboxRow>,
}

#[derive(Debug, Clone)]
pub struct LegacyEssay {
    pub essay_id: String,
    pub content_reference: Value,
}

/// A `phase_status_log` row.
#[derive(Debug, Clone)]
pub struct LegacyPhaseLog {
    pub phase: String,
    pub status: String,
    pub correlation_id: String,
    pub completed_at: Option<Timestamp>,
    pub metadata: Option<Value>,
    pub created_at: Timestamp,
}

/// An unpublished `event_outbox` row.
#[derive(Debug, Clone)]
pub struct LegacyOutboxRow {
    pub id: Uuid,
    pub key: String,
    pub topic: String,
    pub event_data: Value,
}

/// What the import did (or, in a dry run, would do) with one batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Imported {
        status: String,
        run: Option<Uuid>,
        outbox_rows: usize,
    },
    /// bos already has a batch with this id.
    Skipped,
    Refused {
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchResult {
    pub batch_id: String,
    #[serde(flatten)]
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    pub dry_run: bool,
    pub batches: Vec<BatchResult>,
    pub imported: usize,
    pub skipped: usize,
    pub refused: usize,
    /// Unpublished rows of the original that belong to no batch, carried over on their own.
    pub unattached_outbox_rows: usize,
    /// Unattached rows bos cannot publish (a topic it does not know), with the reason.
    pub unattached_refused: Vec<String>,
}

impl ImportReport {
    /// One line per batch and a summary, for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let would = if self.dry_run {
            "would import"
        } else {
            "imported"
        };
        for b in &self.batches {
            match &b.verdict {
                Verdict::Imported {
                    status,
                    run,
                    outbox_rows,
                } => {
                    out += &format!("{would:<12} {}  {status}", b.batch_id);
                    if let Some(run) = run {
                        out += &format!(", run {run} in progress");
                    }
                    if *outbox_rows > 0 {
                        out += &format!(", {outbox_rows} unpublished outbox row(s)");
                    }
                    out += "\n";
                }
                Verdict::Skipped => {
                    out += &format!("{:<12} {}  already present in bos\n", "skipped", b.batch_id);
                }
                Verdict::Refused { reason } => {
                    out += &format!("{:<12} {}  {reason}\n", "refused", b.batch_id);
                }
            }
        }
        for reason in &self.unattached_refused {
            out += &format!("{:<12} outbox row: {reason}\n", "refused");
        }
        out += &format!(
            "{} batch(es) {would}, {} skipped, {} refused; {} unattached outbox row(s){}\n",
            self.imported,
            self.skipped,
            self.refused,
            self.unattached_outbox_rows,
            if self.imported == 0 && self.unattached_outbox_rows == 0 && !self.dry_run {
                " — nothing changed"
            } else {
                ""
            }
        );
        out
    }
}

// ------------------------------------------------------------ reading the source

/// The original's database, opened read-only.
pub struct Source {
    pool: PgPool,
}

impl Source {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        // Every transaction of this session is read-only: the import cannot write here.
        let pool = crate::store::postgres::open_pool(
            url,
            &[("default_transaction_read_only", "on")],
            2,
            std::time::Duration::from_secs(10),
        )
        .await
        .map_err(|e| anyhow::anyhow!("the original's database: {e}"))?;
        Ok(Self { pool })
    }

    /// The batches (all, or those named), with their essays, phase log and unpublished outbox rows;
    /// and the unpublished outbox rows that belong to none of the original's batches.
    pub async fn read(
        &self,
        only: &[String],
    ) -> anyhow::Result<(Vec<LegacyBatch>, Vec<LegacyOutboxRow>)> {
        let utc = |column: &str| format!("({column} AT TIME ZONE 'UTC')");
        let rows = sqlx::query(&format!(
            "SELECT id, correlation_id, class_id, status::text AS status, \
               pipeline_configuration::text AS pipeline, processing_metadata::text AS context, \
               total_essays, {} AS created_at, {} AS updated_at \
             FROM batches WHERE (cardinality($1::text[]) = 0 OR id = ANY($1)) ORDER BY created_at, id",
            utc("created_at"),
            utc("updated_at"),
        ))
        .bind(only)
        .fetch_all(&self.pool)
        .await?;
        let parse_json =
            |raw: Option<String>| raw.and_then(|r| serde_json::from_str::<Value>(&r).ok());
        let mut batches: Vec<LegacyBatch> = rows
            .iter()
            .map(|r| {
                Ok(LegacyBatch {
                    id: r.try_get("id")?,
                    correlation_id: r.try_get("correlation_id")?,
                    class_id: r.try_get("class_id")?,
                    status: r.try_get("status")?,
                    pipeline: parse_json(r.try_get("pipeline")?),
                    context: parse_json(r.try_get("context")?),
                    total_essays: r.try_get("total_essays")?,
                    created_at: r.try_get("created_at")?,
                    updated_at: r.try_get("updated_at")?,
                    essays: Vec::new(),
                    log: Vec::new(),
                    outbox: Vec::new(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        let ids: Vec<String> = batches.iter().map(|b| b.id.clone()).collect();
        let index: HashMap<String, usize> = ids
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, id)| (id, i))
            .collect();
        for r in sqlx::query(
            "SELECT batch_id, essay_id, content_reference::text AS reference \
             FROM batch_essays WHERE batch_id = ANY($1) ORDER BY id",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?
        {
            let batch_id: String = r.try_get("batch_id")?;
            if let Some(&i) = index.get(&batch_id) {
                batches[i].essays.push(LegacyEssay {
                    essay_id: r.try_get("essay_id")?,
                    content_reference: parse_json(r.try_get("reference")?).unwrap_or(Value::Null),
                });
            }
        }
        for r in sqlx::query(&format!(
            "SELECT batch_id, phase::text AS phase, status::text AS status, correlation_id, \
               {} AS completed_at, processing_metadata::text AS metadata, {} AS created_at \
             FROM phase_status_log WHERE batch_id = ANY($1) ORDER BY id",
            utc("phase_completed_at"),
            utc("created_at"),
        ))
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?
        {
            let batch_id: String = r.try_get("batch_id")?;
            if let Some(&i) = index.get(&batch_id) {
                batches[i].log.push(LegacyPhaseLog {
                    phase: r.try_get("phase")?,
                    status: r.try_get("status")?,
                    correlation_id: r.try_get("correlation_id")?,
                    completed_at: r.try_get("completed_at")?,
                    metadata: parse_json(r.try_get("metadata")?),
                    created_at: r.try_get("created_at")?,
                });
            }
        }
        let known: HashSet<String> = if only.is_empty() {
            ids.iter().cloned().collect()
        } else {
            sqlx::query_scalar("SELECT id FROM batches")
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .collect()
        };
        let mut unattached = Vec::new();
        for r in sqlx::query(
            "SELECT id, coalesce(event_key, aggregate_id, '') AS key, topic, event_data::text AS data \
             FROM event_outbox WHERE published_at IS NULL ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?
        {
            let row = LegacyOutboxRow {
                id: r.try_get("id")?,
                key: r.try_get("key")?,
                topic: r.try_get("topic")?,
                event_data: parse_json(r.try_get("data")?).unwrap_or(Value::Null),
            };
            match owner(&row) {
                Some(batch) if index.contains_key(&batch) => batches[index[&batch]].outbox.push(row),
                Some(batch) if known.contains(&batch) => {} // a batch not selected this time
                _ if only.is_empty() => unattached.push(row),
                _ => {}
            }
        }
        Ok((batches, unattached))
    }
}

/// The batch an outbox row belongs to: its key, or the batch its payload names.
fn owner(row: &LegacyOutboxRow) -> Option<String> {
    let data = &row.event_data["data"];
    data["batch_id"]
        .as_str()
        .or_else(|| data["entity_id"].as_str())
        .map(str::to_owned)
        .or_else(|| (!row.key.is_empty()).then(|| row.key.clone()))
}

// ------------------------------------------------------------ translating

/// A legacy batch as bos stores it.
#[derive(Debug, Clone)]
pub struct Translated {
    pub batch: Batch,
    pub transitions: Vec<PhaseTransition>,
    pub outbox: Vec<OutboundMessage>,
}

fn phase_name(raw: &str) -> Option<PhaseName> {
    match raw {
        // Databases made by the original's migrations spell it so.
        "nlp_analysis" => Some(PhaseName::Nlp),
        other => PhaseName::parse(other),
    }
}

/// The original's `phase_status_enum`, as bos's phase statuses.
fn logged_status(raw: &str) -> Option<PipelineExecutionStatus> {
    Some(match raw {
        "pending" => PipelineExecutionStatus::PendingDependencies,
        "initiated" => PipelineExecutionStatus::DispatchInitiated,
        "in_progress" => PipelineExecutionStatus::InProgress,
        "completed" => PipelineExecutionStatus::CompletedSuccessfully,
        "failed" => PipelineExecutionStatus::Failed,
        "cancelled" => PipelineExecutionStatus::Cancelled,
        _ => return None,
    })
}

fn timestamp(value: &Value) -> Option<Timestamp> {
    value
        .as_str()
        .and_then(|s| crate::contracts::time::parse(s).ok())
}

fn text(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

/// Every topic bos publishes, by name (outbox rows need the static name).
fn known_topic(topic: &str) -> Option<&'static str> {
    topics::PUBLISHED
        .iter()
        .chain(topics::DEAD_LETTER.iter().map(|(_, dlq)| dlq))
        .find(|t| **t == topic)
        .copied()
}

/// An unpublished row of the original as a bos outbox row, under the envelope's event id.
pub fn outbox_message(row: &LegacyOutboxRow) -> Result<OutboundMessage, String> {
    let topic = known_topic(&row.topic).ok_or_else(|| {
        format!(
            "outbox row {} has topic `{}`, which bos does not publish",
            row.id, row.topic
        )
    })?;
    let Value::Object(mut envelope) = row.event_data.clone() else {
        return Err(format!("outbox row {} holds no JSON object", row.id));
    };
    let headers = envelope.remove("headers");
    envelope.remove("topic");
    let event_id = envelope
        .get("event_id")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(row.id);
    let correlation_id = envelope
        .get("correlation_id")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(event_id);
    let occurred_at = envelope
        .get("event_timestamp")
        .and_then(timestamp)
        .unwrap_or_else(chrono::Utc::now);
    let traceparent = headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .and_then(text);
    Ok(OutboundMessage {
        event_id,
        topic,
        key: row.key.clone(),
        correlation_id,
        occurred_at,
        traceparent,
        payload: Value::Object(envelope).to_string(),
        raw: None,
    })
}

fn phase_state(value: &Value, fallback: PipelineExecutionStatus) -> Result<PhaseState, String> {
    if value.is_null() {
        return Ok(PhaseState::with_status(fallback));
    }
    let raw = value["status"].as_str().unwrap_or_default();
    let status = PipelineExecutionStatus::parse(raw)
        .ok_or_else(|| format!("phase status `{raw}` is not one bos knows"))?;
    let counts = &value["essay_counts"];
    let count = |k: &str| counts[k].as_i64().unwrap_or(0);
    Ok(PhaseState {
        status,
        essay_counts: EssayCounts {
            total: count("total"),
            pending_dispatch_or_processing: count("pending_dispatch_or_processing"),
            successful: count("successful"),
            failed: count("failed"),
        },
        started_at: timestamp(&value["started_at"]),
        completed_at: timestamp(&value["completed_at"]),
        error_info: Some(value["error_info"].clone()).filter(|v| !v.is_null()),
        progress_percentage: value["progress_percentage"]
            .as_f64()
            .map_or(0, |p| p.clamp(0.0, 100.0) as u8),
    })
}

/// Maps one legacy batch; `Err` is the reason it is refused.
pub fn translate(legacy: &LegacyBatch) -> Result<Translated, String> {
    let mut status = match legacy.status.as_str() {
        "processing" | "completed" | "failed" => {
            return Err(format!(
                "status `{}` exists in the original's enum but its code never writes it; bos has no equivalent",
                legacy.status
            ))
        }
        other => BatchStatus::parse(other)
            .ok_or_else(|| format!("status `{other}` is not one bos knows"))?,
    };
    let ctx = legacy.context.clone().unwrap_or(Value::Null);
    let course = ctx["course_code"].as_str().unwrap_or_default();
    let course_code = CourseCode::parse(course)
        .ok_or_else(|| format!("course code `{course}` is not one bos knows"))?;
    let user_id = text(&ctx["user_id"]).ok_or("the context has no user_id")?;
    let student_prompt_ref = match &ctx["student_prompt_ref"] {
        Value::Null => None,
        v => Some(
            serde_json::from_value::<StorageReferenceMetadata>(v.clone())
                .map_err(|e| format!("student_prompt_ref cannot be read: {e}"))?,
        ),
    };
    let mut essays = Vec::with_capacity(legacy.essays.len());
    for e in &legacy.essays {
        let text_storage_id = text(&e.content_reference["text_storage_id"])
            .ok_or_else(|| format!("essay {} has no text_storage_id", e.essay_id))?;
        essays.push(BatchEssay {
            essay_id: e.essay_id.clone(),
            text_storage_id,
            corrected_text_storage_id: None,
        });
    }
    let essay_ids: Vec<String> = essays.iter().map(|e| e.essay_id.clone()).collect();
    let context = BatchContext {
        course_code,
        expected_essay_count: ctx["expected_essay_count"]
            .as_i64()
            .or(legacy.total_essays.map(i64::from))
            .unwrap_or(essays.len() as i64),
        user_id: user_id.clone(),
        org_id: text(&ctx["org_id"]),
        class_id: text(&ctx["class_id"]).or_else(|| legacy.class_id.clone()),
        student_prompt_ref,
        cj_default_llm_model: text(&ctx["cj_default_llm_model"]),
        cj_default_temperature: ctx["cj_default_temperature"].as_f64(),
        assignment_id: text(&ctx["assignment_id"]),
        essay_ids: essay_ids.clone(),
        client_essay_ids: ctx["essay_ids"]
            .as_array()
            .map(|ids| ids.iter().filter_map(text).collect())
            .unwrap_or_default(),
    };

    // The pipeline state; the original has no student-matching phase.
    let p = legacy.pipeline.clone().unwrap_or(Value::Null);
    let skipped = PipelineExecutionStatus::SkippedByUserConfig;
    let mut requested = Vec::new();
    for raw in p["requested_pipelines"].as_array().into_iter().flatten() {
        let raw = raw.as_str().unwrap_or_default();
        requested.push(
            phase_name(raw)
                .ok_or_else(|| format!("requested phase `{raw}` is not one bos knows"))?,
        );
    }
    let nlp = if p["nlp"].is_null() {
        &p["nlp_analysis"]
    } else {
        &p["nlp"]
    };
    let matched = context.class_id.is_some()
        && !matches!(
            status,
            BatchStatus::AwaitingContentValidation
                | BatchStatus::AwaitingStudentValidation
                | BatchStatus::ContentIngestionFailed
        );
    let student_matching = match (context.class_id.is_some(), status) {
        (true, BatchStatus::AwaitingStudentValidation) => {
            PhaseState::with_status(PipelineExecutionStatus::DispatchInitiated)
        }
        (true, _) if matched => {
            PhaseState::with_status(PipelineExecutionStatus::CompletedSuccessfully)
        }
        _ => PhaseState::with_status(skipped),
    };
    let mut pipeline = PipelineState {
        batch_id: legacy.id.clone(),
        requested_pipelines: requested.clone(),
        spellcheck: phase_state(&p["spellcheck"], skipped)?,
        nlp: phase_state(nlp, skipped)?,
        cj_assessment: phase_state(&p["cj_assessment"], skipped)?,
        ai_feedback: phase_state(&p["ai_feedback"], skipped)?,
        student_matching,
        last_updated: timestamp(&p["last_updated"]).unwrap_or(legacy.updated_at),
    };

    // The phase history, as bos's phase-status log.
    let mut transitions = Vec::new();
    let mut last: BTreeMap<PhaseName, PipelineExecutionStatus> = BTreeMap::new();
    for row in &legacy.log {
        let (Some(phase), Some(to), Ok(correlation_id)) = (
            phase_name(&row.phase),
            logged_status(&row.status),
            row.correlation_id.parse::<Uuid>(),
        ) else {
            continue;
        };
        let from = row
            .metadata
            .as_ref()
            .and_then(|m| m["previous_status"].as_str())
            .and_then(PipelineExecutionStatus::parse)
            .or_else(|| last.get(&phase).copied())
            .unwrap_or(PipelineExecutionStatus::PendingDependencies);
        last.insert(phase, to);
        transitions.push(PhaseTransition {
            phase,
            from,
            to,
            correlation_id,
            completed_at: row.completed_at,
        });
    }

    // The run in progress, if a phase is in flight.
    let analysed = [
        PhaseName::Spellcheck,
        PhaseName::Nlp,
        PhaseName::CjAssessment,
        PhaseName::AiFeedback,
    ];
    let in_flight: Vec<PhaseName> = analysed
        .into_iter()
        .filter(|&ph| {
            matches!(
                pipeline.phase(ph).status,
                PipelineExecutionStatus::DispatchInitiated | PipelineExecutionStatus::InProgress
            )
        })
        .collect();
    let mut orchestration = Orchestration::default();
    let mut outbox = Vec::with_capacity(legacy.outbox.len());
    for row in &legacy.outbox {
        outbox.push(outbox_message(row)?);
    }
    for ph in analysed {
        if pipeline.phase(ph).is_completed() {
            orchestration.phase_survivors.insert(ph, essay_ids.clone());
        }
    }
    match in_flight[..] {
        [] => {}
        [current_phase] => {
            let current = requested
                .iter()
                .position(|&ph| ph == current_phase)
                .ok_or_else(|| format!("{current_phase} is in flight but not among the requested phases {requested:?}"))?;
            let started = legacy
                .log
                .iter()
                .rev()
                .find(|r| r.status == "initiated" && r.correlation_id.parse::<Uuid>().is_ok());
            let command_topic = topics::command_topic(current_phase);
            let correlation_id = started
                .and_then(|r| r.correlation_id.parse().ok())
                .or_else(|| {
                    outbox
                        .iter()
                        .find(|m| m.topic == command_topic)
                        .map(|m| m.correlation_id)
                })
                .ok_or_else(|| {
                    format!(
                        "{current_phase} is in flight but no correlation id of its run is recorded"
                    )
                })?;
            let mut dispatched = BTreeMap::new();
            let mut survivors = BTreeMap::new();
            for (i, &ph) in requested.iter().enumerate().take(current + 1) {
                dispatched.insert(ph, essay_ids.clone());
                if i < current {
                    survivors.insert(ph, essay_ids.clone());
                }
            }
            orchestration.runs_started = 1;
            orchestration.current_run = Some(Run {
                correlation_id,
                requested_pipeline: *requested.last().unwrap_or(&current_phase),
                phases: requested.clone(),
                input_essays: essay_ids.clone(),
                started_at: started.map_or(legacy.updated_at, |r| r.created_at),
                current,
                dispatched,
                survivors,
                user_id: user_id.clone(),
            });
            if status == BatchStatus::ReadyForPipelineExecution {
                // The original leaves a running batch "ready"; bos says what it is.
                status = BatchStatus::ProcessingPipelines;
            }
        }
        _ => {
            return Err(format!(
                "several phases are in flight at once ({in_flight:?}); bos runs one at a time"
            ))
        }
    }
    pipeline.requested_pipelines = requested;
    let batch = Batch {
        id: legacy.id.clone(),
        correlation_id: legacy
            .correlation_id
            .parse()
            .unwrap_or_else(|_| Uuid::new_v4()),
        status,
        context,
        essays,
        pipeline,
        orchestration,
        parked: None,
        validation_errors: Vec::new(),
        version: 1,
        created_at: legacy.created_at,
        updated_at: legacy.updated_at,
        completed_at: None,
    };
    Ok(Translated {
        batch,
        transitions,
        outbox,
    })
}

// ------------------------------------------------------------ writing

/// Imports `batches` (and the unattached rows) into `repo`, one transaction per batch.
pub async fn import(
    repo: &dyn Repository,
    batches: &[LegacyBatch],
    unattached: &[LegacyOutboxRow],
    dry_run: bool,
) -> anyhow::Result<ImportReport> {
    let mut report = ImportReport {
        dry_run,
        ..ImportReport::default()
    };
    for legacy in batches {
        let present = !repo
            .get_batches(std::slice::from_ref(&legacy.id))
            .await?
            .is_empty();
        let verdict = if present {
            Verdict::Skipped
        } else {
            match translate(legacy) {
                Err(reason) => Verdict::Refused { reason },
                Ok(t) => {
                    let imported = Verdict::Imported {
                        status: t.batch.status.as_str().to_owned(),
                        run: t
                            .batch
                            .orchestration
                            .current_run
                            .as_ref()
                            .map(|r| r.correlation_id),
                        outbox_rows: t.outbox.len(),
                    };
                    if dry_run {
                        imported
                    } else {
                        let committed = repo
                            .commit(UnitOfWork {
                                writes: vec![BatchWrite {
                                    essays_changed: true,
                                    batch: t.batch,
                                    expected_version: None,
                                    transitions: t.transitions,
                                    snapshots: Vec::new(),
                                }],
                                inbox: Vec::new(),
                                outbox: t.outbox,
                            })
                            .await
                            .map_err(|e| anyhow::anyhow!("importing batch {}: {e}", legacy.id))?;
                        if committed.conflicts.contains(&legacy.id) {
                            Verdict::Skipped
                        } else {
                            imported
                        }
                    }
                }
            }
        };
        match &verdict {
            Verdict::Imported { .. } => report.imported += 1,
            Verdict::Skipped => report.skipped += 1,
            Verdict::Refused { .. } => report.refused += 1,
        }
        report.batches.push(BatchResult {
            batch_id: legacy.id.clone(),
            verdict,
        });
    }
    let mut rows = Vec::new();
    for row in unattached {
        match outbox_message(row) {
            Ok(m) => rows.push(m),
            Err(reason) => report.unattached_refused.push(reason),
        }
    }
    // Rows already carried over by an earlier run are not counted again.
    let mut fresh = Vec::new();
    for m in rows {
        let present = repo
            .outbox_rows(Some(&m.key))
            .await?
            .iter()
            .any(|r| r.id == m.event_id);
        if !present {
            fresh.push(m);
        }
    }
    report.unattached_outbox_rows = fresh.len();
    if !dry_run && !fresh.is_empty() {
        repo.commit(UnitOfWork {
            outbox: fresh,
            ..UnitOfWork::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("importing unattached outbox rows: {e}"))?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn legacy(status: &str, pipeline: Value) -> LegacyBatch {
        let now = chrono::Utc::now();
        LegacyBatch {
            id: "b-1".into(),
            correlation_id: Uuid::new_v4().to_string(),
            class_id: None,
            status: status.into(),
            pipeline: Some(pipeline),
            context: Some(json!({"course_code": "ENG5", "user_id": "t-1", "expected_essay_count": 2,
                "essay_ids": null, "student_prompt_ref": null, "org_id": "o-1", "class_id": null})),
            total_essays: Some(2),
            created_at: now,
            updated_at: now,
            essays: ["e-1", "e-2"]
                .iter()
                .map(|id| LegacyEssay {
                    essay_id: (*id).into(),
                    content_reference: json!({"text_storage_id": format!("s-{id}"), "type": "text_content"}),
                })
                .collect(),
            log: Vec::new(),
            outbox: Vec::new(),
        }
    }

    fn phase(status: &str) -> Value {
        json!({"status": status, "essay_counts": null, "started_at": null,
               "completed_at": "2026-03-14T09:26:53.589000", "error_info": null, "progress_percentage": 0})
    }

    #[test]
    fn a_phase_in_flight_becomes_the_run_in_progress() {
        let corr = Uuid::new_v4();
        let mut b = legacy(
            "ready_for_pipeline_execution",
            json!({"batch_id": "b-1", "requested_pipelines": ["spellcheck", "nlp_analysis"],
                   "spellcheck": phase("completed_successfully"), "nlp_analysis": phase("in_progress"),
                   "cj_assessment": phase("skipped_by_user_config"), "ai_feedback": phase("skipped_by_user_config"),
                   "last_updated": "2026-03-14T09:26:53.589000"}),
        );
        b.log.push(LegacyPhaseLog {
            phase: "spellcheck".into(),
            status: "initiated".into(),
            correlation_id: corr.to_string(),
            completed_at: None,
            metadata: Some(json!({"previous_status": "pending_dependencies"})),
            created_at: chrono::Utc::now(),
        });
        let t = translate(&b).unwrap();
        assert_eq!(t.batch.status, BatchStatus::ProcessingPipelines);
        let run = t.batch.orchestration.current_run.unwrap();
        assert_eq!((run.correlation_id, run.current), (corr, 1));
        assert_eq!(run.phases, [PhaseName::Spellcheck, PhaseName::Nlp]);
        assert_eq!(t.transitions.len(), 1);
        assert_eq!(
            t.transitions[0].to,
            PipelineExecutionStatus::DispatchInitiated
        );
    }

    #[test]
    fn states_bos_cannot_represent_are_refused_with_the_reason() {
        let idle = json!({"requested_pipelines": ["spellcheck"], "spellcheck": phase("pending_dependencies")});
        let e = translate(&legacy("processing", idle.clone())).unwrap_err();
        assert!(e.contains("never writes it"), "{e}");
        let two = json!({"requested_pipelines": ["spellcheck", "nlp"], "spellcheck": phase("in_progress"),
                         "nlp": phase("dispatch_initiated")});
        assert!(translate(&legacy("ready_for_pipeline_execution", two))
            .unwrap_err()
            .contains("several phases"));
        let no_corr = json!({"requested_pipelines": ["spellcheck"], "spellcheck": phase("dispatch_initiated")});
        assert!(translate(&legacy("ready_for_pipeline_execution", no_corr))
            .unwrap_err()
            .contains("no correlation id"));
    }

    #[test]
    fn outbox_rows_keep_their_event_ids_and_drop_the_bookkeeping_keys() {
        let event_id = Uuid::new_v4();
        let row = LegacyOutboxRow {
            id: Uuid::new_v4(),
            key: "b-1".into(),
            topic: topics::SPELLCHECK_COMMAND.into(),
            event_data: json!({"event_id": event_id, "event_type": topics::SPELLCHECK_COMMAND,
                "correlation_id": Uuid::nil(), "event_timestamp": "2026-03-14T09:26:53.589000Z",
                "data": {"batch_id": "b-1"}, "topic": topics::SPELLCHECK_COMMAND,
                "headers": {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}),
        };
        let m = outbox_message(&row).unwrap();
        assert_eq!(m.event_id, event_id);
        assert!(m.traceparent.is_some());
        let envelope = m.envelope();
        assert!(envelope.get("topic").is_none() && envelope.get("headers").is_none());
        let unknown = LegacyOutboxRow {
            topic: "elsewhere".into(),
            ..row
        };
        assert!(outbox_message(&unknown).is_err());
    }
}
