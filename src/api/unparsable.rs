//! Requests too malformed to reach the router still get a problem+json answer.
//!
//! hyper answers a request it cannot parse — a target with characters a URI may not hold, such as the
//! `<id>` of a path pasted from the README as written; a bad method, version or header; a target or
//! headers too long — by itself, before any of our code runs, with a bare status and an empty body, and
//! it offers no hook to change that answer. So each connection's writes pass through [`ProblemIo`],
//! which recognises that one automatic answer (an error status, `content-length: 0`, no content type,
//! the whole head in one write) and sends a problem document in its place. hyper closes the connection
//! after it, so the new length and `connection: close` are safe. Nothing our handlers send matches:
//! every error they return carries a problem body.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::error::Problem;

/// A connection whose writes swap hyper's automatic parse-error answers for problem documents.
pub struct ProblemIo<T> {
    inner: T,
    /// The replacement answer and how much of it is written.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> ProblemIo<T> {
    pub fn new(inner: T) -> Self {
        ProblemIo { inner, pending: None }
    }
}

impl<T: AsyncWrite + Unpin> ProblemIo<T> {
    /// Writes what remains of a replacement answer.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = self.pending.as_mut() {
            if *written == bytes.len() {
                self.pending = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Stages the replacement for `head` if it is hyper's automatic answer; then `head` counts as written.
    fn replace(&mut self, cx: &mut Context<'_>, head: &[u8]) -> Option<Poll<io::Result<usize>>> {
        let replacement = problem_for(head)?;
        self.pending = Some((replacement, 0));
        Some(match self.drive(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // Accepted: what is left goes out in poll_flush / poll_shutdown.
            _ => Poll::Ready(Ok(head.len())),
        })
    }
}

/// The problem answer that replaces `head`, when `head` is a complete bodiless error head as hyper
/// writes for a request it could not parse.
fn problem_for(head: &[u8]) -> Option<Vec<u8>> {
    // Every write passes here: the status decides first, without allocating, for all other answers.
    let status = match head.strip_prefix(b"HTTP/1.1 ")?.get(..4)? {
        b"400 " => 400,
        b"414 " => 414,
        b"431 " => 431,
        _ => return None,
    };
    if !head.ends_with(b"\r\n\r\n") || head.windows(4).filter(|w| w == b"\r\n\r\n").count() != 1 {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?.to_ascii_lowercase();
    let lines: Vec<&str> = text.split("\r\n").collect();
    if !lines.contains(&"content-length: 0") || lines.iter().any(|l| l.starts_with("content-type:")) {
        return None;
    }
    let (slug, title, detail) = match status {
        400 => (
            "bad-request",
            "Bad request",
            "the request could not be parsed as HTTP: its path and query may hold only URL characters \
             (percent-encode others, such as < > and spaces; a placeholder like <id> must be replaced by \
             the real ID), and its method and headers must be well formed",
        ),
        414 => ("uri-too-long", "The request target is too long", "the path and query are too long"),
        431 => ("headers-too-large", "The request headers are too large", "the request headers are too large"),
        _ => return None,
    };
    let problem =
        Problem { kind: format!("urn:jobhook:problem:{slug}"), title: title.into(), status, detail: detail.into() };
    let body = serde_json::to_vec(&problem).ok()?;
    let original: Vec<&str> = std::str::from_utf8(head).ok()?.split("\r\n").collect();
    let status_line = original.first()?;
    let date = original
        .iter()
        .find(|l| l.to_ascii_lowercase().starts_with("date:"))
        .map(|l| format!("{l}\r\n"))
        .unwrap_or_default();
    let mut out = format!(
        "{status_line}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n{date}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

impl<T: AsyncRead + Unpin> AsyncRead for ProblemIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ProblemIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.drive(cx))?;
        if let Some(done) = self.replace(cx, buf) {
            return done;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drive(cx))?;
        // hyper's automatic answer has no body: its head is the first slice.
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && let Some(done) = self.replace(cx, first)
        {
            return done;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drive(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drive(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_bare_400_becomes_a_problem_with_its_date_kept() {
        let head = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 04:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(problem_for(head).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\n"), "{out}");
        assert!(out.contains("date: Tue, 01 Dec 2026 04:00:00 GMT\r\n\r\n{"), "{out}");
        let body: serde_json::Value = serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["status"], 400);
        let length = format!("content-length: {}\r\n", out.split("\r\n\r\n").nth(1).unwrap().len());
        assert!(out.contains(&length), "{out}");
    }

    #[test]
    fn answers_with_a_body_or_a_type_pass_unchanged() {
        for head in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-type: application/problem+json\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            b"{\"status\": \"ok\"}",
        ] {
            assert!(problem_for(head).is_none(), "{}", String::from_utf8_lossy(head));
        }
    }
}
