//! `jobhook demo`: the whole loop on loopback in a few seconds — a simulated upstream, the real service
//! on a temporary SQLite store, and a receiver that checks every signature — printing each step.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use clap::{CommandFactory, FromArgMatches};
use serde_json::{Value, json};

use super::{Cli, Command};
use crate::app::Application;
use crate::domain::JobId;
use crate::keys::{ApiKey, SigningSecret};
use crate::mock_upstream::{Answer, MockArgs, MockUpstream, Outcome};

/// The three jobs: a name, what happens to it, and how many times its receiver fails first.
const JOBS: [(&str, &str, usize); 3] = [
    ("A", "succeeds", 0),
    ("B", "fails upstream; its Failed status is delivered", 0),
    ("C", "succeeds; its receiver fails twice before accepting", 2),
];

struct Demo {
    start: Instant,
    secret: String,
    names: Vec<(JobId, &'static str)>,
    /// Attempts seen per job name.
    attempts: Mutex<Vec<(&'static str, usize)>>,
}

impl Demo {
    fn say(&self, line: impl AsRef<str>) {
        crate::outln!("[{:>5.2}s] {}", self.start.elapsed().as_secs_f64(), line.as_ref());
    }

    fn name(&self, job_id: JobId) -> &'static str {
        self.names.iter().find(|(j, _)| *j == job_id).map_or("?", |(_, n)| n)
    }
}

pub async fn run() -> anyhow::Result<()> {
    let start = Instant::now();
    let dir = tempfile_dir()?;
    let upstream = MockUpstream::start(&MockArgs {
        listen: "127.0.0.1:0".parse()?,
        api_key: None,
        pending_polls: 2,
        outcome: Outcome::Succeed,
        error_rate: 0.0,
    })
    .await
    .context("cannot start the simulated upstream")?;
    let mut polls = upstream.watch();
    let key = ApiKey::generate();
    let secret = SigningSecret::generate();
    let names: Vec<(JobId, &'static str)> =
        JOBS.iter().map(|(name, ..)| (uuid::Uuid::new_v4().to_string().parse().expect("a UUID"), *name)).collect();
    upstream.script(names[1].0.clone(), vec![Answer::Pending, Answer::Failed]);
    let demo = Arc::new(Demo {
        start,
        secret: secret.expose(),
        names: names.clone(),
        attempts: Mutex::new(JOBS.iter().map(|(n, ..)| (*n, 0)).collect()),
    });

    // The receiver.
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver_addr = receiver.local_addr()?;
    let routes = axum::Router::new().route("/hook/{name}", axum::routing::post(receive)).with_state(demo.clone());
    tokio::spawn(async move { axum::serve(receiver, routes).await });

    // The service, as `jobhook serve` would run it.
    let app = service(&dir.path().join("jobhook.db"), &upstream.url(), &key, &secret).await?;
    let api = format!("http://{}", app.local_addr());
    let stop = app.shutdown_token();
    let service = tokio::spawn(app.run_until_stopped());

    crate::outln!("jobhook demo: everything runs on 127.0.0.1 and stops at the end.");
    crate::outln!("  simulated upstream  {}  (jobs answer Pending twice, then end)", upstream.url());
    crate::outln!("  jobhook             {api}  (store: a temporary SQLite file)");
    crate::outln!("  receiver            http://{receiver_addr}/hook/…  (checks each Standard Webhooks signature)");
    crate::outln!("  signing secret      {}", secret.expose());
    crate::outln!();

    let watcher = demo.clone();
    tokio::spawn(async move {
        while let Some(p) = polls.recv().await {
            let answer = match p.answer {
                Answer::Pending => "Pending".to_owned(),
                Answer::Succeed => "Succeed: the job ended".to_owned(),
                Answer::Failed => "Failed: the job ended".to_owned(),
                other => format!("{other:?}"),
            };
            watcher.say(format!("upstream   job {} poll {} → {answer}", watcher.name(p.job_id), p.count));
        }
    });

    let http = reqwest::Client::new();
    let ids = register(&demo, &http, &api, &key, &format!("http://{receiver_addr}/hook")).await?;
    let finals = wait_for_ends(&http, &api, &key, &ids).await?;
    crate::outln!();
    crate::outln!("done:");
    for line in finals {
        crate::outln!("  {line}");
    }
    crate::outln!();
    crate::outln!("Next: `cargo run --release` (or `jobhook`) runs the service for real; the README's quick start");
    crate::outln!("registers a job with curl and verifies the callback with the stock Python library.");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), service).await;
    Ok(())
}

/// The real service on a temporary store, from the same command line `jobhook serve` takes.
async fn service(
    db: &std::path::Path,
    upstream_url: &str,
    key: &ApiKey,
    secret: &SigningSecret,
) -> anyhow::Result<Application> {
    let argv = [
        "jobhook".to_owned(),
        "serve".into(),
        "--listen=127.0.0.1:0".into(),
        format!("--database-url=sqlite://{}", db.display()),
        format!("--upstream-url={upstream_url}"),
        format!("--api-keys={}", key.expose()),
        format!("--signing-secret={}", secret.expose()),
        "--allow-private-callbacks=true".into(),
        "--poll-interval=500ms".into(),
        "--retry-schedule=1s,1s,1s".into(),
    ];
    // The demo's own settings only: JOBHOOK_* variables meant for a real service must not change it.
    let command = Cli::command().mut_subcommand("serve", |serve| serve.mut_args(|a| a.env(None::<&'static str>)));
    let cli = Cli::from_arg_matches(&command.try_get_matches_from(argv)?)?;
    let Some(Command::Serve(args)) = cli.command else { unreachable!("serve") };
    Application::build(args.into_config()?).await
}

/// Registers the three jobs; returns each job's name and subscription ID.
async fn register(
    demo: &Demo,
    http: &reqwest::Client,
    api: &str,
    key: &ApiKey,
    hooks: &str,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut ids = Vec::new();
    for ((job_id, name), (_, what, _)) in demo.names.iter().zip(JOBS) {
        let request = json!({ "job_id": job_id.to_string(), "callback_url": format!("{hooks}/{name}") });
        let response = http
            .post(format!("{api}/v1/subscriptions"))
            .bearer_auth(key.expose())
            .header("content-type", "application/json")
            .body(request.to_string())
            .send()
            .await?;
        let status = response.status();
        let body: Value = serde_json::from_slice(&response.bytes().await?)?;
        anyhow::ensure!(status == StatusCode::CREATED, "registration answered {status}: {body}");
        demo.say(format!(
            "register   job {name} ({what}) → {status}, subscription {}",
            body["id"].as_str().unwrap_or("?")
        ));
        ids.push((*name, body["id"].as_str().unwrap_or_default().to_owned()));
    }

    Ok(ids)
}

/// Waits (up to 30 s) for every subscription to end; returns a line about each.
async fn wait_for_ends(
    http: &reqwest::Client,
    api: &str,
    key: &ApiKey,
    ids: &[(&'static str, String)],
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut finals = Vec::new();
    for (name, id) in ids {
        loop {
            let response = http.get(format!("{api}/v1/subscriptions/{id}")).bearer_auth(key.expose()).send().await?;
            let sub: Value = serde_json::from_slice(&response.bytes().await?)?;
            let state = sub["state"].as_str().unwrap_or_default().to_owned();
            if matches!(state.as_str(), "delivered" | "failed" | "expired" | "cancelled") {
                finals.push(format!(
                    "job {name}: {state}, job status {}, {} attempt(s), webhook-id {}",
                    sub["job_status"].as_str().unwrap_or("-"),
                    sub["attempts"],
                    sub["webhook_id"].as_str().unwrap_or("-")
                ));
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "job {name} did not finish within 30 s (state {state})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(finals)
}

async fn receive(
    State(demo): State<Arc<Demo>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let Some((name, fail_first)) = JOBS.iter().find(|(n, ..)| *n == name).map(|(n, _, f)| (*n, *f)) else {
        return StatusCode::NOT_FOUND;
    };
    let attempt = {
        let mut attempts = demo.attempts.lock().unwrap_or_else(|e| e.into_inner());
        let slot = attempts.iter_mut().find(|(n, _)| *n == name).map(|(_, a)| a);
        slot.map_or(1, |a| {
            *a += 1;
            *a
        })
    };
    let captured = super::verify::Captured {
        headers: headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        body: body.to_vec(),
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (_, verified) = super::verify::check(&demo.secret, &captured, now);
    let webhook_id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
    let status = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["status"].as_str().map(str::to_owned));
    let verdict = if verified { "signature verified" } else { "SIGNATURE REJECTED" };
    let (code, answer) = if !verified {
        (StatusCode::BAD_REQUEST, "400")
    } else if attempt <= fail_first {
        (StatusCode::INTERNAL_SERVER_ERROR, "500 (a simulated receiver failure; jobhook retries)")
    } else {
        (StatusCode::NO_CONTENT, "204")
    };
    demo.say(format!(
        "receiver   job {name} attempt {attempt}: {verdict} ({webhook_id}), status {} → answers {answer}",
        status.as_deref().unwrap_or("?")
    ));
    code
}

/// A temporary directory that is removed when the demo ends.
fn tempfile_dir() -> anyhow::Result<TempDir> {
    let path = std::env::temp_dir().join(format!("jobhook-demo-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(TempDir(path))
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
