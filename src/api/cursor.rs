//! The cursors of `GET /v1/subscriptions`: opaque to callers, and an altered or forged one is refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::ApiError;
use crate::domain::SubscriptionId;

/// A cursor is the last ID of the page and a MAC over it (16 bytes of HMAC-SHA256 with a key kept in
/// the store), base64url: opaque to callers, and an altered or forged one is refused.
pub(super) fn encode_cursor(key: &[u8], id: SubscriptionId) -> String {
    let mut raw = id.0.as_bytes().to_vec();
    raw.extend_from_slice(&cursor_mac(key, id.0.as_bytes()).finalize().into_bytes()[..16]);
    URL_SAFE_NO_PAD.encode(raw)
}

fn cursor_mac(key: &[u8], id: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(b"jobhook cursor v1:");
    mac.update(id);
    mac
}

pub(super) fn decode_cursor(key: &[u8], raw: &str) -> Result<SubscriptionId, ApiError> {
    let bad = || {
        ApiError::BadRequest(
            "cursor is not one this API issued; pass next_cursor from the previous page unchanged".into(),
        )
    };
    let decoded = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?;
    if decoded.len() != 32 {
        return Err(bad());
    }
    let (id, tag) = decoded.split_at(16);
    // Constant-time comparison of the tag.
    cursor_mac(key, id).verify_truncated_left(tag).map_err(|_| bad())?;
    Ok(SubscriptionId(uuid::Uuid::from_slice(id).map_err(|_| bad())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_a_forged_one_is_refused() {
        let (key, id) = (b"key".as_slice(), SubscriptionId::new());
        let cursor = encode_cursor(key, id);
        assert_eq!(decode_cursor(key, &cursor).unwrap(), id);
        assert!(decode_cursor(key, "not-a-cursor").is_err());
        assert!(decode_cursor(b"another key", &cursor).is_err());
        let mut raw = URL_SAFE_NO_PAD.decode(&cursor).unwrap();
        raw[3] ^= 1;
        assert!(decode_cursor(key, &URL_SAFE_NO_PAD.encode(raw)).is_err(), "an altered ID is refused");
    }
}
