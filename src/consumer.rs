//! Kafka in. One loop fetches and hands each record to its partition's queue;
//! each partition is applied by a task of its own, so a partition that must
//! retry holds nobody else. A partition's offset is stored only after its
//! records are committed (or dead-lettered), and librdkafka commits stored
//! offsets in the background, on revoke and on close. A partition whose queue
//! fills up is paused until its task catches up.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use crate::apply::{prepare, Applier, Outcome, Record, Verdict};
use crate::config::{ConsumerSettings, KafkaSettings};
use crate::health::Health;
use crate::kafka::{consumer_config, Assignment, ConsumerEvents};
use crate::metrics::Metrics;
use crate::throttle::Throttled;

type PartitionKey = (String, i32);
type BosConsumer = StreamConsumer<ConsumerEvents>;

/// Creates the consumer and subscribes it to every consumed topic.
pub fn subscribe(
    kafka: &KafkaSettings,
    metrics: Arc<Metrics>,
) -> Result<(Arc<BosConsumer>, mpsc::UnboundedReceiver<Assignment>), KafkaError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let consumer: BosConsumer =
        consumer_config(kafka).create_with_context(ConsumerEvents::new(tx, metrics))?;
    let names: Vec<String> = kafka.consumed().iter().map(|t| kafka.topic(t)).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    Ok((Arc::new(consumer), rx))
}

/// What the partition tasks share.
pub struct Shared {
    pub consumer: Arc<BosConsumer>,
    pub applier: Applier,
    pub kafka: KafkaSettings,
    pub settings: ConsumerSettings,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Notified after each commit that may have written outbox rows.
    pub outbox_written: Arc<Notify>,
    retries: Throttled,
}

/// One partition's waiting records.
#[derive(Default)]
struct Queue {
    records: Mutex<VecDeque<(Record, Instant)>>,
    ready: Notify,
}

impl Queue {
    fn push(&self, record: Record) -> usize {
        let mut q = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        q.push_back((record, Instant::now()));
        let n = q.len();
        drop(q);
        self.ready.notify_one();
        n
    }

    fn take(&self, max: usize) -> (Vec<Record>, Option<Instant>) {
        let mut q = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = q.len().min(max);
        let first = q.front().map(|(_, at)| *at);
        (q.drain(..n).map(|(r, _)| r).collect(), first)
    }

    fn oldest(&self) -> (usize, Option<Instant>) {
        let q = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (q.len(), q.front().map(|(_, at)| *at))
    }
}

struct PartitionTask {
    queue: Arc<Queue>,
    stop: watch::Sender<bool>,
}

/// The consuming side of `bos run`.
pub struct Consumer {
    shared: Arc<Shared>,
    assignments: mpsc::UnboundedReceiver<Assignment>,
}

impl Consumer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        consumer: Arc<BosConsumer>,
        assignments: mpsc::UnboundedReceiver<Assignment>,
        applier: Applier,
        kafka: KafkaSettings,
        settings: ConsumerSettings,
        health: Arc<Health>,
        outbox_written: Arc<Notify>,
    ) -> Self {
        let metrics = applier.metrics.clone();
        Self {
            shared: Arc::new(Shared {
                consumer,
                applier,
                kafka,
                settings,
                health,
                metrics,
                outbox_written,
                retries: Throttled::new(Duration::from_secs(10)),
            }),
            assignments,
        }
    }

    fn detach(&self, message: &rdkafka::message::BorrowedMessage<'_>) -> Record {
        let headers = message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Record {
            topic: self.shared.kafka.unprefixed(message.topic()).to_owned(),
            source_topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            produced_at_ms: message.timestamp().to_millis(),
        }
    }

    fn tpl(&self, key: &PartitionKey) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.shared.kafka.topic(&key.0), key.1);
        tpl
    }

    /// Consumes until `shutdown` turns true; then lets every partition finish
    /// the records it is applying, commits, and returns. A partition task that
    /// fails or panics ends the consumer with an error.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let shared = self.shared.clone();
        let mut partitions: HashMap<PartitionKey, PartitionTask> = HashMap::new();
        let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
        let mut paused: HashSet<PartitionKey> = HashSet::new();
        let (resume_tx, mut resume_rx) = mpsc::unbounded_channel::<PartitionKey>();
        let errors = Throttled::new(Duration::from_secs(10));
        let mut gauges = tokio::time::interval(Duration::from_secs(1));
        let mut lag_measured = Instant::now();
        let mut stop_signal = shutdown.clone();
        let result: anyhow::Result<()> = loop {
            shared.health.consumer_turned();
            tokio::select! {
                biased;
                () = crate::signal::stopped(&mut stop_signal) => break Ok(()),
                Some(joined) = tasks.join_next() => match joined {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e.context("a partition task failed")),
                    Err(e) => break Err(anyhow::anyhow!("a partition task panicked: {e}")),
                },
                Some(change) = self.assignments.recv() => {
                    if let Assignment::Revoked(revoked) = change {
                        for (topic, partition) in revoked {
                            let key = (shared.kafka.unprefixed(&topic).to_owned(), partition);
                            if let Some(task) = partitions.remove(&key) {
                                let _ = task.stop.send(true);
                            }
                            paused.remove(&key);
                            shared.health.partition_gone(&key);
                            shared.metrics.partition_stuck_seconds
                                .with_label_values(&[&key.0, &key.1.to_string()])
                                .set(0.0);
                        }
                    }
                }
                Some(key) = resume_rx.recv() => {
                    if paused.remove(&key) && partitions.contains_key(&key) {
                        if let Err(e) = shared.consumer.resume(&self.tpl(&key)) {
                            tracing::warn!(error = %e, topic = %key.0, partition = key.1, "resume failed");
                        }
                    }
                }
                _ = gauges.tick() => {
                    for ((topic, partition), seconds) in shared.health.stuck_seconds() {
                        shared.metrics.partition_stuck_seconds
                            .with_label_values(&[&topic, &partition.to_string()])
                            .set(seconds);
                    }
                    if lag_measured.elapsed() > Duration::from_secs(10) {
                        lag_measured = Instant::now();
                        let consumer = shared.consumer.clone();
                        let gauge = shared.metrics.consumer_lag.clone();
                        tokio::task::spawn_blocking(move || {
                            if let Ok(lag) = consumer_lag(&consumer) {
                                gauge.set(lag);
                            }
                        });
                    }
                }
                received = shared.consumer.recv() => match received {
                    Ok(message) => {
                        let record = self.detach(&message);
                        drop(message);
                        let key = (record.topic.clone(), record.partition);
                        let task = partitions.entry(key.clone()).or_insert_with(|| {
                            let queue = Arc::new(Queue::default());
                            let (stop, stopped) = watch::channel(false);
                            tasks.spawn(partition_task(
                                shared.clone(),
                                key.clone(),
                                queue.clone(),
                                stopped,
                                shutdown.clone(),
                                resume_tx.clone(),
                            ));
                            PartitionTask { queue, stop }
                        });
                        let waiting = task.queue.push(record);
                        if waiting >= shared.settings.partition_buffer && paused.insert(key.clone()) {
                            if let Err(e) = shared.consumer.pause(&self.tpl(&key)) {
                                tracing::warn!(error = %e, topic = %key.0, partition = key.1, "pause failed");
                                paused.remove(&key);
                            }
                        }
                    }
                    Err(KafkaError::MessageConsumptionFatal(code)) => {
                        break Err(anyhow::anyhow!("the Kafka consumer failed fatally: {code}"));
                    }
                    // Anything else is librdkafka reporting what it is already
                    // recovering from (a broker away, a request failing). Keep
                    // polling at once: the poll is also what serves the group's
                    // join and assignment, and errors queued during an outage
                    // must not be drained one per back-off.
                    Err(e) => {
                        errors.warn(&format!("consumer error: {e} (librdkafka retries on its own)"));
                    }
                },
            }
        };
        // Stop fetching; every partition finishes what it is applying.
        for task in partitions.values() {
            let _ = task.stop.send(true);
        }
        let mut failure = result.err();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(e) => {
                    failure = failure.or(Some(anyhow::anyhow!("a partition task panicked: {e}")));
                }
            }
        }
        let consumer = shared.consumer.clone();
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
                .await;
        match committed {
            Ok(Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "final offset commit failed (those records will be read again)");
            }
            Err(e) => tracing::warn!(error = %e, "final offset commit did not run"),
        }
        match failure {
            Some(e) => Err(e),
            None => {
                tracing::info!("consumer drained: in-flight records finished, offsets committed");
                Ok(())
            }
        }
    }
}

/// Applies one partition's records until told to stop.
async fn partition_task(
    shared: Arc<Shared>,
    key: PartitionKey,
    queue: Arc<Queue>,
    mut stop: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    resume: mpsc::UnboundedSender<PartitionKey>,
) -> anyhow::Result<()> {
    loop {
        if *stop.borrow() || *shutdown.borrow() {
            return Ok(());
        }
        let (records, since) = queue.take(shared.settings.max_batch);
        let Some(since) = since else {
            tokio::select! {
                _ = queue.ready.notified() => {}
                _ = stop.changed() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        };
        shared.health.partition_waiting(&key, since);
        let started = Instant::now();
        for r in &records {
            if let Some(ms) = r.produced_at_ms {
                let fetched = chrono::Utc::now().timestamp_millis() - ms;
                shared
                    .metrics
                    .stage_seconds
                    .with_label_values(&["fetch"])
                    .observe(fetched.max(0) as f64 / 1000.0);
            }
        }
        let Some(outcomes) =
            apply_with_retries(&shared, &key, &records, &mut stop, &mut shutdown).await
        else {
            // Stopped while retrying: these offsets stay uncommitted and are read again.
            return Ok(());
        };
        shared
            .metrics
            .handler_seconds
            .observe(started.elapsed().as_secs_f64());
        shared.outbox_written.notify_one();
        settle(&shared, &records, &outcomes);
        let (left, oldest) = queue.oldest();
        shared.health.partition_progress(&key, oldest);
        if left < shared.settings.partition_buffer / 2 {
            let _ = resume.send(key.clone());
        }
    }
}

/// Applies `records`, retrying transient failures with capped backoff; `None`
/// when told to stop first.
async fn apply_with_retries(
    shared: &Shared,
    key: &PartitionKey,
    records: &[Record],
    stop: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Vec<Outcome>> {
    let prepared: Vec<_> = records.iter().map(prepare).collect();
    let mut backoff = shared.settings.backoff_initial;
    loop {
        match shared.applier.apply(&prepared).await {
            Ok(outcomes) => return Some(outcomes),
            Err(e) => {
                shared
                    .metrics
                    .apply_retries
                    .with_label_values(&[e.class()])
                    .inc();
                shared.retries.warn(&format!(
                    "applying {} record(s) of {}[{}] failed: {e}; retrying in {backoff:?}",
                    records.len(),
                    key.0,
                    key.1
                ));
                tokio::select! {
                    _ = crate::signal::stopped(stop) => return None,
                    _ = crate::signal::stopped(shutdown) => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(shared.settings.backoff_max);
            }
        }
    }
}

/// Counts, and stores the offset of the last record (dead letters went out
/// through the outbox, in the transaction that settled them).
fn settle(shared: &Shared, records: &[Record], outcomes: &[Outcome]) {
    for (record, outcome) in records.iter().zip(outcomes) {
        shared
            .metrics
            .messages
            .with_label_values(&[record.topic.as_str(), outcome.verdict.label()])
            .inc();
        match &outcome.verdict {
            Verdict::DeadLetter { reason, error } => {
                shared
                    .metrics
                    .dead_letters
                    .with_label_values(&[reason])
                    .inc();
                tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset, reason, error, "dead-lettered");
            }
            Verdict::Ignored(why) => {
                tracing::info!(topic = %record.topic, offset = record.offset, why, "ignored");
            }
            Verdict::Duplicate => {
                shared.metrics.duplicates.inc();
                tracing::debug!(topic = %record.topic, offset = record.offset, "duplicate skipped");
            }
            Verdict::Applied => {}
        }
    }
    if let Some(last) = records.last() {
        if let Err(e) =
            shared
                .consumer
                .store_offset(&last.source_topic, last.partition, last.offset)
        {
            tracing::debug!(error = %e, "offset not stored (partition revoked?)");
        }
    }
}

/// Records behind the high watermark over the consumer's assigned partitions.
fn consumer_lag(consumer: &BosConsumer) -> rdkafka::error::KafkaResult<i64> {
    let positions = consumer.position()?;
    let mut lag = 0;
    for element in positions.elements() {
        let (_, high) = consumer.fetch_watermarks(
            element.topic(),
            element.partition(),
            Duration::from_secs(2),
        )?;
        if let Offset::Offset(position) = element.offset() {
            lag += (high - position).max(0);
        }
    }
    Ok(lag)
}
