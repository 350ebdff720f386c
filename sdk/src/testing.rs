//! Run a plugin against real loopback sockets without the daemon.
//!
//! [`TestServer::start`] binds `127.0.0.1:0` on a thread of its own and
//! serves it with your [`Plugin`]'s listening dispatcher, calling your
//! dispatchers the way the daemon does: `readable()`/`writable()` before
//! waiting, `handle_read` when input (or EOF) waits, output queued by `send`
//! flushed for you, `handle_close` once on EOF, `handle_error` on a socket
//! error, timers from `call_later`, and a caught panic closing only its
//! channel. Your test talks to it with plain blocking `TcpStream`s.
//!
//! ```
//! use std::io::{Read, Write};
//! use asyncore_sdk::{prelude::*, testing::TestServer};
//!
//! struct Upper;
//! impl Dispatcher for Upper {
//!     fn handle_read(&mut self, channel: &mut Channel<'_>) {
//!         let mut buf = [0u8; 1024];
//!         if let Ok(n @ 1..) = channel.recv(&mut buf) {
//!             channel.send(&buf[..n].to_ascii_uppercase());
//!         }
//!     }
//! }
//! struct Server;
//! impl Dispatcher for Server {
//!     fn handle_accepted(&mut self, _: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
//!         Some(Box::new(Upper))
//!     }
//! }
//! struct UpperPlugin;
//! impl Plugin for UpperPlugin {
//!     const NAME: &'static str = "upper";
//!     const VERSION: &'static str = "1";
//!     fn listen(_: &Config) -> Result<Box<dyn Dispatcher>, String> {
//!         Ok(Box::new(Server))
//!     }
//! }
//!
//! let server = TestServer::start::<UpperPlugin>(Config::default()).unwrap();
//! let mut client = std::net::TcpStream::connect(server.addr()).unwrap();
//! client.write_all(b"hello").unwrap();
//! let mut back = [0u8; 5];
//! client.read_exact(&mut back).unwrap();
//! assert_eq!(&back, b"HELLO");
//! ```
//!
//! The harness is simpler than the daemon's loop: it polls every channel on
//! each pass (sleeping a millisecond when nothing happened) instead of
//! waiting on epoll, `Channel::connect` connects synchronously, and
//! `Channel::attach_fd` is not supported (it answers `Unsupported`).

use std::{
    cell::RefCell,
    collections::VecDeque,
    ffi::c_void,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    channel::Channel,
    config::Config,
    dispatcher::Dispatcher,
    export::{Plugin, install_test_host},
    ffi::{self, DispatcherHandle, HostCtx, HostVtable, StrRef},
};

/// What a running [`TestServer`] shares with the test.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    channels: AtomicU64,
    panics: AtomicU64,
    logs: Mutex<Vec<String>>,
}

/// A plugin served on `127.0.0.1:0` by a loop on its own thread; stopped on
/// drop.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TestServer {
    /// Starts serving plugin `P` with `config`.
    ///
    /// # Errors
    ///
    /// The message of `P::listen` refusing the config, or of binding.
    pub fn start<P: Plugin>(config: Config) -> Result<TestServer, String> {
        install_test_host(&TEST_HOST);
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| format!("bind: {e}"))?;
        let addr = listener.local_addr().map_err(|e| format!("bind: {e}"))?;
        let shared = Arc::new(Shared::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("test-loop".into())
                .spawn(move || {
                    // Dispatchers are not Send: create them on this thread.
                    let listening = match catch_unwind(|| P::listen(&config)) {
                        Ok(Ok(dispatcher)) => dispatcher,
                        Ok(Err(message)) => return drop(ready_tx.send(Err(message))),
                        Err(_) => return drop(ready_tx.send(Err("listen panicked".into()))),
                    };
                    let _ = ready_tx.send(Ok(()));
                    run(listener, listening, &shared);
                })
                .map_err(|e| format!("spawn: {e}"))?
        };
        ready_rx.recv().map_err(|_| "the test loop died".to_string())??;
        Ok(TestServer { addr, shared, thread: Some(thread) })
    }

    /// The address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Channels open now (connections, not the listener).
    pub fn n_channels(&self) -> u64 {
        self.shared.channels.load(Ordering::SeqCst)
    }

    /// Callbacks that panicked so far.
    pub fn panics(&self) -> u64 {
        self.shared.panics.load(Ordering::SeqCst)
    }

    /// Everything logged so far (by `log!`, and one line per caught panic).
    pub fn logs(&self) -> Vec<String> {
        self.shared.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct TestChannel {
    id: u64,
    stream: TcpStream,
    dispatcher: Option<Box<dyn Dispatcher>>,
    out: VecDeque<u8>,
    connected: bool,
    eof: bool,
    closing: bool,
    shutdown_after_flush: bool,
    write_shut: bool,
    failed: Option<io::Error>,
}

struct Loop {
    channels: Vec<TestChannel>,
    timers: Vec<(Instant, u64, u64, u64)>,
    next_id: u64,
    next_timer: u64,
    shared: Arc<Shared>,
}

thread_local! {
    /// The logs of the server running on this thread, for `log`.
    static LOGS: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
}

/// Context of one callback: the loop and the channel it is about.
struct Ctx {
    lp: *mut Loop,
    index: Option<usize>,
}

fn run(listener: TcpListener, mut listening: Box<dyn Dispatcher>, shared: &Arc<Shared>) {
    LOGS.with(|l| *l.borrow_mut() = Some(shared.clone()));
    let mut lp = Loop { channels: Vec::new(), timers: Vec::new(), next_id: 1, next_timer: 1, shared: shared.clone() };
    while !shared.stop.load(Ordering::SeqCst) {
        let mut busy = false;
        while let Ok((stream, _)) = listener.accept() {
            busy = true;
            let _ = stream.set_nonblocking(true);
            let _ = stream.set_nodelay(true);
            let index = lp.add(stream, None, true);
            let accepted = lp.call_with(Some(index), |ch| listening.handle_accepted(ch));
            match accepted {
                Ok(Some(dispatcher)) => lp.channels[index].dispatcher = Some(dispatcher),
                _ => lp.channels[index].closing = true,
            }
        }
        busy |= lp.pass();
        shared.channels.store(lp.channels.len() as u64, Ordering::SeqCst);
        if !busy {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Loop {
    fn add(&mut self, stream: TcpStream, dispatcher: Option<Box<dyn Dispatcher>>, connected: bool) -> usize {
        self.channels.push(TestChannel {
            id: self.next_id,
            stream,
            dispatcher,
            out: VecDeque::new(),
            connected,
            eof: false,
            closing: false,
            shutdown_after_flush: false,
            write_shut: false,
            failed: None,
        });
        self.next_id += 1;
        self.channels.len() - 1
    }

    /// Calls `f` with a `Channel` for `index`, catching a panic.
    fn call_with<R>(&mut self, index: Option<usize>, f: impl FnOnce(&mut Channel<'_>) -> R) -> Result<R, ()> {
        let mut ctx = Ctx { lp: self, index };
        // SAFETY: ctx lives across the call; host functions reach the loop
        // only through it while `self` is not used.
        let mut channel = unsafe { Channel::from_ctx((&raw mut ctx).cast::<HostCtx>()) };
        let result = catch_unwind(AssertUnwindSafe(|| f(&mut channel)));
        result.map_err(|payload| {
            let message = crate::export::panic_message(payload.as_ref());
            self.shared.panics.fetch_add(1, Ordering::SeqCst);
            self.log(format!("panicked: {message}"));
        })
    }

    /// Calls a dispatcher method of channel `index`; a panic poisons it.
    fn dispatch<R>(&mut self, index: usize, f: impl FnOnce(&mut dyn Dispatcher, &mut Channel<'_>) -> R) -> Option<R> {
        let mut dispatcher = self.channels[index].dispatcher.take()?;
        let result = self.call_with(Some(index), |ch| f(dispatcher.as_mut(), ch));
        match result {
            Ok(r) => {
                self.channels[index].dispatcher = Some(dispatcher);
                Some(r)
            }
            Err(()) => {
                // Poisoned: never called again; its channel closes.
                std::mem::forget(dispatcher);
                self.channels[index].closing = true;
                None
            }
        }
    }

    fn log(&self, line: String) {
        if let Ok(mut logs) = self.shared.logs.lock() {
            logs.push(line);
        }
    }

    /// One pass over every channel. Returns whether anything happened.
    fn pass(&mut self) -> bool {
        let mut busy = false;
        let now = Instant::now();
        let due: Vec<(u64, u64)> = {
            let (due, later): (Vec<_>, Vec<_>) = self.timers.drain(..).partition(|t| t.0 <= now);
            self.timers = later;
            due.into_iter().map(|(_, channel, token, _)| (channel, token)).collect()
        };
        for (channel_id, token) in due {
            if let Some(index) = self.channels.iter().position(|c| c.id == channel_id) {
                busy = true;
                self.dispatch(index, |d, ch| d.handle_timer(ch, token));
            }
        }
        let mut index = 0;
        while index < self.channels.len() {
            busy |= self.serve(index);
            let ch = &self.channels[index];
            let done = ch.failed.is_some() || (ch.closing && ch.out.is_empty());
            if done {
                let mut ch = self.channels.remove(index);
                if let Some(error) = ch.failed.take()
                    && let Some(mut dispatcher) = ch.dispatcher.take()
                {
                    self.channels.insert(index, ch);
                    let _ = self.call_with(Some(index), |c| dispatcher.handle_error(c, error));
                    ch = self.channels.remove(index);
                }
                let _ = ch.stream.shutdown(Shutdown::Write);
                busy = true;
                continue;
            }
            index += 1;
        }
        busy
    }

    fn serve(&mut self, index: usize) -> bool {
        let mut busy = false;
        if !self.channels[index].connected {
            self.channels[index].connected = true;
            self.dispatch(index, |d, ch| d.handle_connect(ch));
            busy = true;
        }
        let closing = self.channels[index].closing;
        let (readable, writable) = if closing {
            (false, false)
        } else {
            self.dispatch(index, |d, ch| (d.readable(ch), d.writable(ch))).unwrap_or((false, false))
        };
        let ch = &mut self.channels[index];
        if readable && !ch.eof {
            let mut probe = [0u8; 1];
            match ch.stream.peek(&mut probe) {
                Ok(_) => {
                    busy = true;
                    self.dispatch(index, |d, ch| d.handle_read(ch));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => self.channels[index].failed = Some(e),
            }
            let ch = &mut self.channels[index];
            if ch.eof && !ch.closing && ch.dispatcher.is_some() {
                self.dispatch(index, |d, ch| d.handle_close(ch));
            }
        }
        let ch = &mut self.channels[index];
        if !ch.out.is_empty() {
            let (front, _) = ch.out.as_slices();
            match ch.stream.write(front) {
                Ok(n) => {
                    ch.out.drain(..n);
                    busy |= n > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => ch.failed = Some(e),
            }
        }
        let ch = &mut self.channels[index];
        if ch.out.is_empty() && ch.shutdown_after_flush && !ch.write_shut {
            ch.write_shut = true;
            let _ = ch.stream.shutdown(Shutdown::Write);
        }
        if writable && ch.out.is_empty() && !ch.closing {
            self.dispatch(index, |d, ch| d.handle_write(ch));
        }
        busy
    }
}

/// The loop and channel of a host call, or `None` for a call about no
/// channel.
///
/// # Safety
///
/// `ctx` must be the context of a running call made by [`Loop::call_with`].
unsafe fn resolve<'a>(ctx: *mut HostCtx) -> Option<(&'a mut Loop, usize)> {
    // SAFETY: guaranteed by the caller.
    let ctx = unsafe { &mut *ctx.cast::<Ctx>() };
    // SAFETY: the loop outlives the call and is used only through ctx.
    let lp = unsafe { &mut *ctx.lp };
    Some((lp, ctx.index?))
}

fn find(lp: &Loop, id: u64) -> Option<usize> {
    lp.channels.iter().position(|c| c.id == id)
}

fn queue(ch: &mut TestChannel, data: &[u8]) -> i64 {
    if ch.closing || ch.write_shut || ch.shutdown_after_flush || ch.failed.is_some() {
        return 0;
    }
    ch.out.extend(data);
    data.len() as i64
}

const EBADF: i64 = 9;
const ENOENT: i64 = 2;
const EOPNOTSUPP: i64 = 95;

unsafe extern "C" fn log(_data: *mut c_void, _level: u32, message: StrRef) {
    // SAFETY: the message is lent for this call.
    let message = unsafe { message.to_string_lossy() };
    LOGS.with(|l| {
        if let Some(shared) = l.borrow().as_ref()
            && let Ok(mut logs) = shared.logs.lock()
        {
            logs.push(message);
        }
    });
}

unsafe extern "C" fn report(_ctx: *mut HostCtx, _message: StrRef) {
    // Panics are caught and logged by the harness itself.
}

unsafe extern "C" fn channel_id(ctx: *mut HostCtx) -> u64 {
    // SAFETY: ctx is live for the call.
    unsafe { resolve(ctx) }.map_or(0, |(lp, i)| lp.channels[i].id)
}

unsafe extern "C" fn send(ctx: *mut HostCtx, data: *const u8, len: usize) -> i64 {
    // SAFETY: ctx is live; the plugin lends len bytes.
    let (Some((lp, i)), data) = (unsafe { resolve(ctx) }, unsafe { StrRef { ptr: data, len }.as_bytes() }) else {
        return -EBADF;
    };
    queue(&mut lp.channels[i], data)
}

unsafe extern "C" fn recv(ctx: *mut HostCtx, buf: *mut u8, cap: usize) -> i64 {
    // SAFETY: ctx is live for the call.
    let Some((lp, i)) = (unsafe { resolve(ctx) }) else { return -EBADF };
    let ch = &mut lp.channels[i];
    if ch.eof || cap == 0 {
        return 0;
    }
    // SAFETY: the plugin lends a writable buffer of cap bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(buf, cap) };
    match ch.stream.read(buf) {
        Ok(0) => {
            ch.eof = true;
            0
        }
        Ok(n) => n as i64,
        Err(e) => {
            let code = -i64::from(e.raw_os_error().unwrap_or(5));
            if e.kind() != io::ErrorKind::WouldBlock {
                ch.failed = Some(e);
            }
            code
        }
    }
}

unsafe extern "C" fn close(ctx: *mut HostCtx) -> i32 {
    // SAFETY: ctx is live for the call.
    if let Some((lp, i)) = unsafe { resolve(ctx) } {
        lp.channels[i].closing = true;
    }
    0
}

unsafe extern "C" fn pending_output(ctx: *mut HostCtx) -> u64 {
    // SAFETY: ctx is live for the call.
    unsafe { resolve(ctx) }.map_or(0, |(lp, i)| lp.channels[i].out.len() as u64)
}

unsafe extern "C" fn address(ctx: *mut HostCtx, which: u32, buf: *mut u8, cap: usize) -> i64 {
    // SAFETY: ctx is live for the call.
    let Some((lp, i)) = (unsafe { resolve(ctx) }) else { return -EBADF };
    let stream = &lp.channels[i].stream;
    let address = if which == ffi::address::PEER { stream.peer_addr() } else { stream.local_addr() };
    let Ok(text) = address.map(|a| a.to_string()) else { return -EBADF };
    // SAFETY: the plugin lends a writable buffer of cap bytes.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf, text.len().min(cap)) };
    text.len() as i64
}

unsafe extern "C" fn connect(ctx: *mut HostCtx, addr: StrRef, handle: DispatcherHandle) -> i64 {
    // SAFETY: the handle was made by this SDK's into_handle.
    let dispatcher = unsafe { crate::export::from_handle(handle) };
    // SAFETY: ctx is live for the call; the address is lent.
    let (Some((lp, _)), addr) = (unsafe { resolve(ctx) }, unsafe { addr.to_string_lossy() }) else {
        return -EBADF;
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else { return -22 };
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|s| {
        s.set_nonblocking(true)?;
        Ok(s)
    }) {
        Ok(stream) => {
            let index = lp.add(stream, Some(dispatcher), false);
            lp.channels[index].id as i64
        }
        Err(e) => -i64::from(e.raw_os_error().unwrap_or(111)),
    }
}

unsafe extern "C" fn send_to(ctx: *mut HostCtx, id: u64, data: *const u8, len: usize) -> i64 {
    // SAFETY: ctx is live; the plugin lends len bytes.
    let (Some((lp, _)), data) = (unsafe { resolve(ctx) }, unsafe { StrRef { ptr: data, len }.as_bytes() }) else {
        return -EBADF;
    };
    match find(lp, id) {
        Some(target) => queue(&mut lp.channels[target], data),
        None => -EBADF,
    }
}

unsafe extern "C" fn pending_output_of(ctx: *mut HostCtx, id: u64) -> i64 {
    // SAFETY: ctx is live for the call.
    let Some((lp, _)) = (unsafe { resolve(ctx) }) else { return -EBADF };
    find(lp, id).map_or(-EBADF, |target| lp.channels[target].out.len() as i64)
}

unsafe extern "C" fn wake(ctx: *mut HostCtx, id: u64) -> i64 {
    // Every channel is re-asked on every pass here.
    // SAFETY: ctx is live for the call.
    let Some((lp, _)) = (unsafe { resolve(ctx) }) else { return -EBADF };
    if find(lp, id).is_some() { 0 } else { -EBADF }
}

unsafe extern "C" fn call_later(ctx: *mut HostCtx, delay_ms: u64, token: u64) -> i64 {
    // SAFETY: ctx is live for the call.
    let Some((lp, i)) = (unsafe { resolve(ctx) }) else { return -EBADF };
    let id = lp.next_timer;
    lp.next_timer += 1;
    let at = Instant::now() + Duration::from_millis(delay_ms);
    lp.timers.push((at, lp.channels[i].id, token, id));
    id as i64
}

unsafe extern "C" fn cancel_timer(ctx: *mut HostCtx, timer_id: u64) -> i64 {
    // SAFETY: ctx is live for the call.
    let Some((lp, _)) = (unsafe { resolve(ctx) }) else { return -EBADF };
    let before = lp.timers.len();
    lp.timers.retain(|t| t.3 != timer_id);
    if lp.timers.len() < before { 0 } else { -ENOENT }
}

unsafe extern "C" fn shutdown_write(ctx: *mut HostCtx) -> i64 {
    // SAFETY: ctx is live for the call.
    let Some((lp, i)) = (unsafe { resolve(ctx) }) else { return -EBADF };
    lp.channels[i].shutdown_after_flush = true;
    0
}

unsafe extern "C" fn attach_fd(_ctx: *mut HostCtx, fd: i32, handle: DispatcherHandle) -> i64 {
    // SAFETY: ownership of both passed to us: free them.
    drop(unsafe { crate::export::from_handle(handle) });
    if fd >= 0 {
        // SAFETY: the plugin passed ownership of an open descriptor.
        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    -EOPNOTSUPP
}

static TEST_HOST: HostVtable = HostVtable {
    size: size_of::<HostVtable>() as u32,
    abi_major: ffi::ABI_MAJOR,
    abi_minor: ffi::ABI_MINOR,
    log,
    report,
    channel_id,
    send,
    recv,
    close,
    pending_output,
    address,
    connect,
    send_to,
    pending_output_of,
    wake,
    call_later,
    cancel_timer,
    shutdown_write,
    attach_fd,
    hand_over,
};

unsafe extern "C" fn hand_over(_ctx: *mut HostCtx, _state: *const u8, _len: usize) {
    // The harness runs one generation: nothing is ever handed over.
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use super::*;
    use crate::{AsyncChat, Chat, ChatHandler};

    struct Lines;

    impl ChatHandler for Lines {
        fn found_terminator(&mut self, chat: &mut Chat<'_>) {
            match chat.incoming() {
                b"quit" => {
                    chat.clear_incoming();
                    chat.push(b"bye\n");
                    chat.close_when_done();
                }
                b"boom" => panic!("asked to panic"),
                _ => {
                    chat.append_incoming(b"\n");
                    chat.push_incoming();
                }
            }
        }
    }

    struct Server;

    impl Dispatcher for Server {
        fn handle_accepted(&mut self, _: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
            Some(Box::new(AsyncChat::new(Lines).with_terminator(b"\n")))
        }
    }

    struct LinesPlugin;

    impl Plugin for LinesPlugin {
        const NAME: &'static str = "lines";
        const VERSION: &'static str = "0";

        fn listen(config: &Config) -> Result<Box<dyn Dispatcher>, String> {
            if config.get("refuse").is_some() {
                return Err("config refuse: refused".into());
            }
            Ok(Box::new(Server))
        }
    }

    #[test]
    fn an_async_chat_over_real_sockets() {
        let server = TestServer::start::<LinesPlugin>(Config::default()).unwrap();
        let mut client = TcpStream::connect(server.addr()).unwrap();
        // Split across writes, one byte at a time for the first line.
        for byte in b"one\n" {
            client.write_all(&[*byte]).unwrap();
            thread::sleep(Duration::from_millis(2));
        }
        client.write_all(b"two\nthree\nquit\nignored\n").unwrap();
        let mut lines = Vec::new();
        for line in BufReader::new(client).lines() {
            lines.push(line.unwrap());
        }
        assert_eq!(lines, ["one", "two", "three", "bye"]);
    }

    #[test]
    fn a_panic_closes_only_its_channel() {
        let server = TestServer::start::<LinesPlugin>(Config::default()).unwrap();
        let mut calm = BufReader::new(TcpStream::connect(server.addr()).unwrap());
        let mut doomed = TcpStream::connect(server.addr()).unwrap();
        doomed.write_all(b"boom\n").unwrap();
        let mut rest = Vec::new();
        doomed.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        calm.get_mut().write_all(b"still here\n").unwrap();
        let mut line = String::new();
        calm.read_line(&mut line).unwrap();
        assert_eq!(line, "still here\n");
        assert_eq!(server.panics(), 1);
        assert!(server.logs().iter().any(|l| l.contains("asked to panic")), "{:?}", server.logs());
    }

    #[test]
    fn a_refused_config_is_an_error() {
        let error = TestServer::start::<LinesPlugin>(Config::from_pairs([("refuse", "yes")])).unwrap_err();
        assert!(error.contains("refuse"), "{error}");
    }
}
