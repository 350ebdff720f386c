//! What `/proc` says (`proc(5)`): the CPU time of a server process (all its
//! threads), of the harness itself, and of the whole machine, and a
//! server's resident memory. The harness reads them before and after each
//! measurement, so the figures are the server's own, whatever the load
//! generator costs, and a machine busy with other work shows in the table.

use std::io;
use std::sync::OnceLock;
use std::time::Duration;

use crate::sys;

fn ticks_to_duration(ticks: u64) -> Duration {
    static TICKS: OnceLock<u64> = OnceLock::new();
    let ticks_per_second = *TICKS.get_or_init(sys::clock_ticks_per_second);
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / ticks_per_second)
}

/// CPU time at one moment: of the server, of this harness, of every CPU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSnapshot {
    server: Duration,
    harness: Duration,
    /// Busy time of every CPU, interrupts excluded.
    machine: Duration,
    /// Time every CPU spent in interrupts and soft interrupts.
    interrupts: Duration,
}

/// CPU time spent between two snapshots.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuUse {
    /// By the server process.
    pub(crate) server: Duration,
    /// By this harness: the load generator (and the storm's clients).
    pub(crate) generator: Duration,
    /// In interrupts and soft interrupts, on any CPU: with interrupt time
    /// accounting (`CONFIG_IRQ_TIME_ACCOUNTING`) this is where much of the
    /// loopback TCP receive path goes, charged to no process.
    pub(crate) interrupts: Duration,
    /// By everything else on the machine: other processes, and kernel work
    /// not charged to a process.
    pub(crate) other: Duration,
}

impl CpuSnapshot {
    /// Now, for the server `server_pid`.
    pub(crate) fn take(server_pid: u32) -> io::Result<CpuSnapshot> {
        let (machine, interrupts) = machine_busy_time()?;
        Ok(CpuSnapshot { server: cpu_time(server_pid)?, harness: cpu_time(std::process::id())?, machine, interrupts })
    }

    /// What was spent from `self` to `later`.
    pub(crate) fn until(&self, later: &CpuSnapshot) -> CpuUse {
        let server = later.server.saturating_sub(self.server);
        let generator = later.harness.saturating_sub(self.harness);
        let other = later.machine.saturating_sub(self.machine).saturating_sub(server + generator);
        CpuUse { server, generator, interrupts: later.interrupts.saturating_sub(self.interrupts), other }
    }
}

/// Busy time of all CPUs together, from the first line of `/proc/stat`:
/// user, nice, system and steal (guest time is part of user), then irq and
/// softirq.
fn machine_busy_time() -> io::Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().filter(|line| line.starts_with("cpu ")).ok_or_else(malformed_stat)?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(|field| field.parse().unwrap_or(0)).collect();
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = fields.get(..8).ok_or_else(malformed_stat)? else {
        return Err(malformed_stat());
    };
    Ok((ticks_to_duration(user + nice + system + steal), ticks_to_duration(irq + softirq)))
}

fn malformed_stat() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "/proc/stat: unexpected format")
}

/// `utime + stime` of process `pid`, every thread included, to a clock tick
/// (usually 10 ms: a measurement of a few seconds is precise to about 1%).
fn cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces;
    // the fields after its closing parenthesis start at field 3, `state`.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or_else(|| malformed(pid))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |number: usize| -> io::Result<u64> {
        fields.get(number - 3).and_then(|field| field.parse().ok()).ok_or_else(|| malformed(pid))
    };
    Ok(ticks_to_duration(field(14)? + field(15)?))
}

/// Resident memory of process `pid` in bytes (`VmRSS`).
pub(crate) fn resident_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|value| value.trim().parse::<u64>().ok())
        .ok_or_else(|| malformed(pid))?;
    Ok(kib * 1024)
}

fn malformed(pid: u32) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}: unexpected format"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        let mut spin = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(30) {
            spin = spin.wrapping_add(1);
        }
        assert!(spin > 0);
        assert!(super::cpu_time(pid).unwrap() > std::time::Duration::ZERO);
        assert!(super::machine_busy_time().unwrap().0 > std::time::Duration::ZERO);
        assert!(super::resident_bytes(pid).unwrap() > 0);
    }
}
