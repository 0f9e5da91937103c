//! Standard Webhooks signatures: `v1,<base64 HMAC-SHA256(secret bytes, "{id}.{timestamp}.{body}")>`.
//!
//! Pure functions of their inputs, so they are tested with fixed vectors; the integration tests verify
//! what we send with the official `standardwebhooks` crate, independently of this code.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::keys::SigningSecret;

/// The value of one `webhook-signature` entry for this message, secret and timestamp (Unix seconds).
pub fn sign(secret: &SigningSecret, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.bytes()).expect("HMAC takes a key of any length");
    mac.update(webhook_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The `webhook-signature` header: one signature per secret, space-separated (several while a secret is
/// being rotated; receivers accept the message if any one matches).
pub fn signature_header<'a>(
    secrets: impl IntoIterator<Item = &'a SigningSecret>,
    webhook_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets.into_iter().map(|secret| sign(secret, webhook_id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from the Standard Webhooks specification's reference libraries.
    #[test]
    fn signing_matches_the_standard_webhooks_reference_vector() {
        let secret: SigningSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse().unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn the_header_carries_one_signature_per_secret() {
        let a = SigningSecret::generate();
        let b = SigningSecret::generate();
        let header = signature_header([&a, &b], "msg_1", 1, b"{}");
        let parts: Vec<_> = header.split(' ').collect();
        assert_eq!(parts, vec![sign(&a, "msg_1", 1, b"{}"), sign(&b, "msg_1", 1, b"{}")]);
    }
}
