//! The public way to load a plugin into this engine: the loader, given this
//! host's side of the ABI (`host_abi`), the policy of which files may be
//! loaded at all, and the checks a watcher or a directory scan makes of a
//! file before it asks for a load.

use std::{
    io,
    path::{Path, PathBuf},
};

use asyncore_abi::PluginDescriptor;

pub use crate::loader::{LoadedPlugin, MAX_LIBRARY_SIZE, PluginLoadError, Unloaded};
use crate::{host_abi, loader};

/// Loads `path` as a plugin: copies it to a private file, checks the copy
/// is a complete ELF library for this host, opens it, checks the ABI, and
/// runs the plugin's `init` and `on_load`. Call it off the poll thread
/// (copying and `dlopen` take milliseconds), then hand the plugin to the
/// engine.
///
/// # Errors
///
/// [`PluginLoadError`] naming the path and what is wrong with it.
pub fn load(path: &Path) -> Result<LoadedPlugin, PluginLoadError> {
    loader::load(path, &host_abi::HOST)
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
    loader::in_process(descriptor, &host_abi::IN_PROCESS_HOST)
}

/// SHA-256 of a file, hex, read in blocks (never whole into memory).
///
/// # Errors
///
/// If the file cannot be read.
pub fn file_sha256(path: &Path) -> io::Result<String> {
    loader::sha256_of(&mut std::fs::File::open(path)?)
}

/// Checks that `path` is a complete ELF shared library for this host (the
/// check [`load`] makes of its private copy before `dlopen`), reading only
/// its headers: a file still being written fails it.
///
/// # Errors
///
/// [`PluginLoadError::Io`] if it cannot be read,
/// [`PluginLoadError::NotALibrary`] with the reason otherwise.
pub fn check_library(path: &Path) -> Result<(), PluginLoadError> {
    loader::check_library(path)
}

/// Removes the private directories (`$TMPDIR/asyncored-PID`, where loads
/// copy libraries) of processes that no longer exist; returns how many. A
/// daemon's own directory exists only while it loads, so only one killed
/// mid-load leaves one behind. The first load of a process does this too.
pub fn remove_stale_private_dirs() -> usize {
    loader::remove_stale_private_dirs()
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
