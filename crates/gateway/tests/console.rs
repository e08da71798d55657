//! The web console and the live audit stream over real HTTP: sign-in and
//! its cookie, CSRF on every form, roles exactly as in the API, the
//! security headers, the pages, and `GET /v1/events`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A browser-like client that does not follow redirects (the tests look
/// at them) and keeps no cookies (the tests send them).
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The value of `name="<field>" value="…"` in a page.
fn field(html: &str, name: &str) -> String {
    let at = html
        .find(&format!("name=\"{name}\" value=\""))
        .unwrap_or_else(|| panic!("no {name} field in {html}"));
    let rest = &html[at + name.len() + 15..];
    rest[..rest.find('"').unwrap()].to_owned()
}

/// The `name=value` of a `Set-Cookie` header for cookie `name`, with the
/// whole header.
fn set_cookie(r: &reqwest::Response, name: &str) -> Option<(String, String)> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| (v.split(';').next().unwrap().to_owned(), v))
}

/// A signed-in console session.
struct Session {
    cookie: String,
    csrf: String,
}

async fn sign_in(h: &Harness, token: &str) -> Session {
    let c = browser();
    let page = c.get(h.url("/console/login")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let (login_cookie, _) = set_cookie(&page, "portcullis_console_login").unwrap();
    let html = page.text().await.unwrap();
    let login_csrf = field(&html, "login_csrf");
    let r = c
        .post(h.url("/console/login"))
        .header("cookie", &login_cookie)
        .form(&[("token", token), ("login_csrf", &login_csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "sign-in");
    let (cookie, _) = set_cookie(&r, "portcullis_console").unwrap();
    let page = c
        .get(h.url("/console/tasks"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let html = page.text().await.unwrap();
    Session {
        csrf: field(&html, "csrf"),
        cookie,
    }
}

async fn get(h: &Harness, s: &Session, path: &str) -> (StatusCode, String) {
    let r = browser()
        .get(h.url(path))
        .header("cookie", &s.cookie)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.text().await.unwrap())
}

async fn post(h: &Harness, s: &Session, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
    browser()
        .post(h.url(path))
        .header("cookie", &s.cookie)
        .form(form)
        .send()
        .await
        .unwrap()
}

/// A task in `transform` with a call held for approval (hold 0: filed
/// and answered at once); returns the task and the elevation id.
async fn pending_approval(h: &Harness) -> (Started, String) {
    let s = h.start_task(None).await;
    for (tool, args) in [
        ("warehouse.connect", json!({ "database": "a" })),
        (
            "warehouse.validate",
            json!({ "table": "staging_a", "rows": [] }),
        ),
        (
            "warehouse.transform",
            json!({ "table": "staging_a", "steps": ["trim"] }),
        ),
    ] {
        h.call_ok(&s.access, &s.task_id, tool, args).await;
    }
    let a = h
        .call(
            &s.access,
            &s.task_id,
            "warehouse.insert",
            json!({ "table": "staging_a", "rows": [{ "id": 1, "password": "hunter2" }] }),
        )
        .await;
    assert_error(&a, 403, "approval_required");
    let list = h.get("/v1/elevations?status=pending", Some(ADMIN)).await;
    let id = list.body["elevations"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    (s, id)
}

async fn elevation_status(h: &Harness, id: &str) -> String {
    let list = h.get("/v1/elevations", Some(ADMIN)).await;
    list.body["elevations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .unwrap()["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn approval_options() -> Options {
    Options {
        approval: true,
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_session_every_page_redirects_to_sign_in() {
    let h = Harness::start().await;
    for path in [
        "/console",
        "/console/approvals",
        "/console/tasks",
        "/console/tasks/task_x",
        "/console/pins",
        "/console/stream",
        "/console/events",
        "/console/chain",
    ] {
        let r = browser().get(h.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.headers()["location"], "/console/login", "{path}");
    }
    // A forged or ended session cookie is no session.
    let r = browser()
        .get(h.url("/console/approvals"))
        .header("cookie", "portcullis_console=cs_forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    // Forms too: nothing is decided without a session.
    let r = browser()
        .post(h.url("/console/approvals/elv_x"))
        .form(&[("csrf", "x"), ("decision", "approve")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_sets_a_strict_session_cookie_and_sign_out_ends_it() {
    let h = Harness::start().await;
    let c = browser();
    let page = c.get(h.url("/console/login")).send().await.unwrap();
    // The security headers, on every console response.
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert_eq!(page.headers()["cache-control"], "no-store");
    let (login_cookie, _) = set_cookie(&page, "portcullis_console_login").unwrap();
    let html = page.text().await.unwrap();
    assert!(!html.contains("<script>"), "no inline script");
    let login_csrf = field(&html, "login_csrf");

    // A wrong token: 401, no session.
    let r = c
        .post(h.url("/console/login"))
        .header("cookie", &login_cookie)
        .form(&[("token", "not-an-admin-token"), ("login_csrf", &login_csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(set_cookie(&r, "portcullis_console").is_none());
    assert!(r.text().await.unwrap().contains("token_invalid"));
    // A task's bootstrap secret is no admin token either.
    let r = c
        .post(h.url("/console/login"))
        .header("cookie", &login_cookie)
        .form(&[("token", BOOTSTRAP), ("login_csrf", &login_csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Without the sign-in page's cookie (a cross-site sign-in): 403.
    let r = c
        .post(h.url("/console/login"))
        .form(&[("token", ADMIN), ("login_csrf", &login_csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(set_cookie(&r, "portcullis_console").is_none());

    let r = c
        .post(h.url("/console/login"))
        .header("cookie", &login_cookie)
        .form(&[("token", ADMIN), ("login_csrf", &login_csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (cookie, header) = set_cookie(&r, "portcullis_console").unwrap();
    let attrs: Vec<&str> = header.split(';').map(str::trim).collect();
    assert!(attrs.contains(&"HttpOnly"), "{header}");
    assert!(attrs.contains(&"SameSite=Strict"), "{header}");
    assert!(attrs.contains(&"Path=/console"), "{header}");
    let max_age: u64 = attrs
        .iter()
        .find_map(|a| a.strip_prefix("Max-Age="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(max_age > 0 && max_age <= 8 * 3600, "{header}");
    // Plain http: not `Secure` (a browser would drop it); behind TLS it is
    // (`console::tests::cookies_are_secure_behind_tls`).
    assert!(!attrs.contains(&"Secure"), "{header}");
    // The token itself is not the cookie.
    assert!(!cookie.contains(ADMIN));

    let s = Session {
        csrf: field(&get_html(&h, &cookie, "/console/tasks").await, "csrf"),
        cookie,
    };
    let (status, _) = get(&h, &s, "/console/approvals").await;
    assert_eq!(status, StatusCode::OK);
    // Signing out needs the CSRF token too.
    let r = post(&h, &s, "/console/logout", &[("csrf", "csrf_wrong")]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let (status, _) = get(&h, &s, "/console/approvals").await;
    assert_eq!(status, StatusCode::OK);
    let r = post(&h, &s, "/console/logout", &[("csrf", &s.csrf)]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (_, cleared) = set_cookie(&r, "portcullis_console").unwrap();
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    // The old cookie is dead on the server, whatever the browser keeps.
    let (status, _) = get(&h, &s, "/console/approvals").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
}

async fn get_html(h: &Harness, cookie: &str, path: &str) -> String {
    browser()
        .get(h.url(path))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_csrf_token_is_403_and_changes_nothing() {
    let h = Harness::with(approval_options()).await;
    let (task, id) = pending_approval(&h).await;
    let s = sign_in(&h, ADMIN).await;
    let path = format!("/console/approvals/{id}");
    for csrf in ["", "csrf_wrong", &s.csrf[..s.csrf.len() - 1]] {
        let r = post(&h, &s, &path, &[("csrf", csrf), ("decision", "approve")]).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "csrf {csrf:?}");
        assert!(r.text().await.unwrap().contains("token_invalid"));
    }
    assert_eq!(elevation_status(&h, &id).await, "pending");
    // Another session's token is not this one's.
    let other = sign_in(&h, APPROVER).await;
    let r = post(
        &h,
        &s,
        &path,
        &[("csrf", &other.csrf), ("decision", "approve")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let halt = format!("/console/tasks/{}/halt", task.task_id);
    let r = post(&h, &s, &halt, &[("csrf", "nope"), ("reason", "x")]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(h.task(&task.task_id).await["status"], "active");
    let r = post(
        &h,
        &s,
        "/console/pins/approve",
        &[
            ("csrf", "nope"),
            ("tool", "warehouse.insert"),
            ("hash", "x"),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = post(&h, &s, "/console/chain", &[("csrf", "nope")]).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // With its own token the same form works.
    let r = post(
        &h,
        &s,
        &path,
        &[("csrf", &s.csrf), ("decision", "approve"), ("note", "ok")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(elevation_status(&h, &id).await, "approved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_the_apis_an_auditor_cannot_approve_or_halt() {
    let h = Harness::with(approval_options()).await;
    let (task, id) = pending_approval(&h).await;
    let auditor = sign_in(&h, AUDITOR).await;
    // The approvals page and its forms are for approvers.
    let (status, html) = get(&h, &auditor, "/console/approvals").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(html.contains("tool_not_granted"), "{html}");
    let r = post(
        &h,
        &auditor,
        &format!("/console/approvals/{id}"),
        &[("csrf", &auditor.csrf), ("decision", "approve")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(elevation_status(&h, &id).await, "pending");
    // Halting is for admins.
    let r = post(
        &h,
        &auditor,
        &format!("/console/tasks/{}/halt", task.task_id),
        &[("csrf", &auditor.csrf), ("reason", "x")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(h.task(&task.task_id).await["status"], "active");
    // What auditors read, they read.
    for path in [
        "/console/tasks".to_owned(),
        format!("/console/tasks/{}", task.task_id),
        "/console/pins".to_owned(),
        "/console/stream".to_owned(),
        "/console/chain".to_owned(),
    ] {
        let (status, html) = get(&h, &auditor, &path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {html}");
        // No action form an auditor cannot use is offered.
        assert!(!html.contains("/halt\""), "{path}");
    }
    // An approver reads no tasks (the API gives approvers no task reads).
    let approver = sign_in(&h, APPROVER).await;
    let (status, _) = get(&h, &approver, "/console/tasks").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let r = post(
        &h,
        &approver,
        &format!("/console/approvals/{id}"),
        &[
            ("csrf", &approver.csrf),
            ("decision", "deny"),
            ("note", "no"),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(elevation_status(&h, &id).await, "denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approvals_page_shows_what_the_approver_decides_on() {
    let h = Harness::with(approval_options()).await;
    let (task, id) = pending_approval(&h).await;
    let s = sign_in(&h, APPROVER).await;
    let (status, html) = get(&h, &s, "/console/approvals").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains(&format!("id=\"{id}\"")));
    assert!(html.contains("warehouse.insert"));
    assert!(html.contains("ingest-bot"));
    assert!(html.contains("nightly load"), "the task goal");
    assert!(html.contains(&task.task_id));
    let list = h.get("/v1/elevations?status=pending", Some(ADMIN)).await;
    let why = list.body["elevations"][0]["reason"].as_str().unwrap();
    assert!(!why.is_empty());
    assert!(html.contains(why), "why approval is needed: {why}");
    assert!(html.contains("waiting"));
    // The redacted arguments: the secret is not on the page.
    assert!(html.contains("staging_a"));
    assert!(!html.contains("hunter2"), "redacted");
    // The count badge.
    assert!(html.contains("id=\"pending-count\""));
    assert!(html.contains(">1</span>"), "{html}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_and_resume_with_a_reason_from_the_console() {
    let h = Harness::start().await;
    let task = h.start_task(None).await;
    let s = sign_in(&h, ADMIN).await;
    let (_, html) = get(&h, &s, &format!("/console/tasks/{}", task.task_id)).await;
    assert!(html.contains("<svg"), "the workflow diagram");
    assert!(
        html.contains("state current initial"),
        "current state marked"
    );
    let r = post(
        &h,
        &s,
        &format!("/console/tasks/{}/halt", task.task_id),
        &[("csrf", &s.csrf), ("reason", "looping on connect")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(h.task(&task.task_id).await["status"], "halted");
    // The task can do nothing any more.
    let before = h.upstream_calls();
    let a = h
        .call(
            &task.access,
            &task.task_id,
            "warehouse.connect",
            json!({ "database": "a" }),
        )
        .await;
    assert_error(&a, 403, "anomaly_halt");
    assert_eq!(h.upstream_calls(), before);
    let records = h.audit(&task.task_id).await;
    let halted = records.iter().find(|r| r["kind"] == "task.halted").unwrap();
    assert_eq!(halted["detail"], "halted by admin ops: looping on connect");
    // Visibly halted: on its page and in the list.
    let (_, html) = get(&h, &s, &format!("/console/tasks/{}", task.task_id)).await;
    assert!(html.contains("banner halted"));
    let (_, html) = get(&h, &s, "/console/tasks?status=halted").await;
    assert!(html.contains(&task.task_id));
    let (_, html) = get(&h, &s, "/console/tasks?status=active").await;
    assert!(!html.contains(&task.task_id));

    let r = post(
        &h,
        &s,
        &format!("/console/tasks/{}/resume", task.task_id),
        &[("csrf", &s.csrf), ("reason", "fixed")],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.unwrap();
    let access = html
        .split("<dt>access_token</dt><dd><code>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(h.task(&task.task_id).await["status"], "active");
    h.call_ok(
        &access,
        &task.task_id,
        "warehouse.connect",
        json!({ "database": "a" }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_halt_takes_a_reason_too() {
    let h = Harness::start().await;
    let task = h.start_task(None).await;
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/halt", task.task_id),
            Some(ADMIN),
            &json!({ "reason": "runaway" }),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let records = h.audit(&task.task_id).await;
    let halted = records.iter().find(|r| r["kind"] == "task.halted").unwrap();
    assert_eq!(halted["detail"], "halted by admin ops: runaway");
    let a = h
        .post_json(
            &format!("/v1/tasks/{}/resume", task.task_id),
            Some(ADMIN),
            &json!({ "unknown": 1 }),
        )
        .await;
    assert_error(&a, 400, "args_invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_page_verifies_on_request() {
    let h = Harness::start().await;
    h.start_task(None).await;
    let s = sign_in(&h, AUDITOR).await;
    let (_, html) = get(&h, &s, "/console/chain").await;
    assert!(html.contains("Not verified"));
    let r = post(&h, &s, "/console/chain", &[("csrf", &s.csrf)]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let (_, html) = get(&h, &s, "/console/chain").await;
    assert!(html.contains("verdict ok"), "{html}");
    assert!(html.contains("Intact"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_are_served_from_the_binary() {
    let h = Harness::start().await;
    let r = browser()
        .get(h.url("/console/assets/console.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(r.text().await.unwrap().contains("EventSource"));
    let r = browser()
        .get(h.url("/console/assets/console.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// Reads SSE events from `r` into `text` until it holds `want` events
/// (10 s at most); returns them all.
async fn read_events(
    r: &mut reqwest::Response,
    text: &mut String,
    want: usize,
) -> Vec<(u64, Value)> {
    loop {
        let events = parse_events(text);
        if events.len() >= want {
            return events;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .expect("no event within 10 s")
            .unwrap()
            .expect("the stream ended");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

fn parse_events(text: &str) -> Vec<(u64, Value)> {
    text.split("\n\n")
        .filter(|b| b.contains("event: audit"))
        .filter(|b| {
            b.lines().any(|l| l.starts_with("data: ")) && text.contains(&format!("{b}\n\n"))
        })
        .map(|b| {
            let id = b
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .unwrap()
                .parse()
                .unwrap();
            let data = b.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            (id, serde_json::from_str(data).unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_live_filter_and_resume_from_last_event_id() {
    let h = Harness::start().await;
    // Auditors only, like the audit API.
    let a = h.get("/v1/events", None).await;
    assert_token_error(&a, "token_missing");
    let a = h.get("/v1/events", Some(APPROVER)).await;
    assert_error(&a, 403, "tool_not_granted");
    let a = h.get("/v1/events?kind=no.such", Some(AUDITOR)).await;
    assert_error(&a, 400, "args_invalid");

    let old = h.start_task(None).await;
    let mut all = h
        .client
        .get(h.url("/v1/events"))
        .bearer_auth(AUDITOR)
        .send()
        .await
        .unwrap();
    assert_eq!(all.status(), StatusCode::OK);
    assert_eq!(all.headers()["content-type"], "text/event-stream");
    let task = h.start_task(None).await;
    let mut halts = h
        .client
        .get(h.url(&format!(
            "/v1/events?task_id={}&kind=task.halted",
            task.task_id
        )))
        .bearer_auth(AUDITOR)
        .send()
        .await
        .unwrap();
    // New records only: the stream starts after the newest record.
    let mut all_text = String::new();
    let first = read_events(&mut all, &mut all_text, 1).await;
    assert_eq!(first[0].1["task_id"], task.task_id.as_str());
    assert_ne!(first[0].1["task_id"], old.task_id.as_str());
    assert_eq!(first[0].1["kind"], "task.started");
    h.post_json(
        &format!("/v1/tasks/{}/halt", task.task_id),
        Some(ADMIN),
        &json!({ "reason": "watch it stream" }),
    )
    .await;
    let got = read_events(&mut halts, &mut String::new(), 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1["kind"], "task.halted");
    assert_eq!(got[0].1["detail"], "halted by admin ops: watch it stream");
    // In order, ids are seqs, nothing twice.
    let seen = read_events(&mut all, &mut all_text, 4).await;
    let ids: Vec<u64> = seen.iter().map(|(id, _)| *id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for (id, record) in &seen {
        assert_eq!(record["seq"], *id);
    }
    // Resume after the second event: the third onwards, nothing before.
    let resume_at = ids[1];
    let mut again = h
        .client
        .get(h.url("/v1/events"))
        .bearer_auth(AUDITOR)
        .header("last-event-id", resume_at.to_string())
        .send()
        .await
        .unwrap();
    let resumed = read_events(&mut again, &mut String::new(), 2).await;
    assert_eq!(resumed[0].0, ids[2]);
    assert!(resumed.iter().all(|(id, _)| *id > resume_at));
    // A malformed Last-Event-ID is refused, not read from the start.
    let a = h
        .client
        .get(h.url("/v1/events"))
        .bearer_auth(AUDITOR)
        .header("last-event-id", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_stream_is_the_event_stream_for_a_session() {
    let h = Harness::start().await;
    let s = sign_in(&h, AUDITOR).await;
    let mut r = browser()
        .get(h.url("/console/events?kind=task.started"))
        .header("cookie", &s.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let task = h.start_task(None).await;
    let got = read_events(&mut r, &mut String::new(), 1).await;
    assert_eq!(got[0].1["task_id"], task.task_id.as_str());
}

/// Waits (10 s at most) for an accepted alert whose body contains `needle`.
async fn alert_with(rx: &Receiver, needle: &str) -> (String, String) {
    let started = std::time::Instant::now();
    loop {
        if let Some(found) = rx.accepted().into_iter().find(|(_, b)| b.contains(needle)) {
            return found;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no alert with {needle}: {:?}",
            rx.accepted()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_approval_alert_links_to_its_console_page() {
    let rx = Receiver::start(0, false).await;
    let h = Harness::with(Options {
        alert_webhook: Some(rx.url.clone()),
        ..approval_options()
    })
    .await;
    let (_, id) = pending_approval(&h).await;
    let (content_type, body) = alert_with(&rx, &id).await;
    assert_eq!(content_type, "application/json");
    let alert: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(alert["kind"], "elevation.requested");
    assert_eq!(alert["url"], format!("{}/console/approvals#{id}", h.base));

    // Slack's shape: one `text`, with the link.
    let rx = Receiver::start(0, false).await;
    let h = Harness::with(Options {
        alert_webhook: Some(rx.url.clone()),
        alert_format: Some("slack"),
        ..approval_options()
    })
    .await;
    let (_, id) = pending_approval(&h).await;
    let (_, body) = alert_with(&rx, &id).await;
    let alert: Value = serde_json::from_str(&body).unwrap();
    let text = alert["text"].as_str().unwrap();
    assert_eq!(alert.as_object().unwrap().len(), 1, "{body}");
    assert!(text.contains("elevation.requested"), "{text}");
    assert!(
        text.contains(&format!(
            "<{}/console/approvals#{id}|Open in the console>",
            h.base
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped() {
    let h = Harness::start().await;
    let mut open = Vec::new();
    for _ in 0..portcullis_gateway::events::MAX_STREAMS {
        let r = h
            .client
            .get(h.url("/v1/events"))
            .bearer_auth(AUDITOR)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        open.push(r);
    }
    let a = h.get("/v1/events", Some(AUDITOR)).await;
    assert_error(&a, 403, "rate_limited");
    assert!(a.header("retry-after").is_some());
    // A closed stream frees its place.
    drop(open.pop());
    let started = std::time::Instant::now();
    loop {
        let r = h
            .client
            .get(h.url("/v1/events"))
            .bearer_auth(AUDITOR)
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::OK {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
