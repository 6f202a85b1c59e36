//! The budget's document in `<collection>_budget`: the state `crate::budget` decides on, written
//! with a compare-and-set on its version (the Mongo-wire server we test on has no pipeline
//! updates). The arithmetic stays in `crate::budget`, which sees this through its `Ledger` trait.

use std::collections::BTreeMap;

use anyhow::Context;
use futures::future::BoxFuture;
use mongodb::{
    Collection,
    bson::{Bson, Document, doc},
    options::ReturnDocument,
};

use super::{Store, is_duplicate};
use crate::budget::{Ledger, LooseGrant, Run, State};

/// The budget document in `<collection>_budget`.
pub struct MongoLedger {
    store: Store,
    collection: Collection<Document>,
}

const DOCUMENT_ID: &str = "budget";

impl MongoLedger {
    pub(super) fn new(store: &Store) -> MongoLedger {
        MongoLedger { store: store.clone(), collection: store.collection("budget") }
    }

    fn count(&self, command: &'static str) {
        self.store.count(command, 1);
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

/// The runs of `stride` 1 (`strided` false) or the others. Strided runs are kept apart ("strided"),
/// where a binary from before strides does not look: read as consecutive, their units would
/// share places with other replicas' and crowd a window during a rollout or a rollback. It drops
/// them when it writes, and their units pass unused, once.
fn runs_to_bson(runs: &[Run], strided: bool) -> Vec<Bson> {
    runs.iter()
        .filter(|r| (r.stride > 1) == strided)
        .map(|r| {
            Bson::Document(doc! { "f": r.first_ns, "n": i64::from(r.count), "g": r.from_ns, "s": i64::from(r.stride) })
        })
        .collect()
}

fn state_to_bson(state: &State) -> Document {
    doc! {
        "v": state.version,
        "next_ns": state.next_ns,
        "quotas": quotas_to_bson(&state.quotas),
        "loose": loose_to_bson(&state.loose),
        "back": runs_to_bson(&state.returned, false),
        "strided": runs_to_bson(&state.returned, true),
        "senders": state.senders.iter().map(|(r, at)| Bson::Document(doc! { "r": *r as i64, "t": *at })).collect::<Vec<_>>(),
        "paced_ns": state.paced_ns,
        "paced_floor_ns": state.paced_floor_ns,
        "paced_refund_from_ns": state.paced_refund_from_ns,
        "paced_origin": [state.paced_origin.0, state.paced_origin.1],
    }
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
    let count = |value: Option<&Bson>| int(value).clamp(0, u32::MAX.into()) as u32;
    // Arrays of small documents; a malformed entry reads as zeros, which expire at once.
    let entries = |key: &str| -> Vec<Document> {
        document.get_array(key).map(|a| a.iter().filter_map(Bson::as_document).cloned().collect()).unwrap_or_default()
    };
    let loose = entries("loose")
        .iter()
        .map(|g| LooseGrant { from_ns: int(g.get("f")), until_ns: int(g.get("u")), count: count(g.get("n")) })
        .collect();
    // A run given back before runs kept their grant's time ("g") was charged at its places, not
    // where its units became usable, so it cannot be given back to the right buckets: it is
    // dropped, its units left counted (lost once, never counted twice).
    let mut returned: Vec<Run> = entries("back")
        .iter()
        .chain(&entries("strided"))
        .filter(|r| r.contains_key("g"))
        .map(|r| Run {
            first_ns: int(r.get("f")),
            count: count(r.get("n")),
            from_ns: int(r.get("g")),
            stride: count(r.get("s")).max(1),
        })
        .collect();
    returned.sort_by_key(|run| run.first_ns);
    let senders = entries("senders").iter().map(|r| (int(r.get("r")) as u64, int(r.get("t")))).collect();
    State {
        version: int(document.get("v")),
        next_ns: int(document.get("next_ns")),
        quotas,
        loose,
        returned,
        senders,
        paced_ns: int(document.get("paced_ns")),
        paced_floor_ns: int(document.get("paced_floor_ns")),
        paced_refund_from_ns: int(document.get("paced_refund_from_ns")),
        paced_origin: match document.get_array("paced_origin").map(Vec::as_slice) {
            Ok([at, floor]) => (int(Some(at)), int(Some(floor))),
            _ => (0, 0),
        },
    }
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
                        "$set": state_to_bson(new),
                        "$currentDate": { "at": true },
                    },
                )
                .upsert(expected == 0)
                .return_document(ReturnDocument::After)
                .projection(doc! { "at": 1 })
                .await;
            match result {
                Ok(Some(written)) => {
                    let at = written
                        .get_datetime("at")
                        .map(|at| at.timestamp_millis())
                        .unwrap_or_else(|_| self.store.now_ms());
                    Ok(Some(at))
                }
                Ok(None) => Ok(None),
                Err(error) if is_duplicate(&error) => Ok(None),
                Err(error) => Err(anyhow::Error::new(error).context("writing the sending budget")),
            }
        })
    }

    fn server_time(&self) -> BoxFuture<'_, anyhow::Result<i64>> {
        Box::pin(self.store.server_time())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_document_reads_back_as_written() {
        let state = State {
            version: 7,
            next_ns: 1_795_000_000_123_456_789,
            quotas: BTreeMap::from([("w60000".to_owned(), BTreeMap::from([(29_916_666, 12), (29_916_667, 3)]))]),
            loose: vec![LooseGrant { from_ns: 5, until_ns: 250_000_005, count: 40 }],
            returned: vec![
                Run { first_ns: 1_795_000_000_000_000_000, count: 6, from_ns: 1_794_999_999_000_000_000, stride: 3 },
                Run { first_ns: 1_795_000_000_000_000_001, count: 2, from_ns: 1_794_999_999_000_000_000, stride: 1 },
            ],
            senders: vec![(u64::MAX - 1, 1_795_000_000_000_000_000), (42, 1_794_999_999_900_000_000)],
            paced_ns: 1_795_000_000_500_000_000,
            paced_floor_ns: 1_795_000_000_200_000_000,
            paced_refund_from_ns: 1_794_999_999_950_000_001,
            paced_origin: (1_795_000_000_100_000_000, 1_795_000_000_200_000_000),
        };
        let stored = state_to_bson(&state);
        assert_eq!(state_from_bson(&stored), state);
        // A binary from before strides reads "back" alone: the consecutive runs, not the strided.
        let back = stored.get_array("back").unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].as_document().unwrap().get_i64("n").unwrap(), 2);
        // A document from before loose grants and give-backs reads with neither.
        let old = doc! { "v": 3_i64, "next_ns": 10_i64, "quotas": {} };
        assert_eq!(state_from_bson(&old), State { version: 3, next_ns: 10, ..State::default() });
        // Runs given back before they kept their grant's time are dropped, left counted.
        let old = doc! { "v": 3_i64, "next_ns": 10_i64, "quotas": {}, "back": [{ "f": 5_i64, "n": 2_i64 }] };
        assert_eq!(state_from_bson(&old).returned, Vec::new());
    }
}
