//! `Channel`: what a dispatcher may do with its socket during a callback.

use std::{
    fmt, io,
    marker::PhantomData,
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{IntoRawFd, OwnedFd},
    time::Duration,
};

use crate::{
    dispatcher::Dispatcher,
    export::{host, host_opt, into_handle},
    ffi::{self, HostCtx, StrRef},
};

/// Id of a channel in the daemon's channel map. Ids are never reused, so a
/// stale id can only ever name no channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u64);

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The channel a callback is about, lent for the duration of that callback.
///
/// Output is buffered like asyncore's `dispatcher_with_send`: [`send`]
/// queues the bytes, and the host writes everything a channel queued during
/// a pass in one write before the loop waits again (asynchat's
/// `initiate_send`), then flushes the rest as the socket drains. (A send of
/// 16 KiB or more with nothing queued before it is written at once instead:
/// copying it would cost more than the write it saves.) [`close`] flushes that queue before the
/// socket closes, so the peer receives everything sent before it.
///
/// [`send`]: Channel::send
/// [`close`]: Channel::close
pub struct Channel<'a> {
    ctx: *mut HostCtx,
    _call: PhantomData<&'a mut HostCtx>,
}

impl<'a> Channel<'a> {
    /// Wraps the context of one host call.
    ///
    /// # Safety
    ///
    /// `ctx` must be the context the host passed to the current call.
    pub(crate) unsafe fn from_ctx(ctx: *mut HostCtx) -> Channel<'a> {
        Channel { ctx, _call: PhantomData }
    }

    /// The same channel for a shorter borrow (to hand it on, like
    /// `&mut *channel`).
    pub fn reborrow(&mut self) -> Channel<'_> {
        Channel { ctx: self.ctx, _call: PhantomData }
    }

    /// This channel's id.
    pub fn id(&self) -> ChannelId {
        let channel_id = host!(channel_id);
        // SAFETY: ctx is the live context of the current call.
        ChannelId(unsafe { channel_id(self.ctx) })
    }

    /// Reads into `buf`, which need not be initialised, and returns the
    /// bytes read: the fast way to read. A stack buffer of
    /// `MaybeUninit::uninit()` costs nothing, where `[0u8; 65536]` zeroes
    /// 64 KiB before every read (more than reading 64 bytes costs):
    ///
    /// ```no_run
    /// # use asyncore_sdk::prelude::*;
    /// # fn handle_read(channel: &mut Channel<'_>) {
    /// let mut buf = [MaybeUninit::uninit(); 64 * 1024];
    /// if let Ok(data) = channel.recv_uninit(&mut buf) {
    ///     channel.send(data);
    /// }
    /// # }
    /// ```
    ///
    /// An empty slice means the peer closed its side (then
    /// [`Dispatcher::handle_close`] follows).
    ///
    /// # Errors
    ///
    /// As for [`recv`](Channel::recv).
    pub fn recv_uninit<'b>(&mut self, buf: &'b mut [MaybeUninit<u8>]) -> io::Result<&'b [u8]> {
        let recv = host!(recv);
        // SAFETY: buf is valid for writes of buf.len() bytes for the
        // duration of the call; the host writes into it without reading it;
        // ctx is the live context.
        let n = errno_result(unsafe { recv(self.ctx, buf.as_mut_ptr().cast(), buf.len()) })?;
        let filled = &buf[..n.min(buf.len())];
        // SAFETY: the host initialised the first n bytes.
        Ok(unsafe { std::slice::from_raw_parts(filled.as_ptr().cast::<u8>(), filled.len()) })
    }

    /// Reads into `buf`, like `socket.recv`. Prefer
    /// [`recv_uninit`](Channel::recv_uninit), which need not zero `buf`
    /// first.
    ///
    /// Returns the number of bytes read; `Ok(0)` means the peer closed its
    /// side (then [`Dispatcher::handle_close`] follows).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::WouldBlock`] when nothing is waiting (wake-ups can be
    /// spurious), or the socket's error.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let recv = host!(recv);
        // SAFETY: buf is a live, writable buffer of buf.len() bytes for the
        // duration of the call; ctx is the live context.
        let n = unsafe { recv(self.ctx, buf.as_mut_ptr(), buf.len()) };
        errno_result(n)
    }

    /// Sends `data`: the host copies it into the channel's output queue and
    /// writes the queue, gathered, before the loop waits again (or, for 16
    /// KiB or more with nothing queued, writes it now and queues what the
    /// socket did not take). Either way the order of sends holds. Returns the
    /// number of bytes accepted, which is all of them unless the channel is
    /// closing or broken (then 0).
    ///
    /// Watch [`pending_output`](Channel::pending_output) (for example in
    /// [`Dispatcher::readable`]) to stop reading while a slow peer lets
    /// output pile up.
    pub fn send(&mut self, data: &[u8]) -> usize {
        let send = host!(send);
        // SAFETY: data is live for the call; the host copies it before
        // returning.
        let n = unsafe { send(self.ctx, data.as_ptr(), data.len()) };
        usize::try_from(n).unwrap_or(0)
    }

    /// Bytes queued for output and not yet written to the socket.
    pub fn pending_output(&self) -> usize {
        let pending_output = host!(pending_output);
        // SAFETY: ctx is the live context.
        let n = unsafe { pending_output(self.ctx) };
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// Closes the channel once its queued output has been flushed. No
    /// handler of this dispatcher is called after the current one returns.
    pub fn close(&mut self) {
        let close = host!(close);
        // SAFETY: ctx is the live context.
        unsafe { close(self.ctx) };
    }

    /// The remote address, if the socket has one.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.address(ffi::address::PEER)
    }

    /// The local address, if the socket has one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.address(ffi::address::LOCAL)
    }

    fn address(&self, which: u32) -> Option<SocketAddr> {
        let mut buf = [0u8; 64];
        let address = host!(address);
        // SAFETY: buf is writable for its length; ctx is the live context.
        let n = unsafe { address(self.ctx, which, buf.as_mut_ptr(), buf.len()) };
        let n = usize::try_from(n).ok().filter(|&n| n <= buf.len())?;
        std::str::from_utf8(&buf[..n]).ok()?.parse().ok()
    }

    /// Starts an outbound TCP connection to `addr` (a literal `ip:port`; the
    /// loop does not resolve names, since resolving blocks), served by
    /// `dispatcher`: its [`Dispatcher::handle_connect`] runs once the
    /// connection is established, [`Dispatcher::handle_error`] if it fails.
    /// Returns the new channel's id.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] for an address that is not `ip:port`,
    /// or the error of creating the socket.
    pub fn connect(&mut self, addr: SocketAddr, dispatcher: Box<dyn Dispatcher>) -> io::Result<ChannelId> {
        let text = addr.to_string();
        let connect = host!(connect);
        // SAFETY: the string is live for the call; ownership of the handle
        // passes to the host, which frees it through its vtable.
        let n = unsafe { connect(self.ctx, StrRef::new(&text), into_handle(dispatcher)) };
        errno_result(n).map(|id| ChannelId(id as u64))
    }
}

impl Channel<'_> {
    /// Sends `data` on another channel, by id (a chat room fanning a line out
    /// to its members). Output is queued and flushed like [`send`](Channel::send).
    ///
    /// # Errors
    ///
    /// `EBADF` (raw OS error 9) when `channel` names no open channel (it
    /// closed or is closing: ids are never reused).
    pub fn send_to(&mut self, channel: ChannelId, data: &[u8]) -> io::Result<usize> {
        let send_to = host_opt!(send_to).ok_or_else(|| older_host("send_to"))?;
        // SAFETY: data is live for the call; the host copies it.
        let n = unsafe { send_to(self.ctx, channel.0, data.as_ptr(), data.len()) };
        errno_result(n)
    }

    /// Bytes queued for output on another channel, or `None` if it is gone
    /// or closing.
    /// With [`wake`](Channel::wake), this is how one channel applies
    /// backpressure to another (a proxy stops reading from one side while
    /// the other side's output is piling up).
    pub fn pending_output_of(&self, channel: ChannelId) -> Option<usize> {
        let pending_output_of = host_opt!(pending_output_of)?;
        // SAFETY: ctx is the live context.
        let n = unsafe { pending_output_of(self.ctx, channel.0) };
        usize::try_from(n).ok()
    }

    /// Makes the loop re-ask `readable()`/`writable()` of another channel
    /// before its next wait. Answers are cached until a channel's own
    /// handler runs; call this when something that channel's answers depend
    /// on changed here.
    pub fn wake(&self, channel: ChannelId) -> bool {
        let Some(wake) = host_opt!(wake) else { return false };
        // SAFETY: ctx is the live context.
        unsafe { wake(self.ctx, channel.0) == 0 }
    }

    /// Calls [`Dispatcher::handle_timer`] with `token` after `delay`, on the
    /// loop thread (no extra thread). Returns an id for
    /// [`cancel_timer`](Channel::cancel_timer). Timers die with their
    /// channel. A daemon older than ABI 1.1 has no timers: the timer never
    /// fires and its id is `TimerId(0)`.
    pub fn call_later(&mut self, delay: Duration, token: u64) -> TimerId {
        let Some(call_later) = host_opt!(call_later) else { return TimerId(0) };
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        // SAFETY: ctx is the live context.
        TimerId(u64::try_from(unsafe { call_later(self.ctx, ms, token) }).unwrap_or(0))
    }

    /// Cancels a timer set by this channel. Returns false if it already
    /// fired or was cancelled.
    pub fn cancel_timer(&mut self, timer: TimerId) -> bool {
        let Some(cancel_timer) = host_opt!(cancel_timer) else { return false };
        // SAFETY: ctx is the live context.
        unsafe { cancel_timer(self.ctx, timer.0) == 0 }
    }

    /// Shuts down the write side once queued output is flushed: the peer
    /// reads EOF, and this channel can still read (a proxy passing on a
    /// half-close). A daemon older than ABI 1.1 cannot half-close: the
    /// channel then closes once its output is flushed, as with
    /// [`close`](Channel::close).
    pub fn shutdown_write(&mut self) {
        match host_opt!(shutdown_write) {
            Some(shutdown_write) => {
                // SAFETY: ctx is the live context.
                unsafe { shutdown_write(self.ctx) };
            }
            None => self.close(),
        }
    }

    /// asyncore's `file_dispatcher`: serves a file descriptor (a pipe, a
    /// FIFO, a character device; not a regular file, which is always
    /// ready) in the same loop, with `dispatcher`. The descriptor is made
    /// non-blocking. Returns the new channel's id.
    ///
    /// # Errors
    ///
    /// The error of registering the descriptor.
    pub fn attach_fd(&mut self, fd: OwnedFd, dispatcher: Box<dyn Dispatcher>) -> io::Result<ChannelId> {
        let attach_fd = host_opt!(attach_fd).ok_or_else(|| older_host("attach_fd"))?;
        // SAFETY: ownership of the descriptor and of the handle passes to
        // the host.
        let n = unsafe { attach_fd(self.ctx, fd.into_raw_fd(), into_handle(dispatcher)) };
        errno_result(n).map(|id| ChannelId(id as u64))
    }
}

/// A timer set with [`Channel::call_later`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerId(pub u64);

impl fmt::Debug for Channel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel").field("id", &self.id()).finish()
    }
}

/// The error of a host function this SDK knows and the daemon does not.
fn older_host(function: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("the daemon's plugin abi predates {function} (abi 1.1)"))
}

/// Turns a host return value (a count, or a negative errno) into a result.
fn errno_result(n: i64) -> io::Result<usize> {
    if n >= 0 { Ok(n as usize) } else { Err(io::Error::from_raw_os_error((-n) as i32)) }
}
