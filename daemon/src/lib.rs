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

/// A started daemon: the poll-loop thread and the control API.
#[derive(Debug)]
pub struct Daemon {
    control: SocketAddr,
    engine: EngineHandle,
    lifecycle: Lifecycle,
    poll_thread: Option<thread::JoinHandle<()>>,
    server: tokio::task::JoinHandle<()>,
    stop_server: Option<oneshot::Sender<()>>,
    drain_timeout: Duration,
}

impl Daemon {
    /// Starts the poll loop, loads the plugin directories, starts the
    /// configured listeners and serves the control API. Returns once all of
    /// it is up (the lifecycle is then `Running`).
    ///
    /// # Errors
    ///
    /// If the control address or a configured listener cannot be bound, or
    /// the poll loop cannot start. A plugin that fails to load is reported
    /// and skipped.
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        let lifecycle = Lifecycle::default();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let lifecycle_for_loop = lifecycle.clone();
        let poll_thread = thread::Builder::new()
            .name("poll-loop".to_string())
            .spawn(move || {
                let mut engine = match Engine::new() {
                    Ok(engine) => engine,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(engine.handle()));
                if let Err(e) = engine.run() {
                    tracing::error!(error = %e, "poll loop failed");
                }
                lifecycle_for_loop.set(Phase::Stopped);
            })
            .context("cannot start the poll-loop thread")?;
        let engine =
            handle_rx.recv().context("the poll-loop thread died at start")?.context("cannot create the poller")?;

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
        let (stop_server, stopped) = oneshot::channel::<()>();
        let policy = PluginPolicy::new(&config.plugin_dirs, config.allow_any_plugin_path);
        if config.watch {
            info!("watching plugin libraries for changes");
            tokio::spawn(watch::watch_plugins(engine.clone(), policy.clone()));
        }
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
            poll_thread: Some(poll_thread),
            server,
            stop_server: Some(stop_server),
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
        if let Some(thread) = self.poll_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.lifecycle.set(Phase::Stopped);
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
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
        let result = engine.load_plugin(path.clone(), None, false, None).await;
        if let Err(e) = result {
            warn!("skipping {}: {e}", path.display());
        }
    }
}
