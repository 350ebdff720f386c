//! The channel map (asyncore's `socket_map`): the table of channels by
//! slot, their ids in order, the dirty list, and the end of a channel's
//! life: a graceful close, then its removal.

use std::{
    collections::BTreeMap,
    ops::{Index, IndexMut},
    time::Instant,
};

use tracing::{debug, warn};

use super::{
    Core,
    channel::{Channel, NewChannel, Phase, ShutdownReason, Socket},
    stats_changes::ChangeLog,
    timers::TimerKind,
};
use crate::{
    command::ChannelKind,
    ids::{ChannelId, GenerationIndex, ListenerId, Slot},
};

#[derive(Debug, Default)]
pub(super) struct ChannelMap {
    slots: Vec<Option<Channel>>,
    free: Vec<Slot>,
    /// Channel id to slot, in id order (for paginated listing).
    ids: BTreeMap<ChannelId, Slot>,
    /// Channels whose interest is re-asked before the next wait.
    dirty: Vec<Slot>,
    /// The last id given out.
    last_id: u64,
    /// Channels that changed, by stats epoch (`WatchStats` ticks).
    pub(super) changes: ChangeLog,
}

impl ChannelMap {
    /// Adds a channel under a new id, dirty (its interest is asked before
    /// the next wait).
    pub(super) fn insert(&mut self, new: NewChannel) -> Slot {
        self.last_id += 1;
        let id = ChannelId(self.last_id);
        let mut channel = Channel::new(id, new);
        channel.dirty = true;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot.0] = Some(channel);
                slot
            }
            None => {
                self.slots.push(Some(channel));
                Slot(self.slots.len() - 1)
            }
        };
        self.ids.insert(id, slot);
        self.dirty.push(slot);
        if let Some(ch) = self.slots[slot.0].as_mut() {
            self.changes.note(id, &mut ch.stats_noted, self.ids.len());
        }
        slot
    }

    /// Takes a channel out of the map; its slot may be reused.
    pub(super) fn remove(&mut self, slot: Slot) -> Option<Channel> {
        let channel = self.slots.get_mut(slot.0)?.take()?;
        self.ids.remove(&channel.id);
        self.free.push(slot);
        Some(channel)
    }

    pub(super) fn get(&self, slot: Slot) -> Option<&Channel> {
        self.slots.get(slot.0)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, slot: Slot) -> Option<&mut Channel> {
        self.slots.get_mut(slot.0)?.as_mut()
    }

    pub(super) fn slot_of(&self, id: ChannelId) -> Option<Slot> {
        self.ids.get(&id).copied()
    }

    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The slots of every channel, in id order.
    pub(super) fn slots(&self) -> Vec<Slot> {
        self.ids.values().copied().collect()
    }

    /// The slots of the channels matching `filter`, in id order.
    pub(super) fn slots_where(&self, filter: impl Fn(&Channel) -> bool) -> Vec<Slot> {
        self.ids.values().copied().filter(|&slot| self.get(slot).is_some_and(&filter)).collect()
    }

    /// Every channel in id order, from the first with id greater than
    /// `after`.
    pub(super) fn iter_after(&self, after: u64) -> impl Iterator<Item = &Channel> {
        self.ids.range(ChannelId(after.saturating_add(1))..).filter_map(|(_, &slot)| self.get(slot))
    }

    /// Every channel, in id order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Channel> {
        self.iter_after(0)
    }

    /// Ends the current stats epoch: returns it, and the live channels
    /// that changed after epoch `since` (`None`: a first request, since 0,
    /// or no longer known).
    pub(super) fn changed_since(&mut self, since: u64) -> (u64, Option<Vec<ChannelId>>) {
        let ChannelMap { slots, ids, changes, .. } = self;
        let noted_in = |id| {
            let slot = ids.get(&id)?;
            slots[slot.0].as_ref().map(|ch| ch.stats_noted)
        };
        changes.take_since(since, noted_in)
    }

    /// Notes for the stats feeds that the channel's figures changed.
    pub(super) fn note_change(&mut self, slot: Slot) {
        let Some(ch) = self.slots.get_mut(slot.0).and_then(Option::as_mut) else { return };
        self.changes.note(ch.id, &mut ch.stats_noted, self.ids.len());
    }

    /// Re-ask the channel's interest before the next wait.
    pub(super) fn mark_dirty(&mut self, slot: Slot) {
        // Whatever made a channel dirty may have changed its figures.
        self.note_change(slot);
        let Some(ch) = self.slots.get_mut(slot.0).and_then(Option::as_mut) else { return };
        if !ch.dirty {
            ch.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// The dirty list, emptied.
    pub(super) fn take_dirty(&mut self) -> Vec<Slot> {
        std::mem::take(&mut self.dirty)
    }

    pub(super) fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }
}

impl Index<Slot> for ChannelMap {
    type Output = Channel;

    fn index(&self, slot: Slot) -> &Channel {
        self.get(slot).expect("slot of a live channel")
    }
}

impl IndexMut<Slot> for ChannelMap {
    fn index_mut(&mut self, slot: Slot) -> &mut Channel {
        self.get_mut(slot).expect("slot of a live channel")
    }
}

impl Core {
    /// Adds a channel to the map and to the count of its generation and
    /// listener (a listening channel is not counted).
    pub(super) fn insert(&mut self, new: NewChannel) -> Slot {
        let (kind, generation, listener) = (new.kind, new.generation, new.listener);
        let slot = self.channels.insert(new);
        if kind != ChannelKind::Listening {
            self.count_dispatcher(generation, listener, 1);
        }
        if kind == ChannelKind::Accepted {
            self.count_connection(listener, 1);
        }
        slot
    }

    /// Adds or removes an accepted connection to the counts that
    /// `max_connections` limits: its listener's and the loop's.
    fn count_connection(&mut self, listener_id: ListenerId, delta: i64) {
        self.connections = self.connections.saturating_add_signed(delta);
        if let Some(listener) = self.listeners.get_mut(&listener_id) {
            listener.connections = listener.connections.saturating_add_signed(delta);
        }
    }

    /// Adds or removes a channel served by a plugin (accepted or outbound)
    /// to the counts of its generation and listener.
    fn count_dispatcher(&mut self, generation: GenerationIndex, listener_id: ListenerId, delta: i64) {
        let entry = &mut self.plugins[generation];
        entry.live_channels = entry.live_channels.saturating_add_signed(delta);
        let last_gone = entry.live_channels == 0 && delta < 0;
        if let Some(listener) = self.listeners.get_mut(&listener_id) {
            listener.channel_count = listener.channel_count.saturating_add_signed(delta);
            if listener.channel_count == 0 && listener.draining.is_some() {
                self.finish_listener_drain(listener_id);
            }
        }
        if last_gone {
            self.unload_if_unused(generation);
        }
    }

    /// The host closes the channel for a reason of its own, gracefully
    /// (the one close contract): the dispatcher is told
    /// (`handle_shutdown`), the channel is not read any more, and the
    /// dispatcher is asked for output (`writable()`/`handle_write`) until it
    /// has none left or closes; then its queue is flushed, writing is shut
    /// down and the channel lingers ([`begin_close`](Core::begin_close)).
    /// All of it within the close timeout, after which what was not
    /// delivered is logged with its byte count.
    pub(super) fn shut_down(&mut self, slot: Slot, reason: ShutdownReason) {
        let Some(ch) = self.channels.get_mut(slot) else { return };
        if ch.kind == ChannelKind::Listening || ch.phase != Phase::Open || ch.dispatcher.is_none() {
            // Nothing to tell: a listener, a connect still under way, or a
            // channel already closing.
            return self.begin_close(slot);
        }
        if ch.shutdown.is_some() {
            return;
        }
        ch.shutdown = Some(reason);
        let channel_id = ch.id;
        debug!(channel = channel_id.0, reason = reason.as_str(), "closing gracefully");
        // A drain has its own deadline, which closes what is left at once.
        if reason != ShutdownReason::Drain {
            self.arm_timer(Instant::now(), self.close_timeout, channel_id, TimerKind::CloseDeadline);
        }
        self.handle_event(slot, asyncore_abi::event::SHUTDOWN, reason.code());
    }

    /// Graceful close: no more callbacks, flush the queue, then close.
    pub(super) fn begin_close(&mut self, slot: Slot) {
        let ch = &mut self.channels[slot];
        match ch.phase {
            Phase::Closing | Phase::Lingering => return,
            Phase::Connecting | Phase::Open => {}
        }
        if ch.kind == ChannelKind::Listening {
            let listener_id = ch.listener;
            if let Some(listener) = self.listeners.get_mut(&listener_id) {
                listener.channel = None;
            }
            self.finalize(slot);
            return;
        }
        ch.phase = Phase::Closing;
        let channel_id = ch.id;
        let deadline_armed = ch.shutdown.is_some();
        if let Some(dispatcher) = ch.dispatcher.take() {
            dispatcher.release();
        }
        if !deadline_armed {
            self.arm_timer(Instant::now(), self.close_timeout, channel_id, TimerKind::CloseDeadline);
        }
        self.channels.mark_dirty(slot);
    }

    /// The end of a graceful close: the output was handed to the kernel,
    /// and the peer closed or the linger passed. Outside a drain the
    /// channel goes now. During a drain a stream stays open (writing shut
    /// down) until the kernel's send queue is empty, that is until the peer
    /// acknowledged every byte (`SIOCOUTQ`): the process exits right after
    /// the drain, and in a container the network namespace that would
    /// still deliver an orphaned socket's bytes goes with it. It is no
    /// longer polled; the drain re-checks such channels on a timer
    /// ([`check_send_queues`](Core::check_send_queues)) and closes what is
    /// left at its deadline.
    pub(super) fn end_close(&mut self, slot: Slot) {
        let draining = self.drain.is_some();
        let Some(ch) = self.channels.get_mut(slot) else { return };
        if ch.awaiting_send_queue {
            return;
        }
        if !draining || !matches!(ch.socket, Socket::Stream(_)) || ch.shut_write().is_err() {
            return self.finalize(slot);
        }
        match ch.socket.unsent_bytes() {
            Ok(0) | Err(_) => self.finalize(slot),
            Ok(_) => {
                ch.phase = Phase::Lingering;
                ch.awaiting_send_queue = true;
                let channel_id = ch.id;
                // The next refresh takes it out of the poller.
                self.channels.mark_dirty(slot);
                self.await_send_queue(channel_id);
            }
        }
    }

    /// Removes the channel now: deregisters, frees the dispatcher, closes
    /// the socket, forgets its timers, records the final figures.
    pub(super) fn finalize(&mut self, slot: Slot) {
        // The slot is reused only after this pass's events were all
        // dispatched: refresh_dirty, which frees most slots, runs before the
        // wait, and events naming a freed slot find it empty.
        let Some(mut ch) = self.channels.remove(slot) else { return };
        if ch.registered != 0 {
            let _ = self.poller.delete(ch.socket.as_fd());
        }
        // The dispatcher of a channel still finishing its output had more.
        let held = ch.shutdown.is_some() && ch.dispatcher.is_some();
        if let Some(dispatcher) = ch.dispatcher.take() {
            dispatcher.release();
        }
        self.timers.forget_channel(ch.id);
        if ch.kind != ChannelKind::Listening {
            // A close that drops output says how much: what the host still
            // queued, and whether the dispatcher still had more to give.
            if !ch.out.is_empty() || held {
                warn!(
                    channel = ch.id.0,
                    bytes_dropped = ch.out.len(),
                    dispatcher_had_more = held,
                    "closed before its output was delivered: {} queued bytes dropped{}",
                    ch.out.len(),
                    if held { ", and the dispatcher still had output to give" } else { "" },
                );
                self.stats.bytes_dropped += ch.out.len() as u64;
            }
            if ch.kind == ChannelKind::Accepted {
                self.count_connection(ch.listener, -1);
            }
            self.count_dispatcher(ch.generation, ch.listener, -1);
            self.closed.push(ch.stats(true));
        } else if let Some(listener) = self.listeners.get_mut(&ch.listener)
            && listener.channel == Some(ch.id)
        {
            listener.channel = None;
        }
        debug!(channel = ch.id.0, bytes_in = ch.counters.bytes_in, bytes_out = ch.counters.bytes_out, "channel closed");
    }
}
