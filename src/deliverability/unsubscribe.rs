//! One-click unsubscribe links (RFC 8058). `LIST_UNSUBSCRIBE_URL` is an HTTPS template whose
//! placeholders are filled per letter, URL-encoded; the link then gets a `sig` parameter, an
//! HMAC-SHA256 of everything after the host, so the endpoint can tell a link we made from a
//! forged or altered one without storing anything.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;

/// The values a link carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    pub token: String,
    pub letter_id: String,
    pub kafka_key: String,
    /// Only when the link is one recipient's (`{address}`, per-recipient delivery).
    pub address: Option<String>,
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
    /// The path and query, split at the placeholders.
    parts: Vec<Part>,
    has_query: bool,
}

const EXPECTED: &str = "an https:// URL template whose placeholders are {token}, {letter_id}, {kafka_key} or {address}, each followed by a character that is not a letter or digit, and no sig parameter";

impl UrlTemplate {
    pub fn parse(raw: &str) -> Result<UrlTemplate, String> {
        let rest = raw.strip_prefix("https://").ok_or_else(|| EXPECTED.to_owned())?;
        let path_start = rest.find('/').ok_or_else(|| format!("{EXPECTED}; the URL has no path"))?;
        let (host, path) = rest.split_at(path_start);
        if host.is_empty() || host.contains(['{', '}', '@']) {
            return Err(format!("{EXPECTED}; the host must be plain"));
        }
        let mut parts = Vec::new();
        let mut remaining = path;
        while let Some(open) = remaining.find('{') {
            if open > 0 {
                parts.push(Part::Literal(remaining[..open].to_owned()));
            }
            let close = remaining[open..].find('}').ok_or_else(|| format!("{EXPECTED}; a {{ is not closed"))? + open;
            let name = &remaining[open + 1..close];
            let field = Field::parse(name).ok_or_else(|| format!("{EXPECTED}; {{{name}}} is unknown"))?;
            parts.push(Part::Field(field));
            remaining = &remaining[close + 1..];
        }
        if !remaining.is_empty() {
            parts.push(Part::Literal(remaining.to_owned()));
        }
        // A value is encoded to letters, digits and %XX, so the literal after a placeholder tells
        // where the value ends when it starts with anything else.
        for pair in parts.windows(2) {
            if let [Part::Field(_), next] = pair {
                let separates =
                    matches!(next, Part::Literal(l) if !l.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '%'));
                if !separates {
                    return Err(format!("{EXPECTED}; two placeholders need a separator such as / or &"));
                }
            }
        }
        let stray_brace = parts.iter().any(|p| matches!(p, Part::Literal(l) if l.contains('}')));
        if stray_brace || path.contains("sig=") {
            return Err(EXPECTED.to_owned());
        }
        Ok(UrlTemplate { origin: format!("https://{host}"), has_query: path.contains('?'), parts })
    }

    /// Whether links name their recipient.
    pub fn names_address(&self) -> bool {
        self.parts.contains(&Part::Field(Field::Address))
    }

    /// The signed link for `fields`.
    pub fn expand(&self, fields: &Fields, signer: &Signer) -> String {
        let mut signed = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(literal) => signed.push_str(literal),
                Part::Field(field) => signed.extend(utf8_percent_encode(field.value(fields), NON_ALPHANUMERIC)),
            }
        }
        let separator = if self.has_query { '&' } else { '?' };
        let sig = signer.sign(&signed);
        format!("{}{signed}{separator}sig={sig}", self.origin)
    }

    /// Checks a request's path and query against the template and its signature. `None` for a
    /// link this service did not make (or one altered since).
    pub fn verify(&self, path_and_query: &str, signer: &Signer) -> Option<Fields> {
        let cut = path_and_query.rfind("sig=")?;
        let (signed, sig) = (&path_and_query[..cut.checked_sub(1)?], &path_and_query[cut + 4..]);
        let separator = if self.has_query { '&' } else { '?' };
        if !path_and_query[..cut].ends_with(separator) || !signer.verify(signed, sig) {
            return None;
        }
        self.fields_of(signed)
    }

    fn fields_of(&self, mut signed: &str) -> Option<Fields> {
        let mut fields = Fields::default();
        for (i, part) in self.parts.iter().enumerate() {
            match part {
                Part::Literal(literal) => signed = signed.strip_prefix(literal.as_str())?,
                Part::Field(field) => {
                    let end = match self.parts.get(i + 1) {
                        Some(Part::Literal(next)) => signed.find(next.as_str())?,
                        _ => signed.len(),
                    };
                    let value = percent_decode_str(&signed[..end]).decode_utf8().ok()?.into_owned();
                    match field {
                        Field::Token => fields.token = value,
                        Field::LetterId => fields.letter_id = value,
                        Field::KafkaKey => fields.kafka_key = value,
                        Field::Address => fields.address = Some(value),
                    }
                    signed = &signed[end..];
                }
            }
        }
        signed.is_empty().then_some(fields)
    }
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

    #[test]
    fn links_round_trip_and_alterations_fail() {
        for raw in [
            "https://mail.example.com/unsubscribe?t={token}&l={letter_id}&k={kafka_key}&a={address}",
            "https://mail.example.com:8443/unsubscribe/{letter_id}/{token}/{kafka_key}/{address}",
        ] {
            let template = UrlTemplate::parse(raw).unwrap();
            let url = template.expand(&fields(), &signer());
            let path = url.strip_prefix("https://mail.example.com").unwrap();
            let path = path.strip_prefix(":8443").unwrap_or(path);
            assert_eq!(template.verify(path, &signer()), Some(fields()), "{url}");
            assert!(!url.contains(' ') && !url.contains('@'), "{url}");
            let altered = path.replace("key%2D1", "key%2D2");
            assert_ne!(altered, path);
            assert_eq!(template.verify(&altered, &signer()), None);
            let other = Signer::new(&SecretString::from("another-secret-of-16"));
            assert_eq!(template.verify(path, &other), None);
            assert_eq!(template.verify(&format!("{path}x"), &signer()), None);
        }
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
        ] {
            assert!(UrlTemplate::parse(raw).is_err(), "{raw} accepted");
        }
    }
}
