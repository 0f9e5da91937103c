//! The HTTP API: the router, the shared state, and the OpenAPI document generated from the same
//! handlers (so the two cannot drift; a test compares it with the committed `openapi.yaml`).

mod auth;
pub mod bulk;
pub mod callback_hosts;
mod cursor;
pub mod error;
pub mod jobs;
pub mod subscriptions;
pub mod test_sends;
mod unparsable;
pub mod webhook_doc;

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderName, Request, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use tracing::Instrument;

use crate::config::EgressPolicy;
use crate::delivery::DispatcherHandle;
use crate::delivery::client::Lookup;
use crate::domain::Timestamp;
use crate::poller::PollerHandle;
use crate::store::{Store, Tenant};
pub use auth::UNKNOWN_KEY;
pub use error::{ApiError, Problem};
use error::{StoreUnavailable, Unauthorized};
use webhook_doc::CallbackWebhook;

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub poller: PollerHandle,
    pub dispatcher: DispatcherHandle,
    pub egress: EgressPolicy,
    pub lookup: Lookup,
    /// Signs list cursors, so a cursor cannot be forged or altered.
    pub cursor_key: Arc<Vec<u8>>,
    /// The signing secrets the dispatcher uses; a rotation makes it forget the old ones at once.
    pub secrets: Arc<crate::delivery::SecretsCache>,
    pub secret_rotation_grace: std::time::Duration,
    /// How long a client may take to send a body (see `--request-timeout`).
    pub request_timeout: std::time::Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Which workers run, for `GET /readyz`.
    pub workers: Arc<crate::health::Workers>,
    /// API keys seen valid (a shortcut for registration; see [`auth::RegisteringKey`]).
    pub known_keys: Arc<auth::KnownKeys>,
    /// The client and per-tenant rate limit of `POST /v1/test-deliveries`.
    pub test_sends: Arc<test_sends::TestSends>,
    /// The breakers per callback host, shared with the dispatcher.
    pub breaker: Arc<crate::delivery::Breaker>,
    /// The upstream profiles' job ID formats, to read a registration's `upstream` and `job_id`.
    pub job_ids: Arc<crate::config::upstreams::JobIds>,
    /// The upstream profiles' clients, for `POST /v1/jobs`.
    pub creators: Arc<jobs::Creators>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "jobhook",
        description = "Turns polling into push: register an async job with a callback URL; jobhook polls the job and POSTs its final status to the callback, signed with Standard Webhooks.",
        license(name = "MIT", identifier = "MIT"),
    ),
    servers((url = "http://127.0.0.1:8080", description = "jobhook on its default --listen address")),
    modifiers(&BearerAuth, &CallbackWebhook),
    tags((name = "subscriptions", description = "Jobs watched for a callback"), (name = "jobs", description = "Jobs created upstream through jobhook, watched for a callback"), (name = "callback hosts", description = "Where your deliveries go, and each host's breaker"), (name = "account", description = "Your signing secret"), (name = "operations", description = "Health"))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Your API key, in one `Authorization: Bearer <key>` header. A request with several Authorization headers is answered 400 (problem+json).",
                    ))
                    .build(),
            ),
        );
    }
}

fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(subscriptions::create, subscriptions::list))
        .routes(routes!(subscriptions::get_one, subscriptions::cancel))
        .routes(routes!(subscriptions::deliveries))
        .routes(routes!(subscriptions::redeliver))
        .routes(routes!(jobs::create_job))
        .routes(routes!(bulk::redeliver_matching))
        .routes(routes!(test_sends::create))
        .routes(routes!(callback_hosts::list_callback_hosts))
        .routes(routes!(callback_hosts::resume_callback_host))
        .routes(routes!(signing_secret))
        .routes(routes!(rotate_signing_secret))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// The OpenAPI document of this build.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().split_for_parts().1
}

/// The committed OpenAPI document, served at `GET /openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

pub fn router(state: AppState) -> axum::Router {
    router_with(state, axum::Router::new())
}

/// The API router with `extra` routes beside it (the web console), under the same layers: request IDs,
/// tracing and the body limit.
pub fn router_with(state: AppState, extra: axum::Router<AppState>) -> axum::Router {
    let request_id = HeaderName::from_static("x-request-id");
    let (router, _) = routes().split_for_parts();
    router
        .merge(extra)
        .route(
            "/openapi.yaml",
            axum::routing::get(|| async { ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML) }),
        )
        .fallback(|| async { ApiError::NotFound("there is no such route; see /openapi.yaml".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this route does not take that method; see /openapi.yaml".into())
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            // Info, so the request id is on every line a request logs at the default level.
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

/// The secret that signs your deliveries.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SigningSecretView {
    /// `whsec_` + base64; give it to your receiver's Standard Webhooks library.
    #[schema(example = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]
    pub secret: String,
}

/// The answer to a rotation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RotatedSecret {
    /// The new secret: give it to your receiver.
    pub secret: String,
    /// Until then, deliveries carry a second signature made with the previous secret, so receivers that
    /// still hold it keep verifying.
    #[schema(format = DateTime)]
    pub previous_secret_valid_until: String,
}

/// Rotate your signing secret.
///
/// Returns a new secret. For the grace period (`JOBHOOK_SECRET_ROTATION_GRACE`, 24 h by default) every
/// delivery carries two signatures, with the new and the previous secret, space-separated in
/// `webhook-signature`: the stock libraries accept either secret. Update your receiver within it. Only
/// the secret just replaced keeps signing: rotating again within the grace ends the older one's grace.
#[utoipa::path(
    post, path = "/v1/signing-secret/rotate", tag = "account", security(("bearer" = [])),
    responses(
        (status = 200, description = "The new secret", body = RotatedSecret),
        Unauthorized,
        StoreUnavailable,
    )
)]
pub(crate) async fn rotate_signing_secret(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<Json<RotatedSecret>, ApiError> {
    let secret = crate::keys::SigningSecret::generate();
    let until = Timestamp::now() + state.secret_rotation_grace;
    to_the_end({
        let (state, secret) = (state.clone(), secret.clone());
        async move {
            state.store.rotate_secret(tenant.id, &secret, until).await?;
            state.secrets.forget(tenant.id);
            tracing::info!(tenant_id = tenant.id, "signing secret rotated");
            Ok(())
        }
    })
    .await?;
    Ok(Json(RotatedSecret { secret: secret.expose(), previous_secret_valid_until: until.rfc3339() }))
}

/// Your signing secret.
#[utoipa::path(
    get, path = "/v1/signing-secret", tag = "account", security(("bearer" = [])),
    responses(
        (status = 200, description = "The secret that signs this API key's deliveries", body = SigningSecretView),
        Unauthorized,
    )
)]
async fn signing_secret(tenant: Tenant) -> Json<SigningSecretView> {
    Json(SigningSecretView { secret: tenant.secret.expose() })
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
}

/// Whether the process is up.
#[utoipa::path(
    get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "The process is up", body = Health))
)]
async fn healthz(State(_): State<AppState>) -> impl IntoResponse {
    Json(Health { status: "ok".into() })
}

/// Whether this instance can do its work, and if not, why.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not ready`.
    #[schema(example = "ready")]
    pub status: String,
    /// Each check by name (`store`, `poller`, `dispatcher`, and `lease loop` on PostgreSQL):
    /// `ok`, or what is wrong.
    #[schema(example = json!({"store": "ok", "poller": "ok", "dispatcher": "ok"}))]
    pub checks: std::collections::BTreeMap<String, String>,
}

/// How long the readiness check waits for the database.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether this instance is ready for traffic: the store answers and takes writes, the workers run.
///
/// For a load balancer or an orchestrator's readiness probe.
#[utoipa::path(
    get, path = "/readyz", tag = "operations", security(()),
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Not ready; `checks` says what is wrong", body = Readiness),
    )
)]
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let mut checks = state.workers.checks();
    let store = match tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the store check failed");
            match e {
                crate::store::StoreError::Unavailable(_) => {
                    "the database cannot take writes or cannot be reached (disk full? see the logs)".to_owned()
                }
                _ => "the database answered with an error (see the logs)".to_owned(),
            }
        }
        Err(_) => "the database did not answer within 2 s".to_owned(),
    };
    checks.insert("store".into(), store);
    let ready = checks.values().all(|v| v == "ok");
    let status = if ready { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    let body = Readiness { status: if ready { "ready" } else { "not ready" }.into(), checks };
    (status, Json(body))
}

/// Counters, gauges and histograms in the Prometheus text format (OpenMetrics 1.0).
///
/// Names and what they count are listed in the README ("Metrics"). No labels carry URLs or IDs.
#[utoipa::path(
    get, path = "/metrics", tag = "operations", security(()),
    responses((status = 200, description = "The metrics", body = String, content_type = "application/openmetrics-text"))
)]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    if state.metrics.recount_due() {
        // Counted in a task of its own: a count slower than the wait below still lands, for the next
        // scrape, instead of being abandoned half way.
        let (store, metrics) = (state.store.clone(), state.metrics.clone());
        let count = tokio::spawn(async move {
            match store.count_by_state().await {
                Ok(counts) => metrics.set_subscription_counts(&counts),
                Err(e) => tracing::warn!(error = %e, "metrics: could not count subscriptions"),
            }
        });
        if tokio::time::timeout(READY_TIMEOUT, count).await.is_err() {
            tracing::warn!("metrics: counting subscriptions takes longer than 2 s; this scrape shows the last count");
        }
    }
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], state.metrics.render())
}

/// How long a client may take to send a body; read per request without cloning the whole state.
#[derive(Clone, Copy)]
pub struct RequestTimeout(pub std::time::Duration);

impl axum::extract::FromRef<AppState> for RequestTimeout {
    fn from_ref(state: &AppState) -> Self {
        RequestTimeout(state.request_timeout)
    }
}

/// Runs a request's writes, and what must follow them, to the end even if the client goes away: the
/// server drops a request's handler when its connection closes, and a registration committed without
/// its job reaching the poller would wait, unpolled, until the next restart.
pub(crate) async fn to_the_end<T: Send + 'static>(
    work: impl Future<Output = Result<T, error::ApiError>> + Send + 'static,
) -> Result<T, error::ApiError> {
    tokio::spawn(work.in_current_span()).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a request's work failed unexpectedly");
        Err(error::ApiError::Internal)
    })
}

/// What the API server allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// How long a client may take to send a request's headers (see `--request-timeout`).
    pub request_timeout: std::time::Duration,
    /// The most connections open at once (see `--max-connections`).
    pub max_connections: usize,
}

/// Serves the API on `listener` until `shutdown`, then lets open requests finish.
///
/// axum's own `serve` sets no timer, so a client could hold a connection open for ever by never
/// finishing its headers (slowloris). Here each connection gets HTTP/1 with a header-read timeout of
/// `request_timeout` (the body's own deadline is in [`error::ApiJson`]), and at most
/// `max_connections` are open at once (as mini-redis caps its connections with a semaphore): past the
/// cap we stop accepting, and new connections wait in the kernel's listen queue.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: ServerLimits,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.request_timeout);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        // Never closed: acquiring fails only if it were.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the connection semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset while queued: wait a moment
                    // rather than spin.
                    tracing::warn!(error = %e, "could not accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // No TCP_NODELAY (as axum::serve): measured with jobhook-bench, it cost about 8% more CPU per
        // job and 8% fewer jobs a second.
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        // Requests hyper cannot parse (a raw `<id>` in the path) still get a problem answer.
        let stream = unparsable::ProblemIo::new(stream);
        let connection = graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
