//! The gRPC control API (package `asyncore.v1`), served with tonic, plus
//! health and reflection.
//!
//! This is the only place that sees protobuf types (with the CLI): requests
//! are validated and turned into engine [`Command`]s here, answers converted
//! back in [`convert`], and every [`CommandError`] mapped to one status code
//! in [`status`].

mod convert;
mod incoming;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use asyncore_proto::v1::{
    self, channels_server::ChannelsServer, daemon_server::DaemonServer, listeners_server::ListenersServer,
    plugins_server::PluginsServer,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use asyncore_engine::{
    command::{Command, CommandError, EngineHandle, LoadPlugin, StatsFilter},
    plugin_host::{PluginLoadError, PluginPolicy},
};

use crate::lifecycle::{Lifecycle, Phase};

pub(crate) use self::incoming::Incoming;

/// Default and largest page of `ListChannels`: grpcurl refuses replies over
/// 4 MiB.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

/// The services of the control API, sharing one engine handle.
#[derive(Debug, Clone)]
pub struct ControlApi {
    engine: EngineHandle,
    lifecycle: Lifecycle,
    policy: PluginPolicy,
}

impl ControlApi {
    /// The API over an engine; `policy` says which plugin paths may be
    /// loaded.
    pub fn new(engine: EngineHandle, lifecycle: Lifecycle, policy: PluginPolicy) -> ControlApi {
        ControlApi { engine, lifecycle, policy }
    }

    /// Serves the API, health and reflection on `listener` until `shutdown`
    /// completes.
    ///
    /// # Errors
    ///
    /// If the server fails.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ListenersServer<ControlApi>>().await;
        health.set_serving::<ChannelsServer<ControlApi>>().await;
        health.set_serving::<PluginsServer<ControlApi>>().await;
        health.set_serving::<DaemonServer<ControlApi>>().await;
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

        tonic::transport::Server::builder()
            .add_service(ListenersServer::new(self.clone()))
            .add_service(ChannelsServer::new(self.clone()))
            .add_service(PluginsServer::new(self.clone()))
            .add_service(DaemonServer::new(self))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(Incoming::new(listener), shutdown)
            .await
    }

    fn check_not_draining(&self) -> Result<(), Status> {
        match self.lifecycle.get() {
            Phase::Draining | Phase::Stopped => Err(Status::unavailable("the daemon is draining")),
            Phase::Starting | Phase::Running => Ok(()),
        }
    }
}

/// The one mapping from engine errors to gRPC status codes.
pub(crate) fn status(error: CommandError) -> Status {
    let message = error.to_string();
    match error {
        CommandError::NoListener(_) | CommandError::NoChannel(_) | CommandError::NoPlugin(_) => {
            Status::not_found(message)
        }
        CommandError::NoGeneration { .. } => Status::not_found(message),
        CommandError::AddressInUse { .. } => Status::already_exists(message),
        CommandError::GenerationRetired { .. } | CommandError::PluginInUse { .. } => {
            Status::failed_precondition(message)
        }
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
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(Status::invalid_argument(format!("invalid address {text:?}: expected host:port")));
    };
    match port.parse::<u64>() {
        Ok(p) if p > u64::from(u16::MAX) => {
            return Err(Status::invalid_argument(format!(
                "invalid address {text:?}: port {p} is out of range (0-65535)"
            )));
        }
        Ok(_) => {}
        Err(_) => {
            return Err(Status::invalid_argument(format!("invalid address {text:?}: port {port:?} is not a number")));
        }
    }
    if host.is_empty() {
        return Err(Status::invalid_argument(format!("invalid address {text:?}: host is empty")));
    }
    match tokio::net::lookup_host(text).await {
        Ok(mut addresses) => addresses
            .next()
            .ok_or_else(|| Status::invalid_argument(format!("invalid address {text:?}: host has no address"))),
        Err(e) => Err(Status::invalid_argument(format!("invalid address {text:?}: {e}"))),
    }
}

#[tonic::async_trait]
impl v1::listeners_server::Listeners for ControlApi {
    async fn start_listener(
        &self,
        request: Request<v1::StartListenerRequest>,
    ) -> Result<Response<v1::Listener>, Status> {
        self.check_not_draining()?;
        let request = request.into_inner();
        let address = parse_address(&request.address).await?;
        if request.plugin.is_empty() {
            return Err(Status::invalid_argument("plugin is empty; name a loaded plugin (see ListPlugins)"));
        }
        let config: BTreeMap<String, String> = request.config.into_iter().collect();
        let listener = self
            .engine
            .request(|reply| Command::StartListener { address, plugin: request.plugin, config, reply })
            .await
            .map_err(status)?;
        Ok(Response::new(convert::listener(listener)))
    }

    async fn stop_listener(&self, request: Request<v1::StopListenerRequest>) -> Result<Response<v1::Listener>, Status> {
        let v1::StopListenerRequest { id, close_channels } = request.into_inner();
        let listener =
            self.engine.request(|reply| Command::StopListener { id, close_channels, reply }).await.map_err(status)?;
        Ok(Response::new(convert::listener(listener)))
    }

    async fn list_listeners(
        &self,
        _request: Request<v1::ListListenersRequest>,
    ) -> Result<Response<v1::ListListenersResponse>, Status> {
        let listeners = self.engine.request(|reply| Command::ListListeners { reply }).await.map_err(status)?;
        Ok(Response::new(v1::ListListenersResponse {
            listeners: listeners.into_iter().map(convert::listener).collect(),
        }))
    }
}

type StatsStream = ReceiverStream<Result<v1::StatsUpdate, Status>>;

#[tonic::async_trait]
impl v1::channels_server::Channels for ControlApi {
    async fn list_channels(
        &self,
        request: Request<v1::ListChannelsRequest>,
    ) -> Result<Response<v1::ListChannelsResponse>, Status> {
        let request = request.into_inner();
        let limit = match request.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let after = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse::<u64>().map_err(|_| {
                Status::invalid_argument(format!(
                    "invalid page_token {:?}: pass a previous next_page_token",
                    request.page_token
                ))
            })?
        };
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
        let id = request.into_inner().id;
        let channel = self.engine.request(|reply| Command::CloseChannel { id, reply }).await.map_err(status)?;
        Ok(Response::new(convert::channel(channel)))
    }

    type WatchStatsStream = StatsStream;

    async fn watch_stats(&self, request: Request<v1::WatchStatsRequest>) -> Result<Response<StatsStream>, Status> {
        let request = request.into_inner();
        let interval = match request.interval_ms {
            0 => Duration::from_secs(1),
            ms if ms < 10 => {
                return Err(Status::invalid_argument(format!("interval_ms {ms} is too small (at least 10)")));
            }
            ms => Duration::from_millis(u64::from(ms)),
        };
        let filter = StatsFilter::new(request.listener_id, request.channel_ids);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(watch_stats(self.engine.clone(), filter, interval, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Feeds one `WatchStats` stream until the client goes away.
async fn watch_stats(
    engine: EngineHandle,
    filter: StatsFilter,
    interval: Duration,
    tx: mpsc::Sender<Result<v1::StatsUpdate, Status>>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Start from the closed-channel records that exist now: channels closed
    // before the watch began are not news.
    let mut closed_after =
        match engine.request(|reply| Command::Stats { filter: filter.clone(), closed_after: u64::MAX, reply }).await {
            Ok(snapshot) => snapshot.closed_seq,
            Err(e) => {
                let _ = tx.send(Err(status(e))).await;
                return;
            }
        };
    let mut previous: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut last = Instant::now();
    let mut seq = 0;
    loop {
        ticker.tick().await;
        let snapshot =
            match engine.request(|reply| Command::Stats { filter: filter.clone(), closed_after, reply }).await {
                Ok(snapshot) => snapshot,
                Err(e) => {
                    let _ = tx.send(Err(status(e))).await;
                    return;
                }
            };
        closed_after = snapshot.closed_seq;
        let now = Instant::now();
        let seconds = now.duration_since(last).as_secs_f64();
        last = now;
        seq += 1;
        let update = convert::stats_update(seq, seconds, &snapshot, &mut previous);
        if tx.send(Ok(update)).await.is_err() {
            return;
        }
    }
}

impl ControlApi {
    /// Checks the request's path against the plugin policy, loads it (off
    /// the loop) and adds it to the engine.
    async fn load(&self, request: LoadPlugin) -> Result<Response<v1::Plugin>, Status> {
        let path = self.policy.check(&request.path).map_err(|e| status(e.into()))?;
        let plugin = self.engine.load_plugin(LoadPlugin { path, ..request }).await.map_err(status)?;
        Ok(Response::new(convert::plugin(plugin)))
    }
}

/// The path of a plugin library, as a request gives it.
fn plugin_path(text: String) -> Result<PathBuf, Status> {
    if text.trim().is_empty() {
        return Err(Status::invalid_argument("path is empty; give the path of a plugin library (.so)"));
    }
    Ok(PathBuf::from(text))
}

fn drain_timeout(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
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
        self.check_not_draining()?;
        let request = request.into_inner();
        let path = plugin_path(request.path)?;
        self.load(LoadPlugin { path, activate: request.activate, ..LoadPlugin::default() }).await
    }

    async fn list_plugins(
        &self,
        _request: Request<v1::ListPluginsRequest>,
    ) -> Result<Response<v1::ListPluginsResponse>, Status> {
        let plugins = self.engine.request(|reply| Command::ListPlugins { reply }).await.map_err(status)?;
        Ok(Response::new(v1::ListPluginsResponse { plugins: plugins.into_iter().map(convert::plugin).collect() }))
    }

    async fn reload_plugin(&self, request: Request<v1::ReloadPluginRequest>) -> Result<Response<v1::Plugin>, Status> {
        self.check_not_draining()?;
        let request = request.into_inner();
        require_name(&request.name)?;
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
            drain_timeout: drain_timeout(request.drain_timeout_ms),
        })
        .await
    }

    async fn activate_plugin(
        &self,
        request: Request<v1::ActivatePluginRequest>,
    ) -> Result<Response<v1::Plugin>, Status> {
        let v1::ActivatePluginRequest { name, generation, drain_timeout_ms } = request.into_inner();
        require_name(&name)?;
        let drain_timeout = drain_timeout(drain_timeout_ms);
        let plugin = self
            .engine
            .request(|reply| Command::ActivatePlugin { name, generation, drain_timeout, reply })
            .await
            .map_err(status)?;
        Ok(Response::new(convert::plugin(plugin)))
    }

    async fn unload_plugin(&self, request: Request<v1::UnloadPluginRequest>) -> Result<Response<v1::Plugin>, Status> {
        let v1::UnloadPluginRequest { name, generation, force } = request.into_inner();
        require_name(&name)?;
        let plugin = self
            .engine
            .request(|reply| Command::UnloadPlugin { name, generation, force, reply })
            .await
            .map_err(status)?;
        Ok(Response::new(convert::plugin(plugin)))
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
}
