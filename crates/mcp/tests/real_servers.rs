//! The upstream client against real MCP servers from the registries:
//! `mcp-server-time` (PyPI, speaks 2026-07-28 over stdio),
//! `@modelcontextprotocol/server-filesystem` (npm, 2025-11-25 over stdio),
//! and `@modelcontextprotocol/server-everything` in `streamableHttp` mode
//! (2025-11-25 over HTTP, answers in SSE). Each test skips with a notice
//! when its server is not installed (`.ci/run` installs them all).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::time::Duration;

use portcullis_mcp::client::{CallExtras, Session, Transport};
use portcullis_mcp::era::Era;
use serde_json::json;

fn npm_dir() -> PathBuf {
    std::env::var_os("PORTCULLIS_NPM_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp/portcullis-npm"), PathBuf::from)
}

fn npm_script(package: &str) -> Option<PathBuf> {
    let p = npm_dir()
        .join("node_modules/@modelcontextprotocol")
        .join(package)
        .join("dist/index.js");
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIP: {} not installed (run .ci/run, or npm install it under {})",
            package,
            npm_dir().display()
        );
        None
    }
}

fn on_path(program: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIP: {program} not on PATH (pip install {program})");
    }
    found
}

fn stdio(command: Vec<String>) -> Transport {
    Transport::Stdio {
        command,
        cwd: None,
        env: Vec::new(),
    }
}

#[tokio::test]
async fn time_server_speaks_the_modern_era_over_stdio() {
    if !on_path("mcp-server-time") {
        return;
    }
    let s = Session::connect("time", &stdio(vec!["mcp-server-time".into()]))
        .await
        .unwrap();
    assert_eq!(s.era(), Era::Modern);
    let tools = s.list_tools().await.unwrap();
    assert!(
        tools.iter().any(|t| t["name"] == "get_current_time"),
        "{tools:?}"
    );
    let r = s
        .call_tool(
            "get_current_time",
            &json!({"timezone": "UTC"}),
            &CallExtras::default(),
        )
        .await
        .unwrap();
    assert_eq!(r["isError"], json!(false), "{r}");
    assert_eq!(r["structuredContent"]["timezone"], "UTC", "{r}");
    s.close().await;
    assert!(s.closed().is_some());
}

#[tokio::test]
async fn filesystem_server_falls_back_to_the_handshake() {
    let Some(script) = npm_script("server-filesystem") else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("hello.txt"), "hello from disk").unwrap();
    let root = root.path().canonicalize().unwrap();
    let s = Session::connect(
        "fs",
        &stdio(vec![
            "node".into(),
            script.display().to_string(),
            root.display().to_string(),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(s.era(), Era::Legacy);
    let tools = s.list_tools().await.unwrap();
    assert!(
        tools.iter().any(|t| t["name"] == "read_text_file"),
        "{tools:?}"
    );
    let path = root.join("hello.txt").display().to_string();
    let r = s
        .call_tool(
            "read_text_file",
            &json!({"path": path}),
            &CallExtras::default(),
        )
        .await
        .unwrap();
    assert!(r.to_string().contains("hello from disk"), "{r}");
    s.close().await;
}

#[tokio::test]
async fn a_process_that_dies_closes_the_session() {
    if !on_path("mcp-server-time") {
        return;
    }
    let s = Session::connect("time", &stdio(vec!["mcp-server-time".into()]))
        .await
        .unwrap();
    let generation = s.tools_generation();
    s.close().await;
    let event = tokio::time::timeout(Duration::from_secs(5), s.next_event(generation))
        .await
        .unwrap();
    assert!(matches!(
        event,
        portcullis_mcp::client::SessionEvent::Closed(_)
    ));
    let err = s
        .call_tool("get_current_time", &json!({}), &CallExtras::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, portcullis_mcp::client::ClientError::Transport(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_command_that_is_not_mcp_fails_to_connect() {
    let err = Session::connect(
        "cat",
        &stdio(vec![
            "sh".into(),
            "-c".into(),
            "echo not-json; sleep 5".into(),
        ]),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("not JSON-RPC") || err.to_string().contains("closed"),
        "{err}"
    );
    let err = Session::connect("none", &stdio(vec!["/nonexistent/binary".into()]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot start"), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("port {port} never opened");
}

#[tokio::test]
async fn everything_server_over_streamable_http_with_sse_answers() {
    let Some(script) = npm_script("server-everything") else {
        return;
    };
    let port = free_port();
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_port(port).await;
    let s = Session::connect(
        "everything",
        &Transport::Http {
            url: format!("http://127.0.0.1:{port}/mcp"),
            options: Default::default(),
        },
    )
    .await
    .unwrap();
    assert_eq!(s.era(), Era::Legacy);
    let tools = s.list_tools().await.unwrap();
    assert!(tools.iter().any(|t| t["name"] == "echo"), "{tools:?}");
    let r = s
        .call_tool(
            "echo",
            &json!({"message": "hi there"}),
            &CallExtras::default(),
        )
        .await
        .unwrap();
    assert!(r.to_string().contains("hi there"), "{r}");
    s.close().await;
    let _ = child.kill().await;
}
