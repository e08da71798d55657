//! Server-Sent Events, as MCP's Streamable HTTP uses them.
//!
//! A stream is UTF-8 text split into lines (ended by `\r\n`, `\n` or `\r`).
//! `field: value` lines build an event — `event` names it, `data` lines
//! are joined with `\n`, `id` sets the last event id, `retry` is ignored —
//! and a blank line ends it. Lines starting with `:` are comments (keep-
//! alives). MCP sends each JSON-RPC message as one event whose `data` is
//! the message; an event without `data` is dropped, as the SSE standard
//! says.
//!
//! [`Decoder`] takes bytes in chunks as they arrive and never buffers more
//! than its limit: an event (or a single line) over it is an error, so a
//! peer cannot grow memory without bound by never ending an event.

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event` field (`"message"` when absent).
    pub event: Option<String>,
    /// The `data` lines, joined with `\n`.
    pub data: String,
    /// The `id` field, if any.
    pub id: Option<String>,
}

/// An event or line over the decoder's limit, or bytes that are not UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// Over the limit.
    #[error("an SSE event exceeds {0} bytes")]
    TooLarge(usize),
    /// Not UTF-8.
    #[error("an SSE line is not UTF-8")]
    NotUtf8,
}

/// An incremental SSE decoder with a size bound.
#[derive(Debug)]
pub struct Decoder {
    limit: usize,
    line: Vec<u8>,
    /// The last byte fed was `\r`: a following `\n` belongs to it.
    after_cr: bool,
    current: Event,
    has_data: bool,
    size: usize,
}

impl Decoder {
    /// A decoder that refuses any event or line over `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            line: Vec::new(),
            after_cr: false,
            current: Event::default(),
            has_data: false,
            size: 0,
        }
    }

    /// Feeds bytes; returns the events they completed, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Event>, SseError> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.line_done(&line)? {
                        out.push(event);
                    }
                }
                _ => {
                    if self.line.len() >= self.limit {
                        return Err(SseError::TooLarge(self.limit));
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(out)
    }

    fn line_done(&mut self, line: &[u8]) -> Result<Option<Event>, SseError> {
        if line.is_empty() {
            let event = std::mem::take(&mut self.current);
            let had = std::mem::replace(&mut self.has_data, false);
            self.size = 0;
            return Ok(had.then_some(event));
        }
        if line.first() == Some(&b':') {
            return Ok(None);
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        self.size = self.size.saturating_add(value.len()).saturating_add(1);
        if self.size > self.limit {
            return Err(SseError::TooLarge(self.limit));
        }
        match field {
            "event" => self.current.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            // An id with NUL is ignored, as the standard says.
            "id" if !value.contains('\0') => self.current.id = Some(value.to_owned()),
            _ => {}
        }
        Ok(None)
    }
}

/// Writes one `message` event carrying `data` (a JSON text, which has no
/// raw newlines when compact; any that are present become extra `data`
/// lines, which a reader joins back).
pub fn encode(data: &str, id: Option<&str>) -> String {
    let mut out = String::with_capacity(data.len() + 32);
    out.push_str("event: message\n");
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line.strip_suffix('\r').unwrap_or(line));
        out.push('\n');
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn events_split_across_chunks_and_line_endings() {
        let stream = b"event: message\r\ndata: {\"a\":1}\r\n\r\n: keepalive\n\ndata: x\rdata: y\r\rid: 9\ndata:z\n\n";
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            let mut d = Decoder::new(1024);
            let mut got = d.feed(a).unwrap();
            got.extend(d.feed(b).unwrap());
            assert_eq!(got.len(), 3, "split at {split}");
            assert_eq!(got[0].data, "{\"a\":1}");
            assert_eq!(got[0].event.as_deref(), Some("message"));
            assert_eq!(got[1].data, "x\ny");
            assert_eq!(got[2].data, "z");
            assert_eq!(got[2].id.as_deref(), Some("9"));
        }
    }

    #[test]
    fn encode_decodes_back() {
        let mut d = Decoder::new(1024);
        let got = d
            .feed(encode("line1\nline2", Some("4")).as_bytes())
            .unwrap();
        assert_eq!(got[0].data, "line1\nline2");
        assert_eq!(got[0].id.as_deref(), Some("4"));
    }

    #[test]
    fn oversized_events_and_lines_are_refused() {
        let mut d = Decoder::new(16);
        assert!(d.feed(&[b'a'; 17]).is_err());
        let mut d = Decoder::new(16);
        assert!(d.feed(b"data: 0123456789\ndata: 0123456789\n").is_err());
        let mut d = Decoder::new(16);
        assert_eq!(d.feed(b"data: \xff\n"), Err(SseError::NotUtf8));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(chunks in proptest::collection::vec(
            proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..8)) {
            let mut d = Decoder::new(128);
            for c in chunks {
                if d.feed(&c).is_err() { break; }
            }
        }
    }
}
