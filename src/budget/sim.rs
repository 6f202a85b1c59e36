//! A deterministic simulation of the budget: the schedule, the pool and the ledger on tokio's
//! paused clock, with simulated workers, send times, replicas, clock offsets and a replica killed
//! mid-grant, over the configurations the relays our users send through call for
//! (`shared/guides/real-configs.md`). For each configuration it checks both sides of the budget:
//! no window at the relay holds more than allowed, and the budget is used, at least 95 % of the
//! binding limit (the rate, a quota, or what the workers carry, whichever is lowest).
//!
//! Paused time only moves when every task waits, so a day of sending runs in moments and the
//! figures are the same on a loaded machine.

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{Budget, HOLD_MAX, Ledger, MemoryLedger, Plan, schedule::tests::smtp};
use crate::{
    config::{RateUnit, SmtpConfig},
    metrics::Metrics,
};

const SECOND: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);
const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);
/// Where every run's server clock starts (Unix milliseconds: 2027-01-15 08:27:13.517 UTC, in no
/// bucket's or window's step): the host's clock moved window and bucket boundaries from run to
/// run, and with them a case's result (85.4 % against 94.2 % for one case).
const EPOCH_MS: i64 = 1_799_998_033_517;

/// One configuration of the deployment and its load.
#[derive(Clone, Debug)]
pub struct Case {
    /// The service's own settings, as a user writes them.
    pub vars: Vec<(&'static str, String)>,
    pub replicas: usize,
    pub workers: usize,
    /// One transaction: half of it before the final dot (MAIL, RCPT, DATA, the data), half after.
    pub send: Duration,
    /// Each replica's host clock against the server's, in milliseconds (cycled).
    pub offsets_ms: Vec<i64>,
    /// The first replica stops dead at this time (its grant in flight lands and is stranded).
    pub kill_at: Option<Duration>,
    /// Recipients of successive messages (cycled), the deployment's letters in order: each
    /// message takes the next, whichever worker of whichever replica is free, as the service's
    /// workers take the next letter claimed; the cost in recipient mode. The judge's limit for
    /// letters of mixed sizes in order counts this order ([`in_order`]): with each worker cycling
    /// its own sequence instead, the relay saw an order the limit did not count, and sixteen
    /// workers on a 2 s relay under SES's 30 recipients a second read 94.2 % of it (785 of 833;
    /// 100 % from one queue).
    pub recipients: Vec<u32>,
    pub duration: Duration,
    /// A round trip to the database that holds the budget ([`DATABASE`] on the same network).
    pub database: Duration,
}

/// A round trip to a database on the same network as the replicas.
pub const DATABASE: Duration = Duration::from_millis(2);

impl Case {
    /// The cost of each message its letters make, in order ([`messages`]).
    fn messages(&self) -> Vec<u32> {
        let config = self.config();
        messages(&Plan::new(&config), config.max_recipients as u32, &self.recipients)
    }

    /// The SMTP settings its variables make.
    fn config(&self) -> SmtpConfig {
        let vars: Vec<(&str, &str)> = self.vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        smtp(&vars)
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vars: Vec<String> =
            self.vars.iter().map(|(k, v)| format!("{}={v}", k.trim_start_matches("SMTP_"))).collect();
        write!(
            f,
            "{} | {} replica(s) x {} worker(s), send {:?}, offsets {:?} ms{}, recipients {:?}, {:?}",
            vars.join(" "),
            self.replicas,
            self.workers,
            self.send,
            self.offsets_ms,
            self.kill_at.map(|t| format!(", first killed at {t:?}")).unwrap_or_default(),
            self.recipients,
            self.duration
        )?;
        match self.database {
            DATABASE => Ok(()),
            database => write!(f, ", database {database:?} away"),
        }
    }
}

/// What the relay saw: each message's end of data and its units.
pub struct Seen {
    pub dots: Vec<(Duration, u32)>,
    /// The same, per worker (replica after replica), in time order.
    pub by_worker: Vec<Vec<(Duration, u32)>>,
    pub plan: Plan,
}

impl Seen {
    pub fn used(&self) -> u64 {
        self.dots.iter().map(|(_, units)| u64::from(*units)).sum()
    }

    /// Units per second the workers carry once past their start: each worker's units from its
    /// first dot at or after `from` to its last, over that time, summed. Measured per worker over
    /// whole rounds, since workers that start together send in step, and a count of dots in a
    /// span of time is off by as many workers as are in step (a fifth at 2 s sends over 5 s).
    pub fn steady_rate(&self, from: Duration) -> f64 {
        self.rounds(from)
            .filter(|after| after.len() > 1 && after[after.len() - 1].0 > after[0].0)
            .map(|after| {
                let units: u64 = after[1..].iter().map(|(_, units)| u64::from(*units)).sum();
                units as f64 / (after[after.len() - 1].0 - after[0].0).as_secs_f64()
            })
            .sum()
    }

    /// The time from one dot of a worker to its next, once past the start (from `from`),
    /// averaged over the workers that sent twice since.
    pub fn cycle(&self, from: Duration) -> Option<Duration> {
        let cycles: Vec<f64> = self
            .rounds(from)
            .filter(|after| after.len() > 1)
            .map(|after| (after[after.len() - 1].0 - after[0].0).as_secs_f64() / (after.len() - 1) as f64)
            .collect();
        (!cycles.is_empty()).then(|| Duration::from_secs_f64(cycles.iter().sum::<f64>() / cycles.len() as f64))
    }

    /// Each worker's dots from `from` on (they are in time order).
    fn rounds(&self, from: Duration) -> impl Iterator<Item = &[(Duration, u32)]> {
        self.by_worker.iter().map(move |dots| &dots[dots.partition_point(|(at, _)| *at < from)..])
    }

    /// The units of the dots before `until`, in consecutive windows of `width` from the start.
    pub fn per_window(&self, width: Duration, until: Duration) -> Vec<u32> {
        windows(&self.dots, width, until)
    }

    /// (window, busiest, allowed) of every window of the budget that held more than it allows:
    /// the rate's period, two periods at its pace, and each quota's window.
    pub fn over(&self) -> Vec<(String, u64, u64)> {
        let plan = &self.plan;
        let burst = (plan.tolerance_ns / plan.interval_ns) as u64;
        let mut over = Vec::new();
        let rate_allowed = u64::from(plan.rate_max) + burst;
        let busiest = self.busiest(Duration::from_nanos(plan.period_ns as u64));
        if busiest > rate_allowed {
            over.push((plan.rate_label.clone(), busiest, rate_allowed));
        }
        // The rate's pace: two periods hold at most 2 × MAX + BURST − 1, as the generic cell rate
        // algorithm allows, and a message's units less one more (a message goes once its first unit is
        // due). The window of a period alone let every period hold the burst again.
        let paced_allowed = 2 * u64::from(plan.rate_max) + burst + u64::from(plan.largest_cost - 1);
        let busiest = self.busiest(Duration::from_nanos(2 * plan.period_ns as u64));
        if busiest > paced_allowed {
            over.push((format!("{} over two periods", plan.rate_label), busiest, paced_allowed));
        }
        for quota in &plan.quotas {
            let busiest = self.busiest(Duration::from_nanos(quota.window_ns as u64));
            if busiest > u64::from(quota.limit) {
                over.push((quota.label.clone(), busiest, u64::from(quota.limit)));
            }
        }
        over
    }

    /// As [`Seen::per_window`], for the dots of one replica of `workers` workers.
    pub fn replica_per_window(&self, replica: usize, workers: usize, width: Duration, until: Duration) -> Vec<u32> {
        windows(self.by_worker[replica * workers..(replica + 1) * workers].iter().flatten(), width, until)
    }

    /// The most units any window of `width` holds (half-open windows, as a relay counts).
    pub fn busiest(&self, width: Duration) -> u64 {
        let (mut busiest, mut held, mut first) = (0, 0, 0);
        for last in 0..self.dots.len() {
            held += u64::from(self.dots[last].1);
            while self.dots[last].0 - self.dots[first].0 >= width {
                held -= u64::from(self.dots[first].1);
                first += 1;
            }
            busiest = busiest.max(held);
        }
        busiest
    }
}

/// The units of `dots` before `until`, in consecutive windows of `width` from the start.
fn windows<'a>(dots: impl IntoIterator<Item = &'a (Duration, u32)>, width: Duration, until: Duration) -> Vec<u32> {
    let mut windows = vec![0; (until.as_nanos() / width.as_nanos()) as usize];
    for (at, units) in dots.into_iter().filter(|(at, _)| *at < until) {
        windows[(at.as_nanos() / width.as_nanos()) as usize] += units;
    }
    windows
}

/// `SIM_STALLS=every_ms:ms`: the first write to the ledger in each span of `every_ms` answers
/// `ms` late, as a loaded MongoDB's now and then do; for explorations of how the budget weathers
/// them (none by default). A test sets them for the runs within [`with_stalls`].
fn stalls() -> Option<(Duration, Duration)> {
    if let Ok(stalls) = STALLS.try_with(|stalls| *stalls) {
        return stalls;
    }
    let stalls = std::env::var("SIM_STALLS").ok()?;
    let (every, ms) = stalls.split_once(':')?;
    Some((Duration::from_millis(every.parse().ok()?), Duration::from_millis(ms.parse().ok()?)))
}

tokio::task_local! {
    static STALLS: Option<(Duration, Duration)>;
}

/// Runs `future` (a [`run`] or [`judge`]) with a ledger whose first write in each span of
/// `every` answers `stall` late, whatever `SIM_STALLS` says.
pub async fn with_stalls<F: std::future::Future>(every: Duration, stall: Duration, future: F) -> F::Output {
    STALLS.scope(Some((every, stall)), future).await
}

/// Runs `case` on the current (paused) runtime.
pub async fn run(case: &Case) -> Seen {
    let config = case.config();
    let plan = Plan::new(&config);
    let ledger = Arc::new(MemoryLedger::slow(case.database).starting_at(EPOCH_MS).stalling(stalls()));
    let started = Instant::now();
    let end = started + case.duration;
    let dots = Arc::new(Mutex::new(Vec::new()));
    let mut replicas = Vec::new();
    // The deployment's messages, in order: the next one's place in `messages`.
    let messages = Arc::new(case.messages());
    let next_message = Arc::new(AtomicUsize::new(0));
    for replica in 0..case.replicas {
        let offset_ms = case.offsets_ms[replica % case.offsets_ms.len()];
        let clock = crate::clock::Clock::starting_at((EPOCH_MS + offset_ms) * 1_000_000);
        let ledger: Arc<dyn Ledger> = ledger.clone();
        let budget = Arc::new(Budget::with_clock(plan.clone(), ledger, clock, Arc::new(Metrics::new())));
        // Bulk letters' workers take their units one after another (`RateLimit::bulk_turn`).
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        let mut workers = Vec::new();
        for worker in 0..case.workers {
            let (budget, dots, case, turn) = (budget.clone(), dots.clone(), case.clone(), turn.clone());
            let (messages, next_message) = (messages.clone(), next_message.clone());
            let id = replica * case.workers + worker;
            workers.push(tokio::spawn(async move {
                let work = async {
                    if messages.is_empty() {
                        return tokio::time::sleep_until(end).await;
                    }
                    loop {
                        let message = next_message.fetch_add(1, Ordering::Relaxed);
                        let cost = messages[message % messages.len()];
                        send_one(&budget, &turn, cost, case.send, started, id, &dots).await;
                    }
                };
                let _ = tokio::time::timeout_at(end, work).await;
            }));
        }
        replicas.push(workers);
    }
    if let Some(kill_at) = case.kill_at {
        tokio::time::sleep_until(started + kill_at).await;
        for worker in &replicas[0] {
            worker.abort();
        }
    }
    for worker in replicas.into_iter().flatten() {
        let _ = worker.await;
    }
    let mut all = std::mem::take(&mut *dots.lock().unwrap());
    all.sort();
    let mut by_worker = vec![Vec::new(); case.replicas * case.workers];
    for (at, units, worker) in &all {
        by_worker[*worker].push((*at, *units));
    }
    let dots = all.into_iter().map(|(at, units, _)| (at, units)).collect();
    Seen { dots, by_worker, plan }
}

/// The cost of each message that letters of `recipients` (cycled) make, in order, as the
/// service sends them: a letter's recipients in transactions of at most
/// [`Plan::transaction_recipients`], each one message.
fn messages(plan: &Plan, max_recipients: u32, recipients: &[u32]) -> Vec<u32> {
    let per_transaction = plan.transaction_recipients(max_recipients as usize) as u32;
    let mut messages = Vec::new();
    for &letter in recipients {
        let chunks = letter.max(1).div_ceil(per_transaction);
        for chunk in 0..chunks {
            let size = (letter - chunk * per_transaction).min(per_transaction).max(1);
            messages.push(match plan.unit {
                RateUnit::Letter => 1,
                RateUnit::Recipient => size,
            });
        }
    }
    messages
}

/// One bulk message as a worker sends it (`RateLimit::reserve`, then `deliver`'s final dot): in
/// its turn, its units once they are near ([`Budget::bulk_wait`]), the wait before opening the
/// transaction, the data, the dot at the unit's time or a new unit when too late for it (bounded
/// by [`HOLD_MAX`]); the dot, if it went, in `dots`, and told to the budget as `at_dot` does
/// ([`Budget::on_time`]: the bulk slack shrinks, and the worker's next units may be booked).
/// Where the budget hands out fewer units than the message costs ([`Budget::take_up_to`]), the
/// worker sends that many and the rest in its next transaction, as `deliver` does.
async fn send_one(
    budget: &Arc<Budget>,
    turn: &Arc<tokio::sync::Mutex<()>>,
    cost: u32,
    send: Duration,
    started: Instant,
    worker: usize,
    dots: &Mutex<Vec<(Duration, u32, usize)>>,
) {
    let queued = budget.queued();
    let turn = turn.clone().lock_owned().await;
    drop(queued);
    while let Some(wait) = budget.bulk_wait() {
        tokio::time::sleep(wait.min(SECOND)).await;
    }
    let mut ticket = budget.take_up_to(cost).await;
    drop(turn);
    let mut left = cost;
    loop {
        left -= ticket.units.min(left);
        send_transaction(budget, ticket, send, started, worker, dots).await;
        if left == 0 {
            return;
        }
        ticket = budget.take_up_to(left).await;
    }
}

/// One transaction on `ticket`: the wait before opening it, the data, the dot.
async fn send_transaction(
    budget: &Arc<Budget>,
    mut ticket: super::Ticket,
    send: Duration,
    started: Instant,
    worker: usize,
    dots: &Mutex<Vec<(Duration, u32, usize)>>,
) {
    let cost = ticket.units;
    let open_at = ticket.at.checked_sub(budget.lead().max(SECOND)).unwrap_or(ticket.at);
    let mut issued = ticket.issued;
    if open_at > Instant::now() {
        tokio::time::sleep_until(open_at).await;
        issued = Instant::now();
    }
    tokio::time::sleep(send / 2).await;
    let at_dot = Instant::now();
    budget.prepared(at_dot.duration_since(issued));
    let hold_until = at_dot + HOLD_MAX;
    let went = loop {
        tokio::time::sleep_until(ticket.at).await;
        if Instant::now().saturating_duration_since(ticket.unit) <= budget.plan().late && !ticket.unplaced {
            break true;
        }
        budget.missed(&ticket);
        match tokio::time::timeout_at(hold_until, budget.take_ready(cost)).await {
            Ok(next) if next.at <= hold_until => ticket = next,
            _ => break false,
        }
    };
    if went {
        budget.on_time();
        dots.lock().unwrap().push((started.elapsed(), cost, worker));
    }
    tokio::time::sleep(send - send / 2).await;
}

/// The share of the binding limit a configuration must use: 95 % of a rate, a quota or what
/// the workers carry, in every class (the grid, the property cases, and 2,000 more explored
/// with `SIM_EXPLORE`, seeds 3, 5, 7, 11 and 21, none below 95 %: the README's budget section).
///
/// No longer gaps: the workers within a quota's window (94 % before: the window frees up to
/// two of its buckets late and the workers wait for it; counted in 64 buckets, 329 a minute
/// with two replicas of ten on a 2 s relay used 94.8 %, in 128 (`schedule::BUCKETS`) 99.0 %);
/// the workers without a burst (91 % before: the messages that missed their
/// first units went a lead after the next message still to be prepared; see
/// `Budget::prepared`), 96.2 % at worst in the grid now; several replicas whose workers
/// carry less than twice the rate (93 % before), 95.3 %; the workers with a burst and no
/// quota (89 % before), 97.5 %. Nor is a replica killed: under quotas, units are granted no
/// more than a second ahead (`schedule::QUOTA_HORIZON`), so a replica that dies strands none
/// of a window's later units; under a window counted exactly, a message still to be prepared is
/// placed no more than its lead and a window ahead (`schedule::exact_horizon_ns`).
///
/// Not reached by the grid or the property cases, whose bursts are drawn as a share of the
/// rate: the default `BURST=1` with several replicas. With the burst forced to 1
/// (`SIM_BURST1=1`), 1, 2, 0, 0 and 0 of 300 explored cases fall below 95 % with seeds 21, 7,
/// 11, 3 and 5, the worst 92.5 % (82.8 % before a lane left to the others went whole and a
/// first grant was a quarter of a lookahead, 80.9 % before a strided replica asked by its own
/// runs): each of them three replicas on a 20 ms relay. They were 9, 9, 11, 9 and 9, the worst
/// 74.2 %, before
/// replicas on slower relays placed each message where it would be ready
/// (`Budget::places_each_message`). The judge's reference is the nearer of two [`references`]:
/// far above the load only, it lost half a preparation and a grant's round trip a message, and
/// cases read up to 155 % of it (111 % now). The references are budgets too, and lose what
/// several replicas of few workers on fast relays lose in them (three replicas of one worker on
/// a 20 ms relay: 636 letters in 5 s, 750 back to back). That is the next work on the budget.
/// With `SIM_BURST1=1 SIM_RECIPIENTS=1` (budgets in recipients with the default burst), 1, 1, 0,
/// 1, 1, 0, 0 and 0 of 200 with seeds 21, 7, 11, 3, 5, 13, 17 and 19 (2, 2, 7, 4, 5, 7, 7 and 3
/// before grants continued the units held, quotas lent their rest to parts, replicas whose stock
/// passed placed each message, messages' units ended at their dots, replicas sharing a schedule
/// took a grant a message and so did large messages in a window counted exactly, and grants
/// placed for each message covered their round trip), the worst
/// 93.0 % (52.9 %), three replicas of one worker on a 2 s relay under 1,430 recipients per 10 s
/// beside a quota of 100 per 20 s, where the workers bind (89.7 % before the first measured
/// preparation set which units a message can reach: three replicas of one worker on a 1 ms
/// relay, letters of 1 to 10, 94.1 % now; 85.0 % before lanes went whole and first grants were a
/// quarter of a lookahead: three replicas of eight workers on a 20 ms relay, letters of one);
/// that class broke a quota before
/// (`a_message_spread_over_more_than_a_quotas_reach_keeps_the_quota`).
///
/// Most of what these cases lack is lost in their first second: run for 30 s at least
/// (`SIM_MIN_SECONDS=30`), 2 of that class's 1,600 cases fall below 95 % (the worst 93.0 %, three
/// replicas of one worker on a 2 s relay under a quota of 100 per 20 s) and none of the 1,500 of
/// `SIM_BURST1=1` (the worst 95.6 %).
///
/// The simulated workers take their units as the service's bulk workers do, in turn and near
/// their time; taking each as soon as they were free, they held the schedule a worker's unit
/// ahead each, and three replicas of four at 20 a second used 84.0 %.
pub const REQUIRED: f64 = 0.95;

/// How the judge names the limit of letters of mixed sizes filling exact windows in order, at
/// the end of the windows' labels.
///
/// That class was once asserted at 94 % only: sixteen workers on a 2 s relay under 30
/// recipients a second, letters of 1 to 10, read 94.2 % of the 833 recipients the window lets
/// through in order. The budget was not short: each simulated worker cycled its own sequence of
/// sizes, so the relay saw the letters in another order than the one the limit counts; from one
/// queue, as the service's workers take them ([`Case::recipients`]), it sends all 833.
const MIXED_IN_ORDER: &str = "as letters of mixed sizes allow in order";

/// The judgement of one case.
#[derive(Debug)]
pub struct Judged {
    pub used: u64,
    pub binding: u64,
    pub bound_by: String,
    /// (window, busiest, allowed) of every window found over its limit.
    pub over: Vec<(String, u64, u64)>,
}

impl Judged {
    pub fn share(&self) -> f64 {
        // Nothing could be sent (every letter too large for the budget's smallest window), and
        // nothing was.
        if self.binding == 0 && self.used == 0 {
            return 1.0;
        }
        self.used as f64 / self.binding.max(1) as f64
    }
}

/// The same load as `case` under references to measure what its workers carry: a budget far
/// above the load, and one at four times the pace the workers could keep with every message back
/// to back, each with the same burst tolerance in time as the case (a burst lets a message go as
/// soon as it is ready, where a unit without one is waited for after it was taken, so a case with
/// a long burst carried more than its reference without one: the 24 h budget with a burst of
/// 2,000 read 128-167 % of it). Each one's letters are what some budget carried, so the more of
/// the two is the nearer to what the workers can. Far above the load, a replica's units pass
/// before its next message comes, so each message waits a grant's round trip: one worker on a
/// 20 ms relay carried 209 letters in 5 s at 40,000 a second, 240 at 736 (which read 115 % of
/// the reference); at four times its pace (200 a second), 239.
fn references(case: &Case) -> Vec<Case> {
    let plan = Plan::new(&case.config());
    let largest = case.messages().into_iter().max().unwrap_or(1);
    let cost = match plan.unit {
        RateUnit::Letter => 1.0,
        RateUnit::Recipient => f64::from(largest),
    };
    let pace = (case.replicas * case.workers) as f64 / case.send.as_secs_f64() * cost;
    let near = (4.0 * pace).ceil() as u32;
    // Where the case's own budget takes loose grants (units usable at any moment, no lead waited
    // for), so does its reference: scheduled units read 124-146 % of it at 100,000 a second.
    let far = match plan.loose_max {
        0 => 40_000,
        _ => 1_000_000,
    };
    let mut maxima = vec![far];
    if plan.loose_max == 0 && (1..far).contains(&near) {
        maxima.push(near);
    }
    maxima
        .into_iter()
        .map(|max| {
            let burst =
                (plan.tolerance_ns as f64 * f64::from(max) / 1e9).ceil().clamp(0.0, f64::from(max - 1)) as u32 + 1;
            Case {
                vars: case
                    .vars
                    .iter()
                    .filter(|(k, _)| {
                        !matches!(
                            *k,
                            "SMTP_RATE_LIMIT_PERIOD"
                                | "SMTP_RATE_LIMIT_MAX_LETTERS"
                                | "SMTP_QUOTAS"
                                | "SMTP_RATE_LIMIT_BURST"
                        )
                    })
                    .cloned()
                    // Scheduled units still (loose grants begin at 51,200 a period): what the
                    // workers carry under the budget's own protocol.
                    .chain([
                        ("SMTP_RATE_LIMIT_PERIOD", "1s".to_owned()),
                        ("SMTP_RATE_LIMIT_MAX_LETTERS", max.to_string()),
                        ("SMTP_RATE_LIMIT_BURST", burst.to_string()),
                    ])
                    .collect(),
                ..case.clone()
            }
        })
        .collect()
}

/// Runs `case`, and the same load under its [`references`] to measure what the workers carry,
/// and judges the first against the limits.
pub async fn judge(case: &Case) -> Judged {
    let seen = run(case).await;
    // What the workers carry: the whole run where it is short, else a sample of forty rounds
    // (a day of unbounded sends would be millions of simulated messages) and then the rate they
    // kept past their first rounds. A sample of 5 s scaled up counted the start's wait for a first
    // dot once per 5 s, and so took 2 s sends for a fifth slower than they are: the cases they
    // bound read 124-197 % of it, and were not checked at all.
    let sample = case.duration.min((5 * SECOND).max(40 * case.send));
    // Measured after a kill within the sample, so that only the workers still alive carry on:
    // measured from a quarter of it, the killed replica's workers kept their rate for the rest of
    // the run, and a case they could not reach read 91.5 %.
    let from = case.kill_at.map_or(sample / 4, |killed| killed.max(sample / 4));
    let mut best: Option<(u64, Option<f64>, Seen)> = None;
    for reference in references(case) {
        let sampled = run(&Case { duration: sample, ..reference }).await;
        let pace = (case.duration > sample).then(|| sampled.steady_rate(from));
        let carried = match pace {
            Some(pace) => sampled.used() + (pace * (case.duration - sample).as_secs_f64()) as u64,
            None => sampled.used(),
        };
        if best.as_ref().is_none_or(|(most, ..)| carried > *most) {
            best = Some((carried, pace, sampled));
        }
    }
    let Some((carried, pace, sampled)) = best else { unreachable!("a reference far above the load, at least") };
    let plan = &seen.plan;
    let d = case.duration.as_secs_f64();
    let period = plan.period_ns as f64 / 1e9;
    let burst = (plan.tolerance_ns / plan.interval_ns) as u64;
    // The rate: its units over the time, the burst at the start; the quotas: a full window for
    // every window that starts within the time.
    // The rate: BURST at once, then MAX a period: a unit at the start of each interval that
    // begins within the time (the first of them the burst's), so a 1/s budget over 5 s is 5 and a
    // daily one over two days and a minute is 3 (floored, it read 150 % of 2).
    let mut limits = vec![(plan.rate_label.clone(), burst + (d / period * f64::from(plan.rate_max)).ceil() as u64)];
    let costs = case.messages();
    // Where the rate's window is counted exactly, the window is the rate's cap (the windows in
    // order below), and a message waits for no pace but the burst's, which lets it go once its
    // first unit is due (`Plan::pace`): paced to its last unit, letters of 1, 50 and 7 under 298
    // recipients an hour were judged against 1 recipient in 600 s (the letter of 50 waiting 49
    // intervals), and the budget's 298 read 29,800 %: one recipient sent would have passed.
    let rate_pace = match (&plan.exact, plan.pace) {
        (None, _) => {
            let interval = plan.period_ns / i64::from(plan.rate_max);
            Some(Pace { interval_ns: interval, tolerance_ns: burst as i64 * interval, at_first_unit: false })
        }
        (Some(_), Some((interval_ns, tolerance_ns))) => Some(Pace { interval_ns, tolerance_ns, at_first_unit: true }),
        (Some(_), None) => None,
    };
    if let Some(pace) = rate_pace.filter(|_| costs.iter().any(|cost| *cost > 1)) {
        // Counted as if messages could be split, the rate let a message's units go before the
        // message could: letters of 1, 50 and 7 recipients under 587 a day with a burst of 12
        // were judged against 16 recipients in 600 s, where the letter of 50 cannot go for hours
        // under any sender that keeps the rate and the order (1 of 16 read 6.2 %).
        let label = format!("{} {MIXED_IN_ORDER}", plan.rate_label);
        limits.push((label, in_order(&costs, &[], case.send / 2, case.duration, None, Some(pace), false)));
    }
    // Where the windows are counted exactly, and under a quota with one replica, whose workers
    // take their units one after another in the letters' order: a quota of 21 recipients per
    // 10 minutes beside letters of 1 to 10 fits 16, 17 and 14 of them in order in three windows,
    // and the budget sends exactly those 47 (74.6 % of the quota alone). Not with several
    // replicas, each taking its own next letter: there the order is the deployment's no longer,
    // and cases read up to 125 % of it.
    let in_order_windows = plan.exact.is_some() || (!plan.quotas.is_empty() && case.replicas == 1);
    // Transactions go in part where the windows have room for part of them (`Budget::take_up_to`).
    let split = plan.splits_transactions();
    if in_order_windows && costs.iter().any(|c| *c != costs[0]) {
        // Every window at once: a quota beside the rate wastes what its last message in a
        // window could not fill too, up to a message's cost less one (5 % of 2,000 a minute
        // for messages of up to 100 recipients).
        let (windows, labels): (Vec<(u32, i64)>, Vec<&str>) =
            std::iter::once(((plan.rate_max + burst as u32, plan.period_ns), plan.rate_label.as_str()))
                .chain(plan.quotas.iter().map(|quota| ((quota.limit, quota.window_ns), quota.label.as_str())))
                .unzip();
        // Beside the rate's own limit, the burst and then its pace, not instead of it: the
        // windows alone let a daily budget with a burst of 267 spend its whole day's window
        // within 600 s (1,065 recipients, where the burst and the pace give 273).
        let label = format!("{} {MIXED_IN_ORDER}", labels.join(" and "));
        limits.push((label, in_order(&costs, &windows, case.send / 2, case.duration, None, None, split)));
        // And with the workers at once: where the windows and the workers bind together, a
        // message the windows hold back holds its worker too, and each alone overstates what
        // any sender can do (sixteen workers on a 2 s relay under 30 recipients a second, for
        // letters of 1 to 10, carry 91 % of the rate: 92.2 % of either alone).
        let workers = sampled.cycle(from).filter(|_| case.kill_at.is_none());
        if let Some(cycle) = workers {
            let label = format!("{} and the workers, for letters of mixed sizes in order", labels.join(" and "));
            let workers = Some((cycle, case.replicas * case.workers));
            limits.push((label, in_order(&costs, &windows, case.send / 2, case.duration, workers, None, split)));
        }
    }
    // A quota: each window that starts within the time, as full as the workers can make it in
    // what is left of the time; the first from the first dot on, a transaction's preparation
    // after the start (as `at_once` and `in_order` count). Counted from 0, the last window of
    // 292 per 20 s over 50 s, 2 s sends, held a second more of the workers' pace (19 letters)
    // than any sender has.
    let carry_per_s = carried as f64 / d;
    for quota in &plan.quotas {
        let window = quota.window_ns as f64 / 1e9;
        let (mut ideal, mut workers_bound, mut start) = (0, false, (case.send / 2).as_secs_f64());
        while start < d {
            let carried = (carry_per_s * (d - start).min(window)) as u64;
            workers_bound |= carried < u64::from(quota.limit);
            ideal += carried.min(u64::from(quota.limit));
            start += window;
        }
        let label = match workers_bound {
            true => format!("the workers within {}", quota.label),
            false => quota.label.clone(),
        };
        limits.push((label, ideal));
    }
    limits.push(("the workers".to_owned(), carried));
    // Every limit at once, where each message costs one unit: a sender that hands over each
    // message as soon as the rate, every quota and the workers all allow it. Each limit alone
    // over the whole run overstates what any sender can do where they bind in turn: 110 a 10 s
    // period with a burst of 21 beside 500 a minute over 150 s is 1,500 by the quota alone, but
    // the last half-minute holds what the rate gives it, 330 (the budget read 86.8 % of 1,500).
    let costs_one = costs.iter().all(|cost| *cost == 1);
    if plan.exact.is_none() && (plan.unit == RateUnit::Letter || costs_one) {
        // Every worker of the deployment ready at once after a wait, and the pace the workers
        // keep in between; where the run is short, what they carried is measured whole above.
        // Not after a kill: the survivors' pace over the whole run would understate the start.
        let workers = pace.filter(|_| case.kill_at.is_none()).map(|pace| (pace, (case.replicas * case.workers) as f64));
        let label = format!("{} with every other limit at once", plan.rate_label);
        limits.push((label, at_once(plan, case.send / 2, case.duration, workers)));
    }
    let (bound_by, binding) = limits.into_iter().min_by_key(|(_, n)| *n).unwrap_or_default();
    Judged { used: seen.used(), binding, bound_by, over: seen.over() }
}

/// The most messages of one unit a sender can hand over from `first` (no dot comes before the
/// first transaction is prepared) to `duration`, each at the earliest moment every limit allows:
/// the rate's schedule (`BURST` at once, then one an interval: the generic cell rate algorithm
/// at the rate's nominal interval, so the guard's spacing counts against the budget), every quota
/// as a sliding window, and the workers (`(units a second, how many)`: as many at once after a
/// wait, then their pace). Sending each as early as allowed gives the most messages, since no
/// limit here lets a later message go sooner for an earlier one having waited.
fn at_once(plan: &Plan, first: Duration, duration: Duration, workers: Option<(f64, f64)>) -> u64 {
    let end = duration.as_secs_f64();
    let interval = plan.period_ns as f64 / 1e9 / f64::from(plan.rate_max);
    let tolerance = (plan.tolerance_ns / plan.interval_ns) as f64 * interval;
    let mut quotas: Vec<Sliding> = plan.quotas.iter().map(|q| Sliding::new(q.limit, q.window_ns)).collect();
    // The theoretical arrival times of the rate's and the workers' next unit.
    let (mut rate_tat, mut workers_tat, mut at, mut used) = (0.0_f64, 0.0_f64, first.as_secs_f64(), 0);
    loop {
        at = at.max(rate_tat - tolerance);
        if let Some((pace, count)) = workers {
            at = at.max(workers_tat - (count - 1.0) / pace);
        }
        for window in &mut quotas {
            at = at.max(window.fits((at * 1e9).ceil() as i64, 1) as f64 / 1e9);
        }
        if at >= end {
            return used;
        }
        rate_tat = rate_tat.max(at) + interval;
        if let Some((pace, _)) = workers {
            workers_tat = workers_tat.max(at) + 1.0 / pace;
        }
        for window in &mut quotas {
            window.push((at * 1e9).ceil() as i64, 1);
        }
        used += 1;
    }
}

/// The most units a relay counting every window exactly takes from messages of `costs` (cycled)
/// sent in order, each as soon as every window (`(limit, width)`) has room for it, in `duration`:
/// where messages cost several units, one that does not fit what a window has left waits for
/// room, and what is left unused meanwhile is lost to any sender that keeps the order (88.6 % of
/// SES's 14 a second for letters of 1 to 10 recipients). The first goes at `first`: no sender's
/// dot comes before its first transaction is prepared (counted from 0, a 2 s relay's cases read a
/// second of the rate short, 3 % of 40 s).
///
/// With `workers` (`(cycle, how many)`), each message also waits for a worker: one that sent a
/// message sends its next a cycle (one dot to the next, as measured unbounded) later.
///
/// With `rate`, each message also waits for the rate's burst and pace as a schedule places a
/// message of several units: its units take the next places from the rate's next free one (or
/// from when the message is ready, if later), and it goes at its last unit's place less the
/// tolerance (the generic cell rate algorithm, for messages of one unit), or at its first
/// unit's where the pace is kept beside a window counted exactly ([`Pace::at_first_unit`]).
/// Counted with the windows at once, the rate's places pass while a message waits for a
/// window, which no budget that counts the window exactly loses (the budget's schedule runs at
/// eight times the rate there): SES's classes read 109-113 % of it. So the judge counts the
/// rate in order and the windows in order apart.
///
/// With `split`, a message that does not fit what the windows have left sends that much at once
/// and the rest as the next message, as the service's transactions do where the budget hands out
/// fewer units than asked (`Budget::take_up_to`).
fn in_order(
    costs: &[u32],
    windows: &[(u32, i64)],
    first: Duration,
    duration: Duration,
    workers: Option<(Duration, usize)>,
    rate: Option<Pace>,
    split: bool,
) -> u64 {
    let end = duration.as_nanos() as i64;
    // The rate's theoretical arrival time of its next unit.
    let mut tat = 0_i64;
    let mut counted: Vec<Sliding> = windows.iter().map(|(limit, width)| Sliding::new(*limit, *width)).collect();
    let (mut at, mut used) = (first.as_nanos() as i64, 0_u64);
    // When each worker is free for its next message, soonest first.
    let mut free: std::collections::BinaryHeap<std::cmp::Reverse<i64>> =
        std::iter::repeat_n(std::cmp::Reverse(at), workers.map_or(0, |(_, count)| count)).collect();
    let mut next = costs.iter().cycle();
    // What is left of a message that went in part.
    let mut rest = None;
    while let Some(mut cost) = rest.take().or_else(|| next.next().copied()) {
        if let Some(std::cmp::Reverse(soonest)) = free.pop() {
            at = at.max(soonest);
        }
        if split {
            let room = counted.iter_mut().map(|window| window.room(at)).min().unwrap_or(cost);
            if room > 0 && room < cost {
                rest = Some(cost - room);
                cost = room;
            }
        }
        // Its units' places: from the rate's next free one, or from when it is ready if later.
        let place = tat.max(at);
        if let Some(Pace { interval_ns, tolerance_ns, at_first_unit }) = rate {
            let waits_for = if at_first_unit { 0 } else { cost - 1 };
            at = at.max(place + i64::from(waits_for) * interval_ns - tolerance_ns);
        }
        // Time only moves on, so a window that has room at `at` still has it later.
        for window in &mut counted {
            at = window.fits(at, cost);
        }
        if at >= end {
            return used;
        }
        if let Some((cycle, _)) = workers {
            free.push(std::cmp::Reverse(at + cycle.as_nanos() as i64));
        }
        for window in &mut counted {
            window.push(at, cost);
        }
        if let Some(Pace { interval_ns, .. }) = rate {
            tat = place + i64::from(cost) * interval_ns;
        }
        used += u64::from(cost);
    }
    used
}

/// The rate's pace as [`in_order`] keeps it, in nanoseconds.
#[derive(Clone, Copy)]
struct Pace {
    interval_ns: i64,
    tolerance_ns: i64,
    /// A message goes once its first unit is due, not its last: the budget's pace beside a
    /// window counted exactly (`Plan::pace`), which takes a message of many units as one is due.
    at_first_unit: bool,
}

/// A window a relay counts exactly (`limit` units in any `width_ns`), fed messages in time order:
/// the messages it still counts, and their units.
struct Sliding {
    sent: std::collections::VecDeque<(i64, u32)>,
    held: u32,
    limit: u32,
    width_ns: i64,
}

impl Sliding {
    fn new(limit: u32, width_ns: i64) -> Sliding {
        Sliding { sent: Default::default(), held: 0, limit, width_ns }
    }

    /// The soonest from `at_ns` a message of `cost` fits: the oldest messages leave the count as
    /// the window passes them.
    fn fits(&mut self, at_ns: i64, cost: u32) -> i64 {
        let mut at_ns = at_ns;
        while self.held + cost > self.limit {
            let Some((first, n)) = self.sent.pop_front() else { break };
            at_ns = at_ns.max(first + self.width_ns);
            self.held -= n;
        }
        at_ns
    }

    /// The units the window has room for at `at_ns` (no earlier message comes later).
    fn room(&mut self, at_ns: i64) -> u32 {
        while let Some((first, n)) = self.sent.front().copied() {
            if first + self.width_ns > at_ns {
                break;
            }
            self.sent.pop_front();
            self.held -= n;
        }
        self.limit.saturating_sub(self.held)
    }

    fn push(&mut self, at_ns: i64, cost: u32) {
        self.sent.push_back((at_ns, cost));
        self.held += cost;
    }
}

fn var(name: &'static str, value: impl ToString) -> (&'static str, String) {
    (name, value.to_string())
}

/// A budget in letters: `max` per `period` with a burst, and quotas if any.
fn letters(period: &str, max: u32, burst: u32, quotas: Option<&str>) -> Vec<(&'static str, String)> {
    let mut vars = vec![
        var("SMTP_RATE_LIMIT_PERIOD", period),
        var("SMTP_RATE_LIMIT_MAX_LETTERS", max),
        var("SMTP_RATE_LIMIT_BURST", burst),
    ];
    vars.extend(quotas.map(|quotas| var("SMTP_QUOTAS", quotas)));
    vars
}

/// As [`letters`], counted in recipients, at most `per_message` a transaction.
fn in_recipients(
    period: &str,
    max: u32,
    burst: u32,
    quotas: Option<&str>,
    per_message: u32,
) -> Vec<(&'static str, String)> {
    let mut vars = letters(period, max, burst, quotas);
    vars.extend([var("SMTP_RATE_LIMIT_UNIT", "recipient"), var("SMTP_MAX_RECIPIENTS", per_message)]);
    vars
}

impl Case {
    /// `replicas` of `workers` each, sends of `send`, letters of one recipient, clocks in step,
    /// none killed.
    fn load(
        vars: Vec<(&'static str, String)>,
        replicas: usize,
        workers: usize,
        send: Duration,
        duration: Duration,
    ) -> Case {
        Case {
            vars,
            replicas,
            workers,
            send,
            offsets_ms: vec![0],
            kill_at: None,
            recipients: vec![1],
            duration,
            database: DATABASE,
        }
    }
}

/// Letters of one to ten recipients, in the order the grid's and the tests' letters of mixed sizes
/// come.
const MIXED: [u32; 10] = [1, 3, 10, 2, 7, 1, 5, 4, 9, 1];

/// The grid: the relays' own settings (a daily quota with the rate left high, SES in recipients,
/// Microsoft 365, a daily limit written as a 24 h period with a burst) and the corners around
/// them, each under several loads.
pub fn grid() -> Vec<Case> {
    let recipients =
        |max: u32, per_message: u32, quotas: Option<&str>| in_recipients("1s", max, 1, quotas, per_message);
    // Letters of one recipient, and of one to ten.
    let (one, mixed) = (vec![1], MIXED.to_vec());
    // (settings, how long to run, the letters' recipients)
    type Budget = (Vec<(&'static str, String)>, Duration, Vec<u32>);
    let budgets: Vec<Budget> = vec![
        (recipients(14, 50, None), 40 * SECOND, one.clone()),
        (recipients(14, 50, None), 40 * SECOND, mixed.clone()),
        (recipients(30, 10, None), 30 * SECOND, mixed.clone()),
        (recipients(100, 1_000, Some("2000/1m")), 150 * SECOND, vec![1, 40, 5, 100, 2]),
        (recipients(20_000, 50, None), 3 * SECOND, vec![1, 50, 7]),
    ];
    let budgets = budgets.into_iter().chain(
        [
            (letters("24h", 1, 1, None), 2 * DAY + MINUTE),
            (letters("24h", 2000, 1, None), 10 * MINUTE),
            (letters("24h", 2000, 100, None), 10 * MINUTE),
            (letters("24h", 2000, 2000, None), 10 * SECOND),
            (letters("1s", 10_000, 1, Some("2000/24h")), DAY * 3 / 2),
            (letters("1s", 10_000, 1, Some("30/20s")), 50 * SECOND),
            (letters("1s", 100, 1, Some("10000/24h")), 60 * SECOND),
            (letters("1m", 30, 1, None), 5 * MINUTE),
            (letters("1s", 10, 1, None), 60 * SECOND),
            (letters("1s", 14, 1, None), 30 * SECOND),
            (letters("1s", 20, 1, None), 30 * SECOND),
            (letters("1s", 30, 1, None), 30 * SECOND),
            (letters("10s", 10, 5, None), 2 * MINUTE),
            (letters("1s", 100, 1, Some("1000/1m")), 150 * SECOND),
            (letters("1s", 100_000, 1, None), 3 * SECOND),
            // A burst beside a quota: the quota binds, the burst goes at once.
            (letters("1s", 100, 50, Some("1000/1m")), 150 * SECOND),
            (letters("10s", 10, 5, Some("30/1m")), 3 * MINUTE),
            (letters("24h", 2000, 100, Some("40/10m")), 30 * MINUTE),
            (letters("1s", 10_000, 1_000, Some("2000/24h")), DAY * 3 / 2),
        ]
        .into_iter()
        .map(|(vars, duration)| (vars, duration, one.clone())),
    );
    // (replicas, workers, send, clock offsets, killed)
    type Load = (usize, usize, Duration, Vec<i64>, Option<Duration>);
    let loads: Vec<Load> = vec![
        (1, 8, Duration::from_millis(20), vec![0], None),
        (1, 1, Duration::from_millis(1), vec![0], None),
        (1, 16, Duration::from_secs(2), vec![0], None),
        (3, 4, Duration::from_millis(300), vec![600_000, 0, -600_000], None),
        (2, 8, Duration::from_millis(50), vec![0], Some(Duration::from_millis(1_500))),
    ];
    let mut cases = Vec::new();
    for (vars, duration, recipients) in budgets {
        for (replicas, workers, send, offsets_ms, kill_at) in &loads {
            cases.push(Case {
                vars: vars.clone(),
                replicas: *replicas,
                workers: *workers,
                send: *send,
                offsets_ms: offsets_ms.clone(),
                kill_at: *kill_at,
                recipients: recipients.clone(),
                duration,
                database: DATABASE,
            });
        }
    }
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Judges `case`: no window over its limit, and at least 95 % of the binding limit used.
    async fn holds_and_uses_95(case: &Case) {
        let judged = judge(case).await;
        assert!(judged.over.is_empty(), "over: {:?}", judged.over);
        assert!(
            judged.share() >= REQUIRED,
            "{case}: {} of {} ({}), {:.1} %",
            judged.used,
            judged.binding,
            judged.bound_by,
            judged.share() * 100.0
        );
    }

    async fn each_holds_and_uses_95(cases: &[Case]) {
        for case in cases {
            holds_and_uses_95(case).await;
        }
    }

    /// Judges `case`: no window over its limit, and something sent (a budget that sends nothing
    /// holds every cap).
    async fn sends_within_its_caps(case: &Case) -> Judged {
        let judged = judge(case).await;
        assert!(judged.over.is_empty(), "over: {:?}", judged.over);
        assert!(judged.used > 0, "nothing sent");
        judged
    }

    /// Every configuration of the grid keeps every window within its limit and uses at least
    /// 95 % of the binding limit. Prints the worst configuration.

    #[tokio::test(start_paused = true)]
    async fn the_budget_holds_and_is_used_across_the_relays_configurations() {
        let mut failures = Vec::new();
        let mut worst: Option<(f64, String)> = None;
        // `SIM_CASES=text` runs only the cases whose description holds it, to study one.
        let only = std::env::var("SIM_CASES").ok();
        for case in grid().into_iter().filter(|case| only.as_ref().is_none_or(|only| case.to_string().contains(only))) {
            let judged = judge(&case).await;
            let share = judged.share();
            println!("{:6.1} % (required {:.0} %) {case} [{}]", share * 100.0, REQUIRED * 100.0, judged.bound_by);
            if worst.as_ref().is_none_or(|(w, _)| share < *w) {
                worst = Some((share, format!("{case}: {} of {} ({})", judged.used, judged.binding, judged.bound_by)));
            }
            if !judged.over.is_empty() || share < REQUIRED {
                failures.push(format!(
                    "{case}: used {} of {} bound by {} ({:.1} %), over: {:?}",
                    judged.used,
                    judged.binding,
                    judged.bound_by,
                    share * 100.0,
                    judged.over
                ));
            }
        }
        if let Some((share, case)) = &worst {
            println!("worst configuration: {:.1} % — {case}", share * 100.0);
        }
        assert!(failures.is_empty(), "{} configuration(s) failed:\n{}", failures.len(), failures.join("\n"));
    }

    /// Two runs of one case see the same dots: every run starts from one epoch, not from the
    /// host's clock, which moved the buckets of a quota and of the rate's exact window under a
    /// case from run to run (85.4 % against 94.2 % of one case's binding limit).
    #[tokio::test(start_paused = true)]
    async fn every_run_of_a_case_sees_the_same_dots() {
        let case = Case {
            vars: vec![
                var("SMTP_RATE_LIMIT_UNIT", "recipient"),
                var("SMTP_RATE_LIMIT_PERIOD", "1s"),
                var("SMTP_RATE_LIMIT_MAX_LETTERS", 14),
                var("SMTP_MAX_RECIPIENTS", 50),
                var("SMTP_QUOTAS", "100/5s"),
            ],
            replicas: 2,
            workers: 4,
            send: Duration::from_millis(50),
            offsets_ms: vec![0, 600_000],
            kill_at: None,
            recipients: vec![1, 3, 10, 2, 7],
            duration: 12 * SECOND,
            database: DATABASE,
        };
        let first = run(&case).await;
        // The host's clock moves on between two runs, as it does between two runs of the suite.
        std::thread::sleep(Duration::from_millis(3));
        let second = run(&case).await;
        assert!(first.used() > 100, "{} units in 12 s", first.used());
        assert_eq!(first.dots, second.dots);
    }

    /// A ledger whose first write each second answers 300 ms late (a loaded MongoDB) costs the
    /// budget the units the stalls themselves hold up, no more:
    /// - SES's 14 recipients a second, one worker on a 1 ms relay, letters of one: each message
    ///   takes its own grant, and every grant after a stall carried the stall's length as its
    ///   margin, decaying by a quarter a grant, so each message waited it at its dot: 23.0 %
    ///   (a grant's margin is now the median of the recent round trips);
    /// - 428 a second beside 343 a minute, eight workers on a 2 s relay: 93.3 % as the margin
    ///   was; with the median alone, two stalled grants in a row made the pause between a grant
    ///   and the look at the pool that put every later grant out of reach, and it sent nothing
    ///   for the rest of the run (24.1 %). Found with `SIM_STALLS=1000:300`.
    #[tokio::test(start_paused = true)]
    async fn a_ledger_that_stalls_once_a_second_costs_only_the_stalls() {
        let cases = [
            Case::load(in_recipients("1s", 14, 1, None, 50), 1, 1, MS, 40 * SECOND),
            Case::load(letters("1s", 428, 1, Some("343/60s")), 1, 8, 2 * SECOND, 150 * SECOND),
        ];
        for case in cases {
            with_stalls(SECOND, 300 * MS, holds_and_uses_95(&case)).await;
        }
    }

    /// Replicas sharing a rate far above their workers, on a ledger whose first write each second
    /// answers 300 ms late, each cover a span the size of a lead and two of their usual round
    /// trips, not two of the stall's. The span read the stall (the recent slowest round trip that
    /// sizes the stock), and a replica's grant after it reached half a second ahead; the other,
    /// told by its last write that the schedule's end lay that far ahead, asked only as its
    /// workers needed, and the lanes beside the long grant passed while its workers idled: two
    /// replicas of sixteen on a 20 ms relay under 33,220 a second sent 6,651 of the 7,413
    /// letters they carry in 5 s (89.7 %); two of twelve under 23,860 sent 4,989 of 5,484
    /// (91.0 %); three of eleven under 37,180, 92.7 %. Found with `SIM_STALLS=1000:300`.
    #[tokio::test(start_paused = true)]
    async fn replicas_sharing_a_rate_far_above_span_their_round_trips_not_a_stall() {
        let cases = [(33_220, 2, 16, [0, 0]), (23_860, 2, 12, [0, 0]), (37_180, 3, 11, [600_000, 0])].map(
            |(rate, replicas, workers, offsets)| Case {
                offsets_ms: offsets.to_vec(),
                ..Case::load(letters("1s", rate, 1, None), replicas, workers, 20 * MS, 5 * SECOND)
            },
        );
        for case in cases {
            with_stalls(SECOND, 300 * MS, holds_and_uses_95(&case)).await;
        }
    }

    /// A replica alone under a window counted exactly, whose workers come back for their next
    /// message a send after their dots, uses what they carry: their next units are booked at
    /// their dots (`Budget::books_ahead`). Each message waited for a grant's round trip before it
    /// was prepared, and these were the sweep's three worst cases (88.7–88.8 %): one replica of
    /// five, seven and eleven workers on a 20 ms relay, letters of one, 50 recipients allowed a
    /// message. The first second, before the replica knows it is alone, they still lose it.
    #[tokio::test(start_paused = true)]
    async fn a_lone_replica_books_its_workers_next_units_at_their_dots() {
        let cases = [(1_938, 5), (1_858, 7), (1_042, 11)].map(|(rate, workers)| {
            Case::load(in_recipients("1s", rate, 1, None, 50), 1, workers, 20 * MS, 10 * SECOND)
        });
        each_holds_and_uses_95(&cases).await;
    }

    /// A replica killed 1.5 s into a day of 2,000 at 10,000/s strands only the units its workers
    /// were about to use. Its second grant measured the rate over the round trip since its first
    /// and reserved hundreds of units, and the day lost 232 of its 2,000 with it (88.4 % of the
    /// first window).
    #[tokio::test(start_paused = true)]
    async fn a_replica_killed_in_a_daily_quota_strands_few_units() {
        let case = Case {
            vars: vec![
                var("SMTP_RATE_LIMIT_PERIOD", "1s"),
                var("SMTP_RATE_LIMIT_MAX_LETTERS", 10_000),
                var("SMTP_QUOTAS", "2000/24h"),
            ],
            replicas: 2,
            workers: 8,
            send: Duration::from_millis(50),
            offsets_ms: vec![0],
            kill_at: Some(Duration::from_millis(1_500)),
            recipients: vec![1],
            duration: 10 * MINUTE,
            database: DATABASE,
        };
        let judged = judge(&case).await;
        assert!(judged.over.is_empty(), "over: {:?}", judged.over);
        assert_eq!(judged.binding, 2_000, "{}", judged.bound_by);
        assert!(judged.used >= 1_980, "{} of the day's 2,000 sent", judged.used);
    }

    /// What the workers carry is measured over the run, not over 5 s and scaled: sixteen workers
    /// on a 2 s relay send in step, and 5 s held the start's wait for a first dot and two rounds
    /// of their three, so the cases they bound read 124-197 % and were not checked.
    #[tokio::test(start_paused = true)]
    async fn what_the_workers_carry_is_measured_over_the_run() {
        let case = Case {
            vars: vec![var("SMTP_RATE_LIMIT_PERIOD", "1s"), var("SMTP_RATE_LIMIT_MAX_LETTERS", 14)],
            replicas: 1,
            workers: 16,
            send: 2 * SECOND,
            offsets_ms: vec![0],
            kill_at: None,
            recipients: vec![1],
            duration: 150 * SECOND,
            database: DATABASE,
        };
        let judged = judge(&case).await;
        let mut carried = 0;
        for reference in references(&case) {
            carried = carried.max(run(&reference).await.used());
        }
        assert_eq!(judged.bound_by, "the workers");
        let error = judged.binding as f64 / carried as f64 - 1.0;
        assert!(error.abs() < 0.02, "judged {} against {carried} carried over the whole run", judged.binding);
        assert!(judged.share() <= 1.02, "{} of {}", judged.used, judged.binding);
    }

    /// The judge's reference carries what the workers do where a budget near the load lets them:
    /// far above it (40,000 a second, the only reference before), each message of one worker on
    /// a 20 ms relay waited a grant's round trip and half its preparation, and 736 a second read
    /// 138.7 % of it (240 letters of 173); three replicas of one worker at 1,016 a second read
    /// 154.9 %. A case that reads well over all of it shows a reference that cannot see a loss.
    #[tokio::test(start_paused = true)]
    async fn the_reference_carries_what_the_workers_do_near_the_load() {
        for (max, replicas) in [(736, 1), (1_016, 3)] {
            let case = Case::load(letters("1s", max, 1, None), replicas, 1, 20 * MS, 5 * SECOND);
            let judged = judge(&case).await;
            assert_eq!(judged.bound_by, "the workers");
            assert!(judged.share() <= 1.02, "{max}/s, {replicas} replica(s): {} of {}", judged.used, judged.binding);
        }
    }

    /// 2,000 a day as a 24 h period with a burst of 100, beside 40 per 10 minutes: the quota's
    /// 40 go at once in every window. Each unit was counted against the quota at its place on the
    /// schedule, where a burst uses it up to 99 intervals (71 minutes) earlier, so the quota freed
    /// the burst's units only as their places passed, one every 43 s: 68 of 120 in 30 minutes.
    #[tokio::test(start_paused = true)]
    async fn a_burst_beside_a_quota_frees_the_quota_where_its_units_went() {
        let vars = letters("24h", 2_000, 100, Some("40/10m"));
        let case =
            Case { offsets_ms: vec![0, 600_000], ..Case::load(vars, 2, 8, Duration::from_millis(300), 30 * MINUTE) };
        let judged = judge(&case).await;
        assert!(judged.over.is_empty(), "over: {:?}", judged.over);
        assert_eq!((judged.binding, judged.bound_by.as_str()), (120, "40/10m"));
        assert!(judged.used >= 114, "{} of 120 in 30 minutes", judged.used);
    }

    /// What the workers carry leaves out a killed replica's workers once it is dead: 2,000 as a
    /// 24 h burst, two replicas of eight workers on a 50 ms relay, the first killed at 1.5 s. The
    /// survivor's eight workers carry about 1,840 in 10 s; the judge extrapolated all sixteen
    /// from the sample's second quarter on, said the day's 2,000 bound the case, and read the
    /// budget as 91.5 % used, a known gap that was the judge's.
    #[tokio::test(start_paused = true)]
    async fn what_the_workers_carry_leaves_out_a_killed_replica() {
        let vars = letters("24h", 2_000, 2_000, None);
        let case = Case {
            kill_at: Some(Duration::from_millis(1_500)),
            ..Case::load(vars, 2, 8, Duration::from_millis(50), 10 * SECOND)
        };
        let judged = judge(&case).await;
        assert_eq!(judged.bound_by, "the workers", "{} bound by {}", judged.binding, judged.bound_by);
        assert!((1_700..1_950).contains(&judged.binding), "{} carried", judged.binding);
        assert!(judged.share() >= 0.95, "{} of {}", judged.used, judged.binding);
    }

    /// Replicas whose workers come at a slower pace than the rate's interval, with the default
    /// burst of 1: each grant was a run of consecutive units, most of which passed before the
    /// replica's workers reached them. Strided grants interleave the replicas' units
    /// (`schedule::decide`). 1,244 a second with three replicas of ten on a 20 ms relay sent
    /// 3,124 letters in 5 s consecutive, 4,284 strided, 5,366 with the judgement kept while
    /// strided and a strided pool asking for its stride's units (`Pool::passing`, `Pool::low`);
    /// 1,378 a second with three replicas of fourteen, 5,277 and then 5,611; 247 per 10 s with
    /// two replicas of three on a 300 ms relay, 558 and then 578 in 30 s (the judge's
    /// reference, bounded as much by its own consecutive runs, reads 469).
    #[tokio::test(start_paused = true)]
    async fn replicas_whose_workers_trail_the_rate_interleave_their_units() {
        for (period, max, replicas, workers, send_ms, secs, least) in
            [("1s", 1_244, 3, 10, 20, 5, 5_000), ("1s", 1_378, 3, 14, 20, 5, 5_400), ("10s", 247, 2, 3, 300, 30, 520)]
        {
            let case = Case::load(
                letters(period, max, 1, None),
                replicas,
                workers,
                Duration::from_millis(send_ms),
                secs * SECOND,
            );
            let judged = judge(&case).await;
            assert!(judged.over.is_empty(), "{case}: over {:?}", judged.over);
            assert!(judged.used >= least, "{case}: {} letters, {least} expected", judged.used);
        }
    }

    /// Replicas whose consecutive units pass now and then, but whose workers reach most of them:
    /// three replicas of five on a 300 ms relay at 296 per 10 s. With strided grants kept while
    /// their units are used (`Pool::passing`), a trigger at a fifth of the units passing strided
    /// them for good and used 817 of the 884 letters the rate allows in 30 s (92.4 %); at three
    /// tenths they stay consecutive, 870.
    #[tokio::test(start_paused = true)]
    async fn replicas_whose_units_pass_now_and_then_stay_consecutive() {
        let case = Case {
            offsets_ms: vec![600_000, 0],
            ..Case::load(letters("10s", 296, 1, None), 3, 5, Duration::from_millis(300), 30 * SECOND)
        };
        let judged = judge(&case).await;
        assert!(judged.over.is_empty(), "over: {:?}", judged.over);
        assert!(judged.bound_by.starts_with("296/10s"), "{}", judged.bound_by);
        assert!(judged.share() >= 0.95, "{} of {} ({})", judged.used, judged.binding, judged.bound_by);
    }

    /// Two replicas of fifteen workers on a 2 s relay at 100 a second, `BURST=1`: both
    /// replicas' first messages missed their units (a preparation of a second, a first lead of
    /// 100 ms), and each asked for units at once for them. The first to ask got them; the
    /// second's grant went after the first's next grant, a measured lead (1.5 s) ahead, and its
    /// fifteen messages waited 1.7 s at their dots: 31 letters in 5 s, the second replica's
    /// first dot at 2.76 s. The places a grant leaps over now go to the returned runs, where a
    /// message at its dot takes them: 45 letters, the first dots at 1.02 and 1.17 s.
    #[tokio::test(start_paused = true)]
    async fn a_grant_a_lead_ahead_leaves_the_places_before_it_to_messages_at_their_dots() {
        let case = Case::load(letters("1s", 100, 1, None), 2, 15, 2 * SECOND, 5 * SECOND);
        let seen = run(&case).await;
        for (replica, workers) in seen.by_worker.chunks(case.workers).enumerate() {
            let first = workers.iter().filter_map(|dots| dots.first()).map(|(at, _)| *at).min();
            assert!(
                first.is_some_and(|at| at < Duration::from_millis(1_500)),
                "replica {replica}: first dot {first:?}"
            );
        }
        assert!(seen.used() >= 40, "{} letters", seen.used());
        assert!(seen.busiest(SECOND) <= 100, "{} in a second", seen.busiest(SECOND));
    }

    /// Three replicas of four workers on a 300 ms relay at 14 letters a second (the sweep's SES
    /// budget in letters) used 66 % of it, 57 % of 20 a second, where one replica of twelve
    /// workers used 99 %. The schedule ran a second ahead (the twelve workers held its units that
    /// far out), yet each replica kept its pool stocked to its horizon: the units it held waited
    /// while its four workers were busy, and passed unused or were taken too late to reach. Now a
    /// replica asks for its waiting workers' units alone while the schedule is that far ahead
    /// (`Budget::far_ahead`): 98.6 %. At 20 a second 88.0 %, at 30 a second 59.6 %: a worker
    /// took the pool's next unit although its message could not reach it (a preparation is
    /// 150 ms, units 33 ms apart), missed it, and took another half a second ahead with the DATA
    /// phase open; and bulk took its unit two leads ahead. Units a message cannot reach now stay
    /// for messages that are ready (`Budget::cut_ns`), and bulk takes one lead ahead.
    #[tokio::test(start_paused = true)]
    async fn three_replicas_of_four_slow_workers_use_the_rate() {
        for rate in [14, 20, 30] {
            let case = Case::load(letters("1s", rate, 1, None), 3, 4, Duration::from_millis(300), 30 * SECOND);
            let judged = judge(&case).await;
            assert!(judged.over.is_empty(), "over: {:?}", judged.over);
            assert!(judged.bound_by.starts_with(&format!("{rate}/1s")), "{}", judged.bound_by);
            assert!(judged.share() >= 0.95, "{rate}/s: {} of {} ({})", judged.used, judged.binding, judged.bound_by);
        }
    }

    /// 100 recipients a second beside 2,000 a minute, letters of 1 to 100, sixteen workers on a
    /// 2 s relay: the quota freed at 61.18 s, and the next dot went at 64.05 s (1,967 recipients
    /// in the second minute, 94.9 % of what the sizes allow in order). The replica asked for
    /// units when the quota had freed, and they came a lead and a round trip later; the ledger
    /// now counts a quota from where the grant's first unit is charged, so the grant is asked
    /// for that much before.
    #[tokio::test(start_paused = true)]
    async fn a_quota_is_used_from_the_moment_it_frees() {
        let vars = in_recipients("1s", 100, 1, Some("2000/1m"), 1_000);
        let case = Case { recipients: vec![1, 40, 5, 100, 2], ..Case::load(vars, 1, 16, 2 * SECOND, 150 * SECOND) };
        let judged = judge(&case).await;
        assert!(judged.over.is_empty(), "over: {:?}", judged.over);
        assert!(judged.share() >= 0.97, "{} of {} ({})", judged.used, judged.binding, judged.bound_by);
    }

    /// 518 a second with a burst of 275, four workers on a 1 ms relay: the burst goes at once.
    /// Where units are usable long before their places, a replica asks for what its waiting
    /// workers need; bulk workers wait for their turn outside the budget, and the background
    /// refill counted none of them, so each grant was one unit and a round trip: the rate went
    /// out, the burst never did (2,589 of 2,864).
    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_with_bulk_workers_in_turn() {
        let case = Case::load(letters("1s", 518, 275, None), 1, 4, Duration::from_millis(1), 5 * SECOND);
        let judged = judge(&case).await;
        assert!(judged.over.is_empty(), "over: {:?}", judged.over);
        assert_eq!((judged.binding, judged.bound_by.as_str()), (2_864, "518/1s"));
        assert!(judged.share() >= 0.95, "{} of {}", judged.used, judged.binding);
    }

    /// SES's 14 recipients a second with letters of 1 to 10 recipients, three replicas of four
    /// workers on a 300 ms relay. A bulk worker waited in its turn for the schedule's end
    /// (`Budget::bulk_wait`), and then again for room in the window, where a message in
    /// recipients goes: the replica's other workers waited behind it, and the budget used 80.0 %
    /// of what letters of those sizes allow in order. Counted exactly, the window's room decides
    /// and bulk does not wait for the schedule: 96.7 %; with the schedule at eight times the rate
    /// and grants as the workers ask, 98.6 %.
    #[tokio::test(start_paused = true)]
    async fn bulk_workers_in_turn_keep_a_budget_in_recipients_used() {
        let case = Case {
            vars: vec![
                var("SMTP_RATE_LIMIT_UNIT", "recipient"),
                var("SMTP_RATE_LIMIT_PERIOD", "1s"),
                var("SMTP_RATE_LIMIT_MAX_LETTERS", 14),
                var("SMTP_MAX_RECIPIENTS", 50),
            ],
            replicas: 3,
            workers: 4,
            send: Duration::from_millis(300),
            offsets_ms: vec![600_000, 0, -600_000],
            kill_at: None,
            recipients: MIXED.to_vec(),
            duration: 40 * SECOND,
            database: DATABASE,
        };
        holds_and_uses_95(&case).await;
    }

    /// Letters of 1 to 10 recipients against 30 recipients a second, one replica: the schedule
    /// spread units at twice the rate, so the messages that the window's room let go together
    /// went one after another, each a few of its units later, and each late message freed its
    /// room as late: 93.3 % of what the sizes allow in order, with one worker on a 1 ms relay and
    /// with eight on a 20 ms one. Spread at eight times the rate, and granted as the workers ask
    /// (units a replica stocked ahead held the window's room while its workers were busy): 95 %
    /// and more.
    #[tokio::test(start_paused = true)]
    async fn messages_of_mixed_sizes_use_what_the_window_allows() {
        let vars = in_recipients("1s", 30, 1, None, 10);
        for (workers, send) in [(1, Duration::from_millis(1)), (8, Duration::from_millis(20))] {
            let case = Case { recipients: MIXED.to_vec(), ..Case::load(vars.clone(), 1, workers, send, 30 * SECOND) };
            let judged = judge(&case).await;
            assert!(judged.over.is_empty(), "over: {:?}", judged.over);
            // The window's 30 a second, less what one worker can carry: no pace to each
            // message's last unit (`a_window_counted_exactly_is_judged_without_a_pace_to_each_message_last_unit`).
            assert!(judged.binding >= 850, "{}: {}", judged.bound_by, judged.binding);
            assert!(judged.share() >= 0.95, "{workers} worker(s): {} of {}", judged.used, judged.binding);
        }
    }

    /// Three replicas of four workers on a 300 ms relay at 100,000 a second, where grants are
    /// loose: workers in step took their units within a moment of each other, the rate measured
    /// over that moment read hundreds of times theirs, and a replica's grant took the deployment's
    /// whole loose allowance; another replica's messages then waited a lead for scheduled units,
    /// 381 ms a message where 306 do (90.0 % of what they carry). Measured over a lookahead, each
    /// replica takes what it uses.
    #[tokio::test(start_paused = true)]
    async fn loose_grants_leave_room_for_every_replica() {
        let case = Case {
            offsets_ms: vec![600_000, 0, -600_000],
            ..Case::load(letters("1s", 100_000, 1, None), 3, 4, Duration::from_millis(300), 3 * SECOND)
        };
        let judged = judge(&case).await;
        assert!(judged.over.is_empty(), "over: {:?}", judged.over);
        assert_eq!(judged.bound_by, "the workers");
        assert!(judged.share() >= 0.98, "{} of {}", judged.used, judged.binding);
    }

    /// The reference for messages of mixed sizes: every window at once (a quota beside the rate
    /// loses what its last message in a window cannot fill too), and nothing before the first
    /// transaction can reach its dot.
    #[test]
    fn in_order_counts_every_window_from_the_first_possible_dot() {
        let second = 1_000_000_000;
        // 5 a second: 3 at 0 s, 3 at 1 s, 3 at 2 s (the second 3 never fits beside the first).
        assert_eq!(in_order(&[3], &[(5, second)], Duration::ZERO, 2500 * MS, None, None, false), 9);
        // And 7 per 10 s beside it: 3 at 0 s, 3 at 1 s, then the quota's room is 1 until 10 s.
        assert_eq!(in_order(&[3], &[(5, second), (7, 10 * second)], Duration::ZERO, 9 * SECOND, None, None, false), 6);
        assert_eq!(in_order(&[3], &[(5, second), (7, 10 * second)], Duration::ZERO, 10_001 * MS, None, None, false), 9);
        // From 1 s on: the window starting at 2 s ends past 2.5 s.
        assert_eq!(in_order(&[3], &[(5, second)], SECOND, 2500 * MS, None, None, false), 6);
        // Two workers, each free a second after its last dot: two messages at 0 s, 1 s and 2 s,
        // where the window alone takes three.
        assert_eq!(in_order(&[1], &[(3, second)], Duration::ZERO, 2500 * MS, None, None, false), 9);
        assert_eq!(in_order(&[1], &[(3, second)], Duration::ZERO, 2500 * MS, Some((SECOND, 2)), None, false), 6);
        // Letters of 2 and 1 units: the window alone takes both at 0 s, 1 s and 2 s; one worker
        // free every half second sends them at 0, 0.5, 1, 1.5 and 2 s (the sixth at 2.5 s).
        assert_eq!(in_order(&[2, 1], &[(3, second)], Duration::ZERO, 2500 * MS, None, None, false), 9);
        assert_eq!(in_order(&[2, 1], &[(3, second)], Duration::ZERO, 2500 * MS, Some((500 * MS, 1)), None, false), 8);
        // Split where the budget hands out part of a message: 3 and 2 of the next at 0 s, its
        // last 1, 3 and 1 at 1 s, and so on: the whole window every second.
        assert_eq!(in_order(&[3], &[(5, second)], Duration::ZERO, 2500 * MS, None, None, true), 15);
        // One unit a second with a burst of 3: a message of 5 waits for its last unit's place less
        // the tolerance (4 s − 2 s), and the next, on places 5 s to 9 s, for 7 s, though the
        // window has room for both at once.
        let pace = Pace { interval_ns: second, tolerance_ns: 2 * second, at_first_unit: false };
        let rate = Some(pace);
        assert_eq!(in_order(&[5], &[(100, 100 * second)], Duration::ZERO, 1999 * MS, None, rate, false), 0);
        assert_eq!(in_order(&[5], &[(100, 100 * second)], Duration::ZERO, 6999 * MS, None, rate, false), 5);
        assert_eq!(in_order(&[5], &[(100, 100 * second)], Duration::ZERO, 7001 * MS, None, rate, false), 10);
        // Messages of one unit: the burst at once, then the pace.
        assert_eq!(in_order(&[1], &[(100, 100 * second)], Duration::ZERO, 2500 * MS, None, rate, false), 5);
        // The pace beside a window counted exactly: a message goes once its first unit is due,
        // at 0 s, then at 5 s − 2 s and 10 s − 2 s.
        let paced = Some(Pace { at_first_unit: true, ..pace });
        assert_eq!(in_order(&[5], &[(100, 100 * second)], Duration::ZERO, 2999 * MS, None, paced, false), 5);
        assert_eq!(in_order(&[5], &[(100, 100 * second)], Duration::ZERO, 3001 * MS, None, paced, false), 10);
        assert_eq!(in_order(&[5], &[(100, 100 * second)], Duration::ZERO, 8001 * MS, None, paced, false), 15);
    }

    /// Where the rate's window is counted exactly, the judge paces no message to its last unit:
    /// letters of 1, 50 and 7 under 298 recipients an hour were judged against 1 recipient in
    /// 600 s, the letter of 50 waiting 49 intervals of 12 s for a pace the budget does not keep
    /// there, so any sending at all passed. The rate over the time binds (50), the window holds.
    #[tokio::test(start_paused = true)]
    async fn a_window_counted_exactly_is_judged_without_a_pace_to_each_message_last_unit() {
        let case = Case {
            recipients: vec![1, 50, 7],
            offsets_ms: vec![600_000, 0],
            ..Case::load(in_recipients("3600s", 298, 1, None, 50), 3, 7, 2 * SECOND, 600 * SECOND)
        };
        let judged = sends_within_its_caps(&case).await;
        assert_eq!((judged.binding, judged.bound_by.as_str()), (50, "298/1h"));
        assert!(judged.share() >= REQUIRED, "{} of {} ({})", judged.used, judged.binding, judged.bound_by);
    }

    /// Every limit at once is what one sender could do under all of them: 110 a 10 s period with
    /// a burst of 21 beside 500 a minute, from 10 ms to 150 s, is 500 in each of the first two
    /// minutes (the burst, then the rate until the quota is full at 43.6 s, and again from
    /// 60.01 s) and in the last half-minute the burst and what the rate gives: 21 + 329. Each
    /// limit alone said 1,500 (the quota) and 1,670 (the rate). And workers that carry ten a
    /// second, two of them ready at once, over 10.05 s of a rate far above them: two at 0, then
    /// one every 0.1 s to 10 s, 2 + 100.
    #[test]
    fn every_limit_at_once_is_what_one_sender_could_do_under_all_of_them() {
        let plan = Plan::new(&smtp(&[
            ("SMTP_RATE_LIMIT_PERIOD", "10s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "110"),
            ("SMTP_RATE_LIMIT_BURST", "21"),
            ("SMTP_QUOTAS", "500/60s"),
        ]));
        assert_eq!(at_once(&plan, 10 * MS, 150 * SECOND, None), 1_350);
        let fast = Plan::new(&smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "1000")]));
        assert_eq!(at_once(&fast, Duration::ZERO, 10_050 * MS, Some((10.0, 2.0))), 102);
    }

    /// A long burst beside a quota of a short window: 1,771 an hour with a burst of 1,724 beside
    /// 226 per 20 s, two replicas of five workers on a 2 s relay, ten minutes. A burst's units
    /// are used within a reach of their charge or not at all (212 ms for 20 s windows), and each
    /// replica's background grant added one unit a round that no worker came for in time: a unit
    /// in six lost to the rate, 84.5 % of it. Where the reach is short a replica now asks for
    /// what its waiting workers need (`Budget::short_reach`).
    #[tokio::test(start_paused = true)]
    async fn a_long_burst_beside_a_quota_of_a_short_window_is_used() {
        let vars = letters("1h", 1_771, 1_724, Some("226/20s"));
        let case = Case { offsets_ms: vec![600_000, 0], ..Case::load(vars, 2, 5, 2 * SECOND, 10 * MINUTE) };
        holds_and_uses_95(&case).await;
    }

    /// A replica killed under a window counted exactly strands no more than a window of it:
    /// SES's 14 recipients a second, letters of 1 to 10 from one queue, two replicas of eight
    /// workers on a 50 ms relay, the first killed at 1.5 s. Each waiting worker held a place up to
    /// the whole horizon ahead (3 s), charged from its grant: dead, the replica left them counted,
    /// and the survivor sent 3 recipients in the next three seconds (the longest gap between dots
    /// 3.0 s; 93.5 % of what the sizes allow in order). A place now lies at most its lead and a
    /// window ahead (`schedule::exact_horizon_ns`).
    #[tokio::test(start_paused = true)]
    async fn a_replica_killed_under_an_exact_window_strands_at_most_a_window() {
        let vars = in_recipients("1s", 14, 1, None, 50);
        let case = Case {
            kill_at: Some(1_500 * MS),
            recipients: MIXED.to_vec(),
            ..Case::load(vars, 2, 8, 50 * MS, 40 * SECOND)
        };
        let seen = run(&case).await;
        let after: Vec<Duration> = seen.dots.iter().map(|(at, _)| *at).filter(|at| *at >= 1_500 * MS).collect();
        let gap = after.windows(2).map(|pair| pair[1] - pair[0]).max().unwrap_or(case.duration);
        assert!(gap <= 1_200 * MS, "{gap:?} without a dot after the kill");
        holds_and_uses_95(&case).await;
    }

    /// A budget in recipients with a burst keeps its cap where its window is counted exactly.
    /// A message may go up to the burst's tolerance before its place, and its window was checked
    /// from its place on: its early dot met windows whose earlier units were not counted. Found
    /// by `SIM_RECIPIENTS=1` explorations: 741 a minute with a burst of 514 held 1,736
    /// recipients in a minute of 1,254 allowed, 161 per 10 s with a burst of 103 held 339 of 263.
    /// Only the caps are asserted (the window's, and the pace's over two periods): with a burst,
    /// these budgets sent up to twice their rate until the pace held them
    /// ([`a_burst_in_recipients_comes_back_only_after_idle_time`]).
    #[tokio::test(start_paused = true)]
    async fn a_budget_in_recipients_with_a_burst_keeps_its_cap() {
        let mixed = MIXED.to_vec();
        // (period, max, burst, per message, replicas × workers, send ms, letters' recipients, s)
        let cases = [
            ("60s", 741, 514, 10, (2, 1), 1, mixed.clone(), 180),
            ("10s", 161, 103, 10, (1, 8), 1, vec![1], 30),
            ("1s", 477, 459, 10, (1, 1), 1, vec![1, 40, 5, 100, 2], 5),
            ("1s", 426, 308, 50, (2, 5), 300, vec![1, 50, 7], 5),
            ("10s", 1_975, 207, 1_000, (2, 1), 1, mixed, 30),
        ];
        for (period, max, burst, per_message, (replicas, workers), send_ms, recipients, secs) in cases {
            let vars = in_recipients(period, max, burst, None, per_message);
            let send = Duration::from_millis(send_ms);
            let case = Case { recipients, ..Case::load(vars, replicas, workers, send, Duration::from_secs(secs)) };
            let judged = judge(&case).await;
            assert!(judged.over.is_empty(), "{case}: over {:?}", judged.over);
            assert!(judged.used > 0, "{case}: nothing sent");
        }
    }

    /// A long burst in recipients beside a quota: 1,490 recipients a day with a burst of 853
    /// beside 409 per 20 s, one worker on a 20 ms relay, a minute. Where the rate's window is
    /// counted exactly, the quota was charged at each grant's last unit's place, up to the
    /// burst's tolerance (1.7 h) ahead, and held each unit until a window had passed that place:
    /// 409 at once, then one recipient every 7 s, as a place left the window (415 in the minute,
    /// where the burst gives 853). Charged where the units become usable (`Plan::buckets`), the
    /// burst goes as the quota frees: 409, 409 and the rest.
    #[tokio::test(start_paused = true)]
    async fn a_burst_in_recipients_beside_a_quota_frees_the_quota_where_its_units_went() {
        let vars = in_recipients("24h", 1_490, 853, Some("409/20s"), 50);
        holds_and_uses_95(&Case::load(vars, 1, 1, 20 * MS, MINUTE)).await;
    }

    /// A burst in recipients comes back only after idle time: SES's 14 recipients a second with
    /// a burst of 14, letters of one recipient, one replica of eight workers on a 20 ms relay, a
    /// minute. Where the rate's window is counted exactly, it holds `MAX + BURST − 1` a period
    /// and the schedule runs at eight times the rate, so every second held the burst again: 24.3
    /// recipients a second, where the rate allows 14 after the first second (1,458 in the minute,
    /// against 853). The pace (`Plan::pace`) holds it: the judge checks every two periods.
    #[tokio::test(start_paused = true)]
    async fn a_burst_in_recipients_comes_back_only_after_idle_time() {
        let vars = in_recipients("1s", 14, 14, None, 50);
        let case = Case::load(vars, 1, 8, 20 * MS, MINUTE);
        let judged = judge(&case).await;
        assert!(judged.over.is_empty(), "{case}: over {:?}", judged.over);
        assert!((852..=853).contains(&judged.used), "{case}: {} of {}", judged.used, judged.binding);
    }

    /// Units that pass unused go back to the pace: 1,534 recipients an hour with a burst of 1,162
    /// beside 73 per 20 s, two replicas of nine workers on a 20 ms relay, letters of 1 to 100, 10
    /// minutes. Each reopening of the quota, grants sized for the workers waiting left units
    /// that passed unused, and kept counted against the pace they spent the burst: 1,008 of the
    /// 1,393 recipients the burst and the rate allow in order.
    #[tokio::test(start_paused = true)]
    async fn units_that_pass_unused_go_back_to_the_pace() {
        let vars = in_recipients("1h", 1_534, 1_162, Some("73/20s"), 50);
        let case = Case { recipients: vec![1, 40, 5, 100, 2], ..Case::load(vars, 2, 9, 20 * MS, 10 * MINUTE) };
        holds_and_uses_95(&case).await;
    }

    /// The first grant after idle time gives its unused units back to the pace too: 249
    /// recipients an hour with a burst of 231 beside 391 a minute, one replica of twelve workers
    /// on a 1 ms relay ten minutes ahead of the server, letters of 1, 50 and 7 recipients (ten a
    /// message). Grants within 2.5 s of the pace's last move kept their unused units, the first
    /// of them included, whose own units the move had not spent: 205 of the 263 recipients the
    /// burst and the rate allow in order.
    #[tokio::test(start_paused = true)]
    async fn the_grant_that_moves_the_pace_on_gives_its_unused_units_back() {
        let vars = in_recipients("1h", 249, 231, Some("391/60s"), 10);
        let case =
            Case { recipients: vec![1, 50, 7], offsets_ms: vec![600_000], ..Case::load(vars, 1, 12, MS, 10 * MINUTE) };
        holds_and_uses_95(&case).await;
    }

    /// Units no message took go back to the schedule as well as to the pace: where the window
    /// is counted exactly, the schedule (at eight times the rate) lets `BURST` units go at once
    /// too, and units granted and never used kept their places on it. 1,355 recipients a day
    /// with a burst of 841 beside 108 a minute, seven workers on a 1 ms relay, letters of 1, 50
    /// and 7: each grant sized for the workers waiting left a third of itself unused, the
    /// schedule ran out of its tolerance after 573 recipients, and the next grant waited 200 s
    /// (573 of the 813 the burst and the rate allow in order).
    #[tokio::test(start_paused = true)]
    async fn units_no_message_took_go_back_to_the_schedule_too() {
        let vars = in_recipients("24h", 1_355, 841, Some("108/60s"), 1_000);
        let case =
            Case { recipients: vec![1, 50, 7], offsets_ms: vec![-600_000], ..Case::load(vars, 1, 7, MS, 10 * MINUTE) };
        holds_and_uses_95(&case).await;
    }

    /// One replica of `workers` on a 2 s relay, ten minutes behind the server, sending letters
    /// of 1 to 10 recipients.
    fn slow_mixed_behind(vars: Vec<(&'static str, String)>, workers: usize, duration: Duration) -> Case {
        Case {
            recipients: MIXED.to_vec(),
            offsets_ms: vec![-600_000, 0],
            ..Case::load(vars, 1, workers, 2 * SECOND, duration)
        }
    }

    /// A burst in recipients is kept by the window counted exactly and the pace even where the
    /// room for the largest message is under 1 % of the rate: 1,797 recipients a day with a
    /// burst of 1,215 beside 372 per 20 s, nine workers on a 2 s relay ten minutes behind the
    /// server, letters of 1 to 10. With the schedule as the cap, units that passed unused could
    /// not go back to it from its middle, and most of the burst was lost: 1,061 of 1,227.
    #[tokio::test(start_paused = true)]
    async fn a_burst_with_little_room_for_a_message_gets_its_unused_units_back() {
        let vars = in_recipients("24h", 1_797, 1_215, Some("372/20s"), 10);
        holds_and_uses_95(&slow_mixed_behind(vars, 9, 10 * MINUTE)).await;
    }

    /// A quota beside letters of mixed sizes is judged as the letters fit it in order, where
    /// one replica's workers take their units one after another: 21 recipients per 10 minutes,
    /// sixteen workers on a 2 s relay, letters of 1 to 10 recipients. Whole, in order, they fit
    /// 16, 17 and 14 in its three windows (47; judged against the quota alone, it read 74.6 %).
    /// Since a letter may go in part under a burst's pace too, as the quota has room
    /// ([`Plan::splits_transactions`]), they fill the three windows: 63, and the judge's order,
    /// in parts, allows as many.
    #[tokio::test(start_paused = true)]
    async fn a_quota_beside_letters_of_mixed_sizes_is_judged_as_they_fit_in_order() {
        let vars = in_recipients("60s", 1_221, 647, Some("21/600s"), 10);
        let judged = judge(&slow_mixed_behind(vars, 16, 25 * MINUTE)).await;
        assert!(judged.bound_by.contains(MIXED_IN_ORDER), "{}", judged.bound_by);
        assert_eq!((judged.used, judged.binding), (63, 63));
    }

    /// Fast relays under a burst and no quota stock their units, where the window is counted
    /// exactly too: two replicas of three workers on a 20 ms relay, one ten minutes behind the
    /// server, under 1,442 recipients a second with a burst of 265, letters of one recipient.
    /// Asking for each message's units as it started cost every message a grant's round trip, a
    /// fifth of its send: 1,132 of the 1,466 recipients the workers carry in 5 s.
    #[tokio::test(start_paused = true)]
    async fn fast_relays_under_a_burst_stock_their_units() {
        let vars = in_recipients("1s", 1_442, 265, None, 50);
        let case = Case { offsets_ms: vec![-600_000, 0], ..Case::load(vars, 2, 3, 20 * MS, 5 * SECOND) };
        holds_and_uses_95(&case).await;
    }

    /// The rest of a grant placed far ahead goes back at once when it is too short for the next
    /// message: 1,562 recipients a day with a burst of 766, two replicas of eight workers on a
    /// 1 ms relay, letters of 1, 50 and 7. Each grant sized for the workers waiting left a rest
    /// too short for the next letter of 50, placed minutes ahead on the schedule (eight times the
    /// rate), that came back a unit every 7 s as its places passed: 539 of the 755 recipients the
    /// burst and the rate allow in order.
    #[tokio::test(start_paused = true)]
    async fn the_rest_of_a_grant_far_ahead_goes_back_when_the_next_message_is_larger() {
        let vars = in_recipients("24h", 1_562, 766, None, 50);
        let case = Case { recipients: vec![1, 50, 7], ..Case::load(vars, 2, 8, MS, 10 * MINUTE) };
        holds_and_uses_95(&case).await;
    }

    /// The units of messages that reached their dots too late for them go back to the pace once
    /// it has moved on to where the dots fell: 569 recipients a minute with a burst of 328, five
    /// workers on a 2 s relay, letters of 1, 50 and 7 (ten a message). The first messages,
    /// prepared in a second where the lead guessed 100 ms, missed their units; given back
    /// without the move, the pace counted from the first guess, a second early, and two minutes
    /// held 1,481 recipients of the 1,474 allowed.
    #[tokio::test(start_paused = true)]
    async fn missed_units_go_back_once_the_pace_moves_to_where_the_dots_fell() {
        let vars = in_recipients("60s", 569, 328, None, 10);
        let case = Case { recipients: vec![1, 50, 7], ..Case::load(vars, 1, 5, 2 * SECOND, 3 * MINUTE) };
        holds_and_uses_95(&case).await;
    }

    /// A slow relay's first round gives back the units it missed: 923 recipients an hour with a
    /// burst of 258 beside 449 per 20 s, two replicas of four workers on a 2 s relay, one ten
    /// minutes behind the server, letters of 1, 50 and 7. Every first message missed its units on
    /// the lead's first guess, 179 of the burst's 258, and kept counted against the pace they
    /// were lost to it: 237 of the 407 recipients the burst and the rate allow in order.
    #[tokio::test(start_paused = true)]
    async fn a_slow_relays_first_round_gives_back_the_units_it_missed() {
        let vars = in_recipients("1h", 923, 258, Some("449/20s"), 1_000);
        let case = Case {
            recipients: vec![1, 50, 7],
            offsets_ms: vec![-600_000, 0],
            ..Case::load(vars, 2, 4, 2 * SECOND, 10 * MINUTE)
        };
        holds_and_uses_95(&case).await;
    }

    /// Letters of 1 to 100 recipients under a daily budget with a long burst: 718 recipients a
    /// day with a burst of 686, one replica of sixteen workers on a 20 ms relay, 10 minutes.
    /// A grant is sized for the workers waiting as if each message were this one; the rest of a
    /// grant asked for a message of one recipient expired when the next message had forty, and
    /// its places were lost to the schedule (540 of the 688 the burst allows in order). Kept for
    /// a smaller message (`Pool::take`), they serve the next one.
    #[tokio::test(start_paused = true)]
    async fn the_rest_of_a_grant_too_short_for_a_message_waits_for_a_smaller_one() {
        let vars = in_recipients("24h", 718, 686, None, 50);
        let case = Case { recipients: vec![1, 40, 5, 100, 2], ..Case::load(vars, 1, 16, 20 * MS, 10 * MINUTE) };
        holds_and_uses_95(&case).await;
    }

    /// A letter larger than the burst goes once one unit is due, as the pace beside a window
    /// counted exactly lets it (`Plan::pace`), and the judge counts it so: under 587 recipients a
    /// day with a burst of 12, letters of 1, 50 and 7, the burst and the rate over 600 s bind
    /// (16). Paced to its last unit the judge said 1, and the 1 recipient the budget sent read
    /// 100 %: the schedule, at eight times the rate, placed the letter's 50 units consecutively
    /// and its dot at the last, 15 minutes on. Now the largest message spans a second of the
    /// schedule at most (`MESSAGE_SPREAD_MAX`): the letters of 1 and 50 go at once, and the pace
    /// they moved on holds the letter of 7 for hours.
    #[tokio::test(start_paused = true)]
    async fn a_letter_larger_than_the_burst_goes_once_one_unit_is_due() {
        let vars = in_recipients("24h", 587, 12, None, 1_000);
        let case = Case { recipients: vec![1, 50, 7], ..Case::load(vars, 2, 3, MS, 10 * MINUTE) };
        let judged = sends_within_its_caps(&case).await;
        assert_eq!((judged.binding, judged.bound_by.as_str()), (16, "587/1day"), "{case}");
        assert_eq!(judged.used, 51, "{case}");
    }

    /// The same without a burst: at eight times the rate the letter of 50's units lay 49
    /// intervals of 14 s apart, and it went at the last, with the day's window empty (1 of the
    /// rate's 6 recipients in 600 s). The pace without tolerance lets it go once one is due; the
    /// letter of 7 then waits for the pace the 50 moved on.
    #[tokio::test(start_paused = true)]
    async fn a_large_letter_without_a_burst_goes_once_one_unit_is_due() {
        let vars = in_recipients("24h", 763, 1, None, 1_000);
        let case = Case { recipients: vec![1, 50, 7], ..Case::load(vars, 1, 4, 300 * MS, 10 * MINUTE) };
        let judged = sends_within_its_caps(&case).await;
        assert_eq!((judged.binding, judged.bound_by.as_str()), (6, "763/1day"), "{case}");
        assert_eq!(judged.used, 51, "{case}");
    }

    /// Under that pace a whole message waiting for the window's room was passed by smaller ones
    /// that fit what the window freed, and a letter's transaction of 47 (the whole window) waited
    /// a minute more each time: 97 recipients in 180 s, where whole messages in order allow 140.
    /// It now takes the room there is and sends the rest as the next transaction
    /// (`Plan::splits_transactions`): 140 of the 141 the window allows. And all the room: taken a
    /// unit at a time, as the pace grants no more than the least asked, the 140 went in 59
    /// transactions, where the window freed a unit at a time; 14 so.
    #[tokio::test(start_paused = true)]
    async fn under_the_pace_without_a_burst_a_message_takes_the_window_room_there_is() {
        let vars = in_recipients("1m", 47, 1, None, 1_000);
        let case = Case { recipients: vec![1, 40, 5, 100, 2], ..Case::load(vars, 2, 9, 300 * MS, 3 * MINUTE) };
        let judged = sends_within_its_caps(&case).await;
        assert!(judged.share() >= REQUIRED, "{} of {} ({})", judged.used, judged.binding, judged.bound_by);
        assert_eq!(judged.binding, 141, "{case}");
        let seen = run(&case).await;
        assert!(seen.dots.len() <= 20, "{} recipients in {} transactions", seen.used(), seen.dots.len());
    }

    /// Where the window is counted exactly, messages that reached their dots after their units
    /// (the relay's first preparations outlasted the lead's first guess) lost them to the window:
    /// the schedule, at eight times the rate, had placed the next window's units by the time they
    /// asked again. 782 recipients a second, three replicas of sixteen on a 300 ms relay, sent
    /// 380 in the first second and 89.2 % of the rate in 5 s. Until a preparation is measured a
    /// replica's messages but its first now take their units at their dots
    /// (`Budget::probe`): 98.9 %.
    #[tokio::test(start_paused = true)]
    async fn first_preparations_longer_than_the_guess_lose_no_window() {
        let vars = in_recipients("1s", 782, 1, None, 50);
        let case = Case {
            recipients: vec![1, 40, 5, 100, 2],
            offsets_ms: vec![-600_000, 0],
            ..Case::load(vars, 3, 16, 300 * MS, 5 * SECOND)
        };
        let judged = sends_within_its_caps(&case).await;
        assert_eq!((judged.binding, judged.bound_by.as_str()), (3_910, "782/1s"), "{case}");
        assert!(judged.share() >= REQUIRED, "{case}: {} of {}", judged.used, judged.binding);
    }

    /// Where the schedule places the whole window within two leads, the messages of a replica
    /// beyond the units it may send unplaced wait for its first preparation to be measured: on
    /// the lead's first guess they took the window's other units, missed them on a 300 ms relay,
    /// and the unplaced messages found the window spent at their dots. 22 recipients a second,
    /// three replicas of thirteen: 14 recipients in the first second, 96 of 110 in 5 s.
    #[tokio::test(start_paused = true)]
    async fn a_window_placed_within_two_leads_is_not_spent_on_the_guess() {
        let vars = in_recipients("1s", 22, 1, None, 50);
        let case =
            Case { recipients: vec![1, 3, 10, 2, 7, 1, 5, 4, 9, 1], ..Case::load(vars, 3, 13, 300 * MS, 5 * SECOND) };
        let judged = sends_within_its_caps(&case).await;
        assert_eq!((judged.binding, judged.bound_by.as_str()), (110, "22/1s"), "{case}");
        assert!(judged.share() >= REQUIRED, "{case}: {} of {}", judged.used, judged.binding);
    }

    /// A letter with more recipients than the smallest window holds goes in transactions that
    /// each fit it (`Plan::transaction_recipients`), and the letters behind it follow. The
    /// simulation once sent it as one message and its worker waited for the budget forever:
    /// 1,082 recipients an hour with a burst of 250 beside 23 per 10 minutes, letters of 1, 50
    /// and 7, one worker, sent 1 recipient in 25 minutes.
    #[tokio::test(start_paused = true)]
    async fn a_letter_too_large_for_the_smallest_window_holds_no_other_back() {
        let vars = in_recipients("1h", 1_082, 250, Some("23/10m"), 50);
        let case = Case { recipients: vec![1, 50, 7], ..Case::load(vars, 1, 1, 20 * MS, 25 * MINUTE) };
        holds_and_uses_95(&case).await;
    }

    /// SES's 14 recipients a second with letters of 50: each letter went as 14, 14, 14 and 8, and
    /// the second of the 8 left 6 unused, as the next letter's 14 did not fit (750 of the 840 the
    /// rate allows in a minute, 89.3 %). The next letter's first transaction now takes the room
    /// the window has left (`Budget::take_up_to`), and the rest of it the next second.
    #[tokio::test(start_paused = true)]
    async fn a_window_left_with_less_room_than_a_message_lends_it_to_part_of_one() {
        let vars = in_recipients("1s", 14, 1, None, 50);
        for replicas in [1, 3] {
            let case = Case { recipients: vec![50], ..Case::load(vars.clone(), replicas, 8, 20 * MS, MINUTE) };
            let judged = sends_within_its_caps(&case).await;
            // Of the rate itself, not of what the letters' sizes allow in order.
            assert!(judged.used >= 14 * 60 * 95 / 100, "{replicas} replica(s): {} of 840", judged.used);
        }
    }

    /// An hourly budget in recipients, letters of mixed sizes: ten units span 29 s of the
    /// schedule, ten times the horizon. A grant sized for a small message left its rest in the
    /// pool, too short for the next message of ten, whose own grant waited at the horizon until
    /// that rest had all but passed (one replica of sixteen workers: 176 of the 205 the rate
    /// allows in ten minutes, 85.9 %; of six, letters of 1 to 100: 90.7 %). The next grant now
    /// continues the units held at the schedule's end, and the message takes them together
    /// (`schedule::joins_held`). Found by `SIM_BURST1=1 SIM_RECIPIENTS=1` explorations (seeds
    /// 21 and 3).
    #[tokio::test(start_paused = true)]
    async fn a_message_larger_than_the_rest_of_a_grant_takes_it_with_the_next() {
        let cases = [
            Case {
                recipients: MIXED.to_vec(),
                ..Case::load(in_recipients("1h", 1_237, 1, None, 10), 1, 16, MS, 10 * MINUTE)
            },
            Case {
                recipients: vec![1, 40, 5, 100, 2],
                ..Case::load(in_recipients("1h", 1_293, 1, None, 10), 1, 6, MS, 10 * MINUTE)
            },
        ];
        each_holds_and_uses_95(&cases).await;
    }

    /// A slow relay places each message's units as it starts, a preparation ahead. Placed from
    /// there on, a message of ten units at 167 recipients a second reached its dot and waited
    /// the nine intervals (54 ms) after its first unit: every transaction of a 300 ms relay took
    /// up to a sixth longer than it had to. One replica of two workers under 1,669 recipients per
    /// 10 s, letters of 1 to 10, sent 764 of the 864 recipients its workers carry in 30 s
    /// (88.4 %); three replicas of two, 2,240 of 2,517. Now its units end at its dot, the
    /// earlier ones passing during its preparation (`Need::early_ns`). Found by `SIM_BURST1=1
    /// SIM_RECIPIENTS=1` explorations (seed 3).
    #[tokio::test(start_paused = true)]
    async fn a_message_of_several_units_takes_those_that_pass_while_it_is_prepared() {
        let cases = [
            Case {
                recipients: MIXED.to_vec(),
                ..Case::load(in_recipients("10s", 1_669, 1, None, 10), 1, 2, 300 * MS, 30 * SECOND)
            },
            Case {
                recipients: MIXED.to_vec(),
                offsets_ms: vec![-600_000, 0],
                ..Case::load(in_recipients("10s", 1_669, 1, None, 10), 3, 2, 300 * MS, 30 * SECOND)
            },
        ];
        each_holds_and_uses_95(&cases).await;
    }

    /// Two replicas share a schedule whose units lie 37 ms apart (1,613 recipients a minute, the
    /// schedule alone the cap), letters of 1, 40, 5, 100 and 2 in transactions of ten. A grant
    /// sized for the rate a replica used held ten units for a message of two; the next message,
    /// of ten, could not take the eight left once the other replica's grant lay between, and
    /// they passed: 4,280 of the 4,832 recipients the sizes allow in order in three minutes
    /// (88.6 %; one replica, 99.4 %). Now each message's grant holds its own units
    /// (`Budget::grants_one_message`). The same with units 5.3 ms apart (two round trips and
    /// more): three replicas of eight on a 300 ms relay under 1,897 per 10 s, letters of 1, 50
    /// and 7, 5,266 of the 5,657 the sizes allow in order in 30 s (93.1 %). And on a 2 s relay,
    /// where a replica writes about once a transaction and learns of the others' writes only
    /// from its own: three replicas of eight under 1,097 a minute, 3,045 of 3,269 in three
    /// minutes (93.1 %) while sharing was judged over a second. Found by `SIM_BURST1=1
    /// SIM_RECIPIENTS=1` explorations (seeds 17, 11 and 13).
    #[tokio::test(start_paused = true)]
    async fn replicas_sharing_a_slow_schedule_grant_each_message_its_own_units() {
        let cases = [
            Case {
                recipients: vec![1, 40, 5, 100, 2],
                offsets_ms: vec![600_000, 0],
                ..Case::load(in_recipients("60s", 1_613, 1, None, 10), 2, 2, MS, 3 * MINUTE)
            },
            Case {
                recipients: vec![1, 50, 7],
                offsets_ms: vec![-600_000, 0],
                ..Case::load(in_recipients("10s", 1_897, 1, None, 10), 3, 8, 300 * MS, 30 * SECOND)
            },
            Case {
                recipients: vec![1, 50, 7],
                ..Case::load(in_recipients("60s", 1_097, 1, None, 10), 3, 8, 2 * SECOND, 3 * MINUTE)
            },
        ];
        each_holds_and_uses_95(&cases).await;
    }

    /// What `case` sent in each tenth of a second of its run.
    async fn tenths(case: &Case) -> Vec<u32> {
        run(case).await.per_window(100 * MS, case.duration)
    }

    /// Asserts that every tenth of a second from the `from`-th on holds `least` units or more.
    fn each_tenth_holds(tenths: &[u32], from: usize, least: u32, whose: &str) {
        for (tenth, units) in tenths.iter().enumerate().skip(from) {
            assert!(*units >= least, "{whose}: {units} units (at least {least}) in the tenth from {} ms", tenth * 100);
        }
    }

    /// Three replicas of one worker on a 1 ms relay under 1,669 recipients a second, letters of 1
    /// to 10: a message still to be prepared took no unit within the estimated preparation of
    /// it, and the estimate fell from its first guess (67 ms) by a quarter of the difference a
    /// message towards the 0.5 ms measured, so each message waited out what was left of the
    /// guess. Tenths of a second from 0.1 s held 6, 15, 46 and 99 of the rate's 167 units, and
    /// the run 7,485 of the 8,343 the sizes allow in order (89.7 %, the explorations' worst).
    /// Now the first measurement sets how near a unit may be taken (`Budget::cut_ns`): 139,
    /// 159, 153, 169, and 7,852 (94.1 %; the first tenth waits for the first grant's lead).
    #[tokio::test(start_paused = true)]
    async fn the_first_measured_preparation_sets_which_units_a_message_can_reach() {
        let case = Case {
            recipients: MIXED.to_vec(),
            ..Case::load(in_recipients("1s", 1669, 1, None, 10), 3, 1, MS, 5 * SECOND)
        };
        let judged = sends_within_its_caps(&case).await;
        assert!(judged.share() >= 0.93, "{} of {}", judged.used, judged.binding);
        let seen = run(&case).await;
        each_tenth_holds(&seen.per_window(100 * MS, SECOND), 1, 130, "all replicas");
    }

    /// Three replicas of one worker on a 20 ms relay under 1,016 a second: the rate is seven times
    /// what the workers carry, so each replica's runs are strided (its worker uses a twentieth of
    /// them) and cover about 65 ms each. A replica's background refill, asked as its run neared
    /// its end, was told to wait some 13 ms for the schedule's end, and asked again only at its
    /// worker's next take, 20 ms later; the message prepared meanwhile waited for the grant's
    /// first unit a lead after that. One message in six or seven waited 8–9 ms, and the workers
    /// sent 4,217 of the 4,469 they carry in 30 s (94.4 %; 95.5 % in the explorations' 5 s, which
    /// hid it: found with `scripts/explore-budget.sh --min-seconds 30`). Now a refill told to
    /// wait less than the replica's takes are apart asks again then (`Budget::refill`): 4,450.
    #[tokio::test(start_paused = true)]
    async fn a_refill_told_to_wait_asks_again_when_the_schedule_lets_it() {
        let case = Case { recipients: vec![1], ..Case::load(letters("1s", 1016, 1, None), 3, 1, 20 * MS, 30 * SECOND) };
        let judged = sends_within_its_caps(&case).await;
        assert!(judged.share() >= 0.98, "{} of {}", judged.used, judged.binding);
    }

    /// Three replicas of eight workers on a 20 ms relay under 960 recipients a second, letters of
    /// one: each replica's workers can send 400 a second, more than its third of the rate. Where
    /// its runs were strided, a replica asked for more whenever its pool held less than its workers
    /// carried until the next grant was due, took another replica's run beside its own, and used
    /// what its workers could of the two; the replica whose run it was waited for the schedule's
    /// end. Past the start, tenths of a second held 71 to 77 of the rate's 96 units for a second at
    /// a time: 3,840 recipients in 5 s, 80.9 % of what the workers carry. Now a strided replica
    /// asks when it holds less than its own runs bring (`Pool::low`): every tenth from 2.3 s holds
    /// 95 or 96, 4,034 in all (85.0 %, the rest lost before; 4,547 and 94.9 % since lanes go
    /// whole and a first grant is a quarter of a lookahead). Found by `SIM_BURST1=1
    /// SIM_RECIPIENTS=1` explorations (seed 7).
    #[tokio::test(start_paused = true)]
    async fn strided_replicas_keep_to_their_own_runs() {
        let case =
            Case { recipients: vec![1], ..Case::load(in_recipients("1s", 960, 1, None, 1), 3, 8, 20 * MS, 5 * SECOND) };
        sends_within_its_caps(&case).await;
        // From 2.5 s, nine tenths of the rate's 96 units a tenth of a second at least.
        each_tenth_holds(&tenths(&case).await, 25, 86, "all replicas");
    }

    /// Three replicas of eight workers on a 20 ms relay under 960 letters a second (units about a
    /// millisecond apart). The first grants placed their units a lead ahead on the first guess of
    /// a preparation (67 ms, a lead of 100 ms) where the relay prepares in 10 ms: the first dot
    /// came at 110 ms, the rate's units until then went to no one, and the run sent 4,541 of the
    /// 4,791 letters every limit at once allows in 5 s (94.8 %). Where units lie less than 20 ms
    /// apart the guess is 20 ms (`guessed_preparation`): the first dot at 42 ms, 4,563 letters.
    #[tokio::test(start_paused = true)]
    async fn a_dense_rate_is_not_held_by_the_first_guess_of_a_lead() {
        let case = Case::load(letters("1s", 960, 1, None), 3, 8, 20 * MS, 5 * SECOND);
        holds_and_uses_95(&case).await;
        let first = run(&case).await.dots.first().map(|(at, _)| *at);
        assert!(first.is_some_and(|at| at < 70 * MS), "first dot at {first:?}");
    }

    /// Two replicas of sixteen workers on a 1 ms relay under 13,195 letters a second, clocks ten
    /// minutes apart. The paused clock ticks in whole milliseconds, so a worker sends a message
    /// every 2 ms and a replica's workers carry 8,000 a second: most of a run at the rate's pace is
    /// theirs to use, two in five of its units pass. The first runs lie end to end, and a
    /// replica's grants go strided once a share of its units passed, judged on what passed so
    /// far: at three tenths, the second grants read 20 % and the third 29 % (369 of 1,261 at
    /// 207 ms, the tails of the runs still ahead), the strides came at 0.32 s, tenths of a
    /// second from 0.2 s held 910 and 851 of the rate's 1,320, and the run 62,600 of the 65,969
    /// every limit at once allows in 5 s (94.9 %). At a quarter (`pool::PASSING_SHARE`), strided
    /// from 0.21 s: 1,011 and 1,327, then 1,278 to 1,310 a tenth, and 63,120 (95.7 %). Found by
    /// `SIM_HIGH=1` explorations (seed 21).
    #[tokio::test(start_paused = true)]
    async fn replicas_whose_workers_trail_a_dense_rate_interleave_from_their_first_runs() {
        let case =
            Case { offsets_ms: vec![-600_000, 0], ..Case::load(letters("1s", 13_195, 1, None), 2, 16, MS, 5 * SECOND) };
        holds_and_uses_95(&case).await;
        // From 0.3 s, nine tenths of the rate's 1,320 units a tenth of a second at least.
        each_tenth_holds(&tenths(&case).await, 3, 1_200, "both replicas");
    }

    /// Three replicas of ten workers on a 20 ms relay under 1,244 letters a second, clocks ten
    /// minutes apart: each replica's workers carry about 470 a second, so their grants are
    /// strided, every third unit, and the three replicas' runs end together. A replica asking for
    /// its next runs early was told to wait for a lane beside its own, decided on the state its
    /// last wait had read, in which the lanes the others had taken since were still free: it
    /// asked again only as its own run ended, when the others did too, and the last of the
    /// colliding writes began its runs a lead from then, two or three units into its lane. Tenths
    /// of a second from 0.4 s held 120 to 125 of the rate's 124.4 (122.4 on average), and the run
    /// 5,884 of the 6,208 every limit at once allows in 5 s (94.8 %). Now a replica that shares the
    /// schedule reads it again after a wait where any place may go to any replica
    /// (`Budget::grant`): 5,934 (95.6 %), and every tenth from 0.4 s 122 or more. Found by
    /// `SIM_BURST1=1` explorations, with and without `SIM_RECIPIENTS=1` (seed 21).
    #[tokio::test(start_paused = true)]
    async fn replicas_told_to_wait_decide_again_on_the_schedule_as_it_is() {
        let case = Case {
            offsets_ms: vec![-600_000, 0],
            ..Case::load(letters("1s", 1_244, 1, None), 3, 10, 20 * MS, 5 * SECOND)
        };
        holds_and_uses_95(&case).await;
        each_tenth_holds(&tenths(&case).await, 4, 122, "the three replicas");
    }

    /// Two replicas of sixteen workers on a 20 ms relay under 1,089 recipients a second, letters
    /// of one, each message placed as it starts: a grant for the workers waiting, a ledger write
    /// each, the writes one after another. Each grant placed its first unit a lead from when it
    /// was asked, past where the last one ended, and the units between went to no one: 290 grants
    /// a second of 3.6 units, 30,836 recipients in 30 s (94.4 % of what the rate allows). Now a
    /// grant holds the units the replica's workers use within its round trip too
    /// (`Budget::units_within_round_trip`): 31,915 (97.7 %). Found by `SIM_BURST1=1 SIM_RECIPIENTS=1`
    /// explorations (seed 13), whose 5 s run read 92.6 % (95.7 % now).
    #[tokio::test(start_paused = true)]
    async fn grants_placed_for_each_message_cover_their_round_trip() {
        let case = Case {
            recipients: vec![1],
            offsets_ms: vec![600_000, 0],
            ..Case::load(in_recipients("1s", 1_089, 1, None, 10), 2, 16, 20 * MS, 30 * SECOND)
        };
        holds_and_uses_95(&case).await;
    }

    /// MongoDB in another region, 50 to 900 ms a round trip away, one replica and two, 100 a
    /// second. The clock's five readings before the first grant were counted in the second a
    /// grant may take, and from 200 ms they filled it: every first grant timed out and began
    /// again, and not one letter went. From 500 ms a grant's read and write alone took the second.
    /// Now the readings have a bound of their own, and a grant four of their shortest round trips
    /// where that is longer (`Budget::measure_clock`, `Budget::grant_timeout`); and a replica asks
    /// for units over three round trips where that is longer than a lookahead (`Pool::want`),
    /// or its grants, a round trip apart, measured a rate smaller each time (277 letters in 30 s
    /// at 300 ms; 2,127 so). Every second of the last ten holds at least a fifth of the rate.
    #[tokio::test(start_paused = true)]
    async fn a_database_in_another_region_still_grants_the_budget() {
        for database_ms in [50, 150, 200, 300, 500, 900] {
            for replicas in [1, 2] {
                let case = Case {
                    database: database_ms * MS,
                    ..Case::load(letters("1s", 100, 1, None), replicas, 4, 20 * MS, 30 * SECOND)
                };
                let seen = run(&case).await;
                assert!(seen.over().is_empty(), "{case}: over {:?}", seen.over());
                let seconds = seen.per_window(SECOND, case.duration);
                println!("{case}: {} letters, per second {seconds:?}", seen.used());
                let last = &seconds[seconds.len() - 10..];
                assert!(last.iter().all(|n| *n >= 20), "{case}: the last ten seconds held {last:?}");
            }
        }
    }

    /// Three replicas of fourteen workers on a 20 ms relay under 1,378 letters a second: each
    /// can send 700 a second, more than its third. A lane a strided grant left to the others
    /// went in part to the replica that took it, and its rest to whichever asked next: for up to
    /// 0.6 s at a time one replica sent nothing while another held two lanes (82.8 % of the
    /// rate in 5 s). Now a lane goes whole (`schedule::reuse`): from 1 s on, every replica sends
    /// its third in every tenth of a second. Found by `SIM_BURST1=1` explorations (seed 21).
    #[tokio::test(start_paused = true)]
    async fn each_replica_keeps_its_lane() {
        let case = Case::load(letters("1s", 1_378, 1, None), 3, 14, 20 * MS, 5 * SECOND);
        sends_within_its_caps(&case).await;
        let seen = run(&case).await;
        for replica in 0..case.replicas {
            let tenths = seen.replica_per_window(replica, case.workers, 100 * MS, case.duration);
            // A third of the rate's 137.8 units a tenth is 45.9; nine tenths of it at least.
            each_tenth_holds(&tenths, 10, 41, &format!("replica {replica}"));
        }
    }

    /// Three replicas of ten workers on a 1 ms relay under 83,935 letters a second, clocks ten
    /// minutes apart: the workers bind, and each replica's units pass. A replica that held a lane
    /// took the lane beside it over the same span too, when it asked first, and the replica whose
    /// lane it was went without units until the schedule's end (94.6 % of what the workers carry
    /// in 5 s). Now a replica whose units pass leaves such a lane to the others
    /// (`schedule::reuse`). Found by `SIM_HIGH=1` explorations (seed 21).
    #[tokio::test(start_paused = true)]
    async fn a_replica_whose_units_pass_leaves_the_lane_beside_its_own_to_the_others() {
        let case =
            Case { offsets_ms: vec![600_000, 0], ..Case::load(letters("1s", 83_935, 1, None), 3, 10, MS, 5 * SECOND) };
        let judged = sends_within_its_caps(&case).await;
        assert_eq!(judged.bound_by, "the workers", "{case}");
        assert!(judged.share() >= REQUIRED, "{case}: {} of {}", judged.used, judged.binding);
    }

    /// Three replicas of eight workers that start together on a 20 ms relay under 960 a second,
    /// each able to send 400 a second. Each one's first grant was a lookahead of the rate (240
    /// units over 250 ms), and the three lay end to end: the second's first unit came 250 ms
    /// after the first's, the third's 500 ms, and each used about 100 of its 240 (443 units in the
    /// first second). Now a first grant is a quarter of a lookahead (`Pool::want`): 735.
    #[tokio::test(start_paused = true)]
    async fn replicas_that_start_together_share_the_first_second() {
        let case = Case::load(letters("1s", 960, 1, None), 3, 8, 20 * MS, 5 * SECOND);
        sends_within_its_caps(&case).await;
        let seen = run(&case).await;
        // From 0.4 s, nine tenths of the rate's 96 units a tenth of a second at least.
        each_tenth_holds(&seen.per_window(100 * MS, 1500 * MS), 4, 86, "all replicas");
        // And every replica sends in every tenth from 0.3 s.
        for replica in 0..case.replicas {
            let tenths = seen.replica_per_window(replica, case.workers, 100 * MS, 1500 * MS);
            each_tenth_holds(&tenths, 3, 10, &format!("replica {replica}"));
        }
    }

    /// Where the rate's window is counted exactly (`SMTP_MAX_RECIPIENTS=1000` against 1,039
    /// recipients a second), a grant sized for the workers queued behind a message (its units for
    /// each, up to the largest grant) held units beyond it in the window; what the replica's next
    /// message could not use held the window's room until it passed, and the other replicas had
    /// been told to wait for the window's next room meanwhile. Three replicas of twelve on a
    /// 20 ms relay, letters of 1, 40, 5, 100 and 2: each second's messages went in one run of
    /// about 130 ms that stopped near 945 recipients, 4,810 of the 5,181 the sizes allow in order
    /// in 5 s (92.8 %). Now a message whose units the rate brings in two round trips or more
    /// takes a grant of its own (`Budget::grants_one_message`). Found by `SIM_BURST1=1
    /// SIM_RECIPIENTS=1` explorations (seed 13).
    #[tokio::test(start_paused = true)]
    async fn a_window_counted_exactly_grants_each_large_message_its_own_units() {
        let case = Case {
            recipients: vec![1, 40, 5, 100, 2],
            ..Case::load(in_recipients("1s", 1_039, 1, None, 1_000), 3, 12, 20 * MS, 5 * SECOND)
        };
        holds_and_uses_95(&case).await;
    }

    /// Several replicas on a 20 ms relay under a budget in recipients whose room for the largest
    /// message costs under 1 % (the schedule alone, no window counted exactly): a replica's stock
    /// is a run of consecutive units at the whole rate's pace, its workers carry a share of the
    /// rate, and most of the run passed before they came for it; a message needs consecutive
    /// units, so no stride thins it out. Once its stock passes while another replica shares the
    /// schedule, a replica places each message as it starts (`Budget::placing_round_trips`).
    /// Two replicas of thirteen, letters of one (ten recipients a message allowed): 76.4 % of
    /// what the workers carry before. Three replicas of three, letters of 1 to 10: 3,557
    /// recipients in 5 s before (52.9 %), 5,164 placed (80.6 %), 5,505 with each message's units
    /// ending at its dot, and 6,106 (95.3 %) with a grant a message where their sizes differ:
    /// a grant for the waiting workers took this message's size for each of them, and a larger
    /// message after it found the rest too short (`Budget::grants_one_message`). Two replicas of sixteen under 1,089 a second, letters of one, whose
    /// runs passed a quarter unused: 77.7 %, now 93.5 %. Found by `SIM_BURST1=1
    /// SIM_RECIPIENTS=1` explorations (seeds 5, 13).
    #[tokio::test(start_paused = true)]
    async fn replicas_whose_stock_passes_place_each_message() {
        let vars = in_recipients("1s", 1_665, 1, None, 10);
        let ones = Case { offsets_ms: vec![-600_000, 0], ..Case::load(vars, 2, 13, 20 * MS, 5 * SECOND) };
        holds_and_uses_95(&ones).await;
        let vars = in_recipients("1s", 1_493, 1, None, 10);
        let mixed = Case { recipients: MIXED.to_vec(), ..Case::load(vars, 3, 3, 20 * MS, 5 * SECOND) };
        holds_and_uses_95(&mixed).await;
        // Runs taken in turn, each replica's workers using three quarters of its own at their
        // pace: a quarter passing, under a stride's threshold.
        let vars = in_recipients("1s", 1_089, 1, None, 10);
        let turns = Case { offsets_ms: vec![600_000, 0], ..Case::load(vars, 2, 16, 20 * MS, 5 * SECOND) };
        let judged = sends_within_its_caps(&turns).await;
        assert!(judged.share() >= 0.9, "{} of {} ({})", judged.used, judged.binding, judged.bound_by);
    }

    /// A quota in recipients with room for fewer than a message lends that room to part of one,
    /// where the rate's window is not counted exactly (the rate far above the largest message):
    /// a transaction carries the quota's rest and its letter's next transaction the remainder,
    /// where the whole would wait for the window to free. 15 recipients per 10 minutes, letters
    /// of 1 to 100 in transactions of 10: three replicas sent 31 in 25 minutes, 11, 10 and 10 a
    /// window (68.9 %), now 45. One replica of sixteen workers under 21 per 10 minutes, letters
    /// of 1 to 10: 47, now 63. Found by `SIM_BURST1=1 SIM_RECIPIENTS=1` explorations (seeds 11
    /// and 17).
    #[tokio::test(start_paused = true)]
    async fn a_quota_with_less_room_than_a_message_lends_it_to_part_of_one() {
        let vars = in_recipients("1s", 1_613, 1, Some("15/10m"), 10);
        let replicas = Case {
            recipients: vec![1, 40, 5, 100, 2],
            offsets_ms: vec![-600_000, 0],
            ..Case::load(vars, 3, 3, MS, 25 * MINUTE)
        };
        holds_and_uses_95(&replicas).await;
        let vars = in_recipients("1m", 1_221, 1, Some("21/10m"), 10);
        let one = Case {
            recipients: MIXED.to_vec(),
            offsets_ms: vec![-600_000, 0],
            ..Case::load(vars, 1, 16, 2 * SECOND, 25 * MINUTE)
        };
        let judged = sends_within_its_caps(&one).await;
        // Three windows of 21 (judged in order with parts, so the share alone cannot tell).
        assert!(judged.used >= 60, "{} of 63", judged.used);
    }

    /// The same under a burst's pace: a message larger than the quota's room waited whole for
    /// the window to free, and the smaller letters behind it with it. In the third window the
    /// quota had room for 49 and each replica's next message was a 50: 45 recipients of smaller
    /// letters waited 7 s, and the run sent 395 recipients in 50 s where the quota allows 456
    /// (456 so). The part is
    /// what the quota has room for, not the one unit the pace has due.
    #[tokio::test(start_paused = true)]
    async fn a_quota_with_less_room_than_a_message_lends_it_to_part_of_one_under_a_burst() {
        let vars = in_recipients("1s", 1_838, 1_264, Some("152/20s"), 50);
        let case = Case {
            recipients: vec![1, 40, 5, 100, 2],
            offsets_ms: vec![600_000, 0],
            ..Case::load(vars, 3, 11, 300 * MS, 50 * SECOND)
        };
        let judged = sends_within_its_caps(&case).await;
        // Of the quota's three windows in 50 s, not of what whole letters allow in order (445).
        assert!(judged.used >= 3 * 152 * 95 / 100, "{case}: {} of 456", judged.used);
    }

    /// A budget in recipients whose messages' units, on the schedule, span more than a quota's
    /// reach: 1,429 recipients an hour (a unit every 2.5 s) beside 10 per 20 s, letters of 1 to 10
    /// recipients. A message goes at its last unit, but its units were charged against the quota
    /// at their own places, up to 23 s before, and a window of 20 s held 14 recipients. Counted
    /// exactly, the message is charged where it goes. Found by `SIM_BURST1=1 SIM_RECIPIENTS=1`
    /// explorations, which no run before had tried (seeds 3 and 19: 14 of 10, 127 of 126).
    #[tokio::test(start_paused = true)]
    async fn a_message_spread_over_more_than_a_quotas_reach_keeps_the_quota() {
        let spread = [
            Case {
                recipients: MIXED.to_vec(),
                ..Case::load(in_recipients("1h", 1_429, 1, Some("10/20s"), 10), 1, 1, MS, 10 * MINUTE)
            },
            Case {
                recipients: MIXED.to_vec(),
                offsets_ms: vec![600_000, 0],
                ..Case::load(in_recipients("1m", 1_013, 1, Some("126/20s"), 10), 3, 13, MS, 3 * MINUTE)
            },
        ];
        for case in &spread {
            sends_within_its_caps(case).await;
        }
    }

    /// Where the rate's window is counted exactly, a run is charged at its last unit, and a
    /// message on its first units went that much before: 42 recipients per 10 s beside 173 per
    /// 10 minutes, letters of 1, 50 and 7, seven workers on a 300 ms relay, held 50 recipients in
    /// 10 s once a message of 7 took the first units of a run granted for 42. Every message on
    /// a run now goes at its end (`Pool::hand`).
    #[tokio::test(start_paused = true)]
    async fn messages_on_one_run_go_at_its_end() {
        let vars = in_recipients("10s", 42, 1, Some("173/600s"), 50);
        let case = Case { recipients: vec![1, 50, 7], ..Case::load(vars, 1, 7, 300 * MS, 25 * MINUTE) };
        sends_within_its_caps(&case).await;
    }

    /// The messages a letter makes, as the service sends them: transactions of at most
    /// `SMTP_MAX_RECIPIENTS`, and in recipient mode of at most the smallest window.
    #[test]
    fn letters_make_the_messages_the_service_sends() {
        let plan = |quotas: &str, unit: &str| {
            let mut vars = letters("1s", 1_000, 1, Some(quotas).filter(|q| !q.is_empty()));
            vars.push(var("SMTP_RATE_LIMIT_UNIT", unit));
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            Plan::new(&smtp(&vars))
        };
        assert_eq!(messages(&plan("", "recipient"), 10, &[1, 50, 7]), vec![1, 10, 10, 10, 10, 10, 7]);
        assert_eq!(messages(&plan("23/10m", "recipient"), 50, &[1, 50, 7]), vec![1, 23, 23, 4, 7]);
        assert_eq!(messages(&plan("23/10m", "letter"), 10, &[1, 25]), vec![1, 1, 1, 1]);
    }

    /// A fast rate with a long burst: 1,510 a second with a burst of 786, one replica of six
    /// workers on a 1 ms relay, 5 s. A burst longer than a lookahead made the replica ask for
    /// what its waiting workers needed, a round trip each: grants of one to five units every
    /// 2 ms kept the rate and never reached the burst (91.9 %). Only where a lookahead holds few
    /// units (`pool::SLOW_PACE`) does it still do so.
    #[tokio::test(start_paused = true)]
    async fn a_fast_rate_with_a_long_burst_uses_the_burst() {
        let case =
            Case { offsets_ms: vec![600_000], ..Case::load(letters("1s", 1_510, 786, None), 1, 6, MS, 5 * SECOND) };
        holds_and_uses_95(&case).await;
    }

    /// A replica killed under a quota strands none of the window: 10 a 10 s period with a burst of
    /// 5 beside 30 a minute, two replicas of eight workers on a 50 ms relay, the first killed at
    /// 1.5 s. Its waiting workers had taken five units usable two seconds ahead; dead, it left
    /// them counted in the first minute (85 of 90 in three minutes, 94.4 %). Under quotas a grant
    /// now begins at most a second ahead (`schedule::QUOTA_HORIZON`).
    #[tokio::test(start_paused = true)]
    async fn a_replica_killed_under_a_quota_strands_none_of_its_window() {
        let case = Case {
            kill_at: Some(Duration::from_millis(1_500)),
            ..Case::load(letters("10s", 10, 5, Some("30/1m")), 2, 8, 50 * MS, 3 * MINUTE)
        };
        let judged = judge(&case).await;
        assert!(judged.over.is_empty(), "over: {:?}", judged.over);
        assert_eq!(judged.binding, 90, "{}", judged.bound_by);
        assert!(judged.used >= 89, "{} of {} ({})", judged.used, judged.binding, judged.bound_by);
    }

    /// A message never goes more than a reach before its first unit's charge: 23 an hour with a
    /// burst of 7 beside 1 per 5 s, one worker on a 2 s relay (a property case with windows of
    /// 5 to 20 s, shrunk). The lead (1.5 s) put the charge half a second past the moment the
    /// message was ready, two quota buckets of 250 ms, and a 5 s window held 2 of 1.
    #[tokio::test(start_paused = true)]
    async fn a_message_ready_before_the_lead_keeps_a_short_quota() {
        let case = Case::load(letters("1h", 23, 7, Some("1/5s")), 1, 1, 2 * SECOND, 10 * MINUTE);
        holds_and_uses_95(&case).await;
    }

    /// A burst's messages go when they are ready: 1,774 a 10 s period with a burst of 991 beside
    /// 129 per 20 s, one replica of seven workers on a 2 s relay (the workers carry 70 a window).
    /// The quotas counted a grant's units from a lead after it (half again the preparation), and
    /// a message may go no sooner than a reach before that, so each message, ready a preparation
    /// after its grant, waited at its dot for the rest: 84.0 % of what the workers carry. They
    /// are now counted from the preparation itself.
    #[tokio::test(start_paused = true)]
    async fn a_bursts_messages_beside_a_short_quota_go_when_ready() {
        let case = Case::load(letters("10s", 1_774, 991, Some("129/20s")), 1, 7, 2 * SECOND, 50 * SECOND);
        holds_and_uses_95(&case).await;
    }

    /// Until a preparation is measured, a grant's units are counted from the lead, which where
    /// units lie seconds apart is a second at least: 1,077 a day with a burst of 97 beside 43 per
    /// 20 s, three replicas of thirteen workers on a 2 s relay. Counted from the first guess of a
    /// preparation (67 ms), the burst's units passed the reach of their charge before the first
    /// messages were ready (62.5 % of the budget).
    #[tokio::test(start_paused = true)]
    async fn a_slow_relays_first_messages_use_the_burst() {
        let case = Case {
            offsets_ms: vec![-600_000, 0],
            ..Case::load(letters("24h", 1_077, 97, Some("43/20s")), 3, 13, 2 * SECOND, 10 * MINUTE)
        };
        holds_and_uses_95(&case).await;
    }

    /// Workers that send in step take their units within a moment: 323 a second with a burst of
    /// 35, three replicas of eleven workers on a 300 ms relay (the workers carry a third of the
    /// rate). Measured over the moment since the last grant, a replica's rate read many times
    /// what it was, its grants took up to 58 units where its workers used 9, the other replicas'
    /// grants lay past them and their messages waited at their dots: 90.1 % of what the workers
    /// carry. The rate is now measured over a lookahead at least.
    #[tokio::test(start_paused = true)]
    async fn workers_in_step_take_no_more_than_they_use() {
        let case = Case {
            offsets_ms: vec![600_000, 0],
            ..Case::load(letters("1s", 323, 35, None), 3, 11, 300 * MS, 5 * SECOND)
        };
        holds_and_uses_95(&case).await;
    }

    /// A burst's units go unused once a preparation from now lies past them, and a replica's
    /// workers come for them slower than the rate lays them: 90 a second with a burst of 15,
    /// three replicas of six workers on a 300 ms relay (the workers carry two thirds of the
    /// rate). Stocked in the background, the grants took the whole rate, every grant lay past
    /// its lead, and each message waited at its dot: 92.2 % of what the workers carry. Once the
    /// schedule's end lies past a preparation from now, replicas ask as their workers need.
    #[tokio::test(start_paused = true)]
    async fn a_burst_is_not_stocked_past_the_workers_reach() {
        let case = Case {
            offsets_ms: vec![-600_000, 0],
            ..Case::load(letters("1s", 90, 15, None), 3, 6, 300 * MS, 5 * SECOND)
        };
        holds_and_uses_95(&case).await;
    }

    /// A message that missed its unit, at its dot already, takes units due as soon as they can
    /// arrive: 942 a second with a burst of 160 beside 292 per 20 s, three replicas of fifteen
    /// workers on a 2 s relay. The first preparation took fifteen times the first guess and every
    /// first message missed its unit; its next units lay a lead (1.5 s) ahead, and each waited at
    /// its dot with the DATA phase open for 1.3 s (the first dots at 2.35 s).
    #[tokio::test(start_paused = true)]
    async fn a_message_that_missed_its_unit_goes_when_it_is_ready() {
        let case = Case {
            offsets_ms: vec![600_000, 0],
            ..Case::load(letters("1s", 942, 160, Some("292/20s")), 3, 15, 2 * SECOND, 50 * SECOND)
        };
        let seen = run(&case).await;
        // Ready a preparation (1 s) after the start; then a round trip each, one after another.
        let first_round = seen.dots.iter().filter(|(at, _)| *at < SECOND + 250 * MS).count();
        assert_eq!(first_round, 45, "{:?}", seen.dots.first());
        holds_and_uses_95(&case).await;
    }

    /// Under a burst, a replica's first grant is what its waiting workers need, not a lookahead
    /// of the rate: 960 a second with a burst of 362, three replicas of eight workers on a 20 ms
    /// relay (they carry more than the rate). The first grants of a lookahead each, 238 units,
    /// took two thirds of the burst each, the third replica's lay past it, and its workers
    /// waited: 94.7 % of what every limit at once allows in 5 s.
    #[tokio::test(start_paused = true)]
    async fn every_replica_shares_the_burst_at_start() {
        let case = Case::load(letters("1s", 960, 362, None), 3, 8, 20 * MS, 5 * SECOND);
        holds_and_uses_95(&case).await;
    }

    /// Messages that will miss their units, found when a preparation outlasts the lead, take the
    /// schedule's next units before the next message still to be prepared: sixteen workers on a
    /// 2 s relay at 14 a second without a burst, their first units placed on the lead's first
    /// guess (100 ms). The sixteenth worker's first unit lay a new lead (1.5 s) ahead of the
    /// first message's dot, and thirteen of those that missed went after it, at 2.5-3.4 s:
    /// 93.2 % of what the workers carry over 30 s.
    #[tokio::test(start_paused = true)]
    async fn messages_that_miss_their_first_units_go_before_the_next_ones() {
        let case = Case::load(letters("1s", 14, 1, None), 1, 16, 2 * SECOND, 30 * SECOND);
        let seen = run(&case).await;
        // The first dots from 1 s on, about an interval (71 ms) apart: the last at 2.27 s.
        let late: Vec<f64> = seen
            .by_worker
            .iter()
            .filter_map(|dots| dots.first())
            .map(|(at, _)| at.as_secs_f64())
            .filter(|at| *at > 2.3)
            .collect();
        assert!(late.is_empty(), "first dots after 2.3 s: {late:?}");
        assert_eq!(seen.by_worker.iter().filter(|dots| !dots.is_empty()).count(), 16);
        // Each worker's fifteen dots (at 1, 3, … 29 s): 240. Before grants placed units a
        // preparation ahead rather than a lead (`Budget::placing_lead_ns`), every message waited
        // half a second at its dot, and so did the reference's: 192 of 192.
        let judged = judge(&case).await;
        assert_eq!(judged.bound_by, "the workers");
        assert_eq!(judged.binding, 240);
        assert!(judged.share() >= 0.97, "{} of {}", judged.used, judged.binding);
    }

    /// One replica without a burst under a rate tens of times what its workers carry (a relay
    /// without a limit of its own, the rate set out of the way): grants sized by what the workers
    /// use were runs at the rate's pace that passed within a few milliseconds, and every round
    /// of the workers waited for a grant's round trip and a lead (`Budget::spanning_units`).
    /// Fourteen workers on a 20 ms relay carry 700 letters a second; at 23,635 and 43,390 a
    /// second they sent 602-616, 86.9 % of what they carry in 5 s (three workers at 12,790 the
    /// same share).
    #[tokio::test(start_paused = true)]
    async fn a_replica_alone_under_a_rate_far_above_its_workers_keeps_their_pace() {
        for (rate, workers) in [(12_790, 3), (23_635, 14), (43_390, 14)] {
            // 93 % over the 5 s: its first round less.
            keeps_the_workers_pace(rate, 1, workers, 93).await;
        }
    }

    /// Several replicas without a burst under a rate far above their workers: runs at the rate's
    /// pace passed before the workers came back, and the stride a replica took once its units
    /// passed divided the pace by the replicas only (`Budget::shares_a_rate_far_above`). Three
    /// replicas of eight on a 20 ms relay under 40,000 a second sent 888 letters a second of the
    /// 1,200 they carry.
    #[tokio::test(start_paused = true)]
    async fn replicas_sharing_a_rate_far_above_their_workers_keep_their_pace() {
        for (rate, replicas, workers) in [(40_000, 3, 8), (33_220, 2, 16), (23_860, 2, 12)] {
            keeps_the_workers_pace(rate, replicas, workers, 90).await;
        }
    }

    /// Letters of one under `rate` a second without a burst, `replicas` of `workers` on a 20 ms
    /// relay for 5 s: every cap held, at least `percent` % of what the workers carry (50 letters
    /// a second each) and 95 % of the binding limit used.
    async fn keeps_the_workers_pace(rate: u32, replicas: usize, workers: usize, percent: u64) {
        let case = Case::load(letters("1s", rate, 1, None), replicas, workers, 20 * MS, 5 * SECOND);
        let judged = judge(&case).await;
        assert!(judged.over.is_empty(), "{case}: over {:?}", judged.over);
        let carried = 250 * (replicas * workers) as u64;
        println!("{case}: {} letters of the {carried} the workers carry", judged.used);
        assert!(
            judged.used * 100 >= carried * percent,
            "{case}: {} letters of the {carried} the workers carry",
            judged.used
        );
        assert!(judged.share() >= REQUIRED, "{case}: {} of {} ({})", judged.used, judged.binding, judged.bound_by);
    }

    /// Where grants may be loose (about 51,200 a second and more), the grants on the schedule
    /// beside them were runs at the rate's pace, neither strided nor spanning the pool's prefetch
    /// (`schedule::uncounted_places`); and replicas whose strided runs lay past their pools'
    /// horizon asked again and took the runs between of their own stride, so the schedule's end
    /// ran ahead of now (`schedule::Asker::holds_from_ns`). Three replicas of eleven on a 1 ms
    /// relay sent 44,967 letters in 5 s under 63,010 a second and 52,642 under 100,000, where
    /// they sent 75,645 under 40,000 (78,686 now); three of thirteen on a 20 ms relay, 7,429
    /// under 74,170 and 9,335 under 40,000. Now each sends at least 95 % of what it does under
    /// 40,000, where grants are never loose.
    #[tokio::test(start_paused = true)]
    async fn replicas_where_grants_may_be_loose_keep_the_pace_they_have_below() {
        for (workers, send, rates) in
            [(11, MS, [63_010, 100_000, 1_000_000]), (13, 20 * MS, [74_170, 300_000, 1_000_000])]
        {
            let below = run(&Case::load(letters("1s", 40_000, 1, None), 3, workers, send, 5 * SECOND)).await.used();
            for rate in rates {
                let case = Case::load(letters("1s", rate, 1, None), 3, workers, send, 5 * SECOND);
                assert!(Plan::new(&case.config()).loose_max > 0, "{case}: grants are never loose");
                let judged = judge(&case).await;
                assert!(judged.over.is_empty(), "{case}: over {:?}", judged.over);
                println!("{case}: {} letters, {below} under 40,000/s", judged.used);
                assert!(judged.used * 100 >= below * 95, "{case}: {} letters, {below} under 40,000/s", judged.used);
                assert!(
                    judged.share() >= REQUIRED,
                    "{case}: {} of {} ({})",
                    judged.used,
                    judged.binding,
                    judged.bound_by
                );
            }
        }
    }

    /// Without a burst and with the rate left high, each message took a fresh grant a lead
    /// (half again its preparation) ahead and waited the difference at its dot: six workers on a
    /// 300 ms relay sent 480 letters in 30 s at 100 a second and above, 588 at 50. Now a grant
    /// places them a preparation ahead (`Budget::placing_lead_ns`): each worker's hundred dots.
    #[tokio::test(start_paused = true)]
    async fn a_rate_left_high_without_a_burst_keeps_the_workers_at_their_pace() {
        for rate in [100, 1_000, 40_000] {
            let case = Case::load(letters("1s", rate, 1, None), 1, 6, Duration::from_millis(300), 30 * SECOND);
            let seen = run(&case).await;
            assert!(seen.used() >= 570, "{rate}/s: {} letters of the workers' 600", seen.used());
            assert!(seen.busiest(SECOND) <= u64::from(rate), "{rate}/s: {} in a second", seen.busiest(SECOND));
        }
    }

    /// Several replicas of a few workers on slow relays, `BURST=1`: units stocked ahead of the
    /// workers were a guess at when they would come, and between replicas it went wrong both
    /// ways (a replica's grant and its refill a round trip later read one unit in 4 ms as 250
    /// a second, its grants took the schedule a second ahead, and the others' messages waited
    /// at their dots). Three replicas of one worker on a 300 ms relay at 1,710 a minute sent
    /// 447 letters in a minute of the 584 they carry; the worst of each explored seed were
    /// 75.0–85.1 %. Each message's unit is now placed where it will be ready
    /// (`Budget::places_each_message`).
    #[tokio::test(start_paused = true)]
    async fn replicas_of_slow_workers_place_each_message_where_it_will_be_ready() {
        // (period, max, replicas, workers, send ms, seconds, first replica's clock offset, least)
        let cases = [
            ("60s", 1_710, 3, 1, 300, 60, 0, 570),
            ("60s", 1_966, 3, 2, 300, 60, -600_000, 1_140),
            ("1s", 323, 3, 11, 300, 5, 600_000, 480),
            ("10s", 1_238, 2, 1, 300, 30, 600_000, 190),
            ("1s", 782, 3, 16, 300, 5, 0, 700),
        ];
        for (period, max, replicas, workers, send_ms, secs, offset, least) in cases {
            let case = Case {
                offsets_ms: vec![offset, 0],
                ..Case::load(
                    letters(period, max, 1, None),
                    replicas,
                    workers,
                    Duration::from_millis(send_ms),
                    Duration::from_secs(secs),
                )
            };
            let judged = judge(&case).await;
            assert!(judged.over.is_empty(), "{case}: over {:?}", judged.over);
            assert!(judged.used >= least, "{case}: {} letters, {least} expected", judged.used);
            assert!(judged.share() >= REQUIRED, "{case}: {} of {} ({})", judged.used, judged.binding, judged.bound_by);
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// `SIM_EXPLORE` and `SIM_SEED`: how many cases, from which seed.
    fn explore() -> Option<(u32, u64)> {
        let cases = std::env::var("SIM_EXPLORE").ok()?.parse().ok()?;
        Some((cases, std::env::var("SIM_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or(21)))
    }

    fn case() -> impl Strategy<Value = Case> {
        let period = prop_oneof![Just(1_u64), Just(10), Just(60), Just(3_600), Just(86_400)];
        (
            period,
            1_u32..=2_000,
            0.0_f64..=1.0,
            prop_oneof![Just(None), (1_u32..=500, prop_oneof![Just(20_u64), Just(60), Just(600)]).prop_map(Some)],
            1_usize..=3,
            1_usize..=16,
            prop_oneof![Just(1_u64), Just(20), Just(300), Just(2_000)],
            prop_oneof![Just(0_i64), Just(600_000), Just(-600_000)],
        )
            .prop_map(|(period_s, max, burst_share, quota, replicas, workers, send_ms, offset_ms)| {
                // `SIM_HIGH=1` explores rates of 10,000 to 100,000 a second, a relay without a
                // limit of its own whose rate is set out of the way: the values drawn scaled, so
                // that the cases CI runs stay the same.
                let (period_s, max) = match std::env::var_os("SIM_HIGH") {
                    Some(_) => (1, 10_000 + (max - 1) * 45),
                    None => (period_s, max),
                };
                // `SIM_BURST1=1` explores the default burst alone, which a share of the rate
                // seldom draws.
                let burst = match std::env::var_os("SIM_BURST1") {
                    Some(_) => 1,
                    None => ((f64::from(max) * burst_share) as u32).clamp(1, max),
                };
                let mut vars = vec![
                    var("SMTP_RATE_LIMIT_PERIOD", format!("{period_s}s")),
                    var("SMTP_RATE_LIMIT_MAX_LETTERS", max),
                    var("SMTP_RATE_LIMIT_BURST", burst),
                ];
                // `SIM_MIN_SECONDS=<seconds>` runs every case that long at least (5 s), to tell
                // what a case loses as its replicas start from what it loses all along.
                let shortest = std::env::var("SIM_MIN_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
                let mut duration = Duration::from_secs((3 * period_s).clamp(shortest, 600.max(shortest)));
                if let Some((limit, window_s)) = quota {
                    vars.push(var("SMTP_QUOTAS", format!("{limit}/{window_s}s")));
                    duration = duration.max(Duration::from_secs(window_s * 5 / 2));
                }
                // `SIM_RECIPIENTS=1` explores budgets in recipients, letters of one and of mixed
                // sizes. Taken from the values drawn, not drawn themselves, so that the cases CI
                // runs stay the same.
                let mut recipients = vec![1];
                if std::env::var_os("SIM_RECIPIENTS").is_some() {
                    let per_message = [1, 10, 50, 1_000][max as usize % 4];
                    vars.extend([var("SMTP_RATE_LIMIT_UNIT", "recipient"), var("SMTP_MAX_RECIPIENTS", per_message)]);
                    recipients = match (max / 4) % 4 {
                        0 => vec![1],
                        1 => MIXED.to_vec(),
                        2 => vec![1, 50, 7],
                        _ => vec![1, 40, 5, 100, 2],
                    };
                }
                Case {
                    vars,
                    replicas,
                    workers,
                    send: Duration::from_millis(send_ms),
                    offsets_ms: vec![offset_ms, 0],
                    kill_at: None,
                    recipients,
                    duration,
                    database: DATABASE,
                }
            })
    }

    proptest! {
        // A fixed seed: the same cases in every run, so CI never meets a case first seen there.
        // To explore, `SIM_EXPLORE=<cases>` (and `SIM_SEED=<seed>`) runs that many cases and
        // prints each one's share instead of asserting it (only the caps are asserted).
        #![proptest_config(ProptestConfig {
            cases: explore().map_or(24, |(cases, _)| cases),
            failure_persistence: None,
            rng_seed: proptest::test_runner::RngSeed::Fixed(explore().map_or(21, |(_, seed)| seed)),
            ..ProptestConfig::default()
        })]

        /// Random configurations of the same space: every window within its limit, and at least
        /// 95 % of the binding limit used.
        #[test]
        fn any_configuration_holds_its_limits_and_uses_its_budget(case in case()) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            let judged = runtime.block_on(judge(&case));
            prop_assert!(judged.over.is_empty(), "{case}: over {:?}", judged.over);
            if explore().is_some() {
                println!("{:6.1} % (required {:.0} %) {case} [{}] used {} of {}", judged.share() * 100.0, REQUIRED * 100.0, judged.bound_by, judged.used, judged.binding);
                return Ok(());
            }
            prop_assert!(
                judged.share() >= REQUIRED,
                "{case}: used {} of {} bound by {}",
                judged.used,
                judged.binding,
                judged.bound_by
            );
        }
    }
}

#[cfg(test)]
mod relays {
    use super::*;

    /// The relays' own configurations (`shared/guides/real-configs.md`), one replica and three,
    /// as a table: the budget used as a share of the binding limit, and the busiest window
    /// against its limit. The README's budget section quotes it (`cargo test --lib
    /// relays_table -- --nocapture`).
    #[tokio::test(start_paused = true)]
    async fn relays_table() {
        type Row = (&'static str, Vec<(&'static str, String)>, Vec<u32>, Duration);
        let rows: Vec<Row> = vec![
            (
                "Workspace: 2,000/24h quota, rate left high",
                vec![
                    var("SMTP_RATE_LIMIT_PERIOD", "1s"),
                    var("SMTP_RATE_LIMIT_MAX_LETTERS", 10_000),
                    var("SMTP_QUOTAS", "2000/24h"),
                ],
                vec![1],
                DAY * 3 / 2,
            ),
            (
                "Workspace: 2,000 per 24 h period, burst 100",
                vec![
                    var("SMTP_RATE_LIMIT_PERIOD", "24h"),
                    var("SMTP_RATE_LIMIT_MAX_LETTERS", 2000),
                    var("SMTP_RATE_LIMIT_BURST", 100),
                ],
                vec![1],
                10 * MINUTE,
            ),
            (
                "SES: 14 recipients/s, 50 per message, letters of 1",
                in_recipients("1s", 14, 1, None, 50),
                vec![1],
                MINUTE,
            ),
            (
                "SES: 14 recipients/s, 50 per message, letters of 50",
                in_recipients("1s", 14, 1, None, 50),
                vec![50],
                MINUTE,
            ),
            ("SES: 14 recipients/s, 1 per message", in_recipients("1s", 14, 1, None, 1), vec![1], MINUTE),
            (
                "100/s with 10,000/24h",
                vec![
                    var("SMTP_RATE_LIMIT_PERIOD", "1s"),
                    var("SMTP_RATE_LIMIT_MAX_LETTERS", 100),
                    var("SMTP_QUOTAS", "10000/24h"),
                ],
                vec![1],
                3 * MINUTE,
            ),
        ];
        println!("| configuration | replicas | used of the binding limit | busiest window (limit) |");
        println!("|---|---|---|---|");
        for (name, vars, recipients, duration) in rows {
            for replicas in [1, 3] {
                let case = Case {
                    vars: vars.clone(),
                    replicas,
                    workers: 8,
                    send: Duration::from_millis(50),
                    offsets_ms: vec![0, 600_000, -600_000],
                    kill_at: None,
                    recipients: recipients.clone(),
                    duration,
                    database: DATABASE,
                };
                let judged = judge(&case).await;
                let seen = run(&case).await;
                let plan = &seen.plan;
                let (window, width, limit) = match plan.quotas.first() {
                    Some(quota) => (quota.label.clone(), quota.window_ns, u64::from(quota.limit)),
                    None => (
                        plan.rate_label.clone(),
                        plan.period_ns,
                        u64::from(plan.rate_max) + (plan.tolerance_ns / plan.interval_ns) as u64,
                    ),
                };
                let busiest = seen.busiest(Duration::from_nanos(width as u64));
                println!(
                    "| {name} | {replicas} | {:.1} % of {} ({}) | {busiest} per {window} ({limit}) |",
                    judged.share() * 100.0,
                    judged.binding,
                    judged.bound_by
                );
                assert!(judged.over.is_empty(), "{name}: {:?}", judged.over);
            }
        }
    }
}
