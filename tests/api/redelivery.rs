//! Redelivery: a new series under the same `webhook-id`, for subscriptions that ended with a result.

use std::time::Duration;

use crate::support::helpers::*;

#[tokio::test]
async fn a_delivered_subscription_can_be_redelivered_under_the_same_webhook_id() {
    let app = spawn_app().await;
    let id = &app.subscribe().await;
    app.wait_until(id, SubscriptionState::Delivered).await;
    assert_eq!(app.redeliver(id).await.status(), 202);
    let got = app.receiver.wait_for("/hook", 2).await;
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    got[1].verify(SECRET).unwrap();
    assert_eq!(got[0].body, got[1].body);
    let done = app.wait_until(id, SubscriptionState::Delivered).await;
    assert_eq!(done.attempts, 1);
    let series: Vec<_> = app.attempts(id).await.iter().map(|a| (a.series, a.attempt)).collect();
    assert_eq!(series, vec![(1, 1), (2, 1)]);
}

#[tokio::test]
async fn a_failed_delivery_can_be_redelivered_once_the_receiver_is_fixed() {
    let app = spawn_app().await;
    app.receiver.answer_with(&[410]);
    let id = &app.subscribe().await;
    let failed = app.wait_until(id, SubscriptionState::Failed).await;
    assert_eq!(failed.failure_reason, Some(FailureReason::CallbackGone));
    assert_eq!(app.redeliver(id).await.status(), 202);
    let done = app.wait_until(id, SubscriptionState::Delivered).await;
    assert_eq!(done.failure_reason, None);
}

#[tokio::test]
async fn only_ended_subscriptions_with_a_result_can_be_redelivered() {
    let app = spawn_app_with(Settings::never_ending()).await;
    let id = &app.subscribe().await;
    let response = app.redeliver(id).await;
    assert_eq!(response.status(), 409);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn a_delivery_waiting_for_its_retry_is_attempted_now_when_redelivered() {
    let app = spawn_app_with(Settings::default().arg("--retry-schedule", "1h")).await;
    app.receiver.answer_with(&[500]);
    let id = &app.subscribe().await;
    app.receiver.wait_for("/hook", 1).await;
    eventually(Duration::from_secs(10), "the failed attempt is recorded", || async {
        (app.view(id).await.attempts == 1).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    let response = app.redeliver(id).await;
    assert_eq!(response.status(), 202);
    let view: SubscriptionView = response.json().await.unwrap();
    assert_eq!(view.state, SubscriptionState::Delivering);
    let got = app.receiver.wait_for("/hook", 2).await;
    assert!(started.elapsed() < Duration::from_secs(10), "the retry came now, not in an hour");
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    got[1].verify(SECRET).unwrap();
    let done = app.wait_until(id, SubscriptionState::Delivered).await;
    assert_eq!(done.attempts, 2, "the series goes on: no new series");
    let series: Vec<_> = app.attempts(id).await.iter().map(|a| (a.series, a.attempt)).collect();
    assert_eq!(series, vec![(1, 1), (1, 2)]);
}
