//! The poller: level-triggered `epoll` and an `eventfd` waker, with one
//! system call per wait.
//!
//! The `polling` crate, which the loop used before, makes five system calls
//! per wait on Linux: it re-arms a `timerfd` for the timeout
//! (`timerfd_settime`, then `epoll_ctl`), waits, then reads its notifier
//! (a failing `read` when nobody notified) and re-arms it (`epoll_ctl`).
//! A one-connection exchange pays all of them for every message. Here the
//! timeout is `epoll_wait`'s own, in milliseconds rounded up (a timer fires
//! at most a millisecond late, never early, so the loop never spins waiting
//! for one), and the waker is an `eventfd` registered once, level-triggered:
//! it is written only by the first [`Poller::notify`] since the loop last
//! woke for it, and read only when it woke the loop.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// The key the waker's events carry; no slot reaches it.
const NOTIFY_KEY: usize = usize::MAX;

/// How a source is registered. Only level-triggered, what asyncore's loop
/// is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PollMode {
    Level,
}

/// Interest in, or readiness of, one registered source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) key: usize,
    pub(crate) readable: bool,
    pub(crate) writable: bool,
    /// Urgent data (`EPOLLPRI`).
    priority: bool,
    /// A hang-up (`EPOLLHUP`), which epoll reports whatever the interest.
    interrupt: bool,
}

impl Event {
    pub(crate) fn new(key: usize, readable: bool, writable: bool) -> Event {
        Event { key, readable, writable, priority: false, interrupt: false }
    }

    /// Also ask for urgent data.
    pub(crate) fn with_priority(self) -> Event {
        Event { priority: true, ..self }
    }

    pub(crate) fn is_priority(&self) -> bool {
        self.priority
    }

    pub(crate) fn is_interrupt(&self) -> bool {
        self.interrupt
    }

    /// As `polling` asked: reading includes urgent data; hang-ups and
    /// errors are always reported.
    fn to_epoll(self) -> libc::epoll_event {
        let mut bits = 0;
        if self.readable {
            bits |= libc::EPOLLIN | libc::EPOLLPRI;
        }
        if self.writable {
            bits |= libc::EPOLLOUT;
        }
        if self.priority {
            bits |= libc::EPOLLPRI;
        }
        libc::epoll_event { events: bits as u32, u64: self.key as u64 }
    }

    /// As `polling` reported: a hang-up or an error makes a source both
    /// readable and writable (the next read or write says which), and only
    /// a hang-up is an interrupt.
    fn from_epoll(event: &libc::epoll_event) -> Event {
        let bits = event.events as i32;
        Event {
            key: event.u64 as usize,
            readable: bits & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLPRI) != 0,
            writable: bits & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) != 0,
            priority: bits & libc::EPOLLPRI != 0,
            interrupt: bits & libc::EPOLLHUP != 0,
        }
    }
}

/// The events one wait returned.
#[derive(Debug)]
pub(crate) struct Events {
    list: Vec<libc::epoll_event>,
}

impl Events {
    /// Room for 1,024 events a wait, as `polling` had.
    pub(crate) fn new() -> Events {
        Events { list: Vec::with_capacity(1024) }
    }

    pub(crate) fn clear(&mut self) {
        self.list.clear();
    }

    /// The events of sources (the waker's are left out).
    pub(crate) fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        self.list.iter().map(Event::from_epoll).filter(|event| event.key != NOTIFY_KEY)
    }
}

/// An epoll instance with its waker. Shared: the loop waits on it, any
/// thread may [`notify`](Poller::notify) it.
#[derive(Debug)]
pub(crate) struct Poller {
    epoll: OwnedFd,
    waker: OwnedFd,
    /// Set by the first `notify` since the loop last consumed the waker: the
    /// others need not write.
    notified: AtomicBool,
}

/// `Err` with the OS error when a libc call answers -1.
fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result == -1 { Err(io::Error::last_os_error()) } else { Ok(result) }
}

impl Poller {
    pub(crate) fn new() -> io::Result<Poller> {
        // SAFETY: plain system calls; each descriptor is owned at once.
        let epoll = unsafe { OwnedFd::from_raw_fd(check(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        // SAFETY: as above.
        let waker = unsafe { OwnedFd::from_raw_fd(check(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?) };
        let poller = Poller { epoll, waker, notified: AtomicBool::new(false) };
        poller.ctl(libc::EPOLL_CTL_ADD, poller.waker.as_raw_fd(), Event::new(NOTIFY_KEY, true, false))?;
        Ok(poller)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, event: Event) -> io::Result<()> {
        let mut event = event.to_epoll();
        // SAFETY: `event` is a valid epoll_event for the call's duration.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) })?;
        Ok(())
    }

    /// Registers `source` with `interest`.
    ///
    /// # Safety
    ///
    /// The source must be [`delete`](Poller::delete)d before it is closed.
    pub(crate) unsafe fn add_with_mode(&self, source: impl AsFd, interest: Event, _mode: PollMode) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, source.as_fd().as_raw_fd(), interest)
    }

    /// Changes the interest of a registered source.
    pub(crate) fn modify_with_mode(&self, source: impl AsFd, interest: Event, _mode: PollMode) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, source.as_fd().as_raw_fd(), interest)
    }

    /// Removes a registered source.
    pub(crate) fn delete(&self, source: impl AsFd) -> io::Result<()> {
        // The event is ignored by EPOLL_CTL_DEL (Linux 2.6.9 and later).
        self.ctl(libc::EPOLL_CTL_DEL, source.as_fd().as_raw_fd(), Event::new(0, false, false))
    }

    /// Waits for events, up to `timeout` (rounded up to a millisecond; for
    /// ever when `None`), or until [`notify`](Poller::notify). Returns the
    /// number of events, the waker's included.
    pub(crate) fn wait(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<usize> {
        let timeout_ms = match timeout {
            None => -1,
            Some(timeout) => {
                let ms = timeout.as_nanos().div_ceil(1_000_000);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
        events.list.clear();
        let capacity = libc::c_int::try_from(events.list.capacity()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the kernel writes at most `capacity` events into the
        // vector's spare room; `set_len` below covers only those.
        let n =
            check(unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.list.as_mut_ptr(), capacity, timeout_ms) })?
                as usize;
        // SAFETY: the kernel initialised the first `n` entries.
        unsafe { events.list.set_len(n) };
        if events.list.iter().any(|event| event.u64 as usize == NOTIFY_KEY) {
            self.consume_notification();
        }
        Ok(n)
    }

    /// Wakes the thread in [`wait`](Poller::wait), or makes its next wait
    /// return at once.
    pub(crate) fn notify(&self) -> io::Result<()> {
        if self.notified.swap(true, Ordering::SeqCst) {
            // Already pending: the loop has yet to consume the waker, and
            // serves everything queued before this call when it does.
            return Ok(());
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        let written = unsafe { libc::write(self.waker.as_raw_fd(), (&raw const one).cast(), 8) };
        if written == -1 {
            let error = io::Error::last_os_error();
            // EAGAIN: the counter is full, so the loop wakes anyway.
            if error.kind() != io::ErrorKind::WouldBlock {
                self.notified.store(false, Ordering::SeqCst);
                return Err(error);
            }
        }
        Ok(())
    }

    /// Resets the waker, then lets the next `notify` write again. In this
    /// order: a `notify` that finds `notified` still set comes before the
    /// loop serves its queue (which follows this wait), so nothing it sent is
    /// missed; one after the reset writes, and wakes the next wait.
    fn consume_notification(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our eventfd.
        let _ = unsafe { libc::read(self.waker.as_raw_fd(), (&raw mut count).cast(), 8) };
        self.notified.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        net::{TcpListener, TcpStream},
        sync::Arc,
        time::Instant,
    };

    use super::*;

    #[test]
    fn a_timeout_is_never_cut_short() {
        let poller = Poller::new().unwrap();
        let mut events = Events::new();
        let started = Instant::now();
        // Half a millisecond rounds up, so the wait is not a spin.
        assert_eq!(poller.wait(&mut events, Some(Duration::from_micros(500))).unwrap(), 0);
        assert!(started.elapsed() >= Duration::from_micros(500));
        assert_eq!(poller.wait(&mut events, Some(Duration::ZERO)).unwrap(), 0);
    }

    #[test]
    fn notify_wakes_a_wait_once_and_many_notifies_write_once() {
        let poller = Arc::new(Poller::new().unwrap());
        let mut events = Events::new();
        for _ in 0..3 {
            poller.notify().unwrap();
        }
        assert_eq!(poller.wait(&mut events, None).unwrap(), 1);
        assert_eq!(events.iter().count(), 0, "the waker's event is not a source's");
        // Consumed: the next wait times out.
        assert_eq!(poller.wait(&mut events, Some(Duration::ZERO)).unwrap(), 0);
        // From another thread, into a wait that blocks for ever.
        let other = poller.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            other.notify().unwrap();
        });
        assert_eq!(poller.wait(&mut events, None).unwrap(), 1);
        waker.join().unwrap();
    }

    #[test]
    fn a_socket_is_reported_by_level_until_its_interest_changes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let poller = Poller::new().unwrap();
        let mut events = Events::new();
        // SAFETY: deleted below, before `server` is dropped.
        unsafe { poller.add_with_mode(&server, Event::new(7, true, false).with_priority(), PollMode::Level) }.unwrap();
        assert_eq!(poller.wait(&mut events, Some(Duration::ZERO)).unwrap(), 0);
        client.write_all(b"x").unwrap();
        for _ in 0..2 {
            poller.wait(&mut events, Some(Duration::from_secs(5))).unwrap();
            let got: Vec<Event> = events.iter().collect();
            assert_eq!(got.len(), 1);
            assert!(got[0].key == 7 && got[0].readable && !got[0].writable && !got[0].is_interrupt());
        }
        poller.modify_with_mode(&server, Event::new(7, false, true), PollMode::Level).unwrap();
        poller.wait(&mut events, Some(Duration::from_secs(5))).unwrap();
        let got: Vec<Event> = events.iter().collect();
        assert!(got.len() == 1 && got[0].writable && !got[0].readable, "{got:?}");
        drop(client);
        poller.modify_with_mode(&server, Event::new(7, true, false), PollMode::Level).unwrap();
        poller.wait(&mut events, Some(Duration::from_secs(5))).unwrap();
        assert!(events.iter().next().is_some_and(|event| event.readable));
        poller.delete(&server).unwrap();
        assert_eq!(poller.wait(&mut events, Some(Duration::ZERO)).unwrap(), 0);
    }
}
