//! The integration-test harness: starts the real `asyncored` binary on
//! ephemeral ports with a private plugin directory, and connects a real gRPC
//! client to it.
//!
//! The binaries and plugin libraries come from the workspace build
//! (`cargo build --workspace`, which the README's test command runs first):
//! stable cargo cannot make a test depend on another package's cdylib.

#![forbid(unsafe_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use asyncore_proto::v1::{
    channels_client::ChannelsClient, daemon_client::DaemonClient, listeners_client::ListenersClient,
    plugins_client::PluginsClient,
};
use tonic::transport::Channel;

/// Retries a condition until it holds or a deadline passes (10 s by
/// default), then panics with the message.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $($arg:tt)+) => {{
        let deadline = ::std::time::Instant::now() + ::std::time::Duration::from_secs(10);
        loop {
            if $cond {
                break;
            }
            if ::std::time::Instant::now() > deadline {
                panic!($($arg)+);
            }
            ::std::thread::sleep(::std::time::Duration::from_millis(20));
        }
    }};
}

/// The directory the workspace build wrote binaries and plugins to
/// (`target/debug`), found from this test binary's own path
/// (`target/debug/deps/it-…`).
pub fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

/// Path of a binary of the workspace.
#[track_caller]
pub fn binary(name: &str) -> PathBuf {
    let path = build_dir().join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` first", path.display());
    path
}

/// Path of a plugin library built by the workspace, by crate name
/// (`asyncore_plugin_echo`).
#[track_caller]
pub fn plugin_library(crate_name: &str) -> PathBuf {
    binary(&format!("lib{crate_name}.{}", std::env::consts::DLL_EXTENSION))
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory under the system's temp dir.
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "asyncore-test-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct Options {
    /// Plugin crates copied into the daemon's plugin directory.
    pub plugins: Vec<&'static str>,
    /// Extra TOML appended to the config file.
    pub config: String,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options { plugins: vec!["asyncore_plugin_echo"], config: String::new(), env: Vec::new() }
    }
}

/// A running `asyncored` process, killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    control: SocketAddr,
    dir: TempDir,
}

impl Daemon {
    /// Starts the daemon with the echo plugin and no listeners.
    pub fn start() -> Daemon {
        Daemon::start_with(Options::default())
    }

    /// Starts the daemon and waits until it reports ready.
    #[track_caller]
    pub fn start_with(options: Options) -> Daemon {
        let dir = TempDir::new("daemon");
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir_all(&plugin_dir).unwrap();
        for name in &options.plugins {
            let source = plugin_library(name);
            std::fs::copy(&source, plugin_dir.join(source.file_name().unwrap())).unwrap();
        }
        let config = dir.path().join("asyncored.toml");
        std::fs::write(&config, format!("control = \"127.0.0.1:0\"\nplugin_dirs = [\"plugins\"]\n{}", options.config))
            .unwrap();
        let log = std::fs::File::create(dir.path().join("asyncored.log")).unwrap();
        let mut child = Command::new(binary("asyncored"))
            .arg("--config")
            .arg(&config)
            .envs(options.env.iter().cloned())
            .env("RUST_LOG", std::env::var("ASYNCORE_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn asyncored");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = line.strip_prefix("asyncored ready: control ") {
                    let _ = tx.send(address.parse::<SocketAddr>().expect("control address"));
                }
            }
        });
        let control = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.path().join("asyncored.log")).unwrap_or_default();
                panic!("asyncored did not become ready; its log:\n{log}");
            }
        };
        Daemon { child, control, dir }
    }

    /// The control API address.
    pub fn control(&self) -> SocketAddr {
        self.control
    }

    /// The daemon's private directory (config, plugins, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("asyncored.log")).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics if the process has exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("asyncored exited with {status}; its log:\n{}", self.log());
        }
    }

    /// Sends a signal and waits for the exit, up to `timeout`.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = i32::try_from(self.child.id()).expect("pid fits");
        // A plain kill(2) of our own child: no memory is involved.
        let _ = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the daemon in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Runs `asyncorectl --control <this daemon> ARGS` and returns its
    /// output.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("asyncorectl"))
            .arg("--control")
            .arg(self.control.to_string())
            .args(args)
            .output()
            .expect("run asyncorectl")
    }

    /// gRPC clients of every service over one connection.
    pub async fn client(&self) -> Client {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.control))
            .unwrap()
            .connect()
            .await
            .expect("connect to the control api");
        Client {
            listeners: ListenersClient::new(channel.clone()),
            channels: ChannelsClient::new(channel.clone()),
            plugins: PluginsClient::new(channel.clone()),
            daemon: DaemonClient::new(channel.clone()),
            channel,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// gRPC clients of the control API.
#[derive(Debug, Clone)]
pub struct Client {
    pub listeners: ListenersClient<Channel>,
    pub channels: ChannelsClient<Channel>,
    pub plugins: PluginsClient<Channel>,
    pub daemon: DaemonClient<Channel>,
    pub channel: Channel,
}

impl Client {
    /// Every channel of a listener, through all pages of `ListChannels`
    /// (small pages, so that paging is exercised).
    pub async fn channels_of(&mut self, listener_id: u64) -> Vec<asyncore_proto::v1::Channel> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .channels
                .list_channels(asyncore_proto::v1::ListChannelsRequest {
                    listener_id: Some(listener_id),
                    page_size: 37,
                    page_token,
                })
                .await
                .expect("ListChannels")
                .into_inner();
            out.extend(page.channels);
            if page.next_page_token.is_empty() {
                return out;
            }
            page_token = page.next_page_token;
        }
    }

    /// The channel the daemon serves the client at `peer` with, once it is
    /// accepted (waits up to 10 s).
    pub async fn channel_by_peer(&mut self, listener_id: u64, peer: SocketAddr) -> asyncore_proto::v1::Channel {
        let peer = peer.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(found) = self.channels_of(listener_id).await.into_iter().find(|c| c.peer_address == peer) {
                return found;
            }
            assert!(Instant::now() < deadline, "no channel for {peer}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts a listener on 127.0.0.1:0 and returns its id and address.
    pub async fn start_listener(&mut self, plugin: &str, config: &[(&str, &str)]) -> (u64, SocketAddr) {
        let listener = self
            .listeners
            .start_listener(asyncore_proto::v1::StartListenerRequest {
                address: "127.0.0.1:0".to_string(),
                plugin: plugin.to_string(),
                config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            })
            .await
            .expect("StartListener")
            .into_inner();
        (listener.id, listener.address.parse().expect("bound address"))
    }
}

/// Backpressure check: after one echoed warm-up `chunk` (which settles the
/// allocator and buffers), offers 300 MiB of `chunk`s on `stream` without
/// ever reading, until writes block for 2 s. Asserts that the daemon did not
/// take it all and that its resident memory grew by less than 32 MiB.
#[track_caller]
pub fn assert_memory_bounded_while_not_reading(daemon: &Daemon, stream: &mut std::net::TcpStream, chunk: &[u8]) {
    use std::io::{Read, Write};
    stream.write_all(chunk).unwrap();
    let mut back = vec![0u8; chunk.len()];
    stream.read_exact(&mut back).unwrap();
    assert!(back == chunk, "warm-up chunk echoed");
    let before = daemon.rss_kib();

    stream.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut offered = 0usize;
    while offered < 300 << 20 {
        match stream.write(chunk) {
            Ok(n) => offered += n,
            Err(_) => break,
        }
    }
    let after = daemon.rss_kib();
    assert!(offered < 300 << 20, "the daemon took all {offered} bytes: no backpressure");
    assert!(
        after < before + 32 * 1024,
        "resident memory grew from {before} KiB to {after} KiB while a client did not read"
    );
}

/// A deterministic pseudo-random byte stream (xorshift64*), so failures
/// reproduce.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `low..=high`.
    pub fn range(&mut self, low: usize, high: usize) -> usize {
        low + (self.next_u64() % (high - low + 1) as u64) as usize
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}
