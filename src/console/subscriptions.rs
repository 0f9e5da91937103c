//! The subscription pages: the list, one subscription with its delivery timeline, the confirmations and
//! actions (redeliver, cancel), and registering a job by hand. Reads and actions go through the API's
//! handlers or the same store calls, so their rules and messages are the API's.

use std::fmt::Write;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use strum::VariantArray;

use super::account::sentence;
use super::html::{self, csrf_field, esc, q};
use super::{ConsoleState, CsrfForm, Session};
use crate::api::subscriptions::{self as api, ListQuery, SubscriptionView, TenantSubscription};
use crate::api::{ApiError, AppState};
use crate::domain::{CallbackUrl, SubscriptionId, SubscriptionState};
use crate::store::{AttemptRecord, TenantSub};

/// Rows per page.
const PAGE_SIZE: u32 = 25;
/// How often a page with a live subscription refreshes (the script reads it from the page).
const LIVE_REFRESH_MS: u32 = 1000;
/// How often the list's first page refreshes otherwise, so new registrations appear.
const FIRST_PAGE_REFRESH_MS: u32 = 5000;

fn live(state: SubscriptionState) -> bool {
    matches!(state, SubscriptionState::Polling | SubscriptionState::Delivering)
}

#[derive(Deserialize, Default)]
pub struct ListParams {
    #[serde(default)]
    state: String,
    #[serde(default)]
    job_id: String,
    #[serde(default)]
    cursor: String,
}

/// Newest first, filtered by state and job ID, paged with the API's cursors.
/// The API's list query for the console's filters (a job of the default profile, a state, a page).
fn api_query(params: &ListParams) -> ListQuery {
    let nonempty = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    ListQuery {
        job_id: nonempty(&params.job_id),
        upstream: None,
        state: nonempty(&params.state),
        limit: Some(PAGE_SIZE.to_string()),
        cursor: nonempty(&params.cursor),
    }
}

pub async fn list(
    State(state): State<ConsoleState>,
    session: Session,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Response {
    let params = params.map(|Query(p)| p).unwrap_or_default();
    let page = api::list(State(state.app.clone()), session.tenant.clone(), Ok(Query(api_query(&params)))).await;
    let nav = session.nav("subscriptions");

    let mut main = String::from("<h1>Subscriptions</h1>");
    let options: String = std::iter::once(("", "any state"))
        .chain(SubscriptionState::VARIANTS.iter().map(|s| (s.as_str(), s.as_str())))
        .map(|(value, label)| {
            let selected = if params.state.trim() == value { " selected" } else { "" };
            format!("<option value=\"{value}\"{selected}>{label}</option>")
        })
        .collect();
    let _ = write!(
        main,
        "<form method=\"get\" action=\"/console/subscriptions\" class=\"filters\" role=\"search\">\
         <div><label for=\"state\">State</label><select id=\"state\" name=\"state\">{options}</select></div>\
         <div><label for=\"job_id\">Job ID</label><input type=\"text\" id=\"job_id\" name=\"job_id\" value=\"{}\" \
         placeholder=\"any job\" spellcheck=\"false\" autocomplete=\"off\"></div>\
         <div><button type=\"submit\">Filter</button> <a href=\"/console/subscriptions\">Clear</a></div></form>",
        esc(params.job_id.trim()),
    );
    let page = match page {
        Ok(axum::Json(page)) => page,
        Err(e @ ApiError::BadRequest(_)) => {
            main.push_str(&html::notice("error", &sentence(&e.to_string())));
            return html::page(StatusCode::BAD_REQUEST, "Subscriptions", Some(&nav), &main);
        }
        Err(e) => return super::error_page(e, Some(&nav)),
    };
    // Refreshed each second while a row is live; the first page also every few seconds, for new rows.
    let interval = match (page.items.iter().any(|s| live(s.state)), params.cursor.is_empty()) {
        (true, _) => Some(LIVE_REFRESH_MS),
        (false, true) => Some(FIRST_PAGE_REFRESH_MS),
        (false, false) => None,
    };
    let _ = write!(
        main,
        "<div data-live=\"{}\" data-interval=\"{}\">",
        interval.is_some(),
        interval.unwrap_or(LIVE_REFRESH_MS)
    );
    if page.items.is_empty() {
        main.push_str(
            "<p>No subscriptions match. <a href=\"/console/register\">Register a job</a> or use the API.</p>",
        );
    } else {
        main.push_str(
            "<div class=\"scroll\"><table class=\"subs\"><caption class=\"hint\">Newest first</caption><thead><tr>\
             <th scope=\"col\">State</th><th scope=\"col\">Job</th><th scope=\"col\">Callback URL</th>\
             <th scope=\"col\">Attempts</th><th scope=\"col\">Created</th></tr></thead><tbody>",
        );
        for sub in &page.items {
            row(&mut main, sub);
        }
        main.push_str("</tbody></table></div>");
    }
    main.push_str("<nav class=\"pager\" aria-label=\"Pages\">");
    let filters = format!("state={}&job_id={}", q(params.state.trim()), q(params.job_id.trim()));
    if !params.cursor.is_empty() {
        let _ = write!(main, "<a href=\"/console/subscriptions?{filters}\">First page</a>");
    }
    if let Some(next) = &page.next_cursor {
        let _ =
            write!(main, "<a href=\"/console/subscriptions?{filters}&cursor={}\" rel=\"next\">Next page</a>", q(next));
    }
    main.push_str("</nav></div>");
    html::page(StatusCode::OK, "Subscriptions", Some(&nav), &main)
}

fn row(out: &mut String, sub: &SubscriptionView) {
    let _ = write!(
        out,
        "<tr><td data-label=\"State\">{}</td><td data-label=\"Job\"><a class=\"mono\" href=\"/console/subscriptions/{}\">{}</a></td>\
         <td data-label=\"Callback\" class=\"mono\">{}</td><td data-label=\"Attempts\">{}</td><td data-label=\"Created\">{}</td></tr>",
        html::state_badge(sub.state),
        esc(&sub.id),
        esc(&sub.job_id),
        esc(&sub.callback_url),
        sub.attempts,
        html::time(&sub.created_at),
    );
}

/// The `{id}` of a console path, if it is one; anything else is the 404 page.
fn parse_id(raw: &str) -> Option<SubscriptionId> {
    raw.parse().ok()
}

#[derive(Deserialize, Default)]
pub struct DetailParams {
    /// What the action before the redirect did (`cancelled`, `redelivered`, `registered`).
    #[serde(default)]
    done: String,
}

/// One subscription: its fields, the job's last status and error, every delivery attempt, and actions.
pub async fn detail(
    State(state): State<ConsoleState>,
    session: Session,
    Path(raw): Path<String>,
    params: Result<Query<DetailParams>, QueryRejection>,
) -> Response {
    let Some(id) = parse_id(&raw) else {
        return html::not_found(Some(&session.nav("subscriptions")));
    };
    let done = params.map(|Query(p)| p.done).unwrap_or_default();
    let notice = match done.as_str() {
        "cancelled" => html::notice("ok", "The subscription was cancelled."),
        "redelivered" => html::notice("ok", "A new delivery series has started."),
        "retried" => html::notice("ok", "The next attempt is being made now."),
        "registered" => html::notice("ok", "The job was registered."),
        _ => String::new(),
    };
    detail_page(&state, &session, id, StatusCode::OK, &notice).await
}

async fn detail_page(
    state: &ConsoleState,
    session: &Session,
    id: SubscriptionId,
    status: StatusCode,
    notice: &str,
) -> Response {
    let nav = session.nav("subscriptions");
    let store = &state.app.store;
    let key = TenantSub { tenant_id: session.tenant.id, id };
    let (sub, attempts) = match tokio::try_join!(store.subscription(key), store.attempts(key)) {
        Ok((Some(sub), Some(attempts))) => (SubscriptionView::from(sub), attempts),
        Ok(_) => return html::not_found(Some(&nav)),
        Err(e) => return super::error_page(e.into(), Some(&nav)),
    };
    let mut main = String::new();
    let _ = write!(
        main,
        "<p><a href=\"/console/subscriptions\">← All subscriptions</a></p><h1>Subscription</h1>{notice}\
         <div data-live=\"{}\" data-interval=\"{LIVE_REFRESH_MS}\"><dl class=\"fields\">\
         <dt>State</dt><dd>{}</dd>\
         <dt>ID</dt><dd class=\"mono\">{}</dd>\
         <dt>Job ID</dt><dd class=\"mono\">{}</dd>\
         <dt>Callback URL</dt><dd class=\"mono\">{}</dd>\
         <dt>Job status</dt><dd>{}</dd>",
        live(sub.state),
        html::state_badge(sub.state),
        esc(&sub.id),
        esc(&sub.job_id),
        esc(&sub.callback_url),
        sub.job_status.map(|s| esc(s.as_str())).unwrap_or_else(|| "not seen yet".into()),
    );
    outcome_fields(&mut main, &sub);
    let _ = write!(
        main,
        "<dt>Created</dt><dd>{}</dd><dt>Updated</dt><dd>{}</dd></dl>",
        html::time(&sub.created_at),
        html::time(&sub.updated_at)
    );

    main.push_str("<div class=\"actions\">");
    if matches!(sub.state, SubscriptionState::Delivered | SubscriptionState::Failed) {
        let _ = write!(
            main,
            "<a class=\"button primary\" href=\"/console/subscriptions/{}/redeliver\">Redeliver…</a>",
            esc(&sub.id)
        );
    }
    if sub.state == SubscriptionState::Delivering {
        let _ = write!(
            main,
            "<a class=\"button primary\" href=\"/console/subscriptions/{}/retry\">Retry now…</a>",
            esc(&sub.id)
        );
    }
    if live(sub.state) {
        let _ = write!(
            main,
            "<a class=\"button danger\" href=\"/console/subscriptions/{}/cancel\">Cancel subscription…</a>",
            esc(&sub.id)
        );
    }
    main.push_str("</div>");

    let _ = write!(main, "<h2 id=\"timeline\">Delivery attempts ({})</h2>", attempts.len());
    if attempts.is_empty() {
        main.push_str("<p>No delivery attempt yet.</p>");
    } else {
        main.push_str("<ol class=\"timeline\" aria-labelledby=\"timeline\">");
        for attempt in &attempts {
            timeline_item(&mut main, attempt);
        }
        main.push_str("</ol>");
    }
    main.push_str("</div>");
    html::page(status, "Subscription", Some(&nav), &main)
}

/// The fields that change over a subscription's life: errors, its headers' names, its `webhook-id`,
/// its attempts.
fn outcome_fields(main: &mut String, sub: &SubscriptionView) {
    if let Some(error) = &sub.last_error {
        let _ = write!(main, "<dt>Last polling error</dt><dd class=\"bad\">{}</dd>", esc(error));
    }
    if let Some(reason) = sub.failure_reason {
        let _ = write!(main, "<dt>Failure reason</dt><dd class=\"bad\">{}</dd>", esc(reason.as_str()));
    }
    if !sub.header_names.is_empty() {
        // Names only: the values are secrets, and the API does not return them either.
        let names = sub.header_names.iter().map(|n| esc(n)).collect::<Vec<_>>().join(", ");
        let _ = write!(main, "<dt>Custom headers</dt><dd class=\"mono\">{names}</dd>");
    }
    if let Some(webhook_id) = &sub.webhook_id {
        let _ = write!(main, "<dt>webhook-id</dt><dd class=\"mono\">{}</dd>", esc(webhook_id));
    }
    let _ = write!(main, "<dt>Attempts (this series)</dt><dd>{}</dd>", sub.attempts);
    if let Some(next) = &sub.next_attempt_at {
        let _ = write!(main, "<dt>Next attempt</dt><dd>{}</dd>", html::time(next));
    }
}

fn timeline_item(out: &mut String, a: &AttemptRecord) {
    let ok = a.status_code.is_some_and(|c| (200..300).contains(&c));
    let outcome = match a.status_code {
        Some(code) => format!("<span class=\"{}\">HTTP {code}</span>", if ok { "ok" } else { "bad" }),
        None => "<span class=\"bad\">no answer</span>".to_owned(),
    };
    let _ = write!(
        out,
        "<li class=\"{}\"><strong>Series {}, attempt {}</strong> · {outcome} · {} ms · {}",
        if ok { "attempt-ok" } else { "attempt-bad" },
        a.series,
        a.attempt,
        a.duration_ms,
        html::time(&a.started_at.rfc3339()),
    );
    if let Some(error) = &a.error {
        let _ = write!(out, "<br><span class=\"bad\">Error: {}</span>", esc(error));
    }
    if let Some(body) = a.response_body.as_deref().filter(|b| !b.is_empty()) {
        let kind = a.response_content_type.as_deref().map(|t| format!(" ({})", esc(t))).unwrap_or_default();
        let _ = write!(out, "<br>Answer{kind}:<pre class=\"answer\">{}</pre>", esc(body));
    }
    out.push_str("</li>");
}

/// A confirmation page for an action on one subscription.
async fn confirm(
    state: &ConsoleState,
    session: &Session,
    raw: &str,
    action: &str,
    title: &str,
    explain: &str,
    button: &str,
) -> Response {
    let nav = session.nav("subscriptions");
    let Some(id) = parse_id(raw) else {
        return html::not_found(Some(&session.nav("subscriptions")));
    };
    let sub = match state.app.store.subscription(TenantSub { tenant_id: session.tenant.id, id }).await {
        Ok(Some(sub)) => sub,
        Ok(None) => return html::not_found(Some(&nav)),
        Err(e) => return super::error_page(e.into(), Some(&nav)),
    };
    let main = format!(
        "<h1>{title}</h1><p>Job <code>{}</code> → <code>{}</code> ({})</p><p>{explain}</p>\
         <form method=\"post\" action=\"/console/subscriptions/{id}/{action}\" class=\"actions\">{}\
         <button type=\"submit\" class=\"{}\">{button}</button>\
         <a class=\"button\" href=\"/console/subscriptions/{id}\">Go back</a></form>",
        esc(&sub.job_id.to_string()),
        esc(&sub.callback_url),
        html::state_badge(sub.state),
        csrf_field(&session.csrf),
        if action == "cancel" { "danger" } else { "primary" },
    );
    html::page(StatusCode::OK, title, Some(&nav), &main)
}

pub async fn confirm_cancel(State(state): State<ConsoleState>, session: Session, Path(raw): Path<String>) -> Response {
    confirm(
        &state,
        &session,
        &raw,
        "cancel",
        "Cancel this subscription?",
        "Polling and delivery stop and the subscription ends as cancelled. It cannot be undone; to be \
         called back after all, register the job again.",
        "Yes, cancel it",
    )
    .await
}

pub async fn confirm_redeliver(
    State(state): State<ConsoleState>,
    session: Session,
    Path(raw): Path<String>,
) -> Response {
    confirm(
        &state,
        &session,
        &raw,
        "redeliver",
        "Redeliver the job's result?",
        "A new delivery series starts now, from the first step of the retry schedule, under the same \
         webhook-id. A receiver that drops duplicates by webhook-id drops it too unless it forgot that ID.",
        "Yes, redeliver",
    )
    .await
}

pub async fn confirm_retry(State(state): State<ConsoleState>, session: Session, Path(raw): Path<String>) -> Response {
    confirm(
        &state,
        &session,
        &raw,
        "retry",
        "Retry now?",
        "The delivery is waiting for its next retry. Its next attempt is made now instead, in the same series \
         and under the same webhook-id; if it fails, the retry schedule goes on from there.",
        "Yes, retry now",
    )
    .await
}

/// Makes a waiting delivery's next attempt now, through the API's redeliver handler (which does exactly
/// that for a delivering subscription, and starts a new series if it has ended meanwhile).
pub async fn retry(state: State<ConsoleState>, session: Session, raw: Path<String>, _form: CsrfForm) -> Response {
    act(state, session, raw, "retried", api::redeliver).await
}

/// Cancels through the API's handler (which waits for an attempt on the wire, as the API does).
pub async fn cancel(state: State<ConsoleState>, session: Session, raw: Path<String>, _form: CsrfForm) -> Response {
    act(state, session, raw, "cancelled", api::cancel).await
}

/// Redelivers through the API's handler.
pub async fn redeliver(state: State<ConsoleState>, session: Session, raw: Path<String>, _form: CsrfForm) -> Response {
    act(state, session, raw, "redelivered", api::redeliver).await
}

/// The API's `handler` for the subscription, then its page with the notice `done`.
async fn act<T, F>(
    State(state): State<ConsoleState>,
    session: Session,
    Path(raw): Path<String>,
    done: &str,
    handler: impl FnOnce(State<AppState>, TenantSubscription) -> F,
) -> Response
where
    F: Future<Output = Result<T, ApiError>>,
{
    let Some(id) = parse_id(&raw) else {
        return html::not_found(Some(&session.nav("subscriptions")));
    };
    match handler(State(state.app.clone()), TenantSubscription::new(session.tenant.clone(), id)).await {
        Ok(_) => Redirect::to(&format!("/console/subscriptions/{id}?done={done}")).into_response(),
        Err(e) => action_failed(&state, &session, id, e).await,
    }
}

/// The subscription's page again, with the API's reason the action did not happen.
async fn action_failed(state: &ConsoleState, session: &Session, id: SubscriptionId, e: ApiError) -> Response {
    match e {
        ApiError::NotFound(_) => html::not_found(Some(&session.nav("subscriptions"))),
        ApiError::Conflict(_) | ApiError::Unavailable => {
            let status = e.status();
            detail_page(state, session, id, status, &html::notice("error", &sentence(&e.to_string()))).await
        }
        e => super::error_page(e, Some(&session.nav("subscriptions"))),
    }
}

/// The registration form, with what was typed and the API's message next to the field it is about.
fn register_form(
    session: &Session,
    status: StatusCode,
    job_id: &str,
    callback_url: &str,
    errors: &FieldErrors,
) -> Response {
    let field = |name: &str, label: &str, kind: &str, value: &str, hint: &str, error: &Option<String>| {
        let (invalid, described, message) = match error {
            Some(e) => (
                " aria-invalid=\"true\"",
                format!(" aria-describedby=\"{name}-error {name}-hint\""),
                format!("<p class=\"field-error\" id=\"{name}-error\">{}</p>", esc(e)),
            ),
            None => ("", format!(" aria-describedby=\"{name}-hint\""), String::new()),
        };
        format!(
            "<div class=\"field\"><label for=\"{name}\">{label}</label><input type=\"{kind}\" id=\"{name}\" \
             name=\"{name}\" value=\"{}\" required spellcheck=\"false\" autocomplete=\"off\"{invalid}{described}>\
             {message}<p class=\"hint\" id=\"{name}-hint\">{hint}</p></div>",
            esc(value)
        )
    };
    let general = errors.general.as_deref().map(|e| html::notice("error", e)).unwrap_or_default();
    let main = format!(
        "<h1>Register a job</h1>{general}<p>jobhook polls the job until it ends and POSTs its result, signed, \
         to the callback URL — what <code>POST /v1/subscriptions</code> does.</p>\
         <form method=\"post\" action=\"/console/register\" novalidate>{}{}{}\
         <button type=\"submit\" class=\"primary\">Register</button></form>",
        csrf_field(&session.csrf),
        field("job_id", "Job ID", "text", job_id, "The upstream job's ID, a UUID.", &errors.job_id),
        field(
            "callback_url",
            "Callback URL",
            "url",
            callback_url,
            "An absolute http(s) URL; it must be allowed by this service's egress policy.",
            &errors.callback_url
        ),
    );
    html::page(status, "Register a job", Some(&session.nav("register")), &main)
}

#[derive(Default)]
struct FieldErrors {
    job_id: Option<String>,
    callback_url: Option<String>,
    general: Option<String>,
}

pub async fn register_page(session: Session) -> Response {
    register_form(&session, StatusCode::OK, "", "", &FieldErrors::default())
}

/// Registers with the same parsing, egress check and store write as `POST /v1/subscriptions`.
pub async fn register(State(state): State<ConsoleState>, session: Session, form: CsrfForm) -> Response {
    let (raw_job, raw_url) = (form.get("job_id").trim(), form.get("callback_url").trim());
    let mut errors = FieldErrors::default();
    let job_id = state.app.job_ids.parse(None, raw_job).map_err(|e| errors.job_id = Some(sentence(&e))).ok();
    let url = raw_url.parse::<CallbackUrl>().map_err(|e| errors.callback_url = Some(sentence(&e))).ok();
    let (Some(job_id), Some(url)) = (job_id, url) else {
        return register_form(&session, StatusCode::UNPROCESSABLE_ENTITY, raw_job, raw_url, &errors);
    };
    let registered = match state.app.egress.check_registration(&url, &state.app.lookup).await {
        Ok(()) => {
            crate::api::to_the_end(api::register(state.app.clone(), session.key, job_id, url, Default::default())).await
        }
        Err(refusal) => Err(refusal.into()),
    };
    match registered {
        Ok((_, sub)) => Redirect::to(&format!("/console/subscriptions/{}?done=registered", sub.id)).into_response(),
        Err(e @ (ApiError::Invalid(_) | ApiError::DnsUnavailable(_))) => {
            errors.callback_url = Some(sentence(&e.to_string()));
            register_form(&session, e.status(), raw_job, raw_url, &errors)
        }
        Err(ApiError::Unauthorized(_)) => Redirect::to("/console/sign-in").into_response(),
        Err(e @ ApiError::Unavailable) => {
            errors.general = Some(sentence(&e.to_string()));
            register_form(&session, e.status(), raw_job, raw_url, &errors)
        }
        Err(e) => super::error_page(e, Some(&session.nav("register"))),
    }
}
