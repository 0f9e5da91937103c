//! The optional config file (`--config jobhook.toml` or `JOBHOOK_CONFIG`).
//!
//! Its keys are the flags of `jobhook serve` without the dashes (`database_url` or `database-url`), plus
//! `log_format`. Precedence is file < environment < flags: a file key whose environment variable is set
//! is skipped, and the rest become flags placed before the command line's own, where a later flag wins
//! (`args_override_self`). So clap stays the one place that parses and validates every value.

use std::collections::BTreeSet;
use std::ffi::OsString;

/// What the file contributed, for `jobhook config check`.
#[derive(Debug, Default)]
pub struct FromFile {
    pub path: Option<String>,
    /// The settings (by clap id) the file set and the environment did not override.
    pub applied: BTreeSet<String>,
    /// The settings the file set but the environment overrode.
    pub overridden: BTreeSet<String>,
    /// Whether the file has `[[upstream]]` tables.
    pub profiles: bool,
}

/// Why a config file cannot be used. Each names the file; the start stops with it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not valid TOML: {source}")]
    Toml { path: String, source: toml::de::Error },
    #[error(
        "{path}: unknown setting `{key}`; the settings are the flags of `jobhook serve` without the dashes \
         (see jobhook.example.toml or `jobhook config example`)"
    )]
    UnknownSetting { path: String, key: String },
    #[error("{path}: `{key}` must be a string, a number, a boolean or a list of them")]
    NotAValue { path: String, key: String },
}

/// The command line with the config file's settings placed before the user's flags; `cli` is the whole
/// command (`jobhook`), whose flags say what the file may hold.
pub fn merge(cli: &clap::Command, argv: Vec<OsString>) -> Result<(Vec<OsString>, FromFile), FileError> {
    let Some(path) = config_path(&argv) else { return Ok((argv, FromFile::default())) };
    let text = std::fs::read_to_string(&path).map_err(|source| FileError::Read { path: path.clone(), source })?;
    let table: toml::Table = text.parse().map_err(|source| FileError::Toml { path: path.clone(), source })?;
    let (at, target) = subcommand(cli, &argv);
    // Only the commands that run jobhook itself take the file (the mock upstream has a `listen` of its
    // own); help and version print without it.
    let asks_help =
        argv.iter().skip(1).any(|a| matches!(a.to_str(), Some("-h" | "--help" | "-V" | "--version" | "help")));
    let takes_file = !asks_help
        && matches!(target.get_name(), "jobhook" | "serve" | "check" | "create" | "list" | "revoke" | "migrate");
    let mut accepted: BTreeSet<String> = target.get_arguments().map(|a| a.get_id().to_string()).collect();
    accepted.insert("log_format".into()); // global: every command takes it
    if !takes_file {
        accepted.clear();
    }
    // A flag the user typed replaces the file's value (list flags would otherwise add to it).
    let typed = |long: &str| {
        argv.iter().skip(1).any(|a| {
            let a = a.to_string_lossy();
            a.strip_prefix("--").is_some_and(|rest| rest == long || rest.starts_with(&format!("{long}=")))
        })
    };
    let settings = settings(cli);
    let mut flags = Vec::new();
    let mut from = FromFile { path: Some(path.clone()), ..Default::default() };
    for (key, value) in &table {
        // `[[upstream]]` tables are profiles, not flags: read by `config::upstreams`.
        if key == "upstream" {
            from.profiles = true;
            continue;
        }
        let id = key.replace('-', "_");
        let Some(arg) = settings.iter().find(|a| a.get_id() == id.as_str()) else {
            return Err(FileError::UnknownSetting { path, key: key.clone() });
        };
        let value =
            scalar_or_list(value).ok_or_else(|| FileError::NotAValue { path: path.clone(), key: key.clone() })?;
        if arg.get_env().is_some_and(|env| std::env::var_os(env).is_some()) {
            from.overridden.insert(id);
            continue;
        }
        if !accepted.contains(&id) {
            continue; // a serve setting this command does not take (`keys list` takes only the store)
        }
        let long = arg.get_long().unwrap_or(key.as_str());
        if typed(long) {
            continue;
        }
        flags.push(OsString::from(format!("--{long}={value}")));
        from.applied.insert(id);
    }
    let mut merged = argv;
    merged.splice(at..at, flags);
    Ok((merged, from))
}

/// Every key the file may hold: `serve`'s flags and the global `log_format`.
pub fn settings(cli: &clap::Command) -> Vec<clap::Arg> {
    let serve = cli.find_subcommand("serve").expect("serve exists").clone();
    let globals = cli.get_arguments().filter(|a| a.get_id() == "log_format").cloned().collect::<Vec<_>>();
    serve
        .get_arguments()
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "config"))
        .cloned()
        .chain(globals)
        .collect()
}

/// The last `--config` given (as clap keeps the last), else `JOBHOOK_CONFIG`.
fn config_path(argv: &[OsString]) -> Option<String> {
    let mut found = None;
    let mut args = argv.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            found = Some(path.to_owned());
        } else if arg == "--config" {
            found = args.next().map(|p| p.into_owned());
        }
    }
    found.or_else(|| std::env::var("JOBHOOK_CONFIG").ok().filter(|p| !p.trim().is_empty()))
}

/// Where the file's flags go (right after the subcommand's name) and the subcommand that takes them.
fn subcommand(cli: &clap::Command, argv: &[OsString]) -> (usize, clap::Command) {
    let mut command = cli.clone();
    let mut at = 1;
    let mut i = 1;
    while i < argv.len() {
        let word = argv[i].to_string_lossy();
        if let Some(long) = word.strip_prefix("--") {
            // A flag's value is not a subcommand's name: skip it when clap says the flag takes one.
            let takes_value = cli.get_arguments().chain(command.get_arguments()).any(|a| {
                a.get_long() == Some(long)
                    && a.get_num_args().is_none_or(|n| n.takes_values())
                    && a.get_action().takes_values()
            });
            if takes_value {
                i += 1;
            }
        } else if word.starts_with('-') {
            // Short flags (-h, -V) take no value.
        } else if let Some(sub) = command.find_subcommand(word.as_ref()).cloned() {
            command = sub;
            at = i + 1;
        } else {
            break;
        }
        i += 1;
    }
    // Plain `jobhook` runs serve with the top-level flags.
    (at, command)
}

fn scalar_or_list(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| if v.is_array() { None } else { scalar_or_list(v) })
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        _ => None,
    }
}

/// `jobhook.example.toml`: every setting, commented out at its default, with its help.
pub fn example(cli: &clap::Command) -> String {
    let mut out = String::from(
        "# jobhook's settings. Use it with `jobhook --config jobhook.toml` (or JOBHOOK_CONFIG=jobhook.toml).\n\
         # Every key is a flag of `jobhook serve` without the dashes. Precedence: this file < the\n\
         # JOBHOOK_* environment < flags. Unknown keys are refused. Check a file with\n\
         # `jobhook config check --config jobhook.toml`. Lists take a TOML array or a comma-separated string.\n\
         # This file is generated by `jobhook config example`; every line below shows the default.\n",
    );
    for arg in settings(cli) {
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        out.push('\n');
        for line in help.lines() {
            out.push_str(&format!("# {}\n", line.trim()));
        }
        if let Some(env) = arg.get_env() {
            out.push_str(&format!("# (environment: {})\n", env.to_string_lossy()));
        }
        let id = arg.get_id().as_str();
        let default = arg.get_default_values().first().map(|v| v.to_string_lossy().into_owned());
        let value = match default {
            Some(v) if v.parse::<i64>().is_ok() || v == "true" || v == "false" => v,
            Some(v) => format!("{v:?}"),
            None if arg.get_value_delimiter().is_some() => "[]".to_owned(),
            None => "\"\"".to_owned(),
        };
        out.push_str(&format!("# {id} = {value}\n"));
    }
    out.push_str(UPSTREAM_EXAMPLE);
    out
}

/// The end of `jobhook.example.toml`: one other job API, commented out (docs/upstreams.md has them all).
const UPSTREAM_EXAMPLE: &str = r#"
# Other job APIs: one [[upstream]] table each (AetherForge is built in as "aetherforge", configured by
# the upstream_* settings above). Registrations name a profile with "upstream". Every key, and ready
# profiles for Replicate, OpenAI batches and a second AetherForge endpoint: docs/upstreams.md.
# [[upstream]]
#   name = "replicate"
#   base_url = "https://api.replicate.com"
#   status_path = "/v1/predictions/{job_id}"
#   job_id = "[a-z0-9]{10,64}"                # "uuid" or a regular expression
#   status = "/status"                        # JSON pointer to the status
#   id = "/id"                                # optional: JSON pointer to the job's ID
#   pending = ["starting", "processing"]
#   succeeded = ["succeeded"]
#   failed = ["failed", "canceled"]
#   max_rps = 10                              # this upstream's own cap (default: upstream_max_rps)
# [upstream.auth]
#   prefix = "Bearer "
#   value_env = "REPLICATE_API_TOKEN"         # or value_file = "/run/secrets/replicate"; never the value
# [upstream.create]                           # optional: lets POST /v1/jobs create this upstream's jobs
#   job_id = "/id"                            # JSON pointer to the new job's ID in the creation answer
#   paths = ["/v1/predictions"]               # path prefixes a creation may be POSTed to
"#;

/// The effective settings, one `key = value  # source` line each, secrets masked.
pub fn describe(cli: &clap::Command, matches: &clap::ArgMatches, from: &FromFile, user_argv: &[OsString]) -> String {
    let mut out = String::new();
    if let Some(path) = &from.path {
        out.push_str(&format!("# config file: {path}\n"));
    }
    out.push_str("# effective settings (precedence: file < environment < flags)\n");
    for arg in settings(cli) {
        let id = arg.get_id().as_str();
        let values: Vec<String> =
            matches.get_raw(id).map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect()).unwrap_or_default();
        let long = format!("--{}", arg.get_long().unwrap_or(id));
        let source = match matches.value_source(id) {
            Some(clap::parser::ValueSource::DefaultValue) => "default",
            Some(clap::parser::ValueSource::EnvVariable) => "environment",
            Some(clap::parser::ValueSource::CommandLine)
                if from.applied.contains(id)
                    && !user_argv.iter().any(|a| a.to_string_lossy().split('=').next() == Some(long.as_str())) =>
            {
                "file"
            }
            Some(clap::parser::ValueSource::CommandLine) => "flag",
            _ => "unset",
        };
        let joined = values.join(",");
        let shown = if id == "database_url" || id == "upstream_proxy" {
            mask_password(&joined)
        } else if arg.is_hide_env_values_set() && !joined.is_empty() {
            "********".to_owned()
        } else {
            joined
        };
        let note = if from.overridden.contains(id) { ", overrides the file" } else { "" };
        out.push_str(&format!("{id} = {shown:?}  # {source}{note}\n"));
    }
    out
}

/// The URL with its password masked, in the user part or as a `password=` parameter; a URL that does
/// not parse has everything between `://` and its last `@` masked.
pub fn mask_password(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return match (url.find("://"), url.rfind('@')) {
            (Some(start), Some(end)) if end > start => format!("{}********{}", &url[..start + 3], &url[end..]),
            _ => url.to_owned(),
        };
    };
    if u.password().is_some() {
        let _ = u.set_password(Some("********"));
    }
    if u.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" { "********".to_owned() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// `config check`'s lines about the `[[upstream]]` profiles (none when only the built-in one is
/// configured, so that output stays as it was). Auth values are never shown, only where they come from.
pub fn describe_profiles(profiles: &[super::upstreams::UpstreamProfile]) -> String {
    use super::upstreams::JobIdFormat;
    if profiles.len() <= 1 {
        return String::new();
    }
    let mut out = format!(
        "# upstream profiles (registrations without \"upstream\" go to {:?})\n",
        super::upstreams::default_upstream(profiles)
    );
    for p in profiles {
        let format = match &p.job_id {
            JobIdFormat::Uuid => "uuid".to_owned(),
            JobIdFormat::Pattern(re) => format!("/{}/", re.as_str()),
        };
        let auth = p.auth.as_ref().map_or("none".to_owned(), |a| format!("{} (value set)", a.header));
        let rps = p.poll.max_rps.map_or("no cap".to_owned(), |n| format!("{n}/s"));
        let create = p.create.as_ref().map_or("no creation".to_owned(), |c| {
            format!("POST /v1/jobs to {} (job_id at {})", c.paths.join(", "), c.job_id_pointer)
        });
        out.push_str(&format!(
            "# upstream {:?}: GET {}{} · job_id {format} · status at {} · auth {auth} · poll every {}..{} · {rps} · {create}\n",
            p.name,
            mask_password(p.base_url.as_str()).trim_end_matches('/'),
            p.status_path,
            p.status_pointer,
            humantime::format_duration(p.poll.interval),
            humantime::format_duration(p.poll.max_interval),
        ));
    }
    out
}
