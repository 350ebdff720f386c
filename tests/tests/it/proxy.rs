//! The proxy plugin: exact bytes both ways through an outbound channel,
//! half-close passed on, and bounded memory when a peer stops reading.

use std::{
    io::{Read, Write},
    net::SocketAddr,
};

use asyncore_proto::v1;
use asyncore_tests::{Client, Daemon, InProcessDaemon, Options, Rng, connect};

use crate::runtime;

fn options() -> Options {
    Options { plugins: vec!["asyncore_plugin_echo", "asyncore_plugin_proxy"], ..Options::default() }
}

/// Starts an echo listener and a proxy in front of it; returns the proxy
/// listener's id and address.
async fn proxy_to_echo(client: &mut Client) -> (u64, SocketAddr) {
    let (_, echo) = client.start_listener("echo", &[]).await;
    client.start_listener("proxy", &[("upstream", &echo.to_string())]).await
}

/// An in-process daemon with a proxy in front of an echo listener, a
/// client, and the runtime they run on (returned first, so dropped last).
fn start() -> (tokio::runtime::Runtime, InProcessDaemon, Client, SocketAddr, u64) {
    let runtime = runtime();
    let daemon = runtime.block_on(InProcessDaemon::start_with(options()));
    let mut client = runtime.block_on(daemon.client());
    let (proxy_listener, proxy) = runtime.block_on(proxy_to_echo(&mut client));
    (runtime, daemon, client, proxy, proxy_listener)
}

#[test]
fn proxy_carries_50_mib_both_ways_exactly() {
    let (_runtime, daemon, _client, proxy, _) = start();
    let payload = Rng::new(50).bytes(50 << 20);
    let mut stream = connect(proxy);
    let mut writer = stream.try_clone().unwrap();
    let sent = payload.clone();
    let write = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        // Half-close: the proxy passes it on to the echo upstream, whose
        // close comes back as our EOF once everything was echoed.
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(payload.len());
    stream.read_to_end(&mut back).unwrap();
    write.join().unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "bytes through the proxy differ");

    drop(daemon);
}

#[test]
fn outbound_channels_show_kind_and_creator() {
    let (runtime, _daemon, mut client, proxy, proxy_listener) = start();
    let mut stream = connect(proxy);
    stream.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
    runtime.block_on(async {
        let channels = client.channels_of(proxy_listener).await;
        let accepted = channels.iter().find(|c| c.kind == v1::ChannelKind::Accepted as i32).unwrap();
        let outbound = channels.iter().find(|c| c.kind == v1::ChannelKind::Outbound as i32).unwrap();
        assert_eq!(outbound.parent_id, accepted.id);
        assert_eq!(outbound.plugin, "proxy");
        assert_eq!(outbound.bytes_out, 5);
        assert_eq!(outbound.bytes_in, 5);
        assert_eq!(accepted.bytes_in, 5);
    });
}

#[test]
fn a_client_that_stops_reading_does_not_grow_the_daemon() {
    // The binary: its memory is its own.
    let daemon = Daemon::start_with(options());
    let (_, proxy) = runtime().block_on(async { proxy_to_echo(&mut daemon.client().await).await });
    let mut stream = connect(proxy);
    let chunk = Rng::new(3).bytes(1 << 20);
    asyncore_tests::assert_memory_bounded_while_not_reading(&daemon, &mut stream, &chunk);
}
