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
        // A plain mailbox holds none of the refused characters, so its check comes first.
        let at = match plain_mailbox(address) {
            Some(at) => at,
            None => {
                // Byte by byte where the address is ASCII: an ASCII whitespace that is not a
                // control character is a space.
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
                parsed.user().len()
            }
        };
        let (local, domain) = (&address[..at], &address[at + 1..]);
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

/// Where the `@` is, when `address` is an ASCII `dot-atom@domain` that lettre's check
/// (`email_address`'s local part and text domain rules) accepts without a doubt; `None` leaves the
/// verdict, and the reason of a refusal, to lettre.
///
/// Written by hand because lettre's check was most of a parse (issue 23: ~2,000 of ~2,570
/// instructions, its splitting iterators and per-character classes), and a letter's addresses
/// are parsed at ingest and at every claim. It accepts a subset of what lettre
/// accepts (`the_plain_path_accepts_only_what_lettre_accepts` compares them); anything else
/// (quoted local parts, IP literals, internationalised domains) goes to lettre as before.
fn plain_mailbox(address: &str) -> Option<usize> {
    const LOCAL_MAX: usize = 64;
    const DOMAIN_MAX: usize = 254;
    const LABEL_MAX: usize = 63;
    let bytes = address.as_bytes();
    let at = bytes.iter().rposition(|&b| b == b'@')?;
    let (local, domain) = (&bytes[..at], &bytes[at + 1..]);
    if local.len() > LOCAL_MAX || domain.len() > DOMAIN_MAX {
        return None;
    }
    // Atoms separated by single dots, none empty.
    let mut after_dot = true;
    for &b in local {
        match b {
            b'.' if after_dot => return None,
            b'.' => after_dot = true,
            _ if CLASS[usize::from(b)] & ATEXT != 0 => after_dot = false,
            _ => return None,
        }
    }
    if after_dot {
        return None;
    }
    // Labels of atext that begin and end with a letter or digit, none empty or longer than 63.
    let (mut label, mut last) = (0, b'.');
    for &b in domain {
        match b {
            b'.' if label == 0 || CLASS[usize::from(last)] & ALNUM == 0 => return None,
            b'.' => label = 0,
            _ if label == 0 && CLASS[usize::from(b)] & ALNUM == 0 => return None,
            _ if CLASS[usize::from(b)] & ATEXT != 0 && label < LABEL_MAX => label += 1,
            _ => return None,
        }
        last = b;
    }
    (label > 0 && CLASS[usize::from(last)] & ALNUM != 0).then_some(at)
}

/// RFC 5322's atext, ASCII part, as `email_address` has it ([`ATEXT`]), and the letters and
/// digits among them ([`ALNUM`]), by byte.
const ATEXT: u8 = 1;
const ALNUM: u8 = 2;
static CLASS: [u8; 256] = {
    let mut class = [0; 256];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() {
            class[b] = ATEXT | ALNUM;
        } else if matches!(
            c,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'/'
                | b'='
                | b'?'
                | b'^'
                | b'_'
                | b'`'
                | b'{'
                | b'|'
                | b'}'
                | b'~'
        ) {
            class[b] = ATEXT;
        }
        b += 1;
    }
    class
};

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

    /// Characters that matter to either rule, and some that no rule allows.
    const ALPHABET: &[char] =
        &['a', 'Z', '0', '9', '.', '@', '-', '_', '+', '!', '~', '"', '[', ']', ':', '\\', '(', 'é', 'я', '\u{7f}'];

    /// Every string the hand-written path accepts, lettre accepts, and at the same `@`: the
    /// exhaustive part covers every string of up to 5 characters from the alphabet above, the
    /// property part longer ones and the length limits.
    #[test]
    fn the_plain_path_accepts_only_what_lettre_accepts() {
        fn agrees(raw: &str) -> bool {
            match plain_mailbox(raw) {
                Some(at) => raw.parse::<Address>().is_ok_and(|a| a.user().len() == at),
                None => true,
            }
        }
        let mut accepted = 0;
        let mut strings = vec![String::new()];
        for _ in 0..5 {
            strings = strings.iter().flat_map(|s| ALPHABET.iter().map(move |c| format!("{s}{c}"))).collect();
            for s in &strings {
                assert!(agrees(s), "{s:?}");
                accepted += usize::from(plain_mailbox(s).is_some());
            }
        }
        assert!(accepted > 1_000, "the exhaustive part accepted only {accepted}");
        for (local, domain) in [(64, 63), (65, 63), (64, 64), (1, 254), (1, 255)] {
            let label = |n: usize| "a".repeat(n);
            let domain = match domain {
                63 | 64 => label(domain),
                total => [label(63), label(63), label(63), label(total - 3 * 64)].join("."),
            };
            let raw = format!("{}@{domain}", label(local));
            assert!(agrees(&raw), "{raw}");
            assert_eq!(plain_mailbox(&raw).is_some(), raw.parse::<Address>().is_ok(), "{raw}");
        }
    }

    proptest::proptest! {
        #[test]
        fn longer_plain_addresses_agree_with_lettre(
            raw in proptest::collection::vec(proptest::sample::select(ALPHABET), 0..40)
        ) {
            let raw: String = raw.into_iter().collect();
            if let Some(at) = plain_mailbox(&raw) {
                proptest::prop_assert_eq!(raw.parse::<Address>().map(|a| a.user().len()), Ok(at), "{:?}", raw);
            }
        }
    }

    /// The common forms take the hand-written path (else it would save nothing) and parse to
    /// what lettre's path made of them.
    #[test]
    fn common_addresses_take_the_plain_path() {
        for raw in ["alice@example.org", "Alice.Smith+news@Mail.Example.CO.UK", "o'brien@x-y.example", "a_1@b2.io"] {
            assert_eq!(plain_mailbox(raw), Some(raw.rfind('@').unwrap()), "{raw}");
            let lettre = raw.parse::<Address>().unwrap();
            let r = Recipient::parse(raw).unwrap();
            assert_eq!((r.local(), &r.0.address[r.0.at + 1..]), (lettre.user(), lettre.domain()));
        }
        for raw in ["\"quoted\"@example.org", "a@[127.0.0.1]", "a@пример.рф", "a..b@example.org", "a@-x.org"] {
            assert_eq!(plain_mailbox(raw), None, "{raw}");
        }
    }

    #[test]
    fn malformed_addresses_are_refused_with_a_reason() {
        for bad in ["", "nope", "a b@x.org", "a@x.org>\r\nRCPT TO:<e@x.org", "<a@x.org>", "a@", "@x.org"] {
            let error = Recipient::parse(bad).unwrap_err();
            assert!(error.contains("invalid address"), "{bad:?}: {error}");
        }
    }
}
