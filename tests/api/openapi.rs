//! The committed openapi.yaml is the document the router generates.

use crate::support::helpers::*;

#[test]
fn the_committed_openapi_document_matches_the_router() {
    let generated = jobhook::api::openapi().to_yaml().unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap();
    assert!(
        committed == generated,
        "openapi.yaml differs from what the router generates; regenerate it with: UPDATE_OPENAPI=1 cargo test --test api openapi"
    );
}

#[tokio::test]
async fn the_document_is_served_at_openapi_yaml() {
    let app = spawn_app().await;
    let response = app.http.get(app.url("/openapi.yaml")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("/v1/subscriptions/{id}/deliveries"));
}

#[test]
fn the_document_describes_the_callback_as_a_webhook() {
    let doc: serde_json::Value = serde_json::to_value(jobhook::api::openapi()).unwrap();
    let post = &doc["webhooks"]["jobFinished"]["post"];
    let headers: Vec<_> = post["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        headers,
        ["webhook-id", "webhook-timestamp", "webhook-signature", "jobhook-event-type", "jobhook-subscription-id"]
    );
    let body = &post["requestBody"]["content"]["application/json"];
    assert_eq!(body["schema"]["$ref"], "#/components/schemas/DeliveryBody");
    assert_eq!(body["examples"]["succeed"]["value"]["status"], "Succeed");
    assert_eq!(body["examples"]["failed"]["value"]["status"], "Failed");
    assert_eq!(body["examples"]["envelope_succeed"]["value"]["type"], "job.succeeded");
    assert_eq!(body["examples"]["envelope_failed"]["value"]["data"]["status"], "Failed");
    let forms = &doc["components"]["schemas"]["DeliveryBody"]["oneOf"];
    assert_eq!(forms[1]["$ref"], "#/components/schemas/Envelope");
    assert!(doc["components"]["schemas"]["JobResult"]["properties"]["image_urls"].is_object());
}
