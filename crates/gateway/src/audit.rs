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

use crate::state::Gateway;
use crate::tiering::{BoundedLines, checkpoint_line, is_record_line};

/// Records read per page when streaming the log.
const PAGE: usize = 1000;

impl Gateway {
    /// Signs the chain's head if it has moved since `last_seq`; returns the
    /// checkpoint written, if any.
    pub async fn checkpoint(&self, last_seq: u64) -> Result<Option<Checkpoint>, String> {
        sign_checkpoint(self.store.as_ref(), &self.ring, self.now(), last_seq).await
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
                let line = serde_json::json!({ "checkpoint": c });
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
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

/// Streams the record lines of an export or a segment file (not its
/// checkpoint or header lines) into `verifier`, exactly as written, until
/// the end or its first problem; returns false at a problem.
pub(crate) fn push_record_lines(
    lines: impl Iterator<Item = Result<String, String>>,
    verifier: &mut chain::Verifier<'_>,
    progress: &mut dyn FnMut(u64),
) -> bool {
    for line in lines {
        let record = match line {
            Ok(line) if is_record_line(&line) => {
                serde_json::from_str::<Value>(&line).map_err(|e| e.to_string())
            }
            Ok(_) => continue,
            Err(e) => Err(e),
        };
        if !verifier.push_json(record) {
            return false;
        }
        if verifier.records().is_multiple_of(10_000) {
            progress(verifier.records());
        }
    }
    true
}

/// The checkpoints of an export or a segment file (its `{"checkpoint": …}`
/// lines).
pub(crate) fn checkpoint_lines(
    lines: impl Iterator<Item = Result<String, String>>,
) -> Result<Vec<Checkpoint>, String> {
    let mut checkpoints = Vec::new();
    for line in lines {
        if let Some(c) = checkpoint_line(&line?)? {
            checkpoints.push(c);
        }
    }
    Ok(checkpoints)
}

/// Verifies the whole log in `store`, checking checkpoint signatures with
/// `ring`.
pub async fn verify_store(
    store: &dyn Store,
    ring: &KeyRing,
    progress: &mut dyn FnMut(u64),
) -> Result<chain::Report, String> {
    let checkpoints = all_checkpoints(store).await?;
    let mut verifier = chain::Verifier::new(&checkpoints);
    push_store_records(store, &mut verifier, 0, progress).await?;
    Ok(verifier.finish(&ring_check(ring)))
}

/// Verifies an exported JSON Lines file against a JWKS document, in two
/// streaming passes: the checkpoint lines first, then every record line
/// exactly as written (an added field or a `null` fails the hash too).
pub fn verify_jsonl(
    path: &std::path::Path,
    jwks: &Value,
    progress: &mut dyn FnMut(u64),
) -> Result<chain::Report, String> {
    let open = || {
        std::fs::File::open(path)
            .map(|f| BoundedLines::new(std::io::BufReader::new(f)))
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let checkpoints = checkpoint_lines(open()?)?;
    let mut verifier = chain::Verifier::new(&checkpoints);
    push_record_lines(open()?, &mut verifier, progress);
    progress(verifier.records());
    Ok(verifier.finish(&jwks_check(jwks)))
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
