//! The claimed letters waiting for a worker, by lane and, within a lane, by their place in the
//! fair order (`vt`): the dispatcher puts each claim in at once, and the next free worker takes
//! the first letter of the lane whose turn it is. A letter claimed later overtakes the letters
//! held before it whose place is behind its own, so a transactional letter, or a small batch's
//! letter, waits for no held bulk backlog.
//!
//! The turn: transactional first, except that while both lanes have letters waiting, bulk gets
//! `bulk_share` of the letters taken (a credit that grows by the share at each take and is spent
//! one letter at a time), so a flood of transactional mail cannot starve it. A lane with nothing
//! waiting leaves the whole to the other.

use std::{
    cmp::Ordering,
    collections::BinaryHeap,
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

use super::dispatch::Claimed;
use crate::priority::{Fairness, Lane};

struct Entry {
    vt: f64,
    seq: u64,
    /// Boxed: the heap moves its entries at every push and pop, and a letter is ~1 KB
    /// (those copies were ~1,300 instructions a letter, issue 23).
    claimed: Box<Claimed>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    /// Reversed: `BinaryHeap` is a max-heap and the lowest `vt` (then the earliest claimed) goes
    /// first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.vt.total_cmp(&self.vt).then(other.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct Inner {
    lanes: [BinaryHeap<Entry>; 2],
    seq: u64,
    /// Bulk's credit while both lanes wait; at 1 the next letter is bulk.
    credit: f64,
    closed: bool,
}

/// See the module documentation.
pub struct LaneQueue {
    inner: Mutex<Inner>,
    ready: Notify,
    bulk_share: f64,
    fairness: Arc<Fairness>,
}

impl LaneQueue {
    pub fn new(bulk_share: f64, fairness: Arc<Fairness>) -> LaneQueue {
        LaneQueue { inner: Mutex::default(), ready: Notify::new(), bulk_share, fairness }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The guarded code cannot panic, so a poisoned lock still holds consistent data.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn push(&self, claimed: Claimed) {
        let mut inner = self.lock();
        inner.seq += 1;
        let (lane, vt, seq) = (claimed.letter.lane, claimed.letter.vt, inner.seq);
        inner.lanes[lane.index()].push(Entry { vt, seq, claimed: Box::new(claimed) });
        drop(inner);
        // All of them: a worker waiting for a transactional letter passes over a bulk one, which
        // one waiting for any letter must still see.
        self.ready.notify_waiters();
    }

    /// No more letters come (the dispatcher stopped): waiting workers get `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_waiters();
    }

    pub fn is_empty(&self) -> bool {
        self.lock().lanes.iter().all(BinaryHeap::is_empty)
    }

    pub fn len(&self) -> usize {
        self.lock().lanes.iter().map(BinaryHeap::len).sum()
    }

    /// The place of the first letter of `lane` waiting here (the next a worker takes), if any waits.
    pub fn first_vt(&self, lane: Lane) -> Option<f64> {
        self.lock().lanes[lane.index()].peek().map(|entry| entry.vt)
    }

    /// The place of the last letter of `lane` waiting here, if any waits.
    pub fn last_vt(&self, lane: Lane) -> Option<f64> {
        self.lock().lanes[lane.index()].iter().map(|entry| entry.vt).max_by(f64::total_cmp)
    }

    /// The next letter, if one waits.
    pub fn try_pop(&self) -> Option<Claimed> {
        self.pop_if(None)
    }

    /// The next letter in the turn order, if one waits and it is of `only` (when given): a
    /// transactional letter is taken only in its turn, so bulk's share holds for workers taking
    /// urgent letters alone too.
    fn pop_if(&self, only: Option<Lane>) -> Option<Claimed> {
        let mut inner = self.lock();
        let waiting = Lane::ALL.map(|lane| !inner.lanes[lane.index()].is_empty());
        let lane = match waiting {
            [true, true] if inner.credit + self.bulk_share >= 1.0 => Lane::Bulk,
            [true, true] | [true, false] => Lane::Transactional,
            [false, true] => Lane::Bulk,
            [false, false] => return None,
        };
        if only.is_some_and(|only| only != lane) {
            return None;
        }
        if waiting == [true, true] {
            inner.credit += self.bulk_share;
            if lane == Lane::Bulk {
                inner.credit -= 1.0;
            }
        }
        let entry = inner.lanes[lane.index()].pop()?;
        drop(inner);
        self.fairness.advance(lane, entry.vt);
        Some(*entry.claimed)
    }

    /// Waits for a transactional letter whose turn it is; never returns once closed (the
    /// worker's [`LaneQueue::pop`] says so).
    pub async fn pop_urgent(&self) -> Claimed {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(claimed) = self.pop_if(Some(Lane::Transactional)) {
                return claimed;
            }
            notified.await;
        }
    }

    /// Waits for the next letter; `None` once closed and empty.
    pub async fn pop(&self) -> Option<Claimed> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(claimed) = self.try_pop() {
                return Some(claimed);
            }
            if self.lock().closed {
                return None;
            }
            notified.await;
        }
    }
}
