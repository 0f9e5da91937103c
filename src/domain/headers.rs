//! A subscription's custom headers (issue 14, item 1): parsed once at the edge, sent with every attempt.
//!
//! The values are secrets (an `Authorization` for a receiver behind a gateway): nothing here ever puts a
//! value in an error, a log line or a `Debug` output. Only the names are shown; the values are stored,
//! sent, and compared through [`CallbackHeaders::digest`].

use std::collections::BTreeMap;
use std::fmt;

use sha2::{Digest, Sha256};

/// At most this many headers per subscription.
pub const MAX_HEADERS: usize = 10;
/// A value is at most this many bytes.
pub const MAX_VALUE_BYTES: usize = 1024;

/// Headers jobhook sets itself: a subscription cannot replace them.
const RESERVED: [&str; 5] = ["host", "content-length", "content-type", "transfer-encoding", "connection"];
/// Prefixes jobhook keeps for itself: `webhook-` (the Standard Webhooks signature headers) and `jobhook-`
/// (the routing headers every delivery is to carry: `jobhook-event-type`, `jobhook-subscription-id`).
const RESERVED_PREFIXES: [&str; 2] = ["webhook-", "jobhook-"];

/// Custom headers, by lower-case name (HTTP names are case-insensitive, and that is how they go on the
/// wire). Empty for a subscription without any.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CallbackHeaders(BTreeMap<String, String>);

impl fmt::Debug for CallbackHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: the values are secrets.
        f.debug_struct("CallbackHeaders").field("names", &self.names()).field("values", &"<redacted>").finish()
    }
}

impl CallbackHeaders {
    /// Parses the `headers` of a request (absent or null: none). The error names the header, never its
    /// value (which is why this takes any JSON: serde's own type errors quote what they got).
    pub fn from_request(raw: Option<&serde_json::Value>) -> Result<Self, String> {
        let raw = match raw {
            None | Some(serde_json::Value::Null) => return Ok(CallbackHeaders::default()),
            Some(serde_json::Value::Object(raw)) => raw,
            Some(_) => return Err("headers must be a JSON object of header names to string values".into()),
        };
        if raw.len() > MAX_HEADERS {
            return Err(format!("headers: at most {MAX_HEADERS} custom headers are allowed, got {}", raw.len()));
        }
        let mut headers = BTreeMap::new();
        for (name, value) in raw {
            let shown = crate::domain::truncate(name, 64);
            if name.is_empty() || !name.bytes().all(is_tchar) {
                return Err(format!(
                    "headers: {shown:?} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
                ));
            }
            let lower = name.to_ascii_lowercase();
            if RESERVED.contains(&lower.as_str()) {
                return Err(format!("headers: {shown:?} is set by jobhook itself and cannot be given"));
            }
            if RESERVED_PREFIXES.iter().any(|p| lower.starts_with(p)) {
                return Err(format!(
                    "headers: {shown:?} is refused: names starting with \"webhook-\" or \"jobhook-\" are jobhook's own"
                ));
            }
            let Some(value) = value.as_str() else {
                return Err(format!("headers: the value of {shown:?} must be a string"));
            };
            if !valid_value(value) {
                return Err(format!(
                    "headers: the value of {shown:?} must be at most {MAX_VALUE_BYTES} bytes of visible ASCII \
                     (spaces allowed inside, not at either end); it is not repeated here"
                ));
            }
            if headers.insert(lower, value.to_owned()).is_some() {
                return Err(format!("headers: {shown:?} is given twice (header names are case-insensitive)"));
            }
        }
        Ok(CallbackHeaders(headers))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names, lower case, sorted.
    pub fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }

    /// The headers, to send.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// How the store keeps them: a JSON object, or `None` when there are none.
    pub fn to_stored(&self) -> Option<String> {
        (!self.is_empty()).then(|| serde_json::to_string(&self.0).expect("a map of strings serialises"))
    }

    /// Reads what [`CallbackHeaders::to_stored`] wrote (`None`: no headers). The error does not quote it.
    pub fn from_stored(stored: Option<&str>) -> Result<Self, String> {
        match stored {
            None => Ok(CallbackHeaders::default()),
            Some(json) => serde_json::from_str(json).map(CallbackHeaders).map_err(|e| {
                format!("stored callback headers are not a JSON object of strings (at column {})", e.column())
            }),
        }
    }

    /// The names of a stored set, without keeping the values (for the API's views).
    pub fn stored_names(stored: Option<&str>) -> Result<Vec<String>, String> {
        Self::from_stored(stored).map(|h| h.names())
    }

    /// SHA-256 (hex) over names and values, for the idempotency comparison; `None` when there are none.
    /// Not keyed: the values themselves are stored beside it (they must be sent), so it reveals nothing
    /// the row does not already hold.
    pub fn digest(&self) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let mut hash = Sha256::new();
        for (name, value) in &self.0 {
            // Names cannot hold NUL or ':' and values cannot hold NUL: the encoding is unambiguous.
            hash.update(name.as_bytes());
            hash.update(b":");
            hash.update(value.as_bytes());
            hash.update(b"\0");
        }
        Some(format!("{:x}", hash.finalize()))
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Visible ASCII and spaces, at most [`MAX_VALUE_BYTES`], no space at either end (HTTP would strip it,
/// so the receiver would get another value than the one registered).
fn valid_value(v: &str) -> bool {
    v.len() <= MAX_VALUE_BYTES
        && v.bytes().all(|b| (0x20..=0x7e).contains(&b))
        && !v.starts_with(' ')
        && !v.ends_with(' ')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: serde_json::Value) -> Result<CallbackHeaders, String> {
        CallbackHeaders::from_request(Some(&v))
    }

    #[test]
    fn names_are_case_insensitive_and_values_kept_as_given() {
        let h = parse(json!({"Authorization": "Bearer abc", "X-Tenant": "7"})).unwrap();
        assert_eq!(h.names(), ["authorization", "x-tenant"]);
        assert_eq!(h.iter().collect::<Vec<_>>(), [("authorization", "Bearer abc"), ("x-tenant", "7")]);
        assert_eq!(CallbackHeaders::from_stored(h.to_stored().as_deref()).unwrap(), h);
        assert_eq!(parse(json!({"x-tenant": "7", "AUTHORIZATION": "Bearer abc"})).unwrap().digest(), h.digest());
        assert_ne!(parse(json!({"Authorization": "Bearer abd", "X-Tenant": "7"})).unwrap().digest(), h.digest());
        assert_eq!(CallbackHeaders::default().digest(), None);
        assert_eq!(CallbackHeaders::default().to_stored(), None);
    }

    #[test]
    fn reserved_and_malformed_headers_are_refused_by_name_without_their_value() {
        for name in
            ["Host", "content-length", "Content-Type", "Transfer-Encoding", "CONNECTION", "Webhook-Id", "webhook-x"]
        {
            let err = parse(json!({ name: "s3cret-value" })).unwrap_err();
            assert!(err.contains(name), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        for bad in [json!({"x a": "1"}), json!({"": "1"}), json!({"x-é": "1"})] {
            assert!(parse(bad).unwrap_err().contains("not a valid header name"));
        }
        for value in
            [json!("line\nbreak-s3cret"), json!("é-s3cret"), json!(" s3cret"), json!("x".repeat(1025)), json!(7)]
        {
            let err = parse(json!({ "X-Key": value })).unwrap_err();
            assert!(err.contains("X-Key") && !err.contains("s3cret") && !err.contains("xxxx"), "{err}");
        }
        assert!(parse(json!({"X-Key": "x".repeat(1024)})).is_ok());
        assert!(parse(json!({"x-a": "1", "X-A": "2"})).unwrap_err().contains("twice"));
        let eleven: serde_json::Map<_, _> = (0..11).map(|i| (format!("x-{i}"), json!("v"))).collect();
        assert!(parse(eleven.into()).unwrap_err().contains("at most 10"));
        let err = parse(json!("Bearer s3cret")).unwrap_err();
        assert!(err.contains("JSON object") && !err.contains("s3cret"), "{err}");
        assert_eq!(parse(json!(null)), Ok(CallbackHeaders::default()));
    }

    #[test]
    fn debug_shows_names_only() {
        let h = parse(json!({"Authorization": "Bearer s3cret"})).unwrap();
        let shown = format!("{h:?}");
        assert!(shown.contains("authorization") && !shown.contains("s3cret"), "{shown}");
    }
}
