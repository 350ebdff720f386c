//! A listener's lifecycle with real clients: suspended (new connections
//! wait in the backlog, open channels keep working) and resumed (the
//! backlog is served); drained (the RPC answers once the listener's
//! channels have finished, and closes those left at its timeout);
//! `max_connections` (connections past it closed at once and counted,
//! changed on a running listener); over gRPC, HTTP and the CLI, with the
//! errors of bad input.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use asyncore_proto::v1;
use asyncore_tests::{Client, Daemon, InProcessDaemon, Options, connect, eventually, patience, within};
use serde_json::{Value, json};
use tonic::Code;

use crate::{http_api::Http, runtime};

/// Writes `message` and reads it back from the echo plugin.
#[track_caller]
fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut echoed = vec![0; message.len()];
    stream.read_exact(&mut echoed).unwrap_or_else(|e| panic!("echo of {message:?}: {e}"));
    assert_eq!(echoed, message);
}

/// The daemon closed the connection: EOF, or a reset (a connection closed
/// by the daemon before it read what the client sent).
#[track_caller]
fn assert_closed_by_daemon(stream: &mut TcpStream) {
    let mut buffer = [0u8; 64];
    match stream.read(&mut buffer) {
        Ok(0) => {}
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {}
        other => panic!("expected the daemon to close the connection, got {other:?}"),
    }
}

/// One listener, as `ListListeners` shows it.
async fn listener(client: &mut Client, id: u64) -> v1::Listener {
    let page = v1::ListListenersRequest { page_size: 1, page_token: (id - 1).to_string() };
    let listener = client.listeners.list_listeners(page).await.unwrap().into_inner().listeners.pop();
    listener.filter(|l| l.id == id).unwrap_or_else(|| panic!("listener {id} is listed"))
}

fn state(listener: &v1::Listener) -> v1::ListenerState {
    v1::ListenerState::try_from(listener.state).unwrap()
}

#[test]
fn a_suspended_listener_keeps_its_socket_and_serves_the_backlog_once_resumed() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (id, address) = client.start_listener("echo", &[]).await;
        let mut open = connect(address);
        round_trip(&mut open, b"before");

        let suspended = client.listeners.suspend_listener(v1::SuspendListenerRequest { id }).await.unwrap();
        let suspended = suspended.into_inner();
        assert_eq!(state(&suspended), v1::ListenerState::Suspended);
        assert_eq!(suspended.address, address.to_string(), "it keeps its address");
        assert_ne!(suspended.channel_id, 0, "and its listening socket");
        let again = client.listeners.suspend_listener(v1::SuspendListenerRequest { id }).await.unwrap();
        assert_eq!(state(&again.into_inner()), v1::ListenerState::Suspended, "suspending again changes nothing");

        // The kernel completes the handshake (the socket still listens),
        // but the daemon does not accept: nothing is echoed.
        let mut waiting = connect(address);
        waiting.write_all(b"queued").unwrap();
        waiting.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut buffer = [0u8; 16];
        match waiting.read(&mut buffer) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("a connection to a suspended listener was answered: {other:?}"),
        }
        assert_eq!(listener(&mut client, id).await.channel_count, 1, "the waiting connection was not accepted");
        round_trip(&mut open, b"still served");

        let resumed = client.listeners.resume_listener(v1::ResumeListenerRequest { id }).await.unwrap();
        assert_eq!(state(&resumed.into_inner()), v1::ListenerState::Listening);
        waiting.set_read_timeout(Some(patience())).unwrap();
        let mut echoed = [0u8; 6];
        waiting.read_exact(&mut echoed).expect("the backlogged connection is served once resumed");
        assert_eq!(&echoed, b"queued");
        round_trip(&mut connect(address), b"new");
        let again = client.listeners.resume_listener(v1::ResumeListenerRequest { id }).await.unwrap();
        assert_eq!(state(&again.into_inner()), v1::ListenerState::Listening, "resuming again changes nothing");
    });
}

#[test]
fn draining_a_listener_answers_once_its_channels_have_finished() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (id, address) = client.start_listener("echo", &[]).await;
        let mut busy = connect(address);
        round_trip(&mut busy, b"hello");

        // StopListener with a drain timeout is DrainListener.
        let mut drain_client = client.clone();
        let request = v1::StopListenerRequest { id, close_channels: false, drain_timeout_ms: Some(600_000) };
        let drain = tokio::spawn(async move { drain_client.listeners.stop_listener(request).await });
        eventually!(
            async || state(&listener(&mut client, id).await) == v1::ListenerState::Draining,
            "listener {id} draining"
        )
        .await;
        // Its channel is still open: no answer yet.
        assert!(!drain.is_finished(), "the drain answered while a channel was open");
        match TcpStream::connect(address) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            other => panic!("a draining listener accepted a connection: {other:?}"),
        }
        round_trip(&mut busy, b"an exchange under way finishes");
        assert!(!drain.is_finished(), "the drain answered while a channel was open");

        drop(busy);
        let drained = within("the drain to answer", drain).await.unwrap().expect("StopListener").into_inner();
        assert_eq!(state(&drained), v1::ListenerState::Stopped);
        assert_eq!(drained.channel_count, 0);
        assert_eq!(drained.channel_id, 0);
    });
}

#[test]
fn a_drain_closes_the_channels_left_at_its_timeout() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (id, address) = client.start_listener("echo", &[]).await;
        let mut stays = connect(address);
        round_trip(&mut stays, b"hello");

        let request = v1::DrainListenerRequest { id, drain_timeout_ms: 100 };
        let drained = client.listeners.drain_listener(request).await.expect("DrainListener").into_inner();
        assert_eq!(state(&drained), v1::ListenerState::Stopped);
        assert_eq!(drained.channel_count, 0, "the channel left was closed before the answer");
        // Gracefully: the client that never closed reads the end.
        assert_closed_by_daemon(&mut stays);
        let stopped = client.listeners.drain_listener(v1::DrainListenerRequest { id, drain_timeout_ms: 100 }).await;
        assert_eq!(stopped.unwrap_err().code(), Code::FailedPrecondition, "a stopped listener cannot drain again");

        // A listener with no channels answers at once.
        let (idle, _) = client.start_listener("echo", &[]).await;
        let request = v1::DrainListenerRequest { id: idle, drain_timeout_ms: 600_000 };
        let drained = client.listeners.drain_listener(request).await.expect("DrainListener").into_inner();
        assert_eq!((state(&drained), drained.channel_count), (v1::ListenerState::Stopped, 0));
    });
}

#[test]
fn connections_past_max_connections_are_closed_at_once_and_counted() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (id, address) = client.start_listener("echo", &[("max_connections", "2")]).await;
        let started = listener(&mut client, id).await;
        assert_eq!(started.max_connections, 2);

        let mut first = connect(address);
        round_trip(&mut first, b"1");
        let mut second = connect(address);
        round_trip(&mut second, b"2");
        let mut third = connect(address);
        assert_closed_by_daemon(&mut third);
        let full = listener(&mut client, id).await;
        assert_eq!((full.connections, full.connections_refused), (2, 1));
        round_trip(&mut first, b"the others keep working");

        // Raised on the running listener: one more fits.
        let limits = v1::SetListenerLimitsRequest { id, max_connections: 3 };
        let raised = client.listeners.set_listener_limits(limits).await.unwrap().into_inner();
        assert_eq!(raised.max_connections, 3);
        assert_eq!(raised.config.get("max_connections").map(String::as_str), Some("3"));
        let mut fourth = connect(address);
        round_trip(&mut fourth, b"4");

        // Lifted: no limit.
        let limits = v1::SetListenerLimitsRequest { id, max_connections: 0 };
        let lifted = client.listeners.set_listener_limits(limits).await.unwrap().into_inner();
        assert_eq!(lifted.max_connections, 0);
        assert!(!lifted.config.contains_key("max_connections"));
        let mut fifth = connect(address);
        round_trip(&mut fifth, b"5");

        // Lowered below what is open: those stay, new ones are refused.
        let limits = v1::SetListenerLimitsRequest { id, max_connections: 1 };
        client.listeners.set_listener_limits(limits).await.unwrap();
        let mut sixth = connect(address);
        assert_closed_by_daemon(&mut sixth);
        for (stream, message) in [(&mut first, b"a"), (&mut second, b"b"), (&mut fourth, b"c"), (&mut fifth, b"d")] {
            round_trip(stream, message);
        }
        let lowered = listener(&mut client, id).await;
        assert_eq!((lowered.connections, lowered.connections_refused), (4, 2));

        // Once enough have closed, new ones are served again.
        for stream in [first, second, fourth] {
            drop(stream);
        }
        eventually!(async || listener(&mut client, id).await.connections == 1, "three connections closed").await;
        drop(fifth);
        eventually!(async || listener(&mut client, id).await.connections == 0, "the last connection closed").await;
        round_trip(&mut connect(address), b"served again");

        let metrics = Http::of(&daemon).get("/metrics").await.text();
        let refused = metrics
            .lines()
            .find(|line| {
                line.starts_with("asyncored_listener_connections_refused") && line.contains(&format!("\"{id}\""))
            })
            .unwrap_or_else(|| panic!("the refused connections in /metrics:\n{metrics}"));
        assert!(refused.ends_with(" 2"), "{refused}");
    });
}

#[test]
fn the_daemons_max_connections_counts_every_listener() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (first_id, first) = client.start_listener("echo", &[]).await;
        let (second_id, second) = client.start_listener("echo", &[]).await;
        let limits = |max_connections| v1::SetDaemonLimitsRequest { max_connections };
        let none = client.listeners.set_daemon_limits(limits(None)).await.unwrap().into_inner();
        assert_eq!(none, v1::DaemonLimits { max_connections: 0, connections: 0 }, "no limit unless set");

        let mut on_first = connect(first);
        round_trip(&mut on_first, b"1");
        let set = client.listeners.set_daemon_limits(limits(Some(1))).await.unwrap().into_inner();
        assert_eq!(set, v1::DaemonLimits { max_connections: 1, connections: 1 });
        let mut on_second = connect(second);
        assert_closed_by_daemon(&mut on_second);
        assert_eq!(listener(&mut client, second_id).await.connections_refused, 1, "counted where it was refused");
        assert_eq!(listener(&mut client, first_id).await.connections_refused, 0);
        round_trip(&mut on_first, b"still served");

        let lifted = client.listeners.set_daemon_limits(limits(Some(0))).await.unwrap().into_inner();
        assert_eq!(lifted.max_connections, 0);
        round_trip(&mut connect(second), b"served again");

        let error = client.listeners.set_daemon_limits(limits(Some(1_000_001))).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert!(error.message().contains("0 (no limit) or 1 to 1000000"), "{}", error.message());
    });
}

#[test]
fn the_configs_max_connections_is_the_daemons_limit_from_the_start() {
    runtime().block_on(async {
        let options = Options { config: "max_connections = 1\n".into(), ..Options::default() };
        let daemon = InProcessDaemon::start_with(options).await;
        let mut client = daemon.client().await;
        let limits = client.listeners.set_daemon_limits(v1::SetDaemonLimitsRequest { max_connections: None }).await;
        assert_eq!(limits.unwrap().into_inner().max_connections, 1);
        let (id, address) = client.start_listener("echo", &[]).await;
        let mut first = connect(address);
        round_trip(&mut first, b"1");
        assert_closed_by_daemon(&mut connect(address));
        assert_eq!(listener(&mut client, id).await.connections_refused, 1);
    });
}

#[test]
fn bad_listener_lifecycle_requests_name_the_problem() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let missing = 999;
        let errors = [
            client.listeners.suspend_listener(v1::SuspendListenerRequest { id: missing }).await.unwrap_err(),
            client.listeners.resume_listener(v1::ResumeListenerRequest { id: missing }).await.unwrap_err(),
            client
                .listeners
                .drain_listener(v1::DrainListenerRequest { id: missing, drain_timeout_ms: 1000 })
                .await
                .unwrap_err(),
            client
                .listeners
                .set_listener_limits(v1::SetListenerLimitsRequest { id: missing, max_connections: 5 })
                .await
                .unwrap_err(),
        ];
        for error in errors {
            assert_eq!((error.code(), error.message()), (Code::NotFound, "no listener 999"), "{error:?}");
        }

        let (id, _) = client.start_listener("echo", &[]).await;
        for drain_timeout_ms in [0, 604_800_001] {
            let request = v1::DrainListenerRequest { id, drain_timeout_ms };
            let error = client.listeners.drain_listener(request).await.unwrap_err();
            assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
            assert!(error.message().contains("1 to 604800000"), "{}", error.message());
        }
        let request = v1::SetListenerLimitsRequest { id, max_connections: 1_000_001 };
        let error = client.listeners.set_listener_limits(request).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
        assert!(error.message().contains("0 (no limit) or 1 to 1000000"), "{}", error.message());
        for bad in ["lots", "-1", "1000001"] {
            let request = v1::StartListenerRequest {
                address: "127.0.0.1:0".into(),
                plugin: "echo".into(),
                config: [("max_connections".to_string(), bad.to_string())].into(),
            };
            let error = client.listeners.start_listener(request).await.unwrap_err();
            assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
            assert!(
                error.message().contains("max_connections") && error.message().contains("1 to 1000000"),
                "{}",
                error.message()
            );
        }

        client
            .listeners
            .stop_listener(v1::StopListenerRequest { id, close_channels: false, drain_timeout_ms: None })
            .await
            .unwrap();
        let error = client.listeners.suspend_listener(v1::SuspendListenerRequest { id }).await.unwrap_err();
        assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
        let limits = v1::SetListenerLimitsRequest { id, max_connections: 5 };
        let error = client.listeners.set_listener_limits(limits).await.unwrap_err();
        assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    });
}

#[test]
fn the_http_api_suspends_resumes_limits_and_drains_listeners() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let http = Http::of(&daemon);
        let mut client = daemon.client().await;
        let (id, address) = client.start_listener("echo", &[]).await;
        let mut open = connect(address);
        round_trip(&mut open, b"hello");

        let suspended = http.post(&format!("/v1/listeners/{id}:suspend"), json!({})).await.ok();
        assert_eq!(suspended["state"], "LISTENER_STATE_SUSPENDED");
        let resumed = http.post(&format!("/v1/listeners/{id}:resume"), json!({})).await.ok();
        assert_eq!(resumed["state"], "LISTENER_STATE_LISTENING");
        let limited = http.post(&format!("/v1/listeners/{id}:setLimits"), json!({ "maxConnections": "1" })).await.ok();
        assert_eq!(limited["maxConnections"], "1");
        let mut refused = connect(address);
        assert_closed_by_daemon(&mut refused);
        let shown = http.get(&format!("/v1/listeners/{id}")).await.ok();
        assert_eq!((&shown["connections"], &shown["connectionsRefused"]), (&json!("1"), &json!("1")));

        // Bad input: the same errors as gRPC, as HTTP statuses.
        http.post("/v1/listeners/999:suspend", json!({})).await.error(404, "NOT_FOUND");
        let message = http
            .post(&format!("/v1/listeners/{id}:setLimits"), json!({ "maxConnections": "2000000" }))
            .await
            .error(400, "INVALID_ARGUMENT");
        assert!(message.contains("0 (no limit) or 1 to 1000000"), "{message}");
        let message = http.post(&format!("/v1/listeners/{id}:drain"), json!({})).await.error(400, "INVALID_ARGUMENT");
        assert!(message.contains("drain_timeout_ms 0"), "{message}");
        http.post(&format!("/v1/listeners/{id}:explode"), json!({})).await.error(404, "NOT_FOUND");
        let message = http.post("/v1/listeners/abc:suspend", json!({})).await.error(400, "INVALID_ARGUMENT");
        assert!(message.contains("\"abc\""), "{message}");
        let message = http
            .post(&format!("/v1/listeners/{id}:suspend"), json!({ "id": (id + 1).to_string() }))
            .await
            .error(400, "INVALID_ARGUMENT");
        assert!(message.contains("differs"), "{message}");

        // The drain answers once the open connection has closed.
        let drain = {
            let base_path = format!("/v1/listeners/{id}:drain");
            async move { http.post(&base_path, json!({ "drainTimeoutMs": "600000" })).await }
        };
        let drain = tokio::spawn(drain);
        eventually!(
            async || state(&listener(&mut client, id).await) == v1::ListenerState::Draining,
            "listener {id} draining"
        )
        .await;
        assert!(!drain.is_finished(), "the drain answered while a channel was open");
        drop(open);
        let drained: Value = within("the drain to answer", drain).await.unwrap().ok();
        assert_eq!((&drained["state"], &drained["channelCount"]), (&json!("LISTENER_STATE_STOPPED"), &json!("0")));
    });
}

#[test]
fn asyncorectl_suspends_resumes_limits_and_drains_listeners() {
    let daemon = Daemon::start();
    let ctl_json = |args: &[&str]| -> Value {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let output = daemon.ctl(&full);
        assert!(output.status.success(), "asyncorectl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let started = ctl_json(&["listeners", "start", "127.0.0.1:0", "echo"]);
    let id = started["id"].as_u64().unwrap().to_string();
    let address: SocketAddr = started["address"].as_str().unwrap().parse().unwrap();

    assert_eq!(ctl_json(&["listeners", "suspend", &id])["state"], "suspended");
    assert_eq!(ctl_json(&["listeners", "resume", &id])["state"], "listening");
    let limited = ctl_json(&["listeners", "limit", &id, "--max-connections", "1"]);
    assert_eq!((&limited["max_connections"], &limited["connections_refused"]), (&json!(1), &json!(0)));
    let mut open = connect(address);
    round_trip(&mut open, b"hello");
    assert_closed_by_daemon(&mut connect(address));
    let daemon_limits = ctl_json(&["listeners", "limit", "--daemon", "--max-connections", "100"]);
    assert_eq!((&daemon_limits["max_connections"], &daemon_limits["connections"]), (&json!(100), &json!(1)));

    // The drain returns once the open connection closed at its timeout.
    let drained = ctl_json(&["listeners", "stop", &id, "--drain-timeout", "200ms"]);
    assert_eq!((&drained["state"], &drained["channel_count"]), (&json!("stopped"), &json!(0)));
    assert_closed_by_daemon(&mut open);

    // Errors: one line and a non-zero exit code.
    for (args, code) in [
        (&["listeners", "suspend", "999"][..], 1),
        (&["listeners", "limit", &id, "--max-connections", "2000000"][..], 1),
        (&["listeners", "stop", &id, "--drain-timeout", "0"][..], 2),
        (&["listeners", "stop", &id, "--drain-timeout", "1s", "--close-channels"][..], 2),
        (&["listeners", "limit", "--max-connections", "1"][..], 2),
        (&["listeners", "limit", "--daemon", "--max-connections", "2000000"][..], 1),
    ] {
        let output = daemon.ctl(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "asyncorectl {args:?}: {stderr}");
        if code == 1 {
            assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        }
    }
    let output = daemon.ctl(&["listeners", "suspend", "999"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("no listener 999"));
}
