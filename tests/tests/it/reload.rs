//! Hot reload: generations side by side, reload under traffic with nothing
//! dropped, drain timeouts, rebuilt files, rollback, validation, unload and
//! `--watch`. In-process, but for the tests that need the plugin's
//! environment, the `--watch` flag or the daemon's log.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use asyncore_proto::v1;
use asyncore_tests::{
    Client, Daemon, InProcessDaemon, Options, Rng, TempDir, eventually, plugin_library, replace_file, within,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;

use crate::runtime;

async fn reload(client: &mut Client, name: &str, drain_timeout_ms: u64) -> v1::Plugin {
    client
        .plugins
        .reload_plugin(v1::ReloadPluginRequest { name: name.into(), path: String::new(), drain_timeout_ms })
        .await
        .unwrap_or_else(|e| panic!("reload {name}: {e}"))
        .into_inner()
}

/// The channel the daemon serves `stream` with.
async fn channel_of(client: &mut Client, listener_id: u64, stream: &TcpStream) -> v1::Channel {
    client.channel_by_peer(listener_id, stream.local_addr().unwrap()).await
}

/// Sends `message` and reads the tagged answer of the `versioned` fixture
/// (`v1:` or `v2:` before it), or the echo of `message` and 3 bytes more.
async fn ask(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len() + 3];
    within("an answer", stream.read_exact(&mut back)).await.unwrap();
    back
}

/// Sends `message` and reads its echo.
async fn echo_round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    within("an echo", stream.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, message);
}

/// Waits until the workers made `count` round trips in all.
async fn round_trips_reach(round_trips: &AtomicU64, count: u64) {
    eventually!(
        async || round_trips.load(Ordering::Relaxed) >= count,
        "{count} round trips (at {})",
        round_trips.load(Ordering::Relaxed)
    )
    .await;
}

async fn get_channel(client: &mut Client, id: u64) -> v1::Channel {
    client.channels.get_channel(v1::GetChannelRequest { id }).await.unwrap().into_inner()
}

/// The plugin named `name`, as `ListPlugins` shows it.
async fn plugin_named(client: &mut Client, name: &str) -> v1::Plugin {
    let plugins = client.plugins.list_plugins(v1::ListPluginsRequest::default()).await.unwrap().into_inner();
    plugins.plugins.into_iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no plugin {name}"))
}

#[test]
fn twenty_reloads_under_load_drop_nothing_and_new_connections_get_the_new_generation() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (listener_id, address) = client.start_listener("echo", &[]).await;

        let stop = Arc::new(AtomicBool::new(false));
        let round_trips = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for i in 0..200u64 {
            let (stop, round_trips) = (stop.clone(), round_trips.clone());
            workers.push(tokio::spawn(async move {
                let mut stream = TcpStream::connect(address).await.map_err(|e| format!("connect {i}: {e}"))?;
                let mut rng = Rng::new(i);
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) || done < 3 {
                    let len = rng.range(1, 4096);
                    let message = rng.bytes(len);
                    stream.write_all(&message).await.map_err(|e| format!("client {i} write: {e}"))?;
                    let mut back = vec![0u8; message.len()];
                    within(format!("client {i}'s echo"), stream.read_exact(&mut back))
                        .await
                        .map_err(|e| format!("client {i} read: {e}"))?;
                    if back != message {
                        return Err(format!("client {i}: bytes lost or reordered"));
                    }
                    done += 1;
                    round_trips.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<u64, String>(done)
            }));
        }
        // Let every worker get going on generation 1.
        round_trips_reach(&round_trips, 600).await;

        for expected in 2..=21u32 {
            let plugin = reload(&mut client, "echo", 0).await;
            assert_eq!(plugin.current_generation, expected);
            let before = round_trips.load(Ordering::Relaxed);
            let mut fresh = TcpStream::connect(address).await.unwrap();
            echo_round_trip(&mut fresh, b"new").await;
            let channel = channel_of(&mut client, listener_id, &fresh).await;
            assert_eq!(channel.plugin_generation, expected, "a connection after reload {expected} is on it");
            // Traffic keeps flowing between reloads.
            round_trips_reach(&round_trips, before + 200).await;
        }
        let echo = plugin_named(&mut client, "echo").await;
        // Generation 1 draining, the newest 8 retired (the older retired
        // records are forgotten), 4 on standby and the current one.
        assert_eq!(echo.generations.len(), 14);
        let first = &echo.generations[0];
        assert_eq!(first.state, v1::GenerationState::Draining as i32, "generation 1 still serves its 200 channels");
        assert_eq!(first.live_channels, 200);
        assert!(first.listener_ids.is_empty());
        let current = echo.generations.last().unwrap();
        assert_eq!(current.state, v1::GenerationState::Current as i32);
        assert_eq!(current.listener_ids, [listener_id]);
        assert_eq!(current.sha256.len(), 64);
        stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for worker in workers {
            if let Err(e) = within("a worker to finish", worker).await.unwrap() {
                errors.push(e);
            }
        }
        assert!(errors.is_empty(), "connection errors: {errors:?}");
    });
}

#[test]
fn a_drain_timeout_closes_old_channels_after_flushing_them() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (listener_id, address) = client.start_listener("echo", &[]).await;
        let stream = TcpStream::connect(address).await.unwrap();
        let old = {
            let mut probe = TcpStream::connect(address).await.unwrap();
            echo_round_trip(&mut probe, b"x").await;
            channel_of(&mut client, listener_id, &stream).await
        };
        assert_eq!(old.plugin_generation, 1);

        // A client that sends a lot and does not read yet: output piles up.
        let payload = Rng::new(5).bytes(32 << 20);
        let (mut reader, mut writer) = stream.into_split();
        let writer_task = tokio::spawn(async move {
            let _ = writer.write_all(&payload).await;
            (payload, writer)
        });
        eventually!(
            async || get_channel(&mut client, old.id).await.pending_output > 0,
            "output queued for the old channel"
        )
        .await;
        reload(&mut client, "echo", 300).await;
        // A connection made after the reload, before the drain timeout:
        // on the new generation, so the timeout spares it.
        let mut fresh = TcpStream::connect(address).await.unwrap();
        echo_round_trip(&mut fresh, b"early").await;
        // After the timeout the old channel is closing, its counters final.
        let closing = eventually!(
            async || {
                let channel = get_channel(&mut client, old.id).await;
                (channel.state == v1::ChannelState::Closing as i32).then_some(channel)
            },
            "the old channel to be closing after the drain timeout"
        )
        .await;
        let mut received = Vec::new();
        within("EOF on the old channel", reader.read_to_end(&mut received)).await.unwrap();
        let (payload, _writer) = within("the writer to finish", writer_task).await.unwrap();
        assert_eq!(received.len() as u64, closing.bytes_in, "every byte read was echoed before EOF");
        assert!(received == payload[..received.len()]);

        // The drain timeout has passed (the old channel closed): the fresh
        // connection still echoes.
        echo_round_trip(&mut fresh, b"still").await;
    });
}

/// Puts `library` at `path` like a rebuild would. `in_place` overwrites the
/// existing file's bytes (same inode), which must not disturb the daemon:
/// it runs private copies. Otherwise the new file is renamed over the old.
fn install(library: &Path, path: &Path, in_place: bool) {
    if in_place {
        std::fs::copy(library, path).unwrap();
    } else {
        replace_file(path, &std::fs::read(library).unwrap());
    }
}

/// Puts build v1 of the `versioned` fixture in the plugin directory of the
/// daemon whose directory is `dir` (not loaded yet); returns its path.
fn install_v1(dir: &Path) -> PathBuf {
    let library = dir.join("plugins").join("libversioned.so");
    install(&plugin_library("asyncore_fixture_versioned_v1"), &library, false);
    library
}

/// An in-process daemon with build v1 of the `versioned` fixture in its
/// plugin directory (not loaded yet); returns it and the library's path.
async fn versioned(config: &str) -> (InProcessDaemon, PathBuf) {
    let daemon = InProcessDaemon::start_with(Options { config: config.into(), ..Options::default() }).await;
    let library = install_v1(daemon.dir());
    (daemon, library)
}

/// Loads v1 and serves it on a new listener; returns the listener's id and
/// address.
async fn serve_v1(client: &mut Client, library: &Path, config: &[(&str, &str)]) -> (u64, SocketAddr) {
    load(client, library).await;
    client.start_listener("versioned", config).await
}

async fn load(client: &mut Client, path: &Path) -> v1::Plugin {
    client
        .plugins
        .load_plugin(v1::LoadPluginRequest { path: path.display().to_string(), activate: false })
        .await
        .unwrap()
        .into_inner()
}

#[test]
fn rebuilt_in_place_then_reloaded_rolled_back_and_refused() {
    // The binary: the fixture's `on_load` reads its environment, which
    // names a flag file (it fails while the file exists).
    let flag_dir = TempDir::new("refuse");
    let refuse_flag = flag_dir.path().join("refuse");
    let daemon = Daemon::start_with(Options {
        env: vec![("VERSIONED_REFUSE_IF".into(), refuse_flag.display().to_string())],
        ..Options::default()
    });
    let library = install_v1(daemon.dir());
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = serve_v1(&mut client, &library, &[]).await;
        let mut old = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut old, b"a").await, b"v1:a");

        // Rebuild in place and reload: new connections get the new code,
        // the old one keeps its generation.
        install(&plugin_library("asyncore_fixture_versioned_v2"), &library, true);
        let plugin = reload(&mut client, "versioned", 0).await;
        assert_eq!(plugin.current_generation, 2);
        assert_eq!(plugin.version, "v2");
        let mut new = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut new, b"b").await, b"v2:b");
        assert_eq!(ask(&mut old, b"c").await, b"v1:c");

        // Rollback in one call.
        let plugin = client
            .plugins
            .activate_plugin(v1::ActivatePluginRequest { name: "versioned".into(), generation: 1, drain_timeout_ms: 0 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(plugin.current_generation, 1);
        let mut rolled_back = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut rolled_back, b"d").await, b"v1:d");
        assert_eq!(ask(&mut new, b"e").await, b"v2:e", "generation 2's channel lives on");

        // A generation whose on_load fails is refused; generation 1 stays
        // current and keeps serving.
        std::fs::write(&refuse_flag, "schema check failed").unwrap();
        let refused = client
            .plugins
            .reload_plugin(v1::ReloadPluginRequest { name: "versioned".into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(refused.message().contains("schema check failed"), "{}", refused.message());
        std::fs::remove_file(&refuse_flag).unwrap();
        let versioned = plugin_named(&mut client, "versioned").await;
        assert_eq!(versioned.current_generation, 1);
        assert_eq!(versioned.generations.len(), 2);
        let mut after = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut after, b"f").await, b"v1:f");

        // Loading without activate: a standby generation, not current.
        let plugin = load(&mut client, &library).await;
        assert_eq!(plugin.current_generation, 1);
        let standby = plugin.generations.iter().find(|g| g.generation == 3).unwrap();
        assert_eq!(standby.state, v1::GenerationState::Standby as i32);

        // Unload: refused while generation 2 serves a channel, forced closes
        // it gracefully and retires the generation.
        let unload = |force| v1::UnloadPluginRequest { name: "versioned".into(), generation: Some(2), force };
        let busy = client.plugins.unload_plugin(unload(false)).await.unwrap_err();
        assert_eq!(busy.code(), Code::FailedPrecondition);
        let plugin = client.plugins.unload_plugin(unload(true)).await.unwrap().into_inner();
        let retired = plugin.generations.iter().find(|g| g.generation == 2).unwrap();
        assert_eq!(retired.state, v1::GenerationState::Retired as i32);
        let mut rest = Vec::new();
        within("EOF on the forced channel", new.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty(), "the forced channel got EOF");
        let refused = client
            .plugins
            .activate_plugin(v1::ActivatePluginRequest { name: "versioned".into(), generation: 2, drain_timeout_ms: 0 })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "a retired generation is never called again");
        assert_eq!(ask(&mut old, b"g").await, b"v1:g");
    });
}

#[test]
fn watch_reloads_a_library_rebuilt_in_the_plugin_directory() {
    runtime().block_on(async {
        let (daemon, library) = versioned("watch = true\n").await;
        let mut client = daemon.client().await;
        let (_, address) = serve_v1(&mut client, &library, &[]).await;
        let mut old = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut old, b"a").await, b"v1:a");

        install(&plugin_library("asyncore_fixture_versioned_v2"), &library, false);
        eventually!(
            async || plugin_named(&mut client, "versioned").await.current_generation == 2,
            "the watcher to reload the rebuilt library"
        )
        .await;
        let mut new = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut new, b"b").await, b"v2:b");
        assert_eq!(ask(&mut old, b"c").await, b"v1:c");
    });
}

#[test]
fn watch_keeps_watching_the_other_plugins_after_a_failed_reload() {
    // The binary with `--watch`: its log shows when the failed reload has
    // happened, so that B is rebuilt only after it.
    let daemon = Daemon::start_with(Options {
        plugins: vec!["asyncore_plugin_echo", "asyncore_fixture_versioned_v1"],
        args: vec!["--watch"],
        ..Options::default()
    });
    let plugin_dir = daemon.dir().join("plugins");
    let echo_library = plugin_dir.join(plugin_library("asyncore_plugin_echo").file_name().unwrap());
    let versioned_library = plugin_dir.join(plugin_library("asyncore_fixture_versioned_v1").file_name().unwrap());
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, echo) = client.start_listener("echo", &[]).await;
        let (_, versioned) = client.start_listener("versioned", &[]).await;
        let mut stream = TcpStream::connect(versioned).await.unwrap();
        assert_eq!(ask(&mut stream, b"a").await, b"v1:a");

        // A: echo's library replaced by something that does not load.
        replace_file(&echo_library, b"not a library\n");
        eventually!(
            async || daemon.log().lines().any(|l| l.contains("reload failed") && l.contains("plugin=echo")),
            "the failed reload of echo in the log:\n{}",
            daemon.log()
        )
        .await;
        assert_eq!(plugin_named(&mut client, "echo").await.current_generation, 1, "echo keeps its generation");

        // B: versioned rebuilt, and reloaded all the same.
        install(&plugin_library("asyncore_fixture_versioned_v2"), &versioned_library, false);
        eventually!(
            async || plugin_named(&mut client, "versioned").await.current_generation == 2,
            "the watcher to reload versioned after echo's failed reload; log:\n{}",
            daemon.log()
        )
        .await;
        let mut new = TcpStream::connect(versioned).await.unwrap();
        assert_eq!(ask(&mut new, b"b").await, b"v2:b");
        let mut echo_stream = TcpStream::connect(echo).await.unwrap();
        echo_round_trip(&mut echo_stream, b"still echoing").await;

        // A again, rebuilt properly this time: the failure is not held
        // against it.
        let mut rebuilt = std::fs::read(plugin_library("asyncore_plugin_echo")).unwrap();
        rebuilt.extend_from_slice(b"\nrebuilt\n");
        replace_file(&echo_library, &rebuilt);
        eventually!(
            async || plugin_named(&mut client, "echo").await.current_generation == 2,
            "the watcher to reload the fixed echo library; log:\n{}",
            daemon.log()
        )
        .await;
    });
}

#[test]
fn idle_channels_hand_their_state_over_to_the_new_generation() {
    // The binary: the handover is seen in its log.
    let daemon = Daemon::start();
    let library = install_v1(daemon.dir());
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (listener_id, address) = serve_v1(&mut client, &library, &[("migrate", "true")]).await;
        let mut stream = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut stream, b"a").await, b"v1:a");
        assert_eq!(ask(&mut stream, b"b").await, b"v1:b");

        install(&plugin_library("asyncore_fixture_versioned_v2"), &library, false);
        reload(&mut client, "versioned", 0).await;
        // The idle channel moved to generation 2 with its count.
        stream.write_all(b"count?").await.unwrap();
        let mut back = vec![0u8; b"v2:count=3".len()];
        within("the count", stream.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, b"v2:count=3");
        let channel = channel_of(&mut client, listener_id, &stream).await;
        assert_eq!(channel.plugin_generation, 2);
        let versioned = plugin_named(&mut client, "versioned").await;
        assert_eq!(versioned.generations[0].live_channels, 0);
        assert_eq!(versioned.generations[0].state, v1::GenerationState::Standby as i32);
        eventually!(
            async || daemon.log().contains("handed over with their state"),
            "the handover in the log:\n{}",
            daemon.log()
        )
        .await;
    });
}

#[test]
fn a_drain_timer_of_an_older_activation_spares_the_current_generation() {
    runtime().block_on(async {
        let (daemon, library) = versioned("").await;
        let mut client = daemon.client().await;
        let (_, address) = serve_v1(&mut client, &library, &[]).await;
        install(&plugin_library("asyncore_fixture_versioned_v2"), &library, false);
        reload(&mut client, "versioned", 0).await;
        let activate = |generation, drain_timeout_ms| v1::ActivatePluginRequest {
            name: "versioned".into(),
            generation,
            drain_timeout_ms,
        };
        // Roll back with a drain timeout, then forward again at once.
        client.plugins.activate_plugin(activate(1, 200)).await.unwrap();
        client.plugins.activate_plugin(activate(2, 0)).await.unwrap();
        let mut current = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut current, b"a").await, b"v2:a");
        // A sentinel on the same timer heap, due after the stale drain
        // timer: an idle channel with a longer timeout, accepted after the
        // activations. Once it is closed, the loop's clock has passed the
        // drain timer too, which fired first.
        let (_, sentinel) = client.start_listener("echo", &[("idle_timeout", "300ms")]).await;
        let mut sentinel = TcpStream::connect(sentinel).await.unwrap();
        let mut rest = Vec::new();
        within("the idle sentinel to be closed", sentinel.read_to_end(&mut rest)).await.unwrap();
        assert_eq!(ask(&mut current, b"b").await, b"v2:b", "the stale drain timer closed nothing");
    });
}

#[test]
fn a_generation_that_refuses_a_listeners_config_changes_nothing() {
    runtime().block_on(async {
        let (daemon, library) = versioned("").await;
        let mut client = daemon.client().await;
        let (_, address) = serve_v1(&mut client, &library, &[("refuse", "v2")]).await;
        install(&plugin_library("asyncore_fixture_versioned_v2"), &library, false);
        let refused = client
            .plugins
            .reload_plugin(v1::ReloadPluginRequest { name: "versioned".into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().contains("build v2 refuses this listener"), "{}", refused.message());
        let versioned = plugin_named(&mut client, "versioned").await;
        assert_eq!(versioned.current_generation, 1);
        let v2 = versioned.generations.iter().find(|g| g.generation == 2).unwrap();
        assert_eq!(v2.state, v1::GenerationState::Standby as i32);
        let mut stream = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut stream, b"a").await, b"v1:a", "the listener still serves generation 1");
    });
}
