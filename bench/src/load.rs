//! The load generator: one thread and one level-triggered epoll drive every
//! busy connection of a run in a closed loop. Each connection keeps `depth`
//! requests in flight and sends the next one as soon as an answer completes;
//! an [`Exchange`] writes the requests and checks every byte of the answers,
//! so a server that is fast but wrong fails the run instead of winning it.
//!
//! One thread on its own core is deliberate: on loopback the generator's
//! system calls cost about what the server's do, and a second generator
//! thread would only compete with the server for the other core.

use std::collections::VecDeque;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

use crate::procfs::{CpuSnapshot, CpuUse};
use crate::sys::{Epoll, Interest};

pub(crate) mod echo;
pub(crate) mod hold;
pub(crate) mod http;

/// A run gives up when no answer has completed for this long.
pub(crate) const STALL: Duration = Duration::from_secs(10);
const READ_BUFFER: usize = 64 * 1024;

/// One protocol, as the generator sees it.
pub(crate) trait Exchange {
    /// Appends the next request to `out`.
    fn write_request(&mut self, out: &mut Vec<u8>);
    /// Checks the bytes one read returned; answers how many answers they
    /// completed, or what was wrong with them.
    fn read_response(&mut self, input: &[u8]) -> Result<usize, String>;
}

/// The shape of one measured run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) connections: usize,
    /// Requests in flight per connection.
    pub(crate) depth: usize,
    /// Load before the measurement starts (connections warm, caches full).
    pub(crate) warmup: Duration,
    pub(crate) measure: Duration,
}

/// Latency percentiles of one run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Percentiles {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

impl Percentiles {
    /// The 50th and 99th percentiles of `samples` (sorted in place).
    pub(crate) fn of(samples: &mut [Duration]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
        Percentiles { p50: at(0.50), p99: at(0.99) }
    }
}

/// What one measured run produced.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// Answers completed inside the measurement window.
    pub(crate) completed: u64,
    pub(crate) window: Duration,
    /// CPU time in the window: the server's (all threads, user and
    /// system), the generator's, and the rest of the machine's.
    pub(crate) cpu: CpuUse,
    pub(crate) latency: Percentiles,
    /// Bytes received in the window (per answer: the answer's size).
    pub(crate) bytes_in: u64,
}

struct Connection<E> {
    stream: TcpStream,
    exchange: E,
    /// Requests written to `out` but not yet to the socket start at `out_at`.
    out: Vec<u8>,
    out_at: usize,
    /// When each request in flight was queued, oldest first.
    sent_at: VecDeque<Instant>,
    waits_for_room: bool,
}

impl<E: Exchange> Connection<E> {
    fn top_up(&mut self, depth: usize, now: Instant) {
        while self.sent_at.len() < depth {
            self.exchange.write_request(&mut self.out);
            self.sent_at.push_back(now);
        }
    }

    /// Writes what is queued; waits for room when the socket takes less.
    fn flush(&mut self, epoll: &Epoll, token: u64) -> io::Result<()> {
        while self.out_at < self.out.len() {
            match self.stream.write(&self.out[self.out_at..]) {
                Ok(n) => self.out_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let done = self.out_at == self.out.len();
        if done {
            self.out.clear();
            self.out_at = 0;
        }
        if done == self.waits_for_room {
            self.waits_for_room = !done;
            epoll.modify(&self.stream, token, if done { Interest::READ } else { Interest::READ_WRITE })?;
        }
        Ok(())
    }
}

/// Connects `plan.connections` times to `target` and runs the closed loop:
/// `plan.warmup` unmeasured, then `plan.measure` measured, reading the CPU
/// time of `server_pid` at both ends of the window.
///
/// # Errors
///
/// If a connection cannot be made, an answer is wrong, the server closes a
/// connection, or nothing is answered for [`STALL`].
pub(crate) fn drive<E: Exchange>(
    target: SocketAddr,
    server_pid: u32,
    plan: &Plan,
    mut new_exchange: impl FnMut(usize) -> E,
) -> anyhow::Result<Sample> {
    let mut epoll = Epoll::new(1024)?;
    let mut connections = Vec::with_capacity(plan.connections);
    for index in 0..plan.connections {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("connection {index} to {target}"))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        epoll.add(&stream, index as u64, Interest::READ)?;
        connections.push(Connection {
            stream,
            exchange: new_exchange(index),
            out: Vec::new(),
            out_at: 0,
            sent_at: VecDeque::with_capacity(plan.depth),
            waits_for_room: false,
        });
    }
    let result = run_loop(&mut epoll, &mut connections, server_pid, plan);
    hold::abort(connections.iter().map(|connection| &connection.stream));
    result
}

fn run_loop<E: Exchange>(
    epoll: &mut Epoll,
    connections: &mut [Connection<E>],
    server_pid: u32,
    plan: &Plan,
) -> anyhow::Result<Sample> {
    let start = Instant::now();
    for (index, connection) in connections.iter_mut().enumerate() {
        connection.top_up(plan.depth, start);
        connection.flush(epoll, index as u64)?;
    }
    let measure_from = start + plan.warmup;
    let until = measure_from + plan.measure;
    let mut window_start = None;
    let mut cpu_before = None;
    let mut completed = 0u64;
    let mut bytes_in = 0u64;
    let mut latencies = Vec::new();
    let mut last_progress = start;
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut ready = Vec::with_capacity(1024);
    loop {
        let now = Instant::now();
        if window_start.is_none() && now >= measure_from {
            cpu_before = Some(CpuSnapshot::take(server_pid).context("CPU time")?);
            window_start = Some(now);
        }
        if let Some(window_start) = window_start.filter(|_| now >= until) {
            let cpu_after = CpuSnapshot::take(server_pid).context("CPU time")?;
            return Ok(Sample {
                completed,
                window: now - window_start,
                cpu: cpu_before.expect("taken with window_start").until(&cpu_after),
                latency: Percentiles::of(&mut latencies),
                bytes_in,
            });
        }
        if now - last_progress > STALL {
            let waiting = connections.iter().filter(|connection| !connection.sent_at.is_empty()).count();
            bail!("no answer for {STALL:?}: {waiting} connections are waiting for one");
        }
        let deadline = if window_start.is_some() { until } else { measure_from };
        ready.clear();
        ready.extend(epoll.wait(Some(deadline.saturating_duration_since(now).min(Duration::from_millis(100))))?);
        let now = Instant::now();
        let measuring = window_start.is_some();
        for event in &ready {
            let index = event.token as usize;
            let connection = &mut connections[index];
            if event.readable || event.failed {
                match connection.stream.read(&mut buffer) {
                    Ok(0) => bail!("connection {index}: the server closed it"),
                    Ok(n) => {
                        let answers = connection
                            .exchange
                            .read_response(&buffer[..n])
                            .map_err(|e| anyhow!("connection {index}: {e}"))?;
                        for _ in 0..answers {
                            let sent = connection
                                .sent_at
                                .pop_front()
                                .ok_or_else(|| anyhow!("connection {index}: an answer to no request"))?;
                            if measuring {
                                latencies.push(now - sent);
                            }
                        }
                        if measuring {
                            completed += answers as u64;
                            bytes_in += n as u64;
                        }
                        if answers > 0 {
                            last_progress = now;
                            connection.top_up(plan.depth, now);
                        }
                    }
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                    Err(e) => bail!("connection {index}: {e}"),
                }
            }
            if connection.out_at < connection.out.len() {
                connection.flush(epoll, event.token).with_context(|| format!("connection {index}"))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Percentiles;

    #[test]
    fn percentiles_pick_the_sample_at_or_above_the_rank() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let percentiles = Percentiles::of(&mut samples);
        assert_eq!(percentiles.p50, Duration::from_micros(50));
        assert_eq!(percentiles.p99, Duration::from_micros(99));
        assert_eq!(Percentiles::of(&mut [Duration::from_micros(7)]).p99, Duration::from_micros(7));
    }
}
