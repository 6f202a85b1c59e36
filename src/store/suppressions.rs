//! The suppression list (`<collection>_suppressions`, one document per address key) and the
//! hard-bounce counts (`<collection>_bounces`, per address the letters refused). What a
//! suppression means for a letter is `crate::deliverability::suppression`.

use std::collections::HashMap;

use anyhow::Context as _;
use mongodb::{
    Collection,
    bson::{DateTime, Document, RawDocumentBuf, doc},
    options::ReturnDocument,
};

use super::Store;

/// The suppression and bounce collections.
#[derive(Clone)]
pub struct SuppressionStore {
    store: Store,
    entries: Collection<Document>,
    /// Per address, the letters whose SMTP refusal said the mailbox does not exist: counted per
    /// letter, so a letter's retries do not count its one refusal again.
    bounces: Collection<Document>,
}

impl SuppressionStore {
    pub(super) fn new(store: &Store) -> SuppressionStore {
        SuppressionStore {
            store: store.clone(),
            entries: store.collection("suppressions"),
            bounces: store.collection("bounces"),
        }
    }

    /// Adds (or refreshes) the entry of `key`.
    pub async fn add(&self, key: &str, address: &str, reason: &str, source: &str) -> anyhow::Result<()> {
        let now_ms = self.store.now_ms();
        let entry = doc! {
            "_id": key, "address": address, "reason": reason, "source": source,
            "time": DateTime::from_millis(now_ms), "time_ms": now_ms,
        };
        self.store.count("update", 1);
        self.entries
            .replace_one(doc! { "_id": key }, entry)
            .upsert(true)
            .await
            .with_context(|| format!("adding {key} to the suppression list"))?;
        Ok(())
    }

    /// Adds (or refreshes) several entries in one multi-statement update: `(key, address,
    /// reason, source)` each.
    pub async fn add_many(&self, entries: &[(String, &str, &str, &str)]) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let now_ms = self.store.now_ms();
        let updates = entries
            .iter()
            .map(|(key, address, reason, source)| {
                let (key, address, reason, source) = (key.as_str(), *address, *reason, *source);
                let entry = doc! {
                    "_id": key, "address": address, "reason": reason, "source": source,
                    "time": DateTime::from_millis(now_ms), "time_ms": now_ms,
                };
                RawDocumentBuf::from_document(&doc! { "q": { "_id": key }, "u": entry, "upsert": true })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.store.update_statements(self.entries.name(), updates, "adding to the suppression list").await?;
        Ok(())
    }

    /// Removes the entries of `keys` and their bounce counts; returns how many entries there were.
    pub async fn remove(&self, keys: Vec<String>) -> anyhow::Result<u64> {
        self.store.count("delete", 2);
        let removed = self
            .entries
            .delete_many(doc! { "_id": { "$in": keys.clone() } })
            .await
            .context("removing a suppression")?;
        self.bounces.delete_many(doc! { "_id": { "$in": keys } }).await.context("removing a bounce count")?;
        Ok(removed.deleted_count)
    }

    /// The reasons of those of `keys` that are suppressed: one query per [`LOOKUP_CHUNK_BYTES`]
    /// of keys, because one `$in` of a large claim's recipients (two hundred thousand long
    /// addresses) passes MongoDB's 16 MiB limit on a command and would fail every time.
    pub async fn lookup(&self, keys: Vec<String>) -> anyhow::Result<HashMap<String, String>> {
        let mut found = HashMap::new();
        for chunk in lookup_chunks(keys) {
            self.store.count("find", 1);
            let mut cursor = self
                .entries
                .find(doc! { "_id": { "$in": chunk } })
                .projection(doc! { "reason": 1 })
                .await
                .context("looking up suppressions")?;
            while cursor.advance().await.context("reading suppressions")? {
                let entry = cursor.deserialize_current().context("reading a suppression")?;
                if let Ok(key) = entry.get_str("_id") {
                    found.insert(key.to_owned(), entry.get_str("reason").unwrap_or("suppressed").to_owned());
                }
            }
        }
        Ok(found)
    }

    /// Counts letter `letter_id`'s refusal of `key` (once per letter); returns how many letters
    /// the address refused so far.
    pub async fn count_bounce(&self, key: &str, letter_id: &str) -> anyhow::Result<usize> {
        self.store.count("findAndModify", 1);
        let counted = self
            .bounces
            .find_one_and_update(doc! { "_id": key }, doc! { "$addToSet": { "letters": letter_id } })
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
            .context("counting a hard bounce")?;
        Ok(counted.as_ref().and_then(|d| d.get_array("letters").ok()).map_or(0, Vec::len))
    }
}

/// Most bytes of keys in one lookup's `$in`, with each element's BSON overhead: a quarter of
/// MongoDB's 16 MiB limit on a command, so the query stays far from it whatever the addresses.
pub const LOOKUP_CHUNK_BYTES: usize = 4 << 20;

/// Splits `keys` into lists of at most [`LOOKUP_CHUNK_BYTES`] as a BSON array (each element
/// costs its type byte, index, length and terminator: 16 bytes covers them).
fn lookup_chunks(keys: Vec<String>) -> Vec<Vec<String>> {
    let mut chunks: Vec<Vec<String>> = Vec::new();
    let mut bytes = 0;
    for key in keys {
        let size = key.len() + 16;
        match chunks.last_mut() {
            Some(chunk) if bytes + size <= LOOKUP_CHUNK_BYTES => chunk.push(key),
            _ => {
                bytes = 0;
                chunks.push(vec![key]);
            }
        }
        bytes += size;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_lookup_is_split_below_the_command_limit() {
        assert!(lookup_chunks(Vec::new()).is_empty());
        let keys: Vec<String> = (0..200_000).map(|i| format!("user{i:06}@{}.example.org", "d".repeat(60))).collect();
        let chunks = lookup_chunks(keys.clone());
        assert!(chunks.len() > 1);
        for chunk in &chunks {
            let array: Vec<mongodb::bson::Bson> = chunk.iter().map(|k| k.as_str().into()).collect();
            let size = mongodb::bson::to_vec(&doc! { "_id": { "$in": array } }).unwrap().len();
            assert!(size <= LOOKUP_CHUNK_BYTES, "a chunk of {size} bytes");
        }
        assert_eq!(chunks.concat(), keys, "every key, once, in order");
    }
}
