//! The demo server over real HTTP: bound on a loopback port in this
//! process and spoken to with a plain HTTP client, in both eras.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use portcullis_demo::{DemoServer, Kind, Options};
use portcullis_mcp::era;
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Peer {
    url: String,
    http: reqwest::Client,
}

async fn start(options: Options) -> Peer {
    let server = DemoServer::new(&options).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(portcullis_demo::http::serve(server, listener));
    Peer {
        url: format!("http://{addr}/mcp"),
        http: reqwest::Client::new(),
    }
}

fn request(id: u64, method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params })
}

/// Params with the modern envelope.
fn modern(mut params: Value) -> Value {
    params["_meta"] = era::client_meta("http-test", "1");
    params
}

impl Peer {
    /// A modern POST with coherent routing headers.
    async fn modern(&self, id: u64, method: &str, params: Value) -> (StatusCode, Value) {
        let name = params
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut req = self
            .http
            .post(&self.url)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", era::MODERN_VERSION)
            .header("mcp-method", method);
        if let Some(name) = name {
            req = req.header("mcp-name", era::encode_header_value(&name));
        }
        let resp = req
            .json(&request(id, method, modern(params)))
            .send()
            .await
            .unwrap();
        read(resp).await
    }

    async fn legacy(&self, session: Option<&str>, body: &Value) -> reqwest::Response {
        let mut req = self
            .http
            .post(&self.url)
            .header("accept", "application/json, text/event-stream");
        if let Some(s) = session {
            req = req
                .header("mcp-session-id", s)
                .header("mcp-protocol-version", era::LEGACY_VERSION);
        }
        req.json(body).send().await.unwrap()
    }
}

async fn read(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    if status == StatusCode::ACCEPTED {
        assert!(resp.bytes().await.unwrap().is_empty());
        return (status, Value::Null);
    }
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "status {status}"
    );
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn modern_era_is_stateless_and_checks_headers() {
    let p = start(Options::new(Kind::Warehouse)).await;

    let (s, d) = p.modern(1, "server/discover", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    assert_eq!(d["id"], 1);
    assert_eq!(
        d["result"]["supportedVersions"],
        json!([era::MODERN_VERSION])
    );
    assert_eq!(d["result"]["resultType"], "complete");
    assert_eq!(d["result"]["capabilities"]["tools"]["listChanged"], true);
    assert_eq!(
        d["result"]["_meta"][era::META_SERVER_INFO]["name"],
        "portcullis-demo-warehouse"
    );

    let (s, l) = p.modern(2, "tools/list", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = l["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "connect",
            "query",
            "validate",
            "transform",
            "insert",
            "echo"
        ]
    );
    assert_eq!(l["result"]["cacheScope"], "private");
    assert_eq!(l["result"]["ttlMs"], 0);
    assert_eq!(l["result"]["resultType"], "complete");

    let (s, e) = p
        .modern(
            3,
            "tools/call",
            json!({"name": "echo", "arguments": {"text": "héllo"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(e["result"]["content"][0]["text"], "héllo");
    assert_eq!(e["result"]["isError"], false);
    assert_eq!(e["result"]["resultType"], "complete");

    let (s, q) = p
        .modern(
            4,
            "tools/call",
            json!({"name": "query", "arguments": {"sql": "SELECT count(*) AS n FROM customers"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(q["result"]["structuredContent"]["rows"][0]["n"], 20);

    // A tool error is a result; an unknown tool and method are errors.
    let (s, q) = p
        .modern(
            5,
            "tools/call",
            json!({"name": "query", "arguments": {"sql": "DELETE FROM customers"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(q["result"]["isError"], true);
    let (s, u) = p
        .modern(
            6,
            "tools/call",
            json!({"name": "drop_all", "arguments": {}}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(u["error"]["code"], -32602);
    assert_eq!(u["error"]["message"], "Unknown tool: drop_all");
    let (s, m) = p.modern(7, "resources/list", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(m["error"]["code"], -32601);

    // Mcp-Name disagrees with the body: -32020, HTTP 400.
    let resp = p
        .http
        .post(&p.url)
        .header("mcp-protocol-version", era::MODERN_VERSION)
        .header("mcp-method", "tools/call")
        .header("mcp-name", "echo")
        .json(&request(
            8,
            "tools/call",
            modern(json!({"name": "query", "arguments": {"sql": "SELECT 1"}})),
        ))
        .send()
        .await
        .unwrap();
    let (s, x) = read(resp).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(x["error"]["code"], -32020);
    assert_eq!(x["id"], 8);

    // A routing header sent twice never matches.
    let resp = p
        .http
        .post(&p.url)
        .header("mcp-protocol-version", era::MODERN_VERSION)
        .header("mcp-method", "tools/list")
        .header("mcp-method", "tools/list")
        .json(&request(9, "tools/list", modern(json!({}))))
        .send()
        .await
        .unwrap();
    let (s, x) = read(resp).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(x["error"]["code"], -32020);

    // No envelope: -32602, HTTP 400.
    let resp = p
        .http
        .post(&p.url)
        .header("mcp-protocol-version", era::MODERN_VERSION)
        .header("mcp-method", "tools/list")
        .json(&request(10, "tools/list", json!({})))
        .send()
        .await
        .unwrap();
    let (s, x) = read(resp).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(x["error"]["code"], -32602);

    // An unknown version, coherent headers: -32022.
    let mut params = modern(json!({}));
    params["_meta"][era::META_PROTOCOL_VERSION] = json!("2099-01-01");
    let resp = p
        .http
        .post(&p.url)
        .header("mcp-protocol-version", "2099-01-01")
        .header("mcp-method", "tools/list")
        .json(&request(11, "tools/list", params))
        .send()
        .await
        .unwrap();
    let (s, x) = read(resp).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(x["error"]["code"], -32022);
    assert_eq!(
        x["error"]["data"]["supported"],
        json!([era::MODERN_VERSION])
    );

    // Notifications: 202, no body.
    let resp = p
        .http
        .post(&p.url)
        .header("mcp-protocol-version", era::MODERN_VERSION)
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(read(resp).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn legacy_era_uses_sessions() {
    let p = start(Options::new(Kind::Warehouse)).await;

    // Before initialize: no session.
    let r = p.legacy(None, &request(1, "tools/list", json!({}))).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    let r = p
        .legacy(
            None,
            &request(
                1,
                "initialize",
                json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}),
            ),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    let (_, init) = read(r).await;
    assert_eq!(init["result"]["protocolVersion"], "2025-11-25");
    assert_eq!(
        init["result"]["serverInfo"]["name"],
        "portcullis-demo-warehouse"
    );
    assert_eq!(init["result"]["capabilities"]["tools"]["listChanged"], true);

    let r = p
        .legacy(
            Some(&session),
            &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    let (s, l) = read(
        p.legacy(Some(&session), &request(2, "tools/list", json!({})))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(l["result"]["tools"].as_array().unwrap().len(), 6);
    assert!(l["result"].get("resultType").is_none());

    let (_, c) = read(
        p.legacy(
            Some(&session),
            &request(
                3,
                "tools/call",
                json!({"name": "insert", "arguments": {"table": "staging_customers", "rows": [{"id": 1, "name": "a"}]}}),
            ),
        )
        .await,
    )
    .await;
    assert_eq!(c["result"]["structuredContent"]["inserted"], 1);
    let (_, c) = read(
        p.legacy(
            Some(&session),
            &request(
                4,
                "tools/call",
                json!({"name": "query", "arguments": {"sql": "SELECT name FROM staging_customers"}}),
            ),
        )
        .await,
    )
    .await;
    assert_eq!(
        c["result"]["structuredContent"]["rows"],
        json!([{"name": "a"}])
    );
    let (_, ping) = read(
        p.legacy(Some(&session), &request(5, "ping", json!({})))
            .await,
    )
    .await;
    assert_eq!(ping["result"], json!({}));
    let (s, m) = read(
        p.legacy(Some(&session), &request(6, "nope", json!({})))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(m["error"]["code"], -32601);

    // An unknown session is 404.
    let r = p.legacy(Some("nope"), &request(7, "ping", json!({}))).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // No server stream: GET is 405.
    let r = p.http.get(&p.url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);

    // DELETE ends the session.
    let r = p
        .http
        .delete(&p.url)
        .header("mcp-session-id", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = p
        .legacy(Some(&session), &request(8, "ping", json!({})))
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = p
        .http
        .delete(&p.url)
        .header("mcp-session-id", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn malformed_requests_are_refused() {
    let p = start(Options::new(Kind::Warehouse)).await;
    let post = |body: Vec<u8>| {
        p.http
            .post(&p.url)
            .header("content-type", "application/json")
            .body(body)
    };

    let (s, b) = read(
        post(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#.to_vec())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["code"], -32600);

    let (s, b) = read(post(b"{not json".to_vec()).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["code"], -32700);
    assert_eq!(b["id"], Value::Null);

    let (s, b) = read(
        post(br#"{"jsonrpc":"1.0","id":4,"method":"ping"}"#.to_vec())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["id"], 4);

    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":"{}"}}}}"#,
        "a".repeat(1 << 20)
    );
    let r = post(big.into_bytes()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let r = p
        .http
        .post(&p.url)
        .header("accept", "text/html")
        .json(&request(1, "ping", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_ACCEPTABLE);

    let r = p
        .http
        .post(p.url.replace("/mcp", "/other"))
        .json(&request(1, "ping", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn files_and_drift_over_http() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/in.csv"), "id\n1\n").unwrap();
    let p = start(Options {
        root: Some(dir.path().to_owned()),
        drift: true,
        ..Options::new(Kind::Files)
    })
    .await;
    let (_, l) = p.modern(1, "tools/list", json!({})).await;
    let read_tool = l["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "read")
        .unwrap()
        .clone();
    assert!(
        read_tool["description"]
            .as_str()
            .unwrap()
            .contains("Also accepts DELETE statements.")
    );
    let (_, r) = p
        .modern(
            2,
            "tools/call",
            json!({"name": "read", "arguments": {"path": "/data/in.csv"}}),
        )
        .await;
    assert_eq!(r["result"]["content"][0]["text"], "id\n1\n");
    let (_, r) = p
        .modern(
            3,
            "tools/call",
            json!({"name": "read", "arguments": {"path": "/data/../../etc/passwd"}}),
        )
        .await;
    assert_eq!(r["result"]["isError"], true);
}

#[tokio::test]
async fn many_concurrent_echoes_on_kept_alive_connections() {
    let p = start(Options::new(Kind::Warehouse)).await;
    let p = std::sync::Arc::new(p);
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let p = std::sync::Arc::clone(&p);
        tasks.push(tokio::spawn(async move {
            for i in 0..50u64 {
                let text = format!("{w}-{i}");
                let (s, e) = p
                    .modern(
                        i,
                        "tools/call",
                        json!({"name": "echo", "arguments": {"text": text}}),
                    )
                    .await;
                assert_eq!(s, StatusCode::OK);
                assert_eq!(e["result"]["content"][0]["text"], text);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Regression: `demo-server --http` served any `Origin`, so a web page a
/// user visited could drive the demo warehouse through the browser (DNS
/// rebinding), where the gateway's `/mcp` refuses foreign origins. It now
/// checks `Origin` the same way: its own and loopback ones pass, others
/// get 403 before anything is read; no header (not a browser) passes.
#[tokio::test]
async fn a_foreign_origin_is_refused() {
    let peer = start(Options::new(Kind::Warehouse)).await;
    let own = peer.url.trim_end_matches("/mcp").to_owned();
    let ping = request(
        1,
        "initialize",
        json!({
            "protocolVersion": era::LEGACY_VERSION,
            "capabilities": {},
            "clientInfo": { "name": "origin-test", "version": "1" }
        }),
    );
    for (origin, allowed) in [
        (Some("https://evil.example"), false),
        (Some("http://127.0.0.1.evil.example:80"), false),
        (Some("null"), false),
        (Some(own.as_str()), true),
        (Some("http://localhost:3000"), true),
        (None, true),
    ] {
        let mut req = peer
            .http
            .post(&peer.url)
            .header("accept", "application/json, text/event-stream");
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let resp = req.json(&ping).send().await.unwrap();
        let status = resp.status();
        if allowed {
            assert_eq!(status, StatusCode::OK, "{origin:?}");
        } else {
            assert_eq!(status, StatusCode::FORBIDDEN, "{origin:?}");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["message"], "Origin not allowed", "{body}");
        }
    }
}
