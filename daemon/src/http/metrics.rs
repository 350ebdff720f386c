//! `GET /metrics`: the daemon's figures in the Prometheus text format
//! (0.0.4), encoded by `prometheus-client`, from the engine's own answers
//! (not the protobuf ones: `bytes_dropped` and the plugins' metrics exist
//! only there).
//!
//! Every scrape asks the poll loop afresh (loop counters, listeners,
//! plugins, and a stats snapshot, which walks the channel map once, as a
//! `WatchStats` tick does) and encodes a registry built for it, so nothing
//! is kept in step with the loop between scrapes. The one exception is the
//! byte counters: a channel's bytes are known while it lives and once more
//! when it closes (the engine's closed-channel log), so the bytes of closed
//! channels are added up here, scrape after scrape, and the live channels'
//! are added to them. Channels that closed more than 65,536 closes before
//! a scrape fell out of that log; their bytes are missing (logged).
//!
//! Names: the daemon's own carry the `asyncored_` prefix; a plugin's
//! metrics keep the names the plugin gave them, with `plugin` and
//! `generation` labels (a name that begins with `asyncored_`, or that two
//! plugins define as different kinds, is left out).

use std::collections::BTreeMap;

use axum::{
    extract::State,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use asyncore_engine::command::{
    Command, CommandError, EngineHandle, GenerationState, ListenerInfo, MetricKind, PluginInfo, StatsFilter,
};

use super::{ApiError, HttpState};
use crate::grpc::status;

/// Label sets: `(name, value)` pairs.
type Labels = Vec<(&'static str, String)>;

/// The figures `/metrics` keeps between scrapes.
#[derive(Debug)]
pub(super) struct Metrics {
    engine: EngineHandle,
    /// Held across the stats request, so that two scrapes at once count
    /// each closed channel once.
    closed: tokio::sync::Mutex<ClosedBytes>,
}

/// The bytes of closed channels, by listener.
#[derive(Debug, Default)]
struct ClosedBytes {
    /// The closed-channel log's sequence number already added up.
    seq: u64,
    /// Listener id to bytes in and out.
    by_listener: BTreeMap<u64, (u64, u64)>,
}

pub(super) async fn scrape(State(state): State<HttpState>) -> Result<Response, ApiError> {
    let text = state.metrics.render().await.map_err(status)?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static(prometheus_text::CONTENT_TYPE))], text).into_response())
}

impl Metrics {
    pub(super) fn new(engine: EngineHandle) -> Metrics {
        Metrics { engine, closed: tokio::sync::Mutex::default() }
    }

    async fn render(&self) -> Result<String, CommandError> {
        let loop_stats = self.engine.request(|reply| Command::LoopStats { reply }).await?;
        let listeners = self.listeners().await?;
        let plugins = self.engine.request(|reply| Command::ListPlugins { reply }).await?;
        let bytes = self.bytes_by_listener().await?;

        let mut registry = Registry::default();
        let daemon = registry.sub_registry_with_prefix("asyncored");
        let counters = [
            ("loop_passes", "Passes of the poll loop (one wait on the poller each)", loop_stats.passes),
            ("loop_events", "Readiness events delivered by the poller", loop_stats.events),
            ("loop_handler_calls", "Calls into dispatcher handlers (handle_*)", loop_stats.handler_calls),
            (
                "loop_interest_queries",
                "Calls of readable()/writable() to refresh interest",
                loop_stats.interest_queries,
            ),
            ("loop_interest_changes", "Changes of a socket's registered interest", loop_stats.interest_changes),
            ("loop_commands", "Control commands served by the poll loop", loop_stats.commands),
            (
                "loop_slow_callbacks",
                "Plugin callbacks that ran longer than slow_callback_ms, holding up every other channel",
                loop_stats.slow_callbacks,
            ),
            ("accepts", "Connections accepted", loop_stats.accepts),
            (
                "accept_pauses",
                "Times a listener paused accepting for 100 ms because accept() failed for lack of descriptors or memory",
                loop_stats.accept_pauses,
            ),
            ("panics", "Plugin callbacks that panicked (each closed its own channel)", loop_stats.panics),
            (
                "bytes_dropped",
                "Output bytes dropped by closes that could not deliver them (a peer that stopped reading past the close timeout, a drain deadline)",
                loop_stats.bytes_dropped,
            ),
        ];
        for (name, help, value) in counters {
            let counter: Counter = Counter::default();
            counter.inc_by(value);
            daemon.register(name, help, counter);
        }
        let slowest: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        slowest.set(loop_stats.slowest_callback_us as f64 / 1e6);
        daemon.register("loop_slowest_callback_seconds", "The longest plugin callback so far", slowest);
        let open: Gauge = Gauge::default();
        open.set(saturating_i64(loop_stats.channels));
        daemon.register("channels_open", "Channels in the channel map, listening sockets included", open);

        let bytes_in = Family::<Labels, Counter>::default();
        let bytes_out = Family::<Labels, Counter>::default();
        for (listener, (read, written)) in bytes {
            let labels = vec![("listener", listener.to_string())];
            bytes_in.get_or_create(&labels).inc_by(read);
            bytes_out.get_or_create(&labels).inc_by(written);
        }
        daemon.register(
            "bytes_in",
            "Bytes read from the channels of a listener (0: channels of no listener)",
            bytes_in,
        );
        daemon.register("bytes_out", "Bytes written to the channels of a listener", bytes_out);

        let listener_channels = Family::<Labels, Gauge>::default();
        let listener_listening = Family::<Labels, Gauge>::default();
        let listener_refused = Family::<Labels, Counter>::default();
        for listener in &listeners {
            let labels = vec![
                ("listener", listener.id.to_string()),
                ("address", listener.address.to_string()),
                ("plugin", listener.plugin.clone()),
            ];
            listener_channels.get_or_create(&labels).set(saturating_i64(listener.channel_count));
            listener_listening.get_or_create(&labels).set(i64::from(listener.listening && !listener.suspended));
            listener_refused.get_or_create(&labels).inc_by(listener.connections_refused);
        }
        daemon.register("listener_channels", "Live channels of a listener", listener_channels);
        daemon.register(
            "listener_listening",
            "1 while a listener accepts connections, 0 while suspended or once stopped",
            listener_listening,
        );
        daemon.register(
            "listener_connections_refused",
            "Connections a listener closed at once because max_connections was reached",
            listener_refused,
        );

        let generation_state = Family::<Labels, Gauge>::default();
        let live_channels = Family::<Labels, Gauge>::default();
        let panics = Family::<Labels, Counter>::default();
        for plugin in &plugins {
            for generation in &plugin.generations {
                let labels = vec![("plugin", plugin.name.clone()), ("generation", generation.generation.to_string())];
                for (state, name) in GENERATION_STATES {
                    let mut with_state = labels.clone();
                    with_state.push(("state", name.to_string()));
                    generation_state.get_or_create(&with_state).set(i64::from(generation.state == state));
                }
                live_channels.get_or_create(&labels).set(saturating_i64(generation.live_channels));
                panics.get_or_create(&labels).inc_by(generation.panics);
            }
        }
        daemon.register(
            "plugin_generation_state",
            "1 for the state a plugin generation is in (current, standby, draining, retired), 0 for the others",
            generation_state,
        );
        daemon.register("plugin_generation_live_channels", "Live channels a plugin generation serves", live_channels);
        daemon.register("plugin_generation_panics", "Callbacks of a plugin generation that panicked", panics);

        register_plugin_metrics(&mut registry, &plugins);

        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).expect("writing to a String cannot fail");
        Ok(text)
    }

    /// Every listener the loop knows, through all pages.
    async fn listeners(&self) -> Result<Vec<ListenerInfo>, CommandError> {
        const PAGE: usize = 1000;
        let mut all = Vec::new();
        loop {
            let after = all.last().map_or(0, |l: &ListenerInfo| l.id);
            let page = self.engine.request(|reply| Command::ListListeners { after, limit: PAGE, reply }).await?;
            let n = page.len();
            all.extend(page);
            if n < PAGE {
                return Ok(all);
            }
        }
    }

    /// Bytes in and out of every channel so far, by listener: the closed
    /// channels' (added up across scrapes) and the live ones'.
    async fn bytes_by_listener(&self) -> Result<BTreeMap<u64, (u64, u64)>, CommandError> {
        let mut closed = self.closed.lock().await;
        let closed_after = closed.seq;
        let snapshot =
            self.engine.request(|reply| Command::Stats { filter: StatsFilter::default(), closed_after, reply }).await?;
        if snapshot.closed_missed > 0 {
            tracing::warn!(
                channels = snapshot.closed_missed,
                "metrics: closed channels fell out of the closed-channel log before a scrape; their bytes are not counted"
            );
        }
        let mut live: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for channel in &snapshot.channels {
            let add_to = if channel.closed { &mut closed.by_listener } else { &mut live };
            let entry = add_to.entry(channel.listener_id).or_default();
            entry.0 += channel.counters.bytes_in;
            entry.1 += channel.counters.bytes_out;
        }
        closed.seq = snapshot.closed_seq;
        for (listener, (read, written)) in &closed.by_listener {
            let entry = live.entry(*listener).or_default();
            entry.0 += read;
            entry.1 += written;
        }
        Ok(live)
    }
}

const GENERATION_STATES: [(GenerationState, &str); 4] = [
    (GenerationState::Current, "current"),
    (GenerationState::Standby, "standby"),
    (GenerationState::Draining, "draining"),
    (GenerationState::Retired, "retired"),
];

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// One family of plugin-defined metrics: its kind, help, and a value per
/// plugin generation.
struct PluginFamily {
    kind: MetricKind,
    help: String,
    values: Vec<(Labels, i64)>,
}

/// The metrics plugins defined (`asyncore_sdk::metrics`), one family per
/// name across plugins and generations, labelled with both.
fn register_plugin_metrics(registry: &mut Registry, plugins: &[PluginInfo]) {
    let mut families: BTreeMap<String, PluginFamily> = BTreeMap::new();
    for plugin in plugins {
        for generation in &plugin.generations {
            for metric in &generation.metrics {
                // prometheus-client adds `_total` to a counter's name.
                let name = match metric.kind {
                    MetricKind::Counter => metric.name.strip_suffix("_total").unwrap_or(&metric.name),
                    MetricKind::Gauge => &metric.name,
                };
                if name.starts_with("asyncored_") || name.is_empty() {
                    tracing::debug!(plugin = %plugin.name, metric = %metric.name, "metrics: a plugin metric takes a daemon name; left out");
                    continue;
                }
                let family = families.entry(name.to_string()).or_insert_with(|| PluginFamily {
                    kind: metric.kind,
                    help: metric.help.trim_end_matches('.').to_string(),
                    values: Vec::new(),
                });
                if family.kind != metric.kind {
                    tracing::debug!(plugin = %plugin.name, metric = %metric.name, "metrics: another plugin defines this name as another kind; left out");
                    continue;
                }
                let labels = vec![("plugin", plugin.name.clone()), ("generation", generation.generation.to_string())];
                family.values.push((labels, metric.value));
            }
        }
    }
    for (name, family) in families {
        match family.kind {
            MetricKind::Counter => {
                let counters = Family::<Labels, Counter>::default();
                for (labels, value) in &family.values {
                    counters.get_or_create(labels).inc_by(u64::try_from(*value).unwrap_or(0));
                }
                registry.register(name, family.help, counters);
            }
            MetricKind::Gauge => {
                let gauges = Family::<Labels, Gauge>::default();
                for (labels, value) in &family.values {
                    gauges.get_or_create(labels).set(*value);
                }
                registry.register(name, family.help, gauges);
            }
        }
    }
}
