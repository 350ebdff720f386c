//! The status page (`GET /` of the HTTP port) in a real browser: Debian's
//! headless `chromium` opens it against a daemon with an echo listener and a
//! client doing round trips, and the test reads the live page over the
//! Chrome DevTools Protocol (a minimal client over a plain WebSocket) until
//! it shows the listener's address, the plugin `echo` with its generation, a
//! row for the client's channel with a non-zero rate, and the loop's phase.
//! (`--dump-dom` cannot wait for live rows: the stats stream never ends, and
//! virtual time does not advance while it is open.)
//!
//! chromium is installed with apt when missing, as `.ci/run` does; if it
//! cannot be installed or started the test fails saying so.

use std::{
    cell::RefCell,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use asyncore_proto::v1::{self, listeners_client::ListenersClient};
use asyncore_tests::{InProcessDaemon, Options, TempDir, connect, eventually, patience, within};
use serde_json::{Value, json};

use crate::{http_api::Http, runtime};

/// How long installing chromium with apt may take.
const INSTALL_PATIENCE: Duration = Duration::from_secs(15 * 60);

/// `name` on the `PATH`, if it is there.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(name)).find(|path| path.is_file())
}

/// Installs Debian's `chromium` with apt if it is missing (once per test
/// process); panics, saying why, if that fails.
fn ensure_chromium() {
    static CHECKED: Mutex<bool> = Mutex::new(false);
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if *checked || on_path("chromium").is_some() {
        *checked = true;
        return;
    }
    eprintln!("chromium is missing: installing it with apt-get, as .ci/run does");
    let dir = TempDir::new("apt");
    let log = dir.path().join("apt.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut apt = Command::new("sh")
        .args(["-c", "apt-get update && apt-get install -y chromium"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("chromium is missing and `sh -c 'apt-get install chromium'` cannot run: {e}"));
    let deadline = Instant::now() + INSTALL_PATIENCE.max(patience());
    let status = loop {
        if let Some(status) = apt.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = apt.kill();
            let _ = apt.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = output.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
    match status {
        Some(status) if status.success() && on_path("chromium").is_some() => *checked = true,
        Some(status) if status.success() => {
            panic!("`apt-get install -y chromium` succeeded, yet there is no chromium on the PATH ({status})")
        }
        Some(status) => panic!(
            "chromium is missing and `apt-get install -y chromium` failed ({status}); install it (.ci/run does):\n{}",
            tail.join("\n")
        ),
        None => panic!(
            "chromium is missing and `apt-get install -y chromium` did not finish within {INSTALL_PATIENCE:?}:\n{}",
            tail.join("\n")
        ),
    }
}

/// A headless chromium showing one page, with the DevTools protocol on an
/// ephemeral port; its whole process group is killed on drop.
struct Chromium {
    child: Child,
    dir: TempDir,
}

impl Chromium {
    #[track_caller]
    fn open(url: &str) -> Chromium {
        ensure_chromium();
        let dir = TempDir::new("chromium");
        let log = std::fs::File::create(dir.path().join("chromium.log")).unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", dir.path().join("profile").display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group, so that drop ends the renderers too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start chromium: {e}"));
        Chromium { child, dir }
    }

    /// What chromium wrote on stdout and stderr.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromium.log")).unwrap_or_default()
    }

    /// The DevTools port, once chromium has written it to its profile.
    #[track_caller]
    fn devtools_port(&mut self) -> u16 {
        let file = self.dir.path().join("profile").join("DevToolsActivePort");
        let deadline = Instant::now() + patience();
        loop {
            let port = std::fs::read_to_string(&file).ok().and_then(|text| text.lines().next()?.trim().parse().ok());
            if let Some(port) = port {
                return port;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("chromium exited ({status}) before it opened the DevTools port; its output:\n{}", self.log());
            }
            if Instant::now() > deadline {
                panic!("chromium did not open the DevTools port within {:?}; its output:\n{}", patience(), self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A DevTools connection to the page it shows.
    #[track_caller]
    fn page(&mut self) -> Cdp {
        let port = self.devtools_port();
        let deadline = Instant::now() + patience();
        loop {
            let targets: Value = serde_json::from_str(&http_get(port, "/json/list"))
                .unwrap_or_else(|e| panic!("DevTools /json/list is not JSON: {e}"));
            let page = targets.as_array().into_iter().flatten().find(|t| t["type"] == "page");
            if let Some(url) = page.and_then(|t| t["webSocketDebuggerUrl"].as_str()) {
                return Cdp::connect(url);
            }
            assert!(Instant::now() < deadline, "chromium shows no page after {:?}: {targets}", patience());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SIGTERM first: chromium then ends its helpers and reaps them
        // (orphans might never be reaped). Then SIGKILL for whatever is
        // left of the group, which is ours: chromium leads it.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + patience();
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
        let _ = self.child.kill();
        // Bounded: SIGKILL cannot be ignored.
        let _ = self.child.wait();
    }
}

/// The body of `GET path` from chromium's DevTools HTTP endpoint.
#[track_caller]
fn http_get(port: u16, path: &str) -> String {
    let mut stream = connect(SocketAddr::from(([127, 0, 0, 1], port)));
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").unwrap();
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path} from DevTools: {head}");
    let length = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok());
    let mut body = Vec::new();
    match length {
        Some(length) => {
            body.resize(length, 0);
            stream.read_exact(&mut body).unwrap();
        }
        None => {
            stream.read_to_end(&mut body).unwrap();
        }
    }
    String::from_utf8(body).expect("UTF-8")
}

/// An HTTP head, read a byte at a time so that nothing after it is taken.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap_or_else(|e| panic!("reading an HTTP head: {e}; so far: {head:?}"));
        head.push(byte[0]);
        assert!(head.len() < 64 * 1024, "an endless HTTP head");
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A Chrome DevTools Protocol session with one page, over a WebSocket
/// (RFC 6455: text frames, masked from us, unmasked from chromium).
struct Cdp {
    stream: TcpStream,
    next_id: u64,
}

impl Cdp {
    #[track_caller]
    fn connect(url: &str) -> Cdp {
        let rest = url.strip_prefix("ws://").unwrap_or_else(|| panic!("not a ws:// URL: {url}"));
        let (host, path) = rest.split_at(rest.find('/').expect("a path"));
        let mut stream = connect(host.parse().unwrap_or_else(|e| panic!("{host}: {e}")));
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let head = read_head(&mut stream);
        assert!(head.starts_with("HTTP/1.1 101"), "the DevTools WebSocket handshake: {head}");
        Cdp { stream, next_id: 1 }
    }

    fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mask = [0x5a, 0x17, 0xc3, 0x8e];
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).unwrap();
    }

    /// The next text message (answering pings on the way).
    fn read_message(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            self.stream.read_exact(&mut head).unwrap_or_else(|e| panic!("reading from DevTools: {e}"));
            let (fin, opcode, masked) = (head[0] & 0x80 != 0, head[0] & 0x0f, head[1] & 0x80 != 0);
            let length = match head[1] & 0x7f {
                126 => {
                    let mut n = [0u8; 2];
                    self.stream.read_exact(&mut n).unwrap();
                    u64::from(u16::from_be_bytes(n))
                }
                127 => {
                    let mut n = [0u8; 8];
                    self.stream.read_exact(&mut n).unwrap();
                    u64::from_be_bytes(n)
                }
                n => u64::from(n),
            };
            assert!(length < 64 << 20, "a {length}-byte DevTools frame");
            let mut mask = [0u8; 4];
            if masked {
                self.stream.read_exact(&mut mask).unwrap();
            }
            let mut payload = vec![0u8; length as usize];
            self.stream.read_exact(&mut payload).unwrap();
            if masked {
                payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= mask[i % 4]);
            }
            match opcode {
                0x0..=0x2 => {
                    message.extend_from_slice(&payload);
                    if fin {
                        return String::from_utf8(message).expect("UTF-8 from DevTools");
                    }
                }
                0x8 => panic!("DevTools closed the connection: {payload:?}"),
                0x9 => self.send_frame(0xA, &payload),
                _ => {}
            }
        }
    }

    /// Calls `method` and returns its result (events on the way are skipped).
    #[track_caller]
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({ "id": id, "method": method, "params": params }).to_string();
        self.send_frame(0x1, request.as_bytes());
        loop {
            let message: Value = serde_json::from_str(&self.read_message()).expect("JSON from DevTools");
            if message["id"] == id {
                assert!(message["error"].is_null(), "{method}: {message}");
                return message["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page (JSON-able).
    #[track_caller]
    fn evaluate(&mut self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true }));
        assert!(result["exceptionDetails"].is_null(), "{expression}: {result}");
        result["result"]["value"].clone()
    }
}

/// What the page shows: each table's rows as their cells' text (and the
/// cells' `data-value`), the phase, the health, the error line, the text as
/// rendered, and every URL the page loaded.
const SNAPSHOT: &str = r##"(() => {
  const rows = (id) => [...document.querySelectorAll("#" + id + " tr")].map((tr) => ({
    cells: [...tr.cells].map((td) => td.textContent),
    values: [...tr.cells].map((td) => td.dataset.value ?? null),
  }));
  const text = (id) => document.getElementById(id)?.textContent ?? null;
  return {
    phase: text("phase"), health: text("health"), error: text("error"),
    listeners: rows("listeners"), plugins: rows("plugins"), channels: rows("channels"),
    rendered: document.body?.innerText ?? "",
    resources: performance.getEntriesByType("resource").map((e) => e.name),
  };
})()"##;

/// Waits until `page` shows listener `listener` on `address` with plugin
/// echo generation 1, a busy channel of `peer`, and the phase; returns
/// that [`SNAPSHOT`].
async fn live_page(page: &mut Cdp, chromium: &Chromium, listener: u64, address: &str, peer: &str) -> Value {
    let last = RefCell::new(Value::Null);
    eventually!(
        async || {
            let shown = page.evaluate(SNAPSHOT);
            *last.borrow_mut() = shown.clone();
            let busy =
                rows_with(&shown, "channels", &[None, Some(&listener.to_string()), Some(peer)]).iter().any(|row| {
                    (4..=5).any(|i| {
                        row["values"][i].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(|rate| rate > 0.0)
                    })
                });
            let ready = shown["phase"] == "running"
                && !rows_with(&shown, "listeners", &[Some(&listener.to_string()), Some(address), Some("echo")])
                    .is_empty()
                && !rows_with(&shown, "plugins", &[Some("echo"), Some("1"), Some("current")]).is_empty()
                && busy;
            ready.then_some(shown)
        },
        "the status page to show listener {listener} on {address}, plugin echo generation 1, a busy channel \
         for {peer} and the phase; it shows:\n{:#}\nchromium's output:\n{}",
        last.borrow(),
        chromium.log()
    )
    .await
}

/// The rows of one table whose cells are `cells` (`None` matches anything).
fn rows_with<'a>(page: &'a Value, table: &str, cells: &[Option<&str>]) -> Vec<&'a Value> {
    let matches = |row: &&Value| {
        cells.iter().enumerate().all(|(i, want)| want.is_none_or(|want| row["cells"][i].as_str() == Some(want)))
    };
    page[table].as_array().into_iter().flatten().filter(matches).collect()
}

/// An echo client doing round trips until dropped, so that its channel
/// has rates to show.
struct Traffic {
    stop: Arc<AtomicBool>,
    peer: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(address: SocketAddr) -> Traffic {
        // Every read and write times out after the patience.
        let mut stream = connect(address);
        let peer = stream.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("traffic".to_string())
            .spawn(move || {
                let (chunk, mut back) = ([7u8; 4096], [0u8; 4096]);
                while !stopped.load(Ordering::Relaxed) {
                    if stream.write_all(&chunk).is_err() || stream.read_exact(&mut back).is_err() {
                        return;
                    }
                    // A few MB/s: plenty for a rate, and light on a busy machine.
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
            .unwrap();
        Traffic { stop, peer, thread: Some(thread) }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn status_page_in_headless_chromium_shows_listeners_plugins_live_channels_and_the_loop() {
    let runtime = runtime();
    let daemon = runtime.block_on(InProcessDaemon::start());
    let (listener, address) = runtime.block_on(async { daemon.client().await.start_listener("echo", &[]).await });
    let base = format!("http://{}", daemon.daemon().http_addr().expect("the harness turns the HTTP API on"));

    // The document itself: HTML that names no other origin, and a policy
    // that lets the browser load nothing from one.
    let (status, content_type, csp, html) = runtime.block_on(async {
        let response = Http::of(&daemon).send("GET", "/", None).await;
        let header =
            |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let (content_type, csp) = (header("content-type"), header("content-security-policy"));
        (response.status().as_u16(), content_type, csp, within("the page's body", response.text()).await.unwrap())
    });
    assert_eq!((status, content_type.as_str()), (200, "text/html; charset=utf-8"), "{html}");
    assert!(csp.starts_with("default-src 'none';"), "{csp:?}");
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("src="), "{html}");

    let traffic = Traffic::start(address);
    let peer = traffic.peer.to_string();
    let address = address.to_string();

    let mut chromium = Chromium::open(&format!("{base}/"));
    let mut page = chromium.page();
    let shown = runtime.block_on(live_page(&mut page, &chromium, listener, &address, &peer));
    // What people see, as rendered.
    let rendered = shown["rendered"].as_str().unwrap();
    for text in [address.as_str(), peer.as_str(), "echo", "running"] {
        assert!(rendered.contains(text), "{text:?} is not on the rendered page:\n{rendered}");
    }
    let channel = rows_with(&shown, "channels", &[None, None, Some(&peer)])[0];
    assert_eq!(channel["cells"][3], "echo #1", "the channel's plugin and generation: {channel}");
    let rates = [channel["cells"][4].as_str().unwrap(), channel["cells"][5].as_str().unwrap()];
    assert!(rates.iter().any(|rate| rate.ends_with("/s") && !rate.starts_with("0 ")), "{rates:?}");
    // "slow callbacks" when a debug build's callback took longer than 10 ms.
    assert!(["ok", "slow callbacks"].contains(&shown["health"].as_str().unwrap()), "{shown:#}");
    assert_eq!(shown["error"], "", "the page reports no failed request: {shown:#}");
    // Everything it loaded came from the daemon.
    let resources = shown["resources"].as_array().unwrap();
    assert!(
        resources.iter().all(|url| url.as_str().is_some_and(|url| url.starts_with(&format!("{base}/")))),
        "{resources:?}"
    );
    assert!(resources.iter().any(|url| url.as_str().unwrap().ends_with("/v1/daemon")), "{resources:?}");

    drop(page);
    drop(chromium);
    drop(traffic);
    drop(daemon);
}

/// With a token file, the page's document loads without one; the page asks
/// for a token when the API answers 401, and with one given in its form,
/// or in its address (`/#token=SECRET`, taken off the address at once),
/// shows everything.
#[test]
fn with_a_token_file_the_status_page_asks_for_a_token_and_shows_everything_with_one() {
    const SECRET: &str = "status-page-read-secret-0123";
    const ADMIN_SECRET: &str = "status-page-admin-secret-0123";
    let runtime = runtime();
    let tokens = TempDir::new("status-page-tokens");
    let token_file = tokens.path().join("tokens");
    std::fs::write(&token_file, format!("viewer read {SECRET}\nops admin {ADMIN_SECRET}\n")).unwrap();
    let daemon = runtime.block_on(InProcessDaemon::start_with(Options {
        config: format!("token_file = {token_file:?}\n"),
        ..Options::default()
    }));
    let (listener, address) = runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", daemon.control()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = ListenersClient::with_interceptor(channel, |mut request: tonic::Request<()>| {
            request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_SECRET}").parse().unwrap());
            Ok(request)
        });
        let request =
            v1::StartListenerRequest { address: "127.0.0.1:0".into(), plugin: "echo".into(), ..Default::default() };
        let started = client.start_listener(request).await.expect("an admin starts a listener").into_inner();
        (started.id, started.address.parse::<SocketAddr>().unwrap())
    });
    let base = format!("http://{}", daemon.daemon().http_addr().expect("the harness turns the HTTP API on"));
    let traffic = Traffic::start(address);
    let (peer, address) = (traffic.peer.to_string(), address.to_string());

    // No token: the document loads, the API answers 401, the form shows.
    let mut chromium = Chromium::open(&format!("{base}/"));
    let mut page = chromium.page();
    let last = RefCell::new(Value::Null);
    runtime.block_on(eventually!(
        async || {
            *last.borrow_mut() = page.evaluate(SNAPSHOT);
            page.evaluate(r#"document.getElementById("login")?.hidden === false"#) == Value::Bool(true)
        },
        "the page to ask for a token; it shows:\n{:#}\nchromium's output:\n{}",
        last.borrow(),
        chromium.log()
    ));
    assert!(page.evaluate(SNAPSHOT)["listeners"].to_string().contains("loading"), "nothing shown without a token");

    // The token typed into the form.
    page.evaluate(&format!(
        r#"document.getElementById("token").value = "{SECRET}"; document.getElementById("use-token").click(); true"#
    ));
    let shown = runtime.block_on(live_page(&mut page, &chromium, listener, &address, &peer));
    assert_eq!(shown["error"], "", "no failed request once the token is given: {shown:#}");

    // The token in the address, in a tab of its own (a new profile).
    drop(page);
    drop(chromium);
    let mut chromium = Chromium::open(&format!("{base}/#token={SECRET}"));
    let mut page = chromium.page();
    runtime.block_on(live_page(&mut page, &chromium, listener, &address, &peer));
    assert_eq!(page.evaluate("location.hash"), "", "the token is taken off the address");
    assert_eq!(page.evaluate(r#"document.getElementById("login").hidden"#), Value::Bool(true));
    drop(page);
    drop(chromium);
    drop(traffic);
}
