//! How the daemon's log looks where it goes: no colour codes in a file,
//! one JSON object per line with `--log-format json` (or the config's
//! `log_format`), and lines that could repeat at traffic rate (peers that
//! reset, accepts that fail for lack of descriptors) limited to one a
//! second with a count of the rest.

use std::{io::Write as _, process::Command, time::Duration};

use asyncore_tests::{Daemon, Options, connect, eventually, output_within};
use serde_json::Value;

use crate::runtime;

/// The harness sets NO_COLOR=1 for every daemon; an empty value is what a
/// machine without it has (https://no-color.org: only a non-empty value
/// counts), so the daemon must decide by itself that a file gets no colour.
fn without_no_color() -> Vec<(String, String)> {
    vec![("NO_COLOR".into(), String::new())]
}

#[test]
fn a_log_file_has_no_colour_codes() {
    let daemon = Daemon::start_with(Options { env: without_no_color(), ..Options::default() });
    let log = log_once_ready(&daemon);
    assert!(log.contains(" INFO "), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in a log file:\n{log:?}");
}

/// Every line of `log` as a JSON object with the fields a log shipper
/// reads.
#[track_caller]
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|line| {
            let record: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            for key in ["timestamp", "level", "target"] {
                assert!(record[key].is_string(), "no {key} in {line}");
            }
            assert!(record["fields"]["message"].is_string(), "no message in {line}");
            record
        })
        .collect()
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    for options in [
        Options { args: vec!["--log-format", "json"], env: without_no_color(), ..Options::default() },
        Options { config: "log_format = \"json\"\n".into(), ..Options::default() },
    ] {
        let shown = format!("{:?} {:?}", options.args, options.config);
        let daemon = Daemon::start_with(options);
        runtime().block_on(async {
            let mut client = daemon.client().await;
            let (_, address) = client.start_listener("echo", &[]).await;
            let ready = eventually!(
                async || {
                    let records = json_lines(&daemon.log());
                    records.into_iter().find(|r| r["fields"]["message"] == "listener started")
                },
                "the listener's record ({shown}):\n{}",
                daemon.log()
            )
            .await;
            assert_eq!(ready["level"], "INFO", "{ready}");
            assert_eq!(ready["fields"]["address"], address.to_string(), "{ready}");
            assert_eq!(ready["fields"]["plugin"], "echo", "{ready}");
            assert_eq!(ready["threadName"], "poll-loop", "{ready}");
            assert!(!daemon.log().contains('\u{1b}'));
        });
    }
}

#[test]
fn the_flag_wins_over_the_config() {
    let daemon = Daemon::start_with(Options {
        config: "log_format = \"json\"\n".into(),
        args: vec!["--log-format", "text"],
        ..Options::default()
    });
    let log = log_once_ready(&daemon);
    assert!(log.lines().all(|line| !line.starts_with('{')), "{log}");
}

#[test]
fn peer_resets_are_logged_once_a_second_with_a_count() {
    let daemon = Daemon::start_with(Options {
        env: vec![("RUST_LOG".into(), "info,asyncore_engine=debug".into())],
        ..Options::default()
    });
    let n_resets = 40;
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("echo", &[]).await;
        let started = std::time::Instant::now();
        for _ in 0..n_resets {
            // Closing with unread input and a zero linger sends a reset
            // instead of a FIN: the daemon's next read or write fails with
            // ECONNRESET (or EPIPE).
            let mut stream = connect(address);
            stream.write_all(b"hello").unwrap();
            let socket = socket2::SockRef::from(&stream);
            socket.set_linger(Some(Duration::ZERO)).unwrap();
            drop(stream);
        }
        let summary = eventually!(
            async || {
                let log = daemon.log();
                log.lines().find(|l| l.contains("similar lines suppressed (peer reset")).map(str::to_owned)
            },
            "the count of suppressed resets:\n{}",
            daemon.log()
        )
        .await;
        let log = daemon.log();
        let logged = log.lines().filter(|l| l.contains("peer reset the connection channel=")).count();
        let suppressed: usize = log
            .lines()
            .filter(|l| l.contains("similar lines suppressed (peer reset"))
            .filter_map(|l| l.split("suppressed=").nth(1)?.split_whitespace().next()?.parse::<usize>().ok())
            .sum();
        // One line per second that the resets took, and a count of the rest.
        let seconds = started.elapsed().as_secs() as usize + 1;
        assert!(logged >= 1 && logged <= seconds, "{logged} reset lines in {seconds} s: {summary}\n{log}");
        assert!(suppressed >= 1, "{summary}");
        assert!(logged + suppressed <= n_resets, "{logged} + {suppressed} for {n_resets} resets");
    });
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|entries| entries.count()).unwrap_or(0)
}

#[test]
fn failed_accepts_are_logged_once_per_shortage_with_a_count() {
    let daemon = Daemon::start();
    let address = runtime().block_on(async { daemon.client().await.start_listener("echo", &[]).await.1 });
    // No descriptor to spare, as `ulimit -n` would: the listener retries
    // its accept every 100 ms while connections wait in its backlog.
    let limit = open_descriptors(daemon.pid()) + 2;
    let prlimit = output_within(
        Command::new("prlimit").arg("--pid").arg(daemon.pid().to_string()).arg(format!("--nofile={limit}:{limit}")),
    );
    assert!(prlimit.status.success(), "prlimit: {}", String::from_utf8_lossy(&prlimit.stderr));
    let waiting: Vec<_> = (0..10).map(|_| connect(address)).collect();
    let runtime = runtime();
    let mut client = runtime.block_on(daemon.client());
    // Many pauses, one line: the shortage began. (The log is written by a
    // thread of its own, a moment after the pause it tells of.)
    runtime.block_on(eventually!(
        async || {
            let stats = client.daemon.get_loop_stats(asyncore_proto::v1::GetLoopStatsRequest {}).await.ok()?;
            (stats.into_inner().accept_pauses >= 10 && daemon.log().contains("accept failed:")).then_some(())
        },
        "ten accept pauses:\n{}",
        daemon.log()
    ));
    let log = daemon.log();
    let begun: Vec<&str> = log.lines().filter(|l| l.contains("accept failed:")).collect();
    assert_eq!(begun.len(), 1, "{log}");
    assert!(begun[0].contains("WARN"), "{}", begun[0]);
    // Descriptors freed: one more line, with the count.
    drop(waiting);
    let over = runtime.block_on(eventually!(
        async || daemon.log().lines().find(|l| l.contains("accepting again")).map(str::to_owned),
        "the end of the shortage:\n{}",
        daemon.log()
    ));
    assert!(over.contains("accept pauses for lack of descriptors"), "{over}");
}

/// The daemon's log once it holds the record of the control API listening.
fn log_once_ready(daemon: &Daemon) -> String {
    runtime().block_on(eventually!(
        async || {
            let log = daemon.log();
            log.contains("control api listening").then_some(log)
        },
        "the ready line's record in the log:\n{}",
        daemon.log()
    ))
}
