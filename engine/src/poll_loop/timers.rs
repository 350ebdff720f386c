//! Timers: the loop's own (an accept back-off, a linger, idle checks, close
//! deadlines, the drain of old generations) and the plugins' `call_later`,
//! in one store ordered by deadline.
//!
//! A cancelled timer leaves the store at once: a plugin that re-arms a long
//! timeout on every message would otherwise grow it for the whole length of
//! the timeout. The timers of each channel are indexed, so that a channel
//! handed over to a new generation, or gone, takes its timers along at the
//! cost of its own timers only.
//!
//! Deadlines are computed with `Instant::checked_add`: one past what an
//! `Instant` can hold (a huge `idle_timeout`, say) is "never", and such a
//! timer is simply not armed.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    Core,
    channel::{Phase, ShutdownReason},
};
use crate::ids::{ChannelId, GenerationIndex, ListenerId, TimerId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimerKind {
    /// A paused listener resumes accepting.
    ResumeAccept,
    /// A lingering channel has waited long enough for its peer.
    EndLinger,
    /// A plugin's `call_later`.
    Call { token: u64 },
    /// Check a channel's idle timeout.
    IdleCheck,
    /// Close the channels of a plugin's generations other than `keep`.
    DrainGenerations { keep: GenerationIndex },
    /// A closing channel that has not flushed its output by now is closed
    /// anyway (its peer stopped reading).
    CloseDeadline,
    /// A `DrainListener` waited long enough: the listener's channels left
    /// are closed gracefully.
    ListenerDrainDeadline { listener: ListenerId },
}

/// A timer that came due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timer {
    /// The channel it is about; `None` for the loop's own business.
    pub(super) channel: Option<ChannelId>,
    pub(super) kind: TimerKind,
}

#[derive(Debug, Default)]
pub(super) struct Timers {
    /// Every pending timer in due order; the id keeps keys unique, and
    /// timers due at the same instant in the order they were armed.
    due: BTreeMap<(Instant, TimerId), Timer>,
    /// The deadline of every pending timer of a channel, by channel.
    by_channel: BTreeMap<(ChannelId, TimerId), Instant>,
    next_id: u64,
    /// Timers looked at by `cancel_calls_of`, for the test of its cost.
    #[cfg(test)]
    visited: usize,
}

impl Timers {
    /// Arms a timer due at `at`; `None` is never, and arms nothing. Returns
    /// its id either way.
    pub(super) fn arm(&mut self, at: Option<Instant>, channel: Option<ChannelId>, kind: TimerKind) -> TimerId {
        self.next_id += 1;
        let id = TimerId(self.next_id);
        if let Some(at) = at {
            self.due.insert((at, id), Timer { channel, kind });
            if let Some(channel) = channel {
                self.by_channel.insert((channel, id), at);
            }
        }
        id
    }

    /// When the next timer is due.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.due.first_key_value().map(|(&(at, _), _)| at)
    }

    /// Takes the earliest timer if it is due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let entry = self.due.first_entry().filter(|entry| entry.key().0 <= now)?;
        let id = entry.key().1;
        let timer = entry.remove();
        if let Some(channel) = timer.channel {
            self.by_channel.remove(&(channel, id));
        }
        Some(timer)
    }

    /// Cancels one of `channel`'s `call_later` timers. Returns false if it
    /// has no such pending timer (fired, cancelled, another channel's, or
    /// one of the loop's own).
    pub(super) fn cancel_call(&mut self, channel: ChannelId, id: TimerId) -> bool {
        let Some(&at) = self.by_channel.get(&(channel, id)) else { return false };
        if !matches!(self.due.get(&(at, id)), Some(Timer { kind: TimerKind::Call { .. }, .. })) {
            return false;
        }
        self.due.remove(&(at, id));
        self.by_channel.remove(&(channel, id));
        true
    }

    /// Cancels one of the loop's own timers that belongs to no channel,
    /// armed due at `at` (a listener's drain that ended before its
    /// deadline).
    pub(super) fn cancel(&mut self, at: Instant, id: TimerId) {
        if let Some(Timer { channel: Some(channel), .. }) = self.due.remove(&(at, id)) {
            self.by_channel.remove(&(channel, id));
        }
    }

    /// Cancels the `call_later` timers of a channel handed over to another
    /// generation (they carry the old generation's tokens); the loop's own
    /// timers stay. Costs the channel's own timers.
    pub(super) fn cancel_calls_of(&mut self, channel: ChannelId) {
        let ids: Vec<TimerId> = self.timers_of(channel).collect();
        #[cfg(test)]
        {
            self.visited += ids.len();
        }
        for id in ids {
            self.cancel_call(channel, id);
        }
    }

    /// Forgets every timer of a channel that left the map.
    pub(super) fn forget_channel(&mut self, channel: ChannelId) {
        let ids: Vec<TimerId> = self.timers_of(channel).collect();
        for id in ids {
            if let Some(at) = self.by_channel.remove(&(channel, id)) {
                self.due.remove(&(at, id));
            }
        }
    }

    fn timers_of(&self, channel: ChannelId) -> impl Iterator<Item = TimerId> + '_ {
        self.by_channel.range((channel, TimerId(0))..=(channel, TimerId(u64::MAX))).map(|(&(_, id), _)| id)
    }

    /// Pending timers.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.due.len()
    }
}

impl Core {
    /// Arms one of the loop's timers for a channel, `after` from `from`.
    pub(super) fn arm_timer(&mut self, from: Instant, after: Duration, channel: ChannelId, kind: TimerKind) {
        self.timers.arm(from.checked_add(after), Some(channel), kind);
    }

    pub(super) fn fire_timers(&mut self, now: Instant) {
        while let Some(timer) = self.timers.pop_due(now) {
            let channel_id = match (timer.kind, timer.channel) {
                (TimerKind::DrainGenerations { keep }, _) => {
                    self.drain_generations(keep);
                    continue;
                }
                (TimerKind::ListenerDrainDeadline { listener }, _) => {
                    self.listener_drain_deadline(listener);
                    continue;
                }
                (_, Some(channel_id)) => channel_id,
                (_, None) => continue,
            };
            let Some(slot) = self.channels.slot_of(channel_id) else { continue };
            match timer.kind {
                TimerKind::ResumeAccept => {
                    // A listener suspended meanwhile stays paused until it
                    // is resumed.
                    let listener_id = self.channels[slot].listener;
                    if !self.listeners.get(&listener_id).is_some_and(|l| l.suspended) {
                        self.channels[slot].accept_paused = false;
                        self.channels.mark_dirty(slot);
                    }
                }
                TimerKind::EndLinger => {
                    if self.channels[slot].phase == Phase::Lingering {
                        self.end_close(slot);
                    }
                }
                TimerKind::Call { token } => {
                    if self.is_open(slot) {
                        self.handle_event(slot, asyncore_abi::event::TIMER, token as i64);
                    }
                }
                TimerKind::CloseDeadline => {
                    let ch = &self.channels[slot];
                    if ch.phase == Phase::Closing || ch.shutdown.is_some() {
                        warn!(channel = channel_id.0, "close timeout: output not delivered in time; closing now");
                        self.finalize(slot);
                    }
                }
                // Handled above: they belong to no channel.
                TimerKind::DrainGenerations { .. } | TimerKind::ListenerDrainDeadline { .. } => {}
                TimerKind::IdleCheck => {
                    let ch = &self.channels[slot];
                    let Some(timeout) = ch.idle_timeout else { continue };
                    if !matches!(ch.phase, Phase::Open | Phase::Connecting) {
                        continue;
                    }
                    // A timeout past what an Instant can hold never comes.
                    let Some(due) = ch.last_activity.checked_add(timeout) else { continue };
                    if due <= now {
                        info!(channel = channel_id.0, timeout_ms = timeout.as_millis() as u64, "idle timeout; closing");
                        self.shut_down(slot, ShutdownReason::IdleTimeout);
                    } else {
                        self.timers.arm(Some(due), Some(channel_id), TimerKind::IdleCheck);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Timer, TimerKind, Timers};
    use crate::ids::{ChannelId, GenerationIndex, TimerId};

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn timers_come_due_in_deadline_order_then_arming_order() {
        let mut timers = Timers::default();
        let start = Instant::now();
        let channel = Some(ChannelId(1));
        timers.arm(Some(start + Duration::from_millis(20)), channel, TimerKind::Call { token: 3 });
        timers.arm(Some(start + Duration::from_millis(10)), channel, TimerKind::Call { token: 1 });
        timers.arm(Some(start + Duration::from_millis(10)), channel, TimerKind::Call { token: 2 });
        timers.arm(None, channel, TimerKind::Call { token: 4 });
        assert_eq!(timers.len(), 3, "a deadline of never arms nothing");
        assert_eq!(timers.next_deadline(), Some(start + Duration::from_millis(10)));

        assert_eq!(timers.pop_due(start), None, "nothing is due yet");
        let due: Vec<_> = std::iter::from_fn(|| timers.pop_due(start + Duration::from_millis(15))).collect();
        let call = |token| Timer { channel, kind: TimerKind::Call { token } };
        assert_eq!(due, [call(1), call(2)]);
        assert_eq!(timers.pop_due(start + HOUR), Some(call(3)));
        assert_eq!(timers.len(), 0);
        assert!(timers.by_channel.is_empty());
    }

    #[test]
    fn cancel_and_rearm_on_every_message_keeps_the_store_small() {
        let mut timers = Timers::default();
        let channel = ChannelId(7);
        let now = Instant::now();
        let mut armed = timers.arm(now.checked_add(HOUR), Some(channel), TimerKind::Call { token: 0 });
        for token in 1..10_000 {
            assert!(timers.cancel_call(channel, armed));
            armed = timers.arm(now.checked_add(HOUR), Some(channel), TimerKind::Call { token });
            assert!(timers.len() <= 1, "{} timers pending after {token} re-arms", timers.len());
        }
        assert_eq!(timers.by_channel.len(), 1);
    }

    #[test]
    fn only_a_channels_own_call_timers_can_be_cancelled() {
        let mut timers = Timers::default();
        let (mine, other) = (ChannelId(1), ChannelId(2));
        let at = Instant::now().checked_add(HOUR);
        let call = timers.arm(at, Some(mine), TimerKind::Call { token: 1 });
        let idle = timers.arm(at, Some(mine), TimerKind::IdleCheck);
        assert!(!timers.cancel_call(other, call), "another channel's timer");
        assert!(!timers.cancel_call(mine, idle), "the loop's own timer");
        assert!(!timers.cancel_call(mine, TimerId(999)), "no such timer");
        assert!(timers.cancel_call(mine, call));
        assert!(!timers.cancel_call(mine, call), "already cancelled");
        assert_eq!(timers.len(), 1);
    }

    #[test]
    fn a_handed_over_channel_loses_its_calls_and_keeps_the_loops_timers() {
        let mut timers = Timers::default();
        let (moved, stays) = (ChannelId(1), ChannelId(2));
        let at = Instant::now().checked_add(HOUR);
        timers.arm(at, Some(moved), TimerKind::Call { token: 1 });
        timers.arm(at, Some(moved), TimerKind::IdleCheck);
        timers.arm(at, Some(stays), TimerKind::Call { token: 2 });
        timers.arm(at, None, TimerKind::DrainGenerations { keep: GenerationIndex(0) });
        timers.cancel_calls_of(moved);
        let left: Vec<Timer> = std::iter::from_fn(|| timers.pop_due(Instant::now() + 2 * HOUR)).collect();
        assert_eq!(
            left,
            [
                Timer { channel: Some(moved), kind: TimerKind::IdleCheck },
                Timer { channel: Some(stays), kind: TimerKind::Call { token: 2 } },
                Timer { channel: None, kind: TimerKind::DrainGenerations { keep: GenerationIndex(0) } },
            ]
        );
    }

    #[test]
    fn a_loop_timer_can_be_cancelled_by_its_deadline_and_id() {
        let mut timers = Timers::default();
        let at = Instant::now() + HOUR;
        let kind = TimerKind::ListenerDrainDeadline { listener: crate::ids::ListenerId(3) };
        let drain = timers.arm(Some(at), None, kind);
        timers.arm(Some(at), None, TimerKind::DrainGenerations { keep: GenerationIndex(0) });
        timers.cancel(at, drain);
        timers.cancel(at, drain);
        assert_eq!(timers.len(), 1);
        assert_eq!(
            timers.pop_due(at),
            Some(Timer { channel: None, kind: TimerKind::DrainGenerations { keep: GenerationIndex(0) } })
        );
    }

    #[test]
    fn a_channel_that_leaves_takes_all_its_timers() {
        let mut timers = Timers::default();
        let (gone, stays) = (ChannelId(1), ChannelId(2));
        let at = Instant::now().checked_add(HOUR);
        timers.arm(at, Some(gone), TimerKind::Call { token: 1 });
        timers.arm(at, Some(gone), TimerKind::IdleCheck);
        timers.arm(at, Some(gone), TimerKind::CloseDeadline);
        timers.arm(at, Some(stays), TimerKind::IdleCheck);
        timers.forget_channel(gone);
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.by_channel.len(), 1);
    }

    /// Handing over every channel of a generation used to cost a pass over
    /// every live timer per channel (quadratic in the channels); now each
    /// looks at its own timers only. Counted, not timed.
    #[test]
    fn handing_over_many_channels_costs_their_own_timers() {
        let mut timers = Timers::default();
        let at = Instant::now().checked_add(HOUR);
        let n_channels = 5_000;
        for channel in 1..=n_channels {
            timers.arm(at, Some(ChannelId(channel)), TimerKind::Call { token: channel });
            timers.arm(at, Some(ChannelId(channel)), TimerKind::IdleCheck);
        }
        for channel in 1..=n_channels {
            timers.cancel_calls_of(ChannelId(channel));
        }
        assert_eq!(timers.visited, 2 * n_channels as usize, "each channel's own two timers, no more");
        assert_eq!(timers.len(), n_channels as usize, "the idle checks stay");
    }
}
