//! A recipient address, parsed once at the edge and carried as a type: the form the producer
//! wrote (what status messages echo), and the forms SMTP needs (ASCII with the domain in punycode,
//! or UTF-8 where the server offers SMTPUTF8).

use std::{fmt, sync::Arc};

use lettre::Address;

/// A mailbox that can go in `RCPT TO`. Shared, not copied: a letter's recipients are parsed once
/// (`Letter::pending_recipients`) and handed to every stage, so a clone is a reference count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Recipient(Arc<Parts>);

#[derive(Debug, PartialEq, Eq, Hash)]
struct Parts {
    /// As given by the producer (trimmed): what status messages and the letter's state use.
    address: String,
    local: String,
    domain: String,
    /// The domain in its ASCII form (IDNA punycode for an internationalised domain).
    ascii_domain: String,
    /// See [`Recipient::key`]; made with the rest, as every stage compares by it.
    key: String,
}

/// How a recipient must be written in the envelope for a given server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeForm {
    /// Plain ASCII: the domain in punycode if it was internationalised.
    Ascii(String),
    /// UTF-8, which needs the server's SMTPUTF8 extension (RFC 6531) and the `SMTPUTF8` MAIL
    /// parameter.
    Utf8(String),
    /// The local part is not ASCII and the server lacks SMTPUTF8: it cannot be sent there.
    Unsendable(String),
}

impl Recipient {
    /// Accepts a bare mailbox (`user@domain`), the only form that can go in `RCPT TO`.
    pub fn parse(raw: &str) -> Result<Recipient, String> {
        let address = raw.trim();
        if address.is_empty() {
            return Err("invalid address: empty".to_owned());
        }
        if address.chars().any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>' || c == ',') {
            return Err(format!(
                "invalid address {address:?}: contains a space, control character, comma or angle bracket"
            ));
        }
        let parsed = address.parse::<Address>().map_err(|e| format!("invalid address {address:?}: {e}"))?;
        let (local, domain) = (parsed.user().to_owned(), parsed.domain().to_owned());
        let ascii_domain = if domain.is_ascii() {
            domain.to_ascii_lowercase()
        } else {
            idna::domain_to_ascii(&domain)
                .map_err(|e| format!("invalid address {address:?}: the domain cannot be written in ASCII: {e}"))?
        };
        let key = format!("{}@{}", local.to_lowercase(), ascii_domain);
        Ok(Recipient(Arc::new(Parts { address: parsed.to_string(), local, domain, ascii_domain, key })))
    }

    /// The address as given.
    pub fn as_str(&self) -> &str {
        &self.0.address
    }

    /// The canonical identity of the mailbox, for de-duplication, matching earlier outcomes and
    /// every suppression (added or looked up): the local part lower-cased, the domain in its
    /// IDNA ASCII form lower-cased, so a UTF-8 and a punycode spelling of one address are one
    /// key. Local parts are case-sensitive in theory but not at any real mailbox provider.
    pub fn key(&self) -> String {
        self.0.key.clone()
    }

    /// [`Recipient::key`] without a copy.
    pub fn key_str(&self) -> &str {
        &self.0.key
    }

    /// Whether sending to this address needs SMTPUTF8 (its local part is not ASCII).
    pub fn needs_utf8(&self) -> bool {
        !self.0.local.is_ascii()
    }

    /// The envelope form for a server that does (`smtputf8`) or does not offer SMTPUTF8. An
    /// internationalised domain goes as punycode whenever the local part allows ASCII, which every
    /// server accepts.
    pub fn envelope_form(&self, smtputf8: bool) -> EnvelopeForm {
        let parts = &*self.0;
        if parts.local.is_ascii() {
            EnvelopeForm::Ascii(format!("{}@{}", parts.local, parts.ascii_domain))
        } else if smtputf8 {
            EnvelopeForm::Utf8(format!("{}@{}", parts.local, parts.domain))
        } else {
            EnvelopeForm::Unsendable(
                "the address's local part is not ASCII and the SMTP server does not offer SMTPUTF8 (RFC 6531)"
                    .to_owned(),
            )
        }
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_addresses_parse_and_keep_their_form() {
        let r = Recipient::parse("  Alice@Example.ORG ").unwrap();
        assert_eq!(r.as_str(), "Alice@Example.ORG");
        assert_eq!(r.key(), "alice@example.org");
        assert_eq!(r.envelope_form(false), EnvelopeForm::Ascii("Alice@example.org".into()));
    }

    #[test]
    fn internationalised_domain_goes_as_punycode() {
        let r = Recipient::parse("ivan@пример.рф").unwrap();
        assert_eq!(r.envelope_form(false), EnvelopeForm::Ascii("ivan@xn--e1afmkfd.xn--p1ai".into()));
        assert_eq!(r.envelope_form(true), EnvelopeForm::Ascii("ivan@xn--e1afmkfd.xn--p1ai".into()));
        assert!(!r.needs_utf8());
        let punycode = Recipient::parse("IVAN@XN--E1AFMKFD.xn--p1ai").unwrap();
        assert_eq!(
            (r.key(), punycode.key()),
            ("ivan@xn--e1afmkfd.xn--p1ai".into(), "ivan@xn--e1afmkfd.xn--p1ai".into())
        );
    }

    #[test]
    fn utf8_local_part_needs_smtputf8() {
        let r = Recipient::parse("иван@пример.рф").unwrap();
        assert!(r.needs_utf8());
        assert_eq!(r.envelope_form(true), EnvelopeForm::Utf8("иван@пример.рф".into()));
        assert!(matches!(r.envelope_form(false), EnvelopeForm::Unsendable(reason) if reason.contains("SMTPUTF8")));
    }

    #[test]
    fn malformed_addresses_are_refused_with_a_reason() {
        for bad in ["", "nope", "a b@x.org", "a@x.org>\r\nRCPT TO:<e@x.org", "<a@x.org>", "a@", "@x.org"] {
            let error = Recipient::parse(bad).unwrap_err();
            assert!(error.contains("invalid address"), "{bad:?}: {error}");
        }
    }
}
