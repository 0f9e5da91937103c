//! Keys and secrets: rotation verified by the stock library, revocation through the CLI,
//! tenants kept apart on every route, and no secret in logs or bodies.

use serde_json::Value;

use crate::support::binary::{args_on, free_port, start_with};
use crate::support::helpers::*;

#[tokio::test]
async fn after_a_rotation_deliveries_verify_with_the_old_and_the_new_secret() {
    let app = spawn_app().await;
    // A delivery first, so the dispatcher holds the old secret when the rotation comes.
    app.register(&new_job(), &app.receiver.url("/before")).await;
    app.receiver.wait_for("/before", 1).await;
    let rotated = app.http.post(app.url("/v1/signing-secret/rotate")).bearer_auth(KEY_A).send().await.unwrap();
    assert_eq!(rotated.status(), 200);
    let rotated: Value = rotated.json().await.unwrap();
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, SECRET);
    assert!(rotated["previous_secret_valid_until"].as_str().unwrap().ends_with('Z'));
    let current: Value = app.get_as(KEY_A, "/v1/signing-secret").await.json().await.unwrap();
    assert_eq!(current["secret"], new_secret);

    app.register(&new_job(), &app.receiver.url("/hook")).await;
    let got = app.receiver.wait_for("/hook", 1).await;
    assert_eq!(got[0].header("webhook-signature").split(' ').count(), 2, "two signatures during the grace period");
    got[0].verify(SECRET).expect("the previous secret still verifies");
    got[0].verify(&new_secret).expect("the new secret verifies");
    // Tenant B's secret did not change.
    let b: Value = app.get_as(KEY_B, "/v1/signing-secret").await.json().await.unwrap();
    assert_eq!(b["secret"], SECRET);
}

#[tokio::test]
async fn after_the_grace_period_only_the_new_secret_signs() {
    let app = spawn_app_with(Settings::default().arg("--secret-rotation-grace", "1ms")).await;
    let rotated = json_as_a(app.http.post(app.url("/v1/signing-secret/rotate"))).await;
    let new_secret = rotated["secret"].as_str().unwrap();
    app.register(&new_job(), &app.receiver.url("/hook")).await;
    let got = app.receiver.wait_for("/hook", 1).await;
    assert_eq!(got[0].header("webhook-signature").split(' ').count(), 1);
    got[0].verify(new_secret).unwrap();
    assert!(got[0].verify(SECRET).is_err(), "the old secret no longer verifies");
}

#[tokio::test]
async fn a_revoked_key_answers_401_at_once() {
    let app = spawn_app().await;
    let created = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["keys", "create", "--name", "to-revoke", "--database-url", &app.db_url])
        .output()
        .await
        .unwrap();
    assert!(created.status.success());
    let out = String::from_utf8_lossy(&created.stdout);
    let key = out.lines().next().unwrap().rsplit(' ').next().unwrap().to_owned();
    assert_eq!(app.get_as(&key, "/v1/subscriptions").await.status(), 200);
    // Registration checks the key inside its own write; once seen valid, the key is not read first.
    let callback = app.receiver.url("/hook");
    assert_eq!(app.register_as(&key, &new_job(), &callback).await.status(), 201);

    let list = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["keys", "list", "--database-url", &app.db_url])
        .output()
        .await
        .unwrap();
    let listing = String::from_utf8_lossy(&list.stdout);
    assert!(!listing.contains(&key), "keys list never shows a key");
    let id = listing.lines().find(|l| l.ends_with("to-revoke")).unwrap().split_whitespace().next().unwrap().to_owned();

    let revoked = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["keys", "revoke", &id, "--database-url", &app.db_url])
        .output()
        .await
        .unwrap();
    assert!(revoked.status.success(), "{}", String::from_utf8_lossy(&revoked.stderr));
    assert_eq!(app.get_as(&key, "/v1/subscriptions").await.status(), 401);
    let refused = app.register_as(&key, &new_job(), &callback).await;
    assert_eq!(refused.status(), 401, "registration refuses a revoked key at once, too");
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    assert_eq!(app.register_as(&key, &new_job(), &callback).await.status(), 401);
    // The other keys still work.
    assert_eq!(app.get_as(KEY_A, "/v1/subscriptions").await.status(), 200);
}

#[tokio::test]
async fn tenant_b_cannot_touch_tenant_a_on_any_route() {
    let app = spawn_app().await;
    let sub = app.register(&new_job(), &app.receiver.url("/hook")).await;
    let id = sub["id"].as_str().unwrap();
    app.wait_for_state(id, "delivered").await;
    let base = format!("/v1/subscriptions/{id}");
    assert_eq!(app.get_as(KEY_B, &base).await.status(), 404);
    assert_eq!(app.get_as(KEY_B, &format!("{base}/deliveries")).await.status(), 404);
    assert_eq!(app.delete_as(KEY_B, id).await.status(), 404);
    let redeliver = app.http.post(app.url(&format!("{base}/redeliver"))).bearer_auth(KEY_B).send().await.unwrap();
    assert_eq!(redeliver.status(), 404);
    let list: Value = app.get_as(KEY_B, "/v1/subscriptions").await.json().await.unwrap();
    assert!(list["items"].as_array().unwrap().is_empty());
    let by_job: Value = app
        .get_as(KEY_B, &format!("/v1/subscriptions?job_id={}", sub["job_id"].as_str().unwrap()))
        .await
        .json()
        .await
        .unwrap();
    assert!(by_job["items"].as_array().unwrap().is_empty());
    // A's subscription was delivered once and untouched.
    assert_eq!(app.receiver.requests_to("/hook").len(), 1);
    assert_eq!(app.subscription(id).await["state"], "delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_debug_logs_bodies_or_subscriptions() {
    let upstream_key = "upstream-secret-key-0123456789";
    let mock = jobhook::mock_upstream::MockArgs { api_key: Some(upstream_key.into()), ..mock_args(1) };
    let upstream = jobhook::mock_upstream::MockUpstream::start(&mock).await.unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = args_on(&listen, &db_url, &upstream.url());
    args.extend(["--upstream-api-key".into(), upstream_key.into()]);
    let mut running = start_with(&args, "debug").await;
    let http = reqwest::Client::new();
    let app = format!("http://{listen}");

    let mut bodies = String::new();
    let sub: Value = http
        .post(format!("{app}/v1/subscriptions"))
        .bearer_auth(KEY_A)
        .json(&serde_json::json!({ "job_id": new_job(), "callback_url": receiver.url("/hook") }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sub["id"].as_str().unwrap();
    receiver.wait_for("/hook", 1).await;
    for path in
        [format!("/v1/subscriptions/{id}"), format!("/v1/subscriptions/{id}/deliveries"), "/v1/subscriptions".into()]
    {
        bodies
            .push_str(&http.get(format!("{app}{path}")).bearer_auth(KEY_A).send().await.unwrap().text().await.unwrap());
    }
    bodies.push_str(
        &http
            .get(format!("{app}/v1/subscriptions"))
            .bearer_auth("a-wrong-key-0123456789")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let rotated = json_as_a(http.post(format!("{app}/v1/signing-secret/rotate"))).await;
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    running.child.start_kill().unwrap();
    running.child.wait().await.unwrap();
    let logs = running.logs();
    assert!(logs.len() > 20, "debug logging was on: {} lines", logs.len());
    let everything = format!("{}\n{bodies}", logs.join("\n"));
    let secret_b64 = SECRET.trim_start_matches("whsec_");
    for (what, secret) in [
        ("API key A", KEY_A),
        ("API key B", KEY_B),
        ("a presented wrong key", "a-wrong-key-0123456789"),
        ("the signing secret", secret_b64),
        ("the rotated secret", new_secret.trim_start_matches("whsec_")),
        ("the upstream key", upstream_key),
    ] {
        assert!(!everything.contains(secret), "{what} appears in logs or bodies");
    }
}

/// What an operator does outlives a restart with the same settings: a configured key revoked with
/// `jobhook keys revoke` stays revoked (with a warning to take it out of the list), and a secret
/// rotated through the API is not put back by `--signing-secret`. A changed `--signing-secret` applies.
#[tokio::test]
async fn a_revoked_configured_key_and_a_rotated_secret_outlive_a_restart() {
    jobhook::install_crypto();
    let upstream = jobhook::mock_upstream::MockUpstream::start(&mock_args(0)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let mut args = args_on("127.0.0.1:0", &db_url, &upstream.url());
    let http = reqwest::Client::new();
    let secret_of = |base: String| {
        let http = http.clone();
        async move { json_as_a(http.get(format!("{base}/v1/signing-secret"))).await["secret"].as_str().unwrap().to_owned() }
    };
    let jobhook = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--database-url", &db_url]);
        let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook")).args(&all).output().await.unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };

    let mut running = start_with(&args, "info").await;
    let base = format!("http://{}", running.addr);
    let rotated = json_as_a(http.post(format!("{base}/v1/signing-secret/rotate"))).await;
    let rotated = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(rotated, SECRET);
    running.child.kill().await.unwrap();
    let listing = jobhook(&["keys", "list"]).await;
    let id = listing.lines().find(|l| l.ends_with("configured key 2")).unwrap().split_whitespace().next().unwrap();
    let said = jobhook(&["keys", "revoke", id]).await;
    assert!(said.contains("--api-keys"), "the operator is told to take it out of the list: {said}");

    let mut running = start_with(&args, "info").await;
    let base = format!("http://{}", running.addr);
    assert_eq!(secret_of(base.clone()).await, rotated, "the rotation outlives the restart");
    let refused = http.get(format!("{base}/v1/subscriptions")).bearer_auth(KEY_B).send().await.unwrap();
    assert_eq!(refused.status(), 401, "the revoked key stays revoked");
    assert!(running.logs().iter().any(|l| l.contains("WARN") && l.contains("stays revoked")), "a warning says so");
    running.child.kill().await.unwrap();

    let changed = jobhook::keys::SigningSecret::generate().expose();
    let at = args.iter().position(|a| a == "--signing-secret").unwrap();
    args[at + 1] = changed.clone();
    let running = start_with(&args, "info").await;
    assert_eq!(secret_of(format!("http://{}", running.addr)).await, changed, "a changed setting applies");
}
