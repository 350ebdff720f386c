//! The chat plugin: one room per listener shared by its channels, with
//! nicks, join and leave notices, fan-out to everyone but the sender, and a
//! member that does not read skipped rather than buffered for.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
};

use asyncore_proto::v1;
use asyncore_tests::{Client, Daemon, InProcessDaemon, Options, eventually};

use crate::runtime;

fn options() -> Options {
    Options { plugins: vec!["asyncore_plugin_chat"], ..Options::default() }
}

/// One chat client: a line reader and a writer over one connection.
struct Member {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Member {
    fn connect(address: SocketAddr) -> Member {
        // With read and write timeouts: a missing line fails the test
        // instead of hanging it.
        let stream = asyncore_tests::connect(address);
        Member { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    fn say(&mut self, line: &str) {
        self.writer.write_all(line.as_bytes()).unwrap();
    }

    fn next_line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a line from the room");
        line
    }

    /// The next line must be `expected`: this also proves nothing else came
    /// before it.
    #[track_caller]
    fn expect(&mut self, expected: &str) {
        assert_eq!(self.next_line(), expected);
    }
}

/// The daemon's channel id of each member, found by address once all are
/// accepted.
fn channel_ids(
    runtime: &tokio::runtime::Runtime,
    client: &mut Client,
    listener_id: u64,
    members: &[&Member],
) -> Vec<u64> {
    members
        .iter()
        .map(|m| runtime.block_on(client.channel_by_peer(listener_id, m.writer.local_addr().unwrap())).id)
        .collect()
}

#[test]
fn three_clients_chat_with_nicks_joins_and_leaves() {
    let runtime = runtime();
    let daemon = runtime.block_on(InProcessDaemon::start_with(options()));
    let mut client = runtime.block_on(daemon.client());
    let (listener_id, address) = runtime.block_on(client.start_listener("chat", &[]));
    // Accepted in connection order, so each sees the joins of the later
    // ones only.
    let mut a = Member::connect(address);
    let mut b = Member::connect(address);
    let mut c = Member::connect(address);
    let ids = channel_ids(&runtime, &mut client, listener_id, &[&a, &b, &c]);
    let (guest_a, guest_b, guest_c) =
        (format!("guest{}", ids[0]), format!("guest{}", ids[1]), format!("guest{}", ids[2]));
    a.expect(&format!("* {guest_b} joined\n"));
    a.expect(&format!("* {guest_c} joined\n"));
    b.expect(&format!("* {guest_c} joined\n"));

    // A rename is announced to everyone, the renamer included.
    a.say("NICK alice\n");
    for member in [&mut a, &mut b, &mut c] {
        member.expect(&format!("* {guest_a} is now alice\n"));
    }

    // Refusals go to the sender only: the others' next line is the rename
    // that follows.
    b.say("NICK ALICE\r\n");
    b.expect("* nick taken\n");
    b.say("NICK two words\n");
    b.expect("* invalid nick: 1 to 32 of A-Z a-z 0-9 _ -\n");
    b.say("NICK bob\r\n");
    for member in [&mut a, &mut b, &mut c] {
        member.expect(&format!("* {guest_b} is now bob\n"));
    }

    // A line reaches exactly the two others, with the sender's nick; `\r\n`
    // is taken as `\n`. Empty lines are not sent.
    a.say("\r\nhello, world\r\n");
    b.expect("<alice> hello, world\n");
    c.expect("<alice> hello, world\n");
    c.say("hi alice\n");
    // Not its own line first: the sender is skipped.
    a.expect(&format!("<{guest_c}> hi alice\n"));
    b.expect(&format!("<{guest_c}> hi alice\n"));
    a.say("bye\n");
    b.expect("<alice> bye\n");
    c.expect("<alice> bye\n");

    drop(c);
    a.expect(&format!("* {guest_c} left\n"));
    b.expect(&format!("* {guest_c} left\n"));

    // A channel closed by the operator is told why, and the others that it
    // left, at once (`handle_shutdown`).
    runtime.block_on(client.channels.close_channel(v1::CloseChannelRequest { id: ids[0] })).unwrap();
    assert_eq!(a.next_line(), "* closing: closed by the control plane\n");
    assert_eq!(a.next_line(), "", "then the closed channel reads EOF");
    b.expect("* alice left\n");
    // The nick of a member that left is free again.
    b.say("NICK alice\n");
    b.expect("* bob is now alice\n");
}

#[test]
fn a_member_that_does_not_read_is_skipped_not_buffered_for() {
    let max_backlog = 64 * 1024;
    // The binary: the slow reader is seen in its log.
    let daemon = Daemon::start_with(options());
    let runtime = runtime();
    let mut client = runtime.block_on(daemon.client());
    let (listener_id, address) = runtime.block_on(client.start_listener("chat", &[("max_backlog", "65536")]));
    let mut flooder = Member::connect(address);
    let sleeper = Member::connect(address);
    let ids = channel_ids(&runtime, &mut client, listener_id, &[&flooder, &sleeper]);
    flooder.expect(&format!("* guest{} joined\n", ids[1]));

    // 32 MiB of lines: more than the sleeper's socket buffers hold, so the
    // rest either queues in the daemon or is skipped.
    let line = format!("{}\n", "z".repeat(1023));
    let chunk = line.repeat(1024);
    for _ in 0..32 {
        flooder.say(&chunk);
    }
    // Its own rename comes back only after every line before it was fanned
    // out.
    flooder.say("NICK flooder\n");
    flooder.expect(&format!("* guest{} is now flooder\n", ids[0]));

    let sleeper_channel = runtime
        .block_on(client.channels.get_channel(v1::GetChannelRequest { id: ids[1] }))
        .expect("the sleeper is still connected")
        .into_inner();
    assert!(
        sleeper_channel.pending_output <= (max_backlog + line.len()) as u64,
        "{} bytes queued for a member that does not read, max_backlog {max_backlog}",
        sleeper_channel.pending_output
    );
    let needle = format!("channel {}: guest{} is a slow reader", ids[1], ids[1]);
    runtime.block_on(eventually!(async || daemon.log().contains(&needle), "{needle:?} in the log:\n{}", daemon.log()));
    assert_eq!(daemon.log().matches(&needle).count(), 1, "the slow reader is logged once");
    drop(sleeper);
}
