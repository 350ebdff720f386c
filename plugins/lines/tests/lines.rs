//! The lines plugin on the real engine: complete lines come back with their
//! terminator whatever reads they arrived in, the terminator and the line
//! limit come from the config, and a bad config is refused.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    time::Duration,
};

use asyncore_plugin_lines::Lines;
use asyncore_sdk::Config;
use asyncore_testing::TestServer;

/// A client whose reads fail instead of hanging when the plugin stays
/// silent.
fn connect(server: &TestServer) -> TcpStream {
    let stream = TcpStream::connect(server.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

/// Everything the server sends until it closes (or the read times out,
/// which fails the test).
#[track_caller]
fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    stream.read_to_end(&mut all).expect("the server closes the connection");
    all
}

#[test]
fn lines_split_across_writes_come_back_whole_with_the_default_terminator() {
    let server = TestServer::start::<Lines>(Config::default()).unwrap();
    let mut client = connect(&server);
    // Each write is its own packet on loopback, and a read can end inside
    // the terminator itself.
    for part in [&b"he"[..], b"llo\r", b"\nwor", b"ld\r\ntwo\r\nthree\r\n"] {
        client.write_all(part).unwrap();
    }
    let expected = b"hello\r\nworld\r\ntwo\r\nthree\r\n";
    let mut back = vec![0u8; expected.len()];
    client.read_exact(&mut back).unwrap();
    assert_eq!(back, expected);
}

#[test]
fn an_unterminated_tail_never_comes_back() {
    let server = TestServer::start::<Lines>(Config::default()).unwrap();
    let mut client = connect(&server);
    // A bare `\n` is not the default terminator.
    client.write_all(b"one\r\nnot a line\ntail").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut client), b"one\r\n");
}

#[test]
fn the_terminator_comes_from_the_config_with_escapes() {
    let server = TestServer::start::<Lines>(Config::from_pairs([("terminator", r"\n")])).unwrap();
    let mut client = connect(&server);
    client.write_all(b"a\nb\r\nc").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    // The `\r` is part of the second line now.
    assert_eq!(read_to_eof(&mut client), b"a\nb\r\n");

    let server = TestServer::start::<Lines>(Config::from_pairs([("terminator", "END")])).unwrap();
    let mut client = connect(&server);
    client.write_all(b"firstENDsecEN").unwrap();
    client.write_all(b"DlastEN").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut client), b"firstENDsecEND");
}

#[test]
fn a_line_past_max_line_closes_only_its_channel_and_says_why() {
    let server = TestServer::start::<Lines>(Config::from_pairs([("max_line", "8"), ("terminator", r"\n")])).unwrap();
    let mut calm = connect(&server);
    let mut long = connect(&server);
    long.write_all(b"12345678\n").unwrap();
    let mut back = [0u8; 9];
    long.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"12345678\n", "a line of exactly max_line bytes is fine");
    long.write_all(b"123456789\n").unwrap();
    assert_eq!(read_to_eof(&mut long), b"", "the long line closes its channel");
    assert!(
        server.logs().iter().any(|line| line.contains("line too long") && line.contains("max_line 8")),
        "{:#?}",
        server.logs()
    );
    calm.write_all(b"calm\n").unwrap();
    let mut back = [0u8; 5];
    calm.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"calm\n");
    assert_eq!(server.panics(), 0);
}

#[test]
fn bad_configs_are_refused_naming_the_key() {
    let cases = [
        ("terminator", "", "must not be empty"),
        ("terminator", r"\x", "unknown escape"),
        ("terminator", "x\\", "lone backslash"),
        ("max_line", "0", "at least 1"),
        ("max_line", "big", "invalid value"),
        ("high_water", "0", "at least 1"),
    ];
    for (key, value, reason) in cases {
        let error = TestServer::start::<Lines>(Config::from_pairs([(key, value)])).unwrap_err();
        assert!(error.contains(key) && error.contains(reason), "{key}={value:?}: {error}");
    }
}
