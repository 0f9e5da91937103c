//! A profile's `[upstream.create]` table: which creation requests `POST /v1/jobs` may forward to the
//! upstream, and where the new job's ID is in its answer.

use serde::Deserialize;

use crate::domain::truncate;

/// The longest path `POST /v1/jobs` forwards, in bytes.
pub const MAX_PATH_LEN: usize = 512;

/// How jobs of a profile are created through jobhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRules {
    /// A JSON pointer to the new job's ID in the upstream's answer.
    pub job_id_pointer: String,
    /// The path prefixes a creation request may go to (under the profile's `base_url`).
    pub paths: Vec<String>,
}

/// `[upstream.create]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateSpec {
    job_id: String,
    paths: Vec<String>,
}

impl CreateRules {
    /// AetherForge's creation endpoints, all under `/public/v1/`, answer `{"job_id": "<uuid>", …}`.
    pub fn aetherforge() -> Self {
        CreateRules { job_id_pointer: "/job_id".into(), paths: vec!["/public/v1/".into()] }
    }

    /// Whether `path` may be forwarded: a plain path (no query, no `.` or `..` segment, no
    /// percent-encoding) under one of the prefixes, where a prefix without a trailing `/` ends at a
    /// segment's end (`/v1/batches` allows `/v1/batches` and `/v1/batches/x`, not `/v1/batchesx`).
    pub fn allows(&self, path: &str) -> Result<(), String> {
        if !plain_path(path) {
            return Err(format!(
                "path must be a plain path of at most {MAX_PATH_LEN} bytes: /segments of letters, digits \
                 and - . _ ~ : @, without query, percent-encoding, empty, . or .. segments; got {:?}",
                truncate(path, 64)
            ));
        }
        let under = |prefix: &String| {
            path.strip_prefix(prefix.as_str())
                .is_some_and(|rest| prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'))
        };
        if self.paths.iter().any(under) {
            return Ok(());
        }
        Err(format!(
            "path {:?} is not one this upstream's profile lets jobhook forward (create.paths: {})",
            truncate(path, 64),
            self.paths.join(", ")
        ))
    }
}

/// `/a/b` or `/a/b/`: segments of unreserved characters (and `:` `@`), none empty, `.` or `..`.
fn plain_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else { return false };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    path.len() <= MAX_PATH_LEN
        && (rest.is_empty() && path == "/"
            || rest.split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~:@".contains(&b))
            }))
}

pub(super) fn validate(spec: &CreateSpec) -> Result<CreateRules, String> {
    super::pointer("create.job_id", &spec.job_id)?;
    if spec.paths.is_empty() {
        return Err("create.paths must list at least one path prefix, such as \"/v1/predictions\"".into());
    }
    if let Some(bad) = spec.paths.iter().find(|p| !plain_path(p)) {
        return Err(format!(
            "create.paths: {:?} is not a plain path prefix (start with /; letters, digits and - . _ ~ : @)",
            truncate(bad, 64)
        ));
    }
    Ok(CreateRules { job_id_pointer: spec.job_id.clone(), paths: spec.paths.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(paths: &[&str]) -> CreateRules {
        CreateRules { job_id_pointer: "/id".into(), paths: paths.iter().map(|p| p.to_string()).collect() }
    }

    #[test]
    fn a_path_is_forwarded_only_under_an_allowed_prefix_and_only_when_plain() {
        let af = CreateRules::aetherforge();
        assert!(af.allows("/public/v1/image-tune/upscale").is_ok());
        let batches = rules(&["/v1/batches"]);
        assert!(batches.allows("/v1/batches").is_ok());
        assert!(batches.allows("/v1/batches/").is_ok());
        assert!(batches.allows("/v1/batchesx").unwrap_err().contains("not one this upstream"));
        for bad in [
            "/public/v1/../admin",
            "/public/v1/./x",
            "/public/v1//x",
            "/public/v1/x?admin=1",
            "/public/v1/%2e%2e/admin",
            "public/v1/x",
            "/public/v1/x#y",
            "/public/v1/a b",
        ] {
            assert!(af.allows(bad).unwrap_err().contains("plain path"), "{bad}");
        }
        assert!(af.allows("/internal/reset").unwrap_err().contains("create.paths: /public/v1/"));
    }
}
