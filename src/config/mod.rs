//! Typed configuration, read once from the environment at start-up, one section per file.
//!
//! Variable names and defaults stay compatible with the Go service this one replaces; everything
//! new has a default, so an old deployment's environment starts the new service unchanged.
//! A missing or invalid value is reported with the variable's name and what was expected.
//! Settings are parsed here and nothing more: what a value means to a stage (a link template, a
//! DKIM key) is checked by that stage's constructor.

mod budget;
mod deliverability;
mod dispatch;
pub mod feedback;
mod http;
mod kafka;
mod mongo;
mod smtp;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use secrecy::SecretString;

pub use self::{
    budget::{QuotaWindow, RateUnit},
    deliverability::{DeliverabilityConfig, DkimSettings},
    dispatch::{ChoreConfig, DispatchConfig, RetryConfig},
    feedback::FeedbackConfig,
    http::{HttpConfig, Network},
    kafka::{AttachmentLimits, KafkaConfig},
    mongo::{MongoConfig, MongoTarget},
    smtp::{DEFAULT_RELAY_BREAKER_COOLDOWN, DEFAULT_RELAY_BREAKER_FAILURES, SmtpConfig},
};
pub use crate::smtp::TlsMode;

/// A configuration problem, naming the variable so an operator can fix it without reading code.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is required: {expected}")]
    Missing { var: &'static str, expected: &'static str },
    #[error("{var}={value:?} is invalid: expected {expected}")]
    Invalid { var: &'static str, value: String, expected: String },
    /// Used for secrets, whose values must not be echoed.
    #[error("{var} is invalid: expected {expected}")]
    InvalidSecret { var: &'static str, expected: &'static str },
    /// The admin API would be reachable beyond loopback and guarded by nothing but the peer
    /// address, which a service mesh makes loopback for every request.
    #[error(
        "HTTP_ADDR={addr} listens beyond loopback, but ADMIN_TOKEN is unset and ADMIN_ALLOWED_NETWORKS is not \
         set: the admin routes (POST /post sends mail, POST /halt stops the service) would trust every \
         loopback peer, and behind a service mesh every request is one (Istio's sidecar delivers from \
         127.0.0.6, Linkerd's proxy from 127.0.0.1). Set ADMIN_TOKEN (recommended), or set \
         ADMIN_ALLOWED_NETWORKS explicitly to the networks you trust, or bind HTTP_ADDR to loopback"
    )]
    AdminUnguarded { addr: SocketAddr },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub mongo: MongoConfig,
    pub smtp: SmtpConfig,
    pub dispatch: DispatchConfig,
    pub retry: RetryConfig,
    pub chores: ChoreConfig,
    pub http: HttpConfig,
    pub deliverability: DeliverabilityConfig,
    pub feedback: FeedbackConfig,
    /// Identifies this replica as the owner of the letters it leases.
    pub instance_id: String,
    /// How long in-flight sends may take to finish once shutdown starts.
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    /// `MAILSENDER_FAULT_INJECTION`, for tests only (see `app::Supervisor`).
    pub fault_injection: Option<String>,
}

impl Config {
    /// The service's configuration, refused when it would leave the admin API unguarded.
    pub fn from_env() -> Result<Self, ConfigError> {
        let config = Self::from_vars(std::env::vars().collect())?;
        config.http.check_admin_guard()?;
        Ok(config)
    }

    /// Builds the configuration from a set of variables, so tests need not touch the process
    /// environment.
    pub fn from_vars(vars: HashMap<String, String>) -> Result<Self, ConfigError> {
        let env = Env { vars };
        let kafka = kafka::read(&env)?;
        let mongo = mongo::read(&env)?;
        let smtp = smtp::read(&env)?;
        let retry = dispatch::retry(&env)?;
        let dispatch = dispatch::dispatch(&env)?;
        let chores = dispatch::chores(&env)?;
        let http = http::read(&env)?;
        let deliverability = deliverability::read(&env, &smtp.from)?;
        let feedback = feedback::feedback(&env)?;
        // The public listener serves the one-click endpoint, the relays' webhooks, or both.
        if deliverability.public_addr.is_some() && deliverability.unsubscribe_url.is_none() && !feedback.webhooks.any()
        {
            return Err(ConfigError::Missing {
                var: "LIST_UNSUBSCRIBE_URL",
                expected: "the link template the one-click endpoint on PUBLIC_HTTP_ADDR checks requests against \
                           (or a relay's webhook secret, when the listener serves only webhooks)",
            });
        }
        let log_format = env.choice(
            "LOG_FORMAT",
            "text",
            &[(&["text", "pretty", ""], LogFormat::Text), (&["json"], LogFormat::Json)],
            "text or json",
        )?;
        Ok(Config {
            instance_id: env
                .optional("INSTANCE_ID")
                .unwrap_or_else(|| format!("{}-{}", default_hostname(), short_random())),
            shutdown_timeout: env.duration("SHUTDOWN_TIMEOUT", "20s")?,
            kafka,
            mongo,
            smtp,
            dispatch,
            retry,
            chores,
            http,
            deliverability,
            feedback,
            log_format,
            fault_injection: env.optional("MAILSENDER_FAULT_INJECTION"),
        })
    }
}

fn default_hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn short_random() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// The variables, read by the sections.
struct Env {
    vars: HashMap<String, String>,
}

impl Env {
    /// Empty values count as unset, as they did for the Go service.
    fn optional(&self, var: &str) -> Option<String> {
        self.vars.get(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.optional(var).unwrap_or_else(|| default.to_owned())
    }

    fn required(&self, var: &'static str, expected: &'static str) -> Result<String, ConfigError> {
        self.optional(var).ok_or(ConfigError::Missing { var, expected })
    }

    fn secret(&self, var: &str) -> Option<SecretString> {
        self.optional(var).map(SecretString::from)
    }

    /// An optional listening address: `None` when the variable is unset (the listener is off).
    fn optional_addr(&self, var: &'static str, expected: &str) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let Some(raw) = self.optional(var) else { return Ok(None) };
        raw.parse().map(Some).map_err(|_| ConfigError::Invalid { var, value: raw, expected: expected.to_owned() })
    }

    fn parse<T: std::str::FromStr>(
        &self,
        var: &'static str,
        default: T,
        expected: &str,
        valid: impl Fn(&T) -> bool,
    ) -> Result<T, ConfigError> {
        let Some(raw) = self.optional(var) else { return Ok(default) };
        match raw.parse::<T>() {
            Ok(value) if valid(&value) => Ok(value),
            _ => Err(ConfigError::Invalid { var, value: raw, expected: expected.to_owned() }),
        }
    }

    /// An enum setting: the value of the entry one of whose names is the variable's value, in
    /// any case.
    fn choice<T: Copy>(
        &self,
        var: &'static str,
        default: &str,
        choices: &[(&[&str], T)],
        expected: &str,
    ) -> Result<T, ConfigError> {
        let raw = self.string(var, default).to_ascii_lowercase();
        choices
            .iter()
            .find(|(names, _)| names.contains(&raw.as_str()))
            .map(|(_, value)| *value)
            .ok_or_else(|| ConfigError::Invalid { var, value: raw, expected: expected.to_owned() })
    }

    fn boolean(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        let Some(raw) = self.optional(var) else { return Ok(default) };
        match raw.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::Invalid { var, value: raw, expected: "true or false".into() }),
        }
    }

    /// A duration that must not be zero (a zero timeout fails everything, a zero interval spins).
    fn positive_duration(&self, var: &'static str, default: &str) -> Result<Duration, ConfigError> {
        let value = self.duration(var, default)?;
        if value.is_zero() {
            return Err(ConfigError::Invalid { var, value: "0".into(), expected: "a duration above zero".into() });
        }
        Ok(value)
    }

    /// A duration inside `range`, its bounds named by `expected` when it is not.
    fn duration_within(
        &self,
        var: &'static str,
        default: &str,
        expected: &str,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Result<Duration, ConfigError> {
        within(var, self.duration(var, default)?, range, expected)
    }

    /// Durations as the Go service wrote them (`5s`, `500ms`, `1m30s`) or plain seconds.
    fn duration(&self, var: &'static str, default: &str) -> Result<Duration, ConfigError> {
        let raw = self.string(var, default);
        parse_duration(&raw).ok_or_else(|| ConfigError::Invalid {
            var,
            value: raw,
            expected: "a duration such as 500ms, 5s or 1m30s".into(),
        })
    }
}

/// `value`, read from `var`, refused below `min`.
fn at_least(var: &'static str, value: Duration, min: Duration, expected: &str) -> Result<Duration, ConfigError> {
    within(var, value, min.., expected)
}

/// `value`, read from `var`, refused outside `range`, which `expected` names.
fn within(
    var: &'static str,
    value: Duration,
    range: impl std::ops::RangeBounds<Duration>,
    expected: &str,
) -> Result<Duration, ConfigError> {
    if !range.contains(&value) {
        let value = humantime::format_duration(value).to_string();
        return Err(ConfigError::Invalid { var, value, expected: expected.to_owned() });
    }
    Ok(value)
}

pub fn parse_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    if let Ok(seconds) = raw.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    humantime::parse_duration(raw).ok()
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::smtp::{Breaker, RelayAddr};

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut map: HashMap<String, String> = [
            ("KAFKA_BROKERS", "127.0.0.1:9092"),
            ("MONGO_LOCAL", "mongodb://127.0.0.1:27017"),
            ("SMTP_HOST", "smtp.example.com"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in pairs {
            map.insert(k.to_string(), v.to_string());
        }
        map
    }

    #[test]
    fn defaults_match_the_go_service() {
        let config = Config::from_vars(vars(&[])).unwrap();
        assert_eq!(config.kafka.topic_in, "mts-to-mailsender");
        assert_eq!(config.kafka.topic_out, "mts-to-profile");
        assert_eq!(config.kafka.topic_dlq, "mts-to-mailsender.dlq");
        assert_eq!(config.kafka.group_id, "mailsender");
        assert_eq!(config.mongo.database, "mts");
        assert_eq!(config.mongo.collection, "letters");
        assert_eq!(config.smtp.rate_period, Duration::from_secs(5));
        assert_eq!(config.smtp.rate_max_letters, 5);
        assert_eq!(config.smtp.rate_burst, 1);
        assert_eq!(config.smtp.tls, TlsMode::Opportunistic);
        assert_eq!(config.smtp.port, 25);
        assert_eq!(config.http.addr.port(), 8000);
        assert!(config.dispatch.lease <= Duration::from_secs(30));
    }

    #[test]
    fn deliverability_settings_are_checked_by_name() {
        let url = "https://mail.example.com/u?t={token}";
        let secret = "0123456789abcdef";
        for (pairs, named) in [
            (vec![("DKIM_SELECTOR", "s1")], "DKIM_PRIVATE_KEY_FILE"),
            (vec![("DKIM_PRIVATE_KEY_FILE", "/k.pem")], "DKIM_SELECTOR"),
            (vec![("LIST_UNSUBSCRIBE_URL", url)], "UNSUBSCRIBE_SECRET"),
            (vec![("LIST_UNSUBSCRIBE_URL", url), ("UNSUBSCRIBE_SECRET", "short")], "UNSUBSCRIBE_SECRET"),
            // The template's own checks are the composer's: see
            // `deliverability::tests::the_unsubscribe_template_is_checked_by_name`.
            (vec![("LIST_UNSUBSCRIBE_MAILTO", "not an address")], "LIST_UNSUBSCRIBE_MAILTO"),
            (vec![("PUBLIC_HTTP_ADDR", "127.0.0.1:8080")], "LIST_UNSUBSCRIBE_URL"),
            (vec![("SMTP_DELIVERY", "each")], "SMTP_DELIVERY"),
        ] {
            let error = Config::from_vars(vars(&pairs)).unwrap_err().to_string();
            assert!(error.contains(named), "{pairs:?}: {error}");
            assert!(!error.contains("short") && !error.contains(secret), "a secret in {error}");
        }
        let config = Config::from_vars(vars(&[
            ("SMTP_FROM", "News <news@example.com>"),
            ("DKIM_SELECTOR", "s1"),
            ("DKIM_PRIVATE_KEY_FILE", "/k.pem"),
            ("SMTP_DELIVERY", "individual"),
            ("LIST_UNSUBSCRIBE_URL", "https://m.example.com/u/{address}"),
            ("UNSUBSCRIBE_SECRET", secret),
        ]))
        .unwrap();
        let deliverability = config.deliverability;
        assert_eq!(deliverability.dkim.as_ref().unwrap().domain, "example.com", "the From domain by default");
        assert!(deliverability.individual);
        assert_eq!(deliverability.topic_suppressions, "mts-to-mailsender.suppressions");
        assert_eq!(deliverability.topic_unsubscribed, "mts-to-profile.unsubscribed");
        assert!(!format!("{deliverability:?}").contains(secret));
    }

    #[test]
    fn smtp_host_names_one_relay_or_several_in_order() {
        let one = Config::from_vars(vars(&[])).unwrap().smtp;
        assert_eq!(one.relays, [RelayAddr { host: "smtp.example.com".into(), port: 25 }]);
        assert_eq!(
            one.breaker,
            Breaker { failures: DEFAULT_RELAY_BREAKER_FAILURES, cooldown: Duration::from_secs(30) }
        );
        let several = Config::from_vars(vars(&[
            ("SMTP_HOST", "a.example.com, b.example.com:2525"),
            ("SMTP_PORT", "587"),
            ("SMTP_RELAY_BREAKER_FAILURES", "5"),
            ("SMTP_RELAY_BREAKER_COOLDOWN", "2s"),
        ]))
        .unwrap()
        .smtp;
        assert_eq!(
            several.relays,
            [
                RelayAddr { host: "a.example.com".into(), port: 587 },
                RelayAddr { host: "b.example.com".into(), port: 2525 }
            ]
        );
        assert_eq!(several.breaker, Breaker { failures: 5, cooldown: Duration::from_secs(2) });
        for (var, value) in [
            ("SMTP_HOST", "a.example.com,,b"),
            ("SMTP_HOST", "a.example.com:smtp"),
            ("SMTP_RELAY_BREAKER_FAILURES", "0"),
            ("SMTP_RELAY_BREAKER_COOLDOWN", "0s"),
        ] {
            let error = Config::from_vars(vars(&[(var, value)])).unwrap_err().to_string();
            assert!(error.contains(var), "{var}={value}: {error}");
        }
    }

    #[test]
    fn missing_required_variable_is_named() {
        let mut map = vars(&[]);
        map.remove("SMTP_HOST");
        let error = Config::from_vars(map).unwrap_err().to_string();
        assert!(error.contains("SMTP_HOST"), "{error}");
    }

    #[test]
    fn invalid_values_name_the_variable_and_the_expectation() {
        for (var, value, expected) in [
            ("SMTP_PORT", "abc", "port number"),
            ("SMTP_RATE_LIMIT_PERIOD", "soon", "duration"),
            ("SMTP_MAX_SENDERS", "0", "worker count"),
            ("SMTP_TLS", "maybe", "starttls"),
            ("SMTP_FROM", "not an address", "mailbox"),
            ("LOG_FORMAT", "xml", "json"),
            ("SMTP_TLS_INSECURE_SKIP_VERIFY", "perhaps", "true or false"),
            ("LANE_BULK_SHARE", "0.95", "from 0 to 0.9"),
            ("LANE_BULK_SHARE", "a tenth", "from 0 to 0.9"),
            ("KAFKA_FETCH_WAIT_MAX", "0s", "from 1ms to 5s"),
            ("KAFKA_FETCH_WAIT_MAX", "10s", "from 1ms to 5s"),
            ("KAFKA_FETCH_WAIT_MAX", "soon", "duration"),
        ] {
            let error = Config::from_vars(vars(&[(var, value)])).unwrap_err().to_string();
            assert!(error.contains(var) && error.contains(expected), "{var}: {error}");
        }
    }

    #[test]
    fn go_style_durations_parse() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("fast"), None);
    }

    #[test]
    fn nodeport_variables_build_a_mongo_target() {
        let mut map = vars(&[
            ("MONGO_NODEPORT_SVC_SERVICE_HOST", "mongo.svc"),
            ("MONGO_NODEPORT_SVC_SERVICE_PORT", "30017"),
            ("MONGODB_USERNAME", "mts"),
            ("MONGODB_PASSWORD", "p@ss:word"),
        ]);
        map.remove("MONGO_LOCAL");
        let config = Config::from_vars(map.clone()).unwrap();
        match config.mongo.target {
            MongoTarget::Host { host, port, username, password } => {
                assert_eq!((host.as_str(), port, username.as_str()), ("mongo.svc", 30017, "mts"));
                assert_eq!(password.expose_secret(), "p@ss:word");
            }
            MongoTarget::Uri(_) => panic!("expected host target"),
        }
        map.remove("MONGODB_PASSWORD");
        let error = Config::from_vars(map).unwrap_err().to_string();
        assert!(error.contains("MONGODB_PASSWORD"), "{error}");
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let config = Config::from_vars(vars(&[
            ("SMTP_USER", "mailer@example.com"),
            ("SMTP_PASSWORD", "hunter2-secret"),
            ("ADMIN_TOKEN", "admin-secret-token"),
            ("MONGO_LOCAL", "mongodb://u:mongo-secret@h:1"),
        ]))
        .unwrap();
        let debug = format!("{config:?}");
        for secret in ["hunter2-secret", "admin-secret-token", "mongo-secret"] {
            assert!(!debug.contains(secret), "{secret} leaked: {debug}");
        }
        // The SMTP user doubles as the sender when SMTP_FROM is unset, as in the Go service.
        assert_eq!(config.smtp.from.email.to_string(), "mailer@example.com");
    }

    #[test]
    fn zero_durations_and_crossed_bounds_are_refused_by_name() {
        for var in [
            "SMTP_TIMEOUT",
            "SMTP_TIMEOUT_DATA_END",
            "SMTP_IDLE_CHECK_AFTER",
            "REPUBLISH_INTERVAL",
            "DISPATCH_POLL_INTERVAL",
            "RETRY_BACKOFF_BASE",
            "KAFKA_MESSAGE_TIMEOUT",
        ] {
            let error = Config::from_vars(vars(&[(var, "0s")])).unwrap_err().to_string();
            assert!(error.contains(var) && error.contains("above zero"), "{var}: {error}");
        }
        let error = Config::from_vars(vars(&[("RETRY_BACKOFF_BASE", "5m"), ("RETRY_BACKOFF_MAX", "1m")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("RETRY_BACKOFF_BASE") && error.contains("RETRY_BACKOFF_MAX"), "{error}");
        let error = Config::from_vars(vars(&[("LEASE_DURATION", "3s")])).unwrap_err().to_string();
        assert!(error.contains("LEASE_DURATION") && error.contains("final dot"), "{error}");
        assert!(Config::from_vars(vars(&[("LEASE_DURATION", "4s")])).is_ok());
    }

    #[test]
    fn smtp_timeout_of_earlier_versions_sets_every_phase() {
        let config = Config::from_vars(vars(&[("SMTP_TIMEOUT", "10s"), ("SMTP_TIMEOUT_DATA_END", "1m")])).unwrap();
        let t = config.smtp.timeouts;
        assert_eq!(
            (t.connect, t.greeting, t.command, t.data),
            (Duration::from_secs(10), Duration::from_secs(10), Duration::from_secs(10), Duration::from_secs(10))
        );
        assert_eq!(t.data_end, Duration::from_secs(60));
        let defaults = Config::from_vars(vars(&[])).unwrap().smtp.timeouts;
        assert_eq!(defaults.data_end, Duration::from_secs(600));
        assert_eq!(defaults.command, Duration::from_secs(300));
    }

    #[test]
    fn quotas_and_the_unit_parse_and_bad_ones_are_named() {
        let config =
            Config::from_vars(vars(&[("SMTP_QUOTAS", "10000/24h, 300/1m"), ("SMTP_RATE_LIMIT_UNIT", "recipient")]))
                .unwrap();
        assert_eq!(
            config.smtp.quotas,
            vec![
                QuotaWindow { limit: 10_000, window: Duration::from_secs(86_400) },
                QuotaWindow { limit: 300, window: Duration::from_secs(60) },
            ]
        );
        assert_eq!(config.smtp.rate_unit, RateUnit::Recipient);
        let defaults = Config::from_vars(vars(&[])).unwrap();
        assert!(defaults.smtp.quotas.is_empty());
        assert_eq!(defaults.smtp.rate_unit, RateUnit::Letter);
        for bad in ["300", "0/1m", "10/0s", "10/500ms", "x/1m", "10/soon", "10/1m,,abc"] {
            let error = Config::from_vars(vars(&[("SMTP_QUOTAS", bad)])).unwrap_err().to_string();
            assert!(error.contains("SMTP_QUOTAS") && error.contains("count/duration"), "{bad}: {error}");
        }
        let error = Config::from_vars(vars(&[("SMTP_RATE_LIMIT_UNIT", "byte")])).unwrap_err().to_string();
        assert!(error.contains("SMTP_RATE_LIMIT_UNIT") && error.contains("recipient"), "{error}");
    }

    #[test]
    fn burst_cannot_exceed_the_budget() {
        let error = Config::from_vars(vars(&[("SMTP_RATE_LIMIT_MAX_LETTERS", "5"), ("SMTP_RATE_LIMIT_BURST", "6")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("SMTP_RATE_LIMIT_BURST"), "{error}");
    }

    #[test]
    fn admin_networks_match_peers() {
        let defaults = Config::from_vars(vars(&[])).unwrap().http.admin_networks;
        let allowed = |ip: &str| defaults.iter().any(|n| n.contains(ip.parse().unwrap()));
        assert!(allowed("127.0.0.1") && allowed("127.9.9.9") && allowed("::1") && allowed("::ffff:127.0.0.1"));
        assert!(!allowed("10.0.0.1") && !allowed("::2") && !allowed("192.168.1.1"));
        let config = Config::from_vars(vars(&[("ADMIN_ALLOWED_NETWORKS", "10.0.0.0/8, 127.0.0.2")])).unwrap();
        let nets = config.http.admin_networks;
        assert_eq!(nets.iter().map(ToString::to_string).collect::<Vec<_>>(), ["10.0.0.0/8", "127.0.0.2/32"]);
        assert!(nets.iter().any(|n| n.contains("10.200.1.1".parse().unwrap())));
        assert!(!nets.iter().any(|n| n.contains("127.0.0.1".parse().unwrap())));
        for bad in ["10.0.0.0/33", "nonsense", "::1/129"] {
            let error = Config::from_vars(vars(&[("ADMIN_ALLOWED_NETWORKS", bad)])).unwrap_err().to_string();
            assert!(error.contains("ADMIN_ALLOWED_NETWORKS"), "{error}");
        }
        let mapped: Network = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert!("::ffff:10.0.0.0/64".parse::<Network>().is_err());
        let everyone: Network = "0.0.0.0/0".parse().unwrap();
        assert!(everyone.contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn an_open_listener_needs_a_guard() {
        let guard = |pairs: &[(&str, &str)]| Config::from_vars(vars(pairs)).unwrap().http.check_admin_guard();
        // The default address is every interface.
        let error = guard(&[]).unwrap_err().to_string();
        for named in ["HTTP_ADDR=0.0.0.0:8000", "ADMIN_TOKEN", "ADMIN_ALLOWED_NETWORKS", "127.0.0.6", "mesh"] {
            assert!(error.contains(named), "{named} missing from: {error}");
        }
        assert!(guard(&[("HTTP_ADDR", "[::]:8000")]).is_err(), "IPv6 any-address");
        assert!(guard(&[("HTTP_ADDR", "10.1.2.3:8000")]).is_err(), "a pod address");
        assert!(guard(&[("HTTP_ADDR", "0.0.0.0:8000"), ("ADMIN_TOKEN", "admin-secret-token")]).is_ok());
        assert!(guard(&[("HTTP_ADDR", "0.0.0.0:8000"), ("ADMIN_ALLOWED_NETWORKS", "10.0.0.0/8")]).is_ok());
        // Set to the default's very value, it is still a choice someone made.
        assert!(guard(&[("ADMIN_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128")]).is_ok());
        for loopback in ["127.0.0.1:8000", "[::1]:8000", "127.0.0.2:9000", "[::ffff:127.0.0.1]:8000"] {
            assert!(guard(&[("HTTP_ADDR", loopback)]).is_ok(), "{loopback}");
        }
    }

    #[test]
    fn post_timeout_and_idempotency_window() {
        let defaults = Config::from_vars(vars(&[])).unwrap().http;
        assert_eq!(
            (defaults.post_timeout, defaults.idempotency_window),
            (Duration::from_secs(10), Duration::from_secs(86_400))
        );
        let error = Config::from_vars(vars(&[("HTTP_POST_TIMEOUT", "500ms")])).unwrap_err().to_string();
        assert!(error.contains("HTTP_POST_TIMEOUT") && error.contains("1s"), "{error}");
        let error = Config::from_vars(vars(&[("HTTP_IDEMPOTENCY_WINDOW", "0s")])).unwrap_err().to_string();
        assert!(error.contains("HTTP_IDEMPOTENCY_WINDOW"), "{error}");
    }
}
