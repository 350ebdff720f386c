//! Timers run by the poll thread: `call_later` (and cancelling), per-channel
//! `idle_timeout`, and pipes served in the loop (`attach_fd`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    time::{Duration, Instant},
};

use asyncore_proto::v1;
use asyncore_tests::{Daemon, InProcessDaemon, Options, connect, eventually, within};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::runtime;

fn options() -> Options {
    Options { plugins: vec!["asyncore_plugin_echo", "asyncore_fixture_ticker"], ..Options::default() }
}

#[test]
fn call_later_fires_in_order_and_cancelled_timers_never_fire() {
    let runtime = runtime();
    let daemon = runtime.block_on(InProcessDaemon::start_with(options()));
    let address = runtime.block_on(async {
        daemon.client().await.start_listener("ticker", &[("ticks", "4"), ("interval_ms", "30")]).await.1
    });
    let started = Instant::now();
    let mut lines = Vec::new();
    for line in BufReader::new(connect(address)).lines() {
        lines.push(line.unwrap());
    }
    assert_eq!(lines, ["tick 1", "tick 2", "tick 3", "tick 4"]);
    // Four timers 30 ms apart cannot all have fired sooner than that.
    assert!(started.elapsed() >= Duration::from_millis(120));
}

#[test]
fn idle_timeout_closes_idle_channels_and_spares_active_ones() {
    // The binary: the close is seen in its log too.
    let daemon = Daemon::start_with(options());
    let timeout = Duration::from_millis(400);
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let (_, address) = client.start_listener("echo", &[("idle_timeout", "400ms")]).await;
        let mut idle = TcpStream::connect(address).await.unwrap();
        let mut active = TcpStream::connect(address).await.unwrap();
        let started = Instant::now();
        let idle_closed = tokio::spawn(async move {
            let mut rest = Vec::new();
            let read = idle.read_to_end(&mut rest).await;
            (read, rest)
        });
        // The active client talks (every few milliseconds) until the idle
        // one was closed and three timeouts' worth of time has passed.
        eventually!(
            async || {
                active.write_all(b"x").await.unwrap();
                let mut back = [0u8; 1];
                within("the active channel's echo", active.read_exact(&mut back)).await.unwrap();
                idle_closed.is_finished() && started.elapsed() >= 3 * timeout
            },
            "the idle channel to be closed while the active one talks"
        )
        .await;
        let (read, rest) = idle_closed.await.unwrap();
        read.expect("the idle channel was closed (EOF)");
        assert!(rest.is_empty());
        active.write_all(b"y").await.unwrap();
        let mut back = [0u8; 1];
        within("the active channel's echo", active.read_exact(&mut back)).await.unwrap();
        assert_eq!(&back, b"y", "the active channel is still open");

        let status = client
            .listeners
            .start_listener(v1::StartListenerRequest {
                address: "127.0.0.1:0".into(),
                plugin: "echo".into(),
                config: [("idle_timeout".to_string(), "a while".to_string())].into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("idle_timeout"), "{}", status.message());
        eventually!(
            async || daemon.log().contains("idle timeout; closing"),
            "the idle timeout in the log:\n{}",
            daemon.log()
        )
        .await;
    });
}

#[test]
fn a_pipe_is_served_in_the_same_loop() {
    let runtime = runtime();
    let daemon = runtime.block_on(InProcessDaemon::start_with(options()));
    let mut client = runtime.block_on(daemon.client());
    let (listener_id, address) = runtime.block_on(client.start_listener("ticker", &[("mode", "pipe")]));
    let mut stream = connect(address);
    stream.write_all(b"through the pipe").unwrap();
    let mut back = [0u8; 16];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"THROUGH THE PIPE");

    let channels = runtime
        .block_on(
            client
                .channels
                .list_channels(v1::ListChannelsRequest { listener_id: Some(listener_id), ..Default::default() }),
        )
        .unwrap()
        .into_inner()
        .channels;
    let accepted = channels.iter().find(|c| c.kind == v1::ChannelKind::Accepted as i32).unwrap();
    let pipe = channels.iter().find(|c| c.kind == v1::ChannelKind::File as i32).expect("the pipe is a channel");
    assert_eq!(pipe.parent_id, accepted.id);
    assert_eq!(pipe.bytes_in, 16);

    // Closing the client closes the pipe too.
    drop(stream);
    let status = runtime.block_on(eventually!(
        async || client.channels.get_channel(v1::GetChannelRequest { id: pipe.id }).await.err(),
        "the pipe channel to close after its client"
    ));
    assert_eq!(status.code(), tonic::Code::NotFound);
}
