//! The SMTP workers. Each worker keeps one connection open and reuses it between letters; all
//! workers (of all replicas) share one sending budget, taken before each transaction and paced at
//! its final dot. Every recipient goes in the envelope only, in transactions of at
//! most `SMTP_MAX_RECIPIENTS`; the SMTP conversation itself is `crate::smtp`'s, and what its
//! replies mean for the letter is `policy`'s.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
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
    rate_limit::RateLimit,
};
use crate::budget::{Budget, Ticket};
use crate::{
    address::Recipient,
    config::{DispatchConfig, SmtpConfig},
    metrics::Metrics,
    model::{AttemptRecord, Letter, Outcome, Rejection},
    smtp::{self, Command, Connection, RcptResult, Reply, SmtpError, transaction},
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
    pub idle: Arc<Idle>,
}

/// See [`SendContext::unrecorded`].
pub const UNRECORDED_PER_WORKER: usize = 8;

/// How long the workers must have found no letter waiting before the replica gives its budget
/// units back: longer than the dispatcher takes to hand over the next claim while it has letters.
const IDLE_GRACE: Duration = Duration::from_millis(20);

/// Watches for the moment this replica runs out of letters: a worker finds none waiting, and
/// none arrives for any worker within [`IDLE_GRACE`]. Then the units of the budget it holds go
/// back to the other replicas ([`Budget::give_back`]); the workers still sending hold their
/// tickets already.
pub struct Idle {
    /// Bumped whenever a worker gets a letter: a give-back sees whether any did during its grace.
    received: AtomicUsize,
    /// A give-back is waiting out its grace.
    pending: AtomicBool,
}

impl Idle {
    pub fn new() -> Arc<Idle> {
        Arc::new(Idle { received: AtomicUsize::new(0), pending: AtomicBool::new(false) })
    }

    /// A worker found no letter waiting.
    fn empty(self: &Arc<Self>, budget: &Arc<Budget>) {
        budget.letters_running_out(true);
        if self.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let received = self.received.load(Ordering::Acquire);
        let (idle, budget) = (self.clone(), budget.clone());
        tokio::spawn(async move {
            tokio::time::sleep(IDLE_GRACE).await;
            idle.pending.store(false, Ordering::Release);
            if idle.received.load(Ordering::Acquire) == received {
                budget.give_back().await;
            }
        });
    }

    /// A worker got a letter; `more` if others are waiting behind it.
    fn received(&self, budget: &Budget, more: bool) {
        self.received.fetch_add(1, Ordering::AcqRel);
        if more {
            budget.letters_running_out(false);
        }
    }
}

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
            clock: budget.clock().clone(),
            limiter: RateLimit::new(budget, smtp.throttle_recovery_step, metrics.clone()),
            lease,
            paused: Arc::default(),
            unrecorded: Arc::new(Semaphore::new(smtp.max_senders * UNRECORDED_PER_WORKER)),
            composer: Arc::new(crate::deliverability::Composer::plain(smtp.from.clone())),
            idle: Idle::new(),
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
}

impl Worker {
    pub fn new(id: usize, ctx: Arc<SendContext>) -> Worker {
        Worker { id, ctx, connection: None, relay: 0, not_after: None }
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
                self.ctx.idle.empty(self.ctx.limiter.budget());
            }
            let claimed = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                claimed = letters.recv() => match claimed {
                    Ok(claimed) => claimed,
                    Err(_) => break,
                },
            };
            self.ctx.idle.received(self.ctx.limiter.budget(), !letters.is_empty());
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
            let ticket = if stop || pending == 0 || self.ctx.limiter.too_large(pending).is_some() {
                None
            } else {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    _ = crate::lanes::until_expiry(&self.ctx.clock, not_after) => None,
                    ticket = self.ctx.limiter.reserve(pending.min(self.ctx.max_recipients)) => Some(ticket),
                }
            };
            // The pause or a cancel may also have come while waiting for the budget. A letter of
            // a cancelled batch ends `cancelled`, as the cancel ended the batch's waiting ones.
            let paused = paused || self.ctx.paused.load(Ordering::Relaxed);
            let trusted = self.ctx.lease.trusted(claimed.claimed_at) && !self.ctx.lease.taken(&claimed.letter.id);
            let cancelled = trusted && self.ctx.lease.cancelled(&claimed.letter.id);
            let expired = trusted && crate::lanes::expired(not_after, self.ctx.clock.now_ms());
            if cancelled || expired || paused || !trusted {
                if cancelled {
                    tracing::info!(letter_id = %claimed.letter.id, "batch cancelled; claimed letter not sent");
                } else if expired {
                    tracing::info!(letter_id = %claimed.letter.id, "NotAfter passed; claimed letter not sent");
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
                    Outcome::Failed { reason: CANCELLED.to_owned() }
                } else if expired {
                    Outcome::Failed { reason: crate::lanes::EXPIRED.to_owned() }
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
            let record = crate::lanes::end_if_expired(record, self.ctx.clock.now_ms());
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
        self.not_after = letter.not_after_ms;
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
        let outcome =
            policy::decide(&mut letter, report, &self.ctx.retry, self.ctx.clock.now_ms(), rand::rng().random());
        match &outcome {
            Outcome::Sent => {
                self.ctx.metrics.sent.inc();
                tracing::info!(delivered = letter.delivered.len(), refused = letter.rejected.len(), "letter sent");
            }
            Outcome::Failed { reason } => {
                self.ctx.metrics.fail(failure_class(reason));
                tracing::warn!(reason = %reason, "letter failed");
            }
            Outcome::Retry { reason, due_ms } => {
                self.ctx.metrics.retried.inc();
                tracing::info!(reason = %reason, retry_in_ms = due_ms - self.ctx.clock.now_ms(), "letter deferred");
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
        lease: (Instant, mongodb::bson::oid::ObjectId),
        ticket: Option<Ticket>,
    ) -> AttemptReport {
        let mut ticket = ticket;
        let mut report = AttemptReport::default();
        let not_after = self.not_after;
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
            let metrics = ctx.metrics.clone();
            let lease_clock = ctx.lease.clone();
            let clock = ctx.clock.clone();
            let budget = ctx.limiter.budget().clone();
            let withheld = Arc::new(AtomicBool::new(false));
            let withheld_flag = withheld.clone();
            let before_end = async move {
                let at_dot = tokio::time::Instant::now();
                let hold_until = at_dot + crate::budget::HOLD_MAX;
                budget.prepared(at_dot.duration_since(ticket.issued));
                let mut ticket = ticket;
                loop {
                    ticket.wait().await;
                    let late = tokio::time::Instant::now().saturating_duration_since(ticket.unit);
                    if late <= budget.plan().late {
                        metrics.budget_lateness.observe(late.as_secs_f64());
                        // Off unless asked for (`RUST_LOG=…,mailsender::dot=trace`): every dot's time
                        // as this replica saw it, so the spacing can be checked apart from how a relay
                        // records it (the benchmark does).
                        tracing::trace!(
                            target: "mailsender::dot",
                            at_unix_us = budget.clock().host_ns() / 1_000,
                            late_us = late.as_micros() as u64,
                            units = ticket.units,
                            "final dot"
                        );
                        break;
                    }
                    metrics.budget_units_missed.inc_by(u64::from(ticket.units));
                    budget.missed(&ticket);
                    // Too late for its unit (a slow connection, a late wake-up): the dot on it
                    // could crowd the next window, so the message waits for a new one.
                    tracing::debug!(late_ms = late.as_secs_f64() * 1e3, "late for the budget's unit; taking another");
                    // Bounded: the DATA phase is open (see `budget::HOLD_MAX`).
                    match tokio::time::timeout_at(hold_until, budget.take(ticket.units)).await {
                        Ok(next) if next.at <= hold_until => ticket = next,
                        _ => {
                            metrics.budget_withdrawn.inc();
                            withheld_flag.store(true, Ordering::Relaxed);
                            return None;
                        }
                    }
                }
                metrics.rate_limit_wait.observe((ticket.waited + at_dot.elapsed()).as_secs_f64());
                // The lease is checked again right before the final dot, after the budget's wait:
                // a replica cut off from MongoDB must not hand over a letter another may already
                // be sending.
                // So is `NotAfter`: a message whose time passed is withdrawn, never delivered late.
                lease_clock.vouch(lease.0, &lease.1).filter(|_| !crate::lanes::expired(not_after, clock.now_ms()))
            };
            let result = match self.session(&relays_left).await {
                Ok(connection) => {
                    transaction::send(
                        connection,
                        &ctx.composer.envelope_sender(&lease.1),
                        &chunk,
                        message,
                        &ctx.smtp.timeouts,
                        before_end,
                    )
                    .await
                }
                Err(error) => Err(error),
            };
            let step = match result {
                Ok(transaction) => {
                    if let Some(reply) = closing(&transaction) {
                        if self.leave_relay(&reply, &mut relays_left) {
                            requeue(&mut queue, chunk);
                            continue;
                        }
                    } else if transaction.mail.is_some() {
                        self.ctx.relays.succeeded(self.relay);
                    }
                    self.apply(transaction, chunk, &mut queue, &mut report)
                }
                Err(error) if withheld.load(Ordering::Relaxed) => {
                    self.connection = None;
                    tracing::warn!(
                        hold_ms = crate::budget::HOLD_MAX.as_millis() as u64,
                        "no unit of the budget within the hold bound; message withdrawn before its final dot"
                    );
                    Step::Stop(Failure::Withheld(format!(
                        "{error}: the sending budget had no unit for it within {:?}; nothing was delivered",
                        crate::budget::HOLD_MAX
                    )))
                }
                Err(error) => {
                    self.connection = None;
                    if let Some(reply) = error.reply().filter(|r| r.is_throttle()) {
                        self.ctx.limiter.throttled(reply);
                    }
                    let retry_now = reused && fresh_starts == 0 && is_stale_connection(&error);
                    if retry_now {
                        tracing::debug!(error = %error, "kept connection failed before the message; reconnecting");
                        fresh_starts += 1;
                        requeue(&mut queue, chunk);
                        continue;
                    }
                    if is_relay_failure(&error) && self.leave_relay(&error, &mut relays_left) {
                        requeue(&mut queue, chunk);
                        continue;
                    }
                    Step::Stop(failure_of(&error))
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
                    report.failure =
                        Some(Failure::Transient("the SMTP server refused MAIL FROM twice with 503".to_owned()));
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

    /// Turns one transaction's replies into recipient outcomes; says whether to go on.
    fn apply(
        &mut self,
        transaction: smtp::Transaction,
        chunk: Vec<Recipient>,
        queue: &mut VecDeque<Recipient>,
        report: &mut AttemptReport,
    ) -> Step {
        if let Some(mail) = transaction.mail.as_ref().filter(|m| !m.is_positive()) {
            if mail.code == 503 {
                // The server thinks a transaction is still open: a fault of the session, not of
                // the letter. Start over on a new connection.
                tracing::info!(reply = %mail, "MAIL FROM refused with 503; reconnecting");
                return Step::Reconnect(chunk);
            }
            return Step::Stop(self.failure_of_reply(mail));
        }
        let mut accepted = Vec::new();
        let mut capped = Vec::new();
        let mut first_cap = None;
        let refused_before = report.refused.len();
        let delivered_now = transaction.delivered();
        for (recipient, result) in chunk.into_iter().zip(transaction.rcpt) {
            match result {
                RcptResult::Unsendable(reason) => {
                    report.refused.push(Rejection { address: recipient.to_string(), reply: reason })
                }
                RcptResult::Replied(reply) if reply.is_positive() => accepted.push(recipient),
                RcptResult::Replied(reply) if reply.is_too_many_recipients() => {
                    first_cap.get_or_insert(reply);
                    capped.push(recipient);
                }
                RcptResult::Replied(reply) if reply.is_permanent() => {
                    report.refused.push(Rejection { address: recipient.to_string(), reply: reply.to_string() })
                }
                RcptResult::Replied(reply) => {
                    if reply.is_throttle() {
                        self.ctx.limiter.throttled(&reply);
                    }
                    report.deferred.push(Rejection { address: recipient.to_string(), reply: reply.to_string() })
                }
            }
        }
        let refused_now = report.refused.len() > refused_before;
        // Recipients over the server's cap go in the next transaction, at once.
        requeue(queue, capped);
        if delivered_now {
            report.delivered.extend(accepted.iter().map(Recipient::to_string));
            report.last_reply = transaction.end.as_ref().map(Reply::to_string);
        } else if !accepted.is_empty() {
            // Recipients were accepted, but the message was not: DATA or the final reply.
            let refusal = transaction.end.as_ref().or(transaction.data.as_ref());
            if let Some(reply) = refusal.filter(|r| !r.is_positive()) {
                return Step::Stop(self.failure_of_reply(reply));
            }
        }
        if !delivered_now && !refused_now && !queue.is_empty() {
            // Nothing moved: the server takes no recipient at all in one transaction.
            let reason = match first_cap {
                Some(reply) => format!("the SMTP server accepted no recipient of a transaction: {reply}"),
                None => "the SMTP server accepted no recipient of a transaction".to_owned(),
            };
            return Step::Stop(Failure::Transient(reason));
        }
        Step::Continue
    }

    /// What a negative reply to MAIL, DATA or the message means for the letter; a throttle
    /// reply also slows the whole instance down.
    fn failure_of_reply(&self, reply: &Reply) -> Failure {
        let reason = format!("{}: {reply}", reply.command);
        if reply.is_throttle() {
            self.ctx.limiter.throttled(reply);
            Failure::Throttled(reason)
        } else if reply.is_permanent() {
            Failure::Permanent(reason)
        } else {
            Failure::Transient(reason)
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

/// A kept connection that failed before the message was handed over (the server dropped it
/// while idle): sending again at once on a new one cannot duplicate anything.
fn is_stale_connection(error: &SmtpError) -> bool {
    matches!(error, SmtpError::Io { .. } | SmtpError::Closed { .. })
        && !matches!(error.command(), Command::DataEnd | Command::Connect | Command::Greeting)
}

/// The relay failed within a session it had opened, before the message's final dot: the
/// connection broke or timed out, or the relay said 421 (closing; not a throttle, which slows
/// the pool instead). Sending the chunk to another relay cannot duplicate anything. Failures
/// while connecting are not among them: `Relays::connect` already moved past those.
fn is_relay_failure(error: &SmtpError) -> bool {
    let before_dot = !matches!(
        error.command(),
        Command::DataEnd | Command::Connect | Command::Greeting | Command::Ehlo | Command::StartTls | Command::Auth
    );
    let failed = match error {
        SmtpError::Io { .. } | SmtpError::Closed { .. } | SmtpError::Timeout { .. } => true,
        SmtpError::Refused { reply, .. } => is_closing(reply),
        _ => false,
    };
    before_dot && failed
}

/// A 421 to MAIL (RFC 5321 §3.8: the server is closing the channel) in a transaction that
/// handed over no message.
fn closing(transaction: &smtp::Transaction) -> Option<&Reply> {
    if transaction.end.is_some() {
        return None;
    }
    transaction.mail.as_ref().filter(|reply| is_closing(reply))
}

fn is_closing(reply: &Reply) -> bool {
    reply.code == 421 && !reply.is_throttle()
}

fn failure_of(error: &SmtpError) -> Failure {
    let reason = if let SmtpError::Withdrawn { .. } = error {
        format!("{error}: this replica's lease on the letter could no longer be vouched for; nothing was delivered")
    } else if error.command() == Command::DataEnd {
        format!("{error} (after the message was sent: it may have been delivered, so it is retried later)")
    } else {
        error.to_string()
    };
    match error.reply() {
        Some(reply) if reply.is_throttle() => Failure::Throttled(reason),
        _ if error.is_transient() => Failure::Transient(reason),
        _ => Failure::Permanent(reason),
    }
}

/// The metrics label of a failed letter.
fn failure_class(reason: &str) -> &'static str {
    if reason.starts_with("gave up after") {
        "attempts_exhausted"
    } else if reason.starts_with("every recipient was refused") {
        "recipients_refused"
    } else {
        "permanent"
    }
}
