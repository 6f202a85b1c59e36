//! The control documents in `<collection>_control`: the deployment-wide pause (one document) and
//! the batches an operator cancelled (one document each). What they mean for a replica, and the
//! watch that reads them, is `crate::control`.

use std::collections::HashMap;

use anyhow::Context;
use futures::TryStreamExt;
use mongodb::{
    Collection,
    bson::{Bson, Document, doc},
};

use super::{BatchKey, Store, is_duplicate};

const DOCUMENT_ID: &str = "dispatch";
const CANCEL_KIND: &str = "cancel";

/// The control state as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ControlState {
    pub paused: bool,
    /// When it last changed, Unix milliseconds; 0 when never set.
    pub updated_ms: i64,
    /// The instance whose API changed it last (`brake@<instance>` when the brake paused).
    pub updated_by: Option<String>,
    /// Why sending is paused, while it is: an operator's `POST /pause`, or the reputation brake's
    /// rates against its limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who paused: `operator` or `brake`, while paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<PauseCause>,
    /// When sending was last resumed, Unix milliseconds; 0 when never. The brake judges only the
    /// letters sent after it.
    pub resumed_ms: i64,
}

/// Who paused sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseCause {
    Operator,
    Brake,
}

impl PauseCause {
    fn as_str(self) -> &'static str {
        match self {
            PauseCause::Operator => "operator",
            PauseCause::Brake => "brake",
        }
    }
}

/// The reason stored with an operator's pause.
pub const OPERATOR_REASON: &str = "paused by an operator (POST /pause)";

/// The control documents.
#[derive(Clone)]
pub struct ControlStore {
    store: Store,
    documents: Collection<Document>,
}

impl ControlStore {
    pub(super) fn new(store: &Store) -> ControlStore {
        ControlStore { store: store.clone(), documents: store.collection("control") }
    }

    /// The pause and the batches cancelled since `cancelled_since_ms` (with when), in one query.
    pub async fn read(&self, cancelled_since_ms: i64) -> anyhow::Result<(ControlState, HashMap<BatchKey, i64>)> {
        self.store.count("find", 1);
        let documents: Vec<Document> = self
            .documents
            .find(doc! { "$or": [
                { "_id": DOCUMENT_ID },
                { "kind": CANCEL_KIND, "at_ms": { "$gte": cancelled_since_ms } },
            ] })
            .await
            .context("reading the control documents")?
            .try_collect()
            .await
            .context("reading the control documents")?;
        let state = documents.iter().find(|d| d.get_str("_id") == Ok(DOCUMENT_ID)).map(state_of).unwrap_or_default();
        Ok((state, documents.iter().filter_map(cancel_of).collect()))
    }

    /// Records that the letters of `key` created until `now_ms` are cancelled, and deletes the
    /// cancels made before `forget_before_ms`, which are no longer read.
    pub async fn cancel(&self, key: &BatchKey, by: &str, now_ms: i64, forget_before_ms: i64) -> anyhow::Result<()> {
        let (id, mut document) = cancel_document(key);
        document.extend(doc! { "_id": &id, "kind": CANCEL_KIND, "at_ms": now_ms, "by": by });
        self.store.count("update", 1);
        self.documents
            .replace_one(doc! { "_id": &id }, document)
            .upsert(true)
            .await
            .context("recording the cancel in the control collection")?;
        let forgotten = doc! { "kind": CANCEL_KIND, "at_ms": { "$lt": forget_before_ms } };
        self.store.count("delete", 1);
        if let Err(error) = self.documents.delete_many(forgotten).await {
            tracing::debug!(error = %error, "deleting old cancels failed");
        }
        Ok(())
    }

    /// Deletes the cancel of `key`; says whether there was one.
    pub async fn forget_cancel(&self, key: &BatchKey) -> anyhow::Result<bool> {
        let (id, _) = cancel_document(key);
        self.store.count("delete", 1);
        let deleted = self
            .documents
            .delete_one(doc! { "_id": &id })
            .await
            .context("forgetting a cancel in the control collection")?;
        Ok(deleted.deleted_count > 0)
    }

    /// Stores whether sending is paused: an operator's pause, or a resume (of either pause),
    /// which also records when, so the brake starts its window afresh.
    pub async fn set_paused(&self, paused: bool, by: &str, now_ms: i64) -> anyhow::Result<ControlState> {
        // Integers: the Mongo-wire server stores booleans set by `$set` as integers anyway.
        let fields = if paused {
            doc! {
                "paused": 1_i32, "updated_ms": now_ms, "updated_by": by,
                "reason": OPERATOR_REASON, "cause": PauseCause::Operator.as_str(),
            }
        } else {
            doc! {
                "paused": 0_i32, "updated_ms": now_ms, "updated_by": by,
                "reason": Bson::Null, "cause": Bson::Null, "resumed_ms": now_ms,
            }
        };
        // Update, else insert (upserts are not relied on; see `Store::try_lock`); a concurrent
        // first insert from another replica makes the second update win.
        for _ in 0..2 {
            if self.update(doc! { "_id": DOCUMENT_ID }, &fields).await? {
                break;
            }
            if self.insert(&fields).await? {
                break;
            }
        }
        self.read(i64::MAX).await.map(|(state, _)| state)
    }

    /// Pauses sending for the brake, unless the state changed since `seen` was read (an
    /// operator resumed or paused meanwhile): a brake that judged the letters before a resume
    /// must not undo it. Says whether it paused.
    pub async fn brake(&self, seen: &ControlState, reason: &str, by: &str, now_ms: i64) -> anyhow::Result<bool> {
        let fields = doc! {
            "paused": 1_i32, "updated_ms": now_ms, "updated_by": by,
            "reason": reason, "cause": PauseCause::Brake.as_str(),
        };
        if seen.updated_ms == 0 {
            // Never written: the first writer creates it, and a concurrent one loses.
            return self.insert(&fields).await;
        }
        self.update(doc! { "_id": DOCUMENT_ID, "updated_ms": seen.updated_ms }, &fields).await
    }

    /// `$set`s `fields` on the document `filter` matches; says whether one matched.
    async fn update(&self, filter: Document, fields: &Document) -> anyhow::Result<bool> {
        self.store.count("update", 1);
        let updated = self
            .documents
            .update_one(filter, doc! { "$set": fields.clone() })
            .await
            .context("writing the control document")?;
        Ok(updated.matched_count == 1)
    }

    /// Creates the document; `false` when another replica created it first.
    async fn insert(&self, fields: &Document) -> anyhow::Result<bool> {
        let mut document = fields.clone();
        document.insert("_id", DOCUMENT_ID);
        self.store.count("insert", 1);
        match self.documents.insert_one(document).await {
            Ok(_) => Ok(true),
            Err(error) if is_duplicate(&error) => Ok(false),
            Err(error) => Err(anyhow::Error::new(error).context("creating the control document")),
        }
    }
}

fn state_of(document: &Document) -> ControlState {
    let paused = match document.get("paused") {
        Some(Bson::Boolean(b)) => *b,
        Some(Bson::Int32(n)) => *n != 0,
        Some(Bson::Int64(n)) => *n != 0,
        _ => false,
    };
    let millis = |field: &str| match document.get(field) {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        _ => 0,
    };
    let text = |field: &str| document.get_str(field).ok().map(str::to_owned);
    // A reason and a cause are kept only while paused (a resume clears them).
    let cause = match document.get_str("cause") {
        Ok("brake") => Some(PauseCause::Brake),
        Ok(_) => Some(PauseCause::Operator),
        // Paused before causes were stored: by an operator, the only one who could.
        Err(_) => paused.then_some(PauseCause::Operator),
    };
    ControlState {
        paused,
        updated_ms: millis("updated_ms"),
        updated_by: text("updated_by"),
        reason: text("reason").filter(|_| paused),
        cause: cause.filter(|_| paused),
        resumed_ms: millis("resumed_ms"),
    }
}

/// The `_id` of a batch's cancel document, and the field that holds its key.
fn cancel_document(key: &BatchKey) -> (String, Document) {
    match key {
        BatchKey::Text(text) => (format!("cancel:text:{text}"), doc! { "text": text }),
        BatchKey::Base64(b64) => (format!("cancel:b64:{b64}"), doc! { "b64": b64 }),
    }
}

fn cancel_of(document: &Document) -> Option<(BatchKey, i64)> {
    if document.get_str("kind") != Ok(CANCEL_KIND) {
        return None;
    }
    let key = match (document.get_str("text"), document.get_str("b64")) {
        (Ok(text), _) => BatchKey::Text(text.to_owned()),
        (_, Ok(b64)) => BatchKey::Base64(b64.to_owned()),
        _ => return None,
    };
    let at_ms = match document.get("at_ms") {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => i64::from(*n),
        _ => return None,
    };
    Some((key, at_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_flags_of_any_shape_are_read() {
        assert!(state_of(&doc! { "paused": 1_i32 }).paused);
        assert!(state_of(&doc! { "paused": true }).paused);
        assert!(!state_of(&doc! { "paused": 0_i64 }).paused);
        assert!(!state_of(&doc! {}).paused);
        let state = state_of(&doc! { "paused": 1_i32, "updated_ms": 42_i64, "updated_by": "pod-a" });
        let expected = ControlState {
            paused: true,
            updated_ms: 42,
            updated_by: Some("pod-a".into()),
            cause: Some(PauseCause::Operator),
            ..ControlState::default()
        };
        assert_eq!(state, expected, "a pause stored before causes were is an operator's");
        let braked = state_of(&doc! { "paused": 1_i32, "reason": "bounces", "cause": "brake", "resumed_ms": 7_i32 });
        assert_eq!(
            (braked.cause, braked.reason.as_deref(), braked.resumed_ms),
            (Some(PauseCause::Brake), Some("bounces"), 7)
        );
        let resumed =
            state_of(&doc! { "paused": 0_i32, "reason": Bson::Null, "cause": Bson::Null, "resumed_ms": 9_i64 });
        assert_eq!((resumed.cause, resumed.reason, resumed.resumed_ms), (None, None, 9));
    }

    #[test]
    fn a_cancel_document_reads_back_as_its_key() {
        let key = BatchKey::Text("k".into());
        let (id, mut document) = cancel_document(&key);
        document.extend(doc! { "_id": id, "kind": CANCEL_KIND, "at_ms": 7_i32 });
        assert_eq!(cancel_of(&document), Some((key, 7)));
    }
}
