//! asyncored: an asyncore-style poll loop hosting dispatcher plugins,
//! managed over gRPC.
//!
//! The daemon is a library so that tests (and embedders) can start it
//! in-process; `main.rs` only parses flags and waits for signals. See
//! `ARCHITECTURE.md` at the repository root for the map.

pub mod config;
pub mod grpc;
pub mod lifecycle;
pub mod limits;
mod watch;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::sync::oneshot;
use tracing::{info, warn};

pub use asyncore_engine::{Command, CommandError, Engine, EngineHandle, PluginPolicy};

pub use crate::{
    config::Config,
    lifecycle::{Lifecycle, Phase},
};

/// How long dropping a daemon waits for its poll loop to exit. The loop
/// exits at its next pass; only a plugin callback that blocks, against the
/// SDK's contract, can hold it up longer.
const STOP_PATIENCE: Duration = Duration::from_secs(5);

/// A started daemon: the poll-loop thread and the control API.
///
/// Dropping it stops everything it started: the poll loop exits (closing
/// every listener and channel, which the loop thread owns; the drop blocks
/// until the thread has ended, a few milliseconds), the control API stops
/// listening and the plugin watcher is cancelled. [`drain`](Daemon::drain)
/// and [`shutdown`](Daemon::shutdown) are the graceful ways; dropping is what
/// a failed start or a finished test does.
#[derive(Debug)]
pub struct Daemon {
    control: SocketAddr,
    engine: EngineHandle,
    lifecycle: Lifecycle,
    poll_loop: PollThread,
    server: tokio::task::JoinHandle<()>,
    stop_server: Option<oneshot::Sender<()>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    drain_timeout: Duration,
}

impl Daemon {
    /// Starts the poll loop, loads the plugin directories, starts the
    /// configured listeners and serves the control API. Returns once all of
    /// it is up (the lifecycle is then `Running`). Must be called within a
    /// tokio runtime, which then serves the control API.
    ///
    /// # Errors
    ///
    /// If the control address or a configured listener cannot be bound, or
    /// the poll loop cannot start. A plugin that fails to load is reported
    /// and skipped. Whatever had started by then is stopped again: the poll
    /// thread exits and the listeners it had bound are closed.
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        let lifecycle = Lifecycle::default();
        // From here on, an early return drops `poll_loop`, which stops the
        // thread and so closes whatever it bound.
        let poll_loop = PollThread::spawn(lifecycle.clone(), Duration::from_secs(config.drain_timeout_secs))?;
        let engine = poll_loop.engine.clone();

        for dir in &config.plugin_dirs {
            load_plugin_dir(&engine, dir).await;
        }
        for listener in &config.listeners {
            let address: SocketAddr = listener
                .address
                .parse()
                .with_context(|| format!("listener {:?}: expected ip:port", listener.address))?;
            let config: BTreeMap<String, String> = listener.config.clone();
            let plugin = listener.plugin.clone();
            engine
                .request(|reply| Command::StartListener { address, plugin, config, reply })
                .await
                .with_context(|| format!("listener {} ({})", listener.address, listener.plugin))?;
        }

        let control = tokio::net::TcpListener::bind(config.control)
            .await
            .with_context(|| format!("cannot bind the control api on {}", config.control))?;
        let control_addr = control.local_addr()?;
        // Nothing below fails: the tasks spawned now are cancelled by `Drop`.
        let (stop_server, stopped) = oneshot::channel::<()>();
        let policy = PluginPolicy::new(&config.plugin_dirs, config.allow_any_plugin_path);
        let watcher = config.watch.then(|| {
            info!("watching plugin libraries for changes");
            tokio::spawn(watch::watch_plugins(engine.clone(), policy.clone()))
        });
        let api = grpc::ControlApi::new(engine.clone(), lifecycle.clone(), policy);
        let server = tokio::spawn(async move {
            if let Err(e) = api
                .serve(control, async {
                    let _ = stopped.await;
                })
                .await
            {
                tracing::error!(error = %e, "control api failed");
            }
        });
        info!(address = %control_addr, "control api listening");
        lifecycle.set(Phase::Running);
        Ok(Daemon {
            control: control_addr,
            engine,
            lifecycle,
            poll_loop,
            server,
            stop_server: Some(stop_server),
            watcher,
            drain_timeout: Duration::from_secs(config.drain_timeout_secs),
        })
    }

    /// The bound address of the control API.
    pub fn control_addr(&self) -> SocketAddr {
        self.control
    }

    /// A handle for sending commands to the poll loop.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// The lifecycle phase.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// Graceful stop (SIGTERM): stop accepting, close every channel after
    /// flushing its output, wait for them up to the drain timeout, then
    /// stop.
    pub async fn drain(mut self) {
        self.lifecycle.set(Phase::Draining);
        let deadline = Instant::now() + self.drain_timeout;
        let _ = self.engine.request(|reply| Command::Drain { deadline, reply }).await;
        self.finish().await;
    }

    /// Fast stop (SIGINT): close everything now.
    pub async fn shutdown(mut self) {
        let _ = self.engine.send(Command::Shutdown);
        self.finish().await;
    }

    async fn finish(&mut self) {
        self.poll_loop.join().await;
        self.lifecycle.set(Phase::Stopped);
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
    }
}

impl Drop for Daemon {
    /// Cancels the control API and the watcher; then `poll_loop`'s own drop
    /// stops the loop. After [`drain`](Daemon::drain) or
    /// [`shutdown`](Daemon::shutdown) there is nothing left to stop.
    fn drop(&mut self) {
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        // Aborting drops the server's future, and with it the control
        // listener, at the runtime's next turn (or with the runtime).
        self.server.abort();
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
    }
}

/// The `poll-loop` thread and the handle to it. Dropping it stops the loop
/// and waits (up to [`STOP_PATIENCE`]) for the thread to end, so that the
/// sockets the engine owns are closed when the drop returns.
#[derive(Debug)]
struct PollThread {
    engine: EngineHandle,
    thread: Option<thread::JoinHandle<()>>,
    /// Disconnected once the engine is dropped on the loop thread: a
    /// bounded wait for that, which `JoinHandle::join` cannot give.
    exited: std::sync::mpsc::Receiver<()>,
}

impl PollThread {
    /// Starts the thread with a new engine and returns once the engine
    /// exists.
    fn spawn(lifecycle: Lifecycle, close_timeout: Duration) -> anyhow::Result<PollThread> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (exited_tx, exited) = std::sync::mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("poll-loop".to_string())
            .spawn(move || {
                // Declared first, so dropped last: after the engine and its
                // sockets.
                let _exited = exited_tx;
                let mut engine = match Engine::new() {
                    Ok(engine) => engine,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                // Every graceful close (a channel closed by the operator,
                // an idle timeout, a reload's drain) gets the drain timeout.
                engine.set_close_timeout(close_timeout);
                let _ = handle_tx.send(Ok(engine.handle()));
                if let Err(e) = engine.run() {
                    tracing::error!(error = %e, "poll loop failed");
                }
                drop(engine);
                lifecycle.set(Phase::Stopped);
            })
            .context("cannot start the poll-loop thread")?;
        let engine =
            handle_rx.recv().context("the poll-loop thread died at start")?.context("cannot create the poller")?;
        Ok(PollThread { engine, thread: Some(thread), exited })
    }

    /// Waits for the loop to end by itself (after a drain or a
    /// `Shutdown` command), off the async worker threads.
    async fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for PollThread {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        // A failed send means the loop is gone already.
        let _ = self.engine.send(Command::Shutdown);
        match self.exited.recv_timeout(STOP_PATIENCE) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                warn!(patience = ?STOP_PATIENCE, "the poll loop did not stop; leaving its thread behind");
            }
            // Disconnected: the engine is dropped and the thread is ending.
            _ => {
                let _ = thread.join();
            }
        }
    }
}

/// Loads every `*.so` in `dir`; failures are logged and skipped.
async fn load_plugin_dir(engine: &EngineHandle, dir: &Path) {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == std::env::consts::DLL_EXTENSION))
            .collect(),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot read plugin directory");
            return;
        }
    };
    paths.sort();
    for path in paths {
        let result = engine.load_plugin(asyncore_engine::LoadPlugin { path: path.clone(), ..Default::default() }).await;
        if let Err(e) = result {
            warn!("skipping {}: {e}", path.display());
        }
    }
}
