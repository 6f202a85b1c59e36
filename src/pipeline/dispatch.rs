//! The dispatcher: claims due letters from MongoDB in batches, leased to this instance, and hands
//! them to the SMTP workers through a bounded channel. It also keeps its leases alive and returns
//! letters whose owner died to `awaiting`.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use mongodb::bson::oid::ObjectId;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    chore::chore,
    config::DispatchConfig,
    control::{CancelProbe, Cancels},
    deliverability::suppression::Suppressions,
    model::{AttemptRecord, FailureKind, IdMap, IdSet, Letter, Outcome},
    pipeline::queue::LaneQueue,
    priority::{Fairness, Lane},
    store::{CANCELLED, ClaimLimit, LaneClaim, Store},
};

/// A letter leased to this instance, on its way to a worker. The permit bounds how many letters
/// the instance holds at once; it is released when the worker is done with the letter.
pub struct Claimed {
    pub letter: Letter,
    pub claimed_at: Instant,
    /// The letter's share of [`Memory`], kept until its outcome is stored (the report stage
    /// still needs the body for the status message).
    pub memory: Option<OwnedSemaphorePermit>,
    _permit: OwnedSemaphorePermit,
    _held: Held,
}

/// The bytes of letters the instance may hold at once, counted in KiB permits, so a backlog of
/// letters with megabyte bodies is claimed a few at a time instead of hundreds.
#[derive(Clone)]
pub struct Memory {
    permits: Arc<Semaphore>,
    total_kib: u32,
}

impl Memory {
    pub fn new(max_bytes: usize) -> Memory {
        let total_kib = u32::try_from(max_bytes / 1024).unwrap_or(u32::MAX).clamp(1, Semaphore::MAX_PERMITS as u32);
        Memory { permits: Arc::new(Semaphore::new(total_kib as usize)), total_kib }
    }

    /// Takes all that is free now, if anything is.
    fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        let free = self.permits.available_permits() as u32;
        (free > 0).then(|| self.permits.clone().try_acquire_many_owned(free).ok()).flatten()
    }

    /// Waits until at least half the budget is free, then takes all that is free.
    async fn reserve(&self) -> Option<OwnedSemaphorePermit> {
        let mut permit = self.permits.clone().acquire_many_owned(self.total_kib.div_ceil(2)).await.ok()?;
        let rest = self.permits.available_permits() as u32;
        if rest > 0
            && let Ok(more) = self.permits.clone().try_acquire_many_owned(rest)
        {
            permit.merge(more);
        }
        Some(permit)
    }
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024).max(1)
}

/// Keeps a letter in the lease clock's set of held letters until the worker is done with it.
struct Held {
    clock: Arc<LeaseClock>,
    id: ObjectId,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.clock.lock_held().remove(&self.id);
        // Its outcome is on its way to MongoDB, where the letter stays leased until it is
        // written: keep renewing it until a renewal finds it no longer ours.
        self.clock.lock_finishing().insert(self.id, Instant::now());
    }
}

/// A letter this process holds.
struct HeldLetter {
    claimed: Instant,
    /// Whether a renewal found it taken away.
    taken: bool,
    cancel: CancelProbe,
}

/// When our leases were last confirmed by MongoDB. A worker sends a letter only while its lease
/// is known to hold with a margin, so a replica cut off from MongoDB stops sending before the
/// others may take its letters over.
pub struct LeaseClock {
    epoch: Instant,
    lease: Duration,
    renewed_ms: AtomicU64,
    /// Letters this process holds (claimed, not yet finished by a worker).
    held: Mutex<IdMap<HeldLetter>>,
    /// Letters a worker finished whose outcome may not be stored yet: still leased to us in
    /// MongoDB, so still renewed, until a renewal no longer finds them ours.
    finishing: Mutex<IdMap<Instant>>,
    /// The batches an operator cancelled: a held letter of one is not sent.
    cancels: Cancels,
}

impl LeaseClock {
    pub fn new(lease: Duration, cancels: Cancels) -> LeaseClock {
        LeaseClock {
            epoch: Instant::now(),
            lease,
            renewed_ms: AtomicU64::new(0),
            held: Mutex::default(),
            finishing: Mutex::default(),
            cancels,
        }
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, IdMap<HeldLetter>> {
        // The guarded code cannot panic, so a poisoned lock still holds consistent data.
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_finishing(&self) -> std::sync::MutexGuard<'_, IdMap<Instant>> {
        self.finishing.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The letters whose leases maintenance renews: those this process holds, and those whose
    /// outcome may still be on its way to MongoDB. Never a letter it merely finds leased to its
    /// owner name (a claim whose reply was lost): that one must expire and be reaped.
    pub fn renewable(&self) -> Vec<ObjectId> {
        let mut ids: Vec<ObjectId> = self.lock_held().keys().copied().collect();
        ids.extend(self.lock_finishing().keys().copied());
        ids
    }

    /// A renewal started at `at` found `still_ours` leased to this process. Only those are
    /// confirmed: a letter claimed before `at` and missing there was taken over (reaped while this
    /// replica was cut off, and claimed by another) and must not be sent from here.
    fn renewed(&self, at: Instant, still_ours: &IdSet) -> usize {
        let mut lost = 0;
        for (id, held) in self.lock_held().iter_mut() {
            if held.claimed < at && !still_ours.contains(id) && !held.taken {
                held.taken = true;
                lost += 1;
            }
        }
        // Outcomes written (or leases lost) since: nothing left to renew for those. One finished
        // after the renewal started may be missing from the read-back only because it was
        // claimed after it; it stays until the next.
        self.lock_finishing().retain(|id, finished| *finished >= at || still_ours.contains(id));
        let ms = at.saturating_duration_since(self.epoch).as_millis() as u64;
        self.renewed_ms.fetch_max(ms, Ordering::Relaxed);
        lost
    }

    /// Whether a letter claimed at `claimed_at` is still safely ours.
    pub fn trusted(&self, claimed_at: Instant) -> bool {
        let renewed = self.epoch + Duration::from_millis(self.renewed_ms.load(Ordering::Relaxed));
        let margin = self.lease / 4;
        Instant::now() + margin < renewed.max(claimed_at) + self.lease
    }

    /// Checked right before a message's final dot, the moment the server takes it: how long the
    /// dot may take to write while the letter is still safely ours (the margin), or `None` when
    /// it no longer is and the message must be withdrawn. What remains unguarded is the wait for
    /// the server's reply to the dot.
    /// A letter whose batch was cancelled meanwhile is withdrawn too.
    pub fn vouch(&self, claimed_at: Instant, id: &ObjectId) -> Option<Duration> {
        (self.trusted(claimed_at) && !self.taken(id) && !self.cancelled(id)).then_some(self.lease / 4)
    }

    /// Whether the last renewal found this letter leased to someone else.
    pub fn taken(&self, id: &ObjectId) -> bool {
        self.lock_held().get(id).is_some_and(|held| held.taken)
    }

    /// Whether an operator cancelled the batch of this held letter. Memory only: the control
    /// watch keeps the cancelled batches current.
    pub fn cancelled(&self, id: &ObjectId) -> bool {
        self.lock_held().get(id).is_some_and(|held| self.cancels.covers(&held.cancel))
    }

    /// An attempt that would be retried, at a letter whose batch was cancelled meanwhile (the
    /// message withdrawn before its dot), ends `cancelled` instead.
    pub fn end_if_cancelled(&self, mut record: AttemptRecord) -> AttemptRecord {
        if matches!(record.outcome, Outcome::Retry { .. }) && self.cancelled(&record.letter.id) {
            tracing::info!(letter_id = %record.letter.id, "batch cancelled during the send; letter not retried");
            record.outcome = Outcome::Failed { kind: FailureKind::Cancelled, reason: CANCELLED.to_owned() };
        }
        record
    }

    fn hold(self: &Arc<Self>, letter: &Letter, at: Instant) -> Held {
        let held = HeldLetter { claimed: at, taken: false, cancel: CancelProbe::of(letter) };
        self.lock_held().insert(letter.id, held);
        Held { clock: self.clone(), id: letter.id }
    }
}

pub struct Dispatcher {
    pub store: Store,
    pub config: DispatchConfig,
    pub owner: String,
    /// While paused deployment-wide, nothing is claimed.
    pub control: crate::control::Control,
    /// Letters this instance may hold at once (claimed and not yet finished by a worker).
    pub capacity: Arc<Semaphore>,
    pub wake: Arc<Notify>,
    pub lease: Arc<LeaseClock>,
    /// Free slots needed before the next claim.
    pub low_water: usize,
    pub memory: Memory,
    /// Recipients on the suppression list are skipped.
    pub suppressions: Suppressions,
    /// Claims for letters that go before those held.
    pub express: Express,
    /// The lanes' virtual clocks, set to the stored backlog's front by the first claims.
    pub fairness: Arc<Fairness>,
}

/// The express claim: ingest wakes it when it stores a letter that goes before letters already
/// held (a transactional one, the first of a batch that had none waiting), and it claims at
/// once with the permits of its own capacity, so that letter need not wait until half the
/// held letters are sent.
pub struct Express {
    pub wake: Arc<Notify>,
    pub capacity: Arc<Semaphore>,
    /// The capacity's size.
    pub size: usize,
}

/// Why a claim took nothing.
enum ClaimError {
    Failed(anyhow::Error),
    /// The suppression lookup failed: the letters went back (logged where it happened).
    Unchecked,
}

/// The pause after `failures` failed claims in a row.
/// How often letters without a lane (written by the Go service) are made claimable.
const ADOPT_EVERY: Duration = Duration::from_secs(5);

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(200 * 2u64.pow(failures.min(5)))
}

/// One permit of `permit`'s `count`, each.
fn split(mut permit: OwnedSemaphorePermit, count: usize) -> Vec<OwnedSemaphorePermit> {
    let mut permits = Vec::with_capacity(count);
    for _ in 1..count {
        if let Some(one) = permit.split(1) {
            permits.push(one);
        }
    }
    permits.push(permit);
    permits
}

impl Dispatcher {
    /// How many letters to hold: enough to keep every worker busy through one claim round trip,
    /// but never more than the rate limit lets us send within half a lease, so leases are not
    /// held on letters that could not be sent anyway.
    pub fn capacity(config: &DispatchConfig, workers: usize, letters_per_second: f64) -> usize {
        let sendable = (letters_per_second * config.lease.as_secs_f64() / 2.0) as usize;
        sendable.clamp(workers.max(1), (2 * config.claim_batch).max(workers))
    }

    /// Half the capacity, but no more than one claim batch.
    pub fn low_water(config: &DispatchConfig, capacity: usize) -> usize {
        (capacity / 2).clamp(1, config.claim_batch.max(1))
    }

    pub async fn run(self, queue: Arc<LaneQueue>, shutdown: CancellationToken) {
        self.claim_loop(&queue, &shutdown).await;
        // Workers stop reading at shutdown; what is left is released by the app.
        queue.close();
        tracing::debug!("dispatcher stopped");
    }

    async fn claim_loop(&self, queue: &LaneQueue, shutdown: &CancellationToken) {
        let mut failures = 0u32;
        // The last express claim took all it could: more such letters wait, and the next express
        // claim comes as soon as half its capacity is free again.
        let mut express_more = false;
        let express_half = (self.express.size / 2).max(1);
        loop {
            if self.control.is_paused() {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    _ = self.control.resumed() => {}
                }
            }
            // Claim only once a good share of the capacity is free: claiming one letter at a
            // time as each send finishes would cost three round trips per letter. Except for
            // letters that go before the ones held (transactional ones, a new batch's first):
            // those are claimed at once, on the express capacity.
            let (mut permits, express) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = self.express.wake.notified() => match self.express_permits() {
                    Some(permits) => (permits, true),
                    None => continue,
                },
                permit = self.express.capacity.clone().acquire_many_owned(express_half as u32), if express_more => {
                    match permit {
                        Ok(permit) => (split(permit, express_half), true),
                        Err(_) => break,
                    }
                }
                permit = self.capacity.clone().acquire_many_owned(self.low_water as u32) => match permit {
                    Ok(permit) => (split(permit, self.low_water), false),
                    Err(_) => break,
                },
            };
            while !express && permits.len() < self.config.claim_batch {
                match self.capacity.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let room = if express {
                // Never wait for memory here: a full memory means letters are held already.
                match self.memory.try_reserve() {
                    Some(room) => room,
                    None => continue,
                }
            } else {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    room = self.memory.reserve() => match room {
                        Some(room) => room,
                        None => break,
                    },
                }
            };
            // Waiting for capacity or memory may have outlasted a pause.
            if self.control.is_paused() {
                continue;
            }
            // An express claim takes only the bulk letters that go before those held.
            let bulk_before = express.then(|| queue.last_vt(Lane::Bulk).unwrap_or(f64::MIN));
            let asked = permits.len();
            let claimed = self.claim_once(queue, permits, room, bulk_before, backoff(failures + 1)).await;
            if express {
                express_more = matches!(claimed, Ok(n) if n == asked);
            }
            match claimed {
                Ok(0) if express => {}
                Ok(0) => {
                    failures = 0;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = self.wake.notified() => {}
                        _ = self.express.wake.notified() => self.express.wake.notify_one(),
                        _ = tokio::time::sleep(self.config.poll_interval) => {}
                    }
                }
                Ok(_) => failures = 0,
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let pause = backoff(failures);
                    if let ClaimError::Failed(error) = error {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            retry_in_ms = pause.as_millis() as u64,
                            "claiming letters failed"
                        );
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// Whatever the express capacity has free, one permit per letter.
    fn express_permits(&self) -> Option<Vec<OwnedSemaphorePermit>> {
        let free = self.express.capacity.available_permits().min(self.config.claim_batch);
        let permit = self.express.capacity.clone().try_acquire_many_owned(u32::try_from(free).ok()?).ok()?;
        (free > 0).then(|| split(permit, free))
    }

    /// One claim of up to one letter per permit, within `room`, put in the queue. Returns how
    /// many letters it took; a failure took none (letters whose suppression lookup failed go back,
    /// due again after `pause`).
    async fn claim_once(
        &self,
        queue: &LaneQueue,
        mut permits: Vec<OwnedSemaphorePermit>,
        mut room: OwnedSemaphorePermit,
        bulk_before: Option<f64>,
        pause: Duration,
    ) -> Result<usize, ClaimError> {
        let limit = ClaimLimit {
            count: permits.len(),
            bytes: room.num_permits() * 1024,
            oversize_alone: room.num_permits() == self.memory.total_kib as usize,
        };
        let started = self.store.now_ms();
        let lease_until = started + self.config.lease.as_millis() as i64;
        let renewed_at = Instant::now();
        let lanes = LaneClaim { bulk_share: self.config.bulk_share, bulk_before };
        let mut letters =
            self.store.claim(&self.owner, limit, started, lease_until, lanes).await.map_err(ClaimError::Failed)?;
        if letters.is_empty() {
            return Ok(0);
        }
        tracing::debug!(count = letters.len(), "claimed letters");
        // Suppressed recipients are marked refused, for the whole claim at once. A claim that
        // cannot be checked is not sent: it goes back, not counted as an attempt, and the claimer
        // backs off as after a failed claim.
        if let Err(error) = self.suppressions.apply(&mut letters).await {
            let ids: Vec<ObjectId> = letters.iter().map(|l| l.id).collect();
            let due = self.store.now_ms() + pause.as_millis() as i64;
            tracing::warn!(
                error = format!("{error:#}"),
                letters = ids.len(),
                retry_in_ms = pause.as_millis() as u64,
                "suppression lookup failed; the claimed letters go back unsent"
            );
            if let Err(release) = self.store.release(&self.owner, &ids, due).await {
                // Never held, so never renewed: they come back when their lease ends.
                tracing::warn!(
                    error = format!("{release:#}"),
                    "releasing unchecked letters failed; they come back when their lease ends"
                );
            }
            return Err(ClaimError::Unchecked);
        }
        let count = letters.len();
        for (letter, permit) in letters.into_iter().zip(permits.drain(..)) {
            // Every claimed letter is held from now on, also those still waiting for a worker,
            // so a renewal can tell which of them were taken over meanwhile.
            let held = self.lease.hold(&letter, renewed_at);
            // A Go-era letter's size is known only now; if it is larger than assumed, the
            // budget is exceeded by that much, once.
            let memory = room.split(kib(letter.text_bytes()).min(room.num_permits()));
            queue.push(Claimed { letter, claimed_at: renewed_at, memory, _permit: permit, _held: held });
        }
        // After a restart, the lanes' clocks start at the backlog's front: the first letter held,
        // not the first claimed. Letters claimed before and still held go before this claim's, and a
        // clock moved past them put a new batch behind them all (a claim's worth of a campaign).
        for lane in Lane::ALL {
            if let Some(front) = queue.first_vt(lane) {
                self.fairness.advance(lane, front);
            }
        }
        Ok(count)
    }

    /// Renews this instance's leases and reaps other instances' expired ones, on a timer.
    pub async fn maintain(
        store: Store,
        config: DispatchConfig,
        owner: String,
        lease: Arc<LeaseClock>,
        shutdown: CancellationToken,
    ) {
        let (store, config, owner, lease) = (&store, &config, &owner, &lease);
        // Letters the Go service (or a version before the lanes) writes during a rolling update
        // have no lane nor place, so the claim's index does not see them until they are adopted:
        // every few seconds, not every third of the lease (40 s with a 120 s lease held them that
        // long). Two indexed updates per round.
        let adopt =
            chore("adopting Go-era letters", ADOPT_EVERY.min(config.lease / 3), shutdown.clone(), move || async move {
                match store.adopt_legacy().await {
                    Ok(0) => {}
                    Ok(adopted) => tracing::info!(adopted, "letters written by the Go service made claimable"),
                    Err(error) => tracing::warn!(error = format!("{error:#}"), "adopting Go-era letters failed"),
                }
            });
        let maintain = chore("lease maintenance", config.lease / 3, shutdown, move || async move {
            if let Err(error) = store.sync_clock().await {
                tracing::warn!(error = format!("{error:#}"), "measuring MongoDB's clock failed");
            }
            let at = Instant::now();
            let now = store.now_ms();
            // Renew, then read back what is still ours: a lease counts as confirmed only for the
            // letters the renewal actually extended.
            let renewal = async {
                let renewed = store.renew(owner, &lease.renewable(), now + config.lease.as_millis() as i64).await?;
                let ours = store.held_by(owner).await?;
                anyhow::Ok((renewed, ours))
            };
            match renewal.await {
                Ok((renewed, ours)) => {
                    let lost = lease.renewed(at, &ours);
                    if lost > 0 {
                        tracing::warn!(
                            lost,
                            "letters this instance held were taken over by another; they will not be sent from here"
                        );
                    }
                    if renewed > 0 {
                        tracing::debug!(renewed, "leases renewed");
                    }
                }
                Err(error) => tracing::warn!(error = format!("{error:#}"), "renewing leases failed"),
            }
            match store.reap_expired(now).await {
                Ok(0) => {}
                Ok(reaped) => tracing::info!(reaped, "returned letters with expired leases to awaiting"),
                Err(error) => tracing::warn!(error = format!("{error:#}"), "reaping expired leases failed"),
            }
        });
        tokio::join!(adopt, maintain);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lease_s: u64, claim_batch: usize) -> DispatchConfig {
        DispatchConfig {
            lease: Duration::from_secs(lease_s),
            claim_batch,
            max_bytes: 16 << 20,
            poll_interval: Duration::from_secs(1),
            bulk_share: 0.1,
        }
    }

    #[test]
    fn capacity_follows_the_rate_limit() {
        // The Go defaults, 5 letters per 5 s: hold only what can be sent within half a lease.
        assert_eq!(Dispatcher::capacity(&config(30, 256), 4, 1.0), 15);
        // Never fewer than one letter per worker, never more than two claim batches.
        assert_eq!(Dispatcher::capacity(&config(30, 256), 8, 0.1), 8);
        assert_eq!(Dispatcher::capacity(&config(30, 256), 8, 10_000.0), 512);
    }

    #[test]
    fn a_renewal_confirms_only_the_letters_it_extended() {
        let clock = Arc::new(LeaseClock::new(Duration::from_secs(30), Cancels::default()));
        let (kept, taken, late) = (letter(), letter(), letter());
        let before = Instant::now();
        let _kept = clock.hold(&kept, before);
        let _taken = clock.hold(&taken, before);
        let renewal = Instant::now();
        // Claimed after the renewal started: its absence from the read-back proves nothing.
        let _late = clock.hold(&late, Instant::now());
        assert_eq!(clock.renewed(renewal, &IdSet::from_iter([kept.id])), 1);
        assert!(!clock.taken(&kept.id) && clock.taken(&taken.id) && !clock.taken(&late.id));
        drop(_taken);
        assert!(!clock.taken(&taken.id), "a finished letter is forgotten");
    }

    #[test]
    fn only_held_letters_and_unrecorded_outcomes_are_renewed() {
        let clock = Arc::new(LeaseClock::new(Duration::from_secs(30), Cancels::default()));
        let (working, finished) = (letter(), letter());
        let _working = clock.hold(&working, Instant::now());
        drop(clock.hold(&finished, Instant::now()));
        let renewal = Instant::now();
        let mut renewable = clock.renewable();
        renewable.sort();
        let mut expected = vec![working.id, finished.id];
        expected.sort();
        assert_eq!(renewable, expected, "a finished letter is renewed until its outcome is stored");
        // The outcome is stored: the read-back no longer finds it ours.
        clock.renewed(renewal, &IdSet::from_iter([working.id]));
        assert_eq!(clock.renewable(), vec![working.id]);
    }

    fn letter() -> Letter {
        let mailing = crate::model::Mailing {
            addresses: vec!["a@example.org".into()],
            subject: "s".into(),
            body: "b".into(),
            token: "t".into(),
            extra: Default::default(),
        };
        Letter::from_mailing(mailing, Some(b"k".as_slice()), String::new(), 0)
    }

    #[test]
    fn lease_trust_expires_without_renewal() {
        let clock = LeaseClock::new(Duration::from_millis(400), Cancels::default());
        let claimed = Instant::now();
        assert!(clock.trusted(claimed));
        std::thread::sleep(Duration::from_millis(320));
        assert!(!clock.trusted(claimed), "a lease within its last quarter must not be trusted");
        clock.renewed(Instant::now(), &IdSet::default());
        assert!(clock.trusted(claimed));
    }
}
