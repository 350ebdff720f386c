//! Engine answers to protobuf messages: the one place they are converted.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use asyncore_proto::{timestamp, v1};

use asyncore_engine::command::{
    ChannelInfo, ChannelKind, ChannelState, ChannelStats, GenerationInfo, GenerationState, ListenerInfo, LoopStats,
    MetricKind, PluginInfo,
};

use crate::lifecycle::Phase;

pub(super) fn listener(info: ListenerInfo) -> v1::Listener {
    v1::Listener {
        id: info.id,
        address: info.address.to_string(),
        plugin: info.plugin,
        state: if info.listening && info.suspended {
            v1::ListenerState::Suspended
        } else if info.listening {
            v1::ListenerState::Listening
        } else if info.draining {
            v1::ListenerState::Draining
        } else if info.stopped_by_panics {
            v1::ListenerState::Failed
        } else {
            v1::ListenerState::Stopped
        } as i32,
        channel_count: info.channel_count,
        config: info.config.into_iter().collect(),
        channel_id: info.channel_id,
        created_at: Some(timestamp(info.created_at)),
        plugin_generation: info.generation,
        max_connections: info.max_connections.unwrap_or(0),
        connections: info.connections,
        connections_refused: info.connections_refused,
    }
}

pub(super) fn channel(info: ChannelInfo) -> v1::Channel {
    let kind = match info.kind {
        ChannelKind::Listening => v1::ChannelKind::Listening,
        ChannelKind::Accepted => v1::ChannelKind::Accepted,
        ChannelKind::Outbound => v1::ChannelKind::Outbound,
        ChannelKind::File => v1::ChannelKind::File,
    };
    let state = match info.state {
        ChannelState::Connecting => v1::ChannelState::Connecting,
        ChannelState::Open => v1::ChannelState::Open,
        ChannelState::Closing => v1::ChannelState::Closing,
        ChannelState::Closed => v1::ChannelState::Closed,
    };
    v1::Channel {
        id: info.id,
        listener_id: info.listener_id,
        plugin: info.plugin.to_string(),
        kind: kind as i32,
        peer_address: info.peer_address.map(|a| a.to_string()).unwrap_or_default(),
        local_address: info.local_address.map(|a| a.to_string()).unwrap_or_default(),
        state: state as i32,
        created_at: Some(timestamp(info.created_at)),
        bytes_in: info.counters.bytes_in,
        bytes_out: info.counters.bytes_out,
        reads: info.counters.reads,
        writes: info.counters.writes,
        pending_output: info.pending_output,
        parent_id: info.parent_id,
        plugin_generation: info.generation,
        annotations: info.annotations.into_iter().collect(),
    }
}

pub(super) fn plugin(info: PluginInfo) -> v1::Plugin {
    let headline = info.headline().clone();
    v1::Plugin {
        name: info.name,
        version: headline.version,
        abi_version: abi(headline.abi_version),
        path: headline.path,
        listener_ids: headline.listener_ids,
        live_channels: info.generations.iter().map(|g| g.live_channels).sum(),
        panics: info.generations.iter().map(|g| g.panics).sum(),
        sdk_version: headline.sdk_version,
        loaded_at: Some(timestamp(headline.loaded_at)),
        current_generation: info.current_generation,
        generations: info.generations.into_iter().map(generation).collect(),
        // Set by the list, where an entry too large is cut.
        generations_omitted: 0,
    }
}

fn generation(info: GenerationInfo) -> v1::PluginGeneration {
    let state = match info.state {
        GenerationState::Current => v1::GenerationState::Current,
        GenerationState::Standby => v1::GenerationState::Standby,
        GenerationState::Draining => v1::GenerationState::Draining,
        GenerationState::Retired => v1::GenerationState::Retired,
    };
    v1::PluginGeneration {
        generation: info.generation,
        version: info.version,
        abi_version: abi(info.abi_version),
        sdk_version: info.sdk_version,
        path: info.path,
        sha256: info.sha256,
        loaded_at: Some(timestamp(info.loaded_at)),
        state: state as i32,
        listener_ids: info.listener_ids,
        live_channels: info.live_channels,
        panics: info.panics,
        metrics: info
            .metrics
            .into_iter()
            .map(|metric| v1::PluginMetric {
                name: metric.name,
                help: metric.help,
                kind: match metric.kind {
                    MetricKind::Counter => v1::PluginMetricKind::Counter,
                    MetricKind::Gauge => v1::PluginMetricKind::Gauge,
                } as i32,
                value: metric.value,
            })
            .collect(),
    }
}

fn abi((major, minor): (u32, u32)) -> String {
    format!("{major}.{minor}")
}

pub(super) fn loop_stats(stats: LoopStats) -> v1::LoopStats {
    v1::LoopStats {
        passes: stats.passes,
        events: stats.events,
        handler_calls: stats.handler_calls,
        interest_queries: stats.interest_queries,
        interest_changes: stats.interest_changes,
        channels: stats.channels,
        panics: stats.panics,
        accepts: stats.accepts,
        commands: stats.commands,
        bytes_dropped: stats.bytes_dropped,
        slow_callbacks: stats.slow_callbacks,
        slowest_callback_us: stats.slowest_callback_us,
        accept_pauses: stats.accept_pauses,
    }
}

/// What `GetDaemonInfo` reports. What only the poll loop knows is `None`
/// when the loop did not answer (it died, or stopped).
pub(super) struct DaemonFacts {
    pub(super) started_at: SystemTime,
    pub(super) uptime: Duration,
    pub(super) phase: Phase,
    pub(super) loop_stats: Option<LoopStats>,
    pub(super) plugins: Option<Vec<PluginInfo>>,
    pub(super) listeners: Option<Vec<ListenerInfo>>,
}

pub(super) fn daemon_info(facts: DaemonFacts) -> v1::DaemonInfo {
    let phase = match facts.phase {
        Phase::Starting => v1::DaemonPhase::Starting,
        Phase::Running => v1::DaemonPhase::Running,
        Phase::Draining => v1::DaemonPhase::Draining,
        Phase::Stopped => v1::DaemonPhase::Stopped,
        Phase::Failed => v1::DaemonPhase::Failed,
    };
    let live_generations =
        |plugin: &PluginInfo| plugin.generations.iter().filter(|g| g.state != GenerationState::Retired).count() as u64;
    let plugins = facts.plugins.as_deref();
    let listeners = facts.listeners.as_deref();
    v1::DaemonInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: Some(timestamp(facts.started_at)),
        uptime_seconds: facts.uptime.as_secs_f64(),
        phase: phase as i32,
        loop_stats: facts.loop_stats.map(loop_stats),
        plugins: plugins.map(|plugins| plugins.iter().filter(|p| live_generations(p) > 0).count() as u64),
        plugin_generations: plugins.map(|plugins| plugins.iter().map(live_generations).sum()),
        listeners: listeners.map(|listeners| listeners.iter().filter(|l| l.listening).count() as u64),
        stopped_listeners: listeners.map(|listeners| listeners.iter().filter(|l| !l.listening).count() as u64),
    }
}

/// What one `WatchStats` message reports, besides the channels.
pub(super) struct StatsMessage {
    /// Counts the messages of the stream from 1.
    pub(super) seq: u64,
    /// When the figures were taken.
    pub(super) at: std::time::SystemTime,
    /// Since the figures of the previous message (the rates' denominator).
    pub(super) seconds: f64,
    /// Updates the stream skipped since its previous message.
    pub(super) missed_updates: u64,
    /// The message lists every live watched channel.
    pub(super) complete: bool,
}

/// One `WatchStats` message. `previous` holds each live channel's byte
/// counts at the last message, for the rates; closed channels leave it. A
/// channel it does not hold yet (the stream's first message, a new
/// channel) is rated from zero over `seconds`.
pub(super) fn stats_update<'a>(
    message: StatsMessage,
    channels: impl Iterator<Item = &'a ChannelStats>,
    previous: &mut HashMap<u64, (u64, u64)>,
) -> v1::StatsUpdate {
    let StatsMessage { seq, at, seconds, missed_updates, complete } = message;
    let rate = |now: u64, before: u64| {
        if seconds > 0.0 { now.saturating_sub(before) as f64 / seconds } else { 0.0 }
    };
    let channels = channels
        .map(|s| {
            let (in_before, out_before) = previous.get(&s.channel_id).copied().unwrap_or((0, 0));
            if s.closed {
                previous.remove(&s.channel_id);
            } else {
                previous.insert(s.channel_id, (s.counters.bytes_in, s.counters.bytes_out));
            }
            v1::ChannelStats {
                channel_id: s.channel_id,
                listener_id: s.listener_id,
                bytes_in: s.counters.bytes_in,
                bytes_out: s.counters.bytes_out,
                reads: s.counters.reads,
                writes: s.counters.writes,
                pending_output: s.pending_output,
                bytes_in_rate: rate(s.counters.bytes_in, in_before),
                bytes_out_rate: rate(s.counters.bytes_out, out_before),
                closed: s.closed,
            }
        })
        .collect();
    v1::StatsUpdate { seq, at: Some(timestamp(at)), interval_seconds: seconds, channels, missed_updates, complete }
}
