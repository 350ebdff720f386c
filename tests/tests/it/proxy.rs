//! The proxy plugin: exact bytes both ways through an outbound channel,
//! half-close passed on, and bounded memory when a peer stops reading.

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use asyncore_proto::v1;
use asyncore_tests::{Client, Daemon, Options, Rng};

use crate::runtime;

/// A daemon with an echo listener and a proxy in front of it. The runtime
/// must outlive the client (its connection runs on it).
fn start() -> (Daemon, tokio::runtime::Runtime, Client, std::net::SocketAddr, u64) {
    let daemon = Daemon::start_with(Options {
        plugins: vec!["asyncore_plugin_echo", "asyncore_plugin_proxy"],
        ..Options::default()
    });
    let runtime = runtime();
    let (client, proxy, proxy_listener) = runtime.block_on(async {
        let mut client = daemon.client().await;
        let (_, echo) = client.start_listener("echo", &[]).await;
        let (proxy_listener, proxy) = client.start_listener("proxy", &[("upstream", &echo.to_string())]).await;
        (client, proxy, proxy_listener)
    });
    (daemon, runtime, client, proxy, proxy_listener)
}

#[test]
fn proxy_carries_50_mib_both_ways_exactly() {
    let (daemon, _runtime, _client, proxy, _) = start();
    let payload = Rng::new(50).bytes(50 << 20);
    let mut stream = TcpStream::connect(proxy).unwrap();
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
    let (_daemon, runtime, mut client, proxy, proxy_listener) = start();
    let mut stream = TcpStream::connect(proxy).unwrap();
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
    let (daemon, _runtime, _client, proxy, _) = start();
    let mut stream = TcpStream::connect(proxy).unwrap();
    let chunk = Rng::new(3).bytes(1 << 20);
    asyncore_tests::assert_memory_bounded_while_not_reading(&daemon, &mut stream, &chunk);
}
