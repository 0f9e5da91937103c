//! Bulk recovery: `POST /v1/subscriptions/redeliver` starts a new series for each of the caller's
//! ended subscriptions in a state, a time window and optionally on a callback host.

use std::time::Duration;

use jobhook::api::bulk::BulkRedelivered;
use jobhook::domain::Timestamp;
use serde_json::{Value, json};

use crate::support::helpers::*;

/// `POST /v1/subscriptions/redeliver` with `body` as the holder of `key`.
async fn bulk_as(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.http.post(app.url("/v1/subscriptions/redeliver")).bearer_auth(key).json(&body).send().await.unwrap()
}

/// As tenant A, asserting a 202.
async fn bulk(app: &TestApp, body: Value) -> BulkRedelivered {
    let response = bulk_as(app, KEY_A, body).await;
    assert_eq!(response.status(), 202);
    response.json().await.unwrap()
}

/// Registers a job with `callback_url` as the holder of `key`, its receiver answering 410 once, and
/// waits until the subscription has failed; returns its ID.
async fn failed_as(app: &TestApp, key: &str, callback_url: &str) -> String {
    app.receiver.answer_with(&[410]);
    let response = app.register_as(key, &new_job(), callback_url).await;
    assert_eq!(response.status(), 201);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(15), "the subscription to fail", || async {
        let sub: Value = app.get_as(key, &format!("/v1/subscriptions/{id}")).await.json().await.unwrap();
        (sub["state"] == "failed").then_some(())
    })
    .await;
    id
}

/// A time just past every change made so far.
fn just_now() -> String {
    (Timestamp::now() + Duration::from_millis(1)).rfc3339()
}

#[tokio::test]
async fn failed_subscriptions_in_the_window_are_delivered_again_signed_and_the_others_are_left_alone() {
    let app = spawn_app().await;
    let since = Timestamp::now().rfc3339();
    let a = &failed_as(&app, KEY_A, &app.receiver.url("/a")).await;
    let b = &failed_as(&app, KEY_A, &app.receiver.url("/b")).await;
    let delivered = &app.register(&new_job(), &app.receiver.url("/d")).await["id"].as_str().unwrap().to_owned();
    app.wait_until(delivered, SubscriptionState::Delivered).await;
    let until = just_now();
    let later = &failed_as(&app, KEY_A, &app.receiver.url("/later")).await;

    let window = json!({ "state": "failed", "since": since, "until": until, "limit": 1 });
    let first = bulk(&app, window.clone()).await;
    assert_eq!((first.redelivered, first.more), (1, true), "one taken, one more left");
    let second = bulk(&app, window.clone()).await;
    assert_eq!((second.redelivered, second.more), (1, false), "the rest: the first left the window");

    for (id, path) in [(a, "/a"), (b, "/b")] {
        let got = app.receiver.wait_for(path, 2).await;
        assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
        got[1].verify(SECRET).unwrap();
        let done = app.wait_until(id, SubscriptionState::Delivered).await;
        assert_eq!(done.failure_reason, None);
        let series: Vec<_> = app.attempts(id).await.iter().map(|a| (a.series, a.attempt)).collect();
        assert_eq!(series, vec![(1, 1), (2, 1)]);
    }
    assert_eq!(app.view(later).await.state, SubscriptionState::Failed, "it ended after until");
    assert_eq!(app.receiver.requests_to("/later").len(), 1);
    assert_eq!(app.attempts(delivered).await.len(), 1, "a delivered one is not taken when asking for failed");
    assert_eq!(bulk(&app, window).await.redelivered, 0, "nothing is taken twice");
}

#[tokio::test]
async fn delivered_subscriptions_can_be_replayed_in_bulk() {
    let app = spawn_app().await;
    let since = Timestamp::now().rfc3339();
    let id = &app.subscribe().await;
    app.wait_until(id, SubscriptionState::Delivered).await;
    let answer = bulk(&app, json!({ "state": "delivered", "since": since })).await;
    assert_eq!((answer.redelivered, answer.more), (1, false));
    let got = app.receiver.wait_for("/hook", 2).await;
    got[1].verify(SECRET).unwrap();
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
}

#[tokio::test]
async fn only_callbacks_on_the_given_host_are_taken() {
    let app = spawn_app().await;
    let since = Timestamp::now().rfc3339();
    let by_ip = &failed_as(&app, KEY_A, &app.receiver.url("/ip")).await;
    let by_name = &failed_as(&app, KEY_A, &format!("http://localhost:{}/name", app.receiver.addr.port())).await;
    let answer = bulk(&app, json!({ "state": "failed", "since": since, "callback_host": "LocalHost" })).await;
    assert_eq!(answer.redelivered, 1);
    app.wait_until(by_name, SubscriptionState::Delivered).await;
    assert_eq!(app.view(by_ip).await.state, SubscriptionState::Failed);
    assert_eq!(
        bulk(&app, json!({ "state": "failed", "since": since, "callback_host": "127.0.0.1" })).await.redelivered,
        1
    );
    app.wait_until(by_ip, SubscriptionState::Delivered).await;
}

#[tokio::test]
async fn another_tenants_subscriptions_are_never_taken() {
    let app = spawn_app().await;
    let since = Timestamp::now().rfc3339();
    let theirs = &failed_as(&app, KEY_B, &app.receiver.url("/b")).await;
    let answer = bulk(&app, json!({ "state": "failed", "since": since })).await;
    assert_eq!(answer.redelivered, 0);
    let sub: Value = app.get_as(KEY_B, &format!("/v1/subscriptions/{theirs}")).await.json().await.unwrap();
    assert_eq!(sub["state"], "failed");
    assert_eq!(app.receiver.requests_to("/b").len(), 1);
}

#[tokio::test]
async fn a_failed_subscription_followed_by_a_newer_registration_is_skipped() {
    let app = spawn_app().await;
    let since = Timestamp::now().rfc3339();
    let callback = app.receiver.url("/hook");
    app.receiver.answer_with(&[410]);
    let job = new_job();
    let old = app.register(&job, &callback).await["id"].as_str().unwrap().to_owned();
    app.wait_until(&old, SubscriptionState::Failed).await;
    let newer = app.register(&job, &callback).await["id"].as_str().unwrap().to_owned();
    assert_ne!(old, newer);
    app.wait_until(&newer, SubscriptionState::Delivered).await;
    let answer = bulk(&app, json!({ "state": "failed", "since": since })).await;
    assert_eq!((answer.redelivered, answer.more), (0, false));
    assert_eq!(app.view(&old).await.state, SubscriptionState::Failed);
    assert_eq!(app.receiver.requests_to("/hook").len(), 2);
}

#[tokio::test]
async fn a_bulk_request_that_is_not_valid_is_refused_with_a_problem_naming_the_field() {
    let app = spawn_app().await;
    let cases = [
        (json!({ "state": "polling", "since": "2026-01-01T00:00:00Z" }), "state must be failed or delivered"),
        (json!({ "state": "lost", "since": "2026-01-01T00:00:00Z" }), "state must be failed or delivered"),
        (json!({ "state": "failed", "since": "yesterday" }), "since must be a time in RFC 3339"),
        (json!({ "state": "failed", "since": "2026-01-01T00:00:00Z", "until": "2026-13-01" }), "until must be a time"),
        (
            json!({ "state": "failed", "since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z" }),
            "must be before until",
        ),
        (
            json!({ "state": "failed", "since": "2026-01-01T00:00:00Z", "callback_host": "https://x.example/" }),
            "callback_host must be",
        ),
        (
            json!({ "state": "failed", "since": "2026-01-01T00:00:00Z", "callback_host": "x.example:8080" }),
            "callback_host must be",
        ),
        (json!({ "state": "failed", "since": "2026-01-01T00:00:00Z", "limit": 0 }), "limit must be from 1 to 10000"),
        (
            json!({ "state": "failed", "since": "2026-01-01T00:00:00Z", "limit": 10001 }),
            "limit must be from 1 to 10000",
        ),
        (json!({ "state": "failed" }), "since"),
    ];
    for (body, detail) in cases {
        let response = bulk_as(&app, KEY_A, body.clone()).await;
        assert_eq!(response.status(), 422, "{body}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let problem: Value = response.json().await.unwrap();
        assert!(problem["detail"].as_str().unwrap().contains(detail), "{body}: {problem}");
    }
    assert_eq!(bulk_as(&app, "not-a-key", json!({})).await.status(), 401);
}
