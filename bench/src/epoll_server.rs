//! The ceilings: a minimal single-threaded, level-triggered epoll server,
//! as short as a server can be and still be correct. One read per readiness
//! event into one shared 64 KiB buffer, the answer written at once from
//! there, `TCP_NODELAY`; only what a full send buffer refuses is copied, and
//! that connection stops reading until it has gone. The echo and HTTP
//! baselines differ only in their [`Responder`].

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};

use socket2::{Domain, Socket, Type};

use crate::sys::{Epoll, Interest};

/// The listening socket's token; connections are numbered from 0.
const LISTENER: u64 = u64::MAX;
/// Accepts per listener event, so that a connection storm cannot starve
/// the connections already open.
const ACCEPTS_PER_EVENT: usize = 64;
const READ_BUFFER: usize = 64 * 1024;

/// What a server answers.
pub trait Responder {
    /// Per-connection state (framing across reads).
    type Connection: Default;
    /// The bytes to send for `input`, what one read of `connection` returned.
    fn respond<'a>(&'a mut self, connection: &mut Self::Connection, input: &'a [u8]) -> &'a [u8];
}

/// Every byte back, as it came.
#[derive(Debug, Default)]
pub struct Echo;

impl Responder for Echo {
    type Connection = ();
    fn respond<'a>(&'a mut self, _connection: &mut (), input: &'a [u8]) -> &'a [u8] {
        input
    }
}

/// One fixed response for every request head (each `\r\n\r\n`), however
/// the requests are split or pipelined; requests have no body.
#[derive(Debug)]
pub struct FixedResponse {
    response: Vec<u8>,
    output: Vec<u8>,
}

impl FixedResponse {
    /// Answers every request with `response`.
    pub fn new(response: Vec<u8>) -> FixedResponse {
        FixedResponse { response, output: Vec::new() }
    }
}

/// How many bytes of `\r\n\r\n` the end of a connection's input matched.
#[derive(Debug, Default)]
pub struct HeadEnd(usize);

impl Responder for FixedResponse {
    type Connection = HeadEnd;
    fn respond<'a>(&'a mut self, connection: &mut HeadEnd, input: &'a [u8]) -> &'a [u8] {
        const END: &[u8] = b"\r\n\r\n";
        self.output.clear();
        for &byte in input {
            connection.0 = if byte == END[connection.0] {
                connection.0 + 1
            } else if byte == b'\r' {
                1
            } else {
                0
            };
            if connection.0 == END.len() {
                connection.0 = 0;
                self.output.extend_from_slice(&self.response);
            }
        }
        &self.output
    }
}

/// A listening socket on `address` with a backlog of 4096 (std's
/// `TcpListener::bind` uses 128, which drops SYNs in a connection storm).
///
/// # Errors
///
/// If the address cannot be bound.
pub fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

struct Connection<C> {
    stream: TcpStream,
    state: C,
    /// What the send buffer refused; while not empty, the connection is not read.
    unsent: Vec<u8>,
}

/// Serves `listener` forever on the calling thread.
///
/// # Errors
///
/// If epoll itself fails; a failing connection is only closed.
pub fn serve<R: Responder>(listener: TcpListener, mut responder: R) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut epoll = Epoll::new(1024)?;
    epoll.add(&listener, LISTENER, Interest::READ)?;
    let mut connections: Vec<Option<Connection<R::Connection>>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buffer = vec![0u8; READ_BUFFER];
    let mut ready = Vec::with_capacity(1024);
    loop {
        ready.clear();
        ready.extend(epoll.wait(None)?);
        for event in &ready {
            if event.token == LISTENER {
                for _ in 0..ACCEPTS_PER_EVENT {
                    let stream = match listener.accept() {
                        Ok((stream, _)) => stream,
                        // EMFILE and friends: try again on the next event.
                        Err(_) => break,
                    };
                    if stream.set_nonblocking(true).is_err() || stream.set_nodelay(true).is_err() {
                        continue;
                    }
                    let index = free.pop().unwrap_or_else(|| {
                        connections.push(None);
                        connections.len() - 1
                    });
                    if epoll.add(&stream, index as u64, Interest::READ).is_err() {
                        free.push(index);
                        continue;
                    }
                    connections[index] =
                        Some(Connection { stream, state: R::Connection::default(), unsent: Vec::new() });
                }
                continue;
            }
            let index = event.token as usize;
            let Some(connection) = connections[index].as_mut() else { continue };
            let open = if !connection.unsent.is_empty() {
                flush(&epoll, index, connection)
            } else if event.readable || event.failed {
                match connection.stream.read(&mut buffer) {
                    Ok(0) => false,
                    Ok(n) => {
                        let output = responder.respond(&mut connection.state, &buffer[..n]);
                        send(&epoll, index, connection, output)
                    }
                    Err(e) => e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted,
                }
            } else {
                true
            };
            if !open {
                // Dropping the stream closes it, which also removes it from epoll.
                connections[index] = None;
                free.push(index);
            }
        }
    }
}

/// Writes `output` directly; keeps what did not fit and waits for room.
/// Returns whether the connection is still open.
fn send<C>(epoll: &Epoll, index: usize, connection: &mut Connection<C>, output: &[u8]) -> bool {
    if output.is_empty() {
        return true;
    }
    let written = match connection.stream.write(output) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(_) => return false,
    };
    if written < output.len() {
        connection.unsent.extend_from_slice(&output[written..]);
        return epoll.modify(&connection.stream, index as u64, Interest::WRITE).is_ok();
    }
    true
}

/// Writes what was left over; reads again once it is all gone.
fn flush<C>(epoll: &Epoll, index: usize, connection: &mut Connection<C>) -> bool {
    match connection.stream.write(&connection.unsent) {
        Ok(n) => {
            connection.unsent.drain(..n);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(_) => return false,
    }
    if connection.unsent.is_empty() {
        return epoll.modify(&connection.stream, index as u64, Interest::READ).is_ok();
    }
    true
}
