//! The asyncore engine: a level-triggered poll loop over a channel map.
//!
//! One [`Engine`] runs on one thread (`poll-loop` in the daemon) and owns
//! every socket, dispatcher, output queue and timer. A pass of the loop:
//!
//! 1. serves the commands queued by other threads,
//! 2. fires due timers,
//! 3. re-asks `readable()`/`writable()` of the *dirty* channels only (those
//!    whose handler ran, or that a command or another channel touched) and
//!    updates their registration with the poller when the answer changed,
//! 4. waits,
//! 5. calls the handlers of the channels that are ready.
//!
//! So a pass costs what is ready or changed, never what is merely open: ten
//! thousand idle channels cost nothing. Python's asyncore instead rebuilds
//! its whole poll set every pass.

mod channel;
mod host_abi;
mod plugins;

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap, VecDeque},
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, mpsc},
    time::{Duration, Instant, SystemTime},
};

use asyncore_abi::{self as ffi, HostCtx};
use polling::{Event, Events, PollMode, Poller};
use socket2::{Domain, Protocol, Socket as RawSocket, Type};
use tracing::{debug, error, info, warn};

use self::channel::{Channel, Phase, READ, Socket, WRITE};
pub(crate) use self::host_abi::HOST_VTABLE;
use crate::{
    command::{
        ChannelInfo, ChannelKind, ChannelStats, Command, CommandError, EngineHandle, ListenerInfo, LoopStats,
        PluginInfo, Reply, StatsFilter, StatsSnapshot,
    },
    config::parse_duration,
    plugin_host::{Dispatcher, LoadedPlugin},
};

/// Connections accepted per listener per pass, so that one busy listener
/// cannot starve the channels already open.
const ACCEPTS_PER_PASS: usize = 64;
/// How long a listener that ran out of descriptors stops accepting. A
/// level-triggered listener with no descriptor left would otherwise wake the
/// loop hundreds of thousands of times a second.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How long a closing channel waits for its peer's close after its output
/// was flushed.
const LINGER: Duration = Duration::from_secs(2);
/// How long a closing channel may take to flush its output.
const CLOSE_DEADLINE: Duration = Duration::from_secs(30);
/// Closed-channel records kept for stats watchers.
const CLOSED_LOG: usize = 65_536;

/// The context of one call into a plugin: which channel it is about, and
/// what the plugin reported. Plugins get a pointer to it and pass it back to
/// the host functions in [`host_abi`].
pub(crate) struct CallCtx {
    core: *mut Core,
    slot: Option<usize>,
    report: Option<String>,
    /// State handed over by `export_state`.
    state: Option<Vec<u8>>,
}

impl CallCtx {
    fn new(core: &mut Core, slot: Option<usize>) -> CallCtx {
        CallCtx { core, slot, report: None, state: None }
    }

    /// A context for calls that concern no channel (`on_load`).
    pub(crate) fn detached() -> CallCtx {
        CallCtx { core: std::ptr::null_mut(), slot: None, report: None, state: None }
    }

    pub(crate) fn as_ffi(&mut self) -> *mut HostCtx {
        (self as *mut CallCtx).cast()
    }

    pub(crate) fn take_report(&mut self) -> Option<String> {
        self.report.take()
    }

    pub(crate) fn take_state(&mut self) -> Option<Vec<u8>> {
        self.state.take()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// A paused listener resumes accepting.
    ResumeAccept,
    /// A lingering channel has waited long enough for its peer.
    EndLinger,
    /// A plugin's `call_later`.
    Call { timer_id: u64, token: u64 },
    /// Check a channel's idle timeout.
    IdleCheck,
    /// Close the channels of a plugin's generations other than `keep`.
    DrainGenerations { keep: usize },
    /// A closing channel that has not flushed its output by now is closed
    /// anyway (its peer stopped reading).
    CloseDeadline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    channel_id: u64,
    kind: TimerKind,
}

/// One generation of a plugin.
struct PluginEntry {
    loaded: LoadedPlugin,
    generation: u32,
    retired: bool,
    panics: u64,
    live_channels: u64,
}

struct Listener {
    id: u64,
    address: SocketAddr,
    /// The plugin (by name) serving this listener...
    plugin_name: String,
    /// ... and the generation of its listening dispatcher.
    plugin: usize,
    idle_timeout: Option<Duration>,
    config: BTreeMap<String, String>,
    /// Id of the listening channel; 0 once stopped.
    channel_id: u64,
    channel_count: u64,
    created_at: SystemTime,
}

struct Drain {
    deadline: Instant,
    reply: Reply<()>,
}

/// Everything the loop owns except the poller's event buffer and the
/// command queue. Host functions called by plugins reach it through
/// [`CallCtx`].
pub(crate) struct Core {
    poller: Arc<Poller>,
    channels: Vec<Option<Channel>>,
    free_slots: Vec<usize>,
    /// Channel id to slot, in id order (for paginated listing).
    ids: BTreeMap<u64, usize>,
    dirty: Vec<usize>,
    listeners: BTreeMap<u64, Listener>,
    /// Every generation of every plugin, in load order; channels refer to
    /// their generation by index.
    plugins: Vec<PluginEntry>,
    /// Plugin name to the index of its current generation.
    current: HashMap<String, usize>,
    timers: BinaryHeap<Reverse<Timer>>,
    /// `call_later` timers not yet fired nor cancelled, to their channel.
    live_calls: HashMap<u64, u64>,
    next_timer_id: u64,
    /// The clock of the current pass (read once after each wait).
    now: Instant,
    closed: VecDeque<(u64, ChannelStats)>,
    closed_seq: u64,
    next_channel_id: u64,
    next_listener_id: u64,
    stats: LoopStats,
    drain: Option<Drain>,
    exit: bool,
}

/// The asyncore loop, usable on its own (`Engine::run_loop`, asyncore's
/// `loop(timeout, count)`) or driven by the daemon's `poll-loop` thread.
pub struct Engine {
    core: Core,
    events: Events,
    commands: mpsc::Receiver<Command>,
    handle: EngineHandle,
}

impl Engine {
    /// An engine with an empty channel map.
    ///
    /// # Errors
    ///
    /// If the poller (epoll) cannot be created.
    pub fn new() -> io::Result<Engine> {
        let poller = Arc::new(Poller::new()?);
        let (tx, rx) = mpsc::channel();
        Ok(Engine {
            core: Core {
                poller: poller.clone(),
                channels: Vec::new(),
                free_slots: Vec::new(),
                ids: BTreeMap::new(),
                dirty: Vec::new(),
                listeners: BTreeMap::new(),
                plugins: Vec::new(),
                current: HashMap::new(),
                timers: BinaryHeap::new(),
                live_calls: HashMap::new(),
                next_timer_id: 1,
                now: Instant::now(),
                closed: VecDeque::new(),
                closed_seq: 0,
                next_channel_id: 1,
                next_listener_id: 1,
                stats: LoopStats::default(),
                drain: None,
                exit: false,
            },
            events: Events::new(),
            commands: rx,
            handle: EngineHandle::new(tx, poller),
        })
    }

    /// A handle other threads use to send commands to this engine.
    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Adds a loaded plugin: a new plugin, or the next generation of one
    /// (made current when `activate`).
    ///
    /// # Errors
    ///
    /// If activating it fails (its `listen` refuses a listener's config).
    pub fn add_plugin(&mut self, plugin: LoadedPlugin, activate: bool) -> Result<PluginInfo, CommandError> {
        self.core.add_plugin(plugin, activate, None)
    }

    /// Binds a listener served by `plugin`.
    ///
    /// # Errors
    ///
    /// As for [`Command::StartListener`].
    pub fn start_listener(
        &mut self,
        address: SocketAddr,
        plugin: &str,
        config: BTreeMap<String, String>,
    ) -> Result<ListenerInfo, CommandError> {
        self.core.start_listener(address, plugin, config)
    }

    /// Stops a listener; with `close_channels`, also closes its channels
    /// gracefully.
    ///
    /// # Errors
    ///
    /// [`CommandError::NoListener`] for an unknown id.
    pub fn stop_listener(&mut self, id: u64, close_channels: bool) -> Result<ListenerInfo, CommandError> {
        self.core.stop_listener(id, close_channels)
    }

    /// Number of channels in the map.
    pub fn n_channels(&self) -> usize {
        self.core.ids.len()
    }

    /// The loop's counters.
    pub fn loop_stats(&self) -> LoopStats {
        self.core.loop_stats()
    }

    /// asyncore's `loop(timeout, count)`: runs passes until the channel map
    /// is empty, or `count` passes when given.
    ///
    /// # Errors
    ///
    /// If waiting on the poller fails.
    pub fn run_loop(&mut self, timeout: Option<Duration>, count: Option<u64>) -> io::Result<()> {
        let mut passes = 0;
        while !self.core.ids.is_empty() && count.is_none_or(|c| passes < c) {
            self.pass(timeout)?;
            passes += 1;
        }
        Ok(())
    }

    /// Runs passes until a [`Command::Shutdown`] or the end of a drain.
    ///
    /// # Errors
    ///
    /// If waiting on the poller fails.
    pub fn run(&mut self) -> io::Result<()> {
        while !self.core.exit {
            self.pass(None)?;
        }
        Ok(())
    }

    /// One pass: commands, timers, interest of dirty channels, wait,
    /// handlers.
    ///
    /// # Errors
    ///
    /// If waiting on the poller fails.
    pub fn pass(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        while let Ok(command) = self.commands.try_recv() {
            self.core.stats.commands += 1;
            self.core.serve(command);
        }
        let now = Instant::now();
        self.core.fire_timers(now);
        let still_dirty = self.core.refresh_dirty();
        self.core.check_drain(now);
        if self.core.exit {
            return Ok(());
        }

        // Wake for the next timer and the drain deadline; do not block at
        // all while channels wait to be refreshed.
        let deadlines = [
            self.core.timers.peek().map(|t| t.0.at),
            self.core.drain.as_ref().map(|d| d.deadline),
            still_dirty.then_some(now),
        ];
        let wait = deadlines.into_iter().flatten().map(|at| at.saturating_duration_since(now)).chain(timeout).min();
        self.events.clear();
        match self.core.poller.wait(&mut self.events, wait) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        self.core.stats.passes += 1;
        self.core.now = Instant::now();
        for event in self.events.iter() {
            self.core.stats.events += 1;
            self.core.dispatch(event);
        }
        Ok(())
    }
}

impl Drop for Engine {
    /// Closes every channel: sockets leave the poller before they close
    /// (as `polling` requires), and dispatchers are freed.
    fn drop(&mut self) {
        let slots: Vec<usize> = self.core.ids.values().copied().collect();
        for slot in slots {
            self.core.finalize(slot);
        }
    }
}

impl Core {
    // ----- commands -------------------------------------------------------

    fn serve(&mut self, command: Command) {
        match command {
            Command::StartListener { address, plugin, config, reply } => {
                let answer = if self.drain.is_some() {
                    Err(CommandError::Draining)
                } else {
                    self.start_listener(address, &plugin, config)
                };
                let _ = reply.send(answer);
            }
            Command::StopListener { id, close_channels, reply } => {
                let _ = reply.send(self.stop_listener(id, close_channels));
            }
            Command::ListListeners { reply } => {
                let _ = reply.send(Ok(self.listeners.values().map(|l| self.listener_info(l)).collect()));
            }
            Command::ListChannels { listener_id, after, limit, reply } => {
                let list = self
                    .ids
                    .range(after.saturating_add(1)..)
                    .filter_map(|(_, &slot)| self.channels[slot].as_ref())
                    .filter(|ch| listener_id.is_none_or(|l| ch.listener_id == l))
                    .take(limit)
                    .map(|ch| self.info_of(ch))
                    .collect();
                let _ = reply.send(Ok(list));
            }
            Command::GetChannel { id, reply } => {
                let _ = reply.send(self.channel_info(id));
            }
            Command::CloseChannel { id, reply } => {
                let answer = match self.ids.get(&id) {
                    Some(&slot) if self.channel_ref(slot).kind == ChannelKind::Listening => {
                        Err(CommandError::ListeningChannel { id, listener: self.channel_ref(slot).listener_id })
                    }
                    Some(&slot) => {
                        self.begin_close(slot);
                        self.channel_info(id)
                    }
                    None => Err(CommandError::NoChannel(id)),
                };
                let _ = reply.send(answer);
            }
            Command::Stats { filter, closed_after, reply } => {
                let _ = reply.send(Ok(self.stats_snapshot(&filter, closed_after)));
            }
            Command::AddPlugin { plugin, activate, drain_timeout, reply } => {
                let _ = reply.send(self.add_plugin(*plugin, activate, drain_timeout));
            }
            Command::ActivatePlugin { name, generation, drain_timeout, reply } => {
                let _ = reply.send(self.activate_plugin(&name, generation, drain_timeout));
            }
            Command::UnloadPlugin { name, generation, force, reply } => {
                let _ = reply.send(self.unload_plugin(&name, generation, force));
            }
            Command::PluginSource { name, reply } => {
                let answer = match self.current.get(&name) {
                    Some(&index) => Ok(self.plugins[index].loaded.path.clone()),
                    None => Err(CommandError::NoPlugin(name)),
                };
                let _ = reply.send(answer);
            }
            Command::ListPlugins { reply } => {
                let _ = reply.send(Ok(self.list_plugins()));
            }
            Command::LoopStats { reply } => {
                let _ = reply.send(Ok(self.loop_stats()));
            }
            Command::Drain { deadline, reply } => self.start_drain(deadline, reply),
            Command::Shutdown => self.exit = true,
        }
    }

    fn loop_stats(&self) -> LoopStats {
        LoopStats { channels: self.ids.len() as u64, ..self.stats }
    }

    fn start_listener(
        &mut self,
        address: SocketAddr,
        plugin_name: &str,
        config: BTreeMap<String, String>,
    ) -> Result<ListenerInfo, CommandError> {
        let plugin = *self.current.get(plugin_name).ok_or_else(|| CommandError::NoPlugin(plugin_name.to_string()))?;
        let idle_timeout = match config.get("idle_timeout") {
            None => None,
            Some(text) => Some(parse_duration(text).ok_or_else(|| CommandError::BadConfig {
                key: "idle_timeout",
                message: format!("{text:?} is not a duration such as 30s, 500ms or 2m"),
            })?),
        };
        let listener = bind(address)?;
        let local = listener.local_addr().ok();

        let mut ctx = CallCtx::new(self, None);
        let dispatcher = self.plugins[plugin]
            .loaded
            .listen(&mut ctx, &config)
            .map_err(|message| CommandError::PluginRefused { plugin: plugin_name.to_string(), message })?;

        let id = self.next_listener_id;
        self.next_listener_id += 1;
        let address = local.unwrap_or(address);
        let slot = self.insert(Channel::new(
            ChannelKind::Listening,
            Socket::Listener(listener),
            id,
            0,
            plugin,
            Some(dispatcher),
            Phase::Open,
            None,
            local,
        ));
        let channel_id = self.channel(slot).id;
        self.listeners.insert(
            id,
            Listener {
                id,
                address,
                plugin_name: plugin_name.to_string(),
                plugin,
                idle_timeout,
                config,
                channel_id,
                channel_count: 0,
                created_at: SystemTime::now(),
            },
        );
        info!(listener = id, %address, plugin = %plugin_name, "listener started");
        Ok(self.listener_info(&self.listeners[&id]))
    }

    fn stop_listener(&mut self, id: u64, close_channels: bool) -> Result<ListenerInfo, CommandError> {
        let listener = self.listeners.get_mut(&id).ok_or(CommandError::NoListener(id))?;
        let channel_id = std::mem::take(&mut listener.channel_id);
        if let Some(&slot) = self.ids.get(&channel_id) {
            self.finalize(slot);
            info!(listener = id, "listener stopped");
        }
        if close_channels {
            let slots: Vec<usize> = self
                .ids
                .values()
                .copied()
                .filter(|&slot| self.channels[slot].as_ref().is_some_and(|ch| ch.listener_id == id))
                .collect();
            for slot in slots {
                self.begin_close(slot);
            }
        }
        Ok(self.listener_info(&self.listeners[&id]))
    }

    fn listener_info(&self, listener: &Listener) -> ListenerInfo {
        ListenerInfo {
            id: listener.id,
            address: listener.address,
            plugin: listener.plugin_name.clone(),
            generation: self.plugins[listener.plugin].generation,
            listening: listener.channel_id != 0,
            channel_count: listener.channel_count,
            config: listener.config.clone(),
            channel_id: listener.channel_id,
            created_at: listener.created_at,
        }
    }

    fn channel_info(&self, id: u64) -> Result<ChannelInfo, CommandError> {
        let slot = *self.ids.get(&id).ok_or(CommandError::NoChannel(id))?;
        Ok(self.info_of(self.channel_ref(slot)))
    }

    fn info_of(&self, ch: &Channel) -> ChannelInfo {
        let entry = &self.plugins[ch.plugin];
        ch.info(&entry.loaded.name, entry.generation)
    }

    /// Counters for a stats watcher: the live channels it watches (looked
    /// up by id when it names them, so watching a few channels costs a few
    /// lookups), then those that closed since its last snapshot (found by
    /// binary search: the log is in sequence order).
    fn stats_snapshot(&self, filter: &StatsFilter, closed_after: u64) -> StatsSnapshot {
        let live = |ch: &&Channel| ch.kind != ChannelKind::Listening && filter.matches(ch.id, ch.listener_id);
        let mut channels: Vec<ChannelStats> = if filter.channel_ids.is_empty() {
            self.ids
                .values()
                .filter_map(|&slot| self.channels[slot].as_ref())
                .filter(live)
                .map(|ch| ch.stats(false))
                .collect()
        } else {
            filter
                .channel_ids
                .iter()
                .filter_map(|id| self.ids.get(id))
                .filter_map(|&slot| self.channels[slot].as_ref())
                .filter(live)
                .map(|ch| ch.stats(false))
                .collect()
        };
        let oldest = self.closed.front().map_or(self.closed_seq + 1, |(seq, _)| *seq);
        let closed_missed = oldest.saturating_sub(closed_after.saturating_add(1));
        let first_new = self.closed.partition_point(|(seq, _)| *seq <= closed_after);
        channels.extend(
            self.closed
                .range(first_new..)
                .filter(|(_, s)| filter.matches(s.channel_id, s.listener_id))
                .map(|(_, s)| *s),
        );
        StatsSnapshot { channels, closed_seq: self.closed_seq, closed_missed }
    }

    fn start_drain(&mut self, deadline: Instant, reply: Reply<()>) {
        info!(channels = self.ids.len(), "draining: listeners stopped, channels closing");
        let ids: Vec<u64> = self.listeners.keys().copied().collect();
        for id in ids {
            let _ = self.stop_listener(id, true);
        }
        self.drain = Some(Drain { deadline, reply });
    }

    fn check_drain(&mut self, now: Instant) {
        let Some(drain) = &self.drain else { return };
        if !self.ids.is_empty() && now < drain.deadline {
            return;
        }
        if !self.ids.is_empty() {
            warn!(channels = self.ids.len(), "drain deadline passed; closing the rest now");
            let slots: Vec<usize> = self.ids.values().copied().collect();
            for slot in slots {
                self.finalize(slot);
            }
        }
        if let Some(drain) = self.drain.take() {
            let _ = drain.reply.send(Ok(()));
        }
        self.exit = true;
    }

    // ----- the channel map ------------------------------------------------

    fn insert(&mut self, mut channel: Channel) -> usize {
        channel.id = self.next_channel_id;
        self.next_channel_id += 1;
        channel.dirty = true;
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.channels[slot] = Some(channel);
                slot
            }
            None => {
                self.channels.push(Some(channel));
                self.channels.len() - 1
            }
        };
        let id = self.channel(slot).id;
        self.ids.insert(id, slot);
        self.dirty.push(slot);
        slot
    }

    fn channel(&mut self, slot: usize) -> &mut Channel {
        self.channels[slot].as_mut().expect("slot of a live channel")
    }

    fn channel_ref(&self, slot: usize) -> &Channel {
        self.channels[slot].as_ref().expect("slot of a live channel")
    }

    fn mark_dirty(&mut self, slot: usize) {
        if let Some(ch) = self.channels[slot].as_mut()
            && !ch.dirty
        {
            ch.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Adds a dispatcher created by a plugin (accepted or outbound) to the
    /// counts of its plugin and listener.
    fn count_dispatcher(&mut self, plugin: usize, listener_id: u64, delta: i64) {
        let entry = &mut self.plugins[plugin];
        entry.live_channels = entry.live_channels.saturating_add_signed(delta);
        if let Some(listener) = self.listeners.get_mut(&listener_id) {
            listener.channel_count = listener.channel_count.saturating_add_signed(delta);
        }
    }

    /// Graceful close: no more callbacks, flush the queue, then close.
    fn begin_close(&mut self, slot: usize) {
        let ch = self.channel(slot);
        match ch.phase {
            Phase::Closing | Phase::Lingering => return,
            Phase::Connecting | Phase::Open => {}
        }
        if ch.kind == ChannelKind::Listening {
            let listener_id = ch.listener_id;
            if let Some(listener) = self.listeners.get_mut(&listener_id) {
                listener.channel_id = 0;
            }
            self.finalize(slot);
            return;
        }
        ch.phase = Phase::Closing;
        let channel_id = ch.id;
        if let Some(dispatcher) = ch.dispatcher.take() {
            dispatcher.release();
        }
        self.push_timer(Instant::now() + CLOSE_DEADLINE, channel_id, TimerKind::CloseDeadline);
        self.mark_dirty(slot);
    }

    /// Removes the channel now: deregisters, frees the dispatcher, closes
    /// the socket, records the final figures.
    fn finalize(&mut self, slot: usize) {
        let Some(mut ch) = self.channels[slot].take() else { return };
        if ch.registered != 0 {
            let _ = self.poller.delete(ch.socket.as_fd());
        }
        if let Some(dispatcher) = ch.dispatcher.take() {
            dispatcher.release();
        }
        if ch.kind != ChannelKind::Listening {
            self.count_dispatcher(ch.plugin, ch.listener_id, -1);
            self.closed_seq += 1;
            if self.closed.len() == CLOSED_LOG {
                self.closed.pop_front();
            }
            self.closed.push_back((self.closed_seq, ch.stats(true)));
        } else if let Some(listener) = self.listeners.get_mut(&ch.listener_id)
            && listener.channel_id == ch.id
        {
            listener.channel_id = 0;
        }
        debug!(channel = ch.id, bytes_in = ch.counters.bytes_in, bytes_out = ch.counters.bytes_out, "channel closed");
        self.ids.remove(&ch.id);
        // The slot is reused only after this pass's events were all
        // dispatched: refresh_dirty, which frees most slots, runs before the
        // wait, and events naming a freed slot find it empty.
        self.free_slots.push(slot);
    }

    // ----- calling plugins ------------------------------------------------

    /// Calls `f` with the channel's dispatcher and a call context, and deals
    /// with a panic. Returns `None` if there is no dispatcher or it
    /// panicked.
    fn call<R>(
        &mut self,
        slot: usize,
        f: impl FnOnce(Dispatcher, &mut CallCtx) -> Result<R, crate::plugin_host::Panicked>,
    ) -> Option<R> {
        let result = self.call_unsettled(slot, f)?;
        self.settle(slot);
        Some(result)
    }

    /// [`call`](Core::call) without acting on what the callback asked for:
    /// for `handle_error`, after which the channel goes anyway.
    fn call_unsettled<R>(
        &mut self,
        slot: usize,
        f: impl FnOnce(Dispatcher, &mut CallCtx) -> Result<R, crate::plugin_host::Panicked>,
    ) -> Option<R> {
        let dispatcher = self.channels[slot].as_ref()?.dispatcher?;
        let mut ctx = CallCtx::new(self, Some(slot));
        // No reference into `self` is alive during the call: the plugin
        // reaches the core only through ctx's pointer.
        let result = f(dispatcher, &mut ctx);
        let report = ctx.report.take();
        match result {
            Ok(r) => Some(r),
            Err(_) => {
                self.poisoned(slot, report);
                None
            }
        }
    }

    /// A callback panicked: count and log it, drop the dispatcher, close its
    /// channel gracefully.
    fn poisoned(&mut self, slot: usize, report: Option<String>) {
        let ch = self.channel(slot);
        let (channel_id, plugin) = (ch.id, ch.plugin);
        let message = report.unwrap_or_else(|| "panicked".to_string());
        self.stats.panics += 1;
        self.plugins[plugin].panics += 1;
        let entry = &self.plugins[plugin];
        error!(
            plugin = %entry.loaded.name,
            generation = entry.generation,
            channel = channel_id,
            "{message}; closing the channel"
        );
        self.begin_close(slot);
    }

    fn handle_event(&mut self, slot: usize, event: u32, arg: i64) {
        self.stats.handler_calls += 1;
        self.call(slot, |d, ctx| d.handle_event(ctx, event, arg));
        self.mark_dirty(slot);
    }

    /// After a callback (or a flush): act on what the plugin asked for or
    /// what the socket reported meanwhile. A socket error is reported with
    /// `handle_error` and closes the channel at once; a close asked by the
    /// plugin starts a graceful close; a peer close seen by `recv` gets its
    /// `handle_close`, once.
    fn settle(&mut self, slot: usize) {
        let Some(ch) = self.channels[slot].as_mut() else { return };
        if let Some(error) = ch.failed.take() {
            let errno = error.raw_os_error().unwrap_or(EIO);
            debug!(channel = ch.id, %error, "socket error");
            if ch.dispatcher.is_some() && matches!(ch.phase, Phase::Open | Phase::Connecting) {
                ch.close_pending = false;
                ch.close_event_pending = false;
                ch.phase = Phase::Open;
                self.stats.handler_calls += 1;
                // Any further close or error asked from inside handle_error
                // is moot: the channel goes now.
                self.call_unsettled(slot, |d, ctx| d.handle_event(ctx, ffi::event::ERROR, i64::from(errno)));
            }
            self.finalize(slot);
            return;
        }
        if std::mem::take(&mut ch.close_pending) {
            ch.close_event_pending = false;
            self.begin_close(slot);
            return;
        }
        if std::mem::take(&mut ch.close_event_pending) && ch.phase == Phase::Open && ch.dispatcher.is_some() {
            self.handle_event(slot, ffi::event::CLOSE, 0);
        }
    }

    // ----- interest ---------------------------------------------------------

    /// Re-asks interest of the dirty channels. Asking runs plugin code,
    /// which may touch other channels (a `send_to` from `handle_error`); those
    /// are refreshed too, for a few rounds. Returns true if some are still
    /// dirty, in which case the next wait must not block.
    fn refresh_dirty(&mut self) -> bool {
        for _ in 0..8 {
            if self.dirty.is_empty() {
                return false;
            }
            let dirty = std::mem::take(&mut self.dirty);
            for &slot in &dirty {
                if let Some(ch) = self.channels[slot].as_mut() {
                    ch.dirty = false;
                    self.refresh(slot);
                }
            }
        }
        !self.dirty.is_empty()
    }

    fn refresh(&mut self, slot: usize) {
        let ch = self.channel(slot);
        let want = match (ch.kind, ch.phase) {
            (ChannelKind::Listening, _) => {
                if ch.paused_until.is_some() {
                    0
                } else {
                    self.stats.interest_queries += 1;
                    let answer = self.call(slot, |d, ctx| d.interest(ctx));
                    // A panic closed the listener: nothing left to register.
                    if self.channels[slot].is_none() {
                        return;
                    }
                    if answer.is_some_and(|(readable, _)| readable) { READ } else { 0 }
                }
            }
            (_, Phase::Connecting) => WRITE,
            (_, Phase::Open) => {
                self.stats.interest_queries += 1;
                let answer = self.call(slot, |d, ctx| d.interest(ctx));
                // The call may have closed the channel (a panic, a close()
                // from readable()): then decide from its new phase.
                let Some(ch) = self.channels[slot].as_mut() else { return };
                if ch.phase != Phase::Open {
                    return self.refresh(slot);
                }
                if ch.shutdown_after_flush && ch.out.is_empty() {
                    let _ = ch.shut_write();
                }
                let (readable, writable) = answer.unwrap_or((false, false));
                ch.wants_write = writable;
                let mut bits = 0;
                if readable && !ch.read_eof && ch.dispatcher.is_some() {
                    bits |= READ;
                }
                if writable || !ch.out.is_empty() {
                    bits |= WRITE;
                }
                bits
            }
            (_, Phase::Closing) => {
                if !ch.out.is_empty() {
                    if ch.read_eof { WRITE } else { WRITE | READ }
                } else if ch.read_eof || matches!(ch.socket, Socket::Pipe(_)) {
                    self.finalize(slot);
                    return;
                } else {
                    // Flushed: shut down writing (the peer sees EOF after
                    // every byte), then linger for the peer's close.
                    if ch.shut_write().is_err() {
                        self.finalize(slot);
                        return;
                    }
                    ch.phase = Phase::Lingering;
                    let channel_id = ch.id;
                    self.push_timer(Instant::now() + LINGER, channel_id, TimerKind::EndLinger);
                    READ
                }
            }
            (_, Phase::Lingering) => READ,
        };
        self.set_interest(slot, want);
    }

    fn set_interest(&mut self, slot: usize, want: u8) {
        let ch = self.channels[slot].as_mut().expect("slot of a live channel");
        if ch.registered == want {
            return;
        }
        self.stats.interest_changes += 1;
        let mut event = Event::new(slot, want & READ != 0, want & WRITE != 0);
        if want & READ != 0 && ch.kind != ChannelKind::Listening {
            event = event.with_priority();
        }
        let result = if want == 0 {
            // epoll cannot mask hang-ups: a socket that wants nothing is
            // removed, or a closed peer would wake every pass.
            self.poller.delete(ch.socket.as_fd())
        } else if ch.registered == 0 {
            // SAFETY: the socket is deleted from the poller in finalize (or
            // above, when its interest becomes empty) before it is dropped.
            unsafe { self.poller.add_with_mode(&ch.socket.as_fd(), event, PollMode::Level) }
        } else {
            self.poller.modify_with_mode(ch.socket.as_fd(), event, PollMode::Level)
        };
        match result {
            Ok(()) => ch.registered = want,
            Err(e) => {
                error!(channel = ch.id, error = %e, "cannot register with the poller; closing");
                ch.failed = Some(e);
                self.settle(slot);
            }
        }
    }

    fn push_timer(&mut self, at: Instant, channel_id: u64, kind: TimerKind) {
        self.timers.push(Reverse(Timer { at, channel_id, kind }));
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse(timer)) = self.timers.peek().copied() {
            if timer.at > now {
                break;
            }
            self.timers.pop();
            match timer.kind {
                TimerKind::DrainGenerations { keep } => {
                    self.drain_generations(keep);
                    continue;
                }
                // Cancelled (or handed over with its channel): skip.
                TimerKind::Call { timer_id, .. } if self.live_calls.remove(&timer_id).is_none() => continue,
                _ => {}
            }
            let Some(&slot) = self.ids.get(&timer.channel_id) else { continue };
            match timer.kind {
                TimerKind::ResumeAccept => {
                    self.channel(slot).paused_until = None;
                    self.mark_dirty(slot);
                }
                TimerKind::EndLinger => {
                    if self.channel(slot).phase == Phase::Lingering {
                        self.finalize(slot);
                    }
                }
                TimerKind::Call { token, .. } => {
                    if self.is_open(slot) {
                        self.handle_event(slot, ffi::event::TIMER, token as i64);
                    }
                }
                TimerKind::CloseDeadline => {
                    if self.channel_ref(slot).phase == Phase::Closing {
                        warn!(channel = timer.channel_id, "output not flushed in time; closing now");
                        self.finalize(slot);
                    }
                }
                // Handled above: it belongs to no channel.
                TimerKind::DrainGenerations { .. } => {}
                TimerKind::IdleCheck => {
                    let ch = self.channel(slot);
                    let Some(timeout) = ch.idle_timeout else { continue };
                    if !matches!(ch.phase, Phase::Open | Phase::Connecting) {
                        continue;
                    }
                    let due = ch.last_activity + timeout;
                    if due <= now {
                        info!(channel = ch.id, timeout_ms = timeout.as_millis() as u64, "idle timeout; closing");
                        self.begin_close(slot);
                    } else {
                        let channel_id = ch.id;
                        self.push_timer(due, channel_id, TimerKind::IdleCheck);
                    }
                }
            }
        }
    }

    // ----- events -----------------------------------------------------------

    fn dispatch(&mut self, event: Event) {
        let slot = event.key;
        let Some(ch) = self.channels.get(slot).and_then(Option::as_ref) else { return };
        match ch.socket {
            Socket::Listener(_) => self.accept(slot),
            Socket::Stream(_) | Socket::Pipe(_) => self.stream_event(slot, event),
        }
    }

    fn accept(&mut self, listener_slot: usize) {
        for _ in 0..ACCEPTS_PER_PASS {
            let Some(ch) = self.channels[listener_slot].as_mut() else { return };
            let Socket::Listener(listener) = &ch.socket else { return };
            let (listener_id, plugin) = (ch.listener_id, ch.plugin);
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.stats.accepts += 1;
                    self.accepted(listener_slot, listener_id, plugin, stream, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_transient_accept_error(&e) => continue,
                Err(e) => {
                    // EMFILE and friends: the connection stays in the
                    // backlog; stop asking for a while instead of spinning.
                    warn!(listener = listener_id, error = %e, "accept failed; pausing this listener for 100 ms");
                    let ch = self.channel(listener_slot);
                    ch.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    let channel_id = ch.id;
                    self.push_timer(Instant::now() + ACCEPT_PAUSE, channel_id, TimerKind::ResumeAccept);
                    self.mark_dirty(listener_slot);
                    return;
                }
            }
        }
    }

    fn accepted(&mut self, listener_slot: usize, listener_id: u64, plugin: usize, stream: TcpStream, peer: SocketAddr) {
        if let Err(e) = stream.set_nonblocking(true) {
            warn!(listener = listener_id, error = %e, "cannot make an accepted socket non-blocking; dropping it");
            return;
        }
        // Nagle's algorithm stalls request/response protocols by up to 40 ms
        // per message; handlers write whole messages anyway.
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let slot = self.insert(Channel::new(
            ChannelKind::Accepted,
            Socket::Stream(stream),
            listener_id,
            0,
            plugin,
            None,
            Phase::Open,
            Some(peer),
            local,
        ));
        self.count_dispatcher(plugin, listener_id, 1);
        let idle_timeout = self.listeners.get(&listener_id).and_then(|l| l.idle_timeout);
        if let Some(timeout) = idle_timeout {
            let ch = self.channel(slot);
            ch.idle_timeout = Some(timeout);
            let channel_id = ch.id;
            self.push_timer(self.now + timeout, channel_id, TimerKind::IdleCheck);
        }

        let Some(listening) = self.channel_ref(listener_slot).dispatcher else { return };
        self.stats.handler_calls += 1;
        let mut ctx = CallCtx::new(self, Some(slot));
        let answer = listening.handle_accepted(&mut ctx);
        let report = ctx.report.take();
        match answer {
            Ok(Some(dispatcher)) => {
                self.channel(slot).dispatcher = Some(dispatcher);
                debug!(channel = self.channel_ref(slot).id, listener = listener_id, %peer, "accepted");
                self.settle(slot);
            }
            Ok(None) => self.begin_close(slot),
            Err(_) => {
                self.begin_close(slot);
                self.poisoned(listener_slot, report);
            }
        }
    }

    fn stream_event(&mut self, slot: usize, event: Event) {
        let phase = self.channel_ref(slot).phase;
        match phase {
            Phase::Lingering => {
                if self.discard_input(slot) {
                    self.finalize(slot);
                }
                return;
            }
            Phase::Closing => {
                // Input is discarded while the output flushes: a peer
                // blocked writing to us may only read once its write went
                // through.
                if event.readable && self.discard_input(slot) {
                    self.channel(slot).read_eof = true;
                }
            }
            Phase::Connecting => {
                if !self.connect_finished(slot) {
                    return;
                }
            }
            Phase::Open => {}
        }

        // handle_connect may have failed the channel.
        let Some(registered) = self.channels[slot].as_ref().map(|ch| ch.registered) else { return };
        if event.is_priority() && registered & READ != 0 && self.is_open(slot) {
            self.handle_event(slot, ffi::event::EXPT, 0);
            self.discard_urgent(slot);
        }
        if event.readable && registered & READ != 0 && self.is_open(slot) {
            self.handle_event(slot, ffi::event::READ, 0);
        } else if event.is_interrupt() && registered & READ == 0 && self.is_open(slot) {
            // A hang-up while we were not reading (backpressure): the peer
            // is gone in both directions.
            self.peer_closed(slot);
        }
        if event.writable || event.is_interrupt() {
            self.flush(slot);
            let wants_write = self.channels[slot].as_ref().is_some_and(|ch| ch.wants_write && ch.out.is_empty());
            if wants_write && self.is_open(slot) {
                self.handle_event(slot, ffi::event::WRITE, 0);
            }
        }
        self.mark_dirty(slot);
    }

    fn is_open(&self, slot: usize) -> bool {
        self.channels[slot].as_ref().is_some_and(|ch| ch.phase == Phase::Open && ch.dispatcher.is_some())
    }

    /// The first event of an outbound socket: connected, or failed.
    fn connect_finished(&mut self, slot: usize) -> bool {
        let ch = self.channel(slot);
        let stream = ch.stream().expect("outbound channels are streams");
        let error = match stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => stream.peer_addr().err(),
        };
        if let Some(error) = error {
            let error = if error.kind() == io::ErrorKind::NotConnected {
                io::Error::from(io::ErrorKind::ConnectionRefused)
            } else {
                error
            };
            ch.failed = Some(error);
            ch.phase = Phase::Open;
            self.settle(slot);
            return false;
        }
        let (peer, local) = (stream.peer_addr().ok(), stream.local_addr().ok());
        ch.phase = Phase::Open;
        ch.peer = peer;
        ch.local = local;
        self.handle_event(slot, ffi::event::CONNECT, 0);
        true
    }

    /// The peer closed: `handle_close`, once.
    fn peer_closed(&mut self, slot: usize) {
        let ch = self.channel(slot);
        if ch.read_eof {
            return;
        }
        ch.read_eof = true;
        ch.close_event_pending = true;
        self.settle(slot);
    }

    fn flush(&mut self, slot: usize) {
        let now = self.now;
        let Some(ch) = self.channels[slot].as_mut() else { return };
        match ch.out.flush_to(&mut ch.socket) {
            Ok((bytes, writes)) => {
                if bytes > 0 {
                    ch.last_activity = now;
                }
                ch.counters.bytes_out += bytes;
                ch.counters.writes += writes;
            }
            Err(e) => {
                ch.out.clear();
                ch.failed = Some(e);
                self.settle(slot);
            }
        }
    }

    fn discard_urgent(&mut self, slot: usize) {
        let Some(stream) = self.channels[slot].as_mut().and_then(Channel::stream) else { return };
        let mut byte = [std::mem::MaybeUninit::new(0u8); 1];
        let _ = socket2::SockRef::from(&*stream).recv_out_of_band(&mut byte);
    }

    /// Reads and drops what a closing channel's peer still sends (a bounded
    /// amount per event). Returns true once the peer closed or failed.
    fn discard_input(&mut self, slot: usize) -> bool {
        let ch = self.channel(slot);
        let mut scratch = [0u8; 16 * 1024];
        for _ in 0..16 {
            match io::Read::read(&mut ch.socket, &mut scratch) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        false
    }

    /// Starts an outbound connection for a plugin.
    fn connect(&mut self, parent_slot: usize, address: &str, dispatcher: Dispatcher) -> Result<u64, io::Error> {
        let address: SocketAddr = address.parse().map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let socket = RawSocket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        let _ = socket.set_tcp_nodelay(true);
        match socket.connect(&address.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(self.insert_child(
            parent_slot,
            ChannelKind::Outbound,
            Socket::Stream(socket.into()),
            dispatcher,
            Phase::Connecting,
            Some(address),
        ))
    }

    /// Adds a channel over a descriptor a plugin handed over.
    fn attach(&mut self, parent_slot: usize, file: std::fs::File, dispatcher: Dispatcher) -> Result<u64, io::Error> {
        set_nonblocking(&file)?;
        Ok(self.insert_child(parent_slot, ChannelKind::File, Socket::Pipe(file), dispatcher, Phase::Open, None))
    }

    /// Adds a channel a plugin created from channel `parent_slot`: it belongs
    /// to the same listener and plugin generation. Returns its id.
    fn insert_child(
        &mut self,
        parent_slot: usize,
        kind: ChannelKind,
        socket: Socket,
        dispatcher: Dispatcher,
        phase: Phase,
        peer: Option<SocketAddr>,
    ) -> u64 {
        let parent = self.channel_ref(parent_slot);
        let (listener_id, parent_id, plugin) = (parent.listener_id, parent.id, parent.plugin);
        let slot = self.insert(Channel::new(
            kind,
            socket,
            listener_id,
            parent_id,
            plugin,
            Some(dispatcher),
            phase,
            peer,
            None,
        ));
        self.count_dispatcher(plugin, listener_id, 1);
        self.channel_ref(slot).id
    }
}

fn set_nonblocking(file: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with plain integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const EINPROGRESS: i32 = libc::EINPROGRESS;
const EIO: i32 = libc::EIO;

/// Errors after which the next `accept` may well succeed.
fn is_transient_accept_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    ) || error.raw_os_error() == Some(71 /* EPROTO */)
}

/// Binds a non-blocking listening socket.
fn bind(address: SocketAddr) -> Result<TcpListener, CommandError> {
    let bind_error = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            CommandError::AddressInUse { address }
        } else {
            CommandError::Bind { address, source }
        }
    };
    let socket = RawSocket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP)).map_err(bind_error)?;
    // Restarting the daemon must not fail on connections still in
    // TIME_WAIT.
    socket.set_reuse_address(true).map_err(bind_error)?;
    if address.is_ipv6() {
        let _ = socket.set_only_v6(true);
    }
    socket.bind(&address.into()).map_err(bind_error)?;
    socket.listen(1024).map_err(bind_error)?;
    socket.set_nonblocking(true).map_err(bind_error)?;
    Ok(socket.into())
}
