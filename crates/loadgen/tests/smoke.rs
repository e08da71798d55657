//! Runs the harness briefly against a real MCP server from the official
//! Python SDK (`tests/echo_server.py`), with two targets pointing at it, and
//! checks the JSON report. Skipped, with a notice, where python3 or the `mcp`
//! module is missing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python_sdk_available() -> bool {
    Command::new("python3")
        .args(["-c", "import mcp.server.mcpserver, uvicorn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_server() -> (Server, u16) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/echo_server.py");
    let port = free_port();
    let mut server = Server(
        Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("start python3"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (server, port);
        }
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("echo server exited early: {status}");
        }
        assert!(Instant::now() < deadline, "echo server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn smoke_against_the_python_sdk_server() {
    if !python_sdk_available() {
        eprintln!("SKIPPED: python3 with the `mcp` SDK and uvicorn is not available");
        return;
    }
    let (_server, port) = start_server();
    let url = format!("http://127.0.0.1:{port}/mcp");
    let json_path = std::env::temp_dir().join(format!(
        "portcullis-load-smoke-{}-{}.json",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));

    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-load"))
        .args(["--target", &format!("direct={url}")])
        .args(["--target", &format!("other={url}")])
        .args(["--tool", "echo", "--args", r#"{"text":"hi"}"#])
        .args(["--rates", "50", "--full-speed"])
        .args(["--duration", "1s", "--warmup", "200ms", "--pause", "100ms"])
        .args(["--rounds", "2", "--max-connections", "2"])
        .arg("--json")
        .arg(&json_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "harness failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stdout.contains("p99.9") && stdout.contains("other − direct"));

    let text = std::fs::read_to_string(&json_path).unwrap();
    let _ = std::fs::remove_file(&json_path);
    let doc: Value = serde_json::from_str(&text).unwrap();

    let machine = &doc["machine"];
    assert!(machine["nproc"].as_u64().unwrap() >= 1);
    assert_eq!(machine["loadavg_start"].as_array().unwrap().len(), 3);
    assert_eq!(machine["loadavg_end"].as_array().unwrap().len(), 3);

    // 2 rounds × 2 modes × 2 targets, the order flipping each round.
    let phases = doc["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 8, "{text}");
    let firsts: Vec<(&str, &str)> = phases
        .iter()
        .filter(|p| p["position"] == 1)
        .map(|p| (p["mode"].as_str().unwrap(), p["target"].as_str().unwrap()))
        .collect();
    assert_eq!(
        firsts,
        [
            ("50/s", "direct"),
            ("full", "direct"),
            ("50/s", "other"),
            ("full", "other")
        ]
    );
    for p in phases {
        assert!(p["ok"].as_u64().unwrap() > 0, "{p}");
        assert_eq!(p["error_total"], 0, "{p}");
        assert_eq!(p["warmup_errors"], 0, "{p}");
        let lat = &p["latency_us"];
        let (p50, p99, max) = (num(&lat["p50"]), num(&lat["p99"]), num(&lat["max"]));
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{p}");
        assert!(max < 5_000_000.0, "{p}");
        assert!(num(&p["service_us"]["p50"]) <= p50 + 1.0, "{p}");
        let rate = num(&p["achieved_rate"]);
        if p["mode"] == "50/s" {
            // Open loop: about 50 calls in the 1 s window.
            assert!((35.0..=65.0).contains(&rate), "{p}");
        } else {
            assert!(rate > 50.0, "{p}");
        }
    }

    let summary = doc["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 4);
    for s in summary {
        assert_eq!(s["rounds"], 2);
        assert_eq!(s["error_total"], 0);
        assert!(num(&s["median_latency_us"]["p50"]) > 0.0);
    }

    let cmp = &doc["comparison"];
    assert_eq!(cmp["baseline"], "direct");
    assert_eq!(cmp["subject"], "other");
    let modes = cmp["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2);
    assert_eq!(
        modes[0]["p50_diff_us"]["per_round"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(modes[0]["throughput_ratio"].is_null());
    let ratio = &modes[1]["throughput_ratio"];
    assert_eq!(ratio["per_round"].as_array().unwrap().len(), 2);
    assert!(num(&ratio["median"]) > 0.0);
}
