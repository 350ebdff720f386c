//! The harness itself: an asynchat plugin on the real engine, a caught
//! panic, a refused config.

use std::{
    io::{BufRead, BufReader, Read, Write},
    thread,
    time::Duration,
};

use asyncore_sdk::prelude::*;
use asyncore_testing::TestServer;

struct Lines;

impl ChatHandler for Lines {
    fn found_terminator(&mut self, chat: &mut Chat<'_>) {
        match chat.incoming() {
            b"quit" => {
                chat.clear_incoming();
                chat.push(b"bye\n");
                chat.close_when_done();
            }
            b"boom" => panic!("asked to panic"),
            _ => {
                chat.append_incoming(b"\n");
                chat.push_incoming();
            }
        }
    }
}

struct Server;

impl Dispatcher for Server {
    fn handle_accepted(&mut self, _: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
        Some(Box::new(AsyncChat::new(Lines).with_terminator(b"\n")))
    }
}

struct LinesPlugin;

impl Plugin for LinesPlugin {
    const NAME: &'static str = "lines";
    const VERSION: &'static str = "0";

    fn listen(config: &Config) -> Result<Box<dyn Dispatcher>, String> {
        if config.get("refuse").is_some() {
            return Err("config refuse: refused".into());
        }
        Ok(Box::new(Server))
    }
}

#[test]
fn an_async_chat_over_real_sockets() {
    let server = TestServer::start::<LinesPlugin>(Config::default()).unwrap();
    let mut client = server.connect();
    // Split across writes, one byte at a time for the first line.
    for byte in b"one\n" {
        client.write_all(&[*byte]).unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    client.write_all(b"two\nthree\nquit\nignored\n").unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(client).lines() {
        lines.push(line.unwrap());
    }
    assert_eq!(lines, ["one", "two", "three", "bye"]);
}

#[test]
fn a_panic_closes_only_its_channel() {
    let server = TestServer::start::<LinesPlugin>(Config::default()).unwrap();
    let mut calm = BufReader::new(server.connect());
    let mut doomed = server.connect();
    doomed.write_all(b"boom\n").unwrap();
    let mut rest = Vec::new();
    doomed.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    calm.get_mut().write_all(b"still here\n").unwrap();
    let mut line = String::new();
    calm.read_line(&mut line).unwrap();
    assert_eq!(line, "still here\n");
    assert_eq!(server.panics(), 1);
    assert!(server.logs().iter().any(|l| l.contains("asked to panic")), "{:?}", server.logs());
}

#[test]
fn a_refused_config_is_an_error() {
    let error = TestServer::start::<LinesPlugin>(Config::from_pairs([("refuse", "yes")])).unwrap_err();
    assert!(error.contains("refuse"), "{error}");
}

#[test]
fn a_channel_describes_its_state_when_looked_at() {
    let server = TestServer::start::<LinesPlugin>(Config::default()).unwrap();
    let mut client = server.connect();
    client.write_all(b"half a li").unwrap();
    let peer = client.local_addr().unwrap();
    asyncore_testing::eventually("the half line to be buffered", || {
        let Some(channel) = server.channel_by_peer(peer) else { return false };
        let info = server.channel(channel.id).unwrap();
        info.annotations.contains(&("incoming_bytes".to_string(), "9".to_string()))
    });
    let channel = server.channel_by_peer(peer).unwrap();
    let annotations = server.channel(channel.id).unwrap().annotations;
    assert!(annotations.contains(&("terminator".to_string(), "\"\\n\"".to_string())), "{annotations:?}");
    assert!(channel.annotations.is_empty(), "listings do not ask the dispatchers");
}
