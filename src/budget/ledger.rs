//! Where the budget's state is kept: one document in MongoDB (`crate::store::MongoLedger`),
//! written with a compare-and-set on its version; and a ledger in memory for unit tests.

use std::{
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::time::Instant;

use super::State;
use crate::clock::host_ms;

/// Where the state is kept: MongoDB in production, memory in unit tests.
pub trait Ledger: Send + Sync {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<State>>;
    /// Writes `new` if the stored version is still `expected`. `Ok(None)`: another replica wrote
    /// first. `Ok(Some(ms))`: written, at the server's clock `ms` (Unix milliseconds).
    fn replace<'a>(&'a self, expected: i64, new: &'a State) -> BoxFuture<'a, anyhow::Result<Option<i64>>>;
    /// The server's clock now, in Unix milliseconds.
    fn server_time(&self) -> BoxFuture<'_, anyhow::Result<i64>>;
}

/// The ledger in memory, for unit tests: its clock is tokio's, so paused time drives it.
#[derive(Default)]
pub struct MemoryLedger {
    state: std::sync::Mutex<State>,
    /// Set: every call fails, as MongoDB down.
    pub down: AtomicBool,
    pub writes: AtomicUsize,
    /// Each call takes this long, as a round trip to a real server does.
    pub round_trip: Duration,
    /// The first write in each span of the first length answers the second late, as a loaded
    /// server's now and then do.
    pub stalls: Option<(Duration, Duration)>,
    /// The spans whose write has stalled.
    stalled: AtomicUsize,
    origin_ms: i64,
    started: std::sync::OnceLock<Instant>,
}

impl MemoryLedger {
    pub fn new() -> MemoryLedger {
        let ledger = MemoryLedger { origin_ms: host_ms(), ..Default::default() };
        let _ = ledger.started.set(Instant::now());
        ledger
    }

    /// A slow server: every call takes `round_trip`.
    pub fn slow(round_trip: Duration) -> MemoryLedger {
        MemoryLedger { round_trip, ..MemoryLedger::new() }
    }

    /// The same server with its clock reading `origin_ms` now, not this host's: the simulation
    /// starts every run from one fixed epoch, since where the host's clock falls in a quota's
    /// buckets or the rate's exact window moved a case's result from run to run (85.4 % against
    /// 94.2 % for one case).
    pub fn starting_at(self, origin_ms: i64) -> MemoryLedger {
        MemoryLedger { origin_ms, ..self }
    }

    /// The same server, with the first write in every span of `every` answering `stall` late.
    pub fn stalling(self, stalls: Option<(Duration, Duration)>) -> MemoryLedger {
        MemoryLedger { stalls, ..self }
    }

    async fn travel(&self, time: Duration) {
        if !time.is_zero() {
            tokio::time::sleep(time).await;
        }
    }

    pub fn state(&self) -> State {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The server's clock: its origin, then tokio's time (paused in tests).
    fn now_ms(&self) -> i64 {
        let elapsed = self.started.get().map_or(Duration::ZERO, |s| s.elapsed());
        self.origin_ms + elapsed.as_millis() as i64
    }

    fn check(&self) -> anyhow::Result<()> {
        match self.down.load(Ordering::Relaxed) {
            true => Err(anyhow::anyhow!("memory ledger down")),
            false => Ok(()),
        }
    }
}

impl Ledger for MemoryLedger {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<State>> {
        Box::pin(async move {
            self.travel(self.round_trip).await;
            self.check()?;
            Ok(self.state())
        })
    }

    fn replace<'a>(&'a self, expected: i64, new: &'a State) -> BoxFuture<'a, anyhow::Result<Option<i64>>> {
        Box::pin(async move {
            // Half the way there, half back: the write happens in the middle.
            self.travel(self.round_trip / 2).await;
            self.check()?;
            let written = {
                let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if state.version != expected {
                    None
                } else {
                    *state = new.clone();
                    self.writes.fetch_add(1, Ordering::Relaxed);
                    Some(self.now_ms())
                }
            };
            let stall = match (self.stalls, self.started.get()) {
                (Some((every, stall)), Some(started)) if written.is_some() => {
                    let span = (started.elapsed().as_nanos() / every.as_nanos().max(1)) as usize;
                    match self.stalled.fetch_max(span, Ordering::Relaxed) < span {
                        true => stall,
                        false => Duration::ZERO,
                    }
                }
                _ => Duration::ZERO,
            };
            self.travel(self.round_trip / 2 + stall).await;
            Ok(written)
        })
    }

    fn server_time(&self) -> BoxFuture<'_, anyhow::Result<i64>> {
        Box::pin(async move {
            self.travel(self.round_trip / 2).await;
            self.check()?;
            let now = self.now_ms();
            self.travel(self.round_trip / 2).await;
            Ok(now)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first write of each span answers late, the others at the round trip; a write that
    /// lost its compare-and-set never stalls.
    #[tokio::test(start_paused = true)]
    async fn a_stalling_ledger_answers_the_first_write_of_each_span_late() {
        let ledger = MemoryLedger::slow(Duration::from_millis(2))
            .stalling(Some((Duration::from_secs(1), Duration::from_millis(300))));
        let timed = |expected: i64, version: i64| {
            let ledger = &ledger;
            async move {
                let started = Instant::now();
                let written = ledger.replace(expected, &State { version, ..State::default() }).await.unwrap();
                (written.is_some(), started.elapsed().as_millis())
            }
        };
        assert_eq!(timed(0, 1).await, (true, 2), "the first span, before its end, holds no stall");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(timed(5, 2).await, (false, 2), "a lost compare-and-set answers at once");
        assert_eq!(timed(1, 2).await, (true, 302), "the first write of the next span");
        assert_eq!(timed(2, 3).await, (true, 2), "the second write of that span");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(timed(3, 4).await, (true, 302), "and the first of the span after");
    }
}
