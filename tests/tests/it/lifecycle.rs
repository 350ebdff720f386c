//! Signals: SIGTERM drains (channels flush and close, the daemon exits 0);
//! SIGINT stops at once.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use asyncore_tests::{Daemon, Options, connect};

use crate::runtime;

/// The address of the listener the daemon's config started.
fn boot_listener_address(daemon: &Daemon) -> SocketAddr {
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let listeners = client
            .listeners
            .list_listeners(asyncore_proto::v1::ListListenersRequest::default())
            .await
            .unwrap()
            .into_inner();
        listeners.listeners[0].address.parse().unwrap()
    })
}

#[test]
fn sigterm_drains_open_channels_and_exits_cleanly() {
    let mut daemon = Daemon::start_with(Options {
        config: "[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = \"echo\"\n".into(),
        ..Options::default()
    });
    let address = boot_listener_address(&daemon);
    let mut peer = connect(address);
    peer.write_all(b"before the drain").unwrap();
    let mut back = [0u8; 16];
    peer.read_exact(&mut back).unwrap();

    let status = runtime().block_on(daemon.signal_and_wait(15));
    // The open channel was closed gracefully: EOF, not a reset.
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).expect("clean EOF");
    assert!(rest.is_empty());
    assert!(status.success(), "exit status {status}; log:\n{}", daemon.log());
    assert!(daemon.log().contains("draining"), "{}", daemon.log());
    assert!(TcpStream::connect(address).is_err(), "listener closed");
}

#[test]
fn a_drain_ends_at_its_deadline_even_with_a_peer_that_never_reads() {
    let mut daemon = Daemon::start_with(Options {
        config: "drain_timeout_secs = 1\n[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = \"echo\"\n".into(),
        ..Options::default()
    });
    let address = boot_listener_address(&daemon);
    // A peer that writes and never reads: its echo can never be flushed.
    // The daemon stops reading at its high-water mark, so writes soon block.
    let mut peer = connect(address);
    peer.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let blocked = (0..256).any(|_| peer.write(&chunk).is_err());
    assert!(blocked, "the daemon took 256 MiB from a peer that never reads");

    let status = runtime().block_on(daemon.signal_and_wait(15));
    assert!(status.success(), "exit status {status}; log:\n{}", daemon.log());
    assert!(daemon.log().contains("drain deadline passed"), "{}", daemon.log());
}

#[test]
fn sigint_stops_at_once() {
    let mut daemon = Daemon::start();
    let status = runtime().block_on(daemon.signal_and_wait(2));
    assert!(status.success(), "exit status {status}");
}
