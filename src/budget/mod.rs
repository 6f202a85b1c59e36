//! The sending budget, one for the whole deployment: every replica takes its sends from one
//! document in MongoDB (`<MONGODB_COLLECTION>_budget`), so N replicas together never exceed it and
//! a restarted replica continues the same windows.
//!
//! Two kinds of window, because they mean different things:
//! - The rate (`SMTP_RATE_LIMIT_MAX_LETTERS` per `SMTP_RATE_LIMIT_PERIOD`) is a schedule of
//!   evenly spaced *units*. The document holds the next free unit's time; a grant of k units
//!   advances it by k intervals. A message is handed over (its final dot written) at the time of
//!   its last unit, so the relay sees messages spaced by the budget however long each send takes.
//! - A quota (`SMTP_QUOTAS`, e.g. `10000/24h`) allows bursts, so it is a count, not a schedule:
//!   units granted per time bucket, and a grant fits when the buckets of the last window (plus
//!   one, see [`QuotaPlan`]) leave room.
//!
//! MongoDB is not asked per letter: a replica takes grants sized to what it sends in the next
//! [`LOOKAHEAD`], keeps them in a local pool, hands units to its workers from there, and asks for
//! the next grant in the background before the pool runs dry, so the round trip is not on the
//! sending path. Units are times, so an unused unit simply expires; a dead replica strands at most
//! one grant. When the budget is far above what a replica sends (the benchmark's million a second),
//! units a microsecond apart would expire before a worker comes back for them, so such a replica
//! takes *loose* grants instead: a few units usable at any moment of the next [`LOOKAHEAD`] (see
//! [`Plan::loose_max`] for why that cannot crowd a window). The grant is
//! computed here and written with a compare-and-set on a version number, which the Mongo-wire
//! server we test on supports (it has no pipeline updates). Times are the server's: the process's
//! one [`Clock`], measured before the first decision and moved by each write's `$currentDate`
//! stamp, so pod clock skew does not break the spacing.
//!
//! Without MongoDB a replica cannot prove it has budget: it sends nothing beyond the grant it
//! already holds, says so in `/ready` and `mailsender_budget_available`, and resumes when
//! MongoDB answers again.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    clock::{Clock, Reading},
    metrics::{Metrics, WindowLabel},
};

mod ledger;
mod pool;
mod schedule;
#[cfg(test)]
mod sim;

pub use ledger::{Ledger, MemoryLedger};
use pool::{Pool, Taken};
pub use schedule::{Decision, LooseGrant, Need, Placed, Plan, QuotaPlan, Run, State, decide, usage};

/// A replica asks for what it expects to send in this long.
pub const LOOKAHEAD: Duration = Duration::from_millis(250);
/// A unit is never granted sooner than the lead from now: the time a worker needs to open the
/// transaction (MAIL, RCPT, DATA, the data) before its final dot. It is measured (half again the
/// recent slowest preparation), starting from this, within these bounds.
const LEAD: Duration = Duration::from_millis(100);
const LEAD_MIN: Duration = Duration::from_millis(1);
const LEAD_MAX: Duration = Duration::from_millis(1_500);
/// Where the rate's units lie closer together than this, the first messages' preparation is
/// guessed at [`DENSE_GUESS`] rather than two thirds of [`LEAD`] (see [`guessed_preparation`]).
const DENSE_INTERVAL: Duration = Duration::from_millis(20);
const DENSE_GUESS: Duration = Duration::from_millis(20);
/// How long a replica's other messages wait for its first message's grant before they take
/// their units as ever (see [`Budget::probe`]): a grant times out in a second on a database
/// near by ([`GRANT_TIMEOUT`]).
const PROBE_WAIT: Duration = Duration::from_secs(2);
/// Where units lie two seconds or more apart, a grant's first unit is at least this far ahead: a
/// first message prepared more slowly than the first guess of the lead would miss its unit, and
/// the next one is a whole interval away (43 s for 2,000 a day).
const SLOW_LEAD: Duration = Duration::from_secs(1);
/// A grant's first usable moment is at most this far ahead of now; further, it waits. Above the
/// longest lead and round trip, so that a slow relay never finds the budget out of reach.
const HORIZON: Duration = Duration::from_secs(3);
/// The longest a message waits at its final dot, the relay's DATA phase open, for a unit to
/// replace one it was too late for. Past it the message is withdrawn (the connection dropped
/// before the dot, so the relay discards it) and the letter goes back without costing an
/// attempt: an exhausted quota or MongoDB away must not run out the relay's data timeout, after
/// which the letter would be reported "may have been delivered" though no dot was sent.
pub const HOLD_MAX: Duration = Duration::from_secs(5);
/// The most a bulk message's units are taken ahead for the slack of a stalling machine: a
/// transaction opens at most a second before its unit anyway (`rate_limit::OPEN_AHEAD`).
const BULK_SLACK_MAX: Duration = Duration::from_secs(1);
/// A grant that takes longer counts as MongoDB unreachable (the driver itself waits up to its
/// server selection timeout, 5 s, before it says so); longer for a database far away
/// ([`Budget::grant_timeout`]).
const GRANT_TIMEOUT: Duration = Duration::from_secs(1);
/// The most the clock's readings before the first grant may take together (see
/// [`Budget::measure_clock`]): five round trips of a database a continent away, and more.
const CLOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// A loose grant's units are used within this long of the grant.
const LOOSE_SPAN: Duration = LOOKAHEAD;
/// The next grant is asked for when the pool covers less than the lead, two round trips and this.
const PREFETCH_MARGIN: Duration = Duration::from_millis(25);
/// Under a quota whose buckets are this short or shorter (windows up to about two minutes), a
/// replica asks only for what its waiting workers need ([`Budget::short_reach`]).
const SHORT_REACH: Duration = Duration::from_secs(1);
/// How often a replica without MongoDB tries again.
const RETRY: Duration = Duration::from_millis(500);
/// Concurrent changes by other replicas tolerated in one grant before backing off.
const CAS_ATTEMPTS: usize = 8;
/// The least round trip [`PLACING_ROUND_TRIPS`] and [`ONE_MESSAGE_ROUND_TRIPS`] count: on
/// loopback (or an in-memory ledger) it reads near nothing, and a write a letter at a fast
/// relay's pace is load on MongoDB's one document that a stock of units spares it.
const PLACING_ROUND_TRIP_MIN: Duration = Duration::from_millis(1);
/// A preparation within this is fast enough for a stock under a window counted exactly
/// ([`Budget::stock_used_in_time`]): between the simulation's 20 ms and 300 ms relays, not tuned
/// finer.
const FAST_PREPARATION: Duration = Duration::from_millis(50);
/// A worker that comes back for its next message this many ledger round trips or more after its
/// final dot finds the units booked for it at the dot ([`Budget::books_ahead`]): the booking's
/// write is done before it asks.
const BOOKING_ROUND_TRIPS: i64 = 2;
/// How many final dots wait for their workers' return at most ([`Returns`]): more than a
/// replica's workers.
const DOTS_KEPT: usize = 64;
/// The share of the rate's window counted exactly that must be left for bookings
/// ([`Budget::books_ahead`]).
const BOOKING_ROOM: f64 = 0.25;
/// Bookings are for messages of one size: as many as the last this many in a row.
const BOOKING_SAME_SIZES: u32 = 16;
/// A preparation longer than this many ledger round trips places each message's units as it
/// starts, where it will be ready ([`Budget::places_each_message`]): the round trip costs the
/// worker at most 4 % of its preparation.
const PLACING_ROUND_TRIPS: i64 = 25;
/// How many of the last grant round trips [`Budget::counted_round_trip_ns`] takes the median of:
/// one stalled write is outvoted, a ledger that moved further away counts after three writes.
const RECENT_ROUND_TRIPS: usize = 5;
/// The same where other replicas share the schedule and messages may cost several units
/// ([`Budget::placing_round_trips`]): the round trip costs the worker up to a quarter of its
/// preparation, and saves more. Eight round trips left the simulation's 20 ms relays (a
/// preparation of 10 ms, round trips of 2 ms) stocking, and losing, as before.
const PLACING_ROUND_TRIPS_SHARED: i64 = 4;
/// Where other replicas share the schedule, units at least this many round trips apart are far
/// enough apart for a grant a message ([`Budget::grants_one_message`]). One and two lifted the
/// same cases of 1,600 explored, four two fewer; at any interval, sixteen workers' letters of one
/// recipient (ten allowed a message) went one grant at a time, and two replicas of them on a
/// 20 ms relay under 1,089 a second sent 2,689 recipients in 5 s where they had sent 5,081.
const ONE_MESSAGE_ROUND_TRIPS: i64 = 2;
/// Another replica that wrote the schedule within this span shares it.
const SHARED_SPAN: Duration = Duration::from_secs(1);
/// A rate this many times what a replica's workers use is far above them
/// ([`Budget::shares_a_rate_far_above`]): eight replicas at this one's pace would use a quarter
/// of it.
const FAR_ABOVE: f64 = 32.0;
/// The same for a grant a message ([`Budget::grants_one_message`]): a replica learns that
/// another wrote only from its own next write, and on a 2 s relay a replica writes about once a
/// transaction, so judged over [`SHARED_SPAN`] its first grant after each pause was sized for its
/// rate again and its rest passed (three replicas of eight under 1,097 recipients a minute,
/// letters of 1, 50 and 7: 93.1 % of what the sizes allow in order; 99.2 % judged over 5 s, the
/// same over 30 s, which lost a little more elsewhere).
const ONE_MESSAGE_SHARED_SPAN: Duration = Duration::from_secs(5);
/// The share of a replica's stock passing unused that makes it place each message where others
/// share the schedule ([`Budget::placing_round_trips`]). Lower than a stride's
/// (`pool::PASSING_SHARE`): two replicas of sixteen workers on a 20 ms relay under 1,089
/// recipients a second took runs of a tenth of a second in turn, each replica's workers used
/// 74 % of its runs at their pace and waited through the other's, and 26 % passing was below
/// the stride's share then, 30 % (4,223 recipients in 5 s; 5,081 placed one message at a
/// time). A fifth and a tenth changed that case alone in 1,600 explored.
const PLACING_PASSING_SHARE: f64 = 0.1;

/// When a message may be handed over: its final dot waits for `at`.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    /// From when the message may go: its unit, less the burst tolerance.
    pub at: Instant,
    /// Its unit's time: the message is late past it by more than [`Plan::late`].
    pub unit: Instant,
    /// When it was handed out: the transaction's preparation starts.
    pub issued: Instant,
    pub units: u32,
    /// How long it took to get it.
    pub waited: Duration,
    /// Its units as the quotas counted them, to give back if the message does not go on them.
    pub(crate) placed: Placed,
    /// No units were placed for it: the message takes them at its final dot, on time or not
    /// (see [`Budget::probe`]).
    pub unplaced: bool,
}

/// tokio's timers fire on a millisecond tick, and a little after it: in a debug build under load a
/// dot went 1.9 ms after its unit on average, 2.7 % of them over 4 ms, all of it eaten from the
/// guard that keeps a window within the budget at the relay. So a ticket is waited for on tokio's
/// timer until this long before its time, and the rest on a timerfd (`tokio-hrtime`), which
/// wakes within microseconds of its deadline.
const FINE_WAIT: Duration = Duration::from_millis(6);

impl Ticket {
    /// Waits until the message may go.
    pub async fn wait(&self) {
        if let Some(coarse) = self.at.checked_sub(FINE_WAIT) {
            tokio::time::sleep_until(coarse).await;
        }
        let left = self.at.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            tokio_hrtime::sleep(left).await;
        }
    }
}

/// The shared budget, as one replica uses it.
pub struct Budget {
    plan: Plan,
    ledger: Arc<dyn Ledger>,
    /// Locked only to move units, never across an await.
    pool: std::sync::Mutex<Pool>,
    /// One grant request at a time per replica; workers with nothing in the pool queue here. It
    /// holds the last state written or read, to try the next grant on.
    granting: tokio::sync::Mutex<Option<State>>,
    /// A background grant is on its way.
    refilling: AtomicBool,
    /// This replica's letters are running out (see [`Budget::letters_running_out`]).
    running_out: AtomicBool,
    /// The server's clock: until it is measured, nothing is decided (a host clock minutes ahead
    /// would write its first grant minutes into the server's future, and every replica would
    /// wait for it).
    clock: Clock,
    /// This budget measured the clock before its first decision.
    clock_measured: AtomicBool,
    waiting: AtomicUsize,
    /// Units of messages in preparation that will miss their units (see [`Budget::prepared`]):
    /// the next grant places as many for them, due as soon as they can arrive.
    doomed_units: AtomicUsize,
    available: AtomicBool,
    /// Recent slowest preparation of a transaction, in nanoseconds (see [`LEAD`]).
    preparation_ns: AtomicI64,
    /// The same, but the first measurement replaces the guess outright: how far ahead a unit
    /// must lie for a message still to be prepared to reach it (see [`Budget::cut_ns`]).
    reach_ns: AtomicI64,
    /// A preparation was measured: until then it is a guess.
    preparation_measured: AtomicBool,
    /// Woken when `preparation_measured` turns true (see [`Budget::probe`]).
    measured: tokio::sync::Notify,
    /// This replica wrote its first grant: the window's room is known (see [`Budget::probe`]).
    first_written: tokio::sync::watch::Sender<bool>,
    /// A message of this replica took units on the lead's first guess (see [`Budget::probe`]).
    probing: AtomicBool,
    /// The units the window had left at this replica's first write, less those of the messages
    /// sent unplaced since (see [`Budget::probe`]).
    unplaced_room: AtomicI64,
    /// How much earlier than a lead and an interval bulk takes its units (see `bulk_wait`).
    bulk_slack_ns: AtomicI64,
    /// Recent slowest grant round trip, in nanoseconds: what a stock must cover (the prefetch, a
    /// grant's size), so that a pool bridges a slow write.
    round_trip_ns: AtomicI64,
    /// The last few grant round trips, in nanoseconds (see [`Budget::record_round_trip`]).
    recent_round_trips: std::sync::Mutex<VecDeque<i64>>,
    /// Their median, taken once a grant so that the rules read it without the lock
    /// ([`Budget::counted_round_trip_ns`]), and a grant's margin for its own write.
    median_round_trip_ns: AtomicI64,
    /// The shortest round trip of the clock's readings (`i64::MAX`: none yet): how far away
    /// MongoDB is, whatever the load (see [`Budget::grant_timeout`]).
    distance_ns: AtomicI64,
    /// The schedule's next free unit as of this replica's last write (server nanoseconds).
    schedule_end_ns: AtomicI64,
    /// This replica, among those that share the schedule (`State::senders`).
    replica: u64,
    /// The version of the state this replica last wrote (0: none yet).
    written_version: AtomicI64,
    /// When this replica last found the state written by another (server nanoseconds).
    others_wrote_ns: AtomicI64,
    /// When this replica first wrote the schedule (server nanoseconds; `i64::MAX` before).
    first_wrote_ns: AtomicI64,
    /// The units of the last message that asked for some, and when one of another size asked
    /// (server nanoseconds; see [`Budget::grants_one_message`]).
    last_units: AtomicU32,
    sizes_differed_ns: AtomicI64,
    /// When this replica last found its stock passing unused with others sharing the schedule
    /// (see [`Budget::placing_round_trips`]).
    stock_passed_ns: AtomicI64,
    /// When the workers come back for their next message after a final dot ([`Returns`]), and
    /// the median of the last few returns (nanoseconds; `i64::MAX` before the first).
    returns: std::sync::Mutex<Returns>,
    return_ns: AtomicI64,
    /// Returns measured where workers queued for their turns, not yet asked for their units.
    queued_returns: AtomicUsize,
    /// A booking is on its way ([`Budget::book`]).
    booking: AtomicBool,
    /// The rate's window counted exactly had [`BOOKING_ROOM`] of its limit left at this
    /// replica's last write.
    window_roomy: AtomicBool,
    /// When a grant last found no room for this replica (server nanoseconds).
    told_to_wait_ns: AtomicI64,
    /// The units the last message still to be prepared asked for, and how many asked for as many
    /// in a row before it.
    asked_units: AtomicU32,
    same_sizes: AtomicU32,
    metrics: Arc<Metrics>,
}

/// What a grant came to: `Ok(None)` when units were added to the pool, `Ok(Some((until, window)))`
/// when the budget has none before `until` (server nanoseconds) because of `window`.
type Granted = anyhow::Result<Option<(i64, String)>>;

/// Which message units are asked for: where they must lie, and what may be handed to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// Still to be prepared: units a lead ahead, none it cannot reach a preparation from now.
    ToPrepare,
    /// At its final dot already (it missed its unit): units due as soon as they can arrive.
    AtDot,
    /// Still to be prepared by a worker that comes back for them `ahead_ns` from now, booked at
    /// its last dot ([`Budget::book`]): placed that much further ahead.
    Booked { ahead_ns: i64 },
}

impl Budget {
    /// For unit tests: a clock of its own, this host's.
    #[cfg(test)]
    pub fn new(plan: Plan, ledger: Arc<dyn Ledger>, metrics: Arc<Metrics>) -> Budget {
        Budget::with_clock(plan, ledger, Clock::default(), metrics)
    }

    /// The budget on the process's clock (see [`crate::clock`]), which it measures again through
    /// the ledger right before its first decision.
    pub fn with_clock(plan: Plan, ledger: Arc<dyn Ledger>, clock: Clock, metrics: Arc<Metrics>) -> Budget {
        metrics.budget_available.set(1);
        let mut pool = Pool::default();
        pool.charged_at_end = plan.exact.is_some();
        let guessed_preparation_ns = guessed_preparation(&plan).as_nanos() as i64;
        Budget {
            plan,
            ledger,
            pool: std::sync::Mutex::new(pool),
            granting: tokio::sync::Mutex::new(None),
            refilling: AtomicBool::new(false),
            running_out: AtomicBool::new(false),
            clock,
            clock_measured: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            doomed_units: AtomicUsize::new(0),
            available: AtomicBool::new(true),
            preparation_ns: AtomicI64::new(guessed_preparation_ns),
            reach_ns: AtomicI64::new(guessed_preparation_ns),
            preparation_measured: AtomicBool::new(false),
            measured: tokio::sync::Notify::new(),
            first_written: tokio::sync::watch::Sender::new(false),
            probing: AtomicBool::new(false),
            unplaced_room: AtomicI64::new(0),
            bulk_slack_ns: AtomicI64::new(0),
            round_trip_ns: AtomicI64::new(0),
            recent_round_trips: std::sync::Mutex::new(VecDeque::with_capacity(RECENT_ROUND_TRIPS)),
            median_round_trip_ns: AtomicI64::new(0),
            distance_ns: AtomicI64::new(i64::MAX),
            schedule_end_ns: AtomicI64::new(0),
            replica: rand::random(),
            written_version: AtomicI64::new(0),
            others_wrote_ns: AtomicI64::new(i64::MIN / 2),
            first_wrote_ns: AtomicI64::new(i64::MAX),
            last_units: AtomicU32::new(0),
            sizes_differed_ns: AtomicI64::new(i64::MIN / 2),
            stock_passed_ns: AtomicI64::new(i64::MIN / 2),
            returns: std::sync::Mutex::new(Returns::default()),
            return_ns: AtomicI64::new(i64::MAX),
            queued_returns: AtomicUsize::new(0),
            booking: AtomicBool::new(false),
            window_roomy: AtomicBool::new(false),
            told_to_wait_ns: AtomicI64::new(i64::MIN / 2),
            asked_units: AtomicU32::new(0),
            same_sizes: AtomicU32::new(0),
            metrics,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether the last attempt to reach the budget worked; for `/ready`.
    pub fn status(&self) -> Result<(), String> {
        match self.available.load(Ordering::Relaxed) {
            true => Ok(()),
            false => Err("the sending budget in MongoDB is unreachable: nothing is sent".to_owned()),
        }
    }

    /// The message did not go on `ticket`'s units (its dot came too late for them): they go back
    /// to the quotas with the next write. Where the budget is far above the load the pool always
    /// holds units about to pass, a message taking one is late for it, and half a daily quota
    /// went that way.
    pub fn missed(&self, ticket: &Ticket) {
        if ticket.unplaced {
            return;
        }
        self.pool().expire(ticket.placed);
        // Bulk takes its units an interval earlier for each miss (see `bulk_wait`).
        let interval = self.plan.interval_ns;
        let _ = self.bulk_slack_ns.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |slack| {
            Some((slack + interval).min(BULK_SLACK_MAX.as_nanos() as i64))
        });
    }

    /// A message went on its unit: the slack bulk keeps for slow moments shrinks by 1/64. And its
    /// worker will come back for its next message: where the units are booked ahead
    /// ([`Budget::books_ahead`]), the booking starts here.
    pub fn on_time(self: &Arc<Self>) {
        let _ = self.bulk_slack_ns.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |slack| Some(slack - slack / 64));
        if !self.measures_returns() {
            return;
        }
        let books = self.books_ahead(self.reading().now_ns());
        self.returns().dot(Instant::now(), books);
        if books {
            self.book();
        }
    }

    /// A transaction reached its final dot `took` after its ticket was handed out: follows a
    /// slower one at once, a faster one by a quarter of the difference.
    ///
    /// A preparation longer than the lead means that the messages handed units within it on the
    /// shorter lead will miss them too. The next grant places as many units for them, due as soon
    /// as they can arrive ([`Budget::take_for`]): otherwise the first message still to be
    /// prepared took the schedule's next unit a whole new lead ahead, and every message that
    /// missed came after it. Sixteen workers on a 2 s relay at 14 a second, where the first
    /// guess of the lead (100 ms) was a tenth of the preparation: 13 of the 16 first messages
    /// went at 2.5-3.4 s instead of by 2.3 s, and the run sent 93.2 % of what the workers carry
    /// over 30 s (with this, all of it). Not where the window is counted exactly: there a
    /// message takes the pool's first units whether it can reach them or not ([`Pool::take`]).
    pub fn prepared(&self, took: Duration) {
        let took = took.as_nanos().min(i64::MAX as u128) as i64;
        if took > self.lead_ns() && self.plan.exact.is_none() {
            let (now_ns, late_ns) = (self.reading().now_ns(), self.plan.late.as_nanos() as i64);
            let doomed = self.pool().doomed(now_ns, took, late_ns);
            self.doomed_units.fetch_add(doomed as usize, Ordering::Relaxed);
        }
        self.preparation_ns.store(follow(self.preparation_ns.load(Ordering::Relaxed), took), Ordering::Relaxed);
        let first = !self.preparation_measured.load(Ordering::Relaxed);
        let reach = match first {
            true => took,
            false => follow(self.reach_ns.load(Ordering::Relaxed), took),
        };
        self.reach_ns.store(reach, Ordering::Relaxed);
        if first && !self.preparation_measured.swap(true, Ordering::AcqRel) {
            self.measured.notify_waiters();
        }
    }

    /// Whether the workers' returns are measured: only where their units may be booked
    /// ([`Budget::books_ahead`]), so that other budgets pay no lock a message for them.
    fn measures_returns(&self) -> bool {
        self.window_counted_alone()
    }

    /// Whether the rate's window is counted exactly and no quota counts beside it.
    fn window_counted_alone(&self) -> bool {
        self.plan.exact.is_some() && self.plan.quotas.is_empty()
    }

    /// A worker asks for its next message's units at `at`.
    fn came_back(&self, at: Instant) {
        if let Some(return_ns) = self.returns().back(at) {
            self.return_ns.store(return_ns, Ordering::Relaxed);
        }
    }

    fn returns(&self) -> std::sync::MutexGuard<'_, Returns> {
        // Its operations cannot panic half-way, so a poisoned lock still holds consistent data.
        self.returns.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the units of a worker's next message are booked at its final dot, placed where
    /// it will be ready after it comes back: under a window counted exactly, where this
    /// replica asks for what its waiting workers need ([`Budget::stock_blocks`]) and its
    /// workers come back at least [`BOOKING_ROUND_TRIPS`] round trips after their dots. There
    /// every message waited for a grant's round trip before it was prepared, a tenth of a 20 ms
    /// send, and a stock placed a lead ahead passed before the workers came back for it (they
    /// come a send apart, after the units' reach): one replica of five workers on a 20 ms relay
    /// under 1,938 recipients a second, letters of one, sent 88.7 % of what its workers carry,
    /// the sweep's worst case.
    ///
    /// Only where a stock would block no one: this replica alone on the schedule for
    /// [`SHARED_SPAN`] (a booked unit holds the window's room from the dot on, a send earlier
    /// than asked for), the window a quarter empty or more at its last write and no grant told to
    /// wait within the span (the workers bind, not the rate), no quota (whose units a replica
    /// holds are no other's), [`BOOKING_SAME_SIZES`] messages of one size in a row (letters of
    /// 1, 50 and 7 under 1,979 recipients an hour, one worker: a booking sized for the last
    /// message held the room of a larger next, and 1,625 recipients went in 10 minutes where
    /// 1,979 did), its letters not running out, and a preparation within [`FAST_PREPARATION`]:
    /// on slower relays a round trip is a small share of a send.
    fn books_ahead(&self, now_ns: i64) -> bool {
        let return_ns = self.return_ns.load(Ordering::Relaxed);
        self.stock_blocks()
            && self.window_roomy.load(Ordering::Relaxed)
            && !within(&self.told_to_wait_ns, now_ns, SHARED_SPAN)
            && self.plan.quotas.is_empty()
            && !self.scarce()
            && self.alone(now_ns)
            && self.same_sizes.load(Ordering::Relaxed) >= BOOKING_SAME_SIZES
            && return_ns != i64::MAX
            && return_ns >= BOOKING_ROUND_TRIPS.saturating_mul(self.counted_round_trip_ns())
            && self.measured_preparation_ns().is_some_and(|took| took <= FAST_PREPARATION.as_nanos() as i64)
    }

    /// Books the units of the next messages of the workers whose dots went since the last
    /// booking, in the background and in one grant (a write a message was more than the ledger
    /// wrote for eleven workers on a 20 ms relay: 92.0 % of what they carry): the size of the
    /// last message each, placed for a message still to be prepared a return after the first of
    /// those dots, less half the lateness allowed. A dot that waits even a fraction of a
    /// millisecond for its unit waits for the timer's next millisecond, and each worker lost one
    /// a send (95.5 % over 10 s; 99.8 % so); half the guard early, a worker that comes back that
    /// much later still reaches the unit.
    fn book(self: &Arc<Self>) {
        if self.booking.swap(true, Ordering::AcqRel) {
            return;
        }
        let budget = self.clone();
        tokio::spawn(async move {
            loop {
                let mut granting = budget.granting.lock().await;
                let dots = std::mem::take(&mut budget.returns().unbooked);
                if let Some(first) = dots.first() {
                    let units = budget.asked_units.load(Ordering::Relaxed).max(1);
                    let want = units.saturating_mul(u32::try_from(dots.len()).unwrap_or(u32::MAX));
                    let since_ns = first.elapsed().as_nanos().min(i64::MAX as u128) as i64;
                    let ahead_ns =
                        (budget.return_ns.load(Ordering::Relaxed) - since_ns - budget.plan.late.as_nanos() as i64 / 2)
                            .max(1);
                    match budget.timed_grant(&mut granting, want, units.into(), Moment::Booked { ahead_ns }).await {
                        Ok(_) => budget.reachable(),
                        // The workers find out themselves, and say so, when they ask.
                        Err(error) => {
                            tracing::debug!(error = format!("{error:#}"), "budget booking failed");
                            *granting = None;
                        }
                    }
                }
                drop(granting);
                budget.booking.store(false, Ordering::Release);
                if budget.returns().unbooked.is_empty() || budget.booking.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        });
    }

    /// The units counted for messages that will miss theirs (see [`Budget::prepared`]), once.
    fn take_doomed(&self) -> u32 {
        self.doomed_units.swap(0, Ordering::Relaxed).try_into().unwrap_or(u32::MAX)
    }

    /// How long before its unit a transaction is opened: the recent slowest preparation and half
    /// again. A worker whose unit is further ahead waits before opening it, so the relay's DATA
    /// phase is never held open for the budget.
    pub fn lead(&self) -> Duration {
        Duration::from_nanos(self.lead_ns() as u64)
    }

    fn lead_ns(&self) -> i64 {
        let lead = self.preparation_ns.load(Ordering::Relaxed) * 3 / 2;
        // Only where units lie seconds apart: a longer lead than measured elsewhere was seen to
        // loosen the spacing of three replicas at 20/s (dots 42–59 ms apart for 50).
        let slow = match self.units_seconds_apart() {
            true => SLOW_LEAD.as_nanos() as i64,
            false => 0,
        };
        lead.clamp(LEAD_MIN.as_nanos() as i64, LEAD_MAX.as_nanos() as i64).max(slow)
    }

    /// Where units lie [`SLOW_LEAD`] twice or more apart, a unit missed costs an interval of
    /// seconds: grants keep the slow lead there.
    fn units_seconds_apart(&self) -> bool {
        self.plan.interval_ns >= 2 * SLOW_LEAD.as_nanos() as i64
    }

    /// How far ahead a grant for messages still to be prepared places its first unit (less the
    /// round trip): a lead, but no further than where a message prepared in the recent slowest
    /// time may use it (the burst's tolerance before its place). Its half a preparation of
    /// margin over that was waited at every dot where units are not scarce, since each message
    /// took a fresh grant a lead ahead: with `BURST=1` and the rate left high, one worker on a
    /// 20 ms relay sent 173 letters in 5 s at 40,000 a second against 240 at 736, and six on a
    /// 300 ms relay 480 in 30 s at 100 a second and above against 588 at 50. Where the
    /// schedule runs ahead, its end places the units and this changes nothing. Where units lie
    /// seconds apart the slow lead stays: a message that misses its unit waits an interval.
    fn placing_lead_ns(&self) -> i64 {
        let lead_ns = self.lead_ns();
        match self.measured_preparation_ns() {
            Some(preparation_ns) if !self.units_seconds_apart() => {
                preparation_ns.saturating_add(self.plan.tolerance_ns).clamp(LEAD_MIN.as_nanos() as i64, lead_ns)
            }
            _ => lead_ns,
        }
    }

    /// The recent slowest preparation, once a transaction has measured one (before, it is a
    /// guess from [`LEAD`]).
    fn measured_preparation_ns(&self) -> Option<i64> {
        self.preparation_measured.load(Ordering::Relaxed).then(|| self.preparation_ns.load(Ordering::Relaxed))
    }

    /// How long a bulk message waits before it takes its units: bulk takes the pool's next unit
    /// it can reach only a lead and an interval before it may be used, so that a transactional
    /// letter arriving meanwhile takes the one after it, not one behind every worker's ticket
    /// (eight workers at 100/s held units up to 80 ms ahead; at 1/s, eight seconds). Two leads
    /// were needed while a message took the pool's next unit whether it could reach it or not
    /// (figure 5 gave up 514 units with one lead); since it takes none before its preparation
    /// ends ([`Budget::cut_ns`]), one lead gave up a median of 188 units in seven runs of figure 5
    /// on a loaded machine against 274 with two, and a held unit costs scarce workers less
    /// (three replicas of four on a 300 ms relay at 20/s: 88.0 % → 98.8 %). And a slack that grows
    /// by an interval with every unit missed and shrinks with every unit kept: on a machine
    /// that stalls (three replicas in a debug build beside other tests), 9 % of the dots came
    /// late and the rate fell 10 %; there bulk goes back towards holding units well ahead, up
    /// to [`BULK_SLACK_MAX`], and a quiet machine keeps the tight turn. `None` when it need not
    /// wait: the next unit is near, the pool holds loose units, or the rate's window is counted
    /// exactly: there a message goes where the window has room for it, mostly well after the
    /// schedule's end, so a worker waited for the schedule's end and then again for the room,
    /// one at a time per replica (SES's 14 recipients a second with letters of 1 to 10, three
    /// replicas of four workers: 80 % of what the sizes allow, 101 % without the wait).
    pub fn bulk_wait(&self) -> Option<Duration> {
        if self.plan.exact.is_some() {
            return None;
        }
        let now_ns = self.reading().now_ns();
        let pool = self.pool();
        if !pool.loose.is_empty() {
            return None;
        }
        // With none in the pool, the next grant starts where this replica's last one left the
        // schedule (or at another replica's returned units, earlier): at slow rates each grant
        // is a unit or two, and eight bulk workers asking in turn still took eight of them.
        let next_ns = pool.next_usable(self.cut_ns(now_ns, Moment::ToPrepare), &self.plan);
        drop(pool);
        let usable_ns =
            next_ns.unwrap_or_else(|| self.schedule_end_ns.load(Ordering::Relaxed) - self.plan.tolerance_ns);
        let ahead_ns = self.lead_ns() + self.plan.interval_ns + self.bulk_slack_ns.load(Ordering::Relaxed);
        let wait_ns = usable_ns - ahead_ns - now_ns;
        (wait_ns > 0).then(|| Duration::from_nanos(wait_ns as u64))
    }

    /// The clock the budget's times are on.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn reading(&self) -> Reading {
        self.clock.reading()
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        // Pool operations cannot panic half-way, so a poisoned lock still holds consistent data.
        self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a worker that will ask for units, while it waits for its turn to: grants are sized
    /// for the workers waiting, and bulk workers ask one at a time (`RateLimit::bulk_turn`), so
    /// counted only once inside [`Budget::take`] a replica whose budget lets units go long before
    /// their places (a burst over a long tolerance) got one unit per round trip, and at 518 a
    /// second with a burst of 275 sent the rate but never the burst.
    ///
    /// The worker's return after its last dot is measured here, not once its turn comes
    /// ([`Returns`]): behind a grant whose write stalled 300 ms, ten of eleven workers waited
    /// 294 ms for their turns, measured then the next units were booked 300 ms ahead, and each
    /// stall cost twice its length (one replica of eleven workers on a 20 ms relay under 1,042
    /// recipients a second, a stall a second: 55 % of what they carry in 5 s, 72.5 % before
    /// bookings, 81.0 % so).
    pub fn queued(&self) -> Queued<'_> {
        if self.measures_returns() {
            self.came_back(Instant::now());
            self.queued_returns.fetch_add(1, Ordering::Relaxed);
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Queued { _waiting: Decrement(&self.waiting) }
    }

    /// Waits until `units` consecutive units are granted to this replica for a message about to
    /// be prepared; the message they pay for is handed over at the ticket's time. Cancel-safe:
    /// dropping the future loses nothing but the units it was given.
    pub async fn take(self: &Arc<Self>, units: u32) -> Ticket {
        self.take_for(units, units, Moment::ToPrepare).await
    }

    /// As [`Budget::take`], for a transaction that may carry fewer recipients than `units` (the
    /// rest of its letter goes in the next): the ticket's `units` say how many, at least one. A
    /// window counted in recipients that has room for fewer than a whole transaction lends that
    /// room to part of it, rather than leave it to pass: under SES's 14 recipients a second,
    /// letters of 50 went as 14, 14, 14 and 8, and the second of the 8 left 6 unused (12.5 a
    /// second). Only where [`Plan::splits_transactions`].
    pub async fn take_up_to(self: &Arc<Self>, units: u32) -> Ticket {
        let least = match self.plan.splits_transactions() {
            true => 1,
            false => units,
        };
        self.take_for(least, units, Moment::ToPrepare).await
    }

    /// As [`Budget::take`], for a message already at its final dot (it was late for its unit):
    /// units due at once are of use to it.
    pub async fn take_ready(self: &Arc<Self>, units: u32) -> Ticket {
        self.take_for(units, units, Moment::AtDot).await
    }

    /// The first moment a unit of use to a message is due: a message still to be prepared
    /// reaches its dot a preparation from now, and a unit due before that, less the lateness
    /// allowed, is missed. Handed such units from a pool stocked ahead, workers missed them,
    /// lost them and took others half a second ahead with the DATA phase open (three replicas
    /// of four workers on a 300 ms relay at 30 a second: 59.6 % of the rate); left in the pool
    /// they serve messages that are ready, and pass.
    ///
    /// Never further than a lead: grants start a lead ahead, and a relay that slowed every
    /// transaction past a second (Postfix sleeping after its rate limit's 450s) made the
    /// preparation longer than the longest lead, every grant fell short of the cut, and the
    /// replica asked for grants in a loop and sent nothing again.
    ///
    /// The preparation here is the reach (`reach_ns`), which the first measurement sets outright:
    /// the estimate falls from its first guess (67 ms then; [`guessed_preparation`]) by a quarter
    /// of the difference a message, and the cut with it kept every message of a fast relay from
    /// the units within the guess, so each waited out what was left of it: three replicas of one
    /// worker on a 1 ms relay under 1,669 recipients a second sent 67 recipients in their first
    /// 400 ms where the rate brings 667, and 89.7 % of what the sizes allow in 5 s (451 and
    /// 94.1 % so). The estimate itself keeps its pace: taken outright for the lead and the
    /// grants' places too, it moved the bookings of windows counted exactly and the lanes of
    /// replicas that start together (one replica of seven workers at 1,858 recipients a second
    /// 100 → 86.5 %; three of three at 514 letters a second 96.5 → 68.3 %).
    fn cut_ns(&self, now_ns: i64, moment: Moment) -> i64 {
        let late_ns = self.plan.late.as_nanos() as i64;
        match moment {
            Moment::AtDot => now_ns - late_ns,
            Moment::ToPrepare | Moment::Booked { .. } => {
                now_ns - late_ns + self.reach_ns.load(Ordering::Relaxed).clamp(0, self.lead_ns())
            }
        }
    }

    /// The recent slowest preparation, never longer than the lead, for the reason
    /// [`Budget::cut_ns`] gives for its reach.
    fn preparation_within_lead_ns(&self) -> i64 {
        self.preparation_ns.load(Ordering::Relaxed).clamp(0, self.lead_ns())
    }

    /// Where the rate's window is counted exactly (and no quota counts beside it), the first
    /// message of this replica takes its units on the lead's first guess, and the others, until
    /// a preparation is measured, go unplaced: they prepare at once and ask for their units at
    /// their final dots ([`Budget::take_ready`]), as many units as the window had room for at
    /// the first message's write and the schedule places within a [`LEAD`]. A message that
    /// reaches its dot too late for its units loses them to that
    /// window: by the time it asks again the schedule, at eight times the rate, has placed the
    /// next window's units, and it waits for those. Where every worker took units on the guess
    /// and the relay's preparations outlasted it, most of the first window was lost: 782
    /// recipients a second, three replicas of sixteen on a 300 ms relay, sent 380 in the first
    /// second and 89.2 % of the rate in 5 s (98.9 % so). Waiting for the measurement instead
    /// cost the slow relays a preparation and a lead (121 a second, three replicas of nine on a
    /// 2 s relay: 76.3 % of what the workers carry in 5 s).
    ///
    /// Beyond those units a message takes its units as ever: unplaced, it would hold the
    /// relay's DATA phase open while the schedule brought them. Under 53 recipients a minute,
    /// whose units lie 141 ms apart at eight times the rate, unplaced messages waited seconds
    /// at their dots, and three replicas of six on a 20 ms relay sent 86.2 % of the rate in
    /// three minutes (100 % as ever).
    ///
    /// Except where the schedule places the whole window within two leads
    /// ([`Budget::window_within_two_leads`]): there a message beyond those units waits for the
    /// replica's first preparation to be measured (at most [`PROBE_WAIT`]) and then takes its
    /// units placed. On the guess, the units of the window after the promised ones went to
    /// messages that would miss them, and the promised ones, asked for at their dots, found the
    /// window spent: under 22 recipients a second, three replicas of thirteen on a 300 ms relay
    /// sent 14 recipients in the first second and 87.3 % of the rate in 5 s (96.4 % so). Where
    /// the window is longer, the missed units are placed again in it, and waiting cost the 2 s
    /// relays a preparation (398 recipients per 10 s, one replica of fourteen on a 2 s relay:
    /// 96.5 % of the rate in 30 s, 100 % on the guess).
    async fn probe(&self, units: u32) -> Option<Ticket> {
        if !self.window_counted_alone()
            || self.preparation_measured.load(Ordering::Relaxed)
            || !self.probing.swap(true, Ordering::AcqRel)
        {
            return None;
        }
        let mut written = self.first_written.subscribe();
        // A database that does not answer holds the others this long, and no longer.
        if tokio::time::timeout(PROBE_WAIT, written.wait_for(|written| *written)).await.is_err()
            || self.preparation_measured.load(Ordering::Relaxed)
        {
            return None;
        }
        if self.unplaced_room.fetch_sub(i64::from(units), Ordering::Relaxed) < i64::from(units) {
            if self.window_within_two_leads() {
                let measured = self.measured.notified();
                tokio::pin!(measured);
                measured.as_mut().enable();
                if !self.preparation_measured.load(Ordering::Acquire) {
                    let _ = tokio::time::timeout(PROBE_WAIT, measured).await;
                }
            }
            return None;
        }
        let now = Instant::now();
        Some(Ticket {
            at: now,
            unit: now,
            issued: now,
            units,
            waited: Duration::ZERO,
            placed: Placed::at(0, 0),
            unplaced: true,
        })
    }

    /// Whether the schedule, at its pace, places the rate's whole window within two leads: there
    /// a message's units placed on the lead's first guess lie in the window its replica's
    /// unplaced messages take their units from at their dots, and if the relay prepares longer
    /// than the guess, they are missed and the window is lost (see [`Budget::probe`]).
    fn window_within_two_leads(&self) -> bool {
        self.plan.exact.as_ref().is_some_and(|window| i64::from(window.limit) < 2 * self.units_in_a_lead())
    }

    /// The units the schedule places within a [`LEAD`], at its pace.
    fn units_in_a_lead(&self) -> i64 {
        LEAD.as_nanos() as i64 / self.plan.interval_ns
    }

    /// At least `least` and up to `units` consecutive units for one message.
    async fn take_for(self: &Arc<Self>, least: u32, units: u32, moment: Moment) -> Ticket {
        if moment == Moment::ToPrepare
            && let Some(unplaced) = self.probe(units).await
        {
            return unplaced;
        }
        let asked = Instant::now();
        if moment == Moment::ToPrepare && self.measures_returns() {
            // Measured already where the worker queued for its turn.
            if self.queued_returns.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_err() {
                self.came_back(asked);
            }
            match self.asked_units.swap(units, Ordering::Relaxed) == units {
                true => self.same_sizes.fetch_add(1, Ordering::Relaxed),
                false => self.same_sizes.swap(0, Ordering::Relaxed),
            };
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Decrement(&self.waiting);
        // Grants that left nothing usable in a row: never a busy loop of round trips.
        let mut fruitless = 0;
        // A part of the message only once its own grant has judged one worth it (`decide`): the
        // runs other workers' grants left in the pool cut messages into parts where the workers,
        // not the window, bound (nine workers on a 2 s relay at 1,018 recipients a second,
        // letters of 1, 50 and 7: 251 recipients in 5 s where whole messages sent 348).
        let mut fewest = units;
        loop {
            if let Some(ticket) = self.from_pool(fewest, units, asked, moment) {
                return ticket;
            }
            let mut granting = self.granting.lock().await;
            // A background grant, or another worker's, may have landed while this one queued.
            if let Some(ticket) = self.from_pool(fewest, units, asked, moment) {
                return ticket;
            }
            // Messages in preparation that will miss their units (see `prepared`) take the
            // schedule's next units before this message takes one a lead ahead of them; a
            // message at its dot asks for theirs with its own.
            let doomed = self.take_doomed();
            if doomed > 0 && moment == Moment::ToPrepare {
                if self.timed_grant(&mut granting, doomed, 1.into(), Moment::AtDot).await.is_err() {
                    *granting = None;
                }
                continue;
            }
            let clock = self.reading();
            let waiting = self.waiting.load(Ordering::Relaxed);
            // Two statements: the pool's lock is held to the end of the first.
            let mut want = self.pool().want(units, waiting, &self.plan, self.round_trip());
            want = want.max(self.spanning_units(clock.now_ns()));
            if self.asks_as_needed(clock.now_ns()) {
                let queued = units.saturating_mul(waiting.max(1) as u32);
                want = want.min(queued.saturating_add(self.units_within_round_trip(clock.now_ns())));
            }
            let previous = self.last_units.swap(units, Ordering::Relaxed);
            if previous != 0 && previous != units {
                self.sizes_differed_ns.store(clock.now_ns(), Ordering::Relaxed);
            }
            if self.grants_one_message(clock.now_ns(), units) {
                want = units;
            }
            // A message at its dot asks for its own units alone: placed for it, two round trips
            // ahead, they would pass before any message still to be prepared came for them.
            if moment == Moment::AtDot {
                want = units + doomed;
            }
            let held = self.pool().held_to_end(self.cut_ns(clock.now_ns(), moment), &self.plan);
            // A message still to be prepared may take units that pass during its preparation.
            let early_ns = match moment {
                Moment::ToPrepare | Moment::Booked { .. } => self.preparation_within_lead_ns(),
                Moment::AtDot => 0,
            };
            let need = Need { least, message: units, held, early_ns };
            match self.timed_grant(&mut granting, want, need, moment).await {
                Ok(None) => {
                    fewest = least;
                    fruitless += 1;
                    self.reachable();
                    // The pause comes before the next grant, not between this one and the pool:
                    // a grant places its units a lead and a round trip ahead, within the guard
                    // of what a message still to be prepared can reach, and looked at 50 ms
                    // later they were out of its reach every time. After two stalled writes,
                    // one replica of eight workers on a 2 s relay under a quota of 343 a minute
                    // asked for a grant every 52 ms for the rest of the run and sent nothing
                    // (24 % of what it carries). And the lock on grants is let go for the pause,
                    // so that the other workers' grants go on meanwhile.
                    if fruitless > 2 {
                        drop(granting);
                        if let Some(ticket) = self.from_pool(fewest, units, asked, moment) {
                            return ticket;
                        }
                        tracing::warn!(fruitless, "budget grants arrive already past; slowing down");
                        tokio::time::sleep(RETRY / 10).await;
                    }
                }
                Ok(Some((until_ns, window))) => {
                    self.reachable();
                    tracing::debug!(window = %window, wait_ms = (until_ns - clock.now_ns()) / 1_000_000, "budget exhausted; waiting");
                    // Re-checked at least every second: a change of configuration, another
                    // replica returning units.
                    let until = clock.instant(until_ns).min(Instant::now() + Duration::from_secs(1));
                    tokio::time::sleep_until(until).await;
                }
                Err(error) => {
                    if self.available.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "the sending budget in MongoDB is unreachable: sending stops until it answers"
                        );
                    }
                    self.metrics.budget_available.set(0);
                    *granting = None;
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    fn reachable(&self) {
        if !self.available.swap(true, Ordering::Relaxed) {
            tracing::info!("the sending budget is reachable again: sending resumes");
        }
        self.metrics.budget_available.set(1);
    }

    /// A ticket from the units already granted, if there are any; starts the next grant in the
    /// background when the pool runs low.
    fn from_pool(self: &Arc<Self>, least: u32, units: u32, asked: Instant, moment: Moment) -> Option<Ticket> {
        let clock = self.reading();
        let now_ns = clock.now_ns();
        let lead_ns = self.lead_ns();
        // Units past by more than the lateness allowed expire: a message on them would be late, and could
        // crowd the next window. Grants start a lead and a round trip ahead, so fresh units
        // are not past.
        let late_ns = self.plan.late.as_nanos() as i64;
        let mut pool = self.pool();
        // Loose units must last until the message is at its dot: a lead from now, or now for
        // one there already (its grant's loose units last two round trips and the span).
        let ready_ns = match moment {
            Moment::AtDot => now_ns,
            Moment::ToPrepare | Moment::Booked { .. } => now_ns + lead_ns,
        };
        let cut_ns = self.cut_ns(now_ns, moment);
        let (taken, placed) = pool.take_some(least, units, &self.plan, now_ns - late_ns, cut_ns, ready_ns)?;
        let units = placed.count;
        if let (Moment::ToPrepare, Taken::At { due_ns, .. }) = (moment, taken) {
            pool.record(now_ns, due_ns, units, LEAD_MAX.as_nanos() as i64);
        }
        if self.wants_background_grant(pool, now_ns) {
            self.refill();
        }
        let issued = Instant::now();
        let (at, unit) = match taken {
            Taken::At { usable_ns, due_ns } => (clock.instant(usable_ns), clock.instant(due_ns)),
            // Any moment until then: the lateness allowed past `unit` brings it to `until`.
            Taken::Until(until_ns) => (issued, clock.instant(until_ns - late_ns)),
        };
        Some(Ticket { at, unit, issued, units, waited: asked.elapsed(), placed, unplaced: false })
    }

    /// Asks for the next grant in the background, unless one is on its way already, so that the
    /// round trip to MongoDB is not spent waiting on the sending path.
    ///
    /// Told to wait for the schedule's end a moment ahead, it asks again at that moment, once,
    /// where this replica's workers take units further apart than the wait
    /// ([`Budget::asks_again_at`]). Left to its workers' next take, a replica of one worker on a
    /// 20 ms relay, beside two others under 1,016 a second, held strided runs of about 65 ms; its
    /// refill, told to wait 13 ms for the others' grants, asked again only 20 ms later, and the
    /// message prepared meanwhile waited for the grant's first unit a lead after that: one message
    /// in six or seven waited 8–9 ms, and over 30 s the workers sent 94.4 % of what they carry
    /// (99.6 % now, `a_refill_told_to_wait_asks_again_when_the_schedule_lets_it`).
    fn refill(self: &Arc<Self>) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let budget = self.clone();
        tokio::spawn(async move {
            if let Some(until_ns) = budget.refill_once().await {
                let clock = budget.reading();
                if budget.asks_again_at(clock.now_ns(), until_ns) {
                    tokio::time::sleep_until(clock.instant(until_ns)).await;
                    if budget.wants_background_grant(budget.pool(), budget.reading().now_ns()) {
                        budget.refill_once().await;
                    }
                }
            }
            budget.refilling.store(false, Ordering::Release);
        });
    }

    /// Whether the next grant should be asked for in the background: `pool` covers less than the
    /// prefetch span, and this replica does not ask only as its workers need
    /// ([`Budget::asks_as_needed`], which takes the pool's lock too: the guard is released first).
    fn wants_background_grant(&self, pool: std::sync::MutexGuard<'_, Pool>, now_ns: i64) -> bool {
        let low = pool.low(now_ns, now_ns + self.prefetch_ns(), self.plan.interval_ns);
        drop(pool);
        low && !self.asks_as_needed(now_ns)
    }

    /// One background grant ([`Budget::refill`]); where the schedule said to wait, until when.
    async fn refill_once(&self) -> Option<i64> {
        // A worker already asking for one does the same.
        let Ok(mut granting) = self.granting.try_lock() else { return None };
        // For the workers queued for units too: where units are asked for only as the workers
        // waiting need them (a burst over a long tolerance), a refill for none of them was one
        // unit a round trip.
        let waiting = self.waiting.load(Ordering::Relaxed);
        // Or for the messages about to miss their units first (see `prepared`).
        let (want, moment) = match self.take_doomed() {
            0 => {
                let want = self.pool().want(1, waiting, &self.plan, self.round_trip());
                (want.max(self.spanning_units(self.reading().now_ns())), Moment::ToPrepare)
            }
            doomed => (doomed, Moment::AtDot),
        };
        match self.timed_grant(&mut granting, want, 1.into(), moment).await {
            Ok(wait) => {
                self.reachable();
                wait.map(|(until_ns, _)| until_ns)
            }
            // The workers find out themselves, and say so, when they need the next grant.
            Err(error) => {
                tracing::debug!(error = format!("{error:#}"), "background budget grant failed");
                *granting = None;
                None
            }
        }
    }

    /// Whether a background grant told to wait until `until_ns` asks again then
    /// ([`Budget::refill`]): the wait ends within the span the pool should cover, and this
    /// replica's workers take units further apart than the wait, so none of them would ask
    /// sooner. Where they take them more often, the next take asks anyway, and a second ask
    /// only moved the grants: asked again whatever the workers, two replicas of thirteen on a
    /// 20 ms relay under 1,665 a second sent 97.1 → 92.7 % of what they carry in 5 s with the
    /// ledger's writes stalling (`SIM_STALLS=1000:300`), and without stalls 12 of the 6,100
    /// explored cases were below 95 % where 11 are.
    fn asks_again_at(&self, now_ns: i64, until_ns: i64) -> bool {
        let wait_ns = until_ns - now_ns;
        let used = self.pool().rate();
        wait_ns <= self.prefetch_ns() && used > 0.0 && (wait_ns as f64) < 1e9 / used
    }

    /// The send stage says whether this replica's letters are running out (a worker found none
    /// waiting). While they are, it asks for no more units than the workers asking need and none
    /// ahead of time: units asked for by the rate this replica sent at would pass unused, and
    /// under loose grants (a budget far above the load) nothing changes.
    pub fn letters_running_out(&self, running_out: bool) {
        self.running_out.store(running_out, Ordering::Relaxed);
    }

    /// Where the rate is far above what a replica's workers use, the units that cover the pool's
    /// prefetch span ([`Budget::prefetch_ns`]) in time, whatever the workers use: only where any
    /// place may go to any replica (`BURST=1`, no quota, no window counted exactly), and the
    /// replica has had the schedule to itself for [`SHARED_SPAN`] or shares a rate far above it
    /// ([`Budget::shares_a_rate_far_above`]). A grant sized by what the workers use is a run at
    /// the rate's pace, and there it spans a moment: at 40,000 a second, 98 units in 2.5 ms, which
    /// passed before the workers came back from their 20 ms sends. Every worker then waited at
    /// once for a round trip and a lead, each round: one replica of fourteen on a 20 ms relay
    /// under 23,635 a second sent 602-616 letters a second of the 700 they carry (86.9 %; at
    /// 43,390 the same, and three workers at 12,790), and 700 so. The units between pass, which
    /// costs no one: alone, no other replica wrote the schedule for a second; shared, the grant is
    /// strided and the lanes between go to the others (`schedule::decide`), each covering the same
    /// span. Alone, not from the start: replicas started together each found the schedule their
    /// own, and their spans lay end to end (three replicas of eight on a 20 ms relay under 960 a
    /// second: 94.9 → 92.0 % in 5 s).
    ///
    /// Shared, the span counts the usual round trip ([`Budget::counted_round_trip_ns`]), not the
    /// recent slowest that sizes the stock: after a write stalled 300 ms, a replica's grant
    /// reached half a second ahead, and the other, told by its last write that the schedule's end
    /// lay that far ahead ([`Budget::far_ahead`]), asked only as its workers needed while the
    /// lanes beside that grant passed (two replicas of sixteen on a 20 ms relay under 33,220 a
    /// second: 89.7 % of what they carry in 5 s, a write stalled each second). Alone, a span that
    /// read the stall bridges the next one: with the usual round trip there too, one replica of
    /// two workers under 1,445 a second fell from 100.7 to 89.6 %.
    fn spanning_units(&self, now_ns: i64) -> u32 {
        if !schedule::uncounted_places(&self.plan) {
            return 0;
        }
        let span_ns = match self.alone(now_ns) {
            true => self.prefetch_ns(),
            false if self.shares_a_rate_far_above(now_ns) => self.covering_ns(self.counted_round_trip_ns()),
            false => return 0,
        };
        (span_ns / self.plan.interval_ns).clamp(0, i64::from(self.plan.max_grant)) as u32
    }

    /// Whether another replica wrote the schedule within [`SHARED_SPAN`], the rate is
    /// [`FAR_ABOVE`] times what this replica's workers use or more, and any place may go to any
    /// replica with letters of one unit: there its grants cover a span in time
    /// ([`Budget::spanning_units`]) and are strided, every m-th unit for m replicas. Runs at the
    /// rate's pace passed before the workers came back, and the stride a replica takes once its
    /// units pass divides the pace by three at most here: three replicas of eight on a 20 ms
    /// relay under 40,000 a second sent 888 letters a second of the 1,200 they carry (74 %).
    fn shares_a_rate_far_above(&self, now_ns: i64) -> bool {
        if self.plan.largest_cost > 1
            || !schedule::uncounted_places(&self.plan)
            || !self.others_wrote_within(now_ns, SHARED_SPAN)
        {
            return false;
        }
        let used = self.pool().rate();
        used > 0.0 && used * FAR_ABOVE < 1e9 / self.plan.interval_ns as f64
    }

    /// How far ahead the pool should cover: the lead, two round trips and a margin.
    fn prefetch_ns(&self) -> i64 {
        self.covering_ns(self.round_trip_ns.load(Ordering::Relaxed))
    }

    /// A lead, two round trips of `round_trip_ns` and a margin: the span a replica's stock covers.
    fn covering_ns(&self, round_trip_ns: i64) -> i64 {
        self.lead_ns() + 2 * round_trip_ns + PREFETCH_MARGIN.as_nanos() as i64
    }

    /// Whether the schedule's next free unit lies further ahead than the pool needs to cover and a
    /// lookahead more: the workers of the deployment together hold the budget's units that far
    /// ahead (more of them than the rate needs), and a worker that asks gets a unit at the
    /// schedule's end after a round trip as it would from a pool stocked ahead of time. Stocked
    /// units then only wait in the pool while this replica's workers are busy, and pass unused
    /// (three replicas of four workers on a 300 ms relay used 66 % of 14 a second): a replica
    /// asks for what its waiting workers need, and nothing in the background.
    ///
    /// Under a burst, as soon as the schedule's end is usable only after a message prepared now
    /// would be ready: a grant's units lie an interval apart, the workers of one replica come
    /// for them at their own, slower pace, and a unit passes unused once a preparation from now
    /// lies beyond it. The replicas' stock then took the whole rate while their workers used two
    /// thirds of it, every grant started past the lead, and each message waited at its dot: three
    /// replicas of six workers on a 300 ms relay at 90 a second with a burst of 15, 92.2 % of
    /// what the workers carry (97.5 % asking as needed, for 85 grants in 5 s instead of 81). A
    /// fast relay's grants are used before they pass, and its schedule's end stays near (1,000 a
    /// second with a burst of 50, eight workers on a 20 ms relay: 49 grants either way). Not
    /// without a burst: there a grant starts a lead, half a preparation more, ahead anyway, and
    /// a round trip per message cost the grid's three replicas of four at 30 a second 5 % of it.
    fn far_ahead(&self, now_ns: i64) -> bool {
        let end_ns = self.schedule_end_ns.load(Ordering::Relaxed);
        let beyond_ns = match self.plan.tolerance_ns {
            0 => self.prefetch_ns() + LOOKAHEAD.as_nanos() as i64,
            _ => {
                self.preparation_within_lead_ns()
                    + self.round_trip_ns.load(Ordering::Relaxed)
                    + PREFETCH_MARGIN.as_nanos() as i64
            }
        };
        self.plan.loose_max == 0 && self.plan.exact.is_none() && end_ns - self.plan.tolerance_ns - now_ns > beyond_ns
    }

    /// Whether units stocked ahead of the workers would hold room others could use: where the
    /// rate's window is counted exactly, a grant is charged where its last unit lies, so units a
    /// replica holds while its workers are busy fill the window until they pass unused and go
    /// back. Three replicas of four workers on a 300 ms relay sent 7 letters in SES's first
    /// second of 14 and 81 % of the rate after, with the schedule at eight times the rate. There
    /// a replica asks for what its waiting workers need, as it does far ahead, unless its stock
    /// is used in time ([`Budget::stock_used_in_time`]).
    fn stock_blocks(&self) -> bool {
        self.plan.exact.is_some() && !self.stock_used_in_time()
    }

    /// Whether this replica's stock is used before it blocks anyone: where the pace is kept (a
    /// burst), no quota counts the units a replica holds, and its messages are prepared within
    /// [`FAST_PREPARATION`], its workers come for the units within moments. Asking for each
    /// message's units as it starts cost every message a grant's round trip on the sending path,
    /// a fifth of a 20 ms send: two replicas of three workers on a 20 ms relay under 1,442
    /// recipients a second with a burst of 265 sent 1,132 of the 1,466 their workers carry (1,466
    /// so). Not on slower relays: stocked on every relay (tried at the eighth stop), three
    /// replicas of twelve on a 2 s relay under 519 per 10 s went 94.3 → 90.2 %. Not without a
    /// burst, where the window is the rate's own and a stock taken for a letter of one recipient
    /// held the room of the next of ten (SES's 14 a second, one worker on a 1 ms relay: 100 →
    /// 88.1 % of what the sizes allow in order). Not under a quota, whose units a replica holds
    /// are no other's until they pass (943 a second with a burst of 51 beside 164 per 10
    /// minutes, two replicas of fourteen: 100.7 → 87.6 %).
    fn stock_used_in_time(&self) -> bool {
        self.plan.pace.is_some()
            && self.plan.quotas.is_empty()
            && self.measured_preparation_ns().is_some_and(|took| took <= FAST_PREPARATION.as_nanos() as i64)
    }

    /// Whether this replica asks only for what its waiting workers need, with no grant in the
    /// background: its letters are running out, the schedule is far ahead, stock would block,
    /// stock would pass its reach unused, or each message is placed as it starts.
    fn asks_as_needed(&self, now_ns: i64) -> bool {
        self.scarce()
            || self.far_ahead(now_ns)
            || self.stock_blocks()
            || self.short_reach()
            || self.places_each_message(now_ns)
    }

    /// Whether each message's unit is asked for as the message starts, placed where it will be
    /// ready, and none stocked: where any place may go to any replica (`BURST=1`, no quota, no
    /// window counted exactly) and a preparation is longer than [`Budget::placing_round_trips`]
    /// round trips, so that the round trip costs little. There units stocked ahead of the workers were
    /// a guess at when they would come, made from the rate this replica used. Between
    /// replicas it went wrong both ways: a worker's grant and the refill after it, a round trip
    /// apart, read one unit in 4 ms as 250 a second, the replica's grants took the schedule a
    /// second ahead, and the other replicas' messages waited at their dots for units after them,
    /// or before they took any (three replicas of one worker on a 300 ms relay at 1,710 a
    /// minute: 76.5 % of what they carry); stocks that passed unused made strided grants whose
    /// holes went to whichever replica asked next. Placed one message at a time, `SIM_BURST1`
    /// explorations fell from 47 cases below 95 % to 5, all of them on relays of 20 ms or less,
    /// where a round trip a message would cost more than it saves. The ledger then takes a
    /// write a letter, at the workers' pace at most.
    fn places_each_message(&self, now_ns: i64) -> bool {
        schedule::uncounted_places(&self.plan)
            && self.measured_preparation_ns().is_some_and(|preparation_ns| {
                preparation_ns > self.placing_round_trips(now_ns).saturating_mul(self.counted_round_trip_ns())
            })
    }

    /// Where each message is placed as it starts ([`Budget::places_each_message`]), the whole
    /// units this replica's workers use within a grant's round trip: a grant for the workers
    /// waiting holds that many more. There the ledger takes a write a grant, and where the workers
    /// come for more than a unit a round trip, the writes follow one another: each grant placed
    /// its first unit a lead from when it was asked, past the schedule's end, and the units
    /// between went to no one. Two replicas of sixteen workers on a 20 ms relay under 1,089
    /// recipients a second, letters of one: 290 grants a second of 3.6 units, 30,836 recipients in
    /// 30 s (94.4 % of what the rate allows; 31,915 so, 97.7 %). Whole units only: rounded up, grants held a
    /// unit more on slower relays too, whose workers come for one a round trip at most, and it
    /// passed unused (two replicas of seven on a 300 ms relay under 430 per 10 s: 99.1 → 86.9 %).
    fn units_within_round_trip(&self, now_ns: i64) -> u32 {
        match self.places_each_message(now_ns) {
            true => (self.pool().rate() * self.round_trip().as_secs_f64()) as u32,
            false => 0,
        }
    }

    /// The round trip to the ledger as the rules that trade one for a message's placing count
    /// it: the median of the last [`RECENT_ROUND_TRIPS`], never under [`PLACING_ROUND_TRIP_MIN`].
    /// Not the recent slowest, which sizes the stock: one write stalled half a
    /// second on a loaded machine, and that slowest, decaying by a quarter a grant, put the
    /// preparation under 25 round trips for the next dozen grants. Each replica went back to
    /// stocking ahead of its workers, the mode [`Budget::places_each_message`] replaced, and the
    /// others' messages waited behind its stock (three replicas of one worker on 300 ms relays at
    /// 30 a second: 35 % of one replica's letters waited under 16 ms for their units, where 86–97 %
    /// do).
    fn counted_round_trip_ns(&self) -> i64 {
        self.median_round_trip_ns.load(Ordering::Relaxed).max(PLACING_ROUND_TRIP_MIN.as_nanos() as i64)
    }

    /// Counts a grant's round trip in both estimates: the recent slowest, decaying by a quarter a
    /// grant (the stock's), and the median of the last [`RECENT_ROUND_TRIPS`] (the margin's and
    /// the placing rules').
    fn record_round_trip(&self, took_ns: i64) {
        let previous = self.round_trip_ns.load(Ordering::Relaxed);
        let slowest = if took_ns > previous { took_ns } else { previous - (previous - took_ns) / 4 };
        self.round_trip_ns.store(slowest, Ordering::Relaxed);
        let mut recent = self.recent_round_trips.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() == RECENT_ROUND_TRIPS {
            recent.pop_front();
        }
        recent.push_back(took_ns);
        self.median_round_trip_ns.store(median(&recent), Ordering::Relaxed);
    }

    /// Whether this replica has had the schedule to itself: it first wrote it [`SHARED_SPAN`] ago
    /// or more, and found no other replica's write within that span.
    fn alone(&self, now_ns: i64) -> bool {
        let alone_ns = now_ns.saturating_sub(self.first_wrote_ns.load(Ordering::Relaxed));
        alone_ns >= SHARED_SPAN.as_nanos() as i64 && !self.others_wrote_within(now_ns, SHARED_SPAN)
    }

    /// Whether this replica found the schedule written by another within `span` of `now_ns`.
    fn others_wrote_within(&self, now_ns: i64, span: Duration) -> bool {
        within(&self.others_wrote_ns, now_ns, span)
    }

    /// How many round trips a preparation must be longer than for each message to be placed as it
    /// starts ([`Budget::places_each_message`]): [`PLACING_ROUND_TRIPS`], but
    /// [`PLACING_ROUND_TRIPS_SHARED`] for [`pool::PASSING_KEPT`] after [`PLACING_PASSING_SHARE`]
    /// of this replica's stock was found passing unused while another replica wrote the schedule
    /// within [`SHARED_SPAN`] and messages may cost several units. There a stock is a run of
    /// consecutive units at the whole rate's pace, which a replica whose workers carry a share of
    /// the rate cannot use before it passes, and which no stride can thin out (a message needs
    /// consecutive units, and the schedule's room for the largest message counts one message
    /// across a window's edge, not one a replica): three replicas of three workers on a 20 ms relay under 1,493
    /// recipients a second, letters of 1 to 10, sent 3,557 recipients in 5 s, 5,164 placed one
    /// message at a time. Kept for the span once found: placing each message, nothing passes, and
    /// judged afresh every second, the replica went back to stocking and lost it again (4,410).
    /// Not where the stock is used (two replicas of seven under 1,157 a second, where every
    /// message placed on its own sent 5,386 of the 5,514 stocks send), nor for one replica alone.
    fn placing_round_trips(&self, now_ns: i64) -> i64 {
        if self.plan.largest_cost > 1 && self.others_wrote_within(now_ns, SHARED_SPAN) {
            if self.pool().passing_more_than(PLACING_PASSING_SHARE) {
                self.stock_passed_ns.store(now_ns, Ordering::Relaxed);
            }
            if within(&self.stock_passed_ns, now_ns, pool::PASSING_KEPT) {
                return PLACING_ROUND_TRIPS_SHARED;
            }
        }
        PLACING_ROUND_TRIPS
    }

    /// Whether a grant is for the units of the message asking alone: where another replica wrote
    /// the schedule within [`ONE_MESSAGE_SHARED_SPAN`], messages may cost several units, units are
    /// used at their places, and units lie [`ONE_MESSAGE_ROUND_TRIPS`] round trips apart or more (a
    /// write a message then costs the ledger no more than one per two round trips, and the worker a
    /// round trip where it mostly waits for its units anyway). A grant sized for the rate the
    /// replica used held units beyond its message, and a larger message after it could take them
    /// only while the schedule's end was still theirs ([`schedule::joins_held`]); once another
    /// replica's grant lay between, they passed. Two replicas of two workers on a 1 ms relay under
    /// 1,613 recipients a minute, letters of 1, 40, 5, 100 and 2 in transactions of ten: a message
    /// of two took a grant of ten and eight passed, and the replicas sent 4,280 of the 4,832
    /// recipients the sizes allow in order in three minutes (88.6 %; one replica alone, 99.4 %).
    ///
    /// And at any interval where each message is placed as it starts anyway
    /// ([`Budget::places_each_message`]) and messages of different sizes asked within the span:
    /// there a grant for the waiting workers took this message's units for each of them, and a
    /// larger message after it found the rest too short. Three replicas of three workers on a 20 ms
    /// relay under 1,493 recipients a second, letters of 1 to 10: 5,505 of the 6,407 the workers
    /// carry in 5 s (85.9 %), 6,106 so. Not for letters of one size, whose rest any message after
    /// them can take (see [`ONE_MESSAGE_ROUND_TRIPS`]).
    ///
    /// And where the rate's window is counted exactly, without a burst or a quota, for a message
    /// whose units the rate brings in [`ONE_MESSAGE_ROUND_TRIPS`] ledger round trips or more
    /// (whatever another replica does). There a grant is charged in the window as a whole, and one
    /// sized for the workers queued behind the message (its units for each of them, up to
    /// [`Plan::max_grant`]) held units beyond it that this replica's next message used only if it
    /// was small enough. The rest held the window's room until they passed and went back, after the
    /// other replicas had been told to wait for the window's next room, up to a second later. Three
    /// replicas of twelve workers on a 20 ms relay under 1,039 recipients a second,
    /// `SMTP_MAX_RECIPIENTS=1000`, letters of 1, 40, 5, 100 and 2: a message of 40 took 64 units,
    /// each second's messages went in one run of about 130 ms that stopped near 945 recipients, and
    /// the replicas sent 4,810 of the 5,181 the sizes allow in order in 5 s (92.8 %). A grant a
    /// message costs a ledger write a message, no more than one per two round trips here; for
    /// messages of any size, letters of one recipient went at the ledger's pace of writes (nine
    /// workers on a 1 ms relay under 1,330 a second: 2,450 in 5 s where 6,591 went). Not under a
    /// quota, whose room a grant's units hold until they pass whatever the window does: there it
    /// moved cases both ways by up to a tenth (943 a second with a burst of 51 beside 164 per 10
    /// minutes, two replicas of fourteen: 100.7 → 87.6 %). Nor with a burst, whose messages may go
    /// together at once: three replicas of four under 911 an hour with a burst of 216, letters of 1
    /// to 100, sent 372 recipients in 10 minutes where 437 went.
    fn grants_one_message(&self, now_ns: i64, units: u32) -> bool {
        let round_trips_ns = ONE_MESSAGE_ROUND_TRIPS * self.counted_round_trip_ns();
        if self.plan.exact.is_some() {
            return self.plan.pace.is_none()
                && self.plan.quotas.is_empty()
                && self.plan.rate_brings_ns(units) >= round_trips_ns;
        }
        self.plan.largest_cost > 1
            && self.plan.units_used_at_places()
            && self.others_wrote_within(now_ns, ONE_MESSAGE_SHARED_SPAN)
            && (self.plan.interval_ns >= round_trips_ns
                || (within(&self.sizes_differed_ns, now_ns, ONE_MESSAGE_SHARED_SPAN)
                    && self.places_each_message(now_ns)))
    }

    /// Whether units stocked ahead would pass their reach before a worker came for them: under a
    /// quota a unit is used within [`Plan::reach_ns`] of its charge or not at all, and a unit the
    /// schedule granted and no message used is lost to the rate. With 20 s windows (a reach of
    /// 212 ms) two replicas of five workers on a 2 s relay each took one unit a round in the
    /// background that no worker came for in time, and used 84.5 % of 1,771 an hour with a burst
    /// of 1,724. Asking on demand costs a round trip on the sending path, where the workers wait.
    fn short_reach(&self) -> bool {
        self.plan.reach_ns < SHORT_REACH.as_nanos() as i64
    }

    fn scarce(&self) -> bool {
        self.plan.loose_max == 0 && self.running_out.load(Ordering::Relaxed)
    }

    /// Gives the units this replica holds back to the budget, for the other replicas: called when
    /// it has no letters to send, and when it stops. Without it, a replica that runs out of letters
    /// strands up to a lookahead of its share while the others still have a backlog (the last
    /// second of a campaign sent by three replicas lost up to 170 ms of the rate). Units too close
    /// to now for another replica to reach in time stay here and expire.
    pub async fn give_back(&self) {
        // After a grant on its way has landed, so its units go back too.
        let mut granting = self.granting.lock().await;
        let clock = self.reading();
        let now_ns = clock.now_ns();
        let from_ns = now_ns + 2 * self.round_trip_ns.load(Ordering::Relaxed) + LEAD_MIN.as_nanos() as i64;
        if self.plan.exact.is_some() {
            // Charged where their grants end, they cannot join the schedule's returned runs: they
            // go back to the quotas with the next write.
            let units = self.pool().expire_from(from_ns, &self.plan);
            self.metrics.budget_units_returned.inc_by(units);
            return;
        }
        let runs = self.pool().take_back(from_ns, &self.plan);
        if runs.is_empty() {
            return;
        }
        let units: u64 = runs.iter().map(|run| u64::from(run.count)).sum();
        for _ in 0..CAS_ATTEMPTS {
            let written = async {
                let state = self.latest(&mut granting).await?;
                let next = schedule::give_back(&state, &self.plan, clock.now_ns(), &runs);
                Ok::<_, anyhow::Error>(self.ledger.replace(state.version, &next).await?.map(|_| next))
            };
            match tokio::time::timeout(self.grant_timeout(), written).await {
                Ok(Ok(Some(next))) => {
                    *granting = Some(next);
                    self.metrics.budget_units_returned.inc_by(units);
                    tracing::debug!(units, "unused budget given back");
                    return;
                }
                // Another replica wrote first: again on its state.
                Ok(Ok(None)) => {}
                // The units are out of the pool already: lost, as an expired grant is.
                Ok(Err(error)) => {
                    tracing::debug!(error = format!("{error:#}"), units, "could not give unused budget back");
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// The state to decide on: the copy of this replica's last write or read, taken (a lost
    /// compare-and-set leaves none, so the next attempt reads the other replica's), else read.
    async fn latest(&self, granting: &mut Option<State>) -> anyhow::Result<State> {
        match granting.take() {
            Some(state) => Ok(state),
            None => self.ledger.load().await,
        }
    }

    /// Reads the server's clock, once, right before the first decision. The service's clock was
    /// measured at start already, so nothing before was decided on this host's; measured again
    /// here, when the process is no longer busy starting, the readings are shorter and the
    /// replicas' clocks closer (what they differ by comes out of the guard).
    ///
    /// Bounded on its own, not by the grant's timeout: its five readings are round trips too,
    /// and counted in the second a grant may take, they filled it once MongoDB was 200 ms away
    /// (a database in another region): every first grant timed out, the clock was measured
    /// again from the start, and the replica never sent a letter. Where the readings do not
    /// come in time, the clock measured at start stands.
    async fn measure_clock(&self) -> anyhow::Result<()> {
        if self.clock_measured.load(Ordering::Acquire) {
            return Ok(());
        }
        let readings = crate::clock::FIRST_READINGS;
        let read = || async {
            let sent = Instant::now();
            let read = self.ledger.server_time().await;
            if read.is_ok() {
                self.distance_ns.fetch_min(sent.elapsed().as_nanos() as i64, Ordering::Relaxed);
            }
            read
        };
        let measuring = self.clock.measure(readings, Duration::ZERO, read);
        match tokio::time::timeout(CLOCK_TIMEOUT, measuring).await {
            Ok(Ok(offset_ms)) if offset_ms.abs() > 1_000 => {
                tracing::warn!(
                    offset_ms,
                    "this host's clock differs from MongoDB's; the sending budget follows MongoDB's"
                );
            }
            Ok(Ok(_)) => {}
            _ if self.clock.is_measured() => {
                tracing::debug!("MongoDB's clock not read again before the first grant; the reading at start stands");
            }
            Ok(Err(error)) => return Err(error),
            Err(_) => anyhow::bail!("no answer from MongoDB's clock within {CLOCK_TIMEOUT:?}"),
        }
        self.clock_measured.store(true, Ordering::Release);
        Ok(())
    }

    /// [`Budget::grant`] once the clock is measured, within [`Budget::grant_timeout`]: whatever
    /// a write that timed out did is lost with it (at worst, one grant's units unused).
    async fn timed_grant(&self, granting: &mut Option<State>, want: u32, need: Need, moment: Moment) -> Granted {
        self.measure_clock().await?;
        let timeout = self.grant_timeout();
        match tokio::time::timeout(timeout, self.grant(granting, want, need, moment)).await {
            Ok(granted) => granted,
            Err(_) => {
                *granting = None;
                Err(anyhow::anyhow!("no answer from MongoDB within {timeout:?}"))
            }
        }
    }

    /// The recent slowest round trip of a grant's write.
    fn round_trip(&self) -> Duration {
        Duration::from_nanos(self.round_trip_ns.load(Ordering::Relaxed).max(0) as u64)
    }

    /// How long a grant (a read, a write, and another pair for each replica that wrote first)
    /// may take before MongoDB counts as unreachable: [`GRANT_TIMEOUT`], or four of the
    /// shortest round trips the clock's readings measured where that is longer. A database half
    /// a second away answers every grant in a second: held to [`GRANT_TIMEOUT`], each one timed
    /// out and the replica never sent a letter.
    fn grant_timeout(&self) -> Duration {
        let distance_ns = self.distance_ns.load(Ordering::Relaxed);
        match distance_ns {
            i64::MAX => GRANT_TIMEOUT,
            _ => GRANT_TIMEOUT.max(Duration::from_nanos(distance_ns as u64) * 4),
        }
    }

    /// One grant: `Ok(None)` when units were added to the pool, `Ok(Some((until, window)))` when
    /// the budget has none before `until`. Units that passed unused in the pool are given back to
    /// the quotas in the same write (or alone, when nothing can be granted); if the write's fate
    /// is unknown (an error, a timeout) they are dropped, since counting them twice could let a
    /// window hold more than its quota.
    async fn grant(&self, granting: &mut Option<State>, want: u32, need: Need, moment: Moment) -> Granted {
        let (passed, missed) = self.pool().take_expired();
        let unused: Vec<Placed> = passed.iter().chain(&missed).copied().collect();
        for _ in 0..CAS_ATTEMPTS {
            let stored = self.latest(granting).await?;
            let clock = self.reading();
            let now_ns = clock.now_ns();
            let written = self.written_version.load(Ordering::Relaxed);
            if written != 0 && stored.version != written {
                self.others_wrote_ns.store(now_ns, Ordering::Relaxed);
            }
            // The margin for this write's round trip: the median of the recent ones, not the
            // recent slowest. A margin longer than the write skips the schedule's units before
            // the grant's first (no one takes them), a shorter one loses the grant's first units
            // (they arrive past): either way what is lost grows with the miss, and the median is
            // the guess that loses least. The slowest, decaying by a quarter a grant, was a stall's
            // length for the grants after it, though the write after a stall is mostly quick:
            // with a 300 ms stall once a second, SES's 14 recipients a second with one worker,
            // where each message takes its own grant, sent 4 a second (each message waited the
            // margin at its dot), and 408 of 5,100 explored cases fell below 95 % (219 now).
            let margin_ns = self.median_round_trip_ns.load(Ordering::Relaxed);
            // For a message already at its dot, units due as soon as they can arrive (the
            // write's round trip, and one more of margin): a lead ahead, it held the DATA phase
            // open for the lead less the burst's tolerance. A 2 s relay whose first preparation
            // took fifteen times the first guess missed the units of its first message in every
            // replica, and waited 1.3 s at the dot for the next.
            // Booked, the write is done long before the worker comes back: no margin for it.
            let lead_ns = match moment {
                Moment::AtDot => margin_ns + margin_ns,
                Moment::ToPrepare => self.placing_lead_ns() + margin_ns,
                Moment::Booked { ahead_ns } => self.placing_lead_ns() + ahead_ns,
            };
            // A message on this grant is at its dot a preparation after the units arrive at the
            // soonest: the quotas count them from there, not from the lead's margin over it.
            // Until a preparation is measured, from the lead: where units lie seconds apart it
            // is a second at least (`SLOW_LEAD`) for the first messages of a slow relay, and a
            // burst's units charged from the first guess (67 ms) passed the reach of their
            // charge before those messages were ready (1,077 a day with a burst of 97 beside
            // 43 per 20 s, 2 s sends: 62.5 % of the budget).
            let (prepared_ns, after_ns) = match moment {
                Moment::AtDot => (0, margin_ns),
                Moment::ToPrepare => (self.preparation_within_lead_ns(), margin_ns),
                Moment::Booked { ahead_ns } => (self.preparation_within_lead_ns(), ahead_ns),
            };
            let ready_ns = match (moment, self.preparation_measured.load(Ordering::Relaxed)) {
                (Moment::AtDot, _) | (_, true) => prepared_ns,
                (_, false) => self.lead_ns(),
            } + after_ns;
            let state = schedule::refund(&stored, &self.plan, now_ns, &unused);
            let state = schedule::refund_pace(state, &self.plan, now_ns, &passed, &missed);
            // Units for messages at their dots stay consecutive: they are taken at once, and a
            // stride put the units placed for missed messages of 2 s relays out of their reach
            // (three replicas of two workers at 760 a second: 66.7 % of what they carry).
            let asker = match moment {
                Moment::AtDot => None,
                Moment::ToPrepare | Moment::Booked { .. } => {
                    // Before the pool's lock: `shares_a_rate_far_above` takes it too.
                    let far = self.shares_a_rate_far_above(now_ns);
                    let horizon_ns = now_ns + self.prefetch_ns();
                    let pool = self.pool();
                    Some(schedule::Asker {
                        replica: self.replica,
                        passing: far || pool.passing(),
                        far,
                        holds_from_ns: pool.held_from(horizon_ns),
                        lanes: pool.lanes(self.plan.interval_ns),
                    })
                }
            };
            let (decision, mut next) = decide(&state, &self.plan, now_ns, lead_ns, ready_ns, want, need, asker);
            self.publish(&state, now_ns);
            let wait = match &decision {
                Decision::Wait { until_ns, window } => Some((*until_ns, window.clone())),
                _ => None,
            };
            if wait.is_some() {
                self.told_to_wait_ns.store(now_ns, Ordering::Relaxed);
                // Nothing granted; what was given back to the quotas is still written.
                if next == stored {
                    // The state read is kept for the next decision while no other replica writes
                    // the schedule, and where the units it holds are counted (a quota, a burst, a
                    // window counted exactly). Where any place may go to any replica
                    // (`schedule::uncounted_places`), places change hands with every write (the
                    // lanes between strided runs, units given back), and a replica that shares the
                    // schedule reads it again. Decided on the state a wait had read, a replica
                    // whose strided runs lie beside the others' was told again and again to wait
                    // for a lane they had taken since (`schedule::reuse`), asked for its next runs
                    // only as its own ended, when the others did, and the last of their colliding
                    // writes lost two or three of its lane's units each round: three replicas of
                    // ten on a 20 ms relay under 1,244 a second sent 94.8 % of the rate in 5 s,
                    // 95.6 % so. Read again under a quota too, two replicas of eleven on a 300 ms
                    // relay under 366 recipients per 10 s beside 483 per 20 s fell from 97.2 to
                    // 94.96 % of what the sizes allow; alone, the state read is the one stored.
                    if !self.others_wrote_within(now_ns, SHARED_SPAN) || !schedule::uncounted_places(&self.plan) {
                        *granting = Some(stored);
                    }
                    return Ok(wait);
                }
                next = State { version: stored.version + 1, ..next };
            }
            let sent = Instant::now();
            match self.ledger.replace(stored.version, &next).await? {
                Some(server_ms) => {
                    let received = Instant::now();
                    self.written_version.store(next.version, Ordering::Relaxed);
                    let _ =
                        self.first_wrote_ns.compare_exchange(i64::MAX, now_ns, Ordering::Relaxed, Ordering::Relaxed);
                    // The round trip, for the next grants' margin and the stock's size.
                    // At most the grant timeout: a write that "took" longer answered in time but
                    // was read late, the runtime stalled (an 18 MB claim decoding), and a lead that
                    // long put every later grant past the horizon, each one waiting for a write
                    // that would never come to lower it: the replica sent nothing for minutes.
                    let took = received.duration_since(sent).min(self.grant_timeout()).as_nanos() as i64;
                    self.record_round_trip(took);
                    self.clock.observe(server_ms, sent, received);
                    self.publish(&next, now_ns);
                    self.schedule_end_ns.store(next.next_ns, Ordering::Relaxed);
                    if let Some((left, room)) = schedule::exact_room(&next, &self.plan, now_ns) {
                        self.window_roomy.store(room >= BOOKING_ROOM, Ordering::Relaxed);
                        self.first_written.send_if_modified(|written| {
                            if !*written {
                                self.unplaced_room.store(self.units_in_a_lead().min(left as i64), Ordering::Relaxed);
                                *written = true;
                                return true;
                            }
                            false
                        });
                    }
                    *granting = Some(next);
                    if wait.is_some() {
                        return Ok(wait);
                    }
                    self.metrics.budget_grants.inc();
                    let mut pool = self.pool();
                    match decision {
                        Decision::Granted { first_ns, count, from_ns, stride } => {
                            pool.add(Run { first_ns, count, from_ns, stride }, &self.plan)
                        }
                        Decision::Loose { until_ns, count } => pool.loose.push_back((until_ns, count)),
                        Decision::Wait { .. } => {}
                    }
                    return Ok(None);
                }
                // Another replica wrote first: read its state and decide again.
                None => *granting = None,
            }
        }
        // Many replicas racing for the same document: step back briefly, as if it were busy.
        // The units that passed unused stay uncounted-back: lost, never counted twice.
        Ok(Some((self.clock.now_ns() + 5_000_000, "contention".to_owned())))
    }

    fn publish(&self, state: &State, now_ns: i64) {
        for (window, used, remaining) in usage(state, &self.plan, now_ns) {
            let label = WindowLabel { window };
            self.metrics.budget_used.get_or_create(&label).set(used as i64);
            self.metrics.budget_remaining.get_or_create(&label).set(remaining as i64);
        }
    }
}

/// The preparation a replica guesses until its first transaction measures one: two thirds of
/// [`LEAD`] (a lead of 100 ms), or [`DENSE_GUESS`] (20 ms) where the rate's units lie less than
/// [`DENSE_INTERVAL`] apart.
///
/// The guess sets how far ahead the first grants place their units, and the dots wait for them:
/// where units are dense that wait is dozens of units of the rate lost at every start (three
/// replicas of eight workers on a 20 ms relay under 960 a second sent nothing in their first
/// 110 ms, 94.8 % of the rate in 5 s; 42 ms and 95.2 % with the dense guess,
/// `a_dense_rate_is_not_held_by_the_first_guess_of_a_lead`). A message prepared more slowly
/// than the guess misses its unit and takes a new one at its dot ([`Budget::prepared`]), which
/// costs a dense rate little; where units lie further apart a missed unit costs an interval, and
/// the guess stays: three replicas of thirteen on a 300 ms relay under 22 a second (units 45 ms
/// apart) sent 106 of 107 letters in 5 s on the longer guess, 101 on a 50 ms one. Over the 6,100
/// explored cases, the dense guess raised 488 cases and lowered 53, none by more than 2.9 points,
/// and the cases below 95 % went from 11 to 7; lowered for every rate, rates whose units lie
/// 20–50 ms apart lost as much as they gained (33 cases raised, 26 lowered at 40 ms).
///
/// The rate's own interval (what [`Plan::rate_brings_ns`] gives for one unit), not the
/// schedule's: where the window is counted exactly the schedule runs at eight times the rate,
/// and SES's 14 recipients a second (units 71 ms apart) read as dense; three replicas of four on
/// a 300 ms relay, letters of 1 to 10, fell to 94.6 % of it.
fn guessed_preparation(plan: &Plan) -> Duration {
    match plan.rate_brings_ns(1) < DENSE_INTERVAL.as_nanos() as i64 {
        true => DENSE_GUESS,
        false => LEAD * 2 / 3,
    }
}

/// A worker counted among those waiting for units until dropped (see [`Budget::queued`]).
pub struct Queued<'a> {
    _waiting: Decrement<'a>,
}

/// Whether the moment stored in `at_ns` (nanoseconds on the budget's clock) lies within `span`
/// before `now_ns`.
fn within(at_ns: &AtomicI64, now_ns: i64, span: Duration) -> bool {
    now_ns - at_ns.load(Ordering::Relaxed) <= span.as_nanos() as i64
}

/// When a replica's workers come back for their next message after a final dot: the dots not
/// yet followed by a return, oldest first (workers whose sends take alike come back in the order
/// of their dots), and the last few returns.
#[derive(Default)]
struct Returns {
    dots: VecDeque<Instant>,
    recent: VecDeque<i64>,
    /// The dots whose workers' next units are to be booked ([`Budget::book`]).
    unbooked: Vec<Instant>,
}

impl Returns {
    fn dot(&mut self, at: Instant, books: bool) {
        if self.dots.len() == DOTS_KEPT {
            self.dots.pop_front();
        }
        self.dots.push_back(at);
        if books && self.unbooked.len() < DOTS_KEPT {
            self.unbooked.push(at);
        }
    }

    /// A worker came back at `at`: the median of the last [`RECENT_ROUND_TRIPS`] returns, once
    /// there was a dot to come back from. It outvotes a worker that came back late (it found no
    /// letter for a while) and one paired with another's dot. The shortest of them gave the same
    /// explorations, with and without stalls, once returns were measured where a worker queues
    /// for its turn ([`Budget::queued`]).
    fn back(&mut self, at: Instant) -> Option<i64> {
        let dot = self.dots.pop_front()?;
        if self.recent.len() == RECENT_ROUND_TRIPS {
            self.recent.pop_front();
        }
        self.recent.push_back(at.saturating_duration_since(dot).as_nanos().min(i64::MAX as u128) as i64);
        Some(median(&self.recent))
    }
}

/// The median of up to [`RECENT_ROUND_TRIPS`] times, without allocating (once a grant, once a
/// message).
fn median(recent: &VecDeque<i64>) -> i64 {
    let mut sorted = [0; RECENT_ROUND_TRIPS];
    let sorted = &mut sorted[..recent.len().min(RECENT_ROUND_TRIPS)];
    sorted.iter_mut().zip(recent.iter()).for_each(|(slot, took_ns)| *slot = *took_ns);
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0)
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An estimate of the recent slowest preparation after one that took `took`: a slower one at
/// once, a faster one by a quarter of the difference.
fn follow(estimate_ns: i64, took_ns: i64) -> i64 {
    match took_ns > estimate_ns {
        true => took_ns,
        false => estimate_ns - (estimate_ns - took_ns) / 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::schedule::tests::{S, smtp};

    /// Workers come back in the order of their dots; the return is the median of the last few,
    /// so one worker that came back late (no letter for a while) does not move it, and a return
    /// with no dot before it measures nothing.
    #[tokio::test(start_paused = true)]
    async fn a_return_is_the_median_recent_time_from_a_dot_to_the_next_ask() {
        let mut returns = Returns::default();
        let start = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(returns.back(start), None, "no dot yet");
        let mut measured = Vec::new();
        for (dot, back) in [(0, 10), (2, 12), (4, 14), (6, 500), (8, 19), (10, 21), (12, 40)] {
            returns.dot(start + ms(dot), false);
            measured.push(returns.back(start + ms(back)).map(|ns| ns / 1_000_000));
        }
        // Returns of 10, 10, 10, 494, 11, 11 and 28 ms.
        assert_eq!(measured, [10, 10, 10, 10, 10, 11, 11_i64].map(Some), "the median of the last five");
        assert_eq!(returns.back(start + ms(600)), None, "every dot had its return");
        assert!(returns.unbooked.is_empty());
        returns.dot(start + ms(20), true);
        assert_eq!(returns.unbooked, vec![start + ms(20)]);
    }

    /// Where the rate's window is counted exactly, a message whose units the rate brings in two
    /// round trips or more takes a grant of its own units: sized for the workers queued behind it
    /// at its own size, a message of 40 recipients with nine workers queued took the largest
    /// grant, 64 units, 24 of them beyond it (see [`Budget::grants_one_message`]). A
    /// message of one recipient still takes units for the workers queued.
    #[tokio::test(start_paused = true)]
    async fn a_large_message_in_a_window_counted_exactly_holds_its_own_units() {
        let config = smtp(&[
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "1039"),
            ("SMTP_RATE_LIMIT_UNIT", "recipient"),
            ("SMTP_MAX_RECIPIENTS", "1000"),
        ]);
        let plan = Plan::new(&config);
        assert!(plan.exact.is_some(), "the window is counted exactly");
        let ledger = Arc::new(MemoryLedger::slow(Duration::from_millis(2)));
        let held = |budget: &Budget| budget.pool().runs.iter().map(|run| run.count).sum::<u32>();
        for (units, queued, left) in [(40, 9, 0), (100, 9, 0), (1, 9, 9)] {
            let budget = Arc::new(Budget::new(plan.clone(), ledger.clone(), Arc::new(Metrics::new())));
            let queue: Vec<_> = (0..queued).map(|_| budget.queued()).collect();
            let ticket = budget.take_up_to(units).await;
            assert_eq!(ticket.units, units);
            // What the grant held beyond the message, for the workers queued.
            assert_eq!(held(&budget), left, "a message of {units} with {queued} workers queued");
            drop(queue);
        }
    }

    /// Where the rate's window is counted exactly, a replica's first message takes its units on
    /// the lead's first guess; until a preparation is measured the others go unplaced, as many
    /// units as the window had room for and the schedule places within a lead, and take their
    /// units at their dots; a miss of an unplaced ticket gives nothing back (it held nothing).
    /// Once a preparation is measured, messages take placed units again. Letters, whose window
    /// is not counted exactly, never go unplaced.
    #[tokio::test(start_paused = true)]
    async fn before_a_preparation_is_measured_messages_take_their_units_at_their_dots() {
        // A budget in recipients, fifty a message, on a ledger 2 ms away.
        let in_recipients = |period: &str, max: &str| {
            let config = smtp(&[
                ("SMTP_RATE_LIMIT_PERIOD", period),
                ("SMTP_RATE_LIMIT_MAX_LETTERS", max),
                ("SMTP_RATE_LIMIT_UNIT", "recipient"),
                ("SMTP_MAX_RECIPIENTS", "50"),
            ]);
            let ledger = Arc::new(MemoryLedger::slow(Duration::from_millis(2)));
            Arc::new(Budget::new(Plan::new(&config), ledger, Arc::new(Metrics::new())))
        };
        let budget = in_recipients("1s", "782");
        let soon = u32::try_from(budget.units_in_a_lead()).unwrap();
        assert!(budget.plan.exact.is_some() && soon < 782 - 40, "the lead's units bind: {soon}");
        let first = budget.take_up_to(40).await;
        assert!(!first.unplaced, "the first message's units are placed");
        for _ in 0..soon / 50 {
            let ticket = budget.take_up_to(50).await;
            assert!(ticket.unplaced, "unplaced as the lead's {soon} units allow");
            assert_eq!((ticket.units, ticket.at), (50, Instant::now()), "it goes to its dot at once");
            budget.missed(&ticket);
        }
        assert_eq!(budget.pool().take_expired(), (Vec::new(), Vec::new()), "nothing to give back");
        let at_dot = budget.take_ready(50).await;
        assert!(!at_dot.unplaced && at_dot.units == 50, "units taken at the dot");
        // The window (782) lies within two leads (2 x {soon}): beyond the lead's units a message
        // waits for the measurement, and takes placed units then.
        let beyond = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take_up_to(50).await }
        });
        tokio::time::sleep(PROBE_WAIT / 2).await;
        assert!(!beyond.is_finished(), "it waits for a preparation to be measured");
        budget.prepared(Duration::from_millis(150));
        let beyond = tokio::time::timeout(Duration::from_millis(100), beyond).await.unwrap().unwrap();
        assert!(!beyond.unplaced, "measured: placed");
        assert!(!budget.take_up_to(1).await.unplaced, "measured: placed again");

        // 398 per 10 s: the window is longer than two leads, and a message beyond the lead's
        // units takes placed units at once.
        let budget = in_recipients("10s", "398");
        assert!(!budget.window_within_two_leads());
        assert!(!budget.take_up_to(1).await.unplaced);
        let (mut unplaced, asked) = (0, Instant::now());
        while budget.take_up_to(10).await.unplaced {
            unplaced += 1;
        }
        assert!(unplaced > 0, "some went unplaced first");
        assert!(asked.elapsed() < Duration::from_millis(100), "none waited: {:?}", asked.elapsed());

        let letters = smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "782")]);
        let budget =
            Arc::new(Budget::new(Plan::new(&letters), Arc::new(MemoryLedger::new()), Arc::new(Metrics::new())));
        for _ in 0..3 {
            assert!(!budget.take_up_to(1).await.unplaced, "letters: every message placed");
        }
    }

    /// A replica whose host clock runs ten minutes ahead measures the server's clock before its
    /// first grant, so the grant lies at the server's now and a replica on time is not held back
    /// (before: its first grant was written ten minutes into the server's future).
    #[tokio::test(start_paused = true)]
    async fn a_replica_ten_minutes_ahead_does_not_hold_back_the_others() {
        let config = smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "20")]);
        let ledger = Arc::new(MemoryLedger::slow(Duration::from_millis(2)));
        let plan = Plan::new(&config);
        let ahead = Clock::host(600_000);
        let first = Arc::new(Budget::with_clock(plan.clone(), ledger.clone(), ahead.clone(), Arc::new(Metrics::new())));
        let started = Instant::now();
        let ticket = first.take(1).await;
        assert!(ahead.is_measured(), "measured before the first grant");
        assert!(ticket.at.duration_since(started) < Duration::from_secs(1), "the replica ahead sends at once");
        let on_time = Arc::new(Budget::new(plan, ledger.clone(), Arc::new(Metrics::new())));
        let asked = Instant::now();
        let ticket = on_time.take(1).await;
        let waited = ticket.at.duration_since(asked);
        assert!(waited < Duration::from_secs(1), "the replica on time waited {waited:?}");
    }

    /// Every unit missed makes bulk take its units an interval earlier, every unit kept takes
    /// back a 64th of that: a stalling machine goes back towards units held well ahead.
    #[tokio::test(start_paused = true)]
    async fn missed_units_make_bulk_take_its_units_earlier() {
        let config = smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "20")]);
        let budget = Arc::new(Budget::new(Plan::new(&config), Arc::new(MemoryLedger::new()), Arc::new(Metrics::new())));
        // Units taken one after another until the next one is not near.
        let (ticket, tight) = loop {
            let ticket = budget.take(1).await;
            if let Some(wait) = budget.bulk_wait() {
                break (ticket, wait);
            }
        };
        budget.missed(&ticket);
        // An interval is 50 ms and the 0.75 % guard.
        let interval = budget.plan.interval_ns;
        assert_eq!(budget.bulk_slack_ns.load(Ordering::Relaxed), interval, "one interval of slack per unit missed");
        let earlier = tight.saturating_sub(Duration::from_nanos(interval as u64));
        assert_eq!(budget.bulk_wait().unwrap_or_default(), earlier);
        for _ in 0..64 {
            budget.on_time();
        }
        let left = budget.bulk_slack_ns.load(Ordering::Relaxed);
        assert!((18_000_000..18_600_000).contains(&left), "{left} ns of slack after 64 units kept");
    }

    /// The benchmark's "no limit": a million per second with a burst of 1,000. Grants are still
    /// few and every one is used (a grant whose units had all passed once looped forever).
    #[tokio::test(start_paused = true)]
    async fn a_very_high_rate_with_a_burst_takes_few_grants() {
        let config = smtp(&[
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "1000000"),
            ("SMTP_RATE_LIMIT_BURST", "1000"),
        ]);
        let ledger = Arc::new(MemoryLedger::new());
        let budget = Arc::new(Budget::new(Plan::new(&config), ledger.clone(), Arc::new(Metrics::new())));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let budget = budget.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..500 {
                    let ticket = budget.take(1).await;
                    budget.prepared(ticket.issued.elapsed());
                    tokio::time::sleep_until(ticket.at).await;
                    tokio::time::sleep(Duration::from_millis(8)).await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // 1,000 sends a second from one replica against a million: loose grants of about a
        // lookahead's worth (before them, about 12 sends per grant).
        let writes = ledger.writes.load(Ordering::Relaxed);
        assert!(writes <= 40, "{writes} grants for 4,000 sends");
    }

    /// Loose grants and scheduled ones, several replicas, a budget the workers can exhaust: the
    /// busiest window holds no more than the schedule's own units and twice the loose allowance
    /// (the proof is at [`Plan::loose_max`]); with exact timers nothing else can add any.
    #[tokio::test(start_paused = true)]
    async fn loose_grants_never_crowd_a_window() {
        let config = smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "100000")]);
        let plan = Plan::new(&config);
        assert!(plan.loose_max >= 64, "{plan:?}");
        let ledger = Arc::new(MemoryLedger::slow(Duration::from_millis(2)));
        let dots = Arc::new(std::sync::Mutex::new(Vec::new()));
        let saw_loose = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for replica in 0..3 {
            let budget = Arc::new(Budget::new(plan.clone(), ledger.clone(), Arc::new(Metrics::new())));
            for worker in 0..6_u64 {
                let (budget, dots, ledger, saw_loose) =
                    (budget.clone(), dots.clone(), ledger.clone(), saw_loose.clone());
                tasks.push(tokio::spawn(async move {
                    // Some workers as fast as the budget lets them, some slow: loose grants while
                    // the load is light, scheduled ones once it is not.
                    let send = Duration::from_micros((worker + replica) % 3 * 400);
                    while started.elapsed() < Duration::from_secs(3) {
                        let ticket = budget.take(1).await;
                        // At its dot at once, and saying so, as a worker does.
                        budget.prepared(ticket.issued.elapsed());
                        tokio::time::sleep_until(ticket.at).await;
                        dots.lock().unwrap().push(Instant::now().duration_since(started));
                        if !send.is_zero() {
                            tokio::time::sleep(send).await;
                        }
                        if !ledger.state().loose.is_empty() {
                            saw_loose.store(true, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert!(saw_loose.load(Ordering::Relaxed), "no loose grant was taken");
        let mut dots = std::mem::take(&mut *dots.lock().unwrap());
        dots.sort();
        let (mut busiest, mut first) = (0, 0);
        for last in 0..dots.len() {
            while dots[last] - dots[first] >= Duration::from_secs(1) {
                first += 1;
            }
            busiest = busiest.max(last - first + 1);
        }
        let scheduled = (S as f64 / plan.interval_ns as f64).ceil() as usize;
        let allowed = scheduled + 2 * plan.loose_max as usize;
        assert!(busiest <= allowed, "{busiest} in one second, {allowed} allowed ({scheduled} scheduled)");
        // And the budget was used: the workers were not simply too few.
        assert!(busiest >= scheduled * 95 / 100, "{busiest} in the busiest second of {scheduled}");
    }

    /// A slow MongoDB (50 ms round trips) and sends of 25 ms at 100 a second: the next grant is
    /// asked for before the pool runs dry, so the rate does not lose the round trips.
    #[tokio::test(start_paused = true)]
    async fn the_next_grant_arrives_before_the_pool_runs_dry() {
        let config = smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "100")]);
        let ledger = Arc::new(MemoryLedger::slow(Duration::from_millis(50)));
        let budget = Arc::new(Budget::new(Plan::new(&config), ledger.clone(), Arc::new(Metrics::new())));
        let dots = Arc::new(std::sync::Mutex::new(Vec::new()));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (budget, dots) = (budget.clone(), dots.clone());
            tasks.push(tokio::spawn(async move {
                while started.elapsed() < Duration::from_secs(10) {
                    let ticket = budget.take(1).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    budget.prepared(ticket.issued.elapsed());
                    tokio::time::sleep_until(ticket.at).await;
                    dots.lock().unwrap().push(Instant::now());
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let mut dots = std::mem::take(&mut *dots.lock().unwrap());
        dots.sort();
        let span = dots[dots.len() - 1].duration_since(dots[0]).as_secs_f64();
        let rate = (dots.len() - 1) as f64 / span;
        // The schedule's own 0.75 % guard, and no more.
        assert!(rate >= 99.0, "{rate:.2} letters/s at a budget of 100/s");
    }

    /// A ledger whose writes land at once but are read 6 s later, as when the runtime stalls.
    struct StallingLedger {
        inner: MemoryLedger,
        stall: AtomicBool,
        /// How long a stalled write is read late.
        stall_for: Duration,
    }

    impl Ledger for StallingLedger {
        fn load(&self) -> futures::future::BoxFuture<'_, anyhow::Result<State>> {
            self.inner.load()
        }

        fn replace<'a>(
            &'a self,
            expected: i64,
            new: &'a State,
        ) -> futures::future::BoxFuture<'a, anyhow::Result<Option<i64>>> {
            Box::pin(async move {
                let written = self.inner.replace(expected, new).await;
                if self.stall.swap(false, Ordering::Relaxed) {
                    tokio::time::advance(self.stall_for).await;
                }
                written
            })
        }

        fn server_time(&self) -> futures::future::BoxFuture<'_, anyhow::Result<i64>> {
            self.inner.server_time()
        }
    }

    /// Postfix's rate limit: after its 450s it sleeps before every reply, and transactions took
    /// seconds to reach their dots. The preparation measured was longer than the longest lead,
    /// every grant (a lead ahead) fell short of the units a message could reach, and the replica
    /// asked for grants in a loop and sent nothing again (`tests/postfix.rs`,
    /// `postfix_message_rate_limit_is_a_throttle`: 0 letters in 150 s).
    #[tokio::test(start_paused = true)]
    async fn a_preparation_longer_than_the_longest_lead_still_gets_units() {
        let config = smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "1000")]);
        let budget = Arc::new(Budget::new(Plan::new(&config), Arc::new(MemoryLedger::new()), Arc::new(Metrics::new())));
        budget.prepared(LEAD_MAX * 3);
        let started = Instant::now();
        let taken = tokio::time::timeout(Duration::from_secs(10), async {
            for _ in 0..5 {
                let ticket = budget.take(1).await;
                tokio::time::sleep_until(ticket.at).await;
            }
        })
        .await;
        assert!(taken.is_ok(), "no unit for 10 s after a preparation of {:?}", LEAD_MAX * 3);
        // Each a lead ahead at most, as the message cannot use one sooner.
        assert!(started.elapsed() <= LEAD_MAX * 5 + Duration::from_millis(100), "5 units took {:?}", started.elapsed());
    }

    /// A write read 6 s late (the runtime stalled) once left a lead of 6 s, every later grant past
    /// the horizon and waiting, and the replica sent nothing again.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_runtime_does_not_stop_the_grants() {
        let config = smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "1000")]);
        let ledger = Arc::new(StallingLedger {
            inner: MemoryLedger::new(),
            stall: AtomicBool::new(false),
            stall_for: Duration::from_secs(6),
        });
        let budget = Arc::new(Budget::new(Plan::new(&config), ledger.clone(), Arc::new(Metrics::new())));
        budget.take(1).await;
        ledger.stall.store(true, Ordering::Relaxed);
        // Past what the pool holds, so the next take writes (and stalls).
        for _ in 0..300 {
            budget.take(1).await;
        }
        let started = Instant::now();
        let sent = tokio::time::timeout(Duration::from_secs(60), async {
            for _ in 0..300 {
                let ticket = budget.take(1).await;
                budget.prepared(ticket.issued.elapsed());
                tokio::time::sleep_until(ticket.at).await;
            }
        })
        .await;
        assert!(sent.is_ok(), "no grant for a minute after the stall");
        assert!(started.elapsed() < Duration::from_secs(5), "300 units took {:?} at 1,000/s", started.elapsed());
    }

    /// One replica of one worker on a 300 ms relay (150 ms to its dot) at 30 a second without a
    /// burst, where each message is placed as it starts. One grant's write stalls half a second:
    /// the replica keeps placing each message, and does not go back to stocking ahead of its
    /// workers for the dozen grants the slowest round trip takes to decay.
    #[tokio::test(start_paused = true)]
    async fn one_stalled_write_leaves_each_message_placed_as_it_starts() {
        let config = smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "30")]);
        let ledger = Arc::new(StallingLedger {
            inner: MemoryLedger::slow(Duration::from_millis(2)),
            stall: AtomicBool::new(false),
            stall_for: Duration::from_millis(500),
        });
        let budget = Arc::new(Budget::new(Plan::new(&config), ledger.clone(), Arc::new(Metrics::new())));
        let send = async |stall: bool| {
            ledger.stall.store(stall, Ordering::Relaxed);
            let ticket = budget.take_up_to(1).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
            budget.prepared(ticket.issued.elapsed());
            tokio::time::sleep_until(ticket.at).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        };
        for _ in 0..5 {
            send(false).await;
        }
        let placing = |budget: &Budget| budget.places_each_message(budget.reading().now_ns());
        assert!(placing(&budget), "a 150 ms preparation is more than 25 round trips of 2 ms");
        let writes = ledger.inner.writes.load(Ordering::Relaxed);
        send(true).await;
        assert!(ledger.inner.writes.load(Ordering::Relaxed) > writes, "the message's own grant was written");
        assert!(!ledger.stall.load(Ordering::Relaxed), "the write stalled");
        for message in 0..12 {
            assert!(placing(&budget), "each message placed as it starts, {message} messages after the stall");
            send(false).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_ledger_nothing_is_granted_and_sending_resumes_after() {
        let config = smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "10")]);
        let ledger = Arc::new(MemoryLedger::new());
        let metrics = Arc::new(Metrics::new());
        let budget = Arc::new(Budget::new(Plan::new(&config), ledger.clone(), metrics.clone()));
        ledger.down.store(true, Ordering::Relaxed);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(1).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiting.is_finished());
        assert!(budget.status().is_err());
        assert_eq!(metrics.budget_available.get(), 0);
        ledger.down.store(false, Ordering::Relaxed);
        let ticket = waiting.await.unwrap();
        assert!(ticket.at >= Instant::now());
        assert!(budget.status().is_ok());
        assert_eq!(metrics.budget_available.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_replica_continues_the_same_quota() {
        let config =
            smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "100"), ("SMTP_QUOTAS", "5/1m")]);
        let ledger = Arc::new(MemoryLedger::new());
        let first = Arc::new(Budget::new(Plan::new(&config), ledger.clone(), Arc::new(Metrics::new())));
        for _ in 0..5 {
            first.take(1).await;
        }
        drop(first);
        let second = Arc::new(Budget::new(Plan::new(&config), ledger.clone(), Arc::new(Metrics::new())));
        let started = Instant::now();
        second.take(1).await;
        assert!(started.elapsed() >= Duration::from_secs(59), "{:?}", started.elapsed());
    }

    /// Two replicas share 100/s; one runs out of letters and gives its units back. The other,
    /// with letters left, goes on near the full rate: most units the first held are used at their
    /// own times instead of passing unused. (Without the give-back: a gap of 111 ms, 94.3/s.
    /// What is still lost are units the other replica had already scheduled past when the
    /// give-back landed.)
    #[tokio::test(start_paused = true)]
    async fn a_replica_out_of_letters_gives_its_units_to_the_others() {
        let config = smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "100")]);
        let plan = Plan::new(&config);
        let ledger = Arc::new(MemoryLedger::slow(Duration::from_millis(2)));
        let metrics = [Arc::new(Metrics::new()), Arc::new(Metrics::new())];
        let [a, b] = metrics.clone().map(|m| Arc::new(Budget::new(plan.clone(), ledger.clone(), m)));
        let started = Instant::now();
        let dots = Arc::new(std::sync::Mutex::new(Vec::new()));
        let worker = |budget: Arc<Budget>, until: Duration, dots: Option<Arc<std::sync::Mutex<Vec<Duration>>>>| {
            tokio::spawn(async move {
                while started.elapsed() < until {
                    let ticket = budget.take(1).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    budget.prepared(ticket.issued.elapsed());
                    tokio::time::sleep_until(ticket.at).await;
                    if let Some(dots) = &dots {
                        dots.lock().unwrap().push(started.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let a_workers: Vec<_> = (0..4).map(|_| worker(a.clone(), Duration::from_secs(4), Some(dots.clone()))).collect();
        let b_workers: Vec<_> = (0..4).map(|_| worker(b.clone(), Duration::from_secs(2), None)).collect();
        // B's workers take no unit after 2 s (its sends in flight finish); the send stage gives
        // the units back once its workers have found no letter for a moment.
        let b_stopped = Duration::from_secs(2);
        tokio::time::sleep_until(started + b_stopped).await;
        b.letters_running_out(true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.give_back().await;
        for task in b_workers.into_iter().chain(a_workers) {
            task.await.unwrap();
        }
        assert!(metrics[1].budget_units_returned.get() > 0, "B gave nothing back");
        let dots = std::mem::take(&mut *dots.lock().unwrap());
        let after: Vec<Duration> = dots.into_iter().filter(|t| *t >= b_stopped).collect();
        let widest = after.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        let interval = Duration::from_nanos(plan.interval_ns as u64);
        assert!(widest <= interval * 6, "a gap of {widest:?} in A's dots after B stopped at {b_stopped:?}");
        let span = (after[after.len() - 1] - after[0]).as_secs_f64();
        let rate = (after.len() - 1) as f64 / span;
        assert!(rate >= 96.5, "A alone: {rate:.2} letters/s at a budget of 100/s");
    }
}
