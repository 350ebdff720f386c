//! Which channels changed since a stats reader last asked, so that a
//! `WatchStats` tick costs the loop what changed, not what is open.
//!
//! Time is cut into *epochs*: each incremental stats request ends the
//! current one. A channel is noted at most once per epoch, when it is
//! marked dirty (every read, write, queued output or state change of a
//! channel marks it dirty before the pass ends) and when queued output is
//! written (a pass later, maybe after a reader asked), as `(epoch, id)` at the
//! back of a log. A reader that last asked at the end of epoch `since`
//! gets the channels of the entries after `since`; a channel noted in
//! several of those epochs is taken once, from the entry that matches its
//! latest note. Closed channels leave the map and are reported by the
//! closed-channel log instead.
//!
//! The log is bounded: past [`ChangeLog::capacity`] entries the oldest go,
//! and a reader whose `since` is older than what was dropped is told to
//! take a full snapshot instead.

use std::collections::VecDeque;

use crate::ids::ChannelId;

/// Entries kept at least, whatever the number of channels.
const MIN_CAPACITY: usize = 4096;

#[derive(Debug)]
pub(super) struct ChangeLog {
    /// The epoch being noted; starts at 1 so that a new channel's 0 differs.
    epoch: u64,
    entries: VecDeque<(u64, ChannelId)>,
    /// Entries of epochs up to this one were dropped: a reader asking
    /// since an earlier epoch gets a full snapshot.
    dropped_through: u64,
}

impl Default for ChangeLog {
    fn default() -> Self {
        ChangeLog { epoch: 1, entries: VecDeque::new(), dropped_through: 0 }
    }
}

impl ChangeLog {
    /// Notes that channel `id`, last noted in `*noted`, changed.
    pub(super) fn note(&mut self, id: ChannelId, noted: &mut u64, channels: usize) {
        if *noted == self.epoch {
            return;
        }
        *noted = self.epoch;
        self.entries.push_back((self.epoch, id));
        let capacity = Self::capacity(channels);
        while self.entries.len() > capacity {
            if let Some((epoch, _)) = self.entries.pop_front() {
                self.dropped_through = self.dropped_through.max(epoch);
            }
        }
    }

    /// Twice the channels open (a reader a tick behind the others still
    /// finds its epochs), and at least [`MIN_CAPACITY`].
    fn capacity(channels: usize) -> usize {
        channels.saturating_mul(2).max(MIN_CAPACITY)
    }

    /// Ends the current epoch. Returns it, to be passed as `since` next
    /// time, and the channels noted after `since` (each once: an entry
    /// counts only if it is `noted_in` the channel's latest epoch), or
    /// `None` when the log no longer holds every entry after `since` or
    /// `since` is 0 (a reader's first request): then the reader takes a
    /// full snapshot, and the log is not walked.
    pub(super) fn take_since(
        &mut self,
        since: u64,
        noted_in: impl Fn(ChannelId) -> Option<u64>,
    ) -> (u64, Option<Vec<ChannelId>>) {
        let ended = self.epoch;
        self.epoch += 1;
        // Entries of the epoch just ended are kept for readers that ask
        // later; the oldest reader's needs are bounded by the capacity.
        if since == 0 || since < self.dropped_through {
            return (ended, None);
        }
        let changed = self
            .entries
            .iter()
            .rev()
            .take_while(|(epoch, _)| *epoch > since)
            .filter(|&&(epoch, id)| noted_in(id) == Some(epoch))
            .map(|&(_, id)| id)
            .collect();
        (ended, Some(changed))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Channels and the epoch each was last noted in.
    #[derive(Default)]
    struct Map(HashMap<u64, u64>);

    impl Map {
        fn touch(&mut self, log: &mut ChangeLog, id: u64) {
            let channels = self.0.len().max(1);
            log.note(ChannelId(id), self.0.entry(id).or_default(), channels);
        }

        fn take(&self, log: &mut ChangeLog, since: u64) -> (u64, Option<Vec<u64>>) {
            let (epoch, ids) = log.take_since(since, |id| self.0.get(&id.0).copied());
            (epoch, ids.map(|ids| ids.into_iter().map(|id| id.0).collect()))
        }
    }

    #[test]
    fn a_reader_gets_each_changed_channel_once_and_nothing_else() {
        let (mut log, mut map) = (ChangeLog::default(), Map::default());
        for id in 1..=5 {
            map.touch(&mut log, id);
        }
        let (first, all) = map.take(&mut log, 0);
        assert_eq!(all, None, "a first request takes a full snapshot");
        // Channel 2 changes in two epochs, 4 in one; 1, 3 and 5 rest.
        map.touch(&mut log, 2);
        map.touch(&mut log, 2);
        map.touch(&mut log, 4);
        let (second, _) = map.take(&mut log, first);
        map.touch(&mut log, 2);
        // A reader a tick behind sees both epochs, channel 2 once.
        let (_, behind) = map.take(&mut log, first);
        assert_eq!(
            behind.map(|mut ids| {
                ids.sort();
                ids
            }),
            Some(vec![2, 4])
        );
        // One up to date sees only the newest epoch's.
        let (_, current) = map.take(&mut log, second);
        assert_eq!(current, Some(vec![2]));
    }

    #[test]
    fn a_reader_older_than_the_log_is_told_to_take_everything() {
        let (mut log, mut map) = (ChangeLog::default(), Map::default());
        let (start, _) = map.take(&mut log, 0);
        // More changes than the log keeps, over many epochs.
        for round in 0..(MIN_CAPACITY as u64 + 10) {
            map.touch(&mut log, round % 7);
            let _ = map.take(&mut log, start + round);
        }
        assert_eq!(map.take(&mut log, start).1, None);
        assert!(log.entries.len() <= MIN_CAPACITY);
    }
}
