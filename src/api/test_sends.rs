//! `POST /v1/test-deliveries`: a signed example delivery sent now, to try a receiver before any job ends.
//!
//! Nothing is stored: the answer carries what the receiver said. The request goes through the same
//! egress policy as every callback (the registration check here, the vetting resolver at connect time)
//! and the same client settings (no redirects, the delivery timeout). Each tenant may send
//! [`SENDS_PER_MINUTE`] a minute (per instance): a test send is an outbound request on the caller's
//! say-so, and must not become a way to flood a third party from our address. Every request takes a
//! token, refused ones too, so probing the egress policy is rate-limited as well.

use std::num::NonZeroU32;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiJson;
use super::error::{NotJson, Unauthorized};
use super::{ApiError, AppState, Problem};
use crate::delivery::envelope::{envelope, event_type};
use crate::delivery::{SendError, signing};
use crate::domain::{CallbackHeaders, CallbackUrl, Payload};
use crate::store::Tenant;

/// How many test sends a tenant may make a minute (a token bucket: a burst of this many, then one every
/// 6 s).
pub const SENDS_PER_MINUTE: u32 = 10;

/// What test sends need beside the shared state: the callback client and each tenant's bucket.
pub struct TestSends {
    http: reqwest::Client,
    /// Keyed by tenant. A `HashMap` under a lock (governor's std store): tenants are few, and each
    /// check holds the lock for a moment.
    limiter: RateLimiter<i64, HashMapStateStore<i64>, DefaultClock>,
}

impl TestSends {
    /// `http` is a client built like the dispatcher's ([`crate::delivery::client::callback_client`]).
    pub fn new(http: reqwest::Client) -> Self {
        let quota = Quota::per_minute(NonZeroU32::new(SENDS_PER_MINUTE).expect("the quota is not zero"));
        TestSends { http, limiter: RateLimiter::hashmap(quota) }
    }

    /// Takes one send from the tenant's bucket, or says in how many seconds the next one is free.
    fn take(&self, tenant_id: i64) -> Result<(), u64> {
        self.limiter.check_key(&tenant_id).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// A test send: where to, and which body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTestDelivery {
    /// An absolute http(s) URL, checked like a subscription's `callback_url`.
    #[schema(example = "https://example.com/webhooks/jobs", max_length = 2048)]
    pub callback_url: String,
    /// `raw` (the default) or `envelope`.
    #[serde(default)]
    pub payload: Payload,
    /// Custom headers to send, checked as a subscription's `headers` are (at most 10; the same names
    /// refused). Their values are not shown in the answer or logged.
    #[schema(value_type = Option<std::collections::HashMap<String, String>>,
        example = json!({"Authorization": "Bearer 5f2b…"}))]
    #[serde(default)]
    pub headers: Option<serde_json::Value>,
}

/// What the receiver did with the test send.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TestDeliveryResult {
    /// The `webhook-id` the request carried (a fresh one: a test send is not any subscription's).
    #[schema(example = "msg_0193b3a4c2e47d0a9f1e2b3c4d5e6f70")]
    pub webhook_id: String,
    /// The body that was signed and sent.
    pub body: serde_json::Value,
    /// The receiver's status code; null when there was no answer (see `error`).
    pub status_code: Option<u16>,
    /// From the start of the request to the end of the answer (at most 16 KiB of it are read), or to
    /// the failure.
    pub duration_ms: u64,
    /// The `Content-Type` of the receiver's answer; null when it sent none or did not answer.
    pub response_content_type: Option<String>,
    /// The first 2 KiB of the receiver's answer (invalid UTF-8 replaced); null when there was no answer.
    pub response_body: Option<String>,
    /// Why there was no answer (a timeout, a refused connection, the egress policy at connect time).
    pub error: Option<String>,
}

/// The example Succeed body: what the upstream answers for a finished job.
fn example_body(job_id: &uuid::Uuid) -> serde_json::Value {
    serde_json::json!({
        "job_id": job_id.to_string(),
        "status": "Succeed",
        "image_urls": [format!("https://images.example.com/{job_id}/0.png")],
    })
}

/// Send a signed example delivery now.
///
/// Signs an example `Succeed` body with your current signing secrets (two signatures during a
/// rotation) and POSTs it to `callback_url` at once, under the same egress policy as deliveries, then
/// answers with what the receiver did: status, duration and the first 2 KiB of its answer, or the
/// error. Nothing is stored and nothing is retried; redirects are not followed. `payload: "envelope"`
/// wraps the body in the Standard Webhooks payload structure. At most 10 sends a minute per API key's
/// tenant (per instance): beyond it, 429 with `Retry-After`.
#[utoipa::path(
    post, path = "/v1/test-deliveries", operation_id = "create_test_delivery", tag = "subscriptions", security(("bearer" = [])),
    request_body = CreateTestDelivery,
    responses(
        (status = 200, description = "Sent (or tried to send): what the receiver answered, or why there was no answer", body = TestDeliveryResult),
        NotJson,
        Unauthorized,
        (status = 422, description = "A field is missing, unknown or invalid; or the callback URL is refused by the egress policy", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "More than 10 test sends in a minute; retry after `Retry-After` seconds", body = Problem, content_type = "application/problem+json",
            headers(("retry-after" = String, description = "Seconds until the next test send is allowed"))),
        (status = 503, description = "DNS cannot look up the callback host now, or the signing secrets cannot be read; retry after `Retry-After` seconds", body = Problem, content_type = "application/problem+json",
            headers(("retry-after" = String, description = "Seconds to wait before trying again"))),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiJson(request): ApiJson<CreateTestDelivery>,
) -> Result<Json<TestDeliveryResult>, ApiError> {
    state.test_sends.take(tenant.id).map_err(|retry_after| ApiError::TooManyRequests { retry_after })?;
    let callback_url: CallbackUrl = request.callback_url.parse().map_err(ApiError::Invalid)?;
    let headers = CallbackHeaders::from_request(request.headers.as_ref()).map_err(ApiError::Invalid)?;
    state.egress.check_registration(&callback_url, &state.lookup).await?;
    let secrets = state.secrets.get(tenant.id).await?;
    let job_id = uuid::Uuid::new_v4();
    let now = time::OffsetDateTime::now_utc();
    let body = match request.payload {
        Payload::Raw => example_body(&job_id),
        Payload::Envelope => {
            let at = crate::domain::Timestamp::now();
            envelope(example_body(&job_id), None, &job_id.to_string(), serde_json::json!({}), at)
        }
    };
    let bytes = serde_json::to_vec(&body).map_err(|_| ApiError::Internal)?;
    let webhook_id = crate::domain::new_webhook_id();
    let timestamp = now.unix_timestamp();
    let signature = signing::signature_header(secrets.iter(), &webhook_id, timestamp, &bytes);
    let url = url::Url::parse(callback_url.as_str()).map_err(|e| ApiError::Invalid(e.to_string()))?;
    // As a delivery does: the custom headers first; none can replace ours.
    let request =
        headers.iter().fold(state.test_sends.http.post(url), |request, (name, value)| request.header(name, value));
    let request = request
        .header("content-type", "application/json")
        .header("webhook-id", &webhook_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .header("jobhook-event-type", event_type(&bytes))
        .body(bytes);
    let clock = Instant::now();
    let (status_code, captured, error) = match request.send().await {
        Ok(mut response) => {
            let status = response.status().as_u16();
            (Some(status), Some(crate::delivery::response::capture(&mut response).await), None)
        }
        Err(e) => (None, None, Some(SendError::from_request(&e).to_string())),
    };
    let (response_content_type, response_body) = match captured {
        Some(c) => (c.content_type, Some(c.body)),
        None => (None, None),
    };
    let duration_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::info!(tenant_id = tenant.id, status_code, duration_ms, "test delivery sent");
    Ok(Json(TestDeliveryResult {
        webhook_id,
        body,
        status_code,
        duration_ms,
        response_content_type,
        response_body,
        error,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eleventh_send_in_a_minute_waits() {
        crate::install_crypto();
        let sends = TestSends::new(reqwest::Client::new());
        for _ in 0..SENDS_PER_MINUTE {
            assert_eq!(sends.take(1), Ok(()));
        }
        let wait = sends.take(1).unwrap_err();
        assert!((1..=6).contains(&wait), "one send frees every 6 s, got {wait}");
        assert_eq!(sends.take(2), Ok(()), "another tenant has a bucket of its own");
    }
}
