//! The http plugin on the real engine: static files from a temporary root,
//! 404 that keeps the connection, pipelined requests answered in order on
//! one kept-alive connection, a large file streamed exactly, and a path
//! trying to leave the root refused. Then the limits: a head dribbled
//! slower than `head_timeout` gets 408, an idle kept-alive connection is
//! closed after `keepalive_timeout`, refusals are logged and counted on the
//! status page, and `max_connections_per_ip` refuses the extra connection.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use asyncore_plugin_http::Http;
use asyncore_sdk::Config;
use asyncore_testing::{TestServer, eventually};

/// A directory of its own for one test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("asyncore-http-it-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The plugin serving a fresh root holding `hello.txt`, with more config.
fn serve(extra: &[(&str, &str)]) -> (TestServer, TempDir) {
    let root = TempDir::new();
    fs::write(root.0.join("hello.txt"), b"hello from disk\n").unwrap();
    let root_path = root.0.to_str().unwrap().to_string();
    let mut config = vec![("root".to_string(), root_path)];
    config.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let server = TestServer::start::<Http>(Config::from_pairs(config)).unwrap();
    (server, root)
}

/// One response as the client saw it.
#[derive(Debug)]
struct Response {
    status: u16,
    /// Field names in lowercase.
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// An HTTP client over one connection, whose reads time out rather than
/// hang.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(server: &TestServer) -> Client {
        let stream = TcpStream::connect(server.addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { reader: BufReader::new(stream) }
    }

    fn send(&mut self, requests: &str) {
        self.reader.get_mut().write_all(requests.as_bytes()).unwrap();
    }

    /// Reads one response: the head, then `Content-Length` bytes of body
    /// (none for `HEAD`).
    #[track_caller]
    fn response(&mut self, head_only: bool) -> Response {
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).expect("a status line");
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("a header line");
            let line = line.strip_suffix("\r\n").unwrap_or_else(|| panic!("unterminated header line {line:?}"));
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(": ").unwrap_or_else(|| panic!("bad header line {line:?}"));
            headers.insert(name.to_ascii_lowercase(), value.to_string());
        }
        let length: usize = headers["content-length"].parse().unwrap();
        let mut body = vec![0u8; if head_only { 0 } else { length }];
        self.reader.read_exact(&mut body).expect("the whole body");
        Response { status, headers, body }
    }

    /// The server closes: nothing more comes.
    #[track_caller]
    fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).expect("the server closes the connection");
        assert!(rest.is_empty(), "unexpected bytes: {:?}", String::from_utf8_lossy(&rest));
    }
}

#[test]
fn get_of_a_static_file_from_the_root() {
    let (server, _root) = serve(&[]);
    let mut client = Client::connect(&server);
    client.send("GET /static/hello.txt HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    let response = client.response(false);
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello from disk\n");
    assert_eq!(response.headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(response.headers["connection"], "close");
    assert!(response.headers["server"].starts_with("asyncored-http/"), "{:?}", response.headers);
    client.expect_eof();
}

#[test]
fn a_missing_file_is_404_and_keeps_the_connection() {
    let (server, _root) = serve(&[]);
    let mut client = Client::connect(&server);
    client.send("GET /static/missing.txt HTTP/1.1\r\nHost: test\r\n\r\n");
    let response = client.response(false);
    assert_eq!(response.status, 404);
    assert_eq!(response.body, b"404 Not Found\n");
    assert!(!response.headers.contains_key("connection"), "{:?}", response.headers);
    client.send("GET /static/hello.txt HTTP/1.1\r\nHost: test\r\n\r\n");
    let response = client.response(false);
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello from disk\n");
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (server, _root) = serve(&[]);
    let mut client = Client::connect(&server);
    // Both requests in one write: the second is parsed only after the
    // first one's response is queued.
    client.send(concat!(
        "GET /static/hello.txt HTTP/1.1\r\nHost: test\r\n\r\n",
        "HEAD / HTTP/1.1\r\nHost: test\r\n\r\n",
        "GET /static/nope HTTP/1.1\r\nHost: test\r\n\r\n",
    ));
    let first = client.response(false);
    assert_eq!((first.status, first.body.as_slice()), (200, &b"hello from disk\n"[..]));
    let second = client.response(true);
    assert_eq!(second.status, 200);
    assert_eq!(second.headers["content-type"], "text/html; charset=utf-8");
    let third = client.response(false);
    assert_eq!(third.status, 404);
    // Still open: HTTP/1.1 keeps it, and a fourth request on it works.
    client.send("GET / HTTP/1.0\r\n\r\n");
    let fourth = client.response(false);
    assert_eq!(fourth.status, 200);
    assert!(fourth.body.starts_with(b"<!DOCTYPE html>"));
    // HTTP/1.0 without keep-alive closes after its answer.
    client.expect_eof();
}

#[test]
fn http_1_0_keeps_the_connection_only_when_asked() {
    let (server, _root) = serve(&[]);
    let mut client = Client::connect(&server);
    client.send("GET /static/hello.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let response = client.response(false);
    assert_eq!(response.headers["connection"], "keep-alive");
    client.send("GET /static/hello.txt HTTP/1.0\r\n\r\n");
    let response = client.response(false);
    assert_eq!(response.headers["connection"], "close");
    client.expect_eof();
}

#[test]
fn a_file_larger_than_the_high_water_mark_is_streamed_exactly() {
    let (server, root) = serve(&[("high_water", "4096")]);
    let content: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i: u32| (i % 253) as u8).collect();
    fs::write(root.0.join("big.bin"), &content).unwrap();
    let mut client = Client::connect(&server);
    client.send("GET /static/big.bin HTTP/1.1\r\nHost: test\r\n\r\n");
    let response = client.response(false);
    assert_eq!(response.status, 200);
    assert_eq!(response.headers["content-type"], "application/octet-stream");
    assert_eq!(response.body.len(), content.len());
    assert!(response.body == content, "the file's bytes differ");
}

#[test]
fn a_path_leaving_the_root_is_400_and_closes() {
    let (server, _root) = serve(&[]);
    let mut client = Client::connect(&server);
    client.send("GET /static/%2e%2e/secret HTTP/1.1\r\nHost: test\r\n\r\n");
    let response = client.response(false);
    assert_eq!(response.status, 400);
    assert_eq!(response.headers["connection"], "close");
    client.expect_eof();
}

#[test]
fn without_a_root_static_is_404_and_a_bad_root_is_refused() {
    let server = TestServer::start::<Http>(Config::default()).unwrap();
    let mut client = Client::connect(&server);
    client.send("GET /static/hello.txt HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(client.response(false).status, 404);

    let root = TempDir::new();
    let file = root.0.join("file");
    fs::write(&file, b"x").unwrap();
    let error = TestServer::start::<Http>(Config::from_pairs([("root", file.to_str().unwrap())])).unwrap_err();
    assert!(error.contains("config root") && error.contains("not a directory"), "{error}");
}

/// A request head of 200 bytes: at one byte per 100 ms, 20 s to send, far
/// past the 300 ms `head_timeout` of the tests below and past the patience
/// of a read.
fn slow_head() -> String {
    let head = format!("GET / HTTP/1.1\r\nHost: test\r\nX-Pad: {}\r\n\r\n", "p".repeat(200 - 39));
    assert_eq!(head.len(), 200);
    head
}

/// Writes `bytes` one at a time, `every` apart, on a thread of its own,
/// until they are all out, the server stops taking them, or `stop` is set.
/// Answers how many went out.
fn dribble(client: &Client, bytes: String, every: Duration, stop: Arc<AtomicBool>) -> thread::JoinHandle<usize> {
    let mut stream = client.reader.get_ref().try_clone().unwrap();
    thread::spawn(move || {
        let mut sent = 0;
        for byte in bytes.as_bytes() {
            if stop.load(Ordering::Relaxed) || stream.write_all(std::slice::from_ref(byte)).is_err() {
                break;
            }
            sent += 1;
            thread::sleep(every);
        }
        sent
    })
}

/// Dribbles `slow_head()` on `client` and checks that a 408 with
/// `Connection: close` comes, then EOF, long before the head could be
/// complete.
#[track_caller]
fn dribbled_head_gets_408(client: &mut Client) {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let writer = dribble(client, slow_head(), Duration::from_millis(100), stop.clone());
    let response = client.response(false);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(response.status, 408);
    assert_eq!(response.headers["connection"], "close");
    assert_eq!(response.body, b"408 Request Timeout\n");
    client.expect_eof();
    let sent = writer.join().unwrap();
    assert!(elapsed >= Duration::from_millis(300), "408 after {elapsed:?}, before head_timeout");
    assert!((1..200).contains(&sent), "{sent} bytes of the head went out before the 408");
}

/// The value of the sample named `name` (with its labels) on the
/// listener's status page at `/status`, asked on `client`.
#[track_caller]
fn status_sample(client: &mut Client, name: &str) -> u64 {
    client.send("GET /status HTTP/1.1\r\nHost: test\r\n\r\n");
    let response = client.response(false);
    assert_eq!(response.status, 200);
    let text = String::from_utf8(response.body).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the status page:\n{text}"))
}

#[test]
fn a_head_dribbled_slower_than_head_timeout_gets_408_and_eof() {
    let (server, _root) = serve(&[("head_timeout", "300ms"), ("status_path", "/status")]);
    // The first request's clock runs from accept, and every byte that
    // comes in does not restart it.
    let mut client = Client::connect(&server);
    dribbled_head_gets_408(&mut client);

    // On a kept-alive connection, the clock of the second request runs
    // from its first byte.
    let mut client = Client::connect(&server);
    client.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(client.response(false).status, 200);
    dribbled_head_gets_408(&mut client);

    // A connection that says nothing at all gets its 408 too.
    let mut silent = Client::connect(&server);
    let response = silent.response(false);
    assert_eq!((response.status, response.headers["connection"].as_str()), (408, "close"));
    silent.expect_eof();

    let mut client = Client::connect(&server);
    assert_eq!(status_sample(&mut client, "asyncored_http_requests_refused_total{status=\"408\"}"), 3);
    let logs = server.logs();
    let timeouts = logs.iter().filter(|line| line.contains("refused with 408 Request Timeout")).count();
    assert_eq!(timeouts, 3, "{logs:#?}");
    assert!(logs.iter().any(|line| line.contains("no complete request head within 300ms")), "{logs:#?}");
}

#[test]
fn a_body_that_stops_coming_gets_408() {
    let (server, _root) = serve(&[("head_timeout", "300ms")]);
    let mut client = Client::connect(&server);
    let asked = Instant::now();
    client.send("POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nonly this much");
    let response = client.response(false);
    assert!(asked.elapsed() >= Duration::from_millis(300), "408 before head_timeout");
    assert_eq!((response.status, response.headers["connection"].as_str()), (408, "close"));
    client.expect_eof();
    let logs = server.logs();
    assert!(logs.iter().any(|line| line.contains("no complete request body within 300ms")), "{logs:#?}");
}

#[test]
fn requests_and_bodies_in_time_are_served_on_one_kept_alive_connection() {
    // Generous timeouts, so that the requests below always beat them: a
    // kept-alive connection serving request after request.
    let (server, _root) = serve(&[("head_timeout", "5s"), ("keepalive_timeout", "5s")]);
    let mut client = Client::connect(&server);
    for _ in 0..3 {
        client.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(client.response(false).status, 200);
    }
    // A body is read (and dropped) in time too.
    client.send("POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(client.response(false).status, 405);
}

#[test]
fn deadlines_move_with_each_request_and_none_comes_early() {
    // One timer per connection, kept while requests move the deadline: it
    // comes due many times during these 1.2 s of requests and during the
    // idle pause, finds the deadline moved on, and is armed again for it.
    let (server, _root) = serve(&[("head_timeout", "300ms"), ("keepalive_timeout", "2s")]);
    let mut client = Client::connect(&server);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1200) {
        client.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(client.response(false).status, 200);
        thread::sleep(Duration::from_millis(100));
    }
    // Idle past head_timeout, within keepalive_timeout: kept.
    thread::sleep(Duration::from_millis(600));
    client.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(client.response(false).status, 200);
    // And the next head still has head_timeout from its first byte.
    dribbled_head_gets_408(&mut client);
}

#[test]
fn an_idle_kept_alive_connection_is_closed_quietly_after_keepalive_timeout() {
    let (server, _root) = serve(&[("keepalive_timeout", "300ms"), ("status_path", "/status")]);
    let mut client = Client::connect(&server);
    let asked = Instant::now();
    client.send("GET /static/hello.txt HTTP/1.1\r\nHost: test\r\n\r\n");
    let response = client.response(false);
    assert_eq!(response.status, 200);
    assert!(!response.headers.contains_key("connection"), "kept alive: {:?}", response.headers);
    // Closed without a word: EOF, no 408.
    client.expect_eof();
    // The clock starts once the response went out, after the request was
    // sent: the close cannot come sooner than the timeout after that.
    let elapsed = asked.elapsed();
    assert!(elapsed >= Duration::from_millis(300), "closed {elapsed:?} after the request, before keepalive_timeout");

    let mut client = Client::connect(&server);
    assert_eq!(status_sample(&mut client, "asyncored_http_keepalive_closed_total"), 1);
    assert_eq!(status_sample(&mut client, "asyncored_http_requests_refused_total{status=\"408\"}"), 0);
}

#[test]
fn a_slow_download_outlasts_keepalive_timeout() {
    let (server, root) = serve(&[("keepalive_timeout", "300ms"), ("high_water", "4096")]);
    let content: Vec<u8> = (0..16 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    fs::write(root.0.join("big.bin"), &content).unwrap();
    let mut client = Client::connect(&server);
    client.send("GET /static/big.bin HTTP/1.1\r\nHost: test\r\n\r\n");
    let mut status_line = String::new();
    client.reader.read_line(&mut status_line).unwrap();
    assert!(status_line.starts_with("HTTP/1.1 200 "), "{status_line:?}");
    // Not reading for twice the keep-alive timeout: the connection is
    // busy sending, not idle, so it must not be cut (a cut would shorten
    // the body below). A slower machine only sleeps longer.
    thread::sleep(Duration::from_millis(600));
    loop {
        let mut line = String::new();
        client.reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; content.len()];
    client.reader.read_exact(&mut body).expect("the whole body");
    assert!(body == content, "the file's bytes differ");
    // Then, answered and idle, it is closed.
    client.expect_eof();
}

#[test]
fn refused_heads_are_logged_and_counted() {
    let (server, _root) = serve(&[("max_header_bytes", "1024"), ("status_path", "/status")]);
    let cases = [
        (format!("GET /{} HTTP/1.1\r\nHost: test\r\n\r\n", "a".repeat(1100)), 414),
        (format!("GET / HTTP/1.1\r\nHost: test\r\nX-Pad: {}\r\n\r\n", "p".repeat(1100)), 431),
        (format!("GET / HTTP/1.1\r\nHost: test\r\n{}\r\n", "X-A: b\r\n".repeat(200)), 431),
        ("GARBAGE\r\n\r\n".to_string(), 400),
    ];
    for (request, status) in cases {
        let mut client = Client::connect(&server);
        client.send(&request);
        let response = client.response(false);
        assert_eq!(response.status, status);
        assert_eq!(response.headers["connection"], "close");
        client.expect_eof();
    }

    let mut client = Client::connect(&server);
    for (status, n) in [(414, 1), (431, 2), (400, 1), (408, 0), (505, 0)] {
        let name = format!("asyncored_http_requests_refused_total{{status=\"{status}\"}}");
        assert_eq!(status_sample(&mut client, &name), n, "{name}");
    }
    // One line per refusal, with the channel and the reason.
    let logs = server.logs();
    let refusals: Vec<&String> = logs.iter().filter(|line| line.contains(": refused with ")).collect();
    assert_eq!(refusals.len(), 4, "{logs:#?}");
    assert!(refusals.iter().all(|line| line.contains("channel ")), "{refusals:#?}");
    let has = |text: &str| refusals.iter().any(|line| line.contains(text));
    assert!(has("refused with 414 URI Too Long"), "{refusals:#?}");
    assert!(has("request line over 1024 bytes (max_header_bytes)"), "{refusals:#?}");
    assert!(has("refused with 431 Request Header Fields Too Large"), "{refusals:#?}");
    assert!(has("(2 so far on this listener)"), "{refusals:#?}");
    assert!(has("refused with 400 Bad Request"), "{refusals:#?}");
}

/// A `GET /` on a new connection: its status, or `None` if the server
/// closed the connection without answering.
fn try_get(server: &TestServer) -> Option<u16> {
    let mut client = Client::connect(server);
    client.reader.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").ok()?;
    let mut status_line = String::new();
    match client.reader.read_line(&mut status_line) {
        Ok(0) | Err(_) => None,
        Ok(_) => status_line.get(9..12).and_then(|code| code.parse().ok()),
    }
}

#[test]
fn the_per_ip_limit_refuses_the_extra_connection_and_admits_one_after_a_close() {
    let (server, _root) = serve(&[("max_connections_per_ip", "2"), ("status_path", "/status")]);
    // Two kept-alive connections, each answered, so both are counted.
    let mut first = Client::connect(&server);
    let mut second = Client::connect(&server);
    for client in [&mut first, &mut second] {
        client.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(client.response(false).status, 200);
    }

    // The third from the same address is closed at once, unanswered.
    let mut third = Client::connect(&server);
    let mut rest = Vec::new();
    match third.reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "the refused connection got {:?}", String::from_utf8_lossy(&rest)),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    eventually("the refusal is logged", || {
        server
            .logs()
            .iter()
            .any(|line| line.contains("connection refused: 127.0.0.1 already has 2 open (max_connections_per_ip)"))
    });

    // Once one of the two closes, a new connection is served.
    drop(first);
    eventually("a new connection is admitted after a close", || try_get(&server) == Some(200));

    let refused =
        status_sample(&mut second, "asyncored_http_connections_refused_total{reason=\"max_connections_per_ip\"}");
    assert!(refused >= 1, "{refused}");
    let open = status_sample(&mut second, "asyncored_http_connections_open");
    assert!((1..=2).contains(&open), "{open} open");
}
