//! A minimal jobhook receiver in Rust (axum): verifies each delivery with the official
//! `standardwebhooks` crate, drops duplicates by `webhook-id`, and answers 204 at once.
//!
//! ```text
//! cargo run --example rust-receiver -- [PORT]     (with JOBHOOK_SIGNING_SECRET=whsec_...)
//! ```
//!
//! In your own project: `cargo add axum tokio --features tokio/full` and `cargo add standardwebhooks
//! serde_json`, then copy this file.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use standardwebhooks::Webhook;

struct Receiver {
    verifier: Webhook,
    /// webhook-ids already handled; use your database in production.
    seen: Mutex<HashSet<String>>,
}

async fn hook(State(receiver): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    // Verify the raw bytes, before parsing: a re-serialised body would not match the signature.
    if let Err(e) = receiver.verifier.verify(&body, &headers) {
        println!("REJECTED: signature did not verify ({e})");
        return StatusCode::BAD_REQUEST;
    }
    let webhook_id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let job: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(job) => job,
        Err(_) => return StatusCode::BAD_REQUEST,
    };
    if !receiver.seen.lock().unwrap().insert(webhook_id.clone()) {
        println!("duplicate {webhook_id}, already handled");
    } else {
        // Hand the work to a queue or a task and answer at once: jobhook waits for the answer.
        // A subscription registered with "payload": "envelope" gets the job status as `data`.
        let status = if job.get("type").is_some() { &job["data"] } else { &job };
        let event = headers.get("jobhook-event-type").and_then(|v| v.to_str().ok()).unwrap_or("?");
        println!(
            "verified {webhook_id} ({event}): job {} is {}",
            status["job_id"].as_str().unwrap_or("?"),
            status["status"]
        );
        println!("{job:#}");
    }
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() {
    let secret = std::env::var("JOBHOOK_SIGNING_SECRET").expect("set JOBHOOK_SIGNING_SECRET=whsec_...");
    let verifier = Webhook::new(&secret).expect("JOBHOOK_SIGNING_SECRET must be a whsec_ secret");
    let receiver = Arc::new(Receiver { verifier, seen: Mutex::new(HashSet::new()) });
    let port = std::env::args().nth(1).unwrap_or_else(|| "8000".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await.expect("the port is free");
    println!("receiver listening on http://127.0.0.1:{port}");
    let app = Router::new().route("/hook", post(hook)).with_state(receiver);
    axum::serve(listener, app).await.expect("the server runs");
}
