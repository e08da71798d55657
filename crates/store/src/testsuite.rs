//! The backend-independent contract of [`Store`], as runnable checks. Every
//! backend runs [`run_all`] on a fresh, empty store (SQLite in
//! `tests/sqlite.rs`; PostgreSQL alongside it), so both obey one set of
//! semantics.
//!
//! Each check panics on failure, like a test. Checks use fresh ids, so they
//! can share one store, but the seq checks assume no other writer commits to
//! the store while they run.

#![expect(
    clippy::expect_used,
    clippy::panic,
    reason = "a test suite reports a failed check by panicking"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use portcullis_core::{Grant, Task, TaskStatus, Timestamp};

use sha2::{Digest, Sha256};

use crate::chain::{self, Report, Verifier};
use crate::{
    AuditEvent, AuditQuery, CHECKPOINT_EXISTS, CHECKPOINT_HASH_MISMATCH, CHECKPOINT_NO_SUCH_RECORD,
    Checkpoint, ELEVATION_ALREADY_DECIDED, ElevationCursor, ElevationRecord, ElevationStatus,
    EventKind, MAX_AUDIT_LIMIT, MAX_PIN_DEFINITION_BYTES, MAX_ROWS, NO_SUCH_ELEVATION, NewEvent,
    Op, PRUNE_HEAD, PRUNE_MOVED, PRUNE_NOT_ANCHORED, RefreshRecord, Store, StoreError, TaskCounts,
    TaskRecord, TokenKind, TokenRecord, ToolPin, canonical_json, checkpoint_message,
};

/// The instant the checks pretend it is.
pub const T0: Timestamp = Timestamp(1_700_000_000_000);

/// Concurrent deciders per elevation in [`elevation_decisions_race`] and
/// [`elevation_decisions_race_spawned`].
pub const DECIDERS: usize = 4;
/// Elevations raced on at once in [`elevation_decisions_race_spawned`].
pub const RACED_ELEVATIONS: usize = 32;

/// Concurrent callers in [`concurrent_commits`].
pub const CALLERS: usize = 8;
/// Commits per caller in [`concurrent_commits`].
pub const COMMITS_PER_CALLER: usize = 200;

/// Runs every check, one after the other.
pub async fn run_all(store: &dyn Store) {
    ping(store).await;
    task_round_trip(store).await;
    update_task_compare_and_swap(store).await;
    token_round_trip(store).await;
    batch_is_atomic(store).await;
    refresh_spends_once(store).await;
    revoke_task_tokens(store).await;
    audit_seqs_are_gap_free(store).await;
    queued_batches_land_in_queue_order(store).await;
    audit_query_filters(store).await;
    audit_query_limits(store).await;
    concurrent_commits(store).await;
    audit_chain_is_valid(store).await;
    chain_head_follows_commits(store).await;
    checkpoints_round_trip(store).await;
    elevation_round_trip(store).await;
    elevation_insert_unknown_task(store).await;
    elevation_list_by_status(store).await;
    elevation_decided_once(store).await;
    elevation_decide_unknown(store).await;
    elevation_decide_pending(store).await;
    elevation_decision_checks(store).await;
    elevation_decisions_race(store).await;
    elevation_pages_with_cursor(store).await;
    elevation_pending_cap(store).await;
    pin_round_trip(store).await;
    tool_use_is_remembered(store).await;
    task_counts_follow_status(store).await;
    queue_depth_returns_to_zero(store).await;
    pin_upsert_replaces(store).await;
    pins_ordered_by_tool(store).await;
    pin_invalid_rolls_back(store).await;
    // After every check that reads the log from its start.
    prune_audit_segments(store).await;
    // Last: it leaves MAX_ROWS + 5 pending elevations behind.
    elevation_list_limits(store).await;
}

/// A fresh id, unique across runs and processes sharing one database.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{nanos:x}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A task record with every field set to something non-default.
pub fn sample_task(id: &str) -> TaskRecord {
    TaskRecord {
        task: Task {
            id: id.to_owned(),
            agent_id: "agent-7".into(),
            agent_type: "ingestion".into(),
            goal: "load the nightly batch".into(),
            state: "connect".into(),
            status: TaskStatus::Active,
            tools: BTreeSet::from(["db.read".to_owned(), "db.write".to_owned()]),
            grants: vec![
                Grant {
                    tool: "s3.get".into(),
                    expires_at: T0.plus_millis(60_000),
                    once: false,
                    answers: portcullis_core::GrantFor::Elevation,
                    args_digest: None,
                },
                Grant {
                    tool: "db.write".into(),
                    expires_at: T0.plus_millis(60_000),
                    once: true,
                    answers: portcullis_core::GrantFor::Approval,
                    args_digest: Some("ab".repeat(32)),
                },
                Grant {
                    tool: "db.read".into(),
                    expires_at: T0.plus_millis(60_000),
                    once: false,
                    answers: portcullis_core::GrantFor::Anomaly("rate".into()),
                    args_digest: None,
                },
            ],
            calls: 3,
            tool_calls: BTreeMap::from([("db.read".to_owned(), 3)]),
            version: 1,
            started_at: T0,
            watch: portcullis_core::anomaly::Watch::default(),
        },
        deadline: T0.plus_millis(3_600_000),
    }
}

/// An unrevoked access token of `task_id`.
pub fn sample_token(jti: &str, task_id: &str) -> TokenRecord {
    TokenRecord {
        jti: jti.to_owned(),
        task_id: task_id.to_owned(),
        agent_id: "agent-7".into(),
        kind: TokenKind::Access,
        issued_at: T0,
        expires_at: T0.plus_millis(600_000),
        revoked_at: None,
        revoke_reason: None,
    }
}

/// An unspent refresh token of `task_id`, idle until `T0 + 1 h`.
pub fn sample_refresh(hash: &str, task_id: &str) -> RefreshRecord {
    RefreshRecord {
        hash: hash.to_owned(),
        task_id: task_id.to_owned(),
        agent_id: "agent-7".into(),
        issued_at: T0,
        idle_expires_at: T0.plus_millis(3_600_000),
        spent_at: None,
    }
}

/// An event of `kind` for `task_id`.
pub fn sample_event(kind: EventKind, task_id: &str) -> NewEvent {
    let mut event = NewEvent::new(T0, kind);
    event.task_id = Some(task_id.to_owned());
    event
}

/// A pending elevation of `task_id` by `agent-7` (the agent of
/// [`sample_task`]) for `s3.put`, requested at `T0`.
pub fn sample_elevation(id: &str, task_id: &str) -> ElevationRecord {
    ElevationRecord {
        id: id.to_owned(),
        task_id: task_id.to_owned(),
        agent_id: "agent-7".into(),
        tool: "s3.put".into(),
        reason: "write the transformed batch".into(),
        status: ElevationStatus::Pending,
        requested_at: T0,
        decided_at: None,
        decided_by: None,
        note: None,
        expires_at: None,
        held: None,
    }
}

/// An approval of elevation `id` by `by` at `T0 + 1 s`, lapsing at
/// `T0 + 15 min`.
pub fn approve(id: &str, by: &str) -> Op {
    Op::DecideElevation {
        id: id.to_owned(),
        status: ElevationStatus::Approved,
        by: by.to_owned(),
        at: T0.plus_millis(1_000),
        note: Some(format!("approved by {by}")),
        expires_at: Some(T0.plus_millis(900_000)),
    }
}

/// A denial of elevation `id` by `by` at `T0 + 1 s`.
pub fn deny(id: &str, by: &str) -> Op {
    Op::DecideElevation {
        id: id.to_owned(),
        status: ElevationStatus::Denied,
        by: by.to_owned(),
        at: T0.plus_millis(1_000),
        note: Some(format!("denied by {by}")),
        expires_at: None,
    }
}

/// `record` as it reads back after `decision` (an [`Op::DecideElevation`])
/// was applied to it.
pub fn decided(record: &ElevationRecord, decision: &Op) -> ElevationRecord {
    let Op::DecideElevation {
        status,
        by,
        at,
        note,
        expires_at,
        ..
    } = decision
    else {
        panic!("not a decision: {decision:?}");
    };
    ElevationRecord {
        status: *status,
        decided_at: Some(*at),
        decided_by: Some(by.clone()),
        note: note.clone(),
        expires_at: *expires_at,
        ..record.clone()
    }
}

/// The pin of `tool` (`<upstream>.<name>`) approved by `approved_by` at
/// `T0`: a small MCP tool definition, its `hash` the SHA-256 hex of its
/// [`canonical_json`].
pub fn sample_pin(tool: &str, approved_by: &str) -> ToolPin {
    let (upstream, name) = tool.split_once('.').unwrap_or((tool, tool));
    let definition = serde_json::json!({
        "name": name,
        "title": "Query the warehouse",
        "description": "Runs a read-only query. é \u{1} 日本",
        "inputSchema": {
            "type": "object",
            "properties": {"sql": {"type": "string", "maxLength": 4096}},
            "required": ["sql"],
        },
        "annotations": {"readOnlyHint": true, "ratio": 0.1},
    });
    pin_of(tool, upstream, definition, approved_by)
}

/// A pin of `definition` with its true hash, pinned at `T0`.
pub fn pin_of(
    tool: &str,
    upstream: &str,
    definition: serde_json::Value,
    approved_by: &str,
) -> ToolPin {
    ToolPin {
        tool: tool.to_owned(),
        upstream: upstream.to_owned(),
        hash: format!("{:x}", Sha256::digest(canonical_json(&definition))),
        definition,
        pinned_at: T0,
        approved_by: approved_by.to_owned(),
    }
}

fn is_conflict(result: &crate::Result<crate::Committed>, message: &str) -> bool {
    matches!(result, Err(StoreError::Conflict(m)) if m == message)
}

async fn commit_ok(store: &dyn Store, ops: Vec<Op>) -> crate::Committed {
    match store.commit(ops).await {
        Ok(committed) => committed,
        Err(e) => panic!("commit failed: {e}"),
    }
}

/// `ping` answers on a working store.
pub async fn ping(store: &dyn Store) {
    store.ping().await.expect("ping");
    assert!(!store.backend().is_empty());
}

/// A task reads back exactly as inserted; an unknown id is `None`; a
/// duplicate id is a conflict.
pub async fn task_round_trip(store: &dyn Store) {
    let id = unique("task");
    let record = sample_task(&id);
    commit_ok(store, vec![Op::InsertTask(record.clone())]).await;
    assert_eq!(store.task(&id).await.expect("read task"), Some(record));
    assert_eq!(
        store.task(&unique("missing")).await.expect("read task"),
        None
    );

    let mut duplicate = sample_task(&id);
    duplicate.task.goal = "something else".into();
    let result = store.commit(vec![Op::InsertTask(duplicate)]).await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "duplicate task id: {result:?}"
    );
    assert_eq!(
        store
            .task(&id)
            .await
            .expect("read task")
            .map(|r| r.task.goal),
        Some("load the nightly batch".to_owned())
    );
}

/// Compare-and-swap: an update from the stored version wins; of two
/// concurrent updates from the same version exactly one wins; stale, unknown
/// and non-increasing updates conflict.
pub async fn update_task_compare_and_swap(store: &dyn Store) {
    let id = unique("cas");
    let v1 = sample_task(&id);
    commit_ok(store, vec![Op::InsertTask(v1.clone())]).await;

    let mut v2 = v1.clone();
    v2.task.state = "validate".into();
    v2.task.calls = 4;
    v2.task.version = 2;
    commit_ok(
        store,
        vec![Op::UpdateTask {
            record: v2.clone(),
            expected_version: 1,
        }],
    )
    .await;
    assert_eq!(store.task(&id).await.expect("read task"), Some(v2.clone()));

    // Two replicas both computed version 3 from version 2.
    let mut left = v2.clone();
    left.task.state = "transform".into();
    left.task.version = 3;
    let mut right = v2.clone();
    right.task.status = TaskStatus::Halted;
    right.task.version = 3;
    let (a, b) = tokio::join!(
        store.commit(vec![Op::UpdateTask {
            record: left.clone(),
            expected_version: 2,
        }]),
        store.commit(vec![Op::UpdateTask {
            record: right.clone(),
            expected_version: 2,
        }]),
    );
    let winner = match (a, b) {
        (Ok(_), Err(StoreError::Conflict(_))) => left,
        (Err(StoreError::Conflict(_)), Ok(_)) => right,
        other => panic!("exactly one of two racing updates must win: {other:?}"),
    };
    assert_eq!(store.task(&id).await.expect("read task"), Some(winner));

    // Stale version.
    let mut stale = v2.clone();
    stale.task.version = 3;
    let result = store
        .commit(vec![Op::UpdateTask {
            record: stale,
            expected_version: 2,
        }])
        .await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "stale: {result:?}"
    );

    // Unknown task.
    let mut ghost = sample_task(&unique("ghost"));
    ghost.task.version = 2;
    let result = store
        .commit(vec![Op::UpdateTask {
            record: ghost,
            expected_version: 1,
        }])
        .await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "unknown task: {result:?}"
    );

    // The new version must move forward, or two writers could both "win".
    let mut same = store
        .task(&id)
        .await
        .expect("read task")
        .expect("task exists");
    let version = same.task.version;
    same.task.state = "write".into();
    let result = store
        .commit(vec![Op::UpdateTask {
            record: same,
            expected_version: version,
        }])
        .await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "non-increasing version: {result:?}"
    );
}

/// Tokens read back as inserted, by jti and by task; duplicates and tokens
/// of unknown tasks conflict; revoking one token is idempotent.
pub async fn token_round_trip(store: &dyn Store) {
    let task_id = unique("tok-task");
    let first = sample_token(&unique("jti"), &task_id);
    let mut hop = sample_token(&unique("jti"), &task_id);
    hop.kind = TokenKind::Hop;
    hop.issued_at = T0.plus_millis(1);
    hop.expires_at = T0.plus_millis(60_000);
    commit_ok(
        store,
        vec![
            Op::InsertTask(sample_task(&task_id)),
            Op::InsertToken(first.clone()),
            Op::InsertToken(hop.clone()),
        ],
    )
    .await;
    assert_eq!(
        store.token(&first.jti).await.expect("read token"),
        Some(first.clone())
    );
    assert_eq!(
        store.task_tokens(&task_id).await.expect("read tokens"),
        vec![first.clone(), hop.clone()]
    );
    assert_eq!(
        store.token(&unique("missing")).await.expect("read token"),
        None
    );

    let result = store.commit(vec![Op::InsertToken(first.clone())]).await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "duplicate jti: {result:?}"
    );
    let orphan = sample_token(&unique("jti"), &unique("no-such-task"));
    let result = store.commit(vec![Op::InsertToken(orphan.clone())]).await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "token of unknown task: {result:?}"
    );
    assert_eq!(store.token(&orphan.jti).await.expect("read token"), None);

    let revoke = |at: u64| Op::RevokeToken {
        jti: first.jti.clone(),
        at: T0.plus_millis(at),
        reason: "logout".into(),
    };
    let committed = commit_ok(store, vec![revoke(5)]).await;
    assert_eq!(committed.revoked, vec![first.jti.clone()]);
    let committed = commit_ok(store, vec![revoke(9)]).await;
    assert!(committed.revoked.is_empty(), "already revoked: no-op");
    let stored = store
        .token(&first.jti)
        .await
        .expect("read token")
        .expect("token exists");
    assert_eq!(stored.revoked_at, Some(T0.plus_millis(5)));
    assert_eq!(stored.revoke_reason.as_deref(), Some("logout"));
    let committed = commit_ok(
        store,
        vec![Op::RevokeToken {
            jti: unique("missing"),
            at: T0,
            reason: "x".into(),
        }],
    )
    .await;
    assert!(committed.revoked.is_empty(), "unknown jti: no-op");
}

/// A batch whose last op fails leaves nothing of its earlier ops: no task,
/// no token, no refresh token, no audit event and no consumed seq.
pub async fn batch_is_atomic(store: &dyn Store) {
    let marker = unique("atomic-marker");
    let before = commit_ok(
        store,
        vec![Op::Append(sample_event(EventKind::ConfigLoaded, &marker))],
    )
    .await;

    let task_id = unique("atomic");
    let token = sample_token(&unique("jti"), &task_id);
    let refresh = sample_refresh(&unique("hash"), &task_id);
    let mut started = sample_task(&task_id);
    started.task.version = 2;
    let result = store
        .commit(vec![
            Op::InsertTask(sample_task(&task_id)),
            Op::InsertToken(token.clone()),
            Op::InsertRefresh(refresh.clone()),
            Op::Append(sample_event(EventKind::TaskStarted, &task_id)),
            Op::Append(sample_event(EventKind::TokenIssued, &task_id)),
            // Fails: the stored version is 1.
            Op::UpdateTask {
                record: started,
                expected_version: 7,
            },
        ])
        .await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "last op must fail: {result:?}"
    );
    assert_eq!(store.task(&task_id).await.expect("read task"), None);
    assert_eq!(store.token(&token.jti).await.expect("read token"), None);
    assert_eq!(
        store.refresh(&refresh.hash).await.expect("read refresh"),
        None
    );
    let events = store
        .audit(&AuditQuery {
            task_id: Some(task_id.clone()),
            ..AuditQuery::default()
        })
        .await
        .expect("read audit");
    assert!(
        events.is_empty(),
        "audit events of a failed batch: {events:?}"
    );

    // A failed refresh spend in the middle of a batch undoes the batch too.
    let result = store
        .commit(vec![
            Op::Append(sample_event(EventKind::TokenRefreshed, &task_id)),
            Op::SpendRefresh {
                hash: unique("missing"),
                at: T0,
            },
        ])
        .await;
    assert!(
        matches!(result, Err(StoreError::RefreshUnknown)),
        "{result:?}"
    );

    let after = commit_ok(
        store,
        vec![Op::Append(sample_event(EventKind::ConfigLoaded, &marker))],
    )
    .await;
    assert_eq!(
        after.seqs.first().copied(),
        before.seqs.first().map(|seq| seq + 1),
        "failed batches must not consume seqs"
    );
    // Nor advance the chain: the next record links to the one before them.
    let before = record_at(store, before.seqs.first().copied().expect("seq")).await;
    let after = record_at(store, after.seqs.first().copied().expect("seq")).await;
    assert_eq!(after.prev_hash, before.hash, "failed batches leave no link");
    assert_log_is_valid(store).await;
}

/// A refresh token is spent once: again is `RefreshSpent` with its task id,
/// an unknown hash is `RefreshUnknown`, a token at or past its idle
/// deadline is `RefreshExpired` (and stays unspent).
pub async fn refresh_spends_once(store: &dyn Store) {
    let task_id = unique("refresh");
    let live = sample_refresh(&unique("hash"), &task_id);
    let idle = sample_refresh(&unique("hash"), &task_id);
    commit_ok(
        store,
        vec![
            Op::InsertTask(sample_task(&task_id)),
            Op::InsertRefresh(live.clone()),
            Op::InsertRefresh(idle.clone()),
        ],
    )
    .await;
    assert_eq!(
        store.refresh(&live.hash).await.expect("read refresh"),
        Some(live.clone())
    );

    let spend = |hash: &str, at: Timestamp| {
        vec![Op::SpendRefresh {
            hash: hash.to_owned(),
            at,
        }]
    };
    let at = T0.plus_millis(1_000);
    commit_ok(store, spend(&live.hash, at)).await;
    let stored = store
        .refresh(&live.hash)
        .await
        .expect("read refresh")
        .expect("refresh exists");
    assert_eq!(stored.spent_at, Some(at));

    match store.commit(spend(&live.hash, at.plus_millis(1))).await {
        Err(StoreError::RefreshSpent { task_id: reused }) => assert_eq!(reused, task_id),
        other => panic!("second spend must be RefreshSpent: {other:?}"),
    }
    match store.commit(spend(&unique("missing"), at)).await {
        Err(StoreError::RefreshUnknown) => {}
        other => panic!("unknown hash must be RefreshUnknown: {other:?}"),
    }
    // idle_expires_at must be strictly after the spend.
    match store.commit(spend(&idle.hash, idle.idle_expires_at)).await {
        Err(StoreError::RefreshExpired { task_id: expired }) => assert_eq!(expired, task_id),
        other => panic!("spend at the idle deadline must be RefreshExpired: {other:?}"),
    }
    assert_eq!(
        store
            .refresh(&idle.hash)
            .await
            .expect("read refresh")
            .and_then(|r| r.spent_at),
        None,
        "an expired spend changes nothing"
    );
    commit_ok(
        store,
        spend(&idle.hash, Timestamp(idle.idle_expires_at.0 - 1)),
    )
    .await;
}

/// `RevokeTaskTokens` revokes every unrevoked token and spends every unspent
/// refresh token of the task, and nothing of another task.
pub async fn revoke_task_tokens(store: &dyn Store) {
    let task = unique("revoke");
    let other = unique("bystander");
    let access = sample_token(&unique("jti-a"), &task);
    let mut hop = sample_token(&unique("jti-b"), &task);
    hop.kind = TokenKind::Hop;
    let mut earlier = sample_token(&unique("jti-c"), &task);
    earlier.revoked_at = Some(T0);
    earlier.revoke_reason = Some("rotated".into());
    let bystander = sample_token(&unique("jti-d"), &other);
    let refresh = sample_refresh(&unique("hash"), &task);
    let other_refresh = sample_refresh(&unique("hash"), &other);
    commit_ok(
        store,
        vec![
            Op::InsertTask(sample_task(&task)),
            Op::InsertTask(sample_task(&other)),
            Op::InsertToken(access.clone()),
            Op::InsertToken(hop.clone()),
            Op::InsertToken(earlier.clone()),
            Op::InsertToken(bystander.clone()),
            Op::InsertRefresh(refresh.clone()),
            Op::InsertRefresh(other_refresh.clone()),
        ],
    )
    .await;

    let at = T0.plus_millis(42);
    let committed = commit_ok(
        store,
        vec![Op::RevokeTaskTokens {
            task_id: task.clone(),
            at,
            reason: "task.completed".into(),
        }],
    )
    .await;
    let mut expected = vec![access.jti.clone(), hop.jti.clone()];
    expected.sort();
    let mut revoked = committed.revoked.clone();
    revoked.sort();
    assert_eq!(revoked, expected, "only the unrevoked tokens of the task");

    for token in store.task_tokens(&task).await.expect("read tokens") {
        if token.jti == earlier.jti {
            assert_eq!(token, earlier, "an earlier revocation is kept");
        } else {
            assert_eq!(token.revoked_at, Some(at), "{}", token.jti);
            assert_eq!(token.revoke_reason.as_deref(), Some("task.completed"));
        }
    }
    assert_eq!(
        store.token(&bystander.jti).await.expect("read token"),
        Some(bystander)
    );
    assert_eq!(
        store
            .refresh(&refresh.hash)
            .await
            .expect("read refresh")
            .and_then(|r| r.spent_at),
        Some(at)
    );
    assert_eq!(
        store
            .refresh(&other_refresh.hash)
            .await
            .expect("read refresh"),
        Some(other_refresh)
    );
    match store
        .commit(vec![Op::SpendRefresh {
            hash: refresh.hash.clone(),
            at,
        }])
        .await
    {
        Err(StoreError::RefreshSpent { task_id }) => assert_eq!(task_id, task),
        other => panic!("a revoked refresh token is spent: {other:?}"),
    }

    let again = commit_ok(
        store,
        vec![Op::RevokeTaskTokens {
            task_id: task,
            at,
            reason: "again".into(),
        }],
    )
    .await;
    assert!(again.revoked.is_empty(), "second revocation is a no-op");
}

/// Seqs are strictly increasing and gap-free across and within batches, in
/// op order, and stored events read back exactly.
pub async fn audit_seqs_are_gap_free(store: &dyn Store) {
    let task_id = unique("seq");
    let mut seqs = Vec::new();
    let mut written = Vec::new();
    for batch in 0..5_u64 {
        let mut ops = Vec::new();
        for i in 0..=batch {
            let mut event = sample_event(EventKind::CallAllowed, &task_id);
            event.ts = T0.plus_millis(batch * 10 + i);
            event.tool = Some("db.read".into());
            event.decision = Some("allow".into());
            event.policy_ids = vec!["p1".into(), "p2".into()];
            event.args = Some(serde_json::json!({"table": "events", "limit": 10}));
            event.latency_us = Some(1234);
            written.push(event.clone());
            ops.push(Op::Append(event));
        }
        // Non-audit ops in between do not take seqs.
        ops.insert(
            0,
            Op::RevokeToken {
                jti: unique("missing"),
                at: T0,
                reason: "x".into(),
            },
        );
        let committed = commit_ok(store, ops).await;
        assert_eq!(
            committed.seqs.len(),
            usize::try_from(batch + 1).unwrap_or(0)
        );
        seqs.extend(committed.seqs);
    }
    for pair in seqs.windows(2) {
        if let [a, b] = pair {
            assert_eq!(*b, a + 1, "seqs must be consecutive: {seqs:?}");
        }
    }
    let events = store
        .audit(&AuditQuery {
            task_id: Some(task_id),
            ..AuditQuery::default()
        })
        .await
        .expect("read audit");
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        seqs,
        "all events, ascending"
    );
    assert_eq!(
        events.into_iter().map(|e| e.event).collect::<Vec<_>>(),
        written
    );
}

/// Batches queued with `enqueue` commit in the order they were queued (their
/// seqs rise with it), a read after `settled` sees every one of them, and a
/// refused batch is reported (on the queue's outcome, or at once by a
/// backend without a queue) without taking the others with it.
pub async fn queued_batches_land_in_queue_order(store: &dyn Store) {
    let task_id = unique("queued");
    let mut pending = Vec::new();
    for i in 0..20_u64 {
        let mut event = sample_event(EventKind::CallCompleted, &task_id);
        event.ts = T0.plus_millis(i);
        event.latency_us = Some(i);
        pending.push(store.enqueue(vec![Op::Append(event)]).await.expect("queue"));
    }
    // A batch that must fail (the task's version is not 999).
    let refused = store
        .enqueue(vec![Op::UpdateTask {
            record: sample_task(&unique("absent")),
            expected_version: 999,
        }])
        .await;
    store.settled().await.expect("settled");
    let events = store
        .audit(&AuditQuery {
            task_id: Some(task_id),
            ..AuditQuery::default()
        })
        .await
        .expect("read audit");
    assert_eq!(
        events
            .iter()
            .map(|e| e.event.latency_us)
            .collect::<Vec<_>>(),
        (0..20).map(Some).collect::<Vec<_>>(),
        "all queued batches, in queue order, visible after settled"
    );
    let mut last = 0;
    for p in pending {
        let committed = p.await.expect("committed");
        let seq = committed.seqs.first().copied().unwrap_or(0);
        assert!(seq > last, "seqs follow the queue order");
        last = seq;
    }
    if let Ok(outcome) = refused {
        assert!(outcome.await.is_err(), "the refused batch");
    }
}

/// Filters by task, by kind, by both, and `since_seq` (exclusive).
pub async fn audit_query_filters(store: &dyn Store) {
    let task_a = unique("filter-a");
    let task_b = unique("filter-b");
    let kinds = [
        (EventKind::CallDenied, &task_a),
        (EventKind::CallAllowed, &task_a),
        (EventKind::CallDenied, &task_b),
        (EventKind::CallDenied, &task_a),
        (EventKind::Anomaly, &task_b),
    ];
    let committed = commit_ok(
        store,
        kinds
            .iter()
            .map(|(kind, task)| Op::Append(sample_event(*kind, task)))
            .collect(),
    )
    .await;
    let seqs = committed.seqs;
    assert_eq!(seqs.len(), kinds.len());
    let first = seqs.first().copied().expect("seqs");
    let seq_of = |i: usize| seqs.get(i).copied().expect("seq");

    let query = |task_id: Option<&String>, kind: Option<EventKind>, since: u64| AuditQuery {
        task_id: task_id.cloned(),
        kind,
        since_seq: Some(since),
        limit: None,
    };
    let seqs_of = |events: Vec<crate::AuditEvent>| events.iter().map(|e| e.seq).collect::<Vec<_>>();

    let by_task = store
        .audit(&query(Some(&task_a), None, 0))
        .await
        .expect("audit");
    assert_eq!(seqs_of(by_task), vec![seq_of(0), seq_of(1), seq_of(3)]);

    let by_both = store
        .audit(&query(Some(&task_a), Some(EventKind::CallDenied), 0))
        .await
        .expect("audit");
    assert_eq!(seqs_of(by_both), vec![seq_of(0), seq_of(3)]);

    // Kind alone sees other tasks' events too; look only from our first seq.
    let by_kind = store
        .audit(&query(None, Some(EventKind::CallDenied), first - 1))
        .await
        .expect("audit");
    assert!(
        by_kind
            .iter()
            .all(|e| e.event.kind == EventKind::CallDenied),
        "kind filter"
    );
    assert_eq!(seqs_of(by_kind), vec![seq_of(0), seq_of(2), seq_of(3)]);

    let since = store
        .audit(&query(Some(&task_a), None, seq_of(0)))
        .await
        .expect("audit");
    assert_eq!(
        seqs_of(since),
        vec![seq_of(1), seq_of(3)],
        "since_seq is exclusive"
    );

    let unfiltered = store
        .audit(&query(None, None, first - 1))
        .await
        .expect("audit");
    assert_eq!(seqs_of(unfiltered), seqs);

    let none = store
        .audit(&query(Some(&unique("nobody")), None, 0))
        .await
        .expect("audit");
    assert!(none.is_empty());
}

/// The limit defaults to 100, is honoured below the cap and capped at 1000.
pub async fn audit_query_limits(store: &dyn Store) {
    let task_id = unique("limits");
    let total = MAX_AUDIT_LIMIT + 5;
    let mut seqs = Vec::with_capacity(total);
    let ops: Vec<Op> = (0..total)
        .map(|_| Op::Append(sample_event(EventKind::CallCompleted, &task_id)))
        .collect();
    for chunk in ops.chunks(250) {
        seqs.extend(commit_ok(store, chunk.to_vec()).await.seqs);
    }
    assert_eq!(seqs.len(), total);

    let with_limit = |limit: Option<usize>| AuditQuery {
        task_id: Some(task_id.clone()),
        limit,
        ..AuditQuery::default()
    };
    let count = |events: &[crate::AuditEvent]| events.len();
    let default = store.audit(&with_limit(None)).await.expect("audit");
    assert_eq!(count(&default), crate::DEFAULT_AUDIT_LIMIT);
    let seven = store.audit(&with_limit(Some(7))).await.expect("audit");
    assert_eq!(
        seven.iter().map(|e| e.seq).collect::<Vec<_>>(),
        seqs.iter().take(7).copied().collect::<Vec<_>>(),
        "the first events, ascending"
    );
    let zero = store.audit(&with_limit(Some(0))).await.expect("audit");
    assert!(zero.is_empty());
    let capped = store
        .audit(&with_limit(Some(usize::MAX)))
        .await
        .expect("audit");
    assert_eq!(count(&capped), MAX_AUDIT_LIMIT, "capped at 1000");

    // Paging with since_seq reaches the rest.
    let last = capped.last().map(|e| e.seq).expect("events");
    let rest = store
        .audit(&AuditQuery {
            since_seq: Some(last),
            ..with_limit(Some(MAX_AUDIT_LIMIT))
        })
        .await
        .expect("audit");
    assert_eq!(count(&rest), total - MAX_AUDIT_LIMIT);
}

/// [`CALLERS`] concurrent callers × [`COMMITS_PER_CALLER`] commits each:
/// every commit acknowledged, every seq distinct, strictly increasing per
/// caller, gap-free overall, and every event readable.
pub async fn concurrent_commits(store: &dyn Store) {
    let task_id = unique("concurrent");
    let caller = |n: usize| {
        let task_id = task_id.clone();
        async move {
            let mut seqs = Vec::with_capacity(COMMITS_PER_CALLER);
            for i in 0..COMMITS_PER_CALLER {
                let mut event = sample_event(EventKind::CallAllowed, &task_id);
                event.detail = Some(format!("{n}/{i}"));
                let committed = commit_ok(store, vec![Op::Append(event)]).await;
                seqs.extend(committed.seqs);
            }
            seqs
        }
    };
    let (s0, s1, s2, s3, s4, s5, s6, s7) = tokio::join!(
        caller(0),
        caller(1),
        caller(2),
        caller(3),
        caller(4),
        caller(5),
        caller(6),
        caller(7)
    );
    check_concurrent(store, &task_id, vec![s0, s1, s2, s3, s4, s5, s6, s7]).await;
}

/// [`concurrent_commits`] with each caller its own tokio task (needs a
/// multi-threaded runtime to be truly parallel).
pub async fn concurrent_commits_spawned(store: Arc<dyn Store>) {
    let task_id = unique("spawned");
    let mut handles = Vec::with_capacity(CALLERS);
    for n in 0..CALLERS {
        let store = Arc::clone(&store);
        let task_id = task_id.clone();
        handles.push(tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(COMMITS_PER_CALLER);
            for i in 0..COMMITS_PER_CALLER {
                let mut event = sample_event(EventKind::CallAllowed, &task_id);
                event.detail = Some(format!("{n}/{i}"));
                let committed = commit_ok(store.as_ref(), vec![Op::Append(event)]).await;
                seqs.extend(committed.seqs);
            }
            seqs
        }));
    }
    let mut per_caller = Vec::with_capacity(CALLERS);
    for handle in handles {
        per_caller.push(handle.await.expect("caller task"));
    }
    check_concurrent(store.as_ref(), &task_id, per_caller).await;
}

async fn check_concurrent(store: &dyn Store, task_id: &str, per_caller: Vec<Vec<u64>>) {
    let mut all = Vec::with_capacity(CALLERS * COMMITS_PER_CALLER);
    for seqs in per_caller {
        assert_eq!(seqs.len(), COMMITS_PER_CALLER);
        assert!(
            seqs.windows(2).all(|w| matches!(w, [a, b] if a < b)),
            "one caller's seqs must increase"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), CALLERS * COMMITS_PER_CALLER, "distinct seqs");
    let (first, last) = (
        all.first().copied().expect("seqs"),
        all.last().copied().expect("seqs"),
    );
    assert_eq!(
        last - first + 1,
        u64::try_from(all.len()).unwrap_or(0),
        "gap-free"
    );

    let mut read = Vec::with_capacity(all.len());
    let mut since = 0;
    loop {
        let page = store
            .audit(&AuditQuery {
                task_id: Some(task_id.to_owned()),
                since_seq: Some(since),
                limit: Some(MAX_AUDIT_LIMIT),
                ..AuditQuery::default()
            })
            .await
            .expect("audit");
        let Some(last) = page.last() else { break };
        since = last.seq;
        read.extend(page.into_iter().map(|e| e.seq));
    }
    assert_eq!(read, all, "every acknowledged event is stored");
    // However the commits interleaved, the log is one valid chain.
    assert_log_is_valid(store).await;
}

/// An elevation reads back exactly as inserted; an unknown id is `None`; a
/// duplicate id conflicts and keeps the first; an insert that is not a fresh
/// pending request conflicts.
pub async fn elevation_round_trip(store: &dyn Store) {
    let task_id = unique("elev-task");
    let record = sample_elevation(&unique("elev"), &task_id);
    commit_ok(
        store,
        vec![
            Op::InsertTask(sample_task(&task_id)),
            Op::InsertElevation(record.clone()),
            Op::Append(sample_event(EventKind::ElevationRequested, &task_id)),
        ],
    )
    .await;
    assert_eq!(
        store.elevation(&record.id).await.expect("read elevation"),
        Some(record.clone())
    );
    assert_eq!(
        store
            .elevation(&unique("missing"))
            .await
            .expect("read elevation"),
        None
    );

    let mut duplicate = sample_elevation(&record.id, &task_id);
    duplicate.tool = "db.drop".into();
    let result = store.commit(vec![Op::InsertElevation(duplicate)]).await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "duplicate elevation id: {result:?}"
    );
    assert_eq!(
        store.elevation(&record.id).await.expect("read elevation"),
        Some(record.clone()),
        "the first insert is kept"
    );

    // Only a fresh request may be inserted: no shortcut to an approval.
    let mut shortcuts = Vec::new();
    let mut approved = sample_elevation(&unique("elev"), &task_id);
    approved.status = ElevationStatus::Approved;
    approved.decided_at = Some(T0);
    approved.decided_by = Some("alice".into());
    approved.expires_at = Some(T0.plus_millis(60_000));
    shortcuts.push(approved);
    let mut denied = sample_elevation(&unique("elev"), &task_id);
    denied.status = ElevationStatus::Denied;
    shortcuts.push(denied);
    let mut pending_with_expiry = sample_elevation(&unique("elev"), &task_id);
    pending_with_expiry.expires_at = Some(T0.plus_millis(60_000));
    shortcuts.push(pending_with_expiry);
    let mut pending_with_decider = sample_elevation(&unique("elev"), &task_id);
    pending_with_decider.decided_by = Some("alice".into());
    shortcuts.push(pending_with_decider);
    for shortcut in shortcuts {
        let id = shortcut.id.clone();
        let result = store.commit(vec![Op::InsertElevation(shortcut)]).await;
        assert!(
            matches!(result, Err(StoreError::Conflict(_))),
            "insert of a non-fresh elevation: {result:?}"
        );
        assert_eq!(store.elevation(&id).await.expect("read elevation"), None);
    }
}

/// An elevation of a task the ledger does not hold conflicts and is not
/// stored.
pub async fn elevation_insert_unknown_task(store: &dyn Store) {
    let orphan = sample_elevation(&unique("elev"), &unique("no-such-task"));
    let result = store
        .commit(vec![Op::InsertElevation(orphan.clone())])
        .await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "elevation of unknown task: {result:?}"
    );
    assert_eq!(
        store.elevation(&orphan.id).await.expect("read elevation"),
        None
    );
}

/// Lists filter by status and run oldest first (`requested_at`, then `id`),
/// whatever the insertion order. Assumes the store holds fewer than
/// [`MAX_ROWS`] elevations of each status requested before `T0 + 1 s`.
pub async fn elevation_list_by_status(store: &dyn Store) {
    let task_id = unique("elev-list");
    let base = unique("elev-list");
    let at = |id: &str, ms: u64| {
        let mut record = sample_elevation(&format!("{base}-{id}"), &task_id);
        record.requested_at = T0.plus_millis(ms);
        record
    };
    // Inserted newest first; `b` and `d` tie on time and sort by id.
    let a = at("a", 30);
    let d = at("d", 10);
    let c = at("c", 20);
    let b = at("b", 10);
    let mut ops = vec![Op::InsertTask(sample_task(&task_id))];
    ops.extend([&a, &d, &c, &b].map(|r| Op::InsertElevation(r.clone())));
    commit_ok(store, ops).await;
    let approve_c = approve(&c.id, "alice");
    let deny_a = deny(&a.id, "bob");
    commit_ok(store, vec![approve_c.clone()]).await;
    commit_ok(store, vec![deny_a.clone()]).await;
    let (a, c) = (decided(&a, &deny_a), decided(&c, &approve_c));

    let list = |status: Option<ElevationStatus>| async move {
        let all = store
            .elevations(status, None, MAX_ROWS)
            .await
            .expect("list elevations");
        assert!(
            all.iter().all(|r| status.is_none_or(|s| r.status == s)),
            "status filter {status:?}"
        );
        assert!(
            all.windows(2).all(|w| matches!(w, [x, y]
                if (x.requested_at, &x.id) < (y.requested_at, &y.id))),
            "oldest first"
        );
        all
    };
    let ours = |all: Vec<ElevationRecord>| {
        all.into_iter()
            .filter(|r| r.task_id == task_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ours(list(Some(ElevationStatus::Pending)).await),
        vec![b.clone(), d.clone()]
    );
    assert_eq!(
        ours(list(Some(ElevationStatus::Approved)).await),
        vec![c.clone()]
    );
    assert_eq!(
        ours(list(Some(ElevationStatus::Denied)).await),
        vec![a.clone()]
    );
    assert_eq!(ours(list(None).await), vec![b, d, c, a]);

    // The limit is honoured and takes the oldest.
    let pending = list(Some(ElevationStatus::Pending)).await;
    let first = store
        .elevations(Some(ElevationStatus::Pending), None, 1)
        .await
        .expect("list elevations");
    assert_eq!(first, pending.into_iter().take(1).collect::<Vec<_>>());
    assert!(
        store
            .elevations(None, None, 0)
            .await
            .expect("list elevations")
            .is_empty()
    );
}

/// Paging with [`ElevationCursor`] visits every request exactly once and
/// in order, across tasks and with many ties on `requested_at`, with or
/// without a status filter; a cursor survives its text form; a request
/// decided between two pages drops out of the pending pages without
/// shifting the others. Leaves its requests behind, requested in
/// `T0 + 2 h … + 40 ms`.
pub async fn elevation_pages_with_cursor(store: &dyn Store) {
    const TASKS: usize = 30;
    const PER_TASK: usize = 10;
    let base = T0.plus_millis(7_200_000);
    let tasks: Vec<String> = (0..TASKS).map(|_| unique("elev-page")).collect();
    commit_ok(
        store,
        tasks
            .iter()
            .map(|t| Op::InsertTask(sample_task(t)))
            .collect(),
    )
    .await;
    let mut ours = Vec::new();
    for i in 0..PER_TASK {
        let ops: Vec<Op> = tasks
            .iter()
            .enumerate()
            .map(|(n, task)| {
                let mut record = sample_elevation(&unique("elev-page"), task);
                // 40 distinct times for 300 requests: most of them tie.
                let ms = u64::try_from((n * PER_TASK + i) % 40).unwrap_or(0);
                record.requested_at = base.plus_millis(ms);
                ours.push(record.id.clone());
                Op::InsertElevation(record)
            })
            .collect();
        commit_ok(store, ops).await;
    }
    let ours: std::collections::BTreeSet<String> = ours.into_iter().collect();
    let end = base.plus_millis(40);
    // Starts just before our time range (other runs sharing the database
    // may have requests in it too: they are paged over, not counted).
    let start = ElevationCursor {
        requested_at: Timestamp(base.0.saturating_sub(1)),
        id: "~".into(),
    };
    for status in [Some(ElevationStatus::Pending), None] {
        let mut seen = Vec::new();
        let mut cursor = start.clone();
        let mut previous: Option<(Timestamp, String)> = None;
        for _ in 0..100_000 {
            let page = store
                .elevations(status, Some(&cursor), 7)
                .await
                .expect("list elevations");
            for r in &page {
                let key = (r.requested_at, r.id.clone());
                assert!(
                    previous.as_ref().is_none_or(|p| *p < key),
                    "strictly ascending across pages: {previous:?} then {key:?}"
                );
                previous = Some(key);
            }
            let Some(last) = page.last() else { break };
            // Through the text form, as a client would hand it back.
            cursor = ElevationCursor::parse(&ElevationCursor::after(last).encode())
                .expect("a cursor reads back");
            assert_eq!(cursor, ElevationCursor::after(last));
            seen.extend(
                page.iter()
                    .filter(|r| ours.contains(&r.id))
                    .map(|r| r.id.clone()),
            );
            if last.requested_at >= end {
                break;
            }
        }
        assert_eq!(
            seen.len(),
            ours.len(),
            "each request exactly once ({status:?})"
        );
        let unique_seen: std::collections::BTreeSet<String> = seen.into_iter().collect();
        assert_eq!(unique_seen, ours, "every request ({status:?})");
    }

    // One request decided between two pages: the next pending page goes on
    // where the cursor was, without it and without skipping another.
    let first = store
        .elevations(Some(ElevationStatus::Pending), Some(&start), 5)
        .await
        .expect("list elevations");
    let Some(cut) = first.last() else {
        panic!("pending requests in the range");
    };
    let cursor = ElevationCursor::after(cut);
    let following = store
        .elevations(Some(ElevationStatus::Pending), Some(&cursor), 3)
        .await
        .expect("list elevations");
    let Some(decided) = following.first() else {
        panic!("more pending requests after the first page");
    };
    commit_ok(store, vec![deny(&decided.id, "carol")]).await;
    let after_decision = store
        .elevations(Some(ElevationStatus::Pending), Some(&cursor), 2)
        .await
        .expect("list elevations");
    assert_eq!(
        after_decision.iter().map(|r| &r.id).collect::<Vec<_>>(),
        following.iter().skip(1).map(|r| &r.id).collect::<Vec<_>>(),
        "the decided request drops out, nothing else moves"
    );

    // Text that is not a cursor is refused.
    for bad in ["", "12", ".x", "x.y", "12.", "12.a b", "12.a/b", "-1.x"] {
        assert_eq!(ElevationCursor::parse(bad), None, "{bad:?}");
    }
    let long = format!("12.{}", "a".repeat(crate::MAX_CURSOR_ID_BYTES + 1));
    assert_eq!(ElevationCursor::parse(&long), None);
}

/// [`Op::CapPendingElevations`] refuses the whole batch once the task has
/// `max` pending requests (nothing of it is kept, the audit log included),
/// counts only that task's pending requests, and lets a request in again
/// once one is decided.
pub async fn elevation_pending_cap(store: &dyn Store) {
    let task_id = unique("elev-cap");
    let other = unique("elev-cap-other");
    commit_ok(
        store,
        vec![
            Op::InsertTask(sample_task(&task_id)),
            Op::InsertTask(sample_task(&other)),
        ],
    )
    .await;
    let request = |task: &str, max: u32| {
        let record = sample_elevation(&unique("elev-cap"), task);
        let ops = vec![
            Op::CapPendingElevations {
                task_id: task.to_owned(),
                max,
            },
            Op::InsertElevation(record.clone()),
            Op::Append(sample_event(EventKind::ElevationRequested, task)),
        ];
        (record, ops)
    };
    let mut first = None;
    for _ in 0..3 {
        let (record, ops) = request(&task_id, 3);
        commit_ok(store, ops).await;
        first.get_or_insert(record);
    }
    let head = store.chain_head().await.expect("chain head");
    let (refused, ops) = request(&task_id, 3);
    let result = store.commit(ops).await;
    assert!(
        matches!(&result, Err(StoreError::TooManyPending { task_id: t, max: 3 }) if *t == task_id),
        "a fourth pending request: {result:?}"
    );
    assert_eq!(store.elevation(&refused.id).await.expect("read"), None);
    assert_eq!(
        store.chain_head().await.expect("chain head"),
        head,
        "nothing of the refused batch is kept"
    );
    // Another task is not held back by this one's requests.
    let (_, ops) = request(&other, 3);
    commit_ok(store, ops).await;
    // Decided requests do not count.
    let Some(first) = first else {
        panic!("three requests were made");
    };
    commit_ok(store, vec![deny(&first.id, "bob")]).await;
    let (_, ops) = request(&task_id, 3);
    commit_ok(store, ops).await;
}

/// The list is capped at [`MAX_ROWS`], whatever the limit asks for. Leaves
/// `MAX_ROWS + 5` pending elevations behind, requested after `T0 + 1 h`.
pub async fn elevation_list_limits(store: &dyn Store) {
    let task_id = unique("elev-limits");
    let total = MAX_ROWS + 5;
    commit_ok(store, vec![Op::InsertTask(sample_task(&task_id))]).await;
    let ops: Vec<Op> = (0..total)
        .map(|i| {
            let mut record = sample_elevation(&unique("elev-bulk"), &task_id);
            record.requested_at = T0.plus_millis(3_600_000 + u64::try_from(i).unwrap_or(0));
            Op::InsertElevation(record)
        })
        .collect();
    for chunk in ops.chunks(250) {
        commit_ok(store, chunk.to_vec()).await;
    }
    for status in [Some(ElevationStatus::Pending), None] {
        let capped = store
            .elevations(status, None, usize::MAX)
            .await
            .expect("list elevations");
        assert_eq!(capped.len(), MAX_ROWS, "capped at {MAX_ROWS}");
        let seven = store
            .elevations(status, None, 7)
            .await
            .expect("list elevations");
        assert_eq!(
            seven,
            capped.into_iter().take(7).collect::<Vec<_>>(),
            "the oldest, ascending"
        );
    }
}

/// An elevation is decided once. The approval commits with the task's new
/// grant and its audit event; a second decision conflicts
/// ([`ELEVATION_ALREADY_DECIDED`]) and rolls back the rest of its batch; two
/// decisions of one request in one batch conflict and keep neither.
pub async fn elevation_decided_once(store: &dyn Store) {
    let task_id = unique("elev-once");
    let record = sample_elevation(&unique("elev"), &task_id);
    let task = sample_task(&task_id);
    commit_ok(
        store,
        vec![
            Op::InsertTask(task.clone()),
            Op::InsertElevation(record.clone()),
        ],
    )
    .await;

    // The approval as the gateway commits it: decision, grant, audit.
    let approval = approve(&record.id, "alice");
    let mut granted = task.clone();
    granted.task.grants.push(portcullis_core::Grant {
        tool: record.tool.clone(),
        expires_at: T0.plus_millis(900_000),
        once: false,
        answers: portcullis_core::GrantFor::Elevation,
        args_digest: None,
    });
    granted.task.version = task.task.version + 1;
    let mut approved_event = sample_event(EventKind::ElevationApproved, &task_id);
    approved_event.tool = Some(record.tool.clone());
    commit_ok(
        store,
        vec![
            approval.clone(),
            Op::UpdateTask {
                record: granted.clone(),
                expected_version: task.task.version,
            },
            Op::Append(approved_event),
        ],
    )
    .await;
    let approved = decided(&record, &approval);
    assert_eq!(
        store.elevation(&record.id).await.expect("read elevation"),
        Some(approved.clone())
    );
    assert_eq!(
        store.task(&task_id).await.expect("read task"),
        Some(granted)
    );

    // Again, with another op first in the batch: all of it rolls back.
    let marker = unique("elev-marker");
    for second in [deny(&record.id, "bob"), approve(&record.id, "carol")] {
        let result = store
            .commit(vec![
                Op::Append(sample_event(EventKind::ElevationDenied, &marker)),
                second,
            ])
            .await;
        assert!(
            is_conflict(&result, ELEVATION_ALREADY_DECIDED),
            "second decision: {result:?}"
        );
    }
    let events = store
        .audit(&AuditQuery {
            task_id: Some(marker),
            ..AuditQuery::default()
        })
        .await
        .expect("read audit");
    assert!(events.is_empty(), "the failed batches' events: {events:?}");
    assert_eq!(
        store.elevation(&record.id).await.expect("read elevation"),
        Some(approved),
        "the first decision stands"
    );

    // A denial, then two decisions of one request in one batch.
    let other = sample_elevation(&unique("elev"), &task_id);
    let denial = deny(&other.id, "bob");
    let twice = sample_elevation(&unique("elev"), &task_id);
    commit_ok(
        store,
        vec![
            Op::InsertElevation(other.clone()),
            Op::InsertElevation(twice.clone()),
            denial.clone(),
        ],
    )
    .await;
    assert_eq!(
        store.elevation(&other.id).await.expect("read elevation"),
        Some(decided(&other, &denial))
    );
    let result = store
        .commit(vec![approve(&twice.id, "alice"), deny(&twice.id, "bob")])
        .await;
    assert!(
        is_conflict(&result, ELEVATION_ALREADY_DECIDED),
        "two decisions in one batch: {result:?}"
    );
    assert_eq!(
        store.elevation(&twice.id).await.expect("read elevation"),
        Some(twice),
        "still pending: the batch rolled back"
    );
}

/// Deciding an id the ledger does not hold conflicts
/// ([`NO_SUCH_ELEVATION`]) and rolls back its batch.
pub async fn elevation_decide_unknown(store: &dyn Store) {
    let marker = unique("elev-unknown");
    for decision in [
        approve(&unique("missing"), "alice"),
        deny(&unique("missing"), "bob"),
    ] {
        let result = store
            .commit(vec![
                Op::Append(sample_event(EventKind::ElevationApproved, &marker)),
                decision,
            ])
            .await;
        assert!(
            is_conflict(&result, NO_SUCH_ELEVATION),
            "unknown elevation: {result:?}"
        );
    }
    let events = store
        .audit(&AuditQuery {
            task_id: Some(marker),
            ..AuditQuery::default()
        })
        .await
        .expect("read audit");
    assert!(events.is_empty(), "{events:?}");
}

/// `Pending` is not a decision: it conflicts, on a pending request and on an
/// unknown id alike, and changes nothing.
pub async fn elevation_decide_pending(store: &dyn Store) {
    let task_id = unique("elev-pending");
    let record = sample_elevation(&unique("elev"), &task_id);
    commit_ok(
        store,
        vec![
            Op::InsertTask(sample_task(&task_id)),
            Op::InsertElevation(record.clone()),
        ],
    )
    .await;
    for id in [record.id.clone(), unique("missing")] {
        let result = store
            .commit(vec![Op::DecideElevation {
                id,
                status: ElevationStatus::Pending,
                by: "alice".into(),
                at: T0.plus_millis(1_000),
                note: None,
                expires_at: None,
            }])
            .await;
        assert!(
            matches!(result, Err(StoreError::Conflict(_))),
            "pending as a decision: {result:?}"
        );
    }
    assert_eq!(
        store.elevation(&record.id).await.expect("read elevation"),
        Some(record)
    );
}

/// Approvals must expire, after they are decided; denials do not expire; an
/// agent cannot approve its own request (it may withdraw it with a denial).
/// Every refusal leaves the request pending.
pub async fn elevation_decision_checks(store: &dyn Store) {
    let task_id = unique("elev-checks");
    let record = sample_elevation(&unique("elev"), &task_id);
    let withdrawn = sample_elevation(&unique("elev"), &task_id);
    commit_ok(
        store,
        vec![
            Op::InsertTask(sample_task(&task_id)),
            Op::InsertElevation(record.clone()),
            Op::InsertElevation(withdrawn.clone()),
        ],
    )
    .await;
    let with = |status, by: &str, expires_at| Op::DecideElevation {
        id: record.id.clone(),
        status,
        by: by.to_owned(),
        at: T0.plus_millis(1_000),
        note: None,
        expires_at,
    };
    for refused in [
        with(ElevationStatus::Approved, "alice", None),
        with(
            ElevationStatus::Approved,
            "alice",
            Some(T0.plus_millis(1_000)),
        ),
        with(ElevationStatus::Approved, "alice", Some(T0)),
        with(
            ElevationStatus::Denied,
            "alice",
            Some(T0.plus_millis(60_000)),
        ),
        approve(&record.id, &record.agent_id),
    ] {
        let result = store.commit(vec![refused.clone()]).await;
        assert!(
            matches!(result, Err(StoreError::Conflict(_))),
            "{refused:?}: {result:?}"
        );
        assert_eq!(
            store.elevation(&record.id).await.expect("read elevation"),
            Some(record.clone()),
            "{refused:?} changed the request"
        );
    }
    let approval = approve(&record.id, "alice");
    commit_ok(store, vec![approval.clone()]).await;
    assert_eq!(
        store.elevation(&record.id).await.expect("read elevation"),
        Some(decided(&record, &approval))
    );
    let withdrawal = deny(&withdrawn.id, &withdrawn.agent_id);
    commit_ok(store, vec![withdrawal.clone()]).await;
    assert_eq!(
        store
            .elevation(&withdrawn.id)
            .await
            .expect("read elevation"),
        Some(decided(&withdrawn, &withdrawal))
    );
}

/// Checks that exactly one of `outcomes` (a decision and its result, all on
/// `record`) won, that the others conflicted as already decided, and that
/// the stored record is the winner's.
async fn check_one_winner(
    store: &dyn Store,
    record: &ElevationRecord,
    outcomes: Vec<(Op, crate::Result<crate::Committed>)>,
) {
    let mut winners = Vec::new();
    for (decision, result) in outcomes {
        match result {
            Ok(_) => winners.push(decision),
            Err(StoreError::Conflict(ref m)) if m == ELEVATION_ALREADY_DECIDED => {}
            other => panic!("a losing decision must be {ELEVATION_ALREADY_DECIDED:?}: {other:?}"),
        }
    }
    let [winner] = winners.as_slice() else {
        panic!("exactly one of racing decisions must win: {winners:?}");
    };
    assert_eq!(
        store.elevation(&record.id).await.expect("read elevation"),
        Some(decided(record, winner))
    );
}

/// The decisions raced on one request: approvals and denials by different
/// approvers, alternating.
fn racing_decisions(id: &str) -> Vec<Op> {
    (0..DECIDERS)
        .map(|n| {
            let by = format!("approver-{n}");
            if n % 2 == 0 {
                approve(id, &by)
            } else {
                deny(id, &by)
            }
        })
        .collect()
}

/// [`DECIDERS`] approvers decide one request concurrently: exactly one
/// wins, every other gets [`ELEVATION_ALREADY_DECIDED`].
pub async fn elevation_decisions_race(store: &dyn Store) {
    let task_id = unique("elev-race");
    let record = sample_elevation(&unique("elev"), &task_id);
    commit_ok(
        store,
        vec![
            Op::InsertTask(sample_task(&task_id)),
            Op::InsertElevation(record.clone()),
        ],
    )
    .await;
    let decisions = racing_decisions(&record.id);
    let [d0, d1, d2, d3] = <[Op; DECIDERS]>::try_from(decisions).expect("DECIDERS decisions");
    let (r0, r1, r2, r3) = tokio::join!(
        store.commit(vec![d0.clone()]),
        store.commit(vec![d1.clone()]),
        store.commit(vec![d2.clone()]),
        store.commit(vec![d3.clone()]),
    );
    check_one_winner(store, &record, vec![(d0, r0), (d1, r1), (d2, r2), (d3, r3)]).await;
}

/// [`elevation_decisions_race`] on [`RACED_ELEVATIONS`] requests at once,
/// every decision its own tokio task (needs a multi-threaded runtime to be
/// truly parallel).
pub async fn elevation_decisions_race_spawned(store: Arc<dyn Store>) {
    let task_id = unique("elev-race-spawned");
    let records: Vec<ElevationRecord> = (0..RACED_ELEVATIONS)
        .map(|_| sample_elevation(&unique("elev"), &task_id))
        .collect();
    let mut ops = vec![Op::InsertTask(sample_task(&task_id))];
    ops.extend(records.iter().cloned().map(Op::InsertElevation));
    commit_ok(store.as_ref(), ops).await;

    let mut handles = Vec::with_capacity(RACED_ELEVATIONS * DECIDERS);
    for record in &records {
        for decision in racing_decisions(&record.id) {
            let store = Arc::clone(&store);
            handles.push(tokio::spawn(async move {
                let result = store.commit(vec![decision.clone()]).await;
                (decision, result)
            }));
        }
    }
    let mut outcomes: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for handle in handles {
        let (decision, result) = handle.await.expect("decider task");
        let Op::DecideElevation { id, .. } = &decision else {
            panic!("not a decision: {decision:?}");
        };
        outcomes
            .entry(id.clone())
            .or_default()
            .push((decision, result));
    }
    for record in &records {
        let outcomes = outcomes.remove(&record.id).expect("outcomes");
        assert_eq!(outcomes.len(), DECIDERS);
        check_one_winner(store.as_ref(), record, outcomes).await;
    }
}

/// The key id of [`test_sign`].
pub const TEST_KID: &str = "testsuite-key";

/// A stand-in for the gateway's Ed25519 signature over
/// [`checkpoint_message`]: a keyed digest that [`test_check_sig`] accepts
/// and that is wrong for any other message.
pub fn test_sign(seq: u64, hash: &str, ts: Timestamp) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"testsuite-secret\n");
    hasher.update(checkpoint_message(seq, hash, ts).as_bytes());
    format!("{:x}", hasher.finalize())
}

/// Accepts exactly the checkpoints [`test_sign`] signed with [`TEST_KID`].
pub fn test_check_sig(checkpoint: &Checkpoint) -> bool {
    checkpoint.kid == TEST_KID
        && checkpoint.sig == test_sign(checkpoint.seq, &checkpoint.hash, checkpoint.ts)
}

/// A checkpoint of `seq` and `hash`, signed with [`test_sign`] at `T0`.
pub fn test_checkpoint(seq: u64, hash: &str) -> Checkpoint {
    Checkpoint {
        seq,
        hash: hash.to_owned(),
        ts: T0,
        kid: TEST_KID.to_owned(),
        sig: test_sign(seq, hash, T0),
    }
}

/// The record with this seq.
pub async fn record_at(store: &dyn Store, seq: u64) -> AuditEvent {
    store
        .audit(&AuditQuery {
            since_seq: Some(seq - 1),
            limit: Some(1),
            ..AuditQuery::default()
        })
        .await
        .expect("audit")
        .into_iter()
        .find(|e| e.seq == seq)
        .unwrap_or_else(|| panic!("no record {seq}"))
}

/// Every checkpoint of the store, paged.
pub async fn all_checkpoints(store: &dyn Store) -> Vec<Checkpoint> {
    let mut all: Vec<Checkpoint> = Vec::new();
    loop {
        let page = store
            .checkpoints(all.last().map(|c| c.seq), MAX_ROWS)
            .await
            .expect("checkpoints");
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// Verifies the store's whole log as `portcullis audit verify` would:
/// records streamed page by page through a [`Verifier`] (one page in
/// memory), against every stored checkpoint, signatures checked with
/// [`test_check_sig`].
pub async fn verify_log(store: &dyn Store) -> Report {
    let checkpoints = all_checkpoints(store).await;
    let mut verifier = Verifier::new(&checkpoints);
    let mut since = 0;
    loop {
        let page = match store
            .audit(&AuditQuery {
                since_seq: Some(since),
                limit: Some(MAX_AUDIT_LIMIT),
                ..AuditQuery::default()
            })
            .await
        {
            Ok(page) => page,
            Err(e) => {
                verifier.push(Err(e.to_string()));
                break;
            }
        };
        let Some(last) = page.last().map(|e| e.seq) else {
            break;
        };
        since = last;
        if !page.into_iter().all(|record| verifier.push(Ok(record))) {
            break;
        }
    }
    verifier.finish(&test_check_sig)
}

/// Panics unless the store's whole log verifies.
pub async fn assert_log_is_valid(store: &dyn Store) {
    let report = verify_log(store).await;
    assert!(report.is_ok(), "the log does not verify: {report:?}");
}

/// Every record is chained: its hash recomputes from its content, its
/// `prev_hash` is its predecessor's hash (64 zeros for seq 1), and the whole
/// log verifies, whatever the events hold (nested and unusual JSON, every
/// field set, non-ASCII, control characters, big and fractional numbers).
pub async fn audit_chain_is_valid(store: &dyn Store) {
    let task_id = unique("chain");
    let mut full = sample_event(EventKind::CallCompleted, &task_id);
    full.agent_id = Some("agent-7 é".into());
    full.tool = Some("db.read".into());
    full.decision = Some("allow".into());
    full.reason = Some("policy_permit".into());
    full.policy_ids = vec!["p2".into(), "p1".into()];
    full.args = Some(serde_json::json!({
        "z": [1, -1, u64::MAX, i64::MIN, 0.1, 1e-7, -0.0, 1.0, f64::MAX],
        "a": {"nested": {"deeper": [null, true, false, {}, []]}},
        "text": "quote\" backslash\\ slash/ tab\t nl\n nul\u{0} é 日本 😀",
        "日本": "key order by bytes",
        "password": "[redacted]",
    }));
    full.result_digest = Some("ab".repeat(32));
    full.latency_us = Some(u64::MAX);
    full.state_from = Some("connect".into());
    full.state_to = Some("query".into());
    full.jti = Some(unique("jti"));
    full.detail = Some("line one\nline two".into());
    let mut ops = vec![Op::Append(full.clone())];
    for kind in EventKind::ALL {
        ops.push(Op::Append(sample_event(kind, &task_id)));
    }
    let committed = commit_ok(store, ops).await;

    let written = record_at(store, committed.seqs.first().copied().expect("seq")).await;
    assert_eq!(written.event, full, "the event reads back exactly");
    for seq in committed.seqs {
        let record = record_at(store, seq).await;
        assert_eq!(record.hash.len(), 64);
        assert!(
            record
                .hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(
            chain::record_hash(&record),
            record.hash,
            "record {seq} re-hashes"
        );
        let expected_prev = if seq == 1 {
            chain::GENESIS.to_owned()
        } else {
            record_at(store, seq - 1).await.hash
        };
        assert_eq!(record.prev_hash, expected_prev, "record {seq} links");
    }
    assert_log_is_valid(store).await;
}

/// [`Store::chain_head`] is the newest record's seq and hash; a batch that
/// fails moves it not at all, and the next record links to it.
pub async fn chain_head_follows_commits(store: &dyn Store) {
    let task_id = unique("head");
    let committed = commit_ok(
        store,
        vec![
            Op::Append(sample_event(EventKind::TaskStarted, &task_id)),
            Op::Append(sample_event(EventKind::TokenIssued, &task_id)),
        ],
    )
    .await;
    let last = committed.seqs.last().copied().expect("seqs");
    let head = store.chain_head().await.expect("chain head");
    assert_eq!(head, Some((last, record_at(store, last).await.hash)));

    let failed = store
        .commit(vec![
            Op::Append(sample_event(EventKind::CallAllowed, &task_id)),
            Op::SpendRefresh {
                hash: unique("missing"),
                at: T0,
            },
        ])
        .await;
    assert!(
        matches!(failed, Err(StoreError::RefreshUnknown)),
        "{failed:?}"
    );
    assert_eq!(store.chain_head().await.expect("chain head"), head);

    let next = commit_ok(
        store,
        vec![Op::Append(sample_event(EventKind::CallDenied, &task_id))],
    )
    .await;
    let record = record_at(store, last + 1).await;
    assert_eq!(next.seqs, vec![last + 1]);
    assert_eq!(Some((last, record.prev_hash.clone())), head);
    assert_eq!(
        store.chain_head().await.expect("chain head"),
        Some((last + 1, record.hash))
    );
}

/// A checkpoint is stored only for a stored record with its hash; the same
/// checkpoint again is a no-op, another one of the same seq a conflict;
/// reads are in seq order, `since_seq` exclusive, limited; a batch with a
/// refused checkpoint rolls back whole.
pub async fn checkpoints_round_trip(store: &dyn Store) {
    let task_id = unique("checkpoint");
    let committed = commit_ok(
        store,
        (0..3)
            .map(|_| Op::Append(sample_event(EventKind::CallAllowed, &task_id)))
            .collect(),
    )
    .await;
    let [a, b, c] = committed.seqs[..] else {
        panic!("three seqs: {committed:?}");
    };
    let record_a = record_at(store, a).await;
    let record_b = record_at(store, b).await;
    let record_c = record_at(store, c).await;

    let first = test_checkpoint(a, &record_a.hash);
    let second = test_checkpoint(c, &record_c.hash);
    commit_ok(
        store,
        vec![
            Op::AppendCheckpoint(second.clone()),
            Op::AppendCheckpoint(first.clone()),
        ],
    )
    .await;
    // The same checkpoint again: accepted, nothing changes.
    commit_ok(store, vec![Op::AppendCheckpoint(first.clone())]).await;

    let conflict = |result: crate::Result<crate::Committed>, message: &str| {
        assert!(is_conflict(&result, message), "{message}: {result:?}");
    };
    let mut other_sig = first.clone();
    other_sig.ts = T0.plus_millis(1);
    other_sig.sig = test_sign(a, &record_a.hash, other_sig.ts);
    conflict(
        store.commit(vec![Op::AppendCheckpoint(other_sig)]).await,
        CHECKPOINT_EXISTS,
    );
    conflict(
        store
            .commit(vec![Op::AppendCheckpoint(test_checkpoint(
                b,
                &record_a.hash,
            ))])
            .await,
        CHECKPOINT_HASH_MISMATCH,
    );
    let head = store.chain_head().await.expect("head").expect("a head").0;
    conflict(
        store
            .commit(vec![Op::AppendCheckpoint(test_checkpoint(
                head + 1_000,
                &record_a.hash,
            ))])
            .await,
        CHECKPOINT_NO_SUCH_RECORD,
    );
    // A refused checkpoint takes its batch with it.
    let result = store
        .commit(vec![
            Op::Append(sample_event(EventKind::Anomaly, &task_id)),
            Op::AppendCheckpoint(test_checkpoint(b, &record_b.hash)),
            Op::AppendCheckpoint(test_checkpoint(c, &record_b.hash)),
        ])
        .await;
    conflict(result, CHECKPOINT_HASH_MISMATCH);
    let events = store
        .audit(&AuditQuery {
            task_id: Some(task_id.clone()),
            kind: Some(EventKind::Anomaly),
            ..AuditQuery::default()
        })
        .await
        .expect("audit");
    assert!(events.is_empty(), "{events:?}");

    let read = store
        .checkpoints(Some(a - 1), MAX_ROWS)
        .await
        .expect("checkpoints");
    assert_eq!(
        read,
        vec![first.clone(), second.clone()],
        "seq order, as stored"
    );
    assert_eq!(
        store
            .checkpoints(Some(a), MAX_ROWS)
            .await
            .expect("checkpoints"),
        vec![second.clone()],
        "since_seq is exclusive"
    );
    assert_eq!(
        store
            .checkpoints(Some(a - 1), 1)
            .await
            .expect("checkpoints"),
        vec![first.clone()]
    );
    assert!(
        store
            .checkpoints(Some(a - 1), 0)
            .await
            .expect("checkpoints")
            .is_empty()
    );
    let all = store
        .checkpoints(None, usize::MAX)
        .await
        .expect("checkpoints");
    assert!(all.len() <= MAX_ROWS);
    assert!(all.windows(2).all(|w| matches!(w, [x, y] if x.seq < y.seq)));
    assert!(
        store
            .checkpoints(Some(u64::MAX), 10)
            .await
            .expect("checkpoints")
            .is_empty()
    );

    // The whole log verifies against its checkpoints.
    let report = verify_log(store).await;
    assert!(report.is_ok(), "{report:?}");
    assert!(report.checkpoints_verified >= 2, "{report:?}");
}

/// [`Op::RecordToolUse`]: a use is remembered per (agent, tool), a second
/// record is a no-op, other pairs stay unused, and it rolls back with its
/// batch.
pub async fn tool_use_is_remembered(store: &dyn Store) {
    let agent = unique("agent");
    let other = unique("agent");
    assert!(!store.tool_used(&agent, "db.read").await.expect("read use"));
    let record = |agent: &str, tool: &str| Op::RecordToolUse {
        agent_id: agent.to_owned(),
        tool: tool.to_owned(),
        at: T0,
    };
    commit_ok(store, vec![record(&agent, "db.read")]).await;
    commit_ok(store, vec![record(&agent, "db.read")]).await;
    assert!(store.tool_used(&agent, "db.read").await.expect("read use"));
    assert!(!store.tool_used(&agent, "db.write").await.expect("read use"));
    assert!(!store.tool_used(&other, "db.read").await.expect("read use"));
    // A batch that fails records nothing.
    let bad = Op::UpdateTask {
        record: sample_task(&unique("missing-task")),
        expected_version: 0,
    };
    assert!(
        store
            .commit(vec![record(&other, "db.read"), bad])
            .await
            .is_err()
    );
    assert!(!store.tool_used(&other, "db.read").await.expect("read use"));
}

/// [`Store::task_counts`] counts active and halted tasks as their status
/// moves (insert, halt, resume, complete), leaves completed ones out, and
/// ignores a batch that rolled back. Other checks may share the store, so
/// it compares against the counts read before it starts.
pub async fn task_counts_follow_status(store: &dyn Store) {
    let before = store.task_counts().await.expect("count tasks");
    let with_status = |id: &str, status: TaskStatus| {
        let mut record = sample_task(id);
        record.task.status = status;
        record
    };
    let ids: Vec<String> = (0..5).map(|_| unique("counted")).collect();
    let [a, b, c, d, e] = ids.as_slice() else {
        panic!("five ids");
    };
    commit_ok(
        store,
        vec![
            Op::InsertTask(with_status(a, TaskStatus::Active)),
            Op::InsertTask(with_status(b, TaskStatus::Active)),
            Op::InsertTask(with_status(c, TaskStatus::Active)),
            Op::InsertTask(with_status(d, TaskStatus::Halted)),
            Op::InsertTask(with_status(e, TaskStatus::Completed)),
        ],
    )
    .await;
    let delta = |now: TaskCounts| {
        (
            now.active.checked_sub(before.active).expect("active count"),
            now.halted.checked_sub(before.halted).expect("halted count"),
        )
    };
    let counts = store.task_counts().await.expect("count tasks");
    assert_eq!(delta(counts), (3, 1), "{before:?} then {counts:?}");

    // Halt a, complete b, resume d.
    let moved = |id: &str, status: TaskStatus| {
        let mut record = with_status(id, status);
        record.task.version = 2;
        Op::UpdateTask {
            record,
            expected_version: 1,
        }
    };
    commit_ok(
        store,
        vec![
            moved(a, TaskStatus::Halted),
            moved(b, TaskStatus::Completed),
            moved(d, TaskStatus::Active),
        ],
    )
    .await;
    let counts = store.task_counts().await.expect("count tasks");
    assert_eq!(delta(counts), (2, 1), "{before:?} then {counts:?}");

    // A batch that fails changes no count.
    let result = store
        .commit(vec![
            Op::InsertTask(with_status(&unique("counted"), TaskStatus::Halted)),
            moved(c, TaskStatus::Completed),
            Op::InsertTask(with_status(a, TaskStatus::Active)),
        ])
        .await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "duplicate id: {result:?}"
    );
    let counts = store.task_counts().await.expect("count tasks");
    assert_eq!(delta(counts), (2, 1), "{before:?} then {counts:?}");
}

/// [`Store::queue_depth`] is 0 when no commit is waiting, never counts more
/// commits than are in flight, and comes back to 0 once they are answered
/// (every commit leaves the gauge, acknowledged or refused).
pub async fn queue_depth_returns_to_zero(store: &dyn Store) {
    assert_eq!(store.queue_depth(), 0, "idle");
    let task_id = unique("queued");
    let done = AtomicU64::new(0);
    let caller = |n: usize| {
        let (task_id, done) = (task_id.clone(), &done);
        async move {
            for i in 0..20 {
                let mut event = sample_event(EventKind::CallAllowed, &task_id);
                event.detail = Some(format!("{n}/{i}"));
                commit_ok(store, vec![Op::Append(event)]).await;
            }
            // A refused batch leaves the gauge too.
            let bad = Op::UpdateTask {
                record: sample_task(&unique("missing-task")),
                expected_version: 0,
            };
            assert!(store.commit(vec![bad]).await.is_err());
            done.fetch_add(1, Ordering::SeqCst);
        }
    };
    let sampler = async {
        let mut most = 0;
        while done.load(Ordering::SeqCst) < 4 {
            most = most.max(store.queue_depth());
            tokio::task::yield_now().await;
        }
        most
    };
    let ((), (), (), (), most) = tokio::join!(caller(0), caller(1), caller(2), caller(3), sampler);
    assert!(most <= 4, "at most one waiting commit per caller: {most}");
    assert_eq!(store.queue_depth(), 0, "every commit answered");
}

/// A pin reads back exactly as stored, by name and in [`Store::pins`]; an
/// unknown tool has none. A definition of exactly
/// [`MAX_PIN_DEFINITION_BYTES`] is accepted.
pub async fn pin_round_trip(store: &dyn Store) {
    let upstream = unique("pinned");
    let tool = format!("{upstream}.query");
    let pin = sample_pin(&tool, "first-use");
    assert_eq!(store.pin(&tool).await.expect("read pin"), None);
    commit_ok(store, vec![Op::PinTool(pin.clone())]).await;
    assert_eq!(store.pin(&tool).await.expect("read pin"), Some(pin.clone()));
    let all = store.pins().await.expect("read pins");
    assert_eq!(
        all.iter().filter(|p| p.tool == tool).collect::<Vec<_>>(),
        vec![&pin]
    );
    assert_eq!(store.pin(&unique("missing")).await.expect("read pin"), None);
    // Only the exact name.
    assert_eq!(store.pin(&upstream).await.expect("read pin"), None);

    let big_tool = format!("{upstream}.big");
    let overhead = r#"{"d":""}"#.len();
    let big = pin_of(
        &big_tool,
        &upstream,
        serde_json::json!({"d": "x".repeat(MAX_PIN_DEFINITION_BYTES - overhead)}),
        "alice",
    );
    commit_ok(store, vec![Op::PinTool(big.clone())]).await;
    assert_eq!(store.pin(&big_tool).await.expect("read pin"), Some(big));
}

/// Pinning a tool again replaces its pin whole (re-approval of a changed
/// definition), leaving one pin per tool.
pub async fn pin_upsert_replaces(store: &dyn Store) {
    let upstream = unique("repinned");
    let tool = format!("{upstream}.query");
    let first = sample_pin(&tool, "first-use");
    commit_ok(store, vec![Op::PinTool(first.clone())]).await;

    let mut definition = first.definition.clone();
    if let Some(map) = definition.as_object_mut() {
        map.insert("description".into(), "Runs any query.".into());
    }
    let mut second = pin_of(&tool, &format!("{upstream}-2"), definition, "alice");
    second.pinned_at = T0.plus_millis(60_000);
    assert_ne!(second.hash, first.hash);
    commit_ok(store, vec![Op::PinTool(second.clone())]).await;
    assert_eq!(
        store.pin(&tool).await.expect("read pin"),
        Some(second.clone())
    );
    let all = store.pins().await.expect("read pins");
    assert_eq!(
        all.iter().filter(|p| p.tool == tool).collect::<Vec<_>>(),
        vec![&second]
    );

    // Twice in one batch: the later one wins.
    let mut third = first.clone();
    third.approved_by = "bob".into();
    third.pinned_at = T0.plus_millis(120_000);
    commit_ok(
        store,
        vec![Op::PinTool(first.clone()), Op::PinTool(third.clone())],
    )
    .await;
    assert_eq!(store.pin(&tool).await.expect("read pin"), Some(third));
}

/// [`Store::pins`] is ordered by tool name (byte order), whatever the
/// order the pins were stored in.
pub async fn pins_ordered_by_tool(store: &dyn Store) {
    let upstream = unique("ordered");
    let names = ["b", "a.x", "a", "C", "é", "a-b"];
    let pins: Vec<ToolPin> = names
        .iter()
        .map(|name| sample_pin(&format!("{upstream}.{name}"), "first-use"))
        .collect();
    commit_ok(store, pins.iter().cloned().map(Op::PinTool).collect()).await;
    let mut expected = pins;
    expected.sort_by(|a, b| a.tool.cmp(&b.tool));
    let all = store.pins().await.expect("read pins");
    let ours: Vec<ToolPin> = all
        .iter()
        .filter(|p| p.upstream == upstream)
        .cloned()
        .collect();
    assert_eq!(ours, expected);
    assert_eq!(
        ours.iter()
            .map(|p| p.tool.trim_start_matches(&upstream))
            .collect::<Vec<_>>(),
        [".C", ".a", ".a-b", ".a.x", ".b", ".é"]
    );
    assert!(
        all.windows(2)
            .all(|w| matches!(w, [x, y] if x.tool < y.tool)),
        "pins in tool order, one per tool"
    );
}

/// An invalid pin is a conflict and takes its whole batch with it: no
/// audit record, no seq consumed, no other pin stored, the stored pin of
/// the tool untouched.
pub async fn pin_invalid_rolls_back(store: &dyn Store) {
    let upstream = unique("badpin");
    let tool = format!("{upstream}.query");
    let good = sample_pin(&tool, "first-use");
    let marker = unique("pin-marker");
    let before = commit_ok(
        store,
        vec![
            Op::PinTool(good.clone()),
            Op::Append(sample_event(EventKind::ConfigLoaded, &marker)),
        ],
    )
    .await;

    let other = sample_pin(&format!("{upstream}.other"), "first-use");
    let mut replacement = good.clone();
    replacement.approved_by = "mallory".into();
    let bad: Vec<(&str, ToolPin)> = vec![
        (
            "empty tool",
            ToolPin {
                tool: String::new(),
                ..good.clone()
            },
        ),
        (
            "empty upstream",
            ToolPin {
                upstream: String::new(),
                ..good.clone()
            },
        ),
        (
            "empty approver",
            ToolPin {
                approved_by: String::new(),
                ..good.clone()
            },
        ),
        (
            "short hash",
            ToolPin {
                hash: good.hash.chars().skip(1).collect(),
                ..good.clone()
            },
        ),
        (
            "long hash",
            ToolPin {
                hash: format!("{}0", good.hash),
                ..good.clone()
            },
        ),
        (
            "uppercase hash",
            ToolPin {
                hash: good.hash.to_uppercase(),
                ..good.clone()
            },
        ),
        (
            "non-hex hash",
            ToolPin {
                hash: "z".repeat(64),
                ..good.clone()
            },
        ),
        (
            "array definition",
            ToolPin {
                definition: serde_json::json!([good.definition.clone()]),
                ..good.clone()
            },
        ),
        (
            "null definition",
            ToolPin {
                definition: serde_json::Value::Null,
                ..good.clone()
            },
        ),
        (
            "string definition",
            ToolPin {
                definition: serde_json::json!("a tool"),
                ..good.clone()
            },
        ),
        (
            "oversized definition",
            ToolPin {
                definition: serde_json::json!({"d": "x".repeat(MAX_PIN_DEFINITION_BYTES)}),
                ..good.clone()
            },
        ),
    ];
    for (why, pin) in bad {
        let result = store
            .commit(vec![
                Op::Append(sample_event(EventKind::ConfigLoaded, &upstream)),
                Op::PinTool(other.clone()),
                Op::PinTool(replacement.clone()),
                Op::PinTool(pin),
            ])
            .await;
        assert!(
            matches!(result, Err(StoreError::Conflict(_))),
            "{why}: {result:?}"
        );
    }

    let events = store
        .audit(&AuditQuery {
            task_id: Some(upstream.clone()),
            ..AuditQuery::default()
        })
        .await
        .expect("read audit");
    assert!(
        events.is_empty(),
        "audit events of failed batches: {events:?}"
    );
    assert_eq!(store.pin(&other.tool).await.expect("read pin"), None);
    assert_eq!(store.pin(&tool).await.expect("read pin"), Some(good));
    let after = commit_ok(
        store,
        vec![Op::Append(sample_event(EventKind::ConfigLoaded, &marker))],
    )
    .await;
    assert_eq!(
        after.seqs.first().copied(),
        before.seqs.first().map(|seq| seq + 1),
        "failed batches must not consume seqs"
    );
    assert_log_is_valid(store).await;
}

/// The seq below the oldest stored record (0 for a log never pruned).
pub async fn audit_floor(store: &dyn Store) -> u64 {
    store
        .audit(&AuditQuery {
            since_seq: Some(0),
            limit: Some(1),
            ..AuditQuery::default()
        })
        .await
        .expect("audit")
        .first()
        .map_or(0, |e| e.seq - 1)
}

/// A tiering record (`audit.archived` or `audit.dropped`) saying the
/// records `after + 1 ..= through` went.
pub fn tiering_event(kind: EventKind, after: u64, through: u64) -> NewEvent {
    let mut event = NewEvent::new(T0, kind);
    event.args = Some(serde_json::json!({
        "first_seq": after + 1,
        "through_seq": through,
        "records": through - after,
    }));
    event
}

/// [`Op::PruneAudit`] deletes whole checkpoint segments from the front of
/// the log and nothing else: it refuses a span that does not start where
/// the stored log starts, one no checkpoint ends, and the chain's head; a
/// refused prune rolls its batch back; the checkpoint at the end of the
/// span stays as the anchor and the rest of the log still verifies from
/// it; of two prunes of the same span, exactly one wins.
pub async fn prune_audit_segments(store: &dyn Store) {
    let task_id = unique("prune");
    let committed = commit_ok(
        store,
        (0..10)
            .map(|_| Op::Append(sample_event(EventKind::CallAllowed, &task_id)))
            .collect(),
    )
    .await;
    let [_, _, _, s4, _, _, _, s8, _, s10] = committed.seqs[..] else {
        panic!("ten seqs: {committed:?}");
    };
    for seq in [s4, s8, s10] {
        let hash = record_at(store, seq).await.hash;
        commit_ok(
            store,
            vec![Op::AppendCheckpoint(test_checkpoint(seq, &hash))],
        )
        .await;
    }
    let floor = audit_floor(store).await;
    let head = store.chain_head().await.expect("chain head");
    let prune = |after_seq, through_seq| Op::PruneAudit {
        after_seq,
        through_seq,
    };
    let refused = |result: crate::Result<crate::Committed>| match result {
        Err(StoreError::Conflict(message)) => message,
        other => panic!("expected a conflict, got {other:?}"),
    };
    assert!(!refused(store.commit(vec![prune(s4, s4)]).await).is_empty());
    assert_eq!(
        refused(store.commit(vec![prune(floor + 1, s4)]).await),
        PRUNE_MOVED
    );
    assert_eq!(
        refused(store.commit(vec![prune(floor, s4 - 1)]).await),
        PRUNE_NOT_ANCHORED
    );
    assert_eq!(
        refused(store.commit(vec![prune(floor, s10)]).await),
        PRUNE_HEAD
    );
    // A refused prune takes its batch with it.
    let refused_batch = store
        .commit(vec![
            Op::Append(tiering_event(EventKind::AuditArchived, floor, s4 - 1)),
            prune(floor, s4 - 1),
        ])
        .await;
    assert!(
        is_conflict(&refused_batch, PRUNE_NOT_ANCHORED),
        "{refused_batch:?}"
    );
    assert_eq!(store.chain_head().await.expect("chain head"), head);
    assert_eq!(audit_floor(store).await, floor);

    // Two prunes of the same span race: exactly one wins.
    let batch = || {
        vec![
            Op::Append(tiering_event(EventKind::AuditArchived, floor, s4)),
            prune(floor, s4),
        ]
    };
    let (a, b) = tokio::join!(store.commit(batch()), store.commit(batch()));
    let won: Vec<crate::Committed> = [a, b]
        .into_iter()
        .filter_map(|r| match r {
            Ok(c) => Some(c),
            Err(StoreError::Conflict(m)) if m == PRUNE_MOVED => None,
            Err(e) => panic!("unexpected: {e}"),
        })
        .collect();
    assert_eq!(won.len(), 1, "exactly one prune wins");
    let declared = won
        .first()
        .and_then(|c| c.seqs.first().copied())
        .expect("a seq");
    assert_eq!(audit_floor(store).await, s4);
    assert_eq!(
        all_checkpoints(store)
            .await
            .iter()
            .map(|c| c.seq)
            .filter(|&seq| seq >= s4)
            .collect::<Vec<_>>(),
        vec![s4, s8, s10],
        "the anchor and every later checkpoint stay"
    );
    assert!(
        all_checkpoints(store).await.iter().all(|c| c.seq >= s4),
        "checkpoints below the anchor go with their records"
    );
    // The chain continues; once a checkpoint covers the record that says
    // why the log starts late, the log verifies from its anchor.
    let next = commit_ok(
        store,
        vec![Op::Append(sample_event(EventKind::CallDenied, &task_id))],
    )
    .await;
    let last = next.seqs.first().copied().expect("a seq");
    assert_eq!(
        record_at(store, last).await.prev_hash,
        record_at(store, declared).await.hash
    );
    let report = verify_log(store).await;
    assert_eq!(
        report.first_bad.as_ref().map(|p| p.seq),
        Some(s4 + 1),
        "{report:?}"
    );
    let hash = record_at(store, last).await.hash;
    commit_ok(
        store,
        vec![Op::AppendCheckpoint(test_checkpoint(last, &hash))],
    )
    .await;
    let report = verify_log(store).await;
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(
        (report.anchor, report.floor_declared_at),
        (s4, Some(declared))
    );
}
