//! The budget's arithmetic: the rate's schedule of units, the quotas' buckets, loose grants, and
//! what one grant request gets. Pure functions of the stored state and the time, so every rule is
//! tested without a clock or a server.

use std::{collections::BTreeMap, time::Duration};

use super::{HORIZON, LEAD, LOOKAHEAD, LOOSE_SPAN};
use crate::config::{RateUnit, SmtpConfig};

/// Spacing added to the rate's schedule, 0.75 % of the period (at most 50 ms; it costs the same
/// 0.75 % of the rate), so that a window cannot hold one message too many when dots are late: a
/// dot later than the guard gives up its unit and takes another. Dots are precise to a fraction of
/// a millisecond (see `Ticket::wait`), so most of the guard is left for the relay's own delay in
/// recording the end of data. Keeping half of it for the relay alone was tried: on a loaded 2-core
/// machine 0.2–0.5 % of dots came over 3.75 ms late and gave up their units, which cost that much
/// of the rate, and the Python test relay's stalls were larger than the half anyway.
const GUARD_PER_100K: i64 = 750;
const GUARD_MAX: Duration = Duration::from_millis(50);
/// Quota buckets: a window is counted in about this many, each at least a second wide. A window
/// frees one to two buckets late, so a quota-bound deployment uses `1 − 2 / BUCKETS` of it at
/// worst; 128 keeps that above 98 % (a 24 h quota in buckets of 11.25 min). With 64, two replicas
/// of ten workers on a 2 s relay within `329/1m` used 94.8 % of it; with 128, 99.0 %. The width
/// also bounds [`Plan::reach_ns`], so windows up to about two minutes ask on demand
/// (`Budget::short_reach`).
const BUCKETS: i64 = 128;
/// Share of the period set aside for loose grants: 0.25 %, so that guard and loose together cost at
/// most 1 % of the rate.
const LOOSE_GUARD_PER_100K: i64 = 250;
/// Loose grants only where that share holds at least this many units (budgets of about 51,200 per
/// period and more); below, units are far enough apart to be taken one by one.
const LOOSE_MIN: i64 = 64;
/// Under quotas, a burst's units are charged this much after a lead from their grant (or a reach,
/// if shorter): the time a slow first transaction has beyond the lead guessed for it.
const BURST_SLACK: Duration = Duration::from_secs(1);
/// How long after the pace's guess of a dot its grant's missed units may still move the pace on
/// to where the dot fell ([`refund_pace`]); later (another grant whose units share its `from_ns`,
/// or a replica that stalled), they stay counted instead, as before the move was known, rather
/// than hold the pace back for that long. A missed message asks again at its dot, a preparation
/// after its grant: seconds at most.
const ORIGIN_REACH: Duration = Duration::from_secs(10);
/// Under quotas, a grant's first usable moment is at most this far ahead (or two leads, if
/// longer), not the whole [`Plan::horizon_ns`]: every unit a replica holds is counted against the
/// quotas until its window passes, and a replica that dies strands what it holds. Waiting
/// workers asked for units usable two seconds ahead, their replica was killed, and those units
/// filled the first minute of 30 a minute (94.4 % of the quota used).
const QUOTA_HORIZON: Duration = Duration::from_secs(1);
/// Where the rate's window is counted exactly and there is a burst, the longest the largest
/// message's units may span on the schedule (see [`Plan::new`]). 100 ms and 10 s gave the same
/// explorations within two cases.
const MESSAGE_SPREAD_MAX: Duration = Duration::from_secs(1);

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
    /// Units a replica gave back unused (it ran out of letters, or stopped), in time order: the
    /// next grants take them first, at their places on the schedule.
    pub returned: Vec<Run>,
    /// The replicas that asked for units lately: (replica, when, in server nanoseconds). Their
    /// number is the stride of a grant to a replica whose units pass unused ([`decide`]).
    pub senders: Vec<(u64, i64)>,
    /// Where the rate's window is counted exactly and has a burst: when the rate's next unit is
    /// due at its own pace, in server nanoseconds ([`Plan::pace`]).
    pub paced_ns: i64,
    /// The latest `from_ns` of a grant under the pace so far (server nanoseconds).
    pub paced_floor_ns: i64,
    /// Units of grants whose `from_ns` lies before this are not given back to the pace
    /// ([`refund_pace`]): every grant made before the pace last moved on from a later dot than
    /// its own has one (it is at most `paced_floor_ns` as that move found it).
    pub paced_refund_from_ns: i64,
    /// Where the pace last moved on from a later dot than its own: that grant's guess of its dot,
    /// and its `from_ns` (server nanoseconds). If that grant's message misses its units, the
    /// pace moves on by as much as the dot came later ([`refund_pace`]).
    pub paced_origin: (i64, i64),
}

/// Units of the rate's schedule, `stride` intervals apart (1: consecutive; see [`decide`]): the
/// first one's time (server nanoseconds), how many, and `from_ns`, before which none of them is charged against the quotas (a lead after
/// their grant, and with a burst up to a second more; see [`Plan::placed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first_ns: i64,
    pub count: u32,
    pub from_ns: i64,
    pub stride: u32,
}

impl Run {
    /// The units from `from_ns` on: the run less those before, if any are left.
    pub(super) fn from(self, from_ns: i64, interval_ns: i64) -> Option<Run> {
        if self.first_ns >= from_ns {
            return Some(self);
        }
        let step = self.step(interval_ns);
        let past = ((from_ns - self.first_ns) as u64).div_ceil(step as u64) as i64;
        (past < i64::from(self.count)).then(|| Run {
            first_ns: self.first_ns + past * step,
            count: self.count - past as u32,
            ..self
        })
    }

    /// The time just after the last unit: where a run that continues this one starts.
    pub(super) fn end_ns(self, interval_ns: i64) -> i64 {
        self.first_ns + i64::from(self.count) * self.step(interval_ns)
    }

    /// The time between two of its units.
    pub(super) fn step(self, interval_ns: i64) -> i64 {
        interval_ns * i64::from(self.stride.max(1))
    }

    /// Its last unit's place.
    pub(super) fn last_ns(self, interval_ns: i64) -> i64 {
        self.first_ns + i64::from(self.count.max(1) - 1) * self.step(interval_ns)
    }
}

/// Units counted against the quotas where they are used: `count` units from `first_ns`,
/// `step_ns` apart (a scheduled run: the rate's interval; a loose grant: 0, all at its end), none
/// before `floor_ns` (those go to the floor's bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub first_ns: i64,
    pub count: u32,
    pub step_ns: i64,
    pub floor_ns: i64,
}

impl Placed {
    /// `count` units all charged at `at_ns` (a loose grant's end, or a run charged at its last
    /// unit).
    pub fn at(at_ns: i64, count: u32) -> Placed {
        Placed { first_ns: at_ns, count, step_ns: 0, floor_ns: i64::MIN }
    }

    /// `count` units of a run granted with `from_ns` whose last unit lies at `last_ns`, where the
    /// rate's window is counted exactly: charged there against that window, and against the
    /// quotas where the run's last unit becomes usable ([`Plan::buckets`]).
    pub fn at_end(last_ns: i64, count: u32, from_ns: i64) -> Placed {
        Placed { first_ns: last_ns, count, step_ns: 0, floor_ns: from_ns }
    }

    /// How many of the units fall in each bucket of `bucket_ns`, in bucket order.
    pub(super) fn per_bucket(self, bucket_ns: i64) -> Vec<(i64, u32)> {
        if self.count == 0 {
            return Vec::new();
        }
        if self.step_ns == 0 {
            return vec![(self.first_ns.max(self.floor_ns).div_euclid(bucket_ns), self.count)];
        }
        if self.first_ns < self.floor_ns {
            // The units before the floor, all in its bucket; the rest at their own places.
            let below =
                ((self.floor_ns - self.first_ns) as u64).div_ceil(self.step_ns as u64).min(u64::from(self.count));
            let rest = Placed {
                first_ns: self.first_ns + below as i64 * self.step_ns,
                count: self.count - below as u32,
                ..self
            };
            let mut buckets = vec![(self.floor_ns.div_euclid(bucket_ns), below as u32)];
            for (bucket, n) in rest.per_bucket(bucket_ns) {
                match buckets.last_mut() {
                    Some((last, held)) if *last == bucket => *held += n,
                    _ => buckets.push((bucket, n)),
                }
            }
            buckets.retain(|(_, n)| *n > 0);
            return buckets;
        }
        let last_ns = self.first_ns + i64::from(self.count - 1) * self.step_ns;
        let (first, last) = (self.first_ns.div_euclid(bucket_ns), last_ns.div_euclid(bucket_ns));
        // The index of the first unit at or after `at`.
        let index =
            |at: i64| ((at - self.first_ns).max(0) as u64).div_ceil(self.step_ns as u64).min(u64::from(self.count));
        (first..=last)
            .map(|b| (b, (index((b + 1) * bucket_ns) - index(b * bucket_ns)) as u32))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
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
/// Each unit is charged to the bucket of where it becomes usable: its place on the schedule less
/// the burst tolerance, and not before a lead after its grant (a loose grant's units, to the
/// bucket of its end). A unit is used no later than its place and the guard, and under quotas within
/// [`Plan::reach_ns`] of its charge, so a use is never more than a bucket after its charge (a
/// loose grant's use may come before it). A grant is allowed when the units charged since one bucket before the window's start,
/// and all those charged ahead, leave room: every window of the quota's length at the relay then
/// holds at most `limit` units (at the last grant whose units fall in a window, every unit used in
/// that window was granted and is still counted). It is conservative: a unit frees one to two
/// buckets after the window has passed it (a 24 h quota frees up to 2 × 11.25 min late). Units that
/// pass unused are given back ([`refund`]).
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
    /// A grant's first usable moment (its first unit, less the burst tolerance) is at most this
    /// far ahead of now; further, it waits.
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
    /// Under quotas, how long after it becomes usable a unit may still be taken to the relay
    /// (`i64::MAX`: until its place). See [`Plan::placed`].
    pub reach_ns: i64,
    pub unit: RateUnit,
    /// The rate's window counted exactly, as a quota is, where messages cost several units (a
    /// budget in recipients) and the schedule alone would have to leave room for the largest of
    /// them. See [`exact_window`].
    pub exact: Option<QuotaPlan>,
    /// Where the rate's window is counted exactly and `BURST` is more than 1: the rate's own
    /// interval and burst tolerance, `(interval, tolerance)` in nanoseconds. There the window
    /// holds `MAX + BURST − 1` a period and the schedule runs at eight times the rate, so the
    /// window alone let every period hold the burst again: SES's 14 recipients a second with a
    /// burst of 14 sent 24.3 a second for a minute, 100 per 10 s with a burst of 50 sent 149
    /// per 10 s. A grant's first message goes no sooner than the rate's pace allows, less its
    /// tolerance, and moves the pace on by the grant's units (the generic cell rate algorithm,
    /// a message of many units taken as soon as one is due): a burst after idle time, then the
    /// rate. With `BURST=1` the window is the rate's own and holds the rate by itself; there a
    /// pace with no tolerance at eight times the rate is kept only where the largest message
    /// would span more than [`MESSAGE_SPREAD_MAX`] of the schedule (see [`Plan::new`]).
    pub pace: Option<(i64, i64)>,
}

/// Where the rate's window is counted exactly: a budget in recipients whose largest message
/// would otherwise cost more than 1 % of the rate.
///
/// A message is handed over at its last unit, so on a schedule of evenly spaced units a message
/// of r units that starts before a window and ends in it brings r − 1 units from before: the
/// schedule alone holds the cap only by leaving that room every period, and for Amazon SES's 14
/// recipients a second with 50 recipients a message that was all but one unit: 1 recipient a
/// second. Token buckets and GCRA have the same bound (a bucket must hold the largest message).
/// So where the room would cost more than 1 %, the schedule spaces units for the whole rate and
/// the rate's window is counted like a quota, in buckets of a 1,024th of it, with every grant
/// charged at its last unit, where every message on it goes (`Pool::hand`). A grant there covers
/// one message, or at most a sixteenth of the rate's units spanning no more than 50 ms and the
/// burst's tolerance, which the schedule (at eight times the rate) lays within a 128th of the
/// window, so charging at the end frees at most that much late. A replica asks for what its waiting workers need (`Budget::stock_blocks`).
///
/// And wherever a burst is kept beside a quota and a message may cost more than one unit,
/// while grants are scheduled (not loose): there the window counted exactly and the pace are
/// the cap, and units that pass unused (the quota's reach is short) go back to the pace
/// ([`refund_pace`]). With the schedule as the cap they could not: a later grant's dots may have
/// come after them, so from its middle they were lost, and with them most of a burst (1,797
/// recipients a day with a burst of 1,215 beside 372 per 20 s, nine workers on a 2 s relay:
/// 1,061 of 1,227). `SIM_RECIPIENTS` cases below 95 %: 12 → 4 of 1,000 and 32 → 10 of 1,600 on
/// fresh seeds, none over. Not without a quota: there units seldom pass unused, and counted
/// exactly, replicas of slow relays ask per message and carried up to 6 % fewer letters (one
/// replica of nine on a 300 ms relay under 997 a second: 659 → 618 in 5 s).
///
/// And where a message's units, at their places on the schedule, span more than a quota's reach
/// (`spread`): counted exactly, the message's units are charged against the quotas where it goes.
fn exact_window(
    smtp: &SmtpConfig,
    largest_cost: u32,
    period_ns: i64,
    scheduled: bool,
    spread: bool,
) -> Option<QuotaPlan> {
    let room = i64::from(largest_cost) - 1;
    let limit = smtp.rate_max_letters.saturating_add(smtp.rate_burst - 1);
    let paced = scheduled && smtp.rate_burst > 1 && room > 0 && !smtp.quotas.is_empty();
    let counted = room * 100 > i64::from(smtp.rate_max_letters) || paced || (scheduled && room > 0 && spread);
    (smtp.rate_unit == RateUnit::Recipient && counted).then(|| QuotaPlan {
        key: "rate".to_owned(),
        label: format!("{}/{}", smtp.rate_max_letters, humantime::format_duration(smtp.rate_period)),
        limit,
        window_ns: period_ns,
        // Fine buckets: a message that waits for room waits for a bucket to leave the count,
        // up to a bucket and the guard late (buckets of a 64th of a second cost SES's rate 7 %
        // with letters of mixed sizes). A unit is used at most the guard after its charge, which
        // [`decide`] counts in, so the bucket itself may be narrower than the guard.
        bucket_ns: (period_ns / 1_024).max(1_000_000).min(period_ns),
    })
}

/// A quota's buckets: [`BUCKETS`] to its window, at least 250 ms (a window frees up to two
/// buckets late, which a 20 s window in 1 s buckets paid with a tenth of its quota).
fn quota_bucket_ns(window: Duration) -> i64 {
    let window_ns = window.as_nanos().min(i64::MAX as u128) as i64;
    (window_ns / BUCKETS).max(250_000_000).min(window_ns)
}

impl Plan {
    pub fn new(smtp: &SmtpConfig) -> Plan {
        let period_ns = smtp.rate_period.as_nanos().min(i64::MAX as u128) as i64;
        let smallest_window = smtp.quotas.iter().map(|q| q.limit).fold(smtp.rate_max_letters, u32::min);
        let largest_cost = match smtp.rate_unit == RateUnit::Recipient {
            true => (smtp.max_recipients as u32).min(smallest_window).max(1),
            false => 1,
        };
        let guard = (period_ns / 100_000 * GUARD_PER_100K).min(GUARD_MAX.as_nanos() as i64);
        let spacing =
            |per_period: i64, room: i64| ((period_ns + guard + room) as f64 / per_period as f64).ceil() as i64;
        let loose_room = period_ns / 100_000 * LOOSE_GUARD_PER_100K;
        let loose_units = |per_period: i64| loose_room / (2 * spacing(per_period, loose_room));
        // Grants are loose where the schedule, leaving the room for the largest message, would
        // give LOOSE_MIN units in a loose span.
        let unexact_per_period = i64::from(smtp.rate_max_letters - (largest_cost - 1)).max(1);
        let scheduled = loose_units(unexact_per_period) < LOOSE_MIN;
        // A message goes at its last unit, and on the schedule alone its units are charged
        // against the quotas at their own places: a message whose units span more than a quota's
        // reach used its first units later than the count allows, and a window held more than the
        // quota (1,429 recipients an hour beside 10 per 20 s, letters of 1 to 10: 14 in 20 s).
        let spread = (i64::from(largest_cost) - 1).saturating_mul(spacing(unexact_per_period, 0))
            > smtp.quotas.iter().map(|q| quota_bucket_ns(q.window) - 2 * guard).min().unwrap_or(i64::MAX);
        let exact = exact_window(smtp, largest_cost, period_ns, scheduled, spread);
        // A message is handed over at its last unit, so a message of r units starting before a
        // window and ending in it brings r − 1 units from before: the schedule leaves that room,
        // unless the window is counted exactly.
        // Where the window is counted exactly, the schedule only spreads the messages: at eight
        // times the rate, so that messages of different sizes, each placed where the window has
        // room, are not held back again by the spacing. At the rate itself letters of 1 to 10
        // recipients used 67–81 % of SES's 14 a second; at twice it, messages the room let go
        // together went one after another, each later message freeing its room as late: 93.3 %
        // of what the sizes allow in order at 30 a second.
        //
        // And with a burst, fast enough that the largest message's units span no more than
        // [`MESSAGE_SPREAD_MAX`]: there the pace and the window are the cap, and the pace lets a
        // message go once one unit is due, but its units lie consecutively on the schedule and it
        // goes at the last. At eight times a daily rate a letter of 50 waited 15 minutes for its
        // units with the day untouched (587 recipients a day with a burst of 12, letters of 1, 50
        // and 7: 1 recipient in 600 s of the 16 the burst and the rate allow).
        //
        // Without a burst the same, where the largest message's units would span more than
        // [`MESSAGE_SPREAD_MAX`] at eight times the rate: there a pace with no tolerance at eight
        // times the rate keeps the schedule's spread (one message at once, the next after its
        // units), and the letter of 50 goes when one unit is due rather than 49 later (763
        // recipients a day, letters of 1, 50 and 7: 1 recipient in 600 s, of the rate's 6).
        let eight_times_ns = spacing(8 * i64::from(smtp.rate_max_letters), 0);
        let spans_long =
            (i64::from(largest_cost) - 1).saturating_mul(eight_times_ns) > MESSAGE_SPREAD_MAX.as_nanos() as i64;
        let paced = exact.is_some() && (smtp.rate_burst > 1 || spans_long);
        let per_period = match exact {
            Some(_) if paced => (8 * i64::from(smtp.rate_max_letters))
                .max(i64::from(largest_cost).saturating_mul(period_ns) / MESSAGE_SPREAD_MAX.as_nanos() as i64),
            Some(_) => 8 * i64::from(smtp.rate_max_letters),
            None => unexact_per_period,
        };
        let loose_max = loose_units(per_period);
        let (interval_ns, loose_max) = match loose_max >= LOOSE_MIN && exact.is_none() {
            true => (spacing(per_period, loose_room), loose_max.min(i64::from(u32::MAX)) as u32),
            false => (spacing(per_period, 0), 0),
        };
        let quotas: Vec<QuotaPlan> = smtp
            .quotas
            .iter()
            .map(|q| {
                let window_ns = q.window.as_nanos().min(i64::MAX as u128) as i64;
                let bucket_ns = quota_bucket_ns(q.window);
                QuotaPlan {
                    key: format!("w{}", q.window.as_millis()),
                    label: q.to_string(),
                    limit: q.limit,
                    window_ns,
                    bucket_ns,
                }
            })
            .collect();
        let horizon_ns = HORIZON.as_nanos() as i64;
        // A unit used at most a bucket after its charge keeps the quotas' count exact (see
        // [`QuotaPlan`]); the dot's lateness and the replicas' clock uncertainty come off it.
        let reach_ns = match quotas.iter().map(|q| q.bucket_ns).min() {
            Some(bucket_ns) => bucket_ns - 2 * guard,
            None => i64::MAX,
        };
        // A burst is granted at once: after idle time up to BURST units are usable together.
        let max_grant = match &exact {
            // A sixteenth of the rate's units (the units of a thirty-second of the window when the
            // schedule ran at twice the rate; it now runs at eight times it).
            // And spanning no more than the longest guard (50 ms) and the burst's tolerance: every
            // message on a run goes at its end, where the run is charged (`Pool::hand`), and a
            // grant for several messages that spanned a 128th of a daily window held its first
            // message back eleven minutes. Spanning no more than the guard (7.5 ms a second), two
            // replicas of sixteen on a 1 ms relay under 1,295 a second (letters of 1 to 100) took
            // grants of 78 where two letters of 40 needed 80, and sent 5,817 of 6,410 (now 6,413).
            Some(window) => (window.window_ns / 32 / (interval_ns * 4))
                .min((GUARD_MAX.as_nanos() as i64 + i64::from(smtp.rate_burst - 1) * interval_ns) / interval_ns)
                .clamp(1, 1_000_000) as u32,
            None => {
                (LOOKAHEAD.as_nanos() as i64 / interval_ns).max(i64::from(smtp.rate_burst)).clamp(1, 1_000_000) as u32
            }
        };
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
            max_grant: match exact {
                Some(_) => max_grant,
                None => max_grant.max(largest_cost),
            },
            loose_max,
            loose_span_ns: LOOSE_SPAN.as_nanos() as i64,
            largest_cost,
            reach_ns,
            unit: smtp.rate_unit,
            pace: paced.then(|| match smtp.rate_burst {
                1 => (eight_times_ns, 0),
                burst => {
                    let interval_ns = (period_ns as f64 / f64::from(smtp.rate_max_letters)).ceil() as i64;
                    (interval_ns, i64::from(burst - 1) * interval_ns)
                }
            }),
            exact,
        }
    }

    /// Every window counted in buckets: the quotas, and the rate's where it is counted exactly.
    pub fn counted(&self) -> impl Iterator<Item = &QuotaPlan> {
        self.quotas.iter().chain(&self.exact)
    }

    /// Where the units of `run` are charged: each where it becomes usable ([`Plan::charged_ns`]),
    /// or, where the rate's window is counted exactly, all at the last unit's place.
    ///
    /// Charged at their places, a burst's units, used up to `BURST − 1` intervals before them,
    /// stayed counted against a quota until those places and a window had passed: 2,000 a day
    /// with a burst of 100 beside 40 per 10 minutes sent 40 at once and then one every 43 s
    /// (68 of 120 in 30 minutes). Charged where they become usable, each is used within
    /// [`Plan::reach_ns`] of its charge or not at all ([`Plan::due_ns`]), and the count holds.
    pub fn placed(&self, run: Run) -> Placed {
        match self.exact {
            Some(_) => Placed::at_end(run.last_ns(self.interval_ns), run.count, run.from_ns),
            None => Placed {
                first_ns: run.first_ns - self.tolerance_ns,
                count: run.count,
                step_ns: run.step(self.interval_ns),
                floor_ns: run.from_ns,
            },
        }
    }

    /// The buckets of `window` where `placed` is charged, and how many units in each.
    ///
    /// Where the rate's window is counted exactly, a run is charged against it at its last unit
    /// ([`Plan::placed`]), but against a quota where that unit becomes usable: its place less the
    /// burst tolerance, not before the grant's `from_ns`, and used within [`Plan::reach_ns`] of
    /// there, as every unit is where the window is not counted exactly. Charged at their places
    /// against the quotas too, a long burst's units, used at once, stayed counted until their
    /// places and a window had passed: 1,490 recipients a day with a burst of 853 beside 409 per
    /// 20 s sent 409 at once and then one recipient every 7 s, as a unit's place left the
    /// window (489 of the 863 the burst and the rate allow in 10 minutes).
    pub(super) fn buckets(&self, placed: Placed, window: &QuotaPlan) -> Vec<(i64, u32)> {
        match &self.exact {
            Some(exact) if exact.key == window.key => Placed::at(placed.first_ns, placed.count),
            Some(_) => Placed::at((placed.first_ns - self.tolerance_ns).max(placed.floor_ns), placed.count),
            None => placed,
        }
        .per_bucket(window.bucket_ns)
    }

    /// How much later than a lead from its grant a burst's units are charged ([`BURST_SLACK`]).
    fn burst_slack_ns(&self) -> i64 {
        match self.tolerance_ns {
            0 => 0,
            _ => self.reach_ns.min(BURST_SLACK.as_nanos() as i64),
        }
    }

    /// The soonest a message may go on the units of `run`: its grant counted the quotas from a
    /// bucket before the window that ends where a message on it could first be ready, a
    /// preparation after the grant ([`decide`]: `from_ns` less the burst slack), so a message that
    /// went more than a bucket before then could land in a window no grant counted whole (a 2 s
    /// relay's message, ready half a second before the lead it was granted on, put 2 in a 5 s
    /// window of 1); within a reach of it, the count holds. Without quotas, any time.
    pub fn earliest_use_ns(&self, run: Run) -> i64 {
        (run.from_ns - self.burst_slack_ns()).saturating_sub(self.reach_ns)
    }

    /// Where the unit at `place_ns` of `run` is charged against the quotas: where it becomes
    /// usable (its place less the burst tolerance), and not before the grant's `from_ns`. A unit
    /// may go before its charge (a burst's units, at once), never more than the reach after it.
    pub fn charged_ns(&self, run: Run, place_ns: i64) -> i64 {
        run.from_ns.max(place_ns - self.tolerance_ns)
    }

    /// The last moment a message on the units of `run` from `first_ns` to `last_ns` may go (less
    /// the lateness allowed): the last unit's place, and within [`Plan::reach_ns`] of where its
    /// first unit is charged (never before the last unit is charged: a message of many units
    /// would otherwise never go).
    pub fn due_ns(&self, run: Run, first_ns: i64, last_ns: i64) -> i64 {
        let reach = self.charged_ns(run, first_ns).saturating_add(self.reach_ns);
        last_ns.min(reach.max(self.charged_ns(run, last_ns)))
    }

    /// The most recipients one transaction carries: `SMTP_MAX_RECIPIENTS`, and in recipient mode
    /// no more than the largest message the budget allows (the smallest window). A letter with
    /// more recipients goes in transactions that each fit a window, one window after another;
    /// failed at once instead, SES's 14 recipients a second refused every letter to 15 addresses
    /// or more.
    pub fn transaction_recipients(&self, max_recipients: usize) -> usize {
        match self.unit {
            RateUnit::Letter => max_recipients,
            RateUnit::Recipient => max_recipients.min(self.largest_cost as usize),
        }
        .max(1)
    }

    /// Whether a transaction may carry part of its chunk ([`crate::budget::Budget::take_up_to`]):
    /// where the rate's window is counted exactly and there is no burst's pace, or beside quotas
    /// in recipients. Under the burst's pace a message goes once one of its units is due and
    /// nothing is left over, so a part there is only what the quotas have room for ([`decide`]):
    /// the rate's window cuts no message, as under the pace without quotas (cut to the window's
    /// room too, 366 recipients per 10 s with a burst of 118 beside 483 per 20 s, two replicas
    /// of eleven on a 300 ms relay, sent 95.4 % of the rate in 30 s, 97.2 % so). Whole, a
    /// message larger than a quota's room waited for the quota's window to free, and the
    /// smaller letters behind it with it: 1,838 recipients a second with a burst of 1,264
    /// beside 152 per 20 s, letters of 1 to 100, three replicas of eleven on a 300 ms relay,
    /// sent 395 recipients in 50 s where the quota allows 456 (in parts, all of them). Under
    /// the pace without tolerance (`BURST=1`, [`Plan::pace`]) the window's room is what binds,
    /// and a whole message waiting
    /// for its room was passed by smaller ones that fit what the window freed: 47 recipients a
    /// minute, letters of 1 to 100, two replicas of nine on a 300 ms relay, sent 97 in 180 s
    /// where whole messages in order allow 140; in parts, 140 of 141. On the schedule alone
    /// there is no window's room to fill, and parts of runs too short for a message cut letters
    /// into transactions of a few recipients where the workers bound (three replicas of two
    /// workers on a 2 s relay, letters of 1 to 10: 1,971 recipients in 30 s where whole ones sent
    /// 2,527). Beside a quota there is:
    /// a message that went whole left the quota's rest unused until the window freed, and 15
    /// recipients per 10 minutes in transactions of 10 went 11, 10 and 10 a window
    /// (`a_quota_with_less_room_than_a_message_lends_it_to_part_of_one`).
    pub fn splits_transactions(&self) -> bool {
        let beside_quotas = self.unit == RateUnit::Recipient && !self.quotas.is_empty() && self.loose_max == 0;
        beside_quotas || (self.exact.is_some() && !self.paced_with_burst())
    }

    /// Whether the rate's own pace is kept with a burst's tolerance ([`Plan::pace`]).
    fn paced_with_burst(&self) -> bool {
        self.pace.is_some_and(|(_, tolerance_ns)| tolerance_ns > 0)
    }

    /// The units of `run` whose due time is not before `cut_ns`, if any.
    pub fn alive(&self, run: Run, cut_ns: i64) -> Option<Run> {
        // due = min(place, charged + reach), non-decreasing in the place.
        let from_ns = match run.from_ns.saturating_add(self.reach_ns) >= cut_ns {
            true => cut_ns,
            false => cut_ns.max(cut_ns - self.reach_ns + self.tolerance_ns),
        };
        run.from(from_ns, self.interval_ns)
    }

    /// Whether units are charged at their places and used at them: no burst, no loose grants,
    /// no window counted exactly. There a message of several units may take them from before
    /// its preparation ends, its last unit at its dot ([`Need::early_ns`]).
    pub fn units_used_at_places(&self) -> bool {
        self.exact.is_none() && self.loose_max == 0 && self.tolerance_ns == 0
    }

    /// How long the configured rate takes to bring `units` (its own pace, not the schedule's,
    /// which may run faster): what a part of a message saves against waiting for the whole.
    pub(super) fn rate_brings_ns(&self, units: u32) -> i64 {
        i64::from(units).saturating_mul(self.period_ns / i64::from(self.rate_max.max(1)))
    }

    /// Units per second the schedule allows.
    pub fn rate(&self) -> f64 {
        1e9 / self.interval_ns as f64
    }
}

/// What the budget says to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `count` units, the first at `first_ns`, then every `stride` intervals, none charged
    /// before `from_ns`.
    Granted { first_ns: i64, count: u32, from_ns: i64, stride: u32 },
    /// `count` units to use at any moment until `until_ns`.
    Loose { until_ns: i64, count: u32 },
    /// Nothing before `until_ns` (server time), because of `window`.
    Wait { until_ns: i64, window: String },
}

/// The least a grant may be, and the units of the one message it is for: a message that may go
/// in part ([`crate::budget::Budget::take_up_to`]) takes from `least` units to all of its own
/// where the rate's window has room for no more, and the grant holds no more than the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub least: u32,
    pub message: u32,
    /// The consecutive units the replica asking holds up to the schedule's end as it last saw
    /// it, `(end_ns, count)`: too few for the message, which may take them with the grant's
    /// first units ([`joins_held`]).
    pub held: Option<(i64, u32)>,
    /// How long before the lead the message's first units may lie: its preparation, during
    /// which its earlier units may pass as long as its last lies at its dot
    /// ([`Plan::units_used_at_places`]). Placed from the lead on, a message of ten units waited
    /// at its dot for the nine intervals after its first: one replica of two workers on a 300 ms
    /// relay under 1,669 recipients per 10 s, letters of 1 to 10, sent 764 of the 864
    /// recipients its workers carry in 30 s.
    pub early_ns: i64,
}

impl From<u32> for Need {
    /// A message that goes whole, on units from the lead on.
    fn from(units: u32) -> Need {
        Need { least: units, message: units, held: None, early_ns: 0 }
    }
}

/// How many of the units `held` up to the schedule's end a grant from `start` continues, for a
/// message that needs more: where units are charged at their places and used at them (no burst,
/// no loose grants, no window counted exactly), and the schedule's end is where the replica's
/// units end, the message takes them and the grant's first units together (`Pool::add` joins
/// them into one run). The grant then needs only the rest, and its first usable moment is the
/// held run's. Without it, where a message's units span more than the horizon (an hourly budget
/// in recipients: ten units span 29 s), the rest of a grant sized for a smaller message stayed
/// in the pool, too short for the next message of ten, whose grant waited at the horizon until
/// that rest had all but passed: one replica of sixteen workers under 1,237 recipients an hour,
/// letters of 1 to 10, sent 176 of the 205 the rate allows in ten minutes.
fn joins_held(state: &State, plan: &Plan, start: i64, held: Option<(i64, u32)>, need: u32) -> u32 {
    match held {
        Some((end_ns, count))
            if count < need && end_ns == state.next_ns && start == state.next_ns && plan.units_used_at_places() =>
        {
            count
        }
        _ => 0,
    }
}

/// Decides a grant of `want` units (at least `need`, or none) at server time `now_ns`, none
/// sooner than `lead_ns` from now, and the state that records it. `ready_ns` (at most the lead):
/// the soonest from now a message prepared on the grant is expected at its dot, from which on the
/// quotas count its units.
///
/// Where the replica asking says its units pass unused (`asker`), the grant is strided: every
/// m-th unit of the schedule is its, m the number of replicas that asked lately, and the runs
/// between go to [`State::returned`], which the other replicas' next grants take first. Each
/// grant was a run of consecutive units at the rate's interval, and where a replica's workers
/// come at a slower pace most of it passed before they reached it: at 1,244 a second, three
/// replicas of ten on a 20 ms relay sent 3,124 letters in 5 s, 4,284 strided. The schedule
/// holds the same units at the same places either way, so the rate's cap is unchanged.
#[allow(clippy::too_many_arguments, reason = "the state, the plan, the clock, and what is asked")]
pub fn decide(
    state: &State,
    plan: &Plan,
    now_ns: i64,
    lead_ns: i64,
    ready_ns: i64,
    want: u32,
    need: impl Into<Need>,
    mut asker: Option<Asker>,
) -> (Decision, State) {
    let Need { least: need, message, held, early_ns } = need.into();
    // The senders as this grant leaves them, where they count (`None`: as they were).
    let (senders, stride) = match &asker {
        Some(asker) if stridable(plan) => {
            let span_ns = SENDERS_SPAN.as_nanos() as i64;
            let mut senders: Vec<(u64, i64)> = state
                .senders
                .iter()
                .copied()
                .filter(|(r, at)| *r != asker.replica && *at >= now_ns - span_ns)
                .collect();
            senders.push((asker.replica, now_ns));
            let stride = match asker.passing {
                true => senders.len().min(STRIDE_MAX) as u32,
                false => 1,
            };
            (Some(senders), stride)
        }
        _ => (None, 1),
    };
    let to_prepare = asker.is_some();
    // The lanes move into the request: nothing below reads them from the asker again.
    let (beside, far) = match &mut asker {
        Some(Asker { passing: true, lanes, far, .. }) => (std::mem::take(lanes), *far),
        _ => (Vec::new(), false),
    };
    let wanted = Wanted { want, need, message, held, early_ns, stride, to_prepare, beside, far };
    let (decision, mut next) = decide_units(state, plan, now_ns, lead_ns, ready_ns, wanted);
    // A replica whose pool runs low before a run of its own (strided runs reach far with few
    // units, `Pool::low`) asks for the runs between that lie sooner; a grant at or past that run
    // only takes the schedule on. Made anyway where the rate is far above what the replicas
    // use, each replica took the runs between of its own stride in turn, the schedule's end
    // ran a tenth of a second and more ahead of now, and every later grant lay past the pools'
    // horizon: three replicas of eleven on a 1 ms relay under 63,010 a second sent 43,164
    // letters in 5 s, 78,550 so (and 78,686 under 40,000, where grants are never loose).
    // Found by `SIM_HIGH=1` explorations.
    if let (Some(Asker { holds_from_ns: Some(held_ns), .. }), Decision::Granted { first_ns, .. }) = (&asker, &decision)
        && stridable(plan)
        && first_ns >= held_ns
    {
        return (Decision::Wait { until_ns: *held_ns, window: plan.rate_label.clone() }, state.clone());
    }
    if let Some(senders) = senders
        && !matches!(decision, Decision::Wait { .. })
    {
        next.senders = senders;
    }
    (decision, next)
}

/// The replica asking, for a grant on the schedule to a message still to be prepared.
#[derive(Debug, Clone)]
pub struct Asker {
    /// Its id, random per process.
    pub replica: u64,
    /// Whether a fair share of its units passes unused (`Pool::passing`): its workers come at a
    /// slower pace than runs of consecutive units.
    pub passing: bool,
    /// Whether the rate is far above what its workers use (`Budget::shares_a_rate_far_above`):
    /// the schedule's next units cost the other replicas nothing there.
    pub far: bool,
    /// The first and last places of the lanes (strided runs) it holds (`Pool::lanes`): where its
    /// units pass, a lane left between that lies beside one of them is not its (see [`reuse`]).
    pub lanes: Vec<(i64, i64)>,
    /// The first place of a run it holds beyond what its pool covers (`Pool::held_from`), if any:
    /// a strided grant from there on brings it nothing sooner, and is not made.
    pub holds_from_ns: Option<i64>,
}

/// Replicas that asked within this span count towards a strided grant's stride: two rounds of
/// the grants they ask for a lookahead at a time.
const SENDERS_SPAN: Duration = Duration::from_millis(2 * LOOKAHEAD.as_millis() as u64);
/// At most this many interleaved runs.
const STRIDE_MAX: usize = 8;

/// Whether grants may be strided: units taken one at a time at their places (no burst, no window
/// counted exactly, letters of one unit; a loose grant is never strided), no quota to charge the
/// units between to, and units close enough together for a replica's run to outpace its workers.
fn stridable(plan: &Plan) -> bool {
    uncounted_places(plan) && plan.largest_cost == 1 && plan.interval_ns * 4 <= LOOKAHEAD.as_nanos() as i64
}

/// Whether any place of the schedule may go to any replica, whoever was granted it: units taken
/// one at a time at their places (no burst) and nothing that counts them where they were granted
/// (no quota, no window counted exactly).
///
/// Where grants may be loose too (budgets of about 51,200 a period and more): a loose grant's
/// units are used anywhere in its span, but they are held against the loose allowance apart
/// ([`Plan::loose_max`]), and the grants on the schedule beside them are taken at their places
/// as anywhere else. The allowance is a quarter of a percent of the period, so most grants there
/// are on the schedule; left out, they were runs at the rate's pace, neither strided nor spanning
/// the pool's prefetch, and passed before the workers came back: three replicas of eleven on a
/// 1 ms relay under 63,010 a second sent 44,967 letters in 5 s, 78,550 so, and replicas of
/// six to sixteen on 20 ms relays 76–88 % of what they carry. Found by `SIM_HIGH=1`
/// explorations.
pub(super) fn uncounted_places(plan: &Plan) -> bool {
    plan.quotas.is_empty() && plan.exact.is_none() && plan.tolerance_ns == 0
}

/// Where the rate's window is counted exactly, how far ahead of now a message may be placed: its
/// lead, and a window and the guard for the room it may wait for (any message counted leaves the
/// window within that), within [`Plan::horizon_ns`]. A place is charged from the moment it is
/// granted, and a replica that dies strands every place it holds until the window passes it:
/// with the whole horizon, each waiting worker held a place up to 3 s ahead, and where two
/// replicas of eight workers on a 50 ms relay shared SES's 14 recipients a second (letters of 1
/// to 10, from one queue), killing one at 1.5 s left the next three seconds all but empty (93.5 %
/// of what the sizes allow in order; 100.6 % so). A worker whose place would lie further waits and
/// asks again, as under a quota.
///
/// Not for a message already at its dot (its unit came too late, and its DATA phase is open): it
/// takes the next place within the whole horizon. Told to wait too, it asked again and again
/// while the workers still to be prepared took the room before it, and one at its dot from the
/// start of sixteen workers on a 2 s relay under 14 recipients a second waited 3 s for a place
/// (95.0 % of what the sizes allow in order, against 100 %).
fn exact_horizon_ns(plan: &Plan, window: &QuotaPlan, lead_ns: i64) -> i64 {
    let guard_ns = plan.late.as_nanos() as i64;
    plan.horizon_ns.min(lead_ns.saturating_add(window.window_ns).saturating_add(guard_ns))
}

/// What [`decide_units`] grants: `want` units, `need` at least, every `stride` intervals, for
/// messages still to be prepared or for one at its dot; where the rate's window is counted
/// exactly, no more than a sixteenth of the rate's units, or the `message`'s own.
struct Wanted {
    want: u32,
    need: u32,
    message: u32,
    held: Option<(i64, u32)>,
    early_ns: i64,
    stride: u32,
    to_prepare: bool,
    /// The lanes the replica asking holds, where its units pass (else none).
    beside: Vec<(i64, i64)>,
    /// Whether the rate is far above what the replica asking uses ([`Asker::far`]).
    far: bool,
}

/// [`decide`] for the stride chosen.
fn decide_units(
    state: &State,
    plan: &Plan,
    now_ns: i64,
    lead_ns: i64,
    ready_ns: i64,
    wanted: Wanted,
) -> (Decision, State) {
    let Wanted { want, mut need, message, held, early_ns, stride, to_prepare, beside, far } = wanted;
    let ready_ns = ready_ns.min(lead_ns);
    match reuse(state, plan, now_ns, now_ns + lead_ns, want.max(need), need, &beside) {
        Ok(reused) => return reused,
        // Only a lane beside its own was left: the replica waits for its own units rather than
        // take the schedule on, unless the rate is far above what the replicas use.
        Err(Some(first_ns)) if !far => {
            return (Decision::Wait { until_ns: first_ns, window: plan.rate_label.clone() }, state.clone());
        }
        Err(_) => {}
    }
    // A unit may be used up to the burst tolerance before its place: after idle time (or on a
    // fresh budget) the next BURST units are usable at once, whatever the period. So the horizon
    // bounds a grant's first usable moment, not its place.
    // Not where the rate's window is counted exactly: there a replica asks only for what its
    // waiting workers need already (`Budget::stock_blocks`), and a message that waits for room in
    // the window waits past a second (letters of 1-100 recipients beside 2,000 a minute lost
    // 4 % of what the sizes allow with the shorter horizon). There a message still to be prepared
    // is placed no further than its lead and a window ahead ([`exact_horizon_ns`]).
    let horizon_ns = match (&plan.exact, plan.quotas.is_empty()) {
        (Some(window), _) if to_prepare => exact_horizon_ns(plan, window, lead_ns),
        (Some(_), _) | (None, true) => plan.horizon_ns,
        (None, false) => plan.horizon_ns.min((2 * lead_ns).max(QUOTA_HORIZON.as_nanos() as i64)),
    };
    let start = state.next_ns.max(now_ns + lead_ns);
    // A message that may go in part (`Need::least` below its units).
    let in_part = need < message;
    let joined = joins_held(state, plan, start, held, need);
    // A message that continues no units held ends its units at its dot, not begins them there
    // ([`Need::early_ns`]); a part of it, known once the quotas have spoken, is moved back so
    // that its own last unit does.
    let ends_at_dot = |units: u32| match joined == 0 && plan.units_used_at_places() {
        true => now_ns + lead_ns - (i64::from(units.max(1) - 1) * plan.interval_ns).min(early_ns.max(0)),
        false => now_ns + lead_ns,
    };
    let start = state.next_ns.max(ends_at_dot(message));
    need -= joined;
    let first_usable_ns = start - i64::from(joined) * plan.interval_ns - plan.tolerance_ns;
    if first_usable_ns > now_ns + horizon_ns {
        let until_ns = first_usable_ns - horizon_ns;
        return (Decision::Wait { until_ns, window: plan.rate_label.clone() }, state.clone());
    }
    // Units given back that no one can reach any more leave the list, and the quotas with them.
    let (returned, dead) = split_returned(&state.returned, now_ns + lead_ns, plan);
    let pruned = State { returned, ..refund(state, plan, now_ns, &dead) };
    let mut next = pruned.clone();
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
    next.quotas.retain(|key, _| plan.counted().any(|q| &q.key == key));
    // No unit of this grant is charged before a message on it can be ready (nor before its place
    // less the burst tolerance), so a window that ends before then holds none of them: the quotas
    // are counted from there. Counted from now, a replica waiting for a quota to free asked when
    // it did, and its first unit came a lead and a round trip later: 2.8 s of 100 recipients a
    // second lost at every minute's reopening of 2,000 a minute with 2 s sends. Counted from a
    // lead (half again the slowest preparation), a burst's messages, ready a preparation after
    // their grant, waited at their dots for the rest of it ([`Plan::earliest_use_ns`]): long
    // bursts beside 20 s quotas on 2 s sends carried 84 % of what their workers could. Without a
    // burst it changes nothing: the units lie a lead ahead.
    let charged_from_ns = (now_ns + ready_ns).max(start - plan.tolerance_ns);
    for quota in &plan.quotas {
        let buckets = next.quotas.entry(quota.key.clone()).or_default();
        // Kept from now: another replica's grant may be charged sooner than this one.
        let first_kept = (now_ns - quota.window_ns).div_euclid(quota.bucket_ns) - 1;
        buckets.retain(|bucket, _| *bucket >= first_kept);
        let first_counted = (charged_from_ns - quota.window_ns).div_euclid(quota.bucket_ns) - 1;
        let used: u64 = buckets.range(first_counted..).map(|(_, n)| u64::from(*n)).sum();
        let available = u64::from(quota.limit).saturating_sub(used);
        // Free for `units` when enough of the oldest buckets have left the counted range: bucket
        // b leaves it at (b + 2) buckets + the window, for units charged from then on, which a
        // grant asked for a lead and more before gives.
        let frees_ns = |units: u32| {
            let mut freed = 0;
            for (bucket, n) in buckets.range(first_counted..) {
                freed += u64::from(*n);
                if used - freed + u64::from(units) <= u64::from(quota.limit) {
                    return (bucket + 2) * quota.bucket_ns + quota.window_ns - (charged_from_ns - now_ns);
                }
            }
            now_ns + quota.window_ns
        };
        // A part of the message (what the quota has left) only where the whole would wait
        // longer than the rate brings the units the part leaves out, as against the rate's
        // window ([`Plan::splits_transactions`]).
        let whole_soon = in_part && plan.exact.is_none() && available < u64::from(message) && {
            let left_out = message - available as u32;
            frees_ns(message) - start <= plan.rate_brings_ns(left_out)
        };
        if available < u64::from(need) || whole_soon {
            // What was given back to the quotas is kept, for the caller to write.
            let state = if dead.is_empty() { state.clone() } else { pruned };
            let until_ns = frees_ns(if whole_soon { message } else { need });
            return (Decision::Wait { until_ns, window: quota.label.clone() }, state);
        }
        count = count.min(available as u32);
    }
    // Under a burst's pace a part is what the quotas have room for: the rate's window below
    // places the message whole (see [`Plan::splits_transactions`]).
    if in_part && plan.paced_with_burst() {
        need = need.max(message.min(count));
    }
    let mut start = start.max(ends_at_dot(message.min(count)));
    // Where the pace moved on from, if this grant found it behind its dot.
    let mut paced_moved_from = None;
    if let Some(window) = &plan.exact {
        // The message goes where the rate's window has room for it: no earlier than its last
        // unit's place, later if the windows around that place are full.
        let last_of_units = |start: i64, units: u32| start + i64::from(units.max(1) - 1) * plan.interval_ns;
        // A message goes from its last unit's place less the burst's tolerance to the guard after
        // it, and its units are charged at its grant's last unit, at or after that place. So
        // every unit used in a window that holds this message's dot was charged in a bucket from
        // the window before its earliest dot on, less the guard: `back_ns`. Counted from its
        // place less the guard only, a burst's early dot met windows whose earlier units were not
        // counted, and a budget in recipients with a burst broke its cap: 741 a minute with a
        // burst of 514, two replicas of one worker on a 1 ms relay, letters of 1 to 10, held
        // 1,736 recipients in a minute of 1,254 allowed.
        if let Some((_, pace_tolerance_ns)) = plan.pace {
            // The first message goes at its last unit's place less the tolerance: no sooner than
            // the pace allows.
            let earliest_ns = state.paced_ns - pace_tolerance_ns;
            let dot_ns = last_of_units(start, need) - plan.tolerance_ns;
            start += (earliest_ns - dot_ns).max(0);
        }
        let back_ns = plan.late.as_nanos() as i64 + plan.tolerance_ns;
        let first_counted = |at: i64| (at - window.window_ns - back_ns).div_euclid(window.bucket_ns);
        let buckets = next.quotas.entry(window.key.clone()).or_default();
        buckets.retain(|bucket, _| *bucket >= first_counted(now_ns));
        // Where a message of `units` goes from `start` on, and the room the window has there:
        // from the first bucket from which on the units counted leave room for it (bucket b is
        // no longer counted at a place from (b + 1) buckets + the window + `back_ns` on).
        let placed_for = |start: i64, units: u32| {
            let mut held: u64 = buckets.values().map(|n| u64::from(*n)).sum();
            let mut from_ns = last_of_units(start, units);
            for (bucket, n) in buckets.iter() {
                if held + u64::from(units) <= u64::from(window.limit) {
                    break;
                }
                held -= u64::from(*n);
                from_ns = from_ns.max((bucket + 1) * window.bucket_ns + window.window_ns + back_ns);
            }
            (from_ns - (last_of_units(start, units) - start), u64::from(window.limit).saturating_sub(held))
        };
        let (part_at, room) = placed_for(start, need);
        // A part of the message (what the window has room for at its soonest place) only where
        // the whole (as much of it as the quotas leave room for) would come later than the rate
        // brings the units the part leaves out: held back by the window's earlier messages, not
        // by the rate. A part costs the worker a transaction more, and taken wherever the window
        // had less room than a message, parts cut the messages of sixteen workers on a 2 s relay
        // (30 recipients a second, letters of 1 to 10) to a few recipients each, and the workers
        // sent 720 recipients in 30 s of the 864 the window lets through.
        let whole = message.min(count);
        let left_out = whole.saturating_sub(u32::try_from(room).unwrap_or(u32::MAX));
        let rate_brings_ns = plan.rate_brings_ns(left_out);
        // From the same first place, the whole's last unit lies further along the schedule
        // anyway: only what the window adds counts (compared at their last units, every message
        // of several units went in parts of one, wherever the window had room).
        let whole_at =
            (whole > need).then(|| placed_for(start, whole).0).filter(|whole_at| whole_at - part_at <= rate_brings_ns);
        start = match whole_at {
            Some(whole_at) => {
                need = whole;
                whole_at
            }
            // Under a pace a grant carries no more units than its message needs (below), so the
            // part is what the window has room for, not the least the transaction may carry:
            // taken at one unit, letters under the pace without a burst went a recipient a
            // transaction wherever the window freed a unit at a time (47 recipients a minute,
            // letters of 1 to 100, two replicas of nine: 59 transactions for 140 recipients, 14
            // so; 5 for 141 on the schedule alone, which sent the 47s whole).
            None => match whole.min(u32::try_from(room).unwrap_or(u32::MAX)) {
                part if plan.pace.is_some() && part > need => {
                    need = part;
                    placed_for(start, part).0
                }
                _ => part_at,
            },
        };
        if start - plan.tolerance_ns > now_ns + horizon_ns {
            let until_ns = start - plan.tolerance_ns - horizon_ns;
            let state = if dead.is_empty() { state.clone() } else { pruned };
            return (Decision::Wait { until_ns, window: window.label.clone() }, state);
        }
        let counted: u64 = buckets.range(first_counted(last_of_units(start, need))..).map(|(_, n)| u64::from(*n)).sum();
        count = count
            .min(u64::from(window.limit).saturating_sub(counted) as u32)
            .min(plan.max_grant.max(need).max(message));
        if let Some((pace_ns, pace_tolerance_ns)) = plan.pace {
            // This message goes once one unit is due at the pace (a message may cost more than
            // the burst); the grant's units beyond it, only as many as are due by then. Its dot
            // comes from its last unit's place less the tolerance on, and not before it is
            // prepared: the units due are counted at the soonest, and where the pace has fallen
            // behind (after idle time) it moves on from a lead from now, the latest the dot is
            // expected, so that a dot later than guessed does not bunch the next grants' units
            // behind it.
            let soonest_ns = (last_of_units(start, need) - plan.tolerance_ns).max(now_ns);
            let latest_guess_ns = soonest_ns.max(now_ns + lead_ns);
            let due = ((soonest_ns + pace_tolerance_ns - state.paced_ns.max(soonest_ns)) / pace_ns + 1)
                .clamp(0, i64::from(u32::MAX));
            count = count.min(need.max(due as u32));
            paced_moved_from = (state.paced_ns < latest_guess_ns).then_some(latest_guess_ns);
            next.paced_ns = state.paced_ns.max(latest_guess_ns) + i64::from(count) * pace_ns;
        }
    }
    // A loose grant's units are used until the message that takes the last of them is ready: a
    // lead after the grant and the span (a lead longer than the span once left every loose unit
    // unusable, and nothing was sent).
    let loose_until_ns = now_ns + lead_ns + plan.loose_span_ns;
    // A burst's units, usable at once, are charged no sooner than a message prepared on them can
    // be ready, and some slack after it: the preparation is a guess until a transaction has been
    // measured, and a 2 s relay's first messages, prepared in a second where the lead guessed
    // 100 ms, missed the reach of their charge and wasted the burst.
    let from_ns = now_ns + ready_ns + plan.burst_slack_ns();
    if plan.pace.is_some() {
        // Known by their `from_ns`, which grows with a grant's time but for its lead: the grants
        // made before this move all have one at or before the latest so far.
        if let Some(origin_ns) = paced_moved_from {
            next.paced_refund_from_ns = state.paced_floor_ns.saturating_add(1);
            next.paced_origin = (origin_ns, from_ns);
        }
        next.paced_floor_ns = state.paced_floor_ns.max(from_ns);
    }
    let placed = match loose {
        true => Placed::at(loose_until_ns, count),
        false => plan.placed(Run { first_ns: start, count, from_ns, stride: 1 }),
    };
    charge(&mut next, plan, placed);
    // Every stride-th unit for this replica, the runs between for the others; not a grant of one
    // unit, nor a loose one (its units are used anywhere in its span).
    let stride = match loose || count == 1 {
        true => 1,
        false => stride,
    };
    // The places this grant leaps over (the schedule's end lay less than a lead ahead) are of use
    // to a message already at its dot, whose grant lies a round trip ahead: they go to the
    // returned runs, one unit a place as ever. Placed at the schedule's new end instead, the
    // missed first messages of one of two replicas on a 2 s relay waited 1.7 s at their dots
    // for the places after the other's grant a lead ahead. Not under a quota, which never
    // counted them, nor with a burst, nor for a loose grant.
    let returned = next.returned.len();
    if !loose && uncounted_places(plan) {
        let behind = (now_ns - state.next_ns).max(0);
        let first_ns = state.next_ns + (behind + plan.interval_ns - 1) / plan.interval_ns * plan.interval_ns;
        let skipped = (start - first_ns) / plan.interval_ns;
        if skipped > 0 {
            let count = skipped.min(i64::from(u32::MAX)) as u32;
            next.returned.push(Run { first_ns, count, from_ns: now_ns, stride: 1 });
        }
    }
    next.next_ns = start + i64::from(count) * i64::from(stride) * plan.interval_ns;
    for j in 1..i64::from(stride) {
        next.returned.push(Run { first_ns: start + j * plan.interval_ns, count, from_ns, stride });
    }
    if next.returned.len() > returned {
        next.returned.sort_by_key(|run| run.first_ns);
    }
    next.version = state.version + 1;
    if loose {
        // Alive until its last use, and until its last place on the schedule.
        let until_ns = loose_until_ns.max(next.next_ns);
        next.loose.push(LooseGrant { from_ns: now_ns, until_ns, count });
        return (Decision::Loose { until_ns: loose_until_ns, count }, next);
    }
    (Decision::Granted { first_ns: start, count, from_ns, stride }, next)
}

/// Counts `placed` against every quota, each unit in the bucket of its charge.
fn charge(state: &mut State, plan: &Plan, placed: Placed) {
    for quota in plan.counted() {
        let buckets = state.quotas.entry(quota.key.clone()).or_default();
        for (bucket, n) in plan.buckets(placed, quota) {
            *buckets.entry(bucket).or_default() += n;
        }
    }
}

/// Splits runs given back into the units still usable at `earliest_ns` and those passed.
fn split_returned(runs: &[Run], earliest_ns: i64, plan: &Plan) -> (Vec<Run>, Vec<Placed>) {
    let mut alive = Vec::new();
    let mut dead = Vec::new();
    for run in runs {
        let ahead = plan.alive(*run, earliest_ns);
        let kept = ahead.map_or(0, |a| a.count);
        if kept < run.count {
            dead.push(plan.placed(Run { count: run.count - kept, ..*run }));
        }
        alive.extend(ahead);
    }
    (alive, dead)
}

/// The state with units that passed unused given back to the quotas, each to the bucket it was
/// counted in. They never reached the relay and no one can use them any more (a unit expires
/// once it is past by more than the guard), so counting them would only waste the quota: with a
/// daily quota and the rate left high, a grant reserved more units than the workers could use
/// before they passed, and most of each window was lost. A bucket no longer counted has nothing
/// to give back to.
pub fn refund(state: &State, plan: &Plan, now_ns: i64, unused: &[Placed]) -> State {
    let mut next = state.clone();
    for quota in plan.counted() {
        let Some(buckets) = next.quotas.get_mut(&quota.key) else { continue };
        let first_counted = (now_ns - quota.window_ns).div_euclid(quota.bucket_ns) - 1;
        for placed in unused {
            for (bucket, n) in plan.buckets(*placed, quota) {
                if bucket < first_counted {
                    continue;
                }
                if let Some(held) = buckets.get_mut(&bucket) {
                    *held = held.saturating_sub(n);
                    if *held == 0 {
                        buckets.remove(&bucket);
                    }
                }
            }
        }
    }
    next
}

/// The state with units that passed unused given back to the rate's pace and to the schedule
/// too, where the pace is kept ([`Plan::pace`]). Both moved on by every unit granted, and kept
/// counted, such units spent the burst: the rest of grants sized for several messages of the
/// size of the one asking, and the units of messages that reached their dots too late for them.
/// On the schedule, which runs at eight times the rate there and lets `BURST` of its own units go
/// at once, they kept their places: 1,355 recipients a day with a burst of 841 beside 108 a
/// minute, letters of 1, 50 and 7, left a third of each grant unused, ran out of the schedule's
/// tolerance after 573 recipients and waited 200 s (573 of the 813 the burst and the rate allow in
/// order in 10 minutes; 863 so). The places such units leave may be granted again: the cap is the
/// window counted exactly and the pace, not the schedule.
///
/// Where the grant that last moved the pace on from a later dot than its own missed its units,
/// its message's dot came later than the pace's guess of it (a lead from the grant), and given
/// back as they are, its units let the pace count the run from too soon: two periods of 569 a
/// minute with a burst of 328 held 1,481 recipients of the 1,474 allowed, the first messages of
/// a 2 s relay having missed their units on the lead's first guess, a second early. So the pace
/// first moves on by as much as the refund comes after that guess (`State::paced_origin`; the
/// refund comes at or after the message's real dot). Kept counted instead, that first round's
/// units were lost: 923 an hour with a burst of 258 beside 449 per 20 s, two replicas of four
/// on a 2 s relay, sent 237 of the 407 the burst and the rate allow in order (414 so).
///
/// Not the units of a grant made before the pace last moved on from a later dot than its own:
/// that move spent them. Such a grant is known by its `from_ns`, the units' floor
/// (`State::paced_refund_from_ns`), so that the grant that moves the pace on gives its own unused
/// units back (ruled out with the grants of the next 2.5 s before, 249 an hour with a burst of
/// 231 sent 205 of 263); without this rule the explored cases change by a few units in three of
/// 1,000, none over.
pub fn refund_pace(mut state: State, plan: &Plan, now_ns: i64, passed: &[Placed], missed: &[Placed]) -> State {
    let Some((pace_ns, _)) = plan.pace else { return state };
    let (origin_ns, origin_floor_ns) = state.paced_origin;
    let mut kept_floor_ns = None;
    if missed.iter().any(|placed| placed.floor_ns == origin_floor_ns) && now_ns > origin_ns {
        match now_ns - origin_ns <= ORIGIN_REACH.as_nanos() as i64 {
            true => {
                state.paced_ns += now_ns - origin_ns;
                state.paced_origin = (now_ns, origin_floor_ns);
            }
            false => kept_floor_ns = Some(origin_floor_ns),
        }
    }
    let units: i64 = passed
        .iter()
        .chain(missed.iter().filter(|placed| Some(placed.floor_ns) != kept_floor_ns))
        .filter(|placed| placed.floor_ns >= state.paced_refund_from_ns)
        .map(|placed| i64::from(placed.count))
        .sum();
    State { paced_ns: state.paced_ns - units * pace_ns, next_ns: state.next_ns - units * plan.interval_ns, ..state }
}

/// A grant from units given back, when some are still ahead of `earliest_ns` and enough of them
/// in a row. They keep their places on the schedule, so the spacing holds as if their first
/// replica had used them; and they were counted against the quotas when first granted, so they
/// are not counted again.
///
/// A strided run goes whole, whatever is wanted: it is one of the lanes a strided grant left to
/// the other replicas ([`decide`]), every stride-th unit over that grant's span, and the replica
/// that takes it keeps to it. Taken in part (what the replica asking used in a lookahead), its
/// rest went back, and the next replica to ask took it, whichever lane it already held: a
/// replica held two lanes at once and used what its workers could of them, another found none
/// left and waited for the schedule's end. Three replicas of fourteen workers on a 20 ms relay
/// under 1,378 letters a second: each replica went without units for up to 0.6 s at a time,
/// and 5,696 letters went in 5 s (82.8 % of the rate); lanes taken whole, every tenth of a
/// second from 0.9 s on holds 136 or 137 of the rate's 137.8, 6,208 letters.
///
/// Nor does a replica whose units pass take a lane that lies beside one it holds (`beside`, over
/// the same span): it cannot use the one it has, and the replica whose lane it was is left
/// without units. Taken anyway, the replicas settled into turns where one held two lanes of a
/// span and another none: three replicas of three workers on a 20 ms relay at 514 a second,
/// started with their first measured preparation as the estimate (a trial), sent 68.3 % of what
/// they carry in 5 s, and each replica's workers waited at their turn a third of the time; with
/// the lane left to the others, 98.2 %. As the code stands that case sends 98.1 % (96.5 %
/// before), and 83,935 a second with three replicas of ten on a 1 ms relay 96.9 % (94.6 %). It
/// takes a lane further on instead; with none, the schedule's next units where the rate is far
/// above what the replicas use (told to wait there too, three replicas of nine on a 20 ms relay
/// under 13,960 a second sent 96.5 % of what they carry; 98.6 % so), and else it waits for
/// that lane's first place, its own units meanwhile (taking the schedule on there, three
/// replicas of nine on a 20 ms relay under 896 a second sent 83.4 % of the rate; 95.5 % so).
///
/// `Err` when no lane is taken, with the first place of the first lane left for lying beside one
/// of `beside`, if any.
fn reuse(
    state: &State,
    plan: &Plan,
    now_ns: i64,
    earliest_ns: i64,
    want: u32,
    need: u32,
    beside: &[(i64, i64)],
) -> Result<(Decision, State), Option<i64>> {
    let (mut returned, dead) = split_returned(&state.returned, earliest_ns, plan);
    let fits = |run: &Run| run.count >= need;
    let Some(index) = returned.iter().position(|run| fits(run) && !lies_beside(plan, run, beside)) else {
        return Err(returned.iter().find(|run| fits(run)).map(|run| run.first_ns));
    };
    let run = &mut returned[index];
    let count = match run.stride > 1 {
        true => run.count,
        false => want.min(run.count),
    };
    let decision = Decision::Granted { first_ns: run.first_ns, count, from_ns: run.from_ns, stride: run.stride };
    run.first_ns += i64::from(count) * run.step(plan.interval_ns);
    run.count -= count;
    returned.retain(|run| run.count > 0);
    let next = refund(state, plan, now_ns, &dead);
    Ok((decision, State { version: state.version + 1, returned, ..next }))
}

/// Whether `run` is a lane whose span meets one of the lanes in `beside`.
fn lies_beside(plan: &Plan, run: &Run, beside: &[(i64, i64)]) -> bool {
    let last_ns = run.last_ns(plan.interval_ns);
    run.stride > 1
        && beside.iter().any(|(first_ns, held_last_ns)| *first_ns <= last_ns && *held_last_ns >= run.first_ns)
}

/// The state with `runs` given back: they join the returned units, and those already past
/// `now_ns` are dropped.
pub fn give_back(state: &State, plan: &Plan, now_ns: i64, runs: &[Run]) -> State {
    let all: Vec<Run> = state.returned.iter().chain(runs).copied().collect();
    let (mut returned, dead) = split_returned(&all, now_ns, plan);
    returned.sort_by_key(|run| run.first_ns);
    let next = refund(state, plan, now_ns, &dead);
    State { version: state.version + 1, returned, ..next }
}

/// The units of the rate's window left at `now_ns` where it is counted exactly (the units
/// charged from a window before it on, those placed ahead included), and their share of it;
/// else `None`.
pub fn exact_room(state: &State, plan: &Plan, now_ns: i64) -> Option<(u64, f64)> {
    let window = plan.exact.as_ref()?;
    let left = u64::from(window.limit).saturating_sub(counted_now(state, window, now_ns));
    Some((left, left as f64 / f64::from(window.limit.max(1))))
}

/// The units a window counted in buckets holds at `now_ns`, those placed ahead included.
fn counted_now(state: &State, window: &QuotaPlan, now_ns: i64) -> u64 {
    let first_counted = (now_ns - window.window_ns).div_euclid(window.bucket_ns) - 1;
    state.quotas.get(&window.key).map(|b| b.range(first_counted..).map(|(_, n)| u64::from(*n)).sum()).unwrap_or(0)
}

/// Used and remaining units of every window at `now_ns`, for the metrics.
pub fn usage(state: &State, plan: &Plan, now_ns: i64) -> Vec<(String, u64, u64)> {
    let ahead = (state.next_ns - now_ns).max(0);
    let reserved = ((ahead as f64 / plan.interval_ns as f64).ceil() as u64).min(u64::from(plan.rate_max));
    let mut windows = vec![(plan.rate_label.clone(), reserved, u64::from(plan.rate_max) - reserved)];
    for quota in plan.counted() {
        let used = counted_now(state, quota, now_ns);
        windows.push((quota.label.clone(), used, u64::from(quota.limit).saturating_sub(used)));
    }
    if plan.exact.is_some() {
        // The rate's window as counted, not as the schedule's units ahead.
        windows.swap_remove(0);
    }
    windows
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::budget) fn smtp(pairs: &[(&str, &str)]) -> SmtpConfig {
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

    pub(in crate::budget) const S: i64 = 1_000_000_000;

    /// A replica whose units pass gets every m-th unit, m the replicas that asked lately; the
    /// runs between go to the others first, and together the grants hold each place of the
    /// schedule once, an interval apart, as consecutive grants would.
    #[test]
    fn a_strided_grant_leaves_the_units_between_to_the_other_replicas() {
        let plan = Plan::new(&smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "200")]));
        let now = 1_800_000_000 * S;
        let asker =
            |replica, passing| Some(Asker { replica, passing, holds_from_ns: None, far: false, lanes: Vec::new() });
        let decide_for = |state: &State, replica, passing, want| {
            decide(state, &plan, now, plan.lead_ns, plan.lead_ns, want, 1, asker(replica, passing))
        };
        // Three replicas ask; none of their units pass yet: consecutive runs.
        let mut state = State::default();
        for replica in [1, 2, 3] {
            let (decision, next) = decide_for(&state, replica, false, 2);
            assert!(matches!(decision, Decision::Granted { stride: 1, count: 2, .. }), "{decision:?}");
            state = next;
        }
        assert_eq!(state.senders.len(), 3);
        // Replica 1's units pass: every third unit of its next grant is its.
        let (decision, next) = decide_for(&state, 1, true, 4);
        let Decision::Granted { first_ns, count: 4, stride: 3, .. } = decision else { panic!("{decision:?}") };
        assert_eq!(next.next_ns, first_ns + 12 * plan.interval_ns);
        assert_eq!(next.returned.len(), 2);
        state = next;
        // The others take the runs between, before the schedule's next units.
        let mut places = vec![
            first_ns,
            first_ns + 3 * plan.interval_ns,
            first_ns + 6 * plan.interval_ns,
            first_ns + 9 * plan.interval_ns,
        ];
        for replica in [2, 3] {
            let (decision, next) = decide_for(&state, replica, false, 4);
            let Decision::Granted { first_ns, count: 4, stride: 3, from_ns } = decision else { panic!("{decision:?}") };
            let run = Run { first_ns, count: 4, from_ns, stride: 3 };
            places.extend((0..4).map(|i| first_ns + i * run.step(plan.interval_ns)));
            state = next;
        }
        assert!(state.returned.is_empty(), "{:?}", state.returned);
        places.sort();
        let expected: Vec<i64> = (0..12).map(|i| first_ns + i * plan.interval_ns).collect();
        assert_eq!(places, expected);
        // A replica that stopped asking no longer counts: alone, consecutive again.
        let later = now + SENDERS_SPAN.as_nanos() as i64 + 1;
        let (decision, _) = decide(&state, &plan, later, plan.lead_ns, plan.lead_ns, 4, 1, asker(1, true));
        assert!(matches!(decision, Decision::Granted { stride: 1, .. }), "{decision:?}");
    }

    /// A lane a strided grant left to the others goes whole to the replica that takes it, however
    /// few units it asks for: in part, its rest went to whichever replica asked next, beside the
    /// lane that one held, and the replica whose lane it was found none.
    #[test]
    fn a_lane_left_to_the_others_goes_whole() {
        let plan = Plan::new(&smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "200")]));
        let now = 1_800_000_000 * S;
        let asker =
            |replica, passing| Some(Asker { replica, passing, holds_from_ns: None, far: false, lanes: Vec::new() });
        let mut state = State::default();
        for replica in [1, 2, 3] {
            state = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 2, 1, asker(replica, false)).1;
        }
        let (decision, next) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 40, 1, asker(1, true));
        let Decision::Granted { count: 40, stride: 3, .. } = decision else { panic!("{decision:?}") };
        let lanes = next.returned.clone();
        assert_eq!(lanes.iter().map(|lane| lane.count).collect::<Vec<_>>(), [40, 40]);
        // Replicas 2 and 3 have used a few units a lookahead so far; each takes one lane whole.
        state = next;
        for (replica, lane) in [2, 3].into_iter().zip(lanes) {
            let (decision, next) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 5, 1, asker(replica, false));
            let Decision::Granted { first_ns, count, stride, .. } = decision else { panic!("{decision:?}") };
            assert_eq!((first_ns, count, stride), (lane.first_ns, 40, 3), "replica {replica}");
            state = next;
        }
        assert!(state.returned.is_empty(), "{:?}", state.returned);
    }

    /// A replica whose units pass is not given a lane that lies beside one it holds (over the same
    /// span): its workers cannot use the one they have, and the replica whose lane it was would
    /// find none. With no other lane it waits for that lane's first place (its own units carry it
    /// meanwhile), the state left as it was; where the rate is far above what the replicas use, it
    /// takes the schedule's next units. The lane stays for a replica that holds none there.
    #[test]
    fn a_replica_whose_units_pass_is_not_given_a_second_lane_over_the_same_span() {
        let plan = Plan::new(&smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "200")]));
        let now = 1_800_000_000 * S;
        let asker = |replica, passing, far, lanes| Some(Asker { replica, passing, holds_from_ns: None, far, lanes });
        let decide_for = |state: &State, replica, passing, far, lanes| {
            decide(state, &plan, now, plan.lead_ns, plan.lead_ns, 5, 1, asker(replica, passing, far, lanes))
        };
        let mut state = State::default();
        for replica in [1, 2, 3] {
            state = decide_for(&state, replica, false, false, Vec::new()).1;
        }
        let (decision, next) =
            decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 40, 1, asker(1, true, false, Vec::new()));
        let Decision::Granted { count: 40, stride: 3, .. } = decision else { panic!("{decision:?}") };
        state = next;
        // Replica 2 takes the first lane left between.
        let (decision, next) = decide_for(&state, 2, true, false, Vec::new());
        let Decision::Granted { first_ns, count: 40, stride: 3, from_ns } = decision else { panic!("{decision:?}") };
        let own = Run { first_ns, count: 40, from_ns, stride: 3 };
        let span = (own.first_ns, own.last_ns(plan.interval_ns));
        state = next;
        let left = state.returned.clone();
        assert_eq!(left.len(), 1, "{left:?}");
        // Asking again while that lane is its own and its units pass: it waits for the other
        // lane's first place, and the state is as it was.
        let (decision, next) = decide_for(&state, 2, true, false, vec![span]);
        assert!(matches!(decision, Decision::Wait { until_ns, .. } if until_ns == left[0].first_ns), "{decision:?}");
        assert_eq!(next, state);
        // Under a rate far above the replicas' use, the schedule's next units; the lane stays.
        let (decision, next) = decide_for(&state, 2, true, true, vec![span]);
        assert!(matches!(decision, Decision::Granted { first_ns, .. } if first_ns == state.next_ns), "{decision:?}");
        assert_eq!(next.returned.first(), left.first(), "{:?}", next.returned);
        // Its units used (not passing), it takes the lane.
        let (decision, _) = decide_for(&state, 2, false, false, vec![span]);
        assert!(matches!(decision, Decision::Granted { first_ns, .. } if first_ns == left[0].first_ns), "{decision:?}");
        // A lane it held that ended before this one does not keep it from it.
        let before = (span.0 - 400 * plan.interval_ns, span.0 - 300 * plan.interval_ns);
        let (decision, _) = decide_for(&state, 2, true, false, vec![before]);
        assert!(matches!(decision, Decision::Granted { first_ns, .. } if first_ns == left[0].first_ns), "{decision:?}");
        // Replica 3, which holds no lane there, takes it whole.
        let (decision, next) = decide_for(&state, 3, true, false, Vec::new());
        let Decision::Granted { first_ns, count: 40, stride: 3, .. } = decision else { panic!("{decision:?}") };
        assert_eq!(first_ns, left[0].first_ns);
        assert!(next.returned.is_empty(), "{:?}", next.returned);
    }

    /// A replica that holds a run past its pool's horizon and asks again gets a lane between
    /// that lies sooner, but nothing at or past its own run: that would only take the schedule
    /// on, and the state is left as it was.
    #[test]
    fn a_grant_past_a_run_the_replica_holds_is_not_made() {
        let plan = Plan::new(&smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "200")]));
        let now = 1_800_000_000 * S;
        let asker = |replica, holds_from_ns| {
            Some(Asker { replica, passing: true, holds_from_ns, far: false, lanes: Vec::new() })
        };
        let mut state = State::default();
        for replica in [1, 2, 3] {
            state = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 2, 1, asker(replica, None)).1;
        }
        // Replica 1 takes every third unit of the next 120; the lanes between are the others'.
        let (decision, next) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 40, 1, asker(1, None));
        let Decision::Granted { first_ns: held_ns, count: 40, stride: 3, .. } = decision else {
            panic!("{decision:?}")
        };
        state = next;
        // Asking again while it holds that run, it would get a lane of the same span, no sooner.
        let (decision, next) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 40, 1, asker(1, Some(held_ns)));
        assert!(matches!(decision, Decision::Wait { until_ns, .. } if until_ns == held_ns), "{decision:?}");
        assert_eq!(next, state);
        // A lane that starts before the run it holds is still its to take.
        let (decision, _) = decide(
            &state,
            &plan,
            now,
            plan.lead_ns,
            plan.lead_ns,
            40,
            1,
            asker(1, Some(held_ns + 2 * plan.interval_ns)),
        );
        let Decision::Granted { first_ns, stride: 3, .. } = decision else { panic!("{decision:?}") };
        assert_eq!(first_ns, held_ns + plan.interval_ns);
        // Without a run held, the same request takes a lane.
        let (decision, _) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 40, 1, asker(2, None));
        assert!(matches!(decision, Decision::Granted { stride: 3, .. }), "{decision:?}");
    }

    #[test]
    fn grants_follow_one_schedule_and_never_overlap() {
        let plan = Plan::new(&smtp(&[("SMTP_RATE_LIMIT_PERIOD", "1s"), ("SMTP_RATE_LIMIT_MAX_LETTERS", "20")]));
        // 1 s + 7.5 ms guard over 20 units.
        assert_eq!(plan.interval_ns, 50_375_000);
        let now = 1_000 * S;
        let (first, state) = decide(&State::default(), &plan, now, plan.lead_ns, plan.lead_ns, 4, 1, None);
        // Without a burst, no unit is charged before a lead from the grant.
        let from_ns = now + plan.lead_ns;
        assert_eq!(first, Decision::Granted { first_ns: now + plan.lead_ns, count: 4, from_ns, stride: 1 });
        // Another replica at the same moment continues where the first grant ends.
        let (second, state) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 4, 1, None);
        assert_eq!(
            second,
            Decision::Granted { first_ns: now + plan.lead_ns + 4 * plan.interval_ns, count: 4, from_ns, stride: 1 }
        );
        assert_eq!(state.version, 2);
        // After a pause the schedule starts again from now, not from the past.
        let later = now + 60 * S;
        let (third, _) = decide(&state, &plan, later, plan.lead_ns, plan.lead_ns, 1, 1, None);
        let Decision::Granted { first_ns, count: 1, .. } = third else { panic!("{third:?}") };
        assert_eq!(first_ns, later + plan.lead_ns);
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
        let mut first = None;
        while granted < 30 {
            let (decision, next) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 7, 1, None);
            let Decision::Granted { first_ns, count, from_ns, .. } = decision else { panic!("{decision:?}") };
            first.get_or_insert(Run { first_ns, count, from_ns, stride: 1 });
            granted += count;
            state = next;
            now += S / 10;
        }
        assert_eq!(granted, 30);
        let (decision, _) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 1, 1, None);
        let Decision::Wait { until_ns, window } = decision else { panic!("{decision:?}") };
        assert_eq!(window, "30/20s");
        // Freed no sooner than a window after the first grant, and at most two buckets later.
        assert!((1_020 * S..=1_023 * S).contains(&until_ns), "{until_ns}");
        // Units that pass unused go back to the quota, to the buckets they were counted in.
        let unused = [plan.placed(first.expect("a first grant"))];
        let refunded = refund(&state, &plan, now, &unused);
        let (decision, _) = decide(&refunded, &plan, now, plan.lead_ns, plan.lead_ns, 7, 1, None);
        assert!(matches!(decision, Decision::Granted { count: 7, .. }), "{decision:?}");
        let (decision, _) = decide(&state, &plan, until_ns, plan.lead_ns, plan.lead_ns, 1, 1, None);
        assert!(matches!(decision, Decision::Granted { .. }), "{decision:?}");
    }

    /// A budget in recipients: `max` per `period`, and any other settings.
    fn in_recipients(period: &str, max: &str, more: &[(&str, &str)]) -> Plan {
        let mut vars = vec![
            ("SMTP_RATE_LIMIT_PERIOD", period),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", max),
            ("SMTP_RATE_LIMIT_UNIT", "recipient"),
        ];
        vars.extend_from_slice(more);
        Plan::new(&smtp(&vars))
    }

    #[test]
    fn recipient_units_leave_room_for_the_largest_message_only_where_it_costs_little() {
        // 9 of 20,000 units a period: the schedule leaves the room.
        let plan = in_recipients("1s", "20000", &[("SMTP_MAX_RECIPIENTS", "10")]);
        assert_eq!(plan.largest_cost, 10);
        assert!(plan.exact.is_none());
        assert_eq!(plan.interval_ns, (1_007_500_000_f64 / 19_991.0).ceil() as i64);
        let letters = Plan::new(&smtp(&[("SMTP_QUOTAS", "3/1m")]));
        assert_eq!(letters.largest_cost, 1);
        assert!(letters.exact.is_none());
    }

    /// With a burst beside a quota the window is counted exactly and the pace kept however
    /// little room the largest message takes, so that units passing unused go back; not where
    /// grants are loose, nor where every message costs one unit, nor without a quota.
    #[test]
    fn a_burst_in_recipients_beside_a_quota_is_counted_exactly_while_grants_are_scheduled() {
        let plan = |period: &str, max: &str, per_message: &str, quotas: Option<&str>| {
            let mut vars = vec![
                ("SMTP_RATE_LIMIT_PERIOD", period),
                ("SMTP_RATE_LIMIT_MAX_LETTERS", max),
                ("SMTP_RATE_LIMIT_BURST", "1215"),
                ("SMTP_RATE_LIMIT_UNIT", "recipient"),
                ("SMTP_MAX_RECIPIENTS", per_message),
            ];
            vars.extend(quotas.map(|quotas| ("SMTP_QUOTAS", quotas)));
            Plan::new(&smtp(&vars))
        };
        // 9 of 1,797 units a day: under 1 % of the rate.
        let paced = plan("24h", "1797", "10", Some("372/20s"));
        assert!(paced.exact.is_some() && paced.pace.is_some());
        assert_eq!(paced.loose_max, 0);
        let one_recipient = plan("24h", "1797", "1", Some("372/20s"));
        assert!(one_recipient.exact.is_none() && one_recipient.pace.is_none());
        let no_quota = plan("24h", "1797", "10", None);
        assert!(no_quota.exact.is_none() && no_quota.pace.is_none());
        let loose = plan("1s", "100000", "10", Some("1000000/1m"));
        assert!(loose.exact.is_none() && loose.loose_max > 0);
    }

    /// Without a burst, a pace with no tolerance at eight times the rate where the largest
    /// message would span more than a second of the schedule (a daily budget), and transactions
    /// that take the window's room; not where it spans less (Amazon SES's 14 recipients a second,
    /// whose 14 units span 117 ms at eight times), where the schedule alone spreads the messages.
    #[test]
    fn without_a_burst_a_pace_is_kept_only_where_the_largest_message_spans_long() {
        let daily = in_recipients("24h", "763", &[("SMTP_MAX_RECIPIENTS", "1000")]);
        // A day and the guard (50 ms) over eight times 763.
        let eight_times_ns = (86_400_050_000_000_f64 / (8.0 * 763.0)).ceil() as i64;
        assert!(daily.exact.is_some());
        assert_eq!(daily.pace, Some((eight_times_ns, 0)));
        assert!(daily.splits_transactions());
        // The largest message (the whole window, 763 units) within a second of the schedule.
        assert!(i64::from(daily.largest_cost - 1) * daily.interval_ns <= 1_000_000_000, "{}", daily.interval_ns);
        let ses = in_recipients("1s", "14", &[("SMTP_MAX_RECIPIENTS", "50")]);
        assert!(ses.exact.is_some() && ses.pace.is_none() && ses.splits_transactions());
        assert_eq!(ses.interval_ns, (1_007_500_000_f64 / 112.0).ceil() as i64);
    }

    /// Amazon SES: 14 recipients a second, 50 a message. The room for the largest message would
    /// leave 1 unit a second; the window is counted exactly instead.
    #[test]
    fn a_budget_in_recipients_counts_its_window_exactly() {
        let plan = in_recipients("1s", "14", &[("SMTP_MAX_RECIPIENTS", "50")]);
        assert!(plan.exact.is_some());
        assert_eq!(plan.max_grant, 1);
        let now = 1_000 * S;
        let mut state = State::default();
        // Messages of 1, 3 and 10 recipients fill the window at once; each grant covers its own
        // message, charged where it goes.
        let mut dots = Vec::new();
        for need in [1, 3, 10] {
            let (decision, next) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, need, need, None);
            let Decision::Granted { first_ns, count, .. } = decision else { panic!("{decision:?}") };
            assert_eq!(count, need);
            dots.push(first_ns + i64::from(count - 1) * plan.interval_ns);
            state = next;
        }
        assert!(dots[2] - dots[0] < S / 2, "{dots:?}");
        // A fourth, of 2, waits until the first two have left the window (1 + 3 + 10 = 14): no
        // window of a second holds more than 14, and it goes as soon as one has room. Still to be
        // prepared, its place lies more than its lead and a window ahead: it is told to ask again
        // a moment later (`exact_horizon_ns`). At its dot, it is granted at once.
        let asker = Some(Asker { replica: 1, passing: false, holds_from_ns: None, far: false, lanes: Vec::new() });
        let (decision, _) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 2, 2, asker);
        let Decision::Wait { until_ns, .. } = decision else { panic!("{decision:?}") };
        assert!(until_ns > now && until_ns < now + S / 10, "{} ms", (until_ns - now) / 1_000_000);
        let (decision, next) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 2, 2, None);
        let Decision::Granted { first_ns, count: 2, from_ns, .. } = decision else { panic!("{decision:?}") };
        let dot = first_ns + plan.interval_ns;
        assert!(
            dot > dots[1] + S && dot < dots[1] + S + 10_000_000,
            "{} ms after the second",
            (dot - dots[1]) / 1_000_000
        );
        // Units that pass unused go back to the window's count where they were charged.
        let unused = [plan.placed(Run { first_ns, count: 2, from_ns, stride: 1 })];
        let refunded = refund(&next, &plan, now, &unused);
        assert_eq!(refunded.quotas["rate"].values().sum::<u32>(), 14);
    }

    /// A message that may go in part (`Need::least` below its units) takes what the window has
    /// left where the whole would wait for earlier messages to leave it, longer than the rate
    /// takes to bring the units the part leaves out; and goes whole where the window frees soon.
    #[test]
    fn a_message_goes_in_part_where_the_window_holds_it_back() {
        let plan = in_recipients("1s", "14", &[]);
        let now = 1_000 * S;
        let part = Need { least: 1, message: 14, held: None, early_ns: 0 };
        // 8 in the window: the next 14 would wait a second for them, and the rate brings the 8
        // that do not fit now in 0.57 s: the 6 the window has left go now.
        let (_, state) = decide(&State::default(), &plan, now, plan.lead_ns, plan.lead_ns, 8, 8, None);
        let (decision, _) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 14, part, None);
        let Decision::Granted { count: 6, first_ns, .. } = decision else { panic!("{decision:?}") };
        assert!(first_ns < now + plan.lead_ns + S / 10, "{} ms", (first_ns - now) / 1_000_000);
        // Asked whole, it waits for the window to free.
        let (decision, _) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 14, 14, None);
        let Decision::Granted { count: 14, first_ns, .. } = decision else { panic!("{decision:?}") };
        assert!(first_ns > now + S, "{} ms", (first_ns - now) / 1_000_000);
        // 13 in the window a moment before the next 14 asks, 0.95 s later: they leave within
        // 50 ms, far sooner than the rate brings 13, and the message goes whole.
        let (_, state) = decide(&State::default(), &plan, now, plan.lead_ns, plan.lead_ns, 13, 13, None);
        let later = now + 950_000_000;
        let (decision, _) = decide(&state, &plan, later, plan.lead_ns, plan.lead_ns, 14, part, None);
        let Decision::Granted { count: 14, .. } = decision else { panic!("{decision:?}") };
        // A window with room for the whole: whole, at once.
        let (decision, _) = decide(&State::default(), &plan, now, plan.lead_ns, plan.lead_ns, 14, part, None);
        let Decision::Granted { count: 14, .. } = decision else { panic!("{decision:?}") };
    }

    /// A message that needs more units than its replica holds at the schedule's end takes those
    /// with the grant's first: the grant needs only the rest, and is not held back by the
    /// horizon while the units held lie within it. Not when another grant lies between.
    #[test]
    fn a_grant_continues_the_units_held_at_the_schedules_end() {
        let plan = in_recipients("1h", "1237", &[("SMTP_MAX_RECIPIENTS", "10")]);
        assert!(plan.exact.is_none() && plan.interval_ns > 2 * S, "{plan:?}");
        let now = 1_000 * S;
        // A grant of ten, of which a message of three took the first three: seven are held, up
        // to the schedule's end, 27 s on.
        let (_, state) = decide(&State::default(), &plan, now, plan.lead_ns, plan.lead_ns, 10, 3, None);
        let held = Some((state.next_ns, 7));
        let later = now + 3 * plan.interval_ns;
        let ten = Need { least: 10, message: 10, held, early_ns: 0 };
        let (decision, next) = decide(&state, &plan, later, plan.lead_ns, plan.lead_ns, 3, ten, None);
        let Decision::Granted { first_ns, count: 3, .. } = decision else { panic!("{decision:?}") };
        assert_eq!(first_ns, state.next_ns);
        // Without them, the message of ten waits until the schedule's end is within the horizon.
        let (decision, _) = decide(&state, &plan, later, plan.lead_ns, plan.lead_ns, 10, 10, None);
        assert!(matches!(decision, Decision::Wait { .. }), "{decision:?}");
        // Another grant since (the schedule's end is no longer the held units'): no join.
        let (decision, _) = decide(&next, &plan, later, plan.lead_ns, plan.lead_ns, 3, ten, None);
        assert!(matches!(decision, Decision::Wait { .. }), "{decision:?}");
    }

    /// Where the rate's window is not counted exactly, a quota in recipients with room for
    /// fewer than a message grants that room to a message that may go in part, when the whole
    /// would wait for the window to free; a message that goes whole waits.
    #[test]
    fn a_quota_grants_its_rest_to_part_of_a_message() {
        let plan = in_recipients("1s", "2000", &[("SMTP_MAX_RECIPIENTS", "10"), ("SMTP_QUOTAS", "15/10m")]);
        assert!(plan.exact.is_none() && plan.splits_transactions(), "{plan:?}");
        let now = 1_000 * S;
        let (_, state) = decide(&State::default(), &plan, now, plan.lead_ns, plan.lead_ns, 10, 10, None);
        let part = Need { least: 1, message: 10, held: None, early_ns: 0 };
        let (decision, _) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 10, part, None);
        let Decision::Granted { count: 5, .. } = decision else { panic!("{decision:?}") };
        let (decision, _) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 10, 10, None);
        assert!(matches!(decision, Decision::Wait { .. }), "{decision:?}");
    }

    /// Where units are used at their places, a message's units end at its dot, a lead ahead, its
    /// earlier ones within its preparation before that; a part of it, as the quota leaves, ends
    /// there too. Never sooner than the schedule's end.
    #[test]
    fn a_messages_units_end_at_its_dot() {
        let plan = in_recipients("10s", "1669", &[("SMTP_MAX_RECIPIENTS", "10")]);
        assert!(plan.units_used_at_places(), "{plan:?}");
        let (now, lead, i, ms) = (1_000 * S, 150 * S / 1_000, plan.interval_ns, S / 1_000);
        let first = |state: &State, plan: &Plan, least: u32, early_ns: i64| {
            let need = Need { least, message: 10, held: None, early_ns };
            match decide(state, plan, now, lead, lead, 10, need, None).0 {
                Decision::Granted { first_ns, count, .. } => (first_ns, count),
                decision => panic!("{decision:?}"),
            }
        };
        assert_eq!(first(&State::default(), &plan, 10, lead), (now + lead - 9 * i, 10));
        assert_eq!(first(&State::default(), &plan, 10, 0), (now + lead, 10));
        assert_eq!(first(&State::default(), &plan, 10, 20 * ms), (now + lead - 20 * ms, 10));
        let behind = State { next_ns: now + lead - 2 * i, ..State::default() };
        assert_eq!(first(&behind, &plan, 10, lead), (now + lead - 2 * i, 10));
        // A quota with room for five of the ten: the five end at the dot.
        let quota = in_recipients("10s", "1669", &[("SMTP_MAX_RECIPIENTS", "10"), ("SMTP_QUOTAS", "15/10m")]);
        assert!(quota.units_used_at_places() && quota.splits_transactions(), "{quota:?}");
        let (_, state) = decide(&State::default(), &quota, now, lead, lead, 10, 10, None);
        let (first_ns, count) = first(&state, &quota, 1, lead);
        assert_eq!((first_ns, count), (state.next_ns.max(now + lead - 4 * quota.interval_ns), 5));
        // With a burst, units go before their places anyway: from the lead on, as before.
        let burst = in_recipients("10s", "1669", &[("SMTP_MAX_RECIPIENTS", "10"), ("SMTP_RATE_LIMIT_BURST", "5")]);
        assert!(!burst.units_used_at_places(), "{burst:?}");
        assert_eq!(first(&State::default(), &burst, 10, lead).0, now + lead);
    }

    /// Under a burst's pace beside a quota in recipients, a message that may go in part takes
    /// what the quota has room for, and never a part the pace alone would cut: the whole message
    /// where the quota has room for it, even once the burst is spent.
    #[test]
    fn under_a_bursts_pace_a_part_is_the_quotas_room() {
        let plan = in_recipients(
            "1s",
            "1838",
            &[("SMTP_RATE_LIMIT_BURST", "1264"), ("SMTP_QUOTAS", "152/20s"), ("SMTP_MAX_RECIPIENTS", "50")],
        );
        assert!(plan.paced_with_burst() && plan.splits_transactions());
        let now = 1_000 * S;
        let grant = |state: &State, least: u32| {
            let need = Need { least, message: 50, held: None, early_ns: 0 };
            decide(state, &plan, now, plan.lead_ns, plan.lead_ns, 50, need, None)
        };
        // The quota holds 103: room for 49 of a message of 50.
        let (_, state) = decide(&State::default(), &plan, now, plan.lead_ns, plan.lead_ns, 103, 103, None);
        assert!(matches!(grant(&state, 50).0, Decision::Wait { .. }), "whole, it waits");
        match grant(&state, 1).0 {
            Decision::Granted { count, .. } => assert_eq!(count, 49, "in part, the quota's room"),
            decision => panic!("{decision:?}"),
        }
        // The rate's window with room for 10 just now, the quota for the whole message: the
        // message goes whole where the window has room for it, as it does under the pace without
        // a quota, and not in a part of the window's room.
        let window = plan.exact.as_ref().expect("the rate's window counted exactly");
        let full = BTreeMap::from([(now.div_euclid(window.bucket_ns), window.limit - 10)]);
        let nearly_full = State { quotas: BTreeMap::from([(window.key.clone(), full)]), ..State::default() };
        match grant(&nearly_full, 1).0 {
            Decision::Granted { count, .. } => assert_eq!(count, 50, "the whole message"),
            Decision::Wait { window: waited, .. } => assert_eq!(waited, window.label, "it waits for the window"),
            decision => panic!("{decision:?}"),
        }
    }

    /// Where the pace is kept, units that pass unused go back to it and to the schedule, but not
    /// those of a grant made before the pace last moved on from a later dot: that move spent
    /// them. The grant that moves it on gives its own back, and if its message missed them, the
    /// pace first moves on by as much as the dot came after its guess.
    #[test]
    fn unused_units_go_back_to_the_pace_unless_its_move_spent_them() {
        let plan = Plan::new(&smtp(&[
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "14"),
            ("SMTP_RATE_LIMIT_BURST", "14"),
            ("SMTP_RATE_LIMIT_UNIT", "recipient"),
            ("SMTP_MAX_RECIPIENTS", "50"),
        ]));
        let (pace_ns, _) = plan.pace.expect("a pace: the window is counted exactly, with a burst");
        // The rest of a grant of 4, after a message of 2, as the pool gives it back.
        let rest = |decision: Decision| {
            let Decision::Granted { first_ns, count: 4, from_ns, .. } = decision else { panic!("{decision:?}") };
            [Placed::at_end(Run { first_ns, count: 4, from_ns, stride: 1 }.last_ns(plan.interval_ns), 2, from_ns)]
        };
        let now = 1_000 * S;
        // A fresh budget: the first grant moves the pace on, and its rest goes back.
        let (decision, first) = decide(&State::default(), &plan, now, plan.lead_ns, plan.lead_ns, 4, 4, None);
        let first_rest = rest(decision);
        let back = refund_pace(first.clone(), &plan, now, &first_rest, &[]);
        assert_eq!(back.paced_ns, first.paced_ns - 2 * pace_ns);
        assert_eq!(back.next_ns, first.next_ns - 2 * plan.interval_ns);
        // After a minute idle the next grant moves the pace on again: the first grant's rest no
        // longer goes back, the second's does.
        let later = now + 60 * S;
        let (decision, second) = decide(&first, &plan, later, plan.lead_ns, plan.lead_ns, 4, 4, None);
        let second_rest = rest(decision);
        assert_eq!(refund_pace(second.clone(), &plan, later, &first_rest, &[]), second);
        assert_eq!(
            refund_pace(second.clone(), &plan, later, &second_rest, &[]).paced_ns,
            second.paced_ns - 2 * pace_ns
        );
        // The second grant's message reached its dot 3 s after the pace's guess of it, too late
        // for its units: they go back, and the pace first moves on by those 3 s, once.
        let (origin_ns, _) = second.paced_origin;
        let missed = refund_pace(second.clone(), &plan, origin_ns + 3 * S, &[], &second_rest);
        assert_eq!(missed.paced_ns, second.paced_ns + 3 * S - 2 * pace_ns);
        assert_eq!(missed.paced_origin.0, origin_ns + 3 * S);
        // Past the reach of that move, they stay counted, and nothing moves.
        assert_eq!(refund_pace(second.clone(), &plan, origin_ns + 11 * S, &[], &second_rest), second);
        // The first grant's missed units, granted before the pace moved on, change nothing.
        assert_eq!(refund_pace(second.clone(), &plan, origin_ns + 3 * S, &[], &first_rest), second);
        // Without a pace (`BURST=1`), nothing changes.
        let unpaced = Plan { pace: None, ..plan.clone() };
        assert_eq!(refund_pace(second.clone(), &unpaced, later, &second_rest, &[]), second);
    }

    #[test]
    fn units_given_back_are_granted_again_at_their_places_and_counted_once() {
        let plan = Plan::new(&smtp(&[
            ("SMTP_RATE_LIMIT_PERIOD", "1s"),
            ("SMTP_RATE_LIMIT_MAX_LETTERS", "20"),
            ("SMTP_QUOTAS", "30/1m"),
        ]));
        let now = 1_000 * S;
        let (a, state) = decide(&State::default(), &plan, now, plan.lead_ns, plan.lead_ns, 6, 1, None);
        let (b, state) = decide(&state, &plan, now, plan.lead_ns, plan.lead_ns, 6, 1, None);
        let Decision::Granted { first_ns: a_first, count: 6, from_ns: a_from, .. } = a else { panic!("{a:?}") };
        assert!(matches!(b, Decision::Granted { count: 6, .. }), "{b:?}");
        let counted = |state: &State| state.quotas.values().flat_map(|b| b.values()).sum::<u32>();
        assert_eq!(counted(&state), 12);
        // A gives back its last four units, one of them already too close to now to be used.
        let back = [Run { first_ns: a_first + 2 * plan.interval_ns, count: 4, from_ns: a_from, stride: 1 }];
        let state = give_back(&state, &plan, now, &back);
        let later = a_first + 2 * plan.interval_ns - plan.lead_ns + 1;
        // The next grant takes them first, at their own times (not after B's), one unit fewer.
        let (c, state) = decide(&state, &plan, later, plan.lead_ns, plan.lead_ns, 6, 1, None);
        assert_eq!(
            c,
            Decision::Granted { first_ns: a_first + 3 * plan.interval_ns, count: 3, from_ns: a_from, stride: 1 }
        );
        // Not counted against the quota again; the one that passed unused goes back to it.
        assert_eq!(counted(&state), 11, "units given back are not counted against the quota again");
        assert!(state.returned.is_empty(), "{:?}", state.returned);
        // Then the schedule goes on after B's grant, as before.
        let (d, state) = decide(&state, &plan, later, plan.lead_ns, plan.lead_ns, 2, 1, None);
        assert!(
            matches!(d, Decision::Granted { first_ns, count: 2, .. } if first_ns == a_first + 12 * plan.interval_ns)
        );
        // A run shorter than a message's units is left for a smaller one.
        let back = Run { first_ns: a_first + 40 * plan.interval_ns, count: 2, from_ns: later, stride: 1 };
        let state = give_back(&state, &plan, later, &[back]);
        let (e, state) = decide(&state, &plan, later, plan.lead_ns, plan.lead_ns, 3, 3, None);
        assert!(
            matches!(e, Decision::Granted { first_ns, count: 3, .. } if first_ns == a_first + 14 * plan.interval_ns)
        );
        assert_eq!(state.returned.len(), 1);
    }
}

#[cfg(test)]
mod placed_tests {
    use super::*;

    #[test]
    fn units_are_counted_in_the_buckets_of_their_places() {
        let run = Placed { first_ns: 95, count: 5, step_ns: 10, floor_ns: i64::MIN };
        // 95, 105, 115, 125, 135 in buckets of 20: [80, 100) 1, [100, 120) 2, [120, 140) 2.
        assert_eq!(run.per_bucket(20), vec![(4, 1), (5, 2), (6, 2)]);
        assert_eq!(Placed::at(95, 3).per_bucket(20), vec![(4, 3)]);
        let placed = Placed { first_ns: -7, count: 1_000, step_ns: 3, floor_ns: i64::MIN };
        assert_eq!(placed.per_bucket(64).iter().map(|(_, n)| n).sum::<u32>(), 1_000);
        // None before the floor: 95 and 105 at 110, in [100, 120) with 115; 125, 135 as before.
        let floored = Placed { floor_ns: 110, ..run };
        assert_eq!(floored.per_bucket(20), vec![(5, 3), (6, 2)]);
        // All of them below it.
        assert_eq!(Placed { floor_ns: 500, ..run }.per_bucket(20), vec![(25, 5)]);
        let placed = Placed { floor_ns: 1_234, ..placed };
        assert_eq!(placed.per_bucket(64).iter().map(|(_, n)| n).sum::<u32>(), 1_000);
    }
}
