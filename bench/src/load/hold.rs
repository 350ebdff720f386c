//! Opening and holding many connections to an echo server: up to 128
//! non-blocking connects in flight, each connection proven served by one
//! byte echoed back before it counts, then kept open and silent. Used for
//! the connection-rate and memory scenario, and for the idle connections
//! beside a busy load.
//!
//! One source address has about 28,000 ephemeral ports
//! (`net.ipv4.ip_local_port_range`), and Linux gives `connect` the even half
//! of them first: past about 14,000 connections to one destination, every
//! `connect` scans the whole even half before it tries an odd port, and the
//! rate falls tenfold (measured: 2,000 connections a second, the kernel
//! busy in the generator). So each source address serves at most
//! [`PER_SOURCE`] connections, and the next ones come from 127.0.0.2,
//! 127.0.0.3, ..., which loopback accepts as well; the same happens early
//! when `connect` answers `EADDRNOTAVAIL`.

use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use socket2::{Domain, SockRef, Socket, Type};

use super::{Percentiles, STALL};
use crate::procfs::{CpuSnapshot, CpuUse};
use crate::sys::{self, Epoll, Interest};

const IN_FLIGHT: usize = 128;
/// Connections per loopback source address.
const PER_SOURCE: usize = 10_000;
const PROBE: u8 = b'h';

/// Connections opened and held.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) streams: Vec<TcpStream>,
    /// From the first connect to the last probe echoed.
    pub(crate) elapsed: Duration,
    /// CPU time over `elapsed`.
    pub(crate) cpu: CpuUse,
    /// From connect to the probe's echo, per connection.
    pub(crate) latency: Percentiles,
}

impl Drop for Held {
    fn drop(&mut self) {
        abort(&self.streams);
    }
}

/// Closes connections with a reset rather than a FIN (`SO_LINGER` 0), so
/// that thousands of closed connections leave no `TIME_WAIT` ports behind
/// for the next scenario to run out of. The descriptors close when the
/// streams are dropped.
pub(crate) fn abort<'a, S: AsFd + 'a>(streams: impl IntoIterator<Item = &'a S>) {
    for stream in streams {
        let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
    }
}

enum Stage {
    Connecting,
    /// The probe byte was sent; waiting for it to come back.
    Probing,
}

struct Pending {
    socket: Socket,
    started: Instant,
    stage: Stage,
}

/// Opens `count` connections to the echo server at `target` (process
/// `server_pid`) and holds them.
///
/// # Errors
///
/// If a connect fails for a reason other than ports running out, a probe
/// does not come back intact, descriptors run out, or nothing progresses
/// for [`STALL`].
pub(crate) fn open(target: SocketAddr, server_pid: u32, count: usize) -> anyhow::Result<Held> {
    let mut epoll = Epoll::new(IN_FLIGHT)?;
    let mut slots: Vec<Option<Pending>> = (0..IN_FLIGHT).map(|_| None).collect();
    let mut free: Vec<usize> = (0..IN_FLIGHT).rev().collect();
    let mut streams = Vec::with_capacity(count);
    let mut latencies = Vec::with_capacity(count);
    // None: let the kernel choose the source address (127.0.0.1).
    let mut source: Option<Ipv4Addr> = None;
    let mut from_source = 0;
    let mut started = 0;
    let mut ready = Vec::with_capacity(IN_FLIGHT);
    let cpu_before = CpuSnapshot::take(server_pid).context("CPU time")?;
    let start = Instant::now();
    let mut last_progress = start;
    let result = (|| -> anyhow::Result<()> {
        while streams.len() < count {
            while started < count && !free.is_empty() {
                if from_source >= PER_SOURCE {
                    source = Some(next_source(source)?);
                    from_source = 0;
                }
                let socket = loop {
                    match connect(target, source) {
                        Ok(socket) => break socket,
                        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                            source = Some(next_source(source)?);
                            from_source = 0;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                            bail!("out of descriptors after {started} connections (RLIMIT_NOFILE)")
                        }
                        Err(e) => return Err(e).with_context(|| format!("connect to {target}")),
                    }
                };
                let slot = free.pop().expect("a free slot");
                epoll.add(&socket, slot as u64, Interest::WRITE)?;
                slots[slot] = Some(Pending { socket, started: Instant::now(), stage: Stage::Connecting });
                started += 1;
                from_source += 1;
            }
            let now = Instant::now();
            if now - last_progress > STALL {
                bail!("{} of {count} connections after {STALL:?} without progress", streams.len());
            }
            ready.clear();
            ready.extend(epoll.wait(Some(Duration::from_millis(100)))?);
            for event in &ready {
                let slot = event.token as usize;
                let Some(pending) = slots[slot].as_mut() else { continue };
                match pending.stage {
                    Stage::Connecting => {
                        if let Some(error) = pending.socket.take_error()? {
                            return Err(error).with_context(|| format!("connect to {target}"));
                        }
                        if !event.writable {
                            continue;
                        }
                        if (&pending.socket).write(&[PROBE])? != 1 {
                            bail!("could not send a probe byte");
                        }
                        epoll.modify(&pending.socket, slot as u64, Interest::READ)?;
                        pending.stage = Stage::Probing;
                    }
                    Stage::Probing => {
                        let mut byte = [0u8; 1];
                        match (&pending.socket).read(&mut byte) {
                            Ok(1) if byte[0] == PROBE => {}
                            Ok(1) => bail!("the probe came back as {:#04x}", byte[0]),
                            Ok(_) => bail!("the server closed a new connection"),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                            Err(e) => return Err(e).context("reading the probe"),
                        }
                        let pending = slots[slot].take().expect("the slot just read");
                        epoll.delete(&pending.socket)?;
                        let now = Instant::now();
                        latencies.push(now - pending.started);
                        last_progress = now;
                        streams.push(TcpStream::from(pending.socket));
                        free.push(slot);
                    }
                }
            }
        }
        Ok(())
    })();
    let elapsed = start.elapsed();
    let cpu_after = CpuSnapshot::take(server_pid).context("CPU time");
    let held = Held {
        streams,
        elapsed,
        cpu: cpu_after.as_ref().map_or(CpuUse::default(), |after| cpu_before.until(after)),
        latency: Percentiles::of(&mut latencies),
    };
    abort(slots.iter().flatten().map(|pending| &pending.socket));
    result?;
    cpu_after?;
    Ok(held)
}

/// A non-blocking socket with its connect to `target` under way.
fn connect(target: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM.cloexec(), None)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(source) = source {
        sys::set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddrV4::new(source, 0).into())?;
    }
    match socket.connect(&target.into()) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(e),
    }
}

fn next_source(source: Option<Ipv4Addr>) -> anyhow::Result<Ipv4Addr> {
    let last = source.map_or(1, |source| source.octets()[3]);
    if last >= 254 {
        bail!("out of loopback source addresses");
    }
    Ok(Ipv4Addr::new(127, 0, 0, last + 1))
}
