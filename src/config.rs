//! Typed configuration, read once from the environment at start-up.
//!
//! Variable names and defaults stay compatible with the Go service this one replaces; everything
//! new has a default, so an old deployment's environment starts the new service unchanged.
//! A missing or invalid value is reported with the variable's name and what was expected.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use lettre::message::Mailbox;

use crate::smtp::{Breaker, RelayAddr, Timeouts};
pub mod feedback;
pub use feedback::FeedbackConfig;
use secrecy::SecretString;

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

pub use crate::smtp::TlsMode;

#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub mongo: MongoConfig,
    pub smtp: SmtpConfig,
    pub dispatch: DispatchConfig,
    pub http: HttpConfig,
    pub deliverability: DeliverabilityConfig,
    pub feedback: FeedbackConfig,
    /// Identifies this replica as the owner of the letters it leases.
    pub instance_id: String,
    /// How long in-flight sends may take to finish once shutdown starts.
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    /// `MAILSENDER_FAULT_INJECTION`, for tests only (see `app::Failures`).
    pub fault_injection: Option<String>,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic_in: String,
    pub topic_out: String,
    pub topic_dlq: String,
    pub group_id: String,
    /// Static group membership: a restarted pod with the same id gets its partitions back at
    /// once instead of waiting out the session timeout of its previous incarnation.
    pub group_instance_id: Option<String>,
    pub session_timeout: Duration,
    /// How long the producer keeps trying to deliver a message before giving up on it.
    pub message_timeout: Duration,
    /// How often librdkafka reports statistics (consumer lag, requests sent) to the metrics.
    pub statistics_interval: Duration,
    /// Partition count used when the service creates a missing topic.
    pub partitions: i32,
    pub create_topics: bool,
    /// Most letters gathered from Kafka before they are written to MongoDB in one insert.
    pub ingest_batch: usize,
    /// Longest a partial ingest batch waits for more messages before it is written.
    pub ingest_linger: Duration,
    /// Bodies larger than this are left out of status messages (`BodyOmitted: true`).
    pub status_body_max_bytes: usize,
    /// The largest input message the consumer fetches. It must cover whatever the topic accepts,
    /// or the partition stops at the first larger message.
    pub max_message_bytes: usize,
    /// Dead letters are cut to this size, so the copy fits the broker's own limit.
    pub dlq_max_bytes: usize,
    /// A partition whose position has not moved this long, with messages waiting, is reported
    /// stalled (gauge and warning).
    pub stall_warning: Duration,
}

#[derive(Debug, Clone)]
pub enum MongoTarget {
    Uri(SecretString),
    Host { host: String, port: u16, username: String, password: SecretString },
}

#[derive(Debug, Clone)]
pub struct MongoConfig {
    pub target: MongoTarget,
    pub database: String,
    pub collection: String,
}

#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// `SMTP_HOST` as given: one relay, or several separated by commas.
    pub host: String,
    /// `SMTP_PORT`: the port of every relay that names none.
    pub port: u16,
    /// The relays of `SMTP_HOST`, in order of preference.
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

/// What the budget counts (`SMTP_RATE_LIMIT_UNIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateUnit {
    /// Every message handed to the relay costs 1 (a letter split into several transactions is
    /// several messages).
    Letter,
    /// Every message costs its recipient count, as SES and Google's relay count.
    Recipient,
}

/// At most `limit` units in any `window` (one entry of `SMTP_QUOTAS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaWindow {
    pub limit: u32,
    pub window: Duration,
}

impl std::fmt::Display for QuotaWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.limit, humantime::format_duration(self.window))
    }
}

#[derive(Debug, Clone)]
pub struct DispatchConfig {
    pub lease: Duration,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Most letters claimed from MongoDB in one round trip.
    pub claim_batch: usize,
    /// Most bytes of letters (bodies, subjects, addresses) held in memory at once, from claim to
    /// stored outcome; a single letter larger than this is still sent, alone.
    pub max_bytes: usize,
    /// How often an idle dispatcher looks for due letters (retries, other replicas' inserts).
    pub poll_interval: Duration,
    /// How often outcomes that were stored but never published are looked for.
    pub republish_interval: Duration,
    /// Most unreported outcomes one republishing round takes.
    pub republish_batch: usize,
    /// Finished letters older than this are deleted; zero keeps them.
    pub retention: Duration,
    /// How often retention runs (on one replica at a time).
    pub retention_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    pub max_body_bytes: usize,
    pub admin_token: Option<SecretString>,
    /// Without `admin_token`, the admin routes answer only peers in these networks.
    pub admin_networks: Vec<Network>,
    /// Whether `ADMIN_ALLOWED_NETWORKS` was set rather than defaulted.
    pub admin_networks_chosen: bool,
    /// `HTTP_POST_TIMEOUT`: how long `POST /post` waits for Kafka, and the message timeout of its
    /// records, so that a `503` means the batch will not be produced later.
    pub post_timeout: Duration,
    /// `HTTP_IDEMPOTENCY_WINDOW`: how long an `Idempotency-Key` of `POST /post` is remembered.
    pub idempotency_window: Duration,
}

impl HttpConfig {
    /// The loopback default was made for `kubectl port-forward`; in a service mesh it admits
    /// every pod, so a listener beyond loopback needs a token, or networks someone chose on
    /// purpose. A deployment check rather than a parsing one: `from_env` applies it, while tests
    /// of other sections build a `Config` from the required variables alone.
    pub fn check_admin_guard(&self) -> Result<(), ConfigError> {
        if self.addr.ip().to_canonical().is_loopback() || self.admin_token.is_some() || self.admin_networks_chosen {
            return Ok(());
        }
        Err(ConfigError::AdminUnguarded { addr: self.addr })
    }
}

/// DKIM, List-Unsubscribe and the one-click endpoint (README "Deliverability").
#[derive(Debug, Clone)]
pub struct DeliverabilityConfig {
    pub dkim: Option<DkimSettings>,
    /// `LIST_UNSUBSCRIBE_URL`, checked at start-up.
    pub unsubscribe_url: Option<crate::deliverability::unsubscribe::UrlTemplate>,
    /// `LIST_UNSUBSCRIBE_MAILTO`: the address of a `mailto:` unsubscribe.
    pub unsubscribe_mailto: Option<String>,
    /// Signs and checks the one-click URLs.
    pub unsubscribe_secret: Option<SecretString>,
    /// `PUBLIC_HTTP_ADDR`: the internet-facing listener of the one-click endpoint; off when unset.
    pub public_addr: Option<SocketAddr>,
    /// Where the one-click endpoint publishes `unsubscribed` events.
    pub topic_unsubscribed: String,
    /// Where other systems add and remove suppressions.
    pub topic_suppressions: String,
    /// Refusals meaning "no such mailbox" (5.1.x), from distinct letters, before an address is
    /// suppressed.
    pub suppress_after_hard_bounces: u32,
    /// `SMTP_DELIVERY=individual`: a copy per recipient, with their own To and unsubscribe link.
    pub individual: bool,
}

/// Where the DKIM key is; the key itself is read by `deliverability::dkim` at start-up and never
/// kept in the configuration, which is logged and cloned.
#[derive(Debug, Clone)]
pub struct DkimSettings {
    pub domain: String,
    pub selector: String,
    pub key_file: PathBuf,
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

        let kafka = KafkaConfig {
            brokers: env.required("KAFKA_BROKERS", "a comma-separated list of host:port")?,
            topic_in: env.string("KAFKA_TOPIC_MAILSENDER", "mts-to-mailsender"),
            topic_out: env.string("KAFKA_TOPIC_PROFILE", "mts-to-profile"),
            topic_dlq: env.string("KAFKA_TOPIC_DLQ", "mts-to-mailsender.dlq"),
            group_id: env.string("KAFKA_GROUPID", "mailsender"),
            group_instance_id: env.optional("KAFKA_GROUP_INSTANCE_ID"),
            session_timeout: env.positive_duration("KAFKA_SESSION_TIMEOUT", "45s")?,
            message_timeout: env.positive_duration("KAFKA_MESSAGE_TIMEOUT", "60s")?,
            statistics_interval: env.positive_duration("KAFKA_STATISTICS_INTERVAL", "15s")?,
            partitions: env
                .parse("KAFKA_TOPIC_PARTITIONS", 3, "a partition count from 1 to 1000", |n| (1..=1000).contains(n))?,
            create_topics: env.boolean("KAFKA_CREATE_TOPICS", true)?,
            ingest_batch: env
                .parse("INGEST_BATCH", 500, "a letter count from 1 to 10000", |n| (1..=10_000).contains(n))?,
            ingest_linger: env.duration("INGEST_LINGER", "20ms")?,
            max_message_bytes: env.parse(
                "KAFKA_MAX_MESSAGE_BYTES",
                64 << 20,
                "a byte count from 1 MiB to 1 GiB",
                |n| ((1 << 20)..=(1 << 30)).contains(n),
            )?,
            dlq_max_bytes: env.parse("KAFKA_DLQ_MAX_BYTES", 1 << 20, "a byte count from 1 KiB to 2 MiB", |n| {
                ((1 << 10)..=(2 << 20)).contains(n)
            })?,
            stall_warning: env.positive_duration("KAFKA_STALL_WARNING", "2m")?,
            status_body_max_bytes: env.parse(
                "STATUS_BODY_MAX_BYTES",
                64 * 1024,
                "a byte count from 0 to 1048576",
                |n| *n <= 1 << 20,
            )?,
        };

        let mongo = MongoConfig {
            target: mongo_target(&env)?,
            database: env.string("MONGODB_BASE_NAME", "mts"),
            collection: env.string("MONGODB_COLLECTION", "letters"),
        };

        let tls = match env.string("SMTP_TLS", "opportunistic").to_ascii_lowercase().as_str() {
            "none" | "off" | "plain" => TlsMode::None,
            "opportunistic" | "auto" => TlsMode::Opportunistic,
            "starttls" | "required" => TlsMode::StartTls,
            "implicit" | "smtps" | "tls" => TlsMode::Implicit,
            other => {
                return Err(ConfigError::Invalid {
                    var: "SMTP_TLS",
                    value: other.to_owned(),
                    expected: "one of none, opportunistic, starttls, implicit".into(),
                });
            }
        };
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
        let host =
            env.required("SMTP_HOST", "the SMTP server's host name or address, or several separated by commas")?;
        let port = env.parse("SMTP_PORT", default_port, "a port number from 1 to 65535", |p: &u16| *p > 0)?;
        let relays = crate::smtp::relays::parse_relays(&host, port).map_err(|problem| ConfigError::Invalid {
            var: "SMTP_HOST",
            value: host.clone(),
            expected: format!(
                "host names or addresses separated by commas, in order of preference, each optionally with \
                 :port ([v6]:port for IPv6); {problem}"
            ),
        })?;
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
            rate_max_letters: env
                .parse("SMTP_RATE_LIMIT_MAX_LETTERS", 5, "a letter count of at least 1", |n| *n >= 1)?,
            rate_burst: env.parse("SMTP_RATE_LIMIT_BURST", 1, "a letter count of at least 1", |n| *n >= 1)?,
            rate_unit: match env.string("SMTP_RATE_LIMIT_UNIT", "letter").to_ascii_lowercase().as_str() {
                "letter" | "letters" | "message" => RateUnit::Letter,
                "recipient" | "recipients" => RateUnit::Recipient,
                other => {
                    return Err(ConfigError::Invalid {
                        var: "SMTP_RATE_LIMIT_UNIT",
                        value: other.to_owned(),
                        expected: "letter or recipient".into(),
                    });
                }
            },
            quotas: quotas(&env)?,
            timeouts: smtp_timeouts(&env)?,
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
        if smtp.rate_burst > smtp.rate_max_letters {
            return Err(ConfigError::Invalid {
                var: "SMTP_RATE_LIMIT_BURST",
                value: smtp.rate_burst.to_string(),
                expected: format!("at most SMTP_RATE_LIMIT_MAX_LETTERS ({})", smtp.rate_max_letters),
            });
        }
        if smtp.rate_period.is_zero() {
            return Err(ConfigError::Invalid {
                var: "SMTP_RATE_LIMIT_PERIOD",
                value: "0".into(),
                expected: "a positive duration".into(),
            });
        }

        let dispatch = DispatchConfig {
            lease: env.duration("LEASE_DURATION", "30s")?,
            max_attempts: env
                .parse("SMTP_MAX_ATTEMPTS", 5, "an attempt count from 1 to 100", |n| (1..=100).contains(n))?,
            backoff_base: env.positive_duration("RETRY_BACKOFF_BASE", "10s")?,
            backoff_max: env.positive_duration("RETRY_BACKOFF_MAX", "10m")?,
            claim_batch: env.parse("CLAIM_BATCH", 256, "a letter count from 1 to 5000", |n| (1..=5000).contains(n))?,
            max_bytes: env.parse("DISPATCH_MAX_BYTES", 16 << 20, "a byte count from 1 MiB to 4 GiB", |n| {
                ((1 << 20)..=(4 << 30)).contains(n)
            })?,
            poll_interval: env.positive_duration("DISPATCH_POLL_INTERVAL", "1s")?,
            republish_interval: env.positive_duration("REPUBLISH_INTERVAL", "30s")?,
            republish_batch: env
                .parse("REPUBLISH_BATCH", 256, "an outcome count from 1 to 5000", |n| (1..=5000).contains(n))?,
            retention: env.duration("LETTER_RETENTION", "30d")?,
            retention_interval: env.positive_duration("LETTER_RETENTION_INTERVAL", "10m")?,
        };
        if dispatch.backoff_base > dispatch.backoff_max {
            return Err(ConfigError::Invalid {
                var: "RETRY_BACKOFF_BASE",
                value: humantime::format_duration(dispatch.backoff_base).to_string(),
                expected: format!("at most RETRY_BACKOFF_MAX ({})", humantime::format_duration(dispatch.backoff_max)),
            });
        }
        // A worker hands a message over (its final dot) only within the lease's last-but-one
        // quarter; that quarter must leave the dot a second to be written.
        if dispatch.lease < Duration::from_secs(4) {
            return Err(ConfigError::Invalid {
                var: "LEASE_DURATION",
                value: humantime::format_duration(dispatch.lease).to_string(),
                expected: "at least 4s (its last quarter bounds the time a message's final dot may take)".into(),
            });
        }

        let http = HttpConfig {
            addr: env.parse(
                "HTTP_ADDR",
                SocketAddr::from(([0, 0, 0, 0], 8000)),
                "an address such as 0.0.0.0:8000",
                |_| true,
            )?,
            max_body_bytes: env.parse("HTTP_MAX_BODY_BYTES", 1 << 20, "a byte count from 1 KiB to 64 MiB", |n| {
                (1024..=64 << 20).contains(n)
            })?,
            admin_token: env.secret("ADMIN_TOKEN"),
            admin_networks: networks(&env, "ADMIN_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128")?,
            admin_networks_chosen: env.optional("ADMIN_ALLOWED_NETWORKS").is_some(),
            post_timeout: env.positive_duration("HTTP_POST_TIMEOUT", "10s")?,
            idempotency_window: env.positive_duration("HTTP_IDEMPOTENCY_WINDOW", "24h")?,
        };
        // Below a second librdkafka cannot time a message out reliably (it scans once a second).
        if http.post_timeout < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                var: "HTTP_POST_TIMEOUT",
                value: humantime::format_duration(http.post_timeout).to_string(),
                expected: "at least 1s".into(),
            });
        }

        let deliverability = deliverability(&env, &smtp.from)?;

        let log_format = match env.string("LOG_FORMAT", "text").to_ascii_lowercase().as_str() {
            "text" | "pretty" | "" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::Invalid {
                    var: "LOG_FORMAT",
                    value: other.into(),
                    expected: "text or json".into(),
                });
            }
        };

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
        Ok(Config {
            instance_id: env
                .optional("INSTANCE_ID")
                .unwrap_or_else(|| format!("{}-{}", default_hostname(), short_random())),
            shutdown_timeout: env.duration("SHUTDOWN_TIMEOUT", "20s")?,
            kafka,
            mongo,
            smtp,
            dispatch,
            http,
            deliverability,
            feedback,
            log_format,
            fault_injection: env.optional("MAILSENDER_FAULT_INJECTION"),
        })
    }
}

/// `SMTP_QUOTAS`: a comma-separated list of `count/duration`, such as `10000/24h,300/1m`.
fn quotas(env: &Env) -> Result<Vec<QuotaWindow>, ConfigError> {
    let Some(raw) = env.optional("SMTP_QUOTAS") else { return Ok(Vec::new()) };
    let invalid = || ConfigError::Invalid {
        var: "SMTP_QUOTAS",
        value: raw.clone(),
        expected: "a comma-separated list of count/duration such as 10000/24h,300/1m, counts of at least 1 \
                   and durations of at least 1s"
            .into(),
    };
    let mut quotas = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (count, window) = entry.split_once('/').ok_or_else(invalid)?;
        let limit = count.trim().parse::<u32>().map_err(|_| invalid())?;
        let window = parse_duration(window).ok_or_else(invalid)?;
        // Shorter windows are the rate's job; the quota buckets are at least a second wide.
        if limit == 0 || window < Duration::from_secs(1) {
            return Err(invalid());
        }
        quotas.push(QuotaWindow { limit, window });
    }
    Ok(quotas)
}

fn deliverability(env: &Env, from: &Mailbox) -> Result<DeliverabilityConfig, ConfigError> {
    let dkim = match (env.optional("DKIM_PRIVATE_KEY_FILE"), env.optional("DKIM_SELECTOR")) {
        (None, None) => None,
        (Some(key_file), Some(selector)) => Some(DkimSettings {
            domain: env.optional("DKIM_DOMAIN").unwrap_or_else(|| from.email.domain().to_owned()),
            selector,
            key_file: PathBuf::from(key_file),
        }),
        (Some(_), None) => {
            return Err(ConfigError::Missing {
                var: "DKIM_SELECTOR",
                expected: "set together with DKIM_PRIVATE_KEY_FILE",
            });
        }
        (None, Some(_)) => {
            return Err(ConfigError::Missing {
                var: "DKIM_PRIVATE_KEY_FILE",
                expected: "a PEM private key (RSA or Ed25519) when DKIM_SELECTOR is set",
            });
        }
    };
    let unsubscribe_url =
        match env.optional("LIST_UNSUBSCRIBE_URL") {
            Some(raw) => Some(crate::deliverability::unsubscribe::UrlTemplate::parse(&raw).map_err(|expected| {
                ConfigError::Invalid { var: "LIST_UNSUBSCRIBE_URL", value: raw.clone(), expected }
            })?),
            None => None,
        };
    let unsubscribe_mailto = env.optional("LIST_UNSUBSCRIBE_MAILTO");
    if let Some(mailto) = &unsubscribe_mailto
        && mailto.parse::<lettre::Address>().is_err()
    {
        return Err(ConfigError::Invalid {
            var: "LIST_UNSUBSCRIBE_MAILTO",
            value: mailto.clone(),
            expected: "an address such as unsubscribe@example.com".into(),
        });
    }
    let unsubscribe_secret = env.secret("UNSUBSCRIBE_SECRET");
    if unsubscribe_url.is_some() && unsubscribe_secret.is_none() {
        return Err(ConfigError::Missing {
            var: "UNSUBSCRIBE_SECRET",
            expected: "a secret of at least 16 characters to sign LIST_UNSUBSCRIBE_URL's links",
        });
    }
    if let Some(secret) = &unsubscribe_secret
        && secrecy::ExposeSecret::expose_secret(secret).len() < 16
    {
        return Err(ConfigError::InvalidSecret { var: "UNSUBSCRIBE_SECRET", expected: "at least 16 characters" });
    }
    let individual = match env.string("SMTP_DELIVERY", "bcc").to_ascii_lowercase().as_str() {
        "bcc" => false,
        "individual" => true,
        other => {
            return Err(ConfigError::Invalid {
                var: "SMTP_DELIVERY",
                value: other.to_owned(),
                expected: "bcc (one message for all recipients) or individual (a copy per recipient)".into(),
            });
        }
    };
    // One BCC message goes to many recipients, so its link cannot name one.
    if let Some(template) = &unsubscribe_url
        && template.names_address()
        && !individual
    {
        return Err(ConfigError::Invalid {
            var: "LIST_UNSUBSCRIBE_URL",
            value: env.string("LIST_UNSUBSCRIBE_URL", ""),
            expected: "no {address} placeholder with SMTP_DELIVERY=bcc: a BCC message is shared by all its recipients"
                .into(),
        });
    }
    let public_addr = match env.optional("PUBLIC_HTTP_ADDR") {
        Some(_) => Some(env.parse(
            "PUBLIC_HTTP_ADDR",
            SocketAddr::from(([0, 0, 0, 0], 8080)),
            "an address such as 0.0.0.0:8080",
            |_| true,
        )?),
        None => None,
    };
    Ok(DeliverabilityConfig {
        dkim,
        unsubscribe_url,
        unsubscribe_mailto,
        unsubscribe_secret,
        public_addr,
        individual,
        topic_unsubscribed: env.string("KAFKA_TOPIC_UNSUBSCRIBED", "mts-to-profile.unsubscribed"),
        topic_suppressions: env.string("KAFKA_TOPIC_SUPPRESSIONS", "mts-to-mailsender.suppressions"),
        suppress_after_hard_bounces: env.parse(
            "SUPPRESS_AFTER_HARD_BOUNCES",
            1,
            "a refusal count from 1 to 100",
            |n| (1..=100).contains(n),
        )?,
    })
}

/// The per-phase timeouts. `SMTP_TIMEOUT`, the one bound of earlier versions, still sets every
/// phase but RSET/NOOP when given, so an existing deployment keeps its behaviour; each phase's own
/// variable wins over it.
fn smtp_timeouts(env: &Env) -> Result<Timeouts, ConfigError> {
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

fn mongo_target(env: &Env) -> Result<MongoTarget, ConfigError> {
    if let Some(uri) = env.optional("MONGO_LOCAL") {
        if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
            return Err(ConfigError::InvalidSecret {
                var: "MONGO_LOCAL",
                expected: "a URI starting with mongodb:// or mongodb+srv://",
            });
        }
        return Ok(MongoTarget::Uri(uri.into()));
    }
    const EXPECTED: &str = "MONGO_LOCAL (a full MongoDB URI) or MONGO_NODEPORT_SVC_SERVICE_HOST, _PORT, MONGODB_USERNAME and MONGODB_PASSWORD";
    Ok(MongoTarget::Host {
        host: env.required("MONGO_NODEPORT_SVC_SERVICE_HOST", EXPECTED)?,
        port: env.parse("MONGO_NODEPORT_SVC_SERVICE_PORT", 27017, "a port number from 1 to 65535", |p: &u16| *p > 0)?,
        username: env.required("MONGODB_USERNAME", EXPECTED)?,
        password: env
            .secret("MONGODB_PASSWORD")
            .ok_or(ConfigError::Missing { var: "MONGODB_PASSWORD", expected: EXPECTED })?,
    })
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

/// An IP network (`10.0.0.0/8`, `::1/128`; a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // A peer on a dual-stack socket arrives as ::ffff:a.b.c.d; compare it as the IPv4 it is.
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Network {
    type Err = ();

    fn from_str(raw: &str) -> Result<Network, ()> {
        let (addr, prefix) = match raw.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (raw, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| ())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.trim().parse::<u8>().map_err(|_| ())?,
            None => max,
        };
        if prefix > max {
            return Err(());
        }
        // An IPv4-mapped network (::ffff:10.0.0.0/104) is kept as the IPv4 network it names.
        match addr.to_canonical() {
            IpAddr::V4(v4) if addr.is_ipv6() => {
                Ok(Network { addr: IpAddr::V4(v4), prefix: prefix.checked_sub(96).ok_or(())? })
            }
            canonical => Ok(Network { addr: canonical, prefix }),
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A comma-separated list of networks (empty, like unset, means the default).
fn networks(env: &Env, var: &'static str, default: &str) -> Result<Vec<Network>, ConfigError> {
    let raw = env.string(var, default);
    raw.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            n.parse().map_err(|()| ConfigError::Invalid {
                var,
                value: raw.clone(),
                expected: "comma-separated networks such as 127.0.0.0/8,::1/128,10.0.0.0/8".into(),
            })
        })
        .collect()
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
            (
                vec![("LIST_UNSUBSCRIBE_URL", "http://mail.example.com/u?t={token}"), ("UNSUBSCRIBE_SECRET", secret)],
                "LIST_UNSUBSCRIBE_URL",
            ),
            (
                vec![("LIST_UNSUBSCRIBE_URL", "https://mail.example.com/u?t={tok}"), ("UNSUBSCRIBE_SECRET", secret)],
                "LIST_UNSUBSCRIBE_URL",
            ),
            (
                vec![("LIST_UNSUBSCRIBE_URL", "https://m.example.com/u/{address}"), ("UNSUBSCRIBE_SECRET", secret)],
                "SMTP_DELIVERY=bcc",
            ),
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
