//! Pacing and the hard cap: the instance's sending rate, shared by all workers, and the slowdown
//! a relay's "too fast" replies impose on it.

use std::{
    collections::VecDeque,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::SetOnce;

use crate::{config::SmtpConfig, metrics::Metrics, smtp::Reply};

/// The global rate limit shared by all workers: at most `rate_max_letters` per `rate_period`,
/// spread evenly, and never more than `rate_max_letters + rate_burst - 1` in any window of one
/// period, as counted by the receiving server.
///
/// governor paces the letters. Its GCRA restarts the schedule from a late wake-up, so with a
/// burst of exactly 1 every few hundred microseconds of timer latency is lost for good and the
/// rate falls 2–5 % short. One extra cell of burst absorbs that lateness. A sliding window then
/// keeps the hard cap. It remembers when each of the last `cap` sends *completed*, and a new send
/// starts only one period after the completion of the send `cap` places earlier. A server records
/// a letter before it acknowledges it, so however its own timing jitters, no window of one period
/// on its side can hold more than `cap`.
///
/// On top of both, a [`Slowdown`] lowers the rate while the relay throttles.
pub struct RateLimit {
    pacer: DefaultDirectRateLimiter,
    /// Completion times of the last `cap` sends, oldest first; unset while a send is in progress.
    window: tokio::sync::Mutex<VecDeque<Arc<SetOnce<Instant>>>>,
    cap: usize,
    period: Duration,
    configured: f64,
    slowdown: Mutex<Slowdown>,
    metrics: Arc<Metrics>,
}

/// Held for the duration of one send; records its completion in the rate limit's window when
/// dropped, whatever the outcome.
pub struct SendSlot(Option<Arc<SetOnce<Instant>>>);

impl Drop for SendSlot {
    fn drop(&mut self) {
        if let Some(done) = &self.0 {
            let _ = done.set(Instant::now());
        }
    }
}

/// Above this many letters per period the window costs more memory than it is worth; the
/// pacer alone then holds the rate.
const WINDOW_LIMIT: usize = 10_000;

/// Multiplicative decrease, multiplicative recovery: a throttle reply halves the rate actually
/// achieved, and every `step` without one raises the allowed rate by a quarter, until it is back
/// at the configured budget. Halving what was *achieved* (not the budget) matters: with a budget
/// far above what the relay takes, halving the budget would not slow anything down.
#[derive(Debug)]
pub struct Slowdown {
    /// Letters per second allowed while throttled; `None` when not throttled.
    rate: Option<f64>,
    /// When the next letter may start while throttled.
    next: Instant,
    /// When the rate last changed (a cut or a recovery step).
    changed: Instant,
    /// Start times of recent sends, to measure the rate achieved.
    recent: VecDeque<Instant>,
    step: Duration,
}

/// Sends remembered to measure the achieved rate.
const RECENT: usize = 64;
/// A burst of throttle replies from sends that were in flight together is one event.
const CUT_COOLDOWN: Duration = Duration::from_secs(1);
const RECOVERY_FACTOR: f64 = 1.25;
/// The slowest a throttled instance goes: one letter every 20 s.
const MIN_RATE: f64 = 0.05;

impl Slowdown {
    pub fn new(step: Duration, now: Instant) -> Slowdown {
        Slowdown { rate: None, next: now, changed: now, recent: VecDeque::with_capacity(RECENT), step }
    }

    /// The rate allowed at `now`, after the recovery steps that have passed.
    pub fn rate(&mut self, configured: f64, now: Instant) -> Option<f64> {
        let rate = self.rate?;
        let steps = (now.saturating_duration_since(self.changed).as_secs_f64() / self.step.as_secs_f64()).floor();
        if steps >= 1.0 {
            let raised = rate * RECOVERY_FACTOR.powf(steps);
            self.changed += self.step.mul_f64(steps);
            self.rate = (raised < configured).then_some(raised);
        }
        self.rate
    }

    /// Records a throttle reply at `now`; returns the new rate when this is a new event.
    pub fn cut(&mut self, configured: f64, now: Instant) -> Option<f64> {
        if self.rate.is_some() && now.saturating_duration_since(self.changed) < CUT_COOLDOWN {
            return None;
        }
        let current = self.rate(configured, now).unwrap_or(configured);
        let achieved = self.achieved(now).unwrap_or(current);
        let rate = (current.min(achieved) / 2.0).max(MIN_RATE);
        self.rate = Some(rate);
        self.changed = now;
        Some(rate)
    }

    /// The rate of the recent sends, if there were enough of them lately.
    fn achieved(&self, now: Instant) -> Option<f64> {
        let recent: Vec<&Instant> =
            self.recent.iter().filter(|t| now.saturating_duration_since(**t) < Duration::from_secs(5)).collect();
        let (first, last) = (recent.first()?, recent.last()?);
        let span = last.saturating_duration_since(**first).as_secs_f64();
        (recent.len() >= 3 && span > 0.0).then(|| (recent.len() - 1) as f64 / span)
    }

    /// How long a send starting at `now` must wait; books its start.
    pub fn admit(&mut self, configured: f64, now: Instant) -> Duration {
        let wait = match self.rate(configured, now) {
            Some(rate) => {
                let start = self.next.max(now);
                self.next = start + Duration::from_secs_f64(1.0 / rate);
                start - now
            }
            None => Duration::ZERO,
        };
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(now + wait);
        wait
    }
}

impl RateLimit {
    pub fn new(smtp: &SmtpConfig, metrics: Arc<Metrics>) -> RateLimit {
        let interval = (smtp.rate_period / smtp.rate_max_letters).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(smtp.rate_burst.saturating_add(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(interval).unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX));
        let cap = (smtp.rate_max_letters + smtp.rate_burst - 1) as usize;
        let configured = smtp.rate_max_letters as f64 / smtp.rate_period.as_secs_f64();
        metrics.send_rate.set(configured);
        RateLimit {
            pacer: RateLimiter::direct(quota.allow_burst(burst)),
            window: tokio::sync::Mutex::new(VecDeque::with_capacity(cap.min(WINDOW_LIMIT))),
            cap,
            period: smtp.rate_period,
            configured,
            slowdown: Mutex::new(Slowdown::new(smtp.throttle_recovery_step, Instant::now())),
            metrics,
        }
    }

    /// Waits until one more letter may be sent; hold the slot until the send is over.
    pub async fn acquire(&self) -> SendSlot {
        self.pacer.until_ready().await;
        let wait = self.lock_slowdown().admit(self.configured, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if self.cap > WINDOW_LIMIT {
            return SendSlot(None);
        }
        // Held while waiting, so letters leave in the order the pacer admitted them.
        let mut window = self.window.lock().await;
        if window.len() >= self.cap
            && let Some(oldest) = window.front().cloned()
        {
            // Nothing is changed before the waits, so a cancelled wait leaves the window intact.
            let completed = *oldest.wait().await;
            tokio::time::sleep_until((completed + self.period).into()).await;
            window.pop_front();
        }
        let slot = Arc::new(SetOnce::new());
        window.push_back(slot.clone());
        SendSlot(Some(slot))
    }

    /// The relay said "too fast": the whole instance slows down, not just this letter.
    pub fn throttled(&self, reply: &Reply) {
        self.metrics.throttle_events.inc();
        let cut = self.lock_slowdown().cut(self.configured, Instant::now());
        if let Some(rate) = cut {
            self.metrics.send_rate.set(rate);
            tracing::warn!(
                reply = %reply,
                rate_per_s = rate,
                budget_per_s = self.configured,
                "the SMTP server throttles: sending rate lowered"
            );
        } else {
            tracing::debug!(reply = %reply, "throttle reply within the current slowdown");
        }
    }

    fn lock_slowdown(&self) -> std::sync::MutexGuard<'_, Slowdown> {
        // The guarded code cannot panic, so a poisoned lock still holds consistent data.
        self.slowdown.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smtp(period_ms: u64, max: u32, burst: u32) -> SmtpConfig {
        let mut vars: std::collections::HashMap<String, String> =
            [("KAFKA_BROKERS", "k:1"), ("MONGO_LOCAL", "mongodb://m"), ("SMTP_HOST", "h")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        vars.insert("SMTP_RATE_LIMIT_PERIOD".into(), format!("{period_ms}ms"));
        vars.insert("SMTP_RATE_LIMIT_MAX_LETTERS".into(), max.to_string());
        vars.insert("SMTP_RATE_LIMIT_BURST".into(), burst.to_string());
        crate::Config::from_vars(vars).unwrap().smtp
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rate_limit_caps_every_window_and_keeps_the_rate() {
        let limit = Arc::new(RateLimit::new(&smtp(200, 10, 1), Arc::new(Metrics::new())));
        let start = Instant::now();
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (limit, times) = (limit.clone(), times.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..15 {
                    let _slot = limit.acquire().await;
                    times.lock().unwrap().push(start.elapsed());
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let mut times = times.lock().unwrap().clone();
        times.sort();
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..].iter().take_while(|u| **u < *t + Duration::from_millis(200)).count();
            assert!(in_window <= 10, "{in_window} sends within 200 ms from #{i}: {times:?}");
        }
        // 60 sends at 50/s: the last one is due at about 1.2 s (the first two go at once).
        let span = times.last().unwrap().as_secs_f64();
        assert!((1.1..1.35).contains(&span), "60 sends took {span:.3}s at 50/s");
    }

    #[test]
    fn a_throttle_halves_the_achieved_rate_and_recovery_restores_the_budget() {
        let start = Instant::now();
        let mut slowdown = Slowdown::new(Duration::from_secs(2), start);
        // 20 letters at 10/s with a budget of 100/s: the relay takes 10/s.
        for i in 0..20 {
            assert_eq!(slowdown.admit(100.0, start + Duration::from_millis(100 * i)), Duration::ZERO);
        }
        let at = start + Duration::from_secs(2);
        let rate = slowdown.cut(100.0, at).unwrap();
        assert!((rate - 5.0).abs() < 0.01, "{rate}");
        // The replies of the sends in flight together are one event.
        assert_eq!(slowdown.cut(100.0, at + Duration::from_millis(300)), None);
        // Throttled: the next sends are spaced by 200 ms.
        assert_eq!(slowdown.admit(100.0, at), Duration::ZERO);
        assert_eq!(slowdown.admit(100.0, at), Duration::from_millis(200));
        // Each step raises the rate by a quarter, up to the budget, where the slowdown ends.
        let later = at + Duration::from_secs(4);
        assert!((slowdown.rate(100.0, later).unwrap() - 5.0 * 1.25 * 1.25).abs() < 0.01);
        assert_eq!(slowdown.rate(100.0, at + Duration::from_secs(60)), None);
        assert_eq!(slowdown.admit(100.0, at + Duration::from_secs(60)), Duration::ZERO);
    }

    #[test]
    fn a_throttle_without_history_halves_the_budget() {
        let start = Instant::now();
        let mut slowdown = Slowdown::new(Duration::from_secs(5), start);
        assert_eq!(slowdown.cut(8.0, start), Some(4.0));
        assert_eq!(slowdown.cut(8.0, start + Duration::from_secs(2)), Some(2.0));
        for _ in 0..20 {
            slowdown.cut(8.0, start + Duration::from_secs(2));
        }
        assert!(slowdown.rate(8.0, start + Duration::from_secs(3)).unwrap() >= MIN_RATE);
    }
}
