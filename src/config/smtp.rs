//! The SMTP section: the relays, how to reach them, and the workers that talk to them.

use std::{path::PathBuf, time::Duration};

use lettre::message::Mailbox;
use secrecy::SecretString;

use super::{
    ConfigError, Env,
    budget::{self, QuotaWindow, RateUnit},
    default_hostname,
};
use crate::smtp::{Breaker, RelayAddr, Timeouts, TlsMode};

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// `SMTP_SANDBOX`: the whole pipeline runs, but no message is handed to a relay (no
    /// connection is opened at all) and the simulator addresses make their feedback events
    /// (`crate::feedback::sandbox`). `SMTP_HOST` may then be unset.
    pub sandbox: bool,
    /// `SMTP_HOST` as given: one relay, or several separated by commas (empty in the sandbox
    /// when unset).
    pub host: String,
    /// `SMTP_PORT`: the port of every relay that names none.
    pub port: u16,
    /// The relays of `SMTP_HOST`, in order of preference (none in the sandbox when unset).
    pub relays: Vec<RelayAddr>,
    /// When a relay that keeps failing is skipped (`SMTP_RELAY_BREAKER_*`).
    pub breaker: Breaker,
    pub user: Option<String>,
    pub password: Option<SecretString>,
    pub from: Mailbox,
    pub tls: TlsMode,
    pub tls_insecure_skip_verify: bool,
    pub tls_ca_file: Option<PathBuf>,
    pub helo_name: String,
    /// Number of SMTP workers, each with its own reused connection.
    pub max_senders: usize,
    pub rate_period: Duration,
    pub rate_max_letters: u32,
    pub rate_burst: u32,
    /// What one unit of the budget is: a message, or one recipient of a message.
    pub rate_unit: RateUnit,
    /// Further windows of the shared budget (`SMTP_QUOTAS`), enforced together with the rate.
    pub quotas: Vec<QuotaWindow>,
    /// Per-phase SMTP timeouts (RFC 5321 §4.5.3.2).
    pub timeouts: Timeouts,
    /// Most recipients in one SMTP transaction; a letter with more goes in several.
    pub max_recipients: usize,
    /// A kept connection idle longer than this is checked (NOOP) before it carries a letter.
    pub idle_check_after: Duration,
    /// While a relay throttles, the rate recovers by a quarter every this long.
    pub throttle_recovery_step: Duration,
}

/// Consecutive failures of a relay (connections that failed, 421 replies) before it is skipped.
pub const DEFAULT_RELAY_BREAKER_FAILURES: u32 = 3;
/// How long a relay that keeps failing is skipped before one connection probes it. Long enough
/// not to hammer a relay that is restarting, short enough to move back soon after it is up.
pub const DEFAULT_RELAY_BREAKER_COOLDOWN: &str = "30s";

pub(super) fn read(env: &Env) -> Result<SmtpConfig, ConfigError> {
    let tls = env.choice(
        "SMTP_TLS",
        "opportunistic",
        &[
            (&["none", "off", "plain"], TlsMode::None),
            (&["opportunistic", "auto"], TlsMode::Opportunistic),
            (&["starttls", "required"], TlsMode::StartTls),
            (&["implicit", "smtps", "tls"], TlsMode::Implicit),
        ],
        "one of none, opportunistic, starttls, implicit",
    )?;
    let default_port = match tls {
        TlsMode::Implicit => 465,
        TlsMode::StartTls => 587,
        TlsMode::None | TlsMode::Opportunistic => 25,
    };
    let user = env.optional("SMTP_USER");
    let from = match env.optional("SMTP_FROM") {
        Some(from) => from.parse::<Mailbox>().map_err(|_| ConfigError::Invalid {
            var: "SMTP_FROM",
            value: from.clone(),
            expected: "a mailbox such as `Mailer <noreply@example.com>`".into(),
        })?,
        // The Go service sent as its SMTP user, which is usually an address.
        None => user
            .as_deref()
            .and_then(|user| user.parse::<Mailbox>().ok())
            .unwrap_or_else(|| Mailbox::new(None, "mailsender@localhost".parse().expect("valid literal address"))),
    };
    // A switch of its own rather than a scheme in `SMTP_HOST`: the relay list keeps one meaning
    // (hosts to fail over between), and a deployment that sends nothing says so in one line.
    let sandbox = env.boolean("SMTP_SANDBOX", false)?;
    let host = match env.optional("SMTP_HOST") {
        Some(host) => host,
        None if sandbox => String::new(),
        None => {
            return Err(ConfigError::Missing {
                var: "SMTP_HOST",
                expected: "the SMTP server's host name or address, or several separated by commas",
            });
        }
    };
    let port = env.parse("SMTP_PORT", default_port, "a port number from 1 to 65535", |p: &u16| *p > 0)?;
    // Checked in the sandbox too when given, so the same settings with the sandbox off start.
    let relays = match host.as_str() {
        "" => Vec::new(),
        host => crate::smtp::relays::parse_relays(host, port).map_err(|problem| ConfigError::Invalid {
            var: "SMTP_HOST",
            value: host.to_owned(),
            expected: format!(
                "host names or addresses separated by commas, in order of preference, each optionally with \
                 :port ([v6]:port for IPv6); {problem}"
            ),
        })?,
    };
    let breaker = Breaker {
        failures: env.parse(
            "SMTP_RELAY_BREAKER_FAILURES",
            DEFAULT_RELAY_BREAKER_FAILURES,
            "a failure count from 1 to 1000",
            |n| (1..=1000).contains(n),
        )?,
        cooldown: env.positive_duration("SMTP_RELAY_BREAKER_COOLDOWN", DEFAULT_RELAY_BREAKER_COOLDOWN)?,
    };
    let smtp = SmtpConfig {
        sandbox,
        host,
        port,
        relays,
        breaker,
        password: env.secret("SMTP_PASSWORD"),
        user,
        from,
        tls,
        tls_insecure_skip_verify: env.boolean("SMTP_TLS_INSECURE_SKIP_VERIFY", false)?,
        tls_ca_file: env.optional("SMTP_TLS_CA_FILE").map(PathBuf::from),
        helo_name: env.optional("SMTP_HELO_NAME").unwrap_or_else(default_hostname),
        max_senders: env.parse("SMTP_MAX_SENDERS", 4, "a worker count from 1 to 256", |n| (1..=256).contains(n))?,
        rate_period: env.duration("SMTP_RATE_LIMIT_PERIOD", "5s")?,
        rate_max_letters: env.parse("SMTP_RATE_LIMIT_MAX_LETTERS", 5, "a letter count of at least 1", |n| *n >= 1)?,
        rate_burst: env.parse("SMTP_RATE_LIMIT_BURST", 1, "a letter count of at least 1", |n| *n >= 1)?,
        rate_unit: budget::rate_unit(env)?,
        quotas: budget::quotas(env)?,
        timeouts: timeouts(env)?,
        max_recipients: env.parse(
            "SMTP_MAX_RECIPIENTS",
            50,
            "a recipient count from 1 to 1000 per SMTP transaction",
            |n| (1..=1000).contains(n),
        )?,
        idle_check_after: env.positive_duration("SMTP_IDLE_CHECK_AFTER", "5s")?,
        throttle_recovery_step: env.positive_duration("SMTP_THROTTLE_RECOVERY_STEP", "5s")?,
    };
    if smtp.password.is_some() && smtp.user.is_none() {
        return Err(ConfigError::Missing { var: "SMTP_USER", expected: "set together with SMTP_PASSWORD" });
    }
    budget::check_rate(&smtp)?;
    Ok(smtp)
}

/// The per-phase timeouts. `SMTP_TIMEOUT`, the one bound of earlier versions, still sets every
/// phase but RSET/NOOP when given, so an existing deployment keeps its behaviour; each phase's own
/// variable wins over it.
fn timeouts(env: &Env) -> Result<Timeouts, ConfigError> {
    let defaults = Timeouts::default();
    let legacy = match env.optional("SMTP_TIMEOUT") {
        Some(_) => Some(env.positive_duration("SMTP_TIMEOUT", "")?),
        None => None,
    };
    let phase = |var: &'static str, default: Duration| -> Result<Duration, ConfigError> {
        let default = legacy.unwrap_or(default);
        env.positive_duration(var, &humantime::format_duration(default).to_string())
    };
    Ok(Timeouts {
        connect: phase("SMTP_TIMEOUT_CONNECT", defaults.connect)?,
        greeting: phase("SMTP_TIMEOUT_GREETING", defaults.greeting)?,
        command: phase("SMTP_TIMEOUT_COMMAND", defaults.command)?,
        data: phase("SMTP_TIMEOUT_DATA", defaults.data)?,
        data_end: phase("SMTP_TIMEOUT_DATA_END", defaults.data_end)?,
        short: env.positive_duration("SMTP_TIMEOUT_RSET", &humantime::format_duration(defaults.short).to_string())?,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::config::{Config, ConfigError};

    fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let base = [("KAFKA_BROKERS", "127.0.0.1:9092"), ("MONGO_LOCAL", "mongodb://127.0.0.1:27017")];
        let vars: HashMap<String, String> =
            base.iter().chain(pairs).map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Config::from_vars(vars)
    }

    #[test]
    fn the_sandbox_needs_no_relay_but_checks_one_given() {
        assert!(matches!(from(&[]), Err(ConfigError::Missing { var: "SMTP_HOST", .. })));
        let off = from(&[("SMTP_HOST", "smtp.example.com")]).unwrap();
        assert!(!off.smtp.sandbox, "off by default");
        let sandbox = from(&[("SMTP_SANDBOX", "true")]).unwrap();
        assert!(sandbox.smtp.sandbox && sandbox.smtp.relays.is_empty());
        let with_host = from(&[("SMTP_SANDBOX", "on"), ("SMTP_HOST", "smtp.example.com:2525")]).unwrap();
        assert_eq!(with_host.smtp.relays.len(), 1);
        for (pairs, var) in [
            (vec![("SMTP_SANDBOX", "maybe")], "SMTP_SANDBOX"),
            (vec![("SMTP_SANDBOX", "true"), ("SMTP_HOST", "a.example.com,,b")], "SMTP_HOST"),
        ] {
            match from(&pairs) {
                Err(ConfigError::Invalid { var: named, .. }) => assert_eq!(named, var),
                other => panic!("{pairs:?}: expected a refusal naming {var}, got {other:?}"),
            }
        }
    }
}
