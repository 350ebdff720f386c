//! The integration-test harness: starts the daemon on ephemeral ports with a
//! private plugin directory, either as the real `asyncored` binary
//! ([`Daemon`]: for signals, flags, the CLI and the process's log and
//! memory) or in this test process ([`InProcessDaemon`]: everything else),
//! and connects a real gRPC client to it.
//!
//! Every wait is bounded by one patience, `ASYNCORE_TEST_PATIENCE_MS`
//! (default 10 s): [`eventually!`] retries a condition, [`within`] bounds one
//! future, [`connect`] gives blocking sockets read and write timeouts and
//! [`output_within`] bounds a child process. A broken test fails naming what
//! it waited for instead of hanging.
//!
//! The binaries and plugin libraries come from the workspace build
//! (`cargo build --workspace`, which the README's test command runs first):
//! stable cargo cannot make a test depend on another package's cdylib.

#![forbid(unsafe_code)]

use std::{
    fmt,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    panic::Location,
    path::{Path, PathBuf},
    process::{Child, ChildStderr, Command, Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use asyncore_proto::v1::{
    channels_client::ChannelsClient, daemon_client::DaemonClient, listeners_client::ListenersClient,
    plugins_client::PluginsClient,
};
use tonic::transport::Channel;

/// The environment variable that sets the patience, in milliseconds.
pub const ENV_PATIENCE: &str = "ASYNCORE_TEST_PATIENCE_MS";

/// The patience when [`ENV_PATIENCE`] is not set.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(10);

/// How long any one wait of a test may take: [`ENV_PATIENCE`], or
/// [`DEFAULT_PATIENCE`]. Raise it on a slow machine rather than editing
/// tests.
pub fn patience() -> Duration {
    static PATIENCE: OnceLock<Duration> = OnceLock::new();
    *PATIENCE.get_or_init(|| match std::env::var(ENV_PATIENCE) {
        Ok(millis) => Duration::from_millis(
            millis.trim().parse().unwrap_or_else(|e| panic!("{ENV_PATIENCE}={millis:?}: not milliseconds: {e}")),
        ),
        Err(_) => DEFAULT_PATIENCE,
    })
}

/// What an [`eventually`] attempt returns: `true` or `Some(value)` when the
/// awaited state is reached.
pub trait Outcome {
    /// What [`eventually`] returns.
    type Value;

    /// The value, once there.
    fn ready(self) -> Option<Self::Value>;
}

impl Outcome for bool {
    type Value = ();

    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;

    fn ready(self) -> Option<T> {
        self
    }
}

/// Retries `attempt` (with short pauses) until it returns `true` or
/// `Some(value)`, for up to [`patience()`] in all; then panics, naming the
/// caller and, through `what` (called only then), what was awaited. An
/// attempt that hangs counts against the same patience.
///
/// Usually spelt [`eventually!`], which formats the message.
#[track_caller]
pub fn eventually<R: Outcome>(
    mut attempt: impl AsyncFnMut() -> R,
    what: impl FnOnce() -> String,
) -> impl Future<Output = R::Value> {
    let caller = Location::caller();
    async move {
        let patience = patience();
        let mut attempts = 0u64;
        let outcome = tokio::time::timeout(patience, async {
            let mut pause = Duration::from_millis(1);
            loop {
                attempts += 1;
                if let Some(value) = attempt().await.ready() {
                    return value;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        })
        .await;
        match outcome {
            Ok(value) => value,
            Err(_) => panic!("{caller}: gave up after {patience:?} ({attempts} attempts) waiting for {}", what()),
        }
    }
}

/// `eventually!(attempt, "format", args...)`: [`eventually`] with a
/// formatted description of what is awaited, built only if it is not
/// reached. `attempt` is an async closure returning `bool` or an `Option`;
/// the result is a future to `.await` (or `block_on`).
///
/// ```ignore
/// eventually!(async || daemon.log().contains("drained"), "\"drained\" in the log:\n{}", daemon.log()).await;
/// ```
#[macro_export]
macro_rules! eventually {
    ($attempt:expr, $($what:tt)+) => {
        $crate::eventually($attempt, || ::std::format!($($what)+))
    };
}

/// Awaits `future` for up to [`patience()`]; panics naming the caller and
/// `what` if it takes longer.
#[track_caller]
pub fn within<F: Future>(what: impl fmt::Display, future: F) -> impl Future<Output = F::Output> {
    let caller = Location::caller();
    async move {
        let patience = patience();
        match tokio::time::timeout(patience, future).await {
            Ok(output) => output,
            Err(_) => panic!("{caller}: gave up after {patience:?} waiting for {what}"),
        }
    }
}

/// Runs `f` on a thread of its own and returns its result, or panics if it
/// takes longer than [`patience()`] (the thread is then left behind): for
/// blocking code with no timeout of its own, such as running an engine
/// loop on the test's thread.
#[track_caller]
pub fn on_thread_within<T: Send + 'static>(what: impl fmt::Display, f: impl FnOnce() -> T + Send + 'static) -> T {
    let caller = Location::caller();
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("bounded".to_string())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn a thread");
    match rx.recv_timeout(patience()) {
        Ok(value) => value,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread sends before it ends"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{caller}: gave up after {:?} waiting for {what}", patience())
        }
    }
}

/// A blocking client socket whose reads and writes time out after
/// [`patience()`], so that a missing reply fails the test instead of
/// hanging it.
#[track_caller]
pub fn connect(address: SocketAddr) -> TcpStream {
    let caller = Location::caller();
    let stream = TcpStream::connect_timeout(&address, patience())
        .unwrap_or_else(|e| panic!("{caller}: connect to {address}: {e}"));
    stream.set_read_timeout(Some(patience())).unwrap();
    stream.set_write_timeout(Some(patience())).unwrap();
    stream
}

/// Runs `command` to completion (stdin empty, stdout and stderr captured)
/// and returns its output; kills it and panics if it runs longer than
/// [`patience()`].
#[track_caller]
pub fn output_within(command: &mut Command) -> Output {
    let caller = Location::caller();
    let shown = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{caller}: cannot run {shown}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("child-output".to_string())
        .spawn(move || {
            let _ = tx.send(child.wait_with_output());
        })
        .expect("spawn a thread");
    match rx.recv_timeout(patience()) {
        Ok(output) => output.unwrap_or_else(|e| panic!("{caller}: {shown}: {e}")),
        Err(_) => {
            // Not reaped yet (its waiter is still waiting), so the pid is
            // still this child's.
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            panic!("{caller}: {shown} did not finish within {:?}", patience());
        }
    }
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

/// Puts `bytes` at `path` as a build tool does: written beside it, then
/// renamed over it. Overwriting a library the daemon has mapped, in place,
/// could crash it.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let staging = path.with_extension("staging");
    std::fs::write(&staging, bytes).unwrap_or_else(|e| panic!("write {}: {e}", staging.display()));
    std::fs::rename(&staging, path).unwrap_or_else(|e| panic!("rename over {}: {e}", path.display()));
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
    /// Extra environment variables (binary only: they reach plugins only in
    /// a process of their own).
    pub env: Vec<(String, String)>,
    /// Extra command-line flags (binary only).
    pub args: Vec<&'static str>,
    /// Make stderr a pipe that nobody reads (binary only; [`Daemon::log`]
    /// is then empty).
    pub stalled_stderr: bool,
    /// The control API's address in the config [default: 127.0.0.1:0].
    pub control: Option<String>,
    /// The HTTP API's address in the config [default: 127.0.0.1:0].
    pub http: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            plugins: vec!["asyncore_plugin_echo"],
            config: String::new(),
            env: Vec::new(),
            args: Vec::new(),
            stalled_stderr: false,
            control: None,
            http: None,
        }
    }
}

/// A private directory with `plugins/` (the requested libraries copied in)
/// and `asyncored.toml` (control and HTTP on 127.0.0.1:0, that plugin
/// directory, the extra config). Returns the directory and the config file's path.
fn prepare(options: &Options, label: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(label);
    let plugin_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    for name in &options.plugins {
        let source = plugin_library(name);
        std::fs::copy(&source, plugin_dir.join(source.file_name().unwrap())).unwrap();
    }
    let config = dir.path().join("asyncored.toml");
    // The HTTP API on an ephemeral port too: its default port would be
    // shared by every test.
    std::fs::write(
        &config,
        format!(
            "control = \"{}\"\nhttp = \"{}\"\nplugin_dirs = [\"plugins\"]\n{}",
            options.control.as_deref().unwrap_or("127.0.0.1:0"),
            options.http.as_deref().unwrap_or("127.0.0.1:0"),
            options.config
        ),
    )
    .unwrap();
    (dir, config)
}

/// gRPC clients over one connection to `control`; every call times out
/// after [`patience()`].
async fn connect_client(control: SocketAddr) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{control}"))
        .unwrap()
        .connect_timeout(patience())
        .timeout(patience())
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

/// A running `asyncored` process, killed on drop. For what only the binary
/// has: signals, flags, its log on stderr, its memory, and the CLI talking
/// to it; everything else runs on an [`InProcessDaemon`].
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// The ready line's control endpoint: `ip:port`, or `unix:PATH`.
    control: String,
    dir: TempDir,
    /// The read end of a stalled stderr, kept open so writes block rather
    /// than fail.
    _stalled_stderr: Option<ChildStderr>,
}

impl Daemon {
    /// Starts the daemon with the echo plugin and no listeners.
    #[track_caller]
    pub fn start() -> Daemon {
        Daemon::start_with(Options::default())
    }

    /// Starts the daemon and waits until it reports ready.
    #[track_caller]
    pub fn start_with(options: Options) -> Daemon {
        let (dir, config) = prepare(&options, "daemon");
        let log_path = dir.path().join("asyncored.log");
        let stderr = if options.stalled_stderr {
            Stdio::piped()
        } else {
            Stdio::from(std::fs::File::create(&log_path).unwrap())
        };
        let mut child = Command::new(binary("asyncored"))
            .arg("--config")
            .arg(&config)
            .args(&options.args)
            .env("RUST_LOG", std::env::var("ASYNCORE_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .envs(options.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn asyncored");
        let stalled_stderr = child.stderr.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("daemon-stdout".to_string())
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(address) = line.strip_prefix("asyncored ready: control ") {
                        let _ = tx.send(address.to_owned());
                    }
                }
            })
            .expect("spawn a thread");
        let control = match rx.recv_timeout(patience()) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("asyncored did not become ready within {:?}; its log:\n{log}", patience());
            }
        };
        Daemon { child, control, dir, _stalled_stderr: stalled_stderr }
    }

    /// The control API address.
    ///
    /// # Panics
    ///
    /// If the control API is on a Unix socket: see [`Daemon::control_endpoint`].
    #[track_caller]
    pub fn control(&self) -> SocketAddr {
        self.control.parse().unwrap_or_else(|_| panic!("the control api is not on TCP: {}", self.control))
    }

    /// Where the control API listens, as the ready line said: `ip:port`, or
    /// `unix:PATH`.
    pub fn control_endpoint(&self) -> &str {
        &self.control
    }

    /// The daemon's private directory (config, plugins, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the daemon logged so far. Records are written by a log
    /// thread, a moment after they happen: wait for one with
    /// [`eventually!`].
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

    /// Sends `signal` and waits for the exit, up to [`patience()`].
    pub async fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        // A plain kill(2) of our own child, through kill(1): this crate has
        // no unsafe code.
        let sent = output_within(Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()));
        assert!(sent.status.success(), "kill -{signal}: {}", String::from_utf8_lossy(&sent.stderr));
        let log = self.dir.path().join("asyncored.log");
        let child = &mut self.child;
        eventually!(
            async || child.try_wait().unwrap(),
            "asyncored to exit after signal {signal}; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
        .await
    }

    /// CPU time the daemon has used so far, user and system, all threads
    /// (from `/proc/PID/stat`, in clock ticks of 10 ms).
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(&format!("/proc/{}/stat", self.child.id()))
    }

    /// CPU time the daemon's thread named `name` has used so far (the first
    /// one of that name), as [`Daemon::cpu_time`].
    pub fn thread_cpu_time(&self, name: &str) -> Duration {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).expect("the daemon's threads");
        let task = tasks
            .filter_map(Result::ok)
            .find(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name))
            .unwrap_or_else(|| panic!("no thread named {name} in the daemon"));
        cpu_time_of(&task.path().join("stat").to_string_lossy())
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
    /// output (within [`patience()`]).
    #[track_caller]
    pub fn ctl(&self, args: &[&str]) -> Output {
        output_within(Command::new(binary("asyncorectl")).arg("--control").arg(&self.control).args(args))
    }

    /// gRPC clients of every service over one connection.
    pub async fn client(&self) -> Client {
        connect_client(self.control()).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        // Bounded: SIGKILL cannot be ignored.
        let _ = self.child.wait();
    }
}

/// An [`asyncored::Daemon`] started in this test process, on the test's
/// tokio runtime (which serves its control API, so the runtime must outlive
/// it), with the same private directory and client accessors as the binary
/// [`Daemon`]. Dropping it stops the daemon: its poll thread ends and its
/// ports are closed.
///
/// Plugins run in the test process, so environment variables meant for them
/// cannot be set per daemon, and there is no log or memory of its own to
/// look at: tests of those use the binary.
#[derive(Debug)]
pub struct InProcessDaemon {
    // Dropped before `dir`, which holds its plugin directory.
    daemon: asyncored::Daemon,
    dir: TempDir,
}

impl InProcessDaemon {
    /// Starts a daemon with the echo plugin and no listeners.
    pub async fn start() -> InProcessDaemon {
        InProcessDaemon::start_with(Options::default()).await
    }

    /// Starts a daemon; returns once it is running.
    pub async fn start_with(options: Options) -> InProcessDaemon {
        InProcessDaemon::try_start_with(options).await.unwrap_or_else(|e| panic!("asyncored did not start: {e}"))
    }

    /// Starts a daemon, or returns why it did not start (the error and its
    /// causes, one line).
    pub async fn try_start_with(options: Options) -> Result<InProcessDaemon, String> {
        assert!(options.env.is_empty(), "environment variables need a daemon process: use Daemon");
        assert!(options.args.is_empty(), "flags need the binary: use Daemon");
        assert!(!options.stalled_stderr, "an in-process daemon has no stderr of its own: use Daemon");
        let (dir, config) = prepare(&options, "in-process");
        let config = asyncored::Config::from_file(&config).expect("the harness's config is valid");
        match within("the in-process daemon to start", asyncored::Daemon::start(config)).await {
            Ok(daemon) => Ok(InProcessDaemon { daemon, dir }),
            Err(e) => Err(format!("{e:#}")),
        }
    }

    /// The control API address.
    pub fn control(&self) -> SocketAddr {
        self.daemon.control_addr()
    }

    /// The daemon's private directory (config, plugins).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon itself.
    pub fn daemon(&self) -> &asyncored::Daemon {
        &self.daemon
    }

    /// Its handle to the poll loop.
    pub fn engine(&self) -> &asyncored::EngineHandle {
        self.daemon.engine()
    }

    /// gRPC clients of every service over one connection.
    pub async fn client(&self) -> Client {
        connect_client(self.control()).await
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
    /// accepted.
    pub async fn channel_by_peer(&mut self, listener_id: u64, peer: SocketAddr) -> asyncore_proto::v1::Channel {
        let peer = peer.to_string();
        eventually!(
            async || self.channels_of(listener_id).await.into_iter().find(|c| c.peer_address == peer),
            "a channel for {peer} on listener {listener_id}"
        )
        .await
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
pub fn assert_memory_bounded_while_not_reading(daemon: &Daemon, stream: &mut TcpStream, chunk: &[u8]) {
    use std::io::{Read, Write};
    stream.set_read_timeout(Some(patience())).unwrap();
    stream.set_write_timeout(Some(patience())).unwrap();
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

/// User plus system time from a `/proc/.../stat` file: fields 14 and 15,
/// counted after the command name (which may hold spaces), in the kernel's
/// `USER_HZ` ticks, 100 a second on Linux.
fn cpu_time_of(stat_path: &str) -> Duration {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_else(|e| panic!("{stat_path}: {e}"));
    let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<u64> = after_name.split_whitespace().skip(11).take(2).map(|f| f.parse().unwrap()).collect();
    Duration::from_millis((fields[0] + fields[1]) * 10)
}
