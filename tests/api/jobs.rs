//! `POST /v1/jobs`: a job created upstream through jobhook and watched to its end; paths the profile
//! does not allow, upstream failures, and Idempotency-Key retries.

use std::time::Duration;

use jobhook::mock_upstream::{Creation, MockUpstream};
use serde_json::{Value, json};

use crate::support::helpers::*;
use crate::upstreams::spawn_with_profiles;

async fn create_as(app: &TestApp, key: &str, request: &Value, idempotency_key: Option<&str>) -> reqwest::Response {
    let mut post = app.http.post(app.url("/v1/jobs")).bearer_auth(key).json(request);
    if let Some(idempotency_key) = idempotency_key {
        post = post.header("idempotency-key", idempotency_key);
    }
    post.send().await.unwrap()
}

async fn create(app: &TestApp, request: &Value) -> reqwest::Response {
    create_as(app, KEY_A, request, None).await
}

/// An upscale job of the built-in AetherForge profile, delivered to the receiver's `path`.
fn upscale(app: &TestApp, path: &str) -> Value {
    json!({
        "path": "/public/v1/image-tune/upscale",
        "body": {"image_url": "https://example.com/cat.png", "scale": 2},
        "callback_url": app.receiver.url(path),
        "metadata": {"order": "A-1"},
    })
}

/// Tenant A's subscriptions.
async fn subscriptions(app: &TestApp) -> Vec<Value> {
    let page: Value = app.get_as(KEY_A, "/v1/subscriptions").await.json().await.unwrap();
    page["items"].as_array().unwrap().clone()
}

/// Asserts a 201 whose subscription is the job the mock made, and that its end is delivered, signed.
async fn created_and_delivered(app: &TestApp, mock: &MockUpstream, response: reqwest::Response, path: &str) -> Value {
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let answer: Value = response.json().await.unwrap();
    let sub = &answer["subscription"];
    assert_eq!(location, format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap()));
    let made = mock.creations();
    assert_eq!(made.len(), 1, "one job upstream");
    assert_eq!(sub["job_id"].as_str(), made[0].job_id.as_deref(), "{answer}");
    let got = app.receiver.wait_for(path, 1).await;
    got[0].verify(SECRET).expect("the standardwebhooks crate accepts the signature");
    assert_eq!(got[0].header("jobhook-event-type"), "job.succeeded");
    app.wait_for_state(sub["id"].as_str().unwrap(), "delivered").await;
    answer
}

#[tokio::test]
async fn a_job_created_through_jobhook_is_polled_and_its_end_delivered_signed() {
    let app = spawn_app().await;
    let response = create(&app, &upscale(&app, "/upscaled")).await;
    let answer = created_and_delivered(&app, &app.upstream, response, "/upscaled").await;
    assert_eq!(answer["upstream_status"], 200);
    assert_eq!(answer["upstream_response"]["status"], "Pending");
    assert_eq!(answer["upstream_response"]["job_id"], answer["subscription"]["job_id"]);
    assert_eq!(answer["subscription"]["upstream"], "aetherforge");
    assert_eq!(answer["subscription"]["metadata"], json!({"order": "A-1"}));
    let made = &app.upstream.creations()[0];
    assert_eq!(made.path, "/public/v1/image-tune/upscale");
    assert_eq!(made.body, json!({"image_url": "https://example.com/cat.png", "scale": 2}), "the body as it was sent");
    let got = app.receiver.requests_to("/upscaled");
    assert_eq!(got[0].json()["job_id"], answer["subscription"]["job_id"]);
}

#[tokio::test]
async fn replicate_and_openai_batch_jobs_are_created_with_the_profile_key_and_delivered() {
    let p = spawn_with_profiles(mock_args(1), [None, None]).await;
    let prediction = json!({"upstream": "replicate", "path": "/v1/predictions",
        "body": {"version": "5c7d5dc6dd8b", "input": {"prompt": "a cat"}}, "callback_url": p.app.receiver.url("/r")});
    let answer = created_and_delivered(&p.app, &p.replicate, create(&p.app, &prediction).await, "/r").await;
    assert_eq!(answer["upstream_status"], 201);
    assert_eq!(answer["upstream_response"]["input"], json!({"prompt": "a cat"}));
    assert_eq!(p.app.receiver.requests_to("/r")[0].json()["status"], "succeeded");

    let batch = json!({"upstream": "openai-batch", "path": "/v1/batches",
        "body": {"input_file_id": "file-abc", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        "callback_url": p.app.receiver.url("/b"), "payload": "envelope"});
    let answer = created_and_delivered(&p.app, &p.openai, create(&p.app, &batch).await, "/b").await;
    assert!(answer["subscription"]["job_id"].as_str().unwrap().starts_with("batch_"), "{answer}");
    let envelope = p.app.receiver.requests_to("/b")[0].json();
    assert_eq!(envelope["data"]["status"], "completed", "{envelope}");
}

#[tokio::test]
async fn a_path_outside_the_allow_list_is_refused_and_nothing_reaches_the_upstream() {
    let p = spawn_with_profiles(mock_args(1), [None, None]).await;
    let cases = [
        (None, "/internal/reset", "not one this upstream"),
        (None, "/public/v1/../admin/reset", "plain path"),
        (None, "/public/v1/x?admin=1", "plain path"),
        (Some("replicate"), "/v1/models", "create.paths: /v1/predictions"),
        (Some("openai-batch"), "/v1/files", "not one this upstream"),
    ];
    for (upstream, path, expected) in cases {
        let mut request = upscale(&p.app, "/never");
        request["path"] = path.into();
        if let Some(upstream) = upstream {
            request["upstream"] = upstream.into();
        }
        let response = create(&p.app, &request).await;
        assert_eq!(response.status(), 422, "{path}");
        let problem: Value = response.json().await.unwrap();
        assert!(problem["detail"].as_str().unwrap().contains(expected), "{path}: {problem}");
    }
    let mut not_an_object = upscale(&p.app, "/never");
    not_an_object["body"] = json!(["a"]);
    assert_eq!(create(&p.app, &not_an_object).await.status(), 422);
    for mock in [&p.app.upstream, &p.replicate, &p.openai] {
        assert!(mock.creations().is_empty(), "nothing reached the upstream");
    }
    assert!(subscriptions(&p.app).await.is_empty());
}

#[tokio::test]
async fn a_profile_without_a_create_table_refuses_creation() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("token");
    std::fs::write(&secret, crate::upstreams::TOKEN).unwrap();
    let mock =
        MockUpstream::start_profile(&mock_args(1), jobhook::mock_upstream::MockProfile::Replicate).await.unwrap();
    let block = crate::upstreams::documented("replicate", &mock.url(), &secret, None);
    let without = block.split("[upstream.create]").next().unwrap();
    let app = spawn_app_with(Settings::default().config_file(without)).await;
    let request = json!({"upstream": "replicate", "path": "/v1/predictions", "body": {},
        "callback_url": app.receiver.url("/x")});
    let response = create(&app, &request).await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("has no create table"), "{problem}");
    assert!(mock.creations().is_empty());
}

#[tokio::test]
async fn an_upstream_error_is_a_502_with_its_status_and_nothing_is_registered() {
    let app = spawn_app().await;
    app.upstream.script_creations(vec![Creation::Status(500), Creation::NoJobId, Creation::Garbage]);
    let cases = [
        (500, "simulated creation error", "HTTP 500"),
        (200, "queued", "no job ID at /job_id"),
        (200, "busy", "not JSON"),
    ];
    for (status, body, reason) in cases {
        let response = create(&app, &upscale(&app, "/never")).await;
        assert_eq!(response.status(), 502);
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["upstream_status"], status, "{problem}");
        assert!(problem["upstream_body"].as_str().unwrap().contains(body), "{problem}");
        assert!(problem["detail"].as_str().unwrap().contains(reason), "{problem}");
        assert_eq!(problem["type"], "urn:jobhook:problem:upstream-failed");
    }
    assert_eq!(app.upstream.creations().len(), 3);
    assert!(subscriptions(&app).await.is_empty(), "nothing registered");
}

#[tokio::test]
async fn an_idempotency_key_retry_creates_one_upstream_job_and_returns_the_first_answer() {
    let app = spawn_app().await;
    let request = upscale(&app, "/once");
    let first = create_as(&app, KEY_A, &request, Some("order-A-1")).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_location = first.headers()["location"].clone();
    let first_body = first.bytes().await.unwrap();

    // The same request, its members written in another order: the same request.
    let reordered = format!(
        r#"{{"metadata": {{"order": "A-1"}}, "callback_url": {}, "body": {{"scale": 2, "image_url": "https://example.com/cat.png"}}, "path": "/public/v1/image-tune/upscale"}}"#,
        request["callback_url"]
    );
    let again = app.http.post(app.url("/v1/jobs")).bearer_auth(KEY_A).header("idempotency-key", "order-A-1");
    let again = again.header("content-type", "application/json").body(reordered).send().await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["location"], first_location);
    assert_eq!(again.bytes().await.unwrap(), first_body, "the first answer, byte for byte");
    assert_eq!(app.upstream.creations().len(), 1, "one upstream job");

    // Another body under the same key is refused, and goes nowhere.
    let mut other = request.clone();
    other["body"]["scale"] = 4.into();
    let refused = create_as(&app, KEY_A, &other, Some("order-A-1")).await;
    assert_eq!(refused.status(), 422);
    let problem: Value = refused.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("another request"), "{problem}");
    assert_eq!(app.upstream.creations().len(), 1);

    // Keys are per tenant: tenant B's same key is its own.
    assert_eq!(create_as(&app, KEY_B, &request, Some("order-A-1")).await.status(), 201);
    assert_eq!(app.upstream.creations().len(), 2);
    app.receiver.wait_for("/once", 2).await;
    assert_eq!(subscriptions(&app).await.len(), 1, "tenant A has one subscription");
}

#[tokio::test]
async fn an_upstream_failure_is_kept_under_its_key_and_a_retry_in_flight_is_a_conflict() {
    let app = spawn_app().await;
    app.upstream.script_creations(vec![Creation::Status(503)]);
    let request = upscale(&app, "/x");
    let failed = create_as(&app, KEY_A, &request, Some("k-502")).await;
    assert_eq!(failed.status(), 502);
    let failed_body = failed.bytes().await.unwrap();
    let again = create_as(&app, KEY_A, &request, Some("k-502")).await;
    assert_eq!(again.status(), 502, "the outcome stands: the upstream may have made the job");
    assert_eq!(again.bytes().await.unwrap(), failed_body);
    assert_eq!(app.upstream.creations().len(), 1);

    app.upstream.script_creations(vec![Creation::Hang(Duration::from_millis(800))]);
    let slow = {
        let (http, url, request) = (app.http.clone(), app.url("/v1/jobs"), request.clone());
        tokio::spawn(async move {
            let post = http.post(url).bearer_auth(KEY_A).header("idempotency-key", "k-slow").json(&request);
            post.send().await.unwrap().status().as_u16()
        })
    };
    eventually(Duration::from_secs(5), "the slow creation to reach the upstream", || async {
        (app.upstream.creations().len() == 2).then_some(())
    })
    .await;
    let early = create_as(&app, KEY_A, &request, Some("k-slow")).await;
    assert_eq!(early.status(), 409);
    assert_eq!(slow.await.unwrap(), 201);
    assert_eq!(create_as(&app, KEY_A, &request, Some("k-slow")).await.status(), 201);
    assert_eq!(app.upstream.creations().len(), 2, "one job per key");
    assert_eq!(create_as(&app, KEY_A, &request, Some("bad key with spaces")).await.status(), 400);
}
