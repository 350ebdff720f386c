//! `proxy`: forwards every accepted connection to `upstream` over an
//! outbound channel.
//!
//! Config: `upstream` (`ip:port`, required; names are not resolved, since
//! resolving would block the loop), `high_water` (bytes, default 262144).
//!
//! Backpressure both ways: a side stops reading while more than
//! `high_water` bytes wait to be written to the other side, and resumes once
//! that side has drained, so a slow reader on one end slows the other end's
//! sender and nothing buffers without bound. A half-close (EOF from one
//! side) is passed on as a write shutdown to the other side, which may go on
//! sending; the pair closes once both directions are done or either side
//! fails.

#![forbid(unsafe_code)]

use std::{cell::RefCell, io, net::SocketAddr, rc::Rc};

use asyncore_sdk::prelude::*;

struct ProxyServer {
    upstream: SocketAddr,
    high_water: usize,
}

impl Dispatcher for ProxyServer {
    fn handle_accepted(&mut self, channel: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
        let pair = Rc::new(RefCell::new(Pair::default()));
        pair.borrow_mut().ids[CLIENT] = channel.id();
        let upstream = Side { pair: pair.clone(), me: UPSTREAM, high_water: self.high_water };
        match channel.connect(self.upstream, Box::new(upstream)) {
            Ok(id) => pair.borrow_mut().ids[UPSTREAM] = id,
            Err(e) => {
                log!(warn, "channel {}: cannot connect to {}: {e}", channel.id(), self.upstream);
                return None;
            }
        }
        Some(Box::new(Side { pair, me: CLIENT, high_water: self.high_water }))
    }
}

const CLIENT: usize = 0;
const UPSTREAM: usize = 1;

/// What the two sides of one proxied connection share. Indexed by side.
#[derive(Debug, Default)]
struct Pair {
    ids: [ChannelId; 2],
    /// The side's peer closed its sending direction.
    eof: [bool; 2],
    /// The side shut down its own write direction (passing on the other
    /// side's EOF).
    shut: [bool; 2],
    /// The side stopped reading because the other side's output is full.
    paused: [bool; 2],
    /// The side failed or is gone.
    gone: [bool; 2],
}

struct Side {
    pair: Rc<RefCell<Pair>>,
    me: usize,
    high_water: usize,
}

impl Side {
    fn other(&self) -> usize {
        1 - self.me
    }

    fn peer(&self) -> ChannelId {
        self.pair.borrow().ids[self.other()]
    }
}

impl Dispatcher for Side {
    fn readable(&mut self, channel: &Channel<'_>) -> bool {
        let (me, other) = (self.me, self.other());
        let mut pair = self.pair.borrow_mut();
        if pair.gone[other] || pair.eof[me] {
            return false;
        }
        match channel.pending_output_of(pair.ids[other]) {
            Some(pending) if pending < self.high_water => {
                pair.paused[me] = false;
                true
            }
            Some(_) => {
                if !pair.paused[me] {
                    pair.paused[me] = true;
                    // The other side calls us back (wake) once drained.
                    channel.wake(pair.ids[other]);
                }
                false
            }
            None => false,
        }
    }

    fn writable(&mut self, _channel: &Channel<'_>) -> bool {
        let (me, other) = (self.me, self.other());
        let pair = self.pair.borrow();
        pair.paused[other] || (pair.eof[other] && !pair.shut[me]) || pair.gone[other]
    }

    fn handle_read(&mut self, channel: &mut Channel<'_>) {
        let mut buf = [MaybeUninit::uninit(); 64 * 1024];
        if let Ok(data @ [_, ..]) = channel.recv_uninit(&mut buf) {
            let peer = self.peer();
            if channel.send_to(peer, data).is_err() {
                self.pair.borrow_mut().gone[self.other()] = true;
                channel.close();
            }
        }
    }

    fn handle_write(&mut self, channel: &mut Channel<'_>) {
        let (me, other) = (self.me, self.other());
        let mut pair = self.pair.borrow_mut();
        if pair.gone[other] || (pair.eof[me] && pair.eof[other]) {
            channel.close();
            return;
        }
        if pair.eof[other] && !pair.shut[me] {
            channel.shutdown_write();
            pair.shut[me] = true;
        }
        if pair.paused[other] {
            // Our output drained: let the other side read again.
            channel.wake(pair.ids[other]);
        }
    }

    fn handle_close(&mut self, channel: &mut Channel<'_>) {
        let (me, other) = (self.me, self.other());
        let mut pair = self.pair.borrow_mut();
        pair.eof[me] = true;
        channel.wake(pair.ids[other]);
        if pair.eof[other] || pair.gone[other] {
            channel.close();
        }
    }

    fn handle_error(&mut self, channel: &mut Channel<'_>, error: io::Error) {
        let side = if self.me == CLIENT { "client" } else { "upstream" };
        log!(info, "channel {} ({side}): {error}", channel.id());
        let mut pair = self.pair.borrow_mut();
        pair.gone[self.me] = true;
        channel.wake(pair.ids[self.other()]);
    }
}

/// The `proxy` plugin: export it with `export_plugin!`, or run it in tests
/// with `asyncore_testing::TestServer::start::<Proxy>`.
pub struct Proxy;

impl Plugin for Proxy {
    const NAME: &'static str = "proxy";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn listen(config: &Config) -> Result<Box<dyn Dispatcher>, String> {
        let upstream = config.get("upstream").ok_or("config upstream: required (ip:port of the upstream)")?;
        let upstream: SocketAddr = upstream
            .parse()
            .map_err(|_| format!("config upstream: {upstream:?} is not ip:port (names are not resolved)"))?;
        let high_water = config.parse_or("high_water", 256 * 1024)?;
        if high_water == 0 {
            return Err("config high_water: must be at least 1".to_string());
        }
        Ok(Box::new(ProxyServer { upstream, high_water }))
    }
}

export_plugin!(Proxy);
