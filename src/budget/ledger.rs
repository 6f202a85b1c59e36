//! Where the budget's state is kept: one document in MongoDB, written with a compare-and-set on
//! its version; and a ledger in memory for unit tests.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
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

use super::{LooseGrant, Run, State, local_ms};
use crate::metrics::Metrics;

/// Where the state is kept: MongoDB in production, memory in unit tests.
pub trait Ledger: Send + Sync {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<State>>;
    /// Writes `new` if the stored version is still `expected`. `Ok(None)`: another replica wrote
    /// first. `Ok(Some(ms))`: written, at the server's clock `ms` (Unix milliseconds).
    fn replace<'a>(&'a self, expected: i64, new: &'a State) -> BoxFuture<'a, anyhow::Result<Option<i64>>>;
    /// The server's clock now, in Unix milliseconds.
    fn server_time(&self) -> BoxFuture<'_, anyhow::Result<i64>>;
}

/// The budget document in `<collection>_budget`.
pub struct MongoLedger {
    collection: Collection<Document>,
    database: mongodb::Database,
    metrics: Arc<Metrics>,
}

const DOCUMENT_ID: &str = "budget";

impl MongoLedger {
    /// Beside the letters collection, in the same database.
    pub fn beside<T: Send + Sync>(letters: &Collection<T>, metrics: Arc<Metrics>) -> MongoLedger {
        let db = letters.client().database(letters.namespace().db.as_str());
        MongoLedger { collection: db.collection(&format!("{}_budget", letters.name())), database: db, metrics }
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

fn runs_to_bson(runs: &[Run]) -> Vec<Bson> {
    runs.iter().map(|r| Bson::Document(doc! { "f": r.first_ns, "n": i64::from(r.count) })).collect()
}

fn state_to_bson(state: &State) -> Document {
    doc! {
        "v": state.version,
        "next_ns": state.next_ns,
        "quotas": quotas_to_bson(&state.quotas),
        "loose": loose_to_bson(&state.loose),
        "back": runs_to_bson(&state.returned),
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
    let returned =
        entries("back").iter().map(|r| Run { first_ns: int(r.get("f")), count: count(r.get("n")) }).collect();
    State { version: int(document.get("v")), next_ns: int(document.get("next_ns")), quotas, loose, returned }
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
                    let at = written.get_datetime("at").map(|at| at.timestamp_millis()).unwrap_or_else(|_| local_ms());
                    Ok(Some(at))
                }
                Ok(None) => Ok(None),
                Err(error) if is_duplicate_key(&error) => Ok(None),
                Err(error) => Err(anyhow::Error::new(error).context("writing the sending budget")),
            }
        })
    }

    fn server_time(&self) -> BoxFuture<'_, anyhow::Result<i64>> {
        Box::pin(async move {
            self.count("hello");
            let reply = self.database.run_command(doc! { "hello": 1 }).await.context("MongoDB hello")?;
            Ok(reply.get_datetime("localTime").context("MongoDB hello without localTime")?.timestamp_millis())
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

    /// The server's clock: its origin, then tokio's time (paused in tests).
    fn now_ms(&self) -> i64 {
        let elapsed = self.started.get().map_or(Duration::ZERO, |s| s.elapsed());
        self.origin_ms + elapsed.as_millis() as i64
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
                    Some(self.now_ms())
                }
            };
            self.travel(self.round_trip / 2).await;
            Ok(written)
        })
    }

    fn server_time(&self) -> BoxFuture<'_, anyhow::Result<i64>> {
        Box::pin(async move {
            self.travel(self.round_trip / 2).await;
            self.check()?;
            let now = self.now_ms();
            self.travel(self.round_trip / 2).await;
            Ok(now)
        })
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
            returned: vec![Run { first_ns: 1_795_000_000_000_000_000, count: 6 }],
        };
        assert_eq!(state_from_bson(&state_to_bson(&state)), state);
        // A document from before loose grants and give-backs reads with neither.
        let old = doc! { "v": 3_i64, "next_ns": 10_i64, "quotas": {} };
        assert_eq!(state_from_bson(&old), State { version: 3, next_ns: 10, ..State::default() });
    }
}
