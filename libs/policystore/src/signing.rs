//! Bundle signatures: the control plane signs the exact bytes it publishes
//! with an Ed25519 key; readers apply a bundle only if one of the public
//! keys they trust verifies it.
//!
//! The signature travels in the message's [`SIGNATURE_HEADER`] as
//! `ed25519:<standard base64 of the 64-byte signature>`, over the whole body
//! (the bundle's JSON: version, content, dry-run, everything), and is
//! checked before the body is parsed.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// The header carrying a bundle's signature.
pub const SIGNATURE_HEADER: &str = "Gatehouse-Bundle-Signature";

/// The DER prefix of an Ed25519 `SubjectPublicKeyInfo` (what `openssl pkey
/// -pubout` writes), followed by the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error(
        "{0} does not hold an Ed25519 private key in PKCS#8 (PEM or DER; `openssl genpkey -algorithm ed25519` makes one)"
    )]
    NotPkcs8(String),
    #[error(
        "{0:?} is not an Ed25519 public key: give the base64 of its 32 bytes or of its SubjectPublicKeyInfo (`openssl pkey -pubout` without the PEM lines)"
    )]
    NotPublicKey(String),
}

/// Why a bundle message is not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("it carries no signature ({SIGNATURE_HEADER})")]
    Missing,
    #[error("its signature header is malformed")]
    Malformed,
    #[error("its signature does not verify with any trusted key")]
    Wrong,
    #[error("no bundle public key is configured (policy.bundle_public_keys)")]
    NoTrustedKey,
}

/// The control plane's key. Cloned cheaply; its `Debug` shows only the
/// public key.
#[derive(Clone)]
pub struct SigningKey(Arc<Ed25519KeyPair>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public {})", self.public_key())
    }
}

impl SigningKey {
    /// A new random key and its PKCS#8 (v2, DER) document.
    pub fn generate() -> (SigningKey, Vec<u8>) {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .expect("the system random source works");
        let key = Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("ring reads its own key");
        (SigningKey(Arc::new(key)), doc.as_ref().to_vec())
    }

    /// A key from PKCS#8 bytes, DER or PEM (`-----BEGIN PRIVATE KEY-----`);
    /// `what` names the source in errors.
    pub fn from_pkcs8(bytes: &[u8], what: &str) -> Result<SigningKey, KeyError> {
        let der = match std::str::from_utf8(bytes) {
            Ok(text) if text.contains("-----BEGIN") => {
                pem_body(text, "PRIVATE KEY").ok_or_else(|| KeyError::NotPkcs8(what.to_string()))?
            }
            _ => bytes.to_vec(),
        };
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map(|k| SigningKey(Arc::new(k)))
            .map_err(|_| KeyError::NotPkcs8(what.to_string()))
    }

    pub fn from_file(path: &Path) -> Result<SigningKey, KeyError> {
        let bytes = std::fs::read(path).map_err(|e| KeyError::Read {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Self::from_pkcs8(&bytes, &path.display().to_string())
    }

    pub fn public_key(&self) -> PublicKey {
        let mut key = [0; 32];
        key.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(key)
    }

    /// The header value signing `body`.
    pub fn sign(&self, body: &[u8]) -> String {
        format!("ed25519:{}", STANDARD.encode(self.0.sign(body).as_ref()))
    }
}

/// An Ed25519 public key; displayed as the base64 of its 32 bytes (the form
/// `policy.bundle_public_keys` takes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;

    /// The base64 of the 32 key bytes or of the DER `SubjectPublicKeyInfo`;
    /// PEM lines and whitespace are ignored.
    fn from_str(s: &str) -> Result<PublicKey, KeyError> {
        let text: String = if s.contains("-----BEGIN") {
            pem_body_text(s, "PUBLIC KEY").unwrap_or_default()
        } else {
            s.split_whitespace().collect()
        };
        let bytes = STANDARD
            .decode(text)
            .map_err(|_| KeyError::NotPublicKey(s.to_string()))?;
        let raw = match bytes.len() {
            32 => &bytes[..],
            44 if bytes[..12] == SPKI_PREFIX => &bytes[12..],
            _ => return Err(KeyError::NotPublicKey(s.to_string())),
        };
        let mut key = [0; 32];
        key.copy_from_slice(raw);
        Ok(PublicKey(key))
    }
}

/// The keys a reader accepts bundles from.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<PublicKey>);

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        Self(keys)
    }

    pub fn add(&mut self, key: PublicKey) {
        if !self.0.contains(&key) {
            self.0.push(key);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks `header` (the value of [`SIGNATURE_HEADER`], if any) as a
    /// signature of `body` by one of the keys.
    pub fn verify(&self, body: &[u8], header: Option<&str>) -> Result<(), SignatureError> {
        if self.0.is_empty() {
            return Err(SignatureError::NoTrustedKey);
        }
        let header = header.ok_or(SignatureError::Missing)?;
        let signature = header
            .strip_prefix("ed25519:")
            .and_then(|b| STANDARD.decode(b).ok())
            .filter(|s| s.len() == 64)
            .ok_or(SignatureError::Malformed)?;
        if self.0.iter().any(|k| {
            UnparsedPublicKey::new(&ED25519, k.0)
                .verify(body, &signature)
                .is_ok()
        }) {
            Ok(())
        } else {
            Err(SignatureError::Wrong)
        }
    }
}

/// The DER inside the first PEM block labelled `label`.
fn pem_body(text: &str, label: &str) -> Option<Vec<u8>> {
    STANDARD.decode(pem_body_text(text, label)?).ok()
}

fn pem_body_text(text: &str, label: &str) -> Option<String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    Some(text[start..stop].split_whitespace().collect())
}

/// `der` as a PEM `PRIVATE KEY` document.
pub fn pkcs8_pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusting(key: &SigningKey) -> TrustedKeys {
        TrustedKeys::new(vec![key.public_key()])
    }

    #[test]
    fn a_signature_verifies_only_its_bytes_with_its_key() {
        let (key, _) = SigningKey::generate();
        let (other, _) = SigningKey::generate();
        let body = br#"{"version":3}"#;
        let sig = key.sign(body);
        trusting(&key).verify(body, Some(&sig)).unwrap();
        // Tampered bytes.
        assert_eq!(
            trusting(&key).verify(br#"{"version":4}"#, Some(&sig)),
            Err(SignatureError::Wrong)
        );
        // Signed by a key nobody trusts.
        assert_eq!(
            trusting(&key).verify(body, Some(&other.sign(body))),
            Err(SignatureError::Wrong)
        );
        // No signature, a malformed one, no key to check with.
        assert_eq!(
            trusting(&key).verify(body, None),
            Err(SignatureError::Missing)
        );
        for bad in [
            "",
            "ed25519:",
            "ed25519:!!!",
            "rsa:AAAA",
            &sig[..sig.len() - 4],
        ] {
            assert_eq!(
                trusting(&key).verify(body, Some(bad)),
                Err(SignatureError::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(
            TrustedKeys::default().verify(body, Some(&sig)),
            Err(SignatureError::NoTrustedKey)
        );
        // Any one of several trusted keys will do (a key being rotated).
        let both = TrustedKeys::new(vec![other.public_key(), key.public_key()]);
        both.verify(body, Some(&sig)).unwrap();
    }

    #[test]
    fn keys_read_as_written() {
        let (key, der) = SigningKey::generate();
        let pem = pkcs8_pem(&der);
        for bytes in [der.as_slice(), pem.as_bytes()] {
            let back = SigningKey::from_pkcs8(bytes, "test").unwrap();
            assert_eq!(back.public_key(), key.public_key());
        }
        assert!(matches!(
            SigningKey::from_pkcs8(b"not a key", "k.pem"),
            Err(KeyError::NotPkcs8(what)) if what == "k.pem"
        ));
        // The public key as base64 of its bytes, of its SPKI, and as PEM.
        let public = key.public_key();
        assert_eq!(public.to_string().parse::<PublicKey>().unwrap(), public);
        let mut spki = SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&public.0);
        let spki = STANDARD.encode(&spki);
        assert_eq!(spki.parse::<PublicKey>().unwrap(), public);
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{spki}\n-----END PUBLIC KEY-----\n");
        assert_eq!(pem.parse::<PublicKey>().unwrap(), public);
        assert!("AAAA".parse::<PublicKey>().is_err());
        // A secret never shows in Debug.
        assert_eq!(format!("{key:?}"), format!("SigningKey(public {public})"));
    }
}
