//! Loading plugin libraries and calling into them.
//!
//! This module owns every `unsafe` call into plugin code. Loading happens off
//! the poll thread (copying and `dlopen` can take milliseconds); the loaded
//! plugin is then handed to the loop, which alone calls its dispatchers.
//!
//! What stays mapped: a library whose code has run is never `dlclose`d. A
//! Rust cdylib that touched a `thread_local!` with a destructor on the
//! long-lived poll thread cannot be unloaded safely (rust-lang/rust#59629,
//! #52138), so its image stays mapped for the life of the process.

use std::{
    collections::BTreeMap,
    ffi::c_void,
    fmt, io,
    mem::ManuallyDrop,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use asyncore_abi::{self as ffi, AbiTag, DispatcherHandle, HostCtx, KeyValue, PluginDescriptor, StrRef};

use sha2::{Digest, Sha256};

use crate::poll_loop::{CallCtx, HOST_VTABLE};

/// Why a library could not be loaded as a plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginLoadError {
    #[error("plugin {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("plugin {path}: not a loadable library: {message}")]
    NotALibrary { path: PathBuf, message: String },
    #[error("plugin {path}: not an asyncored plugin (no {symbol} symbol)")]
    NotAPlugin { path: PathBuf, symbol: &'static str },
    #[error("plugin {path}: abi version {found_major}.{found_minor}, expected {}.{}", ffi::ABI_MAJOR, ffi::ABI_MINOR)]
    AbiMismatch { path: PathBuf, found_major: u32, found_minor: u32 },
    #[error(
        "plugin {path}: its descriptor is {size} bytes, smaller than the {minimum} bytes of abi {}.0 (it claims abi {found_major}.{found_minor})",
        ffi::ABI_MAJOR
    )]
    DescriptorTooSmall { path: PathBuf, size: u32, minimum: usize, found_major: u32, found_minor: u32 },
    #[error("plugin {path}: built with panic = \"abort\"; a panic would kill the daemon, so it is refused")]
    PanicAbort { path: PathBuf },
    #[error("plugin {path}: refused the host's abi version {}.{}", ffi::ABI_MAJOR, ffi::ABI_MINOR)]
    InitRefused { path: PathBuf },
    #[error("plugin {name}: on_load failed: {message}")]
    OnLoad { name: String, message: String },
    #[error(
        "plugin {path}: outside the plugin directories ({dirs}); start the daemon with --allow-any-plugin-path to load it"
    )]
    OutsidePluginDirs { path: PathBuf, dirs: String },
}

/// A plugin library, loaded and validated.
pub struct LoadedPlugin {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) sdk_version: String,
    pub(crate) abi: (u32, u32),
    pub(crate) path: PathBuf,
    /// SHA-256 of the file as loaded, hex.
    pub(crate) sha256: String,
    pub(crate) loaded_at: SystemTime,
    listen: ListenFn,
    /// Absent in a plugin of ABI 1.0, or one that does not import state.
    import_state: Option<ImportStateFn>,
    // Never dropped: see the module docs. `None` for a plugin linked into
    // the process.
    _library: Option<ManuallyDrop<libloading::Library>>,
}

// SAFETY: the function pointers point into the library's code, which stays
// mapped for the life of the process; plugin calls are made from one thread
// at a time (the loader, then only the poll loop).
unsafe impl Send for LoadedPlugin {}

impl fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Counter making private copies unique within the process.
static NEXT_COPY: AtomicU64 = AtomicU64::new(1);

/// Loads `path` as a plugin: copies it to a private file, opens the copy,
/// checks the ABI, and runs the plugin's `init` and `on_load`.
///
/// # Errors
///
/// [`PluginLoadError`] naming the path and what is wrong with it.
pub fn load(path: &Path) -> Result<LoadedPlugin, PluginLoadError> {
    let io_err = |source| PluginLoadError::Io { path: path.to_owned(), source };
    let path = std::fs::canonicalize(path).map_err(io_err)?;
    if !path.is_file() {
        return Err(io_err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
    }

    // dlopen of a path that is already open returns the old image, even after
    // the file was rebuilt in place; a private copy (a new inode) gives each
    // load its own image and makes rebuilding the original harmless.
    let private_dir = std::env::temp_dir().join(format!("asyncored-{}", std::process::id()));
    std::fs::create_dir_all(&private_dir).map_err(io_err)?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
    let private = private_dir.join(format!("{stem}-{}.so", NEXT_COPY.fetch_add(1, Ordering::Relaxed)));
    let bytes = std::fs::read(&path).map_err(io_err)?;
    let sha256 = hex(&Sha256::digest(&bytes));
    std::fs::write(&private, &bytes).map_err(io_err)?;
    drop(bytes);

    // SAFETY: loading runs the library's initialisers. Plugins are trusted
    // code (like Envoy's dynamic modules): the daemon loads only what its
    // operator names.
    let opened = unsafe { libloading::Library::new(&private) };
    // The mapping survives the unlink; removing the copy now leaves nothing
    // behind whatever happens next.
    let _ = std::fs::remove_file(&private);
    let library = opened.map_err(|e| PluginLoadError::NotALibrary { path: path.clone(), message: dl_message(&e) })?;

    // SAFETY: the tag's layout is frozen forever; any library exporting the
    // symbol exports this struct.
    let tag = unsafe { library.get::<*const AbiTag>(ffi::ABI_TAG_SYMBOL.as_bytes()) }
        .map_err(|_| PluginLoadError::NotAPlugin { path: path.clone(), symbol: ffi::ABI_TAG_SYMBOL })?;
    // SAFETY: a static symbol's address is the address of its data.
    let tag: AbiTag = unsafe { std::ptr::read(*tag) };
    if tag.magic != ffi::ABI_MAGIC {
        return Err(PluginLoadError::NotAPlugin { path, symbol: ffi::ABI_TAG_SYMBOL });
    }
    if tag.major != ffi::ABI_MAJOR {
        return Err(PluginLoadError::AbiMismatch { path, found_major: tag.major, found_minor: tag.minor });
    }
    // SAFETY: the ABI tag promised this entry point with this signature.
    let entry = unsafe { library.get::<ffi::EntryFn>(ffi::ENTRY_SYMBOL.as_bytes()) }
        .map_err(|_| PluginLoadError::NotAPlugin { path: path.clone(), symbol: ffi::ENTRY_SYMBOL })?;
    // SAFETY: as above; the entry returns a pointer to a static descriptor.
    let descriptor = unsafe { entry() };
    // From here on plugin code runs, so the library is never unloaded.
    let library = ManuallyDrop::new(library);
    adopt(descriptor, path, sha256, Some(library))
}

/// Takes a plugin linked into this process (the `asyncore-testing` crate
/// serves a plugin crate's own `Plugin` type this way): the same checks,
/// `init` and `on_load` as a library loaded by [`load`], through the same
/// descriptor and shims the library would export.
///
/// # Errors
///
/// As for [`load`], past opening the library.
pub fn in_process(descriptor: &'static PluginDescriptor) -> Result<LoadedPlugin, PluginLoadError> {
    adopt(descriptor, PathBuf::from("<in-process>"), String::new(), None)
}

type ListenFn = unsafe extern "C" fn(*mut HostCtx, *const KeyValue, usize, *mut DispatcherHandle) -> i32;
type ImportStateFn = unsafe extern "C" fn(*mut HostCtx, StrRef, *mut DispatcherHandle) -> i32;

/// Reads field `$field` of a table at `$table` through a raw pointer: the
/// table may be shorter than this build's struct, so no reference to the
/// whole of it is ever made.
macro_rules! read_field {
    ($table:expr, $field:ident) => {
        // SAFETY: the caller checked that the table's size covers the field;
        // the table is static data of a library that stays mapped.
        unsafe { std::ptr::addr_of!((*$table).$field).read() }
    };
}

/// Checks a plugin's descriptor (its size first, then the fields it covers)
/// and runs its `init` and `on_load`.
fn adopt(
    desc: *const PluginDescriptor,
    path: PathBuf,
    sha256: String,
    library: Option<ManuallyDrop<libloading::Library>>,
) -> Result<LoadedPlugin, PluginLoadError> {
    // SAFETY: the entry point returned a pointer to its static descriptor,
    // which begins with its size in every version.
    let size = unsafe { ffi::table_size(desc) };
    // `size`, `abi_major` and `abi_minor` lead every version's descriptor.
    let (found_major, found_minor) = (read_field!(desc, abi_major), read_field!(desc, abi_minor));
    if (size as usize) < ffi::v1_0::PLUGIN_DESCRIPTOR_SIZE {
        let minimum = ffi::v1_0::PLUGIN_DESCRIPTOR_SIZE;
        return Err(PluginLoadError::DescriptorTooSmall { path, size, minimum, found_major, found_minor });
    }
    if found_major != ffi::ABI_MAJOR {
        return Err(PluginLoadError::AbiMismatch { path, found_major, found_minor });
    }
    if read_field!(desc, panic_unwind) != 1 {
        return Err(PluginLoadError::PanicAbort { path });
    }
    let (init, on_load, listen) = (read_field!(desc, init), read_field!(desc, on_load), read_field!(desc, listen));
    let import_state = if ffi::has_field(size, std::mem::offset_of!(PluginDescriptor, import_state)) {
        read_field!(desc, import_state)
    } else {
        None
    };
    let (name, version, sdk_version) =
        (read_field!(desc, name), read_field!(desc, version), read_field!(desc, sdk_version));
    // SAFETY: the strings are static data of the plugin.
    let (name, version, sdk_version) =
        unsafe { (name.to_string_lossy(), version.to_string_lossy(), sdk_version.to_string_lossy()) };

    // The plugin's name, for its log records; lives as long as its code.
    let log_name: &'static &'static str = Box::leak(Box::new(&*Box::leak(name.clone().into_boxed_str())));
    let host_data = (log_name as *const &'static str).cast_mut().cast::<c_void>();
    // SAFETY: HOST_VTABLE is static; host_data points to a leaked
    // &'static str we get back in `log`.
    let status = unsafe { init(&HOST_VTABLE, host_data) };
    if status != ffi::status::OK {
        return Err(PluginLoadError::InitRefused { path });
    }
    let mut ctx = CallCtx::detached();
    // SAFETY: ctx lives across the call.
    let status = unsafe { on_load(ctx.as_ffi()) };
    if status != ffi::status::OK {
        let message = ctx.take_report().unwrap_or_else(|| "refused without a message".to_string());
        return Err(PluginLoadError::OnLoad { name, message });
    }

    Ok(LoadedPlugin {
        name,
        version,
        sdk_version,
        abi: (found_major, found_minor),
        path,
        sha256,
        loaded_at: SystemTime::now(),
        listen,
        import_state,
        _library: library,
    })
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, hex.
///
/// # Errors
///
/// If the file cannot be read.
pub fn file_sha256(path: &Path) -> io::Result<String> {
    Ok(hex(&Sha256::digest(std::fs::read(path)?)))
}

/// Which plugin paths `LoadPlugin` accepts: by default only files inside the
/// configured plugin directories, after resolving `..` and symlinks.
#[derive(Debug, Clone, Default)]
pub struct PluginPolicy {
    dirs: Vec<PathBuf>,
    allow_any_path: bool,
}

impl PluginPolicy {
    /// A policy over `dirs` (canonicalized now; directories that do not
    /// exist are skipped).
    pub fn new(dirs: &[PathBuf], allow_any_path: bool) -> PluginPolicy {
        let dirs = dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok()).collect();
        PluginPolicy { dirs, allow_any_path }
    }

    /// The plugin directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Resolves `path` and checks it is inside a plugin directory.
    ///
    /// # Errors
    ///
    /// [`PluginLoadError::Io`] if it does not resolve,
    /// [`PluginLoadError::OutsidePluginDirs`] if it escapes them.
    pub fn check(&self, path: &Path) -> Result<PathBuf, PluginLoadError> {
        let resolved =
            std::fs::canonicalize(path).map_err(|source| PluginLoadError::Io { path: path.to_owned(), source })?;
        if self.allow_any_path || self.dirs.iter().any(|dir| resolved.starts_with(dir)) {
            return Ok(resolved);
        }
        Err(PluginLoadError::OutsidePluginDirs {
            path: path.to_owned(),
            dirs: self.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
        })
    }
}

fn dl_message(error: &libloading::Error) -> String {
    // libloading wraps dlerror's text; keep just that part.
    let text = error.to_string();
    let text = text.split_once(": ").map_or(text.as_str(), |(_, rest)| rest);
    text.rsplit_once(": ").map_or(text, |(_, tail)| tail).to_string()
}

/// Extracts the `&'static str` plugin name given to `init` as `host_data`.
///
/// # Safety
///
/// `host_data` must be a pointer given to `init` by [`load`].
pub(crate) unsafe fn plugin_name<'a>(host_data: *mut c_void) -> &'a str {
    // SAFETY: load passed a pointer to a leaked &'static str.
    unsafe { *host_data.cast::<&str>() }
}

impl LoadedPlugin {
    /// The plugin's name, as listeners refer to it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Asks the plugin for the listening dispatcher of a new listener.
    ///
    /// On refusal or panic, returns the plugin's message.
    pub(crate) fn listen(&self, ctx: &mut CallCtx, config: &BTreeMap<String, String>) -> Result<Dispatcher, String> {
        let entries: Vec<KeyValue> =
            config.iter().map(|(k, v)| KeyValue { key: StrRef::new(k), value: StrRef::new(v) }).collect();
        let mut out = DispatcherHandle { instance: std::ptr::null_mut(), vtable: std::ptr::null() };
        // SAFETY: listen is code of a library that stays mapped; entries
        // and out live across the call.
        let status = unsafe { (self.listen)(ctx.as_ffi(), entries.as_ptr(), entries.len(), &mut out) };
        match Dispatcher::adopt(out) {
            Some(dispatcher) if status == ffi::status::OK => Ok(dispatcher),
            _ => Err(ctx.take_report().unwrap_or_else(|| "refused without a message".to_string())),
        }
    }
}

impl LoadedPlugin {
    /// Whether this generation takes channels handed over by older ones.
    pub(crate) fn imports_state(&self) -> bool {
        self.import_state.is_some()
    }

    /// Creates a dispatcher from state an older generation exported.
    pub(crate) fn import_state(&self, ctx: &mut CallCtx, state: &[u8]) -> Result<Dispatcher, String> {
        let Some(import) = self.import_state else {
            return Err("this generation does not import state".to_string());
        };
        let mut out = DispatcherHandle { instance: std::ptr::null_mut(), vtable: std::ptr::null() };
        let bytes = StrRef { ptr: state.as_ptr(), len: state.len() };
        // SAFETY: the state and out live across the call.
        let status = unsafe { import(ctx.as_ffi(), bytes, &mut out) };
        match Dispatcher::adopt(out) {
            Some(dispatcher) if status == ffi::status::OK => Ok(dispatcher),
            _ => Err(ctx.take_report().unwrap_or_else(|| "refused without a message".to_string())),
        }
    }
}

/// A dispatcher instance living in a plugin. Copyable handle: the channel
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

    /// `readable()` and `writable()` as interest bits.
    pub(crate) fn interest(self, ctx: &mut CallCtx) -> Result<(bool, bool), Panicked> {
        let interest = vtable_fn!(self, interest);
        // SAFETY: the instance is live until release; ctx lives across the call.
        let bits = unsafe { interest(self.handle.instance, ctx.as_ffi()) };
        if bits & ffi::interest::PANICKED != 0 {
            return Err(Panicked);
        }
        Ok((bits & ffi::interest::READABLE != 0, bits & ffi::interest::WRITABLE != 0))
    }

    /// Calls the `handle_*` method for `event`.
    pub(crate) fn handle_event(self, ctx: &mut CallCtx, event: u32, arg: i64) -> Result<(), Panicked> {
        let handle_event = vtable_fn!(self, handle_event);
        // SAFETY: as for interest.
        let status = unsafe { handle_event(self.handle.instance, ctx.as_ffi(), event, arg) };
        if status == ffi::status::PANICKED { Err(Panicked) } else { Ok(()) }
    }

    /// Calls `handle_accepted`; `ctx` is the new channel.
    pub(crate) fn handle_accepted(self, ctx: &mut CallCtx) -> Result<Option<Dispatcher>, Panicked> {
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
    pub(crate) fn export_state(self, ctx: &mut CallCtx) -> Result<Option<Vec<u8>>, Panicked> {
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

    /// Frees the instance. Called exactly once, never during one of its own
    /// callbacks.
    pub(crate) fn release(self) {
        let drop = vtable_fn!(self, drop);
        // SAFETY: the channel table releases each handle once.
        unsafe { drop(self.handle.instance) }
    }
}

/// Casts the context pointer a plugin passed back.
///
/// # Safety
///
/// `ctx` must be a pointer made by [`CallCtx::as_ffi`] during a call that is
/// still running.
pub(crate) unsafe fn call_ctx<'a>(ctx: *mut HostCtx) -> &'a mut CallCtx {
    // SAFETY: guaranteed by the caller.
    unsafe { &mut *ctx.cast::<CallCtx>() }
}
