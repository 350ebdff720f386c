//! The harness catches a plugin that forgets to `wake` a cooperating
//! channel, as the daemon would: the engine asks a channel's `writable()`
//! again only after one of its own handlers ran or another channel woke
//! it, so output queued for it by someone else waits until then.
//!
//! The "relay" plugin below: the first connection of a listener becomes
//! the sink, the second the source. What the source reads goes into a
//! queue shared through `Rc<RefCell<..>>`; the sink's `writable()` answers
//! whether that queue has bytes and its `handle_write` sends them. With
//! `wake=yes` the source wakes the sink after queueing; with `wake=no` it
//! does not, and the sink stalls.

use std::{
    cell::RefCell,
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    rc::Rc,
    time::Duration,
};

use asyncore_sdk::prelude::*;
use asyncore_testing::{TestServer, eventually};

/// What the sink and the source of one listener share, on the poll thread.
#[derive(Default)]
struct Relay {
    sink: Option<ChannelId>,
    queue: Vec<u8>,
}

struct RelayServer {
    relay: Rc<RefCell<Relay>>,
    wake: bool,
}

impl Dispatcher for RelayServer {
    fn handle_accepted(&mut self, channel: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
        let mut relay = self.relay.borrow_mut();
        match relay.sink {
            None => {
                relay.sink = Some(channel.id());
                Some(Box::new(Sink { relay: self.relay.clone() }))
            }
            Some(sink) => Some(Box::new(Source { relay: self.relay.clone(), sink, wake: self.wake })),
        }
    }
}

/// Sends whatever the source queued, when the loop lets it write.
struct Sink {
    relay: Rc<RefCell<Relay>>,
}

impl Dispatcher for Sink {
    fn writable(&mut self, _channel: &Channel<'_>) -> bool {
        !self.relay.borrow().queue.is_empty()
    }

    fn handle_write(&mut self, channel: &mut Channel<'_>) {
        let queue = std::mem::take(&mut self.relay.borrow_mut().queue);
        channel.send(&queue);
    }
}

/// Queues what it reads for the sink and acknowledges it to its own
/// client, so a test knows the bytes are queued before it waits for them.
struct Source {
    relay: Rc<RefCell<Relay>>,
    sink: ChannelId,
    wake: bool,
}

impl Dispatcher for Source {
    fn handle_read(&mut self, channel: &mut Channel<'_>) {
        let mut buf = [0u8; 4096];
        if let Ok(n @ 1..) = channel.recv(&mut buf) {
            self.relay.borrow_mut().queue.extend_from_slice(&buf[..n]);
            if self.wake {
                channel.wake(self.sink);
            }
            channel.send(format!("queued {n}\n").as_bytes());
        }
    }
}

struct RelayPlugin;

impl Plugin for RelayPlugin {
    const NAME: &'static str = "relay";
    const VERSION: &'static str = "0";

    fn listen(config: &Config) -> Result<Box<dyn Dispatcher>, String> {
        let wake = match config.get("wake").unwrap_or("yes") {
            "yes" => true,
            "no" => false,
            other => return Err(format!("config wake: {other:?} is neither yes nor no")),
        };
        Ok(Box::new(RelayServer { relay: Rc::default(), wake }))
    }
}

/// A listener of the relay plugin with its sink client connected and
/// registered, its source client connected, and `hello` sent through the
/// source and queued for the sink.
fn relay_with_hello_queued(wake: &str) -> (TestServer, TcpStream, TcpStream) {
    let server = TestServer::start::<RelayPlugin>(Config::from_pairs([("wake", wake)])).unwrap();
    let sink = TcpStream::connect(server.addr()).unwrap();
    // The sink must be accepted (and its interest asked) before the source
    // connects: connections are accepted in order, but only this proves the
    // first one is in the channel table.
    eventually("the sink is registered", || server.n_channels() == 1);
    let mut source = TcpStream::connect(server.addr()).unwrap();
    source.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    source.write_all(b"hello").unwrap();
    let mut ack = [0u8; 9];
    source.read_exact(&mut ack).unwrap();
    assert_eq!(&ack, b"queued 5\n", "the source's handle_read ran");
    (server, sink, source)
}

#[test]
fn a_woken_sink_receives_what_the_source_queued() {
    let (_server, mut sink, _source) = relay_with_hello_queued("yes");
    sink.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut back = [0u8; 5];
    sink.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
}

#[test]
fn a_sink_nobody_wakes_stalls_until_its_own_handler_runs() {
    let (_server, mut sink, _source) = relay_with_hello_queued("no");
    // The bytes are queued (the source acknowledged them) and the sink's
    // socket is writable, but its cached `writable() == false` stands.
    sink.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut back = [0u8; 5];
    let error = sink.read(&mut back).expect_err("nothing reaches a sink nobody woke");
    assert!(matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{error}");

    // Any handler of the sink's own makes the loop ask again: a byte from
    // its client runs its `handle_read`, and the queue goes out.
    sink.write_all(b"?").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    sink.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
}
