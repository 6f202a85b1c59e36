//! What mailbox providers ask of bulk mail (issue 11): a text alternative (in
//! `smtp::message`), a DKIM signature, and List-Unsubscribe with RFC 8058's one-click. The
//! [`Composer`] builds each letter's message once per attempt, signed, whatever the number of
//! recipient chunks it then goes out in.

pub mod dkim;
pub mod suppression;
pub mod topic;
pub mod unsubscribe;

use std::sync::Arc;

use lettre::message::{Mailbox, header::HeaderName};

use crate::{
    address::Recipient,
    config::{ConfigError, DeliverabilityConfig},
    model::Letter,
    smtp::message::{self, Content, MessageError},
};

use self::unsubscribe::{Fields, Signer, UrlTemplate};

/// Headers a DKIM signature covers whenever the message has them: those a receiver shows or
/// uses to judge the message (RFC 6376 §5.4.1), the MIME headers, and the unsubscribe headers,
/// which Gmail and Yahoo want signed so no one can swap the link.
const SIGNED_HEADERS: [&str; 7] = ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"];
const LIST_UNSUBSCRIBE: &str = "List-Unsubscribe";
const LIST_UNSUBSCRIBE_POST: &str = "List-Unsubscribe-Post";

/// Builds the message of a letter.
pub struct Composer {
    from: Mailbox,
    dkim: Option<dkim::Signing>,
    unsubscribe_url: Option<(UrlTemplate, Signer)>,
    unsubscribe_mailto: Option<String>,
    individual: bool,
    /// The signed envelope sender (`BOUNCE_DOMAIN`); `from` when unset.
    return_path: Option<crate::feedback::return_path::ReturnPath>,
    /// The relays' metadata headers naming the letter, for their webhooks.
    relay_metadata: crate::feedback::webhooks::Metadata,
}

/// `LIST_UNSUBSCRIBE_URL`, checked as a configuration value (the error names the variable).
fn unsubscribe_template(raw: &str, individual: bool) -> Result<UrlTemplate, ConfigError> {
    let invalid =
        |expected: String| ConfigError::Invalid { var: "LIST_UNSUBSCRIBE_URL", value: raw.to_owned(), expected };
    let template = UrlTemplate::parse(raw).map_err(invalid)?;
    // One BCC message goes to many recipients, so its link cannot name one.
    if template.names_address() && !individual {
        return Err(invalid(
            "no {address} placeholder with SMTP_DELIVERY=bcc: a BCC message is shared by all its recipients".into(),
        ));
    }
    Ok(template)
}

impl Composer {
    /// Reads the DKIM key and checks the unsubscribe link template; fails naming the variable
    /// when one is missing, unreadable or invalid.
    pub fn new(from: Mailbox, config: &DeliverabilityConfig) -> anyhow::Result<Composer> {
        let mut signed: Vec<HeaderName> =
            SIGNED_HEADERS.iter().map(|name| HeaderName::new_from_ascii_str(name)).collect();
        if config.unsubscribe_url.is_some() || config.unsubscribe_mailto.is_some() {
            signed.push(HeaderName::new_from_ascii_str(LIST_UNSUBSCRIBE));
        }
        if config.unsubscribe_url.is_some() {
            signed.push(HeaderName::new_from_ascii_str(LIST_UNSUBSCRIBE_POST));
        }
        let dkim = match &config.dkim {
            Some(settings) => Some(dkim::Signing::load(settings, signed)?),
            None => None,
        };
        let unsubscribe_url = match (&config.unsubscribe_url, &config.unsubscribe_secret) {
            (Some(raw), Some(secret)) => Some((unsubscribe_template(raw, config.individual)?, Signer::new(secret))),
            _ => None,
        };
        Ok(Composer {
            from,
            dkim,
            unsubscribe_url,
            unsubscribe_mailto: config.unsubscribe_mailto.clone(),
            individual: config.individual,
            return_path: None,
            relay_metadata: Default::default(),
        })
    }

    /// The checked `LIST_UNSUBSCRIBE_URL`, which the one-click endpoint verifies links against.
    pub fn unsubscribe_template(&self) -> Option<&UrlTemplate> {
        self.unsubscribe_url.as_ref().map(|(template, _)| template)
    }

    /// Sends with a signed return path naming each letter (see `crate::feedback::return_path`).
    pub fn with_relay_metadata(mut self, metadata: crate::feedback::webhooks::Metadata) -> Composer {
        self.relay_metadata = metadata;
        self
    }

    pub fn with_return_path(mut self, return_path: Option<crate::feedback::return_path::ReturnPath>) -> Composer {
        self.return_path = return_path;
        self
    }

    /// The MAIL FROM of `letter`'s messages: its signed return path, or the `From` address. The
    /// `From` header is the same either way.
    pub fn envelope_sender(&self, letter: &mongodb::bson::oid::ObjectId) -> String {
        match &self.return_path {
            Some(return_path) => return_path.address(letter),
            None => self.from.email.to_string(),
        }
    }

    /// Whether each recipient gets a copy of their own (`SMTP_DELIVERY=individual`).
    pub fn individual(&self) -> bool {
        self.individual
    }

    /// The formatted, signed message of `letter`, for all its recipients (BCC). In individual
    /// mode only the checks that fail the whole letter: its copies are built per recipient, and
    /// signing a message no one gets would cost a signature per letter.
    pub fn build(&self, letter: &Letter) -> Result<message::Composed, MessageError> {
        if self.individual {
            message::check_subject(&letter.subject).map_err(MessageError::new)?;
            return Ok(message::Composed::default());
        }
        self.build_copy(letter, &self.body(letter)?, None)
    }

    /// The encoded body of `letter`'s messages: its HTML, the text alternative made from it and
    /// its attachments; made once for all its copies (without attachments, shared by every
    /// letter with the same HTML).
    pub fn body(&self, letter: &Letter) -> Result<Arc<message::EncodedBody>, MessageError> {
        let text = message::text_of_html(&letter.body)?;
        let parts: Vec<message::AttachmentPart<'_>> = letter.attachments.iter().map(|a| a.part()).collect();
        message::letter_body(&letter.body, &text, &parts)
    }

    /// One recipient's copy: their address in `To:` and in their unsubscribe link. `body` is the
    /// letter's [`Composer::body`], made once for all its copies.
    pub fn build_copy(
        &self,
        letter: &Letter,
        body: &Arc<message::EncodedBody>,
        recipient: Option<&Recipient>,
    ) -> Result<message::Composed, MessageError> {
        let id = crate::model::IdHex::new(&letter.id);
        let content = Content { id: id.as_str(), subject: &letter.subject, html: &letter.body };
        let to = match recipient {
            Some(recipient) => Some(
                recipient
                    .as_str()
                    .parse::<Mailbox>()
                    .map_err(|e| MessageError::new(format!("{recipient} cannot go in To: {e}")))?,
            ),
            None => None,
        };
        let fields = Fields {
            token: letter.token.clone(),
            letter_id: id.as_str().to_owned(),
            kafka_key: letter.kafkakey.clone(),
            address: recipient.map(Recipient::to_string),
        };
        let mut headers = self.unsubscribe_headers(&fields)?;
        headers.extend(self.relay_metadata.headers(id.as_str()));
        let draft = message::compose_over(content, Arc::clone(body), &self.from, to.as_ref(), headers)?;
        match &self.dkim {
            Some(dkim) => draft.finish_signed(|message| dkim.sign(message)),
            None => draft.finish(),
        }
    }

    /// `List-Unsubscribe` (and, with an HTTPS URL, RFC 8058's `List-Unsubscribe-Post`).
    fn unsubscribe_headers(&self, fields: &Fields) -> Result<message::ExtraHeaders, MessageError> {
        let mut targets = Vec::new();
        if let Some((template, signer)) = &self.unsubscribe_url {
            targets.push(format!("<{}>", template.expand(fields, signer).map_err(MessageError::new)?));
        }
        if let Some(mailto) = &self.unsubscribe_mailto {
            targets.push(format!("<mailto:{mailto}?subject=unsubscribe%20{}>", fields.letter_id));
        }
        let mut headers = Vec::new();
        if !targets.is_empty() {
            headers.push((HeaderName::new_from_ascii_str(LIST_UNSUBSCRIBE), targets.join(", ")));
        }
        if self.unsubscribe_url.is_some() {
            headers
                .push((HeaderName::new_from_ascii_str(LIST_UNSUBSCRIBE_POST), "List-Unsubscribe=One-Click".to_owned()));
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    /// The link template's checks, once `config` (which keeps it as written) accepted it; these
    /// cases were `config`'s test `deliverability_settings_are_checked_by_name` until the
    /// template moved here.
    #[test]
    fn the_unsubscribe_template_is_checked_by_name() {
        let secret = "0123456789abcdef";
        for (pairs, named) in [
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
        ] {
            let vars: HashMap<String, String> =
                [("KAFKA_BROKERS", "127.0.0.1:9092"), ("MONGO_LOCAL", "mongodb://127.0.0.1:27017"), ("SMTP_HOST", "h")]
                    .into_iter()
                    .chain(pairs.iter().copied())
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
            let config = Config::from_vars(vars).unwrap();
            let error = Composer::new(config.smtp.from.clone(), &config.deliverability).err().unwrap().to_string();
            assert!(error.contains(named), "{pairs:?}: {error}");
            assert!(!error.contains("short") && !error.contains(secret), "a secret in {error}");
        }
    }
}
