//! The lines plugin (asynchat through the daemon): complete lines come back
//! whatever reads they arrive in, custom terminators, an oversized line
//! closes only its channel with a logged reason, and a client that never
//! reads cannot grow the daemon. The last two watch the binary's log and
//! memory; the rest run in-process.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
};

use asyncore_proto::v1;
use asyncore_tests::{Client, Daemon, InProcessDaemon, Options, Rng, connect, eventually};

use crate::runtime;

fn options() -> Options {
    Options { plugins: vec!["asyncore_plugin_lines"], ..Options::default() }
}

/// An in-process daemon with the lines plugin, a client, and the runtime
/// both run on (which must outlive them: it is returned first, so dropped
/// last).
fn start() -> (tokio::runtime::Runtime, InProcessDaemon, Client) {
    let runtime = runtime();
    let daemon = runtime.block_on(InProcessDaemon::start_with(options()));
    let client = runtime.block_on(daemon.client());
    (runtime, daemon, client)
}

/// The binary with the lines plugin, for the tests that read its log or
/// watch its memory.
fn start_binary() -> (Daemon, tokio::runtime::Runtime, Client) {
    let daemon = Daemon::start_with(options());
    let runtime = runtime();
    let client = runtime.block_on(daemon.client());
    (daemon, runtime, client)
}

fn listen(runtime: &tokio::runtime::Runtime, client: &mut Client, config: &[(&str, &str)]) -> (u64, SocketAddr) {
    runtime.block_on(client.start_listener("lines", config))
}

/// Writes `input` one byte per segment, half-closes, and returns everything
/// that comes back until EOF.
fn one_byte_at_a_time(address: SocketAddr, input: &[u8]) -> Vec<u8> {
    let mut stream = connect(address);
    stream.set_nodelay(true).unwrap();
    for byte in input {
        stream.write_all(std::slice::from_ref(byte)).unwrap();
        stream.flush().unwrap();
    }
    stream.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    back
}

#[test]
fn lines_split_into_single_bytes_come_back_whole() {
    let (runtime, _daemon, mut client) = start();
    let (_, address) = listen(&runtime, &mut client, &[]);
    // A lone \r and \n inside a line are data; only \r\n ends it. The
    // unterminated tail is not a line and never comes back: the echo is by
    // line, not by byte.
    let lines = b"hello world\r\n\r\nwith \r inside and \n too\r\nlast line\r\n";
    let mut input = lines.to_vec();
    input.extend_from_slice(b"unterminated\r");
    let back = one_byte_at_a_time(address, &input);
    assert_eq!(String::from_utf8_lossy(&back), String::from_utf8_lossy(lines));
}

#[test]
fn ten_thousand_lines_in_one_write_come_back_exactly() {
    let (runtime, _daemon, mut client) = start();
    let (_, address) = listen(&runtime, &mut client, &[]);
    let mut rng = Rng::new(10_000);
    let mut input = Vec::new();
    for i in 0..10_000 {
        let len = rng.range(0, 200);
        input.extend_from_slice(format!("{i} ").as_bytes());
        input.extend(rng.bytes(len).into_iter().map(|b| b'a' + b % 26));
        input.extend_from_slice(b"\r\n");
    }
    let mut stream = connect(address);
    let mut writer = stream.try_clone().unwrap();
    let sent = input.clone();
    // Written from another thread: the echo stops reading while its replies
    // pile up, so a writer that does not read could block for good.
    let write = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(input.len());
    stream.read_to_end(&mut back).unwrap();
    write.join().unwrap();
    assert_eq!(back.len(), input.len());
    assert!(back == input, "echoed lines differ");
}

#[test]
fn custom_terminators_frame_the_lines() {
    let (runtime, _daemon, mut client) = start();

    // Typed as `-c terminator='\n'`: the escape is the plugin's to decode.
    let (_, newline) = listen(&runtime, &mut client, &[("terminator", r"\n")]);
    let back = one_byte_at_a_time(newline, b"a\r\nb\n\nc\tc\npartial");
    assert_eq!(String::from_utf8_lossy(&back), "a\r\nb\n\nc\tc\n");

    // A multi-byte terminator, with near misses split across segments.
    let (_, end) = listen(&runtime, &mut client, &[("terminator", "END")]);
    let lines = b"oneENDtwo EENDENthreeENENDEND";
    let mut input = lines.to_vec();
    input.extend_from_slice(b"tailEN");
    assert_eq!(String::from_utf8_lossy(&one_byte_at_a_time(end, &input)), String::from_utf8_lossy(lines));
    // The same in one write.
    let mut stream = connect(end);
    stream.write_all(&input).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    assert_eq!(String::from_utf8_lossy(&back), String::from_utf8_lossy(lines));

    // Bad values are refused with the key named.
    for (key, value) in [("terminator", ""), ("terminator", r"\q"), ("max_line", "0"), ("high_water", "lots")] {
        let status = runtime
            .block_on(client.listeners.start_listener(v1::StartListenerRequest {
                address: "127.0.0.1:0".to_string(),
                plugin: "lines".to_string(),
                config: [(key.to_string(), value.to_string())].into(),
            }))
            .expect_err("bad config must be refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{key}={value:?}: {status:?}");
        assert!(status.message().contains(key), "{key}={value:?}: {:?}", status.message());
    }
}

/// The daemon's id for the channel of `stream`, found by its address.
fn channel_id(runtime: &tokio::runtime::Runtime, client: &mut Client, listener_id: u64, stream: &TcpStream) -> u64 {
    runtime.block_on(client.channel_by_peer(listener_id, stream.local_addr().unwrap())).id
}

#[test]
fn an_oversized_line_closes_only_its_channel_with_a_logged_reason() {
    let (daemon, runtime, mut client) = start_binary();
    let (listener_id, address) = listen(&runtime, &mut client, &[("max_line", "1024")]);
    let mut good = connect(address);
    let mut bad = connect(address);
    let bad_id = channel_id(&runtime, &mut client, listener_id, &bad);

    let round_trip = |stream: &mut TcpStream, line: &[u8]| {
        stream.write_all(line).unwrap();
        let mut back = vec![0u8; line.len()];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back, line);
    };
    round_trip(&mut good, b"before\r\n");
    // Exactly max_line bytes is still a line.
    round_trip(&mut bad, &[b"y".repeat(1024), b"\r\n".to_vec()].concat());

    bad.write_all(&b"x".repeat(2048)).unwrap();
    let mut back = Vec::new();
    bad.read_to_end(&mut back).expect("the oversized line's channel is closed (EOF)");
    assert!(back.is_empty(), "nothing of the oversized line comes back: {} bytes did", back.len());

    round_trip(&mut good, b"after\r\n");
    let needle = format!("channel {bad_id}: line too long: more than max_line 1024 bytes");
    runtime.block_on(eventually!(async || daemon.log().contains(&needle), "{needle:?} in the log:\n{}", daemon.log()));
}

#[test]
fn a_client_that_never_reads_does_not_grow_the_daemon() {
    let (daemon, runtime, mut client) = start_binary();
    let (_, address) = listen(&runtime, &mut client, &[]);
    let mut stream = connect(address);
    let mut line = Rng::new(4).bytes(1022).into_iter().map(|b| b'a' + b % 26).collect::<Vec<u8>>();
    line.extend_from_slice(b"\r\n");
    let chunk = line.repeat(1024);
    asyncore_tests::assert_memory_bounded_while_not_reading(&daemon, &mut stream, &chunk);
}
