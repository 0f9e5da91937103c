//! What operators see: /metrics after a real flow, /readyz, /healthz.

use jobhook::mock_upstream::Answer;

use crate::support::helpers::*;

#[tokio::test]
async fn metrics_count_a_real_flow() {
    let app = spawn_app().await;
    app.receiver.answer_with(&[500]); // one delivery needs a second attempt
    let (a, b, c) = (new_job(), new_job(), new_job());
    app.upstream.script(b.parse().unwrap(), vec![Answer::Status(503), Answer::Failed]);
    app.upstream.script(c.parse().unwrap(), vec![Answer::Status(422)]);
    let sub_a = app.register(&a, &app.receiver.url("/a")).await;
    let sub_b = app.register(&b, &app.receiver.url("/b")).await;
    let sub_c = app.register(&c, &app.receiver.url("/c")).await;
    app.wait_for_state(sub_a["id"].as_str().unwrap(), "delivered").await;
    app.wait_for_state(sub_b["id"].as_str().unwrap(), "delivered").await;
    app.wait_for_state(sub_c["id"].as_str().unwrap(), "failed").await;
    let d = new_job();
    app.upstream.script(d.parse().unwrap(), vec![Answer::Pending; 1000]);
    let sub_d = app.register(&d, &app.receiver.url("/d")).await;
    assert_eq!(app.delete_as(KEY_A, sub_d["id"].as_str().unwrap()).await.status(), 204);

    let response = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();
    let m = |series: &str| sample(&text, series);

    assert_eq!(m("jobhook_subscriptions_registered_total"), 4.0, "{text}");
    assert_eq!(m(r#"jobhook_subscriptions_finished_total{state="delivered"}"#), 2.0, "{text}");
    assert_eq!(m(r#"jobhook_subscriptions_finished_total{state="failed"}"#), 1.0, "{text}");
    assert_eq!(m(r#"jobhook_subscriptions_finished_total{state="cancelled"}"#), 1.0, "{text}");
    assert_eq!(m(r#"jobhook_subscriptions{state="delivered"}"#), 2.0, "{text}");
    assert_eq!(m(r#"jobhook_subscriptions{state="failed"}"#), 1.0, "{text}");
    assert_eq!(m(r#"jobhook_subscriptions{state="cancelled"}"#), 1.0, "{text}");
    assert_eq!(m(r#"jobhook_subscriptions{state="polling"}"#), 0.0, "{text}");

    // a: Pending, Pending, Succeed; b: 503, Failed; c: 422; d: Pending until cancelled.
    assert_eq!(m(r#"jobhook_polls_total{outcome="terminal"}"#), 2.0, "{text}");
    assert_eq!(m(r#"jobhook_polls_total{outcome="5xx"}"#), 1.0, "{text}");
    assert_eq!(m(r#"jobhook_polls_total{outcome="4xx"}"#), 1.0, "{text}");
    assert!(m(r#"jobhook_polls_total{outcome="pending"}"#) >= 2.0, "{text}");
    let polls: f64 = ["pending", "terminal", "5xx", "4xx"]
        .iter()
        .map(|o| m(&format!(r#"jobhook_polls_total{{outcome="{o}"}}"#)))
        .sum();
    assert_eq!(m("jobhook_upstream_request_duration_seconds_count"), polls, "one latency per poll: {text}");

    assert_eq!(m(r#"jobhook_delivery_attempts_total{outcome="retry",attempt="1"}"#), 1.0, "{text}");
    assert_eq!(m(r#"jobhook_delivery_attempts_total{outcome="delivered",attempt="1"}"#), 1.0, "{text}");
    assert_eq!(m(r#"jobhook_delivery_attempts_total{outcome="delivered",attempt="2"}"#), 1.0, "{text}");
    assert_eq!(m("jobhook_delivery_request_duration_seconds_count"), 3.0, "{text}");
    assert_eq!(m("jobhook_delivery_lag_seconds_count"), 2.0, "one lag per delivery: {text}");
    assert!(m("jobhook_store_write_duration_seconds_count") >= 4.0, "{text}");
    assert_eq!(m("jobhook_deliveries_waiting"), 0.0, "{text}");

    for unbounded in [a.as_str(), &b, &c, &d, "127.0.0.1", sub_a["id"].as_str().unwrap()] {
        assert!(!text.contains(unbounded), "no IDs or URLs in labels: {unbounded}");
    }
}

#[tokio::test]
async fn readyz_says_what_runs_and_healthz_is_up() {
    let app = spawn_app().await;
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    for check in ["store", "poller", "dispatcher"] {
        assert_eq!(ready["checks"][check], "ok", "{ready}");
    }
    assert_eq!(ready["checks"].get("lease loop").is_some(), on_postgres(), "{ready}");
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}
