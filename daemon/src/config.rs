//! Daemon configuration: a TOML file, overridden by command-line flags.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// The default control address: loopback only.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:50051";

/// Everything the daemon needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the gRPC control API.
    #[serde(default = "default_control")]
    pub control: SocketAddr,
    /// Directories whose plugin libraries (`*.so`) are loaded at start.
    #[serde(default)]
    pub plugin_dirs: Vec<PathBuf>,
    /// Listeners started at boot.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Let `LoadPlugin` load libraries from any path, not only from the
    /// plugin directories.
    #[serde(default)]
    pub allow_any_plugin_path: bool,
    /// Reload a plugin when its library in a plugin directory changes.
    #[serde(default)]
    pub watch: bool,
    /// Seconds a SIGTERM drain waits for channels to close before closing
    /// the rest.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: u64,
}

/// A listener declared in the config file (`[[listener]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: String,
    pub plugin: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn default_control() -> SocketAddr {
    DEFAULT_CONTROL.parse().expect("valid default")
}

fn default_drain_timeout() -> u64 {
    30
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
}

impl Config {
    /// What the daemon runs with no config file: the control API on
    /// loopback, the plugins built next to the binary, and the echo plugin
    /// on 127.0.0.1:7007.
    pub fn builtin_default() -> Config {
        Config {
            control: default_control(),
            plugin_dirs: default_plugin_dir().into_iter().collect(),
            listeners: vec![ListenerConfig {
                address: "127.0.0.1:7007".to_string(),
                plugin: "echo".to_string(),
                config: BTreeMap::new(),
            }],
            allow_any_plugin_path: false,
            watch: false,
            drain_timeout_secs: default_drain_timeout(),
        }
    }

    /// Reads a TOML config file. Relative plugin directories are taken
    /// relative to the file's directory.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config: Config =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for dir in &mut config.plugin_dirs {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        if config.plugin_dirs.is_empty() {
            config.plugin_dirs.extend(default_plugin_dir());
        }
        Ok(config)
    }
}

pub use asyncore_engine::parse_duration;

/// Where the workspace build puts plugin libraries: next to the daemon's own
/// binary (`target/debug` or `target/release`).
pub fn default_plugin_dir() -> Option<PathBuf> {
    std::env::current_exe().ok()?.parent().map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_listeners_and_defaults() {
        let config: Config = toml::from_str(
            r#"
            control = "127.0.0.1:0"
            [[listener]]
            address = "127.0.0.1:8080"
            plugin = "echo"
            config = { high_water = "1024" }
            "#,
        )
        .unwrap();
        assert_eq!(config.control.port(), 0);
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(config.listeners[0].config["high_water"], "1024");
        assert_eq!(config.drain_timeout_secs, 30);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = toml::from_str::<Config>("contrl = \"x\"").unwrap_err();
        assert!(error.to_string().contains("contrl"), "{error}");
    }
}
