//! The daemon's lifecycle, published on a `watch` channel.
//!
//! `Running` is published only once the control API and the boot listeners
//! are bound and signal handlers are installed, so whoever waits for it can
//! connect at once.

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
    /// The poll loop has exited.
    Stopped,
}

/// Sender and receivers of the lifecycle phase.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    tx: watch::Sender<Phase>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle { tx: watch::Sender::new(Phase::Starting) }
    }
}

impl Lifecycle {
    /// Publishes a new phase.
    pub fn set(&self, phase: Phase) {
        self.tx.send_replace(phase);
    }

    /// The current phase.
    pub fn get(&self) -> Phase {
        *self.tx.borrow()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }
}
