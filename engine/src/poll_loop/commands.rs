//! Serving the [`Command`]s other threads queue: listeners, channel
//! listings, stats, plugin generations (in `plugins`), the drain.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{SocketAddr, TcpListener},
    time::{Duration, Instant, SystemTime},
};

use socket2::{Domain, Protocol, Socket as RawSocket, Type};
use tracing::{info, warn};

use super::{
    Core, Drain, Listener, ListenerDrain,
    channel::{Channel, NewChannel, Phase, ShutdownReason, Socket},
    timers::TimerKind,
};
use crate::{
    command::{
        ChannelInfo, ChannelKind, ChannelStats, Command, CommandError, DaemonLimits, ListenerInfo, LoopStats, Reply,
        StatsFilter, StatsSnapshot, parse_max_connections,
    },
    config::{parse_duration, plugin_config},
    host_abi::CallCtx,
    ids::{ChannelId, ListenerId},
};

/// Stopped listeners with no channels left that `ListListeners` still
/// shows; older ones are forgotten, so that start/stop cycles do not grow
/// the map for ever.
const STOPPED_LISTENERS_KEPT: usize = 100;

/// How often a drain re-checks the send queues of the channels waiting
/// for their peers' acknowledgements: often enough that the daemon exits
/// soon after the last one, rarely enough to cost nothing.
const SEND_QUEUE_CHECK: Duration = Duration::from_millis(25);

impl Core {
    pub(super) fn serve(&mut self, command: Command) {
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
                let _ = reply.send(self.stop_listener(ListenerId(id), close_channels));
            }
            Command::SuspendListener { id, reply } => {
                let _ = reply.send(self.suspend_listener(ListenerId(id), true));
            }
            Command::ResumeListener { id, reply } => {
                let _ = reply.send(self.suspend_listener(ListenerId(id), false));
            }
            Command::DrainListener { id, timeout, reply } => self.drain_listener(ListenerId(id), timeout, reply),
            Command::SetListenerLimits { id, max_connections, reply } => {
                let _ = reply.send(self.set_listener_limits(ListenerId(id), max_connections));
            }
            Command::DaemonLimits { set, reply } => {
                if let Some(max_connections) = set {
                    self.max_connections = max_connections;
                    info!(max_connections = max_connections.unwrap_or(0), "daemon limits set");
                }
                let _ = reply
                    .send(Ok(DaemonLimits { max_connections: self.max_connections, connections: self.connections }));
            }
            Command::ListListeners { after, limit, reply } => {
                let after = (std::ops::Bound::Excluded(ListenerId(after)), std::ops::Bound::Unbounded);
                let page = self.listeners.range(after).take(limit);
                let _ = reply.send(Ok(page.map(|(_, l)| self.listener_info(l)).collect()));
            }
            Command::ListChannels { listener_id, after, limit, reply } => {
                let list = self
                    .channels
                    .iter_after(after)
                    .filter(|ch| listener_id.is_none_or(|l| ch.listener.0 == l))
                    .take(limit)
                    .map(|ch| self.info_of(ch))
                    .collect();
                let _ = reply.send(Ok(list));
            }
            Command::GetChannel { id, reply } => {
                // Asked of the dispatcher only here, when someone looks.
                let annotations = match self.channels.slot_of(ChannelId(id)) {
                    Some(slot) if self.is_open(slot) => self.call(slot, |d, ctx| d.describe(ctx)).unwrap_or_default(),
                    _ => Vec::new(),
                };
                let answer = self.channel_info(ChannelId(id)).map(|info| ChannelInfo { annotations, ..info });
                let _ = reply.send(answer);
            }
            Command::CloseChannel { id, reply } => {
                let answer = match self.channels.slot_of(ChannelId(id)) {
                    Some(slot) if self.channels[slot].kind == ChannelKind::Listening => {
                        Err(CommandError::ListeningChannel { id, listener: self.channels[slot].listener.0 })
                    }
                    Some(slot) => {
                        self.shut_down(slot, ShutdownReason::Control);
                        self.channel_info(ChannelId(id))
                    }
                    None => Err(CommandError::NoChannel(id)),
                };
                let _ = reply.send(answer);
            }
            Command::Stats { filter, closed_after, reply } => {
                let _ = reply.send(Ok(self.stats_snapshot(&filter, closed_after)));
            }
            Command::StatsChanges { filter, closed_after, since, reply } => {
                let _ = reply.send(Ok(self.stats_changes(&filter, closed_after, since)));
            }
            Command::AddPlugin { plugin, activate, drain_timeout, generation, reply } => {
                let _ = reply.send(self.add_plugin_as(*plugin, activate, drain_timeout, generation));
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
            #[cfg(feature = "fault-injection")]
            Command::PanicForTest => panic!("fault injected: the poll loop panics on purpose"),
        }
    }

    pub(super) fn loop_stats(&self) -> LoopStats {
        LoopStats { channels: self.channels.len() as u64, ..self.stats }
    }

    pub(super) fn start_listener(
        &mut self,
        address: SocketAddr,
        plugin_name: &str,
        config: BTreeMap<String, String>,
    ) -> Result<ListenerInfo, CommandError> {
        let generation =
            *self.current.get(plugin_name).ok_or_else(|| CommandError::NoPlugin(plugin_name.to_string()))?;
        let idle_timeout = match config.get("idle_timeout") {
            None => None,
            Some(text) => Some(parse_duration(text).ok_or_else(|| CommandError::BadConfig {
                key: "idle_timeout",
                message: format!("{text:?} is not a duration such as 30s, 500ms or 2m"),
            })?),
        };
        let max_connections = match config.get("max_connections") {
            None => None,
            Some(text) => parse_max_connections(text)
                .map_err(|message| CommandError::BadConfig { key: "max_connections", message })?,
        };
        let listener = bind(address)?;
        let local = listener.local_addr().ok();

        let entries = self.plugins[generation].loaded.entries;
        let dispatcher = entries
            .listen(&mut CallCtx::detached(), &plugin_config(&config))
            .map_err(|message| CommandError::PluginRefused { plugin: plugin_name.to_string(), message })?;

        self.last_listener_id += 1;
        let id = ListenerId(self.last_listener_id);
        let address = local.unwrap_or(address);
        let slot = self.insert(NewChannel {
            kind: ChannelKind::Listening,
            socket: Socket::Listener(listener),
            listener: id,
            parent: None,
            generation,
            dispatcher: Some(dispatcher),
            phase: Phase::Open,
            peer: None,
            local,
        });
        let channel = Some(self.channels[slot].id);
        self.listeners.insert(
            id,
            Listener {
                id,
                address,
                plugin_name: plugin_name.to_string(),
                generation,
                generation_number: self.plugins[generation].generation,
                idle_timeout,
                config,
                channel,
                channel_count: 0,
                created_at: SystemTime::now(),
                recent_panics: Default::default(),
                stopped_by_panics: false,
                suspended: false,
                max_connections,
                connections: 0,
                connections_refused: 0,
                draining: None,
            },
        );
        info!(listener = id.0, %address, plugin = %plugin_name, "listener started");
        self.forget_old_stopped_listeners();
        Ok(self.listener_info(&self.listeners[&id]))
    }

    /// Stops accepting; with `close_channels`, also closes the listener's
    /// channels gracefully. A listener already stopped is refused, and
    /// nothing is done.
    pub(super) fn stop_listener(&mut self, id: ListenerId, close_channels: bool) -> Result<ListenerInfo, CommandError> {
        let listener = self.listeners.get_mut(&id).ok_or(CommandError::NoListener(id.0))?;
        let channel_id = listener.channel.take().ok_or(CommandError::ListenerStopped(id.0))?;
        if let Some(slot) = self.channels.slot_of(channel_id) {
            self.finalize(slot);
        }
        info!(listener = id.0, "listener stopped");
        if close_channels {
            for slot in self.channels.slots_where(|ch| ch.listener == id) {
                self.shut_down(slot, ShutdownReason::Control);
            }
        }
        let info = self.listener_info(&self.listeners[&id]);
        self.forget_old_stopped_listeners();
        Ok(info)
    }

    /// Suspends (`suspend`) or resumes accepting. The listening socket
    /// stays bound and listening; while suspended its channel is kept out
    /// of the poller (`accept_paused`), so the kernel holds new
    /// connections in the backlog.
    fn suspend_listener(&mut self, id: ListenerId, suspend: bool) -> Result<ListenerInfo, CommandError> {
        let listener = self.listeners.get_mut(&id).ok_or(CommandError::NoListener(id.0))?;
        let channel_id = listener.channel.ok_or(CommandError::ListenerStopped(id.0))?;
        if listener.suspended != suspend {
            listener.suspended = suspend;
            if let Some(slot) = self.channels.slot_of(channel_id) {
                // Resuming during an accept pause (EMFILE) tries one accept
                // early; it pauses again if descriptors are still short.
                self.channels[slot].accept_paused = suspend;
                self.channels.mark_dirty(slot);
            }
            info!(listener = id.0, "{}", if suspend { "listener suspended" } else { "listener resumed" });
        }
        Ok(self.listener_info(&self.listeners[&id]))
    }

    /// Stops accepting, then answers once the listener's channels are all
    /// gone ([`finish_listener_drain`](Core::finish_listener_drain)); at
    /// `timeout` the rest are closed gracefully
    /// ([`listener_drain_deadline`](Core::listener_drain_deadline)).
    fn drain_listener(&mut self, id: ListenerId, timeout: Duration, reply: Reply<ListenerInfo>) {
        if let Err(e) = self.stop_listener(id, false) {
            let _ = reply.send(Err(e));
            return;
        }
        let channels = self.listeners[&id].channel_count;
        if channels == 0 {
            let _ = reply.send(Ok(self.listener_info(&self.listeners[&id])));
            return;
        }
        let deadline = Instant::now().checked_add(timeout);
        let timer = self.timers.arm(deadline, None, TimerKind::ListenerDrainDeadline { listener: id });
        info!(
            listener = id.0,
            channels,
            timeout_ms = timeout.as_millis() as u64,
            "listener stopped; waiting for its channels to finish"
        );
        if let Some(listener) = self.listeners.get_mut(&id) {
            listener.draining = Some(ListenerDrain { reply, deadline: deadline.map(|at| (at, timer)) });
        }
    }

    /// The last channel of a draining listener is gone: answer the
    /// `DrainListener`, and cancel its deadline.
    pub(super) fn finish_listener_drain(&mut self, id: ListenerId) {
        let Some(drain) = self.listeners.get_mut(&id).and_then(|l| l.draining.take()) else { return };
        if let Some((at, timer)) = drain.deadline {
            self.timers.cancel(at, timer);
        }
        info!(listener = id.0, "listener drained: its channels have all closed");
        let _ = drain.reply.send(Ok(self.listener_info(&self.listeners[&id])));
    }

    /// A draining listener's deadline: its channels left are closed
    /// gracefully (a scan of the map, once per drain); the answer waits
    /// until they are gone, which the close timeout bounds.
    pub(super) fn listener_drain_deadline(&mut self, id: ListenerId) {
        let Some(drain) = self.listeners.get_mut(&id).and_then(|l| l.draining.as_mut()) else { return };
        drain.deadline = None;
        let slots = self.channels.slots_where(|ch| ch.listener == id);
        info!(listener = id.0, channels = slots.len(), "listener drain timeout: closing its channels left gracefully");
        for slot in slots {
            self.shut_down(slot, ShutdownReason::Control);
        }
    }

    /// Sets a running listener's `max_connections`, kept in its config
    /// too (so listings and saved state show it).
    fn set_listener_limits(
        &mut self,
        id: ListenerId,
        max_connections: Option<u64>,
    ) -> Result<ListenerInfo, CommandError> {
        let listener = self.listeners.get_mut(&id).ok_or(CommandError::NoListener(id.0))?;
        if listener.channel.is_none() {
            return Err(CommandError::ListenerStopped(id.0));
        }
        listener.max_connections = max_connections;
        match max_connections {
            Some(n) => listener.config.insert("max_connections".to_string(), n.to_string()),
            None => listener.config.remove("max_connections"),
        };
        info!(listener = id.0, max_connections = max_connections.unwrap_or(0), "listener limits set");
        Ok(self.listener_info(&self.listeners[&id]))
    }

    /// Whether a connection just accepted by `listener_id` would pass a
    /// limit: its listener's `max_connections` or the loop's. If so it is
    /// counted as refused.
    pub(super) fn over_connection_limit(&mut self, listener_id: ListenerId) -> bool {
        let global_full = self.max_connections.is_some_and(|max| self.connections >= max);
        let Some(listener) = self.listeners.get_mut(&listener_id) else { return global_full };
        let full = global_full || listener.max_connections.is_some_and(|max| listener.connections >= max);
        if full {
            listener.connections_refused += 1;
        }
        full
    }

    /// Forgets the oldest stopped listeners that have no channels left,
    /// beyond the newest [`STOPPED_LISTENERS_KEPT`]. A stopped listener
    /// whose channels still run stays: they refer to it.
    fn forget_old_stopped_listeners(&mut self) {
        let idle_stopped: Vec<ListenerId> =
            self.listeners.values().filter(|l| l.channel.is_none() && l.channel_count == 0).map(|l| l.id).collect();
        let excess = idle_stopped.len().saturating_sub(STOPPED_LISTENERS_KEPT);
        for id in &idle_stopped[..excess] {
            self.listeners.remove(id);
        }
    }

    pub(super) fn listener_info(&self, listener: &Listener) -> ListenerInfo {
        ListenerInfo {
            id: listener.id.0,
            address: listener.address,
            plugin: listener.plugin_name.clone(),
            generation: listener.generation_number,
            listening: listener.channel.is_some(),
            channel_count: listener.channel_count,
            config: listener.config.clone(),
            channel_id: listener.channel.map_or(0, |channel| channel.0),
            created_at: listener.created_at,
            recent_panics: listener.recent_panics.len() as u32,
            stopped_by_panics: listener.stopped_by_panics,
            suspended: listener.suspended && listener.channel.is_some(),
            draining: listener.draining.is_some(),
            max_connections: listener.max_connections,
            connections: listener.connections,
            connections_refused: listener.connections_refused,
        }
    }

    fn channel_info(&self, id: ChannelId) -> Result<ChannelInfo, CommandError> {
        let slot = self.channels.slot_of(id).ok_or(CommandError::NoChannel(id.0))?;
        Ok(self.info_of(&self.channels[slot]))
    }

    fn info_of(&self, ch: &Channel) -> ChannelInfo {
        let entry = &self.plugins[ch.generation];
        ch.info(&entry.name, entry.generation)
    }

    /// Counters for a stats watcher: the live channels it watches (looked
    /// up by id when it names them, so watching a few channels costs a few
    /// lookups), then those that closed since its last snapshot.
    fn stats_snapshot(&self, filter: &StatsFilter, closed_after: u64) -> StatsSnapshot {
        let live = |ch: &&Channel| ch.kind != ChannelKind::Listening && filter.matches_listener(ch.listener.0);
        let mut channels: Vec<ChannelStats> = if filter.channel_ids().is_empty() {
            self.channels.iter().filter(live).map(|ch| ch.stats(false)).collect()
        } else {
            filter
                .channel_ids()
                .iter()
                .filter_map(|&id| self.channels.slot_of(ChannelId(id)))
                .map(|slot| &self.channels[slot])
                .filter(live)
                .map(|ch| ch.stats(false))
                .collect()
        };
        let (closed_missed, closed) = self.closed.since(closed_after);
        channels.extend(closed.filter(|s| filter.matches(s.channel_id, s.listener_id)).copied());
        StatsSnapshot { channels, closed_seq: self.closed.seq(), closed_missed, epoch: 0, complete: true }
    }

    /// [`Command::StatsChanges`]: the channels noted as changed after
    /// epoch `since`, or a full snapshot when the change log cannot say.
    pub(super) fn stats_changes(&mut self, filter: &StatsFilter, closed_after: u64, since: u64) -> StatsSnapshot {
        let (epoch, changed) = self.channels.changed_since(since);
        let Some(changed) = changed else {
            return StatsSnapshot { epoch, ..self.stats_snapshot(filter, closed_after) };
        };
        let mut channels: Vec<ChannelStats> = changed
            .into_iter()
            .filter_map(|id| self.channels.slot_of(id))
            .map(|slot| &self.channels[slot])
            .filter(|ch| ch.kind != ChannelKind::Listening && filter.matches(ch.id.0, ch.listener.0))
            .map(|ch| ch.stats(false))
            .collect();
        let (closed_missed, closed) = self.closed.since(closed_after);
        channels.extend(closed.filter(|s| filter.matches(s.channel_id, s.listener_id)).copied());
        StatsSnapshot { channels, closed_seq: self.closed.seq(), closed_missed, epoch, complete: false }
    }

    /// Stops every listener and closes every channel gracefully; the loop
    /// exits once the map is empty (every stream's send queue included, see
    /// [`end_close`](Core::end_close)) or the deadline passed.
    fn start_drain(&mut self, deadline: Instant, reply: Reply<()>) {
        info!(channels = self.channels.len(), "draining: listeners stopped, channels closing");
        let listening: Vec<ListenerId> =
            self.listeners.values().filter(|l| l.channel.is_some()).map(|l| l.id).collect();
        for id in listening {
            let _ = self.stop_listener(id, false);
        }
        self.drain = Some(Drain { deadline, reply, awaiting: BTreeSet::new(), next_check: None, waited: 0 });
        // Channels already lingering end through `end_close` as well, now
        // that the drain is set. The drain's deadline bounds the channels it
        // closes (no close timeout is armed for them); one that was already
        // closing keeps its own close timeout, which the daemon sets to the
        // drain timeout, so it ends by then too, waiting for its send queue
        // or not.
        for slot in self.channels.slots() {
            self.shut_down(slot, ShutdownReason::Drain);
        }
    }

    /// A draining channel's close waits for its send queue: checked from
    /// the next [`SEND_QUEUE_CHECK`] on.
    pub(super) fn await_send_queue(&mut self, channel_id: ChannelId) {
        let now = self.now;
        let Some(drain) = &mut self.drain else { return };
        if drain.awaiting.insert(channel_id) {
            drain.waited += 1;
        }
        drain.next_check.get_or_insert_with(|| now + SEND_QUEUE_CHECK);
    }

    /// Closes the draining channels whose send queue is empty (or whose
    /// socket failed), and arms the next check while some are left. Costs
    /// the waiting channels only, once per [`SEND_QUEUE_CHECK`].
    pub(super) fn check_send_queues(&mut self, now: Instant) {
        let Some(drain) = &mut self.drain else { return };
        let awaiting = std::mem::take(&mut drain.awaiting);
        let mut left = BTreeSet::new();
        for channel_id in awaiting {
            let Some(slot) = self.channels.slot_of(channel_id) else { continue };
            match self.channels[slot].socket.unsent_bytes() {
                Ok(queued) if queued > 0 => {
                    left.insert(channel_id);
                }
                _ => self.finalize(slot),
            }
        }
        if let Some(drain) = &mut self.drain {
            drain.next_check = (!left.is_empty()).then(|| now + SEND_QUEUE_CHECK);
            drain.awaiting = left;
        }
    }

    pub(super) fn check_drain(&mut self, now: Instant) {
        let Some(drain) = &self.drain else { return };
        if drain.next_check.is_some_and(|at| now >= at) {
            self.check_send_queues(now);
        }
        let Some(drain) = &self.drain else { return };
        if !self.channels.is_empty() && now < drain.deadline {
            return;
        }
        if !self.channels.is_empty() {
            // What the deadline cuts off: output the host still queued, and
            // bytes the kernel holds that the peers have not acknowledged.
            let (mut host_bytes, mut kernel_bytes, mut unacknowledged) = (0u64, 0u64, 0u64);
            for ch in self.channels.iter() {
                host_bytes += ch.out.len() as u64;
                let queued = ch.socket.unsent_bytes().unwrap_or(0) as u64;
                kernel_bytes += queued;
                unacknowledged += u64::from(queued > 0);
            }
            let dropped_before = self.stats.bytes_dropped;
            let channels = self.channels.len();
            for slot in self.channels.slots() {
                self.finalize(slot);
            }
            warn!(
                channels,
                bytes_dropped = self.stats.bytes_dropped - dropped_before,
                bytes_unacknowledged = kernel_bytes,
                channels_unacknowledged = unacknowledged,
                "drain deadline passed; closed the {channels} channels left: {host_bytes} queued bytes dropped, \
                 {kernel_bytes} bytes sent but not acknowledged by {unacknowledged} peers"
            );
        } else if let Some(drain) = &self.drain {
            info!(channels_waited = drain.waited, "drained: every channel closed, its output acknowledged by the peer");
        }
        if let Some(drain) = self.drain.take() {
            let _ = drain.reply.send(Ok(()));
        }
        self.exit = true;
    }
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
