//! The Bearer-key extractor: a handler that takes a [`Tenant`] answers 401 to anyone without a key.

use std::sync::Mutex;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::keys::KeyHash;
use crate::recent::Expiring;
use crate::store::Tenant;

/// The presented Bearer key, hashed.
pub struct BearerKey(pub KeyHash);

/// A Bearer key for a handler that checks it again inside its own write (registration). A key seen
/// valid before passes without a read; the write refuses it if it has been revoked since (and it is
/// forgotten then). A key never seen valid is checked first, so a caller without a key learns nothing
/// and makes us do nothing (no validation, no DNS lookup) before its 401.
pub struct RegisteringKey(pub KeyHash);

/// Key hashes seen valid in the last [`KNOWN_KEY_FOR`]. Only keys the store has just confirmed are
/// inserted, and expired ones are pruned, so it holds at most the tenants active in two such spans.
pub struct KnownKeys(Mutex<Expiring<KeyHash, ()>>);

/// How long a key seen valid skips the first read. A key revoked meanwhile still cannot register (the
/// write checks it); for at most this long it may get validation answers instead of a 401.
const KNOWN_KEY_FOR: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for KnownKeys {
    fn default() -> Self {
        KnownKeys(Mutex::new(Expiring::new(KNOWN_KEY_FOR)))
    }
}

impl KnownKeys {
    fn contains(&self, key: &KeyHash) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(key).is_some()
    }

    fn insert(&self, key: KeyHash) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key, ());
    }

    pub fn forget(&self, key: &KeyHash) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

impl FromRequestParts<AppState> for RegisteringKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let BearerKey(key) = BearerKey::from_request_parts(parts, state).await?;
        if !state.known_keys.contains(&key) {
            state.store.tenant_by_key(key).await?.ok_or(UNKNOWN_KEY)?;
            state.known_keys.insert(key);
        }
        Ok(RegisteringKey(key))
    }
}

/// What every route answers for a key that is not usable.
pub const UNKNOWN_KEY: ApiError = ApiError::Unauthorized("this API key is not valid (unknown or revoked)");

impl<S: Send + Sync> FromRequestParts<S> for BearerKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
        let value = values
            .next()
            .ok_or(ApiError::Unauthorized("send your API key in an Authorization: Bearer <key> header"))?;
        // Two keys are a confused client (or a proxy adding its own): neither is taken.
        if values.next().is_some() {
            return Err(ApiError::BadRequest(
                "several Authorization headers: send one Authorization header, with your key".into(),
            ));
        }
        let value =
            value.to_str().map_err(|_| ApiError::Unauthorized("the Authorization header is not readable text"))?;
        let (scheme, key) = value
            .trim()
            .split_once(' ')
            .ok_or(ApiError::Unauthorized("the Authorization header must be: Bearer <key>"))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::Unauthorized("the Authorization header must be: Bearer <key>"));
        }
        // Looked up by hash: the presented key is never compared byte by byte with a stored one.
        Ok(BearerKey(KeyHash::of(key.trim())))
    }
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let BearerKey(key) = BearerKey::from_request_parts(parts, state).await?;
        state.store.tenant_by_key(key).await?.ok_or(UNKNOWN_KEY)
    }
}
