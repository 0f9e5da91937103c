//! Console sessions and CSRF tokens, kept in no server memory so that every instance sharing a database
//! accepts them.
//!
//! A session is a signed token in an HttpOnly, SameSite=Strict cookie: an expiry and the SHA-256 of the
//! API key it was opened with, MACed with a key from [`crate::store::Store::meta_secret`]. Each request
//! looks the key hash up again, so a revoked key ends its sessions at once; a token cannot be forged or
//! stretched without the server key. Signing out clears the cookie; a copy of the token taken before
//! that stays valid until its expiry unless the key is revoked (there is no server-side list to strike
//! it from: the price of needing no session table).
//!
//! CSRF: each form carries a token derived from the cookie it is bound to (the session, or before
//! sign-in a random nonce), MACed with the same key; a POST whose token does not match is refused.
//! SameSite=Strict and the Origin check in [`super::same_origin`] are further walls, not the only one.

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::Timestamp;
use crate::keys::KeyHash;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "jobhook_session";
/// Before sign-in: the nonce the sign-in form's CSRF token is bound to.
pub const LOGIN_COOKIE: &str = "jobhook_signin";
/// How long a session lasts after sign-in.
pub const SESSION_FOR: std::time::Duration = std::time::Duration::from_secs(8 * 3600);

const VERSION: u8 = 1;
/// version, expiry (8 bytes, big-endian ms), key hash (32), MAC (32).
const TOKEN_LEN: usize = 1 + 8 + 32 + 32;

/// The server key behind sessions and CSRF tokens.
#[derive(Clone)]
pub struct Keys(std::sync::Arc<Vec<u8>>);

impl Keys {
    pub fn new(secret: Vec<u8>) -> Self {
        Keys(std::sync::Arc::new(secret))
    }

    fn mac(&self, purpose: &[u8], data: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(purpose);
        mac.update(data);
        mac
    }

    /// A session token for this key hash, valid until `expires`.
    pub fn issue(&self, key: KeyHash, expires: Timestamp) -> String {
        let mut raw = Vec::with_capacity(TOKEN_LEN);
        raw.push(VERSION);
        raw.extend_from_slice(&expires.as_millis().to_be_bytes());
        raw.extend_from_slice(&key.0);
        let tag = self.mac(b"jobhook console session v1:", &raw).finalize().into_bytes();
        raw.extend_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The key hash a token carries, if the token is ours and has not expired at `now`.
    pub fn verify(&self, token: &str, now: Timestamp) -> Option<KeyHash> {
        let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        if raw.len() != TOKEN_LEN || raw[0] != VERSION {
            return None;
        }
        let (body, tag) = raw.split_at(TOKEN_LEN - 32);
        // Constant-time comparison of the tag.
        self.mac(b"jobhook console session v1:", body).verify_slice(tag).ok()?;
        let expires = Timestamp::from_millis(i64::from_be_bytes(body[1..9].try_into().ok()?));
        if expires <= now {
            return None;
        }
        Some(KeyHash(body[9..41].try_into().ok()?))
    }

    /// The CSRF token of forms bound to this cookie value.
    pub fn csrf(&self, bound_to: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(b"jobhook console csrf v1:", bound_to.as_bytes()).finalize().into_bytes())
    }

    /// Whether `token` is the CSRF token for this cookie value (compared in constant time).
    pub fn check_csrf(&self, bound_to: &str, token: &str) -> bool {
        let Ok(tag) = URL_SAFE_NO_PAD.decode(token) else { return false };
        self.mac(b"jobhook console csrf v1:", bound_to.as_bytes()).verify_slice(&tag).is_ok()
    }
}

/// A random value for the sign-in form's cookie.
pub fn nonce() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

/// The value of a cookie in the request, if sent.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the browser reached us over TLS. jobhook itself listens on plain HTTP, so TLS means a proxy
/// in front that says so; the header can only add the Secure flag, never remove a protection.
pub fn over_tls(headers: &HeaderMap) -> bool {
    let forwarded_proto = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok());
    let forwarded = headers.get(header::FORWARDED).and_then(|v| v.to_str().ok());
    forwarded_proto.is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
        || forwarded.is_some_and(|f| f.to_ascii_lowercase().contains("proto=https"))
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, scoped to the console; Secure over TLS.
/// `max_age` 0 clears the cookie.
pub fn set_cookie(name: &str, value: &str, max_age: std::time::Duration, tls: bool) -> HeaderValue {
    let secure = if tls { "; Secure" } else { "" };
    let cookie =
        format!("{name}={value}; Path=/console; Max-Age={}; HttpOnly; SameSite=Strict{secure}", max_age.as_secs());
    HeaderValue::from_str(&cookie).expect("cookie values are base64url")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_token_round_trips_until_it_expires() {
        let keys = Keys::new(b"server key".to_vec());
        let key = KeyHash::of("some api key");
        let token = keys.issue(key, Timestamp::from_millis(1_000));
        assert_eq!(keys.verify(&token, Timestamp::from_millis(999)), Some(key));
        assert_eq!(keys.verify(&token, Timestamp::from_millis(1_000)), None, "expired");
    }

    #[test]
    fn a_forged_or_altered_token_is_refused() {
        let keys = Keys::new(b"server key".to_vec());
        let token = keys.issue(KeyHash::of("k"), Timestamp::from_millis(10_000));
        assert_eq!(Keys::new(b"another".to_vec()).verify(&token, Timestamp::from_millis(0)), None);
        let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        raw[3] ^= 1; // a later expiry
        assert_eq!(keys.verify(&URL_SAFE_NO_PAD.encode(raw), Timestamp::from_millis(0)), None);
        assert_eq!(keys.verify("garbage", Timestamp::from_millis(0)), None);
    }

    #[test]
    fn a_csrf_token_is_bound_to_its_cookie() {
        let keys = Keys::new(b"server key".to_vec());
        let token = keys.csrf("session-a");
        assert!(keys.check_csrf("session-a", &token));
        assert!(!keys.check_csrf("session-b", &token));
        assert!(!keys.check_csrf("session-a", ""));
    }

    #[test]
    fn cookies_are_read_by_name() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; jobhook_session=tok; b=2"));
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("tok"));
        assert_eq!(cookie(&headers, "c"), None);
    }
}
