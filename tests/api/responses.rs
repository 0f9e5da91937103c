//! What the receiver answered: each attempt's status, `Content-Type` and the first 2 KiB of its body,
//! in the delivery log and nothing more.

use serde_json::json;

use crate::support::helpers::*;

#[tokio::test]
async fn each_attempt_records_the_receivers_status_content_type_and_body() {
    let app = spawn_app().await;
    let problem = json!({"type": "about:blank", "title": "database is down", "status": 500}).to_string();
    app.receiver.answer_body_as("application/problem+json", &problem);
    app.receiver.answer_with(&[500]);
    let id = app.subscribe().await;
    app.wait_until(&id, SubscriptionState::Delivered).await;
    let log = app.attempts(&id).await;
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].status_code, Some(500));
    assert_eq!(log[0].response_content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(log[0].response_body.as_deref(), Some(problem.as_str()));
    assert_eq!(log[1].status_code, Some(200));
    assert_eq!(log[1].response_body.as_deref(), Some(problem.as_str()), "a 2xx answer's body is kept too");
}

#[tokio::test]
async fn only_the_first_2_kib_of_a_long_answer_are_kept() {
    let app = spawn_app().await;
    // Longer than what is read (16 KiB) as well: the delivery still succeeds, and 2 KiB are kept.
    let long: String = "0123456789abcdef".repeat(64 * 1024 / 16);
    app.receiver.answer_body_as("text/plain; charset=utf-8", &long);
    let id = app.subscribe().await;
    app.wait_until(&id, SubscriptionState::Delivered).await;
    let log = app.attempts(&id).await;
    let body = log[0].response_body.as_deref().unwrap();
    assert_eq!(body.len(), 2048);
    assert!(long.starts_with(body));
    assert_eq!(log[0].response_content_type.as_deref(), Some("text/plain; charset=utf-8"));
}

#[tokio::test]
async fn a_test_send_shows_the_receivers_content_type() {
    let app = spawn_app().await;
    app.receiver.answer_body_as("application/json", r#"{"ok":true}"#);
    let response = app
        .http
        .post(app.url("/v1/test-deliveries"))
        .bearer_auth(KEY_A)
        .json(&json!({"callback_url": app.receiver.url("/try")}))
        .send()
        .await
        .unwrap();
    let result: serde_json::Value = response.json().await.unwrap();
    assert_eq!(result["response_content_type"], "application/json");
    assert_eq!(result["response_body"], r#"{"ok":true}"#);
}
