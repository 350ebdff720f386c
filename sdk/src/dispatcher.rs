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
/// is closed, and the daemon carries on serving every other channel. Output
/// already sent is flushed; output the dispatcher still held (queued
/// producers) is lost with it, since its memory is no longer trusted. A
/// listening dispatcher that panics is replaced by a fresh one from the
/// plugin's `listen`, and its listener keeps accepting (up to 5 panics a
/// minute).
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
    /// channels. If the answer depends on something another channel
    /// changes (a shared queue, a peer's pending output), that channel must
    /// call [`Channel::wake`] with this channel's id: otherwise the cached
    /// answer stands and this channel stalls.
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
    /// Cached like `readable`: a channel that fills this one's queue must
    /// [`wake`](Channel::wake) it.
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
        let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
        let _ = channel.recv_uninit(&mut buf);
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
    /// The default logs the error with the channel id: at debug level for
    /// a peer that reset or went away (which happens at traffic rate), as a
    /// warning otherwise.
    fn handle_error(&mut self, channel: &mut Channel<'_>, error: io::Error) {
        crate::log::socket_error(channel.id(), &error);
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

    /// The daemon closes this channel gracefully for a reason of its own
    /// (`reason`): an idle timeout, the control plane, the daemon draining,
    /// a reload's drain timeout, an unload. Not called when the dispatcher
    /// closed the channel itself, nor when the peer closed
    /// ([`handle_close`](Dispatcher::handle_close)) or the socket failed
    /// ([`handle_error`](Dispatcher::handle_error)).
    ///
    /// From now on the channel is not read. The daemon keeps asking
    /// [`writable`](Dispatcher::writable) and calling
    /// [`handle_write`](Dispatcher::handle_write) until `writable` answers
    /// `false` or the dispatcher calls [`Channel::close`]; then it flushes
    /// what was sent, shuts down writing and closes. So output the
    /// dispatcher still holds (a file being streamed, a last answer, a
    /// goodbye) reaches the peer. The whole close is bounded by the drain
    /// timeout; what could not be delivered by then is logged with its
    /// byte count.
    ///
    /// The default calls [`Channel::close`]: output already sent is
    /// flushed, output still held is not produced.
    fn handle_shutdown(&mut self, channel: &mut Channel<'_>, reason: CloseReason) {
        let _ = reason;
        channel.close();
    }

    /// Only for listening dispatchers of a generation that became current
    /// by a reload or a rollback: `channel` is a connection an older
    /// generation handed over, with the `state` its dispatcher's
    /// [`export_state`](Dispatcher::export_state) returned. Return the
    /// dispatcher that serves it from now on, or `None` to leave it on its
    /// old generation. Because it is asked of the listener's (new)
    /// listening dispatcher, the new dispatcher can share the listener's
    /// state, as one made by [`handle_accepted`](Dispatcher::handle_accepted)
    /// would.
    ///
    /// The default answers `None`: [`Plugin::import_state`] is tried next.
    ///
    /// [`Plugin::import_state`]: crate::Plugin::import_state
    fn import_channel(&mut self, channel: &mut Channel<'_>, state: &[u8]) -> Option<Box<dyn Dispatcher>> {
        let _ = (channel, state);
        None
    }

    /// A few key/value pairs describing this channel's state for the
    /// operator (the request being served, bytes buffered), shown by
    /// `asyncorectl channels get` and `GetChannel`. Asked only when someone
    /// looks at the channel, never per pass; keep it short and cheap.
    ///
    /// The default says nothing.
    fn describe(&mut self, channel: &Channel<'_>) -> Vec<(String, String)> {
        let _ = channel;
        Vec::new()
    }
}

/// Why the daemon closes a channel: the argument of
/// [`Dispatcher::handle_shutdown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The listener's `idle_timeout` passed without traffic.
    IdleTimeout,
    /// The control plane closed it (`asyncorectl channels close`, or a
    /// listener stopped with `--close-channels`).
    Control,
    /// The daemon is draining (SIGTERM).
    Drain,
    /// A newer generation of the plugin is current and this generation's
    /// drain timeout passed.
    Reload,
    /// This generation of the plugin is being unloaded.
    Unload,
    /// A reason this SDK does not know (from a newer daemon).
    Other,
}

impl CloseReason {
    /// The reason of an ABI close-reason code.
    pub(crate) fn from_code(code: i64) -> CloseReason {
        use crate::ffi::close_reason;
        match code {
            close_reason::IDLE_TIMEOUT => CloseReason::IdleTimeout,
            close_reason::CONTROL => CloseReason::Control,
            close_reason::DRAIN => CloseReason::Drain,
            close_reason::RELOAD => CloseReason::Reload,
            close_reason::UNLOAD => CloseReason::Unload,
            _ => CloseReason::Other,
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseReason::IdleTimeout => "idle timeout",
            CloseReason::Control => "closed by the control plane",
            CloseReason::Drain => "the daemon is draining",
            CloseReason::Reload => "reloaded",
            CloseReason::Unload => "unloaded",
            CloseReason::Other => "closed by the daemon",
        })
    }
}
