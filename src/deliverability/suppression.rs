//! The suppression list: addresses not to send to again, one MongoDB document per address
//! (`<MONGODB_COLLECTION>_suppressions`), with why, who said so and when. Hard bounces,
//! the one-click endpoint and a Kafka topic add to it; the dispatcher looks a claimed batch's
//! recipients up in a few queries (one per [`LOOKUP_CHUNK_BYTES`] of addresses), so checking costs
//! no round trip per letter.
//!
//! Every entry is keyed by [`Recipient::key`], the one canonical form of an address: the local
//! part lower-cased, the domain in IDNA ASCII (punycode) lower-cased, so `ivan@пример.рф` and
//! `ivan@xn--e1afmkfd.xn--p1ai` are one entry whoever wrote it. Versions before keyed entries by
//! the address as given, lower-cased, which differs only for an internationalised domain; such
//! entries are matched by looking up that form too ([`legacy_key`]) rather than migrated at
//! start-up: replicas of the old version still write it during a rolling upgrade, and the extra
//! keys ride in the same query.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use mongodb::{
    Collection, Database,
    bson::{DateTime, Document, doc},
    options::ReturnDocument,
};

use crate::{
    address::Recipient,
    model::{Letter, Rejection, SUPPRESSED_PREFIX, now_ms},
};

pub const HARD_BOUNCE: &str = "hard_bounce";
pub const UNSUBSCRIBE: &str = "unsubscribe";

#[derive(Clone)]
pub struct Suppressions {
    entries: Collection<Document>,
    /// Per address, the letters whose SMTP refusal said the mailbox does not exist: counted per
    /// letter, so a letter's retries do not count its one refusal again.
    bounces: Collection<Document>,
    /// Refusals of distinct letters after which an address is suppressed.
    hard_bounce_threshold: u32,
}

impl Suppressions {
    pub fn new(db: &Database, collection: &str, hard_bounce_threshold: u32) -> Suppressions {
        Suppressions {
            entries: db.collection(&format!("{collection}_suppressions")),
            bounces: db.collection(&format!("{collection}_bounces")),
            hard_bounce_threshold: hard_bounce_threshold.max(1),
        }
    }

    /// Adds (or refreshes) an entry.
    pub async fn add(&self, address: &Recipient, reason: &str, source: &str) -> anyhow::Result<()> {
        let key = address.key();
        let entry = doc! {
            "_id": &key, "address": address.as_str(), "reason": reason, "source": source,
            "time": DateTime::from_millis(now_ms()), "time_ms": now_ms(),
        };
        self.entries
            .replace_one(doc! { "_id": &key }, entry)
            .upsert(true)
            .await
            .with_context(|| format!("adding {key} to the suppression list"))?;
        tracing::info!(address = %key, reason, source, "address suppressed");
        Ok(())
    }

    /// Removes an entry (and its bounce count), in either key form; says whether there was one.
    pub async fn remove(&self, address: &Recipient) -> anyhow::Result<bool> {
        let key = address.key();
        let keys: Vec<String> = std::iter::once(key.clone()).chain(legacy_key(address)).collect();
        let removed = self
            .entries
            .delete_many(doc! { "_id": { "$in": keys.clone() } })
            .await
            .context("removing a suppression")?;
        self.bounces.delete_many(doc! { "_id": { "$in": keys } }).await.context("removing a bounce count")?;
        tracing::info!(address = %key, removed = removed.deleted_count, "address unsuppressed");
        Ok(removed.deleted_count > 0)
    }

    /// The reasons of those of `keys` (lower-cased addresses) that are suppressed: one query
    /// per [`LOOKUP_CHUNK_BYTES`] of keys, because one `$in` of a large claim's recipients (two
    /// hundred thousand long addresses) passes MongoDB's 16 MiB limit on a command and would
    /// fail every time.
    pub async fn lookup(&self, keys: Vec<String>) -> anyhow::Result<HashMap<String, String>> {
        let mut found = HashMap::new();
        for chunk in lookup_chunks(keys) {
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

    /// Marks the suppressed recipients of a claimed batch as refused ("suppressed: <reason>"),
    /// so the worker skips them and the status message lists them. A failed lookup is an error:
    /// the caller must not send the letters, as they may go to people who unsubscribed.
    pub async fn apply(&self, letters: &mut [Letter]) -> anyhow::Result<()> {
        let pending: Vec<Vec<Recipient>> = letters.iter().map(Letter::pending_recipients).collect();
        let keys: HashSet<String> =
            pending.iter().flatten().flat_map(|r| std::iter::once(r.key()).chain(legacy_key(r))).collect();
        let suppressed = self.lookup(keys.into_iter().collect()).await?;
        if suppressed.is_empty() {
            return Ok(());
        }
        for (letter, recipients) in letters.iter_mut().zip(pending) {
            for recipient in recipients {
                let legacy = legacy_key(&recipient).and_then(|key| suppressed.get(&key));
                if let Some(reason) = suppressed.get(&recipient.key()).or(legacy) {
                    tracing::info!(letter_id = %letter.id, address = %recipient, reason = %reason, "suppressed recipient skipped");
                    letter.rejected.push(Rejection {
                        address: recipient.to_string(),
                        reply: format!("{SUPPRESSED_PREFIX}{reason}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Counts the refusals in `letters` that say the mailbox does not exist, and suppresses
    /// addresses that reached the threshold. Runs in its own task: the report stage does not
    /// wait for it.
    pub fn note_hard_bounces<'a>(&self, letters: impl IntoIterator<Item = &'a Letter>) {
        let bounced: Vec<(Recipient, String)> = letters
            .into_iter()
            .flat_map(|letter| {
                letter
                    .rejected
                    .iter()
                    .filter(|r| is_unknown_mailbox(&r.reply))
                    // Rejections name recipients that were parsed at ingest, so this holds.
                    .filter_map(|r| Recipient::parse(&r.address).ok())
                    .map(|address| (address, letter.id.to_hex()))
            })
            .collect();
        if bounced.is_empty() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            for (address, letter_id) in bounced {
                if let Err(error) = this.hard_bounce(&address, &letter_id).await {
                    tracing::warn!(error = format!("{error:#}"), address = %address.key(), "recording a hard bounce failed");
                }
            }
        });
    }

    async fn hard_bounce(&self, address: &Recipient, letter_id: &str) -> anyhow::Result<()> {
        if self.hard_bounce_threshold > 1 {
            let counted = self
                .bounces
                .find_one_and_update(doc! { "_id": address.key() }, doc! { "$addToSet": { "letters": letter_id } })
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await
                .context("counting a hard bounce")?;
            let count = counted.as_ref().and_then(|d| d.get_array("letters").ok()).map_or(0, Vec::len);
            if count < self.hard_bounce_threshold as usize {
                return Ok(());
            }
        }
        self.add(address, HARD_BOUNCE, "smtp").await
    }
}

/// The key versions before the canonical one gave an address (as given, lower-cased), when it
/// differs: only for an internationalised domain.
pub fn legacy_key(address: &Recipient) -> Option<String> {
    let legacy = address.as_str().to_lowercase();
    (legacy != address.key()).then_some(legacy)
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

/// A permanent refusal whose enhanced status says the mailbox does not exist (5.1.x), as a
/// stored reply reads: `550 5.1.1 text`. Policy refusals (5.7.x) and others are not.
pub fn is_unknown_mailbox(reply: &str) -> bool {
    let mut words = reply.split_whitespace();
    let code = words.next().unwrap_or_default();
    let enhanced = words.next().unwrap_or_default();
    code.len() == 3 && code.starts_with('5') && code.bytes().all(|b| b.is_ascii_digit()) && enhanced.starts_with("5.1.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mailbox_refusals_count_as_hard_bounces() {
        assert!(is_unknown_mailbox("550 5.1.1 no such user"));
        assert!(is_unknown_mailbox("553 5.1.3 bad address syntax"));
        assert!(!is_unknown_mailbox("550 5.7.1 rejected by policy"));
        assert!(!is_unknown_mailbox("450 4.1.1 try later"));
        assert!(!is_unknown_mailbox("550 mailbox unavailable"));
        assert!(!is_unknown_mailbox("suppressed: hard_bounce"));
    }

    #[test]
    fn one_key_per_address_and_the_old_key_only_where_it_differs() {
        let utf8 = Recipient::parse("Ivan@Пример.РФ").unwrap();
        let ascii = Recipient::parse("ivan@XN--E1AFMKFD.xn--p1ai").unwrap();
        assert_eq!(utf8.key(), "ivan@xn--e1afmkfd.xn--p1ai");
        assert_eq!(ascii.key(), utf8.key());
        assert_eq!(legacy_key(&utf8).as_deref(), Some("ivan@пример.рф"));
        assert_eq!(legacy_key(&ascii), None);
        assert_eq!(legacy_key(&Recipient::parse("Ann@Example.ORG").unwrap()), None);
    }

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
