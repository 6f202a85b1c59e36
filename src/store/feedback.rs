//! Every MongoDB operation of the feedback loop:
//! - `<MONGODB_COLLECTION>_feedback`: one document per event (`_id` its key; its letter, address,
//!   kind and source), written before the event is published and marked published after the
//!   broker's acknowledgement, so a repeated report (an MTA retrying after a lost 250, a DSN and
//!   later a webhook for the same bounce) publishes nothing new, and a publication that failed is
//!   taken over by the retry;
//! - the letter: the event's [`FeedbackNote`] in its `feedback` document, under the event's key;
//! - `<MONGODB_COLLECTION>_feedback_unparsed`: the messages the listener took but could not use
//!   (not a report, cut off, an unknown letter), kept whole with the reason;
//! - the reputation brake's window ([`FeedbackStore::brake_window`]): the last letters sent, with
//!   their hard-bounced and complained-about recipients, counted in one aggregation.

use std::{collections::HashMap, time::Duration};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use mongodb::{
    Collection,
    bson::{Binary, Bson, Document, RawDocumentBuf, doc, oid::ObjectId, spec::BinarySubtype},
    error::ErrorKind,
};

use super::{DUPLICATE_KEY, Store};
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

/// The letters' fields that list, per kind the brake counts, the recipients reported: beside the
/// `feedback` notes because the notes' keys are per event and an aggregation cannot count the
/// fields of a subdocument on the Mongo-wire server we test on (no `$objectToArray`), while it
/// can sum the sizes of arrays.
pub const HARD_BOUNCED: &str = "hard_bounced";
pub const COMPLAINED: &str = "complained";

/// The letters in the reputation brake's window and what was reported about them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrakeWindow {
    pub letters: u64,
    /// Recipients the relay accepted.
    pub recipients: u64,
    /// Recipients reported hard-bounced.
    pub hard_bounces: u64,
    /// Recipients who complained.
    pub complaints: u64,
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

    /// The letter without its body, or `None` when there is none.
    pub async fn letter(&self, id: ObjectId) -> anyhow::Result<Option<Letter>> {
        Ok(self.letters(&[id]).await?.remove(&id))
    }

    /// The letters of `ids` without their bodies, in one query; a letter not stored (never sent
    /// by this deployment, or deleted past `LETTER_RETENTION`) is missing from the map.
    pub async fn letters(&self, ids: &[ObjectId]) -> anyhow::Result<HashMap<ObjectId, Letter>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        self.store.count("find", 1);
        let documents: Vec<Document> = self
            .letters
            .find(doc! { "_id": { "$in": ids } })
            .projection(doc! { "body": 0 })
            .await
            .context("reading letters for their feedback")?
            .try_collect()
            .await
            .context("reading letters for their feedback")?;
        let mut letters = HashMap::with_capacity(documents.len());
        for mut document in documents {
            document.insert("body", "");
            let letter: Letter = mongodb::bson::from_document(document).context("reading a letter for its feedback")?;
            letters.insert(letter.id, letter);
        }
        Ok(letters)
    }

    /// Records each event's key (the first report of an event inserts it), all in one insert, or
    /// takes over one whose publisher failed or died (a round trip or two more, for that event
    /// alone). `what` describes each event (its letter, address, kind and source), stored beside
    /// the key so the events can be counted by kind over time. One outcome per event, in order.
    pub async fn claim_many(&self, events: Vec<(String, Document)>) -> anyhow::Result<Vec<anyhow::Result<Claim>>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.store.now_ms();
        let keys: Vec<String> = events.iter().map(|(key, _)| key.clone()).collect();
        let records = events.into_iter().map(|(key, what)| {
            let mut record = doc! { "_id": key, "published": 0, "claim_ms": now, "time_ms": now };
            record.extend(what);
            record
        });
        self.store.count("insert", 1);
        let taken: Vec<usize> = match self.events.insert_many(records).ordered(false).await {
            Ok(_) => Vec::new(),
            Err(error) => {
                // Each key already recorded is a repeated report: looked at alone below.
                let duplicates = match error.kind.as_ref() {
                    ErrorKind::InsertMany(failure) if failure.write_concern_error.is_none() => failure
                        .write_errors
                        .as_ref()
                        .filter(|errors| errors.iter().all(|e| e.code == DUPLICATE_KEY))
                        .map(|errors| errors.iter().map(|e| e.index).collect::<Vec<usize>>()),
                    _ => None,
                };
                match duplicates {
                    Some(duplicates) => duplicates,
                    None => return Err(error).context("recording feedback events"),
                }
            }
        };
        let mut claims: Vec<anyhow::Result<Claim>> = keys.iter().map(|_| Ok(Claim::Ours(now))).collect();
        for index in taken {
            if let (Some(claim), Some(key)) = (claims.get_mut(index), keys.get(index)) {
                *claim = self.take_over(key, now).await;
            }
        }
        Ok(claims)
    }

    /// An event recorded before: taken over when its publisher failed or died (its claim is
    /// older than the publish lease), else a duplicate (published) or in flight.
    async fn take_over(&self, key: &str, now: i64) -> anyhow::Result<Claim> {
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

    /// Marks the claimed events of `keys` published, in one update. No claim time is matched:
    /// each was published by its claimant, whoever holds its claim now.
    pub async fn settle_published(&self, keys: &[String]) -> anyhow::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.store.count("update", 1);
        self.events
            .update_many(
                doc! { "_id": { "$in": keys } },
                doc! { "$set": { "published": 1, "published_ms": self.store.now_ms() } },
            )
            .await
            .context("recording that feedback events were published")?;
        Ok(())
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

    /// Adds each event to its letter, in one multi-statement update: under its key, so a second
    /// delivery writes the same entry again rather than a second one (and needs no query on the
    /// array). A hard bounce or a complaint also lists its recipient for the brake, once: the
    /// statement applies only while the list does not hold the recipient, so a repeated report
    /// neither lists nor notes it twice.
    pub async fn note_many(&self, notes: &[(ObjectId, FeedbackNote)]) -> anyhow::Result<()> {
        if notes.is_empty() {
            return Ok(());
        }
        let mut updates = Vec::with_capacity(notes.len());
        for (letter, note) in notes {
            let entry = mongodb::bson::to_document(note).context("encoding a feedback note")?;
            // Keys are URL-safe base64: no `.` or `$`, so each is a plain field name.
            let mut filter = doc! { "_id": *letter };
            let mut update = doc! { "$set": { format!("feedback.{}", note.key): entry } };
            let listed = match note.event.as_str() {
                "hard_bounce" => Some(HARD_BOUNCED),
                "complaint" => Some(COMPLAINED),
                _ => None,
            };
            if let Some(field) = listed {
                // `$nin` rather than `$ne`, and `$push` rather than `$addToSet`: the Mongo-wire
                // server we test on matches neither of the latter on a missing field.
                filter.insert(field, doc! { "$nin": [&note.address] });
                update.insert("$push", doc! { field: &note.address });
            }
            updates.push(RawDocumentBuf::from_document(&doc! { "q": filter, "u": update })?);
        }
        self.store.update_statements(self.letters.name(), updates, "adding feedback to its letters").await?;
        Ok(())
    }

    /// The brake's window: the last `letters` letters sent after `sent_after_ms`, their accepted
    /// recipients and how many of those were reported hard-bounced or complaining. One
    /// aggregation on the `{status, updated_ms}` index, reading at most `letters` documents
    /// whatever the volume (a sent letter's `updated_ms` is when its outcome was stored).
    pub async fn brake_window(&self, sent_after_ms: i64, letters: u32) -> anyhow::Result<BrakeWindow> {
        let size = |field: &str| doc! { "$sum": { "$size": { "$ifNull": [format!("${field}"), []] } } };
        let pipeline = [
            doc! { "$match": { "status": "sent", "updated_ms": { "$gt": sent_after_ms } } },
            doc! { "$sort": { "updated_ms": -1 } },
            doc! { "$limit": i64::from(letters) },
            doc! { "$group": {
                "_id": Bson::Null,
                "letters": { "$sum": 1 },
                "recipients": size("delivered"),
                "hard_bounces": size(HARD_BOUNCED),
                "complaints": size(COMPLAINED),
            } },
        ];
        self.store.count("aggregate", 1);
        let rows: Vec<Document> = self
            .letters
            .aggregate(pipeline)
            .await
            .context("reading the brake's window")?
            .try_collect()
            .await
            .context("reading the brake's window")?;
        let Some(row) = rows.first() else { return Ok(BrakeWindow::default()) };
        let number = |field: &str| match row.get(field) {
            Some(Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
            Some(Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
            Some(Bson::Double(n)) if *n >= 0.0 => *n as u64,
            _ => 0,
        };
        Ok(BrakeWindow {
            letters: number("letters"),
            recipients: number("recipients"),
            hard_bounces: number("hard_bounces"),
            complaints: number("complaints"),
        })
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
