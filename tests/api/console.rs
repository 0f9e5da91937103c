//! The web console's security properties, on the real router and a real socket. What a person sees is
//! checked in a real browser by tests/console/browser-test.mjs.

use std::time::Duration;

use jobhook::domain::{SubscriptionState, Timestamp};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};

use crate::support::helpers::{KEY_A, KEY_B, Settings, TestApp, eventually, new_job, spawn_app, spawn_app_with};

/// A client that follows no redirect, so each answer is seen as sent.
fn browser() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// `name=value` of the named cookie among a response's `Set-Cookie` headers, and the whole header.
fn set_cookie(headers: &HeaderMap, name: &str) -> Option<(String, String)> {
    headers.get_all(header::SET_COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        let pair = v.split(';').next()?.trim();
        pair.starts_with(&format!("{name}=")).then(|| (pair.to_owned(), v.to_owned()))
    })
}

/// The CSRF token of the first form on a page.
fn csrf_of(html: &str) -> String {
    let start = html.find("name=\"csrf\" value=\"").expect("the page has a form with a CSRF token") + 19;
    html[start..].split('"').next().unwrap().to_owned()
}

/// A form body, as a browser sends it.
trait Form {
    fn form_body(self, fields: &[(&str, &str)]) -> Self;
}

impl Form for reqwest::RequestBuilder {
    fn form_body(self, fields: &[(&str, &str)]) -> Self {
        let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish();
        self.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(body)
    }
}

/// A signed-in browser: its session cookie and CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

async fn sign_in(app: &TestApp, key: &str) -> Session {
    let (status, headers, _) = try_sign_in(app, key, &HeaderMap::new()).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (cookie, _) = set_cookie(&headers, "jobhook_session").expect("a session cookie");
    let page = browser().get(app.url("/console/subscriptions")).header(header::COOKIE, &cookie).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csrf = csrf_of(&page.text().await.unwrap());
    Session { cookie, csrf }
}

/// Loads the sign-in form and posts `key` with its token; the answer's status, headers and body.
async fn try_sign_in(app: &TestApp, key: &str, extra: &HeaderMap) -> (StatusCode, HeaderMap, String) {
    let form = browser().get(app.url("/console/sign-in")).send().await.unwrap();
    let (nonce, _) = set_cookie(form.headers(), "jobhook_signin").expect("the sign-in nonce cookie");
    let csrf = csrf_of(&form.text().await.unwrap());
    let answer = browser()
        .post(app.url("/console/sign-in"))
        .headers(extra.clone())
        .header(header::COOKIE, nonce)
        .form_body(&[("csrf", csrf.as_str()), ("key", key)])
        .send()
        .await
        .unwrap();
    (answer.status(), answer.headers().clone(), answer.text().await.unwrap())
}

async fn post_as(app: &TestApp, session: &Session, path: &str, fields: &[(&str, &str)]) -> reqwest::Response {
    browser().post(app.url(path)).header(header::COOKIE, &session.cookie).form_body(fields).send().await.unwrap()
}

#[tokio::test]
async fn console_pages_forbid_inline_script_and_framing() {
    let app = spawn_app().await;
    for path in ["/console/sign-in", "/console/subscriptions", "/console/no-such-page"] {
        let response = browser().get(app.url(path)).send().await.unwrap();
        let csp = response.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().to_owned();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'none'"), "{path}: {csp}");
        assert_eq!(response.headers()[header::X_FRAME_OPTIONS], "DENY", "{path}");
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store", "{path}");
    }
    let html = browser().get(app.url("/console/sign-in")).send().await.unwrap().text().await.unwrap();
    let inline = ["<script>", "onclick=", "onload=", "onsubmit=", "javascript:", "style="];
    assert!(inline.iter().all(|i| !html.contains(i)), "no inline script, handler or style: {html}");
}

#[tokio::test]
async fn the_session_cookie_is_httponly_and_samesite_strict_and_secure_behind_tls() {
    let app = spawn_app().await;
    let (status, headers, _) = try_sign_in(&app, KEY_A, &HeaderMap::new()).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, cookie) = set_cookie(&headers, "jobhook_session").unwrap();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(cookie.contains("Path=/console") && cookie.contains("Max-Age="), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP cannot keep a Secure cookie: {cookie}");
    assert!(!cookie.contains(KEY_A), "the key itself is never in the cookie");

    let mut tls = HeaderMap::new();
    tls.insert("x-forwarded-proto", "https".parse().unwrap());
    let (_, headers, _) = try_sign_in(&app, KEY_A, &tls).await;
    let (_, cookie) = set_cookie(&headers, "jobhook_session").unwrap();
    assert!(cookie.contains("; Secure"), "behind a TLS proxy the cookie is Secure: {cookie}");
}

#[tokio::test]
async fn a_wrong_key_is_refused_with_the_apis_words() {
    let app = spawn_app().await;
    let (status, headers, html) = try_sign_in(&app, "not-a-key-of-this-service", &HeaderMap::new()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(set_cookie(&headers, "jobhook_session").is_none());
    assert!(html.contains("This API key is not valid (unknown or revoked)."), "{html}");
}

#[tokio::test]
async fn pages_need_a_session_and_a_forged_one_is_not_one() {
    let app = spawn_app().await;
    let plain = browser().get(app.url("/console/subscriptions")).send().await.unwrap();
    assert_eq!(plain.status(), StatusCode::SEE_OTHER);
    assert_eq!(plain.headers()[header::LOCATION], "/console/sign-in");
    let session = sign_in(&app, KEY_A).await;
    // One character in the middle of the token (inside the key hash) changed.
    let mut forged = session.cookie.clone().into_bytes();
    let middle = forged.len() - 60;
    forged[middle] = if forged[middle] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let response =
        browser().get(app.url("/console/subscriptions")).header(header::COOKIE, forged).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER, "an altered token is no session");
}

#[tokio::test]
async fn a_post_without_the_csrf_token_or_from_another_site_is_refused() {
    let app = crate::support::helpers::spawn_app_with(Settings::never_ending()).await;
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let id = sub["id"].as_str().unwrap();
    let session = sign_in(&app, KEY_A).await;
    let cancel = format!("/console/subscriptions/{id}/cancel");

    assert_eq!(post_as(&app, &session, &cancel, &[]).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(post_as(&app, &session, &cancel, &[("csrf", "forged")]).await.status(), StatusCode::FORBIDDEN);
    let other_site = browser()
        .post(app.url(&cancel))
        .header(header::COOKIE, &session.cookie)
        .header(header::ORIGIN, "https://evil.example")
        .form_body(&[("csrf", session.csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(other_site.status(), StatusCode::FORBIDDEN);
    assert_eq!(app.subscription(id).await["state"], "polling", "nothing was cancelled");

    let done = post_as(&app, &session, &cancel, &[("csrf", &session.csrf)]).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert_eq!(app.subscription(id).await["state"], "cancelled");
}

#[tokio::test]
async fn another_tenants_subscription_is_a_404_page_and_cannot_be_touched() {
    let app = spawn_app_with(Settings::never_ending()).await;
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let id = sub["id"].as_str().unwrap();
    let b = sign_in(&app, KEY_B).await;
    for path in [format!("/console/subscriptions/{id}"), format!("/console/subscriptions/{id}/cancel")] {
        let page = browser().get(app.url(&path)).header(header::COOKIE, &b.cookie).send().await.unwrap();
        assert_eq!(page.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(page.text().await.unwrap().contains("Not found"));
    }
    let list = browser().get(app.url("/console/subscriptions")).header(header::COOKIE, &b.cookie).send().await;
    assert!(!list.unwrap().text().await.unwrap().contains(id), "not in B's list");
    let cancel = post_as(&app, &b, &format!("/console/subscriptions/{id}/cancel"), &[("csrf", &b.csrf)]).await;
    assert_eq!(cancel.status(), StatusCode::NOT_FOUND);
    assert_eq!(app.subscription(id).await["state"], "polling");
}

#[tokio::test]
async fn a_revoked_key_ends_its_sessions_at_once() {
    let app = spawn_app().await;
    let session = sign_in(&app, KEY_A).await;
    let store = jobhook::store::open(&app.db_url).await.unwrap();
    let tenant = store.tenant_by_key(jobhook::keys::KeyHash::of(KEY_A)).await.unwrap().unwrap();
    let key = store.list_keys().await.unwrap().into_iter().find(|k| k.tenant_id == tenant.id).unwrap();
    assert!(store.revoke_key(key.id, Timestamp::now()).await.unwrap());
    let page =
        browser().get(app.url("/console/subscriptions")).header(header::COOKIE, &session.cookie).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::SEE_OTHER, "back to sign-in");

    // The browser still holds that cookie when it signs in again, with another key.
    let mut stale = HeaderMap::new();
    stale.insert(header::COOKIE, session.cookie.parse().unwrap());
    let (status, headers, _) = try_sign_in(&app, KEY_B, &stale).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "signed in despite the stale session cookie");
    assert!(set_cookie(&headers, "jobhook_session").is_some());
}

#[tokio::test]
async fn the_list_pages_with_the_apis_cursors_and_filters() {
    let app = spawn_app_with(Settings::never_ending()).await;
    let mut jobs = Vec::new();
    for _ in 0..27 {
        let job = new_job();
        app.register(&job, &app.receiver.url("/hook")).await;
        jobs.push(job);
    }
    let session = sign_in(&app, KEY_A).await;
    let get = |path: String| {
        let cookie = session.cookie.clone();
        let url = app.url(&path);
        async move { browser().get(url).header(header::COOKIE, cookie).send().await.unwrap().text().await.unwrap() }
    };
    let first = get("/console/subscriptions".into()).await;
    assert!(first.contains(&jobs[26]) && !first.contains(&jobs[1]), "newest first, 25 a page");
    let next = first.split("href=\"/console/subscriptions?").find(|s| s.contains("rel=\"next\"")).unwrap();
    let next = next.split('"').next().unwrap().replace("&amp;", "&");
    let second = get(format!("/console/subscriptions?{next}")).await;
    assert!(second.contains(&jobs[0]) && second.contains(&jobs[1]) && !second.contains(&jobs[26]), "{second}");
    assert!(!second.contains("rel=\"next\""), "the last page");

    let one = get(format!("/console/subscriptions?state=polling&job_id={}", jobs[5])).await;
    assert!(one.contains(&jobs[5]) && !one.contains(&jobs[6]));
    let bad = browser()
        .get(app.url("/console/subscriptions?job_id=nope"))
        .header(header::COOKIE, &session.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST, "the API's refusal, on the page");
}

#[tokio::test]
async fn registering_by_hand_shows_the_apis_refusal_next_to_the_field() {
    let app = spawn_app_with(Settings::default().arg("--allow-private-callbacks", "false")).await;
    let session = sign_in(&app, KEY_A).await;
    let job = new_job();
    let fields = [("csrf", session.csrf.as_str()), ("job_id", &job), ("callback_url", "http://127.0.0.1:9/hook")];
    let answer = post_as(&app, &session, "/console/register", &fields).await;
    assert_eq!(answer.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = answer.text().await.unwrap();
    let api = app.register_as(KEY_A, &job, "http://127.0.0.1:9/hook").await;
    let problem: serde_json::Value = api.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    let error = html.split("id=\"callback_url-error\">").nth(1).expect("an error next to the field");
    assert!(error.to_lowercase().starts_with(&detail[..20].to_lowercase()), "{error} / {detail}");
    assert!(html.contains(&format!("value=\"{job}\"")), "what was typed is kept");
}

#[tokio::test]
async fn with_the_console_off_there_is_no_console() {
    let app = spawn_app_with(Settings::default().arg("--console", "false")).await;
    for path in ["/console", "/console/sign-in", "/console/subscriptions"] {
        let response = browser().get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(app.get_as(KEY_A, "/v1/subscriptions").await.status(), StatusCode::OK, "the API still answers");
}

#[tokio::test]
async fn a_delivery_waiting_for_its_retry_has_a_retry_now_button() {
    let app = spawn_app_with(Settings::default().arg("--retry-schedule", "1h")).await;
    app.receiver.answer_with(&[500]);
    let id = app.subscribe().await;
    app.receiver.wait_for("/hook", 1).await;
    eventually(Duration::from_secs(10), "the failed attempt is recorded", || async {
        (app.view(&id).await.attempts == 1).then_some(())
    })
    .await;
    let a = sign_in(&app, KEY_A).await;
    let page = browser().get(app.url(&format!("/console/subscriptions/{id}"))).header(header::COOKIE, &a.cookie);
    let page = page.send().await.unwrap().text().await.unwrap();
    assert!(page.contains(&format!("/console/subscriptions/{id}/retry")), "a Retry now button");
    let confirm =
        browser().get(app.url(&format!("/console/subscriptions/{id}/retry"))).header(header::COOKIE, &a.cookie);
    let confirm = confirm.send().await.unwrap();
    assert_eq!(confirm.status(), StatusCode::OK);
    assert!(confirm.text().await.unwrap().contains("Retry now?"));
    let started = std::time::Instant::now();
    let done = post_as(&app, &a, &format!("/console/subscriptions/{id}/retry"), &[("csrf", &a.csrf)]).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert!(done.headers()[header::LOCATION].to_str().unwrap().ends_with("?done=retried"));
    let got = app.receiver.wait_for("/hook", 2).await;
    assert!(started.elapsed() < Duration::from_secs(10), "the retry came now, not in an hour");
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    let view = app.wait_until(&id, SubscriptionState::Delivered).await;
    assert_eq!(view.attempts, 2);
}

#[tokio::test]
async fn the_timeline_shows_what_the_receiver_answered_escaped() {
    let app = spawn_app().await;
    app.receiver.answer_body_as("text/html", "<b>database is down</b>");
    app.receiver.answer_with(&[500]);
    let id = app.subscribe().await;
    app.wait_until(&id, SubscriptionState::Delivered).await;
    let session = sign_in(&app, KEY_A).await;
    let page = browser()
        .get(app.url(&format!("/console/subscriptions/{id}")))
        .header(header::COOKIE, &session.cookie)
        .send()
        .await
        .unwrap();
    let html = page.text().await.unwrap();
    assert!(html.contains("Answer (text/html)"), "{html}");
    assert!(html.contains("&lt;b&gt;database is down&lt;/b&gt;"), "the answer is shown as text, not markup");
    assert!(!html.contains("<b>database is down</b>"));
}
