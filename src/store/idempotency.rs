//! The `Idempotency-Key`s of `POST /post` (`<collection>_idempotency`): one document per key, its
//! `_id` the key, so MongoDB's unique `_id` index is the lock between replicas. What a key means
//! for a request is `crate::idempotency`.

use std::time::Duration;

use anyhow::Context;
use mongodb::{
    Collection, IndexModel,
    bson::{Bson, DateTime, Document, doc},
    options::IndexOptions,
};

use super::{Store, is_duplicate};
use crate::idempotency::Claim;

#[derive(Clone)]
pub struct IdempotencyKeys {
    store: Store,
    entries: Collection<Document>,
    window: Duration,
    /// A `pending` entry older than this belongs to a request that can no longer finish.
    stale_after: Duration,
}

impl IdempotencyKeys {
    /// `stale_after` must exceed the longest a request waits for Kafka.
    pub fn new(store: &Store, window: Duration, stale_after: Duration) -> IdempotencyKeys {
        IdempotencyKeys { store: store.clone(), entries: store.collection("idempotency"), window, stale_after }
    }

    /// The expiry index: MongoDB removes entries past their window (lookups ignore them anyway,
    /// as MongoDB's TTL monitor runs only once a minute and some wire-compatible servers not at all).
    pub async fn prepare(&self) -> anyhow::Result<()> {
        let index = IndexModel::builder()
            .keys(doc! { "expires_at": 1 })
            .options(IndexOptions::builder().expire_after(Duration::ZERO).build())
            .build();
        self.store.count("createIndexes", 1);
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
            self.store.count("insert", 1);
            match self.entries.insert_one(entry.clone()).await {
                Ok(_) => return Ok(Claim::Fresh),
                Err(error) if is_duplicate(&error) => {}
                Err(error) => return Err(error).context("recording the Idempotency-Key"),
            }
            self.store.count("find", 1);
            let Some(held) = self.entries.find_one(doc! { "_id": key }).await.context("reading the Idempotency-Key")?
            else {
                // Removed in between (its window passed, or its produce failed): take it now.
                continue;
            };
            let created_ms = int(held.get("created_ms"));
            if created_ms.saturating_add(window_ms) <= now_ms {
                // Only that very entry: another replica may have replaced it meanwhile.
                self.store.count("delete", 1);
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
        self.store.count("delete", 1);
        self.entries
            .delete_one(doc! { "_id": key, "batch_key": batch_key })
            .await
            .context("releasing the Idempotency-Key")?;
        Ok(())
    }

    async fn set_state(&self, key: &str, batch_key: &str, state: &str) -> anyhow::Result<()> {
        self.store.count("update", 1);
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
