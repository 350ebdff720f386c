//! Rate limits for the loop's log lines that can repeat at traffic rate: a
//! peer that resets, a plugin callback that keeps blocking the loop. Each
//! kind logs at most one line per second; the lines suppressed meanwhile
//! are reported as one line, "N similar lines suppressed", once that second
//! is over. A flood of identical lines says nothing more than the first,
//! costs the loop the time to format them, and pushes everything else out
//! of the log (or out of the lossy log queue, see `daemon/src/main.rs`).
//!
//! Running out of descriptors has a summary of its own ([`AcceptPauses`]):
//! one line when accepting first pauses, one every [`PAUSE_REPORT`] while
//! it lasts, and one when it is over, each with the count of pauses.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

/// How long a kind stays quiet after one of its lines was logged.
const WINDOW: Duration = Duration::from_secs(1);

/// A kind of line that is rate-limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Noisy {
    /// A peer reset its connection (`ECONNRESET`, `EPIPE`): what a client
    /// that crashes or a scanner does, to every channel it has. A debug line.
    PeerReset,
    /// A plugin callback ran past the slow-callback threshold: a plugin
    /// that blocks does so on every call. A warning.
    SlowCallback,
}

impl Noisy {
    const ALL: [Noisy; 2] = [Noisy::PeerReset, Noisy::SlowCallback];

    /// What the suppressed lines were, for the line that counts them.
    fn describe(self) -> &'static str {
        match self {
            Noisy::PeerReset => "peer reset the connection",
            Noisy::SlowCallback => "slow callback",
        }
    }
}

/// One kind's state: until when it is quiet, and how many of its lines
/// were suppressed in that time.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    quiet_until: Option<Instant>,
    suppressed: u64,
}

/// The limits of every [`Noisy`] kind. Owned by the loop; costs a clock
/// comparison per line, and three per pass.
#[derive(Debug, Default)]
pub(super) struct LogLimits {
    windows: [Window; Noisy::ALL.len()],
}

impl LogLimits {
    /// Whether a line of `kind` may be logged at `now`; if not, it is
    /// counted. Lines suppressed in an earlier window that were not yet
    /// reported are reported first, so the counts come before the line.
    pub(super) fn admit(&mut self, kind: Noisy, now: Instant) -> bool {
        let window = &mut self.windows[kind as usize];
        if window.quiet_until.is_some_and(|until| now < until) {
            window.suppressed += 1;
            return false;
        }
        let suppressed = std::mem::take(&mut window.suppressed);
        // An instant past what the clock holds never comes: no window then.
        window.quiet_until = now.checked_add(WINDOW);
        if suppressed > 0 {
            log_suppressed(kind, suppressed);
        }
        true
    }

    /// Logs the count of each kind whose quiet window is over by `now` and
    /// suppressed lines. Called once per pass.
    pub(super) fn report_ended(&mut self, now: Instant) {
        for (kind, suppressed) in self.take_ended(now) {
            log_suppressed(kind, suppressed);
        }
    }

    /// When the next count is due: the earliest end of a window that
    /// suppressed lines. The loop wakes for it, so that a count is logged
    /// about a second after the burst even if nothing else happens.
    pub(super) fn next_report(&self) -> Option<Instant> {
        self.windows.iter().filter(|w| w.suppressed > 0).filter_map(|w| w.quiet_until).min()
    }

    /// The counts of windows over by `now`, each taken once.
    fn take_ended(&mut self, now: Instant) -> impl Iterator<Item = (Noisy, u64)> + '_ {
        Noisy::ALL.into_iter().zip(self.windows.iter_mut()).filter_map(move |(kind, window)| {
            let over = window.quiet_until.is_none_or(|until| now >= until);
            (over && window.suppressed > 0).then(|| (kind, std::mem::take(&mut window.suppressed)))
        })
    }
}

/// How often a descriptor shortage that lasts is reported.
pub(super) const PAUSE_REPORT: Duration = Duration::from_secs(10);

/// How long after its last pause a shortage is over. A listener whose
/// pause ended and whose next `accept` fails again pauses at once, so a
/// shortage that lasts pauses at least every pause interval (100 ms).
const SHORTAGE_OVER: Duration = Duration::from_secs(1);

/// A descriptor shortage: listeners pause accepting when `accept` fails for
/// lack of descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`),
/// every listener ten times a second for as long as it lasts. Counted here
/// and logged as a summary, not once per pause.
#[derive(Debug, Default)]
pub(super) struct AcceptPauses {
    shortage: Option<Shortage>,
}

#[derive(Debug)]
struct Shortage {
    began: Instant,
    last_pause: Instant,
    /// The pauses since it began, and since the last line.
    pauses: u64,
    unreported: u64,
    next_report: Instant,
}

impl AcceptPauses {
    /// A listener paused accepting at `now` after `error`. The first pause
    /// of a shortage is logged (a warning); the others are counted.
    pub(super) fn paused(&mut self, now: Instant, listener: u64, error: &std::io::Error) {
        match &mut self.shortage {
            Some(shortage) => {
                shortage.last_pause = now;
                shortage.pauses += 1;
                shortage.unreported += 1;
            }
            None => {
                warn!(
                    listener,
                    error = %error,
                    "accept failed: {error}; pausing accepts 100 ms at a time until descriptors are freed \
                     (one summary every {}s while it lasts)",
                    PAUSE_REPORT.as_secs()
                );
                self.shortage = Some(Shortage {
                    began: now,
                    last_pause: now,
                    pauses: 1,
                    unreported: 0,
                    next_report: now.checked_add(PAUSE_REPORT).unwrap_or(now),
                });
            }
        }
    }

    /// Logs the summary that is due by `now`: the shortage still lasts
    /// (every [`PAUSE_REPORT`]), or it is over. Called once per pass.
    pub(super) fn report(&mut self, now: Instant) {
        let Some(shortage) = &mut self.shortage else { return };
        if now >= shortage.last_pause + SHORTAGE_OVER {
            let (pauses, seconds) = (shortage.pauses, (shortage.last_pause - shortage.began).as_secs_f64());
            info!(pauses, "accepting again: {pauses} accept pauses for lack of descriptors over {seconds:.1}s");
            self.shortage = None;
        } else if now >= shortage.next_report {
            let unreported = std::mem::take(&mut shortage.unreported);
            shortage.next_report = now.checked_add(PAUSE_REPORT).unwrap_or(now);
            warn!(
                pauses = unreported,
                "still out of descriptors: {unreported} accept pauses in the last {}s",
                PAUSE_REPORT.as_secs()
            );
        }
    }

    /// When the loop must wake to log the next summary.
    pub(super) fn next_report(&self) -> Option<Instant> {
        let shortage = self.shortage.as_ref()?;
        Some(shortage.next_report.min(shortage.last_pause + SHORTAGE_OVER))
    }
}

/// The line that stands for `suppressed` lines of `kind`, at their level.
fn log_suppressed(kind: Noisy, suppressed: u64) {
    let similar_to = kind.describe();
    match kind {
        Noisy::SlowCallback => {
            warn!(similar_to, suppressed, "{suppressed} similar lines suppressed ({similar_to}) in the last second");
        }
        Noisy::PeerReset => {
            debug!(similar_to, suppressed, "{suppressed} similar lines suppressed ({similar_to}) in the last second");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn one_line_per_kind_per_second_then_the_count() {
        let start = Instant::now();
        let mut limits = LogLimits::default();
        assert!(limits.admit(Noisy::PeerReset, start));
        let admitted = (1..=500).filter(|&ms| limits.admit(Noisy::PeerReset, at(start, ms))).count();
        assert_eq!(admitted, 0, "the rest of the second is quiet");
        assert!(limits.admit(Noisy::SlowCallback, at(start, 10)), "each kind has a window of its own");
        assert_eq!(limits.next_report(), Some(at(start, 1000)), "the count is due when the window ends");

        assert_eq!(limits.take_ended(at(start, 999)).count(), 0, "not before");
        let ended: Vec<_> = limits.take_ended(at(start, 1000)).collect();
        assert_eq!(ended, [(Noisy::PeerReset, 500)]);
        assert_eq!(limits.take_ended(at(start, 2000)).count(), 0, "reported once");
        assert_eq!(limits.next_report(), None);

        assert!(limits.admit(Noisy::PeerReset, at(start, 1001)), "a new window");
        assert!(!limits.admit(Noisy::PeerReset, at(start, 1500)));
    }

    #[test]
    fn a_line_after_the_window_reports_the_count_first() {
        let start = Instant::now();
        let mut limits = LogLimits::default();
        assert!(limits.admit(Noisy::SlowCallback, start));
        assert!(!limits.admit(Noisy::SlowCallback, at(start, 100)));
        assert!(!limits.admit(Noisy::SlowCallback, at(start, 200)));
        // No pass ran at the window's end: the next line takes the count
        // (and logs it) before it is logged itself.
        assert!(limits.admit(Noisy::SlowCallback, at(start, 1200)));
        assert_eq!(limits.take_ended(at(start, 5000)).count(), 0, "the count went with the line");
    }

    #[test]
    fn a_descriptor_shortage_is_summed_up_not_logged_per_pause() {
        let start = Instant::now();
        let mut pauses = AcceptPauses::default();
        assert_eq!(pauses.next_report(), None);
        let error = std::io::Error::from_raw_os_error(libc::EMFILE);
        for ms in (0..25_000).step_by(100) {
            pauses.paused(at(start, ms), 1, &error);
            pauses.report(at(start, ms));
        }
        let shortage = pauses.shortage.as_ref().unwrap();
        assert_eq!(shortage.pauses, 250);
        assert_eq!(shortage.unreported, 49, "summaries at 10 s and 20 s; the pauses after 20 s are not told yet");
        assert_eq!(pauses.next_report(), Some(at(start, 25_900)), "over a second after the last pause");
        pauses.report(at(start, 25_900));
        assert!(pauses.shortage.is_none(), "over");
        assert_eq!(pauses.next_report(), None);
    }

    #[test]
    fn a_kind_that_never_repeats_is_never_limited() {
        let start = Instant::now();
        let mut limits = LogLimits::default();
        for second in 0..5 {
            assert!(limits.admit(Noisy::SlowCallback, at(start, second * 1000)));
        }
        assert_eq!(limits.next_report(), None);
    }
}
