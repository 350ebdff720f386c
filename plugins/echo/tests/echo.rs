//! The echo plugin on the real engine: bytes come back exactly, however
//! they are split, on as many connections as are open, and a bad config is
//! refused.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    time::Duration,
};

use asyncore_plugin_echo::Echo;
use asyncore_sdk::Config;
use asyncore_testing::TestServer;

/// A client whose reads fail instead of hanging when the plugin stays
/// silent.
fn connect(server: &TestServer) -> TcpStream {
    let stream = TcpStream::connect(server.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

#[test]
fn bytes_come_back_exactly() {
    let server = TestServer::start::<Echo>(Config::default()).unwrap();
    let mut client = connect(&server);
    client.write_all(b"hello, ").unwrap();
    client.write_all(b"world").unwrap();
    let mut back = [0u8; 12];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello, world");
}

#[test]
fn a_payload_larger_than_the_high_water_mark_comes_back_whole() {
    // A small mark makes the channel stop and resume reading many times.
    let server = TestServer::start::<Echo>(Config::from_pairs([("high_water", "4096")])).unwrap();
    let mut client = connect(&server);
    let payload: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let mut writer = client.try_clone().unwrap();
    let sent = payload.clone();
    let write = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        // Half-close: the echo closes its side after the last byte.
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(payload.len());
    client.read_to_end(&mut back).unwrap();
    write.join().unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");
}

#[test]
fn connections_are_independent() {
    let server = TestServer::start::<Echo>(Config::default()).unwrap();
    let mut one = connect(&server);
    let mut two = connect(&server);
    two.write_all(b"second").unwrap();
    one.write_all(b"first").unwrap();
    let (mut back_one, mut back_two) = ([0u8; 5], [0u8; 6]);
    one.read_exact(&mut back_one).unwrap();
    two.read_exact(&mut back_two).unwrap();
    assert_eq!(&back_one, b"first");
    assert_eq!(&back_two, b"second");
    assert_eq!(server.n_channels(), 2);
}

#[test]
fn a_zero_or_unparsable_high_water_mark_is_refused() {
    for bad in ["0", "lots"] {
        let error = TestServer::start::<Echo>(Config::from_pairs([("high_water", bad)])).unwrap_err();
        assert!(error.contains("high_water"), "{bad}: {error}");
    }
}
