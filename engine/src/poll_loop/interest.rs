//! Interest: re-asking `readable()`/`writable()` of the dirty channels only,
//! and keeping each channel's registration with the poller in step with the
//! answer. So a pass costs what changed, never what is merely open.

use std::time::{Duration, Instant};

use crate::epoll::{Event, PollMode};
use tracing::error;

use super::{
    Core,
    channel::{Phase, READ, Socket, WRITE},
    timers::TimerKind,
};
use crate::{command::ChannelKind, ids::Slot};

/// How long a closing channel waits for its peer's close after its output
/// was flushed.
const LINGER: Duration = Duration::from_secs(2);

impl Core {
    /// Re-asks interest of the dirty channels. Asking runs plugin code,
    /// which may touch other channels (a `send_to` from `handle_error`); those
    /// are refreshed too, for a few rounds. Returns true if some are still
    /// dirty, in which case the next wait must not block.
    pub(super) fn refresh_dirty(&mut self) -> bool {
        for _ in 0..8 {
            if !self.channels.has_dirty() {
                return false;
            }
            for slot in self.channels.take_dirty() {
                if let Some(ch) = self.channels.get_mut(slot) {
                    ch.dirty = false;
                    self.refresh(slot);
                }
            }
        }
        self.channels.has_dirty()
    }

    fn refresh(&mut self, slot: Slot) {
        let ch = &mut self.channels[slot];
        let want = match (ch.kind, ch.phase) {
            (ChannelKind::Listening, _) => {
                if ch.accept_paused {
                    0
                } else {
                    self.stats.interest_queries += 1;
                    let answer = self.call(slot, |d, ctx| d.interest(ctx));
                    // A panic closed the listener: nothing left to register.
                    if self.channels.get(slot).is_none() {
                        return;
                    }
                    if answer.is_some_and(|(readable, _)| readable) { READ } else { 0 }
                }
            }
            (_, Phase::Connecting) => WRITE,
            (_, Phase::Open) => {
                if !ch.out.is_empty() {
                    // What the callbacks of this pass queued leaves in one
                    // write; a failure settles (and may close) the channel.
                    self.flush(slot);
                    match self.channels.get(slot) {
                        Some(ch) if ch.phase == Phase::Open => {}
                        Some(_) => return self.refresh(slot),
                        None => return,
                    }
                }
                self.stats.interest_queries += 1;
                let answer = self.call(slot, |d, ctx| d.interest(ctx));
                // The call may have closed the channel (a panic, a close()
                // from readable()): then decide from its new phase.
                let Some(ch) = self.channels.get_mut(slot) else { return };
                if ch.phase != Phase::Open {
                    return self.refresh(slot);
                }
                if ch.shutdown_after_flush && ch.out.is_empty() {
                    let _ = ch.shut_write();
                }
                let (readable, writable) = answer.unwrap_or((false, false));
                if ch.shutdown.is_some() && !writable {
                    // Shutting down and nothing more to give: flush what was
                    // sent, then close.
                    self.begin_close(slot);
                    return self.refresh(slot);
                }
                // Shutting down: no new input, only output.
                let readable = readable && ch.shutdown.is_none();
                ch.wants_write = writable;
                let mut bits = 0;
                if readable && !ch.read_eof && ch.dispatcher.is_some() {
                    bits |= READ;
                }
                if writable || !ch.out.is_empty() {
                    bits |= WRITE;
                }
                bits
            }
            (_, Phase::Closing) => {
                if !ch.out.is_empty() {
                    if ch.read_eof { WRITE } else { WRITE | READ }
                } else if ch.read_eof || matches!(ch.socket, Socket::Pipe(_)) {
                    // Nothing to linger for; a drain may still wait for the
                    // send queue (it comes back dirty then).
                    self.end_close(slot);
                    return;
                } else {
                    // Flushed: shut down writing (the peer sees EOF after
                    // every byte), then linger for the peer's close.
                    if ch.shut_write().is_err() {
                        self.finalize(slot);
                        return;
                    }
                    ch.phase = Phase::Lingering;
                    let channel_id = ch.id;
                    self.arm_timer(Instant::now(), LINGER, channel_id, TimerKind::EndLinger);
                    READ
                }
            }
            // Waiting for the send queue only: polled no more (a peer that
            // closed would make it readable on every pass).
            (_, Phase::Lingering) => {
                if ch.awaiting_send_queue {
                    0
                } else {
                    READ
                }
            }
        };
        self.set_interest(slot, want);
    }

    fn set_interest(&mut self, slot: Slot, want: u8) {
        let ch = &mut self.channels[slot];
        if ch.registered == want {
            return;
        }
        self.stats.interest_changes += 1;
        let mut event = Event::new(slot.0, want & READ != 0, want & WRITE != 0);
        if want & READ != 0 && ch.kind != ChannelKind::Listening {
            event = event.with_priority();
        }
        let result = if want == 0 {
            // epoll cannot mask hang-ups: a socket that wants nothing is
            // removed, or a closed peer would wake every pass.
            self.poller.delete(ch.socket.as_fd())
        } else if ch.registered == 0 {
            // SAFETY: the socket is deleted from the poller in finalize (or
            // above, when its interest becomes empty) before it is dropped.
            unsafe { self.poller.add_with_mode(ch.socket.as_fd(), event, PollMode::Level) }
        } else {
            self.poller.modify_with_mode(ch.socket.as_fd(), event, PollMode::Level)
        };
        match result {
            Ok(()) => ch.registered = want,
            Err(e) => {
                error!(channel = ch.id.0, error = %e, "cannot register with the poller; closing");
                ch.failed = Some(e);
                self.settle(slot);
            }
        }
    }
}
