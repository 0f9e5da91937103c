//! The breaker per callback host: a host that fails every attempt is paused and probed, not retried.

use std::time::Duration;

use serde_json::Value;

use crate::support::helpers::*;

/// Opens after `after` failures within any span; probes every `probe`; three quick retries, so without
/// the breaker a delivery would fail within a second.
fn breaker_settings(after: &str, probe: &str) -> Settings {
    Settings::default()
        .arg("--breaker-after", after)
        .arg("--breaker-min-span", "0s")
        .arg("--breaker-probe-interval", probe)
        .arg("--retry-schedule", "50ms,50ms,50ms")
}

async fn hosts(app: &TestApp, key: &str) -> Vec<Value> {
    let response = app.get_as(key, "/v1/callback-hosts").await;
    assert_eq!(response.status(), 200);
    let list: Value = response.json().await.unwrap();
    list["items"].as_array().unwrap().clone()
}

/// Waits until tenant A sees the receiver's host with its breaker open.
async fn wait_open(app: &TestApp) -> Value {
    let host = app.receiver.addr.to_string();
    eventually(Duration::from_secs(15), "the receiver's breaker to open", || async {
        hosts(app, KEY_A).await.into_iter().find(|h| h["host"] == host.as_str() && h["state"] == "open")
    })
    .await
}

async fn metrics(app: &TestApp) -> String {
    app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap()
}

async fn total_attempts(app: &TestApp, ids: &[String]) -> u32 {
    let mut total = 0;
    for id in ids {
        total += app.view(id).await.attempts;
    }
    total
}

#[tokio::test]
async fn a_failing_host_is_paused_and_probed_and_its_deliveries_arrive_when_it_recovers() {
    let app = spawn_app_with(breaker_settings("3", "1s")).await;
    app.receiver.answer_with(&[500; 1000]);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.subscribe().await);
    }
    let open = wait_open(&app).await;
    assert!(open["open_since"].is_string(), "{open}");
    assert_eq!(open["last_error"], "HTTP 500");

    // Attempts in flight as it opened end; then the receiver sees one probe per interval, and only those.
    let settled = eventually(Duration::from_secs(15), "the paused deliveries to settle", || async {
        let text = metrics(&app).await;
        (sample(&text, "jobhook_deliveries_paused") >= 2.0).then_some(text)
    })
    .await;
    assert_eq!(sample(&settled, "jobhook_callback_breakers_open"), 1.0, "{settled}");
    for _ in 0..2 {
        let before = app.receiver.requests().len();
        let seen = eventually(Duration::from_secs(10), "a probe", || async {
            let n = app.receiver.requests().len();
            (n > before).then_some(n)
        })
        .await;
        assert_eq!(seen, before + 1, "one probe, and no other attempt");
        eventually(Duration::from_secs(10), "the probe to be recorded", || async {
            (total_attempts(&app, &ids).await as usize == seen).then_some(())
        })
        .await;
    }
    // Several retry schedules' worth of time has passed: none ran out, none advanced while paused.
    for id in &ids {
        assert_eq!(app.view(id).await.state, SubscriptionState::Delivering);
    }
    assert_eq!(total_attempts(&app, &ids).await as usize, app.receiver.requests().len());

    app.receiver.answer_with(&[]);
    for id in &ids {
        app.wait_until(id, SubscriptionState::Delivered).await;
    }
    for request in app.receiver.requests() {
        request.verify(SECRET).unwrap();
    }
    let host = &hosts(&app, KEY_A).await[0];
    assert_eq!((host["state"].as_str(), host["open_since"].is_null()), (Some("closed"), true), "{host}");
    let text = metrics(&app).await;
    assert_eq!(sample(&text, "jobhook_callback_breakers_open"), 0.0, "{text}");
    assert_eq!(sample(&text, "jobhook_deliveries_paused"), 0.0, "{text}");
}

#[tokio::test]
async fn a_host_is_resumed_by_hand_and_only_by_a_tenant_that_delivers_there() {
    // An hour between probes: only the hand resume can bring the delivery back within the test.
    let app = spawn_app_with(breaker_settings("2", "1h")).await;
    app.receiver.answer_with(&[500; 1000]);
    let id = app.subscribe().await;
    wait_open(&app).await;
    let host = app.receiver.addr.to_string();

    assert_eq!(hosts(&app, KEY_B).await, Vec::<Value>::new(), "tenant B delivers nowhere");
    let resume = |key: &'static str, host: String| {
        let request = app.http.post(app.url(&format!("/v1/callback-hosts/{host}/resume"))).bearer_auth(key);
        async move { request.send().await.unwrap() }
    };
    for (key, host) in [(KEY_B, host.clone()), (KEY_A, "nowhere.example".to_owned())] {
        let response = resume(key, host).await;
        assert_eq!(response.status(), 404);
        assert_eq!(response.headers()["content-type"], "application/problem+json");
    }
    assert_eq!(wait_open(&app).await["host"], host.as_str(), "a refused resume changes nothing");

    app.receiver.answer_with(&[]);
    let response = resume(KEY_A, host.clone()).await;
    assert_eq!(response.status(), 200);
    let resumed: Value = response.json().await.unwrap();
    assert_eq!((resumed["state"].as_str(), resumed["consecutive_failures"].as_u64()), (Some("closed"), Some(0)));
    let done = app.wait_until(&id, SubscriptionState::Delivered).await;
    assert_eq!(done.attempts, 3, "two failures opened the breaker; the third attempt came after the resume");
    app.receiver.requests().last().unwrap().verify(SECRET).unwrap();
}
