//! The relays' webhooks on the public listener (`PUBLIC_HTTP_ADDR`): Mailgun, SendGrid and
//! Postmark report bounces, complaints and delays by HTTP. Each route exists only when its relay's
//! secret is set, authenticates its request as the relay documents, maps each event to an
//! [`Event`] and records it with [`Feedback::record`], as the DSN listener does.
//!
//! - `POST /webhooks/mailgun`: the JSON webhook; `signature.signature` is the hex HMAC-SHA256 of
//!   `timestamp` + `token` under `MAILGUN_WEBHOOK_SIGNING_KEY`. A timestamp further than
//!   [`WEBHOOK_MAX_AGE`] from now is refused. The signature does not cover the body, so a token
//!   once accepted is remembered with its body's hash: the same request again is answered 200
//!   without recording anything, the token with another body is refused.
//! - `POST /webhooks/sendgrid`: the signed event webhook; the `X-Twilio-Email-Event-Webhook-
//!   Signature` header is an ECDSA P-256 signature (base64 DER) of the
//!   `X-Twilio-Email-Event-Webhook-Timestamp` header's value followed by the raw body, under
//!   `SENDGRID_WEBHOOK_PUBLIC_KEY`. A timestamp further than [`WEBHOOK_MAX_AGE`] from now is
//!   refused.
//! - `POST /webhooks/postmark`: HTTP basic auth with `POSTMARK_WEBHOOK_USER` and
//!   `POSTMARK_WEBHOOK_PASSWORD`, the credentials put in the webhook URL at Postmark
//!   (`https://user:password@host/webhooks/postmark`), compared in constant time.
//! - `POST /webhooks/ses`: SES notifications through an SNS HTTPS subscription. The SNS
//!   signature (RSA, SHA-1 for `SignatureVersion` 1, SHA-256 for 2) is checked with the
//!   certificate at `SigningCertURL`, fetched only from `https://sns.<region>.amazonaws.com/….pem`
//!   (or `SNS_SIGNING_CERT_FILE`'s, for tests; the URL is checked all the same); the topic must be
//!   one of `SNS_TOPIC_ARNS`. A message whose signed `Timestamp` is older than [`SNS_MAX_AGE`]
//!   (or more than [`WEBHOOK_MAX_AGE`] ahead) is refused. A `SubscriptionConfirmation` is
//!   confirmed by fetching its `SubscribeURL`, only when it is HTTPS on `amazonaws.com`.
//!
//! Replays: a signature binds its timestamp, so a captured request can be replayed only while
//! its timestamp is fresh; within that window a replay is a duplicate by its [`Event::key`]
//! (Mailgun's, whose signature leaves the body out, by its token). Mailgun and SendGrid sign
//! each delivery attempt afresh (Mailgun tells receivers to refuse a token seen before, which a
//! retry carrying its first attempt's signature could never pass), so five minutes each way
//! refuses no retry. SNS signs a message once and retries it unchanged, up to an hour (the
//! limit of an HTTP/S delivery policy), so its bound is that hour: a shorter one would refuse
//! SES's own retries after an outage of ours, and lose the bounces they carry.
//!
//! A request that fails its check gets 401 (Postmark: no or wrong credentials) or 403 (a bad
//! signature) and changes nothing. A relay retries a webhook until it gets a 2xx, so:
//! - an event already recorded (a retry, or a DSN for the same bounce) is a duplicate by its
//!   [`Event::key`] and is not recorded again;
//! - an event for no letter of ours, or for a letter no longer stored, is answered 200 and
//!   counted (`feedback_webhook_ignored`), since a retry could never succeed;
//! - a failure of ours (MongoDB, the broker) is answered 503, and the relay's retry records what
//!   is left.
//!
//! How the letter is found: our `Message-ID` is `<letter id@from domain>` (`smtp::message`), and
//! the relays keep a `Message-ID` their SMTP clients set. Mailgun echoes it (without brackets)
//! in `message.headers.message-id`, SendGrid in `smtp-id` (on its delivery events, not on spam
//! reports). The composer also adds, for each relay whose webhook is configured, the header that
//! relay echoes as metadata on every event (`X-Mailgun-Variables`, `X-SMTPAPI` unique args,
//! `X-PM-Metadata-letter_id`), named `letter_id`; the relays take these headers off before
//! delivery. Metadata is preferred, the Message-ID is the fallback; Postmark's events carry only
//! metadata (its `MessageID` is its own). SES takes no metadata header of ours; its notifications
//! carry the original `Message-ID` in `mail.commonHeaders.messageId` (and `mail.headers`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use mongodb::bson::oid::ObjectId;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::{Event, Feedback, Kind, Recorded, Source, TryLater, report::is_enhanced_status};
use crate::{config::feedback::WebhookConfig, metrics::WebhookLabel};

/// The furthest a Mailgun or SendGrid signature's timestamp may be from our clock, either way
/// (five minutes, as Stripe and the Standard Webhooks specification use): how long a captured
/// request could be replayed. Also how far ahead any signed timestamp may be (a relay's clock
/// that runs fast). Mailgun's token cache covers the window.
pub const WEBHOOK_MAX_AGE: Duration = Duration::from_secs(5 * 60);

/// How old an SNS message's signed `Timestamp` may be: SNS retries a message unchanged, with
/// the signature of its first attempt, for up to an hour (the hard limit on an HTTP/S delivery
/// policy's total retry time).
pub const SNS_MAX_AGE: Duration = Duration::from_secs(60 * 60);

/// Whether a signature made at `signed_ms` may be taken at `now_ms`: no older than `max_age`,
/// no further ahead than [`WEBHOOK_MAX_AGE`].
pub fn fresh(signed_ms: i64, now_ms: i64, max_age: Duration) -> bool {
    let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    now_ms.saturating_sub(signed_ms) <= millis(max_age) && signed_ms.saturating_sub(now_ms) <= millis(WEBHOOK_MAX_AGE)
}

/// The largest webhook body taken: SendGrid batches events (up to a few hundred per POST).
pub const MAX_BODY: usize = 4 << 20;

/// The key under which the composer's metadata headers carry the letter id.
pub const LETTER_ID: &str = "letter_id";

pub struct Webhooks {
    pub feedback: Arc<Feedback>,
    pub config: WebhookConfig,
    /// Mailgun tokens accepted within [`WEBHOOK_MAX_AGE`]: token → (hash of the body, timestamp).
    tokens: Mutex<HashMap<String, ([u8; 32], i64)>>,
    /// SNS signing keys by certificate URL, fetched once each.
    sns_keys: Mutex<HashMap<String, rsa::RsaPublicKey>>,
    /// `SNS_SIGNING_CERT_FILE`'s key, used instead of fetching.
    sns_fixed_key: Option<rsa::RsaPublicKey>,
    http: reqwest::Client,
}

impl Webhooks {
    pub fn new(feedback: Arc<Feedback>, config: WebhookConfig) -> anyhow::Result<Webhooks> {
        use anyhow::Context as _;
        let sns_fixed_key = match &config.sns_signing_cert_file {
            Some(path) => {
                let pem =
                    std::fs::read(path).with_context(|| format!("reading SNS_SIGNING_CERT_FILE {}", path.display()))?;
                Some(sns_key_of_pem(&pem).with_context(|| format!("SNS_SIGNING_CERT_FILE {}", path.display()))?)
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .timeout(SNS_FETCH_TIMEOUT)
            // A redirect could lead off the checked host.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the HTTPS client for SNS")?;
        Ok(Webhooks {
            feedback,
            config,
            tokens: Mutex::new(HashMap::new()),
            sns_keys: Mutex::new(HashMap::new()),
            sns_fixed_key,
            http,
        })
    }
}

/// How long fetching a signing certificate or confirming a subscription may take.
const SNS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Which relays' metadata headers the composer adds, naming the letter: those whose webhook is
/// configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metadata {
    pub mailgun: bool,
    pub sendgrid: bool,
    pub postmark: bool,
}

impl Metadata {
    pub fn from_config(config: &WebhookConfig) -> Metadata {
        Metadata {
            mailgun: config.mailgun_signing_key.is_some(),
            sendgrid: config.sendgrid_public_key.is_some(),
            postmark: config.postmark_credentials.is_some(),
        }
    }

    /// The headers each relay echoes in its events as metadata (and takes off the message):
    /// Mailgun's `X-Mailgun-Variables` (`user-variables`), SendGrid's `X-SMTPAPI` unique args (top
    /// level fields of each event), Postmark's `X-PM-Metadata-*` (`Metadata`).
    pub fn headers(&self, letter_id: &str) -> Vec<(lettre::message::header::HeaderName, String)> {
        use lettre::message::header::HeaderName;
        let mut headers = Vec::new();
        if self.mailgun {
            headers.push((
                HeaderName::new_from_ascii_str("X-Mailgun-Variables"),
                serde_json::json!({ LETTER_ID: letter_id }).to_string(),
            ));
        }
        if self.sendgrid {
            headers.push((
                HeaderName::new_from_ascii_str("X-SMTPAPI"),
                serde_json::json!({ "unique_args": { LETTER_ID: letter_id } }).to_string(),
            ));
        }
        if self.postmark {
            headers.push((HeaderName::new_from_ascii_str("X-PM-Metadata-letter_id"), letter_id.to_owned()));
        }
        headers
    }
}

/// The webhooks' state when a relay's secret is set: a [`Feedback`] of their own, as the DSN
/// listener has, on the same store, suppression list and topic.
pub fn state(
    config: &crate::config::Config,
    store: &crate::store::Store,
    suppressions: crate::deliverability::suppression::Suppressions,
    producer: crate::kafka::StatusProducer,
    metrics: Arc<crate::metrics::Metrics>,
) -> anyhow::Result<Option<Arc<Webhooks>>> {
    if !config.feedback.webhooks.any() {
        return Ok(None);
    }
    let feedback = Feedback {
        store: store.feedback(config.kafka.message_timeout + Duration::from_secs(10)),
        suppressions,
        producer,
        topic: config.feedback.topic.clone(),
        metrics,
    };
    Webhooks::new(Arc::new(feedback), config.feedback.webhooks.clone()).map(Arc::new).map(Some)
}

/// The routes of the relays whose secret is set.
pub fn router(state: Arc<Webhooks>) -> Router {
    let mut router = Router::new();
    if state.config.mailgun_signing_key.is_some() {
        router = router.route("/webhooks/mailgun", post(mailgun));
    }
    if state.config.sendgrid_public_key.is_some() {
        router = router.route("/webhooks/sendgrid", post(sendgrid));
    }
    if state.config.postmark_credentials.is_some() {
        router = router.route("/webhooks/postmark", post(postmark));
    }
    if !state.config.sns_topic_arns.is_empty() {
        router = router.route("/webhooks/ses", post(ses));
    }
    router.layer(DefaultBodyLimit::max(MAX_BODY)).with_state(state)
}

/// One event of a webhook, before its letter is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub letter: Option<ObjectId>,
    pub address: String,
    pub kind: Kind,
    pub status: Option<String>,
    pub diagnostic: Option<String>,
    pub feedback_type: Option<String>,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no or wrong credentials")]
    Unauthenticated,
    #[error("the signature does not verify")]
    Forged,
    #[error("the signed timestamp is too far from now (a replay, or a clock far off)")]
    Stale,
    #[error("a token already used, with another body")]
    Replayed,
    #[error("not one of the SNS topics taken (SNS_TOPIC_ARNS)")]
    Topic,
    #[error("a certificate or subscription URL not on Amazon's SNS host")]
    Url,
}

impl Refused {
    fn reason(self) -> &'static str {
        match self {
            Refused::Unauthenticated => "unauthenticated",
            Refused::Forged => "forged",
            Refused::Stale => "stale",
            Refused::Replayed => "replayed",
            Refused::Topic => "topic",
            Refused::Url => "url",
        }
    }
}

fn refuse(state: &Webhooks, relay: &'static str, refused: Refused) -> Response {
    state.feedback.metrics.webhook_refused.get_or_create(&WebhookLabel { relay, reason: refused.reason() }).inc();
    tracing::warn!(relay, reason = %refused, "relay webhook refused");
    match refused {
        Refused::Unauthenticated => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"mailsender webhooks\"")],
            "credentials required\n",
        )
            .into_response(),
        _ => (StatusCode::FORBIDDEN, format!("{refused}\n")).into_response(),
    }
}

fn bad_request(relay: &'static str, why: String) -> Response {
    tracing::warn!(relay, error = %why, "relay webhook with an unreadable body");
    (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response()
}

/// Records the items; 200 once each is recorded, a duplicate or ignored, 503 when one could
/// not be recorded now (the relay retries, and what was recorded is a duplicate then).
async fn take(state: &Webhooks, relay: &'static str, source: Source, items: Vec<Item>) -> Response {
    let (mut new, mut ignored) = (0_usize, 0_usize);
    for item in items {
        let ignore = |reason: &'static str| {
            state.feedback.metrics.webhook_ignored.get_or_create(&WebhookLabel { relay, reason }).inc();
        };
        let Some(id) = item.letter else {
            ignore("no_letter");
            ignored += 1;
            tracing::info!(relay, address = %item.address, kind = item.kind.as_str(), "relay event names no letter of ours; ignored");
            continue;
        };
        let letter = match state.feedback.store.letter(id).await {
            Ok(Some(letter)) => letter,
            Ok(None) => {
                ignore("unknown_letter");
                ignored += 1;
                tracing::info!(relay, letter_id = %id, kind = item.kind.as_str(), "relay event for a letter not stored; ignored");
                continue;
            }
            Err(error) => return try_later(relay, &TryLater::Failed(error)),
        };
        let event = Event {
            letter: id,
            address: item.address,
            kind: item.kind,
            status: item.status,
            diagnostic: item.diagnostic,
            source,
            feedback_type: item.feedback_type,
        };
        match state.feedback.record(&letter, &event).await {
            Ok(Recorded::New) => new += 1,
            Ok(Recorded::Duplicate) => {}
            Ok(Recorded::ForeignRecipient) => {
                ignore("foreign_recipient");
                ignored += 1;
            }
            Err(error) => return try_later(relay, &error),
        }
    }
    (StatusCode::OK, format!("recorded {new}, ignored {ignored}\n")).into_response()
}

fn try_later(relay: &'static str, error: &TryLater) -> Response {
    tracing::error!(relay, error = format!("{error:#}"), "relay webhook not recorded; the relay will retry");
    (StatusCode::SERVICE_UNAVAILABLE, "try again later\n").into_response()
}

/// The letter id of a `Message-ID` of ours: `<id@domain>`, with or without the brackets.
pub fn letter_of_message_id(message_id: &str) -> Option<ObjectId> {
    let local = message_id.trim().trim_start_matches('<').split('@').next()?;
    ObjectId::parse_str(local).ok()
}

/// The enhanced status code in a relay's diagnostic text (`550 5.1.1 user unknown`).
fn status_in(text: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ';')
        .find(|w| is_enhanced_status(w))
        .map(str::to_owned)
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A bounce's kind from its enhanced status, as for DSNs: a bad address (5.1.x, 5.2.1) is hard.
fn bounce_kind(status: Option<&str>) -> Kind {
    if status.is_some_and(|s| s.starts_with("5.1.") || s == "5.2.1") { Kind::HardBounce } else { Kind::SoftBounce }
}

// Mailgun

/// Checks a Mailgun signature: `signature` is the hex HMAC-SHA256 of `timestamp` followed by
/// `token`, keyed with the signing key.
pub fn mailgun_signature_holds(key: &SecretString, timestamp: &str, token: &str, signature: &str) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.expose_secret().as_bytes()) else { return false };
    mac.update(timestamp.as_bytes());
    mac.update(token.as_bytes());
    let Some(signature) = decode_hex(signature) else { return false };
    // `verify_slice` compares in constant time.
    mac.verify_slice(&signature).is_ok()
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// The events of a Mailgun webhook's `event-data`: `failed` (permanent: a bounce, hard when
/// Mailgun says the address bounced; temporary: a delay, Mailgun retries) and `complained`.
pub fn mailgun_items(data: &Value) -> Vec<Item> {
    let Some(address) = data.get("recipient").and_then(text) else { return Vec::new() };
    let delivery = &data["delivery-status"];
    let diagnostic = ["message", "description"].iter().find_map(|k| delivery.get(*k).and_then(text));
    let status = delivery
        .get("enhanced-code")
        .and_then(text)
        .filter(|s| is_enhanced_status(s))
        .or_else(|| diagnostic.as_deref().and_then(status_in));
    let kind = match (data["event"].as_str(), data["severity"].as_str(), data["reason"].as_str()) {
        (Some("complained"), ..) => Kind::Complaint,
        (Some("failed"), Some("temporary"), _) => Kind::Delay,
        // Mailgun refused to send to an address its list holds as unsubscribed or complained:
        // not a bounce, and the complaint was reported when it happened.
        (Some("failed"), Some("permanent"), Some("suppress-unsubscribe" | "suppress-complaint")) => return Vec::new(),
        // A bounce now, or an address Mailgun holds as bounced before.
        (Some("failed"), Some("permanent"), Some("bounce" | "suppress-bounce")) => {
            status.as_deref().map_or(Kind::HardBounce, |s| bounce_kind(Some(s)))
        }
        (Some("failed"), Some("permanent"), _) => bounce_kind(status.as_deref()),
        _ => return Vec::new(),
    };
    let variables = &data["user-variables"];
    let letter = variables
        .get(LETTER_ID)
        .and_then(Value::as_str)
        .and_then(|id| ObjectId::parse_str(id).ok())
        .or_else(|| data["message"]["headers"]["message-id"].as_str().and_then(letter_of_message_id));
    vec![Item {
        letter,
        address,
        kind,
        status,
        diagnostic: diagnostic.or_else(|| data["reason"].as_str().map(str::to_owned)),
        feedback_type: (kind == Kind::Complaint).then(|| "abuse".to_owned()),
    }]
}

async fn mailgun(State(state): State<Arc<Webhooks>>, body: Bytes) -> Response {
    const RELAY: &str = "mailgun";
    let Some(key) = &state.config.mailgun_signing_key else { return StatusCode::NOT_FOUND.into_response() };
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(payload) => payload,
        Err(error) => return bad_request(RELAY, format!("not JSON: {error}")),
    };
    let signature = &payload["signature"];
    let (Some(timestamp), Some(token), Some(hex)) =
        (text(&signature["timestamp"]), text(&signature["token"]), signature["signature"].as_str())
    else {
        return refuse(&state, RELAY, Refused::Forged);
    };
    if !mailgun_signature_holds(key, &timestamp, &token, hex) {
        return refuse(&state, RELAY, Refused::Forged);
    }
    let now_s = state.feedback.store.now_ms() / 1000;
    let Ok(sent_s) = timestamp.parse::<i64>() else { return refuse(&state, RELAY, Refused::Stale) };
    if !fresh(sent_s.saturating_mul(1000), now_s.saturating_mul(1000), WEBHOOK_MAX_AGE) {
        return refuse(&state, RELAY, Refused::Stale);
    }
    let hash: [u8; 32] = Sha256::digest(&body).into();
    {
        let tokens = state.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        match tokens.get(&token) {
            // Mailgun's retry of a request answered 200 whose answer it lost: nothing new.
            Some((seen, _)) if *seen == hash => return (StatusCode::OK, "already received\n").into_response(),
            Some(_) => return refuse(&state, RELAY, Refused::Replayed),
            None => {}
        }
    }
    let response = take(&state, RELAY, Source::Mailgun, mailgun_items(&payload["event-data"])).await;
    // Remembered only once taken: a request answered 503 must be taken when Mailgun retries it.
    if response.status() == StatusCode::OK {
        let mut tokens = state.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        let oldest = now_s - WEBHOOK_MAX_AGE.as_secs() as i64;
        tokens.retain(|_, (_, at)| *at >= oldest);
        tokens.insert(token, (hash, sent_s));
    }
    response
}

// SendGrid

/// Checks a SendGrid signed event webhook: an ECDSA P-256 SHA-256 signature (base64 of its DER)
/// of the timestamp header's value followed by the raw body.
pub fn sendgrid_signature_holds(
    key: &p256::ecdsa::VerifyingKey,
    timestamp: &str,
    body: &[u8],
    signature: &str,
) -> bool {
    use p256::ecdsa::{Signature, signature::Verifier as _};
    let Ok(der) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else { return false };
    let Ok(signature) = Signature::from_der(&der) else { return false };
    let mut signed = Vec::with_capacity(timestamp.len() + body.len());
    signed.extend_from_slice(timestamp.as_bytes());
    signed.extend_from_slice(body);
    key.verify(&signed, &signature).is_ok()
}

/// The events of a SendGrid batch: `bounce` (SendGrid's `type` `blocked` is a soft bounce,
/// `bounce` is classed by its status), `deferred` (a delay) and `spamreport` (a complaint).
/// `dropped` is left out: SendGrid did not send, and said why when the address bounced.
pub fn sendgrid_items(events: &[Value]) -> Vec<Item> {
    events
        .iter()
        .filter_map(|event| {
            let address = event.get("email").and_then(text)?;
            let diagnostic = ["reason", "response"].iter().find_map(|k| event.get(*k).and_then(text));
            let status = event
                .get("status")
                .and_then(text)
                .filter(|s| is_enhanced_status(s))
                .or_else(|| diagnostic.as_deref().and_then(status_in));
            let kind = match event["event"].as_str()? {
                "bounce" if event["type"].as_str() == Some("blocked") => Kind::SoftBounce,
                "bounce" => bounce_kind(status.as_deref()),
                "deferred" => Kind::Delay,
                "spamreport" => Kind::Complaint,
                _ => return None,
            };
            let letter = event
                .get(LETTER_ID)
                .and_then(Value::as_str)
                .and_then(|id| ObjectId::parse_str(id).ok())
                .or_else(|| event["smtp-id"].as_str().and_then(letter_of_message_id));
            Some(Item {
                letter,
                address,
                kind,
                status,
                diagnostic,
                feedback_type: (kind == Kind::Complaint).then(|| "abuse".to_owned()),
            })
        })
        .collect()
}

async fn sendgrid(State(state): State<Arc<Webhooks>>, headers: HeaderMap, body: Bytes) -> Response {
    const RELAY: &str = "sendgrid";
    let Some(key) = &state.config.sendgrid_public_key else { return StatusCode::NOT_FOUND.into_response() };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(signature), Some(timestamp)) =
        (header("x-twilio-email-event-webhook-signature"), header("x-twilio-email-event-webhook-timestamp"))
    else {
        return refuse(&state, RELAY, Refused::Forged);
    };
    if !sendgrid_signature_holds(key, timestamp, &body, signature) {
        return refuse(&state, RELAY, Refused::Forged);
    }
    // Unix seconds, as SendGrid writes the header.
    let signed_ms = timestamp.trim().parse::<i64>().map(|s| s.saturating_mul(1000));
    if !signed_ms.is_ok_and(|signed_ms| fresh(signed_ms, state.feedback.store.now_ms(), WEBHOOK_MAX_AGE)) {
        return refuse(&state, RELAY, Refused::Stale);
    }
    let events: Vec<Value> = match serde_json::from_slice(&body) {
        Ok(events) => events,
        Err(error) => return bad_request(RELAY, format!("not a JSON array of events: {error}")),
    };
    take(&state, RELAY, Source::Sendgrid, sendgrid_items(&events)).await
}

// Postmark

/// Checks an `Authorization: Basic` header against the credentials, in constant time.
pub fn basic_auth_holds(authorization: Option<&str>, user: &SecretString, password: &SecretString) -> bool {
    let Some(encoded) = authorization.and_then(|a| a.strip_prefix("Basic ").or_else(|| a.strip_prefix("basic ")))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else { return false };
    let Some(colon) = decoded.iter().position(|&b| b == b':') else { return false };
    let (given_user, given_password) = (&decoded[..colon], &decoded[colon + 1..]);
    // Both compared, whatever the first gives, so the time tells nothing of which was wrong.
    let user_ok = given_user.ct_eq(user.expose_secret().as_bytes());
    let password_ok = given_password.ct_eq(password.expose_secret().as_bytes());
    (user_ok & password_ok).into()
}

/// The events of a Postmark webhook: a `Bounce` record (its `Type`: `HardBounce` and
/// `BadEmailAddress` hard, `Transient` a delay, the other failures soft, auto-replies and
/// the like nothing) or a `SpamComplaint` record.
pub fn postmark_items(record: &Value) -> Vec<Item> {
    let Some(address) = record.get("Email").and_then(text) else { return Vec::new() };
    let diagnostic = ["Details", "Description"].iter().find_map(|k| record.get(*k).and_then(text));
    let status = diagnostic.as_deref().and_then(status_in);
    let kind = match (record["RecordType"].as_str(), record["Type"].as_str()) {
        (Some("SpamComplaint"), _) => Kind::Complaint,
        (Some("Bounce"), Some("HardBounce" | "BadEmailAddress")) => Kind::HardBounce,
        (Some("Bounce"), Some("Transient")) => Kind::Delay,
        (
            Some("Bounce"),
            Some("SoftBounce" | "DnsError" | "Blocked" | "ContentRelated" | "SpamNotification" | "VirusNotification"),
        ) => Kind::SoftBounce,
        _ => return Vec::new(),
    };
    let letter = record["Metadata"].get(LETTER_ID).and_then(Value::as_str).and_then(|id| ObjectId::parse_str(id).ok());
    vec![Item {
        letter,
        address,
        kind,
        status,
        diagnostic,
        feedback_type: (kind == Kind::Complaint).then(|| "abuse".to_owned()),
    }]
}

async fn postmark(State(state): State<Arc<Webhooks>>, headers: HeaderMap, body: Bytes) -> Response {
    const RELAY: &str = "postmark";
    let Some((user, password)) = &state.config.postmark_credentials else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if !basic_auth_holds(authorization, user, password) {
        return refuse(&state, RELAY, Refused::Unauthenticated);
    }
    let record: Value = match serde_json::from_slice(&body) {
        Ok(record) => record,
        Err(error) => return bad_request(RELAY, format!("not JSON: {error}")),
    };
    take(&state, RELAY, Source::Postmark, postmark_items(&record)).await
}

// Amazon SES through SNS

/// Whether `url` may be fetched for an SNS signing certificate: HTTPS on
/// `sns.<region>.amazonaws.com` (or `.amazonaws.com.cn`), default port, no user info, a `.pem`.
pub fn sns_cert_url_ok(url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(url) else { return false };
    let Some(host) = url.host_str() else { return false };
    let region = host
        .strip_prefix("sns.")
        .and_then(|h| h.strip_suffix(".amazonaws.com").or_else(|| h.strip_suffix(".amazonaws.com.cn")));
    url.scheme() == "https"
        && url.port().is_none()
        && url.username().is_empty()
        && url.password().is_none()
        && region.is_some_and(|r| {
            !r.is_empty() && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
        && url.path().ends_with(".pem")
}

/// Whether a `SubscribeURL` may be fetched to confirm a subscription: HTTPS on Amazon's domain.
pub fn sns_subscribe_url_ok(url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(url) else { return false };
    url.scheme() == "https"
        && url.username().is_empty()
        && url.host_str().is_some_and(|h| h.ends_with(".amazonaws.com") || h.ends_with(".amazonaws.com.cn"))
}

/// The RSA key of a PEM certificate.
pub fn sns_key_of_pem(pem: &[u8]) -> anyhow::Result<rsa::RsaPublicKey> {
    use anyhow::Context as _;
    use rsa::pkcs8::DecodePublicKey as _;
    use x509_cert::der::{DecodePem as _, Encode as _};
    let certificate = x509_cert::Certificate::from_pem(pem).context("not a PEM certificate")?;
    let spki = certificate.tbs_certificate.subject_public_key_info.to_der().context("its public key")?;
    rsa::RsaPublicKey::from_public_key_der(&spki).context("not an RSA key")
}

/// The text SNS signs: the message's fields, by type, each as `name\nvalue\n`.
pub fn sns_string_to_sign(message: &Value) -> Option<String> {
    let names: &[&str] = match message["Type"].as_str()? {
        "Notification" => &["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"],
        "SubscriptionConfirmation" | "UnsubscribeConfirmation" => {
            &["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
        }
        _ => return None,
    };
    let mut text = String::new();
    for name in names {
        match message.get(*name).and_then(Value::as_str) {
            Some(value) => {
                text.push_str(name);
                text.push('\n');
                text.push_str(value);
                text.push('\n');
            }
            // Only a notification's subject is optional.
            None if *name == "Subject" => {}
            None => return None,
        }
    }
    Some(text)
}

/// Checks an SNS message's `Signature` (base64) with `key`: RSA PKCS#1 v1.5 over the string to
/// sign, with SHA-1 for `SignatureVersion` 1 and SHA-256 for 2.
pub fn sns_signature_holds(key: &rsa::RsaPublicKey, message: &Value) -> bool {
    use rsa::signature::Verifier as _;
    let Some(text) = sns_string_to_sign(message) else { return false };
    let Some(signature) = message["Signature"]
        .as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .and_then(|s| rsa::pkcs1v15::Signature::try_from(s.as_slice()).ok())
    else {
        return false;
    };
    match message["SignatureVersion"].as_str() {
        Some("1") => {
            rsa::pkcs1v15::VerifyingKey::<sha1::Sha1>::new(key.clone()).verify(text.as_bytes(), &signature).is_ok()
        }
        Some("2") => {
            rsa::pkcs1v15::VerifyingKey::<Sha256>::new(key.clone()).verify(text.as_bytes(), &signature).is_ok()
        }
        _ => false,
    }
}

/// An SNS message's signed `Timestamp` (RFC 3339, UTC: `2012-05-02T00:54:06.655Z`) in Unix
/// milliseconds.
pub fn sns_timestamp_ms(message: &Value) -> Option<i64> {
    let time = humantime::parse_rfc3339(message["Timestamp"].as_str()?.trim()).ok()?;
    let since_epoch = time.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since_epoch.as_millis()).ok()
}

/// The events of an SES notification (the `Message` of an SNS notification), as SES's
/// notifications (`notificationType`) or its event publishing (`eventType`) write them:
/// `Bounce` (`Permanent` is hard unless its status says otherwise; `Transient` and
/// `Undetermined` soft), `Complaint`, and `DeliveryDelay`.
pub fn ses_items(notification: &Value) -> Vec<Item> {
    let mail = &notification["mail"];
    let letter = mail["commonHeaders"]["messageId"].as_str().and_then(letter_of_message_id).or_else(|| {
        mail["headers"].as_array()?.iter().find_map(|h| {
            h["name"].as_str().filter(|n| n.eq_ignore_ascii_case("message-id"))?;
            h["value"].as_str().and_then(letter_of_message_id)
        })
    });
    let kind_of = notification["notificationType"].as_str().or_else(|| notification["eventType"].as_str());
    let recipients = |list: &Value, kind: &dyn Fn(Option<&str>) -> Kind, feedback_type: Option<String>| -> Vec<Item> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let address = r.get("emailAddress").and_then(text)?;
                let diagnostic = r.get("diagnosticCode").and_then(text);
                let status = r
                    .get("status")
                    .and_then(text)
                    .filter(|s| is_enhanced_status(s))
                    .or_else(|| diagnostic.as_deref().and_then(status_in));
                Some(Item {
                    letter,
                    address,
                    kind: kind(status.as_deref()),
                    status,
                    diagnostic,
                    feedback_type: feedback_type.clone(),
                })
            })
            .collect()
    };
    match kind_of {
        Some("Bounce") => {
            let bounce = &notification["bounce"];
            let permanent = bounce["bounceType"].as_str() == Some("Permanent");
            recipients(
                &bounce["bouncedRecipients"],
                &|status| match (permanent, status) {
                    (true, None) => Kind::HardBounce,
                    (true, status) => bounce_kind(status),
                    (false, _) => Kind::SoftBounce,
                },
                None,
            )
        }
        Some("Complaint") => {
            let complaint = &notification["complaint"];
            // SES's `not-spam` takes a complaint back, as ARF's does.
            if complaint["complaintFeedbackType"].as_str() == Some("not-spam") {
                return Vec::new();
            }
            let feedback_type = complaint["complaintFeedbackType"].as_str().unwrap_or("abuse").to_owned();
            recipients(&complaint["complainedRecipients"], &|_| Kind::Complaint, Some(feedback_type))
        }
        Some("DeliveryDelay") => {
            recipients(&notification["deliveryDelay"]["delayedRecipients"], &|_| Kind::Delay, None)
        }
        _ => Vec::new(),
    }
}

/// The key that signed an SNS message: `SNS_SIGNING_CERT_FILE`'s, or the certificate at its
/// (checked) `SigningCertURL`, fetched once.
async fn sns_key(state: &Webhooks, url: &str) -> anyhow::Result<rsa::RsaPublicKey> {
    use anyhow::Context as _;
    if let Some(key) = &state.sns_fixed_key {
        return Ok(key.clone());
    }
    if let Some(key) = state.sns_keys.lock().unwrap_or_else(PoisonError::into_inner).get(url) {
        return Ok(key.clone());
    }
    let response = state.http.get(url).send().await.with_context(|| format!("fetching {url}"))?;
    let response = response.error_for_status().with_context(|| format!("fetching {url}"))?;
    let pem = response.bytes().await.with_context(|| format!("reading {url}"))?;
    let key = sns_key_of_pem(&pem).with_context(|| format!("the certificate at {url}"))?;
    let mut keys = state.sns_keys.lock().unwrap_or_else(PoisonError::into_inner);
    // Amazon rotates its certificates rarely; a bound keeps a flood of URLs from growing this.
    if keys.len() >= 64 {
        keys.clear();
    }
    keys.insert(url.to_owned(), key.clone());
    Ok(key)
}

async fn ses(State(state): State<Arc<Webhooks>>, body: Bytes) -> Response {
    const RELAY: &str = "ses";
    let message: Value = match serde_json::from_slice(&body) {
        Ok(message) => message,
        Err(error) => return bad_request(RELAY, format!("not JSON: {error}")),
    };
    let topic = message["TopicArn"].as_str().unwrap_or_default();
    if !state.config.sns_topic_arns.iter().any(|t| t == topic) {
        return refuse(&state, RELAY, Refused::Topic);
    }
    let url = message["SigningCertURL"].as_str().unwrap_or_default();
    if !sns_cert_url_ok(url) {
        return refuse(&state, RELAY, Refused::Url);
    }
    let key = match sns_key(&state, url).await {
        Ok(key) => key,
        Err(error) => return try_later(RELAY, &TryLater::Failed(error)),
    };
    if !sns_signature_holds(&key, &message) {
        return refuse(&state, RELAY, Refused::Forged);
    }
    if !sns_timestamp_ms(&message).is_some_and(|signed_ms| fresh(signed_ms, state.feedback.store.now_ms(), SNS_MAX_AGE))
    {
        return refuse(&state, RELAY, Refused::Stale);
    }
    match message["Type"].as_str() {
        Some("SubscriptionConfirmation") => {
            let subscribe = message["SubscribeURL"].as_str().unwrap_or_default();
            if !sns_subscribe_url_ok(subscribe) {
                return refuse(&state, RELAY, Refused::Url);
            }
            match state.http.get(subscribe).send().await.and_then(reqwest::Response::error_for_status) {
                Ok(_) => {
                    tracing::info!(topic, "SNS subscription confirmed");
                    (StatusCode::OK, "subscription confirmed\n").into_response()
                }
                Err(error) => try_later(
                    RELAY,
                    &TryLater::Failed(anyhow::Error::new(error).context("confirming the SNS subscription")),
                ),
            }
        }
        Some("UnsubscribeConfirmation") => {
            tracing::warn!(topic, "SNS says this endpoint was unsubscribed from the topic");
            (StatusCode::OK, "noted\n").into_response()
        }
        _ => {
            let notification: Value = match message["Message"].as_str().map(serde_json::from_str) {
                Some(Ok(notification)) => notification,
                _ => return bad_request(RELAY, "the SNS message is not an SES notification".to_owned()),
            };
            take(&state, RELAY, Source::Ses, ses_items(&notification)).await
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn mailgun_signatures_as_mailgun_documents() {
        // The expected value computed apart, with Python's hmac:
        // hmac.new(key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
        let key = SecretString::from("key-3ax6xnjp29jd6fds4gc373sgvjxteol0");
        let (timestamp, token) = ("1529006854", "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0");
        let expected = "b63c0701c4f4b614f272106a1b367c5c3369bcdca664ae73ebd52787e45eef07";
        assert!(mailgun_signature_holds(&key, timestamp, token, expected));
        assert!(!mailgun_signature_holds(&key, "1529006855", token, expected), "another timestamp");
        assert!(!mailgun_signature_holds(&key, timestamp, &token.replace('a', "b"), expected), "another token");
        assert!(!mailgun_signature_holds(&SecretString::from("another-key-0123456789"), timestamp, token, expected));
        assert!(!mailgun_signature_holds(&key, timestamp, token, "not hex"));
        assert!(!mailgun_signature_holds(&key, timestamp, token, ""));
    }

    #[test]
    fn sendgrid_signatures_as_sendgrids_own_sample() {
        // From sendgrid-python's test/unit/test_eventwebhook.py (SendGrid's published sample).
        let key = crate::config::feedback::sendgrid_key(
            "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g==",
        )
        .unwrap();
        let signature =
            "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM=";
        let timestamp = "1600112502";
        let payload = concat!(
            r#"[{"email":"hello@world.com","event":"dropped","reason":"Bounced Address","#,
            r#""sg_event_id":"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA","#,
            r#""sg_message_id":"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0","#,
            r#""smtp-id":"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>","timestamp":1600112492}]"#,
            "\r\n"
        );
        assert!(sendgrid_signature_holds(&key, timestamp, payload.as_bytes(), signature));
        assert!(!sendgrid_signature_holds(&key, "1600112503", payload.as_bytes(), signature), "another timestamp");
        assert!(!sendgrid_signature_holds(&key, timestamp, &payload.as_bytes()[1..], signature), "another body");
        let other = "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDWYNH3j/0=";
        assert!(!sendgrid_signature_holds(&key, timestamp, payload.as_bytes(), other), "SendGrid's bad signature");
        let other_key = crate::config::feedback::sendgrid_key(
            "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqTxd43gyp8IOEto2LdIfjRQrIbsd4SXZkLW6jDutdhXSJCWHw8REntlo7aNDthvj+y7GjUuFDb/R1NGe1OPzpA==",
        )
        .unwrap();
        assert!(!sendgrid_signature_holds(&other_key, timestamp, payload.as_bytes(), signature), "another key");
        assert!(!sendgrid_signature_holds(&key, timestamp, payload.as_bytes(), "not base64!"));
        // The sample is a `dropped` event: nothing to record.
        let events: Vec<Value> = serde_json::from_str(payload).unwrap();
        assert!(sendgrid_items(&events).is_empty());
    }

    #[test]
    fn signatures_are_fresh_within_their_bound_each_way() {
        let now = 1_800_000_000_000_i64;
        let minute = 60_000_i64;
        assert!(fresh(now, now, WEBHOOK_MAX_AGE));
        assert!(fresh(now - 5 * minute, now, WEBHOOK_MAX_AGE), "five minutes old");
        assert!(!fresh(now - 5 * minute - 1, now, WEBHOOK_MAX_AGE), "older");
        assert!(fresh(now + 5 * minute, now, WEBHOOK_MAX_AGE), "a relay's clock five minutes fast");
        assert!(!fresh(now + 6 * minute, now, WEBHOOK_MAX_AGE), "further ahead");
        assert!(fresh(now - 59 * minute, now, SNS_MAX_AGE), "SNS retries for up to an hour");
        assert!(!fresh(now - 61 * minute, now, SNS_MAX_AGE));
        assert!(!fresh(now + 6 * minute, now, SNS_MAX_AGE), "ahead is bounded alike");
        assert!(!fresh(i64::MIN, now, SNS_MAX_AGE));
        assert_eq!(sns_timestamp_ms(&json!({ "Timestamp": "2012-05-02T00:54:06.655Z" })), Some(1_335_920_046_655));
        assert_eq!(sns_timestamp_ms(&json!({ "Timestamp": "yesterday" })), None);
        assert_eq!(sns_timestamp_ms(&json!({})), None);
    }

    #[test]
    fn postmark_basic_auth_is_checked_whole() {
        let (user, password) = (SecretString::from("postmark"), SecretString::from("a-password-of-20-chars"));
        let header = |raw: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw));
        assert!(basic_auth_holds(Some(&header("postmark:a-password-of-20-chars")), &user, &password));
        for wrong in ["postmark:a-password-of-20-char", "postmar:a-password-of-20-chars", "postmark", ":", ""] {
            assert!(!basic_auth_holds(Some(&header(wrong)), &user, &password), "{wrong}");
        }
        assert!(!basic_auth_holds(None, &user, &password));
        assert!(!basic_auth_holds(Some("Bearer postmark:a-password-of-20-chars"), &user, &password));
    }

    #[test]
    fn relay_events_map_to_ours() {
        let id = ObjectId::new();
        // Mailgun's documented `failed` event, with our Message-ID.
        let failed = json!({
            "event": "failed", "severity": "permanent", "reason": "bounce", "recipient": "alice@example.com",
            "delivery-status": { "code": 550, "message": "5.1.1 The email account that you tried to reach does not exist", "description": "" },
            "message": { "headers": { "message-id": format!("{}@example.com", id.to_hex()) } },
        });
        let items = mailgun_items(&failed);
        assert_eq!(items.len(), 1);
        assert_eq!(
            (items[0].letter, items[0].kind, items[0].status.as_deref()),
            (Some(id), Kind::HardBounce, Some("5.1.1"))
        );
        let temporary = json!({ "event": "failed", "severity": "temporary", "recipient": "a@example.com", "user-variables": { "letter_id": id.to_hex() } });
        assert_eq!(mailgun_items(&temporary)[0].kind, Kind::Delay);
        assert_eq!(mailgun_items(&temporary)[0].letter, Some(id));
        let full = json!({ "event": "failed", "severity": "permanent", "reason": "generic", "recipient": "a@example.com",
            "delivery-status": { "message": "552 5.2.2 mailbox full" } });
        assert_eq!(mailgun_items(&full)[0].kind, Kind::SoftBounce);
        assert_eq!(
            mailgun_items(&json!({ "event": "complained", "recipient": "a@example.com" }))[0].kind,
            Kind::Complaint
        );
        assert!(mailgun_items(&json!({ "event": "delivered", "recipient": "a@example.com" })).is_empty());
        assert!(mailgun_items(&json!({ "event": "failed", "severity": "permanent", "reason": "suppress-unsubscribe", "recipient": "a@example.com" })).is_empty());

        let events = vec![
            json!({ "email": "a@example.com", "event": "bounce", "type": "bounce", "status": "5.1.1", "reason": "550 5.1.1 unknown", "smtp-id": format!("<{}@example.com>", id.to_hex()) }),
            json!({ "email": "b@example.com", "event": "bounce", "type": "blocked", "status": "5.7.1", "letter_id": id.to_hex() }),
            json!({ "email": "c@example.com", "event": "deferred", "response": "400 try later" }),
            json!({ "email": "d@example.com", "event": "spamreport", "letter_id": id.to_hex() }),
            json!({ "email": "e@example.com", "event": "open" }),
        ];
        let items = sendgrid_items(&events);
        let kinds: Vec<_> = items.iter().map(|i| (i.address.as_str(), i.kind, i.letter)).collect();
        assert_eq!(
            kinds,
            [
                ("a@example.com", Kind::HardBounce, Some(id)),
                ("b@example.com", Kind::SoftBounce, Some(id)),
                ("c@example.com", Kind::Delay, None),
                ("d@example.com", Kind::Complaint, Some(id)),
            ]
        );

        // Postmark's documented bounce webhook sample, with our metadata.
        let bounce = json!({
            "RecordType": "Bounce", "MessageStream": "outbound", "ID": 4323372036854775807_u64, "Type": "HardBounce",
            "TypeCode": 1, "Name": "Hard bounce", "Tag": "Test", "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
            "Metadata": { "letter_id": id.to_hex() }, "ServerID": 23, "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
            "Details": "Test bounce details", "Email": "john@example.com", "From": "sender@example.com",
            "BouncedAt": "2019-11-05T16:33:54.9070259Z", "DumpAvailable": true, "Inactive": true, "CanActivate": true,
            "Subject": "Test subject", "Content": "<Full dump of bounce>"
        });
        let items = postmark_items(&bounce);
        assert_eq!(
            (items[0].letter, items[0].kind, items[0].address.as_str()),
            (Some(id), Kind::HardBounce, "john@example.com")
        );
        let complaint = json!({ "RecordType": "SpamComplaint", "Email": "john@example.com", "Metadata": {} });
        assert_eq!((postmark_items(&complaint)[0].kind, postmark_items(&complaint)[0].letter), (Kind::Complaint, None));
        assert!(
            postmark_items(&json!({ "RecordType": "Bounce", "Type": "AutoResponder", "Email": "a@example.com" }))
                .is_empty()
        );
        assert!(postmark_items(&json!({ "RecordType": "Delivery", "Email": "a@example.com" })).is_empty());
        assert_eq!(letter_of_message_id(&format!("<{}@example.com>", id.to_hex())), Some(id));
        assert_eq!(letter_of_message_id("<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>"), None);
    }

    fn sns_sign(message: &mut Value, version: &str) {
        use rsa::{pkcs8::DecodePrivateKey as _, signature::SignatureEncoding as _, signature::Signer as _};
        let pem = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sns/test-signing-key.pem"),
        )
        .unwrap();
        let key = rsa::RsaPrivateKey::from_pkcs8_pem(&pem).unwrap();
        let text = sns_string_to_sign(message).unwrap();
        let signature = match version {
            "1" => rsa::pkcs1v15::SigningKey::<sha1::Sha1>::new(key).sign(text.as_bytes()).to_vec(),
            _ => rsa::pkcs1v15::SigningKey::<Sha256>::new(key).sign(text.as_bytes()).to_vec(),
        };
        message["SignatureVersion"] = json!(version);
        message["Signature"] = json!(base64::engine::general_purpose::STANDARD.encode(signature));
    }

    #[test]
    fn sns_signatures_of_both_versions_and_only_amazons_urls() {
        let cert = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sns/test-signing-cert.pem"),
        )
        .unwrap();
        let key = sns_key_of_pem(&cert).unwrap();
        // The shape of AWS's documented notification.
        let mut message = json!({
            "Type": "Notification", "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "TopicArn": "arn:aws:sns:us-west-2:123456789012:MyTopic", "Subject": "My First Message",
            "Message": "Hello world!", "Timestamp": "2012-05-02T00:54:06.655Z",
            "SigningCertURL": "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
        });
        assert_eq!(
            sns_string_to_sign(&message).unwrap(),
            "Message\nHello world!\nMessageId\n22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324\nSubject\nMy First Message\n\
             Timestamp\n2012-05-02T00:54:06.655Z\nTopicArn\narn:aws:sns:us-west-2:123456789012:MyTopic\nType\nNotification\n"
        );
        for version in ["1", "2"] {
            sns_sign(&mut message, version);
            assert!(sns_signature_holds(&key, &message), "version {version}");
            let mut altered = message.clone();
            altered["Message"] = json!("Hello world?");
            assert!(!sns_signature_holds(&key, &altered), "version {version}, altered");
        }
        let mut other_version = message.clone();
        other_version["SignatureVersion"] = json!("1");
        assert!(!sns_signature_holds(&key, &other_version), "a SHA-256 signature is not a SHA-1 one");
        other_version["SignatureVersion"] = json!("3");
        assert!(!sns_signature_holds(&key, &other_version));

        assert!(sns_cert_url_ok("https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"));
        assert!(sns_cert_url_ok("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem"));
        for url in [
            "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
            "https://sns.us-east-1.amazonaws.com.evil.example/SimpleNotificationService-abc.pem",
            "https://evil.example/sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com@evil.example/x.pem",
            "https://user@sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com:8443/x.pem",
            "https://s3.amazonaws.com/x.pem",
            "https://sns..amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com/x.txt",
            "not a url",
        ] {
            assert!(!sns_cert_url_ok(url), "{url}");
        }
        assert!(sns_subscribe_url_ok("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=x"));
        for url in [
            "http://sns.us-east-1.amazonaws.com/?Action=x",
            "https://127.0.0.1/?Action=x",
            "https://amazonaws.com.evil.example/",
        ] {
            assert!(!sns_subscribe_url_ok(url), "{url}");
        }
    }

    #[test]
    fn ses_notifications_map_to_ours() {
        let id = ObjectId::new();
        // SES's documented bounce notification, with our Message-ID among the common headers.
        let bounce = json!({
            "notificationType": "Bounce",
            "bounce": { "bounceType": "Permanent", "bounceSubType": "General", "bouncedRecipients": [
                { "emailAddress": "jane@example.com", "status": "5.1.1", "action": "failed", "diagnosticCode": "smtp; 550 5.1.1 user unknown" },
                { "emailAddress": "richard@example.com" },
                { "emailAddress": "full@example.com", "status": "5.2.2", "action": "failed" } ],
                "timestamp": "2016-01-27T14:59:38.237Z", "feedbackId": "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000" },
            "mail": { "messageId": "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000", "source": "john@example.com",
                "commonHeaders": { "messageId": format!("<{}@example.com>", id.to_hex()) } },
        });
        let items = ses_items(&bounce);
        let kinds: Vec<_> = items.iter().map(|i| (i.address.as_str(), i.kind, i.letter)).collect();
        assert_eq!(
            kinds,
            [
                ("jane@example.com", Kind::HardBounce, Some(id)),
                ("richard@example.com", Kind::HardBounce, Some(id)),
                ("full@example.com", Kind::SoftBounce, Some(id)),
            ]
        );
        let transient = json!({ "eventType": "Bounce", "bounce": { "bounceType": "Transient", "bouncedRecipients": [{ "emailAddress": "a@example.com" }] },
            "mail": { "headers": [{ "name": "Message-ID", "value": format!("<{}@example.com>", id.to_hex()) }] } });
        assert_eq!(ses_items(&transient)[0].kind, Kind::SoftBounce);
        assert_eq!(ses_items(&transient)[0].letter, Some(id), "from the original headers");
        let complaint = json!({ "notificationType": "Complaint", "complaint": { "complainedRecipients": [{ "emailAddress": "a@example.com" }], "complaintFeedbackType": "abuse" }, "mail": {} });
        assert_eq!((ses_items(&complaint)[0].kind, ses_items(&complaint)[0].letter), (Kind::Complaint, None));
        let delay = json!({ "eventType": "DeliveryDelay", "deliveryDelay": { "delayedRecipients": [{ "emailAddress": "a@example.com", "status": "4.4.1" }] }, "mail": {} });
        assert_eq!(ses_items(&delay)[0].kind, Kind::Delay);
        assert!(ses_items(&json!({ "notificationType": "Delivery", "mail": {} })).is_empty());
    }
}
