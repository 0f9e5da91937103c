//! A simulated job API in one of three shapes ([`MockProfile`]): AetherForge's
//! `GET /public/v1/job/{job_id}` (the default), Replicate's `GET /v1/predictions/{id}` and OpenAI's
//! `GET /v1/batches/{id}`.
//!
//! Any well-formed job ID is Pending for a few polls, then ends (Succeed with image URLs by default).
//! Options make jobs fail, stay pending, or answer errors; tests can also script single jobs and read
//! back how each job was polled (count, and the most polls that were ever in flight at once).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::domain::JobId;
pub use create::{Creation, CreationRequest};

mod create;

#[derive(Debug, Clone, Args)]
pub struct MockArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// Require this Bearer key (401 otherwise). Default: any key, or none, is accepted.
    #[arg(long, env = "MOCK_UPSTREAM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// How many polls of a job answer Pending before it ends.
    #[arg(long, default_value_t = 3)]
    pub pending_polls: u32,
    /// How jobs end.
    #[arg(long, value_enum, default_value_t = Outcome::Succeed)]
    pub outcome: Outcome,
    /// The share of polls (0.0–1.0) answered with a 503 error instead.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
}

/// `jobhook mock-upstream`: the simulation's settings and the shape it answers in.
#[derive(Debug, Clone, Args)]
pub struct MockCommand {
    #[command(flatten)]
    pub args: MockArgs,
    /// Which job API to simulate (docs/upstreams.md has a jobhook profile for each).
    #[arg(long, value_enum, default_value_t = MockProfile::Aetherforge)]
    pub profile: MockProfile,
}

/// The shapes of job API the mock speaks: path, ID format and status body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum MockProfile {
    /// `GET /public/v1/job/{uuid}` → `{"job_id","status":"Pending|Succeed|Failed","image_urls"}`.
    #[default]
    Aetherforge,
    /// `GET /v1/predictions/{id}` → `{"id","status":"starting|processing|succeeded|failed|canceled","output"}`.
    Replicate,
    /// `GET /v1/batches/{batch_…}` → `{"id","object":"batch","status":"validating|in_progress|…|completed|failed"}`.
    OpenaiBatch,
}

impl MockProfile {
    /// The profile name docs/upstreams.md gives this shape.
    pub fn name(self) -> &'static str {
        match self {
            MockProfile::Aetherforge => "aetherforge",
            MockProfile::Replicate => "replicate",
            MockProfile::OpenaiBatch => "openai-batch",
        }
    }

    fn route(self) -> &'static str {
        match self {
            MockProfile::Aetherforge => "/public/v1/job/{job_id}",
            MockProfile::Replicate => "/v1/predictions/{job_id}",
            MockProfile::OpenaiBatch => "/v1/batches/{job_id}",
        }
    }

    /// The job the path names, or the answer to an ID this API would not know.
    fn job(self, raw: &str) -> Result<JobId, (StatusCode, &'static str)> {
        match self {
            MockProfile::Aetherforge => {
                raw.parse::<JobId>().map_err(|_| (StatusCode::UNPROCESSABLE_ENTITY, "job_id is not a UUID"))
            }
            MockProfile::Replicate if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                Ok(JobId::new(self.name(), raw))
            }
            MockProfile::OpenaiBatch if raw.starts_with("batch_") => Ok(JobId::new(self.name(), raw)),
            _ => Err((StatusCode::NOT_FOUND, "no such job")),
        }
    }

    /// The status words of this API: first pending, later pending, succeeded, failed.
    fn words(self) -> [&'static str; 4] {
        match self {
            MockProfile::Aetherforge => ["Pending", "Pending", "Succeed", "Failed"],
            MockProfile::Replicate => ["starting", "processing", "succeeded", "failed"],
            MockProfile::OpenaiBatch => ["validating", "in_progress", "completed", "failed"],
        }
    }

    /// A status body: `n` is which poll of the job this is (Replicate starts, then processes).
    fn body(self, id: &str, answer: Stage, n: u32) -> serde_json::Value {
        let [first, later, succeeded, failed] = self.words();
        let status = match answer {
            Stage::Pending if n <= 1 => first,
            Stage::Pending => later,
            Stage::Succeeded => succeeded,
            Stage::Failed => failed,
            Stage::Unknown if self == MockProfile::Aetherforge => "Exploded",
            Stage::Unknown => "exploded",
        };
        let done = answer == Stage::Succeeded;
        match self {
            MockProfile::Aetherforge => {
                let urls: Vec<String> = if done {
                    (0..2).map(|i| format!("https://images.example.com/{id}/{i}.png")).collect()
                } else {
                    vec![]
                };
                json!({ "job_id": id, "status": status, "image_urls": urls })
            }
            MockProfile::Replicate => {
                let output = done.then(|| vec![format!("https://replicate.delivery/{id}/out.png")]);
                let error = (answer == Stage::Failed).then_some("CUDA out of memory");
                json!({ "id": id, "model": "stability-ai/sdxl", "status": status, "output": output, "error": error })
            }
            MockProfile::OpenaiBatch => {
                let output = done.then(|| format!("file-{id}"));
                json!({ "id": id, "object": "batch", "endpoint": "/v1/chat/completions", "status": status, "output_file_id": output })
            }
        }
    }
}

/// Where a simulated job is, whatever the profile calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Pending,
    Succeeded,
    Failed,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Outcome {
    Succeed,
    Fail,
    /// Jobs never end.
    Pending,
}

/// One scripted answer for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Pending,
    Succeed,
    Failed,
    /// An HTTP status with a problem body.
    Status(u16),
    /// 429 or 503 with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// 429 or 503 with `Retry-After` as an HTTP date this many seconds ahead.
    RetryAfterDate(u16, u64),
    /// A 200 whose body is not a job status.
    Garbage,
    /// A 200 whose body breaks off half way (the connection is cut).
    Truncated,
    /// A well-formed Succeed answer about another job.
    OtherJob,
    /// A status the upstream never documented.
    UnknownStatus,
    /// Wait this long before answering Pending (to outlast a poll timeout).
    Hang(Duration),
    /// A Succeed answer with an extra field of arrays nested this deep (a hostile body).
    Nested(usize),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JobPolls {
    pub count: u32,
    pub in_flight: u32,
    pub max_in_flight: u32,
}

#[derive(Debug)]
struct Inner {
    api_key: Option<String>,
    pending_polls: u32,
    outcome: Outcome,
    error_rate: f64,
    profile: MockProfile,
    /// Both by the upstream's own ID ([`JobId::id`]).
    scripts: HashMap<String, Vec<Answer>>,
    polls: HashMap<String, JobPolls>,
    /// When each poll arrived, in order (for rate checks).
    times: Vec<std::time::Instant>,
    /// Who wants to hear of each poll (the demo prints them).
    watcher: Option<tokio::sync::mpsc::UnboundedSender<Polled>>,
    /// Every creation request, in order.
    creations: Vec<CreationRequest>,
    /// How the next creation requests are answered.
    creation_script: std::collections::VecDeque<Creation>,
}

/// A poll the mock answered: the job, which poll of it this was, and the answer.
#[derive(Debug, Clone)]
pub struct Polled {
    pub job_id: JobId,
    pub count: u32,
    pub answer: Answer,
}

/// A running simulated upstream.
#[derive(Clone)]
pub struct MockUpstream {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl MockUpstream {
    /// Serves on `listener` until the runtime ends.
    pub fn serve(listener: tokio::net::TcpListener, args: &MockArgs) -> std::io::Result<Self> {
        Self::serve_profile(listener, args, MockProfile::Aetherforge)
    }

    /// Serves the job API of `profile` on `listener` until the runtime ends.
    pub fn serve_profile(
        listener: tokio::net::TcpListener,
        args: &MockArgs,
        profile: MockProfile,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner {
            api_key: args.api_key.clone(),
            pending_polls: args.pending_polls,
            outcome: args.outcome,
            error_rate: args.error_rate.clamp(0.0, 1.0),
            profile,
            scripts: HashMap::new(),
            polls: HashMap::new(),
            times: Vec::new(),
            watcher: None,
            creations: Vec::new(),
            creation_script: Default::default(),
        }));
        let app = axum::Router::new()
            .route(profile.route(), get(job_status))
            .fallback(create::create_job)
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(MockUpstream { addr, inner })
    }

    pub async fn start(args: &MockArgs) -> std::io::Result<Self> {
        Self::serve(tokio::net::TcpListener::bind(args.listen).await?, args)
    }

    pub async fn start_profile(args: &MockArgs, profile: MockProfile) -> std::io::Result<Self> {
        Self::serve_profile(tokio::net::TcpListener::bind(args.listen).await?, args, profile)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every poll from now on, as it is answered.
    pub fn watch(&self) -> tokio::sync::mpsc::UnboundedReceiver<Polled> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.lock().watcher = Some(tx);
        rx
    }

    /// Answers for one job, in order; the last one repeats.
    pub fn script(&self, job_id: JobId, answers: Vec<Answer>) {
        self.lock().scripts.insert(job_id.id().to_owned(), answers);
    }

    pub fn polls(&self, job_id: JobId) -> JobPolls {
        self.lock().polls.get(job_id.id()).copied().unwrap_or_default()
    }

    pub fn total_polls(&self) -> u64 {
        self.lock().polls.values().map(|p| u64::from(p.count)).sum()
    }

    /// When each poll arrived, in order.
    pub fn poll_times(&self) -> Vec<std::time::Instant> {
        self.lock().times.clone()
    }

    /// The most polls of any one job that were in flight at once.
    pub fn max_overlap(&self) -> u32 {
        self.lock().polls.values().map(|p| p.max_in_flight).max().unwrap_or(0)
    }

    /// Every creation request so far, in order (refused ones too).
    pub fn creations(&self) -> Vec<CreationRequest> {
        self.lock().creations.clone()
    }

    /// How the next creation requests are answered, one each, in order; then as usual.
    pub fn script_creations(&self, answers: Vec<Creation>) {
        self.lock().creation_script = answers.into();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("the mock's lock is never poisoned")
    }
}

pub async fn run(command: MockCommand) -> anyhow::Result<()> {
    let MockCommand { args, profile } = command;
    let mock = MockUpstream::start_profile(&args, profile).await?;
    crate::outln!("mock upstream ({}) listening on http://{}", profile.name(), mock.addr());
    crate::outln!("  jobs are Pending for {} polls, then {:?}", args.pending_polls, args.outcome);
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn problem(status: StatusCode, detail: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], json!({ "detail": detail }).to_string()).into_response()
}

fn json_body(body: &serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// Whether the request carries the Bearer key the mock wants (any, when it wants none).
fn authorized(inner: &Inner, headers: &HeaderMap) -> bool {
    let Some(required) = &inner.api_key else { return true };
    let presented =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    presented == Some(required.as_str())
}

struct InFlightGuard(Arc<Mutex<Inner>>, String);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.0.lock()
            && let Some(p) = inner.polls.get_mut(&self.1)
        {
            p.in_flight -= 1;
        }
    }
}

async fn job_status(State(inner): State<Arc<Mutex<Inner>>>, Path(raw): Path<String>, headers: HeaderMap) -> Response {
    let answer = {
        let mut guard = inner.lock().expect("the mock's lock is never poisoned");
        if !authorized(&guard, &headers) {
            return problem(StatusCode::UNAUTHORIZED, "invalid API key");
        }
        let profile = guard.profile;
        let job_id = match profile.job(&raw) {
            Ok(job_id) => job_id,
            Err((status, detail)) => return problem(status, detail),
        };
        let id = job_id.id().to_owned();
        guard.times.push(std::time::Instant::now());
        let polls = guard.polls.entry(id.clone()).or_default();
        polls.count += 1;
        polls.in_flight += 1;
        polls.max_in_flight = polls.max_in_flight.max(polls.in_flight);
        let n = polls.count;
        let answer = match guard.scripts.get(&id) {
            Some(script) if !script.is_empty() => script[(n as usize - 1).min(script.len() - 1)].clone(),
            _ if guard.error_rate > 0.0 && rand::random_range(0.0..1.0) < guard.error_rate => Answer::Status(503),
            _ if n <= guard.pending_polls => Answer::Pending,
            _ => match guard.outcome {
                Outcome::Succeed => Answer::Succeed,
                Outcome::Fail => Answer::Failed,
                Outcome::Pending => Answer::Pending,
            },
        };
        if let Some(watcher) = &guard.watcher {
            let _ = watcher.send(Polled { job_id, count: n, answer: answer.clone() });
        }
        (answer, InFlightGuard(inner.clone(), id.clone()), id, n, profile)
    };
    let (answer, _guard, id, n, profile) = answer;
    respond(answer, &id, n, profile).await
}

/// The upstream's answer, as the script (or the mock's settings) chose it.
async fn respond(answer: Answer, id: &str, n: u32, profile: MockProfile) -> Response {
    let id = id.to_owned();
    let status_body = |stage| json_body(&profile.body(&id, stage, n));
    match answer {
        Answer::Pending => status_body(Stage::Pending),
        Answer::Succeed => status_body(Stage::Succeeded),
        Answer::Failed => status_body(Stage::Failed),
        Answer::Status(code) => {
            problem(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), "simulated error")
        }
        Answer::RetryAfter(code, secs) => {
            let mut response =
                problem(StatusCode::from_u16(code).unwrap_or(StatusCode::TOO_MANY_REQUESTS), "slow down");
            response.headers_mut().insert(header::RETRY_AFTER, secs.into());
            response
        }
        Answer::RetryAfterDate(code, secs) => {
            let mut response =
                problem(StatusCode::from_u16(code).unwrap_or(StatusCode::TOO_MANY_REQUESTS), "slow down");
            let when = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(secs));
            if let Ok(value) = when.parse() {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
        Answer::Garbage => ([(header::CONTENT_TYPE, "text/html")], "<html>oops</html>").into_response(),
        Answer::Truncated => {
            let half = format!(r#"{{"job_id": "{id}", "status": "Succ"#);
            let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(half), Err(std::io::Error::other("cut"))];
            (
                [(header::CONTENT_TYPE, "application/json")],
                axum::body::Body::from_stream(futures_util::stream::iter(chunks)),
            )
                .into_response()
        }
        Answer::OtherJob => json_body(&profile.body(&uuid::Uuid::new_v4().to_string(), Stage::Succeeded, n)),
        Answer::UnknownStatus => status_body(Stage::Unknown),
        Answer::Nested(depth) => {
            let body = format!(
                r#"{{"job_id":"{id}","status":"Succeed","image_urls":[],"extra":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Answer::Hang(d) => {
            tokio::time::sleep(d).await;
            status_body(Stage::Pending)
        }
    }
}
