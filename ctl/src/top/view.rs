//! What `top` shows, without a terminal: the channels of the latest
//! `WatchStats` update with what `GetChannel` said of each, the daemon's
//! info, the sort order, and the lines of text they make. Pure, so it is
//! tested here; `terminal` only draws the lines.

use std::{
    cmp::Ordering,
    collections::HashMap,
    time::{Duration, SystemTime},
};

use asyncore_proto::v1;

use crate::render::{daemon_phase_name, micros_text, seconds_text};

/// Lines above the channel rows: the daemon, the counts, the loop, the
/// keys, the column header.
const HEADER_LINES: usize = 5;

/// What the channels can be sorted by. Each has a natural order (biggest or
/// oldest first); `r` reverses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum SortKey {
    /// Bytes per second in and out together.
    #[default]
    Throughput,
    In,
    Out,
    /// Output queued in the daemon.
    Queued,
    /// Oldest first. Channel ids grow with time, so this is id order and
    /// needs no creation time of channels that are not shown.
    Age,
}

impl SortKey {
    const ALL: [SortKey; 5] = [SortKey::Throughput, SortKey::In, SortKey::Out, SortKey::Queued, SortKey::Age];

    fn position(self) -> usize {
        SortKey::ALL.iter().position(|&key| key == self).expect("every key is in ALL")
    }

    fn next(self) -> SortKey {
        SortKey::ALL[(self.position() + 1) % SortKey::ALL.len()]
    }

    fn previous(self) -> SortKey {
        SortKey::ALL[(self.position() + SortKey::ALL.len() - 1) % SortKey::ALL.len()]
    }

    fn name(self) -> &'static str {
        match self {
            SortKey::Throughput => "in+out/s",
            SortKey::In => "in/s",
            SortKey::Out => "out/s",
            SortKey::Queued => "queued",
            SortKey::Age => "age",
        }
    }

    /// `a` before `b` in the natural order: biggest first, or oldest.
    fn compare(self, a: &v1::ChannelStats, b: &v1::ChannelStats) -> Ordering {
        let descending = |x: f64, y: f64| y.total_cmp(&x);
        match self {
            SortKey::Throughput => descending(a.bytes_in_rate + a.bytes_out_rate, b.bytes_in_rate + b.bytes_out_rate),
            SortKey::In => descending(a.bytes_in_rate, b.bytes_in_rate),
            SortKey::Out => descending(a.bytes_out_rate, b.bytes_out_rate),
            SortKey::Queued => b.pending_output.cmp(&a.pending_output),
            SortKey::Age => a.channel_id.cmp(&b.channel_id),
        }
    }
}

/// What a key asks of the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    NextSort,
    PreviousSort,
    Reverse,
    Quit,
}

/// What the stats stream does not carry about a channel, from
/// `GetChannel`. A channel that closed before it was asked gets the
/// default: known, and shown as `-`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct ChannelFacts {
    pub(super) plugin: String,
    pub(super) generation: u32,
    pub(super) peer: String,
    pub(super) created_at: Option<SystemTime>,
}

impl ChannelFacts {
    pub(super) fn of(channel: &v1::Channel) -> ChannelFacts {
        ChannelFacts {
            plugin: channel.plugin.clone(),
            generation: channel.plugin_generation,
            peer: channel.peer_address.clone(),
            created_at: channel.created_at.and_then(|at| SystemTime::try_from(at).ok()),
        }
    }
}

/// One line of the screen; an emphasised one is drawn in reverse video
/// across the whole width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Line {
    pub(super) text: String,
    pub(super) emphasis: bool,
}

impl Line {
    fn plain(text: String) -> Line {
        Line { text, emphasis: false }
    }
}

/// The loop's counters per second, from two infos in a row.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LoopRates {
    passes: f64,
    events: f64,
    handler_calls: f64,
}

/// Everything `top` knows, and how the user wants it sorted.
#[derive(Debug, Default)]
pub(super) struct View {
    sort: SortKey,
    reversed: bool,
    /// The live channels of the latest update.
    channels: Vec<v1::ChannelStats>,
    /// When the daemon took the latest figures.
    at: Option<SystemTime>,
    facts: HashMap<u64, ChannelFacts>,
    info: Option<v1::DaemonInfo>,
    loop_rates: Option<LoopRates>,
    /// Why the latest info could not be had.
    info_error: Option<String>,
}

impl View {
    /// Takes a `WatchStats` update of what changed (`changed_only`): a
    /// complete one replaces every channel; another updates the channels it
    /// names, adds the new ones and drops the closed ones, and the channels
    /// it leaves out moved nothing since the previous one (their rates are
    /// 0). What was known of channels that are gone is forgotten.
    pub(super) fn apply_update(&mut self, update: v1::StatsUpdate) {
        self.at = update.at.and_then(|at| SystemTime::try_from(at).ok());
        if update.complete {
            self.channels = update.channels;
        } else {
            let mut changed: HashMap<u64, v1::ChannelStats> =
                update.channels.into_iter().map(|c| (c.channel_id, c)).collect();
            for channel in &mut self.channels {
                match changed.remove(&channel.channel_id) {
                    Some(now) => *channel = now,
                    None => (channel.bytes_in_rate, channel.bytes_out_rate) = (0.0, 0.0),
                }
            }
            self.channels.extend(changed.into_values());
        }
        self.channels.retain(|c| !c.closed);
        let live: HashMap<u64, ()> = self.channels.iter().map(|c| (c.channel_id, ())).collect();
        self.facts.retain(|id, _| live.contains_key(id));
    }

    /// Takes the daemon's info, or why it could not be had (the previous
    /// one stays shown).
    pub(super) fn apply_info(&mut self, info: Result<v1::DaemonInfo, String>) {
        let info = match info {
            Ok(info) => info,
            Err(error) => {
                self.info_error = Some(error);
                return;
            }
        };
        self.info_error = None;
        let before = self.info.as_ref().and_then(|i| i.loop_stats.map(|s| (i.uptime_seconds, s)));
        let now = info.loop_stats.map(|s| (info.uptime_seconds, s));
        self.loop_rates = match (before, now) {
            (Some((t0, s0)), Some((t1, s1))) if t1 > t0 => {
                let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / (t1 - t0);
                Some(LoopRates {
                    passes: rate(s0.passes, s1.passes),
                    events: rate(s0.events, s1.events),
                    handler_calls: rate(s0.handler_calls, s1.handler_calls),
                })
            }
            _ => self.loop_rates,
        };
        self.info = Some(info);
    }

    /// Takes what `GetChannel` said of channels (still live ones only).
    pub(super) fn apply_facts(&mut self, facts: Vec<(u64, ChannelFacts)>) {
        for (id, facts) in facts {
            if self.channels.iter().any(|c| c.channel_id == id) {
                self.facts.insert(id, facts);
            }
        }
    }

    /// Acts on a key; `Quit` is the caller's.
    pub(super) fn act(&mut self, action: Action) {
        match action {
            Action::NextSort => (self.sort, self.reversed) = (self.sort.next(), false),
            Action::PreviousSort => (self.sort, self.reversed) = (self.sort.previous(), false),
            Action::Reverse => self.reversed = !self.reversed,
            Action::Quit => {}
        }
    }

    /// The channels in display order: the sort key, then the channel id.
    fn sorted(&self) -> Vec<&v1::ChannelStats> {
        let mut rows: Vec<&v1::ChannelStats> = self.channels.iter().collect();
        rows.sort_by(|a, b| {
            let order = self.sort.compare(a, b);
            let order = if self.reversed { order.reverse() } else { order };
            order.then(a.channel_id.cmp(&b.channel_id))
        });
        rows
    }

    /// The channels a screen of `height` lines shows whose facts are not
    /// known yet: only those are asked for, so a refresh costs at most a
    /// screenful of `GetChannel` calls whatever the number of channels.
    pub(super) fn missing_facts(&self, height: usize) -> Vec<u64> {
        let shown = height.saturating_sub(HEADER_LINES);
        self.sorted().into_iter().take(shown).map(|c| c.channel_id).filter(|id| !self.facts.contains_key(id)).collect()
    }

    /// The screen: the header, then as many channels as fit in `height`
    /// lines. Lines are not cut to a width; the terminal does that.
    pub(super) fn lines(&self, height: usize) -> Vec<Line> {
        let mut lines = self.header();
        let rows: Vec<Vec<String>> =
            self.sorted().into_iter().take(height.saturating_sub(HEADER_LINES)).map(|stats| self.row(stats)).collect();
        let mark = |key: SortKey| match (self.sort == key, self.reversed) {
            (false, _) => "",
            (true, false) => "v",
            (true, true) => "^",
        };
        let throughput = mark(SortKey::Throughput);
        let headers = [
            "CHANNEL".to_owned(),
            "LISTENER".to_owned(),
            "PLUGIN".to_owned(),
            "PEER".to_owned(),
            format!("IN/S{}{throughput}", mark(SortKey::In)),
            format!("OUT/S{}{throughput}", mark(SortKey::Out)),
            format!("QUEUED{}", mark(SortKey::Queued)),
            format!("AGE{}", mark(SortKey::Age)),
        ];
        // Numbers right-aligned, names left-aligned.
        let right = [true, true, false, false, true, true, true, true];
        let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let format_row = |cells: &[String]| {
            let mut line = String::new();
            for (index, cell) in cells.iter().enumerate() {
                if index > 0 {
                    line.push_str("  ");
                }
                let padding = " ".repeat(widths[index] - cell.chars().count());
                if right[index] {
                    line.push_str(&padding);
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&padding);
                }
            }
            line.trim_end().to_owned()
        };
        lines.push(Line { text: format_row(&headers), emphasis: true });
        lines.extend(rows.iter().map(|row| Line::plain(format_row(row))));
        lines
    }

    /// The daemon, the counts, the loop, the keys.
    fn header(&self) -> Vec<Line> {
        let mut daemon = match &self.info {
            Some(info) => format!(
                "asyncored {}  {}  up {}",
                info.version,
                daemon_phase_name(info.phase),
                seconds_text(info.uptime_seconds)
            ),
            None => "asyncored".to_owned(),
        };
        if self.at.is_none() {
            daemon.push_str("  (waiting for the first figures)");
        }
        if let Some(error) = &self.info_error {
            daemon.push_str(&format!("  (info: {error})"));
        }
        let count = |count: Option<u64>| count.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let info = self.info.as_ref();
        let loop_stats = info.and_then(|i| i.loop_stats);
        let counts = format!(
            "channels {}  listeners {} ({} stopped)  plugins {} ({} generations)",
            self.channels.len(),
            count(info.and_then(|i| i.listeners)),
            count(info.and_then(|i| i.stopped_listeners)),
            count(info.and_then(|i| i.plugins)),
            count(info.and_then(|i| i.plugin_generations)),
        );
        let per_second = |rate: Option<f64>| rate.map_or_else(|| "-".to_owned(), |r| format!("{r:.0}"));
        let rates = self.loop_rates;
        let the_loop = match loop_stats {
            Some(stats) => format!(
                "loop: {} passes/s  {} events/s  {} calls/s  slow callbacks {} (slowest {})  panics {}  dropped {}",
                per_second(rates.map(|r| r.passes)),
                per_second(rates.map(|r| r.events)),
                per_second(rates.map(|r| r.handler_calls)),
                stats.slow_callbacks,
                micros_text(stats.slowest_callback_us),
                stats.panics,
                bytes_text(stats.bytes_dropped as f64),
            ),
            None => "loop: -".to_owned(),
        };
        let order = if self.reversed { " reversed" } else { "" };
        let keys = format!(
            "sort: {}{order}  (s/>/right: next column, </left: previous, r: reverse, q: quit)",
            self.sort.name()
        );
        [daemon, counts, the_loop, keys].into_iter().map(Line::plain).collect()
    }

    fn row(&self, stats: &v1::ChannelStats) -> Vec<String> {
        let facts = self.facts.get(&stats.channel_id);
        let dash = || "-".to_owned();
        let plugin = facts.filter(|f| !f.plugin.is_empty()).map_or_else(dash, |f| match f.generation {
            0 => f.plugin.clone(),
            generation => format!("{}@{generation}", f.plugin),
        });
        let peer = facts.filter(|f| !f.peer.is_empty()).map_or_else(dash, |f| f.peer.clone());
        let age = match (facts.and_then(|f| f.created_at), self.at) {
            (Some(created), Some(at)) => {
                seconds_text(at.duration_since(created).unwrap_or(Duration::ZERO).as_secs_f64())
            }
            _ => dash(),
        };
        vec![
            stats.channel_id.to_string(),
            if stats.listener_id == 0 { dash() } else { stats.listener_id.to_string() },
            plugin,
            peer,
            bytes_text(stats.bytes_in_rate),
            bytes_text(stats.bytes_out_rate),
            bytes_text(stats.pending_output as f64),
            age,
        ]
    }
}

/// Bytes (or bytes per second) in binary units, short: `512`, `1.5K`,
/// `12.0M`, `3.1G`.
fn bytes_text(bytes: f64) -> String {
    if !bytes.is_finite() || bytes < 0.0 {
        return "-".to_owned();
    }
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if bytes < 1024.0 {
        return format!("{bytes:.0}");
    }
    let mut value = bytes;
    let mut unit = "";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(channel_id: u64, bytes_in_rate: f64, bytes_out_rate: f64, pending_output: u64) -> v1::ChannelStats {
        v1::ChannelStats {
            channel_id,
            listener_id: 1,
            bytes_in_rate,
            bytes_out_rate,
            pending_output,
            ..Default::default()
        }
    }

    fn update(channels: Vec<v1::ChannelStats>) -> v1::StatsUpdate {
        v1::StatsUpdate {
            seq: 1,
            at: Some(prost_types::Timestamp { seconds: 1_000, nanos: 0 }),
            channels,
            complete: true,
            ..Default::default()
        }
    }

    /// The channel ids of the rows, in order.
    fn order(view: &View) -> Vec<u64> {
        view.sorted().into_iter().map(|c| c.channel_id).collect()
    }

    #[test]
    fn sorted_by_throughput_then_by_the_keys() {
        let mut view = View::default();
        view.apply_update(update(vec![
            stats(1, 10.0, 10.0, 0),
            stats(2, 100.0, 0.0, 5),
            stats(3, 0.0, 50.0, 900),
            stats(4, 10.0, 10.0, 0),
        ]));
        assert_eq!(order(&view), [2, 3, 1, 4], "in+out, the busiest first, ties by id");
        view.act(Action::NextSort);
        assert_eq!(order(&view), [2, 1, 4, 3], "in/s");
        view.act(Action::NextSort);
        assert_eq!(order(&view), [3, 1, 4, 2], "out/s");
        view.act(Action::NextSort);
        assert_eq!(order(&view), [3, 2, 1, 4], "queued");
        view.act(Action::NextSort);
        assert_eq!(order(&view), [1, 2, 3, 4], "age: the oldest first");
        view.act(Action::Reverse);
        assert_eq!(order(&view), [4, 3, 2, 1], "reversed: the newest first");
        view.act(Action::NextSort);
        assert_eq!((view.sort, view.reversed), (SortKey::Throughput, false), "wraps around, in natural order");
        view.act(Action::PreviousSort);
        assert_eq!(view.sort, SortKey::Age);
    }

    #[test]
    fn closed_channels_leave_with_their_facts() {
        let mut view = View::default();
        view.apply_update(update(vec![stats(1, 0.0, 0.0, 0), stats(2, 0.0, 0.0, 0)]));
        view.apply_facts(vec![(1, ChannelFacts { peer: "127.0.0.1:5000".into(), ..Default::default() })]);
        view.apply_facts(vec![(9, ChannelFacts::default())]);
        assert_eq!(view.facts.len(), 1, "facts of a channel not shown are not kept");
        let mut closed = stats(1, 0.0, 0.0, 0);
        closed.closed = true;
        view.apply_update(update(vec![closed, stats(2, 0.0, 0.0, 0)]));
        assert_eq!(order(&view), [2]);
        assert!(view.facts.is_empty());
    }

    #[test]
    fn an_update_of_what_changed_merges_and_zeroes_the_rates_of_the_rest() {
        let mut view = View::default();
        view.apply_update(update(vec![stats(1, 10.0, 10.0, 0), stats(2, 20.0, 0.0, 0), stats(3, 5.0, 5.0, 0)]));
        let mut closed = stats(3, 0.0, 0.0, 0);
        closed.closed = true;
        let changes =
            v1::StatsUpdate { complete: false, ..update(vec![stats(2, 40.0, 0.0, 7), stats(4, 1.0, 0.0, 0), closed]) };
        view.apply_update(changes);
        let rows: Vec<(u64, f64, u64)> =
            view.sorted().into_iter().map(|c| (c.channel_id, c.bytes_in_rate, c.pending_output)).collect();
        assert_eq!(rows, [(2, 40.0, 7), (4, 1.0, 0), (1, 0.0, 0)], "2 changed, 4 is new, 3 closed, 1 rested");
    }

    #[test]
    fn only_the_rows_on_screen_are_asked_about() {
        let mut view = View::default();
        view.apply_update(update((1..=100).map(|id| stats(id, id as f64, 0.0, 0)).collect()));
        let missing = view.missing_facts(HEADER_LINES + 3);
        assert_eq!(missing, [100, 99, 98]);
        view.apply_facts(vec![(99, ChannelFacts::default())]);
        assert_eq!(view.missing_facts(HEADER_LINES + 3), [100, 98]);
        assert!(view.missing_facts(2).is_empty());
    }

    #[test]
    fn the_screen_has_the_header_and_a_row_per_channel() {
        let mut view = View::default();
        view.apply_info(Ok(v1::DaemonInfo {
            version: "0.1.0".into(),
            phase: v1::DaemonPhase::Running as i32,
            uptime_seconds: 10.0,
            listeners: Some(1),
            stopped_listeners: Some(0),
            plugins: Some(1),
            plugin_generations: Some(1),
            loop_stats: Some(v1::LoopStats { passes: 100, events: 50, ..Default::default() }),
            ..Default::default()
        }));
        view.apply_info(Ok(v1::DaemonInfo {
            uptime_seconds: 12.0,
            loop_stats: Some(v1::LoopStats {
                passes: 300,
                events: 70,
                slow_callbacks: 2,
                slowest_callback_us: 52_000,
                ..Default::default()
            }),
            ..view.info.clone().unwrap()
        }));
        view.apply_update(update(vec![stats(7, 2048.0, 1536.0, 100)]));
        view.apply_facts(vec![(
            7,
            ChannelFacts {
                plugin: "echo".into(),
                generation: 2,
                peer: "127.0.0.1:40000".into(),
                created_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 - 75)),
            },
        )]);
        let lines = view.lines(24);
        let text: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(text[0], "asyncored 0.1.0  running  up 12s");
        assert_eq!(text[1], "channels 1  listeners 1 (0 stopped)  plugins 1 (1 generations)");
        assert!(
            text[2].starts_with("loop: 100 passes/s  10 events/s  0 calls/s  slow callbacks 2 (slowest 52.0ms)"),
            "{}",
            text[2]
        );
        assert!(text[3].starts_with("sort: in+out/s "), "{}", text[3]);
        assert!(lines[4].emphasis && !lines[5].emphasis);
        let columns: Vec<&str> = text[4].split_whitespace().collect();
        assert_eq!(columns, ["CHANNEL", "LISTENER", "PLUGIN", "PEER", "IN/Sv", "OUT/Sv", "QUEUED", "AGE"]);
        let cells: Vec<&str> = text[5].split_whitespace().collect();
        assert_eq!(cells, ["7", "1", "echo@2", "127.0.0.1:40000", "2.0K", "1.5K", "100", "1m15s"]);
        assert_eq!(lines.len(), 6);
        assert_eq!(view.lines(HEADER_LINES).len(), HEADER_LINES, "no room for rows");
    }

    #[test]
    fn a_channel_not_asked_about_yet_shows_dashes() {
        let mut view = View::default();
        view.apply_update(update(vec![stats(3, 0.0, 0.0, 0)]));
        let lines = view.lines(24);
        let cells: Vec<&str> = lines[5].text.split_whitespace().collect();
        assert_eq!(cells, ["3", "1", "-", "-", "0", "0", "0", "-"]);
        view.apply_info(Err("status: Unavailable".into()));
        assert!(view.lines(24)[0].text.ends_with("(info: status: Unavailable)"));
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes_text(0.0), "0");
        assert_eq!(bytes_text(1023.4), "1023");
        assert_eq!(bytes_text(1536.0), "1.5K");
        assert_eq!(bytes_text(12.0 * 1024.0 * 1024.0), "12.0M");
        assert_eq!(bytes_text(3.1 * 1024.0 * 1024.0 * 1024.0), "3.1G");
        assert_eq!(bytes_text(f64::NAN), "-");
    }
}
