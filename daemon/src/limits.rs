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

/// How much lower than the poll loop the control plane's threads are
/// scheduled (`nice` steps). The poll loop is the data plane: when a busy
/// control client (a script listing every channel back to back, many
/// watchers) and the loop compete for one core, the kernel gives the loop
/// about 98% of it (weights 1024 to 15), and the control plane answers
/// more slowly rather than the data plane serving less. Short calls
/// (health checks, a scrape) still get their turn within a few
/// milliseconds: a thread that slept is placed to run soon. With a core
/// to spare, it changes nothing.
pub const CONTROL_PLANE_NICE: i32 = 19;

/// Lowers the calling thread's scheduling priority by `steps` nice steps
/// (at most to 19). On Linux a thread id given to `setpriority` sets that
/// thread alone, not the whole process.
///
/// # Errors
///
/// If the priority cannot be set (an unprivileged process can always lower
/// its own).
pub fn lower_thread_priority(steps: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    // SAFETY: reads the nice value of our own thread. A -1 may be an error
    // or the value; either way the new one is below the loop's.
    let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    // SAFETY: sets the nice value of our own thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, (current + steps).min(19)) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The nice value of the calling thread, from `/proc/thread-self/stat`
    /// (field 19, counted after the command name).
    fn own_nice() -> i64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn lowering_a_threads_priority_leaves_the_others_alone() {
        let before = own_nice();
        let lowered = std::thread::spawn(|| {
            super::lower_thread_priority(super::CONTROL_PLANE_NICE).unwrap();
            own_nice()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, (before + i64::from(super::CONTROL_PLANE_NICE)).min(19));
        assert_eq!(own_nice(), before);
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
