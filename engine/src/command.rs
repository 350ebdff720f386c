//! The closed set of requests the tokio side may make of the poll loop, and
//! the plain-Rust answers it gets back.
//!
//! The poll-loop thread owns every socket, dispatcher and buffer. Other
//! threads reach them only by pushing a [`Command`] and waking the poller;
//! each command carries a `oneshot` sender for its reply. Nothing here is a
//! protobuf type: the gRPC layer converts at its edge.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, mpsc},
    time::{Duration, SystemTime},
};

use crate::epoll::Poller;
use tokio::sync::oneshot;

use crate::plugin_host::{self, LoadedPlugin, PluginLoadError};

/// Reply channel of a command.
pub type Reply<T> = oneshot::Sender<Result<T, CommandError>>;

/// A request to the poll loop.
#[derive(Debug)]
pub enum Command {
    /// Bind a listener served by a plugin.
    StartListener { address: SocketAddr, plugin: String, config: BTreeMap<String, String>, reply: Reply<ListenerInfo> },
    /// Stop accepting; optionally close the listener's channels gracefully.
    /// A listener already stopped answers [`CommandError::ListenerStopped`].
    StopListener { id: u64, close_channels: bool, reply: Reply<ListenerInfo> },
    /// Stop accepting but keep the listening socket bound and listening:
    /// the loop no longer asks it for connections, so the kernel queues
    /// new ones in the listen backlog (1024) until it fills, after which
    /// further connection attempts are not answered (a client's connect
    /// retries its SYN, then times out). Channels already accepted keep
    /// running. Suspending a suspended listener changes nothing; a stopped
    /// one answers [`CommandError::ListenerStopped`].
    SuspendListener { id: u64, reply: Reply<ListenerInfo> },
    /// Accept again, starting with what waited in the backlog.
    ResumeListener { id: u64, reply: Reply<ListenerInfo> },
    /// Stop accepting (closing the listening socket, as
    /// [`Command::StopListener`]), then answer only once every channel of
    /// the listener has closed. When `timeout` passes first, the channels
    /// left are closed gracefully (output flushed, within the close
    /// timeout) and the answer comes once they are gone.
    DrainListener { id: u64, timeout: Duration, reply: Reply<ListenerInfo> },
    /// Sets the most connections the listener keeps open at once (`None`:
    /// no limit). Past it, a new connection is accepted and closed at once,
    /// and counted ([`ListenerInfo::connections_refused`]); the connections
    /// already open stay. The value is kept in the listener's config as
    /// `max_connections`.
    SetListenerLimits { id: u64, max_connections: Option<u64>, reply: Reply<ListenerInfo> },
    /// The loop's own limit over every listener: with `set`, sets the most
    /// accepted connections open at once, all listeners together (`None`:
    /// no limit but each listener's); answers the limit and the count.
    DaemonLimits { set: Option<Option<u64>>, reply: Reply<DaemonLimits> },
    /// Listeners with id greater than `after`, at most `limit`, in id order.
    ListListeners { after: u64, limit: usize, reply: Reply<Vec<ListenerInfo>> },
    /// Channels with id greater than `after`, at most `limit`, optionally of
    /// one listener.
    ListChannels { listener_id: Option<u64>, after: u64, limit: usize, reply: Reply<Vec<ChannelInfo>> },
    /// One channel.
    GetChannel { id: u64, reply: Reply<ChannelInfo> },
    /// Graceful close: flush queued output, then close.
    CloseChannel { id: u64, reply: Reply<ChannelInfo> },
    /// Counters of live channels matching `filter`, and of channels that
    /// closed after closed-channel sequence number `closed_after`.
    Stats { filter: StatsFilter, closed_after: u64, reply: Reply<StatsSnapshot> },
    /// [`Command::Stats`] that costs the loop what changed: of the live
    /// channels, only those that changed after stats epoch `since` (every
    /// live one when `since` is 0, or older than the loop remembers; then
    /// the snapshot says `complete`). Ends the current epoch: pass the
    /// snapshot's `epoch` as `since` next time.
    StatsChanges { filter: StatsFilter, closed_after: u64, since: u64, reply: Reply<StatsSnapshot> },
    /// Add a plugin already loaded (and validated) off the loop thread, as a
    /// new plugin or a new generation of one; `activate` makes it current.
    /// With `drain_timeout`, channels of older generations are closed
    /// gracefully after it. With `generation` (a restore of saved state),
    /// see [`LoadPlugin::generation`].
    AddPlugin {
        plugin: Box<LoadedPlugin>,
        activate: bool,
        drain_timeout: Option<Duration>,
        generation: Option<u32>,
        reply: Reply<PluginInfo>,
    },
    /// Make a loaded generation current.
    ActivatePlugin { name: String, generation: u32, drain_timeout: Option<Duration>, reply: Reply<PluginInfo> },
    /// Retire a generation, or every generation of a plugin.
    UnloadPlugin { name: String, generation: Option<u32>, force: bool, reply: Reply<PluginInfo> },
    /// Where the current generation of a plugin was loaded from.
    PluginSource { name: String, reply: Reply<std::path::PathBuf> },
    /// Every plugin.
    ListPlugins { reply: Reply<Vec<PluginInfo>> },
    /// Loop counters.
    LoopStats { reply: Reply<LoopStats> },
    /// Stop accepting and close every channel gracefully; the loop exits
    /// once the map is empty or `deadline` passes.
    Drain { deadline: std::time::Instant, reply: Reply<()> },
    /// Exit the loop now.
    Shutdown,
    /// Test-only (feature `fault-injection`): panic on the loop thread, as
    /// a bug in the loop would, so that tests can show what the daemon does
    /// when its poll loop dies. Never built into a daemon that is shipped.
    #[cfg(feature = "fault-injection")]
    PanicForTest,
}

/// Why a command failed. The gRPC layer maps each variant to one status code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no listener {0}")]
    NoListener(u64),
    #[error("no channel {0}")]
    NoChannel(u64),
    #[error("no plugin named {0:?} is loaded")]
    NoPlugin(String),
    #[error("{address} is already in use")]
    AddressInUse { address: SocketAddr },
    #[error("cannot bind {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("config {key}: {message}")]
    BadConfig { key: &'static str, message: String },
    #[error("plugin {plugin} refused the listener config: {message}")]
    PluginRefused { plugin: String, message: String },
    #[error("plugin {name} has no generation {generation}")]
    NoGeneration { name: String, generation: u32 },
    #[error("plugin {name} already has generation {newest}; generation {generation} cannot be added after it")]
    GenerationTaken { name: String, generation: u32, newest: u32 },
    #[error("plugin {name}@{generation} is retired; load the library again to get a new generation")]
    GenerationRetired { name: String, generation: u32 },
    #[error("plugin {name} is in use ({users}); stop them first, or pass force to close them gracefully")]
    PluginInUse { name: String, users: String },
    #[error("library {path} is plugin {found:?}, not {expected:?}")]
    WrongPlugin { path: String, found: String, expected: String },
    #[error(transparent)]
    PluginLoad(#[from] PluginLoadError),
    #[error("listener {0} is already stopped")]
    ListenerStopped(u64),
    #[error("channel {id} is the listening socket of listener {listener}; stop the listener instead")]
    ListeningChannel { id: u64, listener: u64 },
    #[error("plugin loader failed: {0}")]
    LoaderFailed(String),
    #[error("the daemon is draining")]
    Draining,
    #[error("the poll loop has stopped")]
    LoopGone,
}

/// What the loop knows of a listener.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    pub id: u64,
    pub address: SocketAddr,
    pub plugin: String,
    /// The generation serving new connections.
    pub generation: u32,
    pub listening: bool,
    pub channel_count: u64,
    pub config: BTreeMap<String, String>,
    /// Id of the listening channel; 0 once stopped.
    pub channel_id: u64,
    pub created_at: SystemTime,
    /// Panics of its listening dispatcher in the last minute (each one
    /// replaced it with a fresh one).
    pub recent_panics: u32,
    /// It stopped because its listening dispatcher panicked more than the
    /// budget allows.
    pub stopped_by_panics: bool,
    /// Listening, but not accepting ([`Command::SuspendListener`]).
    pub suspended: bool,
    /// Stopped, and a [`Command::DrainListener`] waits for its channels.
    pub draining: bool,
    /// The most accepted connections it keeps open at once; `None`: no
    /// limit but the daemon's.
    pub max_connections: Option<u64>,
    /// Its accepted connections still open (closing ones included): what
    /// `max_connections` counts.
    pub connections: u64,
    /// Connections closed at once because a limit was reached.
    pub connections_refused: u64,
}

/// The loop's limits over every listener ([`Command::DaemonLimits`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DaemonLimits {
    /// The most accepted connections open at once, all listeners
    /// together; `None`: no limit but each listener's.
    pub max_connections: Option<u64>,
    /// Accepted connections open now, of every listener (closing ones
    /// included).
    pub connections: u64,
}

/// The largest `max_connections`, of a listener or of the daemon: more
/// than any descriptor limit allows.
pub const MAX_CONNECTIONS: u64 = 1_000_000;

/// Parses a listener's `max_connections`: 0 (no limit) or 1 to
/// [`MAX_CONNECTIONS`].
///
/// # Errors
///
/// A message naming the value and the allowed range.
pub fn parse_max_connections(text: &str) -> Result<Option<u64>, String> {
    let out_of_range = || format!("{text:?} is out of range: 0 (no limit) or 1 to {MAX_CONNECTIONS}");
    let n = text.trim().parse::<u64>().map_err(|_| out_of_range())?;
    max_connections(n).map_err(|_| out_of_range())
}

/// A `max_connections` given as a number, of a listener or of the daemon:
/// 0 is no limit.
///
/// # Errors
///
/// Past [`MAX_CONNECTIONS`]: a message naming the value and the range.
pub fn max_connections(n: u64) -> Result<Option<u64>, String> {
    match n {
        0 => Ok(None),
        n if n <= MAX_CONNECTIONS => Ok(Some(n)),
        n => Err(format!("max_connections {n} is out of range: 0 (no limit) or 1 to {MAX_CONNECTIONS}")),
    }
}

/// How a channel came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Listening,
    Accepted,
    Outbound,
    /// A pipe or other descriptor served in the loop (`file_dispatcher`).
    File,
}

/// Where a channel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    Connecting,
    Open,
    /// Flushing queued output (then lingering for the peer's close) before
    /// the socket closes.
    Closing,
    Closed,
}

/// Per-channel counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub reads: u64,
    pub writes: u64,
}

/// What the loop knows of a channel.
#[derive(Debug, Clone)]
pub struct ChannelInfo {
    pub id: u64,
    pub listener_id: u64,
    pub parent_id: u64,
    pub plugin: Arc<str>,
    /// The plugin generation serving this channel.
    pub generation: u32,
    pub kind: ChannelKind,
    pub peer_address: Option<SocketAddr>,
    pub local_address: Option<SocketAddr>,
    pub state: ChannelState,
    pub created_at: SystemTime,
    pub counters: Counters,
    pub pending_output: u64,
    /// What the dispatcher says of its state (`Dispatcher::describe`):
    /// filled in by `GetChannel` only.
    pub annotations: Vec<(String, String)>,
}

/// Which channels a stats request is about. The default is every channel.
#[derive(Debug, Clone, Default)]
pub struct StatsFilter {
    listener_id: Option<u64>,
    /// The channels asked for, each once, in the order asked; empty means
    /// every channel.
    channel_ids: Vec<u64>,
    /// The same ids, for membership: a tick of a watch costs what it
    /// watches, not its square.
    watched: HashSet<u64>,
}

impl StatsFilter {
    /// Channels of `listener_id` (any listener when `None`) among
    /// `channel_ids` (every channel when empty).
    pub fn new(listener_id: Option<u64>, channel_ids: impl IntoIterator<Item = u64>) -> StatsFilter {
        let mut watched = HashSet::new();
        let channel_ids = channel_ids.into_iter().filter(|&id| watched.insert(id)).collect();
        StatsFilter { listener_id, channel_ids, watched }
    }

    /// The channels asked for, each once; empty means every channel.
    pub fn channel_ids(&self) -> &[u64] {
        &self.channel_ids
    }

    pub(crate) fn matches(&self, channel_id: u64, listener_id: u64) -> bool {
        self.matches_listener(listener_id) && (self.watched.is_empty() || self.watched.contains(&channel_id))
    }

    pub(crate) fn matches_listener(&self, listener_id: u64) -> bool {
        self.listener_id.is_none_or(|id| id == listener_id)
    }
}

/// One channel's counters at a moment.
#[derive(Debug, Clone, Copy)]
pub struct ChannelStats {
    pub channel_id: u64,
    pub listener_id: u64,
    pub counters: Counters,
    pub pending_output: u64,
    pub closed: bool,
}

/// Reply to [`Command::Stats`].
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    pub channels: Vec<ChannelStats>,
    /// Sequence number of the newest closed-channel record: pass it as
    /// `closed_after` next time.
    pub closed_seq: u64,
    /// Closed-channel records that were already discarded (the caller asked
    /// too rarely); their channels cannot be reported.
    pub closed_missed: u64,
    /// The stats epoch this snapshot ended ([`Command::StatsChanges`]).
    pub epoch: u64,
    /// It lists every live channel matching the filter, not only the
    /// changed ones.
    pub complete: bool,
}

/// What the loop knows of a plugin: the generations loaded under its name,
/// oldest first. Every current, standby and draining one is there; of the
/// retired ones, the newest eight, and any older one whose channels are not
/// all gone (the others' records are forgotten, so that the listing does
/// not grow with every reload).
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub name: String,
    /// The generation new connections go to (0: none, all retired).
    pub current_generation: u32,
    pub generations: Vec<GenerationInfo>,
}

impl PluginInfo {
    /// The current generation, or the newest one when none is current.
    pub fn headline(&self) -> &GenerationInfo {
        self.generations
            .iter()
            .find(|g| g.generation == self.current_generation)
            .or(self.generations.last())
            .expect("a plugin has at least one generation")
    }
}

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationState {
    /// New connections go to it.
    Current,
    /// Loaded, not current, no channels: can be activated.
    Standby,
    /// Not current, still serving channels it created.
    Draining,
    /// Unloaded: never called again; its library is closed once no channel
    /// of it is left.
    Retired,
}

/// One load of a plugin library.
#[derive(Debug, Clone)]
pub struct GenerationInfo {
    pub generation: u32,
    pub version: String,
    pub abi_version: (u32, u32),
    pub sdk_version: String,
    pub path: String,
    pub sha256: String,
    pub loaded_at: SystemTime,
    pub state: GenerationState,
    pub listener_ids: Vec<u64>,
    pub live_channels: u64,
    pub panics: u64,
    /// The metrics the plugin defined (`asyncore_sdk::metrics`), with
    /// their values now.
    pub metrics: Vec<PluginMetric>,
}

/// One metric a plugin defined, and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginMetric {
    /// A Prometheus metric name, unique within the plugin.
    pub name: String,
    pub help: String,
    pub kind: MetricKind,
    pub value: i64,
}

/// How a plugin metric behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only ever goes up.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// Counters of the poll loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopStats {
    pub passes: u64,
    pub events: u64,
    pub handler_calls: u64,
    pub interest_queries: u64,
    pub interest_changes: u64,
    pub channels: u64,
    pub panics: u64,
    pub accepts: u64,
    pub commands: u64,
    /// Output bytes dropped by closes that could not deliver them (a peer
    /// that stopped reading past the close timeout, a drain deadline).
    pub bytes_dropped: u64,
    /// Plugin calls that ran longer than the slow-callback threshold
    /// (`Engine::set_slow_callback`): each held up every other channel.
    pub slow_callbacks: u64,
    /// The longest plugin call so far, slow or not, in microseconds.
    pub slowest_callback_us: u64,
    /// Times a listener paused accepting (100 ms) because `accept` failed
    /// for lack of descriptors or memory (`EMFILE`, `ENFILE`, ...).
    pub accept_pauses: u64,
}

/// What [`EngineHandle::load_plugin`] loads, and what becomes of it.
#[derive(Debug, Clone, Default)]
pub struct LoadPlugin {
    /// The library.
    pub path: PathBuf,
    /// Refuse a library of another plugin ([`CommandError::WrongPlugin`]).
    pub expected_name: Option<String>,
    /// Make it the current generation. A plugin's first generation is
    /// current anyway.
    pub activate: bool,
    /// With `activate`: close the channels of older generations
    /// (gracefully) after this long.
    pub drain_timeout: Option<Duration>,
    /// Restoring saved state: number the new generation so, instead of
    /// the next number ([`CommandError::GenerationTaken`] unless it is
    /// above every generation of the plugin), and make it current only
    /// with `activate`, even if the plugin has no current generation (as
    /// when the state was saved).
    pub generation: Option<u32>,
}

/// The tokio side's way into the poll loop: a command queue and the waker.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    poller: Arc<Poller>,
}

impl EngineHandle {
    pub(crate) fn new(commands: mpsc::Sender<Command>, poller: Arc<Poller>) -> EngineHandle {
        EngineHandle { commands, poller }
    }

    /// Pushes a command and wakes the loop.
    pub fn send(&self, command: Command) -> Result<(), CommandError> {
        self.commands.send(command).map_err(|_| CommandError::LoopGone)?;
        self.poller.notify().map_err(|_| CommandError::LoopGone)
    }

    /// Loads a plugin library on a thread of its own (copying and `dlopen`
    /// take milliseconds: never on the loop), then adds it to the engine as
    /// [`LoadPlugin`] says.
    ///
    /// # Errors
    ///
    /// The load error, [`CommandError::WrongPlugin`], or the engine's.
    pub async fn load_plugin(&self, request: LoadPlugin) -> Result<PluginInfo, CommandError> {
        let LoadPlugin { path, expected_name, activate, drain_timeout, generation } = request;
        let display = path.display().to_string();
        let loaded = spawn_loader(move || plugin_host::load(&path))
            .await
            .map_err(|e| CommandError::LoaderFailed(e.to_string()))??;
        if let Some(expected) = expected_name
            && loaded.name != expected
        {
            let found = loaded.name.clone();
            // Never handed to the engine: its library can go now.
            let _ = loaded.unload();
            return Err(CommandError::WrongPlugin { path: display, found, expected });
        }
        self.request(|reply| Command::AddPlugin {
            plugin: Box::new(loaded),
            activate,
            drain_timeout,
            generation,
            reply,
        })
        .await
    }

    /// [`request`](EngineHandle::request) for a thread that is not in an
    /// async runtime (the testing harness); blocks until the loop answers.
    ///
    /// # Errors
    ///
    /// The command's own, or [`CommandError::LoopGone`].
    pub fn request_blocking<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, CommandError> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply))?;
        answer.blocking_recv().map_err(|_| CommandError::LoopGone)?
    }

    /// Sends the command built around a reply channel and awaits the reply.
    pub async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, CommandError> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply))?;
        answer.await.map_err(|_| CommandError::LoopGone)?
    }
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").finish_non_exhaustive()
    }
}

/// Runs `load` on a short-lived thread of its own (copying and `dlopen` take
/// milliseconds and may block on the disk: never on the loop, nor on an
/// async runtime's worker) and awaits its result. The engine does not
/// assume any particular async runtime.
async fn spawn_loader<T: Send + 'static>(load: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    let (done, result) = oneshot::channel();
    std::thread::Builder::new()
        .name("plugin-loader".to_string())
        .spawn(move || {
            let _ = done.send(load());
        })
        .map_err(|e| format!("cannot start the loader thread: {e}"))?;
    result.await.map_err(|_| "the loader thread panicked".to_string())
}

#[cfg(test)]
mod tests {
    use super::{MAX_CONNECTIONS, StatsFilter, parse_max_connections};

    #[test]
    fn max_connections_is_zero_for_none_or_within_its_range() {
        assert_eq!(parse_max_connections("0"), Ok(None));
        assert_eq!(parse_max_connections("1"), Ok(Some(1)));
        assert_eq!(parse_max_connections(" 250 "), Ok(Some(250)));
        assert_eq!(parse_max_connections("1000000"), Ok(Some(MAX_CONNECTIONS)));
        for bad in ["1000001", "-1", "lots", "", "1.5"] {
            let message = parse_max_connections(bad).unwrap_err();
            assert!(message.contains("0 (no limit) or 1 to 1000000"), "{bad}: {message}");
        }
    }

    #[test]
    fn the_default_filter_takes_every_channel() {
        let filter = StatsFilter::default();
        assert!(filter.matches(1, 1) && filter.matches(99, 7));
    }

    #[test]
    fn a_filter_takes_the_channels_and_listener_asked_for() {
        let filter = StatsFilter::new(Some(2), [5, 3, 5]);
        assert_eq!(filter.channel_ids(), [5, 3], "each once, in the order asked");
        assert!(filter.matches(3, 2));
        assert!(!filter.matches(4, 2), "a channel not asked for");
        assert!(!filter.matches(3, 1), "another listener's");
        let any_channel = StatsFilter::new(Some(2), []);
        assert!(any_channel.matches(4, 2) && !any_channel.matches(4, 1));
    }

    /// A tick of a watch over many channels used to look each one up in the
    /// list of all of them (quadratic in what is watched); the set answers
    /// each in constant time, and agrees with the list.
    #[test]
    fn a_filter_of_many_channels_matches_exactly_those() {
        let n_channels = 30_000;
        let filter = StatsFilter::new(None, (1..=n_channels).map(|id| id * 2));
        let matched = (1..=2 * n_channels).filter(|&id| filter.matches(id, 1)).count();
        assert_eq!(matched, n_channels as usize);
        assert!(filter.matches(2 * n_channels, 7) && !filter.matches(2 * n_channels + 2, 7));
    }
}
