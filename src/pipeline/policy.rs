//! What an attempt's result means for a letter: sent, failed and why, or retried when. A pure
//! function of the letter, the result, the settings, the time and a random draw, so it is tested
//! table by table.

use std::time::Duration;

use crate::{
    config::DispatchConfig,
    model::{Letter, Outcome, Rejection, Status},
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
    /// Withdrawn before its final dot because the budget had no unit for it in time: nothing
    /// was delivered and the relay judged nothing, so it is retried soon without counting an
    /// attempt (the next attempt waits for its unit before opening a transaction).
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

/// How long a throttled letter waits before it is due again; the instance's lowered rate does
/// the real pacing.
pub const THROTTLE_RETRY: Duration = Duration::from_secs(1);

/// Applies an attempt to the letter's state (`attempts` already counts it) and picks the
/// outcome. `jitter` is a random number in [0, 1).
pub fn decide(letter: &mut Letter, report: AttemptReport, retry: &DispatchConfig, now_ms: i64, jitter: f64) -> Outcome {
    letter.delivered.extend(report.delivered);
    letter.rejected.extend(report.refused);
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
        Some(Failure::Permanent(_)) => finish(letter, Some(reason)),
        Some(Failure::Transient(_)) | None if letter.attempts as u32 >= retry.max_attempts => {
            let reason = format!("gave up after {} attempts: {reason}", letter.attempts);
            finish(letter, Some(reason))
        }
        Some(Failure::Transient(_)) | None => {
            if letter.last_reply.is_none() {
                letter.last_reply = Some(reason.clone());
            }
            let due_ms = now_ms + backoff(retry, letter.attempts, jitter).as_millis() as i64;
            Outcome::Retry { due_ms, reason }
        }
    }
}

/// Ends the letter. Recipients never reached are listed as refused with `reason`, so a status
/// message accounts for every address; the letter is `sent` when anyone got it.
fn finish(letter: &mut Letter, reason: Option<String>) -> Outcome {
    if let Some(reason) = &reason {
        for address in letter.pending_recipients() {
            letter.rejected.push(Rejection { address: address.to_string(), reply: reason.clone() });
        }
    }
    if !letter.delivered.is_empty() {
        letter.status = Status::Sent;
        letter.error = None;
        return Outcome::Sent;
    }
    let reason = match letter.rejected.first() {
        Some(first) if reason.is_none() => {
            format!("every recipient was refused; first: {} ({})", first.address, first.reply)
        }
        _ => reason.unwrap_or_else(|| "no recipient accepted the letter".to_owned()),
    };
    letter.status = Status::Error;
    letter.error = Some(reason.clone());
    Outcome::Failed { reason }
}

/// Exponential backoff with "equal jitter": half the delay is fixed, half random, so retries from
/// one outage spread out instead of returning together.
pub fn backoff(retry: &DispatchConfig, attempts: i32, jitter: f64) -> Duration {
    let exponent = attempts.saturating_sub(1).clamp(0, 30) as u32;
    let delay = retry.backoff_base.saturating_mul(1 << exponent).min(retry.backoff_max);
    let half = delay / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Letter, Mailing};

    fn retry() -> DispatchConfig {
        crate::Config::from_vars(
            [("KAFKA_BROKERS", "k:1"), ("MONGO_LOCAL", "mongodb://m"), ("SMTP_HOST", "h")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap()
        .dispatch
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

    #[test]
    fn throttled_retry_keeps_the_attempt_and_comes_soon() {
        let mut l = letter(&["a@x.org"], 3);
        let report = AttemptReport { failure: Some(Failure::Throttled("454 slow".into())), ..Default::default() };
        let outcome = decide(&mut l, report, &retry(), 10_000, 0.0);
        assert_eq!(l.attempts, 2);
        assert_eq!(outcome, Outcome::Retry { due_ms: 11_000, reason: "454 slow".into() });
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
