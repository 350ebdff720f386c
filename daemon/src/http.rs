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
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Code, Status};

use asyncore_engine::command::EngineHandle;

use crate::{
    grpc::{ControlApi, Incoming},
    lifecycle::{Lifecycle, Phase},
};

/// How long stopping waits for requests under way (an SSE stream ends at
/// once) before the server task is cancelled.
const STOP_PATIENCE: Duration = Duration::from_secs(5);

/// The HTTP server of a daemon. Dropping it stops it: the listening socket
/// closes at the runtime's next turn, and open connections finish the
/// request they serve.
#[derive(Debug)]
pub(crate) struct HttpServer {
    address: SocketAddr,
    /// `true` (or dropped) stops the server and ends the SSE streams.
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The HTTP API's port, bound.
#[derive(Debug)]
pub(crate) struct Bound {
    listener: tokio::net::TcpListener,
    address: SocketAddr,
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
    Ok(Bound { listener, address })
}

impl HttpServer {
    /// Serves the API on `listener`, on the current runtime, until stopped.
    /// `api` is the gRPC API's own (so streams count against one limit).
    pub(crate) fn spawn(bound: Bound, api: ControlApi, engine: EngineHandle, lifecycle: Lifecycle) -> HttpServer {
        let Bound { listener, address } = bound;
        let (stop, stopped) = watch::channel(false);
        let state =
            HttpState { api, lifecycle, metrics: Arc::new(metrics::Metrics::new(engine)), stopped: stopped.clone() };
        let app = router(state);
        let incoming = Accept { incoming: Incoming::new(listener), address };
        let task = tokio::spawn(async move {
            let mut stopped = stopped;
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            // Never fails: accept errors are retried after a pause.
            let _ = axum::serve(incoming, app).with_graceful_shutdown(shutdown).await;
        });
        tracing::info!(address = %address, "http api listening");
        HttpServer { address, stop, task }
    }

    /// The bound address.
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
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

/// The control API's accept stream as an axum listener.
struct Accept<S> {
    incoming: S,
    address: SocketAddr,
}

impl<S, T> axum::serve::Listener for Accept<S>
where
    S: Stream<Item = std::io::Result<T>> + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Io = T;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (T, SocketAddr) {
        loop {
            // The stream pauses after a failed accept itself, and never
            // ends while its listener is open.
            match self.incoming.next().await {
                Some(Ok(stream)) => return (stream, self.address),
                Some(Err(_)) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.address)
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
