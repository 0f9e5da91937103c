//! Envelope and metadata: the body's two forms, the caller's metadata, and the routing headers every
//! delivery carries.

use jobhook::mock_upstream::Answer;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::helpers::*;

async fn register_with(app: &TestApp, job: &str, path: &str, extra: Value) -> reqwest::Response {
    let mut body = json!({"job_id": job, "callback_url": app.receiver.url(path)});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    app.http.post(app.url("/v1/subscriptions")).bearer_auth(KEY_A).json(&body).send().await.unwrap()
}

#[tokio::test]
async fn an_envelope_delivery_wraps_the_result_with_the_metadata_the_same_on_every_attempt() {
    let app = spawn_app().await;
    app.receiver.answer_with(&[500]);
    let job = new_job();
    let metadata = json!({"order_id": "A-1042", "attempt": {"n": 1}});
    let response = register_with(&app, &job, "/hook", json!({"payload": "envelope", "metadata": metadata})).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let sub: Value = response.json().await.unwrap();
    assert_eq!(sub["payload"], "envelope");
    assert_eq!(sub["metadata"], metadata);
    let id = sub["id"].as_str().unwrap();
    app.wait_until(id, SubscriptionState::Delivered).await;
    let got = app.receiver.wait_for("/hook", 2).await;
    assert_eq!(got[0].body, got[1].body, "a retry sends the same message");
    for request in &got {
        request.verify(SECRET).expect("the stock library accepts the envelope");
        assert_eq!(request.header("jobhook-event-type"), "job.succeeded");
        assert_eq!(request.header("jobhook-subscription-id"), id);
    }
    let sent = got[0].json();
    assert_eq!(sent["type"], "job.succeeded");
    assert_eq!(sent["data"]["job_id"], job);
    assert_eq!(sent["data"]["status"], "Succeed");
    assert_eq!(sent["subscription"], json!({"id": id, "job_id": job, "metadata": metadata}));
    let at = time::OffsetDateTime::parse(
        sent["timestamp"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    );
    assert!(at.is_ok(), "{sent}");
}

#[tokio::test]
async fn a_raw_delivery_is_byte_for_byte_and_carries_the_routing_headers() {
    let app = spawn_app().await;
    let job = new_job();
    app.upstream.script(job.parse().unwrap(), vec![Answer::Failed]);
    let response = register_with(&app, &job, "/hook", json!({"metadata": {"k": "v"}})).await;
    let sub: Value = response.json().await.unwrap();
    assert_eq!(sub["payload"], "raw");
    let got = app.receiver.wait_for("/hook", 1).await;
    let expected = format!(r#"{{"image_urls":[],"job_id":"{job}","status":"Failed"}}"#);
    assert_eq!(std::str::from_utf8(&got[0].body).unwrap(), expected);
    assert_eq!(got[0].header("jobhook-event-type"), "job.failed");
    assert_eq!(got[0].header("jobhook-subscription-id"), sub["id"]);
}

#[tokio::test]
async fn a_late_envelope_subscriber_gets_the_time_the_job_ended() {
    let app = spawn_app().await;
    let job = new_job();
    let first = app.register(&job, &app.receiver.url("/first")).await;
    let done = app.wait_for_state(first["id"].as_str().unwrap(), "delivered").await;
    let late = register_with(&app, &job, "/late", json!({"payload": "envelope"})).await.json::<Value>().await.unwrap();
    let got = app.receiver.wait_for("/late", 1).await;
    got[0].verify(SECRET).unwrap();
    let sent = got[0].json();
    assert_eq!(sent["data"], app.receiver.requests_to("/first")[0].json());
    assert_eq!(sent["subscription"]["metadata"], json!({}));
    let rfc = &time::format_description::well_known::Rfc3339;
    let ended = time::OffsetDateTime::parse(sent["timestamp"].as_str().unwrap(), rfc).unwrap();
    assert!(ended <= time::OffsetDateTime::parse(done["updated_at"].as_str().unwrap(), rfc).unwrap());
    assert!(ended < time::OffsetDateTime::parse(late["created_at"].as_str().unwrap(), rfc).unwrap());
}

#[tokio::test]
async fn bad_metadata_or_payload_is_refused_with_a_problem() {
    let app = spawn_app().await;
    let too_big = json!({"blob": "x".repeat(4096)});
    for (extra, says) in [
        (json!({"metadata": [1, 2]}), "metadata must be a JSON object"),
        (json!({"metadata": too_big}), "at most 4096 bytes"),
        (json!({"payload": "xml"}), "expected `raw` or `envelope`"),
    ] {
        let response = register_with(&app, &new_job(), "/hook", extra.clone()).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{extra}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let detail = response.json::<Value>().await.unwrap()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(says), "{extra}: {detail}");
    }
}
