//! Readiness events: accepting on listeners, and turning a stream's
//! readiness into `handle_read`, `handle_write`, `handle_expt`,
//! `handle_connect` and `handle_close` calls, or into the next step of a
//! close.

use std::{
    io,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use crate::epoll::Event;
use asyncore_abi as ffi;
use tracing::{debug, warn};

use super::{
    Core,
    channel::{NewChannel, Phase, READ, Socket},
    timers::TimerKind,
};
use crate::{
    command::ChannelKind,
    host_abi::CallCtx,
    ids::{GenerationIndex, ListenerId, Slot},
};

/// Connections accepted per listener per pass, so that one busy listener
/// cannot starve the channels already open.
const ACCEPTS_PER_PASS: usize = 64;
/// How long a listener that ran out of descriptors stops accepting. A
/// level-triggered listener with no descriptor left would otherwise wake the
/// loop hundreds of thousands of times a second.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

impl Core {
    pub(super) fn dispatch(&mut self, event: Event) {
        let slot = Slot(event.key);
        let Some(ch) = self.channels.get(slot) else { return };
        match ch.socket {
            Socket::Listener(_) => self.accept(slot),
            Socket::Stream(_) | Socket::Pipe(_) => self.stream_event(slot, event),
        }
    }

    fn accept(&mut self, listener_slot: Slot) {
        for _ in 0..ACCEPTS_PER_PASS {
            let Some(ch) = self.channels.get(listener_slot) else { return };
            let Socket::Listener(listener) = &ch.socket else { return };
            // Suspended (or paused) within this pass: leave the rest in
            // the backlog.
            if ch.accept_paused {
                return;
            }
            let (listener_id, generation) = (ch.listener, ch.generation);
            match listener.accept() {
                Ok((stream, peer)) => {
                    if self.over_connection_limit(listener_id) {
                        // Closed at once, never served: the client sees
                        // the connection end rather than hang in the
                        // backlog. Counted in the listener's
                        // `connections_refused`.
                        debug!(listener = listener_id.0, %peer, "max_connections reached; connection closed");
                        drop(stream);
                        continue;
                    }
                    self.stats.accepts += 1;
                    self.accepted(listener_slot, listener_id, generation, stream, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_transient_accept_error(&e) => continue,
                Err(e) => {
                    // EMFILE and friends: the connection stays in the
                    // backlog; stop asking for a while instead of spinning.
                    // Every listener hits it ten times a second until
                    // descriptors are freed: counted, and summed up in the
                    // log (`AcceptPauses`).
                    let now = Instant::now();
                    self.stats.accept_pauses += 1;
                    self.accept_pauses.paused(now, listener_id.0, &e);
                    let ch = &mut self.channels[listener_slot];
                    ch.accept_paused = true;
                    let channel_id = ch.id;
                    self.arm_timer(now, ACCEPT_PAUSE, channel_id, TimerKind::ResumeAccept);
                    self.channels.mark_dirty(listener_slot);
                    return;
                }
            }
        }
    }

    fn accepted(
        &mut self,
        listener_slot: Slot,
        listener_id: ListenerId,
        generation: GenerationIndex,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        if let Err(e) = stream.set_nonblocking(true) {
            warn!(listener = listener_id.0, error = %e, "cannot make an accepted socket non-blocking; dropping it");
            return;
        }
        // Nagle's algorithm stalls request/response protocols by up to 40 ms
        // per message; handlers write whole messages anyway.
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let slot = self.insert(NewChannel {
            kind: ChannelKind::Accepted,
            socket: Socket::Stream(stream),
            listener: listener_id,
            parent: None,
            generation,
            dispatcher: None,
            phase: Phase::Open,
            peer: Some(peer),
            local,
        });
        let idle_timeout = self.listeners.get(&listener_id).and_then(|l| l.idle_timeout);
        if let Some(timeout) = idle_timeout {
            let ch = &mut self.channels[slot];
            ch.idle_timeout = Some(timeout);
            let channel_id = ch.id;
            self.arm_timer(self.now, timeout, channel_id, TimerKind::IdleCheck);
        }

        let Some(listening) = self.channels[listener_slot].dispatcher else { return };
        self.stats.handler_calls += 1;
        let channel_id = self.channels[slot].id;
        let started = Instant::now();
        let mut ctx = CallCtx::new(self, slot);
        let answer = listening.handle_accepted(&mut ctx);
        let report = ctx.take_report();
        self.timed(started, Some("handle_accepted"), channel_id, generation);
        match answer {
            Ok(Some(dispatcher)) => {
                self.channels[slot].dispatcher = Some(dispatcher);
                debug!(channel = self.channels[slot].id.0, listener = listener_id.0, %peer, "accepted");
                self.settle(slot);
            }
            Ok(None) => self.begin_close(slot),
            Err(_) => {
                self.begin_close(slot);
                self.poisoned(listener_slot, report);
            }
        }
    }

    fn stream_event(&mut self, slot: Slot, event: Event) {
        match self.channels[slot].phase {
            Phase::Lingering => {
                if self.discard_input(slot) {
                    self.end_close(slot);
                }
                return;
            }
            Phase::Closing => {
                // Input is discarded while the output flushes: a peer
                // blocked writing to us may only read once its write went
                // through.
                if event.readable && self.discard_input(slot) {
                    self.channels[slot].read_eof = true;
                }
            }
            Phase::Connecting => {
                if !self.connect_finished(slot) {
                    return;
                }
            }
            Phase::Open => {}
        }

        // handle_connect may have failed the channel.
        let Some(registered) = self.channels.get(slot).map(|ch| ch.registered) else { return };
        if event.is_priority() && registered & READ != 0 && self.is_open(slot) {
            self.handle_event(slot, ffi::event::EXPT, 0);
            self.discard_urgent(slot);
        }
        if event.readable && registered & READ != 0 && self.is_open(slot) {
            self.handle_event(slot, ffi::event::READ, 0);
        } else if event.is_interrupt() && registered & READ == 0 && self.is_open(slot) {
            // A hang-up while we were not reading (backpressure): the peer
            // is gone in both directions.
            self.peer_closed(slot);
        }
        if event.writable || event.is_interrupt() {
            self.flush(slot);
            let wants_write = self.channels.get(slot).is_some_and(|ch| ch.wants_write && ch.out.is_empty());
            if wants_write && self.is_open(slot) {
                self.handle_event(slot, ffi::event::WRITE, 0);
            }
        }
        self.channels.mark_dirty(slot);
    }

    /// The first event of an outbound socket: connected, or failed.
    fn connect_finished(&mut self, slot: Slot) -> bool {
        let ch = &mut self.channels[slot];
        let stream = ch.stream().expect("outbound channels are streams");
        let error = match stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => stream.peer_addr().err(),
        };
        if let Some(error) = error {
            let error = if error.kind() == io::ErrorKind::NotConnected {
                io::Error::from(io::ErrorKind::ConnectionRefused)
            } else {
                error
            };
            ch.failed = Some(error);
            ch.phase = Phase::Open;
            self.settle(slot);
            return false;
        }
        let (peer, local) = (stream.peer_addr().ok(), stream.local_addr().ok());
        ch.phase = Phase::Open;
        ch.peer = peer;
        ch.local = local;
        self.handle_event(slot, ffi::event::CONNECT, 0);
        true
    }

    /// The peer closed: `handle_close`, once.
    fn peer_closed(&mut self, slot: Slot) {
        let ch = &mut self.channels[slot];
        if ch.read_eof {
            return;
        }
        ch.read_eof = true;
        ch.close_event_pending = true;
        self.settle(slot);
    }

    pub(super) fn flush(&mut self, slot: Slot) {
        let now = self.now;
        let Some(ch) = self.channels.get_mut(slot) else { return };
        match ch.out.flush_to(&mut ch.socket) {
            Ok((bytes, writes)) => {
                ch.count_written(bytes, writes, now);
                // Output is written a pass after it was queued: a stats
                // reader that asked in between must hear of it again.
                if bytes > 0 {
                    self.channels.note_change(slot);
                }
            }
            Err(e) => {
                ch.out.clear();
                ch.failed = Some(e);
                self.settle(slot);
            }
        }
    }

    fn discard_urgent(&mut self, slot: Slot) {
        let Some(stream) = self.channels.get_mut(slot).and_then(|ch| ch.stream()) else { return };
        let mut byte = [std::mem::MaybeUninit::new(0u8); 1];
        let _ = socket2::SockRef::from(&*stream).recv_out_of_band(&mut byte);
    }

    /// Reads and drops what a closing channel's peer still sends (a bounded
    /// amount per event). Returns true once the peer closed or failed.
    fn discard_input(&mut self, slot: Slot) -> bool {
        let ch = &mut self.channels[slot];
        let mut scratch = [0u8; 16 * 1024];
        for _ in 0..16 {
            match io::Read::read(&mut ch.socket, &mut scratch) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// Errors after which the next `accept` may well succeed.
fn is_transient_accept_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    ) || error.raw_os_error() == Some(libc::EPROTO)
}
