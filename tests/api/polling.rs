//! How upstream answers, good and bad, move a subscription.

use std::time::Duration;

use jobhook::mock_upstream::{Answer, MockArgs};

use crate::support::helpers::*;

#[tokio::test]
async fn an_upstream_401_fails_the_subscription_as_upstream_unauthorized() {
    let mock = MockArgs { api_key: Some("the-right-upstream-key".into()), ..mock_args(1) };
    let app = spawn_app_with(Settings::mock(mock).arg("--upstream-api-key", "a-wrong-upstream-key")).await;
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let done = app.wait_for_state(sub["id"].as_str().unwrap(), "failed").await;
    assert_eq!(done["failure_reason"], "upstream_unauthorized");
    assert!(!done.to_string().contains("a-wrong-upstream-key"), "the key must not leak: {done}");
    assert!(app.receiver.requests().is_empty());
}

#[tokio::test]
async fn an_upstream_403_is_reported_as_403_not_401() {
    let app = spawn_app().await;
    let job = new_job();
    app.upstream.script(job.parse().unwrap(), vec![Answer::Status(403)]);
    let sub = app.register(&job, &app.receiver.url("/hook")).await;
    let done = app.wait_for_state(sub["id"].as_str().unwrap(), "failed").await;
    assert_eq!(done["failure_reason"], "upstream_unauthorized");
    let error = done["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("403 Forbidden") && !error.contains("401"), "{done}");
}

#[tokio::test]
async fn the_upstream_key_is_sent_as_a_bearer_token() {
    let mock = MockArgs { api_key: Some("the-right-upstream-key".into()), ..mock_args(1) };
    let app = spawn_app_with(Settings::mock(mock).arg("--upstream-api-key", "the-right-upstream-key")).await;
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    app.wait_for_state(sub["id"].as_str().unwrap(), "delivered").await;
}

#[tokio::test]
async fn an_upstream_404_is_tolerated_for_the_grace_period_then_fails() {
    let app = spawn_app_with(Settings::default().arg("--not-found-grace", "400ms")).await;
    let job = new_job();
    app.upstream.script(job.parse().unwrap(), vec![Answer::Status(404)]);
    let sub = app.register(&job, &app.receiver.url("/hook")).await;
    let id = sub["id"].as_str().unwrap();
    let waiting = eventually(Duration::from_secs(5), "the 404 to show as last_error", || async {
        let sub = app.subscription(id).await;
        (sub["state"] == "polling" && sub["last_error"].as_str().is_some_and(|e| e.contains("404"))).then_some(sub)
    })
    .await;
    assert_eq!(waiting["state"], "polling");
    let done = app.wait_for_state(id, "failed").await;
    assert_eq!(done["failure_reason"], "upstream_job_not_found");
}

#[tokio::test]
async fn a_job_that_becomes_visible_within_the_grace_period_is_delivered() {
    let app = spawn_app().await;
    let job = new_job();
    app.upstream
        .script(job.parse().unwrap(), vec![Answer::Status(404), Answer::Status(404), Answer::Pending, Answer::Succeed]);
    let sub = app.register(&job, &app.receiver.url("/hook")).await;
    app.wait_for_state(sub["id"].as_str().unwrap(), "delivered").await;
}

#[tokio::test]
async fn upstream_errors_are_retried_and_the_last_one_is_visible() {
    let app = spawn_app().await;
    let job = new_job();
    app.upstream.script(job.parse().unwrap(), vec![Answer::Status(502), Answer::Garbage, Answer::Status(503)]);
    let sub = app.register(&job, &app.receiver.url("/hook")).await;
    let id = sub["id"].as_str().unwrap();
    eventually(Duration::from_secs(5), "the upstream error to show", || async {
        let sub = app.subscription(id).await;
        sub["last_error"].as_str().is_some_and(|e| e.contains("503")).then_some(())
    })
    .await;
    // The upstream recovers.
    app.upstream.script(job.parse().unwrap(), vec![Answer::Succeed]);
    let done = app.wait_for_state(id, "delivered").await;
    assert!(done["last_error"].is_null(), "a good answer clears the error: {done}");
    assert_eq!(app.upstream.polls(job.parse().unwrap()).max_in_flight, 1);
}

#[tokio::test]
async fn a_hanging_upstream_times_out_and_is_polled_again() {
    let app = spawn_app_with(Settings::default().arg("--upstream-timeout", "200ms")).await;
    let job = new_job();
    app.upstream.script(job.parse().unwrap(), vec![Answer::Hang(Duration::from_secs(5)), Answer::Succeed]);
    let sub = app.register(&job, &app.receiver.url("/hook")).await;
    app.wait_for_state(sub["id"].as_str().unwrap(), "delivered").await;
}

#[tokio::test]
async fn an_upstream_retry_after_is_waited_out() {
    let app = spawn_app().await;
    let job = new_job();
    app.upstream.script(job.parse().unwrap(), vec![Answer::RetryAfter(429, 1), Answer::Succeed]);
    let started = std::time::Instant::now();
    app.register(&job, &app.receiver.url("/hook")).await;
    app.receiver.wait_for("/hook", 1).await;
    assert!(started.elapsed() >= Duration::from_secs(1), "polled again before Retry-After: {:?}", started.elapsed());
    assert_eq!(app.upstream.polls(job.parse().unwrap()).count, 2);
}

#[tokio::test]
async fn a_job_still_pending_after_max_wait_expires() {
    let app = spawn_app_with(Settings::default().arg("--max-wait", "300ms")).await;
    let job = new_job();
    app.upstream.script(job.parse().unwrap(), vec![Answer::Pending]);
    let sub = app.register(&job, &app.receiver.url("/hook")).await;
    let done = app.wait_for_state(sub["id"].as_str().unwrap(), "expired").await;
    assert_eq!(done["job_status"], "Pending");
    let polls = app.upstream.polls(job.parse().unwrap()).count;
    // Another job going through gives the poller time to (wrongly) poll the expired one again.
    let other = app.register(&new_job(), &app.receiver.url("/other")).await;
    app.wait_for_state(other["id"].as_str().unwrap(), "delivered").await;
    assert_eq!(app.upstream.polls(job.parse().unwrap()).count, polls);
}
