//! The alert webhook (`audit.alert_webhook`, DESIGN sections 3, 7 and 9).
//!
//! When a webhook is configured, the gateway POSTs a JSON alert
//! `{kind, task_id, agent_id, reason, detail, ts}` (`ts` in unix
//! milliseconds) to it on halts and, later, anomalies. An alert carries
//! identifiers, a reason code and a short human detail — never a token nor
//! a call's arguments.
//!
//! Delivery never holds up a request: [`Alerts::send`] only `try_send`s into
//! a bounded queue ([`QUEUE_CAPACITY`]); when the queue is full the alert is
//! dropped and `portcullis_alerts_dropped_total` counts it. One background
//! task drains the queue in order, each alert with up to
//! [`RetryPolicy::attempts`] HTTP/1.1 POSTs, a timeout per attempt and
//! exponential backoff between attempts; a 2xx answer is a delivery
//! (`portcullis_alerts_delivered_total`), an alert that exhausted its
//! attempts is counted in `portcullis_alerts_failed_total`.
//!
//! The delivery task is spawned lazily, on the first `send`, on the tokio
//! runtime of the caller (a request handler). So a [`crate::Gateway`] can be
//! assembled with or without a runtime (`serve`, the test harness, benches)
//! and no task runs when nothing is ever alerted. The task ends when the
//! gateway (the last sender) is dropped; alerts still queued at shutdown
//! are lost.
//!
//! An alert about something a person can act on in the console (a pending
//! approval) also carries `url`, the console page of that item. With
//! `audit.alert_format = "slack"` the body is instead `{"text": …}`, as
//! Slack's (and Mattermost's) incoming webhooks take it: one line with the
//! kind, the identifiers, the reason and detail, and the link.
//!
//! `http://` and `https://` webhooks. An `https://` receiver is verified
//! (chain, validity, host name) against the system roots, or the roots of
//! `audit.alert_ca_file`; a CA file that cannot be read is a setup error at
//! [`crate::Gateway::new`], a failed handshake a failed attempt (logged with
//! its TLS cause, retried like any other).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portcullis_core::{Task, Timestamp};
use portcullis_tls::ClientTls;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::state::SetupError;

/// Alerts waiting for delivery, at most.
pub const QUEUE_CAPACITY: usize = 1024;

/// Alert kind: a task was halted (by an admin or an anomaly rule).
pub const TASK_HALTED: &str = "task.halted";
/// Alert kind: an anomaly rule fired (deny or require_approval).
pub const ANOMALY: &str = "anomaly";

/// One alert, the webhook body of DESIGN section 9.
///
/// Build it from identifiers, a reason code and a short detail only: no
/// tokens, no arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// What happened, e.g. [`TASK_HALTED`].
    pub kind: &'static str,
    /// The task concerned, if any.
    pub task_id: Option<String>,
    /// Its agent, if any.
    pub agent_id: Option<String>,
    /// A reason code (DESIGN section 2) when a rule fired; `null` for a
    /// human's action.
    pub reason: Option<String>,
    /// A short human-readable detail.
    pub detail: Option<String>,
    /// When, in unix milliseconds.
    pub ts: u64,
}

impl Alert {
    /// An alert of `kind` about `task` at `now`.
    pub fn for_task(kind: &'static str, task: &Task, now: Timestamp) -> Self {
        Self {
            kind,
            task_id: Some(task.id.clone()),
            agent_id: Some(task.agent_id.clone()),
            reason: None,
            detail: None,
            ts: now.0,
        }
    }

    /// With a reason code.
    #[must_use]
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// With a detail.
    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// How hard a delivery is tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// POSTs per alert, at least 1.
    pub attempts: u32,
    /// Timeout of one attempt (connect, request and answer).
    pub timeout: Duration,
    /// Wait before the second attempt; doubled before each later one.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 5 s each, waiting 0.5 s, 1 s, 2 s and 4 s between them.
    fn default() -> Self {
        Self {
            attempts: 5,
            timeout: Duration::from_secs(5),
            backoff: Duration::from_millis(500),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `n` (1-based).
    fn wait_after(&self, n: u32) -> Duration {
        self.backoff
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
    }
}

/// Delivery counters, shared with [`crate::metrics::Metrics`].
#[derive(Debug, Default)]
pub struct AlertCounters {
    /// Alerts a receiver accepted (2xx).
    pub delivered: AtomicU64,
    /// Alerts given up after every attempt failed.
    pub failed: AtomicU64,
    /// Alerts dropped because the queue was full.
    pub dropped: AtomicU64,
}

/// An alert on its way, with the console page it links to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Delivery {
    #[serde(flatten)]
    alert: Alert,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
}

/// The delivery task before it starts.
struct Worker {
    rx: mpsc::Receiver<Delivery>,
    uri: Uri,
    policy: RetryPolicy,
    format: portcullis_config::AlertFormat,
    tls: Arc<portcullis_tls::rustls::ClientConfig>,
}

struct Inner {
    tx: mpsc::Sender<Delivery>,
    /// `Some` until the delivery task is spawned.
    worker: Mutex<Option<Worker>>,
}

/// The gateway's alert sender. Cheap to call from any handler or rule.
pub struct Alerts {
    /// `None` when no webhook is configured.
    inner: Option<Inner>,
    counters: Arc<AlertCounters>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field("enabled", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

impl Alerts {
    /// Alerts that go nowhere (no webhook configured).
    pub fn disabled(counters: Arc<AlertCounters>) -> Self {
        Self {
            inner: None,
            counters,
        }
    }

    /// Alerts to `webhook` (an `http://` or `https://` URL, verified
    /// against the system roots) through a queue of `capacity`.
    pub fn new(
        webhook: &str,
        capacity: usize,
        policy: RetryPolicy,
        counters: Arc<AlertCounters>,
    ) -> Result<Self, SetupError> {
        Self::with_tls(webhook, capacity, policy, counters, &ClientTls::default())
    }

    /// [`Alerts::new`], with `tls`'s roots (and client identity) for an
    /// `https://` webhook.
    pub fn with_tls(
        webhook: &str,
        capacity: usize,
        policy: RetryPolicy,
        counters: Arc<AlertCounters>,
        tls: &ClientTls,
    ) -> Result<Self, SetupError> {
        let uri = parse_webhook(webhook)?;
        let tls = if uri.scheme_str() == Some("https") {
            // No ALPN here: the connector sets it (and refuses a preset one).
            portcullis_tls::client_config(tls, &[])
        } else {
            portcullis_tls::trusting_nothing()
        }
        .map_err(|e| SetupError(format!("audit.alert_webhook: {e}")))?;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Ok(Self {
            inner: Some(Inner {
                tx,
                worker: Mutex::new(Some(Worker {
                    rx,
                    uri,
                    policy,
                    format: portcullis_config::AlertFormat::Json,
                    tls,
                })),
            }),
            counters,
        })
    }

    /// Whether a webhook is configured.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Replaces the retry policy; only before the first alert is sent.
    pub fn set_policy(&self, policy: RetryPolicy) {
        if let Some(inner) = &self.inner
            && let Some(w) = lock(&inner.worker).as_mut()
        {
            w.policy = policy;
        }
    }

    /// Sets the body format; only before the first alert is sent.
    pub fn set_format(&self, format: portcullis_config::AlertFormat) {
        if let Some(inner) = &self.inner
            && let Some(w) = lock(&inner.worker).as_mut()
        {
            w.format = format;
        }
    }

    /// Queues `alert` for delivery without ever waiting: when the queue is
    /// full (a slow or dead receiver), it is dropped and counted.
    pub fn send(&self, alert: Alert) {
        self.send_linked(alert, None);
    }

    /// [`Alerts::send`], with `url`: the console page of the item the
    /// alert is about.
    pub fn send_linked(&self, alert: Alert, url: Option<String>) {
        let Some(inner) = &self.inner else {
            return;
        };
        self.start(inner);
        match inner.tx.try_send(Delivery { alert, url }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = d.alert.kind, task_id = ?d.alert.task_id, "alert dropped: queue full");
            }
        }
    }

    /// Spawns the delivery task on the current runtime, once.
    fn start(&self, inner: &Inner) {
        let mut slot = lock(&inner.worker);
        if slot.is_none() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            // No runtime here: alerts wait in the queue until a send from
            // inside one starts the task.
            return;
        };
        if let Some(worker) = slot.take() {
            handle.spawn(deliver_all(worker, self.counters.clone()));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Checks the webhook URL: `http(s)://host[:port]/path` only.
fn parse_webhook(webhook: &str) -> Result<Uri, SetupError> {
    let err = |why: &str| SetupError(format!("audit.alert_webhook {webhook:?}: {why}"));
    let uri: Uri = webhook
        .parse()
        .map_err(|e| err(&format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(err("not an http:// or https:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(err("no host"));
    }
    Ok(uri)
}

/// The delivery task: one alert at a time, in order.
async fn deliver_all(mut worker: Worker, counters: Arc<AlertCounters>) {
    let mut connector = HttpConnector::new();
    connector.enforce_http(false);
    connector.set_connect_timeout(Some(worker.policy.timeout));
    let builder = HttpsConnectorBuilder::new().with_tls_config((*worker.tls).clone());
    // Only the configured scheme: an `https://` webhook never falls back
    // to plain http.
    let connector = if worker.uri.scheme_str() == Some("https") {
        builder.https_only()
    } else {
        builder.https_or_http()
    }
    .enable_http1()
    .wrap_connector(connector);
    let client: Client<HttpsConnector<HttpConnector>, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    while let Some(delivery) = worker.rx.recv().await {
        let alert = &delivery.alert;
        let body = match render_body(&delivery, worker.format) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "alert not serializable");
                counters.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let policy = &worker.policy;
        let attempts = policy.attempts.max(1);
        let mut delivered = false;
        for n in 1..=attempts {
            match attempt(&client, &worker.uri, body.clone(), policy.timeout).await {
                Ok(()) => {
                    delivered = true;
                    break;
                }
                Err(why) => {
                    tracing::warn!(kind = alert.kind, attempt = n, %why, "alert delivery failed");
                }
            }
            if n < attempts {
                tokio::time::sleep(policy.wait_after(n)).await;
            }
        }
        let c = if delivered {
            &counters.delivered
        } else {
            tracing::error!(kind = alert.kind, task_id = ?alert.task_id, "alert given up");
            &counters.failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The webhook body of `d` in `format`.
fn render_body(
    d: &Delivery,
    format: portcullis_config::AlertFormat,
) -> Result<Vec<u8>, serde_json::Error> {
    match format {
        portcullis_config::AlertFormat::Json => serde_json::to_vec(d),
        portcullis_config::AlertFormat::Slack => {
            let a = &d.alert;
            let mut text = format!("*Portcullis: {}*", a.kind);
            for (label, value) in [
                ("task", &a.task_id),
                ("agent", &a.agent_id),
                ("reason", &a.reason),
            ] {
                if let Some(v) = value {
                    text.push_str(&format!(" · {label} `{}`", slack_escape(v)));
                }
            }
            if let Some(detail) = &a.detail {
                text.push_str(&format!("\n{}", slack_escape(detail)));
            }
            if let Some(url) = &d.url {
                text.push_str(&format!("\n<{}|Open in the console>", slack_escape(url)));
            }
            serde_json::to_vec(&serde_json::json!({ "text": text }))
        }
    }
}

/// Slack's three control characters in message text (`&`, `<`, `>`), so
/// a detail cannot forge a link or a mention.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// How much of a receiver's answer is read (it is not used; reading it
/// lets the connection be reused).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// One POST; `Ok` on a 2xx answer within `timeout`.
async fn attempt(
    client: &Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: &Uri,
    body: Bytes,
    timeout: Duration,
) -> Result<(), String> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "portcullis-alerts")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| portcullis_tls::causes(&e))?;
        let status = response.status();
        // Read the answer so the connection can be reused, but never more
        // than MAX_ANSWER_BYTES of it: the receiver is outside our trust,
        // and a huge answer is dropped with its connection.
        let _ = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("receiver answered {status}"))
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn alert(i: u64) -> Alert {
        Alert {
            kind: TASK_HALTED,
            task_id: Some(format!("task_{i}")),
            agent_id: Some("bot".to_owned()),
            reason: None,
            detail: Some("halted by admin ops".to_owned()),
            ts: i,
        }
    }

    #[test]
    fn only_http_and_https_webhooks_are_accepted() {
        let counters = Arc::new(AlertCounters::default());
        let ok = |u: &str| Alerts::new(u, 4, RetryPolicy::default(), counters.clone());
        assert!(ok("http://127.0.0.1:9999/alerts").unwrap().enabled());
        assert!(ok("https://alerts.example/hook").unwrap().enabled());
        assert!(ok("ftp://x/").is_err());
        assert!(ok("not a url").is_err());
        assert!(!Alerts::disabled(counters).enabled());
    }

    #[test]
    fn bodies_carry_the_console_link_in_both_formats() {
        let d = Delivery {
            alert: Alert {
                kind: "elevation.requested",
                detail: Some("elv_1: approval required for <x> & y".to_owned()),
                ..alert(3)
            },
            url: Some("http://gw/console/approvals#elv_1".to_owned()),
        };
        let json: serde_json::Value =
            serde_json::from_slice(&render_body(&d, portcullis_config::AlertFormat::Json).unwrap())
                .unwrap();
        assert_eq!(json["url"], "http://gw/console/approvals#elv_1");
        assert_eq!(json["kind"], "elevation.requested");
        assert_eq!(json["task_id"], "task_3");
        let slack: serde_json::Value = serde_json::from_slice(
            &render_body(&d, portcullis_config::AlertFormat::Slack).unwrap(),
        )
        .unwrap();
        let text = slack["text"].as_str().unwrap();
        assert_eq!(slack.as_object().unwrap().len(), 1);
        assert!(text.contains("<http://gw/console/approvals#elv_1|Open in the console>"));
        assert!(text.contains("&lt;x&gt; &amp; y"), "{text}");
        let plain = Delivery { url: None, ..d };
        let json = serde_json::to_value(&plain).unwrap();
        assert!(json.get("url").is_none());
    }

    #[test]
    fn backoff_doubles() {
        let p = RetryPolicy::default();
        let waits: Vec<_> = (1..5).map(|n| p.wait_after(n).as_millis()).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000]);
    }

    #[test]
    fn the_body_has_the_contract_fields() {
        let v = serde_json::to_value(alert(7)).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["agent_id", "detail", "kind", "reason", "task_id", "ts"]
        );
        assert_eq!(v["reason"], serde_json::Value::Null);
    }

    /// A full queue drops and counts, without waiting. Sent outside a
    /// runtime, so nothing drains the queue.
    #[test]
    fn a_flood_beyond_the_queue_is_dropped_and_counted() {
        let counters = Arc::new(AlertCounters::default());
        let alerts = Alerts::new(
            "http://127.0.0.1:9/alerts",
            3,
            RetryPolicy::default(),
            counters.clone(),
        )
        .unwrap();
        let started = std::time::Instant::now();
        for i in 0..10 {
            alerts.send(alert(i));
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 7);
    }

    /// The same inside a runtime whose receiver never answers: the worker
    /// holds one alert, the queue the next ones, the rest are dropped.
    #[tokio::test]
    async fn a_flood_with_a_stuck_receiver_is_dropped_and_counted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and never answers.
        let keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let counters = Arc::new(AlertCounters::default());
        let policy = RetryPolicy {
            attempts: 1,
            timeout: Duration::from_secs(30),
            backoff: Duration::ZERO,
        };
        let alerts = Alerts::new(
            &format!("http://{addr}/alerts"),
            4,
            policy,
            counters.clone(),
        )
        .unwrap();
        alerts.send(alert(0));
        // Let the worker take the first alert off the queue.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in 1..=20 {
            alerts.send(alert(i));
        }
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 16);
        assert_eq!(counters.delivered.load(Ordering::Relaxed), 0);
        keep.abort();
    }

    /// Regression: the receiver's answer was read whole, so a receiver (or
    /// anything posing as one) that streams an endless 200 answer held the
    /// alert worker until its timeout and grew its memory meanwhile. Now
    /// at most MAX_ANSWER_BYTES are read: the endless answer counts as a
    /// delivered alert long before the timeout.
    #[tokio::test]
    async fn an_endless_answer_is_read_only_up_to_its_cap() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = sent.clone();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
            // Until the client hangs up (bounded: 1 GiB).
            for _ in 0..65_536 {
                if s.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                counted.fetch_add(0x4000, Ordering::Relaxed);
            }
        });
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config((*portcullis_tls::trusting_nothing().unwrap()).clone())
            .https_or_http()
            .enable_http1()
            .build();
        let client: Client<HttpsConnector<HttpConnector>, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(connector);
        let uri: Uri = format!("http://{addr}/alerts").parse().unwrap();
        let result = attempt(
            &client,
            &uri,
            Bytes::from_static(b"{}"),
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(result, Ok(()));
        assert!(sent.load(Ordering::Relaxed) < 1 << 30);
    }
}
