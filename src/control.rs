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

use mongodb::bson::Bson;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use crate::store::{ControlState, PauseCause};
use crate::{
    chore::chore_after,
    clock::Clock,
    metrics::Metrics,
    model::Letter,
    store::{BatchKey, ControlStore, Store},
};

/// How often each replica reads the control document: a pause takes effect everywhere within
/// this plus one MongoDB round trip.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

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

#[derive(Clone)]
pub struct Control {
    documents: ControlStore,
    clock: Clock,
    /// Read by the workers before every send, without waiting.
    flag: Arc<AtomicBool>,
    /// For the dispatcher to sleep until resumed.
    state: Arc<watch::Sender<bool>>,
    cancels: Cancels,
    /// The stored state as last read or written here (`GET /` shows it; the brake starts from it).
    last: Arc<RwLock<ControlState>>,
    metrics: Arc<Metrics>,
}

impl Control {
    pub fn new(store: &Store, metrics: Arc<Metrics>) -> Control {
        Control {
            documents: store.control(),
            clock: store.clock().clone(),
            flag: Arc::default(),
            state: Arc::new(watch::Sender::new(false)),
            cancels: Cancels::default(),
            last: Arc::default(),
            metrics,
        }
    }

    /// The stored state as this replica last read it (within [`POLL_INTERVAL`]).
    pub fn state(&self) -> ControlState {
        self.last.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
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

    fn apply(&self, state: &ControlState) {
        let paused = state.paused;
        let was = self.flag.swap(paused, Ordering::Relaxed);
        self.state.send_replace(paused);
        self.metrics.paused.set(i64::from(paused));
        self.metrics.brake_paused.set(i64::from(state.cause == Some(PauseCause::Brake)));
        *self.last.write().unwrap_or_else(std::sync::PoisonError::into_inner) = state.clone();
        if was != paused {
            let reason = state.reason.as_deref().unwrap_or("");
            tracing::info!(paused, reason, "sending {}", if paused { "paused" } else { "resumed" });
        }
    }

    /// Reads the stored state (the pause and the cancelled batches, in one query) and applies it
    /// to this replica.
    pub async fn load(&self) -> anyhow::Result<ControlState> {
        let started = Instant::now();
        let since = self.clock.now_ms() - CANCEL_MEMORY_MS;
        let (state, cancelled) = self.documents.read(since).await?;
        self.apply(&state);
        self.cancels.replace(cancelled, started);
        Ok(state)
    }

    /// Records that the letters of `key` created until `now_ms` are cancelled, for every
    /// replica, and applies it here at once: a letter already claimed ends `cancelled` instead of
    /// being sent.
    pub async fn cancel(&self, key: &BatchKey, by: &str, now_ms: i64) -> anyhow::Result<()> {
        self.documents.cancel(key, by, now_ms, now_ms - CANCEL_MEMORY_MS).await?;
        self.cancels.change(key.clone(), Some(now_ms));
        Ok(())
    }

    /// Forgets the cancel of `key` (its letters are retried); says whether there was one. The
    /// other replicas forget it at their next read, within [`POLL_INTERVAL`].
    pub async fn forget_cancel(&self, key: &BatchKey) -> anyhow::Result<bool> {
        let forgotten = self.documents.forget_cancel(key).await?;
        self.cancels.change(key.clone(), None);
        Ok(forgotten)
    }

    /// Stores the state for every replica, and applies it here at once.
    pub async fn set_paused(&self, paused: bool, by: &str, now_ms: i64) -> anyhow::Result<ControlState> {
        let state = self.documents.set_paused(paused, by, now_ms).await?;
        self.apply(&state);
        Ok(state)
    }

    /// Pauses sending for the reputation brake with `reason`, unless the stored state changed
    /// since this replica read it (an operator resumed meanwhile); says whether it paused.
    pub async fn brake(&self, reason: &str, by: &str, now_ms: i64) -> anyhow::Result<bool> {
        let seen = self.state();
        if seen.paused || !self.documents.brake(&seen, reason, by, now_ms).await? {
            return Ok(false);
        }
        let state = ControlState {
            paused: true,
            updated_ms: now_ms,
            updated_by: Some(by.to_owned()),
            reason: Some(reason.to_owned()),
            cause: Some(PauseCause::Brake),
            resumed_ms: seen.resumed_ms,
        };
        self.apply(&state);
        Ok(true)
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

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
