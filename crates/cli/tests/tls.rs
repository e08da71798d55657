//! TLS with the real `portcullis serve` binary and real handshakes: a
//! throwaway CA (`portcullis_tls::testpki`), the demo warehouse behind a
//! TLS front, an https alert receiver, the TLS listener.
//!
//! The TLS front terminates TLS with the certificate under test and
//! forwards the bytes of each completed handshake to the plain demo
//! warehouse, counting them: a front that counted nothing means the
//! upstream saw nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a panic is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_tls::ClientTls;
use portcullis_tls::rustls::ServerConfig;
use portcullis_tls::rustls::pki_types::ServerName;
use portcullis_tls::rustls::server::WebPkiClientVerifier;
use portcullis_tls::testpki::{TestCa, Validity};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

mod common;

use common::cluster::{PrivatePostgres, Upstream, psql};
use common::{
    ADMIN, ADMIN_SHA256, BIN, BOOTSTRAP, BOOTSTRAP_SHA256, Server, free_port, portcullis,
};

/// The certificates of one test, as files in its folder.
struct Pki {
    ca: TestCa,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    server: (PathBuf, PathBuf),
    expired: (PathBuf, PathBuf),
    wrong_name: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn pki(dir: &Path) -> Pki {
    let ca = TestCa::new("portcullis test ca");
    let other = TestCa::new("some other ca");
    Pki {
        ca_file: ca.write(dir, "ca"),
        other_ca_file: other.write(dir, "other-ca"),
        server: ca
            .issue(&["localhost", "127.0.0.1"], Validity::Current)
            .write(dir, "server"),
        expired: ca
            .issue(&["localhost", "127.0.0.1"], Validity::Expired)
            .write(dir, "expired"),
        wrong_name: ca
            .issue(&["elsewhere.example"], Validity::Current)
            .write(dir, "wrong-name"),
        client: ca
            .issue(&["portcullis-gateway"], Validity::Current)
            .write(dir, "client"),
        ca,
    }
}

/// A server configuration for `cert`/`key` — checked the way `serve`
/// checks them, except validity: the expired certificate must be served.
fn acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsAcceptor {
    let chain = portcullis_tls::load_certs(cert).unwrap();
    let der = portcullis_tls::load_key(key).unwrap();
    let builder = ServerConfig::builder_with_provider(portcullis_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let config = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(
                Arc::new(portcullis_tls::load_roots(ca).unwrap()),
                portcullis_tls::provider(),
            )
            .build()
            .unwrap(),
        ),
    }
    .with_single_cert(chain, der)
    .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// A TLS front on 127.0.0.1 for the plain server on `target`: (port,
/// handshakes completed and forwarded).
async fn tls_front(acceptor: TlsAcceptor, target: u16) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let forwarded = Arc::new(AtomicUsize::new(0));
    let count = forwarded.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    count.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut plain) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                }
            });
        }
    });
    (port, forwarded)
}

/// The gateway's configuration: one upstream (`upstream` is the body of its
/// table after `name`), one agent with `warehouse.echo`.
fn write_config(dir: &Path, port: u16, server_tls: &str, upstream: &str, audit: &str) {
    write_config_on(
        dir,
        port,
        server_tls,
        upstream,
        audit,
        "sqlite://portcullis.db",
    );
}

fn write_config_on(
    dir: &Path,
    port: u16,
    server_tls: &str,
    upstream: &str,
    audit: &str,
    store: &str,
) {
    let key = dir.join("keys/k.ed25519");
    if !key.exists() {
        let out = portcullis(dir, &["keygen", "--out", key.to_str().unwrap()]);
        assert!(out.status.success(), "keygen: {out:?}");
    }
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
issuer = "http://127.0.0.1:{port}"
{server_tls}

[store]
url = "{store}"

[tokens]
signing_key = "keys/k.ed25519"

[audit]
{audit}

[[admins]]
name = "ops"
roles = ["admin", "approver", "auditor"]
token_sha256 = "{ADMIN_SHA256}"

[[upstreams]]
name = "warehouse"
{upstream}

[[tools]]
name = "warehouse.echo"
upstream = "warehouse"
risk = "low"
access = "read"

[[agent_types]]
name = "worker"
initial = "work"
states = [
  {{ name = "work", tools = ["warehouse.echo"], next = ["done"] }},
  {{ name = "done", final = true }},
]

[[agents]]
id = "bot"
type = "worker"
tools = ["warehouse.echo"]
bootstrap_sha256 = "{BOOTSTRAP_SHA256}"
"#
    );
    std::fs::write(dir.join("portcullis.toml"), config).unwrap();
}

fn https_upstream(front: u16, keys: &str) -> String {
    format!(
        "transport = \"http\"\nurl = \"https://localhost:{front}/mcp\"\ncredential = {{ kind = \"jwt\" }}\n{keys}"
    )
}

fn start_serve(dir: &Path) -> Server {
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    Server(
        Command::new(BIN)
            .args(["serve", "--config", "portcullis.toml"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
}

/// Waits for a plain-http gateway's `/readyz`.
async fn wait_ready(server: &mut Server, dir: &Path, base: &str, client: &reqwest::Client) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(40) {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("serve exited early ({status}):\n{}", log_of(dir));
        }
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not ready:\n{}", log_of(dir));
}

/// Starts a task of `bot` and calls `warehouse.echo` once: (status, body).
async fn one_call(client: &reqwest::Client, base: &str) -> (u16, Value) {
    let r = client
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(BOOTSTRAP)
        .json(&json!({ "agent_id": "bot", "goal": "tls test" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let task: Value = r.json().await.unwrap();
    let r = client
        .post(format!(
            "{base}/v1/tasks/{}/calls",
            task["task_id"].as_str().unwrap()
        ))
        .bearer_auth(task["access_token"].as_str().unwrap())
        .json(&json!({ "tool": "warehouse.echo", "arguments": { "text": "over tls" } }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_trusted_through_its_ca_file_serves_calls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let upstream = Upstream::start(dir.path()).await;
    let (front, forwarded) =
        tls_front(acceptor(&pki.server.0, &pki.server.1, None), upstream.port).await;
    let port = free_port();
    write_config(
        dir.path(),
        port,
        "",
        &https_upstream(front, "ca_file = \"ca.crt\""),
        "",
    );
    let out = portcullis(dir.path(), &["check", "--config", "portcullis.toml"]);
    assert!(out.status.success(), "check: {out:?}");
    let mut server = start_serve(dir.path());
    let base = format!("http://127.0.0.1:{port}");
    let client = client();
    wait_ready(&mut server, dir.path(), &base, &client).await;
    let (status, body) = one_call(&client, &base).await;
    assert_eq!(status, 200, "{body}\n{}", log_of(dir.path()));
    assert!(body.to_string().contains("over tls"), "{body}");
    assert!(forwarded.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_an_expired_certificate_or_a_wrong_host_name_is_upstream_unavailable_and_the_upstream_sees_nothing()
 {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let upstream = Upstream::start(dir.path()).await;
    let cases = [
        (
            "wrong ca",
            &pki.server,
            "ca_file = \"other-ca.crt\"",
            "UnknownIssuer",
        ),
        (
            "expired",
            &pki.expired,
            "ca_file = \"ca.crt\"",
            "certificate expired",
        ),
        (
            "wrong name",
            &pki.wrong_name,
            "ca_file = \"ca.crt\"",
            "certificate not valid for name",
        ),
    ];
    for (case, (cert, key), keys, cause) in cases {
        let (front, forwarded) = tls_front(acceptor(cert, key, None), upstream.port).await;
        let port = free_port();
        write_config(dir.path(), port, "", &https_upstream(front, keys), "");
        let mut server = start_serve(dir.path());
        let base = format!("http://127.0.0.1:{port}");
        let client = client();
        wait_ready(&mut server, dir.path(), &base, &client).await;
        let (status, body) = one_call(&client, &base).await;
        assert_eq!(
            body["error"], "upstream_unavailable",
            "{case}: {status} {body}"
        );
        assert_eq!(
            forwarded.load(Ordering::SeqCst),
            0,
            "{case}: the upstream saw a connection"
        );
        let log = log_of(dir.path());
        assert!(log.contains(cause), "{case}: no {cause} in the log:\n{log}");
        drop(server);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_with_the_client_certificate_and_is_refused_without() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let upstream = Upstream::start(dir.path()).await;
    let (front, forwarded) = tls_front(
        acceptor(&pki.server.0, &pki.server.1, Some(&pki.ca_file)),
        upstream.port,
    )
    .await;
    let client = client();
    for (with_cert, keys) in [
        (
            true,
            "ca_file = \"ca.crt\"\nclient_cert = \"client.crt\"\nclient_key = \"client.key\"",
        ),
        (false, "ca_file = \"ca.crt\""),
    ] {
        let before = forwarded.load(Ordering::SeqCst);
        let port = free_port();
        write_config(dir.path(), port, "", &https_upstream(front, keys), "");
        let mut server = start_serve(dir.path());
        let base = format!("http://127.0.0.1:{port}");
        wait_ready(&mut server, dir.path(), &base, &client).await;
        let (status, body) = one_call(&client, &base).await;
        if with_cert {
            assert_eq!(status, 200, "{body}\n{}", log_of(dir.path()));
            assert!(forwarded.load(Ordering::SeqCst) > before);
        } else {
            assert_eq!(body["error"], "upstream_unavailable", "{status} {body}");
            assert_eq!(forwarded.load(Ordering::SeqCst), before);
        }
        let _ = &pki.client;
        drop(server);
    }
}

/// An https server on 127.0.0.1 that records every request body.
async fn https_receiver(acceptor: TlsAcceptor) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let bodies = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, bodies) = (acceptor.clone(), bodies.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let bodies = bodies.clone();
                        async move {
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            bodies
                                .lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&body).into_owned());
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::new(),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_webhook_receiver_gets_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let upstream = Upstream::start(dir.path()).await;
    let (hook, seen) = https_receiver(acceptor(&pki.server.0, &pki.server.1, None)).await;
    let port = free_port();
    write_config(
        dir.path(),
        port,
        "",
        &format!(
            "transport = \"http\"\nurl = \"http://127.0.0.1:{}/mcp\"\ncredential = {{ kind = \"jwt\" }}",
            upstream.port
        ),
        &format!("alert_webhook = \"https://localhost:{hook}/alerts\"\nalert_ca_file = \"ca.crt\""),
    );
    let mut server = start_serve(dir.path());
    let base = format!("http://127.0.0.1:{port}");
    let client = client();
    wait_ready(&mut server, dir.path(), &base, &client).await;
    let r = client
        .post(format!("{base}/v1/tasks"))
        .bearer_auth(BOOTSTRAP)
        .json(&json!({ "agent_id": "bot", "goal": "tls test" }))
        .send()
        .await
        .unwrap();
    let task: Value = r.json().await.unwrap();
    let task_id = task["task_id"].as_str().unwrap();
    let r = client
        .post(format!("{base}/v1/tasks/{task_id}/halt"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "halt: {}", r.status());
    let started = Instant::now();
    while seen.lock().unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no alert arrived:\n{}",
            log_of(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alert: Value = serde_json::from_str(&seen.lock().unwrap()[0]).unwrap();
    assert_eq!(alert["kind"], "task.halted");
    assert_eq!(alert["task_id"], task_id);
}

// ---------------------------------------------------------------------------
// The TLS listener

/// A TLS connection to the gateway trusting `ca`, offering `alpn`: the
/// stream and the certificate the server showed.
async fn connect(
    port: u16,
    ca: &Path,
    alpn: &[u8],
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    let config = portcullis_tls::client_config(
        &ClientTls {
            ca_file: Some(ca.to_path_buf()),
            ..ClientTls::default()
        },
        &[alpn],
    )
    .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let shown = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (tls, shown)
}

enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    async fn open(port: u16, ca: &Path, h2: bool) -> (Self, Vec<u8>) {
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let (tls, shown) = connect(port, ca, alpn).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        let io = TokioIo::new(tls);
        let conn = if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Self::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Self::H1(send)
        };
        (conn, shown)
    }

    async fn get(&mut self, path: &str) -> (u16, hyper::Version) {
        let req = hyper::Request::get(format!("https://localhost{path}"))
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = self.send(req).await;
        (r.status().as_u16(), r.version())
    }

    async fn send(
        &mut self,
        req: hyper::Request<Full<Bytes>>,
    ) -> hyper::Response<hyper::body::Incoming> {
        match self {
            Self::H1(s) => s.send_request(req).await.unwrap(),
            Self::H2(s) => s.send_request(req).await.unwrap(),
        }
    }

    /// Starts a task of `bot`: its access token.
    async fn start_task(&mut self) -> String {
        let req = hyper::Request::post("https://localhost/v1/tasks")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {BOOTSTRAP}"))
            .body(Full::new(Bytes::from(
                json!({ "agent_id": "bot", "goal": "tls test" }).to_string(),
            )))
            .unwrap();
        let r = self.send(req).await;
        assert_eq!(r.status(), 201);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let task: Value = serde_json::from_slice(&body).unwrap();
        task["access_token"].as_str().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_listener_speaks_http1_and_h2_and_new_connections_see_a_reloaded_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let upstream = Upstream::start(dir.path()).await;
    let port = free_port();
    write_config(
        dir.path(),
        port,
        "tls = { cert = \"server.crt\", key = \"server.key\" }",
        &format!(
            "transport = \"http\"\nurl = \"http://127.0.0.1:{}/mcp\"\ncredential = {{ kind = \"jwt\" }}",
            upstream.port
        ),
        "",
    );
    let out = portcullis(dir.path(), &["check", "--config", "portcullis.toml"]);
    assert!(out.status.success(), "check: {out:?}");
    let mut server = start_serve(dir.path());
    let started = Instant::now();
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("serve exited early ({status}):\n{}", log_of(dir.path()));
        }
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(40), "not listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut h1, first) = Conn::open(port, &pki.ca_file, false).await;
    assert_eq!(h1.get("/healthz").await, (200, hyper::Version::HTTP_11));
    let (mut h2, _) = Conn::open(port, &pki.ca_file, true).await;
    assert_eq!(h2.get("/healthz").await, (200, hyper::Version::HTTP_2));
    // A plain-http client gets no answer from a TLS listener.
    let plain = client()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);

    // New files: new connections see the new certificate, the open ones
    // keep working.
    pki.ca
        .issue(&["localhost", "127.0.0.1"], Validity::Current)
        .write(dir.path(), "server");
    let started = Instant::now();
    let renewed = loop {
        let (_, shown) = connect(port, &pki.ca_file, b"http/1.1").await;
        if shown != first {
            break shown;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the new certificate was never served:\n{}",
            log_of(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(renewed, first);
    assert_eq!(h1.get("/healthz").await, (200, hyper::Version::HTTP_11));
    assert_eq!(h2.get("/healthz").await, (200, hyper::Version::HTTP_2));
    assert!(log_of(dir.path()).contains("listener certificate reloaded"));

    // A broken pair (a key of another certificate) keeps the last good one.
    let other = pki.ca.issue(&["localhost"], Validity::Current);
    std::fs::write(dir.path().join("server.key"), &other.key).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &server.0.id().to_string()])
        .status();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, shown) = connect(port, &pki.ca_file, b"http/1.1").await;
    assert_eq!(shown, renewed);
    assert!(
        log_of(dir.path()).contains("not reloaded"),
        "{}",
        log_of(dir.path())
    );
    assert!(server.0.try_wait().unwrap().is_none(), "SIGHUP ended serve");
}

// ---------------------------------------------------------------------------
// PostgreSQL

fn plain_upstream(port: u16) -> String {
    format!(
        "transport = \"http\"\nurl = \"http://127.0.0.1:{port}/mcp\"\ncredential = {{ kind = \"jwt\" }}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_connects_over_tls_with_verify_full_and_verify_ca_checks_the_chain_only() {
    let Some(pg) = PrivatePostgres::start(
        "the_ledger_connects_over_tls_with_verify_full_and_verify_ca_checks_the_chain_only",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = pki.ca.issue(&["localhost", "127.0.0.1"], Validity::Current);
    pg.enable_ssl(&server.cert, &server.key);
    let upstream = Upstream::start(dir.path()).await;
    let port = free_port();
    let store = format!("{}?sslmode=verify-full&sslrootcert=ca.crt", pg.url);
    write_config_on(
        dir.path(),
        port,
        "",
        &plain_upstream(upstream.port),
        "",
        &store,
    );
    let out = portcullis(dir.path(), &["check", "--config", "portcullis.toml"]);
    assert!(out.status.success(), "check: {out:?}");
    let mut serve = start_serve(dir.path());
    let base = format!("http://127.0.0.1:{port}");
    let client = client();
    wait_ready(&mut serve, dir.path(), &base, &client).await;
    let (status, body) = one_call(&client, &base).await;
    assert_eq!(status, 200, "{body}");
    // Every session of the gateway is encrypted.
    let sessions = psql(
        &pg.url,
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'portcullis%'",
    );
    let (all, encrypted) = sessions.split_once('|').unwrap();
    assert!(all.parse::<u32>().unwrap() >= 1, "{sessions}");
    assert_eq!(all, encrypted, "sessions without TLS: {sessions}");

    // The same server named by a certificate for another host: refused.
    drop(serve);
    let wrong = pki.ca.issue(&["elsewhere.example"], Validity::Current);
    pg.enable_ssl(&wrong.cert, &wrong.key);
    let out = portcullis_within(
        dir.path(),
        &["serve", "--config", "portcullis.toml"],
        Duration::from_secs(40),
    );
    assert!(
        !out.0,
        "serve started against a certificate for another host"
    );
    assert!(out.1.contains("not valid for name"), "{}", out.1);

    // verify-ca checks the chain only: the same server is accepted.
    let port = free_port();
    let store = format!("{}?sslmode=verify-ca&sslrootcert=ca.crt", pg.url);
    write_config_on(
        dir.path(),
        port,
        "",
        &plain_upstream(upstream.port),
        "",
        &store,
    );
    let mut serve = start_serve(dir.path());
    wait_ready(
        &mut serve,
        dir.path(),
        &format!("http://127.0.0.1:{port}"),
        &client,
    )
    .await;
    // And a root of another CA is refused even by verify-ca.
    drop(serve);
    let store = format!("{}?sslmode=verify-ca&sslrootcert=other-ca.crt", pg.url);
    write_config_on(
        dir.path(),
        free_port(),
        "",
        &plain_upstream(upstream.port),
        "",
        &store,
    );
    let out = portcullis_within(
        dir.path(),
        &["serve", "--config", "portcullis.toml"],
        Duration::from_secs(40),
    );
    assert!(!out.0, "serve started against a server of another CA");
    assert!(out.1.contains("UnknownIssuer"), "{}", out.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_is_refused_by_a_server_without_tls() {
    let Some(pg) = PrivatePostgres::start("sslmode_require_is_refused_by_a_server_without_tls")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(dir.path()).await;
    let store = format!("{}?sslmode=require", pg.url);
    write_config_on(
        dir.path(),
        free_port(),
        "",
        &plain_upstream(upstream.port),
        "",
        &store,
    );
    let out = portcullis_within(
        dir.path(),
        &["serve", "--config", "portcullis.toml"],
        Duration::from_secs(40),
    );
    assert!(!out.0, "serve started without TLS to PostgreSQL");
    assert!(
        out.1.to_lowercase().contains("tls") || out.1.contains("ssl"),
        "{}",
        out.1
    );
    // `prefer` (the default) falls back to plain text on that server.
    let store = format!("{}?sslmode=prefer", pg.url);
    let port = free_port();
    write_config_on(
        dir.path(),
        port,
        "",
        &plain_upstream(upstream.port),
        "",
        &store,
    );
    let mut serve = start_serve(dir.path());
    wait_ready(
        &mut serve,
        dir.path(),
        &format!("http://127.0.0.1:{port}"),
        &client(),
    )
    .await;
}

/// Runs the CLI until it exits or `limit` passes: (succeeded, output).
fn portcullis_within(dir: &Path, args: &[&str], limit: Duration) -> (bool, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status.success(), text);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            return (
                true,
                format!(
                    "still running after {limit:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `mcp` Python SDK (2.x), or a SKIP notice.
fn python_sdk() -> bool {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import importlib.metadata as m, mcp.client.client, mcp.client.streamable_http; \
             assert m.version('mcp').split('.')[0] == '2'",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: the mcp 2.x Python SDK is not importable by python3 (pip install mcp)");
    }
    ok
}

/// A gateway with a TLS listener whose issuer is its https origin, ready:
/// (server, port).
async fn tls_gateway(dir: &Path, upstream: &Upstream) -> (Server, u16) {
    let port = free_port();
    write_config(
        dir,
        port,
        "tls = { cert = \"server.crt\", key = \"server.key\" }",
        &plain_upstream(upstream.port),
        "",
    );
    // The token audience is the issuer: the https origin the client uses.
    let config = std::fs::read_to_string(dir.join("portcullis.toml"))
        .unwrap()
        .replace(
            &format!("issuer = \"http://127.0.0.1:{port}\""),
            &format!("issuer = \"https://localhost:{port}\""),
        );
    std::fs::write(dir.join("portcullis.toml"), config).unwrap();
    let mut server = start_serve(dir);
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("serve exited early ({status}):\n{}", log_of(dir));
        }
        assert!(started.elapsed() < Duration::from_secs(40), "not listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (server, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portcullis_connect_relays_to_a_tls_listener_trusting_ssl_cert_file() {
    use std::io::{BufRead as _, Write as _};
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let upstream = Upstream::start(dir.path()).await;
    let (_server, port) = tls_gateway(dir.path(), &upstream).await;
    let (mut conn, _) = Conn::open(port, &pki.ca_file, false).await;
    let token = conn.start_task().await;
    let mut bridge = Command::new(BIN)
        .args(["connect", "--url", &format!("https://localhost:{port}/mcp")])
        .env("PORTCULLIS_TOKEN", &token)
        .env("SSL_CERT_FILE", &pki.ca_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = bridge.stdin.take().unwrap();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "desk", "version": "1"}}});
    writeln!(stdin, "{init}").unwrap();
    let stdout = bridge.stdout.take().unwrap();
    let answer = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .expect("no answer through the bridge")
        .unwrap();
    drop(stdin);
    let _ = bridge.kill();
    let _ = bridge.wait();
    let answer: Value = serde_json::from_str(&line).unwrap();
    assert!(answer["result"]["serverInfo"].is_object(), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_mcp_sdk_calls_through_the_tls_listener_trusting_the_ca() {
    if !python_sdk() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let upstream = Upstream::start(dir.path()).await;
    let (_server, port) = tls_gateway(dir.path(), &upstream).await;
    let (mut conn, _) = Conn::open(port, &pki.ca_file, false).await;
    let token = conn.start_task().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp_client.py");
    let steps = json!([
        { "op": "list" },
        { "op": "call", "name": "warehouse.echo", "arguments": { "text": "through tls" } }
    ]);
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("https://localhost:{port}/mcp"))
        .arg("2026-07-28")
        .arg(steps.to_string())
        .env("PORTCULLIS_MCP_TOKEN", &token)
        .env("SSL_CERT_FILE", &pki.ca_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log_of(dir.path())
    );
    let answers: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answers[0]["tools"], json!(["warehouse.echo"]), "{answers}");
    assert!(answers[1].to_string().contains("through tls"), "{answers}");

    // Without the CA the same client refuses the listener.
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("https://localhost:{port}/mcp"))
        .arg("2026-07-28")
        .arg(json!([{ "op": "list" }]).to_string())
        .env("PORTCULLIS_MCP_TOKEN", &token)
        .env("SSL_CERT_FILE", &pki.other_ca_file)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the client trusted an unknown CA");
}
