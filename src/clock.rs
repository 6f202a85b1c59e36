//! The one clock of the process: MongoDB's, as measured from here. Every time that is compared
//! across replicas or stored (lease expiry, due times, retention, the budget's units, control and
//! Idempotency-Key times) is read from it, so pods whose clocks disagree still agree on when a
//! lease ends and where a budget unit lies.
//!
//! It starts from this host's wall clock, moved by the test hook's skew
//! (`MAILSENDER_FAULT_INJECTION=clock_skew_ms:N`, so the hook moves every wall-clock read of the
//! process), and follows MongoDB's from its first measurement (`crate::store::Store::sync_clock`,
//! before anything is decided with it), then from every later reading of the server's time: a
//! `hello` with each lease renewal, the `$currentDate` stamp of each budget write. Between
//! readings it runs on the monotonic clock, with nanoseconds, which the budget's spacing needs.
//!
//! It lives below `store` (which measures it) and `budget` (which reads it), so neither imports
//! the other for it.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;

/// Readings of the server's clock in a first measurement, the shortest kept.
pub const FIRST_READINGS: usize = 5;

/// The host's wall clock in Unix nanoseconds, without any skew: what the clock starts from.
pub fn host_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// The host's wall clock in Unix milliseconds, without any skew.
pub fn host_ms() -> i64 {
    host_ns() / 1_000_000
}

/// The server's clock as seen from here at one moment: a local instant and the server time it
/// stands for. A copy, so one decision converts all its times on the same mapping.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    base: Instant,
    base_ns: i64,
}

impl Reading {
    /// The server's time now, Unix nanoseconds.
    pub fn now_ns(&self) -> i64 {
        self.at_ns(Instant::now())
    }

    /// The server's time at `instant`, Unix nanoseconds.
    pub fn at_ns(&self, instant: Instant) -> i64 {
        match instant.checked_duration_since(self.base) {
            Some(after) => self.base_ns + after.as_nanos() as i64,
            None => self.base_ns - self.base.duration_since(instant).as_nanos() as i64,
        }
    }

    /// The local instant at which the server's clock reads `ns`.
    pub fn instant(&self, ns: i64) -> Instant {
        if ns >= self.base_ns {
            self.base + Duration::from_nanos((ns - self.base_ns) as u64)
        } else {
            self.base.checked_sub(Duration::from_nanos((self.base_ns - ns) as u64)).unwrap_or(self.base)
        }
    }

    /// The server's clock read `server_ms` (truncated to the millisecond) between `sent` and
    /// `received`: moves this reading when it is off by more than that uncertainty and `slack`.
    /// A host clock in step with the server's is better than a reading truncated to the
    /// millisecond.
    fn observe(&mut self, server_ms: i64, sent: Instant, received: Instant, slack: Duration) {
        let middle = sent + received.duration_since(sent) / 2;
        let observed = server_ms * 1_000_000 + 500_000;
        let error = observed - self.at_ns(middle);
        let uncertainty = received.duration_since(sent).as_nanos() as i64 / 2 + 1_000_000;
        if error.abs() > uncertainty + slack.as_nanos() as i64 {
            self.base_ns += error;
        }
    }
}

/// The clock, shared: cheap to clone, every clone the same clock.
#[derive(Clone)]
pub struct Clock {
    inner: Arc<Inner>,
}

struct Inner {
    /// The test hook's skew of this host's clock, nanoseconds.
    skew_ns: i64,
    /// Locked only to read or move the mapping, never across an await.
    reading: Mutex<Reading>,
    /// The server's clock has been measured at least once.
    measured: AtomicBool,
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::host(0)
    }
}

impl Clock {
    /// This host's clock, `skew_ms` off (the test hook), until it is measured.
    pub fn host(skew_ms: i64) -> Clock {
        let skew_ns = skew_ms.saturating_mul(1_000_000);
        Clock::new(host_ns() + skew_ns, skew_ns)
    }

    /// A clock that reads `now_ns` now, until it is measured: the simulation's replicas, whose
    /// hosts' clocks differ.
    pub fn starting_at(now_ns: i64) -> Clock {
        Clock::new(now_ns, now_ns - host_ns())
    }

    fn new(now_ns: i64, skew_ns: i64) -> Clock {
        let reading = Reading { base: Instant::now(), base_ns: now_ns };
        Clock { inner: Arc::new(Inner { skew_ns, reading: Mutex::new(reading), measured: AtomicBool::new(false) }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Reading> {
        // Moving the mapping cannot panic half-way, so a poisoned lock still holds a whole one.
        self.inner.reading.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The mapping as it stands, for several conversions on the same one.
    pub fn reading(&self) -> Reading {
        *self.lock()
    }

    /// The server's time now, Unix nanoseconds.
    pub fn now_ns(&self) -> i64 {
        self.reading().now_ns()
    }

    /// The server's time now, Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.now_ns().div_euclid(1_000_000)
    }

    /// This host's wall clock with the test hook's skew, Unix nanoseconds: what the clock
    /// started from.
    pub fn host_ns(&self) -> i64 {
        host_ns() + self.inner.skew_ns
    }

    /// The server's clock minus this host's (the skew included), in milliseconds.
    pub fn offset_ms(&self) -> i64 {
        (self.now_ns() - self.host_ns()) / 1_000_000
    }

    /// Whether the server's clock has been measured: until it is, nothing is decided with it.
    pub fn is_measured(&self) -> bool {
        self.inner.measured.load(Ordering::Acquire)
    }

    /// The server's clock read `server_ms` between `sent` and `received` (a write it stamped):
    /// moves the clock when it is off by more than that reading's uncertainty.
    pub fn observe(&self, server_ms: i64, sent: Instant, received: Instant) {
        self.lock().observe(server_ms, sent, received, Duration::ZERO);
    }

    /// Reads the server's clock `readings` times with `read` and follows the reading with the
    /// shortest round trip, when the clock is off by more than its uncertainty and `slack`: the
    /// uncertainty is what two replicas' ideas of the server's clock may differ by, and that comes
    /// out of the budget's guard (seen: 5 ms apart from single readings, 21 dots in a second).
    /// Returns by how much the clock moved, in milliseconds.
    pub async fn measure<F, Fut>(&self, readings: usize, slack: Duration, mut read: F) -> anyhow::Result<i64>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<i64>>,
    {
        let mut best: Option<(i64, Instant, Instant)> = None;
        for _ in 0..readings.max(1) {
            let sent = Instant::now();
            let server_ms = read().await?;
            let received = Instant::now();
            if best.is_none_or(|(_, s, r)| received.duration_since(sent) < r.duration_since(s)) {
                best = Some((server_ms, sent, received));
            }
        }
        let Some((server_ms, sent, received)) = best else { return Ok(0) };
        let moved_ns = {
            let mut reading = self.lock();
            let before = reading.at_ns(received);
            reading.observe(server_ms, sent, received, slack);
            reading.at_ns(received) - before
        };
        self.inner.measured.store(true, Ordering::Release);
        Ok(moved_ns / 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skew_moves_every_read_until_measured() {
        let ahead = Clock::host(600_000);
        let host = host_ns();
        assert!((ahead.now_ns() - host - 600_000_000_000).abs() < 1_000_000_000, "now_ns follows the skew");
        assert!((ahead.now_ms() - host / 1_000_000 - 600_000).abs() < 1_000, "now_ms follows the skew");
        assert!((ahead.host_ns() - host - 600_000_000_000).abs() < 1_000_000_000, "host_ns follows the skew");
        assert!(ahead.offset_ms().abs() < 1_000, "no offset before a measurement");
        assert!(!ahead.is_measured());
        let clone = ahead.clone();
        let instant = Instant::now() + Duration::from_secs(2);
        let at = clone.reading().at_ns(instant);
        assert_eq!(clone.reading().instant(at), instant, "instants and times convert both ways");
    }

    #[tokio::test(start_paused = true)]
    async fn a_measurement_moves_every_clone_to_the_servers_clock() {
        let ahead = Clock::host(600_000);
        let reader = ahead.clone();
        let server_ms = host_ns() / 1_000_000;
        let mut calls = 0;
        let moved = ahead
            .measure(5, Duration::ZERO, || {
                calls += 1;
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok(server_ms)
                }
            })
            .await
            .unwrap();
        assert_eq!(calls, 5, "the shortest of five readings");
        assert!(reader.is_measured());
        assert!((moved + 600_000).abs() < 100, "moved back by the skew: {moved} ms");
        assert!((reader.now_ms() - server_ms).abs() < 100, "every clone reads the server's clock");
        assert!((reader.offset_ms() + 600_000).abs() < 100, "the offset is the skew, back: {}", reader.offset_ms());
    }

    #[test]
    fn a_reading_within_its_uncertainty_leaves_the_clock_alone() {
        let clock = Clock::starting_at(1_000_000_000_000);
        let sent = Instant::now();
        let received = sent + Duration::from_millis(10);
        // 3 ms off, within half the round trip and a millisecond.
        let server_ms = clock.reading().at_ns(sent + Duration::from_millis(5)) / 1_000_000 + 3;
        let before = clock.reading().at_ns(received);
        clock.observe(server_ms, sent, received);
        assert_eq!(clock.reading().at_ns(received), before);
        clock.observe(server_ms + 1_000, sent, received);
        assert!((clock.reading().at_ns(received) - before - 1_003_000_000).abs() < 1_000_000);
    }
}
