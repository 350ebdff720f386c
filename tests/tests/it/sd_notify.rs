//! systemd's readiness protocol (`Type=notify`), through the binary: with
//! `NOTIFY_SOCKET` set the daemon sends `READY=1` once it serves,
//! `WATCHDOG=1` while its poll loop answers (when `WATCHDOG_USEC` asks for
//! it), and `STOPPING=1` on SIGTERM or SIGINT. The test plays systemd: it
//! binds the datagram socket the daemon sends to.

use std::{os::unix::net::UnixDatagram, time::Instant};

use asyncore_tests::{Daemon, Options, TempDir, patience};

use crate::runtime;

/// Receives notifications until one has the line `wanted`, within
/// [`patience()`]; returns every message received until then.
#[track_caller]
pub(crate) fn receive_until(socket: &UnixDatagram, wanted: &str) -> Vec<String> {
    let deadline = Instant::now() + patience();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {wanted:?} within {:?}; received {received:?}", patience());
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = message.lines().any(|line| line == wanted);
                received.push(message);
                if found {
                    return received;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("recv from the notify socket: {e}"),
        }
    }
}

#[test]
fn the_daemon_notifies_ready_watchdog_and_stopping_on_sigterm() {
    let dir = TempDir::new("sd-notify");
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    let mut daemon = Daemon::start_with(Options {
        env: vec![
            ("NOTIFY_SOCKET".into(), path.display().to_string()),
            // A ping every 100 ms.
            ("WATCHDOG_USEC".into(), "200000".into()),
        ],
        ..Options::default()
    });

    let received = receive_until(&socket, "READY=1");
    let ready = received.last().unwrap();
    assert!(ready.contains(&format!("STATUS=serving; control {}", daemon.control())), "{ready:?}");
    receive_until(&socket, "WATCHDOG=1");

    let status = runtime().block_on(daemon.signal_and_wait(15));
    assert!(status.success(), "exit status {status}; log:\n{}", daemon.log());
    let received = receive_until(&socket, "STOPPING=1");
    let stopping = received.last().unwrap();
    // The default drain (30 s) and 5 s to finish: systemd waits that long.
    assert!(stopping.lines().any(|line| line == "EXTEND_TIMEOUT_USEC=35000000"), "{stopping:?}");
}

#[test]
fn the_daemon_notifies_an_abstract_socket_and_stopping_on_sigint() {
    use std::os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr};

    let name = format!("asyncored-test-sd-notify-{}", std::process::id());
    let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    let mut daemon =
        Daemon::start_with(Options { env: vec![("NOTIFY_SOCKET".into(), format!("@{name}"))], ..Options::default() });

    let received = receive_until(&socket, "READY=1");
    // Without WATCHDOG_USEC, no pings.
    assert!(!received.iter().any(|message| message.contains("WATCHDOG=1")), "{received:?}");

    let status = runtime().block_on(daemon.signal_and_wait(2));
    assert!(status.success(), "exit status {status}; log:\n{}", daemon.log());
    let received = receive_until(&socket, "STOPPING=1");
    assert!(!received.last().unwrap().contains("EXTEND_TIMEOUT_USEC"), "{received:?}");
    assert!(!received.iter().any(|message| message.contains("WATCHDOG=1")), "{received:?}");
}
