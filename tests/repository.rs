//! The repository contract suite: every scenario written once and run against
//! each backend (`memory::…` and `postgres::…`).

mod common;

use std::sync::Arc;

use bos::contracts::{BatchStatus, PhaseName, PipelineExecutionStatus};
use bos::domain::OutboundMessage;
use bos::store::{
    rust_enum_domains, Change, ChangeOutcome, Fault, InboxRecord, MemoryRepository, PgRepository,
    Repository,
};
use chrono::{DurationRound, TimeDelta, Utc};
use uuid::Uuid;

type Repo = Arc<dyn Repository>;

async fn created(repo: &Repo, essays: usize) -> (bos::domain::Batch, Vec<OutboundMessage>) {
    let (batch, messages) = common::new_batch(essays);
    let outcome = repo.create_batch(&batch, &messages).await.unwrap();
    assert_eq!(outcome, ChangeOutcome::Applied { version: 1 });
    (batch, messages)
}

/// A change to `batch` (as read at `version`) that records `event_id` and publishes one message.
fn change(batch: &bos::domain::Batch, version: i64, event_id: Uuid, status: BatchStatus) -> Change {
    let mut next = batch.clone();
    next.status = status;
    let mut message = common::new_batch(1).1.remove(0);
    message.event_id = Uuid::new_v4();
    message.key = batch.id.clone();
    Change {
        batch: next,
        expected_version: Some(version),
        essays_changed: false,
        outbox: vec![message],
        inbox: Some(InboxRecord {
            event_id,
            topic: "huleedu.els.batch.phase.outcome.v1".into(),
        }),
        snapshot: None,
    }
}

mod scenarios {
    use super::*;

    pub async fn schema_setup(repo: Repo) {
        repo.migrate().await.unwrap();
        repo.migrate().await.expect("migrating twice is harmless");
        repo.ping().await.unwrap();
        let domains = repo.enum_domains().await.unwrap();
        assert!(domains.contains_key("batches.status"));
    }

    pub async fn create_and_read_back(repo: Repo) {
        let (batch, messages) = created(&repo, 3).await;
        let read = repo
            .get_batch_by_id(&batch.id)
            .await
            .unwrap()
            .expect("stored");
        let mut expected = batch.clone();
        expected.version = 1;
        assert_eq!(read, expected);
        assert_eq!(
            repo.get_batch_essays(&batch.id).await.unwrap().unwrap(),
            batch.essays
        );
        let outbox = repo.outbox_rows(Some(&batch.id)).await.unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].id, messages[0].event_id);
        assert_eq!(outbox[0].payload, messages[0].envelope);
        assert_eq!(
            repo.create_batch(&batch, &[]).await.unwrap(),
            ChangeOutcome::Conflict,
            "creating the same batch twice conflicts"
        );
    }

    pub async fn context_round_trip(repo: Repo) {
        let (batch, _) = created(&repo, 1).await;
        let mut context = batch.context.clone();
        context.assignment_id = Some("assign-7".into());
        context.cj_default_temperature = Some(0.7);
        assert!(repo
            .store_batch_context(&batch.id, 1, &context)
            .await
            .unwrap());
        assert_eq!(
            repo.get_batch_context(&batch.id).await.unwrap(),
            Some(context.clone())
        );
        assert!(
            !repo
                .store_batch_context(&batch.id, 1, &batch.context)
                .await
                .unwrap(),
            "a stale version never writes"
        );
        assert_eq!(
            repo.get_batch_context(&batch.id).await.unwrap(),
            Some(context)
        );
    }

    pub async fn pipeline_state_round_trip(repo: Repo) {
        let (batch, _) = created(&repo, 1).await;
        let mut state = batch.pipeline.clone();
        state.requested_pipelines = vec![PhaseName::Spellcheck, PhaseName::CjAssessment];
        state.spellcheck.status = PipelineExecutionStatus::DispatchInitiated;
        state.spellcheck.essay_counts.total = 4;
        state.spellcheck.started_at = Some(
            Utc::now()
                .duration_trunc(TimeDelta::microseconds(1))
                .unwrap(),
        );
        assert!(repo
            .save_processing_pipeline_state(&batch.id, 1, &state)
            .await
            .unwrap());
        assert_eq!(
            repo.get_processing_pipeline_state(&batch.id).await.unwrap(),
            Some(state.clone())
        );
        assert!(!repo
            .save_processing_pipeline_state(&batch.id, 1, &batch.pipeline)
            .await
            .unwrap());
        assert_eq!(
            repo.get_processing_pipeline_state(&batch.id).await.unwrap(),
            Some(state)
        );
    }

    pub async fn compare_and_swap_sequence(repo: Repo) {
        use PipelineExecutionStatus::*;
        let (batch, _) = created(&repo, 1).await;
        let id = &batch.id;
        let corr = Some(Uuid::new_v4());
        let spell = PhaseName::Spellcheck;
        assert!(repo
            .update_phase_status_atomically(
                id,
                spell,
                SkippedByUserConfig,
                DispatchInitiated,
                None,
                corr
            )
            .await
            .unwrap());
        assert!(
            !repo
                .update_phase_status_atomically(
                    id,
                    spell,
                    SkippedByUserConfig,
                    DispatchInitiated,
                    None,
                    corr
                )
                .await
                .unwrap(),
            "a stale expectation loses"
        );
        let done_at = Utc::now()
            .duration_trunc(TimeDelta::microseconds(1))
            .unwrap();
        assert!(repo
            .update_phase_status_atomically(
                id,
                spell,
                DispatchInitiated,
                CompletedSuccessfully,
                Some(done_at),
                corr
            )
            .await
            .unwrap());
        let state = repo
            .get_processing_pipeline_state(id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(state.spellcheck.status, CompletedSuccessfully);
        assert_eq!(state.spellcheck.completed_at, Some(done_at));
        let history = repo
            .get_phase_status_history(id, Some(spell))
            .await
            .unwrap();
        let steps: Vec<_> = history
            .iter()
            .map(|h| (h.old_status, h.new_status))
            .collect();
        assert_eq!(
            steps,
            [
                (SkippedByUserConfig, DispatchInitiated),
                (DispatchInitiated, CompletedSuccessfully)
            ]
        );
        assert_eq!(history[1].completed_at, Some(done_at));
        assert_eq!(history[1].correlation_id, corr);
        let batch_now = repo.get_batch_by_id(id).await.unwrap().unwrap();
        assert_eq!(batch_now.version, 3, "each winning swap bumps the version");
    }

    pub async fn concurrent_swaps_one_wins(repo: Repo) {
        use PipelineExecutionStatus::*;
        let (batch, _) = created(&repo, 1).await;
        let attempts = (0..2).map(|_| {
            let repo = repo.clone();
            let id = batch.id.clone();
            tokio::spawn(async move {
                repo.update_phase_status_atomically(
                    &id,
                    PhaseName::Nlp,
                    SkippedByUserConfig,
                    DispatchInitiated,
                    None,
                    None,
                )
                .await
                .unwrap()
            })
        });
        let mut wins = 0;
        for attempt in attempts.collect::<Vec<_>>() {
            wins += attempt.await.unwrap() as u32;
        }
        assert_eq!(wins, 1);
        assert_eq!(
            repo.get_phase_status_history(&batch.id, None)
                .await
                .unwrap()
                .len(),
            1
        );
    }

    pub async fn many_writers_lose_no_update(repo: Repo) {
        let (batch, _) = created(&repo, 1).await;
        let start = batch.context.expected_essay_count;
        let writers: Vec<_> = (0..32)
            .map(|_| {
                let repo = repo.clone();
                let id = batch.id.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        loop {
                            let current = repo.get_batch_by_id(&id).await.unwrap().unwrap();
                            let mut context = current.context.clone();
                            context.expected_essay_count += 1;
                            if repo
                                .store_batch_context(&id, current.version, &context)
                                .await
                                .unwrap()
                            {
                                break;
                            }
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        let context = repo.get_batch_context(&batch.id).await.unwrap().unwrap();
        assert_eq!(context.expected_essay_count - start, 1_600);
    }

    pub async fn status_update(repo: Repo) {
        let (batch, _) = created(&repo, 1).await;
        assert!(repo
            .update_batch_status(&batch.id, 1, BatchStatus::ReadyForPipelineExecution)
            .await
            .unwrap());
        assert!(!repo
            .update_batch_status(&batch.id, 1, BatchStatus::Cancelled)
            .await
            .unwrap());
        let read = repo.get_batch_by_id(&batch.id).await.unwrap().unwrap();
        assert_eq!(
            (read.status, read.version),
            (BatchStatus::ReadyForPipelineExecution, 2)
        );
    }

    pub async fn unknown_batch_is_none_or_false(repo: Repo) {
        use PipelineExecutionStatus::*;
        let (batch, _) = common::new_batch(1);
        let id = batch.id.as_str();
        assert_eq!(repo.get_batch_by_id(id).await.unwrap(), None);
        assert_eq!(repo.get_batch_context(id).await.unwrap(), None);
        assert_eq!(repo.get_batch_essays(id).await.unwrap(), None);
        assert_eq!(repo.get_processing_pipeline_state(id).await.unwrap(), None);
        assert!(!repo
            .update_batch_status(id, 1, BatchStatus::Cancelled)
            .await
            .unwrap());
        assert!(!repo
            .store_batch_context(id, 1, &batch.context)
            .await
            .unwrap());
        assert!(!repo.store_batch_essays(id, 1, &batch.essays).await.unwrap());
        assert!(!repo
            .save_processing_pipeline_state(id, 1, &batch.pipeline)
            .await
            .unwrap());
        assert!(!repo
            .update_phase_status_atomically(
                id,
                PhaseName::Nlp,
                SkippedByUserConfig,
                Failed,
                None,
                None
            )
            .await
            .unwrap());
        assert!(repo
            .get_phase_status_history(id, None)
            .await
            .unwrap()
            .is_empty());
        let outcome = repo
            .apply(vec![change(
                &batch,
                1,
                Uuid::new_v4(),
                BatchStatus::Cancelled,
            )])
            .await
            .unwrap();
        assert_eq!(outcome, [ChangeOutcome::NotFound]);
        assert!(repo.outbox_rows(Some(id)).await.unwrap().is_empty());
    }

    pub async fn injected_fault_leaves_no_trace(repo: Repo) {
        let (batch, _) = created(&repo, 2).await;
        let event = Uuid::new_v4();
        repo.inject_fault(Fault::AfterOutboxInsert);
        let result = repo
            .apply(vec![change(
                &batch,
                1,
                event,
                BatchStatus::ReadyForPipelineExecution,
            )])
            .await;
        assert!(result.is_err(), "the injected fault surfaces");
        let read = repo.get_batch_by_id(&batch.id).await.unwrap().unwrap();
        assert_eq!(
            (read.status, read.version),
            (batch.status, 1),
            "no state change"
        );
        assert_eq!(
            repo.outbox_rows(Some(&batch.id)).await.unwrap().len(),
            1,
            "only the registration row"
        );
        assert!(!repo.inbox_contains(event).await.unwrap(), "no inbox row");
        // The fault is gone: the same change now applies.
        let outcome = repo
            .apply(vec![change(
                &batch,
                1,
                event,
                BatchStatus::ReadyForPipelineExecution,
            )])
            .await
            .unwrap();
        assert_eq!(outcome, [ChangeOutcome::Applied { version: 2 }]);
        assert!(repo.inbox_contains(event).await.unwrap());
    }

    pub async fn same_event_twice_is_duplicate(repo: Repo) {
        let (batch, _) = created(&repo, 1).await;
        let event = Uuid::new_v4();
        let first = repo
            .apply(vec![change(
                &batch,
                1,
                event,
                BatchStatus::ReadyForPipelineExecution,
            )])
            .await
            .unwrap();
        assert_eq!(first, [ChangeOutcome::Applied { version: 2 }]);
        let again = repo
            .apply(vec![change(&batch, 2, event, BatchStatus::Cancelled)])
            .await
            .unwrap();
        assert_eq!(again, [ChangeOutcome::Duplicate]);
        let read = repo.get_batch_by_id(&batch.id).await.unwrap().unwrap();
        assert_eq!(
            (read.status, read.version),
            (BatchStatus::ReadyForPipelineExecution, 2)
        );
        assert_eq!(
            repo.outbox_rows(Some(&batch.id)).await.unwrap().len(),
            2,
            "registration + first change only"
        );
    }

    pub async fn ten_changes_one_conflict_one_duplicate(repo: Repo) {
        let mut batches = Vec::new();
        for _ in 0..10 {
            batches.push(created(&repo, 1).await.0);
        }
        let seen = Uuid::new_v4();
        let first = repo
            .apply(vec![change(
                &batches[9],
                1,
                seen,
                BatchStatus::ReadyForPipelineExecution,
            )])
            .await
            .unwrap();
        assert_eq!(first, [ChangeOutcome::Applied { version: 2 }]);
        let events: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
        let changes: Vec<Change> = batches
            .iter()
            .enumerate()
            .map(|(i, b)| match i {
                3 => change(b, 7, events[i], BatchStatus::Cancelled),
                9 => change(b, 2, seen, BatchStatus::Cancelled),
                _ => change(b, 1, events[i], BatchStatus::ReadyForPipelineExecution),
            })
            .collect();
        let outcomes = repo.apply(changes).await.unwrap();
        for (i, outcome) in outcomes.iter().enumerate() {
            let expected = match i {
                3 => ChangeOutcome::Conflict,
                9 => ChangeOutcome::Duplicate,
                _ => ChangeOutcome::Applied { version: 2 },
            };
            assert_eq!(*outcome, expected, "change {i}");
            let read = repo.get_batch_by_id(&batches[i].id).await.unwrap().unwrap();
            let outbox = repo.outbox_rows(Some(&batches[i].id)).await.unwrap().len();
            match i {
                3 => {
                    assert_eq!(
                        (read.status, read.version, outbox),
                        (batches[i].status, 1, 1)
                    );
                    assert!(!repo.inbox_contains(events[i]).await.unwrap());
                }
                9 => assert_eq!(
                    (read.status, read.version, outbox),
                    (BatchStatus::ReadyForPipelineExecution, 2, 2)
                ),
                _ => {
                    assert_eq!(
                        (read.status, read.version, outbox),
                        (BatchStatus::ReadyForPipelineExecution, 2, 2)
                    );
                    assert!(repo.inbox_contains(events[i]).await.unwrap());
                }
            }
        }
    }

    pub async fn later_changes_see_earlier_versions(repo: Repo) {
        let (batch, _) = created(&repo, 1).await;
        let outcomes = repo
            .apply(vec![
                change(
                    &batch,
                    1,
                    Uuid::new_v4(),
                    BatchStatus::ReadyForPipelineExecution,
                ),
                change(&batch, 2, Uuid::new_v4(), BatchStatus::ProcessingPipelines),
                change(&batch, 2, Uuid::new_v4(), BatchStatus::Cancelled),
            ])
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            [
                ChangeOutcome::Applied { version: 2 },
                ChangeOutcome::Applied { version: 3 },
                ChangeOutcome::Conflict
            ]
        );
        let read = repo.get_batch_by_id(&batch.id).await.unwrap().unwrap();
        assert_eq!(
            (read.status, read.version),
            (BatchStatus::ProcessingPipelines, 3)
        );
    }

    pub async fn essays_rewritten_with_state(repo: Repo) {
        let (batch, _) = created(&repo, 3).await;
        let mut c = change(
            &batch,
            1,
            Uuid::new_v4(),
            BatchStatus::ReadyForPipelineExecution,
        );
        c.batch.essays.truncate(2);
        c.batch.essays[1].corrected_text_storage_id = Some("store-1-corrected".into());
        c.essays_changed = true;
        c.snapshot = Some(serde_json::json!({"phases_to_run": ["spellcheck"]}));
        assert_eq!(
            repo.apply(vec![c.clone()]).await.unwrap(),
            [ChangeOutcome::Applied { version: 2 }]
        );
        assert_eq!(
            repo.get_batch_essays(&batch.id).await.unwrap().unwrap(),
            c.batch.essays
        );
        assert_eq!(
            repo.configuration_snapshots(&batch.id).await.unwrap(),
            [c.snapshot.unwrap()]
        );
        assert!(repo
            .store_batch_essays(&batch.id, 2, &batch.essays)
            .await
            .unwrap());
        assert_eq!(
            repo.get_batch_essays(&batch.id).await.unwrap().unwrap(),
            batch.essays
        );
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
                    let database = common::infra::Database::fresh().await;
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
    context_round_trip,
    pipeline_state_round_trip,
    compare_and_swap_sequence,
    concurrent_swaps_one_wins,
    many_writers_lose_no_update,
    status_update,
    unknown_batch_is_none_or_false,
    injected_fault_leaves_no_trace,
    same_event_twice_is_duplicate,
    ten_changes_one_conflict_one_duplicate,
    later_changes_see_earlier_versions,
    essays_rewritten_with_state,
    enum_values_match_rust,
);
