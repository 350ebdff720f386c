//! Timers run by the poll thread: `call_later` (and cancelling), per-channel
//! `idle_timeout`, and pipes served in the loop (`attach_fd`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use asyncore_proto::v1;
use asyncore_tests::{Daemon, Options};

use crate::runtime;

fn daemon() -> Daemon {
    Daemon::start_with(Options {
        plugins: vec!["asyncore_plugin_echo", "asyncore_fixture_ticker"],
        ..Options::default()
    })
}

#[test]
fn call_later_fires_in_order_and_cancelled_timers_never_fire() {
    let daemon = daemon();
    let address = runtime().block_on(async {
        daemon.client().await.start_listener("ticker", &[("ticks", "4"), ("interval_ms", "30")]).await.1
    });
    let started = Instant::now();
    let mut lines = Vec::new();
    for line in BufReader::new(TcpStream::connect(address).unwrap()).lines() {
        lines.push(line.unwrap());
    }
    assert_eq!(lines, ["tick 1", "tick 2", "tick 3", "tick 4"]);
    // Four timers 30 ms apart cannot all have fired sooner than that.
    assert!(started.elapsed() >= Duration::from_millis(120));
}

#[test]
fn idle_timeout_closes_idle_channels_and_spares_active_ones() {
    let daemon = daemon();
    let address = runtime()
        .block_on(async { daemon.client().await.start_listener("echo", &[("idle_timeout", "400ms")]).await.1 });
    let mut idle = TcpStream::connect(address).unwrap();
    let mut active = TcpStream::connect(address).unwrap();
    let started = Instant::now();
    // The active client talks every 100 ms for 1.2 s: three timeouts' worth.
    while started.elapsed() < Duration::from_millis(1200) {
        active.write_all(b"x").unwrap();
        let mut back = [0u8; 1];
        active.read_exact(&mut back).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut rest = Vec::new();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    idle.read_to_end(&mut rest).expect("the idle channel was closed (EOF)");
    active.write_all(b"y").unwrap();
    let mut back = [0u8; 1];
    active.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"y", "the active channel is still open");

    let status = runtime().block_on(async {
        daemon
            .client()
            .await
            .listeners
            .start_listener(v1::StartListenerRequest {
                address: "127.0.0.1:0".into(),
                plugin: "echo".into(),
                config: [("idle_timeout".to_string(), "a while".to_string())].into(),
            })
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("idle_timeout"), "{}", status.message());
    assert!(daemon.log().contains("idle timeout; closing"));
}

#[test]
fn a_pipe_is_served_in_the_same_loop() {
    let daemon = daemon();
    let runtime = runtime();
    let mut client = runtime.block_on(daemon.client());
    let (listener_id, address) = runtime.block_on(client.start_listener("ticker", &[("mode", "pipe")]));
    let mut stream = TcpStream::connect(address).unwrap();
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
    let mut gone = false;
    for _ in 0..500 {
        let found = runtime.block_on(client.channels.get_channel(v1::GetChannelRequest { id: pipe.id }));
        if found.is_err() {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(gone, "the pipe channel closed after its client");
}
