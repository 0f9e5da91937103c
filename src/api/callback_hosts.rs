//! The callback hosts a tenant delivers to, with the state of each host's breaker, and the hand resume.
//!
//! What these show is this instance's breakers (they live in memory): with several PostgreSQL instances,
//! the one answering knows the hosts it delivered to.

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::Unauthorized;
use super::{ApiError, AppState, Problem};
use crate::delivery::breaker::HostState;
use crate::domain::truncate;
use crate::store::Tenant;

/// Whether deliveries to a host are attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Deliveries are attempted as usual.
    Closed,
    /// Deliveries wait, paused (their retries are not used up), while one probe per interval tests the host.
    Open,
}

/// One callback host and its breaker.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CallbackHostView {
    /// The callback URL's host, with its port when the URL names one.
    #[schema(example = "hooks.example.com")]
    pub host: String,
    pub state: BreakerState,
    /// When the breaker opened; null while closed.
    #[schema(format = DateTime)]
    pub open_since: Option<String>,
    /// Failed attempts in a row to this host since its last 2xx.
    pub consecutive_failures: u32,
    /// What the last failed attempt saw (an HTTP status or a transport error), if any.
    pub last_error: Option<String>,
}

impl From<HostState> for CallbackHostView {
    fn from(h: HostState) -> Self {
        CallbackHostView {
            state: if h.open_since.is_some() { BreakerState::Open } else { BreakerState::Closed },
            open_since: h.open_since.map(|t| t.rfc3339()),
            host: h.host,
            consecutive_failures: h.consecutive_failures,
            last_error: h.last_error,
        }
    }
}

/// The callback hosts of your deliveries.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CallbackHostList {
    pub items: Vec<CallbackHostView>,
}

/// List the hosts your deliveries go to, with their breakers.
///
/// A host's breaker opens after `JOBHOOK_BREAKER_AFTER` consecutive failed attempts to it spanning at
/// least `JOBHOOK_BREAKER_MIN_SPAN`; its deliveries then wait, paused, and one probe attempt every
/// `JOBHOOK_BREAKER_PROBE_INTERVAL` closes it on its first 2xx. Lists the hosts this instance has
/// attempted deliveries to for your API key since it started, by name.
#[utoipa::path(
    get, path = "/v1/callback-hosts", tag = "callback hosts", security(("bearer" = [])),
    responses(
        (status = 200, description = "Your callback hosts", body = CallbackHostList),
        Unauthorized,
    )
)]
pub async fn list_callback_hosts(State(state): State<AppState>, tenant: Tenant) -> Json<CallbackHostList> {
    Json(CallbackHostList { items: state.breaker.list(tenant.id).into_iter().map(Into::into).collect() })
}

/// The `{host}` of a callback-host route, or a 404 problem (also for a path that is not UTF-8).
pub struct HostPath(String);

impl<S: Send + Sync> FromRequestParts<S> for HostPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(host)) => Ok(HostPath(host)),
            Err(_) => Err(ApiError::NotFound("there is no such callback host".into())),
        }
    }
}

/// Close a host's breaker by hand.
///
/// Its paused deliveries are due at once (paced by the per-host concurrency cap). Closing a closed
/// breaker changes nothing. Only a host your deliveries go to can be resumed.
#[utoipa::path(
    post, path = "/v1/callback-hosts/{host}/resume", tag = "callback hosts", security(("bearer" = [])),
    params(("host" = String, Path, description = "The host, as listed (with its port when the callback URL names one)")),
    responses(
        (status = 200, description = "The breaker is closed", body = CallbackHostView),
        Unauthorized,
        (status = 404, description = "None of your deliveries goes to this host (on this instance)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn resume_callback_host(
    State(state): State<AppState>,
    tenant: Tenant,
    HostPath(host): HostPath,
) -> Result<Json<CallbackHostView>, ApiError> {
    let resumed = state.breaker.resume(&host, tenant.id).ok_or_else(|| {
        ApiError::NotFound(format!("none of your deliveries goes to the host {:?}", truncate(&host, 256)))
    })?;
    tracing::info!(tenant_id = tenant.id, host = %resumed.host, "callback host breaker resumed by hand");
    Ok(Json(resumed.into()))
}
