//! API keys and signing secrets: how they are made, shown, stored and kept out of logs.
//!
//! An API key is only ever stored as its SHA-256 hash. Keys are 32 random bytes, so a fast hash is
//! enough (the same reasoning as GitHub's and Stripe's tokens): there is nothing to brute-force. A key is
//! looked up by its hash, so comparing it never touches the key itself in variable time.
//!
//! Neither type prints its value through `Debug`; the key and the secret are shown once, on purpose,
//! through [`ApiKey::expose`] and [`SigningSecret::expose`].

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

/// The shortest API key we accept from configuration: shorter ones are guessable.
pub const MIN_CONFIGURED_KEY_LEN: usize = 16;

/// A Bearer key: ours (for the API) or the upstream's.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// A new random key, `jh_` + 43 URL-safe characters (32 random bytes).
    pub fn generate() -> Self {
        ApiKey(format!("jh_{}", URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())))
    }

    /// A key given by the operator for our own API: long enough to resist guessing, and fit for an
    /// `Authorization` header. The message never quotes the key.
    pub fn new_configured(key: &str) -> Result<Self, String> {
        if key.len() < MIN_CONFIGURED_KEY_LEN {
            return Err(format!("each key must be at least {MIN_CONFIGURED_KEY_LEN} characters long"));
        }
        Self::new_upstream(key)
    }

    /// The key jobhook sends to the upstream: the upstream sets its rules, so only what fits in an
    /// `Authorization` header is required.
    pub fn new_upstream(key: &str) -> Result<Self, String> {
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the key may contain only visible ASCII characters (no spaces)".into());
        }
        Ok(ApiKey(key.to_owned()))
    }

    /// A whole header value for the upstream (`Bearer …`), already checked to be a valid one.
    pub fn new_upstream_header(value: &str) -> Self {
        ApiKey(value.to_owned())
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.0)
    }

    /// The key itself: for an `Authorization` header, or to show once to whoever created it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// SHA-256 of an API key: what the store keeps and looks keys up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(presented: &str) -> Self {
        KeyHash(Sha256::digest(presented.as_bytes()).into())
    }
}

/// A Standard Webhooks signing secret: `whsec_` + base64 of its bytes. The HMAC key is the decoded bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl SigningSecret {
    /// The fewest bytes a secret may have (Standard Webhooks asks for 24 to 64).
    pub const MIN_BYTES: usize = 24;

    pub fn generate() -> Self {
        SigningSecret(rand::random::<[u8; 32]>().to_vec())
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The `whsec_…` form: to store it, or to show it to its tenant.
    pub fn expose(&self) -> String {
        format!("whsec_{}", STANDARD.encode(&self.0))
    }
}

impl FromStr for SigningSecret {
    type Err = String;

    /// Parses `whsec_<base64>`. The message never quotes the secret.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b64 = s
            .strip_prefix("whsec_")
            .ok_or("a signing secret starts with whsec_ followed by base64 (generate one with: echo whsec_$(head -c 32 /dev/urandom | base64))")?;
        let bytes = STANDARD.decode(b64).map_err(|_| "the part after whsec_ is not valid base64")?;
        if bytes.len() < Self::MIN_BYTES {
            return Err(format!(
                "a signing secret must decode to at least {} bytes, this one has {}",
                Self::MIN_BYTES,
                bytes.len()
            ));
        }
        Ok(SigningSecret(bytes))
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_secret_round_trips_through_its_whsec_form() {
        let secret = SigningSecret::generate();
        assert!(secret.expose().starts_with("whsec_"));
        assert_eq!(secret.expose().parse::<SigningSecret>().unwrap(), secret);
    }

    #[test]
    fn short_or_malformed_secrets_are_refused() {
        assert!("whsec_c2hvcnQ=".parse::<SigningSecret>().unwrap_err().contains("at least 24"));
        assert!("not-a-secret".parse::<SigningSecret>().is_err());
        assert!("whsec_***".parse::<SigningSecret>().is_err());
    }

    #[test]
    fn debug_output_never_shows_a_key_or_a_secret() {
        let key = ApiKey::generate();
        let secret = SigningSecret::generate();
        assert!(!format!("{key:?}").contains(key.expose()));
        assert!(!format!("{secret:?}").contains(&secret.expose()[6..]));
    }

    #[test]
    fn generated_keys_differ_and_hash_stably() {
        let (a, b) = (ApiKey::generate(), ApiKey::generate());
        assert_ne!(a, b);
        assert_eq!(a.hash(), KeyHash::of(a.expose()));
        assert_ne!(a.hash(), b.hash());
    }
}
