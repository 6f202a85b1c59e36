//! Deleting finished letters past `LETTER_RETENTION` (the chore is `crate::retention`).

use anyhow::Context;
use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};

use super::Store;

impl Store {
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
}
