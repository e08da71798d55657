//! The audit log's lines on arbitrary bytes: `portcullis_store::lines`
//! (the strict parser behind `audit verify --jsonl` and archive segment
//! verification) and the hash-chain verifier over the lines of a file.
//!
//! The input, split at `\n`, is the lines of an export (each is also read
//! as the first line of a segment file and as a witness line).
//!
//! Properties checked (beyond "no panic"):
//!
//! 1. A line accepted anywhere re-encodes (`chain::encode`,
//!    `checkpoint_line`, `segment_line`) to exactly its bytes, and reads
//!    back to the same value; a kind of line is accepted only where it may
//!    stand (records and checkpoints in a log, checkpoints in a witness
//!    file, a segment header first in a segment file).
//! 2. The chain verifier gives the same report whether the records are
//!    pushed typed (`Verifier::push`) or as their JSON
//!    (`Verifier::push_json`), as `audit verify` reads an export.
//! 3. The accepted records, renumbered from 1 and sealed in order
//!    (`chain::seal`), are lines the parser accepts and a chain that
//!    verifies, its last record covered by a checkpoint; changing one
//!    record after sealing is reported at its seq.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_core::Timestamp;
use portcullis_store::chain::{self, Report, Verifier};
use portcullis_store::lines::{self, Line, Place};
use portcullis_store::{AuditEvent, Checkpoint};
use serde_json::Value;

const MAX_INPUT: usize = 64 * 1024;

/// A stand-in for the signature check: a deterministic property of the
/// checkpoint the fuzzer can make true or false.
fn check_sig(c: &Checkpoint) -> bool {
    c.sig.len() % 2 == 0
}

fn encode(line: &Line) -> String {
    match line {
        Line::Record(r) => chain::encode(r),
        Line::Checkpoint(c) => lines::checkpoint_line(c),
        Line::Segment(h) => lines::segment_line(h),
    }
}

/// Property 1 for one line; the line as read in a log.
fn read(text: &str) -> Option<Line> {
    let mut read = None;
    for place in [Place::Log, Place::SegmentStart, Place::Witness] {
        let Ok(line) = lines::parse_line(text, place) else {
            continue;
        };
        assert_eq!(
            encode(&line),
            text,
            "accepted at {place:?}, written otherwise"
        );
        assert_eq!(lines::parse_line(text, place).as_ref(), Ok(&line));
        match (&line, place) {
            (Line::Record(_), Place::Log)
            | (Line::Checkpoint(_), Place::Log | Place::Witness)
            | (Line::Segment(_), Place::SegmentStart) => {}
            (line, place) => panic!("{line:?} accepted at {place:?}"),
        }
        if place == Place::Log {
            read = Some(line);
        } else if let (Some(Line::Checkpoint(a)), Line::Checkpoint(b)) = (&read, &line) {
            assert_eq!(a, b);
        }
    }
    read
}

/// Property 2: the export's lines through the verifier, typed and as JSON.
fn verify_file(texts: &[&str], read: &[Option<Line>]) {
    // As `checkpoint_lines` does: the checkpoints up to the first bad line.
    let checkpoints: Vec<Checkpoint> = read
        .iter()
        .map_while(Option::as_ref)
        .filter_map(|l| match l {
            Line::Checkpoint(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    let walk = |as_json: bool| -> Report {
        let mut verifier = Verifier::new(&checkpoints);
        for (index, (text, line)) in texts.iter().zip(read).enumerate() {
            let going = match line {
                Some(Line::Record(_)) if as_json => verifier
                    .push_json(serde_json::from_str::<Value>(text).map_err(|e| e.to_string())),
                Some(Line::Record(record)) => verifier.push(Ok((**record).clone())),
                Some(_) => true,
                None => verifier.fail_line(format!("line {}: not accepted", index + 1)),
            };
            if !going {
                break;
            }
        }
        verifier.finish(&check_sig)
    };
    assert_eq!(walk(false), walk(true), "typed and JSON walks differ");
}

/// Property 3.
fn reseal(records: Vec<AuditEvent>) {
    if records.is_empty() {
        return;
    }
    let mut prev = chain::GENESIS.to_owned();
    let mut sealed = Vec::with_capacity(records.len());
    for (seq, mut record) in (1u64..).zip(records) {
        record.seq = seq;
        record.prev_hash = prev;
        let text = chain::seal(&mut record);
        match lines::parse_line(&text, Place::Log) {
            Ok(Line::Record(back)) => assert_eq!(*back, record),
            other => panic!("a sealed record is refused: {other:?}\n{text}"),
        }
        prev = record.hash.clone();
        sealed.push(record);
    }
    let last = sealed.last().expect("not empty");
    let checkpoints = [Checkpoint {
        seq: last.seq,
        hash: last.hash.clone(),
        ts: Timestamp(last.event.ts.0),
        kid: "kid".into(),
        sig: String::new(),
    }];
    let report = chain::verify(sealed.iter().cloned().map(Ok), &checkpoints, &check_sig);
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, last.seq);
    assert_eq!(report.last_seq, last.seq);
    assert_eq!(report.checkpoints_verified, 1);
    assert_eq!(report.uncovered, 0);

    // An edit after sealing, in the middle record.
    let k = sealed.len() / 2;
    let mut edited = sealed;
    let ts = &mut edited[k].event.ts;
    *ts = Timestamp(ts.0 ^ 1);
    let report = chain::verify(edited.into_iter().map(Ok), &checkpoints, &check_sig);
    assert_eq!(
        report.first_bad.map(|p| p.seq),
        Some(k as u64 + 1),
        "an edited record went unnoticed"
    );
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let text = String::from_utf8_lossy(data);
    let texts: Vec<&str> = text.split('\n').collect();
    let read: Vec<Option<Line>> = texts.iter().map(|t| read(t)).collect();
    verify_file(&texts, &read);
    let records = read
        .into_iter()
        .filter_map(|l| match l {
            Some(Line::Record(r)) => Some(*r),
            _ => None,
        })
        .collect();
    reseal(records);
});
