//! Signing in and out, and the signing secret: shown masked, revealed on request, rotated after a
//! confirmation that explains the grace period.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::html::{self, csrf_field, esc};
use super::session::{self, LOGIN_COOKIE, SESSION_COOKIE, SESSION_FOR};
use super::{ConsoleState, CsrfForm, Session};
use crate::domain::Timestamp;
use crate::keys::KeyHash;

#[derive(Deserialize)]
pub struct SignInQuery {
    #[serde(default, rename = "signed-out")]
    signed_out: Option<String>,
}

/// The sign-in form. It sets the nonce cookie its CSRF token is bound to.
pub async fn sign_in_page(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    query: Result<Query<SignInQuery>, QueryRejection>,
) -> Response {
    let signed_out = query.is_ok_and(|Query(q)| q.signed_out.is_some());
    sign_in_form(&state, &headers, StatusCode::OK, None, signed_out)
}

fn sign_in_form(
    state: &ConsoleState,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<&str>,
    signed_out: bool,
) -> Response {
    // Kept if the browser has one, so two open sign-in tabs both work.
    let nonce = session::cookie(headers, LOGIN_COOKIE).map(str::to_owned).unwrap_or_else(session::nonce);
    let (invalid, described, message) = match error {
        Some(e) => (
            " aria-invalid=\"true\"",
            " aria-describedby=\"key-error key-hint\"",
            format!("<p class=\"field-error\" id=\"key-error\" role=\"alert\">{}</p>", esc(e)),
        ),
        None => ("", " aria-describedby=\"key-hint\"", String::new()),
    };
    let notice = if signed_out { html::notice("ok", "You have signed out.") } else { String::new() };
    let main = format!(
        "<h1>Sign in</h1>{notice}<form method=\"post\" action=\"/console/sign-in\">{}\
         <div class=\"field\"><label for=\"key\">API key</label>\
         <input type=\"password\" id=\"key\" name=\"key\" autocomplete=\"current-password\" required autofocus{invalid}{described}>\
         {message}<p class=\"hint\" id=\"key-hint\">The key you use as <code>Authorization: Bearer</code> with the API. \
         It is exchanged for a session cookie and not kept in the browser.</p></div>\
         <button type=\"submit\" class=\"primary\">Sign in</button></form>",
        csrf_field(&state.keys.csrf(&nonce)),
    );
    let mut response = html::page(status, "Sign in", None, &main);
    let cookie =
        session::set_cookie(LOGIN_COOKIE, &nonce, std::time::Duration::from_secs(3600), session::over_tls(headers));
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

/// Exchanges an API key for a session cookie.
pub async fn sign_in(State(state): State<ConsoleState>, headers: HeaderMap, form: CsrfForm) -> Response {
    let presented = form.get("key").trim();
    if presented.is_empty() {
        return sign_in_form(&state, &headers, StatusCode::UNPROCESSABLE_ENTITY, Some("Enter your API key."), false);
    }
    let key = KeyHash::of(presented);
    match state.app.store.tenant_by_key(key).await {
        Ok(Some(tenant)) => {
            let expires = Timestamp::now() + SESSION_FOR;
            let token = state.keys.issue(key, expires);
            let tls = session::over_tls(&headers);
            tracing::info!(tenant_id = tenant.id, "console: signed in");
            let mut response = Redirect::to("/console/subscriptions").into_response();
            let jar = response.headers_mut();
            jar.append(header::SET_COOKIE, session::set_cookie(SESSION_COOKIE, &token, SESSION_FOR, tls));
            jar.append(header::SET_COOKIE, session::set_cookie(LOGIN_COOKIE, "", std::time::Duration::ZERO, tls));
            response
        }
        Ok(None) => sign_in_form(
            &state,
            &headers,
            StatusCode::UNAUTHORIZED,
            Some(&sentence(&crate::api::UNKNOWN_KEY.to_string())),
            false,
        ),
        Err(e) => super::error_page(e.into(), None),
    }
}

/// An API message as a sentence: capitalised, with a full stop.
pub fn sentence(message: &str) -> String {
    let mut chars = message.chars();
    let first = chars.next().map(|c| c.to_uppercase().collect::<String>()).unwrap_or_default();
    let end = if message.ends_with('.') { "" } else { "." };
    format!("{first}{}{end}", chars.as_str())
}

/// Clears the session cookie.
pub async fn sign_out(headers: HeaderMap, _form: CsrfForm) -> Response {
    let mut response = Redirect::to("/console/sign-in?signed-out=1").into_response();
    let cookie = session::set_cookie(SESSION_COOKIE, "", std::time::Duration::ZERO, session::over_tls(&headers));
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

/// A grace period as people say it: "24 hours", "90 minutes" (humantime's "1day" reads as a typo).
fn in_words(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    let plural = |n: u64, unit: &str| if n == 1 { format!("1 {unit}") } else { format!("{n} {unit}s") };
    match secs {
        0 => humantime::format_duration(d).to_string(),
        s if s % 3600 == 0 => plural(s / 3600, "hour"),
        s if s % 60 == 0 => plural(s / 60, "minute"),
        _ => humantime::format_duration(d).to_string(),
    }
}

/// `whsec_` and the last four characters: enough to tell two secrets apart, not to sign.
fn masked(secret: &str) -> String {
    let tail: String = secret.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
    format!("whsec_••••••••••••••••{tail}")
}

#[derive(Deserialize)]
pub struct SecretQuery {
    /// After a rotation: until when the previous secret keeps signing (RFC 3339; not a secret).
    rotated: Option<String>,
}

pub async fn secret_page(
    State(state): State<ConsoleState>,
    session: Session,
    query: Result<Query<SecretQuery>, QueryRejection>,
) -> Response {
    let rotated = query.ok().and_then(|Query(q)| q.rotated);
    secret_view(&state, &session, false, rotated.as_deref())
}

/// The same page with the secret in clear (a POST, so it is never in a URL, a history or a cache).
pub async fn reveal_secret(State(state): State<ConsoleState>, session: Session, _form: CsrfForm) -> Response {
    secret_view(&state, &session, true, None)
}

fn secret_view(state: &ConsoleState, session: &Session, revealed: bool, rotated: Option<&str>) -> Response {
    let secret = session.tenant.secret.expose();
    let grace = in_words(state.app.secret_rotation_grace);
    let notice = match rotated {
        Some(until) => format!(
            "<p class=\"notice notice-ok\" role=\"status\">The secret was rotated. Until {} deliveries carry a \
             second signature made with the previous secret; give your receiver the new one before then.</p>",
            html::time(until)
        ),
        None => String::new(),
    };
    let (shown, toggle) = if revealed {
        (
            format!("<code class=\"secret\" id=\"secret\">{}</code>", esc(&secret)),
            "<a class=\"button\" href=\"/console/secret\">Hide</a>".to_owned(),
        )
    } else {
        (
            format!("<code class=\"secret\" id=\"secret\">{}</code> (masked)", esc(&masked(&secret))),
            format!(
                "<form method=\"post\" action=\"/console/secret/reveal\">{}<button type=\"submit\">Reveal \
                 secret</button></form>",
                csrf_field(&session.csrf)
            ),
        )
    };
    let main = format!(
        "<h1>Signing secret</h1>{notice}<p>Every delivery to your receivers is signed with this secret \
         (Standard Webhooks). Give it to your receiver's verification library.</p>\
         <p><strong>Current secret:</strong> {shown}</p><div class=\"actions\">{toggle}\
         <a class=\"button danger\" href=\"/console/secret/rotate\">Rotate secret…</a></div>\
         <p class=\"hint\">After a rotation, deliveries carry signatures with both the new and the previous \
         secret for {grace}.</p>"
    );
    html::page(StatusCode::OK, "Signing secret", Some(&session.nav("secret")), &main)
}

/// The confirmation before a rotation.
pub async fn confirm_rotate(State(state): State<ConsoleState>, session: Session) -> Response {
    let grace = in_words(state.app.secret_rotation_grace);
    let main = format!(
        "<h1>Rotate the signing secret?</h1><p>A new secret is made and signs every delivery from now on. \
         For the next <strong>{grace}</strong> (the grace period) each delivery also carries a signature \
         made with the current secret, so receivers that still hold it keep verifying. Give your \
         receivers the new secret within that time.</p><p>Rotating again within the grace period ends \
         the older secret's grace at once.</p>\
         <form method=\"post\" action=\"/console/secret/rotate\" class=\"actions\">{}\
         <button type=\"submit\" class=\"danger\">Yes, rotate the secret</button>\
         <a class=\"button\" href=\"/console/secret\">Keep the current secret</a></form>",
        csrf_field(&session.csrf)
    );
    html::page(StatusCode::OK, "Rotate the signing secret?", Some(&session.nav("secret")), &main)
}

/// Rotates through the API's own handler.
pub async fn rotate(State(state): State<ConsoleState>, session: Session, _form: CsrfForm) -> Response {
    let nav = session.nav("secret");
    match crate::api::rotate_signing_secret(State(state.app.clone()), session.tenant.clone()).await {
        Ok(axum::Json(rotated)) => {
            Redirect::to(&format!("/console/secret?rotated={}", html::q(&rotated.previous_secret_valid_until)))
                .into_response()
        }
        Err(e) => super::error_page(e, Some(&nav)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grace_period_reads_as_words() {
        assert_eq!(in_words(std::time::Duration::from_secs(24 * 3600)), "24 hours");
        assert_eq!(in_words(std::time::Duration::from_secs(3600)), "1 hour");
        assert_eq!(in_words(std::time::Duration::from_secs(90 * 60)), "90 minutes");
        assert_eq!(in_words(std::time::Duration::from_millis(1500)), "1s 500ms");
    }

    #[test]
    fn a_masked_secret_shows_only_its_last_four_characters() {
        let shown = masked("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        assert!(shown.ends_with("LaSw") && !shown.contains("MfKQ"), "{shown}");
    }
}
