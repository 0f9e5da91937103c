//! The real `jobhook` binary as a child process.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::helpers::*;

pub struct Running {
    pub child: Child,
    pub addr: SocketAddr,
    pub stdout: Vec<String>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Running {
    /// Every line the process wrote so far, stdout and stderr.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

/// Starts `jobhook` with `args` and waits until it says where it listens.
pub async fn start(args: &[String]) -> Running {
    start_with(args, "info").await
}

/// Starts `jobhook` with `args` and `RUST_LOG` at `log_level`.
pub async fn start_with(args: &[String], log_level: &str) -> Running {
    start_with_env(args, log_level, &[]).await
}

/// Starts `jobhook` with `args`, `RUST_LOG` at `log_level`, and these environment variables besides.
pub async fn start_with_env(args: &[String], log_level: &str, env: &[(&str, &str)]) -> Running {
    jobhook::install_crypto();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(&args[1..])
        .env("RUST_LOG", log_level)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            logs.lock().unwrap().push(line.clone());
            if let Some(rest) = line.split("listening on http://").nth(1) {
                // Text logs end the address with a space, JSON logs with a quote.
                let addr = rest.split(|c: char| c.is_whitespace() || c == '"').next().unwrap();
                return addr.parse::<SocketAddr>().unwrap();
            }
        }
        panic!("the binary exited before listening");
    })
    .await
    .expect("the binary listens within 20 s");
    // Keep draining stderr so the child never blocks on a full pipe.
    let kept = logs.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            kept.lock().unwrap().push(line);
        }
    });
    let mut stdout_lines = Vec::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    // The first-key banner, if any, is printed before the listener starts.
    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_millis(200), stdout.next_line()).await {
        logs.lock().unwrap().push(line.clone());
        stdout_lines.push(line);
    }
    let kept = logs.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stdout.next_line().await {
            kept.lock().unwrap().push(line);
        }
    });
    Running { child, addr, stdout: stdout_lines, logs }
}

/// The base arguments with a fixed listen address, for restarts on the same port.
pub fn args_on(listen: &str, db_url: &str, upstream_url: &str) -> Vec<String> {
    let mut args = base_args(db_url, upstream_url);
    let at = args.iter().position(|a| a == "--listen").unwrap();
    args[at + 1] = listen.to_owned();
    args
}

/// Sets the largest file the running binary may write (`1` fills its disk at once, `unlimited` frees
/// it): every write of the SQLite store then fails as on a full disk.
pub fn limit_file_size(running: &Running, limit: &str) {
    let pid = running.child.id().unwrap().to_string();
    let set = std::process::Command::new("prlimit").args(["--pid", &pid, &format!("--fsize={limit}:")]).status();
    assert!(set.unwrap().success(), "prlimit --fsize={limit}");
}

/// A free loopback port for a binary to listen on, kept for its restarts. It is taken below the kernel's
/// ephemeral range, where every `bind(…:0)` and outgoing connection of the tests running beside it get
/// theirs: a probed and released ephemeral port could be taken by one of them before the binary binds
/// it (a released port made a test fail in CI that way). Each call hands out a new port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    // 8,000 ports below the range (16,768-32,767 by default), from a place of this process's own.
    let span = 8_000;
    let start = std::process::id() % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "no free port left below the ephemeral range");
        let port = u16::try_from(ephemeral_low.saturating_sub(span).max(1024) + (start + n) % span).unwrap();
        // Something else on the machine may hold it (a database's side port, say).
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Registers every job, round-robin over `listens`, retrying on the next instance until each is
/// acknowledged; returns when all are.
pub fn register_all(
    jobs: Vec<String>,
    listens: Vec<String>,
    callback: String,
) -> tokio::task::JoinHandle<HashSet<String>> {
    tokio::spawn(async move {
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for (n, chunk) in jobs.chunks(jobs.len().div_ceil(16)).enumerate() {
            let (chunk, acked, http, listens, callback) =
                (chunk.to_vec(), acked.clone(), http.clone(), listens.clone(), callback.clone());
            tasks.spawn(async move {
                for (i, job) in chunk.into_iter().enumerate() {
                    let mut target = n + i;
                    loop {
                        let listen = &listens[target % listens.len()];
                        let sent = http
                            .post(format!("http://{listen}/v1/subscriptions"))
                            .bearer_auth(KEY_A)
                            .json(&json!({ "job_id": job, "callback_url": callback }))
                            .send()
                            .await;
                        if let Ok(response) = sent
                            && (response.status() == 201 || response.status() == 200)
                        {
                            acked.lock().unwrap().insert(job.clone());
                            break;
                        }
                        target += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        acked.lock().unwrap().clone()
    })
}

/// Waits until every job has a verified delivery; returns the webhook-ids seen per job.
pub async fn all_delivered(receiver: &Receiver, jobs: &HashSet<String>) -> HashMap<String, Vec<String>> {
    eventually(Duration::from_secs(120), "every acknowledged job to be delivered", || async {
        let mut by_job: HashMap<String, Vec<String>> = HashMap::new();
        for request in receiver.requests_to("/hook") {
            request.verify(SECRET).expect("every delivery verifies");
            by_job
                .entry(request.json()["job_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(request.header("webhook-id").to_owned());
        }
        jobs.iter().all(|job| by_job.contains_key(job)).then_some(by_job)
    })
    .await
}
