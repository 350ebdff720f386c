//! The proxy plugin on the real engine, in front of an upstream that is a
//! plain `std::net::TcpListener` on a thread of the test: bytes go both
//! ways exactly, a half-close is passed on in each direction, a large
//! transfer survives the backpressure between the two channels, and an
//! unreachable upstream closes the client.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::Duration,
};

use asyncore_plugin_proxy::Proxy;
use asyncore_sdk::Config;
use asyncore_testing::TestServer;

/// Patience for every blocking read and every wait on the upstream.
const PATIENCE: Duration = Duration::from_secs(10);

/// An upstream that accepts one connection and runs `serve` on it, on a
/// thread of its own. Its result comes back through the receiver.
fn upstream<T: Send + 'static>(serve: impl FnOnce(TcpStream) -> T + Send + 'static) -> (SocketAddr, mpsc::Receiver<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    thread::Builder::new()
        .name("upstream".to_string())
        .spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(PATIENCE)).unwrap();
            let _ = done_tx.send(serve(stream));
        })
        .unwrap();
    (address, done_rx)
}

/// An echo upstream: sends back what it reads until EOF, then closes.
/// Reports how many bytes it echoed.
fn echo(mut stream: TcpStream) -> usize {
    let mut buf = [0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => {
                stream.write_all(&buf[..n]).unwrap();
                total += n;
            }
            Err(e) => panic!("upstream read: {e}"),
        }
    }
}

fn proxy_to(upstream: SocketAddr, extra: &[(&str, &str)]) -> TestServer {
    let mut config = vec![("upstream".to_string(), upstream.to_string())];
    config.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    TestServer::start::<Proxy>(Config::from_pairs(config)).unwrap()
}

fn connect(server: &TestServer) -> TcpStream {
    let stream = TcpStream::connect(server.addr()).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

#[test]
fn bytes_go_both_ways() {
    let (address, done) = upstream(|mut stream| {
        // Upstream speaks first: this direction needs no client byte.
        stream.write_all(b"welcome\n").unwrap();
        let mut question = [0u8; 5];
        stream.read_exact(&mut question).unwrap();
        stream.write_all(b"answer to ").unwrap();
        stream.write_all(&question).unwrap();
        question
    });
    let server = proxy_to(address, &[]);
    let mut client = connect(&server);
    let mut welcome = [0u8; 8];
    client.read_exact(&mut welcome).unwrap();
    assert_eq!(&welcome, b"welcome\n");
    client.write_all(b"what?").unwrap();
    let mut answer = [0u8; 15];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"answer to what?");
    assert_eq!(&done.recv_timeout(PATIENCE).unwrap(), b"what?");
    // The accepted channel and its outbound one.
    assert_eq!(server.n_channels(), 2);
}

#[test]
fn a_half_close_passes_on_in_both_directions() {
    let (address, done) = upstream(|mut stream| {
        let mut received = Vec::new();
        // Reads until the client's EOF arrives through the proxy.
        stream.read_to_end(&mut received).unwrap();
        // Its own direction is still open: answer after the EOF, then
        // half-close in turn.
        stream.write_all(b"got ").unwrap();
        stream.write_all(&received).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        received
    });
    let server = proxy_to(address, &[]);
    let mut client = connect(&server);
    client.write_all(b"everything").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).expect("the upstream's EOF comes through after its answer");
    assert_eq!(back, b"got everything");
    assert_eq!(done.recv_timeout(PATIENCE).unwrap(), b"everything");
    assert_eq!(server.panics(), 0);
}

#[test]
fn a_large_transfer_survives_backpressure_both_ways() {
    let (address, done) = upstream(echo);
    // A small mark: each side stops and resumes reading many times, and
    // resuming depends on the other side's `wake`.
    let server = proxy_to(address, &[("high_water", "8192")]);
    let mut client = connect(&server);
    let payload: Vec<u8> = (0..8 * 1024 * 1024).map(|i: u32| (i % 241) as u8).collect();
    let mut writer = client.try_clone().unwrap();
    let sent = payload.clone();
    let write = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(payload.len());
    client.read_to_end(&mut back).unwrap();
    write.join().unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "bytes through the proxy differ");
    assert_eq!(done.recv_timeout(PATIENCE).unwrap(), payload.len());
}

#[test]
fn an_unreachable_upstream_closes_the_client() {
    // A port nobody listens on any more: the connect is refused.
    let address = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = proxy_to(address, &[]);
    let mut client = connect(&server);
    let mut rest = Vec::new();
    match client.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(server.logs().iter().any(|line| line.contains("(upstream)")), "{:#?}", server.logs());
}

#[test]
fn the_upstream_must_be_an_ip_and_port() {
    let error = TestServer::start::<Proxy>(Config::default()).unwrap_err();
    assert!(error.contains("config upstream: required"), "{error}");
    let error = TestServer::start::<Proxy>(Config::from_pairs([("upstream", "localhost:80")])).unwrap_err();
    assert!(error.contains("not ip:port"), "{error}");
}
