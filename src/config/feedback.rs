//! The feedback loop's settings (issue 20): the signed return path and the inbound listener for
//! DSNs and ARF reports (off unless `BOUNCE_DOMAIN` is set), and the relays' webhooks on
//! `PUBLIC_HTTP_ADDR` (each off unless its secret is set).

use std::net::SocketAddr;

use secrecy::{ExposeSecret as _, SecretString};

use super::{ConfigError, Env};

#[derive(Debug, Clone)]
pub struct FeedbackConfig {
    /// `BOUNCE_DOMAIN`: when set, every message's MAIL FROM is a signed return path there.
    pub bounce_domain: Option<String>,
    /// `BOUNCE_LOCAL_PART`: the part before `+` (`bounces`).
    pub bounce_local: String,
    /// `BOUNCE_SECRET`: signs the return paths; required with `BOUNCE_DOMAIN`.
    pub bounce_secret: Option<SecretString>,
    /// `FEEDBACK_SMTP_ADDR`: the inbound SMTP listener for DSNs and ARF reports.
    pub smtp_addr: Option<SocketAddr>,
    /// `FEEDBACK_LOOP_ADDRESS`: the address ISPs' feedback loops send ARF reports to, accepted
    /// by the listener beside the return paths.
    pub loop_address: Option<String>,
    /// `FEEDBACK_MAX_BYTES`: the largest report the listener takes (SIZE, then cut off with 552).
    pub max_bytes: usize,
    /// `KAFKA_TOPIC_FEEDBACK`: bounces, complaints and delays for the profile service.
    pub topic: String,
    pub webhooks: WebhookConfig,
    pub brake: BrakeConfig,
}

/// The reputation brake (`crate::feedback::brake`): hard-bounce and complaint rates over the last
/// letters sent, and the deployment-wide pause when one crosses its limit.
#[derive(Debug, Clone, PartialEq)]
pub struct BrakeConfig {
    /// `BRAKE_INTERVAL`: how often each replica reads the window.
    pub interval: std::time::Duration,
    /// `BRAKE_WINDOW`: how many of the last letters sent the rates are taken over.
    pub window: u32,
    /// `BRAKE_MIN_SENDS`: the fewest recipients in the window on which the brake judges.
    pub min_sends: u64,
    /// `BRAKE_MAX_BOUNCE_RATE`: hard bounces per recipient at which sending pauses; `None` (off)
    /// never pauses on bounces.
    pub max_bounce_rate: Option<f64>,
    /// `BRAKE_MAX_COMPLAINT_RATE`: complaints per recipient at which sending pauses.
    pub max_complaint_rate: Option<f64>,
}

/// A rate limit: `5%`, `0.05`, or `off`.
fn rate(env: &Env, var: &'static str, default: &str) -> Result<Option<f64>, ConfigError> {
    let raw = env.string(var, default);
    if raw.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let value = match raw.strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
        None => raw.parse::<f64>(),
    };
    match value {
        Ok(rate) if rate > 0.0 && rate <= 1.0 => Ok(Some(rate)),
        _ => Err(ConfigError::Invalid {
            var,
            value: raw,
            expected: "a rate above 0 and at most 100 %, such as 5% or 0.05, or off".into(),
        }),
    }
}

fn brake(env: &Env) -> Result<BrakeConfig, ConfigError> {
    Ok(BrakeConfig {
        interval: env.positive_duration("BRAKE_INTERVAL", "5s")?,
        window: env
            .parse("BRAKE_WINDOW", 2000, "a number of letters from 10 to 100000", |n| (10..=100_000).contains(n))?,
        min_sends: env.parse("BRAKE_MIN_SENDS", 200, "a number of recipients of at least 1", |n| *n >= 1)?,
        // SES puts an account under review at a 5 % bounce rate and suspends it at 10 %.
        max_bounce_rate: rate(env, "BRAKE_MAX_BOUNCE_RATE", "5%")?,
        // SES reviews at 0.1 % complaints (suspends at 0.5 %); Gmail and Yahoo require bulk
        // senders to stay under 0.3 %. The strictest published line is the default.
        max_complaint_rate: rate(env, "BRAKE_MAX_COMPLAINT_RATE", "0.1%")?,
    })
}

/// The relays' webhooks (`crate::feedback::webhooks`); each relay's route exists only when its
/// secret is set.
#[derive(Debug, Clone, Default)]
pub struct WebhookConfig {
    /// `MAILGUN_WEBHOOK_SIGNING_KEY`: Mailgun's HTTP webhook signing key (HMAC-SHA256).
    pub mailgun_signing_key: Option<SecretString>,
    /// `SENDGRID_WEBHOOK_PUBLIC_KEY`: the signed event webhook's verification key (ECDSA P-256,
    /// base64 DER as SendGrid shows it, or PEM).
    pub sendgrid_public_key: Option<p256::ecdsa::VerifyingKey>,
    /// `POSTMARK_WEBHOOK_USER` and `POSTMARK_WEBHOOK_PASSWORD`: the basic auth credentials put in
    /// the webhook URL set at Postmark.
    pub postmark_credentials: Option<(SecretString, SecretString)>,
    /// `SNS_TOPIC_ARNS`: the SNS topics whose SES notifications are taken (comma-separated).
    pub sns_topic_arns: Vec<String>,
    /// `SNS_SIGNING_CERT_FILE`: a PEM certificate whose key verifies SNS messages instead of the
    /// one fetched from `SigningCertURL` (tests, or a deployment without egress); the URL is
    /// still checked.
    pub sns_signing_cert_file: Option<std::path::PathBuf>,
}

impl WebhookConfig {
    pub fn any(&self) -> bool {
        self.mailgun_signing_key.is_some()
            || self.sendgrid_public_key.is_some()
            || self.postmark_credentials.is_some()
            || !self.sns_topic_arns.is_empty()
    }
}

/// Reads SendGrid's verification key: the base64 of its DER (SubjectPublicKeyInfo), as the
/// SendGrid console shows it, with or without PEM armour.
pub fn sendgrid_key(raw: &str) -> Option<p256::ecdsa::VerifyingKey> {
    use base64::Engine as _;
    use p256::pkcs8::DecodePublicKey as _;
    let body: String = raw
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat()
        .split_whitespace()
        .collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body).ok()?;
    p256::ecdsa::VerifyingKey::from_public_key_der(&der).ok()
}

fn webhooks(env: &Env) -> Result<WebhookConfig, ConfigError> {
    let mailgun_signing_key = env.secret("MAILGUN_WEBHOOK_SIGNING_KEY");
    if let Some(key) = &mailgun_signing_key
        && key.expose_secret().len() < 16
    {
        return Err(ConfigError::InvalidSecret {
            var: "MAILGUN_WEBHOOK_SIGNING_KEY",
            expected: "the HTTP webhook signing key from Mailgun's console",
        });
    }
    let sendgrid_public_key = match env.optional("SENDGRID_WEBHOOK_PUBLIC_KEY") {
        Some(raw) => Some(sendgrid_key(&raw).ok_or_else(|| ConfigError::Invalid {
            var: "SENDGRID_WEBHOOK_PUBLIC_KEY",
            value: raw.clone(),
            expected: "the signed event webhook's verification key (base64 of an ECDSA P-256 public key)".into(),
        })?),
        None => None,
    };
    let postmark_credentials = match (env.secret("POSTMARK_WEBHOOK_USER"), env.secret("POSTMARK_WEBHOOK_PASSWORD")) {
        (None, None) => None,
        (Some(user), Some(password)) if password.expose_secret().len() >= 16 => Some((user, password)),
        (Some(_), Some(_)) => {
            return Err(ConfigError::InvalidSecret {
                var: "POSTMARK_WEBHOOK_PASSWORD",
                expected: "at least 16 characters",
            });
        }
        (None, Some(_)) => {
            return Err(ConfigError::Missing {
                var: "POSTMARK_WEBHOOK_USER",
                expected: "the user name of the basic auth credentials in Postmark's webhook URL",
            });
        }
        (Some(_), None) => {
            return Err(ConfigError::Missing {
                var: "POSTMARK_WEBHOOK_PASSWORD",
                expected: "the password of the basic auth credentials in Postmark's webhook URL",
            });
        }
    };
    let raw_arns = env.string("SNS_TOPIC_ARNS", "");
    let sns_topic_arns: Vec<String> =
        raw_arns.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect();
    if sns_topic_arns.iter().any(|arn| !arn.starts_with("arn:aws") || arn.split(':').count() != 6) {
        return Err(ConfigError::Invalid {
            var: "SNS_TOPIC_ARNS",
            value: raw_arns,
            expected: "comma-separated SNS topic ARNs such as arn:aws:sns:us-east-1:123456789012:ses-feedback".into(),
        });
    }
    let sns_signing_cert_file = env.optional("SNS_SIGNING_CERT_FILE").map(std::path::PathBuf::from);
    Ok(WebhookConfig {
        mailgun_signing_key,
        sendgrid_public_key,
        postmark_credentials,
        sns_topic_arns,
        sns_signing_cert_file,
    })
}

const DOMAIN: &str = "a domain name such as bounce.example.com";

pub(super) fn feedback(env: &Env) -> Result<FeedbackConfig, ConfigError> {
    let bounce_domain = env.optional("BOUNCE_DOMAIN").map(|d| d.trim_end_matches('.').to_ascii_lowercase());
    if let Some(domain) = &bounce_domain
        && (domain.contains('@') || format!("x@{domain}").parse::<lettre::Address>().is_err())
    {
        return Err(ConfigError::Invalid { var: "BOUNCE_DOMAIN", value: domain.clone(), expected: DOMAIN.into() });
    }
    let bounce_local = env.string("BOUNCE_LOCAL_PART", "bounces").to_ascii_lowercase();
    if bounce_local.len() > 10 || !bounce_local.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(ConfigError::Invalid {
            var: "BOUNCE_LOCAL_PART",
            value: bounce_local,
            expected: "up to 10 letters, digits, - or _ (the signed part takes 46 of a local part's 64 octets)".into(),
        });
    }
    let bounce_secret = env.secret("BOUNCE_SECRET");
    if bounce_domain.is_some() && bounce_secret.is_none() {
        return Err(ConfigError::Missing {
            var: "BOUNCE_SECRET",
            expected: "a secret of at least 16 characters to sign the return paths at BOUNCE_DOMAIN",
        });
    }
    if let Some(secret) = &bounce_secret
        && secret.expose_secret().len() < 16
    {
        return Err(ConfigError::InvalidSecret { var: "BOUNCE_SECRET", expected: "at least 16 characters" });
    }
    let smtp_addr = env.optional_addr("FEEDBACK_SMTP_ADDR", "an address such as 0.0.0.0:2525")?;
    if smtp_addr.is_some() && bounce_domain.is_none() {
        return Err(ConfigError::Missing {
            var: "BOUNCE_DOMAIN",
            expected: "the domain whose signed return paths the listener on FEEDBACK_SMTP_ADDR accepts",
        });
    }
    let loop_address = env.optional("FEEDBACK_LOOP_ADDRESS").map(|a| a.to_ascii_lowercase());
    if let Some(address) = &loop_address
        && address.parse::<lettre::Address>().is_err()
    {
        return Err(ConfigError::Invalid {
            var: "FEEDBACK_LOOP_ADDRESS",
            value: address.clone(),
            expected: "an address such as fbl@bounce.example.com".into(),
        });
    }
    Ok(FeedbackConfig {
        bounce_domain,
        bounce_local,
        bounce_secret,
        smtp_addr,
        loop_address,
        max_bytes: env.parse(
            "FEEDBACK_MAX_BYTES",
            4 << 20,
            "a size in bytes from 64 KiB to 15 MiB (a kept report must fit a MongoDB document)",
            |n| ((64 << 10)..=(15 << 20)).contains(n),
        )?,
        topic: env.string("KAFKA_TOPIC_FEEDBACK", "mts-to-profile.feedback"),
        webhooks: webhooks(env)?,
        brake: brake(env)?,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::config::{Config, ConfigError};

    fn from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let base =
            [("KAFKA_BROKERS", "127.0.0.1:9092"), ("MONGO_LOCAL", "mongodb://127.0.0.1:27017"), ("SMTP_HOST", "h")];
        let vars: HashMap<String, String> =
            base.iter().chain(pairs).map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Config::from_vars(vars)
    }

    fn named(result: Result<Config, ConfigError>) -> &'static str {
        match result {
            Err(
                ConfigError::Missing { var, .. }
                | ConfigError::Invalid { var, .. }
                | ConfigError::InvalidSecret { var, .. },
            ) => var,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn feedback_is_off_by_default_and_checked_by_name() {
        let config = from(&[]).unwrap();
        assert!(config.feedback.bounce_domain.is_none() && config.feedback.smtp_addr.is_none());
        assert_eq!(config.feedback.topic, "mts-to-profile.feedback");
        let secret = "a-bounce-secret-0123";
        let on = from(&[
            ("BOUNCE_DOMAIN", "Bounce.Example.com."),
            ("BOUNCE_SECRET", secret),
            ("FEEDBACK_SMTP_ADDR", "127.0.0.1:2525"),
        ])
        .unwrap();
        assert_eq!(on.feedback.bounce_domain.as_deref(), Some("bounce.example.com"));
        assert_eq!(on.feedback.max_bytes, 4 << 20);
        assert_eq!(named(from(&[("BOUNCE_DOMAIN", "bounce.example.com")])), "BOUNCE_SECRET");
        assert_eq!(
            named(from(&[("BOUNCE_DOMAIN", "bounce.example.com"), ("BOUNCE_SECRET", "short")])),
            "BOUNCE_SECRET"
        );
        assert_eq!(named(from(&[("BOUNCE_DOMAIN", "a@b.example"), ("BOUNCE_SECRET", secret)])), "BOUNCE_DOMAIN");
        assert_eq!(named(from(&[("FEEDBACK_SMTP_ADDR", "127.0.0.1:2525")])), "BOUNCE_DOMAIN");
        let on = [("BOUNCE_DOMAIN", "bounce.example.com"), ("BOUNCE_SECRET", secret)];
        for (var, value) in [
            ("BOUNCE_LOCAL_PART", "far-too-long-a-prefix"),
            ("FEEDBACK_LOOP_ADDRESS", "not an address"),
            ("FEEDBACK_MAX_BYTES", "100"),
            ("FEEDBACK_SMTP_ADDR", "nowhere"),
        ] {
            let mut pairs = on.to_vec();
            pairs.push((var, value));
            assert_eq!(named(from(&pairs)), var);
        }
    }

    #[test]
    fn the_brake_has_the_relays_limits_by_default_and_reads_rates_as_percent_or_fraction() {
        let brake = from(&[]).unwrap().feedback.brake;
        assert_eq!((brake.window, brake.min_sends), (2000, 200));
        assert_eq!((brake.max_bounce_rate, brake.max_complaint_rate), (Some(0.05), Some(0.001)));
        let set = from(&[("BRAKE_MAX_BOUNCE_RATE", "0.02"), ("BRAKE_MAX_COMPLAINT_RATE", "off")]).unwrap();
        assert_eq!((set.feedback.brake.max_bounce_rate, set.feedback.brake.max_complaint_rate), (Some(0.02), None));
        assert_eq!(from(&[("BRAKE_MAX_BOUNCE_RATE", "2.5 %")]).unwrap().feedback.brake.max_bounce_rate, Some(0.025));
        for (var, value) in [
            ("BRAKE_MAX_BOUNCE_RATE", "0"),
            ("BRAKE_MAX_BOUNCE_RATE", "120%"),
            ("BRAKE_MAX_COMPLAINT_RATE", "some"),
            ("BRAKE_WINDOW", "5"),
            ("BRAKE_MIN_SENDS", "0"),
            ("BRAKE_INTERVAL", "0s"),
        ] {
            assert_eq!(named(from(&[(var, value)])), var);
        }
    }

    #[test]
    fn webhooks_are_off_by_default_and_their_secrets_checked_by_name() {
        assert!(!from(&[]).unwrap().feedback.webhooks.any());
        // The public listener may serve only webhooks.
        assert_eq!(named(from(&[("PUBLIC_HTTP_ADDR", "127.0.0.1:8080")])), "LIST_UNSUBSCRIBE_URL");
        let mailgun = ("MAILGUN_WEBHOOK_SIGNING_KEY", "key-0123456789abcdef0123");
        let on = from(&[("PUBLIC_HTTP_ADDR", "127.0.0.1:8080"), mailgun]).unwrap();
        assert!(
            on.feedback.webhooks.mailgun_signing_key.is_some() && on.feedback.webhooks.sendgrid_public_key.is_none()
        );
        let sendgrid = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g==";
        let pem =
            format!("-----BEGIN PUBLIC KEY-----\n{}\n{}\n-----END PUBLIC KEY-----\n", &sendgrid[..64], &sendgrid[64..]);
        for key in [sendgrid, pem.as_str()] {
            assert!(
                from(&[("SENDGRID_WEBHOOK_PUBLIC_KEY", key)]).unwrap().feedback.webhooks.sendgrid_public_key.is_some()
            );
        }
        let postmark = [("POSTMARK_WEBHOOK_USER", "postmark"), ("POSTMARK_WEBHOOK_PASSWORD", "a-password-of-20-chars")];
        assert!(from(&postmark).unwrap().feedback.webhooks.postmark_credentials.is_some());
        for (pairs, var) in [
            (vec![("MAILGUN_WEBHOOK_SIGNING_KEY", "short")], "MAILGUN_WEBHOOK_SIGNING_KEY"),
            (vec![("SENDGRID_WEBHOOK_PUBLIC_KEY", "not a key")], "SENDGRID_WEBHOOK_PUBLIC_KEY"),
            (vec![("SENDGRID_WEBHOOK_PUBLIC_KEY", "c2hvcnQ=")], "SENDGRID_WEBHOOK_PUBLIC_KEY"),
            (vec![postmark[0]], "POSTMARK_WEBHOOK_PASSWORD"),
            (vec![postmark[1]], "POSTMARK_WEBHOOK_USER"),
            (vec![postmark[0], ("POSTMARK_WEBHOOK_PASSWORD", "short")], "POSTMARK_WEBHOOK_PASSWORD"),
        ] {
            assert_eq!(named(from(&pairs)), var);
        }
    }
}
