//! The shapes that cross the service's edges: the input batch, the stored letter and the status
//! message. Field names follow the Go service this one replaces.

use std::{borrow::Cow, collections::HashSet, fmt};

use base64::Engine as _;
use mongodb::bson::{Bson, DateTime, oid::ObjectId};
use serde::{Deserialize, Serialize};

use crate::{address::Recipient, smtp::message::check_subject};

/// How a refusal names the JSON type a producer sent where another was expected (the optional
/// fields' checks in `attachments`, `lanes` and `priority` share it).
pub(crate) fn json_kind(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Maps and sets of letters by id, with foldhash rather than SipHash: the lease clock and the
/// report stage touch them for every letter (SipHash was ~2,500 instructions a letter, issue 23),
/// and the keys are ids this service or MongoDB made, hashed with a per-process random seed.
pub type IdMap<V> = std::collections::HashMap<ObjectId, V, foldhash::fast::RandomState>;
/// See [`IdMap`].
pub type IdSet = std::collections::HashSet<ObjectId, foldhash::fast::RandomState>;

/// A letter's id as its 24 hex digits, written on the stack: `ObjectId::to_hex` collects
/// characters one by one into a `String` (~750 instructions, twice a letter, issue 23).
pub struct IdHex([u8; 24]);

impl IdHex {
    pub fn new(id: &ObjectId) -> IdHex {
        let mut digits = [0; 24];
        // 12 bytes always fit 24 digits.
        let _ = hex::encode_to_slice(id.bytes(), &mut digits);
        IdHex(digits)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// What a producer must send, quoted in every rejection so the fix is obvious.
pub const EXPECTED_BATCH: &str = r#"a non-empty JSON array of mailings, each {"Subject": string, "Body": string (HTML), "Addresses": [string, ...] (at least one mailbox), "Token": string, optionally "SendAt" and "NotAfter": RFC 3339 time strings, "Metadata": {string: string} (at most 16 keys, 1024 bytes), "Attachments": [{"FileName": string, "ContentType": string, "Content": base64 string, "ContentId": string for an inline image}, ...], "Lane": "transactional" or "bulk", "Tenant": string, "Weight": number from 0.01 to 1000}"#;

/// One element of an input batch. Go's JSON decoder matched keys case-insensitively, so the
/// lower-case spellings that producers may rely on are accepted too.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Mailing {
    #[serde(rename = "Subject", alias = "subject")]
    pub subject: String,
    #[serde(rename = "Body", alias = "body")]
    pub body: String,
    #[serde(rename = "Addresses", alias = "addresses")]
    pub addresses: Vec<String>,
    #[serde(rename = "Token", alias = "token")]
    pub token: String,
    /// `SendAt`, `NotAfter` and `Metadata` (issue 19), all optional.
    #[serde(flatten)]
    pub extra: crate::lanes::MailingExtra,
}

/// Why a Kafka message or an HTTP body is not a batch at all.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BatchError {
    #[error("not valid JSON for a batch: {0}")]
    Json(String),
    #[error("the batch is an empty array")]
    Empty,
    #[error("the message has no payload")]
    NoPayload,
}

/// Parses a batch. Shape errors reject the whole message; content errors (a bad address, a
/// subject with a line break) are per mailing, see [`Mailing::validate`].
pub fn parse_batch(payload: &[u8]) -> Result<Vec<Mailing>, BatchError> {
    if payload.is_empty() {
        return Err(BatchError::NoPayload);
    }
    let mailings = match simd_mailings(payload) {
        Some(mailings) => mailings,
        // serde_json's words for what is wrong: they are what producers have been told so far.
        None => serde_json::from_slice(payload).map_err(|e| BatchError::Json(e.to_string()))?,
    };
    if mailings.is_empty() {
        return Err(BatchError::Empty);
    }
    Ok(mailings)
}

/// The batch read by simd-json, or `None` where it refuses it. A letter's body is most of a
/// batch, and serde_json reads a string byte by byte past every escape (a newsletter's quotes and
/// line ends: ~17,000 instructions a letter, the most of any step, issue 23); simd-json finds the
/// quotes and backslashes 32 bytes at a time. It rewrites its input, hence the copy. What it
/// accepts, serde_json accepts as the same batch (`simd_json_accepts_only_what_serde_json_accepts`).
fn simd_mailings(payload: &[u8]) -> Option<Vec<Mailing>> {
    // serde_json's nesting limit (127 arrays and objects), which also keeps the recursive reading of an unknown field's
    // value (serde's, whatever the parser) off the end of the stack.
    const DEPTH: usize = 127;
    let mut copy = payload.to_vec();
    let mut buffers = simd_json::Buffers::with_max_depth(copy.len(), DEPTH);
    simd_json::serde::from_slice_with_buffers(&mut copy, &mut buffers).ok()
}

/// A mailing checked for what would break or abuse the SMTP exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// Distinct valid mailboxes, in input order.
    pub recipients: Vec<Recipient>,
    /// Addresses refused before any SMTP exchange, with the reason.
    pub rejected: Vec<Rejection>,
    /// Set when nothing can be sent at all.
    pub error: Option<String>,
    /// The `Attachments`, decoded (empty when `error` is set).
    pub attachments: Vec<crate::attachments::Attachment>,
}

impl Mailing {
    /// [`Mailing::validate_within`] the default attachment limits.
    pub fn validate(&self) -> Checked {
        self.validate_within(&crate::attachments::AttachmentLimits::default())
    }

    /// Checks the mailing, its attachments against `limits` (`ATTACHMENTS_MAX_COUNT`, `ATTACHMENTS_MAX_BYTES`).
    pub fn validate_within(&self, limits: &crate::attachments::AttachmentLimits) -> Checked {
        let mut valid = Vec::with_capacity(self.addresses.len());
        let mut rejected = Vec::new();
        for raw in &self.addresses {
            match Recipient::parse(raw) {
                Ok(recipient) => valid.push(recipient),
                Err(reason) => rejected.push(Rejection { address: raw.clone(), reply: reason }),
            }
        }
        // Compared by key without copying one (a mailing has few addresses: `Keys`).
        let mut seen = Keys::with_capacity(valid.len());
        let recipients: Vec<Recipient> =
            valid.iter().filter(|r| seen.insert(Cow::Borrowed(r.key_str()))).cloned().collect();
        let attachments = crate::attachments::check(self.extra.attachments.as_ref(), limits);
        let error = if let Err(reason) = check_subject(&self.subject) {
            Some(reason)
        } else if let Err(reason) = self.extra.check() {
            Some(reason)
        } else if let Err(reason) = &attachments {
            Some(reason.clone())
        } else if self.addresses.is_empty() {
            Some("Addresses is empty: a letter needs at least one recipient".to_owned())
        } else if recipients.is_empty() {
            Some("no valid recipient address".to_owned())
        } else {
            None
        };
        // A failed letter keeps none of its files: it is never sent.
        let attachments = attachments.ok().filter(|_| error.is_none()).unwrap_or_default();
        Checked { recipients, rejected, error, attachments }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Awaiting,
    Processing,
    Sent,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Awaiting => "awaiting",
            Status::Processing => "processing",
            Status::Sent => "sent",
            Status::Error => "error",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A recipient the SMTP server (or validation) refused, with the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    #[serde(rename = "Address", alias = "address")]
    pub address: String,
    #[serde(rename = "Reply", alias = "reply")]
    pub reply: String,
}

/// A letter as stored in MongoDB. The first block of fields is the Go service's; the rest carry
/// idempotency, leases, retries and per-recipient state, and default when absent so documents the
/// Go service wrote still load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Letter {
    #[serde(rename = "_id")]
    pub id: ObjectId,
    pub addresses: Vec<String>,
    pub subject: String,
    pub body: String,
    pub token: String,
    pub status: Status,
    /// The Kafka key as text (the Go service's field); lossy when the key is not UTF-8.
    pub kafkakey: String,
    /// 1 when the source message had no key at all (`kafkakey` is then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_null: Option<i32>,
    /// The exact key bytes, base64, when they are not UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_b64: Option<String>,

    /// `topic/partition/offset/index` of the mailing this letter came from; unique, so a
    /// redelivered Kafka message cannot create its letters twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default)]
    pub attempts: i32,
    /// When an `awaiting` letter may next be sent, in Unix milliseconds. Integer rather than a
    /// BSON date because range queries on dates are several times slower on the Mongo-wire server.
    #[serde(default)]
    pub due_ms: i64,
    /// Bytes of the letter's text (body, subject, token, addresses) and attachments, so a claim
    /// can take no more than memory allows without reading the bodies first. Absent (0) on
    /// Go-era letters.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size_bytes: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// Recipients that accepted the letter in an earlier attempt; not sent again on retry.
    #[serde(default)]
    pub delivered: Vec<String>,
    #[serde(default)]
    pub rejected: Vec<Rejection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Present (1) while a final outcome has not yet been published to the status topic. An
    /// integer, not a boolean: the Mongo-wire server stores booleans set by `$set` as integers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreported: Option<i32>,
    /// A BSON date when inserted; kept loosely typed because some Mongo-wire servers hand
    /// dates back in other shapes. Queries use the integer millisecond fields instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Bson>,
    /// Last change, in Unix milliseconds.
    #[serde(default)]
    pub updated_ms: i64,
    /// Bounces, complaints and delays reported after the relay took the letter (issue 20,
    /// `crate::feedback`), by event key (one per recipient and kind); written by the feedback
    /// listener only.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub feedback: std::collections::BTreeMap<String, FeedbackNote>,
    /// The mailing's `SendAt`, Unix ms; `due_ms` starts there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at_ms: Option<i64>,
    /// The mailing's `NotAfter`, Unix ms: not sent from then on, ended `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after_ms: Option<i64>,
    /// The mailing's `Metadata`, echoed in status messages, feedback events and the letter view.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,

    /// The mailing's `Attachments`, decoded; absent on Go-era letters and letters without any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<crate::attachments::Attachment>,
    /// The mailing's `Lane`; Go-era letters are bulk (`crate::priority`).
    #[serde(default)]
    pub lane: crate::priority::Lane,
    /// The letter's place in its lane's fair order, given at ingest (`priority::Fairness::tag`);
    /// the claim takes the lowest due first.
    #[serde(default)]
    pub vt: f64,
    /// The mailing's `Tenant`: its letters share one fair share, whatever their Kafka keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The mailing's `Weight` (absent: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// `addresses` parsed, on first use: not stored (MongoDB keeps the Go service's strings).
    #[serde(skip)]
    parsed: ParsedAddresses,
}

/// A letter's addresses parsed once and carried with it, so that the claim's suppression check,
/// the worker and the outcome do not parse them again (each did, ~50,000 instructions a letter
/// under callgrind, issue 23). Equal to any other: it only mirrors `addresses`.
#[derive(Clone, Default)]
struct ParsedAddresses(std::sync::OnceLock<Vec<ParsedAddress>>);

/// One of `addresses`: the recipient when it is a valid mailbox, and its key either way.
#[derive(Clone)]
enum ParsedAddress {
    Valid {
        recipient: Recipient,
        /// As stored, when that is not the recipient's form (spaces around it), so a cache that
        /// no longer matches `addresses` is seen.
        raw: Option<String>,
    },
    Invalid {
        raw: String,
        key: String,
    },
}

impl ParsedAddress {
    /// Copies nothing the recipient holds already: a claim parses every letter's addresses.
    fn of(raw: &str) -> ParsedAddress {
        match Recipient::parse(raw) {
            Ok(recipient) => {
                let raw = (recipient.as_str() != raw).then(|| raw.to_owned());
                ParsedAddress::Valid { recipient, raw }
            }
            Err(_) => ParsedAddress::Invalid { raw: raw.to_owned(), key: raw.trim().to_lowercase() },
        }
    }

    /// As stored.
    fn raw(&self) -> &str {
        match self {
            ParsedAddress::Valid { recipient, raw } => raw.as_deref().unwrap_or(recipient.as_str()),
            ParsedAddress::Invalid { raw, .. } => raw,
        }
    }

    fn key(&self) -> &str {
        match self {
            ParsedAddress::Valid { recipient, .. } => recipient.key_str(),
            ParsedAddress::Invalid { key, .. } => key,
        }
    }

    fn recipient(&self) -> Option<&Recipient> {
        match self {
            ParsedAddress::Valid { recipient, .. } => Some(recipient),
            ParsedAddress::Invalid { .. } => None,
        }
    }

    /// Whether `raw` names this address: as stored, or as its recipient writes it (the form
    /// `delivered` and `rejected` hold).
    fn named_by(&self, raw: &str) -> bool {
        self.raw() == raw || self.recipient().is_some_and(|r| r.as_str() == raw)
    }
}

impl PartialEq for ParsedAddresses {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for ParsedAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.get().is_some() { "parsed" } else { "not parsed" })
    }
}

impl Letter {
    /// A letter with every field empty, for a reader that fills it in field by field
    /// (`store::letter_doc`).
    pub(crate) fn blank() -> Letter {
        Letter {
            id: ObjectId::from_bytes([0; 12]),
            addresses: Vec::new(),
            subject: String::new(),
            body: String::new(),
            token: String::new(),
            status: Status::Awaiting,
            kafkakey: String::new(),
            key_null: None,
            key_b64: None,
            source: None,
            attempts: 0,
            due_ms: 0,
            size_bytes: 0,
            owner: None,
            lease_ms: None,
            claim: None,
            delivered: Vec::new(),
            rejected: Vec::new(),
            last_reply: None,
            error: None,
            unreported: None,
            created_at: None,
            updated_ms: 0,
            feedback: Default::default(),
            send_at_ms: None,
            not_after_ms: None,
            metadata: Default::default(),
            attachments: Vec::new(),
            lane: Default::default(),
            vt: 0.0,
            tenant: None,
            weight: None,
            parsed: ParsedAddresses::default(),
        }
    }
}

#[cfg(test)]
impl Letter {
    /// A letter with every field set to something but `feedback` and `attachments` (which the
    /// store encodes through serde). A struct literal: a field added to `Letter` must be set here.
    pub(crate) fn with_every_field() -> Letter {
        Letter {
            id: ObjectId::new(),
            addresses: vec!["a@x.org".into(), "Bé <b@x.org>".into()],
            subject: "subject \u{e9}".into(),
            body: "<p>body\0with a NUL</p>".into(),
            token: "token".into(),
            status: Status::Error,
            kafkakey: "key".into(),
            key_null: Some(1),
            key_b64: Some("/wA=".into()),
            source: Some("t/0/1/0".into()),
            attempts: 3,
            due_ms: 1_700_000_000_000,
            size_bytes: 1234,
            owner: Some("owner".into()),
            lease_ms: Some(1_700_000_060_000),
            claim: Some("claim".into()),
            delivered: vec!["a@x.org".into()],
            rejected: vec![Rejection { address: "b@x.org".into(), reply: "550 no".into() }],
            last_reply: Some("250 ok".into()),
            error: Some("why".into()),
            unreported: Some(1),
            created_at: Some(Bson::DateTime(mongodb::bson::DateTime::from_millis(1_700_000_000_000))),
            updated_ms: 1_700_000_000_001,
            feedback: Default::default(),
            send_at_ms: Some(1_700_000_100_000),
            not_after_ms: Some(1_700_000_200_000),
            metadata: [("campaign".to_owned(), "c1".to_owned()), ("z".to_owned(), "\u{e9}".to_owned())].into(),
            attachments: Vec::new(),
            lane: crate::priority::Lane::Transactional,
            vt: 12.5,
            tenant: Some("tenant".into()),
            weight: Some(2.5),
            parsed: Default::default(),
        }
    }
}

/// A set of address keys: a list while it is small, as it is for most letters (a few
/// recipients), where hashing each key cost more than comparing it with the others (issue 23).
enum Keys<'a> {
    Few(Vec<Cow<'a, str>>),
    Many(HashSet<Cow<'a, str>>),
}

impl<'a> Keys<'a> {
    /// Up to this many keys are compared one by one.
    const FEW: usize = 16;

    fn with_capacity(capacity: usize) -> Keys<'a> {
        if capacity <= Self::FEW {
            Keys::Few(Vec::with_capacity(capacity))
        } else {
            Keys::Many(HashSet::with_capacity(capacity))
        }
    }

    /// Adds `key`; whether it was not there yet.
    fn insert(&mut self, key: Cow<'a, str>) -> bool {
        match self {
            Keys::Few(keys) if keys.contains(&key) => false,
            Keys::Few(keys) if keys.len() < Self::FEW => {
                keys.push(key);
                true
            }
            Keys::Few(keys) => {
                let mut many: HashSet<Cow<'a, str>> = keys.drain(..).collect();
                let new = many.insert(key);
                *self = Keys::Many(many);
                new
            }
            Keys::Many(keys) => keys.insert(key),
        }
    }
}

/// One feedback event as stored on its letter (see `crate::feedback::Event`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FeedbackNote {
    pub address: String,
    /// `hard_bounce`, `soft_bounce`, `complaint` or `delay`.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostic: Option<String>,
    /// `dsn` or `arf`.
    pub source: String,
    pub time_ms: i64,
    /// The event's identity, which makes a repeated report a no-op.
    pub key: String,
}

impl Letter {
    /// Builds the stored letter for one mailing of a batch. A mailing that fails validation is
    /// stored already failed, so its producer hears about it on the status topic.
    pub fn from_mailing(mailing: Mailing, kafka_key: Option<&[u8]>, source: String, now_ms: i64) -> Letter {
        Self::from_mailing_within(mailing, kafka_key, source, now_ms, &crate::attachments::AttachmentLimits::default())
    }

    /// [`Letter::from_mailing`] with the deployment's attachment limits, as ingest builds letters.
    pub fn from_mailing_within(
        mailing: Mailing,
        kafka_key: Option<&[u8]>,
        source: String,
        now_ms: i64,
        limits: &crate::attachments::AttachmentLimits,
    ) -> Letter {
        let checked = mailing.validate_within(limits);
        let failed = checked.error.is_some();
        // Invalid values already failed the letter (`validate`); it then keeps none of them.
        let timing = mailing.extra.check().unwrap_or_default();
        let priority = mailing.extra.priority().unwrap_or_default();
        let mut letter = Letter {
            id: ObjectId::new(),
            addresses: mailing.addresses,
            subject: mailing.subject,
            body: mailing.body,
            token: mailing.token,
            status: if failed { Status::Error } else { Status::Awaiting },
            kafkakey: kafka_key.map(String::from_utf8_lossy).unwrap_or_default().into_owned(),
            key_null: kafka_key.is_none().then_some(1),
            key_b64: kafka_key
                .filter(|k| std::str::from_utf8(k).is_err())
                .map(|k| base64::engine::general_purpose::STANDARD.encode(k)),
            source: Some(source),
            attempts: 0,
            // The claim takes letters by `due_ms` (its index): a later `SendAt` holds it back.
            due_ms: timing.send_at_ms.map_or(now_ms, |send_at| send_at.max(now_ms)),
            size_bytes: 0,
            owner: None,
            lease_ms: None,
            claim: None,
            delivered: Vec::new(),
            rejected: checked.rejected,
            last_reply: None,
            error: checked.error,
            unreported: failed.then_some(1),
            created_at: Some(Bson::DateTime(DateTime::from_millis(now_ms))),
            updated_ms: now_ms,
            feedback: Default::default(),
            send_at_ms: timing.send_at_ms,
            not_after_ms: timing.not_after_ms,
            metadata: timing.metadata,
            attachments: checked.attachments,
            lane: priority.lane,
            vt: 0.0,
            tenant: priority.tenant,
            weight: (priority.weight != 1.0).then_some(priority.weight),
            parsed: ParsedAddresses::default(),
        };
        letter.size_bytes = letter.text_bytes() as i64;
        letter
    }

    /// Bytes this letter holds in memory: its text and its attachments.
    pub fn text_bytes(&self) -> usize {
        crate::attachments::bytes(&self.attachments)
            + self.body.len()
            + self.subject.len()
            + self.token.len()
            + self.addresses.iter().map(String::len).sum::<usize>()
            + self.metadata.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }

    /// A copy without what may be large: the body, the attachments, the addresses and the
    /// per-recipient state.
    pub fn clone_head(&self) -> Letter {
        Letter {
            id: self.id,
            addresses: Vec::new(),
            subject: self.subject.clone(),
            body: String::new(),
            token: self.token.clone(),
            status: self.status,
            kafkakey: self.kafkakey.clone(),
            key_null: self.key_null,
            key_b64: self.key_b64.clone(),
            source: self.source.clone(),
            attempts: self.attempts,
            due_ms: self.due_ms,
            size_bytes: self.size_bytes,
            owner: self.owner.clone(),
            lease_ms: self.lease_ms,
            claim: self.claim.clone(),
            delivered: Vec::new(),
            rejected: Vec::new(),
            last_reply: self.last_reply.clone(),
            error: self.error.clone(),
            unreported: self.unreported,
            created_at: self.created_at.clone(),
            updated_ms: self.updated_ms,
            feedback: Default::default(),
            send_at_ms: self.send_at_ms,
            not_after_ms: self.not_after_ms,
            metadata: self.metadata.clone(),
            attachments: Vec::new(),
            lane: self.lane,
            vt: self.vt,
            tenant: self.tenant.clone(),
            weight: self.weight,
            parsed: ParsedAddresses::default(),
        }
    }

    /// The key bytes of the source message, for the status message: the same bytes, and no key
    /// when it had none.
    pub fn key_bytes(&self) -> Option<Vec<u8>> {
        if self.key_null == Some(1) {
            return None;
        }
        match &self.key_b64 {
            Some(encoded) => base64::engine::general_purpose::STANDARD.decode(encoded).ok(),
            None => Some(self.kafkakey.as_bytes().to_vec()),
        }
    }

    /// Recipients still to be tried: valid, not yet accepted, not refused for good.
    pub fn pending_recipients(&self) -> Vec<Recipient> {
        let parsed = self.parsed_addresses();
        let parsed: &[ParsedAddress] = &parsed;
        // An address of the letter has its key already; anything else is parsed as before.
        let key = |raw: &str| -> Cow<'_, str> {
            match parsed.iter().find(|p| p.named_by(raw)) {
                Some(p) => Cow::Borrowed(p.key()),
                None => Cow::Owned(ParsedAddress::of(raw).key().to_owned()),
            }
        };
        let mut done = Keys::with_capacity(parsed.len() + self.delivered.len() + self.rejected.len());
        for done_key in self.delivered.iter().map(|a| key(a)).chain(self.rejected.iter().map(|r| key(&r.address))) {
            done.insert(done_key);
        }
        parsed
            .iter()
            .filter_map(ParsedAddress::recipient)
            .filter(|r| done.insert(Cow::Borrowed(r.key_str())))
            .cloned()
            .collect()
    }

    /// `addresses` parsed: once per letter, or afresh should `addresses` have been changed since.
    fn parsed_addresses(&self) -> Cow<'_, [ParsedAddress]> {
        let parse = || self.addresses.iter().map(|raw| ParsedAddress::of(raw)).collect::<Vec<_>>();
        let cached = self.parsed.0.get_or_init(parse);
        let current =
            cached.len() == self.addresses.len() && cached.iter().zip(&self.addresses).all(|(p, a)| p.raw() == a);
        if current { Cow::Borrowed(cached) } else { Cow::Owned(parse()) }
    }
}

/// The result of one send attempt, as the report stage writes it back.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sent,
    /// Ended in error. `reason` is the text stored and published; `kind` is what the metrics
    /// count, decided where the outcome is, so nothing reads the text back.
    Failed {
        kind: FailureKind,
        reason: String,
    },
    /// Transient failure: back to `awaiting`, due again at `due_ms`.
    Retry {
        reason: String,
        due_ms: i64,
    },
    /// Not attempted (shutdown, or the lease could no longer be trusted): back to `awaiting`
    /// as it was, without counting an attempt.
    Released,
}

/// Why a letter ended in error, by class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The message, the sender or the letter was refused for good, or could not be made.
    Permanent,
    /// Every attempt allowed ended in a failure worth retrying.
    AttemptsExhausted,
    /// The server refused every recipient.
    RecipientsRefused,
    /// The operator cancelled the letter's batch.
    Cancelled,
    /// Its `NotAfter` passed before it could be sent.
    Expired,
}

impl FailureKind {
    /// The `reason` label of `letters_failed_total`.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Permanent => "permanent",
            FailureKind::AttemptsExhausted => "attempts_exhausted",
            FailureKind::RecipientsRefused => "recipients_refused",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Expired => "expired",
        }
    }
}

/// A letter's state after an attempt, written in one statement.
#[derive(Debug)]
pub struct AttemptRecord {
    pub letter: Letter,
    pub outcome: Outcome,
    /// Whether the broker already acknowledged the status message of a final outcome; when not,
    /// the letter is stored `unreported` for the republisher.
    pub published: bool,
}

/// The reply of a recipient skipped because it is on the suppression list.
pub const SUPPRESSED_PREFIX: &str = "suppressed: ";

/// Writes status messages, borrowed from the letter instead of copied, with each body escaped
/// once for all the letters that carry it. A campaign's letters share one body, and escaping it
/// into every status message was the largest single cost of publishing one (~17,000
/// instructions a letter of 1.3 KB under callgrind, issue 23).
#[derive(Default)]
pub struct StatusWriter {
    /// The last body written, and its JSON string.
    last: Option<(String, Box<serde_json::value::RawValue>)>,
}

/// The message published to the status topic for each letter that reaches `sent` or `error`,
/// borrowed from the letter; its body is already JSON ([`StatusWriter`]).
#[derive(Serialize)]
struct StatusMessage<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    #[serde(rename = "Addresses")]
    addresses: &'a [String],
    #[serde(rename = "Subject")]
    subject: &'a str,
    #[serde(rename = "Body")]
    body: &'a serde_json::value::RawValue,
    /// Set when `Body` was left out because it is larger than `STATUS_BODY_MAX_BYTES`, so the
    /// status message stays well within the broker's message size.
    #[serde(rename = "BodyOmitted", skip_serializing_if = "std::ops::Not::not")]
    body_omitted: bool,
    #[serde(rename = "Token")]
    token: &'a str,
    #[serde(rename = "Status")]
    status: Status,
    #[serde(rename = "KafkaKey")]
    kafka_key: &'a str,
    #[serde(rename = "Error", skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(rename = "Attempts")]
    attempts: i32,
    #[serde(rename = "LastReply", skip_serializing_if = "Option::is_none")]
    last_reply: Option<&'a str>,
    #[serde(rename = "Delivered")]
    delivered: &'a [String],
    #[serde(rename = "Rejected")]
    rejected: &'a [Rejection],
    /// Recipients skipped because they are on the suppression list (also in `Rejected`, with the
    /// reply "suppressed: <reason>").
    #[serde(rename = "Suppressed", skip_serializing_if = "Vec::is_empty")]
    suppressed: Vec<&'a str>,
    /// The mailing's `Metadata`, unchanged.
    #[serde(rename = "Metadata", skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    metadata: &'a std::collections::BTreeMap<String, String>,
}

impl StatusWriter {
    /// The status message of `letter`, its body only up to `body_max` bytes.
    pub fn write(&mut self, letter: &Letter, body_max: usize) -> serde_json::Result<Vec<u8>> {
        let body_omitted = letter.body.len() > body_max;
        let body = if body_omitted { "" } else { letter.body.as_str() };
        if self.last.as_ref().is_none_or(|(last, _)| last != body) {
            self.last = Some((body.to_owned(), serde_json::value::to_raw_value(body)?));
        }
        let Some((_, escaped)) = &self.last else {
            return Err(serde::ser::Error::custom("the escaped body was not kept"));
        };
        let id = IdHex::new(&letter.id);
        let message = StatusMessage {
            id: id.as_str(),
            addresses: &letter.addresses,
            subject: &letter.subject,
            body: escaped,
            body_omitted,
            token: &letter.token,
            status: letter.status,
            kafka_key: &letter.kafkakey,
            error: letter.error.as_deref(),
            attempts: letter.attempts,
            last_reply: letter.last_reply.as_deref(),
            delivered: &letter.delivered,
            rejected: &letter.rejected,
            suppressed: letter
                .rejected
                .iter()
                .filter(|r| r.reply.starts_with(SUPPRESSED_PREFIX))
                .map(|r| r.address.as_str())
                .collect(),
            metadata: &letter.metadata,
        };
        // The body and a few hundred bytes of fields: one allocation, no growing.
        let mut out =
            Vec::with_capacity(escaped.get().len() + letter.subject.len() + 64 * letter.addresses.len() + 512);
        serde_json::to_writer(&mut out, &message)?;
        Ok(out)
    }
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_written_as_the_bson_crate_writes_it() {
        for id in [
            ObjectId::new(),
            ObjectId::from_bytes([0; 12]),
            ObjectId::from_bytes([0xff; 12]),
            ObjectId::from_bytes(*b"\x01#Eg\x89\xab\xcd\xef\x10\x32\x54\x76"),
        ] {
            assert_eq!(IdHex::new(&id).as_str(), id.to_hex());
        }
    }

    /// The status message as it was built before [`StatusWriter`] (copied from the letter), kept
    /// to show the writer writes the same bytes.
    mod before {
        use super::super::{Letter, Rejection, SUPPRESSED_PREFIX, Status};
        use serde::Serialize;

        /// The message published to the status topic for each letter that reaches `sent` or `error`.
        #[derive(Serialize)]
        pub struct StatusMessage {
            #[serde(rename = "ID")]
            pub id: String,
            #[serde(rename = "Addresses")]
            pub addresses: Vec<String>,
            #[serde(rename = "Subject")]
            pub subject: String,
            #[serde(rename = "Body")]
            pub body: String,
            /// Set when `Body` was left out because it is larger than `STATUS_BODY_MAX_BYTES`, so the
            /// status message stays well within the broker's message size.
            #[serde(rename = "BodyOmitted", skip_serializing_if = "std::ops::Not::not")]
            pub body_omitted: bool,
            #[serde(rename = "Token")]
            pub token: String,
            #[serde(rename = "Status")]
            pub status: Status,
            #[serde(rename = "KafkaKey")]
            pub kafka_key: String,
            #[serde(rename = "Error", skip_serializing_if = "Option::is_none")]
            pub error: Option<String>,
            #[serde(rename = "Attempts")]
            pub attempts: i32,
            #[serde(rename = "LastReply", skip_serializing_if = "Option::is_none")]
            pub last_reply: Option<String>,
            #[serde(rename = "Delivered")]
            pub delivered: Vec<String>,
            #[serde(rename = "Rejected")]
            pub rejected: Vec<Rejection>,
            /// Recipients skipped because they are on the suppression list (also in `Rejected`, with the
            /// reply "suppressed: <reason>").
            #[serde(rename = "Suppressed", skip_serializing_if = "Vec::is_empty")]
            pub suppressed: Vec<String>,
            /// The mailing's `Metadata`, unchanged.
            #[serde(rename = "Metadata", skip_serializing_if = "std::collections::BTreeMap::is_empty")]
            pub metadata: std::collections::BTreeMap<String, String>,
        }

        impl StatusMessage {
            /// The status message of a letter; its body only up to `body_max` bytes.
            pub fn new(letter: &Letter, body_max: usize) -> Self {
                let body_omitted = letter.body.len() > body_max;
                StatusMessage {
                    id: letter.id.to_hex(),
                    addresses: letter.addresses.clone(),
                    subject: letter.subject.clone(),
                    body: if body_omitted { String::new() } else { letter.body.clone() },
                    body_omitted,
                    token: letter.token.clone(),
                    status: letter.status,
                    kafka_key: letter.kafkakey.clone(),
                    error: letter.error.clone(),
                    attempts: letter.attempts,
                    last_reply: letter.last_reply.clone(),
                    delivered: letter.delivered.clone(),
                    rejected: letter.rejected.clone(),
                    suppressed: letter
                        .rejected
                        .iter()
                        .filter(|r| r.reply.starts_with(SUPPRESSED_PREFIX))
                        .map(|r| r.address.clone())
                        .collect(),
                    metadata: letter.metadata.clone(),
                }
            }
        }
    }

    fn mailing(subject: &str, addresses: &[&str]) -> Mailing {
        Mailing {
            subject: subject.into(),
            body: "<p>hi</p>".into(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            token: "tok".into(),
            extra: Default::default(),
        }
    }

    #[test]
    fn parses_the_go_shape_and_lower_case_keys() {
        let batch = parse_batch(
            br#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t"},
            {"subject":"s2","body":"b2","addresses":["b@x.org"],"token":"t2","Extra":1}]"#,
        )
        .unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[1].addresses, vec!["b@x.org"]);
    }

    /// Batches that exercise what the two parsers could read differently: escapes of every kind,
    /// raw control characters, surrogates, numbers at the edges, duplicate and unknown keys, the
    /// optional fields, trailing bytes.
    const TRICKY: &[&str] = &[
        r#"[{"Subject":"s","Body":"<p class=\"a\">x</p>\n\r\t\\ \/ \b\f","Addresses":["a@x.org"],"Token":"t"}]"#,
        r#"[{"Subject":"\u00e9\u041b\ud83d\ude00","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#,
        r#"[{"Subject":"\ud800","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#,
        r#"[{"Subject":"\udc00\ud800","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#,
        r#"[{"Subject":"\u00","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#,
        r#"[{"Subject":"\x41","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#,
        "[{\"Subject\":\"raw\nline\",\"Body\":\"b\",\"Addresses\":[\"a@x.org\"],\"Token\":\"t\"}]",
        "[{\"Subject\":\"tab\there\",\"Body\":\"b\",\"Addresses\":[\"a@x.org\"],\"Token\":\"t\"}]",
        "[{\"Subject\":\"nul\u{0}\",\"Body\":\"b\",\"Addresses\":[\"a@x.org\"],\"Token\":\"t\"}]",
        "[{\"Subject\":\"del\u{7f} é ✓\",\"Body\":\"b\",\"Addresses\":[\"a@x.org\"],\"Token\":\"t\"}]",
        r#"[{"Subject":"s","Subject":"again","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#,
        r#"[{"Subject":"s","subject":"again","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Weight":1e400}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Weight":-0.0}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Weight":0.1e1,"Lane":"bulk"}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Weight":18446744073709551616}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Weight":-9223372036854775809}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Weight":01}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Weight":1.}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Weight":.5}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Weight":+1}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Metadata":{"k":"v","n":{"deep":[1,2,{"x":null}]}}}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","SendAt":"2026-12-03T10:00:00Z","NotAfter":null}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Attachments":[{"FileName":"a.txt","ContentType":"text/plain","Content":"aGk="}]}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Unknown":{"a":[true,false,null]}}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t"}] "#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t"}]x"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t"}][]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t"},]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org",],"Token":"t"}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t",}]"#,
        r#"[{'Subject':"s","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#,
        r#" [ { "Subject" : "s" , "Body" : "b" , "Addresses" : [ "a@x.org" ] , "Token" : "t" } ] "#,
        r#"[{"Subject":null,"Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#,
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Lane":true,"Tenant":1}]"#,
        "\u{feff}[{\"Subject\":\"s\",\"Body\":\"b\",\"Addresses\":[\"a@x.org\"],\"Token\":\"t\"}]",
        r#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t"}"#,
        r#"[[], {}]"#,
        "[]",
        "null",
    ];

    /// Whatever simd-json accepts, serde_json accepts as the same batch; where simd-json
    /// refuses, `parse_batch` asks serde_json, so its verdict and its words stand either way.
    fn agrees(payload: &[u8]) -> Result<(), String> {
        match (simd_mailings(payload), serde_json::from_slice::<Vec<Mailing>>(payload)) {
            (Some(simd), Ok(serde)) if simd == serde => Ok(()),
            (Some(simd), serde) => Err(format!("simd-json read {simd:?}, serde_json {serde:?}")),
            (None, _) => Ok(()),
        }
    }

    #[test]
    fn simd_json_accepts_only_what_serde_json_accepts() {
        let mut accepted = 0;
        for batch in TRICKY {
            agrees(batch.as_bytes()).unwrap_or_else(|e| panic!("{batch}: {e}"));
            accepted += usize::from(simd_mailings(batch.as_bytes()).is_some());
        }
        assert!(accepted >= 10, "simd-json accepted only {accepted} of the batches");
        // Every prefix of a batch with every kind of escape, and a long one whose strings cross
        // the 32- and 64-byte blocks simd-json reads.
        let long = format!(
            r#"[{{"Subject":"s","Body":"{}","Addresses":["a@x.org","b@x.org"],"Token":"t"}}]"#,
            r#"<a href=\"https://x.org/?a=1&amp;b=2\">\u00e9\n</a>\t\\ "#.repeat(40)
        );
        for end in 0..long.len() {
            agrees(&long.as_bytes()[..end]).unwrap_or_else(|e| panic!("prefix {end}: {e}"));
        }
        assert!(simd_mailings(long.as_bytes()).is_some());
        // Around serde_json's nesting limit, and far past it (no stack overflow either way).
        for depth in (120..=136).chain([1_000, 100_000]) {
            let nested = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
            let batch =
                format!(r#"[{{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t","Metadata":{nested}}}]"#);
            agrees(batch.as_bytes()).unwrap_or_else(|e| panic!("depth {depth}: {e}"));
            assert!(parse_batch(batch.as_bytes()).is_err() || depth < 128, "depth {depth}");
        }
    }

    proptest::proptest! {
        /// A batch with bytes changed, inserted or removed anywhere.
        #[test]
        fn damaged_batches_are_read_alike(
            which in 0..TRICKY.len(),
            edits in proptest::collection::vec((0.0..1.0_f64, proptest::prelude::any::<u8>(), 0..3_u8), 1..4),
        ) {
            let mut payload = TRICKY[which].as_bytes().to_vec();
            for (at, byte, kind) in edits {
                let at = ((payload.len() as f64) * at) as usize;
                match kind {
                    0 if at < payload.len() => payload[at] = byte,
                    1 => payload.insert(at.min(payload.len()), byte),
                    _ if at < payload.len() => { payload.remove(at); }
                    _ => {}
                }
            }
            proptest::prop_assert!(agrees(&payload).is_ok(), "{:?}: {:?}", String::from_utf8_lossy(&payload), agrees(&payload));
        }
    }

    #[test]
    fn shape_errors_reject_the_batch() {
        for bad in [
            &b"not json"[..],
            b"{}",
            b"[]",
            b"",
            br#"[{"Subject":1,"Body":"b","Addresses":[],"Token":"t"}]"#,
            br#"[{"Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#,
            br#"[{"Subject":"s","Body":"b","Addresses":"a@x.org","Token":"t"}]"#,
            br#"[{"Subject":"s","Body":"b","Addresses":[["a@x.org"]],"Token":"t"}]"#,
            br#"[null]"#,
            b"\xff\xfe[]",
        ] {
            assert!(parse_batch(bad).is_err(), "{:?} should be rejected", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn validation_fails_a_letter_not_a_batch() {
        let ok = mailing("hello", &["a@x.org", "A@x.org", "bad address", "b@x.org"]).validate();
        let recipients: Vec<&str> = ok.recipients.iter().map(Recipient::as_str).collect();
        assert_eq!(recipients, vec!["a@x.org", "b@x.org"]);
        assert_eq!(ok.rejected.len(), 1);
        assert!(ok.rejected[0].reply.contains("invalid address"));
        assert_eq!(ok.error, None);

        assert!(mailing("hi\r\nBcc: evil@x.org", &["a@x.org"]).validate().error.unwrap().contains("line break"));
        assert!(mailing("hi", &[]).validate().error.unwrap().contains("empty"));
        assert!(mailing("hi", &["", "nope"]).validate().error.unwrap().contains("no valid recipient"));
        assert!(mailing("hi", &["a@x.org>\r\nRCPT TO:<evil@x.org"]).validate().error.is_some());
    }

    #[test]
    fn pending_recipients_skip_delivered_and_rejected() {
        let mut letter = Letter::from_mailing(
            mailing("s", &["a@x.org", "b@x.org", "c@x.org", "junk"]),
            Some(b"k"),
            "t/0/1/0".into(),
            0,
        );
        assert_eq!(letter.status, Status::Awaiting);
        letter.delivered.push("a@x.org".into());
        letter.rejected.push(Rejection { address: "B@x.org".into(), reply: "550".into() });
        let pending: Vec<String> = letter.pending_recipients().iter().map(|r| r.to_string()).collect();
        assert_eq!(pending, vec!["c@x.org"]);
    }

    /// Past the small list's size the set keeps working: duplicates by key are dropped and
    /// delivered ones skipped, whatever the count.
    #[test]
    fn pending_recipients_of_many_addresses_skip_duplicates_and_delivered() {
        for count in [1, 15, 16, 17, 40] {
            let addresses: Vec<String> = (0..count).map(|i| format!("u{i}@x.org")).collect();
            let mut with_duplicates: Vec<&str> = addresses.iter().map(String::as_str).collect();
            let upper: Vec<String> = addresses.iter().map(|a| a.replace("@x.org", "@X.ORG")).collect();
            with_duplicates.extend(upper.iter().map(String::as_str));
            let mut letter = Letter::from_mailing(mailing("s", &with_duplicates), Some(b"k"), "t/0/1/0".into(), 0);
            letter.delivered = addresses.iter().step_by(3).cloned().collect();
            let pending: Vec<String> = letter.pending_recipients().iter().map(|r| r.to_string()).collect();
            let expected: Vec<String> =
                addresses.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(_, a)| a.clone()).collect();
            assert_eq!(pending, expected, "{count} addresses");
        }
    }

    #[test]
    fn pending_recipients_are_parsed_once_and_follow_changes() {
        let mut letter =
            Letter::from_mailing(mailing("s", &[" a@x.org", "b@x.org", "B@X.org"]), Some(b"k"), "t/0/1/0".into(), 0);
        let pending = |l: &Letter| l.pending_recipients().iter().map(|r| r.to_string()).collect::<Vec<_>>();
        assert_eq!(pending(&letter), vec!["a@x.org", "b@x.org"]);
        assert!(letter.parsed.0.get().is_some(), "the first call keeps the parsed addresses");
        // `delivered` holds the trimmed form; a key only, not the stored string, matches it.
        letter.delivered.push("a@x.org".into());
        letter.rejected.push(Rejection { address: "b@X.ORG".into(), reply: "550".into() });
        assert_eq!(pending(&letter), Vec::<String>::new());
        // Addresses changed after the first parse are parsed afresh, not read from the cache.
        letter.addresses = vec!["c@x.org".into(), "d@x.org".into(), "e@x.org".into()];
        assert_eq!(pending(&letter), vec!["c@x.org", "d@x.org", "e@x.org"]);
        // A decoded letter parses its own: the cache is not stored.
        let stored = mongodb::bson::to_document(&letter).unwrap();
        assert!(!stored.contains_key("parsed"), "{stored}");
        let read: Letter = mongodb::bson::from_document(stored).unwrap();
        assert_eq!(read, letter);
        assert!(read.parsed.0.get().is_none());
    }

    #[test]
    fn invalid_mailing_is_stored_failed_and_reportable() {
        let letter = Letter::from_mailing(mailing("s", &[]), Some(b"k"), "t/0/1/0".into(), 5);
        assert_eq!(letter.status, Status::Error);
        assert_eq!(letter.unreported, Some(1));
        let status = |max| -> serde_json::Value {
            serde_json::from_slice(&StatusWriter::default().write(&letter, max).unwrap()).unwrap()
        };
        let message = status(1 << 20);
        for field in ["ID", "Addresses", "Subject", "Body", "Token", "Status", "KafkaKey", "Error"] {
            assert!(message.get(field).is_some(), "{field} missing in {message}");
        }
        assert!(message.get("BodyOmitted").is_none(), "{message}");
        let capped = status(3);
        assert_eq!((capped["Body"].as_str(), capped["BodyOmitted"].as_bool()), (Some(""), Some(true)));
        assert_eq!(message["Status"], "error");
    }

    /// The writer's bytes are the owned message's, for every field a status message can carry
    /// and for bodies that need escaping, and its body cache never hands one letter another's.
    #[test]
    fn the_status_writer_writes_the_status_messages_bytes() {
        let mut first =
            Letter::from_mailing(mailing("s \"q\"", &["a@x.org", "b@x.org"]), Some(b"k"), "t/0/1/0".into(), 5);
        first.body = "<p class=\"x\">caf\u{e9} \\ \u{1} \u{2028}\n\t</p>".into();
        let mut second = first.clone();
        second.id = ObjectId::new();
        second.status = Status::Error;
        second.error = Some("550 5.1.1 \"no\"".into());
        second.last_reply = Some("250 ok".into());
        second.attempts = 3;
        second.delivered = vec!["a@x.org".into()];
        second.rejected = vec![
            Rejection { address: "b@x.org".into(), reply: format!("{SUPPRESSED_PREFIX}hard bounce") },
            Rejection { address: "c@x.org".into(), reply: "550 nope".into() },
        ];
        second.metadata.insert("campaign".into(), "c\u{e9}".into());
        let mut third = first.clone();
        third.body = "another body".into();
        let letters = [&first, &second, &first, &third, &second];
        let mut writer = StatusWriter::default();
        for body_max in [1 << 20, 5] {
            for letter in letters {
                let expected = serde_json::to_vec(&before::StatusMessage::new(letter, body_max)).unwrap();
                let written = writer.write(letter, body_max).unwrap();
                assert_eq!(String::from_utf8(written).unwrap(), String::from_utf8(expected).unwrap());
            }
        }
    }

    #[test]
    fn kafka_keys_keep_their_bytes_and_their_absence() {
        let text = Letter::from_mailing(mailing("s", &["a@x.org"]), Some(b"key-1"), "t/0/1/0".into(), 0);
        assert_eq!((text.kafkakey.as_str(), text.key_bytes()), ("key-1", Some(b"key-1".to_vec())));
        let none = Letter::from_mailing(mailing("s", &["a@x.org"]), None, "t/0/1/0".into(), 0);
        assert_eq!((none.kafkakey.as_str(), none.key_bytes()), ("", None));
        let binary = [0xff, 0x00, 0xfe, b'k'];
        let bin = Letter::from_mailing(mailing("s", &["a@x.org"]), Some(&binary), "t/0/1/0".into(), 0);
        assert_eq!(bin.key_bytes(), Some(binary.to_vec()));
        let back: Letter = mongodb::bson::from_document(mongodb::bson::to_document(&bin).unwrap()).unwrap();
        assert_eq!(back.key_bytes(), Some(binary.to_vec()));
    }

    #[test]
    fn letter_round_trips_through_bson_and_go_documents_load() {
        let letter = Letter::from_mailing(mailing("s", &["a@x.org"]), Some(b"k"), "t/0/1/0".into(), 5);
        let doc = mongodb::bson::to_document(&letter).unwrap();
        assert_eq!(doc.get_str("status").unwrap(), "awaiting");
        assert_eq!(doc.get_str("kafkakey").unwrap(), "k");
        let back: Letter = mongodb::bson::from_document(doc).unwrap();
        assert_eq!(back, letter);

        let go = mongodb::bson::doc! {
            "_id": ObjectId::new(), "addresses": ["a@x.org"], "subject": "s", "body": "b",
            "token": "t", "status": "awaiting", "kafkakey": "k",
        };
        let legacy: Letter = mongodb::bson::from_document(go).unwrap();
        assert_eq!(legacy.attempts, 0);
        assert_eq!(legacy.pending_recipients()[0].as_str(), "a@x.org");
    }
}
