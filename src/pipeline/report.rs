//! Report: publishes each final outcome to the status topic, then stores every attempt's outcome.
//!
//! Outcomes arrive in batches. The status messages of final outcomes (`sent`, `error`) are
//! published first, concurrently, with a bounded wait for the broker's acknowledgement; then the
//! whole batch is written in one round trip. An outcome whose status message was not
//! acknowledged is stored `unreported`, and the republisher publishes it later from MongoDB, so a
//! broker outage or a crash loses no status message (one may be published twice). Publishing
//! first saves a second write per letter (clearing a mark) on the common path.

use std::{sync::Arc, time::Duration};

use futures::future::join_all;
use mongodb::bson::oid::ObjectId;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    chore::chore,
    deliverability::suppression::Suppressions,
    kafka::StatusProducer,
    metrics::Metrics,
    model::{AttemptRecord, IdSet, Letter, Outcome, Status, StatusWriter},
    store::Store,
};

/// Most outcomes written in one round trip.
const WRITE_BATCH: usize = 256;
/// How long a batch waits for the broker while it answers; acknowledgements take milliseconds.
const PUBLISH_WAIT: Duration = Duration::from_secs(5);
/// How long a batch waits while the broker is known to be failing, so an outage does not slow
/// sending down: those outcomes are stored unreported and republished later.
const PUBLISH_WAIT_DEGRADED: Duration = Duration::from_millis(200);

/// An attempt's record on its way to the report stage, with the permits it holds until its
/// outcome is stored and published.
#[derive(Debug)]
pub struct Attempted {
    pub record: AttemptRecord,
    /// The worker's `unrecorded` permit: it bounds the sends a crash could repeat.
    pub unrecorded: Option<OwnedSemaphorePermit>,
    /// The letter's share of the dispatcher's memory budget (the status message needs the body).
    pub memory: Option<OwnedSemaphorePermit>,
}

#[derive(Clone)]
pub struct Report {
    pub store: Store,
    pub producer: StatusProducer,
    pub topic: String,
    pub owner: String,
    pub metrics: Arc<Metrics>,
    /// Larger bodies are left out of status messages.
    pub body_max: usize,
    /// Learns of refusals meaning "no such mailbox".
    pub suppressions: Suppressions,
    /// `SMTP_SANDBOX`: learns of stored outcomes, to make the simulator addresses' events.
    pub sandbox: Option<crate::feedback::sandbox::Simulator>,
}

impl Report {
    /// Runs until every worker has dropped its sender, so no outcome is left unwritten at
    /// shutdown. `shutdown` only bounds how long a failing write is retried once shutting down.
    pub async fn run(self, mut outcomes: mpsc::Receiver<Attempted>, shutdown: CancellationToken) {
        let mut received = Vec::with_capacity(WRITE_BATCH);
        let mut broker_healthy = true;
        // Kept from batch to batch: a campaign's body is escaped once, not once per batch.
        let mut writer = StatusWriter::default();
        while outcomes.recv_many(&mut received, WRITE_BATCH).await > 0 {
            // The permits are held until the batch is written, at the end of this round.
            let (mut batch, _held): (Vec<AttemptRecord>, Vec<_>) =
                received.drain(..).map(|a| (a.record, (a.unrecorded, a.memory))).unzip();
            for record in &mut batch {
                final_status(record);
            }
            let finals: Vec<&Letter> = batch
                .iter()
                .filter(|r| matches!(r.outcome, Outcome::Sent | Outcome::Failed { .. }))
                .map(|r| &r.letter)
                .collect();
            self.suppressions.note_hard_bounces(finals.iter().copied());
            let wait = if broker_healthy { PUBLISH_WAIT } else { PUBLISH_WAIT_DEGRADED };
            let published = self.publish(&finals, wait, &mut writer).await;
            broker_healthy = published.len() == finals.len();
            for record in &mut batch {
                record.published = published.contains(&record.letter.id);
            }
            self.write(&batch, &shutdown).await;
            if let Some(sandbox) = &self.sandbox {
                sandbox.stored(&batch);
            }
        }
        tracing::debug!("report stopped");
    }

    async fn write(&self, batch: &[AttemptRecord], shutdown: &CancellationToken) {
        let mut pause = Duration::from_millis(200);
        loop {
            match self.store.record(&self.owner, batch).await {
                Ok(0) => return,
                Ok(lost) => {
                    tracing::warn!(lost, "outcomes not recorded: the lease had passed to another instance");
                    return;
                }
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        outcomes = batch.len(),
                        "recording outcomes failed; retrying"
                    );
                    if shutdown.is_cancelled() && pause >= Duration::from_secs(2) {
                        // The letters stay `processing` and are retried by whoever reaps their
                        // leases: at least once, never lost.
                        tracing::error!(outcomes = batch.len(), "giving up recording outcomes at shutdown");
                        return;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Publishes status messages concurrently; returns the ids the broker acknowledged within
    /// `wait`.
    async fn publish(&self, letters: &[&Letter], wait: Duration, writer: &mut StatusWriter) -> IdSet {
        let sends = letters.iter().map(|letter| {
            let payload = writer.write(letter, self.body_max);
            async move { self.send_status(letter, payload, wait).await }
        });
        let published: IdSet = join_all(sends).await.into_iter().flatten().collect();
        self.metrics.published.inc_by(published.len() as u64);
        published
    }

    /// Sends one status message; its letter's id once the broker acknowledged it within `wait`.
    async fn send_status(
        &self,
        letter: &Letter,
        payload: serde_json::Result<Vec<u8>>,
        wait: Duration,
    ) -> Option<ObjectId> {
        let payload = match payload {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(letter_id = %letter.id, error = %error, "status message not serialisable");
                return None;
            }
        };
        let key = letter.key_bytes();
        let send = self.producer.send(&self.topic, key.as_deref(), &payload, None);
        match tokio::time::timeout(wait, send).await {
            Ok(Ok(_)) => Some(letter.id),
            Ok(Err(error)) => {
                tracing::warn!(letter_id = %letter.id, kafka_key = %letter.kafkakey, error = %error, "status message not published; stored for republishing");
                None
            }
            Err(_) => {
                tracing::warn!(letter_id = %letter.id, kafka_key = %letter.kafkakey, "status message not acknowledged in time; stored for republishing");
                None
            }
        }
    }

    /// Republishes final outcomes that were stored but never acknowledged by the broker. Only
    /// outcomes older than `min_age` (longer than the producer's message timeout) are taken, as
    /// younger ones may still be on their way through the producer.
    pub async fn republish(self, interval: Duration, batch: usize, min_age: Duration, shutdown: CancellationToken) {
        let this = &self;
        chore("the republisher", interval, shutdown, move || async move {
            let before = this.store.now_ms() - min_age.as_millis() as i64;
            let letters = match this.store.unreported(before, batch).await {
                Ok(letters) if letters.is_empty() => return,
                Ok(letters) => letters,
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "looking for unreported outcomes failed");
                    return;
                }
            };
            let published =
                this.publish(&letters.iter().collect::<Vec<_>>(), PUBLISH_WAIT, &mut StatusWriter::default()).await;
            tracing::info!(found = letters.len(), published = published.len(), "republished unreported outcomes");
            let failed: Vec<ObjectId> = letters.iter().map(|l| l.id).filter(|id| !published.contains(id)).collect();
            if let Err(error) = this.store.postpone_unreported(&failed, this.store.now_ms()).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    count = failed.len(),
                    "postponing unreported outcomes failed"
                );
            }
            let ids: Vec<ObjectId> = published.into_iter().collect();
            if let Err(error) = this.store.mark_reported(&ids).await {
                // Harmless: they are published again next time, at worst twice.
                tracing::warn!(error = format!("{error:#}"), count = ids.len(), "marking outcomes reported failed");
            }
        })
        .await;
    }
}

impl Report {
    /// Publishes the status messages of letters an operator ended (cancelled), and marks those
    /// the broker acknowledged as reported; the rest stay `unreported` for the republisher.
    /// Returns how many were published now.
    pub async fn publish_ended(&self, letters: &[Letter]) -> anyhow::Result<usize> {
        let mut count = 0;
        let mut writer = StatusWriter::default();
        for chunk in letters.chunks(WRITE_BATCH) {
            let published = self.publish(&chunk.iter().collect::<Vec<_>>(), PUBLISH_WAIT, &mut writer).await;
            let ids: Vec<ObjectId> = published.into_iter().collect();
            self.store.mark_reported(&ids).await?;
            count += ids.len();
        }
        Ok(count)
    }
}

/// Sets the status (and reason) the status message must carry for a final outcome.
fn final_status(record: &mut AttemptRecord) {
    match &record.outcome {
        Outcome::Sent => record.letter.status = Status::Sent,
        Outcome::Failed { reason, .. } => {
            record.letter.status = Status::Error;
            record.letter.error = Some(reason.clone());
        }
        Outcome::Retry { .. } | Outcome::Released => {}
    }
}
