//! Audit tiers on a real ledger (SQLite, and PostgreSQL when
//! `PORTCULLIS_TEST_POSTGRES_URL` is set): records older than the hot
//! window move to compressed segment files, records older than the
//! retention window go, every move and drop is itself a record covered by
//! a fresh signed checkpoint, and `verify` accepts the tiered log while it
//! still catches any cut, edit or lost file.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use portcullis_core::Timestamp;
use portcullis_gateway::audit::{ring_check, sign_checkpoint, verify_store};
use portcullis_gateway::tiering::{self, Tiers};
use portcullis_store::chain::Report;
use portcullis_store::{AuditQuery, EventKind, NewEvent, Op, SqliteStore, Store};
use portcullis_token::{KeyRing, SigningKey};

const DAY: u64 = 24 * 60 * 60 * 1000;
/// Day 0 of the tests' calendar.
const T0: u64 = 1_750_000_000_000;

fn ring() -> KeyRing {
    KeyRing::new(vec![SigningKey::generate(T0 / 1000).unwrap()], 900).unwrap()
}

fn tiers(dir: Option<&Path>) -> Tiers {
    Tiers {
        hot_ms: 7 * DAY,
        archive_dir: dir.map(Path::to_path_buf),
        retention_ms: 30 * DAY,
    }
}

/// Appends `per_day` records on each of `days` days from day `from`, a
/// signed checkpoint at the end of each day.
async fn fill(store: &dyn Store, ring: &KeyRing, from: u64, days: u64, per_day: u64) {
    for day in from..from + days {
        let ops = (0..per_day)
            .map(|i| {
                let mut e = NewEvent::new(Timestamp(T0 + day * DAY + i), EventKind::CallAllowed);
                e.task_id = Some(format!("task-{day}"));
                e.args = Some(serde_json::json!({"day": day, "i": i, "text": "x".repeat(40)}));
                Op::Append(e)
            })
            .collect();
        store.commit(ops).await.unwrap();
        sign_checkpoint(store, ring, Timestamp(T0 + day * DAY + per_day), 0)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn verify_with_archive(store: &dyn Store, ring: &KeyRing, dir: &Path) -> Report {
    tiering::verify_archive(dir, Some(store), &ring_check(ring), &mut |_| {})
        .await
        .unwrap()
}

async fn verify_archive_alone(ring: &KeyRing, dir: &Path) -> Report {
    tiering::verify_archive(dir, None, &ring_check(ring), &mut |_| {})
        .await
        .unwrap()
}

async fn verify_hot(store: &dyn Store, ring: &KeyRing) -> Report {
    verify_store(store, ring, &mut |_| {}).await.unwrap()
}

async fn records(store: &dyn Store, kind: EventKind) -> Vec<portcullis_store::AuditEvent> {
    store
        .audit(&AuditQuery {
            kind: Some(kind),
            limit: Some(1000),
            ..AuditQuery::default()
        })
        .await
        .unwrap()
}

fn bad_at(report: &Report) -> Option<u64> {
    report.first_bad.as_ref().map(|p| p.seq)
}

fn files(dir: &Path) -> Vec<tiering::SegmentFile> {
    tiering::list_segments(dir).unwrap()
}

fn temp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("portcullis-tiering-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn sqlite(dir: &Path) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open(&dir.join("ledger.db")).unwrap())
}

/// Rewrites a segment file with `edit` applied to its decompressed text.
fn rewrite(path: &Path, edit: impl FnOnce(String) -> String) {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    let text = edit(text);
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap();
}

async fn archive_moves_whole_segments_and_everything_verifies(store: Arc<dyn Store>, dir: PathBuf) {
    let ring = ring();
    let archive = dir.join("archive");
    // 20 days of 50 records; day 20 is "now".
    fill(store.as_ref(), &ring, 0, 20, 50).await;
    let now = Timestamp(T0 + 20 * DAY);
    let report = tiering::run_pass(store.as_ref(), &ring, &tiers(Some(&archive)), now)
        .await
        .unwrap();
    // Days 0..=12 are older than 7 days: 13 × 50 = 650 records, one file.
    assert_eq!(report.archived.len(), 1, "{report:?}");
    let moved = &report.archived[0];
    assert_eq!((moved.first_seq, moved.last_seq), (1, 650));
    assert!(report.dropped.is_empty(), "nothing is older than 30 days");
    assert_eq!(files(&archive).len(), 1);
    assert_eq!(tiering::store_floor(store.as_ref()).await.unwrap(), 650);
    let header = tiering::read_header(&files(&archive)[0].path).unwrap();
    assert_eq!(
        (header.first_seq, header.last_seq, header.records),
        (1, 650, 650)
    );
    // The move is a record, and a checkpoint covers it at once.
    let archived = records(store.as_ref(), EventKind::AuditArchived).await;
    assert_eq!(archived.len(), 1);
    let args = archived[0].event.args.clone().unwrap();
    assert_eq!(args["first_seq"], 1);
    assert_eq!(args["through_seq"], 650);
    assert_eq!(args["file"], tiering::segment_name(1, 650));
    assert_eq!(archived[0].seq, moved.recorded_at);
    let head = store.chain_head().await.unwrap().unwrap().0;
    assert_eq!(head, moved.recorded_at);

    // The hot tier alone verifies from its anchor; archive + store and the
    // archive alone verify whole.
    let hot = verify_hot(store.as_ref(), &ring).await;
    assert!(hot.is_ok(), "{hot:?}");
    assert_eq!((hot.anchor, hot.floor_declared_at), (650, Some(head)));
    assert_eq!(hot.records, head - 650);
    let both = verify_with_archive(store.as_ref(), &ring, &archive).await;
    assert!(both.is_ok(), "{both:?}");
    assert_eq!((both.anchor, both.records, both.last_seq), (0, head, head));
    let alone = verify_archive_alone(&ring, &archive).await;
    assert!(alone.is_ok(), "{alone:?}");
    assert_eq!((alone.records, alone.last_seq), (650, 650));

    // A second pass the same day moves nothing; two days later, two more
    // days go, into a second file that continues the first.
    let again = tiering::run_pass(store.as_ref(), &ring, &tiers(Some(&archive)), now)
        .await
        .unwrap();
    assert!(
        again.archived.is_empty() && again.dropped.is_empty(),
        "{again:?}"
    );
    let later = Timestamp(T0 + 22 * DAY);
    let report = tiering::run_pass(store.as_ref(), &ring, &tiers(Some(&archive)), later)
        .await
        .unwrap();
    assert_eq!(report.archived.len(), 1, "{report:?}");
    // Days 13 and 14, and the archived record of day 20 sits after day 19:
    // not yet (its segment ends on day 20).
    assert_eq!(report.archived[0].first_seq, 651);
    assert_eq!(report.archived[0].last_seq, 750);
    assert_eq!(files(&archive).len(), 2);
    let both = verify_with_archive(store.as_ref(), &ring, &archive).await;
    assert!(both.is_ok(), "{both:?}");

    // Tampering with the archive is caught, at the record's seq.
    let first = files(&archive)[0].path.clone();
    let saved = std::fs::read(&first).unwrap();
    rewrite(&first, |t| t.replacen("\"i\":7,", "\"i\":8,", 1));
    let edited = verify_with_archive(store.as_ref(), &ring, &archive).await;
    assert_eq!(bad_at(&edited), Some(8), "{edited:?}");
    // A record deleted from a file.
    std::fs::write(&first, &saved).unwrap();
    rewrite(&first, |t| {
        t.lines()
            .filter(|l| !l.contains("\"day\":0,\"i\":30,"))
            .map(|l| format!("{l}\n"))
            .collect()
    });
    let deleted = verify_with_archive(store.as_ref(), &ring, &archive).await;
    assert_eq!(bad_at(&deleted), Some(31), "{deleted:?}");
    // The oldest file lost: the archive starts at 651, and no record says
    // records 1..=650 were dropped (they were archived, into that file).
    std::fs::remove_file(&first).unwrap();
    let lost = verify_with_archive(store.as_ref(), &ring, &archive).await;
    assert_eq!(bad_at(&lost), Some(651), "{lost:?}");
    std::fs::write(&first, &saved).unwrap();
    // The newer file lost: a gap.
    let second = files(&archive)[1].path.clone();
    let saved_second = std::fs::read(&second).unwrap();
    std::fs::remove_file(&second).unwrap();
    let gap = verify_with_archive(store.as_ref(), &ring, &archive).await;
    assert_eq!(bad_at(&gap), Some(651), "{gap:?}");
    std::fs::write(&second, &saved_second).unwrap();
    assert!(
        verify_with_archive(store.as_ref(), &ring, &archive)
            .await
            .is_ok()
    );

    // Records deleted from the store's front without a record saying so.
    let floor = tiering::store_floor(store.as_ref()).await.unwrap();
    let next = store
        .checkpoints(Some(floor), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.seq)
        .find(|&s| s > floor)
        .unwrap();
    // Only the store's own API can cut, and it needs a reason in the same
    // batch: without one the front is cut off "silently", which verify sees.
    store
        .commit(vec![Op::PruneAudit {
            after_seq: floor,
            through_seq: next,
        }])
        .await
        .unwrap();
    let cut = verify_hot(store.as_ref(), &ring).await;
    assert_eq!(bad_at(&cut), Some(next + 1), "{cut:?}");
    assert!(
        cut.first_bad.unwrap().what.contains("no record says"),
        "the cut is named"
    );
}

async fn retention_drops_the_oldest_and_says_so(store: Arc<dyn Store>, dir: PathBuf) {
    let ring = ring();
    let archive = dir.join("archive");
    fill(store.as_ref(), &ring, 0, 40, 20).await;
    // Day 40: days 0..=32 are older than 7 days → archived (33 × 20 = 660
    // records); days 0..=9 are older than 30 days, but they share the one
    // file with days 10..=32: a file goes only when all of it is older.
    let now = Timestamp(T0 + 40 * DAY);
    let report = tiering::run_pass(store.as_ref(), &ring, &tiers(Some(&archive)), now)
        .await
        .unwrap();
    assert_eq!(report.archived.len(), 1);
    assert!(report.dropped.is_empty(), "{report:?}");
    // Day 70: everything up to day 39 is older than 30 days. The archive's
    // first file (days 0..=32) goes; the second pass's file (days 33..=39
    // and the first archived record) was written now and stays.
    let later = Timestamp(T0 + 70 * DAY);
    let report = tiering::run_pass(store.as_ref(), &ring, &tiers(Some(&archive)), later)
        .await
        .unwrap();
    assert_eq!(report.archived.len(), 1, "{report:?}");
    assert_eq!(report.dropped.len(), 1, "{report:?}");
    let dropped = &report.dropped[0];
    assert_eq!((dropped.first_seq, dropped.last_seq), (1, 660));
    assert!(!archive.join(tiering::segment_name(1, 660)).exists());
    let drops = records(store.as_ref(), EventKind::AuditDropped).await;
    assert_eq!(drops.len(), 1);
    let args = drops[0].event.args.clone().unwrap();
    assert_eq!(args["from"], "archive");
    assert_eq!(args["through_seq"], 660);
    // The archive now starts at 661, anchored, and the drop record (in the
    // store, covered by a checkpoint) says why.
    let both = verify_with_archive(store.as_ref(), &ring, &archive).await;
    assert!(both.is_ok(), "{both:?}");
    assert_eq!(both.anchor, 660);
    assert_eq!(both.floor_declared_at, Some(drops[0].seq));
    let alone = verify_archive_alone(&ring, &archive).await;
    assert!(alone.is_ok(), "{alone:?}");
    assert_eq!((alone.anchor, alone.floor_declared_at), (660, None));
}

async fn without_an_archive_records_stay_until_retention(store: Arc<dyn Store>) {
    let ring = ring();
    fill(store.as_ref(), &ring, 0, 10, 10).await;
    // Day 35: days 0..=4 are older than 30 days; nothing younger goes,
    // whatever hot_days says (there is no archive to move to).
    let now = Timestamp(T0 + 35 * DAY);
    let report = tiering::run_pass(store.as_ref(), &ring, &tiers(None), now)
        .await
        .unwrap();
    assert!(report.archived.is_empty());
    assert_eq!(report.dropped.len(), 1, "{report:?}");
    assert_eq!(
        (report.dropped[0].first_seq, report.dropped[0].last_seq),
        (1, 50)
    );
    assert_eq!(tiering::store_floor(store.as_ref()).await.unwrap(), 50);
    let drops = records(store.as_ref(), EventKind::AuditDropped).await;
    assert_eq!(drops[0].event.args.clone().unwrap()["from"], "store");
    let hot = verify_hot(store.as_ref(), &ring).await;
    assert!(hot.is_ok(), "{hot:?}");
    assert_eq!(hot.anchor, 50);
    // Nothing was due on day 29.
    let (dir2, store2) = {
        let d = temp();
        let s = sqlite(d.path());
        (d, s)
    };
    fill(store2.as_ref(), &ring, 0, 10, 10).await;
    let early = tiering::run_pass(
        store2.as_ref(),
        &ring,
        &tiers(None),
        Timestamp(T0 + 29 * DAY),
    )
    .await
    .unwrap();
    assert_eq!(early, tiering::PassReport::default());
    drop(dir2);
}

async fn racing_passes_move_each_segment_once(store: Arc<dyn Store>, dir: PathBuf) {
    let ring = ring();
    let archive = dir.join("archive");
    fill(store.as_ref(), &ring, 0, 12, 30).await;
    let now = Timestamp(T0 + 20 * DAY);
    let t = tiers(Some(&archive));
    let (a, b) = tokio::join!(
        tiering::run_pass(store.as_ref(), &ring, &t, now),
        tiering::run_pass(store.as_ref(), &ring, &t, now)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let moved: Vec<_> = a.archived.iter().chain(&b.archived).collect();
    assert_eq!(moved.len(), 1, "{a:?} {b:?}");
    assert_eq!(
        records(store.as_ref(), EventKind::AuditArchived)
            .await
            .len(),
        1
    );
    assert_eq!(files(&archive).len(), 1);
    let both = verify_with_archive(store.as_ref(), &ring, &archive).await;
    assert!(both.is_ok(), "{both:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_archive_moves_whole_segments_and_everything_verifies() {
    let dir = temp();
    archive_moves_whole_segments_and_everything_verifies(sqlite(dir.path()), dir.path().into())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_retention_drops_the_oldest_and_says_so() {
    let dir = temp();
    retention_drops_the_oldest_and_says_so(sqlite(dir.path()), dir.path().into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_without_an_archive_records_stay_until_retention() {
    let dir = temp();
    without_an_archive_records_stay_until_retention(sqlite(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_racing_passes_move_each_segment_once() {
    let dir = temp();
    racing_passes_move_each_segment_once(sqlite(dir.path()), dir.path().into()).await;
}

/// A fresh schema on the test PostgreSQL, or `None` (with a notice).
async fn postgres() -> Option<(Arc<dyn Store>, String)> {
    let Ok(url) = std::env::var("PORTCULLIS_TEST_POSTGRES_URL") else {
        eprintln!("SKIP: PORTCULLIS_TEST_POSTGRES_URL not set");
        return None;
    };
    let schema = format!(
        "pc_tier_{}",
        portcullis_token::random_id("")
            .unwrap()
            .to_lowercase()
            .replace(['-', '_'], "")
    );
    let out = std::process::Command::new("psql")
        .args([
            &url,
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("CREATE SCHEMA {schema}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = portcullis_store::PostgresStore::connect(
        &url,
        &portcullis_store::PostgresOptions {
            schema: Some(schema.clone()),
            ..portcullis_store::PostgresOptions::default()
        },
    )
    .await
    .unwrap();
    Some((Arc::new(store), schema))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_archive_moves_whole_segments_and_everything_verifies() {
    let Some((store, _)) = postgres().await else {
        return;
    };
    let dir = temp();
    archive_moves_whole_segments_and_everything_verifies(store, dir.path().into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_racing_passes_move_each_segment_once() {
    let Some((store, _)) = postgres().await else {
        return;
    };
    let dir = temp();
    racing_passes_move_each_segment_once(store, dir.path().into()).await;
}
