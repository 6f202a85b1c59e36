//! The `unsubscribed` events of the one-click endpoint (`<collection>_unsubscribed`): one document
//! per event key, recorded before the event is published and marked once the broker took it, so
//! a replayed link publishes nothing new (see `crate::public`).

use std::time::Duration;

use mongodb::{
    Collection,
    bson::{Document, doc},
};

use super::{Store, is_duplicate};

/// Who publishes an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventClaim {
    /// This request publishes the event; its claim time, which its outcome update matches.
    Ours(i64),
    Published,
    InFlight,
}

#[derive(Clone)]
pub struct UnsubscribedEvents {
    store: Store,
    events: Collection<Document>,
}

impl UnsubscribedEvents {
    pub(super) fn new(store: &Store) -> UnsubscribedEvents {
        UnsubscribedEvents { store: store.clone(), events: store.collection("unsubscribed") }
    }

    /// Records the event's key (the first request inserts it), or takes over one whose publisher
    /// failed or died more than `lease` ago.
    pub async fn claim(&self, key: &str, lease: Duration) -> anyhow::Result<EventClaim> {
        let now = self.store.now_ms();
        self.store.count("insert", 1);
        let inserted =
            self.events.insert_one(doc! { "_id": key, "published": 0, "claim_ms": now, "time_ms": now }).await;
        match inserted {
            Ok(_) => return Ok(EventClaim::Ours(now)),
            Err(error) if !is_duplicate(&error) => return Err(error.into()),
            Err(_) => {}
        }
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let stale = doc! { "_id": key, "published": 0, "claim_ms": { "$lt": now.saturating_sub(lease_ms) } };
        self.store.count("findAndModify", 1);
        if self.events.find_one_and_update(stale, doc! { "$set": { "claim_ms": now } }).await?.is_some() {
            return Ok(EventClaim::Ours(now));
        }
        self.store.count("find", 1);
        let published = self
            .events
            .find_one(doc! { "_id": key })
            .await?
            // An integer: the MongoDB-wire server in use turns booleans into integers anyway.
            .is_some_and(|d| {
                matches!(d.get_i32("published").map(i64::from).or_else(|_| d.get_i64("published")), Ok(1))
            });
        Ok(if published { EventClaim::Published } else { EventClaim::InFlight })
    }

    /// Records whether the event claimed at `claim_ms` was published; one that was not is free
    /// for the next request at once.
    pub async fn settle(&self, key: &str, claim_ms: i64, published: bool) -> anyhow::Result<()> {
        let update = match published {
            true => doc! { "$set": { "published": 1, "published_ms": self.store.now_ms() } },
            false => doc! { "$set": { "claim_ms": 0_i64 } },
        };
        self.store.count("update", 1);
        self.events.update_one(doc! { "_id": key, "claim_ms": claim_ms }, update).await?;
        Ok(())
    }
}
