//! One entry of the channel map: a socket, its dispatcher, its output queue
//! and its counters.

use std::{
    fs::File,
    io::{self, Read, Write},
    mem::MaybeUninit,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    command::{ChannelInfo, ChannelKind, ChannelState, ChannelStats, Counters},
    host_abi::Dispatcher,
    ids::{ChannelId, GenerationIndex, ListenerId},
};

/// Why the host closes a channel the dispatcher did not close: the
/// argument of `handle_shutdown` (`asyncore_abi::close_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShutdownReason {
    IdleTimeout,
    /// `CloseChannel`, or `StopListener` with `close_channels`.
    Control,
    /// The daemon drains (SIGTERM).
    Drain,
    /// The drain timeout of a newer generation's activation.
    Reload,
    /// An unload with `force`.
    Unload,
}

impl ShutdownReason {
    pub(crate) fn code(self) -> i64 {
        use asyncore_abi::close_reason;
        match self {
            ShutdownReason::IdleTimeout => close_reason::IDLE_TIMEOUT,
            ShutdownReason::Control => close_reason::CONTROL,
            ShutdownReason::Drain => close_reason::DRAIN,
            ShutdownReason::Reload => close_reason::RELOAD,
            ShutdownReason::Unload => close_reason::UNLOAD,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ShutdownReason::IdleTimeout => "idle timeout",
            ShutdownReason::Control => "closed by the control plane",
            ShutdownReason::Drain => "drain",
            ShutdownReason::Reload => "reload drain timeout",
            ShutdownReason::Unload => "unload",
        }
    }
}

/// Interest bits as registered with the poller.
pub(crate) const READ: u8 = 1;
pub(crate) const WRITE: u8 = 2;

#[derive(Debug)]
pub(crate) enum Socket {
    Listener(TcpListener),
    Stream(TcpStream),
    /// A pipe or other descriptor handed over by a plugin (asyncore's
    /// `file_dispatcher`).
    Pipe(File),
}

impl Socket {
    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Listener(l) => l.as_fd(),
            Socket::Stream(s) => s.as_fd(),
            Socket::Pipe(f) => f.as_fd(),
        }
    }
}

impl Socket {
    /// Reads into memory that need not be initialised (a plugin's stack
    /// buffer: zeroing 64 KiB for every 64-byte read would cost more than
    /// the read). Returns the bytes written at the front of `buf`.
    pub(crate) fn read_uninit(&mut self, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        match self {
            Socket::Stream(s) => socket2::SockRef::from(&*s).recv(buf),
            Socket::Pipe(f) => {
                // SAFETY: read(2) writes at most buf.len() bytes into the
                // buffer, which is valid for writes; it never reads it.
                let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            }
            Socket::Listener(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    /// Bytes in the kernel's send queue that the peer has not acknowledged
    /// yet (`SIOCOUTQ`, tcp(7)); 0 for what is not a stream. Written bytes
    /// are in the kernel's hands, not the peer's, until this drops to 0.
    pub(crate) fn unsent_bytes(&self) -> io::Result<usize> {
        let Socket::Stream(stream) = self else { return Ok(0) };
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ's number) writes one int through the
        // pointer, which points to a live c_int; the descriptor is ours.
        let result = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        if result < 0 { Err(io::Error::last_os_error()) } else { Ok(queued.max(0) as usize) }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Stream(s) => s.read(buf),
            Socket::Pipe(f) => f.read(buf),
            Socket::Listener(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Stream(s) => s.write(buf),
            Socket::Pipe(f) => f.write(buf),
            Socket::Listener(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a channel is in its life, as the loop sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Connecting,
    Open,
    /// `close()` was asked: flush the output queue, then shut down writing.
    Closing,
    /// Output flushed and write side shut down: read and discard until the
    /// peer closes (or a timeout), so that closing with unread input does
    /// not make the kernel send a reset that destroys data the peer has not
    /// read yet. During a drain a channel may stay here, no longer polled,
    /// until the kernel's send queue is empty (`awaiting_send_queue`).
    Lingering,
}

/// The size from which a channel's `send` with nothing queued before it is
/// written at once rather than gathered ([`OutBuf::write_or_push`]).
pub(crate) const WRITE_THROUGH: usize = 16 * 1024;

/// Output queued by `send` and not yet written: a byte vector consumed from
/// the front, compacted when more than half is consumed.
#[derive(Debug, Default)]
pub(crate) struct OutBuf {
    bytes: Vec<u8>,
    start: usize,
}

impl OutBuf {
    pub(crate) fn len(&self) -> usize {
        self.bytes.len() - self.start
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start >= self.bytes.len() / 2 {
            self.bytes.drain(..self.start);
            self.start = 0;
        }
        self.bytes.extend_from_slice(data);
    }

    pub(crate) fn clear(&mut self) {
        self.bytes = Vec::new();
        self.start = 0;
    }

    /// Queues `data` to be written before the loop waits, except that a
    /// large write ([`WRITE_THROUGH`] bytes or more) with nothing queued
    /// before it is written now, from the caller's buffer, and only what
    /// the socket did not take is queued: copying 64 KiB to write it a
    /// moment later costs more than the system call it would save. Small
    /// writes are gathered into one. Returns what
    /// [`flush_to`](OutBuf::flush_to) returns; what a failed write left is
    /// queued, for the next flush to meet the error again and report it.
    pub(crate) fn write_or_push(&mut self, stream: &mut impl Write, data: &[u8]) -> (u64, u64) {
        if !self.is_empty() || data.len() < WRITE_THROUGH {
            self.push(data);
            return (0, 0);
        }
        let (written, writes, _failed) = write_some(stream, data);
        self.push(&data[written..]);
        (written as u64, writes)
    }

    /// Writes from the front until the queue is empty or the socket would
    /// block. Returns (bytes written, write calls that wrote something).
    pub(crate) fn flush_to(&mut self, stream: &mut impl Write) -> io::Result<(u64, u64)> {
        let (written, writes, failed) = write_some(stream, &self.bytes[self.start..]);
        self.start += written;
        if let Some(error) = failed {
            return Err(error);
        }
        if self.is_empty() {
            // Give back a large buffer once a burst has drained.
            if self.bytes.capacity() > 256 * 1024 {
                self.bytes = Vec::new();
            } else {
                self.bytes.clear();
            }
            self.start = 0;
        }
        Ok((written as u64, writes))
    }
}

/// Writes until everything is written, the socket would block or a write
/// fails. Returns (bytes written, write calls, the failure): what was
/// written before a failure is counted, so that it is not queued again.
fn write_some(socket: &mut impl Write, data: &[u8]) -> (usize, u64, Option<io::Error>) {
    let (mut written, mut writes) = (0, 0);
    while written < data.len() {
        match socket.write(&data[written..]) {
            Ok(0) => return (written, writes, Some(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                written += n;
                writes += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (written, writes, Some(e)),
        }
    }
    (written, writes, None)
}

/// What a new channel starts with; everything else about it starts empty.
#[derive(Debug)]
pub(crate) struct NewChannel {
    pub(crate) kind: ChannelKind,
    pub(crate) socket: Socket,
    pub(crate) listener: ListenerId,
    /// The channel whose plugin created this one (`connect`, `attach_fd`).
    pub(crate) parent: Option<ChannelId>,
    pub(crate) generation: GenerationIndex,
    pub(crate) dispatcher: Option<Dispatcher>,
    pub(crate) phase: Phase,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) local: Option<SocketAddr>,
}

#[derive(Debug)]
pub(crate) struct Channel {
    pub(crate) id: ChannelId,
    pub(crate) kind: ChannelKind,
    pub(crate) listener: ListenerId,
    pub(crate) parent: Option<ChannelId>,
    /// The plugin generation serving the channel: it stays on the
    /// generation that created it for its whole life, unless handed over
    /// with its state.
    pub(crate) generation: GenerationIndex,
    pub(crate) socket: Socket,
    /// `None` before `handle_accepted` answered, after a panic, and once
    /// closing.
    pub(crate) dispatcher: Option<Dispatcher>,
    pub(crate) phase: Phase,
    pub(crate) out: OutBuf,
    /// Interest registered with the poller (0: not registered).
    pub(crate) registered: u8,
    /// The peer closed its side; `handle_close` was called.
    pub(crate) read_eof: bool,
    /// The dispatcher's last `writable()` answer: call `handle_write` when
    /// the socket drains.
    pub(crate) wants_write: bool,
    /// The plugin called `close()` during a callback; acted on after it.
    pub(crate) close_pending: bool,
    /// `recv` saw the peer's close during a callback: `handle_close` is due.
    pub(crate) close_event_pending: bool,
    /// `shutdown_write()` was asked: shut down writing once flushed.
    pub(crate) shutdown_after_flush: bool,
    /// The write side is shut down.
    pub(crate) write_shut: bool,
    /// Close the channel when nothing was read or written for this long.
    pub(crate) idle_timeout: Option<Duration>,
    /// Last read or write (the loop's clock of that pass).
    pub(crate) last_activity: Instant,
    /// A socket error to report with `handle_error`, then close.
    pub(crate) failed: Option<io::Error>,
    /// In the dirty list: re-ask interest before the next wait.
    pub(crate) dirty: bool,
    /// A listener out of descriptors stops accepting for a while.
    pub(crate) accept_paused: bool,
    /// Draining: its close is done but for the kernel's send queue, which
    /// the drain re-checks on a timer (`Core::check_send_queues`); it is no
    /// longer polled.
    pub(crate) awaiting_send_queue: bool,
    /// The host is closing the channel for a reason of its own: the
    /// dispatcher was told (`handle_shutdown`), is not read any more, and
    /// is asked for output until it has none left.
    pub(crate) shutdown: Option<ShutdownReason>,
    pub(crate) counters: Counters,
    /// The stats epoch this channel was last noted as changed in
    /// (`stats_changes`); 0: never.
    pub(crate) stats_noted: u64,
    pub(crate) created_at: SystemTime,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) local: Option<SocketAddr>,
}

impl Channel {
    pub(crate) fn new(id: ChannelId, new: NewChannel) -> Channel {
        let NewChannel { kind, socket, listener, parent, generation, dispatcher, phase, peer, local } = new;
        Channel {
            id,
            kind,
            listener,
            parent,
            generation,
            socket,
            dispatcher,
            phase,
            out: OutBuf::default(),
            registered: 0,
            read_eof: false,
            shutdown_after_flush: false,
            write_shut: false,
            idle_timeout: None,
            last_activity: Instant::now(),
            wants_write: false,
            close_pending: false,
            close_event_pending: false,
            failed: None,
            dirty: false,
            accept_paused: false,
            awaiting_send_queue: false,
            shutdown: None,
            counters: Counters::default(),
            stats_noted: 0,
            created_at: SystemTime::now(),
            peer,
            local,
        }
    }

    pub(crate) fn stream(&mut self) -> Option<&mut TcpStream> {
        match &mut self.socket {
            Socket::Stream(s) => Some(s),
            Socket::Listener(_) | Socket::Pipe(_) => None,
        }
    }

    /// Shuts down the write side once (the peer reads EOF after every byte
    /// already written). Only streams have one.
    pub(crate) fn shut_write(&mut self) -> io::Result<()> {
        if self.write_shut {
            return Ok(());
        }
        let stream = self.stream().ok_or(io::ErrorKind::Unsupported)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        self.write_shut = true;
        Ok(())
    }

    pub(crate) fn state(&self) -> ChannelState {
        match self.phase {
            Phase::Connecting => ChannelState::Connecting,
            Phase::Open => ChannelState::Open,
            Phase::Closing | Phase::Lingering => ChannelState::Closing,
        }
    }

    pub(crate) fn stats(&self, closed: bool) -> ChannelStats {
        ChannelStats {
            channel_id: self.id.0,
            listener_id: self.listener.0,
            counters: self.counters,
            pending_output: self.out.len() as u64,
            closed,
        }
    }

    /// Counts what a write of its output took.
    pub(crate) fn count_written(&mut self, bytes: u64, writes: u64, now: Instant) {
        if bytes > 0 {
            self.last_activity = now;
        }
        self.counters.bytes_out += bytes;
        self.counters.writes += writes;
    }

    pub(crate) fn info(&self, plugin: &Arc<str>, generation: u32) -> ChannelInfo {
        ChannelInfo {
            id: self.id.0,
            listener_id: self.listener.0,
            parent_id: self.parent.map_or(0, |parent| parent.0),
            plugin: plugin.clone(),
            generation,
            kind: self.kind,
            peer_address: self.peer,
            local_address: self.local,
            state: self.state(),
            created_at: self.created_at,
            counters: self.counters,
            pending_output: self.out.len() as u64,
            annotations: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write};

    use super::{OutBuf, WRITE_THROUGH};

    /// A socket's send buffer: takes at most `per_write` bytes a call and
    /// `room` bytes in all before it would block.
    struct Peer {
        written: Vec<u8>,
        per_write: usize,
        room: usize,
        interrupt_next: bool,
        broken: bool,
        /// Fails, rather than blocks, once `room` is used up.
        breaks_when_full: bool,
    }

    impl Peer {
        fn new(per_write: usize, room: usize) -> Peer {
            Peer { written: Vec::new(), per_write, room, interrupt_next: false, broken: false, breaks_when_full: false }
        }
    }

    impl Write for Peer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.broken {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if std::mem::take(&mut self.interrupt_next) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if self.room == 0 {
                let kind =
                    if self.breaks_when_full { io::ErrorKind::ConnectionReset } else { io::ErrorKind::WouldBlock };
                return Err(kind.into());
            }
            let n = buf.len().min(self.per_write).min(self.room);
            self.written.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn flush_writes_from_the_front_until_the_socket_would_block() {
        let mut out = OutBuf::default();
        out.push(b"hello ");
        out.push(b"world");
        let mut peer = Peer::new(4, 7);
        assert_eq!(out.flush_to(&mut peer).unwrap(), (7, 2));
        assert_eq!(peer.written, b"hello w");
        assert_eq!(out.len(), 4);

        peer.room = 100;
        peer.interrupt_next = true;
        assert_eq!(out.flush_to(&mut peer).unwrap(), (4, 1), "an interrupted write is retried, not counted");
        assert_eq!(peer.written, b"hello world");
        assert!(out.is_empty());
        assert_eq!(out.flush_to(&mut peer).unwrap(), (0, 0), "nothing left to write");
    }

    #[test]
    fn large_writes_go_out_at_once_and_small_ones_are_gathered() {
        let mut out = OutBuf::default();
        let mut peer = Peer::new(usize::MAX, usize::MAX);
        assert_eq!(out.write_or_push(&mut peer, b"small"), (0, 0), "gathered");
        let large = vec![1u8; WRITE_THROUGH];
        assert_eq!(out.write_or_push(&mut peer, &large), (0, 0), "behind queued output: gathered too");
        assert_eq!(out.len(), 5 + WRITE_THROUGH);
        out.flush_to(&mut peer).unwrap();

        // Nothing queued: written now, and only what the socket left is queued.
        let mut full_soon = Peer::new(usize::MAX, 1000);
        assert_eq!(out.write_or_push(&mut full_soon, &large), (1000, 1));
        assert_eq!(out.len(), WRITE_THROUGH - 1000);
        assert_eq!(out.bytes[out.start..], large[1000..]);

        // A failed write queues it all, for the flush to meet the error again.
        let mut out = OutBuf::default();
        let mut broken = Peer::new(10, 10);
        broken.broken = true;
        assert_eq!(out.write_or_push(&mut broken, &large), (0, 0));
        assert_eq!(out.len(), WRITE_THROUGH);
        assert_eq!(out.flush_to(&mut broken).unwrap_err().kind(), io::ErrorKind::BrokenPipe);

        // A write that fails partway queues only what was not written: no
        // byte goes out twice.
        let mut out = OutBuf::default();
        let mut resets = Peer::new(600, 1000);
        resets.breaks_when_full = true;
        assert_eq!(out.write_or_push(&mut resets, &large), (1000, 2));
        assert_eq!(out.bytes[out.start..], large[1000..]);
        assert_eq!(out.flush_to(&mut resets).unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn push_compacts_once_half_is_consumed() {
        let mut out = OutBuf::default();
        out.push(b"0123456789");
        out.flush_to(&mut Peer::new(100, 3)).unwrap();
        out.push(b"ab");
        assert_eq!((out.start, out.len()), (3, 9), "less than half consumed: no copy");

        out.flush_to(&mut Peer::new(100, 4)).unwrap();
        out.push(b"cd");
        assert_eq!((out.start, out.len()), (0, 7), "half consumed: compacted");
        let mut peer = Peer::new(100, 100);
        out.flush_to(&mut peer).unwrap();
        assert_eq!(peer.written, b"789abcd", "order survives compaction");
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let mut out = OutBuf::default();
        out.push(&[7; 300 * 1024]);
        out.flush_to(&mut Peer::new(usize::MAX, usize::MAX)).unwrap();
        assert!(out.is_empty());
        assert_eq!(out.bytes.capacity(), 0, "a large buffer is freed once drained");

        out.push(&[7; 1024]);
        out.flush_to(&mut Peer::new(usize::MAX, usize::MAX)).unwrap();
        assert!(out.bytes.capacity() >= 1024, "a small one is kept for the next burst");
    }

    #[test]
    fn a_socket_that_takes_nothing_or_fails_is_an_error_and_keeps_the_queue() {
        let mut out = OutBuf::default();
        out.push(b"queued");
        let error = out.flush_to(&mut Peer::new(0, 10)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WriteZero);
        let mut broken = Peer::new(10, 10);
        broken.broken = true;
        assert_eq!(out.flush_to(&mut broken).unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(out.len(), 6);
        out.clear();
        assert!(out.is_empty());
    }
}
