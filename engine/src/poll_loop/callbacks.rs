//! Calling a channel's dispatcher, and acting afterwards on what the
//! callback asked for (a close) or what the socket reported meanwhile (an
//! error, the peer's close). A panic poisons the dispatcher and closes its
//! channel; the loop goes on. Every call is timed: one that runs past the
//! slow-callback threshold held up every other channel, and is counted and
//! logged.

use std::time::{Duration, Instant};

use tracing::{debug, error, warn};

use super::{Core, channel::Phase, log_limit::Noisy};
use crate::{
    command::ChannelKind,
    config::plugin_config,
    host_abi::{CallCtx, Dispatcher, Panicked},
    ids::{ChannelId, GenerationIndex, Slot},
};

/// Panics of a listening dispatcher a listener survives within
/// [`LISTENER_PANIC_WINDOW`]; one more stops it.
const LISTENER_PANIC_BUDGET: usize = 5;
const LISTENER_PANIC_WINDOW: Duration = Duration::from_secs(60);

impl Core {
    /// Calls `f` with the channel's dispatcher and a call context, and deals
    /// with a panic. Returns `None` if there is no dispatcher or it
    /// panicked.
    pub(super) fn call<R>(
        &mut self,
        slot: Slot,
        f: impl FnOnce(Dispatcher, &mut CallCtx<'_>) -> Result<R, Panicked>,
    ) -> Option<R> {
        self.call_named(slot, None, f)
    }

    /// [`call`](Core::call) of a callback the slow-callback line can name
    /// (`handle_read`, ...).
    fn call_named<R>(
        &mut self,
        slot: Slot,
        callback: Option<&'static str>,
        f: impl FnOnce(Dispatcher, &mut CallCtx<'_>) -> Result<R, Panicked>,
    ) -> Option<R> {
        let result = self.call_unsettled(slot, callback, f)?;
        self.settle(slot);
        Some(result)
    }

    /// [`call`](Core::call) without acting on what the callback asked for:
    /// for `handle_error`, after which the channel goes anyway.
    fn call_unsettled<R>(
        &mut self,
        slot: Slot,
        callback: Option<&'static str>,
        f: impl FnOnce(Dispatcher, &mut CallCtx<'_>) -> Result<R, Panicked>,
    ) -> Option<R> {
        let ch = self.channels.get(slot)?;
        let (dispatcher, channel_id, generation) = (ch.dispatcher?, ch.id, ch.generation);
        let started = Instant::now();
        // The context holds the core's borrow until the call returned: no
        // other reference into it is alive while the plugin runs (the
        // contract in host_abi).
        let mut ctx = CallCtx::new(self, slot);
        let result = f(dispatcher, &mut ctx);
        let report = ctx.take_report();
        self.timed(started, callback, channel_id, generation);
        match result {
            Ok(r) => Some(r),
            Err(Panicked) => {
                self.poisoned(slot, report);
                None
            }
        }
    }

    /// A callback panicked: count and log it, drop the dispatcher, close its
    /// channel gracefully. A listening dispatcher is replaced instead: the
    /// listener asks its generation's `listen` for a fresh one and keeps
    /// accepting, unless it panicked too often lately.
    pub(super) fn poisoned(&mut self, slot: Slot, report: Option<String>) {
        let ch = &self.channels[slot];
        let (channel_id, generation, kind) = (ch.id, ch.generation, ch.kind);
        let message = report.unwrap_or_else(|| "panicked".to_string());
        self.stats.panics += 1;
        let entry = &mut self.plugins[generation];
        entry.panics += 1;
        if kind == ChannelKind::Listening {
            error!(plugin = %entry.loaded.name, generation = entry.generation, channel = channel_id.0, "{message}");
            return self.renew_listening(slot);
        }
        error!(
            plugin = %entry.loaded.name,
            generation = entry.generation,
            channel = channel_id.0,
            "{message}; closing the channel"
        );
        self.begin_close(slot);
    }

    /// A listening dispatcher panicked: one bad connection's handshake must
    /// not take the service off the air. The poisoned dispatcher is dropped
    /// and the same generation's `listen` (with the listener's config) makes
    /// a fresh one; whatever state the old one held is lost, since its
    /// memory is no longer trusted. Past [`LISTENER_PANIC_BUDGET`] panics in
    /// [`LISTENER_PANIC_WINDOW`], the listener stops.
    fn renew_listening(&mut self, slot: Slot) {
        let ch = &mut self.channels[slot];
        let (listener_id, generation) = (ch.listener, ch.generation);
        if let Some(old) = ch.dispatcher.take() {
            old.release();
        }
        let now = Instant::now();
        let Some(listener) = self.listeners.get_mut(&listener_id) else { return self.begin_close(slot) };
        listener.recent_panics.retain(|&at| now.saturating_duration_since(at) < LISTENER_PANIC_WINDOW);
        listener.recent_panics.push_back(now);
        if listener.recent_panics.len() > LISTENER_PANIC_BUDGET {
            error!(
                listener = listener_id.0,
                panics = listener.recent_panics.len(),
                "listener stopped: its listening dispatcher panicked {} times within {} s",
                listener.recent_panics.len(),
                LISTENER_PANIC_WINDOW.as_secs()
            );
            listener.stopped_by_panics = true;
            return self.begin_close(slot);
        }
        let config = plugin_config(&listener.config);
        let entries = self.plugins[generation].loaded.entries;
        let started = Instant::now();
        let fresh = entries.listen(&mut CallCtx::detached(), &config);
        self.timed(started, Some("listen"), self.channels[slot].id, generation);
        match fresh {
            Ok(fresh) => {
                warn!(listener = listener_id.0, "listening dispatcher replaced after a panic; still accepting");
                self.channels[slot].dispatcher = Some(fresh);
                self.channels.mark_dirty(slot);
            }
            Err(message) => {
                error!(
                    listener = listener_id.0,
                    "listener stopped: no fresh listening dispatcher after a panic: {message}"
                );
                self.begin_close(slot);
            }
        }
    }

    pub(super) fn handle_event(&mut self, slot: Slot, event: u32, arg: i64) {
        self.stats.handler_calls += 1;
        self.call_named(slot, Some(handler_name(event)), |d, ctx| d.handle_event(ctx, event, arg));
        self.channels.mark_dirty(slot);
    }

    /// Accounts for a plugin call that began at `started` and just
    /// returned: keeps the longest, and counts and logs (at most one line a
    /// second, see [`log_limit`](super::log_limit)) one that ran past the
    /// slow-callback threshold. One clock read; the caller took the other.
    pub(super) fn timed(
        &mut self,
        started: Instant,
        callback: Option<&'static str>,
        channel_id: ChannelId,
        generation: GenerationIndex,
    ) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(started);
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.stats.slowest_callback_us = self.stats.slowest_callback_us.max(elapsed_us);
        if elapsed <= self.slow_callback {
            return;
        }
        self.stats.slow_callbacks += 1;
        if !self.log_limits.admit(Noisy::SlowCallback, now) {
            return;
        }
        let entry = &self.plugins[generation];
        let threshold_ms = u64::try_from(self.slow_callback.as_millis()).unwrap_or(u64::MAX);
        warn!(
            plugin = %entry.loaded.name,
            generation = entry.generation,
            channel = channel_id.0,
            callback = callback.unwrap_or("dispatcher"),
            elapsed_us,
            threshold_ms,
            "slow callback: the plugin held the poll loop for {elapsed:.1?}, and every other channel waited"
        );
    }

    /// After a callback (or a flush): act on what the plugin asked for or
    /// what the socket reported meanwhile. A socket error is reported with
    /// `handle_error` and closes the channel at once; a close asked by the
    /// plugin starts a graceful close; a peer close seen by `recv` gets its
    /// `handle_close`, once.
    pub(super) fn settle(&mut self, slot: Slot) {
        let Some(ch) = self.channels.get_mut(slot) else { return };
        if let Some(error) = ch.failed.take() {
            let errno = error.raw_os_error().unwrap_or(libc::EIO);
            if !is_peer_reset(&error) {
                debug!(channel = ch.id.0, %error, "socket error");
            } else if self.log_limits.admit(Noisy::PeerReset, self.now) {
                debug!(channel = ch.id.0, %error, "peer reset the connection");
            }
            if ch.dispatcher.is_some() && matches!(ch.phase, Phase::Open | Phase::Connecting) {
                ch.close_pending = false;
                ch.close_event_pending = false;
                ch.phase = Phase::Open;
                self.stats.handler_calls += 1;
                // Any further close or error asked from inside handle_error
                // is moot: the channel goes now.
                self.call_unsettled(slot, Some("handle_error"), |d, ctx| {
                    d.handle_event(ctx, asyncore_abi::event::ERROR, i64::from(errno))
                });
            }
            self.finalize(slot);
            return;
        }
        if std::mem::take(&mut ch.close_pending) {
            ch.close_event_pending = false;
            self.begin_close(slot);
            return;
        }
        if std::mem::take(&mut ch.close_event_pending) && ch.phase == Phase::Open && ch.dispatcher.is_some() {
            self.handle_event(slot, asyncore_abi::event::CLOSE, 0);
        }
    }

    /// Whether the channel is open and has a dispatcher to call.
    pub(super) fn is_open(&self, slot: Slot) -> bool {
        self.channels.get(slot).is_some_and(|ch| ch.phase == Phase::Open && ch.dispatcher.is_some())
    }
}

/// The dispatcher method an event code calls, for the slow-callback line.
fn handler_name(event: u32) -> &'static str {
    use asyncore_abi::event;
    match event {
        event::READ => "handle_read",
        event::WRITE => "handle_write",
        event::CONNECT => "handle_connect",
        event::CLOSE => "handle_close",
        event::EXPT => "handle_expt",
        event::ERROR => "handle_error",
        event::TIMER => "handle_timer",
        event::SHUTDOWN => "handle_shutdown",
        _ => "handle_event",
    }
}

/// A socket error that says the peer reset the connection (or that a
/// write met its reset): common, and repeated by every channel of a client
/// that crashes, so its line is rate-limited.
fn is_peer_reset(error: &std::io::Error) -> bool {
    matches!(error.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
}
