//! Everything `asyncorectl` prints on stdout: aligned tables for people,
//! JSON for scripts, and the short words both use for the daemon's enums
//! and timestamps. Commands fetch; this module decides how it looks.

use std::collections::HashMap;
use std::io::{self, Write};

use asyncore_proto::v1;
use serde_json::{Value, json};

/// Hex digits of a SHA-256 shown in tables; `-o json` has all of them.
const SHA256_SHOWN: usize = 12;

pub(crate) fn print_text(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    // `stats` prints a block per message; flushing makes each appear at once
    // even when stdout is a pipe.
    stdout.flush()?;
    Ok(())
}

pub(crate) fn print_json(value: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    print_text(&text)
}

/// One compact object per line (NDJSON), so `jq` or a line reader can follow
/// `stats` as it streams.
pub(crate) fn print_json_line(value: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string(value)?;
    text.push('\n');
    print_text(&text)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A table of aligned columns separated by two spaces, with an optional
/// header row. Widths count `char`s, which is right for the ASCII we print
/// and close enough for the odd non-ASCII plugin name.
#[derive(Debug)]
struct Table {
    headers: Option<Vec<&'static str>>,
    aligns: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, Align)]) -> Self {
        Table {
            headers: Some(columns.iter().map(|(name, _)| *name).collect()),
            aligns: columns.iter().map(|(_, align)| *align).collect(),
            rows: Vec::new(),
        }
    }

    /// Two columns, field name and value, without a header: the layout for
    /// showing one object.
    fn key_value(pairs: Vec<(&str, String)>) -> Self {
        Table {
            headers: None,
            aligns: vec![Align::Left, Align::Left],
            rows: pairs.into_iter().map(|(key, value)| vec![key.to_owned(), value]).collect(),
        }
    }

    fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.aligns.len(), "row width");
        self.rows.push(row);
    }

    /// Renders every line with a trailing newline and without trailing
    /// spaces, so that a last column that is often empty costs nothing.
    fn render(&self) -> String {
        let header_row: Option<Vec<String>> =
            self.headers.as_ref().map(|headers| headers.iter().map(|name| (*name).to_owned()).collect());
        let all_rows: Vec<&Vec<String>> = header_row.iter().chain(self.rows.iter()).collect();

        let mut widths = vec![0; self.aligns.len()];
        for row in &all_rows {
            for (width, cell) in widths.iter_mut().zip(row.iter()) {
                *width = (*width).max(cell.chars().count());
            }
        }

        let mut out = String::new();
        for row in all_rows {
            let mut line = String::new();
            for (index, cell) in row.iter().enumerate() {
                if index > 0 {
                    line.push_str("  ");
                }
                let padding = widths[index] - cell.chars().count();
                match self.aligns[index] {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', padding));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', padding));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn dash_if_empty(text: &str) -> String {
    if text.is_empty() { "-".to_owned() } else { text.to_owned() }
}

/// Ids where 0 means "none" (no listener, no parent).
fn dash_if_zero(id: u64) -> String {
    if id == 0 { "-".to_owned() } else { id.to_string() }
}

pub(crate) fn listeners_table(listeners: &[v1::Listener]) -> String {
    let mut table = Table::new(&[
        ("ID", Align::Right),
        ("ADDRESS", Align::Left),
        ("PLUGIN", Align::Left),
        ("STATE", Align::Left),
        ("CHANNELS", Align::Right),
        ("CREATED", Align::Left),
        ("CONFIG", Align::Left),
    ]);
    for listener in listeners {
        table.push(vec![
            listener.id.to_string(),
            listener.address.clone(),
            plugin_ref(&listener.plugin, listener.plugin_generation),
            listener_state_name(listener.state),
            listener.channel_count.to_string(),
            timestamp_text(listener.created_at.as_ref()),
            config_text(&listener.config),
        ]);
    }
    table.render()
}

/// `key=value,key=value` sorted by key, because the map's order is random.
fn config_text(config: &HashMap<String, String>) -> String {
    let mut entries: Vec<_> = config.iter().collect();
    entries.sort();
    let text: Vec<String> = entries.into_iter().map(|(key, value)| format!("{key}={value}")).collect();
    dash_if_empty(&text.join(","))
}

pub(crate) fn channels_table(channels: &[v1::Channel]) -> String {
    let mut table = Table::new(&[
        ("ID", Align::Right),
        ("LISTENER", Align::Right),
        ("PLUGIN", Align::Left),
        ("KIND", Align::Left),
        ("STATE", Align::Left),
        ("PEER", Align::Left),
        ("LOCAL", Align::Left),
        ("BYTES_IN", Align::Right),
        ("BYTES_OUT", Align::Right),
        ("PENDING", Align::Right),
        ("CREATED", Align::Left),
    ]);
    for channel in channels {
        table.push(vec![
            channel.id.to_string(),
            dash_if_zero(channel.listener_id),
            plugin_ref(&channel.plugin, channel.plugin_generation),
            channel_kind_name(channel.kind),
            channel_state_name(channel.state),
            dash_if_empty(&channel.peer_address),
            dash_if_empty(&channel.local_address),
            channel.bytes_in.to_string(),
            channel.bytes_out.to_string(),
            channel.pending_output.to_string(),
            timestamp_text(channel.created_at.as_ref()),
        ]);
    }
    table.render()
}

pub(crate) fn channel_detail(channel: &v1::Channel) -> String {
    let detail = Table::key_value(vec![
        ("id", channel.id.to_string()),
        ("listener_id", dash_if_zero(channel.listener_id)),
        ("plugin", plugin_ref(&channel.plugin, channel.plugin_generation)),
        ("kind", channel_kind_name(channel.kind)),
        ("state", channel_state_name(channel.state)),
        ("peer_address", dash_if_empty(&channel.peer_address)),
        ("local_address", dash_if_empty(&channel.local_address)),
        ("created_at", timestamp_text(channel.created_at.as_ref())),
        ("bytes_in", channel.bytes_in.to_string()),
        ("bytes_out", channel.bytes_out.to_string()),
        ("reads", channel.reads.to_string()),
        ("writes", channel.writes.to_string()),
        ("pending_output", channel.pending_output.to_string()),
        ("parent_id", dash_if_zero(channel.parent_id)),
    ]);
    // What the dispatcher says of itself, sorted by key.
    let mut annotations: Vec<(&String, &String)> = channel.annotations.iter().collect();
    annotations.sort();
    let mut detail = detail;
    for (key, value) in annotations {
        detail.push(vec![format!("  {key}"), value.clone()]);
    }
    detail.render()
}

/// `echo@2`: a plugin and the generation serving something; the bare name
/// when the daemon sent no generation, `-` when it sent no plugin.
fn plugin_ref(name: &str, generation: u32) -> String {
    match (name, generation) {
        ("", _) => "-".to_owned(),
        (name, 0) => name.to_owned(),
        (name, generation) => format!("{name}@{generation}"),
    }
}

/// One row per generation: for each plugin its current generation first,
/// then the others newest first, which is the order rollbacks go in.
pub(crate) fn plugins_table(plugins: &[v1::Plugin]) -> String {
    let mut table = Table::new(&[
        ("NAME", Align::Left),
        ("GEN", Align::Right),
        ("STATE", Align::Left),
        ("VERSION", Align::Left),
        ("ABI", Align::Left),
        ("CHANNELS", Align::Right),
        ("PANICS", Align::Right),
        ("LISTENERS", Align::Left),
        ("SHA256", Align::Left),
        ("LOADED", Align::Left),
    ]);
    for plugin in plugins {
        let mut generations: Vec<&v1::PluginGeneration> = plugin.generations.iter().collect();
        generations.sort_by_key(|generation| {
            (generation.generation != plugin.current_generation, std::cmp::Reverse(generation.generation))
        });
        for generation in generations {
            let listener_ids: Vec<String> = generation.listener_ids.iter().map(u64::to_string).collect();
            table.push(vec![
                plugin.name.clone(),
                generation.generation.to_string(),
                generation_state_name(generation.state),
                dash_if_empty(&generation.version),
                dash_if_empty(&generation.abi_version),
                generation.live_channels.to_string(),
                generation.panics.to_string(),
                dash_if_empty(&listener_ids.join(",")),
                dash_if_empty(generation.sha256.get(..SHA256_SHOWN).unwrap_or(&generation.sha256)),
                timestamp_text(generation.loaded_at.as_ref()),
            ]);
        }
    }
    table.render()
}

pub(crate) fn loop_stats_table(stats: &v1::LoopStats) -> String {
    Table::key_value(loop_stats_rows(stats)).render()
}

/// `loop-stats` and the loop's part of `info`: the counters in the proto's
/// order, and the slowest callback as a duration.
fn loop_stats_rows(stats: &v1::LoopStats) -> Vec<(&'static str, String)> {
    vec![
        ("passes", stats.passes.to_string()),
        ("events", stats.events.to_string()),
        ("handler_calls", stats.handler_calls.to_string()),
        ("interest_queries", stats.interest_queries.to_string()),
        ("interest_changes", stats.interest_changes.to_string()),
        ("channels", stats.channels.to_string()),
        ("panics", stats.panics.to_string()),
        ("accepts", stats.accepts.to_string()),
        ("commands", stats.commands.to_string()),
        ("bytes_dropped", stats.bytes_dropped.to_string()),
        ("slow_callbacks", stats.slow_callbacks.to_string()),
        ("slowest_callback", micros_text(stats.slowest_callback_us)),
        ("accept_pauses", stats.accept_pauses.to_string()),
    ]
}

/// `info`: the daemon, then its loop's counters. What only the loop knows
/// shows as `-` when the loop did not answer.
pub(crate) fn daemon_info_table(info: &v1::DaemonInfo) -> String {
    let count = |count: Option<u64>| count.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let mut rows = vec![
        ("version", dash_if_empty(&info.version)),
        ("phase", daemon_phase_name(info.phase)),
        ("started_at", timestamp_text(info.started_at.as_ref())),
        ("uptime", seconds_text(info.uptime_seconds)),
        ("plugins", count(info.plugins)),
        ("plugin_generations", count(info.plugin_generations)),
        ("listeners", count(info.listeners)),
        ("stopped_listeners", count(info.stopped_listeners)),
    ];
    match &info.loop_stats {
        Some(stats) => rows.extend(loop_stats_rows(stats)),
        None => rows.push(("loop_stats", "- (the poll loop does not answer)".to_owned())),
    }
    Table::key_value(rows).render()
}

/// A duration of whole seconds for people: `45s`, `3m07s`, `2h05m09s`,
/// `3d04h05m`.
pub(crate) fn seconds_text(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".to_owned();
    }
    let total = seconds as u64;
    let (days, hours, minutes, seconds) = (total / 86_400, total / 3_600 % 24, total / 60 % 60, total % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m{seconds:02}s"),
        (0, _, _) => format!("{hours}h{minutes:02}m{seconds:02}s"),
        _ => format!("{days}d{hours:02}h{minutes:02}m"),
    }
}

/// Microseconds for people: `850us`, `52.1ms`, `1.20s`.
pub(crate) fn micros_text(micros: u64) -> String {
    match micros {
        0..1_000 => format!("{micros}us"),
        1_000..1_000_000 => format!("{:.1}ms", micros as f64 / 1e3),
        _ => format!("{:.2}s", micros as f64 / 1e6),
    }
}

/// One `stats` message: a header line, a row per channel, a blank line to
/// separate it from the next.
pub(crate) fn stats_update_block(update: &v1::StatsUpdate) -> String {
    let mut table = Table::new(&[
        ("CHANNEL", Align::Right),
        ("LISTENER", Align::Right),
        ("BYTES_IN", Align::Right),
        ("BYTES_OUT", Align::Right),
        ("IN/S", Align::Right),
        ("OUT/S", Align::Right),
        ("PENDING", Align::Right),
        ("", Align::Left),
    ]);
    for stats in &update.channels {
        table.push(vec![
            stats.channel_id.to_string(),
            dash_if_zero(stats.listener_id),
            stats.bytes_in.to_string(),
            stats.bytes_out.to_string(),
            rate_text(stats.bytes_in_rate),
            rate_text(stats.bytes_out_rate),
            stats.pending_output.to_string(),
            if stats.closed { "closed" } else { "" }.to_owned(),
        ]);
    }
    let missed = match update.missed_updates {
        0 => String::new(),
        n => format!(" ({n} updates missed: read slower than the interval)"),
    };
    format!("seq {} at {}{missed}\n{}\n", update.seq, timestamp_text(update.at.as_ref()), table.render())
}

/// Whole bytes per second: fractions of a byte are noise at a glance, and
/// scripts get the exact figure from `-o json`.
fn rate_text(rate: f64) -> String {
    if rate.is_finite() { format!("{rate:.0}") } else { "-".to_owned() }
}

/// Enum names without their type prefix, in lowercase:
/// `CHANNEL_STATE_OPEN` becomes `open`. Values this build does not know (a
/// newer daemon) show as `unknown(N)` rather than being hidden.
fn short_enum_name(full_name: &str, prefix: &str) -> String {
    full_name.strip_prefix(prefix).unwrap_or(full_name).to_ascii_lowercase()
}

fn listener_state_name(raw: i32) -> String {
    match v1::ListenerState::try_from(raw) {
        Ok(state) => short_enum_name(state.as_str_name(), "LISTENER_STATE_"),
        Err(_) => format!("unknown({raw})"),
    }
}

fn channel_kind_name(raw: i32) -> String {
    match v1::ChannelKind::try_from(raw) {
        Ok(kind) => short_enum_name(kind.as_str_name(), "CHANNEL_KIND_"),
        Err(_) => format!("unknown({raw})"),
    }
}

fn generation_state_name(raw: i32) -> String {
    match v1::GenerationState::try_from(raw) {
        Ok(state) => short_enum_name(state.as_str_name(), "GENERATION_STATE_"),
        Err(_) => format!("unknown({raw})"),
    }
}

pub(crate) fn daemon_phase_name(raw: i32) -> String {
    match v1::DaemonPhase::try_from(raw) {
        Ok(phase) => short_enum_name(phase.as_str_name(), "DAEMON_PHASE_"),
        Err(_) => format!("unknown({raw})"),
    }
}

fn channel_state_name(raw: i32) -> String {
    match v1::ChannelState::try_from(raw) {
        Ok(state) => short_enum_name(state.as_str_name(), "CHANNEL_STATE_"),
        Err(_) => format!("unknown({raw})"),
    }
}

// ---------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------

/// Whole-second RFC 3339 in UTC for tables, `-` when the daemon sent none.
fn timestamp_text(timestamp: Option<&prost_types::Timestamp>) -> String {
    match timestamp {
        Some(timestamp) => {
            // Normalising first folds out-of-range or negative nanos into
            // the seconds, so dropping the fraction rounds towards the past
            // like a clock does.
            let whole_seconds = prost_types::Timestamp { seconds: timestamp.normalized().seconds, nanos: 0 };
            whole_seconds.to_string()
        }
        None => "-".to_owned(),
    }
}

/// RFC 3339 in UTC with the fraction protobuf's JSON mapping uses (0, 3, 6
/// or 9 digits), or null, for `-o json`. prost's `Display` prints exactly
/// that, normalising a sender's out-of-range nanos first.
fn timestamp_json(timestamp: Option<&prost_types::Timestamp>) -> Value {
    match timestamp {
        Some(timestamp) => Value::String(timestamp.to_string()),
        None => Value::Null,
    }
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

// Field names are the proto's. Unlike protobuf's canonical JSON mapping,
// uint64 values are JSON numbers (scripts compare them) and enums use the
// same short words as the tables.

pub(crate) fn listener_json(listener: &v1::Listener) -> Value {
    json!({
        "id": listener.id,
        "address": listener.address,
        "plugin": listener.plugin,
        "plugin_generation": listener.plugin_generation,
        "state": listener_state_name(listener.state),
        "channel_count": listener.channel_count,
        "config": listener.config,
        "channel_id": listener.channel_id,
        "created_at": timestamp_json(listener.created_at.as_ref()),
        "max_connections": listener.max_connections,
        "connections": listener.connections,
        "connections_refused": listener.connections_refused,
    })
}

pub(crate) fn channel_json(channel: &v1::Channel) -> Value {
    json!({
        "id": channel.id,
        "listener_id": channel.listener_id,
        "plugin": channel.plugin,
        "plugin_generation": channel.plugin_generation,
        "kind": channel_kind_name(channel.kind),
        "peer_address": channel.peer_address,
        "local_address": channel.local_address,
        "state": channel_state_name(channel.state),
        "created_at": timestamp_json(channel.created_at.as_ref()),
        "bytes_in": channel.bytes_in,
        "bytes_out": channel.bytes_out,
        "reads": channel.reads,
        "writes": channel.writes,
        "pending_output": channel.pending_output,
        "parent_id": channel.parent_id,
        "annotations": channel.annotations,
    })
}

pub(crate) fn plugin_json(plugin: &v1::Plugin) -> Value {
    json!({
        "name": plugin.name,
        "version": plugin.version,
        "abi_version": plugin.abi_version,
        "path": plugin.path,
        "listener_ids": plugin.listener_ids,
        "live_channels": plugin.live_channels,
        "panics": plugin.panics,
        "sdk_version": plugin.sdk_version,
        "loaded_at": timestamp_json(plugin.loaded_at.as_ref()),
        "current_generation": plugin.current_generation,
        "generations": plugin.generations.iter().map(generation_json).collect::<Vec<_>>(),
    })
}

fn generation_json(generation: &v1::PluginGeneration) -> Value {
    json!({
        "generation": generation.generation,
        "version": generation.version,
        "abi_version": generation.abi_version,
        "sdk_version": generation.sdk_version,
        "path": generation.path,
        "sha256": generation.sha256,
        "loaded_at": timestamp_json(generation.loaded_at.as_ref()),
        "state": generation_state_name(generation.state),
        "listener_ids": generation.listener_ids,
        "live_channels": generation.live_channels,
        "panics": generation.panics,
    })
}

pub(crate) fn loop_stats_json(stats: &v1::LoopStats) -> Value {
    json!({
        "passes": stats.passes,
        "events": stats.events,
        "handler_calls": stats.handler_calls,
        "interest_queries": stats.interest_queries,
        "interest_changes": stats.interest_changes,
        "channels": stats.channels,
        "panics": stats.panics,
        "accepts": stats.accepts,
        "commands": stats.commands,
        "bytes_dropped": stats.bytes_dropped,
        "slow_callbacks": stats.slow_callbacks,
        "slowest_callback_us": stats.slowest_callback_us,
        "accept_pauses": stats.accept_pauses,
    })
}

pub(crate) fn daemon_info_json(info: &v1::DaemonInfo) -> Value {
    json!({
        "version": info.version,
        "phase": daemon_phase_name(info.phase),
        "started_at": timestamp_json(info.started_at.as_ref()),
        "uptime_seconds": info.uptime_seconds,
        "plugins": info.plugins,
        "plugin_generations": info.plugin_generations,
        "listeners": info.listeners,
        "stopped_listeners": info.stopped_listeners,
        "loop_stats": info.loop_stats.as_ref().map(loop_stats_json),
    })
}

pub(crate) fn stats_update_json(update: &v1::StatsUpdate) -> Value {
    let channels: Vec<Value> = update
        .channels
        .iter()
        .map(|stats| {
            json!({
                "channel_id": stats.channel_id,
                "listener_id": stats.listener_id,
                "bytes_in": stats.bytes_in,
                "bytes_out": stats.bytes_out,
                "reads": stats.reads,
                "writes": stats.writes,
                "pending_output": stats.pending_output,
                "bytes_in_rate": stats.bytes_in_rate,
                "bytes_out_rate": stats.bytes_out_rate,
                "closed": stats.closed,
            })
        })
        .collect();
    json!({
        "seq": update.seq,
        "at": timestamp_json(update.at.as_ref()),
        "interval_seconds": update.interval_seconds,
        "missed_updates": update.missed_updates,
        "channels": channels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(number: u32, state: v1::GenerationState, sha256: &str) -> v1::PluginGeneration {
        v1::PluginGeneration {
            generation: number,
            version: "0.1.0".into(),
            abi_version: "1.0".into(),
            sha256: sha256.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn plugins_table_lists_current_generation_first() {
        let plugin = v1::Plugin {
            name: "echo".into(),
            current_generation: 2,
            generations: vec![
                generation(1, v1::GenerationState::Draining, "0123456789abcdef"),
                generation(2, v1::GenerationState::Current, "fedcba9876543210"),
                generation(3, v1::GenerationState::Standby, ""),
            ],
            ..Default::default()
        };
        let table = plugins_table(&[plugin]);
        let rows: Vec<Vec<&str>> = table.lines().map(|line| line.split_whitespace().collect()).collect();
        assert_eq!(rows[0][..3], ["NAME", "GEN", "STATE"]);
        assert_eq!(rows[1][..3], ["echo", "2", "current"]);
        assert_eq!(rows[2][..3], ["echo", "3", "standby"]);
        assert_eq!(rows[3][..3], ["echo", "1", "draining"]);
        assert_eq!(rows[1][8], "fedcba987654");
        assert_eq!(rows[2][8], "-");
    }

    #[test]
    fn plugin_refs_name_the_generation() {
        assert_eq!(plugin_ref("echo", 2), "echo@2");
        assert_eq!(plugin_ref("echo", 0), "echo");
        assert_eq!(plugin_ref("", 0), "-");
    }

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(&[("ID", Align::Right), ("NAME", Align::Left), ("NOTE", Align::Left)]);
        table.push(vec!["7".into(), "echo".into(), "".into()]);
        table.push(vec!["1234".into(), "x".into(), "closed".into()]);
        assert_eq!(table.render(), "  ID  NAME  NOTE\n   7  echo\n1234  x     closed\n");
    }

    #[test]
    fn table_without_rows_prints_header() {
        let table = Table::new(&[("ID", Align::Right), ("NAME", Align::Left)]);
        assert_eq!(table.render(), "ID  NAME\n");
    }

    #[test]
    fn key_value_table_has_no_header() {
        let table = Table::key_value(vec![("passes", "3".into()), ("handler_calls", "12".into())]);
        assert_eq!(table.render(), "passes         3\nhandler_calls  12\n");
    }

    #[test]
    fn table_counts_chars_not_bytes() {
        let mut table = Table::new(&[("NAME", Align::Left), ("N", Align::Right)]);
        table.push(vec!["héllo".into(), "1".into()]);
        assert_eq!(table.render(), "NAME   N\nhéllo  1\n");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        let text = |seconds, nanos| timestamp_text(Some(&at(seconds, nanos)));
        let json = |seconds, nanos| timestamp_json(Some(&at(seconds, nanos)));
        assert_eq!(text(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(text(951_782_400, 0), "2000-02-29T00:00:00Z");
        assert_eq!(text(1_700_000_000, 0), "2023-11-14T22:13:20Z");
        assert_eq!(text(-1, 0), "1969-12-31T23:59:59Z");
        assert_eq!(text(253_402_300_799, 0), "9999-12-31T23:59:59Z");
        // Tables show whole seconds, rounded down even before 1970 or with
        // nanos a sender left out of range.
        assert_eq!(text(0, 500_000_000), "1970-01-01T00:00:00Z");
        assert_eq!(text(0, -1), "1969-12-31T23:59:59Z");
        assert_eq!(text(0, 1_500_000_000), "1970-01-01T00:00:01Z");
        assert_eq!(json(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(json(0, 500_000_000), "1970-01-01T00:00:00.500Z");
        assert_eq!(json(0, 1_000), "1970-01-01T00:00:00.000001Z");
        assert_eq!(json(0, 1), "1970-01-01T00:00:00.000000001Z");
        assert_eq!(json(0, 1_500_000_000), "1970-01-01T00:00:01.500Z");
        assert_eq!(timestamp_text(None), "-");
        assert_eq!(timestamp_json(None), Value::Null);
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(seconds_text(0.4), "0s");
        assert_eq!(seconds_text(45.9), "45s");
        assert_eq!(seconds_text(187.0), "3m07s");
        assert_eq!(seconds_text(7_509.0), "2h05m09s");
        assert_eq!(seconds_text(273_900.0), "3d04h05m");
        assert_eq!(seconds_text(f64::NAN), "-");
        assert_eq!(micros_text(850), "850us");
        assert_eq!(micros_text(52_140), "52.1ms");
        assert_eq!(micros_text(1_200_000), "1.20s");
    }

    #[test]
    fn info_shows_the_loop_or_says_it_is_gone() {
        let info = v1::DaemonInfo {
            version: "0.1.0".into(),
            phase: v1::DaemonPhase::Running as i32,
            uptime_seconds: 61.0,
            plugins: Some(2),
            listeners: Some(1),
            loop_stats: Some(v1::LoopStats { slow_callbacks: 3, slowest_callback_us: 52_140, ..Default::default() }),
            ..Default::default()
        };
        let table = daemon_info_table(&info);
        for line in ["phase               running", "uptime              1m01s", "slow_callbacks      3"] {
            assert!(table.contains(line), "{line:?} in\n{table}");
        }
        assert!(table.contains("slowest_callback    52.1ms"), "{table}");
        let json = daemon_info_json(&info);
        assert_eq!(json["loop_stats"]["slow_callbacks"], 3);
        assert_eq!(json["stopped_listeners"], Value::Null);

        let gone = v1::DaemonInfo { phase: v1::DaemonPhase::Failed as i32, ..Default::default() };
        let table = daemon_info_table(&gone);
        assert!(table.contains("phase               failed") && table.contains("plugins             -"), "{table}");
        assert!(table.contains("the poll loop does not answer"), "{table}");
        assert_eq!(daemon_info_json(&gone)["loop_stats"], Value::Null);
    }

    #[test]
    fn enum_names_are_short() {
        assert_eq!(listener_state_name(v1::ListenerState::Listening as i32), "listening");
        assert_eq!(channel_kind_name(v1::ChannelKind::Outbound as i32), "outbound");
        assert_eq!(channel_state_name(v1::ChannelState::Closing as i32), "closing");
        assert_eq!(channel_state_name(99), "unknown(99)");
    }
}
