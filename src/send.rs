//! The SMTP workers. Each worker keeps one connection open and reuses it between letters; all
//! workers share one rate limiter. Every recipient goes in the envelope only (RCPT TO), one
//! command each, so a refused address fails alone instead of failing the letter.

use std::{
    collections::VecDeque,
    fmt, io,
    num::NonZeroU32,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lettre::{
    Address,
    transport::smtp::{
        authentication::{Credentials, Mechanism},
        client::{AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters},
        commands::{Data, Ehlo, Mail, Rcpt, Rset},
        extension::{ClientId, Extension, MailBodyParameter, MailParameter},
        response::Response,
    },
};
use rand::Rng;
use secrecy::ExposeSecret;
use tokio::{
    net::TcpStream,
    sync::{Semaphore, SetOnce, mpsc},
};
use tokio_util::{compat::Compat, sync::CancellationToken};
use tracing::Instrument;

use crate::{
    config::{DispatchConfig, SmtpConfig, TlsMode},
    dispatch::{Claimed, LeaseClock},
    message,
    metrics::Metrics,
    model::{Letter, Rejection, now_ms},
    store::{AttemptRecord, Outcome},
};

/// Why a send attempt failed, split the way callers act on it.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SendError {
    /// Worth retrying later: 4xx replies, refused or dropped connections, timeouts.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help: 5xx replies, a message that cannot be built.
    #[error("{0}")]
    Permanent(String),
}

impl SendError {
    fn from_smtp(context: &str, error: lettre::transport::smtp::Error) -> SendError {
        let text = format!("{context}: {error}");
        if error.is_permanent() { SendError::Permanent(text) } else { SendError::Transient(text) }
    }
}

/// What one SMTP transaction achieved, recipient by recipient.
#[derive(Debug, Default)]
pub struct Delivery {
    pub accepted: Vec<String>,
    /// Refused for good (5xx, or an address the server cannot take).
    pub refused: Vec<Rejection>,
    /// Refused for now (4xx): tried again on the next attempt.
    pub deferred: Vec<Rejection>,
    /// The server's reply to the message data, when it was sent.
    pub reply: Option<String>,
}

/// Everything a worker needs that is shared by all workers.
pub struct SendContext {
    pub smtp: SmtpConfig,
    pub retry: DispatchConfig,
    pub tls: Option<TlsParameters>,
    pub limiter: RateLimit,
    pub lease: Arc<LeaseClock>,
    pub metrics: Arc<Metrics>,
    /// Letters that reached the SMTP server and whose outcome is not stored yet. After a crash
    /// these are sent again, so their number is bounded: `UNRECORDED_PER_WORKER` per worker,
    /// enough for the report stage to batch its writes without stalling the workers.
    pub unrecorded: Arc<Semaphore>,
}

/// See [`SendContext::unrecorded`].
pub const UNRECORDED_PER_WORKER: usize = 8;

impl SendContext {
    pub fn new(
        smtp: SmtpConfig,
        retry: DispatchConfig,
        lease: Arc<LeaseClock>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let tls = match smtp.tls {
            TlsMode::None => None,
            _ => Some(tls_parameters(&smtp)?),
        };
        let unrecorded = Arc::new(Semaphore::new(smtp.max_senders * UNRECORDED_PER_WORKER));
        Ok(SendContext { limiter: RateLimit::new(&smtp), smtp, retry, tls, lease, metrics, unrecorded })
    }
}

/// The global rate limit shared by all workers: at most `rate_max_letters` per `rate_period`,
/// spread evenly, and never more than `rate_max_letters + rate_burst - 1` in any window of one
/// period, as counted by the receiving server.
///
/// governor paces the letters. Its GCRA restarts the schedule from a late wake-up, so with a
/// burst of exactly 1 every few hundred microseconds of timer latency is lost for good and the
/// rate falls 2–5 % short. One extra cell of burst absorbs that lateness. A sliding window then
/// keeps the hard cap. It remembers when each of the last `cap` sends *completed*, and a new send
/// starts only one period after the completion of the send `cap` places earlier. A server records
/// a letter before it acknowledges it, so however its own timing jitters, no window of one period
/// on its side can hold more than `cap`. The price is a rate short by about one transaction's
/// latency per period (0.5 % at 5 ms per 1 s).
pub struct RateLimit {
    pacer: DefaultDirectRateLimiter,
    /// Completion times of the last `cap` sends, oldest first; unset while a send is in progress.
    window: tokio::sync::Mutex<VecDeque<Arc<SetOnce<Instant>>>>,
    cap: usize,
    period: Duration,
}

/// Held for the duration of one send; records its completion in the rate limit's window when
/// dropped, whatever the outcome.
pub struct SendSlot(Option<Arc<SetOnce<Instant>>>);

impl Drop for SendSlot {
    fn drop(&mut self) {
        if let Some(done) = &self.0 {
            let _ = done.set(Instant::now());
        }
    }
}

/// Above this many letters per period the window costs more memory than it is worth; the
/// pacer alone then holds the rate.
const WINDOW_LIMIT: usize = 10_000;

impl RateLimit {
    pub fn new(smtp: &SmtpConfig) -> RateLimit {
        let interval = (smtp.rate_period / smtp.rate_max_letters).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(smtp.rate_burst.saturating_add(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(interval).unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX));
        let cap = (smtp.rate_max_letters + smtp.rate_burst - 1) as usize;
        RateLimit {
            pacer: RateLimiter::direct(quota.allow_burst(burst)),
            window: tokio::sync::Mutex::new(VecDeque::with_capacity(cap.min(WINDOW_LIMIT))),
            cap,
            period: smtp.rate_period,
        }
    }

    /// Waits until one more letter may be sent; hold the slot until the send is over.
    pub async fn acquire(&self) -> SendSlot {
        self.pacer.until_ready().await;
        if self.cap > WINDOW_LIMIT {
            return SendSlot(None);
        }
        // Held while waiting, so letters leave in the order the pacer admitted them.
        let mut window = self.window.lock().await;
        if window.len() >= self.cap
            && let Some(oldest) = window.front().cloned()
        {
            // Nothing is changed before the waits, so a cancelled wait leaves the window intact.
            let completed = *oldest.wait().await;
            tokio::time::sleep_until((completed + self.period).into()).await;
            window.pop_front();
        }
        let slot = Arc::new(SetOnce::new());
        window.push_back(slot.clone());
        SendSlot(Some(slot))
    }
}

fn tls_parameters(smtp: &SmtpConfig) -> anyhow::Result<TlsParameters> {
    use anyhow::Context as _;
    let mut builder = TlsParameters::builder(smtp.host.clone())
        .dangerous_accept_invalid_certs(smtp.tls_insecure_skip_verify)
        .dangerous_accept_invalid_hostnames(smtp.tls_insecure_skip_verify);
    if let Some(path) = &smtp.tls_ca_file {
        let pem = std::fs::read(path).with_context(|| format!("reading SMTP_TLS_CA_FILE {}", path.display()))?;
        let certificate = Certificate::from_pem(&pem)
            .with_context(|| format!("SMTP_TLS_CA_FILE {} is not a PEM certificate", path.display()))?;
        builder = builder.add_root_certificate(certificate);
    }
    builder.build_rustls().context("building the SMTP TLS configuration")
}

/// An open SMTP connection and what the server said it can do beyond what lettre tracks.
pub struct Session {
    connection: AsyncSmtpConnection,
    /// RFC 2920: MAIL, every RCPT and DATA go in one write, and their replies are read
    /// together, instead of one round trip each.
    pipelining: bool,
}

/// One SMTP worker and its reusable connection.
pub struct Worker {
    id: usize,
    ctx: Arc<SendContext>,
    connection: Option<Session>,
}

impl Worker {
    pub fn new(id: usize, ctx: Arc<SendContext>) -> Worker {
        Worker { id, ctx, connection: None }
    }

    /// Sends letters until shutdown. A letter not yet started when shutdown comes is dropped
    /// here and returned to `awaiting` by the final release; a send in progress finishes unless
    /// `abort` fires (the shutdown deadline passed).
    pub async fn run(
        mut self,
        letters: async_channel::Receiver<Claimed>,
        outcomes: mpsc::Sender<AttemptRecord>,
        shutdown: CancellationToken,
        abort: CancellationToken,
    ) {
        loop {
            let claimed = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                claimed = letters.recv() => match claimed {
                    Ok(claimed) => claimed,
                    Err(_) => break,
                },
            };
            let waiting = Instant::now();
            let slot = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                slot = self.ctx.limiter.acquire() => slot,
            };
            self.ctx.metrics.rate_limit_wait.observe(waiting.elapsed().as_secs_f64());
            if !self.ctx.lease.trusted(claimed.claimed_at) {
                // MongoDB has not confirmed our leases for too long: another replica may own
                // this letter by now. Leave it to whoever holds it.
                tracing::warn!(letter_id = %claimed.letter.id, "lease no longer trusted; letter skipped");
                // Released, not dropped: maintenance would otherwise renew its lease forever.
                let record = AttemptRecord {
                    letter: claimed.letter,
                    outcome: Outcome::Released,
                    published: false,
                    unrecorded: None,
                };
                if outcomes.send(record).await.is_err() {
                    break;
                }
                continue;
            }
            // A crash re-sends what reached the SMTP server but is not recorded yet: bound it.
            let unrecorded = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                permit = self.ctx.unrecorded.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let letter_id = claimed.letter.id;
            let record = tokio::select! {
                biased;
                _ = abort.cancelled() => {
                    tracing::warn!(letter_id = %letter_id, "send abandoned at the shutdown deadline");
                    break;
                }
                record = self.attempt(claimed.letter) => record,
            };
            // The server has answered: this is the completion the rate limit's window counts from.
            drop(slot);
            let record = AttemptRecord { unrecorded: Some(unrecorded), ..record };
            if outcomes.send(record).await.is_err() {
                break;
            }
        }
        if let Some(mut session) = self.connection.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), session.connection.quit()).await;
        }
        tracing::debug!(worker = self.id, "smtp worker stopped");
    }

    /// One attempt at one letter, turned into the record the report stage stores.
    pub async fn attempt(&mut self, letter: Letter) -> AttemptRecord {
        // Every line logged while sending carries the letter's id and source key.
        let span = tracing::info_span!("send", letter_id = %letter.id, kafka_key = %letter.kafkakey, attempt = letter.attempts + 1);
        self.attempt_in_span(letter).instrument(span).await
    }

    async fn attempt_in_span(&mut self, mut letter: Letter) -> AttemptRecord {
        letter.attempts += 1;
        let recipients = letter.pending_recipients();
        let started = Instant::now();
        self.ctx.metrics.in_flight.inc();
        let result = match recipients.first() {
            None => Err(SendError::Permanent("no recipient left to send to".into())),
            Some(first) => match message::build(&letter, &self.ctx.smtp.from, first) {
                Err(error) => Err(SendError::Permanent(error.to_string())),
                Ok(bytes) => match tokio::time::timeout(self.ctx.smtp.timeout, self.deliver(&recipients, &bytes)).await
                {
                    Ok(result) => result,
                    Err(_) => {
                        self.connection = None;
                        Err(SendError::Transient(format!(
                            "SMTP transaction timed out after {}",
                            humantime::format_duration(self.ctx.smtp.timeout)
                        )))
                    }
                },
            },
        };
        self.ctx.metrics.in_flight.dec();
        self.ctx.metrics.send_duration.observe(started.elapsed().as_secs_f64());
        let outcome = self.decide(&mut letter, result);
        match &outcome {
            Outcome::Sent => {
                self.ctx.metrics.sent.inc();
                tracing::info!(delivered = letter.delivered.len(), refused = letter.rejected.len(), "letter sent");
            }
            Outcome::Failed { reason } => tracing::warn!(reason = %reason, "letter failed"),
            Outcome::Retry { reason, due_ms } => {
                self.ctx.metrics.retried.inc();
                tracing::info!(reason = %reason, retry_in_ms = due_ms - now_ms(), "letter deferred");
            }
            Outcome::Released => {}
        }
        AttemptRecord { letter, outcome, published: false, unrecorded: None }
    }

    /// Applies the result of an attempt to the letter's recipient state and picks the outcome.
    fn decide(&self, letter: &mut Letter, result: Result<Delivery, SendError>) -> Outcome {
        let exhausted = letter.attempts as u32 >= self.ctx.retry.max_attempts;
        match result {
            Err(SendError::Permanent(reason)) => {
                self.ctx.metrics.fail("permanent");
                letter.last_reply = Some(reason.clone());
                Outcome::Failed { reason }
            }
            Err(SendError::Transient(reason)) => {
                letter.last_reply = Some(reason.clone());
                if exhausted {
                    self.ctx.metrics.fail("attempts_exhausted");
                    let reason = format!("gave up after {} attempts: {reason}", letter.attempts);
                    if letter.delivered.is_empty() { Outcome::Failed { reason } } else { Outcome::Sent }
                } else {
                    Outcome::Retry {
                        due_ms: now_ms() + backoff(&self.ctx.retry, letter.attempts).as_millis() as i64,
                        reason,
                    }
                }
            }
            Ok(delivery) => {
                letter.delivered.extend(delivery.accepted);
                letter.rejected.extend(delivery.refused);
                letter.last_reply = delivery.reply.or(letter.last_reply.take());
                if !delivery.deferred.is_empty() && !exhausted {
                    let reason =
                        format!("{} recipient(s) deferred: {}", delivery.deferred.len(), delivery.deferred[0].reply);
                    return Outcome::Retry {
                        due_ms: now_ms() + backoff(&self.ctx.retry, letter.attempts).as_millis() as i64,
                        reason,
                    };
                }
                letter.rejected.extend(delivery.deferred);
                if letter.delivered.is_empty() {
                    self.ctx.metrics.fail("recipients_refused");
                    let reason = match letter.rejected.first() {
                        Some(first) => {
                            format!("every recipient was refused; first: {} ({})", first.address, first.reply)
                        }
                        None => "no recipient accepted the letter".to_owned(),
                    };
                    Outcome::Failed { reason }
                } else {
                    Outcome::Sent
                }
            }
        }
    }

    /// Runs the transaction, on the kept connection when there is one. A kept connection the
    /// server closed while idle gets one fresh retry, which does not count as an attempt.
    async fn deliver(&mut self, recipients: &[String], message: &[u8]) -> Result<Delivery, SendError> {
        let reused = self.connection.is_some();
        match self.transaction(recipients, message).await {
            Err(SendError::Transient(reason)) if reused && self.connection.is_none() => {
                tracing::debug!(reason = %reason, "kept connection failed; reconnecting");
                self.transaction(recipients, message).await
            }
            other => other,
        }
    }

    async fn transaction(&mut self, recipients: &[String], message: &[u8]) -> Result<Delivery, SendError> {
        let mut session = match self.connection.take() {
            Some(session) if !session.connection.has_broken() => session,
            _ => connect(&self.ctx).await?,
        };
        let result = transaction(&mut session, &self.ctx, recipients, message).await;
        // Keep the connection only after a clean exchange; anything else may have left the
        // session mid-command.
        if result.is_ok() && !session.connection.has_broken() {
            self.connection = Some(session);
        } else {
            session.connection.abort().await;
        }
        result
    }
}

/// Exponential backoff with "equal jitter": half the delay is fixed, half random, so retries from
/// one outage spread out instead of returning together.
pub fn backoff(retry: &DispatchConfig, attempts: i32) -> Duration {
    let exponent = attempts.saturating_sub(1).clamp(0, 30) as u32;
    let delay = retry.backoff_base.saturating_mul(1 << exponent).min(retry.backoff_max);
    let half = delay / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

async fn connect(ctx: &SendContext) -> Result<Session, SendError> {
    let smtp = &ctx.smtp;
    let transient =
        |what: &str, e: &dyn fmt::Display| SendError::Transient(format!("{what} {}:{}: {e}", smtp.host, smtp.port));
    ctx.metrics.smtp_connections.inc();
    let tcp = TcpStream::connect((smtp.host.as_str(), smtp.port)).await.map_err(|e| transient("connecting to", &e))?;
    // lettre writes the message and its final dot separately; without TCP_NODELAY each letter
    // waits ~40 ms for a delayed ACK, capping a connection near 22 letters/s.
    tcp.set_nodelay(true).map_err(|e| transient("configuring socket to", &e))?;
    let hello = ClientId::Domain(smtp.helo_name.clone());
    let mut connection = match (&ctx.tls, smtp.tls) {
        (Some(tls), TlsMode::Implicit) => {
            // lettre offers no public way to wrap a socket we configured in TLS other than its
            // (deprecated-for-public-use) network stream; bridging it back to tokio's traits
            // keeps TCP_NODELAY and lettre's own certificate handling.
            #[allow(deprecated)]
            let mut stream = lettre::transport::smtp::client::AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
            stream.upgrade_tls(tls.clone()).await.map_err(|e| transient("TLS handshake with", &e))?;
            let stream = TlsStream(tokio_util::compat::FuturesAsyncReadCompatExt::compat(stream));
            AsyncSmtpConnection::connect_with_transport(Box::new(stream), &hello).await
        }
        _ => AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello).await,
    }
    .map_err(|e| SendError::from_smtp(&format!("greeting from {}:{}", smtp.host, smtp.port), e))?;

    if let Some(tls) = &ctx.tls {
        let offered = connection.can_starttls();
        match smtp.tls {
            TlsMode::StartTls if !offered => {
                return Err(SendError::Transient(format!(
                    "{}:{} does not offer STARTTLS, which SMTP_TLS=starttls requires",
                    smtp.host, smtp.port
                )));
            }
            TlsMode::StartTls | TlsMode::Opportunistic if offered => {
                connection.starttls(tls.clone(), &hello).await.map_err(|e| SendError::from_smtp("STARTTLS", e))?;
            }
            _ => {}
        }
    }
    if let (Some(user), Some(password)) = (&smtp.user, &smtp.password) {
        let credentials = Credentials::new(user.clone(), password.expose_secret().to_owned());
        connection
            .auth(&[Mechanism::Plain, Mechanism::Login], &credentials)
            .await
            .map_err(|e| SendError::from_smtp("authentication", e))?;
    }
    // lettre keeps only the EHLO keywords it uses; ask once more to learn about PIPELINING.
    let ehlo = connection.command(Ehlo::new(hello)).await.map_err(|e| SendError::from_smtp("EHLO", e))?;
    let pipelining = ehlo.message().any(|line| line.trim().eq_ignore_ascii_case("PIPELINING"));
    tracing::debug!(
        pipelining,
        encrypted = connection.is_encrypted() || smtp.tls == TlsMode::Implicit,
        "SMTP connection ready"
    );
    Ok(Session { connection, pipelining })
}

fn reply_text(response: &Response) -> String {
    let lines: Vec<&str> = response.message().collect();
    format!("{} {}", response.code(), lines.join(" "))
}

/// Several commands written at once (RFC 2920 pipelining). lettre writes a command's `Display`
/// in one go and reads one reply; the remaining replies are read with `read_response`.
struct Pipelined(String);

impl fmt::Display for Pipelined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

type Reply = Result<Response, lettre::transport::smtp::Error>;

/// A reply without a code means the connection failed, not the command.
fn is_network(error: &lettre::transport::smtp::Error) -> bool {
    !(error.is_permanent() || error.is_transient())
}

async fn transaction(
    session: &mut Session,
    ctx: &SendContext,
    recipients: &[String],
    message: &[u8],
) -> Result<Delivery, SendError> {
    let connection = &mut session.connection;
    let commands = &ctx.metrics.smtp_commands;
    let mut delivery = Delivery::default();
    let utf8 = connection.server_info().supports_feature(Extension::SmtpUtfEight);
    let mut envelope = Vec::with_capacity(recipients.len());
    for recipient in recipients {
        match recipient.parse::<Address>() {
            Ok(address) if AsRef::<str>::as_ref(&address).is_ascii() || utf8 => envelope.push(address),
            Ok(_) => delivery.refused.push(Rejection {
                address: recipient.clone(),
                reply: "the SMTP server does not support SMTPUTF8, required for this address".into(),
            }),
            Err(e) => {
                delivery.refused.push(Rejection { address: recipient.clone(), reply: format!("invalid address: {e}") })
            }
        }
    }
    if envelope.is_empty() {
        return Ok(delivery);
    }

    let mut parameters = Vec::new();
    if utf8 && envelope.iter().any(|a| !AsRef::<str>::as_ref(a).is_ascii()) {
        parameters.push(MailParameter::SmtpUtfEight);
    }
    if !message.is_ascii() && connection.server_info().supports_feature(Extension::EightBitMime) {
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let mail = Mail::new(Some(ctx.smtp.from.email.clone()), parameters);

    // Every reply is read before anything is decided, so the session stays in step whatever
    // the server answered.
    let (mail_reply, rcpt_replies, data_reply) = if session.pipelining {
        let mut batch = mail.to_string();
        for address in &envelope {
            batch.push_str(&Rcpt::new(address.clone(), Vec::new()).to_string());
        }
        batch.push_str(&Data.to_string());
        commands.inc_by(envelope.len() as u64 + 2);
        let mail_reply = connection.command(Pipelined(batch)).await;
        let mut rcpt_replies = Vec::with_capacity(envelope.len());
        for _ in &envelope {
            rcpt_replies.push(connection.read_response().await);
        }
        (mail_reply, rcpt_replies, Some(connection.read_response().await))
    } else {
        commands.inc();
        let mail_reply = connection.command(mail).await;
        let mut rcpt_replies: Vec<Reply> = Vec::with_capacity(envelope.len());
        if mail_reply.is_ok() {
            for address in &envelope {
                commands.inc();
                rcpt_replies.push(connection.command(Rcpt::new(address.clone(), Vec::new())).await);
            }
        }
        let any_accepted = rcpt_replies.iter().any(Result::is_ok);
        let data_reply = if any_accepted {
            commands.inc();
            Some(connection.command(Data).await)
        } else {
            None
        };
        (mail_reply, rcpt_replies, data_reply)
    };

    mail_reply.map_err(|e| SendError::from_smtp("MAIL FROM", e))?;
    for (address, reply) in envelope.iter().zip(rcpt_replies) {
        match reply {
            Ok(_) => delivery.accepted.push(address.to_string()),
            Err(e) if is_network(&e) => return Err(SendError::from_smtp("RCPT TO", e)),
            Err(e) if e.is_permanent() => {
                delivery.refused.push(Rejection { address: address.to_string(), reply: e.to_string() })
            }
            Err(e) => delivery.deferred.push(Rejection { address: address.to_string(), reply: e.to_string() }),
        }
    }
    match data_reply {
        // Lock-step with no recipient accepted: DATA was never sent. End the transaction
        // cleanly so the connection can be reused.
        None => {
            commands.inc();
            connection.command(Rset).await.map_err(|e| SendError::from_smtp("RSET", e))?;
            Ok(delivery)
        }
        // Pipelined with no recipient accepted: the server refuses DATA and the transaction is over.
        Some(Err(e)) if delivery.accepted.is_empty() && !is_network(&e) => Ok(delivery),
        Some(Err(e)) => Err(SendError::from_smtp("DATA", e)),
        Some(Ok(_)) if delivery.accepted.is_empty() => {
            Err(SendError::Transient("the server accepted DATA without any recipient".into()))
        }
        Some(Ok(_)) => {
            commands.inc();
            let reply = connection.message(message).await.map_err(|e| SendError::from_smtp("message data", e))?;
            delivery.reply = Some(reply_text(&reply));
            Ok(delivery)
        }
    }
}

/// Bridges lettre's TLS stream (futures-io traits) back to the tokio traits lettre's connection
/// takes.
#[allow(deprecated)]
struct TlsStream(Compat<lettre::transport::smtp::client::AsyncNetworkStream>);

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsStream")
    }
}

impl AsyncTokioStream for TlsStream {
    fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.get_ref().peer_addr()
    }
}

impl tokio::io::AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry() -> DispatchConfig {
        DispatchConfig {
            lease: Duration::from_secs(30),
            max_attempts: 5,
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(600),
            claim_batch: 256,
            poll_interval: Duration::from_secs(1),
            republish_interval: Duration::from_secs(30),
        }
    }

    fn smtp(period_ms: u64, max: u32, burst: u32) -> SmtpConfig {
        let mut vars: std::collections::HashMap<String, String> =
            [("KAFKA_BROKERS", "k:1"), ("MONGO_LOCAL", "mongodb://m"), ("SMTP_HOST", "h")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        vars.insert("SMTP_RATE_LIMIT_PERIOD".into(), format!("{period_ms}ms"));
        vars.insert("SMTP_RATE_LIMIT_MAX_LETTERS".into(), max.to_string());
        vars.insert("SMTP_RATE_LIMIT_BURST".into(), burst.to_string());
        crate::Config::from_vars(vars).unwrap().smtp
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rate_limit_caps_every_window_and_keeps_the_rate() {
        let limit = Arc::new(RateLimit::new(&smtp(200, 10, 1)));
        let start = Instant::now();
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (limit, times) = (limit.clone(), times.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..15 {
                    let _slot = limit.acquire().await;
                    times.lock().unwrap().push(start.elapsed());
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let mut times = times.lock().unwrap().clone();
        times.sort();
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..].iter().take_while(|u| **u < *t + Duration::from_millis(200)).count();
            assert!(in_window <= 10, "{in_window} sends within 200 ms from #{i}: {times:?}");
        }
        // 60 sends at 50/s: the last one is due at about 1.2 s (the first two go at once).
        let span = times.last().unwrap().as_secs_f64();
        assert!((1.1..1.35).contains(&span), "60 sends took {span:.3}s at 50/s");
    }

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_cap() {
        let retry = retry();
        for (attempt, nominal) in [(1, 10), (2, 20), (3, 40), (4, 80), (10, 600)] {
            for _ in 0..50 {
                let delay = backoff(&retry, attempt);
                assert!(
                    delay >= Duration::from_secs(nominal) / 2 && delay <= Duration::from_secs(nominal),
                    "{attempt}: {delay:?}"
                );
            }
        }
    }
}
