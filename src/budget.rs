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
//! server we test on supports (it has no pipeline updates). Times are the server's: each write
//! stamps `$currentDate`, and every replica maps the server's clock onto its own from that stamp,
//! so pod clock skew does not break the spacing.
//!
//! Without MongoDB a replica cannot prove it has budget: it sends nothing beyond the grant it
//! already holds, says so in `/ready` and `mailsender_budget_available`, and resumes when
//! MongoDB answers again.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use futures::future::BoxFuture;
use mongodb::{
    Collection,
    bson::{Bson, Document, doc},
    error::{ErrorKind, WriteFailure},
    options::ReturnDocument,
};
use tokio::time::Instant;

use crate::{
    config::{RateUnit, SmtpConfig},
    metrics::{Metrics, WindowLabel},
};

/// A replica asks for what it expects to send in this long.
pub const LOOKAHEAD: Duration = Duration::from_millis(250);
/// Spacing added to the rate's schedule so that the relay's own jitter in recording the end of
/// data (and our timer's) cannot put one message too many in a window: 0.75 % of the period, at
/// most 50 ms. It costs the same 0.75 % of the rate. (0.5 % was not enough for a Python test
/// relay on a loaded 2-core machine: ends of data 6–8 ms late now and then.)
const GUARD_PER_100K: i64 = 750;
const GUARD_MAX: Duration = Duration::from_millis(50);
/// A unit is never granted sooner than the lead from now: the time a worker needs to open the
/// transaction (MAIL, RCPT, DATA, the data) before its final dot. It is measured (half again the
/// recent slowest preparation), starting from this, within these bounds.
const LEAD: Duration = Duration::from_millis(100);
const LEAD_MIN: Duration = Duration::from_millis(1);
const LEAD_MAX: Duration = Duration::from_secs(1);
/// A grant that takes longer counts as MongoDB unreachable (the driver itself waits up to its
/// server selection timeout, 5 s, before it says so).
const GRANT_TIMEOUT: Duration = Duration::from_secs(1);
/// Quota buckets: a window is counted in about this many, each at least a second wide.
const BUCKETS: i64 = 20;
/// A loose grant's units are used within this long of the grant.
const LOOSE_SPAN: Duration = LOOKAHEAD;
/// Share of the period set aside for loose grants: 0.25 %, so that guard and loose together cost at
/// most 1 % of the rate.
const LOOSE_GUARD_PER_100K: i64 = 250;
/// Loose grants only where that share holds at least this many units (budgets of about 51,200 per
/// period and more); below, units are far enough apart to be taken one by one.
const LOOSE_MIN: i64 = 64;
/// The next grant is asked for when the pool covers less than the lead, two round trips and this.
const PREFETCH_MARGIN: Duration = Duration::from_millis(25);
/// How often a replica without MongoDB tries again.
const RETRY: Duration = Duration::from_millis(500);
/// Concurrent changes by other replicas tolerated in one grant before backing off.
const CAS_ATTEMPTS: usize = 8;

/// The budget's state as stored: one document for the deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Bumped by every write; the compare-and-set key.
    pub version: i64,
    /// The next free unit of the rate's schedule, in server nanoseconds since the Unix epoch.
    pub next_ns: i64,
    /// Units granted per quota (keyed by its window), per bucket index.
    pub quotas: BTreeMap<String, BTreeMap<i64, u32>>,
    /// Loose grants not yet expired, of every replica.
    pub loose: Vec<LooseGrant>,
}

/// Units granted to be used at any moment from `from_ns` to `until_ns` (server time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LooseGrant {
    pub from_ns: i64,
    pub until_ns: i64,
    pub count: u32,
}

/// One quota window, as counted.
///
/// Units are charged to the bucket of the grant's time, and a grant never reaches further ahead
/// than half a bucket ([`Plan::horizon_ns`]). A grant is allowed when the units charged since one
/// bucket before the window's start leave room; so every window of the quota's length, at the
/// relay, holds at most `limit` units. It is conservative: a unit frees one to two buckets after
/// the window has passed it (a 24 h quota frees up to 2 × 72 min late).
#[derive(Debug, Clone)]
pub struct QuotaPlan {
    pub key: String,
    pub label: String,
    pub limit: u32,
    pub window_ns: i64,
    pub bucket_ns: i64,
}

/// The budget's arithmetic, from the configuration.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Time between two units of the rate's schedule.
    pub interval_ns: i64,
    /// How much earlier than its time a unit may be used (`SMTP_RATE_LIMIT_BURST` − 1
    /// intervals): a burst after a pause, as in GCRA.
    pub tolerance_ns: i64,
    /// The lead at start, before preparations are measured.
    pub lead_ns: i64,
    /// A message this much later than its unit (the guard) does not go on it: it takes a new unit,
    /// as such lateness could put one message too many in a window.
    pub late: Duration,
    /// A grant's first unit is at most this far ahead of now; further, it waits.
    pub horizon_ns: i64,
    pub rate_label: String,
    pub rate_max: u32,
    pub period_ns: i64,
    pub quotas: Vec<QuotaPlan>,
    /// Most units in one grant: a [`LOOKAHEAD`] of the rate.
    pub max_grant: u32,
    /// Most units all unexpired loose grants of the deployment may hold together; 0: no loose
    /// grants. A loose grant is charged to the schedule like any other (its units take their
    /// places from the schedule's next free unit, which must be within [`LOOSE_SPAN`]), but its
    /// units may be used anywhere from the grant to [`LOOSE_SPAN`] after it: a unit used on the
    /// other side of a window's edge from its place adds one to that window. Only units of grants
    /// alive at that edge can, so a window holds at most `2 × loose_max` more than the schedule
    /// allows, and the schedule's interval leaves room for that many (the 0.25 % share).
    pub loose_max: u32,
    pub loose_span_ns: i64,
    /// The most one message may cost: 1, or in recipient mode its recipients, at most
    /// `SMTP_MAX_RECIPIENTS` and at most the smallest window.
    pub largest_cost: u32,
    /// The smallest window's limit: a letter costing more can never be sent.
    pub smallest_window: u32,
    pub unit: RateUnit,
}

impl Plan {
    pub fn new(smtp: &SmtpConfig) -> Plan {
        let period_ns = smtp.rate_period.as_nanos().min(i64::MAX as u128) as i64;
        let smallest_window = smtp.quotas.iter().map(|q| q.limit).fold(smtp.rate_max_letters, u32::min);
        let largest_cost = match smtp.rate_unit == RateUnit::Recipient {
            true => (smtp.max_recipients as u32).min(smallest_window).max(1),
            false => 1,
        };
        // A message is handed over at its last unit, so a message of r units starting before a
        // window and ending in it brings r − 1 units from before: the schedule leaves that room.
        let per_period = i64::from(smtp.rate_max_letters - (largest_cost - 1)).max(1);
        let guard = (period_ns / 100_000 * GUARD_PER_100K).min(GUARD_MAX.as_nanos() as i64);
        let spacing = |room: i64| ((period_ns + guard + room) as f64 / per_period as f64).ceil() as i64;
        let loose_room = period_ns / 100_000 * LOOSE_GUARD_PER_100K;
        let loose_max = loose_room / (2 * spacing(loose_room));
        let (interval_ns, loose_max) = match loose_max >= LOOSE_MIN {
            true => (spacing(loose_room), loose_max.min(i64::from(u32::MAX)) as u32),
            false => (spacing(0), 0),
        };
        let quotas: Vec<QuotaPlan> = smtp
            .quotas
            .iter()
            .map(|q| {
                let window_ns = q.window.as_nanos().min(i64::MAX as u128) as i64;
                let bucket_ns = (window_ns / BUCKETS).max(1_000_000_000).min(window_ns);
                QuotaPlan {
                    key: format!("w{}", q.window.as_millis()),
                    label: q.to_string(),
                    limit: q.limit,
                    window_ns,
                    bucket_ns,
                }
            })
            .collect();
        let horizon_ns = quotas.iter().map(|q| q.bucket_ns / 2).min().unwrap_or(2_000_000_000);
        let max_grant = (LOOKAHEAD.as_nanos() as i64 / interval_ns).clamp(1, 1_000_000) as u32;
        Plan {
            interval_ns,
            tolerance_ns: i64::from(smtp.rate_burst - 1) * interval_ns,
            lead_ns: LEAD.as_nanos() as i64,
            late: Duration::from_nanos(guard as u64),
            horizon_ns,
            rate_label: format!("{}/{}", smtp.rate_max_letters, humantime::format_duration(smtp.rate_period)),
            rate_max: smtp.rate_max_letters,
            period_ns,
            quotas,
            max_grant: max_grant.max(largest_cost),
            loose_max,
            loose_span_ns: LOOSE_SPAN.as_nanos() as i64,
            largest_cost,
            smallest_window,
            unit: smtp.rate_unit,
        }
    }

    /// Units per second the schedule allows.
    pub fn rate(&self) -> f64 {
        1e9 / self.interval_ns as f64
    }
}

/// What the budget says to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `count` units, the first at `first_ns`, then every interval.
    Granted { first_ns: i64, count: u32 },
    /// `count` units to use at any moment until `until_ns`.
    Loose { until_ns: i64, count: u32 },
    /// Nothing before `until_ns` (server time), because of `window`.
    Wait { until_ns: i64, window: String },
}

/// Decides a grant of `want` units (at least `need`, or none) at server time `now_ns`, none
/// sooner than `lead_ns` from now, and the state that records it.
pub fn decide(state: &State, plan: &Plan, now_ns: i64, lead_ns: i64, want: u32, need: u32) -> (Decision, State) {
    // The burst tolerance is applied when units are used (up to that much early), not here.
    let start = state.next_ns.max(now_ns + lead_ns);
    if start > now_ns + plan.horizon_ns {
        let wait = Decision::Wait { until_ns: start - plan.horizon_ns, window: plan.rate_label.clone() };
        return (wait, state.clone());
    }
    let mut next = state.clone();
    let mut count = want.max(need);
    next.loose.retain(|grant| grant.until_ns >= now_ns);
    // Loose when units on the schedule would lie so close together that most would pass unused
    // (the grant would cover less than a quarter of the lookahead), and there is room.
    let mut loose = false;
    if plan.loose_max > 0
        && i64::from(count) * plan.interval_ns * 4 <= plan.loose_span_ns
        && start <= now_ns + plan.loose_span_ns
    {
        let held: u64 = next.loose.iter().map(|grant| u64::from(grant.count)).sum();
        let room = u64::from(plan.loose_max).saturating_sub(held);
        if room >= u64::from(need) {
            loose = true;
            count = count.min(room as u32);
        }
    }
    // Quotas of windows no longer configured would only grow the document.
    next.quotas.retain(|key, _| plan.quotas.iter().any(|q| &q.key == key));
    for quota in &plan.quotas {
        let buckets = next.quotas.entry(quota.key.clone()).or_default();
        let first_counted = (now_ns - quota.window_ns).div_euclid(quota.bucket_ns) - 1;
        buckets.retain(|bucket, _| *bucket >= first_counted);
        let used: u64 = buckets.values().map(|n| u64::from(*n)).sum();
        let available = u64::from(quota.limit).saturating_sub(used);
        if available < u64::from(need) {
            // Free when enough of the oldest buckets have left the counted range: bucket b
            // leaves it at (b + 2) buckets + the window.
            let mut freed = 0;
            let mut until_ns = now_ns + quota.window_ns;
            for (bucket, n) in buckets.iter() {
                freed += u64::from(*n);
                if used - freed + u64::from(need) <= u64::from(quota.limit) {
                    until_ns = (bucket + 2) * quota.bucket_ns + quota.window_ns;
                    break;
                }
            }
            return (Decision::Wait { until_ns, window: quota.label.clone() }, state.clone());
        }
        count = count.min(available as u32);
    }
    for quota in &plan.quotas {
        let bucket = now_ns.div_euclid(quota.bucket_ns);
        *next.quotas.entry(quota.key.clone()).or_default().entry(bucket).or_default() += count;
    }
    next.next_ns = start + i64::from(count) * plan.interval_ns;
    next.version = state.version + 1;
    if loose {
        // Alive until its last use, and until its last place on the schedule.
        let until_ns = (now_ns + plan.loose_span_ns).max(next.next_ns);
        next.loose.push(LooseGrant { from_ns: now_ns, until_ns, count });
        return (Decision::Loose { until_ns: now_ns + plan.loose_span_ns, count }, next);
    }
    (Decision::Granted { first_ns: start, count }, next)
}

/// Used and remaining units of every window at `now_ns`, for the metrics.
pub fn usage(state: &State, plan: &Plan, now_ns: i64) -> Vec<(String, u64, u64)> {
    let ahead = (state.next_ns - now_ns).max(0);
    let reserved = ((ahead as f64 / plan.interval_ns as f64).ceil() as u64).min(u64::from(plan.rate_max));
    let mut windows = vec![(plan.rate_label.clone(), reserved, u64::from(plan.rate_max) - reserved)];
    for quota in &plan.quotas {
        let first_counted = (now_ns - quota.window_ns).div_euclid(quota.bucket_ns) - 1;
        let used: u64 = state
            .quotas
            .get(&quota.key)
            .map(|b| b.range(first_counted..).map(|(_, n)| u64::from(*n)).sum())
            .unwrap_or(0);
        windows.push((quota.label.clone(), used, u64::from(quota.limit).saturating_sub(used)));
    }
    windows
}

/// Where the state is kept: MongoDB in production, memory in unit tests.
pub trait Ledger: Send + Sync {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<State>>;
    /// Writes `new` if the stored version is still `expected`. `Ok(None)`: another replica wrote
    /// first. `Ok(Some(ms))`: written, at the server's clock `ms` (Unix milliseconds).
    fn replace<'a>(&'a self, expected: i64, new: &'a State) -> BoxFuture<'a, anyhow::Result<Option<i64>>>;
}

/// The budget document in `<collection>_budget`.
pub struct MongoLedger {
    collection: Collection<Document>,
    metrics: Arc<Metrics>,
}

const DOCUMENT_ID: &str = "budget";

impl MongoLedger {
    /// Beside the letters collection, in the same database.
    pub fn beside<T: Send + Sync>(letters: &Collection<T>, metrics: Arc<Metrics>) -> MongoLedger {
        let db = letters.client().database(letters.namespace().db.as_str());
        MongoLedger { collection: db.collection(&format!("{}_budget", letters.name())), metrics }
    }

    fn count(&self, command: &'static str) {
        self.metrics.mongo_commands.get_or_create(&crate::metrics::CommandLabel { command: command.to_owned() }).inc();
    }
}

fn quotas_to_bson(quotas: &BTreeMap<String, BTreeMap<i64, u32>>) -> Document {
    quotas
        .iter()
        .map(|(key, buckets)| {
            let buckets: Document = buckets.iter().map(|(b, n)| (b.to_string(), Bson::Int64(i64::from(*n)))).collect();
            (key.clone(), Bson::Document(buckets))
        })
        .collect()
}

fn loose_to_bson(loose: &[LooseGrant]) -> Vec<Bson> {
    loose.iter().map(|g| Bson::Document(doc! { "f": g.from_ns, "u": g.until_ns, "n": i64::from(g.count) })).collect()
}

fn state_from_bson(document: &Document) -> State {
    let int = |value: Option<&Bson>| match value {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Double(n)) => *n as i64,
        _ => 0,
    };
    let quotas = match document.get_document("quotas") {
        Ok(quotas) => quotas
            .iter()
            .filter_map(|(key, buckets)| {
                let buckets = buckets.as_document()?;
                let buckets = buckets
                    .iter()
                    .filter_map(|(b, n)| Some((b.parse::<i64>().ok()?, int(Some(n)).clamp(0, u32::MAX.into()) as u32)))
                    .collect();
                Some((key.clone(), buckets))
            })
            .collect(),
        Err(_) => BTreeMap::new(),
    };
    let loose = match document.get_array("loose") {
        Ok(grants) => grants
            .iter()
            .filter_map(Bson::as_document)
            .map(|g| LooseGrant {
                from_ns: int(g.get("f")),
                until_ns: int(g.get("u")),
                count: int(g.get("n")).clamp(0, u32::MAX.into()) as u32,
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    State { version: int(document.get("v")), next_ns: int(document.get("next_ns")), quotas, loose }
}

impl Ledger for MongoLedger {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<State>> {
        Box::pin(async move {
            self.count("find");
            let found =
                self.collection.find_one(doc! { "_id": DOCUMENT_ID }).await.context("reading the sending budget")?;
            Ok(found.as_ref().map(state_from_bson).unwrap_or_default())
        })
    }

    fn replace<'a>(&'a self, expected: i64, new: &'a State) -> BoxFuture<'a, anyhow::Result<Option<i64>>> {
        Box::pin(async move {
            self.count("findAndModify");
            // The first write creates the document (upsert); when another replica created it in
            // the meantime, MongoDB refuses the insert as a duplicate key: a lost race, as a
            // version mismatch is.
            let result = self
                .collection
                .find_one_and_update(
                    doc! { "_id": DOCUMENT_ID, "v": expected },
                    doc! {
                        "$set": {
                            "v": new.version,
                            "next_ns": new.next_ns,
                            "quotas": quotas_to_bson(&new.quotas),
                            "loose": loose_to_bson(&new.loose),
                        },
                        "$currentDate": { "at": true },
                    },
                )
                .upsert(expected == 0)
                .return_document(ReturnDocument::After)
                .projection(doc! { "at": 1 })
                .await;
            match result {
                Ok(Some(written)) => {
                    let at = written.get_datetime("at").map(|at| at.timestamp_millis()).unwrap_or_else(|_| local_ms());
                    Ok(Some(at))
                }
                Ok(None) => Ok(None),
                Err(error) if is_duplicate_key(&error) => Ok(None),
                Err(error) => Err(anyhow::Error::new(error).context("writing the sending budget")),
            }
        })
    }
}

fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    match error.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == 11000,
        ErrorKind::Command(e) => e.code == 11000,
        _ => false,
    }
}

fn local_ms() -> i64 {
    local_ns() / 1_000_000
}

fn local_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// The server's clock as seen from here: a local instant and the server time it stands for.
#[derive(Debug, Clone, Copy)]
struct ServerClock {
    base: Instant,
    base_ns: i64,
}

impl ServerClock {
    fn now_ns(&self) -> i64 {
        self.at_ns(Instant::now())
    }

    fn at_ns(&self, instant: Instant) -> i64 {
        match instant.checked_duration_since(self.base) {
            Some(after) => self.base_ns + after.as_nanos() as i64,
            None => self.base_ns - self.base.duration_since(instant).as_nanos() as i64,
        }
    }

    fn instant(&self, ns: i64) -> Instant {
        if ns >= self.base_ns {
            self.base + Duration::from_nanos((ns - self.base_ns) as u64)
        } else {
            self.base.checked_sub(Duration::from_nanos((self.base_ns - ns) as u64)).unwrap_or(self.base)
        }
    }

    /// The server wrote at `server_ms` (truncated to the millisecond) between `sent` and
    /// `received`: move our idea of its clock when it is off by more than that uncertainty.
    fn observe(&mut self, server_ms: i64, sent: Instant, received: Instant) {
        let middle = sent + received.duration_since(sent) / 2;
        let observed = server_ms * 1_000_000 + 500_000;
        let error = observed - self.at_ns(middle);
        let uncertainty = received.duration_since(sent).as_nanos() as i64 / 2 + 1_000_000;
        if error.abs() > uncertainty {
            self.base_ns += error;
        }
    }
}

/// Units granted to this replica and not handed out yet.
#[derive(Debug, Default)]
struct Pool {
    /// Runs of consecutive units: (first unit's time, count).
    runs: VecDeque<(i64, u32)>,
    /// Loose units: (usable until, count).
    loose: VecDeque<(i64, u32)>,
    /// Units handed out since `since`, for the size of the next grant.
    handed: u64,
    since: Option<Instant>,
    /// Units per second this replica uses, smoothed.
    rate: f64,
}

/// Units taken from the pool for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// Its final dot at this unit's time (that of the last of its units).
    At(i64),
    /// Its final dot at any moment until this time.
    Until(i64),
}

impl Pool {
    /// `units` for one message: loose ones that are still usable at `ready_ns` (when the message
    /// can be ready), else the last of `units` consecutive units not before `now_ns`.
    fn take(&mut self, units: u32, interval_ns: i64, now_ns: i64, ready_ns: i64) -> Option<Taken> {
        while let Some((until, count)) = self.loose.front_mut() {
            if *until < ready_ns || *count < units {
                self.loose.pop_front();
                continue;
            }
            let until = *until;
            *count -= units;
            if *count == 0 {
                self.loose.pop_front();
            }
            self.handed += u64::from(units);
            return Some(Taken::Until(until));
        }
        // Units before `now_ns` are of no use: spending them late could crowd a window.
        while let Some((first, count)) = self.runs.front_mut() {
            if *first < now_ns {
                let past = ((now_ns - *first) as f64 / interval_ns as f64).ceil() as i64;
                if past >= i64::from(*count) {
                    self.runs.pop_front();
                    continue;
                }
                *first += past * interval_ns;
                *count -= past as u32;
            }
            if *count < units {
                // Too few consecutive units for this message: they expire unused rather than
                // split it across other replicas' units.
                self.runs.pop_front();
                continue;
            }
            let last = *first + i64::from(units - 1) * interval_ns;
            *first += i64::from(units) * interval_ns;
            *count -= units;
            if *count == 0 {
                self.runs.pop_front();
            }
            self.handed += u64::from(units);
            return Some(Taken::At(last));
        }
        None
    }

    fn add(&mut self, first_ns: i64, count: u32, interval_ns: i64) {
        if let Some((last_first, last_count)) = self.runs.back_mut()
            && *last_first + i64::from(*last_count) * interval_ns == first_ns
        {
            *last_count += count;
            return;
        }
        self.runs.push_back((first_ns, count));
    }

    /// Whether the pool holds less than this replica uses until `horizon_ns`: the next grant
    /// should be on its way.
    fn low(&self, now_ns: i64, horizon_ns: i64, interval_ns: i64) -> bool {
        let scheduled_until = self.runs.back().map_or(0, |(first, count)| first + i64::from(*count) * interval_ns);
        if scheduled_until >= horizon_ns {
            return false;
        }
        let loose: u64 = self.loose.iter().map(|(_, count)| u64::from(*count)).sum();
        let loose_until = self.loose.back().map_or(0, |(until, _)| *until);
        let needed = (self.rate * (horizon_ns - now_ns).max(0) as f64 / 1e9).ceil() as u64;
        loose_until < horizon_ns || loose <= needed
    }

    /// How many units to ask for: what this replica used in the last while, over the
    /// lookahead, and at least what is asked for now. The first time, with nothing measured yet,
    /// a lookahead of the whole budget (or a quarter of the loose allowance): workers queue up
    /// one by one at start, and a grant for the first of them alone leaves the rest a round trip
    /// without units.
    fn want(&mut self, need: u32, waiting: usize, plan: &Plan) -> u32 {
        let max_grant = plan.max_grant;
        let now = Instant::now();
        if self.since.is_none() {
            self.since = Some(now);
            let first = match plan.loose_max {
                0 => max_grant,
                loose => (loose / 4).max(1),
            };
            return first.max(need);
        }
        if let Some(since) = self.since {
            let elapsed = now.duration_since(since).as_secs_f64();
            if elapsed > 0.0 {
                let measured = self.handed as f64 / elapsed;
                self.rate = if self.rate == 0.0 { measured } else { 0.5 * self.rate + 0.5 * measured };
            }
        }
        self.since = Some(now);
        self.handed = 0;
        let expected = (self.rate * LOOKAHEAD.as_secs_f64()).ceil() as u32;
        let queued = need.saturating_mul(waiting.max(1) as u32);
        expected.max(queued).clamp(need, max_grant.max(need))
    }
}

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
    clock: std::sync::Mutex<ServerClock>,
    waiting: AtomicUsize,
    available: AtomicBool,
    /// Recent slowest preparation of a transaction, in nanoseconds (see [`LEAD`]).
    preparation_ns: AtomicI64,
    /// Recent slowest grant round trip, in nanoseconds.
    round_trip_ns: AtomicI64,
    metrics: Arc<Metrics>,
}

impl Budget {
    pub fn new(plan: Plan, ledger: Arc<dyn Ledger>, metrics: Arc<Metrics>) -> Budget {
        let clock = ServerClock { base: Instant::now(), base_ns: local_ns() };
        metrics.budget_available.set(1);
        Budget {
            plan,
            ledger,
            pool: std::sync::Mutex::new(Pool::default()),
            granting: tokio::sync::Mutex::new(None),
            refilling: AtomicBool::new(false),
            clock: std::sync::Mutex::new(clock),
            waiting: AtomicUsize::new(0),
            available: AtomicBool::new(true),
            preparation_ns: AtomicI64::new(LEAD.as_nanos() as i64 * 2 / 3),
            round_trip_ns: AtomicI64::new(0),
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

    /// A transaction reached its final dot `took` after its ticket was handed out: follows a
    /// slower one at once, a faster one by a quarter of the difference.
    pub fn prepared(&self, took: Duration) {
        let took = took.as_nanos().min(i64::MAX as u128) as i64;
        let estimate = self.preparation_ns.load(Ordering::Relaxed);
        let next = if took > estimate { took } else { estimate - (estimate - took) / 4 };
        self.preparation_ns.store(next, Ordering::Relaxed);
    }

    fn lead_ns(&self) -> i64 {
        let lead = self.preparation_ns.load(Ordering::Relaxed) * 3 / 2;
        lead.clamp(LEAD_MIN.as_nanos() as i64, LEAD_MAX.as_nanos() as i64)
    }

    fn clock(&self) -> ServerClock {
        *self.clock.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        // Pool operations cannot panic half-way, so a poisoned lock still holds consistent data.
        self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until `units` consecutive units are granted to this replica; the message they pay
    /// for is handed over at the ticket's time. Cancel-safe: dropping the future loses nothing
    /// but the units it was given.
    pub async fn take(self: &Arc<Self>, units: u32) -> Ticket {
        let asked = Instant::now();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Decrement(&self.waiting);
        // Grants that left nothing usable in a row: never a busy loop of round trips.
        let mut fruitless = 0;
        loop {
            if let Some(ticket) = self.from_pool(units, asked) {
                return ticket;
            }
            let mut granting = self.granting.lock().await;
            // A background grant, or another worker's, may have landed while this one queued.
            if let Some(ticket) = self.from_pool(units, asked) {
                return ticket;
            }
            let clock = self.clock();
            let waiting = self.waiting.load(Ordering::Relaxed);
            let want = self.pool().want(units, waiting, &self.plan);
            let granted = tokio::time::timeout(GRANT_TIMEOUT, self.grant(&mut granting, want, units)).await;
            let granted = granted.unwrap_or_else(|_| {
                // Whatever the write did is lost with it: at worst, one grant's units unused.
                *granting = None;
                Err(anyhow::anyhow!("no answer from MongoDB within {GRANT_TIMEOUT:?}"))
            });
            match granted {
                Ok(None) => {
                    fruitless += 1;
                    if fruitless > 2 {
                        tracing::warn!(fruitless, "budget grants arrive already past; slowing down");
                        tokio::time::sleep(RETRY / 10).await;
                    }
                    self.reachable();
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
    fn from_pool(self: &Arc<Self>, units: u32, asked: Instant) -> Option<Ticket> {
        let clock = self.clock();
        let now_ns = clock.now_ns();
        let lead_ns = self.lead_ns();
        // Units past by more than the guard expire: a message on them would be late, and could
        // crowd the next window. Grants start a lead and a round trip ahead, so fresh units
        // are not past.
        let late_ns = self.plan.late.as_nanos() as i64;
        let mut pool = self.pool();
        let taken = pool.take(units, self.plan.interval_ns, now_ns - late_ns, now_ns + lead_ns)?;
        let ahead_ns = lead_ns + 2 * self.round_trip_ns.load(Ordering::Relaxed) + PREFETCH_MARGIN.as_nanos() as i64;
        let low = pool.low(now_ns, now_ns + ahead_ns, self.plan.interval_ns);
        drop(pool);
        if low {
            self.refill();
        }
        let issued = Instant::now();
        let (at, unit) = match taken {
            Taken::At(last_ns) => (clock.instant(last_ns - self.plan.tolerance_ns), clock.instant(last_ns)),
            // Any moment until then: the lateness allowed past `unit` brings it to `until`.
            Taken::Until(until_ns) => (issued, clock.instant(until_ns - late_ns)),
        };
        Some(Ticket { at, unit, issued, units, waited: asked.elapsed() })
    }

    /// Asks for the next grant in the background, unless one is on its way already, so that the
    /// round trip to MongoDB is not spent waiting on the sending path.
    fn refill(self: &Arc<Self>) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let budget = self.clone();
        tokio::spawn(async move {
            // A worker already asking for one does the same.
            if let Ok(mut granting) = budget.granting.try_lock() {
                let want = budget.pool().want(1, 0, &budget.plan);
                match tokio::time::timeout(GRANT_TIMEOUT, budget.grant(&mut granting, want, 1)).await {
                    Ok(Ok(_)) => budget.reachable(),
                    // The workers find out themselves, and say so, when they need the next grant.
                    Ok(Err(error)) => {
                        tracing::debug!(error = format!("{error:#}"), "background budget grant failed");
                        *granting = None;
                    }
                    Err(_) => *granting = None,
                }
            }
            budget.refilling.store(false, Ordering::Release);
        });
    }

    /// One grant: `Ok(None)` when units were added to the pool, `Ok(Some((until, window)))` when
    /// the budget has none before `until`.
    async fn grant(&self, granting: &mut Option<State>, want: u32, need: u32) -> anyhow::Result<Option<(i64, String)>> {
        for _ in 0..CAS_ATTEMPTS {
            let state = match granting.take() {
                Some(state) => state,
                None => self.ledger.load().await?,
            };
            let clock = self.clock();
            let now_ns = clock.now_ns();
            let lead_ns = self.lead_ns() + self.round_trip_ns.load(Ordering::Relaxed);
            let (decision, next) = decide(&state, &self.plan, now_ns, lead_ns, want, need);
            self.publish(&state, now_ns);
            if let Decision::Wait { until_ns, window } = decision {
                *granting = Some(state);
                return Ok(Some((until_ns, window)));
            }
            let sent = Instant::now();
            match self.ledger.replace(state.version, &next).await? {
                Some(server_ms) => {
                    let received = Instant::now();
                    // The slowest recent round trip, decaying: the next grant starts this much
                    // later, so its units are not past when they arrive.
                    let took = received.duration_since(sent).as_nanos().min(i64::MAX as u128) as i64;
                    let previous = self.round_trip_ns.load(Ordering::Relaxed);
                    let next_estimate = if took > previous { took } else { previous - (previous - took) / 4 };
                    self.round_trip_ns.store(next_estimate, Ordering::Relaxed);
                    self.clock
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .observe(server_ms, sent, received);
                    self.metrics.budget_grants.inc();
                    self.publish(&next, now_ns);
                    let mut pool = self.pool();
                    match decision {
                        Decision::Granted { first_ns, count } => pool.add(first_ns, count, self.plan.interval_ns),
                        Decision::Loose { until_ns, count } => pool.loose.push_back((until_ns, count)),
                        Decision::Wait { .. } => {}
                    }
                    drop(pool);
                    *granting = Some(next);
                    return Ok(None);
                }
                // Another replica wrote first: read its state and decide again.
                None => *granting = None,
            }
        }
        // Many replicas racing for the same document: step back briefly, as if it were busy.
        Ok(Some((self.clock().now_ns() + 5_000_000, "contention".to_owned())))
    }

    fn publish(&self, state: &State, now_ns: i64) {
        for (window, used, remaining) in usage(state, &self.plan, now_ns) {
            let label = WindowLabel { window };
            self.metrics.budget_used.get_or_create(&label).set(used as i64);
            self.metrics.budget_remaining.get_or_create(&label).set(remaining as i64);
        }
    }
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
    origin_ms: i64,
    started: std::sync::OnceLock<Instant>,
}

impl MemoryLedger {
    pub fn new() -> MemoryLedger {
        let ledger = MemoryLedger { origin_ms: local_ms(), ..Default::default() };
        let _ = ledger.started.set(Instant::now());
        ledger
    }

    /// A slow server: every call takes `round_trip`.
    pub fn slow(round_trip: Duration) -> MemoryLedger {
        MemoryLedger { round_trip, ..MemoryLedger::new() }
    }

    async fn travel(&self, time: Duration) {
        if !time.is_zero() {
            tokio::time::sleep(time).await;
        }
    }

    pub fn state(&self) -> State {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
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
                    let elapsed = self.started.get().map_or(Duration::ZERO, |s| s.elapsed());
                    Some(self.origin_ms + elapsed.as_millis() as i64)
                }
            };
            self.travel(self.round_trip / 2).await;
            Ok(written)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smtp(pairs: &[(&str, &str)]) -> SmtpConfig {
        let mut vars: std::collections::HashMap<String, String> =
            [("KAFKA_BROKERS", "k:1"), ("MONGO_LOCAL", "mongodb://m"), ("SMTP_HOST", "h")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        for (k, v) in pairs {
            vars.insert(k.to_string(), v.to_string());
        }
        crate::Config::from_vars(vars).unwrap().smtp
    }

    const S: i64 = 1_000_000_000;

    #[test]
    fn grants_follow_one_schedule_and_never_overlap() {
        let plan = Plan::new(&smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "20")]));
        // 1 s + 7.5 ms guard over 20 units.
        assert_eq!(plan.interval_ns, 50_375_000);
        let now = 1_000 * S;
        let (first, state) = decide(&State::default(), &plan, now, plan.lead_ns, 4, 1);
        assert_eq!(first, Decision::Granted { first_ns: now + plan.lead_ns, count: 4 });
        // Another replica at the same moment continues where the first grant ends.
        let (second, state) = decide(&state, &plan, now, plan.lead_ns, 4, 1);
        assert_eq!(second, Decision::Granted { first_ns: now + plan.lead_ns + 4 * plan.interval_ns, count: 4 });
        assert_eq!(state.version, 2);
        // After a pause the schedule starts again from now, not from the past.
        let later = now + 60 * S;
        let (third, _) = decide(&state, &plan, later, plan.lead_ns, 1, 1);
        assert_eq!(third, Decision::Granted { first_ns: later + plan.lead_ns, count: 1 });
    }

    #[test]
    fn a_quota_refuses_beyond_its_limit_until_the_window_has_passed() {
        let plan = Plan::new(&smtp(&[
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "100"),
            ("SMTP_QUOTAS", "30/20s"),
        ]));
        let mut state = State::default();
        let mut now = 1_000 * S;
        let mut granted = 0;
        while granted < 30 {
            let (decision, next) = decide(&state, &plan, now, plan.lead_ns, 7, 1);
            let Decision::Granted { count, .. } = decision else { panic!("{decision:?}") };
            granted += count;
            state = next;
            now += S / 10;
        }
        assert_eq!(granted, 30);
        let (decision, _) = decide(&state, &plan, now, plan.lead_ns, 1, 1);
        let Decision::Wait { until_ns, window } = decision else { panic!("{decision:?}") };
        assert_eq!(window, "30/20s");
        // Freed no sooner than a window after the first grant, and at most two buckets later.
        assert!((1_020 * S..=1_023 * S).contains(&until_ns), "{until_ns}");
        let (decision, _) = decide(&state, &plan, until_ns, plan.lead_ns, 1, 1);
        assert!(matches!(decision, Decision::Granted { .. }), "{decision:?}");
    }

    #[test]
    fn recipient_units_leave_room_for_the_largest_message() {
        let plan = Plan::new(&smtp(&[
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "200"),
            ("SMTP_RATE_LIMIT_UNIT", "recipient"),
            ("SMTP_MAX_RECIPIENTS", "10"),
        ]));
        assert_eq!(plan.largest_cost, 10);
        assert_eq!(plan.interval_ns, (1_007_500_000_f64 / 191.0).ceil() as i64);
        let letters = Plan::new(&smtp(&[("SMTP_QUOTAS", "3/1m")]));
        assert_eq!((letters.largest_cost, letters.smallest_window), (1, 3));
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
}
