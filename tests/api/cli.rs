//! The command line: settings errors, the first-start key, `keys create`.

use std::time::Duration;

use crate::support::binary::{start, start_with};
use crate::support::helpers::*;

#[tokio::test]
async fn a_bad_setting_stops_start_up_with_one_line_naming_it() {
    for (flag, value, named) in [
        ("--poll-interval", "soon", "--poll-interval"),
        ("--signing-secret", "whsec_dG9vLXNob3J0", "--signing-secret"),
        ("--database-url", "mysql://x", "--database-url"),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
            .args(["serve", flag, value])
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.contains(named), "{flag}: {stderr}");
    }
}

#[tokio::test]
async fn the_first_start_makes_a_key_and_shows_it_once() {
    let upstream = jobhook::mock_upstream::MockUpstream::start(&mock_args(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let args: Vec<String> =
        ["jobhook", "serve", "--listen", "127.0.0.1:0", "--database-url", &db_url, "--upstream-url", &upstream.url()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let mut running = start(&args).await;
    let banner = running.stdout.join("\n");
    let key = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("API key:"))
        .expect("the banner shows a key")
        .trim()
        .to_owned();
    assert!(banner.contains("whsec_"), "{banner}");
    let http = reqwest::Client::new();
    let secret = http.get(format!("http://{}/v1/signing-secret", running.addr)).bearer_auth(&key).send().await.unwrap();
    assert_eq!(secret.status(), 200);
    running.child.start_kill().unwrap();
    running.child.wait().await.unwrap();

    let mut again = start(&args).await;
    assert!(!again.stdout.join("\n").contains("API key:"), "the key is shown only once");
    again.child.start_kill().unwrap();

    let created = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["keys", "create", "--name", "ci", "--database-url", &db_url])
        .output()
        .await
        .unwrap();
    assert!(created.status.success());
    let out = String::from_utf8_lossy(&created.stdout);
    let new_key = out.lines().next().unwrap().rsplit(' ').next().unwrap().to_owned();
    assert!(new_key.starts_with("jh_"), "{out}");
    let mut third = start(&args).await;
    let secret = tokio::time::timeout(
        Duration::from_secs(5),
        http.get(format!("http://{}/v1/signing-secret", third.addr)).bearer_auth(&new_key).send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(secret.status(), 200);
    third.child.start_kill().unwrap();
}

fn toml_file(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("jobhook.toml");
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test]
async fn a_config_file_runs_the_service_with_json_logs_carrying_request_ids() {
    let upstream = jobhook::mock_upstream::MockUpstream::start(&mock_args(1)).await.unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    let config = toml_file(
        dir.path(),
        &format!(
            "listen = \"127.0.0.1:0\"\ndatabase_url = \"{db_url}\"\nupstream_url = \"{}\"\napi_keys = [\"{KEY_A}\"]\n\
             signing_secret = \"{SECRET}\"\nallow_private_callbacks = true\npoll-interval = \"30ms\"\nlog_format = \"json\"\n",
            upstream.url()
        ),
    );
    let args: Vec<String> = ["jobhook", "--config", &config].iter().map(|s| s.to_string()).collect();
    let running = start_with(&args, "info,jobhook=debug").await;
    let http = reqwest::Client::new();
    let response = http
        .post(format!("http://{}/v1/subscriptions", running.addr))
        .bearer_auth(KEY_A)
        .json(&serde_json::json!({ "job_id": new_job(), "callback_url": receiver.url("/hook") }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "the key and the egress setting came from the file");
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    receiver.wait_for("/hook", 1).await[0].verify(SECRET).unwrap();
    // The attempt logs its outcome once the receiver has answered: wait for that line, not a moment.
    let logs = eventually(Duration::from_secs(10), "the delivery's log line", || async {
        let logs = running.logs();
        logs.iter().any(|l| l.contains(r#""message":"delivered""#)).then_some(logs)
    })
    .await;
    let lines: Vec<serde_json::Value> = logs
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()));
    let registered = lines.iter().find(|l| l["fields"]["message"] == "registered").expect("a registration line");
    assert_eq!(registered["span"]["request_id"], request_id.as_str(), "{registered}");
    assert!(registered["fields"]["subscription_id"].is_string() && registered["fields"]["job_id"].is_string());
    let polled = lines.iter().find(|l| l["fields"]["message"] == "job finished").expect("a poll line");
    assert!(polled["span"]["job_id"].is_string(), "{polled}");
    let delivered = lines.iter().find(|l| l["fields"]["message"] == "delivered").expect("a delivery line");
    assert!(delivered["span"]["subscription_id"].is_string() && delivered["span"]["job_id"].is_string(), "{delivered}");
}

#[tokio::test]
async fn config_check_shows_the_effective_settings_masked_with_their_sources() {
    let dir = tempfile::tempdir().unwrap();
    let config = toml_file(
        dir.path(),
        "database_url = \"postgres://jobhook:hunter2hunter2@db.internal/jobhook\"\npoll_interval = \"2s\"\n\
         api_keys = \"secret-key-0123456789\"\nmax_wait = \"1h\"\n",
    );
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(["config", "check", "--config", &config, "--max-wait", "2h"])
        .env("JOBHOOK_POLL_INTERVAL", "4s")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("poll_interval = \"4s\"  # environment, overrides the file"), "{stdout}");
    assert!(stdout.contains("max_wait = \"2h\"  # flag"), "{stdout}");
    assert!(stdout.contains("database_url = \"postgres://jobhook:********@db.internal/jobhook\"  # file"), "{stdout}");
    assert!(stdout.contains("api_keys = \"********\"  # file"), "{stdout}");
    assert!(stdout.contains("listen = \"127.0.0.1:8080\"  # default"), "{stdout}");
    assert!(!stdout.contains("hunter2") && !stdout.contains("secret-key"), "secrets are masked: {stdout}");

    for (text, named) in
        [("pol_interval = \"2s\"\n", "`pol_interval`"), ("poll_interval = \"soon\"\n", "--poll-interval")]
    {
        let bad = toml_file(dir.path(), text);
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
            .args(["config", "check", "--config", &bad])
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{stderr}");
        assert!(stderr.contains(&bad), "the file is named: {stderr}");
    }
}

/// `jobhook config check | grep -q …` closes the pipe early; the command must still finish normally
/// (it once panicked with "failed printing to stdout", exit 101). The pipe's reader is closed before
/// the command starts, so every write meets the closed pipe.
#[tokio::test]
async fn commands_finish_normally_when_their_reader_has_gone() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("keys.db").display());
    assert!(jobhook(&["migrate", "--database-url", &store], dir.path()).await.status.success());
    for args in [&["config", "example"][..], &["config", "check"], &["keys", "list", "--database-url", &store]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
            .args(args)
            .stdout(std::process::Stdio::from(writer))
            .stderr(std::process::Stdio::piped())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {:?} {stderr}", output.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// A database that cannot be reached at start stops the service with a line naming it, but never with
/// its password.
#[tokio::test]
async fn a_store_that_cannot_be_opened_is_named_without_its_password() {
    for url in [
        "postgres://jobhook:hunter2hunter2@127.0.0.1:1/jobhook",
        "postgres://jobhook@127.0.0.1:1/jobhook?password=hunter2hunter2",
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url", url])
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(said.contains("cannot open the store postgres://jobhook") && said.contains("********"), "{said}");
        assert!(!said.contains("hunter2"), "the password leaked: {said}");
    }
}

#[tokio::test]
async fn jobhook_verify_checks_a_real_captured_delivery() {
    let app = spawn_app().await;
    app.register(&new_job(), &app.receiver.url("/hook")).await;
    let got = app.receiver.wait_for("/hook", 1).await.remove(0);
    got.verify(SECRET).expect("the stock crate accepts it");
    let dir = tempfile::tempdir().unwrap();
    let headers: String =
        got.headers.iter().map(|(n, v)| format!("{}: {}\n", n.as_str(), v.to_str().unwrap())).collect();
    std::fs::write(dir.path().join("headers.txt"), headers).unwrap();
    std::fs::write(dir.path().join("body.json"), &got.body).unwrap();
    let mut tampered = got.body.to_vec();
    tampered.push(b'\n');
    std::fs::write(dir.path().join("tampered.json"), tampered).unwrap();
    let run = |secret: &'static str, body: &'static str| {
        let dir = dir.path().to_owned();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
                .args(["verify", "--secret", secret, "--headers"])
                .arg(dir.join("headers.txt"))
                .arg("--body")
                .arg(dir.join(body))
                .output()
                .await
                .unwrap()
        }
    };
    let good = run(SECRET, "body.json").await;
    let out = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{out}");
    assert!(out.contains("verified"), "{out}");

    let newline = run(SECRET, "tampered.json").await;
    let out = String::from_utf8_lossy(&newline.stdout);
    assert_eq!(newline.status.code(), Some(1), "{out}");
    assert!(out.contains("newline"), "{out}");

    let other = run("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "body.json").await;
    let out = String::from_utf8_lossy(&other.stdout);
    assert_eq!(other.status.code(), Some(1), "{out}");
    assert!(out.contains("none of 1 signature(s) matches") && !out.contains("AAAAAAAA"), "{out}");
}

#[tokio::test]
async fn jobhook_demo_runs_the_whole_loop_and_exits() {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook")).arg("demo").output(),
    )
    .await
    .expect("the demo ends by itself")
    .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}{}", String::from_utf8_lossy(&output.stderr));
    assert!(out.contains("job A: delivered, job status Succeed, 1 attempt(s)"), "{out}");
    assert!(out.contains("job B: delivered, job status Failed, 1 attempt(s)"), "{out}");
    assert!(out.contains("job C: delivered, job status Succeed, 3 attempt(s)"), "{out}");
    assert_eq!(out.matches("signature verified").count(), 5, "{out}");
    assert!(out.contains("upstream   job A poll 3 → Succeed"), "{out}");
    assert!(!out.contains("REJECTED"), "{out}");
}

/// Runs `jobhook args` in `dir`, with no store named by the environment.
async fn jobhook(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(args)
        .current_dir(dir)
        .env_remove("JOBHOOK_DATABASE_URL")
        .env_remove("JOBHOOK_CONFIG")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn key_commands_run_where_there_is_no_store_refuse_and_create_none() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["keys", "list"][..], &["keys", "create", "--name", "x"], &["keys", "revoke", "1"]] {
        let output = jobhook(args, dir.path()).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("no jobhook store at") && stderr.contains("jobhook.db"), "{args:?}: {stderr}");
        assert!(stderr.contains("--database-url"), "{args:?}: {stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "the key commands made files: {left:?}");
}

#[tokio::test]
async fn keys_create_with_a_tenant_adds_a_key_that_sees_the_same_tenant() {
    let upstream = jobhook::mock_upstream::MockUpstream::start(&mock_args(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db_url = fresh_db_url(dir.path()).await;
    assert!(jobhook(&["migrate", "--database-url", &db_url], dir.path()).await.status.success());
    let created = jobhook(&["keys", "create", "--name", "first", "--database-url", &db_url], dir.path()).await;
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let first_key =
        String::from_utf8_lossy(&created.stdout).lines().next().unwrap().rsplit(' ').next().unwrap().to_owned();
    let list = jobhook(&["keys", "list", "--database-url", &db_url], dir.path()).await;
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    let tenant = list.lines().nth(1).expect("one key listed").split_whitespace().nth(1).unwrap().to_owned();

    let unknown = jobhook(&["keys", "create", "--tenant", "9999", "--database-url", &db_url], dir.path()).await;
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("there is no tenant 9999"), "{stderr}");

    let added = jobhook(
        &["keys", "create", "--tenant", &tenant, "--name", "replacement", "--database-url", &db_url],
        dir.path(),
    )
    .await;
    let out = String::from_utf8_lossy(&added.stdout).into_owned();
    assert!(added.status.success(), "{out} {}", String::from_utf8_lossy(&added.stderr));
    let second_key = out.lines().next().unwrap().rsplit(' ').next().unwrap().to_owned();
    assert!(second_key.starts_with("jh_") && second_key != first_key, "{out}");
    let list = jobhook(&["keys", "list", "--database-url", &db_url], dir.path()).await;
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    let tenants: Vec<&str> = list.lines().skip(1).map(|l| l.split_whitespace().nth(1).unwrap()).collect();
    assert_eq!(tenants, [tenant.as_str(), tenant.as_str()], "{list}");
    assert!(list.contains("replacement"), "{list}");

    // Both keys are the same tenant to the API: one signing secret, one set of subscriptions.
    let args: Vec<String> =
        ["jobhook", "serve", "--listen", "127.0.0.1:0", "--database-url", &db_url, "--upstream-url", &upstream.url()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let mut running = start(&args).await;
    let http = reqwest::Client::new();
    let secret_of = |key: String| {
        let request = http.get(format!("http://{}/v1/signing-secret", running.addr)).bearer_auth(key);
        async move { request.send().await.unwrap().json::<serde_json::Value>().await.unwrap()["secret"].clone() }
    };
    let (first, second) = (secret_of(first_key.clone()).await, secret_of(second_key.clone()).await);
    assert!(first.as_str().is_some_and(|s| s.starts_with("whsec_")), "{first}");
    assert_eq!(first, second);
    assert!(out.contains(first.as_str().unwrap()), "the new key's output shows the tenant's secret: {out}");
    running.child.start_kill().unwrap();
}

#[tokio::test]
async fn keys_secret_prints_a_fresh_signing_secret_and_touches_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let output = jobhook(&["keys", "secret"], dir.path()).await;
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let secret = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        let parsed: jobhook::keys::SigningSecret = secret.parse().expect("a valid whsec_ secret");
        assert!(parsed.bytes().len() >= jobhook::keys::SigningSecret::MIN_BYTES);
        seen.push(secret);
    }
    assert_ne!(seen[0], seen[1]);
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no store was made");
}

#[tokio::test]
async fn verify_usage_shows_the_two_ways_to_give_a_capture() {
    let dir = tempfile::tempdir().unwrap();
    let help = jobhook(&["verify", "--help"], dir.path()).await;
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
    assert!(usage.contains("<--request <FILE> | --headers <FILE> --body <FILE>>"), "{help}");
    let neither = jobhook(&["verify", "--secret", SECRET], dir.path()).await;
    assert_eq!(neither.status.code(), Some(2));
    let both =
        jobhook(&["verify", "--secret", SECRET, "--request", "r", "--headers", "h", "--body", "b"], dir.path()).await;
    assert_eq!(both.status.code(), Some(2));
    let half = jobhook(&["verify", "--secret", SECRET, "--headers", "h"], dir.path()).await;
    assert!(String::from_utf8_lossy(&half.stderr).contains("--body"), "{half:?}");
}

/// On PostgreSQL: a database that does not exist is named with the command that makes it, and the
/// server's notices at each start ("_sqlx_migrations already exists") stay out of the log.
#[tokio::test]
async fn on_postgres_a_missing_database_is_named_and_notices_stay_quiet() {
    if !on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut missing = url::Url::parse(&postgres_url()).unwrap();
    let name = format!("jobhook_absent_{}", uuid::Uuid::new_v4().simple());
    missing.set_path(&name);
    let output = jobhook(&["serve", "--listen", "127.0.0.1:0", "--database-url", missing.as_str()], dir.path()).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("database \"{name}\" does not exist")), "{stderr}");
    assert!(stderr.contains(&format!("createdb {name}")), "{stderr}");
    assert!(!stderr.contains(" line "), "{stderr}");

    let db_url = fresh_db_url(dir.path()).await;
    for _ in 0..2 {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_jobhook"))
            .args(["migrate", "--database-url", &db_url])
            .env("RUST_LOG", "info")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(!stderr.contains("sqlx::postgres::notice"), "{stderr}");
    }
}
