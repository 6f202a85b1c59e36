//! The deployment-wide control documents: whether sending is paused, and which batches an
//! operator cancelled.
//!
//! Documents in `<collection>_control`, written by `POST /pause`, `POST /resume` and
//! `POST /batches/{key}/cancel` on any replica and read by every replica every [`POLL_INTERVAL`]
//! (the Mongo-wire server we test on has no change streams), in one query. A replica reads them
//! before its first claim, so one started while the deployment is paused sends nothing. Pausing
//! stops the dispatcher claiming and the workers starting a send; sends in flight finish and are
//! recorded, and letters claimed but not started go back to `awaiting`, so a batch cancelled while
//! paused loses none of them to a replica's memory. A cancel reaches the letters replicas have
//! already claimed through [`Cancels`]: a worker checks it, in memory, before it starts a send and
//! again before the message's final dot, and ends such a letter `cancelled` instead of sending it.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::TryStreamExt;
use mongodb::{
    Collection, Database,
    bson::{Bson, Document, doc},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    chore::chore_after,
    metrics::Metrics,
    model::{Letter, now_ms},
    store::BatchKey,
};

/// How often each replica reads the control document: a pause takes effect everywhere within
/// this plus one MongoDB round trip.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

const DOCUMENT_ID: &str = "dispatch";

/// How long a cancel is remembered. Letters claimed when it came may come back to `awaiting`
/// (a retry, a pause, a replica that died) and be claimed again much later; a week outlasts
/// every backoff and lease. Cancelled letters that are retried (`POST /batches/{key}/retry`)
/// forget it at once.
const CANCEL_MEMORY_MS: i64 = 7 * 24 * 3600 * 1000;

/// The batches cancelled by an operator, as this replica last read them: per batch key, when it
/// was cancelled (Unix ms). Read by the workers without waiting, so checking costs no query.
#[derive(Clone, Default)]
pub struct Cancels {
    inner: Arc<RwLock<CancelState>>,
}

#[derive(Default)]
struct CancelState {
    cancelled: HashMap<BatchKey, i64>,
    /// Changes made on this replica, kept a moment so that a read of the stored state that was
    /// already under way when they were made cannot undo them.
    local: Vec<(Instant, BatchKey, Option<i64>)>,
}

impl Cancels {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, CancelState> {
        // The guarded code cannot panic, so a poisoned lock still holds consistent data.
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, CancelState> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a letter of `probe`'s batch, created when the probe says, was cancelled. A letter
    /// created after the cancel (a producer that reuses a key) is not.
    pub fn covers(&self, probe: &CancelProbe) -> bool {
        let Some(key) = &probe.key else { return false };
        self.read().cancelled.get(key).is_some_and(|at_ms| probe.created_ms <= *at_ms)
    }

    fn change(&self, key: BatchKey, at_ms: Option<i64>) {
        let mut state = self.write();
        match at_ms {
            Some(at_ms) => state.cancelled.insert(key.clone(), at_ms),
            None => state.cancelled.remove(&key),
        };
        state.local.push((Instant::now(), key, at_ms));
    }

    /// Takes the stored state, read by a query that started at `read_started`.
    fn replace(&self, stored: HashMap<BatchKey, i64>, read_started: Instant) {
        let mut state = self.write();
        state.cancelled = stored;
        state.local.retain(|(at, _, _)| *at >= read_started);
        let local = std::mem::take(&mut state.local);
        for (_, key, at_ms) in &local {
            match at_ms {
                Some(at_ms) => state.cancelled.insert(key.clone(), *at_ms),
                None => state.cancelled.remove(key),
            };
        }
        state.local = local;
    }
}

/// What checking a letter against [`Cancels`] needs, taken when it is claimed.
#[derive(Debug, Clone)]
pub struct CancelProbe {
    key: Option<BatchKey>,
    created_ms: i64,
}

impl CancelProbe {
    pub fn of(letter: &Letter) -> CancelProbe {
        // The stored creation time, else the id's (whole seconds; the Go service's letters).
        let created_ms = match &letter.created_at {
            Some(Bson::DateTime(at)) => at.timestamp_millis(),
            _ => letter.id.timestamp().timestamp_millis(),
        };
        CancelProbe { key: BatchKey::of(letter), created_ms }
    }
}

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
    cancels: Cancels,
    metrics: Arc<Metrics>,
}

impl Control {
    pub fn new(db: &Database, letters_collection: &str, metrics: Arc<Metrics>) -> Control {
        Control {
            documents: db.collection(&format!("{letters_collection}_control")),
            flag: Arc::default(),
            state: Arc::new(watch::Sender::new(false)),
            cancels: Cancels::default(),
            metrics,
        }
    }

    /// The cancelled batches, which the workers check before each send.
    pub fn cancels(&self) -> Cancels {
        self.cancels.clone()
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

    /// Reads the stored state (the pause and the cancelled batches, in one query) and applies it
    /// to this replica.
    pub async fn load(&self) -> anyhow::Result<ControlState> {
        let started = Instant::now();
        let since = now_ms() - CANCEL_MEMORY_MS;
        let documents: Vec<Document> = self
            .documents
            .find(doc! { "$or": [ { "_id": DOCUMENT_ID }, { "kind": CANCEL_KIND, "at_ms": { "$gte": since } } ] })
            .await
            .context("reading the control documents")?
            .try_collect()
            .await
            .context("reading the control documents")?;
        let state = documents
            .iter()
            .find(|d| d.get_str("_id") == Ok(DOCUMENT_ID))
            .map(state_of)
            .unwrap_or(ControlState { paused: false, updated_ms: 0, updated_by: None });
        self.apply(state.paused);
        self.cancels.replace(documents.iter().filter_map(cancel_of).collect(), started);
        Ok(state)
    }

    /// Records that the letters of `key` created until `now_ms` are cancelled, for every
    /// replica, and applies it here at once: a letter already claimed ends `cancelled` instead of
    /// being sent.
    pub async fn cancel(&self, key: &BatchKey, by: &str, now_ms: i64) -> anyhow::Result<()> {
        let (id, mut document) = cancel_document(key);
        document.extend(doc! { "_id": &id, "kind": CANCEL_KIND, "at_ms": now_ms, "by": by });
        self.documents
            .replace_one(doc! { "_id": &id }, document)
            .upsert(true)
            .await
            .context("recording the cancel in the control collection")?;
        self.cancels.change(key.clone(), Some(now_ms));
        // Cancels past their memory are no longer read; deleting them keeps the collection small.
        let forgotten = doc! { "kind": CANCEL_KIND, "at_ms": { "$lt": now_ms - CANCEL_MEMORY_MS } };
        if let Err(error) = self.documents.delete_many(forgotten).await {
            tracing::debug!(error = %error, "deleting old cancels failed");
        }
        Ok(())
    }

    /// Forgets the cancel of `key` (its letters are retried); says whether there was one. The
    /// other replicas forget it at their next read, within [`POLL_INTERVAL`].
    pub async fn forget_cancel(&self, key: &BatchKey) -> anyhow::Result<bool> {
        let (id, _) = cancel_document(key);
        let deleted = self
            .documents
            .delete_one(doc! { "_id": &id })
            .await
            .context("forgetting a cancel in the control collection")?;
        self.cancels.change(key.clone(), None);
        Ok(deleted.deleted_count > 0)
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
        let control = &self;
        chore_after("the control watch", POLL_INTERVAL, shutdown, move || async move {
            if let Err(error) = control.load().await {
                tracing::debug!(error = format!("{error:#}"), "reading the control document failed");
            }
        })
        .await;
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

const CANCEL_KIND: &str = "cancel";

/// The `_id` of a batch's cancel document, and the field that holds its key.
fn cancel_document(key: &BatchKey) -> (String, Document) {
    match key {
        BatchKey::Text(text) => (format!("cancel:text:{text}"), doc! { "text": text }),
        BatchKey::Base64(b64) => (format!("cancel:b64:{b64}"), doc! { "b64": b64 }),
    }
}

fn cancel_of(document: &Document) -> Option<(BatchKey, i64)> {
    if document.get_str("kind") != Ok(CANCEL_KIND) {
        return None;
    }
    let key = match (document.get_str("text"), document.get_str("b64")) {
        (Ok(text), _) => BatchKey::Text(text.to_owned()),
        (_, Ok(b64)) => BatchKey::Base64(b64.to_owned()),
        _ => return None,
    };
    let at_ms = match document.get("at_ms") {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        _ => return None,
    };
    Some((key, at_ms))
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

    #[test]
    fn cancels_cover_the_letters_created_before_them() {
        let cancels = Cancels::default();
        let key = BatchKey::Text("k".into());
        let probe = |key: Option<BatchKey>, created_ms| CancelProbe { key, created_ms };
        let read_started = Instant::now();
        cancels.change(key.clone(), Some(100));
        assert!(cancels.covers(&probe(Some(key.clone()), 100)));
        assert!(!cancels.covers(&probe(Some(key.clone()), 101)), "a letter created after the cancel");
        assert!(!cancels.covers(&probe(Some(BatchKey::Text("other".into())), 1)));
        assert!(!cancels.covers(&probe(None, 1)), "a letter without a key belongs to no batch");
        // A read under way when the cancel was made does not undo it; a later one decides.
        cancels.replace(HashMap::new(), read_started);
        assert!(cancels.covers(&probe(Some(key.clone()), 1)));
        cancels.replace(HashMap::new(), Instant::now());
        assert!(!cancels.covers(&probe(Some(key.clone()), 1)));
        let (id, mut document) = cancel_document(&key);
        document.extend(doc! { "_id": id, "kind": CANCEL_KIND, "at_ms": 7_i32 });
        assert_eq!(cancel_of(&document), Some((key, 7)));
    }
}
