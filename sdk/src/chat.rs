//! asynchat for plugins: input cut into messages at terminators, output
//! queued behind producers, over the [`Dispatcher`] model.
//!
//! Python's `asynchat.async_chat` is a dispatcher that does the reading and
//! writing for you: you say where messages end ([`Terminator`]), it calls
//! `collect_incoming_data` with the bytes of each message and
//! `found_terminator` at its end; you `push` replies and
//! `push_with_producer` long ones, which it sends as the peer drains them.
//! Here you write a [`ChatHandler`] with those callbacks and wrap it in an
//! [`AsyncChat`], which is the [`Dispatcher`] the daemon runs.
//!
//! A server with a line protocol that can switch to a counted body, the way
//! HTTP goes from header lines to a `Content-Length` body:
//!
//! ```
//! use asyncore_sdk::prelude::*;
//!
//! /// `UPLOAD n` is followed by n bytes of body, answered with their sum;
//! /// `QUIT` says goodbye; any other line is echoed back.
//! struct Uploads {
//!     in_body: bool,
//! }
//!
//! impl ChatHandler for Uploads {
//!     fn found_terminator(&mut self, chat: &mut Chat<'_>) {
//!         let message = chat.take_incoming();
//!         if self.in_body {
//!             let sum: u64 = message.iter().map(|&b| u64::from(b)).sum();
//!             chat.push(format!("sum {sum}\r\n").as_bytes());
//!             chat.set_terminator(b"\r\n");
//!             self.in_body = false;
//!         } else if let Some(n) = message.strip_prefix(b"UPLOAD ") {
//!             match std::str::from_utf8(n).ok().and_then(|n| n.parse::<usize>().ok()) {
//!                 // The body is framed from the very next byte, even when
//!                 // it came in the same read as this line.
//!                 Some(n) if n > 0 => {
//!                     chat.set_terminator(Terminator::Count(n));
//!                     self.in_body = true;
//!                 }
//!                 _ => chat.push(b"bad length\r\n"),
//!             }
//!         } else if message == b"QUIT" {
//!             chat.push(b"bye\r\n");
//!             chat.close_when_done();
//!         } else {
//!             chat.push(&message);
//!             chat.push(b"\r\n");
//!         }
//!     }
//! }
//!
//! struct Server;
//!
//! impl Dispatcher for Server {
//!     fn handle_accepted(&mut self, channel: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
//!         let mut chat = AsyncChat::new(Uploads { in_body: false }).with_terminator(b"\r\n");
//!         chat.chat(channel).push(b"hello\r\n");
//!         Some(Box::new(chat))
//!     }
//! }
//!
//! struct UploadPlugin;
//!
//! impl Plugin for UploadPlugin {
//!     const NAME: &'static str = "uploads";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!
//!     fn listen(_config: &Config) -> Result<Box<dyn Dispatcher>, String> {
//!         Ok(Box::new(Server))
//!     }
//! }
//!
//! export_plugin!(UploadPlugin);
//! # fn main() {}
//! ```
//!
//! # Bounded memory
//!
//! Whatever the peer does and whatever the handler pushes, an `AsyncChat`
//! holds about one high-water mark of output, plus one answer, plus one
//! message, plus one read:
//!
//! * at most [`max_input`](Chat::max_input) bytes of one message (64 KiB
//!   unless set; past it [`ChatHandler::input_overflow`] runs);
//! * once [`output_high_water`](Chat::output_high_water) bytes or more wait
//!   to be sent (256 KiB unless set), or too many producers are queued, no
//!   further complete message is handed to
//!   [`found_terminator`](ChatHandler::found_terminator): the rest of the
//!   current read waits in the `AsyncChat`, and the socket is not read,
//!   until the output has drained below the mark. So a client that sends a
//!   thousand requests in one write and reads nothing gets them answered
//!   one high-water mark at a time, not all at once into memory;
//! * producers are pulled only below that mark, one 64 KiB buffer at a time.
//!
//! Every limit can come from the listener's configuration: see
//! [`AsyncChat::configured`].

mod producer;
mod terminator;

use std::{collections::VecDeque, io};

pub use self::{
    producer::{FileProducer, Producer, SimpleProducer},
    terminator::{FrameSink, Framer, Terminator},
};
use crate::{
    channel::Channel,
    dispatcher::{CloseReason, Dispatcher},
};

/// First bytes of an `AsyncChat`'s exported state.
const STATE_MAGIC: &[u8] = b"asynchat1";

/// Bytes read per `handle_read`. On the stack: no buffer per connection.
const READ_BUFFER: usize = 64 * 1024;
/// Bytes asked of a producer per call. On the stack, like the read buffer.
const PRODUCER_BUFFER: usize = 64 * 1024;
thread_local! {
    /// The buffer producers fill: one per thread (the loop's), zeroed once,
    /// rather than 64 KiB zeroed on the stack for every write.
    static PRODUCER_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with the thread's producer buffer ([`PRODUCER_BUFFER`] bytes).
fn with_producer_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    PRODUCER_BUF.with(|buf| match buf.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.is_empty() {
                buf.resize(PRODUCER_BUFFER, 0);
            }
            f(&mut buf)
        }
        // Only if a producer pumps another chat from inside `more`.
        Err(_) => f(&mut vec![0u8; PRODUCER_BUFFER]),
    })
}

/// Default of [`Chat::output_high_water`].
pub const DEFAULT_OUTPUT_HIGH_WATER: usize = 256 * 1024;
/// Default of [`AsyncChat::with_max_queued_producers`].
pub const DEFAULT_MAX_QUEUED_PRODUCERS: usize = 64;

/// The protocol logic of an [`AsyncChat`]: what to do with each message.
///
/// This is what you write in a subclass of Python's `async_chat`. Every
/// method gets the [`Chat`], which sets the terminator, pushes output and
/// closes. Like every dispatcher callback, these run on the poll loop and
/// **must not block**.
pub trait ChatHandler: 'static {
    /// Called with data of the current message, in order, possibly in
    /// several calls per message (it depends on how the bytes arrived).
    /// Terminators are not included; `data` is never empty.
    ///
    /// The default appends `data` to the chat's incoming buffer, which
    /// [`found_terminator`](ChatHandler::found_terminator) then reads with
    /// [`Chat::incoming`] or [`Chat::take_incoming`]. Override it to process
    /// data as it comes (to stream a large body to a file, say), and raise
    /// [`Chat::set_max_input`] if messages may then grow past 64 KiB.
    fn collect_incoming_data(&mut self, chat: &mut Chat<'_>, data: &[u8]) {
        chat.append_incoming(data);
    }

    /// Called at the end of each message: its terminator was found, or its
    /// [`Terminator::Count`] completed. All its data was passed to
    /// [`collect_incoming_data`](ChatHandler::collect_incoming_data) first.
    ///
    /// Clear the incoming buffer here ([`Chat::take_incoming`] or
    /// [`Chat::clear_incoming`]): it is not cleared for you, as in asynchat.
    /// A terminator set here applies from the byte right after this message,
    /// even within the same read. Input that arrives after
    /// [`Chat::close_when_done`] or [`Chat::close`] is read and dropped: this
    /// is not called again.
    fn found_terminator(&mut self, chat: &mut Chat<'_>);

    /// Called when a message grows past [`Chat::max_input`] bytes without
    /// its terminator. Exactly `max_input` bytes of it were collected.
    ///
    /// When this returns, the incoming buffer is cleared and the rest of the
    /// message is dropped: input up to and including its terminator (the
    /// rest of a count; everything, with [`Terminator::None`] or
    /// `Count(0)`), without a call to `found_terminator`. Then messages are
    /// framed as usual. So an override that answers with an error and does
    /// not close (like a line server refusing a long line) resynchronises on
    /// the next terminator.
    ///
    /// The default logs a warning with the channel id and the limit, and
    /// closes the channel with [`Chat::close`].
    fn input_overflow(&mut self, chat: &mut Chat<'_>) {
        let message = format!(
            "channel {}: input overflow: more than {} bytes without finding the terminator {}; closing",
            chat.channel().id(),
            chat.max_input(),
            chat.get_terminator(),
        );
        crate::log::warn(&message);
        chat.close();
    }

    /// An outbound connection started with [`Channel::connect`] (with an
    /// `AsyncChat` as its dispatcher) is established. Accepted connections
    /// do not get this call: set them up before returning them from
    /// [`Dispatcher::handle_accepted`], with [`AsyncChat::chat`].
    ///
    /// The default does nothing.
    fn handle_connect(&mut self, chat: &mut Chat<'_>) {
        let _ = chat;
    }

    /// The peer closed its side. Bytes of a last, unterminated message were
    /// passed to [`collect_incoming_data`](ChatHandler::collect_incoming_data)
    /// before this call, including those held back as a possible start of
    /// the terminator. Not called after [`Chat::close`].
    ///
    /// The default calls [`Chat::close_when_done`]: queued producers still
    /// run, then the channel closes, so a peer that half-closes after its
    /// request still gets the whole response.
    fn handle_close(&mut self, chat: &mut Chat<'_>) {
        chat.close_when_done();
    }

    /// A timer set with [`Channel::call_later`] (through
    /// [`Chat::channel`]) fired; `token` is the value given there. Idle
    /// timeouts go here.
    ///
    /// The default does nothing.
    fn handle_timer(&mut self, chat: &mut Chat<'_>, token: u64) {
        let _ = (chat, token);
    }

    /// The daemon closes the channel for a reason of its own (an idle
    /// timeout, the control plane, a drain, a reload's drain timeout, an
    /// unload): see [`Dispatcher::handle_shutdown`]. No more input is read
    /// or framed.
    ///
    /// The default calls [`Chat::close_when_done`]: queued producers still
    /// run and everything pushed reaches the peer, then the channel closes.
    /// Push a goodbye first, or tell the rest of a room that this member
    /// left, here.
    fn handle_shutdown(&mut self, chat: &mut Chat<'_>, reason: CloseReason) {
        let _ = reason;
        chat.close_when_done();
    }

    /// A few key/value pairs for the operator, after the `AsyncChat`'s own
    /// (terminator, bytes buffered, producers queued): see
    /// [`Dispatcher::describe`].
    ///
    /// The default says nothing more.
    fn describe(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Hot reload: the state of this conversation to carry to the new
    /// generation (see [`Dispatcher::export_state`]). Asked only between
    /// messages, with nothing queued to send: the `AsyncChat` adds its own
    /// state (the terminator and the limits) around what this returns, and
    /// [`AsyncChat::import`] rebuilds both.
    ///
    /// The default answers `None`: the channel stays on its generation.
    fn export_state(&mut self, channel: &Channel<'_>) -> Option<Vec<u8>> {
        let _ = channel;
        None
    }

    /// An I/O error: the socket's, or one returned by a
    /// [`Producer`]. The channel is closed after this returns; output queued
    /// after a producer error is still flushed, after a socket error it is
    /// lost.
    ///
    /// The default logs the error with the channel id, as
    /// [`Dispatcher::handle_error`]'s does.
    fn handle_error(&mut self, chat: &mut Chat<'_>, error: io::Error) {
        crate::log::socket_error(chat.channel().id(), &error);
    }
}

/// The [`Dispatcher`] that runs a [`ChatHandler`]: Python's
/// `asynchat.async_chat`.
///
/// It reads one buffer per `handle_read`, cuts the input into messages at
/// the terminator (with a [`Framer`]) and calls the handler. It answers
/// `readable()` while less than the output high-water mark waits to be
/// sent, and `writable()` while producers are queued below that mark, so
/// that `handle_write` pulls them as the peer drains its output. Producers
/// queued while a read is framed start at once, at the end of that
/// `handle_read` (asynchat's `initiate_send`), so a reply costs no extra
/// pass.
///
/// Return it from [`Dispatcher::handle_accepted`] as
/// `Box::new(AsyncChat::new(handler))`, or give it to [`Channel::connect`].
pub struct AsyncChat<H> {
    handler: H,
    framer: Framer,
    incoming: Vec<u8>,
    outbox: Outbox,
    /// Input read but not framed yet: the rest of a read whose framing
    /// stopped because the output went over the high-water mark. Framed
    /// (before the socket is read again) once the output drained.
    unread: Vec<u8>,
    /// The peer closed its side: nothing more will come.
    read_eof: bool,
    /// The peer closed while `unread` still held input: the handler hears
    /// of the close once that input was framed.
    close_pending: bool,
}

impl<H: ChatHandler> AsyncChat<H> {
    /// Wraps `handler`, with [`Terminator::None`] (everything is collected
    /// until a terminator is set), a 64 KiB input limit and a 256 KiB output
    /// high-water mark.
    pub fn new(handler: H) -> AsyncChat<H> {
        AsyncChat {
            handler,
            framer: Framer::new(),
            incoming: Vec::new(),
            outbox: Outbox::new(),
            unread: Vec::new(),
            read_eof: false,
            close_pending: false,
        }
    }

    /// [`new`](AsyncChat::new), with the limits a listener's configuration
    /// sets, so that operators can size them per listener (memcached values
    /// are often 1 MiB; a chat line is short):
    ///
    /// | key | default | what |
    /// | --- | --- | --- |
    /// | `max_input` | 65536 | [`Chat::set_max_input`] |
    /// | `output_high_water` | 262144 | [`Chat::set_output_high_water`] |
    /// | `max_queued_producers` | 64 | [`AsyncChat::with_max_queued_producers`] |
    ///
    /// # Errors
    ///
    /// A message naming the key whose value is not a number.
    pub fn configured(handler: H, config: &crate::Config) -> Result<AsyncChat<H>, String> {
        Ok(AsyncChat::new(handler)
            .with_max_input(config.parse_or("max_input", Framer::DEFAULT_MAX_INPUT)?)
            .with_output_high_water(config.parse_or("output_high_water", DEFAULT_OUTPUT_HIGH_WATER)?)
            .with_max_queued_producers(config.parse_or("max_queued_producers", DEFAULT_MAX_QUEUED_PRODUCERS)?))
    }

    /// Sets the first terminator, as [`Chat::set_terminator`] does.
    ///
    /// # Panics
    ///
    /// If `terminator` is an empty [`Terminator::Bytes`].
    pub fn with_terminator(mut self, terminator: impl Into<Terminator>) -> AsyncChat<H> {
        self.framer.set_terminator(terminator);
        self
    }

    /// Sets the input limit, as [`Chat::set_max_input`] does.
    pub fn with_max_input(mut self, max_input: usize) -> AsyncChat<H> {
        self.framer.set_max_input(max_input);
        self
    }

    /// Sets the output high-water mark, as [`Chat::set_output_high_water`]
    /// does.
    pub fn with_output_high_water(mut self, high_water: usize) -> AsyncChat<H> {
        self.outbox.set_high_water(high_water);
        self
    }

    /// Stops reading while `max` producers (or more) are queued, default
    /// [`DEFAULT_MAX_QUEUED_PRODUCERS`]. The byte high-water mark alone does
    /// not bound a queue of producers that have produced nothing yet (a
    /// client pipelining requests for large files faster than it reads the
    /// answers). At least 1.
    pub fn with_max_queued_producers(mut self, max: usize) -> AsyncChat<H> {
        self.outbox.max_producers = max.max(1);
        self
    }

    /// Rebuilds an `AsyncChat` from what [`Dispatcher::export_state`]
    /// returned for one in an older generation (in
    /// [`Dispatcher::import_channel`] or [`Plugin::import_state`]): the
    /// terminator and the limits come back as they were, and `handler`
    /// makes the handler from the bytes its
    /// [`ChatHandler::export_state`] returned. `None` when the state is not
    /// an `AsyncChat`'s, or `handler` refuses it.
    ///
    /// [`Plugin::import_state`]: crate::Plugin::import_state
    pub fn import(state: &[u8], handler: impl FnOnce(&[u8]) -> Option<H>) -> Option<AsyncChat<H>> {
        let mut state = state.strip_prefix(STATE_MAGIC)?;
        let mut take_u64 = || -> Option<u64> {
            let (bytes, rest) = state.split_first_chunk::<8>()?;
            state = rest;
            Some(u64::from_le_bytes(*bytes))
        };
        let (kind, value) = (take_u64()?, take_u64()?);
        let (max_input, high_water, max_producers) = (take_u64()?, take_u64()?, take_u64()?);
        let terminator = match kind {
            0 => Terminator::None,
            1 => Terminator::Count(usize::try_from(value).ok()?),
            2 => {
                let len = usize::try_from(value).ok().filter(|&n| n > 0 && n <= state.len())?;
                let (bytes, rest) = state.split_at(len);
                state = rest;
                Terminator::Bytes(bytes.to_vec())
            }
            _ => return None,
        };
        let usize_of = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Some(
            AsyncChat::new(handler(state)?)
                .with_terminator(terminator)
                .with_max_input(usize_of(max_input))
                .with_output_high_water(usize_of(high_water))
                .with_max_queued_producers(usize_of(max_producers)),
        )
    }

    /// A [`Chat`] over `channel` outside the handler's callbacks: in the
    /// listening dispatcher's [`Dispatcher::handle_accepted`], to push a
    /// greeting or set the first terminator before returning this
    /// `AsyncChat`, or from a dispatcher that wraps it.
    pub fn chat<'a>(&'a mut self, channel: &'a mut Channel<'_>) -> Chat<'a> {
        self.split(channel).1
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The handler, mutably.
    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    /// The handler and a [`Chat`] for its callbacks.
    fn split<'a>(&'a mut self, channel: &'a mut Channel<'_>) -> (&'a mut H, Chat<'a>) {
        let chat = Chat {
            channel: channel.reborrow(),
            framer: &mut self.framer,
            incoming: &mut self.incoming,
            outbox: &mut self.outbox,
            unread: &mut self.unread,
        };
        (&mut self.handler, chat)
    }

    /// Frames `input` until the output goes over the high-water mark after
    /// a complete message; what is left of it waits in `unread`.
    fn frame(&mut self, channel: &mut Channel<'_>, input: &[u8]) {
        let mut callbacks = Callbacks {
            handler: &mut self.handler,
            channel,
            incoming: &mut self.incoming,
            outbox: &mut self.outbox,
            unread: &mut self.unread,
            message_ended: false,
        };
        let consumed = self.framer.feed(input, &mut callbacks);
        if consumed < input.len() && self.outbox.is_open() {
            self.unread.extend_from_slice(&input[consumed..]);
        }
    }

    /// Frames the input that waited for the output to drain, then tells
    /// the handler of a close that came in the meantime.
    fn frame_unread(&mut self, channel: &mut Channel<'_>) {
        if !self.unread.is_empty() && self.outbox.has_room(channel.pending_output()) {
            let unread = std::mem::take(&mut self.unread);
            self.frame(channel, &unread);
        }
        if self.close_pending && self.unread.is_empty() {
            self.close_pending = false;
            self.peer_closed(channel);
        }
    }

    /// Passes the held-back tail of the input on, then calls the handler's
    /// `handle_close`.
    fn peer_closed(&mut self, channel: &mut Channel<'_>) {
        if self.outbox.is_open() {
            let mut callbacks = Callbacks {
                handler: &mut self.handler,
                channel: &mut *channel,
                incoming: &mut self.incoming,
                outbox: &mut self.outbox,
                unread: &mut self.unread,
                message_ended: false,
            };
            self.framer.finish(&mut callbacks);
        }
        if self.outbox.closing != Closing::Closed {
            let (handler, mut chat) = self.split(channel);
            handler.handle_close(&mut chat);
        }
    }
}

impl<H: ChatHandler> Dispatcher for AsyncChat<H> {
    /// Answers `true` while less than the output high-water mark waits to be
    /// sent, fewer than the maximum of producers are queued, no input read
    /// earlier waits to be framed, and the peer has not closed.
    fn readable(&mut self, channel: &Channel<'_>) -> bool {
        !self.read_eof && self.unread.is_empty() && self.outbox.has_room(channel.pending_output())
    }

    /// Answers `true` while producers are queued, or input read earlier
    /// waits to be framed, and less than the output high-water mark waits
    /// to be sent.
    fn writable(&mut self, channel: &Channel<'_>) -> bool {
        let pending = channel.pending_output();
        self.outbox.writable(pending)
            || ((!self.unread.is_empty() || self.close_pending) && self.outbox.has_room(pending))
    }

    /// Reads one buffer (64 KiB at most) and frames it, calling the
    /// handler's `collect_incoming_data` and `found_terminator`.
    fn handle_read(&mut self, channel: &mut Channel<'_>) {
        // Not zeroed: one read of a few bytes must not cost a 64 KiB memset.
        let mut buf = [std::mem::MaybeUninit::uninit(); READ_BUFFER];
        let data = match channel.recv_uninit(&mut buf) {
            // The peer closed: the host calls handle_close next.
            Ok([]) => {
                self.read_eof = true;
                return;
            }
            Ok(data) => data,
            // WouldBlock is a spurious wake-up. Any other error is the
            // socket's, which the host reports through handle_error after
            // this call.
            Err(_) => return,
        };
        if !self.outbox.is_open() {
            // Closing: what still arrives is read (so that it cannot turn
            // the close into a reset) and dropped.
            return;
        }
        self.frame(channel, data);
        // What the handler queued as producers goes out now, as asynchat's
        // `push_with_producer` starts `initiate_send`: the socket was just
        // readable and is almost always writable, and the host writes what
        // the whole pass queued in one go. Waiting for a write event would
        // cost two changes of the poller's interest and a pass per reply.
        if !self.outbox.producers.is_empty() {
            self.handle_write(channel);
        }
    }

    /// Pulls queued producers into the channel's output, up to the
    /// high-water mark; closes the channel once they are exhausted after
    /// [`Chat::close_when_done`]. Then, below the mark, frames the input
    /// that waited for the output to drain.
    fn handle_write(&mut self, channel: &mut Channel<'_>) {
        let pumped = if self.outbox.producers.is_empty() {
            Ok(())
        } else {
            with_producer_buffer(|buf| self.outbox.pump(channel, buf))
        };
        if let Err(error) = pumped {
            let (handler, mut chat) = self.split(channel);
            handler.handle_error(&mut chat, error);
            chat.close();
            return;
        }
        if self.outbox.is_open() {
            self.frame_unread(channel);
        }
    }

    fn handle_connect(&mut self, channel: &mut Channel<'_>) {
        let (handler, mut chat) = self.split(channel);
        handler.handle_connect(&mut chat);
    }

    /// Passes the held-back tail of the input on, then calls the handler's
    /// `handle_close`; after the input that waits for the output to drain,
    /// if there is any.
    fn handle_close(&mut self, channel: &mut Channel<'_>) {
        self.read_eof = true;
        if !self.unread.is_empty() && self.outbox.is_open() {
            self.close_pending = true;
            return;
        }
        self.peer_closed(channel);
    }

    fn handle_timer(&mut self, channel: &mut Channel<'_>, token: u64) {
        let (handler, mut chat) = self.split(channel);
        handler.handle_timer(&mut chat, token);
    }

    /// Drops input read but not framed yet (new requests), then calls the
    /// handler's `handle_shutdown`, whose default lets queued producers
    /// finish before the channel closes.
    fn handle_shutdown(&mut self, channel: &mut Channel<'_>, reason: CloseReason) {
        self.unread.clear();
        self.close_pending = false;
        let (handler, mut chat) = self.split(channel);
        handler.handle_shutdown(&mut chat, reason);
    }

    /// The terminator, what is buffered and queued, then the handler's own
    /// pairs.
    fn describe(&mut self, _channel: &Channel<'_>) -> Vec<(String, String)> {
        let mut pairs = vec![
            ("terminator".to_string(), self.framer.get_terminator().to_string()),
            ("incoming_bytes".to_string(), self.incoming.len().to_string()),
            ("unread_bytes".to_string(), self.unread.len().to_string()),
            ("producers_queued".to_string(), self.outbox.producers.len().to_string()),
        ];
        if !self.outbox.is_open() {
            pairs.push(("closing".to_string(), "when done".to_string()));
        }
        pairs.extend(self.handler.describe());
        pairs
    }

    /// Hands the conversation over only between messages, with nothing
    /// queued or unread: the terminator, the limits and what the handler's
    /// `export_state` returns. See [`AsyncChat::import`].
    fn export_state(&mut self, channel: &Channel<'_>) -> Option<Vec<u8>> {
        let idle = self.framer.is_between_messages()
            && self.incoming.is_empty()
            && self.unread.is_empty()
            && self.outbox.producers.is_empty()
            && self.outbox.is_open()
            && !self.read_eof;
        if !idle {
            return None;
        }
        let handler_state = self.handler.export_state(channel)?;
        let (kind, value, bytes): (u64, u64, &[u8]) = match self.framer.get_terminator() {
            Terminator::None => (0, 0, &[]),
            Terminator::Count(n) => (1, *n as u64, &[]),
            Terminator::Bytes(bytes) => (2, bytes.len() as u64, bytes),
        };
        let mut state = STATE_MAGIC.to_vec();
        for n in [kind, value, self.framer.max_input() as u64, self.outbox.high_water as u64] {
            state.extend_from_slice(&n.to_le_bytes());
        }
        state.extend_from_slice(&(self.outbox.max_producers as u64).to_le_bytes());
        state.extend_from_slice(bytes);
        state.extend_from_slice(&handler_state);
        Some(state)
    }

    fn handle_error(&mut self, channel: &mut Channel<'_>, error: io::Error) {
        let (handler, mut chat) = self.split(channel);
        handler.handle_error(&mut chat, error);
        // The host closes the channel without flushing: nothing queued can
        // be sent any more.
        self.outbox.abandon();
    }
}

/// What the handler's callbacks can do: asynchat's methods on `self`.
///
/// It is lent to each [`ChatHandler`] callback (and by [`AsyncChat::chat`]).
pub struct Chat<'a> {
    channel: Channel<'a>,
    framer: &'a mut Framer,
    incoming: &'a mut Vec<u8>,
    outbox: &'a mut Outbox,
    unread: &'a mut Vec<u8>,
}

impl<'a> Chat<'a> {
    /// Sets where messages end. Inside
    /// [`found_terminator`](ChatHandler::found_terminator) it applies from
    /// the byte right after the message just found, even within the same
    /// read.
    ///
    /// Takes a [`Terminator`], or bytes (`b"\r\n"`, `"\r\n"`, `&[u8]`,
    /// `Vec<u8>`) or a `usize` count.
    ///
    /// # Panics
    ///
    /// If `terminator` is an empty [`Terminator::Bytes`].
    pub fn set_terminator(&mut self, terminator: impl Into<Terminator>) {
        self.framer.set_terminator(terminator);
    }

    /// The current terminator. While a [`Terminator::Count`] runs it
    /// answers the bytes still expected; after it completed, `Count(0)`.
    pub fn get_terminator(&self) -> &Terminator {
        self.framer.get_terminator()
    }

    /// Sends `data` after everything pushed before it. With no producer
    /// queued it goes straight to [`Channel::send`]; otherwise it is copied
    /// and queued behind the producers, so the order is kept. Ignored after
    /// [`close_when_done`](Chat::close_when_done) or [`close`](Chat::close).
    pub fn push(&mut self, data: &[u8]) {
        self.outbox.push(&mut self.channel, data);
    }

    /// Queues `producer`, to be pulled as the peer drains the output, after
    /// everything pushed before it. Ignored after
    /// [`close_when_done`](Chat::close_when_done) or [`close`](Chat::close).
    pub fn push_with_producer(&mut self, producer: Box<dyn Producer>) {
        self.outbox.push_with_producer(producer);
    }

    /// Closes the channel once every queued producer is exhausted and its
    /// output flushed: at once if none is queued. From now on, pushes are
    /// ignored and input is read and dropped.
    pub fn close_when_done(&mut self) {
        self.outbox.close_when_done(&mut self.channel);
    }

    /// Closes the channel now: queued producers are dropped, output already
    /// handed to the channel is flushed first ([`Channel::close`]). Prefer
    /// this to `chat.channel().close()`, after which the rest of the current
    /// read would still be framed.
    pub fn close(&mut self) {
        self.outbox.close(&mut self.channel);
    }

    /// Whether [`close_when_done`](Chat::close_when_done) or
    /// [`close`](Chat::close) was called.
    pub fn is_closing(&self) -> bool {
        !self.outbox.is_open()
    }

    /// Drops buffered input and queued output, for emergencies: the incoming
    /// buffer, bytes held back as a possible start of the terminator, the
    /// rest of the current read, and the queued producers. Output already
    /// handed to the channel cannot be taken back. The terminator stays;
    /// a pending [`close_when_done`](Chat::close_when_done) happens now.
    pub fn discard_buffers(&mut self) {
        self.incoming.clear();
        self.unread.clear();
        self.framer.clear();
        self.outbox.discard(&mut self.channel);
    }

    /// The data collected for the current message by the default
    /// [`collect_incoming_data`](ChatHandler::collect_incoming_data).
    pub fn incoming(&self) -> &[u8] {
        self.incoming
    }

    /// Empties the incoming buffer, keeping its allocation for the next
    /// message.
    pub fn clear_incoming(&mut self) {
        self.incoming.clear();
    }

    /// Appends to the incoming buffer: what the default
    /// [`collect_incoming_data`](ChatHandler::collect_incoming_data) does,
    /// for an override that keeps only some of the data.
    pub fn append_incoming(&mut self, data: &[u8]) {
        self.incoming.extend_from_slice(data);
    }

    /// Pushes the incoming buffer (in order with other output, like
    /// [`push`](Chat::push)) and empties it, keeping its allocation: an
    /// echo without a copy.
    pub fn push_incoming(&mut self) {
        let incoming = std::mem::take(self.incoming);
        self.push(&incoming);
        *self.incoming = incoming;
        self.incoming.clear();
    }

    /// Takes the incoming buffer, leaving an empty one. The next message
    /// then grows a new allocation; [`incoming`](Chat::incoming) and
    /// [`clear_incoming`](Chat::clear_incoming) avoid that.
    pub fn take_incoming(&mut self) -> Vec<u8> {
        std::mem::take(self.incoming)
    }

    /// The channel, for its id, addresses and [`Channel::connect`]. Output
    /// sent with [`Channel::send`] skips the producer queue: use
    /// [`push`](Chat::push) to keep it in order.
    pub fn channel(&mut self) -> &mut Channel<'a> {
        &mut self.channel
    }

    /// The most bytes of one message collected before
    /// [`ChatHandler::input_overflow`]: 64 KiB unless set.
    pub fn max_input(&self) -> usize {
        self.framer.max_input()
    }

    /// Sets the input limit. It counts message data, not terminators, and
    /// restarts at each message. Raise it (up to `usize::MAX`, no limit)
    /// when the handler does not keep what it collects, for instance while
    /// it streams a counted body to a file, and lower it back after.
    pub fn set_max_input(&mut self, max_input: usize) {
        self.framer.set_max_input(max_input);
    }

    /// The output high-water mark: 256 KiB unless set.
    pub fn output_high_water(&self) -> usize {
        self.outbox.high_water
    }

    /// Sets the output high-water mark: while this many bytes or more wait
    /// to be sent, the channel stops reading and producers are not pulled.
    /// At least 1; 0 is taken as 1.
    pub fn set_output_high_water(&mut self, high_water: usize) {
        self.outbox.set_high_water(high_water);
    }
}

/// The framer's sink inside an `AsyncChat`: the handler's callbacks.
struct Callbacks<'a, 'ch, H> {
    handler: &'a mut H,
    channel: &'a mut Channel<'ch>,
    incoming: &'a mut Vec<u8>,
    outbox: &'a mut Outbox,
    unread: &'a mut Vec<u8>,
    /// The last call ended a message (`found` or `overflow`): framing may
    /// pause here without losing a message end.
    message_ended: bool,
}

impl<'ch, H> Callbacks<'_, 'ch, H> {
    fn chat<'s>(
        channel: &'s mut Channel<'ch>,
        framer: &'s mut Framer,
        incoming: &'s mut Vec<u8>,
        outbox: &'s mut Outbox,
        unread: &'s mut Vec<u8>,
    ) -> Chat<'s> {
        Chat { channel: channel.reborrow(), framer, incoming, outbox, unread }
    }
}

impl<H: ChatHandler> FrameSink for Callbacks<'_, '_, H> {
    fn collect(&mut self, framer: &mut Framer, data: &[u8]) {
        self.message_ended = false;
        let mut chat = Self::chat(self.channel, framer, self.incoming, self.outbox, self.unread);
        self.handler.collect_incoming_data(&mut chat, data);
    }

    fn found(&mut self, framer: &mut Framer) {
        self.message_ended = true;
        let mut chat = Self::chat(self.channel, framer, self.incoming, self.outbox, self.unread);
        self.handler.found_terminator(&mut chat);
    }

    fn overflow(&mut self, framer: &mut Framer) {
        self.message_ended = true;
        let mut chat = Self::chat(self.channel, framer, self.incoming, self.outbox, self.unread);
        self.handler.input_overflow(&mut chat);
        self.incoming.clear();
    }

    /// Once closing, the handler gets no more input. After a complete
    /// message, framing pauses while the output is over the high-water mark
    /// (the rest of the input waits in the `AsyncChat`): that is what bounds
    /// the memory of a pipelining peer that does not read.
    fn stop(&self) -> bool {
        !self.outbox.is_open() || (self.message_ended && !self.outbox.has_room(self.channel.pending_output()))
    }
}

/// Where queued output goes: the channel, or a fake in tests.
trait Output {
    fn send(&mut self, data: &[u8]) -> usize;
    fn pending_output(&self) -> usize;
    fn close(&mut self);
}

impl Output for Channel<'_> {
    fn send(&mut self, data: &[u8]) -> usize {
        Channel::send(self, data)
    }

    fn pending_output(&self) -> usize {
        Channel::pending_output(self)
    }

    fn close(&mut self) {
        Channel::close(self);
    }
}

/// How far an `AsyncChat` is in closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    Open,
    /// `close_when_done`: close once the producers are exhausted.
    WhenDone,
    /// Closed (or asked the channel to): nothing more goes out.
    Closed,
}

/// The output side of an `AsyncChat`: asynchat's `producer_fifo`.
struct Outbox {
    producers: VecDeque<Box<dyn Producer>>,
    high_water: usize,
    /// Reading stops while this many producers wait (see
    /// `AsyncChat::with_max_queued_producers`).
    max_producers: usize,
    closing: Closing,
}

impl Outbox {
    fn new() -> Outbox {
        Outbox {
            producers: VecDeque::new(),
            high_water: DEFAULT_OUTPUT_HIGH_WATER,
            max_producers: DEFAULT_MAX_QUEUED_PRODUCERS,
            closing: Closing::Open,
        }
    }

    /// Whether the queue leaves room to read more requests.
    fn has_room(&self, pending_output: usize) -> bool {
        pending_output < self.high_water && self.producers.len() < self.max_producers
    }

    fn set_high_water(&mut self, high_water: usize) {
        // 0 would stop every producer for good: nothing is ever below it.
        self.high_water = high_water.max(1);
    }

    fn is_open(&self) -> bool {
        self.closing == Closing::Open
    }

    fn writable(&self, pending_output: usize) -> bool {
        !self.producers.is_empty() && pending_output < self.high_water
    }

    fn push(&mut self, out: &mut impl Output, data: &[u8]) {
        if !self.is_open() || data.is_empty() {
            return;
        }
        if !self.producers.is_empty() {
            self.producers.push_back(Box::new(SimpleProducer::new(data)));
        } else if out.send(data) < data.len() {
            // The channel refused: it is closing or broken (closed through
            // Chat::channel, say). Nothing queued could go out either.
            self.abandon();
        }
    }

    fn push_with_producer(&mut self, producer: Box<dyn Producer>) {
        if self.is_open() {
            self.producers.push_back(producer);
        }
    }

    fn close_when_done(&mut self, out: &mut impl Output) {
        if self.is_open() {
            if self.producers.is_empty() {
                self.close(out);
            } else {
                self.closing = Closing::WhenDone;
            }
        }
    }

    fn close(&mut self, out: &mut impl Output) {
        if self.closing != Closing::Closed {
            self.abandon();
            out.close();
        }
    }

    /// Drops the producers; a pending `close_when_done` happens now.
    fn discard(&mut self, out: &mut impl Output) {
        self.producers.clear();
        if self.closing == Closing::WhenDone {
            self.close(out);
        }
    }

    /// Nothing more can go out: drops the producers, without telling the
    /// channel.
    fn abandon(&mut self) {
        self.producers.clear();
        self.closing = Closing::Closed;
    }

    /// Pulls producers into `out` while its queue is below the high-water
    /// mark, then closes if `close_when_done` is pending and they are all
    /// exhausted.
    fn pump(&mut self, out: &mut impl Output, buf: &mut [u8]) -> io::Result<()> {
        // One call produces about one high-water mark's worth at most: a
        // fast peer reading a huge file must not keep the loop from the
        // other channels. The loop is level-triggered and calls again.
        let mut produced = 0;
        while produced < self.high_water && out.pending_output() < self.high_water {
            let Some(producer) = self.producers.front_mut() else { break };
            let n = producer.more(buf)?;
            if n == 0 {
                self.producers.pop_front();
                continue;
            }
            assert!(n <= buf.len(), "Producer::more returned {n} for a buffer of {} bytes", buf.len());
            if out.send(&buf[..n]) < n {
                self.abandon();
                return Ok(());
            }
            produced += n;
        }
        if self.producers.is_empty() && self.closing == Closing::WhenDone {
            self.close(out);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A channel's output side: keeps what is sent, and as much of it
    /// queued as the test lets it.
    #[derive(Default)]
    struct FakeChannel {
        sent: Vec<u8>,
        queued: usize,
        /// Like a socket that takes everything at once.
        drains: bool,
        closed: bool,
        n_sends: usize,
    }

    impl Output for FakeChannel {
        fn send(&mut self, data: &[u8]) -> usize {
            if self.closed {
                return 0;
            }
            self.n_sends += 1;
            self.sent.extend_from_slice(data);
            if !self.drains {
                self.queued += data.len();
            }
            data.len()
        }

        fn pending_output(&self) -> usize {
            self.queued
        }

        fn close(&mut self) {
            self.closed = true;
        }
    }

    fn pump(outbox: &mut Outbox, out: &mut FakeChannel) {
        let mut buf = [0u8; PRODUCER_BUFFER];
        outbox.pump(out, &mut buf).unwrap();
    }

    /// A producer that counts down `n` chunks of its byte, then fails or
    /// ends.
    struct Chunks {
        byte: u8,
        left: usize,
        fail: bool,
    }

    impl Producer for Chunks {
        fn more(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left == 0 {
                return if self.fail { Err(io::Error::other("disk on fire")) } else { Ok(0) };
            }
            self.left -= 1;
            buf.fill(self.byte);
            Ok(buf.len())
        }
    }

    #[test]
    fn push_goes_straight_to_the_channel_when_nothing_is_queued() {
        let (mut outbox, mut out) = (Outbox::new(), FakeChannel::default());
        outbox.push(&mut out, b"hello ");
        outbox.push(&mut out, b"world");
        assert_eq!(out.sent, b"hello world");
        assert!(!outbox.writable(out.pending_output()));
    }

    #[test]
    fn push_behind_a_producer_keeps_the_order() {
        let (mut outbox, mut out) = (Outbox::new(), FakeChannel { drains: true, ..Default::default() });
        outbox.push(&mut out, b"1");
        outbox.push_with_producer(Box::new(SimpleProducer::new(b"2".to_vec())));
        outbox.push(&mut out, b"3");
        outbox.push_with_producer(Box::new(SimpleProducer::new(b"4".to_vec())));
        outbox.push(&mut out, b"5");
        assert_eq!(out.sent, b"1");
        assert!(outbox.writable(out.pending_output()));
        pump(&mut outbox, &mut out);
        assert_eq!(out.sent, b"12345");
        assert!(!outbox.writable(out.pending_output()));
        outbox.push(&mut out, b"6");
        assert_eq!(out.sent, b"123456");
    }

    #[test]
    fn reading_waits_while_too_many_producers_are_queued() {
        let (mut outbox, mut out) = (Outbox::new(), FakeChannel { drains: true, ..Default::default() });
        outbox.max_producers = 3;
        for _ in 0..3 {
            assert!(outbox.has_room(out.pending_output()));
            outbox.push_with_producer(Box::new(SimpleProducer::new(b"x".to_vec())));
        }
        assert!(!outbox.has_room(out.pending_output()), "three producers queued: stop reading");
        pump(&mut outbox, &mut out);
        assert!(outbox.has_room(out.pending_output()), "drained: read again");
    }

    #[test]
    fn producers_are_pulled_only_below_the_high_water_mark() {
        let mut outbox = Outbox::new();
        outbox.set_high_water(100 * 1024);
        let mut out = FakeChannel::default();
        let total = 100 * 1024 * 1024;
        outbox.push_with_producer(Box::new(Chunks { byte: b'x', left: total / PRODUCER_BUFFER, fail: false }));
        let mut rounds = 0;
        while outbox.writable(out.pending_output()) {
            pump(&mut outbox, &mut out);
            // Never more than one buffer past the mark, however big the
            // producer.
            assert!(out.queued < 100 * 1024 + PRODUCER_BUFFER, "queued {}", out.queued);
            assert!(!outbox.writable(out.pending_output()));
            // The peer drains it all.
            out.queued = 0;
            out.sent.clear();
            rounds += 1;
        }
        assert_eq!(rounds, total / (2 * PRODUCER_BUFFER) + 1);
    }

    #[test]
    fn one_pump_is_bounded_even_when_the_socket_takes_everything() {
        let (mut outbox, mut out) = (Outbox::new(), FakeChannel { drains: true, ..Default::default() });
        outbox.push_with_producer(Box::new(Chunks { byte: b'x', left: 1000, fail: false }));
        pump(&mut outbox, &mut out);
        assert_eq!(out.sent.len(), DEFAULT_OUTPUT_HIGH_WATER);
        assert!(outbox.writable(out.pending_output()));
    }

    #[test]
    fn close_when_done_closes_after_the_last_producer() {
        let (mut outbox, mut out) = (Outbox::new(), FakeChannel { drains: true, ..Default::default() });
        outbox.push_with_producer(Box::new(SimpleProducer::new(b"response".to_vec())));
        outbox.close_when_done(&mut out);
        assert!(!out.closed);
        assert!(!outbox.is_open());
        outbox.push(&mut out, b"ignored");
        outbox.push_with_producer(Box::new(SimpleProducer::new(b"ignored".to_vec())));
        pump(&mut outbox, &mut out);
        assert_eq!(out.sent, b"response");
        assert!(out.closed);
        assert!(!outbox.writable(0));
    }

    #[test]
    fn close_when_done_with_nothing_queued_closes_at_once() {
        let (mut outbox, mut out) = (Outbox::new(), FakeChannel::default());
        outbox.push(&mut out, b"bye");
        outbox.close_when_done(&mut out);
        assert!(out.closed);
        assert_eq!(out.sent, b"bye");
    }

    #[test]
    fn discard_drops_producers_and_completes_a_pending_close() {
        let (mut outbox, mut out) = (Outbox::new(), FakeChannel::default());
        outbox.push_with_producer(Box::new(SimpleProducer::new(b"dropped".to_vec())));
        outbox.discard(&mut out);
        assert!(!outbox.writable(0));
        assert!(outbox.is_open());
        outbox.push_with_producer(Box::new(SimpleProducer::new(b"dropped".to_vec())));
        outbox.close_when_done(&mut out);
        outbox.discard(&mut out);
        assert!(out.closed);
        assert!(out.sent.is_empty());
    }

    #[test]
    fn a_producer_error_is_returned_after_what_it_produced() {
        let (mut outbox, mut out) = (Outbox::new(), FakeChannel { drains: true, ..Default::default() });
        outbox.push_with_producer(Box::new(Chunks { byte: b'x', left: 1, fail: true }));
        let mut buf = [0u8; 16];
        let error = outbox.pump(&mut out, &mut buf).unwrap_err();
        assert_eq!(error.to_string(), "disk on fire");
        assert_eq!(out.sent, [b'x'; 16]);
    }

    #[test]
    fn a_refusing_channel_drops_the_queue() {
        let (mut outbox, mut out) = (Outbox::new(), FakeChannel::default());
        outbox.push_with_producer(Box::new(SimpleProducer::new(b"never".to_vec())));
        out.closed = true;
        pump(&mut outbox, &mut out);
        assert!(!outbox.is_open());
        assert!(!outbox.writable(0));

        let (mut outbox, mut out) = (Outbox::new(), FakeChannel { closed: true, ..Default::default() });
        outbox.push(&mut out, b"never");
        assert!(!outbox.is_open());
    }

    #[test]
    fn a_zero_high_water_mark_is_taken_as_one() {
        let mut outbox = Outbox::new();
        outbox.set_high_water(0);
        outbox.push_with_producer(Box::new(SimpleProducer::new(b"x".to_vec())));
        assert!(outbox.writable(0));
        assert!(!outbox.writable(1));
    }
}
