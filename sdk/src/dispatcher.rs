//! The `Dispatcher` trait: asyncore's `dispatcher` class as a Rust trait.

use std::io;

use crate::channel::Channel;

/// A protocol handler for one channel, called by the daemon's poll loop.
///
/// This is Python's `asyncore.dispatcher`: the loop asks [`readable`] and
/// [`writable`] to decide what to wait for, then calls the `handle_*` method
/// for what happened. Every method runs on the daemon's single `poll-loop`
/// thread, one at a time, so a dispatcher needs no locking. **A callback must
/// not block**: while it runs no other channel is served. Hand blocking work
/// to a thread of your own and deliver its result through a socket or pipe.
///
/// The loop is level-triggered and its wake-ups may be spurious: a
/// `handle_read` may find nothing to read ([`Channel::recv`] then answers
/// [`io::ErrorKind::WouldBlock`]). Reading once per call is enough: if more
/// data is waiting, `handle_read` is called again on the next pass.
///
/// If any method panics, the panic is caught inside the plugin, the
/// dispatcher is *poisoned* (never called again, only dropped), its channel
/// is closed, and the daemon carries on serving every other channel.
///
/// [`readable`]: Dispatcher::readable
/// [`writable`]: Dispatcher::writable
pub trait Dispatcher: 'static {
    /// Called before each wait when this channel's state may have changed
    /// (after one of its handlers ran): should the loop wait for input?
    ///
    /// Answering `false` applies backpressure: the kernel's receive buffer
    /// fills and the peer's sends slow down. The answer is cached until a
    /// handler of this channel runs again, so it costs nothing on idle
    /// channels.
    ///
    /// The default answers `true`.
    fn readable(&mut self, channel: &Channel<'_>) -> bool {
        let _ = channel;
        true
    }

    /// Like [`readable`](Dispatcher::readable), for output: should the loop
    /// call [`handle_write`](Dispatcher::handle_write) when the socket can
    /// take more bytes?
    ///
    /// Output queued with [`Channel::send`] is flushed by the host whatever
    /// this answers (asyncore's `dispatcher_with_send`), so answer `true` only
    /// to produce more output lazily.
    ///
    /// The default answers `false`.
    fn writable(&mut self, channel: &Channel<'_>) -> bool {
        let _ = channel;
        false
    }

    /// Input is waiting: read it with [`Channel::recv`].
    ///
    /// When `recv` returns `Ok(0)` the peer has closed its side:
    /// [`handle_close`](Dispatcher::handle_close) follows after this call
    /// returns, once.
    ///
    /// The default reads and discards what is waiting.
    fn handle_read(&mut self, channel: &mut Channel<'_>) {
        let mut buf = [0u8; 4096];
        let _ = channel.recv(&mut buf);
    }

    /// The socket can take more output and [`writable`](Dispatcher::writable)
    /// answered `true`. Queued output has already been flushed.
    ///
    /// The default does nothing.
    fn handle_write(&mut self, channel: &mut Channel<'_>) {
        let _ = channel;
    }

    /// An outbound connection started with [`Channel::connect`] is
    /// established.
    ///
    /// The default does nothing.
    fn handle_connect(&mut self, channel: &mut Channel<'_>) {
        let _ = channel;
    }

    /// The peer closed its side of the connection.
    ///
    /// The default calls [`Channel::close`], which flushes queued output and
    /// then closes. Override it to keep writing after a half-close.
    fn handle_close(&mut self, channel: &mut Channel<'_>) {
        channel.close();
    }

    /// A socket error occurred (a reset, a refused or failed connect). The
    /// channel is closed after this returns, without flushing: the socket is
    /// no longer usable.
    ///
    /// The default logs the error with the channel id.
    fn handle_error(&mut self, channel: &mut Channel<'_>, error: io::Error) {
        crate::log::warn(&format!("channel {}: {error}", channel.id()));
    }

    /// Out-of-band (TCP urgent) data arrived. Whatever urgent byte is still
    /// unread when this returns is discarded by the host.
    ///
    /// The default does nothing.
    fn handle_expt(&mut self, channel: &mut Channel<'_>) {
        let _ = channel;
    }

    /// A timer set with [`Channel::call_later`] fired; `token` is the value
    /// given there.
    ///
    /// The default does nothing.
    fn handle_timer(&mut self, channel: &mut Channel<'_>, token: u64) {
        let _ = (channel, token);
    }

    /// Hot reload with state handover: a newer generation of this plugin
    /// became current and can import state ([`Plugin::import_state`]).
    /// Called between callbacks; return the state to hand this channel over
    /// to the new generation (serialised however you like), or `None` to
    /// stay on this generation until the channel closes (for example while
    /// a message is half read).
    ///
    /// The default answers `None`.
    ///
    /// [`Plugin::import_state`]: crate::Plugin::import_state
    fn export_state(&mut self, channel: &Channel<'_>) -> Option<Vec<u8>> {
        let _ = channel;
        None
    }

    /// Only for listening dispatchers: a connection was accepted. `channel`
    /// is the new connection; return the dispatcher that serves it, or
    /// `None` to refuse it (the connection is closed).
    ///
    /// The default refuses every connection.
    fn handle_accepted(&mut self, channel: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
        let _ = channel;
        None
    }
}
