//! `asyncorectl` against a running daemon: list, start, stop, close,
//! stream, and errors as one line with a non-zero exit code.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Command, Output, Stdio},
    sync::mpsc,
};

use asyncore_tests::{Daemon, binary, output_within, patience};
use serde_json::Value;

fn ctl(daemon: &Daemon, args: &[&str]) -> Output {
    daemon.ctl(args)
}

#[track_caller]
fn ok_json(daemon: &Daemon, args: &[&str]) -> String {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let output = ctl(daemon, &full);
    assert!(output.status.success(), "asyncorectl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn asyncorectl_manages_a_running_daemon() {
    let daemon = Daemon::start();

    // plugins ls (table)
    let output = ctl(&daemon, &["plugins", "ls"]);
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(table.lines().next().unwrap().contains("NAME"), "{table}");
    assert!(table.contains("echo"), "{table}");

    // listeners start / ls
    let started = json(&ok_json(&daemon, &["listeners", "start", "127.0.0.1:0", "echo", "-c", "high_water=65536"]));
    let listener_id = started["id"].as_u64().unwrap();
    let address = started["address"].as_str().unwrap().to_string();
    assert_eq!(started["config"]["high_water"], "65536", "{started}");
    let listed = json(&ok_json(&daemon, &["listeners", "ls"]));
    assert_eq!(listed["listeners"][0]["address"], address.as_str(), "{listed}");

    // A client, seen by channels ls / get.
    let mut peer = asyncore_tests::connect(address.parse().unwrap());
    peer.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    peer.read_exact(&mut back).unwrap();
    let channels = json(&ok_json(&daemon, &["channels", "ls", "--listener", &listener_id.to_string()]));
    let peer_address = peer.local_addr().unwrap().to_string();
    let accepted = channels["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["peer_address"] == peer_address.as_str())
        .unwrap_or_else(|| panic!("{peer_address} in {channels}"));
    let channel_id = accepted["id"].as_u64().unwrap();
    assert_eq!(accepted["kind"], "accepted");
    let one = json(&ok_json(&daemon, &["channels", "get", &channel_id.to_string()]));
    assert_eq!(one["bytes_in"], 4);
    assert_eq!(one["bytes_out"], 4);

    // stats streams NDJSON until interrupted.
    let mut stats = Command::new(binary("asyncorectl"))
        .args(["--control", &daemon.control().to_string(), "-o", "json", "stats", "--interval", "100ms"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Its lines come through a thread, so that waiting for one is bounded.
    let (line_tx, lines) = mpsc::channel();
    let stdout = stats.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = || lines.recv_timeout(patience()).expect("a line of `asyncorectl stats` in time");
    let first = json(&next_line());
    let second = json(&next_line());
    let reported: Vec<u64> =
        first["channels"].as_array().unwrap().iter().map(|c| c["channel_id"].as_u64().unwrap()).collect();
    assert!(reported.contains(&channel_id), "{first}");
    assert_eq!(second["seq"].as_u64().unwrap(), first["seq"].as_u64().unwrap() + 1);
    stats.kill().unwrap();
    let _ = stats.wait();

    // channels close: the peer sees EOF.
    ok_json(&daemon, &["channels", "close", &channel_id.to_string()]);
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // listeners stop
    let stopped = json(&ok_json(&daemon, &["listeners", "stop", &listener_id.to_string()]));
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(TcpStream::connect(&address).is_err());

    // Errors: one line, non-zero exit.
    let missing = ctl(&daemon, &["channels", "get", "424242"]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8(missing.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("asyncorectl: not found"), "{stderr}");

    let bad = ctl(&daemon, &["listeners", "start", "127.0.0.1:99999", "echo"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("out of range"));

    let unreachable =
        output_within(Command::new(binary("asyncorectl")).args(["--control", "127.0.0.1:1", "plugins", "ls"]));
    assert_eq!(unreachable.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&unreachable.stderr).lines().count(), 1);
}
