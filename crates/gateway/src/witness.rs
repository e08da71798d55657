//! The checkpoint witness (`audit.witness_dir`; `docs/audit-format.md`,
//! "Witness"): every checkpoint of the store, appended to a file outside
//! it, so that write access to the database alone cannot delete
//! checkpoints and rewrite the records they cover unnoticed.
//!
//! # The file
//!
//! `<witness_dir>/checkpoints.jsonl`: one checkpoint line per checkpoint,
//! exactly as exports write them
//! ([`checkpoint_line`](portcullis_store::lines::checkpoint_line)), each
//! ended by `\n`, in strictly increasing `seq`. Nothing else: no header, no
//! blank line. The gateway only appends (`O_APPEND`), and syncs the file
//! (`fdatasync`) before it counts a checkpoint as witnessed.
//!
//! # Order of effects, and what a failure does
//!
//! A checkpoint is committed to the store first and witnessed after, by
//! [`Witness::catch_up`]: every checkpoint of the store newer than the
//! witness's last, its signature checked with the gateway's keys. So the
//! witness never holds a checkpoint that the store did not commit — a
//! witnessed checkpoint missing from the store was deleted from it, never
//! a false alarm. A failed append (full disk, permissions) does not touch
//! the call path: it is logged, counted
//! (`portcullis_audit_witness_failures_total`) and retried every second,
//! and until it succeeds `audit verify --witness` reports the store's
//! checkpoints after the witness's last as not witnessed. A witness folder
//! that cannot be opened at start-up stops the gateway from starting: a
//! configured witness is never silently off.
//!
//! Catching up from the store is also how a new witness begins: its first
//! lines are the store's checkpoints of that moment (their signatures
//! checked), so it vouches for the store only from then on.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use portcullis_store::lines::{self, Line, LineError, Place};
use portcullis_store::{Checkpoint, Store, chain};
use portcullis_token::KeyRing;

/// The witness file's name in its folder.
pub const WITNESS_FILE: &str = "checkpoints.jsonl";
/// The largest witness file read (a checkpoint line is about 250 bytes, so
/// this is millions of checkpoints: decades at the default interval).
pub const MAX_WITNESS_BYTES: u64 = 1 << 30;
/// Checkpoints read from the store per page when catching up.
const PAGE: usize = 1000;

/// Why the witness could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessError {
    /// A file system error.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A line that is not a checkpoint line in its exact form.
    #[error("{path}: line {line}: {source}")]
    Line {
        /// The file.
        path: PathBuf,
        /// Its number, from 1.
        line: u64,
        /// What is wrong with it.
        source: LineError,
    },
    /// A line that is not valid UTF-8.
    #[error("{path}: line {line} is not UTF-8")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Its number, from 1.
        line: u64,
    },
    /// Checkpoints out of order.
    #[error("{path}: line {line}: checkpoint {seq} follows checkpoint {after}, not after it")]
    Order {
        /// The file.
        path: PathBuf,
        /// Its number, from 1.
        line: u64,
        /// The line's checkpoint.
        seq: u64,
        /// The checkpoint before.
        after: u64,
    },
    /// The file does not end with a newline: a write cut short (a crash).
    #[error(
        "{path}: the last line is not ended by a newline (a write cut short: remove the partial \
         line)"
    )]
    Torn {
        /// The file.
        path: PathBuf,
    },
    /// The file is larger than [`MAX_WITNESS_BYTES`].
    #[error("{path} is larger than {MAX_WITNESS_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The store could not be read.
    #[error("reading the store's checkpoints: {0}")]
    Store(String),
}

/// The witness of one gateway process: the file, held open for appending.
#[derive(Debug)]
pub struct Witness {
    path: PathBuf,
    state: std::sync::Mutex<State>,
}

#[derive(Debug)]
struct State {
    file: File,
    /// The newest witnessed checkpoint's seq (0: none).
    last_seq: u64,
}

impl Witness {
    /// Opens (creating them if needed) the folder `dir` and its witness
    /// file, and reads the file to learn where it ends. A file that is not
    /// a valid witness is an error: the gateway does not write after lines
    /// it cannot vouch for.
    pub fn open(dir: &Path) -> Result<Self, WitnessError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| WitnessError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(WITNESS_FILE);
        let existed = path.exists();
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io(&path))?;
        if !existed {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        let last_seq = read_file(&path)?.last().map_or(0, |c| c.seq);
        Ok(Self {
            path,
            state: std::sync::Mutex::new(State { file, last_seq }),
        })
    }

    /// The witness file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn last_seq(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .last_seq
    }

    /// Appends every checkpoint of `store` newer than the witness's last
    /// whose signature `ring` verifies, and syncs the file; returns how many
    /// were appended. A checkpoint with an invalid signature is not
    /// witnessed (and logged).
    pub async fn catch_up(&self, store: &dyn Store, ring: &KeyRing) -> Result<u64, WitnessError> {
        let check = crate::audit::ring_check(ring);
        let mut appended = 0u64;
        let mut after = self.last_seq();
        loop {
            let page = store
                .checkpoints((after > 0).then_some(after), PAGE)
                .await
                .map_err(|e| WitnessError::Store(e.to_string()))?;
            let Some(last) = page.last().map(|c| c.seq) else {
                return Ok(appended);
            };
            let mut valid = Vec::with_capacity(page.len());
            for c in page {
                if check(&c) {
                    valid.push(c);
                } else {
                    tracing::error!(
                        seq = c.seq,
                        kid = %c.kid,
                        "a checkpoint in the store has an invalid signature: not witnessed"
                    );
                }
            }
            appended += self.append(&valid)?;
            after = last;
        }
    }

    /// Appends `checkpoints` (those newer than the last witnessed, in seq
    /// order) in one write, then syncs. The write is small and rare (one
    /// per checkpoint interval), so it is done in place rather than on a
    /// blocking thread.
    fn append(&self, checkpoints: &[Checkpoint]) -> Result<u64, WitnessError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut text = String::new();
        let mut last = state.last_seq;
        let mut count = 0u64;
        for c in checkpoints {
            if c.seq > last {
                text.push_str(&lines::checkpoint_line(c));
                text.push('\n');
                last = c.seq;
                count += 1;
            }
        }
        if count == 0 {
            return Ok(0);
        }
        let io = |source| WitnessError::Io {
            path: self.path.clone(),
            source,
        };
        state.file.write_all(text.as_bytes()).map_err(io)?;
        state.file.sync_data().map_err(io)?;
        state.last_seq = last;
        Ok(count)
    }
}

/// The checkpoints of the witness in `dir`, every line checked: a
/// checkpoint line in its exact form, in increasing seq, the file ended by
/// a newline.
pub fn read_witness(dir: &Path) -> Result<Vec<Checkpoint>, WitnessError> {
    read_file(&dir.join(WITNESS_FILE))
}

fn read_file(path: &Path) -> Result<Vec<Checkpoint>, WitnessError> {
    let io = |source| WitnessError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_WITNESS_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_WITNESS_BYTES {
        return Err(WitnessError::TooLarge {
            path: path.to_owned(),
        });
    }
    let Some(body) = bytes.strip_suffix(b"\n") else {
        return if bytes.is_empty() {
            Ok(Vec::new())
        } else {
            Err(WitnessError::Torn {
                path: path.to_owned(),
            })
        };
    };
    let mut out: Vec<Checkpoint> = Vec::new();
    for (index, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line = u64::try_from(index).unwrap_or(u64::MAX).saturating_add(1);
        let text = std::str::from_utf8(raw).map_err(|_| WitnessError::NotUtf8 {
            path: path.to_owned(),
            line,
        })?;
        let parsed =
            lines::parse_line(text, Place::Witness).map_err(|source| WitnessError::Line {
                path: path.to_owned(),
                line,
                source,
            })?;
        let Line::Checkpoint(c) = parsed else {
            return Err(WitnessError::Line {
                path: path.to_owned(),
                line,
                source: LineError::Misplaced {
                    what: "a witness file holds checkpoint lines only",
                },
            });
        };
        if let Some(before) = out.last()
            && c.seq <= before.seq
        {
            return Err(WitnessError::Order {
                path: path.to_owned(),
                line,
                seq: c.seq,
                after: before.seq,
            });
        }
        out.push(c);
    }
    Ok(out)
}

/// What holding a log against a witness found, beside the report's
/// problem.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WitnessSummary {
    /// Checkpoints in the witness.
    pub witnessed: u64,
    /// Of them, below where the log starts (archived or dropped with the
    /// records they cover; their signatures are still checked).
    pub below_log: u64,
    /// The newest witnessed checkpoint's seq (0: none).
    pub newest: u64,
    /// The log's checkpoints newer than the newest witnessed one: not
    /// witnessed yet (the witness is behind: a failed or pending append).
    pub unwitnessed: u64,
}

/// The checkpoints a log is verified against when it is held against a
/// witness: its own and the witness's, so that every witnessed checkpoint
/// is compared with the record at its seq, its signature checked, and a
/// log that ends before it is truncated.
pub fn with_witness(log: &[Checkpoint], witness: &[Checkpoint]) -> Vec<Checkpoint> {
    log.iter().chain(witness).cloned().collect()
}

/// Completes `report` (of a walk over [`with_witness`]`(log, witness)`):
/// every witnessed checkpoint at or above where the log starts must also be
/// one of the log's own `log` checkpoints, identical (seq, hash, ts, kid,
/// sig); the first that is not is a problem at its seq, if it is lower than
/// the report's.
pub fn hold_against(
    report: &mut chain::Report,
    log: &[Checkpoint],
    witness: &[Checkpoint],
) -> WitnessSummary {
    let newest = witness.iter().map(|c| c.seq).max().unwrap_or(0);
    let mut summary = WitnessSummary {
        witnessed: u64::try_from(witness.len()).unwrap_or(u64::MAX),
        newest,
        unwitnessed: u64::try_from(log.iter().filter(|c| c.seq > newest).count())
            .unwrap_or(u64::MAX),
        ..WitnessSummary::default()
    };
    for c in witness {
        if c.seq < report.anchor {
            summary.below_log += 1;
            continue;
        }
        if log.contains(c) {
            continue;
        }
        if report.first_bad.as_ref().is_none_or(|p| c.seq < p.seq) {
            report.first_bad = Some(chain::Problem {
                seq: c.seq,
                what: format!(
                    "the witness holds the checkpoint of seq {} (kid {:?}, signed at {}), which \
                     is not in the log: it was deleted or replaced",
                    c.seq, c.kid, c.ts.0
                ),
            });
            report.uncovered = 0;
        }
    }
    summary
}

#[cfg(test)]
mod tests {

    use portcullis_core::Timestamp;

    use super::*;

    fn cp(seq: u64) -> Checkpoint {
        Checkpoint {
            seq,
            hash: format!("{seq:064x}"),
            ts: Timestamp(seq * 10),
            kid: "k1".into(),
            sig: "c2ln".into(),
        }
    }

    #[test]
    fn the_file_reads_back_and_refuses_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let w = Witness::open(dir.path()).unwrap();
        assert_eq!(w.append(&[cp(3), cp(7)]).unwrap(), 2);
        // Older or repeated checkpoints are not written again.
        assert_eq!(w.append(&[cp(7), cp(5)]).unwrap(), 0);
        assert_eq!(read_witness(dir.path()).unwrap(), vec![cp(3), cp(7)]);
        drop(w);
        let w = Witness::open(dir.path()).unwrap();
        assert_eq!(w.last_seq(), 7);

        let path = dir.path().join(WITNESS_FILE);
        let good = std::fs::read_to_string(&path).unwrap();
        for (bad, why) in [
            (format!("{good}{}", lines::checkpoint_line(&cp(2))), "torn"),
            (
                format!("{good}{}\n", lines::checkpoint_line(&cp(2))),
                "order",
            ),
            (format!("{good}\n"), "blank"),
            (good.replacen("\"kid\"", "\"x\":1,\"kid\"", 1), "extra"),
        ] {
            std::fs::write(&path, &bad).unwrap();
            assert!(read_witness(dir.path()).is_err(), "{why}");
            assert!(Witness::open(dir.path()).is_err(), "{why}");
        }
    }

    #[test]
    fn a_witnessed_checkpoint_missing_from_the_log_is_a_problem() {
        let report = || chain::Report {
            records: 10,
            checkpoints_verified: 2,
            last_seq: 10,
            anchor: 0,
            floor_declared_at: None,
            uncovered: 1,
            first_bad: None,
        };
        let mut r = report();
        let s = hold_against(&mut r, &[cp(3), cp(9)], &[cp(3), cp(9)]);
        assert!(r.is_ok());
        assert_eq!((s.witnessed, s.newest, s.unwitnessed), (2, 9, 0));
        let mut r = report();
        hold_against(&mut r, &[cp(9)], &[cp(3), cp(9)]);
        assert_eq!(r.first_bad.unwrap().seq, 3);
        // Re-signed (another ts) is not the witnessed checkpoint either.
        let mut resigned = cp(3);
        resigned.ts = Timestamp(1);
        let mut r = report();
        hold_against(&mut r, &[resigned, cp(9)], &[cp(3), cp(9)]);
        assert_eq!(r.first_bad.unwrap().seq, 3);
        // Below where the log starts: archived or dropped, not required.
        let mut r = chain::Report {
            anchor: 5,
            ..report()
        };
        let s = hold_against(&mut r, &[cp(5), cp(9)], &[cp(3), cp(5), cp(9), cp(12)]);
        assert_eq!(s.below_log, 1);
        assert_eq!(r.first_bad.unwrap().seq, 12);
        // The witness behind the log.
        let mut r = report();
        let s = hold_against(&mut r, &[cp(3), cp(9)], &[cp(3)]);
        assert!(r.is_ok());
        assert_eq!(s.unwitnessed, 1);
    }
}
