//! Test a dispatcher plugin on the real engine, without the daemon.
//!
//! [`TestServer::start`] runs asyncored's own poll loop (the
//! `asyncore-engine` crate the daemon runs) on a thread of its own, hands it
//! your [`Plugin`] through the same descriptor, shims, `init` and `on_load`
//! a loaded library exposes, and starts a listener on `127.0.0.1:0`. What
//! your test sees is what the daemon will do: interest asked again only
//! after a callback ran or a channel was woken, EOF, linger, idle timeouts,
//! timers, outbound connections, `attach_fd`, and a caught panic closing
//! only its channel. Your test talks to it with plain blocking `TcpStream`s.
//!
//! ```
//! use std::io::{Read, Write};
//! use asyncore_sdk::prelude::*;
//! use asyncore_testing::TestServer;
//!
//! struct Upper;
//! impl Dispatcher for Upper {
//!     fn handle_read(&mut self, channel: &mut Channel<'_>) {
//!         let mut buf = [0u8; 1024];
//!         if let Ok(n @ 1..) = channel.recv(&mut buf) {
//!             channel.send(&buf[..n].to_ascii_uppercase());
//!         }
//!     }
//! }
//! struct Server;
//! impl Dispatcher for Server {
//!     fn handle_accepted(&mut self, _: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
//!         Some(Box::new(Upper))
//!     }
//! }
//! struct UpperPlugin;
//! impl Plugin for UpperPlugin {
//!     const NAME: &'static str = "upper";
//!     const VERSION: &'static str = "1";
//!     fn listen(_: &Config) -> Result<Box<dyn Dispatcher>, String> {
//!         Ok(Box::new(Server))
//!     }
//! }
//!
//! let server = TestServer::start::<UpperPlugin>(Config::default()).unwrap();
//! let mut client = server.connect(); // reads time out instead of hanging
//! client.write_all(b"hello").unwrap();
//! let mut back = [0u8; 5];
//! client.read_exact(&mut back).unwrap();
//! assert_eq!(&back, b"HELLO");
//! ```
//!
//! # Where the tests of a plugin crate go
//!
//! A plugin crate is a `cdylib`, and a test in its `tests/` folder cannot
//! link a crate that is only a `cdylib`. Either write the tests as a
//! `#[cfg(test)]` module inside the crate (it can name its `Plugin` type
//! directly), or make the crate `crate-type = ["cdylib", "rlib"]` so that
//! `tests/*.rs` can `use` it. Add this crate under `[dev-dependencies]`.
//!
//! # One plugin per test binary
//!
//! `export_plugin!` exports symbols of fixed names, so two plugin crates
//! linked into one test binary clash: test each plugin in its own crate's
//! tests. Plugin types defined inside a test file (without
//! `export_plugin!`) can share a binary; they all use that binary's copy of
//! the SDK, so the first one started registers the engine as the host of
//! them all. That is harmless (the host functions are the same), except
//! that log records are attributed to the plugin that started first.
//!
//! # Waiting
//!
//! Tests wait for what they can observe, never for a fixed time:
//! [`TestServer::connect`] gives a stream whose reads time out, and
//! [`eventually`] retries a condition until it holds or the patience
//! (`ASYNCORE_TEST_PATIENCE_MS`, 10 s by default) runs out.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    io,
    net::{SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

pub use asyncore_engine::command::{ChannelInfo, ChannelKind, ChannelState, MetricKind, PluginMetric};
use asyncore_engine::{Command, CommandError, Engine, EngineHandle, command::ListenerInfo, plugin_host};
use asyncore_sdk::{Config, Plugin};

/// A plugin served on `127.0.0.1:0` by the real engine on its own thread;
/// stopped on drop.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    plugin: String,
    listener_id: u64,
    engine: EngineHandle,
    logs: Logs,
    thread: Option<thread::JoinHandle<()>>,
}

impl TestServer {
    /// Starts serving plugin `P` with `config`.
    ///
    /// # Errors
    ///
    /// The message of `P::on_load` or `P::listen` refusing, or of binding.
    pub fn start<P: Plugin>(config: Config) -> Result<TestServer, String> {
        // The descriptor a library would export, built from the same code.
        let descriptor: &'static _ = Box::leak(Box::new(asyncore_sdk::__private::descriptor::<P>()));
        let config: BTreeMap<String, String> = config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let logs = Logs::default();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(EngineHandle, ListenerInfo), String>>();
        let thread = {
            let logs = logs.clone();
            thread::Builder::new()
                .name("poll-loop".to_string())
                .spawn(move || {
                    // Everything the engine and the plugin log on this
                    // thread (plugin records, caught panics) is kept for
                    // `logs()`.
                    let subscriber = tracing_subscriber::fmt()
                        .with_writer(logs.clone())
                        .with_ansi(false)
                        .without_time()
                        .with_max_level(tracing::Level::DEBUG)
                        .finish();
                    tracing::subscriber::with_default(subscriber, || {
                        let mut engine = match start_engine(descriptor, config) {
                            Ok(started) => started,
                            Err(message) => return drop(ready_tx.send(Err(message))),
                        };
                        let listener = engine.1;
                        let _ = ready_tx.send(Ok((engine.0.handle(), listener)));
                        if let Err(e) = engine.0.run() {
                            tracing::error!(error = %e, "poll loop failed");
                        }
                    });
                })
                .map_err(|e| format!("cannot start the engine thread: {e}"))?
        };
        let (engine, listener) = ready_rx.recv().map_err(|_| "the engine thread died at start".to_string())??;
        Ok(TestServer {
            addr: listener.address,
            plugin: P::NAME.to_string(),
            listener_id: listener.id,
            engine,
            logs,
            thread: Some(thread),
        })
    }

    /// The address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A connection to the server whose reads time out after the patience
    /// (see [`eventually`]), so that a test fails instead of hanging.
    ///
    /// # Panics
    ///
    /// If the connection fails.
    #[track_caller]
    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).expect("connect to the test server");
        stream.set_read_timeout(Some(patience())).expect("set a read timeout");
        stream
    }

    /// Channels open now: connections and the channels they created, not
    /// the listener, and not those already closing (flushing their output
    /// or waiting for the peer's close, as the daemon's `ListChannels`
    /// shows them with state `closing`).
    pub fn n_channels(&self) -> u64 {
        self.channels().iter().filter(|ch| ch.state != ChannelState::Closing).count() as u64
    }

    /// Every channel of the listener, the listening one excepted, as the
    /// daemon's `ListChannels` lists them (closing ones included).
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let listed = self.engine.request_blocking(|reply| Command::ListChannels {
            listener_id: Some(self.listener_id),
            after: 0,
            limit: usize::MAX,
            reply,
        });
        listed.map_or_else(
            |_| Vec::new(),
            |channels| channels.into_iter().filter(|ch| ch.kind != ChannelKind::Listening).collect(),
        )
    }

    /// The channel serving the client whose local address is `peer` (what
    /// `TcpStream::local_addr` answers on the test's side), for
    /// [`close_channel`](TestServer::close_channel).
    pub fn channel_by_peer(&self, peer: SocketAddr) -> Option<ChannelInfo> {
        self.channels().into_iter().find(|ch| ch.peer_address == Some(peer))
    }

    /// Callbacks that panicked so far.
    pub fn panics(&self) -> u64 {
        let plugins = self.engine.request_blocking(|reply| Command::ListPlugins { reply });
        plugins
            .ok()
            .and_then(|plugins| plugins.into_iter().find(|p| p.name == self.plugin))
            .map_or(0, |plugin| plugin.generations.iter().map(|g| g.panics).sum())
    }

    /// Channel `id` as `GetChannel` shows it, with what its dispatcher says
    /// of its state (`Dispatcher::describe`) in `annotations`.
    pub fn channel(&self, id: u64) -> Option<ChannelInfo> {
        self.engine.request_blocking(|reply| Command::GetChannel { id, reply }).ok()
    }

    /// The metrics the plugin defined (`asyncore_sdk::metrics`), with their
    /// values now, as the daemon exports them.
    pub fn metrics(&self) -> Vec<PluginMetric> {
        let plugins = self.engine.request_blocking(|reply| Command::ListPlugins { reply });
        plugins
            .ok()
            .and_then(|plugins| plugins.into_iter().find(|p| p.name == self.plugin))
            .map_or_else(Vec::new, |plugin| plugin.generations.into_iter().flat_map(|g| g.metrics).collect())
    }

    /// The value of metric `name`, if the plugin defined it.
    pub fn metric(&self, name: &str) -> Option<i64> {
        self.metrics().into_iter().find(|m| m.name == name).map(|m| m.value)
    }

    /// Everything the engine logged so far: the plugin's `log!` records
    /// (tagged `plugin=NAME`) and one line per caught panic, with its
    /// channel id.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lines()
    }

    /// The engine's command handle, for what the daemon's control API does
    /// (close a channel, list channels, stop the listener).
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// Closes channel `id` gracefully, as `asyncorectl channels close` does.
    ///
    /// # Errors
    ///
    /// As the engine answers: no such channel, or a listening channel.
    pub fn close_channel(&self, id: u64) -> Result<(), CommandError> {
        self.engine.request_blocking(|reply| Command::CloseChannel { id, reply }).map(drop)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.engine.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long a test waits for something before it fails:
/// `ASYNCORE_TEST_PATIENCE_MS` milliseconds, 10 s by default (raise it on
/// a slow machine).
pub fn patience() -> Duration {
    let ms = std::env::var("ASYNCORE_TEST_PATIENCE_MS").ok().and_then(|ms| ms.parse().ok()).unwrap_or(10_000);
    Duration::from_millis(ms)
}

/// Retries `condition` until it answers `true`; panics naming `what` once
/// the [`patience`] ran out.
///
/// ```
/// use std::sync::{Arc, atomic::{AtomicBool, Ordering}};
///
/// let done = Arc::new(AtomicBool::new(false));
/// let flag = done.clone();
/// std::thread::spawn(move || flag.store(true, Ordering::SeqCst));
/// // In a plugin test: `eventually("both served", || server.n_channels() == 2)`.
/// asyncore_testing::eventually("the thread to finish", || done.load(Ordering::SeqCst));
/// ```
#[track_caller]
pub fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience();
    let mut pause = Duration::from_millis(1);
    while !condition() {
        assert!(Instant::now() < deadline, "waited {:?} for: {what}", patience());
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Creates the engine, adds the plugin and starts its listener.
fn start_engine(
    descriptor: &'static asyncore_sdk::ffi::PluginDescriptor,
    config: BTreeMap<String, String>,
) -> Result<(Engine, ListenerInfo), String> {
    let mut engine = Engine::new().map_err(|e| format!("cannot create the poller: {e}"))?;
    let plugin = plugin_host::in_process(descriptor).map_err(|e| e.to_string())?;
    let name = plugin.name().to_string();
    engine.add_plugin(plugin, true).map_err(|e| e.to_string())?;
    let address = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = engine.start_listener(address, &name, config).map_err(|e| e.to_string())?;
    Ok((engine, listener))
}

/// Log lines written by the engine thread's subscriber.
#[derive(Debug, Clone, Default)]
struct Logs(Arc<Mutex<Vec<String>>>);

impl Logs {
    fn lines(&self) -> Vec<String> {
        self.0.lock().map(|lines| lines.clone()).unwrap_or_default()
    }
}

impl io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Ok(mut lines) = self.0.lock() {
            lines.extend(String::from_utf8_lossy(buf).lines().map(str::to_string));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}
