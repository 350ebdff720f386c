//! The system calls the harness and the baseline servers make through libc:
//! level-triggered epoll, CPU affinity, the descriptor limit and a few
//! socket options std and socket2 do not offer. All of the crate's unsafe
//! code is here, behind safe functions.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

/// `IP_BIND_ADDRESS_NO_PORT` from `linux/in.h` (not in the libc crate):
/// a socket bound to an address with port 0 gets its port at `connect`,
/// chosen per destination, instead of a port unique for the address.
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;

/// What a registered descriptor is waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// Input, or a peer that hung up.
    pub read: bool,
    /// Room in the send buffer.
    pub write: bool,
}

impl Interest {
    /// Waiting for input only.
    pub const READ: Interest = Interest { read: true, write: false };
    /// Waiting for room to write, input included.
    pub const READ_WRITE: Interest = Interest { read: true, write: true };
    /// Waiting for room to write only (a connect in progress).
    pub const WRITE: Interest = Interest { read: false, write: true };

    fn bits(self) -> u32 {
        let mut bits = 0;
        if self.read {
            bits |= libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32;
        }
        if self.write {
            bits |= libc::EPOLLOUT as u32;
        }
        bits
    }
}

/// One readiness event.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// The token the descriptor was registered with.
    pub token: u64,
    /// Input is waiting, or the peer hung up (a read then says which).
    pub readable: bool,
    /// The send buffer has room, or a connect finished.
    pub writable: bool,
    /// An error or a hang-up in both directions.
    pub failed: bool,
}

/// A level-triggered epoll instance (`epoll(7)`): a ready descriptor is
/// reported on every wait until it is drained, as asyncore expects, so one
/// read per event is right and a short read loses nothing.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    /// A new instance that reports up to `capacity` events per wait.
    ///
    /// # Errors
    ///
    /// If `epoll_create1` fails (out of descriptors).
    pub fn new(capacity: usize) -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a
        // new descriptor that nothing else owns.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd, events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)] })
    }

    fn control(&self, op: libc::c_int, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let mut event = libc::epoll_event { events: interest.bits(), u64: token };
        // SAFETY: event lives across the call; the kernel copies it.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `fd` under `token`.
    ///
    /// # Errors
    ///
    /// As `epoll_ctl(EPOLL_CTL_ADD)`.
    pub fn add(&self, fd: &impl AsRawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), token, interest)
    }

    /// Changes what `fd` is waited for.
    ///
    /// # Errors
    ///
    /// As `epoll_ctl(EPOLL_CTL_MOD)`.
    pub fn modify(&self, fd: &impl AsRawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, fd.as_raw_fd(), token, interest)
    }

    /// Forgets `fd` (closing it does too, when it is its last reference).
    ///
    /// # Errors
    ///
    /// As `epoll_ctl(EPOLL_CTL_DEL)`.
    pub fn delete(&self, fd: &impl AsRawFd) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, Interest::READ)
    }

    /// Waits up to `timeout` (forever with `None`) and returns the events.
    /// An interrupted wait returns no events.
    ///
    /// # Errors
    ///
    /// As `epoll_wait`, except `EINTR`.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<impl Iterator<Item = Event> + '_> {
        let timeout_ms = match timeout {
            None => -1,
            // Round up: a 0.3 ms timeout must not become a busy loop of 0 ms waits.
            Some(timeout) => timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
        };
        // SAFETY: the buffer holds events.len() entries and outlives the call.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                timeout_ms,
            )
        };
        let n = if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
            0
        } else {
            n as usize
        };
        Ok(self.events[..n].iter().map(|event| {
            let bits = event.events;
            Event {
                token: event.u64,
                readable: bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0,
                writable: bits & libc::EPOLLOUT as u32 != 0,
                failed: bits & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0,
            }
        }))
    }
}

/// The CPUs this process may run on, in order.
///
/// # Errors
///
/// As `sched_getaffinity`.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into set.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET only reads the set.
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect())
}

fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: as in allowed_cpus.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of the set; the caller's cpu comes
    // from allowed_cpus, so it is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// Pins the calling thread to `cpu` (threads it starts afterwards inherit
/// the mask).
///
/// # Errors
///
/// As `sched_setaffinity`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let set = cpu_set(cpu);
    // SAFETY: set is a valid cpu_set_t; pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the process `command` starts run on `cpu` only, with every thread
/// it will ever have: the mask is set in the child between `fork` and
/// `exec`, so no thread exists before it.
pub fn pin_command(command: &mut Command, cpu: usize) {
    let set = cpu_set(cpu);
    // SAFETY: the closure runs in the forked child before exec. It makes one
    // raw system call (async-signal-safe), allocates nothing and takes no
    // lock; set was built before the fork and is only read.
    unsafe {
        command.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Raises the soft limit on open descriptors to the hard limit (children
/// inherit it) and returns the new soft limit.
///
/// # Errors
///
/// As `getrlimit` and `setrlimit`.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Clock ticks per second, the unit of `utime` and `stime` in
/// `/proc/PID/stat` (`proc(5)`).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf takes no pointers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` on a socket about to be bound to a source
/// address, so that thousands of connections from one address to different
/// destinations do not each need a port of their own.
///
/// # Errors
///
/// As `setsockopt`.
pub fn set_bind_address_no_port(socket: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the option value is a c_int that outlives the call, and its
    // size is passed with it.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
