//! The `/v1` routes: each builds the gRPC request message from the path,
//! the query and the JSON body, calls the service method that gRPC clients
//! reach, and answers with the reply message in the proto3 JSON mapping.
//! `GET /v1/stats/watch` streams `WatchStats` as Server-Sent Events.
//!
//! Path segments name the resource (`/v1/listeners/{id}`); a body or query
//! that names another one is refused rather than silently overridden.
//! Plugin verbs other than load and unload are custom methods in Google's
//! API style: `POST /v1/plugins/{name}:reload`.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Path, Request, State},
    http::request::Parts,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use prost::{Message, Name};
use tokio_stream::Stream;
use tonic::Status;

use asyncore_engine::command::CommandError;
use asyncore_proto::{
    json,
    v1::{
        self, channels_server::Channels, daemon_server::Daemon as DaemonService, listeners_server::Listeners,
        plugins_server::Plugins,
    },
};

use super::{ApiError, HttpState, json_body};
use crate::{
    config::excerpt,
    grpc::{ControlApi, status},
};

pub(super) fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/listeners", get(list_listeners).post(start_listener))
        .route("/v1/listeners:setLimits", post(set_daemon_limits))
        .route("/v1/listeners/{id}", get(get_listener).post(listener_verb).delete(stop_listener))
        .route("/v1/channels", get(list_channels))
        .route("/v1/channels/{id}", get(get_channel).delete(close_channel))
        .route("/v1/plugins", get(list_plugins).post(load_plugin))
        .route("/v1/plugins/{name}", get(get_plugin).post(plugin_verb).delete(unload_plugin))
        .route("/v1/stats/watch", get(watch_stats))
        .route("/v1/daemon", get(daemon_info))
        .route("/v1/daemon/loop-stats", get(loop_stats))
        .route("/v1/config:reload", post(reload_config))
}

/// A reply message, as JSON.
fn reply<M: Message + Name>(answer: Result<tonic::Response<M>, Status>) -> Result<Response, ApiError> {
    Ok(json_body(&json::to_json(answer?.get_ref())))
}

/// The query string as request message `M` ([`json::from_query`]).
struct Query<M>(M);

impl<S: Send + Sync, M: Message + Name + Default> FromRequestParts<S> for Query<M> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::invalid_argument(format!("invalid query string: {}", e.body_text())))?
            .0;
        json::from_query(&pairs).map(Query).map_err(|e| ApiError::invalid_argument(e.to_string()))
    }
}

/// The JSON body as request message `M`; an empty body is `{}`.
struct Body<M>(M);

impl<S: Send + Sync, M: Message + Name + Default> FromRequest<S> for Body<M> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|e| ApiError::invalid_argument(format!("cannot read the body: {}", e.body_text())))?;
        parse_body(&bytes).map(Body)
    }
}

fn parse_body<M: Message + Name + Default>(bytes: &[u8]) -> Result<M, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    json::from_json(bytes).map_err(|e| ApiError::invalid_argument(e.to_string()))
}

/// The one path parameter of a route, percent-decoded.
struct Segment(String);

impl<S: Send + Sync> FromRequestParts<S> for Segment {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(segment) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid_argument(format!("invalid path: {}", e.body_text())))?;
        Ok(Segment(segment))
    }
}

/// A listener or channel id from the path.
fn parse_id(what: &str, text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| ApiError::invalid_argument(format!("{what} id {:?} is not a number", excerpt(text))))
}

/// Puts the path's value in a request field the body or query may also
/// have set: refused when they differ.
fn from_path<T: PartialEq + Default + std::fmt::Debug>(field: &str, path: T, given: &mut T) -> Result<(), ApiError> {
    if *given != T::default() && *given != path {
        return Err(ApiError::invalid_argument(format!(
            "{field} {given:?} in the request differs from {path:?} in the path; give it once"
        )));
    }
    *given = path;
    Ok(())
}

fn request<M>(message: M) -> tonic::Request<M> {
    tonic::Request::new(message)
}

async fn list_listeners(
    State(state): State<HttpState>,
    Query(query): Query<v1::ListListenersRequest>,
) -> Result<Response, ApiError> {
    reply(Listeners::list_listeners(&state.api, request(query)).await)
}

async fn start_listener(
    State(state): State<HttpState>,
    Body(body): Body<v1::StartListenerRequest>,
) -> Result<Response, ApiError> {
    reply(Listeners::start_listener(&state.api, request(body)).await)
}

/// `ListListeners` has no single-listener call: a page of one that starts
/// right before the id.
async fn get_listener(State(state): State<HttpState>, Segment(id): Segment) -> Result<Response, ApiError> {
    let id = parse_id("listener", &id)?;
    let page = v1::ListListenersRequest { page_size: 1, page_token: id.saturating_sub(1).to_string() };
    let listener = match id {
        0 => None,
        _ => Listeners::list_listeners(&state.api, request(page)).await?.into_inner().listeners.pop(),
    };
    match listener {
        Some(listener) if listener.id == id => Ok(json_body(&json::to_json(&listener))),
        _ => Err(status(CommandError::NoListener(id)).into()),
    }
}

async fn stop_listener(
    State(state): State<HttpState>,
    Segment(id): Segment,
    Query(mut query): Query<v1::StopListenerRequest>,
) -> Result<Response, ApiError> {
    from_path("id", parse_id("listener", &id)?, &mut query.id)?;
    reply(Listeners::stop_listener(&state.api, request(query)).await)
}

/// `POST /v1/listeners:setLimits`: the daemon's limits over every
/// listener.
async fn set_daemon_limits(
    State(state): State<HttpState>,
    Body(body): Body<v1::SetDaemonLimitsRequest>,
) -> Result<Response, ApiError> {
    reply(Listeners::set_daemon_limits(&state.api, request(body)).await)
}

/// `POST /v1/listeners/{id}:suspend`, `:resume`, `:drain` and
/// `:setLimits`, with the rest of the RPC's request as the body.
async fn listener_verb(
    State(state): State<HttpState>,
    Segment(target): Segment,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some((id, verb)) = target.rsplit_once(':') else {
        return Err(ApiError(Status::not_found(format!(
            "POST /v1/listeners/{0} needs a verb: {0}:suspend, {0}:resume, {0}:drain or {0}:setLimits \
             (see /v1/openapi.json)",
            excerpt(&target)
        ))));
    };
    let id = parse_id("listener", id)?;
    match verb {
        "suspend" => {
            let mut body: v1::SuspendListenerRequest = parse_body(&body)?;
            from_path("id", id, &mut body.id)?;
            reply(Listeners::suspend_listener(&state.api, request(body)).await)
        }
        "resume" => {
            let mut body: v1::ResumeListenerRequest = parse_body(&body)?;
            from_path("id", id, &mut body.id)?;
            reply(Listeners::resume_listener(&state.api, request(body)).await)
        }
        "drain" => {
            let mut body: v1::DrainListenerRequest = parse_body(&body)?;
            from_path("id", id, &mut body.id)?;
            reply(Listeners::drain_listener(&state.api, request(body)).await)
        }
        "setLimits" => {
            let mut body: v1::SetListenerLimitsRequest = parse_body(&body)?;
            from_path("id", id, &mut body.id)?;
            reply(Listeners::set_listener_limits(&state.api, request(body)).await)
        }
        verb => Err(ApiError(Status::not_found(format!(
            "listeners have no verb {:?}: use suspend, resume, drain or setLimits",
            excerpt(verb)
        )))),
    }
}

async fn list_channels(
    State(state): State<HttpState>,
    Query(query): Query<v1::ListChannelsRequest>,
) -> Result<Response, ApiError> {
    reply(Channels::list_channels(&state.api, request(query)).await)
}

async fn get_channel(
    State(state): State<HttpState>,
    Segment(id): Segment,
    Query(mut query): Query<v1::GetChannelRequest>,
) -> Result<Response, ApiError> {
    from_path("id", parse_id("channel", &id)?, &mut query.id)?;
    reply(Channels::get_channel(&state.api, request(query)).await)
}

async fn close_channel(
    State(state): State<HttpState>,
    Segment(id): Segment,
    Query(mut query): Query<v1::CloseChannelRequest>,
) -> Result<Response, ApiError> {
    from_path("id", parse_id("channel", &id)?, &mut query.id)?;
    reply(Channels::close_channel(&state.api, request(query)).await)
}

async fn list_plugins(
    State(state): State<HttpState>,
    Query(query): Query<v1::ListPluginsRequest>,
) -> Result<Response, ApiError> {
    reply(Plugins::list_plugins(&state.api, request(query)).await)
}

async fn load_plugin(
    State(state): State<HttpState>,
    Body(body): Body<v1::LoadPluginRequest>,
) -> Result<Response, ApiError> {
    reply(Plugins::load_plugin(&state.api, request(body)).await)
}

/// `ListPlugins` has no single-plugin call: the list of the one name.
async fn get_plugin(State(state): State<HttpState>, Segment(name): Segment) -> Result<Response, ApiError> {
    let page = v1::ListPluginsRequest { name: name.clone(), ..v1::ListPluginsRequest::default() };
    match Plugins::list_plugins(&state.api, request(page)).await?.into_inner().plugins.pop() {
        Some(plugin) if plugin.name == name => Ok(json_body(&json::to_json(&plugin))),
        _ => Err(status(CommandError::NoPlugin(name)).into()),
    }
}

/// `POST /v1/plugins/{name}:reload`, `:activate` and `:unload`, with the
/// rest of the RPC's request as the body.
async fn plugin_verb(
    State(state): State<HttpState>,
    Segment(target): Segment,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some((name, verb)) = target.rsplit_once(':') else {
        return Err(ApiError(Status::not_found(format!(
            "POST /v1/plugins/{0} needs a verb: {0}:reload, {0}:activate or {0}:unload (see /v1/openapi.json)",
            excerpt(&target)
        ))));
    };
    let name = name.to_string();
    match verb {
        "reload" => {
            let mut body: v1::ReloadPluginRequest = parse_body(&body)?;
            from_path("name", name, &mut body.name)?;
            reply(Plugins::reload_plugin(&state.api, request(body)).await)
        }
        "activate" => {
            let mut body: v1::ActivatePluginRequest = parse_body(&body)?;
            from_path("name", name, &mut body.name)?;
            reply(Plugins::activate_plugin(&state.api, request(body)).await)
        }
        "unload" => {
            let mut body: v1::UnloadPluginRequest = parse_body(&body)?;
            from_path("name", name, &mut body.name)?;
            reply(Plugins::unload_plugin(&state.api, request(body)).await)
        }
        verb => Err(ApiError(Status::not_found(format!(
            "plugins have no verb {:?}: use reload, activate or unload",
            excerpt(verb)
        )))),
    }
}

async fn unload_plugin(
    State(state): State<HttpState>,
    Segment(name): Segment,
    Query(mut query): Query<v1::UnloadPluginRequest>,
) -> Result<Response, ApiError> {
    from_path("name", name, &mut query.name)?;
    reply(Plugins::unload_plugin(&state.api, request(query)).await)
}

async fn daemon_info(
    State(state): State<HttpState>,
    Query(query): Query<v1::GetDaemonInfoRequest>,
) -> Result<Response, ApiError> {
    reply(DaemonService::get_daemon_info(&state.api, request(query)).await)
}

async fn loop_stats(
    State(state): State<HttpState>,
    Query(query): Query<v1::GetLoopStatsRequest>,
) -> Result<Response, ApiError> {
    reply(DaemonService::get_loop_stats(&state.api, request(query)).await)
}

async fn reload_config(
    State(state): State<HttpState>,
    Body(body): Body<v1::ReloadConfigRequest>,
) -> Result<Response, ApiError> {
    reply(DaemonService::reload_config(&state.api, request(body)).await)
}

/// `WatchStats` as Server-Sent Events: one event per `StatsUpdate` (its
/// `seq` as the event id, the message as JSON data); an error that ends
/// the stream comes as an `error` event with the error body. Comments keep
/// an idle connection open through proxies.
async fn watch_stats(
    State(state): State<HttpState>,
    Query(query): Query<v1::WatchStatsRequest>,
) -> Result<Response, ApiError> {
    let updates = Channels::watch_stats(&state.api, request(query)).await?.into_inner();
    let mut stopped = state.stopped.clone();
    let events = StatsEvents {
        updates,
        stopped: Box::pin(async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }),
        done: false,
    };
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

/// The events of one stream: it ends after an error (a gRPC stream ends
/// with its status; the feed would only go quiet) and when the server
/// stops. Dropping it drops the gRPC stream, and with it its slot.
struct StatsEvents {
    updates: <ControlApi as Channels>::WatchStatsStream,
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
    done: bool,
}

impl Stream for StatsEvents {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done || this.stopped.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(None);
        }
        match this.updates.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(update))) => {
                let data = serde_json::to_string(&json::to_json(&update)).expect("a JSON value serializes");
                Poll::Ready(Some(Ok(Event::default().id(update.seq.to_string()).data(data))))
            }
            Poll::Ready(Some(Err(status))) => {
                this.done = true;
                let data = serde_json::to_string(&ApiError::body(&status)).expect("a JSON value serializes");
                Poll::Ready(Some(Ok(Event::default().event("error").data(data))))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
