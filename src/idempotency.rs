//! `Idempotency-Key` for `POST /post`: a client that did not learn whether its batch was taken
//! (a `503`, a timeout, a dropped connection) sends it again with the same key, and a repeat
//! within the window produces nothing new and is answered with the first request's batch key.
//!
//! Kept in MongoDB, so a repeat that a load balancer sends to another replica finds it: one
//! document per key in `<collection>_idempotency`, its `_id` the key (MongoDB's unique `_id`
//! index is the lock between replicas). The entry is written *before* the batch is produced: two
//! requests with one key cannot both produce, and a crash between the two leaves a `pending`
//! entry, whose outcome is unknown, rather than a produced batch nobody can find. A produce that
//! failed for certain removes the entry, so the client's retry goes through.

use std::time::Duration;

use anyhow::Context;
use mongodb::{
    Collection, Database, IndexModel,
    bson::{Bson, DateTime, Document, doc},
    options::IndexOptions,
};

/// The longest key taken; the draft standard leaves the length open, Stripe takes 255.
pub const MAX_KEY_LEN: usize = 255;

/// What a request with an `Idempotency-Key` should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request holds the key: produce the batch under `batch_key`, then record the outcome.
    Fresh,
    /// An earlier request with this key was accepted: answer as it was answered.
    Accepted { batch_key: String, mailings: i64 },
    /// An earlier request with this key is still waiting for Kafka.
    InProgress,
    /// An earlier request's batch may or may not have been produced (the broker timed out with
    /// the request in flight, or the replica stopped before it learned the outcome).
    Unknown { batch_key: String },
    /// The key came with another body first.
    Mismatch,
}

#[derive(Clone)]
pub struct IdempotencyKeys {
    entries: Collection<Document>,
    window: Duration,
    /// A `pending` entry older than this belongs to a request that can no longer finish.
    stale_after: Duration,
}

impl IdempotencyKeys {
    /// `stale_after` must exceed the longest a request waits for Kafka.
    pub fn new(db: &Database, letters_collection: &str, window: Duration, stale_after: Duration) -> IdempotencyKeys {
        IdempotencyKeys { entries: db.collection(&format!("{letters_collection}_idempotency")), window, stale_after }
    }

    /// The expiry index: MongoDB removes entries past their window (lookups ignore them anyway,
    /// as MongoDB's TTL monitor runs only once a minute and some wire-compatible servers not at all).
    pub async fn prepare(&self) -> anyhow::Result<()> {
        let index = IndexModel::builder()
            .keys(doc! { "expires_at": 1 })
            .options(IndexOptions::builder().expire_after(Duration::ZERO).build())
            .build();
        self.entries.create_index(index).await.context("creating the idempotency keys' expiry index")?;
        Ok(())
    }

    /// Takes `key` for a request whose body hashes to `body_sha256`, or says who holds it.
    pub async fn claim(
        &self,
        key: &str,
        batch_key: &str,
        body_sha256: &str,
        mailings: i64,
        now_ms: i64,
    ) -> anyhow::Result<Claim> {
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        let entry = doc! {
            "_id": key,
            "batch_key": batch_key,
            "body_sha256": body_sha256,
            "mailings": mailings,
            "state": "pending",
            "created_ms": now_ms,
            "expires_at": DateTime::from_millis(now_ms.saturating_add(window_ms)),
        };
        // Twice at most: once more after removing an entry whose window has passed.
        for _ in 0..2 {
            match self.entries.insert_one(entry.clone()).await {
                Ok(_) => return Ok(Claim::Fresh),
                Err(error) if crate::store::is_duplicate(&error) => {}
                Err(error) => return Err(error).context("recording the Idempotency-Key"),
            }
            let Some(held) = self.entries.find_one(doc! { "_id": key }).await.context("reading the Idempotency-Key")?
            else {
                // Removed in between (its window passed, or its produce failed): take it now.
                continue;
            };
            let created_ms = int(held.get("created_ms"));
            if created_ms.saturating_add(window_ms) <= now_ms {
                // Only that very entry: another replica may have replaced it meanwhile.
                self.entries
                    .delete_one(
                        doc! { "_id": key, "created_ms": held.get("created_ms").cloned().unwrap_or(Bson::Null) },
                    )
                    .await
                    .context("removing an expired Idempotency-Key")?;
                continue;
            }
            return Ok(judge(&held, body_sha256, now_ms, self.stale_after));
        }
        Ok(Claim::InProgress)
    }

    /// The batch was produced: repeats are answered with its key.
    pub async fn accepted(&self, key: &str, batch_key: &str) -> anyhow::Result<()> {
        self.set_state(key, batch_key, "accepted").await
    }

    /// The batch may have been produced: repeats must not produce it again.
    pub async fn unknown(&self, key: &str, batch_key: &str) -> anyhow::Result<()> {
        self.set_state(key, batch_key, "unknown").await
    }

    /// The batch will not be produced: the key is free for the client's retry.
    pub async fn release(&self, key: &str, batch_key: &str) -> anyhow::Result<()> {
        self.entries
            .delete_one(doc! { "_id": key, "batch_key": batch_key })
            .await
            .context("releasing the Idempotency-Key")?;
        Ok(())
    }

    async fn set_state(&self, key: &str, batch_key: &str, state: &str) -> anyhow::Result<()> {
        self.entries
            .update_one(doc! { "_id": key, "batch_key": batch_key }, doc! { "$set": { "state": state } })
            .await
            .with_context(|| format!("recording the Idempotency-Key as {state}"))?;
        Ok(())
    }
}

/// What an entry another request holds means for this one.
fn judge(held: &Document, body_sha256: &str, now_ms: i64, stale_after: Duration) -> Claim {
    if held.get_str("body_sha256").ok() != Some(body_sha256) {
        return Claim::Mismatch;
    }
    let batch_key = held.get_str("batch_key").unwrap_or_default().to_owned();
    match held.get_str("state").unwrap_or_default() {
        "accepted" => Claim::Accepted { batch_key, mailings: int(held.get("mailings")) },
        "pending" => {
            let stale_ms = i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX);
            if int(held.get("created_ms")).saturating_add(stale_ms) <= now_ms {
                Claim::Unknown { batch_key }
            } else {
                Claim::InProgress
            }
        }
        _ => Claim::Unknown { batch_key },
    }
}

/// The `Idempotency-Key` header's value: an sf-string in the IETF draft (`"…"`), a bare token for
/// Stripe and most clients; both are taken. Printable ASCII, 1 to [`MAX_KEY_LEN`] characters.
pub fn parse_key(raw: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "Idempotency-Key is not ASCII".to_owned())?.trim();
    let key = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(text);
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} printable ASCII characters"));
    }
    Ok(key.to_owned())
}

/// The Mongo-wire server we test on returns Int64 values as Int32.
fn int(value: Option<&Bson>) -> i64 {
    match value {
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Double(n)) => *n as i64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_taken_quoted_or_bare_and_bounded() {
        assert_eq!(parse_key(b"abc-123").unwrap(), "abc-123");
        assert_eq!(parse_key(br#""8e03978e-40d5""#).unwrap(), "8e03978e-40d5");
        assert!(parse_key(b"").is_err());
        assert!(parse_key(b"\"\"").is_err());
        assert!(parse_key(b"tab\there").is_err());
        assert!(parse_key("ключ".as_bytes()).is_err());
        assert!(parse_key("k".repeat(MAX_KEY_LEN).as_bytes()).is_ok());
        assert!(parse_key("k".repeat(MAX_KEY_LEN + 1).as_bytes()).is_err());
    }

    #[test]
    fn a_held_key_is_judged_by_body_state_and_age() {
        let stale = Duration::from_secs(60);
        let held = |state: &str| doc! { "batch_key": "b", "body_sha256": "h", "mailings": 2, "state": state, "created_ms": 1_000 };
        assert_eq!(judge(&held("accepted"), "other", 2_000, stale), Claim::Mismatch);
        assert_eq!(judge(&held("accepted"), "h", 2_000, stale), Claim::Accepted { batch_key: "b".into(), mailings: 2 });
        assert_eq!(judge(&held("pending"), "h", 2_000, stale), Claim::InProgress);
        assert_eq!(judge(&held("pending"), "h", 61_000, stale), Claim::Unknown { batch_key: "b".into() });
        assert_eq!(judge(&held("unknown"), "h", 2_000, stale), Claim::Unknown { batch_key: "b".into() });
    }
}
