//! Prometheus metrics. Stages update them as events happen; nothing is computed per scrape
//! except encoding, so a scrape never queries MongoDB.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    pub command: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabel {
    pub client: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WindowLabel {
    pub window: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeedbackLabel {
    pub kind: &'static str,
    pub source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabel {
    pub relay: &'static str,
    pub reason: &'static str,
}

/// The brake's rates: `hard_bounce` or `complaint`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabel {
    /// `host:port`, as `SMTP_HOST` names the relay.
    pub relay: String,
}

pub struct Metrics {
    registry: Registry,
    pub received: Counter,
    pub stored: Counter,
    pub duplicates: Counter,
    pub dead_letters: Counter,
    pub dead_letters_kept: Counter,
    pub sent: Counter,
    pub failed: Family<ReasonLabel, Counter>,
    pub retried: Counter,
    pub published: Counter,
    pub send_duration: Histogram,
    pub rate_limit_wait: Histogram,
    pub in_flight: Gauge,
    /// 1 while sending is paused deployment-wide (`POST /pause`), as this replica last read it.
    pub paused: Gauge,
    pub by_status: Family<StatusLabel, Gauge<i64, AtomicI64>>,
    pub consumer_lag: Family<PartitionLabel, Gauge<i64, AtomicI64>>,
    pub partition_stalled: Family<PartitionLabel, Gauge<i64, AtomicI64>>,
    pub mongo_commands: Family<CommandLabel, Counter>,
    pub smtp_commands: Counter,
    pub smtp_connections: Counter,
    pub throttle_events: Counter,
    /// Each relay's circuit breaker: 0 closed, 1 half-open, 2 open.
    pub smtp_relay_state: Family<RelayLabel, Gauge>,
    /// Times a worker left a relay that failed for the next one, by the relay left.
    pub smtp_relay_failovers: Family<RelayLabel, Counter>,
    pub send_rate: Gauge<f64, AtomicU64>,
    pub clock_offset: Gauge<f64, AtomicU64>,
    pub kafka_requests: Family<ClientLabel, Counter>,
    pub budget_available: Gauge,
    pub budget_grants: Counter,
    pub budget_used: Family<WindowLabel, Gauge<i64, AtomicI64>>,
    pub budget_remaining: Family<WindowLabel, Gauge<i64, AtomicI64>>,
    pub budget_lateness: Histogram,
    pub budget_units_missed: Counter,
    pub budget_units_returned: Counter,
    pub budget_withdrawn: Counter,
    /// Bounces, complaints and delays recorded (`crate::feedback`), by kind and source.
    pub feedback_events: Family<FeedbackLabel, Counter>,
    pub feedback_duplicates: Counter,
    pub feedback_unparsed: Counter,
    /// Relay webhook events taken but not recorded (no or an unknown letter, …), by relay and reason.
    pub webhook_ignored: Family<WebhookLabel, Counter>,
    /// Relay webhook requests refused (forged, stale, replayed with another body), by relay and reason.
    pub webhook_refused: Family<WebhookLabel, Counter>,
    /// The reputation brake's rates over its window, by kind (0 until the window holds
    /// `BRAKE_MIN_SENDS` recipients).
    pub brake_rate: Family<KindLabel, Gauge<f64, AtomicU64>>,
    /// The rates at which the brake pauses, by kind (absent when off).
    pub brake_limit: Family<KindLabel, Gauge<f64, AtomicU64>>,
    /// Recipients of the letters in the brake's window.
    pub brake_window_recipients: Gauge,
    /// 1 while sending is paused by the brake, as this replica last read the control document.
    pub brake_paused: Gauge,
    /// Times this replica's brake paused the deployment.
    pub brake_trips: Counter,
}

impl Metrics {
    /// The metrics of one relay, shown (state 0) from the start.
    pub fn relay(&self, relay: &crate::smtp::RelayAddr) -> crate::smtp::RelayMetrics {
        let label = RelayLabel { relay: relay.to_string() };
        crate::smtp::RelayMetrics {
            state: self.smtp_relay_state.get_or_create(&label).clone(),
            failovers: self.smtp_relay_failovers.get_or_create(&label).clone(),
        }
    }

    pub fn feedback_event(&self, kind: &'static str, source: &'static str) {
        self.feedback_events.get_or_create(&FeedbackLabel { kind, source }).inc();
    }

    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mailsender");
        let metrics = Metrics {
            received: Counter::default(),
            stored: Counter::default(),
            duplicates: Counter::default(),
            dead_letters: Counter::default(),
            dead_letters_kept: Counter::default(),
            sent: Counter::default(),
            failed: Family::default(),
            retried: Counter::default(),
            published: Counter::default(),
            send_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            rate_limit_wait: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            in_flight: Gauge::default(),
            paused: Gauge::default(),
            by_status: Family::default(),
            consumer_lag: Family::default(),
            partition_stalled: Family::default(),
            mongo_commands: Family::default(),
            smtp_commands: Counter::default(),
            smtp_connections: Counter::default(),
            throttle_events: Counter::default(),
            smtp_relay_state: Family::default(),
            smtp_relay_failovers: Family::default(),
            send_rate: Gauge::default(),
            clock_offset: Gauge::default(),
            kafka_requests: Family::default(),
            budget_available: Gauge::default(),
            budget_grants: Counter::default(),
            budget_used: Family::default(),
            budget_remaining: Family::default(),
            budget_lateness: Histogram::new(exponential_buckets(0.000_125, 2.0, 14)),
            budget_units_missed: Counter::default(),
            budget_units_returned: Counter::default(),
            budget_withdrawn: Counter::default(),
            feedback_events: Family::default(),
            feedback_duplicates: Counter::default(),
            feedback_unparsed: Counter::default(),
            webhook_ignored: Family::default(),
            webhook_refused: Family::default(),
            brake_rate: Family::default(),
            brake_limit: Family::default(),
            brake_window_recipients: Gauge::default(),
            brake_paused: Gauge::default(),
            brake_trips: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("letters_received", "Letters decoded from Kafka batches", metrics.received.clone());
        registry.register("letters_stored", "Letters newly written to MongoDB", metrics.stored.clone());
        registry.register(
            "letters_duplicate",
            "Letters skipped at ingest because a redelivered message had already stored them",
            metrics.duplicates.clone(),
        );
        registry.register(
            "dead_letters",
            "Kafka messages set aside on the dead-letter topic",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "dead_letters_kept_in_mongodb",
            "Kafka messages the dead-letter topic did not take, kept in the <collection>_dead_letters collection instead",
            metrics.dead_letters_kept.clone(),
        );
        registry.register("letters_sent", "Letters accepted by the SMTP server", metrics.sent.clone());
        registry.register("letters_failed", "Letters that ended in error, by reason class", metrics.failed.clone());
        registry.register(
            "letters_retried",
            "Send attempts that failed transiently and were rescheduled",
            metrics.retried.clone(),
        );
        registry.register(
            "status_published",
            "Status messages delivered to the status topic",
            metrics.published.clone(),
        );
        registry.register("send_duration_seconds", "Time of one SMTP transaction", metrics.send_duration.clone());
        registry.register(
            "rate_limit_wait_seconds",
            "Time a message waited for the shared sending budget (grant and its unit's time) before its final dot",
            metrics.rate_limit_wait.clone(),
        );
        registry.register("sends_in_flight", "SMTP transactions in progress", metrics.in_flight.clone());
        registry.register(
            "paused",
            "1 while sending is paused deployment-wide (POST /pause), as this replica last read the control document",
            metrics.paused.clone(),
        );
        registry.register("letters", "Letters in MongoDB by status, refreshed periodically", metrics.by_status.clone());
        registry.register(
            "consumer_lag",
            "Messages behind the partition end, per partition",
            metrics.consumer_lag.clone(),
        );
        registry.register(
            "partition_stalled",
            "1 while an input partition's position has not moved for KAFKA_STALL_WARNING with messages waiting",
            metrics.partition_stalled.clone(),
        );
        registry.register(
            "mongo_commands",
            "Commands sent to MongoDB (round trips), by command name",
            metrics.mongo_commands.clone(),
        );
        registry.register(
            "smtp_commands",
            "SMTP commands sent (EHLO, MAIL, RCPT, DATA, the message, RSET, NOOP, ...): the client's share of round trips",
            metrics.smtp_commands.clone(),
        );
        registry.register("smtp_connections", "SMTP connections opened", metrics.smtp_connections.clone());
        registry.register(
            "smtp_throttle_events",
            "Replies in which the SMTP server said the instance sends too fast (4xx rate and connection-limit replies)",
            metrics.throttle_events.clone(),
        );
        registry.register(
            "smtp_relay_state",
            "Each SMTP relay's circuit breaker: 0 closed (in use), 1 half-open (one probe connection decides), \
             2 open (skipped until its cool-down ends)",
            metrics.smtp_relay_state.clone(),
        );
        registry.register(
            "smtp_relay_failovers",
            "Times a worker left an SMTP relay (connection failed, or 421 before the final dot) for the next one",
            metrics.smtp_relay_failovers.clone(),
        );
        registry.register(
            "send_rate_limit",
            "Letters per second this instance allows itself now: the budget, or less while the relay throttles",
            metrics.send_rate.clone(),
        );
        registry.register(
            "mongodb_clock_offset_seconds",
            "MongoDB's clock minus this host's, as last measured; lease times follow MongoDB's",
            metrics.clock_offset.clone(),
        );
        registry.register(
            "kafka_requests",
            "Requests sent to Kafka brokers, from librdkafka's statistics",
            metrics.kafka_requests.clone(),
        );
        registry.register(
            "budget_available",
            "1 while the shared sending budget in MongoDB answers; 0 while it does not, and nothing is sent",
            metrics.budget_available.clone(),
        );
        registry.register(
            "budget_grants",
            "Grants of sending budget this instance took from MongoDB (one round trip each)",
            metrics.budget_grants.clone(),
        );
        registry.register(
            "budget_used",
            "Units of the shared budget used (rate: reserved for the next period; quota: counted in the window), by window, as last seen",
            metrics.budget_used.clone(),
        );
        registry.register(
            "budget_remaining",
            "Units of the shared budget left, by window, as last seen",
            metrics.budget_remaining.clone(),
        );
        registry.register(
            "budget_dot_lateness_seconds",
            "How long after its unit's time a message's final dot went (a dot later than the guard takes a new unit)",
            metrics.budget_lateness.clone(),
        );
        registry.register(
            "budget_units_missed",
            "Units of the budget given up because the final dot would have been too late for them",
            metrics.budget_units_missed.clone(),
        );
        registry.register(
            "budget_units_returned",
            "Units of the budget this instance gave back unused (out of letters, or stopping) for other replicas to use",
            metrics.budget_units_returned.clone(),
        );
        registry.register(
            "budget_messages_withdrawn",
            "Messages withdrawn before their final dot because no unit of the budget came within the hold bound (the letter goes back without costing an attempt)",
            metrics.budget_withdrawn.clone(),
        );
        registry.register(
            "feedback_events",
            "Bounces, complaints and delays recorded from DSNs and ARF reports, by kind and source",
            metrics.feedback_events.clone(),
        );
        registry.register(
            "feedback_duplicates",
            "Feedback events reported again (an MTA's retry, a second report of one bounce) and recorded once",
            metrics.feedback_duplicates.clone(),
        );
        registry.register(
            "feedback_unparsed",
            "Messages the feedback listener took but could not use (kept in <collection>_feedback_unparsed)",
            metrics.feedback_unparsed.clone(),
        );
        registry.register(
            "feedback_webhook_ignored",
            "Relay webhook events answered 200 but not recorded (no letter of ours, an unknown letter, a recipient not the letter's), by relay and reason",
            metrics.webhook_ignored.clone(),
        );
        registry.register(
            "feedback_webhook_refused",
            "Relay webhook requests refused (bad signature or credentials, stale, a replayed token with another body), by relay and reason",
            metrics.webhook_refused.clone(),
        );
        registry.register(
            "brake_rate",
            "Hard bounces and complaints per recipient of the last BRAKE_WINDOW letters sent since the last resume, by kind \
             (0 until they hold BRAKE_MIN_SENDS recipients)",
            metrics.brake_rate.clone(),
        );
        registry.register(
            "brake_limit",
            "The rate at which the reputation brake pauses sending, by kind (BRAKE_MAX_BOUNCE_RATE, BRAKE_MAX_COMPLAINT_RATE)",
            metrics.brake_limit.clone(),
        );
        registry.register(
            "brake_window_recipients",
            "Recipients of the letters in the reputation brake's window (its sample)",
            metrics.brake_window_recipients.clone(),
        );
        registry.register(
            "brake_paused",
            "1 while sending is paused by the reputation brake, as this replica last read the control document",
            metrics.brake_paused.clone(),
        );
        registry.register(
            "brake_trips",
            "Times this replica's reputation brake paused the deployment",
            metrics.brake_trips.clone(),
        );
        // Every kind and source of feedback event from the start, so that rate() and the
        // dashboard see zero rather than no series before the first event.
        for kind in ["hard_bounce", "soft_bounce", "complaint", "delay"] {
            for source in ["dsn", "arf", "ses", "postmark", "sendgrid", "mailgun"] {
                let _ = metrics.feedback_events.get_or_create(&FeedbackLabel { kind, source });
            }
        }
        for kind in ["hard_bounce", "complaint"] {
            let _ = metrics.brake_rate.get_or_create(&KindLabel { kind });
        }
        registry.register("build", "Build information", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
        Metrics { registry, ..metrics }
    }

    pub fn fail(&self, reason: &'static str) {
        self.failed.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// OpenMetrics text, for scrapers that ask for it.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format (0.0.4), which every scraper and `promtool` read.
    pub fn encode(&self) -> String {
        to_classic(&self.encode_openmetrics())
    }
}

/// Rewrites OpenMetrics text as classic Prometheus text: counter families take their `_total`
/// sample name, `info` becomes a gauge named `_info`, and `# EOF`/`# UNIT` go.
fn to_classic(openmetrics: &str) -> String {
    let mut renames: Vec<(String, String)> = Vec::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            match kind {
                "counter" => renames.push((name.to_owned(), format!("{name}_total"))),
                "info" => renames.push((name.to_owned(), format!("{name}_info"))),
                _ => {}
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# TYPE ", "# HELP "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            let (_, classic) = renames.iter().find(|(from, _)| from == name)?;
            let tail = if tail == "info" { "gauge" } else { tail };
            Some(format!("{prefix}{classic} {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_documented_families() {
        let metrics = Metrics::new();
        metrics.sent.inc();
        metrics.fail("permanent");
        metrics.by_status.get_or_create(&StatusLabel { status: "sent".into() }).set(3);
        let text = metrics.encode();
        assert!(text.contains("# TYPE mailsender_letters_sent_total counter"), "{text}");
        assert!(text.contains("# TYPE mailsender_build_info gauge"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        for family in [
            "mailsender_letters_received_total",
            "mailsender_letters_stored_total",
            "mailsender_letters_sent_total 1",
            "mailsender_letters_failed_total{reason=\"permanent\"} 1",
            "mailsender_letters_retried_total",
            "mailsender_send_duration_seconds_bucket",
            "mailsender_rate_limit_wait_seconds_bucket",
            "mailsender_sends_in_flight",
            "mailsender_paused 0",
            "mailsender_letters{status=\"sent\"} 3",
            "mailsender_build_info{version=",
        ] {
            assert!(text.contains(family), "{family} missing from\n{text}");
        }
    }
}
