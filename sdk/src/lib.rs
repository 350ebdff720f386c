//! Write protocol handlers ("dispatcher plugins") for asyncored.
//!
//! This is Python's `asyncore` for a Rust daemon: you write a
//! [`Dispatcher`] with `readable()`/`writable()` and `handle_*` callbacks, the
//! daemon's poll loop calls them as sockets become ready. A plugin is a
//! `cdylib` crate that depends on this crate only; the daemon loads it at run
//! time (`asyncorectl plugins load PATH`) and serves listeners with it
//! (`asyncorectl listeners start 127.0.0.1:7007 echo`).
//!
//! A complete plugin, the echo server of the asyncore documentation:
//!
//! ```
//! use asyncore_sdk::prelude::*;
//!
//! /// The listening dispatcher: one per listener.
//! struct EchoServer {
//!     high_water: usize,
//! }
//!
//! impl Dispatcher for EchoServer {
//!     fn handle_accepted(&mut self, _channel: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
//!         Some(Box::new(EchoHandler { high_water: self.high_water }))
//!     }
//! }
//!
//! /// One per connection: sends back every byte it receives.
//! struct EchoHandler {
//!     high_water: usize,
//! }
//!
//! impl Dispatcher for EchoHandler {
//!     // Stop reading while a slow peer lets output pile up: the kernel's
//!     // buffers then push back on the sender, and memory stays bounded.
//!     fn readable(&mut self, channel: &Channel<'_>) -> bool {
//!         channel.pending_output() < self.high_water
//!     }
//!
//!     fn handle_read(&mut self, channel: &mut Channel<'_>) {
//!         // Not zeroed: a read costs what it reads.
//!         let mut buf = [MaybeUninit::uninit(); 16 * 1024];
//!         if let Ok(data) = channel.recv_uninit(&mut buf) {
//!             channel.send(data);
//!         }
//!     }
//! }
//!
//! struct Echo;
//!
//! impl Plugin for Echo {
//!     const NAME: &'static str = "echo";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!
//!     fn listen(config: &Config) -> Result<Box<dyn Dispatcher>, String> {
//!         let high_water = config.parse_or("high_water", 256 * 1024)?;
//!         Ok(Box::new(EchoServer { high_water }))
//!     }
//! }
//!
//! export_plugin!(Echo);
//! # fn main() {}
//! ```
//!
//! With `crate-type = ["cdylib"]` in its `Cargo.toml`, `cargo build` makes
//! `libecho.so`, which the daemon loads from its plugin directory.
//!
//! # Rules of the loop
//!
//! * Callbacks run on the daemon's single poll-loop thread and **must not
//!   block**.
//! * Wake-ups can be spurious; reads answer `WouldBlock` when nothing waits.
//! * A panic closes only the channel whose callback panicked; its dispatcher
//!   is never called again. Build plugins with `panic = "unwind"` (the
//!   default): the daemon refuses `panic = "abort"` builds, which would take
//!   it down on the first panic.
//! * Log with [`log!`](crate::log!): a plugin's own logger would go nowhere.

#![deny(missing_docs)]

mod channel;
mod chat;
mod config;
mod dispatcher;
mod export;
/// The C ABI between the daemon and a plugin library (the `asyncore-abi`
/// crate). Plugin authors never touch it; the export macro does.
pub use asyncore_abi as ffi;
pub mod log;
pub mod metrics;
pub mod prelude;

pub use channel::{Channel, ChannelId, TimerId};
pub use chat::{
    AsyncChat, Chat, ChatHandler, DEFAULT_MAX_QUEUED_PRODUCERS, DEFAULT_OUTPUT_HIGH_WATER, FileProducer, FrameSink,
    Framer, Producer, SimpleProducer, Terminator,
};
pub use config::Config;
pub use dispatcher::{CloseReason, Dispatcher};
pub use export::Plugin;

#[doc(hidden)]
pub mod __private {
    pub use crate::export::descriptor;
}
