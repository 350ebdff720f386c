//! The control plane yields to the poll loop: the daemon's tokio threads
//! run in `SCHED_IDLE`, the poll thread in the normal class, so a client
//! hammering the control API takes CPU the loop does not want.

use asyncore_tests::Daemon;

/// `SCHED_OTHER` and `SCHED_IDLE` (`sched(7)`).
const SCHED_OTHER: u64 = 0;
const SCHED_IDLE: u64 = 5;

/// Each thread's name and scheduling policy (field 41 of its `stat`).
fn threads(pid: u32) -> Vec<(String, u64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap().trim().to_string();
        let stat = std::fs::read_to_string(path.join("stat")).unwrap();
        // Fields after the name, which may hold spaces: state is field 3.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let policy = after_name.split_whitespace().nth(41 - 3).unwrap().parse().unwrap();
        threads.push((name, policy));
    }
    threads
}

#[test]
fn the_control_plane_runs_in_sched_idle_and_the_poll_loop_does_not() {
    let daemon = Daemon::start();
    let threads = threads(daemon.pid());
    let policy_of = |name: &str| threads.iter().filter(|(n, _)| n == name).map(|&(_, p)| p).collect::<Vec<_>>();
    assert_eq!(policy_of("poll-loop"), [SCHED_OTHER], "{threads:?}");
    let control = policy_of("grpc");
    assert!(!control.is_empty() && control.iter().all(|&p| p == SCHED_IDLE), "{threads:?}");
}
