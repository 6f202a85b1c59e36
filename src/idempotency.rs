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

pub use crate::store::IdempotencyKeys;

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
}
