//! `asyncored`: parses flags, starts the daemon, waits for a signal.
//!
//! SIGTERM drains gracefully (listeners stop, channels flush and close,
//! the peers acknowledge every byte); a second SIGTERM, or SIGINT, stops at
//! once. SIGHUP re-reads the config file and applies the difference in
//! listeners.
//!
//! Under systemd (`Type=notify`) it reports readiness and stopping, and pings
//! the watchdog while the poll loop answers (`sd_notify`).

mod sd_notify;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use asyncored::{
    Config, Daemon,
    config::{ListenFlag, LogFormat},
    config_reload::ReloadStage,
};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// An asyncore-style poll loop hosting dispatcher plugins, managed over gRPC
/// and HTTP/JSON.
#[derive(Debug, Parser)]
#[command(name = "asyncored", version)]
struct Flags {
    /// Address of the gRPC control API, or unix:PATH for a Unix socket
    /// (mode 0600, in a directory of mode 0700) [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR|unix:PATH")]
    control: Option<ListenFlag>,
    /// Address of the HTTP/JSON API, /metrics and the health checks,
    /// unix:PATH, or `none` [default: 127.0.0.1:50052].
    #[arg(long, value_name = "ADDR|unix:PATH|none")]
    http: Option<ListenFlag>,
    /// Load every plugin library in DIR at start (repeatable) [default: the
    /// directory of this binary].
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// Let `LoadPlugin` load libraries from any path, not only from the
    /// plugin directories.
    #[arg(long)]
    allow_any_plugin_path: bool,
    /// Reload a plugin when its library in a plugin directory changes.
    #[arg(long)]
    watch: bool,
    /// TOML config file; flags override it. Without it the daemon serves the
    /// echo plugin on 127.0.0.1:7007.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How log lines are written to stderr: text, or json (one object per
    /// line, for log shippers) [default: the config's log_format, or text].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Save the runtime state in DIR after every change made through the
    /// API (listeners started, stopped, suspended, resumed, their
    /// max_connections; plugins loaded, reloaded, activated and unloaded,
    /// with their files' sha256), before answering, and restore it at
    /// start, on top of the config: the config's listeners always start,
    /// with the file's settings (a port-0 one on the port it had, never
    /// twice); saved listeners the config does not declare start again;
    /// saved plugin generations come back with their numbers. A state that
    /// cannot be read or restored in full is logged and moved aside
    /// (state.json.bad-TIME) [default: the config's state_dir, or none].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Bearer tokens of the control plane, one a line `name level secret`
    /// (level read or admin): every gRPC and HTTP call but the health
    /// checks then needs `authorization: Bearer SECRET`. Required to listen
    /// on an address that is not loopback [default: the config's
    /// token_file, or none].
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// With --token-file, serve /metrics without a token.
    #[arg(long)]
    metrics_public: bool,
    /// Serve the control and HTTP APIs on TCP over TLS with this PEM
    /// certificate chain (with --tls-key). With TLS an address that is not
    /// loopback may be served without --token-file [default: the config's
    /// tls_cert, or none].
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert [default: the config's tls_key].
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate signed by this PEM CA
    /// (optional when --token-file is set too; then a client without one
    /// needs a token). A verified client certificate is admin, and audited
    /// as cert:CN [default: the config's client_ca, or none].
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    match run(flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("asyncored: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(flags: Flags) -> anyhow::Result<()> {
    let mut config = match &flags.config {
        Some(path) => Config::from_file(path)?,
        None => Config::builtin_default(),
    };
    match flags.control {
        Some(ListenFlag::Tcp(control)) => (config.control, config.control_socket) = (control, None),
        Some(ListenFlag::Unix(path)) => config.control_socket = Some(path),
        Some(ListenFlag::None) => anyhow::bail!("--control none: the control api cannot be turned off"),
        None => {}
    }
    match flags.http {
        Some(ListenFlag::Tcp(http)) => (config.http, config.http_socket) = (Some(http), None),
        Some(ListenFlag::Unix(path)) => config.http_socket = Some(path),
        Some(ListenFlag::None) => (config.http, config.http_socket) = (None, None),
        None => {}
    }
    if !flags.plugin_dirs.is_empty() {
        config.plugin_dirs = flags.plugin_dirs;
    }
    config.allow_any_plugin_path |= flags.allow_any_plugin_path;
    config.watch |= flags.watch;
    if let Some(log_format) = flags.log_format {
        config.log_format = log_format;
    }
    if let Some(token_file) = flags.token_file {
        config.token_file = Some(token_file);
    }
    config.metrics_public |= flags.metrics_public;
    if let (Some(cert), Some(key)) = (flags.tls_cert, flags.tls_key) {
        (config.tls_cert, config.tls_key) = (Some(cert), Some(key));
    }
    if let Some(client_ca) = flags.client_ca {
        config.client_ca = Some(client_ca);
    }
    if let Some(state_dir) = flags.state_dir {
        config.state_dir = Some(state_dir);
    }
    // Installed once the config says how; errors before that (flags, the
    // config file) go to stderr as one line from `main`. Dropped last, after
    // the runtime: it flushes what is still queued.
    let _log_guard = install_log(config.log_format);

    match asyncored::limits::raise_fd_limit() {
        Ok((old, new)) if old != new => tracing::info!(old, new, "raised the open-descriptor limit"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-descriptor limit"),
    }

    // `Type=notify` under systemd (nothing otherwise): READY=1, STOPPING=1
    // and the watchdog's pings.
    let systemd = sd_notify::Notifier::from_env();
    let drain_timeout = Duration::from_secs(config.drain_timeout_secs);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("grpc")
        // The control plane yields to the poll loop when they share a core.
        .on_thread_start(|| {
            if let Err(e) = asyncored::limits::yield_to_the_poll_loop() {
                tracing::debug!(error = %e, "cannot lower the control plane's priority");
            }
        })
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
        // Installed before the start too: SIGHUP's default action kills.
        let mut hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
        let daemon = Daemon::start(config).await?;
        if let Some(http) = daemon.http_endpoint() {
            println!("asyncored http: {http}");
        }
        // Scripts and tests wait for this line: everything is bound.
        println!("asyncored ready: control {}", daemon.control_endpoint());
        systemd.ready(daemon.control_endpoint());
        systemd.spawn_watchdog(daemon.engine().clone());
        #[cfg(feature = "fault-injection")]
        inject_fault(&daemon);
        // RELOADING=1 and READY=1 around every config reload, whether SIGHUP
        // or the ReloadConfig RPC asked for it.
        let notifier = systemd.clone();
        daemon.config_reload().on_reload(move |stage| match stage {
            ReloadStage::Begin => notifier.reloading(),
            ReloadStage::End => notifier.reloaded(),
        });
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: reloading the config");
                    // Logged either way; a refused file changes nothing.
                    let _ = daemon.config_reload().reload().await;
                }
                _ = terminate.recv() => {
                    tracing::info!("SIGTERM: draining (a second SIGTERM or a SIGINT stops at once)");
                    systemd.stopping(Some(drain_timeout));
                    let again = async {
                        let signal = tokio::select! {
                            _ = terminate.recv() => "SIGTERM",
                            _ = interrupt.recv() => "SIGINT",
                        };
                        tracing::warn!("{signal} during the drain: stopping now, closing what is left");
                    };
                    daemon.drain_until(again).await;
                    break;
                }
                _ = interrupt.recv() => {
                    tracing::info!("SIGINT: stopping");
                    systemd.stopping(None);
                    daemon.shutdown().await;
                    break;
                }
                // Nothing can be served without the poll loop: exit non-zero
                // so that a supervisor restarts the daemon.
                ended = daemon.wait() => {
                    ended?;
                    anyhow::bail!("the poll loop stopped");
                }
            }
        }
        Ok(())
    })
}

/// Installs the global log subscriber: the filter from `RUST_LOG` (default
/// `info`), lines in `format` on stderr. Returns the guard that flushes the
/// queue when dropped.
///
/// Records are queued for a writer thread rather than written from the
/// thread that emits them: a stalled stderr (a full pipe nobody reads) must
/// not stop the poll loop or the control API. When the queue is full,
/// records are dropped (lossy) instead of waited for.
fn install_log(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal as _;

    // Colour only for a person at a terminal: a log file or a journal would
    // keep the escape codes as text. NO_COLOR (https://no-color.org) wins.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let (log_writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_writer(log_writer);
    match format {
        LogFormat::Text => subscriber.with_ansi(colour).init(),
        // Each line one object: the time, level, target, thread name and
        // the event's fields, its message among them.
        LogFormat::Json => subscriber.json().with_ansi(false).with_thread_names(true).init(),
    }
    guard
}

/// Test-only (feature `fault-injection`, which only the integration tests
/// enable): `ASYNCORED_INJECT_FAULT=poll-loop-panic` panics the poll loop
/// once the daemon is ready, so that tests can watch the process exit.
#[cfg(feature = "fault-injection")]
fn inject_fault(daemon: &Daemon) {
    if std::env::var("ASYNCORED_INJECT_FAULT").is_ok_and(|fault| fault == "poll-loop-panic") {
        tracing::warn!("fault injection: panicking the poll loop");
        let _ = daemon.engine().send(asyncored::Command::PanicForTest);
    }
}
