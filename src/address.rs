//! A recipient address, parsed once at the edge and carried as a type: the form the producer
//! wrote (what status messages echo), and the forms SMTP needs (ASCII with the domain in punycode,
//! or UTF-8 where the server offers SMTPUTF8).

use std::{borrow::Cow, fmt, sync::Arc};

use lettre::Address;

/// A mailbox that can go in `RCPT TO`. Shared, not copied: a letter's recipients are parsed once
/// (`Letter::pending_recipients`) and handed to every stage, so a clone is a reference count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Recipient(Arc<Parts>);

#[derive(Debug, PartialEq, Eq, Hash)]
struct Parts {
    /// As given by the producer (trimmed), `local@domain`: what status messages and the
    /// letter's state use.
    address: String,
    /// Where the `@` before the domain is.
    at: usize,
    /// The domain in its ASCII form (IDNA punycode for an internationalised domain), lower-cased,
    /// when that is not the domain as written.
    ascii_domain: Option<String>,
    /// See [`Recipient::key`], when it is not `address` itself; made with the rest, as every
    /// stage compares by it.
    key: Option<String>,
}

/// How a recipient must be written in the envelope for a given server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeForm<'a> {
    /// Plain ASCII: the domain in punycode if it was internationalised.
    Ascii(Cow<'a, str>),
    /// UTF-8, which needs the server's SMTPUTF8 extension (RFC 6531) and the `SMTPUTF8` MAIL
    /// parameter.
    Utf8(Cow<'a, str>),
    /// The local part is not ASCII and the server lacks SMTPUTF8: it cannot be sent there.
    Unsendable(String),
}

impl Recipient {
    /// Accepts a bare mailbox (`user@domain`), the only form that can go in `RCPT TO`.
    ///
    /// Every letter's recipients are parsed at ingest and again at claim: the forms and the key
    /// are kept only where they differ from the address as given (one allocation for a
    /// lower-case ASCII address, against six), which halved a parse's instructions (issue 23).
    pub fn parse(raw: &str) -> Result<Recipient, String> {
        let address = raw.trim();
        if address.is_empty() {
            return Err("invalid address: empty".to_owned());
        }
        // Byte by byte where the address is ASCII (nearly always): an ASCII whitespace that is not
        // a control character is a space.
        let refused = |c: char| c.is_control() || c.is_whitespace() || c == '<' || c == '>' || c == ',';
        let has_refused = match address.is_ascii() {
            true => address.bytes().any(|b| b.is_ascii_control() || matches!(b, b' ' | b'<' | b'>' | b',')),
            false => address.chars().any(refused),
        };
        if has_refused {
            return Err(format!(
                "invalid address {address:?}: contains a space, control character, comma or angle bracket"
            ));
        }
        let parsed = address.parse::<Address>().map_err(|e| format!("invalid address {address:?}: {e}"))?;
        let (local, domain) = (parsed.user(), parsed.domain());
        let ascii_domain = if !domain.is_ascii() {
            Some(
                idna::domain_to_ascii(domain)
                    .map_err(|e| format!("invalid address {address:?}: the domain cannot be written in ASCII: {e}"))?,
            )
        } else if domain.bytes().any(|b| b.is_ascii_uppercase()) {
            Some(domain.to_ascii_lowercase())
        } else {
            None
        };
        let lower_local: Cow<'_, str> = if local.is_ascii() {
            match local.bytes().any(|b| b.is_ascii_uppercase()) {
                true => Cow::Owned(local.to_ascii_lowercase()),
                false => Cow::Borrowed(local),
            }
        } else {
            match local.to_lowercase() {
                lower if lower == local => Cow::Borrowed(local),
                lower => Cow::Owned(lower),
            }
        };
        let key = match (&lower_local, &ascii_domain) {
            (Cow::Borrowed(_), None) => None,
            (lower_local, ascii_domain) => Some(joined(lower_local, ascii_domain.as_deref().unwrap_or(domain))),
        };
        let at = local.len();
        let address: &str = parsed.as_ref();
        Ok(Recipient(Arc::new(Parts { address: address.to_owned(), at, ascii_domain, key })))
    }

    /// The address as given.
    pub fn as_str(&self) -> &str {
        &self.0.address
    }

    fn local(&self) -> &str {
        &self.0.address[..self.0.at]
    }

    /// The canonical identity of the mailbox, for de-duplication, matching earlier outcomes and
    /// every suppression (added or looked up): the local part lower-cased, the domain in its
    /// IDNA ASCII form lower-cased, so a UTF-8 and a punycode spelling of one address are one
    /// key. Local parts are case-sensitive in theory but not at any real mailbox provider.
    pub fn key(&self) -> String {
        self.key_str().to_owned()
    }

    /// [`Recipient::key`] without a copy.
    pub fn key_str(&self) -> &str {
        self.0.key.as_deref().unwrap_or(&self.0.address)
    }

    /// Whether sending to this address needs SMTPUTF8 (its local part is not ASCII).
    pub fn needs_utf8(&self) -> bool {
        !self.local().is_ascii()
    }

    /// The envelope form for a server that does (`smtputf8`) or does not offer SMTPUTF8. An
    /// internationalised domain goes as punycode whenever the local part allows ASCII, which every
    /// server accepts.
    pub fn envelope_form(&self, smtputf8: bool) -> EnvelopeForm<'_> {
        let local = self.local();
        if local.is_ascii() {
            match &self.0.ascii_domain {
                None => EnvelopeForm::Ascii(Cow::Borrowed(&self.0.address)),
                Some(ascii_domain) => EnvelopeForm::Ascii(Cow::Owned(joined(local, ascii_domain))),
            }
        } else if smtputf8 {
            EnvelopeForm::Utf8(Cow::Borrowed(&self.0.address))
        } else {
            EnvelopeForm::Unsendable(
                "the address's local part is not ASCII and the SMTP server does not offer SMTPUTF8 (RFC 6531)"
                    .to_owned(),
            )
        }
    }
}

/// `local@domain`, in one allocation.
fn joined(local: &str, domain: &str) -> String {
    let mut address = String::with_capacity(local.len() + 1 + domain.len());
    address.push_str(local);
    address.push('@');
    address.push_str(domain);
    address
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forms and the key are those the parse made before it kept only what differs: the
    /// local part lower-cased and the domain in lower-case ASCII, whatever the spelling.
    /// The ASCII check refuses exactly the characters the check of every character refuses.
    #[test]
    fn ascii_addresses_are_refused_for_the_same_characters() {
        for byte in 0..=127_u8 {
            let c = char::from(byte);
            let refused = c.is_control() || c.is_whitespace() || c == '<' || c == '>' || c == ',';
            let raw = format!("a{c}b@example.org");
            let error = Recipient::parse(&raw).err();
            let named = error.as_deref().is_some_and(|e| e.contains("space, control character, comma or angle"));
            assert_eq!(named, refused, "{byte:#x}: {error:?}");
        }
    }

    #[test]
    fn forms_and_keys_are_the_full_ones_whatever_the_case() {
        for raw in [
            "alice@example.org",
            "Alice@example.org",
            "alice@Example.ORG",
            "ALICE@EXAMPLE.ORG",
            "ivan@пример.рф",
            "Ivan@ПРИМЕР.рф",
            "иван@example.org",
            "Иван@Example.org",
            "ß@example.org",
            "o'brien+tag@sub.example.co.uk",
        ] {
            let r = Recipient::parse(raw).unwrap();
            let (local, domain) = raw.rsplit_once('@').unwrap();
            let ascii_domain = idna::domain_to_ascii(domain).unwrap().to_ascii_lowercase();
            assert_eq!(r.as_str(), raw);
            assert_eq!(r.key(), format!("{}@{ascii_domain}", local.to_lowercase()), "{raw}");
            assert_eq!(r.key_str(), r.key());
            match local.is_ascii() {
                true => {
                    let ascii = format!("{local}@{ascii_domain}");
                    assert_eq!(r.envelope_form(false), EnvelopeForm::Ascii(ascii.clone().into()), "{raw}");
                    assert_eq!(r.envelope_form(true), EnvelopeForm::Ascii(ascii.into()), "{raw}");
                }
                false => {
                    assert_eq!(r.envelope_form(true), EnvelopeForm::Utf8(raw.into()), "{raw}");
                    assert!(matches!(r.envelope_form(false), EnvelopeForm::Unsendable(_)));
                }
            }
            assert_eq!(r.needs_utf8(), !local.is_ascii());
        }
    }

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
