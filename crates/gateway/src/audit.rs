//! The audit log around the ledger: signed checkpoints of the hash chain,
//! and the library side of `portcullis audit verify | export | tail`.
//!
//! The chain itself (each record's `prev_hash` and `hash`) is computed by
//! the store's writer, in commit order; the format is `docs/audit-format.md`.
//! Here the gateway signs the chain's head with its Ed25519 key every
//! `audit.checkpoint_every` records or `audit.checkpoint_interval`,
//! whichever comes first, and once more on shutdown.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use portcullis_store::{AuditEvent, AuditQuery, Checkpoint, Op, Store, chain};
use portcullis_token::KeyRing;
use serde_json::Value;

use portcullis_store::lines::{self, Line, Place};

use crate::state::Gateway;
use crate::tiering::BoundedLines;
use crate::witness::WitnessSummary;

/// Records read per page when streaming the log.
const PAGE: usize = 1000;

impl Gateway {
    /// Signs the chain's head if it has moved since `last_seq`; returns the
    /// checkpoint written, if any.
    /// With a witness (`audit.witness_dir`), the checkpoint is appended to
    /// it once the store has committed it ([`Gateway::witness_catch_up`]).
    pub async fn checkpoint(&self, last_seq: u64) -> Result<Option<Checkpoint>, String> {
        let signed = sign_checkpoint(self.store.as_ref(), &self.ring, self.now(), last_seq).await;
        self.witness_catch_up().await;
        signed
    }

    /// Appends the store's checkpoints that the witness does not hold yet,
    /// if there is a witness. A failure is logged and counted
    /// (`portcullis_audit_witness_failures_total`), never passed to a
    /// caller's request: it is retried at the checkpoint writer's next
    /// turn. Returns false on a failure.
    pub async fn witness_catch_up(&self) -> bool {
        let Some(witness) = &self.witness else {
            return true;
        };
        match witness.catch_up(self.store.as_ref(), &self.ring).await {
            Ok(_) => true,
            Err(e) => {
                self.metrics.witness_failure();
                tracing::error!(
                    error = %e,
                    "audit witness not written: the store's newest checkpoints are not \
                     witnessed yet (retried every second)"
                );
                false
            }
        }
    }
}

/// Signs the chain's head with `ring`'s signing key, at `ts`, if it is
/// past `last_seq`; returns the checkpoint written, if any. Signing a head
/// that already has a checkpoint is a no-op (the same checkpoint again, or
/// a [`CHECKPOINT_EXISTS`](portcullis_store::CHECKPOINT_EXISTS) conflict
/// taken as done).
pub async fn sign_checkpoint(
    store: &dyn Store,
    ring: &KeyRing,
    ts: portcullis_core::Timestamp,
    last_seq: u64,
) -> Result<Option<Checkpoint>, String> {
    let Some((seq, hash)) = store.chain_head().await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    if seq <= last_seq {
        return Ok(None);
    }
    let message = portcullis_store::checkpoint_message(seq, &hash, ts);
    let (kid, sig) = ring.sign_detached(&message).map_err(|e| e.to_string())?;
    let checkpoint = Checkpoint {
        seq,
        hash,
        ts,
        kid,
        sig,
    };
    match store
        .commit(vec![Op::AppendCheckpoint(checkpoint.clone())])
        .await
    {
        Ok(_) => Ok(Some(checkpoint)),
        // Another writer (a replica, the tiering pass) signed this head
        // first: it is covered.
        Err(portcullis_store::StoreError::Conflict(m))
            if m == portcullis_store::CHECKPOINT_EXISTS =>
        {
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Writes checkpoints until `shutdown` resolves, then one last one.
pub async fn run_checkpoints(
    gw: Arc<Gateway>,
    every: u64,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut last_seq = all_checkpoints(gw.store.as_ref())
        .await
        .ok()
        .and_then(|c| c.last().map(|c| c.seq))
        .unwrap_or(0);
    let mut since = tokio::time::Instant::now();
    let mut shutdown = std::pin::pin!(shutdown);
    let poll = Duration::from_secs(1).min(interval);
    loop {
        let stopping = tokio::select! {
            () = &mut shutdown => true,
            () = tokio::time::sleep(poll) => false,
        };
        let head = gw
            .store
            .chain_head()
            .await
            .ok()
            .flatten()
            .map_or(0, |(s, _)| s);
        let due = head > last_seq
            && (head - last_seq >= every || since.elapsed() >= interval || stopping);
        if due {
            match gw.checkpoint(last_seq).await {
                Ok(Some(c)) => {
                    last_seq = c.seq;
                    since = tokio::time::Instant::now();
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "audit checkpoint failed"),
            }
        }
        if !due && gw.witness.is_some() {
            // Checkpoints another writer signed (the tiering pass, a
            // replica), and a witness append that failed before.
            gw.witness_catch_up().await;
        }
        if stopping {
            return;
        }
    }
}

/// Every checkpoint, in `seq` order (read a page at a time).
pub async fn all_checkpoints(store: &dyn Store) -> Result<Vec<Checkpoint>, String> {
    let mut out: Vec<Checkpoint> = Vec::new();
    loop {
        let after = out.last().map(|c| c.seq);
        let page = store
            .checkpoints(after, PAGE)
            .await
            .map_err(|e| e.to_string())?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page);
    }
}

/// The records after `after` (exclusive), one page of at most [`PAGE`].
pub(crate) async fn page_after(store: &dyn Store, after: u64) -> Result<Vec<AuditEvent>, String> {
    store
        .audit(&AuditQuery {
            since_seq: Some(after),
            limit: Some(PAGE),
            ..AuditQuery::default()
        })
        .await
        .map_err(|e| e.to_string())
}

/// One record as an export line: its canonical JSON, as the stores keep
/// new records ([`chain::encode`]). Checkpoint lines are
/// `{"checkpoint": …}`, written by [`export`] after the record they cover.
pub fn export_line(event: &AuditEvent) -> String {
    chain::encode(event)
}

/// Writes the log from `since_seq` (exclusive) as JSON Lines, checkpoints
/// interleaved after the records they cover. Returns the records written.
pub async fn export(store: &dyn Store, since_seq: u64, out: &mut dyn Write) -> Result<u64, String> {
    let mut checkpoints = all_checkpoints(store).await?;
    checkpoints.retain(|c| c.seq > since_seq);
    let mut next_checkpoint = checkpoints.iter().peekable();
    let mut after = since_seq;
    let mut written = 0u64;
    loop {
        let page = page_after(store, after).await?;
        let Some(last) = page.last().map(|e| e.seq) else {
            return Ok(written);
        };
        for event in &page {
            writeln!(out, "{}", export_line(event)).map_err(|e| e.to_string())?;
            written += 1;
            while let Some(c) = next_checkpoint.next_if(|c| c.seq <= event.seq) {
                writeln!(out, "{}", lines::checkpoint_line(c)).map_err(|e| e.to_string())?;
            }
        }
        after = last;
    }
}

/// A checkpoint's signature, checked with the key of its `kid` in `ring`
/// (every key in it, whatever its JWT window).
pub fn ring_check(ring: &KeyRing) -> impl Fn(&Checkpoint) -> bool + '_ {
    move |c: &Checkpoint| {
        ring.verify_detached(
            &c.kid,
            &portcullis_store::checkpoint_message(c.seq, &c.hash, c.ts),
            &c.sig,
        )
    }
}

/// A checkpoint's signature, checked with the key of its `kid` in a JWKS
/// document (a copy of `/.well-known/jwks.json`).
pub fn jwks_check(jwks: &Value) -> impl Fn(&Checkpoint) -> bool + '_ {
    move |c: &Checkpoint| {
        portcullis_token::verify_detached_with_jwks(
            jwks,
            &c.kid,
            &portcullis_store::checkpoint_message(c.seq, &c.hash, c.ts),
            &c.sig,
        )
    }
}

/// Streams the store's records after `after` into `verifier`, a page at a
/// time (one page in memory), until the end or its first problem.
pub(crate) async fn push_store_records(
    store: &dyn Store,
    verifier: &mut chain::Verifier<'_>,
    mut after: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(), String> {
    loop {
        let page = page_after(store, after).await?;
        let Some(last) = page.last().map(|e| e.seq) else {
            return Ok(());
        };
        let going = page.into_iter().all(|record| verifier.push(Ok(record)));
        progress(verifier.records());
        if !going {
            return Ok(());
        }
        after = last;
    }
}

/// Which file a run of lines comes from: where a segment header may stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineFile {
    /// An export or the JSON Lines mirror: records and checkpoints.
    Export,
    /// A decompressed segment file of `first_seq..=last_seq` (from its
    /// name): its header, then records and checkpoints.
    Segment {
        /// The first record, by the file's name.
        first_seq: u64,
        /// The last record, by the file's name.
        last_seq: u64,
    },
}

impl LineFile {
    fn place(self, index: u64) -> Place {
        match self {
            Self::Segment { .. } if index == 0 => Place::SegmentStart,
            _ => Place::Log,
        }
    }
}

/// Reads one line strictly ([`lines::parse_line`]); the error names the
/// line (`label` first: the file, or empty).
fn read_line(
    line: Result<String, String>,
    index: u64,
    file: LineFile,
    label: &str,
) -> Result<Line, String> {
    let number = index.saturating_add(1);
    let line = line.map_err(|e| format!("{label}{e}"))?;
    let parsed = lines::parse_line(&line, file.place(index))
        .map_err(|e| format!("{label}line {number}: {e}"))?;
    if let (
        Line::Segment(header),
        LineFile::Segment {
            first_seq,
            last_seq,
        },
    ) = (&parsed, file)
        && (header.first_seq, header.last_seq) != (first_seq, last_seq)
    {
        return Err(format!(
            "{label}line {number}: the header says records {}..={}, the file's name \
             {first_seq}..={last_seq}",
            header.first_seq, header.last_seq
        ));
    }
    Ok(parsed)
}

/// Streams the lines of an export or a segment file into `verifier`, in
/// order, each read strictly: a record is pushed, a checkpoint or the
/// segment header is passed over (checkpoints come from
/// [`checkpoint_lines`]), and any other line is the problem, naming its
/// line number. Returns false at a problem.
pub(crate) fn push_lines(
    lines: impl Iterator<Item = Result<String, String>>,
    file: LineFile,
    label: &str,
    verifier: &mut chain::Verifier<'_>,
    progress: &mut dyn FnMut(u64),
) -> bool {
    let mut count = 0u64;
    for (index, line) in (0u64..).zip(lines) {
        count += 1;
        match read_line(line, index, file, label) {
            Ok(Line::Record(record)) => {
                if !verifier.push(Ok(*record)) {
                    return false;
                }
                if verifier.records().is_multiple_of(10_000) {
                    progress(verifier.records());
                }
            }
            Ok(Line::Checkpoint(_) | Line::Segment(_)) => {}
            Err(why) => return verifier.fail_line(why),
        }
    }
    if count == 0 && matches!(file, LineFile::Segment { .. }) {
        return verifier.fail_line(format!("{label}the file is empty: no segment header"));
    }
    true
}

/// The checkpoints of an export or a segment file (its `{"checkpoint": …}`
/// lines), read strictly, up to its first bad line ([`push_lines`] reports
/// that line when it reaches it).
pub(crate) fn checkpoint_lines(
    lines: impl Iterator<Item = Result<String, String>>,
    file: LineFile,
) -> Vec<Checkpoint> {
    let mut checkpoints = Vec::new();
    for (index, line) in (0u64..).zip(lines) {
        match read_line(line, index, file, "") {
            Ok(Line::Checkpoint(c)) => checkpoints.push(c),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    checkpoints
}

/// Verifies the whole log in `store`, checking checkpoint signatures with
/// `ring`.
pub async fn verify_store(
    store: &dyn Store,
    ring: &KeyRing,
    progress: &mut dyn FnMut(u64),
) -> Result<chain::Report, String> {
    Ok(verify_store_witnessed(store, ring, &[], progress).await?.0)
}

/// [`verify_store`], held against the checkpoints of a witness
/// ([`crate::witness`]): each is also compared with the record at its seq,
/// and must be one of the store's checkpoints.
pub async fn verify_store_witnessed(
    store: &dyn Store,
    ring: &KeyRing,
    witness: &[Checkpoint],
    progress: &mut dyn FnMut(u64),
) -> Result<(chain::Report, WitnessSummary), String> {
    let checkpoints = all_checkpoints(store).await?;
    let all = crate::witness::with_witness(&checkpoints, witness);
    let mut verifier = chain::Verifier::new(&all);
    push_store_records(store, &mut verifier, 0, progress).await?;
    let mut report = verifier.finish(&ring_check(ring));
    let summary = crate::witness::hold_against(&mut report, &checkpoints, witness);
    Ok((report, summary))
}

/// Verifies an exported JSON Lines file (or the mirror) against a JWKS
/// document, in two streaming passes: the checkpoint lines first, then
/// every line in order, each of which must be exactly a record or a
/// checkpoint as the gateway writes them ([`lines::parse_line`]). With
/// `witness` checkpoints, the file is held against them as
/// [`verify_store_witnessed`] holds the store.
pub fn verify_jsonl(
    path: &std::path::Path,
    jwks: &Value,
    witness: &[Checkpoint],
    progress: &mut dyn FnMut(u64),
) -> Result<(chain::Report, WitnessSummary), String> {
    let open = || {
        std::fs::File::open(path)
            .map(|f| BoundedLines::new(std::io::BufReader::new(f)))
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let checkpoints = checkpoint_lines(open()?, LineFile::Export);
    let all = crate::witness::with_witness(&checkpoints, witness);
    let mut verifier = chain::Verifier::new(&all);
    push_lines(open()?, LineFile::Export, "", &mut verifier, progress);
    progress(verifier.records());
    let mut report = verifier.finish(&jwks_check(jwks));
    let summary = crate::witness::hold_against(&mut report, &checkpoints, witness);
    Ok((report, summary))
}

/// What `audit tail` shows.
#[derive(Debug, Clone, Default)]
pub struct TailFilter {
    /// Only this task.
    pub task: Option<String>,
    /// Only this agent.
    pub agent: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only this decision.
    pub decision: Option<String>,
}

impl TailFilter {
    fn matches(&self, e: &AuditEvent) -> bool {
        let is = |want: &Option<String>, got: Option<&str>| {
            want.as_deref().is_none_or(|w| got == Some(w))
        };
        is(&self.task, e.event.task_id.as_deref())
            && is(&self.agent, e.event.agent_id.as_deref())
            && is(&self.kind, Some(e.event.kind.as_str()))
            && is(&self.decision, e.event.decision.as_deref())
    }
}

/// Follows the log: prints matching records as JSON Lines as they are
/// committed, polling twice a second, until the process is stopped.
pub async fn tail(
    store: &dyn Store,
    since_seq: Option<u64>,
    filter: &TailFilter,
    out: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let mut after = match since_seq {
        Some(s) => s,
        None => store
            .chain_head()
            .await
            .map_err(|e| e.to_string())?
            .map_or(0, |(seq, _)| seq.saturating_sub(20)),
    };
    loop {
        let page = page_after(store, after).await?;
        match page.last().map(|e| e.seq) {
            Some(last) => {
                for e in page.iter().filter(|e| filter.matches(e)) {
                    out(&export_line(e));
                }
                after = last;
            }
            None => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}
