//! The signed VERP return path (`BOUNCE_DOMAIN`, `BOUNCE_SECRET`): each message's envelope sender
//! names its letter, `bounces+<letter id>.<signature>@<bounce domain>`, so a DSN mailed back to it
//! is tied to the letter by the address it arrives at, not by anything in its (forgeable) body.
//!
//! The signature is HMAC-SHA256 over the letter id, truncated to 80 bits and written in lower-case
//! hex: local parts travel case-folded through some MTAs, and the whole local part stays at 53
//! octets, under SMTP's 64. 80 bits is plenty for a tag that can only be tried online, one SMTP
//! command at a time. The key is its own secret rather than `UNSUBSCRIBE_SECRET`: return paths are
//! read by every relay and every receiving MTA, and a key of its own can be rotated (or leaked)
//! without touching the one-click links already in people's inboxes.

use hmac::{Hmac, Mac};
use mongodb::bson::oid::ObjectId;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;

/// Bytes of the HMAC kept in the address.
const TAG_BYTES: usize = 10;
/// Domain separation: the same secret must never sign anything else that could be replayed here.
const CONTEXT: &[u8] = b"mailsender return path v1\0";

/// Makes and checks the return paths of one bounce domain.
pub struct ReturnPath {
    /// The local part before `+`, lower-case.
    local: String,
    /// Lower-case, without a trailing dot.
    domain: String,
    key: SecretBox<Vec<u8>>,
}

/// What an address that is not a valid return path is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("not an address at the bounce domain")]
    OtherDomain,
    #[error("not a return path of the form {0}+<letter id>.<signature>")]
    Shape(String),
    #[error("the return path's signature is wrong")]
    Signature,
}

impl ReturnPath {
    pub fn new(local: &str, domain: &str, secret: &SecretString) -> ReturnPath {
        ReturnPath {
            local: local.to_ascii_lowercase(),
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            key: SecretBox::new(Box::new(secret.expose_secret().as_bytes().to_vec())),
        }
    }

    /// The return paths `BOUNCE_DOMAIN` asks for, if any.
    pub fn from_config(config: &crate::config::FeedbackConfig) -> Option<ReturnPath> {
        let (domain, secret) = (config.bounce_domain.as_ref()?, config.bounce_secret.as_ref()?);
        Some(ReturnPath::new(&config.bounce_local, domain, secret))
    }

    fn mac(&self, letter: &ObjectId) -> Hmac<Sha256> {
        #[allow(clippy::expect_used)]
        let mut mac = Hmac::<Sha256>::new_from_slice(self.key.expose_secret()).expect("HMAC accepts any key length");
        mac.update(CONTEXT);
        mac.update(letter.to_hex().as_bytes());
        mac
    }

    /// The envelope sender of `letter`'s messages.
    pub fn address(&self, letter: &ObjectId) -> String {
        let tag = self.mac(letter).finalize().into_bytes();
        let hex: String = tag[..TAG_BYTES].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}+{}.{hex}@{}", self.local, letter.to_hex(), self.domain)
    }

    /// The letter a return path names, when the address is one we made. The comparison of the
    /// signature takes the same time wherever it differs (`Mac::verify_truncated_left`).
    pub fn verify(&self, address: &str) -> Result<ObjectId, Invalid> {
        let address = address.trim().trim_start_matches('<').trim_end_matches('>');
        let (local, domain) = address.rsplit_once('@').ok_or(Invalid::OtherDomain)?;
        if !domain.trim_end_matches('.').eq_ignore_ascii_case(&self.domain) {
            return Err(Invalid::OtherDomain);
        }
        let shape = || Invalid::Shape(self.local.clone());
        let (prefix, rest) = local.split_once('+').ok_or_else(shape)?;
        if !prefix.eq_ignore_ascii_case(&self.local) {
            return Err(shape());
        }
        let (id, sig) = rest.split_once('.').ok_or_else(shape)?;
        let id = ObjectId::parse_str(id.to_ascii_lowercase()).map_err(|_| shape())?;
        let sig = decode_hex(sig).filter(|s| s.len() == TAG_BYTES).ok_or_else(shape)?;
        self.mac(&id).verify_truncated_left(&sig).map_err(|_| Invalid::Signature)?;
        Ok(id)
    }
}

fn decode_hex(raw: &str) -> Option<Vec<u8>> {
    if !raw.len().is_multiple_of(2) || !raw.is_ascii() {
        return None;
    }
    (0..raw.len()).step_by(2).map(|i| u8::from_str_radix(&raw[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> ReturnPath {
        ReturnPath::new("bounces", "Bounce.Example.com.", &SecretString::from("a-bounce-secret-of-32-characters"))
    }

    #[test]
    fn return_paths_round_trip_case_folded_and_fit_a_local_part() {
        let id = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let address = paths().address(&id);
        assert!(address.starts_with("bounces+65a1b2c3d4e5f60718293a4b."), "{address}");
        assert!(address.ends_with("@bounce.example.com"), "{address}");
        assert!(address.split('@').next().unwrap().len() <= 64);
        assert_eq!(paths().verify(&address), Ok(id));
        assert_eq!(paths().verify(&format!("<{}>", address.to_uppercase())), Ok(id), "MTAs may fold case");
        assert_eq!(paths().address(&id), address, "deterministic: every attempt of a letter has one return path");
    }

    #[test]
    fn forged_or_altered_return_paths_are_refused() {
        let id = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let other = ObjectId::parse_str("65a1b2c3d4e5f60718293a4c").unwrap();
        let address = paths().address(&id);
        let sig = address.split(['.', '@']).nth(1).unwrap();
        let swapped = format!("bounces+{}.{sig}@bounce.example.com", other.to_hex());
        assert_eq!(paths().verify(&swapped), Err(Invalid::Signature), "a signature of another letter");
        let first = if sig.starts_with('0') { '1' } else { '0' };
        let flipped = format!("bounces+{}.{first}{}@bounce.example.com", id.to_hex(), &sig[1..]);
        assert_eq!(paths().verify(&flipped), Err(Invalid::Signature));
        let rekeyed =
            ReturnPath::new("bounces", "bounce.example.com", &SecretString::from("another-secret-another-secret"));
        assert_eq!(rekeyed.verify(&address), Err(Invalid::Signature));
        assert_eq!(paths().verify(&address.replace("bounce.example.com", "example.org")), Err(Invalid::OtherDomain));
        for shape in [
            "postmaster@bounce.example.com",
            "bounces@bounce.example.com",
            "bounces+65a1b2c3d4e5f60718293a4b@bounce.example.com",
            "bounces+nothex.00112233445566778899@bounce.example.com",
            "bounces+65a1b2c3d4e5f60718293a4b.0011@bounce.example.com",
            "other+65a1b2c3d4e5f60718293a4b.00112233445566778899@bounce.example.com",
            "bounces+65a1b2c3d4e5f60718293a4b.zz112233445566778899@bounce.example.com",
        ] {
            assert!(matches!(paths().verify(shape), Err(Invalid::Shape(_))), "{shape}");
        }
    }
}
