//! The units granted to this replica and not handed out yet.

use std::collections::VecDeque;

use tokio::time::Instant;

use super::{HORIZON, LOOKAHEAD, Placed, Plan, Run};

/// At most this many units in a lookahead, a replica holding a long burst asks for its waiting
/// workers' units alone ([`Pool::want`]).
const SLOW_PACE: i64 = 16;

/// How long units that passed unused keep a replica's grants strided.
const PASSING_SPAN: std::time::Duration = std::time::Duration::from_secs(1);
/// The share of a replica's units passing unused from which its grants are strided. At a tenth,
/// replicas that carry the rate between them struck it now and then, and their strided runs
/// lost more than they saved: three replicas of four on a 300 ms relay at 30 a second used
/// 92.1 % of it (95 % at least consecutive, `three_replicas_of_four_slow_workers_use_the_rate`).
/// At a fifth, since a judgement is kept while strided ([`PASSING_KEPT`]), three replicas of
/// five on a 300 ms relay at 296 per 10 s were strided for good and used 92.4 % of it (98.4 %
/// at three tenths then, 99.0 % now at three tenths and at a quarter,
/// `replicas_whose_units_pass_now_and_then_stay_consecutive`); at a half, the replicas whose
/// workers trail the rate stayed consecutive (1,378 a second: 59.7 %). At three tenths, a
/// replica judged while the tails of its first runs still lay ahead read 20 % at its second
/// grant and 29 % at its third, where two in five of its units were passing, and went strided
/// only at its fourth: two replicas of sixteen on a 1 ms relay under 13,195 a second sent
/// 94.9 % of it in 5 s, 95.7 % at a quarter
/// (`replicas_whose_workers_trail_a_dense_rate_interleave_from_their_first_runs`).
const PASSING_SHARE: f64 = 0.25;
/// And at least this many units a span: a single unit is a tenth of ten.
const PASSING_MIN: u64 = 3;
/// How long a replica whose consecutive units passed keeps its grants strided (its strided
/// units do not count, [`Waste::count`]): then its next grants are consecutive again, and
/// judged afresh, in case its relay or its load changed. What that costs, a span of consecutive
/// grants that pass in part once in this time, is what a replica lost every other second
/// before (see [`Waste::count`]).
pub(super) const PASSING_KEPT: std::time::Duration = std::time::Duration::from_secs(30);

/// A first grant holds a lookahead of the rate up to this many units (else a quarter of it,
/// [`Pool::want`]): where a lookahead holds few units, a quarter of it is a few, the replicas'
/// measured rates started as low, and their grants stayed small and alternated; a replica that
/// gave its units back left them to pass before the other asked again (two replicas of four
/// workers at 100 a second, `a_replica_out_of_letters_gives_its_units_to_the_others`: a gap of
/// 111 ms in the other's letters). A tenth of a second at 500 a second.
const FIRST_GRANT_FLOOR: u32 = 50;

/// Most tickets remembered for [`Pool::doomed`].
const RECENT_MAX: usize = 4_096;

/// Units granted to this replica and not handed out yet.
#[derive(Debug, Default)]
pub(super) struct Pool {
    /// Runs of consecutive units, in time order.
    pub(super) runs: VecDeque<Run>,
    /// Loose units: (usable until, count).
    pub(super) loose: VecDeque<(i64, u32)>,
    /// Units that passed unused, no message on them, to give back with the next write: to the
    /// quotas, and where the pace is kept to it and the schedule.
    expired: Vec<Placed>,
    /// Units handed to messages that reached their dots too late for them ([`Pool::expire`]): they
    /// go back too, and may move the pace on (`schedule::refund_pace`).
    missed: Vec<Placed>,
    /// Units handed out since `since`, for the size of the next grant.
    handed: u64,
    since: Option<Instant>,
    /// Scheduled units handed to messages still to be prepared, for [`Pool::doomed`]: (handed
    /// at, due, units).
    recent: VecDeque<(i64, i64, u32)>,
    /// Units per second this replica uses, smoothed.
    rate: f64,
    /// Each run's units are charged at its last unit ([`Plan::placed`]): runs are never joined,
    /// and units that pass unused go back to the quotas from there.
    pub(super) charged_at_end: bool,
    /// Scheduled units that passed unused here and units handed out, over the current span and
    /// the last whole one ([`Pool::passing`]).
    waste: Waste,
}

/// Counts of units passed and handed out, per [`PASSING_SPAN`].
#[derive(Debug, Default)]
struct Waste {
    since: Option<Instant>,
    passed: u64,
    handed: u64,
    last: (u64, u64),
}

impl Waste {
    /// Counts units of `run` passed and handed out, in a new span once the current one is over.
    /// Consecutive runs only: they are what the count judges, and strided runs, whose units do
    /// not pass, would clear the judgement that made them, so that the next grants went back to
    /// consecutive runs and passed again (1,378 a second, three replicas of fourteen on a 20 ms
    /// relay: 76.7 % of the rate, 81.6 % judged on consecutive runs alone).
    fn count(&mut self, run: Run, passed: u32, handed: u32) {
        if run.stride > 1 {
            return;
        }
        let now = Instant::now();
        let elapsed = self.since.map(|since| now.duration_since(since));
        if elapsed.is_none_or(|elapsed| elapsed >= PASSING_SPAN) {
            // Strided since the last span's judgement: that judgement holds until it is old.
            self.last = match elapsed {
                Some(elapsed) if elapsed < PASSING_KEPT => (self.passed, self.handed),
                _ => (0, 0),
            };
            (self.passed, self.handed) = (0, 0);
            self.since = Some(now);
        }
        self.passed += u64::from(passed);
        self.handed += u64::from(handed);
    }
}

/// Units taken from the pool for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    /// Its final dot from `usable_ns` on (its last unit less the burst tolerance), late past
    /// `due_ns` ([`Plan::due_ns`]).
    At { usable_ns: i64, due_ns: i64 },
    /// Its final dot at any moment until this time.
    Until(i64),
}

/// The units of `run` a message of up to `units` may take, due at `cut_ns` or later (when it can
/// reach its dot, less the lateness allowed): where units are used at their places
/// ([`Plan::units_used_at_places`]), from up to its own span before that, as long as the last
/// unit it takes is due at the cut or later and none has passed at `now_ns`. Its dot waits for
/// its last unit, and units the preparation passes over stay unused otherwise
/// ([`crate::budget::Need::early_ns`]).
fn usable(plan: &Plan, run: Run, units: u32, now_ns: i64, cut_ns: i64) -> Option<Run> {
    if units > 1 && plan.units_used_at_places() && run.stride <= 1 {
        let early_ns = (cut_ns - i64::from(units - 1) * plan.interval_ns).max(now_ns);
        let spread = plan.alive(run, early_ns).filter(|usable| {
            let taken = usable.count.min(units);
            usable.first_ns + i64::from(taken - 1) * plan.interval_ns >= cut_ns
        });
        if spread.is_some() {
            return spread;
        }
    }
    plan.alive(run, cut_ns.max(now_ns))
}

impl Pool {
    /// Up to `units` and at least `least` for one message (the ticket's [`Placed::count`] says
    /// how many): loose ones that are still usable at `ready_ns` (when the message can be
    /// ready), else the last of the consecutive units due at `cut_ns` or later (when the message
    /// can reach its dot, less the lateness allowed). Units due before `now_ns` have passed and
    /// are kept for the quotas ([`Pool::take_expired`]); units between `now_ns` and `cut_ns` stay
    /// for a message that is ready sooner.
    pub(super) fn take_some(
        &mut self,
        least: u32,
        units: u32,
        plan: &Plan,
        now_ns: i64,
        cut_ns: i64,
        ready_ns: i64,
    ) -> Option<(Taken, Placed)> {
        // A part only where no run holds the whole message.
        let whole =
            self.runs.iter().any(|run| usable(plan, *run, units, now_ns, cut_ns).is_some_and(|r| r.count >= units));
        let least = match whole {
            true => units,
            false => least.clamp(1, units.max(1)),
        };
        let interval_ns = plan.interval_ns;
        while let Some((until, count)) = self.loose.front_mut() {
            if *until < ready_ns || *count < least {
                self.expired.push(Placed::at(*until, *count));
                self.loose.pop_front();
                continue;
            }
            let until = *until;
            let units = units.min(*count);
            *count -= units;
            if *count == 0 {
                self.loose.pop_front();
            }
            self.handed += u64::from(units);
            return Some((Taken::Until(until), Placed::at(until, units)));
        }
        // Where runs are charged at their ends, a run split around units left for later would be
        // charged elsewhere than the ledger did; those pools hold only what the waiting workers
        // asked for anyway (`Budget::stock_blocks`).
        if cut_ns > now_ns && !self.charged_at_end {
            return self.take_from(least, units, plan, now_ns, cut_ns);
        }
        // Runs with too few consecutive units for this message stay for a smaller one (a message
        // is never split across runs: they may be other replicas' units), and expire when they
        // pass. Expired at once, the rest of a grant sized for a message of one recipient went
        // unused when the next had forty, and its places were lost to the schedule:
        // three replicas of sixteen workers under 718 recipients a day with a burst of 686,
        // letters of 1 to 100 recipients, sent 500 of the burst's 686.
        let mut short = Vec::new();
        let mut handed = None;
        while let Some(whole) = self.runs.pop_front() {
            let Some(mut run) = self.alive_or_expire(whole, now_ns, plan) else { continue };
            if run.count < least {
                short.push(run);
                continue;
            }
            let units = units.min(run.count);
            handed = Some(self.hand(whole, run, units, plan));
            run.first_ns += i64::from(units) * run.step(interval_ns);
            run.count -= units;
            if run.count > 0 {
                // What is left of a strided run may lie after another run's next unit.
                self.insert_in_order(run);
            }
            break;
        }
        for run in short {
            self.insert_in_order(run);
        }
        if handed.is_none() {
            self.give_back_far_short_runs(least, cut_ns.max(now_ns), plan);
        }
        handed
    }

    /// No run served a message of `units`: runs too short for it stay for a smaller one, and go
    /// back as they pass, but where the pace is kept ([`Plan::pace`]) those placed beyond the
    /// [`HORIZON`] from `cut_ns` go back at once, with the grant it asks for now (to the quotas, and
    /// to the pace and the schedule, `schedule::refund_pace`): the schedule runs at eight times
    /// the rate there, and under a long burst the rest of a grant sized for the workers waiting
    /// lay minutes ahead and came back a unit at a time as its places passed. 1,562 recipients a
    /// day with a burst of 766, two replicas of eight workers on a 1 ms relay, letters of 1, 50
    /// and 7, sent 481 in the first minute and 539 in ten of the 755 the burst and the rate allow
    /// in order (797 so). Nearer runs stay: they pass, and go back, within the horizon anyway;
    /// given back however near (from 250 ms ahead), three replicas of fourteen under 464
    /// recipients per 20 s, letters of 1 to 100, used 92.6 % (91.3 %) of what the sizes allow in
    /// order where they had used 95.8 %.
    fn give_back_far_short_runs(&mut self, units: u32, cut_ns: i64, plan: &Plan) {
        if plan.pace.is_none() {
            return;
        }
        let far_ns = cut_ns + HORIZON.as_nanos() as i64;
        let mut back = Vec::new();
        self.runs.retain(|run| {
            let far_short = run.count < units && run.first_ns > far_ns;
            if far_short {
                back.push(*run);
            }
            !far_short
        });
        for run in back {
            self.expired.push(self.placed(run, run.first_ns, run.count, plan));
        }
    }

    /// The units of `whole` still due at `now_ns`; those before have passed and expire (units
    /// due before now are of no use: spending them late could crowd a window).
    fn alive_or_expire(&mut self, whole: Run, now_ns: i64, plan: &Plan) -> Option<Run> {
        let run = plan.alive(whole, now_ns);
        let kept = run.map_or(0, |run| run.count);
        if kept < whole.count {
            self.expired.push(self.placed(whole, whole.first_ns, whole.count - kept, plan));
            self.waste.count(whole, whole.count - kept, 0);
        }
        run
    }

    /// The ticket for the first `units` of `usable`, a part of `whole`.
    ///
    /// Where runs are charged at their ends, every message on a run goes at its end, where the
    /// ledger counted the whole run and the window's check looked back from: a message on the
    /// first units of a longer run (a grant for several waiting workers, or one a smaller
    /// message took first) went up to the run's length before its charge, further back than
    /// the check looks, and a window held more than allowed (42 recipients per 10 s beside 173
    /// per 10 minutes, letters of 1, 50 and 7: 50 in 10 s).
    fn hand(&mut self, whole: Run, usable: Run, units: u32, plan: &Plan) -> (Taken, Placed) {
        let last = match self.charged_at_end {
            true => usable.last_ns(plan.interval_ns),
            false => usable.first_ns + i64::from(units - 1) * usable.step(plan.interval_ns),
        };
        let taken = Taken::At {
            usable_ns: (last - plan.tolerance_ns).max(plan.earliest_use_ns(usable)),
            due_ns: plan.due_ns(usable, usable.first_ns, last),
        };
        self.handed += u64::from(units);
        self.waste.count(whole, 0, units);
        (taken, self.placed(whole, usable.first_ns, units, plan))
    }

    /// The first consecutive units due at `cut_ns` or later, of any run with `least` of them, up
    /// to `units`; units before them stay in the pool, but those past `now_ns`, which expire.
    fn take_from(&mut self, least: u32, units: u32, plan: &Plan, now_ns: i64, cut_ns: i64) -> Option<(Taken, Placed)> {
        let runs = std::mem::take(&mut self.runs);
        self.runs = runs.into_iter().filter_map(|whole| self.alive_or_expire(whole, now_ns, plan)).collect();
        let found = self.runs.iter().enumerate().find_map(|(at, run)| {
            usable(plan, *run, units, now_ns, cut_ns).filter(|u| u.count >= least).map(|u| (at, u))
        });
        let Some((at, usable)) = found else {
            self.give_back_far_short_runs(least, cut_ns, plan);
            return None;
        };
        let units = units.min(usable.count);
        let run = self.runs[at];
        let handed = self.hand(run, usable, units, plan);
        let before = Run { count: run.count - usable.count, ..run };
        let after = Run {
            first_ns: usable.first_ns + i64::from(units) * usable.step(plan.interval_ns),
            count: usable.count - units,
            ..usable
        };
        self.runs.remove(at);
        if before.count > 0 {
            self.runs.insert(at, before);
        }
        if after.count > 0 {
            self.insert_in_order(after);
        }
        Some(handed)
    }

    /// Whether [`PASSING_SHARE`] or more of the scheduled units this replica held over the last
    /// span (or this one) passed unused, and [`PASSING_MIN`] at least: its workers cannot keep
    /// up with runs at the rate's pace, and its next grants interleave with the other replicas'
    /// (`schedule::decide`).
    pub(super) fn passing(&self) -> bool {
        self.passing_more_than(PASSING_SHARE)
    }

    /// Whether `share` or more of the scheduled units this replica held lately passed unused
    /// (see [`Pool::passing`]).
    pub(super) fn passing_more_than(&self, share: f64) -> bool {
        // Judged again now and then: the relay or the load may have changed since.
        if self.waste.since.is_none_or(|since| since.elapsed() >= PASSING_KEPT) {
            return false;
        }
        let (passed, handed) = (self.waste.passed.max(self.waste.last.0), self.waste.handed.max(self.waste.last.1));
        passed >= PASSING_MIN && passed as f64 >= share * (passed + handed) as f64
    }

    /// Notes `units` due at `due_ns` handed at `now_ns` to a message still to be prepared. Kept
    /// for `keep_ns` (the longest lead), and the last [`RECENT_MAX`] only: what a preparation far
    /// past the lead would find beyond them still goes, one message at a time, as each misses.
    pub(super) fn record(&mut self, now_ns: i64, due_ns: i64, units: u32, keep_ns: i64) {
        while self.recent.front().is_some_and(|(at, _, _)| *at < now_ns - keep_ns) || self.recent.len() >= RECENT_MAX {
            self.recent.pop_front();
        }
        self.recent.push_back((now_ns, due_ns, units));
    }

    /// The units handed out for messages that a preparation of `took` brings to their dots after
    /// their units are due and the lateness allowed (`late_ns`) has passed, and that are not at
    /// their dots yet: they will miss them. Each counted once.
    pub(super) fn doomed(&mut self, now_ns: i64, took: i64, late_ns: i64) -> u32 {
        let mut doomed = 0;
        self.recent.retain(|(at, due_ns, units)| {
            let misses = at + took > now_ns && at + took > due_ns + late_ns;
            doomed += if misses { *units } else { 0 };
            !misses
        });
        doomed
    }

    /// From when the first unit still due at `cut_ns` may be used, without taking it.
    pub(super) fn next_usable(&self, cut_ns: i64, plan: &Plan) -> Option<i64> {
        self.runs.iter().find_map(|run| plan.alive(*run, cut_ns)).map(|run| run.first_ns - plan.tolerance_ns)
    }

    /// Where `count` units of `run` from `first_ns` on were charged ([`Plan::placed`]), or, where
    /// runs are charged at their ends, all at the run's last unit.
    fn placed(&self, run: Run, first_ns: i64, count: u32, plan: &Plan) -> Placed {
        match self.charged_at_end {
            true => Placed::at_end(run.last_ns(plan.interval_ns), count, run.from_ns),
            false => plan.placed(Run { first_ns, count, ..run }),
        }
    }

    /// Units handed out that no message went on: it reached its dot too late for them.
    pub(super) fn expire(&mut self, placed: Placed) {
        self.missed.push(placed);
    }

    /// The units that passed unused since the last call, to give back to the quotas: those no
    /// message took, and those of messages that missed them.
    pub(super) fn take_expired(&mut self) -> (Vec<Placed>, Vec<Placed>) {
        (std::mem::take(&mut self.expired), std::mem::take(&mut self.missed))
    }

    /// The units of the run that ends last, from the first due at `cut_ns` on, as `(end_ns,
    /// count)`: a grant that continues it may serve a message with them
    /// (`schedule::joins_held`).
    pub(super) fn held_to_end(&self, cut_ns: i64, plan: &Plan) -> Option<(i64, u32)> {
        let last = self.runs.iter().max_by_key(|run| run.end_ns(plan.interval_ns))?;
        let alive = plan.alive(*last, cut_ns)?;
        Some((alive.end_ns(plan.interval_ns), alive.count))
    }

    /// Adds a granted run in time order: units another replica gave back may lie before the
    /// runs this one holds.
    pub(super) fn add(&mut self, granted: Run, plan: &Plan) {
        let at = self.insertion_point(granted);
        // Joined only where the grant's time changes nothing for the units joined: they become
        // usable at their places less the tolerance, after either grant.
        if !self.charged_at_end
            && let Some(before) = at.checked_sub(1).and_then(|i| self.runs.get_mut(i))
            && before.stride == granted.stride
            && before.end_ns(plan.interval_ns) == granted.first_ns
            && granted.first_ns - plan.tolerance_ns >= before.from_ns.max(granted.from_ns)
        {
            before.count += granted.count;
            return;
        }
        self.runs.insert(at, granted);
    }

    /// Where `run` goes among the runs, which are in the order of their first units.
    fn insertion_point(&self, run: Run) -> usize {
        self.runs.partition_point(|held| held.first_ns < run.first_ns)
    }

    fn insert_in_order(&mut self, run: Run) {
        let at = self.insertion_point(run);
        self.runs.insert(at, run);
    }

    /// Takes out every unit still due at `from_ns`, to give them back to the budget.
    pub(super) fn take_back(&mut self, from_ns: i64, plan: &Plan) -> Vec<Run> {
        let mut back = Vec::new();
        self.runs.retain_mut(|run| {
            if let Some(tail) = plan.alive(*run, from_ns) {
                back.push(tail);
                run.count -= tail.count;
            }
            run.count > 0
        });
        back
    }

    /// Every unit from `from_ns` on expires: where units are charged at their runs' ends, a
    /// replica that has no letters gives them back to the quotas rather than to the schedule.
    pub(super) fn expire_from(&mut self, from_ns: i64, plan: &Plan) -> u64 {
        let interval_ns = plan.interval_ns;
        let mut units = 0;
        for tail in self.take_back(from_ns, plan) {
            // `take_back` cut `tail` off its run's end, so the tail ends where the run did.
            units += u64::from(tail.count);
            self.expired.push(Placed::at_end(tail.last_ns(interval_ns), tail.count, tail.from_ns));
        }
        units
    }

    /// The first and last places of the strided runs (lanes) it holds: see
    /// [`crate::budget::schedule::Asker::lanes`].
    pub(super) fn lanes(&self, interval_ns: i64) -> Vec<(i64, i64)> {
        self.runs
            .iter()
            .filter(|run| run.stride > 1 && run.count > 0)
            .map(|run| (run.first_ns, run.last_ns(interval_ns)))
            .collect()
    }

    /// The first place of a run held from `horizon_ns` on (past what the pool should cover), if
    /// any: see [`crate::budget::schedule::Asker::holds_from_ns`].
    pub(super) fn held_from(&self, horizon_ns: i64) -> Option<i64> {
        self.runs.iter().map(|run| run.first_ns).filter(|first_ns| *first_ns >= horizon_ns).min()
    }

    /// Units a second this replica uses, as last measured (0 until a grant has measured it).
    pub(super) fn rate(&self) -> f64 {
        self.rate
    }

    /// Whether the pool holds less than this replica uses until `horizon_ns` (where its runs are
    /// strided, less than they bring): the next grant should be on its way.
    pub(super) fn low(&self, now_ns: i64, horizon_ns: i64, interval_ns: i64) -> bool {
        let scheduled_until = self.runs.iter().map(|run| run.end_ns(interval_ns)).max().unwrap_or(0);
        if scheduled_until >= horizon_ns {
            // Strided runs reach far with few units: low when they hold less than they
            // bring until the horizon, so that it asks (and takes the runs between) in time; by
            // its last unit's place, a replica took the others' runs only once they had passed.
            if self.runs.iter().all(|run| run.stride <= 1) {
                return false;
            }
            let held: u64 = self
                .runs
                .iter()
                .map(|run| match run.first_ns < horizon_ns {
                    true => {
                        (((horizon_ns - run.first_ns) / run.step(interval_ns)) as u64 + 1).min(u64::from(run.count))
                    }
                    false => 0,
                })
                .sum();
            // What its stride brings, not the rate it was handed units at: asked for by that
            // rate, the next grant came once its workers had run dry and waited, and the rate
            // they were handed units at stayed as low (1,378 a second, three replicas of
            // fourteen: one of them used half what the others did). Nor by what its workers
            // carry where that is more than its stride brings: the runs between are the other
            // replicas', and a replica that took one beside its own held two for a lookahead,
            // used what its workers could of them, and left the replica whose run it was
            // without units until the schedule's end (three replicas of eight on a 20 ms relay
            // under 960 a second, each able to send 400 a second, more than its third: 72 of
            // each 96 units used for seconds at a time).
            let step = self.runs.iter().map(|run| run.step(interval_ns)).max().unwrap_or(interval_ns);
            let stride_units = ((horizon_ns - now_ns).max(0) / step) as u64;
            return held < stride_units;
        }
        let needed = (self.rate * (horizon_ns - now_ns).max(0) as f64 / 1e9).ceil() as u64;
        let loose: u64 = self.loose.iter().map(|(_, count)| u64::from(*count)).sum();
        let loose_until = self.loose.back().map_or(0, |(until, _)| *until);
        loose_until < horizon_ns || loose <= needed
    }

    /// How many units to ask for: what this replica used in the last while, over the
    /// lookahead, and at least what is asked for now. The first time, with nothing measured yet,
    /// a quarter of a lookahead of the whole budget (or a quarter of the loose allowance; under
    /// a quota or a burst, what the workers waiting need): workers queue up one by one at start,
    /// and a grant for the first of them alone leaves the rest a round trip without units.
    pub(super) fn want(&mut self, need: u32, waiting: usize, plan: &Plan, round_trip: std::time::Duration) -> u32 {
        let max_grant = plan.max_grant;
        let now = Instant::now();
        if self.since.is_none() {
            self.since = Some(now);
            let lookahead = (LOOKAHEAD.as_nanos() as i64 / plan.interval_ns).clamp(1, i64::from(max_grant)) as u32;
            let first = match plan.loose_max {
                // Under a quota, units this replica cannot use yet are units another cannot
                // have, and all of them are lost with it if it dies (a first grant of a
                // lookahead at 10,000/s took a whole daily quota of 2,000): the waiting workers'.
                _ if !plan.quotas.is_empty() => 1,
                // Under a burst too: each replica's first lookahead took more of the burst than
                // its workers could use while it lasted, and a third replica's lay past it, its
                // workers idle until then (three replicas of eight on a 20 ms relay at 960 a
                // second with a burst of 362: 94.7 % of what every limit at once allows in 5 s,
                // 96.3 % so). Until the first lookahead has measured the rate, the replica asks
                // about once a round of its workers (120 grants in the first quarter second
                // there, against 6; the same 3 a quarter second after).
                0 if plan.tolerance_ns > 0 => 1,
                // Else a quarter of a lookahead: replicas that start together lay their first
                // grants end to end, and where each held a lookahead of the rate, the third's first
                // unit came half a second after the first's, while each one's workers used what
                // they could of a run at the rate's pace and the rest passed (three replicas of
                // eight on a 20 ms relay under 960 a second: 443 units in the first second, 735
                // so). A lookahead of [`FIRST_GRANT_FLOOR`] units or fewer goes whole.
                0 => (lookahead / 4).max(lookahead.min(FIRST_GRANT_FLOOR)),
                loose => (loose / 4).max(1),
            };
            return first.max(need.saturating_mul(waiting.max(1) as u32)).clamp(need, max_grant.max(need));
        }
        if let Some(since) = self.since {
            let mut elapsed = now.duration_since(since).as_secs_f64();
            // Under a quota, units this replica holds are units no other replica may have, and
            // all of them are lost with it if it dies: the rate is measured over a lookahead at
            // least, not over the round trip since the last grant (the second grant at 10,000/s
            // then reserved hundreds of units of a daily 2,000, and a replica killed 1.5 s into
            // the day stranded 232 of them), and what was handed out since the last grant is
            // counted as if over a lookahead (left to settle as below, it stranded 51).
            if !plan.quotas.is_empty() {
                elapsed = elapsed.max(LOOKAHEAD.as_secs_f64());
            }
            // Else, under a burst or loose grants, measured over a lookahead at least too: workers
            // that send in step take their units within a moment, and measured over that moment
            // their rate read many times what it was. Under loose grants the grants took the
            // whole loose allowance, and the other replicas' messages waited a lead for scheduled
            // units (three replicas of four workers on a 300 ms relay at 100,000 a second: 90.0 %
            // of what they carry); on the schedule a replica took grants of up to 58 units where
            // its workers used 9 a lookahead, the others' grants lay past them, and their
            // messages waited at their dots (three replicas of eleven on a 300 ms relay at 323 a
            // second with a burst of 35: 90.1 %). Until a lookahead has passed the last rate
            // stands; the first is taken over a lookahead. Not without a burst, where units lie
            // at their places anyway: there it changed no simulated case, and the benchmark's
            // three replicas at 100/s asked a few percent more grants a letter (0.114 against
            // 0.109) for a lower median rate.
            let settling = (plan.loose_max > 0 || plan.tolerance_ns > 0) && elapsed < LOOKAHEAD.as_secs_f64();
            if !(settling && self.rate > 0.0) {
                if settling {
                    elapsed = LOOKAHEAD.as_secs_f64();
                }
                if elapsed > 0.0 {
                    let measured = self.handed as f64 / elapsed;
                    self.rate = if self.rate == 0.0 { measured } else { 0.5 * self.rate + 0.5 * measured };
                }
                self.since = Some(now);
                self.handed = 0;
            }
        }
        let queued = need.saturating_mul(waiting.max(1) as u32);
        // Where units are usable long before their places (a burst over a long period), units
        // held ahead of the workers' need are a replica's to strand if it dies: ask for what the
        // workers waiting need, a round trip each time, where the budget's pace allows it (a few
        // units a lookahead). At 1,510 a second with a burst of 786, grants of what six workers
        // on a 1 ms relay waited for, a round trip each, kept the rate and left the burst unused
        // (91.9 % of the budget in 5 s).
        let lookahead_ns = LOOKAHEAD.as_nanos() as i64;
        if plan.tolerance_ns >= lookahead_ns && plan.interval_ns * SLOW_PACE >= lookahead_ns {
            return queued.clamp(need, max_grant.max(need));
        }
        // Over a lookahead, or three round trips where the database is further away than a
        // lookahead holds: a grant is the replica's units until the next one can arrive, and
        // with MongoDB 300 ms away, grants of a lookahead's units a round trip apart measured
        // the rate they allowed, smaller each time (100 a second, one replica of four workers:
        // 277 letters in 30 s).
        let span_s = LOOKAHEAD.as_secs_f64().max(3.0 * round_trip.as_secs_f64());
        let expected = (self.rate * span_s).ceil() as u32;
        expected.max(queued).clamp(need, max_grant.max(need))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::schedule::tests::smtp;

    /// A schedule of a unit every 10 ns, usable `tolerance_ns` before its place, and under
    /// quotas only `reach_ns` after that.
    fn plan(tolerance_ns: i64, reach_ns: i64) -> Plan {
        Plan { interval_ns: 10, tolerance_ns, reach_ns, ..Plan::new(&smtp(&[])) }
    }

    fn run(first_ns: i64, count: u32) -> Run {
        Run { first_ns, count, from_ns: 0, stride: 1 }
    }

    #[test]
    fn units_go_back_from_a_time_on_and_grants_keep_time_order() {
        let plan = plan(0, i64::MAX);
        let mut pool = Pool::default();
        pool.add(run(1_000, 4), &plan);
        pool.add(run(1_040, 2), &plan);
        pool.add(run(2_000, 3), &plan);
        // Units given back by another replica, earlier than those held: taken first.
        pool.add(run(500, 1), &plan);
        let runs = |pool: &Pool| pool.runs.iter().map(|run| (run.first_ns, run.count)).collect::<Vec<_>>();
        assert_eq!(runs(&pool), vec![(500, 1), (1_000, 6), (2_000, 3)]);
        assert_eq!(
            pool.take_some(1, 1, &plan, 0, 0, 0).map(|(taken, _)| taken),
            Some(Taken::At { usable_ns: 500, due_ns: 500 })
        );
        assert_eq!(pool.take_back(1_025, &plan), vec![run(1_030, 3), run(2_000, 3)]);
        assert_eq!(runs(&pool), vec![(1_000, 3)]);
        assert_eq!(pool.take_back(0, &plan), vec![run(1_000, 3)]);
        assert!(pool.runs.is_empty());
    }

    /// Where units are used at their places, a message of several units takes them from its own
    /// span before the cut on, its last at the cut or later; units already passed, or a last
    /// unit before the cut, are not of use to it. With a burst, from the cut on.
    #[test]
    fn a_message_of_several_units_takes_them_ending_at_its_cut() {
        let plan = plan(0, i64::MAX);
        let taken = |plan: &Plan, units: u32, now: i64, cut: i64, runs: &[Run]| {
            let mut pool = Pool::default();
            for run in runs {
                pool.add(*run, plan);
            }
            pool.take_some(units, units, plan, now, cut, now).map(|(_, placed)| (placed.first_ns, placed.count))
        };
        // Four units from 1,000 on, the cut at 1,030: all four, the last at the cut.
        assert_eq!(taken(&plan, 4, 1_000, 1_030, &[run(1_000, 10)]), Some((1_000, 4)));
        // Now at 1,015: the units before have passed, the four from 1,020 end after the cut.
        assert_eq!(taken(&plan, 4, 1_015, 1_030, &[run(1_000, 10)]), Some((1_020, 4)));
        // A run that ends before the cut serves no message, however many units it has.
        assert_eq!(taken(&plan, 4, 1_000, 1_100, &[run(1_000, 10)]), None);
        // One unit: from the cut on.
        assert_eq!(taken(&plan, 1, 1_000, 1_030, &[run(1_000, 10)]), Some((1_030, 1)));
        // A burst (units usable 5 ns before their places): from the cut on, as counted there.
        let burst = taken(&self::plan(5, i64::MAX), 4, 1_000, 1_030, &[run(1_000, 10)]);
        assert!(matches!(burst, Some((first, 4)) if first >= 1_030 - 5), "{burst:?}");
    }

    /// Where the pace is kept, runs too short for the message that asked and placed beyond the
    /// horizon go back at once when no run serves it; nearer ones stay for a smaller message, as
    /// every short run does without a pace, or when a run serves the message.
    #[test]
    fn short_runs_beyond_the_horizon_go_back_when_no_run_serves_the_message() {
        let far = HORIZON.as_nanos() as i64 + 1_000;
        let paced = Plan { pace: Some((80, 800)), ..plan(i64::MAX / 4, i64::MAX) };
        let back = |pool: &mut Pool| pool.take_expired().0.iter().map(|placed| placed.count).sum::<u32>();
        let runs = |pool: &Pool| pool.runs.iter().map(|run| (run.first_ns, run.count)).collect::<Vec<_>>();
        // Taken as the message is ready (cut at now), and ahead of it (cut later).
        for (now, cut) in [(0, 0), (0, 100)] {
            let mut pool = Pool::default();
            pool.add(run(500, 2), &paced);
            pool.add(run(far, 3), &paced);
            assert_eq!(pool.take_some(5, 5, &paced, now, cut, cut), None);
            assert_eq!(back(&mut pool), 3, "cut at {cut}");
            assert_eq!(runs(&pool), vec![(500, 2)]);
            assert!(pool.take_some(2, 2, &paced, now, cut, cut).is_some());

            // A run that serves the message: the short runs before it stay.
            let mut pool = Pool::default();
            pool.add(run(far, 3), &paced);
            pool.add(run(far + 1_000, 5), &paced);
            assert!(pool.take_some(5, 5, &paced, now, cut, cut).is_some());
            assert_eq!(back(&mut pool), 0);
            assert_eq!(runs(&pool), vec![(far, 3)]);

            // No pace: they stay, and go back as they pass.
            let unpaced = plan(i64::MAX / 4, i64::MAX);
            let mut pool = Pool::default();
            pool.add(run(far, 3), &unpaced);
            assert_eq!(pool.take_some(5, 5, &unpaced, now, cut, cut), None);
            assert_eq!(back(&mut pool), 0);
            assert_eq!(runs(&pool), vec![(far, 3)]);
        }
    }

    /// Units passed over are kept for the quotas at their places.
    #[test]
    fn units_passed_unused_are_kept_for_the_quotas() {
        let plan = plan(0, i64::MAX);
        let mut pool = Pool::default();
        pool.add(run(1_000, 4), &plan);
        pool.add(run(1_100, 3), &plan);
        // At 1_025, the units at 1_000, 1_010 and 1_020 have passed.
        assert_eq!(
            pool.take_some(1, 1, &plan, 1_025, 1_025, 1_025).map(|(taken, _)| taken),
            Some(Taken::At { usable_ns: 1_030, due_ns: 1_030 })
        );
        assert_eq!(pool.take_expired(), (vec![Placed { first_ns: 1_000, count: 3, step_ns: 10, floor_ns: 0 }], vec![]));
        // Four units wanted, three in a row left: the message is not split across runs, and the
        // three stay for a smaller message (expired at once, the rest of a grant sized for a
        // small message went unused when the next one was larger).
        assert_eq!(pool.take_some(4, 4, &plan, 1_031, 1_031, 1_031).map(|(taken, _)| taken), None);
        assert_eq!(pool.take_expired(), (vec![], vec![]));
        assert_eq!(
            pool.take_some(2, 2, &plan, 1_031, 1_031, 1_031).map(|(taken, _)| taken),
            Some(Taken::At { usable_ns: 1_110, due_ns: 1_110 })
        );
        // The last one passes unused, and expires then.
        assert_eq!(pool.take_some(1, 1, &plan, 1_125, 1_125, 1_125).map(|(taken, _)| taken), None);
        assert_eq!(pool.take_expired(), (vec![Placed { first_ns: 1_120, count: 1, step_ns: 10, floor_ns: 0 }], vec![]));
        pool.loose.push_back((2_000, 5));
        assert_eq!(pool.take_some(1, 1, &plan, 2_001, 2_001, 2_001).map(|(taken, _)| taken), None);
        assert_eq!(pool.take_expired(), (vec![Placed::at(2_000, 5)], vec![]));
    }

    /// A replica whose consecutive units passed stays strided while its strided units are all
    /// used (they are not what is judged), and is judged again on consecutive units once the
    /// judgement is [`PASSING_KEPT`] old. Counted with the rest, two seconds of strided units
    /// used in full cleared it, and its next grant was consecutive and passed again.
    #[tokio::test(start_paused = true)]
    async fn units_passing_keep_a_replica_strided_until_judged_again() {
        let plan = plan(0, i64::MAX);
        let mut pool = Pool::default();
        pool.add(run(0, 10), &plan);
        pool.add(run(100, 10), &plan);
        // The first run passed while the workers were busy: 10 passed, 1 handed.
        assert!(pool.take_some(1, 1, &plan, 95, 95, 95).is_some());
        assert!(pool.passing());
        for second in 1..=3 {
            tokio::time::advance(PASSING_SPAN).await;
            let first_ns = 1_000 * second;
            pool.add(Run { first_ns, count: 20, from_ns: 0, stride: 3 }, &plan);
            for unit in 0..20 {
                let at = first_ns + unit * 30;
                assert!(pool.take_some(1, 1, &plan, at, at, at).is_some());
            }
            assert!(pool.passing(), "after {second} s of strided units used in full");
        }
        tokio::time::advance(PASSING_KEPT).await;
        assert!(!pool.passing());
        // Judged afresh on the next consecutive run, all of it used.
        pool.add(run(10_000, 5), &plan);
        for unit in 0..5 {
            let at = 10_000 + unit * 10;
            assert!(pool.take_some(1, 1, &plan, at, at, at).is_some());
        }
        assert!(!pool.passing());
    }

    /// A replica whose strided run holds its units up to the horizon is not low, though its
    /// workers carry twice what the run brings: the runs between are the other replicas'. A run
    /// that starts past now, its first units taken already, is.
    #[test]
    fn a_strided_run_reaching_the_horizon_is_not_low() {
        let plan = plan(0, i64::MAX);
        let mut pool = Pool::default();
        // Every third unit of a schedule of one every 10 ns: 100, 130, ..., 670.
        pool.add(Run { first_ns: 100, count: 20, from_ns: 0, stride: 3 }, &plan);
        let brings = 1e9 / 30.0;
        pool.rate = 2.0 * brings;
        assert!(!pool.low(100, 400, plan.interval_ns), "11 units held until the horizon, the run brings 10");
        let mut ahead = Pool { rate: 2.0 * brings, ..Pool::default() };
        ahead.add(Run { first_ns: 250, count: 15, from_ns: 0, stride: 3 }, &plan);
        assert!(ahead.low(100, 400, plan.interval_ns), "6 units held until the horizon, the run brings 10");
    }

    /// Under a quota, a burst's units are charged at the grant's time and due within the reach
    /// of it: a unit placed 50 ns ahead with a tolerance of 50 is usable at once and due 15 ns
    /// after the grant, not at its place.
    #[test]
    fn a_bursts_units_are_due_within_the_reach_of_where_they_are_charged() {
        let plan = plan(50, 15);
        let mut pool = Pool::default();
        // Granted at 0: units at 20, 30, ..., 110.
        pool.add(run(20, 10), &plan);
        assert_eq!(
            pool.take_some(1, 1, &plan, 0, 0, 0).map(|(taken, _)| taken),
            Some(Taken::At { usable_ns: -30, due_ns: 15 })
        );
        // At 16 the units usable from 0 on (places 30, 40, 50) are past their reach; the one at
        // 60 is usable from 10, due at 25.
        assert_eq!(
            pool.take_some(1, 1, &plan, 16, 16, 16).map(|(taken, _)| taken),
            Some(Taken::At { usable_ns: 10, due_ns: 25 })
        );
        assert_eq!(pool.take_expired(), (vec![Placed { first_ns: -20, count: 3, step_ns: 10, floor_ns: 0 }], vec![]));
        // Charged where usable: three at the grant, then one every 10 ns.
        let charged = plan.placed(run(20, 10)).per_bucket(10);
        assert_eq!(charged, vec![(0, 4), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]);
        // A grant that continues the run joins it only where the grant's time changes nothing:
        // units at 120 and 130 granted at 60 are usable from 70 as they would be from 0.
        let mut joined = Pool::default();
        joined.add(run(20, 10), &plan);
        joined.add(Run { first_ns: 120, count: 2, from_ns: 60, stride: 1 }, &plan);
        assert_eq!(joined.runs.len(), 1);
        // Granted at 100, they are not usable from 70.
        pool.add(Run { first_ns: 120, count: 2, from_ns: 100, stride: 1 }, &plan);
        assert_eq!(pool.runs.len(), 2);
    }
}
