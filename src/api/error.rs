//! The one error type of the API, and its RFC 9457 `application/problem+json` form.
//!
//! Each variant is something the client can act on. Internal errors are logged with their cause and
//! shown to the client only as a generic sentence: no SQL, no paths, no secrets.

use axum::Json;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the service cannot store this right now; nothing was saved, try again shortly")]
    Unavailable,
    /// The callback host could not be looked up now; the same request may pass later.
    #[error("{0}")]
    DnsUnavailable(String),
    #[error("something went wrong on our side; it has been logged")]
    Internal,
    #[error("the request body did not arrive within {}", humantime::format_duration(*.0))]
    RequestTimeout(std::time::Duration),
    /// Over a rate limit; the next request is allowed in `retry_after` seconds.
    #[error("too many requests of this kind; try again in {retry_after} s")]
    TooManyRequests { retry_after: u64 },
    /// The upstream did not create a job that can be watched; the problem carries its status and the
    /// start of its answer.
    #[error("{0}; nothing was registered")]
    UpstreamFailed(Box<crate::upstream::CreateFailure>),
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem: `urn:jobhook:problem:<slug>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request, in words a person can act on.
    pub detail: String,
}

/// Declares problem answers that several operations document alike, each written once and named in
/// their `responses(…)` (the handlers still answer through [`ApiError`]).
macro_rules! problem_responses {
    ($($(#[$doc:meta])* $name:ident = $status:tt, $description:tt;)*) => {$(
        $(#[$doc])*
        #[derive(utoipa::IntoResponses)]
        #[response(status = $status, description = $description, content_type = "application/problem+json")]
        pub struct $name(pub $crate::api::error::Problem);
    )*};
}
pub(crate) use problem_responses;

problem_responses! {
    Unauthorized = 401, "Missing or invalid API key";
    NotJson = 400, "The body is not JSON, or the request has more than one Authorization header";
    StoreUnavailable = 503, "The store cannot take writes now; nothing changed";
    BodyTooSlow = 408, "The body did not arrive within --request-timeout";
    BodyTooLarge = 413, "The body is larger than 64 KiB";
}

/// The 503 of the routes that register: the store cannot take writes now, or DNS cannot look up the
/// callback host now.
#[derive(utoipa::IntoResponses)]
#[response(status = 503, description = "The store cannot take writes now, or DNS cannot look up the callback host now (`urn:jobhook:problem:dns-unavailable`); nothing was saved, retry after `Retry-After` seconds",
    content_type = "application/problem+json",
    headers(("retry-after" = String, description = "Seconds to wait before trying again")))]
pub struct RegistrationUnavailable(pub Problem);

impl ApiError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Missing or invalid API key"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            Self::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed-json", "The body is not valid JSON"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request", "Bad request"),
            Self::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", "The request is not valid"),
            Self::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "The body is too large")
            }
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "Method not allowed"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Not possible in the current state"),
            Self::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Storage unavailable"),
            Self::DnsUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "dns-unavailable", "The callback host cannot be looked up now")
            }
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
            Self::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request-timeout", "The request was too slow"),
            Self::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate-limited", "Too many requests"),
            Self::UpstreamFailed(_) => {
                (StatusCode::BAD_GATEWAY, "upstream-failed", "The upstream did not create a job to watch")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, slug, title) = self.parts();
        let problem = Problem {
            kind: format!("urn:jobhook:problem:{slug}"),
            title: title.into(),
            status: status.as_u16(),
            detail: self.to_string(),
        };
        let mut response = match &self {
            // Problem details' extension members (RFC 9457 §3.2): what the upstream said.
            Self::UpstreamFailed(failure) => {
                let mut body = serde_json::to_value(&problem).unwrap_or_default();
                body["upstream_status"] = failure.upstream_status.into();
                body["upstream_body"] = failure.upstream_body.clone().into();
                (status, Json(body)).into_response()
            }
            _ => (status, Json(problem)).into_response(),
        };
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        match self {
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Unavailable | Self::DnsUnavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Self::TooManyRequests { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            _ => {}
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => {
                tracing::error!(error = %e, "store unavailable");
                ApiError::Unavailable
            }
            _ => {
                tracing::error!(error = %e, "store error");
                ApiError::Internal
            }
        }
    }
}

impl From<crate::delivery::client::Refusal> for ApiError {
    fn from(refusal: crate::delivery::client::Refusal) -> Self {
        use crate::delivery::client::Refusal;
        match refusal {
            Refusal::NotAllowed(why) => ApiError::Invalid(why),
            Refusal::DnsUnavailable(why) => ApiError::DnsUnavailable(why),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::BadRequest(format!(
            "the query string is not valid: {}",
            e.body_text().trim_start_matches("Failed to deserialize query string: ")
        ))
    }
}

/// A JSON body, parsed whatever its content type says (people trying the API with curl often leave it
/// out), with every rejection turned into a problem: 413 too large, 400 not JSON, 422 wrong shape.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
    super::RequestTimeout: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // A declared length over the limit is refused before any of the body is awaited.
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > super::MAX_BODY_BYTES as u64) {
            return Err(ApiError::PayloadTooLarge { limit: super::MAX_BODY_BYTES });
        }
        let super::RequestTimeout(timeout) = super::RequestTimeout::from_ref(state);
        let body = tokio::time::timeout(timeout, axum::body::Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::RequestTimeout(timeout))?
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { limit: super::MAX_BODY_BYTES }
                } else {
                    ApiError::BadRequest("the request body could not be read".into())
                }
            })?;
        if body.is_empty() {
            return Err(ApiError::MalformedJson("the request body is empty; send a JSON object".into()));
        }
        // Valid JSON that is not an object (an array, a string) is the wrong shape: serde would take an
        // array for a struct's fields in order, and name our internal type for the rest.
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some_and(|b| *b != b'{') && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() {
            return Err(ApiError::Invalid("the body must be a JSON object".into()));
        }
        serde_json::from_slice(&body).map(ApiJson).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::Invalid(e.to_string()),
            _ => ApiError::MalformedJson(format!("the body is not valid JSON: {e}")),
        })
    }
}
