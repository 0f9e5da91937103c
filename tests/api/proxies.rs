//! Environment proxies: the upstream key and the callbacks never go through one the environment names.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobhook::mock_upstream::{MockArgs, MockUpstream};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::binary::start_with_env;
use crate::support::helpers::*;
use crate::support::raw::{Misbehaviour, RawReceiver};

const UPSTREAM_KEY: &str = "the-upstream-key-0123456789";

#[tokio::test]
async fn the_binary_polls_and_delivers_directly_whatever_proxy_the_environment_names() {
    // A "proxy" that counts connections and hangs up on each: whatever reaches it is lost.
    let proxy = RawReceiver::start("127.0.0.1", Misbehaviour::Reset).await;
    let upstream = MockUpstream::start(&MockArgs { api_key: Some(UPSTREAM_KEY.into()), ..mock_args(1) }).await.unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let mut args = base_args(&db_url, &upstream.url());
    args.extend(["--upstream-api-key".to_owned(), UPSTREAM_KEY.to_owned()]);
    let proxy_url = proxy.url("");
    let env: Vec<(&str, &str)> = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"]
        .into_iter()
        .map(|name| (name, proxy_url.as_str()))
        .chain([("NO_PROXY", ""), ("no_proxy", "")])
        .collect();
    let running = start_with_env(&args, "info", &env).await;

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let job = new_job();
    let sub = json_as_a(
        http.post(format!("http://{}/v1/subscriptions", running.addr))
            .json(&json!({ "job_id": job, "callback_url": receiver.url("/hook") })),
    )
    .await;
    let id = sub["id"].as_str().expect("registered").to_owned();
    let done: Value = eventually(Duration::from_secs(15), "the delivery", || async {
        let sub = json_as_a(http.get(format!("http://{}/v1/subscriptions/{id}", running.addr))).await;
        (sub["state"] == "delivered").then_some(sub)
    })
    .await;
    assert!(done["last_error"].is_null(), "{done}");
    assert_eq!(upstream.polls(job.parse().unwrap()).count, 2, "polled directly, with the key");
    assert_eq!(receiver.requests_to("/hook").len(), 1, "delivered directly");
    assert_eq!(proxy.connections.load(Ordering::SeqCst), 0, "the proxy saw a request");
}

/// A forward proxy that answers every poll itself, Succeed for the job asked about, and keeps each
/// request line and `Authorization` header it saw.
async fn answering_proxy() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let line = head.lines().next().unwrap_or_default().to_owned();
                let job = line.split(' ').nth(1).and_then(|uri| uri.rsplit('/').next()).unwrap_or_default();
                let body = json!({ "job_id": job, "status": "Succeed", "image_urls": [] }).to_string();
                let auth = head.lines().find(|l| l.to_ascii_lowercase().starts_with("authorization:"));
                kept.lock().unwrap().push(format!("{line} | {}", auth.unwrap_or_default()));
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn an_upstream_proxy_set_explicitly_carries_the_polls_and_no_callback() {
    let (proxy_url, seen) = answering_proxy().await;
    let settings = Settings::default().arg("--upstream-proxy", &proxy_url).arg("--upstream-api-key", UPSTREAM_KEY);
    let app = spawn_app_with(settings).await;
    let job = new_job();
    let sub = app.register(&job, &app.receiver.url("/hook")).await;
    app.wait_for_state(sub["id"].as_str().unwrap(), "delivered").await;
    assert_eq!(app.upstream.polls(job.parse().unwrap()).count, 0, "the poll went around the proxy");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].contains(&format!("/public/v1/job/{job}")), "{seen:?}");
    assert!(seen[0].contains(UPSTREAM_KEY), "the poll carries the upstream key: {seen:?}");
    assert_eq!(app.receiver.requests_to("/hook").len(), 1, "the callback went directly");
}
