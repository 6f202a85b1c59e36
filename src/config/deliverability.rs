//! DKIM, List-Unsubscribe and the one-click endpoint (README "Deliverability"). The link
//! template is kept as written: the composer parses it, as the one that expands it.

use std::{net::SocketAddr, path::PathBuf};

use lettre::message::Mailbox;
use secrecy::SecretString;

use super::{ConfigError, Env};

#[derive(Debug, Clone)]
pub struct DeliverabilityConfig {
    pub dkim: Option<DkimSettings>,
    /// `LIST_UNSUBSCRIBE_URL` as given; `Composer::new` checks it at start-up.
    pub unsubscribe_url: Option<String>,
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

pub(super) fn read(env: &Env, from: &Mailbox) -> Result<DeliverabilityConfig, ConfigError> {
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
    let unsubscribe_url = env.optional("LIST_UNSUBSCRIBE_URL");
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
    let individual = env.choice(
        "SMTP_DELIVERY",
        "bcc",
        &[(&["bcc"], false), (&["individual"], true)],
        "bcc (one message for all recipients) or individual (a copy per recipient)",
    )?;
    let public_addr = env.optional_addr("PUBLIC_HTTP_ADDR", "an address such as 0.0.0.0:8080")?;
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
