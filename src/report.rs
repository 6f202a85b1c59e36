//! Report: stores each attempt's outcome, then publishes final outcomes to the status topic.
//!
//! Outcomes are written in batches, one round trip each. A final outcome is stored with an
//! `unreported` mark before it is published; the mark is cleared once the broker acknowledged
//! the status message. Whatever a broker outage or a crash left unpublished is found by the
//! republisher from MongoDB, so no status message is lost (one may be published twice).

use std::{sync::Arc, time::Duration};

use mongodb::bson::oid::ObjectId;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    model::{Letter, Status, StatusMessage, now_ms},
    store::{AttemptRecord, Outcome, Store},
};

/// Most outcomes written in one round trip.
const WRITE_BATCH: usize = 256;

#[derive(Clone)]
pub struct Report {
    pub store: Store,
    pub producer: FutureProducer,
    pub topic: String,
    pub owner: String,
    pub metrics: Arc<Metrics>,
}

impl Report {
    /// Runs until every worker has dropped its sender, so no outcome is left unwritten at
    /// shutdown. `shutdown` only bounds how long a failing write is retried once shutting down.
    pub async fn run(self, mut outcomes: mpsc::Receiver<AttemptRecord>, shutdown: CancellationToken) {
        let (reported_tx, reported_rx) = mpsc::channel::<ObjectId>(4096);
        let marker = tokio::spawn(mark_reported(self.store.clone(), reported_rx));
        let mut deliveries = JoinSet::new();
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while outcomes.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            self.write(&batch, &shutdown).await;
            for record in batch.drain(..) {
                let status = match &record.outcome {
                    Outcome::Sent => Status::Sent,
                    Outcome::Failed { .. } => Status::Error,
                    Outcome::Retry { .. } | Outcome::Released => continue,
                };
                let mut letter = record.letter;
                letter.status = status;
                if let Outcome::Failed { reason } = record.outcome {
                    letter.error = Some(reason);
                }
                deliveries.spawn(self.clone().publish(letter, reported_tx.clone()));
            }
            while deliveries.try_join_next().is_some() {}
        }
        drop(reported_tx);
        // Bounded: what is not acknowledged by then stays `unreported` and is republished.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while deliveries.join_next().await.is_some() {}
            let _ = marker.await;
        })
        .await;
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

    /// Publishes one status message and, once the broker acknowledged it, queues its id to be
    /// marked reported.
    async fn publish(self, letter: Letter, reported: mpsc::Sender<ObjectId>) {
        let payload = match serde_json::to_vec(&StatusMessage::from(&letter)) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(letter_id = %letter.id, error = %error, "status message not serialisable");
                return;
            }
        };
        let record = FutureRecord::to(&self.topic).key(&letter.kafkakey).payload(&payload);
        match self.producer.send(record, Duration::from_secs(5)).await {
            Ok(_) => {
                self.metrics.published.inc();
                let _ = reported.send(letter.id).await;
            }
            Err((error, _)) => tracing::warn!(
                letter_id = %letter.id, kafka_key = %letter.kafkakey, error = %error,
                "status message not published; it will be republished from MongoDB"
            ),
        }
    }

    /// Republishes final outcomes that were stored but never acknowledged by the broker. Only
    /// outcomes older than `min_age` (longer than the producer's message timeout) are taken, as
    /// younger ones may still be on their way through the producer.
    pub async fn republish(self, interval: Duration, min_age: Duration, shutdown: CancellationToken) {
        let (reported_tx, reported_rx) = mpsc::channel::<ObjectId>(4096);
        let marker = tokio::spawn(mark_reported(self.store.clone(), reported_rx));
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let before = now_ms() - min_age.as_millis() as i64;
            match self.store.unreported(before, 500).await {
                Ok(letters) if letters.is_empty() => {}
                Ok(letters) => {
                    tracing::info!(count = letters.len(), "republishing unreported outcomes");
                    let mut set = JoinSet::new();
                    for letter in letters {
                        set.spawn(self.clone().publish(letter, reported_tx.clone()));
                    }
                    while set.join_next().await.is_some() {}
                }
                Err(error) => tracing::warn!(error = format!("{error:#}"), "looking for unreported outcomes failed"),
            }
        }
        drop(reported_tx);
        let _ = marker.await;
    }
}

/// Clears `unreported` marks in batches.
async fn mark_reported(store: Store, mut ids: mpsc::Receiver<ObjectId>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while ids.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        if let Err(error) = store.mark_reported(&batch).await {
            // Harmless: they are republished later, at worst twice.
            tracing::warn!(error = format!("{error:#}"), count = batch.len(), "marking outcomes reported failed");
        }
        batch.clear();
    }
}
