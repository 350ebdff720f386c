//! Re-reading the config file while the daemon runs (SIGHUP, or the
//! `Daemon.ReloadConfig` RPC): the new file is read and validated first,
//! then only the difference in listeners is applied. A listener is its
//! address, plugin and config: one new in the file is started, one gone
//! from it is stopped (its channels run on), one that changed is stopped
//! and started again. A file that is invalid, or that cannot be applied (a
//! plugin that is not loaded, an address in use), leaves the old config in
//! force: what was stopped is started again, what was started is stopped.
//! Other settings (control and HTTP addresses, plugin directories, limits)
//! take effect at the next start: a reload names those that differ from
//! the file the daemon started with, in its log line and its answer. The
//! credential files in force (the token file, the TLS certificate, key and
//! client CA) are read again first, on their own: when every one loads
//! they are all put in force at once, even if the config file then cannot
//! be applied (a revoked token must not wait for a listener's address); one
//! that does not load fails the reload, and nothing changes.
//!
//! Reloads are serialised: the config's listeners and their ids are kept
//! behind an async mutex held for a whole reload.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use asyncore_engine::{
    Command, CommandError, EngineHandle,
    command::{ListenerInfo, PluginInfo},
};
use tracing::{info, warn};

use crate::{
    auth::Auth,
    config::{Config, excerpt},
    state::StateStore,
    tls::Tls,
};

/// A config listener as a reload compares it: by address, plugin and
/// config.
#[derive(Debug, Clone)]
struct ListenerSpec {
    address: SocketAddr,
    /// The address as the file writes it (what the saved state knows a
    /// config listener by).
    declared: String,
    plugin: String,
    config: BTreeMap<String, String>,
}

impl PartialEq for ListenerSpec {
    fn eq(&self, other: &ListenerSpec) -> bool {
        (self.address, &self.plugin, &self.config) == (other.address, &other.plugin, &other.config)
    }
}

impl std::fmt::Display for ListenerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "listener {} ({})", self.address, excerpt(&self.plugin))
    }
}

/// A listener of the config that runs.
#[derive(Debug, Clone)]
struct Running {
    spec: ListenerSpec,
    id: u64,
    /// Where it is bound (the port a `:0` address got), for a rollback.
    bound: SocketAddr,
}

/// Where a reload is, for systemd's `RELOADING=1` and `READY=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadStage {
    Begin,
    End,
}

type Hook = Arc<dyn Fn(ReloadStage) + Send + Sync>;

/// The daemon's config file and the listeners it started from it.
pub struct ConfigReload {
    path: Option<PathBuf>,
    /// The settings of the file the daemon started with, but its listeners.
    in_force: toml::Table,
    engine: EngineHandle,
    running: tokio::sync::Mutex<Vec<Running>>,
    hook: OnceLock<Hook>,
    /// Where the runtime state is saved (`--state-dir`), if anywhere.
    state: Option<Arc<StateStore>>,
    /// The control plane's credentials, read again by each reload.
    credentials: Credentials,
}

/// What a reload reads again besides the config file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Credentials {
    pub(crate) auth: Option<Arc<Auth>>,
    pub(crate) tls: Option<Tls>,
}

impl std::fmt::Debug for ConfigReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigReload").field("path", &self.path).finish_non_exhaustive()
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default)]
pub struct ReloadOutcome {
    pub path: PathBuf,
    pub started: Vec<ListenerInfo>,
    pub stopped: Vec<ListenerInfo>,
    pub unchanged: usize,
    /// The file's other settings that differ from those the daemon started
    /// with, which take effect at the next start.
    pub restart_needed: Vec<String>,
    /// The credential files read again and now in force, each as
    /// `setting path`.
    pub reread: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload: the daemon was started without --config")]
    NoFile,
    /// The file cannot be read, does not parse, is out of range, or cannot
    /// be applied; nothing changed.
    #[error("{0}; the old config stays in force")]
    Invalid(String),
    /// A credential file (the token file, a TLS file) does not load;
    /// nothing changed.
    #[error("{0}; nothing changed: the tokens, certificates and config in force stay")]
    Credentials(String),
    /// The daemon is draining, or its loop is gone.
    #[error("{0}")]
    Unavailable(CommandError),
}

impl ConfigReload {
    /// The listeners `started` from `config` (in its order), which the
    /// first reload compares the file with.
    pub(crate) fn new(config: &Config, engine: EngineHandle, started: &[ListenerInfo]) -> ConfigReload {
        let running = config
            .listeners
            .iter()
            .zip(started)
            .filter_map(|(listener, info)| {
                Some(Running {
                    spec: ListenerSpec {
                        address: listener.address.parse().ok()?,
                        declared: listener.address.clone(),
                        plugin: listener.plugin.clone(),
                        config: listener.config.clone(),
                    },
                    id: info.id,
                    bound: info.address,
                })
            })
            .collect();
        let in_force = config
            .source
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .map(|text| settings_of(&text))
            .unwrap_or_default();
        ConfigReload {
            in_force,
            path: config.source.clone(),
            engine,
            running: tokio::sync::Mutex::new(running),
            hook: OnceLock::new(),
            state: None,
            credentials: Credentials::default(),
        }
    }

    /// The same, reading `credentials`' files again at each reload.
    pub(crate) fn with_credentials(self, credentials: Credentials) -> ConfigReload {
        ConfigReload { credentials, ..self }
    }

    /// The same, saving the runtime state in `store` after a reload that
    /// changed listeners.
    pub(crate) fn with_state(self, store: Option<Arc<StateStore>>) -> ConfigReload {
        ConfigReload { state: store, ..self }
    }

    /// Calls `hook` as each reload begins and ends (systemd's
    /// `RELOADING=1` and `READY=1`). Only the first hook set is kept.
    pub fn on_reload(&self, hook: impl Fn(ReloadStage) + Send + Sync + 'static) {
        let _ = self.hook.set(Arc::new(hook));
    }

    /// Reads the config file again and applies the difference in
    /// listeners. Logs what it did, or why it did nothing.
    ///
    /// # Errors
    ///
    /// [`ReloadError`]; then nothing changed.
    pub async fn reload(&self) -> Result<ReloadOutcome, ReloadError> {
        let hook = self.hook.get().cloned();
        if let Some(hook) = &hook {
            hook(ReloadStage::Begin);
        }
        let result = self.reload_now().await;
        match &result {
            Ok(outcome) => info!(
                path = %outcome.path.display(),
                started = outcome.started.len(),
                stopped = outcome.stopped.len(),
                unchanged = outcome.unchanged,
                "config reloaded: {} listeners started, {} stopped, {} unchanged{}",
                outcome.started.len(),
                outcome.stopped.len(),
                outcome.unchanged,
                match outcome.restart_needed.as_slice() {
                    [] => String::new(),
                    keys => format!("; changed, and in force at the next start only: {}", keys.join(", ")),
                }
            ),
            Err(e) => warn!(error = %e, "config reload refused: {e}"),
        }
        if let Some(hook) = &hook {
            hook(ReloadStage::End);
        }
        result
    }

    async fn reload_now(&self) -> Result<ReloadOutcome, ReloadError> {
        let path = self.path.clone().ok_or(ReloadError::NoFile)?;
        let mut running = self.running.lock().await;
        // The credential files first, on their own: a token revoked or a
        // certificate renewed takes effect even when the config file
        // cannot be applied.
        let reread = self.reread_credentials()?;
        match self.apply_file(path, &mut running).await {
            Ok(outcome) => Ok(ReloadOutcome { reread, ..outcome }),
            Err(ReloadError::Invalid(why)) if !reread.is_empty() => {
                Err(ReloadError::Invalid(format!("{why} ({} read again and in force)", reread.join(", "))))
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the config file and applies the difference in listeners.
    async fn apply_file(&self, path: PathBuf, running: &mut Vec<Running>) -> Result<ReloadOutcome, ReloadError> {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ReloadError::Invalid(format!("cannot read {}: {e}", path.display())))?;
        let config = Config::from_text(&text, &path).map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let wanted = self.specs(&config).await?;
        let settings = settings_of(&text);
        let mut restart_needed: Vec<String> = settings
            .iter()
            .filter(|(key, value)| self.in_force.get(*key) != Some(value))
            .map(|(key, _)| key.clone())
            .chain(self.in_force.keys().filter(|key| !settings.contains_key(*key)).cloned())
            .collect();
        restart_needed.sort();

        // Each running listener the file still has, as it is, stays.
        let mut unmatched: Vec<ListenerSpec> = Vec::new();
        let mut keep = vec![false; running.len()];
        for spec in wanted {
            match running.iter().enumerate().position(|(i, r)| !keep[i] && r.spec == spec) {
                Some(i) => keep[i] = true,
                None => unmatched.push(spec),
            }
        }
        let unchanged = keep.iter().filter(|&&k| k).count();
        let (kept, gone): (Vec<_>, Vec<_>) = running.drain(..).zip(keep).partition(|(_, k)| *k);
        let (kept, gone): (Vec<Running>, Vec<Running>) =
            (kept.into_iter().map(|(r, _)| r).collect(), gone.into_iter().map(|(r, _)| r).collect());
        *running = kept;

        // Stopped first, so that a changed listener can bind its address
        // again.
        let (mut stopped, mut stopped_running) = (Vec::new(), Vec::new());
        for old in gone {
            match self.engine.request(|reply| Command::StopListener { id: old.id, close_channels: false, reply }).await
            {
                Ok(info) => {
                    stopped.push(info);
                    stopped_running.push(old);
                }
                // Stopped through the API meanwhile: nothing to stop.
                Err(CommandError::NoListener(_) | CommandError::ListenerStopped(_)) => {}
                Err(e) => return Err(ReloadError::Unavailable(e)),
            }
        }
        let mut started: Vec<(ListenerSpec, ListenerInfo)> = Vec::new();
        for spec in unmatched {
            let (address, plugin, config) = (spec.address, spec.plugin.clone(), spec.config.clone());
            match self.engine.request(|reply| Command::StartListener { address, plugin, config, reply }).await {
                Ok(info) => started.push((spec, info)),
                Err(e) => {
                    let message = format!("{spec}: {e}");
                    self.roll_back(running, &stopped_running, &started).await;
                    return Err(match e {
                        CommandError::Draining | CommandError::LoopGone => ReloadError::Unavailable(e),
                        _ => ReloadError::Invalid(message),
                    });
                }
            }
        }
        for (spec, info) in &started {
            running.push(Running { spec: spec.clone(), id: info.id, bound: info.address });
        }
        if let Some(store) = &self.state
            && !(started.is_empty() && stopped.is_empty())
        {
            for (spec, info) in &started {
                store.declare(info.id, spec.declared.clone()).await;
            }
            if let Err(e) = store.save(&self.engine).await {
                tracing::error!(error = %e, "cannot save the runtime state after a config reload");
            }
        }
        Ok(ReloadOutcome {
            path,
            started: started.into_iter().map(|(_, info)| info).collect(),
            stopped,
            unchanged,
            restart_needed,
            reread: Vec::new(),
        })
    }

    /// Reads the credential files again and, when every one loads, puts
    /// them all in force. Returns them, each as `setting path`.
    fn reread_credentials(&self) -> Result<Vec<String>, ReloadError> {
        let refused = |e: anyhow::Error| ReloadError::Credentials(format!("{e:#}"));
        let Credentials { auth, tls } = &self.credentials;
        let fresh_tokens = auth.as_ref().map(|auth| auth.reread()).transpose().map_err(refused)?.flatten();
        let fresh_tls = tls.as_ref().map(Tls::reread).transpose().map_err(refused)?;
        let mut reread = Vec::new();
        if let (Some(auth), Some(fresh)) = (auth, fresh_tokens) {
            let (file, n) = auth.replace(fresh);
            info!(file = %file.display(), tokens = n, "token file read again: its {n} tokens are in force");
            reread.push(format!("token_file {}", file.display()));
        }
        if let (Some(tls), Some(fresh)) = (tls, fresh_tls) {
            let cert = tls.replace(fresh);
            info!(cert = %cert.display(), "TLS files read again: new handshakes use them");
            reread.push(format!("tls_cert {}", cert.display()));
        }
        Ok(reread)
    }

    /// The file's listeners, checked against what runs: addresses that
    /// parse, and plugins that are loaded.
    async fn specs(&self, config: &Config) -> Result<Vec<ListenerSpec>, ReloadError> {
        let plugins: Vec<PluginInfo> =
            self.engine.request(|reply| Command::ListPlugins { reply }).await.map_err(ReloadError::Unavailable)?;
        config
            .listeners
            .iter()
            .map(|listener| {
                let name = || format!("listener {} ({})", excerpt(&listener.address), excerpt(&listener.plugin));
                let address = listener
                    .address
                    .parse()
                    .map_err(|_| ReloadError::Invalid(format!("{}: expected ip:port", name())))?;
                if !plugins.iter().any(|p| p.name == listener.plugin && p.current_generation != 0) {
                    return Err(ReloadError::Invalid(format!("{}: no plugin of that name is loaded", name())));
                }
                Ok(ListenerSpec {
                    address,
                    declared: listener.address.clone(),
                    plugin: listener.plugin.clone(),
                    config: listener.config.clone(),
                })
            })
            .collect()
    }

    /// Undoes a reload that failed half-way: stops what it started, and
    /// starts what it stopped again where it was bound.
    async fn roll_back(&self, running: &mut Vec<Running>, gone: &[Running], started: &[(ListenerSpec, ListenerInfo)]) {
        for (_, info) in started {
            let id = info.id;
            let _ = self.engine.request(|reply| Command::StopListener { id, close_channels: false, reply }).await;
        }
        for old in gone {
            let (address, plugin, config) = (old.bound, old.spec.plugin.clone(), old.spec.config.clone());
            match self.engine.request(|reply| Command::StartListener { address, plugin, config, reply }).await {
                Ok(info) => running.push(Running { spec: old.spec.clone(), id: info.id, bound: info.address }),
                Err(e) => warn!(error = %e, "config reload: cannot start {} again: {e}", old.spec),
            }
        }
    }
}

/// A config file's settings but its listeners, as written: what a reload
/// compares with the file the daemon started with. (A file that does not
/// parse has none; a reload refuses it before comparing.)
fn settings_of(text: &str) -> toml::Table {
    let mut settings: toml::Table = text.parse().unwrap_or_default();
    settings.remove("listener");
    settings
}
