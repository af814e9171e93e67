//! PostgreSQL repository (sqlx). A unit of work locks its batches in id order
//! (no deadlocks between workers), updates them with a version check, and
//! writes inbox, outbox, essays, phase log and snapshots with one statement
//! each, whatever the number of events.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::{
    BatchWrite, CommitError, Committed, EnumDomains, OutboxRow, OutboxStats, PhaseStatusChange,
    PublishFailure, Repository, StoreError, StoreResult, UnitOfWork,
};
use crate::config::DatabaseSettings;
use crate::contracts::{PhaseName, PipelineExecutionStatus, Timestamp};
use crate::domain::Batch;
use crate::metrics::Metrics;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Clone)]
pub struct PgRepository {
    pool: PgPool,
    metrics: Option<Arc<Metrics>>,
}

/// Why PostgreSQL could not be reached, in one line a person can act on.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL at {target}: {reason}")]
pub struct ConnectError {
    pub target: String,
    pub reason: String,
    #[source]
    pub source: sqlx::Error,
}

fn describe_connect_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused (is the server running and listening there?)".to_owned()
        }
        sqlx::Error::Io(io) => format!("{io}"),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01" | "28000") => format!("authentication failed ({})", db.message()),
            Some("3D000") => format!("the database does not exist ({})", db.message()),
            _ => db.message().to_owned(),
        },
        sqlx::Error::PoolTimedOut => "timed out waiting for a connection".to_owned(),
        sqlx::Error::Configuration(c) => format!("invalid database URL: {c}"),
        other => other.to_string(),
    }
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
    let status =
        crate::contracts::BatchStatus::parse(&status).ok_or_else(|| StoreError::Corrupt {
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

fn to_json<T: serde::Serialize>(value: &T, id: &str) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt {
        id: id.to_owned(),
        error: e.to_string(),
    })
}

macro_rules! update_batches {
    () => {
        "UPDATE batches b SET correlation_id = u.correlation_id, class_id = u.class_id, \
           status = u.status, context = u.context::jsonb, pipeline_state = u.pipeline::jsonb, \
           orchestration = u.orchestration::jsonb, total_essays = u.total, \
           failed_essay_ids = u.failed::jsonb, parked_request = u.parked::jsonb, \
           error_details = u.errors::jsonb, updated_at = u.updated, \
           completed_at = u.completed, version = b.version + 1 \
         FROM UNNEST($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], $6::text[], \
                     $7::text[], $8::text[], $9::int[], $10::text[], $11::text[], $12::text[], \
                     $13::timestamptz[], $14::timestamptz[]) \
           AS u(id, expected, correlation_id, class_id, status, context, pipeline, \
                orchestration, total, failed, parked, errors, updated, completed) \
         WHERE b.id = u.id AND b.version = u.expected"
    };
}

/// Rewrites each batch of a [`BatchColumns`] whose version is still the one
/// decided on (the version check, per row).
pub(crate) const UPDATE_BATCHES: &str = update_batches!();
const UPDATE_BATCHES_RETURNING: &str = concat!(update_batches!(), " RETURNING b.id, b.version");

/// The batch columns of many writes, as arrays for one `UNNEST` statement.
#[derive(Default)]
pub(crate) struct BatchColumns {
    pub(crate) ids: Vec<String>,
    pub(crate) expected: Vec<Option<i64>>,
    pub(crate) correlations: Vec<Uuid>,
    pub(crate) class_ids: Vec<Option<String>>,
    pub(crate) statuses: Vec<&'static str>,
    pub(crate) contexts: Vec<String>,
    pub(crate) pipelines: Vec<String>,
    pub(crate) orchestrations: Vec<String>,
    pub(crate) totals: Vec<i32>,
    pub(crate) failed: Vec<String>,
    pub(crate) parked: Vec<String>,
    pub(crate) errors: Vec<String>,
    pub(crate) created: Vec<Timestamp>,
    pub(crate) updated: Vec<Timestamp>,
    pub(crate) completed: Vec<Option<Timestamp>>,
}

impl BatchColumns {
    /// Binds the columns to [`UPDATE_BATCHES`] (or a statement with its parameters).
    pub(crate) fn bind_update<'q>(
        &'q self,
        query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.expected)
            .bind(&self.correlations)
            .bind(&self.class_ids)
            .bind(&self.statuses)
            .bind(&self.contexts)
            .bind(&self.pipelines)
            .bind(&self.orchestrations)
            .bind(&self.totals)
            .bind(&self.failed)
            .bind(&self.parked)
            .bind(&self.errors)
            .bind(&self.updated)
            .bind(&self.completed)
    }

    pub(crate) fn push(&mut self, w: &BatchWrite) -> StoreResult<()> {
        let b = &w.batch;
        self.ids.push(b.id.clone());
        self.expected.push(w.expected_version);
        self.correlations.push(b.correlation_id);
        self.class_ids.push(b.context.class_id.clone());
        self.statuses.push(b.status.as_str());
        self.contexts.push(to_json(&b.context, &b.id)?);
        self.pipelines.push(to_json(&b.pipeline, &b.id)?);
        self.orchestrations.push(to_json(&b.orchestration, &b.id)?);
        self.totals
            .push(i32::try_from(b.essays.len()).unwrap_or(i32::MAX));
        self.failed.push(to_json(&b.failed_essay_ids(), &b.id)?);
        self.parked.push(to_json(&b.parked, &b.id)?);
        self.errors.push(to_json(&b.validation_errors, &b.id)?);
        self.created.push(b.created_at);
        self.updated.push(b.updated_at);
        self.completed.push(b.completed_at);
        Ok(())
    }
}

impl PgRepository {
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, ConnectError> {
        let timeout_ms = settings.statement_timeout.as_millis().to_string();
        let pool = open_pool(
            settings.url.expose(),
            &[("statement_timeout", timeout_ms.as_str())],
            settings.max_connections,
            settings.acquire_timeout,
        )
        .await?;
        Ok(Self::from_pool(pool))
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            metrics: None,
        }
    }

    /// Records query durations and pool figures in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn observe(&self, operation: &str, started: Instant, ok: bool) {
        if let Some(m) = &self.metrics {
            m.observe_query(operation, started.elapsed(), ok);
        }
    }

    async fn begin(&self) -> StoreResult<Transaction<'static, Postgres>> {
        let started = Instant::now();
        let tx = self.pool.begin().await;
        if let Some(m) = &self.metrics {
            m.db_acquire_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(tx?)
    }

    async fn commit_inner(&self, unit: UnitOfWork) -> Result<Committed, CommitError> {
        let mut committed = Committed::default();
        let mut tx = self.begin().await?;
        // 1. Lock every batch to update, in id order, and read its version.
        let mut updates: Vec<&BatchWrite> = unit
            .writes
            .iter()
            .filter(|w| w.expected_version.is_some())
            .collect();
        updates.sort_by(|a, b| a.batch.id.cmp(&b.batch.id));
        let update_ids: Vec<String> = updates.iter().map(|w| w.batch.id.clone()).collect();
        let current: BTreeMap<String, i64> = if update_ids.is_empty() {
            BTreeMap::new()
        } else {
            sqlx::query_as::<_, (String, i64)>(
                "SELECT id, version FROM batches WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            )
            .bind(&update_ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::from)?
            .into_iter()
            .collect()
        };
        let mut winners: BTreeSet<String> = BTreeSet::new();
        let mut columns = BatchColumns::default();
        for w in &updates {
            match current.get(&w.batch.id) {
                None => {
                    committed.missing.insert(w.batch.id.clone());
                }
                Some(&v) if Some(v) != w.expected_version => {
                    committed.conflicts.insert(w.batch.id.clone());
                }
                Some(_) => columns.push(w)?,
            }
        }
        // 2. The updates that can win, in one statement.
        if !columns.ids.is_empty() {
            let rows: Vec<(String, i64)> = columns
                .bind_update(sqlx::query(UPDATE_BATCHES_RETURNING))
                .fetch_all(&mut *tx)
                .await
                .map_err(StoreError::from)?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)?;
            for (id, version) in rows {
                winners.insert(id.clone());
                committed.versions.insert(id, version);
            }
            for id in &columns.ids {
                if !winners.contains(id) {
                    committed.conflicts.insert(id.clone());
                }
            }
        }
        // 3. New batches.
        let mut creates = BatchColumns::default();
        for w in unit.writes.iter().filter(|w| w.expected_version.is_none()) {
            creates.push(w)?;
        }
        if !creates.ids.is_empty() {
            let created: Vec<String> = sqlx::query_scalar(
                "INSERT INTO batches (id, correlation_id, class_id, status, context, pipeline_state, \
                   orchestration, total_essays, failed_essay_ids, parked_request, error_details, \
                   version, created_at, updated_at, completed_at) \
                 SELECT u.id, u.correlation_id, u.class_id, u.status, u.context::jsonb, u.pipeline::jsonb, \
                   u.orchestration::jsonb, u.total, u.failed::jsonb, u.parked::jsonb, u.errors::jsonb, \
                   1, u.created, u.updated, u.completed \
                 FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], \
                             $7::text[], $8::int[], $9::text[], $10::text[], $11::text[], \
                             $12::timestamptz[], $13::timestamptz[], $14::timestamptz[]) \
                   AS u(id, correlation_id, class_id, status, context, pipeline, orchestration, total, \
                        failed, parked, errors, created, updated, completed) \
                 ORDER BY u.id \
                 ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .bind(&creates.ids)
            .bind(&creates.correlations)
            .bind(&creates.class_ids)
            .bind(&creates.statuses)
            .bind(&creates.contexts)
            .bind(&creates.pipelines)
            .bind(&creates.orchestrations)
            .bind(&creates.totals)
            .bind(&creates.failed)
            .bind(&creates.parked)
            .bind(&creates.errors)
            .bind(&creates.created)
            .bind(&creates.updated)
            .bind(&creates.completed)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::from)?;
            let created: BTreeSet<String> = created.into_iter().collect();
            for id in creates.ids {
                if created.contains(&id) {
                    committed.versions.insert(id.clone(), 1);
                    winners.insert(id);
                } else {
                    committed.conflicts.insert(id);
                }
            }
        }
        // Rows of a batch with a write go in only when the write won.
        let written = unit.batch_ids();
        let keeps = |batch_id: &str| winners.contains(batch_id) || !written.contains(batch_id);
        // 4. The inbox, in event-id order.
        let mut inbox: Vec<_> = unit.inbox.iter().filter(|r| keeps(&r.batch_id)).collect();
        inbox.sort_by_key(|r| r.event_id);
        if !inbox.is_empty() {
            let ids: Vec<Uuid> = inbox.iter().map(|r| r.event_id).collect();
            let topics: Vec<&str> = inbox.iter().map(|r| r.topic.as_str()).collect();
            let batches: Vec<&str> = inbox.iter().map(|r| r.batch_id.as_str()).collect();
            let inserted: HashSet<Uuid> = sqlx::query_scalar(
                "INSERT INTO processed_events (event_id, topic, batch_id) \
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[]) \
                 ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            )
            .bind(&ids)
            .bind(&topics)
            .bind(&batches)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::from)?
            .into_iter()
            .collect();
            let mut raced = BTreeSet::new();
            for r in &inbox {
                if !inserted.contains(&r.event_id) {
                    if winners.contains(&r.batch_id) {
                        raced.insert(r.event_id);
                    } else {
                        committed.already_processed.insert(r.event_id);
                    }
                }
            }
            if !raced.is_empty() {
                tx.rollback().await.map_err(StoreError::from)?;
                return Err(CommitError::Processed(raced));
            }
        }
        // 5. Essays of the batches whose essays changed.
        let changed: Vec<&BatchWrite> = unit
            .writes
            .iter()
            .filter(|w| w.essays_changed && winners.contains(&w.batch.id))
            .collect();
        if !changed.is_empty() {
            let ids: Vec<&str> = changed.iter().map(|w| w.batch.id.as_str()).collect();
            let (mut batch, mut essay, mut text, mut corrected, mut position) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for w in &changed {
                for (i, e) in w.batch.essays.iter().enumerate() {
                    batch.push(w.batch.id.as_str());
                    essay.push(e.essay_id.as_str());
                    text.push(e.text_storage_id.as_str());
                    corrected.push(e.corrected_text_storage_id.as_deref());
                    position.push(i32::try_from(i).unwrap_or(i32::MAX));
                }
            }
            // Essays no longer in their batch go; the rest are written in
            // place (a corrected text id is an update of one row, not a
            // delete and an insert with their index entries).
            sqlx::query(
                "DELETE FROM batch_essays e WHERE e.batch_id = ANY($1) AND NOT EXISTS ( \
                   SELECT 1 FROM UNNEST($2::text[], $3::text[]) AS k(batch_id, essay_id) \
                   WHERE k.batch_id = e.batch_id AND k.essay_id = e.essay_id)",
            )
            .bind(&ids)
            .bind(&batch)
            .bind(&essay)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
            sqlx::query(
                "INSERT INTO batch_essays AS e (batch_id, essay_id, text_storage_id, corrected_text_storage_id, position) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int[]) \
                 ON CONFLICT (batch_id, essay_id) DO UPDATE SET text_storage_id = excluded.text_storage_id, \
                   corrected_text_storage_id = excluded.corrected_text_storage_id, position = excluded.position \
                 WHERE (e.text_storage_id, e.corrected_text_storage_id, e.position) \
                   IS DISTINCT FROM (excluded.text_storage_id, excluded.corrected_text_storage_id, excluded.position)",
            )
            .bind(&batch)
            .bind(&essay)
            .bind(&text)
            .bind(&corrected)
            .bind(&position)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        }
        // 6. The outbox, in decision order; dead letters once per id.
        let letters: Vec<_> = unit.outbox.iter().filter(|m| m.raw.is_some()).collect();
        if !letters.is_empty() {
            let ids: Vec<Uuid> = letters.iter().map(|m| m.event_id).collect();
            let topics: Vec<&str> = letters.iter().map(|m| m.topic).collect();
            let keys: Vec<&str> = letters.iter().map(|m| m.key.as_str()).collect();
            let created: Vec<Timestamp> = letters.iter().map(|m| m.occurred_at).collect();
            let raw_keys: Vec<Option<&[u8]>> = letters
                .iter()
                .map(|m| m.raw.as_ref().and_then(|r| r.key.as_deref()))
                .collect();
            let raw_payloads: Vec<&[u8]> = letters
                .iter()
                .map(|m| m.raw.as_ref().map_or(&[][..], |r| r.payload.as_slice()))
                .collect();
            let headers: Vec<String> = letters
                .iter()
                .map(|m| {
                    serde_json::to_string(&m.raw.as_ref().map(|r| &r.headers)).unwrap_or_default()
                })
                .collect();
            sqlx::query(
                "INSERT INTO event_outbox (id, topic, message_key, event_type, correlation_id, payload, \
                   created_at, raw_key, raw_payload, headers) \
                 SELECT t.id, t.topic, t.key, t.topic, t.id, '', t.created, t.raw_key, t.raw_payload, t.headers::jsonb \
                 FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::bytea[], $6::bytea[], $7::text[]) \
                   WITH ORDINALITY AS t(id, topic, key, created, raw_key, raw_payload, headers, n) \
                 ORDER BY t.n \
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(&ids)
            .bind(&topics)
            .bind(&keys)
            .bind(&created)
            .bind(&raw_keys)
            .bind(&raw_payloads)
            .bind(&headers)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        }
        let outbox: Vec<_> = unit
            .outbox
            .iter()
            .filter(|m| m.raw.is_none() && keeps(&m.key))
            .collect();
        if !outbox.is_empty() {
            let ids: Vec<Uuid> = outbox.iter().map(|m| m.event_id).collect();
            let topics: Vec<&str> = outbox.iter().map(|m| m.topic).collect();
            let keys: Vec<&str> = outbox.iter().map(|m| m.key.as_str()).collect();
            let correlations: Vec<Uuid> = outbox.iter().map(|m| m.correlation_id).collect();
            let payloads: Vec<&str> = outbox.iter().map(|m| m.payload.as_str()).collect();
            let traces: Vec<Option<&str>> =
                outbox.iter().map(|m| m.traceparent.as_deref()).collect();
            // created_at is when the row was written (not decided): the
            // relay's `relay_woke` stage starts there.
            sqlx::query(
                "INSERT INTO event_outbox (id, topic, message_key, event_type, correlation_id, payload, traceparent, created_at) \
                 SELECT t.id, t.topic, t.key, t.topic, t.corr, t.payload, t.trace, clock_timestamp() \
                 FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[]) \
                   WITH ORDINALITY AS t(id, topic, key, corr, payload, trace, n) \
                 ORDER BY t.n",
            )
            .bind(&ids)
            .bind(&topics)
            .bind(&keys)
            .bind(&correlations)
            .bind(&payloads)
            .bind(&traces)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        }
        // 7. The phase-status log and 8. configuration snapshots.
        let (mut batch, mut phase, mut old, mut new, mut corr, mut done) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let (mut s_batch, mut s_corr, mut s_config) = (Vec::new(), Vec::new(), Vec::new());
        for w in unit.writes.iter().filter(|w| winners.contains(&w.batch.id)) {
            for t in &w.transitions {
                batch.push(w.batch.id.as_str());
                phase.push(t.phase.as_str());
                old.push(t.from.as_str());
                new.push(t.to.as_str());
                corr.push(t.correlation_id);
                done.push(t.completed_at);
            }
            for (correlation, config) in &w.snapshots {
                s_batch.push(w.batch.id.as_str());
                s_corr.push(*correlation);
                s_config.push(config.to_string());
            }
        }
        if !batch.is_empty() {
            sqlx::query(
                "INSERT INTO phase_status_log (batch_id, phase, old_status, new_status, correlation_id, completed_at) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::timestamptz[])",
            )
            .bind(&batch)
            .bind(&phase)
            .bind(&old)
            .bind(&new)
            .bind(&corr)
            .bind(&done)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        }
        if !s_batch.is_empty() {
            sqlx::query(
                "INSERT INTO configuration_snapshots (batch_id, correlation_id, configuration) \
                 SELECT b, c, s::jsonb FROM UNNEST($1::text[], $2::uuid[], $3::text[]) AS t(b, c, s)",
            )
            .bind(&s_batch)
            .bind(&s_corr)
            .bind(&s_config)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(committed)
    }
}

/// A pool on `url` with the session `options`, after one direct connection:
/// a pool hides why a connection failed behind a timeout, this says it.
pub async fn open_pool(
    url: &str,
    options: &[(&str, &str)],
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<PgPool, ConnectError> {
    let target = target_of(url);
    let fail = |source: sqlx::Error| ConnectError {
        target: target.clone(),
        reason: describe_connect_error(&source),
        source,
    };
    let parsed: PgConnectOptions = url.parse().map_err(fail)?;
    let parsed = parsed.options(options.iter().copied());
    let probe = sqlx::ConnectOptions::connect(&parsed);
    match tokio::time::timeout(acquire_timeout, probe).await {
        Ok(Ok(conn)) => drop(conn),
        Ok(Err(e)) => return Err(fail(e)),
        Err(_) => return Err(fail(sqlx::Error::PoolTimedOut)),
    }
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        // No ping on every acquire: a broken connection fails its query and is replaced.
        .test_before_acquire(false)
        .connect_lazy_with(parsed))
}

/// `host:port/database` of a URL, for messages (never the credentials).
fn target_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let rest = rest.split('?').next().unwrap_or(rest);
    if rest.is_empty() {
        "(empty URL)".to_owned()
    } else {
        rest.to_owned()
    }
}

/// A letter's headers as stored.
type Headers = Vec<(String, Vec<u8>)>;

fn outbox_from_row(row: &PgRow) -> StoreResult<OutboxRow> {
    let raw_payload: Option<Vec<u8>> = row.try_get("raw_payload")?;
    let raw = match raw_payload {
        None => None,
        Some(payload) => {
            let headers: Option<Json<Headers>> = row.try_get("headers")?;
            Some(crate::domain::RawRecord {
                key: row.try_get("raw_key")?,
                payload,
                headers: headers.map(|Json(h)| h).unwrap_or_default(),
            })
        }
    };
    Ok(OutboxRow {
        raw,
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
        claimed_by: row.try_get("claimed_by")?,
        claimed_until: row.try_get("claimed_until")?,
    })
}

macro_rules! timed {
    ($self:ident, $op:literal, $body:expr) => {{
        let started = Instant::now();
        let result = $body;
        $self.observe($op, started, result.is_ok());
        result
    }};
}

#[async_trait]
impl Repository for PgRepository {
    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        timed!(self, "ping", {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map(|_| ())
        })?;
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
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches b WHERE b.id = ANY($1)");
        let rows = timed!(self, "get_batches", {
            sqlx::query(&sql).bind(ids).fetch_all(&self.pool).await
        })?;
        rows.iter().map(batch_from_row).collect()
    }

    async fn processed(&self, ids: &[Uuid]) -> StoreResult<HashSet<Uuid>> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let found: Vec<Uuid> = timed!(self, "processed", {
            sqlx::query_scalar("SELECT event_id FROM processed_events WHERE event_id = ANY($1)")
                .bind(ids)
                .fetch_all(&self.pool)
                .await
        })?;
        Ok(found.into_iter().collect())
    }

    async fn commit(&self, unit: UnitOfWork) -> Result<Committed, CommitError> {
        if unit.is_empty() {
            return Ok(Committed::default());
        }
        let started = Instant::now();
        let result = self.commit_inner(unit).await;
        self.observe("commit", started, result.is_ok());
        result
    }

    async fn claim_outbox(
        &self,
        relay: Uuid,
        limit: i64,
        lease: Duration,
    ) -> StoreResult<Vec<OutboxRow>> {
        let rows = timed!(self, "claim_outbox", {
            sqlx::query(
                "WITH heads AS ( \
                   SELECT o.message_key FROM event_outbox o \
                   WHERE o.published_at IS NULL AND o.next_attempt_at <= now() \
                     AND (o.claimed_until IS NULL OR o.claimed_until < now()) \
                     AND NOT EXISTS (SELECT 1 FROM event_outbox p WHERE p.message_key = o.message_key \
                                     AND p.published_at IS NULL AND p.seq < o.seq) \
                   ORDER BY o.seq LIMIT $2 FOR UPDATE SKIP LOCKED), \
                 picked AS ( \
                   SELECT e.id FROM event_outbox e JOIN heads h ON h.message_key = e.message_key \
                   WHERE e.published_at IS NULL AND (e.claimed_until IS NULL OR e.claimed_until < now()) \
                   ORDER BY e.seq LIMIT $2) \
                 UPDATE event_outbox u SET claimed_by = $1, claimed_until = now() + $3 \
                 FROM picked WHERE u.id = picked.id \
                 RETURNING u.*",
            )
            .bind(relay)
            .bind(limit)
            .bind(lease)
            .fetch_all(&self.pool)
            .await
        })?;
        let mut rows: Vec<OutboxRow> = rows
            .iter()
            .map(outbox_from_row)
            .collect::<StoreResult<_>>()?;
        rows.sort_by_key(|r| r.seq);
        Ok(rows)
    }

    async fn renew_outbox_lease(
        &self,
        relay: Uuid,
        ids: &[Uuid],
        lease: Duration,
    ) -> StoreResult<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let done = timed!(self, "renew_outbox_lease", {
            sqlx::query(
                "UPDATE event_outbox SET claimed_until = now() + $3 \
                 WHERE id = ANY($2) AND claimed_by = $1 AND published_at IS NULL",
            )
            .bind(relay)
            .bind(ids)
            .bind(lease)
            .execute(&self.pool)
            .await
        })?;
        Ok(done.rows_affected())
    }

    async fn settle_outbox(
        &self,
        relay: Uuid,
        published: &[Uuid],
        failed: &[PublishFailure],
        released: &[Uuid],
    ) -> StoreResult<u64> {
        let started = Instant::now();
        let mut tx = self.begin().await?;
        let mut settled = 0;
        if !published.is_empty() {
            settled += sqlx::query(
                "UPDATE event_outbox SET published_at = now(), claimed_by = NULL, claimed_until = NULL, \
                   attempts = attempts + 1, last_error = NULL \
                 WHERE id = ANY($2) AND claimed_by = $1 AND published_at IS NULL",
            )
            .bind(relay)
            .bind(published)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        if !failed.is_empty() {
            let ids: Vec<Uuid> = failed.iter().map(|f| f.id).collect();
            let errors: Vec<&str> = failed.iter().map(|f| f.error.as_str()).collect();
            let next: Vec<Timestamp> = failed.iter().map(|f| f.next_attempt_at).collect();
            settled += sqlx::query(
                "UPDATE event_outbox o SET attempts = o.attempts + 1, last_error = f.error, \
                   next_attempt_at = f.next, claimed_by = NULL, claimed_until = NULL \
                 FROM UNNEST($2::uuid[], $3::text[], $4::timestamptz[]) AS f(id, error, next) \
                 WHERE o.id = f.id AND o.claimed_by = $1 AND o.published_at IS NULL",
            )
            .bind(relay)
            .bind(&ids)
            .bind(&errors)
            .bind(&next)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        if !released.is_empty() {
            settled += sqlx::query(
                "UPDATE event_outbox SET claimed_by = NULL, claimed_until = NULL \
                 WHERE id = ANY($2) AND claimed_by = $1",
            )
            .bind(relay)
            .bind(released)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        let result = tx.commit().await;
        self.observe("settle_outbox", started, result.is_ok());
        result?;
        Ok(settled)
    }

    async fn purge_outbox(&self, before: Timestamp, limit: i64) -> StoreResult<u64> {
        let done = timed!(self, "purge_outbox", {
            sqlx::query(
                "DELETE FROM event_outbox WHERE id IN (SELECT id FROM event_outbox \
                   WHERE published_at IS NOT NULL AND published_at < $1 LIMIT $2)",
            )
            .bind(before)
            .bind(limit)
            .execute(&self.pool)
            .await
        })?;
        Ok(done.rows_affected())
    }

    async fn purge_inbox(&self, before: Timestamp, limit: i64) -> StoreResult<u64> {
        let done = timed!(self, "purge_inbox", {
            sqlx::query(
                "DELETE FROM processed_events WHERE event_id IN (SELECT event_id FROM processed_events \
                   WHERE processed_at < $1 LIMIT $2)",
            )
            .bind(before)
            .bind(limit)
            .execute(&self.pool)
            .await
        })?;
        Ok(done.rows_affected())
    }

    async fn outbox_stats(&self) -> StoreResult<OutboxStats> {
        let row = timed!(self, "outbox_stats", {
            sqlx::query(
                "SELECT count(*) AS n, \
                   coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS age, \
                   count(*) FILTER (WHERE attempts > 0) AS failing \
                 FROM event_outbox WHERE published_at IS NULL",
            )
            .fetch_one(&self.pool)
            .await
        })?;
        Ok(OutboxStats {
            unpublished: row.try_get("n")?,
            oldest_unpublished_age_seconds: row.try_get("age")?,
            failing: row.try_get("failing")?,
        })
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

    async fn stuck_outbox_rows(&self, limit: i64) -> StoreResult<Vec<OutboxRow>> {
        let rows = sqlx::query(
            "SELECT * FROM event_outbox WHERE published_at IS NULL AND attempts > 0 \
             ORDER BY attempts DESC, seq LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_from_row).collect()
    }

    async fn phase_history(&self, batch_id: &str) -> StoreResult<Vec<PhaseStatusChange>> {
        let rows = sqlx::query(
            "SELECT batch_id, phase, old_status, new_status, correlation_id, completed_at \
             FROM phase_status_log WHERE batch_id = $1 ORDER BY id",
        )
        .bind(batch_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let corrupt = |what: &str| StoreError::Corrupt {
                    id: batch_id.to_owned(),
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

    fn pool_status(&self) -> Option<super::PoolStatus> {
        Some(super::PoolStatus {
            size: self.pool.size(),
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
            max: self.pool.options().get_max_connections(),
        })
    }

    async fn database_report(&self) -> StoreResult<super::DatabaseReport> {
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()) AS active, \
                    pg_size_pretty(pg_database_size(current_database())) AS size, \
                    (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                       AND state = 'active' AND now() - query_start > interval '5 minutes') AS long_running",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(super::DatabaseReport {
            active_connections: row.try_get("active")?,
            database_size: row.try_get("size")?,
            long_running_queries: row.try_get("long_running")?,
        })
    }

    async fn configuration_snapshots(&self, batch_id: &str) -> StoreResult<Vec<Value>> {
        Ok(sqlx::query_scalar(
            "SELECT configuration FROM configuration_snapshots WHERE batch_id = $1 ORDER BY id",
        )
        .bind(batch_id)
        .fetch_all(&self.pool)
        .await?)
    }
}
