//! Named leases for work only one replica should do at a time (retention).

use anyhow::Context;
use mongodb::bson::doc;

use super::{Store, is_duplicate};

impl Store {
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
}
