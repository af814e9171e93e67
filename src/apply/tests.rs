//! Planning (pure) and applying (against the in-memory store).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use uuid::Uuid;

use super::*;
use crate::contracts::{topics, CourseCode, EssayRef, PhaseName};
use crate::credits::AllowAll;
use crate::domain::{Batch, CreditAnswers, Env, RegistrationRequest, SequentialIds};
use crate::sim::upstream;
use crate::store::{
    CommitError, Committed, EnumDomains, MemoryRepository, OutboxRow, OutboxStats,
    PhaseStatusChange, PublishFailure, StoreResult, UnitOfWork,
};

fn registered(rules: &Rules) -> Batch {
    let request = RegistrationRequest {
        expected_essay_count: 2,
        essay_ids: None,
        course_code: CourseCode::Eng5,
        student_prompt_ref: None,
        user_id: "teacher".into(),
        org_id: None,
        class_id: None,
        cj_default_llm_model: None,
        cj_default_temperature: None,
        assignment_id: None,
    };
    let mut b = rules
        .register(
            &request,
            Uuid::new_v4(),
            &mut Env {
                now: Utc.with_ymd_and_hms(2026, 3, 14, 9, 0, 0).unwrap(),
                ids: &mut SequentialIds(Uuid::new_v4().as_u128() >> 64),
                credits: &CreditAnswers::new(),
            },
        )
        .unwrap()
        .batch;
    b.version = 1;
    b
}

fn essays(n: usize) -> Vec<EssayRef> {
    (0..n)
        .map(|i| EssayRef::new(format!("e{i}"), format!("s{i}")))
        .collect()
}

/// A record as the consumer sees it, with its event id.
fn record(topic: &str, batch: &str, event_id: Uuid, data: impl serde::Serialize) -> Record {
    Record {
        topic: topic.to_owned(),
        source_topic: topic.to_owned(),
        partition: 0,
        offset: 0,
        key: Some(batch.as_bytes().to_vec()),
        payload: Some(upstream::envelope_json(
            topic,
            "test",
            event_id,
            Uuid::new_v4(),
            Utc::now(),
            data,
        )),
        headers: Vec::new(),
        produced_at_ms: None,
    }
}

fn provisioned(batch: &Batch, event: Uuid) -> Record {
    record(
        topics::CONTENT_PROVISIONING_COMPLETED,
        &batch.id,
        event,
        upstream::content_provisioned(&batch.id, CourseCode::Eng5, "t", &essays(2)),
    )
}

fn requested(batch: &Batch, event: Uuid) -> Record {
    record(
        topics::CLIENT_PIPELINE_REQUEST,
        &batch.id,
        event,
        upstream::pipeline_request(&batch.id, "spellcheck", "t"),
    )
}

fn run_plan(
    rules: &Rules,
    prepared: &[Prepared],
    batches: &[&Batch],
    processed: &HashSet<Uuid>,
) -> (UnitOfWork, Vec<Planned>) {
    let batches: HashMap<String, Batch> = batches
        .iter()
        .map(|b| (b.id.clone(), (*b).clone()))
        .collect();
    let all: Vec<usize> = (0..prepared.len()).collect();
    let answers = CreditAnswers::new();
    match plan::plan(
        rules,
        prepared,
        &all,
        &batches,
        processed,
        &mut Env {
            now: Utc::now(),
            ids: &mut SequentialIds(1),
            credits: &answers,
        },
    ) {
        Plan::Ready { unit, planned, .. } => (unit, planned),
        Plan::NeedsCredit { .. } => panic!("nothing billable here"),
    }
}

#[test]
fn two_events_of_one_batch_in_one_poll_make_one_write() {
    let rules = Rules::default();
    let batch = registered(&rules);
    let prepared: Vec<Prepared> = [
        provisioned(&batch, Uuid::new_v4()),
        requested(&batch, Uuid::new_v4()),
    ]
    .iter()
    .map(prepare)
    .collect();
    let (unit, planned) = run_plan(&rules, &prepared, &[&batch], &HashSet::new());
    assert_eq!(unit.writes.len(), 1, "one version-checked write per batch");
    assert_eq!(unit.writes[0].expected_version, Some(1));
    assert_eq!(unit.inbox.len(), 2);
    assert!(planned.iter().all(|p| p.verdict == Verdict::Applied));
    assert_eq!(
        unit.outbox.iter().map(|m| m.topic).collect::<Vec<_>>(),
        [topics::SPELLCHECK_COMMAND, topics::TEACHER_NOTIFICATION],
        "the request was decided on the state the first event left"
    );
}

#[test]
fn copies_and_known_events_are_set_aside_before_deciding() {
    let rules = Rules::default();
    let batch = registered(&rules);
    let other = registered(&rules);
    let content = Uuid::new_v4();
    let request = Uuid::new_v4();
    let old = Uuid::new_v4();
    let mut records = vec![record(
        topics::CONTENT_PROVISIONING_COMPLETED,
        &batch.id,
        old,
        upstream::content_provisioned(&batch.id, CourseCode::Eng5, "t", &essays(2)),
    )];
    // 254 copies of one event among records of another batch.
    for i in 0..254 {
        records.push(if i % 50 == 7 {
            provisioned(&other, Uuid::new_v4())
        } else {
            provisioned(&batch, content)
        });
    }
    records.push(requested(&batch, request));
    let prepared: Vec<Prepared> = records.iter().map(prepare).collect();
    let known: HashSet<Uuid> = [old].into();
    let (unit, planned) = run_plan(&rules, &prepared, &[&batch, &other], &known);
    assert_eq!(
        planned[0].verdict,
        Verdict::Duplicate,
        "already in the inbox"
    );
    let applied: Vec<usize> = planned
        .iter()
        .filter(|p| p.verdict == Verdict::Applied)
        .map(|p| p.index)
        .collect();
    assert_eq!(applied[0], 1, "the first copy applies");
    assert_eq!(
        planned
            .iter()
            .filter(|p| p.verdict == Verdict::Duplicate)
            .count(),
        1 + (254 - 5) - 1,
        "every later copy is a duplicate"
    );
    assert!(
        planned
            .last()
            .is_some_and(|p| p.verdict == Verdict::Applied),
        "and the request after them is decided"
    );
    assert_eq!(unit.writes.len(), 2);
    let inbox: HashSet<Uuid> = unit.inbox.iter().map(|r| r.event_id).collect();
    assert!(inbox.contains(&content) && inbox.contains(&request) && !inbox.contains(&old));
}

#[test]
fn a_decode_error_among_good_records_is_a_dead_letter_alone() {
    let rules = Rules::default();
    let batch = registered(&rules);
    let mut broken = requested(&batch, Uuid::new_v4());
    broken.payload = Some(b"{not json".to_vec());
    let prepared: Vec<Prepared> = [
        provisioned(&batch, Uuid::new_v4()),
        broken,
        requested(&batch, Uuid::new_v4()),
    ]
    .iter()
    .map(prepare)
    .collect();
    let (unit, planned) = run_plan(&rules, &prepared, &[&batch], &HashSet::new());
    assert_eq!(planned[0].verdict, Verdict::Applied);
    assert!(matches!(
        planned[1].verdict,
        Verdict::DeadLetter {
            reason: "decode_error",
            ..
        }
    ));
    assert_eq!(planned[1].batch, None, "a dead letter rides on no write");
    assert_eq!(planned[2].verdict, Verdict::Applied);
    assert_eq!(unit.inbox.len(), 2, "no inbox row for the dead letter");
}

/// A repository whose batches change underneath the first `n` commits.
#[derive(Debug)]
struct MovesUnderneath {
    inner: MemoryRepository,
    left: Mutex<usize>,
    fail_batch: Option<String>,
}

#[async_trait]
impl Repository for MovesUnderneath {
    async fn migrate(&self) -> StoreResult<()> {
        Ok(())
    }
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
    async fn enum_domains(&self) -> StoreResult<EnumDomains> {
        self.inner.enum_domains().await
    }
    async fn get_batches(&self, ids: &[String]) -> StoreResult<Vec<Batch>> {
        self.inner.get_batches(ids).await
    }
    async fn processed(&self, ids: &[Uuid]) -> StoreResult<HashSet<Uuid>> {
        self.inner.processed(ids).await
    }
    async fn commit(&self, unit: UnitOfWork) -> Result<Committed, CommitError> {
        if let Some(bad) = &self.fail_batch {
            if unit.inbox.iter().any(|r| &r.batch_id == bad) {
                return Err(CommitError::Store(crate::store::StoreError::Constraint(
                    "refused".into(),
                )));
            }
        }
        let move_it = {
            let mut left = self.left.lock().unwrap();
            let go = *left > 0;
            *left = left.saturating_sub(1);
            go
        };
        if move_it {
            for w in &unit.writes {
                let mut current = self.inner.get_batch(&w.batch.id).await?.unwrap();
                current.context.org_id = Some("changed underneath".into());
                self.inner
                    .commit(UnitOfWork {
                        writes: vec![crate::store::BatchWrite {
                            expected_version: Some(current.version),
                            batch: current,
                            essays_changed: false,
                            transitions: Vec::new(),
                            snapshots: Vec::new(),
                        }],
                        ..UnitOfWork::default()
                    })
                    .await?;
            }
        }
        self.inner.commit(unit).await
    }
    async fn claim_outbox(
        &self,
        r: Uuid,
        l: i64,
        d: std::time::Duration,
    ) -> StoreResult<Vec<OutboxRow>> {
        self.inner.claim_outbox(r, l, d).await
    }
    async fn renew_outbox_lease(
        &self,
        r: Uuid,
        i: &[Uuid],
        d: std::time::Duration,
    ) -> StoreResult<u64> {
        self.inner.renew_outbox_lease(r, i, d).await
    }
    async fn settle_outbox(
        &self,
        r: Uuid,
        p: &[Uuid],
        f: &[PublishFailure],
        x: &[Uuid],
    ) -> StoreResult<u64> {
        self.inner.settle_outbox(r, p, f, x).await
    }
    async fn purge_outbox(&self, b: crate::contracts::Timestamp, l: i64) -> StoreResult<u64> {
        self.inner.purge_outbox(b, l).await
    }
    async fn purge_inbox(&self, b: crate::contracts::Timestamp, l: i64) -> StoreResult<u64> {
        self.inner.purge_inbox(b, l).await
    }
    async fn outbox_stats(&self) -> StoreResult<OutboxStats> {
        self.inner.outbox_stats().await
    }
    async fn outbox_rows(&self, k: Option<&str>) -> StoreResult<Vec<OutboxRow>> {
        self.inner.outbox_rows(k).await
    }
    async fn stuck_outbox_rows(&self, l: i64) -> StoreResult<Vec<OutboxRow>> {
        self.inner.stuck_outbox_rows(l).await
    }
    async fn phase_history(&self, b: &str) -> StoreResult<Vec<PhaseStatusChange>> {
        self.inner.phase_history(b).await
    }
    async fn configuration_snapshots(&self, b: &str) -> StoreResult<Vec<serde_json::Value>> {
        self.inner.configuration_snapshots(b).await
    }
}

async fn applier(
    moves: usize,
    fail_batch: Option<String>,
    batches: &[&Batch],
) -> (Applier, Arc<MovesUnderneath>) {
    let repo = Arc::new(MovesUnderneath {
        inner: MemoryRepository::new(),
        left: Mutex::new(0),
        fail_batch,
    });
    for b in batches {
        repo.inner
            .commit(UnitOfWork::create((*b).clone(), Vec::new()))
            .await
            .unwrap();
    }
    *repo.left.lock().unwrap() = moves;
    (
        Applier {
            repo: repo.clone(),
            rules: Rules::default(),
            credits: Arc::new(AllowAll),
            max_conflict_retries: 2,
            metrics: Arc::new(crate::metrics::Metrics::new()),
        },
        repo,
    )
}

#[tokio::test]
async fn a_conflict_is_decided_again_on_the_new_state() {
    let rules = Rules::default();
    let batch = registered(&rules);
    let (applier, repo) = applier(1, None, &[&batch]).await;
    let prepared: Vec<Prepared> = [
        provisioned(&batch, Uuid::new_v4()),
        requested(&batch, Uuid::new_v4()),
    ]
    .iter()
    .map(prepare)
    .collect();
    let outcomes = applier.apply(&prepared).await.unwrap();
    assert!(
        outcomes.iter().all(|o| o.verdict == Verdict::Applied),
        "{outcomes:?}"
    );
    let now = repo.get_batch(&batch.id).await.unwrap().unwrap();
    assert_eq!(
        now.context.org_id.as_deref(),
        Some("changed underneath"),
        "the other write survived"
    );
    assert!(
        now.orchestration.current_run.is_some(),
        "and ours was decided again on top of it"
    );
    assert_eq!(applier.metrics.cas_conflicts.get(), 1);
}

#[tokio::test]
async fn rounds_without_progress_end_in_a_retryable_error() {
    let rules = Rules::default();
    let batch = registered(&rules);
    let (applier, _) = applier(10, None, &[&batch]).await;
    let prepared = vec![prepare(&provisioned(&batch, Uuid::new_v4()))];
    let error = applier.apply(&prepared).await.unwrap_err();
    assert_eq!(error.class(), "contended");
}

#[tokio::test]
async fn a_record_the_database_refuses_is_isolated_and_the_rest_applies() {
    let rules = Rules::default();
    let good = registered(&rules);
    let bad = registered(&rules);
    let (applier, repo) = applier(0, Some(bad.id.clone()), &[&good, &bad]).await;
    let records = [
        provisioned(&good, Uuid::new_v4()),
        provisioned(&bad, Uuid::new_v4()),
        requested(&good, Uuid::new_v4()),
    ];
    let prepared: Vec<Prepared> = records.iter().map(prepare).collect();
    let outcomes = applier.apply(&prepared).await.unwrap();
    assert_eq!(outcomes[0].verdict, Verdict::Applied);
    assert!(
        matches!(&outcomes[1].verdict, Verdict::DeadLetter { reason: APPLY_ERROR, error } if error.contains("refused")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[2].verdict, Verdict::Applied);
    let good_now = repo.get_batch(&good.id).await.unwrap().unwrap();
    assert!(good_now.orchestration.current_run.is_some());
    let _ = PhaseName::Spellcheck;
}
