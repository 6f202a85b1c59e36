//! The letter store: every MongoDB operation the service performs, each batched.
//!
//! The Mongo-wire server we test on answers about 90 single-document claims per second, so no
//! per-letter query is allowed on the common path: letters are inserted in batches, claimed in
//! batches (find ids, update them to `processing` under a claim token, read back what this claim
//! won), and outcomes are written as one multi-statement `update` command per batch.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use futures::TryStreamExt;
use mongodb::{
    Client, Collection, Database, IndexModel,
    bson::{Bson, Document, doc, oid::ObjectId},
    error::{ErrorKind, WriteFailure},
    options::{ClientOptions, Credential, IndexOptions, ServerAddress},
};
use secrecy::ExposeSecret;

use crate::{
    config::{MongoConfig, MongoTarget},
    metrics::{CommandLabel, Metrics},
    model::{AttemptRecord, Letter, Outcome, Rejection, Status},
};

const DUPLICATE_KEY: i32 = 11000;

#[derive(Clone)]
pub struct Store {
    db: Database,
    letters: Collection<Letter>,
    /// Named leases for work only one replica should do at a time (retention).
    locks: Collection<Document>,
    /// Kafka messages that could be neither processed nor written to the dead-letter topic.
    dead_letters: Collection<Document>,
    /// MongoDB's clock minus this host's, in milliseconds.
    clock_offset_ms: Arc<AtomicI64>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct InsertReport {
    /// Letters stored, the failed stand-ins of refused ones included.
    pub inserted: usize,
    /// Of `inserted`, the letters stored failed because MongoDB refused them as they were.
    pub failed: usize,
    /// The sources of the letters skipped because they were already stored.
    pub duplicates: Vec<String>,
    /// Letters that could not be stored at all, not even as failed.
    pub unstorable: Vec<Unstorable>,
}

/// A letter MongoDB refused both as it was and as a failed letter without its body.
#[derive(Debug, PartialEq, Eq)]
pub struct Unstorable {
    /// Its index in the letters given to [`Store::insert`].
    pub index: usize,
    pub reason: String,
}

/// How much one claim may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimLimit {
    pub count: usize,
    pub bytes: usize,
    /// Whether one letter larger than `bytes` may be taken when it comes first: true when nothing
    /// else is held, so a letter bigger than the whole budget is still sent, alone.
    pub oversize_alone: bool,
}

/// The size assumed for a letter the Go service wrote, which records none.
pub const UNKNOWN_SIZE: usize = 256 * 1024;

impl ClaimLimit {
    /// The longest prefix of `letters` (id, size) within the limit.
    fn fit<T>(&self, letters: impl Iterator<Item = (T, usize)>) -> Vec<T> {
        let mut taken = Vec::new();
        let mut total = 0usize;
        for (id, size) in letters.take(self.count) {
            let fits = total + size <= self.bytes || (taken.is_empty() && self.oversize_alone);
            if !fits {
                break;
            }
            total += size;
            taken.push(id);
        }
        taken
    }
}

/// A Kafka message set aside, with where it came from and why.
#[derive(Debug)]
pub struct DeadLetterRecord<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub reason: &'a str,
    /// Why the dead-letter topic did not take it.
    pub dlq_error: &'a str,
}

/// What one insert command did, by index into the documents it was given.
#[derive(Debug, Default)]
struct InsertOutcome {
    inserted: usize,
    duplicates: Vec<usize>,
    refused: Vec<(usize, String)>,
}

/// Most letter ids in one renewal or release: 10,000 ids are about 190 KB of command, far below
/// MongoDB's 16 MiB, and more than a replica holds (twice `CLAIM_BATCH` at most, 10,000).
const RENEW_CHUNK: usize = 10_000;

/// MongoDB's own limit on one document (`maxBsonObjectSize`).
const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;

impl Store {
    /// Counts a round trip. Counted here rather than through the driver's command events, which
    /// copy every command and reply (a 500-letter insert included) just to report it.
    fn count(&self, command: &'static str, round_trips: u64) {
        self.metrics.mongo_commands.get_or_create(&CommandLabel { command: command.to_owned() }).inc_by(round_trips);
    }

    pub async fn connect(config: &MongoConfig, metrics: Arc<Metrics>) -> anyhow::Result<Store> {
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
        Ok(Store { db, letters, locks, dead_letters, clock_offset_ms: Arc::default(), metrics })
    }

    /// The time by MongoDB's clock, as last measured: every time compared across replicas (lease
    /// expiry, due times) uses it, so pods whose clocks disagree still agree on when a lease ends.
    pub fn now_ms(&self) -> i64 {
        crate::model::now_ms() + self.clock_offset_ms.load(Ordering::Relaxed)
    }

    /// Measures the offset to MongoDB's clock (`hello`'s `localTime`), to within half a round
    /// trip. Run at start and with every lease renewal, so a clock that drifts is followed.
    pub async fn sync_clock(&self) -> anyhow::Result<i64> {
        self.count("hello", 1);
        let before = crate::model::now_ms();
        let reply = self.db.run_command(doc! { "hello": 1 }).await.context("MongoDB hello")?;
        let after = crate::model::now_ms();
        let server = reply.get_datetime("localTime").context("MongoDB hello without localTime")?.timestamp_millis();
        let offset = server - (before + after) / 2;
        let previous = self.clock_offset_ms.swap(offset, Ordering::Relaxed);
        self.metrics.clock_offset.set(offset as f64 / 1000.0);
        if (offset - previous).abs() > 1000 || (previous == 0 && offset.abs() > 1000) {
            tracing::warn!(
                offset_ms = offset,
                round_trip_ms = after - before,
                "this host's clock differs from MongoDB's; lease times follow MongoDB's"
            );
        }
        Ok(offset)
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        self.count("ping", 1);
        self.db.run_command(doc! { "ping": 1 }).await.context("MongoDB ping")?;
        Ok(())
    }

    /// Creates the indexes and brings documents written by the Go service into the shape the
    /// claim queries expect. Safe to run on every start and from several replicas at once.
    pub async fn prepare(&self, lease: Duration) -> anyhow::Result<()> {
        let indexes = [
            IndexModel::builder()
                .keys(doc! { "source": 1 })
                .options(IndexOptions::builder().unique(true).sparse(true).build())
                .build(),
            IndexModel::builder().keys(doc! { "status": 1, "due_ms": 1 }).build(),
            IndexModel::builder().keys(doc! { "owner": 1, "status": 1 }).build(),
            IndexModel::builder().keys(doc! { "unreported": 1 }).build(),
        ];
        self.count("createIndexes", 1);
        self.count("update", 1);
        self.letters.create_indexes(indexes).await.context("creating letter indexes")?;

        self.adopt_legacy().await?;
        // Go-era `processing` letters have no owner that could ever release them: give them a
        // lease that expires, so the reaper returns them to `awaiting`.
        self.sync_clock().await?;
        let expiry = self.now_ms() + lease.as_millis() as i64;
        self.letters
            .update_many(
                doc! { "status": "processing", "lease_ms": { "$exists": false } },
                doc! { "$set": { "lease_ms": expiry } },
            )
            .await
            .context("migrating processing letters without a lease")?;
        Ok(())
    }

    /// Makes letters the Go service wrote (no due time) claimable. Run at start and by the lease
    /// maintenance, because the old service may still be writing beside this one (a canary).
    pub async fn adopt_legacy(&self) -> anyhow::Result<u64> {
        self.count("update", 1);
        let result = self
            .letters
            .update_many(
                doc! { "status": "awaiting", "due_ms": { "$exists": false } },
                doc! { "$set": { "due_ms": 0_i64 } },
            )
            .await
            .context("migrating awaiting letters without due_ms")?;
        Ok(result.modified_count)
    }

    /// Inserts letters; those whose `source` is already stored (a redelivered Kafka message) are
    /// skipped, not duplicated. A letter MongoDB can never take (over its document size limit,
    /// refused by a validator) is stored in its place as a failed letter without its body, so its
    /// producer hears why on the status topic; one that cannot be stored even so is returned in
    /// [`InsertReport::unstorable`] for the dead-letter topic. Only errors worth retrying (the
    /// server unreachable, a step-down) fail the call.
    pub async fn insert(&self, letters: &[Letter]) -> anyhow::Result<InsertReport> {
        let mut report = InsertReport::default();
        let mut refused: Vec<(usize, String)> = Vec::new();
        let mut storable: Vec<usize> = Vec::with_capacity(letters.len());
        for (index, letter) in letters.iter().enumerate() {
            match oversize(letter) {
                Some(reason) => refused.push((index, reason)),
                None => storable.push(index),
            }
        }
        let batch: Vec<&Letter> = storable.iter().map(|i| &letters[*i]).collect();
        let outcome = self.insert_many(&batch).await?;
        report.inserted += outcome.inserted;
        report.duplicates.extend(outcome.duplicates.iter().map(|i| source_of(batch[*i])));
        refused.extend(outcome.refused.into_iter().map(|(i, reason)| (storable[i], reason)));
        if refused.is_empty() {
            return Ok(report);
        }

        let stubs: Vec<Letter> = refused.iter().map(|(i, reason)| unstorable_stub(&letters[*i], reason)).collect();
        for (index, reason) in &refused {
            tracing::error!(
                source = %source_of(&letters[*index]),
                reason = %reason,
                "a letter MongoDB cannot store is failed without its body"
            );
        }
        let stub_refs: Vec<&Letter> = stubs.iter().collect();
        let outcome = self.insert_many(&stub_refs).await?;
        report.inserted += outcome.inserted;
        report.failed += outcome.inserted;
        report.duplicates.extend(outcome.duplicates.iter().map(|i| source_of(&stubs[*i])));
        report.unstorable.extend(outcome.refused.into_iter().map(|(i, stub_reason)| Unstorable {
            index: refused[i].0,
            reason: format!("{}; failed letter not stored either: {stub_reason}", refused[i].1),
        }));
        Ok(report)
    }

    /// One unordered insert; sorts each refused document into duplicate or never storable.
    async fn insert_many(&self, letters: &[&Letter]) -> anyhow::Result<InsertOutcome> {
        if letters.is_empty() {
            return Ok(InsertOutcome::default());
        }
        self.count("insert", 1);
        let error = match self.letters.insert_many(letters.iter().copied()).ordered(false).await {
            Ok(result) => return Ok(InsertOutcome { inserted: result.inserted_ids.len(), ..Default::default() }),
            Err(error) => error,
        };
        if let ErrorKind::InsertMany(failure) = error.kind.as_ref()
            && failure.write_concern_error.is_none()
            && let Some(write_errors) = &failure.write_errors
            && write_errors.iter().all(|e| e.code == DUPLICATE_KEY || is_permanent_write_error(e.code))
        {
            let mut outcome = InsertOutcome { inserted: letters.len() - write_errors.len(), ..Default::default() };
            for write_error in write_errors {
                if write_error.code == DUPLICATE_KEY {
                    outcome.duplicates.push(write_error.index);
                } else {
                    let reason = format!("MongoDB refused the letter ({}): {}", write_error.code, write_error.message);
                    outcome.refused.push((write_error.index, reason));
                }
            }
            return Ok(outcome);
        }
        Err(anyhow::Error::new(error).context("inserting letters"))
    }

    /// Keeps a dead letter the dead-letter topic would not take, so that nothing is lost and its
    /// partition can move on. The payload is cut to fit one document.
    pub async fn keep_dead_letter(&self, dead: &DeadLetterRecord<'_>) -> anyhow::Result<()> {
        const PAYLOAD_MAX: usize = MAX_DOCUMENT_BYTES - (1 << 20);
        let keep = dead.payload.len().min(PAYLOAD_MAX);
        let payload = mongodb::bson::Binary {
            subtype: mongodb::bson::spec::BinarySubtype::Generic,
            bytes: dead.payload[..keep].to_vec(),
        };
        let mut document = doc! {
            "topic": dead.topic, "partition": dead.partition, "offset": dead.offset,
            "reason": dead.reason, "dlq_error": dead.dlq_error,
            "payload": payload, "size": dead.payload.len() as i64, "truncated": i32::from(keep < dead.payload.len()),
            "created_at": mongodb::bson::DateTime::now(),
        };
        if let Some(key) = dead.key {
            use base64::Engine;
            document.insert("key_b64", base64::engine::general_purpose::STANDARD.encode(key));
        }
        self.count("insert", 1);
        self.dead_letters.insert_one(document).await.context("keeping a dead letter in MongoDB")?;
        Ok(())
    }

    /// Leases up to `limit.count` due letters, of at most `limit.bytes` together, to `owner` until
    /// `lease_until_ms`. Several replicas may claim at once: the update only takes letters still
    /// `awaiting`, and each replica reads back only the letters its own claim token marked.
    pub async fn claim(
        &self,
        owner: &str,
        limit: ClaimLimit,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> anyhow::Result<Vec<Letter>> {
        let due = doc! { "status": "awaiting", "due_ms": { "$lte": now_ms } };
        let ids = self.due_ids(due, limit).await.context("finding due letters")?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let token = ObjectId::new().to_hex();
        self.count("update", 1);
        self.count("find", 1);
        let claimed = self
            .letters
            .update_many(
                doc! { "_id": { "$in": &ids }, "status": "awaiting" },
                doc! { "$set": {
                    "status": "processing", "owner": owner, "lease_ms": lease_until_ms, "claim": &token,
                    "updated_ms": now_ms,
                } },
            )
            .await
            .context("claiming letters");
        // From here on the letters may be ours, even when the update itself failed: `updateMany`
        // is not a retryable write, so a network error can come after the server applied it.
        // Every failure hands them back by the claim token. Should that fail too, the letters
        // still come back when their lease ends: maintenance renews only letters this process
        // holds (`renew`), and it never held these.
        let read = match claimed {
            Ok(_) => self.read_claimed(&ids, &token).await,
            Err(error) => Err(error),
        };
        match read {
            Ok((letters, malformed)) => {
                if !malformed.is_empty() {
                    self.fail_malformed(&malformed, now_ms).await;
                }
                Ok(letters)
            }
            Err(error) => {
                if let Err(release) =
                    self.return_to_awaiting(doc! { "claim": &token, "status": "processing" }, now_ms, now_ms).await
                {
                    tracing::warn!(
                        error = %release,
                        claim = %token,
                        "releasing a failed claim failed; its letters come back when their lease ends"
                    );
                }
                Err(error)
            }
        }
    }

    /// Reads back what a claim took, document by document, so that one malformed document does
    /// not strand its neighbours: it comes back apart, with the reason.
    async fn read_claimed(&self, ids: &[Bson], token: &str) -> anyhow::Result<(Vec<Letter>, Vec<(Bson, String)>)> {
        let documents: Vec<Document> = self
            .letters
            .clone_with_type::<Document>()
            .find(doc! { "_id": { "$in": ids }, "claim": token })
            // One reply for the whole claim instead of a getMore per 101 letters.
            .batch_size(ids.len() as u32)
            .await
            .context("reading claimed letters")?
            .try_collect()
            .await
            .context("reading claimed letters")?;
        let mut letters = Vec::with_capacity(documents.len());
        let mut malformed = Vec::new();
        for document in documents {
            let id = document.get("_id").cloned().unwrap_or(Bson::Null);
            match mongodb::bson::from_document::<Letter>(document) {
                Ok(letter) => letters.push(letter),
                Err(error) => malformed.push((id, format!("the stored letter cannot be read: {error}"))),
            }
        }
        Ok((letters, malformed))
    }

    /// Ends letters whose stored document this version cannot read, with the reason, instead of
    /// retrying them forever.
    async fn fail_malformed(&self, malformed: &[(Bson, String)], now_ms: i64) {
        for (id, reason) in malformed {
            tracing::error!(letter_id = %id, reason = %reason, "malformed letter document set to error");
            self.count("update", 1);
            let update = doc! {
                "$set": { "status": "error", "error": reason, "updated_ms": now_ms },
                "$unset": { "owner": "", "lease_ms": "", "claim": "" },
            };
            if let Err(error) = self.letters.update_one(doc! { "_id": id }, update).await {
                tracing::warn!(letter_id = %id, error = %error, "failing a malformed letter failed; its lease will expire");
            }
        }
    }

    /// The ids of the first due letters that fit `limit`, in one reply: their sizes come with the
    /// ids, so no body is read before the claim knows it has room for it.
    async fn due_ids(&self, filter: Document, limit: ClaimLimit) -> anyhow::Result<Vec<Bson>> {
        self.count("find", 1);
        let letters = self.letters.clone_with_type::<Document>();
        let found: Vec<Document> = letters
            .find(filter)
            .sort(doc! { "due_ms": 1 })
            .limit(limit.count as i64)
            .batch_size(limit.count as u32)
            .projection(doc! { "_id": 1, "size_bytes": 1 })
            .await?
            .try_collect()
            .await?;
        let sized = found.into_iter().filter_map(|d| {
            let size = d.get("size_bytes").and_then(|s| s.as_i64().or_else(|| s.as_i32().map(i64::from)));
            Some((d.get("_id")?.clone(), size.map_or(UNKNOWN_SIZE, |s| s.max(0) as usize)))
        });
        Ok(limit.fit(sized))
    }

    /// The ids of up to `limit` letters matching `filter`, in one reply.
    async fn ids(&self, filter: Document, sort: Option<Document>, limit: usize) -> anyhow::Result<Vec<Bson>> {
        self.count("find", 1);
        let letters = self.letters.clone_with_type::<Document>();
        let mut find = letters.find(filter).limit(limit as i64).batch_size(limit as u32).projection(doc! { "_id": 1 });
        if let Some(sort) = sort {
            find = find.sort(sort);
        }
        let documents: Vec<Document> = find.await?.try_collect().await?;
        Ok(documents.into_iter().filter_map(|d| d.get("_id").cloned()).collect())
    }

    /// Extends the lease of the letters this process holds (`held`) that are still leased to
    /// `owner`. Only those: a letter leased to `owner` that the process does not hold (a claim
    /// whose reply was lost, and whose release failed too) must expire, or it would stay leased
    /// and unsent for as long as the process lives. One round trip per [`RENEW_CHUNK`] letters.
    pub async fn renew(&self, owner: &str, held: &[ObjectId], lease_until_ms: i64) -> anyhow::Result<u64> {
        let mut renewed = 0;
        for chunk in held.chunks(RENEW_CHUNK) {
            self.count("update", 1);
            let result = self
                .letters
                .update_many(
                    doc! { "_id": { "$in": chunk }, "owner": owner, "status": "processing" },
                    doc! { "$set": { "lease_ms": lease_until_ms } },
                )
                .await
                .context("renewing leases")?;
            renewed += result.modified_count;
        }
        Ok(renewed)
    }

    /// The letters leased to `owner` now.
    pub async fn held_by(&self, owner: &str) -> anyhow::Result<std::collections::HashSet<ObjectId>> {
        self.count("find", 1);
        let documents: Vec<Document> = self
            .letters
            .clone_with_type::<Document>()
            .find(doc! { "owner": owner, "status": "processing" })
            .projection(doc! { "_id": 1 })
            .batch_size(10_000)
            .await
            .context("reading held letters")?
            .try_collect()
            .await
            .context("reading held letters")?;
        Ok(documents.iter().filter_map(|d| d.get_object_id("_id").ok()).collect())
    }

    /// Returns letters whose owner stopped renewing (it died) to `awaiting`.
    pub async fn reap_expired(&self, now_ms: i64) -> anyhow::Result<u64> {
        self.return_to_awaiting(doc! { "status": "processing", "lease_ms": { "$lt": now_ms } }, now_ms, now_ms)
            .await
            .context("reaping expired leases")
    }

    /// Returns every letter `owner` still holds to `awaiting` (graceful shutdown). Another
    /// replica's letters are never touched.
    pub async fn release_all(&self, owner: &str) -> anyhow::Result<u64> {
        let now_ms = self.now_ms();
        self.return_to_awaiting(doc! { "owner": owner, "status": "processing" }, now_ms, now_ms)
            .await
            .context("releasing own letters")
    }

    /// Returns claimed letters `owner` still holds to `awaiting`, due at `due_ms`, without
    /// counting an attempt (a claim that could not be checked against the suppression list).
    pub async fn release(&self, owner: &str, ids: &[ObjectId], due_ms: i64) -> anyhow::Result<u64> {
        let now_ms = self.now_ms();
        let mut released = 0;
        for chunk in ids.chunks(RENEW_CHUNK) {
            let filter = doc! { "_id": { "$in": chunk }, "owner": owner, "status": "processing" };
            released += self.return_to_awaiting(filter, now_ms, due_ms).await.context("releasing claimed letters")?;
        }
        Ok(released)
    }

    /// Makes the matching leased letters due again at `due_ms`, without counting an attempt.
    async fn return_to_awaiting(&self, filter: Document, now_ms: i64, due_ms: i64) -> mongodb::error::Result<u64> {
        self.count("update", 1);
        let update = doc! {
            "$set": { "status": "awaiting", "due_ms": due_ms, "updated_ms": now_ms },
            "$unset": { "owner": "", "lease_ms": "", "claim": "" },
        };
        Ok(self.letters.update_many(filter, update).await?.modified_count)
    }

    /// Writes a batch of attempt outcomes in one round trip. Each statement only applies while
    /// `owner` still holds the letter; returns how many did not (their lease had been lost).
    pub async fn record(&self, owner: &str, records: &[AttemptRecord]) -> anyhow::Result<usize> {
        if records.is_empty() {
            return Ok(0);
        }
        let now_ms = self.now_ms();
        let updates: Vec<Document> = records.iter().map(|r| outcome_statement(owner, r, now_ms)).collect();
        self.count("update", 1);
        let reply = self
            .db
            .run_command(doc! { "update": self.letters.name(), "updates": updates, "ordered": false })
            .await
            .context("recording outcomes")?;
        if let Ok(errors) = reply.get_array("writeErrors")
            && !errors.is_empty()
        {
            anyhow::bail!("recording outcomes: {} write errors, first: {}", errors.len(), errors[0]);
        }
        let matched = match reply.get("n") {
            Some(Bson::Int32(n)) => *n as usize,
            Some(Bson::Int64(n)) => *n as usize,
            _ => records.len(),
        };
        Ok(records.len().saturating_sub(matched))
    }

    /// Marks final outcomes as published to the status topic.
    pub async fn mark_reported(&self, ids: &[ObjectId]) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.count("update", 1);
        self.letters
            .update_many(doc! { "_id": { "$in": ids } }, doc! { "$unset": { "unreported": "" } })
            .await
            .context("marking outcomes reported")?;
        Ok(())
    }

    /// Final outcomes stored at least `min_age` ago and still not published.
    pub async fn unreported(&self, updated_before_ms: i64, limit: usize) -> anyhow::Result<Vec<Letter>> {
        self.count("find", 1);
        self.letters
            .find(doc! { "unreported": 1_i32, "updated_ms": { "$lt": updated_before_ms } })
            // Oldest first; a message that failed is postponed (see `postpone_unreported`), so a
            // few that the broker keeps refusing cannot starve the rest.
            .sort(doc! { "updated_ms": 1 })
            .limit(limit as i64)
            .batch_size(limit as u32)
            .await
            .context("finding unreported outcomes")?
            .try_collect()
            .await
            .context("reading unreported outcomes")
    }

    /// Puts unreported outcomes whose republishing failed at the back of the queue.
    pub async fn postpone_unreported(&self, ids: &[ObjectId], now_ms: i64) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.count("update", 1);
        self.letters
            .update_many(doc! { "_id": { "$in": ids }, "unreported": 1_i32 }, doc! { "$set": { "updated_ms": now_ms } })
            .await
            .context("postponing unreported outcomes")?;
        Ok(())
    }

    /// Takes the lock `name` for `owner` until `until_ms`, or extends it; false while another
    /// owner holds it. One round trip, two the first time.
    pub async fn try_lock(&self, name: &str, owner: &str, now_ms: i64, until_ms: i64) -> anyhow::Result<bool> {
        self.count("update", 1);
        let taken = self
            .locks
            .update_one(
                doc! { "_id": name, "$or": [ { "until_ms": { "$lt": now_ms } }, { "owner": owner } ] },
                doc! { "$set": { "owner": owner, "until_ms": until_ms } },
            )
            .await
            .with_context(|| format!("taking the {name} lock"))?;
        if taken.matched_count == 1 {
            return Ok(true);
        }
        self.count("insert", 1);
        match self.locks.insert_one(doc! { "_id": name, "owner": owner, "until_ms": until_ms }).await {
            Ok(_) => Ok(true),
            // It exists and another replica holds it.
            Err(error) if is_duplicate(&error) => Ok(false),
            Err(error) => Err(anyhow::Error::new(error).context(format!("creating the {name} lock"))),
        }
    }

    /// Deletes up to `batch` finished letters last changed before `before_ms` whose status message
    /// went out; returns how many. Bodies included, so the collection does not grow without bound.
    pub async fn delete_finished(&self, before_ms: i64, batch: usize) -> anyhow::Result<u64> {
        let past = doc! {
            "status": { "$in": ["sent", "error"] },
            "updated_ms": { "$lt": before_ms },
            "unreported": { "$exists": false },
        };
        let ids = self.ids(past, None, batch).await.context("finding letters past retention")?;
        if ids.is_empty() {
            return Ok(0);
        }
        self.count("delete", 1);
        let deleted = self
            .letters
            .delete_many(doc! { "_id": { "$in": ids }, "status": { "$in": ["sent", "error"] } })
            .await
            .context("deleting letters past retention")?;
        Ok(deleted.deleted_count)
    }

    /// Letters per status, for the metrics gauge. One aggregation, run on a timer, never per scrape.
    pub async fn count_by_status(&self) -> anyhow::Result<Vec<(String, i64)>> {
        self.count("aggregate", 1);
        let mut cursor = self
            .letters
            .aggregate([doc! { "$group": { "_id": "$status", "n": { "$sum": 1 } } }])
            .await
            .context("counting letters by status")?;
        let mut counts = Vec::new();
        while let Some(row) = cursor.try_next().await.context("counting letters by status")? {
            let status = row.get_str("_id").unwrap_or("unknown").to_owned();
            let n = match row.get("n") {
                Some(Bson::Int32(n)) => *n as i64,
                Some(Bson::Int64(n)) => *n,
                Some(Bson::Double(n)) => *n as i64,
                _ => 0,
            };
            counts.push((status, n));
        }
        Ok(counts)
    }

    /// The database, for the collections other modules own (the suppression list, `control`).
    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn collection(&self) -> &Collection<Letter> {
        &self.letters
    }
}

fn rejections(rejected: &[Rejection]) -> Vec<Document> {
    rejected.iter().map(|r| doc! { "address": &r.address, "reply": &r.reply }).collect()
}

fn outcome_statement(owner: &str, record: &AttemptRecord, now_ms: i64) -> Document {
    let letter = &record.letter;
    let filter = doc! { "_id": letter.id, "owner": owner, "status": "processing" };
    let mut set = doc! {
        "updated_ms": now_ms,
        "attempts": letter.attempts,
        "delivered": &letter.delivered,
        "rejected": rejections(&letter.rejected),
    };
    if let Some(reply) = &letter.last_reply {
        set.insert("last_reply", reply);
    }
    let mut unset = doc! { "owner": "", "lease_ms": "", "claim": "" };
    match &record.outcome {
        Outcome::Sent => {
            set.insert("status", Status::Sent.as_str());
            unset.insert("error", "");
        }
        Outcome::Failed { reason, .. } => {
            set.insert("status", Status::Error.as_str());
            set.insert("error", reason);
        }
        Outcome::Retry { reason, due_ms } => {
            set.insert("status", Status::Awaiting.as_str());
            set.insert("error", reason);
            set.insert("due_ms", *due_ms);
        }
        Outcome::Released => {
            set = doc! { "status": Status::Awaiting.as_str(), "due_ms": now_ms, "updated_ms": now_ms };
        }
    }
    if matches!(record.outcome, Outcome::Sent | Outcome::Failed { .. }) && !record.published {
        set.insert("unreported", 1_i32);
    }
    doc! { "q": filter, "u": { "$set": set, "$unset": unset }, "multi": false, "upsert": false }
}

/// Why a letter is too large to be a MongoDB document, if it is. The driver refuses such a
/// document before sending anything and fails the whole insert with it, so it must be caught
/// here. Only letters whose text comes near the limit pay for an exact measurement.
fn oversize(letter: &Letter) -> Option<String> {
    let text = letter.body.len()
        + letter.subject.len()
        + letter.token.len()
        + letter.addresses.iter().map(|a| a.len() + 16).sum::<usize>();
    if text < MAX_DOCUMENT_BYTES - (1 << 20) {
        return None;
    }
    let size = match mongodb::bson::to_vec(letter) {
        Ok(bytes) => bytes.len(),
        Err(error) => return Some(format!("the letter cannot be encoded for MongoDB: {error}")),
    };
    (size > MAX_DOCUMENT_BYTES).then(|| {
        format!("the letter is {size} bytes as a MongoDB document, over MongoDB's limit of {MAX_DOCUMENT_BYTES} bytes")
    })
}

/// The failed letter stored in place of one MongoDB refused: without the body, which is what
/// usually makes a letter too large, and without its recipients too if they alone are too many,
/// with the reason, waiting to be reported.
fn unstorable_stub(letter: &Letter, reason: &str) -> Letter {
    let mut stub = letter.clone_head();
    stub.status = Status::Error;
    stub.unreported = Some(1);
    stub.addresses = letter.addresses.clone();
    stub.rejected = letter.rejected.clone();
    stub.error = Some(format!("not stored: {reason}; the body was dropped"));
    if oversize(&stub).is_some() {
        stub.error =
            Some(format!("not stored: {reason}; the body and the {} addresses were dropped", letter.addresses.len()));
        stub.addresses = Vec::new();
        stub.rejected = Vec::new();
        stub.delivered = Vec::new();
    }
    stub
}

fn source_of(letter: &Letter) -> String {
    letter.source.clone().unwrap_or_default()
}

/// Write errors that the same document will get again however often it is retried: a
/// validator's refusal, a document or index key too large, a value MongoDB cannot store. Any
/// other write error fails the insert, which is retried.
fn is_permanent_write_error(code: i32) -> bool {
    const DOCUMENT_VALIDATION_FAILURE: i32 = 121;
    const BSON_OBJECT_TOO_LARGE: i32 = 10334;
    const BAD_VALUE: i32 = 2;
    const TYPE_MISMATCH: i32 = 14;
    const KEY_TOO_LONG: i32 = 17280;
    const DOLLAR_PREFIXED_FIELD_NAME: i32 = 52;
    const INVALID_ID_FIELD: i32 = 53;
    matches!(
        code,
        DOCUMENT_VALIDATION_FAILURE
            | BSON_OBJECT_TOO_LARGE
            | BAD_VALUE
            | TYPE_MISMATCH
            | KEY_TOO_LONG
            | DOLLAR_PREFIXED_FIELD_NAME
            | INVALID_ID_FIELD
    )
}

pub(crate) fn is_duplicate(error: &mongodb::error::Error) -> bool {
    matches!(error.kind.as_ref(), ErrorKind::Write(WriteFailure::WriteError(e)) if e.code == DUPLICATE_KEY)
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

/// The letters of one batch: those that came from Kafka messages with one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BatchKey {
    /// A UTF-8 key, as in `kafkakey`.
    Text(String),
    /// Any key's exact bytes, base64 (as in `key_b64`, which is only stored for keys that are not
    /// UTF-8).
    Base64(String),
}

impl BatchKey {
    /// The batch a letter belongs to, as [`BatchKey::filter`] finds it; `None` for letters whose
    /// message had no key, which no batch key finds.
    pub fn of(letter: &Letter) -> Option<BatchKey> {
        if letter.key_null.is_some() {
            return None;
        }
        Some(match &letter.key_b64 {
            Some(b64) => BatchKey::Base64(b64.clone()),
            None => BatchKey::Text(letter.kafkakey.clone()),
        })
    }

    fn filter(&self) -> Document {
        match self {
            // Letters whose key was not UTF-8 keep a lossy `kafkakey` that must not match text.
            BatchKey::Text(key) => {
                doc! { "kafkakey": key, "key_b64": { "$exists": false }, "key_null": { "$exists": false } }
            }
            BatchKey::Base64(key) => doc! { "key_b64": key },
        }
    }
}

/// How far one batch got, from its stored letters.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BatchProgress {
    pub letters: u64,
    pub awaiting: u64,
    pub processing: u64,
    pub sent: u64,
    pub error: u64,
    /// Of `error`, the letters cancelled by an operator.
    pub cancelled: u64,
    pub recipients_delivered: u64,
    pub recipients_refused: u64,
    /// The earliest and latest `updated_ms` among the letters (Unix ms); absent without letters.
    pub first_update_ms: Option<i64>,
    pub last_update_ms: Option<i64>,
}

/// The reason stored on letters cancelled by an operator.
pub const CANCELLED: &str = "cancelled";

/// Operator actions on batches and letters (`POST /batches/{key}/…`, `GET /letters/{id}`).
impl Store {
    /// Ends every `awaiting` letter of the batch as `error`/`cancelled`, to be reported, and
    /// returns them (with bodies, for their status messages). Letters already claimed by a
    /// replica are not touched: they are in flight, or will be released and can be cancelled then.
    pub async fn cancel_batch(&self, key: &BatchKey, now_ms: i64) -> anyhow::Result<Vec<Letter>> {
        let token = ObjectId::new().to_hex();
        let mut filter = key.filter();
        filter.insert("status", Status::Awaiting.as_str());
        self.count("update", 1);
        self.letters
            .update_many(
                filter,
                doc! { "$set": {
                    "status": Status::Error.as_str(), "error": CANCELLED, "updated_ms": now_ms,
                    "unreported": 1_i32, "cancel": &token,
                } },
            )
            .await
            .context("cancelling a batch")?;
        self.count("find", 1);
        self.letters
            .find(doc! { "cancel": &token })
            .batch_size(1000)
            .await
            .context("reading cancelled letters")?
            .try_collect()
            .await
            .context("reading cancelled letters")
    }

    /// Returns the batch's failed letters to `awaiting` with their attempts reset. Delivered
    /// recipients stay delivered (not sent again); refused ones are tried again, since a retry is
    /// asked for once the cause is fixed. Letters that never reached SMTP because they cannot
    /// be sent (invalid at ingest, stored without their body) are left alone; cancelled ones are
    /// retried. Returns how many were returned.
    pub async fn retry_batch(&self, key: &BatchKey, now_ms: i64) -> anyhow::Result<u64> {
        let mut filter = key.filter();
        filter.insert("status", Status::Error.as_str());
        filter.insert("$or", vec![doc! { "attempts": { "$gt": 0 } }, doc! { "error": CANCELLED }]);
        self.count("update", 1);
        let result = self
            .letters
            .update_many(
                filter,
                doc! {
                    "$set": {
                        "status": Status::Awaiting.as_str(), "attempts": 0_i32, "due_ms": now_ms,
                        "updated_ms": now_ms, "rejected": Vec::<Document>::new(),
                    },
                    "$unset": { "error": "", "unreported": "", "cancel": "", "owner": "", "lease_ms": "", "claim": "" },
                },
            )
            .await
            .context("retrying a batch")?;
        Ok(result.modified_count)
    }

    /// Counts a batch's letters by status and its recipients by outcome. Reads only the fields
    /// it counts (no bodies), in one pass.
    pub async fn batch_progress(&self, key: &BatchKey) -> anyhow::Result<BatchProgress> {
        self.count("find", 1);
        let mut cursor = self
            .letters
            .clone_with_type::<Document>()
            .find(key.filter())
            .projection(doc! { "status": 1, "error": 1, "delivered": 1, "rejected": 1, "updated_ms": 1 })
            .batch_size(10_000)
            .await
            .context("reading a batch's letters")?;
        let mut progress = BatchProgress::default();
        while let Some(letter) = cursor.try_next().await.context("reading a batch's letters")? {
            progress.letters += 1;
            match letter.get_str("status").unwrap_or_default() {
                "awaiting" => progress.awaiting += 1,
                "processing" => progress.processing += 1,
                "sent" => progress.sent += 1,
                "error" => progress.error += 1,
                _ => {}
            }
            if letter.get_str("status") == Ok("error") && letter.get_str("error") == Ok(CANCELLED) {
                progress.cancelled += 1;
            }
            progress.recipients_delivered += letter.get_array("delivered").map_or(0, |a| a.len() as u64);
            progress.recipients_refused += letter.get_array("rejected").map_or(0, |a| a.len() as u64);
            let updated = match letter.get("updated_ms") {
                Some(Bson::Int64(n)) => Some(*n),
                Some(Bson::Int32(n)) => Some(i64::from(*n)),
                _ => None,
            };
            if let Some(updated) = updated {
                progress.first_update_ms = Some(progress.first_update_ms.map_or(updated, |f| f.min(updated)));
                progress.last_update_ms = Some(progress.last_update_ms.map_or(updated, |l| l.max(updated)));
            }
        }
        Ok(progress)
    }

    /// One letter without its body, or `None` when there is no such letter.
    pub async fn letter_head(&self, id: ObjectId) -> anyhow::Result<Option<Letter>> {
        self.count("find", 1);
        let found = self
            .letters
            .clone_with_type::<Document>()
            .find_one(doc! { "_id": id })
            .projection(doc! { "body": 0 })
            .await
            .context("reading a letter")?;
        let Some(mut document) = found else { return Ok(None) };
        document.insert("body", "");
        let letter = mongodb::bson::from_document(document).context("reading a letter")?;
        Ok(Some(letter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_takes_the_letters_that_fit_in_order() {
        let limit = ClaimLimit { count: 4, bytes: 100, oversize_alone: false };
        let letters = [("a", 40), ("b", 50), ("c", 20), ("d", 1)];
        assert_eq!(limit.fit(letters.into_iter()), ["a", "b"], "stops at the first that does not fit");
        assert_eq!(ClaimLimit { count: 1, ..limit }.fit(letters.into_iter()), ["a"]);
        let huge = [("big", 500), ("small", 1)];
        assert!(limit.fit(huge.into_iter()).is_empty(), "waits for room while other letters are held");
        let alone = ClaimLimit { oversize_alone: true, ..limit };
        assert_eq!(alone.fit(huge.into_iter()), ["big"], "a letter larger than the budget goes alone");
    }
}
