//! The units granted to this replica and not handed out yet.

use std::collections::VecDeque;

use tokio::time::Instant;

use super::{LOOKAHEAD, Placed, Plan, Run};

/// Units granted to this replica and not handed out yet.
#[derive(Debug, Default)]
pub(super) struct Pool {
    /// Runs of consecutive units, in time order.
    pub(super) runs: VecDeque<Run>,
    /// Loose units: (usable until, count).
    pub(super) loose: VecDeque<(i64, u32)>,
    /// Units that passed unused, to give back to the quotas with the next write.
    expired: Vec<Placed>,
    /// Units handed out since `since`, for the size of the next grant.
    handed: u64,
    since: Option<Instant>,
    /// Units per second this replica uses, smoothed.
    rate: f64,
    /// Each run's units are charged at its last unit ([`Plan::placed`]): runs are never joined,
    /// and units that pass unused go back to the quotas from there.
    pub(super) charged_at_end: bool,
}

/// Units taken from the pool for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    /// Its final dot at this unit's time (that of the last of its units).
    At(i64),
    /// Its final dot at any moment until this time.
    Until(i64),
}

impl Pool {
    /// `units` for one message: loose ones that are still usable at `ready_ns` (when the message
    /// can be ready), else the last of `units` consecutive units not before `now_ns`. Units
    /// passed over are kept for the quotas ([`Pool::take_expired`]).
    pub(super) fn take(&mut self, units: u32, interval_ns: i64, now_ns: i64, ready_ns: i64) -> Option<(Taken, Placed)> {
        while let Some((until, count)) = self.loose.front_mut() {
            if *until < ready_ns || *count < units {
                self.expired.push(Placed { first_ns: *until, count: *count, step_ns: 0 });
                self.loose.pop_front();
                continue;
            }
            let until = *until;
            *count -= units;
            if *count == 0 {
                self.loose.pop_front();
            }
            self.handed += u64::from(units);
            return Some((Taken::Until(until), Placed { first_ns: until, count: units, step_ns: 0 }));
        }
        while let Some(whole) = self.runs.pop_front() {
            // Units before `now_ns` are of no use: spending them late could crowd a window.
            let run = whole.from(now_ns, interval_ns);
            let kept = run.map_or(0, |run| run.count);
            if kept < whole.count {
                self.expired.push(self.placed(whole, whole.first_ns, whole.count - kept, interval_ns));
            }
            let Some(mut run) = run else { continue };
            // Too few consecutive units for this message: they expire unused rather than split
            // it across other replicas' units.
            if run.count < units {
                self.expired.push(self.placed(whole, run.first_ns, run.count, interval_ns));
                continue;
            }
            let last = run.first_ns + i64::from(units - 1) * interval_ns;
            let placed = self.placed(whole, run.first_ns, units, interval_ns);
            run.first_ns += i64::from(units) * interval_ns;
            run.count -= units;
            if run.count > 0 {
                self.runs.push_front(run);
            }
            self.handed += u64::from(units);
            return Some((Taken::At(last), placed));
        }
        None
    }

    /// The time of the first unit from `from_ns` on, without taking it.
    pub(super) fn next_unit(&self, from_ns: i64, interval_ns: i64) -> Option<i64> {
        self.runs.iter().find_map(|run| run.from(from_ns, interval_ns)).map(|run| run.first_ns)
    }

    /// Where `count` units of `run` from `first_ns` on were charged: at their own places, or all at
    /// the run's last unit.
    fn placed(&self, run: Run, first_ns: i64, count: u32, interval_ns: i64) -> Placed {
        match self.charged_at_end {
            true => Placed { first_ns: run.end_ns(interval_ns) - interval_ns, count, step_ns: 0 },
            false => Placed { first_ns, count, step_ns: interval_ns },
        }
    }

    /// Units handed out that no message went on.
    pub(super) fn expire(&mut self, placed: Placed) {
        self.expired.push(placed);
    }

    /// The units that passed unused since the last call, to give back to the quotas.
    pub(super) fn take_expired(&mut self) -> Vec<Placed> {
        std::mem::take(&mut self.expired)
    }

    /// Adds a granted run in time order: units another replica gave back may lie before the
    /// runs this one holds.
    pub(super) fn add(&mut self, first_ns: i64, count: u32, interval_ns: i64) {
        let at = self.runs.partition_point(|run| run.first_ns < first_ns);
        if !self.charged_at_end
            && let Some(before) = at.checked_sub(1).and_then(|i| self.runs.get_mut(i))
            && before.end_ns(interval_ns) == first_ns
        {
            before.count += count;
            return;
        }
        self.runs.insert(at, Run { first_ns, count });
    }

    /// Takes out every unit from `from_ns` on, to give them back to the budget.
    pub(super) fn take_back(&mut self, from_ns: i64, interval_ns: i64) -> Vec<Run> {
        let mut back = Vec::new();
        self.runs.retain_mut(|run| {
            if let Some(tail) = run.from(from_ns, interval_ns) {
                back.push(tail);
                run.count -= tail.count;
            }
            run.count > 0
        });
        back
    }

    /// Every unit from `from_ns` on expires: where units are charged at their runs' ends, a
    /// replica that has no letters gives them back to the quotas rather than to the schedule.
    pub(super) fn expire_from(&mut self, from_ns: i64, interval_ns: i64) -> u64 {
        let mut units = 0;
        for tail in self.take_back(from_ns, interval_ns) {
            // `take_back` cut `tail` off its run's end, so the tail ends where the run did.
            units += u64::from(tail.count);
            self.expired.push(Placed {
                first_ns: tail.end_ns(interval_ns) - interval_ns,
                count: tail.count,
                step_ns: 0,
            });
        }
        units
    }

    /// Whether the pool holds less than this replica uses until `horizon_ns`: the next grant
    /// should be on its way.
    pub(super) fn low(&self, now_ns: i64, horizon_ns: i64, interval_ns: i64) -> bool {
        let scheduled_until = self.runs.back().map_or(0, |run| run.end_ns(interval_ns));
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
    pub(super) fn want(&mut self, need: u32, waiting: usize, plan: &Plan) -> u32 {
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
                0 => lookahead,
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
            // the day stranded 232 of them).
            if !plan.quotas.is_empty() {
                elapsed = elapsed.max(LOOKAHEAD.as_secs_f64());
            }
            if elapsed > 0.0 {
                let measured = self.handed as f64 / elapsed;
                self.rate = if self.rate == 0.0 { measured } else { 0.5 * self.rate + 0.5 * measured };
            }
        }
        self.since = Some(now);
        self.handed = 0;
        let queued = need.saturating_mul(waiting.max(1) as u32);
        // Where units are usable long before their places (a burst over a long period), units
        // held ahead of the workers' need are a replica's to strand if it dies: ask for what the
        // workers waiting need, a round trip each time, which such a budget's pace allows.
        if plan.tolerance_ns >= LOOKAHEAD.as_nanos() as i64 {
            return queued.clamp(need, max_grant.max(need));
        }
        let expected = (self.rate * LOOKAHEAD.as_secs_f64()).ceil() as u32;
        expected.max(queued).clamp(need, max_grant.max(need))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_go_back_from_a_time_on_and_grants_keep_time_order() {
        let mut pool = Pool::default();
        pool.add(1_000, 4, 10);
        pool.add(1_040, 2, 10);
        pool.add(2_000, 3, 10);
        // Units given back by another replica, earlier than those held: taken first.
        pool.add(500, 1, 10);
        let runs = |pool: &Pool| pool.runs.iter().map(|run| (run.first_ns, run.count)).collect::<Vec<_>>();
        assert_eq!(runs(&pool), vec![(500, 1), (1_000, 6), (2_000, 3)]);
        assert_eq!(pool.take(1, 10, 0, 0).map(|(taken, _)| taken), Some(Taken::At(500)));
        assert_eq!(
            pool.take_back(1_025, 10),
            vec![Run { first_ns: 1_030, count: 3 }, Run { first_ns: 2_000, count: 3 }]
        );
        assert_eq!(runs(&pool), vec![(1_000, 3)]);
        assert_eq!(pool.take_back(0, 10), vec![Run { first_ns: 1_000, count: 3 }]);
        assert!(pool.runs.is_empty());
    }

    /// Units passed over are kept for the quotas at their places.
    #[test]
    fn units_passed_unused_are_kept_for_the_quotas() {
        let mut pool = Pool::default();
        pool.add(1_000, 4, 10);
        pool.add(1_100, 3, 10);
        // At 1_025, the units at 1_000, 1_010 and 1_020 have passed.
        assert_eq!(pool.take(1, 10, 1_025, 1_025).map(|(taken, _)| taken), Some(Taken::At(1_030)));
        assert_eq!(pool.take_expired(), vec![Placed { first_ns: 1_000, count: 3, step_ns: 10 }]);
        // Four units wanted, three in a row left: they expire rather than split the message.
        assert_eq!(pool.take(4, 10, 1_031, 1_031).map(|(taken, _)| taken), None);
        assert_eq!(pool.take_expired(), vec![Placed { first_ns: 1_100, count: 3, step_ns: 10 }]);
        pool.loose.push_back((2_000, 5));
        assert_eq!(pool.take(1, 10, 2_001, 2_001).map(|(taken, _)| taken), None);
        assert_eq!(pool.take_expired(), vec![Placed { first_ns: 2_000, count: 5, step_ns: 0 }]);
    }
}
