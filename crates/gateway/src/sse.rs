//! Server-Sent Events bodies: a task writes framed events into a bounded
//! channel, the response body reads them. A client that goes away drops
//! the body and with it the receiver, so the writer's next send fails and
//! it stops: nothing is produced for nobody.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

/// Events buffered between a writer and a slow reader; a full buffer makes
/// the writer wait.
pub(crate) const BUFFER: usize = 16;

/// The receiving half as a body stream.
struct Chunks(mpsc::Receiver<Bytes>);

impl futures_core::Stream for Chunks {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(Ok))
    }
}

/// A `text/event-stream` response reading from a new channel, and the
/// channel's sending half for the writer.
pub(crate) fn channel() -> (mpsc::Sender<Bytes>, Response) {
    let (tx, rx) = mpsc::channel(BUFFER);
    let mut response = (StatusCode::OK, Body::from_stream(Chunks(rx))).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Proxies that buffer responses (nginx) pass this one through as it comes.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    (tx, response)
}

/// One event: optional `id:` and `event:` lines and the `data:` of `data`
/// (one `data:` line per line of it, as the format requires).
pub(crate) fn event(id: Option<&str>, name: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 64);
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(&one_line(id));
        out.push('\n');
    }
    if let Some(name) = name {
        out.push_str("event: ");
        out.push_str(&one_line(name));
        out.push('\n');
    }
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line.trim_end_matches('\r'));
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// A comment line: keeps an idle stream open through proxies.
pub(crate) fn heartbeat() -> Bytes {
    Bytes::from_static(b": keep-alive\n\n")
}

fn one_line(s: &str) -> String {
    s.chars().filter(|c| *c != '\n' && *c != '\r').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_lines_are_split_and_fields_cannot_inject_lines() {
        let e = event(Some("7\nevent: x"), Some("message"), "a\nb");
        assert_eq!(
            &e[..],
            b"id: 7event: x\nevent: message\ndata: a\ndata: b\n\n".as_slice()
        );
    }
}
