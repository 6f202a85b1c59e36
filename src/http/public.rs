//! The internet-facing listener (`PUBLIC_HTTP_ADDR`, off by default), apart from the admin API:
//! RFC 8058's one-click unsubscribe. A mailbox provider POSTs `List-Unsubscribe=One-Click` to
//! the link from the message's `List-Unsubscribe` header; the link's signature tells a link we
//! made from a forged or altered one. The address (when the link names one) is suppressed and
//! an `unsubscribed` event goes to its own topic for the profile service.
//!
//! Providers and people POST a link more than once (retries, a second click). The suppression
//! is an idempotent upsert; the event is published once per link and address: its key is
//! recorded in `<MONGODB_COLLECTION>_unsubscribed` before it is published, and marked published
//! after the broker acknowledged it, so a replay of a published link publishes nothing.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{Method, StatusCode, Uri},
};
use base64::Engine as _;
use mongodb::bson::oid::ObjectId;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::{
    address::Recipient,
    deliverability::{
        suppression::{Suppressions, UNSUBSCRIBE},
        unsubscribe::{Link, Signer, UrlTemplate},
    },
    kafka::StatusProducer,
    store::{EventClaim, Store, UnsubscribedEvents},
};

/// How long a request waits for the broker's acknowledgement of its event. Mailbox providers
/// give up on a slow endpoint after seconds, and a stalled broker would otherwise hold each
/// request for `KAFKA_MESSAGE_TIMEOUT`.
pub const PUBLISH_WAIT: Duration = Duration::from_secs(5);

pub struct PublicState {
    pub template: UrlTemplate,
    pub signer: Signer,
    pub suppressions: Suppressions,
    pub producer: StatusProducer,
    pub topic: String,
    /// The letters, for a token or Kafka key the link refers to instead of carrying.
    pub store: Store,
    /// One document per published (or being published) event: `_id` the event's key.
    pub events: UnsubscribedEvents,
    /// How long a request that started publishing an event holds it: longer than librdkafka
    /// can take to deliver or fail it (`KAFKA_MESSAGE_TIMEOUT`), so no replay publishes it
    /// again while the first may still arrive.
    pub publish_lease: Duration,
}

/// The event the profile service receives. No address in BCC mode, where the link is shared.
#[derive(Debug, Serialize)]
struct Unsubscribed<'a> {
    #[serde(rename = "Address", skip_serializing_if = "Option::is_none")]
    address: Option<&'a str>,
    #[serde(rename = "Token")]
    token: &'a str,
    #[serde(rename = "LetterID")]
    letter_id: &'a str,
    #[serde(rename = "KafkaKey")]
    kafka_key: &'a str,
    /// RFC 3339, UTC.
    #[serde(rename = "Time")]
    time: String,
}

/// Every path: which ones exist is the link template's business.
pub fn router(state: Arc<PublicState>) -> Router {
    Router::new().fallback(one_click).layer(DefaultBodyLimit::max(4096)).with_state(state)
}

type Reply = (StatusCode, &'static str);

const TRY_LATER: Reply = (StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
const UNSUBSCRIBED: Reply = (StatusCode::OK, "unsubscribed\n");

async fn one_click(State(state): State<Arc<PublicState>>, method: Method, uri: Uri, body: Bytes) -> Reply {
    // RFC 8058 §3.2: a GET (a link scanner, a preview) must not unsubscribe anyone.
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "POST List-Unsubscribe=One-Click to unsubscribe\n");
    }
    let path_and_query = uri.path_and_query().map_or("", |p| p.as_str());
    let Some(link) = state.template.verify(path_and_query, &state.signer) else {
        tracing::warn!(path = %uri.path(), "one-click request with a forged or altered link refused");
        return (StatusCode::FORBIDDEN, "this link is not valid\n");
    };
    let one_click = form_urlencoded::parse(&body).any(|(key, value)| key == "List-Unsubscribe" && value == "One-Click");
    if !one_click {
        return (StatusCode::BAD_REQUEST, "expected the body List-Unsubscribe=One-Click (RFC 8058)\n");
    }
    let address = match link.fields.address.as_deref().map(Recipient::parse).transpose() {
        Ok(address) => address,
        // Signed by us, so only a link made from an address ingest would have refused.
        Err(error) => {
            tracing::warn!(error = %error, "one-click link names no valid mailbox");
            return (StatusCode::BAD_REQUEST, "this link names no valid mailbox\n");
        }
    };
    let link = match resolve(&state.store, link).await {
        Ok(link) => link,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "one-click: reading the letter the link refers to");
            return TRY_LATER;
        }
    };
    if let Some(address) = &address
        && let Err(error) = state.suppressions.add(address, UNSUBSCRIBE, "one-click").await
    {
        tracing::error!(error = format!("{error:#}"), "one-click unsubscribe not stored");
        return TRY_LATER;
    }
    let reply = publish_once(&state, &link, address.as_ref()).await;
    if reply.0 == StatusCode::OK {
        tracing::info!(letter_id = %link.fields.letter_id, address = address.as_ref().map_or("", Recipient::as_str), "one-click unsubscribe");
    }
    reply
}

/// Fills in the token and Kafka key a link refers to from its letter. A letter already deleted
/// (past `LETTER_RETENTION`) leaves them empty: the address is still suppressed and the event
/// still names the letter.
async fn resolve(store: &Store, mut link: Link) -> anyhow::Result<Link> {
    let Some(reference) = link.reference.take() else { return Ok(link) };
    let id = ObjectId::parse_str(&reference.letter_id)?;
    match store.letter_head(id).await? {
        Some(letter) => {
            if reference.token {
                link.fields.token = letter.token;
            }
            if reference.kafka_key {
                link.fields.kafka_key = letter.kafkakey;
            }
        }
        None => {
            tracing::warn!(letter_id = %reference.letter_id, "one-click link refers to a letter no longer stored; its token is not known")
        }
    }
    Ok(link)
}

/// Publishes the link's `unsubscribed` event unless it was published before. The wait for the
/// broker is bounded by [`PUBLISH_WAIT`]: past it the answer is 503 (the provider retries) while
/// the send goes on in the background and records its outcome, so a retry finds the event
/// published, or publishes it if the send failed.
async fn publish_once(state: &Arc<PublicState>, link: &Link, address: Option<&Recipient>) -> Reply {
    let fields = &link.fields;
    let key = event_key(link, address);
    match state.events.claim(&key, state.publish_lease).await {
        Ok(EventClaim::Ours(claim_ms)) => {
            let event = Unsubscribed {
                address: fields.address.as_deref(),
                token: &fields.token,
                letter_id: &fields.letter_id,
                kafka_key: &fields.kafka_key,
                time: humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + Duration::from_millis(state.store.now_ms().max(0) as u64),
                )
                .to_string(),
            };
            let payload = match serde_json::to_vec(&event) {
                Ok(payload) => payload,
                Err(_) => return (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the event\n"),
            };
            let kafka_key = (!fields.kafka_key.is_empty()).then(|| fields.kafka_key.clone().into_bytes());
            let this = state.clone();
            let send = tokio::spawn(async move {
                let sent = this.producer.send(&this.topic, kafka_key.as_deref(), &payload, None).await;
                if let Err(error) = this.events.settle(&key, claim_ms, sent.is_ok()).await {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "one-click: recording whether the event was published"
                    );
                }
                sent
            });
            match tokio::time::timeout(PUBLISH_WAIT, send).await {
                Ok(Ok(Ok(()))) => UNSUBSCRIBED,
                Ok(Ok(Err(error))) => {
                    tracing::error!(error = %error, topic = %state.topic, "unsubscribed event not published");
                    TRY_LATER
                }
                Ok(Err(error)) => {
                    tracing::error!(error = %error, "one-click: the publishing task failed");
                    TRY_LATER
                }
                Err(_) => {
                    tracing::warn!(topic = %state.topic, wait = ?PUBLISH_WAIT, "unsubscribed event not acknowledged in time; answered 503, still publishing");
                    TRY_LATER
                }
            }
        }
        Ok(EventClaim::Published) => UNSUBSCRIBED,
        // Another request is publishing it now; the provider retries and finds it published.
        Ok(EventClaim::InFlight) => TRY_LATER,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "one-click: recording the event");
            TRY_LATER
        }
    }
}

/// One key per link and address: the letter, its token and key, and the address in its
/// canonical form, hashed to a bounded `_id` (tokens can be a kilobyte).
fn event_key(link: &Link, address: Option<&Recipient>) -> String {
    let fields = &link.fields;
    let mut hash = Sha256::new();
    for part in [&fields.letter_id, &fields.token, &fields.kafka_key, &address.map(Recipient::key).unwrap_or_default()]
    {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash.finalize())
}
