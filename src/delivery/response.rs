//! What a receiver answered, as much of it as we keep: its `Content-Type` and the first 2 KiB of its
//! body. Deliveries record it in the attempt log; test sends show it in their answer.
//!
//! Bounded twice: at most [`MAX_RESPONSE_BYTES`] of the body are read (then the rest is dropped with
//! the connection's remainder), and at most [`RESPONSE_SNIPPET_BYTES`] of it are kept.

use super::MAX_RESPONSE_BYTES;

/// How much of a receiver's body is kept: enough for an error message or a small JSON document.
pub const RESPONSE_SNIPPET_BYTES: usize = 2048;

/// The longest `Content-Type` kept (a real one is a few dozen bytes; a longer one is cut, marked `…`).
const MAX_CONTENT_TYPE_BYTES: usize = 256;

/// The part of an answer that is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// The answer's `Content-Type`, if it had one that is text.
    pub content_type: Option<String>,
    /// The first 2 KiB of the body, invalid UTF-8 replaced.
    pub body: String,
}

/// Reads the answer's body up to [`MAX_RESPONSE_BYTES`] (enough to reuse the connection after a short
/// answer) and keeps its content type and first [`RESPONSE_SNIPPET_BYTES`].
pub async fn capture(response: &mut reqwest::Response) -> Captured {
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| crate::domain::truncate(v, MAX_CONTENT_TYPE_BYTES));
    let mut kept = Vec::new();
    let mut read = 0;
    while read < MAX_RESPONSE_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                let room = RESPONSE_SNIPPET_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    Captured { content_type, body: snippet(&kept) }
}

/// The first [`RESPONSE_SNIPPET_BYTES`] of `body` as text: invalid UTF-8 (a character cut at the end
/// included) becomes U+FFFD, and so does NUL, which PostgreSQL's `text` cannot hold.
fn snippet(body: &[u8]) -> String {
    let body = &body[..body.len().min(RESPONSE_SNIPPET_BYTES)];
    String::from_utf8_lossy(body).replace('\0', "\u{FFFD}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snippet_keeps_the_first_2_kib_and_replaces_what_is_not_text() {
        assert_eq!(snippet(b"{\"error\":\"boom\"}"), "{\"error\":\"boom\"}");
        assert_eq!(snippet(&[b'a'; 5000]).len(), RESPONSE_SNIPPET_BYTES);
        assert_eq!(snippet(b"a\0b\xffc"), "a\u{FFFD}b\u{FFFD}c");
        let mut cut = vec![b'x'; RESPONSE_SNIPPET_BYTES - 1];
        cut.extend_from_slice("é".as_bytes());
        assert!(snippet(&cut).ends_with('\u{FFFD}'), "a character cut at 2 KiB is replaced, not kept half");
    }
}
