//! Several relays in order of preference (`SMTP_HOST=a.example.com,b.example.com:2525`), each
//! behind a circuit breaker. A worker connects to the most preferred relay that is usable; a relay
//! that cannot open a session sends it on to the next one at once. After `failures` consecutive
//! failures a relay is skipped (open) for `cooldown`; then one connection probes it (half-open)
//! and decides whether it is used again (closed) or skipped for another cool-down.
//!
//! The breaker never leaves a worker with nothing to try: when every relay is skipped, all are
//! tried in order anyway, so a single relay behaves as it did before there were several.
//!
//! Only what happens before a message's final dot counts here. A failure after the dot is the
//! letter's business (it may have been delivered), never a reason to resend it elsewhere.

use std::{
    fmt,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::time::Instant;

use super::{
    client::{Connection, Settings},
    reply::SmtpError,
};

/// One relay's address as `SMTP_HOST` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for RelayAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Parses `SMTP_HOST`: comma-separated hosts, each `host`, `host:port`, `[v6]` or `[v6]:port`
/// (a bare IPv6 address takes `default_port`). The order is the order of preference.
pub fn parse_relays(value: &str, default_port: u16) -> Result<Vec<RelayAddr>, String> {
    let mut relays = Vec::new();
    for entry in value.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err("an empty entry".into());
        }
        let port = |p: &str| match p.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(format!("{entry:?} has no valid port (1 to 65535)")),
        };
        let relay = if let Some(rest) = entry.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(|| format!("{entry:?} lacks its closing ]"))?;
            let port = match after {
                "" => default_port,
                after => port(after.strip_prefix(':').ok_or_else(|| format!("{entry:?}: expected :port after ]"))?)?,
            };
            RelayAddr { host: host.to_owned(), port }
        } else if entry.matches(':').count() > 1 {
            // A bare IPv6 address: its colons are not a port separator.
            RelayAddr { host: entry.to_owned(), port: default_port }
        } else if let Some((host, p)) = entry.split_once(':') {
            RelayAddr { host: host.to_owned(), port: port(p)? }
        } else {
            RelayAddr { host: entry.to_owned(), port: default_port }
        };
        if relay.host.is_empty() || relay.host.contains(char::is_whitespace) {
            return Err(format!("{entry:?} is not a host name or address"));
        }
        if relays.contains(&relay) {
            return Err(format!("{relay} is named twice"));
        }
        relays.push(relay);
    }
    Ok(relays)
}

/// When a relay is skipped, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    /// Consecutive failures (connections that failed, sessions closed with 421) that open it.
    pub failures: u32,
    /// How long an open breaker skips its relay before one probe connection is let through.
    pub cooldown: Duration,
}

/// What the breaker of one relay says, as `/ready` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// In use.
    Closed,
    /// One probe connection is under way; the others skip the relay until it decides.
    HalfOpen,
    /// Skipped until its cool-down ends.
    Open,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half-open",
            State::Open => "open",
        }
    }

    /// The value of the `smtp_relay_state` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

/// One relay's breaker, without a clock of its own (pure, tested on tokio's paused clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed { failures: u32 },
    Open { until: Instant, failures: u32 },
    HalfOpen { failures: u32 },
}

impl Circuit {
    fn state(&self) -> State {
        match self {
            Circuit::Closed { .. } => State::Closed,
            Circuit::HalfOpen { .. } => State::HalfOpen,
            Circuit::Open { .. } => State::Open,
        }
    }

    fn failures(&self) -> u32 {
        match *self {
            Circuit::Closed { failures } | Circuit::Open { failures, .. } | Circuit::HalfOpen { failures } => failures,
        }
    }

    /// Whether a connection may go to this relay now (an open one whose cool-down is over may
    /// take the probe).
    fn usable(&self, now: Instant) -> bool {
        match *self {
            Circuit::Closed { .. } => true,
            Circuit::Open { until, .. } => now >= until,
            Circuit::HalfOpen { .. } => false,
        }
    }

    /// Takes the relay for one connection if it is usable; `Some(true)` when that connection is
    /// the probe.
    fn begin(&mut self, now: Instant) -> Option<bool> {
        match *self {
            Circuit::Closed { .. } => Some(false),
            Circuit::Open { until, failures } if now >= until => {
                *self = Circuit::HalfOpen { failures };
                Some(true)
            }
            _ => None,
        }
    }

    /// The relay took a transaction: whatever failed before is forgiven.
    fn succeeded(&mut self) {
        *self = Circuit::Closed { failures: 0 };
    }

    /// A session opened. That alone does not prove the relay works (it may answer every MAIL
    /// with 421), so a probe that connects puts it back in use one failure away from open
    /// again, and a closed breaker keeps its count until a transaction goes through.
    fn connected(&mut self, breaker: &Breaker) {
        if let Circuit::HalfOpen { .. } | Circuit::Open { .. } = self {
            *self = Circuit::Closed { failures: breaker.failures - 1 };
        }
    }

    /// Counts a failure; true when it opened the breaker (or kept it open after a probe).
    fn failed(&mut self, now: Instant, breaker: &Breaker) -> bool {
        let failures = self.failures().saturating_add(1);
        let open = Circuit::Open { until: now + breaker.cooldown, failures };
        match self {
            Circuit::Closed { .. } if failures < breaker.failures => {
                *self = Circuit::Closed { failures };
                false
            }
            // A failure while open (every relay was being tried anyway) restarts the cool-down.
            Circuit::Closed { .. } | Circuit::HalfOpen { .. } | Circuit::Open { .. } => {
                *self = open;
                true
            }
        }
    }

    /// The probe ended without a verdict (its task was dropped): the next connection probes.
    fn abandoned(&mut self, now: Instant) {
        if let Circuit::HalfOpen { failures } = *self {
            *self = Circuit::Open { until: now, failures };
        }
    }
}

/// The metrics of one relay, made by the caller (this module knows no metrics registry).
#[derive(Debug, Clone, Default)]
pub struct RelayMetrics {
    /// 0 closed, 1 half-open, 2 open.
    pub state: Gauge,
    /// Times a worker left this relay for the next one.
    pub failovers: Counter,
}

struct Relay {
    addr: RelayAddr,
    settings: Settings,
    circuit: Mutex<Circuit>,
    metrics: RelayMetrics,
}

impl Relay {
    fn circuit(&self) -> MutexGuard<'_, Circuit> {
        // Every change of the circuit is one assignment: a panic elsewhere cannot leave it torn.
        self.circuit.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One relay's state for `/ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayStatus {
    pub relay: String,
    pub state: State,
    pub consecutive_failures: u32,
    /// While open: how long until a probe may go.
    pub probe_in: Option<Duration>,
}

/// The relays of `SMTP_HOST`, in order of preference, shared by every worker.
pub struct Relays {
    relays: Vec<Relay>,
    breaker: Breaker,
}

impl Relays {
    /// `base` holds everything but the host and port, which each relay sets; `metrics` has one
    /// entry per relay, in the same order. `addrs` is empty only in the sandbox, which connects
    /// to nothing.
    pub fn new(base: &Settings, addrs: &[RelayAddr], breaker: Breaker, metrics: Vec<RelayMetrics>) -> Relays {
        assert_eq!(addrs.len(), metrics.len(), "one set of metrics per relay");
        let relays = addrs
            .iter()
            .zip(metrics)
            .map(|(addr, metrics)| {
                metrics.state.set(State::Closed.gauge());
                Relay {
                    addr: addr.clone(),
                    settings: Settings { host: addr.host.clone(), port: addr.port, ..base.clone() },
                    circuit: Mutex::new(Circuit::Closed { failures: 0 }),
                    metrics,
                }
            })
            .collect();
        Relays { relays, breaker: Breaker { failures: breaker.failures.max(1), ..breaker } }
    }

    pub fn len(&self) -> usize {
        self.relays.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relays.is_empty()
    }

    pub fn addrs(&self) -> impl Iterator<Item = &RelayAddr> {
        self.relays.iter().map(|r| &r.addr)
    }

    /// Opens a session with the most preferred usable relay but those in `avoid` (the ones the
    /// letter already left), moving to the next one at once when a relay cannot open it. Fails
    /// with the last relay's error when none could.
    pub async fn connect(&self, avoid: &[usize]) -> Result<(Connection, usize), SmtpError> {
        let mut tried: Vec<bool> = (0..self.relays.len()).map(|i| avoid.contains(&i)).collect();
        let mut last_error = None;
        loop {
            let Some(choice) = self.choose(&tried, last_error.is_none()) else { break };
            let index = choice.index;
            tried[index] = true;
            let relay = &self.relays[index];
            match Connection::connect(&relay.settings).await {
                Ok(connection) => {
                    choice.settle(true);
                    return Ok((connection, index));
                }
                Err(error) => {
                    choice.settle(false);
                    if let Some(next) = self.choose_peek(&tried) {
                        relay.metrics.failovers.inc();
                        tracing::warn!(relay = %relay.addr, next = %self.relays[next].addr, error = %error, "SMTP relay failed; trying the next one");
                    } else if self.relays.len() > 1 {
                        tracing::warn!(relay = %relay.addr, error = %error, "SMTP relay failed; no other relay left to try");
                    }
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| SmtpError::Policy("no SMTP relay configured".into())))
    }

    /// The most preferred relay not yet tried (nor avoided) that the breaker lets through; when
    /// nothing was tried yet and the breaker skips every one, the most preferred anyway.
    fn choose(&self, tried: &[bool], first: bool) -> Option<Choice<'_>> {
        let now = Instant::now();
        for (index, relay) in self.relays.iter().enumerate().filter(|(i, _)| !tried[*i]) {
            let mut circuit = relay.circuit();
            if let Some(probe) = circuit.begin(now) {
                relay.metrics.state.set(circuit.state().gauge());
                if probe {
                    tracing::info!(relay = %relay.addr, "SMTP relay's cool-down is over; probing it");
                }
                return Some(Choice { relays: self, index, probe, settled: false });
            }
        }
        // Skipping every relay would fail the letter without trying anything.
        let index = (0..self.relays.len()).find(|&i| !tried[i])?;
        first.then_some(Choice { relays: self, index, probe: false, settled: false })
    }

    /// The relay [`Relays::choose`] would pick next, without taking it.
    fn choose_peek(&self, tried: &[bool]) -> Option<usize> {
        let now = Instant::now();
        (0..self.relays.len()).find(|&i| !tried[i] && self.relays[i].circuit().usable(now))
    }

    /// A relay took a transaction (it answered MAIL with anything but 421): it works.
    pub fn succeeded(&self, index: usize) {
        if let Some(relay) = self.relays.get(index) {
            self.record(relay, Outcome::Succeeded);
        }
    }

    /// A relay failed in a session it had opened (it closed the connection, or said 421,
    /// before the message's final dot); `moving_on` when the worker goes to another relay.
    pub fn failed(&self, index: usize, reason: &dyn fmt::Display, moving_on: bool) {
        if let Some(relay) = self.relays.get(index) {
            self.record(relay, Outcome::Failed);
            if moving_on {
                relay.metrics.failovers.inc();
                tracing::warn!(relay = %relay.addr, error = %reason, "SMTP relay failed before the message was handed over; the next relay takes it");
            }
        }
    }

    /// Whether a worker on relay `index` should leave it for a more preferred one (not in
    /// `avoid`): that relay is in use again, or its cool-down is over and a probe may go.
    pub fn prefers_other_than(&self, index: usize, avoid: &[usize]) -> bool {
        let now = Instant::now();
        self.relays.iter().take(index).enumerate().any(|(i, relay)| !avoid.contains(&i) && relay.circuit().usable(now))
    }

    /// Every relay's breaker, in order of preference.
    pub fn status(&self) -> Vec<RelayStatus> {
        let now = Instant::now();
        self.relays
            .iter()
            .map(|relay| {
                let circuit = *relay.circuit();
                RelayStatus {
                    relay: relay.addr.to_string(),
                    state: circuit.state(),
                    consecutive_failures: circuit.failures(),
                    probe_in: match circuit {
                        Circuit::Open { until, .. } => Some(until.saturating_duration_since(now)),
                        _ => None,
                    },
                }
            })
            .collect()
    }

    fn record(&self, relay: &Relay, outcome: Outcome) {
        let mut circuit = relay.circuit();
        let before = circuit.state();
        match outcome {
            Outcome::Succeeded => circuit.succeeded(),
            Outcome::Connected => circuit.connected(&self.breaker),
            Outcome::Failed => {
                if circuit.failed(Instant::now(), &self.breaker) && before != State::Open {
                    tracing::warn!(
                        relay = %relay.addr,
                        consecutive_failures = circuit.failures(),
                        cooldown_s = self.breaker.cooldown.as_secs_f64(),
                        "SMTP relay skipped until its cool-down ends"
                    );
                }
            }
        }
        relay.metrics.state.set(circuit.state().gauge());
        if outcome != Outcome::Failed && before != State::Closed {
            tracing::info!(relay = %relay.addr, "SMTP relay is in use again");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Connected,
    Succeeded,
    Failed,
}

/// One connection's claim on a relay; a probe that ends without a verdict (its task dropped)
/// lets the next connection probe.
struct Choice<'a> {
    relays: &'a Relays,
    index: usize,
    probe: bool,
    settled: bool,
}

impl Choice<'_> {
    fn settle(mut self, success: bool) {
        self.settled = true;
        let outcome = if success { Outcome::Connected } else { Outcome::Failed };
        self.relays.record(&self.relays.relays[self.index], outcome);
    }
}

impl Drop for Choice<'_> {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            let relay = &self.relays.relays[self.index];
            let mut circuit = relay.circuit();
            circuit.abandoned(Instant::now());
            relay.metrics.state.set(circuit.state().gauge());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(host: &str, port: u16) -> RelayAddr {
        RelayAddr { host: host.into(), port }
    }

    #[test]
    fn smtp_host_lists_relays_in_order() {
        assert_eq!(parse_relays("smtp.example.com", 25).unwrap(), [addr("smtp.example.com", 25)]);
        assert_eq!(
            parse_relays(" a.example.com , b.example.com:2525,[::1]:26,[::1],2001:db8::1", 587).unwrap(),
            [
                addr("a.example.com", 587),
                addr("b.example.com", 2525),
                addr("::1", 26),
                addr("::1", 587),
                addr("2001:db8::1", 587)
            ]
        );
        for bad in ["a,,b", "a:0", "a:x", "a:70000", "[::1", "[::1]x", "a,a:25", ",", "a b"] {
            assert!(parse_relays(bad, 25).is_err(), "{bad}");
        }
        assert_eq!(addr("::1", 25).to_string(), "[::1]:25");
    }

    const BREAKER: Breaker = Breaker { failures: 3, cooldown: Duration::from_secs(30) };

    #[tokio::test(start_paused = true)]
    async fn a_breaker_opens_after_consecutive_failures_and_one_probe_decides() {
        let mut circuit = Circuit::Closed { failures: 0 };
        let now = Instant::now;
        // Failures that do not follow each other do not open it.
        assert!(!circuit.failed(now(), &BREAKER));
        assert!(!circuit.failed(now(), &BREAKER));
        circuit.succeeded();
        assert!(!circuit.failed(now(), &BREAKER));
        assert!(!circuit.failed(now(), &BREAKER));
        assert_eq!(circuit.begin(now()), Some(false));
        assert!(circuit.failed(now(), &BREAKER), "the third in a row opens it");
        assert_eq!(circuit.state(), State::Open);
        assert!(!circuit.usable(now()));
        assert_eq!(circuit.begin(now()), None);

        tokio::time::advance(BREAKER.cooldown - Duration::from_millis(1)).await;
        assert_eq!(circuit.begin(now()), None, "still cooling down");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(circuit.usable(now()));
        assert_eq!(circuit.begin(now()), Some(true), "the first connection after the cool-down probes");
        assert_eq!(circuit.state(), State::HalfOpen);
        assert_eq!(circuit.begin(now()), None, "one probe at a time");
        assert!(!circuit.usable(now()));

        // A failed probe opens it for another cool-down.
        assert!(circuit.failed(now(), &BREAKER));
        assert_eq!(circuit.begin(now()), None);
        tokio::time::advance(BREAKER.cooldown).await;
        assert_eq!(circuit.begin(now()), Some(true));
        // An abandoned probe lets the next connection probe at once.
        circuit.abandoned(now());
        assert_eq!(circuit.begin(now()), Some(true));
        circuit.connected(&BREAKER);
        assert_eq!(circuit, Circuit::Closed { failures: BREAKER.failures - 1 });
        circuit.succeeded();
        assert_eq!(circuit, Circuit::Closed { failures: 0 });
        assert_eq!(circuit.begin(now()), Some(false));
    }

    fn relays(count: usize) -> (Relays, Vec<RelayMetrics>) {
        let base = Settings {
            host: String::new(),
            port: 0,
            tls: super::super::TlsMode::None,
            tls_config: None,
            helo_name: "test".into(),
            credentials: None,
            timeouts: Default::default(),
            commands: Counter::default(),
            connections: Counter::default(),
        };
        let addrs: Vec<RelayAddr> = (0..count).map(|i| addr(&format!("relay{i}"), 25)).collect();
        let metrics: Vec<RelayMetrics> = (0..count).map(|_| RelayMetrics::default()).collect();
        (Relays::new(&base, &addrs, BREAKER, metrics.clone()), metrics)
    }

    fn fail(relays: &Relays, index: usize, times: usize) {
        for _ in 0..times {
            relays.failed(index, &"test", true);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_most_preferred_usable_relay_is_chosen_and_taken_back_after_a_probe() {
        let (relays, metrics) = relays(3);
        let pick = |tried: &[bool]| relays.choose(tried, !tried.contains(&true)).map(|c| c.index);
        assert_eq!(pick(&[false; 3]), Some(0));
        assert_eq!(pick(&[true, false, false]), Some(1));
        assert!(!relays.prefers_other_than(0, &[]));

        fail(&relays, 0, 3);
        assert_eq!(metrics[0].state.get(), 2);
        assert_eq!(metrics[0].failovers.get(), 3);
        assert_eq!(pick(&[false; 3]), Some(1), "an open relay is skipped");
        assert!(!relays.prefers_other_than(1, &[]));
        let status = relays.status();
        assert_eq!((status[0].state, status[0].consecutive_failures), (State::Open, 3));
        assert_eq!(status[0].probe_in, Some(BREAKER.cooldown));

        tokio::time::advance(BREAKER.cooldown).await;
        assert!(relays.prefers_other_than(1, &[]), "a worker on the fallback leaves it for the probe");
        assert!(!relays.prefers_other_than(1, &[0]), "but not a letter that just left it");
        let probe = relays.choose(&[false; 3], true).unwrap();
        assert_eq!((probe.index, probe.probe), (0, true));
        assert_eq!(metrics[0].state.get(), 1);
        assert!(!relays.prefers_other_than(1, &[]), "the others stay while one probes");
        assert_eq!(pick(&[false; 3]), Some(1));
        probe.settle(true);
        assert_eq!(metrics[0].state.get(), 0);
        assert!(relays.prefers_other_than(1, &[]));
        assert_eq!(pick(&[false; 3]), Some(0));
        // A probe that only connected is one failure from open: a relay that greets and then
        // answers 421 is skipped again at once.
        relays.failed(0, &"421", true);
        assert_eq!(relays.status()[0].state, State::Open);
        tokio::time::advance(BREAKER.cooldown).await;
        relays.choose(&[false; 3], true).unwrap().settle(true);
        relays.succeeded(0);
        relays.failed(0, &"421", true);
        assert_eq!(relays.status()[0].state, State::Closed, "a transaction that went through forgives");
    }

    #[tokio::test(start_paused = true)]
    async fn connecting_alone_does_not_reset_the_count() {
        let (relays, _) = relays(2);
        for _ in 0..3 {
            relays.choose(&[false; 2], true).unwrap().settle(true);
            relays.failed(0, &"421", true);
        }
        assert_eq!(relays.status()[0].state, State::Open);
        assert_eq!(relays.choose(&[false; 2], true).map(|c| c.index), Some(1));
        // A letter that left relay 0 goes elsewhere even before its breaker opens.
        let (fresh, _) = super::tests::relays(2);
        assert_eq!(fresh.choose(&[true, false], true).map(|c| c.index), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_relay_is_skipped_the_first_is_tried_anyway() {
        let (one, _) = relays(1);
        fail(&one, 0, 5);
        assert_eq!(one.status()[0].state, State::Open);
        let choice = one.choose(&[false], true).expect("a single relay is always tried");
        assert_eq!((choice.index, choice.probe), (0, false));
        choice.settle(true);
        assert_eq!(one.status()[0].state, State::Closed);

        let (two, _) = relays(2);
        fail(&two, 0, 3);
        fail(&two, 1, 3);
        assert_eq!(two.choose(&[false, false], true).map(|c| c.index), Some(0));
        assert_eq!(two.choose(&[true, false], true).map(|c| c.index), Some(1), "the first not avoided");
        // Once something was tried in this round, skipped relays stay skipped.
        assert!(two.choose(&[false, true], false).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_lets_the_next_connection_probe() {
        let (relays, metrics) = relays(2);
        fail(&relays, 0, 3);
        tokio::time::advance(BREAKER.cooldown).await;
        let probe = relays.choose(&[false, false], true).unwrap();
        assert!(probe.probe);
        drop(probe);
        assert_eq!(metrics[0].state.get(), 2);
        let again = relays.choose(&[false, false], true).unwrap();
        assert_eq!((again.index, again.probe), (0, true));
    }
}
