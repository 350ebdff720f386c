//! SIGTERM's drain with many clients of a stateful plugin (the `cache`
//! fixture: asynchat, answers queued as producers): every byte the daemon
//! had queued at the signal reaches a client that reads slowly, checked by
//! checksum; no connection is accepted after the signal; a peer that never
//! reads is closed at `drain_timeout`, and the log says what was left; a
//! second signal stops at once; the exit code is 0.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Barrier},
    time::Duration,
};

use asyncore_proto::v1;
use asyncore_tests::{Daemon, Options, connect, eventually};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::runtime;

const SIGTERM: i32 = 15;
const SIGINT: i32 = 2;

/// Clients of the big drain.
const CLIENTS: usize = 200;
/// Bytes of each client's `big` answer: far more than the client's receive
/// buffer, so most of it is still the daemon's (in its kernel send queue,
/// its output queue or the plugin's producer) at the signal.
const ANSWER: usize = 1024 * 1024;
/// Bytes each client reads before the signal.
const FIRST: usize = 4096;

fn cache_daemon(config: &str) -> Daemon {
    Daemon::start_with(Options {
        plugins: vec!["asyncore_fixture_cache"],
        config: format!("{config}[[listener]]\naddress = \"127.0.0.1:0\"\nplugin = \"cache\"\n"),
        ..Options::default()
    })
}

/// The config's listener: its id and address.
fn boot_listener(daemon: &Daemon) -> (u64, SocketAddr) {
    runtime().block_on(async {
        let mut client = daemon.client().await;
        let listeners =
            client.listeners.list_listeners(v1::ListListenersRequest::default()).await.unwrap().into_inner();
        (listeners.listeners[0].id, listeners.listeners[0].address.parse().unwrap())
    })
}

/// The accepted channels of a listener (not its listening one).
async fn accepted(client: &mut asyncore_tests::Client, listener_id: u64) -> Vec<v1::Channel> {
    let channels = client.channels_of(listener_id).await;
    channels.into_iter().filter(|c| c.kind == v1::ChannelKind::Accepted as i32).collect()
}

/// How long the late clients wait before they read: longer than a
/// closing channel lingers for its peer (2 s).
const LATE: Duration = Duration::from_millis(2500);

/// The process runs (it has not exited, even as a zombie).
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// FNV-1a, 64 bits.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Client `i`'s own value, stored with `set` before its answers.
fn value_of(i: usize) -> Vec<u8> {
    (0..1000).map(|j| b'a' + ((i * 7 + j) % 26) as u8).collect()
}

/// What client `i` must receive after `STORED`: the `big` answer, then its
/// own value.
fn expected(i: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..ANSWER).map(|j| (j % 251) as u8).collect();
    bytes.extend_from_slice(b"\r\nEND\r\n");
    bytes.extend_from_slice(format!("VALUE key{i} 1000\r\n").as_bytes());
    bytes.extend_from_slice(&value_of(i));
    bytes.extend_from_slice(b"\r\nEND\r\n");
    bytes
}

/// Stores client `i`'s value, then asks for the `big` answer and the value
/// in one write, and reads the first [`FIRST`] bytes, so that the answer
/// is under way. Returns what it read after `STORED`.
fn start_client(address: SocketAddr, i: usize) -> (TcpStream, Vec<u8>) {
    let mut stream = small_window(address);
    let mut set = format!("set key{i} 1000\r\n").into_bytes();
    set.extend_from_slice(&value_of(i));
    set.extend_from_slice(b"\r\n");
    stream.write_all(&set).unwrap();
    let mut stored = [0u8; 8];
    stream.read_exact(&mut stored).unwrap();
    assert_eq!(&stored, b"STORED\r\n");
    stream.write_all(format!("big {ANSWER}\r\nget key{i}\r\n").as_bytes()).unwrap();
    let mut first = vec![0u8; FIRST];
    stream.read_exact(&mut first).unwrap();
    (stream, first)
}

/// A client socket with a small receive buffer (set before connecting,
/// which also turns off its autotuning), so that what the daemon queued for
/// it stays mostly in the daemon rather than in loopback's buffers.
fn small_window(address: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.connect_timeout(&address.into(), asyncore_tests::patience()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(asyncore_tests::patience())).unwrap();
    stream.set_write_timeout(Some(asyncore_tests::patience())).unwrap();
    stream
}

/// Reads to EOF slowly: 16 KiB at a time, a pause every 128 KiB.
fn read_slowly(stream: &mut TcpStream, received: &mut Vec<u8>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        received.extend_from_slice(&buf[..n]);
        if received.len() % (128 * 1024) < n {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[test]
fn sigterm_delivers_every_queued_byte_to_200_slow_readers_and_accepts_no_one_after() {
    // A drain timeout far beyond the test's patience: the daemon must exit
    // because every channel is done, not because time ran out.
    let mut daemon = cache_daemon("drain_timeout_secs = 600\n");
    let (listener_id, address) = boot_listener(&daemon);

    let pid = daemon.pid();
    let started = Arc::new(Barrier::new(CLIENTS + 1));
    let signalled = Arc::new(Barrier::new(CLIENTS + 1));
    let readers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (started, signalled) = (started.clone(), signalled.clone());
            std::thread::Builder::new()
                .name(format!("client-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    let (mut stream, mut received) = start_client(address, i);
                    started.wait();
                    signalled.wait();
                    // Half the clients start reading late: past the 2 s a
                    // closing channel lingers. Until they read, their bytes
                    // sit unacknowledged in the daemon's send queues, and
                    // the daemon must still be there.
                    let late = i % 2 == 0;
                    if late {
                        std::thread::sleep(LATE);
                    }
                    let alive = !late || is_alive(pid);
                    read_slowly(&mut stream, &mut received).map(|()| (received, alive))
                })
                .unwrap()
        })
        .collect();
    started.wait();

    // Each answer is under way and most of it still in the daemon. Each
    // client read FIRST bytes and its receive buffer holds at most 32 KiB:
    // of what the daemon wrote, the rest waits in the daemon's kernel send
    // queue (or, beyond what that took, in the plugin's producer), which
    // the drain must see delivered before it exits. A channel's first
    // write goes out in the pass that read its request and the rest in the
    // passes after it, so the listing waits for every channel's.
    let runtime = runtime();
    runtime.block_on(async {
        let mut client = daemon.client().await;
        eventually!(
            async || {
                let channels = accepted(&mut client, listener_id).await;
                let queued = channels.iter().filter(|c| c.bytes_out as usize > FIRST + 256 * 1024).count();
                channels.len() == CLIENTS && queued == CLIENTS
            },
            "every one of {CLIENTS} clients to have data queued in the daemon"
        )
        .await;
    });

    let signal_sent = {
        let pid = daemon.pid().to_string();
        std::thread::spawn(move || {
            let sent = std::process::Command::new("kill").arg(format!("-{SIGTERM}")).arg(&pid).status().unwrap();
            assert!(sent.success());
        })
    };
    signal_sent.join().unwrap();
    // Listeners stop first: from then on no connection is accepted.
    runtime.block_on(eventually!(
        async || TcpStream::connect(address).is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
        "the listener to refuse connections after SIGTERM"
    ));
    // While the channels drain (no client reads before `signalled`), the
    // daemon tells probes it is going: gRPC health NOT_SERVING.
    runtime.block_on(async {
        let mut health = HealthClient::new(daemon.client().await.channel.clone());
        eventually!(
            async || {
                let request = HealthCheckRequest { service: String::new() };
                let status = health.check(request).await.expect("health answers while draining").into_inner().status;
                status == ServingStatus::NotServing as i32
            },
            "gRPC health NOT_SERVING during the drain"
        )
        .await;
    });
    signalled.wait();
    // The signal was sent above; this only waits for the exit.
    let status = runtime.block_on(daemon.signal_and_wait(0));
    for _ in 0..3 {
        assert!(TcpStream::connect(address).is_err(), "nothing accepts after the drain");
    }

    for (i, reader) in readers.into_iter().enumerate() {
        let (received, alive) = reader.join().unwrap().unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert!(alive, "client {i}: the daemon exited before the client read its bytes");
        let want = expected(i);
        assert_eq!(received.len(), want.len(), "client {i}: bytes received before EOF");
        assert_eq!(checksum(&received), checksum(&want), "client {i}: checksum");
    }
    assert!(status.success(), "exit status {status}; log:\n{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("drained: every channel closed"), "{log}");
    let waited: u64 = log
        .split("channels_waited=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("channels_waited in the log:\n{log}"));
    assert!(waited > 0, "some channels waited for their send queues: {log}");
    assert!(!log.contains("bytes dropped"), "nothing dropped; log:\n{log}");
    assert!(!log.contains("drain deadline passed"), "{log}");
}

#[test]
fn a_drain_closes_peers_that_never_read_at_its_deadline_and_says_what_was_left() {
    let mut daemon = cache_daemon("drain_timeout_secs = 3\n");
    let (listener_id, address) = boot_listener(&daemon);
    // Peers that ask for a large answer and never read it.
    let never: Vec<TcpStream> = (0..5)
        .map(|i| {
            let mut stream = connect(address);
            stream.write_all(format!("big {}\r\n", 64 * 1024 * 1024 + i).as_bytes()).unwrap();
            stream
        })
        .collect();
    // And one that reads, to the end.
    let (mut reader, mut received) = start_client(address, 7);
    let runtime = runtime();
    runtime.block_on(async {
        let mut client = daemon.client().await;
        eventually!(
            async || {
                let channels = accepted(&mut client, listener_id).await;
                channels.len() == 6 && channels.iter().all(|c| c.bytes_out > 0)
            },
            "every answer under way"
        )
        .await
    });

    let reading = std::thread::spawn(move || read_slowly(&mut reader, &mut received).map(|()| received));
    let status = runtime.block_on(daemon.signal_and_wait(SIGTERM));
    assert!(status.success(), "exit status {status}; log:\n{}", daemon.log());
    let received = reading.join().unwrap().expect("the reader's answer");
    assert_eq!(checksum(&received), checksum(&expected(7)), "the reader got everything");

    // The peers that never read were closed: what their buffers hold,
    // then the end (a reset or EOF), never the whole answer.
    for (i, mut stream) in never.into_iter().enumerate() {
        let mut got = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        let ended = loop {
            match stream.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
                Err(e) => panic!("peer {i}: {e} after {got} bytes"),
            }
        };
        assert!(ended && got < 64 * 1024 * 1024, "peer {i}: closed before its answer ({got} bytes)");
    }
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains("drain deadline passed")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("closed the 5 channels left"), "{line}");
    assert!(line.contains("queued bytes dropped"), "{line}");
    assert!(line.contains("bytes sent but not acknowledged"), "{line}");
}

#[test]
fn a_second_signal_during_the_drain_stops_at_once() {
    for second in [SIGTERM, SIGINT] {
        let mut daemon = cache_daemon("drain_timeout_secs = 600\n");
        let (listener_id, address) = boot_listener(&daemon);
        let mut stuck = connect(address);
        stuck.write_all(b"big 67108864\r\n").unwrap();
        let runtime = runtime();
        runtime.block_on(async {
            let mut client = daemon.client().await;
            eventually!(
                async || accepted(&mut client, listener_id).await.iter().any(|c| c.bytes_out > 0),
                "the answer under way"
            )
            .await
        });
        let pid = daemon.pid().to_string();
        let kill = |signal: i32| {
            let sent = std::process::Command::new("kill").arg(format!("-{signal}")).arg(&pid).status().unwrap();
            assert!(sent.success());
        };
        kill(SIGTERM);
        runtime.block_on(eventually!(
            async || daemon.log().contains("SIGTERM: draining"),
            "the drain to begin; log:\n{}",
            daemon.log()
        ));
        // The drain would wait 600 s for a peer that never reads; the
        // second signal ends it, within the test's patience.
        let status = runtime.block_on(daemon.signal_and_wait(second));
        assert!(status.success(), "exit status {status}; log:\n{}", daemon.log());
        assert!(daemon.log().contains("during the drain: stopping now"), "{}", daemon.log());
        let mut rest = Vec::new();
        let _ = stuck.read_to_end(&mut rest);
    }
}
