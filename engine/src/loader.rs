//! Turning a library into a plugin: a private copy, `dlopen`, the ABI tag
//! and descriptor checks, then the plugin's `init` and `on_load`.
//!
//! A leaf: it knows the C ABI and nothing of the poll loop. What it hands a
//! plugin of the host (the host table for `init`, and how to run `on_load`)
//! comes from its caller as a [`Host`]; what it returns, a [`LoadedPlugin`],
//! only holds the plugin's entry points, which the plugin boundary
//! (`host_abi`) alone calls.
//!
//! What stays mapped: a library whose code has run is never `dlclose`d. A
//! Rust cdylib that touched a `thread_local!` with a destructor on the
//! long-lived poll thread cannot be unloaded safely (rust-lang/rust#59629,
//! #52138), so its image stays mapped for the life of the process.

use std::{
    ffi::c_void,
    fmt, io,
    mem::ManuallyDrop,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use asyncore_abi::{self as ffi, AbiTag, DispatcherHandle, HostCtx, HostVtable, KeyValue, PluginDescriptor, StrRef};
use sha2::{Digest, Sha256};

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

/// What the loader gives a plugin of the host it is loaded into.
pub(crate) struct Host {
    /// The table handed to the plugin's `init`.
    pub(crate) vtable: &'static HostVtable,
    /// Makes `init`'s `host_data` for the plugin of this name; the host
    /// gets it back in `log`.
    pub(crate) host_data: fn(&str) -> *mut c_void,
    /// Runs the plugin's `on_load`; on refusal, returns the plugin's
    /// message.
    ///
    /// Safety: the function must be the `on_load` of a descriptor that
    /// passed [`adopt`]'s checks, after its `init` succeeded.
    pub(crate) on_load: unsafe fn(OnLoadFn) -> Result<(), String>,
}

pub(crate) type OnLoadFn = unsafe extern "C" fn(*mut HostCtx) -> i32;
pub(crate) type ListenFn = unsafe extern "C" fn(*mut HostCtx, *const KeyValue, usize, *mut DispatcherHandle) -> i32;
pub(crate) type ImportStateFn = unsafe extern "C" fn(*mut HostCtx, StrRef, *mut DispatcherHandle) -> i32;
pub(crate) type ResumeFn =
    unsafe extern "C" fn(*mut HostCtx, *const KeyValue, usize, StrRef, *mut DispatcherHandle) -> i32;

/// The entry points of a plugin past `init` and `on_load`: plain function
/// pointers into its code, copied out so that no reference into the loop's
/// plugin table is held while they run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entries {
    pub(crate) listen: ListenFn,
    /// Absent in a plugin of ABI 1.0, or one that does not import state.
    pub(crate) import_state: Option<ImportStateFn>,
    /// Absent before ABI 1.2, or in a plugin that does not resume a
    /// listener's state.
    pub(crate) resume: Option<ResumeFn>,
}

/// A plugin library, loaded and validated.
///
/// It is `Send` (function pointers and a `libloading::Library` are): the
/// loader thread makes it and hands it to the poll loop, the only thread
/// that calls it from then on (see `host_abi`).
pub struct LoadedPlugin {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) sdk_version: String,
    pub(crate) abi: (u32, u32),
    pub(crate) path: PathBuf,
    /// SHA-256 of the file as loaded, hex.
    pub(crate) sha256: String,
    pub(crate) loaded_at: SystemTime,
    pub(crate) entries: Entries,
    // Never dropped: see the module docs. `None` for a plugin linked into
    // the process.
    _library: Option<ManuallyDrop<libloading::Library>>,
}

impl LoadedPlugin {
    /// The plugin's name, as listeners refer to it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

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

/// Loads `path` as a plugin of `host`: copies it to a private file, opens
/// the copy, checks the ABI, and runs the plugin's `init` and `on_load`.
///
/// # Errors
///
/// [`PluginLoadError`] naming the path and what is wrong with it.
pub(crate) fn load(path: &Path, host: &Host) -> Result<LoadedPlugin, PluginLoadError> {
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
    let sha256 = sha256_hex(&bytes);
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
    adopt(descriptor, host, path, sha256, Some(library))
}

/// Takes a plugin linked into this process (the `asyncore-testing` crate
/// serves a plugin crate's own `Plugin` type this way): the same checks,
/// `init` and `on_load` as a library loaded by [`load`], through the same
/// descriptor and shims the library would export.
///
/// # Errors
///
/// As for [`load`], past opening the library.
pub(crate) fn in_process(descriptor: &'static PluginDescriptor, host: &Host) -> Result<LoadedPlugin, PluginLoadError> {
    adopt(descriptor, host, PathBuf::from("<in-process>"), String::new(), None)
}

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
    host: &Host,
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
    let resume = if ffi::has_field(size, std::mem::offset_of!(PluginDescriptor, resume)) {
        read_field!(desc, resume)
    } else {
        None
    };
    let (name, version, sdk_version) =
        (read_field!(desc, name), read_field!(desc, version), read_field!(desc, sdk_version));
    // SAFETY: the strings are static data of the plugin.
    let (name, version, sdk_version) =
        unsafe { (name.to_string_lossy(), version.to_string_lossy(), sdk_version.to_string_lossy()) };

    // SAFETY: the host's table is static; host_data is the host's own, for
    // this plugin.
    let status = unsafe { init(host.vtable, (host.host_data)(&name)) };
    if status != ffi::status::OK {
        return Err(PluginLoadError::InitRefused { path });
    }
    // SAFETY: on_load comes from the descriptor checked above, whose init
    // just succeeded.
    if let Err(message) = unsafe { (host.on_load)(on_load) } {
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
        entries: Entries { listen, import_state, resume },
        _library: library,
    })
}

/// SHA-256 of `bytes`, lower-case hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn dl_message(error: &libloading::Error) -> String {
    // libloading wraps dlerror's text; keep just that part.
    let text = error.to_string();
    let text = text.split_once(": ").map_or(text.as_str(), |(_, rest)| rest);
    text.rsplit_once(": ").map_or(text, |(_, tail)| tail).to_string()
}
