//! PostgreSQL repository (sqlx). Every batch write is
//! `UPDATE … SET …, version = version + 1 WHERE id = $1 AND version = $2`.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::{
    Change, ChangeOutcome, EnumDomains, Fault, OutboxRow, OutboxStats, PhaseStatusChange,
    Repository, StoreError, StoreResult,
};
use crate::contracts::{self, BatchStatus, PhaseName, PipelineExecutionStatus, Timestamp};
use crate::domain::{Batch, BatchContext, BatchEssay, PipelineState};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connection settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PostgresSettings {
    pub url: String,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub statement_timeout: Duration,
}

impl PostgresSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
pub struct PgRepository {
    pool: PgPool,
    fault: Mutex<Option<Fault>>,
}

const BATCH_COLUMNS: &str = "b.id, b.correlation_id, b.status, b.context, b.pipeline_state, \
     b.orchestration, b.parked_request, b.error_details, b.version, b.created_at, b.updated_at, \
     b.completed_at, (SELECT coalesce(jsonb_agg(jsonb_build_object( \
        'essay_id', e.essay_id, 'text_storage_id', e.text_storage_id, \
        'corrected_text_storage_id', e.corrected_text_storage_id) ORDER BY e.position), '[]'::jsonb) \
      FROM batch_essays e WHERE e.batch_id = b.id) AS essays";

fn json<T: DeserializeOwned>(row: &PgRow, column: &str, id: &str) -> StoreResult<T> {
    let Json(value): Json<T> = row.try_get(column).map_err(|e| StoreError::Corrupt {
        id: id.to_owned(),
        error: format!("{column}: {e}"),
    })?;
    Ok(value)
}

fn batch_from_row(row: &PgRow) -> StoreResult<Batch> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let status = BatchStatus::parse(&status).ok_or_else(|| StoreError::Corrupt {
        id: id.clone(),
        error: format!("unknown status `{status}`"),
    })?;
    Ok(Batch {
        correlation_id: row.try_get("correlation_id")?,
        status,
        context: json(row, "context", &id)?,
        essays: json(row, "essays", &id)?,
        pipeline: json(row, "pipeline_state", &id)?,
        orchestration: json(row, "orchestration", &id)?,
        parked: json(row, "parked_request", &id)?,
        validation_errors: json(row, "error_details", &id)?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        completed_at: row.try_get("completed_at")?,
        id,
    })
}

impl PgRepository {
    pub async fn connect(settings: &PostgresSettings) -> StoreResult<Self> {
        let options: PgConnectOptions = settings.url.parse()?;
        let timeout_ms = settings.statement_timeout.as_millis().to_string();
        let options = options.options([("statement_timeout", timeout_ms.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            // No ping on every acquire: a broken connection fails its query and is replaced.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Self::from_pool(pool))
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            fault: Mutex::new(None),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn take_fault(&self) -> Option<Fault> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    async fn swap(
        &self,
        id: &str,
        expected_version: i64,
        set: &str,
        value: Value,
    ) -> StoreResult<bool> {
        let sql = format!(
            "UPDATE batches SET {set} = $3, version = version + 1, updated_at = now() \
             WHERE id = $1 AND version = $2"
        );
        let done = sqlx::query(&sql)
            .bind(id)
            .bind(expected_version)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn column<T: DeserializeOwned>(&self, id: &str, column: &str) -> StoreResult<Option<T>> {
        let sql = format!("SELECT {column} AS value FROM batches WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| json(&r, "value", id)).transpose()
    }

    /// One change in one statement: the batch row first (a version-checked
    /// update, or an insert for a new batch), then, only when that wrote, the
    /// inbox row, the outbox rows, the essays and the snapshot. A lost race
    /// writes nothing, so no savepoint is needed.
    async fn apply_change(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        change: Change,
        fault: Option<Fault>,
    ) -> StoreResult<ChangeOutcome> {
        let b = &change.batch;
        let failed_ids = b.failed_essay_ids();
        let columns = OutboxColumns::of(&change.outbox);
        let essay_ids: Vec<&str> = b.essays.iter().map(|e| e.essay_id.as_str()).collect();
        let texts: Vec<&str> = b
            .essays
            .iter()
            .map(|e| e.text_storage_id.as_str())
            .collect();
        let corrected: Vec<Option<&str>> = b
            .essays
            .iter()
            .map(|e| e.corrected_text_storage_id.as_deref())
            .collect();
        let head = match change.expected_version {
            Some(_) => {
                "UPDATE batches SET correlation_id = $3, class_id = $4, status = $5, context = $6, \
                   pipeline_state = $7, orchestration = $8, total_essays = $9, failed_essay_ids = $10, \
                   parked_request = $11, error_details = $12, updated_at = $13, completed_at = $14, \
                   version = version + 1 \
                 WHERE id = $1 AND version = $2 RETURNING version"
            }
            None => {
                "INSERT INTO batches (id, correlation_id, class_id, status, context, pipeline_state, \
                   orchestration, total_essays, failed_essay_ids, parked_request, error_details, \
                   version, created_at, updated_at, completed_at) \
                 SELECT $1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1, $29, $13, $14 \
                 WHERE $2::bigint IS NULL \
                 ON CONFLICT (id) DO NOTHING RETURNING version"
            }
        };
        let sql = format!(
            "WITH upd AS ({head}), \
             inbox AS ( \
               INSERT INTO processed_events (event_id, topic, batch_id) \
               SELECT $15, $16, $1 FROM upd WHERE $15::uuid IS NOT NULL), \
             outbox AS ( \
               INSERT INTO event_outbox (id, topic, message_key, event_type, correlation_id, payload, traceparent, created_at) \
               SELECT t.id, t.topic, $1, t.topic, t.corr, t.payload::jsonb, t.trace, t.created \
               FROM UNNEST($17::uuid[], $18::text[], $19::uuid[], $20::text[], $21::text[], $22::timestamptz[]) \
                 WITH ORDINALITY AS t(id, topic, corr, payload, trace, created, n) \
               WHERE EXISTS (SELECT 1 FROM upd) ORDER BY t.n), \
             gone AS ( \
               DELETE FROM batch_essays WHERE $23 AND batch_id = $1 AND NOT (essay_id = ANY($24::text[])) \
                 AND EXISTS (SELECT 1 FROM upd)), \
             essays AS ( \
               INSERT INTO batch_essays (batch_id, essay_id, text_storage_id, corrected_text_storage_id, position) \
               SELECT $1, e.id, e.text_id, e.corrected, (e.n - 1)::int \
               FROM UNNEST($24::text[], $25::text[], $26::text[]) WITH ORDINALITY AS e(id, text_id, corrected, n) \
               WHERE $23 AND EXISTS (SELECT 1 FROM upd) \
               ON CONFLICT (batch_id, essay_id) DO UPDATE SET text_storage_id = EXCLUDED.text_storage_id, \
                 corrected_text_storage_id = EXCLUDED.corrected_text_storage_id, position = EXCLUDED.position), \
             snapshot AS ( \
               INSERT INTO configuration_snapshots (batch_id, correlation_id, configuration) \
               SELECT $1, $27, $28 FROM upd WHERE $28::jsonb IS NOT NULL) \
             SELECT version FROM upd"
        );
        let version: Option<i64> = sqlx::query_scalar(&sql)
            .bind(&b.id)
            .bind(change.expected_version)
            .bind(b.correlation_id)
            .bind(&b.context.class_id)
            .bind(b.status.as_str())
            .bind(Json(&b.context))
            .bind(Json(&b.pipeline))
            .bind(Json(&b.orchestration))
            .bind(b.essays.len() as i32)
            .bind(Json(&failed_ids))
            .bind(Json(&b.parked))
            .bind(Json(&b.validation_errors))
            .bind(b.updated_at)
            .bind(b.completed_at)
            .bind(change.inbox.as_ref().map(|r| r.event_id))
            .bind(change.inbox.as_ref().map(|r| r.topic.as_str()))
            .bind(&columns.ids)
            .bind(&columns.topics)
            .bind(&columns.correlations)
            .bind(&columns.payloads)
            .bind(&columns.traces)
            .bind(&columns.created)
            .bind(change.essays_changed)
            .bind(&essay_ids)
            .bind(&texts)
            .bind(&corrected)
            .bind(
                b.orchestration
                    .current_run
                    .as_ref()
                    .map(|r| r.correlation_id),
            )
            .bind(change.snapshot.as_ref())
            .bind(b.created_at)
            .fetch_optional(&mut **tx)
            .await?;
        if fault == Some(Fault::AfterOutboxInsert) {
            return Err(StoreError::Injected(Fault::AfterOutboxInsert));
        }
        let Some(version) = version else {
            if change.expected_version.is_none() {
                return Ok(ChangeOutcome::Conflict);
            }
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM batches WHERE id = $1)")
                    .bind(&b.id)
                    .fetch_one(&mut **tx)
                    .await?;
            return Ok(if exists {
                ChangeOutcome::Conflict
            } else {
                ChangeOutcome::NotFound
            });
        };
        Ok(ChangeOutcome::Applied { version })
    }
}

/// Outbox messages as column arrays for one `UNNEST` insert (all share the batch's key).
struct OutboxColumns<'a> {
    ids: Vec<Uuid>,
    topics: Vec<&'static str>,
    correlations: Vec<Uuid>,
    payloads: Vec<String>,
    traces: Vec<Option<&'a str>>,
    created: Vec<Timestamp>,
}

impl<'a> OutboxColumns<'a> {
    fn of(messages: &'a [crate::domain::OutboundMessage]) -> Self {
        Self {
            ids: messages.iter().map(|m| m.event_id).collect(),
            topics: messages.iter().map(|m| m.topic).collect(),
            correlations: messages.iter().map(|m| m.correlation_id).collect(),
            payloads: messages.iter().map(|m| m.envelope.to_string()).collect(),
            traces: messages.iter().map(|m| m.traceparent.as_deref()).collect(),
            created: messages.iter().map(|m| m.occurred_at).collect(),
        }
    }
}

async fn write_essays(
    conn: &mut sqlx::PgConnection,
    batch_id: &str,
    essays: &[BatchEssay],
) -> StoreResult<()> {
    sqlx::query("DELETE FROM batch_essays WHERE batch_id = $1")
        .bind(batch_id)
        .execute(&mut *conn)
        .await?;
    let ids: Vec<&str> = essays.iter().map(|e| e.essay_id.as_str()).collect();
    let texts: Vec<&str> = essays.iter().map(|e| e.text_storage_id.as_str()).collect();
    let corrected: Vec<Option<&str>> = essays
        .iter()
        .map(|e| e.corrected_text_storage_id.as_deref())
        .collect();
    sqlx::query(
        "INSERT INTO batch_essays (batch_id, essay_id, text_storage_id, corrected_text_storage_id, position) \
         SELECT $1, essay_id, text_id, corrected_id, (n - 1)::int \
         FROM UNNEST($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS t(essay_id, text_id, corrected_id, n) \
         ON CONFLICT (batch_id, essay_id) DO UPDATE SET text_storage_id = EXCLUDED.text_storage_id, \
           corrected_text_storage_id = EXCLUDED.corrected_text_storage_id, position = EXCLUDED.position",
    )
    .bind(batch_id)
    .bind(&ids)
    .bind(&texts)
    .bind(&corrected)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn outbox_from_row(row: &PgRow) -> StoreResult<OutboxRow> {
    Ok(OutboxRow {
        id: row.try_get("id")?,
        seq: row.try_get("seq")?,
        topic: row.try_get("topic")?,
        key: row.try_get("message_key")?,
        event_type: row.try_get("event_type")?,
        correlation_id: row.try_get("correlation_id")?,
        payload: row.try_get("payload")?,
        traceparent: row.try_get("traceparent")?,
        created_at: row.try_get("created_at")?,
        published_at: row.try_get("published_at")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_error: row.try_get("last_error")?,
        claimed_until: row.try_get("claimed_until")?,
    })
}

#[async_trait]
impl Repository for PgRepository {
    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn enum_domains(&self) -> StoreResult<EnumDomains> {
        let rows = sqlx::query(
            "SELECT rel.relname AS table_name, att.attname AS column_name, \
                    pg_get_constraintdef(con.oid) AS definition \
             FROM pg_constraint con \
             JOIN pg_class rel ON rel.oid = con.conrelid \
             JOIN pg_namespace ns ON ns.oid = rel.relnamespace \
             JOIN pg_attribute att ON att.attrelid = con.conrelid AND att.attnum = ANY (con.conkey) \
             WHERE con.contype = 'c' AND ns.nspname = current_schema()",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut domains = EnumDomains::new();
        for row in rows {
            let table: String = row.try_get("table_name")?;
            let column: String = row.try_get("column_name")?;
            let definition: String = row.try_get("definition")?;
            let values: BTreeSet<String> = definition
                .split('\'')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect();
            domains.insert(format!("{table}.{column}"), values);
        }
        Ok(domains)
    }

    async fn get_batches(&self, ids: &[String]) -> StoreResult<Vec<Batch>> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches b WHERE b.id = ANY($1)");
        let rows = sqlx::query(&sql).bind(ids).fetch_all(&self.pool).await?;
        rows.iter().map(batch_from_row).collect()
    }

    async fn get_batch_by_id(&self, id: &str) -> StoreResult<Option<Batch>> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches b WHERE b.id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(batch_from_row).transpose()
    }

    async fn update_batch_status(
        &self,
        id: &str,
        expected_version: i64,
        status: BatchStatus,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE batches SET status = $3, version = version + 1, updated_at = now() \
             WHERE id = $1 AND version = $2",
        )
        .bind(id)
        .bind(expected_version)
        .bind(status.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn store_batch_context(
        &self,
        id: &str,
        expected_version: i64,
        context: &BatchContext,
    ) -> StoreResult<bool> {
        let value = serde_json::to_value(context).map_err(|e| StoreError::Corrupt {
            id: id.to_owned(),
            error: e.to_string(),
        })?;
        self.swap(id, expected_version, "context", value).await
    }

    async fn get_batch_context(&self, id: &str) -> StoreResult<Option<BatchContext>> {
        self.column(id, "context").await
    }

    async fn store_batch_essays(
        &self,
        id: &str,
        expected_version: i64,
        essays: &[BatchEssay],
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE batches SET total_essays = $3, version = version + 1, updated_at = now() \
             WHERE id = $1 AND version = $2",
        )
        .bind(id)
        .bind(expected_version)
        .bind(essays.len() as i32)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        write_essays(&mut tx, id, essays).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn get_batch_essays(&self, id: &str) -> StoreResult<Option<Vec<BatchEssay>>> {
        Ok(self.get_batch_by_id(id).await?.map(|b| b.essays))
    }

    async fn get_processing_pipeline_state(&self, id: &str) -> StoreResult<Option<PipelineState>> {
        self.column(id, "pipeline_state").await
    }

    async fn save_processing_pipeline_state(
        &self,
        id: &str,
        expected_version: i64,
        state: &PipelineState,
    ) -> StoreResult<bool> {
        let value = serde_json::to_value(state).map_err(|e| StoreError::Corrupt {
            id: id.to_owned(),
            error: e.to_string(),
        })?;
        self.swap(id, expected_version, "pipeline_state", value)
            .await
    }

    async fn update_phase_status_atomically(
        &self,
        id: &str,
        phase: PhaseName,
        expected: PipelineExecutionStatus,
        new: PipelineExecutionStatus,
        completed_at: Option<Timestamp>,
        correlation_id: Option<Uuid>,
    ) -> StoreResult<bool> {
        let completed_text = completed_at.as_ref().map(contracts::time::format);
        let logged: Option<i64> = sqlx::query_scalar(
            "WITH swapped AS ( \
               UPDATE batches SET pipeline_state = pipeline_state || jsonb_build_object($2::text, \
                   coalesce(pipeline_state -> $2, '{}'::jsonb) \
                   || jsonb_build_object('status', $4::text) \
                   || CASE WHEN $5::text IS NULL THEN '{}'::jsonb \
                           ELSE jsonb_build_object('completed_at', $5::text) END), \
                 version = version + 1, updated_at = now() \
               WHERE id = $1 \
                 AND coalesce(pipeline_state -> $2 ->> 'status', 'pending_dependencies') = $3 \
               RETURNING id) \
             INSERT INTO phase_status_log (batch_id, phase, old_status, new_status, correlation_id, completed_at) \
             SELECT id, $2, $3, $4, $6, $7 FROM swapped RETURNING id",
        )
        .bind(id)
        .bind(phase.as_str())
        .bind(expected.as_str())
        .bind(new.as_str())
        .bind(completed_text)
        .bind(correlation_id)
        .bind(completed_at)
        .fetch_optional(&self.pool)
        .await?;
        Ok(logged.is_some())
    }

    async fn get_phase_status_history(
        &self,
        id: &str,
        phase: Option<PhaseName>,
    ) -> StoreResult<Vec<PhaseStatusChange>> {
        let rows = sqlx::query(
            "SELECT batch_id, phase, old_status, new_status, correlation_id, completed_at \
             FROM phase_status_log WHERE batch_id = $1 AND ($2::text IS NULL OR phase = $2) ORDER BY id",
        )
        .bind(id)
        .bind(phase.map(PhaseName::as_str))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let corrupt = |what: &str| StoreError::Corrupt {
                    id: id.to_owned(),
                    error: format!("phase_status_log.{what}"),
                };
                let phase: String = row.try_get("phase")?;
                let old: String = row.try_get("old_status")?;
                let new: String = row.try_get("new_status")?;
                Ok(PhaseStatusChange {
                    batch_id: row.try_get("batch_id")?,
                    phase: PhaseName::parse(&phase).ok_or_else(|| corrupt("phase"))?,
                    old_status: PipelineExecutionStatus::parse(&old)
                        .ok_or_else(|| corrupt("old_status"))?,
                    new_status: PipelineExecutionStatus::parse(&new)
                        .ok_or_else(|| corrupt("new_status"))?,
                    correlation_id: row.try_get("correlation_id")?,
                    completed_at: row.try_get("completed_at")?,
                })
            })
            .collect()
    }

    async fn apply(&self, changes: Vec<Change>) -> StoreResult<Vec<ChangeOutcome>> {
        let fault = self.take_fault();
        let mut tx = self.pool.begin().await?;
        // Events applied before: one look-up for the whole list. An event that
        // another worker records concurrently trips the inbox's primary key
        // instead, failing the transaction, and the retry then sees it here.
        let events: Vec<Uuid> = changes
            .iter()
            .filter_map(|c| c.inbox.as_ref().map(|r| r.event_id))
            .collect();
        let mut seen: std::collections::HashSet<Uuid> = if events.is_empty() {
            Default::default()
        } else {
            sqlx::query_scalar::<_, Uuid>(
                "SELECT event_id FROM processed_events WHERE event_id = ANY($1)",
            )
            .bind(&events)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect()
        };
        let mut outcomes = Vec::with_capacity(changes.len());
        let mut failed = std::collections::HashSet::new();
        for change in changes {
            let id = change.batch.id.clone();
            let event = change.inbox.as_ref().map(|r| r.event_id);
            // A later change to a batch was decided on top of the earlier one.
            let outcome = if failed.contains(&id) {
                ChangeOutcome::Conflict
            } else if event.is_some_and(|e| seen.contains(&e)) {
                ChangeOutcome::Duplicate
            } else {
                self.apply_change(&mut tx, change, fault).await?
            };
            match outcome {
                ChangeOutcome::Applied { .. } => seen.extend(event),
                _ => {
                    failed.insert(id);
                }
            }
            outcomes.push(outcome);
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn inbox_contains(&self, event_id: Uuid) -> StoreResult<bool> {
        Ok(
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM processed_events WHERE event_id = $1)",
            )
            .bind(event_id)
            .fetch_one(&self.pool)
            .await?,
        )
    }

    async fn outbox_rows(&self, key: Option<&str>) -> StoreResult<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT * FROM event_outbox WHERE ($1::text IS NULL OR message_key = $1) ORDER BY seq",
        )
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_from_row).collect()
    }

    async fn configuration_snapshots(&self, id: &str) -> StoreResult<Vec<Value>> {
        Ok(sqlx::query_scalar(
            "SELECT configuration FROM configuration_snapshots WHERE batch_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn claim_outbox(&self, keys: i64, lease: Duration) -> StoreResult<Vec<OutboxRow>> {
        let mut tx = self.pool.begin().await?;
        let heads: Vec<String> = sqlx::query_scalar(
            "SELECT o.message_key FROM event_outbox o \
             WHERE o.published_at IS NULL AND o.next_attempt_at <= now() \
               AND (o.claimed_until IS NULL OR o.claimed_until < now()) \
               AND NOT EXISTS (SELECT 1 FROM event_outbox p WHERE p.message_key = o.message_key \
                               AND p.published_at IS NULL AND p.seq < o.seq) \
             ORDER BY o.seq LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(keys)
        .fetch_all(&mut *tx)
        .await?;
        if heads.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "UPDATE event_outbox SET claimed_until = now() + $2 \
             WHERE published_at IS NULL AND message_key = ANY($1) \
               AND (claimed_until IS NULL OR claimed_until < now()) \
             RETURNING *",
        )
        .bind(&heads)
        .bind(lease)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut rows: Vec<OutboxRow> = rows
            .iter()
            .map(outbox_from_row)
            .collect::<StoreResult<_>>()?;
        rows.sort_by_key(|r| r.seq);
        Ok(rows)
    }

    async fn settle_outbox(
        &self,
        published: &[Uuid],
        failed: &[(Uuid, String, Timestamp)],
        released: &[Uuid],
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        if !published.is_empty() {
            sqlx::query(
                "UPDATE event_outbox SET published_at = now(), claimed_until = NULL, \
                   attempts = attempts + 1, last_error = NULL WHERE id = ANY($1)",
            )
            .bind(published)
            .execute(&mut *tx)
            .await?;
        }
        if !failed.is_empty() {
            let ids: Vec<Uuid> = failed.iter().map(|f| f.0).collect();
            let errors: Vec<&str> = failed.iter().map(|f| f.1.as_str()).collect();
            let next: Vec<Timestamp> = failed.iter().map(|f| f.2).collect();
            sqlx::query(
                "UPDATE event_outbox o SET attempts = o.attempts + 1, last_error = f.error, \
                   next_attempt_at = f.next, claimed_until = NULL \
                 FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) AS f(id, error, next) \
                 WHERE o.id = f.id",
            )
            .bind(&ids)
            .bind(&errors)
            .bind(&next)
            .execute(&mut *tx)
            .await?;
        }
        if !released.is_empty() {
            sqlx::query("UPDATE event_outbox SET claimed_until = NULL WHERE id = ANY($1)")
                .bind(released)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn purge_outbox(&self, before: Timestamp, limit: i64) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM event_outbox WHERE id IN (SELECT id FROM event_outbox \
               WHERE published_at IS NOT NULL AND published_at < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn outbox_stats(&self) -> StoreResult<OutboxStats> {
        let row = sqlx::query(
            "SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS age \
             FROM event_outbox WHERE published_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(OutboxStats {
            unpublished: row.try_get("n")?,
            oldest_unpublished_age_seconds: row.try_get("age")?,
        })
    }

    fn inject_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(fault);
    }
}
