//! Integration tests against the real `asyncored` binary. One test binary
//! with a module per area keeps link times down.

mod abi;
mod chat;
mod cli;
mod cli_plugins;
mod echo;
mod engine;
mod errors;
mod http;
mod idle;
mod lifecycle;
mod lines;
mod panics;
mod proxy;
mod reflection;
mod reload;
mod timers;

/// A multi-threaded runtime for one test.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}
