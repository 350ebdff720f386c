//! One entry of the channel map: a socket, its dispatcher, its output queue
//! and its counters.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, BorrowedFd},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    command::{ChannelInfo, ChannelKind, ChannelState, ChannelStats, Counters},
    plugin_host::Dispatcher,
};

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
    /// read yet.
    Lingering,
}

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

    /// Writes `data` straight to the socket (the queue being empty).
    /// Returns (bytes written, write calls).
    pub(crate) fn write_through(&mut self, socket: &mut impl Write, data: &[u8]) -> io::Result<(usize, u64)> {
        debug_assert!(self.is_empty());
        write_some(socket, data)
    }

    /// Writes from the front until the queue is empty or the socket would
    /// block. Returns (bytes written, write calls that wrote something).
    pub(crate) fn flush_to(&mut self, stream: &mut impl Write) -> io::Result<(u64, u64)> {
        let (written, writes) = write_some(stream, &self.bytes[self.start..])?;
        self.start += written;
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

/// Writes until everything is written or the socket would block. Returns
/// (bytes written, write calls).
fn write_some(socket: &mut impl Write, data: &[u8]) -> io::Result<(usize, u64)> {
    let (mut written, mut writes) = (0, 0);
    while written < data.len() {
        match socket.write(&data[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                writes += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((written, writes))
}

#[derive(Debug)]
pub(crate) struct Channel {
    pub(crate) id: u64,
    pub(crate) kind: ChannelKind,
    pub(crate) listener_id: u64,
    pub(crate) parent_id: u64,
    /// Index of the plugin generation in the loop's plugin table: a channel
    /// stays on the generation that created it for its whole life.
    pub(crate) plugin: usize,
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
    /// A listener out of descriptors stops accepting until then.
    pub(crate) paused_until: Option<Instant>,
    pub(crate) counters: Counters,
    pub(crate) created_at: SystemTime,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) local: Option<SocketAddr>,
}

impl Channel {
    /// A new channel; its id is set when it is inserted in the map.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        kind: ChannelKind,
        socket: Socket,
        listener_id: u64,
        parent_id: u64,
        plugin: usize,
        dispatcher: Option<Dispatcher>,
        phase: Phase,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
    ) -> Channel {
        Channel {
            id: 0,
            kind,
            listener_id,
            parent_id,
            plugin,
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
            paused_until: None,
            counters: Counters::default(),
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
            channel_id: self.id,
            listener_id: self.listener_id,
            counters: self.counters,
            pending_output: self.out.len() as u64,
            closed,
        }
    }

    pub(crate) fn info(&self, plugin: &str, generation: u32) -> ChannelInfo {
        ChannelInfo {
            id: self.id,
            listener_id: self.listener_id,
            parent_id: self.parent_id,
            plugin: plugin.to_string(),
            generation,
            kind: self.kind,
            peer_address: self.peer,
            local_address: self.local,
            state: self.state(),
            created_at: self.created_at,
            counters: self.counters,
            pending_output: self.out.len() as u64,
        }
    }
}
