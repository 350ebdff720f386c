//! `GET /v1/openapi.json`: an OpenAPI 3.0 document of the HTTP API.
//!
//! The operations are listed here, next to the routes they describe; what
//! they carry comes from `control.proto`: the schemas of the messages
//! ([`json::schemas`]), their query parameters ([`json::query_parameters`])
//! and the RPCs' comments as descriptions. So the gRPC API and this one are
//! described by one document, and `tests/tests/it/http_api_openapi.rs`
//! checks every operation here against the daemon's real answers.

use std::sync::OnceLock;

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use asyncore_proto::json;

/// What an operation answers with.
#[derive(Clone, Copy)]
enum Answer {
    /// A message, as JSON.
    Message(&'static str),
    /// Server-Sent Events whose data are this message, as JSON.
    Events(&'static str),
    /// The health body.
    Health,
    /// The Prometheus text format.
    Metrics,
    /// This document.
    Document,
}

/// Where a request's message comes from.
#[derive(Clone, Copy)]
enum Input {
    None,
    /// The query string sets fields of this message.
    Query(&'static str),
    /// The JSON body is this message.
    Body(&'static str),
}

struct Operation {
    method: &'static str,
    path: &'static str,
    /// The RPC it calls, for its description.
    rpc: Option<&'static str>,
    summary: &'static str,
    /// Path parameters: name and what it is.
    path_parameters: &'static [(&'static str, &'static str)],
    input: Input,
    answer: Answer,
}

const ID: &[(&str, &str)] = &[("id", "uint64")];
const NAME: &[(&str, &str)] = &[("name", "string")];

const OPERATIONS: &[Operation] = &[
    Operation {
        method: "get",
        path: "/v1/listeners",
        rpc: Some("asyncore.v1.Listeners.ListListeners"),
        summary: "List listeners",
        path_parameters: &[],
        input: Input::Query("asyncore.v1.ListListenersRequest"),
        answer: Answer::Message("asyncore.v1.ListListenersResponse"),
    },
    Operation {
        method: "post",
        path: "/v1/listeners",
        rpc: Some("asyncore.v1.Listeners.StartListener"),
        summary: "Start a listener",
        path_parameters: &[],
        input: Input::Body("asyncore.v1.StartListenerRequest"),
        answer: Answer::Message("asyncore.v1.Listener"),
    },
    Operation {
        method: "get",
        path: "/v1/listeners/{id}",
        rpc: None,
        summary: "Get one listener (running, or among the most recently stopped)",
        path_parameters: ID,
        input: Input::None,
        answer: Answer::Message("asyncore.v1.Listener"),
    },
    Operation {
        method: "delete",
        path: "/v1/listeners/{id}",
        rpc: Some("asyncore.v1.Listeners.StopListener"),
        summary: "Stop a listener (close_channels=true also closes its channels gracefully)",
        path_parameters: ID,
        input: Input::Query("asyncore.v1.StopListenerRequest"),
        answer: Answer::Message("asyncore.v1.Listener"),
    },
    Operation {
        method: "post",
        path: "/v1/listeners:setLimits",
        rpc: Some("asyncore.v1.Listeners.SetDaemonLimits"),
        summary: "Change (or, with an empty body, read) the daemon's max_connections over every listener",
        path_parameters: &[],
        input: Input::Body("asyncore.v1.SetDaemonLimitsRequest"),
        answer: Answer::Message("asyncore.v1.DaemonLimits"),
    },
    Operation {
        method: "post",
        path: "/v1/listeners/{id}:suspend",
        rpc: Some("asyncore.v1.Listeners.SuspendListener"),
        summary: "Stop accepting, keeping the listening socket (connections wait in the backlog)",
        path_parameters: ID,
        input: Input::Body("asyncore.v1.SuspendListenerRequest"),
        answer: Answer::Message("asyncore.v1.Listener"),
    },
    Operation {
        method: "post",
        path: "/v1/listeners/{id}:resume",
        rpc: Some("asyncore.v1.Listeners.ResumeListener"),
        summary: "Accept again after a suspend",
        path_parameters: ID,
        input: Input::Body("asyncore.v1.ResumeListenerRequest"),
        answer: Answer::Message("asyncore.v1.Listener"),
    },
    Operation {
        method: "post",
        path: "/v1/listeners/{id}:drain",
        rpc: Some("asyncore.v1.Listeners.DrainListener"),
        summary: "Stop a listener and answer once its channels have finished (the rest closed gracefully at drain_timeout_ms)",
        path_parameters: ID,
        input: Input::Body("asyncore.v1.DrainListenerRequest"),
        answer: Answer::Message("asyncore.v1.Listener"),
    },
    Operation {
        method: "post",
        path: "/v1/listeners/{id}:setLimits",
        rpc: Some("asyncore.v1.Listeners.SetListenerLimits"),
        summary: "Change a running listener's max_connections",
        path_parameters: ID,
        input: Input::Body("asyncore.v1.SetListenerLimitsRequest"),
        answer: Answer::Message("asyncore.v1.Listener"),
    },
    Operation {
        method: "get",
        path: "/v1/channels",
        rpc: Some("asyncore.v1.Channels.ListChannels"),
        summary: "List channels",
        path_parameters: &[],
        input: Input::Query("asyncore.v1.ListChannelsRequest"),
        answer: Answer::Message("asyncore.v1.ListChannelsResponse"),
    },
    Operation {
        method: "get",
        path: "/v1/channels/{id}",
        rpc: Some("asyncore.v1.Channels.GetChannel"),
        summary: "Get one channel",
        path_parameters: ID,
        input: Input::None,
        answer: Answer::Message("asyncore.v1.Channel"),
    },
    Operation {
        method: "delete",
        path: "/v1/channels/{id}",
        rpc: Some("asyncore.v1.Channels.CloseChannel"),
        summary: "Close a channel gracefully",
        path_parameters: ID,
        input: Input::None,
        answer: Answer::Message("asyncore.v1.Channel"),
    },
    Operation {
        method: "get",
        path: "/v1/stats/watch",
        rpc: Some("asyncore.v1.Channels.WatchStats"),
        summary: "Stream per-channel stats as Server-Sent Events",
        path_parameters: &[],
        input: Input::Query("asyncore.v1.WatchStatsRequest"),
        answer: Answer::Events("asyncore.v1.StatsUpdate"),
    },
    Operation {
        method: "get",
        path: "/v1/plugins",
        rpc: Some("asyncore.v1.Plugins.ListPlugins"),
        summary: "List plugins and their generations, a page at a time",
        path_parameters: &[],
        input: Input::Query("asyncore.v1.ListPluginsRequest"),
        answer: Answer::Message("asyncore.v1.ListPluginsResponse"),
    },
    Operation {
        method: "post",
        path: "/v1/plugins",
        rpc: Some("asyncore.v1.Plugins.LoadPlugin"),
        summary: "Load a plugin library",
        path_parameters: &[],
        input: Input::Body("asyncore.v1.LoadPluginRequest"),
        answer: Answer::Message("asyncore.v1.Plugin"),
    },
    Operation {
        method: "get",
        path: "/v1/plugins/{name}",
        rpc: None,
        summary: "Get one plugin",
        path_parameters: NAME,
        input: Input::None,
        answer: Answer::Message("asyncore.v1.Plugin"),
    },
    Operation {
        method: "delete",
        path: "/v1/plugins/{name}",
        rpc: Some("asyncore.v1.Plugins.UnloadPlugin"),
        summary: "Unload a plugin, or one generation of it",
        path_parameters: NAME,
        input: Input::Query("asyncore.v1.UnloadPluginRequest"),
        answer: Answer::Message("asyncore.v1.Plugin"),
    },
    Operation {
        method: "post",
        path: "/v1/plugins/{name}:reload",
        rpc: Some("asyncore.v1.Plugins.ReloadPlugin"),
        summary: "Reload a plugin as a new, current generation",
        path_parameters: NAME,
        input: Input::Body("asyncore.v1.ReloadPluginRequest"),
        answer: Answer::Message("asyncore.v1.Plugin"),
    },
    Operation {
        method: "post",
        path: "/v1/plugins/{name}:activate",
        rpc: Some("asyncore.v1.Plugins.ActivatePlugin"),
        summary: "Make a loaded generation current (rollback)",
        path_parameters: NAME,
        input: Input::Body("asyncore.v1.ActivatePluginRequest"),
        answer: Answer::Message("asyncore.v1.Plugin"),
    },
    Operation {
        method: "post",
        path: "/v1/plugins/{name}:unload",
        rpc: Some("asyncore.v1.Plugins.UnloadPlugin"),
        summary: "Unload a plugin, or one generation of it (the body of UnloadPlugin)",
        path_parameters: NAME,
        input: Input::Body("asyncore.v1.UnloadPluginRequest"),
        answer: Answer::Message("asyncore.v1.Plugin"),
    },
    Operation {
        method: "get",
        path: "/v1/daemon",
        rpc: Some("asyncore.v1.Daemon.GetDaemonInfo"),
        summary: "The daemon's version, uptime, phase and counts",
        path_parameters: &[],
        input: Input::None,
        answer: Answer::Message("asyncore.v1.DaemonInfo"),
    },
    Operation {
        method: "get",
        path: "/v1/daemon/loop-stats",
        rpc: Some("asyncore.v1.Daemon.GetLoopStats"),
        summary: "Counters of the poll loop",
        path_parameters: &[],
        input: Input::None,
        answer: Answer::Message("asyncore.v1.LoopStats"),
    },
    Operation {
        method: "post",
        path: "/v1/config:reload",
        rpc: Some("asyncore.v1.Daemon.ReloadConfig"),
        summary: "Re-read the config file (as SIGHUP does) and apply the difference in listeners",
        path_parameters: &[],
        input: Input::Body("asyncore.v1.ReloadConfigRequest"),
        answer: Answer::Message("asyncore.v1.ReloadConfigResponse"),
    },
    Operation {
        method: "get",
        path: "/healthz",
        rpc: None,
        summary: "Liveness: 200 unless the poll loop has died",
        path_parameters: &[],
        input: Input::None,
        answer: Answer::Health,
    },
    Operation {
        method: "get",
        path: "/readyz",
        rpc: None,
        summary: "Readiness: 200 once the configured listeners are bound and while the daemon runs; 503 while starting, draining, stopped or failed",
        path_parameters: &[],
        input: Input::None,
        answer: Answer::Health,
    },
    Operation {
        method: "get",
        path: "/metrics",
        rpc: None,
        summary: "Metrics in the Prometheus text format",
        path_parameters: &[],
        input: Input::None,
        answer: Answer::Metrics,
    },
    Operation {
        method: "get",
        path: "/v1/openapi.json",
        rpc: None,
        summary: "This document",
        path_parameters: &[],
        input: Input::None,
        answer: Answer::Document,
    },
];

pub(super) async fn serve() -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], document()).into_response()
}

/// The document, built once.
fn document() -> &'static [u8] {
    static DOCUMENT: OnceLock<Vec<u8>> = OnceLock::new();
    DOCUMENT.get_or_init(|| serde_json::to_vec_pretty(&build()).expect("a JSON value serializes"))
}

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn build() -> Value {
    let mut responses = Vec::new();
    let mut requests = Vec::new();
    for operation in OPERATIONS {
        match operation.answer {
            Answer::Message(name) | Answer::Events(name) => responses.push(name),
            _ => {}
        }
        match operation.input {
            Input::Query(name) | Input::Body(name) => requests.push(name),
            Input::None => {}
        }
    }
    let mut schemas = json::schemas(&responses, &requests);
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "description": "Every error. `code` is the gRPC status code's name, which the HTTP status follows: INVALID_ARGUMENT 400, PERMISSION_DENIED 403, NOT_FOUND 404, ALREADY_EXISTS 409, FAILED_PRECONDITION 412, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, INTERNAL 500. `message` is the gRPC status message, word for word.",
            "properties": {
                "code": { "type": "string", "example": "NOT_FOUND" },
                "message": { "type": "string", "example": "no listener 7" },
            },
            "required": ["code", "message"],
        }),
    );
    schemas.insert(
        "Health".into(),
        json!({
            "type": "object",
            "properties": {
                "status": { "type": "string", "enum": ["ok", "unavailable"] },
                "phase": { "type": "string", "enum": ["starting", "running", "draining", "stopped", "failed"] },
                "failure": { "type": "string", "description": "Why the poll loop died, once it has." },
            },
            "required": ["status", "phase"],
        }),
    );

    let mut paths = Map::new();
    for operation in OPERATIONS {
        let item = paths.entry(operation.path).or_insert_with(|| json!({}));
        item[operation.method] = operation_object(operation);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "asyncored HTTP API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The operations of the asyncored gRPC API (package asyncore.v1) as HTTP/JSON, in the proto3 JSON mapping (lowerCamelCase fields on output, either spelling on input; 64-bit integers as strings; enums by name; timestamps in RFC 3339), with health checks and Prometheus metrics.",
        },
        "paths": paths,
        "components": { "schemas": schemas },
    })
}

fn operation_object(operation: &Operation) -> Value {
    let mut object = Map::new();
    object.insert("summary".into(), operation.summary.into());
    if let Some(text) = operation.rpc.and_then(json::description) {
        object.insert("description".into(), format!("{text}\n\ngRPC: {}", operation.rpc.unwrap_or_default()).into());
    }
    let mut parameters: Vec<Value> = operation
        .path_parameters
        .iter()
        .map(|(name, kind)| {
            let schema = match *kind {
                "uint64" => json!({ "type": "string", "format": "uint64", "pattern": "^[0-9]+$" }),
                _ => json!({ "type": "string" }),
            };
            json!({ "name": name, "in": "path", "required": true, "schema": schema })
        })
        .collect();
    match operation.input {
        Input::Query(message) => {
            let path_names: Vec<&str> = operation.path_parameters.iter().map(|(name, _)| *name).collect();
            parameters.extend(json::query_parameters(message, &path_names));
        }
        Input::Body(message) => {
            object.insert(
                "requestBody".into(),
                json!({
                    "required": false,
                    "description": "The RPC's request message; fields the path gives may be left out.",
                    "content": { "application/json": { "schema": reference(message) } },
                }),
            );
        }
        Input::None => {}
    }
    if !parameters.is_empty() {
        object.insert("parameters".into(), parameters.into());
    }
    let ok = match operation.answer {
        Answer::Message(name) => json!({
            "description": "The reply message.",
            "content": { "application/json": { "schema": reference(name) } },
        }),
        Answer::Events(name) => json!({
            "description": format!("Server-Sent Events: each event's data is a {name} as JSON, its id the message's seq; an error that ends the stream is an `error` event whose data is an Error."),
            "content": { "text/event-stream": { "schema": { "type": "string" } } },
            "x-event-data": reference(name),
        }),
        Answer::Health => json!({
            "description": "Healthy.",
            "content": { "application/json": { "schema": reference("Health") } },
        }),
        Answer::Metrics => json!({
            "description": "The Prometheus text format, version 0.0.4.",
            "content": { "text/plain": { "schema": { "type": "string" } } },
        }),
        Answer::Document => json!({
            "description": "An OpenAPI 3.0 document.",
            "content": { "application/json": { "schema": { "type": "object" } } },
        }),
    };
    let error = match operation.answer {
        Answer::Health => json!({
            "description": "Not healthy (or not ready).",
            "content": { "application/json": { "schema": reference("Health") } },
        }),
        _ => json!({
            "description": "An error, with the HTTP status of its gRPC code.",
            "content": { "application/json": { "schema": reference("Error") } },
        }),
    };
    let mut responses = Map::new();
    responses.insert("200".into(), ok);
    responses.insert(if matches!(operation.answer, Answer::Health) { "503" } else { "default" }.into(), error);
    object.insert("responses".into(), responses.into());
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves() {
        let document = build();
        let schemas = document["components"]["schemas"].as_object().unwrap();
        let text = serde_json::to_string(&document).unwrap();
        for reference in text.split("\"#/components/schemas/").skip(1) {
            let name = &reference[..reference.find('"').unwrap()];
            assert!(schemas.contains_key(name), "{name} is referred to but not defined");
        }
        let stop = &document["paths"]["/v1/listeners/{id}"]["delete"];
        let names: Vec<&str> =
            stop["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["id", "close_channels", "drain_timeout_ms"]);
    }
}
