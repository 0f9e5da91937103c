//! The web console at `/console`: sign in with an API key, see your subscriptions and their delivery
//! attempts, redeliver, cancel, register a job, see and rotate your signing secret.
//!
//! Server-rendered HTML with one small script (live refresh) and one stylesheet, both embedded in the
//! binary. Every action goes through the same code as the JSON API (its handlers or the same store
//! methods), so validation, egress policy, tenant isolation and error wording are the API's.
//!
//! Safety: a strict Content-Security-Policy (scripts and styles from this origin only, no inline
//! script, no framing), CSRF tokens on every POST plus an Origin check, sessions in HttpOnly
//! SameSite=Strict cookies (see [`session`]), `Cache-Control: no-store`, and no secret in any URL.

mod account;
mod assets;
mod html;
pub mod session;
mod subscriptions;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::api::AppState;
use crate::domain::Timestamp;
use crate::keys::KeyHash;
use crate::store::Tenant;

/// What the console's handlers reach: the API's state and the session key.
#[derive(Clone)]
pub struct ConsoleState {
    pub app: AppState,
    pub keys: session::Keys,
}

/// The console's routes, to merge beside the API's (see [`crate::api::router_with`]).
pub fn router(app: AppState, session_key: Vec<u8>) -> axum::Router<AppState> {
    let state = ConsoleState { app, keys: session::Keys::new(session_key) };
    axum::Router::new()
        .route("/console", get(|| async { Redirect::to("/console/subscriptions") }))
        .route("/console/", get(|| async { Redirect::to("/console/subscriptions") }))
        .route(assets::CSS_PATH, get(assets::css))
        .route(assets::JS_PATH, get(assets::js))
        .route("/console/sign-in", get(account::sign_in_page).post(account::sign_in))
        .route("/console/sign-out", post(account::sign_out))
        .route("/console/subscriptions", get(subscriptions::list))
        .route("/console/subscriptions/{id}", get(subscriptions::detail))
        .route("/console/subscriptions/{id}/cancel", get(subscriptions::confirm_cancel).post(subscriptions::cancel))
        .route(
            "/console/subscriptions/{id}/redeliver",
            get(subscriptions::confirm_redeliver).post(subscriptions::redeliver),
        )
        .route("/console/subscriptions/{id}/retry", get(subscriptions::confirm_retry).post(subscriptions::retry))
        .route("/console/register", get(subscriptions::register_page).post(subscriptions::register))
        .route("/console/secret", get(account::secret_page))
        .route("/console/secret/reveal", post(account::reveal_secret))
        .route("/console/secret/rotate", get(account::confirm_rotate).post(account::rotate))
        .route("/console/{*rest}", get(|| async { html::not_found(None) }))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// The content security policy: nothing inline, nothing from elsewhere, never framed.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    // Pages show a tenant's data: no shared cache, and no copy left on disk (assets say otherwise).
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

/// A signed-in person: their tenant, the key hash they signed in with, and their CSRF token.
pub struct Session {
    pub tenant: Tenant,
    pub key: KeyHash,
    pub csrf: String,
}

impl Session {
    fn nav<'a>(&'a self, current: &'a str) -> html::Nav<'a> {
        html::Nav { tenant_id: self.tenant.id, csrf: &self.csrf, current }
    }
}

impl FromRequestParts<ConsoleState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &ConsoleState) -> Result<Self, Self::Rejection> {
        let to_sign_in = || Redirect::to("/console/sign-in").into_response();
        let token = session::cookie(&parts.headers, session::SESSION_COOKIE).ok_or_else(to_sign_in)?;
        let key = state.keys.verify(token, Timestamp::now()).ok_or_else(to_sign_in)?;
        // Looked up on every request: a revoked key's sessions end at once.
        let tenant = match state.app.store.tenant_by_key(key).await {
            Ok(Some(tenant)) => tenant,
            Ok(None) => return Err(to_sign_in()),
            Err(e) => return Err(error_page(crate::api::ApiError::from(e), None)),
        };
        Ok(Session { tenant, key, csrf: state.keys.csrf(token) })
    }
}

/// A POSTed form whose CSRF token matches the cookie it is bound to and whose Origin (when the browser
/// sends one) is this host. Every state-changing console route takes one.
pub struct CsrfForm(pub Vec<(String, String)>);

impl CsrfForm {
    pub fn get(&self, name: &str) -> &str {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_default()
    }
}

impl FromRequest<ConsoleState> for CsrfForm {
    type Rejection = Response;

    async fn from_request(req: Request, state: &ConsoleState) -> Result<Self, Self::Rejection> {
        if req.method() != Method::POST || !same_origin(req.headers()) {
            return Err(refused());
        }
        // Bound to the session cookie once signed in, to the sign-in nonce before. Either is accepted:
        // both are HttpOnly SameSite=Strict cookies another site can neither read nor send, and a
        // browser may hold both (a session of a revoked key, then the sign-in form).
        let bound_to: Vec<String> = [session::SESSION_COOKIE, session::LOGIN_COOKIE]
            .iter()
            .filter_map(|name| session::cookie(req.headers(), name).map(str::to_owned))
            .collect();
        if bound_to.is_empty() {
            return Err(refused());
        }
        let timeout = state.app.request_timeout;
        let body = tokio::time::timeout(timeout, axum::body::Bytes::from_request(req, state))
            .await
            .map_err(|_| refused())?
            .map_err(|_| refused())?;
        let fields: Vec<(String, String)> =
            url::form_urlencoded::parse(&body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        let form = CsrfForm(fields);
        if !bound_to.iter().any(|cookie| state.keys.check_csrf(cookie, form.get("csrf"))) {
            return Err(refused());
        }
        Ok(form)
    }
}

/// Whether a POST comes from a page of this host: the Origin header, which browsers send on every
/// cross-origin POST, names this host (or is absent, as from older browsers and non-browser clients).
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = origin.to_str().ok().and_then(|o| url::Url::parse(o).ok());
    match (origin, host) {
        (Some(origin), Some(host)) => {
            let authority = match origin.port() {
                Some(port) => format!("{}:{port}", origin.host_str().unwrap_or_default()),
                None => origin.host_str().unwrap_or_default().to_owned(),
            };
            authority.eq_ignore_ascii_case(host)
        }
        _ => false,
    }
}

/// The answer to a POST without a valid CSRF token or from another origin.
fn refused() -> Response {
    html::page(
        StatusCode::FORBIDDEN,
        "Refused",
        None,
        "<h1>This form was refused</h1><p>It was sent without this console's security token, or from \
         another site. Reload the page and try again.</p><p><a href=\"/console/subscriptions\">Back to \
         the console</a></p>",
    )
}

/// An API error as a page of its own (for errors that belong to no field).
fn error_page(error: crate::api::ApiError, nav: Option<&html::Nav<'_>>) -> Response {
    let status = error.status();
    if status == StatusCode::NOT_FOUND {
        return html::not_found(nav);
    }
    let main = format!(
        "<h1>Something went wrong</h1>{}<p><a href=\"/console/subscriptions\">Back to your subscriptions</a></p>",
        html::notice("error", &error.to_string())
    );
    html::page(status, "Error", nav, &main)
}
