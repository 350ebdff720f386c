//! Process resource limits the daemon adjusts at start.

use std::io;

/// Raises the soft limit on open descriptors to the hard limit: every
/// channel is a descriptor, and the default soft limit (often 1024) is far
/// below what a server needs. Returns the (old, new) soft limit.
///
/// # Errors
///
/// If the limit cannot be read or set.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((old, limit.rlim_cur))
}

/// Puts the calling thread in the `SCHED_IDLE` scheduling class: it runs
/// when the CPU has nothing else to do, with a token share (weight 3
/// against a normal thread's 1024) when it does not, and a normal thread
/// that wakes up (the poll loop, after its `epoll_wait`) takes the CPU from
/// it at once. The control plane's threads call this as they start: the
/// poll loop is the data plane, and a busy control client (a script
/// listing every channel back to back, a stream of every channel's stats)
/// then slows the control plane, not the loop. In the bench's storm on a
/// core the loop kept 95% busy, echo throughput stayed within 1% (nice
/// +10 lost 26%, nice +19 7%), and `asyncorectl info` still answered in 11
/// to 280 ms. With a core to spare, it changes nothing.
///
/// # Errors
///
/// If the class cannot be set (an unprivileged thread may always move
/// itself to `SCHED_IDLE`, but a seccomp profile may forbid it).
pub fn yield_to_the_poll_loop() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the policy of the calling thread (0 is the caller) with
    // a valid parameter block.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The scheduling policy of the calling thread.
    fn own_policy() -> i32 {
        // SAFETY: reads the policy of the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn yielding_to_the_loop_moves_that_thread_alone() {
        let before = own_policy();
        let moved = std::thread::spawn(|| {
            super::yield_to_the_poll_loop().unwrap();
            own_policy()
        })
        .join()
        .unwrap();
        assert_eq!(moved, libc::SCHED_IDLE);
        assert_eq!(own_policy(), before);
        assert_ne!(before, libc::SCHED_IDLE);
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let (_, new) = super::raise_fd_limit().unwrap();
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
        assert_eq!(new, limit.rlim_cur);
    }
}
