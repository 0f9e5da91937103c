//! `/v1/subscriptions`: register a job with a callback, read it, list, cancel, and read its deliveries.

use axum::Json;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::cursor::{decode_cursor, encode_cursor};
use super::error::{
    ApiError, ApiJson, BodyTooLarge, BodyTooSlow, NotJson, Problem, RegistrationUnavailable, StoreUnavailable,
    Unauthorized,
};
use crate::domain::{
    CallbackHeaders, CallbackUrl, FailureReason, JobId, JobStatus, Payload, SubscriptionId, SubscriptionState,
    Timestamp, metadata_from_request, truncate,
};
use crate::store::{
    AttemptRecord, Cancel, DeliveryForm, ListFilter, Redelivery, Registered, Registration, RetryNow, Subscription,
    Tenant, TenantSub,
};

/// A registration: which upstream job to watch, and where to POST its result.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    /// The upstream job ID: a UUID for the built-in `aetherforge` profile, else in the format the
    /// profile's `job_id` sets.
    #[schema(example = "3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11")]
    pub job_id: String,
    /// The upstream profile that runs the job (the `name` of an `[[upstream]]` table); default
    /// `aetherforge`, or the only `[[upstream]]` profile when the config file has exactly one.
    #[schema(example = "aetherforge")]
    #[serde(default)]
    pub upstream: Option<String>,
    /// An absolute http(s) URL, at most 2,048 bytes; by default it must resolve to a public address.
    #[schema(example = "https://example.com/webhooks/jobs", max_length = 2048)]
    pub callback_url: String,
    /// Custom headers sent with every delivery attempt (and every redelivery), such as an
    /// `Authorization` for a receiver behind a gateway: at most 10; names are HTTP tokens, compared
    /// without case; values at most 1 KiB of visible ASCII. `Host`, `Content-Length`, `Content-Type`,
    /// `Transfer-Encoding`, `Connection` and names starting with `webhook-` or `jobhook-` are refused.
    /// The values are kept as secrets: the API shows the names only (`header_names`).
    #[schema(value_type = Option<std::collections::HashMap<String, String>>,
        example = json!({"Authorization": "Bearer 5f2b…", "X-Tenant": "7"}))]
    #[serde(default)]
    pub headers: Option<serde_json::Value>,
    /// `raw` (the default): the upstream's final body, byte for byte; or `envelope`: that body as `data`
    /// in the Standard Webhooks payload structure `{"type", "timestamp", "data", "subscription"}`.
    #[serde(default)]
    pub payload: Payload,
    /// Any JSON object of yours (at most 4 KiB serialised): stored, returned, and carried in the
    /// envelope's `subscription.metadata`.
    #[schema(value_type = Option<Object>, example = json!({"order_id": "A-1042"}))]
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// A subscription: one job, one callback.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionView {
    #[schema(format = Uuid)]
    pub id: String,
    /// The upstream's own job ID.
    pub job_id: String,
    /// The upstream profile the job belongs to.
    #[schema(example = "aetherforge")]
    pub upstream: String,
    pub callback_url: String,
    pub state: SubscriptionState,
    /// The last status seen upstream; null before the first answer.
    pub job_status: Option<JobStatus>,
    /// Why the subscription ended without a delivery (state `failed`).
    pub failure_reason: Option<FailureReason>,
    /// The last error seen while polling the upstream, if the last poll failed.
    pub last_error: Option<String>,
    /// What went wrong with the last delivery attempt, if it failed (an error such as a timeout, or
    /// "the receiver answered 500"); null before the first attempt and once one succeeded. Every
    /// attempt is listed at `GET /v1/subscriptions/{id}/deliveries`.
    pub last_delivery_error: Option<String>,
    /// The `webhook-id` of the delivery, once the job has ended.
    pub webhook_id: Option<String>,
    /// Delivery attempts made in the current series: a redelivery starts a new series from 0. `GET /v1/subscriptions/{id}/deliveries` lists the attempts of every series.
    pub attempts: u32,
    /// When the next delivery attempt is due, while one is waiting.
    #[schema(format = DateTime)]
    pub next_attempt_at: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// The names of the custom headers sent with each delivery (lower case, sorted); the values are
    /// never shown.
    #[schema(example = json!(["authorization", "x-tenant"]))]
    pub header_names: Vec<String>,
    /// The body's form: `raw` or `envelope`.
    pub payload: Payload,
    /// The metadata given at registration (`{}` when none).
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}

impl From<Subscription> for SubscriptionView {
    fn from(s: Subscription) -> Self {
        SubscriptionView {
            id: s.id.to_string(),
            job_id: s.job_id.id().to_owned(),
            upstream: s.job_id.upstream().to_owned(),
            callback_url: s.callback_url,
            state: s.state,
            job_status: s.job_status,
            failure_reason: s.failure_reason,
            last_error: s.last_error,
            last_delivery_error: s.last_delivery_error,
            webhook_id: s.webhook_id,
            attempts: s.attempts,
            next_attempt_at: s.next_attempt_at.map(Timestamp::rfc3339),
            created_at: s.created_at.rfc3339(),
            updated_at: s.updated_at.rfc3339(),
            header_names: s.header_names,
            payload: s.payload,
            metadata: s.metadata.as_deref().and_then(|m| serde_json::from_str(m).ok()).unwrap_or_else(|| json!({})),
        }
    }
}

/// A page of subscriptions, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscriptionPage {
    pub items: Vec<SubscriptionView>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only subscriptions to this job (of `upstream`, or of the default profile).
    #[param(value_type = Option<String>)]
    pub job_id: Option<String>,
    /// The profile `job_id` belongs to (default: the profile registrations default to).
    #[param(value_type = Option<String>)]
    pub upstream: Option<String>,
    /// Only subscriptions in this state.
    #[param(value_type = Option<SubscriptionState>)]
    pub state: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One delivery attempt.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryAttemptView {
    /// The delivery series: 1, then one more per redelivery.
    pub series: u32,
    /// The attempt's number within its series.
    pub attempt: u32,
    pub webhook_id: String,
    #[schema(format = DateTime)]
    pub started_at: String,
    /// The receiver's HTTP status, if it answered.
    pub status_code: Option<u16>,
    /// What went wrong, when the request failed before or instead of an answer.
    pub error: Option<String>,
    pub duration_ms: u64,
    /// The `Content-Type` of the receiver's answer; null when it sent none or did not answer.
    #[schema(example = "application/json")]
    pub response_content_type: Option<String>,
    /// The first 2 KiB of the receiver's answer (invalid UTF-8 replaced); null when it did not answer.
    /// Nothing more of the answer is kept.
    #[schema(example = "{\"error\":\"database is down\"}", max_length = 2048)]
    pub response_body: Option<String>,
}

impl From<AttemptRecord> for DeliveryAttemptView {
    fn from(a: AttemptRecord) -> Self {
        DeliveryAttemptView {
            series: a.series,
            attempt: a.attempt,
            webhook_id: a.webhook_id,
            started_at: a.started_at.rfc3339(),
            status_code: a.status_code,
            error: a.error,
            duration_ms: a.duration_ms,
            response_content_type: a.response_content_type,
            response_body: a.response_body,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryAttempts {
    /// Oldest first.
    pub items: Vec<DeliveryAttemptView>,
}

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

fn not_found(raw: &str) -> ApiError {
    ApiError::NotFound(format!("there is no subscription {:?}", truncate(raw, 64)))
}

super::error::problem_responses! {
    /// The 404 of the routes on one subscription.
    NoSuchSubscription = 404, "No such subscription for this API key";
}

/// The caller and the `{id}` of a route on one subscription: the API key is checked first (401), then
/// the ID is parsed (404, also for a path that is not UTF-8). The ID is kept as written for the 404.
pub struct TenantSubscription {
    tenant: Tenant,
    id: SubscriptionId,
    raw: String,
}

impl TenantSubscription {
    /// A tenant and an ID already known (the web console calls these handlers directly).
    pub(crate) fn new(tenant: Tenant, id: SubscriptionId) -> Self {
        TenantSubscription { tenant, id, raw: id.to_string() }
    }

    /// The subscription as the store looks it up: scoped to the caller.
    fn key(&self) -> TenantSub {
        TenantSub { tenant_id: self.tenant.id, id: self.id }
    }
}

impl FromRequestParts<AppState> for TenantSubscription {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let tenant = Tenant::from_request_parts(parts, state).await?;
        let Ok(Path(raw)) = Path::<String>::from_request_parts(parts, state).await else {
            return Err(ApiError::NotFound("there is no such subscription".into()));
        };
        let id = raw.parse().map_err(|_| not_found(&raw))?;
        Ok(TenantSubscription { tenant, id, raw })
    }
}

/// Register a job and a callback.
///
/// jobhook polls the job until it is Succeed or Failed, then POSTs the final job-status body to the
/// callback, signed (Standard Webhooks), with the custom `headers` given here. The same job, callback
/// and headers again from the same tenant answers 200 with the existing subscription; the same job and
/// callback with other headers, 409.
#[utoipa::path(
    post, path = "/v1/subscriptions", tag = "subscriptions", security(("bearer" = [])),
    request_body = CreateSubscription,
    responses(
        (status = 201, description = "Registered and durably stored", body = SubscriptionView,
            headers(("location" = String, description = "The subscription's URL"))),
        (status = 200, description = "Already registered with the same headers: the existing subscription", body = SubscriptionView),
        NotJson,
        Unauthorized,
        BodyTooSlow,
        BodyTooLarge,
        (status = 409, description = "The same job and callback are already registered (polling, delivering or delivered) with other custom headers; the detail names that subscription", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is missing, unknown or invalid (the detail names the field, or the header: never a header value); or the callback URL is refused by the egress policy", body = Problem, content_type = "application/problem+json"),
        RegistrationUnavailable,
    )
)]
pub async fn create(
    State(state): State<AppState>,
    super::auth::RegisteringKey(key): super::auth::RegisteringKey,
    ApiJson(body): ApiJson<CreateSubscription>,
) -> Result<Response, ApiError> {
    let job_id = state.job_ids.parse(body.upstream.as_deref(), &body.job_id).map_err(ApiError::Invalid)?;
    let (callback_url, form) =
        checked_callback(&state, &body.callback_url, body.headers.as_ref(), body.payload, body.metadata.as_ref())
            .await?;
    let (status, sub) = super::to_the_end(register(state, key, job_id, callback_url, form)).await?;
    // Per-job events are debug: at thousands of jobs a second, info would be mostly log.
    tracing::debug!(subscription_id = %sub.id, job_id = %sub.job_id, created = status == StatusCode::CREATED, "registered");
    let location = format!("/v1/subscriptions/{}", sub.id);
    Ok((status, [(header::LOCATION, location)], Json(SubscriptionView::from(sub))).into_response())
}

/// A registration's callback URL and delivery form, checked: the egress policy last, as it may look the
/// host up.
pub(crate) async fn checked_callback(
    state: &AppState,
    callback_url: &str,
    headers: Option<&serde_json::Value>,
    payload: Payload,
    metadata: Option<&serde_json::Value>,
) -> Result<(CallbackUrl, DeliveryForm), ApiError> {
    let callback_url: CallbackUrl = callback_url.parse().map_err(ApiError::Invalid)?;
    let form = DeliveryForm {
        headers: CallbackHeaders::from_request(headers).map_err(ApiError::Invalid)?,
        payload,
        metadata: metadata_from_request(metadata).map_err(ApiError::Invalid)?,
    };
    state.egress.check_registration(&callback_url, &state.lookup).await?;
    Ok((callback_url, form))
}

/// Stores the registration, then hands the job to the poller or its result to the dispatcher.
pub(crate) async fn register(
    state: AppState,
    key: crate::keys::KeyHash,
    job_id: JobId,
    callback_url: CallbackUrl,
    form: DeliveryForm,
) -> Result<(StatusCode, Subscription), ApiError> {
    let registration =
        Registration { key, id: SubscriptionId::new(), job_id, callback_url, form, now: Timestamp::now() };
    let registered = state.store.register(registration).await?;
    let (status, sub) = match registered {
        Registered::CreatedPolling(sub, job) => {
            state.poller.ensure(job);
            (StatusCode::CREATED, sub)
        }
        Registered::CreatedDelivering(sub, task) => {
            state.dispatcher.deliver(vec![task]);
            (StatusCode::CREATED, sub)
        }
        Registered::Existing(sub) => {
            // Harmless when the job is already scheduled (the poller ignores a known job), and a repair
            // if it was not.
            if sub.state == SubscriptionState::Polling
                && let Some(job) = state.store.pollable_job(sub.job_id.clone()).await?
            {
                state.poller.ensure(job);
            }
            (StatusCode::OK, sub)
        }
        Registered::HeadersDiffer { id, state } => return Err(headers_differ(id, state)),
        Registered::UnknownKey => {
            state.known_keys.forget(&key);
            return Err(super::auth::UNKNOWN_KEY);
        }
    };
    if status == StatusCode::CREATED {
        state.metrics.registered.inc();
    }
    Ok((status, sub))
}

/// The 409 of a registration whose job and callback are registered with other custom headers. It names
/// the subscription, never a header value.
fn headers_differ(id: SubscriptionId, state: SubscriptionState) -> ApiError {
    let way_out = match state {
        SubscriptionState::Delivered => {
            "it has been delivered, and stays the one subscription of this job and callback; \
             use another callback_url for other headers"
        }
        _ => "register with the same headers to get it, or cancel it first (DELETE /v1/subscriptions/{id})",
    };
    ApiError::Conflict(format!(
        "subscription {id} ({}) already delivers this job to this callback_url with other custom headers \
         (names or values differ): {}",
        state.as_str(),
        way_out.replace("{id}", &id.to_string())
    ))
}

/// Read one subscription.
#[utoipa::path(
    get, path = "/v1/subscriptions/{id}", tag = "subscriptions", security(("bearer" = [])),
    params(("id" = String, Path, description = "The subscription ID")),
    responses((status = 200, description = "The subscription", body = SubscriptionView), Unauthorized, NoSuchSubscription)
)]
pub async fn get_one(
    State(state): State<AppState>,
    one: TenantSubscription,
) -> Result<Json<SubscriptionView>, ApiError> {
    let sub = state.store.subscription(one.key()).await?.ok_or_else(|| not_found(&one.raw))?;
    Ok(Json(sub.into()))
}

/// List subscriptions, newest first.
#[utoipa::path(
    get, path = "/v1/subscriptions", tag = "subscriptions", security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page of subscriptions", body = SubscriptionPage),
        (status = 400, description = "A query parameter is not valid", body = Problem, content_type = "application/problem+json"),
        Unauthorized,
    )
)]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SubscriptionPage>, ApiError> {
    let Query(query) = query?;
    let job_id = match (query.job_id.as_deref(), query.upstream.as_deref()) {
        (Some(j), upstream) => Some(state.job_ids.parse(upstream, j).map_err(ApiError::BadRequest)?),
        (None, Some(_)) => return Err(ApiError::BadRequest("upstream filters only together with job_id".into())),
        (None, None) => None,
    };
    let state_filter =
        query.state.as_deref().map(|s| s.parse::<SubscriptionState>().map_err(ApiError::BadRequest)).transpose()?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(raw) => match raw.parse::<u32>() {
            Ok(n @ 1..=MAX_LIMIT) => n,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}, got {:?}",
                    truncate(raw, 16)
                )));
            }
        },
    };
    let before = query.cursor.as_deref().map(|c| decode_cursor(&state.cursor_key, c)).transpose()?;
    let filter = ListFilter { job_id, state: state_filter, before, limit: limit + 1 };
    let mut items = state.store.list_subscriptions(tenant.id, &filter).await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|s| encode_cursor(&state.cursor_key, s.id))
    } else {
        None
    };
    Ok(Json(SubscriptionPage { items: items.into_iter().map(Into::into).collect(), next_cursor }))
}

/// Deliver again: a new series for a delivered or failed subscription, or the next retry now for a
/// delivering one.
///
/// For a receiver that lost its data, or was fixed after the retries ran out: the job's result is
/// delivered again, from the first attempt of the retry schedule, under the same `webhook-id`.
///
/// For a subscription in `delivering` (waiting for its next retry, say after its receiver was fixed):
/// the next attempt of the current series is made now, under the same `webhook-id`; the series and the
/// attempt count go on (no new series). If an attempt is on the wire at that moment, the answer is still
/// 202: that attempt's outcome stands, and if it fails the next retry follows its schedule as usual.
#[utoipa::path(
    post, path = "/v1/subscriptions/{id}/redeliver", tag = "subscriptions", security(("bearer" = [])),
    params(("id" = String, Path, description = "The subscription ID")),
    responses(
        (status = 202, description = "A new delivery series has started, or (delivering) the next attempt is due now", body = SubscriptionView),
        Unauthorized,
        NoSuchSubscription,
        (status = 409, description = "The subscription is polling, cancelled or expired, or its job has no result to deliver, or a newer subscription of the same job and callback exists", body = Problem, content_type = "application/problem+json"),
        StoreUnavailable,
    )
)]
pub async fn redeliver(
    State(state): State<AppState>,
    one: TenantSubscription,
) -> Result<(StatusCode, Json<SubscriptionView>), ApiError> {
    let key = one.key();
    let TenantSubscription { id: sub_id, raw: id, .. } = one;
    let redelivery = super::to_the_end({
        let (state, id) = (state.clone(), id.clone());
        async move {
            let redelivery = state.store.redeliver(key, Timestamp::now()).await?.ok_or_else(|| not_found(&id))?;
            if let Redelivery::Started(task) = &redelivery {
                tracing::info!(subscription_id = %sub_id, series = task.series, "redelivery started");
                state.dispatcher.deliver(vec![task.clone()]);
            }
            // Waiting for a retry: no new series, the next attempt of this one is made now.
            if let Redelivery::NotEnded(SubscriptionState::Delivering) = &redelivery {
                let retry = state.store.retry_now(key, Timestamp::now()).await?.ok_or_else(|| not_found(&id))?;
                return Ok(match retry {
                    RetryNow::Due(task) => {
                        tracing::info!(subscription_id = %sub_id, series = task.series, "retry now");
                        state.dispatcher.deliver(vec![task]);
                        Accepted::RetryNow
                    }
                    RetryNow::NotDelivering(now) => Accepted::NotEnded(now),
                });
            }
            Ok(match redelivery {
                Redelivery::Started(_) => Accepted::Series,
                Redelivery::Superseded => Accepted::Superseded,
                Redelivery::NotEnded(state) => Accepted::NotEnded(state),
            })
        }
    })
    .await?;
    match redelivery {
        Accepted::Series | Accepted::RetryNow => {
            let sub = state.store.subscription(key).await?.ok_or_else(|| not_found(&id))?;
            Ok((StatusCode::ACCEPTED, Json(sub.into())))
        }
        Accepted::Superseded => Err(ApiError::Conflict(
            "a newer subscription of the same job and callback exists; redeliver that one instead".into(),
        )),
        Accepted::NotEnded(current) => Err(ApiError::Conflict(format!(
            "only a delivering, delivered or failed subscription whose job has a result can be redelivered; this one is {}",
            current.as_str()
        ))),
    }
}

/// What a redeliver request did.
enum Accepted {
    /// A new delivery series started (the subscription had ended).
    Series,
    /// The subscription was waiting for a retry: its next attempt is due now.
    RetryNow,
    /// Nothing: a newer subscription of the same job and callback is the one to redeliver.
    Superseded,
    /// Nothing: the subscription is in this state (no result yet, or cancelled or expired).
    NotEnded(SubscriptionState),
}

/// Cancel a subscription: polling and delivery stop and its state becomes `cancelled`; once this answers
/// 204, no delivery attempt starts for it, and it was never delivered. If an attempt is on the wire,
/// the answer waits for its outcome (at most the delivery timeout plus 30 s): a subscription that the
/// attempt delivered (or one that had already ended) cannot be cancelled and answers 409 naming its
/// state. Cancelling a cancelled subscription again is fine (204).
#[utoipa::path(
    delete, path = "/v1/subscriptions/{id}", tag = "subscriptions", security(("bearer" = [])),
    params(("id" = String, Path, description = "The subscription ID")),
    responses(
        (status = 204, description = "Cancelled (now or before); no delivery attempt starts for it"),
        Unauthorized,
        NoSuchSubscription,
        (status = 409, description = "It already ended as delivered, failed or expired (the detail names the state), or a delivery attempt was still on the wire when the wait ran out", body = Problem, content_type = "application/problem+json"),
        StoreUnavailable,
    )
)]
pub async fn cancel(State(state): State<AppState>, one: TenantSubscription) -> Result<StatusCode, ApiError> {
    let key = one.key();
    let TenantSubscription { id: sub_id, raw: id, .. } = one;
    super::to_the_end(async move {
        // An attempt holds its claim for at most this long; it releases it when its outcome is recorded.
        let deadline = tokio::time::Instant::now() + state.dispatcher.claim_for();
        loop {
            match state.store.cancel(key, Timestamp::now()).await?.ok_or_else(|| not_found(&id))? {
                Cancel::Cancelled { job_id, was: _ } => {
                    // Both, whatever the state read: the job may have ended between that read and the cancel.
                    state.poller.recheck(job_id.clone());
                    state.dispatcher.cancel(sub_id);
                    state.metrics.finished("cancelled", 1);
                    tracing::info!(subscription_id = %sub_id, %job_id, "cancelled");
                    return Ok(StatusCode::NO_CONTENT);
                }
                Cancel::Ended(SubscriptionState::Cancelled) => return Ok(StatusCode::NO_CONTENT),
                Cancel::Ended(ended) => {
                    return Err(ApiError::Conflict(format!(
                        "the subscription has already ended as {}; it cannot be cancelled",
                        ended.as_str()
                    )));
                }
                Cancel::AttemptInFlight if tokio::time::Instant::now() >= deadline => {
                    return Err(ApiError::Conflict(
                        "a delivery attempt for this subscription is still in progress; try again".into(),
                    ));
                }
                // The attempt ends within its timeout; its outcome decides.
                Cancel::AttemptInFlight => tokio::time::sleep(CANCEL_RECHECK).await,
            }
        }
    })
    .await
}

/// How often a cancellation waiting for an in-flight attempt asks again.
const CANCEL_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

/// The delivery attempts of a subscription, oldest first.
#[utoipa::path(
    get, path = "/v1/subscriptions/{id}/deliveries", tag = "subscriptions", security(("bearer" = [])),
    params(("id" = String, Path, description = "The subscription ID")),
    responses((status = 200, description = "Every attempt so far", body = DeliveryAttempts), Unauthorized, NoSuchSubscription)
)]
pub async fn deliveries(
    State(state): State<AppState>,
    one: TenantSubscription,
) -> Result<Json<DeliveryAttempts>, ApiError> {
    let attempts = state.store.attempts(one.key()).await?.ok_or_else(|| not_found(&one.raw))?;
    Ok(Json(DeliveryAttempts { items: attempts.into_iter().map(Into::into).collect() }))
}
