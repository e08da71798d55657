//! Calls of one task decided while the previous call's commit is still in
//! the ledger writer's queue (docs/architecture.md, "The call path"): what
//! is planned on a commit that fails must never be committed or forwarded,
//! and the task's other changes see every queued call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::*;
use portcullis_core::TaskStatus;
use portcullis_store::{AuditQuery, EventKind, NewEvent, Op, Store, StoreError};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn connect_args() -> Value {
    json!({ "database": "analytics", "password": "hunter2" })
}

/// How a call of a halted task is refused: by the pipeline, or by the
/// token check once the halt revoked the task's tokens.
const HALTED: [&str; 2] = ["task_not_active", "anomaly_halt"];

/// Calls one task from `n` connections until a call is refused as halted; returns
/// the answers' statuses and reasons.
async fn flood(h: &Arc<Harness>, s: &Started, n: usize, per: usize) -> Vec<(StatusCode, String)> {
    let mut callers = Vec::new();
    for _ in 0..n {
        let (h, task, token) = (Arc::clone(h), s.task_id.clone(), s.access.clone());
        callers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..per {
                let a = h
                    .call(&token, &task, "warehouse.connect", connect_args())
                    .await;
                let reason = a.error().to_owned();
                let done = a.status != StatusCode::OK && HALTED.contains(&reason.as_str());
                seen.push((a.status, reason));
                if done {
                    break;
                }
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for c in callers {
        all.extend(c.await.unwrap());
    }
    all
}

/// Regression (planning on queued commits): a task's calls are planned on
/// the state the previous call's queued commit will produce. When another
/// writer halts the task meanwhile, the queued call fails its
/// compare-and-swap — and the call planned on it must fail too, even
/// though its own compare-and-swap would match the version the halt
/// wrote: otherwise it would commit an active task over the halt. Here
/// the halt comes from outside the gateway (straight to the ledger, as
/// another process would), at a moment when calls are in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_from_another_writer_is_never_undone_by_queued_calls() {
    let h = Arc::new(Harness::with(Options::default()).await);
    for round in 0..6 {
        let s = h.start_task(None).await;
        let flooding = {
            let (h, s) = (Arc::clone(&h), s.clone());
            tokio::spawn(async move { flood(&h, &s, 16, 40).await })
        };
        // Let the calls get going, then halt from outside the gateway.
        loop {
            let record = h.store.task(&s.task_id).await.unwrap().unwrap();
            if record.task.calls >= 8 + round * 4 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let halted_at = halt_from_outside(&h, &s.task_id).await;
        let answers = flooding.await.unwrap();
        let record = h.store.task(&s.task_id).await.unwrap().unwrap();
        assert_eq!(
            record.task.status,
            TaskStatus::Halted,
            "round {round}: the halt was undone by a call planned before it"
        );
        let audit = h
            .store
            .audit(&AuditQuery {
                task_id: Some(s.task_id.clone()),
                limit: Some(portcullis_store::MAX_AUDIT_LIMIT),
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        let allowed: Vec<u64> = audit
            .iter()
            .filter(|e| e.event.kind == EventKind::CallAllowed)
            .map(|e| e.seq)
            .collect();
        assert!(
            allowed.iter().all(|&seq| seq < halted_at),
            "round {round}: a call was recorded allowed after the halt (at {halted_at}): {allowed:?}"
        );
        let ok = answers
            .iter()
            .filter(|(status, _)| *status == StatusCode::OK)
            .count();
        assert_eq!(
            ok,
            allowed.len(),
            "round {round}: every call answered was recorded allowed, and no other"
        );
        // Every other answer is a denial of the halted task, or a 503 for a
        // call planned on a commit that failed.
        for (status, reason) in &answers {
            assert!(
                *status == StatusCode::OK
                    || HALTED.contains(&reason.as_str())
                    || (*status == StatusCode::SERVICE_UNAVAILABLE && reason == "internal_error"),
                "round {round}: {status} {reason}"
            );
        }
    }
    // Nothing was forwarded that was not recorded allowed.
    let audit = h
        .store
        .audit(&AuditQuery {
            kind: Some(EventKind::CallAllowed),
            limit: Some(portcullis_store::MAX_AUDIT_LIMIT),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(h.upstream_calls(), audit.len());
}

/// Halts a task straight in the ledger, as another process would (no
/// token revoked, no cache told); returns the seq of its record.
async fn halt_from_outside(h: &Harness, task_id: &str) -> u64 {
    loop {
        let record = h.store.task(task_id).await.unwrap().unwrap();
        let mut next = record.clone();
        next.task.status = TaskStatus::Halted;
        next.task.version += 1;
        let mut event = NewEvent::new(
            portcullis_core::Timestamp(h.now_secs() * 1000),
            EventKind::TaskHalted,
        );
        event.task_id = Some(task_id.to_owned());
        event.detail = Some("halted by another writer".to_owned());
        match h
            .store
            .commit(vec![
                Op::UpdateTask {
                    record: next,
                    expected_version: record.task.version,
                },
                Op::Append(event),
            ])
            .await
        {
            Ok(done) => return *done.seqs.first().unwrap(),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Regression (a task's state kept between calls): the state of a task
/// with no call in flight stays cached for its next call. When another
/// writer changes the task in between, the call planned on the cached state
/// loses its compare-and-swap; it must then be decided again on the
/// ledger's state — refused as halted, not answered 503 — and nothing is
/// forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_changed_by_another_writer_between_calls_is_decided_afresh() {
    let h = Harness::with(Options::default()).await;
    let s = h.start_task(None).await;
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let forwarded = h.upstream_calls();
    halt_from_outside(&h, &s.task_id).await;
    let a = h
        .call(&s.access, &s.task_id, "warehouse.connect", connect_args())
        .await;
    assert_ne!(a.status, StatusCode::OK, "{a:?}");
    assert_ne!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
    assert_eq!(a.error(), "task_not_active", "{a:?}");
    assert_eq!(h.upstream_calls(), forwarded, "the upstream saw nothing");
    let audit = h.audit(&s.task_id).await;
    let last = audit.last().unwrap();
    assert_eq!(last["kind"], "call.denied", "{last}");
    assert_eq!(last["reason"], "task_not_active", "{last}");
}

/// The task's own changes (here an admin's halt through the API) wait for
/// the calls already queued, and the next call sees the change: none is
/// answered 503, and none is allowed after the halt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_halt_sees_every_queued_call_and_stops_the_next() {
    let h = Arc::new(Harness::with(Options::default()).await);
    let s = h.start_task(None).await;
    let flooding = {
        let (h, s) = (Arc::clone(&h), s.clone());
        tokio::spawn(async move { flood(&h, &s, 16, 40).await })
    };
    loop {
        let record = h.store.task(&s.task_id).await.unwrap().unwrap();
        if record.task.calls >= 20 {
            break;
        }
        tokio::task::yield_now().await;
    }
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/halt", s.task_id),
            Some(ADMIN),
            &json!({}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let answers = flooding.await.unwrap();
    for (status, reason) in &answers {
        assert!(
            *status == StatusCode::OK || HALTED.contains(&reason.as_str()),
            "{status} {reason}"
        );
    }
    let record = h.store.task(&s.task_id).await.unwrap().unwrap();
    assert_eq!(record.task.status, TaskStatus::Halted);
    let audit = h.audit(&s.task_id).await;
    let halted = audit
        .iter()
        .position(|e| e["kind"] == "task.halted")
        .expect("the halt is on record");
    assert!(
        audit[halted..].iter().all(|e| e["kind"] != "call.allowed"),
        "a call was allowed after the halt"
    );
    let ok = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::OK)
        .count();
    let allowed = audit.iter().filter(|e| e["kind"] == "call.allowed").count();
    assert_eq!(ok, allowed);
    assert_eq!(record.task.calls, u64::try_from(allowed).unwrap());
}
