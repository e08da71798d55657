//! The stdio transport: a child process, one JSON-RPC message per line on
//! its stdin and stdout. Its stderr is read separately (and logged at debug
//! level, line by line, bounded), never mixed with the protocol stream.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::Mutex;

use super::{ClientError, MAX_MESSAGE_BYTES, Shared};
use crate::jsonrpc::{self, Incoming, Message};

/// Longest stderr line kept for the log.
const MAX_STDERR_LINE: usize = 4096;

#[derive(Debug)]
pub(super) struct StdioConn {
    stdin: Arc<Mutex<ChildStdin>>,
    child: Mutex<Child>,
}

impl StdioConn {
    pub(super) fn spawn(
        name: &str,
        command: &[String],
        cwd: Option<&Path>,
        env: &[(String, String)],
        shared: Arc<Shared>,
    ) -> Result<Self, ClientError> {
        let Some((program, args)) = command.split_first() else {
            return Err(ClientError::Transport("empty command".to_owned()));
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ClientError::Transport(format!("cannot start {program:?}: {e}")))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(ClientError::Transport("child has no pipes".to_owned()));
        };
        let stdin = Arc::new(Mutex::new(stdin));
        tokio::spawn(read_stdout(
            BufReader::new(stdout),
            shared,
            stdin.clone(),
            name.to_owned(),
        ));
        tokio::spawn(read_stderr(BufReader::new(stderr), name.to_owned()));
        Ok(Self {
            stdin,
            child: Mutex::new(child),
        })
    }

    pub(super) async fn send(&self, message: &Message) -> Result<(), ClientError> {
        write_line(&self.stdin, message).await
    }

    pub(super) async fn kill(&self) {
        let mut child = self.child.lock().await;
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

async fn write_line(stdin: &Mutex<ChildStdin>, message: &Message) -> Result<(), ClientError> {
    let mut line = message.to_json();
    line.push('\n');
    let mut w = stdin.lock().await;
    w.write_all(line.as_bytes())
        .await
        .map_err(|e| ClientError::Transport(format!("writing to the process: {e}")))?;
    w.flush()
        .await
        .map_err(|e| ClientError::Transport(format!("writing to the process: {e}")))
}

async fn read_stdout<R: AsyncBufRead + Unpin>(
    mut reader: R,
    shared: Arc<Shared>,
    stdin: Arc<Mutex<ChildStdin>>,
    name: String,
) {
    let mut line = Vec::new();
    let why = loop {
        line.clear();
        match read_line_bounded(&mut reader, &mut line, MAX_MESSAGE_BYTES).await {
            Ok(false) => break "the process closed its stdout (exited)".to_owned(),
            Err(e) => break format!("reading from the process: {e}"),
            Ok(true) => {}
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let messages = match jsonrpc::parse(&line, MAX_MESSAGE_BYTES) {
            Ok(Incoming::One(m)) => vec![m],
            Ok(Incoming::Batch(ms)) => ms,
            Err(e) => {
                // A server that writes non-protocol text on stdout breaks
                // the stream's framing: the connection cannot be trusted.
                break format!("the process wrote a line that is not JSON-RPC: {e}");
            }
        };
        for m in messages.into_iter().flatten() {
            if let Some(reply) = shared.server_message(m)
                && let Err(e) = write_line(&stdin, &reply).await
            {
                tracing::debug!(upstream = %name, error = %e, "answering a server request");
            }
        }
    };
    tracing::info!(upstream = %name, reason = %why, "upstream connection closed");
    shared.close(why);
}

async fn read_stderr<R: AsyncBufRead + Unpin>(mut reader: R, name: String) {
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line_bounded(&mut reader, &mut line, MAX_STDERR_LINE).await {
            Ok(true) => {
                tracing::debug!(upstream = %name, line = %String::from_utf8_lossy(&line).trim_end(), "upstream stderr");
            }
            // An over-long line is skipped, not fatal: stderr is only a log.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {}
            _ => return,
        }
    }
}

/// Reads one `\n`-terminated line into `buf` (without the newline).
/// `Ok(false)` at end of input; `InvalidData` when the line exceeds `max`
/// (the rest of that line is consumed and dropped).
pub(crate) async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return if buf.is_empty() && !too_long {
                Ok(false)
            } else if too_long {
                Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "line too long",
                ))
            } else {
                Ok(true)
            };
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (available.get(..i).unwrap_or_default(), Some(i + 1)),
            None => (available, None),
        };
        if !too_long {
            if buf.len() + chunk.len() > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        let used = done.unwrap_or(available.len());
        reader.consume(used);
        if done.is_some() {
            if too_long {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("line longer than {max} bytes"),
                ));
            }
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(true);
        }
    }
}
