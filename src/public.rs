//! The internet-facing listener (`PUBLIC_HTTP_ADDR`, off by default), apart from the admin API:
//! RFC 8058's one-click unsubscribe. A mailbox provider POSTs `List-Unsubscribe=One-Click` to
//! the link from the message's `List-Unsubscribe` header; the link's signature tells a link we
//! made from a forged or altered one. The address (when the link names one) is suppressed and
//! an `unsubscribed` event goes to its own topic for the profile service.

use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{Method, StatusCode, Uri},
};
use serde::Serialize;

use crate::{
    deliverability::{
        suppression::{Suppressions, UNSUBSCRIBE},
        unsubscribe::{Signer, UrlTemplate},
    },
    kafka::StatusProducer,
};

pub struct PublicState {
    pub template: UrlTemplate,
    pub signer: Signer,
    pub suppressions: Suppressions,
    pub producer: StatusProducer,
    pub topic: String,
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

async fn one_click(
    State(state): State<Arc<PublicState>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> (StatusCode, &'static str) {
    // RFC 8058 §3.2: a GET (a link scanner, a preview) must not unsubscribe anyone.
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "POST List-Unsubscribe=One-Click to unsubscribe\n");
    }
    let path_and_query = uri.path_and_query().map_or("", |p| p.as_str());
    let Some(fields) = state.template.verify(path_and_query, &state.signer) else {
        tracing::warn!(path = %uri.path(), "one-click request with a forged or altered link refused");
        return (StatusCode::FORBIDDEN, "this link is not valid\n");
    };
    let one_click = form_urlencoded::parse(&body).any(|(key, value)| key == "List-Unsubscribe" && value == "One-Click");
    if !one_click {
        return (StatusCode::BAD_REQUEST, "expected the body List-Unsubscribe=One-Click (RFC 8058)\n");
    }
    if let Some(address) = &fields.address
        && let Err(error) = state.suppressions.add(address, UNSUBSCRIBE, "one-click").await
    {
        tracing::error!(error = format!("{error:#}"), "one-click unsubscribe not stored");
        return (StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
    }
    let event = Unsubscribed {
        address: fields.address.as_deref(),
        token: &fields.token,
        letter_id: &fields.letter_id,
        kafka_key: &fields.kafka_key,
        time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
    };
    let payload = match serde_json::to_vec(&event) {
        Ok(payload) => payload,
        Err(_) => return (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the event\n"),
    };
    let key = (!fields.kafka_key.is_empty()).then_some(fields.kafka_key.as_bytes());
    if let Err(error) = state.producer.send(&state.topic, key, &payload, None).await {
        tracing::error!(error = %error, topic = %state.topic, "unsubscribed event not published");
        return (StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
    }
    tracing::info!(letter_id = %fields.letter_id, address = fields.address.as_deref().unwrap_or(""), "one-click unsubscribe");
    (StatusCode::OK, "unsubscribed\n")
}
