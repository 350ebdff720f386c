//! The host side of the plugin ABI: the functions plugins call back into
//! during a callback, reaching the loop's state through the call's context.
//!
//! These are `extern "C"` functions of the daemon: a panic here would abort
//! the process, so they only do bounded work on state the loop owns, and
//! report failures as negative errno values.

use std::{
    ffi::c_void,
    io::{self, Read, Write},
};

use asyncore_sdk::ffi::{self, DispatcherHandle, HostCtx, HostVtable, StrRef};
use tracing::{debug, error, info, trace, warn};

use super::{CallCtx, Core, channel::Phase};
use crate::plugin_host::{Dispatcher, call_ctx, plugin_name};

const EBADF: i64 = 9;
const EINVAL: i64 = 22;
const EAGAIN: i64 = 11;

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
};

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
    // SAFETY: the plugin lends len bytes for this call.
    let data = unsafe { StrRef { ptr: data, len }.as_bytes() };
    let ch = core.channel(slot);
    if !matches!(ch.phase, Phase::Open | Phase::Connecting) || ch.failed.is_some() {
        return 0;
    }
    let mut rest = data;
    // Write at once what the socket takes when nothing is queued ahead:
    // a request/response exchange then needs no extra pass.
    if ch.out.is_empty() && ch.phase == Phase::Open {
        let super::channel::Socket::Stream(stream) = &mut ch.socket else { return -EBADF };
        while !rest.is_empty() {
            match stream.write(rest) {
                Ok(n) => {
                    ch.counters.bytes_out += n as u64;
                    ch.counters.writes += 1;
                    rest = &rest[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Reported through handle_error once the callback
                    // returns; the bytes are accepted and dropped with the
                    // broken connection.
                    ch.failed = Some(e);
                    return len as i64;
                }
            }
        }
    }
    if !rest.is_empty() {
        ch.out.push(rest);
        core.mark_dirty(slot);
    }
    len as i64
}

unsafe extern "C" fn host_recv(ctx: *mut HostCtx, buf: *mut u8, cap: usize) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return -EBADF };
    let ch = core.channel(slot);
    if ch.read_eof {
        return 0;
    }
    let super::channel::Socket::Stream(stream) = &mut ch.socket else { return -EBADF };
    if cap == 0 {
        return 0;
    }
    // SAFETY: the plugin lends a writable buffer of cap bytes for this call.
    let buf = unsafe { std::slice::from_raw_parts_mut(buf, cap) };
    loop {
        return match stream.read(buf) {
            Ok(0) => {
                // The peer closed: handle_close follows this callback.
                ch.read_eof = true;
                core.dirty_close(slot);
                0
            }
            Ok(n) => {
                ch.counters.bytes_in += n as u64;
                ch.counters.reads += 1;
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
    // SAFETY: the plugin lends a writable buffer of cap bytes.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf, n) };
    text.len() as i64
}

unsafe extern "C" fn host_connect(ctx: *mut HostCtx, address: StrRef, handle: DispatcherHandle) -> i64 {
    let dispatcher = Dispatcher::from_ffi(handle);
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
