//! The C ABI between the daemon and a plugin library.
//!
//! Everything that crosses the `dlopen` boundary is defined here: `#[repr(C)]`
//! structs, `extern "C"` function pointers and plain integer codes. Trait
//! objects, `String`, `Vec` and `Box` never cross it. This crate has no
//! dependencies: the engine (the host side) and the SDK (the plugin side,
//! which re-exports it as `asyncore_sdk::ffi`) both build on it. Plugin
//! authors never touch it; the SDK's export macro does.
//!
//! # Versioning
//!
//! * [`AbiTag`], exported as the static symbol `asyncore_plugin_abi`, is frozen
//!   forever: its layout never changes, so a loader of any version can read the
//!   ABI version of a library of any version and name both in its error.
//! * The entry point carries the ABI major in its symbol name
//!   (`asyncore_plugin_v1`): a library of another major fails at `dlsym`.
//! * Structs that may grow ([`PluginDescriptor`], [`HostVtable`],
//!   [`DispatcherVtable`]) start with their own `size`; fields are only ever
//!   appended, with a minor version bump. A reader reads `size` first and
//!   treats a field that ends past it as absent ([`has_field`]); a table
//!   smaller than the first version's ([`v1_0`]) is refused, naming both
//!   sizes.
//!
//! # History
//!
//! * **1.0**: the first tables, whose sizes [`v1_0`] keeps.
//! * **1.1** appended `HostVtable::{send_to, pending_output_of, wake,
//!   call_later, cancel_timer, shutdown_write, attach_fd, hand_over}`,
//!   `DispatcherVtable::export_state` and `PluginDescriptor::import_state`
//!   (cooperating channels, timers, pipes, state handover).
//! * **1.2** added [`event::SHUTDOWN`] with its [`close_reason`] codes, and
//!   appended `DispatcherVtable::import_channel` and
//!   `PluginDescriptor::resume` (state that survives a reload: a listener's
//!   shared state, and channels that find their listener again).
//! * **1.3** appended `HostVtable::{metric_define, metric_add, metric_set,
//!   annotate}` and `DispatcherVtable::describe` (plugin-defined counters
//!   and gauges, exported by the daemon; a channel's own description of its
//!   state, shown when someone looks at it).
//!
//! # Ownership
//!
//! Memory is freed by the side that allocated it. Host-to-plugin bytes are lent
//! for one call ([`StrRef`]) or written into a plugin-owned buffer (`recv`).
//! Plugin-to-host bytes are copied by the host before the call returns (`send`,
//! `log`, `report`). A dispatcher instance is owned by whoever holds its
//! [`DispatcherHandle`] and is freed through its vtable's `drop`.

use std::ffi::c_void;

/// Major version of the ABI. A library whose major differs is refused.
pub const ABI_MAJOR: u32 = 1;
/// Minor version of the ABI: grows when fields are appended.
pub const ABI_MINOR: u32 = 3;
/// First bytes of [`AbiTag`].
pub const ABI_MAGIC: [u8; 8] = *b"ASYNCABI";
/// Name of the static [`AbiTag`] every plugin exports.
pub const ABI_TAG_SYMBOL: &str = "asyncore_plugin_abi";
/// Name of the entry function of ABI major 1.
pub const ENTRY_SYMBOL: &str = "asyncore_plugin_v1";

/// Frozen forever: read first by the loader, whatever its own version.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbiTag {
    /// Always [`ABI_MAGIC`].
    pub magic: [u8; 8],
    /// ABI major the library was built against.
    pub major: u32,
    /// ABI minor the library was built against.
    pub minor: u32,
}

impl AbiTag {
    /// The tag of this SDK build.
    pub const CURRENT: AbiTag = AbiTag { magic: ABI_MAGIC, major: ABI_MAJOR, minor: ABI_MINOR };
}

/// Borrowed UTF-8 bytes, valid for the duration of one call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct StrRef {
    /// First byte (may dangle when `len` is 0).
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

impl StrRef {
    /// Lends `s` for one call.
    pub const fn new(s: &str) -> StrRef {
        StrRef { ptr: s.as_ptr(), len: s.len() }
    }

    /// Reads the bytes back.
    ///
    /// # Safety
    ///
    /// `ptr` must point to `len` readable bytes that stay valid for `'a`.
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees ptr/len describe live memory.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Reads the bytes back as text, replacing invalid UTF-8.
    ///
    /// # Safety
    ///
    /// As for [`StrRef::as_bytes`].
    pub unsafe fn to_string_lossy(self) -> String {
        // SAFETY: forwarded to the caller.
        String::from_utf8_lossy(unsafe { self.as_bytes() }).into_owned()
    }
}

/// One configuration entry lent to `listen`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KeyValue {
    /// The key.
    pub key: StrRef,
    /// The value.
    pub value: StrRef,
}

/// Opaque per-call context owned by the host. Plugins pass it back to host
/// functions and never dereference it.
#[repr(C)]
pub struct HostCtx {
    _private: [u8; 0],
}

/// A dispatcher instance and the table of functions that operate on it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DispatcherHandle {
    /// The instance, owned by whoever holds the handle.
    pub instance: *mut c_void,
    /// Static table of the instance's functions.
    pub vtable: *const DispatcherVtable,
}

/// Status codes returned by plugin calls.
pub mod status {
    /// The call completed.
    pub const OK: i32 = 0;
    /// The call panicked; the message was passed to `HostVtable::report`.
    /// The dispatcher is poisoned: the host only drops it from now on.
    pub const PANICKED: i32 = 1;
    /// The call declined (for example `handle_accepted` returned no
    /// dispatcher, or `listen` rejected its config); the message, if any, was
    /// passed to `report`.
    pub const DECLINED: i32 = 2;
}

/// Bits returned by `DispatcherVtable::interest`.
pub mod interest {
    /// `readable()` answered true.
    pub const READABLE: u32 = 1;
    /// `writable()` answered true.
    pub const WRITABLE: u32 = 2;
    /// The call panicked (see [`super::status::PANICKED`]).
    pub const PANICKED: u32 = 1 << 31;
}

/// Event codes passed to `DispatcherVtable::handle_event`.
pub mod event {
    /// `handle_read`.
    pub const READ: u32 = 1;
    /// `handle_write`.
    pub const WRITE: u32 = 2;
    /// `handle_connect`.
    pub const CONNECT: u32 = 3;
    /// `handle_close`.
    pub const CLOSE: u32 = 4;
    /// `handle_expt`.
    pub const EXPT: u32 = 5;
    /// `handle_error`; the argument is an errno value.
    pub const ERROR: u32 = 6;
    /// `handle_timer`; the argument is the token given to `call_later`.
    pub const TIMER: u32 = 7;
    /// `handle_shutdown` (ABI 1.2): the host closes the channel gracefully
    /// for a reason of its own; the argument is a [`close_reason`](super::close_reason)
    /// code. The dispatcher is asked for output until it has none left.
    /// Older plugins ignore event codes they do not know.
    pub const SHUTDOWN: u32 = 8;
}

/// Why the host closes a channel the dispatcher did not close itself: the
/// argument of [`event::SHUTDOWN`]. Readers treat an unknown code as
/// [`close_reason::OTHER`].
pub mod close_reason {
    /// A reason this build does not know.
    pub const OTHER: i64 = 0;
    /// The listener's `idle_timeout` passed without traffic.
    pub const IDLE_TIMEOUT: i64 = 1;
    /// The control plane closed it (`CloseChannel`, `StopListener` with
    /// `close_channels`).
    pub const CONTROL: i64 = 2;
    /// The daemon is draining (SIGTERM).
    pub const DRAIN: i64 = 3;
    /// A newer generation of the plugin is current and this generation's
    /// drain timeout passed.
    pub const RELOAD: i64 = 4;
    /// The plugin's generation is being unloaded (`force`).
    pub const UNLOAD: i64 = 5;
}

/// Which address `HostVtable::address` returns.
pub mod address {
    /// The remote end.
    pub const PEER: u32 = 0;
    /// The local end.
    pub const LOCAL: u32 = 1;
}

/// Log levels passed to `HostVtable::log`.
pub mod level {
    /// Errors.
    pub const ERROR: u32 = 1;
    /// Warnings.
    pub const WARN: u32 = 2;
    /// Information.
    pub const INFO: u32 = 3;
    /// Debugging.
    pub const DEBUG: u32 = 4;
    /// Tracing.
    pub const TRACE: u32 = 5;
}

/// Functions a dispatcher instance offers the host. One static table per SDK
/// build; every entry catches panics inside the plugin.
#[repr(C)]
pub struct DispatcherVtable {
    /// `size_of::<DispatcherVtable>()` in the plugin's build.
    pub size: u32,
    /// Asks `readable()` and `writable()`; returns [`interest`] bits.
    pub interest: unsafe extern "C" fn(instance: *mut c_void, ctx: *mut HostCtx) -> u32,
    /// Calls the `handle_*` method named by an [`event`] code; returns a
    /// [`status`] code.
    pub handle_event: unsafe extern "C" fn(instance: *mut c_void, ctx: *mut HostCtx, event: u32, arg: i64) -> i32,
    /// Calls `handle_accepted` on a listening dispatcher; `ctx` is the new
    /// channel. On [`status::OK`] the new dispatcher was written to `out`.
    pub handle_accepted:
        unsafe extern "C" fn(instance: *mut c_void, ctx: *mut HostCtx, out: *mut DispatcherHandle) -> i32,
    /// Frees the instance. Never panics out.
    pub drop: unsafe extern "C" fn(instance: *mut c_void),
    /// Asks `export_state()`: on [`status::OK`] the state was passed to
    /// `HostVtable::hand_over`; [`status::DECLINED`] keeps the channel on
    /// its generation. Asked of listening dispatchers too: their state goes
    /// to the new generation's `PluginDescriptor::resume`.
    pub export_state: unsafe extern "C" fn(instance: *mut c_void, ctx: *mut HostCtx) -> i32,
    /// (1.2) Calls `import_channel` on a listening dispatcher: `ctx` is a
    /// channel an older generation handed over with `state`. On
    /// [`status::OK`] the channel's new dispatcher was written to `out`;
    /// [`status::DECLINED`] keeps the channel on its old generation. Null
    /// when the dispatcher does not import channels.
    pub import_channel: Option<
        unsafe extern "C" fn(
            instance: *mut c_void,
            ctx: *mut HostCtx,
            state: StrRef,
            out: *mut DispatcherHandle,
        ) -> i32,
    >,
    /// (1.3) Asks the dispatcher to describe its state (terminator, bytes
    /// buffered, the request being served) by calling
    /// `HostVtable::annotate` for each pair; returns a [`status`] code.
    /// Called only when someone looks at the channel, never per pass. Null
    /// when the dispatcher has nothing to say.
    pub describe: Option<unsafe extern "C" fn(instance: *mut c_void, ctx: *mut HostCtx) -> i32>,
}

/// Functions the host offers a plugin, passed once to `init`.
///
/// `ctx` arguments are valid only during the plugin call they were passed to.
/// Functions returning `i64` return a negative errno on failure.
#[repr(C)]
pub struct HostVtable {
    /// `size_of::<HostVtable>()` in the host's build.
    pub size: u32,
    /// The host's ABI major.
    pub abi_major: u32,
    /// The host's ABI minor.
    pub abi_minor: u32,
    /// Emits a log record attributed to the plugin (`host_data` from `init`).
    pub log: unsafe extern "C" fn(host_data: *mut c_void, level: u32, message: StrRef),
    /// Records the message explaining the current call's failure or panic.
    pub report: unsafe extern "C" fn(ctx: *mut HostCtx, message: StrRef),
    /// Id of the channel the call is about (0 when there is none).
    pub channel_id: unsafe extern "C" fn(ctx: *mut HostCtx) -> u64,
    /// Queues `len` bytes for output on the channel (the host writes the
    /// queue before the loop waits again); returns the number of bytes
    /// accepted.
    pub send: unsafe extern "C" fn(ctx: *mut HostCtx, data: *const u8, len: usize) -> i64,
    /// Reads at most `cap` bytes into `buf`; 0 means the peer closed.
    pub recv: unsafe extern "C" fn(ctx: *mut HostCtx, buf: *mut u8, cap: usize) -> i64,
    /// Closes the channel once its queued output is flushed.
    pub close: unsafe extern "C" fn(ctx: *mut HostCtx) -> i32,
    /// Bytes queued for output and not yet written.
    pub pending_output: unsafe extern "C" fn(ctx: *mut HostCtx) -> u64,
    /// Writes the peer or local address as text into `buf`; returns its full
    /// length (which may exceed `cap`).
    pub address: unsafe extern "C" fn(ctx: *mut HostCtx, which: u32, buf: *mut u8, cap: usize) -> i64,
    /// Starts an outbound connection to `addr` (`ip:port`), served by the
    /// dispatcher `handle` (ownership passes to the host, even on failure);
    /// returns the new channel's id.
    pub connect: unsafe extern "C" fn(ctx: *mut HostCtx, addr: StrRef, handle: DispatcherHandle) -> i64,
    /// Queues `len` bytes for output on another channel by id; returns the
    /// number of bytes accepted, or `-EBADF` for an id that names no open
    /// channel.
    pub send_to: unsafe extern "C" fn(ctx: *mut HostCtx, channel_id: u64, data: *const u8, len: usize) -> i64,
    /// Bytes queued for output on another channel by id, or `-EBADF`.
    pub pending_output_of: unsafe extern "C" fn(ctx: *mut HostCtx, channel_id: u64) -> i64,
    /// Asks the loop to re-ask `readable()`/`writable()` of another channel
    /// before its next wait (0, or `-EBADF`).
    pub wake: unsafe extern "C" fn(ctx: *mut HostCtx, channel_id: u64) -> i64,
    /// Calls `handle_timer(token)` on this channel's dispatcher after
    /// `delay_ms`; returns a timer id for `cancel_timer`.
    pub call_later: unsafe extern "C" fn(ctx: *mut HostCtx, delay_ms: u64, token: u64) -> i64,
    /// Cancels a timer of this channel (0, or `-ENOENT` once fired or
    /// unknown).
    pub cancel_timer: unsafe extern "C" fn(ctx: *mut HostCtx, timer_id: u64) -> i64,
    /// Shuts down the write side once queued output is flushed (the peer
    /// sees EOF); reading goes on.
    pub shutdown_write: unsafe extern "C" fn(ctx: *mut HostCtx) -> i64,
    /// Adds a channel over a file descriptor the plugin owned (a pipe),
    /// served by `handle`; ownership of both passes to the host, even on
    /// failure. Returns the new channel's id.
    pub attach_fd: unsafe extern "C" fn(ctx: *mut HostCtx, fd: i32, handle: DispatcherHandle) -> i64,
    /// Receives the state `export_state` hands over; the host copies it.
    pub hand_over: unsafe extern "C" fn(ctx: *mut HostCtx, state: *const u8, len: usize),
    /// (1.3) Defines a metric of the plugin (`host_data` from `init`): a
    /// [`metric_kind`] code, a Prometheus name (`[a-zA-Z_:][a-zA-Z0-9_:]*`)
    /// and a help text. Returns its id, the same for a name defined before,
    /// or `-EINVAL` (a bad name, or another kind), `-ENOSPC` (too many).
    /// Callable at any time on the thread that calls the plugin.
    pub metric_define: unsafe extern "C" fn(host_data: *mut c_void, kind: u32, name: StrRef, help: StrRef) -> i64,
    /// (1.3) Adds `delta` to a metric (a counter ignores a negative one).
    pub metric_add: unsafe extern "C" fn(host_data: *mut c_void, id: u64, delta: i64),
    /// (1.3) Sets a gauge.
    pub metric_set: unsafe extern "C" fn(host_data: *mut c_void, id: u64, value: i64),
    /// (1.3) During `describe`: one key/value pair of the channel's
    /// description; the host copies both.
    pub annotate: unsafe extern "C" fn(ctx: *mut HostCtx, key: StrRef, value: StrRef),
}

/// Metric kinds for `HostVtable::metric_define`.
pub mod metric_kind {
    /// Only ever goes up.
    pub const COUNTER: u32 = 1;
    /// Goes up and down.
    pub const GAUGE: u32 = 2;
}

/// What a plugin library describes itself with; returned by the entry point.
#[repr(C)]
pub struct PluginDescriptor {
    /// `size_of::<PluginDescriptor>()` in the plugin's build.
    pub size: u32,
    /// ABI major (also in [`AbiTag`]).
    pub abi_major: u32,
    /// ABI minor.
    pub abi_minor: u32,
    /// 1 when the plugin was built with `panic = "unwind"`. A plugin built
    /// with `panic = "abort"` would take the daemon down on its first panic,
    /// so the host refuses it.
    pub panic_unwind: u32,
    /// Plugin name, unique in a daemon.
    pub name: StrRef,
    /// Plugin version (informational).
    pub version: StrRef,
    /// Version of asyncore-sdk the plugin was built with (informational).
    pub sdk_version: StrRef,
    /// Called once after loading, before anything else.
    pub init: unsafe extern "C" fn(host: *const HostVtable, host_data: *mut c_void) -> i32,
    /// The plugin's own validation; [`status::DECLINED`] refuses the load
    /// with the message passed to `report`.
    pub on_load: unsafe extern "C" fn(ctx: *mut HostCtx) -> i32,
    /// Creates the listening dispatcher for a new listener from its
    /// configuration; writes it to `out` on [`status::OK`].
    pub listen: unsafe extern "C" fn(
        ctx: *mut HostCtx,
        config: *const KeyValue,
        n_config: usize,
        out: *mut DispatcherHandle,
    ) -> i32,
    /// Creates a dispatcher for a channel handed over by an older generation
    /// from the state it exported; writes it to `out` on [`status::OK`].
    /// Null when the plugin does not import state.
    pub import_state: Option<unsafe extern "C" fn(ctx: *mut HostCtx, state: StrRef, out: *mut DispatcherHandle) -> i32>,
    /// (1.2) Like `listen`, for a listener whose older generation's
    /// listening dispatcher exported `state` (a reload or a rollback): the
    /// listener's shared state carries over. Null when the plugin does not
    /// resume state; the host then calls `listen` and says that the state
    /// was left behind.
    pub resume: Option<
        unsafe extern "C" fn(
            ctx: *mut HostCtx,
            config: *const KeyValue,
            n_config: usize,
            state: StrRef,
            out: *mut DispatcherHandle,
        ) -> i32,
    >,
}

// SAFETY: the descriptor is immutable static data (function pointers and
// pointers to static strings); sharing it between threads is sound.
unsafe impl Sync for PluginDescriptor {}
// SAFETY: as above, the vtable holds only function pointers.
unsafe impl Sync for DispatcherVtable {}
// SAFETY: as above.
unsafe impl Sync for HostVtable {}

/// The sizes of the first version's (1.0) tables: every reader needs at
/// least these fields, and reads what came later only where `size` covers
/// it.
pub mod v1_0 {
    use core::mem::offset_of;

    use super::{DispatcherVtable, HostVtable, PluginDescriptor};

    /// `PluginDescriptor` of ABI 1.0 ends before `import_state`.
    pub const PLUGIN_DESCRIPTOR_SIZE: usize = offset_of!(PluginDescriptor, import_state);
    /// `HostVtable` of ABI 1.0 ends before `send_to`.
    pub const HOST_VTABLE_SIZE: usize = offset_of!(HostVtable, send_to);
    /// `DispatcherVtable` of ABI 1.0 ends before `export_state`.
    pub const DISPATCHER_VTABLE_SIZE: usize = offset_of!(DispatcherVtable, export_state);
}

/// Whether a table of `size` bytes (its own `size` field) holds the
/// pointer-sized field at `offset`: every field appended after 1.0 is a
/// function pointer (or an optional one).
///
/// ```
/// use asyncore_abi::{HostVtable, has_field, v1_0};
/// use std::mem::offset_of;
///
/// let old_host = v1_0::HOST_VTABLE_SIZE as u32;
/// assert!(has_field(old_host, offset_of!(HostVtable, connect)));
/// assert!(!has_field(old_host, offset_of!(HostVtable, call_later)));
/// ```
pub const fn has_field(size: u32, offset: usize) -> bool {
    size as usize >= offset + size_of::<*const ()>()
}

/// Reads the `size` that begins every growable table.
///
/// # Safety
///
/// `table` must point to a live table of this ABI (any version): its first
/// field is always its `u32` size.
pub unsafe fn table_size<T>(table: *const T) -> u32 {
    // SAFETY: guaranteed by the caller; `size` is the first field of every
    // growable table, in every version.
    unsafe { table.cast::<u32>().read() }
}

/// Type of the entry function named [`ENTRY_SYMBOL`].
pub type EntryFn = unsafe extern "C" fn() -> *const PluginDescriptor;
