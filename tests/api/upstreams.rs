//! Upstream profiles: the ready profiles of docs/upstreams.md against their mock upstreams, end to end,
//! and two profiles in one deployment keeping their rate caps apart.

use std::time::Duration;

use jobhook::domain::JobId;
use jobhook::mock_upstream::{Answer, MockArgs, MockProfile, MockUpstream, Outcome};
use serde_json::{Value, json};

use crate::support::helpers::*;

const DOC: &str = include_str!("../../docs/upstreams.md");
pub(crate) const TOKEN: &str = "r8_test-token-for-the-mock";

/// The ```toml block of docs/upstreams.md whose table is `name`, pointed at `url`, its auth value read
/// from `secret` (a file), and its pacing left to the test app's fast global one.
pub(crate) fn documented(name: &str, url: &str, secret: &std::path::Path, max_rps: Option<u32>) -> String {
    let block = DOC
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .find(|block| block.contains(&format!("name = {name:?}")))
        .unwrap_or_else(|| panic!("docs/upstreams.md has a profile named {name}"));
    block
        .lines()
        .filter(|l| !l.starts_with("poll_") && !l.starts_with("not_found_grace") && !l.starts_with("max_rps"))
        .map(|l| {
            if l.starts_with("base_url") {
                format!("base_url = {url:?}")
            } else if l.starts_with("value_env") {
                format!("value_file = {:?}", secret.display().to_string())
            } else if l.starts_with("[upstream.auth]") {
                let cap = max_rps.map(|n| format!("max_rps = {n}\n")).unwrap_or_default();
                format!("{cap}\n[upstream.auth]")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub(crate) struct Profiles {
    pub(crate) app: TestApp,
    pub(crate) replicate: MockUpstream,
    pub(crate) openai: MockUpstream,
    pub(crate) aetherforge_eu: MockUpstream,
    _dir: tempfile::TempDir,
}

/// The app with the three documented profiles, each against its own mock (which wants the token).
pub(crate) async fn spawn_with_profiles(mock: MockArgs, caps: [Option<u32>; 2]) -> Profiles {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("token");
    std::fs::write(&secret, format!("{TOKEN}\n")).unwrap();
    let args = MockArgs { api_key: Some(TOKEN.into()), ..mock.clone() };
    let replicate = MockUpstream::start_profile(&args, MockProfile::Replicate).await.unwrap();
    let openai = MockUpstream::start_profile(&args, MockProfile::OpenaiBatch).await.unwrap();
    let aetherforge_eu = MockUpstream::start_profile(&args, MockProfile::Aetherforge).await.unwrap();
    let toml = [
        documented("replicate", &replicate.url(), &secret, caps[0]),
        documented("openai-batch", &openai.url(), &secret, caps[1]),
        documented("aetherforge-eu", &aetherforge_eu.url(), &secret, None),
    ]
    .join("\n");
    let app = spawn_app_with(Settings::mock(mock).config_file(&toml)).await;
    Profiles { app, replicate, openai, aetherforge_eu, _dir: dir }
}

async fn register(app: &TestApp, upstream: &str, job_id: &str, path: &str) -> reqwest::Response {
    let body = json!({"upstream": upstream, "job_id": job_id, "callback_url": app.receiver.url(path)});
    app.http.post(app.url("/v1/subscriptions")).bearer_auth(KEY_A).json(&body).send().await.unwrap()
}

fn replicate_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn batch_id() -> String {
    format!("batch_{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn each_documented_profile_turns_its_mock_into_a_signed_callback() {
    let p = spawn_with_profiles(mock_args(2), [None, None]).await;
    let cases = [
        ("replicate", replicate_id(), &p.replicate, "/status", "succeeded"),
        ("openai-batch", batch_id(), &p.openai, "/status", "completed"),
        ("aetherforge-eu", new_job(), &p.aetherforge_eu, "/status", "Succeed"),
    ];
    for (upstream, job, mock, pointer, done) in &cases {
        let response = register(&p.app, upstream, job, &format!("/{upstream}")).await;
        assert_eq!(response.status(), 201, "{upstream}");
        let sub: Value = response.json().await.unwrap();
        assert_eq!(sub["upstream"], *upstream);
        assert_eq!(sub["job_id"], *job);

        let got = p.app.receiver.wait_for(&format!("/{upstream}"), 1).await;
        got[0].verify(SECRET).expect("the standardwebhooks crate accepts the signature");
        assert_eq!(got[0].header("jobhook-event-type"), "job.succeeded", "{upstream}");
        let body = got[0].json();
        assert_eq!(body.pointer(pointer).unwrap(), done, "{upstream}: {body}");
        let polls = mock.polls(JobId::new(upstream, job)).count;
        assert_eq!(polls, 3, "{upstream}: two pending answers, then the end");
        let delivered = p.app.wait_for_state(sub["id"].as_str().unwrap(), "delivered").await;
        assert_eq!(delivered["job_status"], "Succeed");
    }
    // The built-in profile still polls its own mock, as before.
    let job = new_job();
    p.app.register(&job, &p.app.receiver.url("/builtin")).await;
    p.app.receiver.wait_for("/builtin", 1).await[0].verify(SECRET).unwrap();
    assert_eq!(p.app.upstream.polls(job.parse().unwrap()).count, 3);
}

#[tokio::test]
async fn a_failed_job_is_delivered_as_job_failed_byte_for_byte() {
    let p = spawn_with_profiles(mock_args(1), [None, None]).await;
    let job = batch_id();
    p.openai.script(JobId::new("openai-batch", &job), vec![Answer::Pending, Answer::Failed]);
    assert_eq!(register(&p.app, "openai-batch", &job, "/batch").await.status(), 201);
    let got = p.app.receiver.wait_for("/batch", 1).await;
    got[0].verify(SECRET).unwrap();
    assert_eq!(got[0].header("jobhook-event-type"), "job.failed");
    let expected = json!({"endpoint": "/v1/chat/completions", "id": job, "object": "batch", "output_file_id": null, "status": "failed"});
    assert_eq!(std::str::from_utf8(&got[0].body).unwrap(), expected.to_string());
}

#[tokio::test]
async fn an_unmapped_status_value_is_a_bad_answer_named_in_last_error_and_polled_again() {
    let p = spawn_with_profiles(mock_args(0), [None, None]).await;
    let job = replicate_id();
    p.replicate
        .script(JobId::new("replicate", &job), vec![Answer::UnknownStatus, Answer::UnknownStatus, Answer::Succeed]);
    let sub: Value = register(&p.app, "replicate", &job, "/r").await.json().await.unwrap();
    let id = sub["id"].as_str().unwrap();
    eventually(Duration::from_secs(10), "last_error to name the value", || async {
        let sub = p.app.subscription(id).await;
        sub["last_error"].as_str().is_some_and(|e| e.contains("unknown job status \"exploded\"")).then_some(())
    })
    .await;
    let done = p.app.wait_for_state(id, "delivered").await;
    assert!(done["last_error"].is_null(), "{done}");
}

#[tokio::test]
async fn registration_names_a_configured_upstream_and_a_job_id_of_its_format() {
    let p = spawn_with_profiles(mock_args(2), [None, None]).await;
    let unknown = register(&p.app, "midjourney", &replicate_id(), "/x").await;
    assert_eq!(unknown.status(), 422);
    let detail = unknown.json::<Value>().await.unwrap()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("aetherforge, replicate, openai-batch, aetherforge-eu"), "{detail}");
    let malformed = register(&p.app, "openai-batch", "job_123", "/x").await;
    assert_eq!(malformed.status(), 422);
    assert!(register(&p.app, "aetherforge-eu", "job-42", "/x").await.status() == 422);

    // One job ID under two profiles is two jobs, listed apart.
    let shared = replicate_id();
    let batch = format!("batch_{shared}");
    assert_eq!(register(&p.app, "replicate", &shared, "/a").await.status(), 201);
    assert_eq!(register(&p.app, "openai-batch", &batch, "/b").await.status(), 201);
    let page = p.app.get_as(KEY_A, &format!("/v1/subscriptions?job_id={shared}&upstream=replicate")).await;
    let page: Value = page.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["items"][0]["upstream"], "replicate");
}

#[tokio::test]
async fn two_profiles_in_one_deployment_keep_their_rate_caps_apart() {
    let never = MockArgs { outcome: Outcome::Pending, ..mock_args(0) };
    let p = spawn_with_profiles(never, [Some(4), Some(1000)]).await;
    for i in 0..10 {
        assert_eq!(register(&p.app, "replicate", &replicate_id(), &format!("/r{i}")).await.status(), 201);
        assert_eq!(register(&p.app, "openai-batch", &batch_id(), &format!("/o{i}")).await.status(), 201);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (slow, fast) = (p.replicate.total_polls(), p.openai.total_polls());
    // 4/s over 1.5 s, plus the burst: a shared bucket would hold the batches to the same.
    assert!((1..=9).contains(&slow), "replicate was polled {slow} times");
    assert!(fast >= 30, "openai-batch was polled only {fast} times: its cap was spent by another");
}

#[tokio::test]
async fn config_check_lists_the_profiles_and_names_the_table_of_an_unset_secret_never_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let blocks: Vec<&str> = DOC.split("```toml\n").skip(1).map(|b| b.split("```").next().unwrap()).collect();
    let path = dir.path().join("jobhook.toml");
    std::fs::write(&path, blocks.join("\n")).unwrap();
    let check = |env: &[(&str, &str)]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"));
        command.args(["config", "check", "--config", path.to_str().unwrap()]).env_remove("OPENAI_API_KEY");
        for (k, v) in env {
            command.env(k, v);
        }
        command.output()
    };
    let secrets = [
        ("REPLICATE_API_TOKEN", "r8_hunter2"),
        ("OPENAI_API_KEY", "sk-hunter2"),
        ("AETHERFORGE_EU_API_KEY", "af-hunter2"),
    ];
    let output = check(&secrets).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        stdout.contains("# upstream \"replicate\": GET https://api.replicate.com/v1/predictions/{job_id}"),
        "{stdout}"
    );
    assert!(stdout.contains("# upstream \"openai-batch\""), "{stdout}");
    assert!(!stdout.contains("hunter2"), "no secret is shown: {stdout}");

    let output = check(&secrets[..1]).await.unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(path.to_str().unwrap()), "the file is named: {stderr}");
    assert!(stderr.contains("#2 (name = \"openai-batch\")"), "the table is named: {stderr}");
    assert!(stderr.contains("OPENAI_API_KEY is not set") && !stderr.contains("hunter2"), "{stderr}");
}
