//! Registering, reading, listing and cancelling subscriptions; errors as problem+json; tenants apart.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::helpers::*;

async fn problem(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert!(body["type"].as_str().unwrap().starts_with("urn:jobhook:problem:"));
    assert!(!body["detail"].as_str().unwrap().is_empty());
    body
}

#[tokio::test]
async fn registering_a_job_answers_201_with_the_stored_subscription() {
    let app = spawn_app().await;
    let job = new_job();
    let response = app.register_as(KEY_A, &job, &app.receiver.url("/hook")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let sub: Value = response.json().await.unwrap();
    assert_eq!(location, format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap()));
    assert_eq!(sub["job_id"], job);
    assert_eq!(sub["callback_url"], app.receiver.url("/hook"));
    assert!(["polling", "delivering", "delivered"].contains(&sub["state"].as_str().unwrap()));
    assert!(sub["created_at"].as_str().unwrap().ends_with('Z'));
    let read = app.subscription(sub["id"].as_str().unwrap()).await;
    assert_eq!(read["id"], sub["id"]);
}

#[tokio::test]
async fn registering_the_same_job_and_callback_again_answers_200_with_the_same_subscription() {
    let app = spawn_app().await;
    let job = new_job();
    let first = app.register(&job, &app.receiver.url("/hook")).await;
    let again = app.register_as(KEY_A, &job.to_uppercase(), &app.receiver.url("/hook")).await;
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    // Another tenant registering the same job gets its own subscription.
    let other = app.register_as(KEY_B, &job, &app.receiver.url("/hook")).await;
    assert_eq!(other.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_job_id_that_is_not_a_uuid_is_refused_with_422() {
    let app = spawn_app().await;
    let body =
        problem(app.register_as(KEY_A, "job-42", &app.receiver.url("/hook")).await, StatusCode::UNPROCESSABLE_ENTITY)
            .await;
    assert!(body["detail"].as_str().unwrap().contains("UUID"), "{body}");
}

#[tokio::test]
async fn a_callback_url_that_is_not_http_is_refused_with_422() {
    let app = spawn_app().await;
    for url in ["ftp://example.com/x", "not a url", "https://user:pw@example.com/"] {
        let body = problem(app.register_as(KEY_A, &new_job(), url).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(body["detail"].as_str().unwrap().contains("callback_url"), "{body}");
    }
    let long = format!("https://example.com/{}", "a".repeat(2100));
    problem(app.register_as(KEY_A, &new_job(), &long).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    // Under the limit as sent, 6,000 bytes once percent-encoded as stored.
    let encoded = format!("https://example.com/{}", "ü".repeat(1000));
    let body = problem(app.register_as(KEY_A, &new_job(), &encoded).await, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(body["detail"].as_str().unwrap().contains("percent-encoded"), "{body}");
}

#[tokio::test]
async fn with_private_callbacks_allowed_a_localhost_callback_is_delivered() {
    let app = spawn_app().await;
    let callback = app.receiver.url("/hook").replace("127.0.0.1", "localhost");
    let sub = app.register(&new_job(), &callback).await;
    app.wait_for_state(sub["id"].as_str().unwrap(), "delivered").await;
}

#[tokio::test]
async fn private_callbacks_are_refused_unless_the_operator_allows_them() {
    let app = spawn_app_with(Settings::default().arg("--allow-private-callbacks", "false")).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest",
        "http://localhost/x",
        "http://10.0.0.1/x",
        "http://[fe80::1%25eth0]/x",
        "http://0x7f000001/x",
        "http://[::ffff:127.0.0.1]/x",
    ] {
        let body = problem(app.register_as(KEY_A, &new_job(), url).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        // Zone-suffixed literals are not valid URLs at all; the rest are refused by the policy.
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("not allowed") || detail.contains("not a valid absolute URL"), "{url}: {body}");
    }
}

#[tokio::test]
async fn malformed_json_is_400_and_a_wrong_shape_is_422_naming_the_field() {
    let app = spawn_app().await;
    let post = |body: &'static str| app.http.post(app.url("/v1/subscriptions")).bearer_auth(KEY_A).body(body).send();
    problem(post("{not json").await.unwrap(), StatusCode::BAD_REQUEST).await;
    problem(post("").await.unwrap(), StatusCode::BAD_REQUEST).await;
    let unknown = problem(
        post(
            r#"{"job_id":"3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11","callback_url":"https://example.com","colour":"red"}"#,
        )
        .await
        .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(unknown["detail"].as_str().unwrap().contains("colour"), "{unknown}");
    let missing = problem(
        post(r#"{"job_id":"3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11"}"#).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(missing["detail"].as_str().unwrap().contains("callback_url"), "{missing}");
    problem(post(r#"[1,2]"#).await.unwrap(), StatusCode::UNPROCESSABLE_ENTITY).await;
    // An array with the right values in the right order is still not an object.
    for body in [r#"["3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11","https://example.com/hook"]"#, r#""text""#, "42"] {
        let wrong = problem(post(body).await.unwrap(), StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(wrong["detail"], "the body must be a JSON object", "{body}: {wrong}");
    }
}

#[tokio::test]
async fn a_body_over_64_kib_is_refused_with_413() {
    let app = spawn_app().await;
    let big = json!({ "job_id": new_job(), "callback_url": format!("https://example.com/{}", "a".repeat(70_000)) });
    let response = app.http.post(app.url("/v1/subscriptions")).bearer_auth(KEY_A).json(&big).send().await.unwrap();
    problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;
}

#[tokio::test]
async fn requests_without_a_valid_key_answer_401() {
    let app = spawn_app().await;
    let none = app.http.get(app.url("/v1/subscriptions")).send().await.unwrap();
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    problem(none, StatusCode::UNAUTHORIZED).await;
    problem(app.get_as("wrong-key-0123456789", "/v1/subscriptions").await, StatusCode::UNAUTHORIZED).await;
    let basic = app.http.get(app.url("/v1/signing-secret")).header("authorization", "Basic abc").send().await.unwrap();
    problem(basic, StatusCode::UNAUTHORIZED).await;
    // The error never echoes the key.
    let body = problem(app.get_as("wrong-key-0123456789", "/v1/signing-secret").await, StatusCode::UNAUTHORIZED).await;
    assert!(!body.to_string().contains("wrong-key-0123456789"));
}

#[tokio::test]
async fn two_authorization_headers_are_a_400_whichever_comes_first() {
    let app = spawn_app().await;
    let registration = json!({ "job_id": new_job(), "callback_url": app.receiver.url("/hook") });
    for (first, second) in [(KEY_A, "wrong-key-0123456789"), ("wrong-key-0123456789", KEY_A), (KEY_A, KEY_B)] {
        let (first, second) = (format!("Bearer {first}"), format!("Bearer {second}"));
        let list =
            app.http.get(app.url("/v1/subscriptions")).header("authorization", &first).header("authorization", &second);
        let body = problem(list.send().await.unwrap(), StatusCode::BAD_REQUEST).await;
        assert!(body["detail"].as_str().unwrap().contains("one Authorization header"), "{body}");
        let register = app
            .http
            .post(app.url("/v1/subscriptions"))
            .header("authorization", &first)
            .header("authorization", &second);
        problem(register.json(&registration).send().await.unwrap(), StatusCode::BAD_REQUEST).await;
    }
    let list = app.get_as(KEY_A, "/v1/subscriptions").await.json::<Value>().await.unwrap();
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "nothing was registered: {list}");
}

#[tokio::test]
async fn a_tenant_cannot_see_or_cancel_another_tenants_subscription() {
    let app = spawn_app().await;
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let id = sub["id"].as_str().unwrap();
    problem(app.get_as(KEY_B, &format!("/v1/subscriptions/{id}")).await, StatusCode::NOT_FOUND).await;
    problem(app.get_as(KEY_B, &format!("/v1/subscriptions/{id}/deliveries")).await, StatusCode::NOT_FOUND).await;
    let delete = app.delete_as(KEY_B, id).await;
    problem(delete, StatusCode::NOT_FOUND).await;
    let list: Value = app.get_as(KEY_B, "/v1/subscriptions").await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    // Still A's, and untouched.
    assert_ne!(app.subscription(id).await["state"], "cancelled");
}

#[tokio::test]
async fn unknown_or_malformed_subscription_ids_answer_404() {
    let app = spawn_app().await;
    problem(app.get_as(KEY_A, &format!("/v1/subscriptions/{}", uuid::Uuid::now_v7())).await, StatusCode::NOT_FOUND)
        .await;
    problem(app.get_as(KEY_A, "/v1/subscriptions/not-an-id").await, StatusCode::NOT_FOUND).await;
    problem(app.get_as(KEY_A, "/v1/nothing-here").await, StatusCode::NOT_FOUND).await;
    let put = app.http.put(app.url("/v1/subscriptions")).bearer_auth(KEY_A).send().await.unwrap();
    problem(put, StatusCode::METHOD_NOT_ALLOWED).await;
}

/// A path pasted from the docs with its `<id>` placeholder left in, sent as curl sends it (raw), is
/// refused before routing (a URI may not hold `<`), and percent-encoded it reaches the router: both
/// answer a problem, not a bare status with an empty body.
#[tokio::test]
async fn a_placeholder_id_left_in_a_raw_request_answers_a_problem() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    for path in ["/v1/subscriptions/<id>", "/v1/subscriptions/<id>/deliveries", "/v1/subscriptions/%3Cid%3E/deliveries"]
    {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {KEY_A}\r\nconnection: close\r\n\r\n",
            app.addr
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("the server answers and closes the connection")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
        let status: u16 = head[9..12].parse().unwrap();
        assert!((400..500).contains(&status), "{path}: {answer}");
        assert!(head.to_ascii_lowercase().contains("content-type: application/problem+json"), "{path}: {answer}");
        let problem: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {answer}"));
        assert_eq!(problem["status"], status, "{path}: {answer}");
        assert!(problem["type"].as_str().unwrap().starts_with("urn:jobhook:problem:"), "{path}: {answer}");
        assert!(!problem["detail"].as_str().unwrap().is_empty(), "{path}: {answer}");
    }
}

#[tokio::test]
async fn the_list_pages_newest_first_and_filters_by_job_and_state() {
    let app = spawn_app_with(Settings::never_ending()).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let sub = app.register(&new_job(), &app.receiver.url(&format!("/hook/{i}"))).await;
        ids.push(sub["id"].as_str().unwrap().to_owned());
    }
    let first: Value = app.get_as(KEY_A, "/v1/subscriptions?limit=2").await.json().await.unwrap();
    let page: Vec<_> =
        first["items"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(page, vec![ids[4].clone(), ids[3].clone()]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let second: Value =
        app.get_as(KEY_A, &format!("/v1/subscriptions?limit=2&cursor={cursor}")).await.json().await.unwrap();
    let page: Vec<_> =
        second["items"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(page, vec![ids[2].clone(), ids[1].clone()]);
    let third: Value = app
        .get_as(KEY_A, &format!("/v1/subscriptions?limit=2&cursor={}", second["next_cursor"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(third["items"].as_array().unwrap().len(), 1);
    assert!(third["next_cursor"].is_null());

    let job = app.subscription(&ids[0]).await["job_id"].as_str().unwrap().to_owned();
    let by_job: Value = app.get_as(KEY_A, &format!("/v1/subscriptions?job_id={job}")).await.json().await.unwrap();
    assert_eq!(by_job["items"].as_array().unwrap().len(), 1);
    let delete = app.delete_as(KEY_A, &ids[1]).await;
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    let cancelled: Value = app.get_as(KEY_A, "/v1/subscriptions?state=cancelled").await.json().await.unwrap();
    assert_eq!(cancelled["items"].as_array().unwrap().len(), 1);
    assert_eq!(cancelled["items"][0]["id"], ids[1]);

    for bad in ["limit=0", "limit=501", "limit=ten", "state=done", "job_id=nope", "cursor=forged", "colour=red"] {
        problem(app.get_as(KEY_A, &format!("/v1/subscriptions?{bad}")).await, StatusCode::BAD_REQUEST).await;
    }
}

#[tokio::test]
async fn cancelling_stops_polling_and_the_state_becomes_cancelled() {
    let app = spawn_app_with(Settings::never_ending()).await;
    let job = new_job();
    let sub = app.register(&job, &app.receiver.url("/hook")).await;
    let id = sub["id"].as_str().unwrap();
    let job_id: jobhook::domain::JobId = job.parse().unwrap();
    eventually(std::time::Duration::from_secs(5), "a few polls", || async {
        (app.upstream.polls(job_id.clone()).count >= 3).then_some(())
    })
    .await;
    let delete = app.delete_as(KEY_A, id).await;
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.subscription(id).await["state"], "cancelled");
    let polls_at_cancel = app.upstream.polls(job_id.clone()).count;
    // Let many poll intervals pass while another job goes all the way through.
    let other = app.register(&new_job(), &app.receiver.url("/other")).await;
    app.upstream.script(
        other["job_id"].as_str().unwrap().parse().unwrap(),
        vec![jobhook::mock_upstream::Answer::Pending; 5]
            .into_iter()
            .chain([jobhook::mock_upstream::Answer::Succeed])
            .collect(),
    );
    app.wait_for_state(other["id"].as_str().unwrap(), "delivered").await;
    assert!(app.upstream.polls(job_id.clone()).count <= polls_at_cancel + 1, "polling went on after cancel");
    // Cancelling again is fine.
    let again = app.delete_as(KEY_A, id).await;
    assert_eq!(again.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn the_signing_secret_and_health_are_served() {
    let app = spawn_app().await;
    let secret: Value = app.get_as(KEY_A, "/v1/signing-secret").await.json().await.unwrap();
    assert_eq!(secret["secret"], SECRET);
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert!(health.headers().contains_key("x-request-id"));
}
