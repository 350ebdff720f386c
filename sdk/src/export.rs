//! The plugin side of the C ABI: the `Plugin` trait, the `export_plugin!`
//! macro and the shims that turn trait calls into panic-proof `extern "C"`
//! functions.
//!
//! Every shim wraps its body in `catch_unwind`. That must happen here, inside
//! the plugin: a panic escaping an `extern "C"` function aborts the process
//! (Rust 1.81 and later), and the host's own `catch_unwind` cannot see a
//! panic of the plugin's copy of std.

use std::{
    any::Any,
    cell::Cell,
    ffi::c_void,
    io,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::OnceLock,
};

use crate::{
    channel::Channel,
    config::Config,
    dispatcher::{CloseReason, Dispatcher},
    ffi::{self, DispatcherHandle, DispatcherVtable, HostCtx, HostVtable, KeyValue, StrRef, status},
};

/// A plugin library: its name, version and how it starts a listener.
///
/// Export it with [`export_plugin!`](crate::export_plugin).
pub trait Plugin: 'static {
    /// Name listeners refer to the plugin by (`asyncorectl listeners start
    /// ADDR NAME`). Unique within a daemon.
    const NAME: &'static str;
    /// Version string shown by `ListPlugins`; usually
    /// `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;

    /// Self-check run once when the library is loaded, before any listener
    /// can use it.
    ///
    /// # Errors
    ///
    /// A message that refuses the load; the daemon reports it and keeps
    /// what was loaded before. The default accepts.
    fn on_load() -> Result<(), String> {
        Ok(())
    }

    /// Creates the listening dispatcher of a new listener. Its
    /// [`Dispatcher::handle_accepted`] creates a dispatcher per connection.
    ///
    /// # Errors
    ///
    /// A message naming the bad configuration entry; the daemon answers the
    /// `StartListener` call with `INVALID_ARGUMENT` and that message.
    fn listen(config: &Config) -> Result<Box<dyn Dispatcher>, String>;

    /// Whether [`import_state`](Plugin::import_state) is implemented: only
    /// then are channels of older generations offered to this one on a
    /// reload.
    const IMPORTS_STATE: bool = false;

    /// Hot reload with state handover: creates the dispatcher of a channel
    /// an older generation handed over, from what its
    /// [`Dispatcher::export_state`] returned. Set
    /// [`IMPORTS_STATE`](Plugin::IMPORTS_STATE) too.
    ///
    /// # Errors
    ///
    /// A message; the channel then stays on its old generation. The default
    /// refuses.
    fn import_state(state: &[u8]) -> Result<Box<dyn Dispatcher>, String> {
        let _ = state;
        Err(format!("plugin {} does not import state", Self::NAME))
    }

    /// Whether [`resume`](Plugin::resume) is implemented: only then does a
    /// listener's shared state carry over to this generation on a reload or
    /// a rollback.
    const RESUMES_STATE: bool = false;

    /// A reload or a rollback with a listener's state: like
    /// [`listen`](Plugin::listen), with the `state` that the older
    /// generation's listening dispatcher returned from
    /// [`Dispatcher::export_state`] (a cache, a chat room, a rate limiter,
    /// serialised however you like). Set
    /// [`RESUMES_STATE`](Plugin::RESUMES_STATE) too.
    ///
    /// Every callback, `listen`, `resume` and `import_state` run on the
    /// daemon's loop thread, one at a time: the channels of one listener
    /// can share its state through an `Rc<RefCell<_>>` that the listening
    /// dispatcher hands to each dispatcher it makes (in
    /// [`Dispatcher::handle_accepted`] and
    /// [`Dispatcher::import_channel`]).
    ///
    /// # Errors
    ///
    /// As for `listen`: the reload is refused and the older generation
    /// stays current. The default ignores the state and calls `listen`.
    fn resume(config: &Config, state: &[u8]) -> Result<Box<dyn Dispatcher>, String> {
        let _ = state;
        Self::listen(config)
    }
}

pub(crate) struct Host {
    /// The host's table. Its fields are read through raw pointers
    /// ([`host!`], [`host_opt!`]): an older host's table is shorter than
    /// this SDK's `HostVtable`, so no reference to the whole struct is made.
    pub(crate) vtable: *const HostVtable,
    /// The table's own `size`, read before any other field.
    pub(crate) size: u32,
    data: *mut c_void,
}

// SAFETY: `vtable` points to the host's immutable static table and `data` is
// an opaque token the host handed us; we only read the one and pass the
// other back.
unsafe impl Send for Host {}
// SAFETY: as above.
unsafe impl Sync for Host {}

static HOST: OnceLock<Host> = OnceLock::new();

/// The host's function table; set by `init` before any other call.
pub(crate) fn host_table() -> &'static Host {
    HOST.get().expect("asyncore-sdk: plugin used before the host called init")
}

/// Whether a host called `init`: not in a plugin's own unit tests.
pub(crate) fn has_host() -> bool {
    HOST.get().is_some()
}

/// Reads a function of the host's table that ABI 1.0 already had: `init`
/// refused hosts whose table is smaller than that.
macro_rules! host {
    ($field:ident) => {{
        let host = $crate::export::host_table();
        // SAFETY: `init` checked that the table holds every 1.0 field; it is
        // static data of the host.
        unsafe { ::core::ptr::addr_of!((*host.vtable).$field).read() }
    }};
}

/// Reads a function appended to the host's table after ABI 1.0, or `None`
/// when the host's table ends before it (a daemon older than this SDK).
macro_rules! host_opt {
    ($field:ident) => {{
        let host = $crate::export::host_table();
        if $crate::ffi::has_field(host.size, ::core::mem::offset_of!($crate::ffi::HostVtable, $field)) {
            // SAFETY: the host's own size says the field is there; the table
            // is static data of the host.
            Some(unsafe { ::core::ptr::addr_of!((*host.vtable).$field).read() })
        } else {
            None
        }
    }};
}

pub(crate) use {host, host_opt};

/// Forwards a log record to the host, if there is one yet.
pub(crate) fn host_log(level: u32, message: &str) {
    if let Some(host) = HOST.get() {
        let log = host!(log);
        // SAFETY: the message is live for the call; the host copies it.
        unsafe { log(host.data, level, StrRef::new(message)) }
    }
}

/// Runs `f` with the host's `host_data`, if the host has called `init`.
pub(crate) fn with_host_data<R>(f: impl FnOnce(*mut c_void) -> R) -> Option<R> {
    HOST.get().map(|host| f(host.data))
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    LAST_PANIC.with(|last| last.take()).unwrap_or_else(|| payload_text(payload))
}

thread_local! {
    /// How many shims on this thread's stack are catching panics now.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
    /// The last panic message this plugin's hook kept for a catch site on
    /// this thread.
    static LAST_PANIC: Cell<Option<String>> = const { Cell::new(None) };
}

/// `catch_unwind`, telling the panic hook that this panic will be caught
/// and reported through the host.
fn catching<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    CATCHING.with(|depth| depth.set(depth.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|depth| depth.set(depth.get() - 1));
    result
}

fn install_panic_hook() {
    // The plugin has its own copy of std and so its own hook. For a panic
    // inside a callback the default would print to stderr without saying
    // which plugin or channel; we keep the message (with its location) for
    // the catch site, which hands it to the host to log with the channel id.
    // Any other panic (a thread of the plugin's own, or a test's assertion
    // when the plugin is linked into a test binary) goes to the hook that
    // was there before.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if CATCHING.with(Cell::get) == 0 {
            return previous(info);
        }
        let message = match info.location() {
            Some(at) => format!("{} at {}:{}", payload_text(info.payload()), at.file(), at.line()),
            None => payload_text(info.payload()),
        };
        LAST_PANIC.with(|last| last.set(Some(message)));
    }));
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Reports a caught panic to the host through `ctx`.
fn report_panic(ctx: *mut HostCtx, payload: &(dyn Any + Send)) {
    report(ctx, &format!("panicked: {}", panic_message(payload)));
}

fn report(ctx: *mut HostCtx, message: &str) {
    let report = host!(report);
    // SAFETY: ctx is the live context of the current call; the host copies
    // the message.
    unsafe { report(ctx, StrRef::new(message)) }
}

/// What the host holds for each dispatcher instance.
struct Slot {
    dispatcher: Box<dyn Dispatcher>,
    poisoned: bool,
}

static DISPATCHER_VTABLE: DispatcherVtable = DispatcherVtable {
    size: size_of::<DispatcherVtable>() as u32,
    interest: dispatcher_interest,
    handle_event: dispatcher_handle_event,
    handle_accepted: dispatcher_handle_accepted,
    drop: dispatcher_drop,
    export_state: dispatcher_export_state,
    import_channel: Some(dispatcher_import_channel),
    describe: Some(dispatcher_describe),
};

/// Moves a dispatcher behind the C ABI; the host frees it through the
/// vtable's `drop`.
pub(crate) fn into_handle(dispatcher: Box<dyn Dispatcher>) -> DispatcherHandle {
    let slot = Box::new(Slot { dispatcher, poisoned: false });
    DispatcherHandle { instance: Box::into_raw(slot).cast::<c_void>(), vtable: &DISPATCHER_VTABLE }
}

/// Runs `f` on a live, unpoisoned slot, catching panics.
///
/// # Safety
///
/// `instance` must come from [`into_handle`] and not be dropped; `ctx` must
/// be the context of the current host call.
unsafe fn with_slot<R>(
    instance: *mut c_void,
    ctx: *mut HostCtx,
    f: impl FnOnce(&mut dyn Dispatcher, &mut Channel<'_>) -> R,
) -> Result<R, ()> {
    // SAFETY: the caller guarantees instance is a live Slot, and the host
    // never calls one instance re-entrantly.
    let slot = unsafe { &mut *instance.cast::<Slot>() };
    if slot.poisoned {
        return Err(());
    }
    // SAFETY: ctx is the live context of this call.
    let mut channel = unsafe { Channel::from_ctx(ctx) };
    match catching(|| f(slot.dispatcher.as_mut(), &mut channel)) {
        Ok(r) => Ok(r),
        Err(payload) => {
            slot.poisoned = true;
            report_panic(ctx, payload.as_ref());
            Err(())
        }
    }
}

unsafe extern "C" fn dispatcher_interest(instance: *mut c_void, ctx: *mut HostCtx) -> u32 {
    // SAFETY: forwarded from the host's contract for vtable calls.
    let answer = unsafe {
        with_slot(instance, ctx, |d, ch| {
            let mut bits = 0;
            if d.readable(ch) {
                bits |= ffi::interest::READABLE;
            }
            if d.writable(ch) {
                bits |= ffi::interest::WRITABLE;
            }
            bits
        })
    };
    answer.unwrap_or(ffi::interest::PANICKED)
}

unsafe extern "C" fn dispatcher_handle_event(instance: *mut c_void, ctx: *mut HostCtx, event: u32, arg: i64) -> i32 {
    // SAFETY: forwarded from the host's contract for vtable calls.
    let done = unsafe {
        with_slot(instance, ctx, |d, ch| match event {
            ffi::event::READ => d.handle_read(ch),
            ffi::event::WRITE => d.handle_write(ch),
            ffi::event::CONNECT => d.handle_connect(ch),
            ffi::event::CLOSE => d.handle_close(ch),
            ffi::event::EXPT => d.handle_expt(ch),
            ffi::event::ERROR => d.handle_error(ch, io::Error::from_raw_os_error(arg as i32)),
            ffi::event::TIMER => d.handle_timer(ch, arg as u64),
            ffi::event::SHUTDOWN => d.handle_shutdown(ch, CloseReason::from_code(arg)),
            // An event this SDK does not know comes from a newer host;
            // ignoring it is what the default handler would do.
            _ => {}
        })
    };
    match done {
        Ok(()) => status::OK,
        Err(()) => status::PANICKED,
    }
}

unsafe extern "C" fn dispatcher_handle_accepted(
    instance: *mut c_void,
    ctx: *mut HostCtx,
    out: *mut DispatcherHandle,
) -> i32 {
    // SAFETY: forwarded from the host's contract for vtable calls.
    let accepted = unsafe { with_slot(instance, ctx, |d, ch| d.handle_accepted(ch)) };
    match accepted {
        Ok(Some(dispatcher)) => {
            // SAFETY: the host passes a valid out pointer.
            unsafe { out.write(into_handle(dispatcher)) };
            status::OK
        }
        Ok(None) => status::DECLINED,
        Err(()) => status::PANICKED,
    }
}

unsafe extern "C" fn dispatcher_import_channel(
    instance: *mut c_void,
    ctx: *mut HostCtx,
    state: StrRef,
    out: *mut DispatcherHandle,
) -> i32 {
    // SAFETY: the host lends the state for the call.
    let state = unsafe { state.as_bytes() };
    // SAFETY: forwarded from the host's contract for vtable calls.
    let imported = unsafe { with_slot(instance, ctx, |d, ch| d.import_channel(ch, state)) };
    match imported {
        Ok(Some(dispatcher)) => {
            // SAFETY: the host passes a valid out pointer.
            unsafe { out.write(into_handle(dispatcher)) };
            status::OK
        }
        Ok(None) => status::DECLINED,
        Err(()) => status::PANICKED,
    }
}

unsafe extern "C" fn dispatcher_describe(instance: *mut c_void, ctx: *mut HostCtx) -> i32 {
    // SAFETY: forwarded from the host's contract for vtable calls.
    let pairs = unsafe { with_slot(instance, ctx, |d, ch| d.describe(ch)) };
    match pairs {
        Ok(pairs) => {
            if let Some(annotate) = host_opt!(annotate) {
                for (key, value) in &pairs {
                    // SAFETY: ctx is live; the host copies both strings.
                    unsafe { annotate(ctx, StrRef::new(key), StrRef::new(value)) };
                }
            }
            status::OK
        }
        Err(()) => status::PANICKED,
    }
}

unsafe extern "C" fn dispatcher_export_state(instance: *mut c_void, ctx: *mut HostCtx) -> i32 {
    // SAFETY: forwarded from the host's contract for vtable calls.
    let state = unsafe { with_slot(instance, ctx, |d, ch| d.export_state(ch)) };
    match state {
        Ok(Some(bytes)) => match host_opt!(hand_over) {
            Some(hand_over) => {
                // SAFETY: ctx is live; the host copies the bytes.
                unsafe { hand_over(ctx, bytes.as_ptr(), bytes.len()) };
                status::OK
            }
            // A host without state handover keeps the channel where it is.
            None => status::DECLINED,
        },
        Ok(None) => status::DECLINED,
        Err(()) => status::PANICKED,
    }
}

unsafe extern "C" fn dispatcher_drop(instance: *mut c_void) {
    // SAFETY: the host drops each instance exactly once.
    let slot = unsafe { Box::from_raw(instance.cast::<Slot>()) };
    // A Drop impl may panic too; it must not unwind into the host. What a
    // poisoned dispatcher holds is leaked rather than dropped, since its
    // invariants may be broken.
    if slot.poisoned {
        std::mem::forget(slot);
    } else {
        let _ = catching(move || drop(slot));
    }
}

/// Builds the descriptor of plugin `P`. Used by [`export_plugin!`](crate::export_plugin).
#[doc(hidden)]
pub const fn descriptor<P: Plugin>() -> ffi::PluginDescriptor {
    ffi::PluginDescriptor {
        size: size_of::<ffi::PluginDescriptor>() as u32,
        abi_major: ffi::ABI_MAJOR,
        abi_minor: ffi::ABI_MINOR,
        panic_unwind: cfg!(panic = "unwind") as u32,
        name: StrRef::new(P::NAME),
        version: StrRef::new(P::VERSION),
        sdk_version: StrRef::new(env!("CARGO_PKG_VERSION")),
        init: plugin_init,
        on_load: plugin_on_load::<P>,
        listen: plugin_listen::<P>,
        import_state: if P::IMPORTS_STATE { Some(plugin_import_state::<P>) } else { None },
        resume: if P::RESUMES_STATE { Some(plugin_resume::<P>) } else { None },
    }
}

unsafe extern "C" fn plugin_resume<P: Plugin>(
    ctx: *mut HostCtx,
    config: *const KeyValue,
    n_config: usize,
    state: StrRef,
    out: *mut DispatcherHandle,
) -> i32 {
    // SAFETY: the host lends n_config entries for the call.
    let config = unsafe { config_of(config, n_config) };
    // SAFETY: the host lends the state for the call.
    let state = unsafe { state.as_bytes() };
    // SAFETY: forwarded from the host's contract for this call.
    unsafe { new_dispatcher(ctx, out, || P::resume(&config, state)) }
}

/// The configuration the host lends to `listen` and `resume`.
///
/// # Safety
///
/// `config` must point to `n_config` entries valid for the call.
unsafe fn config_of(config: *const KeyValue, n_config: usize) -> Config {
    let entries = if n_config == 0 {
        &[][..]
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(config, n_config) }
    };
    Config::from_ffi(entries)
}

unsafe extern "C" fn plugin_import_state<P: Plugin>(
    ctx: *mut HostCtx,
    state: StrRef,
    out: *mut DispatcherHandle,
) -> i32 {
    // SAFETY: the host lends the state for the call.
    let state = unsafe { state.as_bytes() };
    // SAFETY: forwarded from the host's contract for this call.
    unsafe { new_dispatcher(ctx, out, || P::import_state(state)) }
}

/// Runs a plugin function that makes a dispatcher, catching panics: writes
/// the dispatcher to `out`, or reports the refusal or panic through `ctx`.
///
/// # Safety
///
/// `ctx` must be the live context of the call and `out` valid for writes.
unsafe fn new_dispatcher(
    ctx: *mut HostCtx,
    out: *mut DispatcherHandle,
    make: impl FnOnce() -> Result<Box<dyn Dispatcher>, String>,
) -> i32 {
    guarded(ctx, make, |dispatcher| {
        // SAFETY: guaranteed by the caller.
        unsafe { out.write(into_handle(dispatcher)) };
    })
}

/// Runs a fallible plugin function, catching panics: passes its value to
/// `on_ok`, or reports the refusal or the panic through `ctx`. Returns the
/// status code for the host.
fn guarded<T>(ctx: *mut HostCtx, make: impl FnOnce() -> Result<T, String>, on_ok: impl FnOnce(T)) -> i32 {
    match catching(make) {
        Ok(Ok(value)) => {
            on_ok(value);
            status::OK
        }
        Ok(Err(message)) => {
            report(ctx, &message);
            status::DECLINED
        }
        Err(payload) => {
            report_panic(ctx, payload.as_ref());
            status::PANICKED
        }
    }
}

unsafe extern "C" fn plugin_init(vtable: *const HostVtable, data: *mut c_void) -> i32 {
    if vtable.is_null() {
        return status::DECLINED;
    }
    // SAFETY: the host passes a pointer to its static table, which begins
    // with its size in every version.
    let size = unsafe { ffi::table_size(vtable) };
    if (size as usize) < ffi::v1_0::HOST_VTABLE_SIZE {
        return status::DECLINED;
    }
    // SAFETY: a 1.0 table holds `abi_major`.
    let abi_major = unsafe { std::ptr::addr_of!((*vtable).abi_major).read() };
    if abi_major != ffi::ABI_MAJOR {
        return status::DECLINED;
    }
    if HOST.set(Host { vtable, size, data }).is_ok() {
        install_panic_hook();
    }
    status::OK
}

unsafe extern "C" fn plugin_on_load<P: Plugin>(ctx: *mut HostCtx) -> i32 {
    guarded(ctx, P::on_load, |()| {})
}

unsafe extern "C" fn plugin_listen<P: Plugin>(
    ctx: *mut HostCtx,
    config: *const KeyValue,
    n_config: usize,
    out: *mut DispatcherHandle,
) -> i32 {
    // SAFETY: the host lends n_config entries for the call.
    let config = unsafe { config_of(config, n_config) };
    // SAFETY: forwarded from the host's contract for this call.
    unsafe { new_dispatcher(ctx, out, || P::listen(&config)) }
}

/// Exports a [`Plugin`] from a `cdylib` crate: the frozen ABI tag and the
/// versioned entry point the daemon looks for.
///
/// ```text
/// asyncore_sdk::export_plugin!(EchoPlugin);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// ABI tag read by the daemon before anything else.
        #[unsafe(no_mangle)]
        #[allow(non_upper_case_globals)]
        pub static asyncore_plugin_abi: $crate::ffi::AbiTag = $crate::ffi::AbiTag::CURRENT;

        /// Entry point of ABI major 1.
        #[unsafe(no_mangle)]
        pub extern "C" fn asyncore_plugin_v1() -> *const $crate::ffi::PluginDescriptor {
            static DESCRIPTOR: $crate::ffi::PluginDescriptor = $crate::__private::descriptor::<$plugin>();
            &DESCRIPTOR
        }
    };
}
