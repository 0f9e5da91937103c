//! The job API client, and what one status request means.
//!
//! Each upstream profile ([`UpstreamProfile`]) says where a job's status is (`GET {base_url}{status_path}`
//! with its auth header), where the status is in the answer (a JSON pointer) and what each value means.
//! The built-in AetherForge profile's `GET {base}/public/v1/job/{job_id}` answers
//! `{"job_id", "status": "Pending"|"Succeed"|"Failed", "image_urls": [...]}`. [`UpstreamClient::poll`]
//! turns every possible answer — including the broken ones — into a [`PollAnswer`]; what to do about it
//! is the poller's business.

mod create;

use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::UpstreamConfig;
use crate::config::upstreams::UpstreamProfile;
use crate::domain::{JobId, JobStatus, truncate};
pub use create::{CreateFailure, Created, MAX_ERROR_BODY};

/// The `user-agent` of every poll and every callback.
pub const USER_AGENT: &str = concat!("jobhook/", env!("CARGO_PKG_VERSION"));

/// The largest job-status body we read. Real ones are a few hundred bytes; this leaves room for many
/// image URLs while keeping a broken upstream from filling our memory.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The deepest nesting of arrays and objects we accept in a body (the outermost counts as one). We
/// deliver the body as it came, and receivers parse it with parsers that recurse: Python's standard one
/// raises RecursionError near a thousand levels, after the signature has checked out. Job statuses nest
/// two or three levels; 64 leaves room for any real extension.
pub const MAX_BODY_DEPTH: usize = 64;

/// What one poll found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollAnswer {
    Pending,
    /// Succeed or Failed, with the exact body to deliver.
    Terminal(JobStatus, Bytes),
    /// 401 or 403 by default (which one is kept, to be reported as it came): the upstream refuses our key.
    Unauthorized(reqwest::StatusCode),
    /// 404 by default: the upstream does not know this job (yet).
    NotFound,
    /// 422 by default: the upstream refuses this job ID.
    Rejected,
    /// Anything worth trying again: 5xx, 429, a timeout, a refused connection, a broken body. `retry_after`
    /// is the upstream's own `Retry-After`, when it sent one.
    Transient {
        error: String,
        retry_after: Option<Duration>,
        kind: Trouble,
    },
}

/// What kind of transient trouble a poll met (the `outcome` label of `jobhook_polls_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// 5xx.
    ServerError,
    /// 429.
    RateLimited,
    /// Another 4xx (or 3xx) than the profile's terminal ones (401, 403, 404 and 422 by default).
    OtherStatus,
    Timeout,
    /// No connection, or it broke.
    Unreachable,
    /// A 200 whose body is not a status of this job.
    BadAnswer,
}

impl PollAnswer {
    /// A fixed name for the outcome, for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            PollAnswer::Pending => "pending",
            PollAnswer::Terminal(..) => "terminal",
            PollAnswer::Unauthorized(_) | PollAnswer::NotFound | PollAnswer::Rejected => "4xx",
            PollAnswer::Transient { kind, .. } => match kind {
                Trouble::ServerError => "5xx",
                Trouble::RateLimited => "rate_limited",
                Trouble::OtherStatus => "4xx",
                Trouble::Timeout => "timeout",
                Trouble::Unreachable => "unreachable",
                Trouble::BadAnswer => "bad_answer",
            },
        }
    }
}

/// One profile's client: the profile and the (shared) connection pool.
#[derive(Clone)]
pub struct UpstreamClient {
    http: reqwest::Client,
    base: String,
    auth: Option<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    profile: Arc<UpstreamProfile>,
}

/// The HTTP client every profile polls with: no proxy from the environment, no redirects.
pub fn http_client(config: &UpstreamConfig) -> reqwest::Client {
    crate::install_crypto();
    // No proxy from the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY): every poll carries our
    // Bearer key, which must not go to whatever proxy a variable happens to name. An operator who
    // needs one says so with --upstream-proxy.
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(60));
    if let Some(proxy) = &config.proxy {
        builder = builder.proxy(reqwest::Proxy::all(proxy.as_str()).expect("the proxy URL is checked at start-up"));
    }
    builder.build().expect("the upstream client's settings are valid")
}

impl UpstreamClient {
    /// The client of `profile`, sharing `http`'s connection pool.
    pub fn new(http: reqwest::Client, profile: UpstreamProfile) -> Self {
        let auth = profile.auth.as_ref().map(|a| {
            let name = reqwest::header::HeaderName::from_bytes(a.header.as_bytes())
                .expect("the header name is checked at start-up");
            let mut value = reqwest::header::HeaderValue::from_str(a.value.expose())
                .expect("the value is checked at start-up: visible ASCII only");
            // Kept out of reqwest's and hyper's debug output.
            value.set_sensitive(true);
            (name, value)
        });
        UpstreamClient {
            http,
            base: profile.base_url.as_str().trim_end_matches('/').to_owned(),
            auth,
            profile: Arc::new(profile),
        }
    }

    pub fn profile(&self) -> &UpstreamProfile {
        &self.profile
    }

    /// One status request. Never fails: every outcome is an answer.
    pub async fn poll(&self, job_id: &JobId) -> PollAnswer {
        let path = self.profile.status_path.replace("{job_id}", &path_segment(job_id.id()));
        let mut request = self.http.get(format!("{}{path}", self.base)).header("accept", "application/json");
        if let Some((name, value)) = &self.auth {
            request = request.header(name, value.clone());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                let kind = if e.is_timeout() { Trouble::Timeout } else { Trouble::Unreachable };
                return PollAnswer::Transient { error: describe_transport_error(&e), retry_after: None, kind };
            }
        };
        let status = response.status().as_u16();
        let retry_after =
            response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let rules = &self.profile.http;
        match status {
            200 => {}
            s if rules.unauthorized.contains(&s) => return PollAnswer::Unauthorized(response.status()),
            s if rules.not_found.contains(&s) => return PollAnswer::NotFound,
            s if rules.rejected.contains(&s) => return PollAnswer::Rejected,
            _ => {
                let kind = match status {
                    429 => Trouble::RateLimited,
                    500.. => Trouble::ServerError,
                    _ => Trouble::OtherStatus,
                };
                return PollAnswer::Transient { error: format!("upstream answered HTTP {status}"), retry_after, kind };
            }
        }
        match read_limited(response, MAX_BODY_BYTES).await {
            Ok(body) => interpret(&self.profile, job_id, body),
            Err((error, kind)) => PollAnswer::Transient { error, retry_after: None, kind },
        }
    }
}

/// The ID as one path segment: unreserved characters as they are, the rest percent-encoded.
fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A bad answer: polled again with back-off, `error` shown as `last_error`.
fn bad_answer(error: String) -> PollAnswer {
    PollAnswer::Transient { error, retry_after: None, kind: Trouble::BadAnswer }
}

/// Reads a 200 body: it must be the status of the job we asked about (when the profile has an `id`
/// pointer), with a status value the profile maps. An unmapped value is a bad answer, never a guess.
pub fn interpret(profile: &UpstreamProfile, job_id: &JobId, body: Bytes) -> PollAnswer {
    // serde_json skips fields we do not read without a depth limit, so the limit is checked here.
    if nests_deeper_than(&body, MAX_BODY_DEPTH) {
        return PollAnswer::Transient {
            error: format!(
                "upstream sent a body nested deeper than {MAX_BODY_DEPTH} levels; receivers could not parse it"
            ),
            retry_after: None,
            kind: Trouble::BadAnswer,
        };
    }
    let parsed: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(parsed) => parsed,
        // serde quotes a mistyped value whole; the upstream decides how long that is.
        Err(e) => {
            return bad_answer(format!(
                "upstream sent a body that is not a job status ({})",
                truncate(&e.to_string(), 200)
            ));
        }
    };
    let Some(status) = parsed.pointer(&profile.status_pointer).and_then(|s| s.as_str()) else {
        return bad_answer(format!(
            "upstream sent a body that is not a job status (no string at {})",
            truncate(&profile.status_pointer, 64)
        ));
    };
    if let Some(pointer) = &profile.id_pointer {
        let answered = match parsed.pointer(pointer) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        if !profile.same_job(job_id, &answered) {
            return bad_answer(format!(
                "upstream answered for job {:?} instead of {}",
                truncate(&answered, 64),
                job_id.id()
            ));
        }
    }
    match profile.status_of(status) {
        Some(JobStatus::Pending) => PollAnswer::Pending,
        Some(status) => PollAnswer::Terminal(status, body),
        None => bad_answer(format!(
            "upstream sent unknown job status {:?} (upstream {:?} maps no such value)",
            truncate(status, 32),
            profile.name
        )),
    }
}

/// Whether JSON text nests arrays and objects more than `limit` levels deep. A scan of the raw bytes,
/// so the check cannot itself recurse; brackets inside strings are text. What it says of malformed JSON
/// does not matter: the parse after it refuses that.
fn nests_deeper_than(json: &[u8], limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Reads at most `limit` bytes of a body; a longer body is an error.
pub async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Bytes, (String, Trouble)> {
    let mut body = bytes::BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err((format!("upstream body is larger than {limit} bytes"), Trouble::BadAnswer));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => {
                let kind = if e.is_timeout() { Trouble::Timeout } else { Trouble::Unreachable };
                return Err((format!("upstream body was cut short ({})", describe_transport_error(&e)), kind));
            }
        }
    }
}

/// A short reason for a failed request that names no secret (reqwest's own message can carry the URL).
pub fn describe_transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "broken body"
    } else if e.is_request() {
        "request failed"
    } else {
        "failed"
    };
    // The source chain says why (connection refused, reset, certificate …) without the URL.
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() { kind.to_owned() } else { format!("{kind}: {}", truncate(&cause, 200)) }
}

/// `Retry-After` as seconds or as an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11";

    fn job() -> JobId {
        JOB.parse().unwrap()
    }

    /// The built-in profile's reading of a body.
    fn interpret(job_id: JobId, body: Bytes) -> PollAnswer {
        let profile = crate::config::upstreams::tests::aetherforge();
        super::interpret(&profile, &job_id, body)
    }

    #[test]
    fn a_terminal_body_is_kept_byte_for_byte() {
        let body = Bytes::from(format!(
            r#"{{"job_id":"{JOB}","status":"Succeed","image_urls":["https://x/1.png"],"extra":{{"n":1}}}}"#
        ));
        assert_eq!(interpret(job(), body.clone()), PollAnswer::Terminal(JobStatus::Succeed, body));
    }

    #[test]
    fn image_urls_of_any_shape_pass_through_to_the_delivery() {
        for urls in ["null", "[null]", r#""https://x/1.png""#, r#"[{"url":"https://x/1.png"}]"#] {
            let body = Bytes::from(format!(r#"{{"job_id":"{JOB}","status":"Failed","image_urls":{urls}}}"#));
            assert_eq!(interpret(job(), body.clone()), PollAnswer::Terminal(JobStatus::Failed, body), "{urls}");
        }
    }

    #[test]
    fn a_body_that_is_not_a_job_status_is_reported_briefly() {
        // A JSON string where an object belongs: serde quotes all of it, here 100 kB.
        let body = Bytes::from(format!(r#""{}""#, "x".repeat(100_000)));
        let PollAnswer::Transient { error, .. } = interpret(job(), body) else { panic!("a bad answer") };
        assert!(error.len() < 400, "{} bytes", error.len());
    }

    #[test]
    fn pending_is_pending() {
        let body = Bytes::from(format!(r#"{{"job_id":"{JOB}","status":"Pending","image_urls":[]}}"#));
        assert_eq!(interpret(job(), body), PollAnswer::Pending);
    }

    #[test]
    fn an_answer_about_another_job_is_an_error() {
        let body = Bytes::from(r#"{"job_id":"00000000-0000-0000-0000-000000000000","status":"Succeed"}"#);
        assert!(matches!(interpret(job(), body), PollAnswer::Transient { error, .. } if error.contains("instead of")));
    }

    #[test]
    fn an_unknown_status_or_a_broken_body_is_an_error() {
        let body = Bytes::from(format!(r#"{{"job_id":"{JOB}","status":"Exploded"}}"#));
        assert!(
            matches!(interpret(job(), body), PollAnswer::Transient { error, .. } if error.contains("unknown job status"))
        );
        assert!(matches!(interpret(job(), Bytes::from_static(b"<html>")), PollAnswer::Transient { .. }));
    }

    /// A terminal body with `extra` arrays nested inside the object: `extra + 1` levels in all.
    fn nested(extra: usize) -> Bytes {
        Bytes::from(format!(
            r#"{{"job_id":"{JOB}","status":"Succeed","image_urls":[],"extra":{}{}}}"#,
            "[".repeat(extra),
            "]".repeat(extra)
        ))
    }

    #[test]
    fn a_body_nested_up_to_64_levels_passes_through() {
        let body = nested(63);
        assert_eq!(interpret(job(), body.clone()), PollAnswer::Terminal(JobStatus::Succeed, body));
        // Brackets inside strings are text, not nesting.
        let text = Bytes::from(format!(
            r#"{{"job_id":"{JOB}","status":"Succeed","note":"{}\"{}"}}"#,
            "[".repeat(100),
            "{".repeat(100)
        ));
        assert_eq!(interpret(job(), text.clone()), PollAnswer::Terminal(JobStatus::Succeed, text));
    }

    #[test]
    fn a_body_nested_deeper_than_64_levels_is_a_bad_answer() {
        for extra in [64, 10_000] {
            let answer = interpret(job(), nested(extra));
            let PollAnswer::Transient { error, kind: Trouble::BadAnswer, .. } = answer else {
                panic!("{extra}: {answer:?}")
            };
            assert!(error.contains("nested deeper than 64"), "{error}");
        }
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(300));
        let parsed = parse_retry_after(&later).unwrap();
        assert!(parsed > Duration::from_secs(290) && parsed <= Duration::from_secs(300), "{parsed:?}");
        assert_eq!(parse_retry_after("soon"), None);
    }
}
