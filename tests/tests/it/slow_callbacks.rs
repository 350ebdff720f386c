//! A plugin callback that blocks holds up every other channel: the daemon
//! times each call, logs one that runs past `slow_callback_ms` with the
//! plugin, generation and channel (at most one line a second, then how
//! many it suppressed), and counts it in `LoopStats` and `GetDaemonInfo`,
//! which `asyncorectl loop-stats` and `info` show. The `panicky` fixture
//! sleeps 50 ms in `handle_read` when it reads `SLEEP`.
//!
//! The threshold is 40 ms here rather than the default 10 ms, and counts
//! are lower bounds where another call could be slow too: on a busy test
//! machine a debug build's callback may be descheduled for more than 10 ms.

use std::io::{Read, Write};

use asyncore_proto::v1;
use asyncore_tests::{Daemon, InProcessDaemon, Options, connect, eventually};
use serde_json::Value;

use crate::runtime;

/// Sends `SLEEP` on a new connection and waits for the echo, which comes
/// after the fixture's 50 ms sleep. Returns the connection, still open.
#[track_caller]
fn sleep_once(address: std::net::SocketAddr) -> std::net::TcpStream {
    let mut stream = connect(address);
    stream.write_all(b"SLEEP").unwrap();
    let mut back = [0u8; 5];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"SLEEP");
    stream
}

#[track_caller]
fn ctl_stdout(daemon: &Daemon, args: &[&str]) -> String {
    let output = daemon.ctl(args);
    assert!(output.status.success(), "asyncorectl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// The value of `key` in a key/value table (`loop-stats`, `info`).
#[track_caller]
fn table_value<'a>(table: &'a str, key: &str) -> &'a str {
    table
        .lines()
        .find_map(|line| line.strip_prefix(key).filter(|rest| rest.starts_with(' ')).map(str::trim))
        .unwrap_or_else(|| panic!("no {key} in\n{table}"))
}

/// A test machine's threshold: under the fixture's 50 ms.
const THRESHOLD: &str = "slow_callback_ms = 40\n";

#[test]
fn a_slow_callback_is_logged_counted_and_shown() {
    let daemon = Daemon::start_with(Options {
        plugins: vec!["asyncore_fixture_panicky", "asyncore_plugin_echo"],
        config: THRESHOLD.into(),
        ..Options::default()
    });
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (listener_id, address) = client.start_listener("panicky", &[]).await;
        let before = client.daemon.get_daemon_info(v1::GetDaemonInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(before.loop_stats.unwrap().slow_callbacks, 0);

        let stream = sleep_once(address);
        let channel = client.channel_by_peer(listener_id, stream.local_addr().unwrap()).await;

        // The log names the plugin, its generation, the channel and the
        // callback.
        let line = eventually!(
            async || daemon.log().lines().find(|l| l.contains("slow callback:")).map(str::to_owned),
            "the slow callback in the log:\n{}",
            daemon.log()
        )
        .await;
        for field in [
            "WARN".to_string(),
            "plugin=panicky".to_string(),
            "generation=1".to_string(),
            format!("channel={}", channel.id),
            "callback=\"handle_read\"".to_string(),
        ] {
            assert!(line.contains(&field), "{field} in {line:?}");
        }

        let info = client.daemon.get_daemon_info(v1::GetDaemonInfoRequest {}).await.unwrap().into_inner();
        let stats = info.loop_stats.expect("the loop answers");
        assert!(stats.slow_callbacks >= 1, "{stats:?}");
        assert!(stats.slowest_callback_us >= 50_000, "{stats:?}");
        assert_eq!(info.phase, v1::DaemonPhase::Running as i32);
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert!(info.uptime_seconds > 0.0 && info.started_at.is_some(), "{info:?}");
        assert_eq!((info.plugins, info.plugin_generations), (Some(2), Some(2)), "{info:?}");
        assert_eq!((info.listeners, info.stopped_listeners), (Some(1), Some(0)), "{info:?}");
        let loop_stats = client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.unwrap().into_inner();
        assert!(loop_stats.slow_callbacks >= 1, "{loop_stats:?}");
    });

    let count = |table: &str, key: &str| -> u64 { table_value(table, key).parse().unwrap() };
    let loop_stats = ctl_stdout(&daemon, &["loop-stats"]);
    assert!(count(&loop_stats, "slow_callbacks") >= 1, "{loop_stats}");
    assert!(table_value(&loop_stats, "slowest_callback").ends_with("ms"), "{loop_stats}");
    let info = ctl_stdout(&daemon, &["info"]);
    assert_eq!(table_value(&info, "phase"), "running", "{info}");
    assert_eq!(table_value(&info, "listeners"), "1", "{info}");
    assert!(count(&info, "slow_callbacks") >= 1, "{info}");
    let info: Value = serde_json::from_str(&ctl_stdout(&daemon, &["-o", "json", "info"])).unwrap();
    assert!(info["loop_stats"]["slow_callbacks"].as_u64().unwrap() >= 1, "{info}");
    assert!(info["loop_stats"]["slowest_callback_us"].as_u64().unwrap() >= 50_000, "{info}");
    assert_eq!(info["plugins"], 2, "{info}");
}

#[test]
fn a_plugin_that_keeps_blocking_logs_one_line_a_second() {
    let daemon = Daemon::start_with(Options {
        plugins: vec!["asyncore_fixture_panicky"],
        config: THRESHOLD.into(),
        ..Options::default()
    });
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("panicky", &[]).await;
        // Five in well under a second (250 ms of sleeping): the first is
        // logged, the other four counted.
        for _ in 0..5 {
            sleep_once(address);
        }
        let summary = eventually!(
            async || daemon.log().lines().find(|l| l.contains("similar lines suppressed")).map(str::to_owned),
            "the count of suppressed lines, once the second is over:\n{}",
            daemon.log()
        )
        .await;
        assert!(summary.contains("similar lines suppressed (slow callback)"), "{summary}");
        let suppressed: u64 = summary
            .split("suppressed=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a count in {summary:?}"));
        let log = daemon.log();
        let logged = log.lines().filter(|l| l.contains("slow callback:")).count() as u64;
        assert!(suppressed >= 1 && logged < 5, "{logged} lines logged, {suppressed} suppressed:\n{log}");
        let stats = client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.unwrap().into_inner();
        assert!(stats.slow_callbacks >= 5, "every slow callback is counted: {stats:?}");
    });
}

#[test]
fn the_threshold_comes_from_the_config() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start_with(Options {
            plugins: vec!["asyncore_fixture_panicky"],
            config: "slow_callback_ms = 1000\n".into(),
            ..Options::default()
        })
        .await;
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("panicky", &[]).await;
        tokio::task::spawn_blocking(move || sleep_once(address)).await.unwrap();
        let stats = client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.unwrap().into_inner();
        assert_eq!(stats.slow_callbacks, 0, "50 ms is under the 1000 ms threshold: {stats:?}");
        assert!(stats.slowest_callback_us >= 50_000, "but it is the slowest call: {stats:?}");
    });
}
