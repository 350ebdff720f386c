//! The host side of the plugin ABI: the functions plugins call back into
//! during a callback, reaching the loop's state through the call's context.
//!
//! These are `extern "C"` functions of the daemon: a panic here would abort
//! the process, so they only do bounded work on state the loop owns, and
//! report failures as negative errno values.

use std::{
    ffi::c_void,
    io::{self, Read},
    os::fd::{FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use asyncore_abi::{self as ffi, DispatcherHandle, HostCtx, HostVtable, StrRef};
use tracing::{debug, error, info, trace, warn};

use super::{CallCtx, Core, TimerKind, channel::Phase};
use crate::command::ChannelKind;
use crate::plugin_host::{Dispatcher, call_ctx, plugin_name};

const EBADF: i64 = libc::EBADF as i64;
const EINVAL: i64 = libc::EINVAL as i64;
const EAGAIN: i64 = libc::EAGAIN as i64;
const ENOENT: i64 = libc::ENOENT as i64;

/// The table handed to every plugin's `init`.
pub(crate) static HOST_VTABLE: HostVtable = HostVtable {
    size: size_of::<HostVtable>() as u32,
    abi_major: ffi::ABI_MAJOR,
    abi_minor: ffi::ABI_MINOR,
    log: host_log,
    report: host_report,
    channel_id: host_channel_id,
    send: host_send,
    recv: host_recv,
    close: host_close,
    pending_output: host_pending_output,
    address: host_address,
    connect: host_connect,
    send_to: host_send_to,
    pending_output_of: host_pending_output_of,
    wake: host_wake,
    call_later: host_call_later,
    cancel_timer: host_cancel_timer,
    shutdown_write: host_shutdown_write,
    attach_fd: host_attach_fd,
    hand_over: host_hand_over,
};

unsafe extern "C" fn host_hand_over(ctx: *mut HostCtx, state: *const u8, len: usize) {
    // SAFETY: ctx is a live call context; the plugin lends len bytes.
    unsafe { call_ctx(ctx).state = Some(StrRef { ptr: state, len }.as_bytes().to_vec()) };
}

/// The core and slot of the channel a call is about, if any.
///
/// # Safety
///
/// `ctx` must be a live context passed to a running plugin call.
unsafe fn channel_of<'a>(ctx: *mut HostCtx) -> Option<(&'a mut Core, usize)> {
    // SAFETY: guaranteed by the caller.
    let ctx: &mut CallCtx = unsafe { call_ctx(ctx) };
    if ctx.core.is_null() {
        return None;
    }
    let slot = ctx.slot?;
    // SAFETY: the loop made ctx from its `&mut Core` and uses nothing else
    // of the core until the plugin call returns.
    let core = unsafe { &mut *ctx.core };
    core.channels.get(slot)?.as_ref()?;
    Some((core, slot))
}

fn errno(error: &io::Error) -> i64 {
    -i64::from(error.raw_os_error().unwrap_or(5))
}

unsafe extern "C" fn host_log(host_data: *mut c_void, level: u32, message: StrRef) {
    // SAFETY: host_data is what load() passed to init; the message is lent
    // for this call.
    let (plugin, message) = unsafe { (plugin_name(host_data), message.to_string_lossy()) };
    match level {
        ffi::level::ERROR => error!(target: "asyncored::plugin", plugin = %plugin, "{message}"),
        ffi::level::WARN => warn!(target: "asyncored::plugin", plugin = %plugin, "{message}"),
        ffi::level::INFO => info!(target: "asyncored::plugin", plugin = %plugin, "{message}"),
        ffi::level::DEBUG => debug!(target: "asyncored::plugin", plugin = %plugin, "{message}"),
        _ => trace!(target: "asyncored::plugin", plugin = %plugin, "{message}"),
    }
}

unsafe extern "C" fn host_report(ctx: *mut HostCtx, message: StrRef) {
    // SAFETY: ctx is a live call context; the message is lent for this call.
    unsafe { call_ctx(ctx).report = Some(message.to_string_lossy()) };
}

unsafe extern "C" fn host_channel_id(ctx: *mut HostCtx) -> u64 {
    // SAFETY: ctx is a live call context.
    match unsafe { channel_of(ctx) } {
        Some((core, slot)) => core.channel_ref(slot).id,
        None => 0,
    }
}

unsafe extern "C" fn host_send(ctx: *mut HostCtx, data: *const u8, len: usize) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return -EBADF };
    if !core.takes_output(slot) {
        return 0;
    }
    // SAFETY: the plugin lends len bytes for this call.
    let data = unsafe { StrRef { ptr: data, len }.as_bytes() };
    core.queue_output(slot, data)
}

unsafe extern "C" fn host_send_to(ctx: *mut HostCtx, channel_id: u64, data: *const u8, len: usize) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, _)) = (unsafe { channel_of(ctx) }) else { return -EBADF };
    let Some(&target) = core.ids.get(&channel_id) else { return -EBADF };
    if !core.takes_output(target) {
        return -EBADF;
    }
    // SAFETY: the plugin lends len bytes for this call.
    let data = unsafe { StrRef { ptr: data, len }.as_bytes() };
    let n = core.queue_output(target, data);
    // The target's own handler is not running: settle its error (if the
    // write failed) on its next refresh.
    core.mark_dirty(target);
    n
}

unsafe extern "C" fn host_pending_output_of(ctx: *mut HostCtx, channel_id: u64) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, _)) = (unsafe { channel_of(ctx) }) else { return -EBADF };
    // A closing channel takes no more output (send_to refuses it), so it
    // answers like a closed one.
    match core.ids.get(&channel_id) {
        Some(&slot) if core.takes_output(slot) => core.channel_ref(slot).out.len() as i64,
        _ => -EBADF,
    }
}

unsafe extern "C" fn host_wake(ctx: *mut HostCtx, channel_id: u64) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, _)) = (unsafe { channel_of(ctx) }) else { return -EBADF };
    match core.ids.get(&channel_id) {
        Some(&slot) => {
            core.mark_dirty(slot);
            0
        }
        None => -EBADF,
    }
}

unsafe extern "C" fn host_call_later(ctx: *mut HostCtx, delay_ms: u64, token: u64) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return -EBADF };
    let timer_id = core.next_timer_id;
    core.next_timer_id += 1;
    let at = Instant::now() + Duration::from_millis(delay_ms.min(u64::from(u32::MAX)));
    let channel_id = core.channel_ref(slot).id;
    core.live_calls.insert(timer_id, channel_id);
    core.push_timer(at, channel_id, TimerKind::Call { timer_id, token });
    timer_id as i64
}

unsafe extern "C" fn host_cancel_timer(ctx: *mut HostCtx, timer_id: u64) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return -EBADF };
    let channel_id = core.channel_ref(slot).id;
    // Only this channel's own timers; the heap entry is skipped when due.
    if core.live_calls.get(&timer_id) == Some(&channel_id) {
        core.live_calls.remove(&timer_id);
        0
    } else {
        -ENOENT
    }
}

unsafe extern "C" fn host_shutdown_write(ctx: *mut HostCtx) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return -EBADF };
    if matches!(core.channel_ref(slot).socket, super::channel::Socket::Pipe(_)) {
        // A pipe end has one direction: shutting its writing down is
        // closing it (the reader then sees EOF).
        core.close_requested(slot);
        return 0;
    }
    core.channel(slot).shutdown_after_flush = true;
    core.mark_dirty(slot);
    0
}

unsafe extern "C" fn host_attach_fd(ctx: *mut HostCtx, fd: i32, handle: DispatcherHandle) -> i64 {
    let Some(dispatcher) = Dispatcher::adopt(handle) else {
        if fd >= 0 {
            // SAFETY: the plugin passed ownership of an open descriptor.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        return -EINVAL;
    };
    if fd < 0 {
        dispatcher.release();
        return -EBADF;
    }
    // SAFETY: the plugin passed ownership of an open descriptor.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else {
        dispatcher.release();
        return -EBADF;
    };
    match core.attach(slot, file, dispatcher) {
        Ok(id) => id as i64,
        Err(e) => {
            dispatcher.release();
            errno(&e)
        }
    }
}

unsafe extern "C" fn host_recv(ctx: *mut HostCtx, buf: *mut u8, cap: usize) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return -EBADF };
    let core_now = core.now;
    let ch = core.channel(slot);
    if ch.read_eof {
        return 0;
    }
    if matches!(ch.socket, super::channel::Socket::Listener(_)) {
        return -EBADF;
    }
    if cap == 0 {
        return 0;
    }
    // SAFETY: the plugin lends a writable buffer of cap bytes for this call.
    let buf = unsafe { std::slice::from_raw_parts_mut(buf, cap) };
    loop {
        return match ch.socket.read(buf) {
            Ok(0) => {
                // The peer closed: handle_close follows this callback.
                ch.read_eof = true;
                core.dirty_close(slot);
                0
            }
            Ok(n) => {
                ch.counters.bytes_in += n as u64;
                ch.counters.reads += 1;
                ch.last_activity = core_now;
                n as i64
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => -EAGAIN,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let code = errno(&e);
                ch.failed = Some(e);
                code
            }
        };
    }
}

unsafe extern "C" fn host_close(ctx: *mut HostCtx) -> i32 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return -(EBADF as i32) };
    // The dispatcher cannot be released while its own callback runs: only
    // mark the channel; the loop releases it after the call.
    core.close_requested(slot);
    0
}

unsafe extern "C" fn host_pending_output(ctx: *mut HostCtx) -> u64 {
    // SAFETY: ctx is a live call context.
    match unsafe { channel_of(ctx) } {
        Some((core, slot)) => core.channel_ref(slot).out.len() as u64,
        None => 0,
    }
}

unsafe extern "C" fn host_address(ctx: *mut HostCtx, which: u32, buf: *mut u8, cap: usize) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return -EBADF };
    let ch = core.channel_ref(slot);
    let address = match which {
        ffi::address::PEER => ch.peer,
        ffi::address::LOCAL => ch.local,
        _ => return -EINVAL,
    };
    let Some(address) = address else {
        return -(107/* ENOTCONN */);
    };
    let text = address.to_string();
    let n = text.len().min(cap);
    if n > 0 && !buf.is_null() {
        // SAFETY: the plugin lends a writable buffer of cap bytes.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf, n) };
    }
    text.len() as i64
}

unsafe extern "C" fn host_connect(ctx: *mut HostCtx, address: StrRef, handle: DispatcherHandle) -> i64 {
    let Some(dispatcher) = Dispatcher::adopt(handle) else { return -EINVAL };
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else {
        dispatcher.release();
        return -EBADF;
    };
    // SAFETY: the address is lent for this call.
    let address = unsafe { address.to_string_lossy() };
    match core.connect(slot, &address, dispatcher) {
        Ok(id) => id as i64,
        Err(e) => {
            dispatcher.release();
            errno(&e)
        }
    }
}

impl Core {
    /// Whether a channel takes output: an open (or connecting) stream or
    /// pipe. A listening socket never does.
    fn takes_output(&self, slot: usize) -> bool {
        let ch = self.channel_ref(slot);
        ch.kind != ChannelKind::Listening && matches!(ch.phase, Phase::Open | Phase::Connecting)
    }

    /// Queues output on a channel, writing at once what the socket takes
    /// when nothing is queued ahead (a request/response exchange then needs
    /// no extra pass). Returns the number of bytes accepted: all of them,
    /// or 0 once the channel is closing, shut for writing, or broken.
    fn queue_output(&mut self, slot: usize, data: &[u8]) -> i64 {
        let now = self.now;
        let ch = self.channel(slot);
        if !matches!(ch.phase, Phase::Open | Phase::Connecting)
            || ch.failed.is_some()
            || ch.write_shut
            || ch.shutdown_after_flush
        {
            return 0;
        }
        let mut rest = data;
        if ch.out.is_empty() && ch.phase == Phase::Open {
            match ch.out.write_through(&mut ch.socket, rest) {
                Ok((written, writes)) => {
                    if written > 0 {
                        ch.last_activity = now;
                    }
                    ch.counters.bytes_out += written as u64;
                    ch.counters.writes += writes;
                    rest = &rest[written..];
                }
                Err(e) => {
                    // Reported through handle_error once the callback
                    // returns; the bytes are accepted and dropped with the
                    // broken connection.
                    ch.failed = Some(e);
                    return data.len() as i64;
                }
            }
        }
        if !rest.is_empty() {
            ch.out.push(rest);
            self.mark_dirty(slot);
        }
        data.len() as i64
    }

    /// `close()` from inside a callback of the channel.
    fn close_requested(&mut self, slot: usize) {
        let ch = self.channel(slot);
        if matches!(ch.phase, Phase::Open | Phase::Connecting) {
            ch.close_pending = true;
            self.mark_dirty(slot);
        }
    }

    /// `recv` saw the peer's close during a callback.
    fn dirty_close(&mut self, slot: usize) {
        self.channel(slot).close_event_pending = true;
        self.mark_dirty(slot);
    }
}
