//! The HTTP/JSON management API on its own port (`--http`, default
//! `127.0.0.1:50052`): the operations of the gRPC API as REST resources, a
//! Server-Sent Events stream of the stats, the health checks, `/metrics` and
//! an OpenAPI document of it all.
//!
//! It is a gateway in front of the gRPC services, not a second
//! implementation: every `/v1` call builds the gRPC request message (from
//! the path, the query and the JSON body, in the proto3 JSON mapping of
//! [`asyncore_proto::json`]), calls the same [`ControlApi`] method gRPC
//! clients reach, and writes the reply message in the same mapping. So
//! validation, the engine commands, the answers and the error messages are
//! the gRPC API's; an error's HTTP status comes from its gRPC code
//! ([`http_status`]), which the one mapping in [`grpc::status`](crate::grpc)
//! chose. `WatchStats` streams over SSE share the gRPC streams' feeds and
//! their limit.
//!
//! Every request goes through [`guard`] first: the bearer token and its
//! level ([`crate::auth`]), `Host` and `Origin` on mutations, and the audit
//! line. Bodies are limited to 64 KiB. The API listens on TCP (over TLS
//! when configured, [`crate::tls`]) or on a Unix socket ([`crate::unix`]).
//!
//! The routes are in [`api`], `/metrics` in [`metrics`], the document in
//! [`openapi`]. The server runs on the daemon's tokio runtime, with the
//! control API's accept stream (a back-off and a spare descriptor when
//! descriptors run out), and stops with the daemon.

mod api;
mod metrics;
mod openapi;
mod status_page;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    Router,
    extract::{ConnectInfo, DefaultBodyLimit, Request, State, connect_info},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{
    Code, Status,
    transport::server::{Connected, TcpConnectInfo, UdsConnectInfo},
};

use asyncore_engine::command::EngineHandle;

use crate::{
    auth::{self, Auth, Level, Need, Who},
    grpc::{ControlApi, Incoming},
    lifecycle::{Lifecycle, Phase},
    tls::{Protocol, Tls, TlsConnectInfo, TlsIncoming},
    unix::{Endpoint, UnixIncoming},
};

/// The largest request body accepted (every body of the API is a small
/// JSON object); a larger one is refused with 400 (INVALID_ARGUMENT,
/// "length limit exceeded"), as the gRPC side refuses a large message.
const MAX_BODY: usize = 64 * 1024;

/// How long stopping waits for requests under way (an SSE stream ends at
/// once) before the server task is cancelled.
const STOP_PATIENCE: Duration = Duration::from_secs(5);

/// The HTTP server of a daemon. Dropping it stops it: the listening socket
/// closes at the runtime's next turn, and open connections finish the
/// request they serve.
#[derive(Debug)]
pub(crate) struct HttpServer {
    endpoint: Endpoint,
    /// `true` (or dropped) stops the server and ends the SSE streams.
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The HTTP API's port or Unix socket, bound.
#[derive(Debug)]
pub(crate) enum Bound {
    Tcp { listener: tokio::net::TcpListener, address: SocketAddr },
    Unix(UnixIncoming),
}

/// Binds the HTTP API's port.
///
/// # Errors
///
/// If `address` cannot be bound.
pub(crate) async fn bind(address: SocketAddr) -> anyhow::Result<Bound> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot bind the http api on {address}"))?;
    let address = listener.local_addr().with_context(|| format!("the http api on {address}"))?;
    Ok(Bound::Tcp { listener, address })
}

/// Binds the HTTP API's Unix socket (see [`crate::unix::bind`]).
///
/// # Errors
///
/// If the socket or its directory is refused or cannot be made.
pub(crate) fn bind_unix(path: &std::path::Path) -> anyhow::Result<Bound> {
    crate::unix::bind("http api", path).map(Bound::Unix)
}

impl HttpServer {
    /// Serves the API on `listener`, on the current runtime, until stopped.
    /// `api` is the gRPC API's own (so streams count against one limit).
    /// `auth` checks every request's token (see [`guard`]). With `tls`,
    /// TCP connections are served over TLS.
    pub(crate) fn spawn(
        bound: Bound,
        api: ControlApi,
        engine: EngineHandle,
        lifecycle: Lifecycle,
        auth: Arc<Auth>,
        tls: Option<&Tls>,
    ) -> HttpServer {
        let (stop, stopped) = watch::channel(false);
        let state =
            HttpState { api, lifecycle, metrics: Arc::new(metrics::Metrics::new(engine)), stopped: stopped.clone() };
        let listen = match &bound {
            Bound::Tcp { address, .. } => Some(*address),
            Bound::Unix(_) => None,
        };
        let tls = tls.filter(|_| listen.is_some());
        let scheme = if tls.is_some() { "https" } else { "http" };
        // The Host check stops DNS rebinding: a page of another site that
        // made its own name lead here. Over TLS a browser reaches the API
        // only by a name the certificate carries, and with tokens a
        // mutation needs a bearer token, which no page of another site has
        // or can make the browser send: then any Host is accepted (clients
        // on other machines name the daemon as they reach it), and the
        // Origin must still be that Host's.
        let host_checked = if tls.is_some() || auth.enabled() { None } else { listen };
        let app = router(state)
            .layer(middleware::from_fn_with_state(Guard { auth, listen: host_checked, scheme }, guard))
            .layer(DefaultBodyLimit::max(MAX_BODY));
        let shutdown = async move {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let (endpoint, task) = match bound {
            Bound::Tcp { listener, address } => {
                let name = address.to_string();
                let task = match tls {
                    Some(tls) => {
                        let incoming = TlsIncoming::new(Incoming::new(listener), tls, Protocol::Http, "http api");
                        serve_on(Accept { incoming, address: name }, app, shutdown)
                    }
                    None => serve_on(Accept { incoming: Incoming::new(listener), address: name }, app, shutdown),
                };
                (Endpoint::Tcp(address), task)
            }
            Bound::Unix(incoming) => {
                let endpoint = Endpoint::Unix(incoming.path().to_owned());
                (endpoint, serve_on(Accept { incoming, address: "unix".to_owned() }, app, shutdown))
            }
        };
        tracing::info!(address = %endpoint, tls = tls.is_some(), "http api listening");
        HttpServer { endpoint, stop, task }
    }

    /// Where it listens.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Stops accepting, ends the SSE streams, and waits (up to
    /// [`STOP_PATIENCE`]) for the requests under way.
    pub(crate) async fn stop(&mut self) {
        self.stop.send_replace(true);
        if tokio::time::timeout(STOP_PATIENCE, &mut self.task).await.is_err() {
            tracing::warn!(patience = ?STOP_PATIENCE, "http api: requests still under way; cancelling the server");
            self.task.abort();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.task.abort();
    }
}

/// Serves `app` on `incoming` until `shutdown`.
fn serve_on<S, T>(
    incoming: Accept<S>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    Accept<S>: axum::serve::Listener<Io = T, Addr = PeerAddr>,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let app = app.into_make_service_with_connect_info::<Peer>();
    tokio::spawn(async move {
        // Never fails: accept errors are retried after a pause.
        let _ = axum::serve(incoming, app).with_graceful_shutdown(shutdown).await;
    })
}

/// The client's address as the audit log writes it: `ip:port`, or `unix`;
/// and the name of its verified client certificate, if any.
trait PeerName {
    fn peer_name(&self) -> Option<String>;

    fn client_cert(&self) -> Option<String> {
        None
    }
}

impl PeerName for TlsConnectInfo {
    fn peer_name(&self) -> Option<String> {
        self.remote.map(|address| address.to_string())
    }

    fn client_cert(&self) -> Option<String> {
        self.client_cert.clone()
    }
}

impl PeerName for TcpConnectInfo {
    fn peer_name(&self) -> Option<String> {
        self.remote_addr().map(|address| address.to_string())
    }
}

impl PeerName for UdsConnectInfo {
    fn peer_name(&self) -> Option<String> {
        Some("unix".to_owned())
    }
}

/// An accept stream (the control API's, its TLS layer's, or a Unix
/// socket's) as an axum listener; its `Addr` is the client's name
/// ([`PeerName`]; the bound address when the socket no longer knows it).
struct Accept<S> {
    incoming: S,
    address: String,
}

impl<S, T> axum::serve::Listener for Accept<S>
where
    S: Stream<Item = std::io::Result<T>> + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    T::ConnectInfo: PeerName,
{
    type Io = T;
    type Addr = PeerAddr;

    async fn accept(&mut self) -> (T, PeerAddr) {
        loop {
            // The stream pauses after a failed accept itself, and never
            // ends while its listener is open.
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let info = stream.connect_info();
                    let name = info.peer_name().unwrap_or_else(|| self.address.clone());
                    return (stream, PeerAddr { name, client_cert: info.client_cert() });
                }
                Some(Err(_)) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<PeerAddr> {
        Ok(PeerAddr { name: self.address.clone(), client_cert: None })
    }
}

/// The client's name, for the audit log, and its client certificate's
/// (verified by the TLS handshake).
#[derive(Debug, Clone)]
struct PeerAddr {
    name: String,
    client_cert: Option<String>,
}

/// [`PeerAddr`] as a request extension.
#[derive(Debug, Clone)]
struct Peer(PeerAddr);

impl<S> connect_info::Connected<axum::serve::IncomingStream<'_, Accept<S>>> for Peer
where
    Accept<S>: axum::serve::Listener<Addr = PeerAddr>,
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Accept<S>>) -> Peer {
        Peer(stream.remote_addr().clone())
    }
}

/// What [`guard`] checks against.
#[derive(Clone)]
struct Guard {
    auth: Arc<Auth>,
    /// The TCP address served; `None` on a Unix socket, which no browser
    /// reaches, and over TLS, whose handshake checks the name the browser
    /// used, so that any `Host` is accepted there.
    listen: Option<SocketAddr>,
    /// `https` over TLS, else `http`: what a same-site `Origin` starts with.
    scheme: &'static str,
}

/// Every request: a mutation (anything but GET and HEAD) must come with a
/// `Host` of this daemon and no foreign `Origin` (403, whatever the token:
/// a browser's cross-site request), then the token must allow the call
/// (401 without a valid one, 403 for a read token on a mutation; health
/// checks need none). Mutations, allowed or refused, are audited.
async fn guard(
    State(guard): State<Guard>,
    ConnectInfo(Peer(PeerAddr { name: peer, client_cert })): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    let need = guard.auth.http_need(request.method(), request.uri().path());
    let mutation = need == Need::Level(Level::Admin);
    let target = request.uri().path_and_query().map_or_else(|| request.uri().path(), |p| p.as_str());
    let call = format!("{} {}", request.method(), crate::config::excerpt(target));
    if mutation && let Err(message) = auth::check_host_origin(request.headers(), guard.listen, guard.scheme) {
        let who = client_cert.clone().map_or(Who::Anonymous, Who::Cert);
        auth::audit(&peer, &who, &call, "", StatusCode::FORBIDDEN.as_str());
        return ApiError(Status::permission_denied(message)).into_response();
    }
    match guard.auth.check(request.headers(), need, &call, client_cert.as_deref()) {
        Err(refusal) => {
            if mutation || refusal.status.code() == Code::Unauthenticated {
                auth::audit(&peer, &refusal.who, &call, "", http_status(refusal.status.code()).0.as_str());
            }
            ApiError(refusal.status).into_response()
        }
        Ok(who) => {
            let (response, args) = auth::audited(next.run(request)).await;
            if mutation {
                let status = response.status();
                auth::audit(&peer, &who, &call, &args, if status.is_success() { "ok" } else { status.as_str() });
            }
            response
        }
    }
}

/// What every handler may use.
#[derive(Clone)]
struct HttpState {
    api: ControlApi,
    lifecycle: Lifecycle,
    metrics: Arc<metrics::Metrics>,
    /// Becomes `true` when the server stops: SSE streams end then.
    stopped: watch::Receiver<bool>,
}

fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(status_page::serve))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::scrape))
        .route("/v1/openapi.json", get(openapi::serve))
        .merge(api::routes())
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// An error answer: `{"code": "NOT_FOUND", "message": "no listener 7"}`
/// with the HTTP status of its gRPC code.
#[derive(Debug)]
pub(crate) struct ApiError(Status);

impl From<Status> for ApiError {
    fn from(status: Status) -> ApiError {
        ApiError(status)
    }
}

impl ApiError {
    fn invalid_argument(message: impl Into<String>) -> ApiError {
        ApiError(Status::invalid_argument(message))
    }

    /// The JSON body of a status.
    fn body(status: &Status) -> serde_json::Value {
        serde_json::json!({ "code": http_status(status.code()).1, "message": status.message() })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (http, _) = http_status(self.0.code());
        (http, json_body(&ApiError::body(&self.0))).into_response()
    }
}

/// The HTTP status of a gRPC code, and the code's name for the body. The
/// codes and what they mean follow tonic's `Code` (and google.rpc.Code);
/// the statuses are gRPC-gateway's, except FAILED_PRECONDITION, which is
/// 412 here so that a client can tell it from a malformed request.
pub(crate) fn http_status(code: Code) -> (StatusCode, &'static str) {
    match code {
        Code::Ok => (StatusCode::OK, "OK"),
        Code::Cancelled => (StatusCode::from_u16(499).expect("a valid status"), "CANCELLED"),
        Code::Unknown => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "DEADLINE_EXCEEDED"),
        Code::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        Code::AlreadyExists => (StatusCode::CONFLICT, "ALREADY_EXISTS"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED"),
        Code::FailedPrecondition => (StatusCode::PRECONDITION_FAILED, "FAILED_PRECONDITION"),
        Code::Aborted => (StatusCode::CONFLICT, "ABORTED"),
        Code::OutOfRange => (StatusCode::BAD_REQUEST, "OUT_OF_RANGE"),
        Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, "UNIMPLEMENTED"),
        Code::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Code::DataLoss => (StatusCode::INTERNAL_SERVER_ERROR, "DATA_LOSS"),
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
    }
}

/// A JSON body, with its content type.
fn json_body(value: &serde_json::Value) -> Response {
    let bytes = serde_json::to_vec(value).expect("a JSON value serializes");
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response()
}

async fn no_route(request: Request) -> ApiError {
    ApiError(Status::not_found(format!(
        "no such resource: {} {} (see /v1/openapi.json)",
        request.method(),
        crate::config::excerpt(request.uri().path())
    )))
}

async fn method_not_allowed(request: Request) -> Response {
    let status = Status::unimplemented(format!(
        "{} is not allowed on {} (see /v1/openapi.json)",
        request.method(),
        crate::config::excerpt(request.uri().path())
    ));
    (StatusCode::METHOD_NOT_ALLOWED, json_body(&ApiError::body(&status))).into_response()
}

/// The lowercase name of a phase, as the health checks report it.
fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Draining => "draining",
        Phase::Stopped => "stopped",
        Phase::Failed => "failed",
    }
}

/// A health answer: 200 when `healthy`, else 503, with the phase (and why
/// the poll loop died, if it did).
fn health(healthy: bool, lifecycle: &Lifecycle) -> Response {
    let phase = lifecycle.get();
    let mut body = serde_json::json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "phase": phase_name(phase),
    });
    if let Some(died) = lifecycle.failure() {
        body["failure"] = died.reason.into();
    }
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, json_body(&body)).into_response()
}

/// Liveness: the process answers, and its poll loop has not died (after
/// that nothing is served, and a restart is what helps).
async fn healthz(State(state): State<HttpState>) -> Response {
    health(state.lifecycle.get() != Phase::Failed, &state.lifecycle)
}

/// Readiness: the configured listeners are bound and the daemon serves
/// (`Running`); 503 while starting, draining, stopped or failed.
async fn readyz(State(state): State<HttpState>) -> Response {
    health(state.lifecycle.get() == Phase::Running, &state.lifecycle)
}
