//! Audit tiers (DESIGN section 6; `docs/audit-format.md`, "Tiers"): the
//! hot tier is the store; records older than `audit.hot_days` move, whole
//! checkpoint segments at a time, into compressed segment files in
//! `audit.archive_dir` (the cold tier); records older than
//! `audit.retention_days` are deleted, from the archive or, without one,
//! from the store. Every move and every deletion is itself an audit record
//! (`audit.archived`, `audit.dropped`), committed in the same transaction
//! as the deletion from the store, and a fresh signed checkpoint covers it
//! at once, so `audit verify` can tell a log that was tiered from one whose
//! front was cut off.
//!
//! # Order of effects (nothing lost, whatever fails when)
//!
//! * Archiving: the segment file is written under a temporary name, synced,
//!   renamed into place and the folder synced; only then does one
//!   transaction append `audit.archived` and delete the records
//!   ([`Op::PruneAudit`]). A crash before the commit leaves a file whose
//!   records are still in the store (the next pass writes it again); a
//!   failed commit deletes nothing.
//! * Dropping a segment file: `audit.dropped` is committed first, then the
//!   file is deleted. A crash in between leaves the file (the next pass
//!   finds it older than the retention window and drops it again, with a
//!   second record).
//!
//! In a cluster every replica runs the pass; of two racing on one segment
//! exactly one commits (the other's prune is refused with
//! [`PRUNE_MOVED`]). Give `archive_dir` to one replica, or the same shared
//! folder to all.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use portcullis_core::Timestamp;
use portcullis_store::{
    AuditEvent, AuditQuery, Checkpoint, EventKind, NewEvent, Op, PRUNE_MOVED, Store, StoreError,
    chain,
};
use portcullis_token::KeyRing;
use serde_json::{Value, json};

use portcullis_store::lines::{self, Line, Place};
pub use portcullis_store::lines::{SEGMENT_FORMAT, SegmentHeader};

use crate::audit::{
    LineFile, all_checkpoints, checkpoint_lines, export_line, page_after, push_lines,
    push_store_records, sign_checkpoint,
};
use crate::witness::WitnessSummary;

/// At most this many records go into one segment file (more than one
/// checkpoint segment may share a file; a single segment longer than this
/// still goes whole).
pub const MAX_FILE_RECORDS: u64 = 100_000;
/// Longest line a segment file or an export may have.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Where and when records move and go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiers {
    /// Records whose segment ended longer ago than this move to the archive.
    pub hot_ms: u64,
    /// The cold tier's folder; `None`: no archive, records stay in the store
    /// until they are dropped.
    pub archive_dir: Option<PathBuf>,
    /// Records (in the store or the archive) older than this are deleted.
    pub retention_ms: u64,
}

impl Tiers {
    /// The `[audit]` settings, `archive_dir` resolved against the
    /// configuration's folder.
    pub fn from_config(loaded: &portcullis_config::LoadedConfig) -> Self {
        let audit = &loaded.config.audit;
        Self {
            hot_ms: u64::from(audit.hot_days).saturating_mul(DAY_MS),
            archive_dir: audit.archive_dir.as_deref().map(|d| loaded.resolve(d)),
            retention_ms: u64::from(audit.retention_days).saturating_mul(DAY_MS),
        }
    }
}

/// One run of records, `first_seq..=last_seq`, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The first record.
    pub first_seq: u64,
    /// The last record.
    pub last_seq: u64,
    /// The segment file written or deleted, if any.
    pub file: Option<String>,
    /// The seq of the `audit.archived` or `audit.dropped` record.
    pub recorded_at: u64,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Runs moved from the store into segment files.
    pub archived: Vec<Moved>,
    /// Runs deleted for good (segment files, or store records without an
    /// archive).
    pub dropped: Vec<Moved>,
    /// Another replica moved the same records first (this pass stopped).
    pub raced: bool,
}

/// A segment file of the archive, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentFile {
    /// Its path.
    pub path: PathBuf,
    /// Its first record.
    pub first_seq: u64,
    /// Its last record.
    pub last_seq: u64,
}

/// The file name of the segment `first..=last`: zero-padded so that names
/// sort in log order.
pub fn segment_name(first: u64, last: u64) -> String {
    format!("segment-{first:020}-{last:020}.jsonl.gz")
}

fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let middle = name.strip_prefix("segment-")?.strip_suffix(".jsonl.gz")?;
    let (first, last) = middle.split_once('-')?;
    if first.len() != 20 || last.len() != 20 {
        return None;
    }
    let (first, last) = (first.parse().ok()?, last.parse().ok()?);
    (first >= 1 && first <= last).then_some((first, last))
}

/// The segment files in `dir`, in log order. Other files are ignored. Of
/// files that start at the same seq (a crash left an older, shorter one
/// behind), the longest is the archive's.
pub fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>, String> {
    let mut files = list_all_segments(dir)?;
    files.sort_by_key(|f| (f.first_seq, std::cmp::Reverse(f.last_seq)));
    files.dedup_by_key(|f| f.first_seq);
    Ok(files)
}

/// Lines of `reader`, each at most [`MAX_LINE_BYTES`]; a longer one is an
/// error, not an allocation.
#[derive(Debug)]
pub struct BoundedLines<R> {
    reader: R,
    line: u64,
}

impl<R: BufRead> BoundedLines<R> {
    /// Reads `reader` line by line.
    pub fn new(reader: R) -> Self {
        Self { reader, line: 0 }
    }
}

impl<R: BufRead> Iterator for BoundedLines<R> {
    type Item = Result<String, String>;

    fn next(&mut self) -> Option<Self::Item> {
        self.line += 1;
        let mut buf = Vec::new();
        let limit = u64::try_from(MAX_LINE_BYTES).unwrap_or(u64::MAX) + 1;
        match (&mut self.reader).take(limit).read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                } else if buf.len() > MAX_LINE_BYTES {
                    return Some(Err(format!(
                        "line {} is longer than {MAX_LINE_BYTES} bytes",
                        self.line
                    )));
                }
                Some(String::from_utf8(buf).map_err(|_| format!("line {} is not UTF-8", self.line)))
            }
            Err(e) => Some(Err(format!("line {}: {e}", self.line))),
        }
    }
}

/// The decompressed lines of a segment file.
pub fn segment_lines(path: &Path) -> Result<BoundedLines<BufReader<GzDecoder<File>>>, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(BoundedLines::new(BufReader::new(GzDecoder::new(file))))
}

/// The header of a segment file (its first line, in its exact form).
pub fn read_header(path: &Path) -> Result<SegmentHeader, String> {
    let first = segment_lines(path)?
        .next()
        .unwrap_or_else(|| Err("empty".into()))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match lines::parse_line(&first, Place::SegmentStart) {
        Ok(Line::Segment(header)) => Ok(header),
        Ok(_) => Err(format!(
            "{}: the first line is not a segment header",
            path.display()
        )),
        Err(e) => Err(format!("{}: line 1: {e}", path.display())),
    }
}

/// The seq below the oldest record of the store (0 when nothing was ever
/// pruned, or the log is empty).
pub async fn store_floor(store: &dyn Store) -> Result<u64, String> {
    let first = store
        .audit(&AuditQuery {
            since_seq: Some(0),
            limit: Some(1),
            ..AuditQuery::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(first.first().map_or(0, |e| e.seq.saturating_sub(1)))
}

async fn record_at(store: &dyn Store, seq: u64) -> Result<Option<AuditEvent>, String> {
    let page = page_after(store, seq.saturating_sub(1)).await?;
    Ok(page.into_iter().find(|e| e.seq == seq))
}

/// The end of the longest run of whole checkpoint segments from the front
/// of the store (`floor + 1 ..= end`) whose last record is older than
/// `cutoff` and which holds at most [`MAX_FILE_RECORDS`] records (or the
/// first such segment, if it alone is longer). It may end at the chain's
/// head: the batch that prunes it appends the record that says so first.
async fn eligible_end(
    store: &dyn Store,
    floor: u64,
    cutoff: u64,
) -> Result<Option<(u64, AuditEvent)>, String> {
    let Some((head, _)) = store.chain_head().await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let checkpoints = all_checkpoints(store).await?;
    let mut best: Option<(u64, AuditEvent)> = None;
    for c in checkpoints
        .iter()
        .filter(|c| c.seq > floor && c.seq <= head)
    {
        if best.is_some() && c.seq - floor > MAX_FILE_RECORDS {
            break;
        }
        let Some(record) = record_at(store, c.seq).await? else {
            break;
        };
        if record.event.ts.0 >= cutoff {
            break;
        }
        best = Some((c.seq, record));
    }
    Ok(best)
}

fn tiering_event(
    now: Timestamp,
    kind: EventKind,
    first_seq: u64,
    last_seq: u64,
    extra: &[(&str, &str)],
) -> NewEvent {
    let mut args = json!({
        "first_seq": first_seq,
        "through_seq": last_seq,
        "records": last_seq - first_seq + 1,
    });
    if let Value::Object(map) = &mut args {
        for (k, v) in extra {
            map.insert((*k).to_owned(), Value::String((*v).to_owned()));
        }
    }
    let mut event = NewEvent::new(now, kind);
    event.args = Some(args);
    event.detail = Some(match kind {
        EventKind::AuditArchived => {
            format!("records {first_seq}..={last_seq} moved to the archive")
        }
        _ => format!("records {first_seq}..={last_seq} deleted: older than retention_days"),
    });
    event
}

/// Runs one pass: archive what is older than the hot window, drop what is
/// older than the retention window, as of `now`. Signs a checkpoint after
/// each change so the record that tells of it is covered at once.
pub async fn run_pass(
    store: &dyn Store,
    ring: &KeyRing,
    tiers: &Tiers,
    now: Timestamp,
) -> Result<PassReport, String> {
    let mut report = PassReport::default();
    if let Some(dir) = &tiers.archive_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cutoff = now.0.saturating_sub(tiers.hot_ms);
        while !report.raced {
            let floor = store_floor(store).await?;
            let Some((end, last)) = eligible_end(store, floor, cutoff).await? else {
                break;
            };
            archive_run(store, ring, dir, floor, end, &last, now, &mut report).await?;
        }
        drop_archived(
            store,
            ring,
            dir,
            now.0.saturating_sub(tiers.retention_ms),
            now,
            &mut report,
        )
        .await?;
    } else {
        let cutoff = now.0.saturating_sub(tiers.retention_ms);
        while !report.raced {
            let floor = store_floor(store).await?;
            let Some((end, _)) = eligible_end(store, floor, cutoff).await? else {
                break;
            };
            let event = tiering_event(
                now,
                EventKind::AuditDropped,
                floor + 1,
                end,
                &[("from", "store")],
            );
            match prune(store, event, floor, end).await? {
                Some(at) => {
                    report.dropped.push(Moved {
                        first_seq: floor + 1,
                        last_seq: end,
                        file: None,
                        recorded_at: at,
                    });
                    sign_checkpoint(store, ring, now, 0).await?;
                }
                None => report.raced = true,
            }
        }
    }
    Ok(report)
}

/// Commits the tiering record and the prune in one batch; `None` when
/// another pass pruned first.
async fn prune(
    store: &dyn Store,
    event: NewEvent,
    floor: u64,
    end: u64,
) -> Result<Option<u64>, String> {
    match store
        .commit(vec![
            Op::Append(event),
            Op::PruneAudit {
                after_seq: floor,
                through_seq: end,
            },
        ])
        .await
    {
        Ok(committed) => Ok(committed.seqs.first().copied()),
        Err(StoreError::Conflict(m)) if m == PRUNE_MOVED => Ok(None),
        Err(e) => Err(format!("prune audit records {}..={end}: {e}", floor + 1)),
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site, every value distinct"
)]
async fn archive_run(
    store: &dyn Store,
    ring: &KeyRing,
    dir: &Path,
    floor: u64,
    end: u64,
    last: &AuditEvent,
    now: Timestamp,
    report: &mut PassReport,
) -> Result<(), String> {
    let name = segment_name(floor + 1, end);
    let path = dir.join(&name);
    if let Err(e) = write_segment(store, dir, &name, floor, end, last.event.ts.0).await {
        // Records gone while they were read: another pass moved them.
        if store_floor(store).await? != floor {
            report.raced = true;
            return Ok(());
        }
        return Err(e);
    }
    let event = tiering_event(
        now,
        EventKind::AuditArchived,
        floor + 1,
        end,
        &[("file", &name)],
    );
    match prune(store, event, floor, end).await? {
        Some(at) => {
            report.archived.push(Moved {
                first_seq: floor + 1,
                last_seq: end,
                file: Some(name.clone()),
                recorded_at: at,
            });
            sign_checkpoint(store, ring, now, 0).await?;
            // Files a crash left behind for part of this run are stale now.
            for stale in list_all_segments(dir)? {
                if stale.path != path && (floor + 1..=end).contains(&stale.first_seq) {
                    let _ = std::fs::remove_file(&stale.path);
                }
            }
        }
        None => {
            // Another replica archived first. A file of the same name holds
            // the same records (the chain decides them); another name is
            // this pass's own, uncommitted: it goes.
            report.raced = true;
            let theirs = list_all_segments(dir)?
                .iter()
                .any(|f| f.path != path && f.first_seq == floor + 1);
            if theirs {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(())
}

/// Every segment file of `dir` (none if it does not exist), in no
/// order, without the longest-wins selection of [`list_segments`].
fn list_all_segments(dir: &Path) -> Result<Vec<SegmentFile>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some((first_seq, last_seq)) = entry.file_name().to_str().and_then(parse_segment_name)
        {
            out.push(SegmentFile {
                path: entry.path(),
                first_seq,
                last_seq,
            });
        }
    }
    Ok(out)
}

/// Writes `floor + 1 ..= end` as a segment file: the header, the anchor
/// checkpoint (of `floor`), then the records with each checkpoint after the
/// record it covers — an export (`audit export`) with a header line,
/// gzip-compressed. Written under a temporary name, synced, renamed, the
/// folder synced.
async fn write_segment(
    store: &dyn Store,
    dir: &Path,
    name: &str,
    floor: u64,
    end: u64,
    last_ts: u64,
) -> Result<(), String> {
    let checkpoints: Vec<Checkpoint> = all_checkpoints(store)
        .await?
        .into_iter()
        .filter(|c| c.seq >= floor && c.seq <= end)
        .collect();
    // A name of this writer's own: two passes (or replicas sharing the
    // folder) may write the same segment at once.
    let unique = portcullis_token::random_id("").map_err(|e| e.to_string())?;
    let tmp = dir.join(format!(".{name}.{unique}.tmp"));
    let written = write_segment_to(store, &tmp, &checkpoints, floor, end, last_ts).await;
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| format!("{}: {e}", tmp.display()))?;
    sync_dir(dir)
}

/// The body of [`write_segment`]: the file at `tmp`, written and synced.
async fn write_segment_to(
    store: &dyn Store,
    tmp: &Path,
    checkpoints: &[Checkpoint],
    floor: u64,
    end: u64,
    last_ts: u64,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
    let file = File::create(tmp).map_err(io)?;
    let mut gz = GzEncoder::new(std::io::BufWriter::new(file), Compression::default());
    let header = SegmentHeader {
        format: SEGMENT_FORMAT.to_owned(),
        first_seq: floor + 1,
        last_seq: end,
        records: end - floor,
        last_ts,
    };
    writeln!(gz, "{}", lines::segment_line(&header)).map_err(io)?;
    let mut pending = checkpoints.iter().peekable();
    let mut write_checkpoints_to = |gz: &mut GzEncoder<_>, seq: u64| -> Result<(), String> {
        while let Some(c) = pending.next_if(|c| c.seq <= seq) {
            writeln!(gz, "{}", lines::checkpoint_line(c)).map_err(io)?;
        }
        Ok(())
    };
    write_checkpoints_to(&mut gz, floor)?;
    let mut after = floor;
    let mut written = 0u64;
    while after < end {
        let page = page_after(store, after).await?;
        let Some(last) = page.last().map(|e| e.seq) else {
            break;
        };
        for record in page.iter().take_while(|r| r.seq <= end) {
            if record.seq != after + 1 {
                return Err(format!(
                    "archive {}..={end}: record {} is missing from the store",
                    floor + 1,
                    after + 1
                ));
            }
            writeln!(gz, "{}", export_line(record)).map_err(io)?;
            write_checkpoints_to(&mut gz, record.seq)?;
            after = record.seq;
            written += 1;
        }
        if last > end {
            break;
        }
    }
    if written != end - floor {
        return Err(format!(
            "archive {}..={end}: the store holds {written} of its {} records",
            floor + 1,
            end - floor
        ));
    }
    let writer = gz.finish().map_err(io)?;
    let file = writer.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Drops the oldest segment files, in order, while their last record is
/// older than `cutoff` and they were committed (wholly below the store's
/// floor).
async fn drop_archived(
    store: &dyn Store,
    ring: &KeyRing,
    dir: &Path,
    cutoff: u64,
    now: Timestamp,
    report: &mut PassReport,
) -> Result<(), String> {
    let floor = store_floor(store).await?;
    for file in list_segments(dir)? {
        if file.last_seq > floor {
            break;
        }
        let header = read_header(&file.path)?;
        if header.last_ts >= cutoff {
            break;
        }
        let name = file
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let event = tiering_event(
            now,
            EventKind::AuditDropped,
            file.first_seq,
            file.last_seq,
            &[("from", "archive"), ("file", &name)],
        );
        let committed = store
            .commit(vec![Op::Append(event)])
            .await
            .map_err(|e| format!("record the drop of {name}: {e}"))?;
        sign_checkpoint(store, ring, now, 0).await?;
        std::fs::remove_file(&file.path).map_err(|e| format!("{}: {e}", file.path.display()))?;
        sync_dir(dir)?;
        report.dropped.push(Moved {
            first_seq: file.first_seq,
            last_seq: file.last_seq,
            file: Some(name),
            recorded_at: committed.seqs.first().copied().unwrap_or(0),
        });
    }
    Ok(())
}

/// How often `serve` runs a pass (the first one a minute after start).
pub const PASS_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Runs [`run_pass`] every [`PASS_EVERY`] until `shutdown` resolves. A
/// failed pass is logged and tried again at the next turn; nothing is
/// deleted from the store unless its move or deletion was recorded.
pub async fn run_passes(
    gw: std::sync::Arc<crate::state::Gateway>,
    tiers: Tiers,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut wait = std::time::Duration::from_secs(60).min(PASS_EVERY);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = PASS_EVERY;
        match run_pass(gw.store.as_ref(), &gw.ring, &tiers, gw.now()).await {
            Ok(report) => {
                for m in &report.archived {
                    tracing::info!(first_seq = m.first_seq, last_seq = m.last_seq, file = ?m.file, "audit records archived");
                }
                for m in &report.dropped {
                    tracing::info!(first_seq = m.first_seq, last_seq = m.last_seq, file = ?m.file, "audit records dropped (retention)");
                }
            }
            Err(e) => tracing::error!(error = %e, "audit tiering pass failed"),
        }
    }
}

/// Verifies the archive in `dir`, then (with `store`) the store's records
/// after it, as one log: every checkpoint of both, signatures checked with
/// `check_sig`. Without the store, an archive that starts late is accepted
/// on its anchor checkpoint ([`chain::Report::anchor`] says where).
pub async fn verify_archive(
    dir: &Path,
    store: Option<&dyn Store>,
    check_sig: &dyn Fn(&Checkpoint) -> bool,
    progress: &mut dyn FnMut(u64),
) -> Result<chain::Report, String> {
    Ok(
        verify_archive_witnessed(dir, store, check_sig, &[], progress)
            .await?
            .0,
    )
}

/// [`verify_archive`], held against the checkpoints of a witness
/// ([`crate::witness::hold_against`]): every witnessed checkpoint from
/// where the archive starts on must be one of the archive's or the
/// store's.
pub async fn verify_archive_witnessed(
    dir: &Path,
    store: Option<&dyn Store>,
    check_sig: &dyn Fn(&Checkpoint) -> bool,
    witness: &[Checkpoint],
    progress: &mut dyn FnMut(u64),
) -> Result<(chain::Report, WitnessSummary), String> {
    let files = list_segments(dir)?;
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    for file in &files {
        checkpoints.extend(checkpoint_lines(
            segment_lines(&file.path)?,
            segment_kind(file),
        ));
    }
    if let Some(store) = store {
        checkpoints.extend(all_checkpoints(store).await?);
    }
    let all = crate::witness::with_witness(&checkpoints, witness);
    let mut verifier = if store.is_some() {
        chain::Verifier::archive(&all)
    } else {
        chain::Verifier::archive_alone(&all)
    };
    let mut going = true;
    for file in &files {
        let label = format!("{}: ", file.path.display());
        going = push_lines(
            segment_lines(&file.path)?,
            segment_kind(file),
            &label,
            &mut verifier,
            progress,
        );
        if !going {
            break;
        }
    }
    if let Some(store) = store
        && going
    {
        let after = files.last().map_or(0, |f| f.last_seq);
        push_store_records(store, &mut verifier, after, progress).await?;
    }
    progress(verifier.records());
    let mut report = verifier.finish(check_sig);
    let summary = crate::witness::hold_against(&mut report, &checkpoints, witness);
    Ok((report, summary))
}

fn segment_kind(file: &SegmentFile) -> LineFile {
    LineFile::Segment {
        first_seq: file.first_seq,
        last_seq: file.last_seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_log_order_and_parse_back() {
        let a = segment_name(1, 1000);
        let b = segment_name(1001, 20_000);
        assert!(a < b);
        assert_eq!(parse_segment_name(&a), Some((1, 1000)));
        assert_eq!(parse_segment_name(&b), Some((1001, 20_000)));
        for bad in [
            "segment-1-2.jsonl.gz",
            "segment-00000000000000000002-00000000000000000001.jsonl.gz",
            "segment-00000000000000000000-00000000000000000001.jsonl.gz",
            ".segment-00000000000000000001-00000000000000000002.jsonl.gz.tmp",
            "notes.txt",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn bounded_lines_refuse_a_line_too_long() {
        let mut text = b"short\n".to_vec();
        text.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 1));
        text.extend(b"\nafter\n");
        let mut lines = BoundedLines::new(std::io::Cursor::new(text));
        assert_eq!(lines.next(), Some(Ok("short".into())));
        assert!(matches!(lines.next(), Some(Err(e)) if e.contains("longer than")));
    }
}
