//! Bad input gets its status code and a message naming the problem, and the
//! daemon keeps serving after all of it.

use asyncore_proto::v1;
use asyncore_tests::{Daemon, Options, TempDir, plugin_library};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;

use crate::runtime;

#[track_caller]
fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("call must fail");
    assert_eq!(status.code(), code, "code of {status:?}");
    assert!(status.message().contains(needle), "message {:?} should mention {needle:?}", status.message());
}

/// A real shared library that is not a plugin: the C library this test
/// process is linked with.
fn libc_path() -> std::path::PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .expect("libc mapped")
        .into()
}

#[test]
fn bad_input_gets_clear_statuses_and_the_daemon_keeps_serving() {
    let mut daemon = Daemon::start_with(Options {
        plugins: vec!["asyncore_plugin_echo", "asyncore_fixture_abi_v2"],
        ..Options::default()
    });
    // The abi-v2 fixture in the plugin directory was reported and skipped;
    // echo loaded.
    assert!(daemon.log().contains("abi version 2.0, expected 1.0"), "log: {}", daemon.log());
    let scratch = TempDir::new("errors");
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let start = |address: &str, plugin: &str, config: &[(&str, &str)]| v1::StartListenerRequest {
            address: address.to_string(),
            plugin: plugin.to_string(),
            config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let (_, echo_address) = client.start_listener("echo", &[]).await;

        // Addresses.
        assert_status(
            client.listeners.start_listener(start("nonsense", "echo", &[])).await,
            Code::InvalidArgument,
            "nonsense",
        );
        assert_status(
            client.listeners.start_listener(start("127.0.0.1:70000", "echo", &[])).await,
            Code::InvalidArgument,
            "out of range",
        );
        assert_status(client.listeners.start_listener(start("", "echo", &[])).await, Code::InvalidArgument, "empty");
        assert_status(
            client.listeners.start_listener(start(&echo_address.to_string(), "echo", &[])).await,
            Code::AlreadyExists,
            "in use",
        );
        // Plugins and their config.
        assert_status(client.listeners.start_listener(start("127.0.0.1:0", "nope", &[])).await, Code::NotFound, "nope");
        assert_status(
            client.listeners.start_listener(start("127.0.0.1:0", "echo", &[("high_water", "lots")])).await,
            Code::InvalidArgument,
            "high_water",
        );
        // Unknown ids.
        assert_status(
            client.listeners.stop_listener(v1::StopListenerRequest { id: 999, close_channels: false }).await,
            Code::NotFound,
            "999",
        );
        assert_status(client.channels.get_channel(v1::GetChannelRequest { id: 12345 }).await, Code::NotFound, "12345");
        assert_status(
            client.channels.close_channel(v1::CloseChannelRequest { id: 12345 }).await,
            Code::NotFound,
            "12345",
        );
        assert_status(
            client
                .channels
                .list_channels(v1::ListChannelsRequest { listener_id: None, page_size: 0, page_token: "x".into() })
                .await,
            Code::InvalidArgument,
            "page_token",
        );
        assert_status(
            client
                .channels
                .watch_stats(v1::WatchStatsRequest { interval_ms: 1, listener_id: None, channel_ids: vec![] })
                .await,
            Code::InvalidArgument,
            "interval_ms",
        );

        // Plugin files.
        let load = |path: &std::path::Path| v1::LoadPluginRequest { path: path.display().to_string() };
        let text = scratch.path().join("notes.so");
        std::fs::write(&text, "not a library\n").unwrap();
        assert_status(
            client.plugins.load_plugin(load(&text)).await,
            Code::FailedPrecondition,
            "not a loadable library",
        );
        assert_status(
            client.plugins.load_plugin(load(&libc_path())).await,
            Code::FailedPrecondition,
            "not an asyncored plugin",
        );
        assert_status(
            client.plugins.load_plugin(load(&plugin_library("asyncore_fixture_abi_v2"))).await,
            Code::FailedPrecondition,
            "abi version 2.0, expected 1.0",
        );
        assert_status(
            client.plugins.load_plugin(load(&scratch.path().join("missing.so"))).await,
            Code::NotFound,
            "missing.so",
        );
        assert_status(
            client.plugins.load_plugin(load(scratch.path())).await,
            Code::InvalidArgument,
            "not a regular file",
        );
        assert_status(
            client.plugins.load_plugin(v1::LoadPluginRequest { path: String::new() }).await,
            Code::InvalidArgument,
            "empty",
        );
        assert_status(
            client.plugins.load_plugin(load(&plugin_library("asyncore_plugin_echo"))).await,
            Code::AlreadyExists,
            "already loaded",
        );

        // Still serving: the listener echoes and the API answers.
        let mut stream = TcpStream::connect(echo_address).await.unwrap();
        stream.write_all(b"still here").await.unwrap();
        let mut back = [0u8; 10];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"still here");
        let plugins = client.plugins.list_plugins(v1::ListPluginsRequest {}).await.unwrap().into_inner();
        assert_eq!(plugins.plugins.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["echo"]);
    });
    daemon.assert_running();
}

#[test]
fn a_failing_on_load_is_refused_with_the_plugins_message() {
    let daemon = Daemon::start_with(Options {
        plugins: vec!["asyncore_plugin_echo"],
        env: vec![("PANICKY_REFUSE_LOAD".into(), "disk on fire".into())],
        ..Options::default()
    });
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let request = v1::LoadPluginRequest { path: plugin_library("asyncore_fixture_panicky").display().to_string() };
        assert_status(client.plugins.load_plugin(request).await, Code::FailedPrecondition, "disk on fire");
        let plugins = client.plugins.list_plugins(v1::ListPluginsRequest {}).await.unwrap().into_inner();
        assert_eq!(plugins.plugins.len(), 1);
    });
}
