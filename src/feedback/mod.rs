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

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::Context as _;
use base64::Engine as _;
use mongodb::bson::oid::ObjectId;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot;

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

/// One event being recorded by [`Feedback::record_all`].
struct Claimed<'a> {
    /// Its place among the events recorded together.
    index: usize,
    letter: &'a Letter,
    event: &'a Event,
    /// The recipient as the letter has it.
    address: &'a str,
    key: String,
    claim_ms: i64,
}

impl Feedback {
    /// Records one event of `letter`; see [`Feedback::record_all`].
    pub async fn record(&self, letter: &Letter, event: &Event) -> Result<Recorded, TryLater> {
        self.record_all(&[(letter, event)])
            .await
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(TryLater::Failed(anyhow::anyhow!("recording a feedback event gave no outcome"))))
    }

    /// Records events, each of its letter, and says what became of each, in order. Each step is
    /// one round trip for all of them, so a batch of reports costs what one does: the events'
    /// keys claimed (one insert: a repeated report's key is a duplicate), then the suppressions
    /// and the notes on the letters (two writes at once), then the publications (all in flight
    /// together, acknowledged by the broker), then the claims settled (one update). Every step is
    /// idempotent and an event is marked published only once its suppression, note and
    /// publication all held, so a retry after any failure finishes the job once; an event is
    /// published only after it is stored, so the profile service never hears of one that
    /// `GET /letters/{id}` does not show.
    pub async fn record_all(&self, items: &[(&Letter, &Event)]) -> Vec<Result<Recorded, TryLater>> {
        let mut outcomes: Vec<Option<Result<Recorded, TryLater>>> = items.iter().map(|_| None).collect();
        // The first item of each key claims it; a repeat within the batch (an MTA's retry that
        // overtook its first delivery) shares the outcome of the first, as a duplicate.
        let mut first_of: HashMap<String, usize> = HashMap::new();
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        let mut wanted: Vec<(usize, &Letter, &Event, &str, String)> = Vec::new();
        for (index, &(letter, event)) in items.iter().enumerate() {
            let Some(address) = letter.addresses.iter().find(|a| same_address(a, &event.address)) else {
                tracing::warn!(letter_id = %letter.id, address = %event.address, kind = event.kind.as_str(), "feedback for an address the letter was not sent to; ignored");
                outcomes[index] = Some(Ok(Recorded::ForeignRecipient));
                continue;
            };
            let key = event.key();
            if let Some(&first) = first_of.get(&key) {
                repeats.push((index, first));
                continue;
            }
            first_of.insert(key.clone(), index);
            wanted.push((index, letter, event, address.as_str(), key));
        }

        let records = wanted
            .iter()
            .map(|(_, letter, event, address, key)| {
                let what = mongodb::bson::doc! {
                    "letter_id": letter.id, "address": *address, "kind": event.kind.as_str(), "source": event.source.as_str(),
                };
                (key.clone(), what)
            })
            .collect();
        let claims = match self.store.claim_many(records).await {
            Ok(claims) => claims,
            Err(error) => {
                let error = format!("{error:#}");
                wanted.iter().map(|_| Err(anyhow::anyhow!("{error}"))).collect()
            }
        };
        let mut claimed: Vec<Claimed> = Vec::new();
        for ((index, letter, event, address, key), claim) in wanted.into_iter().zip(claims) {
            match claim {
                Ok(Claim::Ours(claim_ms)) => claimed.push(Claimed { index, letter, event, address, key, claim_ms }),
                Ok(Claim::Published) => {
                    self.metrics.feedback_duplicates.inc();
                    tracing::info!(letter_id = %letter.id, address = %address, kind = event.kind.as_str(), "feedback event reported again; already recorded");
                    outcomes[index] = Some(Ok(Recorded::Duplicate));
                }
                Ok(Claim::InFlight) => outcomes[index] = Some(Err(TryLater::InFlight)),
                Err(error) => outcomes[index] = Some(Err(TryLater::Failed(error))),
            }
        }

        let results = self.store_and_publish(&claimed).await;
        let published: Vec<String> =
            claimed.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|(c, _)| c.key.clone()).collect();
        let settled = self.store.settle_published(&published).await.map_err(|e| format!("{e:#}"));
        for (claim, result) in claimed.iter().zip(results) {
            let outcome = match (result, &settled) {
                (Ok(()), Ok(())) => {
                    let event = claim.event;
                    self.metrics.feedback_event(event.kind.as_str(), event.source.as_str());
                    tracing::info!(letter_id = %claim.letter.id, address = %claim.address, kind = event.kind.as_str(), status = event.status.as_deref().unwrap_or(""), source = event.source.as_str(), "feedback event");
                    Ok(Recorded::New)
                }
                (Ok(()), Err(error)) => Err(TryLater::Failed(anyhow::anyhow!("{error}"))),
                (Err(error), _) => {
                    // Free for the next delivery at once rather than after the publish lease.
                    if let Err(release) = self.store.settle(&claim.key, claim.claim_ms, false).await {
                        tracing::warn!(
                            error = format!("{release:#}"),
                            "releasing a feedback event's claim failed; the next delivery takes it over after the lease"
                        );
                    }
                    Err(TryLater::Failed(error))
                }
            };
            outcomes[claim.index] = Some(outcome);
        }
        for (index, first) in repeats {
            let outcome = match &outcomes[first] {
                Some(Ok(Recorded::New | Recorded::Duplicate)) => {
                    self.metrics.feedback_duplicates.inc();
                    Ok(Recorded::Duplicate)
                }
                Some(Ok(Recorded::ForeignRecipient)) => Ok(Recorded::ForeignRecipient),
                Some(Err(TryLater::InFlight)) | None => Err(TryLater::InFlight),
                Some(Err(TryLater::Failed(error))) => Err(TryLater::Failed(anyhow::anyhow!("{error:#}"))),
            };
            outcomes[index] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(TryLater::Failed(anyhow::anyhow!("a feedback event was not recorded")))))
            .collect()
    }

    /// The suppressions and the notes of the claimed events (two writes, at once: they are
    /// independent), then, once both hold, their publications, all in flight together. One
    /// result per event.
    async fn store_and_publish(&self, claimed: &[Claimed<'_>]) -> Vec<anyhow::Result<()>> {
        if claimed.is_empty() {
            return Vec::new();
        }
        let suppress: Vec<(Recipient, &str, &str)> = claimed
            .iter()
            .filter_map(|c| {
                let reason = c.event.kind.suppresses()?;
                Some((Recipient::parse(c.address).ok()?, reason, c.event.source.as_str()))
            })
            .collect();
        let now_ms = self.store.now_ms();
        let notes: Vec<(ObjectId, FeedbackNote)> = claimed
            .iter()
            .map(|c| {
                let note = FeedbackNote {
                    address: c.address.to_owned(),
                    event: c.event.kind.as_str().to_owned(),
                    status: c.event.status.clone(),
                    diagnostic: c.event.diagnostic.clone(),
                    source: c.event.source.as_str().to_owned(),
                    time_ms: now_ms,
                    key: c.key.clone(),
                };
                (c.letter.id, note)
            })
            .collect();
        let (suppressed, noted) = tokio::join!(self.suppressions.add_many(&suppress), self.store.note_many(&notes));
        if let Err(error) = suppressed.and(noted) {
            let error = format!("{error:#}");
            return claimed.iter().map(|_| Err(anyhow::anyhow!("{error}"))).collect();
        }
        futures::future::join_all(claimed.iter().map(|c| self.publish(c.letter, c.address, c.event))).await
    }

    async fn publish(&self, letter: &Letter, address: &str, event: &Event) -> anyhow::Result<()> {
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

    /// Records the reports of one batch: their letters read in one query, then their events
    /// through [`Feedback::record_all`]. Each job hears `None` when its letter is not stored.
    async fn record_jobs(&self, jobs: Vec<Job>) {
        let mut ids: Vec<ObjectId> = jobs.iter().map(|job| job.letter).collect();
        ids.sort();
        ids.dedup();
        let letters = match self.store.letters(&ids).await {
            Ok(letters) => letters,
            Err(error) => {
                let error = format!("{error:#}");
                for job in jobs {
                    let _ = job.done.send(Err(TryLater::Failed(anyhow::anyhow!("{error}"))));
                }
                return;
            }
        };
        let items: Vec<(&Letter, &Event)> = jobs
            .iter()
            .filter_map(|job| Some((letters.get(&job.letter)?, &job.events)))
            .flat_map(|(letter, events)| events.iter().map(move |event| (letter, event)))
            .collect();
        let mut outcomes = self.record_all(&items).await.into_iter();
        for job in jobs {
            if !letters.contains_key(&job.letter) {
                let _ = job.done.send(Ok(None));
                continue;
            }
            let mut recorded = Vec::with_capacity(job.events.len());
            let mut failure = None;
            for _ in &job.events {
                match outcomes.next() {
                    Some(Ok(outcome)) => recorded.push(outcome),
                    Some(Err(error)) => {
                        failure.get_or_insert(error);
                    }
                    None => {
                        failure.get_or_insert(TryLater::Failed(anyhow::anyhow!("a feedback event was not recorded")));
                    }
                }
            }
            // The connection may have gone; its MTA delivers the report again.
            let _ = job.done.send(failure.map_or(Ok(Some(recorded)), Err));
        }
    }
}

/// Reports of one letter waiting to be recorded with others.
struct Job {
    letter: ObjectId,
    events: Vec<Event>,
    /// `None` when the letter is not stored.
    done: oneshot::Sender<Result<Option<Vec<Recorded>>, TryLater>>,
}

/// Events in one batch at most (a batch is one `insert` and a few multi-statement updates).
const BATCH_EVENTS: usize = 256;
/// Batches recorded at once: while one waits for MongoDB or the broker, the next gathers.
const RECORDERS: usize = 2;

/// Records the reports of the listener's connections in batches: whatever arrived while the
/// previous batch was being recorded goes together, so concurrent reports share their round
/// trips (five for a batch, as for one report) instead of queueing behind each other's, and a
/// lone report waits for nothing. Each connection still answers only once its own events are
/// stored and published.
#[derive(Clone)]
pub struct Recorder {
    feedback: Arc<Feedback>,
    jobs: async_channel::Sender<Job>,
}

impl Recorder {
    /// Starts the recording tasks; they end once every `Recorder` is dropped.
    pub fn start(feedback: Arc<Feedback>) -> Recorder {
        let (jobs, queue) = async_channel::bounded::<Job>(BATCH_EVENTS);
        for _ in 0..RECORDERS {
            let (feedback, queue) = (feedback.clone(), queue.clone());
            tokio::spawn(async move {
                while let Ok(first) = queue.recv().await {
                    let mut events = first.events.len();
                    let mut batch = vec![first];
                    while events < BATCH_EVENTS
                        && let Ok(job) = queue.try_recv()
                    {
                        events += job.events.len();
                        batch.push(job);
                    }
                    feedback.record_jobs(batch).await;
                }
            });
        }
        Recorder { feedback, jobs }
    }

    pub fn feedback(&self) -> &Feedback {
        &self.feedback
    }

    /// Records `events` of `letter` with whatever else is being recorded; `None` when the letter
    /// is not stored.
    async fn record(&self, letter: ObjectId, events: Vec<Event>) -> Result<Option<Vec<Recorded>>, TryLater> {
        let stopped = || TryLater::Failed(anyhow::anyhow!("the feedback recorder has stopped"));
        let (done, outcome) = oneshot::channel();
        self.jobs.send(Job { letter, events, done }).await.map_err(|_| stopped())?;
        outcome.await.unwrap_or_else(|_| Err(stopped()))
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
        let feedback = &self.feedback;
        let report = match report::parse(raw) {
            Ok(report) => report,
            Err(error) => {
                feedback.keep(raw, &error.to_string(), rcpt, letter).await?;
                return Ok(Vec::new());
            }
        };
        let Some(id) = letter.or_else(|| letter_of(&report, return_paths)) else {
            feedback.keep(raw, "the report names no letter of ours", rcpt, None).await?;
            return Ok(Vec::new());
        };
        let events = events(id, &report);
        let some = !events.is_empty();
        let Some(recorded) = self.record(id, events).await? else {
            feedback.keep(raw, "unknown letter", rcpt, Some(id)).await?;
            return Ok(Vec::new());
        };
        if some && !recorded.contains(&Recorded::New) && !recorded.contains(&Recorded::Duplicate) {
            feedback.keep(raw, "the report names no recipient of its letter", rcpt, Some(id)).await?;
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
