//! The audit hash chain (`docs/audit-format.md`, "Hashes" and "What
//! `audit verify` proves"): computing a record's hash, and a pure verifier
//! that walks records in order, one at a time, against signed checkpoints.
//!
//! ```text
//! hash = lowercase_hex( SHA-256( prev_hash_ascii ‖ canonical_json(record without "hash") ) )
//! ```
//!
//! The verifier holds one record at a time (plus the checkpoints), so it
//! checks a log of any length: feed it from a database cursor, from pages of
//! [`Store::audit`](crate::Store::audit) (`since_seq` = the last seq of the
//! previous page), or from the lines of a JSON Lines export.
//!
//! # What the verifier checks
//!
//! Records must come in log order. For each one:
//!
//! 1. its `seq` is the previous record's plus one, and the first record's is
//!    1 — or, for a log whose oldest records were archived or dropped
//!    (tiering), the first record's `seq` is `a + 1` where a checkpoint of
//!    seq `a` exists: the walk is *anchored* there and the first record's
//!    `prev_hash` must be that checkpoint's `hash` — else the problem is
//!    reported at the seq that was expected: a deleted record `k` is
//!    reported as `k`;
//! 2. its `hash` is the hash of its content — else reported at its `seq`
//!    (an edit of any field, `seq` and `prev_hash` included);
//! 3. its `prev_hash` is the previous record's `hash` ([`GENESIS`] for the
//!    first) — else reported at its `seq`;
//! 4. every checkpoint at its `seq` has its `hash` — else reported at that
//!    `seq` (the log was rewritten up to there, hashes recomputed).
//!
//! At the end ([`Verifier::finish`]) every checkpoint's signature is
//! checked with the caller's function, and a log that ends before the seq
//! of a validly signed checkpoint is truncated (reported at the first
//! missing seq). An anchored walk also needs the log to say why it starts
//! late: a tiering record (`audit.archived` or `audit.dropped`; only
//! `audit.dropped` for an archive, see [`Verifier::archive`]) whose
//! `args.through_seq` is the anchor, itself covered by a validly signed
//! checkpoint — else the problem is reported at the anchor's seq plus one.
//! Cutting records off the front of a log therefore needs a forged,
//! signed record, like any other edit. The report names the problem with the lowest seq; the walk
//! stops at the first bad record, so nothing after it is checked.
//!
//! What no verifier can see: records after the newest checkpoint can be cut
//! off, or replaced by a re-hashed chain of the attacker's choosing, without
//! trace — the chain has no secret, anyone can extend it. The checkpoint
//! interval bounds that window; [`Report::uncovered`] says how many records
//! are in it.
//!
//! # Typed and raw records
//!
//! [`Verifier::push`] takes an [`AuditEvent`] and hashes it as it
//! serializes. [`Verifier::push_json`] takes the record as parsed JSON and
//! hashes exactly the members it has, so it also catches what decoding into
//! an [`AuditEvent`] would drop or normalize (an added member, a `null`
//! field, an empty `policy_ids`). Use it for exported files.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::canonical::{RecordText, canonical_object_without};
use crate::{AuditEvent, Checkpoint};

/// The `prev_hash` of the first record: 64 `0`s.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of `record` as the format defines it, from its `prev_hash` and
/// every other field; its own `hash` field is ignored. The canonical JSON
/// is written straight from the typed fields (the same bytes as the JSON
/// value would give, see [`json_record_hash`]).
pub fn record_hash(record: &AuditEvent) -> String {
    let text = RecordText::new(record);
    hash_hex(&record.prev_hash, &text.text)
}

/// Sets `record.hash` and returns the record as the stores keep it: its
/// canonical JSON, `hash` included (one serialization for the hash and the
/// stored text).
pub fn seal(record: &mut AuditEvent) -> String {
    let text = RecordText::new(record);
    record.hash = hash_hex(&record.prev_hash, &text.text);
    text.with_hash(&record.hash)
}

/// A record as [`seal`] stores it and exports print it: the canonical JSON
/// of the whole record, its `hash` as it is (not recomputed).
pub fn encode(record: &AuditEvent) -> String {
    RecordText::new(record).with_hash(&record.hash)
}

/// The hash of a record given as a JSON object: its `prev_hash` member and
/// the canonical JSON of every member except `hash`. An error when
/// `prev_hash` is missing or not a string.
pub fn json_record_hash(record: &Map<String, Value>) -> Result<String, String> {
    match record.get("prev_hash") {
        Some(Value::String(prev_hash)) => Ok(hash_hex(
            prev_hash,
            &canonical_object_without(record, "hash"),
        )),
        Some(_) => Err("prev_hash is not a string".into()),
        None => Err("the record has no prev_hash".into()),
    }
}

/// Lowercase hex SHA-256 of `prev_hash` followed by `canonical`.
fn hash_hex(prev_hash: &str, canonical: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(canonical.as_bytes());
    let digest = hasher.finalize();
    let mut hex = String::with_capacity(64);
    for byte in digest {
        for nibble in [byte >> 4, byte & 0xf] {
            hex.push(char::from(
                HEX.get(usize::from(nibble)).copied().unwrap_or(b'0'),
            ));
        }
    }
    hex
}

/// The first thing wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: the seq of the bad record, of the missing record (a deletion,
    /// a truncation), or of the bad checkpoint.
    pub seq: u64,
    /// What, in words.
    pub what: String,
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Records read, up to and including the first bad one.
    pub records: u64,
    /// Checkpoints whose signature is valid and whose record was reached
    /// with their hash, below the first problem.
    pub checkpoints_verified: u64,
    /// The seq of the last good record (0 if none).
    pub last_seq: u64,
    /// The seq of the checkpoint the walk was anchored at (0: the log was
    /// read from seq 1). Records up to it were archived or dropped.
    pub anchor: u64,
    /// The record that says why the log starts after [`anchor`](Self::anchor),
    /// if one was found.
    pub floor_declared_at: Option<u64>,
    /// Records after the newest verified checkpoint (all of them if none
    /// verified): the window a truncation or a rewrite can hide in. 0 when a
    /// problem was found.
    pub uncovered: u64,
    /// The problem with the lowest seq, if any; `None` means the log is
    /// intact as far as its checkpoints can tell.
    pub first_bad: Option<Problem>,
}

impl Report {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Verifies a whole log: `records` in log order, checked against
/// `checkpoints` (any order), each checkpoint's signature checked with
/// `check_sig` (which should verify [`sig`](Checkpoint::sig) over
/// [`checkpoint_message`](crate::checkpoint_message) with the key `kid`).
///
/// An `Err` item is a record that could not be read; it is the problem, at
/// the seq expected there. Reading stops at the first problem.
pub fn verify(
    records: impl Iterator<Item = Result<AuditEvent, String>>,
    checkpoints: &[Checkpoint],
    check_sig: &dyn Fn(&Checkpoint) -> bool,
) -> Report {
    let mut verifier = Verifier::new(checkpoints);
    for record in records {
        if !verifier.push(record) {
            break;
        }
    }
    verifier.finish(check_sig)
}

/// [`verify`] over records given as parsed JSON objects (e.g. the lines of
/// an export), hashing exactly the members each has.
pub fn verify_json(
    records: impl Iterator<Item = Result<Value, String>>,
    checkpoints: &[Checkpoint],
    check_sig: &dyn Fn(&Checkpoint) -> bool,
) -> Report {
    let mut verifier = Verifier::new(checkpoints);
    for record in records {
        if !verifier.push_json(record) {
            break;
        }
    }
    verifier.finish(check_sig)
}

/// The streaming verifier behind [`verify`]: push records in log order,
/// then [`finish`](Self::finish). Holds the checkpoints and the last
/// record's seq and hash, nothing more.
#[derive(Debug)]
pub struct Verifier<'a> {
    /// Sorted by seq (stable).
    checkpoints: Vec<&'a Checkpoint>,
    /// `checkpoints[..reached]` were compared with their record.
    reached: usize,
    records: u64,
    /// The last good record's seq and hash.
    last: Option<(u64, String)>,
    problem: Option<WalkProblem>,
    floor: Floor,
    /// The seq of the checkpoint an anchored walk starts after.
    anchor: Option<u64>,
    /// The first record that says why the log starts after `anchor`.
    declared_at: Option<u64>,
}

/// Which tiering records may say why an anchored log starts late.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Floor {
    /// The store or an export of it: `audit.archived` (moved to the
    /// archive) or `audit.dropped` (deleted).
    Store,
    /// The archive: only `audit.dropped` (an `audit.archived` record says
    /// where the records went, which is here).
    Archive,
    /// Not checked (an archive verified without the store, where the
    /// record that says so may not be).
    Unchecked,
}

#[derive(Debug)]
struct WalkProblem {
    problem: Problem,
    /// The checkpoint (index into `checkpoints`) the problem is about, if
    /// it is about one: an invalid signature then explains it better.
    checkpoint: Option<usize>,
}

impl<'a> Verifier<'a> {
    /// A verifier of the store's log, or of an export of it, against
    /// `checkpoints`: from seq 1, or anchored at a checkpoint when an
    /// `audit.archived` or `audit.dropped` record says the older records
    /// went.
    pub fn new(checkpoints: &'a [Checkpoint]) -> Self {
        Self::with_floor(checkpoints, Floor::Store)
    }

    /// A verifier of the archive (followed by the store): from seq 1, or
    /// anchored at a checkpoint when an `audit.dropped` record says the
    /// older records were deleted.
    pub fn archive(checkpoints: &'a [Checkpoint]) -> Self {
        Self::with_floor(checkpoints, Floor::Archive)
    }

    /// A verifier of the archive alone, where the record that says why an
    /// anchored archive starts late may not be: the anchor is accepted on
    /// its signed checkpoint only ([`Report::anchor`] tells).
    pub fn archive_alone(checkpoints: &'a [Checkpoint]) -> Self {
        Self::with_floor(checkpoints, Floor::Unchecked)
    }

    fn with_floor(checkpoints: &'a [Checkpoint], floor: Floor) -> Self {
        let mut sorted: Vec<&Checkpoint> = checkpoints.iter().collect();
        sorted.sort_by_key(|c| c.seq);
        // The same checkpoint from two sources (an archive file and the
        // store) counts once; two different ones of one seq both stay.
        sorted.dedup_by(|a, b| a == b);
        Self {
            checkpoints: sorted,
            reached: 0,
            records: 0,
            last: None,
            problem: None,
            floor,
            anchor: None,
            declared_at: None,
        }
    }

    /// Checks the next record. Returns false once a problem was found (the
    /// record and every later one are then ignored).
    pub fn push(&mut self, record: Result<AuditEvent, String>) -> bool {
        if self.problem.is_some() {
            return false;
        }
        match record {
            Ok(record) => {
                let computed = Ok(record_hash(&record));
                let through =
                    tiering_through(record.event.kind.as_str(), record.event.args.as_ref());
                self.check(record.seq, &record.prev_hash, &record.hash, computed)
                    && self.declares(record.seq, through)
            }
            Err(why) => self.unreadable(&why),
        }
    }

    /// Checks the next record, given as a parsed JSON object: `seq`,
    /// `prev_hash` and `hash` are read from it and the hash is computed over
    /// exactly its members. Returns false once a problem was found.
    pub fn push_json(&mut self, record: Result<Value, String>) -> bool {
        if self.problem.is_some() {
            return false;
        }
        let map = match record {
            Ok(Value::Object(map)) => map,
            Ok(_) => return self.unreadable("the record is not a JSON object"),
            Err(why) => return self.unreadable(&why),
        };
        let Some(seq) = map.get("seq").and_then(Value::as_u64) else {
            return self.unreadable("the record has no integer seq");
        };
        let field = |name: &str| map.get(name).and_then(Value::as_str).unwrap_or_default();
        let computed = json_record_hash(&map);
        let through = tiering_through(field("kind"), map.get("args"));
        self.check(seq, field("prev_hash"), field("hash"), computed) && self.declares(seq, through)
    }

    /// Ends the walk at something that is not a record: a line of a file
    /// that is neither a record nor a checkpoint as the gateway writes them
    /// (`why` says which line and what is wrong). Reported at the seq
    /// expected next. Returns false.
    pub fn fail_line(&mut self, why: String) -> bool {
        if self.problem.is_some() {
            return false;
        }
        let expected = self.expected();
        self.fail(expected, why, None)
    }

    /// Notes a good record that says the records through `through` were
    /// archived or dropped (`kind` and `through_seq` of
    /// [`tiering_through`]), if that is where the walk is anchored.
    fn declares(&mut self, seq: u64, through: Option<(&str, u64)>) -> bool {
        let Some((kind, through)) = through else {
            return true;
        };
        let counts = match self.floor {
            Floor::Store => true,
            Floor::Archive => kind == "audit.dropped",
            Floor::Unchecked => false,
        };
        if counts && self.anchor == Some(through) && self.declared_at.is_none() {
            self.declared_at = Some(seq);
        }
        true
    }

    /// Records pushed so far (up to and including the first bad one).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The first problem the walk found so far, if any (signatures and
    /// truncation are only checked by [`finish`](Self::finish)).
    pub fn problem(&self) -> Option<&Problem> {
        self.problem.as_ref().map(|p| &p.problem)
    }

    fn expected(&self) -> u64 {
        self.last
            .as_ref()
            .map_or(1, |(seq, _)| seq.saturating_add(1))
    }

    fn fail(&mut self, seq: u64, what: String, checkpoint: Option<usize>) -> bool {
        self.problem = Some(WalkProblem {
            problem: Problem { seq, what },
            checkpoint,
        });
        false
    }

    fn unreadable(&mut self, why: &str) -> bool {
        self.records += 1;
        let expected = self.expected();
        self.fail(
            expected,
            format!("record {expected} cannot be read: {why}"),
            None,
        )
    }

    fn check(
        &mut self,
        seq: u64,
        prev_hash: &str,
        hash: &str,
        computed: Result<String, String>,
    ) -> bool {
        self.records += 1;
        if self.last.is_none() && seq > 1 {
            self.anchor_before(seq);
        }
        let expected = self.expected();
        if seq != expected {
            let what = match &self.last {
                // Seqs start at 1: no checkpoint can anchor a record 0 (and
                // `seq - 1` below would underflow).
                None if seq == 0 => "the log starts at seq 0, not at 1".to_owned(),
                None => format!(
                    "the log starts at seq {seq}, not at 1, and no checkpoint of seq {} anchors \
                     it",
                    seq.saturating_sub(1)
                ),
                Some((last, _)) if seq > expected => format!(
                    "record {expected} is missing: record {last} is followed by record {seq}"
                ),
                Some((last, _)) => {
                    format!("record {last} is followed by record {seq}: out of order or repeated")
                }
            };
            return self.fail(expected, what, None);
        }
        match computed {
            Err(why) => return self.fail(seq, format!("record {seq}: {why}"), None),
            Ok(computed) if computed != hash => {
                return self.fail(
                    seq,
                    format!(
                        "record {seq} was altered: its content hashes to {computed}, its hash \
                         says {hash:?}"
                    ),
                    None,
                );
            }
            Ok(_) => {}
        }
        let link = self.last.as_ref().map_or(GENESIS, |(_, h)| h.as_str());
        if prev_hash != link {
            let what = if seq == 1 {
                format!("record 1 has prev_hash {prev_hash:?}, not 64 zeros")
            } else {
                format!(
                    "record {seq} does not follow record {}: its prev_hash is {prev_hash:?}, \
                     that record's hash is {link}",
                    seq - 1
                )
            };
            return self.fail(seq, what, None);
        }
        // Checkpoints at or below this record are now decided.
        while let Some(&checkpoint) = self.checkpoints.get(self.reached) {
            if checkpoint.seq > seq {
                break;
            }
            let index = self.reached;
            self.reached += 1;
            if checkpoint.seq < seq {
                // Only possible for seq 0: the walk passed every other seq.
                return self.fail(
                    checkpoint.seq,
                    format!(
                        "a checkpoint names seq {}, which no record has",
                        checkpoint.seq
                    ),
                    Some(index),
                );
            }
            if checkpoint.hash != hash {
                return self.fail(
                    seq,
                    format!(
                        "record {seq} is not the record the checkpoint signed: its hash is \
                         {hash}, the checkpoint's is {:?} (the log was rewritten up to here)",
                        checkpoint.hash
                    ),
                    Some(index),
                );
            }
        }
        self.last = Some((seq, hash.to_owned()));
        true
    }

    /// Anchors the walk at the checkpoint of `first - 1`, if there is one:
    /// the first record must then link to its hash. Checkpoints below it
    /// are not compared with records (their signatures are still checked).
    fn anchor_before(&mut self, first: u64) {
        let at = first - 1;
        let Some(index) = self.checkpoints.iter().position(|c| c.seq == at) else {
            return;
        };
        let Some(checkpoint) = self.checkpoints.get(index) else {
            return;
        };
        self.last = Some((at, checkpoint.hash.clone()));
        self.anchor = Some(at);
        // The anchor itself counts as reached: its hash is where the chain
        // starts, by construction.
        self.reached = index + 1;
    }

    /// Checks every checkpoint's signature with `check_sig`, detects
    /// truncation, and reports.
    pub fn finish(self, check_sig: &dyn Fn(&Checkpoint) -> bool) -> Report {
        let valid: Vec<bool> = self.checkpoints.iter().map(|c| check_sig(c)).collect();
        let is_valid = |index: usize| valid.get(index).copied().unwrap_or(false);
        let last_seq = self.last.as_ref().map_or(0, |(seq, _)| *seq);

        // The walk's problem; one about a checkpoint whose signature is
        // invalid is that checkpoint's fault, and said so.
        let mut first: Option<Problem> = self.problem.map(|walk| match walk.checkpoint {
            Some(index) if !is_valid(index) => bad_signature(&self.checkpoints, index),
            _ => walk.problem,
        });
        // The walk stopped at its problem: the log was read to its end only
        // without one.
        let walked_to_the_end = first.is_none();
        let consider = |first: &mut Option<Problem>, candidate: Problem| {
            if first.as_ref().is_none_or(|p| candidate.seq < p.seq) {
                *first = Some(candidate);
            }
        };
        if let Some(index) = (0..self.checkpoints.len()).find(|&i| !is_valid(i)) {
            consider(&mut first, bad_signature(&self.checkpoints, index));
        }
        if walked_to_the_end {
            let newest = self
                .checkpoints
                .iter()
                .enumerate()
                .filter(|&(i, c)| is_valid(i) && c.seq > last_seq)
                .map(|(_, c)| c.seq)
                .max();
            if let Some(newest) = newest {
                let missing = last_seq.saturating_add(1);
                consider(
                    &mut first,
                    Problem {
                        seq: missing,
                        what: format!(
                            "the log was truncated: it ends at seq {last_seq}, but a signed \
                         checkpoint covers seq {newest}"
                        ),
                    },
                );
            }
        }

        let anchor = self.anchor.unwrap_or(0);
        let verified_below = |below: u64| -> Vec<u64> {
            self.checkpoints
                .iter()
                .take(self.reached)
                .enumerate()
                .filter(|&(i, c)| {
                    is_valid(i) && c.seq >= anchor && c.seq < below && c.seq <= last_seq
                })
                .map(|(_, c)| c.seq)
                .collect()
        };
        if let Some(anchor) = self.anchor
            && self.floor != Floor::Unchecked
        {
            let covered_by = verified_below(u64::MAX).into_iter().max().unwrap_or(0);
            let what = match self.declared_at {
                None => Some(format!(
                    "the log starts at seq {}: no record says that the records through seq \
                     {anchor} were {}",
                    anchor + 1,
                    if self.floor == Floor::Archive {
                        "dropped (audit.dropped)"
                    } else {
                        "archived or dropped (audit.archived, audit.dropped)"
                    }
                )),
                Some(at) if at > covered_by => Some(format!(
                    "the log starts at seq {}: record {at} says why, but no signed checkpoint \
                     covers record {at} yet",
                    anchor + 1
                )),
                Some(_) => None,
            };
            if let Some(what) = what {
                consider(
                    &mut first,
                    Problem {
                        seq: anchor + 1,
                        what,
                    },
                );
            }
        }
        let below = first.as_ref().map_or(u64::MAX, |p| p.seq);
        let verified = verified_below(below);
        let newest_verified = verified.iter().copied().max().unwrap_or(0);
        Report {
            records: self.records,
            checkpoints_verified: u64::try_from(verified.len()).unwrap_or(u64::MAX),
            anchor,
            floor_declared_at: self.declared_at,
            last_seq,
            uncovered: if first.is_none() {
                last_seq.saturating_sub(newest_verified)
            } else {
                0
            },
            first_bad: first,
        }
    }
}

/// For a tiering record (`audit.archived`, `audit.dropped`): its kind and
/// `args.through_seq`, the last seq it says went.
fn tiering_through<'k>(kind: &'k str, args: Option<&Value>) -> Option<(&'k str, u64)> {
    if kind != "audit.archived" && kind != "audit.dropped" {
        return None;
    }
    let through = args?.get("through_seq")?.as_u64()?;
    Some((kind, through))
}

fn bad_signature(checkpoints: &[&Checkpoint], index: usize) -> Problem {
    match checkpoints.get(index) {
        Some(c) => Problem {
            seq: c.seq,
            what: format!(
                "the checkpoint of seq {} (kid {:?}) has an invalid signature",
                c.seq, c.kid
            ),
        },
        None => Problem {
            seq: 0,
            what: "a checkpoint has an invalid signature".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use portcullis_core::Timestamp;
    use serde_json::json;

    use super::*;
    use crate::{EventKind, NewEvent, checkpoint_message};

    /// A stand-in signature: anyone who knows the message can make it, but
    /// it is wrong for any other message.
    fn sign(seq: u64, hash: &str, ts: Timestamp) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"test-key:");
        hasher.update(checkpoint_message(seq, hash, ts).as_bytes());
        format!("{:x}", hasher.finalize())
    }

    fn check_sig(c: &Checkpoint) -> bool {
        c.kid == "k1" && c.sig == sign(c.seq, &c.hash, c.ts)
    }

    fn checkpoint(record: &AuditEvent) -> Checkpoint {
        let ts = Timestamp(2_000);
        Checkpoint {
            seq: record.seq,
            hash: record.hash.clone(),
            ts,
            kid: "k1".into(),
            sig: sign(record.seq, &record.hash, ts),
        }
    }

    /// Re-hashes `record` after `prev`, as the writer would.
    fn link(mut record: AuditEvent, prev: &str) -> AuditEvent {
        record.prev_hash = prev.to_owned();
        record.hash = record_hash(&record);
        record
    }

    fn chain(n: u64) -> Vec<AuditEvent> {
        let mut out: Vec<AuditEvent> = Vec::new();
        for seq in 1..=n {
            let mut event = NewEvent::new(Timestamp(1_000 + seq), EventKind::CallAllowed);
            event.task_id = Some(format!("t{}", seq % 3));
            event.args = Some(json!({"n": seq, "f": 0.5, "s": "é/\n"}));
            if seq % 2 == 0 {
                event.policy_ids = vec!["p".into()];
            }
            let prev = out.last().map_or(GENESIS.to_owned(), |r| r.hash.clone());
            let record = AuditEvent {
                seq,
                event,
                prev_hash: String::new(),
                hash: String::new(),
            };
            out.push(link(record, &prev));
        }
        out
    }

    fn run(records: &[AuditEvent], checkpoints: &[Checkpoint]) -> Report {
        verify(records.iter().cloned().map(Ok), checkpoints, &check_sig)
    }

    fn bad_at(report: &Report) -> u64 {
        report.first_bad.as_ref().map_or(0, |p| p.seq)
    }

    #[test]
    fn known_answer() {
        // The first record of a log, hashed by hand: prev_hash is 64 zeros,
        // the canonical JSON sorts the keys.
        let record = AuditEvent {
            seq: 1,
            event: NewEvent::new(Timestamp(1_700_000_000_000), EventKind::ConfigLoaded),
            prev_hash: GENESIS.into(),
            hash: String::new(),
        };
        let canonical = format!(
            r#"{{"kind":"config.loaded","prev_hash":"{GENESIS}","seq":1,"ts":1700000000000}}"#
        );
        let mut hasher = Sha256::new();
        hasher.update(GENESIS.as_bytes());
        hasher.update(canonical.as_bytes());
        let expected = format!("{:x}", hasher.finalize());
        assert_eq!(record_hash(&record), expected);
        assert_eq!(expected.len(), 64);
        // The hash field itself is not hashed.
        let with_hash = AuditEvent {
            hash: "anything".into(),
            ..record
        };
        assert_eq!(record_hash(&with_hash), expected);
        assert_eq!(GENESIS, "0".repeat(64));
    }

    #[test]
    fn typed_and_json_hashes_agree() {
        for record in chain(5) {
            let Value::Object(map) = serde_json::to_value(&record).unwrap() else {
                unreachable!()
            };
            assert_eq!(json_record_hash(&map).unwrap(), record.hash);
            // Parsed back from text: the same hash.
            let text = serde_json::to_string(&record).unwrap();
            let back: AuditEvent = serde_json::from_str(&text).unwrap();
            assert_eq!(record_hash(&back), record.hash);
        }
    }

    #[test]
    fn an_intact_log_verifies() {
        let records = chain(10);
        let checkpoints = [checkpoint(&records[3]), checkpoint(&records[7])];
        let report = run(&records, &checkpoints);
        assert_eq!(
            report,
            Report {
                records: 10,
                checkpoints_verified: 2,
                last_seq: 10,
                anchor: 0,
                floor_declared_at: None,
                uncovered: 2,
                first_bad: None,
            }
        );
        assert!(report.is_ok());
        // The empty log, no checkpoints: fine, nothing verified.
        let empty = run(&[], &[]);
        assert!(empty.is_ok());
        assert_eq!(empty.records, 0);
    }

    #[test]
    fn an_edit_is_found_at_its_seq() {
        let mut records = chain(10);
        records[4].event.detail = Some("forged".into());
        let report = run(&records, &[]);
        assert_eq!(bad_at(&report), 5);
        assert_eq!(report.records, 5, "the walk stops at the bad record");
        // The edited record re-hashed: the next record's link breaks.
        records[4] = link(records[4].clone(), &records[3].hash.clone());
        let report = run(&records, &[]);
        assert_eq!(bad_at(&report), 6);
        assert!(report.first_bad.unwrap().what.contains("does not follow"));
        // Editing seq, prev_hash or hash alone is an edit too.
        for edit in 0..3 {
            let mut records = chain(4);
            match edit {
                0 => records[2].prev_hash = records[0].hash.clone(),
                1 => records[2].hash = records[1].hash.clone(),
                _ => records[2].event.ts = Timestamp(0),
            }
            assert_eq!(bad_at(&run(&records, &[])), 3, "edit {edit}");
        }
    }

    #[test]
    fn deletion_insertion_and_reordering() {
        let records = chain(10);
        let mut deleted = records.clone();
        deleted.remove(5);
        let report = run(&deleted, &[]);
        assert_eq!(bad_at(&report), 6);
        assert!(report.first_bad.unwrap().what.contains("missing"));

        let mut head_cut = records.clone();
        head_cut.remove(0);
        assert_eq!(bad_at(&run(&head_cut, &[])), 1);

        let mut swapped = records.clone();
        swapped.swap(2, 6);
        assert_eq!(bad_at(&run(&swapped, &[])), 3);

        let mut repeated = records.clone();
        repeated.insert(4, records[3].clone());
        assert_eq!(bad_at(&run(&repeated, &[])), 5);

        // A forged record inserted with a correct hash of its own: its
        // successor no longer links.
        let mut inserted: Vec<AuditEvent> = records[..4].to_vec();
        let mut forged = records[4].clone();
        forged.event.detail = Some("forged".into());
        inserted.push(link(forged, &records[3].hash));
        for r in &records[4..] {
            let mut moved = r.clone();
            moved.seq += 1;
            inserted.push(moved);
        }
        assert_eq!(bad_at(&run(&inserted, &[])), 6);
    }

    #[test]
    fn a_rewritten_chain_is_caught_by_a_checkpoint() {
        let records = chain(10);
        let checkpoints = [checkpoint(&records[7])];
        let mut rewritten = records[..2].to_vec();
        for r in &records[2..] {
            let mut r = r.clone();
            if r.seq == 3 {
                r.event.detail = Some("forged".into());
            }
            let prev = rewritten.last().unwrap().hash.clone();
            rewritten.push(link(r, &prev));
        }
        let report = run(&rewritten, &checkpoints);
        assert_eq!(bad_at(&report), 8);
        assert!(report.first_bad.unwrap().what.contains("rewritten"));
        // Past the newest checkpoint, a rewrite is invisible.
        let checkpoints = [checkpoint(&records[1])];
        let report = run(&rewritten, &checkpoints);
        assert!(report.is_ok());
        assert_eq!(report.uncovered, 8);
    }

    #[test]
    fn truncation_is_caught_up_to_the_newest_checkpoint() {
        let records = chain(10);
        let checkpoints = [checkpoint(&records[3]), checkpoint(&records[7])];
        let report = run(&records[..6], &checkpoints);
        assert_eq!(bad_at(&report), 7);
        assert!(
            report
                .first_bad
                .as_ref()
                .unwrap()
                .what
                .contains("truncated")
        );
        assert_eq!(report.checkpoints_verified, 1);
        assert_eq!(report.records, 6);
        // Every record gone.
        assert_eq!(bad_at(&run(&[], &checkpoints)), 1);
        // Cut after the newest checkpoint: nothing to see.
        let report = run(&records[..9], &checkpoints);
        assert!(report.is_ok());
        assert_eq!(report.uncovered, 1);
        // An unsigned claim of a longer log is the checkpoint's problem.
        let mut forged = checkpoint(&records[9]);
        forged.seq = 50;
        let report = run(&records, &[forged]);
        assert_eq!(bad_at(&report), 50);
        assert!(report.first_bad.unwrap().what.contains("invalid signature"));
    }

    #[test]
    fn bad_signatures_are_found() {
        let records = chain(10);
        let mut bad = checkpoint(&records[5]);
        bad.sig = sign(6, &records[6].hash, bad.ts);
        let good = checkpoint(&records[2]);
        let report = run(&records, &[bad.clone(), good.clone()]);
        assert_eq!(bad_at(&report), 6);
        assert!(
            report
                .first_bad
                .as_ref()
                .unwrap()
                .what
                .contains("invalid signature")
        );
        assert_eq!(report.checkpoints_verified, 1);
        // An unknown key is an invalid signature.
        let mut other_key = good.clone();
        other_key.kid = "k2".into();
        assert_eq!(bad_at(&run(&records, &[other_key])), 3);
        // A forged checkpoint that also disagrees with the log: the
        // signature is what is wrong.
        let mut forged = good;
        forged.hash = records[5].hash.clone();
        let report = run(&records, &[forged]);
        assert_eq!(bad_at(&report), 3);
        assert!(report.first_bad.unwrap().what.contains("invalid signature"));
        // The lowest seq wins: an edit before the bad checkpoint.
        let mut edited = records.clone();
        edited[1].event.tool = Some("x".into());
        assert_eq!(bad_at(&run(&edited, &[bad])), 2);
    }

    #[test]
    fn a_checkpoint_of_seq_0_names_no_record() {
        let records = chain(3);
        let mut zero = checkpoint(&records[0]);
        zero.seq = 0;
        zero.sig = sign(0, &zero.hash, zero.ts);
        assert_eq!(bad_at(&run(&records, &[zero])), 0);
    }

    #[test]
    fn unreadable_records_are_problems_where_they_stand() {
        let records = chain(5);
        let items: Vec<Result<AuditEvent, String>> = records[..2]
            .iter()
            .cloned()
            .map(Ok)
            .chain([Err("bad json".to_owned())])
            .chain(records[3..].iter().cloned().map(Ok))
            .collect();
        let report = verify(items.into_iter(), &[], &check_sig);
        assert_eq!(bad_at(&report), 3);
        assert!(report.first_bad.unwrap().what.contains("bad json"));
    }

    #[test]
    fn the_verifier_streams_and_stops_at_the_first_problem() {
        let mut records = chain(6);
        records[1].event.detail = Some("x".into());
        let checkpoints = [checkpoint(&records[4])];
        let mut verifier = Verifier::new(&checkpoints);
        assert!(verifier.push(Ok(records[0].clone())));
        assert!(!verifier.push(Ok(records[1].clone())));
        assert!(!verifier.push(Ok(records[2].clone())));
        assert_eq!(verifier.records(), 2);
        assert_eq!(verifier.problem().map(|p| p.seq), Some(2));
        let report = verifier.finish(&check_sig);
        assert_eq!(bad_at(&report), 2);
        assert_eq!(report.checkpoints_verified, 0);
        assert_eq!(report.uncovered, 0);
    }

    #[test]
    fn raw_json_sees_what_decoding_would_hide() {
        let records = chain(4);
        let values = || -> Vec<Value> {
            records
                .iter()
                .map(|r| serde_json::to_value(r).unwrap())
                .collect()
        };
        let run_json =
            |values: Vec<Value>| verify_json(values.into_iter().map(Ok), &[], &check_sig);
        assert!(run_json(values()).is_ok());
        // Key order and whitespace of the file do not matter.
        let reordered: Vec<Value> = records
            .iter()
            .map(|r| {
                let text = serde_json::to_string_pretty(r).unwrap();
                let Value::Object(map) = serde_json::from_str::<Value>(&text).unwrap() else {
                    unreachable!()
                };
                Value::Object(map.into_iter().rev().collect())
            })
            .collect();
        assert!(run_json(reordered).is_ok());

        for (edit, value) in [
            ("added member", json!("x")),
            ("tool", Value::Null),
            ("policy_ids", json!([])),
        ] {
            let mut values = values();
            let key = if edit == "added member" {
                "extra"
            } else {
                edit
            };
            values[2]
                .as_object_mut()
                .unwrap()
                .insert(key.into(), value.clone());
            // Decoding into AuditEvent normalizes these away…
            let typed: AuditEvent = serde_json::from_value(values[2].clone()).unwrap();
            assert_eq!(typed, records[2], "{edit}");
            // …the raw verifier does not.
            assert_eq!(bad_at(&run_json(values)), 3, "{edit}");
        }
        let mut values = values();
        values[1] = json!("not an object");
        assert_eq!(bad_at(&run_json(values)), 2);
        let mut values = values_without_seq(&records);
        values.truncate(2);
        assert_eq!(bad_at(&run_json(values)), 1);
    }

    fn values_without_seq(records: &[AuditEvent]) -> Vec<Value> {
        records
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap();
                v.as_object_mut().unwrap().remove("seq");
                v
            })
            .collect()
    }

    /// A log of `n` records where record `at` (not the last) is the
    /// tiering record `kind` saying the records through `through` went.
    fn chain_declaring(n: u64, at: u64, kind: EventKind, through: u64) -> Vec<AuditEvent> {
        let mut records = chain(n);
        let mut prev = GENESIS.to_owned();
        for record in &mut records {
            if record.seq == at {
                record.event = NewEvent::new(Timestamp(1_000 + at), kind);
                record.event.args = Some(json!({"first_seq": 1, "through_seq": through}));
            }
            *record = link(record.clone(), &prev);
            prev.clone_from(&record.hash);
        }
        records
    }

    #[test]
    fn a_log_whose_oldest_records_went_verifies_from_its_anchor() {
        // Records 1..=4 archived (checkpoint 4 kept), the record saying so
        // is 7, covered by checkpoint 8.
        let all = chain_declaring(10, 7, EventKind::AuditArchived, 4);
        let checkpoints = [checkpoint(&all[3]), checkpoint(&all[7])];
        let kept = &all[4..];
        let report = run(kept, &checkpoints);
        assert!(report.is_ok(), "{report:?}");
        assert_eq!((report.anchor, report.floor_declared_at), (4, Some(7)));
        assert_eq!(
            (report.records, report.last_seq, report.uncovered),
            (6, 10, 2)
        );
        assert_eq!(report.checkpoints_verified, 2);
        // The JSON walk agrees.
        let values = kept.iter().map(|r| Ok(serde_json::to_value(r).unwrap()));
        assert!(verify_json(values, &checkpoints, &check_sig).is_ok());
    }

    #[test]
    fn cutting_the_front_off_needs_a_record_that_says_so() {
        let all = chain_declaring(10, 7, EventKind::AuditArchived, 4);
        let checkpoints = [
            checkpoint(&all[3]),
            checkpoint(&all[5]),
            checkpoint(&all[7]),
        ];
        // Cut at checkpoint 6: the only declaration is about seq 4.
        let report = run(&all[6..], &checkpoints);
        assert_eq!(bad_at(&report), 7, "{report:?}");
        assert!(report.first_bad.unwrap().what.contains("no record says"));
        // Cut where no checkpoint anchors: reported where the log should start.
        let report = run(&all[5..], &checkpoints);
        assert_eq!(bad_at(&report), 1, "{report:?}");
        // A declaration no checkpoint covers (the record after checkpoint 8)
        // is not enough: it could have been appended by anyone.
        let late = chain_declaring(10, 9, EventKind::AuditDropped, 4);
        let checkpoints = [checkpoint(&late[3]), checkpoint(&late[7])];
        let report = run(&late[4..], &checkpoints);
        assert_eq!(bad_at(&report), 5, "{report:?}");
        assert!(
            report
                .first_bad
                .unwrap()
                .what
                .contains("no signed checkpoint covers record 9")
        );
        // An anchor with a bad signature is the anchor's fault.
        let mut forged = checkpoint(&all[3]);
        forged.sig = "forged".into();
        let report = run(&all[4..], &[forged, checkpoint(&all[7])]);
        assert_eq!(bad_at(&report), 4, "{report:?}");
        assert!(report.first_bad.unwrap().what.contains("invalid signature"));
        // A first record that does not link to its anchor.
        let mut unlinked = all[4..].to_vec();
        unlinked[0] = link(unlinked[0].clone(), &"f".repeat(64));
        let report = run(&unlinked, &[checkpoint(&all[3]), checkpoint(&all[7])]);
        assert_eq!(bad_at(&report), 5, "{report:?}");
    }

    #[test]
    fn an_archive_starts_late_only_where_records_were_dropped() {
        let archived = chain_declaring(10, 7, EventKind::AuditArchived, 4);
        let checkpoints = [checkpoint(&archived[3]), checkpoint(&archived[7])];
        let archive = |records: &[AuditEvent], checkpoints: &[Checkpoint]| {
            let mut v = Verifier::archive(checkpoints);
            for r in records {
                v.push(Ok(r.clone()));
            }
            v.finish(&check_sig)
        };
        // "Archived through 4" says records 1..=4 are in the archive: an
        // archive that starts at 5 lost them.
        assert_eq!(bad_at(&archive(&archived[4..], &checkpoints)), 5);
        let dropped = chain_declaring(10, 7, EventKind::AuditDropped, 4);
        let checkpoints = [checkpoint(&dropped[3]), checkpoint(&dropped[7])];
        let report = archive(&dropped[4..], &checkpoints);
        assert!(report.is_ok(), "{report:?}");
        // Alone, an archive is accepted on its anchor, and says where.
        let checkpoints = [checkpoint(&archived[3]), checkpoint(&archived[7])];
        let mut alone = Verifier::archive_alone(&checkpoints);
        for r in &archived[4..] {
            alone.push(Ok(r.clone()));
        }
        let report = alone.finish(&check_sig);
        assert!(report.is_ok(), "{report:?}");
        assert_eq!((report.anchor, report.floor_declared_at), (4, None));
    }

    /// Found by the `audit_lines` fuzz target: an export whose first record
    /// has seq 0 made the verifier compute `seq - 1` (a panic with overflow
    /// checks, a message naming seq 18446744073709551615 without).
    #[test]
    fn first_record_with_seq_zero_is_reported_not_an_underflow() {
        let line = r#"{"detail":"sha256:abc","hash":"b27ab00c7978c4d36e6c1ad0a8082dd45af3935803200ec0d60bed6d262779a2","kind":"config.loaded","prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","seq":0,"ts":1767225600000}"#;
        let Ok(crate::lines::Line::Record(record)) =
            crate::lines::parse_line(line, crate::lines::Place::Log)
        else {
            panic!("the line is a record as the gateway writes them");
        };
        let typed = verify(std::iter::once(Ok(*record)), &[], &check_sig);
        let json = verify_json(
            std::iter::once(serde_json::from_str(line).map_err(|e| e.to_string())),
            &[],
            &check_sig,
        );
        assert_eq!(typed, json);
        assert_eq!(bad_at(&typed), 1, "{typed:?}");
        assert_eq!(
            typed.first_bad.map(|p| p.what),
            Some("the log starts at seq 0, not at 1".to_owned())
        );
    }
}
