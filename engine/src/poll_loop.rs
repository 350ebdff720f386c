//! The asyncore engine: a level-triggered poll loop over a channel map.
//!
//! One [`Engine`] runs on one thread (`poll-loop` in the daemon) and owns
//! every socket, dispatcher, output queue and timer. A pass of the loop:
//!
//! 1. serves the commands queued by other threads ([`commands`]),
//! 2. fires due timers ([`timers`]),
//! 3. re-asks `readable()`/`writable()` of the *dirty* channels only (those
//!    whose handler ran, or that a command or another channel touched) and
//!    updates their registration with the poller when the answer changed
//!    ([`interest`]),
//! 4. waits,
//! 5. calls the handlers of the channels that are ready ([`events`],
//!    through [`callbacks`]).
//!
//! So a pass costs what is ready or changed, never what is merely open: ten
//! thousand idle channels cost nothing. Python's asyncore instead rebuilds
//! its whole poll set every pass.
//!
//! The other modules: [`channel_map`] (the table and a channel's end),
//! [`channel`] (one entry), [`requests`] (what plugins ask of the loop
//! during a callback), [`plugins`] (generations), [`closed_log`] (closed
//! channels for stats watchers), [`log_limit`] (log lines that could repeat
//! at traffic rate).

mod callbacks;
mod channel;
mod channel_map;
mod closed_log;
mod commands;
mod events;
mod interest;
mod log_limit;
mod plugins;
mod requests;
mod stats_changes;
mod timers;

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io,
    net::SocketAddr,
    sync::{Arc, mpsc},
    time::{Duration, Instant, SystemTime},
};

use crate::epoll::{Events, Poller};

use self::{
    channel_map::ChannelMap,
    closed_log::ClosedLog,
    log_limit::{AcceptPauses, LogLimits},
    plugins::Generations,
    timers::Timers,
};
use crate::{
    command::{Command, CommandError, EngineHandle, ListenerInfo, LoopStats, PluginInfo, Reply},
    ids::{ChannelId, GenerationIndex, ListenerId, TimerId},
    loader::LoadedPlugin,
};

/// How long a graceful close may take unless set
/// (`Engine::set_close_timeout`).
pub(crate) const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a plugin call may run before it is logged and counted as slow,
/// unless set (`Engine::set_slow_callback`): 10 ms of one callback is 10 ms
/// that every other channel waited.
pub(crate) const DEFAULT_SLOW_CALLBACK: Duration = Duration::from_millis(10);

/// Closed-channel records kept for stats watchers.
const CLOSED_LOG: usize = 65_536;

struct Listener {
    id: ListenerId,
    address: SocketAddr,
    /// The plugin (by name) serving this listener...
    plugin_name: String,
    /// ... and the generation of its listening dispatcher (the last one,
    /// once stopped: its record may be forgotten since, see
    /// `Generations`)...
    generation: GenerationIndex,
    /// ... and that generation's number, which a stopped listener still
    /// lists.
    generation_number: u32,
    idle_timeout: Option<Duration>,
    config: BTreeMap<String, String>,
    /// The listening channel; `None` once stopped.
    channel: Option<ChannelId>,
    channel_count: u64,
    created_at: SystemTime,
    /// When its listening dispatcher panicked lately (the panic budget).
    recent_panics: VecDeque<Instant>,
    /// It stopped because its listening dispatcher panicked too often.
    stopped_by_panics: bool,
    /// Listening but not accepting: its listening channel is kept out of
    /// the poller (`accept_paused`), so connections wait in the backlog.
    suspended: bool,
    /// The most accepted connections open at once (`max_connections`).
    max_connections: Option<u64>,
    /// Accepted connections still in the map, closing ones included.
    connections: u64,
    /// Connections closed at once because a limit was reached.
    connections_refused: u64,
    /// A `DrainListener` waiting for `channel_count` to reach 0.
    draining: Option<ListenerDrain>,
}

/// A `DrainListener` under way: its reply, sent once the listener's
/// channels are gone, and its deadline's timer while it is pending.
struct ListenerDrain {
    reply: Reply<ListenerInfo>,
    deadline: Option<(Instant, TimerId)>,
}

struct Drain {
    deadline: Instant,
    reply: Reply<()>,
    /// Channels whose close waits for the kernel's send queue to empty
    /// (`ChannelMap::end_close`), re-checked at `next_check`.
    awaiting: std::collections::BTreeSet<ChannelId>,
    next_check: Option<Instant>,
    /// Channels that waited for their send queue at some point.
    waited: u64,
}

impl Drain {
    /// When the loop must wake for the drain: its deadline, or the next
    /// check of the send queues.
    fn next_wake(&self) -> Instant {
        self.next_check.map_or(self.deadline, |check| check.min(self.deadline))
    }
}

/// Everything the loop owns except the poller's event buffer and the
/// command queue. Plugins reach it, during a callback, only through the
/// call's context (`host_abi`).
struct Core {
    poller: Arc<Poller>,
    channels: ChannelMap,
    listeners: BTreeMap<ListenerId, Listener>,
    plugins: Generations,
    /// Plugin name to its current generation.
    current: HashMap<String, GenerationIndex>,
    timers: Timers,
    /// The clock of the current pass (read once after each wait).
    now: Instant,
    closed: ClosedLog,
    last_listener_id: u64,
    stats: LoopStats,
    drain: Option<Drain>,
    /// How long a graceful close may take (telling the dispatcher, its
    /// remaining output, the host's queue) before what is left is dropped
    /// and counted.
    close_timeout: Duration,
    /// A plugin call that runs longer is logged and counted
    /// (`LoopStats::slow_callbacks`).
    slow_callback: Duration,
    /// Rate limits of the lines that could repeat at traffic rate.
    log_limits: LogLimits,
    /// Accept pauses for lack of descriptors, summed up in the log.
    accept_pauses: AcceptPauses,
    /// Accepted connections in the map, of every listener (closing ones
    /// included), and the most the loop keeps open at once.
    connections: u64,
    max_connections: Option<u64>,
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
                channels: ChannelMap::default(),
                listeners: BTreeMap::new(),
                plugins: Generations::default(),
                current: HashMap::new(),
                timers: Timers::default(),
                now: Instant::now(),
                closed: ClosedLog::new(CLOSED_LOG),
                last_listener_id: 0,
                stats: LoopStats::default(),
                drain: None,
                close_timeout: DEFAULT_CLOSE_TIMEOUT,
                slow_callback: DEFAULT_SLOW_CALLBACK,
                log_limits: LogLimits::default(),
                accept_pauses: AcceptPauses::default(),
                connections: 0,
                max_connections: None,
                exit: false,
            },
            events: Events::new(),
            commands: rx,
            handle: EngineHandle::new(tx, poller),
        })
    }

    /// Sets how long a graceful close may take (the dispatcher finishing
    /// its output, then the host flushing its queue to the peer) before
    /// what is left is dropped and logged with its byte count. The daemon
    /// sets its drain timeout here.
    pub fn set_close_timeout(&mut self, timeout: Duration) {
        self.core.close_timeout = timeout;
    }

    /// Sets how long a plugin call may run before it is slow: logged (a
    /// warning with the plugin, generation and channel, at most one a
    /// second) and counted in [`LoopStats::slow_callbacks`]. A callback runs
    /// on the loop's one thread, so for that long no other channel is
    /// served. 10 ms unless set.
    pub fn set_slow_callback(&mut self, threshold: Duration) {
        self.core.slow_callback = threshold;
    }

    /// Sets the most accepted connections open at once over every
    /// listener (`None`: no limit but each listener's own). Past it, a new
    /// connection is accepted and closed at once, and counted in its
    /// listener's [`ListenerInfo::connections_refused`].
    pub fn set_max_connections(&mut self, max_connections: Option<u64>) {
        self.core.max_connections = max_connections;
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
    /// [`CommandError::NoListener`] for an unknown id,
    /// [`CommandError::ListenerStopped`] for one already stopped.
    pub fn stop_listener(&mut self, id: u64, close_channels: bool) -> Result<ListenerInfo, CommandError> {
        self.core.stop_listener(ListenerId(id), close_channels)
    }

    /// Number of channels in the map.
    pub fn n_channels(&self) -> usize {
        self.core.channels.len()
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
        while !self.core.channels.is_empty() && count.is_none_or(|c| passes < c) {
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
        // Before anything holds a generation index: the records of retired
        // generations whose libraries went as their channels closed (in the
        // last pass), so that this pass's listings leave them out.
        self.core.forget_old_generations();
        while let Ok(command) = self.commands.try_recv() {
            self.core.stats.commands += 1;
            self.core.serve(command);
        }
        let now = Instant::now();
        self.core.fire_timers(now);
        self.core.log_limits.report_ended(now);
        self.core.accept_pauses.report(now);
        let still_dirty = self.core.refresh_dirty();
        self.core.check_drain(now);
        if self.core.exit {
            return Ok(());
        }

        // Wake for the next timer, the drain deadline and the count of
        // suppressed log lines; do not block at all while channels wait to
        // be refreshed.
        let deadlines = [
            self.core.timers.next_deadline(),
            self.core.drain.as_ref().map(Drain::next_wake),
            self.core.log_limits.next_report(),
            self.core.accept_pauses.next_report(),
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
    /// (as `epoll` wants: a closed descriptor may linger in it through a duplicate), and dispatchers are freed.
    fn drop(&mut self) {
        for slot in self.core.channels.slots() {
            self.core.finalize(slot);
        }
    }
}
