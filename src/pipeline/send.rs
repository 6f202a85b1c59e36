//! The SMTP workers. Each worker keeps one connection open and reuses it between letters; all
//! workers (of all replicas) share one sending budget, taken before each transaction and paced at
//! its final dot. Every recipient goes in the envelope only, in transactions of at
//! most `SMTP_MAX_RECIPIENTS`; the SMTP conversation itself is `crate::smtp`'s, and what its
//! replies mean for the letter is `policy`'s.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lettre::message::Mailbox;
use rand::Rng;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    dispatch::{Claimed, LeaseClock},
    policy::{self, AttemptReport, Failure},
    queue::LaneQueue,
    rate_limit::RateLimit,
    report::Attempted,
};
use crate::budget::{Budget, Ticket};
use crate::priority::Lane;
use crate::{
    config::{RetryConfig, SmtpConfig},
    metrics::Metrics,
    model::{AttemptRecord, FailureKind, Letter, Outcome},
    smtp::{self, Connection},
    store::CANCELLED,
};

mod deliver;
mod individual;

/// Everything a worker needs that is shared by all workers.
pub struct SendContext {
    /// The SMTP settings every relay shares (timeouts, TLS, credentials).
    pub smtp: smtp::Settings,
    /// The relays of `SMTP_HOST`, in order of preference, with their circuit breakers (none in
    /// the sandbox).
    pub relays: Arc<smtp::Relays>,
    /// `SMTP_SANDBOX`: each transaction is `smtp::sandbox`'s, which opens no connection and
    /// hands the message to no one; everything around it (budget, lease, policy) is unchanged.
    pub sandbox: bool,
    pub from: Mailbox,
    /// Most recipients in one transaction (`RateLimit::transaction_recipients`).
    pub max_recipients: usize,
    /// A kept connection idle longer than this is checked with NOOP before use.
    pub idle_check_after: Duration,
    pub retry: RetryConfig,
    /// The process's one clock: due times are on MongoDB's, as leases are.
    pub clock: crate::clock::Clock,
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
        retry: RetryConfig,
        lease: Arc<LeaseClock>,
        budget: Arc<Budget>,
        metrics: Arc<Metrics>,
        composer: Arc<crate::deliverability::Composer>,
        paused: Arc<AtomicBool>,
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
        // In the sandbox no relay is used, so none is shown as one (`/ready`, the metrics).
        let addrs = if smtp.sandbox { &[][..] } else { &smtp.relays[..] };
        let relay_metrics = addrs.iter().map(|relay| metrics.relay(relay)).collect();
        let relays = Arc::new(smtp::Relays::new(&settings, addrs, smtp.breaker, relay_metrics));
        let clock = budget.clock().clone();
        let limiter = RateLimit::new(budget, smtp.throttle_recovery_step, metrics.clone());
        Ok(SendContext {
            smtp: settings,
            relays,
            sandbox: smtp.sandbox,
            from: smtp.from.clone(),
            max_recipients: limiter.transaction_recipients(smtp.max_recipients),
            idle_check_after: smtp.idle_check_after,
            retry,
            clock,
            limiter,
            lease,
            paused,
            unrecorded: Arc::new(Semaphore::new(smtp.max_senders * UNRECORDED_PER_WORKER)),
            composer,
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
    /// The `NotAfter` of the letter being sent, checked before each final dot.
    not_after: Option<i64>,
    /// Shutdown: a letter being sent stops after the transaction under way, or its wait for the
    /// next one's units, and goes back with what it delivered.
    shutdown: CancellationToken,
}

impl Worker {
    pub fn new(id: usize, ctx: Arc<SendContext>) -> Worker {
        Worker { id, ctx, connection: None, relay: 0, not_after: None, shutdown: CancellationToken::new() }
    }

    /// Sends letters until shutdown. A letter not yet started when shutdown comes is dropped
    /// here and returned to `awaiting` by the final release; a send in progress finishes unless
    /// `abort` fires (the shutdown deadline passed).
    pub async fn run(
        mut self,
        letters: Arc<LaneQueue>,
        outcomes: mpsc::Sender<Attempted>,
        shutdown: CancellationToken,
        abort: CancellationToken,
    ) {
        self.shutdown = shutdown.clone();
        loop {
            if letters.is_empty() {
                self.ctx.limiter.note_empty();
            }
            // A transactional letter is taken at once by any worker not sending; a bulk one
            // only in the worker's turn at the budget (`BulkTurn`), so bulk never holds units
            // far ahead of a transactional letter produced meanwhile.
            let (claimed, turn) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                claimed = letters.pop_urgent() => (claimed, None),
                (claimed, turn) = async {
                    let turn = self.ctx.limiter.bulk_turn().await;
                    (letters.pop().await, turn)
                } => match claimed {
                    Some(claimed) => (claimed, Some(turn)),
                    None => break,
                },
            };
            let mut turn = turn.filter(|_| claimed.letter.lane == Lane::Bulk);
            self.ctx.limiter.note_received(!letters.is_empty());
            // The first transaction's budget is taken here, where shutdown may still interrupt
            // the wait (the budget may be exhausted for hours); later ones, in `deliver`. While
            // paused, a letter is released without waiting for the budget, so a replica's claimed
            // letters are all back in `awaiting` within moments, not at the sending rate.
            let paused = self.ctx.paused.load(Ordering::Relaxed);
            let pending = claimed.letter.pending_recipients().len();
            // A letter claimed after its `NotAfter` is ended, not sent; one whose `NotAfter`
            // passes while it waits for the budget stops waiting then.
            let not_after = claimed.letter.not_after_ms;
            let expired = crate::lanes::expired(not_after, self.ctx.clock.now_ms());
            let stop = paused || expired || self.ctx.lease.cancelled(&claimed.letter.id);
            let ticket = if stop || pending == 0 {
                None
            } else {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    _ = crate::lanes::until_expiry(&self.ctx.clock, not_after) => None,
                    ticket = self.ctx.limiter.reserve(self.first_transaction(pending), turn.take()) => Some(ticket),
                }
            };
            // Not sent after all, or sent without the budget: the next bulk worker's turn.
            drop(turn);
            // The pause or a cancel may also have come while waiting for the budget.
            let paused = paused || self.ctx.paused.load(Ordering::Relaxed);
            if let Some(outcome) = self.not_to_send(&claimed, paused) {
                let record = AttemptRecord { letter: claimed.letter, outcome, published: false };
                if outcomes.send(Attempted { record, unrecorded: None, memory: claimed.memory }).await.is_err() {
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
            // Cancelled while sending: withdrawn before the dot (`LeaseClock::vouch`), not retried.
            let record = self.ctx.lease.end_if_cancelled(record);
            let record = crate::lanes::end_if_expired(record, self.ctx.clock.now_ms());
            if outcomes.send(Attempted { record, unrecorded: Some(unrecorded), memory }).await.is_err() {
                break;
            }
        }
        if let Some(connection) = self.connection.take() {
            connection.quit(Duration::from_secs(2)).await;
        }
        tracing::debug!(worker = self.id, "smtp worker stopped");
    }

    /// The recipients of a letter's first transaction, whose units are taken before it is
    /// claimed for good: one in individual mode (each copy is a message of its own). Taken for
    /// the whole chunk there, a letter's first units beyond one copy's were counted against the
    /// budget and never used.
    fn first_transaction(&self, pending: usize) -> usize {
        match self.ctx.composer.individual() {
            true => 1,
            false => pending.min(self.ctx.max_recipients),
        }
    }

    /// Why a claimed letter is not sent after all: its batch was cancelled (it ends `cancelled`,
    /// as the cancel ended the batch's waiting ones), sending is paused, or its lease is no
    /// longer trusted (both release it).
    fn not_to_send(&self, claimed: &Claimed, paused: bool) -> Option<Outcome> {
        let lease = &self.ctx.lease;
        let trusted = lease.trusted(claimed.claimed_at) && !lease.taken(&claimed.letter.id);
        if trusted && lease.cancelled(&claimed.letter.id) {
            tracing::info!(letter_id = %claimed.letter.id, "batch cancelled; claimed letter not sent");
            return Some(Outcome::Failed { kind: FailureKind::Cancelled, reason: CANCELLED.to_owned() });
        }
        if trusted && crate::lanes::expired(claimed.letter.not_after_ms, self.ctx.clock.now_ms()) {
            tracing::info!(letter_id = %claimed.letter.id, "NotAfter passed; claimed letter not sent");
            return Some(Outcome::Failed { kind: FailureKind::Expired, reason: crate::lanes::EXPIRED.to_owned() });
        }
        if paused {
            // A letter not started goes back to `awaiting` rather than waiting here leased, so a
            // cancel issued during the pause reaches it too.
            tracing::debug!(letter_id = %claimed.letter.id, "sending paused; letter released");
        } else if !trusted {
            // MongoDB has not confirmed our leases for too long, or the last renewal found this
            // letter leased to another replica: leave it to whoever holds it.
            tracing::warn!(letter_id = %claimed.letter.id, "lease no longer trusted; letter skipped");
        } else {
            return None;
        }
        // Released, not dropped: maintenance would otherwise renew its lease forever.
        Some(Outcome::Released)
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
        self.not_after = letter.not_after_ms;
        let recipients = letter.pending_recipients();
        let started = Instant::now();
        self.ctx.metrics.in_flight.inc();
        let lease = (claimed_at, letter.id);
        let report = match self.ctx.composer.build(&letter) {
            Err(error) => AttemptReport::failed(Failure::Permanent(error.to_string())),
            Ok(_) if recipients.is_empty() => AttemptReport::default(),
            Ok(_) if self.ctx.composer.individual() => {
                self.deliver_individually(&letter, recipients, lease, ticket).await
            }
            Ok(bytes) => self.deliver(recipients, &bytes, lease, ticket).await,
        };
        self.ctx.metrics.in_flight.dec();
        self.ctx.metrics.send_duration.observe(started.elapsed().as_secs_f64());
        let outcome =
            policy::decide(&mut letter, report, &self.ctx.retry, self.ctx.clock.now_ms(), rand::rng().random());
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
                tracing::info!(reason = %reason, retry_in_ms = due_ms - self.ctx.clock.now_ms(), "letter deferred");
            }
            Outcome::Released => {}
        }
        AttemptRecord { letter, outcome, published: false }
    }
}
