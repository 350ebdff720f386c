//! The HTTP/JSON API (`--http`): every resource over a real HTTP client
//! against a real daemon, the same data and the same errors as gRPC for
//! the same state, the stats as Server-Sent Events, health and readiness
//! (with a SIGTERM drain on the binary), and `--http none`. `/metrics` is in
//! `http_api_metrics`, the OpenAPI document in `http_api_openapi`.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::Duration,
};

use asyncore_proto::{json::to_json, v1};
use asyncore_tests::{
    Daemon, InProcessDaemon, Options, TempDir, binary, connect, eventually, output_within, patience, within,
};
use serde_json::{Value, json};

use crate::runtime;

/// A plain-HTTP client of one daemon; every request times out after the
/// patience.
pub(crate) struct Http {
    client: reqwest::Client,
    base: String,
}

/// An answer: status, content type and body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    #[track_caller]
    pub(crate) fn json(&self) -> Value {
        assert_eq!(self.content_type, "application/json", "content type of {}", self.text());
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The JSON body of a 200 answer.
    #[track_caller]
    pub(crate) fn ok(&self) -> Value {
        assert_eq!(self.status, 200, "{}", self.text());
        self.json()
    }

    /// The message of an error answer with this status and code.
    #[track_caller]
    pub(crate) fn error(&self, status: u16, code: &str) -> String {
        let body = self.json();
        assert_eq!((self.status, body["code"].as_str()), (status, Some(code)), "{body}");
        assert_eq!(body.as_object().unwrap().len(), 2, "only code and message: {body}");
        body["message"].as_str().expect("a message").to_string()
    }

    /// An error answer that says what `grpc` says: the HTTP status of its
    /// code (as the API promises it), the code's name, the same message.
    #[track_caller]
    pub(crate) fn same_error_as(&self, grpc: &tonic::Status) {
        let (status, code) = match grpc.code() {
            tonic::Code::InvalidArgument => (400, "INVALID_ARGUMENT"),
            tonic::Code::PermissionDenied => (403, "PERMISSION_DENIED"),
            tonic::Code::NotFound => (404, "NOT_FOUND"),
            tonic::Code::AlreadyExists => (409, "ALREADY_EXISTS"),
            tonic::Code::FailedPrecondition => (412, "FAILED_PRECONDITION"),
            tonic::Code::ResourceExhausted => (429, "RESOURCE_EXHAUSTED"),
            tonic::Code::Unavailable => (503, "UNAVAILABLE"),
            other => panic!("no HTTP status promised for {other:?}"),
        };
        assert_eq!(self.error(status, code), grpc.message());
    }
}

impl Http {
    pub(crate) fn new(address: SocketAddr) -> Http {
        let client =
            reqwest::Client::builder().timeout(patience()).connect_timeout(patience()).build().expect("an HTTP client");
        Http { client, base: format!("http://{address}") }
    }

    /// The HTTP API of an in-process daemon.
    pub(crate) fn of(daemon: &InProcessDaemon) -> Http {
        Http::new(daemon.daemon().http_addr().expect("the harness turns the HTTP API on"))
    }

    /// Starts a request; the caller reads the body.
    pub(crate) async fn send(&self, method: &str, path: &str, body: Option<String>) -> reqwest::Response {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.client.request(method.clone(), format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        within(format!("{method} {path}"), request.send()).await.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub(crate) async fn call(&self, method: &str, path: &str, body: Option<String>) -> Answer {
        let response = self.send(method, path, body).await;
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let body = within(format!("the body of {method} {path}"), response.bytes()).await.unwrap().to_vec();
        Answer { status, content_type, body }
    }

    pub(crate) async fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None).await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Answer {
        self.call("POST", path, Some(body.to_string())).await
    }

    pub(crate) async fn delete(&self, path: &str) -> Answer {
        self.call("DELETE", path, None).await
    }
}

/// Reads Server-Sent Events from a streaming response.
pub(crate) struct Events {
    response: reqwest::Response,
    buffer: String,
}

/// One event: its `event` name (empty for the default), id and data.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) name: String,
    pub(crate) id: String,
    pub(crate) data: String,
}

impl Events {
    pub(crate) fn new(response: reqwest::Response) -> Events {
        Events { response, buffer: String::new() }
    }

    /// The next event (comments, the keep-alives, are skipped), within the
    /// patience; `None` when the stream ends.
    pub(crate) async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event { name: String::new(), id: String::new(), data: String::new() };
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("data:") {
                        event.data.push_str(value.trim_start());
                    } else if let Some(value) = line.strip_prefix("id:") {
                        event.id = value.trim().to_string();
                    } else if let Some(value) = line.strip_prefix("event:") {
                        event.name = value.trim().to_string();
                    }
                }
                if event.data.is_empty() && event.name.is_empty() {
                    continue;
                }
                return Some(event);
            }
            let chunk = within("the next chunk of an event stream", self.response.chunk()).await.expect("read");
            self.buffer.push_str(std::str::from_utf8(&chunk?).expect("UTF-8 events"));
        }
    }
}

/// Echoes `bytes` through a fresh connection to `address` and returns it.
fn echo_client(address: SocketAddr, bytes: &[u8]) -> std::net::TcpStream {
    let mut stream = connect(address);
    stream.write_all(bytes).unwrap();
    let mut back = vec![0; bytes.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, bytes);
    stream
}

#[test]
fn http_lists_the_same_listeners_as_grpc_in_the_proto3_json_mapping() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let http = Http::of(&daemon);
        let mut client = daemon.client().await;
        let (grpc_id, _) = client.start_listener("echo", &[("high_water", "65536")]).await;
        let started = http
            .post(
                "/v1/listeners",
                json!({ "address": "127.0.0.1:0", "plugin": "echo", "config": { "idle_timeout": "30s" } }),
            )
            .await
            .ok();
        assert_eq!(started["plugin"], "echo");
        assert_eq!(started["state"], "LISTENER_STATE_LISTENING");
        let address: SocketAddr = started["address"].as_str().unwrap().parse().unwrap();
        assert_ne!(address.port(), 0, "the reply carries the bound port");

        let over_http = http.get("/v1/listeners").await.ok();
        let over_grpc =
            client.listeners.list_listeners(v1::ListListenersRequest::default()).await.unwrap().into_inner();
        assert_eq!(over_http, to_json(&over_grpc), "the same listeners, the same JSON");

        // The canonical mapping, field by field: 64-bit integers as
        // strings, enums by name, RFC 3339 times, every field present.
        let first = &over_http["listeners"][0];
        assert_eq!(first["id"], json!(grpc_id.to_string()));
        assert_eq!(first["config"], json!({ "high_water": "65536" }));
        assert_eq!(first["channelCount"], "0");
        assert_eq!(first["pluginGeneration"], 1);
        assert!(first["createdAt"].as_str().unwrap().ends_with('Z'), "{first}");
        assert_eq!(over_http["listeners"][1]["config"], json!({ "idle_timeout": "30s" }));
        assert_eq!(over_http["nextPageToken"], "");

        assert_eq!(&http.get(&format!("/v1/listeners/{grpc_id}")).await.ok(), first);
        let page = http.get("/v1/listeners?page_size=1").await.ok();
        assert_eq!(page["listeners"].as_array().unwrap().len(), 1);
        assert_eq!(page["nextPageToken"], json!(grpc_id.to_string()));
        let rest = http.get(&format!("/v1/listeners?pageToken={grpc_id}")).await.ok();
        assert_eq!(rest["listeners"][0], started, "camelCase parameters work too");
    });
}

#[test]
fn listeners_start_stop_and_fail_as_over_grpc() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let http = Http::of(&daemon);
        let mut client = daemon.client().await;
        let (id, address) = client.start_listener("echo", &[]).await;
        let mut peer = echo_client(address, b"before the stop");

        // The same bad requests through both APIs: the same code, the same
        // message.
        for (address, plugin) in [
            ("127.0.0.1:99999", "echo"),
            ("", "echo"),
            (&*address.to_string(), "echo"),
            ("127.0.0.1:0", "nope"),
            ("127.0.0.1:0", ""),
        ] {
            let request =
                v1::StartListenerRequest { address: address.into(), plugin: plugin.into(), config: [].into() };
            let grpc = client.listeners.start_listener(request.clone()).await.expect_err("refused");
            http.post("/v1/listeners", to_json(&request)).await.same_error_as(&grpc);
        }
        let too_big = json!({ "address": "127.0.0.1:0", "plugin": "echo", "config": { "motd": "x".repeat(5000) } });
        assert!(http.post("/v1/listeners", too_big).await.error(400, "INVALID_ARGUMENT").contains("4096"));
        let typo = http.post("/v1/listeners", json!({ "adress": "127.0.0.1:0" })).await;
        assert!(typo.error(400, "INVALID_ARGUMENT").contains("adress"));
        let not_json = http.call("POST", "/v1/listeners", Some("address=127.0.0.1:0".into())).await;
        assert!(not_json.error(400, "INVALID_ARGUMENT").contains("StartListenerRequest"));

        assert_eq!(http.get("/v1/listeners/999").await.error(404, "NOT_FOUND"), "no listener 999");
        assert!(http.get("/v1/listeners/one").await.error(400, "INVALID_ARGUMENT").contains("\"one\""));
        let grpc = client
            .listeners
            .list_listeners(v1::ListListenersRequest { page_token: "x".into(), ..Default::default() })
            .await
            .expect_err("bad token");
        http.get("/v1/listeners?page_token=x").await.same_error_as(&grpc);
        assert!(http.get("/v1/listeners?bogus=1").await.error(400, "INVALID_ARGUMENT").contains("bogus"));
        assert!(http.get("/v1/listeners?page_size=-1").await.error(400, "INVALID_ARGUMENT").contains("page_size"));

        let stopped = http.delete(&format!("/v1/listeners/{id}?close_channels=true")).await.ok();
        assert_eq!(stopped["state"], "LISTENER_STATE_STOPPED");
        assert_eq!(stopped["channelId"], "0");
        // close_channels closed the peer's channel gracefully: EOF.
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        let grpc = client
            .listeners
            .stop_listener(v1::StopListenerRequest { id, close_channels: false, drain_timeout_ms: None })
            .await
            .expect_err("already stopped");
        http.delete(&format!("/v1/listeners/{id}")).await.same_error_as(&grpc);
        assert!(http.delete(&format!("/v1/listeners/{id}?id=7")).await.error(400, "INVALID_ARGUMENT").contains("path"));
    });
}

#[test]
fn channels_list_get_and_close_over_http() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let http = Http::of(&daemon);
        let mut client = daemon.client().await;
        let (listener_id, address) = client.start_listener("echo", &[]).await;
        let mut first = echo_client(address, b"hello");
        let second = echo_client(address, b"hello, again");
        let channel = client.channel_by_peer(listener_id, first.local_addr().unwrap()).await;
        // Wait for the second too, so that the list is settled.
        let peer = second.local_addr().unwrap();
        client.channel_by_peer(listener_id, peer).await;

        let list = http.get(&format!("/v1/channels?listener_id={listener_id}")).await.ok();
        let grpc = client
            .channels
            .list_channels(v1::ListChannelsRequest { listener_id: Some(listener_id), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list, to_json(&grpc));
        assert_eq!(list["channels"].as_array().unwrap().len(), 3, "the listening channel and two peers: {list}");
        assert_eq!(list["channels"][0]["kind"], "CHANNEL_KIND_LISTENING");
        let listening = list["channels"][0]["id"].as_str().unwrap().to_string();

        let one = http.get(&format!("/v1/channels/{}", channel.id)).await.ok();
        let grpc = client.channels.get_channel(v1::GetChannelRequest { id: channel.id }).await.unwrap().into_inner();
        assert_eq!(one, to_json(&grpc));
        assert_eq!(one["bytesIn"], "5");
        assert_eq!(one["kind"], "CHANNEL_KIND_ACCEPTED");
        assert_eq!(one["state"], "CHANNEL_STATE_OPEN");

        let page =
            http.get(&format!("/v1/channels?listener_id={listener_id}&page_size=1&page_token={listening}")).await.ok();
        assert_eq!(page["channels"][0]["id"], json!(channel.id.to_string()));
        assert_eq!(page["nextPageToken"], json!(channel.id.to_string()));
        let rest = http.get(&format!("/v1/channels?listener_id={listener_id}&page_token={}", channel.id)).await.ok();
        assert_eq!(rest["channels"][0]["peerAddress"], json!(peer.to_string()));

        let closed = http.delete(&format!("/v1/channels/{}", channel.id)).await.ok();
        assert_eq!(closed["id"], json!(channel.id.to_string()));
        let mut rest = Vec::new();
        first.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "a graceful close: EOF");
        let gone = eventually!(
            async || {
                let answer = http.get(&format!("/v1/channels/{}", channel.id)).await;
                (answer.status == 404).then_some(answer)
            },
            "channel {} to leave the map",
            channel.id
        )
        .await;
        assert_eq!(gone.error(404, "NOT_FOUND"), format!("no channel {}", channel.id));

        // The listening socket is not closed this way: the listener is.
        let listening: u64 = listening.parse().unwrap();
        let grpc =
            client.channels.close_channel(v1::CloseChannelRequest { id: listening }).await.expect_err("listening");
        http.delete(&format!("/v1/channels/{listening}")).await.same_error_as(&grpc);
        assert!(http.get("/v1/channels?listener_id=two").await.error(400, "INVALID_ARGUMENT").contains("listener_id"));
        assert!(http.get("/v1/channels/x").await.error(400, "INVALID_ARGUMENT").contains("channel id"));
    });
}

#[test]
fn plugins_load_activate_reload_and_unload_over_http() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let http = Http::of(&daemon);
        let mut client = daemon.client().await;
        let library = std::fs::read_dir(daemon.dir().join("plugins")).unwrap().next().unwrap().unwrap().path();

        let list = http.get("/v1/plugins").await.ok();
        let grpc = client.plugins.list_plugins(v1::ListPluginsRequest::default()).await.unwrap().into_inner();
        assert_eq!(list, to_json(&grpc));
        let echo = http.get("/v1/plugins/echo").await.ok();
        assert_eq!(echo, list["plugins"][0]);
        assert_eq!(echo["currentGeneration"], 1);
        assert_eq!(echo["generations"][0]["state"], "GENERATION_STATE_CURRENT");

        let loaded = http.post("/v1/plugins", json!({ "path": library.display().to_string() })).await.ok();
        assert_eq!(loaded["currentGeneration"], 1, "loaded on standby");
        assert_eq!(loaded["generations"][1]["state"], "GENERATION_STATE_STANDBY");
        let activated = http.post("/v1/plugins/echo:activate", json!({ "generation": 2 })).await.ok();
        assert_eq!(activated["currentGeneration"], 2);
        let reloaded = http.post("/v1/plugins/echo:reload", json!({})).await.ok();
        assert_eq!(reloaded["currentGeneration"], 3);
        let reloaded = http.call("POST", "/v1/plugins/echo:reload", None).await.ok();
        assert_eq!(reloaded["currentGeneration"], 4, "an empty body is {{}}");
        let retired = http.delete("/v1/plugins/echo?generation=1").await.ok();
        assert_eq!(retired["generations"][0]["state"], "GENERATION_STATE_RETIRED");
        let retired = http.post("/v1/plugins/echo:unload", json!({ "generation": 2 })).await.ok();
        assert_eq!(retired["generations"][1]["state"], "GENERATION_STATE_RETIRED");

        // Refusals, as gRPC words them.
        let grpc = client
            .plugins
            .activate_plugin(v1::ActivatePluginRequest { name: "echo".into(), generation: 1, drain_timeout_ms: 0 })
            .await
            .expect_err("retired");
        http.post("/v1/plugins/echo:activate", json!({ "generation": 1 })).await.same_error_as(&grpc);
        let outside = "/etc/hostname";
        let grpc = client
            .plugins
            .load_plugin(v1::LoadPluginRequest { path: outside.into(), activate: false })
            .await
            .expect_err("outside");
        http.post("/v1/plugins", json!({ "path": outside })).await.same_error_as(&grpc);
        let grpc = client
            .plugins
            .reload_plugin(v1::ReloadPluginRequest { name: "nope".into(), ..Default::default() })
            .await
            .expect_err("no plugin");
        http.post("/v1/plugins/nope:reload", json!({})).await.same_error_as(&grpc);
        assert_eq!(http.get("/v1/plugins/nope").await.error(404, "NOT_FOUND"), grpc.message());
        let grpc = client
            .plugins
            .reload_plugin(v1::ReloadPluginRequest {
                name: "echo".into(),
                drain_timeout_ms: u64::MAX,
                ..Default::default()
            })
            .await
            .expect_err("out of range");
        http.post("/v1/plugins/echo:reload", json!({ "drainTimeoutMs": u64::MAX.to_string() }))
            .await
            .same_error_as(&grpc);
        assert!(http.post("/v1/plugins/echo:explode", json!({})).await.error(404, "NOT_FOUND").contains("explode"));
        assert!(http.post("/v1/plugins/echo", json!({})).await.error(404, "NOT_FOUND").contains("echo:reload"));
        let mismatch = http.post("/v1/plugins/echo:activate", json!({ "name": "other", "generation": 3 })).await;
        assert!(mismatch.error(400, "INVALID_ARGUMENT").contains("path"));

        let (_, address) = client.start_listener("echo", &[]).await;
        let _peer = echo_client(address, b"busy");
        let grpc = client
            .plugins
            .unload_plugin(v1::UnloadPluginRequest { name: "echo".into(), generation: None, force: false })
            .await
            .expect_err("in use");
        http.delete("/v1/plugins/echo").await.same_error_as(&grpc);
        let unloaded = http.delete("/v1/plugins/echo?force=true").await.ok();
        assert_eq!(unloaded["currentGeneration"], 0);
    });
}

#[test]
fn plugins_list_in_name_order_a_page_at_a_time_or_by_name() {
    runtime().block_on(async {
        let plugins = vec!["asyncore_plugin_echo", "asyncore_plugin_chat", "asyncore_fixture_cache"];
        let daemon = InProcessDaemon::start_with(Options { plugins, ..Options::default() }).await;
        let http = Http::of(&daemon);
        let mut client = daemon.client().await;
        let list = |page_size, page_token: &str, name: &str| v1::ListPluginsRequest {
            page_size,
            page_token: page_token.into(),
            name: name.into(),
        };

        let all = client.plugins.list_plugins(list(0, "", "")).await.unwrap().into_inner();
        let names: Vec<&str> = all.plugins.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["cache", "chat", "echo"]);
        assert_eq!(all.next_page_token, "");

        let mut token = String::new();
        for (expected, next) in [("cache", "cache"), ("chat", "chat"), ("echo", "")] {
            let page = client.plugins.list_plugins(list(1, &token, "")).await.unwrap().into_inner();
            let over_http = http.get(&format!("/v1/plugins?page_size=1&page_token={token}")).await.ok();
            assert_eq!(over_http, to_json(&page), "the same page over HTTP");
            assert_eq!((page.plugins.len(), page.plugins[0].name.as_str()), (1, expected));
            assert_eq!(page.next_page_token, next);
            token = page.next_page_token;
        }

        let chat = client.plugins.list_plugins(list(0, "", "chat")).await.unwrap().into_inner();
        assert_eq!((chat.plugins.len(), chat.plugins[0].name.as_str()), (1, "chat"));
        assert_eq!(http.get("/v1/plugins?name=chat").await.ok(), to_json(&chat));
        assert_eq!(http.get("/v1/plugins/chat").await.ok(), to_json(&chat.plugins[0]));
        let grpc = client.plugins.list_plugins(list(0, "", "nope")).await.expect_err("no plugin");
        assert_eq!((grpc.code(), grpc.message()), (tonic::Code::NotFound, "no plugin named \"nope\" is loaded"));
        http.get("/v1/plugins?name=nope").await.same_error_as(&grpc);
    });
}

#[test]
fn the_daemon_resources_answer_over_http() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let http = Http::of(&daemon);
        let stats = http.get("/v1/daemon/loop-stats").await.ok();
        let mut client = daemon.client().await;
        let grpc = client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.unwrap().into_inner();
        let expected = to_json(&grpc);
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&stats), keys(&expected));
        assert_ne!(stats["passes"], "0");
        let info = http.get("/v1/daemon").await.ok();
        assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(info["phase"], "DAEMON_PHASE_RUNNING");
    });
}

#[test]
fn stats_stream_as_server_sent_events_sharing_the_grpc_limit() {
    runtime().block_on(async {
        let options = Options { config: "max_stats_watchers = 1\n".into(), ..Options::default() };
        let daemon = InProcessDaemon::start_with(options).await;
        let http = Http::of(&daemon);
        let mut client = daemon.client().await;
        let (listener_id, address) = client.start_listener("echo", &[]).await;
        let peer = echo_client(address, b"12345");
        let channel = client.channel_by_peer(listener_id, peer.local_addr().unwrap()).await;

        let grpc = client
            .channels
            .watch_stats(v1::WatchStatsRequest { interval_ms: 1, ..Default::default() })
            .await
            .expect_err("too short");
        http.get("/v1/stats/watch?interval_ms=1").await.same_error_as(&grpc);

        let response =
            http.send("GET", &format!("/v1/stats/watch?interval_ms=50&listener_id={listener_id}"), None).await;
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut events = Events::new(response);
        for seq in 1..=2 {
            let event = events.next().await.expect("an event");
            assert_eq!((event.name.as_str(), event.id.clone()), ("", seq.to_string()), "{event:?}");
            let update: Value = serde_json::from_str(&event.data).unwrap();
            assert_eq!(update["seq"], json!(seq.to_string()));
            let ours =
                update["channels"].as_array().unwrap().iter().find(|c| c["channelId"] == json!(channel.id.to_string()));
            let ours = ours.unwrap_or_else(|| panic!("channel {} in {update}", channel.id));
            assert_eq!((&ours["bytesIn"], &ours["bytesOut"]), (&json!("5"), &json!("5")));
        }

        // One stream is the limit here, for both APIs together.
        let grpc = client.channels.watch_stats(v1::WatchStatsRequest::default()).await.expect_err("the limit");
        assert_eq!(grpc.code(), tonic::Code::ResourceExhausted);
        http.get("/v1/stats/watch").await.same_error_as(&grpc);
        drop(events);
        // Closing the HTTP stream gives its slot back.
        let response = eventually!(
            async || {
                let response = http.send("GET", "/v1/stats/watch?interval_ms=50", None).await;
                (response.status().as_u16() == 200).then_some(response)
            },
            "the slot of a closed SSE stream to be free again"
        )
        .await;
        assert!(Events::new(response).next().await.is_some());
    });
}

#[test]
fn health_readiness_and_unknown_routes() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let http = Http::of(&daemon);
        assert_eq!(http.get("/healthz").await.ok(), json!({ "status": "ok", "phase": "running" }));
        assert_eq!(http.get("/readyz").await.ok(), json!({ "status": "ok", "phase": "running" }));
        assert!(http.get("/v2/nothing").await.error(404, "NOT_FOUND").contains("/v2/nothing"));
        let wrong_method = http.call("PUT", "/v1/listeners", Some("{}".into())).await;
        assert!(wrong_method.error(405, "UNIMPLEMENTED").contains("PUT"));
    });
}

#[test]
fn dropping_the_daemon_ends_its_event_streams_and_frees_the_port() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let address = daemon.daemon().http_addr().unwrap();
        let http = Http::new(address);
        // An hour between updates: only the stop can end this stream soon.
        let response = http.send("GET", "/v1/stats/watch?interval_ms=3600000", None).await;
        assert_eq!(response.status().as_u16(), 200);
        let mut events = Events::new(response);
        assert!(events.next().await.is_some(), "the first update comes at once");
        drop(daemon);
        assert!(events.next().await.is_none(), "the stream ends with the daemon");
        eventually!(async || std::net::TcpListener::bind(address).is_ok(), "the http port {address} to be free").await;
    });
}

/// The HTTP address a binary daemon logged.
pub(crate) async fn http_address_of(daemon: &Daemon) -> SocketAddr {
    let line = eventually!(
        async || daemon.log().lines().find(|l| l.contains("http api listening")).map(str::to_string),
        "the http api in the log:\n{}",
        daemon.log()
    )
    .await;
    let address = line.split_whitespace().find_map(|w| w.strip_prefix("address=")).expect("address=");
    address.parse().unwrap_or_else(|e| panic!("{address}: {e}"))
}

#[test]
fn readyz_turns_503_while_a_sigterm_drains() {
    runtime().block_on(async {
        let mut daemon =
            Daemon::start_with(Options { config: "drain_timeout_secs = 30\n".into(), ..Options::default() });
        let http = Http::new(http_address_of(&daemon).await);
        assert_eq!(http.get("/readyz").await.ok()["phase"], "running");
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("echo", &[]).await;

        // A peer that never reads keeps its channel's output queued, so the
        // drain waits for it (up to drain_timeout_secs).
        let mut stalled = connect(address);
        stalled.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
        let chunk = vec![7u8; 1 << 16];
        while stalled.write_all(&chunk).is_ok() {}

        let sent = output_within(std::process::Command::new("kill").arg("-TERM").arg(daemon.pid().to_string()));
        assert!(sent.status.success());
        let answer = eventually!(
            async || {
                let answer = http.get("/readyz").await;
                (answer.status == 503).then_some(answer)
            },
            "readyz to answer 503 after SIGTERM"
        )
        .await;
        assert_eq!(answer.json(), json!({ "status": "unavailable", "phase": "draining" }));
        // Alive all the same, and still answering; new work is refused.
        assert_eq!(http.get("/healthz").await.ok()["phase"], "draining");
        assert_eq!(http.get("/v1/listeners").await.status, 200);
        let refused = http.post("/v1/listeners", json!({ "address": "127.0.0.1:0", "plugin": "echo" })).await;
        assert_eq!(refused.error(503, "UNAVAILABLE"), "the daemon is draining");
        daemon.assert_running();
        drop(stalled);
    });
}

#[test]
fn http_none_serves_no_http_api() {
    runtime().block_on(async {
        // In-process, from a config file.
        let dir = TempDir::new("http-none");
        std::fs::create_dir(dir.path().join("plugins")).unwrap();
        let path = dir.path().join("asyncored.toml");
        std::fs::write(&path, "control = \"127.0.0.1:0\"\nhttp = \"none\"\nplugin_dirs = [\"plugins\"]\n").unwrap();
        let config = asyncored::Config::from_file(&path).unwrap();
        let daemon = within("the daemon to start", asyncored::Daemon::start(config)).await.unwrap();
        assert_eq!(daemon.http_addr(), None);
        drop(daemon);

        // The binary's flag wins over the harness's config, and a bad value
        // is a usage error.
        let daemon = Daemon::start_with(Options { args: vec!["--http", "none"], ..Options::default() });
        let mut client = daemon.client().await;
        client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.expect("gRPC still served");
        assert!(!daemon.log().contains("http api listening"), "{}", daemon.log());
        let output = output_within(std::process::Command::new(binary("asyncored")).args(["--http", "localhost"]));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("--http") && stderr.contains("ip:port"), "{stderr}");
    });
}
