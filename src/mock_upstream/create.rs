//! Creation requests to the mock, in each profile's shape: AetherForge's `POST /public/v1/…` answers
//! `{"job_id": "<uuid>", "status": "Pending"}`, Replicate's `POST /v1/predictions` (or
//! `/v1/models/{owner}/{name}/predictions`) answers 201 `{"id", "status": "starting"}`, OpenAI's
//! `POST /v1/batches` answers `{"id": "batch_…", "status": "validating"}`. Every request is counted and
//! kept (path and body), so tests can tell how many jobs the upstream made.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value, json};

use super::{Inner, MockProfile, authorized, json_body, problem};

/// One scripted answer to a creation request (the next request takes the next one; then `Created`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creation {
    /// The job is made, as the profile's API answers.
    Created,
    /// This HTTP status with a problem body; no job.
    Status(u16),
    /// A 200 whose JSON holds no job ID.
    NoJobId,
    /// A 200 that is not JSON.
    Garbage,
    /// Wait this long, then make the job.
    Hang(Duration),
}

/// A creation request the mock received.
#[derive(Debug, Clone)]
pub struct CreationRequest {
    pub path: String,
    pub body: Value,
    /// The ID of the job it made, if it made one.
    pub job_id: Option<String>,
}

impl MockProfile {
    /// Whether this API creates jobs at `path`.
    fn creates_at(self, path: &str) -> bool {
        match self {
            MockProfile::Aetherforge => path.starts_with("/public/v1/") && !path.starts_with("/public/v1/job/"),
            MockProfile::Replicate => {
                path == "/v1/predictions" || (path.starts_with("/v1/models/") && path.ends_with("/predictions"))
            }
            MockProfile::OpenaiBatch => path == "/v1/batches",
        }
    }

    /// A new job's ID and the API's answer to its creation.
    fn created(self, request: &Value) -> (String, StatusCode, Value) {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        match self {
            MockProfile::Aetherforge => {
                let id = uuid::Uuid::new_v4().to_string();
                (id.clone(), StatusCode::OK, json!({ "job_id": id, "status": "Pending" }))
            }
            MockProfile::Replicate => {
                let id = hex[..26].to_owned();
                let answer = json!({ "id": id, "status": "starting", "input": request.get("input"), "output": null });
                (id, StatusCode::CREATED, answer)
            }
            MockProfile::OpenaiBatch => {
                let id = format!("batch_{hex}");
                let answer = json!({ "id": id, "object": "batch", "status": "validating",
                    "endpoint": request.get("endpoint"), "input_file_id": request.get("input_file_id") });
                (id, StatusCode::OK, answer)
            }
        }
    }
}

/// Every request no status route took: a creation if it is a POST the profile creates at.
pub(super) async fn create_job(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let answer = {
        let mut guard = inner.lock().expect("the mock's lock is never poisoned");
        if method != Method::POST || !guard.profile.creates_at(&path) {
            return problem(StatusCode::NOT_FOUND, "no such route");
        }
        if !authorized(&guard, &headers) {
            return problem(StatusCode::UNAUTHORIZED, "invalid API key");
        }
        let Ok(request) = serde_json::from_slice::<Value>(&body) else {
            return problem(StatusCode::BAD_REQUEST, "the body is not JSON");
        };
        guard.creations.push(CreationRequest { path, body: request, job_id: None });
        (guard.creations.len() - 1, guard.profile, guard.creation_script.pop_front().unwrap_or(Creation::Created))
    };
    let (index, profile, answer) = answer;
    let made = |inner: &Mutex<Inner>| {
        let mut guard = inner.lock().expect("the mock's lock is never poisoned");
        let this = &mut guard.creations[index];
        let (id, status, answer) = profile.created(&this.body);
        this.job_id = Some(id);
        let mut response = json_body(&answer);
        *response.status_mut() = status;
        response
    };
    match answer {
        Creation::Created => made(inner.as_ref()),
        Creation::Hang(wait) => {
            tokio::time::sleep(wait).await;
            made(inner.as_ref())
        }
        Creation::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            problem(status, "simulated creation error")
        }
        Creation::NoJobId => json_body(&json!({ "status": "queued" })),
        Creation::Garbage => {
            let mut response = problem(StatusCode::OK, "x");
            *response.body_mut() = axum::body::Body::from("<html>busy</html>");
            response
        }
    }
}
