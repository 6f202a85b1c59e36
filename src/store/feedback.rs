//! Every MongoDB operation of the feedback loop:
//! - `<MONGODB_COLLECTION>_feedback`: one document per event (`_id` its key; its letter, address,
//!   kind and source), written before the event is published and marked published after the
//!   broker's acknowledgement, so a repeated report (an MTA retrying after a lost 250, a DSN and
//!   later a webhook for the same bounce) publishes nothing new, and a publication that failed is
//!   taken over by the retry;
//! - the letter: the event's [`FeedbackNote`] in its `feedback` document, under the event's key;
//! - `<MONGODB_COLLECTION>_feedback_unparsed`: the messages the listener took but could not use
//!   (not a report, cut off, an unknown letter), kept whole with the reason.

use std::time::Duration;

use anyhow::Context as _;
use mongodb::{
    Collection,
    bson::{Binary, Document, doc, oid::ObjectId, spec::BinarySubtype},
};

use super::{Store, is_duplicate};
use crate::model::{FeedbackNote, Letter};

#[derive(Clone)]
pub struct FeedbackStore {
    store: Store,
    letters: Collection<Document>,
    events: Collection<Document>,
    unparsed: Collection<Document>,
    /// How long a claim on an event holds before another delivery of the same report may take
    /// it over: longer than the producer can take to deliver or fail (`KAFKA_MESSAGE_TIMEOUT`).
    publish_lease: Duration,
}

/// Who publishes an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This caller, with its claim time (which its outcome update matches).
    Ours(i64),
    /// Published before: a duplicate.
    Published,
    /// Another connection is publishing it now.
    InFlight,
}

impl FeedbackStore {
    /// The time by the process's one clock.
    pub fn now_ms(&self) -> i64 {
        self.store.now_ms()
    }

    pub(super) fn new(store: &Store, publish_lease: Duration) -> FeedbackStore {
        FeedbackStore {
            store: store.clone(),
            letters: store.db.collection(store.letters.name()),
            events: store.collection("feedback"),
            unparsed: store.collection("feedback_unparsed"),
            publish_lease,
        }
    }

    /// The letter without its body, or `None` when there is none (never sent by this
    /// deployment, or deleted past `LETTER_RETENTION`).
    pub async fn letter(&self, id: ObjectId) -> anyhow::Result<Option<Letter>> {
        self.store.count("find", 1);
        let found = self
            .letters
            .find_one(doc! { "_id": id })
            .projection(doc! { "body": 0 })
            .await
            .context("reading a letter for its feedback")?;
        let Some(mut document) = found else { return Ok(None) };
        document.insert("body", "");
        Ok(Some(mongodb::bson::from_document(document).context("reading a letter for its feedback")?))
    }

    /// Records the event's key (the first report inserts it), or takes over one whose publisher
    /// failed or died.
    /// `what` describes the event (its letter, address, kind and source), stored beside the key
    /// so the events can be counted by kind over time.
    pub async fn claim(&self, key: &str, what: Document) -> anyhow::Result<Claim> {
        let now = self.store.now_ms();
        let mut record = doc! { "_id": key, "published": 0, "claim_ms": now, "time_ms": now };
        record.extend(what);
        self.store.count("insert", 1);
        match self.events.insert_one(record).await {
            Ok(_) => return Ok(Claim::Ours(now)),
            Err(error) if !is_duplicate(&error) => return Err(error).context("recording a feedback event"),
            Err(_) => {}
        }
        let lease_ms = i64::try_from(self.publish_lease.as_millis()).unwrap_or(i64::MAX);
        let stale = doc! { "_id": key, "published": 0, "claim_ms": { "$lt": now.saturating_sub(lease_ms) } };
        self.store.count("findAndModify", 1);
        if self
            .events
            .find_one_and_update(stale, doc! { "$set": { "claim_ms": now } })
            .await
            .context("taking over a feedback event")?
            .is_some()
        {
            return Ok(Claim::Ours(now));
        }
        self.store.count("find", 1);
        let published = self
            .events
            .find_one(doc! { "_id": key })
            .await
            .context("reading a feedback event")?
            // An integer: the MongoDB-wire server in use turns booleans into integers anyway.
            .is_some_and(|d| {
                matches!(d.get_i32("published").map(i64::from).or_else(|_| d.get_i64("published")), Ok(1))
            });
        Ok(if published { Claim::Published } else { Claim::InFlight })
    }

    /// The outcome of a claimed event's publication: published, or free for the next delivery.
    pub async fn settle(&self, key: &str, claim_ms: i64, published: bool) -> anyhow::Result<()> {
        let update = if published {
            doc! { "$set": { "published": 1, "published_ms": self.store.now_ms() } }
        } else {
            doc! { "$set": { "claim_ms": 0_i64 } }
        };
        self.store.count("update", 1);
        self.events
            .update_one(doc! { "_id": key, "claim_ms": claim_ms }, update)
            .await
            .context("recording whether a feedback event was published")?;
        Ok(())
    }

    /// Adds the event to its letter: under its key, so a second delivery writes the same entry
    /// again rather than a second one (and needs no query on the array).
    pub async fn note(&self, letter: ObjectId, note: &FeedbackNote) -> anyhow::Result<()> {
        let entry = mongodb::bson::to_document(note).context("encoding a feedback note")?;
        // Keys are URL-safe base64: no `.` or `$`, so each is a plain field name.
        self.store.count("update", 1);
        self.letters
            .update_one(doc! { "_id": letter }, doc! { "$set": { format!("feedback.{}", note.key): entry } })
            .await
            .context("adding feedback to its letter")?;
        Ok(())
    }

    /// Keeps a message the listener took but could not use, whole, with why.
    pub async fn keep_unparsed(
        &self,
        raw: &[u8],
        reason: &str,
        rcpt: &[String],
        letter: Option<ObjectId>,
    ) -> anyhow::Result<ObjectId> {
        let id = ObjectId::new();
        let mut document = doc! {
            "_id": id,
            "reason": reason,
            "rcpt": rcpt,
            "size": i64::try_from(raw.len()).unwrap_or(i64::MAX),
            "raw": Binary { subtype: BinarySubtype::Generic, bytes: raw.to_vec() },
            "time_ms": self.store.now_ms(),
        };
        if let Some(letter) = letter {
            document.insert("letter_id", letter);
        }
        self.store.count("insert", 1);
        self.unparsed.insert_one(document).await.context("keeping an unparsed report")?;
        Ok(id)
    }
}
