//! Custom headers per subscription: validated at the edge, sent with every attempt and redelivery, part
//! of the registration's identity, and secret (names only in answers, never a value in logs).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::binary::*;
use crate::support::helpers::*;

const TOKEN: &str = "Bearer s3cret-receiver-token-0123456789";

async fn register_with(app: &TestApp, job: &str, path: &str, headers: Value) -> reqwest::Response {
    let body = json!({"job_id": job, "callback_url": app.receiver.url(path), "headers": headers});
    app.http.post(app.url("/v1/subscriptions")).bearer_auth(KEY_A).json(&body).send().await.unwrap()
}

#[tokio::test]
async fn custom_headers_go_with_every_attempt_and_redelivery_and_only_their_names_are_shown() {
    let app = spawn_app().await;
    app.receiver.answer_with(&[500]);
    let response = register_with(&app, &new_job(), "/hook", json!({"Authorization": TOKEN, "X-Tenant": "7"})).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let text = response.text().await.unwrap();
    assert!(!text.contains("s3cret"), "{text}");
    let sub: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(sub["header_names"], json!(["authorization", "x-tenant"]));
    let id = sub["id"].as_str().unwrap();
    app.wait_until(id, SubscriptionState::Delivered).await;
    assert_eq!(app.redeliver(id).await.status(), StatusCode::ACCEPTED);
    let got = app.receiver.wait_for("/hook", 3).await;
    for request in &got {
        assert_eq!(request.header("authorization"), TOKEN);
        assert_eq!(request.header("x-tenant"), "7");
        request.verify(SECRET).unwrap();
        assert_eq!(request.header("content-type"), "application/json");
    }
    for path in
        [format!("/v1/subscriptions/{id}"), format!("/v1/subscriptions/{id}/deliveries"), "/v1/subscriptions".into()]
    {
        let text = app.get_as(KEY_A, &path).await.text().await.unwrap();
        assert!(!text.contains("s3cret"), "{path}: {text}");
    }
    assert_eq!(app.subscription(id).await["header_names"], json!(["authorization", "x-tenant"]));
}

#[tokio::test]
async fn the_same_headers_are_the_same_subscription_and_other_headers_conflict() {
    let app = spawn_app_with(Settings::never_ending()).await;
    let job = new_job();
    let first = register_with(&app, &job, "/hook", json!({"Authorization": TOKEN, "X-Tenant": "7"})).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let id = first.json::<Value>().await.unwrap()["id"].clone();
    let again = register_with(&app, &job, "/hook", json!({"x-tenant": "7", "AUTHORIZATION": TOKEN})).await;
    assert_eq!(again.status(), StatusCode::OK, "names are compared without case");
    assert_eq!(again.json::<Value>().await.unwrap()["id"], id);
    for other in [
        json!({"Authorization": "Bearer another-s3cret", "X-Tenant": "7"}),
        json!({"Authorization": TOKEN}),
        json!({"Authorization": TOKEN, "X-Tenant": "7", "X-More": "1"}),
        json!({}),
        Value::Null,
    ] {
        let response = register_with(&app, &job, "/hook", other.clone()).await;
        assert_eq!(response.status(), StatusCode::CONFLICT, "{other}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let detail = response.json::<Value>().await.unwrap()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(id.as_str().unwrap()) && detail.contains("other custom headers"), "{detail}");
        assert!(!detail.contains("s3cret"), "{detail}");
    }
    // Another callback is another subscription, whatever its headers.
    let elsewhere = register_with(&app, &job, "/other", json!({"Authorization": "Bearer x"})).await;
    assert_eq!(elsewhere.status(), StatusCode::CREATED);
    // Once the first is cancelled, the same job and callback take new headers.
    assert_eq!(app.delete_as(KEY_A, id.as_str().unwrap()).await.status(), StatusCode::NO_CONTENT);
    let renewed = register_with(&app, &job, "/hook", json!({"Authorization": "Bearer new"})).await;
    assert_eq!(renewed.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn invalid_headers_are_refused_with_a_problem_naming_the_header_not_its_value() {
    let app = spawn_app().await;
    let eleven: serde_json::Map<String, Value> = (0..11).map(|i| (format!("X-H{i}"), json!("v"))).collect();
    let cases = [
        (json!({"Host": "s3cret.example"}), "\"Host\""),
        (json!({"content-length": "1"}), "\"content-length\""),
        (json!({"Content-Type": "text/plain"}), "\"Content-Type\""),
        (json!({"Transfer-Encoding": "chunked"}), "\"Transfer-Encoding\""),
        (json!({"Connection": "close"}), "\"Connection\""),
        (json!({"Webhook-Signature": "v1,s3cret"}), "\"Webhook-Signature\""),
        (json!({"X Bad": "1"}), "\"X Bad\""),
        (json!({"X-Key": "line\r\nX-Injected: s3cret"}), "\"X-Key\""),
        (json!({"X-Key": "s3cret".repeat(200)}), "\"X-Key\""),
        (json!({"X-Key": 12345}), "\"X-Key\""),
        (json!("Bearer s3cret"), "JSON object"),
        (Value::Object(eleven), "at most 10"),
    ];
    for (headers, named) in cases {
        let response = register_with(&app, &new_job(), "/hook", headers.clone()).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{headers}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let detail = response.json::<Value>().await.unwrap()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(named), "{headers}: {detail}");
        assert!(!detail.contains("s3cret") && !detail.contains("12345"), "a value is echoed: {detail}");
    }
    assert!(app.receiver.requests().is_empty());
}

#[tokio::test]
async fn a_test_send_carries_custom_headers_and_checks_them_like_a_registration() {
    let app = spawn_app().await;
    let send = |headers: Value| {
        let body = json!({"callback_url": app.receiver.url("/try"), "headers": headers});
        app.http.post(app.url("/v1/test-deliveries")).bearer_auth(KEY_A).json(&body).send()
    };
    let response = send(json!({"Authorization": TOKEN})).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!response.text().await.unwrap().contains("s3cret"));
    let got = app.receiver.wait_for("/try", 1).await;
    assert_eq!(got[0].header("authorization"), TOKEN);
    got[0].verify(SECRET).unwrap();
    let refused = send(json!({"webhook-id": "msg_mine"})).await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

/// The values are stored (a restart, even `kill -9`, still sends them) and never logged, even at debug
/// level, whatever happens to the subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_survive_a_restart_and_never_appear_in_logs() {
    jobhook::install_crypto();
    let upstream = jobhook::mock_upstream::MockUpstream::start(&mock_args(u32::MAX)).await.unwrap();
    let receiver = Receiver::start().await;
    receiver.answer_with(&[500]);
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let args = args_on(&listen, &db_url, &upstream.url());
    let app = format!("http://{listen}");
    let http = reqwest::Client::new();
    let job = new_job();
    let register = |headers: Value| {
        let body = json!({"job_id": job, "callback_url": receiver.url("/hook"), "headers": headers});
        http.post(format!("{app}/v1/subscriptions")).bearer_auth(KEY_A).json(&body).send()
    };

    let mut first = start_with(&args, "debug").await;
    let mut bodies = String::new();
    let created = register(json!({"Authorization": TOKEN})).await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    bodies.push_str(&created.text().await.unwrap());
    bodies.push_str(&register(json!({"Authorization": "Bearer other-s3cret"})).await.unwrap().text().await.unwrap());
    bodies.push_str(&register(json!({"X-Key": "bad\ns3cret"})).await.unwrap().text().await.unwrap());
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();

    let mut second = start_with(&args, "debug").await;
    upstream.script(job.parse().unwrap(), vec![jobhook::mock_upstream::Answer::Succeed]);
    // On PostgreSQL the killed instance's leases lapse first (within one lease TTL, 15 s).
    let got = eventually(Duration::from_secs(40), "the delivery and its retry after the restart", || async {
        let got = receiver.requests_to("/hook");
        (got.len() >= 2).then_some(got)
    })
    .await;
    assert!(got.iter().all(|r| r.header("authorization") == TOKEN), "the stored value is sent after the restart");
    bodies.push_str(
        &http.get(format!("{app}/v1/subscriptions")).bearer_auth(KEY_A).send().await.unwrap().text().await.unwrap(),
    );
    second.child.start_kill().unwrap();
    second.child.wait().await.unwrap();

    let logs = [first.logs(), second.logs()].concat();
    assert!(logs.len() > 20, "debug logging was on: {} lines", logs.len());
    let everything = format!("{}\n{bodies}", logs.join("\n"));
    assert!(everything.contains("authorization"), "the names may be shown");
    let leaks: Vec<_> = everything.lines().filter(|l| l.contains("s3cret")).collect();
    assert!(leaks.is_empty(), "a header value appears in logs or answers: {leaks:#?}");
}
