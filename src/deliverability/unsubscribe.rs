//! One-click unsubscribe links (RFC 8058). `LIST_UNSUBSCRIBE_URL` is an HTTPS template whose
//! placeholders are filled per letter, URL-encoded; the link then gets a `sig` parameter, an
//! HMAC-SHA256 of everything after the host, so the endpoint can tell a link we made from a
//! forged or altered one without storing anything.
//!
//! Links are written in RFC 3986's normal form (§6.2.2): the unreserved characters
//! (`A-Z a-z 0-9 - . _ ~`) as themselves, everything else as `%XX` with upper-case hex. HTTP
//! stacks, proxies and mailbox providers' fetchers normalise URLs before requesting them, so the
//! endpoint normalises what it receives the same way and checks the signature over that: every
//! URI equivalent to one we signed is accepted. Links made before (every non-alphanumeric
//! character encoded) are still accepted, by re-encoding their values the old way.
//!
//! A link must fit on one header line (SMTP's 998 octets; a URL cannot be folded). A token or
//! Kafka key too long for that (a kilobyte JWT) is not carried: its placeholder gets a reference
//! `!<letter id>` instead, and the endpoint reads the value from the stored letter. `!` is a
//! reserved character, written `%21` in every carried value, and normalisation never decodes it,
//! so a reference cannot be mistaken for a value.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;

/// What is percent-encoded in a value: everything but RFC 3986's unreserved characters.
const RESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The longest link carried in full. `List-Unsubscribe: <` and `>,` around it leave 977 octets
/// of SMTP's 998 for the URL; the rest is a margin.
pub const MAX_LINK_OCTETS: usize = 900;

/// Marks a placeholder whose value is read from the stored letter.
const REFERENCE: char = '!';

/// The values a link carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    pub token: String,
    pub letter_id: String,
    pub kafka_key: String,
    /// Only when the link is one recipient's (`{address}`, per-recipient delivery).
    pub address: Option<String>,
}

/// A link the endpoint accepted: its values, and which of them must be read from the letter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub fields: Fields,
    /// The letter whose token (and Kafka key) the link refers to instead of carrying them.
    pub reference: Option<Reference>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reference {
    /// The letter's id (hex), as signed in the link.
    pub letter_id: String,
    pub token: bool,
    pub kafka_key: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Token,
    LetterId,
    KafkaKey,
    Address,
}

impl Field {
    fn parse(name: &str) -> Option<Field> {
        match name {
            "token" => Some(Field::Token),
            "letter_id" => Some(Field::LetterId),
            "kafka_key" => Some(Field::KafkaKey),
            "address" => Some(Field::Address),
            _ => None,
        }
    }

    fn value(self, fields: &Fields) -> &str {
        match self {
            Field::Token => &fields.token,
            Field::LetterId => &fields.letter_id,
            Field::KafkaKey => &fields.kafka_key,
            Field::Address => fields.address.as_deref().unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(Field),
}

/// A checked `LIST_UNSUBSCRIBE_URL`.
#[derive(Debug, Clone)]
pub struct UrlTemplate {
    /// `https://host[:port]`.
    origin: String,
    /// The path and query, split at the placeholders, the literals in normal form.
    parts: Vec<Part>,
    /// The literals as written, which links made before normal form were signed over.
    legacy_parts: Vec<Part>,
    has_query: bool,
}

const EXPECTED: &str = "an https:// URL template whose placeholders are {token}, {letter_id}, {kafka_key} or {address}, each followed by a character that cannot appear in a value (such as / & ? =; not a letter, digit, - . _ ~ % or !), and no sig parameter";

/// Which placeholders a link fills with a reference to the letter instead of their value.
#[derive(Debug, Clone, Copy, Default)]
struct ByReference {
    token: bool,
    kafka_key: bool,
}

impl UrlTemplate {
    pub fn parse(raw: &str) -> Result<UrlTemplate, String> {
        let rest = raw.strip_prefix("https://").ok_or_else(|| EXPECTED.to_owned())?;
        let path_start = rest.find('/').ok_or_else(|| format!("{EXPECTED}; the URL has no path"))?;
        let (host, path) = rest.split_at(path_start);
        if host.is_empty() || host.contains(['{', '}', '@']) {
            return Err(format!("{EXPECTED}; the host must be plain"));
        }
        let mut legacy_parts = Vec::new();
        let mut remaining = path;
        while let Some(open) = remaining.find('{') {
            if open > 0 {
                legacy_parts.push(Part::Literal(remaining[..open].to_owned()));
            }
            let close = remaining[open..].find('}').ok_or_else(|| format!("{EXPECTED}; a {{ is not closed"))? + open;
            let name = &remaining[open + 1..close];
            let field = Field::parse(name).ok_or_else(|| format!("{EXPECTED}; {{{name}}} is unknown"))?;
            legacy_parts.push(Part::Field(field));
            remaining = &remaining[close + 1..];
        }
        if !remaining.is_empty() {
            legacy_parts.push(Part::Literal(remaining.to_owned()));
        }
        let parts: Vec<Part> = legacy_parts
            .iter()
            .map(|part| match part {
                Part::Literal(literal) => Part::Literal(normalise(literal)),
                field => field.clone(),
            })
            .collect();
        // A value is encoded to unreserved characters and %XX (or is a `!` reference), so the
        // literal after a placeholder tells where the value ends when it starts with anything else.
        for pair in parts.windows(2) {
            if let [Part::Field(_), next] = pair {
                let separates = matches!(next, Part::Literal(l) if !l.starts_with(|c: char| is_unreserved(c) || c == '%' || c == REFERENCE));
                if !separates {
                    return Err(format!("{EXPECTED}; two placeholders need a separator such as / or &"));
                }
            }
        }
        let stray_brace = parts.iter().any(|p| matches!(p, Part::Literal(l) if l.contains('}')));
        if stray_brace || normalise(path).contains("sig=") {
            return Err(EXPECTED.to_owned());
        }
        Ok(UrlTemplate { origin: format!("https://{host}"), has_query: path.contains('?'), parts, legacy_parts })
    }

    /// Whether links name their recipient.
    pub fn names_address(&self) -> bool {
        self.parts.contains(&Part::Field(Field::Address))
    }

    fn has(&self, field: Field) -> bool {
        self.parts.contains(&Part::Field(field))
    }

    /// The signed link for `fields`, in normal form, at most [`MAX_LINK_OCTETS`] long: a token,
    /// then a Kafka key, that would make it longer is replaced by a reference to the letter. An
    /// error names the length when even that does not fit (a very long address or template).
    pub fn expand(&self, fields: &Fields, signer: &Signer) -> Result<String, String> {
        let mut by_reference = ByReference::default();
        let mut link = self.link(fields, signer, by_reference);
        if link.len() > MAX_LINK_OCTETS && self.has(Field::Token) {
            by_reference.token = true;
            link = self.link(fields, signer, by_reference);
        }
        if link.len() > MAX_LINK_OCTETS && self.has(Field::KafkaKey) {
            by_reference.kafka_key = true;
            link = self.link(fields, signer, by_reference);
        }
        if link.len() > MAX_LINK_OCTETS {
            return Err(format!(
                "the one-click link is {} octets, more than {MAX_LINK_OCTETS} (one header line), even with the token and Kafka key read from the letter; shorten LIST_UNSUBSCRIBE_URL",
                link.len()
            ));
        }
        Ok(link)
    }

    fn link(&self, fields: &Fields, signer: &Signer, by_reference: ByReference) -> String {
        let signed = render(&self.parts, fields, RESERVED, by_reference);
        let separator = if self.has_query { '&' } else { '?' };
        let sig = signer.sign(&signed);
        format!("{}{signed}{separator}sig={sig}", self.origin)
    }

    /// Checks a request's path and query against the template and its signature, after
    /// normalising it (RFC 3986 §6.2.2), so any URI equivalent to a link we made passes. `None`
    /// for a link this service did not make (or one altered since).
    pub fn verify(&self, path_and_query: &str, signer: &Signer) -> Option<Link> {
        let normal = normalise(path_and_query);
        let cut = normal.rfind("sig=")?;
        let separator = if self.has_query { '&' } else { '?' };
        let signed = normal[..cut].strip_suffix(separator)?;
        let sig = &normal[cut + 4..];
        let link = self.fields_of(signed)?;
        if signer.verify(signed, sig) {
            return Some(link);
        }
        // A link made before normal form: signed over every non-alphanumeric character encoded.
        if link.reference.is_none() {
            let legacy = render(&self.legacy_parts, &link.fields, NON_ALPHANUMERIC, ByReference::default());
            if signer.verify(&legacy, sig) {
                return Some(link);
            }
        }
        None
    }

    fn fields_of(&self, mut signed: &str) -> Option<Link> {
        let mut link = Link::default();
        for (i, part) in self.parts.iter().enumerate() {
            match part {
                Part::Literal(literal) => signed = signed.strip_prefix(literal.as_str())?,
                Part::Field(field) => {
                    let end = match self.parts.get(i + 1) {
                        Some(Part::Literal(next)) => signed.find(next.as_str())?,
                        _ => signed.len(),
                    };
                    let raw = &signed[..end];
                    signed = &signed[end..];
                    if let Some(letter_id) = raw.strip_prefix(REFERENCE) {
                        let reference = link.reference.get_or_insert_with(|| Reference {
                            letter_id: letter_id.to_owned(),
                            ..Reference::default()
                        });
                        if reference.letter_id != letter_id {
                            return None;
                        }
                        match field {
                            Field::Token => reference.token = true,
                            Field::KafkaKey => reference.kafka_key = true,
                            Field::LetterId | Field::Address => return None,
                        }
                        continue;
                    }
                    let value = percent_decode_str(raw).decode_utf8().ok()?.into_owned();
                    match field {
                        Field::Token => link.fields.token = value,
                        Field::LetterId => link.fields.letter_id = value,
                        Field::KafkaKey => link.fields.kafka_key = value,
                        Field::Address => link.fields.address = Some(value),
                    }
                }
            }
        }
        if !signed.is_empty() {
            return None;
        }
        if let Some(reference) = &link.reference {
            let is_id = reference.letter_id.len() == 24 && reference.letter_id.bytes().all(|b| b.is_ascii_hexdigit());
            let agrees = !self.has(Field::LetterId) || link.fields.letter_id == reference.letter_id;
            if !is_id || !agrees {
                return None;
            }
            link.fields.letter_id.clone_from(&reference.letter_id);
        }
        Some(link)
    }
}

/// The path and query of a link before its signature.
fn render(parts: &[Part], fields: &Fields, encoded: &'static AsciiSet, by_reference: ByReference) -> String {
    let mut signed = String::new();
    for part in parts {
        match part {
            Part::Literal(literal) => signed.push_str(literal),
            Part::Field(Field::Token) if by_reference.token => {
                signed.push(REFERENCE);
                signed.push_str(&fields.letter_id);
            }
            Part::Field(Field::KafkaKey) if by_reference.kafka_key => {
                signed.push(REFERENCE);
                signed.push_str(&fields.letter_id);
            }
            Part::Field(field) => signed.extend(utf8_percent_encode(field.value(fields), encoded)),
        }
    }
    signed
}

fn is_unreserved(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~')
}

/// RFC 3986 §6.2.2's normal form of a URI's text: percent-encoded unreserved characters decoded
/// (§6.2.2.2), the hex digits of the rest upper-cased (§6.2.2.1). Nothing else changes: a
/// reserved character and its encoding are not equivalent.
pub fn normalise(uri: &str) -> String {
    let bytes = uri.as_bytes();
    let mut out = String::with_capacity(uri.len());
    let (mut copied, mut i) = (0, 0);
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| Some((hex_value(*bytes.get(i + 1)?)?, hex_value(*bytes.get(i + 2)?)?)))
            .flatten();
        let Some((high, low)) = escape else {
            i += 1;
            continue;
        };
        out.push_str(&uri[copied..i]);
        let decoded = char::from(high * 16 + low);
        if is_unreserved(decoded) {
            out.push(decoded);
        } else {
            out.push('%');
            out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
            out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
        }
        i += 3;
        copied = i;
    }
    out.push_str(&uri[copied..]);
    out
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// HMAC-SHA256 with `UNSUBSCRIBE_SECRET`.
pub struct Signer {
    key: SecretBox<Vec<u8>>,
}

impl Signer {
    pub fn new(secret: &SecretString) -> Signer {
        Signer { key: SecretBox::new(Box::new(secret.expose_secret().as_bytes().to_vec())) }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        Hmac::<Sha256>::new_from_slice(self.key.expose_secret()).expect("HMAC accepts any key length")
    }

    fn sign(&self, data: &str) -> String {
        let mut mac = self.mac();
        mac.update(data.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Constant-time comparison, so timing tells a forger nothing.
    fn verify(&self, data: &str, sig: &str) -> bool {
        let Ok(sig) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig) else { return false };
        let mut mac = self.mac();
        mac.update(data.as_bytes());
        mac.verify_slice(&sig).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::new(&SecretString::from("0123456789abcdef-secret"))
    }

    fn fields() -> Fields {
        Fields {
            token: "tok en/&=1".into(),
            letter_id: "65a1b2c3d4e5f60718293a4b".into(),
            kafka_key: "key-1".into(),
            address: Some("Ann@Example.org".into()),
        }
    }

    fn strip_origin(url: &str) -> &str {
        let path = url.strip_prefix("https://mail.example.com").unwrap();
        path.strip_prefix(":8443").unwrap_or(path)
    }

    fn carried(fields: Fields) -> Option<Link> {
        Some(Link { fields, reference: None })
    }

    const TEMPLATES: [&str; 2] = [
        "https://mail.example.com/unsubscribe?t={token}&l={letter_id}&k={kafka_key}&a={address}",
        "https://mail.example.com:8443/unsubscribe/{letter_id}/{token}/{kafka_key}/{address}",
    ];

    #[test]
    fn links_round_trip_and_alterations_fail() {
        for raw in TEMPLATES {
            let template = UrlTemplate::parse(raw).unwrap();
            let url = template.expand(&fields(), &signer()).unwrap();
            let path = strip_origin(&url);
            assert_eq!(template.verify(path, &signer()), carried(fields()), "{url}");
            assert!(!url.contains(' ') && !url.contains('@'), "{url}");
            let altered = path.replace("key-1", "key-2");
            assert_ne!(altered, path);
            assert_eq!(template.verify(&altered, &signer()), None);
            let other = Signer::new(&SecretString::from("another-secret-of-16"));
            assert_eq!(template.verify(path, &other), None);
            assert_eq!(template.verify(&format!("{path}x"), &signer()), None);
        }
    }

    /// RFC 3986 §6.2.2: unreserved characters as themselves, other escapes upper-case; any
    /// equivalent form passes, a reserved character decoded does not.
    #[test]
    fn links_are_in_normal_form_and_equivalent_uris_pass() {
        let fields = Fields { token: "a.b-c_d~e f/g%".into(), ..fields() };
        for raw in TEMPLATES {
            let template = UrlTemplate::parse(raw).unwrap();
            let url = template.expand(&fields, &signer()).unwrap();
            assert!(url.contains("a.b-c_d~e%20f%2Fg%25") && url.contains("key-1"), "{url}");
            assert_eq!(normalise(&url), url, "already normal");
            let path = strip_origin(&url);
            let encoded_unreserved = path.replace('.', "%2E").replace('-', "%2d").replace('~', "%7e");
            let lower_hex = path.replace("%2F", "%2f");
            for variant in [encoded_unreserved, lower_hex] {
                assert_ne!(variant, path);
                assert_eq!(template.verify(&variant, &signer()), carried(fields.clone()), "{variant}");
            }
            let decoded_reserved = path.replace("%2F", "/");
            assert_eq!(template.verify(&decoded_reserved, &signer()), None, "{decoded_reserved}");
        }
    }

    /// Links made before normal form (every non-alphanumeric character encoded) still pass, as
    /// sent and normalised.
    #[test]
    fn links_made_before_normal_form_still_pass() {
        for raw in TEMPLATES {
            let template = UrlTemplate::parse(raw).unwrap();
            let signed = render(&template.legacy_parts, &fields(), NON_ALPHANUMERIC, ByReference::default());
            assert!(signed.contains("key%2D1"), "{signed}");
            let separator = if template.has_query { '&' } else { '?' };
            let old = format!("{signed}{separator}sig={}", signer().sign(&signed));
            assert_eq!(template.verify(&old, &signer()), carried(fields()), "{old}");
            assert_eq!(template.verify(&normalise(&old), &signer()), carried(fields()));
            assert_eq!(template.verify(&old.replace("%2D", "%2d"), &signer()), carried(fields()));
            assert_eq!(template.verify(&old.replace("key%2D1", "key%2D2"), &signer()), None);
        }
    }

    /// A kilobyte token (a JWT) is not carried: the link refers to the letter and fits one line.
    #[test]
    fn a_long_token_is_carried_by_reference() {
        let jwt = format!("eyJhbGciOiJIUzI1NiJ9.{}.{}+/=", "x".repeat(700), "y~!".repeat(100));
        let long = Fields { token: jwt, ..fields() };
        for raw in TEMPLATES {
            let template = UrlTemplate::parse(raw).unwrap();
            let url = template.expand(&long, &signer()).unwrap();
            assert!(url.len() <= MAX_LINK_OCTETS, "{url}");
            assert!(url.contains(&format!("!{}", long.letter_id)), "{url}");
            let link = template.verify(strip_origin(&url), &signer()).unwrap();
            let expected = Reference { letter_id: long.letter_id.clone(), token: true, kafka_key: false };
            assert_eq!(link.reference, Some(expected));
            assert_eq!((link.fields.token.as_str(), link.fields.kafka_key.as_str()), ("", "key-1"));
            // Another letter's reference is a forgery.
            let other = strip_origin(&url).replace(&format!("!{}", long.letter_id), "!0123456789abcdef01234567");
            assert_eq!(template.verify(&other, &signer()), None);
            // A short token that starts with `!` is carried as a value, `%21`.
            let bang = Fields { token: "!65a1b2c3d4e5f60718293a4b".into(), ..fields() };
            let url = template.expand(&bang, &signer()).unwrap();
            assert!(url.contains("%2165a1"), "{url}");
            assert_eq!(template.verify(strip_origin(&url), &signer()), carried(bang));
        }
        // Neither the token nor a kilobyte key fits, and the template has no {token}: refused.
        let template = UrlTemplate::parse("https://mail.example.com/u/{address}?k={kafka_key}").unwrap();
        let both =
            Fields { kafka_key: "k".repeat(2000), address: Some(format!("{}@x.org", "a".repeat(64))), ..fields() };
        let url = template.expand(&both, &signer()).unwrap();
        assert!(url.len() <= MAX_LINK_OCTETS && url.contains("k=!"), "{url}");
        let huge = UrlTemplate::parse(&format!("https://mail.example.com/{}/{{address}}", "p".repeat(900))).unwrap();
        let error = huge.expand(&fields(), &signer()).unwrap_err();
        assert!(error.contains("more than 900"), "{error}");
    }

    #[test]
    fn bad_templates_are_refused() {
        for raw in [
            "http://mail.example.com/u?t={token}",
            "https://mail.example.com/u?t={nope}",
            "https://mail.example.com/u/{token}{letter_id}",
            "https://mail.example.com/u/{token}x",
            "https://mail.example.com/u?t={token}&sig=1",
            "https://{token}.example.com/u",
            "https://mail.example.com",
            "https://mail.example.com/u}?t={token}",
            "https://mail.example.com/u/{token}.html",
            "https://mail.example.com/u/{token}~{letter_id}",
            "https://mail.example.com/u/{token}!x",
            "https://mail.example.com/u?t={token}&%73ig=1",
        ] {
            assert!(UrlTemplate::parse(raw).is_err(), "{raw} accepted");
        }
    }
}
