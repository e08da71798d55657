//! The Streamable HTTP transport (client side).
//!
//! Every message is one POST to the endpoint with `Accept: application/json,
//! text/event-stream`. The server answers a request with one JSON body, or
//! with an SSE stream that carries the answer (and possibly notifications
//! and requests of its own) and then ends; a notification gets 202.
//!
//! - Modern era: each POST carries `MCP-Protocol-Version`, `Mcp-Method`
//!   and, for name-bearing methods, `Mcp-Name` (see [`crate::era`]).
//! - Legacy era: the `Mcp-Session-Id` from the `initialize` answer rides on
//!   every later request, with the negotiated `MCP-Protocol-Version`; a
//!   GET opens the server's own stream (where `tools/list_changed` arrives),
//!   and DELETE ends the session. A 404 on a session means the server
//!   forgot it: the connection is closed, and the owner reconnects.
//!
//! `http://` and `https://` endpoints. An `https://` endpoint is verified
//! (chain, validity, host name) with [`portcullis_tls::client_config`]: the
//! system roots, or the options' `ca_file`, and the options' client
//! certificate for mutual TLS. The files are read at each (re)connect, so a
//! rotated client certificate is used from the next connection on. A
//! failed handshake is a transport error naming the TLS cause.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{CallExtras, ClientError, MAX_MESSAGE_BYTES, Shared};
use crate::era::{self, Era};
use crate::jsonrpc::{self, CONNECTION_CLOSED, ErrorObject, Id, Incoming, Message};
use crate::sse;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
pub use portcullis_tls::ClientTls;

/// HTTP connection settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// How long to wait for response headers.
    pub response_timeout: Duration,
    /// Most idle keep-alive connections kept to the server.
    pub max_idle: usize,
    /// Headers sent with every request (name, value), e.g. a client's own
    /// `Authorization` when the gateway's `/mcp` is the server.
    pub headers: Vec<(String, String)>,
    /// Trust roots and client identity for an `https://` endpoint.
    pub tls: ClientTls,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_secs(30),
            max_idle: 64,
            headers: Vec::new(),
            tls: ClientTls::default(),
        }
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Debug)]
pub(super) struct HttpConn {
    uri: Uri,
    client: HttpClient,
    options: HttpOptions,
    shared: Arc<Shared>,
    session: Mutex<Option<HeaderValue>>,
    version: Mutex<Option<HeaderValue>>,
    listener: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        if let Some(h) = self
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            h.abort();
        }
    }
}

impl HttpConn {
    pub(super) fn new(
        url: &str,
        options: HttpOptions,
        shared: Arc<Shared>,
    ) -> Result<Self, ClientError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| ClientError::Transport(format!("bad upstream url {url:?}: {e}")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(ClientError::Transport(format!(
                    "upstream url {url:?}: only http:// and https:// URLs are supported"
                )));
            }
        };
        if uri.authority().is_none() {
            return Err(ClientError::Transport(format!(
                "upstream url {url:?} has no host"
            )));
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let tls = if https {
            // No ALPN here: the connector sets it (and refuses a preset one).
            portcullis_tls::client_config(&options.tls, &[])
        } else {
            portcullis_tls::trusting_nothing()
        }
        .map_err(|e| ClientError::Transport(format!("upstream tls setup: {e}")))?;
        let builder = HttpsConnectorBuilder::new().with_tls_config((*tls).clone());
        let connector = if https {
            builder.https_only()
        } else {
            builder.https_or_http()
        }
        .enable_http1()
        .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(options.max_idle)
            .build(connector);
        Ok(Self {
            uri,
            client,
            options,
            shared,
            session: Mutex::new(None),
            version: Mutex::new(None),
            listener: Mutex::new(None),
        })
    }

    pub(super) fn set_protocol_version(&self, version: &str) {
        if let Ok(v) = HeaderValue::from_str(version) {
            *self.version.lock().unwrap_or_else(PoisonError::into_inner) = Some(v);
        }
    }

    fn request(
        &self,
        method: Method,
        body: Option<Bytes>,
        message: Option<&Message>,
        era: Era,
        extras: &CallExtras,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut b = Request::builder()
            .method(method)
            .uri(self.uri.clone())
            .header(header::ACCEPT, "application/json, text/event-stream");
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        match era {
            Era::Modern => {
                b = b.header(era::HEADER_PROTOCOL_VERSION, era::MODERN_VERSION);
                if let Some(m) = message.and_then(Message::method) {
                    b = b.header(era::HEADER_METHOD, m);
                    if let Some(name) = era::name_param(m)
                        .and_then(|k| message.and_then(Message::params)?.get(k)?.as_str())
                    {
                        b = b.header(era::HEADER_NAME, era::encode_header_value(name));
                    }
                }
            }
            Era::Legacy => {
                if let Some(s) = self
                    .session
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
                {
                    b = b.header(era::HEADER_SESSION, s);
                }
                if let Some(v) = self
                    .version
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
                {
                    b = b.header(era::HEADER_PROTOCOL_VERSION, v);
                }
            }
        }
        for (k, v) in self.options.headers.iter().chain(&extras.headers) {
            b = b.header(k.as_str(), v.as_str());
        }
        b.body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ClientError::Transport(format!("building a request: {e}")))
    }

    pub(super) async fn send(
        &self,
        message: &Message,
        era: Era,
        extras: &CallExtras,
    ) -> Result<(), ClientError> {
        let body = Bytes::from(message.to_json());
        let req = self.request(Method::POST, Some(body), Some(message), era, extras)?;
        let response =
            tokio::time::timeout(self.options.response_timeout, self.client.request(req))
                .await
                .map_err(|_| ClientError::Timeout(self.options.response_timeout))?
                .map_err(|e| {
                    ClientError::Transport(format!("upstream http: {}", portcullis_tls::causes(&e)))
                })?;
        let status = response.status();
        if matches!(message, Message::Request { method, .. } if method == "initialize")
            && let Some(s) = response.headers().get(era::HEADER_SESSION)
        {
            *self.session.lock().unwrap_or_else(PoisonError::into_inner) = Some(s.clone());
        }
        if era == Era::Legacy
            && status == StatusCode::NOT_FOUND
            && self
                .session
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
        {
            self.shared
                .close("the upstream no longer knows the session (404)".to_owned());
            return Err(ClientError::Transport(
                "upstream session expired".to_owned(),
            ));
        }
        let is_sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let request_id = match message {
            Message::Request { id, .. } => Some(id.clone()),
            _ => None,
        };
        if is_sse && status.is_success() {
            let shared = self.shared.clone();
            let body = response.into_body();
            tokio::spawn(async move {
                read_stream(body, &shared).await;
                if let Some(id) = request_id {
                    shared.complete(
                        &id,
                        Err(ErrorObject::new(
                            CONNECTION_CLOSED,
                            "the upstream's stream ended without an answer",
                        )),
                    );
                }
            });
            return Ok(());
        }
        let bytes = Limited::new(response.into_body(), MAX_MESSAGE_BYTES)
            .collect()
            .await
            .map_err(|e| ClientError::Transport(format!("reading the upstream's answer: {e}")))?
            .to_bytes();
        if bytes.is_empty() {
            if status.is_success() {
                if let Some(id) = request_id {
                    self.shared.complete(
                        &id,
                        Err(ErrorObject::new(
                            CONNECTION_CLOSED,
                            format!("the upstream answered HTTP {status} with no body"),
                        )),
                    );
                }
                return Ok(());
            }
            return Err(ClientError::Transport(format!(
                "the upstream answered HTTP {status}"
            )));
        }
        match jsonrpc::parse(&bytes, MAX_MESSAGE_BYTES) {
            Ok(incoming) => {
                self.dispatch(incoming, request_id.as_ref(), status);
                Ok(())
            }
            Err(e) if status.is_success() => Err(ClientError::Protocol(format!(
                "the upstream's answer is not JSON-RPC: {e}"
            ))),
            Err(_) => Err(ClientError::Transport(format!(
                "the upstream answered HTTP {status}"
            ))),
        }
    }

    fn dispatch(&self, incoming: Incoming, request_id: Option<&Id>, status: StatusCode) {
        let messages = match incoming {
            Incoming::One(m) => vec![m],
            Incoming::Batch(ms) => ms,
        };
        for m in messages.into_iter().flatten() {
            // A JSON-RPC error for a request whose id the server could not
            // read comes back with id null, which `Message` refuses; the
            // request then fails by status below.
            let _ = self.shared.server_message(m);
        }
        if let Some(id) = request_id
            && !status.is_success()
        {
            self.shared.complete(
                id,
                Err(ErrorObject::new(
                    jsonrpc::INTERNAL_ERROR,
                    format!("the upstream answered HTTP {status}"),
                )),
            );
        }
    }

    /// Opens the legacy era's server stream (GET), where the server sends
    /// `notifications/tools/list_changed`. A server without one (405) is
    /// fine: changes are then seen at the next reconnect.
    pub(super) fn listen(&self) {
        let Ok(req) = self.request(Method::GET, None, None, Era::Legacy, &CallExtras::default())
        else {
            return;
        };
        let client = self.client.clone();
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            let Ok(response) = client.request(req).await else {
                return;
            };
            if response.status().is_success() {
                read_stream(response.into_body(), &shared).await;
            }
        });
        *self.listener.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
    }

    pub(super) async fn end_session(&self) {
        if let Some(h) = self
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            h.abort();
        }
        let has_session = self
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if !has_session {
            return;
        }
        if let Ok(req) = self.request(
            Method::DELETE,
            None,
            None,
            Era::Legacy,
            &CallExtras::default(),
        ) {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.client.request(req)).await;
        }
    }
}

async fn read_stream(mut body: hyper::body::Incoming, shared: &Shared) {
    let mut decoder = sse::Decoder::new(MAX_MESSAGE_BYTES);
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let Ok(events) = decoder.feed(data) else {
            return;
        };
        for event in events {
            let Ok(incoming) = jsonrpc::parse(event.data.as_bytes(), MAX_MESSAGE_BYTES) else {
                continue;
            };
            let messages = match incoming {
                Incoming::One(m) => vec![m],
                Incoming::Batch(ms) => ms,
            };
            for m in messages.into_iter().flatten() {
                // Server-to-client requests on a stream are not answered:
                // the gateway offers no client capabilities, and a server
                // must not depend on them.
                let _ = shared.server_message(m);
            }
        }
    }
}
