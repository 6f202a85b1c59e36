//! DKIM signing with lettre's signer (RSA-SHA256 and Ed25519-SHA256). The key is read once at
//! start-up from `DKIM_PRIVATE_KEY_FILE`, held only inside the signer and never formatted.

use std::{fmt, path::Path};

use base64::Engine as _;
use lettre::message::{
    dkim::{
        DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm, DkimSigningKey, dkim_sign,
    },
    header::HeaderName,
};
use secrecy::{ExposeSecret, SecretString};

use crate::config::DkimSettings;

/// Why the key cannot be used; each names the variable, never the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("DKIM_PRIVATE_KEY_FILE={path}: cannot read the key file: {source}")]
    Unreadable { path: String, source: std::io::Error },
    #[error("DKIM_PRIVATE_KEY_FILE={path}: {why}")]
    Invalid { path: String, why: &'static str },
}

/// The DER prefix of a PKCS#8 Ed25519 private key (RFC 8410): the 32-byte seed follows it.
const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// A configured signer.
pub struct Signing {
    config: DkimConfig,
    domain: String,
    selector: String,
    algorithm: &'static str,
}

impl fmt::Debug for Signing {
    // lettre's key type formats its numbers; this says only what an operator may see.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signing")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Signing {
    pub fn load(settings: &DkimSettings, headers: Vec<HeaderName>) -> Result<Signing, KeyError> {
        let (key, algorithm) = read_key(&settings.key_file)?;
        // relaxed/relaxed: relays that re-fold headers or trim trailing spaces keep it valid.
        let canonicalization =
            DkimCanonicalization { header: DkimCanonicalizationType::Relaxed, body: DkimCanonicalizationType::Relaxed };
        let config =
            DkimConfig::new(settings.selector.clone(), settings.domain.clone(), key, headers, canonicalization);
        tracing::info!(domain = %settings.domain, selector = %settings.selector, algorithm, "DKIM signing enabled");
        Ok(Signing { config, domain: settings.domain.clone(), selector: settings.selector.clone(), algorithm })
    }

    pub fn sign(&self, message: &mut lettre::Message) {
        dkim_sign(message, &self.config);
    }
}

/// Reads a PEM key: PKCS#1 RSA (`BEGIN RSA PRIVATE KEY`) or PKCS#8 RSA or Ed25519 (`BEGIN
/// PRIVATE KEY`, as `openssl genpkey` writes them).
fn read_key(path: &Path) -> Result<(DkimSigningKey, &'static str), KeyError> {
    let shown = path.display().to_string();
    let invalid = |why| KeyError::Invalid { path: shown.clone(), why };
    let pem = SecretString::from(
        std::fs::read_to_string(path).map_err(|source| KeyError::Unreadable { path: shown.clone(), source })?,
    );
    let pem = pem.expose_secret().trim();
    if pem.starts_with("-----BEGIN RSA PRIVATE KEY-----") {
        let key = DkimSigningKey::new(pem, DkimSigningAlgorithm::Rsa)
            .map_err(|_| invalid("not a valid PKCS#1 RSA private key"))?;
        return Ok((key, "rsa-sha256"));
    }
    if !pem.starts_with("-----BEGIN PRIVATE KEY-----") {
        return Err(invalid("expected a PEM private key (BEGIN RSA PRIVATE KEY or BEGIN PRIVATE KEY)"));
    }
    let body: String = pem.lines().filter(|line| !line.starts_with("-----")).collect();
    let der = secrecy::SecretSlice::from(
        base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .map_err(|_| invalid("the PEM body is not base64"))?,
    );
    let der = der.expose_secret();
    if der.len() == ED25519_PKCS8_PREFIX.len() + 32 && der.starts_with(&ED25519_PKCS8_PREFIX) {
        let seed =
            SecretString::from(base64::engine::general_purpose::STANDARD.encode(&der[ED25519_PKCS8_PREFIX.len()..]));
        let key = DkimSigningKey::new(seed.expose_secret(), DkimSigningAlgorithm::Ed25519)
            .map_err(|_| invalid("not a valid Ed25519 private key"))?;
        return Ok((key, "ed25519-sha256"));
    }
    // lettre takes RSA keys as PKCS#1 only.
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::pkcs8::DecodePrivateKey as _;
    let rsa =
        rsa::RsaPrivateKey::from_pkcs8_pem(pem).map_err(|_| invalid("neither an RSA nor an Ed25519 private key"))?;
    let pkcs1 = rsa.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).map_err(|_| invalid("cannot convert the RSA key"))?;
    let key =
        DkimSigningKey::new(&pkcs1, DkimSigningAlgorithm::Rsa).map_err(|_| invalid("not a valid RSA private key"))?;
    Ok((key, "rsa-sha256"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_variable_and_not_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let error = read_key(&missing).unwrap_err().to_string();
        assert!(error.starts_with("DKIM_PRIVATE_KEY_FILE="), "{error}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = read_key(&garbage).unwrap_err().to_string();
        assert!(error.contains("DKIM_PRIVATE_KEY_FILE=") && !error.contains("c2VjcmV0"), "{error}");
    }
}
