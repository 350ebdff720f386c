//! What plugins ask of the loop from inside a callback: the safe half of
//! each host function (`host_abi` has the unsafe half, which turns the
//! call's context back into the core and calls these). Nothing here calls
//! plugin code: what would (a close, another channel's `handle_error`) is
//! marked, and the loop acts on it after the callback.

use std::{
    fs::File,
    io,
    mem::MaybeUninit,
    net::SocketAddr,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket as RawSocket, Type};

use super::{
    Core,
    channel::{NewChannel, Phase, Socket},
    timers::TimerKind,
};
use crate::{
    command::ChannelKind,
    host_abi::{Dispatcher, Errno, Services},
    ids::{ChannelId, Slot, TimerId},
};

impl Services for Core {
    fn has_channel(&self, slot: Slot) -> bool {
        self.channels.get(slot).is_some()
    }

    fn channel_id(&self, slot: Slot) -> ChannelId {
        self.channels[slot].id
    }

    fn send(&mut self, slot: Slot, data: &[u8]) -> u64 {
        if !self.takes_output(slot) {
            return 0;
        }
        self.queue_output(slot, data)
    }

    fn send_to(&mut self, channel: ChannelId, data: &[u8]) -> Result<u64, Errno> {
        let target = self.channels.slot_of(channel).filter(|&slot| self.takes_output(slot)).ok_or(Errno::EBADF)?;
        let n = self.queue_output(target, data);
        // The target's own handler is not running: settle its error (if the
        // write failed) on its next refresh.
        self.channels.mark_dirty(target);
        Ok(n)
    }

    fn recv(&mut self, slot: Slot, buf: &mut [MaybeUninit<u8>]) -> Result<u64, Errno> {
        let now = self.now;
        let ch = &mut self.channels[slot];
        if ch.read_eof {
            return Ok(0);
        }
        if matches!(ch.socket, Socket::Listener(_)) {
            return Err(Errno::EBADF);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            return match ch.socket.read_uninit(buf) {
                Ok(0) => {
                    // The peer closed: handle_close follows this callback.
                    ch.read_eof = true;
                    ch.close_event_pending = true;
                    self.channels.mark_dirty(slot);
                    Ok(0)
                }
                Ok(n) => {
                    ch.counters.bytes_in += n as u64;
                    ch.counters.reads += 1;
                    ch.last_activity = now;
                    Ok(n as u64)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Errno::EAGAIN),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let errno = Errno::of(&e);
                    ch.failed = Some(e);
                    Err(errno)
                }
            };
        }
    }

    fn close(&mut self, slot: Slot) {
        // The dispatcher cannot be released while its own callback runs:
        // only mark the channel; the loop releases it after the call.
        let ch = &mut self.channels[slot];
        if matches!(ch.phase, Phase::Open | Phase::Connecting) {
            ch.close_pending = true;
            self.channels.mark_dirty(slot);
        }
    }

    fn shutdown_write(&mut self, slot: Slot) {
        if matches!(self.channels[slot].socket, Socket::Pipe(_)) {
            // A pipe end has one direction: shutting its writing down is
            // closing it (the reader then sees EOF).
            return self.close(slot);
        }
        self.channels[slot].shutdown_after_flush = true;
        self.channels.mark_dirty(slot);
    }

    fn pending_output(&self, slot: Slot) -> u64 {
        self.channels[slot].out.len() as u64
    }

    fn pending_output_of(&self, channel: ChannelId) -> Result<u64, Errno> {
        // A closing channel takes no more output (send_to refuses it), so it
        // answers like a closed one.
        match self.channels.slot_of(channel) {
            Some(slot) if self.takes_output(slot) => Ok(self.channels[slot].out.len() as u64),
            _ => Err(Errno::EBADF),
        }
    }

    fn peer_address(&self, slot: Slot) -> Option<SocketAddr> {
        self.channels[slot].peer
    }

    fn local_address(&self, slot: Slot) -> Option<SocketAddr> {
        self.channels[slot].local
    }

    fn wake(&mut self, channel: ChannelId) -> Result<(), Errno> {
        let slot = self.channels.slot_of(channel).ok_or(Errno::EBADF)?;
        self.channels.mark_dirty(slot);
        Ok(())
    }

    fn call_later(&mut self, slot: Slot, delay: Duration, token: u64) -> TimerId {
        let channel_id = self.channels[slot].id;
        self.timers.arm(Instant::now().checked_add(delay), Some(channel_id), TimerKind::Call { token })
    }

    fn cancel_timer(&mut self, slot: Slot, timer: TimerId) -> Result<(), Errno> {
        let channel_id = self.channels[slot].id;
        if self.timers.cancel_call(channel_id, timer) { Ok(()) } else { Err(Errno::ENOENT) }
    }

    fn connect(&mut self, slot: Slot, address: &str, dispatcher: Dispatcher) -> io::Result<ChannelId> {
        let address: SocketAddr = address.parse().map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let socket = RawSocket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        let _ = socket.set_tcp_nodelay(true);
        match socket.connect(&address.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let socket = Socket::Stream(socket.into());
        Ok(self.insert_child(slot, ChannelKind::Outbound, socket, dispatcher, Phase::Connecting, Some(address)))
    }

    fn attach(&mut self, slot: Slot, file: File, dispatcher: Dispatcher) -> io::Result<ChannelId> {
        set_nonblocking(&file)?;
        Ok(self.insert_child(slot, ChannelKind::File, Socket::Pipe(file), dispatcher, Phase::Open, None))
    }
}

impl Core {
    /// Whether a channel takes output: an open (or connecting) stream or
    /// pipe. A listening socket never does.
    fn takes_output(&self, slot: Slot) -> bool {
        let ch = &self.channels[slot];
        ch.kind != ChannelKind::Listening && matches!(ch.phase, Phase::Open | Phase::Connecting)
    }

    /// Queues output on a channel; the loop writes it when it refreshes
    /// the channel, later in the same pass. Returns the number of bytes
    /// accepted: all of them, or 0 once the channel is closing, shut for
    /// writing, or broken.
    fn queue_output(&mut self, slot: Slot, data: &[u8]) -> u64 {
        let ch = &mut self.channels[slot];
        if !matches!(ch.phase, Phase::Open | Phase::Connecting)
            || ch.failed.is_some()
            || ch.write_shut
            || ch.shutdown_after_flush
        {
            return 0;
        }
        // Gathered, not written: everything the channel's callbacks queue in
        // a pass leaves in one write when the loop refreshes the channel
        // (before it waits), as asynchat's `initiate_send` gathers; only a
        // large write with nothing before it goes out at once, uncopied.
        if !data.is_empty() {
            if ch.phase == Phase::Open {
                let (bytes, writes) = ch.out.write_or_push(&mut ch.socket, data);
                ch.count_written(bytes, writes, self.now);
            } else {
                ch.out.push(data);
            }
            self.channels.mark_dirty(slot);
        }
        data.len() as u64
    }

    /// Adds a channel a plugin created from the channel at `parent_slot`:
    /// it belongs to the same listener and plugin generation.
    fn insert_child(
        &mut self,
        parent_slot: Slot,
        kind: ChannelKind,
        socket: Socket,
        dispatcher: Dispatcher,
        phase: Phase,
        peer: Option<SocketAddr>,
    ) -> ChannelId {
        let parent = &self.channels[parent_slot];
        let slot = self.insert(NewChannel {
            kind,
            socket,
            listener: parent.listener,
            parent: Some(parent.id),
            generation: parent.generation,
            dispatcher: Some(dispatcher),
            phase,
            peer,
            local: None,
        });
        self.channels[slot].id
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with plain integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
