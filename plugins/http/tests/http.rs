//! The http plugin on the real engine: static files from a temporary root,
//! 404 that keeps the connection, pipelined requests answered in order on
//! one kept-alive connection, a large file streamed exactly, and a path
//! trying to leave the root refused.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use asyncore_plugin_http::Http;
use asyncore_sdk::Config;
use asyncore_testing::TestServer;

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
