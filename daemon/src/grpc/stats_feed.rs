//! `WatchStats`: one feed of figures per (filter, interval), shared by
//! every stream that asks for the same, and streams that cost a bounded
//! amount however slowly their clients read.
//!
//! A feed asks the poll loop once per tick, however many streams watch it,
//! and only for what changed: the loop answers with the channels it noted
//! as changed since the feed's previous question (`Command::StatsChanges`),
//! so a tick costs the loop what changed, not what is open. The feed keeps
//! the table of every watched live channel's figures, updated by those
//! answers, and publishes each tick on a `watch` channel, which holds only
//! the latest one. So nothing is ever queued for a stream: when its client
//! reads slower than it asked (or not at all), the stream is simply not
//! polled, and when it is polled again it takes the latest figures and says
//! how many ticks it skipped (`missed_updates`). Channels that closed
//! during the skipped ticks are still reported once, from a bounded history
//! the feed keeps. A stream that asked for `changed_only` is sent the
//! channels whose figures changed since its previous message; the others,
//! the whole table. Streams are capped by a semaphore
//! (`max_stats_watchers`); each holds its permit, and a feed ends when its
//! last stream goes.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use asyncore_engine::command::{ChannelStats, Command, EngineHandle, StatsFilter, StatsSnapshot};
use asyncore_proto::v1;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_stream::{Stream, StreamExt as _, wrappers::WatchStream};
use tonic::Status;

use super::{convert, status};

/// Closed-channel records a feed keeps for streams that skip ticks (about
/// 60 bytes each). A stream that skipped past more closes than this misses
/// some of them.
const CLOSED_HISTORY: usize = 4096;

/// What `WatchStats` answers with.
pub(crate) type StatsStream = Pin<Box<dyn Stream<Item = Result<v1::StatsUpdate, Status>> + Send>>;

/// What a stream asks for: streams with the same key share a feed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FeedKey {
    listener_id: Option<u64>,
    channel_ids: Vec<u64>,
    interval: Duration,
}

/// Every running feed, and the cap on streams.
#[derive(Debug)]
pub(crate) struct StatsFeeds {
    engine: EngineHandle,
    feeds: Mutex<HashMap<FeedKey, Arc<Feed>>>,
    watchers: Arc<Semaphore>,
    max_watchers: usize,
}

/// One tick of a feed.
#[derive(Debug)]
struct Tick {
    /// Counts the feed's ticks from 1.
    seq: u64,
    taken: Instant,
    taken_at: SystemTime,
    /// The live channels whose figures changed in this tick, then those
    /// that closed.
    changed: Vec<ChannelStats>,
    /// The loop answered with every live channel, not only the changed
    /// ones (it could not say which changed): every stream is sent all.
    complete: bool,
}

/// The live channels a feed watches, as of its latest tick.
#[derive(Debug, Default)]
struct Table {
    /// The tick these figures are of.
    seq: u64,
    /// Each live channel's figures, and the tick they last changed in.
    channels: BTreeMap<u64, (ChannelStats, u64)>,
}

impl Table {
    /// Takes the loop's answer for tick `seq`: returns the live channels
    /// whose figures changed, then the closed ones.
    fn apply(&mut self, seq: u64, snapshot: StatsSnapshot) -> Vec<ChannelStats> {
        let mut before = if snapshot.complete { std::mem::take(&mut self.channels) } else { BTreeMap::new() };
        let (mut changed, mut closed) = (Vec::new(), Vec::new());
        for stats in snapshot.channels {
            if stats.closed {
                self.channels.remove(&stats.channel_id);
                closed.push(stats);
                continue;
            }
            let known = before.remove(&stats.channel_id).or_else(|| self.channels.get(&stats.channel_id).copied());
            let same = known
                .is_some_and(|(old, _)| old.counters == stats.counters && old.pending_output == stats.pending_output);
            let since = match known {
                Some((_, since)) if same => since,
                _ => {
                    changed.push(stats);
                    seq
                }
            };
            self.channels.insert(stats.channel_id, (stats, since));
        }
        self.seq = seq;
        changed.append(&mut closed);
        changed
    }
}

/// What a feed publishes: nothing yet, a tick, or the error that ended it.
type Published = Option<Result<Arc<Tick>, Status>>;

#[derive(Debug)]
struct Feed {
    ticks: watch::Sender<Published>,
    /// The closed-channel records of recent ticks, with their tick's
    /// number, oldest first; at most [`CLOSED_HISTORY`].
    closed: Mutex<VecDeque<(u64, ChannelStats)>>,
    /// Updated, and the tick published, under this lock.
    table: Mutex<Table>,
}

impl Feed {
    fn remember_closed(&self, seq: u64, changed: &[ChannelStats]) {
        let mut closed = self.closed.lock().expect("no panics under this lock");
        closed.extend(changed.iter().filter(|s| s.closed).map(|s| (seq, *s)));
        let excess = closed.len().saturating_sub(CLOSED_HISTORY);
        closed.drain(..excess);
    }

    /// Channels that closed in the ticks after `after` and before `before`.
    fn closed_between(&self, after: u64, before: u64) -> Vec<ChannelStats> {
        let closed = self.closed.lock().expect("no panics under this lock");
        closed.iter().filter(|(seq, _)| *seq > after && *seq < before).map(|(_, s)| *s).collect()
    }
}

impl StatsFeeds {
    pub(crate) fn new(engine: EngineHandle, max_watchers: usize) -> StatsFeeds {
        StatsFeeds { engine, feeds: Mutex::default(), watchers: Arc::new(Semaphore::new(max_watchers)), max_watchers }
    }

    /// A stream of the channels of `listener_id` (any when `None`) among
    /// `channel_ids` (all when empty), every `interval`: on the feed of
    /// streams that asked for the same, or on a new one.
    ///
    /// # Errors
    ///
    /// RESOURCE_EXHAUSTED past `max_watchers` streams.
    pub(crate) fn watch(
        self: &Arc<Self>,
        listener_id: Option<u64>,
        channel_ids: Vec<u64>,
        interval: Duration,
        changed_only: bool,
    ) -> Result<StatsStream, Status> {
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} WatchStats streams are open, the most this daemon serves (max_stats_watchers); \
                 close one, or watch on one of them",
                self.max_watchers
            ))
        })?;
        // The filter in the order `StatsFilter` keeps, so that the same
        // channels asked in the same order share a feed.
        let channel_ids = StatsFilter::new(listener_id, channel_ids).channel_ids().to_vec();
        let key = FeedKey { listener_id, channel_ids, interval };
        let (feed, ticks) = {
            let mut feeds = self.feeds.lock().expect("no panics under this lock");
            match feeds.get(&key) {
                Some(feed) => (feed.clone(), feed.ticks.subscribe()),
                None => {
                    let (sender, ticks) = watch::channel(None);
                    let feed = Arc::new(Feed { ticks: sender, closed: Mutex::default(), table: Mutex::default() });
                    feeds.insert(key.clone(), feed.clone());
                    tokio::spawn(self.clone().run_feed(key, feed.clone()));
                    (feed, ticks)
                }
            }
        };
        // The tick this stream starts after: the figures published before it
        // came are not what it missed.
        let last_tick = match &*ticks.borrow() {
            Some(Ok(tick)) => tick.seq,
            _ => 0,
        };
        let mut watcher = Watcher {
            feed,
            changed_only,
            last_tick,
            sent: 0,
            since: Instant::now(),
            previous: HashMap::new(),
            _permit: permit,
        };
        let updates = WatchStream::from_changes(ticks).filter_map(move |published| watcher.update(published?));
        Ok(Box::pin(updates))
    }

    /// Asks the loop what changed once per tick until no stream watches
    /// the feed, or the loop fails (then every stream of the feed ends with
    /// the error).
    async fn run_feed(self: Arc<Self>, key: FeedKey, feed: Arc<Feed>) {
        let filter = StatsFilter::new(key.listener_id, key.channel_ids.iter().copied());
        let request = |closed_after, since| {
            let filter = filter.clone();
            self.engine.request(move |reply| Command::StatsChanges { filter, closed_after, since, reply })
        };
        // Every live channel to start the table with, and the closed-channel
        // records that exist now: channels closed before the watch began
        // are not news.
        let (mut closed_after, mut epoch) = match request(u64::MAX, 0).await {
            Ok(snapshot) => {
                let (closed_seq, epoch) = (snapshot.closed_seq, snapshot.epoch);
                feed.table.lock().expect("no panics under this lock").apply(0, snapshot);
                (closed_seq, epoch)
            }
            Err(e) => return self.end_feed(&key, &feed, Some(status(e))),
        };
        let mut ticker = tokio::time::interval(key.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = feed.ticks.closed() => {
                    if self.forget_if_unwatched(&key, &feed) {
                        return;
                    }
                    continue;
                }
            }
            let snapshot = match request(closed_after, epoch).await {
                Ok(snapshot) => snapshot,
                Err(e) => return self.end_feed(&key, &feed, Some(status(e))),
            };
            (closed_after, epoch) = (snapshot.closed_seq, snapshot.epoch);
            seq += 1;
            let complete = snapshot.complete;
            let mut table = feed.table.lock().expect("no panics under this lock");
            let changed = table.apply(seq, snapshot);
            feed.remember_closed(seq, &changed);
            let tick = Tick { seq, taken: Instant::now(), taken_at: SystemTime::now(), changed, complete };
            feed.ticks.send_replace(Some(Ok(Arc::new(tick))));
        }
    }

    /// Removes the feed if no stream watches it; checked under the lock
    /// that new streams subscribe under, so none can join a feed that is
    /// ending.
    fn forget_if_unwatched(&self, key: &FeedKey, feed: &Arc<Feed>) -> bool {
        let mut feeds = self.feeds.lock().expect("no panics under this lock");
        if feed.ticks.receiver_count() > 0 {
            return false;
        }
        if feeds.get(key).is_some_and(|current| Arc::ptr_eq(current, feed)) {
            feeds.remove(key);
        }
        true
    }

    /// Removes the feed and ends its streams with `error`.
    fn end_feed(&self, key: &FeedKey, feed: &Arc<Feed>, error: Option<Status>) {
        let mut feeds = self.feeds.lock().expect("no panics under this lock");
        if feeds.get(key).is_some_and(|current| Arc::ptr_eq(current, feed)) {
            feeds.remove(key);
        }
        if let Some(error) = error {
            feed.ticks.send_replace(Some(Err(error)));
        }
    }
}

/// Where one stream is: all it holds besides the shared feed.
struct Watcher {
    feed: Arc<Feed>,
    /// Send only the channels whose figures changed since the previous
    /// message.
    changed_only: bool,
    /// The feed's tick this stream last reported (or started after).
    last_tick: u64,
    /// Messages sent.
    sent: u64,
    /// When the figures of the last message were taken (at first, when
    /// the stream began).
    since: Instant,
    /// Each live channel's byte counts at the last message, for the rates.
    previous: HashMap<u64, (u64, u64)>,
    _permit: OwnedSemaphorePermit,
}

impl Watcher {
    /// The message for the latest tick, which the stream is being polled
    /// for, or the error that ended the feed.
    fn update(&mut self, published: Result<Arc<Tick>, Status>) -> Option<Result<v1::StatsUpdate, Status>> {
        let tick = match published {
            Ok(tick) => tick,
            Err(error) => return Some(Err(error)),
        };
        if tick.seq <= self.last_tick {
            return None;
        }
        let missed_updates = tick.seq - self.last_tick - 1;
        let complete = !self.changed_only || self.sent == 0 || tick.complete;
        let live: Vec<ChannelStats> = {
            let table = self.feed.table.lock().expect("no panics under this lock");
            if table.seq != tick.seq {
                // A newer tick is being published: this stream is woken
                // for it, and takes its figures then.
                return None;
            }
            if complete {
                table.channels.values().map(|(stats, _)| *stats).collect()
            } else if missed_updates == 0 {
                tick.changed.iter().filter(|s| !s.closed).copied().collect()
            } else {
                let last = self.last_tick;
                table.channels.values().filter(|(_, since)| *since > last).map(|(stats, _)| *stats).collect()
            }
        };
        let skipped_closes =
            if missed_updates > 0 { self.feed.closed_between(self.last_tick, tick.seq) } else { Vec::new() };
        let closes = tick.changed.iter().filter(|s| s.closed);
        self.sent += 1;
        let message = convert::StatsMessage {
            seq: self.sent,
            at: tick.taken_at,
            seconds: tick.taken.saturating_duration_since(self.since).as_secs_f64(),
            missed_updates,
            complete,
        };
        let channels = skipped_closes.iter().chain(&live).chain(closes);
        let update = convert::stats_update(message, channels, &mut self.previous);
        self.last_tick = tick.seq;
        self.since = tick.taken;
        Some(Ok(update))
    }
}

#[cfg(test)]
mod tests {
    use asyncore_engine::command::Counters;

    use super::*;

    fn stats(channel_id: u64, bytes_in: u64, closed: bool) -> ChannelStats {
        let counters = Counters { bytes_in, ..Counters::default() };
        ChannelStats { channel_id, listener_id: 1, counters, pending_output: 0, closed }
    }

    fn snapshot(complete: bool, channels: Vec<ChannelStats>) -> StatsSnapshot {
        StatsSnapshot { channels, complete, ..StatsSnapshot::default() }
    }

    fn ids(channels: &[ChannelStats]) -> Vec<u64> {
        channels.iter().map(|s| s.channel_id).collect()
    }

    #[test]
    fn the_table_reports_what_changed_and_forgets_what_is_gone() {
        let mut table = Table::default();
        let first = table.apply(0, snapshot(true, vec![stats(1, 0, false), stats(2, 0, false), stats(3, 0, false)]));
        assert_eq!(ids(&first), [1, 2, 3]);
        // The loop may name a channel whose figures are as they were.
        let second = table.apply(1, snapshot(false, vec![stats(1, 5, false), stats(2, 0, false), stats(3, 9, true)]));
        assert_eq!(ids(&second), [1, 3]);
        assert_eq!(table.channels.keys().copied().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(table.channels[&1].1, 1);
        assert_eq!(table.channels[&2].1, 0);
        // A complete answer drops channels it does not list (gone without
        // a record), and keeps when the others last changed.
        let third = table.apply(2, snapshot(true, vec![stats(1, 5, false), stats(4, 1, false)]));
        assert_eq!(ids(&third), [4]);
        assert_eq!(table.channels.keys().copied().collect::<Vec<_>>(), [1, 4]);
        assert_eq!(table.channels[&1].1, 1);
    }
}
