//! Upstream profiles: which job APIs jobhook polls, and how to read each one's answer.
//!
//! The built-in `aetherforge` profile is made from the `--upstream-*` flags, exactly as before profiles
//! existed. Others come from the config file's `[[upstream]]` tables, validated here once; a bad table
//! stops start-up (and `jobhook config check`) with the file and the table named. An auth value is read
//! from an environment variable or a file, never from the config file itself, and is never quoted back.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;

use super::{Config, PollConfig, parse_duration};
pub use create::CreateRules;

mod create;
use crate::domain::{DEFAULT_UPSTREAM, JobId, JobStatus, truncate};
use crate::keys::ApiKey;

/// The longest job ID another profile accepts, in bytes.
pub const MAX_JOB_ID_LEN: usize = 256;

/// One job API, validated.
#[derive(Debug, Clone)]
pub struct UpstreamProfile {
    pub name: String,
    pub base_url: url::Url,
    /// The status request's path, with `{job_id}` where the (percent-encoded) ID goes.
    pub status_path: String,
    pub auth: Option<Auth>,
    pub job_id: JobIdFormat,
    /// A JSON pointer to the status string in a 200 body.
    pub status_pointer: String,
    /// A JSON pointer to the job's ID in a 200 body, checked against the polled one when set.
    pub id_pointer: Option<String>,
    /// Every status value the upstream may send, and what it means.
    pub statuses: Vec<(String, JobStatus)>,
    pub http: HttpRules,
    /// This profile's pacing and rate cap (`max_wait` and `max_in_flight` stay global).
    pub poll: PollConfig,
    /// How `POST /v1/jobs` creates this profile's jobs; `None`: it does not.
    pub create: Option<CreateRules>,
}

/// The header a profile authenticates with. The value never prints through `Debug`.
#[derive(Clone)]
pub struct Auth {
    pub header: String,
    /// The whole header value (prefix included).
    pub value: ApiKey,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Auth {{ header: {:?}, value: <redacted> }}", self.header)
    }
}

/// What a profile's job IDs look like.
#[derive(Debug, Clone)]
pub enum JobIdFormat {
    /// A UUID, canonicalised to lower-case hyphenated (so upper case is the same job).
    Uuid,
    /// The whole ID matches this pattern (anchored), is at most [`MAX_JOB_ID_LEN`] bytes and holds no
    /// white space or control character.
    Pattern(regex::Regex),
}

impl JobIdFormat {
    /// The job `raw` of profile `upstream`, or a message naming the format.
    pub fn parse(&self, upstream: &str, raw: &str) -> Result<JobId, String> {
        match self {
            JobIdFormat::Uuid => {
                let canonical: JobId = raw.parse()?;
                Ok(JobId::new(upstream, canonical.id()))
            }
            JobIdFormat::Pattern(pattern) => {
                let raw = raw.trim();
                let fits = !raw.is_empty()
                    && raw.len() <= MAX_JOB_ID_LEN
                    && !raw.chars().any(|c| c.is_whitespace() || c.is_control())
                    && pattern.is_match(raw);
                if !fits {
                    return Err(format!(
                        "job_id of upstream {upstream:?} must match {}, got {:?}",
                        pattern.as_str(),
                        truncate(raw, 64)
                    ));
                }
                Ok(JobId::new(upstream, raw))
            }
        }
    }

    /// The same ID as the profile spells it (for the answer check).
    fn same(&self, asked: &JobId, answered: &str) -> bool {
        match self {
            JobIdFormat::Uuid => answered.parse::<JobId>().is_ok_and(|a| a.id() == asked.id()),
            JobIdFormat::Pattern(_) => answered == asked.id(),
        }
    }
}

/// Which HTTP statuses of the status request end a job's subscriptions (AetherForge's rules by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRules {
    /// The upstream refuses our credentials (default 401, 403).
    pub unauthorized: Vec<u16>,
    /// The upstream does not know the job; failed after `not_found_grace` (default 404).
    pub not_found: Vec<u16>,
    /// The upstream refuses the job ID (default 422).
    pub rejected: Vec<u16>,
}

impl Default for HttpRules {
    fn default() -> Self {
        HttpRules { unauthorized: vec![401, 403], not_found: vec![404], rejected: vec![422] }
    }
}

impl UpstreamProfile {
    /// The built-in profile, from the `--upstream-*` flags: AetherForge's API as jobhook always spoke it.
    pub fn aetherforge(config: &Config) -> Self {
        Self::aetherforge_with(&config.upstream.base_url, config.upstream.api_key.as_ref(), &config.poll)
    }

    /// The built-in profile at `base_url`, polled with `api_key` (a Bearer key) at the pace of `poll`.
    pub fn aetherforge_with(base_url: &url::Url, api_key: Option<&ApiKey>, poll: &PollConfig) -> Self {
        let auth = api_key.map(|key| Auth {
            header: "authorization".into(),
            value: ApiKey::new_upstream_header(&format!("Bearer {}", key.expose())),
        });
        UpstreamProfile {
            name: DEFAULT_UPSTREAM.into(),
            base_url: base_url.clone(),
            status_path: "/public/v1/job/{job_id}".into(),
            auth,
            job_id: JobIdFormat::Uuid,
            status_pointer: "/status".into(),
            id_pointer: Some("/job_id".into()),
            statuses: vec![
                ("Pending".into(), JobStatus::Pending),
                ("Succeed".into(), JobStatus::Succeed),
                ("Failed".into(), JobStatus::Failed),
            ],
            http: HttpRules::default(),
            poll: poll.clone(),
            create: Some(CreateRules::aetherforge()),
        }
    }

    /// What a status value means; `None`: a value the profile does not map (a bad answer).
    pub fn status_of(&self, value: &str) -> Option<JobStatus> {
        self.statuses.iter().find(|(v, _)| v == value).map(|(_, s)| *s)
    }

    /// Whether `answered` (the body's ID) is the job we asked about.
    pub fn same_job(&self, asked: &JobId, answered: &str) -> bool {
        self.job_id.same(asked, answered)
    }
}

/// How a delivery names its event: `job.succeeded` when the final body's status maps to succeeded under
/// the job's profile, `job.failed` otherwise (only final bodies are delivered).
#[derive(Debug, Clone, Default)]
pub struct EventTypes {
    by_profile: std::collections::HashMap<String, (String, Vec<String>)>,
}

impl EventTypes {
    pub fn new(profiles: &[UpstreamProfile]) -> Self {
        let by_profile = profiles
            .iter()
            .map(|p| {
                let succeeded =
                    p.statuses.iter().filter(|(_, s)| *s == JobStatus::Succeed).map(|(v, _)| v.clone()).collect();
                (p.name.clone(), (p.status_pointer.clone(), succeeded))
            })
            .collect();
        EventTypes { by_profile }
    }

    pub fn of(&self, job: &JobId, body: &[u8]) -> &'static str {
        let Ok(body) = serde_json::from_slice::<serde_json::Value>(body) else { return "job.failed" };
        // A job of a profile no longer configured (or none given): AetherForge's reading, as always.
        let (pointer, succeeded) = match self.by_profile.get(job.upstream()) {
            Some((pointer, succeeded)) => (pointer.as_str(), succeeded.as_slice()),
            None => ("/status", &[][..]),
        };
        let status = body.pointer(pointer).and_then(|s| s.as_str());
        let success = match status {
            Some(s) if succeeded.is_empty() => s == "Succeed",
            Some(s) => succeeded.iter().any(|v| v == s),
            None => false,
        };
        if success { "job.succeeded" } else { "job.failed" }
    }
}

/// How a registration names its job: the profiles' ID formats and the default profile.
#[derive(Debug, Clone)]
pub struct JobIds {
    default: String,
    formats: Vec<(String, JobIdFormat)>,
}

impl JobIds {
    pub fn new(profiles: &[UpstreamProfile]) -> Self {
        JobIds {
            default: default_upstream(profiles).to_owned(),
            formats: profiles.iter().map(|p| (p.name.clone(), p.job_id.clone())).collect(),
        }
    }

    /// The job `raw` of `upstream` (the default profile when `None`).
    pub fn parse(&self, upstream: Option<&str>, raw: &str) -> Result<JobId, String> {
        let name = upstream.unwrap_or(&self.default);
        match self.formats.iter().find(|(n, _)| n == name) {
            Some((name, format)) => format.parse(name, raw),
            None => {
                let names: Vec<&str> = self.formats.iter().map(|(n, _)| n.as_str()).collect();
                Err(format!("upstream must be one of {}, got {:?}", names.join(", "), truncate(name, 40)))
            }
        }
    }
}

/// The profile a registration without `"upstream"` goes to: the only `[[upstream]]` table when the
/// file has exactly one, else the built-in `aetherforge`.
pub fn default_upstream(profiles: &[UpstreamProfile]) -> &str {
    match profiles {
        [_builtin, only] => &only.name,
        _ => DEFAULT_UPSTREAM,
    }
}

/// Why a `[[upstream]]` table cannot be used: names the file and the table, never a secret.
#[derive(Debug, thiserror::Error)]
#[error("{path}: [[upstream]] table {table}: {message}")]
pub struct ProfileError {
    pub path: String,
    pub table: String,
    pub message: String,
}

/// A `[[upstream]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    name: String,
    base_url: String,
    status_path: String,
    #[serde(default)]
    auth: Option<AuthSpec>,
    #[serde(default = "uuid")]
    job_id: String,
    status: String,
    #[serde(default)]
    id: Option<String>,
    pending: Vec<String>,
    succeeded: Vec<String>,
    failed: Vec<String>,
    poll_interval: Option<String>,
    poll_max_interval: Option<String>,
    not_found_grace: Option<String>,
    max_rps: Option<u32>,
    unauthorized_statuses: Option<Vec<u16>>,
    not_found_statuses: Option<Vec<u16>>,
    rejected_statuses: Option<Vec<u16>>,
    #[serde(default)]
    create: Option<create::CreateSpec>,
}

fn uuid() -> String {
    "uuid".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSpec {
    #[serde(default = "authorization")]
    header: String,
    #[serde(default)]
    prefix: String,
    value_env: Option<String>,
    value_file: Option<String>,
    /// Refused: a secret is never written in the config file. Read only to say so.
    value: Option<toml::Value>,
}

fn authorization() -> String {
    "Authorization".into()
}

/// The `[[upstream]]` tables of the file at `path` (none when it has none), on top of `config`'s
/// global pacing; `env` reads an environment variable (a parameter so tests need not set any).
pub fn from_file(
    path: &str,
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<UpstreamProfile>, ProfileError> {
    let fail = |table: String, message: String| ProfileError { path: path.to_owned(), table, message };
    let text = std::fs::read_to_string(path).map_err(|e| fail("-".into(), format!("cannot read the file ({e})")))?;
    let table: toml::Table = text.parse().map_err(|e| fail("-".into(), format!("not valid TOML ({e})")))?;
    let Some(value) = table.get("upstream") else { return Ok(Vec::new()) };
    let Some(tables) = value.as_array() else {
        return Err(fail("upstream".into(), "must be written as [[upstream]] tables".into()));
    };
    let mut profiles: Vec<UpstreamProfile> = Vec::new();
    for (i, value) in tables.iter().enumerate() {
        let name = value.get("name").and_then(|n| n.as_str()).map(|n| truncate(n, 40));
        let label = match &name {
            Some(name) => format!("#{} (name = {name:?})", i + 1),
            None => format!("#{}", i + 1),
        };
        let spec: Spec =
            value.clone().try_into().map_err(|e: toml::de::Error| fail(label.clone(), e.message().to_owned()))?;
        let profile = validate(spec, config, env).map_err(|m| fail(label.clone(), m))?;
        if profiles.iter().any(|p| p.name == profile.name) {
            return Err(fail(label, format!("a profile named {:?} is already configured", profile.name)));
        }
        profiles.push(profile);
    }
    Ok(profiles)
}

fn validate(spec: Spec, config: &Config, env: &dyn Fn(&str) -> Option<String>) -> Result<UpstreamProfile, String> {
    let name_ok = !spec.name.is_empty()
        && spec.name.len() <= 32
        && spec.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !name_ok {
        return Err("name must be 1 to 32 characters of a-z, 0-9, - and _".into());
    }
    if spec.name == DEFAULT_UPSTREAM {
        return Err(format!(
            "{DEFAULT_UPSTREAM:?} is the built-in profile; configure it with --upstream-url and --upstream-api-key"
        ));
    }
    let base_url = super::parse_http_url(&spec.base_url).map_err(|e| format!("base_url {e}"))?;
    if !spec.status_path.starts_with('/') || spec.status_path.matches("{job_id}").count() != 1 {
        return Err("status_path must start with / and hold {job_id} once, such as /v1/predictions/{job_id}".into());
    }
    let job_id = match spec.job_id.as_str() {
        "uuid" => JobIdFormat::Uuid,
        pattern => JobIdFormat::Pattern(
            regex::Regex::new(&format!("^(?:{pattern})$"))
                .map_err(|e| format!("job_id must be \"uuid\" or a regular expression ({e})"))?,
        ),
    };
    pointer("status", &spec.status)?;
    if let Some(id) = &spec.id {
        pointer("id", id)?;
    }
    let statuses = mapping(&spec)?;
    let http = http_rules(&spec)?;
    let poll = pacing(&spec, &config.poll)?;
    let create = spec.create.as_ref().map(create::validate).transpose()?;
    let auth = spec.auth.map(|a| auth(a, env)).transpose()?;
    Ok(UpstreamProfile {
        name: spec.name,
        base_url,
        status_path: spec.status_path,
        auth,
        job_id,
        status_pointer: spec.status,
        id_pointer: spec.id,
        statuses,
        http,
        poll,
        create,
    })
}

/// A JSON pointer (RFC 6901): empty, or `/`-separated tokens where `~` is followed by 0 or 1.
fn pointer(key: &str, p: &str) -> Result<(), String> {
    let escapes_ok = p.split('~').skip(1).all(|rest| rest.starts_with('0') || rest.starts_with('1'));
    if !p.starts_with('/') || !escapes_ok {
        return Err(format!("{key} must be a JSON pointer such as \"/status\", got {:?}", truncate(p, 64)));
    }
    Ok(())
}

/// The status values and what each means: every list non-empty, no value in two lists.
fn mapping(spec: &Spec) -> Result<Vec<(String, JobStatus)>, String> {
    let lists = [
        ("pending", &spec.pending, JobStatus::Pending),
        ("succeeded", &spec.succeeded, JobStatus::Succeed),
        ("failed", &spec.failed, JobStatus::Failed),
    ];
    let mut statuses: Vec<(String, JobStatus, &str)> = Vec::new();
    for (key, values, status) in lists {
        if values.is_empty() {
            return Err(format!("{key} must list at least one status value"));
        }
        for value in values {
            match statuses.iter().find(|(v, ..)| v == value) {
                Some((_, _, other)) if *other != key => {
                    return Err(format!("status value {:?} is in both {other} and {key}", truncate(value, 40)));
                }
                Some(_) => {}
                None => statuses.push((value.clone(), status, key)),
            }
        }
    }
    Ok(statuses.into_iter().map(|(v, s, _)| (v, s)).collect())
}

fn http_rules(spec: &Spec) -> Result<HttpRules, String> {
    let defaults = HttpRules::default();
    let rules = HttpRules {
        unauthorized: spec.unauthorized_statuses.clone().unwrap_or(defaults.unauthorized),
        not_found: spec.not_found_statuses.clone().unwrap_or(defaults.not_found),
        rejected: spec.rejected_statuses.clone().unwrap_or(defaults.rejected),
    };
    let all = [&rules.unauthorized, &rules.not_found, &rules.rejected];
    if let Some(bad) = all.iter().flat_map(|l| l.iter()).find(|s| !(400..=499).contains(*s) || **s == 429) {
        return Err(format!("terminal HTTP statuses must be 4xx other than 429, got {bad}"));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = all.iter().flat_map(|l| l.iter()).find(|s| !seen.insert(**s)) {
        return Err(format!("HTTP status {twice} is in more than one of the *_statuses lists"));
    }
    Ok(rules)
}

/// The global pacing with this profile's overrides.
fn pacing(spec: &Spec, global: &PollConfig) -> Result<PollConfig, String> {
    let duration = |key: &str, value: &Option<String>, default: Duration| match value {
        None => Ok(default),
        Some(v) => parse_duration(v).map_err(|e| format!("{key}: {e}")),
    };
    let interval = duration("poll_interval", &spec.poll_interval, global.interval)?;
    let max_interval = duration("poll_max_interval", &spec.poll_max_interval, global.max_interval.max(interval))?;
    let not_found_grace = duration("not_found_grace", &spec.not_found_grace, global.not_found_grace)?;
    if interval.is_zero() {
        return Err("poll_interval must be greater than zero".into());
    }
    if max_interval < interval || max_interval > Duration::from_secs(3600) {
        return Err("poll_max_interval must be at least poll_interval and at most 1h".into());
    }
    let max_rps = match spec.max_rps {
        None => global.max_rps,
        Some(n) => NonZeroU32::new(n),
    };
    Ok(PollConfig { interval, max_interval, not_found_grace, max_rps, ..global.clone() })
}

fn auth(spec: AuthSpec, env: &dyn Fn(&str) -> Option<String>) -> Result<Auth, String> {
    if spec.value.is_some() {
        return Err("auth.value must not be written in the config file; use auth.value_env or auth.value_file".into());
    }
    reqwest::header::HeaderName::from_bytes(spec.header.as_bytes())
        .map_err(|_| format!("auth.header {:?} is not an HTTP header name", truncate(&spec.header, 40)))?;
    let secret = match (&spec.value_env, &spec.value_file) {
        (Some(var), None) => env(var)
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| format!("auth.value_env: the environment variable {var} is not set"))?,
        (None, Some(file)) => {
            std::fs::read_to_string(file).map_err(|e| format!("auth.value_file: cannot read {file} ({})", e.kind()))?
        }
        _ => return Err("auth needs exactly one of value_env and value_file".into()),
    };
    let value = ApiKey::new_upstream(secret.trim()).map_err(|m| format!("auth value: {m}"))?;
    let whole = format!("{}{}", spec.prefix, value.expose());
    if reqwest::header::HeaderValue::from_str(&whole).is_err() {
        return Err("auth.prefix and the value do not make a valid header value".into());
    }
    Ok(Auth { header: spec.header.to_ascii_lowercase(), value: ApiKey::new_upstream_header(&whole) })
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// The built-in profile, at an address nothing listens on.
    pub fn aetherforge() -> UpstreamProfile {
        let poll = config().poll;
        UpstreamProfile::aetherforge_with(&"http://127.0.0.1:9".parse().unwrap(), None, &poll)
    }

    const GOOD: &str = r#"
[[upstream]]
name = "replicate"
base_url = "https://api.replicate.com"
status_path = "/v1/predictions/{job_id}"
job_id = "[a-z0-9]{10,64}"
status = "/status"
id = "/id"
pending = ["starting", "processing"]
succeeded = ["succeeded"]
failed = ["failed", "canceled"]
max_rps = 3

[upstream.auth]
prefix = "Bearer "
value_env = "REPLICATE_API_TOKEN"
"#;

    fn config() -> Config {
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: crate::config::ServeArgs,
        }
        <Serve as clap::Parser>::try_parse_from(["serve"]).unwrap().args.into_config().unwrap()
    }

    /// The profiles of `toml`, with `REPLICATE_API_TOKEN` set to a secret.
    fn load(toml: &str) -> Result<Vec<UpstreamProfile>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobhook.toml");
        std::fs::write(&path, toml).unwrap();
        let env = |var: &str| (var == "REPLICATE_API_TOKEN").then(|| "r8_s3cr3t".to_owned());
        from_file(path.to_str().unwrap(), &config(), &env).map_err(|e| e.to_string())
    }

    #[test]
    fn a_ready_profile_loads_with_its_own_cap_and_the_global_pacing() {
        let profiles = load(GOOD).unwrap();
        let p = &profiles[0];
        assert_eq!(p.name, "replicate");
        assert_eq!(p.poll.max_rps, NonZeroU32::new(3));
        assert_eq!(p.poll.interval, config().poll.interval);
        assert_eq!(p.status_of("processing"), Some(JobStatus::Pending));
        assert_eq!(p.status_of("canceled"), Some(JobStatus::Failed));
        assert_eq!(p.status_of("Succeeded"), None, "no case folding, no guess");
        assert_eq!(p.auth.as_ref().unwrap().value.expose(), "Bearer r8_s3cr3t");
        assert!(!format!("{p:?}").contains("s3cr3t"), "the secret never prints");
        let ids = JobIds::new(&[aetherforge(), p.clone()]);
        assert_eq!(
            ids.parse(Some("replicate"), "gm3qorzdhgbfurvjtvhg6dckhu").unwrap().key(),
            "replicate:gm3qorzdhgbfurvjtvhg6dckhu"
        );
        assert!(ids.parse(Some("replicate"), "UPPER-case").unwrap_err().contains("must match"));
        assert_eq!(ids.parse(None, "gm3qorzdhgbfurvjtvhg6dckhu").unwrap().upstream(), "replicate", "the only table");
        assert_eq!(
            ids.parse(Some("midjourney"), "x").unwrap_err(),
            "upstream must be one of aetherforge, replicate, got \"midjourney\""
        );
    }

    #[test]
    fn bad_tables_are_refused_naming_the_file_and_the_table_never_the_secret() {
        let cases = [
            (GOOD.replace("status = \"/status\"", "status = \"status\""), "status must be a JSON pointer"),
            (
                GOOD.replace("failed = [\"failed\", \"canceled\"]", "failed = [\"failed\", \"processing\"]"),
                "\"processing\" is in both pending and failed",
            ),
            (
                GOOD.replace("REPLICATE_API_TOKEN", "UNSET_TOKEN_VAR"),
                "the environment variable UNSET_TOKEN_VAR is not set",
            ),
            (
                GOOD.replace("value_env = \"REPLICATE_API_TOKEN\"", "value = \"r8_written_in_the_file\""),
                "must not be written in the config file",
            ),
            (GOOD.replace("name = \"replicate\"", "name = \"aetherforge\""), "built-in profile"),
            (GOOD.replace("{job_id}", "{id}"), "status_path"),
            (GOOD.replace("job_id = \"[a-z0-9]{10,64}\"", "job_id = \"[a-z\""), "regular expression"),
            (format!("{GOOD}{GOOD}"), "already configured"),
            (GOOD.replace("max_rps = 3", "max_rpm = 3"), "unknown field"),
            (format!("{GOOD}[upstream.create]\njob_id = \"id\"\npaths = [\"/v1\"]\n"), "create.job_id must be"),
            (format!("{GOOD}[upstream.create]\njob_id = \"/id\"\npaths = [\"/v1/../x\"]\n"), "not a plain path"),
            (format!("{GOOD}[upstream.create]\njob_id = \"/id\"\npath = [\"/v1\"]\n"), "unknown field"),
        ];
        for (toml, expected) in cases {
            let err = load(&toml).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
            assert!(err.contains("jobhook.toml: [[upstream]] table #"), "{err}");
            assert!(!err.contains("s3cr3t") && !err.contains("r8_written"), "{err}");
        }
    }
}
