//! The suppression list: addresses not to send to again, one MongoDB document per address
//! (`<MONGODB_COLLECTION>_suppressions`), with why, who said so and when. Hard bounces,
//! the one-click endpoint and a Kafka topic add to it; the dispatcher looks a claimed batch's
//! recipients up in a few queries (one per 4 MiB of addresses, `crate::store::SuppressionStore`), so
//! checking costs no round trip per letter.
//!
//! Every entry is keyed by [`Recipient::key`], the one canonical form of an address: the local
//! part lower-cased, the domain in IDNA ASCII (punycode) lower-cased, so `ivan@пример.рф` and
//! `ivan@xn--e1afmkfd.xn--p1ai` are one entry whoever wrote it. Versions before keyed entries by
//! the address as given, lower-cased, which differs only for an internationalised domain; such
//! entries are matched by looking up that form too ([`legacy_key`]) rather than migrated at
//! start-up: replicas of the old version still write it during a rolling upgrade, and the extra
//! keys ride in the same query.

use std::collections::HashSet;

use crate::{
    address::Recipient,
    model::{Letter, Rejection, SUPPRESSED_PREFIX},
    store::{Store, SuppressionStore},
};

pub const HARD_BOUNCE: &str = "hard_bounce";
pub const UNSUBSCRIBE: &str = "unsubscribe";

#[derive(Clone)]
pub struct Suppressions {
    store: SuppressionStore,
    /// Refusals of distinct letters after which an address is suppressed.
    hard_bounce_threshold: u32,
}

impl Suppressions {
    pub fn new(store: &Store, hard_bounce_threshold: u32) -> Suppressions {
        Suppressions { store: store.suppressions(), hard_bounce_threshold: hard_bounce_threshold.max(1) }
    }

    /// Adds (or refreshes) an entry.
    pub async fn add(&self, address: &Recipient, reason: &str, source: &str) -> anyhow::Result<()> {
        let key = address.key();
        self.store.add(&key, address.as_str(), reason, source).await?;
        tracing::info!(address = %key, reason, source, "address suppressed");
        Ok(())
    }

    /// Adds (or refreshes) several entries in one round trip: `(address, reason, source)` each.
    pub async fn add_many(&self, entries: &[(Recipient, &str, &str)]) -> anyhow::Result<()> {
        let keyed: Vec<(String, &str, &str, &str)> = entries
            .iter()
            .map(|(address, reason, source)| (address.key(), address.as_str(), *reason, *source))
            .collect();
        self.store.add_many(&keyed).await?;
        for (key, _, reason, source) in &keyed {
            tracing::info!(address = %key, reason, source, "address suppressed");
        }
        Ok(())
    }

    /// Removes an entry (and its bounce count), in either key form; says whether there was one.
    pub async fn remove(&self, address: &Recipient) -> anyhow::Result<bool> {
        let key = address.key();
        let keys: Vec<String> = std::iter::once(key.clone()).chain(legacy_key(address)).collect();
        let removed = self.store.remove(keys).await?;
        tracing::info!(address = %key, removed, "address unsuppressed");
        Ok(removed > 0)
    }

    /// Marks the suppressed recipients of a claimed batch as refused ("suppressed: <reason>"),
    /// so the worker skips them and the status message lists them. A failed lookup is an error:
    /// the caller must not send the letters, as they may go to people who unsubscribed.
    pub async fn apply(&self, letters: &mut [Letter]) -> anyhow::Result<()> {
        let pending: Vec<Vec<Recipient>> = letters.iter().map(Letter::pending_recipients).collect();
        let keys: HashSet<String> =
            pending.iter().flatten().flat_map(|r| std::iter::once(r.key()).chain(legacy_key(r))).collect();
        let suppressed = self.store.lookup(keys.into_iter().collect()).await?;
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
            let count = self.store.count_bounce(&address.key(), letter_id).await?;
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
}
