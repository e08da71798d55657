//! The stdio transport: one JSON-RPC message per line on stdin, one
//! answer per line on stdout, logs only on stderr.
//!
//! Requests are answered concurrently (at most [`MAX_IN_FLIGHT`] at a
//! time; reading pauses beyond that), so answers may come out of order,
//! as JSON-RPC allows. Each request's era is read from itself (see
//! [`DemoServer::handle_request`]): a legacy client's `initialize` and a
//! modern client's `_meta` envelope can share one server. The server ends
//! cleanly when stdin ends, after answering what it has read.

use std::sync::Arc;

use portcullis_mcp::jsonrpc::{self, ErrorObject, INVALID_REQUEST, Incoming};
use portcullis_mcp::{Id, Message};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::sync::{Semaphore, mpsc};

use crate::{DemoError, DemoServer};

/// Longest line read, in bytes; a longer one is answered with an error
/// and skipped.
pub const MAX_LINE: usize = 4 << 20;
/// Most requests answered at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// Serves `server` on the process's stdin and stdout.
pub async fn serve(server: DemoServer) -> Result<(), DemoError> {
    serve_io(server, tokio::io::stdin(), tokio::io::stdout()).await
}

/// Serves `server` on any pair of byte streams (newline-delimited JSON).
pub async fn serve_io<R, W>(server: DemoServer, input: R, output: W) -> Result<(), DemoError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<String>(MAX_IN_FLIGHT * 2);
    let writer = tokio::spawn(write_lines(rx, output));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut line = Vec::with_capacity(4096);
    let read_result = loop {
        line.clear();
        let too_long = match read_line(&mut reader, &mut line).await {
            Ok(None) => break Ok(()),
            Ok(Some(too_long)) => too_long,
            Err(source) => {
                break Err(DemoError::Io {
                    context: "reading stdin".to_owned(),
                    source,
                });
            }
        };
        if too_long {
            let e = jsonrpc::ParseError::TooLarge { limit: MAX_LINE }.to_error();
            if tx.send(null_id_error(&e)).await.is_err() {
                break Ok(());
            }
            continue;
        }
        let text = line.strip_suffix(b"\r").unwrap_or(&line);
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (id, method, params) = match jsonrpc::parse(text, MAX_LINE) {
            Err(e) => {
                let _ = tx.send(null_id_error(&e.to_error())).await;
                continue;
            }
            Ok(Incoming::Batch(_)) => {
                let e = ErrorObject::new(INVALID_REQUEST, "batches are not supported");
                let _ = tx.send(null_id_error(&e)).await;
                continue;
            }
            Ok(Incoming::One(Err(invalid))) => {
                let answer = match invalid.id.clone() {
                    Some(id) => Message::error(id, invalid.to_error()).to_json(),
                    None => null_id_error(&invalid.to_error()),
                };
                let _ = tx.send(answer).await;
                continue;
            }
            Ok(Incoming::One(Ok(Message::Request { id, method, params }))) => (id, method, params),
            Ok(Incoming::One(Ok(Message::Notification { method, .. }))) => {
                tracing::debug!(%method, "notification");
                continue;
            }
            Ok(Incoming::One(Ok(Message::Response { id, .. }))) => {
                tracing::debug!(%id, "ignoring a response: this server sends no requests");
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break Ok(());
        };
        let server = server.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let answer = answer(&server, id, &method, params.as_ref()).await;
            let _ = tx.send(answer).await;
            drop(permit);
        });
    };
    // Every task holds a sender: the writer ends once they have answered.
    drop(tx);
    let write_result = writer.await.unwrap_or(Ok(()));
    read_result?;
    write_result.map_err(|source| DemoError::Io {
        context: "writing stdout".to_owned(),
        source,
    })
}

async fn answer(server: &DemoServer, id: Id, method: &str, params: Option<&Value>) -> String {
    server.handle_request(id, method, params).await.to_json()
}

/// An error answer to a message whose id could not be read.
fn null_id_error(e: &ErrorObject) -> String {
    json!({ "jsonrpc": "2.0", "id": null, "error": e.to_value() }).to_string()
}

/// Reads one line (without its `\n`) into `line`, keeping at most
/// [`MAX_LINE`] bytes. `None` at the end of input; `Some(true)` when the
/// line was longer (the rest is skipped).
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<bool>> {
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(read_any.then_some(too_long));
        }
        read_any = true;
        let (chunk, used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (buf.get(..i).unwrap_or_default(), i + 1, true),
            None => (buf, buf.len(), false),
        };
        if !too_long && line.len() + chunk.len() <= MAX_LINE {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line.clear();
        }
        reader.consume(used);
        if done {
            return Ok(Some(too_long));
        }
    }
}

async fn write_lines<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<String>,
    output: W,
) -> std::io::Result<()> {
    let mut out = tokio::io::BufWriter::with_capacity(64 * 1024, output);
    while let Some(line) = rx.recv().await {
        out.write_all(line.as_bytes()).await?;
        out.write_all(b"\n").await?;
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use crate::{Kind, Options};
    use tokio::io::AsyncReadExt as _;

    async fn exchange(input: String) -> Vec<Value> {
        let server = DemoServer::new(&Options::new(Kind::Warehouse)).unwrap();
        let (client, server_end) = tokio::io::duplex(1 << 16);
        let (server_read, server_write) = tokio::io::split(server_end);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let task = tokio::spawn(serve_io(server, server_read, server_write));
        client_write.write_all(input.as_bytes()).await.unwrap();
        client_write.shutdown().await.unwrap();
        drop(client_write);
        let mut out = String::new();
        client_read.read_to_string(&mut out).await.unwrap();
        task.await.unwrap().unwrap();
        let mut answers: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        answers.sort_by_key(|a| a["id"].as_i64().unwrap_or(-1));
        answers
    }

    #[tokio::test]
    async fn a_session_over_lines() {
        let meta = portcullis_mcp::era::client_meta("t", "1");
        let input = [
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}),
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}),
            json!({"jsonrpc": "2.0", "id": 3, "method": "server/discover", "params": {"_meta": meta}}),
            json!({"jsonrpc": "2.0", "id": 4, "method": "nope"}),
        ]
        .iter()
        .map(|v| format!("{v}\n"))
        .collect::<String>()
            + "not json\n\n"
            + &format!("{}\n", "x".repeat(MAX_LINE + 10));
        let answers = exchange(input).await;
        assert_eq!(answers.len(), 6, "{answers:?}");
        // The two null-id errors sort first.
        assert_eq!(answers[0]["id"], Value::Null);
        assert_eq!(answers[1]["id"], Value::Null);
        assert_eq!(answers[2]["result"]["protocolVersion"], "2025-11-25");
        assert_eq!(answers[3]["result"]["content"][0]["text"], "x");
        assert_eq!(answers[4]["result"]["resultType"], "complete");
        assert_eq!(answers[5]["error"]["code"], -32601);
    }
}
