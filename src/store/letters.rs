//! The letters: inserts, claims, leases, outcomes, the unreported ones, and dead letters.

use std::time::Duration;

use anyhow::Context;
use futures::TryStreamExt;
use mongodb::{
    IndexModel,
    bson::{Bson, Document, RawArrayBuf, RawBson, RawBsonRef, RawDocumentBuf, doc, oid::ObjectId, rawdoc},
    error::ErrorKind,
    options::IndexOptions,
};

use super::{
    DUPLICATE_KEY, Store,
    bson_writer::DocWriter,
    letter_doc::{encode_letter, rejections},
};
use crate::{
    model::{AttemptRecord, Letter, Outcome, Status},
    priority::{Lane, scheduled_vt},
};

/// One claimed document as a letter, or why this version cannot read it.
fn decode_letter(document: &RawDocumentBuf) -> Result<Letter, String> {
    super::letter_doc::decode(document).map_err(|error| format!("the stored letter cannot be read: {error}"))
}

/// A raw document's `_id`, to fail it by; `Null` when even that cannot be read.
fn raw_id(document: &RawDocumentBuf) -> Bson {
    match document.get("_id") {
        Ok(Some(id)) => Bson::try_from(id).unwrap_or(Bson::Null),
        _ => Bson::Null,
    }
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

/// Which lanes a claim takes, and in what proportion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LaneClaim {
    /// The least share of a claim that goes to bulk letters when both lanes have enough.
    pub bulk_share: f64,
    /// Only bulk letters placed before this `vt` (the express claim: those that go before the
    /// bulk letters already held; the others wait for a regular claim).
    pub bulk_before: Option<f64>,
}

impl LaneClaim {
    /// Up to `count` of the two lanes' first letters: transactional first, but at least
    /// `bulk_share` of `count` bulk when there are enough, and whatever one lane leaves to the other.
    fn merge<T>(&self, count: usize, urgent: Vec<T>, bulk: Vec<T>) -> Vec<T> {
        let bulk_min = ((count as f64 * self.bulk_share).ceil() as usize).min(bulk.len());
        let urgent_taken = urgent.len().min(count.saturating_sub(bulk_min));
        let bulk_taken = bulk.len().min(count - urgent_taken);
        urgent.into_iter().take(urgent_taken).chain(bulk.into_iter().take(bulk_taken)).collect()
    }
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
    /// Creates the indexes and brings documents written by the Go service into the shape the
    /// claim queries expect. Safe to run on every start and from several replicas at once.
    pub async fn prepare(&self, lease: Duration) -> anyhow::Result<()> {
        // First: nothing may be decided on this host's clock (a lease, a due time, a grant).
        self.sync_clock().await?;
        let indexes = [
            IndexModel::builder()
                .keys(doc! { "source": 1 })
                .options(IndexOptions::builder().unique(true).sparse(true).build())
                .build(),
            IndexModel::builder().keys(doc! { "status": 1, "due_ms": 1 }).build(),
            // The claim: per lane, in fair order, due ones only; `due_ms` in the key so a letter
            // not due yet is passed over without reading it (`due_ids`).
            IndexModel::builder().keys(doc! { "status": 1, "lane": 1, "vt": 1, "due_ms": 1 }).build(),
            // Not for MongoDB, whose planner takes the claim's index above; a partial index of
            // the few transactional letters costs it one small key each. The local stack's
            // Mongo-wire server (nx-27017 on SQLite) matches an equality against arrays too
            // unless some index ends with the field, so without one its `lane` could not use
            // the claim's index: each lane's claim sorted every due letter, 150-220 ms at 20,000
            // waiting against 4-18 ms with it, and the bench's campaign went at 13/s, not 100/s.
            IndexModel::builder()
                .keys(doc! { "lane": 1 })
                .options(
                    IndexOptions::builder()
                        .partial_filter_expression(doc! { "lane": Lane::Transactional.as_str() })
                        .build(),
                )
                .build(),
            // Awaiting letters past their `NotAfter`, whatever their due time (`expire_awaiting`).
            IndexModel::builder().keys(doc! { "status": 1, "not_after_ms": 1 }).build(),
            IndexModel::builder().keys(doc! { "owner": 1, "status": 1 }).build(),
            IndexModel::builder().keys(doc! { "unreported": 1 }).build(),
            // The reputation brake's window: the last letters sent (`FeedbackStore::brake_window`).
            IndexModel::builder().keys(doc! { "status": 1, "updated_ms": 1 }).build(),
        ];
        self.count("createIndexes", 1);
        self.count("update", 1);
        self.letters.create_indexes(indexes).await.context("creating letter indexes")?;

        self.adopt_legacy().await?;
        // Go-era `processing` letters have no owner that could ever release them: give them a
        // lease that expires, so the reaper returns them to `awaiting`.
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

    /// Makes letters the Go service wrote (no due time) and letters of versions before the lanes
    /// (no lane, no place in the fair order) claimable: bulk, at the front of the fair order,
    /// since they were there first. Run at start and by the lease maintenance, because an older
    /// version may still be writing beside this one (a canary, a rolling update).
    ///
    /// Usually there are none, and then this is one indexed `find` (the claim's index, `lane`
    /// null). The updates go by `_id`: an `update_many` on `$exists: false` made the local
    /// stack's server read every awaiting letter, ~60-90 ms at 20,000 waiting, every 5 s, and
    /// every claim and outcome waited behind it (figure 13's stalls).
    pub async fn adopt_legacy(&self) -> anyhow::Result<u64> {
        let mut adopted = 0;
        loop {
            // `lane` and `vt` are always written together; Go-era letters have neither, nor a due time.
            let ids = self
                .ids_matching(doc! { "status": "awaiting", "lane": Bson::Null }, RENEW_CHUNK)
                .await
                .context("finding letters without a lane")?;
            if ids.is_empty() {
                return Ok(adopted);
            }
            self.count("update", 2);
            self.letters
                .update_many(
                    doc! { "_id": { "$in": &ids }, "status": "awaiting", "due_ms": { "$exists": false } },
                    doc! { "$set": { "due_ms": 0_i64 } },
                )
                .await
                .context("migrating awaiting letters without due_ms")?;
            let laned = self
                .letters
                .update_many(
                    doc! { "_id": { "$in": &ids }, "status": "awaiting", "lane": Bson::Null },
                    doc! { "$set": { "lane": Lane::Bulk.as_str(), "vt": 0.0_f64 } },
                )
                .await
                .context("migrating awaiting letters without a lane")?;
            adopted += laned.modified_count;
            if ids.len() < RENEW_CHUNK || laned.modified_count == 0 {
                return Ok(adopted);
            }
        }
    }

    /// The ids of up to `limit` letters matching `filter`, read through an index, so that an
    /// update can then go by `_id` (see `adopt_legacy`).
    async fn ids_matching(&self, filter: Document, limit: usize) -> mongodb::error::Result<Vec<ObjectId>> {
        self.count("find", 1);
        let found: Vec<Document> = self
            .letters
            .clone_with_type::<Document>()
            .find(filter)
            .projection(doc! { "_id": 1 })
            .limit(limit as i64)
            .batch_size(limit as u32)
            .await?
            .try_collect()
            .await?;
        Ok(found.iter().filter_map(|d| d.get_object_id("_id").ok()).collect())
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
        let documents = letters.iter().map(|letter| encode_letter(letter)).collect::<Result<Vec<_>, _>>()?;
        let inserted = self.letters.clone_with_type::<RawDocumentBuf>().insert_many(documents).ordered(false).await;
        let error = match inserted {
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
            "created_at": mongodb::bson::DateTime::from_millis(self.now_ms()),
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
    /// `lease_until_ms`: transactional ones first, bulk ones for at least `lanes.bulk_share` of
    /// the count when there are enough of both. Several replicas may claim at once: the update
    /// only takes letters still `awaiting`, and each replica reads back only the letters its own
    /// claim token marked.
    pub async fn claim(
        &self,
        owner: &str,
        limit: ClaimLimit,
        now_ms: i64,
        lease_until_ms: i64,
        lanes: LaneClaim,
    ) -> anyhow::Result<Vec<Letter>> {
        let ids = self.due_ids(limit, now_ms, lanes).await.context("finding due letters")?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let token = ObjectId::new().to_hex();
        let count = ids.len();
        // The ids as raw BSON, for both commands: through a `Document`, each `ObjectId` went
        // out as a hex string and was parsed back, twice (~4,000 instructions a letter, issue 23).
        let raw_ids: RawArrayBuf = ids.into_iter().collect();
        let statement = rawdoc! {
            "q": { "_id": { "$in": raw_ids.clone() }, "status": "awaiting" },
            "u": { "$set": {
                "status": "processing", "owner": owner, "lease_ms": lease_until_ms, "claim": token.as_str(),
                "updated_ms": now_ms,
            } },
            "multi": true,
        };
        self.count("find", 1);
        let claimed = self.update_statements(self.letters.name(), vec![statement], "claiming letters").await;
        // From here on the letters may be ours, even when the update itself failed: `updateMany`
        // is not a retryable write, so a network error can come after the server applied it.
        // Every failure hands them back by the claim token. Should that fail too, the letters
        // still come back when their lease ends: maintenance renews only letters this process
        // holds (`renew`), and it never held these.
        let read = match claimed {
            Ok(_) => self.read_claimed(raw_ids, count, &token).await,
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
    async fn read_claimed(
        &self,
        ids: RawArrayBuf,
        count: usize,
        token: &str,
    ) -> anyhow::Result<(Vec<Letter>, Vec<(Bson, String)>)> {
        // Raw documents, each decoded once straight into a `Letter`: decoding into `Document`
        // first and then into the letter cost a second full decoding, ~80,000 instructions a
        // letter under callgrind (issue 23).
        let find = rawdoc! {
            "find": self.letters.name(),
            "filter": { "_id": { "$in": ids }, "claim": token },
            // One reply for the whole claim instead of a getMore per 101 letters.
            "batchSize": count as i32,
        };
        let documents: Vec<RawDocumentBuf> = self
            .db
            .run_raw_cursor_command(find)
            .await
            .context("reading claimed letters")?
            .with_type::<RawDocumentBuf>()
            .try_collect()
            .await
            .context("reading claimed letters")?;
        let mut letters = Vec::with_capacity(documents.len());
        let mut malformed = Vec::new();
        for document in documents {
            match decode_letter(&document) {
                Ok(letter) => letters.push(letter),
                Err(reason) => malformed.push((raw_id(&document), reason)),
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

    /// The ids of the first due letters that fit `limit`, in one reply per lane (the two asked at
    /// once): their sizes come with the ids, so no body is read before the claim knows it has
    /// room for it. Each lane is one range of `{status, lane, vt, due_ms}`, read in `vt` order
    /// up to the scheduled letters due now (`priority::scheduled_vt`).
    async fn due_ids(&self, limit: ClaimLimit, now_ms: i64, lanes: LaneClaim) -> anyhow::Result<Vec<RawBson>> {
        self.count("find", 2);
        let (urgent, bulk) = futures::future::try_join(
            self.due_in(Lane::Transactional, limit.count, now_ms, None),
            self.due_in(Lane::Bulk, limit.count, now_ms, lanes.bulk_before),
        )
        .await?;
        Ok(limit.fit(lanes.merge(limit.count, urgent, bulk).into_iter()))
    }

    /// One lane's first due letters, (id, size), in fair order; only those placed before
    /// `before` if given.
    async fn due_in(
        &self,
        lane: Lane,
        count: usize,
        now_ms: i64,
        before: Option<f64>,
    ) -> anyhow::Result<Vec<(RawBson, usize)>> {
        let vt = match before {
            Some(before) => doc! { "$lt": before.min(scheduled_vt(now_ms)) },
            None => doc! { "$lte": scheduled_vt(now_ms) },
        };
        let filter = doc! { "status": "awaiting", "lane": lane.as_str(), "vt": vt, "due_ms": { "$lte": now_ms } };
        // Raw documents, read field by field: decoding each into a `Document` (an ordered map,
        // its `_id` through a hex string) cost ~7,000 instructions a letter (issue 23).
        let found: Vec<RawDocumentBuf> = self
            .letters
            .clone_with_type::<RawDocumentBuf>()
            .find(filter)
            .sort(doc! { "vt": 1 })
            .limit(count as i64)
            .batch_size(count as u32)
            .projection(doc! { "_id": 1, "size_bytes": 1 })
            .await?
            .try_collect()
            .await?;
        Ok(found
            .iter()
            .filter_map(|d| {
                let id = d.get("_id").ok()??.to_raw_bson();
                let size = match d.get("size_bytes") {
                    Ok(Some(RawBsonRef::Int64(size))) => Some(size),
                    Ok(Some(RawBsonRef::Int32(size))) => Some(i64::from(size)),
                    _ => None,
                };
                Some((id, size.map_or(UNKNOWN_SIZE, |s| s.max(0) as usize)))
            })
            .collect())
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
    pub async fn held_by(&self, owner: &str) -> anyhow::Result<crate::model::IdSet> {
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
    /// Found first and then updated by `_id`, as `adopt_legacy` does and for its reason.
    pub async fn reap_expired(&self, now_ms: i64) -> anyhow::Result<u64> {
        let expired = doc! { "status": "processing", "lease_ms": { "$lt": now_ms } };
        let mut reaped = 0;
        loop {
            let ids = self.ids_matching(expired.clone(), RENEW_CHUNK).await.context("finding expired leases")?;
            if ids.is_empty() {
                return Ok(reaped);
            }
            let mut filter = expired.clone();
            filter.insert("_id", doc! { "$in": &ids });
            let returned = self.return_to_awaiting(filter, now_ms, now_ms).await.context("reaping expired leases")?;
            reaped += returned;
            // Renewed meanwhile, all of them: the next round would find the same ones again.
            if ids.len() < RENEW_CHUNK || returned == 0 {
                return Ok(reaped);
            }
        }
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
        let updates =
            records.iter().map(|r| outcome_statement(owner, r, now_ms)).collect::<anyhow::Result<Vec<_>>>()?;
        let reply = self.update_statements(self.letters.name(), updates, "recording outcomes").await?;
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
}

/// A letter's outcome as one `update` statement, written as raw BSON: built as a `Document`
/// and converted, each statement cost ~10,000 instructions more under callgrind (an ordered
/// map hashed per field, then encoded; issue 23).
fn outcome_statement(owner: &str, record: &AttemptRecord, now_ms: i64) -> anyhow::Result<RawDocumentBuf> {
    let letter = &record.letter;
    let sizes = letter.delivered.iter().map(|a| a.len() + 16).sum::<usize>()
        + letter.rejected.iter().map(|r| r.address.len() + r.reply.len() + 40).sum::<usize>();
    let mut d = DocWriter::with_capacity(sizes + letter.last_reply.as_ref().map_or(0, String::len) + 384);
    d.document("q");
    d.object_id("_id", letter.id);
    d.str("owner", owner);
    d.str("status", Status::Processing.as_str());
    d.end();
    d.document("u");
    d.document("$set");
    if let Outcome::Released = record.outcome {
        d.str("status", Status::Awaiting.as_str());
        d.i64("due_ms", now_ms);
        d.i64("updated_ms", now_ms);
    } else {
        d.i64("updated_ms", now_ms);
        d.i32("attempts", letter.attempts);
        d.strings("delivered", letter.delivered.iter().map(String::as_str));
        rejections(&mut d, &letter.rejected, ("address", "reply"));
        if let Some(reply) = &letter.last_reply {
            d.str("last_reply", reply);
        }
        match &record.outcome {
            Outcome::Sent => d.str("status", Status::Sent.as_str()),
            Outcome::Failed { reason, .. } => {
                d.str("status", Status::Error.as_str());
                d.str("error", reason);
            }
            Outcome::Retry { reason, due_ms } => {
                d.str("status", Status::Awaiting.as_str());
                d.str("error", reason);
                // It keeps its place in the fair order (`vt`): due again, it goes before the letters
                // placed after it, instead of behind a whole campaign. Until then the claim passes
                // over it in the index (`due_ms` is in the key); failing letters are few.
                d.i64("due_ms", *due_ms);
            }
            Outcome::Released => {}
        }
    }
    if matches!(record.outcome, Outcome::Sent | Outcome::Failed { .. }) && !record.published {
        d.i32("unreported", 1);
    }
    d.end();
    d.document("$unset");
    for field in ["owner", "lease_ms", "claim"] {
        d.str(field, "");
    }
    if let Outcome::Sent = record.outcome {
        d.str("error", "");
    }
    d.end();
    d.end();
    d.bool("multi", false);
    d.bool("upsert", false);
    Ok(d.finish()?)
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

    /// The raw statements say what the `Document`s they replace said (compared as maps: the
    /// order of fields in `$set` means nothing to the server).
    #[test]
    fn an_outcome_statement_sets_what_its_outcome_says() {
        use crate::model::{FailureKind, Rejection};
        let mut letter = Letter::from_mailing(
            crate::model::Mailing {
                subject: "s".into(),
                body: "b".into(),
                addresses: vec!["a@x.org".into(), "b@x.org".into()],
                token: "t".into(),
                extra: Default::default(),
            },
            Some(b"k"),
            "t/0/1/0".into(),
            0,
        );
        letter.attempts = 2;
        letter.delivered = vec!["a@x.org".into()];
        letter.rejected = vec![Rejection { address: "b@x.org".into(), reply: "550 5.1.1 no".into() }];
        letter.last_reply = Some("250 ok".into());
        let id = letter.id;
        let filter = doc! { "_id": id, "owner": "me", "status": "processing" };
        let unset = doc! { "owner": "", "lease_ms": "", "claim": "" };
        let common = doc! {
            "updated_ms": 7_i64, "attempts": 2, "delivered": ["a@x.org"],
            "rejected": [{ "address": "b@x.org", "reply": "550 5.1.1 no" }], "last_reply": "250 ok",
        };
        let with = |extra: Document| {
            let mut set = common.clone();
            set.extend(extra);
            set
        };
        let cases = [
            (
                Outcome::Sent,
                true,
                with(doc! { "status": "sent" }),
                doc! { "owner": "", "lease_ms": "", "claim": "", "error": "" },
            ),
            (
                Outcome::Sent,
                false,
                with(doc! { "status": "sent", "unreported": 1 }),
                doc! { "owner": "", "lease_ms": "", "claim": "", "error": "" },
            ),
            (
                Outcome::Failed { kind: FailureKind::Permanent, reason: "550 no".into() },
                false,
                with(doc! { "status": "error", "error": "550 no", "unreported": 1 }),
                unset.clone(),
            ),
            (
                Outcome::Retry { reason: "451 later".into(), due_ms: 99 },
                false,
                with(doc! { "status": "awaiting", "error": "451 later", "due_ms": 99_i64 }),
                unset.clone(),
            ),
            (
                Outcome::Released,
                false,
                doc! { "status": "awaiting", "due_ms": 7_i64, "updated_ms": 7_i64 },
                unset.clone(),
            ),
        ];
        for (outcome, published, set, unset) in cases {
            let label = format!("{outcome:?}, published {published}");
            let record = AttemptRecord { letter: letter.clone(), outcome, published };
            let statement = outcome_statement("me", &record, 7).unwrap().to_document().unwrap();
            let expected =
                doc! { "q": filter.clone(), "u": { "$set": set, "$unset": unset }, "multi": false, "upsert": false };
            assert_eq!(statement, expected, "{label}");
        }
    }

    #[test]
    fn a_claim_takes_transactional_letters_first_and_keeps_bulk_its_share() {
        let lanes = LaneClaim { bulk_share: 0.1, bulk_before: None };
        let (urgent, bulk) = (
            |n: usize| (0..n).map(|i| format!("t{i}")).collect::<Vec<_>>(),
            |n: usize| (0..n).map(|i| format!("b{i}")).collect::<Vec<_>>(),
        );
        let taken = lanes.merge(20, urgent(30), bulk(30));
        assert_eq!(taken.iter().filter(|id| id.starts_with('b')).count(), 2, "{taken:?}");
        assert_eq!(taken[..18], urgent(18)[..], "transactional first");
        assert_eq!(lanes.merge(20, urgent(5), bulk(30)).len(), 20, "bulk borrows what transactional leaves");
        assert_eq!(lanes.merge(20, urgent(30), bulk(1)).len(), 20, "and the other way round");
        assert_eq!(lanes.merge(20, urgent(0), bulk(0)), Vec::<String>::new());
        assert_eq!(LaneClaim { bulk_share: 0.0, bulk_before: None }.merge(4, urgent(4), bulk(4)), urgent(4));
    }
}
