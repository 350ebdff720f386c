//! A plugin written straight against the C ABI, for the engine's own tests
//! (the engine depends on the ABI crate, never on the SDK). Its listener
//! accepts every connection; a connection reads and drops what it gets
//! (but sends back a read that begins with `!`), re-arms an hour-long
//! `call_later` on every read (cancelling the one before, as an idle
//! timeout in a plugin does), and closes when its peer does.
//!
//! Every `unsafe extern "C" fn` here is an entry of the plugin side of the
//! ABI: the host calls it as `asyncore_abi` documents, with a context (and
//! an instance) valid for that call only.

use std::{
    ffi::c_void,
    sync::atomic::{AtomicPtr, Ordering},
};

use asyncore_abi::{
    self as ffi, DispatcherHandle, DispatcherVtable, HostCtx, HostVtable, KeyValue, PluginDescriptor, StrRef,
};

/// What `plugin_host::in_process` takes.
pub(crate) static DESCRIPTOR: PluginDescriptor = PluginDescriptor {
    size: size_of::<PluginDescriptor>() as u32,
    abi_major: ffi::ABI_MAJOR,
    abi_minor: ffi::ABI_MINOR,
    panic_unwind: 1,
    name: StrRef::new("reader"),
    version: StrRef::new("0.1.0"),
    sdk_version: StrRef::new("none"),
    init,
    on_load,
    listen,
    import_state: None,
    resume: None,
};

/// The host's table, from `init`.
static HOST: AtomicPtr<HostVtable> = AtomicPtr::new(std::ptr::null_mut());

fn host() -> &'static HostVtable {
    // SAFETY: init stored the host's static table before the host made any
    // other call.
    unsafe { &*HOST.load(Ordering::Acquire) }
}

static LISTENING: DispatcherVtable = DispatcherVtable {
    size: size_of::<DispatcherVtable>() as u32,
    interest: readable,
    handle_event: listening_event,
    handle_accepted: accept,
    drop: drop_listening,
    export_state: decline_export,
    import_channel: None,
    describe: None,
};

static CONNECTION: DispatcherVtable = DispatcherVtable {
    size: size_of::<DispatcherVtable>() as u32,
    interest: readable,
    handle_event: connection_event,
    handle_accepted: decline_accept,
    drop: drop_connection,
    export_state: decline_export,
    import_channel: None,
    describe: None,
};

/// The listening dispatcher has no state: its instance is this byte.
static LISTENING_INSTANCE: u8 = 0;

/// A connection's state: the pending timer it re-arms.
struct Connection {
    timer: Option<u64>,
}

/// Safety: the ABI's, as the module docs say.
unsafe extern "C" fn init(host: *const HostVtable, _host_data: *mut c_void) -> i32 {
    HOST.store(host.cast_mut(), Ordering::Release);
    ffi::status::OK
}

/// Safety: the ABI's, as the module docs say.
unsafe extern "C" fn on_load(_ctx: *mut HostCtx) -> i32 {
    ffi::status::OK
}

/// Safety: the ABI's, as the module docs say.
unsafe extern "C" fn listen(
    _ctx: *mut HostCtx,
    _config: *const KeyValue,
    _n_config: usize,
    out: *mut DispatcherHandle,
) -> i32 {
    let instance = (&raw const LISTENING_INSTANCE).cast_mut().cast();
    // SAFETY: the host lends `out` for this call.
    unsafe { out.write(DispatcherHandle { instance, vtable: &LISTENING }) };
    ffi::status::OK
}

/// Safety: the ABI's, as the module docs say.
unsafe extern "C" fn readable(_instance: *mut c_void, _ctx: *mut HostCtx) -> u32 {
    ffi::interest::READABLE
}

/// Safety: the ABI's, as the module docs say.
unsafe extern "C" fn listening_event(_instance: *mut c_void, _ctx: *mut HostCtx, _event: u32, _arg: i64) -> i32 {
    ffi::status::OK
}

/// Safety: the ABI's, as the module docs say.
unsafe extern "C" fn accept(_instance: *mut c_void, _ctx: *mut HostCtx, out: *mut DispatcherHandle) -> i32 {
    let instance = Box::into_raw(Box::new(Connection { timer: None })).cast();
    // SAFETY: the host lends `out` for this call.
    unsafe { out.write(DispatcherHandle { instance, vtable: &CONNECTION }) };
    ffi::status::OK
}

/// Safety: the ABI's, as the module docs say.
unsafe extern "C" fn decline_accept(_instance: *mut c_void, _ctx: *mut HostCtx, _out: *mut DispatcherHandle) -> i32 {
    ffi::status::DECLINED
}

/// Safety: the ABI's, as the module docs say.
unsafe extern "C" fn decline_export(_instance: *mut c_void, _ctx: *mut HostCtx) -> i32 {
    ffi::status::DECLINED
}

/// Safety: the ABI's, as the module docs say.
unsafe extern "C" fn drop_listening(_instance: *mut c_void) {}

/// Safety: the ABI's, as the module docs say.
unsafe extern "C" fn connection_event(instance: *mut c_void, ctx: *mut HostCtx, event: u32, _arg: i64) -> i32 {
    let host = host();
    match event {
        ffi::event::READ => {
            let mut buf = [0u8; 4096];
            // SAFETY: ctx is the call's; buf is ours for the call.
            let n = unsafe { (host.recv)(ctx, buf.as_mut_ptr(), buf.len()) };
            if n > 0 && buf[0] == b'!' {
                // SAFETY: ctx is the call's; the bytes are ours for the call.
                unsafe { (host.send)(ctx, buf.as_ptr(), n as usize) };
            }
            if n > 0 {
                // SAFETY: the instance is the Connection accept made, live
                // until drop_connection.
                let connection = unsafe { &mut *instance.cast::<Connection>() };
                if let Some(timer) = connection.timer {
                    // SAFETY: ctx is the call's.
                    unsafe { (host.cancel_timer)(ctx, timer) };
                }
                // SAFETY: ctx is the call's.
                let timer = unsafe { (host.call_later)(ctx, 3_600_000, 0) };
                connection.timer = u64::try_from(timer).ok();
            }
        }
        ffi::event::CLOSE => {
            // SAFETY: ctx is the call's.
            unsafe { (host.close)(ctx) };
        }
        _ => {}
    }
    ffi::status::OK
}

/// Safety: the ABI's, as the module docs say.
unsafe extern "C" fn drop_connection(instance: *mut c_void) {
    // SAFETY: the instance is the Connection accept made; the host drops it
    // once.
    drop(unsafe { Box::from_raw(instance.cast::<Connection>()) });
}
