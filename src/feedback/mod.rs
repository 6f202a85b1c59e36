//! The feedback loop (issue 20): what happens to a letter after the relay's 250. A signed return
//! path ([`return_path`]) ties each DSN to its letter; the inbound SMTP listener ([`listener`])
//! takes DSNs and ARF reports, [`report`] reads them, and [`Feedback`] turns each into events.
//!
//! One event model for every source: an [`Event`] names its letter and recipient, its [`Kind`]
//! (hard or soft bounce, complaint, delay), the enhanced status, the diagnostic and the
//! [`Source`]. Each event is
//! - stored on its letter (`feedback`, shown per recipient by `GET /letters/{id}`),
//! - published to `KAFKA_TOPIC_FEEDBACK`, keyed by the letter's Kafka key, with its `Token`,
//! - for a hard bounce or a complaint, added to the suppression list,
//! - once: its key is (letter, recipient, kind), so a report delivered twice, or a DSN and a
//!   relay's webhook for the same bounce, make one event.
//!
//! The relays' webhooks ([`webhooks`]: Mailgun, SendGrid, Postmark, SES through SNS) authenticate
//! each request, map its payload to [`Event`]s with a [`Source`] of their own and call
//! [`Feedback::record`]; the key leaves the source out, so a DSN and a webhook for one bounce make
//! one event.
//!
//! The sandbox ([`sandbox`], `SMTP_SANDBOX`) hands no message to a relay; its simulator
//! addresses make [`Event`]s with the source `sandbox`, recorded through [`Feedback::record`]
//! once their letter's outcome is stored.
//!
//! The reputation brake ([`brake`]) counts the hard bounces and complaints noted on the last
//! letters sent and pauses sending when a rate crosses its limit.

pub mod brake;
pub mod listener;
pub mod report;
pub mod return_path;
pub mod sandbox;
pub mod webhooks;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use base64::Engine as _;
use mongodb::bson::oid::ObjectId;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::{
    address::Recipient,
    deliverability::suppression::Suppressions,
    kafka::StatusProducer,
    metrics::Metrics,
    model::{FeedbackNote, Letter},
};

use self::{
    report::{Action, Body, RecipientStatus, Report},
    return_path::ReturnPath,
};
use crate::store::{FeedbackClaim as Claim, FeedbackStore};

/// The suppression reason of a complaint (a hard bounce's is `suppression::HARD_BOUNCE`).
pub const COMPLAINT: &str = "complaint";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The address does not exist or is disabled: suppressed.
    HardBounce,
    /// Any other failure (mailbox full, policy, a relay that gave up): not suppressed.
    SoftBounce,
    /// The recipient reported the letter as spam: suppressed.
    Complaint,
    /// Not delivered yet; the reporting MTA keeps trying.
    Delay,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::HardBounce => "hard_bounce",
            Kind::SoftBounce => "soft_bounce",
            Kind::Complaint => "complaint",
            Kind::Delay => "delay",
        }
    }

    fn suppresses(self) -> Option<&'static str> {
        match self {
            Kind::HardBounce => Some(crate::deliverability::suppression::HARD_BOUNCE),
            Kind::Complaint => Some(COMPLAINT),
            Kind::SoftBounce | Kind::Delay => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Dsn,
    Arf,
    Mailgun,
    Sendgrid,
    Postmark,
    Ses,
    /// The sandbox's simulator addresses (`SMTP_SANDBOX`).
    Sandbox,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Dsn => "dsn",
            Source::Arf => "arf",
            Source::Mailgun => "mailgun",
            Source::Sendgrid => "sendgrid",
            Source::Postmark => "postmark",
            Source::Ses => "ses",
            Source::Sandbox => "sandbox",
        }
    }
}

/// One bounce, complaint or delay of one recipient of one letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub letter: ObjectId,
    /// As the report wrote it.
    pub address: String,
    pub kind: Kind,
    /// The enhanced status code (`5.1.1`).
    pub status: Option<String>,
    pub diagnostic: Option<String>,
    pub source: Source,
    /// ARF's `Feedback-Type`.
    pub feedback_type: Option<String>,
}

impl Event {
    /// The event's identity: its letter, its recipient (canonical form) and its kind. The status
    /// and text are left out, as two reports of one bounce word them differently.
    pub fn key(&self) -> String {
        let address = Recipient::parse(&self.address).map(|r| r.key()).unwrap_or_else(|_| self.address.to_lowercase());
        let mut hash = Sha256::new();
        for part in [self.letter.to_hex().as_str(), address.as_str(), self.kind.as_str()] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash.finalize())
    }
}

/// What a DSN's recipient group means, if anything: `failed` with a status saying the address
/// is bad (RFC 3463's 5.1.x, or 5.2.1 "mailbox disabled") is a hard bounce; any other `failed`
/// (mailbox full, policy, a relay's queue lifetime) a soft one, since suppressing on those would
/// drop addresses that work; `delayed` a delay; `delivered`, `relayed` and `expanded` nothing.
pub fn classify(recipient: &RecipientStatus) -> Option<Kind> {
    match recipient.action {
        Action::Failed => {
            // The status field, or failing that the enhanced code a diagnostic starts with.
            let status = recipient.status.clone().or_else(|| {
                recipient
                    .diagnostic
                    .as_deref()
                    .and_then(|d| d.split_whitespace().nth(1))
                    .filter(|s| report::is_enhanced_status(s))
                    .map(str::to_owned)
            });
            let hard = status.is_some_and(|s| s.starts_with("5.1.") || s == "5.2.1");
            Some(if hard { Kind::HardBounce } else { Kind::SoftBounce })
        }
        Action::Delayed => Some(Kind::Delay),
        Action::Delivered | Action::Relayed | Action::Expanded => None,
    }
}

/// The events of a report about `letter`.
pub fn events(letter: ObjectId, report: &Report) -> Vec<Event> {
    match &report.body {
        Body::Delivery(recipients) => recipients
            .iter()
            .filter_map(|r| {
                Some(Event {
                    letter,
                    address: r.recipient.clone(),
                    kind: classify(r)?,
                    status: r.status.clone(),
                    diagnostic: r.diagnostic.clone(),
                    source: Source::Dsn,
                    feedback_type: None,
                })
            })
            .collect(),
        // RFC 5965's `not-spam` takes a complaint back, and `auth-failure` (RFC 6591) is a
        // DMARC report, not a person's complaint.
        Body::Feedback(feedback) if matches!(feedback.feedback_type.as_str(), "not-spam" | "auth-failure") => {
            Vec::new()
        }
        Body::Feedback(feedback) => feedback
            .recipients
            .iter()
            .map(|address| Event {
                letter,
                address: address.clone(),
                kind: Kind::Complaint,
                status: None,
                diagnostic: None,
                source: Source::Arf,
                feedback_type: Some(feedback.feedback_type.clone()),
            })
            .collect(),
    }
}

/// The letter a feedback-loop report (mailed to `FEEDBACK_LOOP_ADDRESS`, not to a return
/// path) is about: the embedded message's return path when it is one of ours and its signature
/// holds, else its Message-ID, which we write as `<letter id@domain>`.
pub fn letter_of(report: &Report, return_paths: &ReturnPath) -> Option<ObjectId> {
    if let Some(id) = report.original.return_path.as_deref().and_then(|p| return_paths.verify(p).ok()) {
        return Some(id);
    }
    let id = report.original.message_id.as_deref()?.trim_matches(['<', '>']).split('@').next()?;
    ObjectId::parse_str(id).ok()
}

/// What the profile service receives on `KAFKA_TOPIC_FEEDBACK`, named as the `unsubscribed`
/// event and the status messages name their fields.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Published<'a> {
    /// `hard_bounce`, `soft_bounce`, `complaint` or `delay`.
    pub event: &'static str,
    pub address: &'a str,
    pub token: &'a str,
    #[serde(rename = "LetterID")]
    pub letter_id: String,
    pub kafka_key: &'a str,
    /// The enhanced status code, e.g. `5.1.1`.
    pub status: Option<&'a str>,
    pub diagnostic: Option<&'a str>,
    /// `dsn`, `arf`, the relay whose webhook reported it (`mailgun`, `sendgrid`, `postmark`,
    /// `ses`), or `sandbox` for the simulator addresses of `SMTP_SANDBOX`.
    pub source: &'static str,
    /// ARF's `Feedback-Type` (`abuse`, …).
    pub feedback_type: Option<&'a str>,
    /// RFC 3339, UTC: when this service received the report.
    pub time: String,
    /// The mailing's `Metadata`, unchanged (issue 19).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: &'a std::collections::BTreeMap<String, String>,
}

/// What became of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    New,
    Duplicate,
    /// Its recipient is not one of the letter's: ignored, as the report cannot be trusted
    /// to suppress an address we never sent to.
    ForeignRecipient,
}

/// Why a report could not be taken now; the listener answers 451 so the sender tries again.
#[derive(Debug, thiserror::Error)]
pub enum TryLater {
    #[error("another delivery of this report is publishing its event")]
    InFlight,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Turns reports into recorded events; shared by the listener's connections.
pub struct Feedback {
    pub store: FeedbackStore,
    pub suppressions: Suppressions,
    pub producer: StatusProducer,
    pub topic: String,
    pub metrics: Arc<Metrics>,
}

impl Feedback {
    /// Records one event of `letter`: suppression, the note on the letter, the publication, in
    /// that order, each idempotent, so a retry after any failure finishes the job once.
    pub async fn record(&self, letter: &Letter, event: &Event) -> Result<Recorded, TryLater> {
        let Some(address) = letter.addresses.iter().find(|a| same_address(a, &event.address)) else {
            tracing::warn!(letter_id = %letter.id, address = %event.address, kind = event.kind.as_str(), "feedback for an address the letter was not sent to; ignored");
            return Ok(Recorded::ForeignRecipient);
        };
        let key = event.key();
        let what = mongodb::bson::doc! {
            "letter_id": letter.id, "address": address, "kind": event.kind.as_str(), "source": event.source.as_str(),
        };
        let claim_ms = match self.store.claim(&key, what).await? {
            Claim::Ours(claim_ms) => claim_ms,
            Claim::Published => {
                self.metrics.feedback_duplicates.inc();
                tracing::info!(letter_id = %letter.id, address = %address, kind = event.kind.as_str(), "feedback event reported again; already recorded");
                return Ok(Recorded::Duplicate);
            }
            Claim::InFlight => return Err(TryLater::InFlight),
        };
        let result = self.publish(letter, address, event, &key).await;
        self.store.settle(&key, claim_ms, result.is_ok()).await?;
        result?;
        self.metrics.feedback_event(event.kind.as_str(), event.source.as_str());
        tracing::info!(letter_id = %letter.id, address = %address, kind = event.kind.as_str(), status = event.status.as_deref().unwrap_or(""), source = event.source.as_str(), "feedback event");
        Ok(Recorded::New)
    }

    async fn publish(&self, letter: &Letter, address: &str, event: &Event, key: &str) -> anyhow::Result<()> {
        if let Some(reason) = event.kind.suppresses()
            && let Ok(recipient) = Recipient::parse(address)
        {
            self.suppressions.add(&recipient, reason, event.source.as_str()).await?;
        }
        let note = FeedbackNote {
            address: address.to_owned(),
            event: event.kind.as_str().to_owned(),
            status: event.status.clone(),
            diagnostic: event.diagnostic.clone(),
            source: event.source.as_str().to_owned(),
            time_ms: self.store.now_ms(),
            key: key.to_owned(),
        };
        self.store.note(letter.id, &note).await?;
        let payload = serde_json::to_vec(&Published {
            event: event.kind.as_str(),
            letter_id: letter.id.to_hex(),
            kafka_key: &letter.kafkakey,
            token: &letter.token,
            address,
            status: event.status.as_deref(),
            diagnostic: event.diagnostic.as_deref(),
            source: event.source.as_str(),
            feedback_type: event.feedback_type.as_deref(),
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            metadata: &letter.metadata,
        })
        .context("encoding a feedback event")?;
        tokio::time::timeout(
            PUBLISH_WAIT,
            self.producer.send(&self.topic, letter.key_bytes().as_deref(), &payload, None),
        )
        .await
        .context("the feedback topic did not acknowledge in time")?
        .with_context(|| format!("publishing to {}", self.topic))?;
        Ok(())
    }

    /// Keeps a message that yields no event, counted.
    pub async fn keep(
        &self,
        raw: &[u8],
        reason: &str,
        rcpt: &[String],
        letter: Option<ObjectId>,
    ) -> anyhow::Result<()> {
        let id = self.store.keep_unparsed(raw, reason, rcpt, letter).await?;
        self.metrics.feedback_unparsed.inc();
        tracing::warn!(kept = %id, reason, letter_id = letter.map(|l| l.to_hex()).unwrap_or_default(), bytes = raw.len(), "feedback report kept unparsed");
        Ok(())
    }

    /// Handles one message received for `letter` (or, with `None`, for the feedback-loop
    /// address). `Ok` means the message is recorded (as events or kept unparsed) and may be
    /// answered 250.
    pub async fn take(
        &self,
        raw: &[u8],
        letter: Option<ObjectId>,
        return_paths: &ReturnPath,
        rcpt: &[String],
    ) -> Result<Vec<Recorded>, TryLater> {
        let report = match report::parse(raw) {
            Ok(report) => report,
            Err(error) => {
                self.keep(raw, &error.to_string(), rcpt, letter).await?;
                return Ok(Vec::new());
            }
        };
        let Some(id) = letter.or_else(|| letter_of(&report, return_paths)) else {
            self.keep(raw, "the report names no letter of ours", rcpt, None).await?;
            return Ok(Vec::new());
        };
        let Some(stored) = self.store.letter(id).await? else {
            self.keep(raw, "unknown letter", rcpt, Some(id)).await?;
            return Ok(Vec::new());
        };
        let events = events(id, &report);
        let mut recorded = Vec::with_capacity(events.len());
        for event in &events {
            recorded.push(self.record(&stored, event).await?);
        }
        if !recorded.contains(&Recorded::New) && !recorded.contains(&Recorded::Duplicate) && !events.is_empty() {
            self.keep(raw, "the report names no recipient of its letter", rcpt, Some(id)).await?;
        }
        Ok(recorded)
    }
}

/// How long recording an event waits for the broker: an MTA waits minutes for its reply to the
/// final dot, but a stalled broker must not hold connections past that.
const PUBLISH_WAIT: Duration = Duration::from_secs(30);

fn same_address(a: &str, b: &str) -> bool {
    let key = |raw: &str| Recipient::parse(raw).map(|r| r.key()).unwrap_or_else(|_| raw.trim().to_lowercase());
    key(a) == key(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(action: Action, status: Option<&str>, diagnostic: Option<&str>) -> RecipientStatus {
        RecipientStatus {
            recipient: "a@example.org".into(),
            action,
            status: status.map(Into::into),
            diagnostic: diagnostic.map(Into::into),
            remote_mta: None,
        }
    }

    #[test]
    fn only_a_dead_address_is_a_hard_bounce() {
        assert_eq!(classify(&status(Action::Failed, Some("5.1.1"), None)), Some(Kind::HardBounce));
        assert_eq!(classify(&status(Action::Failed, Some("5.2.1"), None)), Some(Kind::HardBounce));
        assert_eq!(
            classify(&status(Action::Failed, None, Some("550 5.1.10 RESOLVER.ADR.RecipientNotFound"))),
            Some(Kind::HardBounce)
        );
        assert_eq!(classify(&status(Action::Failed, Some("5.7.1"), None)), Some(Kind::SoftBounce), "policy");
        assert_eq!(classify(&status(Action::Failed, Some("5.2.2"), None)), Some(Kind::SoftBounce), "mailbox full");
        assert_eq!(classify(&status(Action::Failed, Some("4.4.1"), None)), Some(Kind::SoftBounce), "gave up");
        assert_eq!(classify(&status(Action::Failed, None, None)), Some(Kind::SoftBounce));
        assert_eq!(classify(&status(Action::Delayed, Some("4.2.2"), None)), Some(Kind::Delay));
        assert_eq!(classify(&status(Action::Delivered, Some("2.0.0"), None)), None);
        assert_eq!(classify(&status(Action::Relayed, None, None)), None);
    }

    #[test]
    fn one_key_per_letter_recipient_and_kind() {
        let letter = ObjectId::new();
        let event = |address: &str, kind: Kind, status: &str| Event {
            letter,
            address: address.into(),
            kind,
            status: Some(status.into()),
            diagnostic: None,
            source: Source::Dsn,
            feedback_type: None,
        };
        let key = event("Nobody@Example.org", Kind::HardBounce, "5.1.1").key();
        assert_eq!(
            key,
            event("nobody@example.org", Kind::HardBounce, "5.1.10").key(),
            "the same bounce, worded otherwise"
        );
        assert_ne!(key, event("nobody@example.org", Kind::Delay, "4.4.1").key());
        assert_ne!(key, event("other@example.org", Kind::HardBounce, "5.1.1").key());
        assert_ne!(
            key,
            Event { letter: ObjectId::new(), ..event("nobody@example.org", Kind::HardBounce, "5.1.1") }.key()
        );
    }

    #[test]
    fn a_feedback_loop_report_finds_its_letter() {
        let paths =
            ReturnPath::new("bounces", "bounce.example.com", &"a-bounce-secret-of-32-characters".to_owned().into());
        let id = ObjectId::new();
        let report = |return_path: Option<String>, message_id: Option<String>| Report {
            body: Body::Feedback(report::FeedbackReport {
                feedback_type: "abuse".into(),
                recipients: vec!["a@example.org".into()],
                user_agent: None,
            }),
            original: report::Original { message_id, return_path },
        };
        assert_eq!(letter_of(&report(Some(paths.address(&id)), None), &paths), Some(id));
        assert_eq!(letter_of(&report(None, Some(format!("{}@example.com", id.to_hex()))), &paths), Some(id));
        assert_eq!(
            letter_of(&report(Some("someone@example.net".into()), Some("8787KJ.mail@example.net".into())), &paths),
            None
        );
        let complaint = events(id, &report(None, None));
        assert_eq!(complaint.len(), 1);
        assert_eq!((complaint[0].kind, complaint[0].source), (Kind::Complaint, Source::Arf));
        let mut not_spam = report(None, None);
        if let Body::Feedback(f) = &mut not_spam.body {
            f.feedback_type = "not-spam".into();
        }
        assert!(events(id, &not_spam).is_empty());
    }
}
