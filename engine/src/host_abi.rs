//! The plugin boundary: every call into plugin code, every host function a
//! plugin calls back, and the one argument that makes them sound.
//!
//! # The contract
//!
//! Plugin code runs only inside a call made from this module: a
//! [`Dispatcher`] method, [`Entries::listen`] or [`Entries::import_state`]
//! from the poll loop, or `init` and `on_load` from the loader (through
//! [`HOST`]). Each call gets a [`CallCtx`]; the plugin passes it back, as the
//! `*mut HostCtx` argument, to the host functions of [`HOST_VTABLE`], which
//! reach the loop's core through it. That is sound because:
//!
//! 1. **No reference into the core is alive while plugin code runs.** A
//!    context for a channel is made from the loop's `&mut` borrow of its
//!    core ([`CallCtx::new`]) and keeps that borrow, as a raw pointer, for
//!    its lifetime `'core`: as long as the context exists, the borrow
//!    checker lets the loop hold no other reference into the core. What the
//!    loop calls is a copy (a [`Dispatcher`] handle, the [`Entries`]
//!    function pointers), never a reference into its tables. A context made
//!    for no channel ([`CallCtx::detached`]) holds no core at all, and a
//!    dispatcher's `drop`, the one plugin call without a context, cannot
//!    reach the core either.
//! 2. **Host functions make one `&mut` to the core at a time.** Each turns
//!    the pointer back into a reference ([`channel_of`]) for its own
//!    duration only, and none of them calls plugin code with a context:
//!    what a callback asks for that would (a close, another channel's
//!    handler) is only marked, and the loop acts on it once the call
//!    returned. (The one plugin code a host function may run is the `drop`
//!    of a dispatcher handed to it that it refuses.) So host functions never
//!    nest, and a dispatcher is never released during one of its own
//!    callbacks.
//! 3. **Pointers are good for one call.** The context pointer and every
//!    buffer lent either way (a `StrRef`, `recv`'s buffer) are valid only
//!    until the call they were passed to returns; the SDK never keeps them.
//! 4. **Plugin code stays mapped and runs on one thread at a time.** A
//!    library whose code ran is closed only once nothing of it can run
//!    again (see the loader, and `unload_if_unused` in the loop), so function
//!    pointers and static tables read from it stay valid while used, and
//!    so does its `host_data` record ([`shared_of`]); its tables are
//!    read field by field, only the fields their `size` covers. The loader's
//!    thread runs `init` and `on_load`; once the loaded plugin
//!    ([`LoadedPlugin`](crate::loader::LoadedPlugin), which is `Send`) is
//!    handed to the loop, only the poll thread calls the plugin. A
//!    [`Dispatcher`] holds raw pointers, so it is not `Send` and never
//!    leaves the poll thread.
//! 5. **Nothing unwinds across the boundary.** Host functions are
//!    `extern "C"`, where a panic aborts the daemon, so they only do bounded
//!    work and report failures as negative errno values. Plugins catch
//!    their own panics (the SDK's shims) and report them as `PANICKED`; a
//!    dispatcher that panicked is only ever released after that.
//!
//! Every `unsafe extern "C" fn` here is a host function of [`HOST_VTABLE`]:
//! its safety requirements are points 1 to 3 above, for the arguments the
//! ABI (`asyncore_abi::HostVtable`) documents.

use std::{
    collections::BTreeMap,
    ffi::c_void,
    fs::File,
    io,
    marker::PhantomData,
    mem::MaybeUninit,
    net::SocketAddr,
    os::fd::{FromRawFd, OwnedFd},
    ptr::NonNull,
    sync::Arc,
    time::Duration,
};

use asyncore_abi::{self as ffi, DispatcherHandle, HostCtx, HostVtable, KeyValue, StrRef};
use tracing::{debug, error, info, trace, warn};

use crate::{
    command::MetricKind,
    ids::{ChannelId, Slot, TimerId},
    loader::{Entries, Host, OnLoadFn},
    plugin_metrics::{DefineError, PluginShared},
};

/// What the host functions ask of the poll loop about the channel of a
/// call (`slot`) or another one. The loop's core implements it; the host
/// functions reach it only through a live [`CallCtx`]. Nothing here may
/// call plugin code (point 2 of the contract).
pub(crate) trait Services {
    /// Whether `slot` holds a channel.
    fn has_channel(&self, slot: Slot) -> bool;
    fn channel_id(&self, slot: Slot) -> ChannelId;
    /// `send`: queues `data`; returns the bytes accepted (all of them, or 0
    /// once the channel takes no more output).
    fn send(&mut self, slot: Slot, data: &[u8]) -> u64;
    /// `send_to` another channel; `EBADF` unless it takes output.
    fn send_to(&mut self, channel: ChannelId, data: &[u8]) -> Result<u64, Errno>;
    /// `recv` into `buf`: 0 at end of stream.
    fn recv(&mut self, slot: Slot, buf: &mut [MaybeUninit<u8>]) -> Result<u64, Errno>;
    /// `close()`: marks the channel; the loop closes it after the call.
    fn close(&mut self, slot: Slot);
    /// `shutdown_write()`: shut writing down once the output is flushed.
    fn shutdown_write(&mut self, slot: Slot);
    fn pending_output(&self, slot: Slot) -> u64;
    /// Output queued on another channel; `EBADF` unless it takes output.
    fn pending_output_of(&self, channel: ChannelId) -> Result<u64, Errno>;
    fn peer_address(&self, slot: Slot) -> Option<SocketAddr>;
    fn local_address(&self, slot: Slot) -> Option<SocketAddr>;
    /// Re-asks another channel's interest before the next wait.
    fn wake(&mut self, channel: ChannelId) -> Result<(), Errno>;
    /// `call_later`: `handle_timer(token)` after `delay`.
    fn call_later(&mut self, slot: Slot, delay: Duration, token: u64) -> TimerId;
    /// Cancels one of the channel's own `call_later` timers; `ENOENT` if it
    /// has no such pending timer.
    fn cancel_timer(&mut self, slot: Slot, timer: TimerId) -> Result<(), Errno>;
    /// Starts an outbound connection served by `dispatcher`, a channel of
    /// the same listener and generation. On error the dispatcher is still
    /// the caller's.
    fn connect(&mut self, slot: Slot, address: &str, dispatcher: Dispatcher) -> io::Result<ChannelId>;
    /// Serves a descriptor the plugin handed over with `dispatcher`, as
    /// for [`connect`](Services::connect).
    fn attach(&mut self, slot: Slot, file: File, dispatcher: Dispatcher) -> io::Result<ChannelId>;
}

/// A host function's failure, as the C ABI reports it: `-errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Errno(pub(crate) i32);

impl Errno {
    pub(crate) const EBADF: Errno = Errno(libc::EBADF);
    pub(crate) const EINVAL: Errno = Errno(libc::EINVAL);
    pub(crate) const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub(crate) const ENOENT: Errno = Errno(libc::ENOENT);
    pub(crate) const ENOTCONN: Errno = Errno(libc::ENOTCONN);

    /// The errno of an I/O error; `EIO` for one that has none.
    pub(crate) fn of(error: &io::Error) -> Errno {
        Errno(error.raw_os_error().unwrap_or(libc::EIO))
    }

    fn negative(self) -> i64 {
        -i64::from(self.0)
    }
}

/// The C form of a result: the value, or `-errno`.
fn c_result(result: Result<u64, Errno>) -> i64 {
    match result {
        Ok(value) => value as i64,
        Err(errno) => errno.negative(),
    }
}

/// The context of one call into a plugin: the loop's core and the channel
/// the call is about (none for a detached call), and what the plugin
/// reported. Plugins get a pointer to it and pass it back to the host
/// functions. See the module's contract, point 1, for the borrow it holds.
pub(crate) struct CallCtx<'core> {
    services: Option<NonNull<dyn Services + 'core>>,
    slot: Option<Slot>,
    report: Option<String>,
    /// State handed over by `export_state`.
    state: Option<Vec<u8>>,
    /// Pairs given by `describe`.
    annotations: Vec<(String, String)>,
    /// The context holds the core's unique borrow for as long as it lives.
    _core: PhantomData<&'core mut (dyn Services + 'core)>,
}

impl<'core> CallCtx<'core> {
    /// A context for a call about the channel at `slot`, holding the core's
    /// borrow until it is dropped.
    pub(crate) fn new(core: &'core mut (dyn Services + 'core), slot: Slot) -> CallCtx<'core> {
        CallCtx {
            services: Some(NonNull::from(core)),
            slot: Some(slot),
            report: None,
            state: None,
            annotations: Vec::new(),
            _core: PhantomData,
        }
    }

    /// A context for a call that concerns no channel (`on_load`, `listen`,
    /// `import_state`): the plugin may only report through it.
    pub(crate) fn detached() -> CallCtx<'static> {
        CallCtx { services: None, slot: None, report: None, state: None, annotations: Vec::new(), _core: PhantomData }
    }

    fn as_ffi(&mut self) -> *mut HostCtx {
        (self as *mut CallCtx<'core>).cast()
    }

    /// What the plugin passed to `report` (a panic message, a refusal).
    pub(crate) fn take_report(&mut self) -> Option<String> {
        self.report.take()
    }

    fn take_state(&mut self) -> Option<Vec<u8>> {
        self.state.take()
    }

    fn refusal(&mut self) -> String {
        self.take_report().unwrap_or_else(|| "refused without a message".to_string())
    }
}

/// The context behind the pointer a plugin passed back.
///
/// # Safety
///
/// `ctx` must be a pointer made by `CallCtx::as_ffi` for a call that is
/// still running (the contract, point 3).
unsafe fn context<'a>(ctx: *mut HostCtx) -> &'a mut CallCtx<'a> {
    // SAFETY: guaranteed by the caller.
    unsafe { &mut *ctx.cast::<CallCtx<'a>>() }
}

/// The core and slot of the channel a call is about, if any.
///
/// # Safety
///
/// As for [`context`]; the reference must be gone when the host function
/// returns (the contract, point 2).
unsafe fn channel_of<'a>(ctx: *mut HostCtx) -> Option<(&'a mut dyn Services, Slot)> {
    // SAFETY: guaranteed by the caller.
    let ctx = unsafe { context(ctx) };
    let (services, slot) = (ctx.services?, ctx.slot?);
    // SAFETY: the loop made the pointer from its `&mut` core, whose borrow
    // the context holds (point 1); no other reference to it exists while
    // this host function runs (point 2).
    let core = unsafe { &mut *services.as_ptr() };
    core.has_channel(slot).then_some((core, slot))
}

/// What the loader gives every plugin of this engine: the host table for
/// `init`, a record of its own for each load as its `host_data`, and a
/// detached context for `on_load`.
pub(crate) static HOST: Host = Host { vtable: &HOST_VTABLE, host_data: host_data_for, on_load: run_on_load };

/// The host of plugins linked into the process (the testing crate): as
/// [`HOST`], but every load of one plugin shares one record, never freed.
/// Such plugins share the process's one copy of the SDK, which keeps the
/// `host_data` of its first `init` for as long as the process runs: a
/// second load with its own record would count its metrics in the first's,
/// and a record freed with its load would leave the SDK a dangling pointer.
pub(crate) static IN_PROCESS_HOST: Host =
    Host { vtable: &HOST_VTABLE, host_data: interned_host_data, on_load: run_on_load };

/// One [`PluginShared`] per plugin name in this process. The table keeps a
/// reference to each, so none is ever freed.
fn interned_host_data(name: &str) -> Arc<PluginShared> {
    static BY_NAME: std::sync::Mutex<BTreeMap<String, Arc<PluginShared>>> = std::sync::Mutex::new(BTreeMap::new());
    let mut by_name = BY_NAME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    by_name.entry(name.to_owned()).or_insert_with(|| PluginShared::new(name)).clone()
}

/// `init`'s `host_data` for one load of the plugin `name`: a fresh
/// [`PluginShared`], which `log` and the metric functions get back
/// ([`shared_of`]). The load's [`LoadedPlugin`](crate::loader::LoadedPlugin)
/// owns it and frees it only once its library was unmapped.
fn host_data_for(name: &str) -> Arc<PluginShared> {
    PluginShared::new(name)
}

/// The record behind a `host_data`.
///
/// # Safety
///
/// `host_data` must be null or what the loader gave the calling plugin's
/// `init` (the record of [`host_data_for`] or [`interned_host_data`]), and
/// the caller must be that plugin's code.
unsafe fn shared_of<'a>(host_data: *mut c_void) -> Option<&'a PluginShared> {
    // SAFETY: guaranteed by the caller: null, or the record of a plugin
    // whose code is running, so whose library is mapped. A record lives at
    // least as long as its library is mapped: the interned ones for ever,
    // the others until their `LoadedPlugin` is dropped after `release_image`
    // unmapped the library (one that stays mapped, or was never closed,
    // leaks its record; see `LoadedPlugin`'s `Drop`). Only shared
    // references to it are ever made.
    unsafe { host_data.cast::<PluginShared>().as_ref() }
}

/// Runs a plugin's `on_load` with a detached context.
///
/// # Safety
///
/// `on_load` must be the `on_load` of a descriptor the loader checked,
/// whose `init` succeeded.
unsafe fn run_on_load(on_load: OnLoadFn) -> Result<(), String> {
    let mut ctx = CallCtx::detached();
    // SAFETY: guaranteed by the caller; ctx lives across the call.
    let status = unsafe { on_load(ctx.as_ffi()) };
    if status == ffi::status::OK { Ok(()) } else { Err(ctx.refusal()) }
}

impl Entries {
    /// Asks the plugin for the listening dispatcher of a new listener.
    ///
    /// On refusal or panic, returns the plugin's message.
    pub(crate) fn listen(self, ctx: &mut CallCtx<'_>, config: &BTreeMap<String, String>) -> Result<Dispatcher, String> {
        let entries: Vec<KeyValue> =
            config.iter().map(|(k, v)| KeyValue { key: StrRef::new(k), value: StrRef::new(v) }).collect();
        let mut out = DispatcherHandle { instance: std::ptr::null_mut(), vtable: std::ptr::null() };
        // SAFETY: listen is code of a library that stays mapped; entries
        // and out live across the call.
        let status = unsafe { (self.listen)(ctx.as_ffi(), entries.as_ptr(), entries.len(), &mut out) };
        match Dispatcher::adopt(out) {
            Some(dispatcher) if status == ffi::status::OK => Ok(dispatcher),
            _ => Err(ctx.refusal()),
        }
    }

    /// Asks the plugin for the listening dispatcher of a listener whose
    /// older generation exported `state` (a reload or a rollback). `None`
    /// when this generation does not resume state: the caller then uses
    /// [`listen`](Entries::listen).
    pub(crate) fn resume(
        self,
        ctx: &mut CallCtx<'_>,
        config: &BTreeMap<String, String>,
        state: &[u8],
    ) -> Option<Result<Dispatcher, String>> {
        let resume = self.resume?;
        let entries: Vec<KeyValue> =
            config.iter().map(|(k, v)| KeyValue { key: StrRef::new(k), value: StrRef::new(v) }).collect();
        let mut out = DispatcherHandle { instance: std::ptr::null_mut(), vtable: std::ptr::null() };
        let bytes = StrRef { ptr: state.as_ptr(), len: state.len() };
        // SAFETY: as for listen; the state and out live across the call.
        let status = unsafe { resume(ctx.as_ffi(), entries.as_ptr(), entries.len(), bytes, &mut out) };
        Some(match Dispatcher::adopt(out) {
            Some(dispatcher) if status == ffi::status::OK => Ok(dispatcher),
            _ => Err(ctx.refusal()),
        })
    }

    /// Whether this generation takes channels handed over by older ones
    /// through its descriptor's `import_state`.
    pub(crate) fn imports_state(self) -> bool {
        self.import_state.is_some()
    }

    /// Creates a dispatcher from state an older generation exported.
    pub(crate) fn import_state(self, ctx: &mut CallCtx<'_>, state: &[u8]) -> Result<Dispatcher, String> {
        let Some(import) = self.import_state else {
            return Err("this generation does not import state".to_string());
        };
        let mut out = DispatcherHandle { instance: std::ptr::null_mut(), vtable: std::ptr::null() };
        let bytes = StrRef { ptr: state.as_ptr(), len: state.len() };
        // SAFETY: as for listen; the state and out live across the call.
        let status = unsafe { import(ctx.as_ffi(), bytes, &mut out) };
        match Dispatcher::adopt(out) {
            Some(dispatcher) if status == ffi::status::OK => Ok(dispatcher),
            _ => Err(ctx.refusal()),
        }
    }
}

/// A dispatcher instance living in a plugin. A copyable handle: the channel
/// table holds the one that owns it and calls [`Dispatcher::release`] once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dispatcher {
    handle: DispatcherHandle,
    /// The vtable's own `size`, read once when the handle was taken.
    vtable_size: u32,
}

/// A plugin callback panicked; its message was reported through the call's
/// context.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Panicked;

/// Reads a function of a dispatcher's vtable that ABI 1.0 already had
/// ([`Dispatcher::adopt`] refused smaller tables).
macro_rules! vtable_fn {
    ($dispatcher:expr, $field:ident) => {
        // SAFETY: adopt checked the table covers every 1.0 field; vtables
        // are static data of a library that stays mapped.
        unsafe { std::ptr::addr_of!((*$dispatcher.handle.vtable).$field).read() }
    };
}

impl Dispatcher {
    /// Takes ownership of a handle a plugin passed to the host, after
    /// checking it: `None` for a null instance or vtable, or a vtable
    /// smaller than ABI 1.0's (which cannot even be dropped safely, so it
    /// is leaked).
    pub(crate) fn adopt(handle: DispatcherHandle) -> Option<Dispatcher> {
        if handle.instance.is_null() || handle.vtable.is_null() {
            return None;
        }
        // SAFETY: a non-null vtable of a dispatcher handle is a static
        // table that begins with its size.
        let vtable_size = unsafe { ffi::table_size(handle.vtable) };
        if (vtable_size as usize) < ffi::v1_0::DISPATCHER_VTABLE_SIZE {
            return None;
        }
        Some(Dispatcher { handle, vtable_size })
    }

    /// `readable()` and `writable()`.
    pub(crate) fn interest(self, ctx: &mut CallCtx<'_>) -> Result<(bool, bool), Panicked> {
        let interest = vtable_fn!(self, interest);
        // SAFETY: the instance is live until release; ctx lives across the call.
        let bits = unsafe { interest(self.handle.instance, ctx.as_ffi()) };
        if bits & ffi::interest::PANICKED != 0 {
            return Err(Panicked);
        }
        Ok((bits & ffi::interest::READABLE != 0, bits & ffi::interest::WRITABLE != 0))
    }

    /// Calls the `handle_*` method for `event`.
    pub(crate) fn handle_event(self, ctx: &mut CallCtx<'_>, event: u32, arg: i64) -> Result<(), Panicked> {
        let handle_event = vtable_fn!(self, handle_event);
        // SAFETY: as for interest.
        let status = unsafe { handle_event(self.handle.instance, ctx.as_ffi(), event, arg) };
        if status == ffi::status::PANICKED { Err(Panicked) } else { Ok(()) }
    }

    /// Calls `handle_accepted`; `ctx` is the new channel.
    pub(crate) fn handle_accepted(self, ctx: &mut CallCtx<'_>) -> Result<Option<Dispatcher>, Panicked> {
        let handle_accepted = vtable_fn!(self, handle_accepted);
        let mut out = DispatcherHandle { instance: std::ptr::null_mut(), vtable: std::ptr::null() };
        // SAFETY: as for interest; out lives across the call.
        let status = unsafe { handle_accepted(self.handle.instance, ctx.as_ffi(), &mut out) };
        match status {
            ffi::status::OK => Ok(Dispatcher::adopt(out)),
            ffi::status::PANICKED => Err(Panicked),
            _ => Ok(None),
        }
    }

    /// Asks the dispatcher for state to hand over to a newer generation;
    /// `None` when it declines or its vtable (ABI 1.0) has no
    /// `export_state`.
    pub(crate) fn export_state(self, ctx: &mut CallCtx<'_>) -> Result<Option<Vec<u8>>, Panicked> {
        if !ffi::has_field(self.vtable_size, std::mem::offset_of!(ffi::DispatcherVtable, export_state)) {
            return Ok(None);
        }
        let export_state = vtable_fn!(self, export_state);
        // SAFETY: as for interest.
        let status = unsafe { export_state(self.handle.instance, ctx.as_ffi()) };
        match status {
            ffi::status::OK => Ok(ctx.take_state()),
            ffi::status::PANICKED => Err(Panicked),
            _ => Ok(None),
        }
    }

    /// Asks a listening dispatcher to adopt a channel an older generation
    /// handed over with `state`; `ctx` is that channel. `Ok(None)` when it
    /// declines or its vtable (before ABI 1.2) has no `import_channel`.
    pub(crate) fn import_channel(self, ctx: &mut CallCtx<'_>, state: &[u8]) -> Result<Option<Dispatcher>, Panicked> {
        if !ffi::has_field(self.vtable_size, std::mem::offset_of!(ffi::DispatcherVtable, import_channel)) {
            return Ok(None);
        }
        // SAFETY: adopt read the vtable's size; the field is within it.
        let Some(import_channel) = (unsafe { std::ptr::addr_of!((*self.handle.vtable).import_channel).read() }) else {
            return Ok(None);
        };
        let mut out = DispatcherHandle { instance: std::ptr::null_mut(), vtable: std::ptr::null() };
        let bytes = StrRef { ptr: state.as_ptr(), len: state.len() };
        // SAFETY: as for interest; the state and out live across the call.
        let status = unsafe { import_channel(self.handle.instance, ctx.as_ffi(), bytes, &mut out) };
        match status {
            ffi::status::OK => Ok(Dispatcher::adopt(out)),
            ffi::status::PANICKED => Err(Panicked),
            _ => Ok(None),
        }
    }

    /// Asks the dispatcher to describe itself: the pairs it gave, or none
    /// before ABI 1.3.
    pub(crate) fn describe(self, ctx: &mut CallCtx<'_>) -> Result<Vec<(String, String)>, Panicked> {
        if !ffi::has_field(self.vtable_size, std::mem::offset_of!(ffi::DispatcherVtable, describe)) {
            return Ok(Vec::new());
        }
        // SAFETY: adopt read the vtable's size; the field is within it.
        let Some(describe) = (unsafe { std::ptr::addr_of!((*self.handle.vtable).describe).read() }) else {
            return Ok(Vec::new());
        };
        // SAFETY: as for interest.
        let status = unsafe { describe(self.handle.instance, ctx.as_ffi()) };
        if status == ffi::status::PANICKED {
            return Err(Panicked);
        }
        Ok(std::mem::take(&mut ctx.annotations))
    }

    /// Frees the instance. Called exactly once, never during one of its own
    /// callbacks.
    pub(crate) fn release(self) {
        let drop = vtable_fn!(self, drop);
        // SAFETY: the channel table releases each handle once, between
        // callbacks (the contract, point 2).
        unsafe { drop(self.handle.instance) }
    }
}

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
    metric_define: host_metric_define,
    metric_add: host_metric_add,
    metric_set: host_metric_set,
    annotate: host_annotate,
};

/// `metric_define`: the metric's id, or `-EINVAL` (a bad name, or a name
/// defined before as another kind), `-ENOSPC` (too many metrics).
///
/// Safety: `host_data` is what the loader gave the calling plugin's `init`
/// ([`shared_of`]); the strings are lent for the call.
unsafe extern "C" fn host_metric_define(host_data: *mut c_void, kind: u32, name: StrRef, help: StrRef) -> i64 {
    // SAFETY: as documented above.
    let Some(shared) = (unsafe { shared_of(host_data) }) else { return Errno::EBADF.negative() };
    let kind = match kind {
        ffi::metric_kind::COUNTER => MetricKind::Counter,
        ffi::metric_kind::GAUGE => MetricKind::Gauge,
        _ => return -i64::from(libc::EINVAL),
    };
    // SAFETY: lent for the call.
    let (name, help) = unsafe { (name.to_string_lossy(), help.to_string_lossy()) };
    match shared.define(kind, &name, &help) {
        Ok(id) => id as i64,
        Err(DefineError::Invalid) => -i64::from(libc::EINVAL),
        Err(DefineError::Full) => -i64::from(libc::ENOSPC),
    }
}

/// `metric_add`. Safety: as for [`host_metric_define`].
unsafe extern "C" fn host_metric_add(host_data: *mut c_void, id: u64, delta: i64) {
    // SAFETY: as documented on host_metric_define.
    if let Some(shared) = unsafe { shared_of(host_data) } {
        shared.add(id, delta);
    }
}

/// `metric_set`. Safety: as for [`host_metric_define`].
unsafe extern "C" fn host_metric_set(host_data: *mut c_void, id: u64, value: i64) {
    // SAFETY: as documented on host_metric_define.
    if let Some(shared) = unsafe { shared_of(host_data) } {
        shared.set(id, value);
    }
}

/// `log`: re-emits a plugin's log record with its name.
///
/// Safety: the module's contract; `host_data` is what the loader gave the
/// calling plugin's `init` ([`shared_of`]).
unsafe extern "C" fn host_log(host_data: *mut c_void, level: u32, message: StrRef) {
    // SAFETY: host_data is the calling plugin's (see shared_of); the message
    // is lent for this call.
    let (plugin, message) =
        unsafe { (shared_of(host_data).map_or("?", |shared| &*shared.name), message.to_string_lossy()) };
    match level {
        ffi::level::ERROR => error!(target: "asyncored::plugin", plugin = %plugin, "{message}"),
        ffi::level::WARN => warn!(target: "asyncored::plugin", plugin = %plugin, "{message}"),
        ffi::level::INFO => info!(target: "asyncored::plugin", plugin = %plugin, "{message}"),
        ffi::level::DEBUG => debug!(target: "asyncored::plugin", plugin = %plugin, "{message}"),
        _ => trace!(target: "asyncored::plugin", plugin = %plugin, "{message}"),
    }
}

/// `report`: the message of a refusal or a panic.
///
/// Safety: the module's contract.
unsafe extern "C" fn host_report(ctx: *mut HostCtx, message: StrRef) {
    // SAFETY: ctx is a live call context; the message is lent for this call.
    unsafe { context(ctx).report = Some(message.to_string_lossy()) };
}

/// `annotate`: one pair of a `describe` call's answer.
///
/// Safety: the module's contract; the strings are lent for the call.
unsafe extern "C" fn host_annotate(ctx: *mut HostCtx, key: StrRef, value: StrRef) {
    // SAFETY: ctx is a live call context; the strings are lent for the call.
    unsafe {
        let ctx = context(ctx);
        if ctx.annotations.len() < 32 {
            ctx.annotations.push((key.to_string_lossy(), value.to_string_lossy()));
        }
    }
}

/// `hand_over`: the state `export_state` hands to the next generation.
///
/// Safety: the module's contract.
unsafe extern "C" fn host_hand_over(ctx: *mut HostCtx, state: *const u8, len: usize) {
    // SAFETY: ctx is a live call context; the plugin lends len bytes.
    unsafe { context(ctx).state = Some(StrRef { ptr: state, len }.as_bytes().to_vec()) };
}

/// `channel_id`: 0 outside a channel's call.
///
/// Safety: the module's contract.
unsafe extern "C" fn host_channel_id(ctx: *mut HostCtx) -> u64 {
    // SAFETY: ctx is a live call context.
    match unsafe { channel_of(ctx) } {
        Some((core, slot)) => core.channel_id(slot).0,
        None => 0,
    }
}

/// `send`.
///
/// Safety: the module's contract.
unsafe extern "C" fn host_send(ctx: *mut HostCtx, data: *const u8, len: usize) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return Errno::EBADF.negative() };
    // SAFETY: the plugin lends len bytes for this call.
    let data = unsafe { StrRef { ptr: data, len }.as_bytes() };
    core.send(slot, data) as i64
}

/// `send_to`.
///
/// Safety: the module's contract.
unsafe extern "C" fn host_send_to(ctx: *mut HostCtx, channel_id: u64, data: *const u8, len: usize) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, _)) = (unsafe { channel_of(ctx) }) else { return Errno::EBADF.negative() };
    // SAFETY: the plugin lends len bytes for this call.
    let data = unsafe { StrRef { ptr: data, len }.as_bytes() };
    c_result(core.send_to(ChannelId(channel_id), data))
}

/// `pending_output_of`.
///
/// Safety: the module's contract.
unsafe extern "C" fn host_pending_output_of(ctx: *mut HostCtx, channel_id: u64) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, _)) = (unsafe { channel_of(ctx) }) else { return Errno::EBADF.negative() };
    c_result(core.pending_output_of(ChannelId(channel_id)))
}

/// `wake`.
///
/// Safety: the module's contract.
unsafe extern "C" fn host_wake(ctx: *mut HostCtx, channel_id: u64) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, _)) = (unsafe { channel_of(ctx) }) else { return Errno::EBADF.negative() };
    c_result(core.wake(ChannelId(channel_id)).map(|()| 0))
}

/// `call_later`: the delay is capped at `u32::MAX` milliseconds (49 days).
///
/// Safety: the module's contract.
unsafe extern "C" fn host_call_later(ctx: *mut HostCtx, delay_ms: u64, token: u64) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return Errno::EBADF.negative() };
    let delay = Duration::from_millis(delay_ms.min(u64::from(u32::MAX)));
    core.call_later(slot, delay, token).0 as i64
}

/// `cancel_timer`.
///
/// Safety: the module's contract.
unsafe extern "C" fn host_cancel_timer(ctx: *mut HostCtx, timer_id: u64) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return Errno::EBADF.negative() };
    c_result(core.cancel_timer(slot, TimerId(timer_id)).map(|()| 0))
}

/// `shutdown_write`.
///
/// Safety: the module's contract.
unsafe extern "C" fn host_shutdown_write(ctx: *mut HostCtx) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return Errno::EBADF.negative() };
    core.shutdown_write(slot);
    0
}

/// `attach_fd`: takes ownership of `fd` (closed on any failure) and of
/// the dispatcher (released on any failure).
///
/// Safety: the module's contract; `fd`, when not negative, is an open
/// descriptor the plugin gives up.
unsafe extern "C" fn host_attach_fd(ctx: *mut HostCtx, fd: i32, handle: ffi::DispatcherHandle) -> i64 {
    let Some(dispatcher) = Dispatcher::adopt(handle) else {
        if fd >= 0 {
            // SAFETY: the plugin passed ownership of an open descriptor.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        return Errno::EINVAL.negative();
    };
    if fd < 0 {
        dispatcher.release();
        return Errno::EBADF.negative();
    }
    // SAFETY: the plugin passed ownership of an open descriptor.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else {
        dispatcher.release();
        return Errno::EBADF.negative();
    };
    match core.attach(slot, file, dispatcher) {
        Ok(id) => id.0 as i64,
        Err(e) => {
            dispatcher.release();
            Errno::of(&e).negative()
        }
    }
}

/// `recv`.
///
/// Safety: the module's contract; `buf` is writable for `cap` bytes.
unsafe extern "C" fn host_recv(ctx: *mut HostCtx, buf: *mut u8, cap: usize) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return Errno::EBADF.negative() };
    let buf: &mut [MaybeUninit<u8>] = if cap == 0 || buf.is_null() {
        &mut []
    } else {
        // SAFETY: the plugin lends a writable buffer of cap bytes for this
        // call; it may be uninitialised, which MaybeUninit allows.
        unsafe { std::slice::from_raw_parts_mut(buf.cast::<MaybeUninit<u8>>(), cap) }
    };
    c_result(core.recv(slot, buf))
}

/// `close`.
///
/// Safety: the module's contract.
unsafe extern "C" fn host_close(ctx: *mut HostCtx) -> i32 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return -Errno::EBADF.0 };
    core.close(slot);
    0
}

/// `pending_output`: 0 outside a channel's call.
///
/// Safety: the module's contract.
unsafe extern "C" fn host_pending_output(ctx: *mut HostCtx) -> u64 {
    // SAFETY: ctx is a live call context.
    match unsafe { channel_of(ctx) } {
        Some((core, slot)) => core.pending_output(slot),
        None => 0,
    }
}

/// `address`: writes up to `cap` bytes of the address's text to `buf` and
/// returns its full length.
///
/// Safety: the module's contract; `buf` is writable for `cap` bytes (or
/// null).
unsafe extern "C" fn host_address(ctx: *mut HostCtx, which: u32, buf: *mut u8, cap: usize) -> i64 {
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else { return Errno::EBADF.negative() };
    let address = match which {
        ffi::address::PEER => core.peer_address(slot),
        ffi::address::LOCAL => core.local_address(slot),
        _ => return Errno::EINVAL.negative(),
    };
    let Some(address) = address else { return Errno::ENOTCONN.negative() };
    let text = address.to_string();
    let n = text.len().min(cap);
    if n > 0 && !buf.is_null() {
        // SAFETY: the plugin lends a writable buffer of cap bytes.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf, n) };
    }
    text.len() as i64
}

/// `connect`: takes ownership of the dispatcher (released on any failure).
///
/// Safety: the module's contract.
unsafe extern "C" fn host_connect(ctx: *mut HostCtx, address: StrRef, handle: ffi::DispatcherHandle) -> i64 {
    let Some(dispatcher) = Dispatcher::adopt(handle) else { return Errno::EINVAL.negative() };
    // SAFETY: ctx is a live call context.
    let Some((core, slot)) = (unsafe { channel_of(ctx) }) else {
        dispatcher.release();
        return Errno::EBADF.negative();
    };
    // SAFETY: the address is lent for this call.
    let address = unsafe { address.to_string_lossy() };
    match core.connect(slot, &address, dispatcher) {
        Ok(id) => id.0 as i64,
        Err(e) => {
            dispatcher.release();
            Errno::of(&e).negative()
        }
    }
}
