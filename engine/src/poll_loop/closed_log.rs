//! The final counters of recently closed channels, numbered in closing
//! order, so that a stats watcher asking every tick gets each closed channel
//! once, and learns how many it missed when it asked too rarely.

use std::collections::VecDeque;

use crate::command::ChannelStats;

#[derive(Debug)]
pub(super) struct ClosedLog {
    /// `(sequence number, final counters)`, oldest first; numbers are
    /// consecutive.
    records: VecDeque<(u64, ChannelStats)>,
    /// Number of the newest record (0: none yet).
    seq: u64,
    capacity: usize,
}

impl ClosedLog {
    /// A log keeping the newest `capacity` records.
    pub(super) fn new(capacity: usize) -> ClosedLog {
        ClosedLog { records: VecDeque::new(), seq: 0, capacity }
    }

    pub(super) fn push(&mut self, stats: ChannelStats) {
        self.seq += 1;
        if self.records.len() == self.capacity {
            self.records.pop_front();
        }
        self.records.push_back((self.seq, stats));
    }

    /// Number of the newest record: a watcher passes it as `after` next
    /// time.
    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    /// The records numbered after `after` that are still kept (found by
    /// binary search: the log is in number order), and how many numbered
    /// after `after` were already discarded.
    pub(super) fn since(&self, after: u64) -> (u64, impl Iterator<Item = &ChannelStats>) {
        let oldest = self.records.front().map_or(self.seq + 1, |(seq, _)| *seq);
        let missed = oldest.saturating_sub(after.saturating_add(1));
        let first_new = self.records.partition_point(|(seq, _)| *seq <= after);
        (missed, self.records.range(first_new..).map(|(_, stats)| stats))
    }
}

#[cfg(test)]
mod tests {
    use super::ClosedLog;
    use crate::command::{ChannelStats, Counters};

    fn closed(channel_id: u64) -> ChannelStats {
        ChannelStats { channel_id, listener_id: 1, counters: Counters::default(), pending_output: 0, closed: true }
    }

    fn since(log: &ClosedLog, after: u64) -> (u64, Vec<u64>) {
        let (missed, records) = log.since(after);
        (missed, records.map(|stats| stats.channel_id).collect())
    }

    #[test]
    fn an_empty_log_has_nothing_and_missed_nothing() {
        let log = ClosedLog::new(3);
        assert_eq!(log.seq(), 0);
        assert_eq!(since(&log, 0), (0, vec![]));
        assert_eq!(since(&log, u64::MAX), (0, vec![]), "a watch starting now");
    }

    #[test]
    fn a_watcher_gets_each_record_once() {
        let mut log = ClosedLog::new(3);
        log.push(closed(10));
        log.push(closed(11));
        assert_eq!(since(&log, 0), (0, vec![10, 11]));
        let seen = log.seq();
        assert_eq!(seen, 2);
        log.push(closed(12));
        assert_eq!(since(&log, seen), (0, vec![12]));
        assert_eq!(since(&log, log.seq()), (0, vec![]));
        assert_eq!(since(&log, u64::MAX), (0, vec![]));
    }

    #[test]
    fn records_past_capacity_are_counted_as_missed() {
        let mut log = ClosedLog::new(3);
        for channel in 10..15 {
            log.push(closed(channel));
        }
        // Kept: numbers 3, 4, 5 (channels 12, 13, 14); 1 and 2 are gone.
        assert_eq!(log.seq(), 5);
        assert_eq!(since(&log, 0), (2, vec![12, 13, 14]));
        assert_eq!(since(&log, 1), (1, vec![12, 13, 14]));
        assert_eq!(since(&log, 2), (0, vec![12, 13, 14]));
        assert_eq!(since(&log, 4), (0, vec![14]));
        assert_eq!(since(&log, 5), (0, vec![]));
    }
}
