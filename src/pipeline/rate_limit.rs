//! Pacing and the caps: the deployment's shared sending budget as this instance's workers take
//! it (a unit before each transaction, its time at the final dot, the units given back when the
//! letters run out), and the slowdown a relay's "too fast" replies impose on top of it.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{
    budget::{self, Budget, Ticket},
    config::RateUnit,
    metrics::Metrics,
    smtp::Reply,
};

/// The sending budget shared by all workers of all replicas (see [`crate::budget`]): a message
/// waits for its units before its final dot, so the relay sees messages spaced by the budget.
///
/// What a message costs (`SMTP_RATE_LIMIT_UNIT`): `letter`, 1 per message handed to the relay
/// (a letter with more recipients than `SMTP_MAX_RECIPIENTS` goes in several transactions, each a
/// message to the relay, each costing 1); `recipient`, the recipients offered in the transaction
/// (those the relay then refuses are not given back: the budget errs on the safe side).
///
/// On top of it, a [`Slowdown`] lowers this instance's rate while the relay throttles.
pub struct RateLimit {
    budget: Arc<Budget>,
    configured: f64,
    slowdown: Mutex<Slowdown>,
    idle: Arc<Idle>,
    /// Bulk letters take their units one after another, each in its turn (see [`BulkTurn`]).
    bulk_turn: Arc<tokio::sync::Mutex<()>>,
    metrics: Arc<Metrics>,
}

/// A worker's turn to take the budget for a bulk letter. Held from before the worker takes a
/// letter until its units are taken, so bulk workers queue here, first come first served, and
/// each takes its units only when they are near ([`Budget::bulk_wait`]); workers not holding it
/// take a transactional letter at once ([`crate::pipeline::queue::LaneQueue::pop_urgent`]).
pub type BulkTurn = tokio::sync::OwnedMutexGuard<()>;

/// How long the workers must have found no letter waiting before the replica gives its budget
/// units back: longer than the dispatcher takes to hand over the next claim while it has letters.
const IDLE_GRACE: Duration = Duration::from_millis(20);

/// Watches for the moment this replica runs out of letters: a worker finds none waiting, and
/// none arrives for any worker within [`IDLE_GRACE`]. Then the units of the budget it holds go
/// back to the other replicas ([`Budget::give_back`]); the workers still sending hold their
/// tickets already.
#[derive(Default)]
struct Idle {
    /// Bumped whenever a worker gets a letter: a give-back sees whether any did during its grace.
    received: AtomicUsize,
    /// A give-back is waiting out its grace.
    pending: AtomicBool,
}

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

/// A transaction whose unit is further ahead than this (and than the lead) waits before it opens.
const OPEN_AHEAD: Duration = Duration::from_secs(1);

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
    pub fn new(budget: Arc<Budget>, throttle_recovery_step: Duration, metrics: Arc<Metrics>) -> RateLimit {
        let configured = budget.plan().rate();
        metrics.send_rate.set(configured);
        RateLimit {
            budget,
            configured,
            slowdown: Mutex::new(Slowdown::new(throttle_recovery_step, Instant::now())),
            idle: Arc::default(),
            bulk_turn: Arc::default(),
            metrics,
        }
    }

    /// Waits for this worker's turn to take the budget for a bulk letter.
    pub async fn bulk_turn(&self) -> BulkTurn {
        let _queued = self.budget.queued();
        self.bulk_turn.clone().lock_owned().await
    }

    /// A worker found no letter waiting: when none arrives within [`IDLE_GRACE`], the units this
    /// replica holds go back to the others.
    pub fn note_empty(&self) {
        self.budget.letters_running_out(true);
        if self.idle.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let received = self.idle.received.load(Ordering::Acquire);
        let (idle, budget) = (self.idle.clone(), self.budget.clone());
        tokio::spawn(async move {
            tokio::time::sleep(IDLE_GRACE).await;
            idle.pending.store(false, Ordering::Release);
            if idle.received.load(Ordering::Acquire) == received {
                budget.give_back().await;
            }
        });
    }

    /// A worker got a letter; `more` if others are waiting behind it.
    pub fn note_received(&self, more: bool) {
        self.idle.received.fetch_add(1, Ordering::AcqRel);
        if more {
            self.budget.letters_running_out(false);
        }
    }

    /// The units a message to `recipients` recipients costs.
    pub fn cost(&self, recipients: usize) -> u32 {
        match self.budget.plan().unit {
            RateUnit::Letter => 1,
            RateUnit::Recipient => u32::try_from(recipients).unwrap_or(u32::MAX).max(1),
        }
    }

    /// How many of `wanted` recipients a transaction on `ticket` carries: in recipient mode the
    /// budget may hand out fewer units than asked ([`Budget::take_up_to`]), and the rest of the
    /// letter goes in its next transaction.
    pub fn recipients_on(&self, ticket: &Ticket, wanted: usize) -> usize {
        match self.budget.plan().unit {
            RateUnit::Letter => wanted,
            RateUnit::Recipient => wanted.min(ticket.units as usize).max(1),
        }
    }

    /// The most recipients one transaction carries ([`budget::Plan::transaction_recipients`]).
    pub fn transaction_recipients(&self, max_recipients: usize) -> usize {
        self.budget.plan().transaction_recipients(max_recipients)
    }

    /// Waits for the throttle slowdown, then for the budget's units for one message to
    /// `recipients` recipients (or fewer, [`RateLimit::recipients_on`]); the message's final dot
    /// then waits for the ticket's time.
    /// With a bulk letter's `turn`, the units are taken only when they are near, and the turn
    /// passes to the next bulk worker once they are.
    pub async fn reserve(&self, recipients: usize, turn: Option<BulkTurn>) -> Ticket {
        let wait = self.throttle_wait().await;
        if turn.is_some() {
            // Re-checked after each sleep: a transactional letter may have taken that unit.
            while let Some(wait) = self.budget.bulk_wait() {
                tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
            }
        }
        let ticket = self.budget.take_up_to(self.cost(recipients)).await;
        drop(turn);
        self.open_near(ticket, wait).await
    }

    /// As [`RateLimit::reserve`] for a transaction after a letter's first, with no bulk turn:
    /// `None` when the budget has not handed out its units within `within`, or `stop` fired
    /// first. Only the wait for them is cut short: a ticket once taken is kept and waited for, as
    /// a ticket dropped would leave its units counted and unused.
    pub async fn reserve_within(
        &self,
        recipients: usize,
        within: Duration,
        stop: &CancellationToken,
    ) -> Option<Ticket> {
        let wait = self.throttle_wait().await;
        let ticket = tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            taken = tokio::time::timeout(within, self.budget.take_up_to(self.cost(recipients))) => taken.ok()?,
        };
        Some(self.open_near(ticket, wait).await)
    }

    /// Waits out the relay's throttle slowdown, if any; how long.
    async fn throttle_wait(&self) -> Duration {
        let wait = self.lock_slowdown().admit(self.configured, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        wait
    }

    /// Waits until the transaction for `ticket` should open (after the throttle's `wait`).
    async fn open_near(&self, ticket: Ticket, wait: Duration) -> Ticket {
        // A unit far ahead (a burst's spacing after it, a slow rate) is waited for here, before
        // the transaction opens, not with the relay's DATA phase open; up to a second ahead the
        // transaction opens at once, so the final dot waits on the precise timer with the data
        // written and keeps to its unit (opening just a lead before it left dots later by up to
        // the guard, which the relay's own delay then pushed over it).
        let open_at = ticket.at.checked_sub(self.budget.lead().max(OPEN_AHEAD)).unwrap_or(ticket.at);
        let before = tokio::time::Instant::now();
        if open_at > before {
            tokio::time::sleep_until(open_at).await;
            let issued = tokio::time::Instant::now();
            return Ticket { waited: ticket.waited + wait + issued.duration_since(before), issued, ..ticket };
        }
        Ticket { waited: ticket.waited + wait, ..ticket }
    }

    /// Called at the message's final dot, its data written: waits for the ticket's unit. True
    /// when the dot may go on it; false when no unit came within [`budget::HOLD_MAX`] and the
    /// message must be withdrawn (the relay's DATA phase is open, so the wait is bounded).
    pub async fn at_dot(&self, ticket: Ticket) -> bool {
        let (budget, metrics) = (&self.budget, &self.metrics);
        let at_dot = tokio::time::Instant::now();
        let hold_until = at_dot + budget::HOLD_MAX;
        budget.prepared(at_dot.duration_since(ticket.issued));
        let mut ticket = ticket;
        loop {
            ticket.wait().await;
            let late = tokio::time::Instant::now().saturating_duration_since(ticket.unit);
            if late <= budget.plan().late && !ticket.unplaced {
                budget.on_time();
                metrics.budget_lateness.observe(late.as_secs_f64());
                // Off unless asked for (`RUST_LOG=…,mailsender::dot=trace`): every dot's time
                // as this replica saw it, so the spacing can be checked apart from how a relay
                // records it (the benchmark does).
                tracing::trace!(
                    target: "mailsender::dot",
                    at_unix_us = budget.clock().host_ns() / 1_000,
                    late_us = late.as_micros() as u64,
                    units = ticket.units,
                    "final dot"
                );
                break;
            }
            if !ticket.unplaced {
                metrics.budget_units_missed.inc_by(u64::from(ticket.units));
            }
            budget.missed(&ticket);
            // Too late for its unit (a slow connection, a late wake-up): the dot on it could
            // crowd the next window, so the message waits for a new one.
            match ticket.unplaced {
                true => tracing::debug!("no unit placed before a preparation was measured; taking one at the dot"),
                false => {
                    tracing::debug!(late_ms = late.as_secs_f64() * 1e3, "late for the budget's unit; taking another")
                }
            }
            match tokio::time::timeout_at(hold_until, budget.take_ready(ticket.units)).await {
                Ok(next) if next.at <= hold_until => ticket = next,
                _ => {
                    metrics.budget_withdrawn.inc();
                    tracing::warn!(
                        hold_ms = budget::HOLD_MAX.as_millis() as u64,
                        "no unit of the budget within the hold bound; message withdrawn before its final dot"
                    );
                    return false;
                }
            }
        }
        metrics.rate_limit_wait.observe((ticket.waited + at_dot.elapsed()).as_secs_f64());
        true
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
    use crate::{
        budget::{MemoryLedger, Plan},
        config::SmtpConfig,
    };

    fn smtp(period_ms: u64, max: u32, burst: u32) -> SmtpConfig {
        smtp_with(period_ms, max, burst, &[])
    }

    fn smtp_with(period_ms: u64, max: u32, burst: u32, extra: &[(&str, &str)]) -> SmtpConfig {
        let mut vars: std::collections::HashMap<String, String> =
            [("KAFKA_BROKERS", "k:1"), ("MONGO_LOCAL", "mongodb://m"), ("SMTP_HOST", "h")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        vars.insert("SMTP_RATE_LIMIT_PERIOD".into(), format!("{period_ms}ms"));
        vars.insert("SMTP_RATE_LIMIT_MAX_LETTERS".into(), max.to_string());
        vars.insert("SMTP_RATE_LIMIT_BURST".into(), burst.to_string());
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        crate::Config::from_vars(vars).unwrap().smtp
    }

    /// In recipient mode a transaction carries no more recipients than the smallest window
    /// holds, and a later transaction's wait for its units is bounded: under a spent quota none
    /// come within the bound, and once the quota's window frees they do.
    #[tokio::test(start_paused = true)]
    async fn a_transaction_fits_the_smallest_window_and_a_later_ones_wait_is_bounded() {
        let limiter = |extra: &[(&str, &str)]| {
            let config = smtp_with(1_000, 14, 1, extra);
            let metrics = Arc::new(Metrics::new());
            let budget = Budget::new(Plan::new(&config), Arc::new(MemoryLedger::new()), metrics.clone());
            RateLimit::new(Arc::new(budget), config.throttle_recovery_step, metrics)
        };
        let letters = limiter(&[]);
        assert_eq!((letters.transaction_recipients(50), letters.transaction_recipients(0)), (50, 1));
        let ses = limiter(&[("SMTP_RATE_LIMIT_UNIT", "recipient")]);
        assert_eq!((ses.transaction_recipients(50), ses.transaction_recipients(10)), (14, 10));
        let quota = limiter(&[("SMTP_RATE_LIMIT_UNIT", "recipient"), ("SMTP_QUOTAS", "6/20s")]);
        assert_eq!(quota.transaction_recipients(50), 6);
        let start = tokio::time::Instant::now();
        let first = quota.reserve(6, None).await;
        assert_eq!(first.units, 6);
        let running = CancellationToken::new();
        assert!(quota.reserve_within(2, Duration::from_secs(10), &running).await.is_none());
        assert!(start.elapsed() >= Duration::from_secs(10), "gave up after {:?}", start.elapsed());
        let stopped = CancellationToken::new();
        stopped.cancel();
        assert!(quota.reserve_within(2, Duration::from_secs(30), &stopped).await.is_none());
        assert!(start.elapsed() < Duration::from_secs(11), "a shutdown waited until {:?}", start.elapsed());
        let next = quota.reserve_within(2, Duration::from_secs(30), &running).await.expect("the window frees");
        let freed = next.at.duration_since(first.at);
        assert!(freed >= Duration::from_secs(20), "the next units {freed:?} after the first");
    }

    /// Where the window is counted exactly, a message other than the replica's first goes
    /// unplaced until a preparation is measured (`Budget::probe`): it opens at once, and at its
    /// final dot takes its units and goes, no unit counted as missed and none withdrawn.
    #[tokio::test(start_paused = true)]
    async fn an_unplaced_message_takes_its_units_at_its_final_dot() {
        let config = smtp_with(1_000, 782, 1, &[("SMTP_RATE_LIMIT_UNIT", "recipient"), ("SMTP_MAX_RECIPIENTS", "50")]);
        let metrics = Arc::new(Metrics::new());
        let budget = Budget::new(Plan::new(&config), Arc::new(MemoryLedger::new()), metrics.clone());
        let limit = RateLimit::new(Arc::new(budget), config.throttle_recovery_step, metrics.clone());
        assert!(!limit.reserve(10, None).await.unplaced, "the first message's units are placed");
        let asked = tokio::time::Instant::now();
        let second = limit.reserve(10, None).await;
        assert!(second.unplaced && second.at == asked, "the next opens at once, unplaced");
        // Its preparation.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let at_dot = tokio::time::Instant::now();
        assert!(limit.at_dot(second).await, "it goes on units taken at its dot");
        assert!(at_dot.elapsed() < Duration::from_millis(10), "within moments: {:?}", at_dot.elapsed());
        assert_eq!((metrics.budget_units_missed.get(), metrics.budget_withdrawn.get()), (0, 0));
        assert!(!limit.reserve(10, None).await.unplaced, "measured: placed again");
    }

    /// Deterministic: tokio's paused clock only moves when every task waits, so the figures
    /// hold to the microsecond on a loaded machine.
    #[tokio::test(start_paused = true)]
    async fn rate_limit_caps_every_window_and_keeps_the_rate() {
        let config = smtp(200, 10, 1);
        let metrics = Arc::new(Metrics::new());
        let ledger = Arc::new(MemoryLedger::new());
        let budget = Budget::new(Plan::new(&config), ledger.clone(), metrics.clone());
        let limit = Arc::new(RateLimit::new(Arc::new(budget), config.throttle_recovery_step, metrics));
        let start = tokio::time::Instant::now();
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (limit, times) = (limit.clone(), times.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..15 {
                    let ticket = limit.reserve(1, None).await;
                    // The transaction is ready at once (the fake clock stands still), as the
                    // worker reports it.
                    limit.budget.prepared(ticket.issued.elapsed());
                    tokio::time::sleep_until(ticket.at).await;
                    times.lock().unwrap().push(start.elapsed());
                    // The final reply takes a while: it must not slow the schedule down.
                    tokio::time::sleep(Duration::from_millis(50)).await;
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
        // 60 sends at 50/s less the 0.75 % guard: 20.15 ms apart (one interval more at most, lost
        // while the lead adapts at the start), the first after the lead.
        let span = (times[59] - times[0]).as_secs_f64();
        assert!((59.0 * 0.02015..60.0 * 0.02015).contains(&span), "60 sends spanned {span:.5}s");
        assert!(times[0] <= Duration::from_millis(100), "first send at {:?}", times[0]);
        // Grants of several units, not one write per send.
        let writes = ledger.writes.load(std::sync::atomic::Ordering::Relaxed);
        assert!(writes <= 30, "{writes} writes for 60 sends");
    }

    /// Eight workers keep a 20/s budget busy with bulk letters, each taking its units in its
    /// turn; a transactional letter then gets a unit within two intervals and two leads, not
    /// behind the eight workers' tickets (400 ms: the units each worker took as soon as it was
    /// free), and bulk still keeps the whole rate. Deterministic on the paused clock.
    #[tokio::test(start_paused = true)]
    async fn bulk_takes_its_units_in_turn_so_a_transactional_letter_gets_the_next_one() {
        let config = smtp(1_000, 20, 1);
        let metrics = Arc::new(Metrics::new());
        let budget = Budget::new(Plan::new(&config), Arc::new(MemoryLedger::new()), metrics.clone());
        let limit = Arc::new(RateLimit::new(Arc::new(budget), config.throttle_recovery_step, metrics));
        let start = tokio::time::Instant::now();
        let dots = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let mut workers = Vec::new();
        for _ in 0..8 {
            let (limit, dots, stop) = (limit.clone(), dots.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let turn = limit.bulk_turn().await;
                    let ticket = limit.reserve(1, Some(turn)).await;
                    limit.budget.prepared(ticket.issued.elapsed());
                    tokio::time::sleep_until(ticket.at).await;
                    dots.lock().unwrap().push(start.elapsed());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let asked = tokio::time::Instant::now();
        let ticket = limit.reserve(1, None).await;
        let waited = ticket.at.duration_since(asked);
        let interval = Duration::from_millis(50);
        let bound = 2 * interval + 2 * limit.budget.lead() + Duration::from_millis(1);
        assert!(waited <= bound, "the transactional letter's unit was {waited:?} away (bound {bound:?})");
        stop.cancel();
        for worker in workers {
            worker.await.unwrap();
        }
        // Bulk used the budget all along: 50 ms apart less the 0.75 % guard, 39.7 in two seconds.
        let dots = dots.lock().unwrap().clone();
        let steady = dots.iter().filter(|t| **t >= Duration::from_secs(1) && **t < Duration::from_secs(3)).count();
        assert!(steady >= 39, "{steady} bulk letters in the two seconds before");
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
