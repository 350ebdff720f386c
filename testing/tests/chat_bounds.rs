//! asynchat's output bound holds whatever the handler pushes: a client that
//! pipelines a thousand requests for a 1 MiB answer in one write and reads
//! nothing costs about one high-water mark plus one answer, not a GiB; and
//! once it reads, every answer arrives, in order. Its own test binary, so
//! that the process's memory is this test's alone.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use asyncore_engine::Command;
use asyncore_sdk::prelude::*;
use asyncore_testing::TestServer;

const ANSWER: usize = 1024 * 1024;
const REQUESTS: usize = 1000;

/// `get N` is answered with 1 MiB of byte N % 251, pushed in one piece as
/// the chat docs do it.
struct Big;

impl ChatHandler for Big {
    fn found_terminator(&mut self, chat: &mut Chat<'_>) {
        let line = chat.take_incoming();
        let n: usize = std::str::from_utf8(&line[4..]).unwrap().parse().unwrap();
        chat.push(&vec![(n % 251) as u8; ANSWER]);
    }
}

struct Server;

impl Dispatcher for Server {
    fn handle_accepted(&mut self, _: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
        Some(Box::new(AsyncChat::new(Big).with_terminator(b"\n")))
    }
}

struct BigPlugin;

impl Plugin for BigPlugin {
    const NAME: &'static str = "big";
    const VERSION: &'static str = "0";

    fn listen(_: &Config) -> Result<Box<dyn Dispatcher>, String> {
        Ok(Box::new(Server))
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Output the engine holds for the one connection, and what it wrote.
fn output(server: &TestServer) -> (u64, u64) {
    let channels = server
        .engine()
        .request_blocking(|reply| Command::ListChannels { listener_id: None, after: 0, limit: 10, reply })
        .unwrap();
    channels.iter().fold((0, 0), |(pending, out), ch| (pending + ch.pending_output, out + ch.counters.bytes_out))
}

#[test]
fn a_thousand_pipelined_requests_for_a_mebibyte_cost_one_high_water_mark() {
    let server = TestServer::start::<BigPlugin>(Config::default()).unwrap();
    let before = rss_kib();
    let mut client = TcpStream::connect(server.addr()).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let requests: String = (0..REQUESTS).map(|n| format!("get {n}\n")).collect();
    client.write_all(requests.as_bytes()).unwrap();

    // The first answers fill the socket buffers (and maybe the host's
    // queue); then the chat stops framing. Wait until answers went out,
    // then look at the memory for a while: it must not keep growing.
    asyncore_testing::eventually("the first answers to go out", || output(&server).1 >= 2 * ANSWER as u64);
    let mut grown = 0;
    for _ in 0..20 {
        grown = grown.max(rss_kib().saturating_sub(before));
        std::thread::sleep(Duration::from_millis(25));
    }
    // Unbounded, this is a GiB. Bounded: the 256 KiB high-water mark, one
    // answer over it, one read, the kernel's socket buffers aside.
    assert!(grown < 32 * 1024, "memory grew by {grown} KiB for a client that does not read");
    assert!(output(&server).0 < 4 * ANSWER as u64, "the host holds {} bytes", output(&server).0);

    // Reading now, every answer arrives whole and in order.
    let mut answer = vec![0u8; ANSWER];
    for n in 0..REQUESTS {
        client.read_exact(&mut answer).unwrap();
        let expected = (n % 251) as u8;
        assert!(answer.iter().all(|&b| b == expected), "answer {n} is not {expected} all through");
    }
}
