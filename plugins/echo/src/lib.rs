//! `echo`: the asyncore documentation's echo server. Every byte received is
//! sent back, exactly and in order.
//!
//! Config: `high_water` (bytes, default 262144): while more output than this
//! waits for a slow reader, the channel stops reading, so memory stays
//! bounded whatever the peer does.

#![forbid(unsafe_code)]

use asyncore_sdk::prelude::*;

struct EchoServer {
    high_water: usize,
}

impl Dispatcher for EchoServer {
    fn handle_accepted(&mut self, _channel: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
        Some(Box::new(EchoHandler { high_water: self.high_water }))
    }
}

struct EchoHandler {
    high_water: usize,
}

impl Dispatcher for EchoHandler {
    fn readable(&mut self, channel: &Channel<'_>) -> bool {
        channel.pending_output() < self.high_water
    }

    fn handle_read(&mut self, channel: &mut Channel<'_>) {
        // On the stack and not zeroed: no allocation per read, no buffer
        // per connection, no memset of 64 KiB for a 64-byte read.
        let mut buf = [MaybeUninit::uninit(); 64 * 1024];
        if let Ok(data) = channel.recv_uninit(&mut buf) {
            channel.send(data);
        }
    }
}

/// The `echo` plugin: export it with `export_plugin!`, or run it in tests
/// with `asyncore_testing::TestServer::start::<Echo>`.
pub struct Echo;

impl Plugin for Echo {
    const NAME: &'static str = "echo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn listen(config: &Config) -> Result<Box<dyn Dispatcher>, String> {
        let high_water = config.parse_or("high_water", 256 * 1024)?;
        if high_water == 0 {
            return Err("config high_water: must be at least 1".to_string());
        }
        Ok(Box::new(EchoServer { high_water }))
    }
}

export_plugin!(Echo);
