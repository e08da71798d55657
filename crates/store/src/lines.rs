//! The lines of the audit log's files — an export (`audit export`), the
//! JSON Lines mirror, a decompressed archive segment file, a witness file
//! — written and read in exactly one form each (`docs/audit-format.md`,
//! "Lines"). Every writer of those files calls the encoders here and every
//! verifier calls [`parse_line`], so what is accepted is what is written,
//! byte for byte, and nothing else.
//!
//! # The three kinds of line
//!
//! * a **record**: its canonical JSON, `hash` included, exactly as
//!   [`chain::encode`](crate::chain::encode) writes it;
//! * a **checkpoint**: `{"checkpoint":{"seq":S,"hash":"H","ts":T,"kid":"K","sig":"G"}}`,
//!   members in that order ([`checkpoint_line`]);
//! * a **segment header**, only as the first line of a segment file:
//!   `{"segment":{"format":"portcullis-audit-segment-v1","first_seq":F,"last_seq":L,"records":N,"last_ts":T}}`
//!   ([`segment_line`]).
//!
//! # Why byte equality
//!
//! A reader that accepts more than the writer produces gives an attacker
//! room: a line that two JSON parsers read differently (a repeated key:
//! `serde_json` keeps the last, others the first or refuse), a copied
//! checkpoint with a member of its own that one reader ignores, a line that
//! is skipped because of how it starts. So a line is parsed (a repeated key
//! at any depth is refused, not resolved), decoded into its type, encoded
//! again, and must give back the line's exact bytes. Whatever the type has
//! no place for — an unknown member, a `null`, an empty `policy_ids`, other
//! spacing or member order — makes the bytes differ.
//!
//! Lines are bounded by their readers (16 MiB in the gateway's); nesting is
//! bounded by `serde_json`'s recursion limit (128).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::canonical::write_string;
use crate::{AuditEvent, Checkpoint, chain};

/// The `format` of a segment file's header line.
pub const SEGMENT_FORMAT: &str = "portcullis-audit-segment-v1";

/// The members of a checkpoint, in the order its line writes them.
const CHECKPOINT_MEMBERS: [&str; 5] = ["seq", "hash", "ts", "kid", "sig"];
/// The members of a segment header, in the order its line writes them.
const HEADER_MEMBERS: [&str; 5] = ["format", "first_seq", "last_seq", "records", "last_ts"];

/// The header line of a segment file (informative: verification relies on
/// the chain and the checkpoints, not on it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentHeader {
    /// [`SEGMENT_FORMAT`].
    pub format: String,
    /// The first record.
    pub first_seq: u64,
    /// The last record.
    pub last_seq: u64,
    /// `last_seq - first_seq + 1`.
    pub records: u64,
    /// The `ts` of the last record (the segment's age), Unix milliseconds.
    pub last_ts: u64,
}

/// One line, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// An audit record (boxed: it is several times larger than the others).
    Record(Box<AuditEvent>),
    /// A signed checkpoint.
    Checkpoint(Checkpoint),
    /// A segment file's header.
    Segment(SegmentHeader),
}

/// Which kinds of line may stand where the line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A line of an export or a mirror, or a segment file's line after the
    /// first: a record or a checkpoint.
    Log,
    /// The first line of a segment file: its header.
    SegmentStart,
    /// A line of a witness file: a checkpoint.
    Witness,
}

/// Why a line is not acceptable. The caller adds the line number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// Empty.
    #[error("the line is empty")]
    Empty,
    /// Not one JSON value, or not an object.
    #[error("not a JSON object: {0}")]
    NotJson(String),
    /// A key appears twice in one object (at any depth).
    #[error("the key {0:?} appears twice in one object")]
    DuplicateKey(String),
    /// A member that the kind of line does not have (or writes as absent:
    /// a `null`, an empty `policy_ids`).
    #[error("the {kind} has a member {member:?} that the format does not write")]
    UnknownMember {
        /// What the line is.
        kind: &'static str,
        /// The member.
        member: String,
    },
    /// The line does not decode as its kind.
    #[error("not a valid {kind}: {why}")]
    Invalid {
        /// What the line is.
        kind: &'static str,
        /// Why.
        why: String,
    },
    /// It decodes, but its bytes are not the ones the gateway writes for it.
    #[error(
        "the {0} is not written in its exact form (spacing, member order, number or string \
         escapes differ from the gateway's)"
    )]
    NotExact(&'static str),
    /// A kind of line that cannot stand here.
    #[error("{what}")]
    Misplaced {
        /// What and where.
        what: &'static str,
    },
}

/// The exact line of a checkpoint: `{"checkpoint":{"seq":…,"hash":…,"ts":…,"kid":…,"sig":…}}`.
pub fn checkpoint_line(c: &Checkpoint) -> String {
    let mut out = String::with_capacity(64 + c.hash.len() + c.kid.len() + c.sig.len());
    let _ = write!(out, "{{\"checkpoint\":{{\"seq\":{},\"hash\":", c.seq);
    write_string(&mut out, &c.hash);
    let _ = write!(out, ",\"ts\":{},\"kid\":", c.ts.0);
    write_string(&mut out, &c.kid);
    out.push_str(",\"sig\":");
    write_string(&mut out, &c.sig);
    out.push_str("}}");
    out
}

/// The exact header line of a segment file.
pub fn segment_line(h: &SegmentHeader) -> String {
    let mut out = String::from("{\"segment\":{\"format\":");
    write_string(&mut out, &h.format);
    let _ = write!(
        out,
        ",\"first_seq\":{},\"last_seq\":{},\"records\":{},\"last_ts\":{}}}}}",
        h.first_seq, h.last_seq, h.records, h.last_ts
    );
    out
}

/// Reads one line (without its newline) that stands at `place`.
pub fn parse_line(text: &str, place: Place) -> Result<Line, LineError> {
    if text.is_empty() {
        return Err(LineError::Empty);
    }
    let Value::Object(map) = parse_strict(text)? else {
        return Err(LineError::NotJson("not an object".into()));
    };
    let tagged = |tag: &str| map.contains_key(tag);
    if tagged("checkpoint") {
        let inner = sole_member(map, "checkpoint", "checkpoint line")?;
        let checkpoint = decode_checkpoint(inner)?;
        if checkpoint_line(&checkpoint) != text {
            return Err(LineError::NotExact("checkpoint line"));
        }
        if place == Place::SegmentStart {
            return Err(LineError::Misplaced {
                what: "a segment file must start with its header, not a checkpoint",
            });
        }
        return Ok(Line::Checkpoint(checkpoint));
    }
    if tagged("segment") {
        if place != Place::SegmentStart {
            return Err(LineError::Misplaced {
                what: "a segment header may only be the first line of a segment file",
            });
        }
        let inner = sole_member(map, "segment", "segment header")?;
        let header = decode_header(inner)?;
        if segment_line(&header) != text {
            return Err(LineError::NotExact("segment header"));
        }
        return Ok(Line::Segment(header));
    }
    match place {
        Place::Log => {}
        Place::SegmentStart => {
            return Err(LineError::Misplaced {
                what: "a segment file must start with its header, not a record",
            });
        }
        Place::Witness => {
            return Err(LineError::Misplaced {
                what: "a witness file holds checkpoint lines only",
            });
        }
    }
    let keys: Vec<String> = map.keys().cloned().collect();
    let record: AuditEvent =
        serde_json::from_value(Value::Object(map)).map_err(|e| LineError::Invalid {
            kind: "record",
            why: e.to_string(),
        })?;
    let exact = chain::encode(&record);
    if exact != text {
        // Name a member the record has no place for, if that is why.
        if let Ok(Value::Object(written)) = serde_json::from_str::<Value>(&exact)
            && let Some(member) = keys.into_iter().find(|k| !written.contains_key(k))
        {
            return Err(LineError::UnknownMember {
                kind: "record",
                member,
            });
        }
        return Err(LineError::NotExact("record"));
    }
    Ok(Line::Record(Box::new(record)))
}

/// The value of `map`'s one member `tag`; any other member is unknown.
fn sole_member(map: Map<String, Value>, tag: &str, kind: &'static str) -> Result<Value, LineError> {
    let mut inner = None;
    for (key, value) in map {
        if key == tag {
            inner = Some(value);
        } else {
            return Err(LineError::UnknownMember { kind, member: key });
        }
    }
    inner.ok_or(LineError::Invalid {
        kind,
        why: format!("no {tag:?} member"),
    })
}

/// `value` as an object with exactly the members `names`.
fn exact_members(value: &Value, names: &[&str], kind: &'static str) -> Result<(), LineError> {
    let Value::Object(map) = value else {
        return Err(LineError::Invalid {
            kind,
            why: "not an object".into(),
        });
    };
    if let Some(member) = map.keys().find(|k| !names.contains(&k.as_str())) {
        return Err(LineError::UnknownMember {
            kind,
            member: member.clone(),
        });
    }
    let have: BTreeSet<&str> = map.keys().map(String::as_str).collect();
    if let Some(missing) = names.iter().find(|n| !have.contains(*n)) {
        return Err(LineError::Invalid {
            kind,
            why: format!("no {missing:?} member"),
        });
    }
    Ok(())
}

fn decode_checkpoint(value: Value) -> Result<Checkpoint, LineError> {
    const KIND: &str = "checkpoint";
    exact_members(&value, &CHECKPOINT_MEMBERS, KIND)?;
    serde_json::from_value(value).map_err(|e| LineError::Invalid {
        kind: KIND,
        why: e.to_string(),
    })
}

fn decode_header(value: Value) -> Result<SegmentHeader, LineError> {
    const KIND: &str = "segment header";
    exact_members(&value, &HEADER_MEMBERS, KIND)?;
    let header: SegmentHeader = serde_json::from_value(value).map_err(|e| LineError::Invalid {
        kind: KIND,
        why: e.to_string(),
    })?;
    if header.format != SEGMENT_FORMAT {
        return Err(LineError::Invalid {
            kind: KIND,
            why: format!("unknown format {:?}", header.format),
        });
    }
    Ok(header)
}

/// Parses exactly one JSON value, refusing a repeated key in any object.
fn parse_strict(text: &str) -> Result<Value, LineError> {
    let duplicate = RefCell::new(None);
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let parsed = Strict {
        duplicate: &duplicate,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value));
    match parsed {
        Ok(value) => Ok(value),
        Err(e) => Err(match duplicate.into_inner() {
            Some(key) => LineError::DuplicateKey(key),
            None => LineError::NotJson(e.to_string()),
        }),
    }
}

/// A JSON value built as `serde_json`'s own [`Value`] is, except that a
/// repeated key is an error (noted in `duplicate`) instead of last-wins.
#[derive(Clone, Copy)]
struct Strict<'a> {
    duplicate: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(self)?;
            if object.contains_key(&key) {
                *self.duplicate.borrow_mut() = Some(key);
                return Err(de::Error::custom("duplicate key"));
            }
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {

    use portcullis_core::Timestamp;

    use super::*;
    use crate::{EventKind, NewEvent};

    fn record() -> AuditEvent {
        let mut event = NewEvent::new(Timestamp(5), EventKind::CallAllowed);
        event.tool = Some("warehouse.query".into());
        event.args = Some(serde_json::json!({"sql": "select 1", "n": 1.5}));
        let mut record = AuditEvent {
            seq: 1,
            event,
            prev_hash: chain::GENESIS.into(),
            hash: String::new(),
        };
        chain::seal(&mut record);
        record
    }

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            seq: 1,
            hash: "ab".repeat(32),
            ts: Timestamp(9),
            kid: "k1".into(),
            sig: "c2ln".into(),
        }
    }

    #[test]
    fn what_is_written_reads_back() {
        let r = record();
        assert_eq!(
            parse_line(&chain::encode(&r), Place::Log),
            Ok(Line::Record(Box::new(r)))
        );
        let c = checkpoint();
        let line = checkpoint_line(&c);
        assert_eq!(
            line,
            format!(
                r#"{{"checkpoint":{{"seq":1,"hash":"{}","ts":9,"kid":"k1","sig":"c2ln"}}}}"#,
                "ab".repeat(32)
            )
        );
        // The form `serde_json` gives the struct (member order kept), as
        // earlier writers wrote it.
        let mut old = Map::new();
        old.insert("checkpoint".into(), serde_json::to_value(&c).unwrap());
        if serde_json::to_string(&c).unwrap().starts_with("{\"seq\"") {
            assert_eq!(Value::Object(old).to_string(), line);
        }
        assert_eq!(
            parse_line(&line, Place::Log),
            Ok(Line::Checkpoint(c.clone()))
        );
        assert_eq!(parse_line(&line, Place::Witness), Ok(Line::Checkpoint(c)));
        let h = SegmentHeader {
            format: SEGMENT_FORMAT.into(),
            first_seq: 1,
            last_seq: 2,
            records: 2,
            last_ts: 7,
        };
        let line = segment_line(&h);
        assert_eq!(
            line,
            r#"{"segment":{"format":"portcullis-audit-segment-v1","first_seq":1,"last_seq":2,"records":2,"last_ts":7}}"#
        );
        assert_eq!(parse_line(&line, Place::SegmentStart), Ok(Line::Segment(h)));
    }

    #[test]
    fn anything_else_is_refused() {
        let text = chain::encode(&record());
        let header = r#"{"segment":{"format":"portcullis-audit-segment-v1","first_seq":1,"last_seq":2,"records":2,"last_ts":7}}"#;
        let cp = checkpoint_line(&checkpoint());
        let cases: Vec<(String, Place)> = vec![
            (String::new(), Place::Log),
            ("not json".into(), Place::Log),
            ("[1]".into(), Place::Log),
            (format!("{text} "), Place::Log),
            (text.replacen('{', "{\"tool\":\"x\",", 1), Place::Log),
            (text.replacen('{', "{\"extra\":1,", 1), Place::Log),
            (text.replacen('{', "{\"agent_id\":null,", 1), Place::Log),
            (text.replacen(':', ": ", 1), Place::Log),
            (text.clone(), Place::Witness),
            (text.clone(), Place::SegmentStart),
            (header.into(), Place::Log),
            (header.into(), Place::Witness),
            (r#"{"segment":"x"}"#.into(), Place::SegmentStart),
            (
                cp.replacen("\"seq\":1,", "\"seq\":1,\"seq\":1,", 1),
                Place::Log,
            ),
            (cp.replacen("{\"seq\"", "{\"x\":0,\"seq\"", 1), Place::Log),
            (format!("{},\"x\":0}}", &cp[..cp.len() - 1]), Place::Log),
            (cp.replacen("\"ts\":9,", "", 1), Place::Log),
            (cp.replacen("\"ts\":9", "\"ts\":9.0", 1), Place::Log),
            (cp.clone(), Place::SegmentStart),
        ];
        for (line, place) in cases {
            assert!(parse_line(&line, place).is_err(), "{line} at {place:?}");
        }
        assert_eq!(
            parse_line(&text.replacen('{', "{\"tool\":\"x\",", 1), Place::Log),
            Err(LineError::DuplicateKey("tool".into()))
        );
        assert_eq!(
            parse_line(&text.replacen('{', "{\"extra\":1,", 1), Place::Log),
            Err(LineError::UnknownMember {
                kind: "record",
                member: "extra".into()
            })
        );
        // A repeated key deep inside the arguments.
        let deep = text.replacen("\"n\":1.5", "\"n\":1.5,\"n\":2", 1);
        assert_ne!(deep, text);
        assert_eq!(
            parse_line(&deep, Place::Log),
            Err(LineError::DuplicateKey("n".into()))
        );
    }
}
