//! Ingest: Kafka batches in, letters stored in MongoDB, offsets stored only after that.
//!
//! Messages are gathered for a short linger and written with one insert, so MongoDB sees one
//! round trip per few hundred letters. Each letter's `source` (topic/partition/offset/index@timestamp) is
//! unique in MongoDB, which makes a redelivered message harmless. A message that is not a batch
//! goes to the dead-letter topic with the reason and its coordinates, and its offset moves on.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rdkafka::{
    Message,
    consumer::{CommitMode, Consumer},
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    config::KafkaConfig,
    kafka::{IngestConsumer, StatusProducer},
    metrics::Metrics,
    model::{Letter, Mailing, parse_batch},
    store::{DeadLetterRecord, Store},
};

/// A Kafka message that is not a batch, with where it came from.
#[derive(Debug)]
struct DeadLetter {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    reason: String,
}

/// What has been read from Kafka but is not durable yet.
#[derive(Default)]
struct Pending {
    letters: Vec<Letter>,
    /// Partition and offset of each letter's message, for the dead-letter topic.
    origins: Vec<(i32, i64)>,
    dead: Vec<DeadLetter>,
    /// Highest offset read per partition.
    offsets: BTreeMap<i32, i64>,
    /// Payload bytes read, so a few big messages are written at once rather than lingering.
    bytes: usize,
    /// A letter goes before those the dispatcher may hold: claim it at once when stored.
    express: bool,
}

/// The linger once a letter that goes before those held (a transactional one, a new batch's first)
/// is pending: long enough for the messages librdkafka already fetched to join its insert, short
/// against the unit spacing such a letter is promised.
const EXPRESS_LINGER: Duration = Duration::from_millis(1);

/// Pending payload bytes that end the linger early: with megabyte bodies, `INGEST_BATCH` letters
/// would otherwise be held in memory at once.
const PENDING_BYTES: usize = 8 << 20;

impl Pending {
    fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }
}

pub struct Ingest {
    pub consumer: Arc<IngestConsumer>,
    pub producer: StatusProducer,
    pub store: Store,
    pub config: KafkaConfig,
    pub metrics: Arc<Metrics>,
    pub wake: Arc<Notify>,
    /// Woken when a stored letter goes before those the dispatcher may hold (`priority`).
    pub express: Arc<Notify>,
    /// Gives each letter its place in its lane's fair order.
    pub fairness: Arc<crate::priority::Fairness>,
    /// Whether the consumer loop is running, for readiness.
    pub running: Arc<AtomicBool>,
}

impl Ingest {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.consumer.subscribe(&[&self.config.topic_in])?;
        self.running.store(true, Ordering::Relaxed);
        let mut pending = Pending::default();
        let mut deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.flush(&mut pending, &shutdown).await;
                    deadline = None;
                }
                message = self.consumer.recv() => match message {
                    Ok(message) => {
                        self.add(&mut pending, &message);
                        let linger = if pending.express { EXPRESS_LINGER } else { self.config.ingest_linger };
                        let due = Instant::now() + linger;
                        deadline = Some(deadline.map_or(due, |deadline| deadline.min(due)));
                        if pending.letters.len() >= self.config.ingest_batch || pending.bytes >= PENDING_BYTES {
                            self.flush(&mut pending, &shutdown).await;
                            deadline = None;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(error = %error, "kafka consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
        self.running.store(false, Ordering::Relaxed);
        // Whatever was read is still written once; if that fails, its offsets stay uncommitted
        // and the next owner of the partition reads it again.
        if !pending.is_empty() {
            let attempt_once = CancellationToken::new();
            attempt_once.cancel();
            self.flush(&mut pending, &attempt_once).await;
        }
        if let Err(error) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %error, "final offset commit");
        }
        self.consumer.unsubscribe();
        tracing::info!("ingest stopped");
        Ok(())
    }

    fn add(&self, pending: &mut Pending, message: &rdkafka::message::BorrowedMessage<'_>) {
        let (partition, offset) = (message.partition(), message.offset());
        pending.offsets.insert(partition, offset);
        pending.bytes += message.payload_len();
        let key = message.key().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
        match parse_batch(message.payload().unwrap_or_default()) {
            Ok(mailings) => {
                self.metrics.received.inc_by(mailings.len() as u64);
                let now = self.store.now_ms();
                // The message's timestamp makes the identity one a recreated topic (or another
                // cluster), whose offsets start again at 0, cannot collide with; a redelivery of
                // the same message carries the same timestamp.
                let stamp = message.timestamp().to_millis().map(|ms| format!("@{ms}")).unwrap_or_default();
                let first = pending.letters.len();
                // `topic/partition/offset/index@stamp`, the prefix made once a message.
                let prefix = format!("{}/{partition}/{offset}/", self.config.topic_in);
                let mut digits = itoa::Buffer::new();
                for (index, mailing) in mailings.into_iter().enumerate() {
                    let index = digits.format(index);
                    let mut source = String::with_capacity(prefix.len() + index.len() + stamp.len());
                    source.push_str(&prefix);
                    source.push_str(index);
                    source.push_str(&stamp);
                    let letter =
                        Letter::from_mailing_within(mailing, message.key(), source, now, &self.config.attachments);
                    pending.letters.push(letter);
                    pending.origins.push((partition, offset));
                }
                pending.express |= self.fairness.tag(&mut pending.letters[first..], now);
            }
            Err(error) => {
                tracing::warn!(partition, offset, kafka_key = %key, reason = %error, "malformed message sent to the dead-letter topic");
                pending.dead.push(DeadLetter {
                    partition,
                    offset,
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().unwrap_or_default().to_vec(),
                    reason: error.to_string(),
                });
            }
        }
    }

    /// Makes everything pending durable, then stores the offsets. Retries while MongoDB or the
    /// broker is unreachable: not consuming meanwhile is the back-pressure.
    async fn flush(&self, pending: &mut Pending, shutdown: &CancellationToken) {
        let mut batch = std::mem::take(pending);
        let has_letters = !batch.letters.is_empty();
        let mut pause = Duration::from_millis(200);
        let durable = loop {
            match self.write(&mut batch).await {
                Ok(()) => break true,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        letters = batch.letters.len(),
                        retry_in_ms = pause.as_millis() as u64,
                        "storing a batch failed; consumption paused"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => break false,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        };
        if !durable {
            return;
        }
        for (partition, offset) in &batch.offsets {
            // Fails only if the partition was revoked meanwhile; its new owner re-reads the
            // messages and the unique source index drops the repeats.
            if let Err(error) = self.consumer.store_offset(&self.config.topic_in, *partition, *offset) {
                tracing::debug!(partition, offset, error = %error, "offset not stored");
            }
        }
        if has_letters {
            self.wake.notify_one();
        }
        if batch.express {
            self.express.notify_one();
        }
    }

    /// Stores the letters, then sets the dead letters aside. What is done is taken out of
    /// `batch`, so a retry after a failure repeats only the rest.
    async fn write(&self, batch: &mut Pending) -> anyhow::Result<()> {
        if !batch.letters.is_empty() {
            let report = self.store.insert(&batch.letters).await?;
            self.metrics.stored.inc_by(report.inserted as u64);
            self.metrics.duplicates.inc_by(report.duplicates.len() as u64);
            if !report.duplicates.is_empty() {
                tracing::warn!(
                    duplicates = report.duplicates.len(),
                    sources = ?report.duplicates,
                    "skipped letters whose source (topic/partition/offset/index@timestamp) is already stored: a redelivered message"
                );
            }
            for unstorable in report.unstorable {
                let letter = &batch.letters[unstorable.index];
                let (partition, offset) = batch.origins[unstorable.index];
                tracing::error!(partition, offset, reason = %unstorable.reason, "a letter MongoDB cannot store goes to the dead-letter topic");
                batch.dead.push(DeadLetter {
                    partition,
                    offset,
                    key: letter.key_bytes(),
                    payload: mailing_payload(letter),
                    reason: unstorable.reason,
                });
            }
            batch.letters.clear();
            batch.origins.clear();
        }
        while let Some(dead) = batch.dead.first() {
            self.set_aside(dead).await?;
            batch.dead.remove(0);
        }
        Ok(())
    }

    /// Writes a dead letter to the dead-letter topic or, when that topic does not take it
    /// (missing, refused, or the broker unreachable for all of `KAFKA_MESSAGE_TIMEOUT`), to
    /// MongoDB: either way it is kept and its partition moves on. Fails only when neither can be
    /// written, and then the caller retries.
    async fn set_aside(&self, dead: &DeadLetter) -> anyhow::Result<()> {
        // The copy must fit the broker's limit, or the dead letter itself would block the
        // partition; the original stays in the input topic until its retention.
        let keep = dead.payload.len().min(self.config.dlq_max_bytes);
        let size = dead.payload.len().to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: "x-error", value: Some(dead.reason.as_bytes()) })
            .insert(Header { key: "x-source-topic", value: Some(self.config.topic_in.as_bytes()) })
            .insert(Header { key: "x-source-partition", value: Some(dead.partition.to_string().as_bytes()) })
            .insert(Header { key: "x-source-offset", value: Some(dead.offset.to_string().as_bytes()) });
        if keep < dead.payload.len() {
            headers = headers
                .insert(Header { key: "x-truncated", value: Some(b"true".as_slice()) })
                .insert(Header { key: "x-original-size", value: Some(size.as_bytes()) });
        }
        let produced =
            self.producer.send(&self.config.topic_dlq, dead.key.as_deref(), &dead.payload[..keep], Some(headers)).await;
        let error = match produced {
            Ok(()) => {
                self.metrics.dead_letters.inc();
                return Ok(());
            }
            // Only the local queue is full: nothing was tried yet.
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                anyhow::bail!("producing to the dead-letter topic: the local queue is full")
            }
            Err(error) => error,
        };
        let dlq_error = error.to_string();
        self.store
            .keep_dead_letter(&DeadLetterRecord {
                topic: &self.config.topic_in,
                partition: dead.partition,
                offset: dead.offset,
                key: dead.key.as_deref(),
                payload: &dead.payload,
                reason: &dead.reason,
                dlq_error: &dlq_error,
            })
            .await?;
        self.metrics.dead_letters_kept.inc();
        tracing::error!(
            partition = dead.partition,
            offset = dead.offset,
            reason = %dead.reason,
            dlq_error = %dlq_error,
            topic_dlq = %self.config.topic_dlq,
            "the dead-letter topic did not take a dead letter: kept in MongoDB instead"
        );
        Ok(())
    }
}

/// The letter as a one-mailing batch, the shape its producer sent.
fn mailing_payload(letter: &Letter) -> Vec<u8> {
    let mut mailing = Mailing {
        subject: letter.subject.clone(),
        body: letter.body.clone(),
        addresses: letter.addresses.clone(),
        token: letter.token.clone(),
        extra: crate::lanes::MailingExtra {
            lane: Some(serde_json::Value::from(letter.lane.as_str())),
            tenant: letter.tenant.clone().map(serde_json::Value::from),
            weight: letter.weight.map(serde_json::Value::from),
            ..crate::lanes::MailingExtra::from_stored(letter.send_at_ms, letter.not_after_ms, &letter.metadata)
        },
    };
    // Attachments (issue 19), in the shape the producer sent them.
    if !letter.attachments.is_empty() {
        mailing.extra.attachments =
            Some(serde_json::Value::Array(letter.attachments.iter().map(|a| a.to_json()).collect()));
    }
    serde_json::to_vec(&[mailing]).unwrap_or_default()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
