//! Integration tests against the daemon: in-process (`InProcessDaemon`)
//! where signals, flags, the process's log and memory and the CLI are not
//! the point, the real `asyncored` binary (`Daemon`) where they are. One
//! test binary with a module per area keeps link times down.

mod abi;
mod chat;
mod cli;
mod cli_plugins;
mod describe;
mod drain;
mod echo;
mod embedding;
mod engine;
mod errors;
mod fd_exhaustion;
mod http;
mod http_api;
mod http_api_metrics;
mod http_api_openapi;
mod idle;
mod layering;
mod lifecycle;
mod lines;
mod listener_history;
mod listener_lifecycle;
mod listeners;
mod lockout;
mod log_format;
mod logging;
mod loop_death;
mod panics;
mod plugin_files;
mod plugin_new;
mod promises;
mod proxy;
mod reflection;
mod reload;
mod scheduling;
mod sd_notify;
mod security;
mod sighup;
mod slow_callbacks;
mod state;
mod stats_watchers;
mod status_page;
mod timers;
mod top;
mod unload;
mod validation;

/// A multi-threaded runtime for one test. An in-process daemon's control API
/// runs on the runtime it was started on: keep that runtime alive as long as
/// the daemon.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}
