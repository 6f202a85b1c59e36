//! A mailing's optional timing and metadata (issue 19): `SendAt`, `NotAfter` and `Metadata`.
//!
//! The fields are read as loose JSON values and checked per mailing, not by serde's typing of
//! the batch, so a wrong type fails only its own letter (with a reason naming the field) instead
//! of sending the whole Kafka message to the dead-letter topic.

use crate::model::json_kind;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{AttemptRecord, Outcome};

/// Most keys a mailing's `Metadata` may have.
pub const METADATA_MAX_KEYS: usize = 16;
/// Most bytes of a mailing's `Metadata`, keys and values together.
pub const METADATA_MAX_BYTES: usize = 1024;

/// The reason stored on a letter whose `NotAfter` passed before it was sent.
pub const EXPIRED: &str = "expired";

/// The optional fields of a mailing, as the producer sent them.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct MailingExtra {
    /// RFC 3339: the letter is not sent before this time.
    #[serde(rename = "SendAt", alias = "sendAt", alias = "sendat", default, skip_serializing_if = "Option::is_none")]
    pub send_at: Option<Value>,
    /// RFC 3339: a letter not sent by this time ends `error`/`expired`.
    #[serde(
        rename = "NotAfter",
        alias = "notAfter",
        alias = "notafter",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub not_after: Option<Value>,
    /// The producer's own strings, echoed in every status message and feedback event.
    #[serde(rename = "Metadata", alias = "metadata", default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,

    /// Files and inline images, checked by `crate::attachments::check` (not by [`Self::check`],
    /// which has no limits to check them against).
    #[serde(rename = "Attachments", alias = "attachments", default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<Value>,
    /// `transactional` or `bulk` (the default): see `crate::priority`.
    #[serde(rename = "Lane", alias = "lane", default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<Value>,
    /// The team or product whose letters share one fair share of their lane.
    #[serde(rename = "Tenant", alias = "tenant", default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<Value>,
    /// The share of its tenant (or batch) relative to others in its lane, 1 by default.
    #[serde(rename = "Weight", alias = "weight", default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<Value>,
}

/// [`MailingExtra`] checked: times in Unix milliseconds, metadata as strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timing {
    pub send_at_ms: Option<i64>,
    pub not_after_ms: Option<i64>,
    pub metadata: BTreeMap<String, String>,
}

impl MailingExtra {
    /// Checks the fields; the error names the field and what was expected.
    pub fn check(&self) -> Result<Timing, String> {
        let send_at_ms = time_field("SendAt", self.send_at.as_ref())?;
        let not_after_ms = time_field("NotAfter", self.not_after.as_ref())?;
        if let (Some(send_at), Some(not_after)) = (send_at_ms, not_after_ms)
            && not_after <= send_at
        {
            return Err("NotAfter must be later than SendAt".to_owned());
        }
        let metadata = metadata_field(self.metadata.as_ref())?;
        self.priority()?;
        Ok(Timing { send_at_ms, not_after_ms, metadata })
    }

    /// `Lane`, `Tenant` and `Weight`, checked.
    pub fn priority(&self) -> Result<crate::priority::Priority, String> {
        crate::priority::check(self.lane.as_ref(), self.tenant.as_ref(), self.weight.as_ref())
    }

    /// The fields again from a stored letter's values, for a dead letter's copy of its mailing.
    pub fn from_stored(
        send_at_ms: Option<i64>,
        not_after_ms: Option<i64>,
        metadata: &BTreeMap<String, String>,
    ) -> Self {
        let time = |ms: Option<i64>| {
            ms.and_then(|ms| mongodb::bson::DateTime::from_millis(ms).try_to_rfc3339_string().ok()).map(Value::String)
        };
        MailingExtra {
            send_at: time(send_at_ms),
            not_after: time(not_after_ms),
            metadata: (!metadata.is_empty())
                .then(|| Value::Object(metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())),
            ..Default::default()
        }
    }
}

/// A time field: absent or `null`, or an RFC 3339 string with its offset (`2026-12-01T09:00:00+01:00`).
fn time_field(name: &str, value: Option<&Value>) -> Result<Option<i64>, String> {
    let text = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(text)) => text,
        Some(other) => return Err(format!("{name} must be an RFC 3339 time string, not {}", json_kind(other))),
    };
    mongodb::bson::DateTime::parse_rfc3339_str(text)
        .map(|time| Some(time.timestamp_millis()))
        .map_err(|_| format!("{name} is not an RFC 3339 time (like 2026-12-01T09:00:00+01:00): {text:?}"))
}

fn metadata_field(value: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    let map = match value {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(map)) => map,
        Some(other) => return Err(format!("Metadata must be an object of strings, not {}", json_kind(other))),
    };
    if map.len() > METADATA_MAX_KEYS {
        return Err(format!("Metadata has {} keys, over the limit of {METADATA_MAX_KEYS}", map.len()));
    }
    let mut metadata = BTreeMap::new();
    let mut bytes = 0;
    for (key, value) in map {
        let Value::String(text) = value else {
            return Err(format!("Metadata value of {key:?} must be a string, not {}", json_kind(value)));
        };
        bytes += key.len() + text.len();
        metadata.insert(key.clone(), text.clone());
    }
    if bytes > METADATA_MAX_BYTES {
        return Err(format!("Metadata is {bytes} bytes (keys and values), over the limit of {METADATA_MAX_BYTES}"));
    }
    Ok(metadata)
}

/// Whether a letter with this `NotAfter` may no longer be sent at `now_ms`.
pub fn expired(not_after_ms: Option<i64>, now_ms: i64) -> bool {
    not_after_ms.is_some_and(|not_after| now_ms >= not_after)
}

/// Resolves when the server's clock reaches `not_after_ms`; never without one.
pub async fn until_expiry(clock: &crate::clock::Clock, not_after_ms: Option<i64>) {
    match not_after_ms {
        Some(ms) => {
            let at = clock.reading().instant(ms.saturating_mul(1_000_000));
            tokio::time::sleep_until(at).await
        }
        None => std::future::pending().await,
    }
}

/// An attempt that would be retried ends `expired` instead when its `NotAfter` has passed (the
/// message withdrawn before its dot) or passes before the retry would be due: waiting for a
/// retry that may not be sent would only delay the producer's news. The attempt's own failure
/// is logged.
pub fn end_if_expired(mut record: AttemptRecord, now_ms: i64) -> AttemptRecord {
    let not_after = record.letter.not_after_ms;
    if let Outcome::Retry { reason, due_ms } = &record.outcome
        && (expired(not_after, now_ms) || expired(not_after, *due_ms))
    {
        tracing::info!(letter_id = %record.letter.id, last_failure = %reason, "NotAfter passes before the next attempt; letter expired");
        record.outcome = Outcome::Failed { kind: crate::model::FailureKind::Expired, reason: EXPIRED.to_owned() };
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extra(json: Value) -> MailingExtra {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn absent_fields_are_today_s_mailing() {
        assert_eq!(extra(serde_json::json!({})).check(), Ok(Timing::default()));
        let nulls = extra(serde_json::json!({ "SendAt": null, "NotAfter": null, "Metadata": null }));
        assert_eq!(nulls.check(), Ok(Timing::default()));
    }

    #[test]
    fn times_are_rfc3339_with_their_offset() {
        let timing = extra(serde_json::json!({
            "SendAt": "2026-12-01T09:00:00+01:00", "notAfter": "2026-12-01T08:10:00.5Z",
        }))
        .check()
        .unwrap();
        assert_eq!(timing.send_at_ms, Some(1_796_112_000_000));
        assert_eq!(timing.not_after_ms, Some(1_796_112_000_000 + 600_500));
    }

    #[test]
    fn bad_values_name_the_field() {
        for (json, expected) in [
            (serde_json::json!({ "SendAt": 1796112000 }), "SendAt must be an RFC 3339 time string, not a number"),
            (serde_json::json!({ "SendAt": "tomorrow" }), "SendAt is not an RFC 3339 time"),
            (serde_json::json!({ "NotAfter": "2026-12-01 09:00" }), "NotAfter is not an RFC 3339 time"),
            (
                serde_json::json!({ "SendAt": "2026-12-01T09:00:00Z", "NotAfter": "2026-12-01T08:00:00Z" }),
                "NotAfter must be later than SendAt",
            ),
            (serde_json::json!({ "Metadata": ["a"] }), "Metadata must be an object of strings, not an array"),
            (serde_json::json!({ "Metadata": { "n": 1 } }), "Metadata value of \"n\" must be a string, not a number"),
        ] {
            let error = extra(json.clone()).check().unwrap_err();
            assert!(error.starts_with(expected), "{json}: {error}");
        }
    }

    #[test]
    fn metadata_is_bounded() {
        let many: serde_json::Map<String, Value> =
            (0..=METADATA_MAX_KEYS).map(|i| (format!("k{i}"), Value::String("v".into()))).collect();
        let error = extra(serde_json::json!({ "Metadata": many })).check().unwrap_err();
        assert!(error.contains("17 keys, over the limit of 16"), "{error}");
        let big = "x".repeat(METADATA_MAX_BYTES);
        let error = extra(serde_json::json!({ "Metadata": { "k": big } })).check().unwrap_err();
        assert!(error.contains("1025 bytes (keys and values), over the limit of 1024"), "{error}");
        let ok = extra(serde_json::json!({ "Metadata": { "order": "A-17", "campaign": "" } })).check().unwrap();
        assert_eq!(ok.metadata.get("order").map(String::as_str), Some("A-17"));
    }

    #[test]
    fn stored_values_round_trip_to_the_mailing_fields() {
        let timing = Timing {
            send_at_ms: Some(1_796_112_000_000),
            not_after_ms: Some(1_796_112_600_500),
            metadata: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
        };
        let extra = MailingExtra::from_stored(timing.send_at_ms, timing.not_after_ms, &timing.metadata);
        assert_eq!(extra.check(), Ok(timing));
    }

    #[test]
    fn a_letter_is_due_at_its_send_at_and_bad_values_fail_it() {
        use crate::model::{Letter, Mailing, Status};
        let mailing = |extra: Value| Mailing {
            subject: "s".into(),
            body: "b".into(),
            addresses: vec!["a@x.org".into()],
            token: "t".into(),
            extra: serde_json::from_value(extra).unwrap(),
        };
        let held = Letter::from_mailing(
            mailing(serde_json::json!({ "SendAt": "2026-12-01T08:00:00Z", "Metadata": { "k": "v" } })),
            Some(b"k"),
            "t/0/1/0".into(),
            1_000,
        );
        assert_eq!(
            (held.status, held.due_ms, held.send_at_ms),
            (Status::Awaiting, 1_796_112_000_000, Some(1_796_112_000_000))
        );
        let message: serde_json::Value =
            serde_json::from_slice(&crate::model::StatusWriter::default().write(&held, 1024).unwrap()).unwrap();
        assert_eq!(message["Metadata"], serde_json::json!({ "k": "v" }));
        // A SendAt in the past is simply due now.
        let now = Letter::from_mailing(
            mailing(serde_json::json!({ "SendAt": "2000-01-01T00:00:00Z" })),
            None,
            "s".into(),
            1_796_112_000_000,
        );
        assert_eq!(now.due_ms, 1_796_112_000_000);
        let bad = Letter::from_mailing(mailing(serde_json::json!({ "NotAfter": 5 })), None, "s".into(), 5);
        assert_eq!(bad.status, Status::Error);
        assert!(bad.error.unwrap().starts_with("NotAfter must be"));
        // And the whole batch still parses: the wrong type fails its letter, not the message.
        let batch = br#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","SendAt":5,"Metadata":[1]}]"#;
        assert_eq!(crate::model::parse_batch(batch).unwrap().len(), 1);
    }

    #[test]
    fn a_retry_after_not_after_ends_the_letter_expired() {
        use crate::model::{Letter, Mailing};
        let mut letter = Letter::from_mailing(
            Mailing {
                subject: "s".into(),
                body: "b".into(),
                addresses: vec!["a@x.org".into()],
                token: "t".into(),
                extra: MailingExtra::default(),
            },
            None,
            "s".into(),
            0,
        );
        letter.not_after_ms = Some(100);
        let record = |due_ms| AttemptRecord {
            letter: letter.clone(),
            outcome: Outcome::Retry { reason: "451".into(), due_ms },
            published: false,
        };
        assert!(matches!(end_if_expired(record(50), 10).outcome, Outcome::Retry { .. }));
        assert_eq!(
            end_if_expired(record(100), 10).outcome,
            Outcome::Failed { kind: crate::model::FailureKind::Expired, reason: EXPIRED.into() }
        );
        assert_eq!(
            end_if_expired(record(50), 100).outcome,
            Outcome::Failed { kind: crate::model::FailureKind::Expired, reason: EXPIRED.into() }
        );
    }

    #[test]
    fn expiry_is_at_not_after() {
        assert!(!expired(None, i64::MAX));
        assert!(!expired(Some(10), 9));
        assert!(expired(Some(10), 10));
    }
}
