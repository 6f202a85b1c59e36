//! Lanes and fairness (issue 19): which waiting letter the relay gets next.
//!
//! A mailing is `transactional` or `bulk` (its `Lane`, bulk by default). Transactional letters
//! go first; under contention bulk keeps `LANE_BULK_SHARE` of the sends, and either lane takes
//! what the other leaves unused (`pipeline::queue`). Within a lane, letters are ordered by a
//! virtual time `vt` given at ingest (start-time fair queuing): a flow (the mailing's `Tenant`,
//! else its Kafka key) starts at the lane's virtual clock or where its previous letter ended,
//! whichever is later, and each letter advances its flow by `1 / Weight`. The clock is the `vt`
//! of the letter a worker took last, so a batch produced behind a 100,000-letter campaign starts
//! beside the campaign's next letter instead of behind its last. The claim then stays one sorted
//! find per lane on `{status, lane, vt, due_ms}`.
//!
//! A letter not due yet when it is stored (`SendAt` ahead) sorts after the fair part, by due time
//! (`SCHEDULED + due_ms`), so the claim's range on `vt` ends at "due now" and never walks the
//! letters held for later. A retry keeps its place: due again, it goes before the letters placed
//! after it; until then the claim passes over it in the index (`due_ms` is in the key).

use crate::model::json_kind;
use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Letter, Status};

/// Where the scheduled part of a lane's order starts: far above any virtual time the fair part
/// reaches (a virtual time advances by about one per letter), and still exact in an `f64` with a
/// Unix millisecond added (below 2^53).
pub const SCHEDULED: f64 = 1e15;

/// Most bytes of a `Tenant` name.
pub const TENANT_MAX_BYTES: usize = 128;
/// The range of `Weight`.
pub const WEIGHT_MIN: f64 = 0.01;
pub const WEIGHT_MAX: f64 = 1000.0;

/// A letter's lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// Password resets, one-time codes, receipts: sent before any bulk letter waiting.
    Transactional,
    #[default]
    Bulk,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Transactional, Lane::Bulk];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Transactional => "transactional",
            Lane::Bulk => "bulk",
        }
    }

    pub fn index(self) -> usize {
        match self {
            Lane::Transactional => 0,
            Lane::Bulk => 1,
        }
    }
}

/// A mailing's lane, tenant and weight, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Priority {
    pub lane: Lane,
    pub tenant: Option<String>,
    pub weight: f64,
}

impl Default for Priority {
    fn default() -> Self {
        Priority { lane: Lane::Bulk, tenant: None, weight: 1.0 }
    }
}

/// Checks `Lane`, `Tenant` and `Weight` as the producer sent them (absent or `null`: the
/// defaults); the error names the field.
pub fn check(lane: Option<&Value>, tenant: Option<&Value>, weight: Option<&Value>) -> Result<Priority, String> {
    let lane = match lane {
        None | Some(Value::Null) => Lane::Bulk,
        Some(Value::String(text)) if text.eq_ignore_ascii_case("transactional") => Lane::Transactional,
        Some(Value::String(text)) if text.eq_ignore_ascii_case("bulk") => Lane::Bulk,
        Some(Value::String(text)) => return Err(format!("Lane must be \"transactional\" or \"bulk\", not {text:?}")),
        Some(other) => return Err(format!("Lane must be \"transactional\" or \"bulk\", not {}", json_kind(other))),
    };
    let tenant = match tenant {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) if name.is_empty() => return Err("Tenant must not be empty".to_owned()),
        Some(Value::String(name)) if name.len() > TENANT_MAX_BYTES => {
            return Err(format!("Tenant is {} bytes, over the limit of {TENANT_MAX_BYTES}", name.len()));
        }
        Some(Value::String(name)) => Some(name.clone()),
        Some(other) => return Err(format!("Tenant must be a string, not {}", json_kind(other))),
    };
    let weight = match weight {
        None | Some(Value::Null) => 1.0,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(w) if (WEIGHT_MIN..=WEIGHT_MAX).contains(&w) => w,
            _ => return Err(format!("Weight must be a number from {WEIGHT_MIN} to {WEIGHT_MAX}, not {n}")),
        },
        Some(other) => {
            return Err(format!("Weight must be a number from {WEIGHT_MIN} to {WEIGHT_MAX}, not {}", json_kind(other)));
        }
    };
    Ok(Priority { lane, tenant, weight })
}

/// The `vt` of a letter due at `due_ms` that is not in the fair part (held for its `SendAt`, or
/// a retry).
pub fn scheduled_vt(due_ms: i64) -> f64 {
    SCHEDULED + due_ms.max(0) as f64
}

/// Flows whose last letter ended before the clock are forgotten once there are more than this.
const FLOWS_KEPT: usize = 4096;

/// Each lane's virtual clock and each flow's finish, shared by ingest (which tags letters) and
/// the queue (which advances the clock as workers take letters). Per process: a Kafka key is
/// read by one replica at a time, so a batch's flow is exact; a tenant whose batches go to
/// several partitions read by several replicas gets up to one share per replica.
#[derive(Debug, Default)]
pub struct Fairness {
    /// `f64` bits, per lane.
    clocks: [AtomicU64; 2],
    /// foldhash: ingest looks a flow up for every letter (SipHash and `format!` were ~1,000
    /// instructions a letter, issue 23).
    flows: Mutex<HashMap<(Lane, String), f64, foldhash::fast::RandomState>>,
}

impl Fairness {
    /// The lane's virtual clock.
    pub fn clock(&self, lane: Lane) -> f64 {
        f64::from_bits(self.clocks[lane.index()].load(Ordering::Relaxed))
    }

    /// A letter of `lane` with this `vt` was taken by a worker, or is the first held after a claim
    /// (after a restart the first claim brings the clock to the stored backlog). Scheduled letters
    /// do not move it.
    pub fn advance(&self, lane: Lane, vt: f64) {
        if !(0.0..SCHEDULED).contains(&vt) {
            return;
        }
        let _ = self.clocks[lane.index()].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            (vt > f64::from_bits(bits)).then_some(vt.to_bits())
        });
    }

    /// Gives each letter about to be stored its `vt`, in order: letters of one batch keep their
    /// order, batches and tenants interleave. True when one of them goes before letters that
    /// may be held already (a transactional one, or the first of a flow that had none waiting),
    /// for the express claim.
    pub fn tag(&self, letters: &mut [Letter], now_ms: i64) -> bool {
        let mut overtakes = false;
        let mut flows = self.flows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if flows.len() > FLOWS_KEPT {
            let clocks = [self.clock(Lane::Transactional), self.clock(Lane::Bulk)];
            flows.retain(|(lane, _), finish| *finish > clocks[lane.index()]);
        }
        for letter in letters.iter_mut() {
            if letter.status != Status::Awaiting || letter.due_ms > now_ms {
                letter.vt = scheduled_vt(letter.due_ms);
                continue;
            }
            let (kind, name) = match &letter.tenant {
                Some(tenant) => ("t:", tenant.as_str()),
                None => ("k:", letter.key_b64.as_deref().unwrap_or(&letter.kafkakey)),
            };
            let mut flow = String::with_capacity(kind.len() + name.len());
            flow.push_str(kind);
            flow.push_str(name);
            let clock = self.clock(letter.lane);
            let finish = flows.entry((letter.lane, flow)).or_insert(clock);
            let start = finish.max(clock);
            overtakes |= letter.lane == Lane::Transactional || start <= clock;
            letter.vt = start;
            *finish = start + 1.0 / letter.weight.unwrap_or(1.0).clamp(WEIGHT_MIN, WEIGHT_MAX);
        }
        overtakes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn absent_values_are_bulk_without_a_tenant() {
        assert_eq!(check(None, None, None), Ok(Priority::default()));
        assert_eq!(check(Some(&Value::Null), Some(&Value::Null), Some(&Value::Null)), Ok(Priority::default()));
        let p = check(Some(&json!("Transactional")), Some(&json!("billing")), Some(&json!(3))).unwrap();
        assert_eq!((p.lane, p.tenant.as_deref(), p.weight), (Lane::Transactional, Some("billing"), 3.0));
    }

    #[test]
    fn bad_values_name_the_field() {
        for (lane, tenant, weight, expected) in [
            (json!("urgent"), Value::Null, Value::Null, "Lane must be \"transactional\" or \"bulk\", not \"urgent\""),
            (json!(1), Value::Null, Value::Null, "Lane must be \"transactional\" or \"bulk\", not a number"),
            (Value::Null, json!(7), Value::Null, "Tenant must be a string, not a number"),
            (Value::Null, json!(""), Value::Null, "Tenant must not be empty"),
            (Value::Null, Value::Null, json!(0), "Weight must be a number from 0.01 to 1000, not 0"),
            (Value::Null, Value::Null, json!(-2), "Weight must be a number from 0.01 to 1000, not -2"),
            (Value::Null, Value::Null, json!("3"), "Weight must be a number from 0.01 to 1000, not a string"),
        ] {
            assert_eq!(check(Some(&lane), Some(&tenant), Some(&weight)).unwrap_err(), expected);
        }
    }

    fn letters(key: &str, n: usize, lane: Lane) -> Vec<Letter> {
        (0..n)
            .map(|i| {
                let mailing = crate::model::Mailing {
                    subject: "s".into(),
                    body: "b".into(),
                    addresses: vec!["a@x.org".into()],
                    token: "t".into(),
                    extra: Default::default(),
                };
                let mut letter = Letter::from_mailing(mailing, Some(key.as_bytes()), format!("{key}/{i}"), 1_000);
                letter.lane = lane;
                letter
            })
            .collect()
    }

    #[test]
    fn a_small_batch_starts_beside_a_campaign_s_next_letter() {
        let fairness = Fairness::default();
        let mut campaign = letters("campaign", 1000, Lane::Bulk);
        assert!(fairness.tag(&mut campaign, 1_000), "a new flow goes before what is held");
        let mut more = letters("campaign", 1, Lane::Bulk);
        assert!(!fairness.tag(&mut more, 1_000), "its next batch waits its turn");
        assert_eq!(more[0].vt, 1000.0);
        assert_eq!(campaign[999].vt, 999.0);
        // Workers took the first 100.
        fairness.advance(Lane::Bulk, campaign[99].vt);
        let mut small = letters("small", 10, Lane::Bulk);
        fairness.tag(&mut small, 1_000);
        assert_eq!(small[0].vt, 99.0);
        assert_eq!(small[9].vt, 108.0, "one small letter beside each of the campaign's next");
        assert!(small.iter().all(|l| l.vt < campaign[110].vt));
        // The other lane's clock and flows are its own.
        let mut urgent = letters("campaign", 1, Lane::Transactional);
        fairness.tag(&mut urgent, 1_000);
        assert_eq!(urgent[0].vt, 0.0);
    }

    #[test]
    fn a_tenant_s_weight_sets_its_share_and_held_letters_sort_last() {
        let fairness = Fairness::default();
        let mut heavy = letters("a", 4, Lane::Bulk);
        heavy.iter_mut().for_each(|l| (l.tenant, l.weight) = (Some("heavy".into()), Some(2.0)));
        fairness.tag(&mut heavy, 1_000);
        assert_eq!(heavy.iter().map(|l| l.vt).collect::<Vec<_>>(), [0.0, 0.5, 1.0, 1.5]);
        let mut same_tenant_other_key = letters("b", 1, Lane::Bulk);
        same_tenant_other_key[0].tenant = Some("heavy".into());
        same_tenant_other_key[0].weight = Some(2.0);
        fairness.tag(&mut same_tenant_other_key, 1_000);
        assert_eq!(same_tenant_other_key[0].vt, 2.0, "a tenant is one flow whatever its keys");
        let mut later = letters("c", 1, Lane::Bulk);
        later[0].due_ms = 5_000;
        fairness.tag(&mut later, 1_000);
        assert_eq!(later[0].vt, SCHEDULED + 5_000.0);
        fairness.advance(Lane::Bulk, later[0].vt);
        assert_eq!(fairness.clock(Lane::Bulk), 0.0, "a scheduled letter does not move the clock");
    }
}
