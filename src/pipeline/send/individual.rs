//! `SMTP_DELIVERY=individual`: each recipient gets a copy of their own (their address in `To:`,
//! their own unsubscribe link, as RFC 8058 wants), one transaction each on the worker's kept
//! connection. The copies' outcomes merge as BCC chunks' do, so retries and status messages work
//! as in BCC mode; each copy is a message to the relay, so each takes its own unit of the budget.

use super::Worker;
use crate::{
    address::Recipient,
    model::{Letter, Rejection},
    pipeline::policy::{self, AttemptReport, Failure},
};

impl Worker {
    /// Sends each recipient their copy; the first failure of the session or the message stops
    /// the attempt, and the recipients not yet tried stay pending.
    pub(super) async fn deliver_individually(
        &mut self,
        letter: &Letter,
        recipients: Vec<Recipient>,
        lease: (std::time::Instant, mongodb::bson::oid::ObjectId),
        ticket: Option<crate::budget::Ticket>,
    ) -> AttemptReport {
        // The unit taken for the letter goes to the first copy (`Worker::first_transaction`).
        let mut ticket = ticket;
        let mut report = AttemptReport::default();
        // The body (the text alternative, the attachments) is the same in every copy: made once.
        let body = match self.ctx.composer.body(letter) {
            Ok(body) => body,
            Err(error) => {
                report.failure = Some(Failure::Permanent(error.to_string()));
                return report;
            }
        };
        let count = recipients.len();
        for (index, recipient) in recipients.into_iter().enumerate() {
            if let Some(stop) = self.stopping(index, count - index) {
                report.failure = Some(stop);
                break;
            }
            let bytes = match self.ctx.composer.build_copy(letter, &body, Some(&recipient)) {
                Ok(bytes) => bytes,
                Err(error) => {
                    report.refused.push(Rejection { address: recipient.to_string(), reply: error.to_string() });
                    continue;
                }
            };
            let copy = self.deliver(vec![recipient], &bytes, lease, ticket.take()).await;
            let stopped = copy.delivered.is_empty() && self.shutdown.is_cancelled();
            report.add(copy.refused, copy.deferred, copy.delivered);
            if copy.last_reply.is_some() {
                report.last_reply = copy.last_reply;
            }
            if copy.failure.is_some() {
                // A halt that cut this copy's wait for its unit short stops every copy left.
                report.failure = match copy.failure {
                    Some(Failure::Withheld(_)) if stopped => Some(policy::stopped_at_shutdown(count - index)),
                    failure => failure,
                };
                break;
            }
        }
        report
    }
}
