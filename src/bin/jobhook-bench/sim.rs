//! The benchmark's fast upstream simulator and its verifying callback receiver, on loopback.

use super::*;

pub(crate) const KEY: &str = "bench-key-0123456789abcdef";
pub(crate) const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Per job: polls answered, when the first terminal answer went out, when the last poll came.
pub(crate) type Shard = Mutex<HashMap<uuid::Uuid, JobSeen>>;

#[derive(Default, Clone, Copy)]
pub(crate) struct JobSeen {
    pub(crate) polls: u32,
    pub(crate) terminal_at: Option<Instant>,
    pub(crate) last_poll: Option<Instant>,
}

/// The upstream simulator's memory of each job, sharded to keep its locks cold.
pub(crate) struct Upstream {
    pub(crate) shards: Vec<Shard>,
    pub(crate) pending_polls: u32,
    pub(crate) polls: AtomicU64,
    /// --pending mode: how late each poll came after the latest moment its interval allows (ms).
    pub(crate) lateness: Option<(Duration, Mutex<Vec<f32>>)>,
}

impl Upstream {
    pub(crate) fn shard(&self, id: &uuid::Uuid) -> &Shard {
        &self.shards[id.as_u128() as usize % self.shards.len()]
    }
}

pub(crate) async fn job_status(State(up): State<Arc<Upstream>>, Path(raw): Path<String>) -> impl IntoResponse {
    let Ok(id) = uuid::Uuid::try_parse(&raw) else { return (StatusCode::UNPROCESSABLE_ENTITY, String::new()) };
    up.polls.fetch_add(1, Ordering::Relaxed);
    let now = Instant::now();
    let terminal = {
        let mut shard = up.shard(&id).lock().unwrap();
        let entry = shard.entry(id).or_default();
        entry.polls += 1;
        if let (Some((interval, samples)), Some(last)) = (&up.lateness, entry.last_poll) {
            // jobhook spaces polls by the interval ±10%: anything past +10% is late.
            let late = now.duration_since(last).as_secs_f32() - interval.as_secs_f32() * 1.1;
            samples.lock().unwrap().push(late.max(0.0) * 1000.0);
        }
        entry.last_poll = Some(now);
        let terminal = entry.polls > up.pending_polls;
        if terminal && entry.terminal_at.is_none() {
            entry.terminal_at = Some(now);
        }
        terminal
    };
    let body = if terminal {
        format!(r#"{{"job_id":"{id}","status":"Succeed","image_urls":["https://images.example.com/{id}/0.png"]}}"#)
    } else {
        format!(r#"{{"job_id":"{id}","status":"Pending","image_urls":[]}}"#)
    };
    (StatusCode::OK, body)
}

/// What the receiver saw of one job.
#[derive(Default, Clone)]
pub(crate) struct Seen {
    pub(crate) first_at: Option<Instant>,
    pub(crate) count: u32,
    pub(crate) webhook_ids: Vec<String>,
}

pub(crate) struct Receiver {
    pub(crate) secret: SigningSecret,
    pub(crate) seen: Mutex<HashMap<String, Seen>>,
    pub(crate) bad_signatures: AtomicU64,
    pub(crate) received: AtomicU64,
}

pub(crate) async fn callback(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let at = Instant::now();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (id, timestamp, signatures) = (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let expected = timestamp.parse().map(|ts| signing::sign(&rx.secret, &id, ts, &body)).unwrap_or_default();
    if !signatures.split(' ').any(|s| s == expected) {
        rx.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return StatusCode::BAD_REQUEST;
    }
    let job = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["job_id"].as_str().map(str::to_owned))
        .unwrap_or_default();
    {
        let mut seen = rx.seen.lock().unwrap();
        let entry = seen.entry(job).or_default();
        entry.first_at.get_or_insert(at);
        entry.count += 1;
        if !entry.webhook_ids.contains(&id) {
            entry.webhook_ids.push(id);
        }
    }
    rx.received.fetch_add(1, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

pub(crate) async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}
