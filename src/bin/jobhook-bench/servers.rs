//! The benchmark's own servers: the upstream simulator and the verifying callback receiver.

use super::*;

/// Per job: polls answered, when the first terminal answer went out, when the last poll came.
pub(super) type Shard = Mutex<HashMap<uuid::Uuid, JobSeen>>;

#[derive(Default, Clone, Copy)]
pub(super) struct JobSeen {
    pub(super) polls: u32,
    pub(super) terminal_at: Option<Instant>,
    pub(super) last_poll: Option<Instant>,
}

/// The upstream simulator's memory of each job, sharded to keep its locks cold.
pub(super) struct Upstream {
    pub(super) shards: Vec<Shard>,
    pub(super) pending_polls: u32,
    pub(super) polls: AtomicU64,
    /// --pending mode: how late each poll came after the latest moment its interval allows (ms).
    pub(super) lateness: Option<(Duration, Mutex<Vec<f32>>)>,
}

impl Upstream {
    /// An upstream whose jobs answer Pending `pending_polls` times, served on a loopback port.
    pub(super) async fn start(pending_polls: u32, lateness: Option<Duration>) -> (Arc<Upstream>, SocketAddr) {
        let upstream = Arc::new(Upstream {
            shards: (0..64).map(|_| Mutex::new(HashMap::new())).collect(),
            pending_polls,
            polls: AtomicU64::new(0),
            lateness: lateness.map(|interval| (interval, Mutex::new(Vec::new()))),
        });
        let router = axum::Router::new().route("/public/v1/job/{id}", get(job_status)).with_state(upstream.clone());
        (upstream, serve(router).await)
    }

    pub(super) fn shard(&self, id: &uuid::Uuid) -> &Shard {
        &self.shards[id.as_u128() as usize % self.shards.len()]
    }
}

pub(super) async fn job_status(State(up): State<Arc<Upstream>>, Path(raw): Path<String>) -> impl IntoResponse {
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
pub(super) struct Seen {
    pub(super) first_at: Option<Instant>,
    pub(super) count: u32,
    pub(super) webhook_ids: Vec<String>,
}

pub(super) struct Receiver {
    pub(super) secret: SigningSecret,
    pub(super) seen: Mutex<HashMap<String, Seen>>,
    pub(super) bad_signatures: AtomicU64,
    pub(super) received: AtomicU64,
}

impl Receiver {
    /// A receiver checking signatures made with the benchmark's secret, nothing seen yet.
    pub(super) fn new() -> anyhow::Result<Arc<Receiver>> {
        Ok(Arc::new(Receiver {
            secret: SECRET.parse().map_err(anyhow::Error::msg)?,
            seen: Mutex::new(HashMap::new()),
            bad_signatures: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }))
    }
}

pub(super) async fn callback(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
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

pub(super) async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}
