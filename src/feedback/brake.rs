//! The reputation brake: pauses sending deployment-wide when the hard-bounce or the complaint
//! rate of the last letters sent crosses its limit, so a bad list cannot get the relay account
//! reviewed or suspended overnight. An operator looks, cleans the list or cancels the batch, and
//! `POST /resume` lifts it.
//!
//! **The window** is the last `BRAKE_WINDOW` (2,000) letters sent since the last resume; the
//! rates are the recipients of those letters reported hard-bounced (or complaining) per
//! recipient the relay accepted. Why this window:
//! - counted in letters, not in time, so that it holds the same evidence at 100 letters a day
//!   and at 50,000 an hour, and its query reads at most `BRAKE_WINDOW` documents whatever the
//!   volume (one aggregation on the `{status, updated_ms}` index every `BRAKE_INTERVAL`);
//! - each event counted against the letter it is about, not against whatever was sent when it
//!   arrived: a bounce that comes an hour late still counts for its letter, and events about
//!   letters sent before a resume never count after it, which is what keeps the brake from
//!   tripping again at once on the evidence the operator just dealt with. After a resume the
//!   brake judges only new sends, and only once they hold `BRAKE_MIN_SENDS` recipients.
//!
//! **The sample**: no verdict before the window holds `BRAKE_MIN_SENDS` (200) recipients, and
//! none on fewer than [`MIN_EVENTS`] events of a kind, so 1 bounce of 2 sends, or one person's
//! complaint among 300 letters, does not stop a deployment. With the defaults, a list of mostly
//! dead addresses is stopped after about 200 sends; SES judges a 5 % bounce rate over its
//! "representative volume", so 200 recipients with 10 hard bounces is already a clear signal.
//!
//! Every replica evaluates (the cost is one bounded query); the pause is the deployment-wide one
//! (`crate::control`), written only if the control document did not change since this replica
//! read it, so a brake that judged before an operator's resume cannot undo it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::{
    chore::chore,
    config::feedback::BrakeConfig,
    control::Control,
    metrics::{KindLabel, Metrics},
    store::{BrakeWindow, FeedbackStore},
};

/// The fewest events of a kind the brake pauses on, whatever the rate: one complaint among 300
/// recipients is 0.33 %, over every published limit, and still one person's click.
pub const MIN_EVENTS: u64 = 3;

/// Which rate crossed its limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tripped {
    /// `hard_bounce` or `complaint`.
    pub kind: &'static str,
    pub events: u64,
    pub recipients: u64,
    pub rate: f64,
    pub limit: f64,
}

impl Tripped {
    /// The reason stored in the control document and shown by `GET /`.
    pub fn reason(&self) -> String {
        let what = if self.kind == "complaint" { "complaint" } else { "hard-bounce" };
        format!(
            "reputation brake: {what} rate {:.2} % ({} of the last {} recipients) reached BRAKE_MAX_{}_RATE {:.2} %; \
             clean the list or cancel the batch, then POST /resume",
            self.rate * 100.0,
            self.events,
            self.recipients,
            if self.kind == "complaint" { "COMPLAINT" } else { "BOUNCE" },
            self.limit * 100.0,
        )
    }
}

/// Whether `window` must stop sending: the first rate at or over its limit, on a sample of at
/// least `min_sends` recipients and [`MIN_EVENTS`] events.
pub fn verdict(window: &BrakeWindow, config: &BrakeConfig) -> Option<Tripped> {
    if window.recipients < config.min_sends {
        return None;
    }
    [
        ("hard_bounce", window.hard_bounces, config.max_bounce_rate),
        ("complaint", window.complaints, config.max_complaint_rate),
    ]
    .into_iter()
    .find_map(|(kind, events, limit)| {
        let limit = limit?;
        let rate = events as f64 / window.recipients as f64;
        (events >= MIN_EVENTS && rate >= limit).then_some(Tripped {
            kind,
            events,
            recipients: window.recipients,
            rate,
            limit,
        })
    })
}

pub struct Brake {
    pub store: FeedbackStore,
    pub control: Control,
    pub metrics: Arc<Metrics>,
    pub config: BrakeConfig,
    /// This replica's id: the control document records `brake@<instance>` as who paused.
    pub instance_id: String,
}

impl Brake {
    /// Evaluates every `BRAKE_INTERVAL` until `shutdown`. A failed read changes nothing: the
    /// brake never pauses, nor shows rates, on evidence it could not read.
    pub async fn run(self, shutdown: CancellationToken) {
        for (kind, limit) in
            [("hard_bounce", self.config.max_bounce_rate), ("complaint", self.config.max_complaint_rate)]
        {
            if let Some(limit) = limit {
                self.metrics.brake_limit.get_or_create(&KindLabel { kind }).set(limit);
            }
        }
        let brake = &self;
        chore("the reputation brake", self.config.interval, shutdown, move || async move {
            if let Err(error) = brake.evaluate().await {
                tracing::warn!(error = format!("{error:#}"), "the reputation brake could not read its window");
            }
        })
        .await;
    }

    async fn evaluate(&self) -> anyhow::Result<()> {
        let seen = self.control.state();
        let window = self.store.brake_window(seen.resumed_ms, self.config.window).await?;
        let judged = window.recipients >= self.config.min_sends;
        let rate = |events: u64| if judged { events as f64 / window.recipients as f64 } else { 0.0 };
        self.metrics.brake_window_recipients.set(i64::try_from(window.recipients).unwrap_or(i64::MAX));
        self.metrics.brake_rate.get_or_create(&KindLabel { kind: "hard_bounce" }).set(rate(window.hard_bounces));
        self.metrics.brake_rate.get_or_create(&KindLabel { kind: "complaint" }).set(rate(window.complaints));
        // Paused already (by an operator, or by this brake on another replica): nothing to add,
        // and an operator's reason is not overwritten.
        if seen.paused {
            return Ok(());
        }
        let Some(tripped) = verdict(&window, &self.config) else { return Ok(()) };
        let reason = tripped.reason();
        let by = format!("brake@{}", self.instance_id);
        if self.control.brake(&reason, &by, self.store.now_ms()).await? {
            self.metrics.brake_trips.inc();
            tracing::warn!(
                kind = tripped.kind,
                events = tripped.events,
                recipients = tripped.recipients,
                rate = tripped.rate,
                limit = tripped.limit,
                "the reputation brake paused sending deployment-wide; POST /resume lifts it"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config() -> BrakeConfig {
        BrakeConfig {
            interval: Duration::from_secs(5),
            window: 2000,
            min_sends: 200,
            max_bounce_rate: Some(0.05),
            max_complaint_rate: Some(0.001),
        }
    }

    fn window(recipients: u64, hard_bounces: u64, complaints: u64) -> BrakeWindow {
        BrakeWindow { letters: recipients, recipients, hard_bounces, complaints }
    }

    #[test]
    fn no_verdict_below_the_minimum_sample() {
        assert_eq!(verdict(&window(2, 1, 0), &config()), None, "1 bounce of 2 sends");
        assert_eq!(verdict(&window(199, 199, 199), &config()), None);
        assert!(verdict(&window(200, 10, 0), &config()).is_some());
    }

    #[test]
    fn a_rate_at_its_limit_trips_it_and_one_below_does_not() {
        let tripped = verdict(&window(1000, 50, 0), &config()).unwrap();
        assert_eq!((tripped.kind, tripped.events, tripped.recipients), ("hard_bounce", 50, 1000));
        assert!(
            tripped.reason().contains("hard-bounce rate 5.00 % (50 of the last 1000 recipients)"),
            "{}",
            tripped.reason()
        );
        assert_eq!(verdict(&window(1000, 49, 0), &config()), None);
        let complaint = verdict(&window(2000, 0, 3), &config()).unwrap();
        assert_eq!(complaint.kind, "complaint");
        assert!(complaint.reason().contains("BRAKE_MAX_COMPLAINT_RATE 0.10 %"), "{}", complaint.reason());
    }

    #[test]
    fn too_few_events_do_not_trip_it_whatever_the_rate() {
        assert_eq!(verdict(&window(300, 0, 2), &config()), None, "two complaints are 0.67 %, but two people");
        let few = BrakeConfig { min_sends: 10, ..config() };
        assert_eq!(verdict(&window(10, 2, 0), &few), None);
        assert!(verdict(&window(10, 3, 0), &few).is_some());
    }

    #[test]
    fn a_rate_turned_off_never_trips() {
        let off = BrakeConfig { max_bounce_rate: None, ..config() };
        assert_eq!(verdict(&window(1000, 1000, 0), &off), None);
        assert_eq!(verdict(&window(1000, 1000, 5), &off).map(|t| t.kind), Some("complaint"));
    }
}
