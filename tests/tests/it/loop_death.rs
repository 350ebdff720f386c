//! A dead poll loop is fatal, and says so: health answers NOT_SERVING,
//! every call UNAVAILABLE, the in-process daemon's `wait()` resolves with
//! the panic, and the binary logs it and exits non-zero so that a
//! supervisor restarts it. The loop is killed through a test-only fault
//! hook (`Command::PanicForTest`, feature `fault-injection`) that no
//! request, flag or plugin can reach.

use std::process::Command;

use asyncore_proto::v1;
use asyncore_tests::{InProcessDaemon, TempDir, binary, eventually, output_within, within};
use asyncored::Phase;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::runtime;

const SERVICES: [&str; 5] =
    ["", "asyncore.v1.Listeners", "asyncore.v1.Channels", "asyncore.v1.Plugins", "asyncore.v1.Daemon"];

#[test]
fn a_dead_poll_loop_turns_health_to_not_serving_and_wait_into_the_error() {
    runtime().block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let mut health = HealthClient::new(client.channel.clone());
        let status_of = async |health: &mut HealthClient<_>, service: &str| {
            let request = HealthCheckRequest { service: service.to_string() };
            health.check(request).await.expect("health answers").into_inner().status
        };
        for service in SERVICES {
            assert_eq!(status_of(&mut health, service).await, ServingStatus::Serving as i32, "{service:?}");
        }

        daemon.engine().send(asyncored::Command::PanicForTest).expect("the loop takes commands");
        let died = within("the daemon to notice its loop died", daemon.daemon().wait()).await.expect_err("it died");
        assert!(died.reason.contains("fault injected: the poll loop panics on purpose"), "{died}");
        assert_eq!(daemon.daemon().lifecycle().get(), Phase::Failed);

        for service in SERVICES {
            eventually!(
                async || status_of(&mut health, service).await == ServingStatus::NotServing as i32,
                "health of {service:?} to be NOT_SERVING"
            )
            .await;
        }
        let stats = client.daemon.get_loop_stats(v1::GetLoopStatsRequest {}).await.expect_err("no loop");
        assert_eq!(stats.code(), Code::Unavailable, "{stats:?}");
        let start =
            v1::StartListenerRequest { address: "127.0.0.1:0".into(), plugin: "echo".into(), ..Default::default() };
        let refused = client.listeners.start_listener(start).await.expect_err("no loop");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("poll loop has died"), "{refused:?}");
    });
}

#[test]
fn the_binary_exits_non_zero_with_the_panic_in_its_log() {
    let dir = TempDir::new("loop-death");
    std::fs::create_dir(dir.path().join("plugins")).unwrap();
    let config = dir.path().join("asyncored.toml");
    let text = "control = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nplugin_dirs = [\"plugins\"]\n";
    std::fs::write(&config, text).unwrap();
    let output = output_within(
        Command::new(binary("asyncored"))
            .arg("--config")
            .arg(&config)
            .env("ASYNCORED_INJECT_FAULT", "poll-loop-panic")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1"),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let log = String::from_utf8_lossy(&output.stderr);
    println!("exit {:?}; log:\n{log}", output.status.code());
    assert!(stdout.contains("asyncored ready"), "it started: {stdout}");
    assert_eq!(output.status.code(), Some(1), "exit status; log:\n{log}");
    let logged = log.lines().find(|line| line.contains("the poll loop panicked")).unwrap_or_else(|| panic!("{log}"));
    assert!(logged.contains("fault injected: the poll loop panics on purpose"), "{logged}");
    assert!(
        log.contains("asyncored: the poll loop died: panicked: fault injected: the poll loop panics on purpose"),
        "{log}"
    );
}
