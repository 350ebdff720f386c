//! Persisted runtime state (`--state-dir`): what the API changed, saved
//! after every change and restored at start, so that a restart or a crash
//! brings back what was running.
//!
//! The state is one JSON file, `state.json`: the listeners that listen
//! (their bound address, so a port-0 listener comes back on the port it
//! got, their plugin and key/values), and for each plugin its generations
//! (number, library path, sha256) and which one is current. The control
//! API saves it after each change and before it answers
//! ([`StateStore::save`]), so a change that was acknowledged is on disk;
//! saves are serialized by one lock and each takes a fresh listing from the
//! loop, so the file always holds a state the loop was in, never an older
//! one after a newer. A save writes a temporary file, syncs it, renames it
//! over `state.json` and syncs the directory: a crash leaves the old file
//! or the new one, never a mix.
//!
//! At start ([`Restore`]) the daemon loads the saved generations with their
//! numbers (a library that vanished or whose sha256 changed is not loaded),
//! then the plugin directories (skipping the libraries the state accounts
//! for), then starts the config's listeners and the saved ones. Whatever
//! could not be restored is logged, one line each, and the file is moved
//! aside as `state.json.bad-<unix seconds>` for the operator; the state is
//! then saved afresh from what runs. Retired generations are not restored
//! (their libraries are only remembered, so the plugin directories do not
//! load them again). Restoring a current generation activates it, and an
//! activation retires idle generations past the newest four: a plugin
//! saved with more idle generations older than its current one than that
//! comes back with the newest four of them. The engine knows nothing of
//! this: the state is `serde` types of the daemon, built from the loop's
//! answers.
//!
//! While the daemon drains, nothing is saved: the drain stops every
//! listener without an API call, and the restart should bring them back.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::SystemTime,
};

use asyncore_engine::{
    Command, EngineHandle, PluginPolicy,
    command::{GenerationState, ListenerInfo, LoadPlugin, PluginInfo},
    plugin_host,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{error, info, warn};

use crate::config::ListenerConfig;

/// The state file in the state directory.
pub const STATE_FILE: &str = "state.json";

/// The format written; a file of another version is moved aside.
const FORMAT_VERSION: u32 = 1;

/// What `state.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    pub version: u32,
    pub listeners: Vec<SavedListener>,
    pub plugins: Vec<SavedPlugin>,
    /// The daemon-wide connection limit, and what the config said of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<SavedLimit>,
}

/// The daemon-wide `max_connections` (0: none) as it was, and as the
/// config file gave it then. Restored only while the config still gives
/// the same: an edit of the file wins over what `SetDaemonLimits` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedLimit {
    pub live: u64,
    pub configured: u64,
}

/// A listener that was listening.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedListener {
    /// The bound address (a port-0 listener's own port).
    pub address: SocketAddr,
    pub plugin: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// The address the config file gave it, when the config declared it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared: Option<String>,
    /// Bound, but not accepting (`SuspendListener`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
}

/// A plugin: its generations that were not retired, and which is current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedPlugin {
    pub name: String,
    /// `None`: no generation was current (the current one was unloaded).
    pub current: Option<u32>,
    pub generations: Vec<SavedGeneration>,
    /// Libraries of retired generations (the newest per path), so the
    /// plugin directories do not load an unloaded plugin again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<SavedLibrary>,
}

/// One generation to restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedGeneration {
    pub generation: u32,
    pub path: PathBuf,
    pub sha256: String,
}

/// A library file and its content's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedLibrary {
    pub path: PathBuf,
    pub sha256: String,
}

impl SavedState {
    /// The state of a loop, from its listings.
    /// `carried` are retired libraries of a restored state, which this
    /// loop never loaded: they stay remembered.
    pub fn from_listings(
        listeners: &[ListenerInfo],
        plugins: &[PluginInfo],
        declared: &HashMap<u64, String>,
        carried: &[(String, SavedLibrary)],
    ) -> SavedState {
        let listeners = listeners
            .iter()
            .filter(|l| l.listening)
            .map(|l| SavedListener {
                address: l.address,
                plugin: l.plugin.clone(),
                config: l.config.clone(),
                declared: declared.get(&l.id).cloned(),
                suspended: l.suspended,
            })
            .collect();
        let mut plugins: Vec<SavedPlugin> = plugins
            .iter()
            .map(|plugin| {
                let (retired_generations, live): (Vec<_>, Vec<_>) =
                    plugin.generations.iter().partition(|g| g.state == GenerationState::Retired);
                let mut retired: Vec<SavedLibrary> = Vec::new();
                // Newest first, so the first of each path is kept.
                for g in retired_generations.iter().rev() {
                    if !retired.iter().any(|r| r.path.as_os_str() == g.path.as_str()) {
                        retired.push(SavedLibrary { path: PathBuf::from(&g.path), sha256: g.sha256.clone() });
                    }
                }
                SavedPlugin {
                    name: plugin.name.clone(),
                    current: (plugin.current_generation != 0).then_some(plugin.current_generation),
                    generations: live
                        .iter()
                        .map(|g| SavedGeneration {
                            generation: g.generation,
                            path: PathBuf::from(&g.path),
                            sha256: g.sha256.clone(),
                        })
                        .collect(),
                    retired,
                }
            })
            .collect();
        for (name, library) in carried {
            let index = match plugins.iter().position(|p| &p.name == name) {
                Some(index) => index,
                None => {
                    let plugin =
                        SavedPlugin { name: name.clone(), current: None, generations: Vec::new(), retired: Vec::new() };
                    plugins.push(plugin);
                    plugins.len() - 1
                }
            };
            let retired = &mut plugins[index].retired;
            if !retired.iter().any(|r| r.path == library.path) {
                retired.push(library.clone());
            }
        }
        SavedState { version: FORMAT_VERSION, listeners, plugins, max_connections: None }
    }
}

/// Why the state could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot list what runs: {0}")]
    Engine(#[from] asyncore_engine::CommandError),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The state directory, and the lock that serializes saves.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The bytes last written: an unchanged state is not written again.
    last_written: Option<Vec<u8>>,
    /// Listeners the config declared, by id, with the address it gave.
    declared: HashMap<u64, String>,
    /// Retired libraries of the restored state, by plugin name.
    carried: Vec<(String, SavedLibrary)>,
    /// The config's daemon-wide `max_connections` (0: none).
    configured_limit: u64,
}

impl StateStore {
    /// The store in `dir`, created (mode 0700) if missing.
    ///
    /// # Errors
    ///
    /// If the directory cannot be created.
    pub async fn open(dir: &Path, configured_limit: u64) -> anyhow::Result<StateStore> {
        let owned = dir.to_path_buf();
        blocking(move || {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&owned)
        })
        .await
        .map_err(|e| anyhow::anyhow!("state dir {}: {e}", dir.display()))?;
        let inner = Inner { configured_limit, ..Inner::default() };
        Ok(StateStore { dir: dir.to_path_buf(), inner: Mutex::new(inner) })
    }

    /// The state file's path.
    pub fn file(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Reads the saved state: `None` when there is none, or when it cannot
    /// be read or parsed, in which case it is logged and moved aside.
    pub async fn read(&self) -> Option<SavedState> {
        let file = self.file();
        let read_path = file.clone();
        let bytes = match blocking(move || std::fs::read(&read_path)).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                info!(file = %file.display(), "no runtime state saved yet: starting from the config");
                return None;
            }
            Err(e) => {
                self.move_aside(&format!("cannot be read: {e}")).await;
                return None;
            }
        };
        let state = match serde_json::from_slice::<SavedState>(&bytes) {
            Ok(state) if state.version == FORMAT_VERSION => state,
            Ok(state) => {
                self.move_aside(&format!("has format version {}, expected {FORMAT_VERSION}", state.version)).await;
                return None;
            }
            Err(e) => {
                self.move_aside(&format!("is not a valid state file: {e}")).await;
                return None;
            }
        };
        Some(state)
    }

    /// Renames the state file to `state.json.bad-<unix seconds>`, logging
    /// why (`problem` completes "runtime state FILE ...").
    pub async fn move_aside(&self, problem: &str) {
        let file = self.file();
        let seconds = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut aside = self.dir.join(format!("{STATE_FILE}.bad-{seconds}"));
        let mut n = 1;
        while aside.exists() {
            aside = self.dir.join(format!("{STATE_FILE}.bad-{seconds}.{n}"));
            n += 1;
        }
        let (from, to) = (file.clone(), aside.clone());
        match blocking(move || std::fs::rename(&from, &to)).await {
            Ok(()) => error!(
                file = %file.display(),
                moved_to = %aside.display(),
                "runtime state {} {problem}; moved aside to {}",
                file.display(),
                aside.display()
            ),
            Err(e) => error!(
                file = %file.display(),
                "runtime state {} {problem}; it cannot be moved aside either ({e})",
                file.display()
            ),
        }
    }

    /// Remembers that listener `id` is the config's listener declared on
    /// `address`.
    pub async fn declare(&self, id: u64, address: String) {
        self.inner.lock().await.declared.insert(id, address);
    }

    /// Keeps remembering the retired libraries of a restored state.
    pub async fn carry(&self, saved: &SavedState) {
        let carried = saved.plugins.iter().flat_map(|p| p.retired.iter().map(|r| (p.name.clone(), r.clone())));
        self.inner.lock().await.carried = carried.collect();
    }

    /// Saves what the loop runs now, unless it is what was saved last.
    ///
    /// # Errors
    ///
    /// [`StateError`]: the loop did not answer, or the file could not be
    /// written.
    pub async fn save(&self, engine: &EngineHandle) -> Result<(), StateError> {
        let mut inner = self.inner.lock().await;
        // Under the lock: a save that starts later lists a later state.
        let (listeners, plugins, limits) = tokio::join!(
            engine.request(|reply| Command::ListListeners { after: 0, limit: usize::MAX, reply }),
            engine.request(|reply| Command::ListPlugins { reply }),
            engine.request(|reply| Command::DaemonLimits { set: None, reply }),
        );
        let (listeners, plugins, limits) = (listeners?, plugins?, limits?);
        inner.declared.retain(|id, _| listeners.iter().any(|l| l.id == *id && l.listening));
        let mut state = SavedState::from_listings(&listeners, &plugins, &inner.declared, &inner.carried);
        state.max_connections =
            Some(SavedLimit { live: limits.max_connections.unwrap_or(0), configured: inner.configured_limit });
        let mut bytes = serde_json::to_vec_pretty(&state).expect("the state serializes");
        bytes.push(b'\n');
        if inner.last_written.as_ref() == Some(&bytes) {
            return Ok(());
        }
        let dir = self.dir.clone();
        let written = bytes.clone();
        blocking(move || write_atomically(&dir, &written))
            .await
            .map_err(|source| StateError::Write { path: self.file(), source })?;
        inner.last_written = Some(bytes);
        Ok(())
    }
}

/// Writes `state.json` in `dir` so that a crash leaves the old file or the
/// new one: a temporary file, synced, renamed over it, and the directory
/// synced so the rename itself is on disk.
fn write_atomically(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = dir.join(format!("{STATE_FILE}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, dir.join(STATE_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Runs file I/O on the blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

/// A restore in progress: the saved state, what came back, and what could
/// not.
#[derive(Debug)]
pub struct Restore {
    saved: SavedState,
    /// Libraries of restored generations (resolved paths).
    restored: HashSet<PathBuf>,
    /// Saved listeners not yet started, in saved order.
    listeners: Vec<SavedListener>,
    problems: Vec<String>,
}

impl Restore {
    pub fn new(saved: SavedState) -> Restore {
        let listeners = saved.listeners.clone();
        Restore { saved, restored: HashSet::new(), listeners, problems: Vec::new() }
    }

    /// Sets the saved daemon-wide connection limit again, unless the
    /// config's `max_connections` (`configured`) changed since it was saved.
    pub async fn limits(&mut self, engine: &EngineHandle, configured: u64) {
        let Some(saved) = self.saved.max_connections else { return };
        if saved.configured != configured {
            info!(
                saved = saved.live,
                configured, "the config's max_connections changed since the state was saved: the config's applies"
            );
            return;
        }
        let set = Some((saved.live > 0).then_some(saved.live));
        if let Err(e) = engine.request(|reply| Command::DaemonLimits { set, reply }).await {
            self.problem(format!("cannot set the daemon's max_connections to {} again: {e}", saved.live));
        }
    }

    fn problem(&mut self, problem: String) {
        warn!("runtime state: {problem}");
        self.problems.push(problem);
    }

    /// Loads the saved generations, oldest first, each with its number;
    /// the saved current one is made current. A library that vanished or
    /// changed (sha256), or that fails to load, is a problem.
    pub async fn plugins(&mut self, engine: &EngineHandle, policy: &PluginPolicy) {
        for plugin in self.saved.plugins.clone() {
            let mut generations = plugin.generations.clone();
            generations.sort_by_key(|g| g.generation);
            for saved in generations {
                let what = format!("plugin {}@{}", plugin.name, saved.generation);
                let path = saved.path.clone();
                let sha256 = match blocking(move || plugin_host::file_sha256(&path)).await {
                    Ok(sha256) => sha256,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        self.problem(format!("{what}: library {} vanished; not restored", saved.path.display()));
                        continue;
                    }
                    Err(e) => {
                        self.problem(format!(
                            "{what}: library {} cannot be read ({e}); not restored",
                            saved.path.display()
                        ));
                        continue;
                    }
                };
                if sha256 != saved.sha256 {
                    self.problem(format!(
                        "{what}: library {} changed (sha256 {sha256}, saved {}); not restored",
                        saved.path.display(),
                        saved.sha256
                    ));
                    continue;
                }
                let path = match policy.check(&saved.path) {
                    Ok(path) => path,
                    Err(e) => {
                        self.problem(format!("{what}: {e}; not restored"));
                        continue;
                    }
                };
                let request = LoadPlugin {
                    path: path.clone(),
                    expected_name: Some(plugin.name.clone()),
                    activate: plugin.current == Some(saved.generation),
                    drain_timeout: None,
                    generation: Some(saved.generation),
                };
                match engine.load_plugin(request).await {
                    Ok(info) => {
                        let loaded = info.generations.iter().find(|g| g.generation == saved.generation);
                        match loaded {
                            Some(g) if g.sha256 == saved.sha256 => {
                                self.restored.insert(path);
                            }
                            // Changed between the hash above and the load's
                            // own copy.
                            _ => {
                                let name = plugin.name.clone();
                                let generation = Some(saved.generation);
                                let _ = engine
                                    .request(|reply| Command::UnloadPlugin { name, generation, force: true, reply })
                                    .await;
                                self.problem(format!(
                                    "{what}: library {} changed while it was loaded; not restored",
                                    saved.path.display()
                                ));
                            }
                        }
                    }
                    Err(e) => self.problem(format!("{what}: {e}; not restored")),
                }
            }
        }
    }

    /// Whether the plugin directories should leave `path` (resolved) to
    /// the state: it is the library of a restored generation, or of a
    /// retired one with the same content (an unloaded plugin stays
    /// unloaded).
    pub async fn accounts_for(&self, path: &Path) -> bool {
        if self.restored.contains(path) {
            return true;
        }
        let retired: Vec<String> = self
            .saved
            .plugins
            .iter()
            .flat_map(|p| &p.retired)
            .filter(|r| r.path == path)
            .map(|r| r.sha256.clone())
            .collect();
        if retired.is_empty() {
            return false;
        }
        let owned = path.to_path_buf();
        match blocking(move || plugin_host::file_sha256(&owned)).await {
            Ok(sha256) => retired.contains(&sha256),
            Err(_) => false,
        }
    }

    /// After the plugin directories were loaded: each saved plugin gets
    /// its saved current generation back (a newer library in a plugin
    /// directory may have taken its place), or, when that one could not be
    /// restored, its newest loaded generation.
    pub async fn currents(&mut self, engine: &EngineHandle) {
        let Ok(plugins) = engine.request(|reply| Command::ListPlugins { reply }).await else { return };
        for saved in self.saved.plugins.clone() {
            let Some(plugin) = plugins.iter().find(|p| p.name == saved.name) else { continue };
            let live =
                |n: u32| plugin.generations.iter().any(|g| g.generation == n && g.state != GenerationState::Retired);
            let wanted = match saved.current {
                Some(n) if live(n) => n,
                Some(_) if plugin.current_generation == 0 => {
                    match plugin.generations.iter().rev().find(|g| g.state != GenerationState::Retired) {
                        Some(g) => g.generation,
                        None => continue,
                    }
                }
                _ => continue,
            };
            if plugin.current_generation == wanted {
                continue;
            }
            let name = saved.name.clone();
            match engine
                .request(|reply| Command::ActivatePlugin { name, generation: wanted, drain_timeout: None, reply })
                .await
            {
                Ok(_) => info!(plugin = %saved.name, generation = wanted, "runtime state: generation is current again"),
                Err(e) => self.problem(format!("plugin {}@{wanted}: cannot make it current again: {e}", saved.name)),
            }
        }
    }

    /// The saved listener that is the config's `listener` (declared on
    /// `declared`): same plugin, and the config declared it on that
    /// address, or it listens there. Taken out of the saved ones; its
    /// address is where the config's listener should listen (a port-0
    /// listener's own port).
    pub fn config_listener(&mut self, listener: &ListenerConfig, declared: SocketAddr) -> Option<SavedListener> {
        let index = self.listeners.iter().position(|saved| {
            saved.plugin == listener.plugin
                && (saved.declared.as_deref() == Some(listener.address.as_str()) || saved.address == declared)
        })?;
        Some(self.listeners.remove(index))
    }

    /// Suspends listener `id` again if `saved` was suspended.
    pub async fn resuspend(&mut self, engine: &EngineHandle, id: u64, saved: &SavedListener) {
        if !saved.suspended {
            return;
        }
        if let Err(e) = engine.request(|reply| Command::SuspendListener { id, reply }).await {
            self.problem(format!(
                "listener {} ({}): cannot suspend it again: {e}; it accepts connections",
                saved.address, saved.plugin
            ));
        }
    }

    /// A config listener could not listen on its saved address.
    pub fn listener_moved(&mut self, listener: &ListenerConfig, saved: SocketAddr, error: &dyn std::fmt::Display) {
        self.problem(format!(
            "listener {} ({}): cannot listen on its saved address {saved} ({error}); listening on {} instead",
            listener.address, listener.plugin, listener.address
        ));
    }

    /// Starts the saved listeners the config did not declare.
    pub async fn listeners(&mut self, engine: &EngineHandle) {
        for saved in std::mem::take(&mut self.listeners) {
            let (address, plugin, config) = (saved.address, saved.plugin.clone(), saved.config.clone());
            match engine.request(|reply| Command::StartListener { address, plugin, config, reply }).await {
                Ok(listener) => {
                    info!(listener = listener.id, address = %address, "runtime state: listener restored");
                    self.resuspend(engine, listener.id, &saved).await;
                }
                Err(e) => self.problem(format!("listener {address} ({}): {e}; not restored", saved.plugin)),
            }
        }
    }

    /// Ends the restore: with problems, the file is moved aside (so nothing
    /// is lost when the state is saved afresh next).
    pub async fn finish(self, store: &StateStore) {
        store.carry(&self.saved).await;
        let n_listeners = self.saved.listeners.len();
        let n_generations: usize = self.saved.plugins.iter().map(|p| p.generations.len()).sum();
        if self.problems.is_empty() {
            info!(listeners = n_listeners, generations = n_generations, "runtime state restored");
            return;
        }
        let problem = format!(
            "could not be restored in full ({} problem{}: {}); the rest was restored",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" },
            self.problems.join("; ")
        );
        store.move_aside(&problem).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_round_trips_and_refuses_unknown_fields() {
        let state = SavedState {
            version: FORMAT_VERSION,
            listeners: vec![SavedListener {
                address: "127.0.0.1:4000".parse().unwrap(),
                plugin: "echo".into(),
                config: BTreeMap::from([("high_water".into(), "10".into())]),
                declared: Some("127.0.0.1:0".into()),
                suspended: true,
            }],
            plugins: vec![SavedPlugin {
                name: "echo".into(),
                current: Some(2),
                generations: vec![SavedGeneration { generation: 2, path: "/p/echo.so".into(), sha256: "ab".into() }],
                retired: vec![SavedLibrary { path: "/p/old.so".into(), sha256: "cd".into() }],
            }],
            max_connections: Some(SavedLimit { live: 5, configured: 0 }),
        };
        let text = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<SavedState>(&text).unwrap(), state);
        let unknown = text.replacen("\"version\"", "\"extra\":1,\"version\"", 1);
        assert!(serde_json::from_str::<SavedState>(&unknown).unwrap_err().to_string().contains("extra"));
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("asyncored-state-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_atomically(&dir, b"one").unwrap();
        write_atomically(&dir, b"two").unwrap();
        assert_eq!(std::fs::read(dir.join(STATE_FILE)).unwrap(), b"two");
        assert!(!dir.join(format!("{STATE_FILE}.tmp")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
