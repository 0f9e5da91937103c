//! Creation pass-through: `POST {base_url}{path}` with the caller's JSON body and the profile's auth,
//! and the new job's ID read from the answer (the profile's `create.job_id` pointer).
//!
//! Every way it can go wrong is a [`CreateFailure`]: the upstream's status when it answered, and the
//! first [`MAX_ERROR_BODY`] bytes of what it said, with the profile's auth value blanked should the
//! upstream echo it.

use serde_json::Value;

use super::{MAX_BODY_BYTES, UpstreamClient, describe_transport_error, read_limited};
use crate::domain::{JobId, truncate};

/// How much of an upstream's answer a failure carries back to the caller.
pub const MAX_ERROR_BODY: usize = 2048;

/// A job the upstream created.
#[derive(Debug, Clone)]
pub struct Created {
    /// The upstream's HTTP status (2xx).
    pub status: u16,
    /// The upstream's answer, parsed.
    pub body: Value,
    pub job_id: JobId,
}

/// Why no job can be watched: the upstream refused, failed, or answered something without a job ID.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct CreateFailure {
    /// The upstream's HTTP status, when it answered.
    pub upstream_status: Option<u16>,
    /// What went wrong, naming no secret.
    pub reason: String,
    /// The first [`MAX_ERROR_BODY`] bytes of the upstream's answer (lossy UTF-8), when it answered.
    pub upstream_body: Option<String>,
}

impl UpstreamClient {
    /// Creates a job: `POST {base_url}{path}` with `body`. The path is the caller's, checked against
    /// the profile's `create.paths` before this.
    pub async fn create(&self, path: &str, body: &Value) -> Result<Created, CreateFailure> {
        let pointer = match &self.profile.create {
            Some(rules) => rules.job_id_pointer.as_str(),
            None => return Err(self.failure(None, "this upstream's profile has no create table".into(), None)),
        };
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("accept", "application/json")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).unwrap_or_default());
        if let Some((name, value)) = &self.auth {
            request = request.header(name, value.clone());
        }
        let response = request.send().await.map_err(|e| {
            self.failure(None, format!("the upstream could not be reached ({})", describe_transport_error(&e)), None)
        })?;
        let status = response.status().as_u16();
        let read = read_limited(response, MAX_BODY_BYTES).await;
        if !(200..300).contains(&status) {
            let answered = read.ok();
            return Err(self.failure(
                Some(status),
                format!("the upstream answered HTTP {status}"),
                answered.as_deref(),
            ));
        }
        let bytes = read.map_err(|(error, _)| self.failure(Some(status), error, None))?;
        let Ok(parsed) = serde_json::from_slice::<Value>(&bytes) else {
            let reason = format!("the upstream answered HTTP {status} with a body that is not JSON");
            return Err(self.failure(Some(status), reason, Some(&bytes)));
        };
        let raw = match parsed.pointer(pointer) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                let reason = format!("the upstream's answer has no job ID at {}", truncate(pointer, 64));
                return Err(self.failure(Some(status), reason, Some(&bytes)));
            }
        };
        let job_id = self.profile.job_id.parse(&self.profile.name, &raw).map_err(|e| {
            self.failure(Some(status), format!("the upstream's job ID does not fit the profile: {e}"), Some(&bytes))
        })?;
        Ok(Created { status, body: parsed, job_id })
    }

    /// A failure carrying the start of the upstream's answer, with our auth value blanked in it.
    fn failure(&self, upstream_status: Option<u16>, reason: String, body: Option<&[u8]>) -> CreateFailure {
        let upstream_body = body.map(|b| {
            // Blanked before the cut, so a secret across the cut cannot leave a piece behind.
            let mut text = String::from_utf8_lossy(&b[..b.len().min(4 * MAX_ERROR_BODY)]).into_owned();
            if let Some(auth) = &self.profile.auth {
                let whole = auth.value.expose();
                // The value with its prefix, and the bare token after a scheme such as "Bearer ".
                for secret in [Some(whole), whole.rsplit_once(' ').map(|(_, token)| token)].into_iter().flatten() {
                    if secret.len() >= 8 {
                        text = text.replace(secret, "<redacted>");
                    }
                }
            }
            let mut end = text.len().min(MAX_ERROR_BODY);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text
        });
        CreateFailure { upstream_status, reason, upstream_body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ApiKey;

    #[test]
    fn a_failure_carries_at_most_2_kib_of_the_answer_and_never_our_key() {
        let mut profile = crate::config::upstreams::tests::aetherforge();
        profile.auth = Some(crate::config::upstreams::Auth {
            header: "authorization".into(),
            value: ApiKey::new_upstream_header("Bearer af_s3cr3t_key_42"),
        });
        crate::install_crypto();
        let client = UpstreamClient::new(reqwest::Client::new(), profile);
        let echo = format!("{{\"error\": \"bad key af_s3cr3t_key_42\", \"pad\": \"{}\"}}", "x".repeat(5000));
        let failure = client.failure(Some(401), "the upstream answered HTTP 401".into(), Some(echo.as_bytes()));
        let body = failure.upstream_body.unwrap();
        assert!(body.len() <= MAX_ERROR_BODY, "{}", body.len());
        assert!(!body.contains("s3cr3t") && body.contains("<redacted>"), "{body}");
    }
}
