//! The chat plugin on the real engine: the members of one listener share a
//! room, a line fans out to every other member (`send_to` from the
//! sender's callback into the others' channels), nicks and notices work,
//! and a member closed by the operator leaves the room.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::Duration,
};

use asyncore_plugin_chat::ChatPlugin;
use asyncore_sdk::Config;
use asyncore_testing::{TestServer, eventually};

/// One chat client: a line reader and a writer over one connection.
struct Member {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Member {
    fn connect(server: &TestServer) -> Member {
        let stream = TcpStream::connect(server.addr()).unwrap();
        // A missing line fails the test instead of hanging it.
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Member { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    fn say(&mut self, line: &str) {
        self.writer.write_all(line.as_bytes()).unwrap();
    }

    #[track_caller]
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

    /// Takes `nick` and waits for the confirmation, which also proves the
    /// member is seated before anyone else joins.
    #[track_caller]
    fn nick(&mut self, nick: &str) -> String {
        self.say(&format!("NICK {nick}\n"));
        let line = self.next_line();
        let old = line.strip_prefix("* ").and_then(|rest| rest.strip_suffix(&format!(" is now {nick}\n")));
        old.unwrap_or_else(|| panic!("unexpected answer to NICK: {line:?}")).to_string()
    }
}

#[test]
fn a_line_fans_out_to_the_other_member_only() {
    let server = TestServer::start::<ChatPlugin>(Config::default()).unwrap();
    let mut alice = Member::connect(&server);
    alice.nick("alice");
    let mut bob = Member::connect(&server);
    // The newcomer's default nick is `guest<channel id>`.
    let joined = alice.next_line();
    let guest = joined.strip_prefix("* ").and_then(|rest| rest.strip_suffix(" joined\n")).unwrap();
    assert!(guest.starts_with("guest"), "{joined:?}");
    assert_eq!(bob.nick("bob"), guest);
    alice.expect(&format!("* {guest} is now bob\n"));

    bob.say("hi alice\r\n");
    alice.expect("<bob> hi alice\n");
    alice.say("hello bob\n");
    bob.expect("<alice> hello bob\n");
    // Empty lines are ignored: the next line proves nothing came for them.
    alice.say("\n\r\nagain\n");
    bob.expect("<alice> again\n");
    // The sender never hears itself: its next line is the other's.
    bob.say("bye\n");
    alice.expect("<bob> bye\n");
    alice.say("ok\n");
    bob.expect("<alice> ok\n");
    assert_eq!(server.n_channels(), 2);
}

#[test]
fn nicks_are_unique_regardless_of_case_and_validated() {
    let server = TestServer::start::<ChatPlugin>(Config::default()).unwrap();
    let mut alice = Member::connect(&server);
    alice.nick("alice");
    let mut other = Member::connect(&server);
    alice.next_line();
    other.say("NICK ALICE\n");
    other.expect("* nick taken\n");
    other.say("NICK two words\n");
    other.expect("* invalid nick: 1 to 32 of A-Z a-z 0-9 _ -\n");
    // Refusals go to the sender only: alice's next line is a real message.
    other.say("still a guest\n");
    let line = alice.next_line();
    assert!(line.starts_with("<guest") && line.ends_with("> still a guest\n"), "{line:?}");
}

#[test]
fn members_that_leave_are_announced() {
    let server = TestServer::start::<ChatPlugin>(Config::default()).unwrap();
    let mut alice = Member::connect(&server);
    alice.nick("alice");
    let mut bob = Member::connect(&server);
    alice.next_line();
    bob.nick("bob");
    alice.next_line();
    drop(bob);
    alice.expect("* bob left\n");
}

#[test]
fn a_member_closed_by_the_operator_leaves_the_room() {
    let server = TestServer::start::<ChatPlugin>(Config::default()).unwrap();
    let mut alice = Member::connect(&server);
    alice.nick("alice");
    let mut carol = Member::connect(&server);
    let joined = alice.next_line();
    let channel_id: u64 = joined
        .strip_prefix("* guest")
        .and_then(|rest| rest.strip_suffix(" joined\n"))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("a default nick is guest<channel id>: {joined:?}"));
    carol.nick("carol");
    alice.expect(&format!("* guest{channel_id} is now carol\n"));

    server.close_channel(channel_id).unwrap();
    // The member is told why, the others that it left, at once.
    let mut rest = Vec::new();
    carol.reader.read_to_end(&mut rest).expect("the closed member reads EOF");
    assert_eq!(String::from_utf8_lossy(&rest), "* closing: closed by the control plane\n");
    alice.expect("* carol left\n");
    drop(carol);
    eventually("the closed channel is gone", || server.n_channels() == 1);
    let mut bob = Member::connect(&server);
    let joined = alice.next_line();
    assert!(joined.starts_with("* guest") && joined.ends_with(" joined\n"), "{joined:?}");
    bob.say("hello\n");
    let line = alice.next_line();
    assert!(line.ends_with("> hello\n"), "{line:?}");
}
