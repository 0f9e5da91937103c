//! The command line: settings errors, the first-start key, `keys create`.

use std::time::Duration;

use crate::binary::start;
use crate::helpers::*;

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
