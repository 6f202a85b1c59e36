//! Letters whose `NotAfter` passed while they were waiting in MongoDB (issue 19).

use anyhow::Context;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc, oid::ObjectId};

use super::Store;
use crate::{
    lanes::EXPIRED,
    model::{Letter, Status},
};

impl Store {
    /// Ends up to `limit` `awaiting` letters whose `NotAfter` is at or before `now_ms` as
    /// `error`/`expired`, to be reported, and returns them (with bodies, for their status
    /// messages). Whatever their due time: a letter whose retry is due after its `NotAfter`, or
    /// that waits behind a rate limit, must not wait for a claim to be ended.
    ///
    /// One `find` on the `{status, not_after_ms}` index when nothing expired, which is the usual
    /// case; letters without `NotAfter` are not in its range.
    pub async fn expire_awaiting(&self, now_ms: i64, limit: usize) -> anyhow::Result<Vec<Letter>> {
        let expired = doc! { "status": Status::Awaiting.as_str(), "not_after_ms": { "$lte": now_ms } };
        self.count("find", 1);
        let found: Vec<Document> = self
            .letters
            .clone_with_type::<Document>()
            .find(expired)
            .limit(limit as i64)
            .batch_size(limit as u32)
            .projection(doc! { "_id": 1 })
            .await
            .context("finding expired letters")?
            .try_collect()
            .await
            .context("finding expired letters")?;
        let ids: Vec<ObjectId> = found.iter().filter_map(|d| d.get_object_id("_id").ok()).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Another replica may end the same letters at once: each reads back only those its own
        // token marked, so every status message is published once.
        let token = ObjectId::new().to_hex();
        self.count("update", 1);
        self.letters
            .update_many(
                doc! { "_id": { "$in": &ids }, "status": Status::Awaiting.as_str() },
                doc! { "$set": {
                    "status": Status::Error.as_str(), "error": EXPIRED, "updated_ms": now_ms,
                    "unreported": 1_i32, "claim": &token,
                } },
            )
            .await
            .context("expiring letters")?;
        self.count("find", 1);
        self.letters
            .find(doc! { "_id": { "$in": &ids }, "claim": &token })
            .batch_size(ids.len() as u32)
            .await
            .context("reading expired letters")?
            .try_collect()
            .await
            .context("reading expired letters")
    }
}
