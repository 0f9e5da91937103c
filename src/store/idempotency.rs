//! Idempotency keys of `POST /v1/jobs`: the first answer to a request, kept per tenant and key so that
//! a retry gets that answer again instead of creating a second upstream job.
//!
//! A claim is atomic on both backends: of two requests with one key, exactly one gets
//! [`Claimed::New`]; the other sees the first in flight, or its answer once stored.

use crate::domain::Timestamp;

/// How many expired keys a claim deletes on its way (oldest first), so the table drains faster than
/// one claim a request can fill it, without a scan.
pub const PURGE_PER_CLAIM: i64 = 16;

/// A request that wants `key` for itself.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub tenant_id: i64,
    /// As the caller sent it (1–255 visible ASCII characters).
    pub key: String,
    /// SHA-256 of the request, to tell a retry from another request under the same key.
    pub fingerprint: Vec<u8>,
    pub now: Timestamp,
    /// Keys created before this are expired: never answered from, replaced by a new claim.
    pub expired_before: Timestamp,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The key is this request's now: go ahead, then store the answer.
    New,
    /// The same request holds the key and has not answered yet (since `since`).
    InFlight { since: Timestamp },
    /// The same request was answered: this is that answer.
    Done(StoredAnswer),
    /// Another request (another body, path, upstream or callback) holds the key.
    OtherRequest,
}

/// An answer as it was sent: its HTTP status and its body (JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// What a row that was already there means for `claim` (the columns of `idempotency_keys`).
pub(crate) fn found(
    claim: &IdempotencyClaim,
    fingerprint: &[u8],
    created_at: Timestamp,
    status: Option<i64>,
    body: Option<Vec<u8>>,
) -> Claimed {
    if fingerprint != claim.fingerprint.as_slice() {
        return Claimed::OtherRequest;
    }
    match (status.and_then(|s| u16::try_from(s).ok()), body) {
        (Some(status), Some(body)) => Claimed::Done(StoredAnswer { status, body }),
        _ => Claimed::InFlight { since: created_at },
    }
}
