//! The operator queries on batches and letters: progress, lookup, cancel, retry.

use anyhow::Context;
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc, oid::ObjectId};

use super::Store;
use crate::model::{Letter, Status};

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
        // An expired letter stays expired: its `NotAfter` is behind it for good.
        filter.insert("error", doc! { "$ne": crate::lanes::EXPIRED });
        let retried = |due_ms: i64| {
            doc! {
                "$set": {
                    "status": Status::Awaiting.as_str(), "attempts": 0_i32, "due_ms": due_ms,
                    "updated_ms": now_ms, "rejected": Vec::<Document>::new(),
                },
                "$unset": { "error": "", "unreported": "", "cancel": "", "owner": "", "lease_ms": "", "claim": "" },
            }
        };
        // Letters whose `SendAt` is still ahead (cancelled before it) stay held until then: each
        // is due at its own time, so these go first, one by one (rare, and an operator's action),
        // before the rest are made due now and no claim can take one early.
        let mut ahead = filter.clone();
        ahead.insert("send_at_ms", doc! { "$gt": now_ms });
        self.count("find", 1);
        let held: Vec<Document> = self
            .letters
            .clone_with_type::<Document>()
            .find(ahead)
            .projection(doc! { "_id": 1, "send_at_ms": 1 })
            .await
            .context("finding retried letters held for SendAt")?
            .try_collect()
            .await
            .context("finding retried letters held for SendAt")?;
        let mut modified = 0;
        for letter in held {
            let (Ok(id), Ok(send_at)) = (letter.get_object_id("_id"), letter.get_i64("send_at_ms")) else { continue };
            let mut one = filter.clone();
            one.insert("_id", id);
            self.count("update", 1);
            modified +=
                self.letters.update_one(one, retried(send_at)).await.context("retrying a batch")?.modified_count;
        }
        self.count("update", 1);
        let result = self.letters.update_many(filter, retried(now_ms)).await.context("retrying a batch")?;
        Ok(modified + result.modified_count)
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
