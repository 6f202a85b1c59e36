//! One letter's transactions on the worker's connection: the recipients in chunks, each chunk a
//! transaction whose replies `policy::judge` reads; a kept connection gone stale, a server out of
//! step or a relay that failed before the message cost the letter nothing, once each.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use mongodb::bson::oid::ObjectId;

use super::Worker;
use crate::{
    address::Recipient,
    budget::{HOLD_MAX, Ticket},
    pipeline::policy::{self, AttemptReport, Failure, Stop},
    smtp::{self, Connection, SmtpError, transaction},
};

/// How long a transaction after the letter's first waits for its units, the worker and its
/// connection held: a letter with more recipients than a window holds waits a window for its
/// next transaction (a quota's, up to a day). Past this, or at shutdown, the letter goes back
/// with what it delivered, without costing an attempt, and its next claim waits for the budget.
/// Unbounded, a `/halt` in that wait was abandoned at `SHUTDOWN_TIMEOUT` with the recipients
/// delivered unrecorded, and the next replica sent them again.
pub const NEXT_UNITS_WAIT: Duration = Duration::from_secs(10);

impl Worker {
    /// Sends the message to `recipients`, in as many transactions as the chunk size and the
    /// server's recipient cap need, all in this one attempt.
    pub(super) async fn deliver(
        &mut self,
        recipients: Vec<Recipient>,
        message: &smtp::Composed,
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
        let mut transactions = 0;
        while !queue.is_empty() {
            if let Some(stop) = self.stopping(transactions, queue.len()) {
                report.failure = Some(stop);
                break;
            }
            transactions += 1;
            let wanted = queue.len().min(self.ctx.max_recipients);
            // Taken before the transaction opens, so a long wait (an exhausted quota, MongoDB
            // away) never holds a server's DATA phase open; only the unit's own time is waited
            // for at the final dot. A unit not used (the transaction failed) is not given back.
            // In recipient mode the ticket may cover fewer recipients than wanted (the room a
            // window has left): the chunk is that many, and the rest goes in the next one.
            let limiter = &self.ctx.limiter;
            let ticket = match ticket.take() {
                Some(ticket) => ticket,
                None => match limiter.reserve_within(wanted, NEXT_UNITS_WAIT, &self.shutdown).await {
                    Some(ticket) => ticket,
                    None => {
                        // A halt cuts the wait short (or lands just before it): the letter goes
                        // back for the shutdown, not for a budget that was never waited out.
                        report.failure = Some(if self.shutdown.is_cancelled() {
                            policy::stopped_at_shutdown(queue.len())
                        } else {
                            policy::no_units_between_transactions(wanted, NEXT_UNITS_WAIT)
                        });
                        break;
                    }
                },
            };
            let take = limiter.recipients_on(&ticket, wanted);
            let chunk: Vec<Recipient> = queue.drain(..take).collect();
            let reused = self.connection.is_some();
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
                    Step::Stop(policy::withheld(&error, HOLD_MAX))
                }
                Err(error) => {
                    self.connection = None;
                    if let Some(reply) = error.throttle() {
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

    /// Why the rest of the letter (`left` recipients) goes back before transaction `index`
    /// (from 0), if it does: at shutdown the transaction under way finishes and the rest goes
    /// back, recorded. A letter of many transactions on a slow relay outlived `SHUTDOWN_TIMEOUT`,
    /// was abandoned with the recipients it had delivered unrecorded, and they were sent again.
    pub(super) fn stopping(&self, index: usize, left: usize) -> Option<policy::Failure> {
        (index > 0 && self.shutdown.is_cancelled()).then(|| policy::stopped_at_shutdown(left))
    }

    /// One transaction on the kept connection or a new one; says also whether the message was
    /// withdrawn for want of a budget unit.
    async fn transmit(
        &mut self,
        chunk: &[Recipient],
        message: &smtp::Composed,
        ticket: Ticket,
        lease: (Instant, ObjectId),
        avoid: &[usize],
    ) -> (Result<smtp::Transaction, SmtpError>, bool) {
        let ctx = self.ctx.clone();
        let not_after = self.not_after;
        let mut withheld = false;
        let before_end = async {
            if !ctx.limiter.at_dot(ticket).await {
                withheld = true;
                return None;
            }
            // The lease is checked again right before the final dot, after the budget's wait: a
            // replica cut off from MongoDB must not hand over a letter another may already be
            // sending.
            // So is `NotAfter`: a message whose time passed is withdrawn, never delivered late.
            ctx.lease.vouch(lease.0, &lease.1).filter(|_| !crate::lanes::expired(not_after, ctx.clock.now_ms()))
        };
        // The one place the sandbox differs: no connection, no relay, the same pacing and checks.
        if ctx.sandbox {
            let result = smtp::sandbox::send(chunk, before_end).await;
            return (result, withheld);
        }
        let connection = match self.session(avoid).await {
            Ok(connection) => connection,
            Err(error) => return (Err(error), false),
        };
        let from = ctx.composer.envelope_sender(&lease.1);
        let result = transaction::send(connection, &from, chunk, message, &ctx.smtp.timeouts, before_end).await;
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
