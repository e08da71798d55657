//! The SSE reader (`portcullis_mcp::sse::Decoder`) on arbitrary bytes, with
//! a size limit and a chunking both chosen by the input.
//!
//! The first byte picks the limit (from 0 to 4096 bytes, small ones often,
//! so the bound is hit), the second seeds the chunk sizes, the rest is the
//! stream.
//!
//! Properties checked (beyond "no panic"):
//!
//! 1. The decoder agrees with a reference reader written here from the
//!    module documentation, which reads the whole stream at once: the same
//!    events, then the same error (`TooLarge` for a line or an event over
//!    the limit, `NotUtf8`), or none.
//! 2. Chunking does not matter: fed whole, one byte at a time, or in chunks
//!    of sizes drawn from the input (empty chunks included), the decoder
//!    gives the same events in the same order, and the same first error;
//!    events completed by the chunk that fails are lost, never others.
//! 3. No event larger than the limit is ever emitted: its `data`, `event`
//!    and `id` together fit, and the reference reader refuses the stream
//!    whenever an event's fields add up to more.
//! 4. Every event read, written back with `sse::encode`, reads back as
//!    exactly one `message` event with the same data and id.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_mcp::sse::{self, Decoder, Event, SseError};

const LIMITS: [usize; 10] = [0, 1, 2, 3, 5, 8, 16, 64, 256, 4096];

/// What a reader gave: the events it emitted, then its error if any.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<Event>,
    error: Option<SseError>,
}

/// The reference reader: splits the whole stream into lines first.
fn reference(stream: &[u8], limit: usize) -> Outcome {
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < stream.len() {
        match stream[i] {
            b'\n' => {
                lines.push(&stream[start..i]);
                start = i + 1;
            }
            b'\r' => {
                lines.push(&stream[start..i]);
                if stream.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    let unfinished = &stream[start..];

    let mut events = Vec::new();
    let mut current = Event::default();
    let mut has_data = false;
    // Bytes of field values in the current event, plus one per field line.
    let mut size = 0usize;
    let fail = |events, error| Outcome {
        events,
        error: Some(error),
    };
    for line in lines {
        if line.len() > limit {
            return fail(events, SseError::TooLarge(limit));
        }
        if line.is_empty() {
            if has_data {
                events.push(std::mem::take(&mut current));
            }
            current = Event::default();
            has_data = false;
            size = 0;
            continue;
        }
        if line[0] == b':' {
            continue;
        }
        let Ok(line) = std::str::from_utf8(line) else {
            return fail(events, SseError::NotUtf8);
        };
        let (field, value) = match line.find(':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(' ').unwrap_or(value))
            }
            None => (line, ""),
        };
        size += value.len() + 1;
        if size > limit {
            return fail(events, SseError::TooLarge(limit));
        }
        match field {
            "event" => current.event = Some(value.to_owned()),
            "data" => {
                if has_data {
                    current.data.push('\n');
                }
                current.data.push_str(value);
                has_data = true;
            }
            "id" if !value.contains('\0') => current.id = Some(value.to_owned()),
            _ => {}
        }
    }
    if unfinished.len() > limit {
        return fail(events, SseError::TooLarge(limit));
    }
    Outcome {
        events,
        error: None,
    }
}

/// Feeds `chunks` in order until the first error.
fn feed<'a>(limit: usize, chunks: impl Iterator<Item = &'a [u8]>) -> Outcome {
    let mut decoder = Decoder::new(limit);
    let mut events = Vec::new();
    for chunk in chunks {
        match decoder.feed(chunk) {
            Ok(got) => events.extend(got),
            Err(error) => {
                return Outcome {
                    events,
                    error: Some(error),
                };
            }
        }
    }
    Outcome {
        events,
        error: None,
    }
}

/// Property 2 for one chunking: `got` must be what the reference gave, or,
/// when the stream fails, a prefix of it with the same error.
fn same_as(reference: &Outcome, got: &Outcome, how: &str) {
    assert_eq!(got.error, reference.error, "{how}");
    if got.error.is_none() {
        assert_eq!(got.events, reference.events, "{how}");
    } else {
        assert!(
            reference.events.starts_with(&got.events),
            "{how}: {got:?} is not a prefix of {reference:?}"
        );
    }
}

/// Chunk sizes from 0 to 16 drawn from `seed`, covering `stream`.
fn chunks(stream: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = u32::from(seed) | 0x100;
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let size = ((state >> 16) % 17) as usize;
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        out.push(chunk);
        rest = tail;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [pick, seed, stream @ ..] = data else {
        return;
    };
    let limit = LIMITS[usize::from(*pick) % LIMITS.len()];
    let expected = reference(stream, limit);

    // Property 1: whole.
    let whole = Decoder::new(limit).feed(stream);
    match &whole {
        Ok(events) => {
            assert_eq!(
                expected.error, None,
                "the reference refuses what the decoder read"
            );
            assert_eq!(events, &expected.events);
        }
        Err(error) => assert_eq!(Some(error), expected.error.as_ref()),
    }

    // Property 2: byte by byte, and in drawn chunks (with the whole stream
    // once more at the end, as an empty final feed).
    let bytes = feed(limit, stream.chunks(1));
    same_as(&expected, &bytes, "byte by byte");
    if expected.error.is_some() {
        // Byte by byte, only the events of the failing byte's feed are lost,
        // and it completes none: everything before the error was emitted.
        assert_eq!(bytes.events, expected.events, "byte by byte");
    }
    let drawn = chunks(stream, *seed);
    let chunked = feed(limit, drawn.iter().copied().chain([&[][..]]));
    same_as(
        &expected,
        &chunked,
        &format!(
            "chunks {:?}",
            drawn.iter().map(|c| c.len()).collect::<Vec<_>>()
        ),
    );

    // Property 3.
    for event in &expected.events {
        let size = event.data.len()
            + event.event.as_ref().map_or(0, String::len)
            + event.id.as_ref().map_or(0, String::len);
        assert!(
            size <= limit,
            "an event of {size} bytes under a limit of {limit}"
        );
    }

    // Property 4.
    for event in &expected.events {
        let text = sse::encode(&event.data, event.id.as_deref());
        let back = Decoder::new(usize::MAX).feed(text.as_bytes()).unwrap();
        assert_eq!(
            back,
            [Event {
                event: Some("message".into()),
                data: event.data.clone(),
                id: event.id.clone(),
            }]
        );
    }
});
