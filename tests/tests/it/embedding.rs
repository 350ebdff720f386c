//! `asyncored::Daemon` as a library: a daemon that is dropped, or that fails
//! to start halfway, leaves no poll thread running and no port bound.

use std::net::{SocketAddr, TcpListener};

use asyncore_tests::{InProcessDaemon, Options, eventually};
use asyncored::{Command, CommandError};

use crate::runtime;

/// Whether `address` can be bound again (std sets `SO_REUSEADDR`, so
/// connections of the old socket in TIME_WAIT are not in the way).
fn free(address: SocketAddr) -> bool {
    TcpListener::bind(address).is_ok()
}

#[test]
fn dropping_a_daemon_ends_its_poll_loop_and_frees_its_ports() {
    let runtime = runtime();
    runtime.block_on(async {
        let daemon = InProcessDaemon::start().await;
        let mut client = daemon.client().await;
        let (_, listener) = client.start_listener("echo", &[]).await;
        let control = daemon.control();
        let engine = daemon.engine().clone();
        assert!(!free(listener) && !free(control), "both ports are bound while the daemon runs");
        drop(client);

        drop(daemon);
        eventually!(
            async || matches!(
                engine.request(|reply| Command::ListPlugins { reply }).await,
                Err(CommandError::LoopGone)
            ),
            "the poll loop to be gone after the drop"
        )
        .await;
        eventually!(async || free(listener), "the listener port {listener} to be free").await;
        eventually!(async || free(control), "the control port {control} to be free").await;
    });
}

#[test]
fn a_start_that_fails_halfway_stops_the_poll_loop_it_started() {
    let runtime = runtime();
    // Two boot listeners: the poll loop binds the first, then cannot bind
    // the second (taken here), and the start fails.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let first = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = format!(
        "[[listener]]\naddress = \"{first}\"\nplugin = \"echo\"\n\
         [[listener]]\naddress = \"{}\"\nplugin = \"echo\"\n",
        taken.local_addr().unwrap()
    );
    runtime.block_on(async {
        let error = InProcessDaemon::try_start_with(Options { config, ..Options::default() })
            .await
            .expect_err("the second listener's address is taken");
        assert!(error.contains("in use"), "{error}");
        // The first listener's socket belonged to the poll loop: it is free
        // again only if the loop stopped.
        eventually!(async || free(first), "the first listener's port {first} to be free after the failed start").await;
    });
}
