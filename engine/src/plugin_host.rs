//! The public way to load a plugin into this engine: the loader, given this
//! host's side of the ABI (`host_abi`), and the policy of which files may be
//! loaded at all.

use std::{
    io,
    path::{Path, PathBuf},
};

use asyncore_abi::PluginDescriptor;

pub use crate::loader::{LoadedPlugin, PluginLoadError};
use crate::{host_abi, loader};

/// Loads `path` as a plugin: copies it to a private file, opens the copy,
/// checks the ABI, and runs the plugin's `init` and `on_load`. Call it off
/// the poll thread (copying and `dlopen` take milliseconds), then hand the
/// plugin to the engine.
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
    loader::in_process(descriptor, &host_abi::HOST)
}

/// SHA-256 of a file, hex.
///
/// # Errors
///
/// If the file cannot be read.
pub fn file_sha256(path: &Path) -> io::Result<String> {
    Ok(loader::sha256_hex(&std::fs::read(path)?))
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
