//! The config file's merge, tried against the real command line.

use std::ffi::OsString;

use clap::CommandFactory;

use super::{Cli, Command};
use crate::config::file::{example, mask_password};

fn merge(argv: Vec<OsString>) -> Result<(Vec<OsString>, crate::config::file::FromFile), String> {
    crate::config::file::merge(&Cli::command(), argv).map_err(|e| e.to_string())
}

fn argv(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn file(text: &str) -> (tempfile::NamedTempFile, String) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    let path = f.path().to_string_lossy().into_owned();
    (f, path)
}

#[test]
fn file_settings_go_before_the_flags_so_flags_win() {
    let (_f, path) =
        file("poll_interval = \"2s\"\nupstream-max-rps = 7\napi_keys = [\"aaaaaaaaaaaaaaaa\", \"bbbbbbbbbbbbbbbb\"]\n");
    let (merged, from) = merge(argv(&["jobhook", "serve", "--config", &path, "--poll-interval", "3s"])).unwrap();
    let merged: Vec<String> = merged.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    assert_eq!(merged[1], "serve");
    assert!(merged.contains(&"--upstream-max-rps=7".to_owned()), "{merged:?}");
    assert!(merged.contains(&"--api-keys=aaaaaaaaaaaaaaaa,bbbbbbbbbbbbbbbb".to_owned()), "{merged:?}");
    assert_eq!(from.applied.len(), 2, "the typed --poll-interval is not also taken from the file");
    let cli = <Cli as clap::Parser>::try_parse_from(&merged).unwrap();
    let Some(Command::Serve(args)) = cli.command else { panic!("serve") };
    assert_eq!(args.poll_interval, std::time::Duration::from_secs(3), "the flag wins over the file");
    assert_eq!(args.upstream_max_rps, 7);
    assert_eq!(args.api_keys.len(), 2);
}

#[test]
fn a_typed_list_flag_replaces_the_files_list() {
    let (_f, path) = file("api_keys = [\"old-key-0123456789\"]\n");
    let (merged, _) =
        merge(argv(&["jobhook", "serve", "--config", &path, "--api-keys", "new-key-0123456789"])).unwrap();
    let cli = <Cli as clap::Parser>::try_parse_from(&merged).unwrap();
    let Some(Command::Serve(args)) = cli.command else { panic!("serve") };
    assert_eq!(args.api_keys, vec!["new-key-0123456789".to_owned()]);
}

#[test]
fn the_mock_upstream_and_help_do_not_take_the_file() {
    let (_f, path) = file("listen = \"0.0.0.0:9999\"\n");
    let before = argv(&["jobhook", "--config", &path, "mock-upstream"]);
    assert_eq!(merge(before.clone()).unwrap().0, before);
    let help = argv(&["jobhook", "--config", &path, "help", "serve"]);
    assert_eq!(merge(help.clone()).unwrap().0, help);
    let (_g, second) = file("listen = \"127.0.0.1:7\"\n");
    let (merged, from) = merge(argv(&["jobhook", "--config", &path, "--config", &second])).unwrap();
    assert_eq!(from.path.as_deref(), Some(second.as_str()), "the last --config counts, as for clap");
    assert_eq!(merged[1], "--listen=127.0.0.1:7");
}

#[test]
fn an_unknown_key_is_named() {
    let (_f, path) = file("pol_interval = \"2s\"\n");
    let err = merge(argv(&["jobhook", "--config", &path])).unwrap_err();
    assert!(err.contains("`pol_interval`"), "{err}");
    let (_g, path) = file("[poll]\ninterval = 1\n");
    assert!(merge(argv(&["jobhook", "--config", &path])).unwrap_err().contains("`poll`"));
    let (_h, path) = file("poll_interval = ");
    assert!(merge(argv(&["jobhook", "--config", &path])).unwrap_err().contains("not valid TOML"));
}

#[test]
fn plain_jobhook_and_other_commands_get_what_they_take() {
    let (_f, path) = file("database_url = \"sqlite://x.db\"\npoll_interval = \"2s\"\n");
    let (merged, _) = merge(argv(&["jobhook", "--config", &path])).unwrap();
    assert_eq!(merged[1], "--database-url=sqlite://x.db");
    let (merged, _) = merge(argv(&["jobhook", "keys", "list", "--config", &path])).unwrap();
    assert_eq!(merged.len(), 6, "only the store setting: {merged:?}");
    assert_eq!(merged[3], "--database-url=sqlite://x.db");
}

#[test]
fn the_committed_example_is_the_generated_one() {
    let committed = include_str!("../../jobhook.example.toml");
    assert_eq!(committed, example(&Cli::command()), "regenerate: cargo run -- config example > jobhook.example.toml");
    // And every line of it, uncommented, is a valid setting at its default.
    let uncommented: String = example(&Cli::command())
        .lines()
        .filter_map(|l| {
            let setting = l.strip_prefix("# ")?;
            let (key, _) = setting.split_once(" = ")?;
            key.chars().all(|c| c.is_ascii_lowercase() || c == '_').then_some(setting)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let (_f, path) = file(&uncommented);
    let (merged, _) = merge(argv(&["jobhook", "serve", "--config", &path])).unwrap();
    let cli = <Cli as clap::Parser>::try_parse_from(&merged).unwrap();
    let Some(Command::Serve(args)) = cli.command else { panic!("serve") };
    args.into_config().unwrap();
}

#[test]
fn passwords_are_masked() {
    assert_eq!(mask_password("postgres://u:hunter2@db/x"), "postgres://u:********@db/x");
    assert_eq!(mask_password("sqlite://jobhook.db"), "sqlite://jobhook.db");
    assert_eq!(mask_password("postgres://u:a/b#c@db/x"), "postgres://********@db/x");
    let masked = mask_password("postgres://u@db/x?password=hunter2&sslmode=require");
    assert!(!masked.contains("hunter2") && masked.contains("sslmode=require"), "{masked}");
}
