//! The gRPC control API (package `asyncore.v1`), served with tonic, plus
//! health and reflection.
//!
//! This is the only place that sees protobuf types (with the CLI): requests
//! are validated and turned into engine [`Command`]s here (every duration
//! and size against its range, see [`crate::config`]), answers converted
//! back in [`convert`], and every [`CommandError`] mapped to one status code
//! in [`status`]. `WatchStats` streams share their snapshots in
//! [`stats_feed`]; the accept loop keeps a descriptor in reserve in
//! [`incoming`].

mod convert;
pub(crate) mod incoming;
mod stats_feed;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use asyncore_proto::v1::{
    self, channels_server::ChannelsServer, daemon_server::DaemonServer, listeners_server::ListenersServer,
    plugins_server::PluginsServer,
};
use tonic::{Request, Response, Status, server::NamedService};
use tonic_health::{ServingStatus, server::HealthReporter};

use asyncore_engine::{
    command::{self, Command, CommandError, EngineHandle, LoadPlugin},
    plugin_host::{PluginLoadError, PluginPolicy},
};

use self::stats_feed::{StatsFeeds, StatsStream};
use crate::{
    auth,
    config::{self, MAX_DRAIN_TIMEOUT, MAX_STATS_INTERVAL, StatsLimits, excerpt},
    lifecycle::{Lifecycle, Phase},
    state::StateStore,
};

pub(crate) use self::incoming::{ControlStream, Incoming};

/// Default and largest page of `ListChannels`: grpcurl refuses replies over
/// 4 MiB.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

/// Default and largest page of `ListListeners`: 200 listeners with the
/// largest config allowed ([`config::MAX_CONFIG_TOTAL`]) stay under 4 MiB.
const DEFAULT_LISTENER_PAGE: usize = 100;
const MAX_LISTENER_PAGE: usize = 200;

/// Default and largest page of `ListPlugins`, and the bytes a page stops
/// short of. One plugin's entry is cut to fit them ([`fit_plugin`]), so a
/// page always holds one.
const DEFAULT_PLUGIN_PAGE: usize = 100;
const MAX_PLUGIN_PAGE: usize = 200;
const PLUGIN_PAGE_BYTES: usize = 3 << 20;

/// The most channels one `WatchStats` stream may name.
const MAX_WATCHED_CHANNELS: usize = 10_000;

/// The longest status message: what an engine error says beyond the
/// request fields it repeats (each cut to [`config::MAX_ECHO_CHARS`]), such
/// as a path and the loader's explanation.
const MAX_MESSAGE_CHARS: usize = 1000;

/// The services of the control API, sharing one engine handle.
#[derive(Debug, Clone)]
pub struct ControlApi {
    engine: EngineHandle,
    lifecycle: Lifecycle,
    policy: PluginPolicy,
    stats_limits: StatsLimits,
    stats: Arc<StatsFeeds>,
    /// When the API was made, as the daemon starts: `GetDaemonInfo`'s
    /// start time (the wall clock) and uptime (the monotonic one).
    started: (SystemTime, Instant),
    /// Where changes are saved (`--state-dir`), if anywhere.
    state: Option<Arc<StateStore>>,
    /// Re-reads the config file (`ReloadConfig`); `None` in an API made
    /// without a daemon.
    config_reload: Option<Arc<crate::ConfigReload>>,
}

impl ControlApi {
    /// The API over an engine; `policy` says which plugin paths may be
    /// loaded. `WatchStats` gets the default [`StatsLimits`].
    pub fn new(engine: EngineHandle, lifecycle: Lifecycle, policy: PluginPolicy) -> ControlApi {
        let stats_limits = StatsLimits::default();
        let stats = Arc::new(StatsFeeds::new(engine.clone(), stats_limits.max_watchers));
        let started = (SystemTime::now(), Instant::now());
        ControlApi { engine, lifecycle, policy, stats_limits, stats, started, state: None, config_reload: None }
    }

    /// The same API, answering `ReloadConfig` with `reload`.
    pub fn with_config_reload(self, reload: Arc<crate::ConfigReload>) -> ControlApi {
        ControlApi { config_reload: Some(reload), ..self }
    }

    /// The same API, saving the runtime state in `store` after every
    /// change ([`ControlApi::state_changed`]).
    pub fn with_state(self, store: Arc<StateStore>) -> ControlApi {
        ControlApi { state: Some(store), ..self }
    }

    /// Saves the runtime state (with `--state-dir`). Every handler that may
    /// have changed listeners or plugins calls it once its command has been
    /// answered, whatever the answer (a refused activation still adds a
    /// generation), and BEFORE it replies: an acknowledged change is on
    /// disk. Saves are serialized, and an unchanged state is not written
    /// again. A save that fails is logged; the change itself stands.
    pub(crate) async fn state_changed(&self) {
        let Some(store) = &self.state else { return };
        // A drain stops every listener without an API call: a save now
        // would record them as stopped, and the restart would bring none
        // back. What the daemon was running stays the saved state.
        if !matches!(self.lifecycle.get(), Phase::Starting | Phase::Running) {
            tracing::warn!("the daemon is draining: this change is not saved in the runtime state");
            return;
        }
        if let Err(e) = store.save(&self.engine).await {
            tracing::error!(error = %e, "cannot save the runtime state; a restart would not bring this change back");
        }
    }

    /// The same API with other `WatchStats` limits.
    pub fn with_stats_limits(self, limits: StatsLimits) -> ControlApi {
        let stats = Arc::new(StatsFeeds::new(self.engine.clone(), limits.max_watchers));
        ControlApi { stats_limits: limits, stats, ..self }
    }

    /// Serves the API, health and reflection on the connections of
    /// `incoming` (TCP, TLS over TCP, or a Unix socket) until `shutdown` completes; every
    /// call's token is checked by `auth`.
    ///
    /// # Errors
    ///
    /// If the server fails.
    pub(crate) async fn serve<IO>(
        self,
        incoming: impl tokio_stream::Stream<Item = std::io::Result<IO>> + Send + 'static,
        auth: Arc<crate::auth::Auth>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
        IO::ConnectInfo: Clone + Send + Sync + 'static,
    {
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        let health_follows_lifecycle = follow_lifecycle(health, self.lifecycle.clone());
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(asyncore_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the descriptor set compiled at build time is valid");
        // grpcurl speaks v1 first; evans and older tools only v1alpha.
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(asyncore_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("the descriptor set compiled at build time is valid");

        // A bound on what a client may make the server buffer, stated
        // rather than left to tonic's default: 4 MiB, grpcurl's receive
        // limit too (requests are far smaller; the daemon's own checks
        // refuse oversized fields with INVALID_ARGUMENT before this).
        const MAX_REQUEST: usize = 4 * 1024 * 1024;
        let server = tonic::transport::Server::builder()
            // Every call's token, and the audit line of every mutation.
            .layer(crate::auth::GrpcAuthLayer(auth))
            .add_service(ListenersServer::new(self.clone()).max_decoding_message_size(MAX_REQUEST))
            .add_service(ChannelsServer::new(self.clone()).max_decoding_message_size(MAX_REQUEST))
            .add_service(PluginsServer::new(self.clone()).max_decoding_message_size(MAX_REQUEST))
            .add_service(DaemonServer::new(self).max_decoding_message_size(MAX_REQUEST))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(incoming, shutdown);
        tokio::select! {
            served = server => served,
            never = health_follows_lifecycle => match never {},
        }
    }

    fn check_not_draining(&self) -> Result<(), Status> {
        match self.lifecycle.get() {
            Phase::Draining | Phase::Stopped => Err(Status::unavailable("the daemon is draining")),
            Phase::Failed => Err(Status::unavailable("the poll loop has died; the daemon must be restarted")),
            Phase::Starting | Phase::Running => Ok(()),
        }
    }
}

/// What health reports on: the server as a whole (`""`) and each service.
const HEALTH_SERVICES: [&str; 5] = [
    "",
    <ListenersServer<ControlApi> as NamedService>::NAME,
    <ChannelsServer<ControlApi> as NamedService>::NAME,
    <PluginsServer<ControlApi> as NamedService>::NAME,
    <DaemonServer<ControlApi> as NamedService>::NAME,
];

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in HEALTH_SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// Turns health to NOT_SERVING once the daemon stops serving: it drains, or
/// its poll loop died (then nothing can be served, and a supervisor
/// watching health restarts it). Then waits for ever: it ends with the
/// server.
async fn follow_lifecycle(health: HealthReporter, lifecycle: Lifecycle) -> std::convert::Infallible {
    let mut phase = lifecycle.subscribe();
    let _ = phase.wait_for(|p| matches!(p, Phase::Draining | Phase::Stopped | Phase::Failed)).await;
    set_health(&health, ServingStatus::NotServing).await;
    std::future::pending().await
}

/// The one mapping from engine errors to gRPC status codes. The message
/// repeats request fields (names, paths, a plugin's own words) only as
/// excerpts, and is itself bounded: a 100 KB name echoed in full makes the
/// answer's metadata exceed what gRPC clients accept, and the client sees
/// a transport error instead of NOT_FOUND.
pub(crate) fn status(error: CommandError) -> Status {
    let message = message(&error);
    match error {
        CommandError::NoListener(_) | CommandError::NoChannel(_) | CommandError::NoPlugin(_) => {
            Status::not_found(message)
        }
        CommandError::NoGeneration { .. } => Status::not_found(message),
        CommandError::AddressInUse { .. } => Status::already_exists(message),
        CommandError::GenerationRetired { .. }
        | CommandError::GenerationTaken { .. }
        | CommandError::PluginInUse { .. } => Status::failed_precondition(message),
        CommandError::WrongPlugin { .. } => Status::invalid_argument(message),
        CommandError::Bind { source, .. } => match source.kind() {
            std::io::ErrorKind::PermissionDenied => Status::permission_denied(message),
            std::io::ErrorKind::AddrNotAvailable => Status::invalid_argument(message),
            _ => Status::failed_precondition(message),
        },
        CommandError::PluginRefused { .. } | CommandError::BadConfig { .. } => Status::invalid_argument(message),
        CommandError::ListenerStopped(_) | CommandError::ListeningChannel { .. } => {
            Status::failed_precondition(message)
        }
        CommandError::PluginLoad(load) => match load {
            PluginLoadError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Status::not_found(message)
            }
            PluginLoadError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
                Status::permission_denied(message)
            }
            PluginLoadError::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidInput => {
                Status::invalid_argument(message)
            }
            PluginLoadError::OutsidePluginDirs { .. } => Status::permission_denied(message),
            _ => Status::failed_precondition(message),
        },
        CommandError::Draining | CommandError::LoopGone => Status::unavailable(message),
        CommandError::LoaderFailed(_) => Status::internal(message),
    }
}

/// The message of an engine error, with the fields that come from a
/// request or a plugin cut to excerpts, and the whole cut in the middle
/// (keeping its end, which says what went wrong) past
/// [`MAX_MESSAGE_CHARS`].
fn message(error: &CommandError) -> String {
    let short = |text: &str| excerpt(text).into_owned();
    let shortened = match error {
        CommandError::NoPlugin(name) => Some(CommandError::NoPlugin(short(name))),
        CommandError::BadConfig { key, message } => Some(CommandError::BadConfig { key, message: short(message) }),
        CommandError::PluginRefused { plugin, message } => {
            Some(CommandError::PluginRefused { plugin: short(plugin), message: short(message) })
        }
        CommandError::NoGeneration { name, generation } => {
            Some(CommandError::NoGeneration { name: short(name), generation: *generation })
        }
        CommandError::GenerationRetired { name, generation } => {
            Some(CommandError::GenerationRetired { name: short(name), generation: *generation })
        }
        CommandError::GenerationTaken { name, generation, newest } => {
            Some(CommandError::GenerationTaken { name: short(name), generation: *generation, newest: *newest })
        }
        CommandError::PluginInUse { name, users } => {
            Some(CommandError::PluginInUse { name: short(name), users: short(users) })
        }
        CommandError::WrongPlugin { path, found, expected } => {
            Some(CommandError::WrongPlugin { path: short(path), found: short(found), expected: short(expected) })
        }
        CommandError::LoaderFailed(message) => Some(CommandError::LoaderFailed(short(message))),
        _ => None,
    };
    let text = shortened.as_ref().unwrap_or(error).to_string();
    let n_chars = text.chars().count();
    if n_chars <= MAX_MESSAGE_CHARS {
        return text;
    }
    let head: String = text.chars().take(MAX_MESSAGE_CHARS * 2 / 3).collect();
    let tail: String = text.chars().skip(n_chars - MAX_MESSAGE_CHARS / 3).collect();
    format!("{head}…{tail}")
}

/// A drain timeout of a request: 0 is none, else at most
/// [`MAX_DRAIN_TIMEOUT`].
fn drain_timeout(ms: u64) -> Result<Option<Duration>, Status> {
    let max_ms = MAX_DRAIN_TIMEOUT.as_millis() as u64;
    match ms {
        0 => Ok(None),
        ms if ms <= max_ms => Ok(Some(Duration::from_millis(ms))),
        ms => Err(Status::invalid_argument(format!(
            "drain_timeout_ms {ms} is out of range: 0 (never) or 1 to {max_ms} (7 days)"
        ))),
    }
}

/// How many items a page holds: `page_size`, or `default` when it is 0,
/// and at most `max`.
fn page_limit(page_size: u32, default: usize, max: usize) -> usize {
    match page_size as usize {
        0 => default,
        n => n.min(max),
    }
}

/// Takes up to `limit` items from `items` whose sizes add up to at most
/// `budget` bytes (the first item is taken whatever its size). Says
/// whether items were left.
fn page_within<T>(
    items: impl IntoIterator<Item = T>,
    limit: usize,
    budget: usize,
    size: impl Fn(&T) -> usize,
) -> (Vec<T>, bool) {
    let mut items = items.into_iter().peekable();
    let (mut page, mut bytes) = (Vec::new(), 0usize);
    while let Some(item) = items.next_if(|item| {
        let fits = page.is_empty() || bytes.saturating_add(size(item)) <= budget;
        page.len() < limit && fits
    }) {
        bytes = bytes.saturating_add(size(&item));
        page.push(item);
    }
    (page, items.peek().is_some())
}

/// Makes one plugin's entry fit in `budget` bytes. Only a plugin reloaded
/// thousands of times while connections stay on its old generations (each
/// one then drains) can pass it: the metrics of its generations but the
/// current one go first, then its oldest generations but the current one,
/// counted in `generations_omitted`.
fn fit_plugin(mut plugin: v1::Plugin, budget: usize) -> v1::Plugin {
    use prost::Message as _;
    if plugin.encoded_len() <= budget {
        return plugin;
    }
    let current = plugin.current_generation;
    for generation in plugin.generations.iter_mut().filter(|g| g.generation != current) {
        generation.metrics.clear();
    }
    // A generation's share: its tag, its length and itself.
    let share = |generation: &v1::PluginGeneration| {
        let len = generation.encoded_len();
        1 + prost::length_delimiter_len(len) + len
    };
    let mut len = plugin.encoded_len();
    let mut kept = Vec::with_capacity(plugin.generations.len());
    // Oldest first: drop from the front until the rest fits.
    for generation in std::mem::take(&mut plugin.generations) {
        if len > budget && generation.generation != current {
            len -= share(&generation);
            plugin.generations_omitted += 1;
        } else {
            kept.push(generation);
        }
    }
    plugin.generations = kept;
    plugin
}

/// The position after which a page starts: a previous reply's
/// `next_page_token`, or the start.
fn page_start(token: &str) -> Result<u64, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    token.parse::<u64>().map_err(|_| {
        Status::invalid_argument(format!("invalid page_token {:?}: pass a previous next_page_token", excerpt(token)))
    })
}

/// Parses `host:port`. Names are resolved here, on the tokio side; the poll
/// loop only ever sees socket addresses.
async fn parse_address(text: &str) -> Result<SocketAddr, Status> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Status::invalid_argument("address is empty; expected host:port such as 127.0.0.1:7007"));
    }
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    let shown = excerpt(text);
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(Status::invalid_argument(format!("invalid address {shown:?}: expected host:port")));
    };
    match port.parse::<u64>() {
        Ok(p) if p > u64::from(u16::MAX) => {
            return Err(Status::invalid_argument(format!(
                "invalid address {shown:?}: port {p} is out of range (0-65535)"
            )));
        }
        Ok(_) => {}
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "invalid address {shown:?}: port {:?} is not a number",
                excerpt(port)
            )));
        }
    }
    if host.is_empty() {
        return Err(Status::invalid_argument(format!("invalid address {shown:?}: host is empty")));
    }
    match tokio::net::lookup_host(text).await {
        Ok(mut addresses) => addresses
            .next()
            .ok_or_else(|| Status::invalid_argument(format!("invalid address {shown:?}: host has no address"))),
        Err(e) => Err(Status::invalid_argument(format!("invalid address {shown:?}: {}", excerpt(&e.to_string())))),
    }
}

#[tonic::async_trait]
impl v1::listeners_server::Listeners for ControlApi {
    async fn start_listener(
        &self,
        request: Request<v1::StartListenerRequest>,
    ) -> Result<Response<v1::Listener>, Status> {
        auth::note_arguments(request.get_ref());
        self.check_not_draining()?;
        let request = request.into_inner();
        let address = parse_address(&request.address).await?;
        if request.plugin.is_empty() {
            return Err(Status::invalid_argument("plugin is empty; name a loaded plugin (see ListPlugins)"));
        }
        config::check_listener_config(&request.config).map_err(|e| Status::invalid_argument(e.0))?;
        let config: BTreeMap<String, String> = request.config.into_iter().collect();
        let listener = self
            .engine
            .request(|reply| Command::StartListener { address, plugin: request.plugin, config, reply })
            .await;
        self.state_changed().await;
        Ok(Response::new(convert::listener(listener.map_err(status)?)))
    }

    async fn stop_listener(&self, request: Request<v1::StopListenerRequest>) -> Result<Response<v1::Listener>, Status> {
        auth::note_arguments(request.get_ref());
        let v1::StopListenerRequest { id, close_channels, drain_timeout_ms } = request.into_inner();
        if let Some(drain_timeout_ms) = drain_timeout_ms {
            return self.drain_listener(Request::new(v1::DrainListenerRequest { id, drain_timeout_ms })).await;
        }
        let listener = self.engine.request(|reply| Command::StopListener { id, close_channels, reply }).await;
        self.state_changed().await;
        Ok(Response::new(convert::listener(listener.map_err(status)?)))
    }

    async fn list_listeners(
        &self,
        request: Request<v1::ListListenersRequest>,
    ) -> Result<Response<v1::ListListenersResponse>, Status> {
        let request = request.into_inner();
        let limit = page_limit(request.page_size, DEFAULT_LISTENER_PAGE, MAX_LISTENER_PAGE);
        let after = page_start(&request.page_token)?;
        let listeners =
            self.engine.request(|reply| Command::ListListeners { after, limit, reply }).await.map_err(status)?;
        let next_page_token = match listeners.last() {
            Some(last) if listeners.len() == limit => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(v1::ListListenersResponse {
            listeners: listeners.into_iter().map(convert::listener).collect(),
            next_page_token,
        }))
    }

    async fn suspend_listener(
        &self,
        request: Request<v1::SuspendListenerRequest>,
    ) -> Result<Response<v1::Listener>, Status> {
        auth::note_arguments(request.get_ref());
        let id = request.into_inner().id;
        let listener = self.engine.request(|reply| Command::SuspendListener { id, reply }).await;
        self.state_changed().await;
        Ok(Response::new(convert::listener(listener.map_err(status)?)))
    }

    async fn resume_listener(
        &self,
        request: Request<v1::ResumeListenerRequest>,
    ) -> Result<Response<v1::Listener>, Status> {
        auth::note_arguments(request.get_ref());
        let id = request.into_inner().id;
        let listener = self.engine.request(|reply| Command::ResumeListener { id, reply }).await;
        self.state_changed().await;
        Ok(Response::new(convert::listener(listener.map_err(status)?)))
    }

    async fn drain_listener(
        &self,
        request: Request<v1::DrainListenerRequest>,
    ) -> Result<Response<v1::Listener>, Status> {
        auth::note_arguments(request.get_ref());
        let v1::DrainListenerRequest { id, drain_timeout_ms } = request.into_inner();
        let timeout = listener_drain_timeout(drain_timeout_ms)?;
        let listener = self.engine.request(|reply| Command::DrainListener { id, timeout, reply }).await;
        self.state_changed().await;
        Ok(Response::new(convert::listener(listener.map_err(status)?)))
    }

    async fn set_listener_limits(
        &self,
        request: Request<v1::SetListenerLimitsRequest>,
    ) -> Result<Response<v1::Listener>, Status> {
        auth::note_arguments(request.get_ref());
        let v1::SetListenerLimitsRequest { id, max_connections } = request.into_inner();
        let max_connections = command::max_connections(max_connections).map_err(Status::invalid_argument)?;
        let listener = self.engine.request(|reply| Command::SetListenerLimits { id, max_connections, reply }).await;
        self.state_changed().await;
        Ok(Response::new(convert::listener(listener.map_err(status)?)))
    }

    async fn set_daemon_limits(
        &self,
        request: Request<v1::SetDaemonLimitsRequest>,
    ) -> Result<Response<v1::DaemonLimits>, Status> {
        auth::note_arguments(request.get_ref());
        let set = request
            .into_inner()
            .max_connections
            .map(command::max_connections)
            .transpose()
            .map_err(Status::invalid_argument)?;
        let changes = set.is_some();
        let limits = self.engine.request(|reply| Command::DaemonLimits { set, reply }).await.map_err(status)?;
        if changes {
            self.state_changed().await;
        }
        Ok(Response::new(v1::DaemonLimits {
            max_connections: limits.max_connections.unwrap_or(0),
            connections: limits.connections,
        }))
    }
}

/// The drain timeout of `DrainListener`: 1 ms to [`MAX_DRAIN_TIMEOUT`]. A
/// listener stopped without waiting is `StopListener`'s.
fn listener_drain_timeout(ms: u64) -> Result<Duration, Status> {
    let max_ms = MAX_DRAIN_TIMEOUT.as_millis() as u64;
    match ms {
        1.. if ms <= max_ms => Ok(Duration::from_millis(ms)),
        _ => Err(Status::invalid_argument(format!(
            "drain_timeout_ms {ms} is out of range: 1 to {max_ms} (7 days); StopListener stops without waiting"
        ))),
    }
}

#[tonic::async_trait]
impl v1::channels_server::Channels for ControlApi {
    async fn list_channels(
        &self,
        request: Request<v1::ListChannelsRequest>,
    ) -> Result<Response<v1::ListChannelsResponse>, Status> {
        let request = request.into_inner();
        let limit = page_limit(request.page_size, DEFAULT_PAGE, MAX_PAGE);
        let after = page_start(&request.page_token)?;
        let listener_id = request.listener_id;
        let channels = self
            .engine
            .request(|reply| Command::ListChannels { listener_id, after, limit, reply })
            .await
            .map_err(status)?;
        let next_page_token = match channels.last() {
            Some(last) if channels.len() == limit => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(v1::ListChannelsResponse {
            channels: channels.into_iter().map(convert::channel).collect(),
            next_page_token,
        }))
    }

    async fn get_channel(&self, request: Request<v1::GetChannelRequest>) -> Result<Response<v1::Channel>, Status> {
        let id = request.into_inner().id;
        let channel = self.engine.request(|reply| Command::GetChannel { id, reply }).await.map_err(status)?;
        Ok(Response::new(convert::channel(channel)))
    }

    async fn close_channel(&self, request: Request<v1::CloseChannelRequest>) -> Result<Response<v1::Channel>, Status> {
        auth::note_arguments(request.get_ref());
        let id = request.into_inner().id;
        let channel = self.engine.request(|reply| Command::CloseChannel { id, reply }).await.map_err(status)?;
        Ok(Response::new(convert::channel(channel)))
    }

    type WatchStatsStream = StatsStream;

    async fn watch_stats(&self, request: Request<v1::WatchStatsRequest>) -> Result<Response<StatsStream>, Status> {
        let request = request.into_inner();
        let min = self.stats_limits.min_interval;
        let (min_ms, max_ms) = (min.as_millis(), MAX_STATS_INTERVAL.as_millis());
        let interval = match request.interval_ms {
            0 => Duration::from_secs(1).max(min),
            ms => Duration::from_millis(u64::from(ms)),
        };
        if interval < min || interval > MAX_STATS_INTERVAL {
            return Err(Status::invalid_argument(format!(
                "interval_ms {} is out of range: {min_ms} to {max_ms}, or 0 for the default ({} ms)",
                request.interval_ms,
                Duration::from_secs(1).max(min).as_millis()
            )));
        }
        if request.channel_ids.len() > MAX_WATCHED_CHANNELS {
            return Err(Status::invalid_argument(format!(
                "channel_ids names {} channels; at most {MAX_WATCHED_CHANNELS} are allowed (or none, for every channel)",
                request.channel_ids.len()
            )));
        }
        let stream = self.stats.watch(request.listener_id, request.channel_ids, interval, request.changed_only)?;
        Ok(Response::new(stream))
    }
}

impl ControlApi {
    /// Checks the request's path against the plugin policy, loads it (off
    /// the loop) and adds it to the engine.
    async fn load(&self, request: LoadPlugin) -> Result<Response<v1::Plugin>, Status> {
        let path = self.policy.check(&request.path).map_err(|e| status(e.into()))?;
        let plugin = self.engine.load_plugin(LoadPlugin { path, ..request }).await;
        self.state_changed().await;
        Ok(Response::new(convert::plugin(plugin.map_err(status)?)))
    }
}

/// The path of a plugin library, as a request gives it.
fn plugin_path(text: String) -> Result<PathBuf, Status> {
    if text.trim().is_empty() {
        return Err(Status::invalid_argument("path is empty; give the path of a plugin library (.so)"));
    }
    Ok(PathBuf::from(text))
}

fn require_name(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("name is empty; name a loaded plugin (see ListPlugins)"));
    }
    Ok(())
}

#[tonic::async_trait]
impl v1::plugins_server::Plugins for ControlApi {
    async fn load_plugin(&self, request: Request<v1::LoadPluginRequest>) -> Result<Response<v1::Plugin>, Status> {
        auth::note_arguments(request.get_ref());
        self.check_not_draining()?;
        let request = request.into_inner();
        let path = plugin_path(request.path)?;
        self.load(LoadPlugin { path, activate: request.activate, ..LoadPlugin::default() }).await
    }

    async fn list_plugins(
        &self,
        request: Request<v1::ListPluginsRequest>,
    ) -> Result<Response<v1::ListPluginsResponse>, Status> {
        let request = request.into_inner();
        let limit = page_limit(request.page_size, DEFAULT_PLUGIN_PAGE, MAX_PLUGIN_PAGE);
        let mut plugins = self.engine.request(|reply| Command::ListPlugins { reply }).await.map_err(status)?;
        if !request.name.is_empty() {
            plugins.retain(|plugin| plugin.name == request.name);
            if plugins.is_empty() {
                return Err(status(CommandError::NoPlugin(request.name)));
            }
        }
        plugins.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        // The token is the last name of the previous page.
        let after = request.page_token;
        let rest = plugins
            .into_iter()
            .filter(|plugin| after.is_empty() || plugin.name > after)
            .map(|plugin| fit_plugin(convert::plugin(plugin), PLUGIN_PAGE_BYTES));
        let (plugins, more) = page_within(rest, limit, PLUGIN_PAGE_BYTES, prost::Message::encoded_len);
        let next_page_token = match plugins.last() {
            Some(last) if more => last.name.clone(),
            _ => String::new(),
        };
        Ok(Response::new(v1::ListPluginsResponse { plugins, next_page_token }))
    }

    async fn reload_plugin(&self, request: Request<v1::ReloadPluginRequest>) -> Result<Response<v1::Plugin>, Status> {
        auth::note_arguments(request.get_ref());
        self.check_not_draining()?;
        let request = request.into_inner();
        require_name(&request.name)?;
        let drain_timeout = drain_timeout(request.drain_timeout_ms)?;
        let path = if request.path.is_empty() {
            let name = request.name.clone();
            self.engine.request(|reply| Command::PluginSource { name, reply }).await.map_err(status)?
        } else {
            plugin_path(request.path)?
        };
        self.load(LoadPlugin {
            path,
            expected_name: Some(request.name),
            activate: true,
            drain_timeout,
            ..LoadPlugin::default()
        })
        .await
    }

    async fn activate_plugin(
        &self,
        request: Request<v1::ActivatePluginRequest>,
    ) -> Result<Response<v1::Plugin>, Status> {
        auth::note_arguments(request.get_ref());
        let v1::ActivatePluginRequest { name, generation, drain_timeout_ms } = request.into_inner();
        require_name(&name)?;
        let drain_timeout = drain_timeout(drain_timeout_ms)?;
        let plugin =
            self.engine.request(|reply| Command::ActivatePlugin { name, generation, drain_timeout, reply }).await;
        self.state_changed().await;
        Ok(Response::new(convert::plugin(plugin.map_err(status)?)))
    }

    async fn unload_plugin(&self, request: Request<v1::UnloadPluginRequest>) -> Result<Response<v1::Plugin>, Status> {
        auth::note_arguments(request.get_ref());
        let v1::UnloadPluginRequest { name, generation, force } = request.into_inner();
        require_name(&name)?;
        let plugin = self.engine.request(|reply| Command::UnloadPlugin { name, generation, force, reply }).await;
        self.state_changed().await;
        Ok(Response::new(convert::plugin(plugin.map_err(status)?)))
    }
}

#[tonic::async_trait]
impl v1::daemon_server::Daemon for ControlApi {
    async fn get_loop_stats(
        &self,
        _request: Request<v1::GetLoopStatsRequest>,
    ) -> Result<Response<v1::LoopStats>, Status> {
        let stats = self.engine.request(|reply| Command::LoopStats { reply }).await.map_err(status)?;
        Ok(Response::new(convert::loop_stats(stats)))
    }

    async fn get_daemon_info(
        &self,
        _request: Request<v1::GetDaemonInfoRequest>,
    ) -> Result<Response<v1::DaemonInfo>, Status> {
        // Asked together, so the loop usually serves them in one pass. The
        // only error they can have is a loop that is gone, and then the
        // phase says why: the info still answers, without the loop's part.
        let (loop_stats, plugins, listeners) = tokio::join!(
            self.engine.request(|reply| Command::LoopStats { reply }),
            self.engine.request(|reply| Command::ListPlugins { reply }),
            self.engine.request(|reply| Command::ListListeners { after: 0, limit: usize::MAX, reply }),
        );
        let (started_at, started) = self.started;
        Ok(Response::new(convert::daemon_info(convert::DaemonFacts {
            started_at,
            uptime: started.elapsed(),
            phase: self.lifecycle.get(),
            loop_stats: loop_stats.ok(),
            plugins: plugins.ok(),
            listeners: listeners.ok(),
        })))
    }

    async fn reload_config(
        &self,
        _request: Request<v1::ReloadConfigRequest>,
    ) -> Result<Response<v1::ReloadConfigResponse>, Status> {
        auth::note_arguments(_request.get_ref());
        self.check_not_draining()?;
        let reload = self
            .config_reload
            .as_ref()
            .ok_or_else(|| Status::failed_precondition(crate::ReloadError::NoFile.to_string()))?;
        match reload.reload().await {
            Ok(outcome) => Ok(Response::new(v1::ReloadConfigResponse {
                path: outcome.path.display().to_string(),
                started: outcome.started.into_iter().map(convert::listener).collect(),
                stopped: outcome.stopped.into_iter().map(convert::listener).collect(),
                unchanged: outcome.unchanged as u32,
                restart_needed: outcome.restart_needed,
                reread: outcome.reread,
            })),
            Err(e @ crate::ReloadError::NoFile) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ (crate::ReloadError::Invalid(_) | crate::ReloadError::Credentials(_))) => {
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(crate::ReloadError::Unavailable(e)) => Err(status(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use asyncore_proto::v1;
    use prost::Message as _;

    use super::{fit_plugin, page_within};

    #[test]
    fn a_plugin_with_thousands_of_draining_generations_fits_its_budget_keeping_the_current_and_newest() {
        let metric = |n| v1::PluginMetric { name: format!("m{n}"), help: "h".repeat(1000), ..Default::default() };
        let generation = |n| v1::PluginGeneration {
            generation: n,
            path: "/plugins/libasyncore_plugin_echo.so".into(),
            metrics: (0..64).map(metric).collect(),
            ..Default::default()
        };
        let plugin = v1::Plugin {
            name: "echo".into(),
            current_generation: 3,
            generations: (1..=2000).map(generation).collect(),
            ..Default::default()
        };
        assert!(plugin.encoded_len() > 100 << 20, "{}", plugin.encoded_len());
        let small = v1::Plugin { generations: vec![generation(1)], ..plugin.clone() };
        assert_eq!(fit_plugin(small.clone(), 1 << 20), small, "an entry that fits is left alone");

        // Without the other generations' metrics it is still about 190 KiB.
        let fitted = fit_plugin(plugin, 100 << 10);
        assert!(fitted.encoded_len() <= 100 << 10, "{}", fitted.encoded_len());
        assert!(fitted.generations_omitted > 0);
        let kept: Vec<u32> = fitted.generations.iter().map(|g| g.generation).collect();
        assert_eq!(kept[0], 3, "the current generation stays");
        assert_eq!(kept.last(), Some(&2000), "the newest stay");
        assert_eq!(fitted.generations_omitted as usize + kept.len(), 2000);
        assert_eq!(fitted.generations[0].metrics.len(), 64, "the current generation keeps its metrics");
        assert!(fitted.generations[1..].iter().all(|g| g.metrics.is_empty()));
    }

    #[test]
    fn a_page_ends_at_its_limit_or_before_its_budget_and_says_what_is_left() {
        let sizes = [3usize, 4, 5, 6];
        let page = |limit, budget| page_within(sizes, limit, budget, |&size| size);
        assert_eq!(page(10, 100), (vec![3, 4, 5, 6], false));
        assert_eq!(page(2, 100), (vec![3, 4], true));
        assert_eq!(page(10, 12), (vec![3, 4, 5], true), "12 bytes: 3 + 4 + 5");
        assert_eq!(page(10, 11), (vec![3, 4], true));
        assert_eq!(page(10, 1), (vec![3], true), "the first item is taken whatever its size");
        assert_eq!(page_within([] as [usize; 0], 10, 1, |&size| size), (vec![], false));
    }
}
