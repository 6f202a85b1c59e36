//! The store: every MongoDB operation the service performs, each batched, through one handle
//! (the client, command counting, the error classifier, the server's clock).
//!
//! The Mongo-wire server we test on answers about 90 single-document claims per second, so no
//! per-letter query is allowed on the common path: letters are inserted in batches, claimed in
//! batches (find ids, update them to `processing` under a claim token, read back what this claim
//! won), and outcomes are written as one multi-statement `update` command per batch.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use mongodb::{
    Client, Collection, Database,
    bson::{Document, RawArrayBuf, RawDocumentBuf, doc, rawdoc},
    error::{ErrorKind, WriteFailure},
    options::{ClientOptions, Credential, ServerAddress},
};
use secrecy::ExposeSecret;

use crate::{
    clock::{Clock, FIRST_READINGS},
    config::{MongoConfig, MongoTarget},
    metrics::{CommandLabel, Metrics},
    model::Letter,
};

mod batches;
mod bson_reader;
mod bson_writer;
mod control;
mod expiry;
mod feedback;
mod idempotency;
mod ledger;
mod letter_doc;
mod letters;
mod locks;
mod retention;
mod suppressions;
mod unsubscribed;

pub use batches::{BatchKey, BatchProgress, CANCELLED};
pub use control::{ControlState, ControlStore, OPERATOR_REASON, PauseCause};
pub use feedback::{BrakeWindow, Claim as FeedbackClaim, FeedbackStore};
pub use idempotency::IdempotencyKeys;
pub use ledger::MongoLedger;
pub use letters::{ClaimLimit, DeadLetterRecord, InsertReport, LaneClaim, UNKNOWN_SIZE, Unstorable};
pub use suppressions::{LOOKUP_CHUNK_BYTES, SuppressionStore};
pub use unsubscribed::{EventClaim, UnsubscribedEvents};

const DUPLICATE_KEY: i32 = 11000;

/// A lease renewal's single reading of MongoDB's clock moves the clock only when it is off by
/// this much more than the reading's uncertainty: leases need no better, and a slow reading must
/// not undo the budget's finer one (the shortest of several, and every budget write's stamp).
const DRIFT_SLACK: Duration = Duration::from_millis(25);

#[derive(Clone)]
pub struct Store {
    db: Database,
    letters: Collection<Letter>,
    /// Named leases for work only one replica should do at a time (retention).
    locks: Collection<Document>,
    /// Kafka messages that could be neither processed nor written to the dead-letter topic.
    dead_letters: Collection<Document>,
    /// The process's one clock, MongoDB's as measured from here.
    clock: Clock,
    metrics: Arc<Metrics>,
}

impl Store {
    /// Counts a round trip. Counted here rather than through the driver's command events, which
    /// copy every command and reply (a 500-letter insert included) just to report it.
    fn count(&self, command: &'static str, round_trips: u64) {
        self.metrics.mongo_commands.get_or_create(&CommandLabel { command: command.to_owned() }).inc_by(round_trips);
    }

    /// Runs `updates` (`q`/`u` statements) on `collection` as one unordered `update` command: one
    /// round trip, and a write error in any statement fails the call, named by `what`. Returns
    /// the server's reply (its `n`: the statements that matched).
    async fn update_statements(
        &self,
        collection: &str,
        updates: Vec<RawDocumentBuf>,
        what: &str,
    ) -> anyhow::Result<Document> {
        self.count("update", 1);
        let mut statements = RawArrayBuf::new();
        for update in updates {
            statements.push(update);
        }
        let reply = self
            .db
            .run_raw_command(rawdoc! { "update": collection, "updates": statements, "ordered": false })
            .await
            .with_context(|| what.to_owned())?;
        if let Ok(errors) = reply.get_array("writeErrors")
            && let Some(first) = errors.first()
        {
            anyhow::bail!("{what}: {} write errors, first: {first}", errors.len());
        }
        Ok(reply)
    }

    /// A client for `config`'s database, on `clock`, which [`Store::sync_clock`] measures.
    pub async fn connect(config: &MongoConfig, clock: Clock, metrics: Arc<Metrics>) -> anyhow::Result<Store> {
        let mut options = match &config.target {
            MongoTarget::Uri(uri) => {
                ClientOptions::parse(uri.expose_secret()).await.context("MONGO_LOCAL is not a usable MongoDB URI")?
            }
            MongoTarget::Host { host, port, username, password } => ClientOptions::builder()
                .hosts(vec![ServerAddress::Tcp { host: host.clone(), port: Some(*port) }])
                .credential(
                    Credential::builder()
                        .username(username.clone())
                        .password(password.expose_secret().to_owned())
                        .build(),
                )
                .build(),
        };
        // Fail fast so the stages' own retry loops (and readiness) see an outage within seconds.
        options.server_selection_timeout.get_or_insert(Duration::from_secs(5));
        options.connect_timeout.get_or_insert(Duration::from_secs(5));
        options.app_name.get_or_insert_with(|| "mailsender".to_owned());
        let client = Client::with_options(options).context("building the MongoDB client")?;
        let db = client.database(&config.database);
        let letters = db.collection::<Letter>(&config.collection);
        let locks = db.collection::<Document>(&format!("{}_locks", config.collection));
        let dead_letters = db.collection::<Document>(&format!("{}_dead_letters", config.collection));
        Ok(Store { db, letters, locks, dead_letters, clock, metrics })
    }

    /// The time by MongoDB's clock, as last measured: every time compared across replicas (lease
    /// expiry, due times) uses it, so pods whose clocks disagree still agree on when a lease ends.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The process's one clock, for the readers that are not stores (the budget, the workers).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Measures MongoDB's clock (`hello`'s `localTime`), to within half a round trip: the
    /// shortest of [`FIRST_READINGS`] the first time, one reading after that. Run at start, before
    /// anything is decided with the clock, and with every lease renewal, so a clock that drifts
    /// is followed. Returns MongoDB's clock minus this host's, in milliseconds.
    pub async fn sync_clock(&self) -> anyhow::Result<i64> {
        let (readings, slack) = match self.clock.is_measured() {
            false => (FIRST_READINGS, Duration::ZERO),
            true => (1, DRIFT_SLACK),
        };
        let moved = self.clock.measure(readings, slack, || self.server_time()).await?;
        let offset = self.clock.offset_ms();
        self.metrics.clock_offset.set(offset as f64 / 1000.0);
        if moved.abs() > 1000 {
            tracing::warn!(
                offset_ms = offset,
                "this host's clock differs from MongoDB's; lease times follow MongoDB's"
            );
        }
        Ok(offset)
    }

    /// The collection `<letters collection>_<suffix>`, beside the letters in their database.
    fn collection<T: Send + Sync>(&self, suffix: &str) -> Collection<T> {
        self.db.collection(&format!("{}_{suffix}", self.letters.name()))
    }

    /// The control documents (pause, cancelled batches).
    pub fn control(&self) -> ControlStore {
        ControlStore::new(self)
    }

    /// The suppression list and the hard-bounce counts.
    pub fn suppressions(&self) -> SuppressionStore {
        SuppressionStore::new(self)
    }

    /// The one-click endpoint's published events.
    pub fn unsubscribed(&self) -> UnsubscribedEvents {
        UnsubscribedEvents::new(self)
    }

    /// The feedback loop's events and unusable reports; a claim on an event to publish holds
    /// for `publish_lease`.
    pub fn feedback(&self, publish_lease: Duration) -> FeedbackStore {
        FeedbackStore::new(self, publish_lease)
    }

    /// The sending budget's document.
    pub fn ledger(&self) -> MongoLedger {
        MongoLedger::new(self)
    }

    /// MongoDB's clock now (`hello`'s `localTime`), in Unix milliseconds: one reading.
    async fn server_time(&self) -> anyhow::Result<i64> {
        self.count("hello", 1);
        let reply = self.db.run_command(doc! { "hello": 1 }).await.context("MongoDB hello")?;
        Ok(reply.get_datetime("localTime").context("MongoDB hello without localTime")?.timestamp_millis())
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        self.count("ping", 1);
        self.db.run_command(doc! { "ping": 1 }).await.context("MongoDB ping")?;
        Ok(())
    }
}

/// Whether MongoDB refused a write as a duplicate key: as a write error (insert, update), or as a
/// command error (`findAndModify`'s upsert losing a race).
fn is_duplicate(error: &mongodb::error::Error) -> bool {
    match error.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == DUPLICATE_KEY,
        ErrorKind::Command(e) => e.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// Whether an error means MongoDB is unreachable (worth waiting for) rather than a bug.
pub fn is_unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<mongodb::error::Error>().is_some_and(|e| {
            matches!(
                e.kind.as_ref(),
                ErrorKind::ServerSelection { .. } | ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. }
            ) || matches!(e.kind.as_ref(), ErrorKind::Write(WriteFailure::WriteConcernError(_)))
        })
    })
}
