//! Hot reload: generations side by side, reload under traffic with nothing
//! dropped, drain timeouts, rebuilt files, rollback, validation, unload and
//! `--watch`.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use asyncore_proto::v1;
use asyncore_tests::{Client, Daemon, Options, Rng, plugin_library};
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

async fn ask(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len() + 3];
    stream.read_exact(&mut back).await.unwrap();
    back
}

#[test]
fn twenty_reloads_under_load_drop_nothing_and_new_connections_get_the_new_generation() {
    let daemon = Daemon::start();
    runtime().block_on(async {
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
                    stream.read_exact(&mut back).await.map_err(|e| format!("client {i} read: {e}"))?;
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
        while round_trips.load(Ordering::Relaxed) < 600 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        for expected in 2..=21u32 {
            let plugin = reload(&mut client, "echo", 0).await;
            assert_eq!(plugin.current_generation, expected);
            let before = round_trips.load(Ordering::Relaxed);
            let mut fresh = TcpStream::connect(address).await.unwrap();
            fresh.write_all(b"new").await.unwrap();
            let mut back = [0u8; 3];
            fresh.read_exact(&mut back).await.unwrap();
            let channel = channel_of(&mut client, listener_id, &fresh).await;
            assert_eq!(channel.plugin_generation, expected, "a connection after reload {expected} is on it");
            // Traffic keeps flowing between reloads.
            while round_trips.load(Ordering::Relaxed) < before + 200 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let plugins = client.plugins.list_plugins(v1::ListPluginsRequest {}).await.unwrap().into_inner();
        let echo = plugins.plugins.iter().find(|p| p.name == "echo").unwrap();
        assert_eq!(echo.generations.len(), 21);
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
            if let Err(e) = worker.await.unwrap() {
                errors.push(e);
            }
        }
        assert!(errors.is_empty(), "connection errors: {errors:?}");
    });
}

#[test]
fn a_drain_timeout_closes_old_channels_after_flushing_them() {
    let daemon = Daemon::start();
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (listener_id, address) = client.start_listener("echo", &[]).await;
        let stream = TcpStream::connect(address).await.unwrap();
        let old = {
            let mut probe = TcpStream::connect(address).await.unwrap();
            probe.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            probe.read_exact(&mut b).await.unwrap();
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
        loop {
            let c = client.channels.get_channel(v1::GetChannelRequest { id: old.id }).await.unwrap().into_inner();
            if c.pending_output > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        reload(&mut client, "echo", 300).await;
        // After the timeout the old channel is closing, its counters final.
        let closing = loop {
            let c = client.channels.get_channel(v1::GetChannelRequest { id: old.id }).await.unwrap().into_inner();
            if c.state == v1::ChannelState::Closing as i32 {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut received = Vec::new();
        reader.read_to_end(&mut received).await.unwrap();
        let (payload, _writer) = writer_task.await.unwrap();
        assert_eq!(received.len() as u64, closing.bytes_in, "every byte read was echoed before EOF");
        assert!(received == payload[..received.len()]);

        // A connection made after the reload is not drained.
        let mut fresh = TcpStream::connect(address).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        fresh.write_all(b"still").await.unwrap();
        let mut back = [0u8; 5];
        fresh.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"still");
    });
}

/// Puts `library` at `path` like a rebuild would. `in_place` overwrites the
/// existing file's bytes (same inode), which must not disturb the daemon:
/// it runs private copies.
fn install(library: &Path, path: &Path, in_place: bool) {
    if in_place {
        std::fs::copy(library, path).unwrap();
    } else {
        let tmp = path.with_extension("tmp");
        std::fs::copy(library, &tmp).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

/// A daemon with build v1 of the `versioned` fixture in its plugin
/// directory (not loaded yet). `on_load` fails while `refuse_flag` exists.
struct Versioned {
    daemon: Daemon,
    library: PathBuf,
    refuse_flag: PathBuf,
    _flag_dir: asyncore_tests::TempDir,
}

fn versioned(config: &str) -> Versioned {
    let flag_dir = asyncore_tests::TempDir::new("refuse");
    let refuse_flag = flag_dir.path().join("refuse");
    let daemon = Daemon::start_with(Options {
        config: config.into(),
        env: vec![("VERSIONED_REFUSE_IF".into(), refuse_flag.display().to_string())],
        ..Options::default()
    });
    let library = daemon.dir().join("plugins").join("libversioned.so");
    install(&plugin_library("asyncore_fixture_versioned_v1"), &library, false);
    Versioned { daemon, library, refuse_flag, _flag_dir: flag_dir }
}

/// Loads v1 and serves it on a new listener; returns the listener's id and
/// address.
async fn serve_v1(client: &mut Client, library: &Path, config: &[(&str, &str)]) -> (u64, std::net::SocketAddr) {
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
    let Versioned { daemon, library, refuse_flag, _flag_dir } = versioned("");
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
        let plugins = client.plugins.list_plugins(v1::ListPluginsRequest {}).await.unwrap().into_inner();
        let versioned = plugins.plugins.iter().find(|p| p.name == "versioned").unwrap();
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
        new.read_to_end(&mut rest).await.unwrap();
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
    let Versioned { daemon, library, .. } = versioned("watch = true\n");
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = serve_v1(&mut client, &library, &[]).await;
        let mut old = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut old, b"a").await, b"v1:a");

        install(&plugin_library("asyncore_fixture_versioned_v2"), &library, false);
        let mut reloaded = false;
        for _ in 0..200 {
            let plugins = client.plugins.list_plugins(v1::ListPluginsRequest {}).await.unwrap().into_inner();
            if plugins.plugins.iter().any(|p| p.name == "versioned" && p.current_generation == 2) {
                reloaded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(reloaded, "--watch reloaded the changed library; log:\n{}", daemon.log());
        let mut new = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut new, b"b").await, b"v2:b");
        assert_eq!(ask(&mut old, b"c").await, b"v1:c");
    });
}

#[test]
fn idle_channels_hand_their_state_over_to_the_new_generation() {
    let Versioned { daemon, library, .. } = versioned("");
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
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, b"v2:count=3");
        let channel = channel_of(&mut client, listener_id, &stream).await;
        assert_eq!(channel.plugin_generation, 2);
        let plugins = client.plugins.list_plugins(v1::ListPluginsRequest {}).await.unwrap().into_inner();
        let versioned = plugins.plugins.iter().find(|p| p.name == "versioned").unwrap();
        assert_eq!(versioned.generations[0].live_channels, 0);
        assert_eq!(versioned.generations[0].state, v1::GenerationState::Standby as i32);
        assert!(daemon.log().contains("handed over with their state"), "{}", daemon.log());
    });
}

#[test]
fn a_drain_timer_of_an_older_activation_spares_the_current_generation() {
    let Versioned { daemon, library, .. } = versioned("");
    runtime().block_on(async {
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
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(ask(&mut current, b"b").await, b"v2:b", "the stale drain timer closed nothing");
    });
}

#[test]
fn a_generation_that_refuses_a_listeners_config_changes_nothing() {
    let Versioned { daemon, library, .. } = versioned("");
    runtime().block_on(async {
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
        let plugins = client.plugins.list_plugins(v1::ListPluginsRequest {}).await.unwrap().into_inner();
        let versioned = plugins.plugins.iter().find(|p| p.name == "versioned").unwrap();
        assert_eq!(versioned.current_generation, 1);
        let v2 = versioned.generations.iter().find(|g| g.generation == 2).unwrap();
        assert_eq!(v2.state, v1::GenerationState::Standby as i32);
        let mut stream = TcpStream::connect(address).await.unwrap();
        assert_eq!(ask(&mut stream, b"a").await, b"v1:a", "the listener still serves generation 1");
    });
}
