//! asyncored: an asyncore-style poll loop hosting dispatcher plugins,
//! managed over gRPC and HTTP/JSON.
//!
//! The daemon is a library so that tests (and embedders) can start it
//! in-process; `main.rs` only parses flags and waits for signals. See
//! `ARCHITECTURE.md` at the repository root for the map.

mod auth;
pub mod config;
pub mod config_reload;
pub mod grpc;
mod http;
pub mod lifecycle;
pub mod limits;
pub mod state;
mod tls;
mod unix;
mod watch;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::sync::oneshot;
use tracing::{info, warn};

pub use asyncore_engine::{Command, CommandError, Engine, EngineHandle, PluginPolicy};

pub use crate::{
    config::Config,
    config_reload::{ConfigReload, ReloadError, ReloadOutcome},
    lifecycle::{Lifecycle, Phase, PollLoopDied},
};

/// How long dropping a daemon waits for its poll loop to exit. The loop
/// exits at its next pass; only a plugin callback that blocks, against the
/// SDK's contract, can hold it up longer.
const STOP_PATIENCE: Duration = Duration::from_secs(5);

pub use crate::unix::Endpoint;

/// The control API's socket, bound.
enum ControlListener {
    Tcp(tokio::net::TcpListener),
    Unix(unix::UnixIncoming),
}

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
    control: Endpoint,
    /// The HTTP API, unless turned off (`--http none`).
    http: Option<http::HttpServer>,
    engine: EngineHandle,
    lifecycle: Lifecycle,
    poll_loop: PollThread,
    server: tokio::task::JoinHandle<()>,
    stop_server: Option<oneshot::Sender<()>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    drain_timeout: Duration,
    /// Re-reads the config file (SIGHUP, `ReloadConfig`).
    config_reload: Arc<ConfigReload>,
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
        config.validate()?;
        // Before anything starts: a control plane open to the network
        // without authentication is refused.
        let auth = Arc::new(auth::Auth::load(config.token_file.as_deref(), config.metrics_public)?);
        // TLS of both APIs on TCP; a bad file stops the start here.
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let files = tls::TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: config.client_ca.clone() };
                Some(tls::Tls::load(&files, auth.enabled())?)
            }
            _ => None,
        };
        if config.control_socket.is_none() {
            auth::check_exposure("control api", config.control, &auth, tls.is_some(), config.client_ca.is_some())?;
        }
        if let (Some(address), None) = (config.http, &config.http_socket) {
            auth::check_exposure("http api", address, &auth, tls.is_some(), config.client_ca.is_some())?;
        }
        let lifecycle = Lifecycle::default();
        // From here on, an early return drops `poll_loop`, which stops the
        // thread and so closes whatever it bound.
        let poll_loop = PollThread::spawn(
            lifecycle.clone(),
            Duration::from_secs(config.drain_timeout_secs),
            config.slow_callback(),
        )?;
        let engine = poll_loop.engine.clone();
        if config.max_connections > 0 {
            let set = Some(Some(config.max_connections));
            engine.request(|reply| Command::DaemonLimits { set, reply }).await?;
        }

        // The saved runtime state goes on top of the config: its plugin
        // generations first (with their numbers), then the plugin
        // directories, then the config's listeners and the saved ones.
        let state = match &config.state_dir {
            Some(dir) => Some(Arc::new(state::StateStore::open(dir, config.max_connections).await?)),
            None => None,
        };
        let mut restore = match &state {
            Some(store) => store.read().await.map(state::Restore::new),
            None => None,
        };
        let policy = PluginPolicy::new(&config.plugin_dirs, config.allow_any_plugin_path);
        if let Some(restore) = &mut restore {
            restore.limits(&engine, config.max_connections).await;
            restore.plugins(&engine, &policy).await;
        }
        load_plugin_dirs(&engine, &config, restore.as_ref()).await;
        if let Some(restore) = &mut restore {
            restore.currents(&engine).await;
        }
        // What the config started, which a config reload compares with.
        let mut config_started = Vec::new();
        for listener in &config.listeners {
            let declared: SocketAddr = listener
                .address
                .parse()
                .with_context(|| format!("listener {:?}: expected ip:port", listener.address))?;
            let start = |address: SocketAddr| {
                let config: BTreeMap<String, String> = listener.config.clone();
                let plugin = listener.plugin.clone();
                engine.request(move |reply| Command::StartListener { address, plugin, config, reply })
            };
            // A config listener the state saved listens where it did (a
            // port-0 one on the port it got), or else where declared.
            let saved = restore.as_mut().and_then(|r| r.config_listener(listener, declared));
            let started = match saved.as_ref().map(|saved| saved.address) {
                Some(address) if address != declared => match start(address).await {
                    Ok(started) => Ok(started),
                    Err(e) => {
                        if let Some(restore) = &mut restore {
                            restore.listener_moved(listener, address, &e);
                        }
                        start(declared).await
                    }
                },
                _ => start(declared).await,
            };
            let started = started.with_context(|| format!("listener {} ({})", listener.address, listener.plugin))?;
            if let (Some(restore), Some(saved)) = (&mut restore, &saved) {
                restore.resuspend(&engine, started.id, saved).await;
            }
            config_started.push(started.clone());
            if let Some(store) = &state {
                store.declare(started.id, listener.address.clone()).await;
            }
        }
        if let Some(store) = &state {
            if let Some(mut restore) = restore {
                restore.listeners(&engine).await;
                restore.finish(store).await;
            }
            // What runs now, restored or not, is the state from here on.
            store.save(&engine).await.context("cannot save the runtime state")?;
        }

        let (control, control_endpoint) = match &config.control_socket {
            Some(path) => {
                let incoming = unix::bind("control api", path)?;
                (ControlListener::Unix(incoming), Endpoint::Unix(path.clone()))
            }
            None => {
                let listener = tokio::net::TcpListener::bind(config.control)
                    .await
                    .with_context(|| format!("cannot bind the control api on {}", config.control))?;
                let address = listener.local_addr()?;
                (ControlListener::Tcp(listener), Endpoint::Tcp(address))
            }
        };
        let http_listener = match (&config.http_socket, config.http) {
            (Some(path), _) => Some(http::bind_unix(path)?),
            (None, Some(address)) => Some(http::bind(address).await?),
            (None, None) => None,
        };
        // Nothing below fails: the tasks spawned now are cancelled by `Drop`.
        let (stop_server, stopped) = oneshot::channel::<()>();
        let watcher = config.watch.then(|| {
            info!("watching plugin libraries for changes");
            tokio::spawn(watch::watch_plugins(engine.clone(), policy.clone()))
        });
        let mut api =
            grpc::ControlApi::new(engine.clone(), lifecycle.clone(), policy).with_stats_limits(config.stats_limits());
        let credentials = config_reload::Credentials { auth: Some(auth.clone()), tls: tls.clone() };
        let config_reload = Arc::new(
            ConfigReload::new(&config, engine.clone(), &config_started)
                .with_state(state.clone())
                .with_credentials(credentials),
        );
        api = api.with_config_reload(config_reload.clone());
        if let Some(store) = state {
            api = api.with_state(store);
        }
        let http = http_listener.map(|bound| {
            http::HttpServer::spawn(bound, api.clone(), engine.clone(), lifecycle.clone(), auth.clone(), tls.as_ref())
        });
        let control_tls = tls.is_some() && matches!(control, ControlListener::Tcp(_));
        let server = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            let served = match (control, tls) {
                (ControlListener::Tcp(listener), Some(tls)) => {
                    let incoming = grpc::Incoming::new(listener);
                    let incoming = tls::TlsIncoming::new(incoming, &tls, tls::Protocol::Grpc, "control api");
                    api.serve(incoming, auth, shutdown).await
                }
                (ControlListener::Tcp(listener), None) => {
                    api.serve(grpc::Incoming::new(listener), auth, shutdown).await
                }
                (ControlListener::Unix(incoming), _) => api.serve(incoming, auth, shutdown).await,
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "control api failed");
            }
        });
        info!(address = %control_endpoint, tls = control_tls, "control api listening");
        lifecycle.set(Phase::Running);
        Ok(Daemon {
            control: control_endpoint,
            http,
            engine,
            lifecycle,
            poll_loop,
            server,
            stop_server: Some(stop_server),
            watcher,
            drain_timeout: Duration::from_secs(config.drain_timeout_secs),
            config_reload,
        })
    }

    /// The bound address of the control API.
    ///
    /// # Panics
    ///
    /// If the control API is on a Unix socket (`control_socket`): see
    /// [`Daemon::control_endpoint`].
    pub fn control_addr(&self) -> SocketAddr {
        match &self.control {
            Endpoint::Tcp(address) => *address,
            Endpoint::Unix(path) => panic!("the control api is on the unix socket {}", path.display()),
        }
    }

    /// Where the control API listens: its bound address or Unix socket.
    pub fn control_endpoint(&self) -> &Endpoint {
        &self.control
    }

    /// The bound address of the HTTP API, unless it is turned off or on a
    /// Unix socket ([`Daemon::http_endpoint`]).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        match self.http_endpoint()? {
            Endpoint::Tcp(address) => Some(*address),
            Endpoint::Unix(_) => None,
        }
    }

    /// Where the HTTP API listens, unless it is turned off.
    pub fn http_endpoint(&self) -> Option<&Endpoint> {
        self.http.as_ref().map(http::HttpServer::endpoint)
    }

    /// A handle for sending commands to the poll loop.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// The lifecycle phase.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// Re-reads the config file and applies the difference in listeners
    /// (what SIGHUP does).
    pub fn config_reload(&self) -> &Arc<ConfigReload> {
        &self.config_reload
    }

    /// Resolves when the poll loop has ended by itself: `Ok` when it was
    /// told to (a `Shutdown` command), [`PollLoopDied`] when it died (a
    /// panic, a failed wait on the poller). Nothing is served after that:
    /// health answers NOT_SERVING and every call UNAVAILABLE. `main` exits
    /// non-zero on the error so that a supervisor restarts the daemon; an
    /// embedder should drop it and start another.
    ///
    /// # Errors
    ///
    /// [`PollLoopDied`], with the panic message or the poller's error.
    pub async fn wait(&self) -> Result<(), PollLoopDied> {
        self.lifecycle.ended().await
    }

    /// Graceful stop (SIGTERM): stop accepting, close every channel after
    /// flushing its output (the dispatcher's own included) and after its
    /// peer acknowledged every byte, wait for them up to the drain timeout,
    /// then stop.
    pub async fn drain(self) {
        self.drain_until(std::future::pending()).await;
    }

    /// [`drain`](Daemon::drain), cut short when `stop_now` completes (a
    /// second SIGTERM, or a SIGINT): then every channel still open is
    /// closed at once, as [`shutdown`](Daemon::shutdown) does.
    pub async fn drain_until(mut self, stop_now: impl Future<Output = ()>) {
        self.lifecycle.set(Phase::Draining);
        let deadline = Instant::now() + self.drain_timeout;
        tokio::select! {
            _ = self.engine.request(|reply| Command::Drain { deadline, reply }) => {}
            () = stop_now => {
                let _ = self.engine.send(Command::Shutdown);
            }
        }
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
        if let Some(http) = &mut self.http {
            http.stop().await;
        }
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
    fn spawn(lifecycle: Lifecycle, close_timeout: Duration, slow_callback: Duration) -> anyhow::Result<PollThread> {
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
                engine.set_slow_callback(slow_callback);
                let _ = handle_tx.send(Ok(engine.handle()));
                // A panic out of the loop is a bug in the engine, and no
                // channel can be served after it. It is caught only to say
                // so: in the log, and as `Phase::Failed`, which turns health
                // to NOT_SERVING and makes `main` exit non-zero.
                let ended = panic::catch_unwind(AssertUnwindSafe(|| engine.run()));
                // Dropping the engine closes its sockets. After a panic its
                // state may be broken: a second panic there is caught too.
                let dropped = panic::catch_unwind(AssertUnwindSafe(move || drop(engine)));
                match ended {
                    Ok(Ok(())) if dropped.is_ok() => lifecycle.set(Phase::Stopped),
                    Ok(Ok(())) => {
                        let message = dropped.err().map(|p| panic_message(&*p)).unwrap_or_default();
                        tracing::error!(panic = %message, "the poll loop panicked while closing its channels");
                        lifecycle.fail(format!("panicked while closing: {message}"));
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "the poll loop failed waiting on the poller; nothing is served any more");
                        lifecycle.fail(format!("waiting on the poller failed: {e}"));
                    }
                    Err(payload) => {
                        let message = panic_message(&*payload);
                        tracing::error!(panic = %message, "the poll loop panicked; nothing is served any more");
                        lifecycle.fail(format!("panicked: {message}"));
                    }
                }
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

/// The message of a panic payload (`panic!` makes a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(text), _) => (*text).to_string(),
        (_, Some(text)) => text.clone(),
        _ => "a panic without a message".to_string(),
    }
}

/// Loads every `*.so` of the plugin directories at start, under the policy
/// `LoadPlugin` applies (a symlink that leads out of the plugin directories
/// is skipped, unless any path is allowed). A library that fails to load is
/// logged and skipped.
///
/// When several libraries carry the same plugin name, the newest file (by
/// modification time, then by path) becomes current and the others are
/// loaded as standby generations, to activate by hand; the log says which.
/// So libraries are loaded oldest first, each made current in turn.
///
/// With a restored state, the libraries it accounts for (restored, or
/// unloaded before) are left out.
async fn load_plugin_dirs(engine: &EngineHandle, config: &Config, restore: Option<&state::Restore>) {
    // Private directories of daemons killed while loading (a daemon's own
    // is removed as soon as its load is over).
    asyncore_engine::plugin_host::remove_stale_private_dirs();
    let policy = PluginPolicy::new(&config.plugin_dirs, config.allow_any_plugin_path);
    let mut libraries: Vec<(std::time::SystemTime, PathBuf)> =
        config.plugin_dirs.iter().flat_map(|dir| plugin_dir_libraries(dir, &policy)).collect();
    libraries.sort();
    // One file reached twice (two directories, or a symlink beside it).
    libraries.dedup_by(|later, earlier| later.1 == earlier.1);
    let mut loaded: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for (_, path) in libraries {
        if let Some(restore) = restore
            && restore.accounts_for(&path).await
        {
            continue;
        }
        let request = asyncore_engine::LoadPlugin { path: path.clone(), activate: true, ..Default::default() };
        match engine.load_plugin(request).await {
            Ok(plugin) => loaded.entry(plugin.name).or_default().push(path),
            Err(e) => warn!("skipping {}: {e}", path.display()),
        }
    }
    for (name, paths) in loaded {
        if let Some((current, standby)) = paths.split_last()
            && !standby.is_empty()
        {
            let standby: Vec<String> = standby.iter().map(|p| p.display().to_string()).collect();
            warn!(
                plugin = %name,
                current = %current.display(),
                standby = %standby.join(", "),
                "{} libraries carry plugin name {name:?}: the newest is current, the others are standby generations",
                standby.len() + 1
            );
        }
    }
}

/// The `*.so` files in `dir` that `policy` allows (resolved), with their
/// modification times; the others are logged.
fn plugin_dir_libraries(dir: &Path, policy: &PluginPolicy) -> Vec<(std::time::SystemTime, PathBuf)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot read plugin directory");
            return Vec::new();
        }
    };
    let mut libraries = Vec::new();
    for path in entries.filter_map(Result::ok).map(|e| e.path()) {
        if path.extension().is_none_or(|e| e != std::env::consts::DLL_EXTENSION) {
            continue;
        }
        match policy.check(&path) {
            Ok(resolved) => {
                let modified = std::fs::metadata(&resolved).and_then(|m| m.modified());
                libraries.push((modified.unwrap_or(std::time::SystemTime::UNIX_EPOCH), resolved));
            }
            Err(e) => warn!("skipping {}: {e}", path.display()),
        }
    }
    libraries
}
