//! Running out of descriptors (the real binary, its limit lowered with
//! `prlimit`): with more connection attempts than descriptors the daemon
//! pauses accepting instead of spinning (its CPU stays low), the channels it
//! has keep working, accepting resumes by itself once descriptors are
//! freed, the pauses are counted (`LoopStats::accept_pauses`, `/metrics`)
//! and the log stays quiet: a line when the shortage begins, one when it is
//! over.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use asyncore_proto::v1;
use asyncore_tests::{Daemon, Options, connect, eventually, output_within};

use crate::runtime;

/// Descriptors left to the daemon above what it has open.
const SPARE: usize = 4;
/// Connection attempts beyond the spare descriptors.
const EXTRA: usize = 40;

fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, message);
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Lines of the log about accepting or descriptors.
fn shortage_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("accept") && !l.contains("listener started") && !l.contains("control api"))
        .collect()
}

#[test]
fn out_of_descriptors_the_daemon_pauses_quietly_keeps_its_channels_and_resumes() {
    let daemon = Daemon::start_with(Options {
        config: "[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = \"echo\"\n".into(),
        ..Options::default()
    });
    let runtime = runtime();
    // The control connection exists before the shortage: it needs no new
    // descriptor later.
    let mut client = runtime.block_on(daemon.client());
    let listeners =
        runtime.block_on(client.listeners.list_listeners(v1::ListListenersRequest::default())).unwrap().into_inner();
    let address: SocketAddr = listeners.listeners[0].address.parse().unwrap();
    let mut existing = connect(address);
    round_trip(&mut existing, b"before");
    let log_before = shortage_lines(&daemon.log()).len();

    let limit = open_descriptors(daemon.pid()) + SPARE;
    let lowered = output_within(
        Command::new("prlimit").arg("--pid").arg(daemon.pid().to_string()).arg(format!("--nofile={limit}:{limit}")),
    );
    assert!(lowered.status.success(), "prlimit: {}", String::from_utf8_lossy(&lowered.stderr));

    // More attempts than descriptors: the first few are accepted, the rest
    // wait in the backlog while the listener pauses.
    let clients: Vec<TcpStream> = (0..SPARE + EXTRA).map(|_| connect(address)).collect();
    runtime.block_on(eventually!(
        async || {
            let stats = client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.unwrap().into_inner();
            stats.accept_pauses > 0
        },
        "the listener to pause; log:\n{}",
        daemon.log()
    ));

    // While exhausted the loop sleeps between pauses instead of spinning.
    let (cpu_before, wall_before) = (daemon.cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let (cpu, wall) = (daemon.cpu_time() - cpu_before, wall_before.elapsed());
    assert!(cpu.as_secs_f64() < 0.3 * wall.as_secs_f64(), "the daemon used {cpu:?} of CPU in {wall:?} while exhausted");
    round_trip(&mut existing, b"the existing channel still works");
    let stats = runtime.block_on(client.daemon.get_loop_stats(v1::GetLoopStatsRequest {})).unwrap().into_inner();
    assert!(stats.accept_pauses >= 10, "paused again and again: {stats:?}");

    // Freed descriptors: accepting resumes by itself, and the last client,
    // which waited in the backlog, is served.
    let mut clients = clients;
    let mut last = clients.pop().unwrap();
    drop(clients);
    last.set_read_timeout(Some(asyncore_tests::patience())).unwrap();
    round_trip(&mut last, b"served after the shortage");
    runtime.block_on(eventually!(
        async || daemon.log().contains("accepting again"),
        "the end of the shortage in the log:\n{}",
        daemon.log()
    ));

    // The pauses are a metric too.
    let metrics = runtime.block_on(async {
        let http = crate::http_api::http_address_of(&daemon).await;
        let response = reqwest::get(format!("http://{http}/metrics")).await.expect("GET /metrics");
        response.text().await.unwrap()
    });
    let counted: u64 = metrics
        .lines()
        .find(|l| l.starts_with("asyncored_accept_pauses"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("asyncored_accept_pauses in /metrics:\n{metrics}"));
    assert!(counted >= stats.accept_pauses, "/metrics counts {counted} pauses, the loop said {}", stats.accept_pauses);

    // Quiet: the shortage's first line and its end, whatever the number of
    // pauses.
    let log = daemon.log();
    let lines = shortage_lines(&log);
    let new_lines = &lines[log_before..];
    assert!(
        new_lines.len() <= 3,
        "{} lines for {} pauses:\n{}",
        new_lines.len(),
        stats.accept_pauses,
        new_lines.join("\n")
    );
    assert!(new_lines.iter().any(|l| l.contains("accept failed")), "{log}");
    let end = new_lines.iter().find(|l| l.contains("accepting again")).unwrap();
    assert!(end.contains("accept pauses"), "{end}");
}
