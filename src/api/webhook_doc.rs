//! The callback in the OpenAPI document: a `webhooks:` entry (OpenAPI 3.1) describing the signed POST
//! every receiver gets, so that generated clients have a type for what they receive.
//!
//! utoipa derives paths from handlers; a webhook has no handler here (we send it, we do not serve it),
//! so the entry is built by hand in a [`Modify`].

use serde::{Deserialize, Serialize};
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::{ContentBuilder, Ref, Required};
use utoipa::{Modify, PartialSchema, ToSchema};

/// The name of the webhook in the document.
pub const WEBHOOK: &str = "jobFinished";

/// The body of a delivery: the upstream's final answer for the job, byte for byte (fields not listed
/// here pass through unchanged).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobResult {
    /// The upstream job ID.
    #[schema(format = Uuid, example = "3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11")]
    pub job_id: String,
    /// How the job ended.
    pub status: FinalStatus,
    /// The images of a `Succeed` job; empty when it failed.
    pub image_urls: Vec<String>,
}

/// A job's final status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub enum FinalStatus {
    Succeed,
    Failed,
}

/// The body of a delivery in the `envelope` form: the Standard Webhooks payload structure.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Envelope {
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// When the job ended (RFC 3339): the same on every attempt and redelivery.
    #[schema(format = DateTime, example = "2026-12-01T10:31:07.412Z")]
    pub timestamp: String,
    /// The upstream's final answer for the job.
    pub data: JobResult,
    pub subscription: EnvelopeSubscription,
}

/// The subscription a delivery is for.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnvelopeSubscription {
    /// The subscription's ID (null in a test send).
    #[schema(format = Uuid)]
    pub id: Option<String>,
    #[schema(format = Uuid)]
    pub job_id: String,
    /// The metadata given at registration (`{}` when none).
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}

/// The event a delivery reports (also in its `jobhook-event-type` header).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub enum EventType {
    #[serde(rename = "job.succeeded")]
    JobSucceeded,
    #[serde(rename = "job.failed")]
    JobFailed,
}

/// A delivery's body: `raw` (the upstream's answer) or `envelope`, as the subscription chose.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DeliveryBody {
    Raw(JobResult),
    Envelope(Envelope),
}

pub struct CallbackWebhook;

impl Modify for CallbackWebhook {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.schemas.insert("JobResult".into(), JobResult::schema());
        components.schemas.insert("FinalStatus".into(), FinalStatus::schema());
        components.schemas.insert("Envelope".into(), Envelope::schema());
        components.schemas.insert("EnvelopeSubscription".into(), EnvelopeSubscription::schema());
        components.schemas.insert("EventType".into(), EventType::schema());
        components.schemas.insert("DeliveryBody".into(), DeliveryBody::schema());
        let header = |name: &str, description: &str| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Header)
                .required(Required::True)
                .description(Some(description))
                .schema(Some(String::schema()))
                .build()
        };
        let content = body_content();
        let operation = OperationBuilder::new()
            .operation_id(Some("jobFinished"))
            .tag("subscriptions")
            .summary(Some("The delivery your callback receives when a job ends"))
            .description(Some(
                "jobhook POSTs the upstream's final job status to the subscription's `callback_url`, signed with Standard Webhooks. Verify the signature with your signing secret (`GET /v1/signing-secret`) before trusting the body; drop duplicates by `webhook-id` (it is the same on every retry and redelivery). Answer 2xx fast: any other answer, a redirect or a timeout is retried on the schedule; 410 stops for good. The status, `Content-Type` and first 2 KiB of your answer are kept in the delivery log (`GET /v1/subscriptions/{id}/deliveries`). The subscription's custom `headers`, if it has any, come with every attempt too (their names are whatever you registered, so they are not listed here).",
            ))
            .parameter(header("webhook-id", "The message ID (`msg_…`): one per subscription, the same on every retry and redelivery"))
            .parameter(header("webhook-timestamp", "Unix seconds of this attempt; reject timestamps older than 5 minutes"))
            .parameter(header(
                "webhook-signature",
                "`v1,<base64 HMAC-SHA256 of \"{webhook-id}.{webhook-timestamp}.{body}\">`, keyed with the decoded `whsec_` secret; several, space-separated, during a secret rotation",
            ))
            .parameter(header("jobhook-event-type", "`job.succeeded` or `job.failed`, in both payload forms, so a raw receiver can route too"))
            .parameter(header("jobhook-subscription-id", "The subscription's ID"))
            .request_body(Some(
                RequestBodyBuilder::new()
                    .description(Some("`raw` (the default): the upstream's final answer for the job, byte for byte; `envelope`: that answer as `data` in the Standard Webhooks payload structure, with the subscription and its metadata"))
                    .required(Some(Required::True))
                    .content("application/json", content)
                    .build(),
            ))
            .response("200", ResponseBuilder::new().description("Any 2xx: delivered").build())
            .response("410", ResponseBuilder::new().description("Gone: stop; the subscription fails with `callback_gone`").build())
            .response(
                "default",
                ResponseBuilder::new()
                    .description("Anything else is retried on the schedule (a 429 or 503 with Retry-After waits at least that long)")
                    .build(),
            )
            .security(utoipa::openapi::security::SecurityRequirement::default())
            .build();
        let mut paths = openapi.webhooks.take().unwrap_or_default();
        paths.paths.insert(WEBHOOK.into(), PathItem::new(HttpMethod::Post, operation));
        openapi.webhooks = Some(paths);
    }
}

/// The body of the delivery: its schema and an example of each form and outcome.
fn body_content() -> utoipa::openapi::content::Content {
    let example =
        |summary: &str, value: serde_json::Value| ExampleBuilder::new().summary(summary).value(Some(value)).build();
    ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("DeliveryBody")))
        .examples_from_iter([
            (
                "succeed",
                example(
                    "The job succeeded",
                    serde_json::json!({"job_id": "3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11", "status": "Succeed", "image_urls": ["https://images.example.com/3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11/0.png"]}),
                ),
            ),
            (
                "failed",
                example(
                    "The job failed",
                    serde_json::json!({"job_id": "7d0e5a11-2c4b-4f3e-8a9d-1b2c3d4e5f60", "status": "Failed", "image_urls": []}),
                ),
            ),
            (
                "envelope_succeed",
                example(
                    "The job succeeded (payload: envelope)",
                    serde_json::json!({"type": "job.succeeded", "timestamp": "2026-12-01T10:31:07.412Z",
                        "data": {"job_id": "3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11", "status": "Succeed", "image_urls": ["https://images.example.com/3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11/0.png"]},
                        "subscription": {"id": "01a2245a-7016-736a-a92e-356c5743d668", "job_id": "3f1c2b9e-8a4d-4c6e-9b1a-2d5e7f9a0c11", "metadata": {"order_id": "A-1042"}}}),
                ),
            ),
            (
                "envelope_failed",
                example(
                    "The job failed (payload: envelope)",
                    serde_json::json!({"type": "job.failed", "timestamp": "2026-12-01T10:32:44.009Z",
                        "data": {"job_id": "7d0e5a11-2c4b-4f3e-8a9d-1b2c3d4e5f60", "status": "Failed", "image_urls": []},
                        "subscription": {"id": "01a2245b-11c2-7a4e-8f00-5b6c7d8e9f01", "job_id": "7d0e5a11-2c4b-4f3e-8a9d-1b2c3d4e5f60", "metadata": {}}}),
                ),
            ),
        ])
        .build()
}
