//! `asyncorectl plugins` and plugin generations: reload, rollback, retire,
//! refusals as one line, and `reload --watch` following a rebuilt library.

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::Instant,
};

use asyncore_engine::plugin_host::file_sha256;
use asyncore_tests::{Daemon, binary, eventually, output_within, plugin_library, replace_file};
use serde_json::Value;

fn ctl(daemon: &Daemon, args: &[&str]) -> Output {
    daemon.ctl(args)
}

/// Stdout of a command that must succeed.
#[track_caller]
fn ok(daemon: &Daemon, args: &[&str]) -> String {
    let output = ctl(daemon, args);
    assert!(output.status.success(), "asyncorectl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[track_caller]
fn ok_json(daemon: &Daemon, args: &[&str]) -> Value {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let text = ok(daemon, &full);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Stderr of a command that must fail with `code`, checked to be one line.
#[track_caller]
fn fails(daemon: &Daemon, args: &[&str], code: i32) -> String {
    let output = ctl(daemon, args);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(code), "asyncorectl {args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "asyncorectl {args:?}: {stderr}");
    stderr
}

/// The echo plugin as `plugins ls -o json` shows it.
#[track_caller]
fn echo(daemon: &Daemon) -> Value {
    let listed = ok_json(daemon, &["plugins", "ls"]);
    listed["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|plugin| plugin["name"] == "echo")
        .unwrap_or_else(|| panic!("no echo in {listed}"))
        .clone()
}

#[track_caller]
fn generation(plugin: &Value, number: u64) -> &Value {
    plugin["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|generation| generation["generation"] == number)
        .unwrap_or_else(|| panic!("no generation {number} in {plugin}"))
}

fn generation_numbers(plugin: &Value) -> Vec<u64> {
    plugin["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|generation| generation["generation"].as_u64().unwrap())
        .collect()
}

/// The copy of the echo library the daemon loaded at start.
fn echo_library(daemon: &Daemon) -> PathBuf {
    daemon.dir().join("plugins").join(plugin_library("asyncore_plugin_echo").file_name().unwrap())
}

#[test]
fn plugins_generations_reload_activate_unload() {
    let daemon = Daemon::start();
    let library = echo_library(&daemon);
    let library_sha256 = file_sha256(&library).unwrap();

    // Two reloads: generations 1 to 3, the last current.
    assert_eq!(ok(&daemon, &["plugins", "reload", "echo"]).trim(), "echo@2 is current (was echo@1)");
    let reloaded = ok_json(&daemon, &["plugins", "reload", "echo", "--drain-timeout", "30s"]);
    assert_eq!(reloaded["current_generation"], 3, "{reloaded}");
    let plugin = echo(&daemon);
    assert_eq!(generation_numbers(&plugin), [1, 2, 3], "{plugin}");
    assert_eq!(plugin["current_generation"], 3, "{plugin}");
    assert_eq!(generation(&plugin, 3)["state"], "current", "{plugin}");
    assert_eq!(generation(&plugin, 1)["state"], "standby", "{plugin}");
    for number in 1..=3 {
        assert_eq!(generation(&plugin, number)["sha256"], library_sha256.as_str(), "{plugin}");
    }

    // The table: a row per generation, the current one first.
    let table = ok(&daemon, &["plugins", "ls"]);
    let rows: Vec<Vec<&str>> = table.lines().map(|line| line.split_whitespace().collect()).collect();
    assert_eq!(rows[0][..3], ["NAME", "GEN", "STATE"], "{table}");
    assert!(rows[0].contains(&"SHA256"), "{table}");
    let order: Vec<(&str, &str)> = rows[1..].iter().map(|row| (row[1], row[2])).collect();
    assert_eq!(order, [("3", "current"), ("2", "standby"), ("1", "standby")], "{table}");
    assert!(rows[1].contains(&&library_sha256[..12]), "{table}");

    // Rollback in one call.
    assert_eq!(ok(&daemon, &["plugins", "activate", "echo", "1"]).trim(), "echo@1 is current (was echo@3)");
    assert_eq!(echo(&daemon)["current_generation"], 1);

    // Retire one generation; it can no longer be activated.
    assert_eq!(ok(&daemon, &["plugins", "unload", "echo", "--generation", "2"]).trim(), "echo@2 is retired");
    let plugin = echo(&daemon);
    assert_eq!(generation(&plugin, 2)["state"], "retired", "{plugin}");
    assert_eq!(plugin["current_generation"], 1, "{plugin}");
    let stderr = fails(&daemon, &["plugins", "activate", "echo", "2"], 1);
    assert!(stderr.starts_with("asyncorectl: failed precondition: "), "{stderr}");
    let stderr = fails(&daemon, &["plugins", "activate", "echo", "9"], 1);
    assert!(stderr.starts_with("asyncorectl: not found: "), "{stderr}");

    // A listener and a channel on echo@1.
    let listener = ok_json(&daemon, &["listeners", "start", "127.0.0.1:0", "echo"]);
    assert_eq!(listener["plugin_generation"], 1, "{listener}");
    let listener_id = listener["id"].as_u64().unwrap().to_string();
    let mut peer = asyncore_tests::connect(listener["address"].as_str().unwrap().parse().unwrap());
    peer.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    peer.read_exact(&mut back).unwrap();
    let peer_address = peer.local_addr().unwrap().to_string();
    let channels = ok(&daemon, &["channels", "ls", "--listener", &listener_id]);
    let row = channels.lines().find(|line| line.contains(&peer_address)).unwrap_or_else(|| panic!("{channels}"));
    assert!(row.split_whitespace().any(|cell| cell == "echo@1"), "{channels}");
    let channel_id = row.split_whitespace().next().unwrap().to_string();

    // Unloading what a listener uses is refused, in one line, unless forced.
    let stderr = fails(&daemon, &["plugins", "unload", "echo"], 1);
    assert!(stderr.starts_with("asyncorectl: failed precondition: "), "{stderr}");
    assert_eq!(echo(&daemon)["current_generation"], 1);

    // Load without --activate: on standby. With it: current, and the
    // listener moves while the open channel stays on the generation that
    // accepted it.
    let library_arg = library.to_str().unwrap();
    let loaded = ok(&daemon, &["plugins", "load", library_arg]);
    assert!(loaded.starts_with("echo@4 is loaded on standby (echo@1 is current"), "{loaded}");
    assert_eq!(ok(&daemon, &["plugins", "load", "--activate", library_arg]).trim(), "echo@5 is current (was echo@1)");
    let listeners = ok(&daemon, &["listeners", "ls"]);
    assert!(listeners.lines().nth(1).unwrap().split_whitespace().any(|cell| cell == "echo@5"), "{listeners}");
    let channel = ok_json(&daemon, &["channels", "get", &channel_id]);
    assert_eq!(channel["plugin_generation"], 1, "{channel}");
    assert!(ok(&daemon, &["channels", "get", &channel_id]).contains("echo@1"));
    assert_eq!(generation(&echo(&daemon), 1)["state"], "draining");

    // Usage errors are exit code 2.
    let usage = ctl(&daemon, &["plugins", "activate", "echo", "0"]);
    assert_eq!(usage.status.code(), Some(2));
    let usage = ctl(&daemon, &["plugins", "reload", "echo", "--drain-timeout", "soon"]);
    assert_eq!(usage.status.code(), Some(2));
}

/// `plugins reload --watch` running in the background, killed on drop so a
/// failed assertion does not leave it behind.
struct Watcher(Child);

impl Watcher {
    /// Kills the watcher (if still running) and returns what it printed.
    fn stop(&mut self) -> (String, String) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let (mut stdout, mut stderr) = (String::new(), String::new());
        self.0.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
        self.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        (stdout, stderr)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn plugins_reload_watch_follows_the_library() {
    let daemon = Daemon::start();
    let library = echo_library(&daemon);
    let listener = ok_json(&daemon, &["listeners", "start", "127.0.0.1:0", "echo"]);
    let mut watcher = Watcher(
        Command::new(binary("asyncorectl"))
            .args(["--control", &daemon.control().to_string(), "plugins", "reload", "echo", "--watch"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run asyncorectl"),
    );

    // A rebuild: still the echo plugin (an ELF library loads with trailing
    // bytes) but different content, put in place by rename as build tools
    // do, so the watcher never sees it half-written.
    let mut bytes = std::fs::read(&library).unwrap();
    bytes.extend_from_slice(b"\nrebuilt\n");
    replace_file(&library, &bytes);
    let rebuilt_sha256 = file_sha256(&library).unwrap();
    assert_ne!(generation(&echo(&daemon), 1)["sha256"], rebuilt_sha256.as_str());

    let runtime = crate::runtime();
    let started = Instant::now();
    let reloaded = runtime.block_on(eventually!(
        async || {
            let current = echo(&daemon);
            let current_number = current["current_generation"].as_u64().unwrap();
            let exited = watcher.0.try_wait().unwrap().is_some();
            (generation(&current, current_number)["sha256"] == rebuilt_sha256.as_str() || exited).then_some(!exited)
        },
        "a reload after {:?}; plugins: {}",
        started.elapsed(),
        echo(&daemon)
    ));
    assert!(reloaded, "the watcher exited: {:?}", watcher.stop());

    // Exactly one reload: the unchanged file at start caused none.
    let plugin = echo(&daemon);
    assert_eq!(generation_numbers(&plugin), [1, 2], "{plugin}");
    assert_eq!(plugin["current_generation"], 2, "{plugin}");
    let listeners = ok_json(&daemon, &["listeners", "ls"]);
    assert_eq!(listeners["listeners"][0]["id"], listener["id"]);
    assert_eq!(listeners["listeners"][0]["plugin_generation"], 2, "{listeners}");

    // Ctrl-C ends the watch with success.
    output_within(Command::new("kill").arg("-INT").arg(watcher.0.id().to_string()));
    let status = runtime.block_on(eventually!(async || watcher.0.try_wait().unwrap(), "the watcher to exit on SIGINT"));
    let (stdout, stderr) = watcher.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(stdout, "echo@2 is current (was echo@1)\n", "stderr: {stderr}");
    assert!(stderr.starts_with("watching "), "{stderr}");
}
