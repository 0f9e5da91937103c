//! The two forms of a delivery's body (issue 14, item 2): the upstream's answer byte for byte (`raw`),
//! or that answer inside the Standard Webhooks payload structure (`envelope`); and the event type both
//! carry in a `jobhook-event-type` header.
//!
//! An envelope is built from stored facts only (the job's end time, not the attempt's), so every
//! attempt and redelivery of one `webhook-id` sends the same bytes.

use bytes::Bytes;
use serde_json::{Value, json};

use crate::domain::{Payload, Timestamp};
use crate::store::DeliveryTask;

/// `job.succeeded` for a `Succeed` body, `job.failed` otherwise (the poller delivers only final ones).
pub fn event_type(body: &[u8]) -> &'static str {
    serde_json::from_slice::<Value>(body).map(|b| event_of(&b)).unwrap_or("job.failed")
}

fn event_of(body: &Value) -> &'static str {
    if body.get("status").and_then(Value::as_str) == Some("Succeed") { "job.succeeded" } else { "job.failed" }
}

/// The Standard Webhooks payload structure around `data` (an AetherForge body: its type read from it).
pub fn envelope(data: Value, subscription_id: Option<String>, job_id: &str, metadata: Value, at: Timestamp) -> Value {
    let event = event_of(&data);
    typed_envelope(event, data, subscription_id, job_id, metadata, at)
}

/// The Standard Webhooks payload structure around `data`, of type `event`.
fn typed_envelope(
    event: &str,
    data: Value,
    subscription_id: Option<String>,
    job_id: &str,
    metadata: Value,
    at: Timestamp,
) -> Value {
    json!({
        "type": event,
        "timestamp": at.rfc3339(),
        "data": data,
        "subscription": {"id": subscription_id, "job_id": job_id, "metadata": metadata},
    })
}

/// What a delivery of `task` sends; `event` is its type (see [`crate::config::upstreams::EventTypes`]).
pub fn body_of(task: &DeliveryTask, event: &str) -> Bytes {
    if task.form.payload == Payload::Raw {
        return task.body.clone();
    }
    // The upstream's answer was validated as a JSON job status before it was stored; should a row hold
    // something else, it is carried as a string rather than dropped.
    let data = serde_json::from_slice(&task.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&task.body).into_owned()));
    let metadata =
        task.form.metadata.as_deref().and_then(|m| serde_json::from_str(m).ok()).unwrap_or_else(|| json!({}));
    let subscription_id = Some(task.subscription_id.to_string());
    let wrapped = typed_envelope(event, data, subscription_id, task.job_id.id(), metadata, task.finished_at);
    Bytes::from(serde_json::to_vec(&wrapped).expect("a JSON value serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_follows_the_standard_webhooks_payload_structure() {
        let data = json!({"job_id": "j", "status": "Failed", "image_urls": []});
        let wrapped = envelope(data, None, "j", json!({"order": 7}), Timestamp::from_millis(0));
        assert_eq!(wrapped["type"], "job.failed");
        assert_eq!(wrapped["timestamp"], "1970-01-01T00:00:00Z");
        assert_eq!(wrapped["data"]["status"], "Failed");
        assert_eq!(wrapped["subscription"], json!({"id": null, "job_id": "j", "metadata": {"order": 7}}));
        assert_eq!(event_type(br#"{"status":"Succeed"}"#), "job.succeeded");
        assert_eq!(event_type(br#"{"status":"Failed"}"#), "job.failed");
    }
}
