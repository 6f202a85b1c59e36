//! What SMTP replies mean for a letter, and what an attempt's result means for it: sent, failed
//! and why, or retried when. Pure functions of the replies, the letter, the settings, the time and
//! a random draw, so they are tested table by table.

use std::time::Duration;

use crate::{
    address::Recipient,
    config::RetryConfig,
    model::{FailureKind, Letter, Outcome, Rejection, Status},
    smtp::{RcptResult, Reply, SmtpError, Transaction},
};

/// Why an attempt stopped before every recipient had an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth retrying later with backoff: a 4xx, a lost connection, a timeout.
    Transient(String),
    /// Retrying cannot help: the message or the sender was refused for good (5xx).
    Permanent(String),
    /// The relay said "too fast": retried soon, without counting an attempt.
    Throttled(String),
    /// Withdrawn before its final dot because the budget had no unit for it in time, or a
    /// transaction after the letter's first had no units before it opened, or the service is
    /// shutting down between its transactions: the relay judged nothing more, so the rest is
    /// retried soon without counting an attempt (the next attempt waits for its unit before
    /// opening a transaction).
    Withheld(String),
}

/// What one attempt achieved, recipient by recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptReport {
    /// Recipients the server took the message for.
    pub delivered: Vec<String>,
    /// Refused for good (5xx, or an address the server cannot take).
    pub refused: Vec<Rejection>,
    /// Refused for now (4xx): tried again on the next attempt.
    pub deferred: Vec<Rejection>,
    /// Set when the attempt stopped early; recipients without an answer stay pending.
    pub failure: Option<Failure>,
    /// The server's last reply that says most about the letter.
    pub last_reply: Option<String>,
}

impl AttemptReport {
    /// An attempt that stopped before it began.
    pub fn failed(failure: Failure) -> AttemptReport {
        AttemptReport { failure: Some(failure), ..AttemptReport::default() }
    }

    /// Adds one transaction's (or one copy's) answers to the attempt's.
    pub fn add(&mut self, refused: Vec<Rejection>, deferred: Vec<Rejection>, delivered: Vec<String>) {
        self.refused.extend(refused);
        self.deferred.extend(deferred);
        self.delivered.extend(delivered);
    }
}

/// What one transaction's replies mean for its recipients and for the attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Judged {
    /// The recipients the server took the message for (only when it took the message).
    pub delivered: Vec<String>,
    /// Over the server's recipient cap: they go in the next transaction, at once.
    pub capped: Vec<Recipient>,
    pub refused: Vec<Rejection>,
    pub deferred: Vec<Rejection>,
    /// The reply to the final dot, when the server took the message.
    pub last_reply: Option<String>,
    /// Replies saying "too fast": each slows the whole instance down.
    pub throttles: Vec<Reply>,
    /// Set when the attempt cannot go on as planned.
    pub stop: Option<Stop>,
}

/// Why the next transaction cannot simply follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The reply faulted the session, not the letter ([`Reply::was_due_to_session`]): these
    /// recipients go again on a new connection.
    Reconnect(Vec<Recipient>, Reply),
    /// The attempt ends here; recipients without an answer stay pending.
    Failed(Failure),
}

/// Judges one transaction to `chunk` (its recipients, in order). `more_waiting` says whether
/// recipients of the letter wait for later transactions.
pub fn judge(transaction: Transaction, chunk: Vec<Recipient>, more_waiting: bool) -> Judged {
    let mut judged = Judged::default();
    if let Some(mail) = transaction.mail.as_ref().filter(|m| !m.is_positive()) {
        judged.stop = Some(if mail.was_due_to_session() {
            Stop::Reconnect(chunk, mail.clone())
        } else {
            Stop::Failed(failure_of_reply(mail, &mut judged.throttles))
        });
        return judged;
    }
    let delivered_now = transaction.delivered();
    let mut accepted = Vec::new();
    let mut first_cap = None;
    for (recipient, result) in chunk.into_iter().zip(transaction.rcpt) {
        let rejection = |reply: String| Rejection { address: recipient.to_string(), reply };
        match result {
            RcptResult::Unsendable(reason) => judged.refused.push(rejection(reason)),
            RcptResult::Replied(reply) if reply.is_positive() => accepted.push(recipient),
            RcptResult::Replied(reply) if reply.is_too_many_recipients() => {
                first_cap.get_or_insert(reply);
                judged.capped.push(recipient);
            }
            RcptResult::Replied(reply) if reply.is_permanent() => judged.refused.push(rejection(reply.to_string())),
            RcptResult::Replied(reply) => {
                judged.deferred.push(rejection(reply.to_string()));
                if reply.is_throttle() {
                    judged.throttles.push(reply);
                }
            }
        }
    }
    if delivered_now {
        judged.delivered = accepted.iter().map(Recipient::to_string).collect();
        judged.last_reply = transaction.end.as_ref().map(Reply::to_string);
    } else if !accepted.is_empty() {
        // Recipients were accepted, but the message was not: DATA or the final reply.
        let refusal = transaction.end.as_ref().or(transaction.data.as_ref());
        if let Some(reply) = refusal.filter(|r| !r.is_positive()) {
            judged.stop = Some(Stop::Failed(failure_of_reply(reply, &mut judged.throttles)));
            return judged;
        }
    }
    if !delivered_now && judged.refused.is_empty() && (more_waiting || !judged.capped.is_empty()) {
        // Nothing moved: the server takes no recipient at all in one transaction.
        let reason = match first_cap {
            Some(reply) => format!("the SMTP server accepted no recipient of a transaction: {reply}"),
            None => "the SMTP server accepted no recipient of a transaction".to_owned(),
        };
        judged.stop = Some(Stop::Failed(Failure::Transient(reason)));
    }
    judged
}

/// What a negative reply to MAIL, DATA or the message means for the letter; a throttle reply is
/// also noted in `throttles`.
fn failure_of_reply(reply: &Reply, throttles: &mut Vec<Reply>) -> Failure {
    let reason = format!("{}: {reply}", reply.command);
    if reply.is_throttle() {
        throttles.push(reply.clone());
        Failure::Throttled(reason)
    } else if reply.is_permanent() {
        Failure::Permanent(reason)
    } else {
        Failure::Transient(reason)
    }
}

/// What a failed session means for the letter.
pub fn failure_of(error: &SmtpError) -> Failure {
    let reason = if let SmtpError::Withdrawn { .. } = error {
        format!("{error}: this replica's lease on the letter could no longer be vouched for; nothing was delivered")
    } else if error.may_have_delivered() {
        format!("{error} (after the message was sent: it may have been delivered, so it is retried later)")
    } else {
        error.to_string()
    };
    match error.throttle() {
        Some(_) => Failure::Throttled(reason),
        None if error.is_transient() => Failure::Transient(reason),
        None => Failure::Permanent(reason),
    }
}

/// The message was withdrawn before its final dot because the budget had no unit for it within
/// `hold`.
pub fn withheld(error: &SmtpError, hold: Duration) -> Failure {
    Failure::Withheld(format!("{error}: the sending budget had no unit for it within {hold:?}; nothing was delivered"))
}

/// A transaction after the letter's first had no units within `wait`: the recipients left wait
/// for the budget's next window, as a withdrawn message does, without costing an attempt.
pub fn no_units_between_transactions(recipients: usize, wait: Duration) -> Failure {
    Failure::Withheld(format!(
        "the sending budget had no units for the next {recipients} recipient(s) within {wait:?}; \
         they wait for its next window"
    ))
}

/// The service is shutting down between a letter's transactions: the recipients left go back,
/// as a withdrawn message does, without costing an attempt.
pub fn stopped_at_shutdown(recipients: usize) -> Failure {
    Failure::Withheld(format!("the service is shutting down; {recipients} recipient(s) wait for the next attempt"))
}

/// The server was out of step twice in one attempt: a new connection did not help.
pub fn out_of_step_twice() -> Failure {
    Failure::Transient("the SMTP server refused MAIL FROM twice with 503".to_owned())
}

/// How long a throttled letter waits before it is due again; the instance's lowered rate does
/// the real pacing.
pub const THROTTLE_RETRY: Duration = Duration::from_secs(1);

/// Applies an attempt to the letter's state (`attempts` already counts it) and picks the
/// outcome. `jitter` is a random number in [0, 1).
pub fn decide(letter: &mut Letter, report: AttemptReport, retry: &RetryConfig, now_ms: i64, jitter: f64) -> Outcome {
    letter.delivered.extend(report.delivered);
    letter.rejected.extend(report.refused);
    let had_reply = report.last_reply.is_some();
    if let Some(reply) = report.last_reply {
        letter.last_reply = Some(reply);
    }
    let remaining = letter.pending_recipients();
    let reason = match (&report.failure, report.deferred.first()) {
        (Some(Failure::Transient(r) | Failure::Permanent(r) | Failure::Throttled(r) | Failure::Withheld(r)), _) => {
            r.clone()
        }
        (None, Some(first)) => format!("{} recipient(s) deferred: {}", report.deferred.len(), first.reply),
        (None, None) => String::new(),
    };
    if remaining.is_empty() {
        return finish(letter, None);
    }
    match report.failure {
        Some(Failure::Throttled(_) | Failure::Withheld(_)) => {
            // A relay that says "too fast" has not judged the letter, nor has one that never saw
            // the final dot: this attempt does not count.
            letter.attempts -= 1;
            letter.last_reply = Some(reason.clone());
            Outcome::Retry { due_ms: now_ms + THROTTLE_RETRY.as_millis() as i64, reason }
        }
        Some(Failure::Permanent(_)) => finish(letter, Some((FailureKind::Permanent, reason))),
        Some(Failure::Transient(_)) | None if letter.attempts as u32 >= retry.max_attempts => {
            let reason = format!("gave up after {} attempts: {reason}", letter.attempts);
            finish(letter, Some((FailureKind::AttemptsExhausted, reason)))
        }
        Some(Failure::Transient(_)) | None => {
            // An attempt that ended before any transaction reply (refused connection, a 421
            // greeting) still says why the letter waits now; a reply from an earlier attempt
            // would name a fault that may have passed.
            if !had_reply {
                letter.last_reply = Some(reason.clone());
            }
            let due_ms = now_ms + backoff(retry, letter.attempts, jitter).as_millis() as i64;
            Outcome::Retry { due_ms, reason }
        }
    }
}

/// Ends the letter. Recipients never reached are listed as refused with `reason`, so a status
/// message accounts for every address; the letter is `sent` when anyone got it.
fn finish(letter: &mut Letter, reason: Option<(FailureKind, String)>) -> Outcome {
    if let Some((_, reason)) = &reason {
        for address in letter.pending_recipients() {
            letter.rejected.push(Rejection { address: address.to_string(), reply: reason.clone() });
        }
    }
    if !letter.delivered.is_empty() {
        letter.status = Status::Sent;
        letter.error = None;
        return Outcome::Sent;
    }
    let (kind, reason) = match (reason, letter.rejected.first()) {
        (Some(reason), _) => reason,
        (None, Some(first)) => (
            FailureKind::RecipientsRefused,
            format!("every recipient was refused; first: {} ({})", first.address, first.reply),
        ),
        (None, None) => (FailureKind::Permanent, "no recipient accepted the letter".to_owned()),
    };
    letter.status = Status::Error;
    letter.error = Some(reason.clone());
    Outcome::Failed { kind, reason }
}

/// Exponential backoff with "equal jitter": half the delay is fixed, half random, so retries from
/// one outage spread out instead of returning together.
pub fn backoff(retry: &RetryConfig, attempts: i32, jitter: f64) -> Duration {
    let exponent = attempts.saturating_sub(1).clamp(0, 30) as u32;
    let delay = retry.backoff_base.saturating_mul(1 << exponent).min(retry.backoff_max);
    let half = delay / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Letter, Mailing};
    use crate::smtp::Command;

    fn retry() -> RetryConfig {
        crate::Config::from_vars(
            [("KAFKA_BROKERS", "k:1"), ("MONGO_LOCAL", "mongodb://m"), ("SMTP_HOST", "h")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap()
        .retry
    }

    fn letter(addresses: &[&str], attempts: i32) -> Letter {
        let mut letter = Letter::from_mailing(
            Mailing {
                subject: "s".into(),
                body: "b".into(),
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                token: "t".into(),
                extra: Default::default(),
            },
            Some(b"k"),
            "t/0/0/0".into(),
            0,
        );
        letter.attempts = attempts;
        letter
    }

    fn rejection(address: &str, reply: &str) -> Rejection {
        Rejection { address: address.into(), reply: reply.into() }
    }

    #[test]
    fn outcomes_table() {
        let ab = ["a@x.org", "b@x.org"];
        struct Case {
            name: &'static str,
            attempts: i32,
            report: AttemptReport,
            status: Status,
            outcome: &'static str,
            rejected: usize,
            error: bool,
        }
        let cases = [
            Case {
                name: "all delivered",
                attempts: 1,
                report: AttemptReport { delivered: vec!["a@x.org".into(), "b@x.org".into()], ..Default::default() },
                status: Status::Sent,
                outcome: "sent",
                rejected: 0,
                error: false,
            },
            Case {
                name: "one refused for good, one delivered",
                attempts: 1,
                report: AttemptReport {
                    delivered: vec!["a@x.org".into()],
                    refused: vec![rejection("b@x.org", "550 5.1.1 no")],
                    ..Default::default()
                },
                status: Status::Sent,
                outcome: "sent",
                rejected: 1,
                error: false,
            },
            Case {
                name: "all refused",
                attempts: 1,
                report: AttemptReport {
                    refused: vec![rejection("a@x.org", "550 no"), rejection("b@x.org", "550 no")],
                    ..Default::default()
                },
                status: Status::Error,
                outcome: "failed",
                rejected: 2,
                error: true,
            },
            Case {
                name: "one deferred: retry",
                attempts: 1,
                report: AttemptReport {
                    delivered: vec!["a@x.org".into()],
                    deferred: vec![rejection("b@x.org", "451 later")],
                    ..Default::default()
                },
                status: Status::Awaiting,
                outcome: "retry",
                rejected: 0,
                error: false,
            },
            Case {
                name: "deferred on the last attempt: sent, the other listed as refused",
                attempts: 5,
                report: AttemptReport {
                    delivered: vec!["a@x.org".into()],
                    deferred: vec![rejection("b@x.org", "451 later")],
                    ..Default::default()
                },
                status: Status::Sent,
                outcome: "sent",
                rejected: 1,
                error: false,
            },
            Case {
                name: "connection lost on the last attempt, nothing delivered",
                attempts: 5,
                report: AttemptReport { failure: Some(Failure::Transient("timeout".into())), ..Default::default() },
                status: Status::Error,
                outcome: "failed",
                rejected: 2,
                error: true,
            },
            Case {
                name: "message refused for good",
                attempts: 1,
                report: AttemptReport {
                    failure: Some(Failure::Permanent("554 5.7.1 spam".into())),
                    ..Default::default()
                },
                status: Status::Error,
                outcome: "failed",
                rejected: 2,
                error: true,
            },
            Case {
                name: "throttled on the last attempt: retried, attempt not counted",
                attempts: 5,
                report: AttemptReport {
                    failure: Some(Failure::Throttled("454 4.7.0 Throttling failure".into())),
                    ..Default::default()
                },
                status: Status::Awaiting,
                outcome: "retry",
                rejected: 0,
                error: false,
            },
        ];
        for case in cases {
            let mut l = letter(&ab, case.attempts);
            // A failure of an earlier attempt must not survive a success.
            l.error = Some("451 from an earlier attempt".into());
            let outcome = decide(&mut l, case.report, &retry(), 1_000, 0.5);
            let kind = match outcome {
                Outcome::Sent => "sent",
                Outcome::Failed { .. } => "failed",
                Outcome::Retry { .. } => "retry",
                Outcome::Released => "released",
            };
            assert_eq!(kind, case.outcome, "{}", case.name);
            if kind != "retry" {
                assert_eq!(l.status, case.status, "{}", case.name);
                assert_eq!(l.error.is_some(), case.error, "{}: {:?}", case.name, l.error);
            }
            assert_eq!(l.rejected.len(), case.rejected, "{}: {:?}", case.name, l.rejected);
        }
    }

    fn reply(line: &str, command: Command) -> Reply {
        Reply::parse(&[line.to_owned()], command).unwrap()
    }

    /// One transaction to a@x.org and b@x.org: MAIL's reply, each RCPT's (`None`: unsendable),
    /// DATA's and the final one.
    fn transaction(mail: &str, rcpt: [Option<&str>; 2], data: Option<&str>, end: Option<&str>) -> Transaction {
        let rcpt = rcpt
            .iter()
            .map(|line| match line {
                Some(line) => RcptResult::Replied(reply(line, Command::RcptTo)),
                None => RcptResult::Unsendable("no SMTPUTF8".into()),
            })
            .collect();
        Transaction {
            mail: Some(reply(mail, Command::MailFrom)),
            rcpt,
            data: data.map(|line| reply(line, Command::Data)),
            end: end.map(|line| reply(line, Command::DataEnd)),
        }
    }

    #[test]
    fn judge_table() {
        let chunk = || vec![Recipient::parse("a@x.org").unwrap(), Recipient::parse("b@x.org").unwrap()];
        let ok = Some("250 ok");
        struct Case {
            name: &'static str,
            transaction: Transaction,
            more_waiting: bool,
            /// Delivered, capped, refused, deferred, throttle replies.
            counts: [usize; 5],
            stop: Option<Stop>,
        }
        let transient = |r: &str| Some(Stop::Failed(Failure::Transient(r.into())));
        let cases = [
            Case {
                name: "all delivered",
                transaction: transaction("250 ok", [ok, ok], Some("354 go"), Some("250 queued")),
                more_waiting: false,
                counts: [2, 0, 0, 0, 0],
                stop: None,
            },
            Case {
                name: "one refused for good, one unsendable, nothing else to do",
                transaction: transaction("250 ok", [Some("550 5.1.1 no"), None], Some("554 no valid recipients"), None),
                more_waiting: true,
                counts: [0, 0, 2, 0, 0],
                stop: None,
            },
            Case {
                name: "503 to MAIL: again on a new connection",
                transaction: transaction("503 5.5.1 nested MAIL", [ok, ok], None, None),
                more_waiting: false,
                counts: [0, 0, 0, 0, 0],
                stop: Some(Stop::Reconnect(chunk(), reply("503 5.5.1 nested MAIL", Command::MailFrom))),
            },
            Case {
                name: "sender refused for good",
                transaction: transaction("553 5.7.1 sender rejected", [ok, ok], None, None),
                more_waiting: false,
                counts: [0, 0, 0, 0, 0],
                stop: Some(Stop::Failed(Failure::Permanent("MAIL FROM: 553 5.7.1 sender rejected".into()))),
            },
            Case {
                name: "MAIL throttled",
                transaction: transaction("451 4.7.1 rate limit exceeded", [ok, ok], None, None),
                more_waiting: false,
                counts: [0, 0, 0, 0, 1],
                stop: Some(Stop::Failed(Failure::Throttled("MAIL FROM: 451 4.7.1 rate limit exceeded".into()))),
            },
            Case {
                name: "over the server's cap: the rest goes next",
                transaction: transaction("250 ok", [ok, Some("452 4.5.3 too many recipients")], Some("354"), ok),
                more_waiting: false,
                counts: [1, 1, 0, 0, 0],
                stop: None,
            },
            Case {
                name: "deferred, one throttled, others waiting: nothing moved",
                transaction: transaction("250 ok", [Some("451 4.7.1 slow down"), Some("450 busy")], Some("554"), None),
                more_waiting: true,
                counts: [0, 0, 0, 2, 1],
                stop: transient("the SMTP server accepted no recipient of a transaction"),
            },
            Case {
                name: "deferred, the last of the letter: the attempt ends as it is",
                transaction: transaction("250 ok", [Some("450 busy"), Some("450 busy")], Some("554"), None),
                more_waiting: false,
                counts: [0, 0, 0, 2, 0],
                stop: None,
            },
            Case {
                name: "all capped: the server takes no recipient",
                transaction: transaction("250 ok", [Some("452 4.5.3 cap"), Some("452 4.5.3 cap")], Some("554"), None),
                more_waiting: false,
                counts: [0, 2, 0, 0, 0],
                stop: transient("the SMTP server accepted no recipient of a transaction: 452 4.5.3 cap"),
            },
            Case {
                name: "recipients accepted, message refused",
                transaction: transaction("250 ok", [ok, Some("550 no")], Some("354"), Some("554 5.7.1 spam")),
                more_waiting: false,
                counts: [0, 0, 1, 0, 0],
                stop: Some(Stop::Failed(Failure::Permanent("message data: 554 5.7.1 spam".into()))),
            },
            Case {
                name: "recipients accepted, DATA deferred",
                transaction: transaction("250 ok", [ok, ok], Some("451 try later"), None),
                more_waiting: false,
                counts: [0, 0, 0, 0, 0],
                stop: Some(Stop::Failed(Failure::Transient("DATA: 451 try later".into()))),
            },
        ];
        for case in cases {
            let judged = judge(case.transaction, chunk(), case.more_waiting);
            let counts = [
                judged.delivered.len(),
                judged.capped.len(),
                judged.refused.len(),
                judged.deferred.len(),
                judged.throttles.len(),
            ];
            assert_eq!(counts, case.counts, "{}: {judged:?}", case.name);
            assert_eq!(judged.stop, case.stop, "{}", case.name);
            assert_eq!(judged.last_reply.is_some(), !judged.delivered.is_empty(), "{}", case.name);
        }
    }

    #[test]
    fn failed_sessions_keep_their_stored_reasons() {
        let server = || "relay:25".to_owned();
        let refused = |line| SmtpError::Refused { reply: reply(line, Command::Greeting), server: server() };
        let cases = [
            (
                SmtpError::Withdrawn { server: server() },
                Failure::Transient(
                    "message to relay:25 withdrawn before its final dot: this replica's lease on the letter could no \
                     longer be vouched for; nothing was delivered"
                        .into(),
                ),
            ),
            (
                SmtpError::Closed { command: Command::DataEnd, server: server() },
                Failure::Transient(
                    "message data to relay:25: the server closed the connection (after the message was sent: it may \
                     have been delivered, so it is retried later)"
                        .into(),
                ),
            ),
            (
                refused("421 4.7.0 too many connections"),
                Failure::Throttled("greeting to relay:25 refused: 421 4.7.0 too many connections".into()),
            ),
            (
                refused("554 5.7.1 go away"),
                Failure::Permanent("greeting to relay:25 refused: 554 5.7.1 go away".into()),
            ),
        ];
        for (error, failure) in cases {
            assert_eq!(failure_of(&error), failure);
        }
        assert_eq!(
            withheld(&SmtpError::Withdrawn { server: server() }, Duration::from_secs(5)),
            Failure::Withheld(
                "message to relay:25 withdrawn before its final dot: the sending budget had no unit for it within 5s; \
                 nothing was delivered"
                    .into()
            )
        );
    }

    #[test]
    fn failure_kinds_are_decided_with_the_outcome() {
        let kind = |attempts, report| match decide(&mut letter(&["a@x.org"], attempts), report, &retry(), 0, 0.0) {
            Outcome::Failed { kind, .. } => Some(kind),
            _ => None,
        };
        let refused = AttemptReport { refused: vec![rejection("a@x.org", "550 no")], ..Default::default() };
        assert_eq!(kind(1, refused), Some(FailureKind::RecipientsRefused));
        assert_eq!(kind(1, AttemptReport::failed(Failure::Permanent("554".into()))), Some(FailureKind::Permanent));
        assert_eq!(
            kind(5, AttemptReport::failed(Failure::Transient("421".into()))),
            Some(FailureKind::AttemptsExhausted)
        );
        assert_eq!(kind(1, AttemptReport::failed(Failure::Transient("421".into()))), None);
    }

    #[test]
    fn throttled_retry_keeps_the_attempt_and_comes_soon() {
        let mut l = letter(&["a@x.org"], 3);
        let report = AttemptReport { failure: Some(Failure::Throttled("454 slow".into())), ..Default::default() };
        let outcome = decide(&mut l, report, &retry(), 10_000, 0.0);
        assert_eq!(l.attempts, 2);
        assert_eq!(outcome, Outcome::Retry { due_ms: 11_000, reason: "454 slow".into() });
    }

    #[test]
    fn a_retry_without_a_reply_names_its_own_fault_not_an_earlier_one() {
        let mut l = letter(&["a@x.org"], 1);
        let refused = AttemptReport::failed(Failure::Transient("connecting to relay: refused".into()));
        decide(&mut l, refused, &retry(), 0, 0.0);
        assert_eq!(l.last_reply.as_deref(), Some("connecting to relay: refused"));
        l.attempts += 1;
        let greeted = AttemptReport::failed(Failure::Transient("greeting refused: 421 4.3.2 closing".into()));
        decide(&mut l, greeted, &retry(), 0, 0.0);
        assert_eq!(l.last_reply.as_deref(), Some("greeting refused: 421 4.3.2 closing"));
        l.attempts += 1;
        let replied = AttemptReport {
            last_reply: Some("451 4.3.0 try later".into()),
            failure: Some(Failure::Transient("message data: 451 4.3.0 try later".into())),
            ..Default::default()
        };
        decide(&mut l, replied, &retry(), 0, 0.0);
        assert_eq!(l.last_reply.as_deref(), Some("451 4.3.0 try later"), "the relay's own words when it replied");
    }

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_cap() {
        let retry = retry();
        for (attempt, nominal) in [(1, 10), (2, 20), (3, 40), (4, 80), (10, 600)] {
            let nominal = Duration::from_secs(nominal);
            assert_eq!(backoff(&retry, attempt, 0.0), nominal / 2, "{attempt}");
            assert_eq!(backoff(&retry, attempt, 1.0), nominal, "{attempt}");
        }
    }
}
