//! Test sends: a signed example delivery sent now, its outcome in the answer, nothing stored.

use serde_json::{Value, json};

use crate::support::helpers::*;

async fn test_send(app: &TestApp, body: Value) -> reqwest::Response {
    app.http.post(app.url("/v1/test-deliveries")).bearer_auth(KEY_A).json(&body).send().await.unwrap()
}

#[tokio::test]
async fn a_test_send_arrives_signed_and_the_answer_shows_what_the_receiver_said() {
    let app = spawn_app().await;
    app.receiver.answer_with(&[202]);
    app.receiver.answer_body("thanks, got it");
    let response = test_send(&app, json!({"callback_url": app.receiver.url("/try")})).await;
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status_code"], 202);
    assert_eq!(result["response_body"], "thanks, got it");
    assert_eq!(result["error"], Value::Null);
    let got = app.receiver.wait_for("/try", 1).await;
    got[0].verify(SECRET).unwrap();
    assert_eq!(got[0].header("webhook-id"), result["webhook_id"]);
    let sent = got[0].json();
    assert_eq!(sent["status"], "Succeed");
    assert_eq!(sent, result["body"]);
    let list = json_as_a(app.http.get(app.url("/v1/subscriptions"))).await;
    assert_eq!(list["items"], json!([]), "a test send is not stored as a subscription");
}

#[tokio::test]
async fn an_envelope_test_send_wraps_the_body_in_the_standard_webhooks_structure() {
    let app = spawn_app().await;
    let response = test_send(&app, json!({"callback_url": app.receiver.url("/try"), "payload": "envelope"})).await;
    assert_eq!(response.status(), 200);
    let got = app.receiver.wait_for("/try", 1).await;
    got[0].verify(SECRET).unwrap();
    let sent = got[0].json();
    assert_eq!(sent["type"], "job.succeeded");
    assert_eq!(sent["data"]["status"], "Succeed");
    assert_eq!(sent["subscription"]["id"], Value::Null);
    assert_eq!(sent["subscription"]["job_id"], sent["data"]["job_id"]);
}

#[tokio::test]
async fn a_test_send_to_a_loopback_url_is_refused_when_private_callbacks_are_not_allowed() {
    let app = spawn_app_with(Settings::default().arg("--allow-private-callbacks", "false")).await;
    let response = test_send(&app, json!({"callback_url": app.receiver.url("/try")})).await;
    assert_eq!(response.status(), 422);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    assert!(app.receiver.requests().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn the_eleventh_test_send_in_a_minute_is_refused_with_retry_after() {
    let app = spawn_app().await;
    for _ in 0..10 {
        assert_eq!(test_send(&app, json!({"callback_url": app.receiver.url("/try")})).await.status(), 200);
    }
    let response = test_send(&app, json!({"callback_url": app.receiver.url("/try")})).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=6).contains(&retry_after), "one send frees every 6 s, got {retry_after}");
    assert_eq!(app.receiver.requests().len(), 10);
}

#[tokio::test]
async fn a_test_send_with_fields_this_build_does_not_know_is_refused() {
    let app = spawn_app().await;
    let response = test_send(&app, json!({"callback_url": app.receiver.url("/try"), "metadata": {"x-a": "b"}})).await;
    assert_eq!(response.status(), 422);
}

#[tokio::test]
async fn a_test_send_is_refused_at_connect_time_when_dns_changes_after_the_check() {
    let settings = Settings { lookup: Some(crate::faults::rebinding_dns()), ..Settings::default() }
        .arg("--allow-private-callbacks", "false");
    let app = spawn_app_with(settings).await;
    let url = format!("http://rebind.test:{}/try", app.receiver.addr.port());
    let response = test_send(&app, json!({"callback_url": url})).await;
    assert_eq!(response.status(), 200, "the check passed; the connection was refused");
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status_code"], Value::Null);
    let error = result["error"].as_str().unwrap();
    assert!(error.contains("egress policy"), "{error}");
    assert!(app.receiver.requests().is_empty(), "the loopback receiver must never be reached");
}
