//! The Bearer-key extractor: a handler that takes a [`Tenant`] answers 401 to anyone without a key.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::keys::KeyHash;
use crate::store::Tenant;

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or(ApiError::Unauthorized("send your API key in an Authorization: Bearer <key> header"))?;
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
        match state.store.tenant_by_key(KeyHash::of(key.trim())).await? {
            Some(tenant) => Ok(tenant),
            None => Err(ApiError::Unauthorized("this API key is not valid (unknown or revoked)")),
        }
    }
}
