//! `chat`: a multi-user line chat room per listener, on asynchat.
//!
//! Each line a client sends (ended by `\n`; a `\r` before it is dropped)
//! goes to every other client of the same listener as `<nick> text\n`.
//! `NICK name` renames (1 to 32 of `A-Z a-z 0-9 _ -`, unique regardless of
//! case): everyone gets `* old is now name\n`; a taken name gets
//! `* nick taken\n`, to the sender only. A client starts as
//! `guest<channel id>`. The others see `* nick joined\n` and `* nick left\n`.
//!
//! Config: `max_backlog` (bytes, default 1048576): a member with this much
//! output waiting is a slow reader, and lines are skipped for it rather than
//! queued without bound (logged once per member); `max_line` (bytes, default
//! 4096): a longer line is refused with `* line too long\n`.
//!
//! The room is shared by the dispatchers of one listener, all on the poll
//! thread: an `Rc<RefCell<Room>>` made in `Plugin::listen`. Members hold
//! channel ids, never channels; fan-out is `Channel::send_to`.
//!
//! A member closed by the daemon (idle timeout, operator, drain, unload) is
//! told why (`* closing: reason\n`) and the others see it leave. The room
//! survives a reload or a rollback: the listening dispatcher exports it
//! (members and their nicks), the new generation resumes it, and every
//! member between lines moves to the new generation into the same room.

#![forbid(unsafe_code)]

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    io,
    rc::Rc,
};

use asyncore_sdk::prelude::*;

/// The listening dispatcher: seats each new connection in the room.
struct ChatServer {
    room: Rc<RefCell<Room>>,
    max_line: usize,
}

impl Dispatcher for ChatServer {
    fn export_state(&mut self, _: &Channel<'_>) -> Option<Vec<u8>> {
        Some(self.room.borrow().encode())
    }

    /// A member that an older generation handed over: same channel, same
    /// seat (the resumed room knows its nick).
    fn import_channel(&mut self, channel: &mut Channel<'_>, state: &[u8]) -> Option<Box<dyn Dispatcher>> {
        let channel_id = channel.id();
        self.room.borrow().nick(channel_id)?;
        let room = self.room.clone();
        let chat = AsyncChat::import(state, |_| Some(Member { room, channel_id, moved: false }))?;
        Some(Box::new(chat))
    }

    fn handle_accepted(&mut self, channel: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
        let channel_id = channel.id();
        let mut room = self.room.borrow_mut();
        // Departures still owed are news only to those who were there.
        room.announce_departed(channel);
        let nick = room.join(channel_id);
        log!(debug, "channel {channel_id}: {nick} joined");
        room.fan_out(channel, Some(channel_id), format!("* {nick} joined\n").as_bytes());
        drop(room);
        let member = Member { room: self.room.clone(), channel_id, moved: false };
        Some(Box::new(AsyncChat::new(member).with_terminator(b"\n").with_max_input(self.max_line)))
    }
}

/// Everyone connected to one listener.
struct Room {
    members: BTreeMap<ChannelId, Seat>,
    /// Nick in ASCII lowercase to its holder: nicks are unique regardless
    /// of case, so that `Alice` cannot pass for `alice`.
    nicks: HashMap<String, ChannelId>,
    max_backlog: usize,
    /// Nicks of members whose dispatcher was dropped without a callback
    /// (the operator closed the channel, a handler panicked) or found gone
    /// by a send. Sending needs a channel to call from, so their leave
    /// notices go out with the room's next fan-out.
    departed: Vec<String>,
}

/// One member.
struct Seat {
    nick: String,
    /// Its backlog passed `max_backlog` once; logged, and not again.
    slow: bool,
    /// Messages not sent to it because it was slow.
    skipped: u64,
}

/// Why a `NICK` was refused.
enum NickRefused {
    Invalid,
    Taken,
}

impl Room {
    fn new(max_backlog: usize) -> Room {
        Room { members: BTreeMap::new(), nicks: HashMap::new(), max_backlog, departed: Vec::new() }
    }

    /// Seats `channel_id` under its default nick and returns that nick.
    fn join(&mut self, channel_id: ChannelId) -> String {
        // Somebody may have taken `guest<id>` by `NICK` before this channel
        // existed.
        let mut nick = format!("guest{channel_id}");
        let mut n = 1;
        while self.nicks.contains_key(&nick.to_ascii_lowercase()) {
            n += 1;
            nick = format!("guest{channel_id}-{n}");
        }
        self.nicks.insert(nick.to_ascii_lowercase(), channel_id);
        self.members.insert(channel_id, Seat { nick: nick.clone(), slow: false, skipped: 0 });
        nick
    }

    /// Removes `channel_id`, if still seated, and returns its seat.
    fn leave(&mut self, channel_id: ChannelId) -> Option<Seat> {
        let seat = self.members.remove(&channel_id)?;
        self.nicks.remove(&seat.nick.to_ascii_lowercase());
        if seat.skipped > 0 {
            log!(
                debug,
                "channel {channel_id}: {} left; {} messages were skipped while it was slow",
                seat.nick,
                seat.skipped
            );
        }
        if self.members.is_empty() {
            self.departed.clear();
        }
        Some(seat)
    }

    /// Renames `channel_id` and returns its old nick.
    fn rename(&mut self, channel_id: ChannelId, nick: &str) -> Result<String, NickRefused> {
        if !is_valid_nick(nick) {
            return Err(NickRefused::Invalid);
        }
        let key = nick.to_ascii_lowercase();
        match self.nicks.get(&key) {
            Some(&holder) if holder != channel_id => return Err(NickRefused::Taken),
            _ => {}
        }
        let seat = self.members.get_mut(&channel_id).ok_or(NickRefused::Invalid)?;
        let old = std::mem::replace(&mut seat.nick, nick.to_string());
        self.nicks.remove(&old.to_ascii_lowercase());
        self.nicks.insert(key, channel_id);
        Ok(old)
    }

    fn nick(&self, channel_id: ChannelId) -> Option<&str> {
        self.members.get(&channel_id).map(|seat| seat.nick.as_str())
    }

    /// The room as text for a reload: a `member ID NICK` line per member and
    /// a `departed NICK` line per leave notice still owed. Nicks hold no
    /// spaces or newlines.
    fn encode(&self) -> Vec<u8> {
        let mut out = String::new();
        for (id, seat) in &self.members {
            out.push_str(&format!("member {} {}\n", id.0, seat.nick));
        }
        for nick in &self.departed {
            out.push_str(&format!("departed {nick}\n"));
        }
        out.into_bytes()
    }

    /// The room `encode` wrote.
    fn decode(state: &[u8], max_backlog: usize) -> Option<Room> {
        let mut room = Room::new(max_backlog);
        for line in std::str::from_utf8(state).ok()?.lines() {
            match line.split(' ').collect::<Vec<_>>().as_slice() {
                ["member", id, nick] if is_valid_nick(nick) => {
                    let id = ChannelId(id.parse().ok()?);
                    room.nicks.insert(nick.to_ascii_lowercase(), id);
                    room.members.insert(id, Seat { nick: nick.to_string(), slow: false, skipped: 0 });
                }
                ["departed", nick] => room.departed.push(nick.to_string()),
                _ => return None,
            }
        }
        Some(room)
    }

    /// Sends `message` to every member but `except`, after the leave
    /// notices still owed, through `channel` (whichever channel's callback
    /// is running).
    fn fan_out(&mut self, channel: &mut Channel<'_>, except: Option<ChannelId>, message: &[u8]) {
        self.announce_departed(channel);
        self.send_all(channel, except, message);
        self.announce_departed(channel);
    }

    /// Sends the leave notices of members that left without a callback.
    fn announce_departed(&mut self, channel: &mut Channel<'_>) {
        // Each round removes members, so this ends.
        while !self.departed.is_empty() {
            for nick in std::mem::take(&mut self.departed) {
                self.send_all(channel, None, format!("* {nick} left\n").as_bytes());
            }
        }
    }

    fn send_all(&mut self, channel: &mut Channel<'_>, except: Option<ChannelId>, message: &[u8]) {
        let mut gone = Vec::new();
        for (&member_id, seat) in &mut self.members {
            if Some(member_id) == except {
                continue;
            }
            match channel.pending_output_of(member_id) {
                None => {
                    gone.push(member_id);
                    continue;
                }
                // Skip rather than queue: a member that does not read must
                // not make the daemon hold everyone's lines for it.
                Some(pending) if pending >= self.max_backlog => {
                    seat.skipped += 1;
                    if !seat.slow {
                        seat.slow = true;
                        log!(
                            warn,
                            "channel {member_id}: {} is a slow reader ({pending} bytes waiting, max_backlog {}); \
                             skipping its messages until it catches up (logged once)",
                            seat.nick,
                            self.max_backlog,
                        );
                    }
                    continue;
                }
                Some(_) => {}
            }
            // An error means the channel closed (ids are never reused).
            if channel.send_to(member_id, message).is_err() {
                gone.push(member_id);
            }
        }
        for member_id in gone {
            if let Some(seat) = self.leave(member_id) {
                self.departed.push(seat.nick);
            }
        }
    }
}

/// 1 to 32 of `A-Z a-z 0-9 _ -`.
fn is_valid_nick(nick: &str) -> bool {
    (1..=32).contains(&nick.len()) && nick.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One connection's handler.
struct Member {
    room: Rc<RefCell<Room>>,
    channel_id: ChannelId,
    /// Handed over to a newer generation: its seat went with it, so
    /// dropping this old dispatcher is not a leave.
    moved: bool,
}

impl Member {
    /// Leaves the room and tells the others.
    fn leave(&mut self, chat: &mut Chat<'_>) {
        let mut room = self.room.borrow_mut();
        if let Some(seat) = room.leave(self.channel_id) {
            log!(debug, "channel {}: {} left", self.channel_id, seat.nick);
            room.fan_out(chat.channel(), None, format!("* {} left\n", seat.nick).as_bytes());
        }
    }
}

impl ChatHandler for Member {
    fn found_terminator(&mut self, chat: &mut Chat<'_>) {
        let message = chat.take_incoming();
        let line = message.strip_suffix(b"\r").unwrap_or(&message);
        let mut room = self.room.borrow_mut();
        if let Some(name) = line.strip_prefix(b"NICK ") {
            let name = String::from_utf8_lossy(name.trim_ascii());
            match room.rename(self.channel_id, &name) {
                Ok(old) => {
                    let notice = format!("* {old} is now {name}\n");
                    chat.push(notice.as_bytes());
                    room.fan_out(chat.channel(), Some(self.channel_id), notice.as_bytes());
                }
                Err(NickRefused::Taken) => chat.push(b"* nick taken\n"),
                Err(NickRefused::Invalid) => chat.push(b"* invalid nick: 1 to 32 of A-Z a-z 0-9 _ -\n"),
            }
        } else if !line.is_empty() {
            let Some(nick) = room.nick(self.channel_id) else { return };
            let mut said = Vec::with_capacity(nick.len() + line.len() + 4);
            said.push(b'<');
            said.extend_from_slice(nick.as_bytes());
            said.extend_from_slice(b"> ");
            said.extend_from_slice(line);
            said.push(b'\n');
            room.fan_out(chat.channel(), Some(self.channel_id), &said);
        }
    }

    /// Refuses the line and carries on: the SDK drops the rest of it, up to
    /// its `\n`.
    fn input_overflow(&mut self, chat: &mut Chat<'_>) {
        log!(debug, "channel {}: line longer than max_line {} refused", self.channel_id, chat.max_input());
        chat.push(format!("* line too long (max_line {})\n", chat.max_input()).as_bytes());
    }

    fn handle_close(&mut self, chat: &mut Chat<'_>) {
        self.leave(chat);
        chat.close_when_done();
    }

    fn handle_error(&mut self, chat: &mut Chat<'_>, error: io::Error) {
        log!(info, "channel {}: {error}", self.channel_id);
        self.leave(chat);
    }

    /// Says why to the member, tells the others it left, and lets its
    /// output go out before the channel closes.
    fn handle_shutdown(&mut self, chat: &mut Chat<'_>, reason: CloseReason) {
        chat.push(format!("* closing: {reason}\n").as_bytes());
        self.leave(chat);
        chat.close_when_done();
    }

    /// Between lines a member holds nothing but its seat, which the room
    /// carries.
    fn export_state(&mut self, _: &Channel<'_>) -> Option<Vec<u8>> {
        self.moved = true;
        Some(Vec::new())
    }
}

/// The safety net: a channel closed without a callback (by the operator,
/// after a panic) still leaves the room.
impl Drop for Member {
    fn drop(&mut self) {
        if self.moved {
            return;
        }
        // Dispatchers are dropped between callbacks, when nothing holds the
        // room; try_borrow_mut keeps a surprise from panicking in drop.
        if let Ok(mut room) = self.room.try_borrow_mut()
            && let Some(seat) = room.leave(self.channel_id)
            && !room.members.is_empty()
        {
            room.departed.push(seat.nick);
        }
    }
}

/// The `chat` plugin: export it with `export_plugin!`, or run it in tests
/// with `asyncore_testing::TestServer::start::<ChatPlugin>`.
pub struct ChatPlugin;

impl Plugin for ChatPlugin {
    const NAME: &'static str = "chat";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const RESUMES_STATE: bool = true;

    fn listen(config: &Config) -> Result<Box<dyn Dispatcher>, String> {
        ChatPlugin::serve(config, None)
    }

    fn resume(config: &Config, state: &[u8]) -> Result<Box<dyn Dispatcher>, String> {
        ChatPlugin::serve(config, Some(state))
    }
}

impl ChatPlugin {
    /// The listening dispatcher, with a new room or the one a reload
    /// carried.
    fn serve(config: &Config, state: Option<&[u8]>) -> Result<Box<dyn Dispatcher>, String> {
        let max_backlog = config.parse_or("max_backlog", 1024 * 1024)?;
        if max_backlog == 0 {
            return Err("config max_backlog: must be at least 1".to_string());
        }
        let max_line = config.parse_or("max_line", 4096)?;
        if max_line == 0 {
            return Err("config max_line: must be at least 1".to_string());
        }
        let room = match state {
            None => Room::new(max_backlog),
            Some(state) => Room::decode(state, max_backlog).ok_or("chat: the room carried by the reload is damaged")?,
        };
        Ok(Box::new(ChatServer { room: Rc::new(RefCell::new(room)), max_line }))
    }
}

export_plugin!(ChatPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    impl Room {
        fn clone_nicks(&self) -> HashMap<String, ChannelId> {
            self.nicks.clone()
        }
    }

    #[test]
    fn nicks_are_validated() {
        assert!(is_valid_nick("a"));
        assert!(is_valid_nick("Bob_the-2nd"));
        assert!(is_valid_nick(&"x".repeat(32)));
        assert!(!is_valid_nick(""));
        assert!(!is_valid_nick(&"x".repeat(33)));
        assert!(!is_valid_nick("two words"));
        assert!(!is_valid_nick("émile"));
        assert!(!is_valid_nick("<root>"));
    }

    #[test]
    fn nicks_are_unique_regardless_of_case() {
        let mut room = Room::new(1024);
        assert_eq!(room.join(ChannelId(1)), "guest1");
        assert_eq!(room.join(ChannelId(2)), "guest2");
        assert_eq!(room.rename(ChannelId(1), "alice").ok().as_deref(), Some("guest1"));
        assert!(matches!(room.rename(ChannelId(2), "ALICE"), Err(NickRefused::Taken)));
        assert!(matches!(room.rename(ChannelId(2), "bad nick"), Err(NickRefused::Invalid)));
        // A member may change the case of its own nick.
        assert_eq!(room.rename(ChannelId(1), "Alice").ok().as_deref(), Some("alice"));
        // The old nick is free again once renamed or gone.
        assert_eq!(room.rename(ChannelId(2), "guest1").ok().as_deref(), Some("guest2"));
        assert!(room.leave(ChannelId(1)).is_some());
        assert!(room.leave(ChannelId(1)).is_none());
        assert_eq!(room.rename(ChannelId(2), "alice").ok().as_deref(), Some("guest1"));
    }

    #[test]
    fn a_room_survives_encoding() {
        let mut room = Room::new(1024);
        room.join(ChannelId(3));
        room.join(ChannelId(7));
        room.rename(ChannelId(7), "Alice").ok().unwrap();
        room.departed.push("bob".into());
        let back = Room::decode(&room.encode(), 1024).unwrap();
        assert_eq!(back.nick(ChannelId(3)), Some("guest3"));
        assert_eq!(back.nick(ChannelId(7)), Some("Alice"));
        assert_eq!(back.departed, ["bob"]);
        assert!(matches!(back.clone_nicks().get("alice"), Some(&ChannelId(7))));
        assert!(Room::decode(b"member x y", 1024).is_none());
    }

    #[test]
    fn a_taken_default_nick_gets_a_suffix() {
        let mut room = Room::new(1024);
        room.join(ChannelId(1));
        room.rename(ChannelId(1), "guest2").ok().unwrap();
        assert_eq!(room.join(ChannelId(2)), "guest2-2");
    }
}
