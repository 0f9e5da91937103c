//! How a subscription's deliveries are shaped (issue 14, item 2): the body's form and the caller's
//! metadata, parsed once at the edge.

use serde::{Deserialize, Serialize};

/// The most a subscription's `metadata` may take, serialised.
pub const MAX_METADATA_BYTES: usize = 4096;

/// Which body a delivery carries.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, utoipa::ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// The upstream's final job status, byte for byte.
    #[default]
    Raw,
    /// The same body inside the Standard Webhooks payload structure:
    /// `{"type", "timestamp", "data", "subscription"}`.
    Envelope,
}

impl Payload {
    pub fn as_str(self) -> &'static str {
        match self {
            Payload::Raw => "raw",
            Payload::Envelope => "envelope",
        }
    }

    /// Reads a stored form (`None`: raw, as every subscription before this column).
    pub fn from_stored(stored: Option<&str>) -> Result<Self, String> {
        match stored {
            None | Some("raw") => Ok(Payload::Raw),
            Some("envelope") => Ok(Payload::Envelope),
            Some(other) => Err(format!("unknown payload form {other:?}")),
        }
    }
}

/// A request's `metadata` (absent or null: none) as the store keeps it: a JSON object, serialised, at
/// most [`MAX_METADATA_BYTES`].
pub fn metadata_from_request(raw: Option<&serde_json::Value>) -> Result<Option<String>, String> {
    match raw {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(object @ serde_json::Value::Object(_)) => {
            let stored = object.to_string();
            if stored.len() > MAX_METADATA_BYTES {
                return Err(format!(
                    "metadata must be at most {MAX_METADATA_BYTES} bytes serialised, got {}",
                    stored.len()
                ));
            }
            Ok(Some(stored))
        }
        Some(_) => Err("metadata must be a JSON object".into()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn metadata_is_an_object_of_at_most_4_kib() {
        assert_eq!(metadata_from_request(None), Ok(None));
        assert_eq!(metadata_from_request(Some(&json!({"a": 1}))), Ok(Some(r#"{"a":1}"#.into())));
        assert!(metadata_from_request(Some(&json!([1]))).unwrap_err().contains("JSON object"));
        let big = json!({ "x": "y".repeat(MAX_METADATA_BYTES) });
        assert!(metadata_from_request(Some(&big)).unwrap_err().contains("4096"));
        assert_eq!(Payload::from_stored(None), Ok(Payload::Raw));
        assert_eq!(Payload::from_stored(Some(Payload::Envelope.as_str())), Ok(Payload::Envelope));
    }
}
