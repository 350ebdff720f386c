//! The asyncore engine of asyncored: a level-triggered poll loop over a
//! channel map, the plugin generations it serves, and the loader that turns
//! a library into a plugin.
//!
//! One [`Engine`] runs on one thread and owns every socket, dispatcher,
//! output queue and timer. Other threads reach it only through an
//! [`EngineHandle`]: a closed [`Command`] enum pushed on a queue, a wake-up
//! of the poller, and a `oneshot` reply. Nothing here knows of protobuf,
//! serde or a tokio runtime (only `tokio::sync::oneshot` carries replies);
//! the daemon's gRPC layer converts at its edge.
//!
//! Modules, from the ground up: `ids` (typed keys), `loader` (`dlopen` and
//! the ABI checks; a leaf), `host_abi` (the plugin boundary and its unsafe
//! contract, in one place), [`plugin_host`] (loading with this host),
//! [`command`] (the commands and answers), `poll_loop` (the loop, one
//! module per seam).

/// The C ABI the engine hosts plugins over (the `asyncore-abi` crate).
pub use asyncore_abi as abi;

pub mod command;
mod config;
mod epoll;
mod host_abi;
mod ids;
mod loader;
pub mod plugin_host;
mod plugin_metrics;
mod poll_loop;
#[cfg(test)]
mod test_plugin;

pub use crate::{
    command::{Command, CommandError, EngineHandle, LoadPlugin},
    config::{RESERVED_KEYS, parse_duration},
    plugin_host::{LoadedPlugin, PluginLoadError, PluginPolicy},
    poll_loop::Engine,
};
