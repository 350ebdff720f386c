//! SIGHUP and `Daemon.ReloadConfig` re-read the config file: a valid file's
//! difference in listeners is applied (added, removed, changed), an invalid
//! one changes nothing and is reported (the log, INVALID_ARGUMENT, the
//! CLI's one line), and the daemon keeps serving either way.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
};

use asyncore_proto::v1;
use asyncore_tests::{Client, Daemon, Options, connect, eventually};

use crate::runtime;

const SIGHUP: i32 = 1;

/// The header every config of these tests starts with (as the harness
/// writes it).
const HEADER: &str = "control = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nplugin_dirs = [\"plugins\"]\n";

/// Echo on a port of its own, told apart by its config.
const KEPT: &str = "[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = \"echo\"\nconfig = { high_water = \"65536\" }\n";
const REMOVED: &str = "[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = \"echo\"\n";
const ADDED: &str =
    "[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = \"lines\"\nconfig = { terminator = \"\\\\n\" }\n";

fn write_config(daemon: &Daemon, listeners: &str) {
    std::fs::write(daemon.dir().join("asyncored.toml"), format!("{HEADER}{listeners}")).unwrap();
}

fn hangup(daemon: &Daemon) {
    let sent =
        std::process::Command::new("kill").arg(format!("-{SIGHUP}")).arg(daemon.pid().to_string()).status().unwrap();
    assert!(sent.success());
}

/// The listeners that accept connections, by plugin and config.
async fn listening(client: &mut Client) -> Vec<v1::Listener> {
    let list = client.listeners.list_listeners(v1::ListListenersRequest::default()).await.unwrap().into_inner();
    list.listeners.into_iter().filter(|l| l.state == v1::ListenerState::Listening as i32).collect()
}

fn round_trip(address: SocketAddr, line: &[u8]) {
    let mut stream = connect(address);
    stream.write_all(line).unwrap();
    let mut back = vec![0u8; line.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, line);
}

#[test]
fn sighup_applies_a_valid_config_and_keeps_the_old_one_when_the_new_is_invalid() {
    let mut daemon = Daemon::start_with(Options {
        plugins: vec!["asyncore_plugin_echo", "asyncore_plugin_lines"],
        config: format!("{KEPT}{REMOVED}"),
        ..Options::default()
    });
    let runtime = runtime();
    let mut client = runtime.block_on(daemon.client());
    let before = runtime.block_on(listening(&mut client));
    assert_eq!(before.len(), 2);
    let kept = before.iter().find(|l| !l.config.is_empty()).unwrap().clone();
    let removed = before.iter().find(|l| l.config.is_empty()).unwrap().clone();
    let kept_address: SocketAddr = kept.address.parse().unwrap();
    let removed_address: SocketAddr = removed.address.parse().unwrap();
    // A channel of the listener that goes runs on.
    let mut old_channel = connect(removed_address);
    old_channel.write_all(b"x").unwrap();
    old_channel.read_exact(&mut [0u8; 1]).unwrap();

    // Valid: one listener stays as it is, one goes, one comes.
    write_config(&daemon, &format!("{KEPT}{ADDED}"));
    hangup(&daemon);
    let after = runtime.block_on(eventually!(
        async || {
            let now = listening(&mut client).await;
            (now.len() == 2 && now.iter().any(|l| l.plugin == "lines")).then_some(now)
        },
        "the reloaded listeners; log:\n{}",
        daemon.log()
    ));
    assert!(after.iter().any(|l| l.id == kept.id), "the unchanged listener kept its id: {after:?}");
    assert!(!after.iter().any(|l| l.id == removed.id), "the removed listener stopped: {after:?}");
    let added: SocketAddr = after.iter().find(|l| l.plugin == "lines").unwrap().address.parse().unwrap();
    round_trip(added, b"hello, lines\n");
    round_trip(kept_address, b"still echoing");
    assert!(TcpStream::connect(removed_address).is_err(), "the removed listener accepts no more");
    old_channel.write_all(b"y").unwrap();
    old_channel.read_exact(&mut [0u8; 1]).expect("its channel runs on");
    runtime.block_on(eventually!(
        async || daemon.log().contains("config reloaded: 1 listeners started, 1 stopped, 1 unchanged"),
        "the reload in the log:\n{}",
        daemon.log()
    ));

    // Invalid: nothing changes, the log says why, the daemon serves on.
    write_config(&daemon, &format!("{KEPT}[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = 5\n"));
    hangup(&daemon);
    runtime.block_on(eventually!(
        async || daemon.log().contains("config reload refused"),
        "the refusal in the log:\n{}",
        daemon.log()
    ));
    daemon.assert_running();
    let unchanged = runtime.block_on(listening(&mut client));
    let ids = |ls: &[v1::Listener]| ls.iter().map(|l| l.id).collect::<Vec<_>>();
    assert_eq!(ids(&unchanged), ids(&after));
    round_trip(added, b"after the refusal\n");
    round_trip(kept_address, b"and echo too");
}

#[test]
fn reload_config_rpc_and_cli_report_an_invalid_or_inapplicable_config() {
    let daemon = Daemon::start_with(Options { config: KEPT.to_string(), ..Options::default() });
    let runtime = runtime();
    let mut client = runtime.block_on(daemon.client());
    let before = runtime.block_on(listening(&mut client));

    // Out of range: refused before anything is touched.
    write_config(&daemon, &format!("drain_timeout_secs = 99999999\n{KEPT}"));
    let error = runtime.block_on(client.daemon.reload_config(v1::ReloadConfigRequest {})).unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("drain_timeout_secs"), "{}", error.message());
    assert!(error.message().contains("the old config stays in force"), "{}", error.message());

    // A plugin that is not loaded.
    write_config(&daemon, &format!("{KEPT}[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = \"nope\"\n"));
    let output = daemon.ctl(&["config", "reload"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no plugin of that name is loaded"), "{stderr}");

    // An address in use: what was stopped for it is started again.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_address = taken.local_addr().unwrap();
    write_config(&daemon, &format!("[[listener]]\naddress = \"{taken_address}\"\nplugin = \"echo\"\n"));
    let error = runtime.block_on(client.daemon.reload_config(v1::ReloadConfigRequest {})).unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains(&taken_address.to_string()), "{}", error.message());
    let after = runtime.block_on(listening(&mut client));
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].address, before[0].address, "the old listener is back where it was");
    round_trip(after[0].address.parse().unwrap(), b"rolled back");

    // A valid one through the CLI.
    drop(taken);
    write_config(&daemon, &format!("[[listener]]\naddress = \"{taken_address}\"\nplugin = \"echo\"\n"));
    let output = daemon.ctl(&["config", "reload"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("1 listeners started, 1 stopped, 0 unchanged"), "{stdout}");
    round_trip(taken_address, b"on the new address");

    // Changed in place: the same address with another config is stopped,
    // then started again on that address.
    let old = runtime.block_on(listening(&mut client));
    write_config(
        &daemon,
        &format!(
            "drain_timeout_secs = 7\n\
             [[listener]]\naddress = \"{taken_address}\"\nplugin = \"echo\"\nconfig = {{ high_water = \"4096\" }}\n"
        ),
    );
    let outcome = runtime.block_on(client.daemon.reload_config(v1::ReloadConfigRequest {})).unwrap().into_inner();
    assert_eq!((outcome.started.len(), outcome.stopped.len(), outcome.unchanged), (1, 1, 0), "{outcome:?}");
    // A setting that is not a listener is named, not applied.
    assert_eq!(outcome.restart_needed, ["drain_timeout_secs"], "{outcome:?}");
    runtime.block_on(eventually!(
        async || daemon.log().contains("changed, and in force at the next start only: drain_timeout_secs"),
        "the setting that needs a restart, in the log:\n{}",
        daemon.log()
    ));
    assert_eq!(outcome.stopped[0].id, old[0].id);
    assert_eq!(outcome.started[0].address, taken_address.to_string());
    assert_eq!(outcome.started[0].config.get("high_water").map(String::as_str), Some("4096"));
    round_trip(taken_address, b"changed in place");
}

#[test]
fn post_config_reload_applies_the_file_or_answers_a_json_error() {
    use crate::http_api::Http;

    crate::runtime().block_on(async {
        let daemon =
            asyncore_tests::InProcessDaemon::start_with(Options { config: KEPT.to_string(), ..Options::default() })
                .await;
        let http = Http::of(&daemon);
        let config = daemon.dir().join("asyncored.toml");

        std::fs::write(&config, format!("{HEADER}{KEPT}[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = \"nope\"\n"))
            .unwrap();
        let refused = http.post("/v1/config:reload", serde_json::json!({})).await;
        let message = refused.error(400, "INVALID_ARGUMENT");
        assert!(message.contains("no plugin of that name is loaded"), "{message}");

        std::fs::write(&config, format!("{HEADER}{REMOVED}")).unwrap();
        let applied = http.post("/v1/config:reload", serde_json::json!({})).await.ok();
        assert_eq!(applied["started"].as_array().map(Vec::len), Some(1), "{applied}");
        assert_eq!(applied["stopped"].as_array().map(Vec::len), Some(1), "{applied}");
        assert!(applied["path"].as_str().is_some_and(|p| p.ends_with("asyncored.toml")), "{applied}");
    });
}

#[test]
fn under_systemd_a_reload_is_reloading_then_ready() {
    let dir = asyncore_tests::TempDir::new("sighup-notify");
    let path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let daemon = Daemon::start_with(Options {
        config: KEPT.to_string(),
        env: vec![("NOTIFY_SOCKET".into(), path.display().to_string())],
        ..Options::default()
    });
    crate::sd_notify::receive_until(&socket, "READY=1");

    let mut stamps = Vec::new();
    for valid in [true, false] {
        let listeners = if valid { REMOVED.to_string() } else { "[[listener]]\nplugin = 5\n".to_string() };
        write_config(&daemon, &listeners);
        hangup(&daemon);
        let received = crate::sd_notify::receive_until(&socket, "RELOADING=1");
        let reloading = received.last().unwrap();
        let usec: u128 = reloading
            .lines()
            .find_map(|line| line.strip_prefix("MONOTONIC_USEC="))
            .unwrap_or_else(|| panic!("MONOTONIC_USEC in {reloading:?}"))
            .parse()
            .unwrap();
        stamps.push(usec);
        // Applied or refused, the daemon serves again.
        crate::sd_notify::receive_until(&socket, "READY=1");
    }
    // Each reload is told apart by its time on CLOCK_MONOTONIC.
    assert!(stamps[0] > 0 && stamps[1] > stamps[0], "{stamps:?}");
}
