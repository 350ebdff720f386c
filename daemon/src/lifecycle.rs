//! The daemon's lifecycle, published on a `watch` channel.
//!
//! `Running` is published only once the control API and the boot listeners
//! are bound and signal handlers are installed, so whoever waits for it can
//! connect at once. `Failed` is the end nobody asked for: the poll loop
//! died (a panic, a failed wait on the poller), so no channel can be served
//! any more; the health service then answers NOT_SERVING and `main.rs`
//! exits non-zero, so that a supervisor restarts the daemon.

use std::sync::{Arc, OnceLock};

use tokio::sync::watch;

/// Where the daemon is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Loading plugins and binding sockets.
    Starting,
    /// Serving.
    Running,
    /// SIGTERM or a drain request: listeners stopped, channels closing
    /// gracefully.
    Draining,
    /// The poll loop has exited, as asked.
    Stopped,
    /// The poll loop died on its own ([`Lifecycle::failure`] says why):
    /// nothing is served any more.
    Failed,
}

/// Sender and receivers of the lifecycle phase.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    tx: watch::Sender<Phase>,
    /// Why the loop died; set once, before `Failed` is published.
    failure: Arc<OnceLock<String>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle { tx: watch::Sender::new(Phase::Starting), failure: Arc::default() }
    }
}

/// The poll loop ended without being asked to: what
/// [`Daemon::wait`](crate::Daemon::wait) resolves with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the poll loop died: {reason}")]
pub struct PollLoopDied {
    /// The panic message, or the poller's error.
    pub reason: String,
}

impl Lifecycle {
    /// Publishes a new phase. `Failed` sticks: once the loop has died, the
    /// daemon does not claim to be anything else.
    pub fn set(&self, phase: Phase) {
        self.tx.send_if_modified(|current| {
            let changed = *current != Phase::Failed && *current != phase;
            if changed {
                *current = phase;
            }
            changed
        });
    }

    /// Records why the poll loop died and publishes [`Phase::Failed`].
    pub fn fail(&self, reason: String) {
        let _ = self.failure.set(reason);
        self.set(Phase::Failed);
    }

    /// Why the poll loop died, once it has.
    pub fn failure(&self) -> Option<PollLoopDied> {
        self.failure.get().map(|reason| PollLoopDied { reason: reason.clone() })
    }

    /// The current phase.
    pub fn get(&self) -> Phase {
        *self.tx.borrow()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }

    /// Resolves once the poll loop has ended: `Ok` when it stopped as asked,
    /// the reason when it died.
    ///
    /// # Errors
    ///
    /// [`PollLoopDied`] when the phase is `Failed`.
    pub async fn ended(&self) -> Result<(), PollLoopDied> {
        let mut phase = self.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = phase.wait_for(|p| matches!(p, Phase::Stopped | Phase::Failed)).await;
        match self.failure() {
            Some(died) => Err(died),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_sticks_and_carries_its_reason() {
        let lifecycle = Lifecycle::default();
        lifecycle.set(Phase::Running);
        lifecycle.fail("boom".to_string());
        lifecycle.set(Phase::Stopped);
        assert_eq!(lifecycle.get(), Phase::Failed);
        assert_eq!(lifecycle.failure(), Some(PollLoopDied { reason: "boom".to_string() }));
        let ended = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(lifecycle.ended());
        assert_eq!(ended.unwrap_err().to_string(), "the poll loop died: boom");
    }

    #[test]
    fn a_stop_as_asked_is_not_a_failure() {
        let lifecycle = Lifecycle::default();
        lifecycle.set(Phase::Stopped);
        let ended = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(lifecycle.ended());
        assert_eq!(ended, Ok(()));
    }
}
