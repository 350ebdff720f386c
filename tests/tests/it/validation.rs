//! Every duration and size the daemon reads from a request is checked at
//! the gRPC edge: out of range is `INVALID_ARGUMENT` naming the key and the
//! allowed range, and nothing reaches the poll loop. Error messages echo
//! request fields only up to a cap, so that a huge field cannot turn the
//! answer into a transport error.

use std::collections::HashMap;

use asyncore_proto::v1;
use asyncore_tests::{InProcessDaemon, connect};
use tonic::Code;

use crate::runtime;

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, needles: &[&str]) {
    let status = result.expect_err("call must fail");
    assert_eq!(status.code(), Code::InvalidArgument, "code of {status:?}");
    for needle in needles {
        assert!(status.message().contains(needle), "message {:?} should mention {needle:?}", status.message());
    }
}

fn start(config: &[(&str, &str)]) -> v1::StartListenerRequest {
    v1::StartListenerRequest {
        address: "127.0.0.1:0".to_string(),
        plugin: "echo".to_string(),
        config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

#[test]
fn durations_out_of_range_are_refused_at_the_edge() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;

        // The value that panicked the poll thread once, and its friends.
        for idle_timeout in ["10000000000000000000", "1e30", "0", "0ms", "169h", "soon"] {
            assert_invalid(
                client.listeners.start_listener(start(&[("idle_timeout", idle_timeout)])).await,
                &["idle_timeout", "1ms", "168h"],
            );
        }
        let (_, address) = client.start_listener("echo", &[("idle_timeout", "168h")]).await;

        let activate =
            |drain_timeout_ms| v1::ActivatePluginRequest { name: "echo".into(), generation: 1, drain_timeout_ms };
        assert_invalid(client.plugins.activate_plugin(activate(u64::MAX)).await, &["drain_timeout_ms", "604800000"]);
        let reload = v1::ReloadPluginRequest { name: "echo".into(), path: String::new(), drain_timeout_ms: u64::MAX };
        assert_invalid(client.plugins.reload_plugin(reload).await, &["drain_timeout_ms", "604800000"]);
        client.plugins.activate_plugin(activate(604_800_000)).await.expect("the largest drain timeout");

        for interval_ms in [1, 9, u32::MAX] {
            let watch =
                v1::WatchStatsRequest { interval_ms, listener_id: None, channel_ids: vec![], changed_only: false };
            assert_invalid(client.channels.watch_stats(watch).await, &["interval_ms", "10", "3600000"]);
        }
        let too_many = v1::WatchStatsRequest {
            interval_ms: 0,
            listener_id: None,
            channel_ids: (1..=10_001).collect(),
            changed_only: false,
        };
        assert_invalid(client.channels.watch_stats(too_many).await, &["channel_ids", "10000"]);

        // The loop is alive and serving.
        drop(connect(address));
        client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.expect("the loop answers");
        assert!(daemon.daemon().lifecycle().get() == asyncored::Phase::Running);
    });
}

#[test]
fn listener_configs_have_size_limits() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let big_value = "x".repeat(1_500_000);
        assert_invalid(client.listeners.start_listener(start(&[("motd", &big_value)])).await, &["motd", "4096"]);
        let long_key = "k".repeat(129);
        assert_invalid(client.listeners.start_listener(start(&[(&long_key, "1")])).await, &["key", "128"]);
        let many: Vec<(String, String)> = (0..65).map(|i| (format!("key{i}"), "1".to_string())).collect();
        let request = v1::StartListenerRequest {
            address: "127.0.0.1:0".into(),
            plugin: "echo".into(),
            config: many.into_iter().collect::<HashMap<_, _>>(),
        };
        assert_invalid(client.listeners.start_listener(request).await, &["64 entries"]);
        let wide: Vec<(String, String)> = (0..8).map(|i| (format!("key{i}"), "v".repeat(4096))).collect();
        let request = v1::StartListenerRequest {
            address: "127.0.0.1:0".into(),
            plugin: "echo".into(),
            config: wide.into_iter().collect::<HashMap<_, _>>(),
        };
        assert_invalid(client.listeners.start_listener(request).await, &["16384 bytes"]);
        let empty_key = start(&[("", "1")]);
        assert_invalid(client.listeners.start_listener(empty_key).await, &["empty"]);

        // At the limits, accepted.
        let fits = "y".repeat(4096);
        client.start_listener("echo", &[("motd", &fits)]).await;
    });
}

#[test]
fn error_messages_cap_what_they_echo() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let name = "n".repeat(100_000);

        let mut request = start(&[]);
        request.plugin = name.clone();
        let status = client.listeners.start_listener(request).await.expect_err("no such plugin");
        assert_eq!(status.code(), Code::NotFound, "{:.300}", status.message());
        assert!(status.message().len() < 400, "a message of {} bytes", status.message().len());
        assert!(status.message().contains("nnnn…"), "{:.300}", status.message());

        let unload = v1::UnloadPluginRequest { name: name.clone(), generation: None, force: false };
        let status = client.plugins.unload_plugin(unload).await.expect_err("no such plugin");
        assert_eq!(status.code(), Code::NotFound, "{:.300}", status.message());
        assert!(status.message().len() < 400, "a message of {} bytes", status.message().len());

        let reload = v1::ReloadPluginRequest { name, path: String::new(), drain_timeout_ms: 0 };
        let status = client.plugins.reload_plugin(reload).await.expect_err("no such plugin");
        assert_eq!(status.code(), Code::NotFound, "{:.300}", status.message());
        assert!(status.message().len() < 400, "a message of {} bytes", status.message().len());

        let mut request = start(&[]);
        request.address = format!("{}:80", "h".repeat(100_000));
        let status = client.listeners.start_listener(request).await.expect_err("a bad address");
        assert_eq!(status.code(), Code::InvalidArgument, "{:.300}", status.message());
        assert!(status.message().len() < 400, "a message of {} bytes", status.message().len());
    });
}
