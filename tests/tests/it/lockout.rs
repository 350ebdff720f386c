//! An operator can always get in: the control API keeps a descriptor in
//! reserve for when the data plane has taken every other one, and
//! `asyncorectl` gives up on a daemon that does not answer, within its
//! timeout, with exit code 3.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use asyncore_tests::{Daemon, binary, eventually, output_within, patience};

use crate::{http_api::http_address_of, runtime};

#[test]
fn asyncorectl_gives_up_on_a_port_that_accepts_but_never_speaks() {
    // The kernel completes the handshake for the backlog; nobody ever
    // answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    for args in [&["--timeout", "1s", "loop-stats"][..], &["--timeout", "1s", "stats", "--interval", "1s"]] {
        let started = Instant::now();
        let output = output_within(Command::new(binary("asyncorectl")).arg("--control").arg(&address).args(args));
        let elapsed = started.elapsed();
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!("asyncorectl {args:?} against a silent port: {:?} after {elapsed:?}: {stderr}", output.status.code());
        assert_eq!(output.status.code(), Some(3), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&format!("cannot reach the daemon at {address}")), "{stderr}");
        assert!(stderr.contains("no answer within 1s"), "{stderr}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?} for a 1 s timeout");
    }
    // The flag is checked like every other duration.
    let output = output_within(Command::new(binary("asyncorectl")).args(["--timeout", "soon", "loop-stats"]));
    assert_eq!(output.status.code(), Some(2));
}

/// The whole answer to `GET path` (HTTP/1.1, the connection closed after
/// it), read within the harness's patience.
fn http_get(address: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect_timeout(&address, patience()).expect("connect to the http api");
    stream.set_read_timeout(Some(patience())).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("a whole answer within the patience");
    answer
}

/// Descriptors `pid` has open now.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|entries| entries.count()).unwrap_or(0)
}

#[test]
fn the_control_api_answers_while_the_data_plane_has_every_descriptor() {
    let mut daemon = Daemon::start();
    let address = runtime().block_on(async { daemon.client().await.start_listener("echo", &[]).await.1 });
    let http = runtime().block_on(http_address_of(&daemon));
    // A few descriptors to spare, then none: as `ulimit -n` would, on the
    // running daemon.
    let limit = open_descriptors(daemon.pid()) + 4;
    let prlimit = output_within(
        Command::new("prlimit").arg("--pid").arg(daemon.pid().to_string()).arg(format!("--nofile={limit}:{limit}")),
    );
    assert!(prlimit.status.success(), "prlimit: {}", String::from_utf8_lossy(&prlimit.stderr));
    let peers: Vec<TcpStream> = (0..40).map(|_| asyncore_tests::connect(address)).collect();
    runtime().block_on(eventually!(
        async || daemon.log().contains("accept failed"),
        "the echo listener to run out of descriptors; log:\n{}",
        daemon.log()
    ));
    println!("descriptor limit {limit}, {} open", open_descriptors(daemon.pid()));

    // Not just once: the reserve comes back when the operator leaves, and
    // stays while the data plane keeps retrying its accepts (every 100 ms)
    // between two operators.
    for attempt in 1..=3 {
        if attempt > 1 {
            std::thread::sleep(Duration::from_millis(300));
        }
        let started = Instant::now();
        let output = daemon.ctl(&["-o", "json", "loop-stats"]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "loop-stats #{attempt} during descriptor exhaustion: {:?} {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("\"accepts\""), "{stdout}");
        println!("loop-stats #{attempt} answered in {:?}", started.elapsed());
        assert!(started.elapsed() < patience());

        // The HTTP API keeps a spare descriptor of its own.
        let started = Instant::now();
        let answer = http_get(http, "/v1/daemon/loop-stats");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("\"accepts\""),
            "GET /v1/daemon/loop-stats #{attempt}: {answer}"
        );
        println!("GET /v1/daemon/loop-stats #{attempt} answered in {:?}", started.elapsed());
    }
    daemon.assert_running();
    drop(peers);
}
