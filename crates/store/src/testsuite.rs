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

use crate::{
    AuditQuery, EventKind, MAX_AUDIT_LIMIT, NewEvent, Op, RefreshRecord, Store, StoreError,
    TaskRecord, TokenKind, TokenRecord,
};

/// The instant the checks pretend it is.
pub const T0: Timestamp = Timestamp(1_700_000_000_000);

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
    audit_query_filters(store).await;
    audit_query_limits(store).await;
    concurrent_commits(store).await;
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
            grants: vec![Grant {
                tool: "s3.get".into(),
                expires_at: T0.plus_millis(60_000),
            }],
            calls: 3,
            tool_calls: BTreeMap::from([("db.read".to_owned(), 3)]),
            version: 1,
            started_at: T0,
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
}
