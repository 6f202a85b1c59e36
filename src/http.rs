//! The HTTP API: `POST /post` feeds a batch into the input topic, `POST /halt` shuts down
//! gracefully, and the probes and metrics for operators.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Request, State},
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
    kafka::{self, StatusProducer},
    metrics::Metrics,
    model::{EXPECTED_BATCH, Mailing, parse_batch},
    store::Store,
};

pub struct HttpState {
    pub producer: StatusProducer,
    pub store: Store,
    pub topic_in: String,
    pub smtp_addr: (String, u16),
    pub admin_token: Option<SecretString>,
    pub metrics: Arc<Metrics>,
    pub consumer_running: Arc<AtomicBool>,
    pub shutdown: CancellationToken,
    /// Readiness is cached briefly so frequent probes do not hammer the dependencies.
    pub readiness: Mutex<Option<(Instant, StatusCode, Value)>>,
    /// Not ready while the shared sending budget is unreachable: the instance sends nothing.
    pub budget: Arc<Budget>,
}

pub fn router(state: Arc<HttpState>, max_body_bytes: usize) -> Router {
    let admin = Router::new()
        .route("/post", post(post_batch))
        .route("/halt", post(halt))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(admin)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// A JSON error body: what went wrong and, where it helps, what was expected.
fn error(status: StatusCode, message: impl Into<String>, expected: Option<&str>) -> Response {
    let mut body = json!({ "error": message.into() });
    if let Some(expected) = expected {
        body["expected"] = json!(expected);
    }
    (status, Json(body)).into_response()
}

async fn index() -> Json<Value> {
    Json(json!({
        "service": "mailsender",
        "version": env!("CARGO_PKG_VERSION"),
        "endpoints": ["POST /post", "POST /halt", "GET /health", "GET /ready", "GET /metrics"],
    }))
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint",
        Some("one of POST /post, POST /halt, GET /health, GET /ready, GET /metrics"),
    )
}

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
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a batch the way ingest will, so a bad request is refused at the door with the index
/// and field at fault instead of becoming failed letters later.
pub fn check_batch(body: &[u8]) -> Result<Vec<Mailing>, String> {
    let mailings = parse_batch(body).map_err(|e| e.to_string())?;
    for (index, mailing) in mailings.iter().enumerate() {
        let checked = mailing.validate();
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
    let mailings = match check_batch(&body) {
        Ok(mailings) => mailings,
        Err(reason) => return error(StatusCode::BAD_REQUEST, reason, Some(EXPECTED_BATCH)),
    };
    let key = uuid::Uuid::new_v4().to_string();
    // Bounded well below a client's patience: with the broker down, librdkafka would keep
    // retrying for its whole message timeout.
    let delivery = tokio::time::timeout(
        Duration::from_secs(10),
        state.producer.send(&state.topic_in, Some(key.as_bytes()), &body, None),
    );
    let failure = match delivery.await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no acknowledgement within 10 s".to_owned()),
    };
    match failure {
        None => {
            tracing::info!(kafka_key = %key, mailings = mailings.len(), "batch accepted");
            (StatusCode::ACCEPTED, Json(json!({ "key": key, "mailings": mailings.len() }))).into_response()
        }
        Some(reason) => {
            tracing::warn!(error = %reason, "producing a posted batch failed");
            error(StatusCode::SERVICE_UNAVAILABLE, format!("Kafka did not accept the batch: {reason}"), None)
        }
    }
}

async fn halt(State(state): State<Arc<HttpState>>) -> Response {
    tracing::info!("halt requested over HTTP");
    state.shutdown.cancel();
    (StatusCode::ACCEPTED, Json(json!({ "status": "halting" }))).into_response()
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
    let smtp = async {
        let (host, port) = &state.smtp_addr;
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host.as_str(), *port))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("connecting to {host}:{port}: {e}")),
            Err(_) => Err(format!("connecting to {host}:{port}: timed out")),
        }
    };
    let mongo = async {
        match tokio::time::timeout(timeout, state.store.ping()).await {
            Ok(result) => result.map_err(|e| format!("{e:#}")),
            Err(_) => Err("ping timed out".to_owned()),
        }
    };
    let kafka = async { kafka::reachable(&state.producer, timeout).await.map_err(|e| format!("{e:#}")) };
    let (smtp, mongo, kafka) = tokio::join!(smtp, mongo, kafka);
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
        (StatusCode::OK, json!({ "status": "ready", "checks": checks }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, json!({ "status": "not ready", "checks": checks }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_check_names_the_mailing_and_the_problem() {
        let ok = br#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#;
        assert_eq!(check_batch(ok).unwrap().len(), 1);
        let bad_address = br#"[{"Subject":"s","Body":"b","Addresses":["a@x.org"],"Token":"t"},
            {"Subject":"s","Body":"b","Addresses":["nope"],"Token":"t"}]"#;
        let error = check_batch(bad_address).unwrap_err();
        assert!(error.starts_with("mailing 1:") && error.contains("nope"), "{error}");
        let crlf = br#"[{"Subject":"a\r\nBcc: x@y.org","Body":"b","Addresses":["a@x.org"],"Token":"t"}]"#;
        assert!(check_batch(crlf).unwrap_err().contains("line break"));
        assert!(check_batch(b"[]").unwrap_err().contains("empty"));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
    }
}
