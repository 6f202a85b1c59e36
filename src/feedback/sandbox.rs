//! The sandbox's mailbox simulator (`SMTP_SANDBOX`), for the producers' own tests, after SES's
//! mailbox simulator and Postmark's sandbox servers. In the sandbox no message reaches a relay
//! (`crate::smtp::sandbox`); a letter to one of these addresses at [`DOMAIN`] then makes the event
//! a relay would have reported for it:
//!
//! | local part | event |
//! |---|---|
//! | `bounce` | `hard_bounce` (5.1.1): the address is suppressed |
//! | `softbounce` | `soft_bounce` (5.2.2, mailbox full) |
//! | `complaint` | `complaint` (`abuse`): the address is suppressed |
//! | `delay` | `delay` (4.4.1) |
//! | `success`, or anything else | nothing |
//!
//! A `+label` after the local part (`bounce+run-42@…`) is allowed and kept, so each test run can
//! use addresses that earlier runs did not suppress.
//!
//! The events go through [`Feedback::record`], the path of real DSNs and webhooks, so the
//! suppression list, the feedback topic, the letter's `feedback` and the metrics behave as in
//! production; their `Source` is `sandbox`. They are made once the letter's final outcome is
//! stored and its status message published (the report stage hands them here), so a profile
//! service sees `sent` before the bounce, as it would with a relay.
//!
//! The domain is under `.invalid`, reserved by RFC 2606 and RFC 6761 never to resolve: no real
//! mailbox can have these addresses. Outside the sandbox they are ordinary addresses (a relay
//! refuses or bounces them, which suppresses them as any dead address): events are made up only
//! where no relay could report anything, never beside a relay's own reports.

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Event, Feedback, Kind, Source};
use crate::{
    address::Recipient,
    model::{AttemptRecord, Letter, Outcome},
};

/// The simulator's domain: `.invalid` never resolves (RFC 2606 §2, RFC 6761 §6.4).
pub const DOMAIN: &str = "simulator.mailsender.invalid";

/// How long the shutdown waits for the events of outcomes already stored.
const DRAIN: Duration = Duration::from_secs(5);

/// The event a simulator address makes, if any (`success@…` and other addresses make none).
pub fn simulated(address: &str) -> Option<Kind> {
    let key = Recipient::parse(address).ok()?.key();
    let (local, domain) = key.rsplit_once('@')?;
    if domain != DOMAIN {
        return None;
    }
    match local.split_once('+').map_or(local, |(base, _)| base) {
        "bounce" => Some(Kind::HardBounce),
        "softbounce" => Some(Kind::SoftBounce),
        "complaint" => Some(Kind::Complaint),
        "delay" => Some(Kind::Delay),
        _ => None,
    }
}

/// The event as a relay would have reported it.
fn event(letter: &Letter, address: &str, kind: Kind) -> Event {
    let (status, diagnostic, feedback_type) = match kind {
        Kind::HardBounce => (Some("5.1.1"), Some("550 5.1.1 sandbox: simulated hard bounce (no such mailbox)"), None),
        Kind::SoftBounce => (Some("5.2.2"), Some("552 5.2.2 sandbox: simulated soft bounce (mailbox full)"), None),
        Kind::Delay => (Some("4.4.1"), Some("451 4.4.1 sandbox: simulated delay (no answer from host)"), None),
        Kind::Complaint => (None, None, Some("abuse")),
    };
    Event {
        letter: letter.id,
        address: address.to_owned(),
        kind,
        status: status.map(str::to_owned),
        diagnostic: diagnostic.map(str::to_owned),
        source: Source::Sandbox,
        feedback_type: feedback_type.map(str::to_owned),
    }
}

/// The events of a letter's delivered simulator addresses.
fn events_of(letter: &Letter) -> Vec<Event> {
    letter.delivered.iter().filter_map(|address| Some(event(letter, address, simulated(address)?))).collect()
}

/// The report stage's side: hands the letters whose outcome it stored to the [`Mailbox`].
#[derive(Clone)]
pub struct Simulator {
    // Unbounded so the report stage never waits on it; it holds only letters with a simulator
    // address (bodies left out), each until its few events are recorded.
    letters: mpsc::UnboundedSender<Letter>,
}

/// Makes the simulated events, one letter after another.
pub struct Mailbox {
    feedback: Arc<Feedback>,
    letters: mpsc::UnboundedReceiver<Letter>,
}

impl Simulator {
    pub fn new(feedback: Feedback) -> (Simulator, Mailbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Simulator { letters: tx }, Mailbox { feedback: Arc::new(feedback), letters: rx })
    }

    /// Called with a batch of outcomes once it is stored: the letters that reached their final
    /// outcome with a delivered simulator address go to the mailbox.
    pub fn stored(&self, batch: &[AttemptRecord]) {
        for record in batch {
            let done = matches!(record.outcome, Outcome::Sent | Outcome::Failed { .. });
            if done && record.letter.delivered.iter().any(|a| simulated(a).is_some()) {
                // Without its body: the events need the letter's identity, not its text.
                let mut letter = record.letter.clone();
                letter.body = String::new();
                if self.letters.send(letter).is_err() {
                    tracing::warn!(letter_id = %record.letter.id, "the sandbox's mailbox has stopped; simulated events not made");
                }
            }
        }
    }
}

impl Mailbox {
    /// Runs until `until`; then makes the events of the letters already handed over, for up to
    /// [`DRAIN`].
    pub async fn run(mut self, until: CancellationToken) {
        loop {
            let letter = tokio::select! {
                biased;
                _ = until.cancelled() => break,
                letter = self.letters.recv() => match letter {
                    Some(letter) => letter,
                    None => return,
                },
            };
            self.deliver(&letter, &until).await;
        }
        let drain = async {
            let never = CancellationToken::new();
            while let Ok(letter) = self.letters.try_recv() {
                self.deliver(&letter, &never).await;
            }
        };
        if tokio::time::timeout(DRAIN, drain).await.is_err() {
            tracing::warn!(
                letters = self.letters.len(),
                "shutting down: the sandbox's simulated events of some letters were not made"
            );
        }
    }

    /// Records each event, retrying one that could not be recorded now (MongoDB or the broker
    /// away) until it is, as an MTA retries a DSN the listener answered 451.
    async fn deliver(&self, letter: &Letter, until: &CancellationToken) {
        for event in events_of(letter) {
            let mut pause = Duration::from_millis(200);
            loop {
                match self.feedback.record(letter, &event).await {
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(letter_id = %letter.id, address = %event.address, kind = event.kind.as_str(), error = format!("{error:#}"), "simulated event not recorded; retrying");
                    }
                }
                tokio::select! {
                    _ = until.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simulator_addresses_and_their_events() {
        assert_eq!(simulated("bounce@simulator.mailsender.invalid"), Some(Kind::HardBounce));
        assert_eq!(simulated("Bounce+Run-42@Simulator.Mailsender.Invalid"), Some(Kind::HardBounce), "labels, any case");
        assert_eq!(simulated("softbounce@simulator.mailsender.invalid"), Some(Kind::SoftBounce));
        assert_eq!(simulated("complaint+x@simulator.mailsender.invalid"), Some(Kind::Complaint));
        assert_eq!(simulated("delay@simulator.mailsender.invalid"), Some(Kind::Delay));
        for nothing in [
            "success@simulator.mailsender.invalid",
            "someone@simulator.mailsender.invalid",
            "bounce@example.org",
            "bounce@mailsender.invalid",
            "bounce@x.simulator.mailsender.invalid",
            "not an address",
        ] {
            assert_eq!(simulated(nothing), None, "{nothing}");
        }
    }

    #[test]
    fn a_hard_bounce_reads_as_one_to_the_dsn_classifier() {
        // The simulated hard bounce must suppress exactly as a relay's would.
        let mut letter = Letter::from_mailing(
            crate::model::Mailing {
                subject: "s".into(),
                body: "b".into(),
                addresses: vec![
                    "bounce@simulator.mailsender.invalid".into(),
                    "softbounce@simulator.mailsender.invalid".into(),
                ],
                token: "t".into(),
                extra: Default::default(),
            },
            Some(b"k"),
            "src".into(),
            0,
        );
        letter.delivered = letter.addresses.clone();
        let events = events_of(&letter);
        let kinds: Vec<Kind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [Kind::HardBounce, Kind::SoftBounce]);
        for event in &events {
            let status = super::super::report::RecipientStatus {
                recipient: event.address.clone(),
                action: super::super::report::Action::Failed,
                status: event.status.clone(),
                diagnostic: event.diagnostic.clone(),
                remote_mta: None,
            };
            assert_eq!(super::super::classify(&status), Some(event.kind));
            assert_eq!(event.source, Source::Sandbox);
        }
    }
}
