//! The HTTP API: `POST /post` feeds a batch into the input topic, `POST /halt` shuts down
//! gracefully, the operator routes pause and resume sending, cancel, inspect and retry batches
//! and look letters up, and the probes and metrics for operators. docs/openapi.yaml describes it.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::{
    budget::Budget,
    idempotency::{self, Claim, IdempotencyKeys},
    kafka::{self, StatusProducer, Undelivered},
    metrics::Metrics,
    model::{EXPECTED_BATCH, Letter, Mailing, parse_batch},
    pipeline::report::Report,
    store::{BatchKey, Store},
};

pub struct HttpState {
    pub producer: StatusProducer,
    pub store: Store,
    pub topic_in: String,
    /// The SMTP relays, whose breakers the readiness detail shows.
    pub relays: Arc<crate::smtp::Relays>,
    /// `SMTP_SANDBOX`: no relay is used (nor checked), and `GET /` says so.
    pub sandbox: bool,
    pub admin_token: Option<SecretString>,
    /// Without `admin_token`, the networks whose peers may use the admin routes.
    pub admin_networks: Vec<crate::config::Network>,
    /// The deployment-wide pause.
    pub control: crate::control::Control,
    pub instance_id: String,
    /// Publishes the status messages of letters an operator cancels.
    pub report: Report,
    pub metrics: Arc<Metrics>,
    pub consumer_running: Arc<AtomicBool>,
    pub shutdown: CancellationToken,
    /// Readiness is cached briefly so frequent probes do not hammer the dependencies.
    pub readiness: Mutex<Option<(Instant, StatusCode, Value)>>,
    /// Not ready while the shared sending budget is unreachable: the instance sends nothing.
    pub budget: Arc<Budget>,
    pub posts: PostDoor,
    /// `ATTACHMENTS_MAX_COUNT` and `ATTACHMENTS_MAX_BYTES`, checked at the door as ingest checks them.
    pub attachments: crate::config::AttachmentLimits,
}

/// What `POST /post` produces with: its own producer, whose messages time out when the request
/// stops waiting (so a `503` is final), and the `Idempotency-Key`s in MongoDB.
pub struct PostDoor {
    pub producer: StatusProducer,
    /// `HTTP_POST_TIMEOUT`, the producer's message timeout.
    pub wait: Duration,
    pub keys: IdempotencyKeys,
}

impl PostDoor {
    /// After the message timeout, librdkafka reports within its once-a-second timeout scan; the
    /// margin is for that and for the report's way back.
    const REPORT_MARGIN: Duration = Duration::from_secs(5);

    pub fn new(config: &crate::config::Config, store: &Store, metrics: Arc<Metrics>) -> anyhow::Result<PostDoor> {
        let wait = config.http.post_timeout;
        Ok(PostDoor {
            producer: kafka::post_producer(&config.kafka, wait, metrics)?,
            wait,
            // A `pending` entry older than the longest wait belongs to a replica that stopped.
            keys: IdempotencyKeys::new(store, config.http.idempotency_window, wait + Self::REPORT_MARGIN * 2),
        })
    }
}

pub fn router(state: Arc<HttpState>, max_body_bytes: usize) -> Router {
    let admin = Router::new()
        .route("/post", post(post_batch))
        .route("/halt", post(halt))
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .route("/batches/{key}", get(batch_progress))
        .route("/batches/{key}/cancel", post(cancel_batch))
        .route("/batches/{key}/retry", post(retry_batch))
        .route("/letters/{id}", get(letter))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.yaml", get(openapi))
        .merge(admin)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn(move |request, next| answer_oversized(request, next, max_body_bytes)))
        .with_state(state)
}

/// How much of a body over the limit is read and dropped before the 413 goes, and for how long
/// at most (see [`answer_oversized`]).
const LINGER_BYTES: u64 = 64 << 20;
const LINGER_FOR: Duration = Duration::from_secs(5);

/// A body whose `Content-Length` is over the limit gets its 413 once it has been read (up to
/// [`LINGER_BYTES`], within [`LINGER_FOR`]) and dropped, with the connection closed after it,
/// as web servers' lingering close does. Answered at once, the connection closed with the
/// client's bytes unread, the kernel reset it, and a client still writing them never read the
/// answer: every 8 MiB post to a 4 KiB limit got "error sending request" instead of the 413 (and
/// one in about twenty suites a 900 KB one).
async fn answer_oversized(request: Request, next: Next, max_body_bytes: usize) -> Response {
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let Some(length) = length.filter(|length| *length > max_body_bytes as u64) else {
        return next.run(request).await;
    };
    let mut body = request.into_body().into_data_stream();
    let drain = async {
        let mut read = 0_u64;
        while read < LINGER_BYTES {
            match futures::StreamExt::next(&mut body).await {
                Some(Ok(chunk)) => read += chunk.len() as u64,
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_FOR, drain).await;
    let mut response = error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is {length} bytes; at most {max_body_bytes} are accepted (HTTP_MAX_BODY_BYTES)"),
        None,
    );
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response
}

/// A JSON error body: what went wrong and, where it helps, what was expected.
fn error(status: StatusCode, message: impl Into<String>, expected: Option<&str>) -> Response {
    let mut body = json!({ "error": message.into() });
    if let Some(expected) = expected {
        body["expected"] = json!(expected);
    }
    (status, Json(body)).into_response()
}

/// Every route the service serves; docs/openapi.yaml describes each.
pub const ENDPOINTS: [&str; 13] = [
    "GET /",
    "POST /post",
    "POST /halt",
    "POST /pause",
    "POST /resume",
    "GET /batches/{key}",
    "POST /batches/{key}/cancel",
    "POST /batches/{key}/retry",
    "GET /letters/{id}",
    "GET /health",
    "GET /ready",
    "GET /metrics",
    "GET /openapi.yaml",
];

async fn index(State(state): State<Arc<HttpState>>) -> Json<Value> {
    let control = state.control.state();
    // Why, by whom and since when, while paused (the reputation brake writes its rates here).
    let pause = control.paused.then(|| {
        json!({
            "cause": control.cause,
            "reason": control.reason,
            "by": control.updated_by,
            "since_ms": control.updated_ms,
        })
    });
    Json(json!({
        "service": "mailsender",
        "version": env!("CARGO_PKG_VERSION"),
        "paused": state.control.is_paused(),
        "sandbox": state.sandbox,
        "pause": pause,
        "endpoints": ENDPOINTS,
    }))
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint", Some(&format!("one of {}", ENDPOINTS.join(", "))))
}

/// The admin routes' guard. With `ADMIN_TOKEN` set, the bearer token is required from anywhere;
/// without it, only peers in `ADMIN_ALLOWED_NETWORKS` (loopback by default, which is how
/// `kubectl port-forward` arrives) are served, so an open port 8000 is not an open relay.
async fn require_admin(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.admin_token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !constant_time_eq(presented.as_bytes(), token.expose_secret().as_bytes()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token",
                Some("Authorization: Bearer <ADMIN_TOKEN>"),
            );
        }
        return next.run(request).await;
    }
    // Served without connect info (never in the binary), the peer is unknown: refuse.
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    if peer.is_some_and(|ip| state.admin_networks.iter().any(|n| n.contains(ip))) {
        return next.run(request).await;
    }
    let peer = peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_canonical().to_string());
    tracing::warn!(peer = %peer, path = %request.uri().path(), "admin request refused: peer outside ADMIN_ALLOWED_NETWORKS");
    error(
        StatusCode::FORBIDDEN,
        format!("admin routes without ADMIN_TOKEN answer only ADMIN_ALLOWED_NETWORKS; {peer} is not in them"),
        Some("a request from an allowed network (kubectl port-forward arrives from loopback), or set ADMIN_TOKEN"),
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    // `subtle` compares lengths first (the length is not secret), then every byte without an
    // early exit, and keeps the optimiser from adding one.
    a.ct_eq(b).into()
}

/// Checks a batch the way ingest will, so a bad request is refused at the door with the index
/// and field at fault instead of becoming failed letters later.
pub fn check_batch(body: &[u8], limits: &crate::config::AttachmentLimits) -> Result<Vec<Mailing>, String> {
    let mailings = parse_batch(body).map_err(|e| e.to_string())?;
    for (index, mailing) in mailings.iter().enumerate() {
        let checked = mailing.validate_within(limits);
        if let Some(rejection) = checked.rejected.first() {
            return Err(format!("mailing {index}: {}", rejection.reply));
        }
        if let Some(reason) = checked.error {
            return Err(format!("mailing {index}: {reason}"));
        }
    }
    Ok(mailings)
}

async fn post_batch(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    if state.shutdown.is_cancelled() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down", None);
    }
    // A body over HTTP_MAX_BODY_BYTES (413) or cut short gets the same JSON error shape as the rest.
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), rejection.body_text(), None),
    };
    let idempotency_key = match headers.get("idempotency-key").map(|v| idempotency::parse_key(v.as_bytes())) {
        None => None,
        Some(Ok(key)) => Some(key),
        Some(Err(reason)) => {
            return error(StatusCode::BAD_REQUEST, reason, Some("Idempotency-Key: <a key unique to this batch>"));
        }
    };
    let mailings = match check_batch(&body, &state.attachments) {
        Ok(mailings) => mailings,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason, Some(EXPECTED_BATCH)),
    };
    // In a task of its own: a client that hangs up drops this handler, and a key's entry must
    // still learn how its produce ended.
    match tokio::spawn(produce_batch(state, body, mailings.len(), idempotency_key)).await {
        Ok(answer) => answer.into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("producing the batch: {e}"), None),
    }
}

/// How a `POST /post` that passed validation ended.
#[derive(Debug)]
enum PostAnswer {
    /// Produced, now or by the first request with this `Idempotency-Key`.
    Accepted {
        key: String,
        mailings: i64,
        replayed: bool,
    },
    /// Kafka did not take the batch and will not: the client may retry.
    NotProduced(String),
    /// The broker may have the batch: the client must not send it again without looking.
    Unknown {
        key: String,
        reason: String,
    },
    InProgress {
        retry_after: Duration,
    },
    Mismatch,
    /// The key could not be recorded, so nothing was produced.
    KeysUnavailable(anyhow::Error),
}

impl IntoResponse for PostAnswer {
    fn into_response(self) -> Response {
        match self {
            PostAnswer::Accepted { key, mailings, replayed } => {
                let mut response =
                    (StatusCode::ACCEPTED, Json(json!({ "key": key, "mailings": mailings }))).into_response();
                if replayed {
                    response.headers_mut().insert("idempotent-replayed", header::HeaderValue::from_static("true"));
                }
                response
            }
            PostAnswer::NotProduced(reason) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("Kafka did not take the batch, and it will not be produced: {reason}"),
                Some("the same request again later (with the same Idempotency-Key, if one was sent)"),
            ),
            PostAnswer::Unknown { key, reason } => {
                let mut body = json!({
                    "error": format!("{reason}: the batch may have been produced under key {key}"),
                    "expected": format!("GET /batches/{key} once ingest had time, before sending the batch again"),
                });
                body["key"] = json!(key);
                (StatusCode::GATEWAY_TIMEOUT, Json(body)).into_response()
            }
            PostAnswer::InProgress { retry_after } => {
                let mut response = error(
                    StatusCode::CONFLICT,
                    "a request with this Idempotency-Key is still waiting for Kafka",
                    Some("the same request again after Retry-After seconds"),
                );
                let seconds = header::HeaderValue::from(retry_after.as_secs().max(1));
                response.headers_mut().insert(header::RETRY_AFTER, seconds);
                response
            }
            PostAnswer::Mismatch => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "this Idempotency-Key was used with another body",
                Some("a new Idempotency-Key for a different batch"),
            ),
            PostAnswer::KeysUnavailable(cause) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the Idempotency-Key could not be recorded, so nothing was produced: {cause:#}"),
                Some("the same request again later"),
            ),
        }
    }
}

/// Produces a checked batch under a fresh key, once per `Idempotency-Key`.
async fn produce_batch(
    state: Arc<HttpState>,
    body: Bytes,
    mailings: usize,
    idempotency_key: Option<String>,
) -> PostAnswer {
    use sha2::Digest as _;
    let door = &state.posts;
    let mailings = i64::try_from(mailings).unwrap_or(i64::MAX);
    let batch_key = uuid::Uuid::new_v4().to_string();
    if let Some(key) = &idempotency_key {
        let body_sha256 = format!("{:x}", sha2::Sha256::digest(&body));
        let claim = door.keys.claim(key, &batch_key, &body_sha256, mailings, state.store.now_ms()).await;
        match claim {
            Ok(Claim::Fresh) => {}
            Ok(Claim::Accepted { batch_key, mailings }) => {
                tracing::info!(kafka_key = %batch_key, idempotency_key = %key, "repeated batch answered, not produced");
                return PostAnswer::Accepted { key: batch_key, mailings, replayed: true };
            }
            Ok(Claim::InProgress) => return PostAnswer::InProgress { retry_after: door.wait },
            Ok(Claim::Unknown { batch_key }) => {
                let reason = "an earlier request with this Idempotency-Key did not learn whether Kafka took its batch";
                return PostAnswer::Unknown { key: batch_key, reason: reason.into() };
            }
            Ok(Claim::Mismatch) => return PostAnswer::Mismatch,
            Err(cause) => {
                tracing::warn!(error = format!("{cause:#}"), "recording an Idempotency-Key failed");
                return PostAnswer::KeysUnavailable(cause);
            }
        }
    }
    let delivery = tokio::time::timeout(
        door.wait + PostDoor::REPORT_MARGIN,
        door.producer.deliver(&state.topic_in, Some(batch_key.as_bytes()), &body, None),
    )
    .await;
    let answer = match delivery {
        Ok(Ok(())) => PostAnswer::Accepted { key: batch_key.clone(), mailings, replayed: false },
        Ok(Err(Undelivered { error, possibly_persisted: false })) => PostAnswer::NotProduced(error.to_string()),
        Ok(Err(Undelivered { error, possibly_persisted: true })) => PostAnswer::Unknown {
            key: batch_key.clone(),
            reason: format!("Kafka did not acknowledge the batch ({error}) after it was sent"),
        },
        Err(_) => PostAnswer::Unknown {
            key: batch_key.clone(),
            reason: format!("no delivery report within {}s", (door.wait + PostDoor::REPORT_MARGIN).as_secs()),
        },
    };
    if let Some(key) = &idempotency_key {
        let recorded = match &answer {
            PostAnswer::Accepted { .. } => door.keys.accepted(key, &batch_key).await,
            PostAnswer::NotProduced(_) => door.keys.release(key, &batch_key).await,
            _ => door.keys.unknown(key, &batch_key).await,
        };
        // Accepted but not recorded: the entry stays `pending`, and a repeat is told the outcome
        // is unknown rather than producing the batch again.
        if let Err(cause) = recorded {
            tracing::warn!(error = format!("{cause:#}"), idempotency_key = %key, "recording a /post outcome failed");
        }
    }
    match &answer {
        PostAnswer::Accepted { .. } => tracing::info!(kafka_key = %batch_key, mailings, "batch accepted"),
        PostAnswer::NotProduced(reason) => {
            tracing::warn!(error = %reason, "producing a posted batch failed; it will not be produced")
        }
        PostAnswer::Unknown { reason, .. } => {
            tracing::warn!(kafka_key = %batch_key, error = %reason, "a posted batch may or may not have been produced")
        }
        _ => {}
    }
    answer
}

async fn halt(State(state): State<Arc<HttpState>>) -> Response {
    tracing::info!("halt requested over HTTP");
    state.shutdown.cancel();
    (StatusCode::ACCEPTED, Json(json!({ "status": "halting" }))).into_response()
}

/// MongoDB failed or did not answer: the operator may retry.
fn unavailable(cause: &anyhow::Error) -> Response {
    tracing::warn!(error = format!("{cause:#}"), "an operator request failed");
    error(StatusCode::SERVICE_UNAVAILABLE, format!("{cause:#}"), None)
}

async fn pause(State(state): State<Arc<HttpState>>) -> Response {
    set_paused(&state, true).await
}

async fn resume(State(state): State<Arc<HttpState>>) -> Response {
    set_paused(&state, false).await
}

async fn set_paused(state: &HttpState, paused: bool) -> Response {
    match state.control.set_paused(paused, &state.instance_id, state.store.now_ms()).await {
        Ok(control) => {
            tracing::info!(paused, "sending {} deployment-wide over HTTP", if paused { "paused" } else { "resumed" });
            (StatusCode::OK, Json(json!(control))).into_response()
        }
        Err(e) => unavailable(&e),
    }
}

#[derive(Debug, serde::Deserialize)]
struct KeyQuery {
    /// The key's exact bytes, base64 (standard alphabet, padded): how a key that is not UTF-8 is
    /// addressed. The path segment is then ignored.
    key_b64: Option<String>,
}

/// `?key_b64=` that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("key_b64 is not base64: {0}")]
struct BadKey(base64::DecodeError);

impl IntoResponse for BadKey {
    fn into_response(self) -> Response {
        error(StatusCode::BAD_REQUEST, self.to_string(), Some("key_b64=<the key bytes in standard base64>"))
    }
}

/// The batch a request names: the path segment as a UTF-8 key, or `?key_b64=` for any bytes.
fn batch_key(key: String, query: &KeyQuery) -> Result<BatchKey, BadKey> {
    use base64::Engine as _;
    let Some(encoded) = &query.key_b64 else { return Ok(BatchKey::Text(key)) };
    let engine = base64::engine::general_purpose::STANDARD;
    let bytes = engine.decode(encoded.trim()).map_err(BadKey)?;
    // Letters store `key_b64` only for keys that are not UTF-8; the rest are found by text.
    Ok(match String::from_utf8(bytes) {
        Ok(text) => BatchKey::Text(text),
        Err(e) => BatchKey::Base64(engine.encode(e.into_bytes())),
    })
}

/// Extracts the [`BatchKey`] of `/batches/{key}…` routes.
struct Batch(BatchKey);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Batch {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Batch, Response> {
        let Path(key) = Path::<String>::from_request_parts(parts, state).await.map_err(IntoResponse::into_response)?;
        let Query(query) =
            Query::<KeyQuery>::from_request_parts(parts, state).await.map_err(IntoResponse::into_response)?;
        batch_key(key, &query).map(Batch).map_err(IntoResponse::into_response)
    }
}

async fn batch_progress(State(state): State<Arc<HttpState>>, Batch(key): Batch) -> Response {
    match state.store.batch_progress(&key).await {
        Ok(progress) if progress.letters == 0 => error(StatusCode::NOT_FOUND, "no letters stored with this key", None),
        Ok(progress) => (StatusCode::OK, Json(json!(progress))).into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn cancel_batch(State(state): State<Arc<HttpState>>, Batch(key): Batch) -> Response {
    // Recorded first, for every replica: the letters they already claimed end `cancelled` rather
    // than being sent (at once here, within the control watch's interval elsewhere).
    let now_ms = state.store.now_ms();
    if let Err(e) = state.control.cancel(&key, &state.instance_id, now_ms).await {
        return unavailable(&e);
    }
    let cancelled = match state.store.cancel_batch(&key, now_ms).await {
        Ok(cancelled) => cancelled,
        Err(e) => return unavailable(&e),
    };
    // Published now rather than by the republisher minutes later; what the broker does not
    // take stays `unreported` and the republisher sends it.
    let published = match state.report.publish_ended(&cancelled).await {
        Ok(published) => published,
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), "marking cancelled letters reported failed");
            0
        }
    };
    tracing::info!(batch = ?key, cancelled = cancelled.len(), published, "batch cancelled over HTTP");
    (StatusCode::OK, Json(json!({ "cancelled": cancelled.len(), "published": published }))).into_response()
}

async fn retry_batch(State(state): State<Arc<HttpState>>, Batch(key): Batch) -> Response {
    // Retried letters must not meet the batch's cancel on a replica that has not read yet that it
    // was forgotten: wait until every replica's control watch has read twice.
    match state.control.forget_cancel(&key).await {
        Ok(true) => tokio::time::sleep(2 * crate::control::POLL_INTERVAL).await,
        Ok(false) => {}
        Err(e) => return unavailable(&e),
    }
    match state.store.retry_batch(&key, state.store.now_ms()).await {
        Ok(retried) => {
            tracing::info!(batch = ?key, retried, "failed letters of a batch retried over HTTP");
            (StatusCode::OK, Json(json!({ "retried": retried }))).into_response()
        }
        Err(e) => unavailable(&e),
    }
}

async fn letter(State(state): State<Arc<HttpState>>, Path(id): Path<String>) -> Response {
    let Ok(id) = mongodb::bson::oid::ObjectId::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, "not a letter id", Some("24 hexadecimal digits"));
    };
    match state.store.letter_head(id).await {
        Ok(Some(letter)) => (StatusCode::OK, Json(letter_view(&letter))).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such letter", None),
        Err(e) => unavailable(&e),
    }
}

/// A letter for an operator: everything but the body, with each recipient's outcome.
fn letter_view(letter: &Letter) -> Value {
    // Compared as `Letter::pending_recipients` compares them.
    let key = |raw: &str| {
        crate::address::Recipient::parse(raw).map(|r| r.key()).unwrap_or_else(|_| raw.trim().to_lowercase())
    };
    let recipients: Vec<Value> = letter
        .addresses
        .iter()
        .map(|address| {
            let delivered = letter.delivered.iter().any(|d| key(d) == key(address));
            let refused = letter.rejected.iter().find(|r| key(&r.address) == key(address));
            let mut recipient = match (delivered, refused) {
                (true, _) => json!({ "address": address, "outcome": "delivered" }),
                (false, Some(r)) => json!({ "address": address, "outcome": "refused", "reply": r.reply }),
                (false, None) => json!({ "address": address, "outcome": "pending" }),
            };
            // What was reported after the relay took it (`crate::feedback`).
            let mut feedback: Vec<&crate::model::FeedbackNote> =
                letter.feedback.values().filter(|f| key(&f.address) == key(address)).collect();
            feedback.sort_by_key(|f| f.time_ms);
            if !feedback.is_empty() {
                recipient["feedback"] = json!(feedback);
            }
            recipient
        })
        .collect();
    json!({
        "id": letter.id.to_hex(),
        "status": letter.status,
        "error": letter.error,
        "kafka_key": letter.kafkakey,
        "key_null": letter.key_null == Some(1),
        "key_b64": letter.key_b64,
        "source": letter.source,
        "subject": letter.subject,
        "token": letter.token,
        "attempts": letter.attempts,
        "last_reply": letter.last_reply,
        "due_ms": letter.due_ms,
        "updated_ms": letter.updated_ms,
        "owner": letter.owner,
        "unreported": letter.unreported == Some(1),
        "send_at_ms": letter.send_at_ms,
        "not_after_ms": letter.not_after_ms,
        "metadata": letter.metadata,
        "lane": letter.lane,
        "tenant": letter.tenant,
        "weight": letter.weight,
        "vt": letter.vt,
        "recipients": recipients,
    })
}

/// The API's description, served so that clients and the tests read the very document shipped.
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], include_str!("../../docs/openapi.yaml")).into_response()
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn metrics(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if accept.contains("application/openmetrics-text") {
        let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        ([(header::CONTENT_TYPE, content_type)], state.metrics.encode_openmetrics()).into_response()
    } else {
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.encode()).into_response()
    }
}

async fn ready(State(state): State<Arc<HttpState>>) -> Response {
    let mut cache = state.readiness.lock().await;
    if let Some((at, status, body)) = cache.as_ref()
        && at.elapsed() < Duration::from_secs(2)
    {
        return (*status, Json(body.clone())).into_response();
    }
    let (status, body) = check_readiness(&state).await;
    *cache = Some((Instant::now(), status, body.clone()));
    (status, Json(body)).into_response()
}

async fn check_readiness(state: &HttpState) -> (StatusCode, Value) {
    let timeout = Duration::from_secs(2);
    // Each relay is reached concurrently; the instance is ready while any one is, since the
    // workers move to it (README "Several relays").
    let smtp = futures::future::join_all(state.relays.addrs().map(|relay| async move {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((relay.host.as_str(), relay.port))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("connecting to {relay}: {e}")),
            Err(_) => Err(format!("connecting to {relay}: timed out")),
        }
    }));
    let mongo = async {
        match tokio::time::timeout(timeout, state.store.ping()).await {
            Ok(result) => result.map_err(|e| format!("{e:#}")),
            Err(_) => Err("ping timed out".to_owned()),
        }
    };
    let kafka = async { kafka::reachable(&state.producer, timeout).await.map_err(|e| format!("{e:#}")) };
    let (relays, mongo, kafka) = tokio::join!(smtp, mongo, kafka);
    let detail: Vec<Value> = state
        .relays
        .status()
        .into_iter()
        .zip(&relays)
        .map(|(status, reached)| {
            json!({
                "relay": status.relay,
                "state": status.state.as_str(),
                "consecutive_failures": status.consecutive_failures,
                "probe_in_ms": status.probe_in.map(|d| d.as_millis() as u64),
                "reachable": reached.as_ref().err().cloned().unwrap_or_else(|| "ok".to_owned()),
            })
        })
        .collect();
    // The sandbox reaches no relay, so none needs to be reachable.
    let smtp = if state.sandbox || relays.iter().any(Result::is_ok) {
        Ok(())
    } else {
        Err(relays.into_iter().filter_map(Result::err).collect::<Vec<_>>().join("; "))
    };
    let consumer = if state.shutdown.is_cancelled() {
        Err("shutting down".to_owned())
    } else if state.consumer_running.load(Ordering::Relaxed) {
        Ok(())
    } else {
        Err("consumer not running".to_owned())
    };
    let budget = state.budget.status();
    let checks = [("kafka", kafka), ("mongo", mongo), ("smtp", smtp), ("consumer", consumer), ("budget", budget)];
    let ready = checks.iter().all(|(_, r)| r.is_ok());
    let checks: serde_json::Map<String, Value> = checks
        .into_iter()
        .map(|(name, result)| (name.to_owned(), json!(result.err().unwrap_or_else(|| "ok".to_owned()))))
        .collect();
    if ready {
        (StatusCode::OK, json!({ "status": "ready", "checks": checks, "smtp_relays": detail }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, json!({ "status": "not ready", "checks": checks, "smtp_relays": detail }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_check_names_the_mailing_and_the_problem() {
        let ok = br#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#;
        assert_eq!(check_batch(ok, &Default::default()).unwrap().len(), 1);
        let bad_address = br#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t"},
            {"Subject":"s","Body":"b","Addresses":["nope"],"Token":"t"}]"#;
        let error = check_batch(bad_address, &Default::default()).unwrap_err();
        assert!(error.starts_with("mailing 1:") && error.contains("nope"), "{error}");
        let crlf = br#"[{"Subject":"a\r\nBcc: x@y.org","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#;
        assert!(check_batch(crlf, &Default::default()).unwrap_err().contains("line break"));
        assert!(check_batch(b"[]", &Default::default()).unwrap_err().contains("empty"));
    }

    #[test]
    fn a_letter_view_has_each_recipients_outcome_and_no_body() {
        let mailing = Mailing {
            subject: "s".into(),
            body: "<p>secret body</p>".into(),
            addresses: vec!["A@x.org".into(), "b@x.org".into(), "c@x.org".into()],
            token: "t".into(),
            extra: Default::default(),
        };
        let mut letter = Letter::from_mailing(mailing, Some(b"k"), "src".into(), 0);
        letter.delivered = vec!["a@x.org".into()];
        letter.rejected = vec![crate::model::Rejection { address: "b@x.org".into(), reply: "550 no".into() }];
        let view = letter_view(&letter);
        assert!(!view.to_string().contains("secret body"), "{view}");
        let outcomes: Vec<(&str, &str)> = view["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["address"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
            .collect();
        assert_eq!(outcomes, [("A@x.org", "delivered"), ("b@x.org", "refused"), ("c@x.org", "pending")]);
        assert_eq!(view["recipients"][1]["reply"], "550 no");
    }

    #[test]
    fn batch_keys_come_from_the_path_or_from_base64() {
        let text = |key: &str, b64: Option<&str>| batch_key(key.into(), &KeyQuery { key_b64: b64.map(Into::into) });
        assert_eq!(text("k", None).unwrap(), BatchKey::Text("k".into()));
        assert_eq!(text("-", Some("aw==")).unwrap(), BatchKey::Text("k".into()));
        assert_eq!(text("-", Some("/v8Aaw==")).unwrap(), BatchKey::Base64("/v8Aaw==".into()));
        assert!(text("-", Some("*")).is_err());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
    }
}
