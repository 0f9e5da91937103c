//! `jobhook verify`: checks a captured delivery against a signing secret and says, step by step, what
//! matches and what does not — for debugging a receiver that rejects signatures.

use std::path::PathBuf;

use clap::{ArgGroup, Args};

use crate::delivery::signing;
use crate::keys::SigningSecret;

/// How far a `webhook-timestamp` may be from now before the stock libraries refuse it.
const TOLERANCE_SECS: i64 = 5 * 60;

/// The capture comes whole (`--request`) or in two parts (`--headers` with `--body`): one of the two.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("capture").required(true).args(["request", "headers"])))]
#[command(override_usage = "jobhook verify --secret <SECRET> <--request <FILE> | --headers <FILE> --body <FILE>>")]
pub struct VerifyArgs {
    /// The signing secret (`whsec_…`, from GET /v1/signing-secret).
    #[arg(long, env = "JOBHOOK_SIGNING_SECRET", hide_env_values = true)]
    pub secret: String,
    /// A whole captured HTTP request: request line (optional), headers, a blank line, the body.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["headers", "body"])]
    pub request: Option<PathBuf>,
    /// The request's headers: `Name: value` lines (as `curl -D` writes them) or a JSON object; with --body.
    #[arg(long, value_name = "FILE", requires = "body")]
    pub headers: Option<PathBuf>,
    /// The request's body, byte for byte; with --headers.
    #[arg(long, value_name = "FILE", requires = "headers")]
    pub body: Option<PathBuf>,
}

/// A request to check: its headers (lower-case names) and its exact body.
pub struct Captured {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Captured {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Why a capture cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {}: {source}", path.display())]
    File { path: PathBuf, source: std::io::Error },
    #[error("the headers file is not a JSON object ({0})")]
    HeadersNotJson(serde_json::Error),
    #[error("give --request FILE, or --headers FILE and --body FILE")]
    NoCapture,
}

/// Reads the capture the arguments name.
pub fn read(args: &VerifyArgs) -> Result<Captured, ReadError> {
    let load = |p: &PathBuf| std::fs::read(p).map_err(|source| ReadError::File { path: p.clone(), source });
    match (&args.request, &args.headers, &args.body) {
        (Some(request), _, _) => Ok(parse_request(&load(request)?)),
        (None, Some(headers), Some(body)) => {
            Ok(Captured { headers: parse_headers(&load(headers)?)?, body: load(body)? })
        }
        _ => Err(ReadError::NoCapture),
    }
}

fn parse_request(raw: &[u8]) -> Captured {
    // The first blank line ends the headers, whichever line endings the capture has.
    let crlf = find(raw, b"\r\n\r\n").map(|at| (at, 4));
    let lf = find(raw, b"\n\n").map(|at| (at, 2));
    let (head, body) = match [crlf, lf].into_iter().flatten().min() {
        Some((at, len)) => (&raw[..at], &raw[at + len..]),
        None => (raw, &[][..]),
    };
    let headers = String::from_utf8_lossy(head).lines().filter_map(header_line).collect();
    Captured { headers, body: body.to_vec() }
}

fn parse_headers(raw: &[u8]) -> Result<Vec<(String, String)>, ReadError> {
    let text = String::from_utf8_lossy(raw);
    if text.trim_start().starts_with('{') {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(ReadError::HeadersNotJson)?;
        return Ok(map
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
            .collect());
    }
    Ok(text.lines().filter_map(header_line).collect())
}

fn header_line(line: &str) -> Option<(String, String)> {
    let (name, value) = line.split_once(':')?;
    if name.contains(' ') {
        return None; // a request or status line
    }
    Some((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Checks the capture; returns the report and whether a stock library would accept it now.
pub fn check(secret: &str, captured: &Captured, now: i64) -> (String, bool) {
    let mut report = String::new();
    let mut ok = true;
    let mut line = |what: &str, detail: String, good: bool| {
        report.push_str(&format!("{} {what:<18} {detail}\n", if good { "ok  " } else { "FAIL" }));
    };
    // The stock libraries also take the base64 part alone.
    let secret = secret.trim();
    let secret = if secret.starts_with("whsec_") { secret.to_owned() } else { format!("whsec_{secret}") };
    let secret: SigningSecret = match secret.parse() {
        Ok(s) => s,
        Err(e) => {
            line("secret", format!("{e} (copy it whole from GET /v1/signing-secret, `whsec_` included)"), false);
            return (report, false);
        }
    };
    let (Some(id), Some(timestamp), Some(signatures)) =
        (captured.header("webhook-id"), captured.header("webhook-timestamp"), captured.header("webhook-signature"))
    else {
        for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            let present = captured.header(name).is_some();
            line(name, if present { "present".into() } else { "missing from the captured headers".into() }, present);
        }
        report.push_str("\nA proxy or framework may have dropped or renamed the headers.\n");
        return (report, false);
    };
    line("webhook-id", id.to_owned(), true);
    let Ok(ts) = timestamp.parse::<i64>() else {
        line("webhook-timestamp", format!("{timestamp:?} is not Unix seconds"), false);
        return (report, false);
    };
    let age = now - ts;
    let fresh = age.abs() <= TOLERANCE_SECS;
    ok &= fresh;
    let when = if age >= 0 { format!("{age} s ago") } else { format!("{} s in the future", -age) };
    let detail = if fresh {
        format!("{ts} ({when})")
    } else {
        format!(
            "{ts} ({when}): outside the libraries' 5-minute tolerance, so they refuse it \
             (expected for an old capture; check the receiver's clock otherwise)"
        )
    };
    line("webhook-timestamp", detail, fresh);
    let body = &captured.body;
    let expected = signing::sign(&secret, id, ts, body);
    let entries: Vec<&str> = signatures.split_whitespace().collect();
    let matched = entries.iter().position(|s| *s == expected);
    match matched {
        Some(i) => line(
            "webhook-signature",
            format!("signature {} of {} matches this secret and this exact body", i + 1, entries.len()),
            true,
        ),
        None => {
            ok = false;
            line("webhook-signature", format!("none of {} signature(s) matches", entries.len()), false);
            report.push_str(&hints(&secret, id, ts, body, &entries));
        }
    }
    report.push_str(if ok {
        "\nverified: a stock Standard Webhooks library accepts this request with this secret\n"
    } else if matched.is_some() {
        "\nthe signature is right; only the timestamp stops the libraries\n"
    } else {
        "\nnot verified\n"
    });
    (report, ok)
}

/// Why a signature may not match, from the usual mistakes.
fn hints(secret: &SigningSecret, id: &str, ts: i64, body: &[u8], entries: &[&str]) -> String {
    let mut out = String::from("\nWhat may be wrong:\n");
    let trimmed = body.trim_ascii_end();
    if trimmed.len() != body.len() && entries.contains(&signing::sign(secret, id, ts, trimmed).as_str()) {
        out.push_str("- the body ends with whitespace the sender did not send (a newline added when saving it?): with it removed, the signature matches\n");
        return out;
    }
    if entries.iter().any(|e| !e.starts_with("v1,")) {
        out.push_str("- a signature is not of the form v1,<base64>: was the header cut or altered?\n");
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let reserialized = serde_json::to_vec(&value).unwrap_or_default();
        if reserialized != body {
            out.push_str("- the body is JSON but not in its compact form: verify the raw bytes as received, before any parsing or re-serialising\n");
        }
    }
    out.push_str("- the secret may be another tenant's, or an old one after a rotation (GET /v1/signing-secret shows the current one)\n");
    out.push_str("- the body must be the exact bytes received: a framework that parses JSON first loses them\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn capture(body: &[u8], ts: i64) -> Captured {
        let secret: SigningSecret = SECRET.parse().unwrap();
        let sig = signing::sign(&secret, "msg_1", ts, body);
        Captured {
            headers: vec![
                ("webhook-id".into(), "msg_1".into()),
                ("webhook-timestamp".into(), ts.to_string()),
                ("webhook-signature".into(), format!("v1,bm90IHRoaXMgb25l {sig}")),
            ],
            body: body.to_vec(),
        }
    }

    #[test]
    fn a_good_capture_verifies_and_says_which_signature_matched() {
        let (report, ok) = check(SECRET, &capture(b"{\"a\":1}", 1000), 1010);
        assert!(ok, "{report}");
        assert!(report.contains("signature 2 of 2 matches"), "{report}");
    }

    #[test]
    fn the_secret_may_come_without_its_prefix() {
        let bare = SECRET.trim_start_matches("whsec_");
        assert!(check(bare, &capture(b"{}", 1000), 1000).1);
    }

    #[test]
    fn a_trailing_newline_is_pointed_out() {
        let mut c = capture(b"{\"a\":1}", 1000);
        c.body.push(b'\n');
        let (report, ok) = check(SECRET, &c, 1000);
        assert!(!ok);
        assert!(report.contains("newline"), "{report}");
    }

    #[test]
    fn an_old_timestamp_fails_but_says_the_signature_is_right() {
        let (report, ok) = check(SECRET, &capture(b"{}", 1000), 1000 + 3600);
        assert!(!ok);
        assert!(report.contains("only the timestamp"), "{report}");
    }

    #[test]
    fn raw_requests_and_header_files_parse() {
        let raw = b"POST /hook HTTP/1.1\r\nHost: x\r\nWebhook-Id: msg_9\r\n\r\n{\"a\":1}";
        let c = parse_request(raw);
        assert_eq!(c.header("webhook-id"), Some("msg_9"));
        assert_eq!(c.body, b"{\"a\":1}");
        let lf = parse_request(b"POST /hook HTTP/1.1\nWebhook-Id: msg_7\n\n{\"a\":\"x\\r\\n\\r\\ny\"}");
        assert_eq!(lf.header("webhook-id"), Some("msg_7"));
        let h = parse_headers(b"{\"Webhook-Id\": \"msg_8\"}").unwrap();
        assert_eq!(h, vec![("webhook-id".to_owned(), "msg_8".to_owned())]);
    }
}
