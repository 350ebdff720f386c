//! systemd's readiness protocol for a `Type=notify` unit, without
//! libsystemd: `READY=1` once everything is bound, `STOPPING=1` on SIGTERM
//! or SIGINT, and, when the unit sets `WatchdogSec=`, `WATCHDOG=1` pings
//! that stop as soon as the poll loop stops answering. A loop stuck in a
//! plugin callback that blocks (against the SDK's rules) leaves the process
//! and its control API alive but serves nothing; withholding the pings makes
//! systemd restart it.
//!
//! The protocol is one text datagram per message to the Unix socket named
//! by `NOTIFY_SOCKET` (a path, or an abstract name written `@name`):
//! <https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html>.
//! Without `NOTIFY_SOCKET` (not under systemd, or another `Type=`) every
//! call here does nothing.

use std::{
    ffi::OsStr,
    io,
    os::unix::{
        ffi::OsStrExt as _,
        net::{SocketAddr, UnixDatagram},
    },
    sync::Arc,
    time::Duration,
};

use asyncored::{Command, EngineHandle};

/// Where systemd listens; set only for units of `Type=notify`.
const ENV_SOCKET: &str = "NOTIFY_SOCKET";
/// The unit's `WatchdogSec=`, in microseconds.
const ENV_WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The process the watchdog is meant for: a child that inherited the
/// environment must not ping for its parent.
const ENV_WATCHDOG_PID: &str = "WATCHDOG_PID";

/// What the stop timeout is extended by beyond the drain: joining the loop
/// thread and stopping the control API after the drain's deadline.
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// The service manager's notification socket, or nothing. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Notifier(Option<Arc<Target>>);

#[derive(Debug)]
struct Target {
    /// Unbound: systemd identifies the sender by its credentials.
    socket: UnixDatagram,
    address: SocketAddr,
}

impl Notifier {
    /// The socket `NOTIFY_SOCKET` names, or a notifier that does nothing
    /// when it is unset. A name that cannot be used is logged and ignored:
    /// systemd then stops the unit for not becoming ready, with that log.
    pub(crate) fn from_env() -> Notifier {
        let Some(name) = std::env::var_os(ENV_SOCKET) else {
            return Notifier::default();
        };
        match Notifier::to(&name) {
            Ok(notifier) => notifier,
            Err(e) => {
                tracing::error!(socket = ?name, error = %e, "cannot use NOTIFY_SOCKET: systemd will not hear READY=1");
                Notifier::default()
            }
        }
    }

    /// A notifier for the socket `name` (`/path` or `@abstract`).
    fn to(name: &OsStr) -> io::Result<Notifier> {
        let address = match name.as_bytes() {
            [b'/', ..] => SocketAddr::from_pathname(name)?,
            [b'@', abstract_name @ ..] => abstract_address(abstract_name)?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "neither an absolute path nor an @abstract name",
                ));
            }
        };
        Ok(Notifier(Some(Arc::new(Target { socket: UnixDatagram::unbound()?, address }))))
    }

    /// Sends one message (lines of `KEY=value`). A failure is logged, never
    /// fatal: the daemon serves whether or not systemd hears it.
    fn send(&self, message: &str) {
        if let Some(target) = &self.0
            && let Err(e) = target.socket.send_to_addr(message.as_bytes(), &target.address)
        {
            tracing::warn!(error = %e, message, "cannot notify systemd");
        }
    }

    /// Everything is bound and the control API serves.
    pub(crate) fn ready(&self, control: impl std::fmt::Display) {
        self.send(&format!("READY=1\nSTATUS=serving; control {control}"));
    }

    /// A config reload begins. systemd (`Type=notify-reload`) requires
    /// `MONOTONIC_USEC`, the time of the request on `CLOCK_MONOTONIC`, to
    /// tell this reload from an earlier one.
    pub(crate) fn reloading(&self) {
        if self.0.is_some() {
            self.send(&format!("RELOADING=1\nSTATUS=reloading the config\nMONOTONIC_USEC={}", monotonic_usec()));
        }
    }

    /// A config reload is over, applied or refused: serving again.
    pub(crate) fn reloaded(&self) {
        self.send("READY=1\nSTATUS=serving");
    }

    /// A signal arrived. `drain`: the drain's bound (SIGTERM), which the
    /// stop timeout is extended to cover, so that a `drain_timeout_secs`
    /// longer than the unit's `TimeoutStopSec=` is not cut short by SIGKILL
    /// (systemd never shortens a timeout this way).
    pub(crate) fn stopping(&self, drain: Option<Duration>) {
        match drain {
            Some(drain) => self.send(&format!(
                "STOPPING=1\nSTATUS=draining\nEXTEND_TIMEOUT_USEC={}",
                (drain + STOP_MARGIN).as_micros()
            )),
            None => self.send("STOPPING=1\nSTATUS=stopping"),
        }
    }

    /// Starts the watchdog task when the unit asks for one
    /// (`WATCHDOG_USEC`, for this process): a ping every half of the
    /// watchdog's interval, each one only once the poll loop has answered
    /// a `LoopStats` command within a quarter of it.
    pub(crate) fn spawn_watchdog(&self, engine: EngineHandle) {
        if self.0.is_none() {
            return;
        }
        let usec = std::env::var(ENV_WATCHDOG_USEC).ok();
        let pid = std::env::var(ENV_WATCHDOG_PID).ok();
        if let Some(period) = ping_period(usec.as_deref(), pid.as_deref(), std::process::id()) {
            tracing::info!(?period, "pinging the systemd watchdog while the poll loop answers");
            tokio::spawn(self.clone().watchdog(engine, period));
        }
    }

    async fn watchdog(self, engine: EngineHandle, period: Duration) -> std::convert::Infallible {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut answering = true;
        loop {
            ticks.tick().await;
            let answered = self.ping_if_loop_answers(&engine, period / 2).await;
            if answered != answering {
                if answered {
                    tracing::info!("the poll loop answers again: pinging the systemd watchdog");
                } else {
                    tracing::error!(?period, "the poll loop did not answer: withholding the systemd watchdog ping");
                }
                answering = answered;
            }
        }
    }

    /// Sends `WATCHDOG=1` if the poll loop answers within `patience`;
    /// returns whether it did.
    async fn ping_if_loop_answers(&self, engine: &EngineHandle, patience: Duration) -> bool {
        let asked = engine.request(|reply| Command::LoopStats { reply });
        let answered = matches!(tokio::time::timeout(patience, asked).await, Ok(Ok(_)));
        if answered {
            self.send("WATCHDOG=1");
        }
        answered
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd reads `MONOTONIC_USEC`.
fn monotonic_usec() -> u128 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a pointer to a
    // live one; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u128 * 1_000_000 + now.tv_nsec as u128 / 1000
}

/// How often to ping: half the watchdog's interval (`WATCHDOG_USEC`), as
/// sd_watchdog_enabled(3) advises; `None` without a watchdog, or when
/// `WATCHDOG_PID` names another process.
fn ping_period(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&usec| usec > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec) / 2)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt as _;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt as _;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract socket names exist only on Linux"))
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;

    /// A datagram socket bound where a notifier sends, in a directory of
    /// its own (removed on drop).
    struct Listener {
        socket: UnixDatagram,
        dir: PathBuf,
    }

    impl Listener {
        fn bind(label: &str) -> (Listener, Notifier) {
            let dir = std::env::temp_dir().join(format!("asyncored-sd-notify-{label}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("notify");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket.set_nonblocking(true).unwrap();
            (Listener { socket, dir }, Notifier::to(path.as_os_str()).unwrap())
        }

        /// What has arrived, without waiting (the sends are synchronous).
        fn received(&self) -> Vec<String> {
            let mut messages = Vec::new();
            let mut buf = [0u8; 512];
            while let Ok(n) = self.socket.recv(&mut buf) {
                messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            messages
        }
    }

    impl Drop for Listener {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let (listener, notifier) = Listener::bind("path");
        notifier.ready("127.0.0.1:50051".parse::<std::net::SocketAddr>().unwrap());
        notifier.stopping(Some(Duration::from_secs(30)));
        assert_eq!(
            listener.received(),
            [
                "READY=1\nSTATUS=serving; control 127.0.0.1:50051",
                "STOPPING=1\nSTATUS=draining\nEXTEND_TIMEOUT_USEC=35000000",
            ]
        );
    }

    #[test]
    fn a_reload_is_reloading_with_the_monotonic_clock_then_ready() {
        let (listener, notifier) = Listener::bind("reload");
        let before = super::monotonic_usec();
        notifier.reloading();
        notifier.reloaded();
        let messages = listener.received();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[0].starts_with("RELOADING=1\n"), "{messages:?}");
        let usec: u128 = messages[0]
            .lines()
            .find_map(|line| line.strip_prefix("MONOTONIC_USEC="))
            .expect("MONOTONIC_USEC is sent")
            .parse()
            .unwrap();
        assert!(usec >= before, "the time of the request on CLOCK_MONOTONIC");
        assert!(messages[1].starts_with("READY=1\n"), "{messages:?}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("asyncored-sd-notify-test-{}", std::process::id());
        let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        socket.set_nonblocking(true).unwrap();
        Notifier::to(OsStr::new(&format!("@{name}"))).unwrap().stopping(None);
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\nSTATUS=stopping");
    }

    #[test]
    fn a_relative_name_is_refused() {
        assert_eq!(Notifier::to(OsStr::new("notify")).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn the_ping_period_is_half_the_watchdog_interval_and_only_for_this_process() {
        assert_eq!(ping_period(Some("10000000"), None, 7), Some(Duration::from_secs(5)));
        assert_eq!(ping_period(Some("10000000"), Some("7"), 7), Some(Duration::from_secs(5)));
        assert_eq!(ping_period(Some("10000000"), Some("8"), 7), None);
        assert_eq!(ping_period(Some("0"), None, 7), None);
        assert_eq!(ping_period(Some("soon"), None, 7), None);
        assert_eq!(ping_period(None, Some("7"), 7), None);
    }

    #[test]
    fn a_stuck_loop_gets_no_ping() {
        let (listener, notifier) = Listener::bind("stuck");
        // An engine whose loop never runs: its commands are queued and
        // never answered, as behind a callback that blocks.
        let engine = asyncored::Engine::new().unwrap();
        let answered = runtime().block_on(notifier.ping_if_loop_answers(&engine.handle(), Duration::from_millis(50)));
        assert!(!answered);
        assert!(listener.received().is_empty());
    }

    #[test]
    fn a_running_loop_gets_a_ping() {
        let (listener, notifier) = Listener::bind("running");
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let poll_loop = std::thread::spawn(move || {
            let mut engine = asyncored::Engine::new().unwrap();
            handle_tx.send(engine.handle()).unwrap();
            engine.run()
        });
        let engine = handle_rx.recv().unwrap();
        // Bounded by the patience given; generous, since it is not a race.
        let answered = runtime().block_on(notifier.ping_if_loop_answers(&engine, Duration::from_secs(10)));
        engine.send(Command::Shutdown).unwrap();
        poll_loop.join().unwrap().unwrap();
        assert!(answered);
        assert_eq!(listener.received(), ["WATCHDOG=1"]);
    }
}
