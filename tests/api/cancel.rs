//! Cancellation tells the truth: once DELETE answers 204, no delivery attempt starts, and a subscription
//! that reads `cancelled` was never delivered.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;

use crate::support::helpers::*;

/// The race from the issue: register, then DELETE at once, 500 times, 50 at a time, for jobs that end
/// at their first poll, so many cancellations meet a delivery about to start or under way.
#[tokio::test]
async fn a_cancel_racing_a_delivery_either_wins_outright_or_reports_the_delivery() {
    let app = spawn_app_with(Settings::mock(mock_args(0))).await;
    let outcomes: Vec<(String, String, StatusCode)> = futures_util::stream::iter(0..500)
        .map(|_| async {
            let job = new_job();
            let sub = app.register(&job, &app.receiver.url(&format!("/c/{job}"))).await;
            let id = sub["id"].as_str().unwrap().to_owned();
            let delete = app.delete_as(KEY_A, &id).await;
            (job, id, delete.status())
        })
        .buffer_unordered(50)
        .collect()
        .await;

    let mut cancelled = 0;
    for (job, id, status) in &outcomes {
        let sub = eventually(Duration::from_secs(30), "the subscription to end", || async {
            let sub = app.subscription(id).await;
            matches!(sub["state"].as_str(), Some("cancelled" | "delivered")).then_some(sub)
        })
        .await;
        let log = app.deliveries(id).await;
        let posts = app.receiver.requests_to(&format!("/c/{job}"));
        let delivered_in_log =
            log.iter().filter(|a| a["status_code"].as_u64().is_some_and(|c| (200..300).contains(&c))).count();
        // One series here (no redelivery): `attempts` counts the whole log.
        assert_eq!(sub["attempts"].as_u64().unwrap() as usize, log.len(), "attempts must count the log: {sub} {log:?}");
        match *status {
            StatusCode::NO_CONTENT => {
                cancelled += 1;
                assert_eq!(sub["state"], "cancelled", "DELETE answered 204 but the subscription reads {sub}");
                assert!(log.is_empty(), "a cancelled subscription has attempts in its log: {log:?}");
                assert!(posts.is_empty(), "a subscription cancelled with a 204 was POSTed {} time(s)", posts.len());
            }
            StatusCode::CONFLICT => {
                assert_eq!(sub["state"], "delivered", "DELETE answered 409 for {sub}");
                assert_eq!(delivered_in_log, 1, "{log:?}");
                assert!(!posts.is_empty());
            }
            other => panic!("DELETE answered {other}"),
        }
    }
    // Nothing arrives late either: every POST the receiver got is for a delivered subscription.
    let delivered: std::collections::HashSet<String> =
        outcomes.iter().filter(|(_, _, s)| *s == StatusCode::CONFLICT).map(|(job, _, _)| format!("/c/{job}")).collect();
    for request in app.receiver.requests() {
        assert!(
            delivered.contains(&request.path),
            "a POST reached {} after its subscription was cancelled",
            request.path
        );
    }
    eprintln!("{cancelled} of {} cancelled; the rest had been delivered", outcomes.len());
}

/// When an attempt is on the wire, DELETE waits for its outcome: a receiver that accepts makes the
/// subscription delivered (409, naming the state); one that fails leaves it cancellable (204).
#[tokio::test]
async fn a_cancel_during_an_attempt_waits_for_its_outcome() {
    let app = spawn_app_with(Settings::mock(mock_args(0))).await;
    let slow = SlowReceiver::start(Duration::from_millis(600), 200).await;
    let sub = app.register(&new_job(), &slow.url).await;
    let id = sub["id"].as_str().unwrap();
    slow.wait_until_called().await;
    let delete = app.delete_as(KEY_A, id).await;
    assert_eq!(delete.status(), StatusCode::CONFLICT);
    assert_eq!(delete.headers()["content-type"], "application/problem+json");
    let problem: Value = delete.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("delivered"), "{problem}");
    assert_eq!(app.subscription(id).await["state"], "delivered");

    let failing = SlowReceiver::start(Duration::from_millis(600), 500).await;
    let sub = app.register(&new_job(), &failing.url).await;
    let id = sub["id"].as_str().unwrap();
    failing.wait_until_called().await;
    let delete = app.delete_as(KEY_A, id).await;
    assert_eq!(delete.status(), StatusCode::NO_CONTENT);
    let sub = app.subscription(id).await;
    assert_eq!(sub["state"], "cancelled");
    let log = app.deliveries(id).await;
    assert_eq!((sub["attempts"].as_u64(), log.len()), (Some(1), 1), "{sub} {log:?}");
    assert_eq!(log[0]["status_code"], 500);
    let calls = failing.calls();
    // No attempt starts after the 204, though the retry schedule (50 ms) has long come due. (Absence
    // cannot be awaited as a condition: this waits ten retry intervals.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(failing.calls(), calls, "an attempt started after DELETE answered 204");
}

/// A retry holds a claim of its own: the claim taken with the job's result served the first attempt
/// only. DELETE while the retry is on the wire waits for it, and the retry's 2xx makes it a 409.
#[tokio::test]
async fn a_cancel_during_a_retry_waits_for_its_outcome() {
    let app = spawn_app_with(Settings::mock(mock_args(0)).arg("--retry-schedule", "100ms,1s")).await;
    // The first attempt fails at once; the retry takes 800 ms to succeed.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let receiver = axum::Router::new().fallback(move || {
        let calls = counted.clone();
        async move {
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
            }
            tokio::time::sleep(Duration::from_millis(800)).await;
            axum::http::StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let sub = app.register(&new_job(), &url).await;
    let id = sub["id"].as_str().unwrap();
    eventually(Duration::from_secs(10), "the retry to be on the wire", || async {
        (calls.load(std::sync::atomic::Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    let delete = app.delete_as(KEY_A, id).await;
    assert_eq!(delete.status(), StatusCode::CONFLICT, "DELETE during a retry that then succeeded");
    let sub = app.subscription(id).await;
    let log = app.deliveries(id).await;
    assert_eq!(sub["state"], "delivered", "{sub}");
    assert_eq!(sub["attempts"].as_u64(), Some(log.len() as u64), "{sub} {log:?}");
}

/// A receiver that takes `delay` to answer `status`, counting its calls.
struct SlowReceiver {
    url: String,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SlowReceiver {
    async fn start(delay: Duration, status: u16) -> SlowReceiver {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let app = axum::Router::new().fallback(move || {
            let calls = counted.clone();
            async move {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/slow", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        SlowReceiver { url, calls }
    }

    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn wait_until_called(&self) {
        eventually(Duration::from_secs(10), "the receiver to be called", || async { (self.calls() > 0).then_some(()) })
            .await;
    }
}
