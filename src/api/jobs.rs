//! `POST /v1/jobs`: create a job upstream and subscribe to its end, in one request.
//!
//! The caller's JSON body goes to the profile's creation endpoint (`base_url` + an allowed `path`) with
//! the profile's auth; the new job's ID is read from the answer and registered before anything polls it,
//! so a job that ends at once is still seen ending. With an `Idempotency-Key`, the first answer is kept
//! for [`KEEP_ANSWERS_FOR`] and a retry gets it back instead of creating a second upstream job.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::AppState;
use super::error::{
    ApiError, ApiJson, BodyTooLarge, BodyTooSlow, NotJson, Problem, RegistrationUnavailable, Unauthorized,
};
use super::subscriptions::{SubscriptionView, checked_callback, register};
use crate::config::upstreams::{UpstreamProfile, default_upstream};
use crate::domain::{CallbackUrl, Payload, Timestamp, truncate};
use crate::keys::KeyHash;
use crate::store::{Claimed, DeliveryForm, IdempotencyClaim, StoredAnswer};
use crate::upstream::UpstreamClient;

/// How long an Idempotency-Key's answer is kept (and the key refused for another request).
pub const KEEP_ANSWERS_FOR: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The longest Idempotency-Key accepted, in bytes.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// A first request still without an answer after this has stopped (a request runs at most the
/// upstream's timeout and a few store writes, each bounded well under this).
const STOPPED_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

/// The profiles' clients, for creation requests.
pub struct Creators {
    clients: Vec<UpstreamClient>,
    /// The profile a request without `"upstream"` goes to (as for registrations).
    default: String,
}

impl Creators {
    pub fn new(clients: Vec<UpstreamClient>) -> Self {
        let profiles: Vec<UpstreamProfile> = clients.iter().map(|c| c.profile().clone()).collect();
        let default = default_upstream(&profiles).to_owned();
        Creators { clients, default }
    }

    fn client(&self, upstream: Option<&str>) -> Result<&UpstreamClient, ApiError> {
        let name = upstream.unwrap_or(&self.default);
        self.clients.iter().find(|c| c.profile().name == name).ok_or_else(|| {
            let names: Vec<&str> = self.clients.iter().map(|c| c.profile().name.as_str()).collect();
            ApiError::Invalid(format!("upstream must be one of {}, got {:?}", names.join(", "), truncate(name, 40)))
        })
    }
}

/// A job to create upstream, and the callback that hears of its end.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// The upstream profile to create the job with (default as for `POST /v1/subscriptions`). Its profile
    /// must have a `create` table.
    #[schema(example = "aetherforge")]
    #[serde(default)]
    pub upstream: Option<String>,
    /// The creation endpoint's path under the profile's `base_url`: one of the profile's `create.paths`
    /// prefixes (`/public/v1/` for `aetherforge`), a plain path without query.
    #[schema(example = "/public/v1/image-tune/upscale", max_length = 512)]
    pub path: String,
    /// The JSON object to POST to the upstream, as it is.
    #[schema(value_type = Object, example = json!({"image_url": "https://example.com/cat.png", "scale": 2}))]
    pub body: Value,
    /// As for `POST /v1/subscriptions`.
    #[schema(example = "https://example.com/webhooks/jobs", max_length = 2048)]
    pub callback_url: String,
    /// As for `POST /v1/subscriptions`.
    #[schema(value_type = Option<std::collections::HashMap<String, String>>)]
    #[serde(default)]
    pub headers: Option<Value>,
    /// As for `POST /v1/subscriptions`.
    #[serde(default)]
    pub payload: Payload,
    /// As for `POST /v1/subscriptions`.
    #[schema(value_type = Option<Object>)]
    #[serde(default)]
    pub metadata: Option<Value>,
}

/// A job created upstream and its subscription.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobCreated {
    /// The upstream's HTTP status (2xx).
    pub upstream_status: u16,
    /// The upstream's answer to the creation request.
    #[schema(value_type = Object)]
    pub upstream_response: Value,
    /// The subscription to the new job, as registered.
    pub subscription: SubscriptionView,
}

/// A 502 problem: what the upstream answered instead of a job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UpstreamProblem {
    #[serde(flatten)]
    pub problem: Problem,
    /// The upstream's HTTP status; null when it did not answer (timeout, refused connection).
    pub upstream_status: Option<u16>,
    /// The first 2 KiB of the upstream's answer (invalid UTF-8 replaced); null when it did not answer.
    #[schema(max_length = 2048)]
    pub upstream_body: Option<String>,
}

/// A checked request, ready to go upstream.
struct Plan {
    client: UpstreamClient,
    path: String,
    body: Value,
    callback_url: CallbackUrl,
    form: DeliveryForm,
}

/// Create a job upstream and subscribe to its end.
///
/// jobhook POSTs `body` to the upstream's `path` with the profile's credentials, reads the new job's ID
/// from the answer, and registers the callback before anything polls the job. With an
/// `Idempotency-Key` header, a retry within 24 hours gets the first answer again (same status and body,
/// with `Idempotent-Replayed: true`) and creates no second job; the same key with another request is
/// refused (422), and a retry while the first request is still running answers 409.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs", security(("bearer" = [])),
    request_body = CreateJob,
    params(("idempotency-key" = Option<String>, Header,
        description = "1 to 255 visible ASCII characters, unique per request you mean (a UUID); kept 24 h per API tenant; any other value is a 400")),
    responses(
        (status = 201, description = "Created upstream and registered", body = JobCreated,
            headers(("location" = String, description = "The subscription's URL"))),
        (status = 200, description = "Created upstream; the upstream named a job already registered to this callback with the same headers: that subscription", body = JobCreated),
        (status = 502, description = "The upstream did not create a job that can be watched (an error status, no answer in time, an answer that is not JSON, or no valid job ID at the profile's pointer); nothing was registered", body = UpstreamProblem, content_type = "application/problem+json"),
        (status = 409, description = "A request with this Idempotency-Key is still running (or stopped without an answer); or the job and callback are registered with other headers", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is missing, unknown or invalid; the upstream's profile has no create table or does not allow the path; the callback URL is refused by the egress policy; or the Idempotency-Key was used with another request", body = Problem, content_type = "application/problem+json"),
        NotJson,
        Unauthorized,
        BodyTooSlow,
        BodyTooLarge,
        RegistrationUnavailable,
    )
)]
pub async fn create_job(
    State(state): State<AppState>,
    headers: HeaderMap,
    super::auth::RegisteringKey(key): super::auth::RegisteringKey,
    ApiJson(raw): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let idempotency_key = idempotency_key(&headers)?;
    let fingerprint = Sha256::digest(canonical(&raw).to_string().as_bytes()).to_vec();
    let request: CreateJob = serde_json::from_value(raw).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let plan = check(&state, request).await?;
    let claim = match idempotency_key {
        Some(idempotency_key) => {
            let tenant = state.store.tenant_by_key(key).await?.ok_or(super::UNKNOWN_KEY)?;
            let now = Timestamp::now();
            let expired_before = now - KEEP_ANSWERS_FOR;
            Some(IdempotencyClaim { tenant_id: tenant.id, key: idempotency_key, fingerprint, now, expired_before })
        }
        None => None,
    };
    // To the end even if the client leaves: once the key is claimed and the POST has gone out, the
    // upstream job may exist, and its registration and the key's answer must follow.
    let (answer, replayed) = super::to_the_end(async move {
        if let Some(claim) = &claim {
            match state.store.claim_idempotency_key(claim.clone()).await? {
                Claimed::New => {}
                Claimed::Done(answer) => return Ok((answer, true)),
                Claimed::InFlight { since } => return Err(in_flight(since)),
                Claimed::OtherRequest => {
                    return Err(ApiError::Invalid(
                        "this Idempotency-Key was used in the last 24 h with another request (another body, \
                         path, upstream, callback or option); use a new key for a new request"
                            .into(),
                    ));
                }
            }
        }
        let answer = match execute(&state, key, plan).await {
            Ok(answer) => answer,
            Err(e) if claim.is_none() => return Err(e),
            Err(e) => stored(e).await,
        };
        if let Some(claim) = claim
            && let Err(e) = state.store.finish_idempotency_key(claim.tenant_id, &claim.key, &answer).await
        {
            // The key stays in flight: a retry is refused (409), never sent upstream again.
            tracing::error!(error = %e, "could not store the answer of an Idempotency-Key");
        }
        Ok((answer, false))
    })
    .await?;
    Ok(respond(answer, replayed))
}

/// The request's Idempotency-Key, if it sent one: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::BadRequest("send one Idempotency-Key header, not several".into()));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_IDEMPOTENCY_KEY || !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::BadRequest(format!(
            "the Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters (a UUID, say)"
        )));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// `value` with every object's members in key order, so the fingerprint does not depend on the order
/// the caller wrote them in.
fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(members.into_iter().map(|(k, v)| (k.clone(), canonical(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// Everything that can be refused before the upstream hears of the request.
async fn check(state: &AppState, request: CreateJob) -> Result<Plan, ApiError> {
    let client = state.creators.client(request.upstream.as_deref())?;
    let profile = client.profile();
    let Some(rules) = &profile.create else {
        return Err(ApiError::Invalid(format!(
            "upstream {:?} has no create table in its profile, so jobhook does not create its jobs; create the \
             job yourself and register it with POST /v1/subscriptions",
            profile.name
        )));
    };
    rules.allows(&request.path).map_err(ApiError::Invalid)?;
    if !request.body.is_object() {
        return Err(ApiError::Invalid("body must be a JSON object (what the upstream's endpoint takes)".into()));
    }
    let (callback_url, form) = checked_callback(
        state,
        &request.callback_url,
        request.headers.as_ref(),
        request.payload,
        request.metadata.as_ref(),
    )
    .await?;
    Ok(Plan { client: client.clone(), path: request.path, body: request.body, callback_url, form })
}

/// Creates the job upstream, then registers it: the answer to send (and to keep for a retry).
async fn execute(state: &AppState, key: KeyHash, plan: Plan) -> Result<StoredAnswer, ApiError> {
    let upstream = plan.client.profile().name.clone();
    let created = plan.client.create(&plan.path, &plan.body).await.map_err(|failure| {
        tracing::warn!(%upstream, path = %plan.path, status = ?failure.upstream_status, reason = %failure.reason,
            "the upstream did not create a job");
        ApiError::UpstreamFailed(Box::new(failure))
    })?;
    let job_id = created.job_id.clone();
    let registered = register(state.clone(), key, created.job_id, plan.callback_url, plan.form).await;
    // The job exists upstream and nobody watches it: say which, for the operator.
    let (status, sub) = registered.inspect_err(|e| {
        tracing::error!(%upstream, %job_id, error = %e, "a job created upstream could not be registered");
    })?;
    tracing::info!(%upstream, %job_id, subscription_id = %sub.id, "job created upstream and registered");
    let body =
        JobCreated { upstream_status: created.status, upstream_response: created.body, subscription: sub.into() };
    Ok(StoredAnswer { status: status.as_u16(), body: serde_json::to_vec(&body).map_err(|_| ApiError::Internal)? })
}

/// An error answer as it is sent, to be kept under the Idempotency-Key like a success.
async fn stored(error: ApiError) -> StoredAnswer {
    let response = error.into_response();
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.map(|b| b.to_vec()).unwrap_or_default();
    StoredAnswer { status, body }
}

/// The answer, first sent or replayed: JSON for a success (with the subscription's `Location`),
/// problem+json otherwise.
fn respond(answer: StoredAnswer, replayed: bool) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = if status.is_success() { "application/json" } else { "application/problem+json" };
    let location = status
        .is_success()
        .then(|| serde_json::from_slice::<Value>(&answer.body).ok())
        .flatten()
        .and_then(|body| body.pointer("/subscription/id")?.as_str().map(|id| format!("/v1/subscriptions/{id}")))
        .and_then(|location| HeaderValue::from_str(&location).ok());
    let mut response = (status, [(header::CONTENT_TYPE, content_type)], answer.body).into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if replayed {
        // Stripe's name for an answer that repeats the stored first answer of its Idempotency-Key.
        response.headers_mut().insert(HeaderName::from_static("idempotent-replayed"), HeaderValue::from_static("true"));
    }
    response
}

/// The 409 of a key whose first request has no answer yet: still running, or stopped half way (the
/// service restarted, or the store failed as it finished), when whether the upstream job exists is
/// unknown and sending it again could make a second one.
fn in_flight(since: Timestamp) -> ApiError {
    let running_for = Timestamp::now().duration_since(since);
    if running_for < STOPPED_AFTER {
        return ApiError::Conflict(
            "a request with this Idempotency-Key is still in progress; retry it in a moment to get its answer".into(),
        );
    }
    ApiError::Conflict(format!(
        "the request with this Idempotency-Key (made {} ago) stopped without an answer, so whether the upstream \
         created the job is unknown; look for it with GET /v1/subscriptions or upstream, or use a new key",
        humantime::format_duration(std::time::Duration::from_secs(running_for.as_secs()))
    ))
}
