//! The SMTP workers. Each worker keeps one connection open and reuses it between letters; all
//! workers (of all replicas) share one sending budget, taken before each transaction and paced at
//! its final dot. Every recipient goes in the envelope only, in transactions of at
//! most `SMTP_MAX_RECIPIENTS`; the SMTP conversation itself is `crate::smtp`'s, and what its
//! replies mean for the letter is `policy`'s.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lettre::message::Mailbox;
use mongodb::bson::oid::ObjectId;
use rand::Rng;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    dispatch::{Claimed, LeaseClock},
    policy::{self, AttemptReport, Failure, Stop},
    rate_limit::RateLimit,
};
use crate::budget::{Budget, Ticket};
use crate::{
    address::Recipient,
    config::{DispatchConfig, SmtpConfig},
    metrics::Metrics,
    model::{AttemptRecord, FailureKind, Letter, Outcome, now_ms},
    smtp::{self, Connection, SmtpError, transaction},
    store::CANCELLED,
};

mod individual;

/// Everything a worker needs that is shared by all workers.
pub struct SendContext {
    /// The SMTP settings every relay shares (timeouts, TLS, credentials).
    pub smtp: smtp::Settings,
    /// The relays of `SMTP_HOST`, in order of preference, with their circuit breakers.
    pub relays: Arc<smtp::Relays>,
    pub from: Mailbox,
    /// Most recipients in one transaction.
    pub max_recipients: usize,
    /// A kept connection idle longer than this is checked with NOOP before use.
    pub idle_check_after: Duration,
    pub retry: DispatchConfig,
    pub limiter: RateLimit,
    pub lease: Arc<LeaseClock>,
    /// Set while sending is paused deployment-wide (`crate::control`); the app shares it.
    pub paused: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// Letters that reached the SMTP server and whose outcome is not stored yet. After a crash
    /// these are sent again, so their number is bounded: `UNRECORDED_PER_WORKER` per worker,
    /// enough for the report stage to batch its writes without stalling the workers.
    pub unrecorded: Arc<Semaphore>,
    /// Builds each letter's message: text alternative, List-Unsubscribe, DKIM.
    pub composer: Arc<crate::deliverability::Composer>,
}

/// See [`SendContext::unrecorded`].
pub const UNRECORDED_PER_WORKER: usize = 8;

impl SendContext {
    pub fn new(
        smtp: &SmtpConfig,
        retry: DispatchConfig,
        lease: Arc<LeaseClock>,
        budget: Arc<Budget>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let tls_config = match smtp.tls {
            smtp::TlsMode::None => None,
            _ => Some(smtp::client::tls_config(smtp.tls_ca_file.as_ref(), smtp.tls_insecure_skip_verify)?),
        };
        let settings = smtp::Settings {
            host: smtp.host.clone(),
            port: smtp.port,
            tls: smtp.tls,
            tls_config,
            helo_name: smtp.helo_name.clone(),
            credentials: smtp.user.clone().zip(smtp.password.clone()),
            timeouts: smtp.timeouts.clone(),
            commands: metrics.smtp_commands.clone(),
            connections: metrics.smtp_connections.clone(),
        };
        let relay_metrics = smtp.relays.iter().map(|relay| metrics.relay(relay)).collect();
        let relays = Arc::new(smtp::Relays::new(&settings, &smtp.relays, smtp.breaker, relay_metrics));
        Ok(SendContext {
            smtp: settings,
            relays,
            from: smtp.from.clone(),
            max_recipients: smtp.max_recipients,
            idle_check_after: smtp.idle_check_after,
            retry,
            limiter: RateLimit::new(budget, smtp.throttle_recovery_step, metrics.clone()),
            lease,
            paused: Arc::default(),
            unrecorded: Arc::new(Semaphore::new(smtp.max_senders * UNRECORDED_PER_WORKER)),
            composer: Arc::new(crate::deliverability::Composer::plain(smtp.from.clone())),
            metrics,
        })
    }
}

/// One SMTP worker and its reusable connection.
pub struct Worker {
    id: usize,
    ctx: Arc<SendContext>,
    connection: Option<Connection>,
    /// The relay `connection` goes to, as an index into `ctx.relays`.
    relay: usize,
}

impl Worker {
    pub fn new(id: usize, ctx: Arc<SendContext>) -> Worker {
        Worker { id, ctx, connection: None, relay: 0 }
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
            if letters.is_empty() {
                self.ctx.limiter.note_empty();
            }
            let claimed = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                claimed = letters.recv() => match claimed {
                    Ok(claimed) => claimed,
                    Err(_) => break,
                },
            };
            self.ctx.limiter.note_received(!letters.is_empty());
            // The first transaction's budget is taken here, where shutdown may still interrupt
            // the wait (the budget may be exhausted for hours); later ones, in `deliver`. While
            // paused, a letter is released without waiting for the budget, so a replica's claimed
            // letters are all back in `awaiting` within moments, not at the sending rate.
            let paused = self.ctx.paused.load(Ordering::Relaxed);
            let pending = claimed.letter.pending_recipients().len();
            let stop = paused || self.ctx.lease.cancelled(&claimed.letter.id);
            let ticket = if stop || pending == 0 || self.ctx.limiter.too_large(pending).is_some() {
                None
            } else {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    ticket = self.ctx.limiter.reserve(pending.min(self.ctx.max_recipients)) => Some(ticket),
                }
            };
            // The pause or a cancel may also have come while waiting for the budget. A letter of
            // a cancelled batch ends `cancelled`, as the cancel ended the batch's waiting ones.
            let paused = paused || self.ctx.paused.load(Ordering::Relaxed);
            let trusted = self.ctx.lease.trusted(claimed.claimed_at) && !self.ctx.lease.taken(&claimed.letter.id);
            let cancelled = trusted && self.ctx.lease.cancelled(&claimed.letter.id);
            if cancelled || paused || !trusted {
                if cancelled {
                    tracing::info!(letter_id = %claimed.letter.id, "batch cancelled; claimed letter not sent");
                } else if paused {
                    // A letter not started goes back to `awaiting` rather than waiting here
                    // leased, so a cancel issued during the pause reaches it too.
                    tracing::debug!(letter_id = %claimed.letter.id, "sending paused; letter released");
                } else {
                    // MongoDB has not confirmed our leases for too long, or the last renewal found
                    // this letter leased to another replica: leave it to whoever holds it.
                    tracing::warn!(letter_id = %claimed.letter.id, "lease no longer trusted; letter skipped");
                }
                // Released, not dropped: maintenance would otherwise renew its lease forever.
                let outcome = if cancelled {
                    Outcome::Failed { kind: FailureKind::Cancelled, reason: CANCELLED.to_owned() }
                } else {
                    Outcome::Released
                };
                let record = AttemptRecord {
                    letter: claimed.letter,
                    outcome,
                    published: false,
                    unrecorded: None,
                    memory: claimed.memory,
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
            let memory = claimed.memory;
            let record = tokio::select! {
                biased;
                _ = abort.cancelled() => {
                    tracing::warn!(letter_id = %letter_id, "send abandoned at the shutdown deadline");
                    break;
                }
                record = self.attempt(claimed.letter, claimed.claimed_at, ticket) => record,
            };
            let record = AttemptRecord { unrecorded: Some(unrecorded), memory, ..record };
            // Cancelled while sending: withdrawn before the dot (`LeaseClock::vouch`), not retried.
            let record = self.ctx.lease.end_if_cancelled(record);
            if outcomes.send(record).await.is_err() {
                break;
            }
        }
        if let Some(connection) = self.connection.take() {
            connection.quit(Duration::from_secs(2)).await;
        }
        tracing::debug!(worker = self.id, "smtp worker stopped");
    }

    /// One attempt at one letter, turned into the record the report stage stores.
    pub async fn attempt(&mut self, letter: Letter, claimed_at: Instant, ticket: Option<Ticket>) -> AttemptRecord {
        // Every line logged while sending carries the letter's id and source key.
        let span = tracing::info_span!("send", letter_id = %letter.id, kafka_key = %letter.kafkakey, attempt = letter.attempts + 1);
        self.attempt_in_span(letter, claimed_at, ticket).instrument(span).await
    }

    async fn attempt_in_span(
        &mut self,
        mut letter: Letter,
        claimed_at: Instant,
        ticket: Option<Ticket>,
    ) -> AttemptRecord {
        letter.attempts += 1;
        let recipients = letter.pending_recipients();
        let started = Instant::now();
        self.ctx.metrics.in_flight.inc();
        let lease = (claimed_at, letter.id);
        let too_large = self.ctx.limiter.too_large(recipients.len());
        let report = match self.ctx.composer.build(&letter) {
            Err(error) => AttemptReport { failure: Some(Failure::Permanent(error.to_string())), ..Default::default() },
            Ok(_) if recipients.is_empty() => AttemptReport::default(),
            Ok(bytes) => match too_large {
                Some(reason) => AttemptReport { failure: Some(Failure::Permanent(reason)), ..Default::default() },
                None if self.ctx.composer.individual() => {
                    self.deliver_individually(&letter, recipients, lease, ticket).await
                }
                None => self.deliver(recipients, &bytes, lease, ticket).await,
            },
        };
        self.ctx.metrics.in_flight.dec();
        self.ctx.metrics.send_duration.observe(started.elapsed().as_secs_f64());
        let outcome = policy::decide(&mut letter, report, &self.ctx.retry, now_ms(), rand::rng().random());
        match &outcome {
            Outcome::Sent => {
                self.ctx.metrics.sent.inc();
                tracing::info!(delivered = letter.delivered.len(), refused = letter.rejected.len(), "letter sent");
            }
            Outcome::Failed { kind, reason } => {
                self.ctx.metrics.fail(kind.label());
                tracing::warn!(reason = %reason, "letter failed");
            }
            Outcome::Retry { reason, due_ms } => {
                self.ctx.metrics.retried.inc();
                tracing::info!(reason = %reason, retry_in_ms = due_ms - now_ms(), "letter deferred");
            }
            Outcome::Released => {}
        }
        AttemptRecord { letter, outcome, published: false, unrecorded: None, memory: None }
    }

    /// Sends the message to `recipients`, in as many transactions as the chunk size and the
    /// server's recipient cap need, all in this one attempt.
    async fn deliver(
        &mut self,
        recipients: Vec<Recipient>,
        message: &[u8],
        lease: (Instant, ObjectId),
        ticket: Option<Ticket>,
    ) -> AttemptReport {
        let mut ticket = ticket;
        let mut report = AttemptReport::default();
        let mut queue: VecDeque<Recipient> = recipients.into();
        // Fresh connections taken because a kept one turned out broken, or the server found the
        // session in a bad state (503): they cost the letter nothing, but only once.
        let mut fresh_starts = 0;
        // Relays left because they failed before the message was handed over: free too, and at
        // most one fewer than there are relays, so the letter still ends when all are down.
        let mut relays_left: Vec<usize> = Vec::new();
        while !queue.is_empty() {
            let take = queue.len().min(self.ctx.max_recipients);
            let chunk: Vec<Recipient> = queue.drain(..take).collect();
            let reused = self.connection.is_some();
            let ctx = self.ctx.clone();
            // Taken before the transaction opens, so a long wait (an exhausted quota, MongoDB
            // away) never holds a server's DATA phase open; only the unit's own time is waited
            // for at the final dot. A unit not used (the transaction failed) is not given back.
            let ticket = match ticket.take().filter(|t| t.units == ctx.limiter.cost(chunk.len())) {
                Some(ticket) => ticket,
                None => ctx.limiter.reserve(chunk.len()).await,
            };
            let (result, withheld) = self.transmit(&chunk, message, ticket, lease, &relays_left).await;
            let step = match result {
                Ok(transaction) => {
                    if let Some(reply) = transaction.closing() {
                        if self.leave_relay(&reply, &mut relays_left) {
                            requeue(&mut queue, chunk);
                            continue;
                        }
                    } else if transaction.mail.is_some() {
                        self.ctx.relays.succeeded(self.relay);
                    }
                    self.apply(transaction, chunk, &mut queue, &mut report)
                }
                Err(error) if withheld => {
                    self.connection = None;
                    Step::Stop(policy::withheld(&error, crate::budget::HOLD_MAX))
                }
                Err(error) => {
                    self.connection = None;
                    if let Some(reply) = error.reply().filter(|r| r.is_throttle()) {
                        self.ctx.limiter.throttled(reply);
                    }
                    let retry_now = reused && fresh_starts == 0 && error.was_due_to_connection();
                    if retry_now {
                        tracing::debug!(error = %error, "kept connection failed before the message; reconnecting");
                        fresh_starts += 1;
                        requeue(&mut queue, chunk);
                        continue;
                    }
                    if error.was_due_to_relay() && self.leave_relay(&error, &mut relays_left) {
                        requeue(&mut queue, chunk);
                        continue;
                    }
                    Step::Stop(policy::failure_of(&error))
                }
            };
            match step {
                Step::Continue => {}
                Step::Reconnect(chunk) if fresh_starts == 0 => {
                    fresh_starts += 1;
                    self.connection = None;
                    requeue(&mut queue, chunk);
                }
                Step::Reconnect(_) => {
                    report.failure = Some(policy::out_of_step_twice());
                    break;
                }
                Step::Stop(failure) => {
                    report.failure = Some(failure);
                    break;
                }
            }
        }
        report
    }

    /// One transaction on the kept connection or a new one; says also whether the message was
    /// withdrawn for want of a budget unit.
    async fn transmit(
        &mut self,
        chunk: &[Recipient],
        message: &[u8],
        ticket: Ticket,
        lease: (Instant, ObjectId),
        avoid: &[usize],
    ) -> (Result<smtp::Transaction, SmtpError>, bool) {
        let ctx = self.ctx.clone();
        let connection = match self.session(avoid).await {
            Ok(connection) => connection,
            Err(error) => return (Err(error), false),
        };
        let mut withheld = false;
        let before_end = async {
            if !ctx.limiter.at_dot(ticket).await {
                withheld = true;
                return None;
            }
            // The lease is checked again right before the final dot, after the budget's wait: a
            // replica cut off from MongoDB must not hand over a letter another may already be
            // sending.
            ctx.lease.vouch(lease.0, &lease.1)
        };
        let from = ctx.from.email.as_ref();
        let result = transaction::send(connection, from, chunk, message, &ctx.smtp.timeouts, before_end).await;
        (result, withheld)
    }

    /// Books one transaction's judged replies into the attempt's report; says whether to go on.
    fn apply(
        &mut self,
        transaction: smtp::Transaction,
        chunk: Vec<Recipient>,
        queue: &mut VecDeque<Recipient>,
        report: &mut AttemptReport,
    ) -> Step {
        let judged = policy::judge(transaction, chunk, !queue.is_empty());
        for reply in &judged.throttles {
            self.ctx.limiter.throttled(reply);
        }
        if let Some(Stop::Reconnect(chunk, reply)) = judged.stop {
            tracing::info!(reply = %reply, "MAIL FROM refused with 503; reconnecting");
            return Step::Reconnect(chunk);
        }
        report.add(judged.refused, judged.deferred, judged.delivered);
        if judged.last_reply.is_some() {
            report.last_reply = judged.last_reply;
        }
        // Recipients over the server's cap go in the next transaction, at once.
        requeue(queue, judged.capped);
        match judged.stop {
            Some(Stop::Failed(failure)) => Step::Stop(failure),
            _ => Step::Continue,
        }
    }

    /// The kept connection, checked with NOOP when it sat idle, or a new one to the most
    /// preferred relay that opens a session, but those in `avoid` (the letter left them).
    async fn session(&mut self, avoid: &[usize]) -> Result<&mut Connection, SmtpError> {
        if let Some(connection) = self.connection.as_mut()
            && connection.idle() > self.ctx.idle_check_after
            && let Err(error) = connection.check(self.ctx.smtp.timeouts.short).await
        {
            tracing::debug!(error = %error, "idle connection no longer usable; reconnecting");
            self.connection = None;
        }
        // A more preferred relay is back (or due for its probe): the fallback is left for it.
        if self.connection.is_some()
            && self.ctx.relays.prefers_other_than(self.relay, avoid)
            && let Some(connection) = self.connection.take()
        {
            tracing::debug!(relay = %connection.server(), "a more preferred relay is usable again; leaving this one");
            tokio::spawn(connection.quit(self.ctx.smtp.timeouts.short));
        }
        let connection = match self.connection.take() {
            Some(connection) => connection,
            None => {
                let (connection, relay) = self.ctx.relays.connect(avoid).await?;
                self.relay = relay;
                connection
            }
        };
        Ok(self.connection.insert(connection))
    }

    /// The relay failed before the message was handed over: counts against it, and says whether
    /// the chunk goes to the next relay at once (one is left to try), costing nothing.
    fn leave_relay(&mut self, reason: &dyn std::fmt::Display, relays_left: &mut Vec<usize>) -> bool {
        let moving_on = relays_left.len() + 1 < self.ctx.relays.len() && !relays_left.contains(&self.relay);
        self.ctx.relays.failed(self.relay, reason, moving_on);
        if moving_on {
            relays_left.push(self.relay);
            self.connection = None;
        }
        moving_on
    }
}

/// What to do after a transaction.
enum Step {
    Continue,
    /// The session was at fault: send this chunk again on a new connection.
    Reconnect(Vec<Recipient>),
    Stop(Failure),
}

/// Puts recipients back at the front of the queue, in their order.
fn requeue(queue: &mut VecDeque<Recipient>, recipients: Vec<Recipient>) {
    for recipient in recipients.into_iter().rev() {
        queue.push_front(recipient);
    }
}
