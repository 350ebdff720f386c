//! Terminator framing: asynchat's `handle_read` loop without the socket.
//!
//! [`Framer`] cuts a byte stream into messages, whatever sizes the reads
//! come in, and reports them through a [`FrameSink`]. It is pure logic (no
//! socket, no host), so [`AsyncChat`](crate::AsyncChat) uses it for every
//! read and the tests below can check it against every way of splitting a
//! stream.

use std::{fmt, mem};

/// Where a message ends: the argument of asynchat's `set_terminator`.
///
/// Set it with [`Chat::set_terminator`](crate::Chat::set_terminator) (or
/// [`Framer::set_terminator`]), which also take `&[u8]`, `&str`, byte
/// string literals and `usize` counts through `Into<Terminator>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Terminator {
    /// The message ends with these bytes, like `b"\r\n"`. The terminator is
    /// consumed: it is not passed to `collect_incoming_data`. It is found
    /// even when it arrives split across reads, down to one byte per read.
    ///
    /// Must not be empty: `set_terminator` panics on an empty one.
    Bytes(Vec<u8>),
    /// The message is the next `n` bytes, counted across reads. While the
    /// count runs, `get_terminator` answers the bytes still expected. When it
    /// completes the terminator becomes `Count(0)` before `found_terminator`
    /// runs, as asynchat sets it to `0`; `Count(0)` collects everything, like
    /// [`Terminator::None`], until the terminator is set again.
    Count(usize),
    /// No terminator: all input is collected and `found_terminator` is never
    /// called. The default.
    #[default]
    None,
}

impl From<Vec<u8>> for Terminator {
    fn from(bytes: Vec<u8>) -> Terminator {
        Terminator::Bytes(bytes)
    }
}

impl From<&[u8]> for Terminator {
    fn from(bytes: &[u8]) -> Terminator {
        Terminator::Bytes(bytes.to_vec())
    }
}

impl<const N: usize> From<&[u8; N]> for Terminator {
    fn from(bytes: &[u8; N]) -> Terminator {
        Terminator::Bytes(bytes.to_vec())
    }
}

impl From<&str> for Terminator {
    fn from(text: &str) -> Terminator {
        Terminator::Bytes(text.as_bytes().to_vec())
    }
}

impl From<usize> for Terminator {
    fn from(count: usize) -> Terminator {
        Terminator::Count(count)
    }
}

/// For log messages: `"\r\n"` (escaped like a byte string), `count 12`,
/// `none`.
impl fmt::Display for Terminator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Terminator::Bytes(bytes) => write!(f, "\"{}\"", bytes.escape_ascii()),
            Terminator::Count(n) => write!(f, "count {n}"),
            Terminator::None => f.write_str("none"),
        }
    }
}

/// What a [`Framer`] reports to: asynchat's `collect_incoming_data` and
/// `found_terminator`, and the input limit's hook.
///
/// Each call gets the framer back so that it can change the terminator or
/// the limit; the framer re-reads both after every call. That is how a
/// header line switches to a counted body (HTTP), with the body framed from
/// the very next byte of the same read.
pub trait FrameSink {
    /// Called with data of the current message, in order. A message can
    /// arrive in any number of calls (one per read, or fewer); never with
    /// empty data.
    fn collect(&mut self, framer: &mut Framer, data: &[u8]);

    /// Called when the current message ends: its terminator was found (and
    /// consumed), or its count completed.
    fn found(&mut self, framer: &mut Framer);

    /// Called once when the current message grows past
    /// [`max_input`](Framer::max_input) bytes. Exactly `max_input` bytes of
    /// it were collected before this call. The framer then drops the rest of
    /// the message: input up to and including the next terminator (for a
    /// count, the rest of the count; for [`Terminator::None`] and `Count(0)`,
    /// everything), without calling [`found`](FrameSink::found) for it, and
    /// frames what follows as usual.
    fn overflow(&mut self, framer: &mut Framer);

    /// Asked after each of the calls above: answering `true` makes
    /// [`Framer::feed`] return at once, leaving the rest of its input
    /// unread. Use it when the sink is done with the stream (the channel is
    /// closing, or the protocol switches to raw bytes).
    ///
    /// The default answers `false`.
    fn stop(&self) -> bool {
        false
    }
}

/// Cuts a byte stream into messages at a [`Terminator`], exactly like
/// asynchat's `handle_read` loop, with a bound on message size.
///
/// Feed it reads of any size with [`feed`](Framer::feed); it calls
/// [`FrameSink::collect`] with message data and [`FrameSink::found`] at
/// each terminator. How the stream is split into reads changes only how
/// the data of a message is cut into `collect` calls, never the messages
/// or where they end. Between reads it holds back only the bytes that might
/// be the start of a split terminator (fewer than the terminator's length).
///
/// Memory stays bounded: at most [`max_input`](Framer::max_input) bytes of
/// one message are collected; past that, [`FrameSink::overflow`] is called
/// and the rest of the message is dropped.
#[derive(Debug)]
pub struct Framer {
    terminator: Terminator,
    /// Input not yet framed: the bytes that might start a terminator split
    /// across reads, or, after the terminator was changed between reads,
    /// bytes still to be framed under the new one.
    held: Vec<u8>,
    /// Bytes collected for the current message.
    collected: usize,
    max_input: usize,
    /// Dropping the rest of a message that overflowed.
    discarding: bool,
    /// Bumped by `clear`, so that a `feed` running when a callback clears
    /// the framer knows its input was dropped.
    epoch: u64,
}

impl Default for Framer {
    fn default() -> Framer {
        Framer::new()
    }
}

impl Framer {
    /// The default of [`max_input`](Framer::max_input): 64 KiB.
    pub const DEFAULT_MAX_INPUT: usize = 64 * 1024;

    /// A framer with [`Terminator::None`] and the default input limit.
    pub fn new() -> Framer {
        Framer {
            terminator: Terminator::None,
            held: Vec::new(),
            collected: 0,
            max_input: Framer::DEFAULT_MAX_INPUT,
            discarding: false,
            epoch: 0,
        }
    }

    /// Sets where messages end, from the next byte framed on: inside
    /// [`FrameSink::found`] that is the byte right after the terminator just
    /// found. Bytes received earlier and still held back are framed under
    /// the new terminator by the next [`feed`](Framer::feed) or
    /// [`finish`](Framer::finish).
    ///
    /// # Panics
    ///
    /// If `terminator` is an empty [`Terminator::Bytes`]: no input could
    /// ever get past it. Use [`Terminator::None`] to collect everything.
    pub fn set_terminator(&mut self, terminator: impl Into<Terminator>) {
        let terminator = terminator.into();
        assert!(
            !matches!(&terminator, Terminator::Bytes(bytes) if bytes.is_empty()),
            "asyncore-sdk: Terminator::Bytes must not be empty; use Terminator::None to collect everything"
        );
        self.terminator = terminator;
    }

    /// The current terminator. While a [`Terminator::Count`] runs, it
    /// answers the bytes still expected.
    pub fn get_terminator(&self) -> &Terminator {
        &self.terminator
    }

    /// Sets the most bytes of one message collected before
    /// [`FrameSink::overflow`] is called. It counts message data only, not
    /// terminators, and restarts at each found terminator. `usize::MAX`
    /// disables the limit, for a sink that does not keep what it collects
    /// (one that streams a large counted body to disk, say).
    pub fn set_max_input(&mut self, max_input: usize) {
        self.max_input = max_input;
    }

    /// The most bytes of one message collected before
    /// [`FrameSink::overflow`]; [`Framer::DEFAULT_MAX_INPUT`] unless set.
    pub fn max_input(&self) -> usize {
        self.max_input
    }

    /// Bytes received and not yet passed on: a possible start of a
    /// terminator waiting for the next read. Always fewer than the
    /// terminator's length after a [`feed`](Framer::feed) that ran to the
    /// end.
    pub fn held_back(&self) -> usize {
        self.held.len()
    }

    /// Whether the rest of a message that overflowed is being dropped.
    pub fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// Whether the framer is between messages: nothing of a message was
    /// collected yet, nothing is held back and nothing is being dropped. A
    /// channel can move to another generation (or process) only then.
    pub fn is_between_messages(&self) -> bool {
        self.collected == 0 && self.held.is_empty() && !self.discarding
    }

    /// Drops all input not yet framed: the held-back bytes and, when called
    /// from a callback of a running [`feed`](Framer::feed), the rest of that
    /// feed's input. The count towards [`max_input`](Framer::max_input)
    /// restarts. The terminator stays (a running count keeps its remaining
    /// bytes, as in asynchat), and so does the dropping of an overflowed
    /// message, which still ends at its terminator.
    pub fn clear(&mut self) {
        self.held.clear();
        self.collected = 0;
        self.epoch = self.epoch.wrapping_add(1);
    }

    /// Frames `input`, the next bytes of the stream, calling `sink` for
    /// each piece of message data and each end of message.
    ///
    /// Returns how many bytes of `input` were consumed: all of them, unless
    /// [`FrameSink::stop`] answered `true`. Consumed bytes were collected,
    /// dropped, held back, or were (part of) a terminator; when the sink
    /// stops inside `collect`, a terminator right after that data counts as
    /// consumed though `found` was not called.
    pub fn feed(&mut self, input: &[u8], sink: &mut impl FrameSink) -> usize {
        let epoch = self.epoch;
        let mut rest = input;
        loop {
            if self.held.is_empty() && rest.is_empty() {
                return input.len();
            }
            let next = if self.held.is_empty() {
                self.step_input(&mut rest, sink, epoch)
            } else {
                self.step_held(&mut rest, sink, epoch)
            };
            if self.epoch != epoch {
                // A callback cleared the framer: the rest of the input went
                // with the rest of its buffers.
                return input.len();
            }
            match next {
                Next::Step => {}
                Next::Wait => return input.len(),
                Next::Stop => return input.len() - rest.len(),
            }
        }
    }

    /// The stream ended (the peer closed): frames what is held back under
    /// the current terminator, then passes what remains of it on as data of
    /// the last, unterminated message. After this every byte fed was
    /// collected, dropped or consumed as a terminator. (asynchat leaves
    /// those bytes in its buffer.)
    pub fn finish(&mut self, sink: &mut impl FrameSink) {
        let epoch = self.epoch;
        self.feed(&[], sink);
        if self.epoch == epoch && !self.held.is_empty() && !sink.stop() {
            let n = self.held.len();
            self.emit_held(n, 0, sink, epoch);
        }
    }

    /// One step with nothing held back: frames the front of `rest`.
    fn step_input(&mut self, rest: &mut &[u8], sink: &mut impl FrameSink, epoch: u64) -> Next {
        match &self.terminator {
            Terminator::None | Terminator::Count(0) => {
                let data = mem::take(rest);
                Next::or_stop(self.emit(data, sink, epoch))
            }
            &Terminator::Count(n) => {
                let k = n.min(rest.len());
                let (data, tail) = rest.split_at(k);
                *rest = tail;
                // Counted down before the call, so that a terminator set
                // inside collect is not overwritten afterwards.
                self.terminator = Terminator::Count(n - k);
                Next::or_stop(self.emit(data, sink, epoch) && (k < n || self.end_message(sink, epoch)))
            }
            Terminator::Bytes(terminator) => match find(rest, terminator) {
                Some(at) => {
                    let end = at + terminator.len();
                    let data = &rest[..at];
                    *rest = &rest[end..];
                    Next::or_stop(self.emit(data, sink, epoch) && self.end_message(sink, epoch))
                }
                None => {
                    let keep = prefix_at_end(rest, terminator);
                    let (data, tail) = rest.split_at(rest.len() - keep);
                    *rest = tail;
                    if !self.emit(data, sink, epoch) {
                        return Next::Stop;
                    }
                    self.held.extend_from_slice(tail);
                    *rest = &[];
                    Next::Wait
                }
            },
        }
    }

    /// One step with bytes held back: frames them, with as much of `rest`
    /// as a terminator starting in them could reach into.
    fn step_held(&mut self, rest: &mut &[u8], sink: &mut impl FrameSink, epoch: u64) -> Next {
        match &self.terminator {
            Terminator::None | Terminator::Count(0) => {
                let n = self.held.len();
                Next::or_stop(self.emit_held(n, 0, sink, epoch))
            }
            &Terminator::Count(n) => {
                let k = n.min(self.held.len());
                self.terminator = Terminator::Count(n - k);
                Next::or_stop(self.emit_held(k, 0, sink, epoch) && (k < n || self.end_message(sink, epoch)))
            }
            Terminator::Bytes(terminator) => {
                let n_held = self.held.len();
                // A terminator that starts in the held bytes ends at most
                // len - 1 bytes into the input.
                let reach = rest.len().min(terminator.len() - 1);
                self.held.extend_from_slice(&rest[..reach]);
                if let Some(at) = find(&self.held, terminator) {
                    // Only the input up to the terminator's end is used;
                    // the rest of the window goes back to it.
                    let skip = terminator.len();
                    let used = (at + skip).saturating_sub(n_held);
                    self.held.truncate(n_held + used);
                    *rest = &rest[used..];
                    Next::or_stop(self.emit_held(at, skip, sink, epoch) && self.end_message(sink, epoch))
                } else if reach == rest.len() {
                    // All the input is in the window: pass it on but for
                    // what may still start a terminator, and wait for more.
                    *rest = &[];
                    let keep = prefix_at_end(&self.held, terminator);
                    let n = self.held.len() - keep;
                    if self.emit_held(n, 0, sink, epoch) { Next::Wait } else { Next::Stop }
                } else {
                    // No terminator starts in the held bytes, so they are
                    // data; the input borrowed for the window goes back.
                    self.held.truncate(n_held);
                    Next::or_stop(self.emit_held(n_held, 0, sink, epoch))
                }
            }
        }
    }

    /// Passes `held[..n]` on as data and drops `held[..n + skip]`.
    fn emit_held(&mut self, n: usize, skip: usize, sink: &mut impl FrameSink, epoch: u64) -> bool {
        // Moved out so that the sink can have the framer while it reads
        // them; `take` leaves an empty Vec, which does not allocate.
        let mut held = mem::take(&mut self.held);
        let go_on = self.emit(&held[..n], sink, epoch);
        if self.epoch == epoch {
            held.drain(..n + skip);
        } else {
            held.clear();
        }
        // Back in place with its allocation. Only a callback feeding the
        // framer from inside could have held bytes meanwhile; they came
        // later, so they go after.
        held.append(&mut self.held);
        self.held = held;
        go_on
    }

    /// Passes message data on, within the input limit. Answers whether to
    /// go on.
    fn emit(&mut self, data: &[u8], sink: &mut impl FrameSink, epoch: u64) -> bool {
        if data.is_empty() || self.discarding {
            return true;
        }
        let room = self.max_input.saturating_sub(self.collected);
        if data.len() <= room {
            self.collected += data.len();
            sink.collect(self, data);
            return self.go_on(sink, epoch);
        }
        if room > 0 {
            self.collected += room;
            sink.collect(self, &data[..room]);
            if !self.go_on(sink, epoch) {
                return false;
            }
        }
        self.discarding = true;
        sink.overflow(self);
        self.go_on(sink, epoch)
    }

    /// The current message ended: `found`, unless it overflowed and was
    /// being dropped.
    fn end_message(&mut self, sink: &mut impl FrameSink, epoch: u64) -> bool {
        self.collected = 0;
        if mem::take(&mut self.discarding) {
            return true;
        }
        sink.found(self);
        self.go_on(sink, epoch)
    }

    fn go_on(&self, sink: &impl FrameSink, epoch: u64) -> bool {
        self.epoch == epoch && !sink.stop()
    }
}

/// What a framing step leaves `feed` to do.
enum Next {
    /// Take the next step.
    Step,
    /// Return: the input is used up, all but a possible terminator start.
    Wait,
    /// Return: the sink asked to stop.
    Stop,
}

impl Next {
    fn or_stop(go_on: bool) -> Next {
        if go_on { Next::Step } else { Next::Stop }
    }
}

/// Index of the first occurrence of `needle` (not empty) in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if let [byte] = *needle {
        // A line terminator: one scan, no comparison of what follows.
        return haystack.iter().position(|&b| b == byte);
    }
    let last_start = haystack.len().checked_sub(needle.len())?;
    let mut start = 0;
    while start <= last_start {
        let at = start + haystack[start..=last_start].iter().position(|&b| b == needle[0])?;
        if haystack[at..].starts_with(needle) {
            return Some(at);
        }
        start = at + 1;
    }
    None
}

/// Length of the longest proper prefix of `needle` that `haystack` ends
/// with: asynchat's `find_prefix_at_end`.
fn prefix_at_end(haystack: &[u8], needle: &[u8]) -> usize {
    let mut len = (needle.len() - 1).min(haystack.len());
    while len > 0 && !haystack.ends_with(&needle[..len]) {
        len -= 1;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a sink saw, with consecutive data merged: how a message is cut
    /// into `collect` calls depends on the reads and is not compared.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Event {
        Data(Vec<u8>),
        Found,
        Overflow,
    }

    /// How the terminator changes after each found terminator.
    #[derive(Debug, Clone)]
    enum Script {
        /// Never changes.
        Keep,
        /// After the k-th message, the k-th of these (cycling).
        Cycle(Vec<Terminator>),
        /// HTTP-like: a line holding a number n > 0 is followed by an n-byte
        /// body, then lines again.
        Http,
    }

    impl Script {
        fn next(&self, n_found: usize, message: &[u8], current: &Terminator) -> Option<Terminator> {
            match self {
                Script::Keep => None,
                Script::Cycle(terminators) => Some(terminators[(n_found - 1) % terminators.len()].clone()),
                Script::Http => match current {
                    Terminator::Bytes(_) => {
                        let n: usize = std::str::from_utf8(message).ok()?.parse().ok()?;
                        (n > 0).then_some(Terminator::Count(n))
                    }
                    _ => Some(Terminator::from(b"\r\n")),
                },
            }
        }
    }

    #[derive(Default)]
    struct Log {
        events: Vec<Event>,
        message: Vec<u8>,
        n_found: usize,
    }

    impl Log {
        fn data(&mut self, data: &[u8]) {
            if data.is_empty() {
                return;
            }
            self.message.extend_from_slice(data);
            match self.events.last_mut() {
                Some(Event::Data(last)) => last.extend_from_slice(data),
                _ => self.events.push(Event::Data(data.to_vec())),
            }
        }

        /// Records a found terminator; returns the message it ended.
        fn found(&mut self) -> Vec<u8> {
            self.events.push(Event::Found);
            self.n_found += 1;
            mem::take(&mut self.message)
        }
    }

    struct Recorder {
        log: Log,
        script: Script,
    }

    impl Recorder {
        fn new(script: Script) -> Recorder {
            Recorder { log: Log::default(), script }
        }
    }

    impl FrameSink for Recorder {
        fn collect(&mut self, _framer: &mut Framer, data: &[u8]) {
            assert!(!data.is_empty(), "collect called with empty data");
            self.log.data(data);
        }

        fn found(&mut self, framer: &mut Framer) {
            let message = self.log.found();
            if let Some(next) = self.script.next(self.log.n_found, &message, framer.get_terminator()) {
                framer.set_terminator(next);
            }
        }

        fn overflow(&mut self, _framer: &mut Framer) {
            self.log.events.push(Event::Overflow);
            self.log.message.clear();
        }
    }

    /// Runs our framer over `reads`, then finishes the stream.
    fn frame(reads: &[&[u8]], start: &Terminator, script: &Script, max_input: usize) -> Vec<Event> {
        let mut framer = Framer::new();
        framer.set_terminator(start.clone());
        framer.set_max_input(max_input);
        let mut sink = Recorder::new(script.clone());
        for read in reads {
            assert_eq!(framer.feed(read, &mut sink), read.len());
            if let Terminator::Bytes(terminator) = framer.get_terminator() {
                assert!(framer.held_back() < terminator.len());
            }
        }
        framer.finish(&mut sink);
        assert_eq!(framer.held_back(), 0);
        sink.log.events
    }

    /// A literal port of Python's `asynchat.async_chat.handle_read` (3.11),
    /// buffer concatenation and all, as the reference. What remains in its
    /// buffer at the end is reported as data, like `Framer::finish`.
    fn asynchat(reads: &[&[u8]], start: &Terminator, script: &Script) -> Vec<Event> {
        fn naive_find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
            haystack.windows(needle.len()).position(|w| w == needle)
        }
        fn find_prefix_at_end(haystack: &[u8], needle: &[u8]) -> usize {
            let mut l = needle.len() - 1;
            while l > 0 && !haystack.ends_with(&needle[..l]) {
                l -= 1;
            }
            l
        }
        let mut log = Log::default();
        let mut terminator = start.clone();
        let mut buffer: Vec<u8> = Vec::new();
        let found = |log: &mut Log, terminator: &mut Terminator| {
            let message = log.found();
            if let Some(next) = script.next(log.n_found, &message, terminator) {
                *terminator = next;
            }
        };
        for read in reads {
            buffer.extend_from_slice(read);
            while !buffer.is_empty() {
                let lb = buffer.len();
                match terminator.clone() {
                    Terminator::None | Terminator::Count(0) => {
                        log.data(&buffer);
                        buffer.clear();
                    }
                    Terminator::Count(n) => {
                        if lb < n {
                            log.data(&buffer);
                            buffer.clear();
                            terminator = Terminator::Count(n - lb);
                        } else {
                            log.data(&buffer[..n]);
                            buffer.drain(..n);
                            terminator = Terminator::Count(0);
                            found(&mut log, &mut terminator);
                        }
                    }
                    Terminator::Bytes(t) => {
                        if let Some(index) = naive_find(&buffer, &t) {
                            log.data(&buffer[..index]);
                            buffer.drain(..index + t.len());
                            found(&mut log, &mut terminator);
                        } else {
                            let index = find_prefix_at_end(&buffer, &t);
                            if index > 0 {
                                if index != lb {
                                    log.data(&buffer[..lb - index]);
                                    buffer.drain(..lb - index);
                                }
                                break;
                            }
                            log.data(&buffer);
                            buffer.clear();
                        }
                    }
                }
            }
        }
        log.data(&buffer);
        log.events
    }

    /// xorshift64*: a small, seedable PRNG, enough to generate test input.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// Uniform enough in `0..n`, for `n > 0`.
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn bytes_from(&mut self, alphabet: &[u8], len: usize) -> Vec<u8> {
            (0..len).map(|_| alphabet[self.below(alphabet.len())]).collect()
        }
    }

    /// Cuts `stream` at the positions where `cuts` has a bit set: bit i
    /// cuts between byte i and byte i + 1.
    fn split_at_bits(stream: &[u8], cuts: u64) -> Vec<&[u8]> {
        let mut reads = Vec::new();
        let mut start = 0;
        for i in 0..stream.len().saturating_sub(1) {
            if cuts & (1 << i) != 0 {
                reads.push(&stream[start..=i]);
                start = i + 1;
            }
        }
        reads.push(&stream[start..]);
        reads
    }

    fn random_split<'s>(rng: &mut Rng, stream: &'s [u8]) -> Vec<&'s [u8]> {
        let mut reads = Vec::new();
        let mut rest = stream;
        // Mostly short reads, where split terminators happen, some long.
        while !rest.is_empty() {
            let max = if rng.below(4) == 0 { rest.len() } else { rest.len().min(8) };
            let (read, tail) = rest.split_at(1 + rng.below(max));
            reads.push(read);
            rest = tail;
        }
        reads
    }

    /// The property: one big read, reads of one byte, every split of short
    /// streams and many random splits all give the same messages; and with
    /// no limit they are asynchat's.
    #[track_caller]
    fn check_splits(rng: &mut Rng, stream: &[u8], start: &Terminator, script: &Script, max_input: usize) -> Vec<Event> {
        let whole = frame(&[stream], start, script, max_input);
        if max_input == usize::MAX {
            assert_eq!(whole, asynchat(&[stream], start, script), "asynchat differs on {stream:?}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frame(&bytes, start, script, max_input), whole, "one-byte reads of {stream:?}");
        if stream.len() <= 11 {
            for cuts in 0..1u64 << stream.len().saturating_sub(1) {
                let reads = split_at_bits(stream, cuts);
                assert_eq!(frame(&reads, start, script, max_input), whole, "reads {reads:?}");
            }
        } else {
            for _ in 0..40 {
                let reads = random_split(rng, stream);
                assert_eq!(frame(&reads, start, script, max_input), whole, "reads {reads:?}");
                if max_input == usize::MAX {
                    assert_eq!(asynchat(&reads, start, script), whole, "asynchat on reads {reads:?}");
                }
            }
        }
        whole
    }

    fn data(bytes: &[u8]) -> Event {
        Event::Data(bytes.to_vec())
    }

    #[test]
    fn byte_terminators_are_found_across_every_split() {
        let cases: [(&[u8], &[u8]); 5] =
            [(b"\n", b"\nab"), (b"\r\n", b"\r\nx"), (b"\r\n\r\n", b"\r\na"), (b"aab", b"ab"), (b"abab", b"abc")];
        let mut rng = Rng::new(1);
        for (terminator, alphabet) in cases {
            let start = Terminator::from(terminator);
            for _ in 0..150 {
                let len = rng.below(40);
                let stream = rng.bytes_from(alphabet, len);
                check_splits(&mut rng, &stream, &start, &Script::Keep, usize::MAX);
            }
        }
    }

    #[test]
    fn self_overlapping_terminators_end_at_their_first_occurrence() {
        let mut rng = Rng::new(2);
        let start = Terminator::from(b"aab");
        let events = check_splits(&mut rng, b"aaab", &start, &Script::Keep, usize::MAX);
        assert_eq!(events, [data(b"a"), Event::Found]);
        let start = Terminator::from(b"\r\n\r\n");
        let events = check_splits(&mut rng, b"a\r\n\r\r\n\r\n\r\nb", &start, &Script::Keep, usize::MAX);
        assert_eq!(events, [data(b"a\r\n\r"), Event::Found, data(b"\r\nb")]);
    }

    #[test]
    fn counts_are_counted_across_every_split() {
        let mut rng = Rng::new(3);
        for _ in 0..200 {
            let len = rng.below(40);
            let stream = rng.bytes_from(b"ab\r\n", len);
            let start = Terminator::Count(1 + rng.below(12));
            let script = Script::Cycle(vec![Terminator::Count(1 + rng.below(12)), Terminator::Count(1 + rng.below(5))]);
            check_splits(&mut rng, &stream, &start, &script, usize::MAX);
        }
    }

    #[test]
    fn a_completed_count_becomes_count_zero_and_collects_everything() {
        let mut rng = Rng::new(4);
        let events = check_splits(&mut rng, b"abcdefg", &Terminator::Count(3), &Script::Keep, usize::MAX);
        assert_eq!(events, [data(b"abc"), Event::Found, data(b"defg")]);

        let mut framer = Framer::new();
        framer.set_terminator(Terminator::Count(5));
        let mut sink = Recorder::new(Script::Keep);
        framer.feed(b"ab", &mut sink);
        assert_eq!(framer.get_terminator(), &Terminator::Count(3));
        framer.feed(b"cde", &mut sink);
        assert_eq!(framer.get_terminator(), &Terminator::Count(0));
    }

    #[test]
    fn no_terminator_collects_everything() {
        let mut rng = Rng::new(5);
        for start in [Terminator::None, Terminator::Count(0)] {
            let stream = rng.bytes_from(b"ab\r\n", 30);
            let events = check_splits(&mut rng, &stream, &start, &Script::Keep, usize::MAX);
            assert_eq!(events, [Event::Data(stream)]);
        }
    }

    #[test]
    fn terminators_changed_inside_found_apply_to_the_next_byte() {
        let mut rng = Rng::new(6);
        let script = Script::Cycle(vec![
            Terminator::from(b"ab"),
            Terminator::Count(3),
            Terminator::from(b"\r\n\r\n"),
            Terminator::Count(1),
            Terminator::from(b"a"),
            Terminator::Count(0),
        ]);
        for _ in 0..300 {
            let len = rng.below(40);
            let stream = rng.bytes_from(b"ab\r\n", len);
            check_splits(&mut rng, &stream, &Terminator::from(b"\r\n"), &script, usize::MAX);
        }
    }

    #[test]
    fn header_lines_switch_to_counted_bodies_like_http() {
        let mut rng = Rng::new(7);
        for _ in 0..200 {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for _ in 0..rng.below(5) {
                if rng.below(4) == 0 {
                    // A line that is not a length: lines go on.
                    let len = 1 + rng.below(4);
                    let line = rng.bytes_from(b"xy\r", len);
                    let line: Vec<u8> = line.into_iter().filter(|&b| b != b'\r').chain(*b"z").collect();
                    stream.extend_from_slice(&line);
                    stream.extend_from_slice(b"\r\n");
                    expected.extend([Event::Data(line), Event::Found]);
                } else {
                    // Bodies are full of line ends that must not end them.
                    let len = 1 + rng.below(12);
                    let body = rng.bytes_from(b"\r\nab", len);
                    let header = body.len().to_string();
                    stream.extend_from_slice(header.as_bytes());
                    stream.extend_from_slice(b"\r\n");
                    stream.extend_from_slice(&body);
                    expected.extend([Event::Data(header.into_bytes()), Event::Found, Event::Data(body), Event::Found]);
                }
            }
            let events = check_splits(&mut rng, &stream, &Terminator::from(b"\r\n"), &Script::Http, usize::MAX);
            assert_eq!(events, expected, "stream {:?}", stream.escape_ascii().to_string());
        }
    }

    #[test]
    fn data_is_never_reported_empty_and_messages_can_be() {
        let mut rng = Rng::new(8);
        let events = check_splits(&mut rng, b"\r\n\r\nab\r\n", &Terminator::from(b"\r\n"), &Script::Keep, usize::MAX);
        assert_eq!(events, [Event::Found, Event::Found, data(b"ab"), Event::Found]);
    }

    #[test]
    fn finish_passes_on_a_held_back_tail() {
        let mut framer = Framer::new();
        framer.set_terminator(b"\r\n");
        let mut sink = Recorder::new(Script::Keep);
        framer.feed(b"abc\r", &mut sink);
        assert_eq!(framer.held_back(), 1);
        assert_eq!(sink.log.events, [data(b"abc")]);
        framer.finish(&mut sink);
        assert_eq!(sink.log.events, [data(b"abc\r")]);
    }

    #[test]
    fn held_back_bytes_are_reframed_under_a_new_terminator() {
        let mut framer = Framer::new();
        framer.set_terminator(b"\r\n\r\n");
        let mut sink = Recorder::new(Script::Keep);
        framer.feed(b"abc\r\n\r", &mut sink);
        assert_eq!(framer.held_back(), 3);
        framer.set_terminator(Terminator::Count(2));
        framer.feed(b"xyz", &mut sink);
        assert_eq!(sink.log.events, [data(b"abc\r\n"), Event::Found, data(b"\rxyz")]);

        let mut framer = Framer::new();
        framer.set_terminator(b"\r\n\r\n");
        let mut sink = Recorder::new(Script::Keep);
        framer.feed(b"a\r\n\r", &mut sink);
        framer.set_terminator(b"\n");
        framer.finish(&mut sink);
        assert_eq!(sink.log.events, [data(b"a\r"), Event::Found, data(b"\r")]);
    }

    #[test]
    fn overflow_drops_the_rest_of_the_message_and_resumes_after_its_terminator() {
        let mut rng = Rng::new(9);
        let start = Terminator::from(b"\r\n");
        let events = check_splits(&mut rng, b"ab\r\nabcdef\r\nc\r\n", &start, &Script::Keep, 3);
        assert_eq!(events, [data(b"ab"), Event::Found, data(b"abc"), Event::Overflow, data(b"c"), Event::Found]);
        let mut stream = b"short\r\n".to_vec();
        stream.extend_from_slice(&[b'x'; 100]);
        stream.extend_from_slice(b"\r\nok\r\n");
        let events = check_splits(&mut rng, &stream, &start, &Script::Keep, 8);
        assert_eq!(
            events,
            [data(b"short"), Event::Found, data(b"xxxxxxxx"), Event::Overflow, data(b"ok"), Event::Found]
        );
    }

    #[test]
    fn a_message_of_exactly_max_input_fits() {
        let mut rng = Rng::new(10);
        let events = check_splits(&mut rng, b"abcd\r\n\r\n", &Terminator::from(b"\r\n\r\n"), &Script::Keep, 4);
        assert_eq!(events, [data(b"abcd"), Event::Found]);
        let events = check_splits(&mut rng, b"abcdx", &Terminator::Count(4), &Script::Keep, 4);
        assert_eq!(events, [data(b"abcd"), Event::Found, data(b"x")]);
    }

    #[test]
    fn overflow_without_a_terminator_drops_everything_after() {
        let mut rng = Rng::new(11);
        let events = check_splits(&mut rng, b"abcdefgh\r\n", &Terminator::None, &Script::Keep, 4);
        assert_eq!(events, [data(b"abcd"), Event::Overflow]);
    }

    #[test]
    fn overflow_of_a_count_drops_the_rest_of_the_count() {
        let mut rng = Rng::new(12);
        let script = Script::Cycle(vec![Terminator::Count(2)]);
        let events = check_splits(&mut rng, b"0123456789ab", &Terminator::Count(10), &script, 4);
        // The count ends silently: no found, so the script does not run,
        // and the terminator is Count(0) as after any count.
        assert_eq!(events, [data(b"0123"), Event::Overflow, data(b"ab")]);
    }

    #[test]
    fn overflow_is_the_same_for_every_split() {
        let mut rng = Rng::new(13);
        let starts = [Terminator::from(b"\r\n"), Terminator::from(b"aab"), Terminator::Count(5)];
        for _ in 0..200 {
            let start = &starts[rng.below(starts.len())];
            let max_input = rng.below(8);
            let len = rng.below(40);
            let stream = rng.bytes_from(b"ab\r\n", len);
            let script = Script::Cycle(vec![Terminator::from(b"\r\n"), Terminator::Count(3), Terminator::from(b"aab")]);
            let events = check_splits(&mut rng, &stream, start, &script, max_input);
            for event in &events {
                if let Event::Data(data) = event {
                    assert!(data.len() <= max_input, "collected {} > {max_input}", data.len());
                }
            }
        }
    }

    #[test]
    fn held_back_terminator_bytes_do_not_count_towards_the_limit() {
        let start = Terminator::from(b"\r\n\r\n");
        let stream = b"ab\r\n\r\n";
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frame(&bytes, &start, &Script::Keep, 2), [data(b"ab"), Event::Found]);
    }

    #[test]
    fn the_default_limit_is_64_kib() {
        let framer = Framer::new();
        assert_eq!(framer.max_input(), 64 * 1024);
        assert_eq!(framer.get_terminator(), &Terminator::None);
        let mut framer = Framer::new();
        let mut sink = Recorder::new(Script::Keep);
        framer.feed(&vec![b'a'; 64 * 1024], &mut sink);
        assert_eq!(sink.log.events.len(), 1);
        framer.feed(b"b", &mut sink);
        assert_eq!(sink.log.events[1..], [Event::Overflow]);
        assert!(framer.is_discarding());
    }

    /// Stops after the first message, like a protocol switching to raw
    /// bytes after a header.
    struct StopAfterFirst(Recorder);

    impl FrameSink for StopAfterFirst {
        fn collect(&mut self, framer: &mut Framer, data: &[u8]) {
            self.0.collect(framer, data);
        }
        fn found(&mut self, framer: &mut Framer) {
            self.0.found(framer);
        }
        fn overflow(&mut self, framer: &mut Framer) {
            self.0.overflow(framer);
        }
        fn stop(&self) -> bool {
            self.0.log.n_found > 0
        }
    }

    #[test]
    fn stop_leaves_the_rest_of_the_input_unconsumed() {
        let mut framer = Framer::new();
        framer.set_terminator(b"\r\n\r\n");
        let mut sink = StopAfterFirst(Recorder::new(Script::Keep));
        assert_eq!(framer.feed(b"GET\r\n\r", &mut sink), 6);
        assert_eq!(framer.feed(b"\nraw\r\n\r\nbytes", &mut sink), 1);
        assert_eq!(sink.0.log.events, [data(b"GET"), Event::Found]);
    }

    /// Clears the framer at its first found terminator, as
    /// `discard_buffers` does.
    struct ClearAtFirst(Recorder);

    impl FrameSink for ClearAtFirst {
        fn collect(&mut self, framer: &mut Framer, data: &[u8]) {
            self.0.collect(framer, data);
        }
        fn found(&mut self, framer: &mut Framer) {
            self.0.found(framer);
            if self.0.log.n_found == 1 {
                framer.clear();
            }
        }
        fn overflow(&mut self, framer: &mut Framer) {
            self.0.overflow(framer);
        }
    }

    #[test]
    fn clear_inside_found_drops_the_rest_of_the_read() {
        let mut framer = Framer::new();
        framer.set_terminator(b"\n");
        let mut sink = ClearAtFirst(Recorder::new(Script::Keep));
        assert_eq!(framer.feed(b"a\nb\nc", &mut sink), 5);
        assert_eq!(framer.feed(b"d\ne", &mut sink), 3);
        assert_eq!(sink.0.log.events, [data(b"a"), Event::Found, data(b"d"), Event::Found, data(b"e")]);
    }

    /// Clears the framer at its first collect.
    struct ClearAtFirstCollect(Recorder);

    impl FrameSink for ClearAtFirstCollect {
        fn collect(&mut self, framer: &mut Framer, data: &[u8]) {
            let first = self.0.log.events.is_empty();
            self.0.collect(framer, data);
            if first {
                framer.clear();
            }
        }
        fn found(&mut self, framer: &mut Framer) {
            self.0.found(framer);
        }
        fn overflow(&mut self, framer: &mut Framer) {
            self.0.overflow(framer);
        }
    }

    #[test]
    fn clear_while_held_bytes_are_collected_drops_the_rest_of_them() {
        let mut framer = Framer::new();
        framer.set_terminator(b"\r\n\r\n");
        let mut sink = ClearAtFirstCollect(Recorder::new(Script::Keep));
        framer.feed(b"\r\n\r", &mut sink);
        assert_eq!(framer.held_back(), 3);
        // The first held byte completes the count; the clear in its collect
        // drops the other two, the new input, and the found terminator.
        framer.set_terminator(Terminator::Count(1));
        assert_eq!(framer.feed(b"zz", &mut sink), 2);
        assert_eq!(framer.held_back(), 0);
        assert_eq!(sink.0.log.events, [data(b"\r")]);
        assert_eq!(framer.get_terminator(), &Terminator::Count(0));
    }

    #[test]
    #[should_panic(expected = "must not be empty")]
    fn an_empty_byte_terminator_is_refused() {
        Framer::new().set_terminator(b"");
    }

    #[test]
    fn terminators_convert_and_display() {
        assert_eq!(Terminator::from("\r\n"), Terminator::Bytes(b"\r\n".to_vec()));
        assert_eq!(Terminator::from(7), Terminator::Count(7));
        assert_eq!(Terminator::from(b"\r\n").to_string(), r#""\r\n""#);
        assert_eq!(Terminator::Count(3).to_string(), "count 3");
        assert_eq!(Terminator::None.to_string(), "none");
    }

    #[test]
    fn find_and_prefix_at_end_agree_with_naive_versions() {
        let mut rng = Rng::new(14);
        for _ in 0..2000 {
            let len = rng.below(12);
            let haystack = rng.bytes_from(b"ab", len);
            let len = 1 + rng.below(4);
            let needle = rng.bytes_from(b"ab", len);
            let naive = haystack.windows(needle.len()).position(|w| w == needle);
            assert_eq!(find(&haystack, &needle), naive, "{haystack:?} {needle:?}");
            let naive = (0..needle.len()).rev().find(|&l| haystack.ends_with(&needle[..l])).unwrap_or(0);
            assert_eq!(prefix_at_end(&haystack, &needle), naive, "{haystack:?} {needle:?}");
        }
    }
}
