//! The deployment-wide control document: whether sending is paused.
//!
//! One document in `<collection>_control`, written by `POST /pause` and `POST /resume` on any
//! replica and read by every replica every [`POLL_INTERVAL`] (the Mongo-wire server we test on has
//! no change streams). A replica reads it before its first claim, so one started while the
//! deployment is paused sends nothing. Pausing stops the dispatcher claiming and the workers
//! starting a send; sends in flight finish and are recorded, and letters claimed but not started
//! go back to `awaiting`, so a batch cancelled while paused loses none of them to a replica's
//! memory.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use mongodb::{
    Collection, Database,
    bson::{Bson, Document, doc},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often each replica reads the control document: a pause takes effect everywhere within
/// this plus one MongoDB round trip.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

const DOCUMENT_ID: &str = "dispatch";

/// The control state as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ControlState {
    pub paused: bool,
    /// When it last changed, Unix milliseconds; 0 when never set.
    pub updated_ms: i64,
    /// The instance whose API changed it last.
    pub updated_by: Option<String>,
}

#[derive(Clone)]
pub struct Control {
    documents: Collection<Document>,
    /// Read by the workers before every send, without waiting.
    flag: Arc<AtomicBool>,
    /// For the dispatcher to sleep until resumed.
    state: Arc<watch::Sender<bool>>,
    metrics: Arc<Metrics>,
}

impl Control {
    pub fn new(db: &Database, letters_collection: &str, metrics: Arc<Metrics>) -> Control {
        Control {
            documents: db.collection(&format!("{letters_collection}_control")),
            flag: Arc::default(),
            state: Arc::new(watch::Sender::new(false)),
            metrics,
        }
    }

    pub fn is_paused(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// The flag the SMTP workers check before each send.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// Returns once sending is not paused (at once when it is not).
    pub async fn resumed(&self) {
        let mut state = self.state.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = state.wait_for(|paused| !paused).await;
    }

    fn apply(&self, paused: bool) {
        let was = self.flag.swap(paused, Ordering::Relaxed);
        self.state.send_replace(paused);
        self.metrics.paused.set(i64::from(paused));
        if was != paused {
            tracing::info!(paused, "sending {}", if paused { "paused" } else { "resumed" });
        }
    }

    /// Reads the stored state and applies it to this replica.
    pub async fn load(&self) -> anyhow::Result<ControlState> {
        let document =
            self.documents.find_one(doc! { "_id": DOCUMENT_ID }).await.context("reading the control document")?;
        let state =
            document.map(|d| state_of(&d)).unwrap_or(ControlState { paused: false, updated_ms: 0, updated_by: None });
        self.apply(state.paused);
        Ok(state)
    }

    /// Stores the state for every replica, and applies it here at once.
    pub async fn set_paused(&self, paused: bool, by: &str, now_ms: i64) -> anyhow::Result<ControlState> {
        // An integer: the Mongo-wire server stores booleans set by `$set` as integers anyway.
        let fields = doc! { "paused": i32::from(paused), "updated_ms": now_ms, "updated_by": by };
        // Update, else insert (upserts are not relied on; see `Store::try_lock`); a concurrent
        // first insert from another replica makes the second update win.
        for _ in 0..2 {
            let updated = self
                .documents
                .update_one(doc! { "_id": DOCUMENT_ID }, doc! { "$set": fields.clone() })
                .await
                .context("writing the control document")?;
            if updated.matched_count == 1 {
                break;
            }
            let mut document = fields.clone();
            document.insert("_id", DOCUMENT_ID);
            match self.documents.insert_one(document).await {
                Ok(_) => break,
                Err(error) if is_duplicate(&error) => continue,
                Err(error) => return Err(anyhow::Error::new(error).context("creating the control document")),
            }
        }
        self.apply(paused);
        Ok(ControlState { paused, updated_ms: now_ms, updated_by: Some(by.to_owned()) })
    }

    /// Follows the stored state until `shutdown`. A failed read keeps the last known state: a
    /// replica cut off from MongoDB cannot claim letters anyway.
    pub async fn watch(self, shutdown: CancellationToken) {
        // The state was read at start-up (`App::build`): the first read is one interval later.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + POLL_INTERVAL, POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            if let Err(error) = self.load().await {
                tracing::debug!(error = format!("{error:#}"), "reading the control document failed");
            }
        }
    }
}

fn state_of(document: &Document) -> ControlState {
    let paused = match document.get("paused") {
        Some(Bson::Boolean(b)) => *b,
        Some(Bson::Int32(n)) => *n != 0,
        Some(Bson::Int64(n)) => *n != 0,
        _ => false,
    };
    let updated_ms = match document.get("updated_ms") {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        _ => 0,
    };
    ControlState { paused, updated_ms, updated_by: document.get_str("updated_by").ok().map(str::to_owned) }
}

fn is_duplicate(error: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    matches!(error.kind.as_ref(), ErrorKind::Write(WriteFailure::WriteError(e)) if e.code == 11000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_flags_of_any_shape_are_read() {
        assert!(state_of(&doc! { "paused": 1_i32 }).paused);
        assert!(state_of(&doc! { "paused": true }).paused);
        assert!(!state_of(&doc! { "paused": 0_i64 }).paused);
        assert!(!state_of(&doc! {}).paused);
        let state = state_of(&doc! { "paused": 1_i32, "updated_ms": 42_i64, "updated_by": "pod-a" });
        assert_eq!(state, ControlState { paused: true, updated_ms: 42, updated_by: Some("pod-a".into()) });
    }
}
