//! Turning a library into a plugin: a private copy, a check that the copy is
//! a complete ELF library for this host, `dlopen`, the ABI tag and
//! descriptor checks, then the plugin's `init` and `on_load`; and, for a
//! generation the engine has retired, `dlclose`.
//!
//! A leaf: it knows the C ABI and nothing of the poll loop. What it hands a
//! plugin of the host (the host table for `init`, and how to run `on_load`)
//! comes from its caller as a [`Host`]; what it returns, a [`LoadedPlugin`],
//! only holds the plugin's entry points, which the plugin boundary
//! (`host_abi`) alone calls.
//!
//! # The private copy
//!
//! `dlopen` of a path that is already open returns the old image, even after
//! the file was rebuilt; a private copy (a new inode) gives each load its own
//! image and makes rebuilding the original harmless. The copy is made in
//! `$TMPDIR/asyncored-PID` (mode 0700), hashed as it is written (the file is
//! streamed, never read whole: a library may be at most
//! [`MAX_LIBRARY_SIZE`]), checked and opened. The copy stays as long as its
//! image is loaded, so that `perf`, `gdb` and `/proc/PID/maps` find the
//! plugin's symbols under the name it was mapped from (an unlinked copy
//! shows as `(deleted)` with raw addresses); it is removed when the image
//! is released or its [`LoadedPlugin`] dropped (the engine's end), and the
//! directory when no copy or load is left in it. The first load of a
//! process also removes the directories of daemons that are gone (killed,
//! so they left theirs).
//!
//! # Checked before `dlopen`
//!
//! `dlopen` maps each loadable segment of the file; a segment that lies
//! past the end of a truncated file (a build still writing it, a partial
//! copy) is mapped all the same, and the first touch of it kills the process
//! with SIGBUS. So the copy, which nothing else writes, is parsed first (the
//! `object` crate, headers only): the ELF class, byte order and machine must
//! be this host's, the type a shared object, and the program header table,
//! every segment's file range, the section header table and every section's
//! contents must lie within the file. A library that fails is refused with
//! the reason ([`PluginLoadError::NotALibrary`]). What `dlopen` itself
//! refuses is reported with `dlerror`'s text.
//!
//! # What stays mapped
//!
//! A library stays mapped as long as the engine may call it: dropping a
//! [`LoadedPlugin`] never unloads it. The engine unloads a generation it
//! has retired once nothing of it is left (no channel, so no dispatcher or
//! timer of it; no listener) with [`LoadedPlugin::release_image`], which
//! `dlclose`s the library and then asks glibc (`dlopen` with
//! `RTLD_NOLOAD`) whether the image is really gone. The plugin's
//! `host_data` record (its name and metric table, about 4.6 KiB) goes with
//! its `LoadedPlugin` only if the image is gone; a library that stays
//! mapped keeps its record for ever (`LoadedPlugin`'s `Drop` says why).
//!
//! Measured (glibc 2.36, Rust 1.95, the echo plugin's debug build): a
//! retired generation that is never closed keeps 4 maps and about 400 KiB
//! of resident memory for ever (272 KiB for the release build). Through
//! the daemon binary (`tests/tests/it/unload.rs`), 200 reloads each
//! followed by retiring the previous generation: 114 to 912 maps and
//! 400 KiB a reload without `dlclose`; with it, no map more, but still
//! 6.3 to 6.9 KiB a reload (200 reloads and retires, or 1,000 plain
//! reloads) while every load leaked its metric table and the engine kept
//! every generation's record. Both go now: 200 reloads and retires grew the
//! resident memory by 48 KiB (0.24 KiB a reload) and the maps by none;
//! 1,000 plain reloads by 270 to 350 KiB and 4 maps, 3,000 by 550 KiB and
//! 5 maps. What is left does not follow the reloads: it is the malloc
//! arena and stack of a thread that came meanwhile (the 4 maps), and heap
//! fragmentation. In the engine alone, 1,000 cycles ended with the maps
//! they started with.
//!
//! Unloading a Rust cdylib is safe on glibc because of how glibc treats
//! thread-local destructors: std registers one with
//! `__cxa_thread_atexit_impl` and the library's own `__dso_handle`, and
//! `dlclose` leaves a library mapped while any such destructor is pending
//! (`l_tls_dtor_count`); it runs later, from the still-mapped image, when its
//! thread exits. So a plugin whose code touched a `thread_local!` with a
//! destructor on the poll thread (the SDK keeps a caught panic's message in
//! one) stays mapped: measured with the `panicky` fixture, 50 generations
//! out of 50 stayed mapped after a caught panic each, and the poll thread
//! still exited cleanly. A thread the plugin started with `std::thread`
//! pins it the same way (its `thread::current` handle has such a
//! destructor; measured). The crashes of rust-lang/rust#59629 and #52138
//! come from platforms where the destructor does not pin the library
//! (macOS, std's pthread-key fallback). So the decision is not made up
//! front: the loader closes, and reports [`Unloaded::Pinned`] when glibc
//! kept the image. What the caller must guarantee is only that the plugin's
//! code is never called again and no pointer into it is used (the
//! descriptor's strings are copied at load). A thread a plugin made
//! without std (a raw `pthread_create`) does not pin it: such a plugin must
//! end its threads before its generation is retired.

use std::{
    fmt,
    fs::File,
    io::{self, Read, Write},
    mem::ManuallyDrop,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use asyncore_abi::{self as ffi, AbiTag, DispatcherHandle, HostCtx, HostVtable, KeyValue, PluginDescriptor, StrRef};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::plugin_metrics::PluginShared;

/// The largest library the loader copies: far above any plugin (the debug
/// build of the largest one here is 7 MiB), far below what would hurt the
/// disk the private copy is written to.
pub const MAX_LIBRARY_SIZE: u64 = 512 << 20;

/// The longest name, version or SDK version a plugin may declare (a
/// plugin's entry in `ListPlugins` stays small whatever it declares).
pub(crate) const MAX_DESCRIPTOR_TEXT: usize = 128;

/// Why a library could not be loaded as a plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginLoadError {
    #[error("plugin {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("plugin {path}: not a loadable library: {message}")]
    NotALibrary { path: PathBuf, message: String },
    #[error("plugin {path}: {size} bytes, larger than the {} MiB a plugin library may be", MAX_LIBRARY_SIZE >> 20)]
    TooLarge { path: PathBuf, size: u64 },
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
    #[error(
        "plugin {path}: its {field} is {len} bytes; at most {MAX_DESCRIPTOR_TEXT} are allowed (and a name of at least 1)"
    )]
    DescriptorText { path: PathBuf, field: &'static str, len: usize },
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
    /// gets it back in `log` and the metric functions. The
    /// [`LoadedPlugin`] keeps it, and frees it only as its `Drop` says.
    pub(crate) host_data: fn(&str) -> Arc<PluginShared>,
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
///
/// Dropping it leaves the library mapped: only
/// [`release_image`](LoadedPlugin::release_image) (for the engine) and
/// [`unload`](LoadedPlugin::unload) close it. It owns its `host_data`
/// record, and frees it when dropped only if the library was unmapped.
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
    /// Its name and the metrics it defined: what `init`'s `host_data`
    /// points to (the interned record of its name for a plugin linked into
    /// the process).
    pub(crate) shared: Arc<PluginShared>,
    /// `None` for a plugin linked into the process, and once released.
    image: Option<Image>,
    /// [`release_image`](LoadedPlugin::release_image) unmapped the library:
    /// no code of the plugin is left that could pass its `host_data`.
    unmapped: bool,
}

/// The opened library of a plugin.
struct Image {
    /// Closed only by [`LoadedPlugin::release_image`]: see the module docs.
    library: ManuallyDrop<libloading::Library>,
    /// The private copy it was opened from: the name glibc knows the image
    /// by, and the file profilers read its symbols from. Removed with the
    /// image.
    copy: PrivateCopy,
    /// Keeps the private directory while the copy is in it.
    _lease: PrivateDir,
}

/// What became of a plugin's library when it was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unloaded {
    /// `dlclose` unmapped it.
    Unmapped,
    /// Closed, but glibc keeps it mapped: a thread-local destructor of the
    /// plugin is pending on a live thread (the module docs say why). It is
    /// unmapped later, if ever; it is never called again.
    Pinned,
    /// Nothing to unmap: a plugin linked into the process, or a library
    /// released already.
    NoLibrary,
}

impl fmt::Display for Unloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unloaded::Unmapped => "library unmapped",
            Unloaded::Pinned => "library closed but still mapped (a thread-local destructor of the plugin is pending)",
            Unloaded::NoLibrary => "no library to unmap",
        })
    }
}

impl LoadedPlugin {
    /// The plugin's name, as listeners refer to it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the library of a plugin that was never handed to an engine
    /// (nothing of it can run again: its entry points go with it).
    pub fn unload(mut self) -> Unloaded {
        // SAFETY: `self` is consumed, and no engine ever saw it: nothing
        // can call into the plugin after this.
        unsafe { self.release_image() }
    }

    /// Closes the library (`dlclose`) and reports whether it was unmapped.
    /// Calling it again does nothing.
    ///
    /// # Safety
    ///
    /// The plugin's code must never run again and nothing may use a pointer
    /// into the library: no dispatcher of it is alive, no timer or request
    /// of it is pending, and [`Entries`] are never called again.
    pub(crate) unsafe fn release_image(&mut self) -> Unloaded {
        let Some(Image { library, copy, _lease }) = self.image.take() else { return Unloaded::NoLibrary };
        let private = &copy.path;
        // A failing dlclose only means glibc kept the image; either way the
        // check below says what is mapped.
        let _ = ManuallyDrop::into_inner(library).close();
        // glibc matches an open library by the name it was opened with
        // before touching the file; RTLD_NOLOAD never maps it.
        // SAFETY: RTLD_NOLOAD runs no initialisers: it only returns a new
        // reference to an image that is still there.
        let still_open =
            unsafe { libloading::os::unix::Library::open(Some(private), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
        match still_open {
            Ok(reference) => {
                // Give the reference back; the image stays as it was. So
                // does the `host_data` record (see `Drop`): the pending
                // thread-local destructor is plugin code that may still
                // log or count a metric with it.
                let _ = reference.close();
                Unloaded::Pinned
            }
            Err(_) => {
                self.unmapped = true;
                Unloaded::Unmapped
            }
        }
    }
}

impl Drop for LoadedPlugin {
    /// Frees the `host_data` record (about 4.6 KiB: the metric table) with
    /// the plugin only if its library was unmapped, when no code is left
    /// that could hand the record to a host function. Otherwise the record
    /// is leaked, kept for the rest of the process: a library never
    /// released (the engine's end, a load refused after `init`), one glibc
    /// keeps mapped ([`Unloaded::Pinned`]: a thread-local destructor of the
    /// plugin, which may still log or count, runs when its thread exits),
    /// and a plugin linked into the process (whose SDK keeps the pointer of
    /// its first `init`) may all still run code that uses it.
    fn drop(&mut self) {
        if !self.unmapped {
            leak_host_data(&self.shared);
        }
    }
}

/// Keeps a `host_data` record for the rest of the process: one reference
/// to it is never given back, so the last [`Arc`] dropped does not free
/// it.
fn leak_host_data(shared: &Arc<PluginShared>) {
    std::mem::forget(Arc::clone(shared));
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

/// Loads `path` as a plugin of `host`: copies it to a private file, checks
/// the copy, opens it, checks the ABI, and runs the plugin's `init` and
/// `on_load`.
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

    let lease = PrivateDir::lease().map_err(io_err)?;
    let (copy, sha256) = lease.copy(&path)?;
    // Checked on the copy: nothing else writes it, so what passes is what
    // dlopen maps.
    elf::check(&copy.file).map_err(|message| PluginLoadError::NotALibrary { path: path.clone(), message })?;

    // SAFETY: loading runs the library's initialisers. Plugins are trusted
    // code (like Envoy's dynamic modules): the daemon loads only what its
    // operator names, and the file is a complete ELF library (checked
    // above), so mapping it cannot fault.
    let opened = unsafe { libloading::Library::new(&copy.path) };
    // On every error below the copy goes with `copy` (and the library is
    // closed again: no plugin code ran).
    let library =
        opened.map_err(|e| PluginLoadError::NotALibrary { path: path.clone(), message: dl_message(&e, &copy.path) })?;

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
    // From here on plugin code runs, so the library is unloaded only by the
    // engine's decision (`release_image`).
    let image = Image { library: ManuallyDrop::new(library), copy, _lease: lease };
    adopt(descriptor, host, path, sha256, Some(image))
}

/// Checks that `path` is a complete ELF shared library for this host,
/// without loading it (what [`load`] checks on its private copy).
///
/// # Errors
///
/// [`PluginLoadError::Io`] if it cannot be read,
/// [`PluginLoadError::NotALibrary`] with the reason otherwise.
pub(crate) fn check_library(path: &Path) -> Result<(), PluginLoadError> {
    let file = File::open(path).map_err(|source| PluginLoadError::Io { path: path.to_owned(), source })?;
    elf::check(&file).map_err(|message| PluginLoadError::NotALibrary { path: path.to_owned(), message })
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
    image: Option<Image>,
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
    // SAFETY: the strings are static data of the plugin; they are copied,
    // so nothing points into the library once it is closed.
    let (name, version, sdk_version) =
        unsafe { (name.to_string_lossy(), version.to_string_lossy(), sdk_version.to_string_lossy()) };
    check_descriptor_text(&path, [("name", &name), ("version", &version), ("sdk_version", &sdk_version)])?;

    let shared = (host.host_data)(&name);
    // SAFETY: the host's table is static; host_data is the host's own
    // record for this plugin, which outlives the plugin's use of it (see
    // `LoadedPlugin`'s `Drop`). Plugin code only reads it through shared
    // references (the host functions), so handing out a `*mut` is sound.
    let status = unsafe { init(host.vtable, Arc::as_ptr(&shared).cast_mut().cast()) };
    // Refused from here on, the library is not closed (the image is dropped
    // as it is, see `Image`), and the plugin may have kept `host_data`:
    // its record is leaked as a `LoadedPlugin`'s would be.
    if status != ffi::status::OK {
        leak_host_data(&shared);
        return Err(PluginLoadError::InitRefused { path });
    }
    // SAFETY: on_load comes from the descriptor checked above, whose init
    // just succeeded.
    if let Err(message) = unsafe { (host.on_load)(on_load) } {
        leak_host_data(&shared);
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
        shared,
        image,
        unmapped: false,
    })
}

/// Refuses a descriptor whose texts are longer than [`MAX_DESCRIPTOR_TEXT`],
/// or whose name is empty.
fn check_descriptor_text<const N: usize>(path: &Path, texts: [(&'static str, &str); N]) -> Result<(), PluginLoadError> {
    let bad = |&(field, text): &(&str, &str)| text.len() > MAX_DESCRIPTOR_TEXT || (field == "name" && text.is_empty());
    match texts.into_iter().find(bad) {
        Some((field, text)) => Err(PluginLoadError::DescriptorText { path: path.to_owned(), field, len: text.len() }),
        None => Ok(()),
    }
}

/// SHA-256 of what `reader` yields, lower-case hex, read in blocks.
///
/// # Errors
///
/// If reading fails.
pub(crate) fn sha256_of(reader: &mut impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(reader, &mut HashWriter(&mut hasher))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds what is written to it to a hasher.
struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `dlerror`'s text for a failed `dlopen`. libloading keeps it as the
/// error's source (its own text is just "dlopen failed"); it names the
/// private copy, which means nothing to the operator, so that prefix goes.
fn dl_message(error: &libloading::Error, private: &Path) -> String {
    let text = std::error::Error::source(error).map_or_else(|| error.to_string(), ToString::to_string);
    let prefix = format!("{}: ", private.display());
    text.strip_prefix(&prefix).map_or_else(|| text.clone(), str::to_string)
}

/// Makes private copies unique within the process.
static NEXT_COPY: AtomicU64 = AtomicU64::new(1);

/// How many loads use the private directory now: the first creates it, the
/// last removes it.
static PRIVATE_DIR_USERS: Mutex<usize> = Mutex::new(0);

/// This process's private directory, `$TMPDIR/asyncored-PID`, held by a
/// load while it makes and opens its copy, then by the loaded image while
/// its copy is in it.
struct PrivateDir {
    dir: PathBuf,
}

/// A private copy of a library; removed on drop.
struct PrivateCopy {
    path: PathBuf,
    file: File,
}

impl Drop for PrivateCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl PrivateDir {
    /// Creates the directory (mode 0700) unless another load holds it.
    fn lease() -> io::Result<PrivateDir> {
        let dir = private_dir_of(std::process::id());
        let mut users = PRIVATE_DIR_USERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *users == 0 {
            static SWEEP: Once = Once::new();
            SWEEP.call_once(|| {
                remove_stale_private_dirs();
            });
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                // Left by an earlier process with this pid: use it if it
                // is a directory of ours, not something planted there.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_ours(&dir)?,
                Err(e) => return Err(e),
            }
        }
        *users += 1;
        Ok(PrivateDir { dir })
    }

    /// Copies `path` into the directory, hashing it on the way.
    fn copy(&self, path: &Path) -> Result<(PrivateCopy, String), PluginLoadError> {
        let io_err = |source| PluginLoadError::Io { path: path.to_owned(), source };
        let mut input = File::open(path).map_err(io_err)?;
        let size = input.metadata().map_err(io_err)?.len();
        if size > MAX_LIBRARY_SIZE {
            return Err(PluginLoadError::TooLarge { path: path.to_owned(), size });
        }
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
        let private = self.dir.join(format!("{stem}-{}.so", NEXT_COPY.fetch_add(1, Ordering::Relaxed)));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&private)
            .map_err(io_err)?;
        let mut copy = PrivateCopy { path: private, file };
        let mut hasher = Sha256::new();
        // One more byte than allowed: a file that grows past the limit while
        // it is copied is refused too.
        let mut limited = (&mut input).take(MAX_LIBRARY_SIZE + 1);
        let copied = io::copy(&mut limited, &mut Tee { file: &mut copy.file, hasher: &mut hasher }).map_err(io_err)?;
        if copied > MAX_LIBRARY_SIZE {
            return Err(PluginLoadError::TooLarge { path: path.to_owned(), size: copied });
        }
        Ok((copy, hex(&hasher.finalize())))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let mut users = PRIVATE_DIR_USERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *users -= 1;
        if *users == 0 {
            // No load and no loaded image has a copy in it any more: only
            // leftovers of an earlier process with this pid could be.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes to the private copy and feeds the hasher.
struct Tee<'a> {
    file: &'a mut File,
    hasher: &'a mut Sha256,
}

impl Write for Tee<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = self.file.write(bytes)?;
        self.hasher.update(&bytes[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn private_dir_of(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("asyncored-{pid}"))
}

/// Whether `dir` is a real directory (not a symlink) owned by this user.
fn check_ours(dir: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.is_dir() && meta.uid() == uid {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} is not a directory of this user; remove it", dir.display()),
        ))
    }
}

/// Removes the private directories (`$TMPDIR/asyncored-PID`) of processes
/// that no longer exist, left behind by a daemon that was killed while
/// loading. Returns how many it removed. Directories of other users, and of
/// processes that are alive, stay; without `/proc` nothing is removed.
pub(crate) fn remove_stale_private_dirs() -> usize {
    if !Path::new("/proc/self").exists() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return 0 };
    let own = std::process::id();
    let mut removed = 0;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("asyncored-")).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let dir = entry.path();
        if check_ours(&dir).is_ok() && std::fs::remove_dir_all(&dir).is_ok() {
            info!(dir = %dir.display(), "removed the private directory of a daemon that is gone");
            removed += 1;
        }
    }
    removed
}

/// The check of an ELF file's headers: is it a complete shared library for
/// this host, so that `dlopen` maps nothing past its end?
mod elf {
    use std::{fs::File, mem::size_of};

    use object::{
        Endianness, ReadCache, ReadRef, elf,
        read::elf::{FileHeader, ProgramHeader, SectionHeader},
    };

    /// The ELF machine of this host, where it is known.
    const HOST_MACHINE: Option<elf::Machine> = if cfg!(target_arch = "x86_64") {
        Some(elf::EM_X86_64)
    } else if cfg!(target_arch = "aarch64") {
        Some(elf::EM_AARCH64)
    } else if cfg!(target_arch = "riscv64") {
        Some(elf::EM_RISCV)
    } else if cfg!(target_arch = "powerpc64") {
        Some(elf::EM_PPC64)
    } else if cfg!(target_arch = "s390x") {
        Some(elf::EM_S390)
    } else if cfg!(target_arch = "loongarch64") {
        Some(elf::EM_LOONGARCH)
    } else {
        None
    };

    /// Why `file` is not a complete ELF shared library for this host.
    pub(super) fn check(file: &File) -> Result<(), String> {
        let len = file.metadata().map_err(|e| format!("cannot read it: {e}"))?.len();
        check_data(&ReadCache::new(file), len)
    }

    /// [`check`] over `data`, `len` bytes long.
    pub(super) fn check_data<'data>(data: impl ReadRef<'data>, len: u64) -> Result<(), String> {
        if len == 0 {
            return Err("an empty file".to_string());
        }
        // The identification bytes: magic, class, byte order.
        let ident = data.read_bytes_at(0, len.min(16)).map_err(|()| format!("cannot read its first {len} bytes"))?;
        if !ident.iter().zip(elf::ELFMAG).all(|(byte, magic)| *byte == magic) {
            return Err("not an ELF file (no ELF magic number at its start)".to_string());
        }
        if ident.len() < 16 {
            return Err(format!("too short for an ELF file ({len} bytes)"));
        }
        let bits = match elf::FileClass(ident[4]) {
            elf::ELFCLASS32 => 32,
            elf::ELFCLASS64 => 64,
            other => return Err(format!("an ELF file of unknown class {}", other.0)),
        };
        if bits != usize::BITS {
            return Err(format!("a {bits}-bit ELF file; this daemon is {}-bit", usize::BITS));
        }
        let native = if cfg!(target_endian = "little") { elf::ELFDATA2LSB } else { elf::ELFDATA2MSB };
        if elf::DataEncoding(ident[5]) != native {
            return Err(format!(
                "an ELF file of the other byte order; this daemon is {}-endian",
                if cfg!(target_endian = "little") { "little" } else { "big" }
            ));
        }
        #[cfg(target_pointer_width = "64")]
        return check_headers::<elf::FileHeader64<Endianness>>(data, len);
        #[cfg(target_pointer_width = "32")]
        return check_headers::<elf::FileHeader32<Endianness>>(data, len);
    }

    /// The checks past the identification bytes, for this host's class.
    fn check_headers<'data, Elf: FileHeader<Endian = Endianness>>(
        data: impl ReadRef<'data>,
        len: u64,
    ) -> Result<(), String> {
        let header_size = size_of::<Elf>() as u64;
        if len < header_size {
            return Err(format!("truncated: {len} bytes, less than an ELF header ({header_size} bytes)"));
        }
        let header = Elf::parse(data).map_err(|e| format!("a corrupt ELF header: {e}"))?;
        let endian = header.endian().map_err(|e| format!("a corrupt ELF header: {e}"))?;
        let file_type = header.e_type(endian);
        if file_type != elf::ET_DYN {
            let kind = match file_type {
                elf::ET_REL => "an object file (.o)",
                elf::ET_EXEC => "an executable",
                elf::ET_CORE => "a core dump",
                _ => "an ELF file of an unknown type",
            };
            return Err(format!("{kind}, not a shared library"));
        }
        let machine = header.e_machine(endian);
        if let Some(host) = HOST_MACHINE
            && machine != host
        {
            return Err(format!(
                "built for ELF machine {}, not for this host ({}, machine {})",
                machine.0,
                std::env::consts::ARCH,
                host.0
            ));
        }

        // The program headers: what dlopen maps.
        let phoff: u64 = header.e_phoff(endian).into();
        let phentsize = u64::from(header.e_phentsize(endian));
        if phoff == 0 || header.e_phnum(endian) == 0 {
            return Err("no program headers: nothing to load".to_string());
        }
        if phentsize != size_of::<Elf::ProgramHeader>() as u64 {
            return Err(format!(
                "program header entries of {phentsize} bytes, not {}: corrupt",
                size_of::<Elf::ProgramHeader>()
            ));
        }
        // An extended count lives in section 0, which must then be there.
        let phnum = header.phnum(endian, data).map_err(|e| format!("{e}: truncated or corrupt"))?;
        within(phoff, u64::from(phnum) * phentsize, len, "the program header table")?;
        let segments = header.program_headers(endian, data).map_err(|e| format!("{e}: corrupt"))?;
        let mut loadable = 0;
        for (index, segment) in segments.iter().enumerate() {
            let kind = segment.p_type(endian);
            let (offset, file_size): (u64, u64) = (segment.p_offset(endian).into(), segment.p_filesz(endian).into());
            if kind == elf::PT_LOAD {
                loadable += 1;
                let memory_size: u64 = segment.p_memsz(endian).into();
                if file_size > memory_size {
                    return Err(format!(
                        "segment {index} (PT_LOAD) has more bytes in the file ({file_size}) than in memory ({memory_size}): corrupt"
                    ));
                }
            }
            if kind != elf::PT_NULL && file_size > 0 {
                within(offset, file_size, len, &format!("segment {index} ({})", segment_name(kind)))?;
            }
        }
        if loadable == 0 {
            return Err(format!("no loadable segment (PT_LOAD) among its {} program headers: corrupt", segments.len()));
        }

        // The section headers: not mapped, but a file cut short loses them
        // first (the linker writes them last).
        let shoff: u64 = header.e_shoff(endian).into();
        if shoff == 0 {
            return Ok(());
        }
        let shentsize = u64::from(header.e_shentsize(endian));
        if shentsize != size_of::<Elf::SectionHeader>() as u64 {
            return Err(format!(
                "section header entries of {shentsize} bytes, not {}: corrupt",
                size_of::<Elf::SectionHeader>()
            ));
        }
        // Section 0 first: it may hold the count.
        within(shoff, shentsize, len, "the section header table")?;
        let shnum = header.shnum(endian, data).map_err(|e| format!("{e}: corrupt"))?;
        within(shoff, u64::from(shnum) * shentsize, len, "the section header table")?;
        let sections = header.section_headers(endian, data).map_err(|e| format!("{e}: corrupt"))?;
        for (index, section) in sections.iter().enumerate() {
            let kind = section.sh_type(endian);
            if kind == elf::SHT_NULL || kind == elf::SHT_NOBITS {
                continue;
            }
            let (offset, size): (u64, u64) = (section.sh_offset(endian).into(), section.sh_size(endian).into());
            within(offset, size, len, &format!("section {index}"))?;
        }
        Ok(())
    }

    /// Whether `size` bytes at `offset` lie within a file of `len` bytes.
    fn within(offset: u64, size: u64, len: u64, what: &str) -> Result<(), String> {
        match offset.checked_add(size) {
            Some(end) if end <= len => Ok(()),
            _ => Err(format!(
                "{what} at file offset {offset:#x} ({size} bytes) ends past the end of the file ({len} bytes): truncated or corrupt"
            )),
        }
    }

    fn segment_name(kind: elf::ProgramType) -> String {
        match kind {
            elf::PT_LOAD => "PT_LOAD".to_string(),
            elf::PT_DYNAMIC => "PT_DYNAMIC".to_string(),
            elf::PT_INTERP => "PT_INTERP".to_string(),
            elf::PT_NOTE => "PT_NOTE".to_string(),
            elf::PT_PHDR => "PT_PHDR".to_string(),
            elf::PT_TLS => "PT_TLS".to_string(),
            other => format!("type {:#x}", other.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::Arc};

    use super::{
        MAX_DESCRIPTOR_TEXT, PrivateDir, check_descriptor_text, elf, private_dir_of, remove_stale_private_dirs,
        sha256_of,
    };

    #[test]
    fn descriptor_texts_are_bounded_and_a_name_is_needed() {
        let path = Path::new("/plugins/p.so");
        let long = "v".repeat(MAX_DESCRIPTOR_TEXT + 1);
        assert!(check_descriptor_text(path, [("name", "p"), ("version", ""), ("sdk_version", "0.1.0")]).is_ok());
        let refusal = |texts| check_descriptor_text(path, texts).unwrap_err().to_string();
        assert_eq!(
            refusal([("name", "p"), ("version", &long), ("sdk_version", "0.1.0")]),
            "plugin /plugins/p.so: its version is 129 bytes; at most 128 are allowed (and a name of at least 1)"
        );
        assert!(refusal([("name", ""), ("version", "1"), ("sdk_version", "1")]).contains("its name is 0 bytes"));
    }

    /// This test binary: a complete ELF file of this host (a PIE, so of
    /// type shared object, as a plugin is).
    fn complete_library() -> Vec<u8> {
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    fn check(bytes: &[u8]) -> Result<(), String> {
        elf::check_data(bytes, bytes.len() as u64)
    }

    #[track_caller]
    fn refused(bytes: &[u8], reason: &str) {
        match check(bytes) {
            Ok(()) => panic!("{} bytes passed, expected {reason:?}", bytes.len()),
            Err(message) => assert!(message.contains(reason), "{message:?} does not say {reason:?}"),
        }
    }

    fn u16_at(bytes: &[u8], at: usize) -> usize {
        u16::from_ne_bytes(bytes[at..at + 2].try_into().unwrap()) as usize
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    /// Offsets of the program headers of a 64-bit ELF file, with their
    /// types.
    fn program_headers(bytes: &[u8]) -> Vec<(usize, u32)> {
        let (phoff, phentsize, phnum) = (u64_at(bytes, 0x20) as usize, u16_at(bytes, 0x36), u16_at(bytes, 0x38));
        (0..phnum)
            .map(|i| {
                let at = phoff + i * phentsize;
                (at, u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()))
            })
            .collect()
    }

    #[test]
    fn a_complete_library_passes_with_or_without_trailing_bytes() {
        let mut bytes = complete_library();
        check(&bytes).unwrap();
        bytes.extend_from_slice(b"\nrebuilt\n");
        check(&bytes).unwrap();
    }

    #[test]
    fn a_truncated_library_is_refused_wherever_it_was_cut() {
        let bytes = complete_library();
        refused(&[], "an empty file");
        refused(&bytes[..10], "too short for an ELF file (10 bytes)");
        refused(&bytes[..40], "less than an ELF header");
        refused(&bytes[..64], "the program header table");
        refused(&bytes[..4096], "past the end of the file (4096 bytes): truncated or corrupt");
        for percent in [25, 50, 75, 99] {
            let cut = bytes.len() * percent / 100;
            refused(&bytes[..cut], &format!("past the end of the file ({cut} bytes)"));
        }
        refused(&bytes[..bytes.len() - 1], "the section header table");
    }

    #[test]
    fn corrupt_program_headers_are_refused() {
        let bytes = complete_library();
        let headers = program_headers(&bytes);
        let phentsize = u16_at(&bytes, 0x36);

        let mut zeroed = bytes.clone();
        let (first, _) = headers[0];
        zeroed[first..first + headers.len() * phentsize].fill(0);
        refused(&zeroed, "no loadable segment (PT_LOAD)");

        let mut past_end = bytes.clone();
        let (load, _) = *headers.iter().find(|(_, kind)| *kind == 1).expect("a PT_LOAD");
        let beyond = (bytes.len() as u64 + 0xfff) & !0xfff;
        past_end[load + 8..load + 16].copy_from_slice(&beyond.to_ne_bytes());
        refused(&past_end, "(PT_LOAD) at file offset");

        let mut bad_size = bytes.clone();
        bad_size[0x36..0x38].copy_from_slice(&40u16.to_ne_bytes());
        refused(&bad_size, "program header entries of 40 bytes");
    }

    #[test]
    fn a_file_for_another_host_or_of_another_kind_is_refused() {
        let bytes = complete_library();
        refused(b"not a library\n", "not an ELF file");
        let mut other_class = bytes.clone();
        other_class[4] = 1;
        refused(&other_class, "a 32-bit ELF file; this daemon is 64-bit");
        let mut other_order = bytes.clone();
        other_order[5] = if cfg!(target_endian = "little") { 2 } else { 1 };
        refused(&other_order, "the other byte order");
        let mut executable = bytes.clone();
        executable[0x10..0x12].copy_from_slice(&2u16.to_ne_bytes());
        refused(&executable, "an executable, not a shared library");
        let mut other_machine = bytes.clone();
        other_machine[0x12..0x14].copy_from_slice(&0x1234u16.to_ne_bytes());
        refused(&other_machine, "built for ELF machine 4660");
    }

    #[test]
    fn hashing_streams_the_same_digest_as_the_whole() {
        let text = b"abc".repeat(100_000);
        assert_eq!(
            sha256_of(&mut &b"abc"[..]).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let whole: String = {
            use sha2::Digest;
            sha2::Sha256::digest(&text).iter().map(|b| format!("{b:02x}")).collect()
        };
        assert_eq!(sha256_of(&mut &text[..]).unwrap(), whole);
    }

    #[test]
    fn the_private_directory_exists_only_while_a_load_uses_it() {
        let dir = private_dir_of(std::process::id());
        let first = PrivateDir::lease().unwrap();
        let second = PrivateDir::lease().unwrap();
        assert!(dir.is_dir());
        drop(first);
        assert!(dir.is_dir(), "the other load still uses it");
        drop(second);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    #[test]
    fn stale_private_directories_of_gone_processes_are_removed() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let stale = private_dir_of(gone);
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("libecho-1.so"), b"left behind").unwrap();
        let alive = private_dir_of(std::os::unix::process::parent_id());
        let alive_existed = alive.exists();
        std::fs::create_dir_all(&alive).unwrap();
        let unrelated = std::env::temp_dir().join(format!("asyncored-x{gone}"));
        std::fs::create_dir_all(&unrelated).unwrap();

        assert!(remove_stale_private_dirs() >= 1);
        assert!(!stale.exists(), "the directory of process {gone}, which is gone");
        assert!(alive.exists(), "the directory of a live process stays");
        assert!(unrelated.exists(), "a name not of the form asyncored-PID stays");
        if !alive_existed {
            std::fs::remove_dir(&alive).unwrap();
        }
        std::fs::remove_dir(&unrelated).unwrap();
        assert!(!Path::new(&stale).exists());
    }

    #[test]
    fn a_host_data_record_is_freed_only_with_an_unmapped_library() {
        let load = || super::in_process(&crate::test_plugin::DESCRIPTOR, &crate::host_abi::HOST).unwrap();
        // Code linked into the process is never unmapped, as a library
        // never released or kept mapped by glibc: it may still pass its
        // host_data, so its record outlives the plugin.
        let plugin = load();
        let record = Arc::downgrade(&plugin.shared);
        drop(plugin);
        assert!(record.upgrade().is_some(), "the record of code that may still run was freed");
        // What release_image notes when glibc unmapped the library.
        let mut plugin = load();
        plugin.unmapped = true;
        let record = Arc::downgrade(&plugin.shared);
        drop(plugin);
        assert!(record.upgrade().is_none(), "the record of an unmapped library was kept");
    }
}
