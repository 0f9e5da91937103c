//! Test helpers: the real application on port 0 with a fresh SQLite file, the simulated upstream and a
//! recording receiver, each on its own loopback port.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clap::Parser;
pub use jobhook::api::subscriptions::{DeliveryAttemptView, SubscriptionView};
use jobhook::app::Application;
use jobhook::cli::{Cli, Command};
pub use jobhook::domain::{FailureReason, SubscriptionState};
use jobhook::mock_upstream::{MockArgs, MockUpstream, Outcome};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const KEY_A: &str = "test-key-tenant-a-0123456789";
pub const KEY_B: &str = "test-key-tenant-b-0123456789";
/// The signing secret of the Standard Webhooks reference tests.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Whether this run tests the PostgreSQL backend (`JOBHOOK_TEST_BACKEND=postgres`; see scripts/test.sh).
pub fn on_postgres() -> bool {
    std::env::var("JOBHOOK_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// A fresh, empty database for one test: a SQLite file in `dir`, or on PostgreSQL a schema of its own
/// (named after a random UUID) in the database of `JOBHOOK_TEST_POSTGRES_URL`.
pub async fn fresh_db_url(dir: &std::path::Path) -> String {
    if !on_postgres() {
        return format!("sqlite://{}", dir.join("jobhook.db").display());
    }
    let base = postgres_url();
    let schema = format!("jh_t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&base).await.expect("PostgreSQL is reachable");
    sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).await.unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}options=-c%20search_path%3D{schema}")
}

pub fn postgres_url() -> String {
    std::env::var("JOBHOOK_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Waits until `check` returns `Some`, or panics with `what` after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback port that refuses connections and that nothing else can take while the socket lives: it
/// is bound but not listening (dropping a probe listener instead would leave the port free for another
/// test's listener). `listen` on it opens the port later.
pub fn refusing_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// The value of one sample line (`name{labels} value`) of a /metrics text, or 0 when the line is absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Sends `request` with tenant A's key and reads its JSON answer (for services reached by URL, such as
/// the real binary).
pub async fn json_as_a(request: reqwest::RequestBuilder) -> Value {
    request.bearer_auth(KEY_A).send().await.unwrap().json().await.unwrap()
}

pub fn new_job() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn mock_args(pending_polls: u32) -> MockArgs {
    MockArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: None,
        pending_polls,
        outcome: Outcome::Succeed,
        error_rate: 0.0,
    }
}

/// What one test application needs beyond the defaults.
pub struct Settings {
    pub args: Vec<String>,
    pub mock: MockArgs,
    /// How the app resolves callback hosts (default: the system resolver).
    pub lookup: Option<jobhook::delivery::client::Lookup>,
    /// The text of a config file whose `[[upstream]]` profiles the app also polls.
    pub config_file: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { args: Vec::new(), mock: mock_args(2), lookup: None, config_file: None }
    }
}

impl Settings {
    /// Settings whose upstream is the mock with these options.
    pub fn mock(mock: MockArgs) -> Self {
        Settings { mock, ..Default::default() }
    }

    /// Jobs that stay Pending until a test scripts otherwise.
    pub fn never_ending() -> Self {
        Self::mock(MockArgs { outcome: Outcome::Pending, ..mock_args(0) })
    }

    /// A config file with this text (its `[[upstream]]` tables are read as `serve` reads them).
    pub fn config_file(mut self, toml: &str) -> Self {
        self.config_file = Some(toml.to_owned());
        self
    }

    pub fn arg(mut self, flag: &str, value: &str) -> Self {
        self.args.push(flag.to_owned());
        self.args.push(value.to_owned());
        self
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub upstream: MockUpstream,
    pub receiver: Receiver,
    pub db_url: String,
    _db_dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Settings::default()).await
}

/// The arguments every test app starts from: fast polls and retries, loopback callbacks allowed.
pub fn base_args(db_url: &str, upstream_url: &str) -> Vec<String> {
    [
        "jobhook",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        db_url,
        "--upstream-url",
        upstream_url,
        "--api-keys",
        &format!("{KEY_A},{KEY_B}"),
        "--signing-secret",
        SECRET,
        "--poll-interval",
        "30ms",
        "--poll-max-interval",
        "200ms",
        "--retry-schedule",
        "50ms,100ms,150ms",
        "--delivery-timeout",
        "2s",
        "--allow-private-callbacks",
        "true",
        "--not-found-grace",
        "2s",
        "--shutdown-grace",
        "2s",
        "--upstream-max-rps",
        "5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub async fn spawn_app_with(settings: Settings) -> TestApp {
    jobhook::install_crypto();
    let upstream = MockUpstream::start(&settings.mock).await.expect("mock upstream starts");
    let receiver = Receiver::start().await;
    let db_dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(db_dir.path()).await;
    let mut argv = base_args(&db_url, &upstream.url());
    argv.extend(settings.args);
    let cli = Cli::try_parse_from(argv).expect("test arguments parse");
    let Some(Command::Serve(args)) = cli.command else { unreachable!() };
    let mut config = args.into_config().expect("test settings are valid");
    if let Some(toml) = &settings.config_file {
        let path = db_dir.path().join("jobhook.toml");
        std::fs::write(&path, toml).unwrap();
        config.add_profiles(path.to_str().unwrap()).expect("the test's profiles are valid");
    }
    let lookup = settings.lookup.unwrap_or_else(jobhook::delivery::client::system_lookup);
    let app = Application::build_with(config, lookup).await.expect("the application builds");
    let addr = app.local_addr();
    let shutdown = app.shutdown_token();
    tokio::spawn(app.run_until_stopped());
    TestApp { addr, http: reqwest::Client::new(), upstream, receiver, db_url, _db_dir: db_dir, shutdown }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn register_as(&self, key: &str, job_id: &str, callback_url: &str) -> reqwest::Response {
        self.http
            .post(self.url("/v1/subscriptions"))
            .bearer_auth(key)
            .json(&json!({ "job_id": job_id, "callback_url": callback_url }))
            .send()
            .await
            .unwrap()
    }

    /// Registers as tenant A and returns the subscription, asserting a 201.
    pub async fn register(&self, job_id: &str, callback_url: &str) -> Value {
        let response = self.register_as(KEY_A, job_id, callback_url).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    pub async fn get_as(&self, key: &str, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).bearer_auth(key).send().await.unwrap()
    }

    pub async fn subscription(&self, id: &str) -> Value {
        let response = self.get_as(KEY_A, &format!("/v1/subscriptions/{id}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// The delivery attempts of a subscription, oldest first.
    pub async fn deliveries(&self, id: &str) -> Vec<Value> {
        let response = self.get_as(KEY_A, &format!("/v1/subscriptions/{id}/deliveries")).await;
        assert_eq!(response.status(), StatusCode::OK);
        let log: Value = response.json().await.unwrap();
        log["items"].as_array().unwrap().clone()
    }

    pub async fn delete_as(&self, key: &str, id: &str) -> reqwest::Response {
        self.http.delete(self.url(&format!("/v1/subscriptions/{id}"))).bearer_auth(key).send().await.unwrap()
    }

    /// The subscription as the API's own view type.
    pub async fn view(&self, id: &str) -> SubscriptionView {
        let response = self.get_as(KEY_A, &format!("/v1/subscriptions/{id}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// The delivery attempts of a subscription, oldest first, as the API's own view type.
    pub async fn attempts(&self, id: &str) -> Vec<DeliveryAttemptView> {
        serde_json::from_value(Value::Array(self.deliveries(id).await)).unwrap()
    }

    /// Waits until the subscription reaches `state`, and returns it as the API's view.
    pub async fn wait_until(&self, id: &str, state: SubscriptionState) -> SubscriptionView {
        eventually(Duration::from_secs(15), &format!("subscription {id} to be {state:?}"), || async {
            let sub = self.view(id).await;
            (sub.state == state).then_some(sub)
        })
        .await
    }

    /// Registers a new job with the receiver's `/hook` as tenant A; returns the subscription's ID.
    pub async fn subscribe(&self) -> String {
        let sub = self.register(&new_job(), &self.receiver.url("/hook")).await;
        sub["id"].as_str().unwrap().to_owned()
    }

    /// `POST /v1/subscriptions/{id}/redeliver` as tenant A.
    pub async fn redeliver(&self, id: &str) -> reqwest::Response {
        self.http.post(self.url(&format!("/v1/subscriptions/{id}/redeliver"))).bearer_auth(KEY_A).send().await.unwrap()
    }

    /// Waits until the subscription reaches `state`, and returns it.
    pub async fn wait_for_state(&self, id: &str, state: &str) -> Value {
        eventually(Duration::from_secs(15), &format!("subscription {id} to be {state}"), || async {
            let sub = self.subscription(id).await;
            (sub["state"] == state).then_some(sub)
        })
        .await
    }
}

/// A request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// Verifies the signature with the official Standard Webhooks crate, not with our own code.
    pub fn verify(&self, secret: &str) -> Result<(), String> {
        let webhook = standardwebhooks::Webhook::new(secret).map_err(|e| e.to_string())?;
        webhook.verify(&self.body, &self.headers).map_err(|e| e.to_string())
    }
}

#[derive(Default)]
struct ReceiverState {
    requests: Vec<Received>,
    /// Statuses (with a Retry-After in seconds, if any) to answer with, in order, before answering 200.
    script: VecDeque<(u16, Option<u64>)>,
    /// The body of every answer (empty unless a test sets one), and its content type (axum's default
    /// for a string unless a test sets one).
    body: String,
    content_type: Option<String>,
}

/// A callback receiver on loopback that records every request and answers as scripted.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let shared = state.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
            let state = shared.clone();
            async move { receive(state, uri.path().to_owned(), headers, body) }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next answers, in order; 200 after them.
    pub fn answer_with(&self, statuses: &[u16]) {
        self.state.lock().unwrap().script = statuses.iter().map(|s| (*s, None)).collect();
    }

    /// The next answer is `status` with `Retry-After: seconds`; 200 after it.
    pub fn answer_with_retry_after(&self, status: u16, seconds: u64) {
        self.state.lock().unwrap().script = [(status, Some(seconds))].into_iter().collect();
    }

    /// Every answer from now on carries this body.
    pub fn answer_body(&self, body: &str) {
        self.state.lock().unwrap().body = body.to_owned();
    }

    /// Every answer from now on carries this body with this `Content-Type`.
    pub fn answer_body_as(&self, content_type: &str, body: &str) {
        let mut state = self.state.lock().unwrap();
        state.body = body.to_owned();
        state.content_type = Some(content_type.to_owned());
    }

    pub fn requests(&self) -> Vec<Received> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn requests_to(&self, path: &str) -> Vec<Received> {
        self.requests().into_iter().filter(|r| r.path == path).collect()
    }

    /// Waits until `n` requests reached `path`, and returns them.
    pub async fn wait_for(&self, path: &str, n: usize) -> Vec<Received> {
        eventually(Duration::from_secs(15), &format!("{n} deliveries to {path}"), || async {
            let got = self.requests_to(path);
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

fn receive(state: Arc<Mutex<ReceiverState>>, path: String, headers: HeaderMap, body: Bytes) -> Response {
    let mut state = state.lock().unwrap();
    state.requests.push(Received { path, headers, body });
    let (status, retry_after) = state.script.pop_front().unwrap_or((200, None));
    let status = StatusCode::from_u16(status).unwrap();
    if status.is_redirection() {
        return (status, [(header::LOCATION, "/redirected")]).into_response();
    }
    let body = state.body.clone();
    let mut response = match retry_after {
        Some(seconds) => (status, [(header::RETRY_AFTER, seconds.to_string())], body).into_response(),
        None => (status, body).into_response(),
    };
    if let Some(content_type) = &state.content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, content_type.parse().unwrap());
    }
    response
}
