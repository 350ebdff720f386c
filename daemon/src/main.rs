//! `asyncored`: parses flags, starts the daemon, waits for a signal.
//!
//! SIGTERM drains gracefully (listeners stop, channels flush and close);
//! SIGINT stops at once.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use asyncored::{Config, Daemon};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// An asyncore-style poll loop hosting dispatcher plugins, managed over gRPC.
#[derive(Debug, Parser)]
#[command(name = "asyncored", version)]
struct Flags {
    /// Address of the gRPC control API [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    control: Option<SocketAddr>,
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
}

fn main() -> ExitCode {
    // Log records are queued for a writer thread rather than written from
    // the thread that emits them: a stalled stderr (a full pipe nobody
    // reads) must not stop the poll loop or the control API. When the queue
    // is full, records are dropped (lossy) instead of waited for. The guard
    // flushes what is queued when `main` returns.
    let (log_writer, _log_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(log_writer)
        .init();
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
    if let Some(control) = flags.control {
        config.control = control;
    }
    if !flags.plugin_dirs.is_empty() {
        config.plugin_dirs = flags.plugin_dirs;
    }
    config.allow_any_plugin_path |= flags.allow_any_plugin_path;
    config.watch |= flags.watch;

    match asyncored::limits::raise_fd_limit() {
        Ok((old, new)) if old != new => tracing::info!(old, new, "raised the open-descriptor limit"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-descriptor limit"),
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("grpc")
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
        let daemon = Daemon::start(config).await?;
        // Scripts and tests wait for this line: everything is bound.
        println!("asyncored ready: control {}", daemon.control_addr());
        #[cfg(feature = "fault-injection")]
        inject_fault(&daemon);
        tokio::select! {
            _ = terminate.recv() => {
                tracing::info!("SIGTERM: draining");
                daemon.drain().await;
            }
            _ = interrupt.recv() => {
                tracing::info!("SIGINT: stopping");
                daemon.shutdown().await;
            }
            // Nothing can be served without the poll loop: exit non-zero so
            // that a supervisor restarts the daemon.
            ended = daemon.wait() => {
                ended?;
                anyhow::bail!("the poll loop stopped");
            }
        }
        Ok(())
    })
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
