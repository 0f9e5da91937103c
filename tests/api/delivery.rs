//! Signed delivery, retries, and their end states.

use std::time::Duration;

use jobhook::mock_upstream::Answer;
use serde_json::Value;

use crate::support::helpers::*;

#[tokio::test]
async fn a_finished_job_is_delivered_signed_and_verifies_with_the_standard_webhooks_crate() {
    let app = spawn_app().await;
    let job = new_job();
    let sub = app.register(&job, &app.receiver.url("/hook")).await;
    let got = app.receiver.wait_for("/hook", 1).await;
    let delivery = &got[0];
    delivery.verify(SECRET).expect("the stock library accepts the signature");
    assert!(delivery.verify("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").is_err(), "another secret must not verify");
    assert_eq!(delivery.header("content-type"), "application/json");
    assert!(delivery.header("user-agent").starts_with("jobhook/"));
    assert!(delivery.header("webhook-id").starts_with("msg_"));
    let body = delivery.json();
    assert_eq!(body["job_id"], job);
    assert_eq!(body["status"], "Succeed");
    assert_eq!(body["image_urls"].as_array().unwrap().len(), 2);

    let id = sub["id"].as_str().unwrap();
    let done = app.wait_for_state(id, "delivered").await;
    assert_eq!(done["job_status"], "Succeed");
    assert_eq!(done["webhook_id"], delivery.header("webhook-id"));
    assert_eq!(done["attempts"], 1);
    let attempts = app.deliveries(id).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["status_code"], 200);
    assert_eq!(attempts[0]["webhook_id"], delivery.header("webhook-id"));
    // Two Pending answers, then the end: three polls, none wasted.
    assert_eq!(app.upstream.polls(job.parse().unwrap()).count, 3);
}

#[tokio::test]
async fn the_upstream_body_is_delivered_byte_for_byte() {
    let app = spawn_app().await;
    let job = new_job();
    app.upstream.script(job.parse().unwrap(), vec![Answer::Failed]);
    app.register(&job, &app.receiver.url("/hook")).await;
    let got = app.receiver.wait_for("/hook", 1).await;
    let expected = format!(r#"{{"image_urls":[],"job_id":"{job}","status":"Failed"}}"#);
    assert_eq!(std::str::from_utf8(&got[0].body).unwrap(), expected);
    got[0].verify(SECRET).unwrap();
}

#[tokio::test]
async fn a_failing_receiver_is_retried_with_the_same_webhook_id() {
    let app = spawn_app().await;
    app.receiver.answer_with(&[500, 503, 429]);
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let got = app.receiver.wait_for("/hook", 4).await;
    let ids: Vec<_> = got.iter().map(|r| r.header("webhook-id").to_owned()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    for attempt in &got {
        attempt.verify(SECRET).unwrap();
    }
    let id = sub["id"].as_str().unwrap();
    let done = app.wait_for_state(id, "delivered").await;
    assert_eq!(done["attempts"], 4);
    let codes: Vec<_> = app.deliveries(id).await.iter().map(|a| a["status_code"].as_u64().unwrap()).collect();
    assert_eq!(codes, vec![500, 503, 429, 200]);
}

/// While its deliveries fail, the subscription says why (not only its delivery log); once one succeeds
/// it says nothing.
#[tokio::test]
async fn the_subscription_shows_its_last_delivery_error_until_a_delivery_succeeds() {
    let app = spawn_app_with(Settings::default().arg("--retry-schedule", "1s,1s")).await;
    app.receiver.answer_with(&[500]);
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let id = sub["id"].as_str().unwrap();
    assert!(sub["last_delivery_error"].is_null(), "no attempt yet: {sub}");
    let failing = eventually(Duration::from_secs(10), "the failed attempt on the subscription", || async {
        let sub = app.subscription(id).await;
        (!sub["last_delivery_error"].is_null()).then_some(sub)
    })
    .await;
    assert_eq!(failing["state"], "delivering");
    assert_eq!(failing["last_delivery_error"], "the receiver answered 500");
    assert!(failing["last_error"].is_null(), "the upstream was fine: {failing}");
    let done = app.wait_for_state(id, "delivered").await;
    assert!(done["last_delivery_error"].is_null(), "{done}");
}

#[tokio::test]
async fn a_receiver_answering_410_stops_delivery_at_once() {
    let app = spawn_app().await;
    app.receiver.answer_with(&[410]);
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let done = app.wait_for_state(sub["id"].as_str().unwrap(), "failed").await;
    assert_eq!(done["failure_reason"], "callback_gone");
    assert_eq!(app.receiver.requests_to("/hook").len(), 1);
}

#[tokio::test]
async fn exhausting_the_retry_schedule_fails_the_delivery() {
    let app = spawn_app().await;
    app.receiver.answer_with(&[500; 10]);
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let done = app.wait_for_state(sub["id"].as_str().unwrap(), "failed").await;
    assert_eq!(done["failure_reason"], "delivery_exhausted");
    // The first attempt and one per scheduled retry (three).
    assert_eq!(app.receiver.requests_to("/hook").len(), 4);
    assert_eq!(done["attempts"], 4);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let app = spawn_app().await;
    app.receiver.answer_with(&[302]);
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let id = sub["id"].as_str().unwrap();
    app.wait_for_state(id, "delivered").await;
    assert!(app.receiver.requests_to("/redirected").is_empty());
    let log = app.deliveries(id).await;
    assert_eq!(log[0]["status_code"], 302);
    assert!(log[0]["error"].as_str().unwrap().contains("redirect"));
}

#[tokio::test]
async fn an_unreachable_receiver_is_retried_and_recorded() {
    let app = spawn_app().await;
    // A port nobody listens on, and nobody can while `_closed` lives.
    let (_closed, addr) = refusing_port();
    let url = format!("http://{addr}/hook");
    let sub = app.register(&new_job(), &url).await;
    let id = sub["id"].as_str().unwrap();
    let done = app.wait_for_state(id, "failed").await;
    assert_eq!(done["failure_reason"], "delivery_exhausted");
    let log = app.deliveries(id).await;
    let first = &log[0];
    assert!(first["status_code"].is_null());
    assert!(first["error"].as_str().unwrap().contains("connect"), "{first}");
    assert!(log.iter().all(|a| a["response_body"].is_null() && a["response_content_type"].is_null()), "{log:?}");
}

#[tokio::test]
async fn subscribers_of_one_job_share_one_poll_stream() {
    let app = spawn_app().await;
    let job = new_job();
    let mut subs = Vec::new();
    for (key, path) in [(KEY_A, "/a"), (KEY_A, "/b"), (KEY_B, "/c")] {
        let response = app.register_as(key, &job, &app.receiver.url(path)).await;
        assert_eq!(response.status(), 201);
        subs.push(response.json::<Value>().await.unwrap());
    }
    for path in ["/a", "/b", "/c"] {
        let got = app.receiver.wait_for(path, 1).await;
        got[0].verify(SECRET).unwrap();
    }
    let polls = app.upstream.polls(job.parse().unwrap());
    assert_eq!(polls.count, 3, "two Pending and one final answer, whatever the subscriber count");
    assert_eq!(polls.max_in_flight, 1);
    let ids: std::collections::HashSet<_> =
        ["/a", "/b", "/c"].iter().map(|p| app.receiver.requests_to(p)[0].header("webhook-id").to_owned()).collect();
    assert_eq!(ids.len(), 3, "each subscription has its own webhook-id");
}

#[tokio::test]
async fn a_subscriber_arriving_after_the_job_ended_is_delivered_without_another_poll() {
    let app = spawn_app().await;
    let job = new_job();
    let first = app.register(&job, &app.receiver.url("/first")).await;
    app.wait_for_state(first["id"].as_str().unwrap(), "delivered").await;
    let polls = app.upstream.polls(job.parse().unwrap()).count;
    let late = app.register(&job, &app.receiver.url("/late")).await;
    let got = app.receiver.wait_for("/late", 1).await;
    got[0].verify(SECRET).unwrap();
    assert_eq!(got[0].body, app.receiver.requests_to("/first")[0].body);
    app.wait_for_state(late["id"].as_str().unwrap(), "delivered").await;
    assert_eq!(app.upstream.polls(job.parse().unwrap()).count, polls);
}
