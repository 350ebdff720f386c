//! Calling a channel's dispatcher, and acting afterwards on what the
//! callback asked for (a close) or what the socket reported meanwhile (an
//! error, the peer's close). A panic poisons the dispatcher and closes its
//! channel; the loop goes on.

use tracing::{debug, error};

use super::{Core, channel::Phase};
use crate::{
    host_abi::{CallCtx, Dispatcher, Panicked},
    ids::Slot,
};

impl Core {
    /// Calls `f` with the channel's dispatcher and a call context, and deals
    /// with a panic. Returns `None` if there is no dispatcher or it
    /// panicked.
    pub(super) fn call<R>(
        &mut self,
        slot: Slot,
        f: impl FnOnce(Dispatcher, &mut CallCtx<'_>) -> Result<R, Panicked>,
    ) -> Option<R> {
        let result = self.call_unsettled(slot, f)?;
        self.settle(slot);
        Some(result)
    }

    /// [`call`](Core::call) without acting on what the callback asked for:
    /// for `handle_error`, after which the channel goes anyway.
    fn call_unsettled<R>(
        &mut self,
        slot: Slot,
        f: impl FnOnce(Dispatcher, &mut CallCtx<'_>) -> Result<R, Panicked>,
    ) -> Option<R> {
        let dispatcher = self.channels.get(slot)?.dispatcher?;
        // The context holds the core's borrow until the call returned: no
        // other reference into it is alive while the plugin runs (the
        // contract in host_abi).
        let mut ctx = CallCtx::new(self, slot);
        let result = f(dispatcher, &mut ctx);
        let report = ctx.take_report();
        match result {
            Ok(r) => Some(r),
            Err(Panicked) => {
                self.poisoned(slot, report);
                None
            }
        }
    }

    /// A callback panicked: count and log it, drop the dispatcher, close its
    /// channel gracefully.
    pub(super) fn poisoned(&mut self, slot: Slot, report: Option<String>) {
        let ch = &self.channels[slot];
        let (channel_id, generation) = (ch.id, ch.generation);
        let message = report.unwrap_or_else(|| "panicked".to_string());
        self.stats.panics += 1;
        let entry = &mut self.plugins[generation];
        entry.panics += 1;
        error!(
            plugin = %entry.loaded.name,
            generation = entry.generation,
            channel = channel_id.0,
            "{message}; closing the channel"
        );
        self.begin_close(slot);
    }

    pub(super) fn handle_event(&mut self, slot: Slot, event: u32, arg: i64) {
        self.stats.handler_calls += 1;
        self.call(slot, |d, ctx| d.handle_event(ctx, event, arg));
        self.channels.mark_dirty(slot);
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
            debug!(channel = ch.id.0, %error, "socket error");
            if ch.dispatcher.is_some() && matches!(ch.phase, Phase::Open | Phase::Connecting) {
                ch.close_pending = false;
                ch.close_event_pending = false;
                ch.phase = Phase::Open;
                self.stats.handler_calls += 1;
                // Any further close or error asked from inside handle_error
                // is moot: the channel goes now.
                self.call_unsettled(slot, |d, ctx| d.handle_event(ctx, asyncore_abi::event::ERROR, i64::from(errno)));
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
