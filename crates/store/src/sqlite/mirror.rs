//! The JSON Lines mirror of the audit log: the writer thread's half (the
//! semantics are in the [`super`] module doc, "The JSON Lines mirror").
//!
//! The mirror is a stream of lines in the export format
//! (`docs/audit-format.md`, "Export"): every committed record, in seq
//! order, and every committed checkpoint after the record it covers. The
//! writer thread owns one [`Mirror`] and tells it about every committed
//! group ([`Mirror::committed`]). It is either
//!
//! * **in sync**: everything committed is in the stream, and each group's
//!   lines are appended as they commit; or
//! * **behind** (at open, and after any failure): the stream ends at a
//!   [`Position`] and the writer thread calls [`Mirror::step`] between
//!   groups; each step appends one page of what the ledger holds past that
//!   position, until the mirror is in sync. While behind, committed groups
//!   write nothing themselves: the ledger has their lines and the catch-up
//!   reaches them in order.
//!
//! Where the stream ends is learnt by reading the file backwards from its
//! end ([`scan`]), so memory stays bounded whatever the file's size: one
//! chunk, one line, and one page of the ledger.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;

use super::rows::{CHECKPOINT_COLUMNS, RawCheckpoint, to_uint};
use crate::Checkpoint;

/// Records read from the ledger per catch-up step (and at most as many
/// checkpoints).
pub const CATCH_UP_PAGE: usize = 1000;

/// Bytes read per step when the mirror is scanned backwards.
const SCAN_CHUNK: u64 = 64 * 1024;

/// The longest line a scan assembles. A longer complete line is skipped as
/// unreadable; a longer partial last line is terminated, not completed.
const MAX_LINE: usize = 8 * 1024 * 1024;

/// What the store exposes about its mirror
/// ([`SqliteStore::mirror_failures`](super::SqliteStore::mirror_failures) and
/// friends), shared between the writer thread and the store.
#[derive(Debug, Default)]
pub struct MirrorStatus {
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    seq: AtomicU64,
}

impl MirrorStatus {
    /// Attempts that failed to bring the mirror in line with the ledger.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The newest failure's message.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The highest record seq known to be in the mirror's stream.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    fn fail(&self, error: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error);
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// One committed line, as the writer thread collects them in commit order.
#[derive(Debug)]
pub enum Line {
    /// A record: its seq and its stored JSON, exactly as inserted.
    Record { seq: u64, json: String },
    /// A newly stored checkpoint.
    Checkpoint(Checkpoint),
}

impl Line {
    /// The line's text without its newline.
    fn text(&self) -> Result<String, String> {
        match self {
            Self::Record { json, .. } => Ok(json.clone()),
            Self::Checkpoint(checkpoint) => Ok(crate::lines::checkpoint_line(checkpoint)),
        }
    }

    fn write_to(&self, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Self::Record { json, .. } => out.extend_from_slice(json.as_bytes()),
            Self::Checkpoint(checkpoint) => {
                out.extend_from_slice(crate::lines::checkpoint_line(checkpoint).as_bytes())
            }
        }
        out.push(b'\n');
        Ok(())
    }
}

/// Where the mirror's stream ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Position {
    /// The last record in the stream (0: none).
    last_record: u64,
    /// Checkpoints below this seq are in the stream. Checkpoints are
    /// committed in seq order (each signs the chain head of its time), so
    /// this is one more than the newest checkpoint line; a checkpoint
    /// between this and `last_record` was committed after its record's line
    /// was written, and its own line is missing.
    checkpoints_from: u64,
}

impl Position {
    fn advance(&mut self, line: &Line) {
        match line {
            Line::Record { seq, .. } => self.last_record = self.last_record.max(*seq),
            Line::Checkpoint(checkpoint) => {
                self.checkpoints_from = self.checkpoints_from.max(checkpoint.seq.saturating_add(1));
            }
        }
    }

    /// Both claims hold, so the later of each.
    fn max(self, other: Self) -> Self {
        Self {
            last_record: self.last_record.max(other.last_record),
            checkpoints_from: self.checkpoints_from.max(other.checkpoints_from),
        }
    }
}

/// The bytes after the file's last newline.
#[derive(Debug, Default)]
enum Partial {
    /// The file is empty or ends with a newline.
    #[default]
    None,
    /// A partial last line (a write cut short).
    Bytes(Vec<u8>),
    /// A partial last line longer than [`MAX_LINE`].
    TooLong,
}

#[derive(Debug)]
enum State {
    /// Everything committed is in the stream, which ends at this position.
    InSync(Position),
    /// The stream ends at `position` at the latest (a failed write may have
    /// got further): catch up from the ledger.
    Behind {
        position: Position,
        /// False until the file has been scanned since the last failure
        /// (and at open): what it holds may be ahead of `position`.
        scanned: bool,
        /// The partial last line the scan found, repaired by the next write.
        partial: Partial,
        /// False after a failure, until the next committed group.
        retry: bool,
    },
}

/// The open mirror file and which file it is.
#[derive(Debug)]
struct Out {
    file: File,
    id: FileId,
}

/// A file's identity: a rotation by rename (or a delete and re-create)
/// changes it.
#[cfg(unix)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

#[cfg(unix)]
impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Elsewhere only a missing file is noticed.
#[cfg(not(unix))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId;

#[cfg(not(unix))]
impl FileId {
    fn of(_: &std::fs::Metadata) -> Self {
        Self
    }
}

/// The writer thread's mirror.
#[derive(Debug)]
pub struct Mirror {
    path: PathBuf,
    fsync: bool,
    out: Option<Out>,
    state: State,
    status: Arc<MirrorStatus>,
}

impl Mirror {
    /// A mirror at `path` (fsynced after each write when `fsync`); it starts
    /// behind, so the first [`step`](Self::step) scans the file and catches
    /// it up.
    pub fn new(path: PathBuf, fsync: bool, status: Arc<MirrorStatus>) -> Self {
        Self {
            path,
            fsync,
            out: None,
            state: State::Behind {
                position: Position::default(),
                scanned: false,
                partial: Partial::None,
                retry: true,
            },
            status,
        }
    }

    /// True while a [`step`](Self::step) has work to do.
    pub fn wants_work(&self) -> bool {
        matches!(self.state, State::Behind { retry: true, .. })
    }

    /// A group committed `lines` (in commit order). In sync, they are
    /// appended now; behind, the catch-up will reach them, and this is the
    /// next group a failed mirror waited for to try again.
    pub fn committed(&mut self, lines: &[Line]) {
        match &mut self.state {
            State::InSync(position) => {
                if lines.is_empty() {
                    return;
                }
                let position = *position;
                match self.append(position, lines) {
                    Ok(next) => {
                        self.status.seq.store(next.last_record, Ordering::Relaxed);
                        self.state = State::InSync(next);
                    }
                    Err(error) => self.failed(position, error),
                }
            }
            State::Behind { retry, .. } => *retry = true,
        }
    }

    /// One catch-up step: scans the file if needed, then appends one page
    /// of what the ledger holds past the stream's end. Does nothing unless
    /// [`wants_work`](Self::wants_work).
    pub fn step(&mut self, conn: &Connection) {
        let (position, scanned, partial) = match &mut self.state {
            State::Behind {
                position,
                scanned,
                partial,
                retry: true,
            } => (*position, *scanned, std::mem::take(partial)),
            _ => return,
        };
        match self.catch_up(conn, position, scanned, partial) {
            Ok((next, more)) => {
                self.status.seq.store(next.last_record, Ordering::Relaxed);
                self.state = if more {
                    State::Behind {
                        position: next,
                        scanned: true,
                        partial: Partial::None,
                        retry: true,
                    }
                } else {
                    State::InSync(next)
                };
            }
            Err(error) => self.failed(position, error),
        }
    }

    /// At close: one more attempt, if behind, to bring the mirror in sync.
    pub fn finish(&mut self, conn: &Connection) {
        if let State::Behind { retry, .. } = &mut self.state {
            *retry = true;
        }
        while self.wants_work() {
            self.step(conn);
        }
    }

    /// Counts the failure; the file is scanned again (and reopened) on the
    /// next attempt, which waits for the next committed group.
    fn failed(&mut self, position: Position, error: String) {
        self.status.fail(error);
        self.out = None;
        self.state = State::Behind {
            position,
            scanned: false,
            partial: Partial::None,
            retry: false,
        };
    }

    /// Appends a group's lines to a mirror in sync.
    fn append(&mut self, position: Position, lines: &[Line]) -> Result<Position, String> {
        let mut bytes = Vec::new();
        let mut next = position;
        for line in lines {
            line.write_to(&mut bytes)?;
            next.advance(line);
        }
        self.write(&bytes)?;
        Ok(next)
    }

    /// One step behind: returns the new position and whether the ledger
    /// has more to give.
    fn catch_up(
        &mut self,
        conn: &Connection,
        position: Position,
        scanned: bool,
        partial: Partial,
    ) -> Result<(Position, bool), String> {
        let (position, partial) = if scanned {
            (position, partial)
        } else {
            let file = self.open()?;
            let tail = scan(file, &mut |seq| newest_checkpoint_at_most(conn, seq))?;
            let mut found = tail.position;
            if let Some((seq, hash)) = &tail.last_record
                && !ledger_has(conn, *seq, hash.as_deref())?
            {
                // Not this ledger's record (the database was restored from
                // an older backup, or the file is another ledger's): go on
                // after the last record both hold, so that no record of
                // the ledger is left out. Reported, not fatal.
                let agreed = last_agreed(file, conn)?;
                self.status.fail(format!(
                    "audit mirror {}: its last record, seq {seq}, is not the ledger's (the \
                     database was restored from an older backup, or the file belongs to \
                     another one); appending the ledger's records after seq {agreed}, the \
                     last one both hold",
                    self.path.display()
                ));
                found = Some(Position {
                    last_record: agreed,
                    checkpoints_from: agreed.saturating_add(1),
                });
            }
            let position = match found {
                Some(found) => found.max(position),
                None => position,
            };
            (position, tail.partial)
        };

        let mut lines = Vec::new();
        // Checkpoints of records already in the stream, committed after
        // their records' lines were written.
        let late = read_checkpoints(
            conn,
            position.checkpoints_from,
            position.last_record,
            CATCH_UP_PAGE,
        )?;
        let mut more = late.len() >= CATCH_UP_PAGE;
        lines.extend(late.into_iter().map(Line::Checkpoint));
        if !more {
            let records = read_records(conn, position.last_record, CATCH_UP_PAGE)?;
            more = records.len() >= CATCH_UP_PAGE;
            if let Some(last) = records.last().map(|(seq, _)| *seq) {
                let from = position
                    .checkpoints_from
                    .max(position.last_record.saturating_add(1));
                let checkpoints = read_checkpoints(conn, from, last, CATCH_UP_PAGE)?;
                let mut checkpoints = checkpoints.into_iter().peekable();
                for (seq, json) in records {
                    lines.push(Line::Record { seq, json });
                    while let Some(checkpoint) = checkpoints.next_if(|c| c.seq <= seq) {
                        lines.push(Line::Checkpoint(checkpoint));
                    }
                }
                lines.extend(checkpoints.map(Line::Checkpoint));
            }
        }

        let bytes = repaired(&lines, partial)?;
        if bytes.is_empty() {
            // Nothing to write, but the file is there to be written to.
            self.open()?;
        } else {
            self.write(&bytes)?;
        }
        let mut next = position;
        for line in &lines {
            next.advance(line);
        }
        Ok((next, more))
    }

    /// The open mirror, reopened by path when the path no longer names it
    /// (renamed, deleted), created if missing.
    fn open(&mut self) -> Result<&mut File, String> {
        let at_path = match std::fs::metadata(&self.path) {
            Ok(meta) => Some(FileId::of(&meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.io_error("stat", &e)),
        };
        let current = self.out.take().filter(|out| Some(out.id) == at_path);
        let out = match current {
            Some(out) => out,
            None => {
                let file = OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create(true)
                    .open(&self.path)
                    .map_err(|e| self.io_error("open", &e))?;
                let meta = file.metadata().map_err(|e| self.io_error("stat", &e))?;
                Out {
                    id: FileId::of(&meta),
                    file,
                }
            }
        };
        Ok(&mut self.out.insert(out).file)
    }

    /// Appends `bytes` (whole lines) and flushes them, fsyncing if asked.
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let fsync = self.fsync;
        let file = self.open()?;
        let written = file
            .write_all(bytes)
            .and_then(|()| file.flush())
            .and_then(|()| if fsync { file.sync_data() } else { Ok(()) });
        written.map_err(|e| self.io_error("write", &e))
    }

    fn io_error(&self, what: &str, error: &io::Error) -> String {
        format!("audit mirror {}: {what}: {error}", self.path.display())
    }
}

/// The bytes for `lines`, repairing a partial last line first: completed
/// when it is the start of one of them (a write cut short, whose line is
/// written first, from where it stopped), else ended with a newline and
/// left as an unreadable line.
fn repaired(lines: &[Line], partial: Partial) -> Result<Vec<u8>, String> {
    let mut texts = lines
        .iter()
        .map(Line::text)
        .collect::<Result<Vec<_>, _>>()?;
    let mut bytes = Vec::new();
    match partial {
        Partial::None => {}
        Partial::Bytes(start) => {
            let completes = texts
                .iter()
                .position(|text| text.as_bytes().starts_with(&start));
            if let Some(index) = completes {
                let text = texts.remove(index);
                bytes.extend_from_slice(text.as_bytes().get(start.len()..).unwrap_or_default());
            }
            bytes.push(b'\n');
        }
        Partial::TooLong => bytes.push(b'\n'),
    }
    for text in texts {
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(b'\n');
    }
    Ok(bytes)
}

/// True when the ledger holds a record `seq` with this `hash`.
fn ledger_has(conn: &Connection, seq: u64, hash: Option<&str>) -> Result<bool, String> {
    let stored: Option<String> = conn
        .prepare_cached("SELECT hash FROM audit_events WHERE seq = ?1")
        .and_then(|mut stmt| stmt.query_row([int(seq)], |row| row.get(0)).optional())
        .map_err(|e| format!("audit mirror: read record {seq}: {e}"))?;
    Ok(stored.is_some() && stored.as_deref() == hash)
}

/// The seq of the file's last record line that the ledger holds too (same
/// seq, same hash), 0 if none: read backwards, one line in memory.
fn last_agreed(file: &mut File, conn: &Connection) -> Result<u64, String> {
    let io = |e: io::Error| format!("audit mirror: read: {e}");
    let len = file.metadata().map_err(io)?.len();
    let mut lines = Backwards::new(file, len);
    while let Some(line) = lines.prev().map_err(io)? {
        if let Some(Probed::Record { seq, hash }) = line.as_deref().map(probe)
            && ledger_has(conn, seq, hash.as_deref())?
        {
            return Ok(seq);
        }
    }
    Ok(0)
}

/// A seq as an SQL integer; past `i64::MAX` (never stored) it is `i64::MAX`.
fn int(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Up to `limit` records with a seq above `after`, in seq order: the seq
/// and the stored JSON, exactly as stored.
fn read_records(conn: &Connection, after: u64, limit: usize) -> Result<Vec<(u64, String)>, String> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    conn.prepare_cached("SELECT seq, event FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2")
        .and_then(|mut stmt| {
            stmt.query_map(params![int(after), limit], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(|e| format!("audit mirror: read records: {e}"))?
        .into_iter()
        .map(|(seq, json)| Ok((to_uint("audit seq", seq).map_err(|e| e.to_string())?, json)))
        .collect()
}

/// Up to `limit` checkpoints with `from <= seq <= to`, in seq order.
fn read_checkpoints(
    conn: &Connection,
    from: u64,
    to: u64,
    limit: usize,
) -> Result<Vec<Checkpoint>, String> {
    if from > to {
        return Ok(Vec::new());
    }
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    conn.prepare_cached(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE seq >= ?1 AND seq <= ?2 \
         ORDER BY seq LIMIT ?3"
    ))
    .and_then(|mut stmt| {
        stmt.query_map(params![int(from), int(to), limit], RawCheckpoint::from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
    })
    .map_err(|e| format!("audit mirror: read checkpoints: {e}"))?
    .into_iter()
    .map(|raw| raw.decode().map_err(|e| e.to_string()))
    .collect()
}

/// The newest stored checkpoint's seq at or below `seq`.
fn newest_checkpoint_at_most(conn: &Connection, seq: u64) -> Result<Option<u64>, String> {
    conn.prepare_cached("SELECT max(seq) FROM checkpoints WHERE seq <= ?1")
        .and_then(|mut stmt| stmt.query_row([int(seq)], |row| row.get::<_, Option<i64>>(0)))
        .map_err(|e| format!("audit mirror: read checkpoints: {e}"))?
        .map(|seq| to_uint("checkpoint seq", seq).map_err(|e| e.to_string()))
        .transpose()
}

/// What a scan learnt from the end of the file.
#[derive(Debug, Default)]
struct Tail {
    /// Where the stream in the file ends; `None` when it holds no line.
    position: Option<Position>,
    /// The last complete record line's seq and hash.
    last_record: Option<(u64, Option<String>)>,
    /// A partial last line.
    partial: Partial,
}

/// What a line of the mirror is.
#[derive(Debug)]
enum Probed {
    Record {
        seq: u64,
        hash: Option<String>,
    },
    Checkpoint(u64),
    /// Not a line of ours (a terminated partial line, anything else).
    Other,
}

fn probe(line: &[u8]) -> Probed {
    #[derive(Deserialize)]
    struct Probe {
        seq: Option<u64>,
        hash: Option<String>,
        checkpoint: Option<CheckpointProbe>,
    }
    #[derive(Deserialize)]
    struct CheckpointProbe {
        seq: u64,
    }
    match serde_json::from_slice::<Probe>(line) {
        Ok(Probe {
            checkpoint: Some(checkpoint),
            ..
        }) => Probed::Checkpoint(checkpoint.seq),
        Ok(Probe {
            seq: Some(seq),
            hash,
            checkpoint: None,
        }) => Probed::Record { seq, hash },
        _ => Probed::Other,
    }
}

/// Reads the file backwards from its end, far enough to know where its
/// stream ends: the last record line, and the newest checkpoint line (or,
/// when there is none near the end, how far back checkpoint lines are
/// known to be missing; `newest_checkpoint` gives the newest checkpoint
/// the ledger holds at or below a seq).
fn scan(
    file: &mut File,
    newest_checkpoint: &mut dyn FnMut(u64) -> Result<Option<u64>, String>,
) -> Result<Tail, String> {
    let io = |e: io::Error| format!("audit mirror: read: {e}");
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok(Tail::default());
    }
    let mut lines = Backwards::new(file, len);
    let partial = match lines.prev().map_err(io)? {
        None => Partial::None,
        Some(Some(line)) if line.is_empty() => Partial::None,
        Some(Some(line)) => Partial::Bytes(line),
        Some(None) => Partial::TooLong,
    };

    let mut last_record: Option<(u64, Option<String>)> = None;
    // The first checkpoint line met from the end: the newest.
    let mut newest_line: Option<u64> = None;
    let mut highest_checkpoint = 0_u64;
    // The newest stored checkpoint at or below the last record.
    let mut floor: Option<u64> = None;
    let mut lowest_record = 0_u64;
    while let Some(line) = lines.prev().map_err(io)? {
        let Some(line) = line else { continue };
        match probe(&line) {
            Probed::Checkpoint(seq) => {
                highest_checkpoint = highest_checkpoint.max(seq);
                newest_line.get_or_insert(seq);
                if last_record.is_some() {
                    break;
                }
            }
            Probed::Record { seq, hash } => {
                lowest_record = seq;
                if last_record.is_none() {
                    last_record = Some((seq, hash));
                    if newest_line.is_some() {
                        break;
                    }
                    floor = newest_checkpoint(seq)?;
                }
                // A checkpoint's line comes after its record's: past the
                // record of the newest stored checkpoint, every checkpoint
                // line not met is missing, and nothing older is looked for.
                match floor {
                    None => break,
                    Some(floor) if seq <= floor => break,
                    Some(_) => {}
                }
            }
            Probed::Other => {}
        }
    }

    let position = match (&last_record, newest_line) {
        (None, None) => None,
        // Only checkpoint lines (the records are in a rotated file).
        (None, Some(_)) => Some(Position {
            last_record: highest_checkpoint,
            checkpoints_from: highest_checkpoint.saturating_add(1),
        }),
        (Some((seq, _)), newest) => Some(Position {
            last_record: *seq,
            checkpoints_from: newest.map_or(lowest_record, |c| c.saturating_add(1)),
        }),
    };
    Ok(Tail {
        position,
        last_record,
        partial,
    })
}

/// A file's lines from the last to the first, one chunk in memory.
#[derive(Debug)]
struct Backwards<'a> {
    file: &'a mut File,
    /// Bytes read at a time ([`SCAN_CHUNK`]).
    chunk_size: u64,
    /// The longest line assembled ([`MAX_LINE`]).
    max_line: usize,
    /// Bytes `[0, unread)` are not read yet.
    unread: u64,
    /// The chunk read last; `chunk[..end]` is not consumed yet.
    chunk: Vec<u8>,
    end: usize,
    /// The end of the current line, from later chunks, last part first.
    parts: Vec<Vec<u8>>,
    parts_len: usize,
    too_long: bool,
    done: bool,
}

impl<'a> Backwards<'a> {
    fn new(file: &'a mut File, len: u64) -> Self {
        Self::with_limits(file, len, SCAN_CHUNK, MAX_LINE)
    }

    fn with_limits(file: &'a mut File, len: u64, chunk_size: u64, max_line: usize) -> Self {
        Self {
            file,
            chunk_size: chunk_size.max(1),
            max_line,
            unread: len,
            chunk: Vec::new(),
            end: 0,
            parts: Vec::new(),
            parts_len: 0,
            too_long: false,
            done: false,
        }
    }

    /// The line before the ones returned so far (without its newline;
    /// the first is what follows the last newline, empty if the file ends
    /// with one): `Some(None)` for a line longer than the limit, `None`
    /// after the first line of the file.
    fn prev(&mut self) -> io::Result<Option<Option<Vec<u8>>>> {
        loop {
            if self.done {
                return Ok(None);
            }
            let region = self.chunk.get(..self.end).unwrap_or_default();
            if let Some(newline) = region.iter().rposition(|&b| b == b'\n') {
                let start = region.get(newline + 1..).unwrap_or_default().to_vec();
                self.end = newline;
                return Ok(Some(self.take_line(start)));
            }
            let start = region.to_vec();
            self.end = 0;
            if self.unread == 0 {
                self.done = true;
                return Ok(Some(self.take_line(start)));
            }
            self.keep(start);
            let n = self.chunk_size.min(self.unread);
            self.unread -= n;
            self.chunk
                .resize(usize::try_from(n).unwrap_or(usize::MAX), 0);
            self.file.seek(SeekFrom::Start(self.unread))?;
            self.file.read_exact(&mut self.chunk)?;
            self.end = self.chunk.len();
        }
    }

    /// Keeps `part` as the new start of the current line.
    fn keep(&mut self, part: Vec<u8>) {
        if self.too_long {
            return;
        }
        self.parts_len += part.len();
        if self.parts_len > self.max_line {
            self.too_long = true;
            self.parts.clear();
        } else {
            self.parts.push(part);
        }
    }

    /// The current line, `start` being its first part.
    fn take_line(&mut self, start: Vec<u8>) -> Option<Vec<u8>> {
        self.keep(start);
        let too_long = std::mem::replace(&mut self.too_long, false);
        self.parts_len = 0;
        let parts = std::mem::take(&mut self.parts);
        if too_long {
            return None;
        }
        Some(parts.into_iter().rev().flatten().collect())
    }
}

/// True when `a` and `b` name the same file: both exist and are one file,
/// or neither path resolves and they are the same path.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    if let (Ok(a), Ok(b)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return FileId::of(&a) == FileId::of(&b);
    }
    let resolved = |p: &Path| {
        std::fs::canonicalize(p)
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    resolved(a) == resolved(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_lines(text: &[u8], chunk: u64, max_line: usize) -> Vec<Option<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines");
        std::fs::write(&path, text).unwrap();
        let mut file = File::open(&path).unwrap();
        let mut lines = Backwards::with_limits(&mut file, text.len() as u64, chunk, max_line);
        let mut out = Vec::new();
        while let Some(line) = lines.prev().unwrap() {
            out.push(line.map(|l| String::from_utf8(l).unwrap()));
        }
        out
    }

    fn some(lines: &[&str]) -> Vec<Option<String>> {
        lines.iter().map(|l| Some((*l).to_owned())).collect()
    }

    /// Every chunk size gives the same lines, whatever falls on a chunk
    /// boundary (a newline, the middle of a line, several lines).
    #[test]
    fn backwards_reads_lines_across_chunks() {
        let text = b"first line\n\nthird, longer line\nx\nlast without newline";
        for chunk in 1..=u64::try_from(text.len()).unwrap() + 1 {
            assert_eq!(
                all_lines(text, chunk, 100),
                some(&[
                    "last without newline",
                    "x",
                    "third, longer line",
                    "",
                    "first line"
                ]),
                "chunk {chunk}"
            );
        }
        // Ending with a newline: the first line returned is empty.
        assert_eq!(all_lines(b"a\nb\n", 3, 100), some(&["", "b", "a"]));
        assert_eq!(all_lines(b"\n", 1, 100), some(&["", ""]));
        assert_eq!(all_lines(b"", 4, 100), some(&[""]));
    }

    /// A line over the limit is reported as such, and the lines around it
    /// are still read.
    #[test]
    fn backwards_skips_lines_over_the_limit() {
        let text = b"short\n0123456789abcdef\nok\n0123456789";
        for chunk in [1, 4, 7, 64] {
            assert_eq!(
                all_lines(text, chunk, 8),
                vec![None, Some("ok".into()), None, Some("short".into())],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn lines_are_probed_by_their_seq() {
        assert!(matches!(
            probe(br#"{"seq":7,"ts":1,"args":{"seq":9,"checkpoint":{}},"hash":"ab"}"#),
            Probed::Record { seq: 7, hash: Some(h) } if h == "ab"
        ));
        assert!(matches!(
            probe(br#"{"checkpoint":{"seq":5,"hash":"ab","ts":1,"kid":"k","sig":"s"}}"#),
            Probed::Checkpoint(5)
        ));
        for other in [
            &b"{\"seq\":7,\"ts\""[..],
            b"",
            b"[]",
            b"{}",
            b"{\"seq\":-1}",
        ] {
            assert!(matches!(probe(other), Probed::Other), "{other:?}");
        }
    }

    /// A partial line is completed by the line it starts, whichever it is;
    /// otherwise it is ended.
    #[test]
    fn a_partial_line_is_completed_or_ended() {
        let lines = [
            Line::Record {
                seq: 4,
                json: r#"{"seq":4}"#.into(),
            },
            Line::Record {
                seq: 5,
                json: r#"{"seq":5}"#.into(),
            },
        ];
        let text = |partial| String::from_utf8(repaired(&lines, partial).unwrap()).unwrap();
        assert_eq!(text(Partial::None), "{\"seq\":4}\n{\"seq\":5}\n");
        assert_eq!(
            text(Partial::Bytes(br#"{"seq":5"#.to_vec())),
            "}\n{\"seq\":4}\n"
        );
        assert_eq!(
            text(Partial::Bytes(b"{".to_vec())),
            "\"seq\":4}\n{\"seq\":5}\n"
        );
        assert_eq!(
            text(Partial::Bytes(br#"{"seq":6"#.to_vec())),
            "\n{\"seq\":4}\n{\"seq\":5}\n"
        );
        assert_eq!(text(Partial::TooLong), "\n{\"seq\":4}\n{\"seq\":5}\n");
        assert_eq!(
            String::from_utf8(repaired(&[], Partial::Bytes(b"x".to_vec())).unwrap()).unwrap(),
            "\n"
        );
    }
}
