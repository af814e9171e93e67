//! The repository contract suite: every scenario written once and run against
//! each backend (`repository::memory::…` and `repository::postgres::…`).

use std::sync::Arc;
use std::time::Duration;

use bos::contracts::{BatchStatus, PhaseName, PipelineExecutionStatus};
use bos::domain::{Batch, OutboundMessage, PhaseTransition};
use bos::store::{
    rust_enum_domains, BatchWrite, CommitError, InboxRecord, MemoryRepository, PgRepository,
    PublishFailure, Repository, UnitOfWork,
};
use uuid::Uuid;

use crate::support;

type Repo = Arc<dyn Repository>;

async fn created(repo: &Repo, essays: usize) -> (Batch, Vec<OutboundMessage>) {
    let (batch, messages) = support::new_batch(essays);
    let done = repo
        .commit(UnitOfWork::create(batch.clone(), messages.clone()))
        .await
        .unwrap();
    assert!(done.conflicts.is_empty());
    assert_eq!(done.versions[&batch.id], 1);
    (batch, messages)
}

fn message(batch: &Batch) -> OutboundMessage {
    let mut m = support::new_batch(1).1.remove(0);
    m.event_id = Uuid::new_v4();
    m.key = batch.id.clone();
    m
}

/// A unit that moves `batch` (read at `version`) to `status`, records `event`
/// and publishes one message.
fn unit(batch: &Batch, version: i64, event: Uuid, status: BatchStatus) -> UnitOfWork {
    let mut next = batch.clone();
    next.status = status;
    UnitOfWork {
        writes: vec![BatchWrite {
            batch: next,
            expected_version: Some(version),
            essays_changed: false,
            transitions: Vec::new(),
            snapshots: Vec::new(),
        }],
        inbox: vec![InboxRecord {
            event_id: event,
            topic: "huleedu.els.batch.phase.outcome.v1".into(),
            batch_id: batch.id.clone(),
        }],
        outbox: vec![message(batch)],
    }
}

fn merge(units: Vec<UnitOfWork>) -> UnitOfWork {
    let mut all = UnitOfWork::default();
    for u in units {
        all.writes.extend(u.writes);
        all.inbox.extend(u.inbox);
        all.outbox.extend(u.outbox);
    }
    all
}

async fn read(repo: &Repo, id: &str) -> Batch {
    repo.get_batch(id).await.unwrap().expect("stored")
}

async fn processed(repo: &Repo, id: Uuid) -> bool {
    repo.processed(&[id]).await.unwrap().contains(&id)
}

mod scenarios {
    use super::*;

    pub async fn schema_setup(repo: Repo) {
        repo.migrate().await.unwrap();
        repo.migrate().await.expect("migrating twice is harmless");
        repo.ping().await.unwrap();
        assert!(repo
            .enum_domains()
            .await
            .unwrap()
            .contains_key("batches.status"));
    }

    pub async fn create_and_read_back(repo: Repo) {
        let (batch, messages) = created(&repo, 3).await;
        let mut expected = batch.clone();
        expected.version = 1;
        assert_eq!(read(&repo, &batch.id).await, expected);
        let outbox = repo.outbox_rows(Some(&batch.id)).await.unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].id, messages[0].event_id);
        assert_eq!(
            outbox[0].payload, messages[0].payload,
            "the exact bytes are kept"
        );
        let again = repo
            .commit(UnitOfWork::create(batch.clone(), Vec::new()))
            .await
            .unwrap();
        assert!(
            again.conflicts.contains(&batch.id),
            "creating twice conflicts"
        );
    }

    pub async fn state_round_trip(repo: Repo) {
        let (batch, _) = created(&repo, 2).await;
        let mut next = batch.clone();
        next.context.assignment_id = Some("assign-7".into());
        next.pipeline.requested_pipelines = vec![PhaseName::Spellcheck, PhaseName::CjAssessment];
        next.pipeline.spellcheck.status = PipelineExecutionStatus::DispatchInitiated;
        next.orchestration.runs_started = 3;
        next.essays[1].corrected_text_storage_id = Some("store-1-corrected".into());
        next.completed_at = Some(batch.created_at);
        let done = repo
            .commit(UnitOfWork {
                writes: vec![BatchWrite {
                    batch: next.clone(),
                    expected_version: Some(1),
                    essays_changed: true,
                    transitions: Vec::new(),
                    snapshots: Vec::new(),
                }],
                ..UnitOfWork::default()
            })
            .await
            .unwrap();
        assert_eq!(done.versions[&batch.id], 2);
        next.version = 2;
        assert_eq!(read(&repo, &batch.id).await, next);
    }

    pub async fn a_stale_version_writes_nothing_of_its_batch(repo: Repo) {
        let (a, _) = created(&repo, 1).await;
        let (b, _) = created(&repo, 1).await;
        let (ea, eb) = (Uuid::new_v4(), Uuid::new_v4());
        let done = repo
            .commit(merge(vec![
                unit(&a, 7, ea, BatchStatus::Cancelled),
                unit(&b, 1, eb, BatchStatus::ReadyForPipelineExecution),
            ]))
            .await
            .unwrap();
        assert_eq!(done.conflicts.iter().collect::<Vec<_>>(), [&a.id]);
        assert_eq!(read(&repo, &a.id).await.version, 1, "no blind write");
        assert!(!processed(&repo, ea).await, "no inbox row for the loser");
        assert_eq!(repo.outbox_rows(Some(&a.id)).await.unwrap().len(), 1);
        assert_eq!(
            read(&repo, &b.id).await.status,
            BatchStatus::ReadyForPipelineExecution
        );
        assert!(processed(&repo, eb).await);
        assert_eq!(repo.outbox_rows(Some(&b.id)).await.unwrap().len(), 2);
    }

    pub async fn concurrent_writers_one_wins(repo: Repo) {
        let (batch, _) = created(&repo, 1).await;
        let attempts: Vec<_> = (0..2)
            .map(|i| {
                let repo = repo.clone();
                let u = unit(
                    &batch,
                    1,
                    Uuid::new_v4(),
                    [
                        BatchStatus::Cancelled,
                        BatchStatus::ReadyForPipelineExecution,
                    ][i],
                );
                tokio::spawn(async move { repo.commit(u).await.unwrap().conflicts.is_empty() })
            })
            .collect();
        let mut wins = 0;
        for a in attempts {
            wins += u32::from(a.await.unwrap());
        }
        assert_eq!(wins, 1);
        assert_eq!(read(&repo, &batch.id).await.version, 2);
        assert_eq!(repo.outbox_rows(Some(&batch.id)).await.unwrap().len(), 2);
    }

    pub async fn many_writers_lose_no_update(repo: Repo) {
        let (batch, _) = created(&repo, 1).await;
        let start = batch.context.expected_essay_count;
        let writers: Vec<_> = (0..16)
            .map(|_| {
                let repo = repo.clone();
                let id = batch.id.clone();
                tokio::spawn(async move {
                    for _ in 0..25 {
                        loop {
                            let current = repo.get_batch(&id).await.unwrap().unwrap();
                            let mut next = current.clone();
                            next.context.expected_essay_count += 1;
                            let done = repo
                                .commit(UnitOfWork {
                                    writes: vec![BatchWrite {
                                        batch: next,
                                        expected_version: Some(current.version),
                                        essays_changed: false,
                                        transitions: Vec::new(),
                                        snapshots: Vec::new(),
                                    }],
                                    ..UnitOfWork::default()
                                })
                                .await
                                .unwrap();
                            if done.conflicts.is_empty() {
                                break;
                            }
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let now = read(&repo, &batch.id).await;
        assert_eq!(now.context.expected_essay_count - start, 400);
        assert_eq!(now.version, 401);
    }

    pub async fn an_unknown_batch_is_reported_not_written(repo: Repo) {
        let (batch, _) = support::new_batch(1);
        assert_eq!(repo.get_batch(&batch.id).await.unwrap(), None);
        assert!(repo
            .get_batches(std::slice::from_ref(&batch.id))
            .await
            .unwrap()
            .is_empty());
        let event = Uuid::new_v4();
        let done = repo
            .commit(unit(&batch, 1, event, BatchStatus::Cancelled))
            .await
            .unwrap();
        assert!(done.missing.contains(&batch.id));
        assert!(!processed(&repo, event).await);
        assert!(repo.outbox_rows(Some(&batch.id)).await.unwrap().is_empty());
        assert!(repo.phase_history(&batch.id).await.unwrap().is_empty());
    }

    pub async fn a_failed_commit_leaves_no_trace(repo: Repo) {
        let (batch, messages) = created(&repo, 2).await;
        let event = Uuid::new_v4();
        let mut u = unit(&batch, 1, event, BatchStatus::ReadyForPipelineExecution);
        // The registration's event id again: the outbox refuses it, after the
        // batch row and the inbox row went in.
        u.outbox.push(messages[0].clone());
        let result = repo.commit(u).await;
        assert!(
            matches!(&result, Err(CommitError::Store(e)) if !e.is_transient()),
            "{result:?}"
        );
        let now = read(&repo, &batch.id).await;
        assert_eq!(
            (now.status, now.version),
            (batch.status, 1),
            "no state change"
        );
        assert!(!processed(&repo, event).await, "no inbox row");
        assert_eq!(repo.outbox_rows(Some(&batch.id)).await.unwrap().len(), 1);
        // Without the offending row the same unit applies.
        let done = repo
            .commit(unit(
                &batch,
                1,
                event,
                BatchStatus::ReadyForPipelineExecution,
            ))
            .await
            .unwrap();
        assert_eq!(done.versions[&batch.id], 2);
        assert!(processed(&repo, event).await);
    }

    pub async fn events_recorded_meanwhile_are_reported(repo: Repo) {
        let (batch, _) = created(&repo, 1).await;
        let event = Uuid::new_v4();
        repo.commit(unit(
            &batch,
            1,
            event,
            BatchStatus::ReadyForPipelineExecution,
        ))
        .await
        .unwrap();
        assert!(processed(&repo, event).await);
        // The same event again with a write that would win: all rolled back.
        let raced = repo
            .commit(unit(&batch, 2, event, BatchStatus::Cancelled))
            .await;
        assert!(
            matches!(&raced, Err(CommitError::Processed(ids)) if ids.contains(&event)),
            "{raced:?}"
        );
        assert_eq!(read(&repo, &batch.id).await.version, 2);
        // Without a write (an ignored event), it is just reported.
        let ignored = UnitOfWork {
            inbox: vec![InboxRecord {
                event_id: event,
                topic: "t".into(),
                batch_id: batch.id.clone(),
            }],
            ..UnitOfWork::default()
        };
        let done = repo.commit(ignored).await.unwrap();
        assert!(done.already_processed.contains(&event));
    }

    pub async fn phase_log_essays_and_snapshots_go_with_the_state(repo: Repo) {
        let (batch, _) = created(&repo, 3).await;
        let mut u = unit(&batch, 1, Uuid::new_v4(), BatchStatus::ProcessingPipelines);
        let correlation = Uuid::new_v4();
        let w = &mut u.writes[0];
        w.batch.essays.truncate(2);
        w.batch.essays[1].corrected_text_storage_id = Some("store-1-corrected".into());
        w.essays_changed = true;
        w.transitions = vec![PhaseTransition {
            phase: PhaseName::Spellcheck,
            from: PipelineExecutionStatus::SkippedByUserConfig,
            to: PipelineExecutionStatus::DispatchInitiated,
            correlation_id: correlation,
            completed_at: None,
        }];
        w.snapshots = vec![(
            correlation,
            serde_json::json!({"phases_to_run": ["spellcheck"]}),
        )];
        let essays = w.batch.essays.clone();
        repo.commit(u).await.unwrap();
        assert_eq!(read(&repo, &batch.id).await.essays, essays);
        let history = repo.phase_history(&batch.id).await.unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(
            (
                history[0].phase,
                history[0].old_status,
                history[0].new_status
            ),
            (
                PhaseName::Spellcheck,
                PipelineExecutionStatus::SkippedByUserConfig,
                PipelineExecutionStatus::DispatchInitiated
            )
        );
        assert_eq!(history[0].correlation_id, Some(correlation));
        assert_eq!(
            repo.configuration_snapshots(&batch.id).await.unwrap(),
            [serde_json::json!({"phases_to_run": ["spellcheck"]})]
        );
        // A losing write logs nothing.
        let mut stale = unit(&batch, 1, Uuid::new_v4(), BatchStatus::Cancelled);
        stale.writes[0].transitions = vec![PhaseTransition {
            phase: PhaseName::Nlp,
            from: PipelineExecutionStatus::SkippedByUserConfig,
            to: PipelineExecutionStatus::PendingDependencies,
            correlation_id: correlation,
            completed_at: None,
        }];
        repo.commit(stale).await.unwrap();
        assert_eq!(repo.phase_history(&batch.id).await.unwrap().len(), 1);
    }

    pub async fn claims_keep_key_order_and_are_bounded(repo: Repo) {
        let (a, _) = created(&repo, 1).await;
        let (b, _) = created(&repo, 1).await;
        // Three more rows for a, one for b.
        for (batch, version) in [(&a, 1), (&b, 1)] {
            let mut u = unit(
                batch,
                version,
                Uuid::new_v4(),
                BatchStatus::ReadyForPipelineExecution,
            );
            if batch.id == a.id {
                u.outbox.push(message(batch));
                u.outbox.push(message(batch));
            }
            repo.commit(u).await.unwrap();
        }
        let (one, two) = (Uuid::new_v4(), Uuid::new_v4());
        let lease = Duration::from_secs(30);
        let first = repo.claim_outbox(one, 3, lease).await.unwrap();
        assert_eq!(first.len(), 3, "bounded by the limit");
        let seqs: Vec<i64> = first.iter().map(|r| r.seq).collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "oldest first");
        let keys: std::collections::BTreeSet<&str> = first.iter().map(|r| r.key.as_str()).collect();
        // The second relay gets only rows of keys whose head is free.
        let second = repo.claim_outbox(two, 10, lease).await.unwrap();
        for r in &second {
            assert!(
                !keys.contains(r.key.as_str())
                    || first.iter().all(|f| f.key != r.key || f.seq < r.seq),
                "a key's rows are not handed to two relays out of order"
            );
        }
        // Settling: only the holder settles; renewing extends only its own rows.
        let ids: Vec<Uuid> = first.iter().map(|r| r.id).collect();
        assert_eq!(repo.renew_outbox_lease(two, &ids, lease).await.unwrap(), 0);
        assert_eq!(repo.renew_outbox_lease(one, &ids, lease).await.unwrap(), 3);
        assert_eq!(repo.settle_outbox(two, &ids, &[], &[]).await.unwrap(), 0);
        let failure = PublishFailure {
            id: ids[2],
            error: "broker down".into(),
            next_attempt_at: chrono::Utc::now() + chrono::Duration::hours(1),
        };
        assert_eq!(
            repo.settle_outbox(one, &ids[..2], &[failure], &[])
                .await
                .unwrap(),
            3
        );
        let rows = repo.outbox_rows(None).await.unwrap();
        let failed = rows.iter().find(|r| r.id == ids[2]).unwrap();
        assert_eq!(
            (failed.attempts, failed.last_error.as_deref()),
            (1, Some("broker down"))
        );
        assert!(rows
            .iter()
            .filter(|r| ids[..2].contains(&r.id))
            .all(|r| r.published_at.is_some()));
        let stuck = repo.stuck_outbox_rows(10).await.unwrap();
        assert_eq!(stuck.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[2]]);
        let stats = repo.outbox_stats().await.unwrap();
        assert_eq!(stats.failing, 1);
        // A failed head holds its key until it is due.
        repo.settle_outbox(
            two,
            &[],
            &[],
            &second.iter().map(|r| r.id).collect::<Vec<_>>(),
        )
        .await
        .unwrap();
        let again = repo.claim_outbox(one, 10, lease).await.unwrap();
        assert!(
            again
                .iter()
                .all(|r| r.key != failed.key || r.seq < failed.seq),
            "nothing behind the failed row of its key"
        );
    }

    pub async fn purges_are_bounded(repo: Repo) {
        let (batch, _) = created(&repo, 1).await;
        let events: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        for (version, &e) in (1..).zip(&events) {
            repo.commit(unit(
                &batch,
                version,
                e,
                BatchStatus::ReadyForPipelineExecution,
            ))
            .await
            .unwrap();
        }
        let relay = Uuid::new_v4();
        let rows = repo
            .claim_outbox(relay, 100, Duration::from_secs(30))
            .await
            .unwrap();
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        repo.settle_outbox(relay, &ids, &[], &[]).await.unwrap();
        let later = chrono::Utc::now() + chrono::Duration::seconds(5);
        assert_eq!(repo.purge_outbox(later, 2).await.unwrap(), 2, "one chunk");
        assert_eq!(repo.purge_outbox(later, 100).await.unwrap(), 4);
        assert_eq!(repo.purge_inbox(later, 3).await.unwrap(), 3, "one chunk");
        assert_eq!(
            repo.purge_inbox(chrono::Utc::now() - chrono::Duration::hours(1), 100)
                .await
                .unwrap(),
            0,
            "rows younger than the retention stay"
        );
        assert_eq!(repo.purge_inbox(later, 100).await.unwrap(), 2);
        assert!(repo.processed(&events).await.unwrap().is_empty());
    }

    pub async fn enum_values_match_rust(repo: Repo) {
        let stored = repo.enum_domains().await.unwrap();
        for (column, values) in rust_enum_domains() {
            assert_eq!(
                stored.get(&column),
                Some(&values),
                "allowed values of {column}"
            );
        }
    }
}

macro_rules! contract_suite {
    ($($scenario:ident),+ $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $scenario() {
                    scenarios::$scenario(Arc::new(MemoryRepository::new())).await;
                }
            )+
        }

        mod postgres {
            use super::*;
            $(
                #[tokio::test]
                async fn $scenario() {
                    let database = support::pg::Database::fresh().await;
                    let repo = PgRepository::from_pool(database.pool.clone());
                    repo.migrate().await.expect("migrations apply");
                    scenarios::$scenario(Arc::new(repo)).await;
                }
            )+
        }
    };
}

contract_suite!(
    schema_setup,
    create_and_read_back,
    state_round_trip,
    a_stale_version_writes_nothing_of_its_batch,
    concurrent_writers_one_wins,
    many_writers_lose_no_update,
    an_unknown_batch_is_reported_not_written,
    a_failed_commit_leaves_no_trace,
    events_recorded_meanwhile_are_reported,
    phase_log_essays_and_snapshots_go_with_the_state,
    claims_keep_key_order_and_are_bounded,
    purges_are_bounded,
    enum_values_match_rust,
);

#[tokio::test]
async fn an_unreachable_database_is_named_in_one_line() {
    let mut settings = bos::config::DatabaseSettings::new("postgres://bos:secret@127.0.0.1:1/bos");
    settings.acquire_timeout = Duration::from_secs(3);
    let e = PgRepository::connect(&settings)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("127.0.0.1:1/bos"), "{e}");
    assert!(e.contains("connection refused"), "{e}");
    assert!(!e.contains("secret"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let server = support::pg::server_url().await;
    let missing = support::pg::with_database(&server, "bos_no_such_database");
    let e = PgRepository::connect(&bos::config::DatabaseSettings::new(missing))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}
