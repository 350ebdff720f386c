//! Daemon configuration: a TOML file, overridden by command-line flags;
//! and the limits of every duration and size the daemon reads, from the
//! file or from a control request, checked before anything reaches the
//! poll loop.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// The default control address: loopback only.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:50051";

/// The default address of the HTTP API: loopback only.
pub const DEFAULT_HTTP: &str = "127.0.0.1:50052";

/// Everything the daemon needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the gRPC control API.
    #[serde(default = "default_control")]
    pub control: SocketAddr,
    /// Address of the HTTP/JSON API, `/metrics` and the health checks;
    /// `None` (`http = "none"`) serves no HTTP.
    #[serde(default = "default_http", deserialize_with = "deserialize_http")]
    pub http: Option<SocketAddr>,
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
    /// the rest (at most a week).
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: u64,
    /// `WatchStats` streams served at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_stats_watchers")]
    pub max_stats_watchers: usize,
    /// The shortest `WatchStats` interval a client may ask for, in
    /// milliseconds.
    #[serde(default = "default_min_stats_interval")]
    pub min_stats_interval_ms: u64,
    /// A plugin callback that runs longer than this many milliseconds is
    /// slow: it held up every other channel, and is logged and counted
    /// (`LoopStats::slow_callbacks`).
    #[serde(default = "default_slow_callback_ms")]
    pub slow_callback_ms: u64,
    /// Connections open at once over every listener (0: no limit; at most
    /// 1,000,000); past it a new connection is accepted and closed at once,
    /// and counted. `SetDaemonLimits` changes it on a running daemon.
    #[serde(default)]
    pub max_connections: u64,
    /// How log lines are written to stderr (`--log-format` wins).
    #[serde(default)]
    pub log_format: LogFormat,
    /// Where the runtime state is saved after every change made through
    /// the API, and restored from at start (`--state-dir` wins); `None`
    /// keeps nothing across restarts. A relative path is taken relative to
    /// the config file's directory.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Bearer tokens of the control plane, one a line `name level secret`
    /// (`read` or `admin`); with them every gRPC and HTTP call but the
    /// health checks needs one (`--token-file` wins). Required to serve
    /// the control or HTTP API on an address that is not loopback. A
    /// relative path is taken relative to the config file's directory.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// With a token file, serve `/metrics` without a token
    /// (`--metrics-public`).
    #[serde(default)]
    pub metrics_public: bool,
    /// Serve the control API on this Unix socket instead of `control`
    /// (`--control unix:PATH`): created with mode 0600 in a directory of
    /// mode 0700 (made if missing). A relative path is taken relative to
    /// the config file's directory.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Serve the HTTP API on this Unix socket instead of `http`
    /// (`--http unix:PATH`), as `control_socket`.
    #[serde(default)]
    pub http_socket: Option<PathBuf>,
    /// Serve the control and HTTP APIs on TCP over TLS with this PEM
    /// certificate chain (`--tls-cert`), with `tls_key`. With TLS, an
    /// address that is not loopback may be served without a token file.
    /// A relative path is taken relative to the config file's directory.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `tls_cert` (`--tls-key`).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS (`--client-ca`): clients present a certificate this PEM
    /// CA signed, which makes them admin. Required in the handshake unless
    /// a token file is configured too (then a client without one is
    /// checked by its token). Needs `tls_cert`.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// The file it was read from ([`Config::from_file`]), which a config
    /// reload (SIGHUP) reads again; `None` for the built-in default.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// How the daemon writes its log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Lines for people: time, level, target, message and fields (in
    /// colour only when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log shippers: `timestamp`, `level`,
    /// `target`, `fields` (with `message`), and the thread's name.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = InvalidConfig;

    fn from_str(text: &str) -> Result<LogFormat, InvalidConfig> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(InvalidConfig(format!("log format {:?}: expected text or json", excerpt(text)))),
        }
    }
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

fn default_http() -> Option<SocketAddr> {
    Some(DEFAULT_HTTP.parse().expect("valid default"))
}

/// `--http` and the `http` key: `ip:port`, or `none` for no HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSetting(pub Option<SocketAddr>);

impl std::str::FromStr for HttpSetting {
    type Err = InvalidConfig;

    fn from_str(text: &str) -> Result<HttpSetting, InvalidConfig> {
        if text == "none" {
            return Ok(HttpSetting(None));
        }
        text.parse().map(|address| HttpSetting(Some(address))).map_err(|_| {
            InvalidConfig(format!("http {:?}: expected ip:port (such as {DEFAULT_HTTP}) or none", excerpt(text)))
        })
    }
}

/// `--control` and `--http`: `ip:port`, `unix:PATH`, or (`--http` only)
/// `none`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenFlag {
    /// `ip:port`.
    Tcp(SocketAddr),
    /// `unix:PATH`: a Unix socket.
    Unix(PathBuf),
    /// `none`.
    None,
}

impl std::str::FromStr for ListenFlag {
    type Err = InvalidConfig;

    fn from_str(text: &str) -> Result<ListenFlag, InvalidConfig> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(InvalidConfig("unix: needs a path, such as unix:/run/asyncored/control.sock".to_owned()));
            }
            return Ok(ListenFlag::Unix(PathBuf::from(path)));
        }
        if text == "none" {
            return Ok(ListenFlag::None);
        }
        text.parse().map(ListenFlag::Tcp).map_err(|_| {
            InvalidConfig(format!("{:?}: expected ip:port, unix:PATH, or (for --http) none", excerpt(text)))
        })
    }
}

fn deserialize_http<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse::<HttpSetting>().map(|HttpSetting(address)| address).map_err(serde::de::Error::custom)
}

fn default_drain_timeout() -> u64 {
    30
}

fn default_max_stats_watchers() -> usize {
    64
}

fn default_min_stats_interval() -> u64 {
    10
}

fn default_slow_callback_ms() -> u64 {
    10
}

/// The longest `slow_callback_ms`: a minute.
pub const MAX_SLOW_CALLBACK_MS: u64 = 60_000;

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("config {path}: {source}")]
    Invalid { path: PathBuf, source: InvalidConfig },
}

/// A value of the configuration out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidConfig(pub String);

/// The longest drain: of a SIGTERM (`drain_timeout_secs`), and of the older
/// generations after a reload or an activation (`drain_timeout_ms`). A week
/// is already far more than any drain needs; a longer one is a mistake
/// (a deadline that overflows the clock was one).
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The shortest and the longest `idle_timeout` of a listener.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_millis(1);
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(168 * 3600);

/// The longest `WatchStats` interval: an hour.
pub const MAX_STATS_INTERVAL: Duration = Duration::from_secs(3600);

/// A listener's configuration: at most this many entries...
pub const MAX_CONFIG_ENTRIES: usize = 64;
/// ... with keys of 1 to this many bytes ...
pub const MAX_CONFIG_KEY: usize = 128;
/// ... values of at most this many bytes (a path fits) ...
pub const MAX_CONFIG_VALUE: usize = 4096;
/// ... and this many bytes of keys and values in all, so that a page of
/// `ListListeners` stays under the 4 MiB that clients such as grpcurl
/// accept.
pub const MAX_CONFIG_TOTAL: usize = 16 * 1024;

/// How much of a request's text an error message repeats.
pub const MAX_ECHO_CHARS: usize = 200;

/// `text` as an error message may repeat it: at most [`MAX_ECHO_CHARS`]
/// characters, the cut marked with an ellipsis. A 100 KB name echoed in
/// full makes the answer's metadata exceed what gRPC clients accept, and
/// the client then sees a transport error instead of the answer.
pub fn excerpt(text: &str) -> Cow<'_, str> {
    match text.char_indices().nth(MAX_ECHO_CHARS) {
        None => Cow::Borrowed(text),
        Some((cut, _)) => Cow::Owned(format!("{}…", &text[..cut])),
    }
}

/// Checks the configuration of a listener: its size (entries, keys,
/// values, in all), and the entries the daemon reads itself
/// (`idle_timeout`, `max_connections`).
///
/// # Errors
///
/// [`InvalidConfig`] naming the key and the allowed range.
pub fn check_listener_config<'a>(
    config: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), InvalidConfig> {
    let mut entries = 0;
    let mut total = 0;
    for (key, value) in config {
        entries += 1;
        total += key.len() + value.len();
        if key.is_empty() {
            return Err(InvalidConfig("listener config: a key is empty; keys have 1 to 128 bytes".into()));
        }
        if key.len() > MAX_CONFIG_KEY {
            return Err(InvalidConfig(format!(
                "listener config: key {:?} is {} bytes; a key has 1 to {MAX_CONFIG_KEY} bytes",
                excerpt(key),
                key.len()
            )));
        }
        if value.len() > MAX_CONFIG_VALUE {
            return Err(InvalidConfig(format!(
                "listener config {}: the value is {} bytes; at most {MAX_CONFIG_VALUE} bytes are allowed",
                excerpt(key),
                value.len()
            )));
        }
        if key == "idle_timeout" {
            idle_timeout(value)?;
        }
        if key == "max_connections" {
            asyncore_engine::command::parse_max_connections(value)
                .map_err(|message| InvalidConfig(format!("listener config max_connections: {}", excerpt(&message))))?;
        }
    }
    if entries > MAX_CONFIG_ENTRIES {
        return Err(InvalidConfig(format!(
            "listener config has {entries} entries; at most {MAX_CONFIG_ENTRIES} entries are allowed"
        )));
    }
    if total > MAX_CONFIG_TOTAL {
        return Err(InvalidConfig(format!(
            "listener config has {total} bytes of keys and values; at most {MAX_CONFIG_TOTAL} bytes are allowed"
        )));
    }
    Ok(())
}

/// Parses a listener's `idle_timeout`, from [`MIN_IDLE_TIMEOUT`] to
/// [`MAX_IDLE_TIMEOUT`].
///
/// # Errors
///
/// [`InvalidConfig`] naming the key and the range.
pub fn idle_timeout(text: &str) -> Result<Duration, InvalidConfig> {
    parse_duration(text).filter(|d| (MIN_IDLE_TIMEOUT..=MAX_IDLE_TIMEOUT).contains(d)).ok_or_else(|| {
        InvalidConfig(format!(
            "listener config idle_timeout: {:?} is not a duration from 1ms to 168h (such as 30s, 500ms, 2m or 1h)",
            excerpt(text)
        ))
    })
}

/// Limits of `WatchStats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsLimits {
    /// Streams served at once.
    pub max_watchers: usize,
    /// The shortest interval a stream may ask for.
    pub min_interval: Duration,
}

impl Default for StatsLimits {
    fn default() -> Self {
        StatsLimits {
            max_watchers: default_max_stats_watchers(),
            min_interval: Duration::from_millis(default_min_stats_interval()),
        }
    }
}

impl Config {
    /// What the daemon runs with no config file: the control API and the
    /// HTTP API on loopback, the plugins built next to the binary, and the echo plugin
    /// on 127.0.0.1:7007.
    pub fn builtin_default() -> Config {
        Config {
            control: default_control(),
            http: default_http(),
            plugin_dirs: default_plugin_dir().into_iter().collect(),
            listeners: vec![ListenerConfig {
                address: "127.0.0.1:7007".to_string(),
                plugin: "echo".to_string(),
                config: BTreeMap::new(),
            }],
            allow_any_plugin_path: false,
            watch: false,
            drain_timeout_secs: default_drain_timeout(),
            max_stats_watchers: default_max_stats_watchers(),
            min_stats_interval_ms: default_min_stats_interval(),
            slow_callback_ms: default_slow_callback_ms(),
            max_connections: 0,
            log_format: LogFormat::default(),
            state_dir: None,
            token_file: None,
            metrics_public: false,
            control_socket: None,
            http_socket: None,
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            source: None,
        }
    }

    /// Checks every duration and size against its range: the drain
    /// timeout, the `WatchStats` limits, and each boot listener's config.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] naming the key and the allowed range.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.drain_timeout_secs > MAX_DRAIN_TIMEOUT.as_secs() {
            return Err(InvalidConfig(format!(
                "drain_timeout_secs {} is out of range: 0 to {} (7 days)",
                self.drain_timeout_secs,
                MAX_DRAIN_TIMEOUT.as_secs()
            )));
        }
        if self.max_stats_watchers == 0 {
            return Err(InvalidConfig("max_stats_watchers must be at least 1".into()));
        }
        let max_interval_ms = MAX_STATS_INTERVAL.as_millis() as u64;
        if !(1..=max_interval_ms).contains(&self.min_stats_interval_ms) {
            return Err(InvalidConfig(format!(
                "min_stats_interval_ms {} is out of range: 1 to {max_interval_ms}",
                self.min_stats_interval_ms
            )));
        }
        if !(1..=MAX_SLOW_CALLBACK_MS).contains(&self.slow_callback_ms) {
            return Err(InvalidConfig(format!(
                "slow_callback_ms {} is out of range: 1 to {MAX_SLOW_CALLBACK_MS}",
                self.slow_callback_ms
            )));
        }
        asyncore_engine::command::max_connections(self.max_connections).map_err(InvalidConfig)?;
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err(InvalidConfig("tls_cert needs tls_key (--tls-key), its private key".into())),
            (None, Some(_)) => return Err(InvalidConfig("tls_key needs tls_cert (--tls-cert)".into())),
            _ => {}
        }
        if self.client_ca.is_some() && self.tls_cert.is_none() {
            return Err(InvalidConfig(
                "client_ca (--client-ca) needs TLS: set tls_cert and tls_key (--tls-cert, --tls-key)".into(),
            ));
        }
        for listener in &self.listeners {
            check_listener_config(&listener.config).map_err(|InvalidConfig(message)| {
                InvalidConfig(format!(
                    "listener {} ({}): {message}",
                    excerpt(&listener.address),
                    excerpt(&listener.plugin)
                ))
            })?;
        }
        Ok(())
    }

    /// How long a plugin callback may run before it is slow.
    pub fn slow_callback(&self) -> Duration {
        Duration::from_millis(self.slow_callback_ms)
    }

    /// The `WatchStats` limits it sets.
    pub fn stats_limits(&self) -> StatsLimits {
        StatsLimits {
            max_watchers: self.max_stats_watchers,
            min_interval: Duration::from_millis(self.min_stats_interval_ms),
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
        Config::from_text(&text, path)
    }

    /// [`Config::from_file`] of the file `path` read as `text`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file.
    pub fn from_text(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for dir in &mut config.plugin_dirs {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        if config.plugin_dirs.is_empty() {
            config.plugin_dirs.extend(default_plugin_dir());
        }
        if let Some(dir) = &mut config.state_dir
            && dir.is_relative()
        {
            *dir = base.join(&*dir);
        }
        for file in [
            &mut config.token_file,
            &mut config.control_socket,
            &mut config.http_socket,
            &mut config.tls_cert,
            &mut config.tls_key,
            &mut config.client_ca,
        ] {
            if let Some(file) = file
                && file.is_relative()
            {
                *file = base.join(&*file);
            }
        }
        config.validate().map_err(|source| ConfigError::Invalid { path: path.to_owned(), source })?;
        config.source = Some(path.to_owned());
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
        assert_eq!(config.http, Some(DEFAULT_HTTP.parse().unwrap()));
    }

    #[test]
    fn the_daemons_max_connections_is_checked() {
        let config = |text: &str| toml::from_str::<Config>(text).unwrap();
        assert_eq!(config("").max_connections, 0, "no limit by default");
        assert!(config("max_connections = 1000000").validate().is_ok());
        let refused = config("max_connections = 1000001").validate().unwrap_err().to_string();
        assert!(refused.contains("max_connections 1000001 is out of range: 0 (no limit) or 1 to 1000000"), "{refused}");
    }

    #[test]
    fn tls_keys_go_together() {
        let refused = |text: &str| toml::from_str::<Config>(text).unwrap().validate().unwrap_err().to_string();
        assert!(refused("tls_cert = \"c.pem\"").contains("needs tls_key"));
        assert!(refused("tls_key = \"k.pem\"").contains("needs tls_cert"));
        assert!(refused("client_ca = \"ca.pem\"").contains("needs TLS"));
        let both = toml::from_str::<Config>("tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nclient_ca = \"ca.pem\"");
        assert!(both.unwrap().validate().is_ok());
    }

    #[test]
    fn http_is_an_address_or_none() {
        let http = |text: &str| toml::from_str::<Config>(text).map(|c| c.http).map_err(|e| e.to_string());
        assert_eq!(http("http = \"none\""), Ok(None));
        assert_eq!(http("http = \"127.0.0.1:0\""), Ok(Some("127.0.0.1:0".parse().unwrap())));
        let refused = http("http = \"localhost\"").unwrap_err();
        assert!(refused.contains("ip:port") && refused.contains("none"), "{refused}");
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_key() {
        let refused = |text: &str| toml::from_str::<Config>(text).unwrap().validate().unwrap_err().to_string();
        assert!(refused("drain_timeout_secs = 18446744073709551615").contains("drain_timeout_secs"));
        assert!(refused("max_stats_watchers = 0").contains("max_stats_watchers"));
        assert!(refused("min_stats_interval_ms = 0").contains("min_stats_interval_ms"));
        assert!(refused("slow_callback_ms = 0").contains("slow_callback_ms"));
        assert!(refused("slow_callback_ms = 60001").contains("slow_callback_ms"));
        let listener = r#"
            [[listener]]
            address = "127.0.0.1:0"
            plugin = "echo"
            config = { idle_timeout = "10000000000000000000" }
        "#;
        let message = refused(listener);
        assert!(message.contains("idle_timeout") && message.contains("168h"), "{message}");
        assert_eq!(toml::from_str::<Config>("drain_timeout_secs = 604800").unwrap().validate(), Ok(()));
    }

    #[test]
    fn listener_configs_are_bounded() {
        let config = |pairs: Vec<(String, String)>| pairs.into_iter().collect::<BTreeMap<_, _>>();
        assert!(check_listener_config(&config(vec![("a".into(), "v".repeat(4096))])).is_ok());
        let message = check_listener_config(&config(vec![("motd".into(), "v".repeat(4097))])).unwrap_err().0;
        assert!(message.contains("motd") && message.contains("4096"), "{message}");
        let message = check_listener_config(&config(vec![("k".repeat(500), "1".into())])).unwrap_err().0;
        assert!(message.contains("128") && message.len() < 400, "{message}");
        let many = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(check_listener_config(&config(many)).unwrap_err().0.contains("64 entries"));
        let wide = (0..5).map(|i| (format!("k{i}"), "v".repeat(4000))).collect();
        assert!(check_listener_config(&config(wide)).unwrap_err().0.contains("16384 bytes"));
        for good in ["1ms", "30s", "168h", "0.5"] {
            assert!(idle_timeout(good).is_ok(), "{good}");
        }
        for bad in ["0", "0ms", "169h", "1e30", "10000000000000000000", "soon"] {
            assert!(idle_timeout(bad).is_err(), "{bad}");
        }
        for good in ["0", "1", "1000000"] {
            assert!(check_listener_config(&config(vec![("max_connections".into(), good.into())])).is_ok(), "{good}");
        }
        for bad in ["-1", "1000001", "lots"] {
            let message = check_listener_config(&config(vec![("max_connections".into(), bad.into())])).unwrap_err().0;
            assert!(message.contains("max_connections") && message.contains("1 to 1000000"), "{message}");
        }
    }

    #[test]
    fn excerpts_cut_long_text_on_a_character() {
        assert_eq!(excerpt("short"), "short");
        let long = "é".repeat(1000);
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), MAX_ECHO_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn log_format_and_slow_callback_have_defaults() {
        let config: Config = toml::from_str("").unwrap();
        assert_eq!((config.log_format, config.slow_callback_ms), (LogFormat::Text, 10));
        let config: Config = toml::from_str("log_format = \"json\"\nslow_callback_ms = 50").unwrap();
        assert_eq!((config.log_format, config.slow_callback()), (LogFormat::Json, Duration::from_millis(50)));
        assert!(toml::from_str::<Config>("log_format = \"xml\"").is_err());
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("JSON".parse::<LogFormat>().unwrap_err().0.contains("text or json"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = toml::from_str::<Config>("contrl = \"x\"").unwrap_err();
        assert!(error.to_string().contains("contrl"), "{error}");
    }
}
