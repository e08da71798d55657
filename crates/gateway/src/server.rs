//! The router, the request-id layer, and the HTTP server with its timeouts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::error::{ApiError, Kind};
use crate::metrics::LedgerGauges;
use crate::refusals::Source;
use crate::state::Gateway;
use crate::{admin, elevations, layers, oauth, tasks};

/// Longest a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 4096;

/// The id of one request: in every error body and the `x-request-id`
/// response header.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| RequestId(String::new())))
    }
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = portcullis_token::random_id("req_").unwrap_or_else(|_| "req_unavailable".to_owned());
    req.extensions_mut().insert(RequestId(id.clone()));
    // The peer address [`serve`] put on the request: the source that
    // unauthenticated refusals are counted against (no forwarding header
    // is trusted: any client can write one).
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(Source::Unknown, |c| Source::Peer(c.0.ip()));
    // Every line logged while serving this request carries its id.
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let served = crate::refusals::with_source(source, next.run(req));
    let mut response = tracing::Instrument::instrument(served, span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

async fn not_found(rid: RequestId) -> Response {
    ApiError::new(Kind::NotFound, "no such endpoint")
        .with_request_id(&rid.0)
        .into_response()
}

async fn method_not_allowed(rid: RequestId) -> Response {
    ApiError::new(
        Kind::MethodNotAllowed,
        "method not allowed on this endpoint",
    )
    .with_request_id(&rid.0)
    .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Longest `/readyz` waits for the ledger's answer. A ledger that hangs
/// (a frozen server, a network that drops packets rather than refusing
/// them) would otherwise hold the probe for the store's whole operation
/// timeout (30 s on PostgreSQL), longer than a load balancer waits.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    match tokio::time::timeout(READY_TIMEOUT, gw.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "store unreachable: not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response()
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = READY_TIMEOUT.as_millis(),
                "store did not answer: not ready"
            );
            (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response()
        }
    }
}

/// Always 200: what the ledger cannot tell in time (the task counts) is
/// left out rather than failing or holding up the scrape.
async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let ledger = LedgerGauges {
        tasks: gw.metrics.task_counts.read(gw.store.as_ref()).await,
        queue_depth: gw.store.queue_depth(),
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        gw.metrics.render(&ledger),
    )
        .into_response()
}

/// The whole HTTP surface of DESIGN section 9.
pub fn router(gw: Arc<Gateway>) -> Router {
    // Routes only a task's own token may call: authenticate, then bind the
    // token to the path's task (the last layer added runs first).
    let task_token_routes = Router::new()
        .route("/v1/tasks/{task_id}/calls", post(tasks::call))
        .route("/v1/tasks/{task_id}/authorize", post(tasks::authorize))
        .route("/v1/tasks/{task_id}/transition", post(tasks::transition))
        .route("/v1/tasks/{task_id}/elevations", post(elevations::request))
        .route_layer(middleware::from_fn_with_state(
            gw.clone(),
            layers::bind_task,
        ))
        .route_layer(middleware::from_fn_with_state(
            gw.clone(),
            layers::authenticate,
        ));
    Router::new()
        .merge(task_token_routes)
        .merge(crate::console::routes())
        .route("/v1/tasks", post(tasks::start))
        .route("/v1/tasks/{task_id}", get(tasks::get))
        .route("/v1/tasks/{task_id}/complete", post(tasks::complete))
        .route("/v1/tasks/{task_id}/halt", post(tasks::halt))
        .route("/v1/tasks/{task_id}/resume", post(tasks::resume))
        .route("/v1/elevations", get(elevations::list))
        .route("/v1/elevations/{id}/approve", post(elevations::approve))
        .route("/v1/elevations/{id}/deny", post(elevations::deny))
        .route("/v1/audit", get(admin::audit))
        .route("/v1/events", get(crate::events::events))
        .route("/oauth/token", post(oauth::token))
        .route("/oauth/revoke", post(oauth::revoke))
        .route("/oauth/introspect", post(oauth::introspect))
        .route("/.well-known/jwks.json", get(oauth::jwks))
        .route(
            "/.well-known/oauth-authorization-server",
            get(oauth::authorization_server),
        )
        .route(
            "/.well-known/oauth-protected-resource",
            get(oauth::protected_resource),
        )
        .route("/mcp", axum::routing::any(crate::mcp::endpoint))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn(request_id))
        .layer(middleware::from_fn(close_if_body_unread))
        .with_state(gw)
}

/// Answers given before the request's body was read to its end (a refused
/// token, a body over the limit) say `Connection: close`. The server
/// cannot tell where the next request on such a connection starts, so it
/// closes it after the answer; without the header a keep-alive client
/// would send its next request into a closed connection.
async fn close_if_body_unread(req: Request, next: Next) -> Response {
    use hyper::body::Body as _;
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = axum::body::Body::new(ReadToEnd {
        inner: body,
        read: read.clone(),
    });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !read.load(std::sync::atomic::Ordering::Acquire) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            HeaderValue::from_static("close"),
        );
    }
    response
}

/// A request body that notes when it has been read to its end.
struct ReadToEnd {
    inner: axum::body::Body,
    read: Arc<std::sync::atomic::AtomicBool>,
}

impl hyper::body::Body for ReadToEnd {
    type Data = hyper::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || this.inner.is_end_stream() {
            this.read.store(true, std::sync::atomic::Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `router` on `listener` until `shutdown` resolves: HTTP/1.1 with a
/// header-read timeout, at most [`MAX_CONNECTIONS`] connections at once.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, router, None, shutdown).await
}

/// [`serve`], with TLS when `tls` is given: the handshake must finish
/// within [`HEADER_TIMEOUT`]; the protocol is the one ALPN agreed on,
/// HTTP/2 (`h2`) or HTTP/1.1 (also when the client offered none).
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return Ok(()),
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Ok(()),
            },
        };
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // The peer address goes on every request of the connection.
        let service =
            hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
                router.clone(),
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req
                },
            ));
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, service, false, peer).await,
                Some(acceptor) => {
                    // A client that connects and never finishes the
                    // handshake is cut off like one that never sends its
                    // headers.
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            serve_connection(stream, service, h2, peer).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "tls handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

/// The protocols the TLS listener offers, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

async fn serve_connection<I, S>(io: I, service: S, h2: bool, peer: SocketAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = Response,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if h2 {
        // Chosen by ALPN, so there is no preface to sniff. Streams per
        // connection and header size are bounded; pings find dead peers.
        let mut builder = builder.http2_only();
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .max_header_list_size(64 * 1024)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(HEADER_TIMEOUT);
        if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        return;
    }
    // HTTP/1 only: without it the auto builder first sniffs for the
    // HTTP/2 preface with no timeout at all, so a client that connects and
    // sends nothing held its connection (and one of the MAX_CONNECTIONS
    // permits) forever; the header timeout only starts once HTTP/1 parsing
    // does.
    builder = builder.http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024);
    if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
