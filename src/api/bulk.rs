//! Bulk recovery: `POST /v1/subscriptions/redeliver` starts a new delivery series for each of the
//! caller's ended subscriptions that match a state, a time window and optionally a callback host.
//!
//! Each one is redelivered by the same rules as `POST /v1/subscriptions/{id}/redeliver` (the store's
//! redelivery, batched); the new series are handed to the dispatcher due now, where the per-host and
//! per-tenant concurrency caps pace them, as they pace the deliveries of a job with many subscribers.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ApiJson, Problem, Unauthorized};
use crate::domain::{SubscriptionState, Timestamp, truncate};
use crate::store::{BulkFilter, Tenant};

/// The most subscriptions one request takes; `more` in the answer says when others remain.
pub const MAX_BULK_REDELIVER: u32 = 10_000;

/// Which ended subscriptions to deliver again.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRedeliver {
    /// `failed` (recovery once a receiver is fixed) or `delivered` (a replay for a receiver that lost
    /// what it was sent).
    #[schema(example = "failed")]
    pub state: String,
    /// RFC 3339: subscriptions that ended (their `updated_at`) at or after this time.
    #[schema(example = "2026-12-01T08:00:00Z")]
    pub since: String,
    /// RFC 3339: ...and before this time. Default, and at most: the time of the request.
    #[schema(example = "2026-12-01T12:00:00Z")]
    pub until: Option<String>,
    /// Only subscriptions whose callback URL is on this host (any port, any scheme), such as
    /// `hooks.example.com`.
    #[schema(example = "hooks.example.com")]
    pub callback_host: Option<String>,
    /// At most this many (1 to 10,000; default 10,000).
    #[schema(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
}

/// What a bulk redelivery took.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BulkRedelivered {
    /// How many subscriptions started a new delivery series.
    pub redelivered: usize,
    /// More subscriptions match than this request took: send it again (with the same `until`).
    pub more: bool,
}

impl BulkRedeliver {
    /// The store's filter, or a 422 naming what is wrong. `until` is capped at `now`.
    fn filter(self, now: Timestamp) -> Result<BulkFilter, ApiError> {
        let state = match self.state.parse::<SubscriptionState>() {
            Ok(state @ (SubscriptionState::Failed | SubscriptionState::Delivered)) => state,
            _ => {
                return Err(ApiError::Invalid(format!(
                    "state must be failed or delivered, got {:?}",
                    truncate(&self.state, 32)
                )));
            }
        };
        let since = Timestamp::parse_rfc3339(&self.since, "since").map_err(ApiError::Invalid)?;
        let until = match &self.until {
            Some(until) => Timestamp::parse_rfc3339(until, "until").map_err(ApiError::Invalid)?,
            None => now,
        };
        if since >= until {
            return Err(ApiError::Invalid(format!(
                "since ({}) must be before until ({})",
                since.rfc3339(),
                until.rfc3339()
            )));
        }
        let limit = self.limit.unwrap_or(MAX_BULK_REDELIVER);
        if !(1..=MAX_BULK_REDELIVER).contains(&limit) {
            return Err(ApiError::Invalid(format!("limit must be from 1 to {MAX_BULK_REDELIVER}, got {limit}")));
        }
        let callback_host = self.callback_host.as_deref().map(callback_host).transpose()?;
        Ok(BulkFilter { state, since, until: until.min(now), callback_host, limit })
    }
}

/// A host as callback URLs hold it (lower case, IDNA, IPv6 in brackets), or a 422.
fn callback_host(host: &str) -> Result<String, ApiError> {
    let parsed = url::Host::parse(host).ok().filter(|_| !host.is_empty() && host.len() <= 253);
    parsed.map(|h| h.to_string()).ok_or_else(|| {
        ApiError::Invalid(format!(
            "callback_host must be a host name or IP address without scheme, port or path, such as hooks.example.com; got {:?}",
            truncate(host, 64)
        ))
    })
}

/// Deliver again, in bulk: a new delivery series for each of your ended subscriptions that matches.
///
/// For recovery after a receiver's outage: every `failed` subscription (or, for a replay, every
/// `delivered` one) that ended between `since` and `until`, optionally only those whose callback is on
/// `callback_host`, is delivered again as `POST /v1/subscriptions/{id}/redeliver` would: from the first
/// attempt of the retry schedule, under the `webhook-id` it always had. Skipped: subscriptions whose job
/// has no result, and those followed by a newer live or delivered registration of the same job and
/// callback.
/// At most `limit` (10,000) per request, oldest registration first; when `more` is true, send the same
/// request again. The new series start now and are paced by the per-host and per-tenant concurrency
/// caps, so a receiver never gets more attempts at once than those allow.
#[utoipa::path(
    post, path = "/v1/subscriptions/redeliver", tag = "subscriptions", security(("bearer" = [])),
    request_body = BulkRedeliver,
    responses(
        (status = 202, description = "The matching subscriptions started new delivery series", body = BulkRedelivered),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        Unauthorized,
        (status = 422, description = "A field is not valid (state, since, until, callback_host, limit); the detail names it", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store cannot take writes now; batches already taken stay taken, send the request again", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn redeliver_matching(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiJson(body): ApiJson<BulkRedeliver>,
) -> Result<(StatusCode, Json<BulkRedelivered>), ApiError> {
    let now = Timestamp::now();
    let filter = body.filter(now)?;
    let answer = super::to_the_end(async move {
        let dispatcher = state.dispatcher.clone();
        let deliver = move |tasks| dispatcher.deliver(tasks);
        let done = crate::store::redeliver_matching(state.store.as_ref(), tenant.id, &filter, now, deliver).await?;
        tracing::info!(tenant_id = tenant.id, redelivered = done.started, more = done.more, "bulk redelivery");
        Ok(BulkRedelivered { redelivered: done.started, more: done.more })
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(answer)))
}
